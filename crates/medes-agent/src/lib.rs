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
//! # Dedup state (issue 5)
//! A sandbox has one of three forms ([`SandboxForm`]): **warm** (a live runtime), **base** (a live
//! runtime whose checkpointed pages are resident and registered) and **dedup** (no process: a
//! dedup store on tmpfs).
//! - [`Command::MakeBase`] checkpoints with `--leave-running`, fingerprints the pages into the
//!   registry of the sandbox's *dedup domain* (its namespace; the whole node with
//!   [`DedupSettings::share_across_tenants`]) and keeps the canonical (rebased) pages in memory;
//!   the dump's files are then deleted. The sandbox keeps serving.
//! - [`Command::Dedup`] checkpoints and stops the sandbox (images on the tmpfs
//!   [`DedupSettings::images_dir`]), destroys its cgroup and netns, then deduplicates against every
//!   base of its domain, writes the store atomically (xxh3-checksummed) and deletes the dump.
//!   Every base the store points into is reference-counted in the registry until the store is
//!   gone, so such a base cannot be retired ([`AgentError::BaseInUse`]).
//! - [`Command::Restore`] (a dedup start) loads and verifies the store, checks its bases are
//!   resident and writes the non-page images, then calls [`Sandbox::restore_with`]: CRIU starts
//!   at once (namespaces, mounts, process tree) while the pages are rebuilt straight into the
//!   pages files (every page checksummed); CRIU's first open of a pages file is held (fanotify)
//!   until they are complete. The runtime is then reseeded (`random`, numpy, OpenSSL, tempfile
//!   names, glibc's `getrandom` state). Any failure purges the dedup sandbox and answers
//!   [`AgentError::RestoreFailed`]; the controller falls back to a cold start. Failures are
//!   typed (`DedupStartError`, wrapping `medes_sandbox::RestoreError` and `medes_dedup`'s
//!   errors) and mapped to a [`RestoreFailure`] by variant; only the lazy path still reports
//!   text ([`RestoreFailure::of_lazy`]).
//!   With [`AgentConfig::lazy_restore`] (the default) the restore is lazy instead (`lazy.rs`,
//!   [`Sandbox::restore_with_lazy`]): CRIU reads only the few pages it restores itself, and the
//!   agent's own userfaultfd lazy-pages server copies every other page straight from the
//!   verified rebuild into the running process (faulting pages first); the start answers once
//!   the runtime answered (the inputs verified before it resumed), and the remaining pages are
//!   filled in the background while the request runs (a make-base or dedup of the sandbox
//!   waits for that fill). Errors before anything ran fall back to the path above.
//! - **Armed dedup sandboxes** ([`AgentConfig::armed_per_function`], default 1; `armed.rs`):
//!   after a dedup the agent restores the function's newest dedup sandbox lazily *ahead of its
//!   request* and leaves it stopped ([`medes_sandbox::Sandbox::prestart_lazy`], `criu restore
//!   --lazy-pages --leave-stopped`; its inputs verified, its eager pages in place, the
//!   lazy-pages server's fill held). A [`Command::Restore`] of it checks that the store and
//!   base files are unchanged, continues the processes, reseeds and answers; the fill then
//!   runs as after an early answer. A restore racing the arm joins it; a purge, a newer arm of
//!   the function or the shutdown disarms (kills the stopped tree, keeps the store). What an
//!   armed sandbox holds (stopped tree, loaded store, page buffers) is added to its
//!   `held_bytes` and listed by [`Agent::armed`].
//! - **Re-dedup reuses the store** (as the paper does): a sandbox restored from a store keeps it
//!   while warm; its next [`Command::Dedup`] stops the process and keeps the store instead of
//!   checkpointing again ([`DedupReply::reused_previous`]). This relies on actions being
//!   stateless: state an action built in memory after the restore is dropped, and the store is
//!   still accounted to the warm sandbox (`held_bytes`).
//! - Dedups and make-bases run on their command's task, CPU work in `spawn_blocking` on a rayon
//!   pool of their own whose threads run at nice 10, at most
//!   [`DedupSettings::max_concurrent_dedups`] at a time. Dedup starts rebuild on another pool
//!   (nice 0), so they never queue behind a dedup's parallel work; runs are not touched.
//! - Memory ([`SandboxStatus::held_bytes`]): warm = PSS (+ a kept store), base = PSS + resident
//!   base pages, dedup = the store file on tmpfs (rounded to pages; it holds the pages' encoding,
//!   every non-page CRIU image and our metadata) + an armed sandbox's extra (its
//!   [`SandboxStatus::memory`] then carries the stopped tree's cgroup usage). The cgroup figure stays in
//!   [`SandboxStatus::memory`] as a cross-check.
//! - The registry lives in this agent, one per domain, behind a small internal interface
//!   (`domain.rs`) so the cluster-wide registry of issue 7 can replace it.
//! - **Persistence across an agent restart** (`persist.rs`): everything dedup keeps lives on the
//!   tmpfs under `<images_dir>/d<xxh3 of the canonical data_dir>/` (stable for one data
//!   directory; default `/run/medes/images/d…/`): `store/<sandbox>.medes` + `.json` (the
//!   store and what restoring it needs: action, version, code directory, limit, environment,
//!   domain), `bases/<id>.pages` + `.pos` + `.json` (a base's canonical pages, mapped while it
//!   lives, their position keys and checksums). [`Agent::shutdown`] destroys live sandboxes but
//!   keeps these; [`Agent::new`] on the same data directory reloads them: every base's checksum
//!   is verified and its fingerprints re-registered under its old id, every store fully loaded
//!   (its checksums verified) and its bases pinned. What does not verify is removed with a
//!   logged reason ([`DedupCounters::kept_dropped`]); bases come back as bases without a
//!   process ([`SandboxForm::Base`], `alive: false`) and retire as soon as no dedup sandbox
//!   depends on them. [`NodeStatus`] reports each dedup sandbox's action, version, domain and
//!   memory so the controller can adopt or purge it; [`Agent::purge_kept`] removes everything
//!   kept. One live agent per data directory (an `owner` file names it).
//! - **Restore transient m_R** (`transient.rs`): each dedup start samples, every 2 ms, the
//!   rebuilt images on the tmpfs and the CRIU process's peak RSS; the sum of the peaks is
//!   [`RestoreReply::transient_bytes`], and the last one per function is in
//!   [`NodeStatus::restore_transient`].
//!
//! # Templates (issue 8)
//! [`Command::MakeTemplate`] checkpoints a warm sandbox with `--leave-running` (after its cold
//! start and init, and usually after its first run) and keeps the full image on the tmpfs
//! (`<images>/tmpl/`), every file xxh3-checksummed, keyed per action (namespace included:
//! never shared across tenants) and version. [`Command::TemplateStart`] verifies the
//! checksums and restores a new sandbox with the plain full-image restore
//! ([`Sandbox::restore`]: own cgroup, netns, PID namespace, socket; reseeded as after a dedup
//! start). Missing, disabled or corrupt (then deleted) → [`AgentError::TemplateUnavailable`];
//! a failed restore → [`AgentError::TemplateStartFailed`], the third in a row disables the
//! template for that version (logged). A spawn of another version deletes the action's
//! template. Templates are in [`NodeStatus::templates`] with the bytes they hold, and are kept
//! across an agent restart (checksums verified at load). Siblings restored from one template
//! share its memory layout (ASLR slides): a leak of one sibling's addresses tells those of the
//! others. Each template is also its function's first base: sandboxes born from it are
//! deduplicated against it first, page by page at the same address (`template.rs`).
//!
//! # Measured
//! `examples/dedup_startup.rs` (release, 10 dedup starts per function interleaved with plain
//! restores, machine shared with other jobs: load ≈ 3.4 on 2 cores; ms, p50; dedup start =
//! `Restore` until the runtime answered, plain = `Sandbox::restore` from the full image on
//! tmpfs; memory: warm PSS vs everything held for the dedup sandbox, base excluded):
//!
//! | function | pages MB | cold | plain restore | dedup start | ratio | read / rebuild / after pages | warm MB | dedup MB |
//! |---|---|---|---|---|---|---|---|---|
//! | vanilla | 6.0 | 66 | 88 | 88 | 1.00 | 1.3 / 15 / 49 | 7.8 | 0.57 (7%) |
//! | authenc | 7.2 | 53 | 58 | 68 | 1.17 | 0.9 / 15 / 39 | 10.9 | 0.39 (4%) |
//! | imagepro | 16.6 | 109 | 73 | 96 | 1.31 | 2.2 / 36 / 49 | 23.3 | 1.53 (7%) |
//! | htmlserve | 17.9 | 297 | 74 | 97 | 1.31 | 2.9 / 42 / 33 | 21.9 | 1.97 (9%) |
//! | videopro | 18.6 | 120 | 84 | 102 | 1.22 | 2.3 / 38 / 50 | 35.7 | 1.64 (5%) |
//! | linalg | 20.6 | 163 | 69 | 78 | 1.12 | 2.5 / 35 / 29 | 28.4 | 1.41 (5%) |
//! | modelserve | 25.9 | 148 | 97 | 122 | 1.26 | 2.3 / 45 / 59 | 36.0 | 1.54 (4%) |
//! | mapreduce | 39.9 | 89 | 114 | 170 | 1.49 | 5.4 / 68 / 69 | 34.1 | 4.39 (13%) |
//! | featuregen | 96.4 | 854 | 139 | 274 | 1.98 | 12 / 163 / 93 | 116.5 | 10.6 (9%) |
//! | modeltrain | 109.6 | 897 | 151 | 301 | 2.00 | 13 / 169 / 98 | 132.6 | 11.9 (9%) |
//!
//! CRIU spends ~40–50 ms before it reads any page (namespaces, mounts); the rebuild hides in
//! that window. Larger images rebuild at ~0.6 GB/s here (≈1 GB/s per idle core; decoding and
//! the tmpfs writes are about half each), so above ~40 MB the rebuild outlasts the window and
//! adds to the restore. Hiding it further needs CRIU to read pages while they are being
//! rebuilt (fanotify pre-content events are not supported on tmpfs; userfaultfd lazy pages).
//!
//! # What this crate does not do
//! No scheduling, no memory budget, no keep-alive, no dedup policy (the controller decides all of
//! that); no OpenWhisk JSON (other nodes' bases are read
//! through [`remote`], issue 7). Warm sandboxes do not survive an agent
//! restart (their processes die with it); dedup stores and bases do, not a machine reboot.
#![deny(missing_docs)]
#![deny(unsafe_code)] // one exception: mapping base pages files (domain.rs)

