//! Conversions (every variant round-trips) and the transport against a fake agent (no root).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use medes_agent as ag;
use medes_core::{ActionName, Bytes, Code, Namespace, NodeId, SandboxId};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::convert::*;
use crate::*;

fn action() -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: "pkg/act".into(),
    }
}

fn sbid(s: &str) -> SandboxId {
    SandboxId(s.into())
}

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("__OW_NAMESPACE".to_string(), "guest".to_string()),
        ("B".to_string(), "ü ✓".to_string()),
    ])
}

fn commands() -> Vec<ag::Command> {
    vec![
        ag::Command::Spawn(ag::SpawnCommand {
            sandbox: sbid("s1"),
            action: action(),
            version: "0.0.2".into(),
            code: Code::Source("def main(a): return a".into()),
            main: "main".into(),
            memory_limit: Bytes::mib(256),
            env: env(),
            init_timeout_ms: 60_000,
        }),
        ag::Command::Spawn(ag::SpawnCommand {
            sandbox: sbid("s2"),
            action: action(),
            version: "1".into(),
            code: Code::Zip(vec![0x50, 0x4b, 0, 255, 7]),
            main: "handler".into(),
            memory_limit: Bytes(1),
            env: BTreeMap::new(),
            init_timeout_ms: 0,
        }),
        ag::Command::Run(ag::RunCommand {
            sandbox: sbid("s1"),
            params: json!({"n": 3, "s": "x", "nested": {"l": [1, 2.5, null, true]}})
                .as_object()
                .cloned()
                .unwrap(),
            env: env(),
            timeout_ms: 1234,
        }),
        ag::Command::Purge {
            sandbox: sbid("s1"),
        },
        ag::Command::Status,
        ag::Command::MakeBase { sandbox: sbid("b") },
        ag::Command::Dedup { sandbox: sbid("d") },
        ag::Command::Restore { sandbox: sbid("r") },
        ag::Command::MakeTemplate { sandbox: sbid("t") },
        ag::Command::ReleaseBase { sandbox: sbid("r") },
        ag::Command::TemplateStart(ag::TemplateStartCommand {
            sandbox: sbid("ts"),
            action: action(),
            version: "3".into(),
            memory_limit: Bytes::mib(128),
            env: env(),
        }),
    ]
}

fn status() -> ag::NodeStatus {
    ag::NodeStatus {
        node: NodeId("node-7".into()),
        sandboxes: vec![
            ag::SandboxStatus {
                id: sbid("w"),
                alive: true,
                memory: Some(ag::SandboxMemory {
                    pss: Bytes(10),
                    rss: Bytes(20),
                    cgroup_usage: Bytes(30),
                }),
                form: ag::SandboxForm::Warm,
                held_bytes: 99,
                action: Some(action()),
                version: Some("1".into()),
                domain: Some("guest".into()),
                memory_limit: Some(Bytes::mib(256)),
                image_bytes: None,
            },
            ag::SandboxStatus {
                id: sbid("d"),
                alive: false,
                memory: None,
                form: ag::SandboxForm::Dedup,
                held_bytes: 5,
                action: Some(action()),
                version: None,
                domain: None,
                memory_limit: None,
                image_bytes: Some(4096),
            },
            ag::SandboxStatus {
                id: sbid("b"),
                alive: false,
                memory: None,
                form: ag::SandboxForm::Base,
                held_bytes: 0,
                action: None,
                version: None,
                domain: Some("*".into()),
                memory_limit: None,
                image_bytes: None,
            },
        ],
        restore_transient: BTreeMap::from([("/guest/a".to_string(), 123u64)]),
        templates: vec![ag::TemplateStatus {
            action: action(),
            version: "1".into(),
            state: "disabled".into(),
            held_bytes: 0,
            image_bytes: 0,
            reason: Some("corrupt".into()),
            domain: Some("guest".into()),
        }],
    }
}

