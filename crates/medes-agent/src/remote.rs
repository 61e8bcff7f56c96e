//! Cluster-wide bases (issue 7, point 2): other nodes' bases in this node's registries, and
//! their pages read over the network by dedups and dedup starts.
//!
//! # Identities
//! A base is named cluster-wide by a [`BaseKey`]: the node holding its pages and its id there
//! (ids are unique per node). Inside one agent, a base of another node is registered in its
//! domain's registry under a local *alias* ([`BaseId`] with the top bit set; the agent's own
//! bases count up from 0 and never reach it), so the registry, the stores and the refcounts
//! keep working on plain [`BaseId`]s and a lookup stays a local in-memory operation.
//!
//! # Imports
//! The controller sends every agent the catalog of all live bases ([`Agent::sync_bases`]).
//! A base of another node not yet known is imported: its fingerprints and position keys are
//! read from its owner ([`PageSource::fingerprints`]: about 50 bytes per page, no page data)
//! and added to the domain's registry under a new alias. A base no longer listed (retired, or
//! its owner dead) is removed from the registry, or, while dedup stores here depend on it,
//! kept *inactive* (its alias and refcount stay; reads of its pages fail at once) until they
//! are gone, or reactivated if it is listed again (a healed partition).
//!
//! The aliases in use are written to `<images>/remote.json` after every sync; a restarted
//! agent registers them again (without fingerprints: only its kept stores use them, new
//! dedups import the base afresh) before it loads its stores, and they become readable when
//! the catalog lists their bases again.
//!
//! # Reads
//! `ClusterBases` is the [`BasePages`] of a dedup or a dedup start: the domain's own bases
//! read straight from their mappings (never through the network stack) and other nodes' bases
//! read from `Fetch`es, which stream pages from the owner ([`PageSource::read_pages`]) into
//! per-page slots (zero-copy `Bytes` chunks) while the readers wait for the pages they need:
//! - a dedup start prefetches every remote page the store references (with the codec's
//!   window around it), in the store's order, split into a few concurrent streams, *before*
//!   the rebuild starts; the rebuild decodes pages whose bases are local at once and waits
//!   only for remote pages not yet arrived, so reads overlap with the rebuild and with CRIU's
//!   preparation;
//! - a dedup (background) reads each remote base it touches once, whole.
//!
//! Every read has a deadline ([`crate::DedupSettings::remote_read_timeout_ms`] from the start
//! of the fetch); an unreachable or dead owner, a partition or a short stream fails the read,
//! hence the rebuild, hence the dedup start, and the controller falls back to a cold start.
//! Remote pages are checked like local ones: the rebuild verifies every page's checksum.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use medes_core::NodeId;
use medes_dedup::{
    BaseId, BaseMeta, BasePageError, BasePages, DedupStore, PAGE, Page, PageFingerprint,
};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::domain::{BaseImage, BaseSet, Domain};
use crate::{Agent, Entry};

/// The top bit marks the registry alias of another node's base.
const ALIAS_BIT: u32 = 1 << 31;

/// Whether `id` is the alias of another node's base.
pub(crate) fn is_alias(id: BaseId) -> bool {
    id.0 & ALIAS_BIT != 0
}

/// Most concurrent streams of one prefetch.
const SEGMENTS: usize = 4;

/// A base's cluster-unique identity: the node holding its pages and its id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaseKey {
    /// The node holding the base's pages.
    pub node: NodeId,
    /// The base's id on that node.
    pub id: BaseId,
}

impl std::fmt::Display for BaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node, self.id.0)
    }
}

/// A base as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// Its identity.
    pub key: BaseKey,
    /// Its dedup domain (a namespace, or `*`).
    pub domain: String,
    /// Its number of pages.
    pub pages: u64,
    /// The function it is a sandbox of.
    pub function: String,
}

/// A base of the cluster and where its owner serves its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBase {
    /// The base.
    pub info: BaseInfo,
    /// The owner's page service.
    pub address: SocketAddr,
}

/// A base's page fingerprints and position keys (empty without positional candidates).
#[derive(Debug, Clone, Default)]
pub struct BaseFingerprints {
    /// One per page, in page order.
    pub fps: Vec<PageFingerprint>,
    /// One per page, or empty.
    pub positions: Vec<u64>,
}

/// A stream of `(first page, whole pages)` chunks.
pub type PageStream = BoxStream<'static, Result<(u64, Bytes), String>>;

/// Reads other nodes' bases (implemented over the network by `medes-rpc`).
pub trait PageSource: Send + Sync + 'static {
    /// Streams the pages `runs` (`(first, count)`) of `base` (of `domain`) from the node at
    /// `at`, in order, within `deadline`.
    fn read_pages(
        &self,
        at: SocketAddr,
        domain: &str,
        base: BaseId,
        runs: Vec<(u64, u64)>,
        deadline: Duration,
    ) -> PageStream;

    /// The fingerprints of `base` (of `domain`) held by the node at `at`.
    fn fingerprints(
        &self,
        at: SocketAddr,
        domain: &str,
        base: BaseId,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<BaseFingerprints, String>>;
}

/// What a catalog sync did ([`Agent::sync_bases`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Bases newly imported.
    pub imported: u32,
    /// Bases dropped (no longer listed).
    pub removed: u32,
    /// Bases no longer listed but kept inactive (dedup stores here depend on them).
    pub held: u32,
    /// Bases that could not be imported, with the reason.
    pub failed: Vec<String>,
    /// Dedup stores on other nodes that this node's bases are now held for.
    pub pinned: u64,
}

