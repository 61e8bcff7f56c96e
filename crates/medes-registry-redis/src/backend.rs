//! The Redis Cluster index: connection pool, key layout, Lua writes, pipelined lookups.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use medes_dedup::registry::MAX_REFS_PER_CHUNK;
use medes_dedup::{
    BackendError, BaseId, Candidates, PageFingerprint, PageKeys, PageRef, RegistryBackend,
};
use parking_lot::Mutex;
use redis::Value;
use redis::cluster::{ClusterClient, ClusterConnection, ClusterPipeline};

use crate::{BackendKind, RegistryConfig};

/// Connecting to the cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The configuration does not ask for Redis, or names no node.
    #[error("registry backend is not redis or names no redis_urls")]
    NotRedis,
    /// `buckets` is 0.
    #[error("registry buckets must be positive")]
    NoBuckets,
    /// A seed URL is not a Redis URL.
    #[error("bad redis url {url:?}")]
    BadUrl {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// No node answered.
    #[error("connecting to the redis cluster")]
    Connect(#[source] redis::RedisError),
}

/// Opening a prefix failed (emptying what an earlier owner left).
#[derive(Debug, thiserror::Error)]
#[error("emptying registry prefix {prefix:?}")]
pub struct OpenError {
    /// The prefix.
    pub prefix: String,
    /// The cause.
    #[source]
    pub source: CommandError,
}

/// A request to the cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Redis (connection, timeout, cluster redirection, script) failed.
    #[error("redis request failed")]
    Redis(#[from] redis::RedisError),
    /// A stored value has not the expected form.
    #[error("malformed value under key {key:?}")]
    Malformed {
        /// The key.
        key: String,
    },
}

impl From<CommandError> for BackendError {
    fn from(e: CommandError) -> Self {
        BackendError::new(e)
    }
}

/// A connection to a Redis Cluster, shared by the registries of all dedup domains.
pub struct RedisCluster {
    client: ClusterClient,
    pool: Mutex<Vec<ClusterConnection>>,
    buckets: u32,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

/// Most pooled idle connections.
const POOL: usize = 16;
/// Pages per pipeline when registering a base.
const INSERT_PAGES: usize = 4096;

impl RedisCluster {
    /// Connects to the cluster named by `cfg` (checks that a node answers).
    pub fn connect(cfg: &RegistryConfig) -> Result<Arc<RedisCluster>, ConnectError> {
        if cfg.backend != BackendKind::Redis || cfg.redis_urls.is_empty() {
            return Err(ConnectError::NotRedis);
        }
        if cfg.buckets == 0 {
            return Err(ConnectError::NoBuckets);
        }
        let mut infos = Vec::with_capacity(cfg.redis_urls.len());
        for url in &cfg.redis_urls {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(
                |source| ConnectError::BadUrl {
                    url: url.clone(),
                    source,
                },
            )?;
            infos.push(info);
        }
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let client = ClusterClient::builder(infos)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .build()
            .map_err(ConnectError::Connect)?;
        let conn = client.get_connection().map_err(ConnectError::Connect)?;
        Ok(Arc::new(RedisCluster {
            client,
            pool: Mutex::new(vec![conn]),
            buckets: cfg.buckets,
        }))
    }

    /// The index under one key prefix (one dedup domain of one node), emptied first: this
    /// process owns the prefix from now on.
    pub fn registry(self: &Arc<Self>, prefix: &str) -> Result<RedisRegistry, OpenError> {
        let r = RedisRegistry {
            cluster: self.clone(),
            prefix: escape(prefix),
            writes: Arc::new(Mutex::new(())),
        };
        r.clear().map_err(|source| OpenError {
            prefix: prefix.to_string(),
            source,
        })?;
        Ok(r)
    }

    /// Runs `f` on a pooled connection (a new one if none is idle); a connection that failed
    /// is dropped.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut ClusterConnection) -> Result<T, CommandError>,
    ) -> Result<T, CommandError> {
        let pooled = self.pool.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.client.get_connection()?,
        };
        let r = f(&mut conn);
        if r.is_ok() {
            let mut p = self.pool.lock();
            if p.len() < POOL {
                p.push(conn);
            }
        }
        r
    }
}

