//! A controller driving two real node agents over gRPC on 127.0.0.1 (real sandboxes: root,
//! namespaces, cgroups, the Python runtime). Skipped with a message when the host cannot run
//! sandboxes, unless `CI=true`, where that is a failure.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use medes_agent::{Agent, AgentConfig, Command, NodeAgent, Reply};
use medes_controller::{Controller, ControllerConfig};
use medes_core::{
    Action, ActionName, ActivationId, ActivationStatus, Code, Exec, InvokeRequest, Invoker, Limits,
    Namespace, NodeId, StartKind,
};
use medes_rpc::{
    AgentLinkConfig, Deadlines, Registry, RegistryConfig, RemoteAgent, run_agent_link, serve_node,
    serve_registry,
};
mod support;

use medes_sandbox::SandboxConfig;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CODE: &str = r#"
import os, time
def main(args):
    time.sleep(args.get("sleep", 0))
    return {"x": args.get("x"), "ns": os.environ.get("__OW_NAMESPACE")}
"#;

fn action() -> Arc<Action> {
    Arc::new(Action {
        name: ActionName {
            namespace: Namespace("guest".into()),
            name: format!("rpc{}", std::process::id()),
        },
        version: "0.0.1".into(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source(CODE.into()),
            main: "main".into(),
        },
        parameters: serde_json::Map::new(),
        annotations: vec![],
        limits: Limits {
            timeout_ms: 20_000,
            memory_mb: 128,
            concurrency: 1,
            logs_kb: 10,
        },
        publish: false,
        updated: 0,
    })
}

fn request(a: &Arc<Action>, x: u64) -> InvokeRequest {
    InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: json!({"x": x, "sleep": 1.5}).as_object().cloned().unwrap(),
        subject: "tester".into(),
        api_key: "u:k".into(),
        arrived: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    }
}

/// One node: a real agent served on an ephemeral port, registered with the controller.
struct TestNode {
    agent: Agent,
    _data: tempfile::TempDir,
}

async fn start_node(name: &str, registry: &str, stop: &CancellationToken) -> TestNode {
    let data = tempfile::tempdir().expect("tempdir");
    let agent = Agent::new(AgentConfig {
        node_id: NodeId(name.into()),
        data_dir: data.path().to_path_buf(),
        sandbox: SandboxConfig::default(),
        ..Default::default()
    })
    .expect("agent");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let local: Arc<dyn NodeAgent> = Arc::new(agent.clone());
    let s = stop.clone();
    tokio::spawn(serve_node(local, l, async move { s.cancelled().await }));
    let link = AgentLinkConfig::new(registry.into(), NodeId(name.into()), addr);
    tokio::spawn(run_agent_link(link, stop.clone()));
    TestNode { agent, _data: data }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_runs_actions_on_two_remote_agents() {
    if !support::can_run("cluster test") {
        return;
    }
    let stop = CancellationToken::new();
    let registry = Registry::new(RegistryConfig {
        expected_nodes: 2,
        ..Default::default()
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = l.local_addr().unwrap().to_string();
    let s = stop.clone();
    tokio::spawn(serve_registry(registry.clone(), l, async move {
        s.cancelled().await
    }));
    let a = start_node("rpc-a", &reg_addr, &stop).await;
    let b = start_node("rpc-b", &reg_addr, &stop).await;
    let nodes = tokio::time::timeout(Duration::from_secs(20), registry.wait_for_nodes())
        .await
        .expect("both agents register");
    let ids: BTreeSet<String> = nodes.iter().map(|(id, _)| id.0.clone()).collect();
    assert_eq!(ids, BTreeSet::from(["rpc-a".into(), "rpc-b".into()]));

    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 2048,
            ..Default::default()
        },
        nodes,
    );
    let act = action();
    // Two invocations at once: two cold starts, the second on the less loaded node.
    let (r1, r2) = tokio::join!(ctl.invoke(request(&act, 1)), ctl.invoke(request(&act, 2)));
    let mut seen = BTreeSet::new();
    for (x, r) in [(1, r1), (2, r2)] {
        let act = r.expect("admitted");
        assert_eq!(act.response.status, ActivationStatus::Success, "{act:?}");
        assert_eq!(act.response.result, json!({"x": x, "ns": "guest"}));
        assert_eq!(act.start_kind, StartKind::Cold);
        seen.insert(act.node.expect("node recorded").0);
    }
    assert_eq!(seen, BTreeSet::from(["rpc-a".into(), "rpc-b".into()]));
    // A third one is a warm start on either node.
    let r3 = ctl.invoke(request(&act, 3)).await.expect("admitted");
    assert_eq!(r3.response.result, json!({"x": 3, "ns": "guest"}));
    assert_eq!(r3.start_kind, StartKind::Warm);

    // Each node holds one live sandbox, as its own agent and the remote status agree.
    for (node, name) in [(&a, "rpc-a"), (&b, "rpc-b")] {
        assert_eq!(node.agent.n_sandboxes(), 1, "{name}");
        let info = registry
            .nodes()
            .into_iter()
            .find(|n| n.id.0 == name)
            .unwrap();
        assert!(info.alive);
        let remote =
            RemoteAgent::connect_lazy(NodeId(name.into()), info.address, Deadlines::default())
                .unwrap();
        let Ok(Reply::Status(st)) = remote.execute(Command::Status).await else {
            panic!("status of {name}")
        };
        assert_eq!(st.node.0, name);
        assert_eq!(st.sandboxes.len(), 1, "{st:?}");
        assert!(st.sandboxes[0].alive && st.sandboxes[0].memory.is_some());
    }

    // Shutdown destroys the sandboxes through the remote agents.
    ctl.shutdown().await;
    assert_eq!(a.agent.n_sandboxes(), 0);
    assert_eq!(b.agent.n_sandboxes(), 0);
    stop.cancel();
    a.agent.shutdown().await;
    b.agent.shutdown().await;
}
