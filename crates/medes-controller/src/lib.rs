//! The scheduler: decides which sandbox serves each invocation, what becomes of idle sandboxes,
//! and builds the activation record.
//!
//! [`Controller`] implements [`medes_core::Invoker`]. For each invocation it picks, in order of
//! preference, an idle warm sandbox of the same action version (a base included: a *warm
//! start*), a dedup sandbox to restore (a *dedup start*), or reserves the action's memory limit
//! on a node and has that node's agent create and initialise a new sandbox (a *cold start*). A
//! dedup start that fails falls back to a cold start, which serves the request. It enforces a
//! per-node memory budget: a start that does not fit evicts idle sandboxes (warm, dedup, or bases
//! without dependents) in the policy's order; if nothing can be evicted the invocation waits
//! (bounded, FIFO) and then fails with [`InvokeError::NoCapacity`].
//!
//! A background task ([`Controller::run_timers`]) puts idle sandboxes to the [`Policy`] when
//! their decision time comes (timer-driven, not only on arrivals), carries out its decisions in
//! the background (make a base, deduplicate, purge; checkpoints bounded per node, never blocking
//! invocations), runs the policy's own timer and pre-warms, and refreshes measured memory. The
//! default policy is [`medes_policy::DedupRule`] (idle period → base or dedup, keep-dedup, T
//! dedups per base); with `dedup_enabled = false` it is a fixed keep-alive.
//!
//! With [`ControllerConfig::template_starts`] (issue 8, off by default), a start that finds no
//! free warm or dedup sandbox restores from the function's template on the node (start kind
//! `template`) instead of a cold start; see `template.rs` and [`TemplateStats`].
//!
//! ```no_run
//! # async fn demo(agent: medes_agent::Agent) {
//! use std::sync::Arc;
//! use medes_controller::{Controller, ControllerConfig};
//! let ctl = Controller::new(ControllerConfig::default(), vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)]);
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let timers = tokio::spawn(ctl.clone().run_timers(shutdown.clone()));
//! // ... serve invocations through `ctl` (an `Arc<dyn Invoker>`) ...
//! // Benchmarks: decide about every idle sandbox now and wait for the checkpoints.
//! ctl.force_decisions(None).await;
//! ctl.wait_settled().await;
//! shutdown.cancel();
//! let _ = timers.await;
//! ctl.shutdown().await;
//! agent.shutdown().await;
//! # }
//! ```
//!
//! # Design
//! - All bookkeeping sits behind one mutex that is held only for short, synchronous sections
//!   (never across an await). The agent is called outside it.
//! - Every state change of a sandbox goes through [`medes_policy::SandboxState::apply`]; every
//!   idle-sandbox decision through the [`Policy`] trait and [`medes_policy::enforce`] (no
//!   DEDUP → WARM by policy, a base never purged while dedup sandboxes of its dedup domain — its
//!   namespace on its node — exist, nothing deduplicated that failed once).
//! - Each invocation runs on its own task, so a client that disconnects never strands a
//!   reservation or a sandbox.
//! - Memory: admission charges a new sandbox its full memory limit; once the node reports, a warm
//!   sandbox is charged its PSS (capped at its limit) plus anything else the node holds for it, a
//!   base its PSS plus its resident page image, a dedup sandbox everything stored for it. A
//!   checkpoint reserves the image being written (the sandbox's size) until it ends, a restore
//!   reserves the restored process (its limit) plus m_R (its page image) until it ends.
//!
//! # What this crate does not do
//! No HTTP or OpenWhisk JSON (that is `medes-api`), no persistence of activations (the caller
//! stores what [`Invoker::invoke`] returns), no sandboxes, checkpoints or stores of its own
//! (agents own them).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod activation;
mod metrics;
mod state;
mod template;

pub use template::{OPT_OUT_ANNOTATION, TemplateStats, WARMUP_ANNOTATION};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use medes_agent::{AgentError, Command, NodeAgent, Reply, RestoreReply, RunCommand, SpawnCommand};
use medes_core::{
    Action, ActionName, Activation, ActivationResponse, ActivationStatus, Bytes, InvokeError,
    InvokeRequest, Invoker, NodeId, SandboxId, SandboxScope, SandboxSummary, StartKind, UnixMillis,
    static_env,
};
use medes_policy::{
    Form, KnobError, Policy, PolicySettings, Purpose, RuleConfig, StateKind, Timers, Timestamp,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::activation::{LogBuilder, classify, error_result};
use crate::metrics::{ActionMetrics, GlobalMetrics};
use crate::state::{
    CheckpointJob, CheckpointOutcome, Grant, Key, Limits, PrewarmJob, PurgeJob, State, Waiter, Work,
};

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// How long an idle warm sandbox (or a base without dependents) is kept, seconds. Default
    /// 600 (OpenWhisk's 10 minutes).
    pub keep_alive_s: u64,
    /// Memory budget of each node, MiB; 0 means automatic: half of the machine's `MemTotal`,
    /// decided at start and logged. Default 0.
    pub node_memory_budget_mb: u64,
    /// How long an invocation may wait for memory before it fails with 503, ms. Default 10000.
    pub admission_wait_ms: u64,
    /// Most invocations waiting for memory at once; more fail at once with 503. Default 10000.
    pub max_waiting: usize,
    /// Value of `__OW_API_HOST` in every run. Default `http://127.0.0.1:3233`.
    pub api_host: String,
    /// How often the sandboxes' measured memory is refreshed, ms. Default 2000.
    pub memory_refresh_ms: u64,
    /// Extra time beyond an action's time limit after which the controller stops waiting for a
    /// node agent's answer (a safety net; the agent enforces the limit itself), ms. Default 5000.
    pub agent_grace_ms: u64,
    /// Whether idle sandboxes are deduplicated (made bases or dedup sandboxes); `false` is
    /// today's warm/cold platform with a fixed keep-alive. Default true.
    pub dedup_enabled: bool,
    /// Idle time after which a warm sandbox is put to the policy (the paper's idle period),
    /// seconds. Default 60.
    pub idle_period_s: u64,
    /// How long a dedup sandbox is kept after its dedup (keep-dedup), seconds. Default 900.
    pub keep_dedup_s: u64,
    /// T: per function and node, one more base whenever dedup ÷ base > T. Default 40.
    pub dedup_per_base: u32,
    /// Checkpoints (make-base or dedup) in flight per node; more wait, the sandbox staying warm
    /// and assignable meanwhile. Default 1 (a node here has 2 cores).
    pub max_checkpoints_per_node: usize,
    /// Dedup starts (restores) in flight per node; beyond, requests take cold starts. Default 10
    /// (the paper's bound).
    pub max_restores_per_node: usize,
    /// How long the controller waits for a restore before falling back to a cold start, ms
    /// (the agent bounds it too). Default 15000.
    pub restore_timeout_ms: u64,
    /// How long the controller waits for a checkpoint before giving the sandbox up, ms.
    /// Default 120000.
    pub checkpoint_timeout_ms: u64,
    /// Whether an idle base serves invocations like a warm sandbox. Default true. `false`
    /// sends requests past idle bases (to a plain warm sandbox, a dedup start, or a cold start):
    /// a benchmark knob, so that `medes bench startup` measures dedup starts deterministically.
    pub bases_serve: bool,
    /// The operator's knob (`[controller.policy]`): which policy (`dedup-rule`, `medes`,
    /// `keep-alive`), Medes's mode (`latency` with `alpha`, `memory` with `budget_mb`), timers
    /// overriding the ones above, and per-function overrides (`[controller.policy.functions.NAME]`).
    /// Changeable at run time ([`Controller::set_policy_settings`], `PUT .../medes/policy`).
    /// Default: `dedup-rule` with the timers above.
    pub policy: PolicySettings,
    /// Template starts (issue 8): after the first cold start of an action version on a node
    /// and its first successful run, the node makes the function's template in the background;
    /// later starts with no free warm or dedup sandbox restore from it (start kind
    /// `template`) instead of cold-starting. An action opts out with the annotation
    /// `medes-template-starts: false`. Default false.
    pub template_starts: bool,
    /// Whether the template is taken after the first invocation of the cold-started sandbox
    /// (a warm-up: imports and caches the first run touches are in the template). `false`
    /// takes it right after init, before that first invocation runs (which then waits for the
    /// checkpoint). An action overrides it with the annotation `medes-template-warmup`
    /// (`true`/`false`). Default true.
    pub template_warmup: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            keep_alive_s: 600,
            node_memory_budget_mb: 0,
            admission_wait_ms: 10_000,
            max_waiting: 10_000,
            api_host: "http://127.0.0.1:3233".into(),
            memory_refresh_ms: 2_000,
            agent_grace_ms: 5_000,
            dedup_enabled: true,
            idle_period_s: 60,
            keep_dedup_s: 900,
            dedup_per_base: 40,
            max_checkpoints_per_node: 1,
            max_restores_per_node: 10,
            restore_timeout_ms: 15_000,
            checkpoint_timeout_ms: 120_000,
            bases_serve: true,
            policy: PolicySettings::default(),
            template_starts: false,
            template_warmup: true,
        }
    }
}

