//! `medes serve`: the controller and one node agent in this process (the embedded default).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::MedesConfig;
use crate::platform::{Platform, init_tracing};

/// Arguments of `medes serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML); defaults apply to every missing key.
    #[arg(long, short, env = "MEDES_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir` of the file).
    #[arg(long, env = "MEDES_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Listen address (overrides `api.listen`).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
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
    let mut cfg = MedesConfig::load(args.config.as_deref())?;
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(l) = args.listen {
        cfg.api.listen = l;
    }
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
        let token = platform.shutdown_token();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            token.cancel();
        });
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
