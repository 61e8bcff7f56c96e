//! The client, suite and replayer against a tiny in-process OpenWhisk-shaped server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use medes_trace::{Trace, TraceEntry};
use medes_workload::client::ActionSpec;
use medes_workload::{
    Client, ClientConfig, Manifest, ReplayOptions, RunOptions, deploy, replay, run, write_outputs,
};
use serde_json::{Value, json};

#[derive(Default)]
struct Fake {
    actions: HashMap<String, ActionSpec>,
    warm: HashMap<String, bool>,
    pending: HashMap<String, Value>,
    n: u64,
}
type S = Arc<Mutex<Fake>>;

fn record(id: &str, name: &str, kind: &str, status: &str, result: Value) -> Value {
    let mut ann = vec![
        json!({"key": "startKind", "value": kind}),
        json!({"key": "waitTime", "value": 3}),
    ];
    if kind == "cold" {
        ann.push(json!({"key": "initTime", "value": 120}));
    }
    json!({"activationId": id, "name": name, "start": 1, "end": 11, "duration": 10,
           "response": {"status": status, "statusCode": if status == "success" {0} else {1},
                        "success": status == "success", "result": result},
           "annotations": ann})
}

async fn put_action(
    State(s): State<S>,
    Path(name): Path<String>,
    Json(spec): Json<ActionSpec>,
) -> Json<Value> {
    let mut f = s.lock().unwrap();
    f.actions.insert(name.clone(), spec);
    f.warm.remove(&name);
    Json(json!({"name": name, "version": "0.0.1"}))
}

async fn list(State(s): State<S>) -> Json<Value> {
    let f = s.lock().unwrap();
    let mut v: Vec<Value> = f
        .actions
        .keys()
        .map(|k| json!({"name": k, "namespace": "guest", "version": "0.0.1"}))
        .collect();
    v.sort_by_key(|x| x["name"].as_str().unwrap_or("").to_string());
    Json(Value::Array(v))
}

async fn invoke(
    State(s): State<S>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Json(params): Json<Value>,
) -> (StatusCode, Json<Value>) {
    assert_eq!(q.get("blocking").map(String::as_str), Some("true"));
    let mut f = s.lock().unwrap();
    f.n += 1;
    let id = format!("{:032x}", f.n);
    match name.as_str() {
        "missing" => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "The requested resource does not exist.", "code": "abc"})),
            );
        }
        "fail" => {
            return (
                StatusCode::BAD_GATEWAY,
                Json(record(
                    &id,
                    &name,
                    "warm",
                    "application error",
                    json!({"error": "boom"}),
                )),
            );
        }
        "slow" => {
            let r = record(&id, &name, "cold", "success", json!({"late": true}));
            f.pending.insert(id.clone(), r);
            return (StatusCode::ACCEPTED, Json(json!({"activationId": id})));
        }
        _ => {}
    }
    let kind = if f.warm.insert(name.clone(), true).is_some() {
        "warm"
    } else {
        "cold"
    };
    // Echo: a "result" param is returned as the result (lets the suite's check be exercised).
    let result = params.get("echo").cloned().unwrap_or(json!({"ok": true}));
    (
        StatusCode::OK,
        Json(record(&id, &name, kind, "success", result)),
    )
}

async fn get_activation(State(s): State<S>, Path(id): Path<String>) -> (StatusCode, Json<Value>) {
    let f = s.lock().unwrap();
    match f.pending.get(&id) {
        Some(r) => (StatusCode::OK, Json(r.clone())),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))),
    }
}

async fn start() -> (Client, S) {
    let s: S = Arc::default();
    let app = Router::new()
        .route("/api/v1/namespaces/_/actions", get(list))
        .route(
            "/api/v1/namespaces/_/actions/{name}",
            post(invoke).put(put_action),
        )
        .route("/api/v1/namespaces/_/activations/{id}", get(get_activation))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Client::new(&ClientConfig::new(format!("http://{addr}"), "u:k")).unwrap();
    (client, s)
}

fn functions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../functions")
}

#[tokio::test]
async fn suite_deploys_the_ten_functions_with_manifest_limits() {
    let (client, s) = start().await;
    let manifest = Manifest::load(&functions_dir()).unwrap();
    assert_eq!(manifest.names().len(), 10);
    assert_eq!(manifest.names()[0], "vanilla");
    let reports = deploy(&client, &functions_dir(), &manifest, &[]).await;
    assert!(reports.iter().all(|r| r.result.is_ok()), "{reports:?}");
    {
        let f = s.lock().unwrap();
        assert_eq!(f.actions.len(), 10);
        let m = &f.actions["mapreduce"];
        assert_eq!(m.exec.kind, "python:3");
        assert!(!m.exec.binary);
        assert!(m.exec.code.contains("def main(args)"));
        assert_eq!(m.limits.memory, manifest.functions["mapreduce"].memory_mb);
        assert_eq!(m.limits.timeout, manifest.functions["mapreduce"].timeout_ms);
    }
    let listed = client.list_actions().await.unwrap();
    assert_eq!(listed.len(), 10);

    // The fake returns {"ok": true}: the run must flag the missing keys, and see cold then warm.
    let reports = run(
        &client,
        &manifest,
        &["authenc".to_string()],
        &RunOptions::default(),
    )
    .await;
    let r = &reports[0];
    assert!(!r.passed());
    assert_eq!(r.calls.len(), 3);
    assert_eq!(r.calls[0].start_kind, "cold");
    assert_eq!(r.calls[0].init_ms, Some(120.0));
    assert_eq!(r.calls[1].start_kind, "warm");
    assert!(
        r.calls[0]
            .problems
            .iter()
            .any(|p| p.contains("missing key"))
    );
}

