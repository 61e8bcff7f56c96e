//! The REST edge driven in-process with a canned [`Invoker`]: OpenWhisk's endpoints, status
//! codes and JSON shapes, every bad-input case of issue 2 (and that it changes nothing),
//! invocation flags, activation listing, persistence across a restart.

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use futures::future::BoxFuture;
use medes_api::{ApiConfig, ApiState};
use medes_core::{
    ActionName, Activation, ActivationResponse, ActivationStatus, InvokeError, InvokeRequest,
    Invoker, Namespace, SandboxId, SandboxScope, SandboxSummary, StartKind,
};
use medes_store::{ApiKey, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// Returns canned activations; behaviour is steered by the invocation's parameters:
/// `sleep_ms`, `status` (`app`, `dev`, `internal`), `big` (result of that many bytes),
/// `no_capacity`, `rejected`. The result echoes the parameters.
#[derive(Default)]
struct TestInvoker {
    warm: Mutex<HashSet<ActionName>>,
    changed: Mutex<Vec<ActionName>>,
    forced: Mutex<Vec<SandboxScope>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Invoker for TestInvoker {
    fn invoke(&self, req: InvokeRequest) -> BoxFuture<'static, Result<Activation, InvokeError>> {
        let cold = self.warm.lock().unwrap().insert(req.action.name.clone());
        Box::pin(async move {
            let p = &req.params;
            if p.contains_key("no_capacity") {
                return Err(InvokeError::NoCapacity("memory budget exhausted".into()));
            }
            if p.contains_key("rejected") {
                return Err(InvokeError::Rejected(
                    "memory limit above node budget".into(),
                ));
            }
            let start = now_ms();
            if let Some(ms) = p.get("sleep_ms").and_then(Value::as_u64) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let (status, result) = match p.get("status").and_then(Value::as_str) {
                Some("app") => (ActivationStatus::ApplicationError, json!({"error": "app"})),
                Some("dev") => (ActivationStatus::DeveloperError, json!({"error": "dev"})),
                Some("internal") => (ActivationStatus::InternalError, json!({"error": "whisk"})),
                _ => match p.get("big").and_then(Value::as_u64) {
                    Some(n) => (
                        ActivationStatus::Success,
                        json!({"x": "a".repeat(n as usize)}),
                    ),
                    None => (ActivationStatus::Success, Value::Object(p.clone())),
                },
            };
            Ok(Activation {
                id: req.id.clone(),
                action: req.action.name.clone(),
                version: req.action.version.clone(),
                subject: req.subject.clone(),
                start,
                end: now_ms(),
                response: ActivationResponse { status, result },
                logs: vec![format!(
                    "2024-01-01T00:00:00.000000Z stdout: key={}",
                    req.api_key
                )],
                start_kind: if cold {
                    StartKind::Cold
                } else {
                    StartKind::Warm
                },
                init_time_ms: cold.then_some(12),
                wait_time_ms: start.saturating_sub(req.arrived),
                main_ms: Some(0.05),
                timeout: false,
                limits: req.action.limits,
                node: None,
            })
        })
    }

    fn action_changed(&self, name: &ActionName) {
        self.changed.lock().unwrap().push(name.clone());
    }

    /// Every warm action has one sandbox, which a forced decision makes `dedup`.
    fn force_decisions(&self, scope: SandboxScope) -> BoxFuture<'static, usize> {
        let n = self
            .warm
            .lock()
            .unwrap()
            .iter()
            .filter(|a| scope.covers(a))
            .count();
        self.forced.lock().unwrap().push(scope);
        Box::pin(async move { n })
    }

    fn sandbox_states(&self, scope: &SandboxScope) -> Vec<SandboxSummary> {
        let mut v: Vec<SandboxSummary> = self
            .warm
            .lock()
            .unwrap()
            .iter()
            .filter(|a| scope.covers(a))
            .map(|a| SandboxSummary {
                id: SandboxId(format!("sb-{}", a.name)),
                action: a.clone(),
                state: "dedup".into(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// A policy knob like the controller's: validates, fills absent timers, keeps the settings.
#[derive(Default)]
struct TestKnob(std::sync::Mutex<medes_policy::PolicySettings>);

impl medes_policy::PolicyControl for TestKnob {
    fn policy_settings(&self) -> medes_policy::PolicySettings {
        self.0.lock().unwrap().clone()
    }
    fn set_policy_settings(
        &self,
        mut s: medes_policy::PolicySettings,
    ) -> Result<medes_policy::PolicySettings, medes_policy::KnobError> {
        s.validate()?;
        s.resolve(medes_policy::Timers {
            idle_period_s: 60,
            keep_alive_s: 600,
            keep_dedup_s: 900,
        });
        *self.0.lock().unwrap() = s.clone();
        Ok(s)
    }
}

fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("install recorder")
        })
        .clone()
}

struct App {
    router: axum::Router,
    store: Arc<Store>,
    invoker: Arc<TestInvoker>,
    auth: String,
    _dir: Option<tempfile::TempDir>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

impl App {
    fn new() -> App {
        Self::with_config(ApiConfig::default())
    }

    fn with_config(config: ApiConfig) -> App {
        let dir = tempfile::tempdir().unwrap();
        let mut app = Self::open(&dir.path().join("medes.redb"), config);
        app._dir = Some(dir);
        app
    }

    fn open(path: &std::path::Path, config: ApiConfig) -> App {
        let store = Arc::new(Store::open(path).unwrap());
        let key = store.ensure_default_key().unwrap();
        let invoker = Arc::new(TestInvoker::default());
        let state = ApiState {
            store: store.clone(),
            invoker: invoker.clone(),
            metrics: Some(prometheus()),
            config,
            policy: Some(Arc::new(TestKnob::default())),
        };
        App {
            router: medes_api::router(state),
            store,
            invoker,
            auth: basic(&key.auth_string()),
            _dir: None,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.raw(method, uri, Some(&self.auth), body).await
    }

    async fn raw(&self, method: Method, uri: &str, auth: Option<&str>, body: Vec<u8>) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req = req.header("content-type", "application/json");
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            headers,
            json,
        }
    }

    async fn put_action(&self, name: &str, body: Value) -> Reply {
        self.call(
            Method::PUT,
            &format!("/api/v1/namespaces/_/actions/{name}"),
            Some(body),
        )
        .await
    }

    async fn invoke(&self, name: &str, query: &str, params: Value) -> Reply {
        let uri = format!("/api/v1/namespaces/_/actions/{name}?{query}");
        self.call(Method::POST, &uri, Some(params)).await
    }

    async fn post(&self, uri: &str, body: Vec<u8>) -> Reply {
        self.raw(Method::POST, uri, Some(&self.auth), body).await
    }

    async fn list(&self, query: &str) -> Value {
        self.call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations?{query}"),
            None,
        )
        .await
        .json
    }

    fn action_count(&self) -> usize {
        self.store
            .list_actions(&medes_core::Namespace("guest".into()), 0, 1000)
            .unwrap()
            .len()
    }
}

fn basic(auth: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(auth)
    )
}

