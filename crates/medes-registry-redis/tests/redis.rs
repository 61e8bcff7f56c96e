//! The Redis Cluster backend against a real 3-master `redis-server` cluster: the same base
//! choices and the same dedup store as the in-memory registry, base removal, prefix ownership.

#[path = "../../medes-criu-image/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use medes_dedup::*;
use medes_registry_redis::{LocalCluster, RedisCluster, RedisRegistry, RegistryConfig};

/// A fresh local cluster; `None` (skip) only outside CI when redis-server is missing.
fn cluster(test: &str) -> Option<LocalCluster> {
    if let Some(why) = medes_registry_redis::redis_server_missing() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: CI=true but {why}");
        }
        eprintln!("skipping {test}: {why}");
        return None;
    }
    Some(LocalCluster::start(3).expect("local redis cluster"))
}

fn open(c: &LocalCluster, prefix: &str) -> (Arc<RedisCluster>, RedisRegistry) {
    let cluster = RedisCluster::connect(&RegistryConfig::redis(c.urls())).expect("connect");
    let r = cluster.registry(prefix).expect("open prefix");
    (cluster, r)
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Pages built from a small pool of 64-byte blocks, so chunks recur across pages and bases
/// (entries with several refs, capped ones), with some exact duplicates and zero pages.
fn pages(seed: u64, n: usize, pool: &[[u8; 64]]) -> Vec<Box<Page>> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            let mut p = Box::new([0u8; PAGE]);
            if i % 17 == 3 {
                return p; // zero page
            }
            let mut s2 = if i % 9 == 0 {
                i as u64
            } else {
                splitmix(&mut s)
            };
            for blk in p.chunks_exact_mut(64) {
                let r = splitmix(&mut s2);
                if r.is_multiple_of(4) {
                    blk.copy_from_slice(&[(r >> 8) as u8; 64]);
                    blk[..8].copy_from_slice(&r.to_le_bytes());
                } else {
                    blk.copy_from_slice(&pool[(r >> 16) as usize % pool.len()]);
                }
            }
            p
        })
        .collect()
}

fn fps_of(ps: &[Box<Page>]) -> Vec<PageFingerprint> {
    let cfg = DedupConfig::default().fingerprint;
    ps.iter().map(|p| fingerprint(p, &cfg)).collect()
}

