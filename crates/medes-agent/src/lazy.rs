//! Lazy dedup starts (`[agent] lazy_restore`, on by default): `criu restore --lazy-pages` with
//! the agent's own lazy-pages server ([`medes_sandbox::LazyDaemon`]) fed straight from the
//! rebuild, so every page is copied once (rebuilt batch → the process, `UFFDIO_COPY`) instead
//! of being written to a tmpfs pages file that CRIU then reads and copies again.
//!
//! How a lazy dedup start runs:
//! 1. From the store's pagemap and mm images, [`LazyLayout`] tells which pages CRIU restores
//!    itself (not `PE_LAZY`: stacks, private file mappings' dirty pages; a few percent) and
//!    which the server fills (private anonymous memory).
//! 2. The server binds `lazy-pages.socket` in the restore directory; CRIU starts at once
//!    (namespaces, mounts, process tree) while the rebuild runs on the agent's rebuild pool.
//!    First, before CRIU may read any page (its open of the pages files is held by the
//!    fanotify gate until then): the **inputs** are verified (`verify.rs`: every base page the
//!    store references, against per-page sums checked once against the base's own checksum;
//!    the store itself was verified as a whole when it was loaded), and the eager pages are
//!    rebuilt (each verified) into the sparse pages files. Then every batch in order
//!    ([`Rebuilder`]), each page verified against its xxh3 before it is handed to the server,
//!    which copies it in once CRIU says the restore finished; a fault on a page whose batch has
//!    not arrived makes the server rebuild (and verify) that page's group first.
//! 3. **Early answer**: the start answers as soon as the restored runtime answered its reseed;
//!    the server keeps filling the remaining pages in the background (faulted pages first)
//!    while the request runs. Until the answer one rebuild thread runs at the normal
//!    priority and the others at nice + [`FILL_NICE`] (CRIU comes first, but the fewer pages
//!    are missing when the runtime runs, the fewer faults it waits for); after the answer all
//!    run at nice + [`FILL_NICE`] for [`FILL_LOW_FOR`] (the runtime and the server's on-demand
//!    pages come first), then at the normal priority again (a busy node cannot starve a fill).
//!    A fault on a page whose batch has not arrived gets only its group of 16 pages rebuilt at
//!    once. The batches a start faulted on are remembered per store (its working set) and
//!    rebuilt first at its next start. The restored sandbox holds its `changing` flag until
//!    the fill ended, so no make-base, dedup or template checkpoints it meanwhile (a dump
//!    would see the missing pages as holes): [`Inner::settle_fill`] makes a make-base or
//!    dedup wait for the fill.
//!
//! The store is opened lean ([`DedupStore::open_lean`]; `MEDES_LAZY_LEAN_STORE=0`, a
//! benchmarking switch, loads it whole into memory instead, as armed starts never do): its
//! file is streamed once and its whole payload verified against its xxh3, and only its
//! metadata (page table, processes, bases, block offsets) and non-page images are kept; the
//! images are written for CRIU, used for the layout and the mapping tables, then dropped. The
//! [`Rebuilder`] reads each batch's compressed block and range of the blob from the open file
//! with `pread` into its per-thread scratch buffers (on a tmpfs a memcpy). The file may change
//! after it was verified (an armed start's fill runs long after the arm): every rebuilt page is
//! verified against its own xxh3 anyway, a short read is an error, so a change fails pages
//! the way a decode bug would (below), never gives a wrong one.
//!
//! Failures: an input failing verification, or an eager page, fails the start before the
//! restored process resumes (the controller falls back to a cold start). With verified inputs
//! the decode is deterministic, so a page failing verification after the answer is a bug (or
//! resource exhaustion): the page is never copied, the server kills the restored processes
//! (blocked on the missing page, never handed a wrong one), and the request's run fails as a
//! lost sandbox (an error activation: `main` may have started). The fill is bounded by
//! `restore_timeout_ms` (from the start); past it the processes are killed the same way.
//!
//! Without early answer (the store uses another node's bases, whose pages arrive during the
//! rebuild and cannot be checked up front; a local base without its metadata; or
//! `MEDES_LAZY_EARLY_ANSWER=0`, a benchmarking switch), the start answers once the runtime
//! answered **and** every page was verified, as before: a failure kills the process before
//! anything ran, and the start fails.
//!
//! Errors before anything ran (no layout, socket, CRIU refusing `--lazy-pages`) fall back to the
//! plain path (rebuild into the pages files, then restore) in the same command.
//!
//! m_R of a lazy start: the sparse pages files on the tmpfs (eager pages only) + CRIU's
//! resident size (both sampled as for the plain path) + the page buffers the server holds
//! (the store's metadata, tens of bytes per page, is not counted),
//! which this module reports: their peak when the fill ended before the answer, else the most
//! the fill may still hold (the buffer bound, [`MAX_BUFFERS`] batches or the image's batches
//! if fewer), since it runs on after the answer; while it runs the restored sandbox's status
//! also counts the buffers it holds ([`Fill::held_bytes`]).

mod verify;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use medes_core::SandboxId;
use medes_criu_image::{
    decode_mm, decode_pagemap, encode_mm, encode_pagemap, lazify, reg_file_names,
};
use medes_dedup::rebuild::{BATCH_PAGES, RebuildScratch, Rebuilder};
use medes_dedup::{BasePages, DedupStore, StoreFile};
use medes_sandbox::{LazyDaemon, LazyFeed, LazyLayout, RestoreError, Sandbox};
use parking_lot::Mutex;
use tracing::{debug, warn};

use super::{DedupRec, Inner, RestoreReply, Slot, error_chain, ms};

