//! `medes report` (issue 6).

use std::process::ExitCode;

/// Arguments of `medes report`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes report`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes report is not implemented yet")
}
