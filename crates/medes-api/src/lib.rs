//! The OpenWhisk-compatible REST edge of medes.
//!
//! Serves OpenWhisk's `/api/v1` so that existing clients (`wsk`, the `openwhisk` npm and Python
//! clients, curl scripts) work unchanged: actions (create, update with `?overwrite=true`, get,
//! list, delete), invocations (blocking or not, `?result=true`), activations (list with
//! `limit`/`skip`/`name`/`since`/`upto`/`docs`, get, `/result`, `/logs`), namespaces, plus
//! `GET /metrics` (Prometheus) and `GET /health`. Requests authenticate with HTTP basic auth in
//! OpenWhisk's `uuid:key` form, checked against the keys in the store.
//!
//! **Medes extensions** (not OpenWhisk; authenticated like the rest, for benchmarks and
//! `medes suite run --state dedup`): `POST /api/v1/namespaces/{ns}/actions/{name}/medes/idle`
//! and `POST /api/v1/namespaces/{ns}/medes/idle` (every action of the namespace) run the
//! idle-sandbox decision now for every idle warm sandbox, as if its idle period had passed
//! ([`medes_core::Invoker::force_decisions`]), wait until the checkpoints decided are done
//! (bounded by [`ApiConfig::blocking_timeout_ms`]) and answer
//! `{"decided": n, "settled": true, "sandboxes": [{"id", "action", "state"}]}`.
//! The operator's policy knob ([`medes_policy::PolicySettings`]):
//! `GET`/`PUT /api/v1/namespaces/{ns}/medes/policy` reads the settings / changes the global
//! ones (body: [`medes_policy::PolicyUpdate`], present fields replace, e.g.
//! `{"policy": "medes", "mode": "latency", "alpha": 1.5}`), and
//! `GET`/`PUT`/`DELETE /api/v1/namespaces/{ns}/actions/{name}/medes/policy` reads / replaces
//! (body: [`medes_policy::FunctionKnob`]) / removes one action's overrides. The knob is
//! platform-wide (any authenticated key may change it; per-action overrides are keyed by the
//! action's name in every namespace); bad values answer 400 and change nothing.
//!
//! ```no_run
//! # async fn run(state: medes_api::ApiState) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind(state.config.listen).await?;
//! medes_api::serve(listener, state, async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```
//!
//! # Design
//! - This crate alone knows the OpenWhisk JSON wire format (module `wire`); it maps it to and
//!   from the `medes_core` domain types, calls the scheduler through [`medes_core::Invoker`] and
//!   persists actions and activations in [`medes_store::Store`].
//! - The invoke path is kept lean: API keys and actions are cached in memory (the API is the only
//!   writer of actions, so it keeps its cache exact), and activation records are handed to the
//!   store's background writer instead of being committed on the response path.
//! - Every invocation runs in its own task, so a blocking caller that times out (after
//!   [`ApiConfig::blocking_timeout_ms`]) gets `202 {"activationId"}` while the action runs on
//!   and its record is stored when it finishes, as in OpenWhisk.
//! - Every error is OpenWhisk's `{"error": message, "code": request id}`; axum's own rejections
//!   (405, bad paths) are rewritten into that form by one response layer.
//!
//! # Limits (documented, configurable)
//! Invocation bodies (parameters) and action results are limited to
//! [`ApiConfig::max_payload_bytes`] (default 1 MiB, OpenWhisk's limit): a larger request gets
//! 413, a larger result becomes an error activation. Action code is limited to
//! [`ApiConfig::max_code_bytes`] (default 48 MiB, OpenWhisk's). Action limits are checked
//! against OpenWhisk's ranges: memory 128–2048 MB, timeout 100–300000 ms, concurrency 1–500,
//! logs 0–10 MB.
//!
//! # What this crate does not do
//! No packages, triggers, rules, sequences or web actions: a `package/name` action name is
//! accepted as a plain name. Only Python kinds exist; every accepted kind is stored as
//! `python:3`. One namespace per key; no key management endpoints (keys come from the store).
//! It does not install a metrics recorder or a tracing subscriber (the binary does).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod auth;
mod error;
mod routes;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use medes_core::{Action, ActionName, Invoker};
use medes_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio_util::task::TaskTracker;

/// Settings of the REST edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on. Default `127.0.0.1:3233` (OpenWhisk standalone's port).
    pub listen: SocketAddr,
    /// Largest invocation body (parameters) and action result, bytes. Default 1 MiB
    /// (1,048,576), OpenWhisk's limit.
    pub max_payload_bytes: usize,
    /// Largest action code (`exec.code` as sent, i.e. base64 for zips), bytes. Default 48 MiB,
    /// OpenWhisk's limit.
    pub max_code_bytes: usize,
    /// How long a blocking invocation waits before answering `202 {"activationId"}`, ms.
    /// Default 60,000.
    pub blocking_timeout_ms: u64,
    /// Accepted `exec.kind` values; all are stored as `python:3`.
    pub allow_kinds: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3233)),
            max_payload_bytes: 1024 * 1024,
            max_code_bytes: 48 * 1024 * 1024,
            blocking_timeout_ms: 60_000,
            allow_kinds: [
                "python:3",
                "python:default",
                "python",
                "python:3.13",
                "python:3.12",
                "python:3.11",
                "python:3.10",
                "python:3.9",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// What the API needs: the store, the scheduler, the metrics handle and its settings.
#[derive(Clone)]
pub struct ApiState {
    /// Actions, activations and keys.
    pub store: Arc<Store>,
    /// The scheduler.
    pub invoker: Arc<dyn Invoker>,
    /// Renders `GET /metrics`; `None` serves an empty page.
    pub metrics: Option<PrometheusHandle>,
    /// Settings.
    pub config: ApiConfig,
    /// The policy knob (`/medes/policy` endpoints); `None` answers them with 501.
    pub policy: Option<Arc<dyn medes_policy::PolicyControl>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// State shared by the handlers of one router.
pub(crate) struct Shared {
    pub state: ApiState,
    /// API keys by uuid (filled on first use; keys are never removed through the API).
    pub keys: RwLock<HashMap<String, Arc<auth::CachedKey>>>,
    /// Actions by name; exact because every action write goes through this router.
    pub actions: RwLock<HashMap<ActionName, Arc<Action>>>,
    /// Serialises action writes with cache fills so a stale action never enters the cache.
    pub action_writes: tokio::sync::Mutex<()>,
    /// Invocations running in the background.
    pub tasks: TaskTracker,
    /// Serialises read-modify-write changes of the policy knob.
    pub policy_writes: parking_lot::Mutex<()>,
}

impl Shared {
    fn new(state: ApiState) -> Arc<Shared> {
        Arc::new(Shared {
            state,
            keys: RwLock::new(HashMap::new()),
            actions: RwLock::new(HashMap::new()),
            action_writes: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
            policy_writes: parking_lot::Mutex::new(()),
        })
    }
}

/// The API's routes. Build one router per store: it caches actions that it writes itself.
pub fn router(state: ApiState) -> axum::Router {
    routes::build(Shared::new(state))
}

/// Serves the API on `listener` until `shutdown` completes, then stops accepting, lets running
/// requests finish, waits (up to 10 s) for background invocations and flushes the store's
/// activation writer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = Shared::new(state);
    let app = routes::build(shared.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    shared.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = shared.tasks.len(),
            "shutting down with invocations running"
        );
    }
    let store = shared.state.store.clone();
    match tokio::task::spawn_blocking(move || store.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "flushing activations at shutdown"),
        Err(e) => tracing::warn!(error = %e, "flushing activations at shutdown"),
    }
    Ok(())
}
