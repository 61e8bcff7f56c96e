//! The dedup operation: fingerprint, choose bases, encode, build the store; and base registration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{CodecConfig, Encoder, PageKind};
use crate::fingerprint::{FingerprintConfig, PageFingerprint, fingerprint};
use crate::image::{BasePageError, BasePages, DumpImage};
use crate::registry::{AddBaseError, BaseId, BaseMeta, Choice, NodeId, PageRef, Registry};
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
    /// Try the runner-up base page when the first gives a patch larger than this (0: never).
    pub second_candidate_above: usize,
    /// The node the dedup runs on (base choice prefers local bases on ties).
    pub local_node: NodeId,
    /// zstd level of the store's blocks (sparse diffs and raw pages of 256-page batches).
    pub block_level: i32,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            fingerprint: FingerprintConfig {
                k: 16,
                ..FingerprintConfig::default()
            },
            codec: CodecConfig::default(),
            rebase: true,
            positional: false,
            second_candidate_above: 256,
            local_node: NodeId(0),
            block_level: 3,
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
    /// Time fingerprinting (including rebasing).
    pub fingerprint: Duration,
    /// Time choosing base pages.
    pub lookup: Duration,
    /// Time encoding.
    pub encode: Duration,
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

struct Encoded {
    kind: PageKind,
    base: Option<PageRef>,
    data: Vec<u8>,
    checksum: u64,
}

