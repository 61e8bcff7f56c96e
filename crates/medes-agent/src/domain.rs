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
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use medes_core::SandboxId;
use medes_dedup::{
    AddBaseError, BaseId, BaseMeta, BasePageError, BasePages, DedupConfig, DumpImage, PAGE, Page,
    Registry, register_base,
};
use parking_lot::Mutex;
use rayon::prelude::*;

/// Where a base's pages are held.
enum Backing {
    /// On the heap (a base that could not be written to the images directory).
    Heap(Vec<u8>),
    /// A read-only mapping of its pages file on the tmpfs (the file's pages are the only copy).
    Map(memmap2::Mmap),
}

/// The canonical (rebased when the engine rebases) pages of one base, resident in memory:
/// normally a mapping of `<images>/bases/<id>.pages` on the tmpfs, so that they survive an
/// agent restart (see `persist.rs`).
pub(crate) struct BaseImage {
    pages: Backing,
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
        BaseImage {
            pages: Backing::Heap(pages),
            n_pages: n,
        }
    }

    /// Maps a pages file written by [`BaseImage::save`] (read-only).
    pub(crate) fn map(path: &std::path::Path) -> std::io::Result<BaseImage> {
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len % PAGE as u64 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len} bytes is not a whole number of pages"),
            ));
        }
        let map = map_file(&f)?;
        Ok(BaseImage {
            pages: Backing::Map(map),
            n_pages: len / PAGE as u64,
        })
    }

    /// Writes the pages to `path` (atomically) and switches to a mapping of that file, so the
    /// heap copy goes. Returns the pages' xxh3 checksum.
    pub(crate) fn save(&mut self, path: &std::path::Path) -> std::io::Result<u64> {
        use std::io::Write;
        let sum = xxhash_rust::xxh3::xxh3_64(self.data());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(self.data())?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        *self = BaseImage::map(path)?;
        Ok(sum)
    }

    /// The pages.
    pub(crate) fn data(&self) -> &[u8] {
        match &self.pages {
            Backing::Heap(v) => v,
            Backing::Map(m) => m,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.data().len() as u64
    }
}

/// A read-only mapping of a whole file.
#[allow(unsafe_code)]
fn map_file(f: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the file is one of this agent's base pages files in its own images directory
    // (mode 0700, root only); it is written once before it is mapped and never modified or
    // truncated afterwards, only unlinked (which keeps the mapping valid).
    unsafe { memmap2::Mmap::map(f) }
}

/// An immutable snapshot of a domain's resident bases (copy on write).
#[derive(Default, Clone)]
pub(crate) struct BaseSet {
    map: HashMap<BaseId, Arc<BaseImage>>,
    /// Other nodes' bases, read over the network (only on the snapshot a dedup reads, see
    /// [`Domain::pin_all`] and `remote.rs`).
    remote: Option<Arc<crate::remote::ClusterBases>>,
}

impl BaseSet {
    /// The pages of one base, if resident.
    pub(crate) fn image(&self, id: BaseId) -> Option<Arc<BaseImage>> {
        self.map.get(&id).cloned()
    }
}

impl BasePages for BaseSet {
    fn page(&self, base: BaseId, idx: u64) -> Result<Cow<'_, Page>, BasePageError> {
        if let Some(r) = self
            .remote
            .as_ref()
            .filter(|_| !self.map.contains_key(&base))
        {
            return r.page(base, idx);
        }
        let b = self
            .map
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let missing = BasePageError::MissingPage { base, page: idx };
        let o = usize::try_from(idx).map_err(|_| missing.clone())? * PAGE;
        let p: &Page = b
            .data()
            .get(o..o + PAGE)
            .and_then(|s| s.try_into().ok())
            .ok_or(missing)?;
        Ok(Cow::Borrowed(p))
    }

    fn n_pages(&self, base: BaseId) -> Result<u64, BasePageError> {
        if let Some(r) = self
            .remote
            .as_ref()
            .filter(|_| !self.map.contains_key(&base))
        {
            return r.n_pages(base);
        }
        self.map
            .get(&base)
            .map(|b| b.n_pages)
            .ok_or(BasePageError::MissingBase(base))
    }

    fn window(&self, base: BaseId, idx: u64, radius: u64) -> Result<Cow<'_, [u8]>, BasePageError> {
        if let Some(r) = self
            .remote
            .as_ref()
            .filter(|_| !self.map.contains_key(&base))
        {
            return r.window(base, idx, radius);
        }
        let b = self
            .map
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let (start, end) = medes_dedup::image::window_range(idx, radius, b.n_pages);
        if idx >= end {
            return Err(BasePageError::MissingPage { base, page: idx });
        }
        Ok(Cow::Borrowed(
            &b.data()[start as usize * PAGE..end as usize * PAGE],
        ))
    }
}