pub use medes_registry_redis::{self as registry_redis, RegistryConfig};

mod armed;
mod code;
mod domain;
mod images;
mod lazy;
mod persist;
pub mod proto;
mod registry_backend;
pub mod remote;
mod template;
mod transient;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use medes_core::{ActionName, Bytes, NodeId, SandboxId};
use medes_dedup::{BaseId, BaseMeta, BasePages, DedupStore, DumpImage};
use medes_sandbox::{
    CheckpointMode, InitRequest, RunError, RunRequest, Sandbox, SandboxConfig, SandboxSpec,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use armed::ArmedStatus;
pub use proto::{
    AgentError, BaseReply, CheckpointFailure, Command, DedupReply, LogLine, NodeAgent, NodeStatus,
    Reply, RestoreFailure, RestoreReply, RunCommand, RunOutcome, RunReply, SandboxForm,
    SandboxMemory, SandboxStatus, SpawnCommand, SpawnReply, Stream, TemplateReply,
    TemplateStartCommand, TemplateStartReply, TemplateStatus,
};
pub use remote::{
    BaseFingerprints, BaseInfo, BaseKey, BaseReader, ImportedBase, PageSource, PageStream,
    RemoteBase, SyncReport,
};
pub use template::TemplateCounters;

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
    /// Where the dedup domains' fingerprint indexes live (set from the configuration's
    /// top-level `[registry]` section, not read from `[agent]`).
    #[serde(skip)]
    pub registry: RegistryConfig,
    /// Dedup starts restore lazily (`criu restore --lazy-pages` with the agent's own
    /// lazy-pages server fed by the rebuild, see `lazy.rs`); false restores from rebuilt pages
    /// files. Default true.
    pub lazy_restore: bool,
    /// Lazy dedup starts answer as soon as the restored runtime answered, the pages being
    /// filled in the background (`lazy.rs`); false waits for every page (an A/B switch; the
    /// environment's `MEDES_LAZY_EARLY_ANSWER=0` turns it off too). Default true.
    pub lazy_early_answer: bool,
    /// Lazy dedup starts also restore lazily the pages a process wrote in its private file
    /// mappings (relocated library data, the runtime's `.data`), which CRIU would restore
    /// eagerly: each run of them becomes a private anonymous mapping
    /// ([`medes_criu_image::lazify`]). An armed sandbox then holds almost none of its pages
    /// while stopped. false keeps CRIU's split (an A/B switch). Default true.
    pub lazy_file_pages: bool,
    /// Dedup sandboxes per function kept **armed**: restored lazily ahead of their request
    /// and left stopped, so a dedup start only resumes them (`armed.rs`; needs
    /// `lazy_restore`). Each holds its stopped tree and its store in memory, counted in its
    /// held bytes. 0 turns arming off. Default 1.
    pub armed_per_function: usize,
}

/// How the agent deduplicates and restores sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupSettings {
    /// Directory (a tmpfs; mounted if it is not one) for checkpoint images, base images and
    /// dedup stores. Each data directory gets its own subdirectory,
    /// `d<xxh3 of the canonical data_dir, 16 hex digits>`, stable across restarts, so a
    /// restarted agent (or `medes serve`) finds the stores and bases it kept; a machine reboot
    /// empties it. Subdirectories whose data directory no longer exists are removed by the
    /// next agent. Default `/run/medes/images`.
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
    /// Bound on reading another node's base pages (from the start of the read), ms: a dedup
    /// start whose remote pages are not all there by then fails (the controller falls back to
    /// a cold start). Default 2000.
    pub remote_read_timeout_ms: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        DedupSettings {
            images_dir: "/run/medes/images".into(),
            max_concurrent_dedups: 1,
            share_across_tenants: false,
            engine: medes_dedup::DedupConfig::default(),
            restore_timeout_ms: 10_000,
            remote_read_timeout_ms: 2_000,
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
            registry: RegistryConfig::default(),
            lazy_restore: true,
            lazy_early_answer: true,
            lazy_file_pages: true,
            armed_per_function: 1,
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
    /// A worker thread pool could not be started.
    #[error("starting the {which} thread pool")]
    Pool {
        /// Which pool.
        which: &'static str,
        /// The cause.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// The images directory could not be prepared (created, mounted as a tmpfs).
    #[error("preparing the images directory {path:?}")]
    ImagesDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The registry backend (Redis Cluster) could not be reached.
    #[error("connecting to the registry backend")]
    Registry(#[source] medes_registry_redis::ConnectError),
}

/// Counts of the dedup paths' outcomes since the agent started (also logged one by one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupCounters {
    /// Sandboxes deduplicated (new stores).
    pub dedups: u64,
    /// Re-dedups that reused the previous store.
    pub reused: u64,
    /// Dedup or make-base refused: the sandbox could not be checkpointed or deduplicated.
    pub not_deduplicable: u64,
    /// Bases made.
    pub bases: u64,
    /// Bases retired.
    pub retired: u64,
    /// Dedup starts that succeeded.
    pub restores: u64,
    /// Dedup starts that failed (the dedup sandbox was purged).
    pub restore_failures: u64,
    /// Dedup stores and bases an earlier agent kept that this one reloaded (verified).
    #[serde(default)]
    pub kept_loaded: u64,
    /// Kept dedup stores and bases this agent dropped at start (corrupt, incomplete or
    /// unusable; each logged with its reason).
    #[serde(default)]
    pub kept_dropped: u64,
    /// Dedup starts that succeeded through the lazy restore (part of `restores`).
    #[serde(default)]
    pub lazy_restores: u64,
    /// Lazy dedup starts that could not start and used the plain restore instead.
    #[serde(default)]
    pub lazy_fallbacks: u64,
    /// Dedup sandboxes armed (restored ahead of their request, left stopped).
    #[serde(default)]
    pub arms: u64,
    /// Arms that failed (the start then takes the unarmed path).
    #[serde(default)]
    pub arm_failures: u64,
    /// Armed sandboxes killed before a start used them (purge, newer one armed, changed
    /// inputs, shutdown).
    #[serde(default)]
    pub disarms: u64,
    /// Dedup starts that resumed an armed sandbox (part of `restores` and `lazy_restores`).
    #[serde(default)]
    pub armed_starts: u64,
}

/// The local node agent. Cheap to clone (all clones share one node).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AgentConfig,
    code_root: PathBuf,
    /// This agent's own subdirectory of `cfg.dedup.images_dir`.
    images: PathBuf,
    sandboxes: Mutex<HashMap<SandboxId, Entry>>,
    domains: domain::Domains,
    next_base: AtomicU32,
    starts: Semaphore,
    dedups: Semaphore,
    /// Background work (dedup, make-base): niced threads.
    bg_pool: rayon::ThreadPool,
    /// Dedup starts (rebuilds): never queued behind background work.
    fg_pool: rayon::ThreadPool,
    counters: Mutex<DedupCounters>,
    /// The last measured restore transient (m_R) per function (see
    /// [`RestoreReply::transient_bytes`]).
    transients: Mutex<BTreeMap<String, u64>>,
    /// Per-function templates (issue 8, `template.rs`).
    templates: template::Templates,
    shutting_down: AtomicBool,
    /// Other nodes' bases (issue 7, `remote.rs`).
    remote: Arc<remote::Remote>,
    /// Background fills of lazy starts that answered early, base page sums (`lazy.rs`).
    lazy: lazy::LazyState,
    /// Armed dedup sandboxes (`armed.rs`).
    armed: armed::ArmedSet,
}

/// A sandbox in the table.
enum Entry {
    /// A live runtime (warm, or a base when `Slot::base` is set).
    Live(Arc<Slot>),
    /// A dedup sandbox: no process, a store.
    Dedup(Arc<DedupRec>),
    /// A dedup or a dedup start is in progress; `purge` records a purge asked meanwhile.
    Busy { form: SandboxForm, purge: bool },
    /// A base whose process was lost while dedup sandboxes still depend on its pages, with the
    /// action and version it ran (`None` only for a base an older agent kept without them, or
    /// a template's orphaned base): reported in its status, so that a restarted controller
    /// keeps it as its function's base. A base whose process the controller released
    /// ([`Command::ReleaseBase`], `BaseOrigin::released`) is one too, kept without dependents.
    LostBase(Arc<BaseRec>, Option<persist::BaseOrigin>),
}

/// What every form of a sandbox keeps: how to recreate it, and its dedup domain.
struct SandboxInfo {
    spec: SandboxSpec,
    domain: Arc<domain::Domain>,
    function: String,
    /// The action and version it runs (reported in [`SandboxStatus`], kept with its store).
    action: ActionName,
    version: String,
}

impl SandboxInfo {
    /// The action and version it runs (kept with a base it becomes).
    fn origin(&self) -> persist::BaseOrigin {
        persist::BaseOrigin {
            action: self.action.clone(),
            version: self.version.clone(),
            released: false,
        }
    }
}

/// One live sandbox. Whoever gets it back from `Arc::into_inner` destroys it.
struct Slot {
    sandbox: Sandbox,
    info: Arc<SandboxInfo>,
    /// Set once the sandbox is a base.
    base: Mutex<Option<Arc<BaseRec>>>,
    /// The store it was restored from, kept for a re-dedup (see [`DedupReply::reused_previous`]).
    store: Mutex<Option<Arc<DedupRec>>>,
    /// A make-base or dedup holds the sandbox (or its lazy start's fill, see `lazy.rs`).
    changing: AtomicBool,
    /// The background fill of the lazy start that restored it, if it answered early.
    fill: Option<lazy::Fill>,
}

