//! The memory–latency trade-off (`medes eval tradeoff`): Medes's memory at fixed keep-alive's
//! latency, and whether Medes's cold-starts-vs-memory curve dominates every baseline's where
//! memory is contended.
//!
//! - **Iso-latency memory** (issue 6, "at the same latency target, ≥ 15% less memory than fixed
//!   keep-alive"; the paper's §7.3): on the paper's uncontended pool, fixed keep-alive 10 min
//!   sets the latency target (its cold starts, startup p99 and startup p99.9, pooled over all
//!   invocations); Medes's knob (the latency objective α and its three timers, [`ISO_MEDES`])
//!   is swept and the setting with the least mean memory that is no worse on all three is
//!   chosen ([`iso_latency`]).
//! - **Dominance** (issue 6, "the trade-off curve of Medes dominates every baseline's curve
//!   wherever memory is contended"): the pools are scaled to each pattern's demand (a fraction
//!   of fixed-10m's peak memory on that pattern on the uncontended pool: one cluster-wide pool
//!   cannot contend five patterns whose peaks differ twofold without overloading the largest),
//!   every policy's knob is swept at each fraction, and every baseline point with more than
//!   [`CONTENDED_SHARE`] of its invocations cold is checked against Medes's curve interpolated
//!   at the point's memory ([`dominance`]).
//!
//! Pure helpers ([`frontier`], [`interpolate`], [`dominance`], [`iso_latency`]) are separate
//! from the runner ([`run_tradeoff`]) so they can be tested without simulating.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use medes_trace::Trace;
use serde::{Deserialize, Serialize};

use crate::eval::{Job, Row, rows, run_grid_with};
use crate::report::{ReportError, line_chart};
use crate::{ClusterConfig, PolicySpec, Profile, SimError};

/// A baseline point is in the contended region when more than this share of its invocations
/// are cold starts (1%, the definition).
pub const CONTENDED_SHARE: f64 = 0.01;

/// The reference of the iso-latency comparison.
pub const ISO_REFERENCE: &str = "fixed-10m";

/// Medes's knob swept for the iso-latency comparison: the paper's rules (memory mode, and the
/// latency objective α = 2.5), then the three timers (idle period `ip`, warm keep-alive `ka`,
/// keep-dedup `kd`) with dedup at keep-alive expiry (`dka`), bases on demand (`lazybase`) and
/// base retirement (`retire`), and one setting without the base rules (`docs/EVALUATION.md`).
pub const ISO_MEDES: [&str; 12] = [
    "medes",
    "medes-latency",
    "medes-ip-30s-ka-0.5m-kd-12m-dka-lazybase-retire",
    "medes-ka-1m-kd-10m-dka-lazybase-retire",
    "medes-ka-1m-kd-12m-dka-lazybase-retire",
    "medes-ka-1m-dka-lazybase-retire",
    "medes-ka-2m-kd-10m-dka-lazybase-retire",
    "medes-ka-2m-kd-12m-dka-lazybase-retire",
    "medes-ka-2m-dka-lazybase-retire",
    "medes-ka-5m-kd-10m-dka-lazybase-retire",
    "medes-latency-ka-2m-kd-10m-dka-lazybase-retire",
    "medes-ka-2m-kd-10m-dka",
];

/// The uncontended pool of the iso-latency comparison, GB (the paper's 2 GB per node).
pub const ISO_POOL_GB: f64 = 40.0;

/// Pool fractions (of each pattern's fixed-10m peak memory) of the dominance check.
/// (At 0.85 no baseline point exceeds 1% cold starts on the evaluation workload; below 0.75 the
/// busiest pattern overloads: queues grow without bound.)
pub const DOMINANCE_FRACTIONS: [f64; 2] = [0.8, 0.75];

/// The baselines' knob sweeps: (family, policies). Greedy-Dual has no knob besides the cache
/// (pool) size, which the fractions sweep.
pub const BASELINE_CURVES: [(&str, &[&str]); 3] = [
    (
        "fixed keep-alive",
        &["fixed-1m", "fixed-2m", "fixed-5m", "fixed-10m", "fixed-20m"],
    ),
    (
        "hybrid-histogram",
        &["hybrid-histogram", "hybrid-histogram-margin-4"],
    ),
    ("greedy-dual", &["greedy-dual"]),
];

