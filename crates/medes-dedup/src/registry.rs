//! The fingerprint registry: chunk hash → base pages holding it, and the base-page choice.
//!
//! A [`Registry`] keeps the bases' metadata and reference counts (a few entries per base) and
//! the fingerprint index (entries per page). The index is in memory by default; a
//! [`RegistryBackend`] (e.g. the Redis Cluster backend of `medes-registry-redis`) can hold it
//! instead ([`Registry::with_backend`]), for bases that outgrow one machine's memory. The base
//! choice (ranking candidates by shared chunks, locality and dependents) is the same code for
//! both, so both choose the same base pages.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::fingerprint::{MAX_K, PageFingerprint};

/// Id of a base image (one checkpointed base sandbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaseId(pub u32);

/// Id of a node (machine) holding base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

/// A page of a base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PageRef {
    /// The base image.
    pub base: BaseId,
    /// Index of the page in the base image's page sequence.
    pub page: u32,
}

/// What the registry knows about a base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseMeta {
    /// The function it is a sandbox of.
    pub function: String,
    /// The node holding it.
    pub node: NodeId,
}

/// Identity hasher: keys are already xxh3 hashes.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Most base pages kept per chunk hash: a chunk found in more pages says little about any.
pub const MAX_REFS_PER_CHUNK: usize = 8;

#[derive(Debug, Clone)]
struct Refs {
    first: PageRef,
    /// Boxed so that an entry with one ref (the common case) stays 16 bytes.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<PageRef>>>,
}

impl Refs {
    fn iter(&self) -> impl Iterator<Item = &PageRef> {
        std::iter::once(&self.first).chain(self.more.iter().flat_map(|v| v.iter()))
    }
    fn push(&mut self, r: PageRef) {
        let more = self.more.get_or_insert_with(Default::default);
        if more.len() + 1 < MAX_REFS_PER_CHUNK && !more.contains(&r) && self.first != r {
            more.push(r);
        }
    }
    /// Drops refs to `base`; returns false if none is left.
    fn remove_base(&mut self, base: BaseId) -> bool {
        let mut all: Vec<PageRef> = self.iter().copied().filter(|r| r.base != base).collect();
        if all.is_empty() {
            return false;
        }
        self.first = all.remove(0);
        self.more = (!all.is_empty()).then(|| Box::new(all));
        true
    }
}

#[derive(Debug)]
struct BaseEntry {
    meta: BaseMeta,
    dependents: u64,
    pages: u64,
}

/// The in-memory fingerprint index.
#[derive(Debug, Default)]
struct Maps {
    chunks: IdMap<Refs>,
    exact: IdMap<PageRef>,
    positional: IdMap<Refs>,
}

impl Maps {
    fn insert(&mut self, id: BaseId, fps: &[PageFingerprint], positions: &[u64]) {
        for (i, fp) in fps.iter().enumerate() {
            if fp.zero {
                continue;
            }
            let r = PageRef {
                base: id,
                page: i as u32,
            };
            self.exact.entry(fp.page_hash).or_insert(r);
            if let Some(&pos) = positions.get(i).filter(|&&p| p != 0) {
                self.positional
                    .entry(pos)
                    .and_modify(|refs| refs.push(r))
                    .or_insert(Refs {
                        first: r,
                        more: None,
                    });
            }
            for &c in fp.chunks() {
                self.chunks
                    .entry(c)
                    .and_modify(|refs| refs.push(r))
                    .or_insert(Refs {
                        first: r,
                        more: None,
                    });
            }
        }
    }

    fn remove(&mut self, id: BaseId) {
        self.chunks.retain(|_, refs| refs.remove_base(id));
        self.exact.retain(|_, r| r.base != id);
        self.positional.retain(|_, refs| refs.remove_base(id));
        self.chunks.shrink_to_fit();
        self.exact.shrink_to_fit();
        self.positional.shrink_to_fit();
    }

