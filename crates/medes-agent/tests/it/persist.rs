//! Dedup stores and bases survive an agent restart (issue 5): a new agent on the same data
//! directory finds them on the tmpfs, verifies them, restores the sandbox with the right state,
//! drops a corrupted store with a reason, and retires bases nothing depends on. A kept base
//! names the action and version it ran (a base file of an older agent, without them, still
//! loads).

use std::collections::BTreeMap;
use std::path::Path;

use medes_agent::{
    Agent, AgentConfig, AgentError, Command, NodeAgent, Reply, SandboxForm, SpawnCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::{Value, json};

use super::dedup::status;

/// Deterministic state (3 MB of it incompressible) the answer depends on (`h`), and the
/// runtime's generators (`r`).
const CODE: &str = r#"
import hashlib, json, os, random
DATA = [{"k": i, "v": str(i) * 7} for i in range(30000)]
BLOB = json.dumps(DATA).encode() + random.Random(11).randbytes(3 << 20)
def main(args):
    h = hashlib.sha256(BLOB + json.dumps(args, sort_keys=True).encode()).hexdigest()
    return {"h": h, "n": len(DATA), "r": random.random()}
"#;

fn cfg(data: &Path) -> Option<AgentConfig> {
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("agent persistence tests cannot run in CI: {e}");
        }
        eprintln!("skipping agent persistence test: {e}");
        return None;
    }
    let _ = become_subreaper();
    Some(AgentConfig {
        data_dir: data.to_path_buf(),
        sandbox,
        ..Default::default()
    })
}

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("kp{}-{tag}", std::process::id()))
}

/// Another function of the same namespace (its base shares the runtime's pages).
const OTHER: &str = r#"
import json, random
TABLE = {str(i): [i, "y" * (i % 17)] for i in range(20000)}
def main(args):
    return {"n": len(TABLE), "r": random.random()}
"#;

async fn start(agent: &Agent, sb: &SandboxId) {
    start_code(agent, sb, "pkg/kept", CODE).await;
}

async fn start_code(agent: &Agent, sb: &SandboxId, name: &str, code: &str) {
    let cmd = Command::Spawn(SpawnCommand {
        sandbox: sb.clone(),
        action: ActionName {
            namespace: Namespace("guest".into()),
            name: name.into(),
        },
        version: "0.0.7".into(),
        code: Code::Source(code.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(256),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())]),
        init_timeout_ms: 20_000,
    });
    match agent.execute(cmd).await {
        Ok(Reply::Spawned(r)) => assert_eq!(r.init_error, None),
        other => panic!("spawn {sb}: {other:?}"),
    }
}

async fn call(agent: &Agent, sb: &SandboxId) -> Result<Value, AgentError> {
    super::dedup::call(agent, sb, json!({"x": 1})).await
}

