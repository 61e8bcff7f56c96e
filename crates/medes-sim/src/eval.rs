//! The paper's evaluation in the simulator: workloads, the grid of runs, and the result rows.
//!
//! Setup (MEDES.md §6.1): 19 worker nodes; pools of 40, 30 and 20 GB split evenly over them;
//! the ten functions with the chosen profile; `patterns` one-hour arrival patterns (default 5)
//! built with the paper's recipe (one Azure-2019-format window per function, rates ×5) from the
//! synthetic 2019-format generator (or from traces the caller loads). Every policy sees the
//! same patterns and pools. Aggregates pool the invocations of all patterns: cold starts are
//! summed over the patterns (and given per one-hour pattern), percentiles are over all
//! invocations, memory is the mean over patterns of each run's time-averaged cluster memory.

use std::sync::atomic::{AtomicUsize, Ordering};

use medes_trace::{RecipeConfig, RecipeError, SynthConfig, Synthetic, Trace, recipe};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::output::{SimOutput, percentile};
use crate::{ClusterConfig, PolicySpec, Profile, SimConfig, SimError, simulate};

/// The paper's pools, GB.
pub const PAPER_POOLS_GB: [f64; 3] = [40.0, 30.0, 20.0];

/// The main policies compared at every pool: the baselines, Medes with the paper's rules and
/// the recommended variant `medes-predict` (see `docs/EVALUATION.md`).
pub const MAIN_POLICIES: [&str; 5] = [
    "fixed-10m",
    "hybrid-histogram",
    "greedy-dual",
    "medes",
    "medes-predict",
];

/// The template-start comparison (issue 8), at every pool: (a) fixed keep-alive, (b) template
/// starts alone (fixed keep-alive whose cold starts become template starts: the paper's
/// emulated Catalyzer), (c) Medes, (d) Medes with template starts; (c) and (d) for both the
/// paper's rules and `medes-predict`.
pub const TEMPLATE_POLICIES: [&str; 3] = [
    "fixed-10m+template",
    "medes+template",
    "medes-predict+template",
];

/// Smallest scaled rate (invocations per hour) of an eligible one-hour window in the
/// evaluation's recipe. The recipe's own default (12/h) yields ten functions that use under
/// 1 GB of the 20–40 GB pools, so no policy matters; the paper's pools were contended ("the
/// 40 GB pool oversubscribes the cluster", fixed keep-alive averaging ~26 GB). Busier windows
/// bring the same memory regime. The bound is fixed for every policy and pattern.
pub const EVAL_MIN_PER_HOUR: f64 = 10_000.0;
/// Largest scaled rate of an eligible window: above ~100 000/h one function alone exceeds the
/// 20 GB pool's capacity and the cluster overloads (queues grow without bound).
pub const EVAL_MAX_PER_HOUR: f64 = 100_000.0;

/// The evaluation's recipe settings (the paper's recipe: one-hour windows, ×5; eligible
/// windows within [`EVAL_MIN_PER_HOUR`], [`EVAL_MAX_PER_HOUR`]).
pub fn eval_recipe() -> RecipeConfig {
    RecipeConfig {
        min_per_hour: EVAL_MIN_PER_HOUR,
        max_per_hour: EVAL_MAX_PER_HOUR,
        ..RecipeConfig::default()
    }
}

/// `n` one-hour patterns for the paper's ten functions: pattern `i` is the recipe
/// ([`eval_recipe`]) with seed `seed + i` applied to a synthetic 2019-format day (2000
/// functions) with the same seed.
pub fn paper_patterns(n: usize, seed: u64) -> Result<Vec<Trace>, RecipeError> {
    patterns_with(n, seed, &eval_recipe(), EVAL_SYNTH_FUNCTIONS)
}

/// Function rows of each synthetic 2019-format day the patterns are drawn from.
pub const EVAL_SYNTH_FUNCTIONS: usize = 2000;

/// `n` patterns with recipe settings `base` (its seed is replaced by `seed + i`), each drawn
/// from a synthetic day of `synth_functions` function rows.
pub fn patterns_with(
    n: usize,
    seed: u64,
    base: &RecipeConfig,
    synth_functions: usize,
) -> Result<Vec<Trace>, RecipeError> {
    (0..n as u64)
        .map(|i| {
            let s = seed.wrapping_add(i);
            let rows = Synthetic::new(SynthConfig {
                seed: s,
                functions: synth_functions,
                ..SynthConfig::default()
            });
            let cfg = RecipeConfig {
                seed: s,
                ..base.clone()
            };
            recipe(rows.map(Ok), &cfg).map(|r| r.trace)
        })
        .collect()
}

/// A policy at a pool size (GB).
pub type Job = (PolicySpec, f64);

