//! The agent the lazy dedup start tests share (`tests/lazy.rs`, `tests/lazy_early.rs`): lazy
//! restore on, a fresh data directory, test logging from `MEDES_TEST_LOG`; spawning, running,
//! make-base, dedup and restore commands, and corrupting the bases' pages.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use medes_agent::{
    Agent, AgentConfig, AgentError, BaseReply, Command, DedupReply, NodeAgent, Reply, RestoreReply,
    RunCommand, RunOutcome, SpawnCommand,
};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};
use serde_json::Value;

/// A lazy-restore agent without armed sandboxes (the unarmed lazy start), or `None`
/// (skipped, with the reason) where sandboxes cannot run; in CI (`CI=true`) a missing
/// dependency is a failure.
#[allow(dead_code)]
pub fn lazy_agent(what: &str) -> Option<(Agent, tempfile::TempDir)> {
    lazy_agent_armed(what, 0)
}

/// [`lazy_agent`] keeping `armed` dedup sandboxes per function armed.
pub fn lazy_agent_armed(what: &str, armed: usize) -> Option<(Agent, tempfile::TempDir)> {
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} tests cannot run in CI: {e}");
        }
        eprintln!("skipping {what} test: {e}");
        return None;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEDES_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let _ = become_subreaper();
    let data = tempfile::tempdir().expect("tempdir");
    let cfg = AgentConfig {
        data_dir: data.path().to_path_buf(),
        sandbox,
        lazy_restore: true,
        armed_per_function: armed,
        ..Default::default()
    };
    Some((Agent::new(cfg).expect("agent"), data))
}

/// Spawns `sb` as action `guest/<name>` (version 0.0.1) running `code`; its init must succeed.
pub async fn spawn(agent: &Agent, sb: &SandboxId, name: &str, code: &str) {
    let cmd = Command::Spawn(SpawnCommand {
        sandbox: sb.clone(),
        action: ActionName {
            namespace: Namespace("guest".into()),
            name: name.into(),
        },
        version: "0.0.1".into(),
        code: Code::Source(code.into()),
        main: "main".into(),
        memory_limit: Bytes::mib(512),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())]),
        init_timeout_ms: 60_000,
    });
    match agent.execute(cmd).await {
        Ok(Reply::Spawned(r)) => assert_eq!(r.init_error, None),
        other => panic!("spawn {sb}: {other:?}"),
    }
}

/// Runs `sb` with `params` (a JSON object); its `main` must return.
pub async fn run(agent: &Agent, sb: &SandboxId, params: Value, timeout_ms: u64) -> Value {
    let cmd = Command::Run(RunCommand {
        sandbox: sb.clone(),
        params: params.as_object().cloned().unwrap_or_default(),
        env: BTreeMap::new(),
        timeout_ms,
    });
    match agent.execute(cmd).await {
        Ok(Reply::Ran(r)) => match r.outcome {
            RunOutcome::Returned(v) => v,
            other => panic!("run {sb}: {other:?}"),
        },
        other => panic!("run {sb}: {other:?}"),
    }
}

/// Makes `sb` (warm, idle) a base; it must succeed.
#[allow(dead_code)]
pub async fn make_base(agent: &Agent, sb: &SandboxId) -> BaseReply {
    match agent
        .execute(Command::MakeBase {
            sandbox: sb.clone(),
        })
        .await
    {
        Ok(Reply::BaseReady(r)) => r,
        other => panic!("make base {sb}: {other:?}"),
    }
}

/// Deduplicates `sb` (warm, idle); it must succeed.
#[allow(dead_code)]
pub async fn dedup(agent: &Agent, sb: &SandboxId) -> DedupReply {
    match agent
        .execute(Command::Dedup {
            sandbox: sb.clone(),
        })
        .await
    {
        Ok(Reply::Deduped(r)) => r,
        other => panic!("dedup {sb}: {other:?}"),
    }
}

/// A dedup start of `sb`: its reply, or the agent's error (any other reply panics).
#[allow(dead_code)]
pub async fn restore(agent: &Agent, sb: &SandboxId) -> Result<RestoreReply, AgentError> {
    match agent
        .execute(Command::Restore {
            sandbox: sb.clone(),
        })
        .await
    {
        Ok(Reply::Restored(r)) => Ok(r),
        Ok(other) => panic!("restore {sb}: {other:?}"),
        Err(e) => Err(e),
    }
}

/// XORs bytes of the file at `path` with `mask`, in place: the byte in its middle and, with
/// `step`, every `step`-th byte after it to the end.
#[allow(dead_code)]
pub fn flip_bytes(path: &std::path::Path, mask: u8, step: Option<u64>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let len = f.metadata().expect("stat").len();
    let mut at = len / 2;
    while at < len {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[b[0] ^ mask], at).expect("write");
        match step {
            Some(s) => at += s,
            None => break,
        }
    }
}

/// Overwrites the back half of every base pages file with `junk` bytes, in place (they are
/// mapped: the resident pages change).
pub fn corrupt_bases(agent: &Agent, junk: u8) {
    let bases = agent.images_dir().join("bases");
    let mut n = 0;
    for e in std::fs::read_dir(&bases).expect("bases dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "pages") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open base");
            let len = f.metadata().expect("stat").len();
            let bytes = vec![junk; (len / 2) as usize];
            f.write_all_at(&bytes, len - bytes.len() as u64)
                .expect("write");
            n += 1;
        }
    }
    assert!(n > 0, "no base pages file in {bases:?}");
}
