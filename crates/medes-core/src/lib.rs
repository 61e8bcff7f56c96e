//! Domain types shared by every medes crate.
//!
//! This crate is the vocabulary of the platform: identifiers and units as newtypes, the action
//! and activation models, and [`Invoker`], the one seam between the REST edge (`medes-api`) and
//! the scheduler (`medes-controller`).
//!
//! # Design
//! These are *domain* types. They derive serde so the embedded store can persist them, but the
//! OpenWhisk wire format lives only in `medes-api`, which maps to and from these types; changing a
//! field here never silently changes the REST contract.
//!
//! # What this crate does not do
//! No I/O, no async runtime, no clock: times are passed in as [`UnixMillis`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (OpenWhisk's `start`/`end` unit).
pub type UnixMillis = u64;

/// A byte count.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Bytes(pub u64);

impl Bytes {
    /// `n` mebibytes (OpenWhisk's `limits.memory` is in MiB).
    pub const fn mib(n: u64) -> Self {
        Bytes(n * 1024 * 1024)
    }
    /// The value in megabytes (10^6 bytes), the unit of every benchmark's output contract.
    pub fn as_mb(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MB", self.as_mb())
    }
}

/// An OpenWhisk namespace (one tenant). `_` in URLs means "the caller's namespace" and is
/// resolved by the API before it reaches this type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Namespace(pub String);

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fully qualified action name: namespace plus (optionally package-qualified) name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionName {
    /// Owning namespace.
    pub namespace: Namespace,
    /// Name within the namespace, e.g. `hello` or `pkg/hello`.
    pub name: String,
}

impl fmt::Display for ActionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/{}", self.namespace, self.name)
    }
}

/// Identifier of one sandbox on one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SandboxId(pub String);

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of a node (agent).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An activation id: 32 lowercase hex characters, as OpenWhisk prints them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActivationId(pub String);

impl ActivationId {
    /// A fresh random id.
    pub fn random() -> Self {
        ActivationId(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl fmt::Display for ActivationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The action's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Code {
    /// Python source text (`exec.code` with `binary: false`).
    Source(String),
    /// A zip archive holding `__main__.py` (`exec.code` base64 with `binary: true`), decoded.
    Zip(Vec<u8>),
}

/// What runs: the runtime kind, the code and its entry point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Runtime kind as given by the client, e.g. `python:3` (normalised by the API).
    pub kind: String,
    /// The code.
    pub code: Code,
    /// Entry function name (`exec.main`, default `main`).
    pub main: String,
}

/// Per-action limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum run time of one invocation, ms (OpenWhisk default 60000).
    pub timeout_ms: u64,
    /// Memory limit of one sandbox, MiB (OpenWhisk default 256).
    pub memory_mb: u64,
    /// Concurrent invocations one sandbox may serve (OpenWhisk default 1).
    pub concurrency: u32,
    /// Log size limit, KiB (OpenWhisk default 10240).
    pub logs_kb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 60_000,
            memory_mb: 256,
            concurrency: 1,
            logs_kb: 10_240,
        }
    }
}

/// A deployed action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// Fully qualified name.
    pub name: ActionName,
    /// Semantic version string (`0.0.1`, bumped on every update).
    pub version: String,
    /// What runs.
    pub exec: Exec,
    /// Default parameters, merged under the invocation's own.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Annotations, in order (OpenWhisk `[{key, value}]`).
    pub annotations: Vec<(String, serde_json::Value)>,
    /// Limits.
    pub limits: Limits,
    /// Whether the action is published.
    pub publish: bool,
    /// Last update time.
    pub updated: UnixMillis,
}

/// How a sandbox was obtained for an activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// A new sandbox was launched and initialised.
    Cold,
    /// An idle warm sandbox was reused.
    Warm,
    /// A deduplicated sandbox was rebuilt and restored.
    Dedup,
    /// A sandbox restored from the function's post-init template.
    Template,
}

impl StartKind {
    /// The lowercase name used in annotations and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Warm => "warm",
            StartKind::Dedup => "dedup",
            StartKind::Template => "template",
        }
    }
}

/// OpenWhisk's activation outcome classes (`response.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationStatus {
    /// `success` (statusCode 0).
    Success,
    /// `application error` (statusCode 1): the action returned `{"error": ...}`.
    ApplicationError,
    /// `action developer error` (statusCode 2): init failed, exception, bad result, timeout, OOM.
    DeveloperError,
    /// `whisk internal error` (statusCode 3): the platform failed.
    InternalError,
}

