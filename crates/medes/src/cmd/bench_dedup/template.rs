//! `medes bench dedup --template` (issue 8): sandboxes born from one template per function,
//! deduplicated against it.
//!
//! Per function: one sandbox is cold-started, initialised, warmed with one invocation (the
//! platform's warm-up) and checkpointed with `--leave-running` (the template, as the agent
//! makes it); then `--per-function` sandboxes are restored from the template (ASLR on: they all
//! share the template's layout), each serves one invocation and is dumped by CRIU onto tmpfs.
//! The registry holds the ten templates as bases (raw pages, as the agent registers them); each
//! born sandbox is deduplicated with the positional prediction against its own template
//! ([`medes_dedup::dedup_with_template`]), its store written, reloaded, rebuilt (every page
//! checksum-verified) and compared page by page with the dump. For comparison the same dump is
//! also deduplicated without the prediction (`savings_plain_pct`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use medes_core::{Bytes, SandboxId};
use medes_dedup::{
    BaseId, BaseMeta, DedupConfig, DedupStore, DumpImage, LocalBases, NodeId, PAGE, Registry,
    TemplateHint, TemplateLayout,
};
use medes_sandbox::{CheckpointMode, InitRequest, RunRequest, Sandbox, SandboxConfig, SandboxSpec};
use serde::Serialize;

const MB: f64 = 1e6;

/// Figures of one function (means over its born sandboxes, times as medians).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateFunctionReport {
    /// Function name.
    pub name: String,
    /// Born sandboxes measured.
    pub sandboxes: u64,
    /// Pages per sandbox.
    pub pages: u64,
    /// Pages of the template.
    pub template_pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages identical to their base page.
    pub exact: u64,
    /// Pages stored as patches.
    pub patched: u64,
    /// Pages stored on their own.
    pub standalone: u64,
    /// Share of the pages stored against the template page at their own address.
    pub positional_pct: f64,
    /// CRIU page image, MB.
    pub image_mb: f64,
    /// The store file, MB.
    pub stored_mb: f64,
    /// 100 × (1 − stored / image), as in the dedup-engine issue.
    pub savings_pct: f64,
    /// The same dumps deduplicated without the positional prediction (the plain `dedup`,
    /// with the engine's rebasing setting: `--no-rebase` compares raw pages like the template
    /// pass does).
    pub savings_plain_pct: f64,
    /// Mean patch size, bytes.
    pub avg_patch_bytes: f64,
    /// Dedup (prediction, lookups, encode, compress, store written), ms, median.
    pub dedup_ms: f64,
    /// Rebuild into memory (2 threads, every page verified), ms, median of the repeats.
    pub rebuild_ms: f64,
    /// Page bytes / median rebuild time, 10^9 bytes per second.
    pub rebuild_gb_per_s: f64,
    /// Page bytes / fastest rebuild.
    pub rebuild_best_gb_per_s: f64,
    /// Page bytes / (CPU time of one rebuild / 2 cores).
    pub rebuild_cpu_gb_per_s_2_cores: f64,
    /// The reference: a plain copy of as many bytes between two buffers of the process on 2
    /// threads, 10^9 bytes per second, median of as many repeats, timed next to the rebuilds.
    pub memcpy_gb_per_s: f64,
    /// `rebuild_gb_per_s` / `memcpy_gb_per_s`.
    pub rebuild_vs_memcpy: f64,
    /// Every rebuilt page equalled the dump's.
    pub verified: bool,
}

/// The report of `medes bench dedup --template`.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateReport {
    /// Always true here: sandboxes run with ASLR on, and born sandboxes share the template's.
    pub aslr: bool,
    /// Per function.
    pub functions: Vec<TemplateFunctionReport>,
    /// Unweighted mean of `savings_pct`.
    pub mean_savings_pct: f64,
    /// Unweighted mean of `savings_plain_pct`.
    pub mean_savings_plain_pct: f64,
    /// Smallest median rebuild speed over the functions.
    pub min_rebuild_gb_per_s: f64,
    /// Page bytes of all sandboxes / sum of their median rebuild times.
    pub overall_rebuild_gb_per_s: f64,
}

