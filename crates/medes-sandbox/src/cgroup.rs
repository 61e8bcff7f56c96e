//! Per-sandbox cgroups by direct file writes (v1: `memory` + `pids` hierarchies; v2: one unified
//! directory with both controllers enabled in the parent).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medes_core::Bytes;

const CG_ROOT: &str = "/sys/fs/cgroup";
/// Ceiling on tasks per sandbox (fork bombs stay inside).
const PIDS_MAX: u32 = 1024;

/// Which cgroup layout the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    V1,
    V2,
}

pub(crate) fn detect() -> Option<Layout> {
    if Path::new(CG_ROOT)
        .join("memory/memory.limit_in_bytes")
        .exists()
    {
        return Some(Layout::V1);
    }
    let ctrl = fs::read_to_string(Path::new(CG_ROOT).join("cgroup.controllers")).ok()?;
    ctrl.split_whitespace()
        .any(|c| c == "memory")
        .then_some(Layout::V2)
}

/// Removes the parent cgroup directories `<root>/<controller>/<parent>` if they are empty
/// (`rmdir` refuses one that still holds sandboxes or tasks); returns how many went.
pub(crate) fn remove_parent(parent: &str) -> usize {
    let dirs = match detect() {
        Some(Layout::V1) => vec![
            Path::new(CG_ROOT).join("memory").join(parent),
            Path::new(CG_ROOT).join("pids").join(parent),
        ],
        Some(Layout::V2) => vec![Path::new(CG_ROOT).join(parent)],
        None => Vec::new(),
    };
    dirs.iter().filter(|d| fs::remove_dir(d).is_ok()).count()
}

/// The cgroup(s) of one sandbox.
#[derive(Debug)]
pub(crate) struct Cgroup {
    layout: Layout,
    /// v1: [memory dir, pids dir]; v2: [the dir].
    dirs: Vec<PathBuf>,
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn write(path: &Path, v: &str) -> io::Result<()> {
    fs::write(path, v).map_err(werr(path))
}

impl Cgroup {
    /// The (possibly existing) cgroup of sandbox `id`, without creating anything.
    pub(crate) fn existing(parent: &str, id: &str) -> Option<Cgroup> {
        let layout = detect()?;
        let dirs = match layout {
            Layout::V1 => vec![
                Path::new(CG_ROOT).join("memory").join(parent).join(id),
                Path::new(CG_ROOT).join("pids").join(parent).join(id),
            ],
            Layout::V2 => vec![Path::new(CG_ROOT).join(parent).join(id)],
        };
        Some(Cgroup { layout, dirs })
    }

