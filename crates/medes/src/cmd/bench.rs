//! `medes bench`: whole-system benchmarks that print numbers (never timed assertions).
//!
//! `startup` measures cold and warm starts as a client sees them, the platform's own overhead on
//! a warm invocation (client latency minus the time inside `main`) and the no-op throughput with
//! concurrent clients. Times in ms, sizes in MB (10^6 bytes), rates per second.
//!
//! With its own platform instance (not `--url`) it also measures **dedup starts** (issue 5)
//! through the real platform: a fresh action version gets a base (first sandbox, forced idle
//! decision) and a target sandbox; the target cycles forced dedup (`force_decisions` +
//! `wait_settled`; after the first checkpoint the store is reused) → invocation, which must be a
//! dedup start. The own instance runs with `bases_serve = false` (an idle base would otherwise
//! take the request) and a long idle period (no background checkpoints while measuring). The
//! floor is a plain CRIU restore of another sandbox of the same action version from its full
//! image on tmpfs (`/dev/shm`), interleaved with the dedup starts so both see the same load.
//!
//! Armed dedup starts (`[agent] armed_per_function`, on by default): after each forced dedup
//! the bench waits until the agent armed the target (restored it ahead of its request, left
//! stopped: the platform's steady state for an idle dedup sandbox) before the timed start,
//! and reports whether the starts were armed (`dedup_armed`) and what the armed sandbox held
//! (`armed_extra_mb`, part of `dedup_mb`; `dedup_unarmed_mb` is the store alone).
//! `--no-armed` measures the unarmed path instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medes_workload::client::{ExecSpec, LimitsSpec};
use medes_workload::{ActionSpec, Client, ClientConfig, Invoked, Manifest};
use serde::Serialize;
use serde_json::{Map, Value};

use medes_controller::Controller;
use medes_core::{ActionName, SandboxId};
use medes_sandbox::{CheckpointMode, InitRequest, RunRequest, Sandbox, SandboxConfig, SandboxSpec};

use crate::config::MedesConfig;
use crate::platform::{Platform, init_tracing};

/// Arguments of `medes bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Bench,
}

#[derive(clap::Subcommand)]
enum Bench {
    /// Cold/warm start latency per function, warm overhead and no-op throughput.
    Startup(StartupArgs),
    /// The dedup engine on real checkpoints of the suite's sandboxes (savings, speeds).
    Dedup(super::bench_dedup::DedupArgs),
    /// Sandboxes of every suite function cycling warm → dedup → restored for minutes.
    Cycle(super::bench_cycle::CycleArgs),
    /// Cluster figures (issue 7): remote base reads, remote dedup starts, scheduling and
    /// registry lookup rates (own namespaced hosts).
    Cluster(super::bench_cluster::ClusterArgs),
}

/// Arguments of `medes bench startup`.
#[derive(clap::Args)]
pub struct StartupArgs {
    /// Print one JSON object (the output contract) instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure a running platform instead of starting an own instance.
    #[arg(long)]
    url: Option<String>,
    /// Credentials for --url (`uuid:key`); default: the key in --data-dir.
    #[arg(long, env = "MEDES_AUTH")]
    auth: Option<String>,
    /// Data directory of the own instance (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Runs per function and start kind (≥ 10 for meaningful p99).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Which functions: `builtin` (noop, hello), `suite` (the ten of functions/), or `all`.
    #[arg(long, default_value = "all")]
    functions: String,
    /// Only these functions (comma-separated names), after --functions.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The workload suite's directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../functions"))]
    functions_dir: PathBuf,
    /// Concurrent clients of the no-op throughput run.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of the no-op throughput run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Skip the dedup starts, the plain CRIU restores and the memory figures (they need the
    /// own instance; with --url they are always skipped and reported as null).
    #[arg(long)]
    no_dedup: bool,
    /// Also measure template starts (issue 8; own instance only): the instance runs with
    /// `template_starts = true`, the other measurements opt their actions out
    /// (`medes-template-starts: false`); see `measure_template`.
    #[arg(long)]
    template: bool,
    /// Dedup starts without armed sandboxes (`[agent] armed_per_function = 0`): the unarmed
    /// lazy start, for an A/B against the default.
    #[arg(long)]
    no_armed: bool,
    /// Lazy dedup starts restore the pages written in private file mappings eagerly, as CRIU
    /// does (`[agent] lazy_file_pages = false`), for an A/B against the default.
    #[arg(long)]
    no_lazy_file_pages: bool,
}

/// Medians of the dedup start's steps, ms.
#[derive(Debug, Clone, Copy, Serialize)]
struct Breakdown {
    /// Load and verify the store, check the bases, write the non-page images (critical path).
    read_base: f64,
    /// Rebuild the page images from the store and the base pages (overlaps CRIU's start).
    rebuild: f64,
    /// From the pages being complete until the restored runtime answered.
    restore: f64,
    /// From the restored runtime to the response at the client (the run, the platform, HTTP).
    first_response: f64,
}

