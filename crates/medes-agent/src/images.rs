//! The agent's checkpoint directory on a tmpfs: one subdirectory per agent instance
//! (`<images_dir>/a<pid>-<n>/`, named by an `owner` file), holding `ckpt/` (dumps being
//! deduplicated), `base/` (dumps being registered), `restore/` (rebuilt images of restores in
//! flight) and `store/` (one dedup store per dedup sandbox).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{TMPFS_MAGIC, statfs};
use tracing::{info, warn};

const OWNER: &str = "owner";

/// `<pid> <start time>` of a live process (tells a recycled pid apart).
fn owner_tag(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Makes sure `root` is on a tmpfs (mounting one if not), removes the subdirectories of agents
/// that no longer run, and creates this agent's own subdirectory.
pub(crate) fn prepare(root: &Path) -> io::Result<PathBuf> {
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
    for e in fs::read_dir(root)?.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('a') || !p.is_dir() {
            continue;
        }
        let owner = fs::read_to_string(p.join(OWNER)).unwrap_or_default();
        let live = owner
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u32>().ok())
            .and_then(owner_tag)
            .is_some_and(|now| now == owner.trim());
        if !live {
            match fs::remove_dir_all(&p) {
                Ok(()) => info!(path = %p.display(), "removed images of an agent that is gone"),
                Err(error) => warn!(path = %p.display(), %error, "removing stale images"),
            }
        }
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let me = std::process::id();
    let dir = root.join(format!("a{me}-{}", N.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_dir_all(&dir);
    for sub in ["ckpt", "base", "restore", "store"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::write(dir.join(OWNER), owner_tag(me).unwrap_or_default())?;
    Ok(dir)
}

/// Bytes a file holds on a tmpfs (its size rounded up to whole pages).
pub(crate) fn held_bytes(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}