/// Deduplicates a dump against the registry's bases: fingerprint, choose a base page per page,
/// encode, and build the store (not written: see [`DedupStore::write`]).
pub fn dedup(
    dump: &DumpImage,
    registry: &Registry,
    bases: &dyn BasePages,
    cfg: &DedupConfig,
) -> Result<(DedupStore, DedupStats), DedupError> {
    let n = dump.n_pages();
    let t0 = Instant::now();
    // Canonical (rebased) pages, computed once for fingerprinting and encoding.
    let mut canon = vec![0u8; n as usize * crate::PAGE];
    let (fps, rebased): (Vec<PageFingerprint>, Vec<bool>) = canon
        .as_chunks_mut::<{ crate::PAGE }>()
        .0
        .par_iter_mut()
        .enumerate()
        .map(|(i, dst)| {
            let raw = dump.page(i as u64).unwrap_or(&[0u8; crate::PAGE]);
            let r = cfg.rebase
                && dump
                    .locate(i as u64)
                    // A page without pointers is left as is: no un-rebasing at rebuild.
                    .is_some_and(|(p, _)| {
                        dump.procs[p].table.rebase(raw, dst).is_some_and(|n| n > 0)
                    });
            if !r {
                dst.copy_from_slice(raw);
            }
            (fingerprint(dst, &cfg.fingerprint), r)
        })
        .unzip();
    let t1 = Instant::now();
    let positions: &[u64] = if cfg.positional {
        dump.positions()
    } else {
        &[]
    };
    let choices = registry.choose_batch(&fps, positions, cfg.local_node);
    let t2 = Instant::now();
    let encoded: Result<Vec<Encoded>, DedupError> = (0..n)
        .into_par_iter()
        .map_init(Encoder::default, |enc, i| {
            let raw = dump.page(i).unwrap_or(&[0u8; crate::PAGE]);
            let checksum = xxh3_64(raw);
            let iu = i as usize;
            if fps[iu].zero {
                return Ok(Encoded {
                    kind: PageKind::Zero,
                    base: None,
                    data: Vec::new(),
                    checksum,
                });
            }
            let target: &crate::Page = canon[iu * crate::PAGE..(iu + 1) * crate::PAGE]
                .try_into()
                .unwrap_or(raw);
            let fetch = |r: PageRef| {
                bases
                    .page(r.base, u64::from(r.page))
                    .map_err(|source| DedupError::BasePage { page: i, source })
            };
            let radius = cfg.codec.window_radius;
            let fetch_window = |r: PageRef| {
                if radius == 0 || !cfg.codec.zstd_ref {
                    return Ok(None);
                }
                bases
                    .window(r.base, u64::from(r.page), radius)
                    .map(Some)
                    .map_err(|source| DedupError::BasePage { page: i, source })
            };
            let mut data = Vec::new();
            let (kind, base) = match choices[iu] {
                None => (enc.encode(target, None, None, &cfg.codec, &mut data), None),
                Some(c) => {
                    let r = c.page();
                    let bp = fetch(r)?;
                    let w = fetch_window(r)?;
                    let mut kind =
                        enc.encode(target, Some(&bp), w.as_deref(), &cfg.codec, &mut data);
                    let mut used = r;
                    if let Choice::Similar {
                        second: Some(s), ..
                    } = c
                        && cfg.second_candidate_above > 0
                        && (data.len() > cfg.second_candidate_above || !kind.needs_base())
                    {
                        let bp2 = fetch(s)?;
                        let w2 = fetch_window(s)?;
                        let mut d2 = Vec::new();
                        let k2 = enc.encode(target, Some(&bp2), w2.as_deref(), &cfg.codec, &mut d2);
                        if d2.len() < data.len() {
                            data = d2;
                            kind = k2;
                            used = s;
                        }
                    }
                    (kind, kind.needs_base().then_some(used))
                }
            };
            Ok(Encoded {
                kind,
                base,
                data,
                checksum,
            })
        })
        .collect();
    let encoded = encoded?;
    let t3 = Instant::now();

    let mut stats = DedupStats {
        pages: n,
        fingerprint: t1 - t0,
        lookup: t2 - t1,
        encode: t3 - t2,
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
    store.pages.reserve(encoded.len());
    let mut datas = Vec::with_capacity(encoded.len());
    for (i, e) in encoded.into_iter().enumerate() {
        let (base_slot, base_page) = match e.base {
            Some(r) => {
                let next = store.bases.len();
                let slot = *slots.entry(r.base).or_insert_with(|| {
                    store.bases.push(r.base);
                    next as u16
                });
                if store.bases.len() > usize::from(u16::MAX) {
                    return Err(DedupError::TooManyBases);
                }
                *stats.per_base.entry(r.base.0).or_default() += 1;
                (slot, r.page)
            }
            None => (0, 0),
        };
        match e.kind {
            PageKind::Zero => stats.zero += 1,
            PageKind::Same => stats.exact += 1,
            PageKind::Sparse | PageKind::ZstdRef | PageKind::ZstdWin => {
                stats.patched += 1;
                if !e.kind.in_block() {
                    stats.patch_bytes += e.data.len() as u64;
                }
            }
            PageKind::Raw | PageKind::Lz4 | PageKind::Zstd => stats.standalone += 1,
        }
        *stats.kinds.entry(format!("{:?}", e.kind)).or_default() += 1;
        if !e.kind.in_block() {
            *stats.kind_bytes.entry(format!("{:?}", e.kind)).or_default() += e.data.len() as u64;
        }
        let r = rebased[i] && e.kind != PageKind::Zero;
        stats.rebased += u64::from(r);
        store.pages.push(PageEntry {
            kind: e.kind,
            rebased: r,
            base_slot,
            base_page,
            len: e.data.len() as u32,
            checksum: e.checksum,
        });
        if !e.kind.in_block() {
            store.blob.extend_from_slice(&e.data);
        }
        datas.push(e.data);
    }
    store.blocks = DedupStore::build_blocks(&store.pages, &datas, cfg.block_level);
    // Attribute each block's compressed bytes to its pages in proportion to their raw data.
    for (b, block) in store.blocks.iter().enumerate() {
        let range = b * BLOCK_PAGES..((b + 1) * BLOCK_PAGES).min(store.pages.len());
        let raw = store.block_len(b).max(1) as f64;
        for (p, d) in store.pages[range.clone()].iter().zip(&datas[range]) {
            if p.kind.in_block() {
                let share = (block.len() as f64 * d.len() as f64 / raw).round() as u64;
                *stats.kind_bytes.entry(format!("{:?}", p.kind)).or_default() += share;
                if p.kind == PageKind::Sparse {
                    stats.patch_bytes += share;
                }
            }
        }
    }
    Ok((store, stats))
}
