//! Positional prediction against a template base (issue 8).
//!
//! Sandboxes restored from one template share its memory layout (same mappings at the same
//! addresses, ASLR slides included), so the page at address `v` of process `pid` of such a
//! sandbox is most likely identical, or a few bytes different, to the template's page at the
//! same `(pid, v)`. [`dedup_with_template`] tries that page first, on the **raw** pages (no
//! rebasing: with one layout, pointers are equal as they are), before any fingerprint or
//! lookup; a page it fits is stored as `Same` or a small LZ patch that a rebuild turns back
//! into the page with a copy (no pointer restoring). Pages it does not fit take the ordinary
//! path of [`crate::dedup()`] (sequential prediction, fingerprints, the registry).
//!
//! The template base's pages must be served raw by [`crate::BasePages`] (the agent keeps
//! them as the template's own page image) and are fingerprinted raw in the registry (see
//! [`register_raw_base`]), so other sandboxes may still find them by their chunks.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dedup::{DedupConfig, DedupError, DedupStats};
use crate::image::{BasePages, DumpImage};
use crate::registry::{AddBaseError, BaseId, BaseMeta, PageRef, Registry};
use crate::store::DedupStore;

/// Where each page of a template dump lives: `(pid, first vaddr, pages, first page index)` per
/// present run, sorted by pid and address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateLayout {
    runs: Vec<(u32, u64, u64, u64)>,
    n_pages: u64,
}

impl TemplateLayout {
    /// The layout of a (template) dump, in its page order.
    pub fn of(dump: &DumpImage) -> Self {
        let mut runs = Vec::new();
        let mut first = 0u64;
        for p in &dump.dir.processes {
            if p.mm.is_none() {
                continue;
            }
            for r in p.pagemap.present_runs() {
                runs.push((p.pid, r.vaddr, r.nr_pages, first + r.first_page));
            }
            first += p.pagemap.n_present_pages();
        }
        runs.sort_unstable();
        Self {
            runs,
            n_pages: dump.n_pages(),
        }
    }

    /// Pages of the template.
    pub fn n_pages(&self) -> u64 {
        self.n_pages
    }

    /// The template page index at `(pid, vaddr)`, if the template has a page there.
    pub fn find(&self, pid: u32, vaddr: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| (r.0, r.1) <= (pid, vaddr));
        let &(rp, rv, n, first) = self.runs.get(i.checked_sub(1)?)?;
        let off = (vaddr.checked_sub(rv)?) / crate::PAGE as u64;
        (rp == pid && off < n && first + off < self.n_pages).then_some(first + off)
    }
}

/// For one target dump: the template page at the same address of each of its pages.
#[derive(Debug)]
pub struct TemplateHint {
    base: BaseId,
    at: Vec<u32>,
    /// Largest positional patch kept (larger: the page takes the ordinary path).
    pub accept_below: usize,
    hits: AtomicU64,
    candidates: u64,
}

/// Marks "no template page at this address" in [`TemplateHint::at`].
const NONE: u32 = u32::MAX;

impl TemplateHint {
    /// Lines `target` up with the template (registered as `base`, laid out as `layout`).
    pub fn new(base: BaseId, layout: &TemplateLayout, target: &DumpImage) -> Self {
        let mut at = Vec::with_capacity(target.n_pages() as usize);
        for p in &target.dir.processes {
            if p.mm.is_none() {
                continue;
            }
            for r in p.pagemap.present_runs() {
                for k in 0..r.nr_pages {
                    let v = r.vaddr.wrapping_add(k * crate::PAGE as u64);
                    let j = layout
                        .find(p.pid, v)
                        .and_then(|j| u32::try_from(j).ok())
                        .unwrap_or(NONE);
                    at.push(j);
                }
            }
        }
        at.resize(target.n_pages() as usize, NONE);
        let candidates = at.iter().filter(|&&j| j != NONE).count() as u64;
        Self {
            base,
            at,
            accept_below: 2048,
            hits: AtomicU64::new(0),
            candidates,
        }
    }

    /// The template base.
    pub fn base(&self) -> BaseId {
        self.base
    }

    /// The template page at the address of target page `i`.
    pub(crate) fn at(&self, i: usize) -> Option<PageRef> {
        match self.at.get(i) {
            Some(&j) if j != NONE => Some(PageRef {
                base: self.base,
                page: j,
            }),
            _ => None,
        }
    }

    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Target pages the template has a page at the same address for.
    pub fn candidates(&self) -> u64 {
        self.candidates
    }

    /// Pages stored against the template page at their own address (identical or patched),
    /// counted by the last [`dedup_with_template`] with this hint.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// [`crate::dedup()`] with the positional prediction of `hint` tried first for every non-zero
/// page (see the module documentation). The whole pass compares **raw** pages (`cfg.rebase`
/// is ignored): the sandbox shares the template's layout, so raw pages line up with the
/// template's raw pages also on the ordinary path, and no page needs its pointers restored at
/// rebuild (measured: the same savings as with rebasing, a faster dedup and rebuild).
pub fn dedup_with_template(
    dump: &DumpImage,
    registry: &Registry,
    bases: &dyn BasePages,
    cfg: &DedupConfig,
    hint: &TemplateHint,
) -> Result<(DedupStore, DedupStats), DedupError> {
    hint.hits.store(0, Ordering::Relaxed);
    let raw = DedupConfig {
        rebase: false,
        ..*cfg
    };
    crate::dedup::dedup_hinted(dump, registry, bases, &raw, Some(hint))
}

/// Registers a template base with fingerprints of its **raw** pages (no rebasing), matching
/// base pages served raw.
pub fn register_raw_base(
    registry: &Registry,
    id: BaseId,
    meta: BaseMeta,
    dump: &DumpImage,
    cfg: &DedupConfig,
) -> Result<(), AddBaseError> {
    let raw = DedupConfig {
        rebase: false,
        ..*cfg
    };
    crate::dedup::register_base(registry, id, meta, dump, &raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pages_by_pid_and_address() {
        let l = TemplateLayout {
            runs: vec![(1, 0x1000, 2, 0), (1, 0x8000, 1, 2), (2, 0x1000, 3, 3)],
            n_pages: 6,
        };
        assert_eq!(l.find(1, 0x1000), Some(0));
        assert_eq!(l.find(1, 0x2000), Some(1));
        assert_eq!(l.find(1, 0x3000), None);
        assert_eq!(l.find(1, 0x8000), Some(2));
        assert_eq!(l.find(2, 0x3000), Some(5));
        assert_eq!(l.find(2, 0x4000), None);
        assert_eq!(l.find(3, 0x1000), None);
        assert_eq!(l.find(1, 0x0), None);
    }
}
