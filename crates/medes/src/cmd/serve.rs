//! `medes serve`.

use std::process::ExitCode;

/// Arguments of `medes serve`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes serve`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes serve is not implemented yet")
}
