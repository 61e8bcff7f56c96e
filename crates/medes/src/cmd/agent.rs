//! `medes agent`: one node agent in this process, serving the `Node` gRPC service and joined to
//! a `medes controller` (issue 7, phase 1; see `medes_rpc`). It registers, sends a heartbeat
//! every second, and registers again when the controller restarts. A refusal by the controller
//! (unknown node with a full cluster, another protocol version, an unreachable advertised
//! address) ends the process with an error. It reports its memory budget
//! (`--memory-budget-mb`), which the controller uses for this node. Its dedup stores and bases
//! survive its restart (tmpfs) unless `--purge-on-exit`.

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
    /// This node's memory budget in MiB, reported to the controller when registering (default:
    /// `controller.node_memory_budget_mb` of the configuration; 0: the controller's own
    /// configured budget applies).
    #[arg(long)]
    pub memory_budget_mb: Option<u64>,
    /// Remove the dedup stores and bases this node keeps across restarts when it stops (for
    /// throw-away clusters and tests; by default they survive an agent restart).
    #[arg(long)]
    pub purge_on_exit: bool,
}

/// Runs `medes agent`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = args.common.load()?;
    if let Some(n) = args.node_id {
        cfg.agent.node_id = NodeId(n);
    }
    if let Some(mb) = args.memory_budget_mb {
        cfg.controller.node_memory_budget_mb = mb;
    }
    cfg.finish();
    init_tracing(&cfg.log);
    let rt = tokio::runtime::Runtime::new()?;
    let link = Link {
        controller: args.controller,
        listen: args.listen,
        advertise: args.advertise,
        purge_on_exit: args.purge_on_exit,
    };
    rt.block_on(serve(cfg, link))?;
    Ok(ExitCode::SUCCESS)
}

/// Where the agent serves and whom it joins.
struct Link {
    controller: String,
    listen: SocketAddr,
    advertise: Option<SocketAddr>,
    purge_on_exit: bool,
}

async fn serve(cfg: MedesConfig, link: Link) -> anyhow::Result<()> {
    let Link {
        controller,
        listen,
        advertise,
        purge_on_exit,
    } = link;
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
    if purge_on_exit {
        agent.purge_kept().await;
    }
    info!(node = %node, purge_on_exit, "agent stopped");
    linked.context("joining the controller")?;
    served??;
    Ok(())
}
