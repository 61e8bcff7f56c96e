//! `medes eval paper`: the paper's evaluation in the simulator, with the report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_sim::eval::{PAPER_POOLS_GB, paper_patterns, run_paper};
use medes_trace::Trace;

/// Prints to stdout, ignoring a closed pipe (e.g. `| head`).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Arguments of `medes eval`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Eval,
}

#[derive(clap::Subcommand)]
enum Eval {
    /// 19 nodes; 40/30/20 GB pools; ten functions; five one-hour patterns; every policy.
    Paper(PaperArgs),
    /// The memory–latency trade-off: Medes's memory at fixed keep-alive 10 min's latency
    /// (paper, paper + platform memory, and measured profiles), and whether Medes's curve
    /// dominates every baseline's on pools scaled to contend each pattern (pass/fail per point).
    Tradeoff(TradeoffArgs),
    /// The simulator against the live platform: one short trace run live (own instance, one
    /// node, a memory budget that forces evictions, scaled timers) under fixed keep-alive and
    /// Medes, and simulated with a measured profile; prints the comparison.
    Validate(ValidateArgs),
}

#[derive(clap::Args)]
struct ValidateArgs {
    /// Trace length, minutes (one recipe window per function).
    #[arg(long, default_value_t = 15)]
    minutes: u32,
    /// Seed of the trace.
    #[arg(long, default_value_t = 3)]
    seed: u64,
    /// Smallest rate of a function's window, invocations per hour (after the recipe's ×5).
    #[arg(long, default_value_t = 60.0)]
    min_per_hour: f64,
    /// Largest rate of a function's window, invocations per hour.
    #[arg(long, default_value_t = 1500.0)]
    max_per_hour: f64,
    /// A trace file instead (`time_ms,function,params`).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// The node's memory budget, MiB.
    #[arg(long, default_value_t = 1024)]
    budget_mb: u64,
    /// The paper's timers (idle 60 s, keep-alive 10 min, keep-dedup 15 min) are divided by
    /// this; default 60 / minutes.
    #[arg(long)]
    timer_scale: Option<f64>,
    /// Medes's memory-mode budget M0, MB (default: the node's budget).
    #[arg(long)]
    m0_mb: Option<f64>,
    /// CPU cores of the simulated node (0: no CPU model). Default 2, this machine's.
    #[arg(long, default_value_t = 2)]
    cores: usize,
    /// CPU cores of the node simulated with the calibrated costs (`simcal`). Default 0: those
    /// costs were measured under the live run's own load, so a CPU model would count the
    /// contention twice (measured: it turned away 202 of 1035 requests that live served).
    #[arg(long, default_value_t = 0)]
    calibrated_cores: usize,
    /// How long the simulated node keeps a cold start's memory-limit reservation after its
    /// first invocation, ms (the live controller re-measures every 2 s: 1000 on average).
    #[arg(long, default_value_t = 1000)]
    start_hold_ms: u64,
    /// The simulated controller's admission bound, ms: an invocation waiting longer for
    /// memory is turned away, as live (the live controller's `admission_wait_ms`, default
    /// 10000); 0: wait without bound.
    #[arg(long, default_value_t = 10_000)]
    admission_timeout_ms: u64,
    /// Measured cost profile (`medes profile --startup ... --out FILE`); default: calibrated
    /// from the live runs themselves (start latencies by kind), the paper's for the rest.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Output directory: live-*/ and sim-*/ runs, report/, validation.json.
    #[arg(long, default_value = "validate-out")]
    out: PathBuf,
    /// Parent of the live instances' data directories.
    #[arg(long, default_value = "/var/lib/medes-validate")]
    data_root: PathBuf,
    /// Reuse the live runs in --out instead of running them again (simulate only).
    #[arg(long)]
    sim_only: bool,
    /// Run only this policy live (`fixed` or `medes`), reusing the other's live run in --out
    /// (e.g. after a controller change that concerns one policy).
    #[arg(long, value_parser = ["fixed", "medes"])]
    live_only: Option<String>,
    /// Medes as `medes-predict` (hold below 90% of the budget, pre-warming, Greedy-Dual
    /// eviction), live and simulated; its runs are labelled `medes-predict`.
    #[arg(long)]
    predict: bool,
    /// Only simulate the trace with --profile (no live runs, no comparison): to choose a
    /// trace and budget before the long live runs.
    #[arg(long)]
    plan: bool,
}

