//! Template starts (issue 8): the controller's decisions against a fake node agent, on tokio's
//! paused clock (no root needed).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use medes_agent::{
    AgentError, Command, NodeAgent, NodeStatus, Reply, RunOutcome, RunReply, SpawnReply,
    TemplateReply, TemplateStartReply, TemplateStatus,
};
use medes_core::{
    Action, ActionName, ActivationId, Code, Exec, InvokeRequest, Invoker, Limits, Namespace,
    NodeId, SandboxId, StartKind,
};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};

use super::*;

/// How the fake answers template starts.
const OK: u8 = 0;
/// The template is corrupt (deleted by the node).
const CORRUPT: u8 = 1;
/// The restore fails; the node disables the template.
const FAILS_DISABLED: u8 = 2;
/// The restore takes 60 s (past the controller's bound), holding its id meanwhile.
const SLOW: u8 = 3;

/// Spawns take 500 ms, template starts 50 ms, make-template 100 ms; runs sleep `sleep` ms.
#[derive(Clone, Default)]
struct TFake(Arc<TInner>);

#[derive(Default)]
struct TInner {
    /// sandbox → (action, version)
    live: Mutex<HashMap<SandboxId, (ActionName, String)>>,
    /// action → version of its ready template
    templates: Mutex<HashMap<ActionName, String>>,
    mode: AtomicU8,
    log: Mutex<Vec<String>>,
    /// Ids of spawns, in order.
    spawned: Mutex<Vec<SandboxId>>,
    /// Template starts in progress (a purge waits for their end, like the agent's).
    restoring: Mutex<std::collections::HashSet<SandboxId>>,
}

