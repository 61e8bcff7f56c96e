//! An in-process lazy-pages server for `criu restore --lazy-pages` (CRIU 4.1's protocol, as in
//! its `criu/uffd.c`).
//!
//! With `--lazy-pages`, CRIU restores everything but the pages of private anonymous mappings
//! whose pagemap entries carry `PE_LAZY` (CRIU marks them so at every dump); it connects to
//! `lazy-pages.socket` in its work directory (the images directory), and every restored process
//! sends its pid (`i32`, negative for a zombie) and then its userfaultfd (`SCM_RIGHTS` on a
//! one-byte message) over that stream; the restorer registers the lazy mappings with it. When
//! all tasks are restored CRIU sends `0x52535446` ("restore finished") and lets them run. From
//! then on this server fills the lazy pages with `UFFDIO_COPY`: pages a process faults on first,
//! every other page in the background as its batch arrives ([`LazyFeed::push`]). It follows the
//! processes' address-space events (fork: a new userfaultfd for the child, which needs the pages
//! its parent still misses; mremap; `MADV_DONTNEED`/`MADV_REMOVE`; munmap) so no page lands
//! where it no longer belongs and no removed page is brought back. A fault on an address with
//! no image page gets a zero page. When every image page is in place the server closes the
//! userfaultfds (the kernel then serves any later fault itself) and ends.
//!
//! The page contents come from the caller: batches of `batch_pages` consecutive pages in the
//! *global page order* (the processes' pages images concatenated in [`LazyLayout`]'s order),
//! pushed by a producer, or produced on the server's thread by the `demand` callback when a
//! process faults on a page whose batch has not arrived. The caller verifies pages before it
//! hands them over; a failure ([`LazyFeed::fail`], a failing `demand`) stops the server: the
//! processes stay blocked on their missing pages (never handed a wrong page) until the owner
//! kills them ([`LazyDaemon::detach`]'s kill callback, or its own teardown).
//!
//! An owner may let the restored processes run before every page is in place (they fault on
//! what they touch first): [`LazyFeed::finished`] resolves when the server ended, and
//! [`LazyStats::buffered_bytes`] tells the page buffers it holds meanwhile.
//!
//! Userfaultfd is driven with raw ioctls through `libc`: the `userfaultfd` crate needs
//! libclang/bindgen at build time, which this project's fresh machines lack.
//!
//! Not done: a remote page server (CRIU's `--page-server` mode), prioritising pages near a
//! fault beyond its batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use medes_criu_image::{MmEntry, PE_LAZY, Pagemap, decode_mm, decode_pagemap};
use tracing::{debug, warn};

const PAGE: u64 = 4096;
/// The socket CRIU connects to, relative to its work directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// CRIU's "restore finished" word.
const RESTORE_FINISHED: u32 = 0x5253_5446;

// The userfaultfd ABI (linux/userfaultfd.h); `_IOC` encoding of x86-64 and arm64.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_WAKE: u64 = ioc(2, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(3, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(3, 0x04, 32);
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_LEN: usize = 32;

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// Building a [`LazyLayout`] or starting a [`LazyDaemon`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyStartError {
    /// An image is missing or cannot be decoded.
    #[error("image {name}: {reason}")]
    Image {
        /// The image file name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The socket or the server thread could not be set up.
    #[error("setting up the lazy-pages server: {what}")]
    Io {
        /// The step.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A present pagemap range of one process.
#[derive(Debug, Clone, Copy)]
struct Run {
    vaddr: u64,
    nr: u64,
    /// Global index of its first page.
    first: u64,
    lazy: bool,
}

/// A range still to be filled: `[start, end)` at run time, `img` its start at dump time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Iov {
    start: u64,
    end: u64,
    img: u64,
}

#[derive(Debug, Clone)]
struct ProcLayout {
    pid: u32,
    first: u64,
    n: u64,
    runs: Vec<Run>,
    iovs: Vec<Iov>,
}

/// Where the pages of a checkpoint's processes sit: their present pagemap ranges in the global
/// page order (each process's pages image, in the given order), which of them CRIU restores
/// itself (eager) and which it leaves to the lazy-pages server.
#[derive(Debug, Clone)]
pub struct LazyLayout {
    procs: Vec<ProcLayout>,
    n_pages: u64,
}

impl LazyLayout {
    /// From each process's `(pid, pagemap-<pid>.img, mm-<pid>.img)`, in global page order.
    pub fn new(procs: &[(u32, &[u8], &[u8])]) -> Result<LazyLayout, LazyStartError> {
        let mut parsed = Vec::with_capacity(procs.len());
        for &(pid, pagemap, mm) in procs {
            let bad = |name: &str, e: String| LazyStartError::Image {
                name: format!("{name}-{pid}.img"),
                reason: e,
            };
            let pm = decode_pagemap(pagemap).map_err(|e| bad("pagemap", e.to_string()))?;
            let mm = decode_mm(mm).map_err(|e| bad("mm", e.to_string()))?;
            parsed.push((pid, pm, mm));
        }
        let views: Vec<_> = parsed.iter().map(|(p, pm, mm)| (*p, pm, mm)).collect();
        LazyLayout::from_parsed(&views)
    }

    /// [`LazyLayout::new`] from images already parsed.
    pub fn from_parsed(procs: &[(u32, &Pagemap, &MmEntry)]) -> Result<LazyLayout, LazyStartError> {
        let mut out = Vec::with_capacity(procs.len());
        let mut first = 0u64;
        for &(pid, pm, mm) in procs {
            let bad = |name: &str, e: String| LazyStartError::Image {
                name: format!("{name}-{pid}.img"),
                reason: e,
            };
            let mut runs = Vec::new();
            let mut iovs = Vec::new();
            let mut at = first;
            let mut vmas = mm.vmas.iter().peekable();
            for e in pm.entries.iter().filter(|e| e.is_present()) {
                let lazy = e.flags.unwrap_or(0) & PE_LAZY != 0;
                let end = e
                    .nr_pages
                    .checked_mul(PAGE)
                    .and_then(|l| e.vaddr.checked_add(l))
                    .ok_or_else(|| bad("pagemap", format!("range at {:#x} overflows", e.vaddr)))?;
                runs.push(Run {
                    vaddr: e.vaddr,
                    nr: e.nr_pages,
                    first: at,
                    lazy,
                });
                at += e.nr_pages;
                if lazy {
                    // Split at VMA boundaries: UFFDIO_COPY works within one VMA.
                    let mut s = e.vaddr;
                    while s < end {
                        while vmas.peek().is_some_and(|v| v.end <= s) {
                            vmas.next();
                        }
                        let Some(v) = vmas.peek() else {
                            return Err(bad("mm", format!("no mapping covers {s:#x}")));
                        };
                        if v.start > s {
                            return Err(bad("mm", format!("no mapping covers {s:#x}")));
                        }
                        // CRIU skips every page marked lazy but hands only private anonymous
                        // mappings to the server: a lazy page elsewhere would be left as the
                        // file's (a wrong process), never filled.
                        if v.flags & (libc::MAP_ANONYMOUS | libc::MAP_SHARED) as u32
                            != libc::MAP_ANONYMOUS as u32
                        {
                            return Err(bad(
                                "pagemap",
                                format!("lazy page at {s:#x} outside a private anonymous mapping"),
                            ));
                        }
                        let z = end.min(v.end);
                        iovs.push(Iov {
                            start: s,
                            end: z,
                            img: s,
                        });
                        s = z;
                    }
                }
            }
            if runs
                .windows(2)
                .any(|w| w[0].vaddr + w[0].nr * PAGE > w[1].vaddr)
            {
                return Err(bad("pagemap", "ranges are not sorted".into()));
            }
            out.push(ProcLayout {
                pid,
                first,
                n: at - first,
                runs,
                iovs,
            });
            first = at;
        }
        Ok(LazyLayout {
            procs: out,
            n_pages: first,
        })
    }

    /// Number of pages (all processes).
    pub fn n_pages(&self) -> u64 {
        self.n_pages
    }

    /// Pages of each process, in order.
    pub fn pages_per_process(&self) -> Vec<(u32, u64)> {
        self.procs.iter().map(|p| (p.pid, p.n)).collect()
    }

    /// Pages CRIU reads from the pages images itself (not lazy), as global page ranges.
    pub fn eager_pages(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in self.procs.iter().flat_map(|p| &p.runs).filter(|r| !r.lazy) {
            match out.last_mut() {
                Some(l) if l.end == r.first => l.end = r.first + r.nr,
                _ => out.push(r.first..r.first + r.nr),
            }
        }
        out
    }

    fn proc_of(&self, pid: u32) -> Option<usize> {
        self.procs.iter().position(|p| p.pid == pid)
    }
}

/// Counters of one lazy restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Pages copied into the processes.
    pub copied_pages: u64,
    /// Page faults served.
    pub faults: u64,
    /// Page groups produced on demand (a fault before its batch arrived; [`FAULT_PAGES`]
    /// pages each, or a whole batch for what a forked process still misses at the end).
    pub demand_batches: u64,
    /// Most bytes of page buffers held at once (queued, cached or pooled).
    pub peak_buffered_bytes: u64,
    /// Bytes of page buffers held now (0 once the server ended).
    pub buffered_bytes: u64,
    /// The server filled every image page (and ended).
    pub complete: bool,
    /// From "restore finished" to the last page filled, µs (0 until then).
    pub fill_us: u64,
}

