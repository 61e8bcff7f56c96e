//! The controller ↔ agent protocol: a closed set of messages, no behaviour.
//!
//! Every type here is plain data (serde), so a later issue can carry it over gRPC unchanged.
//! Errors that cross this boundary carry their causes as text: a `#[source]` chain cannot travel
//! over a network.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use medes_core::{ActionName, Bytes, Code, NodeId, SandboxId};
use serde::{Deserialize, Serialize};

pub use medes_sandbox::{LogLine, Stream};

/// A node agent as the controller sees it.
///
/// The future is `'static` and the work it stands for runs to completion even if the caller
/// drops it (the local [`Agent`](crate::Agent) runs each command on its own task), so a caller
/// that gives up never leaks a half-made sandbox.
pub trait NodeAgent: Send + Sync + 'static {
    /// Carries out one command.
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>>;
}

/// What the controller asks of an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Create a sandbox for an action and initialise it (a cold start). Answered by
    /// [`Reply::Spawned`].
    Spawn(SpawnCommand),
    /// Run one invocation in an initialised sandbox. Answered by [`Reply::Ran`].
    Run(RunCommand),
    /// Destroy a sandbox (immediately if idle, else as soon as its runs end). Answered by
    /// [`Reply::Purged`].
    Purge {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Report the node's sandboxes and their memory. Answered by [`Reply::Status`].
    Status,
    /// Make a warm sandbox a base: checkpoint it (leaving it running), register its pages in the
    /// registry of its dedup domain and keep the page image resident. The sandbox stays warm and
    /// keeps serving runs. Answered by [`Reply::BaseReady`].
    MakeBase {
        /// The sandbox (warm, idle).
        sandbox: SandboxId,
    },
    /// Turn a warm sandbox into a dedup sandbox: checkpoint it (stopping it), deduplicate its
    /// pages against the bases of its domain, store the result and drop the full image. Answered
    /// by [`Reply::Deduped`]; a sandbox that cannot be deduplicated gives
    /// [`AgentError::NotDeduplicable`].
    Dedup {
        /// The sandbox (warm, idle).
        sandbox: SandboxId,
    },
    /// A dedup start: rebuild the sandbox's pages from its store and the base pages, restore
    /// it, reseed its runtime. The sandbox is warm again under the same id. Answered by
    /// [`Reply::Restored`]; on any failure [`AgentError::RestoreFailed`] (the sandbox is purged).
    Restore {
        /// The sandbox (a dedup sandbox).
        sandbox: SandboxId,
    },
    /// Make the function's template (issue 8) from a warm, initialised sandbox: checkpoint it
    /// leaving it running, keep the full image (checksummed) on the node's tmpfs, keyed by the
    /// sandbox's action (its namespace included: never shared across tenants) and version. The
    /// sandbox keeps serving. Answered by [`Reply::TemplateReady`].
    MakeTemplate {
        /// The sandbox (warm or base, idle preferably: runs wait for the dump).
        sandbox: SandboxId,
    },
    /// A template start: restore a new sandbox from the template of the action version (its
    /// own cgroup, network and PID namespaces, socket; reseeded). Answered by
    /// [`Reply::TemplateStarted`]; [`AgentError::TemplateUnavailable`] when there is no usable
    /// template (missing, being built, disabled, corrupt), [`AgentError::TemplateStartFailed`]
    /// when its restore failed. Either way nothing is left under the sandbox id.
    TemplateStart(TemplateStartCommand),
    /// End a base's process but keep the base: its resident page image and its pages in the
    /// registry of its domain stay, so dedup sandboxes keep restoring against it and later
    /// dedups still find it; the sandbox is then a base without process (reported
    /// `alive: false`, form `Base`, with its action and version) until a [`Command::Purge`]
    /// retires it (refused while dedup sandboxes depend on it). Answered by [`Reply::Purged`];
    /// a sandbox that is not an idle base gives [`AgentError::WrongForm`] or
    /// [`AgentError::Busy`].
    ReleaseBase {
        /// The sandbox (a base, idle).
        sandbox: SandboxId,
    },
}