/// Another node's base known here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedBase {
    /// Its identity.
    pub key: BaseKey,
    /// Its registry alias here.
    pub alias: BaseId,
    /// Its domain.
    pub domain: String,
    /// Its pages.
    pub pages: u64,
    /// Where its pages are served.
    pub address: SocketAddr,
    /// Listed in the last catalog (reads are allowed).
    pub active: bool,
    /// Dedup stores here that depend on it (filled in by [`Agent::imported_bases`]).
    #[serde(default)]
    pub dependents: u64,
}

/// This agent's view of other nodes' bases.
pub(crate) struct Remote {
    source: Mutex<Option<Arc<dyn PageSource>>>,
    /// Domain key → key → the imported base.
    imports: Mutex<HashMap<String, HashMap<BaseKey, Arc<ImportedBase>>>>,
    /// Aliases an earlier agent on this data directory used, reloaded so that its dedup
    /// stores pin and read them (registered without fingerprints: never chosen by a new
    /// dedup); dropped once no store depends on them.
    legacy: Mutex<HashMap<BaseId, Arc<ImportedBase>>>,
    /// Where the aliases are kept across an agent restart (`<images>/remote.json`).
    file: Option<std::path::PathBuf>,
    next_alias: AtomicU32,
    /// One sync at a time.
    syncing: tokio::sync::Mutex<()>,
    /// Per own base (domain, id): dedup stores on other nodes holding it, acquired in its
    /// registry so that it cannot retire under them.
    pins: Mutex<HashMap<(String, BaseId), u64>>,
    /// This node's own bases changed (made, retired).
    pub(crate) changed: Arc<Notify>,
    timeout: Duration,
}

impl Remote {
    pub(crate) fn new(timeout_ms: u64, file: Option<std::path::PathBuf>) -> Remote {
        Remote {
            source: Mutex::new(None),
            imports: Mutex::new(HashMap::new()),
            legacy: Mutex::new(HashMap::new()),
            file,
            next_alias: AtomicU32::new(0),
            syncing: tokio::sync::Mutex::new(()),
            pins: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            timeout: Duration::from_millis(timeout_ms.max(1)),
        }
    }

    /// This node's bases changed: wake the link that publishes them.
    pub(crate) fn bases_changed(&self) {
        self.changed.notify_one();
    }

    fn imported(&self, domain: &str) -> HashMap<BaseId, Arc<ImportedBase>> {
        let mut m: HashMap<BaseId, Arc<ImportedBase>> = self
            .imports
            .lock()
            .get(domain)
            .map(|m| m.values().map(|b| (b.alias, b.clone())).collect())
            .unwrap_or_default();
        for b in self.legacy.lock().values().filter(|b| b.domain == domain) {
            m.insert(b.alias, b.clone());
        }
        m
    }

    /// Writes every alias in use (imports and legacy ones) for the next agent.
    fn save(&self) {
        let Some(path) = &self.file else { return };
        let mut all: Vec<ImportedBase> = self
            .imports
            .lock()
            .values()
            .flat_map(|m| m.values().map(|b| (**b).clone()))
            .collect();
        all.extend(self.legacy.lock().values().map(|b| (**b).clone()));
        if let Err(error) = crate::persist::write_json_atomic(path, &all) {
            warn!(path = %path.display(), %error, "remote base aliases not saved: dedup stores using them will not survive a restart");
        }
    }

    /// Reloads the aliases an earlier agent kept (before its dedup stores are loaded): each is
    /// registered without fingerprints, inactive until the controller's catalog lists its base.
    pub(crate) fn reload(&self, domains: &crate::domain::Domains, local: medes_dedup::NodeId) {
        let Some(path) = &self.file else { return };
        let Ok(data) = std::fs::read(path) else {
            return;
        };
        let all: Vec<ImportedBase> = match serde_json::from_slice(&data) {
            Ok(v) => v,
            Err(error) => {
                warn!(path = %path.display(), %error, "remote base aliases unreadable: dropped");
                return;
            }
        };
        let mut legacy = self.legacy.lock();
        let mut next = 0;
        for b in all.into_iter().filter(|b| is_alias(b.alias)) {
            next = next.max((b.alias.0 & !ALIAS_BIT) + 1);
            let meta = BaseMeta {
                function: String::new(),
                node: rank_node(&b.key.node, local),
            };
            if domains
                .get(&b.domain)
                .registry()
                .add_base(b.alias, meta, &[], &[])
                .is_ok()
            {
                legacy.insert(
                    b.alias,
                    Arc::new(ImportedBase {
                        active: false,
                        dependents: 0,
                        ..b
                    }),
                );
            }
        }
        self.next_alias.fetch_max(next, Ordering::Relaxed);
    }

    fn view(&self, domain: &Domain, local: Arc<BaseSet>) -> ClusterBases {
        let remote = self
            .imported(&domain.key)
            .into_iter()
            .map(|(alias, imp)| {
                (
                    alias,
                    RemoteSlot {
                        imp,
                        fetch: OnceLock::new(),
                    },
                )
            })
            .collect();
        ClusterBases {
            local,
            remote,
            source: self.source.lock().clone(),
            handle: tokio::runtime::Handle::try_current().ok(),
            timeout: self.timeout,
            error: Mutex::new(None),
        }
    }