fn replies() -> Vec<ag::Reply> {
    let logs = vec![
        (1u64, ag::Stream::Stdout, "out".to_string()),
        (2, ag::Stream::Stderr, "err\n".to_string()),
    ];
    let ran = |outcome| {
        ag::Reply::Ran(ag::RunReply {
            outcome,
            logs: logs.clone(),
            main_ms: Some(1.5),
        })
    };
    vec![
        ag::Reply::Spawned(ag::SpawnReply {
            init_error: None,
            start_ms: 12.5,
            init_ms: 3.25,
            logs: logs.clone(),
        }),
        ag::Reply::Spawned(ag::SpawnReply {
            init_error: Some("Initialization has failed".into()),
            start_ms: 0.0,
            init_ms: 0.0,
            logs: vec![],
        }),
        ran(ag::RunOutcome::Returned(
            json!({"a": [1, "b", {"c": null}]}),
        )),
        ran(ag::RunOutcome::Returned(json!("not a dict"))),
        ran(ag::RunOutcome::ActionError("boom".into())),
        ran(ag::RunOutcome::Timeout { limit_ms: 500 }),
        ran(ag::RunOutcome::OutOfMemory {
            limit: Bytes::mib(128),
        }),
        ran(ag::RunOutcome::Crashed("gone".into())),
        ag::Reply::Ran(ag::RunReply {
            outcome: ag::RunOutcome::Protocol("nonsense".into()),
            logs: vec![],
            main_ms: None,
        }),
        ag::Reply::Purged,
        ag::Reply::Status(status()),
        ag::Reply::BaseReady(ag::BaseReply {
            image_bytes: 1,
            pages: 2,
            checkpoint_ms: 3.0,
            register_ms: 4.5,
        }),
        ag::Reply::Deduped(ag::DedupReply {
            image_bytes: 1,
            stored_bytes: 2,
            checkpoint_ms: 3.0,
            dedup_ms: 4.0,
            pages: 5,
            reused_previous: true,
        }),
        ag::Reply::Restored(ag::RestoreReply {
            read_base_ms: 1.0,
            rebuild_ms: 2.0,
            restore_ms: 3.0,
            total_ms: 6.0,
            transient_bytes: 7,
            transient_images_bytes: 3,
            transient_criu_bytes: 4,
        }),
        ag::Reply::TemplateReady(ag::TemplateReply {
            image_bytes: 1,
            held_bytes: 2,
            checkpoint_ms: 3.0,
            checksum_ms: 0.5,
            existed: true,
        }),
        ag::Reply::TemplateStarted(ag::TemplateStartReply {
            verify_ms: 1.0,
            restore_ms: 2.0,
            total_ms: 3.0,
        }),
    ]
}

fn errors() -> Vec<ag::AgentError> {
    use ag::AgentError as A;
    vec![
        A::UnknownSandbox(sbid("x")),
        A::BadSandboxId(sbid("../x")),
        A::Code {
            action: action(),
            reason: "disk full".into(),
        },
        A::Start {
            sandbox: sbid("x"),
            reason: "r".into(),
        },
        A::NotDeduplicable {
            sandbox: sbid("x"),
            reason: "tcp".into(),
            sandbox_alive: true,
            kind: medes_agent::CheckpointFailure::TcpSocket,
        },
        A::RestoreFailed {
            sandbox: sbid("x"),
            reason: "r".into(),
            kind: medes_agent::RestoreFailure::RemoteBase,
        },
        A::BaseInUse {
            sandbox: sbid("x"),
            dependents: 3,
        },
        A::WrongForm {
            sandbox: sbid("x"),
            form: ag::SandboxForm::Dedup,
            reason: "r".into(),
        },
        A::TemplateUnavailable {
            action: action(),
            version: "1".into(),
            reason: "missing".into(),
        },
        A::TemplateStartFailed {
            sandbox: sbid("x"),
            reason: "r".into(),
            disabled: true,
        },
        A::ShuttingDown,
        A::Unavailable("lost".into()),
    ]
}

