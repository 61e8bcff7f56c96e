//! `medes replay` (owned by the workload work, issue 3).

use std::process::ExitCode;

/// Arguments of `medes replay`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes replay`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes replay is not implemented yet")
}
