//! Armed lazy restores ([`Sandbox::prestart_lazy`]): restored ahead of the request with
//! `criu restore --lazy-pages --leave-stopped`, served by the crate's own lazy-pages server
//! fed straight from a full checkpoint's pages files.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use medes_criu_image::decode_pagemap;
use medes_sandbox::*;
use serde_json::json;

use super::{RANDOM, action, config, run_req, spec, started};

const BATCH: usize = 64;

/// The processes of a checkpoint in pid order: (pid, pagemap, mm, pages file name).
fn procs(images: &Path) -> Vec<(u32, Vec<u8>, Vec<u8>, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(images).expect("images") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pagemap-")
            .and_then(|r| r.strip_suffix(".img"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let pm = std::fs::read(images.join(&name)).expect("pagemap");
        let mm = std::fs::read(images.join(format!("mm-{pid}.img"))).expect("mm");
        let file = format!(
            "pages-{}.img",
            decode_pagemap(&pm).expect("decode").head.pages_id
        );
        out.push((pid, pm, mm, file));
    }
    out.sort_by_key(|p| p.0);
    out
}

/// The pages of every process concatenated in pid order (the global page order).
fn all_pages(images: &Path, procs: &[(u32, Vec<u8>, Vec<u8>, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, _, _, f) in procs {
        out.extend(std::fs::read(images.join(f)).expect("pages"));
    }
    out
}

/// A restore directory: every file of the checkpoint but its pages files.
fn restore_dir(images: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(images).expect("images") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("pages-") && e.path().is_file() {
            std::fs::copy(e.path(), dir.path().join(&name)).expect("copy");
        }
    }
    dir
}

fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 2..].split(' ').next().map(str::to_string))
        })
        .is_some_and(|st| st == "T" || st == "t")
}

/// Arm → (nothing runs, no background fill) → resume: the restored runtime continues from the
/// checkpoint, reseeded, and the held fill completes; dropping an armed sandbox leaves
/// nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armed_lazy_restore_stays_stopped_until_resumed() {
    let Some(cfg) = config() else { return };
    let a = action(RANDOM);
    let sb = started(&cfg, "arm", &a.path, 128).await;
    let r0 = sb.run(run_req(json!({"x": 1}))).await.expect("run");
    assert_eq!(r0.result["n"], 1);
    let images = tempfile::tempdir().expect("tempdir");
    sb.checkpoint(images.path(), CheckpointMode::LeaveRunning)
        .await
        .expect("dump");
    let procs = procs(images.path());
    let pages = std::sync::Arc::new(all_pages(images.path(), &procs));
    let layout_in: Vec<(u32, &[u8], &[u8])> = procs
        .iter()
        .map(|(p, pm, mm, _)| (*p, &pm[..], &mm[..]))
        .collect();

    for resume in [true, false] {
        let layout = LazyLayout::new(&layout_in).expect("layout");
        let n_pages = layout.n_pages();
        let rdir = restore_dir(images.path());
        let demand = {
            let pages = pages.clone();
            Box::new(move |b: usize, r: std::ops::Range<u64>, out: &mut [u8]| {
                let first = (b * BATCH) as u64;
                for p in r {
                    let (at, src) = (((p - first) * 4096) as usize, (p * 4096) as usize);
                    out[at..at + 4096].copy_from_slice(&pages[src..src + 4096]);
                }
                Ok(())
            }) as DemandFn
        };
        let (daemon, feed) =
            LazyDaemon::start(rdir.path(), layout, BATCH, 8, demand).expect("daemon");
        daemon.hold_fill(true);
        let fill_pages = {
            let (procs, pages) = (procs.clone(), pages.clone());
            move |files: Vec<(String, std::fs::File)>| async move {
                // Only the eager pages matter to CRIU; write whole files (simplest).
                let mut first = 0usize;
                for (_, _, _, name) in &procs {
                    let (_, f) = files.iter().find(|(n, _)| n == name).expect("pages file");
                    let size = f.metadata().expect("stat").len() as usize;
                    f.write_all_at(&pages[first..first + size], 0)
                        .map_err(|e| e.to_string())?;
                    first += size;
                }
                Ok::<(), String>(())
            }
        };
        let t0 = std::time::Instant::now();
        let (armed, t) = Sandbox::prestart_lazy(
            &cfg,
            spec("armed", &a.path, 128),
            rdir.path(),
            fill_pages,
            &daemon,
        )
        .await
        .expect("armed restore");
        eprintln!(
            "armed restore: {:.1} ms (criu {:.1} ms) of {n_pages} pages",
            t0.elapsed().as_secs_f64() * 1e3,
            t.criu_ms
        );
        let pids = armed.pids();
        assert!(!pids.is_empty());
        // Stays stopped, and the held fill copies nothing beyond the prefetched pages.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for &p in &pids {
            assert!(
                stopped(p),
                "process {p} of the armed sandbox is not stopped"
            );
        }
        for b in 0..n_pages.div_ceil(BATCH as u64) as usize {
            let lo = b * BATCH * 4096;
            let hi = ((b + 1) * BATCH * 4096).min(pages.len());
            let mut buf = feed.buffer(hi - lo);
            buf.copy_from_slice(&pages[lo..hi]);
            feed.push(b, buf);
            if b == 3 {
                break; // a few queued batches: held, not copied
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = daemon.stats();
        assert!(
            st.copied_pages < n_pages / 4,
            "the held fill copied {} of {n_pages} pages",
            st.copied_pages
        );
        let m = armed.memory().expect("memory");
        eprintln!("armed: {m:?}, copied {} pages", st.copied_pages);
        if !resume {
            let dir = cfg.run_dir.join(&armed.id().0);
            armed.destroy().await.expect("destroy");
            drop(daemon);
            assert!(!dir.exists(), "run directory left behind");
            for p in pids {
                assert!(
                    !Path::new(&format!("/proc/{p}")).exists() || !stopped(p),
                    "process {p} left behind"
                );
            }
            continue;
        }
        daemon.hold_fill(false);
        let producer = {
            let (feed, pages) = (feed.clone(), pages.clone());
            std::thread::spawn(move || {
                for b in 4..n_pages.div_ceil(BATCH as u64) as usize {
                    let lo = b * BATCH * 4096;
                    let hi = ((b + 1) * BATCH * 4096).min(pages.len());
                    let mut buf = feed.buffer(hi - lo);
                    buf.copy_from_slice(&pages[lo..hi]);
                    feed.push(b, buf);
                }
            })
        };
        let (c, reseed_ms) = armed.resume().await.expect("resume");
        eprintln!("resume: reseed {reseed_ms:.1} ms");
        let kill = c.killer().expect("killer");
        daemon.detach(kill);
        let r1 = c.run(run_req(json!({"x": 2}))).await.expect("run");
        assert_eq!(r1.result["n"], 2, "continues from the checkpoint");
        assert_eq!(r1.result["x"], 2);
        let r2 = sb.run(run_req(json!({"x": 2}))).await.expect("run");
        assert_ne!(r1.result["r"], r2.result["r"], "reseeded");
        assert_ne!(r1.result["u"], r2.result["u"], "fresh os.urandom");
        producer.join().expect("producer");
        let st = tokio::time::timeout(Duration::from_secs(20), feed.finished())
            .await
            .expect("fill in time")
            .expect("fill complete");
        assert!(st.complete);
        c.destroy().await.expect("destroy");
    }
    sb.destroy().await.expect("destroy");
}
