//! Lazy dedup starts (`criu restore --lazy-pages` with the agent's own lazy-pages server) over
//! real sandboxes and CRIU: right results for a numpy-heavy function and for a function with
//! worker processes (and one that forks after the restore), repeated warm → dedup → restore
//! cycles, and a corrupt base page detected (the start fails, never a wrong process).
//! Skipped with a message when the host cannot run sandboxes, unless `CI=true`.

use medes_agent::{Agent, AgentError, Command, NodeAgent, Reply};
use medes_core::SandboxId;
use serde_json::{Value, json};

#[path = "support/lazy_agent.rs"]
mod lazy_agent;
use lazy_agent::{dedup, make_base};

fn agent() -> Option<(Agent, tempfile::TempDir)> {
    lazy_agent::lazy_agent("lazy dedup start")
}

/// numpy state of ~40 MB (a random matrix and its Gram matrix); the answer depends on all of it.
const NUMPY: &str = r#"
import hashlib, numpy as np
A = np.random.default_rng(5).standard_normal((1600, 1600))
G = A @ A.T
def main(args):
    k = int(args.get("k", 3))
    return {"a": hashlib.sha256(A.tobytes()).hexdigest(),
            "g": hashlib.sha256(G.tobytes()).hexdigest(),
            "s": float(G[:k * 100].sum()),
            "r": float(np.random.random())}
"#;

/// A parent and two pool workers holding state (as the suite's mapreduce), plus a process
/// forked by each call after the restore (a userfaultfd fork event while pages are missing).
const PROCS: &str = r#"
import hashlib, multiprocessing, os
DATA = bytes((i * 7 + i // 251) % 256 for i in range(6 << 20))
TABLE = {str(i): i * i for i in range(100000)}
def _h(i):
    return hashlib.sha256(DATA[i::3] + str(TABLE[str(i)]).encode()).hexdigest()
POOL = multiprocessing.get_context("fork").Pool(2)
def main(args):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, hashlib.sha256(DATA + repr(sorted(TABLE.items())[:5000]).encode()).digest())
        os._exit(0)
    os.close(w)
    child = b""
    while len(child) < 32:
        b = os.read(r, 32 - len(child))
        if not b:
            break
        child += b
    os.close(r)
    os.waitpid(pid, 0)
    return {"pool": POOL.map(_h, range(3)), "child": child.hex(), "n": len(TABLE)}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("lz{}-{tag}", std::process::id()))
}

async fn start(agent: &Agent, sb: &SandboxId, name: &str, code: &str) {
    lazy_agent::spawn(agent, sb, name, code).await
}

async fn call(agent: &Agent, sb: &SandboxId, params: Value) -> Value {
    lazy_agent::run(agent, sb, params, 30_000).await
}

/// `cycles` × (dedup → lazy dedup start → call): every answer equals the warm one on `keys`.
async fn cycle(agent: &Agent, name: &str, code: &str, keys: &[&str], cycles: usize) {
    let tag = name.rsplit('/').next().unwrap_or(name);
    let (base, target) = (id(&format!("{tag}-b")), id(&format!("{tag}-t")));
    start(agent, &base, name, code).await;
    start(agent, &target, name, code).await;
    let warm = call(agent, &target, json!({"k": 4})).await;
    make_base(agent, &base).await;
    let before = agent.dedup_counters();
    for i in 0..cycles {
        dedup(agent, &target).await;
        let r = match agent
            .execute(Command::Restore {
                sandbox: target.clone(),
            })
            .await
        {
            Ok(Reply::Restored(r)) => r,
            other => panic!("restore {target} (cycle {i}): {other:?}"),
        };
        assert!(r.total_ms > 0.0 && r.rebuild_ms > 0.0, "{r:?}");
        assert!(r.transient_bytes > 0, "m_R measured: {r:?}");
        let got = call(agent, &target, json!({"k": 4})).await;
        for k in keys {
            assert_eq!(got[k], warm[k], "{name} cycle {i}: {k}");
        }
        eprintln!("{name} cycle {i}: {r:?}");
    }
    let after = agent.dedup_counters();
    assert_eq!(after.lazy_restores - before.lazy_restores, cycles as u64);
    assert_eq!(
        after.lazy_fallbacks, before.lazy_fallbacks,
        "no fallback to the plain path"
    );
    assert_eq!(after.restore_failures, before.restore_failures);
    for sb in [&target, &base] {
        agent
            .execute(Command::Purge {
                sandbox: sb.clone(),
            })
            .await
            .expect("purge");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_dedup_starts_give_the_same_results() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    cycle(&agent, "pkg/numpy", NUMPY, &["a", "g", "s"], 3).await;
    cycle(&agent, "pkg/procs", PROCS, &["pool", "child", "n"], 2).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_base_page_fails_the_lazy_start() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (base, target) = (id("bad-b"), id("bad-t"));
    start(&agent, &base, "pkg/bad", NUMPY).await;
    start(&agent, &target, "pkg/bad", NUMPY).await;
    call(&agent, &target, json!({})).await;
    make_base(&agent, &base).await;
    dedup(&agent, &target).await;
    // Overwrite the back half of the base's resident pages (in place: they are mapped).
    lazy_agent::corrupt_bases(&agent, 0xa5);
    let before = agent.dedup_counters();
    let e = agent
        .execute(Command::Restore {
            sandbox: target.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::RestoreFailed { sandbox, .. } if sandbox == &target),
        "{e:?}"
    );
    assert!(e.to_string().contains("checksum"), "{e}");
    let after = agent.dedup_counters();
    assert_eq!(after.restore_failures, before.restore_failures + 1);
    assert_eq!(after.lazy_fallbacks, before.lazy_fallbacks, "no retry");
    // The broken dedup sandbox is gone; nothing of it runs.
    assert_eq!(
        agent
            .execute(Command::Restore {
                sandbox: target.clone(),
            })
            .await
            .unwrap_err(),
        AgentError::UnknownSandbox(target.clone())
    );
    agent.shutdown().await;
}
