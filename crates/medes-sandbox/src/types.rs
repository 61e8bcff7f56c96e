//! Configuration, requests, replies and errors of the public API.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medes_core::{Bytes, SandboxId, UnixMillis};
use serde::{Deserialize, Serialize};

/// Host-wide settings shared by every sandbox of one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxConfig {
    /// Python interpreter the runtime runs on. Default `/opt/medes/venv/bin/python3`.
    pub python: PathBuf,
    /// The venv, bind-mounted read-only at the same path. Default `/opt/medes/venv`.
    pub venv_dir: PathBuf,
    /// Directory holding `medes_runtime.py`, mounted read-only at `/runtime`.
    /// Default: this repository's `runtime/` directory (resolved at build time).
    pub runtime_dir: PathBuf,
    /// Extra host paths visible read-only at the same path inside every sandbox.
    /// Default `["/opt/medes/inputs"]` if that directory exists, else none.
    pub ro_mounts: Vec<PathBuf>,
    /// Per-sandbox working state (sockets, rootfs mountpoints). Default `/run/medes/sandboxes`.
    pub run_dir: PathBuf,
    /// Network of each sandbox. Default [`NetworkMode::Outbound`].
    pub network: NetworkMode,
    /// Unprivileged uid the function runs as. Default 65534 (`nobody`).
    pub uid: u32,
    /// Unprivileged gid the function runs as. Default 65534 (`nogroup`).
    pub gid: u32,
    /// Parent cgroup name under each controller's root. Default `medes`.
    pub cgroup_name: String,
    /// The CRIU binary (4.x). Default `criu`.
    pub criu: PathBuf,
    /// Size of the sandbox's private `/tmp` tmpfs in MiB (charged to its cgroup). Default 64.
    pub tmp_size_mb: u64,
    /// Configured network namespaces kept ready (per network mode) to take their setup off the
    /// start and restore paths; 0 disables. Default 2.
    pub spare_netns: usize,
    /// Address-space layout randomisation of the sandboxes' processes. `false` launches the
    /// runtime with `personality(ADDR_NO_RANDOMIZE)` (like `setarch -R`), for like-for-like
    /// comparisons with the Medes paper's ASLR-off figures. Default `true` (production).
    pub aslr: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let inputs = PathBuf::from("/opt/medes/inputs");
        SandboxConfig {
            python: "/opt/medes/venv/bin/python3".into(),
            venv_dir: "/opt/medes/venv".into(),
            runtime_dir: default_runtime_dir(),
            ro_mounts: if inputs.is_dir() {
                vec![inputs]
            } else {
                vec![]
            },
            run_dir: "/run/medes/sandboxes".into(),
            network: NetworkMode::Outbound,
            uid: 65534,
            gid: 65534,
            cgroup_name: "medes".into(),
            criu: "criu".into(),
            tmp_size_mb: 64,
            spare_netns: 2,
            aslr: true,
        }
    }
}

/// `<repo>/runtime`, as seen when this crate was built.
pub fn default_runtime_dir() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runtime");
    p.canonicalize().unwrap_or(p)
}

/// Network of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Own network namespace with a veth pair, a default route and NAT to the outside.
    #[default]
    Outbound,
    /// Own network namespace with loopback only.
    Isolated,
}

/// What one sandbox runs.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique id on this node (used in cgroup, netns and run-dir names).
    pub id: SandboxId,
    /// Host directory with the action's files (`__main__.py` and anything else), mounted
    /// read-only at `/action`.
    pub code_dir: PathBuf,
    /// Memory limit enforced by the cgroup (memory + swap where available).
    pub memory_limit: Bytes,
    /// Static environment of the runtime (e.g. `__OW_NAMESPACE`).
    pub env: BTreeMap<String, String>,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One captured output line: when (ms since the epoch), which stream, the text.
pub type LogLine = (UnixMillis, Stream, String);

/// Initialise the runtime: load `/action` and resolve the entry function.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// Entry function name (`main` by default in OpenWhisk).
    pub main: String,
}

/// Outcome of an init.
#[derive(Debug, Clone)]
pub struct InitReply {
    /// Whether the code loaded and the entry function exists.
    pub ok: bool,
    /// Why init failed (OpenWhisk style message).
    pub error: Option<String>,
    /// Output produced while loading the code.
    pub logs: Vec<LogLine>,
    /// Time spent loading, as measured inside the runtime.
    pub init_ms: f64,
}

/// One invocation.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The parameters, passed to `main` as a dict.
    pub value: serde_json::Map<String, serde_json::Value>,
    /// Per-run environment (`__OW_ACTIVATION_ID`, `__OW_DEADLINE`, `__OW_API_KEY`, ...).
    pub env: BTreeMap<String, String>,
    /// Time limit; on expiry the sandbox is killed and [`RunError::Timeout`] returned.
    pub timeout: Duration,
}

/// Outcome of a run that reached the runtime and came back.
#[derive(Debug, Clone)]
pub struct RunReply {
    /// The dict returned by `main` (`null` when `error` is set).
    pub result: serde_json::Value,
    /// Exception text (`An error has occurred: ...`) or `The action did not return a dictionary.`
    pub error: Option<String>,
    /// Lines written to stdout/stderr during the run.
    pub logs: Vec<LogLine>,
    /// Time spent inside `main`, as measured by the runtime.
    pub main_ms: f64,
}

