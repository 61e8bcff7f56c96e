//! The routes and their handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use medes_core::{
    Action, ActionName, Activation, ActivationId, ActivationResponse, ActivationStatus,
    InvokeError, InvokeRequest, Namespace, SandboxScope, StartKind, UnixMillis, merge_params,
};
use medes_store::{ActivationQuery, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT, PutActionError};
use serde_json::{Map, Value, json};
use tower_http::timeout::TimeoutLayer;

use crate::Shared;
use crate::auth::Caller;
use crate::error::{ApiError, jsonify_errors};
use crate::wire::{self, ActionView};

type S = State<Arc<Shared>>;
type Q = Query<HashMap<String, String>>;

pub(crate) fn build(s: Arc<Shared>) -> Router {
    let cfg = &s.state.config;
    let payload_limit = DefaultBodyLimit::max(cfg.max_payload_bytes);
    // The code plus room for parameters and annotations.
    let put_limit = DefaultBodyLimit::max(cfg.max_code_bytes.saturating_add(cfg.max_payload_bytes));
    Router::new()
        .route("/api/v1", get(info))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/namespaces/{ns}/actions", get(list_actions))
        .route(
            "/api/v1/namespaces/{ns}/actions/{*name}",
            get(get_action)
                .delete(delete_action)
                .put(put_action.layer(put_limit))
                .post(invoke.layer(payload_limit)),
        )
        .route(
            "/api/v1/namespaces/{ns}/medes/idle",
            post(medes_idle_namespace),
        )
        .route(
            "/api/v1/namespaces/{ns}/medes/policy",
            get(policy_get).put(policy_put.layer(payload_limit)),
        )
        .route("/api/v1/namespaces/{ns}/activations", get(list_activations))
        .route(
            "/api/v1/namespaces/{ns}/activations/{id}",
            get(get_activation),
        )
        .route(
            "/api/v1/namespaces/{ns}/activations/{id}/result",
            get(activation_result),
        )
        .route(
            "/api/v1/namespaces/{ns}/activations/{id}/logs",
            get(activation_logs),
        )
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route_layer(middleware::from_fn(count_requests))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.")
        })
        // A bound on every request, so a stuck request cannot hold a graceful shutdown forever;
        // blocking invocations answer 202 at `blocking_timeout_ms`, well before it.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_millis(cfg.blocking_timeout_ms.saturating_add(30_000)),
        ))
        .layer(middleware::map_response(jsonify_errors))
        .with_state(s)
}

async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("medes_api_requests_total", "route" => route, "status" => status)
        .increment(1);
    resp
}

fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut resp = Response::new(axum::body::Body::from(
        serde_json::to_vec(v).expect("a JSON value always serializes"),
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

// ---------------------------------------------------------------------------- query params

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn uint(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "The value '{v}' of query parameter '{name}' is not a non-negative integer."
            ))
        }),
    }
}

/// OpenWhisk's `limit`: absent → 30, 0 → the maximum, above 200 → 400.
fn list_limit(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    match uint(q, "limit")? {
        None => Ok(DEFAULT_LIST_LIMIT),
        Some(0) => Ok(MAX_LIST_LIMIT),
        Some(n) if n as usize <= MAX_LIST_LIMIT => Ok(n as usize),
        Some(n) => Err(ApiError::bad_request(format!(
            "The value '{n}' is not in the range of 0 to {MAX_LIST_LIMIT} for query parameter 'limit'."
        ))),
    }
}

fn skip(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    Ok(uint(q, "skip")?.unwrap_or(0).min(usize::MAX as u64) as usize)
}

fn action_name(caller: &Caller, ns: &str, name: &str) -> Result<ActionName, ApiError> {
    let namespace = caller.resolve(ns)?;
    if !wire::valid_action_name(name) {
        return Err(ApiError::bad_request(format!(
            "The name '{name}' is not valid: a name is at most 256 characters, starts with a \
             letter, digit or '_', and contains only letters, digits, '_', '@', '.', '-' and \
             inner spaces; 'package/name' is allowed."
        )));
    }
    Ok(ActionName {
        namespace,
        name: name.to_owned(),
    })
}