/// The template of one function and its born sandboxes' dumps.
pub struct Family {
    /// Function name.
    pub name: String,
    /// The template's image.
    pub template: PathBuf,
    /// Dumps of sandboxes restored from it.
    pub born: Vec<PathBuf>,
}

/// Makes a function's template in `dir/<name>-t` and `per` born dumps `dir/<name>-<i>`.
#[allow(clippy::too_many_arguments)]
pub async fn make_family(
    cfg: &SandboxConfig,
    tag: &str,
    name: &str,
    code: &Path,
    limit: Bytes,
    params: &serde_json::Map<String, serde_json::Value>,
    timeout_ms: u64,
    per: usize,
    dir: &Path,
) -> anyhow::Result<Family> {
    let spec = |i: &str| SandboxSpec {
        id: SandboxId(format!("{tag}-{name}-{i}")),
        code_dir: code.to_path_buf(),
        memory_limit: limit,
        env: BTreeMap::new(),
    };
    let run = RunRequest {
        value: params.clone(),
        env: BTreeMap::new(),
        timeout: Duration::from_millis(timeout_ms),
    };
    let template = dir.join(format!("{name}-t"));
    let sb = Sandbox::start(cfg, spec("t")).await?;
    let made = async {
        let init = sb
            .init(InitRequest {
                main: "main".into(),
            })
            .await?;
        anyhow::ensure!(init.ok, "init failed: {:?}", init.error);
        let r = sb.run(run.clone()).await?;
        anyhow::ensure!(r.error.is_none(), "warm-up run failed: {:?}", r.error);
        sb.checkpoint(&template, CheckpointMode::LeaveRunning)
            .await?;
        Ok(())
    }
    .await;
    let destroyed = sb.destroy().await;
    made?;
    destroyed?;
    let mut born = Vec::new();
    for i in 1..=per {
        let out = dir.join(format!("{name}-{i}"));
        let sb = Sandbox::restore(cfg, spec(&i.to_string()), &template)
            .await
            .context("restoring from the template")?;
        let dumped = async {
            let r = sb.run(run.clone()).await?;
            anyhow::ensure!(r.error.is_none(), "run failed: {:?}", r.error);
            sb.checkpoint(&out, CheckpointMode::Stop).await?;
            Ok(())
        }
        .await;
        let destroyed = sb.destroy().await;
        dumped?;
        destroyed?;
        born.push(out);
    }
    Ok(Family {
        name: name.to_string(),
        template,
        born,
    })
}

fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Copies `src` into `dst` (same length) on 2 threads; ms.
fn copy_2_threads(src: &[u8], dst: &mut [u8]) -> f64 {
    let t = Instant::now();
    let half = (src.len() / 2) & !(PAGE - 1);
    let (s1, s2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    std::thread::scope(|sc| {
        sc.spawn(|| d2.copy_from_slice(s2));
        d1.copy_from_slice(s1);
    });
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Deduplicates every born dump against its template, rebuilds and verifies.
pub fn evaluate(
    families: &[Family],
    dcfg: &DedupConfig,
    store_dir: &Path,
    rebuild_repeats: usize,
) -> anyhow::Result<TemplateReport> {
    let registry = Registry::new();
    let mut bases = LocalBases::new(false);
    let mut layouts = Vec::new();
    for (k, f) in families.iter().enumerate() {
        let dump = DumpImage::open(&f.template)
            .with_context(|| format!("opening {}", f.template.display()))?;
        let id = BaseId(k as u32);
        let meta = BaseMeta {
            function: f.name.clone(),
            node: NodeId(0),
        };
        medes_dedup::register_raw_base(&registry, id, meta, &dump, dcfg)?;
        layouts.push((TemplateLayout::of(&dump), dump.n_pages()));
        bases.insert(id, dump);
    }
    let mut functions = Vec::new();
    let (mut all_bytes, mut all_ms) = (0f64, 0f64);
    for (k, f) in families.iter().enumerate() {
        let id = BaseId(k as u32);
        let (layout, template_pages) = &layouts[k];
        let n = f.born.len().max(1) as f64;
        let mut acc = TemplateFunctionReport {
            name: f.name.clone(),
            sandboxes: f.born.len() as u64,
            pages: 0,
            template_pages: *template_pages,
            zero: 0,
            exact: 0,
            patched: 0,
            standalone: 0,
            positional_pct: 0.0,
            image_mb: 0.0,
            stored_mb: 0.0,
            savings_pct: 0.0,
            savings_plain_pct: 0.0,
            avg_patch_bytes: 0.0,
            dedup_ms: 0.0,
            rebuild_ms: 0.0,
            rebuild_gb_per_s: 0.0,
            rebuild_best_gb_per_s: 0.0,
            rebuild_cpu_gb_per_s_2_cores: 0.0,
            memcpy_gb_per_s: 0.0,
            rebuild_vs_memcpy: 0.0,
            verified: true,
        };
        let (mut dedup_ms, mut rebuild_ms, mut best_ms, mut cpu_ms, mut copy_ms) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut patch_bytes, mut patched) = (0u64, 0u64);
        for (i, path) in f.born.iter().enumerate() {
            let dump =
                DumpImage::open(path).with_context(|| format!("opening {}", path.display()))?;
            let image = dump.pages_bytes() as f64;
            let store_path = store_dir.join(format!("{}-{i}.medes", f.name));
            let hint = TemplateHint::new(id, layout, &dump);
            let t0 = Instant::now();
            let (store, stats) =
                medes_dedup::dedup_with_template(&dump, &registry, &bases, dcfg, &hint)?;
            let stored = store.write(&store_path)? as f64;
            dedup_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            let (plain, _) = medes_dedup::dedup(&dump, &registry, &bases, dcfg)?;
            let plain_path = store_dir.join(format!("{}-{i}.plain.medes", f.name));
            let plain_stored = plain.write(&plain_path)? as f64;
            let _ = std::fs::remove_file(&plain_path);
            drop((store, plain));
            let store = DedupStore::load(&store_path)?;
            let _ = std::fs::remove_file(&store_path);
            let mut out = vec![1u8; store.n_pages() as usize * PAGE];
            let mut times = Vec::new();
            let c0 = process_cpu_seconds();
            for _ in 0..rebuild_repeats.max(1) {
                let t = Instant::now();
                medes_dedup::rebuild_into(&store, &bases, &mut out)
                    .with_context(|| format!("rebuilding {}", path.display()))?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            cpu_ms.push((process_cpu_seconds() - c0) * 1e3 / rebuild_repeats.max(1) as f64);
            let mut copy = vec![2u8; out.len()];
            let mut ct = Vec::new();
            for _ in 0..rebuild_repeats.max(1) {
                ct.push(copy_2_threads(&out, &mut copy));
            }
            copy_ms.push(median(&mut ct));
            best_ms.push(times.iter().copied().fold(f64::MAX, f64::min));
            rebuild_ms.push(median(&mut times));
            for p in 0..dump.n_pages() {
                let o = p as usize * PAGE;
                if dump.page(p).map(|x| &x[..]) != Some(&out[o..o + PAGE]) {
                    acc.verified = false;
                    anyhow::bail!("{}: rebuilt page {p} differs from the dump", path.display());
                }
            }
            acc.pages += dump.n_pages();
            acc.zero += stats.zero;
            acc.exact += stats.exact;
            acc.patched += stats.patched;
            acc.standalone += stats.standalone;
            acc.positional_pct += 100.0 * hint.hits() as f64 / dump.n_pages().max(1) as f64;
            acc.image_mb += image / MB;
            acc.stored_mb += stored / MB;
            acc.savings_pct += 100.0 * (1.0 - stored / image.max(1.0));
            acc.savings_plain_pct += 100.0 * (1.0 - plain_stored / image.max(1.0));
            patch_bytes += stats.patch_bytes;
            patched += stats.patched;
        }
        let per = |x: u64| (x as f64 / n).round() as u64;
        acc.pages = per(acc.pages);
        acc.zero = per(acc.zero);
        acc.exact = per(acc.exact);
        acc.patched = per(acc.patched);
        acc.standalone = per(acc.standalone);
        acc.positional_pct /= n;
        acc.image_mb /= n;
        acc.stored_mb /= n;
        acc.savings_pct /= n;
        acc.savings_plain_pct /= n;
        acc.avg_patch_bytes = patch_bytes as f64 / patched.max(1) as f64;
        acc.dedup_ms = median(&mut dedup_ms);
        acc.rebuild_ms = median(&mut rebuild_ms);
        let bytes = acc.image_mb * MB;
        let gbps = |ms: f64| {
            if ms > 0.0 {
                bytes / (ms / 1e3) / 1e9
            } else {
                0.0
            }
        };
        acc.rebuild_gb_per_s = gbps(acc.rebuild_ms);
        acc.rebuild_best_gb_per_s = gbps(median(&mut best_ms));
        acc.rebuild_cpu_gb_per_s_2_cores = gbps(median(&mut cpu_ms) / 2.0);
        acc.memcpy_gb_per_s = gbps(median(&mut copy_ms));
        acc.rebuild_vs_memcpy = if acc.memcpy_gb_per_s > 0.0 {
            acc.rebuild_gb_per_s / acc.memcpy_gb_per_s
        } else {
            0.0
        };
        all_bytes += bytes;
        all_ms += acc.rebuild_ms;
        functions.push(acc);
    }
    let m = functions.len().max(1) as f64;
    Ok(TemplateReport {
        aslr: true,
        mean_savings_pct: functions.iter().map(|f| f.savings_pct).sum::<f64>() / m,
        mean_savings_plain_pct: functions.iter().map(|f| f.savings_plain_pct).sum::<f64>() / m,
        min_rebuild_gb_per_s: functions
            .iter()
            .map(|f| f.rebuild_gb_per_s)
            .fold(f64::MAX, f64::min),
        overall_rebuild_gb_per_s: if all_ms > 0.0 {
            all_bytes / (all_ms / 1e3) / 1e9
        } else {
            0.0
        },
        functions,
    })
}

/// Prints the report as a table.
pub fn print_table(r: &TemplateReport, took: Duration) {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "function",
        "pages",
        "zero",
        "exact",
        "patched",
        "alone",
        "at own address %",
        "image MB",
        "stored MB",
        "savings %",
        "savings % w/o prediction",
        "avg patch B",
        "dedup ms",
        "rebuild ms",
        "rebuild GB/s",
        "best GB/s",
        "CPU GB/s (2 cores)",
        "memcpy GB/s",
    ]);
    for f in &r.functions {
        t.add_row([
            f.name.clone(),
            f.pages.to_string(),
            f.zero.to_string(),
            f.exact.to_string(),
            f.patched.to_string(),
            f.standalone.to_string(),
            format!("{:.1}", f.positional_pct),
            format!("{:.1}", f.image_mb),
            format!("{:.3}", f.stored_mb),
            format!("{:.2}", f.savings_pct),
            format!("{:.2}", f.savings_plain_pct),
            format!("{:.0}", f.avg_patch_bytes),
            format!("{:.1}", f.dedup_ms),
            format!("{:.1}", f.rebuild_ms),
            format!("{:.2}", f.rebuild_gb_per_s),
            format!("{:.2}", f.rebuild_best_gb_per_s),
            format!("{:.2}", f.rebuild_cpu_gb_per_s_2_cores),
            format!("{:.2}", f.memcpy_gb_per_s),
        ]);
    }
    println!("{t}");
    println!(
        "template-born sandboxes, ASLR on; mean savings {:.2}% ({:.2}% without the positional \
         prediction); rebuild {:.2} GB/s overall, slowest function {:.2} GB/s; {:.1} s",
        r.mean_savings_pct,
        r.mean_savings_plain_pct,
        r.overall_rebuild_gb_per_s,
        r.min_rebuild_gb_per_s,
        took.as_secs_f64()
    );
}
