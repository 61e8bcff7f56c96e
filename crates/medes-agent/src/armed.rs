//! Armed dedup sandboxes (`[agent] armed_per_function`, issue 5 point 4: "the paper pre-started
//! a paused CRIU restore"): after a dedup, the agent restores the function's newest dedup
//! sandboxes lazily *ahead of their request* and leaves them stopped
//! ([`medes_sandbox::Sandbox::prestart_lazy`]): CRIU's start, the namespaces, cgroup, mounts,
//! process tree, memory layout, the eager pages and the input check are done; the lazy-pages
//! server serves faults but holds its background fill, and the rebuild waits after the eager
//! pages. A [`crate::Command::Restore`] of an armed sandbox then only continues the processes,
//! reseeds the runtime and answers (the early answer of `lazy.rs`), while the fill runs.
//!
//! Which: the controller restores a function's most recently deduplicated dedup sandbox
//! first, so the agent arms the `armed_per_function` most recently deduplicated ones of each
//! function (by the order of their dedups on this agent; stores an earlier agent kept come
//! last) and disarms older ones when a newer one is armed; a restore that consumed an armed
//! sandbox re-arms the next newest. Arms run in the background, one at a time, never holding
//! a command: a restore arriving while its sandbox is being armed joins the arm (it is further
//! along than a fresh start would be); a purge cancels it. Stores that use another node's
//! bases are not armed (their pages cannot be verified up front, so their starts cannot
//! answer early anyway).
//!
//! Correctness: the inputs are verified when the sandbox is armed: the store as a whole (its
//! xxh3 over the payload, computed while the file is streamed once,
//! [`medes_dedup::DedupStore::open_lean`]:
//! only its metadata is kept, not the page data) and every base page it references, against
//! its per-page sum. The decode then reads the page data from the store file on demand
//! (`pread` through the descriptor opened at arm time, each batch's compressed block and range
//! of the blob into a per-thread scratch buffer; never a mapping, which a truncated file would
//! turn into a fault of the agent). At the resume the store file and the base pages files
//! (mapped: what the rebuild reads) must be unchanged since (inode, size, mtime, ctime) and
//! every base still resident in its domain; if not, the armed sandbox is disarmed and the start
//! takes the unarmed path, which verifies again (and fails, for a cold start, if they are bad).
//! Every output page is still verified against its own xxh3 before it is copied in, so a store
//! file changed after that check (during the fill) never yields a wrong process: the page is
//! not copied, the processes are killed (the resume fails at once, or the request's run fails
//! as a lost sandbox), an error activation. A file truncated meanwhile is a read error, the
//! same. (`MEDES_TEST_ARMED_UNCHECKED_STORE=<sandbox id>` is a test hook that skips the store's
//! stamp check for that sandbox, to test exactly this.)
//!
//! Memory: an armed sandbox holds its stopped tree (the cgroup's usage: eager pages, page
//! tables, kernel objects; its PSS is measured too, the measure of a warm sandbox), the store's
//! metadata for the rebuild (page table, per-page offsets, the mapping tables of rebased
//! processes, block offsets: about 50 bytes per page; the non-page images are dropped once
//! written for CRIU and the mapping tables made) and the server's page buffers (none while
//! held, but pages faulted on by the prefetch). Measured once it is armed (a stopped tree does
//! not grow), this `armed` extra (with the tree's cgroup usage, not its PSS) is added to the
//! dedup sandbox's held bytes in the node status (the controller's budget and the policy's m_D
//! see it) and shown by [`crate::Agent::armed`]. Disarmed on purge, on shutdown, and when a newer one of its
//! function is armed; a disarm in progress keeps its entry until the tree is gone, so a
//! restore of the same sandbox waits for it (the sandbox id must be free). A restarted
//! agent arms the dedup sandboxes the previous one kept ([`crate::Agent::new`]). Not done:
//! disarming under memory pressure (the controller purges dedup sandboxes when it needs
//! memory, which disarms them).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use medes_core::SandboxId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{DedupRec, Entry, Inner, ms};
use crate::lazy;

/// Wait before re-arming after a dedup start consumed an armed sandbox (its request and the
/// fill come first).
pub(crate) const REARM_AFTER: Duration = Duration::from_millis(500);

/// Why a store is not armed: it uses another node's bases.
const NOT_ARMABLE: &str = "the store uses another node's bases";