    /// The candidates of one page, in the order [`choose_in`] meets them.
    fn candidates(&self, keys: &PageKeys<'_>, out: &mut Candidates) {
        out.clear();
        if let Some(&r) = self.exact.get(&keys.page_hash) {
            out.exact = Some(r);
            return;
        }
        for c in keys.chunks {
            if let Some(refs) = self.chunks.get(c) {
                for r in refs.iter() {
                    out.count(*r);
                }
            }
        }
        if keys.position != 0
            && let Some(refs) = self.positional.get(&keys.position)
        {
            out.positional.extend(refs.iter().copied());
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    maps: Maps,
    bases: BTreeMap<BaseId, BaseEntry>,
}

/// Error adding a base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddBaseError {
    /// The id is already registered.
    #[error("base {0:?} is already registered")]
    Duplicate(BaseId),
    /// The base has more pages than a page reference can address.
    #[error("base {0:?} has too many pages")]
    TooLarge(BaseId),
    /// The registry backend failed to store the fingerprints.
    #[error("storing the fingerprints of base {base:?}")]
    Backend {
        /// The base.
        base: BaseId,
        /// The cause.
        #[source]
        source: BackendError,
    },
}

/// Error removing a base or changing its refcount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BaseRefError {
    /// No such base.
    #[error("base {0:?} is not registered")]
    Unknown(BaseId),
    /// Dedup sandboxes still depend on it.
    #[error("base {base:?} still has {dependents} dependents")]
    InUse {
        /// The base.
        base: BaseId,
        /// How many dedup sandboxes hold it.
        dependents: u64,
    },
    /// Released more often than acquired.
    #[error("base {0:?} has no dependents to release")]
    NotHeld(BaseId),
    /// The base is gone from the registry, but the backend failed to remove its entries
    /// (they are ignored by lookups, and replaced if the id is registered again).
    #[error("removing the fingerprints of base {base:?}")]
    Backend {
        /// The base.
        base: BaseId,
        /// The cause.
        #[source]
        source: BackendError,
    },
}

/// A registry backend failed (unreachable, timed out, refused a command, answered nonsense).
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry backend failed")]
pub struct BackendError(#[source] pub Arc<dyn std::error::Error + Send + Sync>);

impl BackendError {
    /// Wraps a backend's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(e))
    }
}

impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BackendError {}

/// The keys of one page for a batched lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageKeys<'a> {
    /// Whole-page hash (exact duplicates).
    pub page_hash: u64,
    /// Sampled chunk hashes.
    pub chunks: &'a [u64],
    /// Position key (mapping and offset; 0: none).
    pub position: u64,
}

impl<'a> PageKeys<'a> {
    /// The keys of a fingerprinted page.
    pub fn of(fp: &'a PageFingerprint, position: u64) -> Self {
        Self {
            page_hash: fp.page_hash,
            chunks: fp.chunks(),
            position,
        }
    }
}

/// What the index holds for one page's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// A base page with the same whole-page hash (then nothing else is looked at).
    pub exact: Option<PageRef>,
    /// Base pages sharing sampled chunks, with how many, in the order met (chunks in the
    /// page's order, each chunk's pages in registration order).
    pub shared: Vec<(PageRef, u8)>,
    /// Base pages with the same position key, in registration order.
    pub positional: Vec<PageRef>,
}

impl Candidates {
    /// Empties it (keeps the allocations).
    pub fn clear(&mut self) {
        self.exact = None;
        self.shared.clear();
        self.positional.clear();
    }

    /// Counts one more shared chunk for `r`.
    pub fn count(&mut self, r: PageRef) {
        if let Some((_, n)) = self.shared.iter_mut().find(|(p, _)| *p == r) {
            *n = n.saturating_add(1);
        } else if self.shared.len() < MAX_K * MAX_REFS_PER_CHUNK {
            self.shared.push((r, 1));
        }
    }
}

