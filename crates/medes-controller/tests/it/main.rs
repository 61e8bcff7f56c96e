//! The scheduler over the real node agent and real sandboxes (root, namespaces, cgroups, the
//! Python runtime). Skipped with a message when the host cannot run sandboxes, unless `CI=true`,
//! where that is a failure.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use medes_agent::{Agent, AgentConfig};
use medes_controller::{Controller, ControllerConfig};
use medes_core::{
    Action, ActionName, Activation, ActivationId, ActivationStatus, Code, Exec, InvokeRequest,
    Invoker, Limits, Namespace, StartKind,
};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::{Map, Value, json};

struct Platform {
    ctl: Arc<Controller>,
    agent: Agent,
    _data: tempfile::TempDir,
}

impl Platform {
    async fn stop(self) {
        self.ctl.shutdown().await;
        self.agent.shutdown().await;
        assert_eq!(self.agent.n_sandboxes(), 0);
    }
}

fn platform() -> Option<Platform> {
    platform_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        ..Default::default()
    })
}

/// A controller with `cfg` over one real agent, or `None` (outside CI) if sandboxes cannot run.
fn platform_with(cfg: ControllerConfig) -> Option<Platform> {
    // Logs for debugging: `RUST_LOG=medes_controller=debug,medes_agent=debug`.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("controller integration tests cannot run in CI: {e}");
        }
        eprintln!("skipping controller integration test: {e}");
        return None;
    }
    let _ = become_subreaper();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = Agent::new(AgentConfig {
        data_dir: data.path().to_path_buf(),
        sandbox,
        ..Default::default()
    })
    .expect("agent");
    let ctl = Controller::new(
        cfg,
        vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)],
    );
    Some(Platform {
        ctl,
        agent,
        _data: data,
    })
}

fn action(name: &str, code: Code, memory_mb: u64, timeout_ms: u64) -> Arc<Action> {
    Arc::new(Action {
        name: ActionName {
            namespace: Namespace("guest".into()),
            name: name.into(),
        },
        version: "0.0.1".into(),
        exec: Exec {
            kind: "python:3".into(),
            code,
            main: "main".into(),
        },
        parameters: Map::new(),
        annotations: vec![],
        limits: Limits {
            timeout_ms,
            memory_mb,
            concurrency: 1,
            logs_kb: 10_240,
        },
        publish: false,
        updated: 0,
    })
}

async fn invoke(p: &Platform, a: &Arc<Action>, params: Value) -> Activation {
    let req = InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        subject: "tester".into(),
        api_key: "uuid:key".into(),
        arrived: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    };
    let id = req.id.clone();
    let act = p.ctl.invoke(req).await.expect("admitted");
    assert_eq!(act.id, id);
    act
}