const RUNNING: u8 = 0;
const DETACHED: u8 = 1;
const ABORTED: u8 = 2;

type KillFn = Box<dyn FnOnce() + Send>;

/// A request to fill some ranges of a process first: (pid, `[start, end)` ranges, answer).
type Prefetch = (
    u32,
    Vec<(u64, u64)>,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

struct Shared {
    queue: Mutex<Vec<(usize, Vec<u8>)>>,
    pool: Mutex<Vec<Vec<u8>>>,
    failed: Mutex<Option<String>>,
    failed_notify: tokio::sync::Notify,
    state: AtomicU8,
    kill: Mutex<Option<KillFn>>,
    wake: UnixStream,
    copied: AtomicU64,
    faults: AtomicU64,
    demand: AtomicU64,
    peak: AtomicU64,
    /// Bytes of page buffers held now.
    held: AtomicU64,
    /// Batches of the pages the processes faulted on, in the order of their first fault.
    faulted: Mutex<Vec<usize>>,
    complete: std::sync::atomic::AtomicBool,
    fill_us: AtomicU64,
    /// Pending prefetches; `None` once the server ended (nothing more will be filled).
    prefetch: Mutex<Option<Vec<Prefetch>>>,
    /// The server thread ended: page buffers are dropped, not queued.
    ended: std::sync::atomic::AtomicBool,
    /// Signalled (to all waiters) when the server thread ended.
    ended_notify: tokio::sync::Notify,
    /// Signalled when a buffer returns to the pool (or the server stops).
    freed: std::sync::Condvar,
    /// Buffers handed to the producer so far, and the most it may hold at once.
    created: AtomicU64,
    cap: u64,
    /// The background fill waits (faults and prefetches are still served): an armed restore
    /// whose processes are stopped ([`LazyDaemon::hold_fill`]).
    fill_held: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stats(&self) -> LazyStats {
        LazyStats {
            copied_pages: self.copied.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            demand_batches: self.demand.load(Ordering::Relaxed),
            peak_buffered_bytes: self.peak.load(Ordering::Relaxed),
            buffered_bytes: self.held.load(Ordering::Relaxed),
            complete: self.complete.load(Ordering::SeqCst),
            fill_us: self.fill_us.load(Ordering::Relaxed),
        }
    }

    /// Returns page buffers to the pool (waking a producer waiting for one).
    fn give_back(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        lock(&self.pool).extend(bufs);
        self.freed.notify_all();
    }

    fn poke(&self) {
        let _ = (&self.wake).write(&[1]);
    }

    /// Records the first failure; kills the processes if the owner detached.
    fn fail(&self, reason: String) {
        {
            let mut f = lock(&self.failed);
            if f.is_some() {
                return;
            }
            *f = Some(reason);
        }
        self.failed_notify.notify_one();
        self.freed.notify_all();
        self.poke();
        if self.state.load(Ordering::SeqCst) == DETACHED
            && let Some(k) = lock(&self.kill).take()
        {
            k();
        }
    }
}

/// The producer's handle: pushes verified batches to the server. Cheap to clone.
#[derive(Clone)]
pub struct LazyFeed {
    shared: Arc<Shared>,
}

impl LazyFeed {
    /// A buffer of `len` bytes for a batch: recycled from copied batches; a new one only while
    /// fewer than the server's `max_buffers` exist, else this waits for one to come back (so
    /// the page buffers held stay bounded, and recycled buffers cost no page faults).
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let sh = &self.shared;
        let mut pool = lock(&sh.pool);
        loop {
            if let Some(mut b) = pool.pop() {
                b.resize(len, 0);
                return b;
            }
            if sh.created.load(Ordering::SeqCst) < sh.cap
                || self.stopped()
                || sh.ended.load(Ordering::SeqCst)
            {
                sh.created.fetch_add(1, Ordering::SeqCst);
                return vec![0; len];
            }
            pool = sh
                .freed
                .wait_timeout(pool, Duration::from_millis(20))
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
    }

    /// Hands over batch `batch` (its pages, every one verified).
    pub fn push(&self, batch: usize, data: Vec<u8>) {
        if self.shared.ended.load(Ordering::SeqCst) {
            return; // nothing will copy it any more
        }
        lock(&self.shared.queue).push((batch, data));
        self.shared.poke();
    }

    /// The producer failed (e.g. a page failed verification): the server stops.
    pub fn fail(&self, reason: String) {
        self.shared.fail(reason);
    }

    /// Whether the server failed, stopped or ended (nothing more will be copied: a producer
    /// may stop).
    pub fn stopped(&self) -> bool {
        lock(&self.shared.failed).is_some()
            || self.shared.state.load(Ordering::SeqCst) == ABORTED
            || self.shared.ended.load(Ordering::SeqCst)
    }

    /// Whether the server thread ended (every page filled, its processes gone, or a failure).
    pub fn ended(&self) -> bool {
        self.shared.ended.load(Ordering::SeqCst)
    }

    /// The batches of the pages the processes faulted on so far, in the order of their first
    /// fault: what the restored processes touched first (a producer may produce those first
    /// at the next restore of the same image).
    pub fn faulted_batches(&self) -> Vec<usize> {
        lock(&self.shared.faulted).clone()
    }

    /// Counters so far (the same as [`LazyDaemon::stats`], also after the daemon was
    /// detached).
    pub fn stats(&self) -> LazyStats {
        self.shared.stats()
    }

    /// Resolves when the server thread ended: its counters if every image page was filled (or
    /// every process it served is gone), else the failure that stopped it. For owners that let
    /// the restored processes run before the fill is complete ([`LazyDaemon::detach`]).
    pub async fn finished(&self) -> Result<LazyStats, String> {
        let sh = &self.shared;
        loop {
            let notified = sh.ended_notify.notified();
            if sh.ended.load(Ordering::SeqCst) {
                let st = sh.stats();
                return if st.complete {
                    Ok(st)
                } else {
                    Err(lock(&sh.failed)
                        .clone()
                        .unwrap_or_else(|| "the lazy-pages server stopped".into()))
                };
            }
            notified.await;
        }
    }
}

/// Produces the pages `pages` (global page indices, inside batch `b`) of batch `b` into the
/// buffer (sized for the whole batch; the bytes of its other pages are left as they are),
/// every one verified.
pub type DemandFn = Box<dyn FnMut(usize, Range<u64>, &mut [u8]) -> Result<(), String> + Send>;

/// Pages produced for a fault on a page whose batch has not arrived: the aligned group of
/// this many pages around it (a whole batch costs milliseconds; a fault waits for this).
const FAULT_PAGES: u64 = 16;

/// A running lazy-pages server (see the module docs). Dropping it without
/// [`LazyDaemon::detach`] stops it at once (for a restore that failed: its processes must be
/// killed by then, since closing the userfaultfds lets missing pages read as zeros).
pub struct LazyDaemon {
    shared: Arc<Shared>,
    detached: bool,
}

impl LazyDaemon {
    /// Binds `<dir>/lazy-pages.socket` and starts the server thread. `batch_pages` is the
    /// number of pages per batch (global order); the producer holds at most `max_buffers`
    /// batch buffers at once ([`LazyFeed::buffer`]); `demand` produces a batch on the server's
    /// thread when a process faults before it arrived.
    pub fn start(
        dir: &Path,
        layout: LazyLayout,
        batch_pages: usize,
        max_buffers: usize,
        demand: DemandFn,
    ) -> Result<(LazyDaemon, LazyFeed), LazyStartError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| LazyStartError::Io { what, source }
        };
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io("binding the socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("configuring the socket"))?;
        let (wake, wake_rx) = UnixStream::pair().map_err(io("creating a socket pair"))?;
        wake.set_nonblocking(true).map_err(io("socket pair"))?;
        wake_rx.set_nonblocking(true).map_err(io("socket pair"))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            pool: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            failed_notify: tokio::sync::Notify::new(),
            state: AtomicU8::new(RUNNING),
            kill: Mutex::new(None),
            wake,
            copied: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            held: AtomicU64::new(0),
            faulted: Mutex::new(Vec::new()),
            complete: std::sync::atomic::AtomicBool::new(false),
            fill_us: AtomicU64::new(0),
            prefetch: Mutex::new(Some(Vec::new())),
            ended: std::sync::atomic::AtomicBool::new(false),
            ended_notify: tokio::sync::Notify::new(),
            freed: std::sync::Condvar::new(),
            created: AtomicU64::new(0),
            cap: max_buffers.max(1) as u64,
            fill_held: std::sync::atomic::AtomicBool::new(false),
        });
        let n_batches = layout.n_pages.div_ceil(batch_pages.max(1) as u64) as usize;
        let server = Server {
            shared: shared.clone(),
            layout,
            batch_pages: batch_pages.max(1) as u64,
            n_batches,
            demand,
            listener: Some(listener),
            client: None,
            wake_rx,
            rx: Vec::new(),
            fds: Vec::new(),
            finished: None,
            tasks: Vec::new(),
            faults: Vec::new(),
            cache: BTreeMap::new(),
            partial: Vec::new(),
            faulted: vec![false; n_batches],
            done: vec![false; n_batches],
            n_done: 0,
        };
        std::thread::Builder::new()
            .name("medes-lazy".into())
            .spawn(move || server.main())
            .map_err(io("starting the server thread"))?;
        Ok((
            LazyDaemon {
                shared: shared.clone(),
                detached: false,
            },
            LazyFeed { shared },
        ))
    }

    /// The failure that stopped the server, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failed).clone()
    }

    /// Resolves with the failure reason when the server fails (never resolves otherwise).
    pub async fn failed(&self) -> String {
        loop {
            if let Some(f) = self.failure() {
                return f;
            }
            self.shared.failed_notify.notified().await;
        }
    }

    /// Fills the image pages of `ranges` (`[start, end)` addresses) of process `pid` (its pid
    /// in the checkpoint) now, ahead of everything else, and resolves when they are in place:
    /// for accesses that cannot wait for a fault to be served, such as writes through
    /// `/proc/<pid>/mem` (a missing page there fails with `EIO`).
    pub async fn prefetch(&self, pid: u32, ranges: Vec<(u64, u64)>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut q = lock(&self.shared.prefetch);
            match q.as_mut() {
                Some(q) => q.push((pid, ranges, tx)),
                None => {
                    return if self.shared.complete.load(Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err(self
                            .failure()
                            .unwrap_or_else(|| "the lazy-pages server stopped".into()))
                    };
                }
            }
        }
        self.shared.poke();
        rx.await
            .unwrap_or_else(|_| Err("the lazy-pages server stopped".into()))
    }

    /// Counters so far.
    pub fn stats(&self) -> LazyStats {
        self.shared.stats()
    }

    /// Holds (`true`) or lets go (`false`) of the background fill: while held, the server
    /// serves faults and prefetches at any time but copies no other page, even after CRIU said
    /// the restore finished, and queued batches stay queued. For a restore left stopped ahead
    /// of its request ([`Sandbox::prestart_lazy`]): its processes must not grow to a warm
    /// sandbox's size before they are resumed. Call it before CRIU starts.
    ///
    /// [`Sandbox::prestart_lazy`]: crate::Sandbox::prestart_lazy
    pub fn hold_fill(&self, hold: bool) {
        self.shared.fill_held.store(hold, Ordering::SeqCst);
        self.shared.poke();
    }

    /// Lets the server finish on its own (the restore succeeded); should it fail later, it
    /// calls `kill` (which must kill the restored processes) before letting go of them.
    pub fn detach(mut self, kill: KillFn) {
        self.detached = true;
        *lock(&self.shared.kill) = Some(kill);
        self.shared.state.store(DETACHED, Ordering::SeqCst);
        if lock(&self.shared.failed).is_some()
            && let Some(k) = lock(&self.shared.kill).take()
        {
            k();
        }
        self.shared.poke();
    }
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        if !self.detached {
            self.shared.state.store(ABORTED, Ordering::SeqCst);
            self.shared.poke();
        }
    }
}

