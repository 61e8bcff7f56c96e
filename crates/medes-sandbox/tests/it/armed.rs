//! Armed lazy restores ([`Sandbox::prestart_lazy`]): restored ahead of the request with
//! `criu restore --lazy-pages --leave-stopped`, served by the crate's own lazy-pages server
//! fed straight from a full checkpoint's pages files.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use medes_criu_image::{
    decode_mm, decode_pagemap, encode_mm, encode_pagemap, lazify, reg_file_names, vma_status,
};
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

/// Each process's (pid, pagemap, mm).
type ProcImages = Vec<(u32, Vec<u8>, Vec<u8>)>;

/// Rewrites the restore directory `rdir` with `medes_criu_image::lazify`'s images (through
/// [`replace_images`]); returns the images to lay the restore out with, the split mappings and
/// the bytes made lazy.
fn lazify_dir(
    rdir: &Path,
    procs: &[(u32, Vec<u8>, Vec<u8>, String)],
) -> (ProcImages, SplitMappings, u64) {
    let names = reg_file_names(&std::fs::read(rdir.join("files.img")).expect("files")).unwrap();
    let (mut out, mut split, mut lazy) = (Vec::new(), Vec::new(), 0);
    for (pid, pm, mm, _) in procs {
        let (p, m) = (decode_pagemap(pm).unwrap(), decode_mm(mm).unwrap());
        let Some(l) = lazify(&m, &p) else {
            out.push((*pid, pm.clone(), mm.clone()));
            continue;
        };
        lazy += l.pages * 4096;
        let (pm2, mm2) = (
            encode_pagemap(&l.pagemap).unwrap(),
            encode_mm(&l.mm).unwrap(),
        );
        let files = [
            (format!("pagemap-{pid}.img"), pm2.clone()),
            (format!("mm-{pid}.img"), mm2.clone()),
        ];
        replace_images(rdir, &files).expect("replace");
        let with_paths = l
            .split
            .iter()
            .map(|v| (v.clone(), names[&(v.shmid as u32)].clone()))
            .collect();
        split.push((*pid, with_paths));
        out.push((*pid, pm2, mm2));
    }
    (out, split, lazy)
}

/// Arm → (nothing runs, no background fill) → resume: the restored runtime continues from the
/// checkpoint, reseeded, and the held fill completes; dropping an armed sandbox leaves
/// nothing behind. With the written pages of its private file mappings made lazy
/// (`medes_criu_image::lazify`), the stopped tree holds less, the runtime continues the same,
/// and a checkpoint of it maps those files as the original dump did and restores.
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

    let mut plain_pss = 0;
    for (resume, lazy) in [(true, false), (false, false), (true, true)] {
        let rdir = restore_dir(images.path());
        let (lazified, split, lazy_bytes) = if lazy {
            lazify_dir(rdir.path(), &procs)
        } else {
            (Vec::new(), Vec::new(), 0)
        };
        let layout = if lazy {
            assert!(lazy_bytes > 100 * 4096, "only {lazy_bytes} B made lazy");
            let v: Vec<(u32, &[u8], &[u8])> = lazified
                .iter()
                .map(|(p, pm, mm)| (*p, &pm[..], &mm[..]))
                .collect();
            LazyLayout::new(&v).expect("layout")
        } else {
            LazyLayout::new(&layout_in).expect("layout")
        };
        let n_pages = layout.n_pages();
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
        if lazy {
            assert!(
                m.pss.0 + lazy_bytes / 2 <= plain_pss,
                "{m:?}: {lazy_bytes} B made lazy, {plain_pss} B of PSS without"
            );
            armed.set_split_mappings(split.clone());
        } else if resume {
            plain_pss = m.pss.0;
        }
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
        if lazy {
            // Dumped again: the split mappings are back as they were, and it restores.
            let again = tempfile::tempdir().expect("tempdir");
            c.checkpoint(again.path(), CheckpointMode::LeaveRunning)
                .await
                .expect("dump of the lazy restore");
            for (pid, mappings) in &split {
                let mm =
                    decode_mm(&std::fs::read(again.path().join(format!("mm-{pid}.img"))).unwrap())
                        .unwrap();
                for (o, path) in mappings {
                    assert!(
                        mm.vmas.iter().any(|v| (v.start, v.end, v.pgoff, v.prot)
                            == (o.start, o.end, o.pgoff, o.prot)
                            && v.status & vma_status::FILE_PRIVATE != 0),
                        "{path} at {:#x} not put back",
                        o.start
                    );
                }
            }
            let d = Sandbox::restore(&cfg, spec("armed-again", &a.path, 128), again.path())
                .await
                .expect("restore of the dump of a lazy restore");
            let r3 = d.run(run_req(json!({"x": 3}))).await.expect("run");
            assert_eq!(r3.result["n"], 3, "continues from the second checkpoint");
            d.destroy().await.expect("destroy");
        }
        c.destroy().await.expect("destroy");
    }
    sb.destroy().await.expect("destroy");
}