fn hello() -> Value {
    json!({
        "exec": {"kind": "python:3", "code": "def main(args):\n    return args\n"},
        "parameters": [{"key": "greeting", "value": "hi"}, {"key": "n", "value": 1}],
        "annotations": [{"key": "description", "value": "says hi"}],
        "limits": {"timeout": 5000, "memory": 128}
    })
}

fn annotation<'a>(record: &'a Value, key: &str) -> Option<&'a Value> {
    record["annotations"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

/// Every error has OpenWhisk's shape.
fn assert_error(r: &Reply, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{:?}", r.json);
    let msg = r.json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {:?}", r.json));
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
    assert!(
        r.json["code"].as_str().is_some_and(|c| !c.is_empty()),
        "no code: {:?}",
        r.json
    );
}

fn zip_b64(files: &[(&str, &str)]) -> String {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        for (name, text) in files {
            z.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(text.as_bytes()).unwrap();
        }
        z.finish().unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
}

#[tokio::test]
async fn info_namespaces_health_and_metrics() {
    let app = App::new();
    let r = app.raw(Method::GET, "/api/v1", None, vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["runtimes"]["python"][0]["kind"], "python:3");
    let r = app.call(Method::GET, "/api/v1/namespaces", None).await;
    assert_eq!(r.json, json!(["guest"]));
    let r = app.raw(Method::GET, "/health", None, vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.raw(Method::GET, "/metrics", None, vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.json.as_str().unwrap();
    assert!(text.contains("medes_api_requests_total"), "{text}");
    assert!(text.contains("route=\"/api/v1/namespaces\""), "{text}");
}

#[tokio::test]
async fn wrong_auth_is_401() {
    let app = App::new();
    let uri = "/api/v1/namespaces/_/actions";
    let key = app.store.ensure_default_key().unwrap();
    let wrong_key = basic(&format!("{}:{}", key.uuid, "x".repeat(64)));
    let wrong_uuid = basic(&format!("{}:{}", uuid::Uuid::new_v4(), key.key));
    let guest = basic(
        "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP",
    );
    for auth in [
        None,
        Some("Bearer abc"),
        Some("Basic !!!"),
        Some(&*basic("nocolon")),
        Some(&*wrong_key),
        Some(&*wrong_uuid),
        Some(&*guest),
    ] {
        let r = app.raw(Method::GET, uri, auth, vec![]).await;
        assert_error(
            &r,
            StatusCode::UNAUTHORIZED,
            "The supplied authentication is invalid",
        );
    }
    // A PUT with wrong auth changes nothing.
    let r = app
        .raw(
            Method::PUT,
            "/api/v1/namespaces/_/actions/x",
            Some(&wrong_key),
            hello().to_string().into_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.action_count(), 0);
    // Another key in another namespace works, and only there.
    let alice = ApiKey::generate(medes_core::Namespace("alice".into()), "alice");
    app.store.add_key(&alice).unwrap();
    let r = app
        .raw(
            Method::GET,
            "/api/v1/namespaces",
            Some(&basic(&alice.auth_string())),
            vec![],
        )
        .await;
    assert_eq!(r.json, json!(["alice"]));
    let r = app
        .raw(
            Method::GET,
            "/api/v1/namespaces/guest/actions",
            Some(&basic(&alice.auth_string())),
            vec![],
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "not authorized");
}

#[tokio::test]
async fn action_lifecycle() {
    let app = App::new();
    let r = app.put_action("hello", hello()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["version"], "0.0.1");
    assert_eq!(r.json["namespace"], "guest");
    assert_eq!(r.json["exec"]["kind"], "python:3");
    assert_eq!(
        r.json["limits"],
        json!({"concurrency": 1, "logs": 10, "memory": 128, "timeout": 5000})
    );

    // Conflicting PUT: 409 and nothing changes.
    let mut other = hello();
    other["exec"]["code"] = json!("def main(a):\n    return {}\n");
    let r = app.put_action("hello", other.clone()).await;
    assert_error(&r, StatusCode::CONFLICT, "already exists");
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/actions/hello", None)
        .await;
    assert_eq!(r.json["exec"]["code"], hello()["exec"]["code"]);
    assert_eq!(r.json["version"], "0.0.1");
    assert_eq!(r.json["parameters"], hello()["parameters"]);
    assert!(app.invoker.changed.lock().unwrap().is_empty());

    // Overwrite: new code, version bump, limits kept where not given, sandboxes notified.
    let r = app
        .put_action(
            "hello?overwrite=true",
            json!({"exec": other["exec"], "limits": {"memory": 256}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["version"], "0.0.2");
    assert_eq!(r.json["limits"]["timeout"], 5000);
    assert_eq!(r.json["limits"]["memory"], 256);
    assert_eq!(
        r.json["parameters"],
        hello()["parameters"],
        "parameters kept when not given"
    );
    assert_eq!(app.invoker.changed.lock().unwrap().len(), 1);

    let r = app
        .call(
            Method::GET,
            "/api/v1/namespaces/guest/actions/hello?code=false",
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json["exec"].get("code").is_none());

    app.put_action("pkg/second", hello()).await;
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/actions", None)
        .await;
    let names: Vec<_> = r
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].clone())
        .collect();
    assert_eq!(names, [json!("pkg/second"), json!("hello")]);
    let r = app
        .call(
            Method::GET,
            "/api/v1/namespaces/_/actions?limit=1&skip=1",
            None,
        )
        .await;
    assert_eq!(r.json.as_array().unwrap().len(), 1);
    assert_eq!(r.json[0]["name"], "hello");

    // The invocation sees the new code's action version.
    let r = app.invoke("hello", "blocking=true", json!({})).await;
    assert_eq!(r.json["version"], "0.0.2");

    let r = app
        .call(Method::DELETE, "/api/v1/namespaces/_/actions/hello", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["name"], "hello");
    assert_eq!(app.invoker.changed.lock().unwrap().len(), 2);
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/actions/hello", None)
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "does not exist");
    let r = app.invoke("hello", "blocking=true", json!({})).await;
    assert_error(&r, StatusCode::NOT_FOUND, "does not exist");
    let r = app
        .call(Method::DELETE, "/api/v1/namespaces/_/actions/hello", None)
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "does not exist");
}

#[tokio::test]
async fn zip_actions() {
    let app = App::new();
    let code = zip_b64(&[("__main__.py", "def main(a):\n    return a\n")]);
    let r = app.put_action("z", json!({"exec": {"kind": "python:default", "code": code, "binary": true, "main": "main"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["exec"]["binary"], true);
    assert_eq!(r.json["exec"]["kind"], "python:3", "kinds are normalised");
    assert_eq!(r.json["exec"]["code"], json!(code));
    // binary inferred when left out
    let r = app
        .put_action("z2", json!({"exec": {"kind": "python:3", "code": code}}))
        .await;
    assert_eq!(r.json["exec"]["binary"], true);

    let bad = [
        (
            json!({"kind": "python:3", "code": "not base64!", "binary": true}),
            "base64",
        ),
        (
            json!({"kind": "python:3", "code": base64::engine::general_purpose::STANDARD.encode("plain"), "binary": true}),
            "zip",
        ),
        (
            json!({"kind": "python:3", "code": zip_b64(&[("main.py", "x")]), "binary": true}),
            "__main__.py",
        ),
    ];
    for (exec, needle) in bad {
        let r = app.put_action("bad", json!({"exec": exec})).await;
        assert_error(&r, StatusCode::BAD_REQUEST, needle);
    }
    assert_eq!(app.action_count(), 2);
}

#[tokio::test]
async fn bad_action_input_is_400_and_changes_nothing() {
    let app = App::with_config(ApiConfig {
        max_code_bytes: 10_000,
        ..ApiConfig::default()
    });
    app.put_action("keep", hello()).await;
    let put = |name: &str, body: Vec<u8>| {
        let uri = format!("/api/v1/namespaces/_/actions/{name}?overwrite=true");
        let auth = app.auth.clone();
        let app = &app;
        async move { app.raw(Method::PUT, &uri, Some(&auth), body).await }
    };
    let j = |v: Value| v.to_string().into_bytes();
    let long_name = "n".repeat(257);
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "x",
            b"{\"exec\": {".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        ("x", b"[1,2]".to_vec(), StatusCode::BAD_REQUEST, "malformed"),
        (
            "x",
            j(json!({"parameters": []})),
            StatusCode::BAD_REQUEST,
            "exec undefined",
        ),
        (
            "x",
            j(json!({"exec": {"kind": "nodejs:20", "code": "x"}})),
            StatusCode::BAD_REQUEST,
            "nodejs:20",
        ),
        (
            "x",
            j(json!({"exec": {"code": "x"}})),
            StatusCode::BAD_REQUEST,
            "kind",
        ),
        (
            "x",
            j(json!({"exec": {"kind": "python:3"}})),
            StatusCode::BAD_REQUEST,
            "code",
        ),
        (
            "x",
            j(json!({"exec": {"kind": "python:3", "code": "x", "main": "a b"}})),
            StatusCode::BAD_REQUEST,
            "main",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "parameters": {"a": 1}})),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "parameters": [{"k": 1}]})),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "annotations": "a"})),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"memory": 64}})),
            StatusCode::BAD_REQUEST,
            "memory limit 64 MB",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"memory": 4096}})),
            StatusCode::BAD_REQUEST,
            "memory",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"timeout": 50}})),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"timeout": 300_001}})),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"concurrency": 0}})),
            StatusCode::BAD_REQUEST,
            "concurrency",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"concurrency": 501}})),
            StatusCode::BAD_REQUEST,
            "concurrency",
        ),
        (
            "x",
            j(json!({"exec": hello()["exec"], "limits": {"memory": "big"}})),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "x",
            j(json!({"exec": {"kind": "python:3", "code": "#".repeat(10_001)}})),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
        ),
        (
            "x",
            vec![b' '; 1_100_000],
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
        ),
        ("-bad", j(hello()), StatusCode::BAD_REQUEST, "not valid"),
        (
            "bad%24name",
            j(hello()),
            StatusCode::BAD_REQUEST,
            "not valid",
        ),
        ("a/b/c", j(hello()), StatusCode::BAD_REQUEST, "not valid"),
        (
            long_name.as_str(),
            j(hello()),
            StatusCode::BAD_REQUEST,
            "not valid",
        ),
        (
            "trailing%20",
            j(hello()),
            StatusCode::BAD_REQUEST,
            "not valid",
        ),
        // Updating an existing action with bad input changes nothing either.
        (
            "keep",
            j(json!({"exec": {"kind": "java", "code": "x"}})),
            StatusCode::BAD_REQUEST,
            "java",
        ),
        (
            "keep",
            j(json!({"limits": {"memory": 1}})),
            StatusCode::BAD_REQUEST,
            "memory",
        ),
    ];
    for (name, body, status, needle) in cases {
        let r = put(name, body).await;
        assert_error(&r, status, needle);
    }
    let names: Vec<_> = app
        .store
        .list_actions(&medes_core::Namespace("guest".into()), 0, 100)
        .unwrap()
        .into_iter()
        .map(|a| (a.name.name, a.version, a.limits.memory_mb))
        .collect();
    assert_eq!(names, [("keep".to_owned(), "0.0.1".to_owned(), 128)]);
    assert!(app.invoker.changed.lock().unwrap().is_empty());
    // Names with spaces inside are OpenWhisk-valid.
    let r = put("my%20action", j(hello())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
}