impl ControllerConfig {
    /// The timers of this section (the knob's absent timers default to them).
    pub fn timers(&self) -> Timers {
        Timers {
            idle_period_s: self.idle_period_s,
            keep_alive_s: self.keep_alive_s,
            keep_dedup_s: self.keep_dedup_s,
        }
    }

    /// The settings of the default policy ([`medes_policy::DedupRule`]).
    pub fn rule(&self) -> RuleConfig {
        RuleConfig {
            idle_period_ms: self.idle_period_s.saturating_mul(1000),
            keep_alive_ms: self.keep_alive_s.saturating_mul(1000),
            keep_dedup_ms: self.keep_dedup_s.saturating_mul(1000),
            dedup_per_base: self.dedup_per_base,
            dedup_enabled: self.dedup_enabled,
        }
    }
}

/// A snapshot of one sandbox, for tests, debugging, benchmarks and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: SandboxId,
    /// The node it lives on.
    pub node: NodeId,
    /// Its action.
    pub action: ActionName,
    /// The action version it runs.
    pub version: String,
    /// Lifecycle state; [`StateKind::Base`] for a live base.
    pub state: StateKind,
    /// Plain or base.
    pub form: Form,
    /// Invocations running in it.
    pub in_flight: u32,
    /// How long it has been idle, ms (warm, checkpointing and dedup sandboxes).
    pub idle_ms: Option<u64>,
    /// Memory charged against the node budget.
    pub charged: Bytes,
    /// Last measured PSS (live sandboxes).
    pub measured: Option<Bytes>,
    /// The action's memory limit.
    pub memory_limit: Bytes,
    /// `false` once a checkpoint or dedup of it failed (never tried again).
    pub deduplicable: bool,
    /// Bytes stored for it as a dedup sandbox.
    pub stored: Option<Bytes>,
    /// Bytes of its page image at its last checkpoint.
    pub image: Option<Bytes>,
    /// For a base: dedup sandboxes of its dedup domain on its node.
    pub dependents: usize,
    /// Breakdown of its last dedup start.
    pub last_restore: Option<RestoreReply>,
}

/// Counts of the dedup machinery since the controller started (also exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DedupStats {
    /// Sandboxes made bases.
    pub bases: u64,
    /// Sandboxes deduplicated.
    pub dedups: u64,
    /// Dedup starts that served their request.
    pub dedup_starts: u64,
    /// Sandboxes pre-warmed at the policy's request.
    pub prewarms: u64,
    /// Checkpoints (make-base or dedup) that failed, by reason.
    pub dedup_failures: BTreeMap<String, u64>,
    /// Dedup starts that failed (and fell back to a cold start), by reason.
    pub dedup_start_failures: BTreeMap<String, u64>,
    /// Bases whose process was released once their image was taken
    /// (`release_base_process`).
    pub released_bases: u64,
}

#[derive(Clone)]
struct Node {
    id: NodeId,
    /// The node's agent behind its [`Guarded`] wrapper.
    agent: Arc<dyn NodeAgent>,
    /// Cancelled when the node is marked dead ([`Controller::set_node_alive`]).
    death: Arc<Mutex<CancellationToken>>,
}

impl Node {
    fn new(id: NodeId, agent: Arc<dyn NodeAgent>) -> Node {
        let death = Arc::new(Mutex::new(CancellationToken::new()));
        let agent = Arc::new(Guarded {
            id: id.clone(),
            inner: agent,
            death: death.clone(),
        });
        Node { id, agent, death }
    }
}

/// A node agent whose calls end at once with [`AgentError::Unavailable`] while its node is
/// marked dead (in flight when it is marked, or made afterwards): work on a dead node fails
/// cleanly instead of waiting for a transport deadline.
struct Guarded {
    id: NodeId,
    inner: Arc<dyn NodeAgent>,
    death: Arc<Mutex<CancellationToken>>,
}

impl NodeAgent for Guarded {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let died = self.death.lock().clone();
        let id = self.id.clone();
        let call = self.inner.execute(cmd);
        async move {
            let dead = || AgentError::Unavailable(format!("node {id} is dead (missed heartbeats)"));
            if died.is_cancelled() {
                return Err(dead());
            }
            tokio::select! {
                r = call => r,
                _ = died.cancelled() => Err(dead()),
            }
        }
        .boxed()
    }
}

/// The scheduler. Create with [`Controller::new`]; use through [`Invoker`].
pub struct Controller {
    cfg: ControllerConfig,
    knob: Mutex<PolicySettings>,
    me: Weak<Controller>,
    /// Append-only ([`Controller::add_node`]): a node's index never changes.
    nodes: RwLock<Vec<Node>>,
    /// The configured budget: every node's until it reports its own
    /// ([`Controller::set_node_budget`]).
    default_budget: u64,
    /// The largest budget of any node (a larger action limit is refused at once).
    max_budget: AtomicU64,
    state: Mutex<State>,
    epoch: Instant,
    wake: Notify,
    settled: Notify,
    armed: AtomicU64,
    shutting_down: AtomicBool,
    metrics: OnceLock<GlobalMetrics>,
    /// Which nodes have a template of which action version (issue 8).
    templates: template::Book,
    /// The stored actions ([`Controller::set_action_lookup`]): a node reconciled after startup
    /// (a late joiner, an agent registering again) keeps its sandboxes of unchanged actions.
    stored: RwLock<Option<StoredActions>>,
}

/// Looks up an action's stored definition (the store's `get_action`), for reconciliation.
pub type StoredActions = Arc<dyn Fn(&ActionName) -> Option<Action> + Send + Sync>;

/// How long placement skips a node whose agent refused a connection (a killed agent is found
/// dead by its heartbeats within about 6 s; a restarting one registers again within a second).
const SHUN_MS: u64 = 3_000;

/// Half of `MemTotal`, or 4 GiB if it cannot be read.
fn auto_budget() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match total {
        Some(kib) => kib * 1024 / 2,
        None => {
            warn!("cannot read MemTotal from /proc/meminfo; node memory budget defaults to 4 GiB");
            4 << 30
        }
    }
}

fn unix_now() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A short, fixed label for a failed checkpoint (metrics): the agent's failure kind.
fn checkpoint_failure_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::NotDeduplicable { kind, .. } => kind.label(),
        other => agent_error_label(other),
    }
}

/// The label of an agent error that is not specific to the operation (metrics).
fn agent_error_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::UnknownSandbox(_) => "sandbox_gone",
        AgentError::WrongForm { .. } => "wrong_form",
        AgentError::ShuttingDown | AgentError::Unavailable(_) | AgentError::NotDelivered(_) => {
            "agent_unavailable"
        }
        _ => "agent_error",
    }
}

/// A short, fixed label for a failed dedup start (metrics): the agent's failure kind.
fn restore_failure_label(e: &AgentError) -> &'static str {
    match e {
        AgentError::RestoreFailed { kind, .. } => kind.label(),
        other => agent_error_label(other),
    }
}

/// How a dedup start went, for the invocation.
enum RestoreResult {
    Ok,
    /// Failed; the request falls back to a cold start.
    Failed,
}

/// A node's liveness could not be set ([`Controller::set_node_alive`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetNodeAliveError {
    /// No node with this id is part of the controller.
    #[error("node {0} is not known")]
    UnknownNode(NodeId),
}

/// A node's leftovers reconciled ([`Controller::reconcile_node`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReconcileReport {
    /// Sandboxes the node holds that the books do not know, purged.
    pub purged: usize,
    /// Idle sandboxes in the books the node no longer holds (or whose base process it lost),
    /// forgotten.
    pub forgotten: usize,
    /// Sandboxes the books dropped when the node was marked dead, which it still holds,
    /// re-adopted (their action unchanged), and those the books never had whose action is
    /// stored unchanged ([`Controller::set_action_lookup`]), adopted.
    pub adopted: usize,
    /// Bases whose process is gone and whose function the books cannot tell, left to the
    /// node (charged as unowned; they retire once no dedup sandbox depends on them).
    pub left: usize,
    /// Bases in the books whose process the node lost (its agent restarted) but whose pages it
    /// keeps: they stay their function's bases, without process (counted by the base rule,
    /// charged as bases, never assigned an invocation).
    pub kept_bases: usize,
}

/// A node could not be added ([`Controller::add_node`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddNodeError {
    /// A node with this id is already part of the controller.
    #[error("node {0} is already known")]
    Duplicate(NodeId),
}

impl Controller {
    /// A controller over the given nodes with the policy `cfg.policy` describes (by default
    /// [`medes_policy::DedupRule`] with `cfg`'s timers; never deduplicating when
    /// `cfg.dedup_enabled` is false).
    pub fn new(
        cfg: ControllerConfig,
        agents: Vec<(NodeId, Arc<dyn NodeAgent>)>,
    ) -> Arc<Controller> {
        let policy = Box::new(cfg.policy.build(
            cfg.timers(),
            cfg.dedup_per_base,
            cfg.dedup_enabled,
        ));
        Self::with_policy(cfg, agents, policy)
    }