fn body_or_error(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rej| match rej.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit),
        status => ApiError::new(status, rej.body_text()),
    })
}

// ---------------------------------------------------------------------------- info

async fn info(State(s): S) -> Response {
    let c = &s.state.config;
    ok(&json!({
        "description": "medes: an OpenWhisk-compatible serverless platform",
        "api_paths": ["/api/v1"],
        "build": env!("CARGO_PKG_VERSION"),
        "runtimes": {
            "python": [{
                "kind": wire::PYTHON_KIND,
                "default": true,
                "deprecated": false,
                "aliases": c.allow_kinds,
            }]
        },
        "limits": {
            "min_action_duration": wire::TIMEOUT_MS.0,
            "max_action_duration": wire::TIMEOUT_MS.1,
            "min_action_memory": wire::MEMORY_MB.0 * 1024 * 1024,
            "max_action_memory": wire::MEMORY_MB.1 * 1024 * 1024,
            "min_action_logs": wire::LOGS_MB.0 * 1024 * 1024,
            "max_action_logs": wire::LOGS_MB.1 * 1024 * 1024,
            "max_action_concurrency": wire::CONCURRENCY.1,
            "max_payload_bytes": c.max_payload_bytes,
            "max_code_bytes": c.max_code_bytes,
        }
    }))
}

async fn namespaces(caller: Caller) -> Response {
    ok(&json!([caller.namespace().0]))
}

async fn health() -> Response {
    ok(&json!({"status": "ok"}))
}

