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

mod armed;

fn config() -> Option<SandboxConfig> {
    let cfg = SandboxConfig::default();
    match preflight(&cfg) {
        Ok(()) => {
            static CLEAN: std::sync::Once = std::sync::Once::new();
            CLEAN.call_once(|| {
                let _ = become_subreaper();
                cleanup_stale(&cfg); // leftovers of killed earlier runs
            });
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
    SandboxId(format!(
        "t{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
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
    std::fs::set_permissions(
        path.join("__main__.py"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    Action { _dir: dir, path }
}

fn spec(tag: &str, code: &Path, mb: u64) -> SandboxSpec {
    let mut env = BTreeMap::new();
    env.insert("__OW_NAMESPACE".to_string(), "guest".to_string());
    SandboxSpec {
        id: new_id(tag),
        code_dir: code.to_path_buf(),
        memory_limit: Bytes::mib(mb),
        env,
    }
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn run_req(v: Value) -> RunRequest {
    RunRequest {
        value: args(v),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(20),
    }
}

async fn started(cfg: &SandboxConfig, tag: &str, code: &Path, mb: u64) -> Sandbox {
    let sb = Sandbox::start(cfg, spec(tag, code, mb))
        .await
        .expect("start");
    let init = sb
        .init(InitRequest {
            main: "main".into(),
        })
        .await
        .expect("init");
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
    assert_eq!(
        r.result,
        json!({"greeting": "hi medes", "ns": "guest", "act": "abc"})
    );
    let texts: Vec<_> = r.logs.iter().map(|l| (l.1, l.2.as_str())).collect();
    assert!(
        texts.contains(&(Stream::Stdout, "hello medes")),
        "{texts:?}"
    );
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
    assert!(
        m.pss.0 > 1_000_000 && m.rss.0 >= m.pss.0 && m.cgroup_usage.0 > 0,
        "{m:?}"
    );
    sb.destroy().await.expect("destroy");
}

const RANDOM: &str = r#"
import random, os
state = {"n": 0}
def main(args):
    state["n"] += 1
    return {"n": state["n"], "r": random.random(), "u": os.urandom(16).hex(), "pid": os.getpid(),
            "x": args.get("x")}
"#;

#[tokio::test]
async fn checkpoint_and_two_restores_side_by_side() {
    let Some(cfg) = config() else { return };
    let a = action(RANDOM);
    let sb = started(&cfg, "ckpt", &a.path, 128).await;
    let r = sb.run(run_req(json!({"x": 1}))).await.expect("run");
    assert_eq!(r.result["n"], 1);
    let images = tempfile::tempdir().expect("tempdir");
    let info = sb
        .checkpoint(images.path(), CheckpointMode::LeaveRunning)
        .await
        .expect("dump");
    eprintln!(
        "dump (leave running): {:.1} ms, pages {}",
        info.dump_ms, info.page_image_bytes
    );
    assert!(info.page_image_bytes.0 > 1_000_000);
    // the original keeps running
    let r = sb
        .run(run_req(json!({"x": 2})))
        .await
        .expect("run after dump");
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
    assert_eq!(
        r1.result["n"], 2,
        "copy continues from the checkpointed state"
    );
    assert_eq!(r2.result["n"], 2);
    assert_eq!(r1.result["pid"], 1);
    assert_ne!(
        r1.result["r"], r2.result["r"],
        "reseeded copies must differ"
    );
    // glibc's vDSO getrandom state is part of the image: it must be invalidated per copy.
    assert_ne!(
        r1.result["u"], r2.result["u"],
        "os.urandom of two copies must differ"
    );
    let m = c1.memory().expect("memory of a copy");
    assert!(
        m.cgroup_usage.0 >= m.rss.0 / 2 && m.pss.0 > 1_000_000,
        "restored pages are charged to the copy's cgroup: {m:?}"
    );
    // A restored copy is a full sandbox: it can be checkpointed and restored again.
    let images2 = tempfile::tempdir().expect("tempdir");
    c1.checkpoint(images2.path(), CheckpointMode::LeaveRunning)
        .await
        .expect("dump of a copy");
    let c3 = Sandbox::restore(&cfg, spec("r3", &a.path, 128), images2.path())
        .await
        .expect("restore");
    let r3 = c3
        .run(run_req(json!({"x": 5})))
        .await
        .expect("run copy of copy");
    assert_eq!(r3.result["n"], 3);
    c3.destroy().await.expect("destroy");
    sb.destroy().await.expect("destroy");
    c1.destroy().await.expect("destroy");
    c2.destroy().await.expect("destroy");
}

/// `restore_with`: CRIU starts before the pages are written and waits for them; a failure to
/// produce them (or a wrong size) fails the restore and leaves nothing behind.
#[tokio::test]
async fn restore_waits_for_late_pages() {
    use std::os::unix::fs::FileExt;
    let Some(cfg) = config() else { return };
    let a = action(RANDOM);
    let sb = started(&cfg, "late", &a.path, 128).await;
    sb.run(run_req(json!({}))).await.expect("run");
    let images = tempfile::tempdir().expect("tempdir");
    sb.checkpoint(images.path(), CheckpointMode::Stop)
        .await
        .expect("dump");
    sb.destroy().await.expect("destroy");
    let saved: BTreeMap<String, Vec<u8>> = std::fs::read_dir(images.path())
        .expect("list")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .map(|e| {
            let data = std::fs::read(e.path()).expect("read pages");
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    assert!(!saved.is_empty());

    // Pages written 300 ms late: CRIU waits for them (it would restore zeros otherwise).
    let late = |files: Vec<(String, std::fs::File)>| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (name, f) in files {
            f.write_all_at(&saved[&name], 0)
                .map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    let s1 = spec("late1", &a.path, 128);
    let (c, t) = Sandbox::restore_with(&cfg, s1, images.path(), late)
        .await
        .expect("restore with late pages");
    eprintln!("late pages: {t:?}");
    assert!(
        t.images_ready_ms >= 300.0 && t.total_ms >= t.images_ready_ms,
        "{t:?}"
    );
    let r = c.run(run_req(json!({}))).await.expect("run restored");
    assert_eq!(r.result["n"], 2);
    c.destroy().await.expect("destroy");

    // Producing them fails while CRIU waits: an error, no sandbox left.
    let s2 = spec("late2", &a.path, 128);
    let run_dir = cfg.run_dir.join(&s2.id.0);
    let failing = |_files| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err("no pages today".to_string())
    };
    let e = Sandbox::restore_with(&cfg, s2, images.path(), failing)
        .await
        .expect_err("must fail");
    assert!(
        matches!(&e, RestoreError::Images { source } if source.to_string() == "no pages today"),
        "{e:?}"
    );
    assert!(!run_dir.exists(), "run directory left behind");

    // A pages file of the wrong size is refused before CRIU reads it.
    let s3 = spec("late3", &a.path, 128);
    let short = |files: Vec<(String, std::fs::File)>| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        files[0].1.set_len(4096).map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    let e = Sandbox::restore_with(&cfg, s3, images.path(), short)
        .await
        .expect_err("must fail");
    assert!(matches!(&e, RestoreError::BadImage { .. }), "{e:?}");
}

const ERRORS: &str = r#"
def main(args):
    kind = args.get("kind")
    if kind == "raise":
        raise ValueError("boom")
    if kind == "list":
        return [1, 2]
    if kind == "exit":
        raise SystemExit(3)
    if kind == "spam":
        for _ in range(12):
            print("x" * (1 << 20))
    return {"ok": True}
"#;

#[tokio::test]
async fn action_errors_are_replies_and_the_sandbox_survives() {
    let Some(cfg) = config() else { return };
    let a = action(ERRORS);
    let sb = started(&cfg, "errors", &a.path, 128).await;
    let r = sb
        .run(run_req(json!({"kind": "raise"})))
        .await
        .expect("run");
    assert_eq!(
        r.error.as_deref(),
        Some("An error has occurred: ValueError: boom")
    );
    assert!(
        r.logs
            .iter()
            .any(|l| l.1 == Stream::Stderr && l.2.contains("Traceback")),
        "{:?}",
        r.logs
    );
    let r = sb.run(run_req(json!({"kind": "list"}))).await.expect("run");
    assert_eq!(
        r.error.as_deref(),
        Some("The action did not return a dictionary.")
    );
    let r = sb.run(run_req(json!({"kind": "exit"}))).await.expect("run");
    assert!(r.error.is_some());
    let r = sb.run(run_req(json!({"kind": "spam"}))).await.expect("run");
    assert!(r.logs.len() < 12, "logs are capped");
    assert!(
        r.logs
            .last()
            .is_some_and(|l| l.2.starts_with("Logs were truncated"))
    );
    let r = sb.run(run_req(json!({}))).await.expect("run");
    assert_eq!(r.result, json!({"ok": true}));
    assert!(r.logs.is_empty(), "{:?}", r.logs.len());
    assert!(sb.is_alive());
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn init_errors_are_reported() {
    let Some(cfg) = config() else { return };
    let a = action("def main(args):\n    return {\n");
    let sb = Sandbox::start(&cfg, spec("syntax", &a.path, 128))
        .await
        .expect("start");
    let init = sb
        .init(InitRequest {
            main: "main".into(),
        })
        .await
        .expect("init");
    assert!(!init.ok);
    assert!(
        init.error.as_deref().unwrap_or("").contains("SyntaxError"),
        "{:?}",
        init.error
    );
    sb.destroy().await.expect("destroy");
    let a = action("def handler(args):\n    return {'h': 1}\n");
    let sb = Sandbox::start(&cfg, spec("entry", &a.path, 128))
        .await
        .expect("start");
    let init = sb
        .init(InitRequest {
            main: "main".into(),
        })
        .await
        .expect("init");
    assert!(!init.ok, "main does not exist");
    sb.destroy().await.expect("destroy");
    let sb = Sandbox::start(&cfg, spec("entry2", &a.path, 128))
        .await
        .expect("start");
    let init = sb
        .init(InitRequest {
            main: "handler".into(),
        })
        .await
        .expect("init");
    assert!(init.ok);
    let r = sb.run(run_req(json!({}))).await.expect("run");
    assert_eq!(r.result, json!({"h": 1}));
    sb.destroy().await.expect("destroy");
}

const ISOLATION: &str = r#"
import os, socket
def main(args):
    try:
        open("/action/x", "w").write("x")
        action_writable = True
    except OSError:
        action_writable = False
    try:
        open("/usr/x", "w").write("x")
        usr_writable = True
    except OSError:
        usr_writable = False
    status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
    procs = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    open("/tmp/scratch", "w").write("ok")
    return {
        "pid": os.getpid(), "procs": procs, "uid": os.getuid(), "gid": os.getgid(),
        "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "action_writable": action_writable, "usr_writable": usr_writable,
        "hostname": socket.gethostname(), "root": sorted(os.listdir("/")),
        "ifaces": sorted(n for _, n in socket.if_nameindex()),
        "route": open("/proc/net/route").read(),
        "shm": os.path.isdir("/dev/shm"), "sid": os.getsid(0),
    }
"#;

#[tokio::test]
async fn isolation_pid1_unprivileged_readonly_own_hostname() {
    let Some(cfg) = config() else { return };
    let a = action(ISOLATION);
    let sb = started(&cfg, "iso", &a.path, 128).await;
    let r = sb.run(run_req(json!({}))).await.expect("run");
    let v = &r.result;
    assert_eq!(r.error, None, "{:?}", r.logs);
    assert_eq!(v["pid"], 1, "runtime is PID 1 of its namespace");
    assert_eq!(v["sid"], 1, "and a session leader");
    assert_eq!(v["procs"], json!([1]), "no other process visible");
    assert_eq!(v["uid"], cfg.uid);
    assert_eq!(v["gid"], cfg.gid);
    assert_eq!(v["cap_eff"], "0000000000000000");
    assert_eq!(v["cap_bnd"], "0000000000000000");
    assert_eq!(v["no_new_privs"], "1");
    assert_eq!(v["action_writable"], false);
    assert_eq!(v["usr_writable"], false);
    assert_eq!(v["shm"], true);
    let host = nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("utf8");
    assert_ne!(v["hostname"], host.as_str());
    assert!(v["hostname"].as_str().unwrap_or("").starts_with("sb-"));
    let root: Vec<&str> = v["root"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        !root.contains(&"home") && !root.contains(&"root") && !root.contains(&"var"),
        "{root:?}"
    );
    // Outbound mode: eth0 with a default route (destination 00000000).
    assert!(
        v["ifaces"]
            .as_array()
            .expect("list")
            .contains(&json!("eth0")),
        "{v}"
    );
    assert!(
        v["route"].as_str().unwrap_or("").contains("eth0\t00000000"),
        "{}",
        v["route"]
    );
    sb.destroy().await.expect("destroy");

    let iso = SandboxConfig {
        network: NetworkMode::Isolated,
        ..cfg.clone()
    };
    let sb = started(&iso, "isonet", &a.path, 128).await;
    let r = sb.run(run_req(json!({}))).await.expect("run");
    assert_eq!(r.result["ifaces"], json!(["lo"]));
    sb.destroy().await.expect("destroy");
}

const OUTBOUND: &str = r#"
import socket
def main(args):
    s = socket.create_connection((args["host"], args["port"]), timeout=args.get("t", 3))
    s.close()
    return {"connected": True}
"#;

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// A fake "other host": a network namespace behind a veth pair, routed from the host. The
/// sandbox reaches it through the host's forwarding and NAT, like any outside service.
struct ExtHost {
    ns: String,
    addr: String,
    host_side: String,
}

impl ExtHost {
    fn new() -> ExtHost {
        let n = std::process::id() % 250;
        let ns = format!("medes-test-ext-{}", std::process::id());
        let veth = format!("mdx{}", std::process::id() % 100_000);
        let (host_side, addr) = (format!("198.18.{n}.1"), format!("198.18.{n}.2"));
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_side}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &host_side]);
        ExtHost {
            ns,
            addr,
            host_side,
        }
    }

    /// Accepts one TCP connection inside the namespace; returns the peer address it saw.
    fn accept_one(&self) -> (u16, std::thread::JoinHandle<Option<std::net::SocketAddr>>) {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns)).expect("open netns");
        let addr = self.addr.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let l = std::net::TcpListener::bind((addr.as_str(), 0)).expect("bind");
            tx.send(l.local_addr().expect("addr").port()).expect("send");
            l.set_nonblocking(true).expect("nonblocking");
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok((_, peer)) = l.accept() {
                    return Some(peer);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        });
        (rx.recv().expect("port"), h)
    }
}

impl Drop for ExtHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[tokio::test]
async fn outbound_network_goes_through_nat_and_host_services_are_closed() {
    let Some(cfg) = config() else { return };
    let ext = ExtHost::new();
    let (port, seen) = ext.accept_one();
    let a = action(OUTBOUND);
    let sb = started(&cfg, "out", &a.path, 128).await;
    let r = sb
        .run(run_req(json!({"host": ext.addr, "port": port})))
        .await
        .expect("run");
    assert_eq!(
        r.result,
        json!({"connected": true}),
        "{:?} {:?}",
        r.error,
        r.logs
    );
    let peer = seen.join().expect("join").expect("a connection arrived");
    assert_eq!(
        peer.ip().to_string(),
        ext.host_side,
        "source is masqueraded to the host"
    );
    // A service on the host itself is not reachable from sandboxes.
    let l = std::net::TcpListener::bind(("0.0.0.0", 0)).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let r = sb
        .run(run_req(
            json!({"host": ext.host_side, "port": port, "t": 0.5}),
        ))
        .await
        .expect("run");
    assert!(
        r.error.is_some(),
        "sandbox reached a host service: {:?}",
        r.result
    );
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn memory_limit_kills_with_out_of_memory() {
    let Some(cfg) = config() else { return };
    let a = action(
        "def main(args):\n    x = bytearray(args['mb'] * 1024 * 1024)\n    return {'n': len(x)}\n",
    );
    let sb = started(&cfg, "oom", &a.path, 64).await;
    let r = sb
        .run(run_req(json!({"mb": 8})))
        .await
        .expect("small allocation");
    assert_eq!(r.result["n"], 8 * 1024 * 1024);
    let e = sb
        .run(run_req(json!({"mb": 200})))
        .await
        .expect_err("must fail");
    assert!(matches!(e, RunError::OutOfMemory { .. }), "{e:?}");
    assert!(!sb.is_alive());
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn timeout_kills_the_sandbox() {
    let Some(cfg) = config() else { return };
    let a = action("import time\ndef main(args):\n    time.sleep(30)\n    return {}\n");
    let sb = started(&cfg, "timeout", &a.path, 64).await;
    let mut req = run_req(json!({}));
    req.timeout = Duration::from_millis(300);
    let t0 = std::time::Instant::now();
    let e = sb.run(req).await.expect_err("must time out");
    assert!(matches!(e, RunError::Timeout { .. }), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sb.is_alive());
    assert!(matches!(
        sb.run(run_req(json!({}))).await,
        Err(RunError::NotRunning)
    ));
    sb.destroy().await.expect("destroy");
}

const POOL: &str = r#"
import multiprocessing as mp
def square(x):
    return x * x
pool = mp.Pool(2)  # at import time: the workers exist when the sandbox is checkpointed
def main(args):
    n = args.get("n", 10)
    return {"sum": sum(pool.map(square, range(n)))}
"#;

#[tokio::test]
async fn multiprocessing_pool_survives_checkpoint_restore() {
    let Some(cfg) = config() else { return };
    let a = action(POOL);
    let sb = started(&cfg, "pool", &a.path, 256).await;
    let r = sb.run(run_req(json!({"n": 100}))).await.expect("run");
    assert_eq!(r.result["sum"], 328350, "{:?} {:?}", r.error, r.logs);
    let images = tempfile::tempdir().expect("tempdir");
    let info = sb
        .checkpoint(images.path(), CheckpointMode::Stop)
        .await
        .expect("dump");
    eprintln!(
        "pool dump (stop): {:.1} ms, pages {}",
        info.dump_ms, info.page_image_bytes
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!sb.is_alive(), "Stop mode kills the original");
    sb.destroy().await.expect("destroy");
    let c = Sandbox::restore(&cfg, spec("poolr", &a.path, 256), images.path())
        .await
        .expect("restore");
    let r = c
        .run(run_req(json!({"n": 10})))
        .await
        .expect("run restored");
    assert_eq!(r.result["sum"], 285);
    c.destroy().await.expect("destroy");
}

#[tokio::test]
async fn bad_specs_and_images_are_rejected() {
    let Some(cfg) = config() else { return };
    let a = action(HELLO);
    let mut s = spec("x", &a.path, 64);
    s.id = SandboxId("../evil".into());
    assert!(matches!(
        Sandbox::start(&cfg, s).await,
        Err(StartError::InvalidSpec { .. })
    ));
    let s = spec("nodir", Path::new("/nonexistent/code"), 64);
    assert!(matches!(
        Sandbox::start(&cfg, s).await,
        Err(StartError::InvalidSpec { .. })
    ));
    let empty = tempfile::tempdir().expect("tempdir");
    let r = Sandbox::restore(&cfg, spec("noimg", &a.path, 64), empty.path()).await;
    assert!(matches!(r, Err(RestoreError::BadImage { .. })), "{r:?}");
    // A truncated pages file is caught before CRIU runs (CRIU would hang on it).
    let sb = started(&cfg, "trunc", &a.path, 128).await;
    let images = tempfile::tempdir().expect("tempdir");
    sb.checkpoint(images.path(), CheckpointMode::LeaveRunning)
        .await
        .expect("dump");
    sb.destroy().await.expect("destroy");
    let pages = std::fs::read_dir(images.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .expect("pages image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pages.path())
        .expect("open");
    f.set_len(4096).expect("truncate");
    let r = Sandbox::restore(&cfg, spec("trunc2", &a.path, 64), images.path()).await;
    assert!(matches!(r, Err(RestoreError::BadImage { .. })), "{r:?}");
}

#[tokio::test]
async fn concurrent_runs_in_one_sandbox() {
    let Some(cfg) = config() else { return };
    let a = action(
        "import time\ndef main(args):\n    time.sleep(0.4)\n    print('run', args['i'])\n    return {'i': args['i']}\n",
    );
    let sb = started(&cfg, "conc", &a.path, 128).await;
    let t0 = std::time::Instant::now();
    let replies = futures::future::join_all((0..4).map(|i| sb.run(run_req(json!({"i": i}))))).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1400),
        "runs were serialised: {:?}",
        t0.elapsed()
    );
    for (i, r) in replies.into_iter().enumerate() {
        let r = r.expect("run");
        assert_eq!(r.result["i"], i);
        assert!(
            r.logs.iter().any(|l| l.2 == format!("run {i}")),
            "{:?}",
            r.logs
        );
    }
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn stale_sandboxes_of_dead_owners_are_cleaned_up() {
    let Some(cfg) = config() else { return };
    let a = action(HELLO);
    let sb = started(&cfg, "stale", &a.path, 64).await;
    let dir = cfg.run_dir.join(&sb.id().0);
    // Pretend the owner died: a pid that exited.
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let dead = child.id();
    child.wait().expect("wait");
    std::fs::write(dir.join("owner"), format!("{dead} 1")).expect("write owner");
    let pid = sb.pid();
    assert!(cleanup_stale(&cfg) >= 1);
    assert!(!dir.exists());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sb.is_alive(), "process {pid} must be gone");
    sb.destroy()
        .await
        .expect("destroy after cleanup is harmless");
}