/// Medes's knob sweep for the dominance check: the paper's rules (memory mode), with bases on
/// demand and retired, the recommended `medes-predict`, and settings for a contended cluster:
/// pressure-driven dedup (`pw-0.9`: idle warm sandboxes of a node above 90% of its budget are
/// deduplicated) with arrival prediction (`prewarm`), and shorter timers down to a 20 s idle
/// period with 30 s keep-alive (the leanest points).
pub const MEDES_CURVE: [&str; 8] = [
    "medes",
    "medes-lazybase-retire",
    "medes-predict",
    "medes-ka-2m-kd-10m-dka-lazybase-retire",
    "medes-pw-0.9-prewarm-lazybase-retire",
    "medes-ka-1m-kd-10m-dka-pw-0.9-prewarm-lazybase-retire",
    "medes-ip-20s-ka-0.5m-kd-5m-dka-pw-0.9-prewarm-lazybase-retire",
    "medes-ip-20s-ka-0.5m-kd-2m-dka-pw-0.9-lazybase-retire",
];

/// The lower envelope of (memory, cold starts) points: sorted by memory, keeping each point
/// with fewer cold starts than every point using less memory (what the knob can reach with at
/// most that much memory). Non-finite points are dropped.
pub fn frontier(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(m, c)| m.is_finite() && c.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (m, c) in p {
        if out.last().is_none_or(|&(_, best)| c < best) {
            out.push((m, c));
        }
    }
    out
}

/// Cold starts of a [`frontier`] at memory `m`: linear between the neighbouring points; above
/// the largest memory, the last point's (it uses less memory); `None` below the smallest
/// memory (the curve has no point that lean) or for an empty frontier.
pub fn interpolate(frontier: &[(f64, f64)], m: f64) -> Option<f64> {
    let first = frontier.first()?;
    if !m.is_finite() || m < first.0 {
        return None;
    }
    for w in frontier.windows(2) {
        let ((m0, c0), (m1, c1)) = (w[0], w[1]);
        if m <= m1 {
            let t = if m1 > m0 { (m - m0) / (m1 - m0) } else { 1.0 };
            return Some(c0 + t * (c1 - c0));
        }
    }
    frontier.last().map(|p| p.1)
}

/// One baseline point checked against Medes's curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The baseline's family.
    pub family: String,
    /// The baseline policy.
    pub policy: String,
    /// Its mean memory, GB.
    pub memory_gb: f64,
    /// Its cold starts per one-hour pattern.
    pub cold_per_hour: f64,
    /// Its share of cold invocations.
    pub cold_share: f64,
    /// Medes's curve at the same memory (`None`: no Medes point that lean).
    pub medes_cold_per_hour: Option<f64>,
    /// Whether Medes's curve is at or below the point.
    pub pass: bool,
}

/// A point of a curve: (family, policy, mean memory GB, cold starts per hour, cold share).
pub type CurvePoint = (String, String, f64, f64, f64);

/// Checks every baseline point whose cold share exceeds `min_share` against the frontier of
/// `medes` points (memory GB, cold starts per hour): it passes when Medes's curve,
/// interpolated at the point's memory, has no more cold starts.
pub fn dominance(medes: &[(f64, f64)], baselines: &[CurvePoint], min_share: f64) -> Vec<Check> {
    let f = frontier(medes);
    baselines
        .iter()
        .filter(|b| b.4 > min_share)
        .map(|(family, policy, m, c, share)| {
            let at = interpolate(&f, *m);
            Check {
                family: family.clone(),
                policy: policy.clone(),
                memory_gb: *m,
                cold_per_hour: *c,
                cold_share: *share,
                medes_cold_per_hour: at,
                pass: at.is_some_and(|x| x <= *c + 1e-9),
            }
        })
        .collect()
}

/// Whether `r` is no worse than `reference` on the latency target: cold starts, startup p99
/// and startup p99.9.
pub fn meets_latency(r: &Row, reference: &Row) -> bool {
    r.cold_starts <= reference.cold_starts
        && r.startup_p99_ms <= reference.startup_p99_ms + 1e-9
        && r.startup_p999_ms <= reference.startup_p999_ms + 1e-9
}

/// The candidate with the least mean memory that meets the reference's latency
/// ([`meets_latency`]); `None` if none does.
pub fn iso_latency<'a>(reference: &Row, candidates: &'a [Row]) -> Option<&'a Row> {
    candidates
        .iter()
        .filter(|r| meets_latency(r, reference))
        .min_by(|a, b| a.mean_memory_gb.total_cmp(&b.mean_memory_gb))
}

