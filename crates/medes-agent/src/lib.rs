//! The node agent: owns the sandboxes of one node and carries out the controller's commands.
//!
//! The controller never touches a sandbox directly; it sends a [`Command`] through the
//! [`NodeAgent`] trait and gets a [`Reply`] or an [`AgentError`]. [`Agent`] is the local,
//! in-process implementation used by `medes serve`; a later issue puts the same messages on gRPC.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use medes_agent::{Agent, AgentConfig, Command, NodeAgent};
//! let agent = Agent::new(AgentConfig { data_dir: "/var/lib/medes".into(), ..Default::default() })?;
//! let status = agent.execute(Command::Status).await?;
//! agent.shutdown().await;
//! # let _ = status; Ok(()) }
//! ```
//!
//! # Design
//! - The interface is narrow and message-shaped ([`proto`]): plain serde data, a closed command
//!   set, errors as text. Action failures (init errors, exceptions, timeouts, OOM kills) are
//!   *replies*, not errors: they are the action's outcome, and they say whether the sandbox
//!   survived ([`RunOutcome::sandbox_lost`]). A sandbox whose run timed out, ran out of memory,
//!   crashed or broke the protocol is destroyed by the agent itself before it replies.
//! - Each command runs on its own tokio task, so a caller that stops waiting never leaves a
//!   sandbox half made or half destroyed. The sandbox table is locked only to look up, insert or
//!   remove an entry, never across an await.
//! - A sandbox is destroyed by whoever drops the last reference to it after it left the table,
//!   so a purge that races a run destroys the sandbox exactly once, when the run ends.
//! - Action code is written once per action version into `<data_dir>/code/` (see [`AgentConfig`]).
//!
//! # What this crate does not do
//! No scheduling, no memory budget, no keep-alive (the controller decides all of that); no
//! OpenWhisk JSON; no checkpoints yet (issue 5 adds dedup commands).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod code;
pub mod proto;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use medes_core::{Bytes, NodeId, SandboxId};
use medes_sandbox::{InitRequest, RunError, RunRequest, Sandbox, SandboxConfig, SandboxSpec};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use proto::{
    AgentError, BaseReply, Command, DedupReply, LogLine, NodeAgent, NodeStatus, Reply,
    RestoreReply, RunCommand, RunOutcome, RunReply, SandboxForm, SandboxMemory, SandboxStatus,
    SpawnCommand, SpawnReply, Stream,
};

/// Configuration of one node agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's id. Default `node-0`.
    pub node_id: NodeId,
    /// Directory for everything the agent keeps; action code goes to `<data_dir>/code/`.
    /// Default `/var/lib/medes`.
    pub data_dir: PathBuf,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// Cold starts carried out at the same time; more wait. Default 4.
    pub max_concurrent_starts: usize,
    /// Largest total size of an extracted zip action, MiB. Default 512.
    pub max_code_mb: u64,
    /// Most entries in a zip action. Default 20000.
    pub max_code_entries: usize,
    /// Bound on creating a sandbox until its runtime answers (init not included), ms; a start
    /// that takes longer fails the cold start. Default 30000.
    pub start_timeout_ms: u64,
    /// Dedup settings (checkpoints, bases, dedup starts).
    pub dedup: DedupSettings,
}

/// How the agent deduplicates and restores sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupSettings {
    /// Directory (a tmpfs; mounted if it is not one) for checkpoint images, base images and
    /// dedup stores. Default `/run/medes/images`.
    pub images_dir: PathBuf,
    /// Dedup and make-base operations carried out at the same time on this node; more wait.
    /// Default 1 (a node here has 2 cores, one stays for invocations).
    pub max_concurrent_dedups: usize,
    /// One fingerprint registry for all namespaces (true) or one per namespace (false, the
    /// default: shared pages are a side channel between tenants).
    pub share_across_tenants: bool,
    /// The dedup engine's knobs.
    pub engine: medes_dedup::DedupConfig,
    /// Bound on a dedup start (rebuild + restore until the runtime answers), ms. Default 10000.
    pub restore_timeout_ms: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        DedupSettings {
            images_dir: "/run/medes/images".into(),
            max_concurrent_dedups: 1,
            share_across_tenants: false,
            engine: medes_dedup::DedupConfig::default(),
            restore_timeout_ms: 10_000,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_id: NodeId("node-0".into()),
            data_dir: "/var/lib/medes".into(),
            sandbox: SandboxConfig::default(),
            max_concurrent_starts: 4,
            max_code_mb: 512,
            max_code_entries: 20_000,
            start_timeout_ms: 30_000,
            dedup: DedupSettings::default(),
        }
    }
}