const HELLO: &str = r#"
import os, sys
def main(args):
    print("hello", args.get("name"))
    print("warn", file=sys.stderr)
    return {"greeting": "hi " + str(args.get("name")), "pid": os.getpid(),
            "act": os.environ.get("__OW_ACTIVATION_ID"), "host": os.environ.get("__OW_API_HOST"),
            "key": os.environ.get("__OW_API_KEY"), "deadline": os.environ.get("__OW_DEADLINE")}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_action_starts_cold_then_warm() {
    let Some(p) = platform() else { return };
    let a = action("hello", Code::Source(HELLO.into()), 128, 10_000);

    let cold = invoke(&p, &a, json!({"name": "ann"})).await;
    assert_eq!(
        cold.response.status,
        ActivationStatus::Success,
        "{:?}",
        cold.response
    );
    assert_eq!(cold.start_kind, StartKind::Cold);
    assert!(cold.init_time_ms.is_some());
    let r = &cold.response.result;
    assert_eq!(r["greeting"], "hi ann");
    assert_eq!(r["pid"], 1, "the runtime is PID 1 of its namespace");
    assert_eq!(r["act"], cold.id.0.as_str());
    assert_eq!(r["host"], "http://127.0.0.1:3233");
    assert_eq!(r["key"], "uuid:key");
    let deadline: u64 = r["deadline"].as_str().unwrap().parse().unwrap();
    assert!(
        deadline >= cold.start + 10_000 - 1_000 && deadline <= cold.end + 10_000,
        "{deadline}"
    );
    assert!(
        cold.logs.iter().any(|l| l.ends_with("stdout: hello ann")),
        "{:?}",
        cold.logs
    );
    assert!(
        cold.logs.iter().any(|l| l.ends_with("stderr: warn")),
        "{:?}",
        cold.logs
    );

    let warm = invoke(&p, &a, json!({"name": "bob"})).await;
    assert_eq!(warm.start_kind, StartKind::Warm);
    assert_eq!(warm.response.result["greeting"], "hi bob");
    assert!(warm.main_ms.is_some());

    // Measured memory replaces the reservation.
    p.ctl.refresh_memory().await;
    let sbs = p.ctl.sandboxes();
    assert_eq!(sbs.len(), 1);
    let m = sbs[0].measured.expect("measured");
    assert!(m.0 > 1 << 20 && m.0 < 128 << 20, "{m}");
    assert_eq!(p.ctl.memory_used()[0].0, m.0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_become_error_activations_and_the_platform_keeps_serving() {
    let Some(p) = platform() else { return };
    let code = r#"
import time
def main(args):
    what = args.get("what")
    if what == "raise":
        raise ValueError("boom")
    if what == "sleep":
        time.sleep(30)
    if what == "eat":
        hog = []
        while True:
            hog.append(bytearray(16 << 20))
    if what == "error":
        return {"error": "bad input"}
    if what == "list":
        return [1, 2]
    return {"ok": True}
"#;
    let a = action("flaky", Code::Source(code.into()), 128, 1_500);

    let ok = invoke(&p, &a, json!({})).await;
    assert_eq!(ok.response.result, json!({"ok": true}));

    let raised = invoke(&p, &a, json!({"what": "raise"})).await;
    assert_eq!(raised.response.status, ActivationStatus::DeveloperError);
    let msg = raised.response.result["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("boom"), "{msg}");
    let after = invoke(&p, &a, json!({})).await;
    assert_eq!(
        after.start_kind,
        StartKind::Warm,
        "an exception keeps the sandbox"
    );

    let app = invoke(&p, &a, json!({"what": "error"})).await;
    assert_eq!(app.response.status, ActivationStatus::ApplicationError);
    assert_eq!(app.response.result, json!({"error": "bad input"}));

    let list = invoke(&p, &a, json!({"what": "list"})).await;
    assert_eq!(list.response.status, ActivationStatus::DeveloperError);

    let slow = invoke(&p, &a, json!({"what": "sleep"})).await;
    assert_eq!(slow.response.status, ActivationStatus::DeveloperError);
    assert!(slow.timeout);
    assert_eq!(
        slow.response.result,
        json!({"error": "The action exceeded its time limits of 1500 milliseconds."})
    );
    let after = invoke(&p, &a, json!({})).await;
    assert_eq!(after.response.result, json!({"ok": true}));
    assert_eq!(
        after.start_kind,
        StartKind::Cold,
        "a timed-out sandbox is replaced"
    );

    let oom = invoke(&p, &a, json!({"what": "eat"})).await;
    assert_eq!(oom.response.status, ActivationStatus::DeveloperError);
    assert_eq!(
        oom.response.result,
        json!({"error": "The action exhausted its memory and was aborted."})
    );
    let after = invoke(&p, &a, json!({})).await;
    assert_eq!(after.response.result, json!({"ok": true}));
    assert_eq!(
        after.start_kind,
        StartKind::Cold,
        "an OOM-killed sandbox is replaced"
    );
    assert_eq!(p.ctl.sandboxes().len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip_actions_and_init_errors() {
    let Some(p) = platform() else { return };
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("__main__.py", opts).unwrap();
    zip.write_all(
        b"from helper import twice\ndef main(args):\n    return {'n': twice(args['n'])}\n",
    )
    .unwrap();
    zip.start_file("helper.py", opts).unwrap();
    zip.write_all(b"def twice(x):\n    return 2 * x\n").unwrap();
    let bytes = zip.finish().unwrap().into_inner();
    let z = action("zipped", Code::Zip(bytes), 128, 10_000);
    let act = invoke(&p, &z, json!({"n": 21})).await;
    assert_eq!(act.response.result, json!({"n": 42}), "{:?}", act.logs);

    let bad = action(
        "broken",
        Code::Source("def main(args)\n    return {}\n".into()),
        128,
        10_000,
    );
    let act = invoke(&p, &bad, json!({})).await;
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.response.status, ActivationStatus::DeveloperError);
    assert!(
        act.response.result["error"].is_string(),
        "{:?}",
        act.response
    );
    assert!(p.ctl.sandboxes().iter().all(|s| s.action.name != "broken"));

    let no_main = action("nomain", Code::Source("x = 1\n".into()), 128, 10_000);
    let act = invoke(&p, &no_main, json!({})).await;
    assert_eq!(
        act.response.status,
        ActivationStatus::DeveloperError,
        "{:?}",
        act.response
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_evicts_idle_sandboxes_of_real_actions() {
    let Some(p0) = platform() else { return };
    // A fresh platform with a small budget: two 128 MiB sandboxes fit, a third evicts one.
    p0.stop().await;
    let data = tempfile::tempdir().unwrap();
    let agent = Agent::new(AgentConfig {
        data_dir: data.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let cfg = ControllerConfig {
        node_memory_budget_mb: 256,
        ..Default::default()
    };
    let ctl = Controller::new(
        cfg,
        vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)],
    );
    let p = Platform {
        ctl,
        agent,
        _data: data,
    };
    let code = Code::Source("def main(args):\n    return {'ok': 1}\n".into());
    for name in ["a", "b", "c"] {
        let act = invoke(&p, &action(name, code.clone(), 128, 10_000), json!({})).await;
        assert_eq!(act.response.result, json!({"ok": 1}));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let names: Vec<String> = p
        .ctl
        .sandboxes()
        .into_iter()
        .map(|s| s.action.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        !names.contains(&"a".to_string()),
        "the least recently used one goes: {names:?}"
    );
    assert_eq!(p.ctl.evictions(), 1);
    assert_eq!(p.agent.n_sandboxes(), 2);
    p.stop().await;
}

/// A json-only action holding a few MB of deterministic state; its answer depends on that state
/// (`h`) and on the runtime's random generator (`r`).
const STATEFUL: &str = r#"
import hashlib, json, random, time
DATA = [{"k": i, "v": str(i) * 7} for i in range(30000)]
BLOB = json.dumps(DATA).encode() + random.Random(7).randbytes(2 << 20)
def main(args):
    time.sleep(args.get("sleep", 0))
    h = hashlib.sha256(BLOB + str(args.get("x")).encode()).hexdigest()
    return {"h": h, "n": len(DATA), "r": random.random()}
"#;

/// Holds a TCP listening socket: CRIU 4.1 cannot dump it on this kernel.
const TCP: &str = r#"
import socket
S = socket.socket()
S.bind(("127.0.0.1", 0))
S.listen(1)
def main(args):
    return {"port": S.getsockname()[1]}
"#;

fn states(p: &Platform) -> Vec<&'static str> {
    p.ctl.sandboxes().iter().map(|s| s.state.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_become_base_and_dedup_and_serve_dedup_starts() {
    let Some(p) = platform() else { return };
    let a = action("stateful", Code::Source(STATEFUL.into()), 256, 20_000);
    // Two sandboxes: two invocations at once.
    // (One first alone: the agent writes an action's code once.)
    let first = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(first.start_kind, StartKind::Cold, "{:?}", first.response);
    let (x, y) = tokio::join!(
        invoke(&p, &a, json!({"x": 1, "sleep": 0.3})),
        invoke(&p, &a, json!({"x": 1, "sleep": 0.3}))
    );
    let mut kinds = vec![x.start_kind, y.start_kind];
    kinds.sort_by_key(|k| k.as_str());
    assert_eq!(kinds, vec![StartKind::Cold, StartKind::Warm]);
    for act in [&first, &x, &y] {
        assert_eq!(
            act.response.status,
            ActivationStatus::Success,
            "{:?}",
            act.response
        );
    }
    let expect_h = x.response.result["h"].clone();
    assert_eq!(y.response.result["h"], expect_h);

    // The idle decision, forced: the first becomes the base, the second a dedup sandbox.
    assert_eq!(p.ctl.force_decisions(Some(&a.name)).await, 2);
    p.ctl.wait_settled().await;
    let stats = p.ctl.dedup_stats();
    let mut sorted = states(&p);
    sorted.sort();
    assert_eq!(sorted, vec!["base", "dedup"], "{stats:?}");
    p.ctl.refresh_memory().await;
    let sbs = p.ctl.sandboxes();
    let base = sbs.iter().find(|s| s.state.as_str() == "base").unwrap();
    let dd = sbs.iter().find(|s| s.state.as_str() == "dedup").unwrap();
    eprintln!(
        "base: charged {} (image {:?}); dedup: charged {} (stored {:?}, image {:?})",
        base.charged, base.image, dd.charged, dd.stored, dd.image
    );
    assert!(base.charged > base.image.unwrap(), "PSS + image");
    assert!(
        dd.charged.0 * 3 < base.image.unwrap().0,
        "a dedup sandbox of the base's function holds far less than its image"
    );
    let (base_id, dedup_id) = (base.id.clone(), dd.id.clone());
    let state_of = |id: &medes_core::SandboxId| {
        p.ctl
            .sandboxes()
            .into_iter()
            .find(|s| &s.id == id)
            .map(|s| s.state.as_str())
    };

    // The base serves a long run; a request meanwhile restores the dedup sandbox.
    let busy = invoke(&p, &a, json!({"x": 2, "sleep": 3}));
    let probe = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = std::time::Instant::now();
        let act = invoke(&p, &a, json!({"x": 1})).await;
        (act, t0.elapsed())
    };
    let (busy, (dedup, took)) = tokio::join!(busy, probe);
    assert_eq!(busy.start_kind, StartKind::Warm);
    assert_eq!(
        dedup.start_kind,
        StartKind::Dedup,
        "{:?} {:?} {:?}",
        dedup.response,
        p.ctl.dedup_stats(),
        p.ctl.sandboxes()
    );
    assert_eq!(dedup.init_time_ms, None);
    assert_eq!(
        dedup.response.status,
        ActivationStatus::Success,
        "{:?}",
        dedup.response
    );
    assert_eq!(
        dedup.response.result["h"], expect_h,
        "same state after restore"
    );
    assert_eq!(dedup.response.result["n"], 30000);
    let main_ms = dedup.main_ms.unwrap_or(0.0);
    let restore = p.ctl.sandboxes()[1]
        .last_restore
        .expect("restore breakdown");
    eprintln!(
        "dedup start as a client sees it: {:.1} ms end to end, {:.1} ms without main ({:.1} ms); agent: {restore:?}",
        took.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1000.0 - main_ms,
        main_ms
    );
    assert_eq!(state_of(&base_id), Some("base"));
    assert_eq!(state_of(&dedup_id), Some("warm"));
    assert_eq!(p.ctl.dedup_stats().dedup_starts, 1);

    // The restored sandbox is warm again; the base keeps serving too.
    let (w1, w2) = tokio::join!(
        invoke(&p, &a, json!({"x": 1, "sleep": 0.2})),
        invoke(&p, &a, json!({"x": 1, "sleep": 0.2}))
    );
    for w in [&w1, &w2] {
        assert_eq!(w.start_kind, StartKind::Warm);
        assert_eq!(w.response.result["h"], expect_h);
    }
    assert_eq!(p.ctl.dedup_stats().dedup_start_failures.len(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_with_a_tcp_socket_is_marked_not_deduplicable() {
    let Some(p) = platform() else { return };
    let a = action("tcp", Code::Source(TCP.into()), 128, 10_000);
    let act = invoke(&p, &a, json!({})).await;
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(p.ctl.force_decisions(None).await, 1);
    p.ctl.wait_settled().await;
    let sbs = p.ctl.sandboxes();
    assert_eq!(states(&p), vec!["warm"], "{sbs:?}");
    assert!(!sbs[0].deduplicable);
    let failures = p.ctl.dedup_stats().dedup_failures;
    assert_eq!(failures.values().sum::<u64>(), 1, "{failures:?}");
    // It keeps serving warm, and is never tried again.
    assert_eq!(invoke(&p, &a, json!({})).await.start_kind, StartKind::Warm);
    assert_eq!(p.ctl.force_decisions(None).await, 0);
    p.stop().await;
}
mod restart;
mod template;