/// Through the wire: encode to bytes and decode again, as the network does.
fn wire<M: prost::Message + Default>(m: &M) -> M {
    M::decode(m.encode_to_vec().as_slice()).expect("decodes")
}

fn same<T: serde::Serialize>(a: &T, b: &T) {
    assert_eq!(
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap()
    );
}

#[test]
fn every_command_round_trips() {
    let cmds = commands();
    let mut names: Vec<_> = cmds.iter().map(|c| c.name()).collect();
    names.dedup();
    assert_eq!(names.len(), 10, "every Command variant is covered");
    for c in cmds {
        let back = command_from_pb(wire(&command_to_pb(&c))).expect("decodes");
        same(&c, &back);
    }
}

#[test]
fn every_reply_and_error_round_trips() {
    for r in replies() {
        let back = reply_from_pb(wire(&reply_to_pb(&r))).expect("decodes");
        same(&r, &back);
        let res = result_from_pb(wire(&result_to_pb(&Ok(r.clone())))).expect("decodes");
        same(&r, &res.expect("a reply"));
    }
    for e in errors() {
        assert_eq!(error_from_pb(wire(&error_to_pb(&e))).expect("decodes"), e);
        let res = result_from_pb(wire(&result_to_pb(&Err(e.clone())))).expect("decodes");
        assert_eq!(res.expect_err("an error"), e);
    }
    same(
        &status(),
        &status_from_pb(wire(&status_to_pb(&status()))).unwrap(),
    );
}

#[test]
fn bad_messages_are_decode_errors() {
    assert!(matches!(
        command_from_pb(pb::Command { command: None }),
        Err(DecodeError::Missing { .. })
    ));
    let mut spawn = command_to_pb(&commands()[0]);
    if let Some(pb::command::Command::Spawn(s)) = &mut spawn.command {
        s.code = None;
    }
    assert!(matches!(
        command_from_pb(spawn),
        Err(DecodeError::Missing { field: "code", .. })
    ));
    let mut run = command_to_pb(&commands()[2]);
    if let Some(pb::command::Command::Run(r)) = &mut run.command {
        r.params_json = "[1, 2]".into();
    }
    assert!(matches!(
        command_from_pb(run),
        Err(DecodeError::Json { .. })
    ));
    let mut st = status_to_pb(&status());
    st.sandboxes[0].form = 42;
    assert!(matches!(
        status_from_pb(st),
        Err(DecodeError::UnknownEnum { value: 42, .. })
    ));
    assert!(matches!(
        result_from_pb(pb::ExecuteResponse { result: None }),
        Err(DecodeError::Missing { .. })
    ));
}

/// An agent that answers status as `node` (no sandboxes), spawns at once, echoes runs after
/// `run_delay` (or the `delay_ms` parameter), and fails purges of `zz`.
struct Fake {
    node: NodeId,
    run_delay: Duration,
}

impl ag::NodeAgent for Fake {
    fn execute(&self, cmd: ag::Command) -> BoxFuture<'static, Result<ag::Reply, ag::AgentError>> {
        let node = self.node.clone();
        let delay = self.run_delay;
        Box::pin(async move {
            match cmd {
                ag::Command::Status => Ok(ag::Reply::Status(ag::NodeStatus {
                    node,
                    sandboxes: vec![],
                    restore_transient: BTreeMap::new(),
                    templates: vec![],
                })),
                ag::Command::Run(r) => {
                    let delay = r
                        .params
                        .get("delay_ms")
                        .and_then(|v| v.as_u64())
                        .map_or(delay, Duration::from_millis);
                    tokio::time::sleep(delay).await;
                    Ok(ag::Reply::Ran(ag::RunReply {
                        outcome: ag::RunOutcome::Returned(serde_json::Value::Object(r.params)),
                        logs: vec![],
                        main_ms: Some(0.1),
                    }))
                }
                ag::Command::Spawn(_) => Ok(ag::Reply::Spawned(ag::SpawnReply {
                    init_error: None,
                    start_ms: 1.0,
                    init_ms: 1.0,
                    logs: vec![],
                })),
                ag::Command::Purge { sandbox } if sandbox.0 == "zz" => {
                    Err(ag::AgentError::UnknownSandbox(sandbox))
                }
                ag::Command::Purge { .. } => Ok(ag::Reply::Purged),
                _ => Err(ag::AgentError::ShuttingDown),
            }
        })
    }
}