/// Where the fingerprint index lives: the operations base registration, base retirement and
/// the dedup pass need. Implemented in memory by [`MemoryIndex`] and over the network by
/// `medes-registry-redis`.
///
/// Semantics every backend keeps (so that every backend chooses the same base pages): a chunk
/// or position key holds at most [`MAX_REFS_PER_CHUNK`] base pages, the first registered; a
/// whole-page hash holds the first base page registered with it; zero pages are not indexed;
/// removing a base removes exactly its entries.
pub trait RegistryBackend: Send + Sync + std::fmt::Debug {
    /// Adds a base's page fingerprints (in page order) and position keys (`positions[i]` of
    /// page `i`, 0: none; may be empty). Registering an id again first drops its old entries.
    fn insert_base(
        &self,
        id: BaseId,
        fps: &[PageFingerprint],
        positions: &[u64],
    ) -> Result<(), BackendError>;

    /// Removes every entry of a base (nothing if it has none).
    fn remove_base(&self, id: BaseId) -> Result<(), BackendError>;

    /// Looks up many pages at once (a batch of the dedup pass): `out[i]` gets page `i`'s
    /// candidates (`out` is resized to `pages.len()`).
    fn lookup_batch(
        &self,
        pages: &[PageKeys<'_>],
        out: &mut Vec<Candidates>,
    ) -> Result<(), BackendError>;
}

/// The in-memory fingerprint index as a stand-alone [`RegistryBackend`] (what a [`Registry`]
/// without a backend holds inline; used to compare backends).
#[derive(Debug, Default)]
pub struct MemoryIndex {
    maps: RwLock<Maps>,
}

impl MemoryIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RegistryBackend for MemoryIndex {
    fn insert_base(
        &self,
        id: BaseId,
        fps: &[PageFingerprint],
        positions: &[u64],
    ) -> Result<(), BackendError> {
        let mut g = self.maps.write();
        g.remove(id);
        g.insert(id, fps, positions);
        Ok(())
    }

    fn remove_base(&self, id: BaseId) -> Result<(), BackendError> {
        self.maps.write().remove(id);
        Ok(())
    }

    fn lookup_batch(
        &self,
        pages: &[PageKeys<'_>],
        out: &mut Vec<Candidates>,
    ) -> Result<(), BackendError> {
        out.resize_with(pages.len(), Candidates::default);
        let g = self.maps.read();
        for (k, o) in pages.iter().zip(out.iter_mut()) {
            g.candidates(k, o);
        }
        Ok(())
    }
}

/// The chosen base page for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A base page with the same whole-page hash.
    Exact(PageRef),
    /// The base page sharing the most sampled chunks (and the runner-up, if any).
    Similar {
        /// Best candidate.
        best: PageRef,
        /// Chunks it shares.
        shared: u8,
        /// Second-best candidate.
        second: Option<PageRef>,
    },
}

impl Choice {
    /// The chosen page.
    pub fn page(&self) -> PageRef {
        match *self {
            Self::Exact(p) => p,
            Self::Similar { best, .. } => best,
        }
    }
}

/// Registry size figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegistryStats {
    /// Registered bases.
    pub bases: usize,
    /// Distinct chunk hashes.
    pub chunk_keys: usize,
    /// Base-page references across all chunk hashes.
    pub chunk_refs: usize,
    /// Distinct whole-page hashes.
    pub exact_keys: usize,
    /// Distinct position keys.
    pub position_keys: usize,
    /// Estimated heap bytes (table capacity and spill vectors).
    pub bytes: usize,
    /// `bytes` per (chunk ref + exact key + position key).
    pub bytes_per_entry: f64,
}

/// The fingerprint registry. Many concurrent readers, one writer at a time.
#[derive(Debug, Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Where the fingerprint index lives when not in `inner.maps`.
    backend: Option<Arc<dyn RegistryBackend>>,
}

impl Registry {
    /// An empty registry with its index in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose fingerprint index lives in `backend` (bases' metadata and
    /// reference counts stay in memory). Lookups only return bases registered here, so
    /// entries left in the backend by an earlier process are never chosen.
    pub fn with_backend(backend: Arc<dyn RegistryBackend>) -> Self {
        Self {
            inner: RwLock::default(),
            backend: Some(backend),
        }
    }

    /// The backend holding the index (`None`: in memory).
    pub fn backend(&self) -> Option<&Arc<dyn RegistryBackend>> {
        self.backend.as_ref()
    }

