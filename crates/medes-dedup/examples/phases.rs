//! Times the phases of one dedup (base dir, target dir) with the default config.
use std::time::Instant;

use medes_dedup::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = DedupConfig::default();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<i64>().ok());
    if let Some(v) = env("ZSTD_ABOVE") {
        cfg.codec.zstd_above = v as usize;
    }
    if let Some(v) = env("ZSTD_REF") {
        cfg.codec.zstd_ref = v != 0;
    }
    if let Some(v) = env("LZ") {
        cfg.codec.lz = v != 0;
    }
    if let Some(v) = env("LEVEL") {
        cfg.block_level = v as i32;
    }
    if let Some(v) = env("RADIUS") {
        cfg.codec.window_radius = v as u64;
    }
    if let Some(v) = env("SECOND") {
        cfg.second_candidate_above = v as usize;
    }
    if let Some(v) = env("GOOD") {
        cfg.codec.sparse_good_enough = v as usize;
    }
    if let Some(v) = env("PRED") {
        cfg.predict_below = v as usize;
    }
    if let Some(v) = env("MB") {
        cfg.fingerprint.mask_bits = v as u32;
    }
    if let Some(v) = env("K") {
        cfg.fingerprint.k = v as usize;
    }
    let runs = env("RUNS").unwrap_or(3);
    let registry = Registry::new();
    let base = DumpImage::open(&args[0])?;
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(0), meta, &base, &cfg)?;
    let mut bases = LocalBases::new(cfg.rebase);
    let others: Vec<String> = std::env::var("OTHER_BASES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    for (i, o) in others.iter().filter(|o| !o.is_empty()).enumerate() {
        let d = DumpImage::open(o)?;
        let id = BaseId(i as u32 + 1);
        let meta = BaseMeta {
            function: o.clone(),
            node: NodeId(0),
        };
        register_base(&registry, id, meta, &d, &cfg)?;
        bases.insert(id, d);
    }
    bases.insert(BaseId(0), base);
    bases.materialize();
    let target = DumpImage::open(&args[1])?;
    for _ in 0..runs {
        let c0 = cpu();
        let t = Instant::now();
        let (store, stats) = dedup(&target, &registry, &bases, &cfg)?;
        let total = t.elapsed();
        println!("cpu {:.0} ms", (cpu() - c0) * 1e3);
        let t = Instant::now();
        let bytes = store.to_bytes();
        println!(
            "pages {} fingerprint {:?} lookup {:?} encode {:?} compress {:?} total dedup {:?} serialise {:?} ({} B)",
            stats.pages,
            stats.fingerprint,
            stats.lookup,
            stats.encode,
            stats.compress,
            total,
            t.elapsed(),
            bytes.len()
        );
        let mut k: Vec<_> = stats.kinds.iter().collect();
        k.sort();
        println!("kinds {k:?}");
        let mut k: Vec<_> = stats.kind_bytes.iter().collect();
        k.sort();
        println!(
            "bytes {k:?} rebased {} predicted {}",
            stats.rebased, stats.predicted
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process (all threads).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}
