//! `medes bench`: whole-system benchmarks that print numbers (never timed assertions).
//!
//! `startup` measures cold and warm starts as a client sees them, the platform's own overhead on
//! a warm invocation (client latency minus the time inside `main`) and the no-op throughput with
//! concurrent clients. Times in ms, sizes in MB (10^6 bytes), rates per second.

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
    }
}

fn startup(args: StartupArgs) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (platform, _tmp) = match &args.url {
            Some(_) => (None, None),
            None => {
                let tmp = tempfile::Builder::new().prefix("medes-bench-").tempdir()?;
                let mut cfg = MedesConfig::default();
                cfg.data_dir = args
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| tmp.path().to_path_buf());
                cfg.api.listen = "127.0.0.1:0".parse()?;
                let tag = format!("bench-{}", std::process::id());
                cfg.agent.sandbox.cgroup_name = format!("medes-{tag}");
                cfg.agent.sandbox.run_dir = format!("/run/medes/{tag}").into();
                cfg.finish();
                (Some(Platform::start(cfg).await?), Some(tmp))
            }
        };
        let (url, auth) = match (&platform, &args.url) {
            (Some(p), _) => (p.url.clone(), p.auth.clone()),
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
        let report = measure(&client, &args).await;
        if let Some(p) = platform {
            p.stop().await?;
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

async fn measure(client: &Client, args: &StartupArgs) -> anyhow::Result<StartupReport> {
    let targets = targets(args)?;
    let runs = args.runs.max(1);
    let bar = ProgressBar::new((targets.len() * runs * 2) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    let mut rows = Vec::new();
    let mut overhead = Vec::new();
    for t in &targets {
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
        rows.push(FunctionRow {
            name: t.name.clone(),
            cold_ms_p50: pct(&cold, 50.0),
            cold_ms_p99: pct(&cold, 99.0),
            warm_ms_p50: pct(&warm, 50.0),
            warm_ms_p99: pct(&warm, 99.0),
            init_ms_p50: pct(&init, 50.0),
            main_ms_p50: pct(&main, 50.0),
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
        "function", "cold p50", "cold p99", "init p50", "warm p50", "warm p99", "main p50",
    ]);
    for f in &r.functions {
        t.add_row([
            f.name.clone(),
            format!("{:.1}", f.cold_ms_p50),
            format!("{:.1}", f.cold_ms_p99),
            format!("{:.1}", f.init_ms_p50),
            format!("{:.2}", f.warm_ms_p50),
            format!("{:.2}", f.warm_ms_p99),
            format!("{:.2}", f.main_ms_p50),
        ]);
    }
    println!("{t}");
    println!(
        "warm overhead: p50 {:.2} ms, p99 {:.2} ms; no-op throughput {:.0}/s with {} clients (times in ms)",
        r.warm_overhead_ms_p50, r.warm_overhead_ms_p99, r.noop_invocations_per_s, r.noop_clients
    );
}

#[cfg(test)]
mod tests {
    use super::pct;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&xs, 50.0), 50.0);
        assert_eq!(pct(&xs, 99.0), 99.0);
        assert_eq!(pct(&[], 50.0), 0.0);
        assert_eq!(pct(&[3.0], 99.0), 3.0);
    }
}
