//! Writing an action's code into the data directory, once per action version.
//!
//! Layout: `<root>/<namespace>/<name>/<version>/` holding `__main__.py` (source actions) or the
//! extracted archive (zip actions), plus a sibling `<version>.digest` naming the content, so an
//! action deleted and re-created with the same version string never runs stale code. Directories
//! are built under a temporary name and renamed into place, so a reader never sees half a tree.
//! Files are `0644` and directories `0755`, owned by the agent (root): readable, never writable, by
//! the sandbox user.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use medes_core::{ActionName, Code};

/// Limits on extracted archives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZipLimits {
    pub max_bytes: u64,
    pub max_entries: usize,
}

/// Materialising code failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodeError {
    /// The archive is the developer's problem: reported as an init error.
    #[error("{0}")]
    BadArchive(String),
    /// The platform's problem.
    #[error("{what} {path:?}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CodeError + 'a {
    move |source| CodeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One path component made safe: `[A-Za-z0-9_.@-]` kept, everything else `%XX`, and a leading
/// dot encoded (so `.`, `..` and hidden names cannot occur).
fn component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep =
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@') || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// The directory for an action version, below `root`.
pub(crate) fn code_dir(root: &Path, action: &ActionName, version: &str) -> PathBuf {
    let mut p = root.join(component(&action.namespace.0));
    for part in action.name.split('/') {
        p.push(component(part));
    }
    p.push(component(version));
    p
}

fn digest(code: &Code, main: &str) -> String {
    let (tag, bytes): (&[u8], &[u8]) = match code {
        Code::Source(s) => (b"source", s.as_bytes()),
        Code::Zip(z) => (b"zip", z),
    };
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(tag);
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
    h.update(main.as_bytes());
    format!("{:032x}\n", h.digest128())
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Makes sure the code of `action@version` is in place and returns its directory.
pub(crate) fn materialise(
    root: &Path,
    action: &ActionName,
    version: &str,
    code: &Code,
    main: &str,
    limits: ZipLimits,
) -> Result<PathBuf, CodeError> {
    let dir = code_dir(root, action, version);
    let digest_path = dir.with_extension("digest");
    let want = digest(code, main);
    let current = || dir.is_dir() && fs::read_to_string(&digest_path).is_ok_and(|d| d == want);
    if current() {
        return Ok(dir);
    }
    // One writer per directory: a second concurrent cold start of a new version must not move
    // the first one's fresh tree aside while its sandbox mounts it.
    let lock = {
        static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
        let mut all = LOCKS.get_or_init(Default::default).lock();
        all.retain(|_, l| Arc::strong_count(l) > 1);
        all.entry(dir.clone()).or_default().clone()
    };
    let _held = lock.lock();
    if current() {
        return Ok(dir);
    }
    let parent = dir.parent().unwrap_or(root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(io_err("creating", parent))?;
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(".tmp-{}-{seq}", std::process::id()));
    let built = build(&tmp, code, limits);
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap into place: move an old tree aside first (a live sandbox may still have it mounted).
    if dir.exists() {
        let old = parent.join(format!(".old-{}-{seq}", std::process::id()));
        fs::rename(&dir, &old).map_err(io_err("moving aside", &dir))?;
        let _ = fs::remove_dir_all(&old);
    }
    match fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if dir.is_dir() => {
            // Another spawn of the same version won the race; its tree is equivalent.
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err("renaming into place", &dir)(e));
        }
    }
    write_file(&digest_path, want.as_bytes())?;
    Ok(dir)
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), CodeError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(data).map_err(io_err("writing", path))
}

fn build(tmp: &Path, code: &Code, limits: ZipLimits) -> Result<(), CodeError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(tmp)
        .map_err(io_err("creating", tmp))?;
    match code {
        Code::Source(src) => write_file(&tmp.join("__main__.py"), src.as_bytes()),
        Code::Zip(bytes) => extract(tmp, bytes, limits),
    }
}

fn bad(msg: impl Into<String>) -> CodeError {
    CodeError::BadArchive(msg.into())
}

