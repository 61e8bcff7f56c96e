//! Running the CRIU CLI: bounded in time (SIGKILL on expiry), modest log level, logs truncated.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of our metadata file inside an images directory.
pub(crate) const META: &str = "medes-sandbox.json";
/// Logs are cut to this many trailing bytes.
const LOG_KEEP: u64 = 64 * 1024;

/// What a restore needs to know besides CRIU's own images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) format: u32,
    /// Inode of the listening socket the runtime holds as fd 3.
    pub(crate) listen_ino: u64,
    /// `--external net[..]` key of the network namespace.
    pub(crate) net_key: String,
    /// (mount target inside the sandbox, external key)
    pub(crate) mounts: Vec<(PathBuf, String)>,
    /// The sandbox's hostname.
    pub(crate) hostname: String,
    /// Size of every image file at dump time (a truncated pages file makes CRIU hang).
    pub(crate) files: BTreeMap<String, u64>,
}

/// How a CRIU run ended.
pub(crate) enum Outcome {
    Ok,
    Failed { status: String, log_tail: String },
    TimedOut,
    Spawn(io::Error),
}

/// Runs criu with `args`; `pre_exec` runs in the child before exec.
pub(crate) async fn run(
    criu: &Path,
    args: Vec<OsString>,
    log: &Path,
    bound: Duration,
    pre_exec: Option<Box<dyn FnMut() -> io::Result<()> + Send + Sync>>,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(criu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(f) = pre_exec {
        // SAFETY: the hook only issues raw syscalls on data prepared before the fork.
        unsafe { cmd.pre_exec(f) };
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Spawn(e),
    };
    let status = match tokio::time::timeout(bound, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Outcome::Spawn(e),
        Err(_) => {
            let _ = child.kill().await;
            truncate_log(log);
            return Outcome::TimedOut;
        }
    };
    truncate_log(log);
    if status.success() {
        Outcome::Ok
    } else {
        Outcome::Failed { status: status.to_string(), log_tail: log_tail(log) }
    }
}

/// Keeps only the last [`LOG_KEEP`] bytes of a log.
pub(crate) fn truncate_log(log: &Path) {
    let Ok(m) = fs::metadata(log) else { return };
    if m.len() <= LOG_KEEP {
        return;
    }
    if let Ok(data) = fs::read(log) {
        let tail = &data[data.len() - LOG_KEEP as usize..];
        let _ = fs::write(log, tail);
    }
}

/// The last error-looking lines of a log (or its last lines).
pub(crate) fn log_tail(log: &Path) -> String {
    let s = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let errs: Vec<&str> =
        lines.iter().copied().filter(|l| l.contains("Error") || l.contains("rror (")).collect();
    let pick = if errs.is_empty() { &lines[..] } else { &errs[..] };
    pick[pick.len().saturating_sub(12)..].join("\n")
}

/// Sizes of the image files in `dir` (without logs and our metadata).
pub(crate) fn image_files(dir: &Path) -> io::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") || name == META {
            continue;
        }
        let m = e.metadata()?;
        if m.is_file() {
            out.insert(name, m.len());
        }
    }
    Ok(out)
}

pub(crate) fn write_meta(dir: &Path, meta: &Meta) -> io::Result<PathBuf> {
    let p = dir.join(META);
    let tmp = dir.join(format!("{META}.tmp"));
    fs::write(&tmp, serde_json::to_vec_pretty(meta).map_err(io::Error::other)?)?;
    fs::rename(&tmp, &p)?;
    Ok(p)
}

pub(crate) fn read_meta(dir: &Path) -> Result<Meta, String> {
    let p = dir.join(META);
    let data = fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    serde_json::from_slice(&data).map_err(|e| format!("parsing {}: {e}", p.display()))
}
