//! The embedded store: actions, activations and API keys in one redb file.
//!
//! The platform keeps everything it must remember across a restart in a single ACID database
//! file in the data directory: deployed actions, the activation records of past invocations
//! (bounded retention) and the API keys (`uuid:key`) with their namespace.
//!
//! ```no_run
//! let store = medes_store::Store::open("/var/lib/medes/medes.redb")?;
//! let key = store.ensure_default_key()?;
//! println!("auth: {}", key.auth_string());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Design
//! - Values are the `medes_core` domain types encoded as JSON (activation results are arbitrary
//!   JSON, so a self-describing format is needed); the OpenWhisk wire format is not stored.
//! - Keys are laid out for the listing orders: activations by `(namespace, start desc, id)`,
//!   a secondary index by `(namespace, name, start desc, id)` for the `name` filter, one by
//!   `(start, id)` for retention (oldest first) and one by id for point lookups.
//! - Activation writes go through a background writer thread fed by a bounded channel: it
//!   commits whatever has queued up in one transaction with [`redb::Durability::Immediate`], so a
//!   burst of N activations costs one fsync rather than N, and the invoke path never waits for the
//!   disk. Until its batch is committed an activation is kept in an in-memory pending map, so
//!   [`Store::get_activation`] reads its own writes; listings see it once committed
//!   ([`Store::flush`] waits for that). Actions and keys are written synchronously (rare, and the
//!   caller must know they are durable).
//! - Retention: at most [`StoreConfig::max_activations`] records; each writer batch deletes the
//!   oldest beyond the cap.
//!
//! # What this crate does not do
//! It does not validate names, kinds or limits (the API does) and knows nothing about HTTP or
//! the OpenWhisk JSON format. Namespaces and names must not contain NUL bytes (the API's name
//! rules exclude them).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod keys;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use medes_core::{Action, ActionName, Activation, ActivationId, Namespace, UnixMillis};
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

use keys::ActKey;

const ACTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("actions");
const ACTIVATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("activations");
const ACT_BY_ID: TableDefinition<&str, &[u8]> = TableDefinition::new("activations_by_id");
const ACT_BY_NAME: TableDefinition<&[u8], ()> = TableDefinition::new("activations_by_name");
const ACT_BY_TIME: TableDefinition<&[u8], &[u8]> = TableDefinition::new("activations_by_time");
const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

const META_DEFAULT_KEY: &str = "default_key_uuid";

/// The user part of OpenWhisk's well-known public guest key, which [`Store::add_key`] refuses:
/// everyone knows its secret.
pub const OPENWHISK_GUEST_UUID: &str = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502";

/// Default number of activations listed when the caller gives no limit (OpenWhisk's).
pub const DEFAULT_LIST_LIMIT: usize = 30;
/// Largest `limit` OpenWhisk accepts for listings.
pub const MAX_LIST_LIMIT: usize = 200;

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most activation records kept; the oldest beyond this are deleted. Default 1,000,000.
    pub max_activations: u64,
    /// Capacity of the queue in front of the activation writer thread. Default 16,384.
    pub writer_queue: usize,
    /// Most activations committed in one writer transaction. Default 1,024.
    pub writer_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_activations: 1_000_000,
            writer_queue: 16_384,
            writer_batch: 1_024,
        }
    }
}

/// An API key: the `uuid:key` pair of OpenWhisk's basic auth and whom it identifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// The user part of basic auth (a UUID).
    pub uuid: String,
    /// The secret (password part of basic auth).
    pub key: String,
    /// The namespace the key acts in.
    pub namespace: Namespace,
    /// The subject (user name) recorded on activations.
    pub subject: String,
    /// An operator's key: it may change platform-wide settings (the policy knob). The
    /// platform's default key is one; tenants' keys are not. Absent in records written before
    /// the field existed, which read as `false`.
    #[serde(default)]
    pub admin: bool,
}

impl ApiKey {
    /// A fresh random key in `namespace` (UUID v4 user, 64 alphanumeric characters of secret).
    pub fn generate(namespace: Namespace, subject: impl Into<String>) -> Self {
        use rand::Rng;
        use rand::distr::Alphanumeric;
        let key: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(64)
            .map(char::from)
            .collect();
        ApiKey {
            uuid: uuid::Uuid::new_v4().to_string(),
            key,
            namespace,
            subject: subject.into(),
            admin: false,
        }
    }

