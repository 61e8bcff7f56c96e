//! `medes replay` (owned by the workload work, issue 3): open-loop replay of a trace file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_trace::Trace;
use medes_workload::ReplayOptions;

use super::suite::ApiArgs;

/// Arguments of `medes replay`.
#[derive(clap::Args)]
pub struct Args {
    /// The trace: CSV `time_ms,function,params` (see functions/README.md).
    file: PathBuf,
    /// Time scaling: 2 replays twice as fast (recorded in the summary).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Directory for invocations.csv and summary.json.
    #[arg(long, default_value = "replay-out")]
    out: PathBuf,
    /// Upper bound on requests in flight.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Runs `medes replay`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let trace =
        Trace::read_path(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let client = args.api.client()?;
    let opts = ReplayOptions {
        speed: args.speed,
        max_in_flight: args.max_in_flight,
        ..Default::default()
    };
    eprintln!(
        "replaying {} invocations of {} functions over {:.1} s (speed ×{}) against {}",
        trace.len(),
        trace.functions().len(),
        trace.duration_ms() as f64 / 1e3 / args.speed,
        args.speed,
        args.api.url
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let outcome = rt.block_on(medes_workload::replay(&client, &trace, &opts, !args.quiet))?;
    let (csv, json) = medes_workload::write_outputs(&args.out, &outcome)?;
    println!("{}", outcome.summary);
    println!("wrote {} and {}", csv.display(), json.display());
    Ok(ExitCode::SUCCESS)
}