impl Command {
    /// The command's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Spawn(_) => "spawn",
            Command::Run(_) => "run",
            Command::Purge { .. } => "purge",
            Command::Status => "status",
            Command::MakeBase { .. } => "make_base",
            Command::Dedup { .. } => "dedup",
            Command::Restore { .. } => "restore",
            Command::MakeTemplate { .. } => "make_template",
            Command::TemplateStart(_) => "template_start",
            Command::ReleaseBase { .. } => "release_base",
        }
    }
}

/// A cold start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnCommand {
    /// Id for the new sandbox, unique on the node (`[A-Za-z0-9_-]`, at most 64 characters).
    pub sandbox: SandboxId,
    /// The action (selects the code directory).
    pub action: ActionName,
    /// The action version (selects the code directory).
    pub version: String,
    /// The code.
    pub code: Code,
    /// Entry function name.
    pub main: String,
    /// Memory limit of the sandbox.
    pub memory_limit: Bytes,
    /// Static environment of the runtime (`__OW_NAMESPACE`, `__OW_ACTION_NAME`, ...).
    pub env: BTreeMap<String, String>,
    /// Bound on the init step (OpenWhisk applies the action's time limit to init too).
    pub init_timeout_ms: u64,
}

/// A template start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateStartCommand {
    /// Id for the new sandbox, unique on the node (as for [`SpawnCommand::sandbox`]).
    pub sandbox: SandboxId,
    /// The action (with its namespace: selects the template).
    pub action: ActionName,
    /// The action version (selects the template).
    pub version: String,
    /// Memory limit of the new sandbox's cgroup.
    pub memory_limit: Bytes,
    /// Static environment recorded for the sandbox (the restored process keeps the one of the
    /// template's sandbox, which is the same for one action version).
    pub env: BTreeMap<String, String>,
}

/// A template was made (or already existed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemplateReply {
    /// Bytes of its page images.
    pub image_bytes: u64,
    /// Bytes the template holds on the node's tmpfs (every image file).
    pub held_bytes: u64,
    /// Time of the checkpoint (the sandbox was frozen for part of it), ms.
    pub checkpoint_ms: f64,
    /// Time to checksum the image files, ms.
    pub checksum_ms: f64,
    /// A template of this action version was already there (nothing was done).
    pub existed: bool,
}

/// A template start's timings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateStartReply {
    /// Time to verify the template's checksums, ms (while CRIU restores, on another thread).
    pub verify_ms: f64,
    /// Time of the restore until the reseeded runtime answered, ms.
    pub restore_ms: f64,
    /// Whole command, ms.
    pub total_ms: f64,
}

/// One template on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateStatus {
    /// The action.
    pub action: ActionName,
    /// The action version it was made from.
    pub version: String,
    /// `ready`, `building` or `disabled`.
    pub state: String,
    /// Bytes it holds on the node's tmpfs (0 unless ready).
    pub held_bytes: u64,
    /// Bytes of its page images (0 unless ready).
    pub image_bytes: u64,
    /// Why it is disabled.
    #[serde(default)]
    pub reason: Option<String>,
    /// Its dedup domain.
    #[serde(default)]
    pub domain: Option<String>,
}

/// One invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunCommand {
    /// The sandbox, initialised by an earlier [`Command::Spawn`].
    pub sandbox: SandboxId,
    /// Parameters passed to `main`.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Per-run environment (`__OW_ACTIVATION_ID`, `__OW_DEADLINE`, `__OW_API_KEY`, `__OW_API_HOST`).
    pub env: BTreeMap<String, String>,
    /// Time limit of the run.
    pub timeout_ms: u64,
}

