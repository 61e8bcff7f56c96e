//! Lookup cost of the registry backends, µs per page (a page = its sampled chunks, whole-page
//! hash and the base choice), for `medes bench cluster` and docs/BENCHMARKS.md.
//!
//! Synthetic but realistic pages: a base of `pages` pseudo-random pages, and as many target
//! pages, each a copy of a base page with a few bytes changed (1 in 10 unchanged: an exact
//! duplicate), fingerprinted with the engine's default settings (k = 16). The lookups run on
//! one thread, in batches of 256 pages (the dedup pass's batch), through
//! [`Registry::try_choose_batch`]: the in-memory registry's fast path, and a registry whose
//! index lives in the Redis Cluster.

use std::sync::Arc;
use std::time::Instant;

use medes_dedup::{
    BaseId, BaseMeta, DedupConfig, NodeId, PAGE, Page, PageFingerprint, Registry, fingerprint,
};

use crate::{RedisCluster, RegistryConfig};

/// The benchmark failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// No cluster to talk to.
    #[error("connecting to redis")]
    Connect(#[from] crate::ConnectError),
    /// The bench's prefix could not be opened.
    #[error("opening the bench's key prefix")]
    Open(#[from] crate::OpenError),
    /// Registering the synthetic base failed.
    #[error("registering the synthetic base")]
    AddBase(#[from] medes_dedup::AddBaseError),
    /// A lookup failed.
    #[error("looking up")]
    Lookup(#[from] medes_dedup::BackendError),
    /// Removing the synthetic base failed.
    #[error("removing the synthetic base")]
    Remove(#[from] medes_dedup::BaseRefError),
}

/// Figures of [`bench_lookup_both`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LookupBench {
    /// Pages looked up (and pages in the base).
    pub pages: usize,
    /// In-memory registry, µs per page.
    pub memory_us_per_page: f64,
    /// Redis Cluster registry, µs per page (one pipelined request per 256 pages).
    pub redis_us_per_page: f64,
    /// Pages for which both chose the same base page (should be all).
    pub same_choices: usize,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Base page `i` (low-entropy enough to look like heap data: words from a small alphabet).
fn base_page(i: u64) -> Box<Page> {
    let mut s = i.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x006d_6564_6573;
    let mut p = Box::new([0u8; PAGE]);
    for w in p.chunks_exact_mut(8) {
        let v = splitmix(&mut s);
        // Half the words small integers (pointers and counters look alike), half random.
        let v = if v & 1 == 0 { v >> 56 } else { v };
        w.copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// The synthetic base's and targets' fingerprints.
fn workload(pages: usize) -> (Vec<PageFingerprint>, Vec<PageFingerprint>) {
    let cfg = DedupConfig::default().fingerprint;
    let mut base = Vec::with_capacity(pages);
    let mut target = Vec::with_capacity(pages);
    let mut s = 42u64;
    for i in 0..pages as u64 {
        let mut p = base_page(i);
        base.push(fingerprint(&p, &cfg));
        if i % 10 != 0 {
            for _ in 0..3 {
                let at = (splitmix(&mut s) % (PAGE as u64 - 8)) as usize;
                p[at..at + 8].copy_from_slice(&splitmix(&mut s).to_le_bytes());
            }
        }
        target.push(fingerprint(&p, &cfg));
    }
    (base, target)
}

fn time_lookups(reg: &Registry, fps: &[PageFingerprint]) -> Result<(f64, Vec<String>), BenchError> {
    let mut choices = Vec::with_capacity(fps.len());
    let t0 = Instant::now();
    for batch in fps.chunks(256) {
        choices.extend(reg.try_choose_batch(batch, &[], NodeId(0))?);
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / fps.len().max(1) as f64;
    Ok((us, choices.iter().map(|c| format!("{c:?}")).collect()))
}

/// Lookup µs/page of the in-memory registry and of Redis Cluster at `urls` (see the module
/// documentation). Uses its own key prefix and removes what it stored.
pub fn bench_lookup_both(urls: &[String], pages: usize) -> Result<LookupBench, BenchError> {
    bench_lookup_with(&RegistryConfig::redis(urls.to_vec()), pages)
}

/// [`bench_lookup_both`] with every Redis setting given (bucket count, timeouts).
pub fn bench_lookup_with(cfg: &RegistryConfig, pages: usize) -> Result<LookupBench, BenchError> {
    let pages = pages.max(256);
    let (base, target) = workload(pages);
    let meta = BaseMeta {
        function: "bench".into(),
        node: NodeId(0),
    };

    let mem = Registry::new();
    mem.add_base(BaseId(1), meta.clone(), &base, &[])?;
    // Best of three runs (the machine is shared).
    let mut memory_us = f64::MAX;
    let mut mem_choices = Vec::new();
    for _ in 0..3 {
        let (us, c) = time_lookups(&mem, &target)?;
        memory_us = memory_us.min(us);
        mem_choices = c;
    }

    let cluster = RedisCluster::connect(cfg)?;
    let prefix = format!(
        "medes-bench:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let backend = Arc::new(cluster.registry(&prefix)?);
    let remote = Registry::with_backend(backend.clone());
    remote.add_base(BaseId(1), meta, &base, &[])?;
    let mut redis_us = f64::MAX;
    let mut redis_choices = Vec::new();
    for _ in 0..3 {
        let (us, c) = time_lookups(&remote, &target)?;
        redis_us = redis_us.min(us);
        redis_choices = c;
    }
    remote.remove_base(BaseId(1))?;
    let same = mem_choices
        .iter()
        .zip(&redis_choices)
        .filter(|(a, b)| a == b)
        .count();
    Ok(LookupBench {
        pages,
        memory_us_per_page: memory_us,
        redis_us_per_page: redis_us,
        same_choices: same,
    })
}

/// Redis Cluster lookup µs/page (`redis_lookup_us_per_page` of `medes bench cluster`): see
/// [`bench_lookup_both`].
pub fn bench_lookup(urls: &[String], pages: usize) -> Result<f64, BenchError> {
    Ok(bench_lookup_both(urls, pages)?.redis_us_per_page)
}