#[test]
fn redis_backend_chooses_what_memory_chooses_and_removal_removes() {
    let Some(c) = cluster("redis choices") else {
        return;
    };
    let (_cl, backend) = open(&c, "test:choices");
    let backend = Arc::new(backend);
    let mem = Registry::new();
    let red = Registry::with_backend(backend.clone());

    let mut s = 7;
    let pool: Vec<[u8; 64]> = (0..400)
        .map(|_| {
            let mut b = [0u8; 64];
            for w in b.chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix(&mut s).to_le_bytes());
            }
            b
        })
        .collect();
    let bases: Vec<Vec<PageFingerprint>> = (0..3)
        .map(|b| fps_of(&pages(100 + b, 600, &pool)))
        .collect();
    let positions: Vec<u64> = (0..600)
        .map(|i| if i % 5 == 0 { 0 } else { i / 2 + 1 })
        .collect();
    for (b, fps) in bases.iter().enumerate() {
        let meta = BaseMeta {
            function: "f".into(),
            node: NodeId(b as u32 % 2),
        };
        let id = BaseId(b as u32 + 1);
        mem.add_base(id, meta.clone(), fps, &positions).unwrap();
        red.add_base(id, meta, fps, &positions).unwrap();
    }
    mem.acquire(BaseId(2)).unwrap();
    red.acquire(BaseId(2)).unwrap();
    // Targets: new pages from the same pool, plus copies of base pages (exact duplicates).
    let mut target = fps_of(&pages(999, 900, &pool));
    target.extend_from_slice(&bases[1][..100]);
    let tpos: Vec<u64> = (0..target.len() as u64).map(|i| i % 400).collect();

    let want = mem.choose_batch(&target, &tpos, NodeId(0));
    let got = red.try_choose_batch(&target, &tpos, NodeId(0)).unwrap();
    assert_eq!(got, want);
    let exact = want
        .iter()
        .filter(|c| matches!(c, Some(Choice::Exact(_))))
        .count();
    let similar = want
        .iter()
        .filter(|c| matches!(c, Some(Choice::Similar { shared, .. }) if *shared > 1))
        .count();
    let positional = want
        .iter()
        .filter(|c| matches!(c, Some(Choice::Similar { shared: 0, .. })))
        .count();
    eprintln!(
        "{} pages: {exact} exact, {similar} similar, {positional} positional only",
        target.len()
    );
    assert!(
        exact >= 100 && similar > 150 && positional > 0,
        "workload too easy"
    );
    // Every page, one at a time, too.
    for (i, fp) in target.iter().enumerate().step_by(37) {
        assert_eq!(
            red.choose(fp, tpos[i], NodeId(1)),
            mem.choose(fp, tpos[i], NodeId(1))
        );
    }

    // A base with dependents stays; without, its entries go (and only its).
    assert!(matches!(
        red.remove_base(BaseId(2)),
        Err(BaseRefError::InUse { .. })
    ));
    let before = backend.count_entries().unwrap();
    mem.remove_base(BaseId(1)).unwrap();
    red.remove_base(BaseId(1)).unwrap();
    assert_eq!(
        red.try_choose_batch(&target, &tpos, NodeId(0)).unwrap(),
        mem.choose_batch(&target, &tpos, NodeId(0))
    );
    let after = backend.count_entries().unwrap();
    assert!(after < before, "{before} -> {after}");
    assert_eq!(
        backend.stored_bases().unwrap().len(),
        2,
        "base 1 is still listed"
    );
    // Nothing of base 1 is found by the backend itself (not just filtered by the registry).
    let keys: Vec<PageKeys<'_>> = bases[0].iter().map(|fp| PageKeys::of(fp, 0)).collect();
    let mut cands = Vec::new();
    backend.lookup_batch(&keys, &mut cands).unwrap();
    for c in &cands {
        assert!(c.exact.is_none_or(|r| r.base != BaseId(1)), "{c:?}");
        assert!(c.shared.iter().all(|(r, _)| r.base != BaseId(1)), "{c:?}");
        assert!(c.positional.iter().all(|r| r.base != BaseId(1)), "{c:?}");
    }
    red.release(BaseId(2)).unwrap();
    red.remove_base(BaseId(2)).unwrap();
    red.remove_base(BaseId(3)).unwrap();
    assert_eq!(backend.count_entries().unwrap(), 0, "entries left");
    assert!(backend.stored_bases().unwrap().is_empty());
    assert_eq!(c.key_counts().iter().sum::<u64>(), 0, "keys left behind");
}

#[test]
fn reopening_a_prefix_drops_an_earlier_owners_entries() {
    let Some(c) = cluster("redis prefix") else {
        return;
    };
    let pool = [[5u8; 64], [6u8; 64]];
    let fps = fps_of(&pages(1, 200, &pool));
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    {
        let (_cl, b) = open(&c, "test:{reopen}");
        let reg = Registry::with_backend(Arc::new(b));
        reg.add_base(BaseId(4), meta.clone(), &fps, &[]).unwrap();
        // Registering the same id again (a restarted agent) replaces, not duplicates.
        let (_cl2, b2) = open(&c, "other");
        let other = Registry::with_backend(Arc::new(b2));
        other.add_base(BaseId(4), meta, &fps, &[]).unwrap();
    }
    let (_cl, b) = open(&c, "test:{reopen}");
    assert!(b.stored_bases().unwrap().is_empty());
    assert_eq!(b.count_entries().unwrap(), 0);
    let (_cl2, other) = open(&c, "other");
    assert_eq!(other.count_entries().unwrap(), 0);
    assert_eq!(c.key_counts().iter().sum::<u64>(), 0);
}

#[test]
fn a_dead_cluster_is_an_error_not_a_crash() {
    let Some(c) = cluster("redis down") else {
        return;
    };
    let (_cl, b) = open(&c, "test:down");
    let reg = Registry::with_backend(Arc::new(b));
    let fps = fps_of(&pages(3, 50, &[[1u8; 64]]));
    let urls = c.urls();
    drop(c);
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    assert!(matches!(
        reg.add_base(BaseId(1), meta, &fps, &[]),
        Err(AddBaseError::Backend { .. })
    ));
    assert!(reg.try_choose_batch(&fps, &[], NodeId(0)).is_err());
    assert!(
        reg.choose_batch(&fps, &[], NodeId(0))
            .iter()
            .all(Option::is_none)
    );
    assert!(RedisCluster::connect(&RegistryConfig::redis(urls)).is_err());
}

