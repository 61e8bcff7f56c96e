//! `medes controller`: the scheduler, the store and the REST API in this process, with node
//! agents in other processes (`medes agent --controller ADDR`) reached over gRPC (issue 7,
//! phase 1; see `medes_rpc`).
//!
//! The controller serves the `Registry` on `--rpc`, waits until `--nodes N` agents have
//! registered, or until `--wait-for-nodes-ms` passed since it started and at least one has
//! (a controller restarted while an agent is down serves over the others), then builds the
//! scheduler over them and opens the REST API on `--listen`. Agents that register later under
//! new ids join through `Controller::add_node` and are reconciled against the stored actions
//! (what they kept for an unchanged action is adopted, the rest purged); an agent that
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use medes_agent::NodeAgent;
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
    /// Node agents to wait for before serving (more may join later; see --wait-for-nodes-ms).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub nodes: u32,
    /// Serve without all --nodes once this long has passed since start and at least one agent
    /// registered; the others join when they register, ms.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub wait_for_nodes_ms: u64,
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
    // The registry hands over the first node; every other one comes through the join hook
    // (buffered until the controller exists), so nodes may join in any number at any time.
    let registry = RegistryConfig {
        expected_nodes: 1,
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        dead_after: Duration::from_millis(args.dead_after_ms.max(2 * args.heartbeat_ms)),
        ..Default::default()
    };
    let wait = NodeWait {
        nodes: args.nodes as usize,
        within: Duration::from_millis(args.wait_for_nodes_ms),
    };
    rt.block_on(serve(cfg, args.rpc, registry, wait))?;
    Ok(ExitCode::SUCCESS)
}

/// How many nodes to wait for before serving, and for how long at most.
struct NodeWait {
    nodes: usize,
    within: Duration,
}

/// Nodes that registered after the first: buffered until the controller serves, then added.
enum Joining {
    Waiting(Vec<(NodeId, Arc<dyn NodeAgent>)>),
    Serving(Arc<Controller>),
}

/// Adds a node that registered while the controller serves, with the budget it reported, and
/// reconciles what it holds against the stored actions.
fn join_node(
    controller: &Arc<Controller>,
    registry: &Registry,
    id: NodeId,
    agent: Arc<dyn NodeAgent>,
) -> Result<(), String> {
    controller
        .add_node(id.clone(), agent)
        .map_err(|e| e.to_string())?;
    if let Some(n) = registry.nodes().into_iter().find(|n| n.id == id) {
        apply_budget(controller, &id, n.memory_budget);
    }
    let ctl = controller.clone();
    tokio::spawn(async move { ctl.reconcile_node(&id).await });
    Ok(())
}

async fn serve(
    cfg: MedesConfig,
    rpc: std::net::SocketAddr,
    registry: RegistryConfig,
    wait: NodeWait,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let nodes = wait.nodes;
    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    let opened = Service::open(&cfg).await?;

    let registry = Registry::new(registry);
    let joining = Arc::new(Mutex::new(Joining::Waiting(Vec::new())));
    {
        let (joining, reg) = (joining.clone(), registry.clone());
        registry.admit_late_nodes(move |id, agent| {
            let mut j = joining.lock().unwrap_or_else(|e| e.into_inner());
            match &mut *j {
                Joining::Waiting(v) => {
                    v.push((id, agent));
                    Ok(())
                }
                Joining::Serving(ctl) => {
                    let ctl = ctl.clone();
                    drop(j);
                    join_node(&ctl, &reg, id, agent)
                }
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(rpc)
        .await
        .with_context(|| format!("binding the registry address {rpc}"))?;
    let rpc_addr = listener.local_addr()?;
    let token = shutdown.clone();
    let registry_task = tokio::spawn(serve_registry(registry.clone(), listener, async move {
        token.cancelled().await
    }));
    let watcher = tokio::spawn(registry.clone().watch_heartbeats(shutdown.clone()));
    println!(
        "medes controller: registry at {rpc_addr}, waiting for {nodes} node agent(s) \
         (at most {} ms after start, once one has)",
        wait.within.as_millis()
    );
    println!(
        "  (start them with: medes agent --controller {rpc_addr} --listen IP:PORT --node-id NAME)"
    );
    let waiting = |j: &Mutex<Joining>| match &*j.lock().unwrap_or_else(|e| e.into_inner()) {
        Joining::Waiting(v) => v.len(),
        Joining::Serving(_) => 0,
    };
    let deadline = started + wait.within;
    let mut agents = tokio::select! {
        a = async {
            let first = registry.wait_for_nodes().await;
            // The rest: all of them, or as many as registered by the deadline.
            while first.len() + waiting(&joining) < nodes
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            first
        } => a,
        _ = shutdown.cancelled() => {
            let _ = registry_task.await;
            return Ok(());
        }
    };
    if let Joining::Waiting(v) = &mut *joining.lock().unwrap_or_else(|e| e.into_inner()) {
        agents.append(v);
    }
    let initial = agents.len();
    if initial < nodes {
        warn!(
            registered = initial,
            expected = nodes,
            waited_ms = started.elapsed().as_millis() as u64,
            "serving before every node registered: the others join when they register"
        );
    }
    let controller = Controller::new(cfg.controller.clone(), agents);
    controller.set_action_lookup(opened.stored_actions());
    for n in registry.nodes() {
        info!(node = %n.id, address = %n.address, budget_mb = n.memory_budget.0 >> 20, "node in the cluster");
        apply_budget(&controller, &n.id, n.memory_budget);
    }
    act_on_node_events(&registry, &controller);
    let service = Service::start(&cfg, opened, controller.clone(), shutdown.clone()).await?;
    // Nodes that registered since the controller was built join now (after the startup
    // reconcile, which did not ask them), and later ones as they register.
    let late = {
        let mut j = joining.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *j, Joining::Serving(controller.clone())) {
            Joining::Waiting(v) => v,
            Joining::Serving(_) => Vec::new(),
        }
    };
    for (id, agent) in late {
        if let Err(e) = join_node(&controller, &registry, id.clone(), agent) {
            warn!(node = %id, error = %e, "node not added");
        }
    }
    println!(
        "medes is serving the OpenWhisk API at {} over {initial} node(s) ({nodes} expected; \
         others join when they register)",
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