    /// The operator's knob in force (`cfg.policy` with absent timers filled from `cfg`, or
    /// the last [`Controller::set_policy_settings`]).
    pub fn policy_settings(&self) -> PolicySettings {
        self.knob.lock().clone()
    }

    /// Replaces the idle-sandbox policy at run time with the one `settings` describe (absent
    /// timers from the configuration). Every idle sandbox's next decision is recomputed under
    /// the new policy; sandboxes already queued for a checkpoint stay queued. Returns the
    /// settings now in force.
    pub fn set_policy_settings(
        &self,
        mut settings: PolicySettings,
    ) -> Result<PolicySettings, KnobError> {
        settings.validate()?;
        settings.resolve(self.cfg.timers());
        let policy = Box::new(settings.build(
            self.cfg.timers(),
            self.cfg.dedup_per_base,
            self.cfg.dedup_enabled,
        ));
        let idle_ms = settings
            .idle_period_s
            .unwrap_or(self.cfg.idle_period_s)
            .saturating_mul(1000);
        let now = self.now();
        {
            // Knob first, then state: the only place both are held, always in this order.
            let mut knob = self.knob.lock();
            let mut st = self.state.lock();
            st.replace_policy(policy, idle_ms, now);
            st.limits.release_base_process = settings.release_base_process;
            drop(st);
            *knob = settings.clone();
        }
        info!(policy = settings.policy.as_str(), mode = ?settings.mode, alpha = settings.alpha, budget_mb = ?settings.budget_mb, idle_period_s = ?settings.idle_period_s, keep_alive_s = ?settings.keep_alive_s, keep_dedup_s = ?settings.keep_dedup_s, overrides = settings.functions.len(), "policy changed");
        self.wake.notify_one();
        Ok(settings)
    }

