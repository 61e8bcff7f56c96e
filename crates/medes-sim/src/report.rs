//! The evaluation report: Markdown with PNG plots, our numbers next to the paper's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::eval::{
    GD_POOLS_GB, KA_SWEEP, KD_SWEEP, MAIN_POLICIES, PaperResults, Row, Run, TRADEOFF,
    TRADEOFF_POOL_GB, VARIANTS,
};
use crate::output::{SimOutput, percentile};

/// Why the report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// File system.
    #[error("writing {path:?}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("drawing {path:?}: {message}")]
    Plot {
        /// The path.
        path: PathBuf,
        /// The plotting backend's message.
        message: String,
    },
}

fn plot_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The paper's Fig. 10a: cold starts per one-hour run (fixed, adaptive, Medes) per pool.
pub const PAPER_FIG10: [(f64, f64, f64, f64); 3] = [
    (40.0, 1684.0, 2838.0, 1310.0),
    (30.0, 2137.0, 2820.0, 1343.0),
    (20.0, 2702.0, 3384.0, 1603.0),
];

/// The paper's Fig. 7b: per-function cold starts (fixed, adaptive, Medes) and tail latency
/// (fixed, Medes, ms) at 40 GB.
pub const PAPER_FIG7B: [(&str, f64, f64, f64, f64, f64); 10] = [
    ("vanilla", 78.0, 145.0, 52.0, 724.0, 393.0),
    ("linalg", 120.0, 120.0, 130.0, 266.0, 275.0),
    ("imagepro", 241.0, 391.0, 217.0, 1891.0, 1472.0),
    ("videopro", 264.0, 266.0, 158.0, 2755.0, 2237.0),
    ("mapreduce", 183.0, 334.0, 178.0, 985.0, 777.0),
    ("htmlserve", 49.0, 94.0, 49.0, 1131.0, 1135.0),
    ("authenc", 89.0, 155.0, 73.0, 902.0, 563.0),
    ("featuregen", 213.0, 216.0, 134.0, 2429.0, 1749.0),
    ("modelserve", 95.0, 314.0, 80.0, 1552.0, 1257.0),
    ("modeltrain", 352.0, 802.0, 239.0, 4260.0, 3548.0),
];

/// The paper's Fig. 12 (keep-alive sweep, cold starts).
pub const PAPER_FIG12: [(&str, f64); 5] = [
    ("fixed-5m", 3232.0),
    ("fixed-10m", 2931.0),
    ("fixed-15m", 3016.0),
    ("fixed-20m", 4000.0),
    ("medes", 1810.0),
];

/// The paper's Fig. 15 (keep-dedup sweep, cold starts; "no dedup" = fixed keep-alive).
pub const PAPER_FIG15: [(&str, f64); 5] = [
    ("fixed-10m", 2931.0),
    ("medes-kd-5m", 2771.0),
    ("medes-kd-10m", 2324.0),
    ("medes", 1810.0),
    ("medes-kd-20m", 1908.0),
];

/// The paper's Fig. 9a mean cluster memory, GB (Medes, fixed, adaptive).
pub const PAPER_FIG9A_MEAN_GB: [(&str, f64); 3] = [
    ("medes", 21.4),
    ("fixed-10m", 25.7),
    ("hybrid-histogram", 16.7),
];

const BASELINES: [&str; 3] = ["fixed-10m", "hybrid-histogram", "greedy-dual"];

fn pct_change(ours: f64, base: f64) -> f64 {
    if base > 0.0 {
        100.0 * (ours - base) / base
    } else {
        0.0
    }
}

fn fmt_pct(v: f64) -> String {
    format!("{v:+.1}%")
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// Grouped bar chart: `series` of values per category.
fn bar_chart(
    path: &Path,
    title: &str,
    ylabel: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), ReportError> {
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.15;
    let n = categories.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(&e)?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 {
                cats.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(ylabel)
        .draw()
        .map_err(&e)?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (j, (name, vals)) in series.iter().enumerate() {
        let c = color(j);
        chart
            .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.95, v)], c.filled())
            }))
            .map_err(&e)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Line chart of (x, y) series; `log_x` for a logarithmic x axis.
