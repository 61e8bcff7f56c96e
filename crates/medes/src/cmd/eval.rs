//! `medes eval` (issue 6).

use std::process::ExitCode;

/// Arguments of `medes eval`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes eval`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes eval is not implemented yet")
}