    /// Registers a base image's page fingerprints (in page order) and, optionally, the pages'
    /// position keys (`positions[i]`: mapping and offset of page `i`, 0 if unknown; may be
    /// empty).
    pub fn add_base(
        &self,
        id: BaseId,
        meta: BaseMeta,
        fps: &[PageFingerprint],
        positions: &[u64],
    ) -> Result<(), AddBaseError> {
        if u32::try_from(fps.len()).is_err() {
            return Err(AddBaseError::TooLarge(id));
        }
        let entry = BaseEntry {
            meta,
            dependents: 0,
            pages: fps.len() as u64,
        };
        if let Some(b) = &self.backend {
            if self.inner.read().bases.contains_key(&id) {
                return Err(AddBaseError::Duplicate(id));
            }
            // Index first, then the base: lookups ignore entries of unknown bases.
            b.insert_base(id, fps, positions)
                .map_err(|source| AddBaseError::Backend { base: id, source })?;
            let mut g = self.inner.write();
            if g.bases.contains_key(&id) {
                return Err(AddBaseError::Duplicate(id));
            }
            g.bases.insert(id, entry);
            return Ok(());
        }
        let mut g = self.inner.write();
        if g.bases.contains_key(&id) {
            return Err(AddBaseError::Duplicate(id));
        }
        g.maps.insert(id, fps, positions);
        g.bases.insert(id, entry);
        Ok(())
    }

    /// Removes a base and all its entries. Fails while dedup sandboxes depend on it.
    pub fn remove_base(&self, id: BaseId) -> Result<(), BaseRefError> {
        let mut g = self.inner.write();
        let e = g.bases.get(&id).ok_or(BaseRefError::Unknown(id))?;
        if e.dependents > 0 {
            return Err(BaseRefError::InUse {
                base: id,
                dependents: e.dependents,
            });
        }
        g.bases.remove(&id);
        match &self.backend {
            None => g.maps.remove(id),
            Some(b) => {
                drop(g);
                b.remove_base(id)
                    .map_err(|source| BaseRefError::Backend { base: id, source })?;
            }
        }
        Ok(())
    }

    /// A dedup sandbox now depends on `id`.
    pub fn acquire(&self, id: BaseId) -> Result<(), BaseRefError> {
        let mut g = self.inner.write();
        let e = g.bases.get_mut(&id).ok_or(BaseRefError::Unknown(id))?;
        e.dependents += 1;
        Ok(())
    }

    /// A dedup sandbox no longer depends on `id`.
    pub fn release(&self, id: BaseId) -> Result<(), BaseRefError> {
        let mut g = self.inner.write();
        let e = g.bases.get_mut(&id).ok_or(BaseRefError::Unknown(id))?;
        e.dependents = e
            .dependents
            .checked_sub(1)
            .ok_or(BaseRefError::NotHeld(id))?;
        Ok(())
    }

    /// Number of dedup sandboxes depending on `id`.
    pub fn dependents(&self, id: BaseId) -> Option<u64> {
        self.inner.read().bases.get(&id).map(|e| e.dependents)
    }

    /// The metadata of a base.
    pub fn base_meta(&self, id: BaseId) -> Option<BaseMeta> {
        self.inner.read().bases.get(&id).map(|e| e.meta.clone())
    }

    /// Registered bases.
    pub fn bases(&self) -> Vec<BaseId> {
        self.inner.read().bases.keys().copied().collect()
    }

    /// Chooses a base page for one page (zero pages: `None`). `position` is the page's position
    /// key (0: none).
    ///
    /// With a backend, a failed lookup chooses nothing (see [`Registry::try_choose_batch`]).
    pub fn choose(&self, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
        if self.backend.is_some() {
            let fps = std::slice::from_ref(fp);
            return self
                .try_choose_batch(fps, &[position], local)
                .ok()
                .and_then(|mut v| v.pop())
                .flatten();
        }
        choose_in(&self.inner.read(), fp, position, local)
    }

