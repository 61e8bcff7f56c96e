//! The dedup operation: fingerprint, choose bases, encode, build the store; and base registration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{CodecConfig, Encoder, PageKind};
use crate::fingerprint::{FingerprintConfig, PageFingerprint, fingerprint, sample};
use crate::image::{BasePageError, BasePages, DumpImage};
use crate::registry::{
    AddBaseError, BaseId, BaseMeta, Choice, NodeId, PageKeys, PageRef, Registry, RegistryBackend,
    RegistryReader,
};
use crate::store::{BLOCK_PAGES, DedupStore, PageEntry, StoredProcess};

/// Dedup settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DedupConfig {
    /// Fingerprinting.
    pub fingerprint: FingerprintConfig,
    /// Page codecs.
    pub codec: CodecConfig,
    /// Pointer rebasing (pointers into the dump's own mappings as mapping + offset).
    pub rebase: bool,
    /// Position candidates: the base page at the same mapping and offset is a candidate (the
    /// only one when no chunk matches, else the runner-up). Off by default: it turned
    /// stand-alone pages into zstd patches of about the same size (±0.2 points of savings) at a
    /// slower rebuild.
    pub positional: bool,
    /// Try the runner-up base page when the first gives a patch larger than this (0: never;
    /// `usize::MAX`, the default: only when the first gives no patch at all, which measured
    /// 0.2 points of savings below 256 for 15% less CPU time).
    pub second_candidate_above: usize,
    /// The node the dedup runs on (base choice prefers local bases on ties).
    pub local_node: NodeId,
    /// zstd level of the store's blocks (sparse diffs and raw pages of 256-page batches).
    pub block_level: i32,
    /// Sequential prediction: a page whose predecessor was stored against base page `j` is
    /// first encoded against base page `j + 1`, and that patch is kept without fingerprinting
    /// or looking up when it is at most this many bytes (0: off). Consecutive pages of a
    /// mapping usually match consecutive base pages.
    #[serde(default = "default_predict_below")]
    pub predict_below: usize,
}

fn default_predict_below() -> usize {
    2048
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            fingerprint: FingerprintConfig {
                k: 16,
                mask_bits: 6,
            },
            codec: CodecConfig::default(),
            rebase: true,
            positional: false,
            second_candidate_above: usize::MAX,
            local_node: NodeId(0),
            block_level: 1,
            predict_below: default_predict_below(),
        }
    }
}

/// Figures of one dedup operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupStats {
    /// Pages.
    pub pages: u64,
    /// Pages per kind.
    pub kinds: HashMap<String, u64>,
    /// Stored bytes per kind.
    pub kind_bytes: HashMap<String, u64>,
    /// Zero pages.
    pub zero: u64,
    /// Pages identical to their base page.
    pub exact: u64,
    /// Pages stored as a patch against a base page.
    pub patched: u64,
    /// Pages stored on their own.
    pub standalone: u64,
    /// Bytes of all patches.
    pub patch_bytes: u64,
    /// Pages stored against a base page of each base.
    pub per_base: HashMap<u32, u64>,
    /// Pages that were rebased.
    pub rebased: u64,
    /// Pages stored against the predicted base page (no fingerprint or lookup).
    pub predicted: u64,
    /// Pages whose sampled chunks were looked up in the registry.
    pub looked_up: u64,
    /// Batches whose lookup the registry backend failed (their pages were stored without a
    /// base: still restorable, only larger). Always 0 with the in-memory index.
    #[serde(default)]
    pub lookup_failures: u64,
    /// Time fingerprinting (zero check, checksum, rebasing, whole-page hash, chunk sampling;
    /// thread time divided by the pool's threads).
    pub fingerprint: Duration,
    /// Time choosing base pages (thread time divided by the pool's threads, like the other
    /// phases).
    pub lookup: Duration,
    /// Thread time of one page's lookup (its chunks in the registry and the base choice),
    /// averaged over the pages looked up.
    pub lookup_per_page: Duration,
    /// Time encoding.
    pub encode: Duration,
    /// Time compressing the blocks.
    pub compress: Duration,
}

