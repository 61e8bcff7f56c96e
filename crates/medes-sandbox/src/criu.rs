//! Running the CRIU CLI: bounded in time (SIGKILL on expiry), modest log level, logs truncated.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ImageProblem;

/// Name of our metadata file inside an images directory.
pub(crate) const META: &str = "medes-sandbox.json";
/// Logs are cut to this many trailing bytes.
const LOG_KEEP: u64 = 1024 * 1024;

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
    /// `MAP_DROPPABLE` ranges (`[start, end)`) of each process at dump time, by pid inside the
    /// sandbox: glibc's `getrandom` state, to be invalidated in every restored copy (CRIU
    /// restores these mappings as plain anonymous memory).
    #[serde(default)]
    pub(crate) droppable: BTreeMap<u32, Vec<(u64, u64)>>,
}

/// CRIU's log level flag: `-v2` (errors and warnings), or `-v<N>` from the environment variable
/// `MEDES_CRIU_VERBOSITY` for diagnostics (logs are truncated either way).
pub(crate) fn verbosity() -> String {
    let n = std::env::var("MEDES_CRIU_VERBOSITY")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|n| *n <= 4)
        .unwrap_or(2);
    format!("-v{n}")
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
        Outcome::Failed {
            status: status.to_string(),
            log_tail: log_tail(log),
        }
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
    let errs: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error") || l.contains("rror ("))
        .collect();
    let pick = if errs.is_empty() {
        &lines[..]
    } else {
        &errs[..]
    };
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
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(meta).map_err(io::Error::other)?,
    )?;
    fs::rename(&tmp, &p)?;
    Ok(p)
}

/// Replaces image files of the checkpoint in `dir` (`(name, contents)`) and records their new
/// sizes in the checkpoint's metadata (restores check every file against it), which is read
/// and written once: for a caller that rewrites images it understands, e.g. mm and pagemap
/// images made lazier (`medes_criu_image::lazify`). Each file must be one the dump wrote.
pub fn replace_images(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), ImageProblem> {
    let mut meta = read_meta(dir)?;
    let write = |file: &str, source| ImageProblem::Write {
        file: file.into(),
        source,
    };
    for (name, data) in files {
        let Some(size) = meta.files.get_mut(name) else {
            return Err(ImageProblem::Missing { file: name.clone() });
        };
        *size = data.len() as u64;
        fs::write(dir.join(name), data).map_err(|e| write(name, e))?;
    }
    write_meta(dir, &meta).map_err(|e| write(META, e))?;
    Ok(())
}

/// Puts the split private file mappings back in a fresh dump in `dir` (before its metadata is
/// written): see `medes_criu_image::unlazify`.
pub(crate) fn put_back_split_mappings(dir: &Path, split: &crate::SplitMappings) -> io::Result<()> {
    use medes_criu_image::{decode_mm, decode_pagemap, encode_mm, encode_pagemap, unlazify};
    let files = fs::read(dir.join("files.img"))?;
    let ids = medes_criu_image::reg_file_names(&files)
        .map_err(io::Error::other)?
        .into_iter()
        .map(|(id, path)| (path, id))
        .collect();
    for (pid, mappings) in split {
        let (mm_p, pm_p) = (
            dir.join(format!("mm-{pid}.img")),
            dir.join(format!("pagemap-{pid}.img")),
        );
        // A process of the restore that is gone has no images.
        let (Ok(mm), Ok(pm)) = (fs::read(&mm_p), fs::read(&pm_p)) else {
            continue;
        };
        let mm = decode_mm(&mm).map_err(io::Error::other)?;
        let pm = decode_pagemap(&pm).map_err(io::Error::other)?;
        if let Some((mm, pm)) = unlazify(&mm, &pm, mappings, &ids) {
            // The pagemap first: with it alone rewritten (a failed second write) the pages
            // are eager in anonymous mappings, still a right dump.
            let (mm, pm) = (
                encode_mm(&mm).map_err(io::Error::other)?,
                encode_pagemap(&pm).map_err(io::Error::other)?,
            );
            fs::write(&pm_p, pm)?;
            fs::write(&mm_p, mm)?;
        }
    }
    Ok(())
}