/// One function's figures (output contract of issue 2, extended by later issues).
#[derive(Debug, Serialize)]
struct FunctionRow {
    name: String,
    cold_ms_p50: f64,
    cold_ms_p99: f64,
    warm_ms_p50: f64,
    warm_ms_p99: f64,
    init_ms_p50: f64,
    main_ms_p50: f64,
    /// Client-seen dedup start (whole invocation), p50 / p99, ms; null when not measured.
    dedup_ms_p50: Option<f64>,
    dedup_ms_p99: Option<f64>,
    /// The agent's `Restore` command (store → restored runtime answering), p50, ms.
    dedup_agent_ms_p50: Option<f64>,
    /// Time inside `main` of the dedup-start invocations, p50, ms (dedup start without the run
    /// = `dedup_ms_p50` − this).
    dedup_main_ms_p50: Option<f64>,
    /// m_R: memory a dedup start held transiently (rebuilt images on tmpfs + CRIU), p50, MB.
    restore_transient_mb_p50: Option<f64>,
    /// Plain CRIU restore (until the runtime answered) from the full image on tmpfs: the floor.
    criu_restore_ms_p50: Option<f64>,
    /// Plain CRIU restore and its first run, p50, ms.
    criu_restore_run_ms_p50: Option<f64>,
    /// Page image of the sandbox (full checkpoint), MB.
    page_image_mb: Option<f64>,
    /// PSS of the warm sandbox, MB.
    warm_mb: Option<f64>,
    /// The warm sandbox's memory cgroup charge (its pages and its kernel memory), MB: the
    /// cross-check of `warm_mb`, and the warm side of `dedup_mb` when an armed tree's kernel
    /// memory is counted.
    warm_cgroup_mb: Option<f64>,
    /// Everything held for the dedup sandbox (store, non-page images, metadata), base
    /// excluded, MB.
    dedup_mb: Option<f64>,
    dedup_breakdown_ms: Option<Breakdown>,
    /// Whether every measured dedup start resumed an armed sandbox (`[agent]
    /// armed_per_function`; false with --no-armed).
    dedup_armed: Option<bool>,
    /// How many of the measured dedup starts were armed.
    dedup_armed_starts: Option<usize>,
    /// The dedup sandbox's store alone (what `dedup_mb` is without an armed sandbox), MB.
    dedup_unarmed_mb: Option<f64>,
    /// What the armed sandbox held besides the store file (its stopped tree's cgroup usage,
    /// kernel memory included; the store's metadata in memory; page buffers), MB; part of
    /// `dedup_mb` when the starts were armed.
    armed_extra_mb: Option<f64>,
    /// The armed stopped tree's PSS, MB (what its cgroup usage is without kernel memory).
    armed_tree_pss_mb: Option<f64>,
    /// What the agent holds of the store in memory for the armed sandbox (its metadata; the
    /// page data is read from the store file), MB; part of `armed_extra_mb`.
    armed_store_meta_mb: Option<f64>,
    /// `dedup_mb` with the armed tree counted by its PSS, the measure of `warm_mb` (which
    /// counts no kernel memory either), MB; equal to `dedup_mb` when not armed.
    dedup_pss_mb: Option<f64>,
    /// Why the dedup figures are missing (the other functions are still measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    dedup_error: Option<String>,
    /// Template starts (issue 8, `--template`): client-seen, p50 / p99, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    template_ms_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    template_ms_p99: Option<f64>,
    /// Time inside `main` of the template-start invocations, p50, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    template_main_ms_p50: Option<f64>,
    /// Plain CRIU restore of the full image and its first run, interleaved with the template
    /// starts (same load), p50, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    template_floor_run_ms_p50: Option<f64>,
    /// Why the template figures are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    template_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct StartupReport {
    warm_overhead_ms_p50: f64,
    warm_overhead_ms_p99: f64,
    noop_invocations_per_s: f64,
    noop_clients: usize,
    runs: usize,
    functions: Vec<FunctionRow>,
}

/// Runs `medes bench`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        Bench::Startup(a) => startup(a),
        Bench::Dedup(a) => super::bench_dedup::run(a),
        Bench::Cycle(a) => super::bench_cycle::run(a),
        Bench::Cluster(a) => super::bench_cluster::run(a),
    }
}

/// The configuration of a benchmark's own platform instance: an ephemeral API port, a cgroup and
/// run directory of its own (so it never meets a running `medes serve`), and `data_dir` or a
/// fresh temporary directory (returned: it lives as long as the caller keeps it).
pub(crate) fn own_instance_config(
    tag: &str,
    data_dir: Option<&std::path::Path>,
) -> anyhow::Result<(MedesConfig, tempfile::TempDir)> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("medes-{tag}-"))
        .tempdir()?;
    let mut cfg = MedesConfig::default();
    cfg.data_dir = data_dir.map_or_else(|| tmp.path().to_path_buf(), |d| d.to_path_buf());
    cfg.api.listen = "127.0.0.1:0".parse()?;
    let tag = format!("{tag}-{}", std::process::id());
    cfg.agent.sandbox.cgroup_name = format!("medes-{tag}");
    cfg.agent.sandbox.run_dir = format!("/run/medes/{tag}").into();
    Ok((cfg, tmp))
}

