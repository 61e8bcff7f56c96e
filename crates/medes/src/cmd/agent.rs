//! `medes agent`: one node agent in this process, serving the `Node` gRPC service and joined to
//! a `medes controller` (issue 7, phase 1; see `medes_rpc`). It registers, sends a heartbeat
//! every second, and registers again when the controller restarts. A refusal by the controller
//! (unknown node with a full cluster, another protocol version, an unreachable advertised
//! address) ends the process with an error.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use medes_agent::Agent;
use medes_core::{Bytes, NodeId};
use medes_rpc::{AgentLinkConfig, run_agent_link, serve_agent};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::MedesConfig;
use crate::platform::{ConfigArgs, init_tracing, shutdown_on_signal};

/// Arguments of `medes agent`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (its `agent` section applies) and data directory.
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The controller's registry address (`host:port`, its `--rpc`).
    #[arg(long)]
    pub controller: String,
    /// Listen address of this node's gRPC service.
    #[arg(long, default_value = "127.0.0.1:3241")]
    pub listen: SocketAddr,
    /// Address the controller reaches this node at (default: `--listen`, which must then be a
    /// concrete IP).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// This node's id (overrides `agent.node_id`).
    #[arg(long)]
    pub node_id: Option<String>,
}

/// Runs `medes agent`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = args.common.load()?;
    if let Some(n) = args.node_id {
        cfg.agent.node_id = NodeId(n);
    }
    cfg.finish();
    init_tracing(&cfg.log);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(cfg, args.controller, args.listen, args.advertise))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    cfg: MedesConfig,
    controller: String,
    listen: SocketAddr,
    advertise: Option<SocketAddr>,
) -> anyhow::Result<()> {
    medes_sandbox::preflight(&cfg.agent.sandbox)
        .context("this machine cannot run sandboxes (run scripts/setup.sh as root)")?;
    medes_sandbox::become_subreaper().context("becoming a child subreaper")?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr()?;
    let advertise = advertise.unwrap_or(bound);
    anyhow::ensure!(
        !advertise.ip().is_unspecified(),
        "listening on {bound}: pass --advertise IP:PORT, the address the controller reaches this node at"
    );
    let agent = Agent::new(cfg.agent.clone()).context("starting the node agent")?;
    let node = cfg.agent.node_id.clone();

    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    let token = shutdown.clone();
    // `Node` for the controller, `Pages` (base pages, fingerprints, catalog) for the cluster.
    let server = tokio::spawn(serve_agent(agent.clone(), listener, async move {
        token.cancelled().await
    }));
    println!(
        "medes agent {node}: serving at {bound} (advertised {advertise}), controller {controller}"
    );
    let mut link = AgentLinkConfig::new(controller, node.clone(), advertise);
    link.memory_budget = Bytes::mib(cfg.controller.node_memory_budget_mb);
    link.bases = Some(agent.clone());
    let linked = run_agent_link(link, shutdown.clone()).await;
    // Refused (or shut down): stop serving, destroy the sandboxes, keep the dedup stores.
    shutdown.cancel();
    let served = server.await;
    agent.shutdown().await;
    info!(node = %node, "agent stopped");
    linked.context("joining the controller")?;
    served??;
    Ok(())
}