async fn serve_fake(node: &str, run_delay: Duration, stop: &CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let agent: Arc<dyn ag::NodeAgent> = Arc::new(Fake {
        node: NodeId(node.into()),
        run_delay,
    });
    let stop = stop.clone();
    tokio::spawn(serve_node(agent, l, async move { stop.cancelled().await }));
    addr
}

fn run_cmd(timeout_ms: u64, delay_ms: u64) -> ag::Command {
    ag::Command::Run(ag::RunCommand {
        sandbox: sbid("s"),
        params: json!({"k": "v", "delay_ms": delay_ms})
            .as_object()
            .cloned()
            .unwrap(),
        env: BTreeMap::new(),
        timeout_ms,
    })
}

#[tokio::test]
async fn remote_agent_replies_errors_and_deadlines() {
    let stop = CancellationToken::new();
    let addr = serve_fake("n1", Duration::ZERO, &stop).await;
    let d = Deadlines {
        run_slack: Duration::from_millis(200),
        ..Default::default()
    };
    let remote = RemoteAgent::connect_lazy(NodeId("n1".into()), addr, d).unwrap();
    // A reply and an agent error cross unchanged.
    let Ok(ag::Reply::Ran(r)) = remote.execute(run_cmd(5_000, 0)).await else {
        panic!("a run reply")
    };
    assert_eq!(
        r.outcome,
        ag::RunOutcome::Returned(json!({"k": "v", "delay_ms": 0}))
    );
    assert_eq!(
        remote
            .execute(ag::Command::Purge {
                sandbox: sbid("zz")
            })
            .await
            .unwrap_err(),
        ag::AgentError::UnknownSandbox(sbid("zz"))
    );
    // A run whose limit + slack (100 + 200 ms) passes long before the agent answers (10 s).
    let t = std::time::Instant::now();
    let err = remote.execute(run_cmd(100, 10_000)).await.unwrap_err();
    assert!(matches!(err, ag::AgentError::Unavailable(_)), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        remote.status(Duration::from_secs(2)).await.unwrap().node.0,
        "n1"
    );

    // Nobody listening: not delivered (the connection was refused: nothing was sent), quickly.
    stop.cancel();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let gone = RemoteAgent::connect_lazy(NodeId("n9".into()), dead, Deadlines::default()).unwrap();
    let err = gone.execute(ag::Command::Status).await.unwrap_err();
    assert!(matches!(err, ag::AgentError::NotDelivered(_)), "{err:?}");
}

