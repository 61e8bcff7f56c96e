//! Integration tests: real sandboxes, real CRIU. Need root; skipped (with a message) when not
//! root or CRIU is missing, unless `CI=true`, where that is a failure.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use medes_core::{Bytes, SandboxId};
use medes_sandbox::*;
use serde_json::{Value, json};

fn config() -> Option<SandboxConfig> {
    let cfg = SandboxConfig::default();
    match preflight(&cfg) {
        Ok(()) => {
            let _ = become_subreaper();
            Some(cfg)
        }
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("sandbox tests cannot run in CI: {e}")
        }
        Err(e) => {
            eprintln!("skipping sandbox test: {e}");
            None
        }
    }
}

static N: AtomicU32 = AtomicU32::new(0);

fn new_id(tag: &str) -> SandboxId {
    SandboxId(format!("t{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

struct Action {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn action(code: &str) -> Action {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    std::fs::write(path.join("__main__.py"), code).expect("write code");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(path.join("__main__.py"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    Action { _dir: dir, path }
}

fn spec(tag: &str, code: &Path, mb: u64) -> SandboxSpec {
    let mut env = BTreeMap::new();
    env.insert("__OW_NAMESPACE".to_string(), "guest".to_string());
    SandboxSpec { id: new_id(tag), code_dir: code.to_path_buf(), memory_limit: Bytes::mib(mb), env }
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn run_req(v: Value) -> RunRequest {
    RunRequest { value: args(v), env: BTreeMap::new(), timeout: Duration::from_secs(20) }
}

async fn started(cfg: &SandboxConfig, tag: &str, code: &Path, mb: u64) -> Sandbox {
    let sb = Sandbox::start(cfg, spec(tag, code, mb)).await.expect("start");
    let init = sb.init(InitRequest { main: "main".into() }).await.expect("init");
    assert!(init.ok, "init failed: {:?} {:?}", init.error, init.logs);
    sb
}

const HELLO: &str = r#"
import os, sys
def main(args):
    print("hello", args.get("name"))
    print("to stderr", file=sys.stderr)
    os.system("echo from-child")
    return {"greeting": "hi " + str(args.get("name")), "ns": os.environ.get("__OW_NAMESPACE"),
            "act": os.environ.get("__OW_ACTIVATION_ID")}
"#;

#[tokio::test]
async fn start_init_run_with_logs() {
    let Some(cfg) = config() else { return };
    let a = action(HELLO);
    let sb = started(&cfg, "hello", &a.path, 128).await;
    let mut req = run_req(json!({"name": "medes"}));
    req.env.insert("__OW_ACTIVATION_ID".into(), "abc".into());
    let r = sb.run(req).await.expect("run");
    assert_eq!(r.error, None);
    assert_eq!(r.result, json!({"greeting": "hi medes", "ns": "guest", "act": "abc"}));
    let texts: Vec<_> = r.logs.iter().map(|l| (l.1, l.2.as_str())).collect();
    assert!(texts.contains(&(Stream::Stdout, "hello medes")), "{texts:?}");
    assert!(texts.contains(&(Stream::Stderr, "to stderr")), "{texts:?}");
    assert!(texts.contains(&(Stream::Stdout, "from-child")), "{texts:?}");
    assert!(r.main_ms > 0.0);
    // warm runs
    let t0 = std::time::Instant::now();
    for i in 0..20 {
        let r = sb.run(run_req(json!({"name": i}))).await.expect("run");
        assert_eq!(r.result["greeting"], format!("hi {i}"));
    }
    eprintln!("warm run with logs: {:?} avg", t0.elapsed() / 20);
    let m = sb.memory().expect("memory");
    assert!(m.pss.0 > 1_000_000 && m.rss.0 >= m.pss.0 && m.cgroup_usage.0 > 0, "{m:?}");
    sb.destroy().await.expect("destroy");
}

const RANDOM: &str = r#"
import random, os
state = {"n": 0}
def main(args):
    state["n"] += 1
    return {"n": state["n"], "r": random.random(), "pid": os.getpid(), "x": args.get("x")}
"#;

#[tokio::test]
async fn checkpoint_and_two_restores_side_by_side() {
    let Some(cfg) = config() else { return };
    let a = action(RANDOM);
    let sb = started(&cfg, "ckpt", &a.path, 128).await;
    let r = sb.run(run_req(json!({"x": 1}))).await.expect("run");
    assert_eq!(r.result["n"], 1);
    let images = tempfile::tempdir().expect("tempdir");
    let info = sb.checkpoint(images.path(), CheckpointMode::LeaveRunning).await.expect("dump");
    eprintln!("dump (leave running): {:.1} ms, pages {}", info.dump_ms, info.page_image_bytes);
    assert!(info.page_image_bytes.0 > 1_000_000);
    // the original keeps running
    let r = sb.run(run_req(json!({"x": 2}))).await.expect("run after dump");
    assert_eq!(r.result["n"], 2);
    let t0 = std::time::Instant::now();
    let (c1, c2) = tokio::join!(
        Sandbox::restore(&cfg, spec("r1", &a.path, 128), images.path()),
        Sandbox::restore(&cfg, spec("r2", &a.path, 128), images.path()),
    );
    eprintln!("two concurrent restores: {:?}", t0.elapsed());
    let (c1, c2) = (c1.expect("restore 1"), c2.expect("restore 2"));
    let r1 = c1.run(run_req(json!({"x": 3}))).await.expect("run copy 1");
    let r2 = c2.run(run_req(json!({"x": 4}))).await.expect("run copy 2");
    assert_eq!(r1.result["n"], 2, "copy continues from the checkpointed state");
    assert_eq!(r2.result["n"], 2);
    assert_eq!(r1.result["pid"], 1);
    assert_ne!(r1.result["r"], r2.result["r"], "reseeded copies must differ");
    sb.destroy().await.expect("destroy");
    c1.destroy().await.expect("destroy");
    c2.destroy().await.expect("destroy");
}
