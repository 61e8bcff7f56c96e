//! The dedup sandbox state over real sandboxes and CRIU: bases, dedup, dedup starts, purges,
//! failures and memory figures.

use std::collections::BTreeMap;

use medes_agent::{
    Agent, AgentError, Command, NodeAgent, NodeStatus, Reply, RunCommand, RunOutcome, SandboxForm,
    SandboxStatus, SpawnCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use serde_json::{Value, json};

use super::agent;

/// A json-only action holding a few MB of deterministic state (3 MB of it incompressible); its
/// answer depends on that state (`h`) and on the runtime's random generators (`r`, `u`).
const CODE: &str = r#"
import hashlib, json, os, random
DATA = [{"k": i, "v": str(i) * 7, "f": i / 7} for i in range(30000)]
BLOB = json.dumps(DATA).encode() + random.Random(7).randbytes(3 << 20)
def main(args):
    h = hashlib.sha256(BLOB + json.dumps(args, sort_keys=True).encode()).hexdigest()
    return {"h": h, "n": len(DATA), "r": random.random(), "u": os.urandom(8).hex()}
"#;

/// Another function on the same runtime and libraries, with other state.
const CODE2: &str = r#"
import hashlib, json, os, random
TABLE = {str(i): [i, i * 2, "x" * (i % 13)] for i in range(20000)}
def main(args):
    return {"h": hashlib.sha1(json.dumps(TABLE).encode()).hexdigest(), "r": random.random()}
"#;

/// Holds a TCP listening socket: CRIU 4.1 cannot dump it on this kernel.
const TCP: &str = r#"
import socket
S = socket.socket()
S.bind(("127.0.0.1", 0))
S.listen(1)
def main(args):
    return {"port": S.getsockname()[1]}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("dd{}-{tag}", std::process::id()))
}

fn spawn(sandbox: &SandboxId, ns: &str, name: &str, code: &str) -> Command {
    Command::Spawn(SpawnCommand {
        sandbox: sandbox.clone(),
        action: ActionName {
            namespace: Namespace(ns.into()),
            name: name.into(),
        },
        version: "0.0.1".into(),
        code: Code::Source(code.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(256),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), ns.to_string())]),
        init_timeout_ms: 20_000,
    })
}

async fn start(agent: &Agent, sb: &SandboxId, ns: &str, name: &str, code: &str) {
    match agent.execute(spawn(sb, ns, name, code)).await {
        Ok(Reply::Spawned(r)) => assert_eq!(r.init_error, None),
        other => panic!("spawn {sb}: {other:?}"),
    }
}

pub(super) async fn call(
    agent: &Agent,
    sb: &SandboxId,
    params: Value,
) -> Result<Value, AgentError> {
    let cmd = Command::Run(RunCommand {
        sandbox: sb.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        env: BTreeMap::new(),
        timeout_ms: 10_000,
    });
    match agent.execute(cmd).await? {
        Reply::Ran(r) => match r.outcome {
            RunOutcome::Returned(v) => Ok(v),
            other => panic!("run {sb}: {other:?}"),
        },
        other => panic!("run {sb}: {other:?}"),
    }
}

pub(super) async fn status(agent: &Agent) -> NodeStatus {
    match agent.execute(Command::Status).await {
        Ok(Reply::Status(s)) => s,
        other => panic!("status: {other:?}"),
    }
}

fn find<'a>(st: &'a NodeStatus, sb: &SandboxId) -> &'a SandboxStatus {
    st.sandboxes
        .iter()
        .find(|s| &s.id == sb)
        .unwrap_or_else(|| panic!("{sb} not in {st:?}"))
}