fn startup(args: StartupArgs) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (platform, _tmp) = match &args.url {
            Some(_) => (None, None),
            None => {
                let (mut cfg, tmp) = own_instance_config("bench", args.data_dir.as_deref())?;
                // Dedup starts on demand only: idle bases do not take requests, and no idle
                // decision (background checkpoint) happens on its own while measuring.
                cfg.controller.bases_serve = false;
                cfg.controller.keep_alive_s = 7_200;
                cfg.controller.idle_period_s = 3_600;
                cfg.controller.template_starts = args.template;
                if args.no_armed {
                    cfg.agent.armed_per_function = 0;
                }
                if args.no_lazy_file_pages {
                    cfg.agent.lazy_file_pages = false;
                }
                cfg.finish();
                let sandbox = cfg.agent.sandbox.clone();
                let p = Platform::start(cfg).await?;
                (Some((p, sandbox)), Some(tmp))
            }
        };
        let ctx = match &platform {
            Some((p, sandbox)) if !args.no_dedup => Some(DedupCtx {
                controller: p.controller.clone(),
                sandbox: sandbox.clone(),
                data_dir: p.data_dir.clone(),
                agent: Some(p.agent().clone()),
            }),
            _ => None,
        };
        let tctx = match &platform {
            Some((p, sandbox)) if args.template => Some(DedupCtx {
                controller: p.controller.clone(),
                sandbox: sandbox.clone(),
                data_dir: p.data_dir.clone(),
                agent: None,
            }),
            _ => None,
        };
        let (url, auth) = match (&platform, &args.url) {
            (Some((p, _)), _) => (p.url.clone(), p.auth.clone()),
            (None, Some(u)) => {
                let auth = match &args.auth {
                    Some(a) => a.clone(),
                    None => crate::platform::read_auth_file(
                        args.data_dir
                            .as_deref()
                            .unwrap_or("/var/lib/medes".as_ref()),
                    )?,
                };
                (u.clone(), auth)
            }
            (None, None) => unreachable!("either an own platform or --url"),
        };
        let client = Client::new(&ClientConfig::new(url, auth))?;
        let report = measure(&client, &args, ctx.as_ref(), tctx.as_ref()).await;
        if let Some((p, _)) = platform {
            if args.data_dir.is_none() {
                // A throw-away data dir: its kept dedup stores and bases go with it.
                p.stop_and_purge().await?;
            } else {
                p.stop().await?;
            }
        }
        let report = report?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_table(&report);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A function to measure: its name, action body and default parameters.
struct Target {
    name: String,
    spec: ActionSpec,
    params: Map<String, Value>,
}

fn targets(args: &StartupArgs) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    let builtin = |name: &str, code: &str| Target {
        name: name.into(),
        spec: ActionSpec {
            exec: ExecSpec {
                kind: "python:3".into(),
                code: code.into(),
                binary: false,
                main: None,
            },
            limits: LimitsSpec {
                timeout: 30_000,
                memory: 128,
            },
            parameters: vec![],
            annotations: vec![],
        },
        params: Map::new(),
    };
    if matches!(args.functions.as_str(), "builtin" | "all") {
        out.push(builtin(
            "noop",
            include_str!("../../../../examples/noop.py"),
        ));
        out.push(builtin(
            "hello",
            include_str!("../../../../examples/hello.py"),
        ));
    }
    if matches!(args.functions.as_str(), "suite" | "all") {
        let manifest = Manifest::load(&args.functions_dir)
            .with_context(|| format!("loading {}", args.functions_dir.display()))?;
        for (name, spec) in &manifest.functions {
            let body = medes_workload::suite::action_spec(&args.functions_dir, name, spec)?;
            out.push(Target {
                name: name.clone(),
                spec: body,
                params: spec.params.clone(),
            });
        }
    }
    anyhow::ensure!(
        matches!(args.functions.as_str(), "builtin" | "suite" | "all"),
        "--functions must be builtin, suite or all"
    );
    if !args.only.is_empty() {
        out.retain(|t| args.only.contains(&t.name));
    }
    Ok(out)
}

/// One invocation: (client ms, record).
async fn invoke(
    client: &Client,
    name: &str,
    params: &Map<String, Value>,
) -> anyhow::Result<(f64, medes_workload::ActivationRecord)> {
    let t = Instant::now();
    let out = client.invoke(name, params, true).await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match out {
        Invoked::Completed { record, .. } => {
            anyhow::ensure!(
                record.succeeded(),
                "{name} failed: {}",
                record.response.result
            );
            Ok((ms, *record))
        }
        Invoked::Accepted { activation_id } => {
            anyhow::bail!(
                "{name}: activation {activation_id} did not finish within the blocking wait"
            )
        }
    }
}