/// Error of a dedup operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// A chosen base page could not be fetched.
    #[error("fetching base page for page {page}")]
    BasePage {
        /// The target page.
        page: u64,
        /// The cause.
        #[source]
        source: BasePageError,
    },
    /// More distinct bases than the page table can reference.
    #[error("too many distinct bases")]
    TooManyBases,
}

/// Fingerprints every page of a dump (in parallel), rebasing first when `rebase` is set.
/// Returns the fingerprints and which pages were rebased.
pub fn fingerprint_dump(
    dump: &DumpImage,
    cfg: &FingerprintConfig,
    rebase: bool,
) -> (Vec<PageFingerprint>, Vec<bool>) {
    (0..dump.n_pages())
        .into_par_iter()
        .map(|i| match dump.canonical_page(i, rebase) {
            Some((p, r)) => (fingerprint(&p, cfg), r),
            None => (fingerprint(&[0u8; crate::PAGE], cfg), false),
        })
        .unzip()
}

/// Fingerprints a base dump and adds it to the registry.
pub fn register_base(
    registry: &Registry,
    id: BaseId,
    meta: BaseMeta,
    dump: &DumpImage,
    cfg: &DedupConfig,
) -> Result<(), AddBaseError> {
    let (fps, _) = fingerprint_dump(dump, &cfg.fingerprint, cfg.rebase);
    let positions: &[u64] = if cfg.positional {
        dump.positions()
    } else {
        &[]
    };
    registry.add_base(id, meta, &fps, positions)
}

/// Kinds in tag order (index = `PageKind as usize`).
const KINDS: [PageKind; 9] = [
    PageKind::Zero,
    PageKind::Same,
    PageKind::Sparse,
    PageKind::ZstdRef,
    PageKind::Raw,
    PageKind::Lz4,
    PageKind::Zstd,
    PageKind::ZstdWin,
    PageKind::Lz,
];

/// What one block (batch of [`BLOCK_PAGES`] pages) of a dedup produced.
#[derive(Default)]
struct BlockOut {
    /// Entries with the base used (slots are assigned when blocks are joined).
    entries: Vec<(PageEntry, Option<BaseId>)>,
    /// Data of pages not in the block.
    blob: Vec<u8>,
    /// The block's compressed data.
    block: Vec<u8>,
    /// Raw bytes per kind (block-stored kinds before compression).
    kind_bytes: [u64; 9],
    /// Nanoseconds (this thread) fingerprinting, choosing, encoding, compressing.
    ns: [u64; 4],
    /// Pages stored against the predicted base page.
    predicted: u64,
    /// Pages looked up by sampled chunks.
    looked_up: u64,
    /// Whether the backend failed this block's lookup.
    lookup_failed: bool,
}

/// Per-thread state of a dedup.
struct Worker {
    enc: Encoder,
    zc: zstd::bulk::Compressor<'static>,
    raw: Vec<u8>,
    data: Vec<u8>,
    canon: Box<crate::Page>,
    rcache: crate::rebase::RebaseCache,
}

impl Worker {
    fn new(level: i32) -> Self {
        let zc = zstd::bulk::Compressor::new(level).unwrap_or_else(|_| {
            zstd::bulk::Compressor::new(zstd::DEFAULT_COMPRESSION_LEVEL).unwrap_or_default()
        });
        Self {
            enc: Encoder::default(),
            zc,
            raw: Vec::with_capacity(BLOCK_PAGES * crate::PAGE),
            data: Vec::with_capacity(2 * crate::PAGE),
            canon: Box::new([0; crate::PAGE]),
            rcache: crate::rebase::RebaseCache::default(),
        }
    }
}

/// The window of base pages around a base page, and the base page's byte offset in it.
fn fetch<'a>(
    bases: &'a dyn BasePages,
    r: PageRef,
    radius: u64,
    page: u64,
) -> Result<(std::borrow::Cow<'a, [u8]>, usize), DedupError> {
    let err = |source| DedupError::BasePage { page, source };
    let idx = u64::from(r.page);
    let n = bases.n_pages(r.base).map_err(err)?;
    let (start, _) = crate::image::window_range(idx, radius, n);
    let w = bases.window(r.base, idx, radius).map_err(err)?;
    let bo = (idx - start) as usize * crate::PAGE;
    if w.len() < bo + crate::PAGE {
        return Err(err(BasePageError::MissingPage {
            base: r.base,
            page: idx,
        }));
    }
    Ok((w, bo))
}

