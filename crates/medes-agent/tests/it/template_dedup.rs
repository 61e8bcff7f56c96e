//! Templates as bases (issue 8, phase 2) over real sandboxes and CRIU: a template-born sandbox
//! is deduplicated against its template (most pages at their own address), restored with the
//! right result; templates, their bases and stores against them survive an agent restart.

use std::collections::BTreeMap;

use medes_agent::{
    Agent, AgentConfig, Command, NodeAgent, NodeStatus, Reply, RunCommand, RunOutcome,
    SpawnCommand, TemplateStartCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::{Value, json};

/// State built at init (hashed into the answer), and a per-call allocation.
const CODE: &str = r#"
import hashlib, json
DATA = [{"k": i, "v": str(i) * 5} for i in range(30000)]
BLOB = json.dumps(DATA).encode()
SEEN = []
def main(args):
    SEEN.append(args.get("x"))
    return {"h": hashlib.sha256(BLOB).hexdigest(), "calls": len(SEEN)}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("td{}-{tag}", std::process::id()))
}

fn action() -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: "pkg/td".into(),
    }
}

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())])
}

fn config(data: &std::path::Path) -> Option<AgentConfig> {
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("agent integration tests cannot run in CI: {e}");
        }
        eprintln!("skipping agent integration test: {e}");
        return None;
    }
    let _ = become_subreaper();
    Some(AgentConfig {
        data_dir: data.to_path_buf(),
        sandbox,
        ..Default::default()
    })
}

async fn ok(agent: &Agent, cmd: Command) -> Reply {
    let what = format!("{cmd:?}").chars().take(60).collect::<String>();
    match agent.execute(cmd).await {
        Ok(r) => r,
        Err(e) => panic!("{what}: {e}"),
    }
}

async fn spawn(agent: &Agent, sb: &SandboxId) {
    spawn_version(agent, sb, "1").await;
}

async fn spawn_version(agent: &Agent, sb: &SandboxId, version: &str) {
    let r = ok(
        agent,
        Command::Spawn(SpawnCommand {
            sandbox: sb.clone(),
            action: action(),
            version: version.into(),
            code: Code::Source(CODE.into()),
            main: "main".into(),
            memory_limit: Bytes::mib(256),
            env: env(),
            init_timeout_ms: 20_000,
        }),
    )
    .await;
    assert!(
        matches!(r, Reply::Spawned(ref s) if s.init_error.is_none()),
        "{r:?}"
    );
}

async fn call(agent: &Agent, sb: &SandboxId, x: i64) -> Value {
    let r = ok(
        agent,
        Command::Run(RunCommand {
            sandbox: sb.clone(),
            params: json!({ "x": x }).as_object().cloned().unwrap_or_default(),
            env: BTreeMap::new(),
            timeout_ms: 10_000,
        }),
    )
    .await;
    match r {
        Reply::Ran(r) => match r.outcome {
            RunOutcome::Returned(v) => v,
            other => panic!("run {sb}: {other:?}"),
        },
        other => panic!("run {sb}: {other:?}"),
    }
}

async fn template_start(agent: &Agent, sb: &SandboxId) {
    let r = ok(
        agent,
        Command::TemplateStart(TemplateStartCommand {
            sandbox: sb.clone(),
            action: action(),
            version: "1".into(),
            memory_limit: Bytes::mib(256),
            env: env(),
        }),
    )
    .await;
    assert!(matches!(r, Reply::TemplateStarted(_)), "{r:?}");
}

async fn status(agent: &Agent) -> NodeStatus {
    match ok(agent, Command::Status).await {
        Reply::Status(s) => s,
        other => panic!("status: {other:?}"),
    }
}

async fn dedup(agent: &Agent, sb: &SandboxId) -> medes_agent::DedupReply {
    match ok(
        agent,
        Command::Dedup {
            sandbox: sb.clone(),
        },
    )
    .await
    {
        Reply::Deduped(r) => r,
        other => panic!("dedup {sb}: {other:?}"),
    }
}

async fn restore(agent: &Agent, sb: &SandboxId) -> medes_agent::RestoreReply {
    match ok(
        agent,
        Command::Restore {
            sandbox: sb.clone(),
        },
    )
    .await
    {
        Reply::Restored(r) => r,
        other => panic!("restore {sb}: {other:?}"),
    }
}