    /// Creates `<root>/<parent>/<id>` and applies the memory limit.
    pub(crate) fn create(
        parent: &str,
        id: &str,
        limit: Bytes,
    ) -> Result<Cgroup, (PathBuf, io::Error)> {
        let layout = detect().ok_or_else(|| {
            (
                PathBuf::from(CG_ROOT),
                io::Error::new(io::ErrorKind::NotFound, "no memory cgroup"),
            )
        })?;
        let cg = match layout {
            Layout::V1 => Cgroup {
                layout,
                dirs: vec![
                    Path::new(CG_ROOT).join("memory").join(parent).join(id),
                    Path::new(CG_ROOT).join("pids").join(parent).join(id),
                ],
            },
            Layout::V2 => {
                let p = Path::new(CG_ROOT).join(parent);
                if !p.exists() {
                    fs::create_dir_all(&p).map_err(|e| (p.clone(), e))?;
                }
                // Enable the controllers for the sandboxes below (idempotent).
                let root_ctl = Path::new(CG_ROOT).join("cgroup.subtree_control");
                let _ = fs::write(&root_ctl, "+memory +pids");
                let ctl = p.join("cgroup.subtree_control");
                write(&ctl, "+memory +pids").map_err(|e| (ctl.clone(), e))?;
                Cgroup {
                    layout,
                    dirs: vec![p.join(id)],
                }
            }
        };
        for d in &cg.dirs {
            // Another agent removing the (then empty) parent as it shuts down
            // (`remove_parent`) may race the creation of parent and child: try again.
            let mut tries = 0;
            loop {
                match fs::create_dir_all(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
                    Err(e) => {
                        let _ = cg.remove();
                        return Err((d.clone(), e));
                    }
                }
            }
        }
        if let Err(e) = cg.set_limits(limit) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn set_limits(&self, limit: Bytes) -> Result<(), (PathBuf, io::Error)> {
        let w = |p: PathBuf, v: String| write(&p, &v).map_err(|e| (p, e));
        match self.layout {
            Layout::V1 => {
                let m = &self.dirs[0];
                w(m.join("memory.limit_in_bytes"), limit.0.to_string())?;
                let sw = m.join("memory.memsw.limit_in_bytes");
                if sw.exists() {
                    w(sw, limit.0.to_string())?;
                }
                // Let the OOM killer act (not pause the cgroup).
                let _ = fs::write(m.join("memory.oom_control"), "0");
                w(self.dirs[1].join("pids.max"), PIDS_MAX.to_string())?;
            }
            Layout::V2 => {
                let d = &self.dirs[0];
                w(d.join("memory.max"), limit.0.to_string())?;
                let sw = d.join("memory.swap.max");
                if sw.exists() {
                    w(sw, "0".into())?;
                }
                w(d.join("pids.max"), PIDS_MAX.to_string())?;
            }
        }
        Ok(())
    }

    /// `cgroup.procs` files a process writes `0` into to join every hierarchy.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// How many times the OOM killer killed a task of this cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        let f = match self.layout {
            Layout::V1 => "memory.oom_control",
            Layout::V2 => "memory.events",
        };
        fs::read_to_string(self.memory_dir().join(f))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Bytes the memory controller charges to the sandbox.
    ///
    /// cgroup v1: `rss + cache + swap` of `memory.stat` plus `memory.kmem.usage_in_bytes`
    /// (kernel memory: page tables, slab, kernel stacks), not `memory.usage_in_bytes`: that
    /// counter includes the charges each CPU pre-takes in batches (up to 64 pages per CPU,
    /// 0.5 MiB on two CPUs), which the kernel's documentation says to read `memory.stat` for,
    /// and which made a small stopped tree look 25% bigger than it is. cgroup v2:
    /// `memory.current`.
    pub(crate) fn usage(&self) -> io::Result<(PathBuf, u64)> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a number");
        match self.layout {
            Layout::V1 => {
                let p = self.memory_dir().join("memory.stat");
                let stat = v1_charged(&fs::read_to_string(&p)?).ok_or_else(bad)?;
                let kmem = fs::read_to_string(self.memory_dir().join("memory.kmem.usage_in_bytes"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                Ok((p, stat + kmem))
            }
            Layout::V2 => {
                let p = self.memory_dir().join("memory.current");
                let v = fs::read_to_string(&p)?.trim().parse().map_err(|_| bad())?;
                Ok((p, v))
            }
        }
    }

    /// Host PIDs of every process in the sandbox.
    pub(crate) fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.memory_dir().join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs everything in the cgroup until it is empty (bounded), then removes it.
    pub(crate) fn kill_and_remove(&self, bound: Duration) -> Result<(), (PathBuf, io::Error)> {
        let t0 = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            if t0.elapsed() > bound {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.remove()
    }

    /// Removes the cgroup directories (retrying briefly while the kernel releases dead tasks).
    pub(crate) fn remove(&self) -> Result<(), (PathBuf, io::Error)> {
        let mut first_err = None;
        for d in &self.dirs {
            let mut tries = 0;
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 200 => {
                        let _ = e;
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        first_err.get_or_insert((d.clone(), e));
                        break;
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// `rss + cache + swap` of a cgroup v1 `memory.stat` (the group's own pages, not its
/// children's `total_*`); `None` if a field is missing or not a number.
fn v1_charged(stat: &str) -> Option<u64> {
    let mut sum = 0u64;
    let mut seen = 0;
    for l in stat.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        if matches!(k, "rss" | "cache" | "swap") {
            sum += v.parse::<u64>().ok()?;
            if k != "swap" {
                seen += 1;
            }
        }
    }
    (seen == 2).then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::v1_charged;

    #[test]
    fn v1_usage_is_rss_cache_and_swap_of_the_group_itself() {
        let stat = "cache 8192\nrss 684032\nrss_huge 0\nshmem 4096\nmapped_file 0\nswap 4096\n\
                    total_cache 99999999\ntotal_rss 99999999\n";
        assert_eq!(v1_charged(stat), Some(8192 + 684032 + 4096));
        assert_eq!(v1_charged("cache 1\nrss 2\n"), Some(3), "swap is optional");
        assert_eq!(v1_charged("cache 1\n"), None, "rss missing");
        assert_eq!(v1_charged("cache x\nrss 2\n"), None, "not a number");
    }
}
