//! The `Pages` service (issue 7, point 2): an agent serves its bases' pages and fingerprints to
//! the other agents and takes the controller's base catalog; [`PageClient`] is its client, the
//! agents' [`medes_agent::PageSource`].
//!
//! Pages travel as `bytes::Bytes`: the server slices them out of the base's mapping (no copy
//! before tonic's encoder), many pages per message ([`PageClientConfig::chunk_pages`], 256 =
//! 1 MiB by default) and many messages per call (server streaming), over HTTP/2 connections with
//! large flow-control windows, one connection per peer, reused.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt, TryFutureExt};
use medes_agent::{
    Agent, BaseFingerprints, BaseInfo, BaseKey, NodeAgent, PageSource, PageStream, RemoteBase,
    SyncReport,
};
use medes_core::NodeId;
use medes_dedup::{BaseId, PageFingerprint};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use crate::node::NodeService;
use crate::pb;
use crate::pb::node_server::NodeServer;
use crate::pb::pages_client::PagesClient;
use crate::pb::pages_server::{Pages, PagesServer};
use crate::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ServeError};

/// Default pages per streamed message (1 MiB).
pub const DEFAULT_CHUNK_PAGES: u32 = 256;
/// Most pages per streamed message (16 MiB).
const MAX_CHUNK_PAGES: u32 = 4096;
/// HTTP/2 flow-control windows: a stream may have this much in flight unacknowledged.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

fn check_version(v: u32) -> Result<(), Status> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "protocol version {v} is not spoken here (this node speaks {PROTOCOL_VERSION})"
        )))
    }
}

/// Packs fingerprints: per page, hash (u64 LE), zero (u8), n (u8), n chunk hashes (u64 LE).
pub fn pack_fingerprints(fps: &[PageFingerprint]) -> Vec<u8> {
    let mut v = Vec::with_capacity(fps.len() * 58);
    for f in fps {
        v.extend_from_slice(&f.page_hash.to_le_bytes());
        v.push(u8::from(f.zero));
        let c = f.chunks();
        v.push(c.len() as u8);
        for h in c {
            v.extend_from_slice(&h.to_le_bytes());
        }
    }
    v
}

/// Unpacks [`pack_fingerprints`]' format; `None` if malformed.
pub fn unpack_fingerprints(mut b: &[u8]) -> Option<Vec<PageFingerprint>> {
    fn u64_at(b: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    }
    let mut out = Vec::with_capacity(b.len() / 50);
    let mut chunks = [0u64; medes_dedup::fingerprint::MAX_K];
    while !b.is_empty() {
        let hash = u64_at(b, 0)?;
        let zero = *b.get(8)? != 0;
        let n = usize::from(*b.get(9)?);
        if n > chunks.len() {
            return None;
        }
        for (i, c) in chunks.iter_mut().take(n).enumerate() {
            *c = u64_at(b, 10 + 8 * i)?;
        }
        out.push(PageFingerprint::from_parts(hash, zero, &chunks[..n]));
        b = &b[10 + 8 * n..];
    }
    Some(out)
}

fn info_to_pb(b: &BaseInfo) -> pb::BaseInfo {
    pb::BaseInfo {
        key: Some(pb::BaseKey {
            node: b.key.node.0.clone(),
            id: b.key.id.0,
        }),
        domain: b.domain.clone(),
        pages: b.pages,
        function: b.function.clone(),
    }
}

fn info_from_pb(b: pb::BaseInfo) -> Option<BaseInfo> {
    let key = b.key?;
    Some(BaseInfo {
        key: BaseKey {
            node: NodeId(key.node),
            id: BaseId(key.id),
        },
        domain: b.domain,
        pages: b.pages,
        function: b.function,
    })
}

/// The controller's catalog entry of one base, as sent to the agents.
pub(crate) fn remote_to_pb(b: &RemoteBase) -> pb::RemoteBase {
    pb::RemoteBase {
        info: Some(info_to_pb(&b.info)),
        address: b.address.to_string(),
    }
}