/// An armed (or arming) dedup sandbox, as [`crate::Agent::armed`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedStatus {
    /// The dedup sandbox.
    pub sandbox: SandboxId,
    /// Its function.
    pub function: String,
    /// Armed (true) or being armed (false).
    pub ready: bool,
    /// Memory of the stopped tree (its cgroup's usage, kernel memory included), bytes: the
    /// accounting value.
    pub cgroup_bytes: u64,
    /// Proportional set size of the stopped tree's processes, bytes (the measure of a warm
    /// sandbox's memory), measured with `cgroup_bytes`.
    pub pss_bytes: u64,
    /// What the agent holds of the store in memory for it, bytes: its metadata only (page
    /// table, per-page offsets, mapping tables, block offsets); the page data is read from
    /// the store file during the fill.
    pub store_meta_bytes: u64,
    /// Page buffers its lazy-pages server holds, bytes.
    pub buffered_bytes: u64,
}

impl ArmedStatus {
    /// Everything held for it besides the dedup sandbox's store file, bytes.
    pub fn extra_bytes(&self) -> u64 {
        self.cgroup_bytes + self.store_meta_bytes + self.buffered_bytes
    }
}

/// Test hook: the resume of the sandbox named by `MEDES_TEST_ARMED_UNCHECKED_STORE` does not
/// check its store file's stamp, so that a test can change the file the fill reads as if it
/// changed after the check (a change the per-page checksums must catch).
fn unchecked_store(id: &SandboxId) -> bool {
    std::env::var("MEDES_TEST_ARMED_UNCHECKED_STORE").is_ok_and(|v| v == id.0)
}

/// A file's identity and last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// An armed start and what it was verified against.
pub(crate) struct Armed {
    started: lazy::Started,
    /// The bases the store uses, with the pages that were verified.
    bases: Vec<(medes_dedup::BaseId, Arc<crate::domain::BaseImage>)>,
    stamps: Vec<(PathBuf, Option<Stamp>)>,
    cgroup_bytes: u64,
    pss_bytes: u64,
    store_meta_bytes: u64,
    /// When `cgroup_bytes` and `pss_bytes` were measured.
    measured: Instant,
}

/// How old an armed tree's memory figures may get before a status measures them again: the
/// restore's transient kernel memory (freed in the first second or so after the arm) is not
/// held for long, and a long-armed tree is reported as it is now.
const REMEASURE: Duration = Duration::from_secs(2);

impl Armed {
    /// Measures the stopped tree again if its figures are older than [`REMEASURE`].
    fn refresh(&mut self) {
        if self.measured.elapsed() < REMEASURE {
            return;
        }
        self.measured = Instant::now();
        if let Some(m) = self.started.armed().and_then(|a| a.memory().ok()) {
            self.cgroup_bytes = m.cgroup_usage.0;
            self.pss_bytes = m.pss.0;
        }
    }
}

enum Slot {
    Arming {
        cancel: Arc<AtomicBool>,
        done: tokio::sync::watch::Receiver<bool>,
    },
    Armed(Box<Armed>),
    /// Being torn down; `done` says when (its sandbox id is free again).
    Disarming {
        done: tokio::sync::watch::Receiver<bool>,
    },
}

struct ArmState {
    function: String,
    /// The dedup order of the sandbox it is armed for.
    seq: u64,
    slot: Slot,
}

/// The status of one armed or arming sandbox (its tree measured again if its figures are
/// old); `None` while it is being disarmed.
fn status_entry(id: &SandboxId, st: &mut ArmState) -> Option<ArmedStatus> {
    let (ready, cgroup_bytes, pss_bytes, store_meta_bytes, buffered_bytes) = match &mut st.slot {
        Slot::Disarming { .. } => return None,
        Slot::Arming { .. } => (false, 0, 0, 0, 0),
        Slot::Armed(a) => {
            a.refresh();
            (
                true,
                a.cgroup_bytes,
                a.pss_bytes,
                a.store_meta_bytes,
                a.started.buffered_bytes(),
            )
        }
    };
    Some(ArmedStatus {
        sandbox: id.clone(),
        function: st.function.clone(),
        ready,
        cgroup_bytes,
        pss_bytes,
        store_meta_bytes,
        buffered_bytes,
    })
}

/// The agent's armed sandboxes.
pub(crate) struct ArmedSet {
    map: Mutex<HashMap<SandboxId, ArmState>>,
    /// Dedup order of the dedup sandboxes deduplicated by this agent.
    deduped: Mutex<HashMap<SandboxId, u64>>,
    seq: AtomicU64,
    /// One arm at a time.
    permit: tokio::sync::Semaphore,
}

impl ArmedSet {
    pub(crate) fn new() -> ArmedSet {
        ArmedSet {
            map: Mutex::new(HashMap::new()),
            deduped: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            permit: tokio::sync::Semaphore::new(1),
        }
    }

