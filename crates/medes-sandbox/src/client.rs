//! The agent side of the runtime protocol: one JSON request per connection, the agent shuts
//! down its write side, the runtime answers one JSON object on one line and closes.

use std::io;
use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Largest reply accepted (results and logs are bounded upstream; this guards memory).
const MAX_REPLY: u64 = 256 * 1024 * 1024;

/// Sends `req`, returns the raw reply bytes (empty if the runtime closed without answering).
pub(crate) async fn call(sock: &Path, req: &Value) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(req).map_err(io::Error::other)?;
    let mut s = UnixStream::connect(sock).await?;
    s.write_all(&body).await?;
    s.shutdown().await?;
    // The reply is one line; do not wait for EOF (a process forked by the action could hold a
    // copy of the connection).
    let mut out = Vec::with_capacity(512);
    BufReader::new((&mut s).take(MAX_REPLY))
        .read_until(b'\n', &mut out)
        .await?;
    if out.last() == Some(&b'\n') {
        out.pop();
    } else {
        out.clear(); // closed before a complete reply
    }
    Ok(out)
}
