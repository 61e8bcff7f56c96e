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
    // Similar pages with their base pages, both canonical.
    let pairs: Vec<(Page, Page)> = (0..n)
        .filter_map(|i| {
            let Some(Choice::Similar { best, .. }) = choices[i as usize] else {
                return None;
            };
            let (t, _) = target.canonical_page(i, true)?;
            let b = bases.page(best.base, u64::from(best.page)).ok()?;
            Some((*t, *b))
        })
        .step_by(5)
        .collect();
    g.throughput(Throughput::Bytes((pairs.len() * PAGE) as u64));
    for (name, codec) in [
        ("sparse+zstdref", CodecConfig::default()),
        (
            "sparse_only",
            CodecConfig {
                zstd_ref: false,
                ..CodecConfig::default()
            },
        ),
        (
            "zstdref_always",
            CodecConfig {
                sparse_good_enough: 0,
                zref_min_gain: 0,
                ..CodecConfig::default()
            },
        ),
    ] {
        let mut enc = Encoder::default();
        let encoded: Vec<(PageKind, Vec<u8>)> = pairs
            .iter()
            .map(|(t, b)| {
                let mut d = Vec::new();
                (enc.encode(t, Some(b), None, &codec, &mut d), d)
            })
            .collect();
        let bytes: usize = encoded.iter().map(|e| e.1.len()).sum();
        eprintln!(
            "{name}: {} similar pages, mean {:.0} B/page",
            pairs.len(),
            bytes as f64 / pairs.len() as f64
        );
        g.bench_function(format!("encode_{name}"), |b| {
            let mut d = Vec::with_capacity(2 * PAGE);
            b.iter(|| {
                for (t, bp) in &pairs {
                    d.clear();
                    black_box(enc.encode(t, Some(bp), None, &codec, &mut d));
                }
            })
        });
        g.bench_function(format!("decode_{name}"), |b| {
            let mut dec = Decoder::default();
            let mut out = [0u8; PAGE];
            b.iter(|| {
                for ((k, d), (_, bp)) in encoded.iter().zip(&pairs) {
                    dec.decode(*k, d, Some(bp), None, &mut out).unwrap();
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
    g.finish();
}

criterion_group!(dedup_benches, benches);
criterion_main!(dedup_benches);