    /// The bases a dedup reads: the domain's own, and other nodes' bases read whole on first
    /// use. Call from a thread inside the tokio runtime (e.g. `spawn_blocking`).
    pub(crate) fn dedup_view(&self, domain: &Domain, local: Arc<BaseSet>) -> ClusterBases {
        self.view(domain, local)
    }

    /// The bases a dedup start reads: the domain's own, and the remote pages `store` needs,
    /// whose prefetch starts now. Fails at once if a base is missing or its owner inactive.
    /// Call from a thread inside the tokio runtime (e.g. `spawn_blocking`).
    pub(crate) fn restore_view(
        &self,
        domain: &Domain,
        store: &DedupStore,
    ) -> Result<ClusterBases, String> {
        let view = self.view(domain, domain.snapshot());
        let needed = needed_pages(store, &view);
        for (alias, runs) in needed {
            let slot = view
                .remote
                .get(&alias)
                .ok_or_else(|| format!("base {} is unavailable", alias.0))?;
            if !slot.imp.active {
                return Err(format!(
                    "base {} (alias {}) is held by node {}, which is not alive",
                    slot.imp.key, alias.0, slot.imp.key.node
                ));
            }
            let fetch = view.start_fetch(&slot.imp, runs)?;
            let _ = slot.fetch.set(fetch);
        }
        Ok(view)
    }
}

