//! `medes demo`: the README's first command. Builds a short trace of the ten suite functions,
//! and for fixed keep-alive and for Medes starts a platform instance (embedded, one node, a
//! memory budget that forces evictions, timers scaled to the trace), deploys the suite,
//! replays the trace, then writes the report with its plots (`medes report`'s format) and
//! prints the comparison. `--quick`: start an instance, deploy `examples/hello.py`, invoke it
//! cold and warm.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use medes_workload::client::{ExecSpec, LimitsSpec};
use medes_workload::{ActionSpec, Client, ClientConfig, Invoked};
use serde_json::{Map, Value, json};

use crate::config::MedesConfig;
use crate::platform::{Platform, init_tracing};

const HELLO: &str = include_str!("../../../../examples/hello.py");

/// Arguments of `medes demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Data directory of the demo instance (its store, key and action code); the full demo
    /// uses one subdirectory per policy.
    #[arg(long, default_value = "/var/lib/medes-demo")]
    pub data_dir: PathBuf,
    /// Listen address of the --quick instance (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Only deploy `examples/hello.py` and invoke it cold and warm (seconds).
    #[arg(long)]
    pub quick: bool,
    /// Trace length per policy, minutes.
    #[arg(long, default_value_t = 3)]
    pub minutes: u32,
    /// Seed of the trace.
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
    /// The node's memory budget, MiB.
    #[arg(long, default_value_t = 1536)]
    pub budget_mb: u64,
    /// Where the runs and the report go.
    #[arg(long, default_value = "demo-report")]
    pub out: PathBuf,
}

