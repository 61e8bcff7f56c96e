//! Test support: real CRIU dumps of small Python processes (shared with medes-dedup's tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Python used for sandboxes: the project venv, else Debian's python3 (never pyenv's).
pub fn python() -> PathBuf {
    let venv = PathBuf::from("/opt/medes/venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("/usr/bin/python3")
    }
}

/// Why real dumps cannot be made here, if they cannot.
pub fn missing_dependency() -> Option<String> {
    // SAFETY-free check: root is uid 0 in /proc/self/status.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Some("not root".into());
    }
    let criu = Command::new("criu")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(criu, Ok(s) if s.success()) {
        return Some("criu not installed".into());
    }
    None
}

/// Returns true if the test must be skipped; panics (fails) if CI=true and deps are missing.
pub fn skip_without_criu(test: &str) -> bool {
    match missing_dependency() {
        None => false,
        Some(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: CI=true but {why}");
            }
            eprintln!("skipping {test}: {why}");
            true
        }
    }
}

/// The code of a tiny json-only "function" (fast to start and dump).
pub const JSON_FUNCTION: &str = r#"import json
d = {"k%d" % i: [i, str(i), {"x": i * 1.5}] for i in range(2000)}
s = json.dumps(d); json.loads(s)
ANSWER = len(s)"#;

/// Path of the answer file a sandbox dumped into `dir` keeps rewriting (also after a restore).
pub fn answer_file(dir: &Path) -> PathBuf {
    dir.with_extension("answer")
}

/// Cold-starts `code` as PID 1 of a new PID namespace (setsid, stdio on /dev/null), waits until it
/// has run, and dumps it with CRIU into `dir` (which must not exist or be empty). With
/// `aslr == false` the runtime runs under `setarch -R` with `PYTHONHASHSEED=0`. After `code`, the
/// process rewrites [`answer_file`] every 50 ms with `str(ANSWER)` (a global `code` may set),
/// opening and closing it each time, so a restored copy can be seen answering.
pub fn make_dump(code: &str, dir: &Path, aslr: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
    let ready = answer_file(dir);
    let _ = std::fs::remove_file(&ready);
    let script = format!(
        "{code}\nimport os, time\nANS = {:?}\nwhile True:\n    _fd = os.open(ANS + '.tmp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\n    os.write(_fd, str(globals().get('ANSWER', 'alive')).encode())\n    os.close(_fd)\n    os.rename(ANS + '.tmp', ANS)\n    time.sleep(0.05)\n",
        ready.display().to_string()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-pf", "setsid"]);
    if !aslr {
        cmd.args(["setarch", "-R"]).env("PYTHONHASHSEED", "0");
    }
    cmd.arg(python()).arg("-c").arg(&script);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut launcher = cmd.spawn().map_err(|e| format!("spawn unshare: {e}"))?;
    let start = Instant::now();
    while !ready.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = launcher.kill();
            let _ = launcher.wait();
            return Err("sandbox did not get ready".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", launcher.id()))
        .map_err(|e| format!("children of launcher: {e}"))?;
    let pid = children
        .split_whitespace()
        .next()
        .ok_or("launcher has no child")?
        .to_owned();
    // One dump at a time across test processes: these test processes share the host's mount
    // namespace and /proc, so CRIU's parasite mounts a fresh proc under a fixed directory name
    // in their root, and two concurrent dumps collide there (EEXIST, "Can't get /proc fd").
    // The platform's sandboxes have their own mount namespace and /proc; this is test-only.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("medes-test-criu-dump.lock"))
        .map_err(|e| format!("dump lock: {e}"))?;
    lock.lock().map_err(|e| format!("dump lock: {e}"))?;
    let out = Command::new("timeout")
        .args(["-s", "KILL", "60", "criu", "dump", "-t", &pid, "-D"])
        .arg(dir)
        .args(["-o", "dump.log", "-v1"])
        .output()
        .map_err(|e| format!("criu: {e}"))?;
    drop(lock);
    let _ = launcher.kill();
    let _ = launcher.wait();
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
        return Err(format!("criu dump failed: {log}"));
    }
    Ok(())
}

/// A fresh temporary directory under /dev/shm (tmpfs) if possible.
pub fn tmp_dir(tag: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Remove what earlier runs (whose process is gone) left behind.
    let prefix = format!("medes-test-{tag}-");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            // Only `<pid>-<nanos>` after the prefix: a longer tag sharing this one as its start
            // (`dedup` and `dedup-batches`) is another test's directory, not a leftover.
            let pid = rest.split('-').next().unwrap_or("");
            let is_pid = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
            if is_pid && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let d = base.join(format!("medes-test-{tag}-{}-{nanos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Restores the dump in `dir` with CRIU (detached), waits until the restored process rewrites
/// `answer` and returns what it wrote; the restored process is killed afterwards.
pub fn restore_and_read_answer(dir: &Path, answer: &Path) -> Result<String, String> {
    let _ = std::fs::remove_file(answer);
    let pidfile = dir.join("restore.pid");
    let out = Command::new("timeout")
        .args(["-s", "KILL", "30", "criu", "restore", "-d", "-D"])
        .arg(dir)
        .arg("--pidfile")
        .arg(&pidfile)
        .args(["-o", "restore.log", "-v1"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("criu: {e}"))?;
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join("restore.log")).unwrap_or_default();
        return Err(format!("criu restore failed: {log}"));
    }
    let pid = std::fs::read_to_string(&pidfile)
        .map_err(|e| format!("pidfile: {e}"))?
        .trim()
        .to_owned();
    let start = Instant::now();
    let result = loop {
        if let Ok(s) = std::fs::read_to_string(answer) {
            break Ok(s);
        }
        if start.elapsed() > Duration::from_secs(10) {
            break Err("restored process did not answer".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new("kill").args(["-9", &pid]).status();
    result
}
