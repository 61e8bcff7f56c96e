//! Library-level evaluation behind `medes bench dedup --json`: register one base per function,
//! deduplicate further sandboxes, write and reload their stores, rebuild and verify them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::PAGE;
use crate::dedup::{DedupConfig, DedupError, dedup, register_base};
use crate::fingerprint::fingerprint;
use crate::image::{DumpImage, LocalBases, OpenDumpError};
use crate::rebuild::{RebuildError, rebuild_into};
use crate::registry::{AddBaseError, BaseId, BaseMeta, Registry, RegistryStats};
use crate::store::{DedupStore, LoadStoreError, WriteStoreError};

const MB: f64 = 1e6;

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Dedup settings.
    pub dedup: DedupConfig,
    /// Whether the dumps were taken with ASLR on (reported, not acted on).
    pub aslr: bool,
    /// Where stores are written (each deleted after its rebuild).
    pub store_dir: PathBuf,
    /// Precompute rebased base pages (faster rebuild, one more copy of each base).
    pub materialize_bases: bool,
    /// Extra rebuilds per sandbox to measure the rebuild's CPU time (0: none). On a shared
    /// machine wall time mostly measures the neighbours; CPU time does not.
    pub rebuild_cpu_repeats: u32,
}

/// Figures for one function (means over its deduplicated sandboxes; MB = 10^6 bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionReport {
    /// Function name.
    pub name: String,
    /// Deduplicated sandboxes measured.
    pub sandboxes: u64,
    /// Pages per sandbox.
    pub pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages identical to their base page.
    pub exact: u64,
    /// Pages stored as patches.
    pub patched: u64,
    /// Pages stored on their own.
    pub standalone: u64,
    /// CRIU page image size.
    pub image_mb: f64,
    /// Everything stored for the sandbox (the store file).
    pub stored_mb: f64,
    /// 100 × (1 − stored / image).
    pub savings_pct: f64,
    /// The savings had pages without a usable base been stored verbatim rather than
    /// compressed in blocks (the worth of compressing them).
    pub savings_raw_standalone_pct: f64,
    /// The function's base image (pages), not counted in `stored_mb`.
    pub base_mb: f64,
    /// Mean patch size.
    pub avg_patch_bytes: f64,
    /// Of the pages stored against a base page, the share whose base is another function's.
    pub cross_function_base_pct: f64,
    /// Fingerprinting phase (zero check, checksum, rebasing, whole-page hash, chunk sampling)
    /// wall time per page of the sandbox (parallel; exact and predicted pages skip sampling).
    pub fingerprint_us_per_page: f64,
    /// One page's registry lookup with the full registry (its chunks and the base choice),
    /// one thread, on every 8th non-zero page of the sandbox (best of 3 passes).
    pub lookup_us_per_page: f64,
    /// Fingerprinting (zero check, whole-page hash, chunk sampling) of one core, 10^9 bytes per
    /// second, on every 8th page (best of 3 passes).
    pub fingerprint_gb_per_s_per_core: f64,
    /// Share of the pages looked up in the registry (the others were zero, exact duplicates or
    /// predicted).
    pub looked_up_pct: f64,
    /// The whole dedup operation (fingerprint, lookup, encode, write store).
    pub dedup_ms: f64,
    /// Rebuild of all pages (verified), from the reloaded store.
    pub rebuild_ms: f64,
    /// Pages rebuilt per second, 10^9 bytes.
    pub rebuild_gb_per_s: f64,
    /// CPU time (all threads) of the dedup operation (10 ms resolution).
    pub dedup_cpu_ms: f64,
    /// CPU time (all threads) per rebuild, if measured (`rebuild_cpu_repeats` > 0).
    pub rebuild_cpu_ms: Option<f64>,
    /// Rebuild throughput on this machine's 2 cores if they were not shared: bytes /
    /// (CPU time / 2), 10^9 bytes per second.
    pub rebuild_cpu_gb_per_s_2_cores: Option<f64>,
    /// Pages per stored kind (per sandbox).
    pub kind_pages: BTreeMap<String, u64>,
    /// Stored bytes per kind (per sandbox).
    pub kind_bytes: BTreeMap<String, u64>,
}

