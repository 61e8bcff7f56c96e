//! The [`Sandbox`] type: start, talk, measure, checkpoint, restore, destroy.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use medes_core::{Bytes, SandboxId};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::cgroup::Cgroup;
use crate::criu::{self, Meta, Outcome};
use crate::launch::{self, LaunchPlan, cpath};
use crate::lazy::LazyDaemon;
use crate::net::{self, Netns};
use crate::rootfs::{self, Mount, MountKind};
use crate::*;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const INIT_TIMEOUT: Duration = Duration::from_secs(300);
const DUMP_TIMEOUT: Duration = Duration::from_secs(120);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
const NET_KEY: &str = "medes-net";
const LISTEN_FD: RawFd = 3;

/// One running sandbox: a process tree in its own namespaces and cgroup.
///
/// `Send + Sync`: requests may run concurrently (up to the action's concurrency); a checkpoint
/// waits for in-flight requests and holds new ones back while CRIU runs.
#[derive(Debug)]
pub struct Sandbox {
    id: SandboxId,
    sock: PathBuf,
    pid: i32,
    memory_limit: Bytes,
    hostname: String,
    mounts: Vec<Mount>,
    listen_ino: u64,
    criu: PathBuf,
    uid: u32,
    gid: u32,
    dead: AtomicBool,
    gate: tokio::sync::RwLock<()>,
    res: Mutex<Resources>,
    /// Private file mappings its restore split ([`Sandbox::set_split_mappings`]), put back in
    /// its checkpoints.
    split: Mutex<SplitMappings>,
}

/// What must be released when the sandbox goes; teardown is idempotent.
#[derive(Debug)]
struct Resources {
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
    cgroup: Option<Cgroup>,
    netns: Option<Netns>,
    dir: Option<PathBuf>,
}

impl Resources {
    fn empty() -> Resources {
        Resources {
            pid: None,
            pidfd: None,
            cgroup: None,
            netns: None,
            dir: None,
        }
    }

    fn kill(&self) {
        if let Some(fd) = &self.pidfd {
            pidfd_kill(fd);
        }
    }

    fn teardown(&mut self) -> Result<(), DestroyError> {
        self.kill();
        let mut err = None;
        if let Some(cg) = self.cgroup.take()
            && let Err((path, source)) = cg.kill_and_remove(Duration::from_secs(5))
        {
            err.get_or_insert(DestroyError::Cgroup { path, source });
        }
        if let Some(pid) = self.pid.take() {
            reap(pid, Duration::from_secs(5));
        }
        self.pidfd = None;
        if let Some(ns) = self.netns.take() {
            ns.remove();
        }
        if let Some(dir) = self.dir.take()
            && let Err(source) = fs::remove_dir_all(&dir)
            && source.kind() != io::ErrorKind::NotFound
        {
            err.get_or_insert(DestroyError::Cleanup {
                what: dir.display().to_string(),
                source,
            });
        }
        err.map_or(Ok(()), Err)
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: a signal sent through a pidfd we own cannot hit a recycled pid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            0usize,
            0u32,
        )
    };
}