/// An agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Command::Spawn`].
    Spawned(SpawnReply),
    /// Answer to [`Command::Run`].
    Ran(RunReply),
    /// Answer to [`Command::Purge`].
    Purged,
    /// Answer to [`Command::Status`].
    Status(NodeStatus),
    /// Answer to [`Command::MakeBase`].
    BaseReady(BaseReply),
    /// Answer to [`Command::Dedup`].
    Deduped(DedupReply),
    /// Answer to [`Command::Restore`].
    Restored(RestoreReply),
    /// Answer to [`Command::MakeTemplate`].
    TemplateReady(TemplateReply),
    /// Answer to [`Command::TemplateStart`].
    TemplateStarted(TemplateStartReply),
}

/// A sandbox became a base.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BaseReply {
    /// Bytes of its page image (kept resident while it is a base).
    pub image_bytes: u64,
    /// Pages registered.
    pub pages: u64,
    /// Time of the checkpoint (the sandbox was frozen for part of it), ms.
    pub checkpoint_ms: f64,
    /// Time to fingerprint and register the pages and materialise the base, ms.
    pub register_ms: f64,
}

/// A sandbox became a dedup sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DedupReply {
    /// Bytes of its page image before dedup.
    pub image_bytes: u64,
    /// Everything held for the dedup sandbox: store, non-page images, metadata.
    pub stored_bytes: u64,
    /// Time of the checkpoint, ms (0 when the previous store was reused).
    pub checkpoint_ms: f64,
    /// Time to fingerprint, look up, encode and store, ms (0 when reused).
    pub dedup_ms: f64,
    /// Pages in the image.
    pub pages: u64,
    /// The sandbox had been restored from a store and was unchanged in identity, so its
    /// process was stopped and the earlier store kept (no new checkpoint), as the paper does.
    pub reused_previous: bool,
}

/// A dedup sandbox was restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreReply {
    /// Time to load and verify the store, check its bases are present and write the non-page
    /// images, ms (on the critical path).
    pub read_base_ms: f64,
    /// Time to rebuild the page images (every page checksummed) and write them, ms. It runs
    /// while the sandbox is prepared and CRIU builds its namespaces (CRIU waits for it before
    /// it reads pages), so only part of it is on the critical path.
    pub rebuild_ms: f64,
    /// Time from the pages being ready until the restored runtime answered (CRIU's remaining
    /// work and the reseed), ms.
    pub restore_ms: f64,
    /// Whole command, ms.
    pub total_ms: f64,
    /// m_R, the memory this dedup start held transiently: the peak of the rebuilt images on
    /// the tmpfs (non-page images and pages files, allocated bytes) plus the peak resident
    /// size of the CRIU process, both sampled every few ms while the restore ran. The
    /// restored process itself is not included (it is the warm sandbox's memory). 0 if not
    /// measured.
    #[serde(default)]
    pub transient_bytes: u64,
    /// Part of `transient_bytes`: the rebuilt images' peak on the tmpfs.
    #[serde(default)]
    pub transient_images_bytes: u64,
    /// Part of `transient_bytes`: CRIU's peak resident size.
    #[serde(default)]
    pub transient_criu_bytes: u64,
}

/// Outcome of a cold start that reached the init step (or failed on the action's own code).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnReply {
    /// `None` when the sandbox is ready; otherwise the init error (OpenWhisk style message), and
    /// the sandbox is already destroyed.
    pub init_error: Option<String>,
    /// Time to create the sandbox until its runtime answered, ms.
    pub start_ms: f64,
    /// Time of the init step as measured by the runtime, ms.
    pub init_ms: f64,
    /// Output produced while loading the code.
    pub logs: Vec<LogLine>,
}

/// Outcome of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReply {
    /// What happened.
    pub outcome: RunOutcome,
    /// Output lines of the run.
    pub logs: Vec<LogLine>,
    /// Time inside `main` as measured by the runtime, ms (when the runtime answered).
    pub main_ms: Option<f64>,
}

