//! Measures the sandbox lifecycle on this machine (needs root and CRIU):
//! cold start to first answer, warm run round trip, checkpoint and restore to first answer,
//! for a trivial action and one importing numpy.
//!
//! `cargo run -p medes-sandbox --example sandbox_bench --release -- [runs]`
//! (`MEDES_BENCH_KEEP=1` keeps the images and CRIU logs under the temp dir; `RUST_LOG=debug`
//! prints per-phase timings.)

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use medes_core::{Bytes, SandboxId};
use medes_sandbox::*;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn spec(id: String, code: &std::path::Path) -> SandboxSpec {
    SandboxSpec {
        id: SandboxId(id),
        code_dir: code.to_path_buf(),
        memory_limit: Bytes::mib(512),
        env: BTreeMap::new(),
    }
}

fn req() -> RunRequest {
    RunRequest {
        value: Default::default(),
        env: BTreeMap::new(),
        timeout: Duration::from_secs(30),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let cfg = SandboxConfig::default();
    preflight(&cfg)?;
    become_subreaper()?;
    let actions = [
        ("noop", "def main(args):\n    return {}\n"),
        (
            "numpy",
            "import numpy as np\ndef main(args):\n    return {'s': float(np.arange(10).sum())}\n",
        ),
    ];
    let tmp = std::env::temp_dir().join(format!("medes-sandbox-bench-{}", std::process::id()));
    for (name, code) in actions {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("__main__.py"), code)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let mut cold = Vec::new();
        for i in 0..runs {
            let t0 = Instant::now();
            let sb = Sandbox::start(&cfg, spec(format!("bench-{name}-c{i}"), &dir)).await?;
            sb.init(InitRequest {
                main: "main".into(),
            })
            .await?;
            sb.run(req()).await?;
            cold.push(t0.elapsed().as_secs_f64() * 1e3);
            sb.destroy().await?;
        }
        let sb = Sandbox::start(&cfg, spec(format!("bench-{name}-w"), &dir)).await?;
        sb.init(InitRequest {
            main: "main".into(),
        })
        .await?;
        let mut warm = Vec::new();
        let mut overhead = Vec::new();
        for _ in 0..(runs * 100) {
            let t0 = Instant::now();
            let r = sb.run(req()).await?;
            let us = t0.elapsed().as_secs_f64() * 1e6;
            warm.push(us);
            overhead.push(us - r.main_ms * 1e3);
        }
        let mem = sb.memory()?;
        let mut dump = Vec::new();
        let mut restore = Vec::new();
        let mut pages = Bytes(0);
        for i in 0..runs {
            let img = tmp.join(format!("img-{name}-{i}"));
            let info = sb.checkpoint(&img, CheckpointMode::LeaveRunning).await?;
            dump.push(info.dump_ms);
            pages = info.page_image_bytes;
            let t0 = Instant::now();
            let c = Sandbox::restore(&cfg, spec(format!("bench-{name}-r{i}"), &dir), &img).await?;
            c.run(req()).await?;
            restore.push(t0.elapsed().as_secs_f64() * 1e3);
            c.destroy().await?;
            if std::env::var_os("MEDES_BENCH_KEEP").is_none() {
                std::fs::remove_dir_all(&img)?;
            }
        }
        sb.destroy().await?;
        println!(
            "{name}: cold start to first answer p50 {:.1} ms p99 {:.1} ms | warm round trip p50 {:.0} µs \
             p99 {:.0} µs (overhead p50 {:.0} µs) | pss {} | dump p50 {:.1} ms (pages {}) | \
             restore to first answer p50 {:.1} ms p99 {:.1} ms",
            pct(&mut cold, 0.5),
            pct(&mut cold, 0.99),
            pct(&mut warm, 0.5),
            pct(&mut warm, 0.99),
            pct(&mut overhead, 0.5),
            mem.pss,
            pct(&mut dump, 0.5),
            pages,
            pct(&mut restore, 0.5),
            pct(&mut restore, 0.99),
        );
    }
    if std::env::var_os("MEDES_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    release_spare_netns();
    Ok(())
}