/// Per remote base of the store, the runs of its pages the rebuild reads (windows included),
/// in the order the store first needs them.
fn needed_pages(store: &DedupStore, view: &ClusterBases) -> Vec<(BaseId, Vec<(u64, u64)>)> {
    let mut out: Vec<(BaseId, Vec<(u64, u64)>)> = Vec::new();
    let mut slot_of: HashMap<u16, (usize, u64, HashSet<u64>)> = HashMap::new();
    for (slot, id) in store.bases.iter().enumerate() {
        if view.local.n_pages(*id).is_ok() {
            continue;
        }
        let n = view.remote.get(id).map_or(0, |s| s.imp.pages);
        slot_of.insert(slot as u16, (out.len(), n, HashSet::new()));
        out.push((*id, Vec::new()));
    }
    if slot_of.is_empty() {
        return out;
    }
    for e in &store.pages {
        if !e.kind.needs_base() {
            continue;
        }
        let Some((k, n, seen)) = slot_of.get_mut(&e.base_slot) else {
            continue;
        };
        let idx = u64::from(e.base_page);
        let (lo, hi) = if e.kind.needs_window() {
            medes_dedup::image::window_range(idx, store.window_radius, *n)
        } else {
            (idx, (idx + 1).min(*n))
        };
        let runs = &mut out[*k].1;
        for p in lo..hi {
            if !seen.insert(p) {
                continue;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
    }
    out
}

/// `error` with the reason of the first remote read failure of `view`, if there was one.
pub(crate) fn with_cause(error: &str, view: &ClusterBases) -> String {
    match view.error() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Splits runs (in order) into at most `n` segments of about equal page counts.
fn segments(runs: Vec<(u64, u64)>, n: usize) -> Vec<Vec<(u64, u64)>> {
    let total: u64 = runs.iter().map(|r| r.1).sum();
    let per = total.div_ceil(n.max(1) as u64).max(1);
    let mut out = vec![Vec::new()];
    let mut filled = 0u64;
    for (mut first, mut count) in runs {
        while count > 0 {
            if filled == per {
                out.push(Vec::new());
                filled = 0;
            }
            let take = count.min(per - filled);
            if let Some(seg) = out.last_mut() {
                seg.push((first, take));
            }
            filled += take;
            first += take;
            count -= take;
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Pages of one remote base arriving from its owner.
pub(crate) struct Fetch {
    label: String,
    /// Per page of the base: the chunk holding it and its index in the chunk.
    slots: Vec<OnceLock<(Bytes, u32)>>,
    /// Pages asked for (others fail at once).
    requested: Vec<u64>,
    failed: Mutex<Option<String>>,
    cv: Condvar,
    deadline: Instant,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    started: Instant,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

impl Fetch {
    fn is_requested(&self, idx: u64) -> bool {
        self.requested
            .get((idx / 64) as usize)
            .is_some_and(|w| w & (1 << (idx % 64)) != 0)
    }

    fn fail(&self, reason: String) {
        let mut g = self.failed.lock();
        if g.is_none() {
            warn!(base = %self.label, %reason, "reading a remote base failed");
            *g = Some(reason);
        }
        self.cv.notify_all();
    }

    /// Stores one chunk; `Err` if it is not what was asked.
    fn put(&self, first: u64, data: Bytes) -> Result<(), String> {
        if !data.len().is_multiple_of(PAGE) || data.is_empty() {
            return Err(format!(
                "a chunk of {} bytes is not a whole number of pages",
                data.len()
            ));
        }
        let n = (data.len() / PAGE) as u64;
        let end = first
            .checked_add(n)
            .filter(|&e| e <= self.slots.len() as u64);
        let Some(end) = end else {
            return Err(format!(
                "a chunk of pages {first}+{n} lies outside the base"
            ));
        };
        for (j, p) in (first..end).enumerate() {
            if !self.is_requested(p) {
                return Err(format!("page {p} was sent but not asked for"));
            }
            let _ = self.slots[p as usize].set((data.clone(), j as u32));
        }
        let _g = self.failed.lock();
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for page `idx` (until the fetch's deadline).
    fn get(&self, idx: u64) -> Result<&(Bytes, u32), String> {
        let slot = self
            .slots
            .get(idx as usize)
            .ok_or_else(|| format!("base {} has no page {idx}", self.label))?;
        if let Some(v) = slot.get() {
            return Ok(v);
        }
        if !self.is_requested(idx) {
            return Err(format!("page {idx} of base {} was not fetched", self.label));
        }
        let mut g = self.failed.lock();
        loop {
            if let Some(v) = slot.get() {
                return Ok(v);
            }
            if let Some(e) = &*g {
                return Err(e.clone());
            }
            if self.cv.wait_until(&mut g, self.deadline).timed_out() {
                if let Some(v) = slot.get() {
                    return Ok(v);
                }
                let e = format!(
                    "page {idx} of base {} did not arrive within {:?}",
                    self.label,
                    self.deadline - self.started
                );
                *g = Some(e.clone());
                return Err(e);
            }
        }
    }
}

/// Streams one segment into `fetch`.
async fn run_segment(fetch: Weak<Fetch>, mut stream: PageStream, runs: Vec<(u64, u64)>) {
    let deadline = match fetch.upgrade() {
        Some(f) => tokio::time::Instant::from_std(f.deadline),
        None => return,
    };
    let r = tokio::time::timeout_at(deadline, async {
        while let Some(item) = stream.next().await {
            let (first, data) = item?;
            let Some(f) = fetch.upgrade() else {
                return Ok(());
            };
            f.put(first, data)?;
        }
        Ok::<(), String>(())
    })
    .await;
    let Some(f) = fetch.upgrade() else {
        return;
    };
    match r {
        Err(_) => f.fail(format!(
            "reading base {} timed out after {:?}",
            f.label,
            f.deadline - f.started
        )),
        Ok(Err(e)) => f.fail(format!("reading base {}: {e}", f.label)),
        Ok(Ok(())) => {
            // The stream ended: everything asked must be there.
            for (first, count) in runs {
                if let Some(p) =
                    (first..first + count).find(|&p| f.slots[p as usize].get().is_none())
                {
                    f.fail(format!(
                        "the owner of base {} ended the stream without page {p}",
                        f.label
                    ));
                    return;
                }
            }
        }
    }
}

/// Another node's base in a [`ClusterBases`]: started on first use (dedups) or up front
/// (dedup starts).
struct RemoteSlot {
    imp: Arc<ImportedBase>,
    fetch: OnceLock<Arc<Fetch>>,
}

/// The base pages of a dedup or dedup start: the domain's own (mapped) and other nodes'
/// (fetched); see the module documentation.
pub(crate) struct ClusterBases {
    local: Arc<BaseSet>,
    remote: HashMap<BaseId, RemoteSlot>,
    source: Option<Arc<dyn PageSource>>,
    handle: Option<tokio::runtime::Handle>,
    timeout: Duration,
    /// The first remote read failure.
    error: Mutex<Option<String>>,
}

impl ClusterBases {
    /// Why a remote read failed, if one did.
    pub(crate) fn error(&self) -> Option<String> {
        self.error.lock().clone()
    }

    fn start_fetch(&self, imp: &ImportedBase, runs: Vec<(u64, u64)>) -> Result<Arc<Fetch>, String> {
        let source = self.source.clone().ok_or_else(|| {
            format!(
                "base {} is remote and this agent has no page source",
                imp.key
            )
        })?;
        let handle = self
            .handle
            .clone()
            .ok_or_else(|| "no async runtime to read remote pages".to_string())?;
        let n = imp.pages;
        let mut requested = vec![0u64; (n as usize).div_ceil(64)];
        for &(first, count) in &runs {
            for p in first..(first + count).min(n) {
                requested[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        let started = Instant::now();
        let fetch = Arc::new(Fetch {
            label: imp.key.to_string(),
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            requested,
            failed: Mutex::new(None),
            cv: Condvar::new(),
            deadline: started + self.timeout,
            tasks: Mutex::new(Vec::new()),
            started,
        });
        let total: u64 = runs.iter().map(|r| r.1).sum();
        debug!(base = %imp.key, pages = total, runs = runs.len(), "reading remote base pages");
        for seg in segments(runs, SEGMENTS) {
            let stream = source.read_pages(
                imp.address,
                &imp.domain,
                imp.key.id,
                seg.clone(),
                self.timeout,
            );
            let t = handle.spawn(run_segment(Arc::downgrade(&fetch), stream, seg));
            fetch.tasks.lock().push(t.abort_handle());
        }
        Ok(fetch)
    }

    fn note(&self, base: BaseId, idx: u64, reason: String) -> BasePageError {
        let mut g = self.error.lock();
        if g.is_none() {
            *g = Some(reason);
        }
        BasePageError::MissingPage { base, page: idx }
    }

    /// The fetch of remote base `base` (started whole on first use), or why there is none.
    fn fetch(&self, base: BaseId) -> Result<&Arc<Fetch>, BasePageError> {
        let slot = self
            .remote
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        if let Some(f) = slot.fetch.get() {
            return Ok(f);
        }
        if !slot.imp.active {
            return Err(self.note(
                base,
                0,
                format!("base {} is held by a node that is not alive", slot.imp.key),
            ));
        }
        let mut err = None;
        let f = slot.fetch.get_or_init(|| {
            match self.start_fetch(&slot.imp, vec![(0, slot.imp.pages)]) {
                Ok(f) => f,
                Err(e) => {
                    err = Some(e.clone());
                    // A fetch that fails every read.
                    Arc::new(Fetch {
                        label: slot.imp.key.to_string(),
                        slots: Vec::new(),
                        requested: Vec::new(),
                        failed: Mutex::new(Some(e)),
                        cv: Condvar::new(),
                        deadline: Instant::now(),
                        tasks: Mutex::new(Vec::new()),
                        started: Instant::now(),
                    })
                }
            }
        });
        if let Some(e) = err {
            return Err(self.note(base, 0, e));
        }
        Ok(f)
    }
}

impl BasePages for ClusterBases {
    fn page(&self, base: BaseId, idx: u64) -> Result<Cow<'_, Page>, BasePageError> {
        if !is_alias(base) {
            return self.local.page(base, idx);
        }
        let f = self.fetch(base)?;
        let (chunk, j) = f.get(idx).map_err(|e| self.note(base, idx, e))?;
        let o = *j as usize * PAGE;
        chunk
            .get(o..o + PAGE)
            .and_then(|s| <&Page>::try_from(s).ok())
            .map(Cow::Borrowed)
            .ok_or(BasePageError::MissingPage { base, page: idx })
    }

    fn n_pages(&self, base: BaseId) -> Result<u64, BasePageError> {
        if !is_alias(base) {
            return self.local.n_pages(base);
        }
        self.remote
            .get(&base)
            .map(|s| s.imp.pages)
            .ok_or(BasePageError::MissingBase(base))
    }

    fn window(&self, base: BaseId, idx: u64, radius: u64) -> Result<Cow<'_, [u8]>, BasePageError> {
        if !is_alias(base) {
            return self.local.window(base, idx, radius);
        }
        let n = self.n_pages(base)?;
        let (start, end) = medes_dedup::image::window_range(idx, radius, n);
        if idx >= end {
            return Err(BasePageError::MissingPage { base, page: idx });
        }
        let f = self.fetch(base)?;
        let mut parts = Vec::with_capacity((end - start) as usize);
        for p in start..end {
            parts.push(f.get(p).map_err(|e| self.note(base, p, e))?);
        }
        // Consecutive pages of one chunk: borrowed, no copy.
        let (c0, j0) = parts[0];
        let one_chunk = parts
            .iter()
            .enumerate()
            .all(|(k, (c, j))| c.as_ptr() == c0.as_ptr() && *j as usize == *j0 as usize + k);
        if one_chunk {
            let o = *j0 as usize * PAGE;
            return c0
                .get(o..o + parts.len() * PAGE)
                .map(Cow::Borrowed)
                .ok_or(BasePageError::MissingPage { base, page: idx });
        }
        let mut v = Vec::with_capacity(parts.len() * PAGE);
        for (c, j) in parts {
            let o = *j as usize * PAGE;
            v.extend_from_slice(
                c.get(o..o + PAGE)
                    .ok_or(BasePageError::MissingPage { base, page: idx })?,
            );
        }
        Ok(Cow::Owned(v))
    }
}

/// A base's pages as `Bytes` slices of its mapping (no copy), for the page service.
#[derive(Clone)]
pub struct BaseReader {
    data: Bytes,
}

struct ImageOwner(Arc<BaseImage>);

impl AsRef<[u8]> for ImageOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.data()
    }
}

impl BaseReader {
    /// Number of pages.
    pub fn n_pages(&self) -> u64 {
        (self.data.len() / PAGE) as u64
    }

    /// Pages `first .. first + count` (`None` outside the base).
    pub fn pages(&self, first: u64, count: u64) -> Option<Bytes> {
        let end = first.checked_add(count).filter(|&e| e <= self.n_pages())?;
        Some(self.data.slice(first as usize * PAGE..end as usize * PAGE))
    }
}

/// Node id a remote base is ranked under in the registry (never the local one).
fn rank_node(owner: &NodeId, local: medes_dedup::NodeId) -> medes_dedup::NodeId {
    let h = xxhash_rust::xxh3::xxh3_64(owner.0.as_bytes()) as u32;
    medes_dedup::NodeId(if h == local.0 { h.wrapping_add(1) } else { h })
}

impl Agent {
    /// Sets how this agent reads other nodes' bases (normally `medes_rpc`'s page client).
    pub fn set_page_source(&self, source: Arc<dyn PageSource>) {
        *self.inner.remote.source.lock() = Some(source);
    }

    /// A notification fired whenever this node's own bases change (a base made or retired).
    pub fn bases_changed(&self) -> Arc<Notify> {
        self.inner.remote.changed.clone()
    }

    /// The bases this node holds (with resident pages), for the cluster's catalog.
    pub fn local_bases(&self) -> Vec<BaseInfo> {
        let mut recs = Vec::new();
        for e in self.inner.sandboxes.lock().values() {
            match e {
                Entry::Live(s) => {
                    if let Some(b) = s.base.lock().clone() {
                        recs.push(b);
                    }
                }
                Entry::LostBase(b, _) => recs.push(b.clone()),
                _ => {}
            }
        }
        let node = self.inner.cfg.node_id.clone();
        recs.into_iter()
            .filter(|b| b.domain.snapshot().image(b.id).is_some())
            .map(|b| BaseInfo {
                key: BaseKey {
                    node: node.clone(),
                    id: b.id,
                },
                domain: b.domain.key.clone(),
                pages: b.pages,
                function: b
                    .domain
                    .registry()
                    .base_meta(b.id)
                    .map(|m| m.function)
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Reads one of this node's bases (`None`: no such base with resident pages).
    pub fn base_reader(&self, domain: &str, id: BaseId) -> Option<BaseReader> {
        if is_alias(id) {
            return None;
        }
        let d = self.inner.domains.find(domain)?;
        let image = d.snapshot().image(id)?;
        Some(BaseReader {
            data: Bytes::from_owner(ImageOwner(image)),
        })
    }

    /// The file holding one of this node's bases' pages, when they are kept in one (the
    /// page service sends from it with `sendfile`, no copy through user space). `None`: no
    /// such base, or its pages live elsewhere (heap, a template's image).
    pub fn base_file(&self, domain: &str, id: BaseId) -> Option<std::fs::File> {
        if is_alias(id) {
            return None;
        }
        let d = self.inner.domains.find(domain)?;
        let image = d.snapshot().image(id)?;
        let path = self
            .inner
            .images
            .join("bases")
            .join(format!("{}.pages", id.0));
        let f = std::fs::File::open(path).ok()?;
        (f.metadata().ok()?.len() == image.bytes()).then_some(f)
    }

    /// The fingerprints and position keys of one of this node's bases, computed from its
    /// pages (CPU: call from a blocking thread). `None`: no such base.
    pub fn base_fingerprints(&self, domain: &str, id: BaseId) -> Option<BaseFingerprints> {
        use rayon::prelude::*;
        if is_alias(id) {
            return None;
        }
        let d = self.inner.domains.find(domain)?;
        let image = d.snapshot().image(id)?;
        let cfg = self.inner.cfg.dedup.engine;
        let fps = self.inner.bg_pool.install(|| {
            image
                .data()
                .par_chunks(PAGE)
                .map(|p| {
                    let page: &Page = p.try_into().unwrap_or(&[0u8; PAGE]);
                    medes_dedup::fingerprint(page, &cfg.fingerprint)
                })
                .collect::<Vec<_>>()
        });
        let positions = if cfg.positional {
            let path = self
                .inner
                .images
                .join("bases")
                .join(format!("{}.pos", id.0));
            std::fs::read(path)
                .ok()
                .filter(|b| b.len() == fps.len() * 8)
                .map(|b| {
                    b.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Some(BaseFingerprints { fps, positions })
    }

    /// Other nodes' bases known here.
    pub fn imported_bases(&self) -> Vec<ImportedBase> {
        let mut v: Vec<ImportedBase> = {
            let g = self.inner.remote.imports.lock();
            g.values()
                .flat_map(|m| m.values().map(|b| (**b).clone()))
                .collect()
        };
        v.extend(
            self.inner
                .remote
                .legacy
                .lock()
                .values()
                .map(|b| (**b).clone()),
        );
        for b in &mut v {
            b.dependents = self
                .inner
                .domains
                .find(&b.domain)
                .map_or(0, |d| d.dependents(b.alias));
        }
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Other nodes' bases the dedup stores here depend on, with how many (published to the
    /// controller, which tells the owners: see [`Agent::sync_bases`]).
    pub fn base_uses(&self) -> Vec<(BaseKey, u64)> {
        self.imported_bases()
            .into_iter()
            .filter(|b| b.dependents > 0)
            .map(|b| (b.key, b.dependents))
            .collect()
    }

    /// Dedup stores on other nodes this node's bases are held for (see
    /// [`Agent::sync_bases`]).
    pub fn held_for_other_nodes(&self) -> u64 {
        self.inner.remote.pins.lock().values().sum()
    }

    /// Holds this node's bases for the dedup stores of other nodes that depend on them
    /// (`used_elsewhere`, absolute counts of the live nodes): each is acquired in its
    /// registry that many times, so it cannot retire while they exist.
    fn apply_pins(&self, used_elsewhere: &[(BaseKey, u64)]) -> u64 {
        let me = &self.inner.cfg.node_id;
        let want: HashMap<BaseId, u64> = used_elsewhere
            .iter()
            .filter(|(k, _)| &k.node == me)
            .map(|(k, n)| (k.id, *n))
            .collect();
        let mut pins = self.inner.remote.pins.lock();
        let mut total = 0;
        let mut seen = HashSet::new();
        for b in self.local_bases() {
            let Some(d) = self.inner.domains.find(&b.domain) else {
                continue;
            };
            let key = (b.domain.clone(), b.key.id);
            let have = pins.get(&key).copied().unwrap_or(0);
            let mut now = have;
            let target = want.get(&b.key.id).copied().unwrap_or(0);
            while now < target && d.registry().acquire(b.key.id).is_ok() {
                now += 1;
            }
            while now > target && d.registry().release(b.key.id).is_ok() {
                now -= 1;
            }
            if now != have {
                info!(base = %b.key, held_for_other_nodes = now, "remote dependents of a base");
            }
            total += now;
            pins.insert(key.clone(), now);
            seen.insert(key);
        }
        // Bases gone from here (their pins went with their registry entries).
        pins.retain(|k, _| seen.contains(k));
        total
    }

    /// Makes this node's registries hold exactly the cluster's other live bases of `catalog`
    /// (see the module documentation of `remote`): imports new ones (their fingerprints read
    /// from their owners, all at once), drops the ones no longer listed, keeping inactive those
    /// that dedup stores here still depend on. `used_elsewhere` says how many dedup stores of
    /// other live nodes depend on each of this node's bases: they are held for them.
    pub async fn sync_bases(
        &self,
        catalog: Vec<RemoteBase>,
        used_elsewhere: Vec<(BaseKey, u64)>,
    ) -> SyncReport {
        let inner = self.inner.clone();
        let remote = &inner.remote;
        let _one = remote.syncing.lock().await;
        let pinned = self.apply_pins(&used_elsewhere);
        let me = &inner.cfg.node_id;
        let listed: HashMap<BaseKey, RemoteBase> = catalog
            .into_iter()
            .filter(|b| &b.info.key.node != me && !is_alias(b.info.key.id))
            .map(|b| (b.info.key.clone(), b))
            .collect();
        let mut report = SyncReport {
            pinned,
            ..SyncReport::default()
        };
        // Known ones: re-point, reactivate, or drop / hold.
        let mut todo = Vec::new();
        {
            let mut g = remote.imports.lock();
            for (dkey, m) in g.iter_mut() {
                let domain = inner.domains.get(dkey);
                m.retain(|key, imp| match listed.get(key) {
                    Some(b) if b.info.domain == *dkey && b.info.pages == imp.pages => {
                        if !imp.active || imp.address != b.address {
                            *imp = Arc::new(ImportedBase {
                                address: b.address,
                                active: true,
                                ..(**imp).clone()
                            });
                        }
                        true
                    }
                    _ => match domain.registry().remove_base(imp.alias) {
                        Ok(()) | Err(medes_dedup::BaseRefError::Unknown(_)) => {
                            info!(base = %key, alias = imp.alias.0, domain = %dkey, "remote base dropped");
                            report.removed += 1;
                            false
                        }
                        Err(_) => {
                            if imp.active {
                                info!(base = %key, alias = imp.alias.0, dependents = domain.dependents(imp.alias),
                                      "remote base no longer listed; kept inactive while dedup stores depend on it");
                                *imp = Arc::new(ImportedBase {
                                    active: false,
                                    ..(**imp).clone()
                                });
                            }
                            report.held += 1;
                            true
                        }
                    },
                });
            }
            for (key, b) in &listed {
                if !g.get(&b.info.domain).is_some_and(|m| m.contains_key(key)) {
                    todo.push(b.clone());
                }
            }
        }
        // Aliases of an earlier agent: readable while listed, dropped once unused.
        {
            let mut legacy = remote.legacy.lock();
            legacy.retain(|alias, b| {
                let domain = inner.domains.get(&b.domain);
                if domain.dependents(*alias) == 0 && domain.registry().remove_base(*alias).is_ok() {
                    return false;
                }
                let listed = listed.get(&b.key).filter(|l| l.info.pages == b.pages);
                let (active, address) = listed.map_or((false, b.address), |l| (true, l.address));
                if active != b.active || address != b.address {
                    *b = Arc::new(ImportedBase {
                        active,
                        address,
                        ..(**b).clone()
                    });
                }
                true
            });
        }
        // New ones: fingerprints from their owners, concurrently.
        let source = remote.source.lock().clone();
        let Some(source) = source else {
            if !todo.is_empty() {
                report.failed.push(format!(
                    "{} remote bases: this agent has no page source",
                    todo.len()
                ));
            }
            return report;
        };
        let reads = todo.into_iter().map(|b| {
            let f =
                source.fingerprints(b.address, &b.info.domain, b.info.key.id, remote.timeout * 5);
            async move { (b, f.await) }
        });
        let results = futures::future::join_all(reads).await;
        for (b, r) in results {
            let fps = match r {
                Ok(f) if f.fps.len() as u64 == b.info.pages => f,
                Ok(f) => {
                    report.failed.push(format!(
                        "{}: {} fingerprints for {} pages",
                        b.info.key,
                        f.fps.len(),
                        b.info.pages
                    ));
                    continue;
                }
                Err(e) => {
                    report.failed.push(format!("{}: {e}", b.info.key));
                    continue;
                }
            };
            let alias = BaseId(ALIAS_BIT | remote.next_alias.fetch_add(1, Ordering::Relaxed));
            let domain = inner.domains.get(&b.info.domain);
            let engine = inner.cfg.dedup.engine;
            let meta = BaseMeta {
                function: b.info.function.clone(),
                node: rank_node(&b.info.key.node, engine.local_node),
            };
            let d2 = domain.clone();
            let added = tokio::task::spawn_blocking(move || {
                let positions: &[u64] = if engine.positional {
                    &fps.positions
                } else {
                    &[]
                };
                d2.registry().add_base(alias, meta, &fps.fps, positions)
            })
            .await;
            match added {
                Ok(Ok(())) => {
                    domain.registry_changed();
                    info!(base = %b.info.key, alias = alias.0, domain = %b.info.domain, pages = b.info.pages,
                          "remote base imported");
                    report.imported += 1;
                    remote
                        .imports
                        .lock()
                        .entry(b.info.domain.clone())
                        .or_default()
                        .insert(
                            b.info.key.clone(),
                            Arc::new(ImportedBase {
                                key: b.info.key.clone(),
                                alias,
                                domain: b.info.domain.clone(),
                                pages: b.info.pages,
                                address: b.address,
                                active: true,
                                dependents: 0,
                            }),
                        );
                }
                Ok(Err(e)) => report.failed.push(format!("{}: {e}", b.info.key)),
                Err(e) => report.failed.push(format!("{}: {e}", b.info.key)),
            }
        }
        if !report.failed.is_empty() {
            warn!(failed = ?report.failed, "some remote bases could not be imported");
        }
        remote.save();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_evenly_and_keep_order() {
        let s = segments(vec![(0, 10), (20, 2)], 4);
        assert_eq!(s.len(), 4);
        let flat: Vec<(u64, u64)> = s.iter().flatten().copied().collect();
        let pages: Vec<u64> = flat.iter().flat_map(|&(f, c)| f..f + c).collect();
        let want: Vec<u64> = (0..10).chain(20..22).collect();
        assert_eq!(pages, want);
        assert!(
            s.iter()
                .all(|seg| seg.iter().map(|r| r.1).sum::<u64>() <= 3)
        );
        assert!(segments(Vec::new(), 4).is_empty());
    }

    /// Serves a fake base whose page `i` is filled with byte `i`, in chunks of `per` pages;
    /// `hang`: never answers.
    struct FakeSource {
        per: u64,
        hang: bool,
    }

    impl PageSource for FakeSource {
        fn read_pages(
            &self,
            _at: SocketAddr,
            _domain: &str,
            _base: BaseId,
            runs: Vec<(u64, u64)>,
            _deadline: Duration,
        ) -> PageStream {
            if self.hang {
                return futures::stream::pending().boxed();
            }
            let mut chunks = Vec::new();
            for (first, count) in runs {
                let mut p = first;
                while p < first + count {
                    let k = self.per.min(first + count - p);
                    let data: Vec<u8> = (p..p + k).flat_map(|i| [i as u8; PAGE]).collect();
                    chunks.push(Ok((p, Bytes::from(data))));
                    p += k;
                }
            }
            futures::stream::iter(chunks).boxed()
        }

        fn fingerprints(
            &self,
            _at: SocketAddr,
            _domain: &str,
            _base: BaseId,
            _deadline: Duration,
        ) -> BoxFuture<'static, Result<BaseFingerprints, String>> {
            Box::pin(async { Err("not here".to_string()) })
        }
    }

    fn view(source: FakeSource, timeout: Duration) -> (ClusterBases, BaseId) {
        let alias = BaseId(ALIAS_BIT | 3);
        let imp = Arc::new(ImportedBase {
            key: BaseKey {
                node: NodeId("b".into()),
                id: BaseId(0),
            },
            alias,
            domain: "guest".into(),
            pages: 10,
            address: "127.0.0.1:9".parse().unwrap(),
            active: true,
            dependents: 0,
        });
        let remote = HashMap::from([(
            alias,
            RemoteSlot {
                imp,
                fetch: OnceLock::new(),
            },
        )]);
        let v = ClusterBases {
            local: Arc::new(BaseSet::default()),
            remote,
            source: Some(Arc::new(source)),
            handle: tokio::runtime::Handle::try_current().ok(),
            timeout,
            error: Mutex::new(None),
        };
        (v, alias)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_pages_arrive_in_chunks_and_windows_span_them() {
        let (v, alias) = view(
            FakeSource {
                per: 3,
                hang: false,
            },
            Duration::from_secs(5),
        );
        let r = tokio::task::spawn_blocking(move || {
            assert_eq!(v.n_pages(alias).unwrap(), 10);
            for i in 0..10u64 {
                assert!(v.page(alias, i).unwrap().iter().all(|&b| b == i as u8));
            }
            // Pages 2..=4 span two chunks (0-2, 3-5): copied; 3..=5 lie in one: borrowed.
            let w = v.window(alias, 3, 1).unwrap();
            assert!(matches!(w, Cow::Owned(_)));
            assert_eq!(w.len(), 3 * PAGE);
            assert_eq!((w[0], w[PAGE], w[2 * PAGE]), (2, 3, 4));
            assert!(matches!(v.window(alias, 4, 1).unwrap(), Cow::Borrowed(_)));
            assert!(v.page(alias, 10).is_err());
            assert!(v.error().is_some());
        });
        r.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_owner_fails_reads_at_the_deadline() {
        let (v, alias) = view(
            FakeSource { per: 3, hang: true },
            Duration::from_millis(300),
        );
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let e = v.page(alias, 4).unwrap_err();
            (e, v.error())
        });
        let (e, why) = r.await.unwrap();
        let took = t.elapsed();
        assert_eq!(
            e,
            BasePageError::MissingPage {
                base: alias,
                page: 4
            }
        );
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let why = why.unwrap();
        assert!(
            why.contains("did not arrive") || why.contains("timed out"),
            "{why}"
        );
    }

    #[test]
    fn aliases_are_apart_from_local_ids() {
        assert!(is_alias(BaseId(ALIAS_BIT)));
        assert!(!is_alias(BaseId(12)));
        let local = medes_dedup::NodeId(0);
        assert_ne!(rank_node(&NodeId("b".into()), local), local);
    }
}