impl Slot {
    fn new(sandbox: Sandbox, info: Arc<SandboxInfo>, store: Option<Arc<DedupRec>>) -> Slot {
        Slot {
            sandbox,
            info,
            base: Mutex::new(None),
            store: Mutex::new(store),
            changing: AtomicBool::new(false),
            fill: None,
        }
    }

    fn form(&self) -> SandboxForm {
        if self.base.lock().is_some() {
            SandboxForm::Base
        } else {
            SandboxForm::Warm
        }
    }
}

/// A base: its pages are resident in its domain.
struct BaseRec {
    domain: Arc<domain::Domain>,
    id: BaseId,
    /// Bytes of its resident pages.
    bytes: u64,
    /// Its pages.
    pages: u64,
}

impl BaseRec {
    /// Memory held for the base besides its process: resident pages and its share of the
    /// registry.
    fn held(&self) -> u64 {
        self.bytes + self.domain.registry_share(self.pages)
    }
}

/// A dedup sandbox's store. Dropping the last reference deletes the store file (unless it is
/// kept for the next agent, see [`Agent::shutdown`]) and releases the bases it points into.
struct DedupRec {
    info: Arc<SandboxInfo>,
    path: PathBuf,
    stored_bytes: u64,
    image_bytes: u64,
    pages: u64,
    _pins: domain::Pins,
    /// Set at shutdown: the files stay for the next agent.
    keep: AtomicBool,
}

impl DedupRec {
    fn new(
        info: Arc<SandboxInfo>,
        path: PathBuf,
        stored_bytes: u64,
        image_bytes: u64,
        pages: u64,
        pins: domain::Pins,
    ) -> DedupRec {
        DedupRec {
            info,
            path,
            stored_bytes,
            image_bytes,
            pages,
            _pins: pins,
            keep: AtomicBool::new(false),
        }
    }

    /// Writes the metadata that lets the next agent restore the store.
    fn save_meta(&self, bases: &[BaseId]) {
        let i = &self.info;
        let meta = persist::StoreFile {
            format: 1,
            sandbox: i.spec.id.clone(),
            action: i.action.clone(),
            version: i.version.clone(),
            domain: i.domain.key.clone(),
            code_dir: i.spec.code_dir.clone(),
            memory_limit: i.spec.memory_limit,
            env: i.spec.env.clone(),
            image_bytes: self.image_bytes,
            pages: self.pages,
            bases: bases.to_vec(),
        };
        if let Err(error) = persist::save_store_meta(&self.path, &meta) {
            warn!(path = %self.path.display(), %error, "dedup store metadata not written: the store will not survive an agent restart");
        }
    }
}

impl Drop for DedupRec {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::SeqCst) {
            persist::remove_store(&self.path);
        }
    }
}

impl Agent {
    /// An agent for one node; creates `<data_dir>/code` and the images directory (mounting a
    /// tmpfs there if it is not on one), and removes what sandboxes and agents of dead processes
    /// (a crashed earlier agent) left behind. Call [`medes_sandbox::preflight`] first to check
    /// the host.
    pub fn new(cfg: AgentConfig) -> Result<Agent, NewAgentError> {
        let code_root = cfg.data_dir.join("code");
        std::fs::create_dir_all(&code_root).map_err(|source| NewAgentError::CodeDir {
            path: code_root.clone(),
            source,
        })?;
        let images = images::prepare(&cfg.dedup.images_dir, &cfg.data_dir).map_err(|source| {
            NewAgentError::ImagesDir {
                path: cfg.dedup.images_dir.clone(),
                source,
            }
        })?;
        let stale = medes_sandbox::cleanup_stale(&cfg.sandbox);
        if stale > 0 {
            info!(node = %cfg.node_id, removed = stale, "removed leftovers of earlier sandboxes");
        }
        let starts = Semaphore::new(cfg.max_concurrent_starts.max(1));
        let dedups = Semaphore::new(cfg.dedup.max_concurrent_dedups.max(1));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let bg_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .thread_name(|i| format!("medes-dedup-{i}"))
            .start_handler(|_| {
                let _ = medes_sandbox::set_thread_nice(10);
            })
            .build()
            .map_err(|source| NewAgentError::Pool {
                which: "dedup",
                source,
            })?;
        let fg_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .thread_name(|i| format!("medes-rebuild-{i}"))
            .build()
            .map_err(|source| NewAgentError::Pool {
                which: "rebuild",
                source,
            })?;
        let remote = Arc::new(remote::Remote::new(
            cfg.dedup.remote_read_timeout_ms,
            Some(images.join("remote.json")),
        ));
        let domains = domain::Domains::new(Some(images.join("bases"))).with_remote(remote.clone());
        let domains = domains.with_registry_backends(
            registry_backend::RegistryBackends::new(&cfg.registry, &cfg.node_id.0)
                .map_err(NewAgentError::Registry)?,
        );
        // Other nodes' bases the kept stores use (before the stores are loaded and pinned).
        remote.reload(&domains, cfg.dedup.engine.local_node);
        // What the previous agent on this data directory kept (verified; see `persist.rs`).
        let loaded = bg_pool.install(|| persist::load(&images, &domains, &cfg.dedup.engine));
        let mut table = HashMap::new();
        let kept_loaded = (loaded.bases.len() + loaded.stores.len()) as u64;
        for b in loaded.bases {
            table.insert(b.sandbox, Entry::LostBase(b.rec, b.origin));
        }
        for st in loaded.stores {
            table.insert(st.sandbox, Entry::Dedup(st.rec));
        }
        let next_base = loaded.max_base.map_or(0, |m| m.saturating_add(1));
        let templates = template::Templates::new(&images, loaded.templates).map_err(|source| {
            NewAgentError::ImagesDir {
                path: cfg.dedup.images_dir.clone(),
                source,
            }
        })?;
        let counters = DedupCounters {
            kept_loaded,
            kept_dropped: loaded.dropped,
            ..DedupCounters::default()
        };
        let agent = Agent {
            inner: Arc::new(Inner {
                cfg,
                code_root,
                images,
                sandboxes: Mutex::new(table),
                domains,
                next_base: AtomicU32::new(next_base),
                starts,
                dedups,
                bg_pool,
                fg_pool,
                counters: Mutex::new(counters),
                transients: Mutex::new(BTreeMap::new()),
                templates,
                shutting_down: AtomicBool::new(false),
                remote,
                lazy: lazy::LazyState::default(),
                armed: armed::ArmedSet::new(),
            }),
        };
        // The dedup sandboxes an earlier agent kept are armed again (`armed.rs`), in the
        // background of the runtime that runs this agent (none: they are armed after their
        // function's next dedup or start).
        if tokio::runtime::Handle::try_current().is_ok() {
            let functions: std::collections::BTreeSet<String> = agent
                .inner
                .sandboxes
                .lock()
                .values()
                .filter_map(|e| match e {
                    Entry::Dedup(r) => Some(r.info.function.clone()),
                    _ => None,
                })
                .collect();
            for f in functions {
                agent.inner.rearm(&f, Duration::ZERO);
            }
        }
        Ok(agent)
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.inner.cfg.node_id
    }

    /// Number of sandboxes on the node, in any form.
    pub fn n_sandboxes(&self) -> usize {
        self.inner.sandboxes.lock().len()
    }

    /// Counts of the dedup paths' outcomes.
    pub fn dedup_counters(&self) -> DedupCounters {
        *self.inner.counters.lock()
    }

    /// The armed (and arming) dedup sandboxes and what each holds (`[agent]
    /// armed_per_function`).
    pub fn armed(&self) -> Vec<ArmedStatus> {
        self.inner.armed.status()
    }

    /// This agent's directory of checkpoint images and dedup stores (on a tmpfs).
    pub fn images_dir(&self) -> &Path {
        &self.inner.images
    }

    /// The path of a dedup sandbox's store file, if it is one (for inspection and fault
    /// injection in tests).
    pub fn store_path(&self, sandbox: &SandboxId) -> Option<PathBuf> {
        match self.inner.sandboxes.lock().get(sandbox) {
            Some(Entry::Dedup(r)) => Some(r.path.clone()),
            _ => None,
        }
    }

    /// Counts of the template paths' outcomes (issue 8).
    pub fn template_counters(&self) -> TemplateCounters {
        *self.inner.templates.counters.lock()
    }

    /// The directory of the ready template of `action`, if there is one (for inspection and
    /// fault injection in tests).
    pub fn template_dir(&self, action: &ActionName) -> Option<PathBuf> {
        self.inner.templates.dir_of(action)
    }

    /// Fault injection for tests: drops the resident pages of a base sandbox's image (its
    /// registry entries and dependents stay), as if the base image were lost. Returns whether
    /// there were pages to drop.
    #[doc(hidden)]
    pub fn lose_base_pages(&self, sandbox: &SandboxId) -> bool {
        let base = match self.inner.sandboxes.lock().get(sandbox) {
            Some(Entry::Live(s)) => s.base.lock().clone(),
            Some(Entry::LostBase(b, _)) => Some(b.clone()),
            _ => None,
        };
        base.is_some_and(|b| b.domain.lose_pages(b.id))
    }

