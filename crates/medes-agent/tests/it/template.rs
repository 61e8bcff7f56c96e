//! Templates (issue 8) over real sandboxes and CRIU: make, template starts (right result, fresh
//! randomness), corrupt and failing templates, invalidation by a new version, memory.

use std::collections::BTreeMap;

use medes_agent::{
    Agent, AgentError, Command, NodeAgent, NodeStatus, Reply, RunCommand, RunOutcome, SpawnCommand,
    TemplateStartCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use serde_json::{Value, json};

use super::agent;

/// State built at init (its hash is the answer's `h`), plus the random generators (Python's,
/// the kernel's, numpy's).
const CODE: &str = r#"
import hashlib, json, os, random
import numpy as np
DATA = [{"k": i, "v": str(i) * 5} for i in range(20000)]
BLOB = json.dumps(DATA).encode()
def main(args):
    h = hashlib.sha256(BLOB + json.dumps(args, sort_keys=True).encode()).hexdigest()
    return {"h": h, "r": random.random(), "u": os.urandom(8).hex(), "pid": os.getpid(),
            "n": float(np.random.random())}
"#;

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("tp{}-{tag}", std::process::id()))
}

fn action(name: &str) -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: name.into(),
    }
}

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())])
}

async fn start(agent: &Agent, sb: &SandboxId, name: &str, version: &str) {
    let cmd = Command::Spawn(SpawnCommand {
        sandbox: sb.clone(),
        action: action(name),
        version: version.into(),
        code: Code::Source(CODE.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(256),
        env: env(),
        init_timeout_ms: 20_000,
    });
    match agent.execute(cmd).await {
        Ok(Reply::Spawned(r)) => assert_eq!(r.init_error, None),
        other => panic!("spawn {sb}: {other:?}"),
    }
}

fn template_start(sb: &SandboxId, name: &str, version: &str, limit: Bytes) -> Command {
    Command::TemplateStart(TemplateStartCommand {
        sandbox: sb.clone(),
        action: action(name),
        version: version.into(),
        memory_limit: limit,
        env: env(),
    })
}

async fn call(agent: &Agent, sb: &SandboxId) -> Value {
    let cmd = Command::Run(RunCommand {
        sandbox: sb.clone(),
        params: json!({"x": 1}).as_object().cloned().unwrap_or_default(),
        env: BTreeMap::new(),
        timeout_ms: 10_000,
    });
    match agent.execute(cmd).await {
        Ok(Reply::Ran(r)) => match r.outcome {
            RunOutcome::Returned(v) => v,
            other => panic!("run {sb}: {other:?}"),
        },
        other => panic!("run {sb}: {other:?}"),
    }
}

async fn status(agent: &Agent) -> NodeStatus {
    match agent.execute(Command::Status).await {
        Ok(Reply::Status(s)) => s,
        other => panic!("status: {other:?}"),
    }
}

async fn make_template(agent: &Agent, sb: &SandboxId) -> medes_agent::TemplateReply {
    match agent
        .execute(Command::MakeTemplate {
            sandbox: sb.clone(),
        })
        .await
    {
        Ok(Reply::TemplateReady(r)) => r,
        other => panic!("make template of {sb}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_starts_give_the_result_with_fresh_randomness() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let (a, b, c) = (id("a"), id("b"), id("c"));
    start(&agent, &a, "pkg/tp", "1").await;
    let ra = call(&agent, &a).await;

    let t = make_template(&agent, &a).await;
    eprintln!("template: {t:?}");
    assert!(!t.existed && t.image_bytes > 1 << 20, "{t:?}");
    assert!(t.held_bytes >= t.image_bytes, "{t:?}");
    // The sandbox keeps serving; asking again finds the template.
    assert_eq!(call(&agent, &a).await["h"], ra["h"]);
    assert!(make_template(&agent, &a).await.existed);
    let st = status(&agent).await;
    assert_eq!(st.templates.len(), 1, "{st:?}");
    assert_eq!(st.templates[0].state, "ready");
    // The template is also its function's first base: its share of the registry is added.
    assert!(st.templates[0].held_bytes >= t.held_bytes, "{st:?}");
    assert_eq!(st.templates[0].domain.as_deref(), Some("guest"));

    for sb in [&b, &c] {
        match agent
            .execute(template_start(sb, "pkg/tp", "1", Bytes::mib(256)))
            .await
        {
            Ok(Reply::TemplateStarted(r)) => {
                eprintln!("template start: {r:?}");
                assert!(r.total_ms >= r.restore_ms && r.restore_ms > 0.0, "{r:?}");
            }
            other => panic!("template start {sb}: {other:?}"),
        }
    }
    let (rb, rc) = (call(&agent, &b).await, call(&agent, &c).await);
    assert_eq!(rb["h"], ra["h"]);
    assert_eq!(rc["h"], ra["h"]);
    assert_ne!(rb["r"], rc["r"], "siblings share Python's random state");
    assert_ne!(rb["u"], rc["u"], "siblings share os.urandom output");
    assert_ne!(rb["n"], rc["n"], "siblings share numpy's random state");
    assert_ne!(rb["r"], call(&agent, &a).await["r"]);
    // Each sibling is a sandbox of its own: warm, with its memory.
    let st = status(&agent).await;
    for sb in [&a, &b, &c] {
        let s = st.sandboxes.iter().find(|s| &s.id == sb).expect("listed");
        assert!(s.alive && s.held_bytes > 0, "{s:?}");
    }
    // A template start never reuses an id.
    assert!(matches!(
        agent
            .execute(template_start(&b, "pkg/tp", "1", Bytes::mib(256)))
            .await,
        Err(AgentError::BadSandboxId(_))
    ));
    for sb in [&a, &b, &c] {
        agent
            .execute(Command::Purge {
                sandbox: sb.clone(),
            })
            .await
            .unwrap();
    }
    // The template outlives the sandbox it was made from.
    let d = id("d");
    agent
        .execute(template_start(&d, "pkg/tp", "1", Bytes::mib(256)))
        .await
        .unwrap();
    assert_eq!(call(&agent, &d).await["h"], ra["h"]);
    let n = agent.template_counters();
    assert_eq!((n.made, n.starts, n.start_failures), (1, 3, 0));
    let dir = agent.template_dir(&action("pkg/tp")).expect("template dir");
    agent.shutdown().await;
    assert!(dir.exists(), "templates are kept for the next agent");
    agent.purge_kept().await;
    assert!(!dir.exists(), "purge_kept removes them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_failing_and_stale_templates() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let a = id("ca");
    start(&agent, &a, "pkg/tq", "1").await;
    call(&agent, &a).await;
    make_template(&agent, &a).await;

    // A corrupt page image: an error (the caller cold-starts), and the template is deleted.
    let dir = agent.template_dir(&action("pkg/tq")).expect("template dir");
    let pages = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages file");
    let mut bytes = std::fs::read(&pages).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&pages, &bytes).unwrap();
    let x = id("cx");
    let e = agent
        .execute(template_start(&x, "pkg/tq", "1", Bytes::mib(256)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::TemplateUnavailable { reason, .. } if reason.contains("checksum")),
        "{e:?}"
    );
    assert!(agent.template_dir(&action("pkg/tq")).is_none());
    assert!(!dir.exists());
    let e = agent
        .execute(template_start(&x, "pkg/tq", "1", Bytes::mib(256)))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::TemplateUnavailable { .. }), "{e:?}");
    assert_eq!(agent.template_counters().corrupt, 1);

    // Rebuilt; restores that fail (a cgroup limit far below the image) disable it at the third.
    make_template(&agent, &a).await;
    for i in 1..=3 {
        let e = agent
            .execute(template_start(&x, "pkg/tq", "1", Bytes::mib(4)))
            .await
            .unwrap_err();
        match e {
            AgentError::TemplateStartFailed { disabled, .. } => assert_eq!(disabled, i == 3),
            other => panic!("restore {i}: {other:?}"),
        }
        assert_eq!(
            agent.n_sandboxes(),
            1,
            "a failed template start leaves nothing"
        );
    }
    let e = agent
        .execute(template_start(&x, "pkg/tq", "1", Bytes::mib(256)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::TemplateUnavailable { reason, .. } if reason.contains("disabled")),
        "{e:?}"
    );
    let st = status(&agent).await;
    assert_eq!(st.templates[0].state, "disabled", "{st:?}");
    assert!(st.templates[0].reason.is_some());
    // Still disabled for this version; a new version of the action replaces it.
    assert!(matches!(
        agent
            .execute(Command::MakeTemplate { sandbox: a.clone() })
            .await,
        Err(AgentError::TemplateUnavailable { .. })
    ));
    let b = id("cb");
    start(&agent, &b, "pkg/tq", "2").await;
    // Only the old template's base remains, held for `a` (born from it, still warm).
    let st = status(&agent).await;
    assert!(
        st.templates.iter().all(|t| t.state == "orphan_base"),
        "{st:?}"
    );
    make_template(&agent, &b).await;
    agent
        .execute(template_start(&x, "pkg/tq", "2", Bytes::mib(256)))
        .await
        .unwrap();
    assert!(call(&agent, &x).await["h"].is_string());
    // An old version's start finds nothing (the caller cold-starts).
    assert!(matches!(
        agent
            .execute(template_start(&id("cy"), "pkg/tq", "1", Bytes::mib(256)))
            .await,
        Err(AgentError::TemplateUnavailable { .. })
    ));
    let n = agent.template_counters();
    assert_eq!((n.disabled, n.invalidated), (1, 1), "{n:?}");
    agent.shutdown().await;
    agent.purge_kept().await;
}