impl ActivationStatus {
    /// OpenWhisk's `response.status` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ActivationStatus::Success => "success",
            ActivationStatus::ApplicationError => "application error",
            ActivationStatus::DeveloperError => "action developer error",
            ActivationStatus::InternalError => "whisk internal error",
        }
    }
    /// OpenWhisk's `response.statusCode`.
    pub fn code(self) -> u8 {
        match self {
            ActivationStatus::Success => 0,
            ActivationStatus::ApplicationError => 1,
            ActivationStatus::DeveloperError => 2,
            ActivationStatus::InternalError => 3,
        }
    }
}

/// The result part of an activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationResponse {
    /// Outcome class.
    pub status: ActivationStatus,
    /// The action's result object, or `{"error": "..."}` for errors.
    pub result: serde_json::Value,
}

/// One finished (or failed) invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    /// Id.
    pub id: ActivationId,
    /// The action invoked.
    pub action: ActionName,
    /// The action version that ran.
    pub version: String,
    /// The authenticated subject (user) that invoked.
    pub subject: String,
    /// When the invocation started (after admission).
    pub start: UnixMillis,
    /// When it ended.
    pub end: UnixMillis,
    /// Outcome.
    pub response: ActivationResponse,
    /// Log lines, OpenWhisk format: `2024-01-01T00:00:00.000000Z stdout: text`.
    pub logs: Vec<String>,
    /// Start kind (annotation `startKind`).
    pub start_kind: StartKind,
    /// Initialisation time on a cold start (annotation `initTime`), ms.
    pub init_time_ms: Option<u64>,
    /// Time between arrival and start (annotation `waitTime`), ms.
    pub wait_time_ms: u64,
    /// Time spent inside the action's `main`, ms, as measured by the runtime (not an OpenWhisk
    /// field; lets benchmarks separate platform overhead from user code).
    pub main_ms: Option<f64>,
    /// Whether the invocation hit its time limit (annotation `timeout`).
    pub timeout: bool,
    /// Limits in force (annotation `limits`).
    pub limits: Limits,
    /// Node that served it.
    pub node: Option<NodeId>,
}

impl Activation {
    /// Duration in ms (`end - start`).
    pub fn duration_ms(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// A request to run an action once, from the edge to the scheduler.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// Pre-assigned activation id (non-blocking callers get it before the run).
    pub id: ActivationId,
    /// The action, as stored at the time of the call.
    pub action: Arc<Action>,
    /// The merged parameters (action defaults overridden by the request's).
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The invoking subject.
    pub subject: String,
    /// The caller's API key (`uuid:key`), passed to the action as `__OW_API_KEY`.
    pub api_key: String,
    /// Arrival time.
    pub arrived: UnixMillis,
}

/// The seam between the REST edge and the scheduler.
///
/// Implemented by `medes-controller`; the API crate calls it and persists what it returns.
pub trait Invoker: Send + Sync + 'static {
    /// Runs the action once and returns the activation record. Never fails: platform problems
    /// become an activation with [`ActivationStatus::InternalError`] (or a 503-style admission
    /// error, see [`InvokeError`]).
    fn invoke(
        &self,
        req: InvokeRequest,
    ) -> futures::future::BoxFuture<'static, Result<Activation, InvokeError>>;

    /// The action was updated or deleted: sandboxes running older code must go.
    fn action_changed(&self, name: &ActionName);
}

/// Why an invocation could not be admitted at all (no activation is recorded).
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// No memory could be reserved within the admission wait; maps to HTTP 503.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// The action cannot run on this platform (e.g. a memory limit above the node budget); 4xx.
    #[error("action cannot run: {0}")]
    Rejected(String),
    /// The platform is shutting down; 503.
    #[error("platform is shutting down")]
    ShuttingDown,
}

/// Merges action defaults with invocation parameters; the invocation wins, as in OpenWhisk.
pub fn merge_params(
    defaults: &serde_json::Map<String, serde_json::Value>,
    given: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = defaults.clone();
    out.extend(given);
    out
}

/// Environment passed to every sandbox of an action (`__OW_*` values that do not change per run).
pub fn static_env(action: &Action) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("__OW_NAMESPACE".into(), action.name.namespace.0.clone());
    env.insert("__OW_ACTION_NAME".into(), action.name.to_string());
    env.insert("__OW_ACTION_VERSION".into(), action.version.clone());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_parameters_override_defaults() {
        let mut d = serde_json::Map::new();
        d.insert("a".into(), 1.into());
        d.insert("b".into(), 2.into());
        let mut g = serde_json::Map::new();
        g.insert("b".into(), 3.into());
        let m = merge_params(&d, g);
        assert_eq!(m["a"], 1);
        assert_eq!(m["b"], 3);
    }

    #[test]
    fn activation_ids_are_32_hex() {
        let id = ActivationId::random();
        assert_eq!(id.0.len(), 32);
        assert!(id.0.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