async fn metrics(State(s): S) -> Response {
    let text = s
        .state
        .metrics
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    let mut resp = Response::new(axum::body::Body::from(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

// ---------------------------------------------------------------------------- actions

/// The action from the cache, or from the store (then cached).
async fn load_action(s: &Shared, name: &ActionName) -> Result<Option<Arc<Action>>, ApiError> {
    if let Some(a) = s.actions.read().get(name) {
        return Ok(Some(a.clone()));
    }
    let _guard = s.action_writes.lock().await;
    if let Some(a) = s.actions.read().get(name) {
        return Ok(Some(a.clone()));
    }
    let Some(action) = s
        .state
        .store
        .get_action(name)
        .map_err(|e| ApiError::internal(&e))?
    else {
        return Ok(None);
    };
    let action = Arc::new(action);
    s.actions.write().insert(name.clone(), action.clone());
    Ok(Some(action))
}

async fn list_actions(
    State(s): S,
    caller: Caller,
    Path(ns): Path<String>,
    Query(q): Q,
) -> Response {
    let run = || -> Result<Response, ApiError> {
        let ns = caller.resolve(&ns)?;
        let (limit, skip) = (list_limit(&q)?, skip(&q)?);
        let actions = s
            .state
            .store
            .list_actions(&ns, skip, limit)
            .map_err(|e| ApiError::internal(&e))?;
        let list: Vec<Value> = actions
            .iter()
            .map(|a| wire::action_json(a, ActionView::Summary))
            .collect();
        Ok(ok(&Value::Array(list)))
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

async fn get_action(
    State(s): S,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    if let Some(action) = name.strip_suffix(MEDES_POLICY) {
        let name = action_name(&caller, &ns, action)?;
        return policy_function(&s, &name, None);
    }
    let name = action_name(&caller, &ns, &name)?;
    let action = load_action(&s, &name)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let view = if q
        .get("code")
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    {
        ActionView::NoCode
    } else {
        ActionView::Full
    };
    Ok(ok(&wire::action_json(&action, view)))
}

async fn put_action(
    State(s): S,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let cfg = &s.state.config;
    if let Some(action) = name.strip_suffix(MEDES_POLICY) {
        let name = action_name(&caller, &ns, action)?;
        caller.require_admin("Changing an action's policy knob")?;
        let body = body_or_error(body, cfg.max_payload_bytes)?;
        let knob: medes_policy::FunctionKnob =
            serde_json::from_slice(&body).map_err(ApiError::malformed)?;
        return policy_function(&s, &name, Some(knob));
    }
    let name = action_name(&caller, &ns, &name)?;
    let body = body_or_error(
        body,
        cfg.max_code_bytes.saturating_add(cfg.max_payload_bytes),
    )?;
    let put: wire::ActionPut = serde_json::from_slice(&body).map_err(ApiError::malformed)?;
    let overwrite = flag(&q, "overwrite");

    let _guard = s.action_writes.lock().await;
    let existing = s
        .state
        .store
        .get_action(&name)
        .map_err(|e| ApiError::internal(&e))?;
    if existing.is_some() && !overwrite {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "resource already exists",
        ));
    }
    let exec = match (put.exec, &existing) {
        (Some(e), _) => wire::exec_from_wire(e, &cfg.allow_kinds, cfg.max_code_bytes),
        (None, Some(old)) => Ok(old.exec.clone()),
        (None, None) => Err(wire::ExecError::Missing),
    };
    let exec = exec.map_err(|e| match e {
        wire::ExecError::CodeTooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        e => ApiError::bad_request(e.to_string()),
    })?;
    let base_limits = existing.as_ref().map(|a| a.limits).unwrap_or_default();
    let limits = wire::limits_from_wire(put.limits, base_limits)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let parameters = match (put.parameters, &existing) {
        (Some(p), _) => wire::params_from_wire(p),
        (None, Some(old)) => old.parameters.clone(),
        (None, None) => Map::new(),
    };
    let annotations = match (put.annotations, &existing) {
        (Some(a), _) => wire::annotations_from_wire(a),
        (None, Some(old)) => old.annotations.clone(),
        (None, None) => Vec::new(),
    };
    let action = Action {
        annotations: wire::with_exec_annotation(annotations, &exec.kind),
        name: name.clone(),
        version: String::new(),
        exec,
        parameters,
        limits,
        publish: put
            .publish
            .or(existing.as_ref().map(|a| a.publish))
            .unwrap_or(false),
        updated: now_ms(),
    };
    let store = s.state.store.clone();
    let stored = tokio::task::spawn_blocking(move || store.put_action(action, overwrite))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| match e {
            PutActionError::Exists(_) => {
                ApiError::new(StatusCode::CONFLICT, "resource already exists")
            }
            e => ApiError::internal(&e),
        })?;
    let stored = Arc::new(stored);
    s.actions.write().insert(name.clone(), stored.clone());
    if existing.is_some() {
        s.state.invoker.action_changed(&name);
    }
    Ok(ok(&wire::action_json(&stored, ActionView::Full)))
}

async fn delete_action(
    State(s): S,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    if let Some(action) = name.strip_suffix(MEDES_POLICY) {
        let name = action_name(&caller, &ns, action)?;
        caller.require_admin("Changing an action's policy knob")?;
        return policy_function(&s, &name, Some(medes_policy::FunctionKnob::default()));
    }
    let name = action_name(&caller, &ns, &name)?;
    let _guard = s.action_writes.lock().await;
    let store = s.state.store.clone();
    let key = name.clone();
    let removed = tokio::task::spawn_blocking(move || store.delete_action(&key))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::internal(&e))?;
    s.actions.write().remove(&name);
    let action = removed.ok_or_else(ApiError::not_found)?;
    s.state.invoker.action_changed(&name);
    Ok(ok(&wire::action_json(&action, ActionView::Full)))
}

// ---------------------------------------------------------------------------- invocations

/// Counts serialized bytes without allocating.
struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Replaces a result larger than `max` bytes by an error, as OpenWhisk does.
fn enforce_result_limit(a: &mut Activation, max: usize) {
    let mut w = CountingWriter(0);
    if serde_json::to_writer(&mut w, &a.response.result).is_err() || w.0 <= max {
        return;
    }
    a.response = ActivationResponse {
        status: ActivationStatus::DeveloperError,
        result: json!({"error": format!(
            "The action produced a response that exceeded the allowed length: {} > {max} bytes.",
            w.0
        )}),
    };
}

/// Hands the record to the store's writer without blocking the runtime.
fn record(s: &Shared, a: Arc<Activation>) {
    match s.state.store.try_record_activation(a) {
        Ok(()) => {}
        Err(Ok(a)) => {
            let store = s.state.store.clone();
            s.tasks.spawn_blocking(move || {
                if let Err(e) = store.record_activation(a) {
                    tracing::error!(error = %e, "storing an activation");
                }
            });
        }
        Err(Err(e)) => tracing::error!(error = %e, "storing an activation"),
    }
}

/// The record of an invocation that could not be admitted (non-blocking callers hold its id).
fn failed_activation(req: &InvokeRequest, err: &InvokeError) -> Activation {
    let end = now_ms();
    Activation {
        id: req.id.clone(),
        action: req.action.name.clone(),
        version: req.action.version.clone(),
        subject: req.subject.clone(),
        start: end,
        end,
        response: ActivationResponse {
            status: ActivationStatus::InternalError,
            result: json!({"error": err.to_string()}),
        },
        logs: Vec::new(),
        start_kind: StartKind::Cold,
        init_time_ms: None,
        wait_time_ms: end.saturating_sub(req.arrived),
        main_ms: None,
        timeout: false,
        limits: req.action.limits,
        node: None,
    }
}

/// Runs one invocation to the end and stores its record.
async fn run(s: Arc<Shared>, req: InvokeRequest) -> Result<Arc<Activation>, InvokeError> {
    let fallback = req.clone();
    match s.state.invoker.invoke(req).await {
        Ok(mut a) => {
            enforce_result_limit(&mut a, s.state.config.max_payload_bytes);
            let a = Arc::new(a);
            record(&s, a.clone());
            Ok(a)
        }
        Err(e) => {
            record(&s, Arc::new(failed_activation(&fallback, &e)));
            Err(e)
        }
    }
}

fn with_activation_id(mut resp: Response, id: &ActivationId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        resp.headers_mut().insert("x-openwhisk-activation-id", v);
    }
    resp
}