/// One run of the grid.
#[derive(Debug, Clone)]
pub struct Run {
    /// The policy.
    pub policy: PolicySpec,
    /// Pool, GB.
    pub pool_gb: f64,
    /// Pattern index.
    pub pattern: usize,
    /// What it produced (records moved into the compact arrays below).
    pub output: SimOutput,
    /// End-to-end latency per trace invocation (by index), ms; empty unless records were kept.
    pub e2e: Vec<f32>,
    /// Startup latency per trace invocation, ms.
    pub startup: Vec<f32>,
    /// Function index (into `output.functions`) per trace invocation.
    pub func: Vec<u8>,
    /// Whether the invocation was a cold start.
    pub cold: Vec<bool>,
}

/// Runs every (policy, pool) on every pattern, in parallel; `progress(done, total)` is called
/// after each run. Results come back in job order, patterns innermost.
pub fn run_grid(
    patterns: &[Trace],
    profile: &Profile,
    jobs: &[(PolicySpec, f64)],
    seed: u64,
    keep_records: bool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<Run>, SimError> {
    let paper = |pool: f64, _: usize| ClusterConfig::paper(pool);
    run_grid_with(
        patterns,
        profile,
        jobs,
        seed,
        keep_records,
        &paper,
        progress,
    )
}

/// [`run_grid`] with the cluster of each run given by `cluster(job's pool value, pattern)`
/// (e.g. a pool scaled to each pattern's demand); [`Run::pool_gb`] keeps the job's value.
pub fn run_grid_with(
    patterns: &[Trace],
    profile: &Profile,
    jobs: &[(PolicySpec, f64)],
    seed: u64,
    keep_records: bool,
    cluster: &(dyn Fn(f64, usize) -> ClusterConfig + Sync),
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<Run>, SimError> {
    let all: Vec<(usize, usize)> = (0..jobs.len())
        .flat_map(|j| (0..patterns.len()).map(move |p| (j, p)))
        .collect();
    let done = AtomicUsize::new(0);
    let total = all.len();
    all.par_iter()
        .map(|&(j, p)| {
            let (spec, pool) = &jobs[j];
            let trace = &patterns[p];
            let names = trace.functions();
            let costs = profile
                .costs_for(&names, spec.template_starts())
                .ok_or_else(|| {
                    let missing = names
                        .iter()
                        .find(|n| !profile.functions.contains_key(*n))
                        .cloned()
                        .unwrap_or_default();
                    SimError::UnknownFunction(missing)
                })?;
            let mut policy = spec.build(costs);
            let mut cfg = SimConfig::new(cluster(*pool, p));
            cfg.templates = spec.template_starts();
            cfg.seed = seed.wrapping_add(p as u64);
            cfg.keep_records = keep_records;
            let mut output = simulate(trace, profile, &mut policy, &cfg)?;
            let n = trace.len();
            let (mut e2e, mut startup, mut func, mut cold) = if keep_records {
                (
                    vec![f32::NAN; n],
                    vec![f32::NAN; n],
                    vec![0u8; n],
                    vec![false; n],
                )
            } else {
                Default::default()
            };
            for r in std::mem::take(&mut output.records) {
                let i = r.request as usize;
                if i < e2e.len() {
                    e2e[i] = r.e2e_ms as f32;
                    startup[i] = r.startup_ms as f32;
                    func[i] = r.function.min(255) as u8;
                    cold[i] = r.start == medes_core::StartKind::Cold;
                }
            }
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Ok(Run {
                policy: spec.clone(),
                pool_gb: *pool,
                pattern: p,
                output,
                e2e,
                startup,
                func,
                cold,
            })
        })
        .collect()
}

/// One row of `medes eval paper --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Policy name.
    pub policy: String,
    /// Pool, GB.
    pub pool_gb: f64,
    /// Cold starts, summed over the patterns.
    pub cold_starts: u64,
    /// Cold starts per one-hour pattern (mean).
    pub cold_starts_per_hour: f64,
    /// Dedup starts, summed.
    pub dedup_starts: u64,
    /// Template starts, summed.
    pub template_starts: u64,
    /// Startup milliseconds of cold and template starts (waits included), summed.
    pub cold_template_ms: f64,
    /// Pre-warms (sandboxes started off the request path), summed.
    pub prewarms: u64,
    /// Invocations, summed.
    pub invocations: u64,
    /// Invocations never served (0 unless the cluster deadlocked).
    pub dropped: u64,
    /// End-to-end p50 over all invocations, ms.
    pub p50_ms: f64,
    /// End-to-end p99, ms.
    pub p99_ms: f64,
    /// End-to-end p99.9, ms.
    pub p999_ms: f64,
    /// Startup (end to end minus execution) p99.9, ms.
    pub startup_p999_ms: f64,
    /// Startup p99, ms.
    #[serde(default)]
    pub startup_p99_ms: f64,
    /// Mean cluster memory, GB.
    pub mean_memory_gb: f64,
    /// Mean share of live sandboxes that are deduplicated.
    pub dedup_share: f64,
    /// Evictions, summed.
    pub evictions: u64,
    /// How the percentiles were aggregated: `pooled` (over every invocation of every pattern)
    /// or `mean-of-runs` (the mean of each pattern's percentile; sweep runs keep no records).
    pub percentiles: String,
}

/// Aggregates runs into one row per (policy, pool), in first-seen order.
pub fn rows(runs: &[Run]) -> Vec<Row> {
    let mut keys: Vec<(String, f64)> = Vec::new();
    for r in runs {
        let k = (r.policy.to_string(), r.pool_gb);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(policy, pool)| {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.policy.to_string() == policy && r.pool_gb == pool)
                .collect();
            aggregate(&policy, pool, &rs)
        })
        .collect()
}

