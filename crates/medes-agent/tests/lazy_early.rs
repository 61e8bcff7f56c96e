//! Early-answered lazy dedup starts (the start answers once the restored runtime answers, the
//! remaining pages are filled in the background) over real sandboxes and CRIU:
//! - a checkpoint asked for right after the start waits for the fill (a dump of a process
//!   with missing pages would lose them), and the results stay those of the warm sandbox;
//! - a base page corrupted after an earlier start (its per-page sums cached) and a corrupt
//!   store are both detected before the restored process resumes: the start fails, no process
//!   is left, and the dedup sandbox is purged (the controller then falls back to a cold start).
//!
//! Skipped with a message when the host cannot run sandboxes, unless `CI=true`.

use medes_agent::{Agent, AgentError, Command, NodeAgent};
use medes_core::SandboxId;
use serde_json::Value;

#[path = "support/lazy_agent.rs"]
mod lazy_agent;
use lazy_agent::{dedup, make_base, restore};

fn agent() -> Option<(Agent, tempfile::TempDir)> {
    lazy_agent::lazy_agent("early lazy start")
}

/// ~60 MB of numpy state (the fill of a test build takes long enough to still run when the
/// start answers); the answer depends on all of it.
const BIG: &str = r#"
import hashlib, numpy as np
A = np.random.default_rng(7).standard_normal((2000, 2000))
B = A @ A.T
def main(args):
    return {"a": hashlib.sha256(A.tobytes()).hexdigest(),
            "b": hashlib.sha256(B.tobytes()).hexdigest(),
            "r": float(np.random.random())}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("le{}-{tag}", std::process::id()))
}

async fn start(agent: &Agent, sb: &SandboxId, name: &str) {
    lazy_agent::spawn(agent, sb, name, BIG).await
}

async fn call(agent: &Agent, sb: &SandboxId) -> Value {
    lazy_agent::run(agent, sb, Value::Object(Default::default()), 60_000).await
}

/// A base and a warm target with its warm answer.
async fn setup(agent: &Agent, tag: &str) -> (SandboxId, SandboxId, Value) {
    let (base, target) = (id(&format!("{tag}-b")), id(&format!("{tag}-t")));
    let name = format!("pkg/{tag}");
    start(agent, &base, &name).await;
    start(agent, &target, &name).await;
    let warm = call(agent, &target).await;
    make_base(agent, &base).await;
    (base, target, warm)
}

async fn purge(agent: &Agent, ids: &[&SandboxId]) {
    for sb in ids {
        let _ = agent
            .execute(Command::Purge {
                sandbox: (*sb).clone(),
            })
            .await;
    }
}

/// The restored sandbox is checkpointed (made a base, `--leave-running`) right after its start
/// answered: the checkpoint waits for the fill, so it sees every page (a dump during the fill
/// would skip the missing ones), and the sandbox still answers like the warm one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_right_after_an_early_start_waits_for_the_fill() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (base, target, warm) = setup(&agent, "early").await;
    let before = agent.dedup_counters();
    let d = dedup(&agent, &target).await;
    let r = restore(&agent, &target).await.expect("restore");
    assert!(r.total_ms > 0.0 && r.transient_bytes > 0, "{r:?}");
    let b = make_base(&agent, &target).await;
    assert!(
        b.pages * 100 >= d.pages * 97,
        "the checkpoint after the start saw {} pages, the dedup {} (pages missed)",
        b.pages,
        d.pages
    );
    let got = call(&agent, &target).await;
    assert_eq!((&got["a"], &got["b"]), (&warm["a"], &warm["b"]));
    // Another cycle through a dedup start from the same store (re-dedup reuses it).
    purge(&agent, &[&target]).await;
    let t2 = id("early-t2");
    start(&agent, &t2, "pkg/early").await;
    dedup(&agent, &t2).await;
    restore(&agent, &t2).await.expect("restore");
    let got = call(&agent, &t2).await;
    assert_eq!((&got["a"], &got["b"]), (&warm["a"], &warm["b"]));
    let after = agent.dedup_counters();
    assert_eq!(after.lazy_restores - before.lazy_restores, 2);
    assert_eq!(after.lazy_fallbacks, before.lazy_fallbacks);
    assert_eq!(after.restore_failures, before.restore_failures);
    purge(&agent, &[&t2, &base]).await;
    agent.shutdown().await;
}

/// A failed start: the error, one more restore failure, no fallback to the plain path, and the
/// dedup sandbox purged.
async fn assert_failed_before_resume(agent: &Agent, target: &SandboxId, want: &str) {
    let before = agent.dedup_counters();
    let e = restore(agent, target).await.unwrap_err();
    assert!(
        matches!(&e, AgentError::RestoreFailed { sandbox, .. } if sandbox == target),
        "{e:?}"
    );
    assert!(e.to_string().contains(want), "{e}");
    let after = agent.dedup_counters();
    assert_eq!(after.restore_failures, before.restore_failures + 1);
    assert_eq!(after.lazy_fallbacks, before.lazy_fallbacks, "no retry");
    assert_eq!(
        restore(agent, target).await.unwrap_err(),
        AgentError::UnknownSandbox(target.clone())
    );
}

/// A base page corrupted after a first start (so its per-page sums are cached) fails the next
/// start in the input check, before the restored process resumes; so does a corrupt store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_inputs_fail_the_start_before_the_process_resumes() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (base, target, warm) = setup(&agent, "inputs").await;
    dedup(&agent, &target).await;
    restore(&agent, &target).await.expect("first restore");
    assert_eq!(call(&agent, &target).await["a"], warm["a"]);
    dedup(&agent, &target).await;
    lazy_agent::corrupt_bases(&agent, 0x5a);
    assert_failed_before_resume(&agent, &target, "before the restored process resumed").await;

    // A corrupt store (a flipped byte of its patches and page data): refused when loaded.
    let t2 = id("inputs-t2");
    start(&agent, &t2, "pkg/inputs2").await;
    let b2 = id("inputs-b2");
    start(&agent, &b2, "pkg/inputs2").await;
    make_base(&agent, &b2).await;
    dedup(&agent, &t2).await;
    let store = agent
        .images_dir()
        .join("store")
        .join(format!("{}.medes", t2.0));
    lazy_agent::flip_bytes(&store, 0xff, None);
    assert_failed_before_resume(&agent, &t2, "checksum").await;
    purge(&agent, &[&base, &b2]).await;
    agent.shutdown().await;
}