fn accepted(id: &ActivationId) -> Response {
    with_activation_id(
        json_response(StatusCode::ACCEPTED, &json!({"activationId": id.0})),
        id,
    )
}

async fn invoke(
    State(s): S,
    caller: Caller,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = now_ms();
    if let Some(action) = name.strip_suffix(MEDES_IDLE) {
        // `.../actions/{name}/medes/idle` cannot be an action name (at most `package/name`).
        let name = action_name(&caller, &ns, action)?;
        load_action(&s, &name)
            .await?
            .ok_or_else(ApiError::not_found)?;
        return Ok(medes_idle(&s, SandboxScope::Action(name)).await);
    }
    let name = action_name(&caller, &ns, &name)?;
    let body = body_or_error(body, s.state.config.max_payload_bytes)?;
    let given = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(&body).map_err(ApiError::malformed)? {
            Value::Object(m) => m,
            _ => return Err(ApiError::malformed("the parameters must be a JSON object")),
        }
    };
    let action = load_action(&s, &name)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let req = InvokeRequest {
        id: ActivationId::random(),
        params: merge_params(&action.parameters, given),
        action,
        subject: caller.0.key.subject.clone(),
        api_key: caller.0.auth.clone(),
        arrived,
    };
    let id = req.id.clone();
    if !flag(&q, "blocking") {
        let s2 = s.clone();
        s.tasks.spawn(async move {
            let _ = run(s2, req).await;
        });
        return Ok(accepted(&id));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s2 = s.clone();
    s.tasks.spawn(async move {
        let _ = tx.send(run(s2, req).await);
    });
    let wait = Duration::from_millis(s.state.config.blocking_timeout_ms);
    let outcome = match tokio::time::timeout(wait, rx).await {
        Err(_) => return Ok(accepted(&id)),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the invocation was lost",
            ));
        }
        Ok(Ok(outcome)) => outcome,
    };
    let a = outcome.map_err(|e| match e {
        InvokeError::NoCapacity(_) | InvokeError::ShuttingDown => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        InvokeError::Rejected(_) => ApiError::bad_request(e.to_string()),
    })?;
    let status = match a.response.status {
        ActivationStatus::Success => StatusCode::OK,
        ActivationStatus::ApplicationError | ActivationStatus::DeveloperError => {
            StatusCode::BAD_GATEWAY
        }
        ActivationStatus::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = if flag(&q, "result") {
        a.response.result.clone()
    } else {
        wire::activation_json(&a)
    };
    Ok(with_activation_id(json_response(status, &body), &id))
}