    /// Refuses new work and destroys every live sandbox (running ones as soon as their runs
    /// end). Dedup stores and the bases they depend on are **kept** on the tmpfs for the next
    /// agent on the same data directory ([`Agent::new`] reloads them); [`Agent::purge_kept`]
    /// removes them. Work in flight (dumps, rebuilt images) is removed; a dedup or dedup start
    /// in flight is lost.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.disarm_all().await;
        let all: Vec<Entry> = self
            .inner
            .sandboxes
            .lock()
            .drain()
            .map(|(_, s)| s)
            .collect();
        let n = all.len();
        let mut kept = 0;
        let mut slots = Vec::new();
        for e in all {
            match e {
                Entry::Live(s) => slots.push(s),
                Entry::Dedup(r) => {
                    r.keep.store(true, Ordering::SeqCst);
                    kept += 1;
                }
                _ => {}
            }
        }
        futures::future::join_all(slots.into_iter().map(release)).await;
        self.inner.templates.clear();
        medes_sandbox::remove_cgroup_parent(&self.inner.cfg.sandbox);
        let images = self.inner.images.clone();
        let _ = tokio::task::spawn_blocking(move || images::release(&images)).await;
        info!(node = %self.inner.cfg.node_id, sandboxes = n, kept_dedup = kept, "node agent shut down");
    }

    /// Removes everything this agent's data directory keeps across restarts (dedup stores and
    /// bases on the tmpfs). Call after [`Agent::shutdown`] to leave nothing behind (throw-away
    /// data directories of benchmarks and tests); a running agent loses its dedup sandboxes.
    pub async fn purge_kept(&self) {
        let images = self.inner.images.clone();
        let r = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(images)).await;
        if let Ok(Err(error)) = r
            && error.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.inner.images.display(), %error, "removing kept stores and bases");
        }
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
                Command::MakeBase { sandbox } => {
                    inner.make_base(sandbox).await.map(Reply::BaseReady)
                }
                Command::Dedup { sandbox } => inner.dedup(sandbox).await.map(Reply::Deduped),
                Command::Restore { sandbox } => inner.restore(sandbox).await.map(Reply::Restored),
                Command::MakeTemplate { sandbox } => {
                    inner.make_template(sandbox).await.map(Reply::TemplateReady)
                }
                Command::TemplateStart(c) => {
                    inner.template_start(c).await.map(Reply::TemplateStarted)
                }
                Command::ReleaseBase { sandbox } => {
                    inner.release_base(sandbox).await.map(|()| Reply::Purged)
                }
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
        destroy(slot).await;
    }
}

async fn destroy(slot: Slot) {
    let id = slot.sandbox.id().clone();
    match slot.sandbox.destroy().await {
        Ok(()) => debug!(sandbox = %id, "sandbox destroyed"),
        Err(e) => warn!(sandbox = %id, error = %e, "destroying sandbox left something behind"),
    }
}

