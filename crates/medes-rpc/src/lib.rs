//! The controller ↔ node agent transport (issue 7, phases 1 and 2): gRPC over tonic, protocol
//! `medes.node.v1` (`proto/medes/node/v1/node.proto`, compiled by `build.rs` with protox: no
//! `protoc` needed).
//!
//! Two services:
//! - **`Node`**, served by each agent ([`serve_node`] wraps any [`NodeAgent`], normally a local
//!   `medes_agent::Agent`): `Execute` carries one [`Command`] and answers its
//!   `Result<Reply, AgentError>`; `Status` answers the node's state.
//! - **`Registry`**, served by the controller ([`Registry`], [`serve_registry`]): `Register`
//!   (node id, address, memory budget, protocol version → accepted, or refused with a reason)
//!   and `Heartbeat`. Agents run [`run_agent_link`]: register, then heartbeat every second,
//!   registering again when the controller no longer knows them (it restarted).
//!
//! On the controller side a [`RemoteAgent`] is a [`NodeAgent`] over a tonic client, so the
//! scheduler (`medes_controller::Controller`) drives remote nodes exactly like the in-process
//! one. Every call has a deadline ([`Deadlines`]: per command kind, a run's and a spawn's own
//! time limits plus slack), sent as `grpc-timeout` and enforced on both ends; transport
//! failures, deadlines and undecodable answers become [`AgentError::Unavailable`].
//!
//! # Design
//! - Only this crate knows the wire format: [`convert`] maps every `Command`/`Reply`/
//!   `AgentError` variant to a real proto message (no opaque envelope); JSON values (a run's
//!   parameters and returned value) travel as JSON text fields.
//! - Versioning: the package is `medes.node.v1`, fields are only ever added, and every request
//!   carries [`PROTOCOL_VERSION`]; a peer that speaks another version is refused (registration)
//!   or answered `FAILED_PRECONDITION` (execution).
//! - The controller is built once the expected number of nodes has registered
//!   ([`Registry::wait_for_nodes`]); nodes that register later under new ids are handed to a
//!   join hook ([`Registry::admit_late_nodes`], normally `Controller::add_node`, whose node list
//!   is append-only so indices stay valid) or refused when there is none. A node that registers
//!   again under a known id (an agent restart, a new address) is accepted and its
//!   [`RemoteAgent`] is re-pointed.
//! - The registry checks a registering node by calling its `Status` back (reachable at the
//!   address it gave, answering under the id it claimed) before accepting it.
//! - Missed heartbeats: a node not heard from for [`RegistryConfig::dead_after`] (5 s) is
//!   marked dead, and alive again when it is heard from or registers again. Each change is
//!   reported to a hook ([`Registry::on_node_events`], [`NodeEvent`]).
//!
//! # Phase 2 (first step): acting on dead nodes
//! `medes controller` wires [`NodeEvent`]s to the scheduler:
//! - [`NodeEvent::Dead`] → `Controller::set_node_alive(id, false)`: nothing new is placed there
//!   (cold starts go to live nodes; its warm and dedup sandboxes are no longer chosen), its idle
//!   sandboxes leave the controller's books (count logged, memory released), and every call
//!   in flight to it ends at once as `AgentError::Unavailable` instead of waiting for a
//!   [`Deadlines`] expiry: a run in flight ends as an error activation (never retried: it
//!   may have had effects); a cold start in flight (the action has not run) is retried once
//!   on a live node.
//! - [`NodeEvent::Alive`] / [`NodeEvent::Registered`] → alive again, then
//!   `Controller::reconcile_node`: sandboxes the node holds that the books do not know are
//!   purged, idle ones of the books it no longer holds are forgotten.
//!
//! # Remote base pages (issue 7, point 2)
//! A third service, **`Pages`**, is served by every agent next to `Node` ([`serve_agent`]):
//! - `ReadPages` streams pages of one of the agent's bases: the caller names runs of pages,
//!   the server answers many `PageChunk`s (up to 256 pages = 1 MiB each by default) sliced
//!   out of the base's mapping as `bytes::Bytes` (no copy before tonic's encoder; the receiver
//!   keeps the decoded `Bytes` as the pages). HTTP/2 windows are 16 MiB per stream and 64 MiB
//!   per connection, one connection per peer ([`PageClient`], the agents'
//!   `medes_agent::PageSource`). Measured at 0.2–0.6 GB/s, so the default transport of
//!   [`PageClient`] is the page wire instead ([`wire`]: the same request and chunks as a
//!   dedicated TCP framing on the same port, `sendfile` on the sending side, about 3× faster).
//! - `BaseFingerprints` answers a base's page fingerprints and position keys (about 50 bytes a
//!   page, [`pack_fingerprints`]) so another agent can register the base without its pages.
//! - `SyncBases` takes the controller's catalog of every live base.
//!
//! The controller keeps that catalog: agents publish their bases (`Registry.PublishBases`,
//! from [`run_agent_link`] with [`AgentLinkConfig::bases`]: after each registration, when a
//! base is made or retired, checked at every heartbeat), and
//! [`Registry::push_base_catalog`] (started by [`Registry::watch_heartbeats`]) pushes the bases
//! of the live nodes to every live node whenever the catalog or a node's liveness changes and
//! every [`BASE_RESYNC`]. A dead node's bases leave the catalog, so the other agents stop
//! using them (see `medes_agent::remote` for what an agent does with the catalog and how a
//! dedup start reads remote pages, with deadlines, falling back to a cold start).
//! Agents also publish how many of their dedup stores use each other node's base; the push
//! tells each owner the total over the other live nodes ([`Registry::used_elsewhere`]), and
//! the owner holds the base in its registry for them, so it cannot retire while stores
//! elsewhere depend on it (absolute counts: a dead user's holds go with the next push). The
//! window between a remote dedup and that push (about a heartbeat) is not covered: a base
//! retired in it leaves the store unrestorable, and its dedup start fails over to a cold start.
//!
//! A call whose connection the agent refused never left this side: [`RemoteAgent`] answers it
//! with `AgentError::NotDelivered` (the controller retries such a run or cold start once
//! elsewhere), any other transport failure with `AgentError::Unavailable`.
//!
//! Elsewhere: the namespaced test bed is `medes_testbed` (`medes cluster up`), the fault tests
//! are `crates/medes/tests/cluster_*.rs`; `medes controller` applies the budget each agent
//! registered with (`Controller::set_node_budget`) and re-adopts a returning node's sandboxes
//! (`Controller::reconcile_node`).
//!
//! # What this crate does not do
//! - Removing nodes; TLS/authentication between controller and agents.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod convert;
mod link;
mod node;
mod pages;
mod registry;
pub mod wire;

/// Generated code of `medes.node.v1` (messages, clients, servers).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("medes.node.v1");
}

pub use link::{AgentLinkConfig, LinkError, run_agent_link};
pub use medes_agent::{AgentError, Command, NodeAgent, Reply};
pub use node::{Deadlines, RemoteAgent, RemoteAgentError, serve_node};
pub use pages::{
    DEFAULT_CHUNK_PAGES, PageClient, PageClientConfig, PageTransport, pack_fingerprints,
    serve_agent, unpack_fingerprints,
};
pub use registry::{BASE_RESYNC, NodeEvent, NodeInfo, Registry, RegistryConfig, serve_registry};

/// The protocol version this build speaks (the `v1` of `medes.node.v1`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message either side accepts (a spawn carries the action's code, up to the API's
/// code limit).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A gRPC server ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed (accepting or serving connections).
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests;