#[tokio::test]
async fn multi_file_actions_are_zipped() {
    let dir = tempfile::tempdir().unwrap();
    let fdir = dir.path().join("two");
    std::fs::create_dir_all(fdir.join("__pycache__")).unwrap();
    std::fs::write(
        fdir.join("__main__.py"),
        "from helper import x\ndef main(a):\n    return {'x': x}\n",
    )
    .unwrap();
    std::fs::write(fdir.join("helper.py"), "x = 1\n").unwrap();
    std::fs::write(fdir.join("__pycache__/junk.pyc"), "junk").unwrap();
    let spec: medes_workload::FunctionSpec =
        toml::from_str("memory_mb = 128\ntimeout_ms = 1000\n").unwrap();
    let a = medes_workload::suite::action_spec(dir.path(), "two", &spec).unwrap();
    assert!(a.exec.binary);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&a.exec.code)
        .unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut names: Vec<String> = (0..z.len())
        .map(|i| z.by_index(i).unwrap().name().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["__main__.py", "helper.py"]);
    std::fs::remove_file(fdir.join("__main__.py")).unwrap();
    assert!(medes_workload::suite::action_spec(dir.path(), "two", &spec).is_err());
}

#[tokio::test]
async fn replay_records_every_row_and_measures_lateness() {
    let (client, _s) = start().await;
    let mut entries = Vec::new();
    let names = ["vanilla", "linalg", "fail", "missing", "slow"];
    for i in 0..200u64 {
        let name = names[(i % 5) as usize];
        entries.push(TraceEntry {
            time_ms: i * 10,
            function: name.into(),
            params: None,
        });
    }
    let trace = Trace::new(entries);
    let opts = ReplayOptions {
        speed: 2.0,
        ..Default::default()
    };
    let out = replay(&client, &trace, &opts, false).await.unwrap();
    let s = &out.summary;
    println!("{s}");
    assert_eq!(s.recorded, 200);
    assert_eq!(out.records.len(), 200);
    assert_eq!(s.succeeded, 120);
    assert_eq!(s.failed_activations, 40);
    assert_eq!(s.http_errors, 40);
    assert_eq!(s.transport_errors + s.unfinished, 0);
    assert_eq!(s.start_kinds["cold"], 2 + 40);
    let r = &out.records[3];
    assert_eq!(
        (r.function.as_str(), r.status.as_str(), r.http_status),
        ("missing", "http error", Some(404))
    );
    assert!(r.error.contains("does not exist"), "{}", r.error);
    let r = &out.records[2];
    assert_eq!(
        (r.status.as_str(), r.error.as_str()),
        ("application error", "boom")
    );
    // Speed 2: row i is due at i*5 ms; each send is measured against it.
    for r in &out.records {
        assert!((r.target_ms - r.scheduled_ms as f64 / 2.0).abs() < 1e-9);
        assert!(r.lateness_ms >= 0.0 && r.lateness_ms.is_finite());
    }
    assert!(s.wall_s >= 0.99 / 2.0 * 1.0);
    let dir = tempfile::tempdir().unwrap();
    let (csv_path, json_path) = write_outputs(dir.path(), &out).unwrap();
    let text = std::fs::read_to_string(csv_path).unwrap();
    assert_eq!(text.lines().count(), 201);
    assert!(text.starts_with(
        "index,function,scheduled_ms,target_ms,sent_ms,lateness_ms,latency_ms,start_kind,status"
    ));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    assert_eq!(v["recorded"], 200);
}

#[tokio::test]
async fn unreachable_api_is_recorded_not_fatal() {
    let client = Client::new(&ClientConfig::new("http://127.0.0.1:9", "u:k")).unwrap();
    let trace = Trace::new(vec![TraceEntry {
        time_ms: 0,
        function: "vanilla".into(),
        params: None,
    }]);
    let out = replay(&client, &trace, &ReplayOptions::default(), false)
        .await
        .unwrap();
    assert_eq!(out.summary.transport_errors, 1);
    assert!(Client::new(&ClientConfig::new("http://x", "nocolon")).is_err());
    assert!(Client::new(&ClientConfig::new("ftp://x", "u:k")).is_err());
}