/// Memory of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Proportional set size summed over the sandbox's processes (`smaps_rollup`).
    pub pss: Bytes,
    /// Resident set size summed over the sandbox's processes.
    pub rss: Bytes,
    /// What the memory cgroup charges: its pages (page cache and tmpfs included) and its
    /// kernel memory (page tables, slab, kernel stacks), without per-CPU pre-charges.
    pub cgroup_usage: Bytes,
}

/// Whether the sandbox keeps running after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointMode {
    /// Dump and let the sandbox continue serving.
    LeaveRunning,
    /// Dump and kill the sandbox (CRIU's default); the sandbox is dead afterwards and must still
    /// be [`destroy`](crate::Sandbox::destroy)ed.
    Stop,
}

/// What a checkpoint produced.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The CRIU image directory.
    pub images_dir: PathBuf,
    /// Total size of the `pages-*.img` files.
    pub page_image_bytes: Bytes,
    /// Wall time of the dump.
    pub dump_ms: f64,
}

/// Where the time of a restore went (see
/// [`Sandbox::restore_with`](crate::Sandbox::restore_with)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreTimings {
    /// Preparing run directory, cgroup, network namespace, root and socket, ms (overlaps the
    /// images step).
    pub prepare_ms: f64,
    /// From the start until the images were ready, ms (overlaps the prepare step).
    pub images_ready_ms: f64,
    /// CRIU restore, ms (cgroup join included).
    pub criu_ms: f64,
    /// Reseeding the runtime: the first round trip with the restored process, ms.
    pub reseed_ms: f64,
    /// Whole restore until the runtime answered, ms.
    pub total_ms: f64,
}

/// A host requirement is missing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    /// Sandboxes need root (namespaces, cgroups, CRIU).
    #[error("medes sandboxes need root (running as uid {uid})")]
    NotRoot {
        /// The effective uid.
        uid: u32,
    },
    /// CRIU is missing or too old.
    #[error("criu at {path:?} is missing or not version 4 or newer: {detail}")]
    Criu {
        /// The configured binary.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The Python interpreter is missing.
    #[error("python interpreter {path:?} not found or not executable (run scripts/setup.sh)")]
    Python {
        /// The configured interpreter.
        path: PathBuf,
    },
    /// The runtime script is missing.
    #[error("runtime script {path:?} not found")]
    Runtime {
        /// The expected script path.
        path: PathBuf,
    },
    /// No usable memory cgroup controller.
    #[error(
        "no memory cgroup controller found (looked for /sys/fs/cgroup/memory and a cgroup2 mount with memory)"
    )]
    Cgroup,
    /// A helper tool is missing.
    #[error("required tool {tool:?} not found in PATH")]
    Tool {
        /// The tool's name.
        tool: &'static str,
    },
}

/// Starting a sandbox failed; everything created so far was removed again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad spec (e.g. an id unusable as a file name, a missing code directory).
    #[error("invalid sandbox spec: {reason}")]
    InvalidSpec {
        /// Why.
        reason: String,
    },
    /// Creating the cgroup failed.
    #[error("creating cgroup {path:?}")]
    Cgroup {
        /// The cgroup directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the network namespace failed.
    #[error("setting up the network namespace: {detail}")]
    Network {
        /// What failed.
        detail: String,
    },
    /// A filesystem or syscall step failed.
    #[error("{what}")]
    Io {
        /// The step.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The sandbox process failed while setting itself up (before exec).
    #[error("sandbox setup failed at step {step:?}: {source}")]
    Setup {
        /// The step inside the new namespaces.
        step: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The runtime did not answer in time.
    #[error("runtime did not become ready within {after:?}")]
    NotReady {
        /// How long we waited.
        after: Duration,
    },
    /// The runtime process died while starting.
    #[error("runtime exited while starting: {reason}")]
    Died {
        /// Exit status or signal.
        reason: String,
    },
}

/// An init or a run failed at the platform level (a failing action is a successful reply with
/// `error` set, not a `RunError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The time limit passed; the sandbox was killed.
    #[error("the action exceeded its time limit of {after:?}")]
    Timeout {
        /// The limit.
        after: Duration,
    },
    /// The memory cgroup killed a process of the sandbox; the sandbox was killed.
    #[error("the action exceeded its memory limit of {limit}")]
    OutOfMemory {
        /// The limit.
        limit: Bytes,
    },
    /// The runtime died or closed the connection without an answer; the sandbox was killed.
    #[error("the action's sandbox crashed: {reason}")]
    Crashed {
        /// What is known (exit status, signal).
        reason: String,
    },
    /// The runtime answered something unexpected.
    #[error("runtime protocol error: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// Talking to the runtime failed.
    #[error("talking to the runtime over {socket:?}")]
    Io {
        /// The runtime's socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The sandbox was already dead.
    #[error("the sandbox is not running")]
    NotRunning,
}

/// Reading a sandbox's memory failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A proc or cgroup file could not be read.
    #[error("reading {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file had an unexpected format.
    #[error("unexpected content in {path:?}")]
    Parse {
        /// The file.
        path: PathBuf,
    },
}

/// A checkpoint failed; with [`CheckpointMode::LeaveRunning`] the sandbox keeps running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The sandbox was not running.
    #[error("the sandbox is not running")]
    NotRunning,
    /// Preparing the images directory or the metadata failed.
    #[error("preparing {path:?}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// CRIU refused the dump because the sandbox holds a connected TCP socket (CRIU 4.1
    /// cannot dump those on this kernel; CRIU says so only in its log, which is read here, in
    /// one place).
    #[error("criu dump refused a connected tcp socket ({status}); log tail:\n{log_tail}")]
    TcpSocket {
        /// Exit status.
        status: String,
        /// The last lines of `dump.log`.
        log_tail: String,
    },
    /// CRIU failed otherwise.
    #[error("criu dump failed ({status}); log tail:\n{log_tail}")]
    Criu {
        /// Exit status.
        status: String,
        /// The last lines of `dump.log`.
        log_tail: String,
    },
    /// CRIU did not finish in time and was killed.
    #[error("criu dump did not finish within {after:?}")]
    Timeout {
        /// The bound.
        after: Duration,
    },
}

