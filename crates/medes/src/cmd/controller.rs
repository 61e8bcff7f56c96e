//! `medes controller`: the scheduler, the store and the REST API in this process, with node
//! agents in other processes (`medes agent --controller ADDR`) reached over gRPC (issue 7,
//! phase 1; see `medes_rpc`).
//!
//! The controller serves the `Registry` on `--rpc`, waits until `--nodes N` agents have
//! registered, then builds the scheduler over them and opens the REST API on `--listen`. Agents
//! that register later under new ids join through `Controller::add_node`; an agent that
//! restarts registers again under its id and is re-pointed to its new address. Nodes silent
//! for 5 s are logged dead; acting on it (and removing nodes) is phase 2. The startup mirrors `Platform::start` (store, keys, reconcile, timers, API) without
//! the in-process agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use medes_core::Namespace;
use medes_rpc::{Registry, RegistryConfig, serve_registry};
use medes_store::{ApiKey, Store};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::MedesConfig;
use crate::platform::{AUTH_FILE, init_tracing, metrics_handle};

/// Arguments of `medes controller`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML); defaults apply to every missing key.
    #[arg(long, short, env = "MEDES_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the store and the API key (overrides `data_dir` of the file).
    #[arg(long, env = "MEDES_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API listen address (overrides `api.listen`).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Listen address of the gRPC registry that agents register with.
    #[arg(long, default_value = "0.0.0.0:3240")]
    pub rpc: std::net::SocketAddr,
    /// Node agents to wait for before serving (more may join later).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nodes: u32,
}

/// Runs `medes controller`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
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
    rt.block_on(serve(cfg, args.rpc, args.nodes as usize))?;
    Ok(ExitCode::SUCCESS)
}

fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        token.cancel();
    });
}

async fn serve(cfg: MedesConfig, rpc: std::net::SocketAddr, nodes: usize) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let store = open_store(&cfg).await?;
    let key = store
        .ensure_default_key()
        .context("creating the default API key")?;
    let auth = key.auth_string();
    write_auth_file(&cfg.data_dir, &auth)?;
    let _ = metrics_handle();

    let registry = Registry::new(RegistryConfig {
        expected_nodes: nodes,
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind(rpc)
        .await
        .with_context(|| format!("binding the registry address {rpc}"))?;
    let rpc_addr = listener.local_addr()?;
    let token = shutdown.clone();
    let registry_task = tokio::spawn(serve_registry(registry.clone(), listener, async move {
        token.cancelled().await
    }));
    let watcher = tokio::spawn(registry.clone().watch_heartbeats(shutdown.clone()));
    println!("medes controller: registry at {rpc_addr}, waiting for {nodes} node agent(s)");
    println!(
        "  (start them with: medes agent --controller {rpc_addr} --listen IP:PORT --node-id NAME)"
    );
    let agents = tokio::select! {
        a = registry.wait_for_nodes() => a,
        _ = shutdown.cancelled() => {
            let _ = registry_task.await;
            return Ok(());
        }
    };
    for n in registry.nodes() {
        info!(node = %n.id, address = %n.address, budget_mb = n.memory_budget.0 >> 20, "node in the cluster");
    }
    let controller = medes_controller::Controller::new(cfg.controller.clone(), agents);
    let ctl = controller.clone();
    registry.admit_late_nodes(move |id, agent| ctl.add_node(id, agent).map_err(|e| e.to_string()));
    let kept = {
        let store = store.clone();
        controller
            .reconcile(&move |name| store.get_action(name).ok().flatten())
            .await
    };
    if kept.adopted > 0 || !kept.purged.is_empty() || kept.left > 0 {
        info!(adopted = kept.adopted, purged = ?kept.purged, kept_bases = kept.left,
              "dedup sandboxes kept by the nodes reconciled");
    }
    let timers = tokio::spawn(controller.clone().run_timers(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| format!("binding {}", cfg.api.listen))?;
    let url = format!("http://{}", listener.local_addr()?);
    let state = medes_api::ApiState {
        store: store.clone(),
        invoker: controller.clone(),
        metrics: metrics_handle(),
        config: cfg.api.clone(),
        policy: Some(controller.clone()),
    };
    let token = shutdown.clone();
    let api = tokio::spawn(medes_api::serve(listener, state, async move {
        token.cancelled().await
    }));
    println!("medes is serving the OpenWhisk API at {url} over {nodes} node(s)");
    println!("  auth key : {auth}");

    shutdown.cancelled().await;
    let api = api.await;
    let _ = timers.await;
    controller.shutdown().await;
    let _ = watcher.await;
    registry_task.await??;
    let st = store.clone();
    tokio::task::spawn_blocking(move || st.flush()).await??;
    api??;
    info!("controller stopped");
    Ok(())
}

async fn open_store(cfg: &MedesConfig) -> anyhow::Result<Arc<Store>> {
    let path = cfg.data_dir.join("store.redb");
    let store_cfg = cfg.store;
    let store = tokio::task::spawn_blocking(move || Store::open_with(&path, store_cfg))
        .await?
        .context("opening the store")?;
    for k in &cfg.auth.keys {
        let (uuid, secret) = k.key.split_once(':').context("auth key without ':'")?;
        store
            .add_key(&ApiKey {
                uuid: uuid.into(),
                key: secret.into(),
                namespace: Namespace(k.namespace.clone()),
                subject: k.namespace.clone(),
            })
            .context("storing a configured API key")?;
    }
    Ok(Arc::new(store))
}

fn write_auth_file(dir: &Path, auth: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(AUTH_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{auth}")?;
    Ok(())
}
