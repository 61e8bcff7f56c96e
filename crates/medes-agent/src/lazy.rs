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
//!    (namespaces, mounts, process tree) while the rebuild runs on the agent's rebuild pool,
//!    every page verified before it is handed on: first only the eager pages (each batch's
//!    block decoded once, then just those pages), written into the (sparse) pages files (CRIU's
//!    open of them is held by the fanotify gate until they are complete); then every batch in
//!    order ([`Rebuilder`]). Each verified batch goes to the server, which copies it into the
//!    processes as soon as
//!    CRIU says the restore finished, while the runtime already runs its reseed; a fault on a
//!    page whose batch has not arrived makes the server rebuild (and verify) that batch first.
//! 3. The dedup start answers once the runtime answered **and** every page was verified: a page
//!    failing verification is never copied; the restored process (blocked on its missing pages,
//!    never handed a wrong one) is killed and the start fails like any failed dedup start (the
//!    controller falls back to a cold start). The server finishes the copies on its own.
//!
//! Errors before anything ran (no layout, socket, CRIU refusing `--lazy-pages`) fall back to the
//! plain path (rebuild into the pages files, then restore) in the same command.
//!
//! m_R of a lazy start: the sparse pages files on the tmpfs (eager pages only) + CRIU's
//! resident size (both sampled as for the plain path) + the peak of the page buffers the server
//! held (batches waiting for "restore finished" or for their copy), which this module reports.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use medes_dedup::rebuild::{BATCH_PAGES, RebuildScratch, Rebuilder};
use medes_dedup::{BasePages, DedupStore};
use medes_sandbox::{LazyDaemon, LazyFeed, LazyLayout, RestoreError, Sandbox};
use parking_lot::Mutex;
use tracing::debug;

use super::{DedupRec, Inner, RestoreReply, error_chain, ms};

const PAGE: u64 = 4096;
/// Batch buffers (1 MiB each) the rebuild may hold at once: enough to keep rebuilding while
/// CRIU restores; beyond that it waits for the server to copy batches in and hand their
/// buffers back (recycled buffers cost no page faults, and m_R stays bounded).
const MAX_BUFFERS: usize = 32;

/// Why a lazy dedup start did not succeed.
pub(crate) enum LazyError {
    /// Nothing ran yet (no restored process): the plain path may try.
    Fallback(String),
    /// The start failed (a page failed verification, or the restored process ran and broke).
    Failed(String),
}

/// A successful lazy dedup start: the sandbox, its reply (no m_R yet) and the peak of the page
/// buffers held for it, bytes.
pub(crate) type LazyStart = (Sandbox, RestoreReply, u64);

/// Restores `rec` lazily from `store` (loaded and verified; its non-page images are in `dir`).
pub(crate) async fn restore(
    inner: &Arc<Inner>,
    rec: &Arc<DedupRec>,
    dir: &Path,
    store: Arc<DedupStore>,
    bases: Arc<dyn BasePages + Send>,
    read_base_ms: f64,
) -> Result<LazyStart, LazyError> {
    let t0 = Instant::now();
    let fallback = |e: String| LazyError::Fallback(e);
    // Which pages CRIU reads itself, which the server fills.
    let mut procs = Vec::with_capacity(store.procs.len());
    for p in &store.procs {
        let get = |name: String| {
            store
                .images
                .get(&name)
                .map(Vec::as_slice)
                .ok_or_else(|| fallback(format!("the store has no {name}")))
        };
        procs.push((
            p.pid,
            get(format!("pagemap-{}.img", p.pid))?,
            get(format!("mm-{}.img", p.pid))?,
        ));
    }
    let layout = LazyLayout::new(&procs).map_err(|e| fallback(error_chain(&e)))?;
    let per_proc = layout.pages_per_process();
    if per_proc.len() != store.procs.len()
        || per_proc
            .iter()
            .zip(&store.procs)
            .any(|((_, n), p)| *n != p.n_pages)
    {
        return Err(fallback("the pagemaps do not match the store".into()));
    }
    let rebuilder = Arc::new(
        Rebuilder::new(store.clone(), bases).map_err(|e| LazyError::Failed(error_chain(&e)))?,
    );
    // Set when a page failed verification (no fallback then: the plain path would fail too).
    let bad_page = Arc::new(AtomicBool::new(false));
    let demand = {
        let (rb, bad) = (rebuilder.clone(), bad_page.clone());
        let mut scratch = RebuildScratch::default();
        Box::new(move |b: usize, out: &mut [u8]| {
            rb.rebuild_batch(b, &mut scratch, out).map_err(|e| {
                bad.store(true, Ordering::SeqCst);
                error_chain(&e)
            })
        })
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
    type Producer = tokio::task::JoinHandle<Result<f64, String>>;
    let producer: Arc<Mutex<Option<Producer>>> = Arc::new(Mutex::new(None));
    let pages = {
        let (inner, producer, rebuilder) = (inner.clone(), producer.clone(), rebuilder.clone());
        let (feed, bad) = (feed.clone(), bad_page.clone());
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
            };
            let h = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                inner.fg_pool.install(|| job.run())?;
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
    let restored = tokio::time::timeout(bound, async {
        tokio::select! {
            r = Sandbox::restore_with_lazy(&inner.cfg.sandbox, spec, dir, pages, &daemon) => r.map_err(|e| {
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
    let (sandbox, t) = match restored {
        Ok(Ok(x)) => x,
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
    // The runtime answered; the start is done once every page was verified.
    let left = bound.saturating_sub(t0.elapsed());
    let handle = producer.lock().take();
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
}

impl Produce {
    /// Runs on the rebuild pool, one worker per thread taking the next batch: first the eager
    /// pages, then every batch.
    fn run(&self) -> Result<(), String> {
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
        let threads = rayon::current_num_threads().max(1);
        let fail = |e: String| {
            self.feed.fail(e.clone());
            self.eager_done(Err(e.clone()));
            err.lock().get_or_insert(e);
        };
        // 1. Only the eager pages (CRIU waits for them): each batch's block decoded once,
        //    then just those pages, written into the pages files.
        let next = AtomicUsize::new(0);
        rayon::scope(|s| {
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
            self.eager_done(Ok(()));
        }
        // 2. Every page, batch by batch in order, to the lazy-pages server.
        let next = AtomicUsize::new(0);
        let n = self.rebuilder.n_batches();
        rayon::scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| {
                    let mut scratch = RebuildScratch::default();
                    loop {
                        if err.lock().is_some() || self.feed.stopped() {
                            return;
                        }
                        let b = next.fetch_add(1, Ordering::SeqCst);
                        if b >= n {
                            return;
                        }
                        let r = self.rebuilder.batch_pages(b);
                        let mut buf = self.feed.buffer(((r.end - r.start) * PAGE) as usize);
                        if let Err(e) = self.rebuilder.rebuild_batch(b, &mut scratch, &mut buf) {
                            self.bad.store(true, Ordering::SeqCst);
                            fail(error_chain(&e));
                            return;
                        }
                        self.feed.push(b, buf);
                    }
                });
            }
        });
        match err.into_inner() {
            Some(e) => Err(e),
            None if self.feed.stopped() => Err("stopped".into()),
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
