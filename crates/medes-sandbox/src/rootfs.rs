//! The sandbox's minimal root: a skeleton directory prepared on the host (directories, mount
//! points, device nodes, a minimal passwd/group) plus a list of mounts applied inside the
//! sandbox's mount namespace (read-only binds, proc, tmpfs).

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{SandboxConfig, SandboxSpec};

/// One mount inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum MountKind {
    /// Read-only bind of a host path (a directory or a file).
    Bind {
        /// Host path.
        src: PathBuf,
        /// Whether it is a file (the mount point is then an empty file).
        file: bool,
    },
    /// A fresh procfs (of the sandbox's PID namespace).
    Proc,
    /// A private tmpfs, size in MiB, mode 1777.
    Tmpfs { size_mb: u64 },
}

/// A mount at an absolute path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mount {
    pub(crate) target: PathBuf,
    pub(crate) kind: MountKind,
}

const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "resolv.conf",
    "hosts",
    "nsswitch.conf",
    "host.conf",
];
const ETC_DIRS: &[&str] = &["ssl", "ca-certificates"];
const TOP: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32"];

/// Top-level host entries that are usr-merge symlinks (recreated as symlinks) or directories
/// (bind-mounted).
pub(crate) fn plan(
    cfg: &SandboxConfig,
    spec: &SandboxSpec,
) -> (Vec<Mount>, Vec<(PathBuf, PathBuf)>) {
    let mut mounts = Vec::new();
    let mut links = Vec::new();
    let bind = |src: &Path, target: &Path, file: bool| Mount {
        target: target.to_path_buf(),
        kind: MountKind::Bind {
            src: src.to_path_buf(),
            file,
        },
    };
    for t in TOP {
        let p = Path::new("/").join(t);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(dest) = fs::read_link(&p) {
                    links.push((p.clone(), dest));
                }
            }
            Ok(m) if m.is_dir() => mounts.push(bind(&p, &p, false)),
            _ => {}
        }
    }
    for f in ETC_FILES {
        let p = Path::new("/etc").join(f);
        if p.is_file() {
            mounts.push(bind(&p, &p, true));
        }
    }
    for d in ETC_DIRS {
        let p = Path::new("/etc").join(d);
        if p.is_dir() {
            mounts.push(bind(&p, &p, false));
        }
    }
    if let Ok(dest) = fs::read_link("/etc/localtime") {
        links.push(("/etc/localtime".into(), dest));
    }
    if cfg.venv_dir.is_dir() && !is_under_top(&cfg.venv_dir) {
        mounts.push(bind(&cfg.venv_dir, &cfg.venv_dir, false));
    }
    mounts.push(bind(&cfg.runtime_dir, Path::new("/runtime"), false));
    mounts.push(bind(&spec.code_dir, Path::new("/action"), false));
    for p in &cfg.ro_mounts {
        if p.is_absolute() && p.exists() && !is_under_top(p) {
            mounts.push(bind(p, p, p.is_file()));
        }
    }
    mounts.push(Mount {
        target: "/proc".into(),
        kind: MountKind::Proc,
    });
    mounts.push(Mount {
        target: "/tmp".into(),
        kind: MountKind::Tmpfs {
            size_mb: cfg.tmp_size_mb,
        },
    });
    mounts.push(Mount {
        target: "/dev/shm".into(),
        kind: MountKind::Tmpfs {
            size_mb: cfg.tmp_size_mb,
        },
    });
    (mounts, links)
}

fn is_under_top(p: &Path) -> bool {
    TOP.iter().any(|t| p.starts_with(Path::new("/").join(t)))
}

/// Joins an absolute sandbox path under `root`.
pub(crate) fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Creates the skeleton under `root` (which must not exist yet or be empty).
pub(crate) fn prepare(
    root: &Path,
    mounts: &[Mount],
    links: &[(PathBuf, PathBuf)],
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let ctx = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    fs::create_dir_all(root).map_err(|e| ctx("creating", root, e))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .map_err(|e| ctx("chmod", root, e))?;
    for d in ["etc", "dev", "proc", "tmp", "action", "runtime"] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(|e| ctx("creating", &p, e))?;
    }
    for m in mounts {
        let t = under(root, &m.target);
        let is_file = matches!(m.kind, MountKind::Bind { file: true, .. });
        if is_file {
            if let Some(parent) = t.parent() {
                fs::create_dir_all(parent).map_err(|e| ctx("creating", parent, e))?;
            }
            fs::File::create(&t).map_err(|e| ctx("creating", &t, e))?;
        } else {
            fs::create_dir_all(&t).map_err(|e| ctx("creating", &t, e))?;
        }
    }
    for (at, dest) in links {
        let t = under(root, at);
        if let Some(parent) = t.parent() {
            fs::create_dir_all(parent).map_err(|e| ctx("creating", parent, e))?;
        }
        symlink(dest, &t).map_err(|e| ctx("symlink", &t, e))?;
    }
    let passwd = format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nsandbox:x:{gid}:\n");
    fs::write(root.join("etc/passwd"), passwd).map_err(|e| ctx("writing", root, e))?;
    fs::write(root.join("etc/group"), group).map_err(|e| ctx("writing", root, e))?;
    let dev = root.join("dev");
    for (name, minor) in [
        ("null", 3u32),
        ("zero", 5),
        ("full", 7),
        ("random", 8),
        ("urandom", 9),
    ] {
        let p = dev.join(name);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod has no other preconditions.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, minor)) };
        if r != 0 {
            return Err(ctx("mknod", &p, io::Error::last_os_error()));
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666))
            .map_err(|e| ctx("chmod", &p, e))?;
    }
    fs::create_dir_all(dev.join("shm")).map_err(|e| ctx("creating", &dev, e))?;
    for (name, dest) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(dest, dev.join(name)).map_err(|e| ctx("symlink", &dev, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_mounts_code_runtime_and_private_tmp() {
        let cfg = SandboxConfig {
            ro_mounts: vec!["/nonexistent".into()],
            ..Default::default()
        };
        let spec = SandboxSpec {
            id: medes_core::SandboxId("x".into()),
            code_dir: "/tmp".into(),
            memory_limit: medes_core::Bytes::mib(64),
            env: Default::default(),
        };
        let (mounts, _links) = plan(&cfg, &spec);
        let at = |t: &str| {
            mounts
                .iter()
                .find(|m| m.target == Path::new(t))
                .map(|m| m.kind.clone())
        };
        assert_eq!(
            at("/action"),
            Some(MountKind::Bind {
                src: "/tmp".into(),
                file: false
            })
        );
        assert!(matches!(at("/runtime"), Some(MountKind::Bind { .. })));
        assert_eq!(at("/proc"), Some(MountKind::Proc));
        assert_eq!(at("/tmp"), Some(MountKind::Tmpfs { size_mb: 64 }));
        assert!(
            at("/nonexistent").is_none(),
            "missing ro_mounts are skipped"
        );
        assert!(at("/home").is_none() && at("/root").is_none());
        assert_eq!(
            under(Path::new("/r"), Path::new("/usr/lib")),
            Path::new("/r/usr/lib")
        );
    }
}
