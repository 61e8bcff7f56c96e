//! The controller's `Registry` service: which nodes there are, where, and whether they are alive.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medes_agent::NodeAgent;
use medes_core::{Bytes, NodeId};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::node::{Deadlines, RemoteAgent};
use crate::pages::{PageClient, PageClientConfig, infos_from_pb, uses_from_pb};
use medes_agent::{BaseInfo, BaseKey, RemoteBase};
use tokio::sync::Notify;

/// How often the base catalog is pushed to the agents even when nothing changed.
pub const BASE_RESYNC: Duration = Duration::from_secs(10);
use crate::pb;
use crate::pb::registry_server::RegistryServer;
use crate::{PROTOCOL_VERSION, ServeError};

/// Settings of the controller's registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Nodes the controller is built with; ids beyond these are refused (phase 1).
    pub expected_nodes: usize,
    /// How often agents are told to send heartbeats.
    pub heartbeat_interval: Duration,
    /// A node not heard from for this long is reported dead.
    pub dead_after: Duration,
    /// Deadline of the status call that checks a registering node.
    pub probe_deadline: Duration,
    /// Deadlines of the calls to the nodes.
    pub deadlines: Deadlines,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            expected_nodes: 1,
            heartbeat_interval: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            probe_deadline: Duration::from_secs(5),
            deadlines: Deadlines::default(),
        }
    }
}

/// One registered node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its id.
    pub id: NodeId,
    /// Where it serves `Node`.
    pub address: SocketAddr,
    /// The memory budget it reported (0: the controller's configuration applies).
    pub memory_budget: Bytes,
    /// Whether it was heard from within [`RegistryConfig::dead_after`].
    pub alive: bool,
    /// Time since its last registration or heartbeat.
    pub since_heard: Duration,
    /// Times it registered (1 + re-registrations).
    pub registrations: u64,
}

struct Entry {
    agent: Arc<RemoteAgent>,
    memory_budget: u64,
    last_heard: Instant,
    dead: bool,
    registrations: u64,
    /// Order of first registration.
    order: usize,
}

/// A change in a registered node's liveness, reported to [`Registry::on_node_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEvent {
    /// Not heard from for [`RegistryConfig::dead_after`]: place nothing there, fail what runs
    /// there (normally `medes_controller::Controller::set_node_alive(id, false)`).
    Dead,
    /// A dead node's heartbeats arrive again (e.g. a healed partition).
    Alive,
    /// A known node registered again (an agent restart, maybe at a new address; dead or not):
    /// alive, and what it holds should be reconciled with the books.
    Registered,
}

/// What receives node events ([`Registry::on_node_events`]).
type EventHook = Arc<dyn Fn(&NodeId, NodeEvent) + Send + Sync>;

/// What admits a node that registers after the initial set ([`Registry::admit_late_nodes`]).
type JoinHook = Arc<dyn Fn(NodeId, Arc<dyn NodeAgent>) -> Result<(), String> + Send + Sync>;

/// The bases of every registered node (issue 7, point 2).
#[derive(Default)]
struct Catalog {
    bases: BTreeMap<NodeId, Vec<BaseInfo>>,
    /// Per node, the other nodes' bases its dedup stores depend on.
    uses: BTreeMap<NodeId, Vec<(BaseKey, u64)>>,
}

struct Inner {
    cfg: RegistryConfig,
    catalog: Mutex<Catalog>,
    /// The catalog or a node's liveness changed: push the catalog to the agents.
    catalog_changed: Notify,
    late: Mutex<Option<JoinHook>>,
    events: Mutex<Option<EventHook>>,
    nodes: Mutex<BTreeMap<NodeId, Entry>>,
    count: watch::Sender<usize>,
}

