//! The inputs of an early-answered lazy dedup start, verified before the restored process
//! resumes: the store was verified when it was loaded (one xxh3 over its whole payload: page
//! table, blob, blocks, images); this checks every base page the store references against a
//! per-page xxh3.
//!
//! Per-page sums of a base are computed once, at the first start that uses it, from its
//! resident pages, in the same pass as the whole-file xxh3 that is checked against the base's
//! metadata (`bases/<id>.json`, the checksum written when the base was made and checked when
//! it was reloaded); later starts check only the pages they reference. The sums (8 bytes per
//! base page, 0.2% of the base) live as long as the base's pages (keyed by their allocation,
//! dropped with them).
//!
//! Not verifiable here (the start then waits for every output page, as before): other nodes'
//! bases (their pages arrive during the rebuild), and a local base whose metadata was never
//! written (its pages could not be saved to the images directory).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};

use medes_dedup::{BaseId, DedupStore, PAGE};
use parking_lot::Mutex;
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::domain::{BaseImage, Domain};

/// Why a start's inputs cannot be checked up front (the start waits for every page instead).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UnverifiableError {
    /// The base is another node's: its pages arrive during the rebuild.
    #[error("base {} is another node's", .0.0)]
    Remote(BaseId),
    /// The base is not resident (the rebuild will fail on it).
    #[error("base {} is not resident", .0.0)]
    NotResident(BaseId),
    /// The base's metadata (with its checksum) cannot be read.
    #[error("base {} has no readable metadata", base.0)]
    NoChecksum {
        /// The base.
        base: BaseId,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A base page the store references failed verification.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InputError {
    /// The base's pages do not match the checksum of its metadata.
    #[error("base {} failed its checksum before the restored process resumed", .0.0)]
    BaseChecksum(BaseId),
    /// One referenced base page does not match its sum.
    #[error("base {} page {page} failed its checksum before the restored process resumed", base.0)]
    BasePage {
        /// The base.
        base: BaseId,
        /// The page.
        page: u64,
    },
}

/// A base's pages (to tell it from a later allocation at the same address) and their sums.
type Sums = (Weak<BaseImage>, Arc<Vec<u64>>);

/// Per-page sums of bases, by the address of their pages' allocation.
#[derive(Default)]
pub(crate) struct SumCache {
    map: Mutex<HashMap<usize, Sums>>,
}

impl SumCache {
    fn get(&self, image: &Arc<BaseImage>) -> Option<Arc<Vec<u64>>> {
        let m = self.map.lock();
        let (w, sums) = m.get(&(Arc::as_ptr(image) as usize))?;
        w.upgrade()
            .filter(|i| Arc::ptr_eq(i, image))
            .map(|_| sums.clone())
    }

    fn insert(&self, image: &Arc<BaseImage>, sums: Arc<Vec<u64>>) {
        let mut m = self.map.lock();
        m.retain(|_, (w, _)| w.strong_count() > 0);
        m.insert(Arc::as_ptr(image) as usize, (Arc::downgrade(image), sums));
    }
}

/// One base to check.
struct Item {
    id: BaseId,
    image: Arc<BaseImage>,
    /// Its per-page sums, if known; else the whole-file checksum to check them against.
    sums: Result<Arc<Vec<u64>>, u64>,
    /// The pages the store references.
    used: Vec<bool>,
}

/// The check of one start's base pages (built before the restore, run while CRIU starts).
pub(crate) struct Check {
    items: Vec<Item>,
}

impl Check {
    /// Plans the check of `store`'s base pages (resident in `domain`; metadata under
    /// `<images>/bases/`), or says why it cannot be done.
    pub(crate) fn plan(
        images: &Path,
        domain: &Domain,
        store: &DedupStore,
        cache: &SumCache,
    ) -> Result<Check, UnverifiableError> {
        let snap = domain.snapshot();
        let mut items = Vec::with_capacity(store.bases.len());
        for &id in &store.bases {
            if crate::remote::is_alias(id) {
                return Err(UnverifiableError::Remote(id));
            }
            let image = snap.image(id).ok_or(UnverifiableError::NotResident(id))?;
            let sums = match cache.get(&image) {
                Some(s) => Ok(s),
                None => Err(base_checksum(images, id)?),
            };
            let n = image.data().len() / PAGE;
            items.push(Item {
                id,
                image,
                sums,
                used: vec![false; n],
            });
        }
        for e in store.pages.iter().filter(|e| e.kind.needs_base()) {
            let Some(it) = items.get_mut(usize::from(e.base_slot)) else {
                continue; // the rebuild reports the unknown slot
            };
            let n = it.used.len() as u64;
            let idx = u64::from(e.base_page);
            let (lo, hi) = if e.kind.needs_window() {
                medes_dedup::image::window_range(idx, store.window_radius, n)
            } else {
                (idx, (idx + 1).min(n))
            };
            for p in lo..hi {
                it.used[p as usize] = true;
            }
        }
        Ok(Check { items })
    }

    /// Checks every referenced base page (on the current rayon pool); computes and caches the
    /// per-page sums of bases seen for the first time, after checking their whole checksum.
    pub(crate) fn run(&self, cache: &SumCache) -> Result<(), InputError> {
        for it in &self.items {
            let data = it.image.data();
            match &it.sums {
                Ok(sums) => {
                    let bad = it
                        .used
                        .par_iter()
                        .enumerate()
                        .filter(|(_, u)| **u)
                        .find_any(|(p, _)| {
                            sums.get(*p) != Some(&xxh3_64(&data[p * PAGE..(p + 1) * PAGE]))
                        });
                    if let Some((p, _)) = bad {
                        return Err(InputError::BasePage {
                            base: it.id,
                            page: p as u64,
                        });
                    }
                }
                Err(want) => {
                    let (whole, sums) = rayon::join(
                        || xxh3_64(data),
                        || data.par_chunks(PAGE).map(xxh3_64).collect::<Vec<u64>>(),
                    );
                    if whole != *want {
                        return Err(InputError::BaseChecksum(it.id));
                    }
                    cache.insert(&it.image, Arc::new(sums));
                }
            }
        }
        Ok(())
    }
}

/// The whole-file checksum of a local base, from its metadata.
fn base_checksum(images: &Path, id: BaseId) -> Result<u64, UnverifiableError> {
    let path = images.join("bases").join(format!("{}.json", id.0));
    let no = |source| UnverifiableError::NoChecksum { base: id, source };
    let text = std::fs::read(&path).map_err(no)?;
    let meta: crate::persist::BaseFile = serde_json::from_slice(&text)
        .map_err(|e| no(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    if meta.id != id {
        return Err(no(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the metadata names base {}", meta.id.0),
        )));
    }
    Ok(meta.pages_checksum)
}