/// An error produced by the caller's page producer of a
/// [`Sandbox::restore_with`](crate::Sandbox::restore_with), kept whole (the caller may downcast
/// it to its own type).
pub type PagesError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A restore failed; everything created for the new sandbox was removed again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Bad spec.
    #[error("invalid sandbox spec: {reason}")]
    InvalidSpec {
        /// Why.
        reason: String,
    },
    /// The images directory is incomplete or inconsistent (checked before CRIU runs, and again
    /// once late pages are written).
    #[error("bad checkpoint in {path:?}")]
    BadImage {
        /// The images directory.
        path: PathBuf,
        /// What is wrong.
        #[source]
        problem: ImageProblem,
    },
    /// Setting up the new sandbox's cgroup, network namespace, root or socket failed.
    #[error("preparing the sandbox")]
    Prepare(#[source] StartError),
    /// CRIU failed.
    #[error("criu restore failed ({status}); log tail:\n{log_tail}")]
    Criu {
        /// Exit status.
        status: String,
        /// The last lines of the restore log.
        log_tail: String,
    },
    /// CRIU did not finish in time and was killed.
    #[error("criu restore did not finish within {after:?}")]
    Timeout {
        /// The bound.
        after: Duration,
    },
    /// A step failed.
    #[error("{what}")]
    Io {
        /// The step.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The images could not be produced: the caller's page producer of
    /// [`Sandbox::restore_with`](crate::Sandbox::restore_with) failed, or the lazy-pages
    /// server could not provide pages the restore needed.
    #[error("producing the images")]
    Images {
        /// The producer's error.
        #[source]
        source: PagesError,
    },
    /// The restored runtime did not answer its reseed request (dead, silent past its bound,
    /// or a broken connection).
    #[error("restored runtime is not answering")]
    NotAnswering {
        /// What the request ran into ([`RunError::Timeout`] when it was silent).
        #[source]
        source: RunError,
    },
    /// The restored runtime answered its reseed request with a failure.
    #[error("restored runtime refused to reseed: {reply}")]
    ReseedRefused {
        /// Its reply (JSON).
        reply: String,
    },
}

/// What is wrong with a checkpoint's images directory ([`RestoreError::BadImage`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageProblem {
    /// Our metadata file could not be read (not a checkpoint of this crate, or removed).
    #[error("reading {path:?}")]
    ReadMeta {
        /// The metadata file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Our metadata file is malformed.
    #[error("parsing {path:?}")]
    ParseMeta {
        /// The metadata file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The directory could not be listed.
    #[error("listing the image files")]
    List(#[source] io::Error),
    /// An image file or the metadata could not be written.
    #[error("writing {file}")]
    Write {
        /// The file name.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An image file of the dump is missing.
    #[error("{file} is missing")]
    Missing {
        /// The file name.
        file: String,
    },
    /// An image file's size differs from the dump's.
    #[error("{file} has {found} bytes, the dump wrote {expected}")]
    Size {
        /// The file name.
        file: String,
        /// Its size now.
        found: u64,
        /// Its size at dump time.
        expected: u64,
    },
    /// The checkpoint names an external mount this configuration does not provide.
    #[error("{target:?} is not mounted by this configuration")]
    Mount {
        /// The mount target inside the sandbox.
        target: PathBuf,
    },
}

/// Tearing a sandbox down left something behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestroyError {
    /// The cgroup could not be removed (processes still in it?).
    #[error("removing cgroup {path:?}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The run directory or network namespace could not be removed.
    #[error("removing {what}")]
    Cleanup {
        /// What.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Private file mappings split by `medes_criu_image::lazify`, per process (pid in the images):
/// each mapping as it was, with the path of its file.
pub type SplitMappings = Vec<(u32, Vec<(medes_criu_image::VmaEntry, String)>)>;