#[derive(clap::Args)]
struct TradeoffArgs {
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Report directory (TRADEOFF.md, plots, tradeoff.json).
    #[arg(long, default_value = "report-tradeoff")]
    out: PathBuf,
    /// Synthetic one-hour patterns.
    #[arg(long, default_value_t = 5)]
    patterns: usize,
    /// Seed of the first pattern and of execution-time draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pool fractions (of each pattern's fixed-10m peak memory) of the dominance check.
    #[arg(long, value_delimiter = ',', default_values_t = medes_sim::tradeoff::DOMINANCE_FRACTIONS)]
    fractions: Vec<f64>,
    /// Profiles: `paper`, `platform-memory` (the paper's with the platform's measured memory
    /// ratios), `measured` (the live platform's), or TOML/JSON files; the dominance check runs
    /// for the first two (pass `--dominance` to choose).
    #[arg(long, value_delimiter = ',', default_values_t = ["paper".to_string(), "platform-memory".to_string(), "measured".to_string()])]
    profiles: Vec<String>,
    /// Profiles (by the names above) that also get the dominance check.
    #[arg(long, value_delimiter = ',', default_values_t = ["paper".to_string(), "platform-memory".to_string()])]
    dominance: Vec<String>,
    /// Keep bases pinned under pressure (the paper's setup); default: an idle base with no
    /// dependents may be evicted, as the live controller does.
    #[arg(long)]
    pin_bases: bool,
}

#[derive(clap::Args)]
struct PaperArgs {
    /// Print `{"rows": [...]}` on stdout.
    #[arg(long)]
    json: bool,
    /// Report directory.
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// Synthetic one-hour patterns (when no --trace is given).
    #[arg(long, default_value_t = 5)]
    patterns: usize,
    /// Seed of the first pattern (pattern i uses seed + i) and of execution-time draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Trace files to use as the patterns instead (e.g. built from the real Azure files with
    /// `medes trace recipe`).
    #[arg(long)]
    trace: Vec<PathBuf>,
    /// Cost profile (default: the paper's numbers).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Pools, GB.
    #[arg(long, value_delimiter = ',', default_values_t = PAPER_POOLS_GB)]
    pools: Vec<f64>,
    /// Skip the sweeps and trade-off curves.
    #[arg(long)]
    no_sweeps: bool,
}

/// Runs `medes eval`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        Eval::Paper(a) => paper(a),
        Eval::Tradeoff(a) => tradeoff(a),
        Eval::Validate(a) => validate(a),
    }
}