    /// A controller with an explicit idle-sandbox policy (its answers still pass through
    /// [`medes_policy::enforce`], with `cfg.dedup_enabled`).
    pub fn with_policy(
        cfg: ControllerConfig,
        agents: Vec<(NodeId, Arc<dyn NodeAgent>)>,
        policy: Box<dyn Policy>,
    ) -> Arc<Controller> {
        let budget = if cfg.node_memory_budget_mb == 0 {
            let b = auto_budget();
            info!(
                budget_mb = b >> 20,
                "node memory budget: automatic (half of MemTotal)"
            );
            b
        } else {
            Bytes::mib(cfg.node_memory_budget_mb).0
        };
        info!(
            nodes = agents.len(),
            budget_mb = budget >> 20,
            keep_alive_s = cfg.keep_alive_s,
            dedup = cfg.dedup_enabled,
            idle_period_s = cfg.idle_period_s,
            keep_dedup_s = cfg.keep_dedup_s,
            dedup_per_base = cfg.dedup_per_base,
            policy = policy.name(),
            "controller configured"
        );
        let budgets = vec![budget; agents.len()];
        let prefix = ActivationIdPrefix::new();
        let nodes = agents
            .into_iter()
            .map(|(id, agent)| Node::new(id, agent))
            .collect();
        let limits = Limits {
            max_checkpoints: cfg.max_checkpoints_per_node.max(1),
            max_restores: cfg.max_restores_per_node,
            idle_period_ms: cfg
                .policy
                .timers(cfg.timers())
                .idle_period_s
                .saturating_mul(1000),
            dedup_enabled: cfg.dedup_enabled,
            bases_serve: cfg.bases_serve,
            template_starts: cfg.template_starts,
            release_base_process: cfg.policy.release_base_process,
        };
        let mut knob = cfg.policy.clone();
        knob.resolve(cfg.timers());
        Arc::new_cyclic(|me| Controller {
            knob: Mutex::new(knob),
            max_budget: AtomicU64::new(budget),
            default_budget: budget,
            state: Mutex::new(State::new(budgets, policy, limits, prefix.0)),
            cfg,
            me: me.clone(),
            nodes: RwLock::new(nodes),
            epoch: Instant::now(),
            wake: Notify::new(),
            settled: Notify::new(),
            armed: AtomicU64::new(u64::MAX),
            shutting_down: AtomicBool::new(false),
            metrics: OnceLock::new(),
            templates: template::Book::default(),
            stored: RwLock::new(None),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The largest memory budget of any node (the configured one until nodes report their
    /// own: [`Self::set_node_budget`]).
    pub fn node_budget(&self) -> Bytes {
        Bytes(self.max_budget.load(Ordering::Relaxed))
    }

    /// The memory budget of each node, in node order.
    pub fn node_budgets(&self) -> Vec<Bytes> {
        self.state
            .lock()
            .budgets
            .iter()
            .map(|&b| Bytes(b))
            .collect()
    }

    /// Sets one node's memory budget (issue 7: the budget its agent reported when it
    /// registered; 0 keeps the configured one). Placement uses it from the next decision on;
    /// a smaller budget than what the node holds evicts nothing at once, it only stops new
    /// sandboxes there until idle ones go. Returns the budget in force.
    pub fn set_node_budget(&self, id: &NodeId, budget: Bytes) -> Result<Bytes, SetNodeAliveError> {
        let index = self
            .nodes
            .read()
            .iter()
            .position(|n| &n.id == id)
            .ok_or_else(|| SetNodeAliveError::UnknownNode(id.clone()))?;
        let budget = if budget.0 == 0 {
            self.default_budget
        } else {
            budget.0
        };
        let changed = {
            let mut st = self.state.lock();
            let old = std::mem::replace(&mut st.budgets[index], budget);
            let max = st.budgets.iter().copied().max().unwrap_or(budget);
            self.max_budget.store(max, Ordering::Relaxed);
            old != budget
        };
        if changed {
            info!(node = %id, budget_mb = budget >> 20, "node memory budget set");
            self.update_gauges();
            self.pump();
        }
        Ok(Bytes(budget))
    }

    /// The node at `index` (a clone: two `Arc`s; the node list lock is not held afterwards).
    fn node(&self, index: usize) -> Node {
        self.nodes.read()[index].clone()
    }

    /// Adds a node at run time (issue 7: an agent that registered after the controller was
    /// built), with the configured node budget (see [`Self::set_node_budget`]). It takes part in
    /// placement from the next decision on; waiting invocations are served if it has room.
    /// Nodes are never removed (indices stay valid); a dead one is taken out of placement by
    /// [`Self::set_node_alive`].
    pub fn add_node(&self, id: NodeId, agent: Arc<dyn NodeAgent>) -> Result<(), AddNodeError> {
        {
            let mut nodes = self.nodes.write();
            if nodes.iter().any(|n| n.id == id) {
                return Err(AddNodeError::Duplicate(id));
            }
            nodes.push(Node::new(id.clone(), agent));
        }
        // The books learn the node last (never under the node list lock): nothing is placed
        // on an index before the node list holds it.
        let n = self.state.lock().add_node(self.default_budget);
        info!(node = %id, nodes = n, budget_mb = self.default_budget >> 20, "node added");
        self.pump();
        Ok(())
    }

    /// Marks a node dead (`alive == false`) or alive again (issue 7 phase 2); returns whether
    /// that changed anything.
    ///
    /// Dead: nothing new is placed there (cold starts go to live nodes, its warm and dedup
    /// sandboxes are no longer chosen), its idle sandboxes leave the books (their memory
    /// released, the count logged), and every call in flight to it ends at once with
    /// [`AgentError::Unavailable`], so its invocations end as error activations.
    /// Alive again: placement uses it again and its leftovers are reconciled in the background
    /// ([`Self::reconcile_node`]). The books learn of nodes by index, so a dead node keeps its
    /// index (nodes are never removed).
    pub fn set_node_alive(&self, id: &NodeId, alive: bool) -> Result<bool, SetNodeAliveError> {
        let (index, node) = {
            let nodes = self.nodes.read();
            let i = nodes
                .iter()
                .position(|n| &n.id == id)
                .ok_or_else(|| SetNodeAliveError::UnknownNode(id.clone()))?;
            (i, nodes[i].clone())
        };
        if !alive {
            let (forgotten, freed) = {
                let mut st = self.state.lock();
                if !st.alive[index] {
                    return Ok(false);
                }
                // Cancel under the books' lock: a call made after this fails at once.
                node.death.lock().cancel();
                st.node_down(index)
            };
            warn!(node = %id, forgotten, freed_mb = freed >> 20,
                  "node dead: no new work placed there; its idle sandboxes forgotten, its calls in flight fail");
            self.update_gauges();
            self.pump();
            return Ok(true);
        }
        {
            let mut st = self.state.lock();
            if st.alive[index] {
                return Ok(false);
            }
            *node.death.lock() = CancellationToken::new();
            st.alive[index] = true;
        }
        info!(node = %id, "node alive again: placement uses it again");
        if let Some(me) = self.me.upgrade() {
            let id = id.clone();
            tokio::spawn(async move {
                let _ = me.reconcile_node(&id).await;
            });
        }
        self.pump();
        Ok(true)
    }

    /// Gives the controller the stored actions (normally the store's `get_action`), so that
    /// [`Self::reconcile_node`] adopts what a node kept for an unchanged stored action although
    /// the books never had it (a node joining after startup, an agent registering again after
    /// the controller restarted), as [`Self::reconcile`] does at startup. Without it such
    /// sandboxes are purged.
    pub fn set_action_lookup(&self, stored: StoredActions) {
        *self.stored.write() = Some(stored);
    }

    /// Placement skips a node whose agent refused a connection for [`SHUN_MS`], until its
    /// heartbeats decide (issue 7: calls arriving before it is found dead go elsewhere).
    fn shun(&self, node: usize) {
        let until = self.now().plus_ms(SHUN_MS);
        self.state.lock().shun(node, until);
        warn!(node = %self.node(node).id, ms = SHUN_MS, "node refused a connection: no new work placed there for a while");
    }

    /// Whether placement uses each node (false once marked dead), in node order.
    pub fn nodes_alive(&self) -> Vec<bool> {
        self.state.lock().alive.clone()
    }

    /// Reconciles one node's sandboxes with the books (a node back from the dead, or an agent
    /// that registered again). Sandboxes it holds that the books dropped when it was marked
    /// dead are re-adopted if their action has not changed (dedup sandboxes resume as DEDUP,
    /// live warm sandboxes and bases as idle WARM); bases whose process is gone are left to
    /// the node (charged as unowned; they retire once no dedup sandbox depends on them); those
    /// the books never had (a node that joined after startup) are adopted as by
    /// [`Self::reconcile`] when their action is stored unchanged ([`Self::set_action_lookup`]);
    /// every other sandbox it holds that the books do not know is purged (dedup and warm ones
    /// first, then bases). Idle sandboxes of the books it no longer holds are forgotten, and idle
    /// bases whose process it lost leave the books. Purge refusals (a base still needed) and
    /// failures are logged, not retried.
    pub async fn reconcile_node(
        &self,
        id: &NodeId,
    ) -> Result<NodeReconcileReport, SetNodeAliveError> {
        let (index, node) = {
            let nodes = self.nodes.read();
            let i = nodes
                .iter()
                .position(|n| &n.id == id)
                .ok_or_else(|| SetNodeAliveError::UnknownNode(id.clone()))?;
            (i, nodes[i].clone())
        };
        let mut report = NodeReconcileReport::default();
        let before = self.now();
        let status = match node.agent.execute(Command::Status).await {
            Ok(Reply::Status(s)) => s,
            Ok(other) => {
                warn!(node = %id, reply = reply_name(&other), "unexpected reply to status; node not reconciled");
                return Ok(report);
            }
            Err(e) => {
                warn!(node = %id, error = %e, "node status failed; node not reconciled");
                return Ok(report);
            }
        };
        // The stored actions (when known): what the books never had (a late joiner, an agent
        // registering again after the controller restarted) is adopted as at startup.
        let stored = self.stored.read().clone();
        let current: Option<&template::CurrentAction<'_>> =
            stored.as_deref().map(|f| f as &template::CurrentAction<'_>);
        self.learn_templates(index, &status.templates, current);
        let looked: std::collections::HashMap<SandboxId, Action> = match current {
            Some(current) => status
                .sandboxes
                .iter()
                .filter_map(|s| Some((s.id.clone(), current(s.action.as_ref()?)?)))
                .collect(),
            None => Default::default(),
        };
        let held: std::collections::HashSet<SandboxId> =
            status.sandboxes.iter().map(|s| s.id.clone()).collect();
        let unknown = {
            let mut st = self.state.lock();
            // It answered: no longer shunned.
            if let Some(s) = st.shunned.get_mut(index) {
                *s = Timestamp(0);
            }
            let known: std::collections::HashSet<SandboxId> = st
                .sbs
                .values()
                .filter(|s| s.node == index)
                .map(|s| s.id.clone())
                .collect();
            let now = self.now();
            let mut unknown: Vec<(bool, SandboxId)> = Vec::new();
            for s in status.sandboxes.iter().filter(|s| !known.contains(&s.id)) {
                match st.readopt(index, s, now) {
                    state::Readopt::Adopted => {
                        report.adopted += 1;
                        info!(node = %id, sandbox = %s.id, form = ?s.form, "sandbox of a returning node re-adopted");
                    }
                    state::Readopt::Left => report.left += 1,
                    state::Readopt::Purge => {
                        let action = looked.get(&s.id).cloned();
                        let adopted = match (State::adoption(s, action.as_ref()), action) {
                            (state::Adoption::Adopt, Some(a)) => {
                                st.adopt_dedup(index, s, &Arc::new(a), now).is_some()
                            }
                            (state::Adoption::AdoptLive, Some(a)) => st
                                .adopt_live(index, s, &Arc::new(a), (true, s.image_bytes), now)
                                .is_some(),
                            (state::Adoption::AdoptKeptBase, Some(a)) => {
                                st.adopt_kept_base(index, s, &Arc::new(a), now).is_some()
                            }
                            _ => false,
                        };
                        if adopted {
                            report.adopted += 1;
                            info!(node = %id, sandbox = %s.id, form = ?s.form,
                                  "sandbox kept by the node adopted (its action is stored, unchanged)");
                        } else {
                            unknown.push((s.form == medes_agent::SandboxForm::Base, s.id.clone()))
                        }
                    }
                }
            }
            if let Some(lost) = st.lost.get_mut(index) {
                lost.clear();
            }
            unknown.sort();
            report.forgotten = st.forget_missing(index, &held, before);
            let reported: std::collections::HashMap<&SandboxId, &medes_agent::SandboxStatus> =
                status.sandboxes.iter().map(|s| (&s.id, s)).collect();
            let (left, kept) = st.forget_lost_bases(index, &reported);
            report.forgotten += left;
            report.kept_bases += kept;
            unknown
        };
        for (_, sandbox) in unknown {
            match node
                .agent
                .execute(Command::Purge {
                    sandbox: sandbox.clone(),
                })
                .await
            {
                Ok(_) | Err(AgentError::UnknownSandbox(_)) => report.purged += 1,
                Err(e) => {
                    warn!(node = %id, %sandbox, error = %e, "purging a leftover sandbox failed")
                }
            }
        }
        info!(node = %id, adopted = report.adopted, purged = report.purged, left = report.left,
              forgotten = report.forgotten, "node reconciled");
        self.refresh_memory().await;
        self.update_gauges();
        self.rearm();
        self.wake.notify_one();
        self.pump();
        Ok(report)
    }

    /// The nodes, in index order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.read().iter().map(|n| n.id.clone()).collect()
    }

    /// A snapshot of every sandbox, sorted by id.
    pub fn sandboxes(&self) -> Vec<SandboxInfo> {
        let now = self.now();
        let ids: Vec<NodeId> = self.nodes.read().iter().map(|n| n.id.clone()).collect();
        self.state.lock().info(&ids, now)
    }

    /// Memory charged on each node, in node order.
    pub fn memory_used(&self) -> Vec<Bytes> {
        self.state.lock().used.iter().map(|&u| Bytes(u)).collect()
    }

    /// Idle sandboxes evicted to make room so far.
    pub fn evictions(&self) -> u64 {
        self.state.lock().evictions
    }

    /// Counts of bases, dedups, dedup starts and failures so far.
    pub fn dedup_stats(&self) -> DedupStats {
        self.state.lock().stats.clone()
    }

    /// Counts of templates made and template starts so far (issue 8).
    pub fn template_stats(&self) -> TemplateStats {
        self.templates.stats.lock().clone()
    }

    /// Runs the idle decision now for every idle warm sandbox (of `action`, or all), as if its
    /// idle period had passed; the checkpoints decided run in the background (see
    /// [`Controller::wait_settled`]). Returns the number of sandboxes something was decided for.
    pub async fn force_decisions(&self, action: Option<&ActionName>) -> usize {
        let scope = match action {
            Some(a) => SandboxScope::Action(a.clone()),
            None => SandboxScope::All,
        };
        self.force_decisions_in(&scope)
    }

    /// [`Controller::force_decisions`] for a [`SandboxScope`].
    pub fn force_decisions_in(&self, scope: &SandboxScope) -> usize {
        let now = self.now();
        let (n, work) = self.state.lock().decide(now, Some(scope));
        info!(decided = n, scope = ?scope, "forced idle decisions");
        self.carry_out(work);
        self.rearm();
        n
    }

    /// Resolves once no checkpoint (make-base or dedup) is in flight or waiting for a slot.
    pub async fn wait_settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().settled() {
                return;
            }
            notified.await;
        }
    }

    /// Node-wide metric handles, registered on first use so that a recorder installed after
    /// [`Controller::new`] (but before the first invocation) still sees them.
    fn metrics(&self) -> &GlobalMetrics {
        self.metrics.get_or_init(GlobalMetrics::new)
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.epoch.elapsed().as_millis() as u64)
    }

    fn instant_of(&self, t: Timestamp) -> Instant {
        self.epoch + Duration::from_millis(t.0)
    }

    /// Background work until `shutdown` is cancelled: puts idle sandboxes to the policy when
    /// their decision time comes (woken at the next decision time, not only by arrivals) and
    /// carries out the decisions, runs the policy's timer, refreshes measured memory and the
    /// sandbox/memory gauges every `memory_refresh_ms`.
    pub async fn run_timers(self: Arc<Self>, shutdown: CancellationToken) {
        let refresh = Duration::from_millis(self.cfg.memory_refresh_ms.max(50));
        let mut next_refresh = Instant::now() + refresh;
        loop {
            let now = self.now();
            let work = {
                let mut st = self.state.lock();
                let (_, mut work) = st.decide(now, None);
                work.prewarms = st.tick(now);
                work
            };
            self.carry_out(work);
            if Instant::now() >= next_refresh {
                self.refresh_memory().await;
                self.update_gauges();
                next_refresh = Instant::now() + refresh;
            }
            let next = self.state.lock().next_deadline();
            let mut deadline = next_refresh;
            if let Some(t) = next {
                deadline = deadline.min(self.instant_of(t));
                self.armed.store(t.0, Ordering::Relaxed);
            } else {
                self.armed.store(u64::MAX, Ordering::Relaxed);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.wake.notified() => {}
            }
        }
        debug!("controller timers stopped");
    }

    /// Wakes the timer task if a decision is now due earlier than it planned.
    fn rearm(&self) {
        let next = self.state.lock().next_deadline();
        if let Some(t) = next
            && t.0 < self.armed.load(Ordering::Relaxed)
        {
            self.wake.notify_one();
        }
    }

    /// Refreshes the measured memory of every sandbox now (also done by [`Self::run_timers`]).
    pub async fn refresh_memory(&self) {
        let n = self.nodes.read().len();
        for i in 0..n {
            self.refresh_node(i).await;
        }
    }

    /// Refreshes the measured memory of node `i`'s sandboxes now.
    async fn refresh_node(&self, i: usize) {
        let Some(node) = self.nodes.read().get(i).cloned() else {
            return;
        };
        if !self.state.lock().alive.get(i).copied().unwrap_or(false) {
            return; // Dead: its calls fail at once; nothing to learn.
        }
        let asked_at = self.now();
        match node.agent.execute(Command::Status).await {
            Ok(Reply::Status(status)) => {
                self.metrics()
                    .armed(&node.id.to_string(), &status.sandboxes);
                let jobs = {
                    let mut st = self.state.lock();
                    let (_, jobs) = st.apply_status(i, &status, asked_at);
                    jobs
                };
                self.carry_out(Work {
                    purges: jobs,
                    ..Work::default()
                });
                self.pump();
            }
            Ok(other) => warn!(node = %node.id, reply = ?other, "unexpected reply to status"),
            Err(e) => warn!(node = %node.id, error = %e, "node status failed"),
        }
    }

    fn update_gauges(&self) {
        let unowned: u64 = self.state.lock().unowned.iter().sum();
        self.metrics().unowned(unowned as f64);
        let (n, mem) = self.state.lock().census();
        for i in 0..StateKind::ALL.len() {
            self.metrics().sandboxes[i].set(n[i] as f64);
            self.metrics().memory[i].set(mem[i] as f64);
        }
    }

    /// Refuses new invocations, fails waiting ones and destroys every live sandbox (bases
    /// last). Dedup sandboxes, and the bases they depend on, are left to their node, which keeps
    /// them across its restart (`medes_agent::Agent::shutdown`); the next controller adopts
    /// them ([`Controller::reconcile`]).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let jobs: Vec<(bool, PurgeJob)> = {
            let mut st = self.state.lock();
            st.waiters.clear();
            st.ckpt_queue.clear();
            let keys: Vec<Key> = st.sbs.keys().copied().collect();
            let keys: Vec<Key> = keys
                .into_iter()
                .filter(|&k| !st.kept_at_shutdown(k))
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    let base = st.sbs.get(&k).is_some_and(|s| s.form == Form::Base);
                    st.start_purge(k)
                        .or_else(|| {
                            // Already purging: destroy it again to be sure (unknown ids are fine).
                            st.sbs.get(&k).map(|s| PurgeJob {
                                key: k,
                                node: s.node,
                                id: s.id.clone(),
                            })
                        })
                        .map(|j| (base, j))
                })
                .collect()
        };
        let n = jobs.len();
        let (bases, others): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(b, _)| *b);
        futures::future::join_all(others.into_iter().map(|(_, j)| self.purge(j))).await;
        futures::future::join_all(bases.into_iter().map(|(_, j)| self.purge(j))).await;
        self.update_gauges();
        self.settled.notify_waiters();
        info!(sandboxes = n, "controller shut down");
    }

    /// Spawns the background work produced under the lock.
    fn carry_out(&self, work: Work) {
        if work.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        for job in work.purges {
            let me = me.clone();
            tokio::spawn(async move { me.purge(job).await });
        }
        for job in work.checkpoints {
            let me = me.clone();
            tokio::spawn(async move { me.checkpoint(job).await });
        }
        for job in work.prewarms {
            let me = me.clone();
            tokio::spawn(async move { me.prewarm(job).await });
        }
    }

    fn purge_in_background(&self, job: PurgeJob) {
        self.carry_out(Work {
            purges: vec![job],
            ..Work::default()
        });
    }

    /// Serves waiting invocations and starts waiting checkpoints (memory or slots may be free).
    fn pump(&self) {
        let now = self.now();
        let checkpoints = {
            let mut st = self.state.lock();
            st.pump(now);
            let jobs = st.start_checkpoints(now);
            if jobs.is_empty() && st.settled() {
                self.settled.notify_waiters();
            }
            jobs
        };
        self.carry_out(Work {
            checkpoints,
            ..Work::default()
        });
        self.rearm();
    }

    async fn purge(&self, job: PurgeJob) {
        let agent = &self.node(job.node).agent;
        match agent
            .execute(Command::Purge {
                sandbox: job.id.clone(),
            })
            .await
        {
            Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
            Err(AgentError::BaseInUse { dependents, .. })
                if !self.shutting_down.load(Ordering::Relaxed) =>
            {
                warn!(sandbox = %job.id, dependents, "node keeps a base its dedup sandboxes need; it stays a base");
                self.state.lock().purge_refused(job.key, self.now());
                self.rearm();
                return;
            }
            Err(e) => warn!(sandbox = %job.id, error = %e, "purging sandbox failed"),
        }
        self.state.lock().take(job.key);
        self.pump();
    }

    /// Forgets a sandbox its node already destroyed (or never made) and serves waiters.
    fn forget(&self, key: Key) {
        self.state.lock().take(key);
        self.pump();
    }

    fn after_run(&self, key: Key, exec_ms: Option<f64>) {
        let now = self.now();
        let job = self.state.lock().finished(key, now, exec_ms);
        if let Some(job) = job {
            self.purge_in_background(job);
        }
        self.pump();
    }

    /// Carries out a checkpoint decided by the policy, in the background.
    async fn checkpoint(&self, job: CheckpointJob) {
        let agent = &self.node(job.node).agent;
        let cmd = match job.purpose {
            Purpose::Base => Command::MakeBase {
                sandbox: job.id.clone(),
            },
            Purpose::Dedup => Command::Dedup {
                sandbox: job.id.clone(),
            },
        };
        let t0 = Instant::now();
        let bound = Duration::from_millis(
            self.cfg
                .checkpoint_timeout_ms
                .saturating_add(self.cfg.agent_grace_ms),
        );
        let reply = tokio::time::timeout(bound, agent.execute(cmd)).await;
        let secs = t0.elapsed().as_secs_f64();
        let outcome = match reply {
            Ok(Ok(Reply::BaseReady(r))) if job.purpose == Purpose::Base => {
                self.metrics().bases.increment(1);
                self.state.lock().stats.bases += 1;
                self.metrics().checkpoint[0].record(secs);
                CheckpointOutcome::Base(r)
            }
            Ok(Ok(Reply::Deduped(r))) if job.purpose == Purpose::Dedup => {
                self.metrics().dedups.increment(1);
                self.state.lock().stats.dedups += 1;
                self.metrics().checkpoint[1].record(secs);
                CheckpointOutcome::Dedup(r)
            }
            Ok(Ok(other)) => {
                warn!(sandbox = %job.id, reply = reply_name(&other), "unexpected reply to a checkpoint; purging the sandbox");
                self.dedup_failure("unexpected_reply");
                CheckpointOutcome::Failed { alive: None }
            }
            Ok(Err(e)) => {
                let label = checkpoint_failure_label(&e);
                let alive = match &e {
                    AgentError::NotDeduplicable { sandbox_alive, .. } => Some(*sandbox_alive),
                    AgentError::UnknownSandbox(_) => Some(false),
                    AgentError::WrongForm { .. } => Some(true),
                    _ => Some(true),
                };
                warn!(sandbox = %job.id, action = %job.action, purpose = ?job.purpose, reason = label, error = %e, "sandbox cannot be checkpointed; it is never tried again");
                self.dedup_failure(label);
                CheckpointOutcome::Failed { alive }
            }
            Err(_) => {
                warn!(sandbox = %job.id, action = %job.action, purpose = ?job.purpose, "checkpoint did not finish in time; purging the sandbox");
                self.dedup_failure("timeout");
                CheckpointOutcome::Failed { alive: None }
            }
        };
        let made_base = matches!(outcome, CheckpointOutcome::Base(_));
        let (purge, release) = {
            let now = self.now();
            let mut st = self.state.lock();
            let purge = st.checkpoint_done(job.key, outcome, now);
            let release = if made_base && purge.is_none() {
                st.release_base(job.key, now)
            } else {
                None
            };
            (purge, release)
        };
        if let Some(p) = purge {
            self.purge_in_background(p);
        }
        if let Some((id, node)) = release {
            self.release_base_process(job.key, id, node).await;
        }
        self.pump();
        if self.state.lock().settled() {
            self.settled.notify_waiters();
        }
    }

    /// Has `node` end the process of the base `id` (already a base without process in the
    /// books, `State::release_base`); if the node refuses, the base keeps its process.
    async fn release_base_process(&self, key: Key, id: SandboxId, node: usize) {
        let agent = self.node(node).agent.clone();
        let bound = Duration::from_millis(self.cfg.agent_grace_ms.max(1000));
        match tokio::time::timeout(
            bound,
            agent.execute(Command::ReleaseBase {
                sandbox: id.clone(),
            }),
        )
        .await
        {
            Ok(Ok(_)) => {
                self.state.lock().stats.released_bases += 1;
            }
            Ok(Err(e)) => {
                warn!(sandbox = %id, error = %e, "node did not release the base's process; it keeps it");
                self.state.lock().unrelease_base(key);
            }
            Err(_) => {
                warn!(sandbox = %id, "releasing the base's process did not finish in time; it keeps it");
                self.state.lock().unrelease_base(key);
            }
        }
    }

    fn dedup_failure(&self, label: &'static str) {
        self.metrics().dedup_failure(label);
        *self
            .state
            .lock()
            .stats
            .dedup_failures
            .entry(label.to_string())
            .or_default() += 1;
    }

    /// Starts a sandbox the policy asked to pre-warm.
    async fn prewarm(&self, job: PrewarmJob) {
        let agent = &self.node(job.node).agent;
        for v in job.victims {
            self.metrics().evictions.increment(1);
            match agent.execute(Command::Purge { sandbox: v.clone() }).await {
                Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
                Err(e) => warn!(sandbox = %v, error = %e, "evicting sandbox failed"),
            }
        }
        let a = &job.action;
        let spawn = agent
            .execute(Command::Spawn(SpawnCommand {
                sandbox: job.id.clone(),
                action: a.name.clone(),
                version: a.version.clone(),
                code: a.exec.code.clone(),
                main: a.exec.main.clone(),
                memory_limit: Bytes::mib(a.limits.memory_mb),
                env: static_env(a),
                init_timeout_ms: a.limits.timeout_ms,
            }))
            .await;
        match spawn {
            Ok(Reply::Spawned(r)) if r.init_error.is_none() => {
                self.metrics().prewarms.increment(1);
                let mut st = self.state.lock();
                st.stats.prewarms += 1;
                st.prewarmed(job.key, self.now());
                drop(st);
                self.pump();
            }
            other => {
                debug!(sandbox = %job.id, action = %a.name, outcome = ?other.map(|r| reply_name(&r)), "pre-warm failed");
                self.forget(job.key);
            }
        }
    }

    async fn wait_for_grant(
        &self,
        mut rx: oneshot::Receiver<Grant>,
        ticket: u64,
        need: u64,
    ) -> Result<Grant, InvokeError> {
        let wait = Duration::from_millis(self.cfg.admission_wait_ms);
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(g)) => Ok(g),
            Ok(Err(_)) => Err(InvokeError::ShuttingDown),
            Err(_) => {
                let mut st = self.state.lock();
                if let Some(pos) = st.waiters.iter().position(|w| w.ticket == ticket) {
                    st.waiters.remove(pos);
                    drop(st);
                    self.pump();
                    self.metrics().rejections.increment(1);
                    return Err(InvokeError::NoCapacity(self.no_capacity_message(need)));
                }
                drop(st);
                rx.try_recv().map_err(|_| InvokeError::ShuttingDown)
            }
        }
    }

    fn no_capacity_message(&self, need: u64) -> String {
        let (dead, nodes) = {
            let st = self.state.lock();
            (st.alive.iter().filter(|a| !**a).count(), st.alive.len())
        };
        if dead > 0 {
            return format!(
                "no live node has room for a sandbox of {} MiB within {} ms ({dead} of {nodes} nodes are dead: they missed their heartbeats); retry later",
                need >> 20,
                self.cfg.admission_wait_ms,
            );
        }
        format!(
            "no node has room for a sandbox of {} MiB within {} ms: the node memory budget of {} MiB is in use by running sandboxes; retry later",
            need >> 20,
            self.cfg.admission_wait_ms,
            self.max_budget.load(Ordering::Relaxed) >> 20
        )
    }

    /// A sandbox for `action`: warm, else dedup (if `allow_restore`), else cold; waits (FIFO,
    /// bounded) for memory.
    async fn acquire(
        &self,
        action: &Arc<Action>,
        allow_restore: bool,
    ) -> Result<Grant, InvokeError> {
        let need = Bytes::mib(action.limits.memory_mb).0;
        let concurrency = action.limits.concurrency.max(1);
        let queued = {
            let mut st = self.state.lock();
            let now = self.now();
            let grant = match st.try_assign(
                &action.name,
                &action.version,
                concurrency,
                allow_restore,
                now,
            ) {
                Some(g) => Some(g),
                None if st.waiters.is_empty() => {
                    let version: Arc<str> = Arc::from(action.version.as_str());
                    st.try_admit(&action.name, &version, need, now)
                }
                None => None,
            };
            match grant {
                Some(g) => Ok(g),
                None if st.waiters.len() >= self.cfg.max_waiting => Err(None),
                None => {
                    let (tx, rx) = oneshot::channel();
                    let ticket = st.next_ticket;
                    st.next_ticket += 1;
                    st.waiters.push_back(Waiter {
                        ticket,
                        action: action.name.clone(),
                        version: Arc::from(action.version.as_str()),
                        need,
                        concurrency,
                        allow_restore,
                        tx,
                    });
                    Err(Some((rx, ticket)))
                }
            }
        };
        match queued {
            Ok(g) => Ok(g),
            Err(Some((rx, ticket))) => {
                debug!(action = %action.name, "waiting for memory");
                self.wait_for_grant(rx, ticket, need).await
            }
            Err(None) => {
                self.metrics().rejections.increment(1);
                Err(InvokeError::NoCapacity(self.no_capacity_message(need)))
            }
        }
    }

    async fn evict(&self, node: usize, victims: Vec<SandboxId>) {
        let agent = &self.node(node).agent;
        for v in victims {
            self.metrics().evictions.increment(1);
            match agent.execute(Command::Purge { sandbox: v.clone() }).await {
                Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
                Err(e) => warn!(sandbox = %v, error = %e, "evicting sandbox failed"),
            }
        }
    }

    /// A dedup start: restores the sandbox; on failure counts it and forgets the sandbox.
    async fn restore(
        &self,
        key: Key,
        id: &SandboxId,
        node: usize,
        arrival: Instant,
    ) -> RestoreResult {
        let agent = &self.node(node).agent;
        let bound = Duration::from_millis(
            self.cfg
                .restore_timeout_ms
                .saturating_add(self.cfg.agent_grace_ms),
        );
        let reply = tokio::time::timeout(
            bound,
            agent.execute(Command::Restore {
                sandbox: id.clone(),
            }),
        )
        .await;
        let (label, gone, detail) = match reply {
            Ok(Ok(Reply::Restored(r))) => {
                let secs = arrival.elapsed().as_secs_f64();
                let m = self.metrics();
                m.dedup_start.record(secs);
                for (h, ms) in m.restore_phases.iter().zip([
                    r.read_base_ms,
                    r.rebuild_ms,
                    r.restore_ms,
                    r.total_ms,
                ]) {
                    h.record(ms / 1000.0);
                }
                debug!(sandbox = %id, read_base_ms = r.read_base_ms, rebuild_ms = r.rebuild_ms, restore_ms = r.restore_ms, total_ms = r.total_ms, start_ms = secs * 1000.0, "dedup start");
                let mut st = self.state.lock();
                st.stats.dedup_starts += 1;
                st.restored(key, self.now(), r, secs * 1000.0);
                return RestoreResult::Ok;
            }
            Ok(Ok(other)) => ("unexpected_reply", false, reply_name(&other).to_string()),
            Ok(Err(e)) => {
                let gone = matches!(
                    e,
                    AgentError::RestoreFailed { .. } | AgentError::UnknownSandbox(_)
                );
                (restore_failure_label(&e), gone, e.to_string())
            }
            Err(_) => (
                "timeout",
                false,
                format!("no answer within {} ms", bound.as_millis()),
            ),
        };
        warn!(sandbox = %id, reason = label, error = %detail, "dedup start failed; falling back to a cold start");
        self.metrics().dedup_start_failure(label);
        *self
            .state
            .lock()
            .stats
            .dedup_start_failures
            .entry(label.to_string())
            .or_default() += 1;
        let job = self.state.lock().restore_failed(key, gone);
        if let Some(job) = job {
            self.purge_in_background(job);
        }
        self.pump();
        RestoreResult::Failed
    }

    async fn invoke_inner(self: Arc<Self>, req: InvokeRequest) -> Result<Activation, InvokeError> {
        self.invoke_attempt(req, None).await
    }

    /// One attempt at an invocation; `retry` is `Some(first arrival)` for the one retry of a
    /// run whose node refused the connection (the run was never delivered: nothing ran).
    async fn invoke_attempt(
        self: Arc<Self>,
        req: InvokeRequest,
        retry: Option<Instant>,
    ) -> Result<Activation, InvokeError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(InvokeError::ShuttingDown);
        }
        let arrival = retry.unwrap_or_else(Instant::now);
        // Kept for the one retry of an undelivered run (the run command consumes `req`).
        let again = retry.is_none().then(|| req.clone());
        let action = req.action.clone();
        let limits = action.limits;
        let need = Bytes::mib(limits.memory_mb).0;
        let max_budget = self.max_budget.load(Ordering::Relaxed);
        if need > max_budget {
            self.metrics().rejections.increment(1);
            return Err(InvokeError::Rejected(format!(
                "the action's memory limit of {} MiB exceeds the node memory budget of {} MiB",
                limits.memory_mb,
                max_budget >> 20
            )));
        }
        let metrics = {
            let mut st = self.state.lock();
            if retry.is_none() {
                st.arrival(&action, self.now());
            }
            st.pool(&action.name).metrics.clone()
        };
        let mut grant = self.acquire(&action, true).await?;

        let start = unix_now();
        let mut act = Activation {
            id: req.id.clone(),
            action: action.name.clone(),
            version: action.version.clone(),
            subject: req.subject.clone(),
            start,
            end: start,
            response: ActivationResponse {
                status: ActivationStatus::Success,
                result: serde_json::Value::Null,
            },
            logs: Vec::new(),
            start_kind: StartKind::Warm,
            init_time_ms: None,
            wait_time_ms: start.saturating_sub(req.arrived),
            main_ms: None,
            timeout: false,
            limits,
            node: None,
        };
        let mut logs = LogBuilder::new((limits.logs_kb as usize).saturating_mul(1024));

        // A cold start whose node died before the action ran is retried once elsewhere.
        let mut retried = false;
        let (key, sandbox, node) = loop {
            match grant {
                Grant::Warm { key, id, node } => {
                    act.start_kind = StartKind::Warm;
                    self.state
                        .lock()
                        .warm_started(&action.name, arrival.elapsed().as_secs_f64() * 1000.0);
                    break (key, id, node);
                }
                Grant::Restore {
                    key,
                    id,
                    node,
                    victims,
                } => {
                    self.evict(node, victims).await;
                    match self.restore(key, &id, node, arrival).await {
                        RestoreResult::Ok => {
                            act.start_kind = StartKind::Dedup;
                            break (key, id, node);
                        }
                        RestoreResult::Failed => {
                            grant = self.acquire(&action, false).await?;
                        }
                    }
                }
                Grant::Cold {
                    key,
                    mut id,
                    node,
                    victims,
                } => {
                    act.start_kind = StartKind::Cold;
                    self.evict(node, victims).await;
                    if self.template_wanted(&action)
                        && self.templates.ready(node, &action.name, &action.version)
                    {
                        match self.template_start(key, &id, node, &action, arrival).await {
                            None => {
                                act.start_kind = StartKind::Template;
                                break (key, id, node);
                            }
                            // The fallback cold start gets a fresh id (`template.rs`).
                            Some(fresh) => id = fresh,
                        }
                    }
                    let agent = &self.node(node).agent;
                    let t0 = Instant::now();
                    let spawn = agent
                        .execute(Command::Spawn(SpawnCommand {
                            sandbox: id.clone(),
                            action: action.name.clone(),
                            version: action.version.clone(),
                            code: action.exec.code.clone(),
                            main: action.exec.main.clone(),
                            memory_limit: Bytes(need),
                            env: static_env(&action),
                            init_timeout_ms: limits.timeout_ms,
                        }))
                        .await;
                    act.init_time_ms = Some(t0.elapsed().as_millis() as u64);
                    act.node = Some(self.node(node).id);
                    let dead = || !self.state.lock().alive.get(node).copied().unwrap_or(true);
                    let refused = matches!(spawn, Err(AgentError::NotDelivered(_)));
                    if refused {
                        self.shun(node);
                    }
                    if !retried
                        && (refused || (matches!(spawn, Err(AgentError::Unavailable(_))) && dead()))
                    {
                        warn!(action = %action.name, sandbox = %id, node = %self.node(node).id,
                              "node died during a cold start; retrying once on a live node");
                        retried = true;
                        self.forget(key);
                        grant = self.acquire(&action, true).await?;
                        continue;
                    }
                    let failure = match spawn {
                        Ok(Reply::Spawned(r)) => {
                            logs.extend(r.logs);
                            r.init_error
                                .map(|msg| (ActivationStatus::DeveloperError, msg))
                        }
                        Ok(other) => Some((
                            ActivationStatus::InternalError,
                            format!("unexpected reply from node agent: {}", reply_name(&other)),
                        )),
                        Err(e) => {
                            warn!(action = %action.name, sandbox = %id, error = %e, "cold start failed");
                            Some((
                                ActivationStatus::InternalError,
                                format!("Failed to start a sandbox: {e}"),
                            ))
                        }
                    };
                    if let Some((status, msg)) = failure {
                        self.forget(key);
                        act.response = ActivationResponse {
                            status,
                            result: error_result(msg),
                        };
                        return Ok(finish_activation(act, logs, arrival, &metrics));
                    }
                    self.state.lock().started(
                        key,
                        self.now(),
                        arrival.elapsed().as_secs_f64() * 1000.0,
                    );
                    self.template_before_first_run(node, &id, &action).await;
                    break (key, id, node);
                }
            }
        };
        act.node = Some(self.node(node).id);
        self.metrics()
            .start_latency(act.start_kind, arrival.elapsed().as_secs_f64());

        let deadline = unix_now().saturating_add(limits.timeout_ms);
        let mut env = BTreeMap::new();
        env.insert("__OW_ACTIVATION_ID".to_string(), req.id.0.clone());
        env.insert("__OW_DEADLINE".to_string(), deadline.to_string());
        env.insert("__OW_API_KEY".to_string(), req.api_key);
        env.insert("__OW_API_HOST".to_string(), self.cfg.api_host.clone());
        let run = self.node(node).agent.execute(Command::Run(RunCommand {
            sandbox: sandbox.clone(),
            params: req.params,
            env,
            timeout_ms: limits.timeout_ms,
        }));
        let bound =
            Duration::from_millis(limits.timeout_ms.saturating_add(self.cfg.agent_grace_ms));
        let reply = tokio::time::timeout(bound, run).await;
        // What becomes of the sandbox: kept, already gone, or to be purged.
        enum After {
            Keep,
            Gone,
            Purge,
        }
        let after = match reply {
            Ok(Ok(Reply::Ran(r))) => {
                logs.extend(r.logs);
                act.main_ms = r.main_ms;
                let lost = r.outcome.sandbox_lost();
                if lost {
                    debug!(sandbox = %sandbox, outcome = ?r.outcome, "sandbox lost in run");
                }
                let (status, result, timeout) = classify(r.outcome);
                act.response = ActivationResponse { status, result };
                act.timeout = timeout;
                if lost { After::Gone } else { After::Keep }
            }
            Ok(Ok(other)) => {
                act.response = internal(format!(
                    "unexpected reply from node agent: {}",
                    reply_name(&other)
                ));
                After::Purge
            }
            Ok(Err(AgentError::UnknownSandbox(_))) => {
                act.response = internal("The action's sandbox disappeared.".to_string());
                After::Gone
            }
            Ok(Err(AgentError::NotDelivered(e))) if again.is_some() => {
                // The run never reached its node (connection refused): nothing ran, so it is
                // tried once more elsewhere; this sandbox and its node are out of reach.
                warn!(sandbox = %sandbox, error = %e, "run not delivered; retrying once elsewhere");
                self.shun(node);
                self.forget(key);
                if let Some(again) = again {
                    return Box::pin(self.clone().invoke_attempt(again, Some(arrival))).await;
                }
                act.response = internal(format!("Running the action failed: {e}"));
                After::Gone
            }
            Ok(Err(e)) => {
                warn!(sandbox = %sandbox, error = %e, "run failed at the node agent");
                act.response = internal(format!("Running the action failed: {e}"));
                After::Purge
            }
            Err(_) => {
                warn!(sandbox = %sandbox, "node agent did not answer a run in time");
                act.response = internal(format!(
                    "The node agent did not answer within {} ms.",
                    bound.as_millis()
                ));
                After::Purge
            }
        };
        if matches!(after, After::Keep)
            && act.start_kind == StartKind::Cold
            && act.response.status == ActivationStatus::Success
            && self.template_warmup(&action)
        {
            self.maybe_make_template(node, &sandbox, &action);
        }
        match after {
            After::Keep => self.after_run(key, act.main_ms),
            After::Gone => self.forget(key),
            After::Purge => {
                let job = self.state.lock().start_purge(key);
                match job {
                    Some(job) => self.purge_in_background(job),
                    None => self.forget(key),
                }
            }
        }
        Ok(finish_activation(act, logs, arrival, &metrics))
    }
}

