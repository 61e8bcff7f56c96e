//! The fingerprint registry: chunk hash → base pages holding it, and the base-page choice.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

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

#[derive(Debug, Default)]
struct Inner {
    chunks: IdMap<Refs>,
    exact: IdMap<PageRef>,
    positional: IdMap<Refs>,
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
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
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
        let mut g = self.inner.write();
        if g.bases.contains_key(&id) {
            return Err(AddBaseError::Duplicate(id));
        }
        let inner = &mut *g;
        for (i, fp) in fps.iter().enumerate() {
            if fp.zero {
                continue;
            }
            let r = PageRef {
                base: id,
                page: i as u32,
            };
            inner.exact.entry(fp.page_hash).or_insert(r);
            if let Some(&pos) = positions.get(i).filter(|&&p| p != 0) {
                inner
                    .positional
                    .entry(pos)
                    .and_modify(|refs| refs.push(r))
                    .or_insert(Refs {
                        first: r,
                        more: None,
                    });
            }
            for &c in fp.chunks() {
                inner
                    .chunks
                    .entry(c)
                    .and_modify(|refs| refs.push(r))
                    .or_insert(Refs {
                        first: r,
                        more: None,
                    });
            }
        }
        inner.bases.insert(
            id,
            BaseEntry {
                meta,
                dependents: 0,
                pages: fps.len() as u64,
            },
        );
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
        g.chunks.retain(|_, refs| refs.remove_base(id));
        g.exact.retain(|_, r| r.base != id);
        g.positional.retain(|_, refs| refs.remove_base(id));
        g.chunks.shrink_to_fit();
        g.exact.shrink_to_fit();
        g.positional.shrink_to_fit();
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
    pub fn choose(&self, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
        choose_in(&self.inner.read(), fp, position, local)
    }

    /// Chooses base pages for a whole sandbox under one read lock (`positions` may be empty).
    pub fn choose_batch(
        &self,
        fps: &[PageFingerprint],
        positions: &[u64],
        local: NodeId,
    ) -> Vec<Option<Choice>> {
        let g = self.inner.read();
        fps.iter()
            .enumerate()
            .map(|(i, fp)| choose_in(&g, fp, positions.get(i).copied().unwrap_or(0), local))
            .collect()
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
        let mut bytes = g.chunks.capacity() * slot(8, std::mem::size_of::<Refs>())
            + g.exact.capacity() * slot(8, std::mem::size_of::<PageRef>())
            + g.positional.capacity() * slot(8, std::mem::size_of::<Refs>());
        for r in g.positional.values() {
            if let Some(m) = &r.more {
                bytes += std::mem::size_of::<Vec<PageRef>>() + m.capacity() * 8;
            }
        }
        let mut chunk_refs = 0;
        for r in g.chunks.values() {
            chunk_refs += 1;
            if let Some(m) = &r.more {
                chunk_refs += m.len();
                bytes += std::mem::size_of::<Vec<PageRef>>() + m.capacity() * 8;
            }
        }
        let entries = chunk_refs + g.exact.len() + g.positional.len();
        RegistryStats {
            bases: g.bases.len(),
            chunk_keys: g.chunks.len(),
            chunk_refs,
            exact_keys: g.exact.len(),
            position_keys: g.positional.len(),
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
        self.g.exact.get(&page_hash).copied()
    }

    /// Chooses a base page for one page (see [`Registry::choose`]).
    pub fn choose(&self, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
        choose_in(&self.g, fp, position, local)
    }
}

fn choose_in(g: &Inner, fp: &PageFingerprint, position: u64, local: NodeId) -> Option<Choice> {
    if fp.zero {
        return None;
    }
    if let Some(&r) = g.exact.get(&fp.page_hash) {
        return Some(Choice::Exact(r));
    }
    let positional = (position != 0)
        .then(|| g.positional.get(&position))
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
        *f = g.chunks.get(c);
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
    if n == 0 {
        // No shared chunk: the base page at the same place (mapping and offset), if any.
        return positional.map(|refs| {
            let mut all: Vec<PageRef> = refs.iter().copied().collect();
            all.sort_unstable_by_key(|p| {
                let (is_local, deps) = g
                    .bases
                    .get(&p.base)
                    .map(|e| (e.meta.node == local, e.dependents))
                    .unwrap_or((false, u64::MAX));
                (!is_local, deps, *p)
            });
            Choice::Similar {
                best: all[0],
                shared: 0,
                second: all.get(1).copied(),
            }
        });
    }
    // Rank: most shared chunks, then local node, then fewer dependents, then lowest ref.
    let rank = |(p, cnt): &(PageRef, u8)| {
        let (is_local, deps) = g
            .bases
            .get(&p.base)
            .map(|e| (e.meta.node == local, e.dependents))
            .unwrap_or((false, u64::MAX));
        (std::cmp::Reverse(*cnt), !is_local, deps, *p)
    };
    let cands = &mut cands[..n];
    cands.sort_unstable_by_key(rank);
    let best = cands[0].0;
    // Runner-up: the positional page in the best candidate's base (the same place in the same
    // base is usually the closest page), else the second most-shared candidate.
    let second = positional
        .and_then(|refs| {
            refs.iter()
                .find(|p| p.base == best.base && **p != best)
                .copied()
        })
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