async fn registry(expected: usize, stop: &CancellationToken) -> (Registry, String) {
    let reg = Registry::new(RegistryConfig {
        expected_nodes: expected,
        heartbeat_interval: Duration::from_millis(100),
        dead_after: Duration::from_millis(1_000),
        ..Default::default()
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let s = stop.clone();
    tokio::spawn(serve_registry(reg.clone(), l, async move {
        s.cancelled().await
    }));
    tokio::spawn(reg.clone().watch_heartbeats(stop.clone()));
    (reg, addr)
}

/// The first node once `ok` holds for it (within 10 s).
async fn eventually(reg: &Registry, ok: impl Fn(&NodeInfo) -> bool) -> NodeInfo {
    let t = std::time::Instant::now();
    loop {
        let n = reg.nodes()[0].clone();
        if ok(&n) {
            return n;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn link(ctl: &str, node: &str, addr: SocketAddr) -> AgentLinkConfig {
    let mut c = AgentLinkConfig::new(ctl.into(), NodeId(node.into()), addr);
    c.heartbeat_interval = Duration::from_millis(100);
    c
}

#[tokio::test]
async fn registry_admits_refuses_and_watches_heartbeats() {
    let stop = CancellationToken::new();
    let (reg, ctl) = registry(1, &stop).await;
    let events = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = events.clone();
    reg.on_node_events(move |id, ev| seen.lock().push((id.0.clone(), ev)));
    let a = serve_fake("a", Duration::ZERO, &stop).await;
    let b = serve_fake("b", Duration::ZERO, &stop).await;

    // An agent that claims another node's id is refused (the registry calls it back).
    let err = run_agent_link(link(&ctl, "b", a), stop.child_token())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LinkError::Refused { ref reason, .. } if reason.contains("answers as node a")),
        "{err}"
    );
    // A non-routable address is refused.
    let err = run_agent_link(
        link(&ctl, "a", "0.0.0.0:1".parse().unwrap()),
        stop.child_token(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LinkError::Refused { .. }), "{err}");

    let a_link = stop.child_token();
    let a_task = tokio::spawn(run_agent_link(link(&ctl, "a", a), a_link.clone()));
    let nodes = tokio::time::timeout(Duration::from_secs(10), reg.wait_for_nodes())
        .await
        .expect("node a registers");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].0.0, "a");
    // The controller reaches the node through what the registry returned.
    assert!(matches!(
        nodes[0].1.execute(ag::Command::Status).await,
        Ok(ag::Reply::Status(s)) if s.node.0 == "a"
    ));

    // Full: another id is refused with a reason.
    let err = run_agent_link(link(&ctl, "b", b), stop.child_token())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LinkError::Refused { ref reason, .. } if reason.contains("built with 1 nodes")),
        "{err}"
    );

    // Heartbeats (every 100 ms) keep it alive past `dead_after`; once they stop it is
    // reported dead.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(reg.nodes()[0].alive, "{:?}", reg.nodes());
    a_link.cancel();
    a_task.await.unwrap().unwrap();
    let info = eventually(&reg, |n| !n.alive).await;
    assert!(info.since_heard >= Duration::from_millis(1_000), "{info:?}");
    assert_eq!(*events.lock(), vec![("a".to_string(), NodeEvent::Dead)]);

    // The same id registering again (a restarted agent, from a new address) is accepted,
    // re-points the client and is alive again.
    let a2 = serve_fake("a", Duration::ZERO, &stop).await;
    let again = stop.child_token();
    let t = tokio::spawn(run_agent_link(link(&ctl, "a", a2), again.clone()));
    let info = eventually(&reg, |n| n.registrations == 2).await;
    assert!(info.alive && info.address == a2, "{info:?}");
    assert_eq!(
        *events.lock(),
        vec![
            ("a".to_string(), NodeEvent::Dead),
            ("a".to_string(), NodeEvent::Registered)
        ]
    );
    again.cancel();
    t.await.unwrap().unwrap();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registering_late_joins_the_controller() {
    use medes_controller::{Controller, ControllerConfig};
    use medes_core::{Action, ActivationId, Exec, InvokeRequest, Invoker, Limits};
    let stop = CancellationToken::new();
    let (reg, ctl_addr) = registry(1, &stop).await;
    let a = serve_fake("a", Duration::from_millis(1_000), &stop).await;
    let b = serve_fake("b", Duration::from_millis(1_000), &stop).await;
    tokio::spawn(run_agent_link(link(&ctl_addr, "a", a), stop.child_token()));
    let nodes = tokio::time::timeout(Duration::from_secs(10), reg.wait_for_nodes())
        .await
        .expect("node a registers");
    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 1024,
            ..Default::default()
        },
        nodes,
    );
    let c = ctl.clone();
    reg.admit_late_nodes(move |id, agent| c.add_node(id, agent).map_err(|e| e.to_string()));
    tokio::spawn(run_agent_link(link(&ctl_addr, "b", b), stop.child_token()));
    let t = std::time::Instant::now();
    while ctl.node_ids().len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "node b never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctl.node_ids(), vec![NodeId("a".into()), NodeId("b".into())]);
    assert!(
        ctl.add_node(
            NodeId("a".into()),
            Arc::new(Fake {
                node: NodeId("a".into()),
                run_delay: Duration::ZERO
            })
        )
        .is_err()
    );

    // Two invocations at once: two cold starts, the second on the node that joined late.
    let act = Arc::new(Action {
        name: action(),
        version: "1".into(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source("def main(a): return a".into()),
            main: "main".into(),
        },
        parameters: serde_json::Map::new(),
        annotations: vec![],
        limits: Limits {
            timeout_ms: 5_000,
            memory_mb: 128,
            concurrency: 1,
            logs_kb: 10,
        },
        publish: false,
        updated: 0,
    });
    let req = |x: u64| InvokeRequest {
        id: ActivationId::random(),
        action: act.clone(),
        params: json!({ "x": x }).as_object().cloned().unwrap(),
        subject: "t".into(),
        api_key: "u:k".into(),
        arrived: 0,
    };
    let (r1, r2) = tokio::join!(ctl.invoke(req(1)), ctl.invoke(req(2)));
    let mut seen = std::collections::BTreeSet::new();
    for (x, r) in [(1, r1), (2, r2)] {
        let r = r.expect("admitted");
        assert_eq!(r.response.result, json!({ "x": x }));
        seen.insert(r.node.expect("node").0);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    ctl.shutdown().await;
    stop.cancel();
}

