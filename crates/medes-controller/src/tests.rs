//! Scheduling logic against a fake node agent, on tokio's paused clock (no root needed).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use std::sync::atomic::{AtomicBool, Ordering};

use medes_agent::{
    AgentError, BaseReply, Command, DedupReply, NodeAgent, NodeStatus, Reply, RestoreReply,
    RunOutcome, RunReply, SandboxForm, SandboxMemory, SandboxStatus, SpawnReply, Stream,
};
use medes_core::{
    Action, ActionName, ActivationId, ActivationStatus, Bytes, Code, Exec, InvokeError,
    InvokeRequest, Invoker, Limits, Namespace, NodeId, SandboxId, StartKind,
};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::*;
use medes_policy::{FunctionKnob, PolicyChoice, PolicyUpdate};

/// A node agent that pretends: spawns take `spawn_ms`, runs do what their parameters say,
/// make-base and dedup take `ckpt_ms`, restores `restore_ms`. Actions whose name starts with
/// `tcp` cannot be checkpointed; restores fail while `fail_restores` is set.
#[derive(Clone)]
struct Fake(Arc<FakeInner>);

struct FakeSb {
    action: ActionName,
    version: String,
    form: SandboxForm,
    /// A base whose process is gone (kept by an earlier agent for its dedup sandboxes).
    lost: bool,
    /// A base whose process the controller released (`Command::ReleaseBase`): its image only.
    released: bool,
}

struct FakeInner {
    spawn_ms: u64,
    ckpt_ms: u64,
    restore_ms: u64,
    pss: u64,
    stored: u64,
    /// m_R each restore reports.
    transient: u64,
    /// Time between taking a status snapshot and answering with it, ms.
    status_delay_ms: std::sync::atomic::AtomicU64,
    fail_restores: AtomicBool,
    /// Spawns and runs fail as if the agent refused the connection.
    refuse: AtomicBool,
    /// The status names a lost base's action and version (as the agent does; off: an older agent).
    lost_base_metadata: AtomicBool,
    live: Mutex<HashMap<SandboxId, FakeSb>>,
    log: Mutex<Vec<String>>,
}

impl Fake {
    fn new() -> Fake {
        Fake(Arc::new(FakeInner {
            spawn_ms: 100,
            ckpt_ms: 100,
            restore_ms: 200,
            pss: 20 << 20,
            stored: 2 << 20,
            transient: 30 << 20,
            status_delay_ms: Default::default(),
            fail_restores: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            lost_base_metadata: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
        }))
    }
    fn commands(&self, name: &str) -> usize {
        self.0
            .log
            .lock()
            .iter()
            .filter(|c| c.starts_with(name))
            .count()
    }
    fn log(&self) -> Vec<String> {
        self.0.log.lock().clone()
    }
}

impl FakeInner {
    fn form(&self, id: &SandboxId) -> Option<SandboxForm> {
        self.live.lock().get(id).map(|s| s.form)
    }
    fn set_form(&self, id: &SandboxId, form: SandboxForm) {
        if let Some(s) = self.live.lock().get_mut(id) {
            s.form = form;
        }
    }
}

impl NodeAgent for Fake {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let me = self.0.clone();
        Box::pin(async move {
            if me.refuse.load(Ordering::SeqCst)
                && matches!(cmd, Command::Spawn(_) | Command::Run(_))
            {
                me.log.lock().push(format!("refused {}", cmd.name()));
                return Err(AgentError::NotDelivered("connection refused".into()));
            }
            match cmd {
                Command::Spawn(c) => {
                    me.log
                        .lock()
                        .push(format!("spawn {} {}", c.sandbox, c.action.name));
                    tokio::time::sleep(Duration::from_millis(me.spawn_ms)).await;
                    if matches!(&c.code, Code::Source(s) if s.contains("syntax error")) {
                        return Ok(Reply::Spawned(SpawnReply {
                            init_error: Some(
                                "Initialization has failed due to: SyntaxError".into(),
                            ),
                            start_ms: 1.0,
                            init_ms: 1.0,
                            logs: vec![(0, Stream::Stderr, "Traceback".into())],
                        }));
                    }
                    me.live.lock().insert(
                        c.sandbox,
                        FakeSb {
                            action: c.action,
                            version: c.version,
                            form: SandboxForm::Warm,
                            lost: false,
                            released: false,
                        },
                    );
                    Ok(Reply::Spawned(SpawnReply {
                        init_error: None,
                        start_ms: 1.0,
                        init_ms: 1.0,
                        logs: vec![],
                    }))
                }
                Command::Run(c) => {
                    me.log.lock().push(format!("run {}", c.sandbox));
                    match me.form(&c.sandbox) {
                        None => return Err(AgentError::UnknownSandbox(c.sandbox)),
                        Some(SandboxForm::Dedup) => {
                            return Err(AgentError::WrongForm {
                                sandbox: c.sandbox,
                                form: SandboxForm::Dedup,
                                reason: "restore it first".into(),
                            });
                        }
                        Some(_) => {}
                    }
                    let sleep = c
                        .params
                        .get("sleep_ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(10);
                    tokio::time::sleep(Duration::from_millis(sleep)).await;
                    let outcome = match c.params.get("outcome").and_then(Value::as_str) {
                        Some("exception") => {
                            RunOutcome::ActionError("An error has occurred: boom".into())
                        }
                        Some("timeout") => RunOutcome::Timeout {
                            limit_ms: c.timeout_ms,
                        },
                        Some("oom") => RunOutcome::OutOfMemory {
                            limit: Bytes::mib(256),
                        },
                        Some("crash") => RunOutcome::Crashed("signal 9".into()),
                        _ => RunOutcome::Returned(json!({ "env_id": c.env["__OW_ACTIVATION_ID"] })),
                    };
                    if outcome.sandbox_lost() {
                        me.live.lock().remove(&c.sandbox);
                    }
                    Ok(Reply::Ran(RunReply {
                        outcome,
                        logs: vec![(0, Stream::Stdout, "hello".into())],
                        main_ms: Some(sleep as f64),
                    }))
                }
                Command::Purge { sandbox } => {
                    me.log.lock().push(format!("purge {sandbox}"));
                    let mut live = me.live.lock();
                    if let Some(sb) = live.get(&sandbox)
                        && sb.form == SandboxForm::Base
                    {
                        let ns = sb.action.namespace.clone();
                        let dependents = live
                            .values()
                            .filter(|s| s.form == SandboxForm::Dedup && s.action.namespace == ns)
                            .count() as u64;
                        if dependents > 0 {
                            return Err(AgentError::BaseInUse {
                                sandbox,
                                dependents,
                            });
                        }
                    }
                    match live.remove(&sandbox) {
                        Some(_) => Ok(Reply::Purged),
                        None => Err(AgentError::UnknownSandbox(sandbox)),
                    }
                }
                Command::MakeBase { sandbox } | Command::Dedup { sandbox }
                    if {
                        let live = me.live.lock();
                        live.get(&sandbox)
                            .is_some_and(|s| s.action.name.starts_with("tcp"))
                    } =>
                {
                    me.log.lock().push(format!("not-deduplicable {sandbox}"));
                    Err(AgentError::NotDeduplicable {
                        sandbox,
                        reason: "it holds TCP sockets".into(),
                        sandbox_alive: true,
                        kind: medes_agent::CheckpointFailure::TcpSocket,
                    })
                }
                Command::MakeBase { sandbox } => {
                    me.log.lock().push(format!("make_base {sandbox}"));
                    if me.form(&sandbox) != Some(SandboxForm::Warm) {
                        return Err(AgentError::UnknownSandbox(sandbox));
                    }
                    tokio::time::sleep(Duration::from_millis(me.ckpt_ms)).await;
                    me.set_form(&sandbox, SandboxForm::Base);
                    Ok(Reply::BaseReady(BaseReply {
                        image_bytes: me.pss,
                        pages: me.pss / 4096,
                        checkpoint_ms: 50.0,
                        register_ms: 50.0,
                    }))
                }
                Command::Dedup { sandbox } => {
                    me.log.lock().push(format!("dedup {sandbox}"));
                    if me.form(&sandbox) != Some(SandboxForm::Warm) {
                        return Err(AgentError::UnknownSandbox(sandbox));
                    }
                    tokio::time::sleep(Duration::from_millis(me.ckpt_ms)).await;
                    me.set_form(&sandbox, SandboxForm::Dedup);
                    Ok(Reply::Deduped(DedupReply {
                        image_bytes: me.pss,
                        stored_bytes: me.stored,
                        checkpoint_ms: 50.0,
                        dedup_ms: 50.0,
                        pages: me.pss / 4096,
                        reused_previous: false,
                    }))
                }
                Command::Restore { sandbox } => {
                    me.log.lock().push(format!("restore {sandbox}"));
                    if me.form(&sandbox) != Some(SandboxForm::Dedup) {
                        return Err(AgentError::UnknownSandbox(sandbox));
                    }
                    tokio::time::sleep(Duration::from_millis(me.restore_ms)).await;
                    if me.fail_restores.load(Ordering::SeqCst) {
                        me.live.lock().remove(&sandbox);
                        return Err(AgentError::RestoreFailed {
                            sandbox,
                            reason: "rebuilding the pages: base pages missing".into(),
                            kind: medes_agent::RestoreFailure::MissingBase,
                        });
                    }
                    me.set_form(&sandbox, SandboxForm::Warm);
                    Ok(Reply::Restored(RestoreReply {
                        read_base_ms: 10.0,
                        rebuild_ms: 20.0,
                        restore_ms: 150.0,
                        total_ms: 190.0,
                        transient_bytes: me.transient,
                        ..RestoreReply::default()
                    }))
                }
                Command::Status => {
                    let named = me.lost_base_metadata.load(Ordering::SeqCst);
                    let sandboxes = me
                        .live
                        .lock()
                        .iter()
                        .map(|(id, s)| {
                            let dedup = s.form == SandboxForm::Dedup;
                            let gone = s.lost || s.released;
                            SandboxStatus {
                                id: id.clone(),
                                alive: !dedup && !gone,
                                action: (!s.lost || named).then(|| s.action.clone()),
                                version: (!s.lost || named).then(|| s.version.clone()),
                                domain: Some(s.action.namespace.0.clone()),
                                memory_limit: Some(Bytes::mib(256)),
                                image_bytes: dedup.then_some(me.pss),
                                memory: (!dedup && !gone).then_some(SandboxMemory {
                                    pss: Bytes(me.pss),
                                    rss: Bytes(me.pss),
                                    cgroup_usage: Bytes(me.pss),
                                }),
                                form: s.form,
                                held_bytes: match s.form {
                                    SandboxForm::Warm => me.pss,
                                    // A released base holds its image only.
                                    SandboxForm::Base if s.released => me.pss + (1 << 20),
                                    SandboxForm::Base => 2 * me.pss,
                                    SandboxForm::Dedup => me.stored,
                                },
                            }
                        })
                        .collect();
                    let delay = me.status_delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    Ok(Reply::Status(NodeStatus {
                        node: NodeId("n0".into()),
                        sandboxes,
                        restore_transient: Default::default(),
                        templates: vec![],
                    }))
                }
                Command::MakeTemplate { .. } | Command::TemplateStart(_) => {
                    Err(AgentError::Unavailable("this fake has no templates".into()))
                }
                Command::ReleaseBase { sandbox } => {
                    me.log.lock().push(format!("release_base {sandbox}"));
                    match me.live.lock().get_mut(&sandbox) {
                        Some(s) if s.form == SandboxForm::Base => {
                            s.released = true;
                            Ok(Reply::Purged)
                        }
                        Some(s) => Err(AgentError::WrongForm {
                            sandbox,
                            form: s.form,
                            reason: "not a base".into(),
                        }),
                        None => Err(AgentError::UnknownSandbox(sandbox)),
                    }
                }
            }
        })
    }
}