pub(crate) fn uses_to_pb(v: &[(BaseKey, u64)]) -> Vec<pb::BaseUse> {
    v.iter()
        .map(|(k, n)| pb::BaseUse {
            key: Some(pb::BaseKey {
                node: k.node.0.clone(),
                id: k.id.0,
            }),
            dependents: *n,
        })
        .collect()
}

pub(crate) fn uses_from_pb(v: Vec<pb::BaseUse>) -> Vec<(BaseKey, u64)> {
    v.into_iter()
        .filter_map(|u| {
            let k = u.key?;
            Some((
                BaseKey {
                    node: NodeId(k.node),
                    id: BaseId(k.id),
                },
                u.dependents,
            ))
        })
        .collect()
}

pub(crate) fn infos_to_pb(v: &[BaseInfo]) -> Vec<pb::BaseInfo> {
    v.iter().map(info_to_pb).collect()
}

pub(crate) fn infos_from_pb(v: Vec<pb::BaseInfo>) -> Vec<BaseInfo> {
    v.into_iter().filter_map(info_from_pb).collect()
}

struct PagesService {
    agent: Agent,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::PageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Pages for PagesService {
    type ReadPagesStream = ChunkStream;

    async fn read_pages(
        &self,
        req: Request<pb::ReadPagesRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let reader = self
            .agent
            .base_reader(&req.domain, BaseId(req.base))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no base {} in domain {:?} on this node",
                    req.base, req.domain
                ))
            })?;
        let per = match req.chunk_pages {
            0 => DEFAULT_CHUNK_PAGES,
            n => n.min(MAX_CHUNK_PAGES),
        } as u64;
        let n = reader.n_pages();
        let mut chunks = Vec::new();
        for r in &req.runs {
            if r.first.checked_add(r.count).is_none_or(|e| e > n) {
                return Err(Status::out_of_range(format!(
                    "pages {}+{} are outside base {} ({n} pages)",
                    r.first, r.count, req.base
                )));
            }
            let mut first = r.first;
            while first < r.first + r.count {
                let count = per.min(r.first + r.count - first);
                chunks.push((first, count));
                first += count;
            }
        }
        let stream = futures::stream::iter(chunks).map(move |(first, count)| {
            reader
                .pages(first, count)
                .map(|data| pb::PageChunk { first, data })
                .ok_or_else(|| Status::internal("page range vanished"))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn base_fingerprints(
        &self,
        req: Request<pb::BaseFingerprintsRequest>,
    ) -> Result<Response<pb::BaseFingerprintsResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let agent = self.agent.clone();
        let (domain, base) = (req.domain.clone(), BaseId(req.base));
        let f = tokio::task::spawn_blocking(move || agent.base_fingerprints(&domain, base))
            .await
            .map_err(|e| Status::internal(format!("fingerprint task failed: {e}")))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no base {} in domain {:?} on this node",
                    req.base, req.domain
                ))
            })?;
        let positions: Vec<u8> = f.positions.iter().flat_map(|p| p.to_le_bytes()).collect();
        Ok(Response::new(pb::BaseFingerprintsResponse {
            pages: f.fps.len() as u64,
            fingerprints: pack_fingerprints(&f.fps).into(),
            positions: positions.into(),
        }))
    }

    async fn sync_bases(
        &self,
        req: Request<pb::SyncBasesRequest>,
    ) -> Result<Response<pb::SyncBasesResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let mut catalog = Vec::with_capacity(req.bases.len());
        for b in req.bases {
            let address = b.address.parse().map_err(|e| {
                Status::invalid_argument(format!("base address {:?}: {e}", b.address))
            })?;
            let info = b
                .info
                .and_then(info_from_pb)
                .ok_or_else(|| Status::invalid_argument("a catalog entry without a base"))?;
            catalog.push(RemoteBase { info, address });
        }
        let used = uses_from_pb(req.used_elsewhere);
        let r: SyncReport = self.agent.sync_bases(catalog, used).await;
        Ok(Response::new(pb::SyncBasesResponse {
            imported: r.imported,
            removed: r.removed,
            held: r.held,
            failed: r.failed,
        }))
    }
}