impl RunReply {
    /// Whether the sandbox is gone after this run (it must not be used again).
    pub fn sandbox_lost(&self) -> bool {
        self.outcome.sandbox_lost()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RunOutcome {
    /// `main` returned this value (normally a dict, possibly with an `error` key).
    Returned(serde_json::Value),
    /// `main` raised or returned a non-dict; the message is the runtime's. The sandbox is fine.
    ActionError(String),
    /// The time limit passed; the sandbox was destroyed.
    Timeout {
        /// The limit, ms.
        limit_ms: u64,
    },
    /// The sandbox ran out of memory; it was destroyed.
    OutOfMemory {
        /// The limit.
        limit: Bytes,
    },
    /// The runtime died or the connection to it failed; the sandbox was destroyed.
    Crashed(String),
    /// The runtime answered nonsense; the sandbox was destroyed.
    Protocol(String),
}

impl RunOutcome {
    /// Whether the sandbox was destroyed by this outcome.
    pub fn sandbox_lost(&self) -> bool {
        !matches!(self, RunOutcome::Returned(_) | RunOutcome::ActionError(_))
    }
}

/// The node's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Every initialised sandbox on the node (dedup sandboxes and bases an earlier agent kept
    /// included).
    pub sandboxes: Vec<SandboxStatus>,
    /// The last measured restore transient m_R per function (`/namespace/name`), bytes (see
    /// [`RestoreReply::transient_bytes`]).
    #[serde(default)]
    pub restore_transient: BTreeMap<String, u64>,
    /// The node's templates (issue 8); their `held_bytes` are memory the node holds besides
    /// its sandboxes.
    #[serde(default)]
    pub templates: Vec<TemplateStatus>,
}

/// One sandbox's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// The sandbox.
    pub id: SandboxId,
    /// Whether its runtime process is alive (false for a dedup sandbox: it has no process).
    pub alive: bool,
    /// Its memory, if it could be read (warm and base sandboxes).
    pub memory: Option<SandboxMemory>,
    /// Its form.
    pub form: SandboxForm,
    /// Bytes held for it on this node: warm = PSS (+ the store it was restored from, kept for
    /// a re-dedup); dedup = its store file on tmpfs (page encodings, non-page CRIU images,
    /// metadata); base = PSS + its resident (canonical) base pages + its share of the domain's
    /// fingerprint registry; a base whose process was lost = pages + registry share. A
    /// sandbox in the middle of a dedup or dedup start reports 0.
    pub held_bytes: u64,
    /// The action it runs (for a base whose process was lost: the action it ran, unless an
    /// older agent kept it without; a restarted controller keeps such a base as its function's
    /// base when the action and version are unchanged).
    #[serde(default)]
    pub action: Option<ActionName>,
    /// The action version it runs.
    #[serde(default)]
    pub version: Option<String>,
    /// Its dedup domain (a namespace, or `*` when tenants share).
    #[serde(default)]
    pub domain: Option<String>,
    /// The sandbox's memory limit.
    #[serde(default)]
    pub memory_limit: Option<Bytes>,
    /// Bytes of its page image at its checkpoint (dedup sandboxes).
    #[serde(default)]
    pub image_bytes: Option<u64>,
}

/// The form of a sandbox on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SandboxForm {
    /// A live, initialised runtime.
    Warm,
    /// No process: a deduplicated checkpoint that a [`Command::Restore`] brings back.
    Dedup,
    /// A live runtime whose checkpointed pages are a base for dedup sandboxes.
    Base,
}

/// Memory of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMemory {
    /// Proportional set size of its processes.
    pub pss: Bytes,
    /// Resident set size of its processes.
    pub rss: Bytes,
    /// What its memory cgroup charges.
    pub cgroup_usage: Bytes,
}

/// What made a checkpoint (make-base or dedup) fail ([`AgentError::NotDeduplicable`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFailure {
    /// CRIU refused the dump because the sandbox holds a connected TCP socket.
    TcpSocket,
    /// CRIU's dump failed otherwise.
    Criu,
    /// CRIU did not finish within its bound.
    Timeout,
    /// The sandbox's runtime was not running.
    NotRunning,
    /// Reading the dump or deduplicating its pages failed.
    Image,
    /// Anything else (an older agent that did not say).
    #[default]
    Other,
}

