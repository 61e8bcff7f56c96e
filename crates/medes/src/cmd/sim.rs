//! `medes sim` (issue 6).

use std::process::ExitCode;

/// Arguments of `medes sim`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes sim`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes sim is not implemented yet")
}
