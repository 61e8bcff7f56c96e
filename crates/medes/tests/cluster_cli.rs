//! `medes cluster up / status / down` (issue 7): two namespaced hosts with real agents, an
//! invocation through the printed endpoint, a refused second `up`, an agent "crash" seen by
//! `status`, and a `down` that leaves nothing behind. Skipped with a message when the host
//! cannot run sandboxes, unless `CI=true`, where that is a failure.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use medes_workload::{Client, ClientConfig, Invoked};
use serde_json::{Map, Value, json};

fn can_run() -> bool {
    match medes_sandbox::preflight(&medes_sandbox::SandboxConfig::default()) {
        Ok(()) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the cluster command test cannot run in CI: {e}")
        }
        Err(e) => {
            eprintln!("skipping the cluster command test: {e}");
            false
        }
    }
}

fn medes(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medes"))
        .args(["cluster"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("medes cluster")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `down --purge` when dropped (a failed assertion must not leave the cluster up).
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = medes(&["down", "--purge", "--grace-s", "10"], self.0);
    }
}

#[test]
fn cluster_up_serves_and_down_removes_everything() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cluster");
    let tag = format!("cc{}", std::process::id());
    let cfg = tmp.path().join("medes.toml");
    std::fs::write(
        &cfg,
        format!("[agent.sandbox]\ncgroup_name = \"medes-{tag}\"\nrun_dir = \"/run/medes/{tag}\"\n"),
    )
    .expect("config");
    let cfg = cfg.to_str().expect("utf-8 path");

    let up = medes(
        &[
            "up",
            "--nodes",
            "2",
            "--node-budget-mb",
            "1024",
            "--config",
            cfg,
        ],
        &dir,
    );
    let _down = Down(&dir);
    assert!(up.status.success(), "{}", text(&up));
    let out = text(&up);
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).expect("state file"))
            .expect("state json");
    let url = state["url"].as_str().expect("url").to_string();
    assert!(out.contains(&url), "{out}");
    let bed = state["bed"].as_u64().expect("bed");
    assert!(Path::new(&format!("/run/netns/mtb{bed}h1")).exists());
    // Each agent serves at its own host's address.
    let agents = state["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 2);
    assert_eq!(agents[0]["address"], json!(format!("10.77.{bed}.2:3241")));
    assert_eq!(agents[1]["address"], json!(format!("10.77.{bed}.3:3241")));

    // A second `up` in the same directory is refused while this one runs.
    let again = medes(&["up", "--nodes", "1"], &dir);
    assert!(!again.status.success());
    assert!(text(&again).contains("already up"), "{}", text(&again));

    // The printed endpoint serves an action.
    let auth = std::fs::read_to_string(dir.join("controller").join("auth.key")).expect("auth");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (user, key) = auth.trim().split_once(':').expect("uuid:key");
        let r = reqwest::Client::new()
            .put(format!("{url}/api/v1/namespaces/_/actions/hi"))
            .basic_auth(user, Some(key))
            .json(&json!({"exec": {"kind": "python:3",
                "code": "def main(a):\n    return {\"hi\": a.get(\"who\")}"}}))
            .send()
            .await
            .expect("deploy");
        assert!(r.status().is_success(), "{}", r.status());
        let client = Client::new(&ClientConfig::new(&url, auth.trim())).expect("client");
        let mut params = Map::new();
        params.insert("who".into(), json!("cluster"));
        match client.invoke("hi", &params, true).await.expect("invoke") {
            Invoked::Completed { record, .. } => {
                assert!(record.succeeded(), "{:?}", record.response);
                assert_eq!(record.response.result, json!({"hi": "cluster"}));
            }
            other => panic!("{other:?}"),
        }
    });
    let status = medes(&["status"], &dir);
    assert!(status.status.success(), "{}", text(&status));

    // Faults by hand: a partition shows in the hosts' drop sets, a link goes down and up.
    let cut_set = |host: u64| {
        let o = Command::new("ip")
            .args(["netns", "exec", &format!("mtb{bed}h{host}")])
            .args(["nft", "list", "set", "inet", "medes_testbed", "cut"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let p = medes(&["partition", "node-0", "node-1"], &dir);
    assert!(p.status.success(), "{}", text(&p));
    assert!(
        cut_set(0).contains(&format!("10.77.{bed}.3")),
        "{}",
        cut_set(0)
    );
    assert!(
        cut_set(1).contains(&format!("10.77.{bed}.2")),
        "{}",
        cut_set(1)
    );
    let h = medes(&["heal", "node-0", "node-1"], &dir);
    assert!(h.status.success(), "{}", text(&h));
    assert!(
        !cut_set(0).contains(&format!("10.77.{bed}.3")),
        "{}",
        cut_set(0)
    );
    for state in ["down", "up"] {
        let l = medes(&["link", "node-1", state], &dir);
        assert!(l.status.success(), "{}", text(&l));
    }
    let bad = medes(&["partition", "node-0", "node-7"], &dir);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("no node node-7"), "{}", text(&bad));

    // An agent dies: `status` says so, `down` still cleans up everything.
    let pid = agents[1]["pid"].as_i64().expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    std::thread::sleep(Duration::from_millis(200));
    let status = medes(&["status"], &dir);
    assert!(!status.status.success());
    assert!(text(&status).contains("gone"), "{}", text(&status));

    let down = medes(&["down", "--purge"], &dir);
    assert!(down.status.success(), "{}", text(&down));
    assert!(!dir.join("cluster.json").exists());
    assert!(!Path::new(&format!("/run/netns/mtb{bed}h0")).exists());
    assert!(!Path::new(&format!("/sys/class/net/mtb{bed}br")).exists());
    for a in agents.iter().chain([&state["controller"]]) {
        let pid = a["pid"].as_u64().expect("pid");
        let start = a["start"].as_u64().expect("start");
        let now = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(19).map(str::to_string))
            });
        assert_ne!(now, Some(start.to_string()), "{} still runs", a["name"]);
    }
    // `down` again: nothing recorded, nothing to do.
    let again = medes(&["down"], &dir);
    assert!(again.status.success(), "{}", text(&again));

    // The sandboxes' parent cgroups of this test.
    let sandbox_cfg = medes_sandbox::SandboxConfig {
        cgroup_name: format!("medes-{tag}"),
        run_dir: format!("/run/medes/{tag}").into(),
        ..Default::default()
    };
    medes_sandbox::cleanup_stale(&sandbox_cfg);
    let _ = nix::mount::umount2(&sandbox_cfg.run_dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&sandbox_cfg.run_dir);
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for c in rd.flatten() {
            let _ = std::fs::remove_dir(c.path().join(&sandbox_cfg.cgroup_name));
        }
    }
}