    /// `uuid:key`, the form OpenWhisk clients take (`wsk --auth`, `__OW_API_KEY`).
    pub fn auth_string(&self) -> String {
        format!("{}:{}", self.uuid, self.key)
    }
}

/// Filter of an activation listing. Results are newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationQuery {
    /// Namespace to list.
    pub namespace: Namespace,
    /// Only activations of this action name (e.g. `hello` or `pkg/hello`).
    pub name: Option<String>,
    /// Only activations that started at or after this time.
    pub since: Option<UnixMillis>,
    /// Only activations that started at or before this time.
    pub upto: Option<UnixMillis>,
    /// Number of records to skip (newest first).
    pub skip: usize,
    /// Most records to return (the API enforces OpenWhisk's 200 maximum).
    pub limit: usize,
}

impl ActivationQuery {
    /// The newest [`DEFAULT_LIST_LIMIT`] activations of a namespace.
    pub fn namespace(namespace: Namespace) -> Self {
        ActivationQuery {
            namespace,
            name: None,
            since: None,
            upto: None,
            skip: 0,
            limit: DEFAULT_LIST_LIMIT,
        }
    }
}

/// Failure to open the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory could not be created.
    #[error("creating directory {path:?}")]
    CreateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// redb could not open or initialise the file.
    #[error("opening database {path:?}")]
    Database {
        /// Database file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// The writer thread could not be started.
    #[error("starting the activation writer thread")]
    Thread(#[source] std::io::Error),
}

/// Failure to read (get, list, lookup).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The database failed.
    #[error("reading the database")]
    Database(#[source] Box<redb::Error>),
    /// A stored record could not be decoded.
    #[error("decoding stored {what} {key:?}")]
    Decode {
        /// Kind of record.
        what: &'static str,
        /// Its key.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Failure to store an action.
#[derive(Debug, thiserror::Error)]
pub enum PutActionError {
    /// The action exists and `overwrite` was false.
    #[error("action {0} already exists")]
    Exists(ActionName),
    /// The database failed.
    #[error("writing the database")]
    Database(#[source] Box<redb::Error>),
    /// The existing record could not be decoded.
    #[error("decoding the stored action {0}")]
    Decode(ActionName, #[source] serde_json::Error),
}

/// Failure to write (delete, keys, activations).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The database failed.
    #[error("writing the database")]
    Database(#[source] Box<redb::Error>),
    /// A record could not be decoded.
    #[error("decoding stored {what} {key:?}")]
    Decode {
        /// Kind of record.
        what: &'static str,
        /// Its key.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The activation writer thread has stopped (the store is shutting down).
    #[error("the activation writer has stopped")]
    WriterStopped,
    /// The key is OpenWhisk's well-known public guest key.
    #[error("refusing OpenWhisk's well-known public guest key (its secret is published)")]
    WellKnownKey,
}

impl From<redb::Error> for ReadError {
    fn from(e: redb::Error) -> Self {
        ReadError::Database(Box::new(e))
    }
}
impl From<redb::Error> for WriteError {
    fn from(e: redb::Error) -> Self {
        WriteError::Database(Box::new(e))
    }
}
impl From<redb::Error> for PutActionError {
    fn from(e: redb::Error) -> Self {
        PutActionError::Database(Box::new(e))
    }
}

/// Converts any redb error type into [`redb::Error`] (for `?`).
trait Db<T> {
    fn db(self) -> Result<T, redb::Error>;
}
impl<T, E: Into<redb::Error>> Db<T> for Result<T, E> {
    fn db(self) -> Result<T, redb::Error> {
        self.map_err(Into::into)
    }
}

enum WriterMsg {
    Record(Arc<Activation>),
    Flush(Sender<()>),
}

struct Inner {
    db: Database,
    config: StoreConfig,
    /// Activations queued for the writer and not yet committed, by id.
    pending: Mutex<HashMap<String, Arc<Activation>>>,
}

/// The embedded store. Cheap to share behind an `Arc`; all methods take `&self`.
///
/// Dropping it stops the writer thread after it has committed everything queued.
pub struct Store {
    inner: Arc<Inner>,
    tx: Option<Sender<WriterMsg>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` with the default [`StoreConfig`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        Self::open_with(path, StoreConfig::default())
    }

    /// Opens (or creates) the store at `path`.
    pub fn open_with(path: impl AsRef<Path>, config: StoreConfig) -> Result<Store, OpenError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_err = |e: redb::Error| OpenError::Database {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let db = Database::create(path).db().map_err(open_err)?;
        // Create every table up front so read transactions never see a missing table.
        let init = || -> Result<(), redb::Error> {
            let tx = db.begin_write().db()?;
            tx.open_table(ACTIONS).db()?;
            tx.open_table(ACTIVATIONS).db()?;
            tx.open_table(ACT_BY_ID).db()?;
            tx.open_table(ACT_BY_NAME).db()?;
            tx.open_table(ACT_BY_TIME).db()?;
            tx.open_table(API_KEYS).db()?;
            tx.open_table(META).db()?;
            tx.commit().db()
        };
        init().map_err(open_err)?;
        let inner = Arc::new(Inner {
            db,
            config,
            pending: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = crossbeam_channel::bounded(config.writer_queue.max(1));
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("medes-store-writer".into())
            .spawn(move || writer_loop(&writer_inner, &rx))
            .map_err(OpenError::Thread)?;
        Ok(Store {
            inner,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> StoreConfig {
        self.inner.config
    }

    // ----------------------------------------------------------------------------- actions

    /// Stores `action`. If it exists and `overwrite` is false, fails with
    /// [`PutActionError::Exists`]; if it exists and `overwrite` is true, replaces it and sets its
    /// version to the stored one with the patch number bumped (`0.0.1` → `0.0.2`). A new action
    /// gets version `0.0.1`. Returns the stored action.
    pub fn put_action(
        &self,
        mut action: Action,
        overwrite: bool,
    ) -> Result<Action, PutActionError> {
        let key = action_key(&action.name);
        let tx = self.inner.db.begin_write().db()?;
        {
            let mut table = tx.open_table(ACTIONS).db()?;
            let previous = match table.get(key.as_str()).db()? {
                Some(old) => Some(
                    serde_json::from_slice::<Action>(old.value())
                        .map_err(|e| PutActionError::Decode(action.name.clone(), e))?,
                ),
                None => None,
            };
            action.version = match previous {
                Some(_) if !overwrite => return Err(PutActionError::Exists(action.name)),
                Some(old) => bump_patch(&old.version),
                None => "0.0.1".to_owned(),
            };
            let bytes = serde_json::to_vec(&action).expect("actions always encode as JSON");
            table.insert(key.as_str(), bytes.as_slice()).db()?;
        }
        tx.commit().db()?;
        Ok(action)
    }

    /// The action, if it exists.
    pub fn get_action(&self, name: &ActionName) -> Result<Option<Action>, ReadError> {
        let key = action_key(name);
        let tx = self.inner.db.begin_read().db()?;
        let table = tx.open_table(ACTIONS).db()?;
        match table.get(key.as_str()).db()? {
            Some(v) => decode(v.value(), "action", &key).map(Some),
            None => Ok(None),
        }
    }

    /// Actions of a namespace, most recently updated first (OpenWhisk's order).
    pub fn list_actions(
        &self,
        namespace: &Namespace,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<Action>, ReadError> {
        let (lo, hi) = (
            format!("{}\0", namespace.0),
            format!("{}\u{1}", namespace.0),
        );
        let tx = self.inner.db.begin_read().db()?;
        let table = tx.open_table(ACTIONS).db()?;
        let mut all = Vec::new();
        for entry in table.range(lo.as_str()..hi.as_str()).db()? {
            let (k, v) = entry.db()?;
            all.push(decode::<Action>(v.value(), "action", k.value())?);
        }
        all.sort_by(|a, b| b.updated.cmp(&a.updated).then_with(|| a.name.cmp(&b.name)));
        Ok(all.into_iter().skip(skip).take(limit).collect())
    }

    /// Deletes an action; returns it if it existed.
    pub fn delete_action(&self, name: &ActionName) -> Result<Option<Action>, WriteError> {
        let key = action_key(name);
        let tx = self.inner.db.begin_write().db()?;
        let removed = {
            let mut table = tx.open_table(ACTIONS).db()?;
            table.remove(key.as_str()).db()?.map(|v| v.value().to_vec())
        };
        tx.commit().db()?;
        removed
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|source| WriteError::Decode {
                    what: "action",
                    key,
                    source,
                })
            })
            .transpose()
    }

    // ------------------------------------------------------------------------- activations

    /// Queues an activation for the writer thread; blocks while the queue is full
    /// (backpressure). It is readable by [`Store::get_activation`] at once and listed once its
    /// batch is committed.
    pub fn record_activation(
        &self,
        activation: impl Into<Arc<Activation>>,
    ) -> Result<(), WriteError> {
        let tx = self.tx.as_ref().ok_or(WriteError::WriterStopped)?;
        let a = self.add_pending(activation.into());
        tx.send(WriterMsg::Record(a.clone())).map_err(|_| {
            self.inner.pending.lock().remove(&a.id.0);
            WriteError::WriterStopped
        })
    }

    /// Like [`Store::record_activation`] but never blocks: if the queue is full the activation
    /// is handed back in `Err(Ok(activation))` (call [`Store::record_activation`] from a
    /// blocking context); `Err(Err(_))` if the writer has stopped.
    pub fn try_record_activation(
        &self,
        activation: impl Into<Arc<Activation>>,
    ) -> Result<(), Result<Arc<Activation>, WriteError>> {
        let tx = self.tx.as_ref().ok_or(Err(WriteError::WriterStopped))?;
        let a = self.add_pending(activation.into());
        match tx.try_send(WriterMsg::Record(a)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(WriterMsg::Record(a))) => {
                self.inner.pending.lock().remove(&a.id.0);
                Err(Ok(a))
            }
            Err(TrySendError::Disconnected(WriterMsg::Record(a))) => {
                self.inner.pending.lock().remove(&a.id.0);
                Err(Err(WriteError::WriterStopped))
            }
            Err(_) => Err(Err(WriteError::WriterStopped)),
        }
    }

    fn add_pending(&self, a: Arc<Activation>) -> Arc<Activation> {
        self.inner.pending.lock().insert(a.id.0.clone(), a.clone());
        a
    }

    /// Waits until every activation queued before this call is committed.
    pub fn flush(&self) -> Result<(), WriteError> {
        let tx = self.tx.as_ref().ok_or(WriteError::WriterStopped)?;
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        tx.send(WriterMsg::Flush(done_tx))
            .map_err(|_| WriteError::WriterStopped)?;
        done_rx.recv().map_err(|_| WriteError::WriterStopped)
    }

    /// Stores activations synchronously in one transaction (the writer thread's path; also
    /// useful for imports and tests). Applies retention.
    pub fn put_activations(&self, batch: &[impl Borrow<Activation>]) -> Result<(), WriteError> {
        put_activation_batch(&self.inner, batch)
    }

    /// The activation with this id, if it is stored (or queued for storing).
    pub fn get_activation(&self, id: &ActivationId) -> Result<Option<Activation>, ReadError> {
        if let Some(a) = self.inner.pending.lock().get(&id.0) {
            return Ok(Some((**a).clone()));
        }
        let tx = self.inner.db.begin_read().db()?;
        let by_id = tx.open_table(ACT_BY_ID).db()?;
        let Some(primary) = by_id.get(id.0.as_str()).db()? else {
            return Ok(None);
        };
        let table = tx.open_table(ACTIVATIONS).db()?;
        match table.get(primary.value()).db()? {
            Some(v) => decode(v.value(), "activation", &id.0).map(Some),
            None => Ok(None),
        }
    }

    /// Activations matching `query`, newest first.
    pub fn list_activations(&self, query: &ActivationQuery) -> Result<Vec<Activation>, ReadError> {
        let ns = query.namespace.0.as_str();
        let upto = query.upto.unwrap_or(u64::MAX);
        let since = query.since.unwrap_or(0);
        let mut out = Vec::new();
        if since > upto || query.limit == 0 {
            return Ok(out);
        }
        let tx = self.inner.db.begin_read().db()?;
        let table = tx.open_table(ACTIVATIONS).db()?;
        match &query.name {
            None => {
                let (lo, hi) = keys::time_range(&keys::ns_prefix(ns), since, upto);
                for entry in table
                    .range(lo.as_slice()..hi.as_slice())
                    .db()?
                    .skip(query.skip)
                {
                    if out.len() >= query.limit {
                        break;
                    }
                    let (k, v) = entry.db()?;
                    out.push(decode(
                        v.value(),
                        "activation",
                        &String::from_utf8_lossy(k.value()),
                    )?);
                }
            }
            Some(name) => {
                let index = tx.open_table(ACT_BY_NAME).db()?;
                let prefix = keys::name_prefix(ns, name);
                let (lo, hi) = keys::time_range(&prefix, since, upto);
                for entry in index
                    .range(lo.as_slice()..hi.as_slice())
                    .db()?
                    .skip(query.skip)
                {
                    if out.len() >= query.limit {
                        break;
                    }
                    let (k, _) = entry.db()?;
                    let primary = keys::primary_from_name_key(ns, &k.value()[prefix.len()..]);
                    if let Some(v) = table.get(primary.as_slice()).db()? {
                        out.push(decode(
                            v.value(),
                            "activation",
                            &String::from_utf8_lossy(&primary),
                        )?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Number of stored (committed) activations.
    pub fn activation_count(&self) -> Result<u64, ReadError> {
        let tx = self.inner.db.begin_read().db()?;
        Ok(tx.open_table(ACT_BY_ID).db()?.len().db()?)
    }

    // -------------------------------------------------------------------------------- keys

    /// Adds (or replaces) an API key. OpenWhisk's well-known guest key is refused.
    pub fn add_key(&self, key: &ApiKey) -> Result<(), WriteError> {
        if key.uuid.eq_ignore_ascii_case(OPENWHISK_GUEST_UUID) {
            return Err(WriteError::WellKnownKey);
        }
        let tx = self.inner.db.begin_write().db()?;
        {
            let mut table = tx.open_table(API_KEYS).db()?;
            let bytes = serde_json::to_vec(key).expect("keys always encode as JSON");
            table.insert(key.uuid.as_str(), bytes.as_slice()).db()?;
        }
        tx.commit().db()?;
        Ok(())
    }

    /// The key with this uuid, if any. The caller compares the secret (in constant time).
    pub fn lookup_key(&self, uuid: &str) -> Result<Option<ApiKey>, ReadError> {
        let tx = self.inner.db.begin_read().db()?;
        let table = tx.open_table(API_KEYS).db()?;
        match table.get(uuid).db()? {
            Some(v) => decode(v.value(), "api key", uuid).map(Some),
            None => Ok(None),
        }
    }

    /// All keys.
    pub fn list_keys(&self) -> Result<Vec<ApiKey>, ReadError> {
        let tx = self.inner.db.begin_read().db()?;
        let table = tx.open_table(API_KEYS).db()?;
        let mut out = Vec::new();
        for entry in table.iter().db()? {
            let (k, v) = entry.db()?;
            out.push(decode(v.value(), "api key", k.value())?);
        }
        Ok(out)
    }

    /// The platform's default key: generated at random (namespace and subject `guest`) the
    /// first time and persisted; the same key on every later call and after restarts. Never
    /// OpenWhisk's well-known public guest key. It is the operator's key (`admin`).
    pub fn ensure_default_key(&self) -> Result<ApiKey, WriteError> {
        let tx = self.inner.db.begin_write().db()?;
        let key = {
            let mut meta = tx.open_table(META).db()?;
            let mut keys = tx.open_table(API_KEYS).db()?;
            let existing = match meta.get(META_DEFAULT_KEY).db()? {
                Some(uuid) => keys.get(uuid.value()).db()?.map(|v| v.value().to_vec()),
                None => None,
            };
            match existing {
                Some(bytes) => {
                    let mut key: ApiKey =
                        serde_json::from_slice(&bytes).map_err(|source| WriteError::Decode {
                            what: "api key",
                            key: META_DEFAULT_KEY.into(),
                            source,
                        })?;
                    if !key.admin {
                        // A store written before keys had roles: the default key is the
                        // operator's.
                        key.admin = true;
                        let bytes = serde_json::to_vec(&key).expect("keys always encode as JSON");
                        keys.insert(key.uuid.as_str(), bytes.as_slice()).db()?;
                    }
                    key
                }
                None => {
                    let mut key = ApiKey::generate(Namespace("guest".into()), "guest");
                    key.admin = true;
                    let bytes = serde_json::to_vec(&key).expect("keys always encode as JSON");
                    keys.insert(key.uuid.as_str(), bytes.as_slice()).db()?;
                    meta.insert(META_DEFAULT_KEY, key.uuid.as_str()).db()?;
                    key
                }
            }
        };
        tx.commit().db()?;
        Ok(key)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn action_key(name: &ActionName) -> String {
    format!("{}\0{}", name.namespace.0, name.name)
}

fn bump_patch(version: &str) -> String {
    let mut parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    parts.resize(3, 0);
    parts[2] += 1;
    format!("{}.{}.{}", parts[0], parts[1], parts[2])
}

fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    key: &str,
) -> Result<T, ReadError> {
    serde_json::from_slice(bytes).map_err(|source| ReadError::Decode {
        what,
        key: key.to_owned(),
        source,
    })
}

fn writer_loop(inner: &Inner, rx: &Receiver<WriterMsg>) {
    let max_batch = inner.config.writer_batch.max(1);
    let mut batch: Vec<Arc<Activation>> = Vec::with_capacity(max_batch);
    let mut flushes: Vec<Sender<()>> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriterMsg::Record(a) => batch.push(a),
                WriterMsg::Flush(done) => flushes.push(done),
            }
            if batch.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = put_activation_batch(inner, &batch) {
                tracing::error!(error = %e, n = batch.len(), "dropping activation records");
            }
            let mut pending = inner.pending.lock();
            for a in batch.drain(..) {
                pending.remove(&a.id.0);
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

fn put_activation_batch(
    inner: &Inner,
    batch: &[impl Borrow<Activation>],
) -> Result<(), WriteError> {
    let mut tx = inner.db.begin_write().db()?;
    tx.set_durability(Durability::Immediate).db()?;
    {
        let mut acts = tx.open_table(ACTIVATIONS).db()?;
        let mut by_id = tx.open_table(ACT_BY_ID).db()?;
        let mut by_name = tx.open_table(ACT_BY_NAME).db()?;
        let mut by_time = tx.open_table(ACT_BY_TIME).db()?;
        for a in batch {
            let a: &Activation = a.borrow();
            let k = ActKey {
                namespace: &a.action.namespace.0,
                name: &a.action.name,
                start: a.start,
                id: &a.id.0,
            };
            let primary = k.primary();
            // An id stored again replaces its old record (and index entries).
            if let Some(old_primary) = by_id.insert(a.id.0.as_str(), primary.as_slice()).db()? {
                let old_primary = old_primary.value().to_vec();
                if let Some(old) = acts.remove(old_primary.as_slice()).db()? {
                    let old: Activation =
                        serde_json::from_slice(old.value()).map_err(|source| {
                            WriteError::Decode {
                                what: "activation",
                                key: a.id.0.clone(),
                                source,
                            }
                        })?;
                    let ok = ActKey {
                        namespace: &old.action.namespace.0,
                        name: &old.action.name,
                        start: old.start,
                        id: &old.id.0,
                    };
                    by_name.remove(ok.by_name().as_slice()).db()?;
                    by_time.remove(ok.by_time().as_slice()).db()?;
                }
            }
            let bytes = serde_json::to_vec(a).expect("activations always encode as JSON");
            acts.insert(primary.as_slice(), bytes.as_slice()).db()?;
            by_name.insert(k.by_name().as_slice(), ()).db()?;
            by_time
                .insert(k.by_time().as_slice(), k.time_value().as_slice())
                .db()?;
        }
        // Retention: drop the oldest beyond the cap.
        let n = by_id.len().db()?;
        let excess = n.saturating_sub(inner.config.max_activations);
        for _ in 0..excess {
            let Some((tk, tv)) = by_time.pop_first().db()? else {
                break;
            };
            let (tk, tv) = (tk.value().to_vec(), tv.value().to_vec());
            let Some(old) = keys::OwnedActKey::from_time_entry(&tk, &tv) else {
                continue;
            };
            let ok = old.as_ref();
            acts.remove(ok.primary().as_slice()).db()?;
            by_name.remove(ok.by_name().as_slice()).db()?;
            by_id.remove(ok.id).db()?;
        }
    }
    tx.commit().db()?;
    Ok(())
}