/// Creating an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum NewAgentError {
    /// The code directory could not be created.
    #[error("creating the code directory {path:?}")]
    CodeDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The local node agent. Cheap to clone (all clones share one node).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AgentConfig,
    code_root: PathBuf,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Slot>>>,
    starts: Semaphore,
    shutting_down: AtomicBool,
}

/// One live sandbox. Whoever gets it back from `Arc::into_inner` destroys it.
struct Slot {
    sandbox: Sandbox,
}

impl Agent {
    /// An agent for one node; creates `<data_dir>/code` and removes what sandboxes of dead
    /// processes (a crashed earlier agent) left behind. Call [`medes_sandbox::preflight`]
    /// first to check the host.
    pub fn new(cfg: AgentConfig) -> Result<Agent, NewAgentError> {
        let code_root = cfg.data_dir.join("code");
        std::fs::create_dir_all(&code_root).map_err(|source| NewAgentError::CodeDir {
            path: code_root.clone(),
            source,
        })?;
        let stale = medes_sandbox::cleanup_stale(&cfg.sandbox);
        if stale > 0 {
            info!(node = %cfg.node_id, removed = stale, "removed leftovers of earlier sandboxes");
        }
        let starts = Semaphore::new(cfg.max_concurrent_starts.max(1));
        Ok(Agent {
            inner: Arc::new(Inner {
                cfg,
                code_root,
                sandboxes: Mutex::new(HashMap::new()),
                starts,
                shutting_down: AtomicBool::new(false),
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.cfg.node_id
    }

    /// Number of initialised sandboxes on the node.
    pub fn n_sandboxes(&self) -> usize {
        self.inner.sandboxes.lock().len()
    }

    /// Refuses new work and destroys every sandbox (running ones as soon as their runs end).
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let all: Vec<Arc<Slot>> = self
            .inner
            .sandboxes
            .lock()
            .drain()
            .map(|(_, s)| s)
            .collect();
        let n = all.len();
        futures::future::join_all(all.into_iter().map(release)).await;
        info!(node = %self.inner.cfg.node_id, sandboxes = n, "node agent shut down");
    }
}

impl NodeAgent for Agent {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            match cmd {
                Command::Spawn(c) => inner.spawn(c).await.map(Reply::Spawned),
                Command::Run(c) => inner.run(c).await.map(Reply::Ran),
                Command::Purge { sandbox } => inner.purge(sandbox).await.map(|()| Reply::Purged),
                Command::Status => Ok(Reply::Status(inner.status().await)),
                Command::MakeBase { sandbox } => Err(AgentError::NotDeduplicable {
                    sandbox,
                    reason: "not implemented yet".into(),
                    sandbox_alive: true,
                }),
                Command::Dedup { sandbox } => Err(AgentError::NotDeduplicable {
                    sandbox,
                    reason: "not implemented yet".into(),
                    sandbox_alive: true,
                }),
                Command::Restore { sandbox } => Err(AgentError::RestoreFailed {
                    sandbox,
                    reason: "not implemented yet".into(),
                }),
            }
        });
        task.map(|r| {
            r.unwrap_or_else(|e| Err(AgentError::Unavailable(format!("agent task failed: {e}"))))
        })
        .boxed()
    }
}

/// Drops one reference to a slot; the last one (after the slot left the table) destroys the
/// sandbox.
async fn release(slot: Arc<Slot>) {
    if let Some(slot) = Arc::into_inner(slot) {
        let id = slot.sandbox.id().clone();
        match slot.sandbox.destroy().await {
            Ok(()) => debug!(sandbox = %id, "sandbox destroyed"),
            Err(e) => warn!(sandbox = %id, error = %e, "destroying sandbox left something behind"),
        }
    }
}

