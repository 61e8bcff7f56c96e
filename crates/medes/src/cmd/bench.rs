//! `medes bench`.

use std::process::ExitCode;

/// Arguments of `medes bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes bench`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes bench is not implemented yet")
}