fn action(name: &str, version: &str, memory_mb: u64, concurrency: u32) -> Arc<Action> {
    Arc::new(Action {
        name: ActionName {
            namespace: Namespace("guest".into()),
            name: name.into(),
        },
        version: version.into(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source("def main(args): return args".into()),
            main: "main".into(),
        },
        parameters: Map::new(),
        annotations: vec![],
        limits: Limits {
            timeout_ms: 1_000,
            memory_mb,
            concurrency,
            logs_kb: 10,
        },
        publish: false,
        updated: 0,
    })
}

fn request(a: &Arc<Action>, params: Value) -> InvokeRequest {
    InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        subject: "tester".into(),
        api_key: "u:k".into(),
        arrived: unix_now(),
    }
}

fn setup(budget_mb: u64) -> (Arc<Controller>, Fake) {
    setup_with(ControllerConfig {
        node_memory_budget_mb: budget_mb,
        memory_refresh_ms: 1_000,
        ..Default::default()
    })
}

fn setup_with(cfg: ControllerConfig) -> (Arc<Controller>, Fake) {
    let fake = Fake::new();
    let ctl = Controller::new(
        cfg,
        vec![(NodeId("n0".into()), Arc::new(fake.clone()) as _)],
    );
    (ctl, fake)
}

fn states(ctl: &Controller) -> String {
    ctl.sandboxes()
        .iter()
        .map(|s| s.state.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(start_paused = true)]
async fn cold_then_warm_start() {
    let (ctl, fake) = setup(1024);
    let a = action("hello", "0.0.1", 256, 1);
    let r = request(&a, json!({}));
    let id = r.id.clone();
    let first = ctl.invoke(r).await.unwrap();
    assert_eq!(first.start_kind, StartKind::Cold);
    assert!(
        first.init_time_ms.unwrap() >= 100,
        "{:?}",
        first.init_time_ms
    );
    assert_eq!(first.response.status, ActivationStatus::Success);
    assert_eq!(first.response.result, json!({"env_id": id.0}));
    assert_eq!(first.logs.len(), 1);
    assert!(
        first.logs[0].ends_with("Z stdout: hello"),
        "{:?}",
        first.logs
    );
    assert_eq!(first.node, Some(NodeId("n0".into())));
    assert_eq!(states(&ctl), "warm");

    let second = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(second.start_kind, StartKind::Warm);
    assert_eq!(second.init_time_ms, None);
    assert_eq!(fake.commands("spawn"), 1);
    assert_eq!(fake.commands("run"), 2);
    // Admission charged the limit; nothing measured yet.
    assert_eq!(ctl.memory_used(), vec![Bytes::mib(256)]);
    ctl.refresh_memory().await;
    assert_eq!(ctl.memory_used(), vec![Bytes(20 << 20)]);
}

#[tokio::test(start_paused = true)]
async fn busy_sandboxes_cause_cold_starts_and_concurrency_packs() {
    let (ctl, fake) = setup(4096);
    let a = action("slow", "1", 128, 1);
    let runs: Vec<_> = (0..3)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 500}))))
        .collect();
    let acts = futures::future::join_all(runs).await;
    assert!(
        acts.iter()
            .all(|r| r.as_ref().unwrap().start_kind == StartKind::Cold)
    );
    assert_eq!(fake.commands("spawn"), 3);
    assert_eq!(states(&ctl), "warm,warm,warm");

    // Concurrency 3: once one sandbox runs, two more invocations share it.
    let b = action("conc", "1", 128, 3);
    let first = ctl.invoke(request(&b, json!({"sleep_ms": 1000})));
    tokio::time::sleep(Duration::from_millis(300)).await; // cold start done, run in progress
    let more: Vec<_> = (0..2)
        .map(|_| ctl.invoke(request(&b, json!({"sleep_ms": 100}))))
        .collect();
    let more = futures::future::join_all(more).await;
    assert!(
        more.iter()
            .all(|r| r.as_ref().unwrap().start_kind == StartKind::Warm)
    );
    assert_eq!(first.await.unwrap().start_kind, StartKind::Cold);
    assert_eq!(fake.commands("spawn"), 4);
}

#[tokio::test(start_paused = true)]
async fn lru_idle_sandbox_is_evicted_for_a_cold_start() {
    let (ctl, fake) = setup(512);
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    let c = action("c", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctl.invoke(request(&b, json!({}))).await.unwrap();
    let a_id = ctl
        .sandboxes()
        .into_iter()
        .find(|s| s.action.name == "a")
        .unwrap()
        .id;
    let act = ctl.invoke(request(&c, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert!(
        fake.log().contains(&format!("purge {a_id}")),
        "{:?}",
        fake.log()
    );
    let names: Vec<String> = ctl.sandboxes().into_iter().map(|s| s.action.name).collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.contains(&"b".to_string()) && names.contains(&"c".to_string()),
        "{names:?}"
    );
    assert_eq!(ctl.evictions(), 1);
    assert!(ctl.memory_used()[0] <= Bytes::mib(512));
}

#[tokio::test(start_paused = true)]
async fn admission_waits_then_takes_a_freed_sandbox() {
    let (ctl, fake) = setup(512);
    let a = action("a", "1", 256, 1);
    let long: Vec<_> = (0..2)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 3000}))))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // No room and nothing idle: waits until one of the two finishes, then runs warm in it.
    let t0 = tokio::time::Instant::now();
    let waited = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(waited.start_kind, StartKind::Warm);
    assert!(
        t0.elapsed() >= Duration::from_millis(2_800),
        "{:?}",
        t0.elapsed()
    );
    for r in futures::future::join_all(long).await {
        assert_eq!(r.unwrap().start_kind, StartKind::Cold);
    }
    assert_eq!(fake.commands("spawn"), 2);
}

#[tokio::test(start_paused = true)]
async fn admission_gives_up_with_no_capacity() {
    let (ctl, _fake) = setup(512);
    let mut a = (*action("a", "1", 256, 1)).clone();
    a.limits.timeout_ms = 60_000;
    let a = Arc::new(a);
    let b = action("b", "1", 256, 1);
    let long: Vec<_> = (0..2)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 30_000}))))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = tokio::time::Instant::now();
    let err = ctl.invoke(request(&b, json!({}))).await.unwrap_err();
    assert!(matches!(err, InvokeError::NoCapacity(_)), "{err:?}");
    assert!(err.to_string().contains("within 10000 ms"), "{err}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
    // An action that can never fit is rejected at once.
    let huge = action("huge", "1", 1024, 1);
    assert!(matches!(
        ctl.invoke(request(&huge, json!({}))).await,
        Err(InvokeError::Rejected(_))
    ));
    drop(long);
}

#[tokio::test(start_paused = true)]
async fn waiting_cold_starts_are_fifo_and_evict_when_room_appears() {
    let (ctl, fake) = setup(512);
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    let long: Vec<_> = (0..2)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 2000}))))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // b waits; when a's runs end, their sandboxes go idle and the LRU one is evicted for b.
    let act = ctl.invoke(request(&b, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(fake.commands("purge"), 1);
    futures::future::join_all(long).await;
    assert!(ctl.memory_used()[0] <= Bytes::mib(512));
}

#[tokio::test(start_paused = true)]
async fn dedup_disabled_keeps_todays_keep_alive() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 1024,
        memory_refresh_ms: 1_000,
        dedup_enabled: false,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let timers = tokio::spawn(ctl.clone().run_timers(stop.clone()));
    let a = action("a", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(states(&ctl), "warm");
    // A warm start resets the idle clock.
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Warm
    );
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(states(&ctl), "warm");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(states(&ctl), "");
    assert_eq!(fake.commands("purge"), 1);
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Cold
    );
    assert_eq!(fake.commands("make_base") + fake.commands("dedup"), 0);
    assert_eq!(ctl.force_decisions(None).await, 0);
    assert_eq!(ctl.dedup_stats(), DedupStats::default());
    stop.cancel();
    timers.await.unwrap();
}