fn finish_activation(
    mut act: Activation,
    logs: LogBuilder,
    arrival: Instant,
    metrics: &ActionMetrics,
) -> Activation {
    act.end = unix_now().max(act.start);
    act.logs = logs.finish();
    metrics.record(
        act.start_kind,
        act.response.status,
        arrival.elapsed().as_secs_f64(),
    );
    act
}

fn internal(msg: String) -> ActivationResponse {
    ActivationResponse {
        status: ActivationStatus::InternalError,
        result: error_result(msg),
    }
}

fn reply_name(r: &Reply) -> &'static str {
    match r {
        Reply::Spawned(_) => "spawned",
        Reply::Ran(_) => "ran",
        Reply::Purged => "purged",
        Reply::Status(_) => "status",
        Reply::BaseReady(_) => "base_ready",
        Reply::Deduped(_) => "deduped",
        Reply::Restored(_) => "restored",
        Reply::TemplateReady(_) => "template_ready",
        Reply::TemplateStarted(_) => "template_started",
    }
}

/// A short random prefix for sandbox ids, so ids of one controller run never collide with
/// leftovers of another.
struct ActivationIdPrefix(String);

impl ActivationIdPrefix {
    fn new() -> Self {
        ActivationIdPrefix(format!("sb{}", &medes_core::ActivationId::random().0[..8]))
    }
}

