//! `medes report`: a Markdown report with plots from `medes sim --out` directories (or replay
//! outputs in the same format).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_sim::SimOutput;

/// Prints to stdout, ignoring a closed pipe (e.g. `| head`).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Arguments of `medes report`.
#[derive(clap::Args)]
pub struct Args {
    /// Run directories (each with summary.json, invocations.csv, memory.csv) of the same trace.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Report directory.
    #[arg(long, default_value = "report")]
    out: PathBuf,
}

/// Runs `medes report`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runs = args
        .runs
        .iter()
        .map(|d| SimOutput::read_dir(d).with_context(|| format!("reading {}", d.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p = medes_sim::report::write_runs_report(&runs, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    say!("{}", p.display());
    Ok(ExitCode::SUCCESS)
}