fn valid_id(id: &SandboxId) -> bool {
    !id.0.is_empty()
        && id.0.len() <= 64
        && id
            .0
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Inner {
    fn check_running(&self) -> Result<(), AgentError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Err(AgentError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    async fn spawn(self: &Arc<Self>, c: SpawnCommand) -> Result<SpawnReply, AgentError> {
        self.check_running()?;
        if !valid_id(&c.sandbox) || self.sandboxes.lock().contains_key(&c.sandbox) {
            return Err(AgentError::BadSandboxId(c.sandbox));
        }
        let _permit = self
            .starts
            .acquire()
            .await
            .map_err(|_| AgentError::ShuttingDown)?;
        self.check_running()?;
        let t0 = Instant::now();
        let start_timeout = Duration::from_millis(self.cfg.start_timeout_ms.max(1));

        let root = self.code_root.clone();
        let limits = code::ZipLimits {
            max_bytes: self.cfg.max_code_mb.saturating_mul(1 << 20),
            max_entries: self.cfg.max_code_entries,
        };
        let (action, version, main) = (c.action.clone(), c.version.clone(), c.main.clone());
        let code = c.code;
        let dir = tokio::task::spawn_blocking(move || {
            code::materialise(&root, &action, &version, &code, &main, limits)
        })
        .await
        .map_err(|e| AgentError::Unavailable(format!("code task failed: {e}")))?;
        let code_dir = match dir {
            Ok(d) => d,
            Err(code::CodeError::BadArchive(msg)) => {
                return Ok(SpawnReply {
                    init_error: Some(msg),
                    start_ms: 0.0,
                    init_ms: 0.0,
                    logs: vec![],
                });
            }
            Err(e) => {
                return Err(AgentError::Code {
                    action: c.action,
                    reason: error_chain(&e),
                });
            }
        };

        let spec = SandboxSpec {
            id: c.sandbox.clone(),
            code_dir,
            memory_limit: c.memory_limit,
            env: c.env,
        };
        let sandbox = match tokio::time::timeout(
            start_timeout,
            Sandbox::start(&self.cfg.sandbox, spec),
        )
        .await
        {
            Ok(r) => r.map_err(|e| AgentError::Start {
                sandbox: c.sandbox.clone(),
                reason: error_chain(&e),
            })?,
            Err(_) => {
                warn!(sandbox = %c.sandbox, "sandbox start timed out");
                return Err(AgentError::Start {
                    sandbox: c.sandbox.clone(),
                    reason: format!("no answer within {start_timeout:?}"),
                });
            }
        };
        let start_ms = t0.elapsed().as_secs_f64() * 1e3;

        let init_timeout = Duration::from_millis(c.init_timeout_ms.max(1));
        let init =
            tokio::time::timeout(init_timeout, sandbox.init(InitRequest { main: c.main })).await;
        let failure = match init {
            Ok(Ok(r)) if r.ok => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    let _ = sandbox.destroy().await;
                    return Err(AgentError::ShuttingDown);
                }
                let slot = Arc::new(Slot { sandbox });
                self.sandboxes.lock().insert(c.sandbox.clone(), slot);
                debug!(sandbox = %c.sandbox, start_ms, init_ms = r.init_ms, "sandbox ready");
                return Ok(SpawnReply {
                    init_error: None,
                    start_ms,
                    init_ms: r.init_ms,
                    logs: r.logs,
                });
            }
            Ok(Ok(r)) => (
                r.error
                    .unwrap_or_else(|| "The action failed to initialise.".into()),
                r.logs,
                r.init_ms,
            ),
            Ok(Err(e)) => (init_error_message(&e, c.memory_limit), vec![], 0.0),
            Err(_) => (
                format!(
                    "The action exceeded its time limits of {} milliseconds during initialization.",
                    c.init_timeout_ms
                ),
                vec![],
                init_timeout.as_secs_f64() * 1e3,
            ),
        };
        let (error, logs, init_ms) = failure;
        debug!(sandbox = %c.sandbox, error = %error, "init failed; destroying sandbox");
        if let Err(e) = sandbox.destroy().await {
            warn!(sandbox = %c.sandbox, error = %e, "destroying sandbox after a failed init");
        }
        Ok(SpawnReply {
            init_error: Some(error),
            start_ms,
            init_ms,
            logs,
        })
    }

    async fn run(self: &Arc<Self>, c: RunCommand) -> Result<RunReply, AgentError> {
        let slot = self
            .sandboxes
            .lock()
            .get(&c.sandbox)
            .cloned()
            .ok_or_else(|| AgentError::UnknownSandbox(c.sandbox.clone()))?;
        let timeout = Duration::from_millis(c.timeout_ms);
        let req = RunRequest {
            value: c.params,
            env: c.env,
            timeout,
        };
        let reply = match slot.sandbox.run(req).await {
            Ok(r) => {
                let outcome = match r.error {
                    Some(e) => RunOutcome::ActionError(e),
                    None => RunOutcome::Returned(r.result),
                };
                RunReply {
                    outcome,
                    logs: r.logs,
                    main_ms: Some(r.main_ms),
                }
            }
            Err(e) => {
                let outcome = match e {
                    RunError::Timeout { .. } => RunOutcome::Timeout {
                        limit_ms: c.timeout_ms,
                    },
                    RunError::OutOfMemory { limit } => RunOutcome::OutOfMemory { limit },
                    RunError::Protocol { detail } => RunOutcome::Protocol(detail),
                    other => RunOutcome::Crashed(error_chain(&other)),
                };
                RunReply {
                    outcome,
                    logs: vec![],
                    main_ms: None,
                }
            }
        };
        if reply.sandbox_lost() {
            let removed = self.sandboxes.lock().remove(&c.sandbox);
            if let Some(s) = removed {
                release(s).await;
            }
        }
        release(slot).await;
        Ok(reply)
    }

    async fn purge(self: &Arc<Self>, id: SandboxId) -> Result<(), AgentError> {
        let removed = self.sandboxes.lock().remove(&id);
        match removed {
            Some(slot) => {
                release(slot).await;
                Ok(())
            }
            None => Err(AgentError::UnknownSandbox(id)),
        }
    }

    async fn status(self: &Arc<Self>) -> NodeStatus {
        let slots: Vec<Arc<Slot>> = self.sandboxes.lock().values().cloned().collect();
        let node = self.cfg.node_id.clone();
        let (sandboxes, slots) = tokio::task::spawn_blocking(move || {
            let st = slots
                .iter()
                .map(|s| SandboxStatus {
                    id: s.sandbox.id().clone(),
                    alive: s.sandbox.is_alive(),
                    memory: s.sandbox.memory().ok().map(|m| SandboxMemory {
                        pss: m.pss,
                        rss: m.rss,
                        cgroup_usage: m.cgroup_usage,
                    }),
                    form: SandboxForm::Warm,
                    held_bytes: 0,
                })
                .map(|mut st| {
                    st.held_bytes = st.memory.map_or(0, |m| m.pss.0);
                    st
                })
                .collect::<Vec<_>>();
            (st, slots)
        })
        .await
        .unwrap_or_default();
        // A purge may have raced this walk: the last reference must destroy.
        for s in slots {
            release(s).await;
        }
        NodeStatus { node, sandboxes }
    }
}

fn init_error_message(e: &RunError, limit: Bytes) -> String {
    match e {
        RunError::OutOfMemory { .. } => {
            format!(
                "The action exhausted its memory ({limit}) during initialization and was aborted."
            )
        }
        other => format!("The action failed to initialize: {}", error_chain(other)),
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_checked() {
        for ok in ["sb-1", "node_0-00001", "a"] {
            assert!(valid_id(&SandboxId(ok.into())), "{ok}");
        }
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(&SandboxId(bad.into())), "{bad}");
        }
    }

    #[test]
    fn config_round_trips_through_toml_defaults() {
        let cfg: AgentConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.max_concurrent_starts, 4);
        assert_eq!(cfg.node_id, NodeId("node-0".into()));
    }
}