/// Waits until `slot` is the last reference (in-flight runs and status walks end), so the
/// sandbox can be destroyed before the caller goes on.
async fn take_last(mut slot: Arc<Slot>) -> Slot {
    loop {
        match Arc::try_unwrap(slot) {
            Ok(s) => return s,
            Err(s) => {
                slot = s;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn wrong_form(sandbox: SandboxId, form: SandboxForm, reason: &str) -> AgentError {
    AgentError::WrongForm {
        sandbox,
        form,
        reason: reason.into(),
    }
}

impl Inner {
    fn check_running(&self) -> Result<(), AgentError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Err(AgentError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// The live slot of `id`, or the error that fits the entry.
    fn live(&self, id: &SandboxId) -> Result<Arc<Slot>, AgentError> {
        match self.sandboxes.lock().get(id) {
            Some(Entry::Live(s)) => Ok(s.clone()),
            Some(Entry::Dedup(_)) => Err(wrong_form(
                id.clone(),
                SandboxForm::Dedup,
                "a dedup sandbox must be restored first",
            )),
            Some(Entry::Busy { form, .. }) => Err(wrong_form(
                id.clone(),
                *form,
                "a dedup or a dedup start is in progress",
            )),
            Some(Entry::LostBase(..)) => Err(wrong_form(
                id.clone(),
                SandboxForm::Base,
                "the base's process was lost; only its pages remain",
            )),
            None => Err(AgentError::UnknownSandbox(id.clone())),
        }
    }

    /// Replaces the entry of `id` by `new` if it is still the live `slot`; returns whether it
    /// was.
    fn swap_live(&self, id: &SandboxId, slot: &Arc<Slot>, new: Entry) -> bool {
        let mut t = self.sandboxes.lock();
        match t.get(id) {
            Some(Entry::Live(s)) if Arc::ptr_eq(s, slot) => {
                t.insert(id.clone(), new);
                true
            }
            _ => false,
        }
    }

    /// Ends a `Busy` entry: puts `new` in its place (or removes it with `None`). Returns false
    /// (and removes the entry) when a purge was asked meanwhile.
    fn finish_busy(&self, id: &SandboxId, new: Option<Entry>) -> bool {
        let mut t = self.sandboxes.lock();
        let purged = !matches!(t.get(id), Some(Entry::Busy { purge: false, .. }));
        match new {
            Some(e) if !purged => {
                t.insert(id.clone(), e);
            }
            _ => {
                t.remove(id);
            }
        }
        !purged
    }

    /// The slot lost its process: take it out of the table. A base with dependents leaves its
    /// pages behind as a [`Entry::LostBase`].
    async fn drop_lost(&self, id: &SandboxId, slot: &Arc<Slot>) {
        let base = slot.base.lock().clone();
        let keep = match base {
            Some(b) if b.domain.retire(b.id).is_err() => Some(b),
            Some(_) => {
                self.counters.lock().retired += 1;
                None
            }
            None => None,
        };
        let removed = {
            let mut t = self.sandboxes.lock();
            match t.get(id) {
                Some(Entry::Live(s)) if Arc::ptr_eq(s, slot) => match keep {
                    Some(b) => {
                        match t.insert(id.clone(), Entry::LostBase(b, Some(slot.info.origin()))) {
                            Some(Entry::Live(s)) => Some(s),
                            _ => None,
                        }
                    }
                    None => match t.remove(id) {
                        Some(Entry::Live(s)) => Some(s),
                        _ => None,
                    },
                },
                _ => None,
            }
        };
        if let Some(s) = removed {
            release(s).await;
        }
    }

    async fn spawn(self: &Arc<Self>, c: SpawnCommand) -> Result<SpawnReply, AgentError> {
        self.check_running()?;
        if !valid_id(&c.sandbox) || self.sandboxes.lock().contains_key(&c.sandbox) {
            return Err(AgentError::BadSandboxId(c.sandbox));
        }
        self.templates.invalidate_other(&c.action, &c.version);
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
        let domain_key = if self.cfg.dedup.share_across_tenants {
            "*".to_string()
        } else {
            c.action.namespace.0.clone()
        };
        let info = Arc::new(SandboxInfo {
            spec: spec.clone(),
            domain: self.domains.get(&domain_key),
            function: c.action.to_string(),
            action: c.action.clone(),
            version: c.version.clone(),
        });
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
                let slot = Arc::new(Slot::new(sandbox, info, None));
                self.sandboxes
                    .lock()
                    .insert(c.sandbox.clone(), Entry::Live(slot));
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
        let slot = self.live(&c.sandbox)?;
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
            self.drop_lost(&c.sandbox, &slot).await;
        }
        release(slot).await;
        Ok(reply)
    }

    async fn purge(self: &Arc<Self>, id: SandboxId) -> Result<(), AgentError> {
        let removed = {
            let mut t = self.sandboxes.lock();
            let base = match t.get_mut(&id) {
                None => return Err(AgentError::UnknownSandbox(id)),
                Some(Entry::Busy { purge, .. }) => {
                    *purge = true;
                    return Ok(());
                }
                Some(Entry::Live(s)) => s.base.lock().clone(),
                Some(Entry::LostBase(b, _)) => Some(b.clone()),
                Some(Entry::Dedup(_)) => None,
            };
            if let Some(b) = base {
                if let Err(domain::RetireError::InUse(dependents)) = b.domain.retire(b.id) {
                    return Err(AgentError::BaseInUse {
                        sandbox: id,
                        dependents,
                    });
                }
                self.counters.lock().retired += 1;
                self.remote.bases_changed();
                info!(sandbox = %id, base = b.id.0, domain = %b.domain.key, "base retired");
            }
            t.remove(&id)
        };
        match removed {
            Some(Entry::Live(slot)) => release(slot).await,
            Some(Entry::Dedup(rec)) => {
                // Its armed tree goes first; the store file goes with the last reference (a
                // restore may hold one).
                self.disarm(&id).await;
                self.rearm(&rec.info.function, Duration::ZERO);
                drop(rec);
            }
            _ => {}
        }
        Ok(())
    }

    /// Ends a base's process and keeps the base (its resident image, its pages in the registry
    /// of its domain) as an [`Entry::LostBase`] marked released: dedup sandboxes keep
    /// restoring against it, later dedups still find it, and it stays without dependents until
    /// a purge retires it. The process ends once in-flight runs (if any) end. Idempotent.
    async fn release_base(self: &Arc<Self>, id: SandboxId) -> Result<(), AgentError> {
        self.check_running()?;
        let slot = match self.live(&id) {
            Ok(s) => s,
            Err(AgentError::WrongForm {
                form: SandboxForm::Base,
                ..
            }) if matches!(self.sandboxes.lock().get(&id), Some(Entry::LostBase(..))) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(base) = slot.base.lock().clone() else {
            return Err(wrong_form(id, slot.form(), "not a base"));
        };
        let origin = persist::BaseOrigin {
            released: true,
            ..slot.info.origin()
        };
        if !self.swap_live(&id, &slot, Entry::LostBase(base.clone(), Some(origin))) {
            return Err(AgentError::UnknownSandbox(id));
        }
        // The mark survives an agent restart (which else retires a base without dependents).
        let (dir, bid) = (self.images.join("bases"), base.id);
        let marked = tokio::task::spawn_blocking(move || persist::mark_released(&dir, bid)).await;
        if let Ok(Err(error)) = marked {
            warn!(sandbox = %id, base = bid.0, %error, "the released mark of a base was not saved: a restarted agent retires it once nothing depends on it");
        }
        info!(sandbox = %id, base = base.id.0, domain = %base.domain.key, image_mb = base.bytes >> 20, "base process released; its image stays the base");
        release(slot).await;
        Ok(())
    }

    /// Retires bases whose process was lost (or that an earlier agent kept) once no dedup
    /// store depends on them any more (not those whose process was released on purpose).
    fn retire_orphan_bases(&self) {
        self.sweep_templates();
        let mut t = self.sandboxes.lock();
        let orphans: Vec<SandboxId> = t
            .iter()
            .filter_map(|(id, e)| match e {
                Entry::LostBase(b, o)
                    if b.domain.dependents(b.id) == 0
                        && !o.as_ref().is_some_and(|o| o.released) =>
                {
                    Some(id.clone())
                }
                _ => None,
            })
            .collect();
        for id in orphans {
            if let Some(Entry::LostBase(b, _)) = t.get(&id)
                && b.domain.retire(b.id).is_ok()
            {
                info!(sandbox = %id, base = b.id.0, domain = %b.domain.key, "base without process and dependents retired");
                t.remove(&id);
                self.counters.lock().retired += 1;
            }
        }
    }

    async fn status(self: &Arc<Self>) -> NodeStatus {
        enum Seen {
            Live(Arc<Slot>),
            Fixed(SandboxStatus),
        }
        self.retire_orphan_bases();
        let described = |id: &SandboxId, i: &SandboxInfo, form, alive, held_bytes| SandboxStatus {
            id: id.clone(),
            alive,
            memory: None,
            form,
            held_bytes,
            action: Some(i.action.clone()),
            version: Some(i.version.clone()),
            domain: Some(i.domain.key.clone()),
            memory_limit: Some(i.spec.memory_limit),
            image_bytes: None,
        };
        let seen: Vec<Seen> = self
            .sandboxes
            .lock()
            .iter()
            .map(|(id, e)| match e {
                Entry::Live(s) => Seen::Live(s.clone()),
                Entry::Dedup(r) => {
                    // An armed one holds its stopped tree and its loaded store too.
                    let armed = self.armed.status_of(id).filter(|a| a.ready);
                    let extra = armed.as_ref().map_or(0, ArmedStatus::extra_bytes);
                    Seen::Fixed(SandboxStatus {
                        image_bytes: Some(r.image_bytes),
                        memory: armed.map(|a| SandboxMemory {
                            pss: Bytes(0),
                            rss: Bytes(0),
                            cgroup_usage: Bytes(a.cgroup_bytes),
                        }),
                        ..described(
                            id,
                            &r.info,
                            SandboxForm::Dedup,
                            false,
                            r.stored_bytes + extra,
                        )
                    })
                }
                Entry::Busy { form, .. } => Seen::Fixed(SandboxStatus {
                    id: id.clone(),
                    alive: false,
                    memory: None,
                    form: *form,
                    held_bytes: 0,
                    action: None,
                    version: None,
                    domain: None,
                    memory_limit: None,
                    image_bytes: None,
                }),
                Entry::LostBase(b, origin) => Seen::Fixed(SandboxStatus {
                    id: id.clone(),
                    alive: false,
                    memory: None,
                    form: SandboxForm::Base,
                    held_bytes: b.held(),
                    action: origin.as_ref().map(|o| o.action.clone()),
                    version: origin.as_ref().map(|o| o.version.clone()),
                    domain: Some(b.domain.key.clone()),
                    memory_limit: None,
                    image_bytes: Some(b.bytes),
                }),
            })
            .collect();
        let node = self.cfg.node_id.clone();
        let (sandboxes, slots) = tokio::task::spawn_blocking(move || {
            let mut slots = Vec::new();
            let st = seen
                .into_iter()
                .map(|s| match s {
                    Seen::Fixed(st) => st,
                    Seen::Live(s) => {
                        let memory = s.sandbox.memory().ok().map(|m| SandboxMemory {
                            pss: m.pss,
                            rss: m.rss,
                            cgroup_usage: m.cgroup_usage,
                        });
                        let base = s.base.lock().as_ref().map_or(0, |b| b.held());
                        let kept = s.store.lock().as_ref().map_or(0, |r| r.stored_bytes);
                        let kept = kept + s.fill.as_ref().map_or(0, lazy::Fill::held_bytes);
                        let st = SandboxStatus {
                            memory,
                            ..described(
                                s.sandbox.id(),
                                &s.info,
                                s.form(),
                                s.sandbox.is_alive(),
                                memory.map_or(0, |m| m.pss.0) + base + kept,
                            )
                        };
                        slots.push(s);
                        st
                    }
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
        NodeStatus {
            node,
            sandboxes,
            restore_transient: self.transients.lock().clone(),
            templates: self.templates.status(),
        }
    }

    /// Takes a warm sandbox for a make-base or dedup (one at a time per sandbox).
    fn claim(&self, id: &SandboxId) -> Result<Arc<Slot>, AgentError> {
        let slot = self.live(id)?;
        if slot.base.lock().is_some() {
            return Err(wrong_form(id.clone(), SandboxForm::Base, "already a base"));
        }
        if slot
            .changing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(wrong_form(
                id.clone(),
                SandboxForm::Warm,
                "a make-base or dedup of it is in progress",
            ));
        }
        Ok(slot)
    }

    fn not_deduplicable(
        &self,
        sandbox: SandboxId,
        kind: CheckpointFailure,
        reason: String,
        alive: bool,
    ) -> AgentError {
        self.counters.lock().not_deduplicable += 1;
        warn!(sandbox = %sandbox, reason = %reason, ?kind, sandbox_alive = alive, "not deduplicable");
        AgentError::NotDeduplicable {
            sandbox,
            reason,
            sandbox_alive: alive,
            kind,
        }
    }

    async fn make_base(self: &Arc<Self>, id: SandboxId) -> Result<BaseReply, AgentError> {
        self.check_running()?;
        self.settle_fill(&id).await;
        let slot = self.claim(&id)?;
        let r = self.make_base_of(&id, &slot).await;
        slot.changing.store(false, Ordering::SeqCst);
        if r.is_err() && !slot.sandbox.is_alive() {
            self.drop_lost(&id, &slot).await;
        }
        release(slot).await;
        r
    }

    async fn make_base_of(
        self: &Arc<Self>,
        id: &SandboxId,
        slot: &Arc<Slot>,
    ) -> Result<BaseReply, AgentError> {
        let _permit = self
            .dedups
            .acquire()
            .await
            .map_err(|_| AgentError::ShuttingDown)?;
        let dir = self.images.join("base").join(&id.0);
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let ck = slot
            .sandbox
            .checkpoint(&dir, CheckpointMode::LeaveRunning)
            .await;
        let checkpoint_ms = ms(t0.elapsed());
        if let Err(e) = ck {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(self.not_deduplicable(
                id.clone(),
                checkpoint_failure(&e),
                error_chain(&e),
                slot.sandbox.is_alive(),
            ));
        }
        let t1 = Instant::now();
        let base_id = BaseId(self.next_base.fetch_add(1, Ordering::Relaxed));
        let domain = slot.info.domain.clone();
        let meta = BaseMeta {
            function: slot.info.function.clone(),
            node: self.cfg.dedup.engine.local_node,
        };
        let engine = self.cfg.dedup.engine;
        let origin = slot.info.origin();
        let d2 = dir.clone();
        let dom = domain.clone();
        let inner = self.clone();
        let sb_id = id.clone();
        let r = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(d2.join("dump.log"));
            let dump = DumpImage::open(&d2).map_err(CheckpointImageError::OpenDump)?;
            let bytes = inner
                .bg_pool
                .install(|| dom.add_base(base_id, meta, &dump, &engine, &sb_id, &origin))
                .map_err(CheckpointImageError::AddBase)?;
            Ok((bytes, dump.pages_bytes(), dump.n_pages()))
        })
        .await
        .unwrap_or_else(|source| {
            Err(CheckpointImageError::Task {
                what: "base",
                source,
            })
        });
        let _ = std::fs::remove_dir_all(&dir);
        let (bytes, image_bytes, pages) = r.map_err(|e| {
            self.not_deduplicable(id.clone(), CheckpointFailure::Image, error_chain(&e), true)
        })?;
        let rec = Arc::new(BaseRec {
            domain: domain.clone(),
            id: base_id,
            bytes,
            pages,
        });
        let still_here = {
            let t = self.sandboxes.lock();
            matches!(t.get(id), Some(Entry::Live(s)) if Arc::ptr_eq(s, slot))
        };
        if !still_here {
            let _ = domain.retire(base_id);
            return Err(AgentError::UnknownSandbox(id.clone()));
        }
        *slot.base.lock() = Some(rec);
        self.counters.lock().bases += 1;
        self.remote.bases_changed();
        let register_ms = ms(t1.elapsed());
        info!(sandbox = %id, base = base_id.0, domain = %domain.key, image_bytes, checkpoint_ms,
              register_ms, "sandbox is a base");
        Ok(BaseReply {
            image_bytes,
            pages,
            checkpoint_ms,
            register_ms,
        })
    }

    async fn dedup(self: &Arc<Self>, id: SandboxId) -> Result<DedupReply, AgentError> {
        self.check_running()?;
        self.settle_fill(&id).await;
        let slot = self.claim(&id)?;
        let permit = match self.dedups.acquire().await {
            Ok(p) => p,
            Err(_) => {
                slot.changing.store(false, Ordering::SeqCst);
                release(slot).await;
                return Err(AgentError::ShuttingDown);
            }
        };
        let busy = Entry::Busy {
            form: SandboxForm::Warm,
            purge: false,
        };
        if !self.swap_live(&id, &slot, busy) {
            slot.changing.store(false, Ordering::SeqCst);
            release(slot).await;
            return Err(AgentError::UnknownSandbox(id));
        }
        // Re-dedup of a sandbox restored from a store: the store still describes it (functions
        // are stateless), so stop the process and keep the store.
        let kept = slot.store.lock().take();
        let slot_function = slot.info.function.clone();
        if let Some(rec) = kept {
            drop(permit);
            destroy(take_last(slot).await).await;
            let reply = DedupReply {
                image_bytes: rec.image_bytes,
                stored_bytes: rec.stored_bytes,
                checkpoint_ms: 0.0,
                dedup_ms: 0.0,
                pages: rec.pages,
                reused_previous: true,
            };
            if !self.finish_busy(&id, Some(Entry::Dedup(rec))) {
                return Err(AgentError::UnknownSandbox(id));
            }
            self.counters.lock().reused += 1;
            debug!(sandbox = %id, "re-dedup reused the previous store");
            self.armed.note_deduped(&id);
            self.rearm(&slot_function, Duration::ZERO);
            return Ok(reply);
        }

        let dir = self.images.join("ckpt").join(&id.0);
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let ck = slot.sandbox.checkpoint(&dir, CheckpointMode::Stop).await;
        let checkpoint_ms = ms(t0.elapsed());
        if let Err(e) = ck {
            let _ = std::fs::remove_dir_all(&dir);
            let alive = slot.sandbox.is_alive();
            slot.changing.store(false, Ordering::SeqCst);
            let kept = alive && self.finish_busy(&id, Some(Entry::Live(slot.clone())));
            if !alive {
                self.finish_busy(&id, None);
            }
            release(slot).await;
            return Err(self.not_deduplicable(id, checkpoint_failure(&e), error_chain(&e), kept));
        }
        // The process is gone; free its cgroup, netns and run directory now.
        let info = slot.info.clone();
        destroy(take_last(slot).await).await;

        let t1 = Instant::now();
        let path = self.images.join("store").join(format!("{}.medes", id.0));
        let engine = self.cfg.dedup.engine;
        let domain = info.domain.clone();
        let (d2, p2) = (dir.clone(), path.clone());
        let inner = self.clone();
        let sb_id = id.clone();
        let r = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(d2.join("dump.log"));
            let dump = DumpImage::open(&d2).map_err(CheckpointImageError::OpenDump)?;
            let (snap, mut pins) = domain.pin_all();
            // Against its template first if it was born from one (`template.rs`).
            let (store, stats) = inner
                .dedup_pass(&sb_id, &dump, &domain, &snap, &engine)
                .map_err(CheckpointImageError::Dedup)?;
            pins.retain(&store.bases);
            let written = store.write(&p2).map_err(CheckpointImageError::WriteStore)?;
            Ok((written, dump.pages_bytes(), stats, pins))
        })
        .await
        .unwrap_or_else(|source| {
            Err(CheckpointImageError::Task {
                what: "dedup",
                source,
            })
        });
        let _ = std::fs::remove_dir_all(&dir);
        drop(permit);
        let (written, image_bytes, stats, pins) = match r {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                self.finish_busy(&id, None);
                let reason = error_chain(&e);
                return Err(self.not_deduplicable(id, CheckpointFailure::Image, reason, false));
            }
        };
        let dedup_ms = ms(t1.elapsed());
        let n_bases = pins.ids().len();
        let bases = pins.ids().to_vec();
        let rec = Arc::new(DedupRec::new(
            info,
            path,
            images::held_bytes(written),
            image_bytes,
            stats.pages,
            pins,
        ));
        rec.save_meta(&bases);
        let reply = DedupReply {
            image_bytes,
            stored_bytes: rec.stored_bytes,
            checkpoint_ms,
            dedup_ms,
            pages: stats.pages,
            reused_previous: false,
        };
        if !self.finish_busy(&id, Some(Entry::Dedup(rec))) {
            return Err(AgentError::UnknownSandbox(id));
        }
        self.counters.lock().dedups += 1;
        info!(sandbox = %id, image_bytes, stored_bytes = reply.stored_bytes, bases = n_bases,
              exact = stats.exact, patched = stats.patched, standalone = stats.standalone,
              zero = stats.zero, checkpoint_ms, dedup_ms, "sandbox deduplicated");
        self.armed.note_deduped(&id);
        self.rearm(&slot_function, Duration::ZERO);
        Ok(reply)
    }

    async fn restore(self: &Arc<Self>, id: SandboxId) -> Result<RestoreReply, AgentError> {
        self.check_running()?;
        let t0 = Instant::now();
        let rec = {
            let mut t = self.sandboxes.lock();
            let rec = match t.get(&id) {
                Some(Entry::Dedup(r)) => r.clone(),
                Some(Entry::Live(s)) => {
                    return Err(wrong_form(id, s.form(), "the sandbox is already warm"));
                }
                Some(Entry::Busy { form, .. }) => {
                    return Err(wrong_form(
                        id,
                        *form,
                        "a dedup or dedup start is in progress",
                    ));
                }
                Some(Entry::LostBase(..)) => {
                    return Err(wrong_form(
                        id,
                        SandboxForm::Base,
                        "a lost base has no store",
                    ));
                }
                None => return Err(AgentError::UnknownSandbox(id)),
            };
            t.insert(
                id.clone(),
                Entry::Busy {
                    form: SandboxForm::Dedup,
                    purge: false,
                },
            );
            rec
        };
        let sampler = transient::Sampler::start(self.images.join("restore").join(&id.0));
        let r = self.restore_from(&rec).await;
        let peaks = sampler.finish();
        // The next newest dedup sandbox of the function gets armed (after this start's own
        // request and fill had the node for a moment).
        self.rearm(&rec.info.function, armed::REARM_AFTER);
        match r {
            Ok((sandbox, mut reply)) => {
                // A lazy start's page buffers are already in `transient_images_bytes`.
                let held = reply.transient_images_bytes;
                reply.transient_images_bytes = held + peaks.images;
                reply.transient_criu_bytes = peaks.criu;
                reply.transient_bytes = held + peaks.total();
                self.transients
                    .lock()
                    .insert(rec.info.function.clone(), reply.transient_bytes);
                let mut slot = Slot::new(sandbox, rec.info.clone(), Some(rec));
                slot.fill = self.lazy.take_fill(&id);
                let slot = Arc::new(slot);
                lazy::hold_while_filling(&slot);
                if !self.finish_busy(&id, Some(Entry::Live(slot.clone()))) {
                    release(slot).await;
                    return Err(AgentError::UnknownSandbox(id));
                }
                reply.total_ms = ms(t0.elapsed());
                self.counters.lock().restores += 1;
                debug!(sandbox = %id, total_ms = reply.total_ms, read_base_ms = reply.read_base_ms,
                       rebuild_ms = reply.rebuild_ms, restore_ms = reply.restore_ms, "dedup start");
                Ok(reply)
            }
            Err(e) => {
                self.finish_busy(&id, None);
                drop(rec);
                self.counters.lock().restore_failures += 1;
                let (kind, reason) = (e.kind(), error_chain(&e));
                warn!(sandbox = %id, reason = %reason, ?kind, "dedup start failed; dedup sandbox purged");
                Err(AgentError::RestoreFailed {
                    sandbox: id,
                    kind,
                    reason,
                })
            }
        }
    }

    /// Loads and verifies the store of `rec`, checks its bases are there, and writes its
    /// non-page images into `dir`. `lean`: opened with [`DedupStore::open_lean`] (verified as
    /// a whole while streamed, only its metadata and non-page images kept, the page data read
    /// from the file on demand); else parsed whole into memory.
    async fn load_store(
        &self,
        rec: &Arc<DedupRec>,
        dir: &Path,
        lean: bool,
    ) -> Result<(lazy::LoadedStore, Arc<remote::ClusterBases>), DedupStartError> {
        let (rec2, dir2, remote) = (rec.clone(), dir.to_path_buf(), self.remote.clone());
        tokio::task::spawn_blocking(move || {
            let loaded = if lean {
                let (store, file) =
                    DedupStore::open_lean(&rec2.path).map_err(DedupStartError::Store)?;
                lazy::LoadedStore::File(Box::new((store, file)))
            } else {
                let store = DedupStore::load(&rec2.path).map_err(DedupStartError::Store)?;
                lazy::LoadedStore::InMemory(Arc::new(store))
            };
            let store = loaded.meta();
            // Local bases read directly; other nodes' pages prefetched from now on (remote.rs).
            let bases = remote
                .restore_view(&rec2.info.domain, store)
                .map_err(|reason| DedupStartError::RemoteBases { reason })?;
            let bases = Arc::new(bases);
            for b in &store.bases {
                bases
                    .n_pages(*b)
                    .map_err(|source| DedupStartError::MissingBase { base: *b, source })?;
            }
            for (name, data) in &store.images {
                let path = dir2.join(name);
                if let Err(source) = std::fs::write(&path, data) {
                    let what = "writing";
                    return Err(DedupStartError::Io { what, path, source });
                }
            }
            Ok((loaded, bases))
        })
        .await
        .unwrap_or_else(|source| {
            Err(DedupStartError::Task {
                what: "store",
                source,
            })
        })
    }

    /// Rebuilds the images of `rec` (verified) while the new sandbox is prepared, then restores.
    async fn restore_from(
        self: &Arc<Self>,
        rec: &Arc<DedupRec>,
    ) -> Result<(Sandbox, RestoreReply), DedupStartError> {
        let id = &rec.info.spec.id;
        // An armed sandbox (`armed.rs`): resumed, if its inputs are unchanged since they were
        // verified.
        if let Some(a) = self.take_armed(id).await {
            let t = Instant::now();
            match a.unchanged(rec) {
                Ok(()) => {
                    let r = lazy::resume(self, a.into_started(), ms(t.elapsed())).await;
                    match r {
                        Ok((sandbox, mut reply, held)) => {
                            reply.transient_images_bytes = held;
                            let mut c = self.counters.lock();
                            c.lazy_restores += 1;
                            c.armed_starts += 1;
                            return Ok((sandbox, reply));
                        }
                        Err(lazy::LazyError::Failed(reason)) => {
                            return Err(DedupStartError::Lazy { reason });
                        }
                        Err(lazy::LazyError::Fallback(reason)) => {
                            warn!(sandbox = %id, %reason, "armed sandbox not usable: unarmed start");
                        }
                    }
                }
                Err(reason) => {
                    a.disarm().await;
                    self.counters.lock().disarms += 1;
                    warn!(sandbox = %id, %reason, "armed sandbox disarmed: unarmed start");
                }
            }
        }
        let dir = self.images.join("restore").join(&id.0);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| DedupStartError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        // The store (verified) and every non-page image first: CRIU reads those from its start.
        // A lazy start reads the page data from the store file (`lazy.rs`), the plain path
        // from the store in memory.
        let t = Instant::now();
        let lean = self.cfg.lazy_restore && lean_lazy_starts();
        let (loaded, bases) = self.load_store(rec, &dir, lean).await?;
        let read_base_ms = ms(t.elapsed());
        let mut in_memory = match &loaded {
            lazy::LoadedStore::InMemory(s) => Some(s.clone()),
            lazy::LoadedStore::File(..) => None,
        };
        if self.cfg.lazy_restore {
            let lazy_bases: Arc<dyn BasePages + Send> = bases.clone();
            let r = lazy::restore(self, rec, &dir, loaded, lazy_bases, read_base_ms).await;
            let fallback = match r {
                Ok((sandbox, mut reply, held)) => {
                    // `restore` adds the sampled m_R parts to the page buffers held.
                    reply.transient_images_bytes = held;
                    self.counters.lock().lazy_restores += 1;
                    let dir2 = dir.clone();
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir2));
                    return Ok((sandbox, reply));
                }
                Err(lazy::LazyError::Failed(reason)) => {
                    let dir2 = dir.clone();
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir2));
                    let reason = remote::with_cause(&reason, &bases);
                    return Err(DedupStartError::Lazy { reason });
                }
                Err(lazy::LazyError::Fallback(reason)) => reason,
            };
            self.counters.lock().lazy_fallbacks += 1;
            warn!(sandbox = %id, reason = %fallback, "lazy dedup start not possible: plain restore");
        } else {
            drop(loaded);
        }
        // The plain path rebuilds from the store in memory (loaded again after a lean lazy
        // start fell back; its non-page images are in `dir` already).
        let store = match in_memory.take() {
            Some(s) => s,
            None => {
                let path = rec.path.clone();
                tokio::task::spawn_blocking(move || DedupStore::load(&path))
                    .await
                    .map_err(|source| DedupStartError::Task {
                        what: "store",
                        source,
                    })?
                    .map(Arc::new)
                    .map_err(DedupStartError::Store)?
            }
        };
        // The pages, while the sandbox is prepared and CRIU builds its namespaces.
        let rebuilt = Arc::new(Mutex::new(0.0));
        let rebuilt2 = rebuilt.clone();
        let inner = self.clone();
        let pages = move |files: Vec<(String, std::fs::File)>| async move {
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let mut by_name: HashMap<String, std::fs::File> = files.into_iter().collect();
                let ordered = store
                    .procs
                    .iter()
                    .map(|p| {
                        by_name
                            .remove(&p.pages_file)
                            .ok_or_else(|| DedupStartError::NoPagesFile {
                                file: p.pages_file.clone(),
                            })
                    })
                    .collect::<Result<Vec<_>, DedupStartError>>()?;
                if let Some(extra) = by_name.keys().next() {
                    return Err(DedupStartError::ExtraPagesFile {
                        file: extra.clone(),
                    });
                }
                inner
                    .fg_pool
                    .install(|| medes_dedup::rebuild_to_files(&store, &*bases, &ordered))
                    .map_err(|source| DedupStartError::Rebuild {
                        source,
                        remote_cause: bases.error(),
                    })?;
                *rebuilt2.lock() = ms(t.elapsed());
                Ok(())
            })
            .await
            .unwrap_or_else(|source| {
                Err(DedupStartError::Task {
                    what: "rebuild",
                    source,
                })
            })
        };
        let bound = Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
        let r = tokio::time::timeout(
            bound,
            Sandbox::restore_with(&self.cfg.sandbox, rec.info.spec.clone(), &dir, pages),
        )
        .await;
        // CRIU has read the images: they are not needed any more.
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir2));
        let (sandbox, t) = match r {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(DedupStartError::Sandbox(e)),
            Err(_) => return Err(DedupStartError::Timeout { after: bound }),
        };
        debug!(sandbox = %id, prepare_ms = t.prepare_ms, images_ready_ms = t.images_ready_ms,
               criu_ms = t.criu_ms, reseed_ms = t.reseed_ms, total_ms = t.total_ms,
               "restore steps");
        let rebuild_ms = *rebuilt.lock();
        Ok((
            sandbox,
            RestoreReply {
                read_base_ms,
                rebuild_ms,
                restore_ms: t.total_ms - t.images_ready_ms,
                total_ms: read_base_ms + t.total_ms,
                ..RestoreReply::default()
            },
        ))
    }
}

