//! `medes suite` (owned by the workload work, issue 3).

use std::process::ExitCode;

/// Arguments of `medes suite`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `medes suite`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("medes suite is not implemented yet")
}