impl medes_policy::PolicyControl for Controller {
    fn policy_settings(&self) -> PolicySettings {
        Controller::policy_settings(self)
    }
    fn set_policy_settings(&self, settings: PolicySettings) -> Result<PolicySettings, KnobError> {
        Controller::set_policy_settings(self, settings)
    }
}

impl Invoker for Controller {
    fn invoke(&self, req: InvokeRequest) -> BoxFuture<'static, Result<Activation, InvokeError>> {
        let Some(me) = self.me.upgrade() else {
            return futures::future::ready(Err(InvokeError::ShuttingDown)).boxed();
        };
        let task = tokio::spawn(me.invoke_inner(req));
        task.map(|r| match r {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "invocation task failed");
                Err(InvokeError::ShuttingDown)
            }
        })
        .boxed()
    }

    fn action_changed(&self, name: &ActionName) {
        self.templates.forget(name);
        self.sync_template_bases();
        let jobs = self.state.lock().action_changed(name);
        if !jobs.is_empty() {
            debug!(action = %name, n = jobs.len(), "purging idle sandboxes of an old version");
        }
        self.carry_out(Work {
            purges: jobs,
            ..Work::default()
        });
    }

    fn force_decisions(&self, scope: SandboxScope) -> BoxFuture<'static, usize> {
        futures::future::ready(self.force_decisions_in(&scope)).boxed()
    }

    fn wait_settled(&self) -> BoxFuture<'static, ()> {
        let Some(me) = self.me.upgrade() else {
            return futures::future::ready(()).boxed();
        };
        async move { Controller::wait_settled(&me).await }.boxed()
    }

    fn sandbox_states(&self, scope: &SandboxScope) -> Vec<SandboxSummary> {
        self.sandboxes()
            .into_iter()
            .filter(|s| scope.covers(&s.action))
            .map(|s| SandboxSummary {
                id: s.id,
                action: s.action,
                state: s.state.as_str().to_string(),
            })
            .collect()
    }
}