    /// Chooses base pages for a whole sandbox under one read lock (`positions` may be empty).
    ///
    /// With a backend, a failed lookup chooses nothing (see [`Registry::try_choose_batch`]).
    pub fn choose_batch(
        &self,
        fps: &[PageFingerprint],
        positions: &[u64],
        local: NodeId,
    ) -> Vec<Option<Choice>> {
        if self.backend.is_some() {
            return self
                .try_choose_batch(fps, positions, local)
                .unwrap_or_else(|_| vec![None; fps.len()]);
        }
        let g = self.inner.read();
        fps.iter()
            .enumerate()
            .map(|(i, fp)| choose_in(&g, fp, positions.get(i).copied().unwrap_or(0), local))
            .collect()
    }

    /// Chooses base pages for many pages (`positions` may be empty), with the backend's
    /// batched lookup (in batches of 256 pages) when there is one.
    pub fn try_choose_batch(
        &self,
        fps: &[PageFingerprint],
        positions: &[u64],
        local: NodeId,
    ) -> Result<Vec<Option<Choice>>, BackendError> {
        let Some(b) = &self.backend else {
            return Ok(self.choose_batch(fps, positions, local));
        };
        let mut out = Vec::with_capacity(fps.len());
        let mut keys = Vec::with_capacity(256);
        let mut cands = Vec::new();
        for (n, chunk) in fps.chunks(256).enumerate() {
            keys.clear();
            keys.extend(
                chunk.iter().enumerate().map(|(j, fp)| {
                    PageKeys::of(fp, positions.get(n * 256 + j).copied().unwrap_or(0))
                }),
            );
            // Zero pages are not looked up.
            let ask: Vec<PageKeys<'_>> = keys
                .iter()
                .zip(chunk)
                .filter(|(_, fp)| !fp.zero)
                .map(|(k, _)| *k)
                .collect();
            b.lookup_batch(&ask, &mut cands)?;
            let mut it = cands.iter_mut();
            let g = self.inner.read();
            for fp in chunk {
                if fp.zero {
                    out.push(None);
                } else {
                    out.push(it.next().and_then(|c| choose_from(&g.bases, c, local)));
                }
            }
        }
        Ok(out)
    }

    /// Chooses a base page from a backend's candidates for one page (entries of bases not
    /// registered here are ignored). The choice is the one the in-memory index makes.
    pub fn choose_from(&self, cands: &mut Candidates, local: NodeId) -> Option<Choice> {
        choose_from(&self.inner.read().bases, cands, local)
    }

    /// A read view under one read lock, for choosing base pages (from many threads). Writers
    /// wait while it lives: keep it short (one batch of pages).
    pub fn reader(&self) -> RegistryReader<'_> {
        RegistryReader {
            g: self.inner.read(),
        }
    }

    /// Size figures (memory per entry).
    pub fn stats(&self) -> RegistryStats {
        let g = self.inner.read();
        let slot = |k: usize, v: usize| k + v + 1;
        let m = &g.maps;
        let mut bytes = m.chunks.capacity() * slot(8, std::mem::size_of::<Refs>())
            + m.exact.capacity() * slot(8, std::mem::size_of::<PageRef>())
            + m.positional.capacity() * slot(8, std::mem::size_of::<Refs>());
        for r in m.positional.values() {
            if let Some(m) = &r.more {
                bytes += std::mem::size_of::<Vec<PageRef>>() + m.capacity() * 8;
            }
        }
        let mut chunk_refs = 0;
        for r in m.chunks.values() {
            chunk_refs += 1;
            if let Some(m) = &r.more {
                chunk_refs += m.len();
                bytes += std::mem::size_of::<Vec<PageRef>>() + m.capacity() * 8;
            }
        }
        let entries = chunk_refs + m.exact.len() + m.positional.len();
        RegistryStats {
            bases: g.bases.len(),
            chunk_keys: m.chunks.len(),
            chunk_refs,
            exact_keys: m.exact.len(),
            position_keys: m.positional.len(),
            bytes,
            bytes_per_entry: if entries == 0 {
                0.0
            } else {
                bytes as f64 / entries as f64
            },
        }
    }
}