    /// Status of every armed or arming sandbox.
    pub(crate) fn status(&self) -> Vec<ArmedStatus> {
        let mut m = self.map.lock();
        let mut out: Vec<ArmedStatus> = m
            .iter_mut()
            .filter_map(|(id, st)| status_entry(id, st))
            .collect();
        out.sort_by(|a, b| a.sandbox.0.cmp(&b.sandbox.0));
        out
    }

    /// The status of `id` if it is armed or being armed.
    pub(crate) fn status_of(&self, id: &SandboxId) -> Option<ArmedStatus> {
        let mut m = self.map.lock();
        let st = m.get_mut(id)?;
        status_entry(id, st)
    }

    /// Records that `id` was just deduplicated (the newest of its function).
    pub(crate) fn note_deduped(&self, id: &SandboxId) {
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.deduped.lock().insert(id.clone(), n);
    }
}

impl Inner {
    fn arming_enabled(&self) -> bool {
        self.cfg.armed_per_function > 0
            && self.cfg.lazy_restore
            && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// Arms the newest dedup sandboxes of `function` (up to `armed_per_function`) and disarms
    /// its other armed ones, in the background.
    pub(crate) fn rearm(self: &Arc<Self>, function: &str, after: Duration) {
        if !self.arming_enabled() {
            return;
        }
        let inner = self.clone();
        let function = function.to_string();
        tokio::spawn(async move {
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            inner.rearm_now(&function).await;
        });
    }

    async fn rearm_now(self: &Arc<Self>, function: &str) {
        if !self.arming_enabled() {
            return;
        }
        let want: Vec<(u64, Arc<DedupRec>)> = {
            let seqs = self.armed.deduped.lock();
            let t = self.sandboxes.lock();
            let mut all: Vec<(u64, Arc<DedupRec>)> = t
                .iter()
                .filter_map(|(id, e)| match e {
                    Entry::Dedup(r) if r.info.function == function => {
                        Some((seqs.get(id).copied().unwrap_or(0), r.clone()))
                    }
                    _ => None,
                })
                .collect();
            all.sort_by(|a, b| {
                b.0.cmp(&a.0)
                    .then(b.1.info.spec.id.0.cmp(&a.1.info.spec.id.0))
            });
            all.truncate(self.cfg.armed_per_function);
            all
        };
        let keep: Vec<SandboxId> = want.iter().map(|(_, r)| r.info.spec.id.clone()).collect();
        let stale: Vec<SandboxId> = self
            .armed
            .map
            .lock()
            .iter()
            .filter(|(id, st)| st.function == function && !keep.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.disarm(&id).await;
        }
        for (seq, rec) in want {
            let id = rec.info.spec.id.clone();
            // Under the table's lock: a restore marks the sandbox busy under it before it
            // looks for an arm, so it either finds this arm or this sees it busy.
            let started = {
                let t = self.sandboxes.lock();
                let still = matches!(t.get(&id), Some(Entry::Dedup(r)) if Arc::ptr_eq(r, &rec));
                let mut m = self.armed.map.lock();
                if !still || m.contains_key(&id) || self.shutting_down.load(Ordering::SeqCst) {
                    None
                } else {
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    m.insert(
                        id.clone(),
                        ArmState {
                            function: function.to_string(),
                            seq,
                            slot: Slot::Arming {
                                cancel: cancel.clone(),
                                done: rx,
                            },
                        },
                    );
                    Some((cancel, tx))
                }
            };
            let Some((cancel, tx)) = started else {
                continue;
            };
            let inner = self.clone();
            tokio::spawn(async move {
                inner.arm_task(rec, cancel, tx).await;
            });
        }
    }

    async fn arm_task(
        self: Arc<Self>,
        rec: Arc<DedupRec>,
        cancel: Arc<AtomicBool>,
        done: tokio::sync::watch::Sender<bool>,
    ) {
        let id = rec.info.spec.id.clone();
        let r = match self.armed.permit.acquire().await {
            Ok(_permit) if !cancel.load(Ordering::SeqCst) => {
                let t = Instant::now();
                let r = self.arm_one(&rec).await;
                if let Ok(a) = &r {
                    info!(sandbox = %id, ms = ms(t.elapsed()), cgroup_kb = a.cgroup_bytes >> 10,
                          pss_kb = a.pss_bytes >> 10, store_meta_kb = a.store_meta_bytes >> 10,
                          "dedup sandbox armed");
                }
                r
            }
            _ => Err("cancelled".to_string()),
        };
        let leftover = {
            let mut m = self.armed.map.lock();
            let ours = matches!(m.get(&id), Some(ArmState { slot: Slot::Arming { cancel: c, .. }, .. })
                if Arc::ptr_eq(c, &cancel));
            match r {
                Ok(a)
                    if ours
                        && !cancel.load(Ordering::SeqCst)
                        && !self.shutting_down.load(Ordering::SeqCst) =>
                {
                    if let Some(st) = m.get_mut(&id) {
                        st.slot = Slot::Armed(Box::new(a));
                    }
                    self.counters.lock().arms += 1;
                    None
                }
                r => {
                    if ours {
                        m.remove(&id);
                    }
                    match r {
                        Ok(a) => Some(a),
                        Err(reason) => {
                            if reason == NOT_ARMABLE {
                                debug!(sandbox = %id, "not armed: its store uses another node's bases");
                            } else if reason != "cancelled" {
                                self.counters.lock().arm_failures += 1;
                                warn!(sandbox = %id, %reason, "arming a dedup sandbox failed; its start takes the unarmed path");
                            }
                            None
                        }
                    }
                }
            }
        };
        if let Some(a) = leftover {
            a.started.disarm().await;
        }
        drop(rec);
        done.send_replace(true);
    }

    /// Opens the store lean (verified as a whole while streamed; only its metadata kept, the
    /// page data read from the file during the fill), writes its non-page images and restores
    /// it lazily, left stopped.
    async fn arm_one(self: &Arc<Self>, rec: &Arc<DedupRec>) -> Result<Armed, String> {
        let id = &rec.info.spec.id;
        if rec._pins.ids().iter().any(|b| crate::remote::is_alias(*b)) {
            // Other nodes' pages cannot be verified up front: such a start waits for every
            // page anyway (`lazy.rs`), so it is not armed.
            return Err(NOT_ARMABLE.into());
        }
        let dir = self.images.join("armed").join(&id.0);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
        let store_stamp = stamp(&rec.path);
        let t = Instant::now();
        let loaded = self.load_store(rec, &dir, true).await;
        let (store, bases) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(super::error_chain(&e));
            }
        };
        let snap = rec.info.domain.snapshot();
        let verified_bases = store
            .meta()
            .bases
            .iter()
            .filter_map(|b| snap.image(*b).map(|i| (*b, i)))
            .collect();
        drop(snap);
        let mut stamps = vec![(rec.path.clone(), store_stamp)];
        for b in &store.meta().bases {
            let p = self.images.join("bases").join(format!("{}.pages", b.0));
            let s = stamp(&p);
            stamps.push((p, s));
        }
        let read_base_ms = ms(t.elapsed());
        let lazy_bases: Arc<dyn medes_dedup::BasePages + Send> = bases;
        let r = lazy::start(self, rec, &dir, store, lazy_bases, read_base_ms, true).await;
        let dir2 = dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir2)).await;
        let started = r.map_err(|e| match e {
            lazy::LazyError::Fallback(r) | lazy::LazyError::Failed(r) => r,
        })?;
        let (cgroup_bytes, pss_bytes) = started
            .armed()
            .and_then(|a| a.memory().ok())
            .map_or((0, 0), |m| (m.cgroup_usage.0, m.pss.0));
        let store_meta_bytes = started.store_held_bytes();
        Ok(Armed {
            started,
            bases: verified_bases,
            stamps,
            cgroup_bytes,
            pss_bytes,
            store_meta_bytes,
            measured: Instant::now(),
        })
    }

    /// Kills the armed sandbox of `id` (its store stays), or cancels its arm.
    pub(crate) async fn disarm(&self, id: &SandboxId) {
        enum Found {
            Armed(Box<Armed>, tokio::sync::watch::Sender<bool>),
            Arming(tokio::sync::watch::Receiver<bool>),
            Nothing,
        }
        let found = {
            let mut m = self.armed.map.lock();
            match m.get_mut(id) {
                Some(st) if matches!(st.slot, Slot::Armed(_)) => {
                    // Stays in the table while it is torn down: a restore of the same sandbox
                    // waits for it (the sandbox id must be free).
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    match std::mem::replace(&mut st.slot, Slot::Disarming { done: rx }) {
                        Slot::Armed(a) => Found::Armed(a, tx),
                        _ => Found::Nothing,
                    }
                }
                Some(ArmState {
                    slot: Slot::Arming { cancel, done },
                    ..
                }) => {
                    cancel.store(true, Ordering::SeqCst);
                    Found::Arming(done.clone())
                }
                Some(ArmState {
                    slot: Slot::Disarming { done },
                    ..
                }) => Found::Arming(done.clone()),
                _ => Found::Nothing,
            }
        };
        match found {
            Found::Armed(a, tx) => {
                a.started.disarm().await;
                {
                    let mut m = self.armed.map.lock();
                    if matches!(m.get(id), Some(ArmState { slot: Slot::Disarming { done }, .. })
                        if done.same_channel(&tx.subscribe()))
                    {
                        m.remove(id);
                    }
                }
                tx.send_replace(true);
                self.counters.lock().disarms += 1;
                debug!(sandbox = %id, "dedup sandbox disarmed");
            }
            Found::Arming(mut done) => {
                // Wait for the arm to end (it kills what it made, then says so), so the
                // store's references are gone when this returns.
                let bound = Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
                let _ = tokio::time::timeout(bound, done.wait_for(|d| *d)).await;
            }
            Found::Nothing => {}
        }
    }

    /// Disarms everything (shutdown), waiting for arms in flight.
    pub(crate) async fn disarm_all(&self) {
        let bound = Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
        let t = Instant::now();
        loop {
            // An arm that began before the shutdown may still store its result: repeat.
            let ids: Vec<SandboxId> = self.armed.map.lock().keys().cloned().collect();
            if ids.is_empty() || t.elapsed() > bound {
                if !ids.is_empty() {
                    warn!(
                        left = ids.len(),
                        "armed sandboxes still being torn down at shutdown"
                    );
                }
                return;
            }
            for id in &ids {
                self.disarm(id).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The armed start of `id` for a restore, if any: joins an arm in flight (bounded by the
    /// restore timeout). `None` when the sandbox is not armed (or the arm failed). The
    /// caller then checks it with [`Armed::unchanged`].
    pub(crate) async fn take_armed(&self, id: &SandboxId) -> Option<Armed> {
        let bound = Duration::from_millis(self.cfg.dedup.restore_timeout_ms.max(1));
        let t = Instant::now();
        loop {
            let mut rx = {
                let mut m = self.armed.map.lock();
                match m.get(id).map(|st| &st.slot) {
                    None => return None,
                    Some(Slot::Armed(_)) => {
                        return match m.remove(id) {
                            Some(ArmState {
                                slot: Slot::Armed(a),
                                ..
                            }) => Some(*a),
                            _ => None,
                        };
                    }
                    Some(Slot::Arming { done, .. }) | Some(Slot::Disarming { done }) => {
                        done.clone()
                    }
                }
            };
            let left = bound.saturating_sub(t.elapsed());
            if tokio::time::timeout(left, rx.wait_for(|d| *d))
                .await
                .is_err()
            {
                // Never start a second restore of the same sandbox beside the arm: cancel it
                // and wait for it to end.
                self.disarm(id).await;
                let _ = tokio::time::timeout(bound, rx.wait_for(|d| *d)).await;
                self.disarm(id).await;
                return None;
            }
        }
    }

    /// The seq of an armed entry (tests, status).
    #[allow(dead_code)]
    fn armed_seq(&self, id: &SandboxId) -> Option<u64> {
        self.armed.map.lock().get(id).map(|s| s.seq)
    }
}

impl Armed {
    /// Whether the store file and the base pages files are unchanged since the arm, and the
    /// start is still of `rec`.
    pub(crate) fn unchanged(&self, rec: &Arc<DedupRec>) -> Result<(), String> {
        if !self.started.is_of(rec) {
            return Err("armed for another store".into());
        }
        // Every base still the one whose pages were verified (a base that lost its pages is
        // gone for the unarmed path too).
        let snap = rec.info.domain.snapshot();
        for (b, img) in &self.bases {
            if !snap.image(*b).is_some_and(|now| Arc::ptr_eq(&now, img)) {
                return Err(format!("base {} changed since the sandbox was armed", b.0));
            }
        }
        drop(snap);
        let unchecked = unchecked_store(&rec.info.spec.id);
        for (i, (p, s)) in self.stamps.iter().enumerate() {
            if i == 0 && unchecked {
                continue;
            }
            let now = stamp(p);
            if now.is_none() || now != *s {
                return Err(format!(
                    "{} changed since the sandbox was armed",
                    p.display()
                ));
            }
        }
        match self.started.armed() {
            Some(a) if a.is_alive() => Ok(()),
            _ => Err("the armed processes are gone".into()),
        }
    }

    /// The armed start (consumed by a resume).
    pub(crate) fn into_started(self) -> lazy::Started {
        self.started
    }

    /// Tears it down.
    pub(crate) async fn disarm(self) {
        self.started.disarm().await;
    }
}