const PAGE: u64 = 4096;
/// Batch buffers (1 MiB each) the rebuild may hold at once: enough to keep rebuilding while
/// CRIU restores; beyond that it waits for the server to copy batches in and hand their
/// buffers back (recycled buffers cost no page faults, and m_R stays bounded).
const MAX_BUFFERS: usize = 32;
/// How much lower the priority of the background fill's threads is (nice increment).
const FILL_NICE: i32 = 10;
/// How long after the answer the fill runs at the lower priority; then at the normal one.
const FILL_LOW_FOR: Duration = Duration::from_millis(500);

/// Why a lazy dedup start did not succeed.
pub(crate) enum LazyError {
    /// Nothing ran yet (no restored process): the plain path may try.
    Fallback(String),
    /// The start failed (a page failed verification, or the restored process ran and broke).
    Failed(String),
}

/// A successful lazy dedup start: the sandbox, its reply (no m_R yet) and the page buffers
/// held for it, bytes (see the module docs). A start that answered early left its [`Fill`]
/// in [`LazyState`] for the caller to [`LazyState::take_fill`].
pub(crate) type LazyStart = (Sandbox, RestoreReply, u64);

/// What the agent keeps for lazy starts: the fills of early-answered starts until their
/// sandbox takes them, and the per-page sums of bases.
#[derive(Default)]
pub(crate) struct LazyState {
    fills: Mutex<HashMap<SandboxId, Fill>>,
    sums: verify::SumCache,
    /// Per store file, the batches its earlier starts faulted on first (their working set),
    /// produced first at its next start.
    hot: Mutex<HashMap<PathBuf, Vec<usize>>>,
}

/// Most stores whose working set is remembered (a few hundred bytes each).
const MAX_HOT: usize = 4096;

impl LazyState {
    /// Adds the batches a start of `store` faulted on to its working set.
    fn record_hot(&self, store: &Path, faulted: &[usize]) {
        if faulted.is_empty() {
            return;
        }
        let mut hot = self.hot.lock();
        if hot.len() >= MAX_HOT && !hot.contains_key(store) {
            hot.clear();
        }
        let set = hot.entry(store.to_path_buf()).or_default();
        for &b in faulted {
            if !set.contains(&b) {
                set.push(b);
            }
        }
    }

    /// The order in which a start of `store` (`n` batches) rebuilds its batches: its working
    /// set first, then the others in order.
    fn fill_order(&self, store: &Path, n: usize) -> Vec<usize> {
        let hot = self.hot.lock().get(store).cloned().unwrap_or_default();
        let mut seen = vec![false; n];
        let mut order = Vec::with_capacity(n);
        for b in hot.into_iter().chain(0..n) {
            if b < n && !seen[b] {
                seen[b] = true;
                order.push(b);
            }
        }
        order
    }

    /// The background fill of sandbox `id`'s start that just answered, if it answered early.
    pub(crate) fn take_fill(&self, id: &SandboxId) -> Option<Fill> {
        self.fills.lock().remove(id)
    }
}

/// The background fill of an early-answered lazy start. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Fill {
    inner: Arc<FillInner>,
}

struct FillInner {
    feed: LazyFeed,
    /// `Some` once the fill ended: `Ok` when every page is in place (or the processes are
    /// gone), else why it failed (the processes were killed).
    done: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// The slot's `changing` flag is held for the fill (released once, by whoever sees the
    /// fill end first).
    hold: AtomicBool,
}

impl Fill {
    fn new(feed: LazyFeed) -> Fill {
        Fill {
            inner: Arc::new(FillInner {
                feed,
                done: tokio::sync::watch::channel(None).0,
                hold: AtomicBool::new(false),
            }),
        }
    }

    /// Whether pages are still being filled.
    pub(crate) fn running(&self) -> bool {
        self.inner.done.borrow().is_none()
    }

    /// Page buffers the fill holds now, bytes (0 once it ended).
    pub(crate) fn held_bytes(&self) -> u64 {
        if self.running() {
            self.inner.feed.stats().buffered_bytes
        } else {
            0
        }
    }

    /// Resolves when the fill ended, with its outcome.
    pub(crate) async fn wait(&self) -> Result<(), String> {
        let mut rx = self.inner.done.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            Err(_) => Err("the fill was dropped".into()),
        }
    }

    fn finish(&self, r: Result<(), String>) {
        self.inner.done.send_replace(Some(r));
    }

    /// Releases the slot's `changing` flag if the fill still holds it.
    fn release(&self, slot: &Slot) {
        if self.inner.hold.swap(false, Ordering::SeqCst) {
            slot.changing.store(false, Ordering::SeqCst);
        }
    }
}

/// Holds a restored slot's `changing` flag while its pages are filled (no make-base, dedup or
/// template of it meanwhile), released when the fill ends.
pub(crate) fn hold_while_filling(slot: &Arc<Slot>) {
    let Some(fill) = slot.fill.clone() else {
        return;
    };
    slot.changing.store(true, Ordering::SeqCst);
    fill.inner.hold.store(true, Ordering::SeqCst);
    let weak = Arc::downgrade(slot);
    tokio::spawn(async move {
        let _ = fill.wait().await;
        if let Some(s) = weak.upgrade() {
            fill.release(&s);
            super::release(s).await;
        }
    });
}

impl Inner {
    /// Waits until the background fill of sandbox `id` (if any) ended, so that it can be
    /// checkpointed.
    pub(crate) async fn settle_fill(&self, id: &SandboxId) {
        let Ok(slot) = self.live(id) else {
            return;
        };
        if let Some(fill) = slot.fill.clone() {
            let bound = Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
            if tokio::time::timeout(bound, fill.wait()).await.is_ok() {
                fill.release(&slot);
            }
        }
        super::release(slot).await;
    }
}

