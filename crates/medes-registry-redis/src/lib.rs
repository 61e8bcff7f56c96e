//! The fingerprint registry's index on **Redis Cluster**, for clusters whose bases outgrow one
//! machine's memory: a [`medes_dedup::RegistryBackend`] over redis-rs's synchronous cluster
//! client, with one pipelined request per batch of pages.
//!
//! ```no_run
//! use std::sync::Arc;
//! use medes_registry_redis::{RedisCluster, RegistryConfig};
//! let cfg = RegistryConfig::redis(vec!["redis://10.0.0.5:7000".into()]);
//! let cluster = RedisCluster::connect(&cfg)?;
//! let registry = medes_dedup::Registry::with_backend(Arc::new(cluster.registry("medes:node-0:guest")?));
//! // register_base(&registry, ...) and dedup(&dump, &registry, ...) as with the in-memory one
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Design decisions:
//! - **Only the index moves.** Bases' metadata and reference counts (a few entries per base)
//!   stay in the process's [`medes_dedup::Registry`]; chunk, whole-page and position entries
//!   (tens of bytes per page) go to Redis. The base choice is the registry's, so both backends
//!   choose the same base pages.
//! - **Keys.** Entries live in one Redis hash per *bucket*, `{<prefix>:<b>}`, `b` = key hash
//!   mod `buckets` (default 64); a field is a kind byte and the key hash: `c` + chunk hash →
//!   up to 8 packed page refs (base, page: 4 + 4 bytes), `e` + whole-page hash → one ref,
//!   `p` + position key → refs. The hash tag spreads the buckets over the cluster's slots, and
//!   a batch of 256 pages (4,000+ fields) becomes at most `buckets` `HMGET`s sent as one
//!   pipeline: redis-rs splits it per master, writes all sub-pipelines, then reads them.
//! - **Writes read, then write, per batch of entries**: registering a base aggregates its refs
//!   per entry, reads the entries (pipelined `HMGET`s), appends as the in-memory index does
//!   (first 8 refs, no duplicates) and writes the changed ones (pipelined `HSET`s); removing
//!   drops one base's refs the same way. Writes of a prefix are serialized in the process, and
//!   a prefix has one owner process, so no other writer interleaves. (A first version appended
//!   with a Lua script per bucket: about 3× the server time, see docs/BENCHMARKS.md.)
//! - **Removal without a scan.** A base's fingerprints are kept in one blob key
//!   `{<prefix>:base:<id>}`; removing the base reads it and deletes exactly its refs.
//! - **One owner per prefix.** [`RedisCluster::registry`] empties its prefix first (every base
//!   listed in `{<prefix>:bases}`): a restarted agent registers its kept bases again, and
//!   entries of bases lost since are gone. Two processes must not share a prefix.
//!
//! What it does not do: no TLS or authentication options beyond what a `redis://` URL carries,
//! no sharing of one prefix between processes, no async API (the dedup pass runs on rayon
//! threads; each call borrows a pooled connection).
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod backend;
pub mod bench;
pub mod local;

pub use backend::{CommandError, ConnectError, OpenError, RedisCluster, RedisRegistry};
pub use bench::{BenchError, LookupBench, bench_lookup, bench_lookup_both, bench_lookup_with};
pub use local::{LocalCluster, StartClusterError, redis_server_missing};

use serde::{Deserialize, Serialize};

/// Where the fingerprint index lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// In the process's memory (the default).
    #[default]
    Memory,
    /// In a Redis Cluster.
    Redis,
}

/// The `[registry]` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// `"memory"` (default) or `"redis"`.
    pub backend: BackendKind,
    /// Seed nodes of the Redis Cluster (`redis://host:port`); needed with `backend = "redis"`.
    pub redis_urls: Vec<String>,
    /// First part of every key; each dedup domain of each node adds `:<node>:<domain>`.
    /// Default `medes`.
    pub key_prefix: String,
    /// Hashes per entry kind and prefix (spread over the cluster's slots). Fixed for the life
    /// of the data. Default 64: a key holds 1/64 of a prefix's entries of its kind, and at
    /// most 64 masters share a prefix's load; more buckets spread wider but cost more commands
    /// per lookup (measured in docs/BENCHMARKS.md).
    pub buckets: u32,
    /// Bound on connecting and on each request, ms. Default 2000.
    pub timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Memory,
            redis_urls: Vec::new(),
            key_prefix: "medes".into(),
            buckets: 64,
            timeout_ms: 2000,
        }
    }
}

impl RegistryConfig {
    /// The Redis backend on these seed nodes, other settings default.
    pub fn redis(urls: Vec<String>) -> Self {
        Self {
            backend: BackendKind::Redis,
            redis_urls: urls,
            ..Self::default()
        }
    }

    /// The key prefix of one dedup domain of one node.
    pub fn domain_prefix(&self, node: &str, domain: &str) -> String {
        format!("{}:{node}:{domain}", self.key_prefix)
    }
}