struct Task {
    pid: u32,
    proc_idx: usize,
    uffd: File,
    iovs: Vec<Iov>,
    exited: bool,
}

struct Server {
    shared: Arc<Shared>,
    layout: LazyLayout,
    batch_pages: u64,
    n_batches: usize,
    demand: DemandFn,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    wake_rx: UnixStream,
    rx: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// When CRIU said the restore finished.
    finished: Option<Instant>,
    tasks: Vec<Task>,
    /// Faults read but not served yet: (task, page address).
    faults: Vec<(usize, u64)>,
    cache: BTreeMap<usize, Vec<u8>>,
    /// The buffer of pages produced for a fault.
    partial: Vec<u8>,
    /// Batches faulted on (see [`LazyFeed::faulted_batches`]).
    faulted: Vec<bool>,
    /// Batches filled into every task.
    done: Vec<bool>,
    n_done: usize,
}

/// How one UFFDIO_COPY ended.
enum Copy {
    Done,
    /// `n` bytes were copied, then something stopped it.
    Partial(u64),
    /// The first page exists already.
    Exists,
    /// Address-space events are pending: read them first.
    Again,
    /// No registered mapping there any more.
    Gone,
    /// The process is gone (the errno).
    Exited(i32),
}

fn uffd_copy(fd: RawFd, dst: u64, src: &[u8]) -> io::Result<Copy> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `c` is a valid uffdio_copy; the source range is `src`, readable for its length;
    // the destination is in the restored process's address space, not ours.
    let r = unsafe { libc::ioctl(fd, UFFDIO_COPY as _, &mut c as *mut UffdioCopy) };
    if r == 0 {
        return Ok(Copy::Done);
    }
    let errno = io::Error::last_os_error();
    if c.copy > 0 {
        return Ok(Copy::Partial(c.copy as u64));
    }
    let code = if c.copy < 0 {
        (-c.copy) as i32
    } else {
        errno.raw_os_error().unwrap_or(0)
    };
    Ok(match code {
        libc::EEXIST => Copy::Exists,
        libc::EAGAIN => Copy::Again,
        libc::ENOENT | libc::EINVAL => Copy::Gone,
        libc::ESRCH | libc::ENOSPC => Copy::Exited(code),
        _ => return Err(io::Error::from_raw_os_error(code)),
    })
}