impl CheckpointFailure {
    /// A short fixed label (metrics).
    pub fn label(self) -> &'static str {
        match self {
            CheckpointFailure::TcpSocket => "tcp_socket",
            CheckpointFailure::Criu | CheckpointFailure::Timeout | CheckpointFailure::Image => {
                "checkpoint_failed"
            }
            CheckpointFailure::NotRunning => "sandbox_gone",
            CheckpointFailure::Other => "not_deduplicable",
        }
    }
}

/// What made a dedup start fail ([`AgentError::RestoreFailed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreFailure {
    /// A base the store points into is not resident here.
    MissingBase,
    /// Base pages held by another node could not be read (unreachable, too slow).
    RemoteBase,
    /// The store or a page failed its checksum.
    Corrupt,
    /// CRIU's restore failed.
    Criu,
    /// The restored runtime did not answer within its bound.
    Timeout,
    /// Anything else (an older agent that did not say).
    #[default]
    Other,
}

impl RestoreFailure {
    /// A short fixed label (metrics).
    pub fn label(self) -> &'static str {
        match self {
            RestoreFailure::MissingBase => "missing_base",
            RestoreFailure::RemoteBase => "remote_base",
            RestoreFailure::Corrupt => "checksum",
            RestoreFailure::Criu => "criu",
            RestoreFailure::Timeout => "timeout",
            RestoreFailure::Other => "restore_failed",
        }
    }

    /// The kind of a failure of the lazy dedup start, known only by its message: the one
    /// remaining text mapping of the restore path. Every other failure of a dedup start is
    /// typed and mapped by variant in the agent; the lazy path (`lazy.rs`, being rewritten)
    /// still reports text, and converts to typed errors in a later change. Checked in this
    /// order: remote base pages, a missing base, checksums, time, CRIU.
    pub fn of_lazy(reason: &str) -> RestoreFailure {
        let r = reason.to_ascii_lowercase();
        if r.contains("remote")
            || r.contains("from node")
            || r.contains("held by a node")
            || r.contains("did not arrive")
            || r.contains("reading base")
            || r.contains("connect")
        {
            RestoreFailure::RemoteBase
        } else if r.contains("base") && (r.contains("unavailable") || r.contains("missing")) {
            RestoreFailure::MissingBase
        } else if r.contains("checksum") || r.contains("corrupt") {
            RestoreFailure::Corrupt
        } else if r.contains("within") || r.contains("timed out") || r.contains("timeout") {
            RestoreFailure::Timeout
        } else if r.contains("criu") {
            RestoreFailure::Criu
        } else {
            RestoreFailure::Other
        }
    }
}

