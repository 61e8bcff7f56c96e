//! What the late-pages gate of [`Sandbox::restore_with`] costs and saves, interleaved with
//! plain restores of the same image (needs root and CRIU):
//! - plain: `Sandbox::restore` (pages present);
//! - gate, early: the pages are written 10 ms after the start, before CRIU needs them (the
//!   gate's own cost);
//! - gate, late by D ms: the pages arrive D ms after the start (what a rebuild of D ms costs on
//!   top of the restore: ideally max(0, D − CRIU's namespace phase)).
//!
//! `cargo run -p medes-sandbox --example gate_cost --release -- [runs] [action-dir]`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medes_core::{Bytes, SandboxId};
use medes_sandbox::*;

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spec(id: String, code: &Path) -> SandboxSpec {
    SandboxSpec {
        id: SandboxId(id),
        code_dir: code.to_path_buf(),
        memory_limit: Bytes::mib(512),
        env: BTreeMap::new(),
    }
}

fn pages_of(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let cfg = SandboxConfig::default();
    preflight(&cfg)?;
    become_subreaper()?;
    let tmp = std::env::temp_dir().join(format!("medes-gate-{}", std::process::id()));
    let code = match args.next() {
        Some(d) => PathBuf::from(d),
        None => {
            let c = tmp.join("code");
            std::fs::create_dir_all(&c)?;
            std::fs::write(
                c.join("__main__.py"),
                "import json\ndef main(a):\n    return {'ok': True}\n",
            )?;
            c
        }
    };
    let pid = std::process::id();
    let sb = Sandbox::start(&cfg, spec(format!("g{pid}-orig"), &code)).await?;
    let init = sb
        .init(InitRequest {
            main: "main".into(),
        })
        .await?;
    assert!(init.ok, "{:?}", init.error);
    let images = Path::new("/dev/shm").join(format!("medes-gate-{pid}"));
    let info = sb.checkpoint(&images, CheckpointMode::Stop).await?;
    sb.destroy().await?;
    let saved: Vec<(String, Vec<u8>)> = pages_of(&images)
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(p).unwrap_or_default())
        })
        .collect();
    let delays = [10u64, 30, 60];
    let mut plain = Vec::new();
    let mut gated: Vec<Vec<f64>> = vec![Vec::new(); delays.len()];
    for i in 0..runs {
        let t0 = Instant::now();
        let c = Sandbox::restore(&cfg, spec(format!("g{pid}-p{i}"), &code), &images).await?;
        plain.push(t0.elapsed().as_secs_f64() * 1e3);
        c.destroy().await?;
        for (k, d) in delays.iter().enumerate() {
            let saved = &saved;
            let back = |files: Vec<(String, std::fs::File)>| async move {
                use std::os::unix::fs::FileExt;
                tokio::time::sleep(Duration::from_millis(*d)).await;
                for (name, f) in files {
                    let data = saved
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, d)| d.as_slice())
                        .unwrap_or_default();
                    f.write_all_at(data, 0).map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            };
            let id = format!("g{pid}-d{d}-{i}");
            let (c, t) = Sandbox::restore_with(&cfg, spec(id, &code), &images, back).await?;
            gated[k].push(t.total_ms);
            c.destroy().await?;
        }
    }
    println!(
        "page image {:.1} MB; plain restore p50 {:.1} ms",
        info.page_image_bytes.0 as f64 / 1048576.0,
        p50(&mut plain)
    );
    for (k, d) in delays.iter().enumerate() {
        let m = p50(&mut gated[k]);
        println!(
            "pages ready after {d:>3} ms: restore p50 {m:6.1} ms (plain + {:5.1} ms)",
            m - p50(&mut plain)
        );
    }
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_dir_all(&tmp);
    release_spare_netns();
    Ok(())
}