/// Dedup of a real CRIU dump through Redis gives the store the in-memory registry gives.
#[test]
fn dedup_through_redis_gives_the_same_store() {
    if support::skip_without_criu("dedup through redis") {
        return;
    }
    let Some(c) = cluster("dedup through redis") else {
        return;
    };
    let root = support::tmp_dir("redis-dedup");
    let (bdir, tdir) = (root.join("json-0"), root.join("json-1"));
    support::make_dump(support::JSON_FUNCTION, &bdir, true).expect("base dump");
    support::make_dump(support::JSON_FUNCTION, &tdir, true).expect("target dump");
    let base = DumpImage::open(&bdir).unwrap();
    let target = DumpImage::open(&tdir).unwrap();
    let (_cl, backend) = open(&c, "test:dedup");
    for positional in [false, true] {
        let cfg = DedupConfig {
            positional,
            ..DedupConfig::default()
        };
        let mem = Registry::new();
        let red = Registry::with_backend(Arc::new(backend.clone()));
        let meta = BaseMeta {
            function: "json".into(),
            node: NodeId(0),
        };
        register_base(&mem, BaseId(1), meta.clone(), &base, &cfg).unwrap();
        register_base(&red, BaseId(1), meta, &base, &cfg).unwrap();
        let mut bases = LocalBases::new(cfg.rebase);
        bases.insert(BaseId(1), DumpImage::open(&bdir).unwrap());
        let (ms, mstats) = dedup(&target, &mem, &bases, &cfg).unwrap();
        let (rs, rstats) = dedup(&target, &red, &bases, &cfg).unwrap();
        eprintln!(
            "positional={positional}: {} pages, memory {} exact {} patched {} standalone; \
             redis {} exact {} patched {} standalone; looked up {} vs {}",
            mstats.pages,
            mstats.exact,
            mstats.patched,
            mstats.standalone,
            rstats.exact,
            rstats.patched,
            rstats.standalone,
            mstats.looked_up,
            rstats.looked_up
        );
        assert!(
            mstats.exact + mstats.patched > mstats.pages / 3,
            "{mstats:?}"
        );
        assert_eq!(rs.pages, ms.pages, "page tables differ");
        assert_eq!(rs.bases, ms.bases);
        assert_eq!(rs, ms, "stores differ");
        let rebuilt = rebuild_pages(&rs, &bases).unwrap();
        assert_eq!(rebuilt.len() as u64, target.n_pages() * PAGE as u64);
        red.remove_base(BaseId(1)).unwrap();
    }
    assert_eq!(c.key_counts().iter().sum::<u64>(), 0);

    // The cluster gone: the dedup still succeeds, without bases, and rebuilds.
    let cfg = DedupConfig::default();
    let red = Registry::with_backend(Arc::new(backend.clone()));
    let meta = BaseMeta {
        function: "json".into(),
        node: NodeId(0),
    };
    register_base(&red, BaseId(1), meta, &base, &cfg).unwrap();
    let mut bases = LocalBases::new(cfg.rebase);
    bases.insert(BaseId(1), DumpImage::open(&bdir).unwrap());
    drop(c);
    let (store, stats) = dedup(&target, &red, &bases, &cfg).unwrap();
    assert_eq!(
        stats.lookup_failures,
        stats.pages.div_ceil(256),
        "{stats:?}"
    );
    assert_eq!(stats.exact + stats.patched, 0, "{stats:?}");
    let rebuilt = rebuild_pages(&store, &bases).unwrap();
    assert_eq!(rebuilt.len() as u64, target.n_pages() * PAGE as u64);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn lookup_bench_runs_and_agrees() {
    let Some(c) = cluster("redis lookup bench") else {
        return;
    };
    let b = medes_registry_redis::bench_lookup_both(&c.urls(), 4096).unwrap();
    eprintln!("{b:?}");
    assert_eq!(b.same_choices, b.pages);
    assert!(b.memory_us_per_page > 0.0 && b.redis_us_per_page > 0.0);
}