/// How a [`PageClient`] reads pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTransport {
    /// The page wire (a dedicated TCP framing on the agent's port, see `wire.rs`): the
    /// default, one kernel copy each side.
    Wire,
    /// gRPC server streaming (`Pages.ReadPages`).
    Grpc,
}

/// Settings of a [`PageClient`].
#[derive(Debug, Clone, Copy)]
pub struct PageClientConfig {
    /// Establishing a connection to a peer.
    pub connect: Duration,
    /// Pages per streamed message asked for.
    pub chunk_pages: u32,
    /// How pages travel (fingerprints and catalogs always use gRPC).
    pub transport: PageTransport,
}

impl Default for PageClientConfig {
    fn default() -> Self {
        PageClientConfig {
            connect: Duration::from_secs(1),
            chunk_pages: DEFAULT_CHUNK_PAGES,
            transport: PageTransport::Wire,
        }
    }
}

/// The client of other nodes' `Pages` services (one lazily made HTTP/2 connection per peer).
pub struct PageClient {
    cfg: PageClientConfig,
    peers: Mutex<HashMap<SocketAddr, PagesClient<Channel>>>,
}

impl PageClient {
    /// A client with no connection yet.
    pub fn new(cfg: PageClientConfig) -> PageClient {
        PageClient {
            cfg,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn peer(&self, at: SocketAddr) -> Result<PagesClient<Channel>, String> {
        if let Some(c) = self.peers.lock().get(&at) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{at}"))
            .map_err(|e| format!("peer address {at}: {e}"))?
            .connect_timeout(self.cfg.connect)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = PagesClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.peers.lock().insert(at, c.clone());
        Ok(c)
    }

    /// Sends the catalog, and the uses of the receiver's bases by other nodes, to the node at
    /// `at` (see [`Agent::sync_bases`]).
    pub async fn sync_bases(
        &self,
        at: SocketAddr,
        bases: &[RemoteBase],
        used_elsewhere: &[(BaseKey, u64)],
        generation: u64,
        deadline: Duration,
    ) -> Result<SyncReport, String> {
        let mut c = self.peer(at)?;
        let mut req = Request::new(pb::SyncBasesRequest {
            protocol_version: PROTOCOL_VERSION,
            bases: bases.iter().map(remote_to_pb).collect(),
            generation,
            used_elsewhere: uses_to_pb(used_elsewhere),
        });
        req.set_timeout(deadline);
        let r = tokio::time::timeout(deadline, c.sync_bases(req))
            .await
            .map_err(|_| format!("sync with {at}: deadline of {deadline:?} passed"))?
            .map_err(|s| format!("sync with {at}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        Ok(SyncReport {
            imported: r.imported,
            removed: r.removed,
            held: r.held,
            failed: r.failed,
            pinned: 0,
        })
    }
}

impl PageSource for PageClient {
    fn read_pages(
        &self,
        at: SocketAddr,
        domain: &str,
        base: BaseId,
        runs: Vec<(u64, u64)>,
        deadline: Duration,
    ) -> PageStream {
        if self.cfg.transport == PageTransport::Wire {
            return crate::wire::read_pages(
                at,
                domain,
                base,
                runs,
                self.cfg.chunk_pages,
                self.cfg.connect,
            );
        }
        let client = self.peer(at);
        let req = pb::ReadPagesRequest {
            protocol_version: PROTOCOL_VERSION,
            domain: domain.to_string(),
            base: base.0,
            runs: runs
                .into_iter()
                .map(|(first, count)| pb::PageRun { first, count })
                .collect(),
            chunk_pages: self.cfg.chunk_pages,
        };
        let call = async move {
            let mut c = client?;
            let mut req = Request::new(req);
            req.set_timeout(deadline);
            let stream = c
                .read_pages(req)
                .await
                .map_err(|s| format!("{at}: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            Ok::<_, String>(stream.map(move |item| {
                item.map(|c| (c.first, c.data))
                    .map_err(|s| format!("{at}: {:?}: {}", s.code(), s.message()))
            }))
        };
        call.try_flatten_stream().boxed()
    }

    fn fingerprints(
        &self,
        at: SocketAddr,
        domain: &str,
        base: BaseId,
        deadline: Duration,
    ) -> BoxFuture<'static, Result<BaseFingerprints, String>> {
        let client = self.peer(at);
        let req = pb::BaseFingerprintsRequest {
            protocol_version: PROTOCOL_VERSION,
            domain: domain.to_string(),
            base: base.0,
        };
        async move {
            let mut c = client?;
            let mut req = Request::new(req);
            req.set_timeout(deadline);
            let r = tokio::time::timeout(deadline, c.base_fingerprints(req))
                .await
                .map_err(|_| format!("{at}: fingerprints deadline of {deadline:?} passed"))?
                .map_err(|s| format!("{at}: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let fps = unpack_fingerprints(&r.fingerprints)
                .ok_or_else(|| format!("{at}: malformed fingerprints"))?;
            if fps.len() as u64 != r.pages || r.positions.len() % 8 != 0 {
                return Err(format!("{at}: fingerprints do not match the page count"));
            }
            let positions = r
                .positions
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Ok(BaseFingerprints { fps, positions })
        }
        .boxed()
    }
}

/// Serves a node agent: `Node` (the controller's commands) and `Pages` (its bases' pages and
/// fingerprints for other agents, the controller's catalog) on `listener` until `shutdown`
/// resolves, and the page wire on the same port (connections starting with
/// [`crate::wire::MAGIC`]). The agent reads other nodes' bases through a [`PageClient`] set
/// here.
pub async fn serve_agent<F>(
    agent: Agent,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    agent.set_page_source(Arc::new(PageClient::new(PageClientConfig::default())));
    let local: Arc<dyn NodeAgent> = Arc::new(agent.clone());
    let node = NodeServer::new(NodeService::new(local))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let agent_for_wire = agent.clone();
    let pages = PagesServer::new(PagesService { agent })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // One port: each connection is routed by its first byte (HTTP/2 starts with `PRI`).
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<tokio::net::TcpStream>>(128);
    let wire_agent = agent_for_wire;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                r = listener.accept() => match r {
                    Ok((sock, _)) => {
                        let (tx, agent) = (tx.clone(), wire_agent.clone());
                        tokio::spawn(async move {
                            let mut b = [0u8; 1];
                            let first = tokio::time::timeout(Duration::from_secs(10), sock.peek(&mut b)).await;
                            match first {
                                Ok(Ok(1)) if b[0] == crate::wire::MAGIC[0] => {
                                    if let Err(error) = crate::wire::serve_connection(agent, sock).await {
                                        tracing::debug!(%error, "page wire connection ended");
                                    }
                                }
                                Ok(Ok(n)) if n > 0 => {
                                    let _ = tx.send(Ok(sock)).await;
                                }
                                _ => {}
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
    });
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // A peer gone silent (partition) must not hold a graceful shutdown forever.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(node)
        .add_service(pages)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn fingerprints_round_trip() {
        let cfg = medes_dedup::FingerprintConfig::default();
        let mut pages = vec![[0u8; medes_dedup::PAGE]; 3];
        for (i, b) in pages[1].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        pages[2][100] = 9;
        let fps: Vec<_> = pages
            .iter()
            .map(|p| medes_dedup::fingerprint(p, &cfg))
            .collect();
        let back = unpack_fingerprints(&pack_fingerprints(&fps)).unwrap();
        assert_eq!(back, fps);
        assert!(unpack_fingerprints(&[1, 2, 3]).is_none());
        let mut bad = pack_fingerprints(&fps);
        bad[9] = 200;
        assert!(unpack_fingerprints(&bad).is_none());
    }
}