fn aggregate(policy: &str, pool: f64, rs: &[&Run]) -> Row {
    let n = rs.len().max(1) as f64;
    let sum = |f: &dyn Fn(&Run) -> u64| rs.iter().map(|r| f(r)).sum::<u64>();
    let cold = sum(&|r| r.output.summary.cold_starts);
    let have_records = rs.iter().all(|r| !r.e2e.is_empty());
    let (p50, p99, p999, sp999, sp99) = if have_records {
        let mut e: Vec<f64> = rs
            .iter()
            .flat_map(|r| r.e2e.iter().map(|&x| f64::from(x)))
            .collect();
        let mut s: Vec<f64> = rs
            .iter()
            .flat_map(|r| r.startup.iter().map(|&x| f64::from(x)))
            .collect();
        e.sort_by(f64::total_cmp);
        s.sort_by(f64::total_cmp);
        (
            percentile(&e, 50.0),
            percentile(&e, 99.0),
            percentile(&e, 99.9),
            percentile(&s, 99.9),
            percentile(&s, 99.0),
        )
    } else {
        // Without records: the mean of the per-run percentiles.
        let m = |f: &dyn Fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n;
        (
            m(&|r| r.output.summary.p50_ms),
            m(&|r| r.output.summary.p99_ms),
            m(&|r| r.output.summary.p999_ms),
            m(&|r| r.output.summary.startup_p999_ms),
            m(&|r| r.output.summary.startup_p99_ms),
        )
    };
    Row {
        policy: policy.to_string(),
        pool_gb: pool,
        cold_starts: cold,
        cold_starts_per_hour: cold as f64 / n,
        dedup_starts: sum(&|r| r.output.summary.dedup_starts),
        template_starts: sum(&|r| r.output.summary.template_starts),
        cold_template_ms: rs.iter().map(|r| r.output.summary.cold_template_ms).sum(),
        prewarms: sum(&|r| r.output.summary.counters.prewarms),
        invocations: sum(&|r| r.output.summary.invocations),
        dropped: sum(&|r| r.output.summary.dropped),
        p50_ms: p50,
        p99_ms: p99,
        p999_ms: p999,
        startup_p999_ms: sp999,
        startup_p99_ms: sp99,
        mean_memory_gb: rs
            .iter()
            .map(|r| r.output.summary.mean_memory_gb)
            .sum::<f64>()
            / n,
        dedup_share: rs
            .iter()
            .map(|r| r.output.summary.mean_dedup_share)
            .sum::<f64>()
            / n,
        evictions: sum(&|r| r.output.summary.counters.evictions),
        percentiles: if have_records {
            "pooled"
        } else {
            "mean-of-runs"
        }
        .to_string(),
    }
}

/// The pool of the trade-off curves, GB (the most contended of the paper's pools).
pub const TRADEOFF_POOL_GB: f64 = 20.0;

/// Knob sweeps for the trade-off curves: (family, policies at [`TRADEOFF_POOL_GB`]). Greedy-Dual
/// has no knob but its cache size, so its curve sweeps the pool itself ([`GD_POOLS_GB`]).
pub const TRADEOFF: [(&str, &[&str]); 5] = [
    (
        "fixed keep-alive",
        &[
            "fixed-1m",
            "fixed-2m",
            "fixed-5m",
            "fixed-10m",
            "fixed-20m",
            "fixed-30m",
        ],
    ),
    (
        "hybrid-histogram",
        &[
            "hybrid-histogram",
            "hybrid-histogram-margin-4",
            "hybrid-histogram-margin-19",
        ],
    ),
    (
        "medes",
        &[
            "medes-latency",
            "medes-budget-5",
            "medes-budget-10",
            "medes-budget-15",
            "medes",
        ],
    ),
    (
        "medes-predict",
        &[
            "medes-ka-1m-prewarm-gd",
            "medes-ka-2m-prewarm-gd",
            "medes-ka-5m-prewarm-gd",
            "medes-latency-predict",
            "medes-predict",
        ],
    ),
    (
        "medes timers (dka, bases on demand, retired)",
        &[
            "medes-ip-30s-ka-0.5m-kd-12m-dka-lazybase-retire",
            "medes-ka-1m-kd-12m-dka-lazybase-retire",
            "medes-ka-2m-kd-10m-dka-lazybase-retire",
            "medes-ka-5m-kd-10m-dka-lazybase-retire",
        ],
    ),
];