/// Settings of [`run_tradeoff`].
#[derive(Debug, Clone, PartialEq)]
pub struct TradeoffConfig {
    /// Pool fractions of the dominance check.
    pub fractions: Vec<f64>,
    /// Seed of execution-time draws (pattern i uses seed + i).
    pub seed: u64,
    /// Idle bases with no dependents on their node may be evicted (as the live controller).
    pub evict_idle_bases: bool,
}

impl Default for TradeoffConfig {
    fn default() -> Self {
        TradeoffConfig {
            fractions: DOMINANCE_FRACTIONS.to_vec(),
            seed: 1,
            evict_idle_bases: true,
        }
    }
}

/// One contention level of one profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    /// Pool as a fraction of each pattern's fixed-10m peak.
    pub fraction: f64,
    /// The pools, GB, per pattern.
    pub pools_gb: Vec<f64>,
    /// Every policy's row (`pool_gb` = the fraction; percentiles: mean of runs).
    pub rows: Vec<Row>,
    /// The dominance checks of the contended baseline points.
    pub checks: Vec<Check>,
}

/// Everything for one profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProfileTradeoff {
    /// Short name (`paper`, `platform-memory`, `measured`).
    pub name: String,
    /// The profile's source.
    pub source: String,
    /// Rows of the iso-latency sweep ([`ISO_REFERENCE`] first; pooled percentiles).
    pub iso_rows: Vec<Row>,
    /// The Medes setting chosen at the reference's latency.
    pub iso_choice: Option<Row>,
    /// Memory change of the choice vs the reference, %.
    pub iso_memory_change_pct: Option<f64>,
    /// Fixed-10m's peak memory per pattern on the uncontended pool, GB.
    pub peaks_gb: Vec<f64>,
    /// The contention levels (empty if not run for this profile).
    pub levels: Vec<Level>,
}

/// What `medes eval tradeoff` computes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TradeoffResults {
    /// Invocations per pattern.
    pub pattern_sizes: Vec<usize>,
    /// Per profile.
    pub profiles: Vec<ProfileTradeoff>,
    /// Wall time, s.
    pub seconds: f64,
}

fn spec(s: &str) -> PolicySpec {
    // The constants above are valid names (tested).
    s.parse().unwrap_or(PolicySpec::GreedyDual)
}