/// Whether starts may answer before every page is in place (`[agent] lazy_early_answer`;
/// the environment's `MEDES_LAZY_EARLY_ANSWER=0` turns it off too, for A/B benchmarks).
fn early_answer_enabled(inner: &Inner) -> bool {
    inner.cfg.lazy_early_answer
        && std::env::var("MEDES_LAZY_EARLY_ANSWER").map_or(true, |v| v != "0")
}

/// A store loaded (and verified as a whole) for a dedup start.
pub(crate) enum LoadedStore {
    /// Parsed whole into memory (the plain path rebuilds from it).
    InMemory(Arc<DedupStore>),
    /// Opened with [`DedupStore::open_lean`]: the metadata and the non-page images (dropped
    /// once the rebuilder is made), the page data read from the open file on demand.
    File(Box<(DedupStore, StoreFile)>),
}

impl LoadedStore {
    /// The store's metadata (page table, processes, bases) and non-page images.
    pub(crate) fn meta(&self) -> &DedupStore {
        match self {
            LoadedStore::InMemory(s) => s,
            LoadedStore::File(b) => &b.0,
        }
    }

    /// The rebuilder of this store against `bases`.
    fn rebuilder(
        self,
        bases: Arc<dyn BasePages + Send>,
    ) -> Result<Rebuilder, medes_dedup::RebuildError> {
        match self {
            LoadedStore::InMemory(s) => Rebuilder::new(s, bases),
            LoadedStore::File(b) => {
                let (s, f) = *b;
                Rebuilder::from_file(s, f, bases)
            }
        }
    }
}

/// Restores `rec` lazily from `store` (loaded and verified; its non-page images are in `dir`).
pub(crate) async fn restore(
    inner: &Arc<Inner>,
    rec: &Arc<DedupRec>,
    dir: &Path,
    store: LoadedStore,
    bases: Arc<dyn BasePages + Send>,
    read_base_ms: f64,
) -> Result<LazyStart, LazyError> {
    let started = start(inner, rec, dir, store, bases, read_base_ms, false).await?;
    let Started { proc, timings, .. } = &started;
    let Proc::Running(_) = proc else {
        unreachable!("not armed")
    };
    let t = *timings;
    complete(inner, started, t).await
}

/// The rebuild task of a lazy start (its time, ms).
type Producer = tokio::task::JoinHandle<Result<f64, String>>;

/// A lazy start restored up to its processes: running (a start), or stopped ahead of its
/// request (armed, see `armed.rs`).
pub(crate) enum Proc {
    /// Restored and reseeded; the runtime answered.
    Running(Sandbox),
    /// Left stopped; [`resume`] continues it. `None` once taken.
    Armed(Option<medes_sandbox::ArmedSandbox>),
}

/// A lazy start whose processes exist ([`start`]); [`complete`] (or, armed, [`resume`])
/// finishes it, dropping it tears it down (the processes first, then the server).
pub(crate) struct Started {
    /// When the start began (for an armed one: when it was resumed).
    t0: Instant,
    proc: Proc,
    timings: medes_sandbox::RestoreTimings,
    daemon: Option<LazyDaemon>,
    feed: LazyFeed,
    producer: Arc<Mutex<Option<Producer>>>,
    early: bool,
    n_batches: usize,
    gate_ms: Arc<Mutex<f64>>,
    answered_at: Arc<Mutex<Option<Instant>>>,
    /// Armed: the rebuild waits here after the eager pages until the resume.
    go: Option<Arc<Go>>,
    read_base_ms: f64,
    rec: Arc<DedupRec>,
    /// Memory the rebuilder holds of the store, bytes ([`Rebuilder::held_bytes`]).
    store_held: u64,
}

impl Started {
    /// The stopped sandbox of an armed start (its memory, for the accounting).
    pub(crate) fn armed(&self) -> Option<&medes_sandbox::ArmedSandbox> {
        match &self.proc {
            Proc::Armed(a) => a.as_ref(),
            Proc::Running(_) => None,
        }
    }

    /// Whether it restores `rec`.
    pub(crate) fn is_of(&self, rec: &Arc<DedupRec>) -> bool {
        Arc::ptr_eq(&self.rec, rec)
    }

    /// Memory held of the store for the rebuild, bytes: with a store opened lean, its
    /// metadata only (page table, per-page offsets, mapping tables, block offsets).
    pub(crate) fn store_held_bytes(&self) -> u64 {
        self.store_held
    }

    /// Page buffers the lazy-pages server holds now, bytes.
    pub(crate) fn buffered_bytes(&self) -> u64 {
        self.feed.stats().buffered_bytes
    }

    /// Tears an armed start down: stops the rebuild, kills the stopped processes, then stops
    /// the server (no process ever sees a missing page).
    pub(crate) async fn disarm(mut self) {
        if let Some(go) = &self.go {
            go.set(GO_STOP);
        }
        if let Proc::Armed(a) = &mut self.proc
            && let Some(a) = a.take()
        {
            let id = a.id().clone();
            if let Err(e) = a.destroy().await {
                warn!(sandbox = %id, error = %e, "destroying an armed sandbox left something behind");
            }
        }
        let h = self.producer.lock().take();
        if let Some(h) = h {
            let _ = h.await;
        }
        self.daemon = None;
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(go) = &self.go {
            go.set(GO_STOP);
        }
        if self.daemon.is_some() {
            // Not completed: the processes (killed by their sandbox's teardown) go first,
            // then the server (dropped after this).
            if let Proc::Armed(a) = &mut self.proc {
                drop(a.take());
            }
        }
    }
}