fn validate(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    use super::live::{self, LiveSpec, Timers, Which};
    let trace = match &a.trace {
        Some(p) => Trace::read_path(p).with_context(|| format!("reading {}", p.display()))?,
        None => live::short_trace(a.minutes, a.seed, a.min_per_hour, a.max_per_hour)?,
    };
    let minutes = (trace.duration_ms() as f64 / 60_000.0).max(1.0);
    let model = live::NodeModel {
        cores: a.cores,
        start_hold_ms: a.start_hold_ms,
        admission_timeout_ms: a.admission_timeout_ms,
    };
    let mut timers = Timers::scaled(a.timer_scale.unwrap_or(60.0 / minutes));
    timers.medes_m0_mb = a.m0_mb;
    timers.medes_predict = a.predict;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    trace
        .write_path(a.out.join("trace.csv"))
        .context("writing trace.csv")?;
    eprintln!(
        "trace: {} invocations of {} functions over {:.1} min; budget {} MiB; timers idle {} s, keep-alive {} s, keep-dedup {} s",
        trace.len(),
        trace.functions().len(),
        trace.duration_ms() as f64 / 60_000.0,
        a.budget_mb,
        timers.idle_period_s,
        timers.keep_alive_s,
        timers.keep_dedup_s
    );
    if a.plan {
        let profile = live::with_limits(super::sim::load_profile(a.profile.as_ref())?)?;
        for which in Which::BOTH {
            let s = live::run_sim(&trace, &profile, which, &timers, a.budget_mb, model)?.summary;
            say!(
                "{}: {} served, {} cold, {} dedup, {} evictions, p50 {:.0} ms, p99 {:.0} ms, mean {:.0} MB",
                s.policy,
                s.invocations,
                s.cold_starts,
                s.dedup_starts,
                s.counters.evictions,
                s.p50_ms,
                s.p99_ms,
                s.mean_memory_gb * 1000.0
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut lives = Vec::new();
    for which in Which::BOTH {
        let dir = a.out.join(format!("live-{}", which.label(&timers)));
        let skip = a.live_only.as_deref().is_some_and(|p| match which {
            Which::Fixed => p != "fixed",
            Which::Medes => p != "medes",
        });
        let run = if a.sim_only || skip {
            live::read_live(&dir)?
        } else {
            eprintln!("live run under {} ...", which.label(&timers));
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting tokio")?;
            let run = rt.block_on(live::run_live(&LiveSpec {
                trace: &trace,
                which,
                timers,
                budget_mb: a.budget_mb,
                data_root: &a.data_root,
                progress: true,
            }))?;
            live::write_live(&run, &dir)?;
            run
        };
        lives.push(run);
    }
    // Two simulations per policy: with the measured profile (idle-machine costs) and with
    // costs calibrated from the live runs' activations (costs under the replay's load).
    let measured = live::with_limits(super::sim::load_profile(a.profile.as_ref())?)?;
    let calibrated = live::calibrated_profile(&lives, &measured);
    std::fs::write(a.out.join("profile.toml"), measured.to_toml()).context("writing profile")?;
    std::fs::write(a.out.join("profile-calibrated.toml"), calibrated.to_toml())
        .context("writing profile")?;
    let lives: Vec<medes_sim::SimOutput> = lives.into_iter().map(|r| r.output).collect();
    let mut sims = Vec::new();
    let mut cals = Vec::new();
    for which in Which::BOTH {
        let out = live::run_sim(&trace, &measured, which, &timers, a.budget_mb, model)?;
        live::write_run(&out, &a.out.join(&out.policy))?;
        sims.push(out);
        let cal_model = live::NodeModel {
            cores: a.calibrated_cores,
            ..model
        };
        let mut out = live::run_sim(&trace, &calibrated, which, &timers, a.budget_mb, cal_model)?;
        out.policy = out.policy.replacen("sim-", "simcal-", 1);
        out.summary.policy = out.policy.clone();
        live::write_run(&out, &a.out.join(&out.policy))?;
        cals.push(out);
    }
    let mut t = comfy_table::Table::new();
    t.set_header([
        "policy",
        "run",
        "served",
        "failed",
        "cold",
        "dedup",
        "warm",
        "evictions",
        "p50 ms",
        "p99 ms",
        "mean MB",
    ]);
    let mut rows = Vec::new();
    let summary_json = |m: &medes_sim::Summary| serde_json::json!({"cold_starts": m.cold_starts, "dedup_starts": m.dedup_starts, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms, "mean_memory_mb": m.mean_memory_gb * 1000.0, "evictions": m.counters.evictions, "served": m.invocations, "dropped": m.dropped});
    let mut verdicts = Vec::new();
    for ((l, s), c) in lives.iter().zip(&sims).zip(&cals) {
        for o in [l, s, c] {
            let m = &o.summary;
            t.add_row([
                o.policy.clone(),
                o.policy.split('-').next().unwrap_or("").to_string(),
                m.invocations.to_string(),
                m.dropped.to_string(),
                m.cold_starts.to_string(),
                m.dedup_starts.to_string(),
                m.warm_starts.to_string(),
                m.counters.evictions.to_string(),
                format!("{:.0}", m.p50_ms),
                format!("{:.0}", m.p99_ms),
                format!("{:.0}", m.mean_memory_gb * 1000.0),
            ]);
        }
        let policy = l.policy.trim_start_matches("live-").to_string();
        let mut row = serde_json::json!({"policy": policy, "live": summary_json(&l.summary)});
        for (what, o) in [("sim", s), ("simcal", c)] {
            let (lm, sm) = (&l.summary, &o.summary);
            let cold = live::diff_pct(lm.cold_starts as f64, sm.cold_starts as f64);
            let p50 = live::diff_pct(lm.p50_ms, sm.p50_ms);
            let p99 = live::diff_pct(lm.p99_ms, sm.p99_ms);
            let mem = live::diff_pct(lm.mean_memory_gb, sm.mean_memory_gb);
            let ok = (cold.abs() <= 10.0, p50.abs() <= 15.0, p99.abs() <= 25.0);
            verdicts.push((format!("{what} {policy}"), ok.0 && ok.1 && ok.2));
            let mark = |b: bool, lim: &str| {
                if b {
                    "ok".to_string()
                } else {
                    format!("> {lim}")
                }
            };
            t.add_row([
                format!("Δ {what} vs live"),
                String::new(),
                String::new(),
                String::new(),
                format!("{cold:+.1}% {}", mark(ok.0, "10%")),
                String::new(),
                String::new(),
                String::new(),
                format!("{p50:+.1}% {}", mark(ok.1, "15%")),
                format!("{p99:+.1}% {}", mark(ok.2, "25%")),
                format!("{mem:+.1}%"),
            ]);
            row[what] = summary_json(sm);
            row[format!("{what}_diff_pct")] = serde_json::json!({"cold_starts": cold, "p50": p50, "p99": p99, "mean_memory": mem});
        }
        rows.push(row);
    }
    say!("{t}");
    say!("measured profile: {}", measured.source);
    say!("calibrated profile: {}", calibrated.source);
    let json = serde_json::json!({
        "trace_invocations": trace.len(),
        "trace_minutes": trace.duration_ms() as f64 / 60_000.0,
        "budget_mb": a.budget_mb,
        "timers_s": [timers.idle_period_s, timers.keep_alive_s, timers.keep_dedup_s],
        "sim_cores": a.cores,
        "simcal_cores": a.calibrated_cores,
        "sim_start_hold_ms": a.start_hold_ms,
        "sim_admission_timeout_ms": a.admission_timeout_ms,
        "profile": measured.source,
        "rows": rows,
    });
    std::fs::write(
        a.out.join("validation.json"),
        serde_json::to_vec_pretty(&json)?,
    )
    .context("writing validation.json")?;
    let mut runs = Vec::new();
    for ((l, s), c) in lives.into_iter().zip(sims).zip(cals) {
        runs.push(l);
        runs.push(s);
        runs.push(c);
    }
    let report = medes_sim::report::write_runs_report(&runs, &a.out.join("report"))
        .context("writing the report")?;
    for (what, ok) in &verdicts {
        say!(
            "{what}: {}",
            if *ok {
                "agrees within 10% (cold) / 15% (p50) / 25% (p99)"
            } else {
                "differs beyond 10% / 15% / 25% (see docs/EVALUATION.md)"
            }
        );
    }
    say!(
        "outputs in {}, report {}",
        a.out.display(),
        report.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn tradeoff(a: TradeoffArgs) -> anyhow::Result<ExitCode> {
    use medes_sim::tradeoff::{TradeoffConfig, run_tradeoff, write_tradeoff_report};
    let mut profiles = Vec::new();
    for name in &a.profiles {
        let p = super::sim::load_profile(Some(&PathBuf::from(name)))?;
        profiles.push((name.clone(), p, a.dominance.contains(name)));
    }
    eprintln!(
        "building {} one-hour patterns (seed {})...",
        a.patterns, a.seed
    );
    let patterns = paper_patterns(a.patterns.max(1), a.seed).context("building the patterns")?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} runs, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("simulating");
    let cfg = TradeoffConfig {
        fractions: a.fractions.clone(),
        seed: a.seed,
        evict_idle_bases: !a.pin_bases,
    };
    let res = run_tradeoff(&patterns, &profiles, &cfg, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let report = write_tradeoff_report(&res, &a.out)
        .with_context(|| format!("writing the report into {}", a.out.display()))?;
    eprintln!("{:.1} s; report: {}", res.seconds, report.display());
    if a.json {
        say!("{}", serde_json::to_string_pretty(&res)?);
        return Ok(ExitCode::SUCCESS);
    }
    for p in &res.profiles {
        let reference = p.iso_rows.first();
        match (&p.iso_choice, p.iso_memory_change_pct, reference) {
            (Some(c), Some(d), Some(r)) => say!(
                "[{}] at fixed-10m's latency ({} cold, startup p99 {:.0} ms, p99.9 {:.0} ms, {:.2} GB): {} with {} cold, {:.0} / {:.0} ms, {:.2} GB: memory {:+.1}% ({})",
                p.name,
                r.cold_starts,
                r.startup_p99_ms,
                r.startup_p999_ms,
                r.mean_memory_gb,
                c.policy,
                c.cold_starts,
                c.startup_p99_ms,
                c.startup_p999_ms,
                c.mean_memory_gb,
                d,
                if d <= -15.0 {
                    "target -15%: met"
                } else {
                    "target -15%: not met"
                }
            ),
            _ => say!("[{}] no Medes setting meets fixed-10m's latency", p.name),
        }
        for l in &p.levels {
            for c in &l.checks {
                say!(
                    "[{}] pools {:.0}% of peak: {} ({}) {:.0} cold/h ({:.2}%) at {:.2} GB; Medes's curve there: {}: {}",
                    p.name,
                    100.0 * l.fraction,
                    c.policy,
                    c.family,
                    c.cold_per_hour,
                    100.0 * c.cold_share,
                    c.memory_gb,
                    c.medes_cold_per_hour
                        .map_or("no point that lean".to_string(), |v| format!(
                            "{v:.0} cold/h"
                        )),
                    if c.pass { "PASS" } else { "FAIL" }
                );
            }
            if l.checks.is_empty() {
                say!(
                    "[{}] pools {:.0}% of peak: no baseline point above 1% cold starts",
                    p.name,
                    100.0 * l.fraction
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn paper(a: PaperArgs) -> anyhow::Result<ExitCode> {
    let profile = super::sim::load_profile(a.profile.as_ref())?;
    let patterns: Vec<Trace> = if a.trace.is_empty() {
        eprintln!(
            "building {} one-hour patterns (seed {})...",
            a.patterns, a.seed
        );
        paper_patterns(a.patterns.max(1), a.seed).context("building the patterns")?
    } else {
        a.trace
            .iter()
            .map(|p| Trace::read_path(p).with_context(|| format!("reading {}", p.display())))
            .collect::<anyhow::Result<_>>()?
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} runs, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("simulating");
    let res = run_paper(
        &patterns,
        &profile,
        &a.pools,
        !a.no_sweeps,
        a.seed,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let report = medes_sim::report::write_paper_report(&res, &a.out)
        .with_context(|| format!("writing the report into {}", a.out.display()))?;
    eprintln!(
        "{} runs in {:.1} s; report: {}",
        res.main.len() + res.extra.len(),
        res.seconds,
        report.display()
    );
    if a.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "rows": res.rows }))?
        );
    } else {
        let mut t = comfy_table::Table::new();
        t.set_header([
            "policy",
            "pool GB",
            "cold starts",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "startup p99.9",
            "mean GB",
        ]);
        for r in &res.rows {
            t.add_row([
                r.policy.clone(),
                format!("{:.0}", r.pool_gb),
                r.cold_starts.to_string(),
                format!("{:.0}", r.p50_ms),
                format!("{:.0}", r.p99_ms),
                format!("{:.0}", r.p999_ms),
                format!("{:.0}", r.startup_p999_ms),
                format!("{:.2}", r.mean_memory_gb),
            ]);
        }
        say!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}
