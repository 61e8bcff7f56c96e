//! Template starts (issue 8), the controller's side: which action versions have a template on
//! which node, when to ask for one, and what a failure means.
//!
//! With [`ControllerConfig::template_starts`](crate::ControllerConfig::template_starts) on (and
//! the action not opted out with the annotation `medes-template-starts: false`), the first
//! sandbox of an action version cold-started on a node is, once its first invocation
//! succeeded (the warm-up run), checkpointed into the function's template in the background
//! ([`medes_agent::Command::MakeTemplate`]); the invocation that served never waits for it. A
//! later start that finds no free warm or dedup sandbox restores from the template
//! ([`medes_agent::Command::TemplateStart`], start kind `template`) instead of a cold start.
//! Any failure of a template start falls back to a real cold start that serves the request;
//! a missing or corrupt template is rebuilt after that cold start; a template the node
//! disabled (repeated restore failures) or that cannot be made (e.g. the sandbox holds TCP
//! sockets) is not asked for again for that action version.
//!
//! Known trade-off: a request assigned to the sandbox while its template is being dumped waits
//! for the dump (as for a make-base).
//!
//! Phase 2:
//! - **Warm-up switch**: [`ControllerConfig::template_warmup`](crate::ControllerConfig::template_warmup)
//!   (default true) or the annotation `medes-template-warmup: true|false` (which wins). Off,
//!   the template is taken right after the cold start's init, before its first invocation
//!   runs; that invocation waits for the checkpoint (a `--leave-running` dump: tens to a few
//!   hundred ms), and the template holds no state of a first run (caches, lazily imported
//!   modules).
//! - **The template is the function's first base**: a ready template counts as a base of its
//!   function on its node in the policy's views (`State::template_bases`), so the first idle
//!   sandbox is deduplicated (against the template, on the node) instead of being made a
//!   base.
//! - **A failed template start falls back to a cold start under a fresh sandbox id**
//!   (`<id>-c`): a timed-out restore may still hold the old id on the node, which is asked to
//!   purge it (the node destroys it when its restore ends).
//! - **Restarts**: templates the nodes kept (their status) are learnt again at
//!   [`Controller::reconcile`](crate::Controller::reconcile) (when the action's current
//!   version is theirs) and [`Controller::reconcile_node`](crate::Controller::reconcile_node).

use std::collections::{BTreeMap, HashMap};

use medes_agent::AgentError;
use medes_core::{Action, ActionName};
use parking_lot::Mutex;
use serde::Serialize;

/// The annotation that opts an action out of template starts (`false`).
pub const OPT_OUT_ANNOTATION: &str = "medes-template-starts";

/// The annotation that sets whether an action's template is taken after a warm-up
/// invocation (`true`) or right after init (`false`); overrides
/// [`ControllerConfig::template_warmup`](crate::ControllerConfig::template_warmup).
pub const WARMUP_ANNOTATION: &str = "medes-template-warmup";

/// An action's stored definition by name (restart reconciliation).
pub(crate) type CurrentAction<'a> = dyn Fn(&ActionName) -> Option<Action> + Sync + 'a;

/// The action's warm-up annotation, if it has one.
pub(crate) fn warmup_annotation(action: &Action) -> Option<bool> {
    action
        .annotations
        .iter()
        .find(|(k, _)| k == WARMUP_ANNOTATION)
        .and_then(|(_, v)| match v {
            serde_json::Value::Bool(b) => Some(*b),
            serde_json::Value::String(s) if s == "true" => Some(true),
            serde_json::Value::String(s) if s == "false" => Some(false),
            _ => None,
        })
}

/// Whether `action` allows template starts (no `medes-template-starts: false` annotation).
pub(crate) fn allowed(action: &Action) -> bool {
    !action
        .annotations
        .iter()
        .any(|(k, v)| k == OPT_OUT_ANNOTATION && (v == false || v == "false"))
}

/// What the controller knows of one action's template on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// Asked for, not answered yet.
    Building,
    /// Made; template starts use it.
    Ready,
    /// Never asked for again for this version (disabled by the node, or cannot be made).
    Disabled,
}

/// Counts of the template machinery since the controller started (also exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TemplateStats {
    /// Templates made (the agent's `MakeTemplate` succeeded).
    pub made: u64,
    /// Template makes that failed, by reason.
    pub make_failures: BTreeMap<String, u64>,
    /// Template starts that served their request.
    pub starts: u64,
    /// Template starts that failed and fell back to a cold start, by reason.
    pub start_failures: BTreeMap<String, u64>,
}