/// The nodes known to the controller. Cheap to clone.
#[derive(Clone)]
pub struct Registry(Arc<Inner>);

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Registry {
    /// An empty registry.
    pub fn new(cfg: RegistryConfig) -> Registry {
        let (count, _) = watch::channel(0);
        Registry(Arc::new(Inner {
            cfg,
            catalog: Mutex::new(Catalog::default()),
            catalog_changed: Notify::new(),
            late: Mutex::new(None),
            events: Mutex::new(None),
            nodes: Mutex::new(BTreeMap::new()),
            count,
        }))
    }

    /// Waits until [`RegistryConfig::expected_nodes`] nodes have registered and returns them in
    /// the order they first registered, ready for `medes_controller::Controller::new`.
    pub async fn wait_for_nodes(&self) -> Vec<(NodeId, Arc<dyn NodeAgent>)> {
        let mut rx = self.0.count.subscribe();
        let want = self.0.cfg.expected_nodes;
        let _ = rx.wait_for(|n| *n >= want).await;
        let nodes = self.0.nodes.lock();
        let mut v: Vec<_> = nodes
            .iter()
            .filter(|(_, e)| e.order < want)
            .map(|(id, e)| (e.order, id.clone(), e.agent.clone()))
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter()
            .map(|(_, id, a)| (id, a as Arc<dyn NodeAgent>))
            .collect()
    }

    /// From now on, a node that registers under a new id once the initial set is complete is
    /// checked like the others and then handed to `join` (normally
    /// `medes_controller::Controller::add_node`); an `Err` from it refuses the node with that
    /// reason. Without this, such nodes are refused.
    pub fn admit_late_nodes<F>(&self, join: F)
    where
        F: Fn(NodeId, Arc<dyn NodeAgent>) -> Result<(), String> + Send + Sync + 'static,
    {
        *self.0.late.lock() = Some(Arc::new(join));
    }

    /// From now on, `hook` is told when a node is marked dead, is heard from again, or
    /// registers again ([`NodeEvent`]); it is called outside the registry's locks, from the
    /// heartbeat watcher or the registration handler (inside the runtime), and must not block.
    pub fn on_node_events<F>(&self, hook: F)
    where
        F: Fn(&NodeId, NodeEvent) + Send + Sync + 'static,
    {
        *self.0.events.lock() = Some(Arc::new(hook));
    }

    fn emit(&self, id: &NodeId, event: NodeEvent) {
        // Dead nodes' bases leave the catalog; returning nodes get it again.
        self.0.catalog_changed.notify_one();
        let hook = self.0.events.lock().clone();
        if let Some(hook) = hook {
            hook(id, event);
        }
    }

    /// Every registered node.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        let nodes = self.0.nodes.lock();
        let mut v: Vec<_> = nodes
            .iter()
            .map(|(id, e)| {
                (
                    e.order,
                    NodeInfo {
                        id: id.clone(),
                        address: e.agent.address(),
                        memory_budget: Bytes(e.memory_budget),
                        alive: !e.dead,
                        since_heard: now.saturating_duration_since(e.last_heard),
                        registrations: e.registrations,
                    },
                )
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    }

    /// The cluster's catalog of bases: every base of every live node, with the address its
    /// pages are served at.
    pub fn base_catalog(&self) -> Vec<RemoteBase> {
        let live: BTreeMap<NodeId, SocketAddr> = self
            .0
            .nodes
            .lock()
            .iter()
            .filter(|(_, e)| !e.dead)
            .map(|(id, e)| (id.clone(), e.agent.address()))
            .collect();
        let c = self.0.catalog.lock();
        c.bases
            .iter()
            .filter_map(|(id, v)| live.get(id).map(|a| (a, v)))
            .flat_map(|(a, v)| {
                v.iter().map(|info| RemoteBase {
                    info: info.clone(),
                    address: *a,
                })
            })
            .collect()
    }

    /// Records the bases a node holds now and the other nodes' bases its dedup stores use;
    /// returns false if the node is not registered.
    pub fn publish_bases(
        &self,
        node: &NodeId,
        bases: Vec<BaseInfo>,
        uses: Vec<(BaseKey, u64)>,
    ) -> bool {
        if !self.0.nodes.lock().contains_key(node) {
            return false;
        }
        let bases: Vec<BaseInfo> = bases.into_iter().filter(|b| &b.key.node == node).collect();
        let uses: Vec<(BaseKey, u64)> = uses.into_iter().filter(|u| &u.0.node != node).collect();
        let mut c = self.0.catalog.lock();
        let changed = c.bases.get(node) != Some(&bases) || c.uses.get(node) != Some(&uses);
        if changed {
            info!(node = %node, bases = bases.len(), uses = uses.len(), "node's bases changed");
            c.bases.insert(node.clone(), bases);
            c.uses.insert(node.clone(), uses);
            drop(c);
            self.0.catalog_changed.notify_one();
        }
        true
    }

    /// For `node`'s bases: how many dedup stores of the other live nodes depend on each.
    pub fn used_elsewhere(&self, node: &NodeId) -> Vec<(BaseKey, u64)> {
        let live: std::collections::BTreeSet<NodeId> = self
            .0
            .nodes
            .lock()
            .iter()
            .filter(|(_, e)| !e.dead)
            .map(|(id, _)| id.clone())
            .collect();
        let c = self.0.catalog.lock();
        let mut sum: BTreeMap<BaseKey, u64> = BTreeMap::new();
        for (user, uses) in &c.uses {
            if user == node || !live.contains(user) {
                continue;
            }
            for (k, n) in uses.iter().filter(|(k, _)| &k.node == node) {
                *sum.entry(k.clone()).or_default() += n;
            }
        }
        sum.into_iter().collect()
    }

    /// Pushes the base catalog ([`Registry::base_catalog`]) to every live node whenever it
    /// changes (a base made or retired, a node dead, alive or registered again) and every
    /// [`BASE_RESYNC`] anyway, until `shutdown` is cancelled. Each agent imports the other
    /// nodes' bases it does not know and drops those no longer listed
    /// (`medes_agent::Agent::sync_bases`). Started by [`Registry::watch_heartbeats`].
    pub async fn push_base_catalog(self, shutdown: CancellationToken) {
        let client = PageClient::new(PageClientConfig::default());
        let mut generation = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.0.catalog_changed.notified() => {}
                _ = tokio::time::sleep(BASE_RESYNC) => {}
            }
            generation += 1;
            let catalog = self.base_catalog();
            let live: Vec<(NodeId, SocketAddr)> = self
                .nodes()
                .into_iter()
                .filter(|n| n.alive)
                .map(|n| (n.id, n.address))
                .collect();
            let deadline = self.0.cfg.deadlines.short * 2;
            let pushes = live.iter().map(|(id, at)| {
                let (client, catalog) = (&client, &catalog);
                let used = self.used_elsewhere(id);
                async move {
                    let r = client
                        .sync_bases(*at, catalog, &used, generation, deadline)
                        .await;
                    (id, r)
                }
            });
            let results = futures::future::join_all(pushes).await;
            for (id, r) in results {
                match r {
                    Ok(rep) if rep.imported + rep.removed > 0 || !rep.failed.is_empty() => {
                        info!(node = %id, imported = rep.imported, removed = rep.removed, held = rep.held,
                              pinned = rep.pinned, failed = rep.failed.len(), "node synced the base catalog");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(node = %id, error = %e, "pushing the base catalog failed"),
                }
            }
        }
    }

    /// Checks every `heartbeat_interval` for nodes not heard from for `dead_after`, logs them
    /// dead (once), reports them to the [`Registry::on_node_events`] hook
    /// ([`NodeEvent::Dead`]) and returns when `shutdown` is cancelled. Also runs
    /// [`Registry::push_base_catalog`].
    pub async fn watch_heartbeats(self, shutdown: CancellationToken) {
        tokio::spawn(self.clone().push_base_catalog(shutdown.clone()));
        let mut tick = tokio::time::interval(self.0.cfg.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for id in self.mark_dead(Instant::now()) {
                self.emit(&id, NodeEvent::Dead);
            }
        }
    }

    /// Marks dead the nodes not heard from since `now - dead_after`; returns them.
    fn mark_dead(&self, now: Instant) -> Vec<NodeId> {
        let mut dead = Vec::new();
        let mut nodes = self.0.nodes.lock();
        for (id, e) in nodes.iter_mut() {
            let silent = now.saturating_duration_since(e.last_heard);
            if !e.dead && silent >= self.0.cfg.dead_after {
                e.dead = true;
                warn!(node = %id, address = %e.agent.address(), silent_ms = silent.as_millis() as u64,
                      "node missed its heartbeats: dead");
                dead.push(id.clone());
            }
        }
        dead
    }

    fn heard(&self, id: &NodeId) -> bool {
        let revived = {
            let mut nodes = self.0.nodes.lock();
            let Some(e) = nodes.get_mut(id) else {
                return false;
            };
            e.last_heard = Instant::now();
            let revived = e.dead;
            if revived {
                e.dead = false;
                info!(node = %id, "node heard from again: alive");
            }
            revived
        };
        if revived {
            self.emit(id, NodeEvent::Alive);
        }
        true
    }

    async fn register(&self, req: pb::RegisterRequest) -> Result<(), String> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} is not spoken here (the controller speaks {PROTOCOL_VERSION})",
                req.protocol_version
            ));
        }
        if !valid_node_id(&req.node_id) {
            return Err(format!(
                "node id {:?} is not valid ([A-Za-z0-9._-], 1 to 64 characters)",
                req.node_id
            ));
        }
        let id = NodeId(req.node_id);
        let address: SocketAddr = req
            .address
            .parse()
            .map_err(|e| format!("address {:?} is not ip:port: {e}", req.address))?;
        if address.ip().is_unspecified() || address.port() == 0 {
            return Err(format!(
                "address {address} cannot be reached: advertise a concrete ip and port"
            ));
        }
        let known = self.0.nodes.lock().get(&id).map(|e| e.agent.clone());
        let agent = match known {
            Some(a) => a,
            None => {
                let late = self.0.late.lock().is_some();
                if !late && self.0.nodes.lock().len() >= self.0.cfg.expected_nodes {
                    return Err(format!(
                        "the controller was built with {} nodes and node {id} is not one of \
                         them (nodes joining at run time: issue 7 phase 2)",
                        self.0.cfg.expected_nodes
                    ));
                }
                Arc::new(
                    RemoteAgent::connect_lazy(id.clone(), address, self.0.cfg.deadlines)
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        // Check the node answers at that address under that id, on a fresh client (the
        // known one may still point at the old address).
        let probe = RemoteAgent::connect_lazy(id.clone(), address, self.0.cfg.deadlines)
            .map_err(|e| e.to_string())?;
        let st = probe
            .status(self.0.cfg.probe_deadline)
            .await
            .map_err(|e| format!("the controller cannot reach node {id} at {address}: {e}"))?;
        if st.node != id {
            return Err(format!(
                "the agent at {address} answers as node {}, not {id}",
                st.node
            ));
        }
        agent.set_address(address).map_err(|e| e.to_string())?;
        let hook = self.0.late.lock().clone();
        let mut nodes = self.0.nodes.lock();
        let n = nodes.len();
        if let Some(e) = nodes.get_mut(&id) {
            e.registrations += 1;
            e.last_heard = Instant::now();
            e.dead = false;
            e.memory_budget = req.memory_budget;
            info!(node = %id, %address, registrations = e.registrations, sandboxes = st.sandboxes.len(),
                  "node registered again");
            drop(nodes);
            self.emit(&id, NodeEvent::Registered);
            return Ok(());
        }
        let late = n >= self.0.cfg.expected_nodes;
        if late && hook.is_none() {
            return Err(format!(
                "the controller was built with {} nodes and node {id} is not one of them",
                self.0.cfg.expected_nodes
            ));
        }
        nodes.insert(
            id.clone(),
            Entry {
                agent,
                memory_budget: req.memory_budget,
                last_heard: Instant::now(),
                dead: false,
                registrations: 1,
                order: n,
            },
        );
        let entry_agent = nodes.get(&id).map(|e| e.agent.clone());
        drop(nodes);
        if let (true, Some(join), Some(a)) = (late, hook, entry_agent)
            && let Err(reason) = join(id.clone(), a as Arc<dyn NodeAgent>)
        {
            self.0.nodes.lock().remove(&id);
            return Err(reason);
        }
        info!(node = %id, %address, budget_mb = req.memory_budget >> 20, sandboxes = st.sandboxes.len(),
              registered = n + 1, expected = self.0.cfg.expected_nodes, late, "node registered");
        self.0.count.send_replace(n + 1);
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::registry_server::Registry for Registry {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        let node = req.node_id.clone();
        let resp = match Registry::register(self, req).await {
            Ok(()) => pb::RegisterResponse {
                accepted: true,
                reason: String::new(),
                heartbeat_interval_ms: self.0.cfg.heartbeat_interval.as_millis() as u64,
            },
            Err(reason) => {
                warn!(node = %node, %reason, "node refused");
                pb::RegisterResponse {
                    accepted: false,
                    reason,
                    heartbeat_interval_ms: 0,
                }
            }
        };
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not spoken here",
                req.protocol_version
            )));
        }
        let known = self.heard(&NodeId(req.node_id));
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }

    async fn publish_bases(
        &self,
        req: Request<pb::PublishBasesRequest>,
    ) -> Result<Response<pb::PublishBasesResponse>, Status> {
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not spoken here",
                req.protocol_version
            )));
        }
        let node = NodeId(req.node_id);
        let known = Registry::publish_bases(
            self,
            &node,
            infos_from_pb(req.bases),
            uses_from_pb(req.uses),
        );
        Ok(Response::new(pb::PublishBasesResponse { known }))
    }
}

/// Serves `Registry` on `listener` until `shutdown` resolves.
pub async fn serve_registry<F>(
    registry: Registry,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    Server::builder()
        .add_service(RegistryServer::new(registry))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(valid_node_id("node-0"));
        assert!(valid_node_id("a.b_c"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("../x"));
        assert!(!valid_node_id(&"x".repeat(65)));
    }
}
