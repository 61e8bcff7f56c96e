//! The scheduler: decides which sandbox serves each invocation and builds the activation record.
//!
//! [`Controller`] implements [`medes_core::Invoker`]. For each invocation it picks an idle warm
//! sandbox of the same action version (a *warm start*), or reserves the action's memory limit on
//! a node and has that node's agent create and initialise a new sandbox (a *cold start*). It
//! enforces a per-node memory budget: a cold start that does not fit evicts least recently used
//! idle sandboxes; if nothing can be evicted the invocation waits (bounded, FIFO) and then fails
//! with [`InvokeError::NoCapacity`]. A background task ([`Controller::run_timers`]) refreshes the
//! measured memory of sandboxes and destroys idle ones when the [`Policy`] says so (today: a fixed
//! keep-alive, 10 minutes by default).
//!
//! ```no_run
//! # async fn demo(agent: medes_agent::Agent) {
//! use std::sync::Arc;
//! use medes_controller::{Controller, ControllerConfig};
//! let ctl = Controller::new(ControllerConfig::default(), vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)]);
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let timers = tokio::spawn(ctl.clone().run_timers(shutdown.clone()));
//! // ... serve invocations through `ctl` (an `Arc<dyn Invoker>`) ...
//! shutdown.cancel();
//! let _ = timers.await;
//! ctl.shutdown().await;
//! agent.shutdown().await;
//! # }
//! ```
//!
//! # Design
//! - All bookkeeping sits behind one mutex that is held only for short, synchronous sections
//!   (a few microseconds): never across an await. The agent is called outside it.
//! - Every state change of a sandbox goes through [`medes_policy::SandboxState::apply`]; every
//!   idle-sandbox decision through the [`Policy`] trait, so issue 5 (DEDUP/BASE) and issue 6
//!   (Medes and baseline policies) plug in without touching the scheduling paths.
//! - Each invocation runs on its own task, so a client that disconnects never strands a
//!   reservation or a sandbox.
//! - Memory: admission charges a new sandbox its full memory limit; once the node reports its
//!   measured PSS (every `memory_refresh_ms`), the sandbox is charged that, capped at its limit.
//!
//! # What this crate does not do
//! No HTTP or OpenWhisk JSON (that is `medes-api`), no persistence of activations (the caller
//! stores what [`Invoker::invoke`] returns), no sandboxes of its own (agents own them).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod activation;
mod metrics;
mod state;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use medes_agent::{AgentError, Command, NodeAgent, Reply, RunCommand, SpawnCommand};
use medes_core::{
    ActionName, Activation, ActivationResponse, ActivationStatus, Bytes, InvokeError,
    InvokeRequest, Invoker, NodeId, SandboxId, StartKind, UnixMillis, static_env,
};
use medes_policy::{KeepAlive, Policy, StateKind, Timestamp};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::activation::{LogBuilder, classify, error_result};
use crate::metrics::{ActionMetrics, GlobalMetrics};
use crate::state::{Grant, Key, PurgeJob, State, Waiter};

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// How long an idle sandbox is kept warm, seconds. Default 600 (OpenWhisk's 10 minutes).
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
        }
    }
}

/// A snapshot of one sandbox, for tests, debugging and metrics.
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
    /// Lifecycle state.
    pub state: StateKind,
    /// Invocations running in it.
    pub in_flight: u32,
    /// How long it has been idle, ms (warm sandboxes).
    pub idle_ms: Option<u64>,
    /// Memory charged against the node budget.
    pub charged: Bytes,
    /// Last measured PSS.
    pub measured: Option<Bytes>,
    /// The action's memory limit.
    pub memory_limit: Bytes,
}

struct Node {
    id: NodeId,
    agent: Arc<dyn NodeAgent>,
}

/// The scheduler. Create with [`Controller::new`]; use through [`Invoker`].
pub struct Controller {
    cfg: ControllerConfig,
    me: Weak<Controller>,
    nodes: Vec<Node>,
    node_ids: Vec<NodeId>,
    max_budget: u64,
    state: Mutex<State>,
    epoch: Instant,
    wake: Notify,
    armed: AtomicU64,
    shutting_down: AtomicBool,
    metrics: OnceLock<GlobalMetrics>,
}

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

impl Controller {
    /// A controller over the given nodes, with the keep-alive policy from `cfg`.
    pub fn new(
        cfg: ControllerConfig,
        agents: Vec<(NodeId, Arc<dyn NodeAgent>)>,
    ) -> Arc<Controller> {
        let policy = Box::new(KeepAlive::new(cfg.keep_alive_s.saturating_mul(1000)));
        Self::with_policy(cfg, agents, policy)
    }