/// The base page at byte `bo` of a window fetched by [`fetch`].
fn base_page(w: &[u8], bo: usize) -> &crate::Page {
    w[bo..bo + crate::PAGE]
        .as_chunks::<{ crate::PAGE }>()
        .0
        .first()
        .unwrap_or(&[0; crate::PAGE])
}

/// With a registry backend: fingerprints every non-zero page of a batch and looks them all up
/// in one batched request. Returns each page's choice (by index in the batch), `None` for all
/// if the backend fails (`failed` set): the batch is stored without bases rather than the
/// sandbox lost.
#[allow(clippy::too_many_arguments)]
fn prefetch(
    w: &mut Worker,
    range: std::ops::Range<usize>,
    dump: &DumpImage,
    reader: &RegistryReader<'_>,
    backend: &dyn RegistryBackend,
    positions: &[u64],
    cfg: &DedupConfig,
    ns: &mut [u64; 4],
    failed: &mut bool,
) -> Vec<Option<Choice>> {
    let t0 = Instant::now();
    let zero_page = [0u8; crate::PAGE];
    let mut fps = Vec::with_capacity(range.len());
    let mut idx = Vec::with_capacity(range.len());
    for i in range.clone() {
        let page = i as u64;
        let raw = dump.page(page).unwrap_or(&zero_page);
        if crate::fingerprint::is_zero(raw) {
            continue;
        }
        // The same canonical page and hash as the pass itself computes.
        let rebased = cfg.rebase
            && dump.locate(page).is_some_and(|(p, _)| {
                dump.procs[p]
                    .table
                    .rebase_with(raw, &mut w.canon, &mut w.rcache)
                    .is_some_and(|n| n > 0)
            });
        let target: &crate::Page = if rebased { &w.canon } else { raw };
        fps.push(sample(target, &cfg.fingerprint, xxh3_64(target)));
        idx.push(i - range.start);
    }
    let t1 = Instant::now();
    let keys: Vec<PageKeys<'_>> = fps
        .iter()
        .zip(&idx)
        .map(|(fp, &j)| PageKeys::of(fp, positions.get(range.start + j).copied().unwrap_or(0)))
        .collect();
    let mut cands = Vec::new();
    let mut pre = vec![None; range.len()];
    if backend.lookup_batch(&keys, &mut cands).is_ok() {
        for (c, &j) in cands.iter_mut().zip(&idx) {
            pre[j] = reader.choose_from(c, cfg.local_node);
        }
    } else {
        *failed = true;
    }
    let t2 = Instant::now();
    ns[0] += (t1 - t0).as_nanos() as u64;
    ns[1] += (t2 - t1).as_nanos() as u64;
    pre
}

