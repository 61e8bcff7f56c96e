//! The agent the lazy dedup start tests share (`tests/lazy.rs`, `tests/lazy_early.rs`): lazy
//! restore on, a fresh data directory, test logging from `MEDES_TEST_LOG`.

use medes_agent::{Agent, AgentConfig};
use medes_sandbox::{SandboxConfig, become_subreaper, preflight};

/// A lazy-restore agent, or `None` (skipped, with the reason) where sandboxes cannot run;
/// in CI (`CI=true`) a missing dependency is a failure.
pub fn lazy_agent(what: &str) -> Option<(Agent, tempfile::TempDir)> {
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
        ..Default::default()
    };
    Some((Agent::new(cfg).expect("agent"), data))
}
