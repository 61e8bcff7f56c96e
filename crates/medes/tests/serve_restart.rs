//! `medes serve` restarted on the same data directory keeps its dedup sandboxes (issue 5): the
//! first call after the restart is a dedup start with the right result. Runs the real binary
//! (root, namespaces, cgroups, CRIU); skipped with a message when the host cannot run
//! sandboxes, unless `CI=true`, where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use medes_workload::{Client, ClientConfig, Invoked, Manifest};
use serde_json::Value;

fn functions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../functions")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct Serve {
    child: Child,
}

impl Serve {
    fn start(cfg: &Path, log: &Path, url: &str) -> Serve {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_medes"))
            .args(["serve", "-c"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("medes serve");
        let serve = Serve { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if http::blocking_get_ok(&format!("{url}/health")) {
                return serve;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("medes serve did not come up");
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "medes serve exited with {status}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking GET over std (the test has no blocking HTTP client).
mod http {
    use std::io::{Read, Write};
    pub fn blocking_get_ok(url: &str) -> bool {
        let Some(rest) = url.strip_prefix("http://") else {
            return false;
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(mut s) = std::net::TcpStream::connect(host) else {
            return false;
        };
        let req = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
    }
}

async fn call(client: &Client, params: &serde_json::Map<String, Value>) -> (String, Value) {
    match client
        .invoke("vanilla", params, true)
        .await
        .expect("invoke")
    {
        Invoked::Completed { record, .. } => {
            assert!(record.succeeded(), "{:?}", record.response);
            (record.start_kind(), record.response.result.clone())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dedup_sandboxes_survive_a_serve_restart() {
    let sandbox = medes_sandbox::SandboxConfig::default();
    if let Err(e) = medes_sandbox::preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the serve restart test cannot run in CI: {e}");
        }
        eprintln!("skipping the serve restart test: {e}");
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let tag = format!("rst{}", std::process::id());
    let cfg = data.path().join("medes.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nlog = \"info\"\n[api]\nlisten = \"127.0.0.1:{port}\"\n\
             [controller]\nidle_period_s = 3600\nkeep_alive_s = 7200\nkeep_dedup_s = 3600\n\
             [agent.sandbox]\ncgroup_name = \"medes-{tag}\"\nrun_dir = \"/run/medes/{tag}\"\n",
            data.path()
        ),
    )
    .expect("config");
    let log = data.path().join("serve.log");
    let manifest = Manifest::load(&functions_dir()).expect("manifest");
    let spec = manifest.functions["vanilla"].clone();
    let rt = tokio::runtime::Runtime::new().expect("tokio");

    let serve = Serve::start(&cfg, &log, &url);
    let auth = std::fs::read_to_string(data.path().join("auth.key")).expect("auth key");
    let client = Client::new(&ClientConfig::new(&url, auth.trim())).expect("client");
    let first = rt.block_on(async {
        let d =
            medes_workload::deploy(&client, &functions_dir(), &manifest, &["vanilla".into()]).await;
        assert!(d[0].result.is_ok(), "{:?}", d[0].result);
        // Two sandboxes at once, then the idle decision: a base and a dedup sandbox.
        let (a, b) = tokio::join!(call(&client, &spec.params), call(&client, &spec.params));
        assert_eq!((a.0.as_str(), b.0.as_str()), ("cold", "cold"));
        let http = reqwest_client();
        let (user, key) = auth.trim().split_once(':').expect("uuid:key");
        let idle: Value = http
            .post(format!("{url}/api/v1/namespaces/_/medes/idle"))
            .basic_auth(user, Some(key))
            .send()
            .await
            .expect("idle")
            .json()
            .await
            .expect("json");
        let states: Vec<&str> = idle["sandboxes"]
            .as_array()
            .expect("sandboxes")
            .iter()
            .filter_map(|s| s["state"].as_str())
            .collect();
        assert!(
            states.contains(&"dedup") && states.contains(&"base"),
            "{idle}"
        );
        a.1
    });
    assert!(medes_workload::check_result(&spec, &first).is_empty());
    serve.stop();

    let serve = Serve::start(&cfg, &log, &url);
    let (kind, result) = rt.block_on(call(&client, &spec.params));
    serve.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(kind, "dedup", "the first call after the restart\n{text}");
    assert!(
        medes_workload::check_result(&spec, &result).is_empty(),
        "{result}"
    );
    assert_eq!(result["value"], first["value"]);
    assert!(text.contains("resumes as DEDUP"), "{text}");
    // The instance's own parent cgroup went with it.
    for c in ["memory", "pids"] {
        let p = Path::new("/sys/fs/cgroup")
            .join(c)
            .join(format!("medes-{tag}"));
        assert!(!p.exists(), "{p:?} left behind");
    }

    // Leave nothing on the tmpfs.
    if let Ok(rd) = std::fs::read_dir("/run/medes/images") {
        for e in rd.flatten() {
            let owner = std::fs::read_to_string(e.path().join("data_dir")).unwrap_or_default();
            if Path::new(owner.trim()) == data.path() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::new()
}