#[allow(clippy::too_many_arguments)]
pub(crate) fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_range: (f64, f64),
    log_x: bool,
    points: bool,
) -> Result<(), ReportError> {
    let e = plot_err(path);
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.08;
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc(ylabel)
                .draw()
                .map_err(&e)?;
            for (j, (name, pts)) in series.iter().enumerate() {
                let c = color(j);
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(&e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 14, y)], c.stroke_width(2))
                    });
                if points {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                        .map_err(&e)?;
                }
            }
            chart
                .configure_series_labels()
                .position(if points {
                    SeriesLabelPosition::UpperRight
                } else {
                    SeriesLabelPosition::LowerRight
                })
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(&e)?;
        }};
    }
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if log_x {
        draw!(
            b.build_cartesian_2d((x_range.0..x_range.1).log_scale(), 0f64..ymax)
                .map_err(&e)?
        );
    } else if points {
        // Scatter-style curves (trade-offs) span orders of magnitude: log y.
        let ymin = series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .filter(|&y| y > 0.0)
            .fold(f64::INFINITY, f64::min);
        if ymin.is_finite() && ymax / ymin < 10.0 {
            // Within a decade a log axis has no labels: linear, fitted to the points.
            let ymax = ymax / 1.08;
            let pad = ((ymax - ymin) * 0.08).max(1e-9);
            draw!(
                b.build_cartesian_2d(x_range.0..x_range.1, (ymin - pad)..(ymax + pad))
                    .map_err(&e)?
            );
        } else {
            let ymin = if ymin.is_finite() { ymin / 1.5 } else { 0.1 };
            draw!(
                b.build_cartesian_2d(x_range.0..x_range.1, (ymin..ymax * 1.5).log_scale())
                    .map_err(&e)?
            );
        }
    } else {
        draw!(
            b.build_cartesian_2d(x_range.0..x_range.1, 0f64..ymax)
                .map_err(&e)?
        );
    }
    root.present().map_err(&e)?;
    Ok(())
}

fn runs_of<'a>(res: &'a PaperResults, policy: &str, pool: f64) -> Vec<&'a Run> {
    res.runs()
        .filter(|r| r.policy.to_string() == policy && r.pool_gb == pool)
        .collect()
}