/// What [`Controller::reconcile`] did with the sandboxes the nodes reported at startup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Dedup sandboxes of known, unchanged actions, now DEDUP in the books (keep-dedup
    /// restarted).
    pub adopted: usize,
    /// Sandboxes purged, by reason (`unknown_action`, `stale_version`, `no_metadata`,
    /// `unknown_live`).
    pub purged: BTreeMap<String, u64>,
    /// Bases whose process is gone, left to their node (they retire once no dedup sandbox
    /// depends on them; their memory is charged to the node meanwhile).
    pub left: usize,
}

impl Controller {
    /// Startup reconciliation (issue 5): asks every node what it holds (dedup sandboxes and
    /// bases an earlier agent kept on its tmpfs) and takes dedup sandboxes of known, unchanged
    /// actions into the books as DEDUP, their keep-dedup timer restarting now; unknown or stale
    /// ones (the action is gone, or its version changed) are purged. `current` gives an
    /// action's stored definition. Call once, after [`Controller::new`] and before serving.
    pub async fn reconcile(
        &self,
        current: &(dyn Fn(&ActionName) -> Option<Action> + Sync),
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let nodes = self.nodes.read().clone();
        for (i, node) in nodes.iter().enumerate() {
            let status = match node.agent.execute(Command::Status).await {
                Ok(Reply::Status(s)) => s,
                Ok(other) => {
                    warn!(node = %node.id, reply = reply_name(&other), "unexpected reply to status");
                    continue;
                }
                Err(e) => {
                    warn!(node = %node.id, error = %e, "node status failed; nothing reconciled there");
                    continue;
                }
            };
            // Templates the node kept (issue 8) serve template starts again.
            self.learn_templates(i, &status.templates, Some(current));
            let mut purges = Vec::new();
            for st in &status.sandboxes {
                let action = st.action.as_ref().and_then(current);
                match (State::adoption(st, action.as_ref()), action) {
                    (state::Adoption::Adopt, Some(action)) => {
                        let action = Arc::new(action);
                        let now = self.now();
                        if self.state.lock().adopt_dedup(i, st, &action, now).is_some() {
                            report.adopted += 1;
                            info!(sandbox = %st.id, action = %action.name, version = %action.version,
                                  stored_kb = st.held_bytes >> 10, "dedup sandbox kept by the node resumes as DEDUP");
                        }
                    }
                    (state::Adoption::AdoptLive, Some(action)) => {
                        let action = Arc::new(action);
                        let now = self.now();
                        let adopted = self.state.lock().adopt_live(
                            i,
                            st,
                            &action,
                            (true, st.image_bytes),
                            now,
                        );
                        if adopted.is_some() {
                            report.adopted += 1;
                            info!(sandbox = %st.id, action = %action.name, version = %action.version, form = ?st.form,
                                  "live sandbox kept by the node resumes as WARM");
                        }
                    }
                    (state::Adoption::Purge(reason), _) => {
                        *report.purged.entry(reason.to_string()).or_default() += 1;
                        info!(sandbox = %st.id, action = ?st.action.as_ref().map(|a| a.to_string()),
                              version = ?st.version, reason, "sandbox kept by the node is purged");
                        purges.push(st.id.clone());
                    }
                    (state::Adoption::AdoptKeptBase, Some(action)) => {
                        let action = Arc::new(action);
                        let now = self.now();
                        let adopted = self.state.lock().adopt_kept_base(i, st, &action, now);
                        if adopted.is_some() {
                            report.adopted += 1;
                            info!(sandbox = %st.id, action = %action.name, version = %action.version,
                                  "base kept by the node (without process) is its function's base again");
                        }
                    }
                    (
                        state::Adoption::Leave
                        | state::Adoption::Adopt
                        | state::Adoption::AdoptLive
                        | state::Adoption::AdoptKeptBase,
                        _,
                    ) => report.left += 1,
                }
            }
            for id in purges {
                match node
                    .agent
                    .execute(Command::Purge {
                        sandbox: id.clone(),
                    })
                    .await
                {
                    Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
                    Err(e) => warn!(sandbox = %id, error = %e, "purging a kept sandbox failed"),
                }
            }
        }
        // Charge what the nodes hold now (stores, kept bases) and arm the timers.
        self.refresh_memory().await;
        self.update_gauges();
        self.rearm();
        self.wake.notify_one();
        info!(adopted = report.adopted, purged = ?report.purged, left = report.left, "reconciled with the nodes");
        report
    }

    /// m_R of `action` as the controller reserves it for a dedup start: the measured restore
    /// transient (EWMA of the agent's [`RestoreReply::transient_bytes`]) once a dedup start was
    /// measured, else the last page image; `None` before either.
    pub fn restore_transient(&self, action: &ActionName) -> Option<(Bytes, bool)> {
        let st = self.state.lock();
        let p = st.pools.get(action)?;
        p.m_restore
            .get()
            .map(|v| (Bytes(v as u64), p.m_restore_measured))
    }

    /// Memory charged on each node for sandboxes the controller does not know of (bases whose
    /// process is gone while dedup sandboxes depend on them), in node order.
    pub fn unowned_memory(&self) -> Vec<Bytes> {
        self.state
            .lock()
            .unowned
            .iter()
            .map(|&u| Bytes(u))
            .collect()
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_template;