    /// A controller with an explicit idle-sandbox policy.
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
            policy = policy.name(),
            "controller configured"
        );
        let budgets = vec![budget; agents.len()];
        let prefix = ActivationIdPrefix::new();
        let node_ids: Vec<NodeId> = agents.iter().map(|(id, _)| id.clone()).collect();
        let nodes = agents
            .into_iter()
            .map(|(id, agent)| Node { id, agent })
            .collect();
        Arc::new_cyclic(|me| Controller {
            max_budget: budgets.iter().copied().max().unwrap_or(0),
            state: Mutex::new(State::new(budgets, policy, prefix.0)),
            cfg,
            me: me.clone(),
            nodes,
            node_ids,
            epoch: Instant::now(),
            wake: Notify::new(),
            armed: AtomicU64::new(u64::MAX),
            shutting_down: AtomicBool::new(false),
            metrics: OnceLock::new(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The memory budget of each node.
    pub fn node_budget(&self) -> Bytes {
        Bytes(self.max_budget)
    }

    /// A snapshot of every sandbox, sorted by id.
    pub fn sandboxes(&self) -> Vec<SandboxInfo> {
        let now = self.now();
        self.state.lock().info(&self.node_ids, now)
    }

    /// Memory charged on each node, in node order.
    pub fn memory_used(&self) -> Vec<Bytes> {
        self.state.lock().used.iter().map(|&u| Bytes(u)).collect()
    }

    /// Idle sandboxes evicted to make room so far.
    pub fn evictions(&self) -> u64 {
        self.state.lock().evictions
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

    /// Background work until `shutdown` is cancelled: destroys idle sandboxes when the policy
    /// says so (woken at the next decision time, not only by arrivals), refreshes measured
    /// memory and the sandbox/memory gauges every `memory_refresh_ms`.
    pub async fn run_timers(self: Arc<Self>, shutdown: CancellationToken) {
        let refresh = Duration::from_millis(self.cfg.memory_refresh_ms.max(50));
        let mut next_refresh = Instant::now() + refresh;
        loop {
            let now = self.now();
            let jobs = self.state.lock().expire(now);
            for job in jobs {
                self.purge_in_background(job);
            }
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

    /// Refreshes the measured memory of every sandbox now (also done by [`Self::run_timers`]).
    pub async fn refresh_memory(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            let asked_at = self.now();
            match node.agent.execute(Command::Status).await {
                Ok(Reply::Status(status)) => {
                    let mut st = self.state.lock();
                    let (freed, jobs) = st.apply_status(i, &status, asked_at);
                    if freed {
                        st.pump(self.now());
                    }
                    drop(st);
                    for job in jobs {
                        self.purge_in_background(job);
                    }
                }
                Ok(other) => warn!(node = %node.id, reply = ?other, "unexpected reply to status"),
                Err(e) => warn!(node = %node.id, error = %e, "node status failed"),
            }
        }
    }

    fn update_gauges(&self) {
        let (n, mem) = self.state.lock().census();
        for i in 0..StateKind::ALL.len() {
            self.metrics().sandboxes[i].set(n[i] as f64);
            self.metrics().memory[i].set(mem[i] as f64);
        }
    }

    /// Refuses new invocations, fails waiting ones and destroys every sandbox.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let jobs: Vec<PurgeJob> = {
            let mut st = self.state.lock();
            st.waiters.clear();
            let keys: Vec<Key> = st.sbs.keys().copied().collect();
            keys.into_iter()
                .filter_map(|k| {
                    st.start_purge(k).or_else(|| {
                        // Already purging: destroy it again to be sure (unknown ids are fine).
                        st.sbs.get(&k).map(|s| PurgeJob {
                            key: k,
                            node: s.node,
                            id: s.id.clone(),
                        })
                    })
                })
                .collect()
        };
        let n = jobs.len();
        futures::future::join_all(jobs.into_iter().map(|j| self.purge(j))).await;
        self.update_gauges();
        info!(sandboxes = n, "controller shut down");
    }

    fn purge_in_background(&self, job: PurgeJob) {
        if let Some(me) = self.me.upgrade() {
            tokio::spawn(async move { me.purge(job).await });
        }
    }

    async fn purge(&self, job: PurgeJob) {
        let agent = &self.nodes[job.node].agent;
        match agent
            .execute(Command::Purge {
                sandbox: job.id.clone(),
            })
            .await
        {
            Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
            Err(e) => warn!(sandbox = %job.id, error = %e, "purging sandbox failed"),
        }
        let mut st = self.state.lock();
        st.take(job.key);
        st.pump(self.now());
    }

    /// Forgets a sandbox its node already destroyed (or never made) and serves waiters.
    fn forget(&self, key: Key) {
        let mut st = self.state.lock();
        st.take(key);
        st.pump(self.now());
    }

    fn after_run(&self, key: Key) {
        let now = self.now();
        let mut st = self.state.lock();
        let (job, next) = st.finished(key, now);
        st.pump(now);
        drop(st);
        if let Some(job) = job {
            self.purge_in_background(job);
        }
        if let Some(t) = next
            && t.0 < self.armed.load(Ordering::Relaxed)
        {
            self.wake.notify_one();
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
                    st.pump(self.now());
                    drop(st);
                    self.metrics().rejections.increment(1);
                    return Err(InvokeError::NoCapacity(self.no_capacity_message(need)));
                }
                drop(st);
                rx.try_recv().map_err(|_| InvokeError::ShuttingDown)
            }
        }
    }

    fn no_capacity_message(&self, need: u64) -> String {
        format!(
            "no node has room for a sandbox of {} MiB within {} ms: the node memory budget of {} MiB is in use by running sandboxes; retry later",
            need >> 20,
            self.cfg.admission_wait_ms,
            self.max_budget >> 20
        )
    }

    async fn invoke_inner(self: Arc<Self>, req: InvokeRequest) -> Result<Activation, InvokeError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(InvokeError::ShuttingDown);
        }
        let arrival = Instant::now();
        let action = req.action.clone();
        let limits = action.limits;
        let need = Bytes::mib(limits.memory_mb).0;
        let concurrency = limits.concurrency.max(1);
        if need > self.max_budget {
            self.metrics().rejections.increment(1);
            return Err(InvokeError::Rejected(format!(
                "the action's memory limit of {} MiB exceeds the node memory budget of {} MiB",
                limits.memory_mb,
                self.max_budget >> 20
            )));
        }

        let (queued, metrics) = {
            let mut st = self.state.lock();
            let now = self.now();
            let metrics = st.pool(&action.name).metrics.clone();
            let grant = match st.try_assign(&action.name, &action.version, concurrency) {
                Some(g) => Some(g),
                None if st.waiters.is_empty() => {
                    let version: Arc<str> = Arc::from(action.version.as_str());
                    st.try_admit(&action.name, &version, need, now)
                }
                None => None,
            };
            let queued = match grant {
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
                        tx,
                    });
                    Err(Some((rx, ticket)))
                }
            };
            (queued, metrics)
        };
        let grant = match queued {
            Ok(g) => g,
            Err(Some((rx, ticket))) => {
                debug!(action = %action.name, "waiting for memory");
                self.wait_for_grant(rx, ticket, need).await?
            }
            Err(None) => {
                self.metrics().rejections.increment(1);
                return Err(InvokeError::NoCapacity(self.no_capacity_message(need)));
            }
        };

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

        let (key, sandbox, node) = match grant {
            Grant::Warm { key, id, node } => (key, id, node),
            Grant::Cold {
                key,
                id,
                node,
                victims,
            } => {
                act.start_kind = StartKind::Cold;
                let agent = &self.nodes[node].agent;
                for v in victims {
                    self.metrics().evictions.increment(1);
                    match agent.execute(Command::Purge { sandbox: v.clone() }).await {
                        Ok(_) | Err(AgentError::UnknownSandbox(_)) => {}
                        Err(e) => warn!(sandbox = %v, error = %e, "evicting sandbox failed"),
                    }
                }
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
                act.node = Some(self.nodes[node].id.clone());
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
                self.state.lock().started(key, self.now());
                (key, id, node)
            }
        };
        act.node = Some(self.nodes[node].id.clone());
        self.metrics()
            .start_latency(act.start_kind, arrival.elapsed().as_secs_f64());

        let deadline = unix_now().saturating_add(limits.timeout_ms);
        let mut env = BTreeMap::new();
        env.insert("__OW_ACTIVATION_ID".to_string(), req.id.0.clone());
        env.insert("__OW_DEADLINE".to_string(), deadline.to_string());
        env.insert("__OW_API_KEY".to_string(), req.api_key);
        env.insert("__OW_API_HOST".to_string(), self.cfg.api_host.clone());
        let run = self.nodes[node].agent.execute(Command::Run(RunCommand {
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
        match after {
            After::Keep => self.after_run(key),
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
        let jobs = self.state.lock().action_changed(name);
        if !jobs.is_empty() {
            debug!(action = %name, n = jobs.len(), "purging idle sandboxes of an old version");
        }
        for job in jobs {
            self.purge_in_background(job);
        }
    }
}

#[cfg(test)]
mod tests;