pub(crate) fn read_meta(dir: &Path) -> Result<Meta, ImageProblem> {
    let path = dir.join(META);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(source) => return Err(ImageProblem::ReadMeta { path, source }),
    };
    serde_json::from_slice(&data).map_err(|source| ImageProblem::ParseMeta { path, source })
}

/// Whether a failed dump's log tail says CRIU refused a connected TCP socket (CRIU 4.1 names it
/// only there, e.g. `Error (criu/sk-inet.c:...): inet: Connected TCP socket, consider using
/// --tcp-established option`): the one place this crate reads CRIU's text.
pub(crate) fn refused_tcp(log_tail: &str) -> bool {
    log_tail.contains("TCP")
}

/// CRIU probes kernel features on every run (about 30 ms here, most of it creating a network
/// namespace) unless it finds its cache `/run/criu.kdat`, which it only writes when `/run` is a
/// tmpfs. Where `/run` is not (as on this project's machines), generate the cache once per boot
/// by running `criu check` in a private mount namespace with a tmpfs on `/run`, and install it.
/// Best effort: without the cache CRIU still works, only slower.
pub(crate) fn ensure_kdat_cache(criu: &Path) {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let cache = Path::new("/run/criu.kdat");
        if run_is_tmpfs() || fresh_since_boot(cache) {
            return;
        }
        let out = std::process::Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg("mount -t tmpfs medes-kdat /run && \"$0\" check >/dev/null 2>&1; cat /run/criu.kdat")
            .arg(criu)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if let Ok(o) = out
            && o.status.success()
            && o.stdout.len() > 64
        {
            let tmp = PathBuf::from(format!("/run/criu.kdat.medes-{}", std::process::id()));
            if fs::write(&tmp, &o.stdout).is_ok() && fs::rename(&tmp, cache).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
    });
}

fn run_is_tmpfs() -> bool {
    nix::sys::statfs::statfs("/run")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn fresh_since_boot(p: &Path) -> bool {
    let btime = fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
    });
    match (fs::metadata(p), btime) {
        (Ok(m), Some(b)) => {
            use std::os::unix::fs::MetadataExt;
            m.len() > 0 && m.mtime() > b
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_image_listing_skips_logs() {
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(d.path().join("pages-1.img"), [0u8; 8192]).expect("write");
        fs::write(d.path().join("dump.log"), "x").expect("write");
        let files = image_files(d.path()).expect("list");
        assert_eq!(files.len(), 1);
        let meta = Meta {
            format: 1,
            listen_ino: 42,
            net_key: "k".into(),
            mounts: vec![("/usr".into(), "m0".into())],
            hostname: "h".into(),
            files,
            droppable: BTreeMap::from([(1, vec![(4096, 8192)])]),
        };
        write_meta(d.path(), &meta).expect("write meta");
        let back = read_meta(d.path()).expect("read meta");
        assert_eq!(back.listen_ino, 42);
        assert_eq!(back.files["pages-1.img"], 8192);
        assert_eq!(back.droppable[&1], vec![(4096, 8192)]);
        assert_eq!(
            image_files(d.path()).expect("list").len(),
            1,
            "metadata is not an image"
        );
    }

    #[test]
    fn logs_are_truncated_and_errors_picked() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = d.path().join("x.log");
        let mut s = String::new();
        for i in 0..200_000 {
            s.push_str(&format!("(0.{i}) line {i}\n"));
        }
        s.push_str("(9.9) Error (criu/x.c:1): boom\n");
        fs::write(&log, s).expect("write");
        truncate_log(&log);
        assert!(fs::metadata(&log).expect("stat").len() <= LOG_KEEP);
        assert_eq!(log_tail(&log), "(9.9) Error (criu/x.c:1): boom");
    }

    #[test]
    fn missing_or_malformed_metadata_is_an_image_problem() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            read_meta(d.path()),
            Err(ImageProblem::ReadMeta { .. })
        ));
        fs::write(d.path().join(META), "{").expect("write");
        assert!(matches!(
            read_meta(d.path()),
            Err(ImageProblem::ParseMeta { .. })
        ));
    }

    #[test]
    fn a_refused_tcp_socket_is_recognised_in_the_log() {
        assert!(refused_tcp(
            "(0.01) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using \
             --tcp-established option."
        ));
        assert!(!refused_tcp(
            "(0.01) Error (criu/cr-dump.c:1): dumping failed"
        ));
    }
}