/// The template, its born sandbox deduplicated against it and restored; then the template,
/// its base and the store survive an agent restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_born_sandbox_dedups_against_its_template_and_all_survive_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let Some(cfg) = config(data.path()) else {
        return;
    };
    let agent = Agent::new(cfg.clone()).expect("agent");
    let (a, b, c) = (id("a"), id("b"), id("c"));
    spawn(&agent, &a).await;
    let want = call(&agent, &a, 0).await["h"].clone();
    assert!(matches!(
        ok(&agent, Command::MakeTemplate { sandbox: a.clone() }).await,
        Reply::TemplateReady(_)
    ));
    // The template is its function's first base.
    assert_eq!(agent.dedup_counters().bases, 1);

    template_start(&agent, &b).await;
    assert_eq!(call(&agent, &b, 1).await["h"], want);
    let d = dedup(&agent, &b).await;
    let positional = agent.template_counters().positional_pages;
    eprintln!("dedup against the template: {d:?}, positional pages {positional}");
    // Almost every page is at its own address in the template (identical or a small patch).
    assert!(
        positional * 10 >= d.pages * 8,
        "{positional} of {} pages",
        d.pages
    );
    assert!(
        d.stored_bytes * 10 < d.image_bytes,
        "stored {} of {} bytes",
        d.stored_bytes,
        d.image_bytes
    );
    let r = restore(&agent, &b).await;
    eprintln!("dedup start: {r:?}");
    let after = call(&agent, &b, 2).await;
    assert_eq!(after["h"], want);
    // The template saw one call (its warm-up), `b` one more before its dedup.
    assert_eq!(after["calls"], 3, "the restored sandbox has its own state");
    // The re-dedup keeps the store; the template base has a dependent now.
    dedup(&agent, &b).await;
    let st = status(&agent).await;
    assert_eq!(st.templates.len(), 1, "{st:?}");
    assert_eq!(st.templates[0].state, "ready");

    // Restart: the template, its base and the store are kept and verified.
    let dir = agent.template_dir(&action()).expect("template dir");
    agent.shutdown().await;
    assert!(dir.exists());
    let agent = Agent::new(cfg).expect("agent after restart");
    let st = status(&agent).await;
    assert_eq!(st.templates.len(), 1, "{st:?}");
    assert_eq!(st.templates[0].state, "ready", "{st:?}");
    assert_eq!(st.templates[0].version, "1");
    assert!(
        st.sandboxes.iter().any(|s| s.id == b),
        "the store is kept: {st:?}"
    );
    // The store against the template base restores; the template starts.
    restore(&agent, &b).await;
    assert_eq!(call(&agent, &b, 3).await["h"], want);
    template_start(&agent, &c).await;
    assert_eq!(call(&agent, &c, 4).await["h"], want);
    agent.shutdown().await;
    agent.purge_kept().await;
    assert!(!dir.exists());
}

/// A corrupt kept template is dropped at load (the next cold start rebuilds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_kept_template_is_dropped_at_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let Some(cfg) = config(data.path()) else {
        return;
    };
    let agent = Agent::new(cfg.clone()).expect("agent");
    let a = id("ka");
    spawn(&agent, &a).await;
    call(&agent, &a, 0).await;
    ok(&agent, Command::MakeTemplate { sandbox: a.clone() }).await;
    let dir = agent.template_dir(&action()).expect("template dir");
    agent.shutdown().await;
    // Flip a byte of a non-page image (the page image is shared with the base's pages file).
    let core = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("core-")
        })
        .expect("a core image");
    let mut bytes = std::fs::read(&core).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&core, &bytes).unwrap();
    let agent = Agent::new(cfg).expect("agent after restart");
    assert!(status(&agent).await.templates.is_empty());
    assert!(!dir.exists(), "the corrupt template is deleted");
    assert_eq!(agent.dedup_counters().kept_dropped, 1);
    agent.shutdown().await;
    agent.purge_kept().await;
}

/// A template replaced by a new action version loses its image at once; its base stays (an
/// `orphan_base` in the status) while a dedup store depends on it, and retires after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_template_keeps_its_base_while_stores_depend_on_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let Some(cfg) = config(data.path()) else {
        return;
    };
    let agent = Agent::new(cfg).expect("agent");
    let (a, b, c) = (id("oa"), id("ob"), id("oc"));
    spawn(&agent, &a).await;
    let want = call(&agent, &a, 0).await["h"].clone();
    ok(&agent, Command::MakeTemplate { sandbox: a.clone() }).await;
    let dir = agent.template_dir(&action()).expect("template dir");
    template_start(&agent, &b).await;
    call(&agent, &b, 1).await;
    dedup(&agent, &b).await;
    // Version 2: the template of version 1 goes, its base stays for `b`'s store.
    spawn_version(&agent, &c, "2").await;
    assert!(!dir.exists(), "the old template's image is deleted");
    let st = status(&agent).await;
    assert_eq!(st.templates.len(), 1, "{st:?}");
    assert_eq!(st.templates[0].state, "orphan_base", "{st:?}");
    assert!(st.templates[0].held_bytes > 1 << 20, "{st:?}");
    restore(&agent, &b).await;
    assert_eq!(call(&agent, &b, 2).await["h"], want);
    dedup(&agent, &b).await;
    ok(&agent, Command::Purge { sandbox: b.clone() }).await;
    assert_eq!(
        status(&agent).await.templates.len(),
        1,
        "`a` still holds it"
    );
    ok(&agent, Command::Purge { sandbox: a.clone() }).await;
    // Its last dependent gone, the base retires (at the next status).
    let st = status(&agent).await;
    assert!(st.templates.is_empty(), "{st:?}");
    agent.shutdown().await;
    agent.purge_kept().await;
}