const GO_WAIT: u8 = 0;
const GO_RUN: u8 = 1;
const GO_STOP: u8 = 2;

/// The armed rebuild's wait between its eager pages and the background fill.
pub(crate) struct Go {
    state: Mutex<u8>,
    cv: parking_lot::Condvar,
}

impl Go {
    fn new() -> Go {
        Go {
            state: Mutex::new(GO_WAIT),
            cv: parking_lot::Condvar::new(),
        }
    }

    fn set(&self, v: u8) {
        let mut s = self.state.lock();
        if *s == GO_WAIT {
            *s = v;
        }
        self.cv.notify_all();
    }

    /// Blocks until the resume (true) or a disarm (false); also stops once nobody else holds
    /// the `Go` (the start was dropped half made, e.g. its task was cancelled).
    fn wait(self: &Arc<Go>) -> bool {
        let mut s = self.state.lock();
        while *s == GO_WAIT {
            if Arc::strong_count(self) <= 1 {
                return false;
            }
            self.cv.wait_for(&mut s, Duration::from_millis(100));
        }
        *s == GO_RUN
    }
}

/// Continues an armed start (its inputs and eager pages were verified when it was armed):
/// lets the server's fill and the rebuild go, continues the stopped processes, reseeds the
/// runtime, then finishes as an early-answered start.
pub(crate) async fn resume(
    inner: &Arc<Inner>,
    mut started: Started,
    read_base_ms: f64,
) -> Result<LazyStart, LazyError> {
    started.t0 = Instant::now();
    started.read_base_ms = read_base_ms;
    let Proc::Armed(a) = &mut started.proc else {
        return Err(LazyError::Fallback("not armed".into()));
    };
    let Some(armed) = a.take() else {
        return Err(LazyError::Fallback("the armed sandbox is gone".into()));
    };
    if let Some(d) = &started.daemon {
        d.hold_fill(false);
    }
    if let Some(go) = &started.go {
        go.set(GO_RUN);
    }
    let t0 = started.t0;
    // A page failing verification while the runtime reseeds (the fill reads the store file
    // again, which may have changed since the arm) is never copied in: the processes would
    // wait for it, so they are killed, and the resume fails at once.
    let killer = armed.killer();
    let resume = armed.resume();
    tokio::pin!(resume);
    let failed = async {
        match &started.daemon {
            Some(d) => d.failed().await,
            None => std::future::pending().await,
        }
    };
    let resumed = tokio::select! {
        r = &mut resume => r.map_err(|e| error_chain(&e)),
        reason = failed => {
            if let Some(kill) = killer {
                kill();
            }
            if let Ok((sb, _)) = resume.await {
                let _ = sb.destroy().await;
            }
            Err(reason)
        }
    };
    let (sandbox, reseed_ms) = match resumed {
        Ok(x) => x,
        Err(reason) => {
            // The processes ran: no retry within the command.
            started.feed.fail("the resume failed".into());
            return Err(LazyError::Failed(reason));
        }
    };
    started.proc = Proc::Running(sandbox);
    let t = medes_sandbox::RestoreTimings {
        prepare_ms: 0.0,
        images_ready_ms: 0.0,
        criu_ms: 0.0,
        reseed_ms,
        total_ms: ms(t0.elapsed()),
    };
    *started.gate_ms.lock() = 0.0;
    complete(inner, started, t).await
}

