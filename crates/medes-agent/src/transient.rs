//! Measuring a dedup start's transient memory m_R: what the node holds only while a restore
//! runs, besides the restored process itself. Two parts, sampled every [`EVERY`] on a thread
//! of their own: the rebuilt images in the restore's directory on the tmpfs (allocated bytes:
//! non-page images and pages files as they fill), and the resident size of the CRIU process
//! restoring from that directory (its `VmHWM`, found among the agent's children by its
//! command line). m_R is the sum of both peaks (an upper bound of the peak of the sum).
//!
//! Limits: a CRIU that lives less than one sampling period is missed (its part reads 0); the
//! restored tasks CRIU forks are the warm sandbox's memory, not m_R.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Sampling period.
const EVERY: Duration = Duration::from_millis(2);

/// A running measurement.
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, u64)>>,
}

/// Peaks of one restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Peaks {
    /// Rebuilt images on the tmpfs, bytes.
    pub images: u64,
    /// CRIU's resident size, bytes.
    pub criu: u64,
}

impl Peaks {
    pub(crate) fn total(&self) -> u64 {
        self.images + self.criu
    }
}

impl Sampler {
    /// Starts sampling the restore whose images are in `dir`.
    pub(crate) fn start(dir: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("medes-mr".into())
            .spawn(move || {
                let (mut images, mut criu) = (0u64, 0u64);
                let needle = dir.as_os_str().as_encoded_bytes().to_vec();
                loop {
                    let done = s2.load(Ordering::Relaxed);
                    images = images.max(dir_bytes(&dir));
                    criu = criu.max(criu_hwm(&needle));
                    if done {
                        break;
                    }
                    std::thread::sleep(EVERY);
                }
                (images, criu)
            })
            .ok();
        Sampler { stop, thread }
    }

    /// Stops and returns the peaks.
    pub(crate) fn finish(mut self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok((images, criu))) => Peaks { images, criu },
            _ => Peaks::default(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Allocated bytes of the files in `dir` (not recursive: CRIU's image directory is flat).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The largest `VmHWM` among this process's children whose command line mentions `needle`
/// (the restore's image directory), bytes.
fn criu_hwm(needle: &[u8]) -> u64 {
    let mut best = 0;
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in tasks.flatten() {
        let Ok(children) = fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for pid in children.split_whitespace() {
            let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if !cmd.windows(needle.len()).any(|w| w == needle) {
                continue;
            }
            let hwm = fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            best = best.max(hwm * 1024);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_a_directory_are_counted_by_allocation() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![1u8; 10_000]).unwrap();
        // A sparse file allocates nothing.
        let f = std::fs::File::create(d.path().join("b")).unwrap();
        f.set_len(1 << 20).unwrap();
        let n = dir_bytes(d.path());
        assert!((10_000..=16_384).contains(&n), "{n}");
        assert_eq!(dir_bytes(&d.path().join("missing")), 0);
    }

    #[test]
    fn a_child_is_found_by_its_command_line() {
        let dir = tempfile::tempdir().unwrap();
        // `$0` of the shell carries the needle; `; true` keeps the shell from exec'ing sleep.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 5; true")
            .arg(dir.path())
            .spawn()
            .ok();
        let Some(c) = child.as_mut() else {
            eprintln!("no sh binary; skipping");
            return;
        };
        std::thread::sleep(Duration::from_millis(50));
        let needle = dir.path().as_os_str().as_encoded_bytes().to_vec();
        let hwm = criu_hwm(&needle);
        let _ = c.kill();
        let _ = c.wait();
        assert!(hwm > 0, "the child's VmHWM was not found");
        assert_eq!(criu_hwm(b"/no/such/needle/anywhere"), 0);
    }
}
