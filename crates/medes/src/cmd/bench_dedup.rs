//! `medes bench dedup`: the dedup engine on real sandboxes of the ten suite functions.
//!
//! For each function, independent sandboxes are cold-started (not restored from one snapshot),
//! warmed with one invocation of the default input and checkpointed by CRIU onto tmpfs. The first
//! sandbox of each function is its base; the registry holds the bases of all functions (cross-
//! function matches allowed); the others are deduplicated, stored, reloaded and rebuilt, and every
//! rebuilt page is compared with the original.
//!
//! With `--template` (issue 8) the sandboxes are born from one template per function and
//! deduplicated against it: see `bench_dedup/template.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medes_core::{Bytes, SandboxId};
use medes_sandbox::{CheckpointMode, InitRequest, RunRequest, Sandbox, SandboxConfig, SandboxSpec};
use medes_workload::Manifest;

use crate::platform::init_tracing;

mod template;

/// Arguments of `medes bench dedup`.
#[derive(clap::Args)]
pub struct DedupArgs {
    /// Print the report as JSON (the output contract) instead of a table.
    #[arg(long)]
    json: bool,
    /// Launch sandboxes with ASLR off (personality flag), like the paper's headline runs.
    #[arg(long)]
    no_aslr: bool,
    /// Deduplicated sandboxes per function (besides the base).
    #[arg(long, default_value_t = 2)]
    per_function: usize,
    /// Only these functions (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Turn pointer rebasing off (to show what it is worth).
    #[arg(long)]
    no_rebase: bool,
    /// Turn the LZ patches (copies from a window of base pages) off: sparse byte-run diffs
    /// only (to show what alignment-tolerant patches are worth).
    #[arg(long)]
    no_lz: bool,
    /// Turn sequential base-page prediction off (every page fingerprinted and looked up).
    #[arg(long)]
    no_predict: bool,
    /// Window radius of the LZ patches in base pages (0: the base page only).
    #[arg(long)]
    window: Option<u64>,
    /// Also try zstd patches with the window as dictionary (slower to encode and decode).
    #[arg(long)]
    zstd_patches: bool,
    /// Position candidates (the base page at the same mapping and offset).
    #[arg(long)]
    positional: bool,
    /// Fingerprint chunks per page (the paper's K is 5; default: the engine's).
    #[arg(long)]
    chunks: Option<usize>,
    /// zstd level of the store's blocks (patches and pages without a base).
    #[arg(long)]
    block_level: Option<i32>,
    /// Reuse the dumps of an earlier run (`--keep`) instead of starting sandboxes: the
    /// directory holding `<function>-<i>` dumps.
    #[arg(long)]
    dumps: Option<PathBuf>,
    /// The workload suite's directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../functions"))]
    functions_dir: PathBuf,
    /// Where dumps go (tmpfs, like the platform's images).
    #[arg(long, default_value = "/dev/shm")]
    scratch: PathBuf,
    /// Keep the dumps after the run (their directory is printed).
    #[arg(long)]
    keep: bool,
    /// Template-born sandboxes (issue 8): per function one template (cold start, warm-up
    /// run, checkpoint left running) and `--per-function` sandboxes restored from it, each
    /// deduplicated against its template with the positional prediction. With `--dumps`:
    /// `<function>-t` (the template) and `<function>-<i>` dumps.
    #[arg(long)]
    template: bool,
    /// Rebuilds per sandbox timed (`--template`; the median and the best are reported).
    #[arg(long, default_value_t = 5)]
    rebuild_repeats: usize,
}

