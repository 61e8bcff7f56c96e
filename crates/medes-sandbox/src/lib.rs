//! Isolated, CRIU-checkpointable sandboxes running medes' OpenWhisk-compatible Python runtime.
//!
//! (Design notes are filled in as the implementation lands.)
#![deny(missing_docs)]

mod cgroup;
mod client;
mod criu;
mod launch;
mod net;
mod rootfs;
mod sandbox;
mod types;

use std::path::Path;
use std::process::Command;

pub use sandbox::Sandbox;
pub use types::*;

/// Checks that this host can run sandboxes: root, CRIU 4 or newer, the Python interpreter, the
/// runtime script, a memory cgroup controller, and the `ip` tool (plus `nft` for outbound).
pub fn preflight(cfg: &SandboxConfig) -> Result<(), PreflightError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid != 0 {
        return Err(PreflightError::NotRoot { uid });
    }
    let out = Command::new(&cfg.criu).arg("--version").output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Err(PreflightError::Criu {
                path: cfg.criu.clone(),
                detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
            });
        }
        Err(e) => {
            return Err(PreflightError::Criu {
                path: cfg.criu.clone(),
                detail: e.to_string(),
            });
        }
    };
    let major = version
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .and_then(|v| {
            v.trim()
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
        });
    if major.is_none_or(|m| m < 4) {
        return Err(PreflightError::Criu {
            path: cfg.criu.clone(),
            detail: format!("found {:?}", version.trim()),
        });
    }
    let python_ok = std::fs::metadata(&cfg.python).is_ok_and(|m| m.is_file());
    if !python_ok {
        return Err(PreflightError::Python {
            path: cfg.python.clone(),
        });
    }
    let script = cfg.runtime_dir.join("medes_runtime.py");
    if !script.is_file() {
        return Err(PreflightError::Runtime { path: script });
    }
    if cgroup::detect().is_none() {
        return Err(PreflightError::Cgroup);
    }
    let mut tools = vec!["ip"];
    if cfg.network == NetworkMode::Outbound {
        tools.push("nft");
    }
    for tool in tools {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(PreflightError::Tool { tool });
        }
    }
    Ok(())
}

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`): restored sandboxes,
/// orphaned when CRIU exits, are reparented to it, so it can reap them promptly (a zombie holding
/// a PID breaks later restores). [`Sandbox::restore`] calls it too; calling it again is harmless.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Convenience: the path of a sandbox's images inside a parent directory.
pub fn images_dir_for(parent: &Path, id: &medes_core::SandboxId) -> std::path::PathBuf {
    parent.join(&id.0)
}