// ---------------------------------------------------------------------------- activations

async fn list_activations(
    State(s): S,
    caller: Caller,
    Path(ns): Path<String>,
    Query(q): Q,
) -> Result<Response, ApiError> {
    let namespace = caller.resolve(&ns)?;
    let name = match q.get("name") {
        Some(n) if !wire::valid_action_name(n) => {
            return Err(ApiError::bad_request(format!(
                "The name '{n}' is not valid."
            )));
        }
        n => n.cloned(),
    };
    let query = ActivationQuery {
        namespace,
        name,
        since: uint(&q, "since")?,
        upto: uint(&q, "upto")?,
        skip: skip(&q)?,
        limit: list_limit(&q)?,
    };
    let docs = flag(&q, "docs");
    let store = s.state.store.clone();
    let list = tokio::task::spawn_blocking(move || store.list_activations(&query))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::internal(&e))?;
    let render = if docs {
        wire::activation_json
    } else {
        wire::activation_summary_json
    };
    Ok(ok(&Value::Array(list.iter().map(render).collect())))
}

async fn find_activation(
    s: &Shared,
    caller: &Caller,
    ns: &str,
    id: &str,
) -> Result<Activation, ApiError> {
    let namespace: Namespace = caller.resolve(ns)?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!(
            "The activation id '{id}' is not valid: it must be 32 hexadecimal characters."
        )));
    }
    let a = s
        .state
        .store
        .get_activation(&ActivationId(id.to_ascii_lowercase()))
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(ApiError::not_found)?;
    if a.action.namespace != namespace {
        return Err(ApiError::not_found());
    }
    Ok(a)
}

async fn get_activation(
    State(s): S,
    caller: Caller,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let a = find_activation(&s, &caller, &ns, &id).await?;
    Ok(ok(&wire::activation_json(&a)))
}

async fn activation_result(
    State(s): S,
    caller: Caller,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let a = find_activation(&s, &caller, &ns, &id).await?;
    Ok(ok(&wire::response_json(&a)))
}

async fn activation_logs(
    State(s): S,
    caller: Caller,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let a = find_activation(&s, &caller, &ns, &id).await?;
    Ok(ok(&json!({"logs": a.logs})))
}

// ---------------------------------------------------------------------------- medes extensions

/// Suffix of the per-action medes idle route.
const MEDES_IDLE: &str = "/medes/idle";

/// `POST /api/v1/namespaces/{ns}/medes/idle`: [`medes_idle`] for every action of the namespace.
async fn medes_idle_namespace(
    State(s): S,
    caller: Caller,
    Path(ns): Path<String>,
) -> Result<Response, ApiError> {
    let ns = caller.resolve(&ns)?;
    Ok(medes_idle(&s, SandboxScope::Namespace(ns)).await)
}