/// A read view of a [`Registry`] (see [`Registry::reader`]).
pub struct RegistryReader<'a> {
    g: parking_lot::RwLockReadGuard<'a, Inner>,
}

impl std::fmt::Debug for RegistryReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryReader")
    }
}

impl RegistryReader<'_> {
    /// The base page whose whole-page hash is `page_hash`, if any (the exact-duplicate test
    /// of [`RegistryReader::choose`], without sampled chunks).
    pub fn exact(&self, page_hash: u64) -> Option<PageRef> {
        self.g.maps.exact.get(&page_hash).copied()
    }

    /// Chooses a base page for one page (see [`Registry::choose`]).
    pub fn choose(&self, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
        choose_in(&self.g, fp, position, local)
    }

    /// Chooses a base page from a backend's candidates (see [`Registry::choose_from`]).
    pub fn choose_from(&self, cands: &mut Candidates, local: NodeId) -> Option<Choice> {
        choose_from(&self.g.bases, cands, local)
    }
}

fn choose_in(g: &Inner, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
    if fp.zero {
        return None;
    }
    let m = &g.maps;
    if let Some(&r) = m.exact.get(&fp.page_hash) {
        return Some(Choice::Exact(r));
    }
    let positional = (position != 0)
        .then(|| m.positional.get(&position))
        .flatten();
    let mut cands: [(PageRef, u8); MAX_K * MAX_REFS_PER_CHUNK] = [(
        PageRef {
            base: BaseId(0),
            page: 0,
        },
        0,
    ); MAX_K * MAX_REFS_PER_CHUNK];
    let mut n = 0;
    let cap = cands.len();
    // All chunk lookups first, back to back: their cache misses overlap (the registry of a
    // node is tens of MB), then the counting.
    let mut found: [Option<&Refs>; MAX_K] = [None; MAX_K];
    for (f, c) in found.iter_mut().zip(fp.chunks()) {
        *f = m.chunks.get(c);
    }
    for refs in found.iter().flatten() {
        for r in refs.iter() {
            match cands[..n].iter_mut().find(|(p, _)| p == r) {
                Some((_, cnt)) => *cnt += 1,
                None if n < cap => {
                    cands[n] = (*r, 1);
                    n += 1;
                }
                None => {}
            }
        }
    }
    let positional = positional.into_iter().flat_map(|refs| refs.iter().copied());
    pick(&g.bases, &mut cands[..n], positional, local)
}

/// The choice from a backend's candidates (entries of unknown bases dropped first).
fn choose_from(
    bases: &BTreeMap<BaseId, BaseEntry>,
    c: &mut Candidates,
    local: NodeId,
) -> Option<Choice> {
    if let Some(r) = c.exact.filter(|r| bases.contains_key(&r.base)) {
        return Some(Choice::Exact(r));
    }
    c.shared.retain(|(p, _)| bases.contains_key(&p.base));
    c.positional.retain(|p| bases.contains_key(&p.base));
    pick(bases, &mut c.shared, c.positional.iter().copied(), local)
}

/// Ranks the candidates of a page that has no exact duplicate: the base page sharing the most
/// chunks, then on the local node, then with fewer dependents, then the lowest; with no shared
/// chunk, the base page at the same position.
#[inline]
fn pick(
    bases: &BTreeMap<BaseId, BaseEntry>,
    cands: &mut [(PageRef, u8)],
    mut positional: impl Iterator<Item = PageRef>,
    local: NodeId,
) -> Option<Choice> {
    let place = |p: &PageRef| {
        bases
            .get(&p.base)
            .map(|e| (e.meta.node == local, e.dependents))
            .unwrap_or((false, u64::MAX))
    };
    if cands.is_empty() {
        // No shared chunk: the base page at the same place (mapping and offset), if any.
        let mut all: Vec<PageRef> = positional.collect();
        if all.is_empty() {
            return None;
        }
        all.sort_unstable_by_key(|p| {
            let (is_local, deps) = place(p);
            (!is_local, deps, *p)
        });
        return Some(Choice::Similar {
            best: all[0],
            shared: 0,
            second: all.get(1).copied(),
        });
    }
    // Rank: most shared chunks, then local node, then fewer dependents, then lowest ref.
    cands.sort_unstable_by_key(|(p, cnt)| {
        let (is_local, deps) = place(p);
        (std::cmp::Reverse(*cnt), !is_local, deps, *p)
    });
    let best = cands[0].0;
    // Runner-up: the positional page in the best candidate's base (the same place in the same
    // base is usually the closest page), else the second most-shared candidate.
    let second = positional
        .find(|p| p.base == best.base && *p != best)
        .or_else(|| cands.get(1).map(|c| c.0));
    Some(Choice::Similar {
        best,
        shared: cands[0].1,
        second,
    })
}