/// The controller's wiring of `medes controller`: registry events drive the controller.
fn wire_controller(reg: &Registry, ctl: &Arc<medes_controller::Controller>) {
    let c = ctl.clone();
    reg.on_node_events(move |id, ev| match ev {
        NodeEvent::Dead => {
            let _ = c.set_node_alive(id, false);
        }
        NodeEvent::Alive => {
            let _ = c.set_node_alive(id, true);
        }
        NodeEvent::Registered => {
            if !matches!(c.set_node_alive(id, true), Ok(true)) {
                let (c, id) = (c.clone(), id.clone());
                tokio::spawn(async move { c.reconcile_node(&id).await });
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_misses_heartbeats_leaves_placement_until_it_returns() {
    use medes_controller::{Controller, ControllerConfig};
    let stop = CancellationToken::new();
    let (reg, ctl_addr) = registry(2, &stop).await;
    let a = serve_fake("a", Duration::ZERO, &stop).await;
    let b = serve_fake("b", Duration::ZERO, &stop).await;
    let a_link = stop.child_token();
    let a_task = tokio::spawn(run_agent_link(link(&ctl_addr, "a", a), a_link.clone()));
    tokio::spawn(run_agent_link(link(&ctl_addr, "b", b), stop.child_token()));
    let nodes = tokio::time::timeout(Duration::from_secs(10), reg.wait_for_nodes())
        .await
        .expect("nodes register");
    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 1024,
            ..Default::default()
        },
        nodes,
    );
    wire_controller(&reg, &ctl);
    let until = |want: Vec<bool>| {
        let ctl = ctl.clone();
        async move {
            let t = std::time::Instant::now();
            while ctl.nodes_alive() != want {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{:?}",
                    ctl.nodes_alive()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    a_link.cancel();
    a_task.await.unwrap().unwrap();
    let a_id = NodeId("a".into());
    let want: Vec<bool> = ctl.node_ids().iter().map(|n| n != &a_id).collect();
    until(want).await;
    // The agent of `a` registers again: alive, and placement may use it again.
    tokio::spawn(run_agent_link(link(&ctl_addr, "a", a), stop.child_token()));
    until(vec![true, true]).await;
    ctl.shutdown().await;
    stop.cancel();
}
