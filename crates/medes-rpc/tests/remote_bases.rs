//! Cluster-wide bases (issue 7, point 2) over real agents on 127.0.0.1 (real sandboxes, CRIU):
//! a dedup on node A matches a base held by node B, the dedup start on A reads B's pages over
//! the page service and serves the right result; with B gone, the dedup start fails fast and a
//! cold start on A serves the request. Skipped with a message when the host cannot run
//! sandboxes, unless `CI=true`, where that is a failure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use medes_agent::{
    Agent, AgentConfig, AgentError, Command, NodeAgent, Reply, RunCommand, RunOutcome, SpawnCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, NodeId, SandboxId};
use medes_rpc::{
    AgentLinkConfig, Registry, RegistryConfig, run_agent_link, serve_agent, serve_registry,
};
mod support;

use medes_sandbox::SandboxConfig;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CODE: &str = r#"
import json, hashlib
TABLE = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
def main(args):
    x = args.get("x", 0)
    return {"x": x, "h": TABLE[x % len(TABLE)][:12]}
"#;

fn action() -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: format!("remote{}", std::process::id()),
    }
}

fn sid(tag: &str) -> SandboxId {
    SandboxId(format!("rb{}-{tag}", std::process::id()))
}

fn spawn(sandbox: &SandboxId) -> Command {
    Command::Spawn(SpawnCommand {
        sandbox: sandbox.clone(),
        action: action(),
        version: "0.0.1".into(),
        code: Code::Source(CODE.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(256),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())]),
        init_timeout_ms: 20_000,
    })
}

fn run(sandbox: &SandboxId, x: u64) -> Command {
    Command::Run(RunCommand {
        sandbox: sandbox.clone(),
        params: json!({"x": x}).as_object().cloned().unwrap(),
        env: BTreeMap::new(),
        timeout_ms: 20_000,
    })
}

fn expected(x: u64) -> serde_json::Value {
    use std::fmt::Write;
    let mut h = String::new();
    // sha256(str(x)) in hex, first 12 digits, computed by a local Python for independence.
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import hashlib;print(hashlib.sha256(str({x}).encode()).hexdigest()[:12])"
        ))
        .output()
        .expect("python3");
    let _ = write!(h, "{}", String::from_utf8_lossy(&out.stdout).trim());
    json!({"x": x, "h": h})
}

struct Node {
    agent: Agent,
    stop: CancellationToken,
    _data: tempfile::TempDir,
}

async fn start_node(name: &str, registry: &str) -> Node {
    start_node_in(name, registry, tempfile::tempdir().expect("tempdir")).await
}

async fn start_node_in(name: &str, registry: &str, data: tempfile::TempDir) -> Node {
    let mut cfg = AgentConfig {
        node_id: NodeId(name.into()),
        data_dir: data.path().to_path_buf(),
        sandbox: SandboxConfig::default(),
        ..Default::default()
    };
    cfg.dedup.remote_read_timeout_ms = 1_500;
    let agent = Agent::new(cfg).expect("agent");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(serve_agent(
        agent.clone(),
        l,
        async move { s.cancelled().await },
    ));
    let mut link = AgentLinkConfig::new(registry.into(), NodeId(name.into()), addr);
    link.bases = Some(agent.clone());
    tokio::spawn(run_agent_link(link, stop.clone()));
    Node {
        agent,
        stop,
        _data: data,
    }
}

