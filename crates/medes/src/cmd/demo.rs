//! `medes demo`.

use std::process::ExitCode;

/// Arguments of `medes demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes demo`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes demo is not implemented yet")
}
