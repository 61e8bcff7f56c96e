//! What the privileged gRPC tests share.

use medes_sandbox::{SandboxConfig, become_subreaper, preflight};

/// Whether this machine can run sandboxes (and makes this process their subreaper). Outside CI
/// a missing dependency skips `what` with a message; in CI (`CI=true`) it is a failure.
pub fn can_run(what: &str) -> bool {
    if let Err(e) = preflight(&SandboxConfig::default()) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} cannot run in CI: {e}");
        }
        eprintln!("skipping {what}: {e}");
        return false;
    }
    let _ = become_subreaper();
    true
}