fn pidfd_exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// Reaps `pid` if it is our child (bounded); ignores "not our child".
fn reap(pid: i32, bound: Duration) {
    let t0 = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: waitpid on a specific pid with a local status.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
        if r != 0 || t0.elapsed() > bound {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ensures `run_dir` exists on a tmpfs of our own (device nodes must work there).
fn ensure_run_dir(run_dir: &Path) -> io::Result<()> {
    static DONE: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|p| p == run_dir) {
        return Ok(());
    }
    fs::create_dir_all(run_dir)?;
    let canon = run_dir.canonicalize()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mountinfo.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4).is_some_and(|mp| Path::new(mp) == canon)
    });
    if !mounted {
        let c = cpath(&canon)?;
        // SAFETY: valid C strings; mounting a fresh tmpfs on our own directory.
        let r = unsafe {
            libc::mount(
                c"medes-run".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755".as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    done.push(run_dir.to_path_buf());
    Ok(())
}

/// File in a sandbox's run directory naming the process that owns it (`<pid> <start time>`).
const OWNER: &str = "owner";
/// File in a sandbox's run directory naming its network namespace.
const NETNS: &str = "netns";

/// `<pid> <start time in clock ticks>` of a live process (the start time tells a recycled pid
/// apart).
fn owner_tag(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split(' ').nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Removes the parent cgroup of `cfg`'s sandboxes (`cfg.cgroup_name`, under every controller)
/// if it is empty, as an agent does when it shuts down: instances and benchmark runs with a
/// parent of their own (`medes-bench-<pid>`, ...) leave none behind. A parent that still holds
/// sandboxes (another agent's) is left alone. Returns how many directories were removed.
pub fn remove_cgroup_parent(cfg: &SandboxConfig) -> usize {
    crate::cgroup::remove_parent(&cfg.cgroup_name)
}

/// Removes what sandboxes of processes that no longer exist left behind under
/// `cfg.run_dir` (a crashed or killed agent cannot run its destructors): kills their
/// processes, removes their cgroups, network namespaces and run directories, and deletes spare
/// network namespaces of dead processes. Sandboxes of live processes (other agents, concurrent
/// tests) are left alone. Returns how many sandboxes and namespaces were removed.
/// Call it once when an agent starts.
pub fn cleanup_stale(cfg: &SandboxConfig) -> usize {
    let Ok(entries) = fs::read_dir(&cfg.run_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if !valid_id(&id) || !e.path().is_dir() {
            continue;
        }
        let owner = fs::read_to_string(e.path().join(OWNER)).unwrap_or_default();
        let live = owner
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .and_then(owner_tag)
            .is_some_and(|now| now == owner.trim());
        if live {
            continue;
        }
        let mut res = Resources::empty();
        res.cgroup = Cgroup::existing(&cfg.cgroup_name, &id);
        res.netns = fs::read_to_string(e.path().join(NETNS))
            .ok()
            .map(|name| Netns {
                name: name.trim().to_string(),
                veth: None,
            });
        res.dir = Some(e.path());
        match res.teardown() {
            Ok(()) => n += 1,
            Err(err) => warn!(sandbox_id = %id, error = %err, "cleaning up a stale sandbox"),
        }
    }
    n + net::remove_orphans()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 48
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn hostname_for(id: &str) -> String {
    let mut h: String = format!("sb-{id}");
    h.truncate(63);
    h
}

/// Pre-allocated state for a pre-exec hook that joins cgroups (writes `0` into `cgroup.procs`).
fn join_cgroup_hook(
    procs: Vec<CString>,
    dups: Vec<(RawFd, RawFd)>,
) -> Box<dyn FnMut() -> io::Result<()> + Send + Sync> {
    Box::new(move || {
        for f in &procs {
            // SAFETY: raw syscalls on pre-built C strings.
            unsafe {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(fd);
            }
        }
        // Move every source out of the target range first, then place them.
        let mut moved = [0 as RawFd; 8];
        for (i, (src, _)) in dups.iter().enumerate().take(8) {
            // SAFETY: duplicating an fd we own to a number >= 64.
            let r = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            moved[i] = r;
        }
        for (i, (_, dst)) in dups.iter().enumerate().take(8) {
            // SAFETY: dup2 onto a fixed fd number; clears close-on-exec on the target.
            if unsafe { libc::dup2(moved[i], *dst) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

/// A pre-exec hook that runs CRIU as the sandbox's uid/gid while keeping every capability the
/// caller has (`PR_SET_KEEPCAPS`, then ambient capabilities across exec); CRIU then needs
/// `--unprivileged`. Why: `criu dump` reads the task's rlimits with `prlimit(2)`, which the
/// kernel allows only with matching uids/gids or `CAP_SYS_RESOURCE`, and root lacks the latter in
/// some environments (containers, this project's CI machines).
fn ids_hook(uid: u32, gid: u32) -> Box<dyn FnMut() -> io::Result<()> + Send + Sync> {
    Box::new(move || {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const V3: u32 = 0x2008_0522;
        let err = || Err(io::Error::last_os_error());
        // SAFETY: raw syscalls on local, correctly laid-out structs (capget/capset ABI v3).
        unsafe {
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return err();
            }
            let mut h = Header {
                version: V3,
                pid: 0,
            };
            let mut d = [Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) != 0 {
                return err();
            }
            for x in &mut d {
                x.effective = x.permitted;
                x.inheritable = x.permitted;
            }
            if libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) != 0 {
                return err();
            }
            for cap in 0..64u32 {
                let (w, b) = ((cap / 32) as usize, cap % 32);
                if d[w].permitted & (1 << b) != 0 {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        cap as u64,
                        0,
                        0,
                    );
                }
            }
        }
        Ok(())
    })
}

struct Prepared {
    res: Resources,
    dir: PathBuf,
    root: PathBuf,
    sock: PathBuf,
    listener: UnixListener,
    listen_ino: u64,
    netns_fd: OwnedFd,
    mounts: Vec<Mount>,
}

/// Creates run dir, cgroup, netns, root skeleton and the listening socket.
fn prepare(cfg: &SandboxConfig, spec: &SandboxSpec) -> Result<Prepared, StartError> {
    let id = &spec.id.0;
    if !valid_id(id) {
        return Err(StartError::InvalidSpec {
            reason: format!("sandbox id {id:?} must be 1-48 characters of [A-Za-z0-9_-]"),
        });
    }
    if !spec.code_dir.is_dir() {
        return Err(StartError::InvalidSpec {
            reason: format!("code directory {:?} does not exist", spec.code_dir),
        });
    }
    if spec.memory_limit.0 < 16 * 1024 * 1024 {
        return Err(StartError::InvalidSpec {
            reason: format!("memory limit {} is below 16 MiB", spec.memory_limit),
        });
    }
    let io_err = |what: String| move |source| StartError::Io { what, source };
    ensure_run_dir(&cfg.run_dir).map_err(io_err(format!("preparing {:?}", cfg.run_dir)))?;
    let dir = cfg.run_dir.join(id);
    create_run_dir(&dir).map_err(io_err(format!("creating {dir:?}")))?;
    let mut res = Resources::empty();
    res.dir = Some(dir.clone());
    fs::write(
        dir.join(OWNER),
        owner_tag(std::process::id()).unwrap_or_default(),
    )
    .map_err(io_err(format!("writing {dir:?}/{OWNER}")))?;
    let cg = Cgroup::create(&cfg.cgroup_name, id, spec.memory_limit)
        .map_err(|(path, source)| StartError::Cgroup { path, source })?;
    res.cgroup = Some(cg);
    let ns =
        net::take(cfg.network, cfg.spare_netns).map_err(|detail| StartError::Network { detail })?;
    fs::write(dir.join(NETNS), &ns.name).map_err(io_err(format!("writing {dir:?}/{NETNS}")))?;
    let ns_path = ns.path();
    res.netns = Some(ns);
    let (mounts, links) = rootfs::plan(cfg, spec);
    let root = dir.join("root");
    rootfs::prepare(&root, &mounts, &links, cfg.uid, cfg.gid)
        .map_err(io_err("preparing the root".into()))?;
    let netns_fd: OwnedFd = fs::File::open(&ns_path)
        .map_err(io_err(format!("opening {ns_path:?}")))?
        .into();
    let sock = dir.join("rt.sock");
    let listener = bind_in_netns(&sock, &netns_fd).map_err(io_err(format!("binding {sock:?}")))?;
    let listen_ino = fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
        .map(|m| m.ino())
        .map_err(io_err("reading the socket inode".into()))?;
    Ok(Prepared {
        res,
        dir,
        root,
        sock,
        listener,
        listen_ino,
        netns_fd,
        mounts,
    })
}

/// Creates a sandbox's run directory. One that exists and belongs to this process is an
/// earlier sandbox of the same id still being torn down (a start that failed while its
/// preparation ran in the background): waits for it to go, bounded.
fn create_run_dir(dir: &Path) -> io::Result<()> {
    let t0 = Instant::now();
    loop {
        match fs::create_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let ours = fs::read_to_string(dir.join(OWNER))
                    .is_ok_and(|o| owner_tag(std::process::id()).is_some_and(|me| me == o.trim()));
                if !ours || t0.elapsed() > Duration::from_secs(2) {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Binds the runtime's listening socket *inside* the sandbox's network namespace (CRIU only
/// finds sockets of the dumped task's netns) at a host path, from a short-lived thread so the
/// caller's own namespace never changes.
fn bind_in_netns(path: &Path, netns: &OwnedFd) -> io::Result<UnixListener> {
    let raw = netns.as_raw_fd();
    let path = path.to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this (dedicated, about to exit) thread with an fd we own.
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            UnixListener::bind(&path)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("bind thread panicked")))
    })
}

fn runtime_env(spec: &SandboxSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("MEDES_LISTEN_FD".into(), LISTEN_FD.to_string()),
    ];
    for (k, v) in &spec.env {
        if !k.is_empty() && !k.contains('=') && !k.contains('\0') && !v.contains('\0') {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

impl Sandbox {
    /// Starts a sandbox; returns once the runtime answers on its socket.
    pub async fn start(cfg: &SandboxConfig, spec: SandboxSpec) -> Result<Sandbox, StartError> {
        let t0 = Instant::now();
        let cfg2 = cfg.clone();
        let spec2 = spec.clone();
        let (mut res, sock, listen_ino, mounts, pid) =
            tokio::task::spawn_blocking(move || -> Result<_, StartError> {
                let p = prepare(&cfg2, &spec2)?;
                let prepared = t0.elapsed();
                let argv = vec![
                    cfg2.python.display().to_string(),
                    "-I".into(),
                    "-B".into(),
                    "/runtime/medes_runtime.py".into(),
                ];
                let mut plan = LaunchPlan::new(
                    &p.root,
                    &p.mounts,
                    p.res
                        .cgroup
                        .as_ref()
                        .map(|c| c.procs_files())
                        .unwrap_or_default(),
                    p.netns_fd.as_raw_fd(),
                    p.listener.as_raw_fd(),
                    &hostname_for(&spec2.id.0),
                    cfg2.uid,
                    cfg2.gid,
                    &argv,
                    &runtime_env(&spec2),
                )
                .map_err(|source| StartError::Io {
                    what: "building the launch plan".into(),
                    source,
                })?;
                plan.no_aslr = !cfg2.aslr;
                let mut res = p.res;
                let pid = launch::spawn(&plan)
                    .map_err(|(step, source)| StartError::Setup { step, source })?;
                res.pid = Some(pid);
                res.pidfd = Some(pidfd_open(pid).map_err(|source| StartError::Io {
                    what: "pidfd_open".into(),
                    source,
                })?);
                let _ = p.dir;
                debug!(
                    prepare_ms = prepared.as_secs_f64() * 1e3,
                    exec_ms = (t0.elapsed() - prepared).as_secs_f64() * 1e3,
                    "sandbox launched"
                );
                Ok((res, p.sock, p.listen_ino, p.mounts, pid))
            })
            .await
            .map_err(|e| StartError::Io {
                what: "joining the launcher".into(),
                source: io::Error::other(e),
            })??;
        let sb = Sandbox {
            id: spec.id.clone(),
            sock,
            pid,
            memory_limit: spec.memory_limit,
            hostname: hostname_for(&spec.id.0),
            mounts,
            listen_ino,
            criu: cfg.criu.clone(),
            uid: cfg.uid,
            gid: cfg.gid,
            dead: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            res: Mutex::new(std::mem::replace(&mut res, Resources::empty())),
            split: Mutex::new(Vec::new()),
        };
        match tokio::time::timeout(
            READY_TIMEOUT,
            client::call(&sb.sock, &json!({"op": "ping"})),
        )
        .await
        {
            Ok(Ok(r)) if !r.is_empty() => {}
            Ok(Ok(_)) | Ok(Err(_)) => {
                let reason = sb.exit_reason();
                let _ = sb.destroy().await;
                return Err(StartError::Died { reason });
            }
            Err(_) => {
                let _ = sb.destroy().await;
                return Err(StartError::NotReady {
                    after: READY_TIMEOUT,
                });
            }
        }
        info!(sandbox_id = %spec.id, pid, ms = t0.elapsed().as_secs_f64() * 1e3, "sandbox started");
        Ok(sb)
    }

    fn exit_reason(&self) -> String {
        let mut st = 0;
        // SAFETY: waitpid on our own child's pid with a local status.
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG | libc::__WALL) };
        if r == self.pid {
            self.res.lock().unwrap_or_else(|e| e.into_inner()).pid = None;
            if libc::WIFSIGNALED(st) {
                return format!("runtime killed by signal {}", libc::WTERMSIG(st));
            }
            if libc::WIFEXITED(st) {
                return format!("runtime exited with status {}", libc::WEXITSTATUS(st));
            }
        }
        "the runtime closed the connection without a reply".into()
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.res.lock().unwrap_or_else(|e| e.into_inner()).kill();
    }

    fn oom_kills(&self) -> u64 {
        self.res
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cgroup
            .as_ref()
            .map_or(0, |c| c.oom_kills())
    }

    /// Classifies a failed request and kills the sandbox.
    async fn failed(&self, reason: String) -> RunError {
        // The kernel may still be delivering the OOM kill: give the counter a moment.
        let mut oom = self.oom_kills() > 0;
        if !oom {
            tokio::time::sleep(Duration::from_millis(5)).await;
            oom = self.oom_kills() > 0;
        }
        let reason = if self.is_alive() {
            reason
        } else {
            self.exit_reason()
        };
        self.kill();
        if oom {
            RunError::OutOfMemory {
                limit: self.memory_limit,
            }
        } else {
            RunError::Crashed { reason }
        }
    }

    async fn request(&self, req: Value, timeout: Duration) -> Result<Value, RunError> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(RunError::NotRunning);
        }
        let reply = match tokio::time::timeout(timeout, client::call(&self.sock, &req)).await {
            Err(_) => {
                let oom = self.oom_kills() > 0;
                self.kill();
                return Err(if oom {
                    RunError::OutOfMemory {
                        limit: self.memory_limit,
                    }
                } else {
                    RunError::Timeout { after: timeout }
                });
            }
            Ok(Err(e)) => {
                if self.is_alive() && self.oom_kills() == 0 {
                    return Err(RunError::Io {
                        socket: self.sock.clone(),
                        source: e,
                    });
                }
                return Err(self.failed(format!("connection failed: {e}")).await);
            }
            Ok(Ok(r)) if r.is_empty() => return Err(self.failed("no reply".into()).await),
            Ok(Ok(r)) => r,
        };
        let v: Value = serde_json::from_slice(&reply).map_err(|e| RunError::Protocol {
            detail: format!("reply is not JSON: {e}"),
        })?;
        if let Some(p) = v.get("protocol_error") {
            return Err(RunError::Protocol {
                detail: p.as_str().unwrap_or("?").to_string(),
            });
        }
        Ok(v)
    }

    /// Loads the action's code and resolves the entry function.
    pub async fn init(&self, req: InitRequest) -> Result<InitReply, RunError> {
        let _g = self.gate.read().await;
        let v = self
            .request(json!({"op": "init", "main": req.main}), INIT_TIMEOUT)
            .await?;
        Ok(InitReply {
            ok: v.get("ok").and_then(Value::as_bool).unwrap_or(false),
            error: v.get("error").and_then(Value::as_str).map(str::to_string),
            logs: parse_logs(v.get("logs")),
            init_ms: v.get("init_ms").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }

    /// Runs the action once.
    pub async fn run(&self, req: RunRequest) -> Result<RunReply, RunError> {
        let _g = self.gate.read().await;
        let body = json!({"op": "run", "value": req.value, "env": req.env});
        let mut v = self.request(body, req.timeout).await?;
        Ok(RunReply {
            result: v.get_mut("result").map(Value::take).unwrap_or(Value::Null),
            error: v.get("error").and_then(Value::as_str).map(str::to_string),
            logs: parse_logs(v.get("logs")),
            main_ms: v.get("main_ms").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Host PID of the sandbox's init process (the runtime).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Path of the runtime's Unix socket on the host.
    pub fn socket_path(&self) -> &Path {
        &self.sock
    }

    /// Current memory of the sandbox.
    pub fn memory(&self) -> Result<MemoryUsage, MemoryError> {
        let res = self.res.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cg) = res.cgroup.as_ref() else {
            return Err(MemoryError::Read {
                path: PathBuf::new(),
                source: io::Error::new(io::ErrorKind::NotFound, "sandbox destroyed"),
            });
        };
        let (mut pss, mut rss) = (0u64, 0u64);
        for pid in cg.pids() {
            let p = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
            let Ok(s) = fs::read_to_string(&p) else {
                continue;
            }; // exited meanwhile
            for l in s.lines() {
                let kb = |rest: &str| -> Option<u64> {
                    rest.trim()
                        .strip_suffix("kB")
                        .and_then(|n| n.trim().parse().ok())
                };
                if let Some(rest) = l.strip_prefix("Pss:") {
                    pss += kb(rest).ok_or_else(|| MemoryError::Parse { path: p.clone() })? * 1024;
                } else if let Some(rest) = l.strip_prefix("Rss:") {
                    rss += kb(rest).ok_or_else(|| MemoryError::Parse { path: p.clone() })? * 1024;
                }
            }
        }
        let (_, usage) = cg.usage().map_err(|source| MemoryError::Read {
            path: PathBuf::from("memory cgroup usage"),
            source,
        })?;
        Ok(MemoryUsage {
            pss: Bytes(pss),
            rss: Bytes(rss),
            cgroup_usage: Bytes(usage),
        })
    }

    /// Whether the sandbox's init process is still alive.
    pub fn is_alive(&self) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return false;
        }
        let res = self.res.lock().unwrap_or_else(|e| e.into_inner());
        match &res.pidfd {
            Some(fd) => !pidfd_exited(fd),
            None => false,
        }
    }

    /// Records the private file mappings that the images this sandbox was restored from split
    /// into anonymous runs (`medes_criu_image::lazify`, by pid in the images): its
    /// checkpoints put them back (`medes_criu_image::unlazify`), so a dump of it describes
    /// its mappings as the original dump did.
    pub fn set_split_mappings(&self, split: SplitMappings) {
        *self.split.lock().unwrap_or_else(|e| e.into_inner()) = split;
    }

    /// Dumps the sandbox with CRIU into `images_dir` (created if missing; use an empty one:
    /// files of an earlier dump are overwritten, stray ones would be listed as part of it).
    ///
    /// The directory then holds plain CRIU images (`pages-*.img`, `pagemap-*.img`, ...), the
    /// tmpfs contents of `/tmp` and `/dev/shm`, `dump.log` (truncated) and `medes-sandbox.json`
    /// (what [`Sandbox::restore`] needs besides CRIU's images, including every image file's
    /// size). Waits for in-flight requests and holds new ones until the dump is done.
    pub async fn checkpoint(
        &self,
        images_dir: &Path,
        mode: CheckpointMode,
    ) -> Result<CheckpointInfo, CheckpointError> {
        let _g = self.gate.write().await;
        if !self.is_alive() {
            return Err(CheckpointError::NotRunning);
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        fs::create_dir_all(images_dir).map_err(io_err(images_dir))?;
        let criu_bin = self.criu.clone();
        let _ = tokio::task::spawn_blocking(move || criu::ensure_kdat_cache(&criu_bin)).await;
        let netns_ino = {
            let res = self.res.lock().unwrap_or_else(|e| e.into_inner());
            let p = res.netns.as_ref().map(|n| n.path()).unwrap_or_default();
            fs::metadata(&p).map(|m| m.ino()).map_err(io_err(&p))?
        };
        let log = images_dir.join("dump.log");
        let mut args: Vec<OsString> = vec![
            "dump".into(),
            "--tree".into(),
            self.pid.to_string().into(),
            "--images-dir".into(),
            images_dir.into(),
            "--log-file".into(),
            log.clone().into(),
            criu::verbosity().into(),
            "--unprivileged".into(),
            "--network-lock".into(),
            "skip".into(),
            "--external".into(),
            format!("net[{netns_ino}]:{NET_KEY}").into(),
        ];
        let mut ext = Vec::new();
        for (i, m) in self.mounts.iter().enumerate() {
            if matches!(m.kind, MountKind::Bind { .. }) {
                let key = format!("m{i}");
                args.push("--external".into());
                args.push(format!("mnt[{}]:{key}", m.target.display()).into());
                ext.push((m.target.clone(), key));
            }
        }
        if mode == CheckpointMode::LeaveRunning {
            args.push("--leave-running".into());
        }
        let t0 = Instant::now();
        let droppable = {
            let res = self.res.lock().unwrap_or_else(|e| e.into_inner());
            droppable_by_ns_pid(&res.cgroup.as_ref().map(|c| c.pids()).unwrap_or_default())
        };
        let outcome = criu::run(
            &self.criu,
            args,
            &log,
            DUMP_TIMEOUT,
            Some(ids_hook(self.uid, self.gid)),
        )
        .await;
        let dump_ms = t0.elapsed().as_secs_f64() * 1e3;
        if mode == CheckpointMode::Stop {
            // CRIU kills the tree after a successful dump; on failure it resumes it.
            if matches!(outcome, Outcome::Ok) {
                self.dead.store(true, Ordering::SeqCst);
            }
        }
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed { status, log_tail } if criu::refused_tcp(&log_tail) => {
                return Err(CheckpointError::TcpSocket { status, log_tail });
            }
            Outcome::Failed { status, log_tail } => {
                return Err(CheckpointError::Criu { status, log_tail });
            }
            Outcome::TimedOut => {
                // A half-dumped tree may be left frozen: it is unusable.
                self.kill();
                return Err(CheckpointError::Timeout {
                    after: DUMP_TIMEOUT,
                });
            }
            Outcome::Spawn(source) => {
                return Err(CheckpointError::Io {
                    path: self.criu.clone(),
                    source,
                });
            }
        }
        let split = self.split.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !split.is_empty() {
            // Not putting them back leaves a right dump whose mappings differ from the
            // original's (the dedup engine then matches fewer of its pointers): not an error.
            if let Err(error) = criu::put_back_split_mappings(images_dir, &split) {
                warn!(sandbox_id = %self.id, %error, "split file mappings not put back");
            }
        }
        let files = criu::image_files(images_dir).map_err(io_err(images_dir))?;
        let page_image_bytes = files
            .iter()
            .filter(|(n, _)| n.starts_with("pages-"))
            .map(|(_, s)| *s)
            .sum();
        let meta = Meta {
            format: 1,
            listen_ino: self.listen_ino,
            net_key: NET_KEY.into(),
            mounts: ext,
            hostname: self.hostname.clone(),
            files,
            droppable,
        };
        criu::write_meta(images_dir, &meta).map_err(io_err(images_dir))?;
        debug!(sandbox_id = %self.id, dump_ms, "checkpointed");
        Ok(CheckpointInfo {
            images_dir: images_dir.to_path_buf(),
            page_image_bytes: Bytes(page_image_bytes),
            dump_ms,
        })
    }

    /// Restores a new, independent sandbox from a checkpoint: its own id, cgroup (charged for
    /// every restored page), network namespace, run directory and socket. Several restores of
    /// one images directory may run concurrently. The images must match the sizes recorded at
    /// dump time. After CRIU, the runtime is asked to reseed its random number generators, which
    /// also proves it answers. `spec.code_dir` may differ from the original's (same contents
    /// expected); `restore-<id>.log` stays in the images directory only if the restore fails.
    pub async fn restore(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
    ) -> Result<Sandbox, RestoreError> {
        let meta = criu::read_meta(images_dir).map_err(|problem| RestoreError::BadImage {
            path: images_dir.to_path_buf(),
            problem,
        })?;
        check_files(images_dir, &meta, true)?;
        Self::restore_impl(cfg, spec, images_dir, meta, None, None, Instant::now())
            .await
            .map(|(sb, _)| sb)
    }

    /// [`Sandbox::restore`] whose page images are still being produced (e.g. rebuilt from a
    /// dedup store). Every file of the checkpoint but the `pages-*.img` files must be in
    /// `images_dir`. The pages files are created here at their dump-time sizes and handed to
    /// `pages` as `(file name, file opened for writing)`; it must fill them (`write_at`).
    ///
    /// Meanwhile the new sandbox's run directory, cgroup, network namespace, root and socket are
    /// prepared and CRIU is started: until `pages` is done, every other open of the pages files
    /// is held by a fanotify permission mark, so CRIU builds the namespaces and mounts (about half
    /// of its time) and then waits in its first read of a page. An `Err` from `pages` fails the
    /// restore with [`RestoreError::Images`], which keeps it whole as its source (CRIU is
    /// killed, everything prepared is removed).
    /// Without fanotify (no `CAP_SYS_ADMIN`), CRIU starts only after `pages`. Also returns the
    /// time of each step.
    pub async fn restore_with<F, Fut, E>(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
        pages: F,
    ) -> Result<(Sandbox, RestoreTimings), RestoreError>
    where
        F: FnOnce(Vec<(String, fs::File)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send,
        E: Into<PagesError>,
    {
        Self::restore_with_mode(cfg, spec, images_dir, pages, None, false).await
    }

    async fn restore_with_mode<F, Fut, E>(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
        pages: F,
        lazy: Option<&LazyDaemon>,
        stopped: bool,
    ) -> Result<(Sandbox, RestoreTimings), RestoreError>
    where
        F: FnOnce(Vec<(String, fs::File)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send,
        E: Into<PagesError>,
    {
        let t0 = Instant::now();
        let bad = |problem| RestoreError::BadImage {
            path: images_dir.to_path_buf(),
            problem,
        };
        let meta = criu::read_meta(images_dir).map_err(bad)?;
        check_files(images_dir, &meta, false)?;
        let mut files = Vec::new();
        let mut paths = Vec::new();
        for (name, size) in meta.files.iter().filter(|(n, _)| n.starts_with("pages-")) {
            let path = images_dir.join(name);
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| f.set_len(*size).map(|()| f))
                .map_err(|source| RestoreError::Io {
                    what: format!("creating {path:?}"),
                    source,
                })?;
            files.push((name.clone(), f));
            paths.push(path);
        }
        // Marked after our own opens: only later opens (CRIU's) wait.
        let gate = match OpenGate::new(&paths) {
            Ok(g) => Some(g),
            Err(error) => {
                debug!(%error, "no fanotify gate: CRIU starts after the pages");
                None
            }
        };
        let produced = pages(files);
        let fut: PagesFuture<'_> = Box::pin(async move { produced.await.map_err(Into::into) });
        Self::restore_impl(
            cfg,
            spec,
            images_dir,
            meta,
            Some((fut, gate)),
            lazy.map(|d| (d, stopped)),
            t0,
        )
        .await
    }

    /// [`Sandbox::restore_with`] with `criu restore --lazy-pages`: CRIU reads only the pages
    /// it restores itself (see [`LazyLayout::eager_pages`]) from the pages files, so `pages`
    /// needs to write only those before it returns; the others are left to the lazy-pages
    /// server, which must be listening in `images_dir` already ([`LazyDaemon::start`]) and
    /// fills them while and after the restored runtime runs. The runtime's reseed (which
    /// touches its memory) is served by that server too.
    ///
    /// [`LazyLayout::eager_pages`]: crate::LazyLayout::eager_pages
    /// [`LazyDaemon::start`]: crate::LazyDaemon::start
    pub async fn restore_with_lazy<F, Fut>(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
        pages: F,
        daemon: &LazyDaemon,
    ) -> Result<(Sandbox, RestoreTimings), RestoreError>
    where
        F: FnOnce(Vec<(String, fs::File)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        Self::restore_with_mode(cfg, spec, images_dir, pages, Some(daemon), false).await
    }

    /// [`Sandbox::restore_with_lazy`] ahead of its request: CRIU restores the tree with
    /// `--leave-stopped`, so everything that does not depend on the lazy pages (CRIU's own
    /// start, namespaces, cgroup, mounts, the process tree, its memory layout, the eager pages,
    /// the reset of glibc's `getrandom` state) is done, and the restored processes stay
    /// stopped until [`ArmedSandbox::resume`] (which continues them and reseeds the runtime).
    /// Hold the daemon's background fill first ([`LazyDaemon::hold_fill`]) and let it go at
    /// the resume, or the stopped tree grows to the warm sandbox's size meanwhile. Dropping
    /// (or [`ArmedSandbox::destroy`]) kills the stopped tree and removes its cgroup, network
    /// namespace and run directory.
    ///
    /// [`LazyDaemon::hold_fill`]: crate::LazyDaemon::hold_fill
    pub async fn prestart_lazy<F, Fut>(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
        pages: F,
        daemon: &LazyDaemon,
    ) -> Result<(ArmedSandbox, RestoreTimings), RestoreError>
    where
        F: FnOnce(Vec<(String, fs::File)>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        let (sandbox, t) =
            Self::restore_with_mode(cfg, spec, images_dir, pages, Some(daemon), true).await?;
        Ok((ArmedSandbox { sandbox }, t))
    }

    /// A handle that kills this sandbox's process tree (through its pidfd, so never a
    /// recycled pid), usable from any thread after the sandbox moved on.
    pub fn killer(&self) -> Option<Box<dyn FnOnce() + Send>> {
        let res = self.res.lock().unwrap_or_else(|e| e.into_inner());
        let fd = res.pidfd.as_ref()?.try_clone().ok()?;
        Some(Box::new(move || pidfd_kill(&fd)))
    }

    async fn restore_impl(
        cfg: &SandboxConfig,
        spec: SandboxSpec,
        images_dir: &Path,
        meta: Meta,
        pages: Option<(PagesFuture<'_>, Option<OpenGate>)>,
        lazy: Option<(&LazyDaemon, bool)>,
        t0: Instant,
    ) -> Result<(Sandbox, RestoreTimings), RestoreError> {
        // `lazy`: the lazy-pages server and whether the tree is left stopped.
        let stopped = lazy.is_some_and(|(_, s)| s);
        let lazy = lazy.map(|(d, _)| d);
        let bad = |problem| RestoreError::BadImage {
            path: images_dir.to_path_buf(),
            problem,
        };
        let _ = become_subreaper();
        let (mut pages, mut gate) = match pages {
            Some((f, g)) => (Some(f), g),
            None => (None, None),
        };
        let mut ready: Option<Duration> = pages.is_none().then(Duration::default);
        let cfg2 = cfg.clone();
        let spec2 = spec.clone();
        let mut prep = std::pin::pin!(tokio::task::spawn_blocking(move || {
            criu::ensure_kdat_cache(&cfg2.criu);
            let t = Instant::now();
            (prepare(&cfg2, &spec2), t.elapsed())
        }));
        let prep = loop {
            tokio::select! {
                r = async { pages.as_mut().expect("guarded").await }, if ready.is_none() => {
                    r.map_err(|source| RestoreError::Images { source })?;
                    check_files(images_dir, &meta, true)?;
                    gate = None; // opens proceed
                    ready = Some(t0.elapsed());
                }
                p = &mut prep => break p,
            }
        };
        let (p, prepare_time) = prep.map_err(|e| RestoreError::Io {
            what: "joining".into(),
            source: io::Error::other(e),
        })?;
        let p = p.map_err(|e| match e {
            StartError::InvalidSpec { reason } => RestoreError::InvalidSpec { reason },
            e => RestoreError::Prepare(e),
        })?;
        // From here on, dropping `p` tears down what was prepared.
        if ready.is_none() && gate.is_none() {
            // No gate: CRIU must not see the pages before they are complete.
            let r = pages.as_mut().expect("guarded").await;
            r.map_err(|source| RestoreError::Images { source })?;
            check_files(images_dir, &meta, true)?;
            ready = Some(t0.elapsed());
        }
        let mut args: Vec<OsString> = vec![
            "restore".into(),
            "--images-dir".into(),
            images_dir.into(),
            "--restore-detached".into(),
            "--pidfile".into(),
            p.dir.join("criu.pid").into(),
            "--root".into(),
            p.root.clone().into(),
            criu::verbosity().into(),
            "--manage-cgroups=ignore".into(),
            "--network-lock".into(),
            "skip".into(),
            "--inherit-fd".into(),
            format!("fd[3]:socket:[{}]", meta.listen_ino).into(),
            "--inherit-fd".into(),
            format!("fd[4]:{}", meta.net_key).into(),
        ];
        for (target, key) in &meta.mounts {
            let src = p.mounts.iter().find_map(|m| match &m.kind {
                MountKind::Bind { src, .. } if &m.target == target => Some(src.clone()),
                _ => None,
            });
            let Some(src) = src else {
                return Err(bad(ImageProblem::Mount {
                    target: target.clone(),
                }));
            };
            args.push("--external".into());
            let mut a = OsString::from(format!("mnt[{key}]:"));
            a.push(src);
            args.push(a);
        }
        if lazy.is_some() {
            args.push("--lazy-pages".into());
        }
        if stopped {
            args.push("--leave-stopped".into());
        }
        let log = images_dir.join(format!("restore-{}.log", spec.id.0));
        args.push("--log-file".into());
        args.push(log.clone().into());
        let procs = p
            .res
            .cgroup
            .as_ref()
            .map(|c| c.procs_files())
            .unwrap_or_default()
            .iter()
            .map(|f| cpath(f))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| RestoreError::Io {
                what: "cgroup paths".into(),
                source,
            })?;
        let hook = join_cgroup_hook(
            procs,
            vec![(p.listener.as_raw_fd(), 3), (p.netns_fd.as_raw_fd(), 4)],
        );
        let prepared = t0.elapsed();
        let mut criu_run = std::pin::pin!(criu::run(
            &cfg.criu,
            args,
            &log,
            RESTORE_TIMEOUT,
            Some(hook)
        ));
        let outcome = loop {
            tokio::select! {
                r = async { pages.as_mut().expect("guarded").await }, if ready.is_none() => {
                    // Returning drops the CRIU run (which kills CRIU), then the gate, then `p`.
                    r.map_err(|source| RestoreError::Images { source })?;
                    check_files(images_dir, &meta, true)?;
                    gate = None; // CRIU's open of the pages proceeds
                    ready = Some(t0.elapsed());
                }
                o = &mut criu_run => break o,
            }
        };
        drop(gate);
        let restored = t0.elapsed();
        let Prepared {
            mut res,
            dir,
            sock,
            listener,
            listen_ino,
            netns_fd,
            mounts,
            ..
        } = p;
        drop(listener);
        drop(netns_fd);
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed { status, log_tail } => {
                return Err(RestoreError::Criu { status, log_tail });
            }
            Outcome::TimedOut => {
                return Err(RestoreError::Timeout {
                    after: RESTORE_TIMEOUT,
                });
            }
            Outcome::Spawn(source) => {
                return Err(RestoreError::Io {
                    what: "running criu".into(),
                    source,
                });
            }
        }
        if criu::verbosity() == "-v2" {
            let _ = fs::remove_file(&log); // kept when diagnostics were asked for
        }
        let pidfile = dir.join("criu.pid");
        let pid: i32 = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| RestoreError::Io {
                what: format!("reading {pidfile:?}"),
                source: io::Error::new(io::ErrorKind::InvalidData, "no pid"),
            })?;
        res.pid = Some(pid);
        res.pidfd = Some(pidfd_open(pid).map_err(|source| RestoreError::Io {
            what: "pidfd_open".into(),
            source,
        })?);
        let pids = res.cgroup.as_ref().map(|c| c.pids()).unwrap_or_default();
        for p in pids {
            let ranges = ns_pid(p)
                .and_then(|n| meta.droppable.get(&n))
                .map_or(&[][..], |v| &v[..]);
            // A lazily restored page must be in place before it is written through
            // /proc/<pid>/mem (a missing one fails with EIO).
            if let (Some(d), Some(n)) = (lazy, ns_pid(p))
                && !ranges.is_empty()
            {
                d.prefetch(n, ranges.to_vec())
                    .await
                    .map_err(|e| RestoreError::Images { source: e.into() })?;
            }
            if let Err(source) = scramble_droppable(p, ranges) {
                return Err(RestoreError::Io {
                    what: format!("resetting the getrandom state of process {p}"),
                    source,
                });
            }
        }
        let sb = Sandbox {
            id: spec.id.clone(),
            sock,
            pid,
            memory_limit: spec.memory_limit,
            hostname: meta.hostname.clone(),
            mounts,
            listen_ino,
            criu: cfg.criu.clone(),
            uid: cfg.uid,
            gid: cfg.gid,
            dead: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            res: Mutex::new(std::mem::replace(&mut res, Resources::empty())),
            split: Mutex::new(Vec::new()),
        };
        let t_reseed = Instant::now();
        if !stopped {
            sb.reseed().await?;
        }
        info!(
            sandbox_id = %spec.id,
            pid,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            prepare_ms = prepared.as_secs_f64() * 1e3,
            criu_ms = (restored - prepared).as_secs_f64() * 1e3,
            "sandbox restored"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let timings = RestoreTimings {
            prepare_ms: ms(prepare_time),
            images_ready_ms: ms(ready.unwrap_or_default()),
            criu_ms: ms(restored - prepared),
            reseed_ms: ms(t_reseed.elapsed()),
            total_ms: ms(t0.elapsed()),
        };
        Ok((sb, timings))
    }

    /// Asks the restored runtime to reseed its random number generators (which also proves
    /// it answers); destroys the sandbox if it does not.
    async fn reseed(&self) -> Result<(), RestoreError> {
        let seed: [u8; 32] = random_seed();
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let err = match self
            .request(json!({"op": "reseed", "seed": hex}), READY_TIMEOUT)
            .await
        {
            Ok(v) if v.get("ok").and_then(Value::as_bool) == Some(true) => return Ok(()),
            Ok(v) => RestoreError::ReseedRefused {
                reply: v.to_string(),
            },
            Err(e) => RestoreError::NotAnswering { source: e },
        };
        self.kill();
        let res = std::mem::replace(
            &mut *self.res.lock().unwrap_or_else(|e| e.into_inner()),
            Resources::empty(),
        );
        let _ = tokio::task::spawn_blocking(move || drop(res)).await;
        Err(err)
    }

    /// Kills the process tree and removes cgroup, network namespace and run directory.
    pub async fn destroy(self) -> Result<(), DestroyError> {
        self.dead.store(true, Ordering::SeqCst);
        let mut res = std::mem::replace(
            &mut *self.res.lock().unwrap_or_else(|e| e.into_inner()),
            Resources::empty(),
        );
        let r = tokio::task::spawn_blocking(move || res.teardown()).await;
        match r {
            Ok(r) => r,
            Err(e) => {
                warn!(sandbox_id = %self.id, error = %e, "teardown task failed");
                Ok(())
            }
        }
    }
}

/// A sandbox restored ahead of its request and left stopped ([`Sandbox::prestart_lazy`]):
/// its processes exist (namespaces, cgroup, memory layout, eager pages) but do not run.
/// Dropping it kills the tree and tears the sandbox down (blocking briefly); prefer
/// [`ArmedSandbox::destroy`] in async code.
#[derive(Debug)]
pub struct ArmedSandbox {
    sandbox: Sandbox,
}

impl ArmedSandbox {
    /// See [`Sandbox::set_split_mappings`].
    pub fn set_split_mappings(&self, split: SplitMappings) {
        self.sandbox.set_split_mappings(split);
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        self.sandbox.id()
    }

    /// Host PID of the stopped runtime.
    pub fn pid(&self) -> i32 {
        self.sandbox.pid()
    }

    /// Memory of the stopped tree now (its cgroup usage counts what CRIU restored: eager
    /// pages, page tables, kernel objects).
    pub fn memory(&self) -> Result<MemoryUsage, MemoryError> {
        self.sandbox.memory()
    }

    /// Whether the stopped runtime still exists.
    pub fn is_alive(&self) -> bool {
        self.sandbox.is_alive()
    }

    /// Host PIDs of every process of the sandbox (its cgroup's).
    pub fn pids(&self) -> Vec<i32> {
        let res = self.sandbox.res.lock().unwrap_or_else(|e| e.into_inner());
        res.cgroup.as_ref().map(|c| c.pids()).unwrap_or_default()
    }

    /// See [`Sandbox::killer`].
    pub fn killer(&self) -> Option<Box<dyn FnOnce() + Send>> {
        self.sandbox.killer()
    }

    /// Continues every process of the sandbox (`SIGCONT`) and reseeds the runtime; returns
    /// the running sandbox and the time of the reseed round trip, ms. A runtime that does not
    /// answer its reseed fails the resume (the sandbox is destroyed). The caller lets go of
    /// its lazy-pages server's background fill ([`LazyDaemon::hold_fill`]) first or right
    /// after.
    ///
    /// [`LazyDaemon::hold_fill`]: crate::LazyDaemon::hold_fill
    pub async fn resume(self) -> Result<(Sandbox, f64), RestoreError> {
        let sb = self.sandbox;
        if !sb.is_alive() {
            let reason = sb.exit_reason();
            let _ = sb.destroy().await;
            return Err(RestoreError::NotAnswering {
                source: RunError::Crashed { reason },
            });
        }
        let pids = {
            let res = sb.res.lock().unwrap_or_else(|e| e.into_inner());
            res.cgroup.as_ref().map(|c| c.pids()).unwrap_or_default()
        };
        for p in pids {
            // SAFETY: kill(2) with a pid of our own sandbox's cgroup; its processes are
            // stopped, so none exits and frees its pid meanwhile.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
        let t = Instant::now();
        sb.reseed().await?;
        Ok((sb, t.elapsed().as_secs_f64() * 1e3))
    }

    /// Kills the stopped tree and removes cgroup, network namespace and run directory.
    pub async fn destroy(self) -> Result<(), DestroyError> {
        self.sandbox.destroy().await
    }
}

/// The page images being produced during a [`Sandbox::restore_with`].
type PagesFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PagesError>> + Send + 'a>>;

/// Checks the files of a checkpoint against the sizes recorded at dump time (a short pages
/// file makes CRIU hang); `with_pages` false skips the pages files.
fn check_files(images_dir: &Path, meta: &Meta, with_pages: bool) -> Result<(), RestoreError> {
    let bad = |problem| RestoreError::BadImage {
        path: images_dir.to_path_buf(),
        problem,
    };
    let now = criu::image_files(images_dir).map_err(|e| bad(ImageProblem::List(e)))?;
    for (name, size) in &meta.files {
        if !with_pages && name.starts_with("pages-") {
            continue;
        }
        match now.get(name) {
            Some(s) if s == size => {}
            Some(s) => {
                return Err(bad(ImageProblem::Size {
                    file: name.clone(),
                    found: *s,
                    expected: *size,
                }));
            }
            None => return Err(bad(ImageProblem::Missing { file: name.clone() })),
        }
    }
    Ok(())
}

/// Holds every open of some files (a fanotify `FAN_OPEN_PERM` mark, never answered) until
/// dropped: closing the fanotify group allows all pending and later opens.
struct OpenGate {
    _fd: OwnedFd,
}

impl OpenGate {
    fn new(paths: &[PathBuf]) -> io::Result<OpenGate> {
        // SAFETY: fanotify_init takes flags only and returns a new fd or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
                (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for p in paths {
            let c = cpath(p)?;
            // SAFETY: a valid fanotify fd and NUL-terminated path; integer flags.
            let r = unsafe {
                libc::fanotify_mark(
                    fd.as_raw_fd(),
                    libc::FAN_MARK_ADD,
                    libc::FAN_OPEN_PERM,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(OpenGate { _fd: fd })
    }
}

/// The `MAP_DROPPABLE` mappings (`dp` in `VmFlags`) of a process: where glibc ≥ 2.41 keeps
/// each thread's state for the vDSO `getrandom` (a ChaCha key and buffered output).
fn droppable_ranges(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    let smaps = match fs::read_to_string(format!("/proc/{pid}/smaps")) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()), // exited
        Err(e) => return Err(e),
    };
    let mut ranges = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for l in smaps.lines() {
        if let Some(flags) = l.strip_prefix("VmFlags:") {
            if let Some(r) = cur.take()
                && flags.split_whitespace().any(|f| f == "dp")
            {
                ranges.push(r);
            }
        } else if let Some((range, _)) = l.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            cur = Some((a, b));
        }
    }
    Ok(ranges)
}

/// The pid of a host process inside its innermost PID namespace.
fn ns_pid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// `MAP_DROPPABLE` ranges of every process of a sandbox, by pid inside the sandbox.
fn droppable_by_ns_pid(pids: &[i32]) -> BTreeMap<u32, Vec<(u64, u64)>> {
    let mut out = BTreeMap::new();
    for &p in pids {
        if let (Some(ns), Ok(r)) = (ns_pid(p), droppable_ranges(p))
            && !r.is_empty()
        {
            out.insert(ns, r);
        }
    }
    out
}

/// Invalidates the user-space `getrandom` state of a restored process.
///
/// glibc ≥ 2.41 keeps each thread's state for the vDSO `getrandom` in `MAP_DROPPABLE` pages,
/// which CRIU restores verbatim (as plain anonymous memory), so every copy of one image would
/// draw the same `os.urandom`/`secrets` bytes until the kernel's RNG next reseeds (the state's
/// generation still matches). Filling those pages with `0xFF` marks every state as in use, which
/// makes the vDSO fall back to the `getrandom` system call for good (also in children forked
/// later: the restored pages are no longer wiped on fork), and gives each state a generation
/// that never matches. `ranges` are the dump-time ranges; current `dp` mappings are added.
/// Returns the bytes overwritten.
fn scramble_droppable(pid: i32, ranges: &[(u64, u64)]) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut all = ranges.to_vec();
    all.extend(droppable_ranges(pid)?);
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        return Ok(0);
    }
    let mem = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    let mut n = 0;
    for (a, b) in all {
        let len = usize::try_from(b.saturating_sub(a))
            .unwrap_or(0)
            .min(1 << 20);
        mem.write_all_at(&vec![0xFF; len], a)?;
        n += len as u64;
    }
    Ok(n)
}

fn random_seed() -> [u8; 32] {
    let mut b = [0u8; 32];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b
}

fn parse_logs(v: Option<&Value>) -> Vec<LogLine> {
    let Some(Value::Array(a)) = v else {
        return Vec::new();
    };
    a.iter()
        .filter_map(|l| {
            let l = l.as_array()?;
            let ts = l.first()?.as_u64()?;
            let stream = match l.get(1)?.as_str()? {
                "stderr" => Stream::Stderr,
                _ => Stream::Stdout,
            };
            Some((ts, stream, l.get(2)?.as_str()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_file_and_interface_names() {
        assert!(valid_id("sb-1_a"));
        for bad in ["", "../x", "a/b", "a b", "x".repeat(49).as_str(), "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn logs_parse_and_skip_garbage() {
        let v = json!([
            [1, "stdout", "a"],
            [2, "stderr", "b"],
            ["x"],
            5,
            [3, "stdout"]
        ]);
        assert_eq!(
            parse_logs(Some(&v)),
            vec![
                (1, Stream::Stdout, "a".to_string()),
                (2, Stream::Stderr, "b".to_string())
            ]
        );
        assert!(parse_logs(None).is_empty());
    }

    #[test]
    fn owner_tag_identifies_a_live_process() {
        let me = owner_tag(std::process::id()).expect("own tag");
        assert!(me.starts_with(&format!("{} ", std::process::id())));
        assert_eq!(owner_tag(u32::MAX), None);
    }
}