/// One dedup domain.
pub(crate) struct Domain {
    /// The domain's key (a namespace, or `*`).
    pub(crate) key: String,
    /// Where its bases' pages and metadata are kept across agent restarts (`None`: memory only).
    dir: Option<PathBuf>,
    registry: Registry,
    bases: Mutex<Arc<BaseSet>>,
    /// Estimated heap bytes of the registry (updated when bases come and go).
    registry_bytes: AtomicU64,
    /// Other nodes' bases known here (issue 7, `remote.rs`).
    remote: Option<Arc<crate::remote::Remote>>,
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
    pub(crate) fn new(key: String, dir: Option<PathBuf>) -> Domain {
        Domain {
            key,
            dir,
            registry: Registry::new(),
            bases: Mutex::new(Arc::new(BaseSet::default())),
            registry_bytes: AtomicU64::new(0),
            remote: None,
        }
    }

    /// The registry changed outside this module (another node's base imported).
    pub(crate) fn registry_changed(&self) {
        self.update_registry_bytes();
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
    ///
    /// The pages, their position keys and the base's metadata are written to the domain's
    /// directory first (see `persist.rs`), so the base survives an agent restart; if that
    /// fails the base lives on the heap only (logged). `sandbox` is the base's sandbox,
    /// `origin` the action and version it runs (both kept in the metadata).
    pub(crate) fn add_base(
        &self,
        id: BaseId,
        meta: BaseMeta,
        dump: &DumpImage,
        cfg: &DedupConfig,
        sandbox: &SandboxId,
        origin: &crate::persist::BaseOrigin,
    ) -> Result<u64, AddBaseError> {
        let mut image = BaseImage::from_dump(dump, cfg.rebase);
        let positions: &[u64] = if cfg.positional {
            dump.positions()
        } else {
            &[]
        };
        if let Some(dir) = &self.dir
            && let Err(error) = crate::persist::save_base(
                dir, &self.key, id, &meta, sandbox, origin, &mut image, positions,
            )
        {
            tracing::warn!(base = id.0, %error, "base kept in memory only (it will not survive a restart)");
            crate::persist::remove_base(dir, id);
        }
        let image = Arc::new(image);
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
            drop(g);
            if let Some(dir) = &self.dir {
                crate::persist::remove_base(dir, id);
            }
            return Err(e);
        }
        self.update_registry_bytes();
        Ok(bytes)
    }

    /// Adds a template's base (issue 8, see `template.rs`): `image` holds the template's raw
    /// pages (a mapping of its pages image), registered with raw fingerprints. Returns the
    /// bytes of its pages. CPU-heavy: call from a blocking thread.
    pub(crate) fn add_template_base(
        &self,
        id: BaseId,
        meta: BaseMeta,
        dump: &DumpImage,
        image: BaseImage,
        cfg: &DedupConfig,
    ) -> Result<u64, AddBaseError> {
        let image = Arc::new(image);
        let bytes = image.bytes();
        {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.insert(id, image);
            *g = Arc::new(set);
        }
        if let Err(e) = medes_dedup::register_raw_base(&self.registry, id, meta, dump, cfg) {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.remove(&id);
            *g = Arc::new(set);
            return Err(e);
        }
        self.update_registry_bytes();
        Ok(bytes)
    }