/// Pools of Greedy-Dual's trade-off curve, GB.
pub const GD_POOLS_GB: [f64; 4] = [15.0, 20.0, 30.0, 40.0];

/// Medes variants beyond the prototype's rules, run at every pool besides `medes-predict`
/// (see `medes_policy`'s policies docs): no timer purges while the cluster is below 90% of
/// its budget (`hold`, one of `medes-predict`'s ingredients). `medes-dka` (dedup at
/// keep-alive expiry) is measured in docs/EVALUATION.md and no longer run here.
pub const VARIANTS: [&str; 1] = ["medes-hold-0.9"];

/// The keep-alive sweep (paper Fig. 12), at 40 GB.
pub const KA_SWEEP: [&str; 4] = ["fixed-5m", "fixed-10m", "fixed-15m", "fixed-20m"];
/// The keep-dedup sweep (paper Fig. 15), at 40 GB.
pub const KD_SWEEP: [&str; 4] = ["medes-kd-5m", "medes-kd-10m", "medes", "medes-kd-20m"];

/// Everything `medes eval paper` computes.
#[derive(Debug)]
pub struct PaperResults {
    /// Invocations per pattern.
    pub pattern_sizes: Vec<usize>,
    /// The main grid (with per-invocation data).
    pub main: Vec<Run>,
    /// Sweeps and trade-off runs (summaries only).
    pub extra: Vec<Run>,
    /// Rows of every (policy, pool).
    pub rows: Vec<Row>,
    /// The profile's source.
    pub profile_source: String,
    /// Wall time, s.
    pub seconds: f64,
}

fn spec(s: &str) -> PolicySpec {
    // The constants above are valid names (tested).
    s.parse().unwrap_or(PolicySpec::GreedyDual)
}

/// The jobs of the main grid and of the extra grid.
pub fn paper_jobs(pools: &[f64], sweeps: bool) -> (Vec<Job>, Vec<Job>) {
    let mut main = Vec::new();
    for &pool in pools {
        for p in MAIN_POLICIES {
            main.push((spec(p), pool));
        }
    }
    let mut extra: Vec<(PolicySpec, f64)> = Vec::new();
    if sweeps {
        let mut add = |p: &str, pool: f64| {
            let j = (spec(p), pool);
            if !main.contains(&j) && !extra.contains(&j) {
                extra.push(j);
            }
        };
        for &pool in pools {
            for p in VARIANTS.iter().chain(TEMPLATE_POLICIES.iter()) {
                add(p, pool);
            }
        }
        for p in KA_SWEEP.iter().chain(KD_SWEEP.iter()) {
            add(p, 40.0);
        }
        for (_, ps) in TRADEOFF {
            for p in ps {
                add(p, TRADEOFF_POOL_GB);
            }
        }
        for pool in GD_POOLS_GB {
            add("greedy-dual", pool);
        }
    }
    (main, extra)
}

/// Runs the paper's evaluation on `patterns`.
pub fn run_paper(
    patterns: &[Trace],
    profile: &Profile,
    pools: &[f64],
    sweeps: bool,
    seed: u64,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<PaperResults, SimError> {
    let t0 = std::time::Instant::now();
    let (main_jobs, extra_jobs) = paper_jobs(pools, sweeps);
    let total = (main_jobs.len() + extra_jobs.len()) * patterns.len();
    let n_main = main_jobs.len() * patterns.len();
    let main = run_grid(patterns, profile, &main_jobs, seed, true, &|d, _| {
        progress(d, total)
    })?;
    let extra = run_grid(patterns, profile, &extra_jobs, seed, false, &|d, _| {
        progress(n_main + d, total)
    })?;
    let mut rows = rows_of(&main);
    rows.extend(rows_of(&extra));
    Ok(PaperResults {
        pattern_sizes: patterns.iter().map(|t| t.len()).collect(),
        main,
        extra,
        rows,
        profile_source: profile.source.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn rows_of(runs: &[Run]) -> Vec<Row> {
    rows(runs)
}

impl PaperResults {
    /// The row of (policy, pool), if run.
    pub fn row(&self, policy: &str, pool: f64) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.policy == policy && r.pool_gb == pool)
    }

    /// All runs, main grid first.
    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        self.main.iter().chain(self.extra.iter())
    }
}