#[allow(clippy::too_many_arguments)]
fn dedup_block(
    w: &mut Worker,
    b: usize,
    dump: &DumpImage,
    registry: &Registry,
    bases: &dyn BasePages,
    positions: &[u64],
    cfg: &DedupConfig,
    hint: Option<&crate::template::TemplateHint>,
) -> Result<BlockOut, DedupError> {
    let n = dump.n_pages() as usize;
    let range = b * BLOCK_PAGES..((b + 1) * BLOCK_PAGES).min(n);
    let mut out = BlockOut {
        entries: Vec::with_capacity(range.len()),
        ..Default::default()
    };
    w.raw.clear();
    let reader = registry.reader();
    let start = range.start;
    let pre = match registry.backend() {
        None => None,
        Some(b) => Some(prefetch(
            w,
            range.clone(),
            dump,
            &reader,
            &**b,
            positions,
            cfg,
            &mut out.ns,
            &mut out.lookup_failed,
        )),
    };
    let zero_page = [0u8; crate::PAGE];
    let radius = cfg.codec.window_radius;
    let mut prev: Option<PageRef> = None;
    let mut clock = Instant::now();
    let mut lap = |ns: &mut [u64; 4], phase: usize| {
        let now = Instant::now();
        ns[phase] += (now - clock).as_nanos() as u64;
        clock = now;
    };
    for i in range {
        let page = i as u64;
        let raw = dump.page(page).unwrap_or(&zero_page);
        let checksum = xxh3_64(raw);
        let entry = |kind: PageKind, rebased: bool, base: Option<PageRef>, len: usize| {
            (
                PageEntry {
                    kind,
                    rebased,
                    base_slot: 0,
                    base_page: base.map_or(0, |r| r.page),
                    len: len as u32,
                    checksum,
                },
                base.map(|r| r.base),
            )
        };
        if crate::fingerprint::is_zero(raw) {
            // The chain of predictions goes on over zero pages.
            prev = prev.map(|p| PageRef {
                base: p.base,
                page: p.page + 1,
            });
            out.entries.push(entry(PageKind::Zero, false, None, 0));
            lap(&mut out.ns, 0);
            continue;
        }
        // Template-born sandbox (see `template.rs`): the raw page against the template's raw
        // page at the same address, before anything else.
        if let Some(r) = hint.and_then(|h| h.at(i)) {
            let (win, bo) = fetch(bases, r, radius, page)?;
            let wa = (radius > 0).then_some((&win[..], bo));
            w.data.clear();
            let limit = hint.map_or(0, |h| h.accept_below);
            if let Some(kind) =
                w.enc
                    .encode_cheap(raw, base_page(&win, bo), wa, &cfg.codec, limit, &mut w.data)
            {
                if let Some(h) = hint {
                    h.hit();
                }
                prev = Some(r);
                out.kind_bytes[kind as usize] += w.data.len() as u64;
                if kind.in_block() {
                    w.raw.extend_from_slice(&w.data);
                } else {
                    out.blob.extend_from_slice(&w.data);
                }
                out.entries.push(entry(kind, false, Some(r), w.data.len()));
                lap(&mut out.ns, 2);
                continue;
            }
        }
        // Canonical (rebased) page; a page without pointers is left as is (no un-rebasing at
        // rebuild).
        let rebased = cfg.rebase
            && dump.locate(page).is_some_and(|(p, _)| {
                dump.procs[p]
                    .table
                    .rebase_with(raw, &mut w.canon, &mut w.rcache)
                    .is_some_and(|n| n > 0)
            });
        let target: &crate::Page = if rebased { &w.canon } else { raw };
        let hash = if rebased { xxh3_64(target) } else { checksum };
        w.data.clear();
        // Exact duplicates need no sampled chunks.
        let exact = match &pre {
            None => reader.exact(hash),
            Some(pre) => match pre[i - start] {
                Some(Choice::Exact(r)) => Some(r),
                _ => None,
            },
        };
        // Sequential prediction: the base page after the previous page's.
        let mut predicted = None;
        let mut tried = None;
        if exact.is_none()
            && cfg.predict_below > 0
            && let Some(p) = prev
            && u64::from(p.page) + 1 < bases.n_pages(p.base).unwrap_or(0)
        {
            let r = PageRef {
                base: p.base,
                page: p.page + 1,
            };
            tried = Some(r);
            let (win, bo) = fetch(bases, r, radius, page)?;
            let wa = (radius > 0).then_some((&win[..], bo));
            predicted = w
                .enc
                .encode_cheap(
                    target,
                    base_page(&win, bo),
                    wa,
                    &cfg.codec,
                    cfg.predict_below,
                    &mut w.data,
                )
                .map(|k| (k, Some(r)));
        }
        let (kind, base) = if let Some(p) = predicted {
            lap(&mut out.ns, 2);
            out.predicted += 1;
            p
        } else {
            let choice = match exact {
                Some(r) => Some(Choice::Exact(r)),
                None => match &pre {
                    None => {
                        let fp = sample(target, &cfg.fingerprint, hash);
                        lap(&mut out.ns, 0);
                        out.looked_up += 1;
                        reader.choose(&fp, positions.get(i).copied().unwrap_or(0), cfg.local_node)
                    }
                    Some(pre) => {
                        out.looked_up += 1;
                        pre[i - start]
                    }
                },
            };
            lap(&mut out.ns, 1);
            match choice {
                None => (
                    w.enc.encode(target, None, None, &cfg.codec, &mut w.data),
                    None,
                ),
                Some(c) => {
                    // A candidate the prediction already failed with fails again.
                    let failed = |r: PageRef| {
                        tried == Some(r)
                            && cfg.predict_below >= cfg.codec.patch_threshold.min(crate::PAGE)
                            && !cfg.codec.zstd_ref
                    };
                    let first = c.page();
                    let (mut kind, mut used, mut have) = (PageKind::Raw, first, false);
                    if !failed(first) {
                        let (win, bo) = fetch(bases, first, radius, page)?;
                        let wa = (radius > 0).then_some((&win[..], bo));
                        kind = w.enc.encode(
                            target,
                            Some(base_page(&win, bo)),
                            wa,
                            &cfg.codec,
                            &mut w.data,
                        );
                        have = true;
                    }
                    if let Choice::Similar {
                        second: Some(s), ..
                    } = c
                        && cfg.second_candidate_above > 0
                        && (!have
                            || w.data.len() > cfg.second_candidate_above
                            || !kind.needs_base())
                        && !failed(s)
                    {
                        let (win2, bo2) = fetch(bases, s, radius, page)?;
                        let wa2 = (radius > 0).then_some((&win2[..], bo2));
                        let mut d2 = Vec::new();
                        let k2 = w.enc.encode(
                            target,
                            Some(base_page(&win2, bo2)),
                            wa2,
                            &cfg.codec,
                            &mut d2,
                        );
                        if !have || d2.len() < w.data.len() {
                            w.data = d2;
                            kind = k2;
                            used = s;
                            have = true;
                        }
                    }
                    if !have {
                        w.data.clear();
                        kind = w.enc.encode(target, None, None, &cfg.codec, &mut w.data);
                    }
                    (kind, kind.needs_base().then_some(used))
                }
            }
        };
        // The chain of predictions goes on over pages without a base.
        prev = base.or(prev.map(|p| PageRef {
            base: p.base,
            page: p.page + 1,
        }));
        out.kind_bytes[kind as usize] += w.data.len() as u64;
        if kind.in_block() {
            w.raw.extend_from_slice(&w.data);
        } else {
            out.blob.extend_from_slice(&w.data);
        }
        out.entries.push(entry(kind, rebased, base, w.data.len()));
        lap(&mut out.ns, 2);
    }
    drop(reader);
    if !w.raw.is_empty() {
        out.block = w.zc.compress(&w.raw).unwrap_or_default();
    }
    lap(&mut out.ns, 3);
    Ok(out)
}