impl TFake {
    fn count(&self, prefix: &str) -> usize {
        self.0
            .log
            .lock()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl NodeAgent for TFake {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let me = self.0.clone();
        Box::pin(async move {
            me.log.lock().push(cmd.name().to_string());
            match cmd {
                Command::Spawn(c) => {
                    me.spawned.lock().push(c.sandbox.clone());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let mut live = me.live.lock();
                    if live.contains_key(&c.sandbox) {
                        return Err(AgentError::BadSandboxId(c.sandbox));
                    }
                    live.insert(c.sandbox, (c.action, c.version));
                    Ok(Reply::Spawned(SpawnReply {
                        init_error: None,
                        start_ms: 400.0,
                        init_ms: 100.0,
                        logs: vec![],
                    }))
                }
                Command::Run(c) => {
                    if !me.live.lock().contains_key(&c.sandbox) {
                        return Err(AgentError::UnknownSandbox(c.sandbox));
                    }
                    let ms = c.params.get("sleep").and_then(Value::as_u64).unwrap_or(10);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Reply::Ran(RunReply {
                        outcome: RunOutcome::Returned(json!({"ok": true})),
                        logs: vec![],
                        main_ms: Some(ms as f64),
                    }))
                }
                Command::Purge { sandbox } if me.restoring.lock().contains(&sandbox) => {
                    me.log.lock().push("purge_pending".into());
                    Ok(Reply::Purged)
                }
                Command::Purge { sandbox } => match me.live.lock().remove(&sandbox) {
                    Some(_) => Ok(Reply::Purged),
                    None => Err(AgentError::UnknownSandbox(sandbox)),
                },
                Command::Status => Ok(Reply::Status(NodeStatus {
                    node: NodeId("n0".into()),
                    sandboxes: vec![],
                    restore_transient: Default::default(),
                    templates: me
                        .templates
                        .lock()
                        .iter()
                        .map(|(a, v)| TemplateStatus {
                            action: a.clone(),
                            version: v.clone(),
                            state: "ready".into(),
                            held_bytes: 30 << 20,
                            image_bytes: 29 << 20,
                            reason: None,
                            domain: Some(a.namespace.0.clone()),
                        })
                        .collect(),
                })),
                Command::MakeTemplate { sandbox } => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Some((a, v)) = me.live.lock().get(&sandbox).cloned() else {
                        return Err(AgentError::UnknownSandbox(sandbox));
                    };
                    me.templates.lock().insert(a, v);
                    Ok(Reply::TemplateReady(TemplateReply {
                        image_bytes: 29 << 20,
                        held_bytes: 30 << 20,
                        checkpoint_ms: 80.0,
                        checksum_ms: 5.0,
                        existed: false,
                    }))
                }
                Command::TemplateStart(c) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let present = me.templates.lock().get(&c.action) == Some(&c.version);
                    let unavailable = |reason: &str| AgentError::TemplateUnavailable {
                        action: c.action.clone(),
                        version: c.version.clone(),
                        reason: reason.into(),
                    };
                    if !present {
                        return Err(unavailable("no template of this version"));
                    }
                    match me.mode.load(Ordering::SeqCst) {
                        CORRUPT => {
                            me.templates.lock().remove(&c.action);
                            Err(unavailable(
                                "corrupt, deleted: checksum mismatch in pages-1.img",
                            ))
                        }
                        FAILS_DISABLED => Err(AgentError::TemplateStartFailed {
                            sandbox: c.sandbox,
                            reason: "criu restore failed".into(),
                            disabled: true,
                        }),
                        SLOW => {
                            // The id is taken while the restore runs (like the agent's Busy
                            // entry); a purge meanwhile frees it.
                            me.live
                                .lock()
                                .insert(c.sandbox.clone(), (c.action, c.version));
                            me.restoring.lock().insert(c.sandbox.clone());
                            // Like the agent: the restore goes on when the caller gives up.
                            let me2 = me.clone();
                            let id = c.sandbox.clone();
                            let _ = tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                me2.restoring.lock().remove(&id);
                                if me2.log.lock().iter().any(|l| l == "purge_pending") {
                                    me2.live.lock().remove(&id);
                                }
                            })
                            .await;
                            Err(AgentError::UnknownSandbox(c.sandbox))
                        }
                        _ => {
                            me.live.lock().insert(c.sandbox, (c.action, c.version));
                            Ok(Reply::TemplateStarted(TemplateStartReply {
                                verify_ms: 5.0,
                                restore_ms: 40.0,
                                total_ms: 45.0,
                            }))
                        }
                    }
                }
                other => Err(AgentError::Unavailable(format!(
                    "the fake does not do {}",
                    other.name()
                ))),
            }
        })
    }
}

fn action(name: &str, version: &str, annotations: Vec<(String, Value)>) -> Arc<Action> {
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
        annotations,
        limits: Limits {
            timeout_ms: 5_000,
            memory_mb: 128,
            concurrency: 1,
            logs_kb: 10,
        },
        publish: false,
        updated: 0,
    })
}

fn request(a: &Arc<Action>, sleep_ms: u64) -> InvokeRequest {
    InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: json!({"sleep": sleep_ms}).as_object().cloned().unwrap(),
        subject: "tester".into(),
        api_key: "u:k".into(),
        arrived: unix_now(),
    }
}

fn setup(template_starts: bool) -> (Arc<Controller>, TFake) {
    setup_with(ControllerConfig {
        node_memory_budget_mb: 4096,
        dedup_enabled: false,
        template_starts,
        ..Default::default()
    })
}

fn setup_with(cfg: ControllerConfig) -> (Arc<Controller>, TFake) {
    let fake = TFake::default();
    let ctl = Controller::new(
        cfg,
        vec![(NodeId("n0".into()), Arc::new(fake.clone()) as _)],
    );
    (ctl, fake)
}

/// Invokes `a` while its existing sandboxes are all busy (one long run holds each), so the
/// new request needs a new sandbox; returns its start kind.
async fn start_while_busy(ctl: &Arc<Controller>, a: &Arc<Action>) -> StartKind {
    let busy = ctl.invoke(request(a, 2_000));
    let busy = tokio::spawn(busy);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let kind = ctl.invoke(request(a, 10)).await.unwrap().start_kind;
    busy.await.unwrap().unwrap();
    kind
}

