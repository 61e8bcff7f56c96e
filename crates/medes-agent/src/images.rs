//! The agent's checkpoint directory on a tmpfs: one subdirectory per data directory,
//! `<images_dir>/d<xxh3 of the canonical data dir, 16 hex digits>/`, so that an agent restarted
//! on the same data directory finds what its predecessor kept (a machine reboot empties the
//! tmpfs). It holds `ckpt/` (dumps being deduplicated), `base/` (dumps being registered),
//! `restore/` (rebuilt images of restores in flight) — all three emptied at start — and, kept
//! across restarts, `store/` (one dedup store per dedup sandbox) and `bases/` (base pages); see
//! `persist.rs`. An `owner` file names the live agent (`<pid> <start time>`), a `data_dir`
//! file the data directory.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{TMPFS_MAGIC, statfs};
use tracing::{info, warn};

const OWNER: &str = "owner";
const DATA_DIR: &str = "data_dir";

/// Subdirectories emptied at every start (work in flight when the previous agent stopped).
const SCRATCH: [&str; 3] = ["ckpt", "base", "restore"];
/// Subdirectories kept across restarts.
const KEPT: [&str; 2] = ["store", "bases"];

/// `<pid> <start time>` of a live process (tells a recycled pid apart).
fn owner_tag(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

/// The pid of the live process named by the `owner` file of `dir`, if any.
fn live_owner(dir: &Path) -> Option<u32> {
    let owner = fs::read_to_string(dir.join(OWNER)).ok()?;
    let pid = owner.split_whitespace().next()?.parse::<u32>().ok()?;
    (owner_tag(pid)? == owner.trim()).then_some(pid)
}

/// The name of the images subdirectory of a data directory.
pub(crate) fn dir_name(data_dir: &Path) -> String {
    let canon = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!(
        "d{:016x}",
        xxhash_rust::xxh3::xxh3_64(canon.as_os_str().as_bytes())
    )
}

/// Why the images directory could not be prepared.
fn in_use(dir: &Path, pid: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{} is in use by another live agent (pid {pid}) on the same data directory",
            dir.display()
        ),
    )
}

/// Makes sure `root` is on a tmpfs (mounting one if not), removes the subdirectories of agents
/// that no longer run and whose data directory is gone, and creates (or takes over) the
/// subdirectory of `data_dir`.
pub(crate) fn prepare(root: &Path, data_dir: &Path) -> io::Result<PathBuf> {
    fs::create_dir_all(root)?;
    let on_tmpfs = statfs(root)
        .map(|s| s.filesystem_type() == TMPFS_MAGIC)
        .map_err(io::Error::from)?;
    if !on_tmpfs {
        mount(
            Some("medes-images"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0700"),
        )
        .map_err(io::Error::from)?;
        info!(path = %root.display(), "mounted a tmpfs for checkpoint images");
    }
    let me = std::process::id();
    let name = dir_name(data_dir);
    for e in fs::read_dir(root)?.flatten() {
        let p = e.path();
        let n = e.file_name().to_string_lossy().into_owned();
        if n == name || !p.is_dir() || live_owner(&p).is_some() {
            continue;
        }
        // Per-process directories of older agents, and directories of data directories that
        // no longer exist (e.g. a benchmark's temporary one).
        let stale = if n.starts_with('a') {
            true
        } else if n.starts_with('d') {
            match fs::read_to_string(p.join(DATA_DIR)) {
                Ok(d) => !Path::new(d.trim()).exists(),
                // Not written yet (an agent starting right now) or left half made long ago.
                Err(_) => fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60)),
            }
        } else {
            false
        };
        if stale {
            match fs::remove_dir_all(&p) {
                Ok(()) => info!(path = %p.display(), "removed images of an agent that is gone"),
                Err(error) => warn!(path = %p.display(), %error, "removing stale images"),
            }
        }
    }
    let dir = root.join(&name);
    if let Some(pid) = live_owner(&dir)
        && pid != me
    {
        return Err(in_use(&dir, pid));
    }
    fs::create_dir_all(&dir)?;
    let canon = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    fs::write(dir.join(OWNER), owner_tag(me).unwrap_or_default())?;
    fs::write(dir.join(DATA_DIR), canon.as_os_str().as_bytes())?;
    for sub in SCRATCH {
        let _ = fs::remove_dir_all(dir.join(sub));
        fs::create_dir_all(dir.join(sub))?;
    }
    for sub in KEPT {
        fs::create_dir_all(dir.join(sub))?;
    }
    Ok(dir)
}

/// Empties the scratch subdirectories (dumps and rebuilt images of work in flight); the kept
/// ones stay. Marks the directory as owned by no one.
pub(crate) fn release(dir: &Path) {
    for sub in SCRATCH {
        let _ = fs::remove_dir_all(dir.join(sub));
    }
    let _ = fs::remove_file(dir.join(OWNER));
}

/// Bytes a file holds on a tmpfs (its size rounded up to whole pages).
pub(crate) fn held_bytes(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_name_is_stable_and_distinct() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        assert_eq!(dir_name(a.path()), dir_name(a.path()));
        assert_ne!(dir_name(a.path()), dir_name(b.path()));
        // A different spelling of the same directory is the same.
        let dotted = a.path().join(".");
        assert_eq!(dir_name(a.path()), dir_name(&dotted));
        assert_eq!(dir_name(a.path()).len(), 17);
    }
}