/// A medes extension (not OpenWhisk), for benchmarks and `medes suite run --state dedup`: runs
/// the idle-sandbox decision now for every idle warm sandbox in `scope`, as if its idle period
/// had passed, waits (bounded by the blocking timeout) until the checkpoints it decided are
/// done, and answers `{"decided": n, "settled": bool, "sandboxes": [{"id", "action", "state"}]}`.
async fn medes_idle(s: &Shared, scope: SandboxScope) -> Response {
    let invoker = &s.state.invoker;
    let decided = invoker.force_decisions(scope.clone()).await;
    let wait = Duration::from_millis(s.state.config.blocking_timeout_ms);
    let settled = tokio::time::timeout(wait, invoker.wait_settled())
        .await
        .is_ok();
    let sandboxes: Vec<Value> = invoker
        .sandbox_states(&scope)
        .into_iter()
        .map(|sb| json!({"id": sb.id.0, "action": sb.action.to_string(), "state": sb.state}))
        .collect();
    ok(&json!({"decided": decided, "settled": settled, "sandboxes": sandboxes}))
}

// ---------------------------------------------------------------------------- policy knob

const MEDES_POLICY: &str = "/medes/policy";

fn knob(s: &Shared) -> Result<&dyn medes_policy::PolicyControl, ApiError> {
    s.state.policy.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "This platform has no adjustable policy.",
        )
    })
}

fn settings_json(settings: &medes_policy::PolicySettings) -> Result<Response, ApiError> {
    let v = serde_json::to_value(settings).map_err(|e| ApiError::internal(&e))?;
    Ok(ok(&v))
}

/// `GET /api/v1/namespaces/{ns}/medes/policy`: the knob in force.
async fn policy_get(
    State(s): S,
    caller: Caller,
    Path(ns): Path<String>,
) -> Result<Response, ApiError> {
    caller.resolve(&ns)?;
    settings_json(&knob(&s)?.policy_settings())
}

/// A `PUT .../medes/policy` body; a field of the wrong type is named in the 400's message
/// (serde's own message says only what was expected).
fn policy_update(body: &[u8]) -> Result<medes_policy::PolicyUpdate, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let culprit = serde_json::from_slice::<serde_json::Map<String, Value>>(body)
            .ok()
            .and_then(|fields| {
                fields.into_iter().find_map(|(name, v)| {
                    let one = Value::Object([(name.clone(), v)].into_iter().collect());
                    serde_json::from_value::<medes_policy::PolicyUpdate>(one)
                        .err()
                        .map(|e| (name, e))
                })
            });
        match culprit {
            Some((name, e)) => ApiError::malformed(format!("field {name}: {e}")),
            None => ApiError::malformed(e),
        }
    })
}

/// `PUT /api/v1/namespaces/{ns}/medes/policy`: changes the global settings (present fields).
async fn policy_put(
    State(s): S,
    caller: Caller,
    Path(ns): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.resolve(&ns)?;
    caller.require_admin("Changing the policy knob")?;
    let body = body_or_error(body, s.state.config.max_payload_bytes)?;
    let update = policy_update(&body)?;
    let k = knob(&s)?;
    let _guard = s.policy_writes.lock();
    let mut settings = k.policy_settings();
    settings
        .apply(&update)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let now = k
        .set_policy_settings(settings)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(update = ?update, "policy knob changed through the API");
    settings_json(&now)
}

/// One action's overrides: read (`None`), replace, or remove (an empty knob). Answers
/// `{"action", "policy", "overrides"}`.
fn policy_function(
    s: &Shared,
    name: &ActionName,
    set: Option<medes_policy::FunctionKnob>,
) -> Result<Response, ApiError> {
    let k = knob(s)?;
    let settings = match set {
        None => k.policy_settings(),
        Some(fk) => {
            let _guard = s.policy_writes.lock();
            let mut settings = k.policy_settings();
            settings
                .set_function(&name.name, fk)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            k.set_policy_settings(settings)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        }
    };
    let overrides = settings
        .functions
        .get(&name.name)
        .copied()
        .unwrap_or_default();
    Ok(ok(&json!({
        "action": name.name,
        "policy": settings.policy.as_str(),
        "overrides": serde_json::to_value(overrides).map_err(|e| ApiError::internal(&e))?,
    })))
}