/// Keeps a prefix from opening or closing a hash tag.
fn escape(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        match c {
            '%' => s.push_str("%25"),
            '{' => s.push_str("%7B"),
            '}' => s.push_str("%7D"),
            c => s.push(c),
        }
    }
    s
}

/// An entry's new value (`None`: delete it).
type Update = ((Kind, u64), Option<Vec<u8>>);
/// A field and its value.
type FieldValue = ([u8; 9], Vec<u8>);

/// The entry kinds (field prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Chunk,
    Exact,
    Position,
}

impl Kind {
    /// The field of a key hash of this kind (a kind byte, then the hash, little-endian).
    fn field(self, h: u64) -> [u8; 9] {
        let mut f = [0u8; 9];
        f[0] = match self {
            Kind::Chunk => b'c',
            Kind::Exact => b'e',
            Kind::Position => b'p',
        };
        f[1..].copy_from_slice(&h.to_le_bytes());
        f
    }
}

fn pack(r: PageRef) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&r.base.0.to_le_bytes());
    b[4..].copy_from_slice(&r.page.to_le_bytes());
    b
}

fn unpack(b: &[u8]) -> PageRef {
    let mut base = [0u8; 4];
    let mut page = [0u8; 4];
    base.copy_from_slice(&b[..4]);
    page.copy_from_slice(&b[4..8]);
    PageRef {
        base: BaseId(u32::from_le_bytes(base)),
        page: u32::from_le_bytes(page),
    }
}

/// One base's fingerprints as stored for its removal: per non-zero page, the page hash, the
/// position key, the chunk count and the chunks (little-endian).
fn encode_blob(fps: &[PageFingerprint], positions: &[u64]) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, fp) in fps.iter().enumerate().filter(|(_, fp)| !fp.zero) {
        b.extend_from_slice(&fp.page_hash.to_le_bytes());
        b.extend_from_slice(&positions.get(i).copied().unwrap_or(0).to_le_bytes());
        let c = fp.chunks();
        b.push(c.len() as u8);
        for h in c {
            b.extend_from_slice(&h.to_le_bytes());
        }
    }
    b
}

/// The (kind, key hash) pairs of a blob written by [`encode_blob`]; `None` if malformed.
fn decode_blob(mut b: &[u8]) -> Option<Vec<(Kind, u64)>> {
    fn u64_at(b: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        out.push((Kind::Exact, u64_at(b)?));
        let pos = u64_at(b.get(8..)?)?;
        if pos != 0 {
            out.push((Kind::Position, pos));
        }
        let n = usize::from(*b.get(16)?);
        b = b.get(17..)?;
        for _ in 0..n {
            out.push((Kind::Chunk, u64_at(b)?));
            b = b.get(8..)?;
        }
    }
    Some(out)
}

/// The index of one key prefix in a [`RedisCluster`] (see the crate documentation).
#[derive(Debug, Clone)]
pub struct RedisRegistry {
    cluster: Arc<RedisCluster>,
    prefix: String,
    /// Writes (register, remove) read entries, then write them: one at a time per prefix
    /// (the prefix has one owner process, see the crate documentation).
    writes: Arc<Mutex<()>>,
}

