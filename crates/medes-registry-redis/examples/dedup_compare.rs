//! Dedup of a real dump against one base, with the in-memory registry and with the index in a
//! local 3-master Redis Cluster: time, stored bytes, and whether the stores are identical.
//!
//! `cargo run --release -p medes-registry-redis --example dedup_compare -- [BASE] [TARGET]`
//! (CRIU image directories; defaults `/dev/shm/dumps/aslr/numpy-{0,1}` from
//! `scripts/make-dumps.sh`).
use std::sync::Arc;
use std::time::Instant;

use medes_dedup::*;
use medes_registry_redis::{LocalCluster, RedisCluster, RegistryConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "/dev/shm/dumps/aslr/numpy-0".into());
    let target = args
        .next()
        .unwrap_or_else(|| "/dev/shm/dumps/aslr/numpy-1".into());
    let cfg = DedupConfig::default();
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    let tdump = DumpImage::open(&target)?;
    let mut bases = LocalBases::new(cfg.rebase);
    bases.insert(BaseId(1), DumpImage::open(&base)?);

    let cluster = LocalCluster::start(3)?;
    let rc = RedisCluster::connect(&RegistryConfig::redis(cluster.urls()))?;
    let mem = Registry::new();
    let red = Registry::with_backend(Arc::new(rc.registry("compare")?));
    let bdump = DumpImage::open(&base)?;
    let t0 = Instant::now();
    register_base(&mem, BaseId(1), meta.clone(), &bdump, &cfg)?;
    let t1 = Instant::now();
    register_base(&red, BaseId(1), meta, &bdump, &cfg)?;
    let t2 = Instant::now();
    println!(
        "{} base pages registered: memory {:.1} ms, redis {:.1} ms",
        bdump.n_pages(),
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3
    );
    for (name, reg) in [("memory", &mem), ("redis", &red)] {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let t = Instant::now();
            let (store, stats) = dedup(&tdump, reg, &bases, &cfg)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            last = Some((store, stats));
        }
        times.sort_by(f64::total_cmp);
        let Some((store, stats)) = last else {
            continue;
        };
        let bytes = store.blob.len() + store.blocks.iter().map(Vec::len).sum::<usize>();
        println!(
            "{name}: {} pages, dedup median {:.1} ms ({:.2} µs/page), stored {} KiB, \
             looked up {}, lookup phase {:.1} ms",
            stats.pages,
            times[times.len() / 2],
            times[times.len() / 2] * 1e3 / stats.pages as f64,
            bytes / 1024,
            stats.looked_up,
            stats.lookup.as_secs_f64() * 1e3
        );
    }
    let (a, _) = dedup(&tdump, &mem, &bases, &cfg)?;
    let (b, _) = dedup(&tdump, &red, &bases, &cfg)?;
    println!("identical stores: {}", a == b);
    red.remove_base(BaseId(1))?;
    Ok(())
}