/// Maps a zero page at `addr`; wakes the faulting threads if a page is there already.
fn uffd_zero(fd: RawFd, addr: u64) -> io::Result<Copy> {
    let mut z = UffdioZeropage {
        range: UffdioRange {
            start: addr,
            len: PAGE,
        },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `z` is a valid uffdio_zeropage for one page of the process's address space.
    let r = unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE as _, &mut z as *mut UffdioZeropage) };
    if r == 0 {
        return Ok(Copy::Done);
    }
    let code = if z.zeropage < 0 {
        (-z.zeropage) as i32
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    };
    match code {
        libc::EEXIST => {
            let mut w = UffdioRange {
                start: addr,
                len: PAGE,
            };
            // SAFETY: `w` is a valid uffdio_range; waking has no other effect.
            unsafe { libc::ioctl(fd, UFFDIO_WAKE as _, &mut w as *mut UffdioRange) };
            Ok(Copy::Exists)
        }
        libc::EAGAIN => Ok(Copy::Again),
        libc::ENOENT | libc::EINVAL => Ok(Copy::Gone),
        libc::ESRCH | libc::ENOSPC => Ok(Copy::Exited(code)),
        _ => Err(io::Error::from_raw_os_error(code)),
    }
}

/// Removes `[a, z)` (in dump-time addresses) from `iovs`.
fn drop_img(iovs: &mut Vec<Iov>, a: u64, z: u64) {
    if !iovs
        .iter()
        .any(|v| v.img < z && a < v.img + (v.end - v.start))
    {
        return;
    }
    let mut out = Vec::with_capacity(iovs.len() + 1);
    for v in iovs.drain(..) {
        let (ia, iz) = (v.img, v.img + (v.end - v.start));
        if iz <= a || z <= ia {
            out.push(v);
            continue;
        }
        if ia < a {
            out.push(Iov {
                start: v.start,
                end: v.start + (a - ia),
                img: ia,
            });
        }
        if z < iz {
            out.push(Iov {
                start: v.start + (z - ia),
                end: v.end,
                img: z,
            });
        }
    }
    *iovs = out;
}

/// Removes `[a, z)` (run-time addresses) from `iovs`.
fn drop_cur(iovs: &mut Vec<Iov>, a: u64, z: u64) {
    let mut out = Vec::with_capacity(iovs.len() + 1);
    for v in iovs.drain(..) {
        if v.end <= a || z <= v.start {
            out.push(v);
            continue;
        }
        if v.start < a {
            out.push(Iov {
                start: v.start,
                end: a,
                img: v.img,
            });
        }
        if z < v.end {
            out.push(Iov {
                start: z,
                end: v.end,
                img: v.img + (z - v.start),
            });
        }
    }
    *iovs = out;
}

/// Moves what is left of `[from, from + len)` to `to` (an mremap).
fn remap(iovs: &mut Vec<Iov>, from: u64, to: u64, len: u64) {
    let z = from.saturating_add(len);
    let mut out = Vec::with_capacity(iovs.len() + 2);
    for v in iovs.drain(..) {
        if v.end <= from || z <= v.start {
            out.push(v);
            continue;
        }
        let (a, b) = (v.start.max(from), v.end.min(z));
        if v.start < a {
            out.push(Iov {
                start: v.start,
                end: a,
                img: v.img,
            });
        }
        out.push(Iov {
            start: to + (a - from),
            end: to + (b - from),
            img: v.img + (a - v.start),
        });
        if b < v.end {
            out.push(Iov {
                start: b,
                end: v.end,
                img: v.img + (b - v.start),
            });
        }
    }
    out.sort_by_key(|v| v.start);
    *iovs = out;
}