    /// Re-registers a base kept by an earlier agent: fingerprints its (canonical) pages and
    /// adds them, with their position keys, to the registry. CPU-heavy: call from a blocking
    /// thread.
    pub(crate) fn load_base(
        &self,
        id: BaseId,
        meta: BaseMeta,
        image: BaseImage,
        positions: &[u64],
        cfg: &DedupConfig,
    ) -> Result<u64, AddBaseError> {
        let fps: Vec<_> = image
            .data()
            .par_chunks(PAGE)
            .map(|p| {
                let page: &Page = p.try_into().unwrap_or(&[0u8; PAGE]);
                medes_dedup::fingerprint(page, &cfg.fingerprint)
            })
            .collect();
        let image = Arc::new(image);
        let bytes = image.bytes();
        {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.insert(id, image);
            *g = Arc::new(set);
        }
        let positions = if cfg.positional { positions } else { &[] };
        if let Err(e) = self.registry.add_base(id, meta, &fps, positions) {
            let mut g = self.bases.lock();
            let mut set = BaseSet::clone(&g);
            set.map.remove(&id);
            *g = Arc::new(set);
            return Err(e);
        }
        self.update_registry_bytes();
        Ok(bytes)
    }

    /// Pins the given bases for a store kept by an earlier agent; `None` (nothing pinned) if
    /// one of them is not resident here.
    pub(crate) fn pin(self: &Arc<Self>, ids: &[BaseId]) -> Option<Pins> {
        let snap = self.snapshot();
        let mut pins = Pins {
            domain: self.clone(),
            ids: Vec::new(),
        };
        for id in ids {
            // Other nodes' bases (aliases) have no pages here.
            let here = snap.map.contains_key(id) || crate::remote::is_alias(*id);
            if !here || self.registry.acquire(*id).is_err() {
                return None; // `pins` releases what it holds
            }
            pins.ids.push(*id);
        }
        Some(pins)
    }

    /// Dedup stores that depend on a base.
    pub(crate) fn dependents(&self, id: BaseId) -> u64 {
        self.registry.dependents(id).unwrap_or(0)
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
            // Other nodes' bases (aliases) have no pages here: they are read remotely.
            if (g.map.contains_key(&id) || crate::remote::is_alias(id))
                && self.registry.acquire(id).is_ok()
            {
                ids.push(id);
            }
        }
        let snap = g.clone();
        drop(g);
        // Other nodes' bases: read over the network when the dedup touches them.
        let snap = match &self.remote {
            Some(r) => {
                let view = r.dedup_view(self, snap.clone());
                let mut set = BaseSet::clone(&snap);
                set.remote = Some(Arc::new(view));
                Arc::new(set)
            }
            None => snap,
        };
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
        if let Some(dir) = &self.dir {
            crate::persist::remove_base(dir, id);
        }
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
pub(crate) struct Domains {
    map: Mutex<HashMap<String, Arc<Domain>>>,
    /// Other nodes' bases, shared by all domains.
    remote: Option<Arc<crate::remote::Remote>>,
    /// Where new domains keep their fingerprint index (`None`: in memory).
    backends: Option<Arc<crate::registry_backend::RegistryBackends>>,
    /// Where bases are kept (`<images>/bases`), shared by all domains (base ids are unique on
    /// the node).
    dir: Option<PathBuf>,
}

impl Domains {
    pub(crate) fn new(dir: Option<PathBuf>) -> Domains {
        Domains {
            map: Mutex::new(HashMap::new()),
            remote: None,
            backends: None,
            dir,
        }
    }

    /// Domains created from now on read other nodes' bases through `remote`.
    pub(crate) fn with_remote(mut self, remote: Arc<crate::remote::Remote>) -> Domains {
        self.remote = Some(remote);
        self
    }

    /// Domains created from now on keep their fingerprint index where `backends` says.
    pub(crate) fn with_registry_backends(
        mut self,
        backends: crate::registry_backend::RegistryBackends,
    ) -> Domains {
        self.backends = Some(Arc::new(backends));
        self
    }

    /// The domain of a key, if it exists.
    pub(crate) fn find(&self, key: &str) -> Option<Arc<Domain>> {
        self.map.lock().get(key).cloned()
    }

    /// The domain of a key, created on first use.
    pub(crate) fn get(&self, key: &str) -> Arc<Domain> {
        self.map
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| {
                let mut d = Domain::new(key.to_string(), self.dir.clone());
                d.remote = self.remote.clone();
                if let Some(b) = &self.backends {
                    d.registry = b.registry(key);
                }
                Arc::new(d)
            })
            .clone()
    }
}