impl RedisRegistry {
    /// The (escaped) key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn bucket(&self, h: u64) -> u32 {
        (h % u64::from(self.cluster.buckets)) as u32
    }

    fn key(&self, bucket: u32) -> String {
        format!("{{{}:{bucket}}}", self.prefix)
    }

    fn base_key(&self, id: BaseId) -> String {
        format!("{{{}:base:{}}}", self.prefix, id.0)
    }

    fn bases_key(&self) -> String {
        format!("{{{}:bases}}", self.prefix)
    }

    /// Bases with entries under this prefix.
    pub fn stored_bases(&self) -> Result<Vec<BaseId>, CommandError> {
        let key = self.bases_key();
        let ids: Vec<u32> = self
            .cluster
            .with_conn(|c| Ok(redis::cmd("SMEMBERS").arg(&key).query(c)?))?;
        Ok(ids.into_iter().map(BaseId).collect())
    }

    /// Removes every base's entries under this prefix.
    pub fn clear(&self) -> Result<(), CommandError> {
        for id in self.stored_bases()? {
            self.remove(id)?;
        }
        Ok(())
    }

    /// Entries (chunk, whole-page and position keys) stored under this prefix.
    pub fn count_entries(&self) -> Result<u64, CommandError> {
        let mut p = ClusterPipeline::new();
        for b in 0..self.cluster.buckets {
            p.cmd("HLEN").arg(self.key(b));
        }
        let n: Vec<u64> = self.cluster.with_conn(|c| Ok(p.query(c)?))?;
        Ok(n.iter().sum())
    }

    /// The current values of entries (absent ones left out), one pipelined `HMGET` per bucket.
    fn fetch(&self, keys: &[(Kind, u64)]) -> Result<HashMap<(Kind, u64), Vec<u8>>, CommandError> {
        let mut groups: HashMap<u32, Vec<(Kind, u64)>> = HashMap::new();
        for &(kind, h) in keys {
            groups.entry(self.bucket(h)).or_default().push((kind, h));
        }
        let mut out = HashMap::with_capacity(keys.len());
        if groups.is_empty() {
            return Ok(out);
        }
        let groups: Vec<(u32, Vec<(Kind, u64)>)> = groups.into_iter().collect();
        let mut p = ClusterPipeline::with_capacity(groups.len());
        for (b, fields) in &groups {
            let cmd = p.cmd("HMGET").arg(self.key(*b));
            for (kind, h) in fields {
                cmd.arg(&kind.field(*h)[..]);
            }
        }
        let answers: Vec<Value> = self.cluster.with_conn(|c| Ok(p.query(c)?))?;
        for ((b, fields), a) in groups.iter().zip(answers) {
            let malformed = || CommandError::Malformed { key: self.key(*b) };
            let Value::Array(items) = a else {
                return Err(malformed());
            };
            if items.len() != fields.len() {
                return Err(malformed());
            }
            for (f, v) in fields.iter().zip(items) {
                match v {
                    Value::Nil => {}
                    Value::BulkString(v) if !v.is_empty() && v.len() % 8 == 0 => {
                        out.insert(*f, v);
                    }
                    _ => return Err(malformed()),
                }
            }
        }
        Ok(out)
    }

    /// Writes entries (`None`: delete), one pipelined `HSET` and `HDEL` per bucket.
    fn store(&self, updates: Vec<Update>) -> Result<(), CommandError> {
        let mut sets: HashMap<u32, Vec<FieldValue>> = HashMap::new();
        let mut dels: HashMap<u32, Vec<[u8; 9]>> = HashMap::new();
        for ((kind, h), v) in updates {
            let b = self.bucket(h);
            match v {
                Some(v) => sets.entry(b).or_default().push((kind.field(h), v)),
                None => dels.entry(b).or_default().push(kind.field(h)),
            }
        }
        if sets.is_empty() && dels.is_empty() {
            return Ok(());
        }
        let mut p = ClusterPipeline::with_capacity(sets.len() + dels.len());
        for (b, fv) in &sets {
            let cmd = p.cmd("HSET").arg(self.key(*b));
            for (f, v) in fv {
                cmd.arg(&f[..]).arg(&v[..]);
            }
            cmd.ignore();
        }
        for (b, fs) in &dels {
            let cmd = p.cmd("HDEL").arg(self.key(*b));
            for f in fs {
                cmd.arg(&f[..]);
            }
            cmd.ignore();
        }
        self.cluster.with_conn(|c| Ok(p.query::<()>(c)?))
    }

    fn remove(&self, id: BaseId) -> Result<(), CommandError> {
        let _w = self.writes.lock();
        let bkey = self.base_key(id);
        let blob: Option<Vec<u8>> = self
            .cluster
            .with_conn(|c| Ok(redis::cmd("GET").arg(&bkey).query(c)?))?;
        if let Some(blob) = blob {
            let mut keys =
                decode_blob(&blob).ok_or(CommandError::Malformed { key: bkey.clone() })?;
            keys.sort_unstable_by_key(|&(k, h)| (k as u8, h));
            keys.dedup();
            for part in keys.chunks(INSERT_PAGES * 8) {
                let current = self.fetch(part)?;
                // Drop the base's refs, keeping the others in order.
                let tag = id.0.to_le_bytes();
                let updates = current
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let keep: Vec<u8> = v
                            .chunks_exact(8)
                            .filter(|r| r[..4] != tag)
                            .flatten()
                            .copied()
                            .collect();
                        match keep.len() {
                            0 => Some((k, None)),
                            n if n == v.len() => None,
                            _ => Some((k, Some(keep))),
                        }
                    })
                    .collect();
                self.store(updates)?;
            }
            self.cluster
                .with_conn(|c| Ok(redis::cmd("DEL").arg(&bkey).query::<()>(c)?))?;
        }
        let skey = self.bases_key();
        self.cluster
            .with_conn(|c| Ok(redis::cmd("SREM").arg(&skey).arg(id.0).query::<()>(c)?))?;
        Ok(())
    }

    fn insert(
        &self,
        id: BaseId,
        fps: &[PageFingerprint],
        positions: &[u64],
    ) -> Result<(), CommandError> {
        self.remove(id)?;
        let _w = self.writes.lock();
        // The blob and the base's listing first: a failure half-way leaves removable entries.
        let blob = encode_blob(fps, positions);
        let (bkey, skey) = (self.base_key(id), self.bases_key());
        self.cluster.with_conn(|c| {
            let mut p = ClusterPipeline::new();
            p.cmd("SET").arg(&bkey).arg(blob).ignore();
            p.cmd("SADD").arg(&skey).arg(id.0).ignore();
            Ok(p.query::<()>(c)?)
        })?;
        let cap = MAX_REFS_PER_CHUNK * 8;
        for (seg, part) in fps.chunks(INSERT_PAGES).enumerate() {
            // Per entry, this segment's refs in page order: what the in-memory index pushes
            // one by one (a page's repeated chunk adds nothing; at most the cap is kept).
            let mut order: Vec<(Kind, u64)> = Vec::new();
            let mut refs: HashMap<(Kind, u64), Vec<u8>> = HashMap::new();
            let mut add = |kind: Kind, h: u64, r: [u8; 8]| {
                let v = refs.entry((kind, h)).or_insert_with(|| {
                    order.push((kind, h));
                    Vec::new()
                });
                if v.len() < cap && !v.ends_with(&r) {
                    v.extend_from_slice(&r);
                }
            };
            for (j, fp) in part.iter().enumerate() {
                if fp.zero {
                    continue;
                }
                let i = seg * INSERT_PAGES + j;
                let r = pack(PageRef {
                    base: id,
                    page: i as u32,
                });
                add(Kind::Exact, fp.page_hash, r);
                if let Some(&pos) = positions.get(i).filter(|&&p| p != 0) {
                    add(Kind::Position, pos, r);
                }
                for &c in fp.chunks() {
                    add(Kind::Chunk, c, r);
                }
            }
            let current = self.fetch(&order)?;
            let mut updates = Vec::new();
            for k in order {
                let new = refs.remove(&k).unwrap_or_default();
                let old = current.get(&k);
                let v = if k.0 == Kind::Exact {
                    // A whole-page hash keeps its first ref.
                    if old.is_some() {
                        continue;
                    }
                    new[..8.min(new.len())].to_vec()
                } else {
                    let mut v = old.cloned().unwrap_or_default();
                    let n = v.len();
                    for r in new.chunks_exact(8) {
                        if v.len() >= cap {
                            break;
                        }
                        if !v.chunks_exact(8).any(|x| x == r) {
                            v.extend_from_slice(r);
                        }
                    }
                    if v.len() == n {
                        continue;
                    }
                    v
                };
                updates.push((k, Some(v)));
            }
            self.store(updates)?;
        }
        Ok(())
    }

    fn lookup(
        &self,
        pages: &[PageKeys<'_>],
        out: &mut Vec<Candidates>,
    ) -> Result<(), CommandError> {
        out.resize_with(pages.len(), Candidates::default);
        for c in out.iter_mut() {
            c.clear();
        }
        if pages.is_empty() {
            return Ok(());
        }
        // Distinct (kind, hash) → answer slot; per bucket and kind, the fields asked.
        let mut slot: HashMap<(Kind, u64), usize> = HashMap::with_capacity(pages.len() * 18);
        let mut groups: HashMap<u32, Vec<(Kind, u64)>> = HashMap::new();
        let mut ask = |kind: Kind, h: u64| {
            let n = slot.len();
            slot.entry((kind, h)).or_insert_with(|| {
                groups.entry(self.bucket(h)).or_default().push((kind, h));
                n
            });
        };
        for k in pages {
            ask(Kind::Exact, k.page_hash);
            for &c in k.chunks {
                ask(Kind::Chunk, c);
            }
            if k.position != 0 {
                ask(Kind::Position, k.position);
            }
        }
        let groups: Vec<(u32, Vec<(Kind, u64)>)> = groups.into_iter().collect();
        let mut p = ClusterPipeline::with_capacity(groups.len());
        for (b, fields) in &groups {
            let cmd = p.cmd("HMGET").arg(self.key(*b));
            for (kind, h) in fields {
                cmd.arg(&kind.field(*h)[..]);
            }
        }
        let answers: Vec<Value> = self.cluster.with_conn(|c| Ok(p.query(c)?))?;
        let mut values: Vec<Option<Vec<u8>>> = vec![None; slot.len()];
        for ((b, fields), a) in groups.iter().zip(answers) {
            let malformed = || CommandError::Malformed { key: self.key(*b) };
            let Value::Array(items) = a else {
                return Err(malformed());
            };
            if items.len() != fields.len() {
                return Err(malformed());
            }
            for (f, v) in fields.iter().zip(items) {
                let v = match v {
                    Value::Nil => continue,
                    Value::BulkString(v) if !v.is_empty() && v.len() % 8 == 0 => v,
                    _ => return Err(malformed()),
                };
                if let Some(&s) = slot.get(f) {
                    values[s] = Some(v);
                }
            }
        }
        let refs = |kind: Kind, h: u64| {
            slot.get(&(kind, h))
                .and_then(|&s| values[s].as_deref())
                .into_iter()
                .flat_map(|v| v.chunks_exact(8).map(unpack))
        };
        for (k, o) in pages.iter().zip(out.iter_mut()) {
            if let Some(r) = refs(Kind::Exact, k.page_hash).next() {
                o.exact = Some(r);
                continue;
            }
            for &c in k.chunks {
                for r in refs(Kind::Chunk, c) {
                    o.count(r);
                }
            }
            if k.position != 0 {
                o.positional.extend(refs(Kind::Position, k.position));
            }
        }
        Ok(())
    }
}

