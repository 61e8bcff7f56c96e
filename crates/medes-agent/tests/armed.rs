//! Armed dedup sandboxes (`[agent] armed_per_function`, `armed.rs`) over real sandboxes and
//! CRIU: after a dedup the agent restores the sandbox lazily ahead of its request, left
//! stopped; a dedup start then only resumes it.
//! - an armed start gives the warm sandbox's results with fresh randomness, a restore racing
//!   an arm in flight joins it, only a function's newest dedup sandbox stays armed, and a
//!   purge or the shutdown leaves nothing of an armed tree behind (no process, cgroup,
//!   network namespace or files);
//! - a base or store corrupted after the sandbox was armed fails the start (the controller
//!   falls back to a cold start), never a wrong process;
//! - the armed sandbox holds no copy of the store's page data (only its metadata), and a
//!   store file changed after the resume's check (during the fill, which reads it) fails the
//!   start or its run (the processes are killed), never a wrong process.
//!
//! Skipped with a message when the host cannot run sandboxes, unless `CI=true`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medes_agent::{
    Agent, AgentError, Command, NodeAgent, Reply, RunCommand, RunOutcome, SandboxForm,
};
use medes_core::SandboxId;
use serde_json::Value;

#[path = "support/lazy_agent.rs"]
mod lazy_agent;
use lazy_agent::{dedup, make_base, restore};

/// A few MB of numpy state the answer depends on, and every random source.
const CODE: &str = r#"
import hashlib, os, random, numpy as np
A = np.random.default_rng(7).standard_normal((600, 600))
def main(args):
    return {"a": hashlib.sha256(A.tobytes()).hexdigest(), "r": random.random(),
            "u": os.urandom(8).hex(), "n": float(np.random.random())}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("ar{}-{tag}", std::process::id()))
}

async fn call(agent: &Agent, sb: &SandboxId) -> Value {
    lazy_agent::run(agent, sb, Value::Object(Default::default()), 60_000).await
}

async fn cmd(agent: &Agent, c: Command) -> Result<Reply, AgentError> {
    agent.execute(c).await
}

/// A base and a warm target of one function, with the target's warm answer.
async fn setup(agent: &Agent, tag: &str) -> (SandboxId, SandboxId, Value) {
    let (base, target) = (id(&format!("{tag}-b")), id(&format!("{tag}-t")));
    let name = format!("pkg/{tag}");
    lazy_agent::spawn(agent, &base, &name, CODE).await;
    lazy_agent::spawn(agent, &target, &name, CODE).await;
    let warm = call(agent, &target).await;
    make_base(agent, &base).await;
    (base, target, warm)
}