fn check_failure(outcome: &str, expect: &str, next_start: StartKind) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (ctl, _fake) = setup(1024);
        let a = action("f", "1", 256, 1);
        ctl.invoke(request(&a, json!({}))).await.unwrap();
        let act = ctl
            .invoke(request(&a, json!({"outcome": outcome})))
            .await
            .unwrap();
        let got = format!(
            "{} {} timeout={}",
            act.response.status.as_str(),
            act.response.result,
            act.timeout
        );
        assert_eq!(got, expect, "{outcome}");
        let next = ctl.invoke(request(&a, json!({}))).await.unwrap();
        assert_eq!(next.start_kind, next_start, "{outcome}");
        assert_eq!(next.response.status, ActivationStatus::Success);
        assert_eq!(ctl.sandboxes().len(), 1, "{outcome}");
    });
}

#[test]
fn failures_map_to_activations_and_broken_sandboxes_are_replaced() {
    check_failure(
        "exception",
        r#"action developer error {"error":"An error has occurred: boom"} timeout=false"#,
        StartKind::Warm,
    );
    check_failure(
        "timeout",
        r#"action developer error {"error":"The action exceeded its time limits of 1000 milliseconds."} timeout=true"#,
        StartKind::Cold,
    );
    check_failure(
        "oom",
        r#"action developer error {"error":"The action exhausted its memory and was aborted."} timeout=false"#,
        StartKind::Cold,
    );
    check_failure(
        "crash",
        r#"action developer error {"error":"The action did not produce a valid response and exited unexpectedly."} timeout=false"#,
        StartKind::Cold,
    );
}

#[tokio::test(start_paused = true)]
async fn init_failure_is_a_developer_error_and_frees_memory() {
    let (ctl, _fake) = setup(1024);
    let mut a = (*action("bad", "1", 256, 1)).clone();
    a.exec.code = Code::Source("syntax error here".into());
    let a = Arc::new(a);
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.response.status, ActivationStatus::DeveloperError);
    assert_eq!(
        act.response.result,
        json!({"error": "Initialization has failed due to: SyntaxError"})
    );
    assert!(act.logs[0].ends_with("stderr: Traceback"), "{:?}", act.logs);
    assert!(ctl.sandboxes().is_empty());
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
}