/// Extracts a zip archive into `dest`: no absolute paths, no `..`, no symlinks, at most
/// `limits.max_entries` entries and `limits.max_bytes` bytes in total (counted on the actual
/// decompressed data, not the sizes the archive claims).
fn extract(dest: &Path, bytes: &[u8], limits: ZipLimits) -> Result<(), CodeError> {
    let mut zip = zip::ZipArchive::new(io::Cursor::new(bytes))
        .map_err(|e| bad(format!("Unable to unzip the action archive: {e}")))?;
    if zip.len() > limits.max_entries {
        return Err(bad(format!(
            "The action archive has {} entries; at most {} are allowed.",
            zip.len(),
            limits.max_entries
        )));
    }
    let mut total = 0u64;
    let mut has_main = false;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| bad(format!("Unable to unzip the action archive: {e}")))?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad(format!(
                "The action archive has an unsafe path: {:?}",
                entry.name()
            )));
        };
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(bad(format!(
                "The action archive has an unsafe path: {:?}",
                entry.name()
            )));
        }
        if entry.is_symlink() {
            return Err(bad(format!(
                "The action archive has a symbolic link: {:?}",
                entry.name()
            )));
        }
        let path = dest.join(&rel);
        if entry.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&path)
                .map_err(io_err("creating", &path))?;
            continue;
        }
        if rel == Path::new("__main__.py") {
            has_main = true;
        }
        if let Some(p) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(p)
                .map_err(io_err("creating", p))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    bad(format!(
                        "The action archive has a duplicate entry: {:?}",
                        entry.name()
                    ))
                } else {
                    io_err("creating", &path)(e)
                }
            })?;
        let budget = limits.max_bytes - total;
        let mut limited = (&mut entry).take(budget + 1);
        let mut buf = [0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| bad(format!("Unable to unzip the action archive: {e}")))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > budget {
                return Err(bad(format!(
                    "The action archive expands to more than {} bytes.",
                    limits.max_bytes
                )));
            }
            out.write_all(&buf[..n]).map_err(io_err("writing", &path))?;
        }
        total += written;
    }
    if !has_main {
        return Err(bad("Zip file does not include __main__.py"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use medes_core::Namespace;
    use zip::write::SimpleFileOptions;

    use super::*;

    const LIMITS: ZipLimits = ZipLimits {
        max_bytes: 1 << 20,
        max_entries: 100,
    };
    const LIMITS_BIG: ZipLimits = ZipLimits {
        max_bytes: 64 << 20,
        max_entries: 100,
    };

    fn action(name: &str) -> ActionName {
        ActionName {
            namespace: Namespace("guest".into()),
            name: name.into(),
        }
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        for (name, data) in entries {
            w.start_file(*name, SimpleFileOptions::default()).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn paths_are_safe_components() {
        let root = Path::new("/d");
        assert_eq!(
            code_dir(root, &action("pkg/hello"), "0.0.1"),
            Path::new("/d/guest/pkg/hello/0.0.1")
        );
        assert_eq!(
            code_dir(root, &action("../x"), ".."),
            Path::new("/d/guest/%2E./x/%2E.")
        );
        assert_eq!(
            code_dir(root, &action("a b/"), ""),
            Path::new("/d/guest/a%20b/%00/%00")
        );
    }

    #[test]
    fn concurrent_materialise_keeps_one_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let src = format!("y = 2\n#{}\n", "x".repeat(4 << 20));
        let start = std::sync::Barrier::new(8);
        // A tree moved aside under a caller that already got it would change the inode it saw.
        let dirs: Vec<(PathBuf, u64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let d = materialise(
                            tmp.path(),
                            &action("race"),
                            "1",
                            &Code::Source(src.clone()),
                            "main",
                            LIMITS_BIG,
                        )
                        .unwrap();
                        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&d).unwrap());
                        (d, ino)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let now = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&dirs[0].0).unwrap());
        for (d, ino) in &dirs {
            assert_eq!(d, &dirs[0].0);
            assert_eq!(*ino, now, "a caller's tree was replaced");
        }
        assert_eq!(
            fs::read_to_string(dirs[0].0.join("__main__.py")).unwrap(),
            src
        );
    }

    #[test]
    fn source_and_zip_materialise_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = materialise(
            tmp.path(),
            &action("a"),
            "0.0.1",
            &Code::Source("x = 1".into()),
            "main",
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("__main__.py")).unwrap(),
            "x = 1"
        );
        let mode = fs::metadata(dir.join("__main__.py"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);

        // Same version, different content (action deleted and re-created): replaced.
        let z = zip_of(&[("__main__.py", b"y = 2"), ("lib/helper.py", b"z = 3")]);
        let dir2 = materialise(
            tmp.path(),
            &action("a"),
            "0.0.1",
            &Code::Zip(z),
            "main",
            LIMITS,
        )
        .unwrap();
        assert_eq!(dir, dir2);
        assert_eq!(
            fs::read_to_string(dir.join("__main__.py")).unwrap(),
            "y = 2"
        );
        assert_eq!(
            fs::read_to_string(dir.join("lib/helper.py")).unwrap(),
            "z = 3"
        );
    }

    fn check_bad_zip(entries: &[(&str, &[u8])], limits: ZipLimits, expect: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let err = materialise(
            tmp.path(),
            &action("z"),
            "1",
            &Code::Zip(zip_of(entries)),
            "main",
            limits,
        )
        .unwrap_err();
        assert!(matches!(err, CodeError::BadArchive(_)), "{err:?}");
        assert!(
            err.to_string().contains(expect),
            "{err} does not contain {expect}"
        );
        // Nothing is left behind but the (empty) parent.
        let left: Vec<_> = fs::read_dir(tmp.path().join("guest/z")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn bad_archives_are_refused() {
        check_bad_zip(&[("../evil.py", b"x")], LIMITS, "unsafe path");
        check_bad_zip(&[("/etc/evil.py", b"x")], LIMITS, "unsafe path");
        check_bad_zip(&[("lib.py", b"x")], LIMITS, "does not include __main__.py");
        let big = vec![0u8; 4096];
        check_bad_zip(
            &[("__main__.py", &big)],
            ZipLimits {
                max_bytes: 1000,
                max_entries: 10,
            },
            "expands to more than 1000 bytes",
        );
        check_bad_zip(
            &[("__main__.py", b""), ("a", b""), ("b", b"")],
            ZipLimits {
                max_bytes: 1000,
                max_entries: 2,
            },
            "3 entries",
        );
        let tmp = tempfile::tempdir().unwrap();
        let err = materialise(
            tmp.path(),
            &action("z"),
            "1",
            &Code::Zip(b"not a zip".to_vec()),
            "main",
            LIMITS,
        )
        .unwrap_err();
        assert!(err.to_string().contains("Unable to unzip"), "{err}");
    }
}
