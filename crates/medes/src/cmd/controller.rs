//! `medes controller`: the scheduler, the store and the REST API in this process, with node
//! agents in other processes (`medes agent --controller ADDR`) reached over gRPC (issue 7,
//! phase 1; see `medes_rpc`).
//!
//! The controller serves the `Registry` on `--rpc`, waits until `--nodes N` agents have
//! registered, then builds the scheduler over them and opens the REST API on `--listen`. Agents
//! that register later under new ids join through `Controller::add_node`; an agent that
//! restarts registers again under its id and is re-pointed to its new address. Nodes silent
//! for `--dead-after-ms` (5 s; heartbeats every `--heartbeat-ms`, 1 s) are marked dead: the scheduler stops placing work there, fails what runs there and
//! drops its idle sandboxes from its books; a node heard from again (or registering again) is
//! alive and reconciled (`Controller::set_node_alive`, `Controller::reconcile_node`: what the
//! books dropped and the node still holds is re-adopted, the rest purged). Each node's memory
//! budget is the one its agent reported (`medes agent --memory-budget-mb`; 0: this
//! configuration's `controller.node_memory_budget_mb`).
//! The store, keys, reconcile, timers and API start through the same path as `medes serve`
//! (`platform::Service`), without the in-process agent.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use medes_controller::Controller;
use medes_core::{Bytes, NodeId};
use medes_rpc::{NodeEvent, Registry, RegistryConfig, serve_registry};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::MedesConfig;
use crate::platform::{ApiArgs, ConfigArgs, Service, init_tracing, shutdown_on_signal};

/// Arguments of `medes controller`.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file and data directory (store, API key).
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The REST API.
    #[command(flatten)]
    pub api: ApiArgs,
    /// Listen address of the gRPC registry that agents register with.
    #[arg(long, default_value = "0.0.0.0:3240")]
    pub rpc: std::net::SocketAddr,
    /// Node agents to wait for before serving (more may join later).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nodes: u32,
    /// How often agents send heartbeats, ms (told to them when they register).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is dead: no new work, its calls in flight fail, ms.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub dead_after_ms: u64,
}

/// Runs `medes controller`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = args.common.load()?;
    args.api.apply(&mut cfg);
    cfg.finish();
    init_tracing(&cfg.log);
    let rt = tokio::runtime::Runtime::new()?;
    let registry = RegistryConfig {
        expected_nodes: args.nodes as usize,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        dead_after: Duration::from_millis(args.dead_after_ms.max(2 * args.heartbeat_ms)),
        ..Default::default()
    };
    rt.block_on(serve(cfg, args.rpc, registry))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    cfg: MedesConfig,
    rpc: std::net::SocketAddr,
    registry: RegistryConfig,
) -> anyhow::Result<()> {
    let nodes = registry.expected_nodes;
    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    let opened = Service::open(&cfg).await?;

    let registry = Registry::new(registry);
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
    let controller = Controller::new(cfg.controller.clone(), agents);
    for n in registry.nodes() {
        apply_budget(&controller, &n.id, n.memory_budget);
    }
    let (ctl, reg) = (controller.clone(), registry.clone());
    registry.admit_late_nodes(move |id, agent| {
        ctl.add_node(id.clone(), agent).map_err(|e| e.to_string())?;
        if let Some(n) = reg.nodes().into_iter().find(|n| n.id == id) {
            apply_budget(&ctl, &id, n.memory_budget);
        }
        Ok(())
    });
    act_on_node_events(&registry, &controller);
    let service = Service::start(&cfg, opened, controller, shutdown.clone()).await?;
    println!(
        "medes is serving the OpenWhisk API at {} over {nodes} node(s)",
        service.url
    );
    println!("  auth key : {}", service.auth);

    shutdown.cancelled().await;
    let stopped = service.stop().await;
    let _ = watcher.await;
    registry_task.await??;
    stopped?;
    info!("controller stopped");
    Ok(())
}

/// Uses the memory budget a node reported when registering (0: the configured one).
fn apply_budget(controller: &Controller, id: &NodeId, budget: Bytes) {
    if let Err(e) = controller.set_node_budget(id, budget) {
        warn!(node = %id, error = %e, "node budget not applied");
    }
}

/// Issue 7 phase 2: a node the registry marks dead leaves placement (its calls in flight fail,
/// its idle sandboxes are forgotten); one heard from again, or registering again, is alive and
/// its leftovers are reconciled (unknown sandboxes purged).
fn act_on_node_events(registry: &Registry, controller: &Arc<Controller>) {
    let (ctl, reg) = (controller.clone(), registry.clone());
    registry.on_node_events(move |id, event| {
        if event == NodeEvent::Registered
            && let Some(n) = reg.nodes().into_iter().find(|n| &n.id == id)
        {
            // A restarted agent may report another budget.
            apply_budget(&ctl, id, n.memory_budget);
        }
        let revived = match event {
            NodeEvent::Dead => ctl.set_node_alive(id, false),
            NodeEvent::Alive | NodeEvent::Registered => ctl.set_node_alive(id, true),
        };
        match revived {
            // An agent that restarted before it was found dead: reconcile it all the same.
            Ok(false) if event == NodeEvent::Registered => {
                let (ctl, id) = (ctl.clone(), id.clone());
                tokio::spawn(async move { ctl.reconcile_node(&id).await });
            }
            Ok(_) => {}
            Err(e) => warn!(node = %id, error = %e, ?event, "node event not applied"),
        }
    });
}