impl Registry {
    /// Pages registered for a base.
    pub fn base_pages(&self, id: BaseId) -> Option<u64> {
        self.inner.read().bases.get(&id).map(|e| e.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::{FingerprintConfig, fingerprint};

    /// Pages made of 64-byte blocks drawn from a small pool (chunks recur across pages).
    fn fps(seed: u64, n: usize) -> Vec<PageFingerprint> {
        let cfg = FingerprintConfig {
            k: 16,
            mask_bits: 6,
        };
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let z = (s ^ (s >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^ (z >> 29)
        };
        (0..n)
            .map(|i| {
                let mut p = [0u8; crate::PAGE];
                if i % 13 != 5 {
                    for blk in p.chunks_exact_mut(64) {
                        let b = next() % 300;
                        for (j, x) in blk.iter_mut().enumerate() {
                            *x = (b as usize * 7 + j * (b as usize % 5 + 1)) as u8;
                        }
                    }
                }
                fingerprint(&p, &cfg)
            })
            .collect()
    }

    #[test]
    fn a_backend_registry_chooses_what_the_inline_index_chooses() {
        let inline = Registry::new();
        let index = Arc::new(MemoryIndex::new());
        let backed = Registry::with_backend(index.clone());
        let pos: Vec<u64> = (0..300).map(|i| i % 50).collect();
        for b in 0..3u32 {
            let meta = BaseMeta {
                function: "f".into(),
                node: NodeId(b % 2),
            };
            let f = fps(u64::from(b), 300);
            inline.add_base(BaseId(b), meta.clone(), &f, &pos).unwrap();
            backed.add_base(BaseId(b), meta, &f, &pos).unwrap();
        }
        inline.acquire(BaseId(1)).unwrap();
        backed.acquire(BaseId(1)).unwrap();
        let mut t = fps(77, 500);
        t.extend(fps(2, 40));
        let tpos: Vec<u64> = (0..t.len() as u64).map(|i| i % 70).collect();
        let want = inline.choose_batch(&t, &tpos, NodeId(1));
        assert!(want.iter().filter(|c| c.is_some()).count() > 400);
        assert_eq!(backed.choose_batch(&t, &tpos, NodeId(1)), want);
        // Removal: its entries go from the backend, and the choices still agree.
        inline.remove_base(BaseId(0)).unwrap();
        backed.remove_base(BaseId(0)).unwrap();
        assert_eq!(
            backed.choose_batch(&t, &tpos, NodeId(0)),
            inline.choose_batch(&t, &tpos, NodeId(0))
        );
        let keys: Vec<PageKeys<'_>> = t.iter().map(|fp| PageKeys::of(fp, 3)).collect();
        let mut out = Vec::new();
        index.lookup_batch(&keys, &mut out).unwrap();
        assert!(out.iter().all(|c| {
            c.exact.is_none_or(|r| r.base != BaseId(0))
                && c.shared.iter().all(|(r, _)| r.base != BaseId(0))
                && c.positional.iter().all(|r| r.base != BaseId(0))
        }));
        // Entries of a base unknown to the registry are never chosen.
        index.insert_base(BaseId(9), &t, &[]).unwrap();
        assert!(
            backed
                .choose_batch(&t, &tpos, NodeId(0))
                .iter()
                .flatten()
                .all(|c| c.page().base != BaseId(9))
        );
    }
}
