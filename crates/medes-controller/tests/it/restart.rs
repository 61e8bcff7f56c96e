//! Dedup sandboxes survive a platform restart (issue 5): controller and agent stop, a new pair
//! on the same data directory adopts the kept dedup sandbox (a dedup start with the right
//! result), a store corrupted while stopped is dropped by the agent, and one corrupted while
//! running falls back to a cold start at the controller, counted with its reason.

use std::sync::Arc;

use medes_agent::{Agent, AgentConfig};
use medes_controller::{Controller, ControllerConfig};
use medes_core::{
    Action, ActionName, ActivationId, ActivationStatus, Code, Exec, InvokeRequest, Invoker, Limits,
    Namespace, StartKind,
};
use medes_policy::StateKind;
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::{Map, Value, json};

const CODE: &str = r#"
import hashlib, json, random, time
STATE = json.dumps([{"k": i, "v": str(i) * 5} for i in range(20000)]).encode()
def main(args):
    time.sleep(args.get("sleep_ms", 0) / 1000)
    return {"h": hashlib.sha256(STATE).hexdigest(), "r": random.random()}
"#;

fn action() -> Action {
    Action {
        name: ActionName {
            namespace: Namespace("guest".into()),
            name: "kept".into(),
        },
        version: "0.0.3".into(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source(CODE.into()),
            main: "main".into(),
        },
        parameters: Map::new(),
        annotations: vec![],
        limits: Limits {
            timeout_ms: 20_000,
            memory_mb: 256,
            concurrency: 1,
            logs_kb: 64,
        },
        publish: false,
        updated: 0,
    }
}

fn start(data: &std::path::Path) -> Option<(Arc<Controller>, Agent)> {
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("controller restart tests cannot run in CI: {e}");
        }
        eprintln!("skipping controller restart test: {e}");
        return None;
    }
    let _ = become_subreaper();
    let agent = Agent::new(AgentConfig {
        data_dir: data.to_path_buf(),
        sandbox,
        ..Default::default()
    })
    .expect("agent");
    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 2048,
            ..Default::default()
        },
        vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)],
    );
    Some((ctl, agent))
}

async fn invoke(ctl: &Arc<Controller>, a: &Arc<Action>, params: Value) -> medes_core::Activation {
    let req = InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        subject: "tester".into(),
        api_key: "uuid:key".into(),
        arrived: 0,
    };
    let act = ctl.invoke(req).await.expect("admitted");
    assert_eq!(
        act.response.status,
        ActivationStatus::Success,
        "{:?}",
        act.response
    );
    act
}