impl RegistryBackend for RedisRegistry {
    fn insert_base(
        &self,
        id: BaseId,
        fps: &[PageFingerprint],
        positions: &[u64],
    ) -> Result<(), BackendError> {
        Ok(self.insert(id, fps, positions)?)
    }

    fn remove_base(&self, id: BaseId) -> Result<(), BackendError> {
        Ok(self.remove(id)?)
    }

    fn lookup_batch(
        &self,
        pages: &[PageKeys<'_>],
        out: &mut Vec<Candidates>,
    ) -> Result<(), BackendError> {
        Ok(self.lookup(pages, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_pack_and_blobs_round_trip() {
        let r = PageRef {
            base: BaseId(7),
            page: 123_456,
        };
        assert_eq!(unpack(&pack(r)), r);
        let cfg = medes_dedup::FingerprintConfig {
            k: 16,
            mask_bits: 6,
        };
        let mut page = [0u8; medes_dedup::PAGE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let fps = vec![
            medes_dedup::fingerprint(&page, &cfg),
            medes_dedup::fingerprint(&[0; medes_dedup::PAGE], &cfg),
        ];
        let blob = encode_blob(&fps, &[9, 0]);
        let e = decode_blob(&blob).expect("decodes");
        assert_eq!(e[0], (Kind::Exact, fps[0].page_hash));
        assert_eq!(e[1], (Kind::Position, 9));
        assert_eq!(e.len(), 2 + fps[0].chunks().len());
        assert!(decode_blob(&blob[..blob.len() - 1]).is_none());
    }

    #[test]
    fn prefixes_cannot_break_hash_tags() {
        assert_eq!(escape("a{b}%"), "a%7Bb%7D%25");
    }
}