/// Restores `rec` lazily up to its processes: running and reseeded, or (`armed`) left
/// stopped with the server's fill and the rebuild held after the eager pages. An armed start
/// needs early answer (every input verified up front), else it is refused (`Fallback`).
pub(crate) async fn start(
    inner: &Arc<Inner>,
    rec: &Arc<DedupRec>,
    dir: &Path,
    loaded: LoadedStore,
    bases: Arc<dyn BasePages + Send>,
    read_base_ms: f64,
    armed: bool,
) -> Result<Started, LazyError> {
    let t0 = Instant::now();
    let fallback = |e: String| LazyError::Fallback(e);
    let store = loaded.meta();
    // Which pages CRIU reads itself, which the server fills.
    let mut procs = Vec::with_capacity(store.procs.len());
    // The mm and pagemap images rewritten so the pages written in private file mappings are
    // lazy too (`lazify`), the mappings split for it (put back by the sandbox's later
    // checkpoints), and the files' names.
    let mut rewritten: Vec<(String, Vec<u8>)> = Vec::new();
    let mut split: medes_sandbox::SplitMappings = Vec::new();
    let mut names = None;
    for p in &store.procs {
        let read = |name: &str| -> Result<&Vec<u8>, LazyError> {
            store
                .images
                .get(name)
                .ok_or_else(|| fallback(format!("the store has no {name}")))
        };
        let (pm_name, mm_name) = (
            format!("pagemap-{}.img", p.pid),
            format!("mm-{}.img", p.pid),
        );
        let bad = |name: &str, e: &dyn std::fmt::Display| fallback(format!("{name}: {e}"));
        let pm = decode_pagemap(read(&pm_name)?).map_err(|e| bad(&pm_name, &e))?;
        let mm = decode_mm(read(&mm_name)?).map_err(|e| bad(&mm_name, &e))?;
        let lazified = inner
            .cfg
            .lazy_file_pages
            .then(|| lazify(&mm, &pm))
            .flatten();
        let Some(l) = lazified else {
            procs.push((p.pid, pm, mm));
            continue;
        };
        rewritten.push((
            pm_name.clone(),
            encode_pagemap(&l.pagemap).map_err(|e| bad(&pm_name, &e))?,
        ));
        rewritten.push((
            mm_name.clone(),
            encode_mm(&l.mm).map_err(|e| bad(&mm_name, &e))?,
        ));
        debug!(
            pid = p.pid,
            runs = l.runs,
            pages = l.pages,
            "file-mapping pages made lazy"
        );
        let names = names.get_or_insert_with(|| {
            store
                .images
                .get("files.img")
                .and_then(|f| reg_file_names(f).ok())
                .unwrap_or_default()
        });
        let with_paths = l
            .split
            .into_iter()
            .filter_map(|v| {
                let path = names.get(&u32::try_from(v.shmid).ok()?)?.clone();
                Some((v, path))
            })
            .collect();
        split.push((p.pid, with_paths));
        procs.push((p.pid, l.pagemap, l.mm));
    }
    if !rewritten.is_empty() {
        // Where CRIU reads them.
        medes_sandbox::replace_images(dir, &rewritten).map_err(|e| fallback(error_chain(&e)))?;
    }
    let views: Vec<_> = procs.iter().map(|(pid, pm, mm)| (*pid, pm, mm)).collect();
    let layout = LazyLayout::from_parsed(&views).map_err(|e| fallback(error_chain(&e)))?;
    drop(views);
    let per_proc = layout.pages_per_process();
    if per_proc.len() != store.procs.len()
        || per_proc
            .iter()
            .zip(&store.procs)
            .any(|((_, n), p)| *n != p.n_pages)
    {
        return Err(fallback("the pagemaps do not match the store".into()));
    }
    // Early answer needs every input checkable before the process resumes.
    let check = if early_answer_enabled(inner) || armed {
        match verify::Check::plan(&inner.images, &rec.info.domain, store, &inner.lazy.sums) {
            Ok(c) => Some(c),
            Err(e) => {
                debug!(sandbox = %rec.info.spec.id, reason = %error_chain(&e),
                       "lazy dedup start waits for every page");
                None
            }
        }
    } else {
        None
    };
    let early = check.is_some();
    if armed && !early {
        return Err(fallback(
            "the inputs cannot be verified up front: not armed".into(),
        ));
    }
    let go = armed.then(|| Arc::new(Go::new()));
    drop(procs);
    // The mapping tables are made here; a lean store's non-page images are dropped then.
    let rebuilder = Arc::new(
        loaded
            .rebuilder(bases)
            .map_err(|e| LazyError::Failed(error_chain(&e)))?,
    );
    let store_held = rebuilder.held_bytes();
    let n_batches = rebuilder.n_batches();
    // Set when a page failed verification (no fallback then: the plain path would fail too).
    let bad_page = Arc::new(AtomicBool::new(false));
    let demand = {
        let (rb, bad) = (rebuilder.clone(), bad_page.clone());
        let mut scratch = RebuildScratch::default();
        Box::new(
            move |b: usize, pages: std::ops::Range<u64>, out: &mut [u8]| {
                let r = if pages == rb.batch_pages(b) {
                    rb.rebuild_batch(b, &mut scratch, out)
                } else {
                    rb.rebuild_batch_pages(b, std::slice::from_ref(&pages), &mut scratch, out)
                };
                r.map_err(|e| {
                    bad.store(true, Ordering::SeqCst);
                    error_chain(&e)
                })
            },
        )
    };
    let eager = layout.eager_pages();
    let (daemon, feed) = LazyDaemon::start(dir, layout, BATCH_PAGES, MAX_BUFFERS, demand)
        .map_err(|e| fallback(error_chain(&e)))?;
    // The batches holding eager pages (CRIU waits for those pages).
    let mut eager_batches = BTreeSet::new();
    for r in &eager {
        let per = BATCH_PAGES as u64;
        for b in r.start / per..=(r.end - 1) / per {
            eager_batches.insert(b as usize);
        }
    }
    let n_eager = eager_batches.len();
    let order: Vec<usize> = eager_batches.iter().copied().collect();

    let (eager_tx, eager_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let producer: Arc<Mutex<Option<Producer>>> = Arc::new(Mutex::new(None));
    // From the start of the rebuild until CRIU may read pages (inputs and eager pages done).
    let gate_ms = Arc::new(Mutex::new(0.0f64));
    let answered_at = Arc::new(Mutex::new(None));
    let fill_order = inner.lazy.fill_order(&rec.path, n_batches);
    let pages = {
        let (inner, producer, rebuilder) = (inner.clone(), producer.clone(), rebuilder.clone());
        let (feed, bad, gate_ms) = (feed.clone(), bad_page.clone(), gate_ms.clone());
        let answered_at = answered_at.clone();
        let go = go.clone();
        move |files: Vec<(String, std::fs::File)>| {
            let job = Produce {
                rebuilder,
                feed,
                order,
                n_eager,
                eager,
                files,
                eager_tx: Mutex::new(Some(eager_tx)),
                bad,
                check,
                inner: Arc::downgrade(&inner),
                gate_ms,
                answered_at,
                fill_order,
                go,
            };
            let h = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                job.run()?;
                Ok(ms(t.elapsed()))
            });
            *producer.lock() = Some(h);
            async move {
                eager_rx
                    .await
                    .unwrap_or_else(|_| Err("the rebuild ended early".into()))
            }
        }
    };
    let bound = Duration::from_millis(inner.cfg.dedup.restore_timeout_ms.max(1));
    let spec = rec.info.spec.clone();
    if armed {
        daemon.hold_fill(true);
    }
    let sb_cfg = &inner.cfg.sandbox;
    let restored = tokio::time::timeout(bound, async {
        let proc = async {
            if armed {
                Sandbox::prestart_lazy(sb_cfg, spec, dir, pages, &daemon)
                    .await
                    .map(|(a, t)| (Proc::Armed(Some(a)), t))
            } else {
                Sandbox::restore_with_lazy(sb_cfg, spec, dir, pages, &daemon)
                    .await
                    .map(|(s, t)| (Proc::Running(s), t))
            }
        };
        tokio::select! {
            r = proc => r.map_err(|e| {
                let verified_bad = matches!(e, RestoreError::Images { .. });
                (error_chain(&e), verified_bad)
            }),
            f = daemon.failed() => Err((f, false)),
        }
    })
    .await;
    let fail = |reason: String, bad: bool| {
        if bad || bad_page.load(Ordering::SeqCst) {
            LazyError::Failed(reason)
        } else {
            LazyError::Fallback(reason)
        }
    };
    let (proc, t) = match restored {
        Ok(Ok(x)) => {
            match &x.0 {
                Proc::Running(s) => s.set_split_mappings(split),
                Proc::Armed(Some(a)) => a.set_split_mappings(split),
                Proc::Armed(None) => {}
            }
            x
        }
        Ok(Err((reason, bad))) => {
            stop_producer(&feed, &producer).await;
            return Err(fail(reason, bad));
        }
        Err(_) => {
            stop_producer(&feed, &producer).await;
            return Err(LazyError::Failed(format!(
                "no restored runtime within {bound:?}"
            )));
        }
    };
    Ok(Started {
        t0,
        proc,
        timings: t,
        daemon: Some(daemon),
        feed,
        producer,
        early,
        n_batches,
        gate_ms,
        answered_at,
        go,
        read_base_ms,
        rec: rec.clone(),
        store_held,
    })
}

