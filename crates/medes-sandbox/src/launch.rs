//! Launching the runtime as PID 1 of fresh PID, mount, IPC and UTS namespaces.
//!
//! The child is created with `clone(2)` straight from the calling process (so it is our child)
//! and runs a closure that only issues raw syscalls on data prepared before the clone: after a
//! clone in a multi-threaded process, allocating or taking locks could deadlock (and glibc's
//! id-changing wrappers would wait for the parent's threads, which the child does not have).

use std::ffi::{CString, c_char};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;

use crate::rootfs::{Mount, MountKind, under};

/// Everything the child needs, as C strings.
pub(crate) struct LaunchPlan {
    pub(crate) cgroup_procs: Vec<CString>,
    pub(crate) netns_fd: RawFd,
    pub(crate) listen_fd: RawFd,
    pub(crate) root: CString,
    /// (source, target under root, is a bind)
    pub(crate) binds: Vec<(CString, CString)>,
    pub(crate) proc_target: Vec<CString>,
    pub(crate) tmpfs: Vec<(CString, CString)>,
    pub(crate) hostname: CString,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) cap_last: u32,
    pub(crate) argv: Vec<CString>,
    pub(crate) envp: Vec<CString>,
    /// Launch with `ADDR_NO_RANDOMIZE` (ASLR off); set by the caller after [`LaunchPlan::new`].
    pub(crate) no_aslr: bool,
}

fn cstr(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

pub(crate) fn cpath(p: &Path) -> io::Result<CString> {
    cstr(p.as_os_str().as_encoded_bytes())
}

impl LaunchPlan {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        root: &Path,
        mounts: &[Mount],
        cgroup_procs: Vec<std::path::PathBuf>,
        netns_fd: RawFd,
        listen_fd: RawFd,
        hostname: &str,
        uid: u32,
        gid: u32,
        argv: &[String],
        env: &[(String, String)],
    ) -> io::Result<LaunchPlan> {
        let mut binds = Vec::new();
        let mut proc_target = Vec::new();
        let mut tmpfs = Vec::new();
        for m in mounts {
            let t = cpath(&under(root, &m.target))?;
            match &m.kind {
                MountKind::Bind { src, .. } => binds.push((cpath(src)?, t)),
                MountKind::Proc => proc_target.push(t),
                MountKind::Tmpfs { size_mb } => {
                    tmpfs.push((t, cstr(format!("size={size_mb}m,mode=1777").as_bytes())?))
                }
            }
        }
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        Ok(LaunchPlan {
            cgroup_procs: cgroup_procs
                .iter()
                .map(|p| cpath(p))
                .collect::<io::Result<_>>()?,
            netns_fd,
            listen_fd,
            root: cpath(root)?,
            binds,
            proc_target,
            tmpfs,
            hostname: cstr(hostname.as_bytes())?,
            uid,
            gid,
            cap_last,
            argv: argv
                .iter()
                .map(|a| cstr(a.as_bytes()))
                .collect::<io::Result<_>>()?,
            envp: env
                .iter()
                .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
                .collect::<io::Result<_>>()?,
            no_aslr: false,
        })
    }
}

/// Names of the child's setup steps, indexed by the step number it reports.
pub(crate) const STEPS: &[&str] = &[
    "join cgroup",
    "setsid",
    "make mounts private",
    "join network namespace",
    "bind root",
    "bind mount",
    "remount read-only",
    "mount proc",
    "mount tmpfs",
    "pivot_root",
    "detach old root",
    "remount root read-only",
    "sethostname",
    "open /dev/null",
    "set up stdio and socket",
    "no_new_privs",
    "drop capability bounding set",
    "setgroups",
    "setresgid",
    "setresuid",
    "clear ambient capabilities",
    "execve",
    "personality",
];

/// Bound on the child's setup (clone to exec).
const SETUP_TIMEOUT_MS: i32 = 20_000;