/// Waits until `sb` is armed (bounded).
async fn armed(agent: &Agent, sb: &SandboxId) -> medes_agent::ArmedStatus {
    let t = Instant::now();
    loop {
        if let Some(a) = agent
            .armed()
            .into_iter()
            .find(|a| &a.sandbox == sb && a.ready)
        {
            return a;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{sb} was not armed: {:?}",
            agent.armed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The run directory, cgroup directories and network namespace of sandbox `sb`.
fn traces(sb: &SandboxId) -> Vec<PathBuf> {
    let cfg = medes_sandbox::SandboxConfig::default();
    let run = cfg.run_dir.join(&sb.0);
    let mut out = vec![run.clone()];
    if let Ok(ns) = std::fs::read_to_string(run.join("netns")) {
        out.push(Path::new("/run/netns").join(ns.trim()));
    }
    for c in ["memory", "pids", ""] {
        let p = Path::new("/sys/fs/cgroup")
            .join(c)
            .join(&cfg.cgroup_name)
            .join(&sb.0);
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armed_starts_match_the_warm_sandbox_and_purges_leave_nothing() {
    let Some((agent, _data)) = lazy_agent::lazy_agent_armed("armed start", 1) else {
        return;
    };
    let (base, target, warm) = setup(&agent, "res").await;
    dedup(&agent, &target).await;
    let a = armed(&agent, &target).await;
    assert!(
        a.cgroup_bytes > 0 && a.pss_bytes > 0 && a.store_meta_bytes > 0,
        "{a:?}"
    );
    // The armed extra is part of the dedup sandbox's held bytes.
    let Ok(Reply::Status(st)) = cmd(&agent, Command::Status).await else {
        panic!("status")
    };
    let s = st
        .sandboxes
        .iter()
        .find(|s| s.id == target)
        .expect("target");
    assert_eq!(s.form, SandboxForm::Dedup);
    // Held: the store file plus the extra, whose store part is the metadata only (much less
    // than the file: no copy of the page data).
    let file = std::fs::metadata(store_path(&agent, &target))
        .expect("store file")
        .len();
    assert!(
        s.held_bytes >= file + a.cgroup_bytes + a.store_meta_bytes,
        "{s:?} {a:?}"
    );
    assert!(a.store_meta_bytes < file / 2, "{a:?}: store file {file} B");
    eprintln!("armed: {a:?}; held {} bytes", s.held_bytes);

    let t = Instant::now();
    let r = restore(&agent, &target).await.expect("armed start");
    eprintln!("armed start: {:.1} ms (agent {:.1} ms)", ms(t), r.total_ms);
    let c = agent.dedup_counters();
    assert_eq!((c.arms, c.armed_starts), (1, 1), "{c:?}");
    let r1 = call(&agent, &target).await;
    assert_eq!(r1["a"], warm["a"], "same state as the warm sandbox");

    // Again, with the restore racing the arm in flight: it joins the arm.
    dedup(&agent, &target).await;
    let t = Instant::now();
    while !agent.armed().iter().any(|a| a.sandbox == target) {
        assert!(t.elapsed() < Duration::from_secs(10), "no arm started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t = Instant::now();
    restore(&agent, &target)
        .await
        .expect("start racing the arm");
    eprintln!("start racing an arm: {:.1} ms", ms(t));
    let r2 = call(&agent, &target).await;
    assert_eq!(r2["a"], warm["a"]);
    for k in ["r", "u", "n"] {
        assert_ne!(
            r1[k], r2[k],
            "{k}: two starts of one store must not share randomness"
        );
    }
    assert_eq!(agent.dedup_counters().restore_failures, 0);

    // The newest dedup sandbox of a function is the armed one: a newer dedup disarms the
    // older (which then starts unarmed, and right).
    dedup(&agent, &target).await;
    armed(&agent, &target).await;
    let t2 = id("res-t2");
    lazy_agent::spawn(&agent, &t2, "pkg/res", CODE).await;
    dedup(&agent, &t2).await;
    armed(&agent, &t2).await;
    let now: Vec<SandboxId> = agent.armed().into_iter().map(|a| a.sandbox).collect();
    assert_eq!(now, vec![t2.clone()], "only the newest stays armed");
    assert!(agent.dedup_counters().disarms >= 1);
    let starts = agent.dedup_counters().armed_starts;
    restore(&agent, &target).await.expect("unarmed start");
    assert_eq!(
        agent.dedup_counters().armed_starts,
        starts,
        "it was not armed"
    );
    assert_eq!(call(&agent, &target).await["a"], warm["a"]);

    // Armed, then purged: nothing of the armed tree is left.
    dedup(&agent, &target).await;
    armed(&agent, &target).await;
    let left = traces(&target);
    assert!(left[0].exists(), "the armed sandbox has a run directory");
    cmd(
        &agent,
        Command::Purge {
            sandbox: target.clone(),
        },
    )
    .await
    .expect("purge");
    assert!(
        !agent.armed().iter().any(|a| a.sandbox == target),
        "{:?}",
        agent.armed()
    );
    for p in &left {
        assert!(!p.exists(), "{p:?} left behind");
    }
    // The purge re-arms the function's newest remaining one; the shutdown disarms it.
    armed(&agent, &t2).await;
    let left2 = traces(&t2);
    assert!(left2[0].exists());
    let _ = cmd(
        &agent,
        Command::Purge {
            sandbox: base.clone(),
        },
    )
    .await;
    agent.shutdown().await;
    gone(&left2).await;
}

/// Base pages or the store corrupted after the sandbox was armed: the start fails (the
/// controller falls back to a cold start), no armed process survives, never a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_corrupted_after_arming_fail_the_start() {
    let Some((agent, _data)) = lazy_agent::lazy_agent_armed("armed start", 1) else {
        return;
    };
    // A corrupt store.
    let (base2, t2, _) = setup(&agent, "bad2").await;
    dedup(&agent, &t2).await;
    armed(&agent, &t2).await;
    lazy_agent::flip_bytes(&store_path(&agent, &t2), 0xff, None);
    let e = restore(&agent, &t2).await.expect_err("a corrupt store");
    assert!(e.to_string().contains("checksum"), "{e}");
    // Corrupt base pages (a fresh pair; the other base is corrupted too, which no store left
    // depends on).
    let (base, target, _) = setup(&agent, "bad").await;
    dedup(&agent, &target).await;
    armed(&agent, &target).await;
    let left = traces(&target);
    lazy_agent::corrupt_bases(&agent, 0x3c);
    let e = restore(&agent, &target).await.expect_err("a corrupt base");
    assert!(matches!(e, AgentError::RestoreFailed { .. }), "{e:?}");
    assert_eq!(agent.dedup_counters().armed_starts, 0);
    assert!(agent.armed().is_empty());
    gone(&left).await;

    assert_eq!(agent.dedup_counters().armed_starts, 0);
    for sb in [&base, &base2] {
        let _ = cmd(
            &agent,
            Command::Purge {
                sandbox: sb.clone(),
            },
        )
        .await;
    }
    agent.shutdown().await;
}

/// The store file of dedup sandbox `sb`.
fn store_path(agent: &Agent, sb: &SandboxId) -> PathBuf {
    agent
        .images_dir()
        .join("store")
        .join(format!("{}.medes", sb.0))
}

/// The store file changed in place after the resume's check, i.e. while the fill reads it (the
/// test hook `MEDES_TEST_ARMED_UNCHECKED_STORE` skips the check of its stamp, which would
/// otherwise disarm it): the per-page checksums catch the changed pages before any is copied
/// in, the restored processes are killed, and the start or its run fails: never a wrong
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_changed_during_the_fill_never_gives_a_wrong_process() {
    let target = id("fill-t");
    // SAFETY: set before the agent exists: no other thread of this test reads the
    // environment yet (nextest runs each test in its own process; under `cargo test` the other
    // tests' sandboxes have other ids, which the hook ignores).
    unsafe { std::env::set_var("MEDES_TEST_ARMED_UNCHECKED_STORE", &target.0) };
    let Some((agent, _data)) = lazy_agent::lazy_agent_armed("armed start", 1) else {
        return;
    };
    let base = id("fill-b");
    lazy_agent::spawn(&agent, &base, "pkg/fill", CODE).await;
    lazy_agent::spawn(&agent, &target, "pkg/fill", CODE).await;
    let warm = call(&agent, &target).await;
    make_base(&agent, &base).await;
    dedup(&agent, &target).await;
    armed(&agent, &target).await;
    // Every 4 KiB of the back half of the store (page data: the blob and the blocks).
    lazy_agent::flip_bytes(&store_path(&agent, &target), 0x5a, Some(4096));
    let r = restore(&agent, &target).await;
    let c = agent.dedup_counters();
    assert_eq!(c.disarms, 0, "resumed, not disarmed: {c:?}");
    let mut failed = match &r {
        Err(e) => {
            assert!(matches!(e, AgentError::RestoreFailed { .. }), "{e:?}");
            eprintln!("the start failed: {e}");
            true
        }
        Ok(_) => {
            // Answered early: the fill goes on and must fail; a run returns the right
            // answer (its pages were verified) or fails as a lost sandbox.
            let run = Command::Run(RunCommand {
                sandbox: target.clone(),
                params: Default::default(),
                env: Default::default(),
                timeout_ms: 60_000,
            });
            match agent.execute(run).await {
                Ok(Reply::Ran(r)) => match r.outcome {
                    RunOutcome::Returned(v) => {
                        assert_eq!(v["a"], warm["a"], "a wrong process answered");
                        false
                    }
                    other => {
                        eprintln!("the run failed: {other:?}");
                        true
                    }
                },
                other => {
                    eprintln!("the run failed: {other:?}");
                    true
                }
            }
        }
    };
    // The fill failed (the processes were killed) in any case.
    let t = Instant::now();
    while !failed {
        failed = agent.dedup_counters().restore_failures > 0;
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the changed store was never caught: {:?}",
            agent.dedup_counters()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = cmd(&agent, Command::Purge { sandbox: target }).await;
    let _ = cmd(&agent, Command::Purge { sandbox: base }).await;
    agent.shutdown().await;
}

/// Waits (bounded) until none of `paths` exists: a start that failed before its restore
/// ended tears its half-prepared sandbox down in the background.
async fn gone(paths: &[PathBuf]) {
    let t = Instant::now();
    while let Some(p) = paths.iter().find(|p| p.exists()) {
        assert!(t.elapsed() < Duration::from_secs(10), "{p:?} left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