/// Runs `medes demo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    if !args.quick {
        return full(args);
    }
    let mut cfg = MedesConfig::default();
    cfg.data_dir = args.data_dir;
    cfg.api.listen = args.listen;
    cfg.agent.sandbox.cgroup_name = format!("medes-demo-{}", std::process::id());
    cfg.agent.sandbox.run_dir = format!("/run/medes/demo-{}", std::process::id()).into();
    cfg.finish();
    let rt = tokio::runtime::Runtime::new()?;
    let ok = rt.block_on(async move {
        println!(
            "1. starting medes (controller + node agent, data in {})",
            cfg.data_dir.display()
        );
        let t = Instant::now();
        let platform = Platform::start(cfg).await?;
        println!(
            "   API at {} in {:.0} ms",
            platform.url,
            t.elapsed().as_secs_f64() * 1e3
        );
        let result = demo(&platform).await;
        platform.stop().await?;
        result
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The full demo: fixed keep-alive and Medes on the same short trace, then the report.
fn full(args: Args) -> anyhow::Result<ExitCode> {
    use super::live::{self, LiveSpec, Timers, Which};
    let t0 = Instant::now();
    let minutes = args.minutes.clamp(1, 30);
    let trace = live::short_trace(minutes, args.seed, 300.0, 3000.0)?;
    let scale = (30.0 / f64::from(minutes)).max(1.0);
    let timers = Timers::scaled(scale);
    println!(
        "medes demo: the same {minutes}-minute trace ({} invocations of the ten suite functions) \
         under fixed keep-alive and under Medes, each on a fresh platform instance with a {} MiB \
         memory budget; the paper's timers scaled ÷{:.0} (idle {} s, keep-alive {} s, keep-dedup \
         {} s). About {} minutes.",
        trace.len(),
        args.budget_mb,
        scale,
        timers.idle_period_s,
        timers.keep_alive_s,
        timers.keep_dedup_s,
        2 * minutes + 2,
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    trace
        .write_path(args.out.join("trace.csv"))
        .context("writing trace.csv")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let mut runs = Vec::new();
    for (i, which) in Which::BOTH.into_iter().enumerate() {
        println!(
            "{}. {}: starting the platform, deploying the suite, replaying the trace",
            i + 1,
            which.label(&timers)
        );
        let run = rt.block_on(live::run_live(&LiveSpec {
            trace: &trace,
            which,
            timers,
            budget_mb: args.budget_mb,
            data_root: &args.data_dir,
            progress: true,
        }))?;
        live::write_live(&run, &args.out.join(&run.output.policy))?;
        let out = run.output;
        let s = &out.summary;
        println!(
            "   {} served ({} failed): {} cold, {} dedup, {} warm starts; p50 {:.0} ms, p99 {:.0} ms; mean memory {:.0} MB; {} evictions",
            s.invocations,
            s.dropped,
            s.cold_starts,
            s.dedup_starts,
            s.warm_starts,
            s.p50_ms,
            s.p99_ms,
            s.mean_memory_gb * 1000.0,
            s.counters.evictions
        );
        runs.push(out);
    }
    let report = medes_sim::report::write_runs_report(&runs, &args.out.join("report"))
        .context("writing the report")?;
    let (f, m) = (&runs[0].summary, &runs[1].summary);
    println!(
        "3. report with plots: {}\n   Medes vs fixed keep-alive: cold starts {} → {} ({:+.0}%), p99 {:.0} → {:.0} ms, mean memory {:.0} → {:.0} MB",
        report.display(),
        f.cold_starts,
        m.cold_starts,
        live::diff_pct(f.cold_starts as f64, m.cold_starts as f64),
        f.p99_ms,
        m.p99_ms,
        f.mean_memory_gb * 1000.0,
        m.mean_memory_gb * 1000.0
    );
    println!(
        "demo done in {:.1} min. Next: medes serve; medes policy get|set; medes eval paper; medes eval validate; docs/EVALUATION.md",
        t0.elapsed().as_secs_f64() / 60.0
    );
    // A loaded machine may turn a few invocations away (503 after the admission wait); more
    // than 2% means something is wrong.
    let failed = f.dropped + m.dropped;
    if failed > 0 {
        println!(
            "{failed} of {} invocations failed: see {}/*/replay.json",
            2 * trace.len(),
            args.out.display()
        );
    }
    Ok(if failed * 50 <= 2 * trace.len() as u64 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn demo(platform: &Platform) -> anyhow::Result<bool> {
    let client = Client::new(&ClientConfig::new(
        platform.url.clone(),
        platform.auth.clone(),
    ))?;
    println!(
        "2. deploying examples/hello.py as action `hello` (PUT /api/v1/namespaces/_/actions/hello)"
    );
    let spec = ActionSpec {
        exec: ExecSpec {
            kind: "python:3".into(),
            code: HELLO.into(),
            binary: false,
            main: None,
        },
        limits: LimitsSpec {
            timeout: 10_000,
            memory: 128,
        },
        parameters: vec![],
        annotations: vec![],
    };
    client
        .put_action("hello", &spec)
        .await
        .context("deploying hello")?;
    let mut all_ok = true;
    let mut last = String::new();
    for (i, who) in ["cold", "warm"].iter().enumerate() {
        let mut params = Map::new();
        params.insert("name".into(), json!(format!("medes ({who} call)")));
        let t = Instant::now();
        let out = client
            .invoke("hello", &params, true)
            .await
            .context("invoking hello")?;
        let client_ms = t.elapsed().as_secs_f64() * 1e3;
        let Invoked::Completed { record, .. } = out else {
            anyhow::bail!("the invocation did not complete within the blocking wait");
        };
        println!(
            "{}. invoke #{}: startKind={} initTime={} client latency {:.1} ms, activation {}",
            3 + i,
            i + 1,
            record.start_kind(),
            record
                .init_time_ms()
                .map_or("-".into(), |v| format!("{v:.0} ms")),
            client_ms,
            record.activation_id
        );
        println!("   result: {}", record.response.result);
        all_ok &= record.succeeded() && record.start_kind() == *who;
        last = record.activation_id.clone();
    }
    let logs_url = format!(
        "{}/api/v1/namespaces/_/activations/{last}/logs",
        platform.url
    );
    let (user, key) = platform.auth.split_once(':').unwrap_or_default();
    let logs: Value = reqwest::Client::new()
        .get(&logs_url)
        .basic_auth(user, Some(key))
        .send()
        .await?
        .json()
        .await?;
    println!("5. GET {logs_url}\n   {logs}");
    println!();
    println!(
        "{}",
        if all_ok {
            "demo OK: the first call was a cold start, the second a warm one."
        } else {
            "demo FAILED: see above."
        }
    );
    println!("Where to look next:");
    println!(
        "  medes serve                      # the platform on 127.0.0.1:3233 (key printed at start)"
    );
    println!("  medes suite deploy && medes suite run   # the ten FunctionBench-style functions");
    println!("  medes bench startup --json       # cold/warm latency and platform overhead");
    println!("  docs/ARCHITECTURE.md, docs/BENCHMARKS.md");
    Ok(all_ok)
}