/// The evaluation's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupReport {
    /// Dumps taken with ASLR on.
    pub aslr: bool,
    /// Unweighted mean of the functions' `savings_pct`.
    pub mean_savings_pct: f64,
    /// Per function.
    pub functions: Vec<FunctionReport>,
    /// Registry size with all bases.
    pub registry: RegistryStats,
    /// The settings used.
    pub config: DedupConfig,
}

/// Error of an evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A dump could not be opened.
    #[error("opening dump {path:?}")]
    Open {
        /// The dump directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: OpenDumpError,
    },
    /// A base could not be registered.
    #[error("registering base {path:?}")]
    Register {
        /// The dump directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: AddBaseError,
    },
    /// Dedup failed.
    #[error("deduplicating {path:?}")]
    Dedup {
        /// The dump directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: DedupError,
    },
    /// Writing a store failed.
    #[error("writing store")]
    Write(#[from] WriteStoreError),
    /// Loading a store failed.
    #[error("loading store")]
    Load(#[from] LoadStoreError),
    /// Rebuild failed.
    #[error("rebuilding {path:?}")]
    Rebuild {
        /// The dump directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: RebuildError,
    },
    /// A rebuilt page differs from the original (cannot happen unless checksums collide).
    #[error("{path:?}: rebuilt page {page} differs from the original")]
    Mismatch {
        /// The dump directory.
        path: PathBuf,
        /// The page.
        page: u64,
    },
}

#[derive(Default)]
struct Acc {
    n: u64,
    pages: u64,
    zero: u64,
    exact: u64,
    patched: u64,
    standalone: u64,
    image: u64,
    stored: u64,
    patch_bytes: u64,
    based: u64,
    cross: u64,
    fp_us: f64,
    lookup_us: f64,
    fp_gbps: f64,
    looked_up: u64,
    dedup_ms: f64,
    rebuild_ms: f64,
    rebuild_cpu_ms: f64,
    dedup_cpu_ms: f64,
    kind_pages: BTreeMap<String, u64>,
    kind_bytes: BTreeMap<String, u64>,
}

/// User + system CPU time of this process, from `/proc/self/stat` (0 if unavailable).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 after the ')'.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// Single-thread fingerprint throughput (GB/s) and per-page lookup time (µs) on every 8th page
/// of `dump` (rebased as the dedup sees them), best of 3 passes: robust to a loaded machine,
/// unlike the phase times of a parallel dedup.
fn single_thread_speeds(dump: &DumpImage, registry: &Registry, cfg: &DedupConfig) -> (f64, f64) {
    let pages: Vec<crate::Page> = (0..dump.n_pages())
        .step_by(8)
        .filter_map(|i| dump.canonical_page(i, cfg.rebase).map(|(p, _)| *p))
        .collect();
    let mut fps = Vec::with_capacity(pages.len());
    let mut fp_best = f64::MAX;
    for _ in 0..3 {
        fps.clear();
        let t = Instant::now();
        fps.extend(pages.iter().map(|p| fingerprint(p, &cfg.fingerprint)));
        fp_best = fp_best.min(t.elapsed().as_secs_f64());
    }
    fps.retain(|f| !f.zero);
    let mut lookup_best = f64::MAX;
    for _ in 0..3 {
        let reader = registry.reader();
        let t = Instant::now();
        for f in &fps {
            std::hint::black_box(reader.choose(f, 0, cfg.local_node));
        }
        lookup_best = lookup_best.min(t.elapsed().as_secs_f64());
    }
    let gbps = if fp_best > 0.0 {
        (pages.len() * PAGE) as f64 / fp_best / 1e9
    } else {
        0.0
    };
    (gbps, lookup_best * 1e6 / fps.len().max(1) as f64)
}

fn open(path: &Path) -> Result<DumpImage, EvalError> {
    DumpImage::open(path).map_err(|source| EvalError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Registers `bases` (one per function, ids in order), deduplicates every target against all of
/// them, writes and reloads each store, rebuilds and compares every page with the original.
pub fn evaluate(
    bases: &[(String, PathBuf)],
    targets: &[(String, PathBuf)],
    cfg: &EvalConfig,
) -> Result<DedupReport, EvalError> {
    let dcfg = &cfg.dedup;
    let registry = Registry::new();
    let mut local = LocalBases::new(dcfg.rebase);
    let mut base_fn = BTreeMap::new();
    let mut base_mb = BTreeMap::new();
    for (i, (name, path)) in bases.iter().enumerate() {
        let id = BaseId(i as u32);
        let dump = open(path)?;
        let meta = BaseMeta {
            function: name.clone(),
            node: dcfg.local_node,
        };
        register_base(&registry, id, meta, &dump, dcfg).map_err(|source| EvalError::Register {
            path: path.clone(),
            source,
        })?;
        base_fn.insert(id.0, name.clone());
        base_mb.insert(name.clone(), dump.pages_bytes() as f64 / MB);
        local.insert(id, dump);
    }
    if cfg.materialize_bases {
        local.materialize();
    }
    let mut accs: BTreeMap<String, Acc> = BTreeMap::new();
    let mut order = Vec::new();
    for (k, (name, path)) in targets.iter().enumerate() {
        let dump = open(path)?;
        let store_path = cfg.store_dir.join(format!("eval-{k}.medes"));
        let c0 = process_cpu_seconds();
        let t0 = Instant::now();
        let (store, stats) =
            dedup(&dump, &registry, &local, dcfg).map_err(|source| EvalError::Dedup {
                path: path.clone(),
                source,
            })?;
        let stored = store.write(&store_path)?;
        let dedup_ms = t0.elapsed().as_secs_f64() * 1e3;
        let dedup_cpu_ms = (process_cpu_seconds() - c0) * 1e3;
        let (fp_gbps, lookup_us) = single_thread_speeds(&dump, &registry, dcfg);
        drop(store);
        let store = DedupStore::load(&store_path)?;
        let _ = std::fs::remove_file(&store_path);
        let mut out = vec![1u8; store.n_pages() as usize * PAGE];
        let t1 = Instant::now();
        rebuild_into(&store, &local, &mut out).map_err(|source| EvalError::Rebuild {
            path: path.clone(),
            source,
        })?;
        let rebuild_ms = t1.elapsed().as_secs_f64() * 1e3;
        let mut rebuild_cpu_ms = 0.0;
        if cfg.rebuild_cpu_repeats > 0 {
            let c0 = process_cpu_seconds();
            for _ in 0..cfg.rebuild_cpu_repeats {
                rebuild_into(&store, &local, &mut out).map_err(|source| EvalError::Rebuild {
                    path: path.clone(),
                    source,
                })?;
            }
            let c1 = process_cpu_seconds();
            rebuild_cpu_ms = (c1 - c0) * 1e3 / f64::from(cfg.rebuild_cpu_repeats);
        }
        for i in 0..dump.n_pages() {
            let o = i as usize * PAGE;
            if dump.page(i).map(|p| &p[..]) != Some(&out[o..o + PAGE]) {
                return Err(EvalError::Mismatch {
                    path: path.clone(),
                    page: i,
                });
            }
        }
        if !accs.contains_key(name) {
            order.push(name.clone());
        }
        let a = accs.entry(name.clone()).or_default();
        let pages = stats.pages.max(1) as f64;
        a.n += 1;
        a.pages += stats.pages;
        a.zero += stats.zero;
        a.exact += stats.exact;
        a.patched += stats.patched;
        a.standalone += stats.standalone;
        a.image += dump.pages_bytes();
        a.stored += stored;
        a.patch_bytes += stats.patch_bytes;
        for (b, c) in &stats.per_base {
            a.based += c;
            if base_fn.get(b) != Some(name) {
                a.cross += c;
            }
        }
        for (k, v) in &stats.kinds {
            *a.kind_pages.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &stats.kind_bytes {
            *a.kind_bytes.entry(k.clone()).or_default() += v;
        }
        a.fp_us += stats.fingerprint.as_secs_f64() * 1e6 / pages;
        a.lookup_us += lookup_us;
        a.fp_gbps += fp_gbps;
        a.looked_up += stats.looked_up;
        a.dedup_ms += dedup_ms;
        a.dedup_cpu_ms += dedup_cpu_ms;
        a.rebuild_ms += rebuild_ms;
        a.rebuild_cpu_ms += rebuild_cpu_ms;
    }
    let functions: Vec<FunctionReport> = order
        .iter()
        .map(|name| {
            let a = &accs[name];
            let n = a.n.max(1) as f64;
            let per = |x: u64| (x as f64 / n).round() as u64;
            let image_mb = a.image as f64 / n / MB;
            let stored_mb = a.stored as f64 / n / MB;
            FunctionReport {
                name: name.clone(),
                sandboxes: a.n,
                pages: per(a.pages),
                zero: per(a.zero),
                exact: per(a.exact),
                patched: per(a.patched),
                standalone: per(a.standalone),
                image_mb,
                stored_mb,
                savings_pct: if image_mb > 0.0 {
                    100.0 * (1.0 - stored_mb / image_mb)
                } else {
                    0.0
                },
                savings_raw_standalone_pct: if image_mb > 0.0 {
                    let raw = |m: &BTreeMap<String, u64>| m.get("Raw").copied().unwrap_or(0);
                    let verbatim = (raw(&a.kind_pages) * PAGE as u64) as f64 / n / MB;
                    let compressed = raw(&a.kind_bytes) as f64 / n / MB;
                    100.0 * (1.0 - (stored_mb - compressed + verbatim) / image_mb)
                } else {
                    0.0
                },
                base_mb: base_mb.get(name).copied().unwrap_or(0.0),
                avg_patch_bytes: a.patch_bytes as f64 / a.patched.max(1) as f64,
                cross_function_base_pct: 100.0 * a.cross as f64 / a.based.max(1) as f64,
                fingerprint_us_per_page: a.fp_us / n,
                lookup_us_per_page: a.lookup_us / n,
                fingerprint_gb_per_s_per_core: a.fp_gbps / n,
                looked_up_pct: 100.0 * a.looked_up as f64 / a.pages.max(1) as f64,
                dedup_ms: a.dedup_ms / n,
                rebuild_ms: a.rebuild_ms / n,
                rebuild_gb_per_s: if a.rebuild_ms > 0.0 {
                    a.image as f64 / (a.rebuild_ms / 1e3) / 1e9
                } else {
                    0.0
                },
                dedup_cpu_ms: a.dedup_cpu_ms / n,
                rebuild_cpu_ms: (cfg.rebuild_cpu_repeats > 0).then(|| a.rebuild_cpu_ms / n),
                rebuild_cpu_gb_per_s_2_cores: (cfg.rebuild_cpu_repeats > 0
                    && a.rebuild_cpu_ms > 0.0)
                    .then(|| a.image as f64 / (a.rebuild_cpu_ms / 1e3 / 2.0) / 1e9),
                kind_pages: a
                    .kind_pages
                    .iter()
                    .map(|(k, v)| (k.clone(), per(*v)))
                    .collect(),
                kind_bytes: a
                    .kind_bytes
                    .iter()
                    .map(|(k, v)| (k.clone(), per(*v)))
                    .collect(),
            }
        })
        .collect();
    let mean_savings_pct = if functions.is_empty() {
        0.0
    } else {
        functions.iter().map(|f| f.savings_pct).sum::<f64>() / functions.len() as f64
    };
    Ok(DedupReport {
        aslr: cfg.aslr,
        mean_savings_pct,
        functions,
        registry: registry.stats(),
        config: *dcfg,
    })
}
