//! Quick look: the main policies on the paper's setup.
use medes_sim::eval::*;
use medes_sim::*;
fn main() {
    let t0 = std::time::Instant::now();
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rc = medes_trace::RecipeConfig {
        min_per_hour: env("MINH", 12.0),
        max_per_hour: env("MAXH", 1800.0),
        scale: env("SCALE", 5.0),
        ..Default::default()
    };
    let pats = patterns_with(5, 1, &rc).unwrap();
    for (i, p) in pats.iter().enumerate() {
        eprintln!("pattern {i}: {} invocations", p.len());
    }
    eprintln!("patterns in {:?}", t0.elapsed());
    let mut jobs = Vec::new();
    for pool in PAPER_POOLS_GB {
        for p in MAIN_POLICIES {
            jobs.push((p.parse::<PolicySpec>().unwrap(), pool));
        }
    }
    let runs = run_grid(&pats, &Profile::paper(), &jobs, 1, true, &|_, _| {}).unwrap();
    eprintln!("runs in {:?}", t0.elapsed());
    for r in rows(&runs) {
        println!(
            "{:18} {:>4} cold {:6} ({:7.1}/h) dedup {:6} inv {:6} drop {} p50 {:7.0} p99 {:7.0} p999 {:7.0} sp999 {:7.0} mem {:5.2} GB dshare {:.2} evict {}",
            r.policy,
            r.pool_gb,
            r.cold_starts,
            r.cold_starts_per_hour,
            r.dedup_starts,
            r.invocations,
            r.dropped,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.startup_p999_ms,
            r.mean_memory_gb,
            r.dedup_share,
            r.evictions
        );
    }
}
