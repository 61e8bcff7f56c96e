//! `medes trace` (owned by the workload work, issue 3).

use std::process::ExitCode;

/// Arguments of `medes trace`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes trace`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes trace is not implemented yet")
}