#[tokio::test(start_paused = true)]
async fn action_update_retires_old_sandboxes() {
    let (ctl, fake) = setup(1024);
    let v1 = action("u", "0.0.1", 256, 1);
    ctl.invoke(request(&v1, json!({}))).await.unwrap();
    // One busy old-version sandbox too.
    let busy = ctl.invoke(request(&v1, json!({"sleep_ms": 1000})));
    let busy = tokio::spawn(busy);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let idle_busy = ctl.invoke(request(&v1, json!({"sleep_ms": 1000})));
    let idle_busy = tokio::spawn(idle_busy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(states(&ctl), "running,running");
    ctl.action_changed(&v1.name);
    let v2 = action("u", "0.0.2", 256, 1);
    let act = ctl.invoke(request(&v2, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    busy.await.unwrap().unwrap();
    idle_busy.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Old sandboxes were purged after their runs; the new version's stays.
    let left = ctl.sandboxes();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].version, "0.0.2");
    assert_eq!(fake.commands("purge"), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_destroys_everything_and_refuses_work() {
    let (ctl, fake) = setup(1024);
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    ctl.invoke(request(&b, json!({}))).await.unwrap();
    ctl.shutdown().await;
    assert!(ctl.sandboxes().is_empty());
    assert_eq!(fake.commands("purge"), 2);
    assert!(matches!(
        ctl.invoke(request(&a, json!({}))).await,
        Err(InvokeError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn idle_sandboxes_that_vanish_from_their_node_are_forgotten() {
    let (ctl, fake) = setup(1024);
    let a = action("a", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let id = ctl.sandboxes()[0].id.clone();
    fake.0.live.lock().remove(&id);
    ctl.refresh_memory().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(ctl.sandboxes().is_empty());
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Cold
    );
}

#[tokio::test(start_paused = true)]
async fn invocations_are_counted_per_action_start_kind_and_status() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only test installing a recorder");
    let (ctl, _fake) = setup(1024);
    let a = action("metered", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    ctl.invoke(request(&a, json!({"outcome": "exception"})))
        .await
        .unwrap();
    // A second sandbox, a base and a dedup sandbox, and a dedup start while the base is busy.
    let two: Vec<_> = (0..2)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 100}))))
        .collect();
    futures::future::join_all(two).await;
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 1000})));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Dedup
    );
    busy.await.unwrap();
    ctl.refresh_memory().await;
    ctl.update_gauges();
    // Armed dedup sandboxes: the dedup sandboxes whose process memory the node reports (two
    // here, made from a live one's status; the fake keeps none armed).
    let Ok(Reply::Status(st)) = _fake.execute(Command::Status).await else {
        panic!("no status")
    };
    let mut armed = st.sandboxes[0].clone();
    armed.form = medes_agent::SandboxForm::Dedup;
    armed.memory = Some(SandboxMemory {
        pss: Bytes(1_000_000),
        rss: Bytes(1_000_000),
        cgroup_usage: Bytes(3_000_000),
    });
    let mut unarmed = armed.clone();
    unarmed.memory = None;
    ctl.metrics()
        .armed("armed-node", &[armed.clone(), unarmed, armed]);
    let mut got = Vec::new();
    // Node-wide series other tests may bump too (the recorder is global): only their presence.
    let mut global = std::collections::BTreeSet::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let nonzero = match &value {
            DebugValue::Counter(n) => *n > 0,
            DebugValue::Histogram(v) => !v.is_empty(),
            DebugValue::Gauge(g) => g.into_inner() > 0.0,
        };
        if nonzero
            && key.name().starts_with("medes_")
            && !key.name().starts_with("medes_invocation")
        {
            global.insert(format!("{}{{{}}}", key.name(), labels.join(",")));
        }
        if labels.iter().any(|l| l == "node=armed-node") {
            got.push(format!("{}{{{}}} {value:?}", key.name(), labels.join(",")));
        }
        if !labels.iter().any(|l| l == "action=/guest/metered") {
            continue;
        }
        let v = match value {
            DebugValue::Counter(0) => continue,
            DebugValue::Counter(n) => n.to_string(),
            DebugValue::Histogram(v) if v.is_empty() => continue,
            DebugValue::Histogram(v) => format!("{} samples", v.len()),
            DebugValue::Gauge(g) => g.to_string(),
        };
        got.push(format!("{}{{{}}} {v}", key.name(), labels.join(",")));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            "medes_armed_memory_bytes{node=armed-node} Gauge(6000000.0)",
            "medes_armed_sandboxes{node=armed-node} Gauge(2.0)",
            "medes_invocation_duration_seconds{action=/guest/metered,start_kind=cold} 2 samples",
            "medes_invocation_duration_seconds{action=/guest/metered,start_kind=dedup} 1 samples",
            "medes_invocation_duration_seconds{action=/guest/metered,start_kind=warm} 4 samples",
            "medes_invocations_total{action=/guest/metered,start_kind=cold,status=success} 2",
            "medes_invocations_total{action=/guest/metered,start_kind=dedup,status=success} 1",
            "medes_invocations_total{action=/guest/metered,start_kind=warm,status=developer_error} 1",
            "medes_invocations_total{action=/guest/metered,start_kind=warm,status=success} 3",
            // m_R the (fake) agent measured for the dedup start.
            "medes_restore_transient_bytes{action=/guest/metered} 31457280",
        ]
    );
    for series in [
        "medes_bases_total{}",
        "medes_dedups_total{}",
        "medes_dedup_start_seconds{}",
        "medes_dedup_restore_phase_seconds{phase=rebuild}",
        "medes_checkpoint_seconds{purpose=base}",
        "medes_checkpoint_seconds{purpose=dedup}",
        "medes_start_latency_seconds{start_kind=dedup}",
        "medes_sandboxes{state=base}",
        "medes_sandboxes{state=warm}",
        "medes_memory_bytes{state=base}",
        "medes_memory_bytes{state=warm}",
    ] {
        assert!(global.contains(series), "{series} missing from {global:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn cold_starts_go_to_the_node_with_most_room() {
    let (f0, f1) = (Fake::new(), Fake::new());
    let cfg = ControllerConfig {
        node_memory_budget_mb: 512,
        ..Default::default()
    };
    let ctl = Controller::new(
        cfg,
        vec![
            (NodeId("n0".into()), Arc::new(f0.clone()) as _),
            (NodeId("n1".into()), Arc::new(f1.clone()) as _),
        ],
    );
    let a = action("a", "1", 256, 1);
    let runs: Vec<_> = (0..4)
        .map(|_| ctl.invoke(request(&a, json!({"sleep_ms": 500}))))
        .collect();
    let acts = futures::future::join_all(runs).await;
    let mut nodes: Vec<String> = acts
        .into_iter()
        .map(|r| r.unwrap().node.unwrap().0)
        .collect();
    nodes.sort();
    assert_eq!(nodes, vec!["n0", "n0", "n1", "n1"]);
    assert_eq!((f0.commands("spawn"), f1.commands("spawn")), (2, 2));
    assert_eq!(ctl.memory_used(), vec![Bytes::mib(512), Bytes::mib(512)]);
}

/// Many invocations of several actions at pseudo-random times on a tight budget: the budget
/// and the concurrency limits hold at every instant, and every invocation ends (served or 503).
#[tokio::test(start_paused = true)]
async fn invariants_hold_under_a_random_load() {
    let (ctl, _fake) = setup(1024);
    let actions = [
        action("x", "1", 256, 1),
        action("y", "1", 384, 2),
        action("z", "1", 128, 1),
    ];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let stop = CancellationToken::new();
    let checker = {
        let (ctl, stop) = (ctl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.is_cancelled() {
                assert!(
                    ctl.memory_used()[0] <= Bytes::mib(1024),
                    "{:?}",
                    ctl.memory_used()
                );
                for s in ctl.sandboxes() {
                    let limit = if s.action.name == "y" { 2 } else { 1 };
                    assert!(s.in_flight <= limit, "{s:?}");
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            samples
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let a = &actions[(next() % 3) as usize];
        let sleep = next() % 400;
        tasks.push(tokio::spawn(
            ctl.invoke(request(a, json!({"sleep_ms": sleep}))),
        ));
        tokio::time::sleep(Duration::from_millis(next() % 20)).await;
    }
    let (mut ok, mut no_capacity) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(act) => {
                assert_eq!(act.response.status, ActivationStatus::Success);
                ok += 1;
            }
            Err(InvokeError::NoCapacity(_)) => no_capacity += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    stop.cancel();
    assert!(checker.await.unwrap() > 1000);
    assert_eq!(ok + no_capacity, 300);
    assert!(ok > 250, "{ok} served, {no_capacity} refused");
    assert!(ctl.evictions() > 0);
}

// ---- the dedup state ------------------------------------------------------------------------

/// `id:state` of every sandbox, in id (creation) order.
fn forms(ctl: &Controller) -> String {
    ctl.sandboxes()
        .iter()
        .map(|s| s.state.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts `n` sandboxes of `a` by invoking it `n` times at once.
async fn spawn_n(ctl: &Arc<Controller>, a: &Arc<Action>, n: usize) {
    let runs: Vec<_> = (0..n)
        .map(|_| ctl.invoke(request(a, json!({"sleep_ms": 100}))))
        .collect();
    for r in futures::future::join_all(runs).await {
        assert_eq!(r.unwrap().start_kind, StartKind::Cold);
    }
}

/// Two sandboxes of `a` cold-started at once, then idle past the 60 s idle period and every
/// decision applied (by default: one base, one dedup sandbox).
async fn two_then_idle_decision(ctl: &Arc<Controller>, a: &Arc<Action>) {
    spawn_n(ctl, a, 2).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
}

fn with_timers(ctl: &Arc<Controller>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let timers = tokio::spawn(ctl.clone().run_timers(stop.clone()));
    (stop, timers)
}

#[tokio::test(start_paused = true)]
async fn idle_period_makes_a_base_then_dedups() {
    let (ctl, fake) = setup(2048);
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 3).await;
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(forms(&ctl), "warm,warm,warm");
    // At the idle period the first sandbox to reach its decision becomes the base, the others
    // dedup sandboxes; the checkpoints run one at a time (the base first).
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup,dedup");
    let stats = ctl.dedup_stats();
    assert_eq!((stats.bases, stats.dedups), (1, 2));
    let log = fake.log();
    let first_ckpt = log
        .iter()
        .position(|l| l.starts_with("make_base") || l.starts_with("dedup"))
        .unwrap();
    assert!(log[first_ckpt].starts_with("make_base"), "{log:?}");
    let info = ctl.sandboxes();
    assert_eq!(info[0].form, Form::Base);
    assert_eq!(info[0].dependents, 2);
    assert_eq!(info[1].stored, Some(Bytes(2 << 20)));
    assert_eq!(info[1].image, Some(Bytes(20 << 20)));
    // Nothing more happens to them before the keep-alive / keep-dedup.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(forms(&ctl), "base,dedup,dedup");
    assert_eq!(fake.commands("make_base") + fake.commands("dedup"), 3);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dedup_start_restores_then_runs_and_the_sandbox_is_warm_again() {
    let (ctl, fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    assert_eq!(ctl.force_decisions(Some(&a.name)).await, 2);
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    // Warm (the base) is preferred; while it is busy, the dedup sandbox serves.
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = request(&a, json!({}));
    let id = r.id.clone();
    let second = ctl.invoke(r);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Restoring: the restored process (its limit: no sandbox of the function was measured
    // yet) and m_R (its image) are reserved.
    let info = ctl.sandboxes();
    assert_eq!(info[1].state, StateKind::Restoring);
    assert_eq!(
        info[1].charged,
        Bytes((2 << 20) + Bytes::mib(256).0 + (20 << 20))
    );
    let act = second.await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    assert_eq!(act.init_time_ms, None);
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(act.response.result, json!({"env_id": id.0}));
    assert_eq!(busy.await.unwrap().start_kind, StartKind::Warm);
    assert_eq!(forms(&ctl), "base,warm");
    let info = ctl.sandboxes();
    assert_eq!(info[1].last_restore.map(|r| r.total_ms), Some(190.0));
    assert_eq!(info[1].charged, Bytes((2 << 20) + Bytes::mib(256).0));
    assert_eq!(ctl.dedup_stats().dedup_starts, 1);
    let restored = info[1].id.clone();
    let log = fake.log();
    let at = log
        .iter()
        .position(|l| l == &format!("restore {restored}"))
        .unwrap();
    assert_eq!(log[at + 1], format!("run {restored}"), "{log:?}");
    // The restored sandbox is an ordinary warm sandbox now: a warm start.
    let third = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(third.start_kind, StartKind::Warm);
    assert_eq!(fake.commands("spawn"), 2);
}

#[tokio::test(start_paused = true)]
async fn with_bases_serve_off_an_idle_base_is_passed_over() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        bases_serve: false,
        ..Default::default()
    });
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    assert_eq!(ctl.force_decisions(Some(&a.name)).await, 2);
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    // The base is idle, yet the request restores the dedup sandbox.
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    assert_eq!(forms(&ctl), "base,warm");
    // A plain warm sandbox still serves; with it busy, a cold start rather than the base.
    let warm = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(warm.start_kind, StartKind::Warm);
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cold = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(cold.start_kind, StartKind::Cold);
    assert_eq!(busy.await.unwrap().start_kind, StartKind::Warm);
    assert_eq!(fake.commands("spawn"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_dedup_start_falls_back_to_a_cold_start() {
    let (ctl, fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    fake.0.fail_restores.store(true, Ordering::SeqCst);
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert!(act.init_time_ms.is_some());
    busy.await.unwrap();
    assert_eq!(fake.commands("restore"), 1);
    assert_eq!(fake.commands("spawn"), 3);
    let stats = ctl.dedup_stats();
    assert_eq!(stats.dedup_starts, 0);
    assert_eq!(
        stats.dedup_start_failures,
        [("missing_base".to_string(), 1)].into()
    );
    // The broken dedup sandbox is gone, its memory released; the base has no dependent left.
    assert_eq!(forms(&ctl), "base,warm");
    assert_eq!(ctl.sandboxes()[0].dependents, 0);
    ctl.refresh_memory().await;
    // Base: PSS + image; the cold-started sandbox: PSS.
    assert_eq!(ctl.memory_used(), vec![Bytes(60 << 20)]);
}

#[tokio::test(start_paused = true)]
async fn a_sandbox_that_cannot_be_checkpointed_is_marked_and_kept_warm() {
    let (ctl, fake) = setup(2048);
    let (stop, timers) = with_timers(&ctl);
    let a = action("tcp-client", "1", 256, 1);
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "warm");
    let info = ctl.sandboxes();
    assert!(!info[0].deduplicable);
    assert_eq!(
        ctl.dedup_stats().dedup_failures,
        [("tcp_socket".to_string(), 1)].into()
    );
    // Never tried again, even when forced; purged by the keep-alive.
    assert_eq!(ctl.force_decisions(None).await, 0);
    tokio::time::sleep(Duration::from_secs(500)).await;
    assert_eq!(fake.commands("not-deduplicable"), 1);
    assert_eq!(forms(&ctl), "warm");
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(forms(&ctl), "");
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dedup_sandboxes_go_after_keep_dedup_and_their_base_after_them() {
    let (ctl, fake) = setup(2048);
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    two_then_idle_decision(&ctl, &a).await;
    assert_eq!(forms(&ctl), "base,dedup");
    // Past the base's keep-alive: it stays, a dedup sandbox depends on it.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(fake.commands("purge"), 0);
    // Keep-dedup (15 min from the dedup): the dedup sandbox goes, then its base retires.
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(forms(&ctl), "");
    let purges: Vec<String> = fake
        .log()
        .into_iter()
        .filter(|l| l.starts_with("purge"))
        .collect();
    let ids: Vec<String> = ["-1", "-2"]
        .iter()
        .map(|s| purges.iter().find(|p| p.ends_with(s)).unwrap().clone())
        .collect();
    assert_eq!(purges, vec![ids[1].clone(), ids[0].clone()], "dedup first");
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn memory_is_charged_per_state() {
    let (ctl, _fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 3).await;
    ctl.refresh_memory().await;
    // Warm: PSS.
    assert_eq!(ctl.memory_used(), vec![Bytes(3 * (20 << 20))]);
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    // Base: PSS + its image; dedup: what is stored for it.
    let expect = (20 << 20) + (20 << 20) + 2 * (2 << 20);
    assert_eq!(ctl.memory_used(), vec![Bytes(expect)]);
    ctl.refresh_memory().await;
    assert_eq!(ctl.memory_used(), vec![Bytes(expect)]);
    let charged: Vec<u64> = ctl.sandboxes().iter().map(|s| s.charged.0 >> 20).collect();
    assert_eq!(charged, vec![40, 2, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_reserves_its_image_and_waits_for_room() {
    // 256 MiB limit; once measured 20 MiB each. Budget 100 MiB: the checkpoint image fits.
    let (ctl, _fake) = setup(300);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 1).await;
    ctl.refresh_memory().await;
    ctl.force_decisions(None).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let info = ctl.sandboxes();
    assert_eq!(info[0].state, StateKind::Checkpointing, "{info:?}");
    assert_eq!(
        info[0].charged,
        Bytes(40 << 20),
        "PSS + the image being written"
    );
    ctl.wait_settled().await;
    assert_eq!(ctl.memory_used(), vec![Bytes(40 << 20)]);
}

#[tokio::test(start_paused = true)]
async fn dedup_sandboxes_are_evicted_but_not_a_base_they_need() {
    let (ctl, fake) = setup(300);
    let a = action("a", "1", 128, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.refresh_memory().await;
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(ctl.memory_used(), vec![Bytes(42 << 20)]);
    // 42 + 260 > 300: the dedup sandbox (2 MiB) is the only candidate, and enough.
    let b = action("b", "1", 260, 1);
    let act = ctl.invoke(request(&b, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(ctl.evictions(), 1);
    assert_eq!(forms(&ctl), "base,warm");
    let dedup_id = ctl.sandboxes()[0].id.0.replace("-1", "-2");
    assert!(fake.log().contains(&format!("purge {dedup_id}")));
    assert!(ctl.memory_used()[0] <= Bytes::mib(300));
    // A request of `a` now finds its base warm.
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Warm
    );
}

#[tokio::test(start_paused = true)]
async fn a_base_is_not_evicted_while_dedup_sandboxes_depend_on_it() {
    let (ctl, _fake) = setup(300);
    let a = action("a", "1", 128, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.refresh_memory().await;
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    // 42 + 280 > 300 and evicting the dedup sandbox frees only 2 MiB: the base would have to
    // go too, and it cannot while the dedup sandbox is there: the invocation waits, then 503.
    let b = action("b", "1", 280, 1);
    let err = ctl.invoke(request(&b, json!({}))).await.unwrap_err();
    assert!(matches!(err, InvokeError::NoCapacity(_)), "{err:?}");
    assert_eq!(forms(&ctl), "base,dedup");
}

#[tokio::test(start_paused = true)]
async fn queued_checkpoints_never_block_invocations() {
    let (ctl, fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 3).await;
    // One checkpoint slot: the base is made first, the two dedups wait in the queue.
    ctl.force_decisions(None).await;
    let info = ctl.sandboxes();
    assert_eq!(info[0].state, StateKind::Checkpointing);
    assert_eq!(
        (info[1].state, info[2].state),
        (StateKind::Warm, StateKind::Warm)
    );
    // A request takes a queued (still warm) sandbox at once; its dedup is dropped.
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Warm);
    ctl.wait_settled().await;
    assert_eq!(fake.commands("dedup"), 1);
    let states: Vec<&str> = ctl.sandboxes().iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states.iter().filter(|s| **s == "dedup").count(), 1);
    assert_eq!(states.iter().filter(|s| **s == "warm").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn dedup_sandboxes_of_an_updated_action_go() {
    let (ctl, fake) = setup(2048);
    let (stop, timers) = with_timers(&ctl);
    let a = action("u", "1", 256, 1);
    spawn_n(&ctl, &a, 3).await;
    ctl.force_decisions(None).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup,dedup");
    ctl.action_changed(&a.name);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(forms(&ctl), "");
    assert_eq!(fake.commands("purge"), 3);
    let v2 = action("u", "2", 256, 1);
    assert_eq!(
        ctl.invoke(request(&v2, json!({})))
            .await
            .unwrap()
            .start_kind,
        StartKind::Cold
    );
    stop.cancel();
    timers.await.unwrap();
}

/// Purges idle sandboxes after 10 s and, every second, pre-warms one sandbox of any function
/// that was invoked and has none.
struct Prewarmer;

impl Policy for Prewarmer {
    fn name(&self) -> &'static str {
        "prewarmer"
    }
    fn on_idle(
        &mut self,
        _: &medes_policy::ClusterView,
        _: &medes_policy::FunctionView,
        s: &medes_policy::SandboxView,
        now: Timestamp,
    ) -> medes_policy::Decision {
        match s.state.last_used() {
            Some(t) if now.since(t) >= 10_000 => medes_policy::Decision::Purge,
            _ => medes_policy::Decision::KeepWarm,
        }
    }
    fn next_decision(
        &self,
        _: &medes_policy::FunctionView,
        s: &medes_policy::SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp> {
        s.state
            .last_used()
            .map(|t| t.plus_ms(10_000))
            .filter(|&t| t > now)
    }
    fn tick_ms(&self) -> Option<u64> {
        Some(1_000)
    }
    fn on_tick(
        &mut self,
        _: &medes_policy::ClusterView,
        functions: &[medes_policy::FunctionView],
        _: Timestamp,
    ) -> Vec<medes_policy::Prewarm> {
        functions
            .iter()
            .filter(|f| f.arrivals.total > 0 && f.counts.total() == 0)
            .map(|f| medes_policy::Prewarm {
                function: f.name.clone(),
                count: 1,
            })
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_timer_can_pre_warm_sandboxes() {
    let fake = Fake::new();
    let ctl = Controller::with_policy(
        ControllerConfig {
            node_memory_budget_mb: 1024,
            ..Default::default()
        },
        vec![(NodeId("n0".into()), Arc::new(fake.clone()) as _)],
        Box::new(Prewarmer),
    );
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    // Purged after 10 s, pre-warmed at the next tick.
    assert_eq!(fake.commands("purge"), 1);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(forms(&ctl), "warm");
    assert_eq!(fake.commands("spawn"), 2);
    assert_eq!(ctl.dedup_stats().prewarms, 1);
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Warm
    );
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pre_warms_start_only_where_they_fit_without_evicting() {
    let fake = Fake::new();
    let ctl = Controller::with_policy(
        ControllerConfig {
            node_memory_budget_mb: 512,
            // Charges stay at the limits (no measured footprints).
            memory_refresh_ms: 1_000_000,
            ..Default::default()
        },
        vec![(NodeId("n0".into()), Arc::new(fake.clone()) as _)],
        Box::new(Prewarmer),
    );
    let (stop, timers) = with_timers(&ctl);
    let (a, b, c) = (
        action("a", "1", 256, 1),
        action("b", "1", 256, 1),
        action("c", "1", 256, 1),
    );
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctl.invoke(request(&b, json!({}))).await.unwrap();
    // c's cold start evicts a (least recently used): the budget is full of idle b and c.
    ctl.invoke(request(&c, json!({}))).await.unwrap();
    assert_eq!(ctl.evictions(), 1);
    // The policy asks for a pre-warm of a every second: nothing is evicted for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!((fake.commands("spawn"), ctl.evictions()), (3, 1));
    assert_eq!(forms(&ctl), "warm,warm");
    // Once b and c expire (10 s idle), pre-warms fill what is free, still evicting nothing.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!((ctl.dedup_stats().prewarms, ctl.evictions()), (2, 1));
    assert_eq!(forms(&ctl), "warm,warm");
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_policy_knob_changes_decisions_at_run_time() {
    let (ctl, fake) = setup(2048);
    let (stop, timers) = with_timers(&ctl);
    assert_eq!(ctl.policy_settings().policy, PolicyChoice::DedupRule);
    assert_eq!(ctl.policy_settings().keep_alive_s, Some(600));
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    spawn_n(&ctl, &b, 1).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Switch to a fixed keep-alive of 30 s, with 5 s for `b`: the idle sandboxes are re-armed
    // under the new policy (none is deduplicated at the old 60 s idle period).
    let mut s = ctl.policy_settings();
    s.apply(&PolicyUpdate {
        policy: Some(PolicyChoice::KeepAlive),
        keep_alive_s: Some(30),
        ..PolicyUpdate::default()
    })
    .unwrap();
    s.set_function(
        "b",
        FunctionKnob {
            keep_alive_s: Some(5),
            ..FunctionKnob::default()
        },
    )
    .unwrap();
    let now = ctl.set_policy_settings(s).unwrap();
    assert_eq!(now.policy, PolicyChoice::KeepAlive);
    assert_eq!(now.idle_period_s, Some(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ctl.sandboxes()
            .iter()
            .filter(|s| s.action.name == "b")
            .count(),
        0,
        "b idle 11 s > its 5 s keep-alive"
    );
    assert_eq!(forms(&ctl), "warm,warm");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(forms(&ctl), "");
    assert_eq!(fake.commands("make_base") + fake.commands("dedup"), 0);
    // Bad settings are refused and change nothing.
    let mut bad = ctl.policy_settings();
    bad.alpha = 0.2;
    assert!(ctl.set_policy_settings(bad).is_err());
    assert_eq!(ctl.policy_settings(), now);
    // Back to the dedup rule with a 20 s idle period: a new idle sandbox becomes a base then.
    let mut s = ctl.policy_settings();
    s.apply(&PolicyUpdate {
        policy: Some(PolicyChoice::DedupRule),
        idle_period_s: Some(20),
        ..PolicyUpdate::default()
    })
    .unwrap();
    ctl.set_policy_settings(s).unwrap();
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(21)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base");
    stop.cancel();
    timers.await.unwrap();
}

// ---- restart reconciliation and m_R (issue 5) ---------------------------------------------

/// Puts a sandbox into the fake node as if an earlier agent had kept it.
fn kept(fake: &Fake, id: &str, a: &Action, version: &str, form: SandboxForm, lost: bool) {
    fake.0.live.lock().insert(
        SandboxId(id.into()),
        FakeSb {
            action: a.name.clone(),
            version: version.into(),
            form,
            lost,
            released: false,
        },
    );
}

#[tokio::test(start_paused = true)]
async fn kept_dedup_sandboxes_are_adopted_or_purged_at_startup() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        keep_dedup_s: 900,
        ..Default::default()
    });
    let a = action("a", "2", 256, 1);
    let gone = action("gone", "1", 256, 1);
    kept(&fake, "k-ok", &a, "2", SandboxForm::Dedup, false);
    kept(&fake, "k-stale", &a, "1", SandboxForm::Dedup, false);
    kept(&fake, "k-gone", &gone, "1", SandboxForm::Dedup, false);
    kept(&fake, "k-base", &a, "2", SandboxForm::Base, true);
    let current = {
        let a = a.clone();
        move |n: &ActionName| (n == &a.name).then(|| (*a).clone())
    };
    let report = ctl.reconcile(&current).await;
    assert_eq!(report.adopted, 1);
    assert_eq!(
        report.purged,
        [
            ("stale_version".to_string(), 1),
            ("unknown_action".to_string(), 1)
        ]
        .into()
    );
    assert_eq!(report.left, 1);
    assert_eq!(forms(&ctl), "dedup");
    let info = ctl.sandboxes();
    assert_eq!(info[0].id, SandboxId("k-ok".into()));
    assert_eq!(info[0].version, "2");
    assert_eq!(info[0].stored, Some(Bytes(2 << 20)));
    assert!(fake.log().contains(&"purge k-stale".to_string()));
    assert!(fake.log().contains(&"purge k-gone".to_string()));
    assert!(!fake.log().contains(&"purge k-base".to_string()));
    // The store and the kept base (held for it, not in the books) are charged.
    assert_eq!(ctl.unowned_memory(), vec![Bytes(40 << 20)]);
    assert_eq!(ctl.memory_used(), vec![Bytes((2 << 20) + (40 << 20))]);
    // The adopted sandbox serves a dedup start.
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(fake.commands("spawn"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_dedup_sandbox_gets_a_fresh_keep_dedup() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        keep_dedup_s: 120,
        ..Default::default()
    });
    let a = action("a", "1", 256, 1);
    kept(&fake, "k1", &a, "1", SandboxForm::Dedup, false);
    // Time passes before the platform starts: the keep-dedup runs from the adoption.
    tokio::time::sleep(Duration::from_secs(100)).await;
    let current = {
        let a = a.clone();
        move |n: &ActionName| (n == &a.name).then(|| (*a).clone())
    };
    assert_eq!(ctl.reconcile(&current).await.adopted, 1);
    let (stop, timers) = with_timers(&ctl);
    tokio::time::sleep(Duration::from_secs(110)).await;
    assert_eq!(forms(&ctl), "dedup");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(forms(&ctl), "");
    assert_eq!(fake.commands("purge k1"), 1);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restore_reserves_the_measured_transient() {
    let (ctl, _fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.force_decisions(Some(&a.name)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    // Before any dedup start, m_R is estimated by the page image.
    assert_eq!(
        ctl.restore_transient(&a.name),
        Some((Bytes(20 << 20), false))
    );
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        ctl.invoke(request(&a, json!({}))).await.unwrap().start_kind,
        StartKind::Dedup
    );
    busy.await.unwrap();
    // The agent measured 30 MiB: from now on that is what a restore reserves.
    assert_eq!(
        ctl.restore_transient(&a.name),
        Some((Bytes(30 << 20), true))
    );
    ctl.force_decisions(Some(&a.name)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = ctl.invoke(request(&a, json!({})));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let info = ctl.sandboxes();
    assert_eq!(info[1].state, StateKind::Restoring);
    assert_eq!(
        info[1].charged,
        Bytes((2 << 20) + Bytes::mib(256).0 + (30 << 20))
    );
    assert_eq!(second.await.unwrap().start_kind, StartKind::Dedup);
    busy.await.unwrap();
    // Released once the restore is done.
    assert_eq!(
        ctl.sandboxes()[1].charged,
        Bytes((2 << 20) + Bytes::mib(256).0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_restore_reserves_the_measured_warm_footprint_not_the_limit() {
    // Limit 256 MiB, measured 20 MiB.
    let (ctl, _fake) = setup(600);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.refresh_memory().await;
    assert_eq!(ctl.memory_used(), vec![Bytes(2 * (20 << 20))]);
    ctl.force_decisions(Some(&a.name)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = ctl.invoke(request(&a, json!({})));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Restoring: what is stored for it, the function's measured m_W (20 MiB) for the restored
    // process, and m_R (estimated by its page image, 20 MiB).
    let info = ctl.sandboxes();
    assert_eq!(info[1].state, StateKind::Restoring);
    assert_eq!(info[1].charged, Bytes((2 << 20) + (20 << 20) + (20 << 20)));
    assert_eq!(second.await.unwrap().start_kind, StartKind::Dedup);
    busy.await.unwrap();
    assert_eq!(ctl.evictions(), 0);
    // m_R released once restored; the process stays charged m_W until measured.
    assert_eq!(ctl.sandboxes()[1].charged, Bytes((2 << 20) + (20 << 20)));
    ctl.refresh_memory().await;
    assert_eq!(ctl.sandboxes()[1].charged, Bytes(20 << 20));
}

#[tokio::test(start_paused = true)]
async fn a_status_taken_during_a_re_dedup_does_not_purge_the_new_dedup_sandbox() {
    let (ctl, fake) = setup(2048);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 2).await;
    ctl.force_decisions(Some(&a.name)).await;
    ctl.wait_settled().await;
    // The dedup sandbox is restored (ready long before what follows) and idle again.
    let busy = ctl.invoke(request(&a, json!({"sleep_ms": 2000})));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    busy.await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Dedup it again; a status report is asked while the checkpoint runs (the node still shows
    // it warm) and answered after it ended.
    fake.0.status_delay_ms.store(300, Ordering::SeqCst);
    ctl.force_decisions(Some(&a.name)).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    ctl.refresh_memory().await;
    ctl.wait_settled().await;
    fake.0.status_delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(fake.commands("purge"), 0, "{:?}", fake.log());
}

// ---- dead nodes (issue 7 phase 2) ------------------------------------------------------

fn two_nodes() -> (Arc<Controller>, Fake, Fake) {
    let (f0, f1) = (Fake::new(), Fake::new());
    let ctl = Controller::new(
        ControllerConfig {
            node_memory_budget_mb: 1024,
            ..Default::default()
        },
        vec![
            (NodeId("n0".into()), Arc::new(f0.clone()) as _),
            (NodeId("n1".into()), Arc::new(f1.clone()) as _),
        ],
    );
    (ctl, f0, f1)
}

#[tokio::test(start_paused = true)]
async fn a_dead_node_gets_no_new_work() {
    let (ctl, f0, f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    let first = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(first.node.as_ref().map(|n| n.0.as_str()), Some("n0"));
    assert_eq!(ctl.memory_used()[0], Bytes::mib(256));
    // Its warm sandbox is forgotten and its memory released.
    assert_eq!(ctl.set_node_alive(&NodeId("n0".into()), false), Ok(true));
    assert_eq!(ctl.set_node_alive(&NodeId("n0".into()), false), Ok(false));
    assert_eq!(ctl.nodes_alive(), vec![false, true]);
    assert_eq!(ctl.memory_used()[0], Bytes(0));
    assert!(ctl.sandboxes().is_empty(), "{}", states(&ctl));
    let (spawns, runs) = (f0.commands("spawn"), f0.commands("run"));
    for _ in 0..3 {
        let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
        assert_eq!(act.response.status, ActivationStatus::Success);
        assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    }
    assert_eq!((f0.commands("spawn"), f0.commands("run")), (spawns, runs));
    assert_eq!(f1.commands("spawn"), 1, "the later ones were warm on n1");
    assert_eq!(
        ctl.set_node_alive(&NodeId("nx".into()), false),
        Err(SetNodeAliveError::UnknownNode(NodeId("nx".into())))
    );
}

#[tokio::test(start_paused = true)]
async fn work_in_flight_on_a_dead_node_fails_cleanly() {
    let (ctl, _f0, _f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    let killer = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            // The spawn takes 100 ms; the run (900 ms) is in flight at 300 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            ctl.set_node_alive(&NodeId("n0".into()), false)
        })
    };
    let t0 = tokio::time::Instant::now();
    let act = ctl
        .invoke(request(&a, json!({"sleep_ms": 900})))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(killer.await.unwrap(), Ok(true));
    assert_eq!(act.node.map(|n| n.0), Some("n0".to_string()));
    assert_eq!(act.response.status, ActivationStatus::InternalError);
    let text = act.response.result.to_string();
    assert!(text.contains("dead"), "{text}");
    assert!(took < Duration::from_millis(400), "ended after {took:?}");
    // Nothing is left charged on the dead node.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(ctl.memory_used()[0], Bytes(0));
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_on_a_node_that_dies_is_retried_once_elsewhere() {
    let (ctl, f0, f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    let killer = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            // The spawn on n0 (the first choice) takes 100 ms.
            tokio::time::sleep(Duration::from_millis(50)).await;
            ctl.set_node_alive(&NodeId("n0".into()), false)
        })
    };
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(killer.await.unwrap(), Ok(true));
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    assert_eq!((f0.commands("spawn"), f0.commands("run")), (1, 0));
    assert_eq!((f1.commands("spawn"), f1.commands("run")), (1, 1));
    assert_eq!(ctl.memory_used(), vec![Bytes(0), Bytes::mib(256)]);
    // Only once: with every node dead, the retry finds no node and the request is refused.
    ctl.set_node_alive(&NodeId("n0".into()), true).unwrap();
    let b = action("b", "1", 256, 1);
    let killer = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ctl.set_node_alive(&NodeId("n1".into()), false).unwrap();
            ctl.set_node_alive(&NodeId("n0".into()), false).unwrap();
        })
    };
    let r = ctl.invoke(request(&b, json!({}))).await;
    killer.await.unwrap();
    assert!(
        matches!(&r, Err(InvokeError::NoCapacity(m)) if m.contains("2 of 2 nodes are dead")),
        "{r:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_revived_node_is_reconciled_and_gets_work_again() {
    let (ctl, f0, _f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    let first = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(first.node.map(|n| n.0), Some("n0".to_string()));
    let n0 = NodeId("n0".into());
    ctl.set_node_alive(&n0, false).unwrap();
    assert!(ctl.sandboxes().is_empty());
    // The agent still holds the warm sandbox the books dropped, and one they never knew.
    assert_eq!(f0.0.live.lock().len(), 1);
    kept(&f0, "stray", &a, "1", SandboxForm::Warm, false);
    assert_eq!(ctl.set_node_alive(&n0, true), Ok(true));
    assert_eq!(ctl.nodes_alive(), vec![true, true]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The known one is re-adopted (idle, warm), the stray purged.
    assert_eq!(forms(&ctl), "warm", "{:?}", f0.log());
    assert_eq!(f0.0.live.lock().len(), 1);
    assert_eq!(f0.commands("purge"), 1);
    assert!(f0.log().contains(&"purge stray".to_string()));
    // A second reconcile finds nothing to do.
    let again = ctl.reconcile_node(&n0).await.unwrap();
    assert_eq!(again, NodeReconcileReport::default());
    // With n1 dead, the revived n0 takes the work, in its re-adopted sandbox.
    ctl.set_node_alive(&NodeId("n1".into()), false).unwrap();
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(act.node.map(|n| n.0), Some("n0".to_string()));
    assert_eq!(act.start_kind, StartKind::Warm);
    assert_eq!(f0.commands("spawn"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_revived_node_resumes_its_dedup_sandboxes_and_bases_unless_the_action_changed() {
    let (ctl, f0, _f1) = two_nodes();
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    // Two sandboxes of `a` on n0 (the second cold start goes to n0 again: it is the least
    // loaded once n1 holds b) become a base and a dedup sandbox; one of `b` too.
    let (r1, r2) = tokio::join!(
        ctl.invoke(request(&a, json!({"sleep_ms": 10}))),
        ctl.invoke(request(&b, json!({"sleep_ms": 10})))
    );
    assert_eq!(r1.unwrap().node.map(|n| n.0), Some("n0".to_string()));
    assert_eq!(r2.unwrap().node.map(|n| n.0), Some("n1".to_string()));
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    let n0 = NodeId("n0".into());
    let before = ctl.sandboxes();
    let on_n0: Vec<_> = before.iter().filter(|s| s.node == n0).collect();
    assert_eq!(on_n0.len(), 1, "{before:?}");
    let held_before = f0.0.live.lock().len();
    ctl.set_node_alive(&n0, false).unwrap();
    assert!(ctl.sandboxes().iter().all(|s| s.node != n0));
    ctl.set_node_alive(&n0, true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after: Vec<_> = ctl
        .sandboxes()
        .into_iter()
        .filter(|s| s.node == n0)
        .collect();
    assert_eq!(after.len(), held_before, "{:?}", f0.log());
    assert_eq!(after[0].id, on_n0[0].id);
    assert_eq!(after[0].form, on_n0[0].form);
    // An action changed while its node was dead: what the node kept of it is purged.
    let purges = f0.commands("purge");
    ctl.set_node_alive(&n0, false).unwrap();
    ctl.action_changed(&a.name);
    ctl.set_node_alive(&n0, true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(ctl.sandboxes().iter().all(|s| s.node != n0));
    assert_eq!(f0.commands("purge"), purges + held_before);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dead_node_keeps_its_dedup_sandbox_for_its_return() {
    let (ctl, f0) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        bases_serve: false,
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    two_then_idle_decision(&ctl, &a).await;
    assert_eq!(forms(&ctl), "base,dedup");
    let n0 = NodeId("n0".into());
    ctl.set_node_alive(&n0, false).unwrap();
    assert_eq!(forms(&ctl), "");
    assert_eq!(ctl.memory_used(), vec![Bytes(0)]);
    ctl.set_node_alive(&n0, true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(forms(&ctl), "base,dedup");
    // The resumed dedup sandbox serves a dedup start.
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup, "{:?}", f0.log());
    assert_eq!(f0.commands("spawn"), 2);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agents_lost_base_stays_its_functions_base_without_process() {
    let (ctl, f0) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    two_then_idle_decision(&ctl, &a).await;
    assert_eq!(forms(&ctl), "base,dedup");
    // The agent restarted (before it was found dead): the base's process is gone, its pages
    // and the dedup sandbox are kept.
    let mut base_id = None;
    for (id, s) in f0.0.live.lock().iter_mut() {
        if s.form == SandboxForm::Base {
            s.lost = true;
            base_id = Some(id.clone());
        }
    }
    let base_id = base_id.unwrap();
    let r = ctl.reconcile_node(&NodeId("n0".into())).await.unwrap();
    assert_eq!(
        r,
        NodeReconcileReport {
            kept_bases: 1,
            ..Default::default()
        }
    );
    // Still the function's base, charged as one (pages + registry share), nothing unowned.
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(ctl.unowned_memory(), vec![Bytes(0)]);
    let base = ctl
        .sandboxes()
        .into_iter()
        .find(|s| s.id == base_id)
        .unwrap();
    assert_eq!(base.charged, Bytes(40 << 20));
    assert_eq!(ctl.memory_used(), vec![Bytes((40 << 20) + (2 << 20))]);
    // It never serves (no process): the request takes the dedup start, which works.
    let base_runs = f0.commands(&format!("run {base_id}"));
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup, "{:?}", f0.log());
    assert_eq!(f0.commands(&format!("run {base_id}")), base_runs);
    // The base rule counts it: the restored sandbox, idle again, is deduplicated, no new base.
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(f0.commands("make_base"), 1);
    // Once nothing depends on it, it goes.
    ctl.action_changed(&a.name);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(forms(&ctl), "");
    assert!(
        f0.log().contains(&format!("purge {base_id}")),
        "{:?}",
        f0.log()
    );
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_base_of_a_changed_action_leaves_the_books() {
    let (ctl, f0) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        bases_serve: false,
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    two_then_idle_decision(&ctl, &a).await;
    for s in f0.0.live.lock().values_mut() {
        if s.form == SandboxForm::Base {
            s.lost = true;
        }
    }
    // Bump the generation without purging (as if updated while the node was away).
    ctl.state.lock().pools.get_mut(&a.name).unwrap().generation += 1;
    let r = ctl.reconcile_node(&NodeId("n0".into())).await.unwrap();
    assert_eq!((r.forgotten, r.kept_bases), (1, 0));
    assert_eq!(ctl.unowned_memory(), vec![Bytes(40 << 20)]);
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_revived_node_readopts_its_lost_base_as_a_base_without_process() {
    let (ctl, f0) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    two_then_idle_decision(&ctl, &a).await;
    assert_eq!(forms(&ctl), "base,dedup");
    let n0 = NodeId("n0".into());
    // Found dead (the books drop its idle sandboxes), its agent restarts meanwhile.
    ctl.set_node_alive(&n0, false).unwrap();
    assert_eq!(forms(&ctl), "");
    for s in f0.0.live.lock().values_mut() {
        if s.form == SandboxForm::Base {
            s.lost = true;
        }
    }
    ctl.set_node_alive(&n0, true).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(forms(&ctl), "base,dedup", "{:?}", f0.log());
    assert_eq!(ctl.unowned_memory(), vec![Bytes(0)]);
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup, "{:?}", f0.log());
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn at_startup_a_lost_base_is_adopted_only_if_the_node_names_its_action() {
    for named in [false, true] {
        let (ctl, fake) = setup_with(ControllerConfig {
            node_memory_budget_mb: 2048,
            ..Default::default()
        });
        fake.0.lost_base_metadata.store(named, Ordering::SeqCst);
        let a = action("a", "1", 256, 1);
        kept(&fake, "k-base", &a, "1", SandboxForm::Base, true);
        kept(&fake, "k-dedup", &a, "1", SandboxForm::Dedup, false);
        let current = {
            let a = a.clone();
            move |n: &ActionName| (n == &a.name).then(|| (*a).clone())
        };
        let report = ctl.reconcile(&current).await;
        if named {
            assert_eq!((report.adopted, report.left), (2, 0));
            assert_eq!(forms(&ctl), "base,dedup");
            assert_eq!(ctl.unowned_memory(), vec![Bytes(0)]);
        } else {
            // Today's agents: the function is unknown, the base left to the node.
            assert_eq!((report.adopted, report.left), (1, 1));
            assert_eq!(forms(&ctl), "dedup");
            assert_eq!(ctl.unowned_memory(), vec![Bytes(40 << 20)]);
        }
        let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
        assert_eq!(act.start_kind, StartKind::Dedup);
    }
}

#[tokio::test(start_paused = true)]
async fn live_sandboxes_kept_by_a_node_are_adopted_after_a_controller_restart() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        ..Default::default()
    });
    let a = action("a", "1", 256, 1);
    kept(&fake, "k-warm", &a, "1", SandboxForm::Warm, false);
    kept(&fake, "k-base", &a, "1", SandboxForm::Base, false);
    kept(&fake, "k-old", &a, "0", SandboxForm::Warm, false);
    let current = {
        let a = a.clone();
        move |n: &ActionName| (n == &a.name).then(|| (*a).clone())
    };
    let report = ctl.reconcile(&current).await;
    assert_eq!(report.adopted, 2);
    assert_eq!(report.purged, [("stale_version".to_string(), 1)].into());
    assert_eq!(forms(&ctl), "base,warm");
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Warm);
    assert_eq!(fake.commands("spawn"), 0);
}

#[tokio::test(start_paused = true)]
async fn nodes_report_their_own_budgets_and_cold_starts_go_where_most_is_free() {
    let (ctl, _f0, f1) = two_nodes();
    assert_eq!(ctl.node_budgets(), vec![Bytes::mib(1024); 2]);
    let n1 = NodeId("n1".into());
    assert_eq!(
        ctl.set_node_budget(&n1, Bytes::mib(4096)),
        Ok(Bytes::mib(4096))
    );
    assert_eq!(ctl.node_budget(), Bytes::mib(4096));
    // An action too large for n0's budget fits n1's.
    let big = action("big", "1", 2048, 1);
    let act = ctl.invoke(request(&big, json!({}))).await.unwrap();
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    // n1 still has the most free budget (2 GiB against 1 GiB): the next cold start goes there.
    let a = action("a", "1", 256, 1);
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    assert_eq!(f1.commands("spawn"), 2);
    // 0 restores the configured budget; unknown nodes are refused.
    assert_eq!(ctl.set_node_budget(&n1, Bytes(0)), Ok(Bytes::mib(1024)));
    assert!(ctl.set_node_budget(&NodeId("nx".into()), Bytes(1)).is_err());
}

#[tokio::test(start_paused = true)]
async fn reconciling_a_restarted_agent_forgets_what_it_lost() {
    let (ctl, f0, _f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(ctl.sandboxes().len(), 1);
    // The agent restarted: its sandbox is gone, and it holds one the books never knew.
    f0.0.live.lock().clear();
    f0.0.live.lock().insert(
        SandboxId("stray".into()),
        FakeSb {
            action: a.name.clone(),
            version: "1".into(),
            form: SandboxForm::Warm,
            lost: false,
            released: false,
        },
    );
    let r = ctl.reconcile_node(&NodeId("n0".into())).await.unwrap();
    assert_eq!(
        r,
        NodeReconcileReport {
            purged: 1,
            forgotten: 1,
            ..Default::default()
        }
    );
    assert!(ctl.sandboxes().is_empty());
    assert!(f0.0.live.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_run_its_node_refused_is_retried_once_elsewhere_and_the_node_is_shunned() {
    let (ctl, f0, f1) = two_nodes();
    let a = action("a", "1", 256, 1);
    let first = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(first.node.map(|n| n.0), Some("n0".to_string()));
    // n0's agent is gone (connection refused) but not yet found dead.
    f0.0.refuse.store(true, Ordering::SeqCst);
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.response.status, ActivationStatus::Success, "{act:?}");
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(f0.commands("refused run"), 1);
    assert_eq!(
        ctl.memory_used()[0],
        Bytes(0),
        "the unreachable sandbox left the books"
    );
    // Shunned: new work goes straight to n1, nothing is tried on n0.
    let b = action("b", "1", 256, 1);
    let act = ctl.invoke(request(&b, json!({}))).await.unwrap();
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    assert_eq!(f0.commands("refused"), 1);
    // Once the shun expires, a cold start refused there is retried once on n1.
    tokio::time::sleep(Duration::from_millis(SHUN_MS + 1)).await;
    let c = action("c", "1", 256, 1);
    let act = ctl.invoke(request(&c, json!({}))).await.unwrap();
    assert_eq!(act.response.status, ActivationStatus::Success, "{act:?}");
    assert_eq!(act.node.map(|n| n.0), Some("n1".to_string()));
    assert_eq!(f0.commands("refused spawn"), 1);
    assert_eq!(f1.commands("spawn"), 3);
}

// ---- Greedy-Dual eviction (medes-predict) ----------------------------------------------------

/// `a` served 5 times long ago, `b` once just now; a cold start of `c` needs one of them gone.
async fn fill_then_start_c(ctl: &Arc<Controller>) -> Vec<String> {
    let a = action("a", "1", 256, 1);
    let b = action("b", "1", 256, 1);
    let c = action("c", "1", 256, 1);
    for _ in 0..5 {
        ctl.invoke(request(&a, json!({}))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctl.invoke(request(&b, json!({}))).await.unwrap();
    let act = ctl.invoke(request(&c, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(ctl.evictions(), 1);
    let mut names: Vec<String> = ctl.sandboxes().into_iter().map(|s| s.action.name).collect();
    names.sort();
    names
}

fn greedy_dual_settings() -> PolicySettings {
    let mut s = PolicySettings::default();
    s.apply(&PolicyUpdate::medes_predict()).unwrap();
    s
}

#[tokio::test(start_paused = true)]
async fn greedy_dual_eviction_keeps_the_frequent_function_and_ages_by_the_node_clock() {
    // Control: least recently used goes (a).
    let (ctl, _) = setup(512);
    assert_eq!(fill_then_start_c(&ctl).await, ["b", "c"]);
    assert_eq!(ctl.state.lock().gd_clocks[0].value(), 0.0);

    // Greedy-Dual: b (1 use) is worth less than a (5 uses) at the same cold start and size.
    let (ctl, _) = setup_with(ControllerConfig {
        node_memory_budget_mb: 512,
        memory_refresh_ms: 1_000,
        policy: greedy_dual_settings(),
        ..Default::default()
    });
    assert_eq!(fill_then_start_c(&ctl).await, ["a", "c"]);
    let (cold, warm) = {
        let st = ctl.state.lock();
        let p = &st.pools[&action("b", "1", 256, 1).name];
        (p.cold_ms.get().unwrap(), p.warm_ms.get().unwrap_or(10.0))
    };
    // The clock rose to b's priority: 0 + 1 × (cold − warm) ÷ 256 MiB.
    let clock = ctl.state.lock().gd_clocks[0].value();
    assert!(
        (clock - (cold - warm).max(0.0) / 256.0).abs() < 1e-9,
        "{clock} vs cold {cold} warm {warm}"
    );
    assert!(clock > 0.0);
    // c served after the eviction: its L is the clock; a's is still 0 (served before).
    let st = ctl.state.lock();
    let l = |name: &str| {
        st.sbs
            .values()
            .find(|s| s.action.name == name)
            .map(|s| s.gd_at_use)
            .unwrap()
    };
    assert_eq!((l("a"), l("c")), (0.0, clock));
}

#[tokio::test(start_paused = true)]
async fn the_greedy_dual_clock_is_per_node_and_survives_a_policy_change() {
    let (ctl, _, _) = two_nodes();
    ctl.set_policy_settings(greedy_dual_settings()).unwrap();
    {
        let mut st = ctl.state.lock();
        assert_eq!(
            st.policy.eviction_order(),
            medes_policy::EvictionOrder::GreedyDual
        );
        st.gd_clocks[1].on_evicted(7.0);
    }
    ctl.set_policy_settings(PolicySettings::default()).unwrap();
    let st = ctl.state.lock();
    assert_eq!(
        st.policy.eviction_order(),
        medes_policy::EvictionOrder::Policy
    );
    assert_eq!(
        (st.gd_clocks[0].value(), st.gd_clocks[1].value()),
        (0.0, 7.0)
    );
}

#[tokio::test(start_paused = true)]
async fn with_bases_on_demand_a_lone_idle_sandbox_gets_no_base() {
    let medes = |on_demand: bool| {
        let mut s = PolicySettings::default();
        s.apply(&PolicyUpdate {
            policy: Some(PolicyChoice::Medes),
            bases_on_demand: Some(on_demand),
            ..PolicyUpdate::default()
        })
        .unwrap();
        s
    };
    // The default (the prototype's rule): the function's only idle sandbox becomes its base at
    // its first decision.
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        policy: medes(false),
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base");
    assert_eq!(fake.commands("make_base"), 1);
    stop.cancel();
    timers.await.unwrap();

    // On demand: nothing would be deduplicated, so no base; it stays warm through several
    // decisions (short of the keep-alive).
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        policy: medes(true),
        ..Default::default()
    });
    let (stop, timers) = with_timers(&ctl);
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(181)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "warm");
    assert_eq!(fake.commands("make_base") + fake.commands("dedup"), 0);
    assert!(ctl.policy_settings().bases_on_demand);
    // Switched off at run time: the next decision makes the base.
    let mut s = ctl.policy_settings();
    s.apply(&PolicyUpdate {
        bases_on_demand: Some(false),
        ..PolicyUpdate::default()
    })
    .unwrap();
    ctl.set_policy_settings(s).unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base");
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn with_release_base_process_a_base_is_its_image_only() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        memory_refresh_ms: 1_000,
        policy: PolicySettings {
            release_base_process: true,
            ..PolicySettings::default()
        },
        ..Default::default()
    });
    assert!(ctl.policy_settings().release_base_process);
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    // Made a base, then its process released: still the function's base, charged its image.
    assert_eq!(forms(&ctl), "base");
    let base_id = ctl.sandboxes()[0].id.clone();
    let log = fake.log();
    let made = log
        .iter()
        .position(|l| l == &format!("make_base {base_id}"))
        .unwrap();
    let released = log
        .iter()
        .position(|l| l == &format!("release_base {base_id}"))
        .unwrap();
    assert!(made < released, "{log:?}");
    assert_eq!(ctl.dedup_stats().released_bases, 1);
    // The node's status is the source: the image and the registry share it reports.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let image_only = (20 << 20) + (1 << 20);
    assert_eq!(ctl.sandboxes()[0].charged, Bytes(image_only));
    assert_eq!(ctl.memory_used(), vec![Bytes(image_only)]);
    // It never serves: a request takes a cold start.
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(fake.commands(&format!("run {base_id}")), 1);
    // The base rule counts it: the new sandbox, idle, is deduplicated against it (no new
    // base), and a dedup start restores from it.
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base,dedup");
    assert_eq!(fake.commands("make_base"), 1);
    assert_eq!(ctl.sandboxes()[0].dependents, 1);
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Dedup);
    assert_eq!(forms(&ctl), "base,warm");
    // Without dependents it stays the function's base (a lost base would be purged when
    // asked): a policy change asks every idle sandbox at once.
    let mut s = ctl.policy_settings();
    s.policy = PolicyChoice::Medes;
    ctl.set_policy_settings(s).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctl.wait_settled().await;
    assert_eq!(ctl.sandboxes()[0].id, base_id);
    assert_eq!(ctl.sandboxes()[0].form, Form::Base);
    assert!(!fake.log().contains(&format!("purge {base_id}")));
    assert_eq!(
        ctl.memory_used(),
        vec![Bytes(image_only + ctl.sandboxes()[1].charged.0)]
    );
    // Base retirement purges it once it has no dependents for keep-dedup.
    let mut s = ctl.policy_settings();
    s.retire_bases = true;
    s.keep_dedup_s = Some(120);
    ctl.set_policy_settings(s).unwrap();
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert!(
        fake.log().contains(&format!("purge {base_id}")),
        "{:?}",
        fake.log()
    );
    assert!(ctl.sandboxes().iter().all(|s| s.id != base_id));
    stop.cancel();
    timers.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_release_base_process_a_base_keeps_its_process() {
    let (ctl, fake) = setup(2048);
    assert!(!ctl.policy_settings().release_base_process);
    let (stop, timers) = with_timers(&ctl);
    let a = action("a", "1", 256, 1);
    spawn_n(&ctl, &a, 1).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    ctl.wait_settled().await;
    assert_eq!(forms(&ctl), "base");
    assert_eq!(fake.commands("release_base"), 0);
    assert_eq!(ctl.dedup_stats().released_bases, 0);
    // It serves (bases_serve is on by default).
    let act = ctl.invoke(request(&a, json!({}))).await.unwrap();
    assert_eq!(act.start_kind, StartKind::Warm);
    stop.cancel();
    timers.await.unwrap();
}