/// Whether unarmed lazy dedup starts read the page data from the store file instead of a copy
/// in memory (on; the environment's `MEDES_LAZY_LEAN_STORE=0` turns it off, a benchmarking
/// switch). Armed starts always do (`armed.rs`).
fn lean_lazy_starts() -> bool {
    std::env::var("MEDES_LAZY_LEAN_STORE").map_or(true, |v| v != "0")
}

/// The kind of a failed checkpoint.
fn checkpoint_failure(e: &medes_sandbox::CheckpointError) -> CheckpointFailure {
    use medes_sandbox::CheckpointError as E;
    match e {
        E::TcpSocket { .. } => CheckpointFailure::TcpSocket,
        E::Criu { .. } => CheckpointFailure::Criu,
        E::Timeout { .. } => CheckpointFailure::Timeout,
        E::NotRunning => CheckpointFailure::NotRunning,
        _ => CheckpointFailure::Other,
    }
}

/// Reading a dump or deduplicating its pages failed, after CRIU's dump succeeded (a
/// [`Command::MakeBase`] or [`Command::Dedup`]): always [`CheckpointFailure::Image`].
#[derive(Debug, thiserror::Error)]
enum CheckpointImageError {
    /// The dump could not be read.
    #[error("reading the dump")]
    OpenDump(#[source] medes_dedup::OpenDumpError),
    /// The base could not be registered in its domain.
    #[error("registering the base")]
    AddBase(#[source] medes_dedup::AddBaseError),
    /// The pages could not be deduplicated.
    #[error("deduplicating the pages")]
    Dedup(#[source] medes_dedup::DedupError),
    /// The dedup store could not be written.
    #[error("writing the dedup store")]
    WriteStore(#[source] medes_dedup::WriteStoreError),
    /// The blocking task was lost (panicked or cancelled).
    #[error("the {what} task failed")]
    Task {
        /// Which task.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A dedup start failed ([`Command::Restore`]); [`DedupStartError::kind`] is what the agent
/// reports in [`AgentError::RestoreFailed`] (and the controller counts under its label).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DedupStartError {
    /// The restore directory could not be made, or a non-page image not written.
    #[error("{what} {path:?}")]
    Io {
        /// The step.
        what: &'static str,
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be loaded (unreadable, not a store, failed its checksum).
    #[error("loading the dedup store")]
    Store(#[source] medes_dedup::LoadStoreError),
    /// A base the store points into is not resident on this node.
    #[error("base {} is unavailable", base.0)]
    MissingBase {
        /// The base.
        base: BaseId,
        /// The cause.
        #[source]
        source: medes_dedup::BasePageError,
    },
    /// Other nodes' bases the store needs are not listed, their owner is not alive, or their
    /// prefetch could not start (`remote.rs` reports these as text; every one concerns another
    /// node's base, so none needs reading).
    #[error("{reason}")]
    RemoteBases {
        /// What `remote.rs` said.
        reason: String,
    },
    /// The checkpoint's pages files and the store's processes differ.
    #[error("the checkpoint has no {file} for the store")]
    NoPagesFile {
        /// The store's pages file.
        file: String,
    },
    /// The checkpoint has a pages file the store has no pages for.
    #[error("the store has no pages for {file}")]
    ExtraPagesFile {
        /// The checkpoint's pages file.
        file: String,
    },
    /// Rebuilding the pages failed (a page failed its checksum, a base page is missing).
    #[error("rebuilding the pages{}", remote_cause.as_ref().map(|c| format!(" (remote read: {c})")).unwrap_or_default())]
    Rebuild {
        /// The cause.
        #[source]
        source: medes_dedup::RebuildError,
        /// The first failed read of another node's base pages, if one failed.
        remote_cause: Option<String>,
    },
    /// The sandbox-level restore (CRIU, the new sandbox, the reseed) failed; a failure of the
    /// rebuild while CRIU waited is this error's [`medes_sandbox::RestoreError::Images`]
    /// source.
    #[error(transparent)]
    Sandbox(medes_sandbox::RestoreError),
    /// No restored runtime answered within the dedup start's bound.
    #[error("no restored runtime within {after:?}")]
    Timeout {
        /// The bound.
        after: Duration,
    },
    /// A lazy dedup start failed (`lazy.rs` reports text; [`RestoreFailure::of_lazy`]).
    #[error("{reason}")]
    Lazy {
        /// What the lazy path said.
        reason: String,
    },
    /// A blocking task of the dedup start was lost (panicked or cancelled).
    #[error("the {what} task failed")]
    Task {
        /// Which task.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl DedupStartError {
    /// What failed, by variant (only the lazy path's text is read, in
    /// [`RestoreFailure::of_lazy`]).
    fn kind(&self) -> RestoreFailure {
        use medes_dedup::LoadStoreError;
        match self {
            DedupStartError::Store(LoadStoreError::Checksum) => RestoreFailure::Corrupt,
            DedupStartError::Io { .. }
            | DedupStartError::Store(_)
            | DedupStartError::NoPagesFile { .. }
            | DedupStartError::ExtraPagesFile { .. }
            | DedupStartError::Task { .. } => RestoreFailure::Other,
            DedupStartError::MissingBase { .. } => RestoreFailure::MissingBase,
            DedupStartError::RemoteBases { .. } => RestoreFailure::RemoteBase,
            DedupStartError::Rebuild {
                remote_cause: Some(_),
                ..
            } => RestoreFailure::RemoteBase,
            DedupStartError::Rebuild { source, .. } => rebuild_failure(source),
            DedupStartError::Sandbox(e) => sandbox_restore_failure(e),
            DedupStartError::Timeout { .. } => RestoreFailure::Timeout,
            DedupStartError::Lazy { reason } => RestoreFailure::of_lazy(reason),
        }
    }
}

/// The kind of a failed rebuild: a missing base page is a missing base (another node's, for an
/// alias), a page or pointer image failing verification is corruption.
fn rebuild_failure(e: &medes_dedup::RebuildError) -> RestoreFailure {
    use medes_dedup::{BasePageError, RebuildError as E};
    match e {
        E::BasePage {
            source: BasePageError::MissingBase(b) | BasePageError::MissingPage { base: b, .. },
            ..
        } if remote::is_alias(*b) => RestoreFailure::RemoteBase,
        E::BasePage { .. } => RestoreFailure::MissingBase,
        E::Checksum { .. } | E::Image { .. } => RestoreFailure::Corrupt,
        _ => RestoreFailure::Other,
    }
}

/// The kind of a failed sandbox-level restore.
fn sandbox_restore_failure(e: &medes_sandbox::RestoreError) -> RestoreFailure {
    use medes_sandbox::RestoreError as E;
    match e {
        E::Criu { .. } => RestoreFailure::Criu,
        E::Timeout { .. }
        | E::NotAnswering {
            source: RunError::Timeout { .. },
        } => RestoreFailure::Timeout,
        // The rebuild (ours) failed while CRIU waited; else a producer that reports text.
        E::Images { source } => match source.downcast_ref::<DedupStartError>() {
            Some(d) => d.kind(),
            None => RestoreFailure::of_lazy(&error_chain(&**source)),
        },
        _ => RestoreFailure::Other,
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

    /// A cancelled task's join error (no panic output).
    async fn join_error() -> tokio::task::JoinError {
        let h = tokio::spawn(std::future::pending::<()>());
        h.abort();
        h.await.expect_err("aborted")
    }

    fn rebuild(source: medes_dedup::RebuildError) -> DedupStartError {
        DedupStartError::Rebuild {
            source,
            remote_cause: None,
        }
    }

    fn sandbox(e: medes_sandbox::RestoreError) -> DedupStartError {
        DedupStartError::Sandbox(e)
    }

    #[tokio::test]
    async fn every_dedup_start_error_maps_to_its_failure_kind() {
        use medes_dedup::RebuildError as Rb;
        use medes_dedup::{BasePageError, DecodePageError, LoadStoreError, PageKind};
        use medes_sandbox::{ImageProblem, RestoreError as Re, StartError};
        use std::io;
        let io_err = || io::Error::from(io::ErrorKind::NotFound);
        let local = BaseId(3);
        let alias = BaseId(1 << 31 | 4);
        let cases: Vec<(DedupStartError, &str)> = vec![
            (
                DedupStartError::Io {
                    what: "creating",
                    path: "/x".into(),
                    source: io_err(),
                },
                "restore_failed",
            ),
            (DedupStartError::Store(LoadStoreError::Checksum), "checksum"),
            (
                DedupStartError::Store(LoadStoreError::BadHeader),
                "restore_failed",
            ),
            (
                DedupStartError::Store(LoadStoreError::Io {
                    path: "/s".into(),
                    source: io_err(),
                }),
                "restore_failed",
            ),
            (
                DedupStartError::MissingBase {
                    base: local,
                    source: BasePageError::MissingBase(local),
                },
                "missing_base",
            ),
            (
                DedupStartError::RemoteBases {
                    reason: "base n1/4 (alias 2147483652) is held by node n1, which is not alive"
                        .into(),
                },
                "remote_base",
            ),
            (
                DedupStartError::NoPagesFile {
                    file: "pages-1.img".into(),
                },
                "restore_failed",
            ),
            (
                DedupStartError::ExtraPagesFile {
                    file: "pages-2.img".into(),
                },
                "restore_failed",
            ),
            (
                rebuild(Rb::BasePage {
                    page: 1,
                    source: BasePageError::MissingBase(local),
                }),
                "missing_base",
            ),
            (
                rebuild(Rb::BasePage {
                    page: 1,
                    source: BasePageError::MissingPage {
                        base: alias,
                        page: 9,
                    },
                }),
                "remote_base",
            ),
            (
                DedupStartError::Rebuild {
                    source: Rb::BasePage {
                        page: 1,
                        source: BasePageError::MissingBase(local),
                    },
                    remote_cause: Some("connect timed out after 1s".into()),
                },
                "remote_base",
            ),
            (rebuild(Rb::Checksum { page: 12 }), "checksum"),
            (
                rebuild(Rb::Image {
                    name: "mm-1.img".into(),
                    source: None,
                }),
                "checksum",
            ),
            (
                rebuild(Rb::Decode {
                    page: 2,
                    source: DecodePageError::Malformed(PageKind::Zero),
                }),
                "restore_failed",
            ),
            (rebuild(Rb::BaseSlot { page: 2, slot: 7 }), "restore_failed"),
            (
                sandbox(Re::Criu {
                    status: "exit status: 1".into(),
                    log_tail: "Error (criu/cr-restore.c:1): restore failed".into(),
                }),
                "criu",
            ),
            (
                // CRIU's log text never decides the kind (it once could read "connect").
                sandbox(Re::Criu {
                    status: "exit status: 1".into(),
                    log_tail: "Error (criu/sk-unix.c:1): can't connect to remote socket".into(),
                }),
                "criu",
            ),
            (
                sandbox(Re::Timeout {
                    after: Duration::from_secs(10),
                }),
                "timeout",
            ),
            (
                sandbox(Re::NotAnswering {
                    source: RunError::Timeout {
                        after: Duration::from_secs(15),
                    },
                }),
                "timeout",
            ),
            (
                sandbox(Re::NotAnswering {
                    source: RunError::NotRunning,
                }),
                "restore_failed",
            ),
            (
                sandbox(Re::ReseedRefused {
                    reply: "{\"ok\":false}".into(),
                }),
                "restore_failed",
            ),
            (
                sandbox(Re::BadImage {
                    path: "/r".into(),
                    problem: ImageProblem::Missing {
                        file: "core-1.img".into(),
                    },
                }),
                "restore_failed",
            ),
            (
                sandbox(Re::Prepare(StartError::Network {
                    detail: "no veth".into(),
                })),
                "restore_failed",
            ),
            (
                sandbox(Re::Io {
                    what: "pidfd_open".into(),
                    source: io_err(),
                }),
                "restore_failed",
            ),
            (
                sandbox(Re::InvalidSpec {
                    reason: "bad id".into(),
                }),
                "restore_failed",
            ),
            (
                // Our rebuild failing while CRIU waited: typed, through the producer's error.
                sandbox(Re::Images {
                    source: Box::new(rebuild(Rb::Checksum { page: 3 })),
                }),
                "checksum",
            ),
            (
                sandbox(Re::Images {
                    source: Box::new(DedupStartError::MissingBase {
                        base: local,
                        source: BasePageError::MissingBase(local),
                    }),
                }),
                "missing_base",
            ),
            (
                // A producer that reports text (the lazy path).
                sandbox(Re::Images {
                    source: "page 7 failed its checksum".into(),
                }),
                "checksum",
            ),
            (
                DedupStartError::Timeout {
                    after: Duration::from_secs(15),
                },
                "timeout",
            ),
            (
                DedupStartError::Lazy {
                    reason: "page 0 of base node-2/0 did not arrive within 1.5s".into(),
                },
                "remote_base",
            ),
            (
                DedupStartError::Lazy {
                    reason: "something else".into(),
                },
                "restore_failed",
            ),
            (
                DedupStartError::Task {
                    what: "rebuild",
                    source: join_error().await,
                },
                "restore_failed",
            ),
        ];
        for (e, label) in cases {
            assert_eq!(e.kind().label(), label, "{}", error_chain(&e));
        }
    }

    #[test]
    fn dedup_start_errors_read_as_before() {
        use medes_dedup::RebuildError as Rb;
        let e = sandbox(medes_sandbox::RestoreError::Images {
            source: Box::new(rebuild(Rb::Checksum { page: 12 })),
        });
        assert_eq!(
            error_chain(&e),
            "producing the images: rebuilding the pages: page 12: checksum mismatch"
        );
        let e = DedupStartError::Rebuild {
            source: Rb::Checksum { page: 1 },
            remote_cause: Some("reading base n2/0: refused".into()),
        };
        assert_eq!(
            error_chain(&e),
            "rebuilding the pages (remote read: reading base n2/0: refused): page 1: checksum \
             mismatch"
        );
        let e = DedupStartError::MissingBase {
            base: BaseId(3),
            source: medes_dedup::BasePageError::MissingBase(BaseId(3)),
        };
        assert_eq!(
            error_chain(&e),
            "base 3 is unavailable: base BaseId(3) is not available"
        );
    }

    #[test]
    fn checkpoint_errors_map_to_their_failure_kinds() {
        use medes_sandbox::CheckpointError as Ce;
        for (e, label) in [
            (
                Ce::TcpSocket {
                    status: "exit status: 1".into(),
                    log_tail: "Connected TCP socket".into(),
                },
                "tcp_socket",
            ),
            (
                Ce::Criu {
                    status: "exit status: 1".into(),
                    log_tail: String::new(),
                },
                "checkpoint_failed",
            ),
            (
                Ce::Timeout {
                    after: Duration::from_secs(60),
                },
                "checkpoint_failed",
            ),
            (Ce::NotRunning, "sandbox_gone"),
            (
                Ce::Io {
                    path: "/x".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                "not_deduplicable",
            ),
        ] {
            assert_eq!(checkpoint_failure(&e).label(), label, "{e}");
        }
    }

    #[test]
    fn config_round_trips_through_toml_defaults() {
        let cfg: AgentConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg.max_concurrent_starts, 4);
        assert_eq!(cfg.node_id, NodeId("node-0".into()));
    }
}
