//! The `Node` service: its server over a local [`NodeAgent`], and [`RemoteAgent`], its client.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use medes_agent::{AgentError, Command, NodeAgent, Reply};
use medes_core::NodeId;
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::convert;
use crate::pb;
use crate::pb::node_client::NodeClient;
use crate::pb::node_server::{Node, NodeServer};
use crate::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ServeError};

/// Deadlines of the controller's calls to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Establishing a connection.
    pub connect: Duration,
    /// `Status` and `Purge`.
    pub short: Duration,
    /// Added to a run's own time limit (queueing, transport, teardown after a timeout).
    pub run_slack: Duration,
    /// Added to a spawn's init time limit (waiting for a start permit, creating the sandbox).
    pub spawn_slack: Duration,
    /// Checkpoints and restores: make-base, dedup, restore, make-template, template start.
    pub checkpoint: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            connect: Duration::from_secs(3),
            short: Duration::from_secs(15),
            run_slack: Duration::from_secs(30),
            spawn_slack: Duration::from_secs(60),
            checkpoint: Duration::from_secs(300),
        }
    }
}

impl Deadlines {
    /// The deadline of one command.
    pub fn of(&self, cmd: &Command) -> Duration {
        match cmd {
            Command::Spawn(s) => Duration::from_millis(s.init_timeout_ms) + self.spawn_slack,
            Command::Run(r) => Duration::from_millis(r.timeout_ms) + self.run_slack,
            Command::Purge { .. } | Command::ReleaseBase { .. } | Command::Status => self.short,
            Command::MakeBase { .. }
            | Command::Dedup { .. }
            | Command::Restore { .. }
            | Command::MakeTemplate { .. }
            | Command::TemplateStart(_) => self.checkpoint,
        }
    }
}

pub(crate) struct NodeService {
    agent: Arc<dyn NodeAgent>,
}

impl NodeService {
    pub(crate) fn new(agent: Arc<dyn NodeAgent>) -> NodeService {
        NodeService { agent }
    }
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "protocol version {v} is not spoken here (this node speaks {PROTOCOL_VERSION})"
        )))
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let cmd = req
            .command
            .ok_or_else(|| Status::invalid_argument("execute request without a command"))?;
        let cmd =
            convert::command_from_pb(cmd).map_err(|e| Status::invalid_argument(e.to_string()))?;
        debug!(command = cmd.name(), "executing a remote command");
        // The agent finishes the work even if this future is dropped (deadline, disconnect).
        let result = self.agent.execute(cmd).await;
        Ok(Response::new(convert::result_to_pb(&result)))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        check_version(req.into_inner().protocol_version)?;
        match self.agent.execute(Command::Status).await {
            Ok(Reply::Status(s)) => Ok(Response::new(pb::StatusResponse {
                status: Some(convert::status_to_pb(&s)),
            })),
            Ok(other) => Err(Status::internal(format!(
                "the agent answered a status command with {other:?}"
            ))),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

/// Serves `Node` for `agent` on `listener` until `shutdown` resolves (then lets calls in
/// progress finish).
pub async fn serve_node<F>(
    agent: Arc<dyn NodeAgent>,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let svc = NodeServer::new(NodeService { agent })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

/// A [`RemoteAgent`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RemoteAgentError {
    /// The address does not make a valid endpoint.
    #[error("node address {address}: {source}")]
    Address {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A node agent in another process, reached over gRPC.
///
/// The connection is made lazily and re-made after failures; [`RemoteAgent::set_address`]
/// re-points it (a node that registered again from a new address).
pub struct RemoteAgent {
    node: NodeId,
    deadlines: Deadlines,
    conn: RwLock<(SocketAddr, NodeClient<Channel>)>,
}

fn client(address: SocketAddr, d: &Deadlines) -> Result<NodeClient<Channel>, RemoteAgentError> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| RemoteAgentError::Address { address, source })?
        .connect_timeout(d.connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(NodeClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Whether the call failed because the connection was refused (the request was never sent).
fn refused(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

fn unavailable(node: &NodeId, status: &Status) -> AgentError {
    if refused(status) {
        return AgentError::NotDelivered(format!(
            "node {node}: connection refused ({})",
            status.message()
        ));
    }
    AgentError::Unavailable(match status.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            format!("node {node}: deadline passed ({})", status.message())
        }
        code => format!("node {node}: {code:?}: {}", status.message()),
    })
}

impl RemoteAgent {
    /// A client of the agent `node` serving `Node` at `address` (must run inside a tokio
    /// runtime; no connection is made until the first call).
    pub fn connect_lazy(
        node: NodeId,
        address: SocketAddr,
        deadlines: Deadlines,
    ) -> Result<RemoteAgent, RemoteAgentError> {
        let c = client(address, &deadlines)?;
        Ok(RemoteAgent {
            node,
            deadlines,
            conn: RwLock::new((address, c)),
        })
    }

    /// The node.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// The address calls go to.
    pub fn address(&self) -> SocketAddr {
        self.conn.read().0
    }

    /// Sends further calls to `address` (calls in flight finish on the old connection).
    pub fn set_address(&self, address: SocketAddr) -> Result<(), RemoteAgentError> {
        if self.address() == address {
            return Ok(());
        }
        let c = client(address, &self.deadlines)?;
        *self.conn.write() = (address, c);
        Ok(())
    }

    /// Calls `Status` with `deadline`.
    pub async fn status(&self, deadline: Duration) -> Result<medes_agent::NodeStatus, AgentError> {
        let mut c = self.conn.read().1.clone();
        let mut req = Request::new(pb::StatusRequest {
            protocol_version: PROTOCOL_VERSION,
        });
        req.set_timeout(deadline);
        let call = tokio::time::timeout(deadline, c.status(req));
        let resp = match call.await {
            Err(_) => {
                return Err(AgentError::Unavailable(format!(
                    "node {}: status deadline of {deadline:?} passed",
                    self.node
                )));
            }
            Ok(Err(status)) => return Err(unavailable(&self.node, &status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let st = resp.status.ok_or_else(|| {
            AgentError::Unavailable(format!(
                "node {}: status answer without a status",
                self.node
            ))
        })?;
        convert::status_from_pb(st)
            .map_err(|e| AgentError::Unavailable(format!("node {}: bad answer: {e}", self.node)))
    }
}

impl NodeAgent for RemoteAgent {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let mut c = self.conn.read().1.clone();
        let node = self.node.clone();
        let deadline = self.deadlines.of(&cmd);
        let name = cmd.name();
        let mut req = Request::new(pb::ExecuteRequest {
            protocol_version: PROTOCOL_VERSION,
            command: Some(convert::command_to_pb(&cmd)),
        });
        req.set_timeout(deadline);
        Box::pin(async move {
            // The header makes the server give up too; the local timer bounds a peer that
            // does not answer at all.
            let resp = match tokio::time::timeout(deadline, c.execute(req)).await {
                Err(_) => {
                    return Err(AgentError::Unavailable(format!(
                        "node {node}: {name} deadline of {deadline:?} passed"
                    )));
                }
                Ok(Err(status)) => return Err(unavailable(&node, &status)),
                Ok(Ok(r)) => r.into_inner(),
            };
            convert::result_from_pb(resp).map_err(|e| {
                AgentError::Unavailable(format!("node {node}: bad answer to {name}: {e}"))
            })?
        })
    }
}
