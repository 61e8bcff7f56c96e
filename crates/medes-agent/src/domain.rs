//! Dedup domains: the fingerprint registry and the resident base pages of one domain (one
//! namespace, or the whole node when tenants share), behind a small interface so a later issue
//! can move the registry into the controller.
//!
//! Reference counts: every base a dedup sandbox's store points into is acquired in the registry
//! for as long as the store exists ([`Pins`]); a base is retired (its entries removed, its pages
//! dropped) only with no dependents. Dedup pins every base of the domain before it looks up, so a
//! base cannot be retired between the lookup and the store.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use medes_dedup::{
    AddBaseError, BaseId, BaseMeta, BasePageError, BasePages, DedupConfig, DumpImage, PAGE, Page,
    Registry, register_base,
};
use parking_lot::Mutex;
use rayon::prelude::*;

/// The canonical (rebased when the engine rebases) pages of one base, resident in memory.
pub(crate) struct BaseImage {
    pages: Vec<u8>,
    n_pages: u64,
}

impl BaseImage {
    /// Copies the canonical pages out of a dump (in parallel), so the dump's files can go.
    pub(crate) fn from_dump(dump: &DumpImage, rebase: bool) -> BaseImage {
        let n = dump.n_pages();
        let mut pages = vec![0u8; n as usize * PAGE];
        pages.par_chunks_mut(PAGE).enumerate().for_each(|(i, dst)| {
            if let Some((p, _)) = dump.canonical_page(i as u64, rebase) {
                dst.copy_from_slice(&p[..]);
            }
        });
        BaseImage { pages, n_pages: n }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.pages.len() as u64
    }
}

/// An immutable snapshot of a domain's resident bases (copy on write).
#[derive(Default, Clone)]
pub(crate) struct BaseSet {
    map: HashMap<BaseId, Arc<BaseImage>>,
}

impl BasePages for BaseSet {
    fn page(&self, base: BaseId, idx: u64) -> Result<Cow<'_, Page>, BasePageError> {
        let b = self
            .map
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let missing = BasePageError::MissingPage { base, page: idx };
        let o = usize::try_from(idx).map_err(|_| missing.clone())? * PAGE;
        let p: &Page = b
            .pages
            .get(o..o + PAGE)
            .and_then(|s| s.try_into().ok())
            .ok_or(missing)?;
        Ok(Cow::Borrowed(p))
    }

    fn n_pages(&self, base: BaseId) -> Result<u64, BasePageError> {
        self.map
            .get(&base)
            .map(|b| b.n_pages)
            .ok_or(BasePageError::MissingBase(base))
    }

    fn window(&self, base: BaseId, idx: u64, radius: u64) -> Result<Cow<'_, [u8]>, BasePageError> {
        let b = self
            .map
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let (start, end) = medes_dedup::image::window_range(idx, radius, b.n_pages);
        if idx >= end {
            return Err(BasePageError::MissingPage { base, page: idx });
        }
        Ok(Cow::Borrowed(
            &b.pages[start as usize * PAGE..end as usize * PAGE],
        ))
    }
}

/// One dedup domain.
pub(crate) struct Domain {
    /// The domain's key (a namespace, or `*`).
    pub(crate) key: String,
    registry: Registry,
    bases: Mutex<Arc<BaseSet>>,
    /// Estimated heap bytes of the registry (updated when bases come and go).
    registry_bytes: AtomicU64,
}

/// Bases held in the registry on behalf of one store (released on drop).
pub(crate) struct Pins {
    domain: Arc<Domain>,
    ids: Vec<BaseId>,
}

impl Pins {
    /// Keeps only the pins of `keep`, releasing the others.
    pub(crate) fn retain(&mut self, keep: &[BaseId]) {
        let reg = &self.domain.registry;
        self.ids.retain(|id| {
            if keep.contains(id) {
                true
            } else {
                let _ = reg.release(*id);
                false
            }
        });
    }

    /// The pinned bases.
    pub(crate) fn ids(&self) -> &[BaseId] {
        &self.ids
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            let _ = self.domain.registry.release(id);
        }
    }
}