#[tokio::test]
async fn blocking_invocations() {
    let app = App::new();
    app.put_action("hello", hello()).await;

    let r = app
        .invoke("hello", "blocking=true", json!({"n": 2, "name": "x"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    let rec = &r.json;
    for field in [
        "namespace",
        "name",
        "version",
        "subject",
        "activationId",
        "start",
        "end",
        "duration",
        "statusCode",
        "response",
        "logs",
        "annotations",
        "publish",
    ] {
        assert!(rec.get(field).is_some(), "missing {field}: {rec}");
    }
    assert_eq!(rec["response"]["status"], "success");
    assert_eq!(rec["response"]["statusCode"], 0);
    assert_eq!(rec["response"]["success"], true);
    assert_eq!(
        rec["response"]["result"],
        json!({"greeting": "hi", "n": 2, "name": "x"}),
        "parameters merged, invocation wins"
    );
    assert_eq!(annotation(rec, "startKind").unwrap(), "cold");
    assert_eq!(annotation(rec, "initTime").unwrap(), 12);
    assert_eq!(annotation(rec, "path").unwrap(), "guest/hello");
    assert_eq!(annotation(rec, "kind").unwrap(), "python:3");
    assert_eq!(annotation(rec, "timeout").unwrap(), false);
    assert_eq!(annotation(rec, "limits").unwrap()["memory"], 128);
    assert!(annotation(rec, "waitTime").unwrap().is_u64());
    let id = rec["activationId"].as_str().unwrap().to_owned();
    assert_eq!(r.headers["x-openwhisk-activation-id"], id.as_str());
    // The caller's key reached the action.
    let key = app.store.ensure_default_key().unwrap();
    assert!(
        rec["logs"][0]
            .as_str()
            .unwrap()
            .contains(&key.auth_string())
    );

    let r = app
        .invoke("hello", "blocking=true&result=true", json!({"n": 3}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json, json!({"greeting": "hi", "n": 3}));

    let r = app.invoke("hello", "blocking=true", json!({})).await;
    assert_eq!(annotation(&r.json, "startKind").unwrap(), "warm");
    assert!(
        annotation(&r.json, "initTime").is_none(),
        "no initTime on a warm start"
    );

    // The stored record is readable at once.
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["activationId"], id.as_str());
    assert_eq!(annotation(&r.json, "startKind").unwrap(), "cold");
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/guest/activations/{id}/result"),
            None,
        )
        .await;
    assert_eq!(r.json["result"]["n"], 2);
    assert_eq!(r.json["status"], "success");
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{id}/logs"),
            None,
        )
        .await;
    assert_eq!(r.json["logs"].as_array().unwrap().len(), 1);

    // Failures: OpenWhisk's status codes, with the record.
    for (status, code, http) in [
        ("app", 1, StatusCode::BAD_GATEWAY),
        ("dev", 2, StatusCode::BAD_GATEWAY),
        ("internal", 3, StatusCode::INTERNAL_SERVER_ERROR),
    ] {
        let r = app
            .invoke("hello", "blocking=true", json!({"status": status}))
            .await;
        assert_eq!(r.status, http, "{status}");
        assert_eq!(r.json["response"]["statusCode"], code);
        assert_eq!(r.json["statusCode"], code);
        assert_eq!(r.json["response"]["success"], false);
        let r = app
            .invoke(
                "hello",
                "blocking=true&result=true",
                json!({"status": status}),
            )
            .await;
        assert_eq!(r.status, http);
        assert!(r.json["error"].is_string());
    }

    // Admission failures.
    let r = app
        .invoke("hello", "blocking=true", json!({"no_capacity": 1}))
        .await;
    assert_error(
        &r,
        StatusCode::SERVICE_UNAVAILABLE,
        "memory budget exhausted",
    );
    let r = app
        .invoke("hello", "blocking=true", json!({"rejected": 1}))
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "node budget");

    // An empty body means no parameters.
    let r = app
        .raw(
            Method::POST,
            "/api/v1/namespaces/_/actions/hello?blocking=true&result=true",
            Some(&app.auth),
            vec![],
        )
        .await;
    assert_eq!(r.json, json!({"greeting": "hi", "n": 1}));
}