/// Runs the iso-latency comparison for every profile and the dominance check for those with
/// `dominance` set: (name, profile, dominance). `progress(done, total)` after each run.
pub fn run_tradeoff(
    patterns: &[Trace],
    profiles: &[(String, Profile, bool)],
    cfg: &TradeoffConfig,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<TradeoffResults, SimError> {
    let t0 = std::time::Instant::now();
    let np = patterns.len();
    let n_iso = (1 + ISO_MEDES.len()) * np;
    let n_curve: usize =
        (BASELINE_CURVES.iter().map(|c| c.1.len()).sum::<usize>() + MEDES_CURVE.len()) * np;
    let total: usize = profiles
        .iter()
        .map(|p| {
            n_iso
                + if p.2 {
                    n_curve * cfg.fractions.len()
                } else {
                    0
                }
        })
        .sum();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let tick = |_: usize, _: usize| {
        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(d, total);
    };
    let evict_idle_bases = cfg.evict_idle_bases;
    let mut out = Vec::new();
    for (name, profile, with_levels) in profiles {
        // Iso-latency, on the uncontended pool, with records (pooled percentiles).
        let jobs: Vec<Job> = std::iter::once(ISO_REFERENCE)
            .chain(ISO_MEDES)
            .map(|p| (spec(p), ISO_POOL_GB))
            .collect();
        let uncontended = |pool: f64, _: usize| ClusterConfig {
            evict_idle_bases,
            ..ClusterConfig::paper(pool)
        };
        let runs = run_grid_with(
            patterns,
            profile,
            &jobs,
            cfg.seed,
            true,
            &uncontended,
            &tick,
        )?;
        let peaks_gb: Vec<f64> = runs
            .iter()
            .filter(|r| r.policy.to_string() == ISO_REFERENCE)
            .map(|r| r.output.summary.peak_memory_gb)
            .collect();
        let iso_rows = rows(&runs);
        drop(runs);
        let reference = iso_rows.first().cloned();
        let iso_choice = reference
            .as_ref()
            .and_then(|r| iso_latency(r, &iso_rows[1..]).cloned());
        let iso_memory_change_pct = match (&reference, &iso_choice) {
            (Some(r), Some(c)) if r.mean_memory_gb > 0.0 => {
                Some(100.0 * (c.mean_memory_gb - r.mean_memory_gb) / r.mean_memory_gb)
            }
            _ => None,
        };
        let mut levels = Vec::new();
        if *with_levels {
            for &fraction in &cfg.fractions {
                let pools_gb: Vec<f64> = peaks_gb.iter().map(|p| fraction * p).collect();
                let scaled = |frac: f64, p: usize| ClusterConfig {
                    evict_idle_bases,
                    ..ClusterConfig::paper(frac * peaks_gb.get(p).copied().unwrap_or(40.0))
                };
                let jobs: Vec<Job> = BASELINE_CURVES
                    .iter()
                    .flat_map(|c| c.1.iter())
                    .chain(MEDES_CURVE.iter())
                    .map(|p| (spec(p), fraction))
                    .collect();
                let runs =
                    run_grid_with(patterns, profile, &jobs, cfg.seed, false, &scaled, &tick)?;
                let level_rows = rows(&runs);
                drop(runs);
                let point = |family: &str, r: &Row| -> CurvePoint {
                    (
                        family.to_string(),
                        r.policy.clone(),
                        r.mean_memory_gb,
                        r.cold_starts_per_hour,
                        r.cold_starts as f64 / r.invocations.max(1) as f64,
                    )
                };
                let medes: Vec<(f64, f64)> = level_rows
                    .iter()
                    .filter(|r| MEDES_CURVE.contains(&r.policy.as_str()))
                    .map(|r| (r.mean_memory_gb, r.cold_starts_per_hour))
                    .collect();
                let baselines: Vec<CurvePoint> = BASELINE_CURVES
                    .iter()
                    .flat_map(|(family, ps)| {
                        level_rows
                            .iter()
                            .filter(|r| ps.contains(&r.policy.as_str()))
                            .map(move |r| point(family, r))
                    })
                    .collect();
                let checks = dominance(&medes, &baselines, CONTENDED_SHARE);
                levels.push(Level {
                    fraction,
                    pools_gb,
                    rows: level_rows,
                    checks,
                });
            }
        }
        out.push(ProfileTradeoff {
            name: name.clone(),
            source: profile.source.clone(),
            iso_rows,
            iso_choice,
            iso_memory_change_pct,
            peaks_gb,
            levels,
        });
    }
    Ok(TradeoffResults {
        pattern_sizes: patterns.iter().map(|t| t.len()).collect(),
        profiles: out,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `TRADEOFF.md` (tables, pass/fail per point) with one plot per profile and
/// contention level, and `tradeoff.json`, into `dir`.
pub fn write_tradeoff_report(res: &TradeoffResults, dir: &Path) -> Result<PathBuf, ReportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Memory–latency trade-off (`medes eval tradeoff`)\n\n{} one-hour patterns ({} invocations); 19 nodes; {:.1} s.\n",
        res.pattern_sizes.len(),
        res.pattern_sizes.iter().sum::<usize>(),
        res.seconds
    );
    let _ = writeln!(
        md,
        "## Memory at fixed keep-alive's latency ({ISO_POOL_GB:.0} GB pool)\n\nThe reference is {ISO_REFERENCE}: its cold starts, startup p99 and startup p99.9 (pooled over every invocation) are the latency target; the Medes setting with the least mean memory that is no worse on all three is chosen.\n\n| profile | policy | cold starts | startup p99 ms | startup p99.9 ms | mean memory GB | vs reference | meets the target |\n|---|---|---|---|---|---|---|---|"
    );
    for p in &res.profiles {
        let Some(reference) = p.iso_rows.first() else {
            continue;
        };
        for r in &p.iso_rows {
            let chosen = p.iso_choice.as_ref().is_some_and(|c| c.policy == r.policy);
            let meets = std::ptr::eq(r, reference) || meets_latency(r, reference);
            let _ = writeln!(
                md,
                "| {} | {}{} | {} | {:.0} | {:.0} | {:.2} | {:+.1}% | {} |",
                p.name,
                if chosen { "**chosen:** " } else { "" },
                r.policy,
                r.cold_starts,
                r.startup_p99_ms,
                r.startup_p999_ms,
                r.mean_memory_gb,
                100.0 * (r.mean_memory_gb - reference.mean_memory_gb)
                    / reference.mean_memory_gb.max(1e-9),
                if std::ptr::eq(r, reference) {
                    "reference"
                } else if meets {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| profile | chosen | memory vs {ISO_REFERENCE} | target ≤ −15% |\n|---|---|---|---|"
    );
    for p in &res.profiles {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            p.name,
            p.iso_choice.as_ref().map_or("none", |c| c.policy.as_str()),
            p.iso_memory_change_pct
                .map_or("–".to_string(), |v| format!("{v:+.1}%")),
            if p.iso_memory_change_pct.is_some_and(|v| v <= -15.0) {
                "met"
            } else {
                "not met"
            }
        );
    }
    let _ = writeln!(md, "\nProfiles:");
    for p in &res.profiles {
        let _ = writeln!(md, "- `{}`: {}", p.name, p.source);
    }
    for p in &res.profiles {
        for l in &p.levels {
            let _ = writeln!(
                md,
                "\n## Dominance, profile `{}`, pools at {:.0}% of each pattern's fixed-10m peak ({} GB)\n\n| family | policy | cold starts / hour | cold share | mean memory GB | Medes's curve at that memory | verdict |\n|---|---|---|---|---|---|---|",
                p.name,
                100.0 * l.fraction,
                l.pools_gb
                    .iter()
                    .map(|g| format!("{g:.1}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
            let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            let families = BASELINE_CURVES
                .iter()
                .map(|(f, ps)| (*f, ps.to_vec()))
                .chain(std::iter::once(("medes", MEDES_CURVE.to_vec())));
            for (family, ps) in families {
                let mut pts = Vec::new();
                for r in l.rows.iter().filter(|r| ps.contains(&r.policy.as_str())) {
                    let share = r.cold_starts as f64 / r.invocations.max(1) as f64;
                    let check = l.checks.iter().find(|c| c.policy == r.policy);
                    let _ = writeln!(
                        md,
                        "| {family} | {} | {:.0} | {:.2}% | {:.2} | {} | {} |",
                        r.policy,
                        r.cold_starts_per_hour,
                        100.0 * share,
                        r.mean_memory_gb,
                        check
                            .and_then(|c| c.medes_cold_per_hour)
                            .map_or("–".to_string(), |v| format!("{v:.0}")),
                        match check {
                            Some(c) if c.pass => "**pass**",
                            Some(_) => "**fail**",
                            None if family == "medes" => "",
                            None => "not contended (≤ 1%)",
                        }
                    );
                    pts.push((r.mean_memory_gb, r.cold_starts_per_hour));
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                curves.push((family.to_string(), pts));
            }
            let passed = l.checks.iter().filter(|c| c.pass).count();
            let _ = writeln!(
                md,
                "\nContended baseline points: {}; Medes's curve at or below: {passed}.",
                l.checks.len()
            );
            let xmax = curves
                .iter()
                .flat_map(|c| c.1.iter().map(|p| p.0))
                .fold(1.0f64, f64::max)
                * 1.05;
            let xmin = curves
                .iter()
                .flat_map(|c| c.1.iter().map(|p| p.0))
                .fold(f64::INFINITY, f64::min);
            let xmin = if xmin.is_finite() { xmin * 0.95 } else { 0.0 };
            let file = format!(
                "tradeoff_{}_{:.0}.png",
                p.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
                100.0 * l.fraction
            );
            if curves.iter().any(|c| !c.1.is_empty()) {
                line_chart(
                    &dir.join(&file),
                    &format!(
                        "Cold starts vs memory, {} profile, pools {:.0}% of peak",
                        p.name,
                        100.0 * l.fraction
                    ),
                    "mean memory (GB)",
                    "cold starts / hour",
                    &curves,
                    (xmin, xmax),
                    false,
                    true,
                )?;
                let _ = writeln!(md, "\n![trade-off]({file})");
            }
        }
    }
    let path = dir.join("TRADEOFF.md");
    std::fs::write(&path, md).map_err(io(&path))?;
    let j = dir.join("tradeoff.json");
    std::fs::write(&j, serde_json::to_vec_pretty(res).unwrap_or_default()).map_err(io(&j))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_keeps_the_lower_envelope() {
        let f = frontier(&[
            (10.0, 100.0),
            (8.0, 300.0),
            (12.0, 150.0),
            (9.0, 200.0),
            (f64::NAN, 1.0),
            (14.0, 50.0),
        ]);
        assert_eq!(
            f,
            vec![(8.0, 300.0), (9.0, 200.0), (10.0, 100.0), (14.0, 50.0)]
        );
        assert!(frontier(&[]).is_empty());
    }

    #[test]
    fn interpolation_is_linear_inside_flat_above_and_none_below() {
        let f = [(8.0, 300.0), (10.0, 100.0)];
        assert_eq!(interpolate(&f, 9.0), Some(200.0));
        assert_eq!(interpolate(&f, 8.0), Some(300.0));
        assert_eq!(interpolate(&f, 10.0), Some(100.0));
        assert_eq!(interpolate(&f, 20.0), Some(100.0));
        assert_eq!(interpolate(&f, 7.9), None);
        assert_eq!(interpolate(&f, f64::NAN), None);
        assert_eq!(interpolate(&[], 1.0), None);
        assert_eq!(interpolate(&[(5.0, 7.0)], 5.0), Some(7.0));
    }

    #[test]
    fn dominance_checks_only_contended_points() {
        let medes = [(8.0, 300.0), (10.0, 100.0)];
        let b = |p: &str, m: f64, c: f64, s: f64| ("fixed".to_string(), p.to_string(), m, c, s);
        let checks = dominance(
            &medes,
            &[
                b("above", 9.0, 250.0, 0.02), // Medes 200 ≤ 250: pass
                b("below", 9.0, 150.0, 0.02), // Medes 200 > 150: fail
                b("lean", 7.0, 900.0, 0.05),  // no Medes point that lean: fail
                b("rich", 12.0, 100.0, 0.02), // Medes 100 ≤ 100 with less memory: pass
                b("quiet", 9.0, 10.0, 0.005), // not contended: not checked
            ],
            CONTENDED_SHARE,
        );
        let v: Vec<(&str, bool)> = checks.iter().map(|c| (c.policy.as_str(), c.pass)).collect();
        assert_eq!(
            v,
            vec![
                ("above", true),
                ("below", false),
                ("lean", false),
                ("rich", true)
            ]
        );
        assert_eq!(checks[0].medes_cold_per_hour, Some(200.0));
        assert_eq!(checks[2].medes_cold_per_hour, None);
    }

    fn row(policy: &str, cold: u64, p99: f64, p999: f64, mem: f64) -> Row {
        Row {
            policy: policy.into(),
            pool_gb: 40.0,
            cold_starts: cold,
            cold_starts_per_hour: cold as f64,
            dedup_starts: 0,
            template_starts: 0,
            cold_template_ms: 0.0,
            prewarms: 0,
            invocations: 1000,
            dropped: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            startup_p999_ms: p999,
            startup_p99_ms: p99,
            mean_memory_gb: mem,
            dedup_share: 0.0,
            evictions: 0,
            percentiles: "pooled".into(),
        }
    }

    #[test]
    fn iso_latency_picks_the_leanest_setting_no_worse_on_every_count() {
        let reference = row("fixed-10m", 100, 10.0, 800.0, 10.0);
        let cands = [
            row("lean-but-more-cold", 101, 10.0, 700.0, 7.0),
            row("lean-but-slow-p999", 90, 10.0, 900.0, 7.5),
            row("lean-but-slow-p99", 90, 11.0, 700.0, 7.6),
            row("ok", 100, 10.0, 800.0, 8.5),
            row("ok-richer", 50, 5.0, 300.0, 9.0),
        ];
        assert_eq!(
            iso_latency(&reference, &cands).map(|r| r.policy.as_str()),
            Some("ok")
        );
        assert!(iso_latency(&reference, &cands[..3]).is_none());
    }

    #[test]
    fn the_sweeps_are_valid_policy_names() {
        for p in ISO_MEDES
            .iter()
            .chain(MEDES_CURVE.iter())
            .chain(BASELINE_CURVES.iter().flat_map(|c| c.1.iter()))
            .chain(std::iter::once(&ISO_REFERENCE))
        {
            let s: PolicySpec = p.parse().unwrap();
            assert_eq!(s.to_string(), *p);
        }
    }
}