/// Why a base could not be retired.
pub(crate) enum RetireError {
    /// Dedup sandboxes still depend on it.
    InUse(u64),
}

impl Domain {
    pub(crate) fn new(key: String) -> Domain {
        Domain {
            key,
            registry: Registry::new(),
            bases: Mutex::new(Arc::new(BaseSet::default())),
            registry_bytes: AtomicU64::new(0),
        }
    }

    fn update_registry_bytes(&self) {
        let b = self.registry.stats().bytes as u64;
        self.registry_bytes.store(b, Ordering::Relaxed);
    }

    /// The share of the registry's memory that a base of `pages` pages stands for (the
    /// registry's bytes in proportion to the pages of all resident bases).
    pub(crate) fn registry_share(&self, pages: u64) -> u64 {
        let total: u64 = self.bases.lock().map.values().map(|b| b.n_pages).sum();
        if total == 0 {
            return 0;
        }
        let bytes = self.registry_bytes.load(Ordering::Relaxed) as u128;
        (bytes * u128::from(pages.min(total)) / u128::from(total)) as u64
    }

    /// Fingerprints a base dump into the registry and keeps its canonical pages resident.
    /// Returns the bytes now held for it. CPU-heavy: call from a blocking thread.
    pub(crate) fn add_base(
        &self,
        id: BaseId,
        meta: BaseMeta,
        dump: &DumpImage,
        cfg: &DedupConfig,
    ) -> Result<u64, AddBaseError> {
        let image = Arc::new(BaseImage::from_dump(dump, cfg.rebase));
        let bytes = image.bytes();
        // Pages first, then the registry: a lookup never finds a base whose pages are missing.
        {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.insert(id, image);
            *g = Arc::new(set);
        }
        if let Err(e) = register_base(&self.registry, id, meta, dump, cfg) {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.remove(&id);
            *g = Arc::new(set);
            return Err(e);
        }
        self.update_registry_bytes();
        Ok(bytes)
    }

    /// The registry (lookups).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The current bases.
    pub(crate) fn snapshot(&self) -> Arc<BaseSet> {
        self.bases.lock().clone()
    }

    /// Pins every current base (for a dedup about to look up) and returns them with a snapshot
    /// of their pages.
    pub(crate) fn pin_all(self: &Arc<Self>) -> (Arc<BaseSet>, Pins) {
        let g = self.bases.lock();
        let mut ids = Vec::new();
        for id in self.registry.bases() {
            if g.map.contains_key(&id) && self.registry.acquire(id).is_ok() {
                ids.push(id);
            }
        }
        let snap = g.clone();
        drop(g);
        (
            snap,
            Pins {
                domain: self.clone(),
                ids,
            },
        )
    }

    /// Removes a base's registry entries and pages, unless something depends on it.
    pub(crate) fn retire(&self, id: BaseId) -> Result<(), RetireError> {
        let mut g = self.bases.lock();
        match self.registry.remove_base(id) {
            Ok(()) => {}
            Err(medes_dedup::BaseRefError::InUse { dependents, .. }) => {
                return Err(RetireError::InUse(dependents));
            }
            Err(_) => {} // not registered (failed registration): only pages to drop
        }
        let mut set = BaseSet::clone(&g);
        set.map.remove(&id);
        *g = Arc::new(set);
        drop(g);
        self.update_registry_bytes();
        Ok(())
    }

    /// Fault injection for tests: drops a base's pages while its registry entry and
    /// dependents stay, as if the base image were lost.
    pub(crate) fn lose_pages(&self, id: BaseId) -> bool {
        let mut g = self.bases.lock();
        let mut set = BaseSet::clone(&g);
        let had = set.map.remove(&id).is_some();
        *g = Arc::new(set);
        had
    }
}

/// All dedup domains of the node.
#[derive(Default)]
pub(crate) struct Domains {
    map: Mutex<HashMap<String, Arc<Domain>>>,
}

impl Domains {
    /// The domain of a key, created on first use.
    pub(crate) fn get(&self, key: &str) -> Arc<Domain> {
        self.map
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Domain::new(key.to_string())))
            .clone()
    }
}