fn main_ms(rec: &medes_workload::ActivationRecord) -> f64 {
    rec.annotation("mainTime")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

async fn measure(
    client: &Client,
    args: &StartupArgs,
    ctx: Option<&DedupCtx>,
    tctx: Option<&DedupCtx>,
) -> anyhow::Result<StartupReport> {
    let (targets, template_specs) = template_opt_out(targets(args)?, tctx.is_some());
    let runs = args.runs.max(1);
    let per = if ctx.is_some() { 3 } else { 2 } + usize::from(tctx.is_some());
    let bar = ProgressBar::new((targets.len() * runs * per) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    let mut rows = Vec::new();
    let mut overhead = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        bar.set_prefix(t.name.clone());
        let (mut cold, mut warm, mut init, mut main) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            // A new version retires the old sandboxes: the next call is a cold start.
            client
                .put_action(&t.name, &t.spec)
                .await
                .with_context(|| format!("deploying {}", t.name))?;
            let (ms, rec) = invoke(client, &t.name, &t.params).await?;
            anyhow::ensure!(
                rec.start_kind() == "cold",
                "{}: expected a cold start, got {}",
                t.name,
                rec.start_kind()
            );
            cold.push(ms);
            init.push(rec.init_time_ms().unwrap_or(0.0));
            bar.inc(1);
        }
        for _ in 0..runs {
            let (ms, rec) = invoke(client, &t.name, &t.params).await?;
            if rec.start_kind() == "warm" {
                warm.push(ms);
                main.push(main_ms(&rec));
                overhead.push(ms - main_ms(&rec));
            }
            bar.inc(1);
        }
        let mut dedup_error = None;
        let d = match ctx {
            Some(ctx) => match measure_dedup(ctx, client, t, runs, &bar).await {
                Ok(d) => Some(d),
                Err(e) => {
                    let msg = format!("{e:#}");
                    bar.suspend(|| eprintln!("{}: dedup starts not measured: {msg}", t.name));
                    dedup_error = Some(msg);
                    None
                }
            },
            None => None,
        };
        let (tpl, template_error) = match tctx {
            Some(tctx) => {
                match measure_template(tctx, client, t, &template_specs[ti], runs, &bar).await {
                    Ok(f) => (Some(f), None),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        bar.suspend(|| {
                            eprintln!("{}: template starts not measured: {msg}", t.name)
                        });
                        (None, Some(msg))
                    }
                }
            }
            None => (None, None),
        };
        let tp = |f: fn(&TemplateFigures) -> &Vec<f64>, p: f64| tpl.as_ref().map(|d| pct(f(d), p));
        let p50 = |f: fn(&DedupFigures) -> &Vec<f64>| d.as_ref().map(|d| pct(f(d), 50.0));
        rows.push(FunctionRow {
            name: t.name.clone(),
            cold_ms_p50: pct(&cold, 50.0),
            cold_ms_p99: pct(&cold, 99.0),
            warm_ms_p50: pct(&warm, 50.0),
            warm_ms_p99: pct(&warm, 99.0),
            init_ms_p50: pct(&init, 50.0),
            main_ms_p50: pct(&main, 50.0),
            dedup_ms_p50: p50(|d| &d.start),
            dedup_ms_p99: d.as_ref().map(|d| pct(&d.start, 99.0)),
            dedup_agent_ms_p50: p50(|d| &d.agent),
            dedup_main_ms_p50: p50(|d| &d.main),
            restore_transient_mb_p50: p50(|d| &d.transient_mb),
            criu_restore_ms_p50: p50(|d| &d.plain),
            criu_restore_run_ms_p50: p50(|d| &d.plain_run),
            page_image_mb: d.as_ref().map(|d| round3(d.page_image_mb)),
            warm_mb: d.as_ref().map(|d| round3(d.warm_mb)),
            warm_cgroup_mb: d.as_ref().and_then(|d| d.warm_cgroup_mb.map(round3)),
            dedup_mb: d.as_ref().map(|d| round3(d.dedup_mb)),
            dedup_breakdown_ms: d.as_ref().map(|d| Breakdown {
                read_base: pct(&d.read_base, 50.0),
                rebuild: pct(&d.rebuild, 50.0),
                restore: pct(&d.restore, 50.0),
                first_response: pct(&d.first_response, 50.0),
            }),
            dedup_armed: d
                .as_ref()
                .map(|d| !d.start.is_empty() && d.armed_starts == d.start.len()),
            dedup_armed_starts: d.as_ref().map(|d| d.armed_starts),
            dedup_unarmed_mb: d.as_ref().and_then(|d| d.dedup_unarmed_mb.map(round3)),
            armed_extra_mb: d.as_ref().and_then(|d| d.armed_extra_mb.map(round3)),
            armed_tree_pss_mb: d.as_ref().and_then(|d| d.armed_tree_pss_mb.map(round3)),
            armed_store_meta_mb: d.as_ref().and_then(|d| d.armed_store_meta_mb.map(round3)),
            dedup_pss_mb: d
                .as_ref()
                .map(|d| round3(d.dedup_pss_mb.unwrap_or(d.dedup_mb))),
            dedup_error,
            template_ms_p50: tp(|d| &d.start, 50.0),
            template_ms_p99: tp(|d| &d.start, 99.0),
            template_main_ms_p50: tp(|d| &d.main, 50.0),
            template_floor_run_ms_p50: tp(|d| &d.plain_run, 50.0),
            template_error,
        });
    }
    bar.finish_and_clear();
    // Many more warm samples of the no-op for the overhead percentiles.
    let noop_spec = ActionSpec {
        exec: ExecSpec {
            kind: "python:3".into(),
            code: include_str!("../../../../examples/noop.py").into(),
            binary: false,
            main: None,
        },
        limits: LimitsSpec {
            timeout: 30_000,
            memory: 128,
        },
        parameters: vec![],
        annotations: vec![],
    };
    client.put_action("bench-noop", &noop_spec).await?;
    invoke(client, "bench-noop", &Map::new()).await?;
    for _ in 0..(runs * 20).max(200) {
        let (ms, rec) = invoke(client, "bench-noop", &Map::new()).await?;
        if rec.start_kind() == "warm" {
            overhead.push(ms - main_ms(&rec));
        }
    }
    let rate = throughput(client, args.clients.max(1), args.seconds, !args.json).await?;
    Ok(StartupReport {
        warm_overhead_ms_p50: pct(&overhead, 50.0),
        warm_overhead_ms_p99: pct(&overhead, 99.0),
        noop_invocations_per_s: rate,
        noop_clients: args.clients,
        runs,
        functions: rows,
    })
}

/// What the dedup measurement needs from the own platform instance.
struct DedupCtx {
    controller: Arc<Controller>,
    sandbox: SandboxConfig,
    data_dir: PathBuf,
    /// The in-process agent (armed sandboxes, held bytes), for the dedup starts.
    agent: Option<medes_agent::Agent>,
}

