//! The agent side of the runtime protocol: one JSON request per connection, the agent shuts
//! down its write side, the runtime answers one JSON object and closes.

use std::io;
use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest reply accepted (results and logs are bounded upstream; this guards memory).
const MAX_REPLY: u64 = 256 * 1024 * 1024;

/// Sends `req`, returns the raw reply bytes (empty if the runtime closed without answering).
pub(crate) async fn call(sock: &Path, req: &Value) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(req).map_err(io::Error::other)?;
    let mut s = UnixStream::connect(sock).await?;
    s.write_all(&body).await?;
    s.shutdown().await?;
    let mut out = Vec::with_capacity(512);
    (&mut s).take(MAX_REPLY).read_to_end(&mut out).await?;
    Ok(out)
}
