//! Host-side memory of the platform's sandboxes, when the platform runs on this machine.
//!
//! Each sandbox is a memory cgroup (v1) under `<memory mount>/<cgroup name>/<sandbox id>`; its
//! processes are in `cgroup.procs`, and the action it serves is in the `__OW_ACTION_NAME` variable
//! of their environment. For each sandbox this sums `Rss`, `Pss` and private pages from
//! `/proc/PID/smaps_rollup` over its processes (mapreduce's pool workers included). Reading other
//! processes' `environ` and `smaps_rollup` needs root or the same user.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The memory of one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxFootprint {
    /// Sandbox id (the cgroup's directory name).
    pub sandbox: String,
    /// The action's name without namespace (from `__OW_ACTION_NAME`), empty if unknown.
    pub action: String,
    /// Processes in the sandbox.
    pub processes: usize,
    /// Sum of `Rss`, bytes.
    pub rss: u64,
    /// Sum of `Pss`, bytes.
    pub pss: u64,
    /// Sum of `Private_Clean + Private_Dirty`, bytes (USS).
    pub private: u64,
}

/// Why sandboxes could not be listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FootprintError {
    /// The cgroup directory could not be read (platform not on this machine, or not root).
    #[error("reading {path:?}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The default cgroup-v1 directory of medes sandboxes (`agent.sandbox.cgroup_name = "medes"`).
pub const DEFAULT_CGROUP_DIR: &str = "/sys/fs/cgroup/memory/medes";

fn rollup(pid: u32) -> Option<(u64, u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let (mut rss, mut pss, mut private) = (0, 0, 0);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let kb: u64 = val.parse().unwrap_or(0);
        match key {
            "Rss:" => rss += kb * 1024,
            "Pss:" => pss += kb * 1024,
            "Private_Clean:" | "Private_Dirty:" => private += kb * 1024,
            _ => {}
        }
    }
    Some((rss, pss, private))
}

fn action_of(pid: u32) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let s = std::str::from_utf8(kv).ok()?;
        let full = s.strip_prefix("__OW_ACTION_NAME=")?;
        Some(full.rsplit('/').next().unwrap_or(full).to_string())
    })
}

/// The footprint of every sandbox with processes under `cgroup_dir`, sorted by sandbox id.
pub fn sandbox_footprints(cgroup_dir: &Path) -> Result<Vec<SandboxFootprint>, FootprintError> {
    let rd = fs::read_dir(cgroup_dir).map_err(|source| FootprintError::Read {
        path: cgroup_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd.filter_map(Result::ok) {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        let pids: Vec<u32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            continue;
        }
        let mut fp = SandboxFootprint {
            sandbox: entry.file_name().to_string_lossy().into_owned(),
            action: String::new(),
            processes: 0,
            rss: 0,
            pss: 0,
            private: 0,
        };
        for &pid in &pids {
            if fp.action.is_empty() {
                fp.action = action_of(pid).unwrap_or_default();
            }
            if let Some((rss, pss, private)) = rollup(pid) {
                fp.processes += 1;
                fp.rss += rss;
                fp.pss += pss;
                fp.private += private;
            }
        }
        out.push(fp);
    }
    out.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fake_cgroup_tree_with_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let sb = dir.path().join("sb-1");
        fs::create_dir(&sb).unwrap();
        fs::write(sb.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        fs::create_dir(dir.path().join("sb-empty")).unwrap();
        fs::write(dir.path().join("sb-empty/cgroup.procs"), "").unwrap();
        let fps = sandbox_footprints(dir.path()).unwrap();
        assert_eq!(fps.len(), 1);
        assert_eq!(fps[0].sandbox, "sb-1");
        assert_eq!(fps[0].processes, 1);
        assert!(fps[0].rss > 0 && fps[0].pss > 0 && fps[0].pss <= fps[0].rss);
        assert!(sandbox_footprints(&dir.path().join("missing")).is_err());
    }
}