/// Raw samples of one function's dedup starts and plain restores.
#[derive(Default)]
struct DedupFigures {
    start: Vec<f64>,
    agent: Vec<f64>,
    main: Vec<f64>,
    transient_mb: Vec<f64>,
    plain: Vec<f64>,
    plain_run: Vec<f64>,
    read_base: Vec<f64>,
    rebuild: Vec<f64>,
    restore: Vec<f64>,
    first_response: Vec<f64>,
    page_image_mb: f64,
    warm_mb: f64,
    warm_cgroup_mb: Option<f64>,
    dedup_mb: f64,
    armed_starts: usize,
    dedup_unarmed_mb: Option<f64>,
    armed_extra_mb: Option<f64>,
    armed_tree_pss_mb: Option<f64>,
    armed_store_meta_mb: Option<f64>,
    dedup_pss_mb: Option<f64>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The controller's view of the sandboxes of `name@version`.
fn sandboxes_of(ctl: &Controller, name: &str, version: &str) -> Vec<medes_controller::SandboxInfo> {
    ctl.sandboxes()
        .into_iter()
        .filter(|s| s.action.name == name && s.version == version)
        .collect()
}

/// Where the agent wrote the code of `action@version` (`<data_dir>/code/<ns>/<name>/<version>`).
fn code_dir(data_dir: &std::path::Path, action: &ActionName, version: &str) -> PathBuf {
    let mut p = data_dir.join("code").join(&action.namespace.0);
    for part in action.name.split('/') {
        p.push(part);
    }
    p.push(version);
    p
}

/// Base, target, then `runs` × (forced dedup → invocation that must be a dedup start →
/// plain CRIU restore of the full image).
async fn measure_dedup(
    ctx: &DedupCtx,
    client: &Client,
    t: &Target,
    runs: usize,
    bar: &ProgressBar,
) -> anyhow::Result<DedupFigures> {
    let ctl = &ctx.controller;
    // A fresh version: the sandboxes of the cold/warm runs retire.
    let version = deploy_version(client, &t.name, &t.spec).await?;
    let expect = |rec: &medes_workload::ActivationRecord, kind: &str| {
        anyhow::ensure!(
            rec.start_kind() == kind,
            "{}: expected a {kind} start, got {} ({:?})",
            t.name,
            rec.start_kind(),
            ctl.dedup_stats()
        );
        Ok(())
    };
    // The base: the first sandbox to reach a decision.
    let (_, rec) = invoke(client, &t.name, &t.params).await?;
    expect(&rec, "cold")?;
    let action = action_of(ctl, &t.name, &version)?;
    ctl.force_decisions(Some(&action)).await;
    ctl.wait_settled().await;
    anyhow::ensure!(
        sandboxes_of(ctl, &t.name, &version)
            .iter()
            .any(|s| s.state.as_str() == "base"),
        "{}: no base after the forced decision ({:?})",
        t.name,
        ctl.dedup_stats()
    );
    // The target: idle bases do not serve here, so this is a cold start; then one warm run.
    let (_, rec) = invoke(client, &t.name, &t.params).await?;
    expect(&rec, "cold")?;
    let (_, rec) = invoke(client, &t.name, &t.params).await?;
    expect(&rec, "warm")?;
    ctl.refresh_memory().await;
    let target = sandboxes_of(ctl, &t.name, &version)
        .into_iter()
        .find(|s| s.state.as_str() == "warm")
        .context("no warm target sandbox")?;
    let mut out = DedupFigures {
        warm_mb: target.measured.map_or(0.0, |b| b.0 as f64 / 1e6),
        ..Default::default()
    };
    if let Some(agent) = &ctx.agent {
        out.warm_cgroup_mb = status_of(agent, &target.id)
            .await
            .and_then(|s| s.memory)
            .map(|m| m.cgroup_usage.0 as f64 / 1e6);
    }
    let find = |id: &SandboxId| {
        ctl.sandboxes()
            .into_iter()
            .find(|s| &s.id == id)
            .with_context(|| format!("sandbox {id} is gone"))
    };

    // The floor's full image: another sandbox of the same action version.
    let code = code_dir(&ctx.data_dir, &action, &version);
    anyhow::ensure!(code.is_dir(), "no code directory {}", code.display());
    let floor = FloorDir::new("", &t.name);
    let plain_dir = &floor.dir;
    let plain = Plain::new(ctx, &code, &action, &version, &t.spec, &t.params);
    let r = async {
        out.page_image_mb = plain.checkpoint(plain_dir).await? as f64 / 1e6;
        for i in 0..runs {
            ctl.force_decisions(Some(&action)).await;
            ctl.wait_settled().await;
            let sb = find(&target.id)?;
            anyhow::ensure!(
                sb.state.as_str() == "dedup",
                "{}: the target is {} after the forced decision ({:?})",
                t.name,
                sb.state.as_str(),
                ctl.dedup_stats()
            );
            if i == 0 {
                out.dedup_mb = sb.stored.map_or(0.0, |b| b.0 as f64 / 1e6);
            }
            // The platform's steady state for an idle dedup sandbox: armed (when on).
            let armed_before = match &ctx.agent {
                Some(agent) => {
                    let armed = wait_armed(agent, &target.id).await;
                    if i == 0 {
                        let (held, extra) = held_of(agent, &target.id, armed.as_ref()).await;
                        out.dedup_mb = held as f64 / 1e6;
                        out.dedup_unarmed_mb = Some((held - extra) as f64 / 1e6);
                        out.armed_extra_mb = Some(extra as f64 / 1e6);
                        if let Some(a) = &armed {
                            let tree = a.cgroup_bytes.min(held);
                            out.armed_tree_pss_mb = Some(a.pss_bytes as f64 / 1e6);
                            out.armed_store_meta_mb = Some(a.store_meta_bytes as f64 / 1e6);
                            out.dedup_pss_mb = Some((held - tree + a.pss_bytes) as f64 / 1e6);
                        }
                    }
                    Some(agent.dedup_counters().armed_starts)
                }
                None => None,
            };
            let (ms, rec) = invoke(client, &t.name, &t.params).await?;
            expect(&rec, "dedup")?;
            if let (Some(agent), Some(n)) = (&ctx.agent, armed_before)
                && agent.dedup_counters().armed_starts > n
            {
                out.armed_starts += 1;
            }
            let r = find(&target.id)?
                .last_restore
                .context("no dedup start breakdown")?;
            out.start.push(ms);
            out.agent.push(r.total_ms);
            out.main.push(main_ms(&rec));
            out.transient_mb.push(r.transient_bytes as f64 / 1e6);
            out.read_base.push(r.read_base_ms);
            out.rebuild.push(r.rebuild_ms);
            out.restore.push(r.restore_ms);
            out.first_response.push(ms - r.total_ms);
            let (p, pr) = plain.restore(plain_dir, i).await?;
            out.plain.push(p);
            out.plain_run.push(pr);
            bar.inc(1);
        }
        Ok(())
    }
    .await;
    drop(floor);
    r?;
    // Retire this version's sandboxes (base and target).
    client.put_action(&t.name, &t.spec).await?;
    Ok(out)
}

/// Waits (bounded) until the agent armed dedup sandbox `id`, if arming is on; its status then.
async fn wait_armed(
    agent: &medes_agent::Agent,
    id: &SandboxId,
) -> Option<medes_agent::ArmedStatus> {
    let t = Instant::now();
    loop {
        let all = agent.armed();
        match all.iter().find(|a| &a.sandbox == id) {
            Some(a) if a.ready => return Some(a.clone()),
            Some(_) => {}
            // Nothing armed or arming for it: off, or its arm failed (it logged why).
            None if t.elapsed() > Duration::from_secs(2) => return None,
            None => {}
        }
        if t.elapsed() > Duration::from_secs(30) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The agent's held bytes of dedup sandbox `id` (store + armed extra) and the armed extra.
async fn held_of(
    agent: &medes_agent::Agent,
    id: &SandboxId,
    armed: Option<&medes_agent::ArmedStatus>,
) -> (u64, u64) {
    let held = status_of(agent, id).await.map_or(0, |s| s.held_bytes);
    let extra = armed.map_or(0, medes_agent::ArmedStatus::extra_bytes);
    (held, extra.min(held))
}

/// The agent's status of sandbox `id`, if it has it.
async fn status_of(
    agent: &medes_agent::Agent,
    id: &SandboxId,
) -> Option<medes_agent::SandboxStatus> {
    use medes_agent::NodeAgent;
    match agent.execute(medes_agent::Command::Status).await {
        Ok(medes_agent::Reply::Status(st)) => st.sandboxes.into_iter().find(|s| &s.id == id),
        _ => None,
    }
}

/// Deploys `spec` as a fresh version of `name` (the older version's sandboxes retire) and
/// returns that version.
async fn deploy_version(client: &Client, name: &str, spec: &ActionSpec) -> anyhow::Result<String> {
    let put = client
        .put_action(name, spec)
        .await
        .with_context(|| format!("deploying {name}"))?;
    Ok(put
        .get("version")
        .and_then(Value::as_str)
        .context("the stored action has no version")?
        .to_string())
}

/// The controller's name of the action behind `name@version` (it has a sandbox by now).
fn action_of(ctl: &Controller, name: &str, version: &str) -> anyhow::Result<ActionName> {
    sandboxes_of(ctl, name, version)
        .first()
        .map(|s| s.action.clone())
        .context("the cold-started sandbox is not in the controller's table")
}

/// The floor's scratch directory on tmpfs (`/dev/shm/medes-bench-<tag><pid>/<function>`),
/// removed with its parent when dropped.
struct FloorDir {
    root: PathBuf,
    dir: PathBuf,
}

impl FloorDir {
    fn new(tag: &str, function: &str) -> FloorDir {
        let root = PathBuf::from(format!("/dev/shm/medes-bench-{tag}{}", std::process::id()));
        let dir = root.join(function);
        FloorDir { root, dir }
    }
}

impl Drop for FloorDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Plain sandboxes of an action version, outside the platform, for the floor.
struct Plain<'a> {
    cfg: &'a SandboxConfig,
    code: &'a std::path::Path,
    action: &'a ActionName,
    version: &'a str,
    main: String,
    params: &'a Map<String, Value>,
    /// The action's memory limit, MiB.
    memory_mb: u64,
}

impl<'a> Plain<'a> {
    fn new(
        ctx: &'a DedupCtx,
        code: &'a std::path::Path,
        action: &'a ActionName,
        version: &'a str,
        spec: &ActionSpec,
        params: &'a Map<String, Value>,
    ) -> Plain<'a> {
        Plain {
            cfg: &ctx.sandbox,
            code,
            action,
            version,
            main: spec.exec.main.clone().unwrap_or_else(|| "main".into()),
            params,
            memory_mb: spec.limits.memory,
        }
    }

    fn spec(&self, n: &str) -> SandboxSpec {
        let env = [
            ("__OW_NAMESPACE", self.action.namespace.0.clone()),
            ("__OW_ACTION_NAME", self.action.to_string()),
            ("__OW_ACTION_VERSION", self.version.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        SandboxSpec {
            id: SandboxId(format!("bp{}-{n}", std::process::id())),
            code_dir: self.code.to_path_buf(),
            memory_limit: medes_core::Bytes::mib(self.memory_mb),
            env,
        }
    }

    fn req(&self) -> RunRequest {
        RunRequest {
            value: self.params.clone(),
            env: Default::default(),
            timeout: Duration::from_secs(120),
        }
    }

    /// A warm sandbox (after one run) checkpointed into `dir`; returns the page image bytes.
    async fn checkpoint(&self, dir: &std::path::Path) -> anyhow::Result<u64> {
        let sb = Sandbox::start(self.cfg, self.spec("orig")).await?;
        let r = async {
            let init = sb
                .init(InitRequest {
                    main: self.main.clone(),
                })
                .await?;
            anyhow::ensure!(init.ok, "init failed: {:?}", init.error);
            let run = sb.run(self.req()).await?;
            anyhow::ensure!(run.error.is_none(), "run failed: {:?}", run.error);
            let _ = std::fs::remove_dir_all(dir);
            Ok(sb.checkpoint(dir, CheckpointMode::LeaveRunning).await?)
        }
        .await;
        sb.destroy().await?;
        Ok(r?.page_image_bytes.0)
    }

    /// One plain restore from `dir` and its first run: (restore ms, restore + run ms).
    async fn restore(&self, dir: &std::path::Path, i: usize) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let copy = Sandbox::restore(self.cfg, self.spec(&i.to_string()), dir).await?;
        let restore = t0.elapsed().as_secs_f64() * 1e3;
        let run = copy.run(self.req()).await;
        let with_run = t0.elapsed().as_secs_f64() * 1e3;
        copy.destroy().await?;
        let run = run?;
        anyhow::ensure!(run.error.is_none(), "run failed: {:?}", run.error);
        Ok((restore, with_run))
    }
}

/// No-op invocations per second with `clients` closed-loop clients, after a warm-up that lets
/// the platform create one sandbox per client.
async fn throughput(
    client: &Client,
    clients: usize,
    seconds: f64,
    show: bool,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (c, stop, count, counting) = (
            client.clone(),
            stop.clone(),
            count.clone(),
            counting.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let p = Map::new();
            while !stop.load(Ordering::Relaxed) {
                let r = c.invoke("bench-noop", &p, true).await;
                if let Ok(Invoked::Completed { record, .. }) = r
                    && record.succeeded()
                    && counting.load(Ordering::Relaxed)
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    if show {
        eprintln!("throughput: {clients} clients, warming up 2 s, measuring {seconds:.0} s ...");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    counting.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let n = count.load(Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok(n as f64 / elapsed)
}

/// The `p`-th percentile (nearest rank) of `xs`; 0 for an empty set.
fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    let v = v[rank.clamp(1, v.len()) - 1];
    (v * 1000.0).round() / 1000.0
}

fn print_table(r: &StartupReport) {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "function",
        "cold p50",
        "cold p99",
        "init p50",
        "warm p50",
        "warm p99",
        "main p50",
        "dedup p50",
        "dedup p99",
        "criu p50",
        "read/rebuild/restore/first",
        "pages MB",
        "warm MB",
        "dedup MB",
        "armed MB",
    ]);
    let o = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
    for f in &r.functions {
        t.add_row([
            f.name.clone(),
            format!("{:.1}", f.cold_ms_p50),
            format!("{:.1}", f.cold_ms_p99),
            format!("{:.1}", f.init_ms_p50),
            format!("{:.2}", f.warm_ms_p50),
            format!("{:.2}", f.warm_ms_p99),
            format!("{:.2}", f.main_ms_p50),
            o(f.dedup_ms_p50, 1),
            o(f.dedup_ms_p99, 1),
            o(f.criu_restore_ms_p50, 1),
            f.dedup_breakdown_ms.map_or("-".to_string(), |b| {
                format!(
                    "{:.1}/{:.1}/{:.1}/{:.1}",
                    b.read_base, b.rebuild, b.restore, b.first_response
                )
            }),
            o(f.page_image_mb, 1),
            o(f.warm_mb, 1),
            o(f.dedup_mb, 2),
            match f.dedup_armed {
                Some(true) => o(f.armed_extra_mb, 2),
                Some(false) => "no".to_string(),
                None => "-".to_string(),
            },
        ]);
    }
    println!("{t}");
    let ratios: Vec<f64> = r
        .functions
        .iter()
        .filter_map(|f| Some(f.dedup_mb? / f.warm_mb?).filter(|x| x.is_finite()))
        .collect();
    let pss: Vec<f64> = r
        .functions
        .iter()
        .filter_map(|f| Some(f.dedup_pss_mb? / f.warm_mb?).filter(|x| x.is_finite()))
        .collect();
    let mean = |v: &[f64]| 100.0 * v.iter().sum::<f64>() / v.len() as f64;
    if !ratios.is_empty() {
        println!(
            "dedup ÷ warm memory (dedup MB ÷ warm MB): mean {:.1}% over {} functions; \
             with an armed tree counted by its PSS like the warm sandbox: {:.1}%",
            mean(&ratios),
            ratios.len(),
            mean(&pss)
        );
    }
    print_template_table(r);
    println!(
        "warm overhead: p50 {:.2} ms, p99 {:.2} ms; no-op throughput {:.0}/s with {} clients (times in ms)",
        r.warm_overhead_ms_p50, r.warm_overhead_ms_p99, r.noop_invocations_per_s, r.noop_clients
    );
}

// ---- template starts (issue 8) --------------------------------------------------------------

/// The opt-out annotation of template starts (see `medes_controller::OPT_OUT_ANNOTATION`).
fn opt_out_annotation() -> medes_workload::client::KeyValue {
    medes_workload::client::KeyValue {
        key: medes_controller::OPT_OUT_ANNOTATION.into(),
        value: Value::Bool(false),
    }
}

/// With template starts on, the cold/warm/dedup measurements run with actions opted out of
/// them (else every cold start would be followed by a template checkpoint, and later starts
/// would be template starts); returns the targets so changed and their original specs.
fn template_opt_out(mut targets: Vec<Target>, on: bool) -> (Vec<Target>, Vec<ActionSpec>) {
    let originals = targets.iter().map(|t| t.spec.clone()).collect();
    if on {
        for t in &mut targets {
            t.spec.annotations.push(opt_out_annotation());
        }
    }
    (targets, originals)
}

/// Raw samples of one function's template starts.
#[derive(Default)]
struct TemplateFigures {
    start: Vec<f64>,
    main: Vec<f64>,
    plain_run: Vec<f64>,
}

/// A fresh version (templates allowed) is cold-started; once its template is made, `runs` ×
/// (purge the idle sandboxes → invocation that must be a template start → plain CRIU restore
/// of a full image of the same version and its first run, the floor).
async fn measure_template(
    ctx: &DedupCtx,
    client: &Client,
    t: &Target,
    spec: &ActionSpec,
    runs: usize,
    bar: &ProgressBar,
) -> anyhow::Result<TemplateFigures> {
    let ctl = &ctx.controller;
    let version = deploy_version(client, &t.name, spec).await?;
    let before = ctl.template_stats();
    let failures = |s: &medes_controller::TemplateStats| s.make_failures.values().sum::<u64>();
    let (_, rec) = invoke(client, &t.name, &t.params).await?;
    anyhow::ensure!(
        rec.start_kind() == "cold",
        "{}: expected a cold start, got {}",
        t.name,
        rec.start_kind()
    );
    let action = action_of(ctl, &t.name, &version)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = ctl.template_stats();
        if s.made > before.made {
            break;
        }
        anyhow::ensure!(
            failures(&s) == failures(&before),
            "{}: the template was not made ({s:?})",
            t.name
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: no template within 120 s",
            t.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = code_dir(&ctx.data_dir, &action, &version);
    let floor = FloorDir::new("t", &t.name);
    let plain_dir = &floor.dir;
    let plain = Plain::new(ctx, &code, &action, &version, spec, &t.params);
    let mut out = TemplateFigures::default();
    let r = async {
        plain.checkpoint(plain_dir).await?;
        for i in 0..runs {
            ctl.purge_idle(&action);
            let (ms, rec) = invoke(client, &t.name, &t.params).await?;
            anyhow::ensure!(
                rec.start_kind() == "template",
                "{}: expected a template start, got {} ({:?})",
                t.name,
                rec.start_kind(),
                ctl.template_stats()
            );
            out.start.push(ms);
            out.main.push(main_ms(&rec));
            let (_, pr) = plain.restore(plain_dir, 100_000 + i).await?;
            out.plain_run.push(pr);
            bar.inc(1);
        }
        Ok(())
    }
    .await;
    drop(floor);
    r?;
    // Retire this version's sandboxes and template.
    client.put_action(&t.name, &t.spec).await?;
    Ok(out)
}

fn print_template_table(r: &StartupReport) {
    if r.functions.iter().all(|f| f.template_ms_p50.is_none()) {
        return;
    }
    let mut t = comfy_table::Table::new();
    t.set_header([
        "function",
        "cold p50",
        "template p50",
        "template p99",
        "main p50",
        "plain restore+run p50",
        "cold / template",
    ]);
    let o = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    for f in &r.functions {
        t.add_row([
            f.name.clone(),
            format!("{:.1}", f.cold_ms_p50),
            o(f.template_ms_p50),
            o(f.template_ms_p99),
            o(f.template_main_ms_p50),
            o(f.template_floor_run_ms_p50),
            f.template_ms_p50
                .filter(|v| *v > 0.0)
                .map_or("-".to_string(), |v| format!("{:.2}", f.cold_ms_p50 / v)),
        ]);
    }
    println!("template starts (issue 8), ms:");
    println!("{t}");
}

#[cfg(test)]
mod tests {
    use super::{code_dir, pct};
    use medes_core::{ActionName, Namespace};

    #[test]
    fn code_dir_follows_the_agent_layout() {
        let a = ActionName {
            namespace: Namespace("guest".into()),
            name: "pkg/fn".into(),
        };
        assert_eq!(
            code_dir("/d".as_ref(), &a, "0.0.3"),
            std::path::PathBuf::from("/d/code/guest/pkg/fn/0.0.3")
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&xs, 50.0), 50.0);
        assert_eq!(pct(&xs, 99.0), 99.0);
        assert_eq!(pct(&[], 50.0), 0.0);
        assert_eq!(pct(&[3.0], 99.0), 3.0);
    }
}