fn purge(sb: &SandboxId) -> Command {
    Command::Purge {
        sandbox: sb.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_dedup_restore_and_reuse() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (a, b) = (id("a"), id("b"));
    start(&agent, &a, "guest", "pkg/dd", CODE).await;
    let ra = call(&agent, &a, json!({"x": 1})).await.unwrap();

    // The base keeps serving.
    let Reply::BaseReady(base) = agent
        .execute(Command::MakeBase { sandbox: a.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(
        base.pages > 1000 && base.image_bytes == base.pages * 4096,
        "{base:?}"
    );
    let ra2 = call(&agent, &a, json!({"x": 1})).await.unwrap();
    assert_eq!(ra["h"], ra2["h"]);
    assert!(matches!(
        agent.execute(Command::Dedup { sandbox: a.clone() }).await,
        Err(AgentError::WrongForm {
            form: SandboxForm::Base,
            ..
        })
    ));

    start(&agent, &b, "guest", "pkg/dd", CODE).await;
    let rb = call(&agent, &b, json!({"x": 1})).await.unwrap();
    assert_eq!(ra["h"], rb["h"]);
    let Reply::Deduped(d) = agent
        .execute(Command::Dedup { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    eprintln!("dedup: {d:?}");
    assert!(!d.reused_previous);
    assert!(d.pages > 1000, "{d:?}");
    assert!(
        d.stored_bytes * 4 < d.image_bytes,
        "a sandbox of the base's function must dedup well: {d:?}"
    );
    let store = agent.store_path(&b).expect("store");
    assert_eq!(
        medes_agent_store_len(&store).div_ceil(4096) * 4096,
        d.stored_bytes
    );

    // Forms and memory.
    let st = status(&agent).await;
    let (sa, sb_) = (find(&st, &a), find(&st, &b));
    assert_eq!(sa.form, SandboxForm::Base);
    assert!(sa.alive);
    let pss = sa.memory.expect("base memory").pss.0;
    assert!(sa.held_bytes >= pss + base.image_bytes, "{sa:?}");
    assert_eq!(sb_.form, SandboxForm::Dedup);
    assert!(!sb_.alive && sb_.memory.is_none());
    assert_eq!(sb_.held_bytes, d.stored_bytes);

    // A dedup sandbox runs nothing; its base cannot go.
    assert!(matches!(
        call(&agent, &b, json!({})).await,
        Err(AgentError::WrongForm {
            form: SandboxForm::Dedup,
            ..
        })
    ));
    assert_eq!(
        agent.execute(purge(&a)).await.unwrap_err(),
        AgentError::BaseInUse {
            sandbox: a.clone(),
            dependents: 1
        }
    );

    // Dedup start: same results, fresh randomness.
    let Reply::Restored(r) = agent
        .execute(Command::Restore { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    eprintln!("restore: {r:?}");
    // An armed start (the default) rebuilt its inputs when it was armed, off the start.
    let armed = agent.dedup_counters().armed_starts > 0;
    assert!(
        r.total_ms >= r.restore_ms && (r.rebuild_ms > 0.0 || armed),
        "{r:?}"
    );
    let rb1 = call(&agent, &b, json!({"x": 1})).await.unwrap();
    assert_eq!(rb1["h"], rb["h"]);
    assert_eq!(find(&status(&agent).await, &b).form, SandboxForm::Warm);

    // Re-dedup reuses the store; a second start from it draws other random numbers.
    let Reply::Deduped(d2) = agent
        .execute(Command::Dedup { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(d2.reused_previous);
    assert_eq!(d2.stored_bytes, d.stored_bytes);
    agent
        .execute(Command::Restore { sandbox: b.clone() })
        .await
        .unwrap();
    let rb2 = call(&agent, &b, json!({"x": 1})).await.unwrap();
    assert_eq!(rb2["h"], rb["h"]);
    assert_ne!(rb1["r"], rb2["r"], "random not reseeded");
    assert_ne!(rb1["u"], rb2["u"]);

    // Purging the (warm, restored) dependent drops its store and frees the base.
    agent.execute(purge(&b)).await.unwrap();
    assert!(!store.exists());
    agent.execute(purge(&a)).await.unwrap();
    assert_eq!(agent.n_sandboxes(), 0);
    let c = agent.dedup_counters();
    assert_eq!(
        (c.bases, c.dedups, c.reused, c.restores, c.retired),
        (1, 1, 1, 2, 1)
    );
    agent.shutdown().await;
}

fn medes_agent_store_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).expect("store file").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_share_across_functions_not_tenants() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (base, f1, f2, other) = (id("dbase"), id("f1"), id("f2"), id("other"));
    start(&agent, &base, "alice", "f1", CODE).await;
    agent
        .execute(Command::MakeBase {
            sandbox: base.clone(),
        })
        .await
        .unwrap();
    let mut replies = Vec::new();
    // The same function, another function of the same tenant, the same function of another
    // tenant (no base in its domain).
    for (sb, ns, name, code) in [
        (&f1, "alice", "f1", CODE),
        (&f2, "alice", "f2", CODE2),
        (&other, "bob", "f1", CODE),
    ] {
        start(&agent, sb, ns, name, code).await;
        let Reply::Deduped(d) = agent
            .execute(Command::Dedup {
                sandbox: sb.clone(),
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        eprintln!("{ns}/{name}: {d:?}");
        replies.push(d);
    }
    let ratio = |x: &medes_agent::DedupReply| x.stored_bytes as f64 / x.image_bytes as f64;
    assert!(
        ratio(&replies[0]) * 3.0 < ratio(&replies[2]),
        "same function with its base {:.3} vs another tenant without {:.3}",
        ratio(&replies[0]),
        ratio(&replies[2])
    );
    // f1 and f2 depend on alice's base, bob's sandbox does not.
    assert_eq!(
        agent.execute(purge(&base)).await.unwrap_err(),
        AgentError::BaseInUse {
            sandbox: base.clone(),
            dependents: 2
        }
    );
    agent.execute(purge(&f1)).await.unwrap();
    assert_eq!(
        agent.execute(purge(&base)).await.unwrap_err(),
        AgentError::BaseInUse {
            sandbox: base.clone(),
            dependents: 1
        }
    );
    agent
        .execute(Command::Restore {
            sandbox: f2.clone(),
        })
        .await
        .unwrap();
    assert!(call(&agent, &f2, json!({})).await.unwrap()["h"].is_string());
    agent.execute(purge(&f2)).await.unwrap();
    agent.execute(purge(&base)).await.unwrap();
    // Bob's restores without any base.
    agent
        .execute(Command::Restore {
            sandbox: other.clone(),
        })
        .await
        .unwrap();
    assert_eq!(call(&agent, &other, json!({})).await.unwrap()["n"], 30000);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_stores_and_bases_fail_restores_and_purge() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (base, x, y, t) = (id("bbase"), id("x"), id("y"), id("tcp"));
    start(&agent, &base, "guest", "dd", CODE).await;
    agent
        .execute(Command::MakeBase {
            sandbox: base.clone(),
        })
        .await
        .unwrap();
    for sb in [&x, &y] {
        start(&agent, sb, "guest", "dd", CODE).await;
        agent
            .execute(Command::Dedup {
                sandbox: sb.clone(),
            })
            .await
            .unwrap();
    }

    // One flipped byte in the store.
    let path = agent.store_path(&x).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let e = agent
        .execute(Command::Restore { sandbox: x.clone() })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::RestoreFailed { sandbox, .. } if sandbox == &x),
        "{e:?}"
    );
    assert!(e.to_string().contains("checksum"), "{e}");
    assert_eq!(
        agent
            .execute(Command::Restore { sandbox: x.clone() })
            .await
            .unwrap_err(),
        AgentError::UnknownSandbox(x.clone())
    );
    assert!(!path.exists());

    // The base's pages are lost.
    assert!(agent.lose_base_pages(&base));
    let e = agent
        .execute(Command::Restore { sandbox: y.clone() })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::RestoreFailed { sandbox, .. } if sandbox == &y),
        "{e:?}"
    );
    assert!(status(&agent).await.sandboxes.iter().all(|s| s.id != y));

    // Both dependents are gone: the base can be purged.
    agent.execute(purge(&base)).await.unwrap();

    // A sandbox holding a TCP listening socket stays warm and keeps serving.
    start(&agent, &t, "guest", "tcp", TCP).await;
    let e = agent
        .execute(Command::Dedup { sandbox: t.clone() })
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            AgentError::NotDeduplicable {
                sandbox_alive: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        call(&agent, &t, json!({})).await.unwrap()["port"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(find(&status(&agent).await, &t).form, SandboxForm::Warm);
    let c = agent.dedup_counters();
    assert_eq!((c.restore_failures, c.not_deduplicable), (2, 1));
    agent.shutdown().await;
}

/// Processes whose cgroup (any hierarchy) is the sandbox's.
fn procs_of(sb: &SandboxId) -> usize {
    let tail = format!("/{}", sb.0);
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("cgroup"))
                        .is_ok_and(|c| c.lines().any(|l| l.trim_end().ends_with(&tail)))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_sandbox_restores_against_a_released_base() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (a, b) = (id("ra"), id("rb"));
    start(&agent, &a, "guest", "pkg/rel", CODE).await;
    let ra = call(&agent, &a, json!({"x": 2})).await.unwrap();
    // Only a base's process can be released.
    assert!(matches!(
        agent
            .execute(Command::ReleaseBase { sandbox: a.clone() })
            .await,
        Err(AgentError::WrongForm {
            form: SandboxForm::Warm,
            ..
        })
    ));
    let Reply::BaseReady(base) = agent
        .execute(Command::MakeBase { sandbox: a.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(
        procs_of(&a) > 0,
        "the base's process is found by its cgroup"
    );
    assert!(matches!(
        agent
            .execute(Command::ReleaseBase { sandbox: a.clone() })
            .await,
        Ok(Reply::Purged)
    ));
    // The process is gone; the base stays (its image), without dependents, naming its action.
    assert_eq!(procs_of(&a), 0);
    for _ in 0..2 {
        let st = status(&agent).await;
        let sa = find(&st, &a);
        assert_eq!((sa.form, sa.alive), (SandboxForm::Base, false), "{sa:?}");
        assert!(sa.memory.is_none());
        assert_eq!(sa.image_bytes, Some(base.image_bytes));
        assert!(sa.held_bytes >= base.image_bytes, "{sa:?}");
        assert_eq!(sa.action.as_ref().map(|x| x.name.as_str()), Some("pkg/rel"));
        assert_eq!(sa.version.as_deref(), Some("0.0.1"));
    }
    // Idempotent; it runs nothing.
    assert!(matches!(
        agent
            .execute(Command::ReleaseBase { sandbox: a.clone() })
            .await,
        Ok(Reply::Purged)
    ));
    assert!(matches!(
        call(&agent, &a, json!({})).await,
        Err(AgentError::WrongForm {
            form: SandboxForm::Base,
            ..
        })
    ));

    // A later sandbox of the function is deduplicated against the released base and restores
    // correctly from it.
    start(&agent, &b, "guest", "pkg/rel", CODE).await;
    let rb = call(&agent, &b, json!({"x": 2})).await.unwrap();
    assert_eq!(ra["h"], rb["h"]);
    let Reply::Deduped(d) = agent
        .execute(Command::Dedup { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    eprintln!("dedup against a released base: {d:?}");
    assert!(
        d.stored_bytes * 4 < d.image_bytes,
        "the released base's pages must be found: {d:?}"
    );
    assert_eq!(
        agent.execute(purge(&a)).await.unwrap_err(),
        AgentError::BaseInUse {
            sandbox: a.clone(),
            dependents: 1
        }
    );
    let Reply::Restored(r) = agent
        .execute(Command::Restore { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    eprintln!("restore against a released base: {r:?}");
    let rb1 = call(&agent, &b, json!({"x": 2})).await.unwrap();
    assert_eq!(rb1["h"], ra["h"]);
    assert_eq!(find(&status(&agent).await, &b).form, SandboxForm::Warm);

    // Once nothing depends on it, a purge retires it.
    agent.execute(purge(&b)).await.unwrap();
    agent.execute(purge(&a)).await.unwrap();
    assert_eq!(agent.n_sandboxes(), 0);
    let c = agent.dedup_counters();
    assert_eq!((c.bases, c.dedups, c.restores, c.retired), (1, 1, 1, 1));
    agent.shutdown().await;
}