impl Server {
    fn main(mut self) {
        let r = self.serve();
        let shared = self.shared.clone();
        // Complete before the prefetch queue closes: a prefetch arriving in between must see
        // the pages in place, not a stopped server.
        if r.is_ok() && shared.state.load(Ordering::SeqCst) != ABORTED {
            shared.complete.store(true, Ordering::SeqCst);
        }
        // No prefetch waits for a server that ended.
        if let Some(q) = lock(&shared.prefetch).take() {
            for (_, _, tx) in q {
                let _ = tx.send(match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        match r {
            Ok(()) => {
                if shared.complete.load(Ordering::SeqCst) {
                    debug!(
                        copied = shared.copied.load(Ordering::Relaxed),
                        faults = shared.faults.load(Ordering::Relaxed),
                        "lazy pages complete"
                    );
                }
            }
            Err(reason) => {
                warn!(%reason, "lazy-pages server failed");
                shared.fail(reason);
                // Keep the userfaultfds (the processes stay blocked, never see a missing page
                // as zeros) until the owner killed them or let go.
                while shared.state.load(Ordering::SeqCst) == RUNNING {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // Free the page buffers now (the handles may live on); dropping `self` closes the
        // userfaultfds.
        shared.ended.store(true, Ordering::SeqCst);
        lock(&shared.queue).clear();
        lock(&shared.pool).clear();
        self.cache.clear();
        shared.held.store(0, Ordering::Relaxed);
        shared.freed.notify_all();
        shared.ended_notify.notify_waiters();
    }

    fn held_bytes(&self) -> u64 {
        let q: usize = lock(&self.shared.queue).iter().map(|(_, d)| d.len()).sum();
        let p: usize = lock(&self.shared.pool).iter().map(Vec::capacity).sum();
        let c: usize = self.cache.values().map(Vec::capacity).sum();
        (q + p + c + self.partial.capacity()) as u64
    }

    fn serve(&mut self) -> Result<(), String> {
        loop {
            if self.shared.state.load(Ordering::SeqCst) == ABORTED {
                return Ok(());
            }
            if let Some(f) = lock(&self.shared.failed).clone() {
                return Err(f);
            }
            let busy = !self.faults.is_empty() || self.background_ready();
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.tasks.len() + 2);
            let pfd = |fd: RawFd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            fds.push(pfd(self.wake_rx.as_raw_fd()));
            let sock = match (&self.client, &self.listener) {
                (Some(c), _) => c.as_raw_fd(),
                (None, Some(l)) => l.as_raw_fd(),
                (None, None) => -1,
            };
            fds.push(pfd(sock));
            for t in &self.tasks {
                fds.push(pfd(if t.exited { -1 } else { t.uffd.as_raw_fd() }));
            }
            let timeout = if busy { 0 } else { 100 };
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
                continue;
            }
            if fds[0].revents != 0 {
                let mut b = [0u8; 64];
                while matches!((&self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
            }
            if fds[1].revents != 0 {
                self.socket_event()?;
            }
            let ready: Vec<usize> = fds[2..]
                .iter()
                .enumerate()
                .filter(|(_, p)| p.revents != 0)
                .map(|(i, _)| i)
                .collect();
            for ti in ready {
                self.read_events(ti)?;
            }
            self.take_queue();
            while let Some((ti, addr)) = self.faults.pop() {
                self.serve_fault(ti, addr)?;
            }
            self.prefetch()?;
            if self.shared.fill_held.load(Ordering::SeqCst)
                && self.faults.is_empty()
                && self.partial.capacity() > 0
            {
                // Held (an armed restore): no page buffer stays for what was served.
                self.partial = Vec::new();
            }
            if self.finished.is_some() && !self.shared.fill_held.load(Ordering::SeqCst) {
                self.background_step()?;
                if self.faults.is_empty()
                    && self.tasks.iter().all(|t| t.exited || t.iovs.is_empty())
                {
                    let us = self.finished.map_or(0, |t| t.elapsed().as_micros() as u64);
                    self.shared.fill_us.store(us, Ordering::Relaxed);
                    return Ok(());
                }
            }
            let held = self.held_bytes();
            self.shared.peak.fetch_max(held, Ordering::Relaxed);
            self.shared.held.store(held, Ordering::Relaxed);
        }
    }

    /// Serves the pending prefetches.
    fn prefetch(&mut self) -> Result<(), String> {
        let reqs = match lock(&self.shared.prefetch).as_mut() {
            Some(q) => std::mem::take(q),
            None => Vec::new(),
        };
        for (pid, ranges, tx) in reqs {
            for ti in 0..self.tasks.len() {
                if self.tasks[ti].pid != pid {
                    continue;
                }
                for &(a, z) in &ranges {
                    let mut addr = a & !(PAGE - 1);
                    while addr < z && !self.tasks[ti].exited {
                        if self.tasks[ti]
                            .iovs
                            .iter()
                            .any(|v| v.start <= addr && addr < v.end)
                        {
                            self.serve_fault(ti, addr)?;
                        }
                        addr += PAGE;
                    }
                }
            }
            let _ = tx.send(Ok(()));
        }
        Ok(())
    }

    fn background_ready(&self) -> bool {
        self.finished.is_some()
            && !self.shared.fill_held.load(Ordering::SeqCst)
            && (!self.cache.is_empty()
                || (self.n_done == self.n_batches
                    && self.tasks.iter().any(|t| !t.exited && !t.iovs.is_empty())))
    }

    fn take_queue(&mut self) {
        let q = std::mem::take(&mut *lock(&self.shared.queue));
        let mut pool = Vec::new();
        for (b, data) in q {
            if b >= self.n_batches || self.done[b] || self.cache.contains_key(&b) {
                pool.push(data);
            } else {
                self.cache.insert(b, data);
            }
        }
        self.shared.give_back(pool);
    }

    fn socket_event(&mut self) -> Result<(), String> {
        if self.client.is_none() {
            let Some(l) = &self.listener else {
                return Ok(());
            };
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)
                        .map_err(|e| format!("lazy-pages socket: {e}"))?;
                    self.client = Some(s);
                    self.listener = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accepting CRIU's connection: {e}")),
            }
            return Ok(());
        }
        let Some(c) = &self.client else {
            return Ok(());
        };
        loop {
            let mut buf = [0u8; 64];
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let r = nix::sys::socket::recvmsg::<()>(
                c.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC
                    | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
            let msg = match r {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("reading CRIU's lazy-pages socket: {e}")),
            };
            let n = msg.bytes;
            if let Ok(cm) = msg.cmsgs() {
                for m in cm {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = m {
                        for fd in fds {
                            // SAFETY: SCM_RIGHTS just installed this fd in our table; we own it.
                            self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            if n == 0 {
                // CRIU is gone; after a finished restore this is normal.
                self.client = None;
                break;
            }
            self.rx.extend_from_slice(&buf[..n]);
        }
        self.parse_socket()
    }

    fn parse_socket(&mut self) -> Result<(), String> {
        while self.rx.len() >= 4 {
            let v = i32::from_ne_bytes([self.rx[0], self.rx[1], self.rx[2], self.rx[3]]);
            if v as u32 == RESTORE_FINISHED {
                self.rx.drain(..4);
                self.finished = Some(Instant::now());
                debug!(tasks = self.tasks.len(), "criu: restore finished");
                continue;
            }
            if v < 0 {
                self.rx.drain(..4); // a zombie: no memory
                continue;
            }
            if self.rx.len() < 5 || self.fds.is_empty() {
                break;
            }
            self.rx.drain(..5);
            let fd = self.fds.remove(0);
            let pid = v as u32;
            let proc_idx = self
                .layout
                .proc_of(pid)
                .ok_or_else(|| format!("criu sent process {pid}, which has no pagemap"))?;
            let iovs = self.layout.procs[proc_idx].iovs.clone();
            debug!(pid, iovs = iovs.len(), "criu: userfaultfd received");
            self.tasks.push(Task {
                pid,
                proc_idx,
                uffd: File::from(fd),
                iovs,
                exited: false,
            });
        }
        Ok(())
    }

    /// Reads every pending message of task `ti`: address-space events are applied now, faults
    /// queued.
    fn read_events(&mut self, ti: usize) -> Result<(), String> {
        loop {
            let t = &mut self.tasks[ti];
            if t.exited {
                return Ok(());
            }
            let mut m = [0u8; MSG_LEN];
            let n = match (&t.uffd).read(&mut m) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading the userfaultfd of {}: {e}", t.pid)),
            };
            if n == 0 {
                return Ok(());
            }
            if n != MSG_LEN {
                return Err(format!("short userfaultfd message ({n} bytes)"));
            }
            let w = |i: usize| u64::from_ne_bytes(m[i..i + 8].try_into().unwrap_or([0; 8]));
            match m[0] {
                EVENT_PAGEFAULT => self.faults.push((ti, w(16) & !(PAGE - 1))),
                EVENT_FORK => {
                    let fd = (w(8) & 0xffff_ffff) as RawFd;
                    // SAFETY: the kernel installed this new userfaultfd in our table when
                    // the message was read; nothing else owns it.
                    let uffd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    let child = Task {
                        pid: t.pid,
                        proc_idx: t.proc_idx,
                        uffd,
                        iovs: t.iovs.clone(),
                        exited: false,
                    };
                    debug!(pid = t.pid, "fork of a lazily restored process");
                    self.tasks.push(child);
                }
                EVENT_REMAP => remap(&mut t.iovs, w(8), w(16), w(24)),
                EVENT_REMOVE | EVENT_UNMAP => drop_cur(&mut t.iovs, w(8), w(16)),
                e => return Err(format!("unexpected userfaultfd event {e:#x}")),
            }
        }
    }

    /// The global page of dump-time address `img` of process `p`.
    fn global_page(&self, p: usize, img: u64) -> Option<u64> {
        let runs = &self.layout.procs[p].runs;
        let i = runs.partition_point(|r| r.vaddr + r.nr * PAGE <= img);
        let r = runs.get(i)?;
        (r.vaddr <= img).then(|| r.first + (img - r.vaddr) / PAGE)
    }

    /// Batch `b`'s data: cached, or produced now.
    fn ensure(&mut self, b: usize) -> Result<(), String> {
        if self.cache.contains_key(&b) {
            return Ok(());
        }
        self.take_queue();
        if self.cache.contains_key(&b) {
            return Ok(());
        }
        let lo = b as u64 * self.batch_pages;
        let hi = (lo + self.batch_pages).min(self.layout.n_pages);
        let len = ((hi - lo) * PAGE) as usize;
        let mut buf = lock(&self.shared.pool).pop().unwrap_or_default();
        buf.resize(len, 0);
        (self.demand)(b, lo..hi, &mut buf)?;
        self.shared.demand.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(b, buf);
        Ok(())
    }

    fn serve_fault(&mut self, ti: usize, addr: u64) -> Result<(), String> {
        self.shared.faults.fetch_add(1, Ordering::Relaxed);
        let t = &self.tasks[ti];
        if t.exited {
            return Ok(());
        }
        let hit = t
            .iovs
            .iter()
            .find(|v| v.start <= addr && addr < v.end)
            .map(|v| v.img + (addr - v.start));
        if let Some(img) = hit
            && let Some(g) = self.global_page(t.proc_idx, img)
        {
            let b = (g / self.batch_pages) as usize;
            if let Some(seen) = self.faulted.get_mut(b)
                && !*seen
            {
                *seen = true;
                lock(&self.shared.faulted).push(b);
            }
            self.take_queue();
            if self.cache.contains_key(&b) {
                self.fill(ti, b)?;
            } else {
                // Only the pages around the fault now; the batch comes later.
                let lo = b as u64 * self.batch_pages;
                let hi = (lo + self.batch_pages).min(self.layout.n_pages);
                let a = (g - (g - lo) % FAULT_PAGES).max(lo);
                let z = (a + FAULT_PAGES).min(hi);
                let mut buf = std::mem::take(&mut self.partial);
                buf.resize(((hi - lo) * PAGE) as usize, 0);
                let r = (self.demand)(b, a..z, &mut buf)
                    .and_then(|()| self.fill_from(ti, b, &buf, a..z));
                self.partial = buf;
                r?;
                self.shared.demand.fetch_add(1, Ordering::Relaxed);
            }
            let t = &self.tasks[ti];
            if t.exited || !t.iovs.iter().any(|v| v.start <= addr && addr < v.end) {
                return Ok(());
            }
            // Still missing (its mapping changed meanwhile): serve it as a new fault.
            self.faults.push((ti, addr));
            return Ok(());
        }
        // No image page there: a zero page (or the page arrived meanwhile: wake).
        loop {
            let fd = self.tasks[ti].uffd.as_raw_fd();
            match uffd_zero(fd, addr).map_err(|e| format!("UFFDIO_ZEROPAGE: {e}"))? {
                Copy::Again => self.read_events(ti)?,
                Copy::Exited(_) => {
                    self.exit(ti);
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    fn exit(&mut self, ti: usize) {
        let t = &mut self.tasks[ti];
        t.exited = true;
        t.iovs.clear();
    }

    /// Copies batch `b` (cached) into task `ti` wherever it still misses pages.
    fn fill(&mut self, ti: usize, b: usize) -> Result<(), String> {
        let lo = b as u64 * self.batch_pages;
        let hi = (lo + self.batch_pages).min(self.layout.n_pages);
        let Some(data) = self.cache.remove(&b) else {
            return Err(format!("batch {b} is not available"));
        };
        let r = self.fill_from(ti, b, &data, lo..hi);
        self.cache.insert(b, data);
        r
    }

    /// Copies the pages `range` (global pages inside batch `b`) from `data` (batch `b`'s
    /// buffer) into task `ti` wherever it still misses them.
    fn fill_from(
        &mut self,
        ti: usize,
        b: usize,
        data: &[u8],
        range: Range<u64>,
    ) -> Result<(), String> {
        let p = self.tasks[ti].proc_idx;
        let lo = b as u64 * self.batch_pages;
        let pl = &self.layout.procs[p];
        let (plo, phi) = (range.start.max(pl.first), range.end.min(pl.first + pl.n));
        if plo >= phi {
            return Ok(());
        }
        // Dump-time ranges of this batch in this process, with their offsets in the batch.
        let mut ranges = Vec::new();
        for r in pl.runs.iter().filter(|r| r.lazy) {
            let (a, z) = (r.first.max(plo), (r.first + r.nr).min(phi));
            if a < z {
                ranges.push((
                    r.vaddr + (a - r.first) * PAGE,
                    (z - a) * PAGE,
                    (a - lo) * PAGE,
                ));
            }
        }
        for (img, len, off) in ranges {
            self.copy_img(
                ti,
                img,
                img + len,
                &data[off as usize..(off + len) as usize],
            )?;
        }
        Ok(())
    }

    /// Copies `src` (the pages of dump-time range `[a, z)`) into task `ti` where it still
    /// misses them.
    fn copy_img(&mut self, ti: usize, a: u64, z: u64, src: &[u8]) -> Result<(), String> {
        let mut spins = 0u32;
        let mut single = false;
        loop {
            let t = &self.tasks[ti];
            if t.exited {
                return Ok(());
            }
            // The first still-missing piece of [a, z).
            let seg = t
                .iovs
                .iter()
                .filter_map(|v| {
                    let (ia, iz) = (v.img.max(a), (v.img + (v.end - v.start)).min(z));
                    (ia < iz).then_some((ia, iz, v.start + (ia - v.img)))
                })
                .min_by_key(|s| s.0);
            let Some((ia, iz, dst)) = seg else {
                return Ok(());
            };
            // After a "no mapping there" on a longer range (its mapping may have been split
            // since the dump, e.g. by mprotect), go page by page so no page is skipped wrongly.
            let iz = if single { iz.min(ia + PAGE) } else { iz };
            let bytes = &src[(ia - a) as usize..(iz - a) as usize];
            let fd = t.uffd.as_raw_fd();
            let outcome =
                uffd_copy(fd, dst, bytes).map_err(|e| format!("UFFDIO_COPY at {dst:#x}: {e}"))?;
            let t = &mut self.tasks[ti];
            match outcome {
                Copy::Done => {
                    self.shared
                        .copied
                        .fetch_add((iz - ia) / PAGE, Ordering::Relaxed);
                    drop_img(&mut t.iovs, ia, iz);
                }
                Copy::Partial(n) => {
                    let n = n / PAGE * PAGE;
                    self.shared.copied.fetch_add(n / PAGE, Ordering::Relaxed);
                    drop_img(&mut t.iovs, ia, ia + n);
                }
                Copy::Exists => {
                    // The first page is there already (this process wrote it): keep it.
                    drop_img(&mut t.iovs, ia, ia + PAGE);
                }
                Copy::Gone if iz - ia > PAGE => single = true,
                Copy::Gone => {
                    debug!(pid = t.pid, dst, "lazy copy: no mapping there");
                    drop_img(&mut t.iovs, ia, iz);
                }
                Copy::Exited(errno) => {
                    debug!(pid = t.pid, dst, errno, "lazy copy: the process is gone");
                    self.exit(ti);
                    return Ok(());
                }
                Copy::Again => {
                    self.read_events(ti)?;
                    spins += 1;
                    if spins.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
    }

    /// Fills one batch into every task: any cached batch first (lowest index), or, once all
    /// batches were filled, whatever a task still misses (e.g. after a fork).
    fn background_step(&mut self) -> Result<(), String> {
        if let Some((&b, _)) = self.cache.iter().next() {
            if !self.done[b] {
                for ti in 0..self.tasks.len() {
                    self.fill(ti, b)?;
                }
                self.done[b] = true;
                self.n_done += 1;
            }
            if let Some(d) = self.cache.remove(&b) {
                self.shared.give_back([d]);
            }
            return Ok(());
        }
        if self.n_done < self.n_batches {
            return Ok(());
        }
        let left = self.tasks.iter().enumerate().find_map(|(i, t)| {
            (!t.exited)
                .then(|| t.iovs.first().map(|v| (i, t.proc_idx, v.img, *v)))
                .flatten()
        });
        if let Some((ti, p, img, v)) = left {
            match self.global_page(p, img) {
                Some(g) => {
                    let b = (g / self.batch_pages) as usize;
                    self.ensure(b)?;
                    self.fill(ti, b)?;
                    if let Some(d) = self.cache.remove(&b) {
                        self.shared.give_back([d]);
                    }
                }
                None => {
                    let t = &mut self.tasks[ti];
                    drop_cur(&mut t.iovs, v.start, v.end);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(start: u64, end: u64, img: u64) -> Iov {
        Iov { start, end, img }
    }

    #[test]
    fn ranges_split_drop_and_move() {
        let mut v = vec![iov(0x1000, 0x5000, 0x1000)];
        drop_img(&mut v, 0x2000, 0x3000);
        assert_eq!(
            v,
            vec![iov(0x1000, 0x2000, 0x1000), iov(0x3000, 0x5000, 0x3000)]
        );
        remap(&mut v, 0x3000, 0x9000, 0x1000);
        assert_eq!(
            v,
            vec![
                iov(0x1000, 0x2000, 0x1000),
                iov(0x4000, 0x5000, 0x4000),
                iov(0x9000, 0xa000, 0x3000)
            ]
        );
        drop_cur(&mut v, 0x9000, 0x9800);
        assert_eq!(v[2], iov(0x9800, 0xa000, 0x3800));
        drop_img(&mut v, 0x3800, 0x4000);
        assert_eq!(v.len(), 2);
        drop_img(&mut v, 0, u64::MAX);
        assert!(v.is_empty());
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
    }

    /// The server against a live process (this one) without CRIU: a lazy region registered
    /// with a userfaultfd handed over CRIU's protocol; faults, a fork, MADV_DONTNEED and mremap
    /// before "restore finished", then background batches. Needs root (userfaultfd events).
    #[test]
    fn serves_faults_forks_removes_and_remaps_of_a_live_process() {
        use medes_criu_image::{
            IMG_COMMON, MmEntry, PE_PRESENT, Pagemap, PagemapEntry, PagemapHead, VmaEntry,
            encode_mm, encode_pagemap,
        };
        use std::os::unix::net::UnixStream;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the lazy-pages test needs root in CI"
            );
            eprintln!("skipping the lazy-pages test: not root");
            return;
        }
        // A hung fault would hang the test: bound it.
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = finished.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !f2.load(Ordering::SeqCst) {
                if t0.elapsed() > Duration::from_secs(60) {
                    eprintln!("lazy-pages test timed out");
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        const N: u64 = 64;
        const PER: u64 = 8;
        let len = (N * PAGE) as usize;
        // SAFETY: new anonymous private mappings, checked below.
        let (a, dst) = unsafe {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let a = libc::mmap(std::ptr::null_mut(), len, rw, flags, -1, 0);
            let d = libc::mmap(std::ptr::null_mut(), 2 * PAGE as usize, rw, flags, -1, 0);
            assert!(a != libc::MAP_FAILED && d != libc::MAP_FAILED);
            (a as u64, d as u64)
        };
        // The userfaultfd, as CRIU's restorer sets it up.
        #[repr(C)]
        struct Api {
            api: u64,
            features: u64,
            ioctls: u64,
        }
        #[repr(C)]
        struct Register {
            start: u64,
            len: u64,
            mode: u64,
            ioctls: u64,
        }
        // SAFETY: the syscall takes flags only.
        let uffd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
                as RawFd;
        assert!(uffd >= 0, "userfaultfd: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this fd.
        let uffd = unsafe { OwnedFd::from_raw_fd(uffd) };
        let mut api = Api {
            api: 0xAA,
            features: (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6),
            ioctls: 0,
        };
        let mut reg = Register {
            start: a,
            len: len as u64,
            mode: 1,
            ioctls: 0,
        };
        // SAFETY: valid uffdio_api / uffdio_register structs for this userfaultfd.
        unsafe {
            assert_eq!(
                libc::ioctl(uffd.as_raw_fd(), ioc(3, 0x3F, 24) as _, &mut api),
                0
            );
            assert_eq!(
                libc::ioctl(uffd.as_raw_fd(), ioc(3, 0x00, 32) as _, &mut reg),
                0
            );
        }
        // Its images: one lazy range, one mapping.
        let pm = encode_pagemap(&Pagemap {
            common: Some(IMG_COMMON),
            head: PagemapHead { pages_id: 1 },
            entries: vec![PagemapEntry {
                vaddr: a,
                nr_pages: N,
                in_parent: None,
                flags: Some(PE_PRESENT | PE_LAZY),
            }],
        })
        .expect("pagemap");
        let mm = encode_mm(&MmEntry {
            vmas: vec![VmaEntry {
                start: a,
                end: a + N * PAGE,
                flags: (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32,
                ..Default::default()
            }],
            ..Default::default()
        })
        .expect("mm");
        let layout = LazyLayout::new(&[(1, &pm, &mm)]).expect("layout");
        assert!(layout.eager_pages().is_empty());
        let fill = |b: usize, out: &mut [u8]| {
            for (i, p) in out.chunks_mut(PAGE as usize).enumerate() {
                p.fill(b as u8 * PER as u8 + i as u8 + 1); // page k holds k + 1
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (daemon, feed) = LazyDaemon::start(
            dir.path(),
            layout,
            PER as usize,
            4,
            Box::new(move |b, _pages, out| {
                fill(b, out);
                Ok(())
            }),
        )
        .expect("start");
        // CRIU's side: pid, then the fd on a one-byte message; our copy closed (as the
        // restorer does).
        let sock = UnixStream::connect(dir.path().join(SOCKET_NAME)).expect("connect");
        (&sock).write_all(&1i32.to_ne_bytes()).expect("pid");
        let fds = [uffd.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(&[0u8])],
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .expect("send fd");
        drop(uffd);
        let page = |addr: u64| -> u8 {
            // SAFETY: `addr` is inside one of our mappings; the read may fault and wait for
            // the server.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        };
        // Before "restore finished": a fault, MADV_DONTNEED of page 2, page 10..12 moved.
        assert_eq!(page(a + 30 * PAGE), 31);
        // SAFETY: ranges inside our mappings.
        unsafe {
            assert_eq!(
                libc::madvise((a + 2 * PAGE) as *mut _, PAGE as usize, libc::MADV_DONTNEED),
                0
            );
            let r = libc::mremap(
                (a + 10 * PAGE) as *mut _,
                2 * PAGE as usize,
                2 * PAGE as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            );
            assert_eq!(r as u64, dst);
        }
        // A fork while pages are missing: the child gets them through its own userfaultfd.
        // SAFETY: the child only reads memory and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let ok = page(a + 40 * PAGE) == 41
                && page(dst) == 11
                && page(dst + PAGE) == 12
                && page(a + 2 * PAGE) == 0;
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child saw wrong pages: {status:#x}"
        );
        (&sock)
            .write_all(&RESTORE_FINISHED.to_ne_bytes())
            .expect("finished");
        for b in 4..N / PER {
            let mut buf = feed.buffer((PER * PAGE) as usize);
            fill(b as usize, &mut buf);
            feed.push(b as usize, buf);
        }
        for k in 0..N {
            let want = match k {
                2 => 0,
                10 | 11 => continue,
                k => k as u8 + 1,
            };
            assert_eq!(page(a + k * PAGE), want, "page {k}");
        }
        assert_eq!((page(dst), page(dst + PAGE)), (11, 12));
        let t0 = Instant::now();
        while !daemon.stats().complete && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = daemon.stats();
        assert!(
            st.complete && st.faults > 0 && st.demand_batches > 0,
            "{st:?}"
        );
        // The owner's view of the end: the same counters, no buffers held any more.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let end = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), feed.finished()).await
        });
        let end = end.expect("the server ended").expect("complete");
        assert!(end.complete && end.buffered_bytes == 0, "{end:?}");
        assert!(feed.ended() && feed.stopped());
        assert_eq!(daemon.failure(), None);
        // SAFETY: our mappings, no longer used.
        unsafe {
            libc::munmap(a as *mut _, len);
            libc::munmap(dst as *mut _, 2 * PAGE as usize);
        }
        finished.store(true, Ordering::SeqCst);
    }
}