#[tokio::test(start_paused = true)]
async fn off_by_default_never_asks_for_templates() {
    let (ctl, fake) = setup(false);
    let a = action("f", "1", vec![]);
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Cold
    );
    assert_eq!(start_while_busy(&ctl, &a).await, StartKind::Cold);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.count("make_template") + fake.count("template_start"),
        0
    );
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn template_after_first_run_then_template_starts() {
    let (ctl, fake) = setup(true);
    let a = action("f", "1", vec![]);
    let first = ctl.invoke(request(&a, 10)).await.unwrap();
    assert_eq!(first.start_kind, StartKind::Cold);
    // Made in the background after the first run, once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.count("make_template"), 1);
    assert_eq!(ctl.template_stats().made, 1);
    // A free warm sandbox is still preferred.
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Warm
    );
    // With every sandbox busy: a template start, then a warm one of the template-born too.
    assert_eq!(start_while_busy(&ctl, &a).await, StartKind::Template);
    assert_eq!(ctl.template_stats().starts, 1);
    assert_eq!(fake.count("spawn"), 1);
    assert_eq!(
        fake.count("make_template"),
        1,
        "no template from a template start"
    );
    // The node's template is charged to its memory.
    ctl.refresh_memory().await;
    assert!(ctl.memory_used()[0].0 >= 30 << 20);
    // A new version: cold again, with a new template.
    let a2 = action("f", "2", vec![]);
    ctl.action_changed(&a2.name);
    assert_eq!(
        ctl.invoke(request(&a2, 10)).await.unwrap().start_kind,
        StartKind::Cold
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.count("make_template"), 2);
    assert_eq!(start_while_busy(&ctl, &a2).await, StartKind::Template);
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_template_falls_back_to_a_cold_start_and_is_rebuilt() {
    let (ctl, fake) = setup(true);
    let a = action("f", "1", vec![]);
    ctl.invoke(request(&a, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.0.mode.store(CORRUPT, Ordering::SeqCst);
    let act = {
        let busy = tokio::spawn(ctl.invoke(request(&a, 2_000)));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let act = ctl.invoke(request(&a, 10)).await.unwrap();
        busy.await.unwrap().unwrap();
        act
    };
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(act.response.status, ActivationStatus::Success);
    assert_eq!(
        ctl.template_stats().start_failures.get("checksum"),
        Some(&1)
    );
    // The fallback cold start rebuilt the template; the next start uses it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.count("make_template"), 2);
    fake.0.mode.store(OK, Ordering::SeqCst);
    // Two sandboxes now: hold both.
    let b1 = tokio::spawn(ctl.invoke(request(&a, 2_000)));
    let b2 = tokio::spawn(ctl.invoke(request(&a, 2_000)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Template
    );
    b1.await.unwrap().unwrap();
    b2.await.unwrap().unwrap();
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_disabled_template_is_not_used_or_rebuilt_for_the_version() {
    let (ctl, fake) = setup(true);
    let a = action("f", "1", vec![]);
    ctl.invoke(request(&a, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.0.mode.store(FAILS_DISABLED, Ordering::SeqCst);
    assert_eq!(start_while_busy(&ctl, &a).await, StartKind::Cold);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.count("template_start"), 1);
    assert_eq!(fake.count("make_template"), 1, "disabled: not rebuilt");
    // Both sandboxes busy: a third start is cold, without trying the template.
    let b1 = tokio::spawn(ctl.invoke(request(&a, 2_000)));
    let b2 = tokio::spawn(ctl.invoke(request(&a, 2_000)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Cold
    );
    b1.await.unwrap().unwrap();
    b2.await.unwrap().unwrap();
    assert_eq!(fake.count("template_start"), 1);
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_action_can_opt_out() {
    let (ctl, fake) = setup(true);
    let a = action(
        "f",
        "1",
        vec![(OPT_OUT_ANNOTATION.to_string(), Value::Bool(false))],
    );
    ctl.invoke(request(&a, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(start_while_busy(&ctl, &a).await, StartKind::Cold);
    assert_eq!(
        fake.count("make_template") + fake.count("template_start"),
        0
    );
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_template_start_falls_back_under_a_new_id() {
    let (ctl, fake) = setup(true);
    let a = action("f", "1", vec![]);
    ctl.invoke(request(&a, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.0.mode.store(SLOW, Ordering::SeqCst);
    let busy = tokio::spawn(ctl.invoke(request(&a, 2_000)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let act = ctl.invoke(request(&a, 10)).await.unwrap();
    busy.await.unwrap().unwrap();
    assert_eq!(act.start_kind, StartKind::Cold);
    assert_eq!(
        act.response.status,
        ActivationStatus::Success,
        "{:?}",
        act.response
    );
    assert_eq!(ctl.template_stats().start_failures.get("timeout"), Some(&1));
    let spawned = fake.0.spawned.lock().clone();
    assert_eq!(spawned.len(), 2, "{spawned:?}");
    assert!(spawned[1].0.ends_with("-c"), "a fresh id: {spawned:?}");
    // The timed-out restore is purged when it ends; the fallback sandbox is in the books.
    assert_eq!(fake.count("purge_pending"), 1);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let live = fake.0.live.lock().clone();
    assert!(live.contains_key(&spawned[1]));
    assert_eq!(live.len(), 2, "the timed-out restore was purged: {live:?}");
    assert!(ctl.sandboxes().iter().any(|s| s.id == spawned[1]));
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn without_warm_up_the_template_is_made_before_the_first_run() {
    let (ctl, fake) = setup_with(ControllerConfig {
        node_memory_budget_mb: 4096,
        dedup_enabled: false,
        template_starts: true,
        template_warmup: false,
        ..Default::default()
    });
    let a = action("f", "1", vec![]);
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Cold
    );
    let log = fake.0.log.lock().clone();
    assert_eq!(log, ["spawn", "make_template", "run"], "{log:?}");
    // The template is a base of its function on the node in the policy's views.
    assert!(
        ctl.state
            .lock()
            .template_bases
            .contains(&(0, a.name.clone()))
    );
    assert_eq!(start_while_busy(&ctl, &a).await, StartKind::Template);
    // The annotation wins over the configuration.
    let b = action(
        "g",
        "1",
        vec![(WARMUP_ANNOTATION.to_string(), Value::Bool(true))],
    );
    fake.0.log.lock().clear();
    ctl.invoke(request(&b, 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = fake.0.log.lock().clone();
    assert_eq!(log, ["spawn", "run", "make_template"], "{log:?}");
    ctl.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn templates_kept_by_a_node_are_learnt_at_reconcile() {
    let (ctl, fake) = setup(true);
    let a = action("f", "1", vec![]);
    let old = action("h", "1", vec![]);
    fake.0.templates.lock().insert(a.name.clone(), "1".into());
    fake.0.templates.lock().insert(old.name.clone(), "1".into());
    let (a2, old2) = (a.clone(), old.clone());
    let current = move |n: &ActionName| {
        if *n == a2.name {
            Some((*a2).clone())
        } else if *n == old2.name {
            // Updated since: the node's template is of an older version.
            let mut x = (*old2).clone();
            x.version = "2".into();
            Some(x)
        } else {
            None
        }
    };
    ctl.reconcile(&current).await;
    assert!(
        ctl.state
            .lock()
            .template_bases
            .contains(&(0, a.name.clone()))
    );
    assert!(
        !ctl.state
            .lock()
            .template_bases
            .contains(&(0, old.name.clone()))
    );
    // The very first start is a template start: no cold start needed.
    assert_eq!(
        ctl.invoke(request(&a, 10)).await.unwrap().start_kind,
        StartKind::Template
    );
    assert_eq!(fake.count("spawn"), 0);
    ctl.shutdown().await;
}