/// Clones the child; returns its host PID once it has exec'd the runtime, or the step that failed.
pub(crate) fn spawn(plan: &LaunchPlan) -> Result<i32, (String, io::Error)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err((
            "creating the status pipe".into(),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe2 just returned these two fds; nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let argv: Vec<*const c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let wr_fd = wr.as_raw_fd();
    let mut stack = vec![0u8; 256 * 1024];
    let flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    let cb = Box::new(|| {
        let (step, errno) = child(plan, &argv, &envp);
        let mut msg = [0u8; 5];
        msg[0] = step;
        msg[1..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: raw syscalls on an fd we own and a stack buffer; then exit without unwinding.
        unsafe {
            libc::write(wr_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    });
    // SAFETY: the child only runs `child` (raw syscalls on pre-built data) and then execs or
    // exits; it never returns into Rust code of the parent's threads.
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(|e| ("clone".to_string(), io::Error::from(e)))?;
    drop(wr);
    let mut msg = [0u8; 5];
    // The child execs within milliseconds; if it wedges, kill it rather than wait forever.
    let mut pfd = libc::pollfd {
        fd: rd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, SETUP_TIMEOUT_MS) };
    if ready == 0 {
        let mut status = 0;
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(pid.as_raw(), libc::SIGKILL);
            libc::waitpid(pid.as_raw(), &mut status, 0);
        }
        return Err((
            "waiting for the sandbox to exec".into(),
            io::Error::new(io::ErrorKind::TimedOut, "setup did not finish in time"),
        ));
    }
    let n = loop {
        // SAFETY: reading into a local buffer from an fd we own.
        let n = unsafe { libc::read(rd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n == 0 {
        return Ok(pid.as_raw());
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
    let step = STEPS
        .get(msg[0] as usize)
        .copied()
        .unwrap_or("unknown")
        .to_string();
    let errno = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
    Err((step, io::Error::from_raw_os_error(errno)))
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The child's setup; returns only on failure (step index, errno).
fn child(p: &LaunchPlan, argv: &[*const c_char], envp: &[*const c_char]) -> (u8, i32) {
    macro_rules! chk {
        ($step:expr, $e:expr) => {
            // SAFETY: each call is a raw syscall on NUL-terminated strings and fds prepared
            // before the clone; none of them allocates.
            if unsafe { $e } < 0 {
                return ($step, errno());
            }
        };
    }
    let null = std::ptr::null::<c_char>();
    let zero = c"0";
    for f in &p.cgroup_procs {
        // SAFETY: valid path; fd used only here.
        let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return (0, errno());
        }
        chk!(0, libc::write(fd, zero.as_ptr().cast(), 1) as i32);
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
    }
    chk!(1, libc::setsid());
    chk!(
        2,
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null()
        )
    );
    chk!(3, libc::setns(p.netns_fd, libc::CLONE_NEWNET));
    chk!(
        4,
        libc::mount(
            p.root.as_ptr(),
            p.root.as_ptr(),
            null,
            libc::MS_BIND,
            std::ptr::null()
        )
    );
    for (src, dst) in &p.binds {
        chk!(
            5,
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null()
            )
        );
        let fl =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        chk!(
            6,
            libc::mount(null, dst.as_ptr(), null, fl, std::ptr::null())
        );
    }
    for t in &p.proc_target {
        let fl = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        chk!(
            7,
            libc::mount(
                c"proc".as_ptr(),
                t.as_ptr(),
                c"proc".as_ptr(),
                fl,
                std::ptr::null()
            )
        );
    }
    for (t, opts) in &p.tmpfs {
        let fl = libc::MS_NOSUID | libc::MS_NODEV;
        chk!(
            8,
            libc::mount(
                c"tmpfs".as_ptr(),
                t.as_ptr(),
                c"tmpfs".as_ptr(),
                fl,
                opts.as_ptr().cast()
            )
        );
    }
    chk!(9, libc::chdir(p.root.as_ptr()));
    chk!(
        9,
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32
    );
    chk!(10, libc::umount2(c".".as_ptr(), libc::MNT_DETACH));
    chk!(10, libc::chdir(c"/".as_ptr()));
    let fl = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
    chk!(
        11,
        libc::mount(null, c"/".as_ptr(), null, fl, std::ptr::null())
    );
    chk!(
        12,
        libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len())
    );
    // SAFETY: opening a device node by a static path.
    let devnull = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
    if devnull < 0 {
        return (13, errno());
    }
    for fd in 0..3 {
        chk!(14, libc::dup2(devnull, fd));
    }
    if devnull > 2 {
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(devnull) };
    }
    if p.listen_fd == 3 {
        chk!(14, libc::fcntl(3, libc::F_SETFD, 0));
    } else {
        chk!(14, libc::dup2(p.listen_fd, 3));
    }
    // Everything else the agent had open is closed at exec.
    chk!(
        14,
        libc::syscall(
            libc::SYS_close_range,
            4u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC
        ) as i32
    );
    // SAFETY: umask never fails.
    unsafe { libc::umask(0o022) };
    chk!(15, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
    for cap in 0..=p.cap_last {
        chk!(
            16,
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
        );
    }
    // Raw syscalls, not glibc's wrappers: those broadcast the change to every thread glibc
    // believes exists (copied from the parent by clone) and wait for them forever.
    chk!(
        17,
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) as i32
    );
    chk!(
        18,
        libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid) as i32
    );
    chk!(
        19,
        libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid) as i32
    );
    chk!(
        20,
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0
        )
    );
    if p.no_aslr {
        // SAFETY: personality(2) only reads/sets this process's execution domain flags;
        // 0xffffffff queries without changing. The flag survives execve (not a setuid binary).
        let cur = unsafe { libc::personality(0xffff_ffff) };
        if cur < 0 {
            return (22, errno());
        }
        chk!(
            22,
            libc::personality((cur as libc::c_ulong) | libc::ADDR_NO_RANDOMIZE as libc::c_ulong)
        );
    }
    // SAFETY: argv/envp are NUL-terminated arrays of valid C strings owned by the parent's copy.
    unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
    (21, errno())
}
