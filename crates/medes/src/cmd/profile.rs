//! `medes profile` (issue 6).

use std::process::ExitCode;

/// Arguments of `medes profile`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes profile`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes profile is not implemented yet")
}