/// Deduplicates a dump against the registry's bases and builds the store (not written: see
/// [`DedupStore::write`]).
///
/// One pass per batch of [`BLOCK_PAGES`] pages, the batches in parallel on rayon's pool: each
/// page is checked for zeros, rebased, looked up as an exact duplicate (whole-page hash), else
/// fingerprinted and matched by sampled chunks, encoded against its base page, and the batch's
/// block-stored data compressed, so every page is read once while it is in cache.
///
/// With a registry backend ([`Registry::with_backend`]), each batch first fingerprints all its
/// non-zero pages and looks them up in one batched request (one network round trip per batch
/// instead of one per page), then runs the same pass with those answers: the store is the one
/// the in-memory index gives. A batch whose lookup fails is stored without bases (counted in
/// [`DedupStats::lookup_failures`]): the sandbox stays restorable while the backend is down.
pub fn dedup(
    dump: &DumpImage,
    registry: &Registry,
    bases: &dyn BasePages,
    cfg: &DedupConfig,
) -> Result<(DedupStore, DedupStats), DedupError> {
    dedup_hinted(dump, registry, bases, cfg, None)
}

/// [`dedup`] with an optional template hint (see [`crate::template`]).
pub(crate) fn dedup_hinted(
    dump: &DumpImage,
    registry: &Registry,
    bases: &dyn BasePages,
    cfg: &DedupConfig,
    hint: Option<&crate::template::TemplateHint>,
) -> Result<(DedupStore, DedupStats), DedupError> {
    let n = dump.n_pages();
    let positions: &[u64] = if cfg.positional {
        dump.positions()
    } else {
        &[]
    };
    let n_blocks = (n as usize).div_ceil(BLOCK_PAGES);
    let outs: Vec<BlockOut> = (0..n_blocks)
        .into_par_iter()
        .map_init(
            || Worker::new(cfg.block_level),
            |w, b| dedup_block(w, b, dump, registry, bases, positions, cfg, hint),
        )
        .collect::<Result<_, _>>()?;

    let threads = rayon::current_num_threads().max(1) as u64;
    let mut ns = [0u64; 4];
    for o in &outs {
        for (a, b) in ns.iter_mut().zip(o.ns) {
            *a += b;
        }
    }
    let span = |x: u64| Duration::from_nanos(x / threads);
    let mut stats = DedupStats {
        pages: n,
        fingerprint: span(ns[0]),
        lookup: span(ns[1]),
        encode: span(ns[2]),
        compress: span(ns[3]),
        ..Default::default()
    };
    let mut slots: HashMap<BaseId, u16> = HashMap::new();
    let mut store = DedupStore {
        images: dump.dir.files.clone(),
        procs: dump
            .procs
            .iter()
            .map(|p| StoredProcess {
                pid: p.pid,
                pages_file: p.pages_file.clone(),
                n_pages: p.n_pages,
            })
            .collect(),
        window_radius: cfg.codec.window_radius,
        ..Default::default()
    };
    store.pages.reserve(n as usize);
    store.blob.reserve(outs.iter().map(|o| o.blob.len()).sum());
    let mut kinds = [0u64; 9];
    let mut kind_bytes = [0f64; 9];
    let mut lookup_ns = 0u64;
    for o in outs {
        stats.predicted += o.predicted;
        stats.looked_up += o.looked_up;
        stats.lookup_failures += u64::from(o.lookup_failed);
        lookup_ns += o.ns[1];
        let mut block_raw = [0u64; 9];
        for (mut e, base) in o.entries {
            if let Some(id) = base {
                let next = store.bases.len();
                if next >= usize::from(u16::MAX) && !slots.contains_key(&id) {
                    return Err(DedupError::TooManyBases);
                }
                e.base_slot = *slots.entry(id).or_insert_with(|| {
                    store.bases.push(id);
                    next as u16
                });
                *stats.per_base.entry(id.0).or_default() += 1;
            }
            kinds[e.kind as usize] += 1;
            match e.kind {
                PageKind::Zero => stats.zero += 1,
                PageKind::Same => stats.exact += 1,
                PageKind::Sparse | PageKind::ZstdRef | PageKind::ZstdWin | PageKind::Lz => {
                    stats.patched += 1
                }
                PageKind::Raw | PageKind::Lz4 | PageKind::Zstd => stats.standalone += 1,
            }
            stats.rebased += u64::from(e.rebased);
            if e.kind.in_block() {
                block_raw[e.kind as usize] += u64::from(e.len);
            }
            store.pages.push(e);
        }
        // Attribute the block's compressed bytes to its kinds in proportion to their raw data.
        let raw_total = block_raw.iter().sum::<u64>().max(1) as f64;
        for k in 0..9 {
            if KINDS[k].in_block() {
                kind_bytes[k] += o.block.len() as f64 * block_raw[k] as f64 / raw_total;
            } else {
                kind_bytes[k] += o.kind_bytes[k] as f64;
            }
        }
        store.blob.extend_from_slice(&o.blob);
        store.blocks.push(o.block);
    }
    stats.lookup_per_page = Duration::from_nanos(lookup_ns / stats.looked_up.max(1));
    for (k, kind) in KINDS.iter().enumerate() {
        if kinds[k] == 0 {
            continue;
        }
        let name = format!("{kind:?}");
        stats.kinds.insert(name.clone(), kinds[k]);
        stats.kind_bytes.insert(name, kind_bytes[k].round() as u64);
        if matches!(
            kind,
            PageKind::Sparse | PageKind::ZstdRef | PageKind::ZstdWin | PageKind::Lz
        ) {
            stats.patch_bytes += kind_bytes[k].round() as u64;
        }
    }
    Ok((store, stats))
}