#[tokio::test]
async fn non_blocking_and_timed_out_invocations() {
    let app = App::with_config(ApiConfig {
        blocking_timeout_ms: 100,
        ..ApiConfig::default()
    });
    app.put_action("hello", hello()).await;
    let r = app.invoke("hello", "", json!({"sleep_ms": 50})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json["activationId"].as_str().unwrap().to_owned();
    assert_eq!(r.json.as_object().unwrap().len(), 1);
    let uri = format!("/api/v1/namespaces/_/activations/{id}");
    assert_error(
        &app.call(Method::GET, &uri, None).await,
        StatusCode::NOT_FOUND,
        "does not exist",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = app.call(Method::GET, &uri, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["response"]["result"]["sleep_ms"], 50);

    // blocking but slower than blocking_timeout_ms: 202, then stored.
    let r = app
        .invoke("hello", "blocking=true", json!({"sleep_ms": 400}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json["activationId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // A non-blocking invocation that cannot be admitted leaves an error record.
    let r = app
        .invoke("hello", "blocking=false", json!({"no_capacity": 1}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json["activationId"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{id}"),
            None,
        )
        .await;
    assert_eq!(r.json["response"]["status"], "whisk internal error");
}

#[tokio::test]
async fn bad_invocation_input() {
    let app = App::with_config(ApiConfig {
        max_payload_bytes: 1000,
        ..ApiConfig::default()
    });
    app.put_action("hello", hello()).await;
    let uri = "/api/v1/namespaces/_/actions/hello?blocking=true";
    assert_error(
        &app.post(uri, b"{\"a\":".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "malformed",
    );
    assert_error(
        &app.post(uri, b"[1]".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "JSON object",
    );
    assert_error(
        &app.post(uri, b"42".to_vec()).await,
        StatusCode::BAD_REQUEST,
        "JSON object",
    );
    let big = json!({"x": "a".repeat(2000)}).to_string().into_bytes();
    assert_error(
        &app.post(uri, big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "1000 bytes",
    );
    assert_error(
        &app.post(
            "/api/v1/namespaces/_/actions/nope?blocking=true",
            b"{}".to_vec(),
        )
        .await,
        StatusCode::NOT_FOUND,
        "does not exist",
    );
    assert_error(
        &app.post(
            "/api/v1/namespaces/_/actions/-x?blocking=true",
            b"{}".to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "not valid",
    );
    assert_error(
        &app.post(
            "/api/v1/namespaces/other/actions/hello?blocking=true",
            b"{}".to_vec(),
        )
        .await,
        StatusCode::FORBIDDEN,
        "not authorized",
    );
    // Nothing was recorded by any of these.
    app.store.flush().unwrap();
    assert_eq!(app.store.activation_count().unwrap(), 0);

    // A result above the payload limit becomes an error activation.
    let r = app
        .invoke("hello", "blocking=true", json!({"big": 5000}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let err = r.json["response"]["result"]["error"].as_str().unwrap();
    assert!(
        err.contains("exceeded the allowed length") && err.contains("> 1000 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn routing_errors_are_json() {
    let app = App::new();
    let r = app
        .call(Method::PATCH, "/api/v1/namespaces/_/actions/x", None)
        .await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "not allowed");
    let r = app
        .call(Method::POST, "/api/v1/namespaces/_/activations", None)
        .await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "not allowed");
    let r = app.call(Method::GET, "/api/v1/nothing", None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "does not exist");
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/activations/zz", None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "not valid");
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{}", "a".repeat(32)),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "does not exist");
    let r = app
        .call(
            Method::GET,
            "/api/v1/namespaces/_/activations?limit=201",
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "limit");
    let r = app
        .call(
            Method::GET,
            "/api/v1/namespaces/_/activations?skip=-1",
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "skip");
    let r = app
        .call(
            Method::GET,
            "/api/v1/namespaces/_/activations?since=yesterday",
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "since");
}

#[tokio::test]
async fn activation_listing() {
    let app = App::new();
    app.put_action("a", hello()).await;
    app.put_action("pkg/b", hello()).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let name = if i % 2 == 0 { "a" } else { "pkg/b" };
        let r = app.invoke(name, "blocking=true", json!({"i": i})).await;
        ids.push((
            r.json["activationId"].as_str().unwrap().to_owned(),
            r.json["start"].as_u64().unwrap(),
        ));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    app.store.flush().unwrap();
    let all = app.list("").await;
    let got: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["activationId"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<_> = ids.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(got, want, "newest first");
    let summary = &all[0];
    assert!(
        summary.get("response").is_none() && summary.get("logs").is_none(),
        "summaries by default"
    );
    assert_eq!(summary["statusCode"], 0);
    assert_eq!(
        summary["name"], "b",
        "activation name is the action's last segment"
    );
    assert_eq!(annotation(summary, "path").unwrap(), "guest/pkg/b");

    let docs = app.list("docs=true&limit=2").await;
    assert_eq!(docs.as_array().unwrap().len(), 2);
    assert!(docs[0]["response"]["result"].is_object());
    assert_eq!(
        app.list("limit=2&skip=1").await[0]["activationId"],
        want[1].as_str()
    );
    assert_eq!(app.list("name=a").await.as_array().unwrap().len(), 3);
    assert_eq!(
        app.list("name=pkg/b&limit=1").await[0]["activationId"],
        want[0].as_str()
    );
    let since = ids[3].1;
    let n_since = ids.iter().filter(|(_, s)| *s >= since).count();
    assert_eq!(
        app.list(&format!("since={since}"))
            .await
            .as_array()
            .unwrap()
            .len(),
        n_since
    );
    let upto = ids[1].1;
    let n_upto = ids.iter().filter(|(_, s)| *s <= upto).count();
    assert_eq!(
        app.list(&format!("upto={upto}"))
            .await
            .as_array()
            .unwrap()
            .len(),
        n_upto
    );
    assert_eq!(app.list("name=zzz").await, json!([]));
}

#[tokio::test]
async fn restart_keeps_actions_activations_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("medes.redb");
    let (auth, id) = {
        let app = App::open(&path, ApiConfig::default());
        app.put_action("hello", hello()).await;
        let r = app.invoke("hello", "blocking=true", json!({"n": 7})).await;
        (
            app.auth.clone(),
            r.json["activationId"].as_str().unwrap().to_owned(),
        )
        // the router and store drop here; the store's writer commits what is queued
    };
    let app = App::open(&path, ApiConfig::default());
    assert_eq!(app.auth, auth, "the default key survives");
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/actions/hello", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["parameters"], hello()["parameters"]);
    let r = app
        .call(
            Method::GET,
            &format!("/api/v1/namespaces/_/activations/{id}"),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["response"]["result"]["n"], 7);
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/activations", None)
        .await;
    assert_eq!(r.json.as_array().unwrap().len(), 1);
}

/// Serves on a real socket and shuts down gracefully.
#[tokio::test]
async fn serve_and_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("db")).unwrap());
    let key = store.ensure_default_key().unwrap();
    let state = ApiState {
        store: store.clone(),
        invoker: Arc::new(TestInvoker::default()),
        metrics: None,
        config: ApiConfig::default(),
        policy: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(medes_api::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();
    let base = format!("http://{addr}/api/v1/namespaces/_/actions/hello");
    let r = client
        .put(&base)
        .basic_auth(&key.uuid, Some(&key.key))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{base}?blocking=false"))
        .basic_auth(&key.uuid, Some(&key.key))
        .json(&json!({"sleep_ms": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id: Value = r.json().await.unwrap();
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    // serve waited for the background invocation and flushed its record
    let id = medes_core::ActivationId(id["activationId"].as_str().unwrap().to_owned());
    assert!(store.get_activation(&id).unwrap().is_some());
    assert_eq!(store.activation_count().unwrap(), 1);
}

/// Prints the edge's own cost: no-op blocking invocations through a real socket with 16
/// concurrent keep-alive clients (the test invoker answers at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_invoke_throughput_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("db")).unwrap());
    let key = store.ensure_default_key().unwrap();
    let state = ApiState {
        store: store.clone(),
        invoker: Arc::new(TestInvoker::default()),
        metrics: Some(prometheus()),
        config: ApiConfig::default(),
        policy: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(medes_api::serve(listener, state, std::future::pending()));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/namespaces/_/actions/noop");
    let r = client
        .put(&url)
        .basic_auth(&key.uuid, Some(&key.key))
        .json(&json!({"exec": {"kind": "python:3", "code": "def main(a):\n    return {}\n"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let per_client = std::env::var("MEDES_API_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200usize);
    let clients = 16;
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, key) = (
            client.clone(),
            format!("{url}?blocking=true&result=true"),
            key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = std::time::Instant::now();
                let r = client
                    .post(&url)
                    .basic_auth(&key.uuid, Some(&key.key))
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        for l in t.await.unwrap() {
            h.record(l).unwrap();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = clients * per_client;
    println!(
        "api: {n} no-op blocking invokes, 16 clients: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
        n as f64 / secs,
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3
    );
    store.flush().unwrap();
    assert_eq!(store.activation_count().unwrap(), n as u64);
    server.abort();
}

#[tokio::test]
async fn medes_idle_extension_forces_decisions() {
    let app = App::new();
    for name in ["a", "b"] {
        assert_eq!(app.put_action(name, hello()).await.status, StatusCode::OK);
        let r = app.invoke(name, "blocking=true", json!({})).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    }
    let r = app
        .post("/api/v1/namespaces/_/actions/a/medes/idle", vec![])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(
        r.json,
        json!({"decided": 1, "settled": true, "sandboxes": [
            {"id": "sb-a", "action": "/guest/a", "state": "dedup"}
        ]})
    );
    let r = app
        .post("/api/v1/namespaces/guest/medes/idle", vec![])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json);
    assert_eq!(r.json["decided"], 2);
    assert_eq!(r.json["sandboxes"].as_array().unwrap().len(), 2);
    let guest = Namespace("guest".into());
    let a = ActionName {
        namespace: guest.clone(),
        name: "a".into(),
    };
    assert_eq!(
        *app.invoker.forced.lock().unwrap(),
        vec![SandboxScope::Action(a), SandboxScope::Namespace(guest)]
    );
    // Unknown action: 404; another namespace: 403; no credentials: 401. Nothing forced.
    let r = app
        .post("/api/v1/namespaces/_/actions/nope/medes/idle", vec![])
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "");
    let r = app
        .post("/api/v1/namespaces/other/medes/idle", vec![])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .raw(
            Method::POST,
            "/api/v1/namespaces/_/medes/idle",
            None,
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.invoker.forced.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn policy_knob_changes_need_an_operator_key() {
    let app = App::new();
    let tenant = ApiKey::generate(medes_core::Namespace("alice".into()), "alice");
    app.store.add_key(&tenant).unwrap();
    let auth = basic(&tenant.auth_string());
    let r = app
        .raw(
            Method::GET,
            "/api/v1/namespaces/_/medes/policy",
            Some(&auth),
            vec![],
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a tenant may read the knob: {}",
        r.json
    );
    let body = json!({"policy": "medes", "alpha": 1.5})
        .to_string()
        .into_bytes();
    let r = app
        .raw(
            Method::PUT,
            "/api/v1/namespaces/_/medes/policy",
            Some(&auth),
            body,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "operator");
    let uri = "/api/v1/namespaces/_/actions/linalg/medes/policy";
    let body = json!({"mode": "memory", "budget_mb": 512})
        .to_string()
        .into_bytes();
    let r = app.raw(Method::PUT, uri, Some(&auth), body).await;
    assert_error(&r, StatusCode::FORBIDDEN, "operator");
    let r = app.raw(Method::DELETE, uri, Some(&auth), vec![]).await;
    assert_error(&r, StatusCode::FORBIDDEN, "operator");
    // Nothing changed; the operator's (default) key still can.
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/medes/policy", None)
        .await;
    assert_eq!(r.json["policy"], "dedup-rule");
    let r = app
        .call(
            Method::PUT,
            "/api/v1/namespaces/_/medes/policy",
            Some(json!({"policy": "medes"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
}

#[tokio::test]
async fn policy_knob_base_rules_are_set_read_and_checked() {
    let app = App::new();
    let uri = "/api/v1/namespaces/_/medes/policy";
    let r = app.call(Method::GET, uri, None).await;
    assert!(
        r.json.get("bases_on_demand").is_none(),
        "off by default: {}",
        r.json
    );
    let r = app
        .call(
            Method::PUT,
            uri,
            Some(
                json!({"policy": "medes", "bases_on_demand": true, "retire_bases": true,
                        "dedup_at_keep_alive": true, "base_cost_factor": 2.5,
                        "idle_period_s": 30}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["bases_on_demand"], true);
    assert_eq!(r.json["retire_bases"], true);
    assert_eq!(r.json["dedup_at_keep_alive"], true);
    assert_eq!(r.json["base_cost_factor"], 2.5);
    assert_eq!(r.json["idle_period_s"], 30);
    // Bad values: 400 naming the field, nothing changes.
    for (bad, field) in [
        (json!({"base_cost_factor": -1}), "base_cost_factor"),
        (json!({"base_cost_factor": "two"}), "base_cost_factor"),
        (json!({"bases_on_demand": "yes"}), "bases_on_demand"),
        (json!({"idle_period_s": 0}), "idle_period_s"),
    ] {
        let r = app.call(Method::PUT, uri, Some(bad.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad} → {}", r.json);
        let msg = r.json["error"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{bad} → {msg}");
    }
    let r = app.call(Method::GET, uri, None).await;
    assert_eq!(r.json["base_cost_factor"], 2.5);
    assert_eq!(r.json["idle_period_s"], 30);
    // Switched off again: absent from the answer.
    let r = app
        .call(Method::PUT, uri, Some(json!({"bases_on_demand": false})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert!(r.json.get("bases_on_demand").is_none(), "{}", r.json);
    assert_eq!(r.json["retire_bases"], true);
}

#[tokio::test]
async fn policy_knob_global_and_per_action() {
    let app = App::new();
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/medes/policy", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["policy"], "dedup-rule");

    let r = app
        .call(
            Method::PUT,
            "/api/v1/namespaces/_/medes/policy",
            Some(json!({"policy": "medes", "mode": "latency", "alpha": 1.5, "keep_alive_s": 120})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["policy"], "medes");
    assert_eq!(r.json["mode"], "latency");
    assert_eq!(r.json["alpha"], 1.5);
    assert_eq!(r.json["keep_alive_s"], 120);
    assert_eq!(r.json["idle_period_s"], 60, "absent timers are filled in");

    // Bad values and unknown fields: 400, nothing changes.
    for bad in [
        json!({"alpha": 0.5}),
        json!({"policy": "lru"}),
        json!({"keep_alive_s": 0}),
        json!({"alpha": 2, "nonsense": 1}),
    ] {
        let r = app
            .call(
                Method::PUT,
                "/api/v1/namespaces/_/medes/policy",
                Some(bad.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad} → {}", r.json);
        assert!(r.json["error"].is_string());
    }
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/medes/policy", None)
        .await;
    assert_eq!(r.json["alpha"], 1.5);

    // Per action: set, read, in the global view, remove.
    let uri = "/api/v1/namespaces/_/actions/linalg/medes/policy";
    let r = app
        .call(
            Method::PUT,
            uri,
            Some(json!({"mode": "memory", "budget_mb": 512})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["action"], "linalg");
    assert_eq!(r.json["overrides"]["budget_mb"], 512.0);
    let r = app.call(Method::GET, uri, None).await;
    assert_eq!(r.json["overrides"]["mode"], "memory");
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/medes/policy", None)
        .await;
    assert_eq!(r.json["functions"]["linalg"]["budget_mb"], 512.0);
    let r = app.call(Method::PUT, uri, Some(json!({"alpha": -1}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.json);
    let r = app.call(Method::DELETE, uri, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["overrides"], json!({}));
    let r = app
        .call(Method::GET, "/api/v1/namespaces/_/medes/policy", None)
        .await;
    assert_eq!(r.json["functions"], json!({}));

    // Another namespace than the key's: 403; no credentials: 401.
    let r = app
        .call(Method::GET, "/api/v1/namespaces/other/medes/policy", None)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .raw(
            Method::GET,
            "/api/v1/namespaces/_/medes/policy",
            None,
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