/// Per-request ratios baseline ÷ Medes over all patterns (sorted).
fn ratios(res: &PaperResults, base: &str, pool: f64) -> Vec<f64> {
    let b = runs_of(res, base, pool);
    let m = runs_of(res, "medes", pool);
    let mut out = Vec::new();
    for rb in &b {
        if let Some(rm) = m.iter().find(|r| r.pattern == rb.pattern) {
            for (x, y) in rb.e2e.iter().zip(&rm.e2e) {
                if x.is_finite() && y.is_finite() && *y > 0.0 {
                    out.push(f64::from(*x) / f64::from(*y));
                }
            }
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

/// (function, cold starts, p99, p99.9, startup p99.9).
type FnTail = (String, u64, f64, f64, f64);

/// Pooled per-function (cold starts, p99, p99.9, startup p99.9) over the patterns.
fn per_function(res: &PaperResults, policy: &str, pool: f64) -> Vec<FnTail> {
    let runs = runs_of(res, policy, pool);
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    let names = first.output.functions.clone();
    names
        .iter()
        .map(|name| {
            let mut e = Vec::new();
            let mut s = Vec::new();
            let mut cold = 0u64;
            for r in &runs {
                let Some(fi) = r.output.functions.iter().position(|n| n == name) else {
                    continue;
                };
                for i in 0..r.e2e.len() {
                    if r.func[i] as usize == fi && r.e2e[i].is_finite() {
                        e.push(f64::from(r.e2e[i]));
                        s.push(f64::from(r.startup[i]));
                        cold += u64::from(r.cold[i]);
                    }
                }
            }
            e.sort_by(f64::total_cmp);
            s.sort_by(f64::total_cmp);
            (
                name.clone(),
                cold,
                percentile(&e, 99.0),
                percentile(&e, 99.9),
                percentile(&s, 99.9),
            )
        })
        .collect()
}

fn row_line(r: &Row) -> String {
    format!(
        "| {}{} | {:.0} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1}% | {} |",
        r.policy,
        if r.percentiles == "pooled" { "" } else { "*" },
        r.pool_gb,
        r.cold_starts,
        r.cold_starts_per_hour,
        r.dedup_starts,
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.startup_p999_ms,
        r.mean_memory_gb,
        100.0 * r.dedup_share,
        r.evictions
    )
}

const ROW_HEADER: &str = "| policy | pool GB | cold starts | per hour | dedup starts | p50 ms | p99 ms | p99.9 ms | startup p99.9 ms | mean memory GB | dedup share | evictions |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn memory_stats(runs: &[&Run]) -> (f64, f64, f64, f64, f64, f64) {
    let mut v: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.output.memory.iter().map(|m| m.used_mb / 1000.0))
        .collect();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (
        mean,
        percentile(&v, 50.0),
        percentile(&v, 25.0),
        percentile(&v, 75.0),
        percentile(&v, 5.0),
        percentile(&v, 95.0),
    )
}

/// The four-way template comparison (issue 8): fixed keep-alive, template starts alone, Medes,
/// Medes with template starts, by pool.
fn template_section(
    res: &PaperResults,
    pools: &[f64],
    dir: &Path,
    md: &mut String,
) -> Result<(), ReportError> {
    let four: [(&str, &str); 6] = [
        ("(a) fixed keep-alive", "fixed-10m"),
        ("(b) template starts alone", "fixed-10m+template"),
        ("(c) Medes (paper's rules)", "medes"),
        ("(d) Medes + template starts", "medes+template"),
        ("(c) medes-predict", "medes-predict"),
        (
            "(d) medes-predict + template starts",
            "medes-predict+template",
        ),
    ];
    if !pools
        .iter()
        .any(|p| res.row("fixed-10m+template", *p).is_some())
    {
        return Ok(());
    }
    let _ = writeln!(
        md,
        "## Template starts (issue 8): fixed keep-alive, template starts alone, Medes, Medes with \
         template starts\n\n\
         Template starts: after a node's first real cold start of a function the node keeps its \
         template image (charged to the node) and later starts there restore from it. \
         *Cold + template start time* sums the startup latency (waits included) of every cold \
         and template start. Target: (d) below (b) at every pool.\n\n\
         | pool GB | policy | cold starts | template starts | dedup starts | cold + template start time, s | mean memory GB | evictions |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for &pool in pools {
        for (label, p) in four {
            if let Some(r) = res.row(p, pool) {
                let _ = writeln!(
                    md,
                    "| {pool:.0} | {label}: `{p}` | {} | {} | {} | {:.1} | {:.2} | {} |",
                    r.cold_starts,
                    r.template_starts,
                    r.dedup_starts,
                    r.cold_template_ms / 1000.0,
                    r.mean_memory_gb,
                    r.evictions
                );
            }
        }
    }
    let cats: Vec<String> = pools.iter().map(|p| format!("{p:.0} GB")).collect();
    let series: Vec<(String, Vec<f64>)> = four
        .iter()
        .map(|(_, p)| {
            (
                p.to_string(),
                pools
                    .iter()
                    .map(|pool| {
                        res.row(p, *pool).map_or(0.0, |r| {
                            r.cold_template_ms / 1000.0 / res.pattern_sizes.len().max(1) as f64
                        })
                    })
                    .collect(),
            )
        })
        .collect();
    let f = dir.join("templates_cold_template_time.png");
    bar_chart(
        &f,
        "Cold + template start time per one-hour pattern",
        "seconds / hour",
        &cats,
        &series,
    )?;
    let _ = writeln!(
        md,
        "\n![template comparison](templates_cold_template_time.png)\n"
    );
    Ok(())
}

/// Writes `REPORT.md`, `rows.json` and the plots into `dir`; returns the Markdown path.
pub fn write_paper_report(res: &PaperResults, dir: &Path) -> Result<PathBuf, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut md = String::new();
    let pools: Vec<f64> = {
        let mut p: Vec<f64> = res.main.iter().map(|r| r.pool_gb).collect();
        p.sort_by(|a, b| b.total_cmp(a));
        p.dedup();
        p
    };
    let main_pool = pools.first().copied().unwrap_or(40.0);
    let n_pat = res.pattern_sizes.len();
    let _ = writeln!(md, "# Medes evaluation (simulated)\n");
    let _ = writeln!(
        md,
        "Setup: 19 worker nodes; pools {} GB split evenly; ten functions; {} one-hour patterns \
         ({} invocations in total: {}); profile: {}. Every policy sees the same patterns and \
         pools. Cold starts are summed over the patterns (per hour: their mean); percentiles \
         are over all invocations, end to end (startup + execution); memory is the \
         time-average of the cluster's charged memory. Generated in {:.1} s.\n",
        pools
            .iter()
            .map(|p| format!("{p:.0}"))
            .collect::<Vec<_>>()
            .join("/"),
        n_pat,
        res.pattern_sizes.iter().sum::<usize>(),
        res.pattern_sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        res.profile_source,
        res.seconds
    );
    let _ = writeln!(
        md,
        "The paper's numbers come from one-hour runs on its testbed with Azure patterns we do \
         not have; compare *relative* changes, not absolute counts.\n"
    );

    // Headline table.
    let _ = write!(md, "## Results per policy and pool\n\n{ROW_HEADER}");
    for pool in &pools {
        for p in MAIN_POLICIES.iter().chain(VARIANTS.iter()) {
            if let Some(r) = res.row(p, *pool) {
                let _ = writeln!(md, "{}", row_line(r));
            }
        }
    }
    let _ = writeln!(
        md,
        "\n`medes` follows the paper's equations and the prototype's rules; `medes-hold-0.9` \
         destroys nothing on its timers while the cluster is below 90% of its budget (a warm \
         sandbox past keep-alive is deduplicated instead; eviction frees memory under \
         pressure); `medes-predict` (recommended) adds arrival prediction (pre-warms to the \
         concurrency the last 10 s of arrivals need) and Greedy-Dual eviction with dedup as \
         the cheaper state. Pre-warms are off the request path and not cold starts; their \
         memory is in the means (`prewarms` in rows.json).\n"
    );

    // Targets.
    let _ = writeln!(
        md,
        "\n## Cold starts: Medes vs the baselines (paper Fig. 10a)\n"
    );
    let _ = writeln!(
        md,
        "| pool GB | vs fixed-10m (ours) | paper | target | vs hybrid-histogram (ours) | paper | target | vs greedy-dual (ours) | target |\n|---|---|---|---|---|---|---|---|---|"
    );
    for &(pool, pf, pa, pm) in &PAPER_FIG10 {
        let get = |p: &str| res.row(p, pool).map(|r| r.cold_starts as f64);
        let (Some(m), Some(f), Some(h), Some(g)) = (
            get("medes"),
            get("fixed-10m"),
            get("hybrid-histogram"),
            get("greedy-dual"),
        ) else {
            continue;
        };
        let tf = if pool >= 40.0 { "−35%" } else { "−45%" };
        let mut dka = String::new();
        for v in VARIANTS.iter().chain(["medes-predict"].iter()) {
            if let Some(d) = get(v) {
                let _ = write!(
                    dka,
                    " ({v}: {} / {} / {})",
                    fmt_pct(pct_change(d, f)),
                    fmt_pct(pct_change(d, h)),
                    fmt_pct(pct_change(d, g))
                );
            }
        }
        let _ = writeln!(
            md,
            "| {pool:.0} | {}{dka} | {} | {tf} | {} | {} | −55% | {} | < 0% |",
            fmt_pct(pct_change(m, f)),
            fmt_pct(pct_change(pm, pf)),
            fmt_pct(pct_change(m, h)),
            fmt_pct(pct_change(pm, pa)),
            fmt_pct(pct_change(m, g)),
        );
    }
    let _ = writeln!(
        md,
        "\nPaper's absolute cold starts per one-hour run (fixed / adaptive / Medes): {}.\n",
        PAPER_FIG10
            .iter()
            .map(|(p, f, a, m)| format!("{p:.0} GB: {f:.0} / {a:.0} / {m:.0}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let cats: Vec<String> = pools.iter().map(|p| format!("{p:.0} GB")).collect();
    let series: Vec<(String, Vec<f64>)> = MAIN_POLICIES
        .iter()
        .map(|p| {
            (
                p.to_string(),
                pools
                    .iter()
                    .map(|pool| res.row(p, *pool).map_or(0.0, |r| r.cold_starts_per_hour))
                    .collect(),
            )
        })
        .collect();
    let f = dir.join("fig10_cold_starts_vs_pool.png");
    bar_chart(
        &f,
        "Cold starts per one-hour pattern vs memory pool (Fig. 10)",
        "cold starts / hour",
        &cats,
        &series,
    )?;
    let _ = writeln!(
        md,
        "![cold starts vs pool](fig10_cold_starts_vs_pool.png)\n"
    );
    template_section(res, &pools, dir, &mut md)?;

    // Fig. 7a: latency ratio CDF.
    let _ = writeln!(
        md,
        "## Per-request end-to-end latency, baseline ÷ Medes (paper Fig. 7a), {main_pool:.0} GB\n"
    );
    let _ = writeln!(
        md,
        "| baseline | requests | slower with Medes (ratio < 1) | ratio p50 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|"
    );
    let mut cdfs = Vec::new();
    for b in BASELINES {
        let r = ratios(res, b, main_pool);
        if r.is_empty() {
            continue;
        }
        let slower = r.iter().filter(|&&x| x < 0.999).count() as f64 / r.len() as f64;
        let _ = writeln!(
            md,
            "| {b} | {} | {:.2}% | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.len(),
            100.0 * slower,
            percentile(&r, 50.0),
            percentile(&r, 99.0),
            percentile(&r, 99.9),
            r.last().copied().unwrap_or(0.0)
        );
        let n = r.len() as f64;
        let step = (r.len() / 2000).max(1);
        let pts: Vec<(f64, f64)> = r
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(i, &x)| (x.clamp(0.1, 10.0), (i + 1) as f64 / n))
            .chain(std::iter::once((
                r.last().copied().unwrap_or(1.0).clamp(0.1, 10.0),
                1.0,
            )))
            .collect();
        cdfs.push((format!("{b} ÷ medes"), pts));
    }
    let _ = writeln!(
        md,
        "\nPaper: up to 2.25× (fixed) and 2.75× (adaptive) per-request improvement; fewer than 1% of requests slower.\n"
    );
    let f = dir.join("fig7a_latency_ratio_cdf.png");
    line_chart(
        &f,
        "CDF of per-request latency ratio baseline / Medes (Fig. 7a)",
        "ratio (log)",
        "CDF",
        &cdfs,
        (0.1, 10.0),
        true,
        false,
    )?;
    let _ = writeln!(md, "![latency ratio cdf](fig7a_latency_ratio_cdf.png)\n");

    // Fig. 7b: per function.
    let _ = writeln!(
        md,
        "## Per function at {main_pool:.0} GB (paper Fig. 7b; fixed percentiles)\n"
    );
    let per: Vec<(&str, Vec<FnTail>)> = MAIN_POLICIES
        .iter()
        .map(|p| (*p, per_function(res, p, main_pool)))
        .collect();
    let _ = writeln!(
        md,
        "Cold starts (summed over the patterns; paper: one run):\n\n| function | fixed-10m | hybrid | greedy-dual | medes | medes-predict | paper fixed | paper adaptive | paper medes |\n|---|---|---|---|---|---|---|---|---|"
    );
    let names: Vec<String> = per
        .first()
        .map(|(_, v)| v.iter().map(|x| x.0.clone()).collect())
        .unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let paper = PAPER_FIG7B.iter().find(|p| p.0 == name);
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            per[0].1[i].1,
            per[1].1[i].1,
            per[2].1[i].1,
            per[3].1[i].1,
            per[4].1[i].1,
            paper.map_or("-".into(), |p| format!("{:.0}", p.1)),
            paper.map_or("-".into(), |p| format!("{:.0}", p.2)),
            paper.map_or("-".into(), |p| format!("{:.0}", p.3)),
        );
    }
    let _ = writeln!(
        md,
        "\nEnd-to-end p99 / p99.9 and startup p99.9, ms (paper: tail latency, fixed → Medes):\n\n| function | fixed-10m p99 / p99.9 | hybrid p99 / p99.9 | greedy-dual p99 / p99.9 | medes p99 / p99.9 | medes-predict p99 / p99.9 | p99.9 fixed ÷ medes-predict | startup p99.9 fixed → medes → medes-predict (× fixed ÷ medes-predict) | paper tail fixed → medes (×) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (i, name) in names.iter().enumerate() {
        let paper = PAPER_FIG7B.iter().find(|p| p.0 == name);
        let sf = per[0].1[i].4;
        let sm = per[3].1[i].4;
        let sp = per[4].1[i].4;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let _ = writeln!(
            md,
            "| {name} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2}× | {:.0} → {:.0} → {:.0} ({:.2}×) | {} |",
            per[0].1[i].2,
            per[0].1[i].3,
            per[1].1[i].2,
            per[1].1[i].3,
            per[2].1[i].2,
            per[2].1[i].3,
            per[3].1[i].2,
            per[3].1[i].3,
            per[4].1[i].2,
            per[4].1[i].3,
            ratio(per[0].1[i].3, per[4].1[i].3),
            sf,
            sm,
            sp,
            ratio(sf, sp),
            paper.map_or("-".into(), |p| {
                format!("{:.0} → {:.0} ({:.2}×)", p.4, p.5, ratio(p.4, p.5))
            }),
        );
    }
    let series: Vec<(String, Vec<f64>)> = per
        .iter()
        .map(|(p, v)| (p.to_string(), v.iter().map(|x| x.1 as f64).collect()))
        .collect();
    let f = dir.join("fig7b_cold_starts_per_function.png");
    bar_chart(
        &f,
        &format!("Cold starts per function, {main_pool:.0} GB (Fig. 7b)"),
        "cold starts",
        &names,
        &series,
    )?;
    let _ = writeln!(
        md,
        "\n![per function](fig7b_cold_starts_per_function.png)\n"
    );

    // Fig. 9: memory.
    let _ = writeln!(md, "## Cluster memory (paper Fig. 9), {main_pool:.0} GB\n");
    let _ = writeln!(
        md,
        "| policy | mean GB | median | IQR | p5–p95 | paper mean |\n|---|---|---|---|---|---|"
    );
    let mut mem_series = Vec::new();
    for p in MAIN_POLICIES {
        let runs = runs_of(res, p, main_pool);
        if runs.is_empty() {
            continue;
        }
        let (mean, med, q1, q3, lo, hi) = memory_stats(&runs);
        let paper = PAPER_FIG9A_MEAN_GB
            .iter()
            .find(|x| x.0 == p)
            .map_or("-".into(), |x| format!("{:.1}", x.1));
        let _ = writeln!(
            md,
            "| {p} | {mean:.2} | {med:.2} | {q1:.2}–{q3:.2} | {lo:.2}–{hi:.2} | {paper} |"
        );
        if let Some(r0) = runs.iter().find(|r| r.pattern == 0) {
            mem_series.push((
                p.to_string(),
                r0.output
                    .memory
                    .iter()
                    .map(|m| (m.time_ms as f64 / 60_000.0, m.used_mb / 1000.0))
                    .collect::<Vec<_>>(),
            ));
        }
    }
    let tmax = mem_series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let f = dir.join("fig9_memory_over_time.png");
    line_chart(
        &f,
        &format!("Cluster memory over time, pattern 0, {main_pool:.0} GB (Fig. 9)"),
        "minutes",
        "GB",
        &mem_series,
        (0.0, tmax),
        false,
        false,
    )?;
    let _ = writeln!(md, "\n![memory](fig9_memory_over_time.png)\n");

    // Fig. 12 and 15.
    let sweep = |md: &mut String,
                 title: &str,
                 names: &[&str],
                 paper: &[(&str, f64)],
                 file: &str|
     -> Result<(), ReportError> {
        let _ = writeln!(
            md,
            "## {title}\n\n| policy | cold starts | per hour | vs fixed-10m | paper | paper vs KA-10 | mean memory GB |\n|---|---|---|---|---|---|---|"
        );
        let base = res.row("fixed-10m", 40.0).map(|r| r.cold_starts as f64);
        let pbase = 2931.0;
        let mut cats = Vec::new();
        let mut ours = Vec::new();
        for n in names {
            let Some(r) = res.row(n, 40.0) else { continue };
            let pp = paper.iter().find(|x| x.0 == *n).map(|x| x.1);
            let _ = writeln!(
                md,
                "| {n} | {} | {:.0} | {} | {} | {} | {:.2} |",
                r.cold_starts,
                r.cold_starts_per_hour,
                base.map_or("-".into(), |b| fmt_pct(pct_change(r.cold_starts as f64, b))),
                pp.map_or("-".into(), |v| format!("{v:.0}")),
                pp.map_or("-".into(), |v| fmt_pct(pct_change(v, pbase))),
                r.mean_memory_gb
            );
            cats.push(n.to_string());
            ours.push(r.cold_starts_per_hour);
        }
        let f = dir.join(file);
        bar_chart(
            &f,
            title,
            "cold starts / hour",
            &cats,
            &[("ours".to_string(), ours)],
        )?;
        let _ = writeln!(md, "\n![{title}]({file})\n");
        Ok(())
    };
    let mut ka: Vec<&str> = KA_SWEEP.to_vec();
    ka.push("medes");
    sweep(
        &mut md,
        "Keep-alive sweep vs Medes, 40 GB (paper Fig. 12)",
        &ka,
        &PAPER_FIG12,
        "fig12_keepalive_sweep.png",
    )?;
    let mut kd: Vec<&str> = vec!["fixed-10m"];
    kd.extend(KD_SWEEP);
    sweep(
        &mut md,
        "Keep-dedup sweep, 40 GB (paper Fig. 15; fixed-10m = no dedup)",
        &kd,
        &PAPER_FIG15,
        "fig15_keepdedup_sweep.png",
    )?;

    // Trade-off curves.
    let _ = writeln!(
        md,
        "## Trade-off: cold starts vs memory, knob swept ({TRADEOFF_POOL_GB:.0} GB pool; Greedy-Dual: pool swept)\n\n| family | policy | pool GB | cold starts / hour | mean memory GB | p99.9 ms |\n|---|---|---|---|---|---|"
    );
    let mut curves = Vec::new();
    for (family, ps) in TRADEOFF {
        let mut pts = Vec::new();
        for p in ps {
            if let Some(r) = res.row(p, TRADEOFF_POOL_GB) {
                let _ = writeln!(
                    md,
                    "| {family} | {p} | {:.0} | {:.0} | {:.2} | {:.0} |",
                    r.pool_gb, r.cold_starts_per_hour, r.mean_memory_gb, r.p999_ms
                );
                pts.push((r.mean_memory_gb, r.cold_starts_per_hour));
            }
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        curves.push((family.to_string(), pts));
    }
    let mut pts = Vec::new();
    for pool in GD_POOLS_GB {
        if let Some(r) = res.row("greedy-dual", pool) {
            let _ = writeln!(
                md,
                "| greedy-dual | greedy-dual | {pool:.0} | {:.0} | {:.2} | {:.0} |",
                r.cold_starts_per_hour, r.mean_memory_gb, r.p999_ms
            );
            pts.push((r.mean_memory_gb, r.cold_starts_per_hour));
        }
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    curves.push(("greedy-dual".to_string(), pts));
    let xmax = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.1;
    if curves.iter().any(|c| !c.1.is_empty()) {
        let f = dir.join("tradeoff_cold_starts_vs_memory.png");
        line_chart(
            &f,
            "Cold starts vs mean memory, knob swept",
            "mean memory (GB)",
            "cold starts / hour",
            &curves,
            (0.0, xmax),
            false,
            true,
        )?;
        let _ = writeln!(md, "\n![trade-off](tradeoff_cold_starts_vs_memory.png)\n");
        let _ = writeln!(
            md,
            "Memory at fixed keep-alive's latency and the dominance check on contended pools \
             (pass/fail per baseline point): `medes eval tradeoff` (its own report, \
             `TRADEOFF.md`).\n"
        );
    }

    // All rows.
    let _ = write!(
        md,
        "## Every run\n\nRows marked * aggregate percentiles as the mean of the patterns' \
         percentiles (sweep runs keep no per-invocation records); the others pool every \
         invocation.\n\n{ROW_HEADER}"
    );
    for r in &res.rows {
        let _ = writeln!(md, "{}", row_line(r));
    }
    let p = dir.join("REPORT.md");
    std::fs::write(&p, md).map_err(io(&p))?;
    let j = dir.join("rows.json");
    let text =
        serde_json::to_string_pretty(&serde_json::json!({ "rows": res.rows })).unwrap_or_default();
    std::fs::write(&j, text).map_err(io(&j))?;
    Ok(p)
}

/// A report comparing runs of one trace (from `medes sim` or a live replay in the same
/// format): summary table, per-function cold starts and tails, memory over time, and the
/// per-request latency ratio of every run ÷ the reference run (the first run named `medes*`,
/// `live-medes*` or `sim-medes*`, or the last one). Writes `REPORT.md` and plots into `dir`.
pub fn write_runs_report(runs: &[SimOutput], dir: &Path) -> Result<PathBuf, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut md = String::from("# Run comparison\n\n");
    let _ = writeln!(
        md,
        "| policy | invocations | cold | dedup | warm | p50 ms | p99 ms | p99.9 ms | startup p99.9 ms | mean memory GB | peak GB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in runs {
        let s = &r.summary;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            s.policy,
            s.invocations,
            s.cold_starts,
            s.dedup_starts,
            s.warm_starts,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.startup_p999_ms,
            s.mean_memory_gb,
            s.peak_memory_gb
        );
    }
    let names: Vec<String> = runs
        .first()
        .map(|r| r.functions.clone())
        .unwrap_or_default();
    if !names.is_empty() {
        let _ = writeln!(md, "\n## Per function: cold starts, p99 / p99.9 ms\n");
        let _ = write!(md, "| function |");
        for r in runs {
            let _ = write!(md, " {} |", r.summary.policy);
        }
        let _ = writeln!(md, "\n|---|{}", "---|".repeat(runs.len()));
        for name in &names {
            let _ = write!(md, "| {name} |");
            for r in runs {
                match r.summary.functions.iter().find(|f| &f.name == name) {
                    Some(f) => {
                        let _ = write!(
                            md,
                            " {} cold, {:.0} / {:.0} |",
                            f.cold_starts, f.p99_ms, f.p999_ms
                        );
                    }
                    None => md.push_str(" - |"),
                }
            }
            md.push('\n');
        }
        let series: Vec<(String, Vec<f64>)> = runs
            .iter()
            .map(|r| {
                (
                    r.summary.policy.clone(),
                    names
                        .iter()
                        .map(|n| {
                            r.summary
                                .functions
                                .iter()
                                .find(|f| &f.name == n)
                                .map_or(0.0, |f| f.cold_starts as f64)
                        })
                        .collect(),
                )
            })
            .collect();
        let f = dir.join("cold_starts_per_function.png");
        bar_chart(
            &f,
            "Cold starts per function",
            "cold starts",
            &names,
            &series,
        )?;
        let _ = writeln!(md, "\n![cold starts](cold_starts_per_function.png)\n");
    }
    let mem: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            (
                r.summary.policy.clone(),
                r.memory
                    .iter()
                    .map(|m| (m.time_ms as f64 / 60_000.0, m.used_mb / 1000.0))
                    .collect(),
            )
        })
        .collect();
    let tmax = mem
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let f = dir.join("memory_over_time.png");
    line_chart(
        &f,
        "Cluster memory over time",
        "minutes",
        "GB",
        &mem,
        (0.0, tmax),
        false,
        false,
    )?;
    let _ = writeln!(md, "## Memory\n\n![memory](memory_over_time.png)\n");
    let reference = runs
        .iter()
        .position(|r| {
            let p = &r.summary.policy;
            let p = p
                .strip_prefix("live-")
                .or_else(|| p.strip_prefix("sim-"))
                .unwrap_or(p);
            p.starts_with("medes")
        })
        .unwrap_or(runs.len().saturating_sub(1));
    if let Some(refr) = runs.get(reference) {
        let by_req = |r: &SimOutput| {
            let mut v: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();
            for x in &r.records {
                v.insert(x.request, x.e2e_ms);
            }
            v
        };
        let rmap = by_req(refr);
        let mut cdfs = Vec::new();
        let _ = writeln!(
            md,
            "## Per-request latency ratio ÷ {}\n\n| run | requests | slower (ratio < 1) | p50 | p99 | p99.9 |\n|---|---|---|---|---|---|",
            refr.summary.policy
        );
        for (i, r) in runs.iter().enumerate() {
            if i == reference {
                continue;
            }
            let mut v: Vec<f64> = r
                .records
                .iter()
                .filter_map(|x| {
                    rmap.get(&x.request)
                        .filter(|&&y| y > 0.0)
                        .map(|y| x.e2e_ms / y)
                })
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let slower = v.iter().filter(|&&x| x < 0.999).count() as f64 / v.len() as f64;
            let _ = writeln!(
                md,
                "| {} | {} | {:.2}% | {:.2} | {:.2} | {:.2} |",
                r.summary.policy,
                v.len(),
                100.0 * slower,
                percentile(&v, 50.0),
                percentile(&v, 99.0),
                percentile(&v, 99.9)
            );
            let n = v.len() as f64;
            let step = (v.len() / 2000).max(1);
            cdfs.push((
                format!("{} ÷ {}", r.summary.policy, refr.summary.policy),
                v.iter()
                    .enumerate()
                    .step_by(step)
                    .map(|(i, &x)| (x.clamp(0.1, 10.0), (i + 1) as f64 / n))
                    .collect::<Vec<_>>(),
            ));
        }
        if !cdfs.is_empty() {
            let f = dir.join("latency_ratio_cdf.png");
            line_chart(
                &f,
                "CDF of per-request latency ratio",
                "ratio (log)",
                "CDF",
                &cdfs,
                (0.1, 10.0),
                true,
                false,
            )?;
            let _ = writeln!(md, "\n![ratio](latency_ratio_cdf.png)\n");
        }
    }
    let p = dir.join("REPORT.md");
    std::fs::write(&p, md).map_err(io(&p))?;
    Ok(p)
}