/// Finishes a start whose runtime answered (`t`: its restore's timings): answers at once
/// (early answer, the fill goes on in the background) or once every page was verified.
async fn complete(
    inner: &Arc<Inner>,
    mut started: Started,
    t: medes_sandbox::RestoreTimings,
) -> Result<LazyStart, LazyError> {
    let bound = Duration::from_millis(inner.cfg.dedup.restore_timeout_ms.max(1));
    let t0 = started.t0;
    let early = started.early;
    let n_batches = started.n_batches;
    let read_base_ms = started.read_base_ms;
    let rec = started.rec.clone();
    let feed = started.feed.clone();
    let gate_ms = started.gate_ms.clone();
    let answered_at = started.answered_at.clone();
    let Some(daemon) = started.daemon.take() else {
        return Err(LazyError::Failed("the lazy-pages server is gone".into()));
    };
    let sandbox = match std::mem::replace(&mut started.proc, Proc::Armed(None)) {
        Proc::Running(s) => s,
        Proc::Armed(_) => return Err(LazyError::Failed("the sandbox was not resumed".into())),
    };
    let producer = started.producer.clone();
    drop(started);
    let left = bound.saturating_sub(t0.elapsed());
    let handle = producer.lock().take();
    if early {
        // The runtime answered: the start answers now, the fill goes on in the background.
        if let Some(reason) = daemon.failure() {
            drop(handle);
            feed.fail(reason.clone());
            let _ = sandbox.destroy().await;
            return Err(LazyError::Failed(reason));
        }
        *answered_at.lock() = Some(Instant::now());
        let at_answer = daemon.stats();
        let killer = sandbox.killer().unwrap_or_else(|| Box::new(|| {}));
        daemon.detach(killer);
        let fill = Fill::new(feed.clone());
        let still = !feed.ended();
        inner
            .lazy
            .fills
            .lock()
            .insert(rec.info.spec.id.clone(), fill.clone());
        tokio::spawn(background_fill(
            inner.clone(),
            rec.info.spec.id.clone(),
            rec.path.clone(),
            feed,
            fill,
            handle,
            bound,
        ));
        // m_R: what the fill may still hold (it cannot exceed its buffer bound).
        let bound_bytes = (MAX_BUFFERS.min(n_batches.max(1)) as u64) * BATCH_PAGES as u64 * PAGE;
        let held = if still {
            at_answer.peak_buffered_bytes.max(bound_bytes)
        } else {
            at_answer.peak_buffered_bytes
        };
        let total = ms(t0.elapsed());
        let gate = *gate_ms.lock();
        debug!(sandbox = %rec.info.spec.id, prepare_ms = t.prepare_ms, eager_ready_ms = t.images_ready_ms,
               criu_ms = t.criu_ms, reseed_ms = t.reseed_ms, gate_ms = gate, total_ms = total,
               copied = at_answer.copied_pages, faults = at_answer.faults,
               demand = at_answer.demand_batches, filling = still,
               "lazy dedup start answered early");
        return Ok((
            sandbox,
            RestoreReply {
                read_base_ms,
                rebuild_ms: gate,
                restore_ms: t.total_ms - t.images_ready_ms,
                total_ms: read_base_ms + total,
                ..RestoreReply::default()
            },
            held,
        ));
    }
    // The runtime answered; the start is done once every page was verified.
    let rebuilt = match handle {
        None => Err("the rebuild did not start".to_string()),
        Some(h) => tokio::time::timeout(left, async {
            tokio::select! {
                r = h => r.unwrap_or_else(|e| Err(format!("rebuild task failed: {e}"))),
                f = daemon.failed() => Err(f),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("the rebuild did not finish within {bound:?}"))),
    };
    let rebuild_ms = match rebuilt {
        Ok(ms) => ms,
        Err(reason) => {
            feed.fail(reason.clone());
            let _ = sandbox.destroy().await;
            return Err(LazyError::Failed(reason));
        }
    };
    let stats = daemon.stats();
    inner.lazy.record_hot(&rec.path, &feed.faulted_batches());
    let killer = sandbox.killer().unwrap_or_else(|| Box::new(|| {}));
    daemon.detach(killer);
    let total = ms(t0.elapsed());
    debug!(sandbox = %rec.info.spec.id, prepare_ms = t.prepare_ms, eager_ready_ms = t.images_ready_ms,
           criu_ms = t.criu_ms, reseed_ms = t.reseed_ms, rebuild_ms, total_ms = total,
           copied = stats.copied_pages, faults = stats.faults, demand = stats.demand_batches,
           "lazy dedup start");
    Ok((
        sandbox,
        RestoreReply {
            read_base_ms,
            rebuild_ms,
            restore_ms: t.total_ms - t.images_ready_ms,
            total_ms: read_base_ms + total,
            ..RestoreReply::default()
        },
        stats.peak_buffered_bytes,
    ))
}

/// The rest of an early-answered start: waits for the rebuild and the server (bounded by
/// the start's bound again, from the answer) and records the outcome. The server kills the restored
/// processes itself when a page fails or the producer gives up ([`LazyDaemon::detach`]).
async fn background_fill(
    inner: Arc<Inner>,
    id: SandboxId,
    store: PathBuf,
    feed: LazyFeed,
    fill: Fill,
    producer: Option<tokio::task::JoinHandle<Result<f64, String>>>,
    left: Duration,
) {
    let t = Instant::now();
    let r = tokio::time::timeout(left, async {
        // The producer reports its own failures to the server (which kills); a producer
        // that stopped because the server ended has nothing to add.
        let rebuild_ms = match producer {
            Some(h) => h.await.ok().and_then(Result::ok),
            None => None,
        };
        feed.finished().await.map(|st| (st, rebuild_ms))
    })
    .await;
    let r = match r {
        Ok(r) => r,
        Err(_) => {
            let reason = format!("the pages were not all filled within {left:?} of the answer");
            feed.fail(reason.clone());
            Err(reason)
        }
    };
    match &r {
        Ok((st, rebuild_ms)) => {
            inner.lazy.record_hot(&store, &feed.faulted_batches());
            debug!(sandbox = %id, fill_ms = ms(t.elapsed()), rebuild_ms, copied = st.copied_pages,
                   faults = st.faults, demand = st.demand_batches,
                   peak_buffered = st.peak_buffered_bytes, "lazy fill complete");
        }
        Err(reason) => {
            inner.counters.lock().restore_failures += 1;
            warn!(sandbox = %id, %reason, "lazy fill failed after the start answered; the restored sandbox was killed");
        }
    }
    // Not taken (the start's caller gave up): nothing else will.
    inner.lazy.fills.lock().remove(&id);
    fill.finish(r.map(|_| ()));
}

/// Stops a producer after a failed start and waits for it (it holds the pages files).
async fn stop_producer(
    feed: &LazyFeed,
    producer: &Mutex<Option<tokio::task::JoinHandle<Result<f64, String>>>>,
) {
    feed.fail("the restore failed".into());
    let h = producer.lock().take();
    if let Some(h) = h {
        let _ = h.await;
    }
}

/// The rebuild of a lazy dedup start.
struct Produce {
    rebuilder: Arc<Rebuilder>,
    feed: LazyFeed,
    /// The batches holding eager pages.
    order: Vec<usize>,
    n_eager: usize,
    /// Eager pages (global page ranges).
    eager: Vec<std::ops::Range<u64>>,
    /// The pages files, by name.
    files: Vec<(String, std::fs::File)>,
    eager_tx: Mutex<Option<tokio::sync::oneshot::Sender<Result<(), String>>>>,
    bad: Arc<AtomicBool>,
    /// The check of the inputs (early answer), done before CRIU may read pages.
    check: Option<verify::Check>,
    /// Weak: an armed rebuild parked at its `go` must not keep the agent alive (the agent
    /// holds the armed start, whose drop lets the rebuild go).
    inner: std::sync::Weak<Inner>,
    /// Set to the time until CRIU may read pages (inputs and eager pages done), ms.
    gate_ms: Arc<Mutex<f64>>,
    /// When the start answered (early answer): the fill is background work from then on.
    answered_at: Arc<Mutex<Option<Instant>>>,
    /// The batches in the order they are rebuilt (the store's working set first).
    fill_order: Vec<usize>,
    /// Armed: wait here after the eager pages until the resume (or stop at a disarm).
    go: Option<Arc<Go>>,
}

impl Produce {
    /// Runs on the rebuild pool, one worker per thread taking the next batch: first the inputs
    /// (early answer) and the eager pages, then every batch (on threads of lower priority
    /// with early answer).
    fn run(&self) -> Result<(), String> {
        let t0 = Instant::now();
        let gone = || "the agent is gone".to_string();
        let inner = self.inner.upgrade().ok_or_else(gone)?;
        let pool = &inner.fg_pool;
        let store = self.rebuilder.store();
        // Pages file and first global page of each process.
        let mut spans = Vec::with_capacity(store.procs.len());
        let mut first = 0u64;
        for p in &store.procs {
            let f = self
                .files
                .iter()
                .find(|(n, _)| *n == p.pages_file)
                .map(|(_, f)| f)
                .ok_or_else(|| format!("the checkpoint has no {}", p.pages_file))?;
            spans.push((f, first, first + p.n_pages));
            first += p.n_pages;
        }
        let err: Mutex<Option<String>> = Mutex::new(None);
        let threads = pool.current_num_threads().max(1);
        let fail = |e: String| {
            self.feed.fail(e.clone());
            self.eager_done(Err(e.clone()));
            err.lock().get_or_insert(e);
        };
        // 0. The inputs (early answer): every base page the store references.
        if let Some(check) = &self.check
            && let Err(e) = pool.install(|| check.run(&inner.lazy.sums))
        {
            self.bad.store(true, Ordering::SeqCst);
            let e = error_chain(&e);
            fail(e.clone());
            return Err(e);
        }
        // 1. Only the eager pages (CRIU waits for them): each batch's block decoded once,
        //    then just those pages, written into the pages files.
        let next = AtomicUsize::new(0);
        pool.scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| {
                    let mut scratch = RebuildScratch::default();
                    let mut buf = Vec::new();
                    loop {
                        if err.lock().is_some() || self.feed.stopped() {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&b) = self.order.get(i).filter(|_| i < self.n_eager) else {
                            return;
                        };
                        let r = self.rebuilder.batch_pages(b);
                        buf.resize(((r.end - r.start) * PAGE) as usize, 0);
                        let res = self
                            .rebuilder
                            .rebuild_batch_pages(b, &self.eager, &mut scratch, &mut buf)
                            .map_err(|e| {
                                self.bad.store(true, Ordering::SeqCst);
                                error_chain(&e)
                            })
                            .and_then(|()| self.write_eager(&spans, r, &buf));
                        if let Err(e) = res {
                            fail(e);
                            return;
                        }
                    }
                });
            }
        });
        if err.lock().is_none() {
            *self.gate_ms.lock() = ms(t0.elapsed());
            self.eager_done(Ok(()));
        }
        drop(inner);
        if let Some(go) = &self.go
            && err.lock().is_none()
            && !go.wait()
        {
            return Err("disarmed".into());
        }
        // 2. Every page, batch by batch in order, to the lazy-pages server.
        let next = AtomicUsize::new(0);
        let normal = thread_nice();
        let low = normal.saturating_add(FILL_NICE).min(19);
        let early = self.check.is_some();
        // The priority a worker should run at: worker 0 keeps the normal one until the start
        // answered; after the answer every worker is background work, for [`FILL_LOW_FOR`] at
        // most (so that a busy node cannot starve a fill, which holds the sandbox's changing
        // flag and its page buffers).
        let wanted = |first: bool| {
            if !early {
                return normal;
            }
            match *self.answered_at.lock() {
                None if first => normal,
                None => low,
                Some(t) if t.elapsed() < FILL_LOW_FOR => low,
                Some(_) => normal,
            }
        };
        let work = |first: bool| {
            let mut scratch = RebuildScratch::default();
            let mut nice = normal;
            loop {
                if err.lock().is_some() || self.feed.stopped() {
                    return;
                }
                let want = wanted(first);
                if want != nice {
                    let _ = medes_sandbox::set_thread_nice(want);
                    nice = want;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&b) = self.fill_order.get(i) else {
                    return;
                };
                let r = self.rebuilder.batch_pages(b);
                let mut buf = self.feed.buffer(((r.end - r.start) * PAGE) as usize);
                if let Err(e) = self.rebuilder.rebuild_batch(b, &mut scratch, &mut buf) {
                    self.bad.store(true, Ordering::SeqCst);
                    fail(error_chain(&e));
                    return;
                }
                self.feed.push(b, buf);
            }
        };
        if self.check.is_some() {
            // After the answer this is background work: the restored runtime, the server's
            // on-demand pages and other starts come first. Until then one worker keeps the
            // normal priority (the fewer pages are missing when the runtime runs its reseed,
            // the fewer faults it waits for), the others yield to CRIU.
            std::thread::scope(|s| {
                for i in 0..threads {
                    let work = &work;
                    s.spawn(move || work(i == 0));
                }
            });
        } else {
            let inner = self.inner.upgrade().ok_or_else(gone)?;
            inner.fg_pool.scope(|s| {
                for _ in 0..threads {
                    s.spawn(|_| work(false));
                }
            });
        }
        match err.into_inner() {
            Some(e) => Err(e),
            // The server may end first (every page in place, or the processes gone).
            None if self.feed.stopped() && !self.feed.stats().complete => Err("stopped".into()),
            None => Ok(()),
        }
    }

    fn eager_done(&self, r: Result<(), String>) {
        if let Some(tx) = self.eager_tx.lock().take() {
            let _ = tx.send(r);
        }
    }

    /// Writes the eager pages of a batch (global pages `r`, data `buf`) into the pages files.
    fn write_eager(
        &self,
        spans: &[(&std::fs::File, u64, u64)],
        r: std::ops::Range<u64>,
        buf: &[u8],
    ) -> Result<(), String> {
        for e in &self.eager {
            let (a, z) = (e.start.max(r.start), e.end.min(r.end));
            if a >= z {
                continue;
            }
            for (f, lo, hi) in spans {
                let (pa, pz) = (a.max(*lo), z.min(*hi));
                if pa >= pz {
                    continue;
                }
                let src = &buf[((pa - r.start) * PAGE) as usize..((pz - r.start) * PAGE) as usize];
                f.write_all_at(src, (pa - lo) * PAGE)
                    .map_err(|e| format!("writing a pages file: {e}"))?;
            }
        }
        Ok(())
    }
}

/// The calling thread's nice value (0 if unknown).
fn thread_nice() -> i32 {
    // Field 19 of /proc/thread-self/stat; the fields after the command name (in parentheses,
    // which may hold spaces) start at field 3.
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}
