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
    }
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
