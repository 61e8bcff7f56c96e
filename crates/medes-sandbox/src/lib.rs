//! Isolated, CRIU-checkpointable sandboxes running medes' OpenWhisk-compatible Python runtime.
//!
//! A [`Sandbox`] is one process tree: the Python runtime (`runtime/medes_runtime.py`) as PID 1
//! of its own PID namespace, in its own mount, IPC, UTS and network namespaces and its own
//! cgroup, running as an unprivileged user with no capabilities. The agent talks to it over a
//! Unix socket; CRIU dumps it and restores any number of independent copies of it.
//! This is the only crate of the workspace that touches libc, nix or CRIU.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use medes_sandbox::*;
//! let cfg = SandboxConfig::default();
//! preflight(&cfg)?;          // root, criu >= 4, python, cgroups, ip/nft
//! become_subreaper()?;       // restored copies are reparented to us; we reap them
//! cleanup_stale(&cfg);       // leftovers of a crashed earlier agent
//! let spec = SandboxSpec {
//!     id: medes_core::SandboxId("sb-1".into()),
//!     code_dir: "/var/lib/medes/code/hello".into(), // holds __main__.py
//!     memory_limit: medes_core::Bytes::mib(256),
//!     env: Default::default(),
//! };
//! let sb = Sandbox::start(&cfg, spec.clone()).await?;
//! sb.init(InitRequest { main: "main".into() }).await?;
//! let reply = sb.run(RunRequest {
//!     value: serde_json::Map::new(),
//!     env: Default::default(),
//!     timeout: std::time::Duration::from_secs(60),
//! }).await?;
//! let images = std::path::Path::new("/var/lib/medes/images/sb-1");
//! sb.checkpoint(images, CheckpointMode::LeaveRunning).await?;
//! let copy = Sandbox::restore(&cfg, SandboxSpec { id: medes_core::SandboxId("sb-2".into()), ..spec }, images).await?;
//! # let _ = (reply, copy); Ok(()) }
//! ```
//!
//! # Design
//! - **Launch.** `clone(2)` with `CLONE_NEWPID|NEWNS|NEWIPC|NEWUTS` straight from the caller, so
//!   the runtime is our child, PID 1 of its namespace and (after `setsid`) a session leader, as
//!   CRIU needs to restore copies side by side. The child runs only raw syscalls on data built
//!   before the clone (no allocation after a fork of a multi-threaded process): join the cgroup,
//!   join the prepared network namespace, bind-mount the minimal root read-only, mount `/proc`
//!   and private tmpfs `/tmp` and `/dev/shm`, `pivot_root`, drop every capability (bounding,
//!   ambient, `NO_NEW_PRIVS`), switch to the unprivileged uid/gid, exec Python. No `unshare`
//!   or `setsid` helper process stays around (nothing like `--kill-child` is recorded in images).
//! - **Root.** A skeleton directory on a tmpfs of ours (`run_dir`): empty mount points,
//!   device nodes (null, zero, full, random, urandom), a two-line passwd/group, the host's
//!   usr-merge symlinks. Read-only binds: `/usr` (and non-symlink `/bin`, `/lib`, ...), a few
//!   `/etc` files and `/etc/ssl`, the venv, the runtime at `/runtime`, the code at `/action`,
//!   `ro_mounts`. The root itself is remounted read-only.
//! - **Network.** Each sandbox gets a named netns (`/run/netns/medes-<pid>-<n>`) made with `ip`
//!   before launch: `Isolated` has `lo` only; `Outbound` has a veth pair `mdv<N>`/`eth0` on
//!   10.201.0.0/16 (`/30` number `N`, unique because the host-side name is), a default route,
//!   and NAT by an nftables table `inet medes` that also drops new connections from sandboxes to
//!   the host itself and between sandboxes. Creating one takes three `ip` runs, so
//!   `spare_netns` configured namespaces per mode are kept ready and refilled by a background
//!   thread ([`release_spare_netns`] deletes them at shutdown; [`cleanup_stale`] deletes those of
//!   dead processes).
//! - **Cgroups** by direct file writes (v1: `memory` + `pids` hierarchies, v2: one directory;
//!   detected at run time). A dozen files do not justify `cgroups-rs`, and direct writes keep the
//!   pre-exec cgroup join (writing `0` into `cgroup.procs`) allocation-free. Memory limit =
//!   memory + swap; OOM kills are read from `memory.oom_control`/`memory.events`; `pids.max`
//!   1024 contains fork bombs.
//! - **Runtime protocol.** The agent binds the listening socket (inside the sandbox's netns, so
//!   CRIU finds it) and passes it as fd 3; one JSON request per connection, one JSON line back.
//!   No connection stays open between requests, so a dump never sees an external socket. The
//!   runtime captures fds 1 and 2 through pipes (C extensions and children included) and ends
//!   each request with a marker so the lines of a run are exactly its own.
//! - **Checkpoint** (`criu dump`): the netns and every bind mount are declared external
//!   (`--external net[ino]`, `--external mnt[..]`); the small tmpfs mounts are dumped by CRIU.
//!   Our metadata file (`medes-sandbox.json`) records the listening socket's inode, the keys and
//!   the size of every image file. CRIU runs as the sandbox's uid/gid with all of our
//!   capabilities (`--unprivileged`): `criu dump` reads the task's rlimits with `prlimit(2)`,
//!   which the kernel only allows with matching ids or `CAP_SYS_RESOURCE`, which root lacks on
//!   this project's machines.
//! - **Restore** (`criu restore --restore-detached`): a new run directory, cgroup (CRIU is
//!   started inside it, `--manage-cgroups=ignore`, so every restored page is charged there),
//!   netns (handed over with `--inherit-fd fd[4]:<key>`), root (`--root`), and a fresh listening
//!   socket at its own path (`--inherit-fd fd[3]:socket:[ino]`). Image file sizes are checked
//!   first (a short pages file makes CRIU hang). glibc's user-space `getrandom` state
//!   (`MAP_DROPPABLE` pages, recorded at dump time) is overwritten in every restored process so
//!   that `os.urandom`/`secrets` fall back to the system call instead of replaying the image's
//!   ChaCha stream; the restored runtime is then told to reseed `random`, numpy's global RNG,
//!   OpenSSL and tempfile names.
//! - **Restore with late pages** ([`Sandbox::restore_with`]): the caller may still be writing
//!   the `pages-*.img` files (a rebuild from a dedup store). They are created at their dump-time
//!   sizes and marked with a fanotify `FAN_OPEN_PERM` mark that is never answered; the sandbox
//!   is prepared and CRIU started at once. CRIU builds the process tree, namespaces and mounts
//!   and then blocks in its first open of a pages file until the caller is done, the sizes are
//!   checked and the fanotify group is closed (which allows every pending open). A failure of
//!   the caller's producer is returned whole as the source of [`RestoreError::Images`] (the
//!   caller may downcast it to its own error type). Measured
//!   (`examples/gate_cost.rs`): the gate itself costs ~0–8 ms, and pages that arrive 60 ms after
//!   the start add only a few ms to a ~85–110 ms restore. An action script at
//!   `post-setup-namespaces` did the same but its six `sh` runs cost 15–35 ms under load.
//! - **Lazy restore** ([`Sandbox::restore_with_lazy`]): `criu restore --lazy-pages` with the
//!   crate's own lazy-pages server ([`LazyDaemon`], a thread speaking CRIU's `uffd.c`
//!   protocol), fed by the caller batch by batch. **Armed** ([`Sandbox::prestart_lazy`]): the
//!   same ahead of the request with `--leave-stopped` (CRIU 4.1 leaves every restored task
//!   stopped after it handed over their userfaultfds and said "restore finished"); the
//!   `getrandom` reset is done on the stopped tree, and [`ArmedSandbox::resume`] sends
//!   `SIGCONT` to every process of the cgroup and reseeds the runtime (~5 ms). Meanwhile
//!   [`LazyDaemon::hold_fill`] keeps the server from filling pages in the background (faults
//!   and prefetches are still served), so the stopped tree holds only what CRIU restored
//!   itself (~1–3 MB of cgroup usage for the suite's runtimes).
//! - Every CRIU run is bounded (SIGKILL on expiry), logs at `-v2` (`MEDES_CRIU_VERBOSITY` to
//!   raise) into the images directory, truncated. Where `/run` is not a tmpfs, CRIU's kernel
//!   feature cache (`/run/criu.kdat`) is generated once per boot, saving ~30 ms per CRIU run.
//!
//! # Limitations
//! - No seccomp filter and no user namespace: the function is an unprivileged user of the host
//!   kernel's full syscall surface. All sandboxes share one uid (they cannot see each other's
//!   processes, but files they could both write, e.g. in a shared `ro_mount`, are not separated).
//! - No CPU or I/O limits (only memory and pids); `/tmp` and `/dev/shm` are bounded by size.
//! - `/etc/resolv.conf` is the host's: a resolver on the host's loopback is unreachable from a
//!   sandbox. The outbound subnet 10.201.0.0/16 is fixed.
//! - The runtime as PID 1 does not reap orphaned grandchildren (reaping every child would break
//!   `subprocess`/`multiprocessing`'s own waits); they vanish with the sandbox.
//! - Reseeding after restore reaches only the runtime process: worker processes forked before the
//!   checkpoint (e.g. a `multiprocessing.Pool`) keep identical `random` states across copies,
//!   and Python's hash seed is shared by all copies of one image.
//! - Image integrity beyond file sizes (checksums) is the caller's business.
//! - Only cgroup v1 (this project's machines) is exercised by the tests; the v2 path is written
//!   to the kernel's documented interface but untested here.
//! - The cgroup v1 migration of a new process costs ~10 ms of kernel time (an RCU grace period)
//!   on every start and restore.
//!
//! # Measured (2 vCPU, idle machine, release build, `examples/sandbox_bench.rs`)
//! | action | cold start → first answer | warm round trip | dump | restore → first answer |
//! |---|---|---|---|---|
//! | no-op | 41 ms | 0.27 ms | 51 ms (6.4 MB pages) | 42 ms |
//! | numpy | 94 ms | 0.26 ms | 56 ms (14.7 MB pages) | 61 ms |
#![deny(missing_docs)]

mod cgroup;
mod client;
mod criu;
mod launch;
mod lazy;
mod net;
mod rootfs;
mod sandbox;
mod types;

use std::path::Path;
use std::process::Command;

pub use criu::replace_images;
pub use lazy::{
    DemandFn, LazyDaemon, LazyFeed, LazyLayout, LazyStartError, LazyStats,
    SOCKET_NAME as LAZY_SOCKET_NAME,
};
pub use net::release_spares as release_spare_netns;
pub use sandbox::{ArmedSandbox, Sandbox, cleanup_stale, remove_cgroup_parent};
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

/// Sets the nice value of the calling thread (Linux: `setpriority(PRIO_PROCESS, tid)`), e.g.
/// to run background work (dedup) below invocations and restores. Raising priority needs
/// `CAP_SYS_NICE`.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority takes integers only.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