async fn base_and_dedups(agent: &Agent, base: &SandboxId, targets: &[&SandboxId]) -> Vec<Value> {
    start(agent, base).await;
    call(agent, base).await.unwrap();
    assert!(matches!(
        agent
            .execute(Command::MakeBase {
                sandbox: base.clone()
            })
            .await,
        Ok(Reply::BaseReady(_))
    ));
    let mut out = Vec::new();
    for t in targets {
        start(agent, t).await;
        out.push(call(agent, t).await.unwrap());
        match agent
            .execute(Command::Dedup {
                sandbox: (*t).clone(),
            })
            .await
        {
            Ok(Reply::Deduped(d)) => assert!(!d.reused_previous),
            other => panic!("dedup {t}: {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_sandbox_survives_an_agent_restart() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let (a, b, o) = (id("a"), id("b"), id("o"));
    let agent = Agent::new(cfg.clone()).unwrap();
    let dir = agent.images_dir().to_path_buf();
    // A base of another function first: the store may point into both bases (their order in
    // the store and in its metadata differ).
    start_code(&agent, &o, "pkg/other", OTHER).await;
    assert!(matches!(
        agent
            .execute(Command::MakeBase { sandbox: o.clone() })
            .await,
        Ok(Reply::BaseReady(_))
    ));
    let before = base_and_dedups(&agent, &a, &[&b]).await;
    let store = agent.store_path(&b).expect("a store");
    agent.shutdown().await;
    // The store and the base stay on the tmpfs; the base's process is gone.
    assert!(store.is_file(), "{store:?}");
    assert!(std::fs::read_dir(dir.join("bases")).unwrap().count() >= 4);

    let agent = Agent::new(cfg.clone()).unwrap();
    assert_eq!(
        agent.images_dir(),
        dir,
        "the images directory is stable per data dir"
    );
    let c = agent.dedup_counters();
    // The store, its function's base and (if the store uses it) the other base.
    assert_eq!(c.kept_dropped, 0, "{c:?}");
    assert!((2..=3).contains(&c.kept_loaded), "{c:?}");
    eprintln!("kept: {c:?}");
    let st = status(&agent).await;
    let sb = st.sandboxes.iter().find(|s| s.id == b).expect("b kept");
    assert_eq!(sb.form, SandboxForm::Dedup);
    assert_eq!(
        sb.action.as_ref().map(|a| a.name.as_str()),
        Some("pkg/kept")
    );
    assert_eq!(sb.version.as_deref(), Some("0.0.7"));
    assert_eq!(sb.domain.as_deref(), Some("guest"));
    assert!(
        sb.held_bytes > 0 && sb.image_bytes.unwrap_or(0) > sb.held_bytes,
        "{sb:?}"
    );
    let sa = st
        .sandboxes
        .iter()
        .find(|s| s.id == a)
        .expect("the base's pages kept");
    assert_eq!((sa.form, sa.alive), (SandboxForm::Base, false));
    assert!(sa.held_bytes > 0);
    // It names the action and version it ran (a restarted controller keeps it as its
    // function's base).
    assert_eq!(
        sa.action.as_ref().map(|a| a.name.as_str()),
        Some("pkg/kept"),
        "{sa:?}"
    );
    assert_eq!(sa.version.as_deref(), Some("0.0.7"));
    if let Some(so) = st.sandboxes.iter().find(|s| s.id == o) {
        assert_eq!(
            so.action.as_ref().map(|a| a.name.as_str()),
            Some("pkg/other"),
            "{so:?}"
        );
        assert_eq!(so.version.as_deref(), Some("0.0.7"));
    }

    // The dedup start after the restart gives the same state (and a fresh generator).
    let Reply::Restored(r) = agent
        .execute(Command::Restore { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    eprintln!("restore after restart: {r:?}");
    assert!(
        r.transient_bytes >= r.transient_images_bytes && r.transient_images_bytes > 0,
        "m_R is measured: {r:?}"
    );
    let after = call(&agent, &b).await.unwrap();
    assert_eq!(after["h"], before[0]["h"]);
    assert_eq!(after["n"], before[0]["n"]);
    assert_ne!(after["r"], before[0]["r"]);
    let st = status(&agent).await;
    assert!(
        st.restore_transient
            .values()
            .any(|&v| v == r.transient_bytes),
        "{st:?}"
    );

    // Once nothing depends on them, the kept bases retire (their files go).
    agent
        .execute(Command::Purge { sandbox: b.clone() })
        .await
        .unwrap();
    let st = status(&agent).await;
    assert!(
        st.sandboxes.iter().all(|s| s.id != a && s.id != o),
        "{st:?}"
    );
    assert_eq!(std::fs::read_dir(dir.join("bases")).unwrap().count(), 0);

    agent.shutdown().await;
    agent.purge_kept().await;
    assert!(!dir.exists());
}

/// A function whose runtime exits when asked to.
const MORTAL: &str = r#"
import os
DATA = [str(i) * 5 for i in range(20000)]
def main(args):
    if args.get("die"):
        os._exit(3)
    return {"n": len(DATA)}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_whose_process_dies_keeps_its_action_and_version() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let (a, b) = (id("ma"), id("mb"));
    let agent = Agent::new(cfg).unwrap();
    for sb in [&a, &b] {
        start_code(&agent, sb, "pkg/mortal", MORTAL).await;
        super::dedup::call(&agent, sb, json!({})).await.unwrap();
    }
    assert!(matches!(
        agent
            .execute(Command::MakeBase { sandbox: a.clone() })
            .await,
        Ok(Reply::BaseReady(_))
    ));
    assert!(matches!(
        agent.execute(Command::Dedup { sandbox: b.clone() }).await,
        Ok(Reply::Deduped(_))
    ));
    // The base's runtime exits during a run: its pages stay (b depends on them).
    let died = agent
        .execute(Command::Run(medes_agent::RunCommand {
            sandbox: a.clone(),
            params: json!({"die": true}).as_object().cloned().unwrap(),
            env: BTreeMap::new(),
            timeout_ms: 10_000,
        }))
        .await;
    assert!(
        matches!(&died, Ok(Reply::Ran(r)) if r.sandbox_lost()),
        "{died:?}"
    );
    let st = status(&agent).await;
    let sa = st.sandboxes.iter().find(|s| s.id == a).expect("its pages");
    assert_eq!((sa.form, sa.alive), (SandboxForm::Base, false), "{sa:?}");
    assert_eq!(
        sa.action.as_ref().map(|x| x.name.as_str()),
        Some("pkg/mortal"),
        "{sa:?}"
    );
    assert_eq!(sa.version.as_deref(), Some("0.0.7"));
    agent.shutdown().await;
    agent.purge_kept().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_is_dropped_at_start_and_never_restored() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let (a, b, c) = (id("ca"), id("cb"), id("cc"));
    let agent = Agent::new(cfg.clone()).unwrap();
    let before = base_and_dedups(&agent, &a, &[&b, &c]).await;
    let store_b = agent.store_path(&b).unwrap();
    let dir = agent.images_dir().to_path_buf();
    agent.shutdown().await;
    // The base's metadata as an older agent wrote it (no action, no version): it still loads.
    let base_meta = std::fs::read_dir(dir.join("bases"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .find(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            v["sandbox"] == a.0.as_str()
        })
        .expect("the base's metadata");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&base_meta).unwrap()).unwrap();
    let fields = meta.as_object_mut().unwrap();
    assert_eq!(fields.remove("action").unwrap()["name"], "pkg/kept");
    assert_eq!(fields.remove("version").unwrap(), "0.0.7");
    std::fs::write(&base_meta, serde_json::to_vec(&meta).unwrap()).unwrap();
    // Flip bytes in the middle of b's store.
    let mut bytes = std::fs::read(&store_b).unwrap();
    let mid = bytes.len() / 2;
    for x in &mut bytes[mid..mid + 64] {
        *x ^= 0x5a;
    }
    std::fs::write(&store_b, bytes).unwrap();

    let agent = Agent::new(cfg.clone()).unwrap();
    let k = agent.dedup_counters();
    assert_eq!((k.kept_loaded, k.kept_dropped), (2, 1), "{k:?}");
    assert!(!store_b.exists(), "the corrupt store is removed");
    let st = status(&agent).await;
    let sa = st
        .sandboxes
        .iter()
        .find(|s| s.id == a)
        .expect("the base kept");
    assert_eq!(
        (sa.form, sa.action.as_ref(), sa.version.as_ref()),
        (SandboxForm::Base, None, None)
    );
    assert!(matches!(
        agent.execute(Command::Restore { sandbox: b.clone() }).await,
        Err(AgentError::UnknownSandbox(_))
    ));
    // The other one is fine.
    assert!(matches!(
        agent.execute(Command::Restore { sandbox: c.clone() }).await,
        Ok(Reply::Restored(_))
    ));
    assert_eq!(call(&agent, &c).await.unwrap()["h"], before[1]["h"]);
    agent.shutdown().await;
    agent.purge_kept().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_base_drops_its_dependents() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let (a, b) = (id("ba"), id("bb"));
    let agent = Agent::new(cfg.clone()).unwrap();
    base_and_dedups(&agent, &a, &[&b]).await;
    let dir = agent.images_dir().to_path_buf();
    agent.shutdown().await;
    let pages = std::fs::read_dir(dir.join("bases"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "pages"))
        .expect("a base pages file");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[4096 * 3 + 17] ^= 1;
    std::fs::write(&pages, bytes).unwrap();

    let agent = Agent::new(cfg).unwrap();
    let k = agent.dedup_counters();
    // The base fails its checksum; the store that needs it cannot be restored either.
    assert_eq!((k.kept_loaded, k.kept_dropped), (0, 2), "{k:?}");
    assert!(status(&agent).await.sandboxes.is_empty());
    agent.shutdown().await;
    agent.purge_kept().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_agents_cannot_share_a_data_directory() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let agent = Agent::new(cfg.clone()).unwrap();
    // Another live process owning the directory: this process's own second agent is allowed
    // (tests), so fake a foreign owner: pid 1 with its real start time.
    let stat = std::fs::read_to_string("/proc/1/stat").unwrap();
    let start = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(19)
        .unwrap()
        .to_string();
    std::fs::write(agent.images_dir().join("owner"), format!("1 {start}")).unwrap();
    let err = Agent::new(cfg.clone()).err().expect("refused");
    assert!(format!("{err:?}").contains("another live agent"), "{err:?}");
    std::fs::write(agent.images_dir().join("owner"), "").unwrap();
    agent.shutdown().await;
    agent.purge_kept().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_base_stays_a_base_across_an_agent_restart() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    let r = id("rel");
    let agent = Agent::new(cfg.clone()).unwrap();
    start(&agent, &r).await;
    call(&agent, &r).await.unwrap();
    let Ok(Reply::BaseReady(base)) = agent
        .execute(Command::MakeBase { sandbox: r.clone() })
        .await
    else {
        panic!("no base")
    };
    assert!(matches!(
        agent
            .execute(Command::ReleaseBase { sandbox: r.clone() })
            .await,
        Ok(Reply::Purged)
    ));
    agent.shutdown().await;

    // Nothing depends on it, yet the restarted agent keeps it: its process was released on
    // purpose, and the mark is in its metadata. A lost base would be retired here.
    let agent = Agent::new(cfg.clone()).unwrap();
    // A status sweeps the bases without process and dependents: this one stays.
    let st = status(&agent).await;
    let sb = st.sandboxes.iter().find(|s| s.id == r).expect("kept");
    assert_eq!((sb.form, sb.alive), (SandboxForm::Base, false), "{sb:?}");
    assert_eq!(sb.image_bytes, Some(base.image_bytes));
    assert_eq!(agent.dedup_counters().retired, 0);
    // A purge retires it.
    agent
        .execute(Command::Purge { sandbox: r.clone() })
        .await
        .unwrap();
    assert_eq!(agent.n_sandboxes(), 0);
    assert_eq!(agent.dedup_counters().retired, 1);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_dedup_sandbox_is_armed_again_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let Some(cfg) = cfg(data.path()) else {
        return;
    };
    if cfg.armed_per_function == 0 || !cfg.lazy_restore {
        return; // arming is off by configuration
    }
    let (a, b) = (id("ka"), id("kb"));
    let agent = Agent::new(cfg.clone()).unwrap();
    let before = base_and_dedups(&agent, &a, &[&b]).await;
    agent.shutdown().await;

    let agent = Agent::new(cfg.clone()).unwrap();
    let t0 = std::time::Instant::now();
    while !agent.armed().iter().any(|s| s.sandbox == b && s.ready) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "not armed after the restart: {:?} {:?}",
            agent.armed(),
            agent.dedup_counters()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let Reply::Restored(_) = agent
        .execute(Command::Restore { sandbox: b.clone() })
        .await
        .unwrap()
    else {
        panic!()
    };
    let c = agent.dedup_counters();
    assert_eq!((c.arms, c.armed_starts), (1, 1), "{c:?}");
    let after = call(&agent, &b).await.unwrap();
    assert_eq!(after["h"], before[0]["h"]);
    assert_ne!(after["r"], before[0]["r"], "a fresh generator");
    agent.shutdown().await;
    agent.purge_kept().await;
}
