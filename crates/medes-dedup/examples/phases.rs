//! Times the phases of one dedup (base dir, target dir) with the default config.
use std::time::Instant;

use medes_dedup::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = DedupConfig::default();
    let registry = Registry::new();
    let base = DumpImage::open(&args[0])?;
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(0), meta, &base, &cfg)?;
    let mut bases = LocalBases::new(cfg.rebase);
    bases.insert(BaseId(0), base);
    bases.materialize();
    let target = DumpImage::open(&args[1])?;
    for _ in 0..3 {
        let t = Instant::now();
        let (store, stats) = dedup(&target, &registry, &bases, &cfg)?;
        let total = t.elapsed();
        let t = Instant::now();
        let bytes = store.to_bytes();
        println!(
            "pages {} fingerprint {:?} lookup {:?} encode {:?} total dedup {:?} serialise {:?} ({} B)",
            stats.pages,
            stats.fingerprint,
            stats.lookup,
            stats.encode,
            total,
            t.elapsed(),
            bytes.len()
        );
    }
    Ok(())
}