/// Runs `medes bench dedup`.
pub fn run(args: DedupArgs) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let manifest = Manifest::load(&args.functions_dir)
        .with_context(|| format!("loading {}", args.functions_dir.display()))?;
    let mut names = manifest.names();
    if !args.only.is_empty() {
        names.retain(|n| args.only.contains(n));
    }
    anyhow::ensure!(!names.is_empty(), "no function selected");
    let work = tempfile::Builder::new()
        .prefix("medes-bench-dedup-")
        .tempdir_in(&args.scratch)
        .with_context(|| format!("creating a scratch directory in {}", args.scratch.display()))?;
    let per = args.per_function.max(1);
    if args.template {
        return run_template(&args, &manifest, &names, work, per);
    }
    let bar = ProgressBar::new((names.len() * (per + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} dumps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    if let Some(dir) = &args.dumps {
        for name in &names {
            for i in 0..=per {
                let d = dir.join(format!("{name}-{i}"));
                anyhow::ensure!(d.is_dir(), "no dump {}", d.display());
                if i == 0 {
                    bases.push((name.clone(), d));
                } else {
                    targets.push((name.clone(), d));
                }
            }
        }
    } else {
        let (tag, sb_cfg, _parent) = bench_sandboxes("bd", !args.no_aslr)?;
        let rt = tokio::runtime::Runtime::new()?;
        for name in &names {
            bar.set_prefix(name.clone());
            let spec = &manifest.functions[name];
            let code = copy_code(
                &args
                    .functions_dir
                    .join(spec.file.as_deref().unwrap_or(name)),
                work.path(),
                name,
            )?;
            for i in 0..=per {
                let dir = work.path().join(format!("{name}-{i}"));
                let id = SandboxId(format!("{tag}-{name}-{i}"));
                let limit = Bytes::mib(spec.memory_mb.max(256) * 2);
                rt.block_on(dump_one(
                    &sb_cfg,
                    id,
                    &code,
                    limit,
                    &spec.params,
                    spec.timeout_ms,
                    &dir,
                ))
                .with_context(|| format!("dumping a warm {name} sandbox"))?;
                if i == 0 {
                    bases.push((name.clone(), dir));
                } else {
                    targets.push((name.clone(), dir));
                }
                bar.inc(1);
            }
        }
    }
    bar.set_prefix("dedup");
    bar.set_message("fingerprint, lookup, encode, store, rebuild, verify");
    let mut dcfg = medes_dedup::DedupConfig::default();
    dcfg.rebase = !args.no_rebase;
    dcfg.positional = args.positional;
    dcfg.codec.lz = !args.no_lz;
    dcfg.codec.zstd_ref = args.zstd_patches;
    if args.no_predict {
        dcfg.predict_below = 0;
    }
    if let Some(w) = args.window {
        dcfg.codec.window_radius = w;
    }
    if let Some(k) = args.chunks {
        dcfg.fingerprint.k = k;
    }
    if let Some(l) = args.block_level {
        dcfg.block_level = l;
    }
    let cfg = medes_dedup::eval::EvalConfig {
        dedup: dcfg,
        aslr: !args.no_aslr,
        store_dir: work.path().join("stores"),
        materialize_bases: true,
        rebuild_cpu_repeats: 3,
    };
    std::fs::create_dir_all(&cfg.store_dir)?;
    let t = Instant::now();
    let report = medes_dedup::evaluate(&bases, &targets, &cfg).context("evaluating dedup")?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, t.elapsed());
    }
    if args.keep {
        let kept = work.keep();
        eprintln!("dumps kept in {}", kept.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `medes bench dedup --template` (see `bench_dedup/template.rs`).
fn run_template(
    args: &DedupArgs,
    manifest: &Manifest,
    names: &[String],
    work: tempfile::TempDir,
    per: usize,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !args.no_aslr,
        "--template measures ASLR on (born sandboxes share the template's layout)"
    );
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} templates {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut families = Vec::new();
    if let Some(dir) = &args.dumps {
        for name in names {
            let t = dir.join(format!("{name}-t"));
            anyhow::ensure!(t.is_dir(), "no template dump {}", t.display());
            let born: Vec<PathBuf> = (1..=per).map(|i| dir.join(format!("{name}-{i}"))).collect();
            for b in &born {
                anyhow::ensure!(b.is_dir(), "no dump {}", b.display());
            }
            families.push(template::Family {
                name: name.clone(),
                template: t,
                born,
            });
        }
    } else {
        let (tag, sb_cfg, _parent) = bench_sandboxes("bt", true)?;
        let rt = tokio::runtime::Runtime::new()?;
        for name in names {
            bar.set_prefix(name.clone());
            let spec = &manifest.functions[name];
            let code = copy_code(
                &args
                    .functions_dir
                    .join(spec.file.as_deref().unwrap_or(name)),
                work.path(),
                name,
            )?;
            let limit = Bytes::mib(spec.memory_mb.max(256) * 2);
            let fam = rt
                .block_on(template::make_family(
                    &sb_cfg,
                    &tag,
                    name,
                    &code,
                    limit,
                    &spec.params,
                    spec.timeout_ms,
                    per,
                    work.path(),
                ))
                .with_context(|| format!("making {name}'s template and born sandboxes"))?;
            families.push(fam);
            bar.inc(1);
        }
    }
    bar.set_prefix("dedup");
    bar.set_message("against the templates: dedup, store, rebuild, verify");
    let store_dir = work.path().join("stores");
    std::fs::create_dir_all(&store_dir)?;
    let t = Instant::now();
    let mut dcfg = medes_dedup::DedupConfig::default();
    dcfg.rebase = !args.no_rebase;
    let report = template::evaluate(&families, &dcfg, &store_dir, args.rebuild_repeats)
        .context("evaluating dedup against the templates")?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        template::print_table(&report, t.elapsed());
    }
    if args.keep {
        let kept = work.keep();
        eprintln!("dumps kept in {}", kept.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn dump_one(
    cfg: &SandboxConfig,
    id: SandboxId,
    code: &Path,
    limit: Bytes,
    params: &serde_json::Map<String, serde_json::Value>,
    timeout_ms: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    let spec = SandboxSpec {
        id,
        code_dir: code.to_path_buf(),
        memory_limit: limit,
        env: BTreeMap::new(),
    };
    let sb = Sandbox::start(cfg, spec).await?;
    let result = async {
        let init = sb
            .init(InitRequest {
                main: "main".into(),
            })
            .await?;
        anyhow::ensure!(init.ok, "init failed: {:?}", init.error);
        let run = sb
            .run(RunRequest {
                value: params.clone(),
                env: BTreeMap::new(),
                timeout: Duration::from_millis(timeout_ms),
            })
            .await?;
        anyhow::ensure!(run.error.is_none(), "run failed: {:?}", run.error);
        sb.checkpoint(dir, CheckpointMode::Stop).await?;
        Ok(())
    }
    .await;
    let destroyed = sb.destroy().await;
    result?;
    destroyed?;
    Ok(())
}

/// Copies a function's directory to a place the sandbox user can read.
fn copy_code(src: &Path, work: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dst = work.join("code").join(name);
    copy_dir(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(dst)
}

fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst)?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "__pycache__" {
                copy_dir(&entry.path(), &to)?;
            }
        } else {
            std::fs::copy(entry.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    // The scratch directory itself must be traversable by the sandbox user.
    if let Some(p) = dst.parent() {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        if let Some(pp) = p.parent() {
            std::fs::set_permissions(pp, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// Removes a bench run's parent cgroup when the run ends (its sandboxes are gone by then).
struct ParentCgroup(SandboxConfig);

impl Drop for ParentCgroup {
    fn drop(&mut self) {
        medes_sandbox::remove_cgroup_parent(&self.0);
    }
}

/// The sandboxes of a bench run: a tag of `prefix` and this process's id (their cgroup and run
/// directory), isolated network, ASLR as asked; checks the machine can run them and makes this
/// process their subreaper; the guard removes their parent cgroup at the end.
fn bench_sandboxes(
    prefix: &str,
    aslr: bool,
) -> anyhow::Result<(String, SandboxConfig, ParentCgroup)> {
    let mut sb_cfg = SandboxConfig::default();
    let tag = format!("{prefix}{}", std::process::id());
    sb_cfg.cgroup_name = format!("medes-{tag}");
    sb_cfg.run_dir = format!("/run/medes/{tag}").into();
    sb_cfg.network = medes_sandbox::NetworkMode::Isolated;
    set_aslr(&mut sb_cfg, aslr)?;
    medes_sandbox::preflight(&sb_cfg).context("this machine cannot run sandboxes")?;
    medes_sandbox::become_subreaper()?;
    let parent = ParentCgroup(sb_cfg.clone());
    Ok((tag, sb_cfg, parent))
}

fn set_aslr(cfg: &mut SandboxConfig, on: bool) -> anyhow::Result<()> {
    // Applied in the sandbox's child before exec (personality ADDR_NO_RANDOMIZE). Python's hash
    // seed stays random: the runtime runs `python3 -I`, which ignores PYTHONHASHSEED.
    cfg.aslr = on;
    Ok(())
}

/// The Medes paper's Table 3 (memory savings per function, ASLR off).
fn paper_savings(name: &str) -> Option<f64> {
    Some(match name {
        "vanilla" => 27.0,
        "linalg" => 33.0,
        "imagepro" => 43.0,
        "videopro" => 25.0,
        "mapreduce" => 16.0,
        "htmlserve" => 44.0,
        "authenc" => 21.0,
        "featuregen" => 39.0,
        "modelserve" => 58.0,
        "modeltrain" => 30.0,
        _ => return None,
    })
}

fn print_table(r: &medes_dedup::DedupReport, took: Duration) {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "function",
        "pages",
        "zero",
        "exact",
        "patched",
        "alone",
        "image MB",
        "stored MB",
        "savings %",
        "paper % (ASLR off)",
        "savings % if no-base pages raw",
        "avg patch B",
        "cross-fn %",
        "fp µs/pg",
        "fp GB/s/core",
        "lookup µs/pg",
        "looked up %",
        "dedup ms",
        "rebuild ms",
        "rebuild GB/s",
    ]);
    for f in &r.functions {
        t.add_row([
            f.name.clone(),
            f.pages.to_string(),
            f.zero.to_string(),
            f.exact.to_string(),
            f.patched.to_string(),
            f.standalone.to_string(),
            format!("{:.1}", f.image_mb),
            format!("{:.2}", f.stored_mb),
            format!("{:.1}", f.savings_pct),
            paper_savings(&f.name).map_or("-".into(), |p| format!("{p:.0}")),
            format!("{:.1}", f.savings_raw_standalone_pct),
            format!("{:.0}", f.avg_patch_bytes),
            format!("{:.1}", f.cross_function_base_pct),
            format!("{:.2}", f.fingerprint_us_per_page),
            format!("{:.2}", f.fingerprint_gb_per_s_per_core),
            format!("{:.2}", f.lookup_us_per_page),
            format!("{:.0}", f.looked_up_pct),
            format!("{:.1}", f.dedup_ms),
            format!("{:.1}", f.rebuild_ms),
            format!("{:.2}", f.rebuild_gb_per_s),
        ]);
    }
    println!("{t}");
    println!(
        "ASLR {}; mean savings {:.1}% (unweighted over functions); evaluated in {:.1} s",
        if r.aslr { "on" } else { "off" },
        r.mean_savings_pct,
        took.as_secs_f64()
    );
}