/// A command the agent could not carry out. Action failures are not errors (they are
/// [`SpawnReply::init_error`] and [`RunOutcome`]); these are platform failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AgentError {
    /// No such sandbox on this node (never spawned, or already gone).
    #[error("sandbox {0} is not on this node")]
    UnknownSandbox(SandboxId),
    /// The id is taken or not usable.
    #[error("sandbox id {0:?} is already in use or not valid")]
    BadSandboxId(SandboxId),
    /// Writing the action's code to the data directory failed.
    #[error("preparing the code of {action}: {reason}")]
    Code {
        /// The action.
        action: ActionName,
        /// The cause.
        reason: String,
    },
    /// Creating the sandbox failed.
    #[error("starting sandbox {sandbox}: {reason}")]
    Start {
        /// The sandbox.
        sandbox: SandboxId,
        /// The cause.
        reason: String,
    },
    /// The sandbox could not be checkpointed or deduplicated (e.g. it holds TCP sockets).
    #[error("sandbox {sandbox} cannot be deduplicated: {reason}")]
    NotDeduplicable {
        /// The sandbox.
        sandbox: SandboxId,
        /// The cause.
        reason: String,
        /// Whether the sandbox is still there, warm (else it is gone).
        sandbox_alive: bool,
        /// What failed, for metrics and decisions (`reason` is for people).
        #[serde(default)]
        kind: CheckpointFailure,
    },
    /// A dedup start failed; the dedup sandbox has been purged.
    #[error("restoring sandbox {sandbox}: {reason}")]
    RestoreFailed {
        /// The sandbox.
        sandbox: SandboxId,
        /// The cause.
        reason: String,
        /// What failed, for metrics and decisions (`reason` is for people).
        #[serde(default)]
        kind: RestoreFailure,
    },
    /// A base cannot be purged while dedup sandboxes depend on it.
    #[error("base sandbox {sandbox} has {dependents} dependent dedup sandboxes")]
    BaseInUse {
        /// The base.
        sandbox: SandboxId,
        /// Dedup sandboxes that need its pages.
        dependents: u64,
    },
    /// The command does not apply to the sandbox in its current form or state (e.g. `Run` on a
    /// dedup sandbox, `Dedup` while it runs or is already a base).
    #[error("sandbox {sandbox} is {form:?}: {reason}")]
    WrongForm {
        /// The sandbox.
        sandbox: SandboxId,
        /// Its form.
        form: SandboxForm,
        /// Why the command does not apply.
        reason: String,
    },
    /// No usable template of the action version (missing, being built, disabled or found
    /// corrupt and deleted): take a real cold start (which may rebuild it).
    #[error("no usable template of {action} version {version}: {reason}")]
    TemplateUnavailable {
        /// The action.
        action: ActionName,
        /// The version.
        version: String,
        /// Why.
        reason: String,
    },
    /// A template start's restore failed (nothing is left under the sandbox id); repeated
    /// failures disable the template.
    #[error("template start of sandbox {sandbox}: {reason}")]
    TemplateStartFailed {
        /// The sandbox.
        sandbox: SandboxId,
        /// The cause.
        reason: String,
        /// Whether this failure disabled the template.
        disabled: bool,
    },
    /// The agent is shutting down.
    #[error("the node agent is shutting down")]
    ShuttingDown,
    /// The agent could not be reached or failed internally (a transport error, a lost task).
    #[error("node agent unavailable: {0}")]
    Unavailable(String),
    /// The command never reached the node (the connection to its agent was refused): nothing
    /// of it ran there, so a caller may retry it elsewhere. Made by transports, never sent.
    #[error("node agent unreachable, command not delivered: {0}")]
    NotDelivered(String),
}

#[cfg(test)]
mod failure_kinds {
    use super::{CheckpointFailure, RestoreFailure};

    #[test]
    fn lazy_restore_failures_are_classified_by_text() {
        for (reason, kind) in [
            ("base 3 is unavailable: gone", RestoreFailure::MissingBase),
            (
                "base n1/4 is held by a node that is not alive",
                RestoreFailure::RemoteBase,
            ),
            (
                "reading remote base pages: deadline",
                RestoreFailure::RemoteBase,
            ),
            (
                "page 0: base page unavailable: base BaseId(2147483648) has no page 0: page 0 of \
                 base node-2/0 did not arrive within 1.5s",
                RestoreFailure::RemoteBase,
            ),
            (
                "page 0: base page unavailable: base BaseId(2147483648) has no page 0: reading \
                 base node-2/0: 10.77.1.4:3241: connect timed out after 1s",
                RestoreFailure::RemoteBase,
            ),
            ("page 12 failed its checksum", RestoreFailure::Corrupt),
            ("no restored runtime within 15s", RestoreFailure::Timeout),
            ("criu restore failed (exit 1)", RestoreFailure::Criu),
            ("something else", RestoreFailure::Other),
        ] {
            assert_eq!(RestoreFailure::of_lazy(reason), kind, "{reason}");
        }
        assert_eq!(RestoreFailure::default().label(), "restore_failed");
        assert_eq!(CheckpointFailure::TcpSocket.label(), "tcp_socket");
        assert_eq!(CheckpointFailure::default(), CheckpointFailure::Other);
    }
}
