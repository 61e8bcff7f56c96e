//! Hot loops on real pages: fingerprint, registry lookup, encode/decode, rebuild.
//!
//! Uses the dumps in `MEDES_BENCH_BASE` and `MEDES_BENCH_TARGET` (CRIU image directories of two
//! sandboxes of one function, e.g. from `scripts/make-dumps.sh`), default
//! `/dev/shm/dumps/aslr/numpy-{0,1}`.
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medes_dedup::*;

fn dumps() -> Option<(DumpImage, DumpImage)> {
    let base = std::env::var("MEDES_BENCH_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/dev/shm/dumps/aslr/numpy-0".into());
    let target = std::env::var("MEDES_BENCH_TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/dev/shm/dumps/aslr/numpy-1".into());
    match (DumpImage::open(&base), DumpImage::open(&target)) {
        (Ok(b), Ok(t)) => Some((b, t)),
        _ => {
            eprintln!("no dumps at {base:?} / {target:?}: run scripts/make-dumps.sh first");
            None
        }
    }
}

fn benches(c: &mut Criterion) {
    let Some((base, target)) = dumps() else {
        return;
    };
    let cfg = DedupConfig::default();
    let n = target.n_pages();
    let sample: Vec<u64> = (0..n).step_by(7).collect();

    let mut g = c.benchmark_group("per_page");
    g.throughput(Throughput::Bytes((sample.len() * PAGE) as u64));
    g.bench_function("fingerprint", |b| {
        b.iter(|| {
            for &i in &sample {
                black_box(fingerprint(target.page(i).unwrap(), &cfg.fingerprint));
            }
        })
    });
    g.bench_function("rebase", |b| {
        let t = &target.procs[0].table;
        let mut out = [0u8; PAGE];
        b.iter(|| {
            for &i in &sample {
                black_box(t.rebase(target.page(i).unwrap(), &mut out));
            }
        })
    });
    let registry = Registry::new();
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(0), meta, &base, &cfg).unwrap();
    let (fps, _) = fingerprint_dump(&target, &cfg.fingerprint, cfg.rebase);
    let sfps: Vec<_> = sample.iter().map(|&i| fps[i as usize]).collect();
    g.bench_function("lookup", |b| {
        b.iter(|| black_box(registry.choose_batch(&sfps, &[], NodeId(0))))
    });
    let mut bases = LocalBases::new(cfg.rebase);
    bases.insert(BaseId(0), base);
    bases.materialize();
    let choices = registry.choose_batch(&fps, target.positions(), NodeId(0));
    let radius = cfg.codec.window_radius;
    // Similar pages with their base pages' windows (canonical), every fifth.
    let pairs: Vec<(Page, Vec<u8>, usize)> = (0..n)
        .filter_map(|i| {
            let Some(Choice::Similar { best, .. }) = choices[i as usize] else {
                return None;
            };
            let (t, _) = target.canonical_page(i, true)?;
            let idx = u64::from(best.page);
            let (start, _) = image::window_range(idx, radius, bases.n_pages(best.base).ok()?);
            let w = bases.window(best.base, idx, radius).ok()?.into_owned();
            Some((*t, w, (idx - start) as usize * PAGE))
        })
        .step_by(5)
        .collect();
    g.throughput(Throughput::Bytes((pairs.len() * PAGE) as u64));
    for (name, codec) in [
        ("lz", CodecConfig::default()),
        (
            "sparse",
            CodecConfig {
                lz: false,
                ..CodecConfig::default()
            },
        ),
        (
            "zstd_window",
            CodecConfig {
                lz: false,
                zstd_ref: true,
                sparse_good_enough: 0,
                zref_min_gain: 0,
                ..CodecConfig::default()
            },
        ),
    ] {
        let mut enc = Encoder::default();
        fn base_of(w: &[u8], bo: usize) -> &Page {
            w[bo..bo + PAGE].try_into().unwrap()
        }
        let encoded: Vec<(PageKind, Vec<u8>)> = pairs
            .iter()
            .map(|(t, w, bo)| {
                let mut d = Vec::new();
                let b = base_of(w, *bo);
                (enc.encode(t, Some(b), Some((w, *bo)), &codec, &mut d), d)
            })
            .collect();
        let bytes: usize = encoded.iter().map(|e| e.1.len()).sum();
        eprintln!(
            "{name}: {} similar pages, mean {:.0} B/page before block compression",
            pairs.len(),
            bytes as f64 / pairs.len() as f64
        );
        g.bench_function(format!("encode_{name}"), |b| {
            let mut d = Vec::with_capacity(2 * PAGE);
            b.iter(|| {
                for (t, w, bo) in &pairs {
                    d.clear();
                    let bp = base_of(w, *bo);
                    black_box(enc.encode(t, Some(bp), Some((w, *bo)), &codec, &mut d));
                }
            })
        });
        g.bench_function(format!("decode_{name}"), |b| {
            let mut dec = Decoder::default();
            let mut out = [0u8; PAGE];
            b.iter(|| {
                for ((k, d), (_, w, bo)) in encoded.iter().zip(&pairs) {
                    let bp = base_of(w, *bo);
                    dec.decode(*k, d, Some(bp), Some(w), &mut out).unwrap();
                    black_box(&out);
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rebuild");
    g.sample_size(10);
    let (store, _) = dedup(&target, &registry, &bases, &cfg).unwrap();
    g.throughput(Throughput::Bytes(store.n_pages() * PAGE as u64));
    let mut out = vec![0u8; store.n_pages() as usize * PAGE];
    g.bench_function("rebuild_into", |b| {
        b.iter(|| rebuild_into(&store, &bases, &mut out).unwrap())
    });
    g.bench_function("dedup", |b| {
        b.iter(|| black_box(dedup(&target, &registry, &bases, &cfg).unwrap()))
    });
    // One thread, batch by batch: the store's page data in memory, or read from its file
    // (`open_lean` + `Rebuilder::from_file`: a pread per batch).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("bench.medes");
    store.write(&path).unwrap();
    let bases = std::sync::Arc::new(bases);
    let in_memory =
        rebuild::Rebuilder::new(std::sync::Arc::new(store.clone()), bases.clone()).unwrap();
    let (lean, file) = DedupStore::open_lean(&path).unwrap();
    let from_file = rebuild::Rebuilder::from_file(lean, file, bases.clone()).unwrap();
    for (name, rb) in [("batches_memory", &in_memory), ("batches_file", &from_file)] {
        g.bench_function(name, |b| {
            let mut scratch = rebuild::RebuildScratch::default();
            b.iter(|| {
                for i in 0..rb.n_batches() {
                    let r = rb.batch_pages(i);
                    let o = r.start as usize * PAGE;
                    rb.rebuild_batch(i, &mut scratch, &mut out[o..r.end as usize * PAGE])
                        .unwrap();
                }
            })
        });
    }
    g.bench_function("open_lean", |b| {
        b.iter(|| black_box(DedupStore::open_lean(&path).unwrap()))
    });
    g.bench_function("load", |b| {
        b.iter(|| black_box(DedupStore::load(&path).unwrap()))
    });
    g.finish();
}

criterion_group!(dedup_benches, benches);
criterion_main!(dedup_benches);