fn corrupt(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("store");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 32] {
        *b ^= 0xa5;
    }
    std::fs::write(path, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_sandboxes_survive_a_platform_restart() {
    let data = tempfile::tempdir().unwrap();
    let Some((ctl, agent)) = start(data.path()) else {
        return;
    };
    let a = Arc::new(action());
    // Four sandboxes at once, then the idle decision: a base and three dedup sandboxes.
    let runs: Vec<_> = (0..4)
        .map(|_| invoke(&ctl, &a, json!({"sleep_ms": 1500})))
        .collect();
    let first = futures::future::join_all(runs).await;
    assert!(first.iter().all(|x| x.start_kind == StartKind::Cold));
    let h = first[0].response.result["h"].clone();
    assert_eq!(ctl.force_decisions(None).await, 4);
    ctl.wait_settled().await;
    let dedups: Vec<_> = ctl
        .sandboxes()
        .into_iter()
        .filter(|s| s.state == StateKind::Dedup)
        .map(|s| s.id)
        .collect();
    assert_eq!(dedups.len(), 3, "{:?}", ctl.sandboxes());
    let base = ctl
        .sandboxes()
        .into_iter()
        .find(|s| s.state == StateKind::Base)
        .expect("a base")
        .id;
    let broken = agent.store_path(&dedups[0]).expect("a store");
    ctl.shutdown().await;
    agent.shutdown().await;
    // Corrupted while the platform is down: the new agent drops it.
    corrupt(&broken);

    let (ctl, agent) = start(data.path()).expect("restart");
    let c = agent.dedup_counters();
    assert_eq!((c.kept_loaded, c.kept_dropped), (3, 1), "{c:?}");
    let current = {
        let a = a.clone();
        move |n: &ActionName| (n == &a.name).then(|| (*a).clone())
    };
    let report = ctl.reconcile(&current).await;
    // The two dedup sandboxes, and the base (its process is gone, its pages stay: the agent
    // names its action and version, so it stays its function's base).
    assert_eq!((report.adopted, report.left), (3, 0), "{report:?}");
    assert!(report.purged.is_empty(), "{report:?}");
    let mut adopted: Vec<_> = ctl
        .sandboxes()
        .into_iter()
        .map(|s| (s.id, s.state))
        .collect();
    adopted.sort();
    let mut want: Vec<_> = dedups[1..]
        .iter()
        .map(|id| (id.clone(), StateKind::Dedup))
        .chain([(base, StateKind::Base)])
        .collect();
    want.sort();
    assert_eq!(adopted, want);

    // A kept sandbox serves a dedup start with the right state.
    let busy = {
        let (ctl, a) = (ctl.clone(), a.clone());
        tokio::spawn(async move { invoke(&ctl, &a, json!({"sleep_ms": 4000})).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    // The other one is corrupted while running: its dedup start fails and the request falls
    // back to a cold start.
    let other = ctl
        .sandboxes()
        .into_iter()
        .find(|s| s.state == StateKind::Dedup)
        .expect("one still dedup");
    corrupt(&agent.store_path(&other.id).expect("its store"));
    let act = invoke(&ctl, &a, json!({})).await;
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.response.result["h"], h);
    let act = busy.await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    assert_eq!(act.response.result["h"], h);
    let (m_r, measured) = ctl.restore_transient(&a.name).expect("m_R");
    assert!(measured && m_r.0 > 0);
    let stats = ctl.dedup_stats();
    assert_eq!(stats.dedup_starts, 1);
    assert_eq!(
        stats.dedup_start_failures.values().sum::<u64>(),
        1,
        "{stats:?}"
    );
    assert!(
        stats.dedup_start_failures.contains_key("checksum"),
        "{stats:?}"
    );
    ctl.shutdown().await;
    agent.shutdown().await;
    agent.purge_kept().await;
}

/// Issue 7: a node that joins a running controller (`add_node`, e.g. an agent still down when
/// the controller restarted) keeps the dedup sandboxes of stored, unchanged actions: its
/// reconcile looks them up as the startup reconcile does (`set_action_lookup`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joining_node_keeps_its_dedup_sandboxes_of_stored_actions() {
    let data = tempfile::tempdir().unwrap();
    let Some((ctl, agent)) = start(data.path()) else {
        return;
    };
    let a = Arc::new(action());
    let runs: Vec<_> = (0..3)
        .map(|_| invoke(&ctl, &a, json!({"sleep_ms": 1500})))
        .collect();
    futures::future::join_all(runs).await;
    assert_eq!(ctl.force_decisions(None).await, 3);
    ctl.wait_settled().await;
    let dedups: Vec<_> = ctl
        .sandboxes()
        .into_iter()
        .filter(|s| s.state == StateKind::Dedup)
        .map(|s| s.id)
        .collect();
    assert_eq!(dedups.len(), 2, "{:?}", ctl.sandboxes());
    ctl.shutdown().await;
    agent.shutdown().await;

    // A controller built without the node; the node joins later.
    let (_, agent) = start(data.path()).expect("restart");
    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 2048,
            ..Default::default()
        },
        vec![],
    );
    let stored = a.clone();
    ctl.set_action_lookup(Arc::new(move |n: &ActionName| {
        (n == &stored.name).then(|| (*stored).clone())
    }));
    let id = agent.node_id().clone();
    ctl.add_node(id.clone(), Arc::new(agent.clone()) as _)
        .expect("added");
    let report = ctl.reconcile_node(&id).await.expect("reconciled");
    assert_eq!((report.adopted, report.purged), (2, 0), "{report:?}");
    let adopted: Vec<_> = ctl
        .sandboxes()
        .into_iter()
        .filter(|s| s.state == StateKind::Dedup)
        .map(|s| s.id)
        .collect();
    assert_eq!(adopted, dedups);
    // One of them serves a dedup start.
    let act = invoke(&ctl, &a, json!({})).await;
    assert_eq!(act.start_kind, StartKind::Dedup);
    ctl.shutdown().await;
    agent.shutdown().await;
    agent.purge_kept().await;
}
