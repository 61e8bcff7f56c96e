//! `medes serve`: the controller and one node agent in this process (the embedded default).

use std::process::ExitCode;

use crate::config::MedesConfig;
use crate::platform::{ApiArgs, ConfigArgs, Platform, init_tracing, shutdown_on_signal};

/// Arguments of `medes serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file and data directory.
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The REST API.
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print the configuration with every default and exit.
    #[arg(long)]
    pub print_config: bool,
    /// On shutdown, also delete the dedup stores and bases that are otherwise kept on tmpfs for
    /// the next start with the same data directory.
    #[arg(long)]
    pub purge_on_exit: bool,
}

/// Runs `medes serve`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.print_config {
        print!("{}", MedesConfig::default_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = args.common.load()?;
    args.api.apply(&mut cfg);
    cfg.finish();
    init_tracing(&cfg.log);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let platform = Platform::start(cfg).await?;
        println!("medes is serving the OpenWhisk API at {}", platform.url);
        println!("  auth key : {}", platform.auth);
        println!(
            "  (saved in {}; e.g. curl -u \"$(cat {})\" {}/api/v1/namespaces/_/actions)",
            platform.data_dir.join(crate::platform::AUTH_FILE).display(),
            platform.data_dir.join(crate::platform::AUTH_FILE).display(),
            platform.url
        );
        println!("  metrics  : {}/metrics", platform.url);
        shutdown_on_signal(platform.shutdown_token());
        if args.purge_on_exit {
            token_wait(&platform).await;
            platform.stop_and_purge().await
        } else {
            platform.run_until_shutdown().await
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Waits until the platform is asked to stop.
async fn token_wait(platform: &Platform) {
    platform.shutdown_token().cancelled().await;
}
