//! The agent's side of the registry: register, then heartbeat.

use std::net::SocketAddr;
use std::time::Duration;

use medes_core::{Bytes, NodeId};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::PROTOCOL_VERSION;
use crate::pb;
use crate::pb::registry_client::RegistryClient;

/// How an agent joins its controller.
#[derive(Clone)]
pub struct AgentLinkConfig {
    /// The controller's registry, `host:port`.
    pub controller: String,
    /// This node's id.
    pub node_id: NodeId,
    /// Where this node serves `Node`, as the controller reaches it.
    pub advertise: SocketAddr,
    /// The node's memory budget (0: the controller's configuration applies).
    pub memory_budget: Bytes,
    /// Heartbeat period (the controller's answer to a registration overrides it).
    pub heartbeat_interval: Duration,
    /// Deadline of each registry call.
    pub call_deadline: Duration,
    /// The agent whose bases are published to the controller's catalog (issue 7, point 2):
    /// after each registration, whenever they change, and checked at every heartbeat.
    /// `None`: none published.
    pub bases: Option<medes_agent::Agent>,
}

impl std::fmt::Debug for AgentLinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLinkConfig")
            .field("controller", &self.controller)
            .field("node_id", &self.node_id)
            .field("advertise", &self.advertise)
            .field("memory_budget", &self.memory_budget)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("call_deadline", &self.call_deadline)
            .field("bases", &self.bases.is_some())
            .finish()
    }
}

impl AgentLinkConfig {
    /// A link to `controller` for the node `node_id` serving at `advertise`, heartbeats every
    /// second, 10 s call deadlines.
    pub fn new(controller: String, node_id: NodeId, advertise: SocketAddr) -> Self {
        AgentLinkConfig {
            controller,
            node_id,
            advertise,
            memory_budget: Bytes(0),
            heartbeat_interval: Duration::from_secs(1),
            call_deadline: Duration::from_secs(10),
            bases: None,
        }
    }
}

/// The link to the controller ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The controller address is not a valid endpoint.
    #[error("controller address {address:?}: {source}")]
    Address {
        /// The address.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The controller refused this node.
    #[error("the controller refused node {node}: {reason}")]
    Refused {
        /// The node.
        node: NodeId,
        /// The controller's reason.
        reason: String,
    },
}

async fn register(
    c: &mut RegistryClient<Channel>,
    cfg: &AgentLinkConfig,
) -> Result<pb::RegisterResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::RegisterRequest {
        node_id: cfg.node_id.0.clone(),
        address: cfg.advertise.to_string(),
        memory_budget: cfg.memory_budget.0,
        protocol_version: PROTOCOL_VERSION,
    });
    req.set_timeout(cfg.call_deadline);
    match tokio::time::timeout(cfg.call_deadline, c.register(req)).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => Err(tonic::Status::deadline_exceeded("register deadline passed")),
    }
}

/// Publishes the node's bases; `Ok(false)` if the controller does not know the node.
async fn publish(
    c: &mut RegistryClient<Channel>,
    cfg: &AgentLinkConfig,
    bases: &[medes_agent::BaseInfo],
    uses: &[(medes_agent::BaseKey, u64)],
) -> Result<bool, tonic::Status> {
    let mut req = tonic::Request::new(pb::PublishBasesRequest {
        protocol_version: PROTOCOL_VERSION,
        node_id: cfg.node_id.0.clone(),
        bases: crate::pages::infos_to_pb(bases),
        uses: crate::pages::uses_to_pb(uses),
    });
    req.set_timeout(cfg.call_deadline);
    match tokio::time::timeout(cfg.call_deadline, c.publish_bases(req)).await {
        Ok(r) => r.map(|r| r.into_inner().known),
        Err(_) => Err(tonic::Status::deadline_exceeded("publish deadline passed")),
    }
}

/// Registers with the controller (retrying every second while it cannot be reached), then sends
/// heartbeats until `shutdown` is cancelled; registers again whenever the controller answers that
/// it does not know this node (it restarted). Returns `Ok` on shutdown and
/// [`LinkError::Refused`] if the controller refuses the node.
pub async fn run_agent_link(
    cfg: AgentLinkConfig,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let endpoint = Endpoint::from_shared(format!("http://{}", cfg.controller))
        .map_err(|source| LinkError::Address {
            address: cfg.controller.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    let mut client = RegistryClient::new(endpoint.connect_lazy());
    let mut interval = cfg.heartbeat_interval;
    let mut registered = false;
    let mut failures: u64 = 0;
    let mut seq: u64 = 0;
    // What the controller last accepted as this node's bases (`None`: publish again).
    type Published = (Vec<medes_agent::BaseInfo>, Vec<(medes_agent::BaseKey, u64)>);
    let mut published: Option<Published> = None;
    let changed = cfg.bases.as_ref().map(|a| a.bases_changed());
    loop {
        if !registered {
            match register(&mut client, &cfg).await {
                Ok(r) if r.accepted => {
                    registered = true;
                    failures = 0;
                    published = None;
                    if r.heartbeat_interval_ms > 0 {
                        interval = Duration::from_millis(r.heartbeat_interval_ms);
                    }
                    info!(node = %cfg.node_id, controller = %cfg.controller, "registered with the controller");
                }
                Ok(r) => {
                    return Err(LinkError::Refused {
                        node: cfg.node_id.clone(),
                        reason: r.reason,
                    });
                }
                Err(status) => {
                    if failures.is_multiple_of(10) {
                        warn!(controller = %cfg.controller, error = %status.message(), code = ?status.code(),
                              "cannot register with the controller yet; retrying every second");
                    }
                    failures += 1;
                }
            }
        } else {
            seq += 1;
            let mut req = tonic::Request::new(pb::HeartbeatRequest {
                node_id: cfg.node_id.0.clone(),
                sequence: seq,
                protocol_version: PROTOCOL_VERSION,
            });
            req.set_timeout(cfg.call_deadline);
            match tokio::time::timeout(cfg.call_deadline, client.heartbeat(req)).await {
                Ok(Ok(r)) if r.get_ref().known => {
                    if failures > 0 {
                        info!(controller = %cfg.controller, "controller reachable again");
                    }
                    failures = 0;
                }
                Ok(Ok(_)) => {
                    info!(node = %cfg.node_id, "the controller does not know this node: registering again");
                    registered = false;
                    continue;
                }
                Ok(Err(status)) => {
                    if failures.is_multiple_of(10) {
                        warn!(controller = %cfg.controller, error = %status.message(), "heartbeat failed");
                    }
                    failures += 1;
                }
                Err(_) => {
                    if failures.is_multiple_of(10) {
                        warn!(controller = %cfg.controller, "heartbeat deadline passed");
                    }
                    failures += 1;
                }
            }
        }
        if registered && let Some(agent) = &cfg.bases {
            let now = (agent.local_bases(), agent.base_uses());
            if published.as_ref() != Some(&now) {
                match publish(&mut client, &cfg, &now.0, &now.1).await {
                    Ok(true) => published = Some(now),
                    Ok(false) => {
                        registered = false;
                        continue;
                    }
                    Err(status) => {
                        warn!(controller = %cfg.controller, error = %status.message(), "publishing the node's bases failed");
                    }
                }
            }
        }
        let wait = if registered {
            interval
        } else {
            Duration::from_secs(1)
        };
        let base_change = async {
            match &changed {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
            _ = base_change => {}
        }
    }
}
