//! The node agent over real sandboxes (root, namespaces, cgroups, the Python runtime). Skipped
//! with a message when the host cannot run sandboxes, unless `CI=true`, where that is a failure.

use std::collections::BTreeMap;
use std::time::Duration;

use medes_agent::{
    Agent, AgentConfig, AgentError, Command, NodeAgent, Reply, RunCommand, RunOutcome, SpawnCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::{Value, json};

pub(crate) fn agent() -> Option<(Agent, tempfile::TempDir)> {
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("agent integration tests cannot run in CI: {e}");
        }
        eprintln!("skipping agent integration test: {e}");
        return None;
    }
    let _ = become_subreaper();
    let data = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig {
        data_dir: data.path().to_path_buf(),
        sandbox,
        ..Default::default()
    };
    Some((Agent::new(cfg).expect("agent"), data))
}

fn id(tag: &str) -> SandboxId {
    SandboxId(format!("ag{}-{tag}", std::process::id()))
}

fn spawn(sandbox: &SandboxId, code: &str) -> Command {
    Command::Spawn(SpawnCommand {
        sandbox: sandbox.clone(),
        action: ActionName {
            namespace: Namespace("guest".into()),
            name: "pkg/act".into(),
        },
        version: "0.0.1".into(),
        code: Code::Source(code.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(128),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())]),
        init_timeout_ms: 10_000,
    })
}

fn run(sandbox: &SandboxId, params: Value, timeout_ms: u64) -> Command {
    Command::Run(RunCommand {
        sandbox: sandbox.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        env: BTreeMap::from([("__OW_ACTIVATION_ID".to_string(), "abc".to_string())]),
        timeout_ms,
    })
}

const CODE: &str = r#"
import os, time
def main(args):
    time.sleep(args.get("sleep", 0))
    print("ran")
    return {"ns": os.environ.get("__OW_NAMESPACE"), "act": os.environ.get("__OW_ACTIVATION_ID")}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_run_status_purge() {
    let Some((agent, data)) = agent() else { return };
    let sb = id("a");
    let Reply::Spawned(r) = agent.execute(spawn(&sb, CODE)).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.init_error, None);
    assert!(r.start_ms > 0.0);
    assert!(
        data.path()
            .join("code/guest/pkg/act/0.0.1/__main__.py")
            .is_file()
    );

    // The same id twice is refused; a bad id too.
    assert_eq!(
        agent.execute(spawn(&sb, CODE)).await.unwrap_err(),
        AgentError::BadSandboxId(sb.clone())
    );
    let bad = SandboxId("../x".into());
    assert_eq!(
        agent.execute(spawn(&bad, CODE)).await.unwrap_err(),
        AgentError::BadSandboxId(bad)
    );

    let Reply::Ran(r) = agent.execute(run(&sb, json!({}), 5_000)).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        r.outcome,
        RunOutcome::Returned(json!({"ns": "guest", "act": "abc"}))
    );
    assert_eq!(r.logs.len(), 1, "{:?}", r.logs);
    assert_eq!(r.logs[0].2.trim_end(), "ran");

    let Reply::Status(st) = agent.execute(Command::Status).await.unwrap() else {
        panic!()
    };
    assert_eq!(st.sandboxes.len(), 1);
    assert!(st.sandboxes[0].alive);
    let m = st.sandboxes[0].memory.expect("memory");
    assert!(m.pss.0 > 1 << 20 && m.pss.0 < 128 << 20, "{m:?}");

    // A purge that races a run: the run completes, then the sandbox is destroyed once.
    let running = agent.execute(run(&sb, json!({"sleep": 0.5}), 5_000));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        agent
            .execute(Command::Purge {
                sandbox: sb.clone()
            })
            .await,
        Ok(Reply::Purged)
    ));
    assert_eq!(agent.n_sandboxes(), 0);
    let Reply::Ran(r) = running.await.unwrap() else {
        panic!()
    };
    assert!(
        matches!(r.outcome, RunOutcome::Returned(_)),
        "{:?}",
        r.outcome
    );
    assert_eq!(
        agent.execute(run(&sb, json!({}), 5_000)).await.unwrap_err(),
        AgentError::UnknownSandbox(sb.clone())
    );
    assert_eq!(
        agent
            .execute(Command::Purge {
                sandbox: sb.clone()
            })
            .await
            .unwrap_err(),
        AgentError::UnknownSandbox(sb.clone())
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_errors_and_timeouts_destroy_the_sandbox() {
    let Some((agent, _data)) = agent() else {
        return;
    };
    let sb = id("b");
    let Reply::Spawned(r) = agent.execute(spawn(&sb, "def main(:\n")).await.unwrap() else {
        panic!()
    };
    assert!(r.init_error.is_some());
    assert_eq!(agent.n_sandboxes(), 0);

    let sb = id("c");
    let Reply::Spawned(r) = agent.execute(spawn(&sb, CODE)).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.init_error, None);
    let Reply::Ran(r) = agent
        .execute(run(&sb, json!({"sleep": 10}), 300))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.outcome, RunOutcome::Timeout { limit_ms: 300 });
    assert_eq!(agent.n_sandboxes(), 0);

    // Shutdown refuses new work.
    let sb = id("d");
    let Reply::Spawned(_) = agent.execute(spawn(&sb, CODE)).await.unwrap() else {
        panic!()
    };
    agent.shutdown().await;
    assert_eq!(agent.n_sandboxes(), 0);
    assert_eq!(
        agent.execute(spawn(&id("e"), CODE)).await.unwrap_err(),
        AgentError::ShuttingDown
    );
}

mod dedup;
mod persist;
mod template;
mod template_dedup;
