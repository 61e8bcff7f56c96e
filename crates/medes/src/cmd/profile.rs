//! `medes profile`: the per-function cost profile for the simulator, measured on the live
//! platform (from `medes bench startup --json` and `medes bench dedup --json` outputs) or the
//! paper's.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_sim::Profile;

/// Prints to stdout without a newline, ignoring a closed pipe (e.g. `| head`).
macro_rules! sayn {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// Arguments of `medes profile`.
#[derive(clap::Args)]
pub struct Args {
    /// Output of `medes bench startup --json` (with `--template`, its `template_ms_p50` becomes
    /// the template-start latency; without it the simulator uses the dedup-start latency).
    #[arg(long, required_unless_present = "paper")]
    startup: Option<PathBuf>,
    /// Output of `medes bench dedup --json` (dedup footprints and operation time).
    #[arg(long)]
    dedup: Option<PathBuf>,
    /// Write the paper's built-in profile instead.
    #[arg(long)]
    paper: bool,
    /// Output file (TOML; JSON if it ends in .json); default: stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `medes profile`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let paper = Profile::paper();
    let profile = match (&args.startup, args.paper) {
        (Some(s), false) => Profile::from_bench(s, args.dedup.as_deref(), &paper)
            .context("building the measured profile")?,
        _ => paper,
    };
    let text = match &args.out {
        Some(p) if p.extension().is_some_and(|e| e == "json") => {
            serde_json::to_string_pretty(&profile)?
        }
        _ => profile.to_toml(),
    };
    match &args.out {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("{} functions → {}", profile.functions.len(), p.display());
        }
        None => sayn!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