async fn ok(agent: &Agent, cmd: Command) -> Reply {
    let name = cmd.name();
    match agent.execute(cmd).await {
        Ok(r) => r,
        Err(e) => panic!("{name}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_on_a_uses_a_base_on_b_and_falls_back_when_b_dies() {
    if !support::can_run("remote bases test") {
        return;
    }
    let stop = CancellationToken::new();
    let registry = Registry::new(RegistryConfig {
        expected_nodes: 2,
        dead_after: Duration::from_secs(2),
        ..Default::default()
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = l.local_addr().unwrap().to_string();
    let s = stop.clone();
    tokio::spawn(serve_registry(registry.clone(), l, async move {
        s.cancelled().await
    }));
    tokio::spawn(registry.clone().watch_heartbeats(stop.clone()));
    let a = start_node("rb-a", &reg_addr).await;
    let b = start_node("rb-b", &reg_addr).await;
    tokio::time::timeout(Duration::from_secs(20), registry.wait_for_nodes())
        .await
        .expect("both agents register");

    // B: a base.
    let sb_b = sid("b");
    let Reply::Spawned(sp) = ok(&b.agent, spawn(&sb_b)).await else {
        panic!()
    };
    assert_eq!(sp.init_error, None);
    ok(&b.agent, run(&sb_b, 1)).await;
    let Reply::BaseReady(base) = ok(
        &b.agent,
        Command::MakeBase {
            sandbox: sb_b.clone(),
        },
    )
    .await
    else {
        panic!()
    };
    assert!(base.pages > 100, "{base:?}");

    // The catalog reaches A: B's base is imported into A's registry (fingerprints only).
    let t = Instant::now();
    let imported = loop {
        let v = a.agent.imported_bases();
        if let Some(i) = v.iter().find(|i| i.key.node.0 == "rb-b") {
            break i.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B's base never reached A"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(imported.active);
    assert_eq!(imported.pages, base.pages);
    assert!(
        b.agent.imported_bases().is_empty(),
        "B does not import its own base"
    );
    assert_eq!(registry.base_catalog().len(), 1);

    // A: a sandbox of the same function, deduplicated against B's base (A has none).
    let sb_a = sid("a");
    ok(&a.agent, spawn(&sb_a)).await;
    ok(&a.agent, run(&sb_a, 2)).await;
    let Reply::Deduped(d) = ok(
        &a.agent,
        Command::Dedup {
            sandbox: sb_a.clone(),
        },
    )
    .await
    else {
        panic!()
    };
    assert!(
        d.stored_bytes * 3 < d.image_bytes,
        "the store should be much smaller than the image when B's base matches: {d:?}"
    );
    let imp = a.agent.imported_bases();
    assert_eq!(
        imp[0].dependents, 1,
        "A's store depends on B's base: {imp:?}"
    );

    // A publishes that it uses B's base; the controller tells B, which holds the base for A:
    // it cannot retire while A's store exists.
    let t = Instant::now();
    while b.agent.held_for_other_nodes() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B never learnt of A's store"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(registry.used_elsewhere(&NodeId("rb-b".into())).len(), 1);
    let err = b
        .agent
        .execute(Command::Purge {
            sandbox: sb_b.clone(),
        })
        .await
        .expect_err("B's base is held for A");
    assert!(matches!(err, AgentError::BaseInUse { .. }), "{err:?}");

    // The dedup start on A reads B's pages remotely and restores the right process.
    let Reply::Restored(r) = ok(
        &a.agent,
        Command::Restore {
            sandbox: sb_a.clone(),
        },
    )
    .await
    else {
        panic!()
    };
    assert!(r.total_ms > 0.0);
    let Reply::Ran(ran) = ok(&a.agent, run(&sb_a, 7)).await else {
        panic!()
    };
    assert_eq!(ran.outcome, RunOutcome::Returned(expected(7)));

    // Deduplicated again (the store is kept); A restarts on the same data directory: the store
    // (which uses B's base) is kept, and restores once the catalog lists B's base again.
    ok(
        &a.agent,
        Command::Dedup {
            sandbox: sb_a.clone(),
        },
    )
    .await;
    a.stop.cancel();
    a.agent.shutdown().await;
    let a = start_node_in("rb-a", &reg_addr, a._data).await;
    let t = Instant::now();
    while !a
        .agent
        .imported_bases()
        .iter()
        .any(|i| i.active && i.dependents == 1)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            a.agent.imported_bases()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok(
        &a.agent,
        Command::Restore {
            sandbox: sb_a.clone(),
        },
    )
    .await;
    let Reply::Ran(ran) = ok(&a.agent, run(&sb_a, 8)).await else {
        panic!()
    };
    assert_eq!(ran.outcome, RunOutcome::Returned(expected(8)));

    // Deduplicated again, then B dies.
    ok(
        &a.agent,
        Command::Dedup {
            sandbox: sb_a.clone(),
        },
    )
    .await;
    b.stop.cancel();
    b.agent.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The dedup start fails fast (connection refused, or the base already inactive).
    let t = Instant::now();
    let err = a
        .agent
        .execute(Command::Restore {
            sandbox: sb_a.clone(),
        })
        .await
        .expect_err("B is gone");
    let took = t.elapsed();
    assert!(matches!(err, AgentError::RestoreFailed { .. }), "{err:?}");
    assert!(took < Duration::from_secs(5), "the failure took {took:?}");
    eprintln!("dedup start with the owner gone failed in {took:?}: {err}");

    // The fallback: a cold start on A serves the request.
    let sb_c = sid("c");
    let Reply::Spawned(sp) = ok(&a.agent, spawn(&sb_c)).await else {
        panic!()
    };
    assert_eq!(sp.init_error, None);
    let Reply::Ran(ran) = ok(&a.agent, run(&sb_c, 9)).await else {
        panic!()
    };
    assert_eq!(ran.outcome, RunOutcome::Returned(expected(9)));

    // B is marked dead: its base leaves the catalog, and A drops it (no store depends on it).
    let t = Instant::now();
    loop {
        if a.agent.imported_bases().is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "A kept B's base: {:?}",
            a.agent.imported_bases()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    stop.cancel();
    a.stop.cancel();
    a.agent.shutdown().await;
    a.agent.purge_kept().await;
    b.agent.purge_kept().await;
}