/// The controller's book of templates, keyed by node and action; one version each.
#[derive(Default)]
pub(crate) struct Book {
    map: Mutex<HashMap<(usize, ActionName), (String, Known)>>,
    pub(crate) stats: Mutex<TemplateStats>,
}

impl Book {
    /// After a cold start's first good run: whether to ask `node` for a template of
    /// `action`'s version now (if so it is marked as being built).
    pub(crate) fn want(&self, node: usize, action: &ActionName, version: &str) -> bool {
        let mut m = self.map.lock();
        match m.get(&(node, action.clone())) {
            Some((v, _)) if v == version => false,
            _ => {
                m.insert(
                    (node, action.clone()),
                    (version.to_string(), Known::Building),
                );
                true
            }
        }
    }

    /// Whether a template start of `action`'s version on `node` should be tried.
    pub(crate) fn ready(&self, node: usize, action: &ActionName, version: &str) -> bool {
        matches!(self.map.lock().get(&(node, action.clone())), Some((v, Known::Ready)) if v == version)
    }

    /// The answer to a make-template.
    pub(crate) fn made(
        &self,
        node: usize,
        action: &ActionName,
        version: &str,
        r: Result<(), &AgentError>,
    ) -> Option<&'static str> {
        let (known, label) = match r {
            Ok(()) => (Some(Known::Ready), None),
            Err(e) => {
                let label = make_failure_label(e);
                let known = match e {
                    AgentError::NotDeduplicable { .. } => Some(Known::Disabled),
                    AgentError::TemplateUnavailable { reason, .. }
                        if reason.contains("disabled") =>
                    {
                        Some(Known::Disabled)
                    }
                    _ => None, // asked again after the next cold start
                };
                (known, Some(label))
            }
        };
        self.set(node, action, version, known);
        let mut st = self.stats.lock();
        match label {
            None => st.made += 1,
            Some(l) => *st.make_failures.entry(l.to_string()).or_default() += 1,
        }
        label
    }

    /// A template start failed with `e`; returns its label.
    pub(crate) fn start_failed(
        &self,
        node: usize,
        action: &ActionName,
        version: &str,
        e: Option<&AgentError>,
    ) -> &'static str {
        let (label, known) = match e {
            Some(AgentError::TemplateUnavailable { reason, .. }) => {
                if reason.contains("disabled") {
                    ("disabled", Some(Known::Disabled))
                } else if reason.contains("checksum") || reason.contains("corrupt") {
                    ("checksum", None)
                } else {
                    ("missing", None)
                }
            }
            Some(AgentError::TemplateStartFailed { disabled: true, .. }) => {
                ("restore_failed", Some(Known::Disabled))
            }
            Some(AgentError::TemplateStartFailed { .. }) => ("restore_failed", Some(Known::Ready)),
            Some(
                AgentError::ShuttingDown | AgentError::Unavailable(_) | AgentError::NotDelivered(_),
            ) => ("agent_unavailable", Some(Known::Ready)),
            Some(AgentError::BadSandboxId(_)) => ("bad_sandbox_id", Some(Known::Ready)),
            Some(_) => ("agent_error", None),
            None => ("timeout", Some(Known::Ready)),
        };
        // `None`: forgotten, so the fallback cold start asks for a new template.
        self.set(node, action, version, known);
        *self
            .stats
            .lock()
            .start_failures
            .entry(label.to_string())
            .or_default() += 1;
        label
    }

    /// A template start served its request.
    pub(crate) fn started(&self) {
        self.stats.lock().starts += 1;
    }

    /// The action changed (new version or deleted): forget its templates (the nodes delete
    /// theirs when the new version is spawned).
    pub(crate) fn forget(&self, action: &ActionName) {
        self.map.lock().retain(|(_, a), _| a != action);
    }

    /// A node reports a ready template of `action` at `version` (after a restart): template
    /// starts use it, unless the book knows of another version there. Returns whether it was
    /// new to the book.
    pub(crate) fn learn(&self, node: usize, action: &ActionName, version: &str) -> bool {
        let mut m = self.map.lock();
        match m.get(&(node, action.clone())) {
            Some((v, _)) if v != version => false,
            Some((_, Known::Ready)) => false,
            _ => {
                m.insert((node, action.clone()), (version.to_string(), Known::Ready));
                true
            }
        }
    }

    /// (node, action) of every ready template.
    pub(crate) fn ready_set(&self) -> std::collections::HashSet<(usize, ActionName)> {
        self.map
            .lock()
            .iter()
            .filter(|(_, (_, k))| *k == Known::Ready)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn set(&self, node: usize, action: &ActionName, version: &str, known: Option<Known>) {
        let mut m = self.map.lock();
        let key = (node, action.clone());
        // Only if the book still talks about this version.
        if !matches!(m.get(&key), Some((v, _)) if v == version) {
            return;
        }
        match known {
            Some(k) => {
                m.insert(key, (version.to_string(), k));
            }
            None => {
                m.remove(&key);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn known(&self, node: usize, action: &ActionName) -> Option<(String, Known)> {
        self.map.lock().get(&(node, action.clone())).cloned()
    }
}

fn make_failure_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::NotDeduplicable { .. } => "checkpoint_failed",
        AgentError::TemplateUnavailable { .. } => "unavailable",
        AgentError::UnknownSandbox(_) => "sandbox_gone",
        AgentError::WrongForm { .. } => "wrong_form",
        AgentError::ShuttingDown | AgentError::Unavailable(_) | AgentError::NotDelivered(_) => {
            "agent_unavailable"
        }
        _ => "agent_error",
    }
}

impl crate::Controller {
    /// Purges every idle sandbox (warm or dedup) of `action` now, its templates staying (a
    /// benchmark knob: the next invocation needs a new sandbox). Returns how many.
    pub fn purge_idle(&self, action: &ActionName) -> usize {
        let jobs = self.state.lock().action_changed(action);
        let n = jobs.len();
        self.carry_out(crate::state::Work {
            purges: jobs,
            ..Default::default()
        });
        n
    }

    /// Whether template starts apply to `action` (globally on, not opted out).
    pub(crate) fn template_wanted(&self, action: &Action) -> bool {
        self.cfg.template_starts && allowed(action)
    }

    /// Whether `action`'s template is taken after a warm-up invocation (the annotation, else
    /// the configuration).
    pub(crate) fn template_warmup(&self, action: &Action) -> bool {
        warmup_annotation(action).unwrap_or(self.cfg.template_warmup)
    }

    /// Copies the book's ready templates into the state (the policy's views count them as
    /// bases).
    pub(crate) fn sync_template_bases(&self) {
        let set = self.templates.ready_set();
        self.state.lock().template_bases = set;
    }

    /// Learns the ready templates a node reports (restart reconciliation). `current` (when
    /// given) filters out templates of an older or deleted action version.
    pub(crate) fn learn_templates(
        &self,
        node: usize,
        templates: &[medes_agent::TemplateStatus],
        current: Option<&CurrentAction<'_>>,
    ) {
        for t in templates.iter().filter(|t| t.state == "ready") {
            if let Some(current) = current
                && !current(&t.action)
                    .is_some_and(|a| a.version == t.version && self.template_wanted(&a))
            {
                continue;
            }
            if self.templates.learn(node, &t.action, &t.version) {
                tracing::info!(node, action = %t.action, version = %t.version,
                               "template kept by the node serves template starts again");
            }
        }
        self.sync_template_bases();
    }

    /// A template start into the sandbox `id` that admission reserved. `None`: it serves the
    /// request. `Some(fresh)`: it failed; the caller cold-starts under the fresh id `fresh`
    /// (now the sandbox's id in the books): after a timeout the node may still hold `id`
    /// until its restore ends (it was asked to purge it).
    pub(crate) async fn template_start(
        &self,
        key: crate::state::Key,
        id: &medes_core::SandboxId,
        node: usize,
        action: &Action,
        arrival: tokio::time::Instant,
    ) -> Option<medes_core::SandboxId> {
        use medes_agent::{Command, Reply, TemplateStartCommand};
        let agent = &self.node(node).agent;
        let bound = std::time::Duration::from_millis(
            self.cfg
                .restore_timeout_ms
                .saturating_add(self.cfg.agent_grace_ms),
        );
        let cmd = Command::TemplateStart(TemplateStartCommand {
            sandbox: id.clone(),
            action: action.name.clone(),
            version: action.version.clone(),
            memory_limit: medes_core::Bytes::mib(action.limits.memory_mb),
            env: medes_core::static_env(action),
        });
        let reply = tokio::time::timeout(bound, agent.execute(cmd)).await;
        let err = match reply {
            Ok(Ok(Reply::TemplateStarted(r))) => {
                let ms = arrival.elapsed().as_secs_f64() * 1000.0;
                tracing::debug!(sandbox = %id, action = %action.name, verify_ms = r.verify_ms,
                                restore_ms = r.restore_ms, total_ms = r.total_ms, start_ms = ms,
                                "template start");
                self.templates.started();
                metrics::counter!("medes_template_starts_total").increment(1);
                self.state.lock().template_started(key, self.now());
                return None;
            }
            Ok(Ok(other)) => Some(AgentError::Unavailable(format!(
                "unexpected reply {}",
                crate::reply_name(&other)
            ))),
            Ok(Err(e)) => Some(e),
            Err(_) => {
                // The node may still finish it: have it purged (destroyed when its restore
                // ends, or at once); the fallback uses a fresh id meanwhile.
                let agent = agent.clone();
                let old = id.clone();
                tokio::spawn(async move {
                    let _ = agent.execute(Command::Purge { sandbox: old }).await;
                });
                None
            }
        };
        let label = self
            .templates
            .start_failed(node, &action.name, &action.version, err.as_ref());
        tracing::warn!(sandbox = %id, action = %action.name, version = %action.version, reason = label,
                       error = ?err.as_ref().map(|e| e.to_string()),
                       "template start failed; falling back to a cold start");
        metrics::counter!("medes_template_start_failures_total", "reason" => label).increment(1);
        self.sync_template_bases();
        let fresh = medes_core::SandboxId(format!("{id}-c"));
        if let Some(sb) = self.state.lock().sbs.get_mut(&key) {
            sb.id = fresh.clone();
        }
        Some(fresh)
    }

    /// Right after a cold start's init, before its first invocation: with the warm-up off
    /// (see [`Controller::template_warmup`]), makes the template now; the invocation waits.
    pub(crate) async fn template_before_first_run(
        &self,
        node: usize,
        sandbox: &medes_core::SandboxId,
        action: &Action,
    ) {
        if !self.template_wanted(action)
            || self.template_warmup(action)
            || self
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed)
            || !self.templates.want(node, &action.name, &action.version)
        {
            return;
        }
        self.make_template_now(node, sandbox, &action.name, &action.version)
            .await;
    }

    /// Asks `node` for a template of the sandbox and books the answer.
    async fn make_template_now(
        &self,
        node: usize,
        sandbox: &medes_core::SandboxId,
        name: &ActionName,
        version: &str,
    ) {
        use medes_agent::{Command, Reply};
        let agent = self.node(node).agent;
        let bound = std::time::Duration::from_millis(
            self.cfg
                .checkpoint_timeout_ms
                .saturating_add(self.cfg.agent_grace_ms),
        );
        let r = tokio::time::timeout(
            bound,
            agent.execute(Command::MakeTemplate {
                sandbox: sandbox.clone(),
            }),
        )
        .await;
        let res = match r {
            Ok(Ok(Reply::TemplateReady(t))) => {
                tracing::info!(sandbox = %sandbox, action = %name, version = %version,
                               held_bytes = t.held_bytes, checkpoint_ms = t.checkpoint_ms,
                               existed = t.existed, "template ready");
                Ok(())
            }
            Ok(Ok(other)) => Err(AgentError::Unavailable(format!(
                "unexpected reply {}",
                crate::reply_name(&other)
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AgentError::Unavailable("no answer in time".into())),
        };
        match self
            .templates
            .made(node, name, version, res.as_ref().map(|_| ()))
        {
            None => metrics::counter!("medes_templates_made_total").increment(1),
            Some(label) => {
                tracing::warn!(sandbox = %sandbox, action = %name, version = %version,
                               reason = label, error = ?res.err().map(|e| e.to_string()),
                               "template not made");
                metrics::counter!("medes_template_failures_total", "reason" => label).increment(1);
            }
        }
        self.sync_template_bases();
    }

    /// After the first successful run of a cold-started sandbox: has its node make the
    /// function's template in the background, if template starts apply and none is known.
    pub(crate) fn maybe_make_template(
        &self,
        node: usize,
        sandbox: &medes_core::SandboxId,
        action: &Action,
    ) {
        if !self.template_wanted(action)
            || self
                .shutting_down
                .load(std::sync::atomic::Ordering::Relaxed)
            || !self.templates.want(node, &action.name, &action.version)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let (sandbox, name, version) =
            (sandbox.clone(), action.name.clone(), action.version.clone());
        tokio::spawn(async move {
            me.make_template_now(node, &sandbox, &name, &version).await;
        });
    }
}

impl crate::state::State {
    /// Ready templates of `action` (on `node`, or on any node): bases in the policy's views.
    pub(crate) fn template_bases_of(&self, action: &ActionName, node: Option<usize>) -> usize {
        match node {
            Some(n) => usize::from(self.template_bases.contains(&(n, action.clone()))),
            None => self
                .template_bases
                .iter()
                .filter(|(_, a)| a == action)
                .count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medes_core::{Namespace, SandboxId};

    fn a() -> ActionName {
        ActionName {
            namespace: Namespace("guest".into()),
            name: "f".into(),
        }
    }

    #[test]
    fn asks_once_per_version_and_node() {
        let b = Book::default();
        assert!(b.want(0, &a(), "1"));
        assert!(!b.want(0, &a(), "1"), "being built");
        assert!(b.want(1, &a(), "1"), "per node");
        assert!(!b.ready(0, &a(), "1"));
        assert_eq!(b.made(0, &a(), "1", Ok(())), None);
        assert!(b.ready(0, &a(), "1"));
        assert!(!b.ready(0, &a(), "2"));
        assert!(b.want(0, &a(), "2"), "a new version replaces the old");
        assert!(!b.ready(0, &a(), "1"));
        b.forget(&a());
        assert_eq!(b.known(0, &a()), None);
        assert_eq!(b.known(1, &a()), None);
    }

    #[test]
    fn failures_decide_between_rebuild_retry_and_never() {
        let b = Book::default();
        let unavailable = |reason: &str| AgentError::TemplateUnavailable {
            action: a(),
            version: "1".into(),
            reason: reason.into(),
        };
        let ready = |b: &Book| {
            b.want(0, &a(), "1");
            b.made(0, &a(), "1", Ok(()));
        };
        // Corrupt: forgotten, rebuilt after the fallback cold start.
        ready(&b);
        let e = unavailable("corrupt, deleted: checksum mismatch in pages-1.img");
        assert_eq!(b.start_failed(0, &a(), "1", Some(&e)), "checksum");
        assert!(!b.ready(0, &a(), "1"));
        assert!(b.want(0, &a(), "1"));
        // One failed restore: kept (the node counts); a disabling one: never again.
        b.made(0, &a(), "1", Ok(()));
        let f = |disabled| AgentError::TemplateStartFailed {
            sandbox: SandboxId("x".into()),
            reason: "criu".into(),
            disabled,
        };
        assert_eq!(
            b.start_failed(0, &a(), "1", Some(&f(false))),
            "restore_failed"
        );
        assert!(b.ready(0, &a(), "1"));
        b.start_failed(0, &a(), "1", Some(&f(true)));
        assert!(!b.ready(0, &a(), "1"));
        assert!(!b.want(0, &a(), "1"), "disabled for this version");
        assert!(b.want(0, &a(), "2"), "a new version may have one");
        // A sandbox that cannot be checkpointed: never asked again for the version.
        let e = AgentError::NotDeduplicable {
            sandbox: SandboxId("x".into()),
            reason: "tcp".into(),
            sandbox_alive: true,
            kind: medes_agent::CheckpointFailure::TcpSocket,
        };
        assert_eq!(b.made(0, &a(), "2", Err(&e)), Some("checkpoint_failed"));
        assert!(!b.want(0, &a(), "2"));
        // A lost answer: asked again next time.
        b.forget(&a());
        b.want(0, &a(), "3");
        b.made(0, &a(), "3", Err(&AgentError::Unavailable("gone".into())));
        assert!(b.want(0, &a(), "3"));
        let st = b.stats.lock().clone();
        assert_eq!(st.made, 2);
        assert_eq!(st.start_failures.get("restore_failed"), Some(&2));
        assert_eq!(st.make_failures.get("checkpoint_failed"), Some(&1));
    }

    #[test]
    fn annotation_opts_out() {
        let mut act = Action {
            name: a(),
            version: "1".into(),
            exec: medes_core::Exec {
                kind: "python:3".into(),
                code: medes_core::Code::Source(String::new()),
                main: "main".into(),
            },
            parameters: Default::default(),
            annotations: vec![],
            limits: medes_core::Limits {
                timeout_ms: 1000,
                memory_mb: 128,
                concurrency: 1,
                logs_kb: 10,
            },
            publish: false,
            updated: 0,
        };
        assert!(allowed(&act));
        act.annotations
            .push((OPT_OUT_ANNOTATION.into(), serde_json::Value::Bool(false)));
        assert!(!allowed(&act));
        act.annotations[0].1 = serde_json::Value::Bool(true);
        assert!(allowed(&act));
    }
}
