//! `medes demo`: the README's first command. Builds a trace of the ten suite functions shaped
//! to show what the dedup state is for (bursts that need several sandboxes, idle gaps longer
//! than the keep-alive and shorter than the keep-dedup; [`burst_trace`]), and for fixed
//! keep-alive and for Medes starts a platform instance (embedded, one node, the same memory
//! budget, timers scaled), deploys the suite, replays the trace, then writes the report with
//! its plots (`medes report`'s format) plus where the memory went (warm, dedup stores, bases'
//! processes and page images) and prints the comparison. `--quick`: start an instance, deploy
//! `examples/hello.py`, invoke it cold and warm.

use super::splitmix::SplitMix64;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use medes_trace::{Trace, TraceEntry};
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
    /// Listen address of the --quick instance (port 0 = any free port; the full demo always
    /// takes free ports).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
    /// Only deploy `examples/hello.py` and invoke it cold and warm (seconds).
    #[arg(long)]
    pub quick: bool,
    /// Trace length per policy, minutes.
    #[arg(long, default_value_t = 4)]
    pub minutes: u32,
    /// Seed of the trace (burst sizes, gaps, order of the functions).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The node's memory budget, MiB (both policies).
    #[arg(long, default_value_t = 4096)]
    pub budget_mb: u64,
    /// Medes's memory-mode budget M0, MB: below one warm sandbox per function, so every idle
    /// sandbox but a function's base is deduplicated after the idle period.
    #[arg(long, default_value_t = 64.0)]
    pub m0_mb: f64,
    /// Medes releases a base's process once its image is taken (a base is then its page image
    /// only: less memory, no warm starts from bases; docs/BENCHMARKS.md, "Demo (session 4)").
    #[arg(long)]
    pub release_base_process: bool,
    /// The paper's timers (idle 60 s, keep-alive 10 min, keep-dedup 15 min) divided by this.
    #[arg(long, default_value_t = 10.0)]
    pub timer_scale: f64,
    /// Smallest and largest burst, requests (`MIN-MAX`).
    #[arg(long, default_value = "4-6", value_parser = parse_range)]
    pub burst: (u32, u32),
    /// Replay this trace file (`time_ms,function,params`) instead of the bursts.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Where the runs and the report go.
    #[arg(long, default_value = "demo-report")]
    pub out: PathBuf,
}

fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let p = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    let (a, b) = (p(a)?, p(b)?);
    if a == 0 || a > b || b > 50 {
        return Err(format!(
            "expected MIN-MAX with 1 ≤ MIN ≤ MAX ≤ 50, not {s:?}"
        ));
    }
    Ok((a, b))
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

/// The demo's trace, shaped to show what the dedup state is for: each of the ten suite
/// functions is called in bursts of `burst` near-simultaneous requests (within 50 ms, so each
/// needs its own sandbox), the bursts of a function separated by idle gaps drawn uniformly from
/// the middle 60% of (keep-alive, keep-dedup): longer than fixed keep-alive keeps a sandbox,
/// shorter than Medes keeps a dedup sandbox. The functions' first bursts are staggered over
/// one mean gap (in an order drawn from the seed); a function's burst size is drawn once.
pub fn burst_trace(
    seed: u64,
    minutes: u32,
    timers: &super::live::Timers,
    burst: (u32, u32),
) -> Trace {
    let mut rng = SplitMix64(seed ^ 0x6d65_6465_735f_6465);
    let ka = timers.keep_alive_s as f64;
    let kd = (timers.keep_dedup_s as f64).max(ka + 1.0);
    let (lo, hi) = (ka + 0.2 * (kd - ka), kd - 0.2 * (kd - ka));
    let end_ms = f64::from(minutes.max(1)) * 60_000.0;
    let mut names: Vec<&str> = medes_trace::PAPER_FUNCTIONS.to_vec();
    for i in (1..names.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        names.swap(i, j);
    }
    let stagger_ms = (lo + hi) / 2.0 * 1000.0 / names.len() as f64;
    let mut entries = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let k = rng.int(burst.0.max(1), burst.1.max(burst.0.max(1)));
        let mut t = 2_000.0 + i as f64 * stagger_ms;
        while t < end_ms {
            for _ in 0..k {
                entries.push(TraceEntry {
                    time_ms: (t + rng.between(0.0, 50.0)) as u64,
                    function: (*name).to_string(),
                    params: None,
                });
            }
            t += rng.between(lo, hi) * 1000.0;
        }
    }
    Trace::new(entries)
}

/// The full demo: fixed keep-alive and Medes on the same trace and budget, then the report.
fn full(args: Args) -> anyhow::Result<ExitCode> {
    use super::live::{self, LiveSpec, Timers, Which};
    let t0 = Instant::now();
    let minutes = args.minutes.clamp(1, 30);
    anyhow::ensure!(
        args.m0_mb.is_finite() && args.m0_mb > 0.0,
        "--m0-mb must be a positive number"
    );
    let mut timers = Timers::scaled(args.timer_scale);
    timers.medes_m0_mb = Some(args.m0_mb);
    timers.medes_release_base_process = args.release_base_process;
    let trace = match &args.trace {
        Some(p) => Trace::read_path(p).with_context(|| format!("reading {}", p.display()))?,
        None => burst_trace(args.seed, minutes, &timers, args.burst),
    };
    let trace_min = trace.duration_ms() as f64 / 60_000.0;
    println!(
        "medes demo: one {trace_min:.1}-minute trace ({} invocations of {} suite functions) replayed \
         live under fixed keep-alive and under Medes, each on a fresh platform instance (one node, \
         {} MiB memory budget). Timers: the paper's ÷{:.0} (idle {} s, keep-alive {} s, keep-dedup \
         {} s).",
        trace.len(),
        trace.functions().len(),
        args.budget_mb,
        args.timer_scale.max(1.0),
        timers.idle_period_s,
        timers.keep_alive_s,
        timers.keep_dedup_s,
    );
    if args.trace.is_none() {
        println!(
            "The trace (seed {}): each function is called in bursts of {}–{} simultaneous requests, \
             {}–{} s apart: longer than keep-alive, shorter than keep-dedup. Fixed keep-alive has \
             purged the burst's sandboxes when the next burst comes; Medes (memory mode, M0 = {:.0} \
             MB, below one warm sandbox per function) has made one of them the function's base and \
             deduplicated the others, and serves the next burst from them. About {:.0} minutes.",
            args.seed,
            args.burst.0,
            args.burst.1,
            (timers.keep_alive_s as f64 * 0.8 + timers.keep_dedup_s as f64 * 0.2).round(),
            (timers.keep_alive_s as f64 * 0.2 + timers.keep_dedup_s as f64 * 0.8).round(),
            args.m0_mb,
            2.0 * trace_min + 0.3,
        );
    }
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
    let mut means = Vec::new();
    let mut stats = Vec::new();
    for (i, which) in Which::BOTH.into_iter().enumerate() {
        println!(
            "{}. {}: starting the platform, deploying the suite, replaying the trace",
            i + 1,
            match which {
                Which::Fixed => format!("fixed keep-alive ({} s)", timers.keep_alive_s),
                Which::Medes => format!(
                    "Medes (memory mode, M0 = {:.0} MB{})",
                    args.m0_mb,
                    if args.release_base_process {
                        ", bases without process"
                    } else {
                        ""
                    }
                ),
            }
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
        let mean = live::MemoryBreakdown::mean(&run.breakdown);
        let s = &run.output.summary;
        println!(
            "   {} served ({} failed): {} cold, {} dedup, {} warm starts; p50 {:.0} ms, p99 {:.0} ms; {} evictions; {} sandboxes deduplicated, {} made bases",
            s.invocations,
            s.dropped,
            s.cold_starts,
            s.dedup_starts,
            s.warm_starts,
            s.p50_ms,
            s.p99_ms,
            s.counters.evictions,
            run.dedup.dedups,
            run.dedup.bases,
        );
        let failed_dedup: u64 = run.dedup.dedup_start_failures.values().sum();
        if failed_dedup > 0 {
            println!(
                "   {failed_dedup} dedup starts failed and fell back to cold starts ({:?})",
                run.dedup.dedup_start_failures
            );
        }
        println!("   mean memory {}", memory_line(&mean));
        means.push(mean);
        stats.push(run.dedup.clone());
        runs.push(run.output);
    }
    let report = medes_sim::report::write_runs_report(&runs, &args.out.join("report"))
        .context("writing the report")?;
    let (f, m) = (&runs[0].summary, &runs[1].summary);
    let (fb, mb) = (&means[0], &means[1]);
    append_memory_section(&report, &runs, &means, &stats)?;
    println!(
        "3. report with plots: {}\n   Medes vs fixed keep-alive, same trace and budget:\n   \
         cold starts {} → {} ({:+.0}%), dedup starts {} → {}\n   \
         p50 {:.0} → {:.0} ms, p99 {:.0} → {:.0} ms\n   \
         mean memory {:.0} → {:.0} MB ({:+.0}%); Medes's: {:.0} MB warm, {:.0} MB in {} dedup \
         sandboxes, {:.0} MB in {} bases ({:.0} MB processes + {:.0} MB page images), {:.0} MB \
         cold starts, checkpoints and restores in progress",
        report.display(),
        f.cold_starts,
        m.cold_starts,
        live::diff_pct(f.cold_starts as f64, m.cold_starts as f64),
        f.dedup_starts,
        m.dedup_starts,
        f.p50_ms,
        m.p50_ms,
        f.p99_ms,
        m.p99_ms,
        fb.used_mb,
        mb.used_mb,
        live::diff_pct(fb.used_mb, mb.used_mb),
        mb.warm_mb,
        mb.dedup_mb,
        mb.dedup,
        mb.base_process_mb + mb.base_image_mb,
        mb.bases,
        mb.base_process_mb,
        mb.base_image_mb,
        mb.starting_mb + mb.checkpoint_restore_mb,
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

fn memory_line(b: &super::live::MemoryBreakdown) -> String {
    format!(
        "{:.0} MB: warm {:.0} (≈{} sandboxes), dedup stores {:.0} (≈{}), bases {:.0} process + {:.0} image (≈{}), cold starts {:.0}, checkpoints/restores {:.0}, other {:.0}",
        b.used_mb,
        b.warm_mb,
        b.warm,
        b.dedup_mb,
        b.dedup,
        b.base_process_mb,
        b.base_image_mb,
        b.bases,
        b.starting_mb,
        b.checkpoint_restore_mb,
        b.other_mb
    )
}

/// Appends the memory breakdown, and what the bases cost, to the report.
fn append_memory_section(
    report: &std::path::Path,
    runs: &[medes_sim::SimOutput],
    means: &[super::live::MemoryBreakdown],
    stats: &[medes_controller::DedupStats],
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## Where the memory goes (time-weighted mean over the replay, MB; ≈ mean count)\n\n\
         | run | total | warm | cold starts | dedup stores | base processes | base page images | checkpoints / restores | other | dedups | bases made |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((r, b), st) in runs.iter().zip(means).zip(stats) {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} (≈{}) | {:.0} | {:.0} (≈{}) | {:.0} (≈{}) | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.policy,
            b.used_mb,
            b.warm_mb,
            b.warm,
            b.starting_mb,
            b.dedup_mb,
            b.dedup,
            b.base_process_mb,
            b.bases,
            b.base_image_mb,
            b.checkpoint_restore_mb,
            b.other_mb,
            st.dedups,
            st.bases
        );
    }
    md.push_str(
        "\nA base is a sandbox that keeps serving warm starts *and* keeps its page image resident \
         (the pages dedup sandboxes are patches against), so it holds about twice a warm \
         sandbox. Two platform changes would cut that (not made; estimates from the row above): \
         releasing a base's process once its image is taken would save the base processes' \
         column (its warm starts would become dedup starts); one base per dedup domain instead of \
         one per function would save most of the other bases' images, if the stores stayed as \
         small against another function's base.\n",
    );
    let mut text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    text.push_str(&md);
    std::fs::write(report, text).with_context(|| format!("writing {}", report.display()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::live::Timers;

    #[test]
    fn burst_trace_is_deterministic_and_shaped() {
        let t = Timers::scaled(10.0);
        let a = burst_trace(1, 4, &t, (4, 6));
        assert_eq!(a, burst_trace(1, 4, &t, (4, 6)));
        assert_ne!(a, burst_trace(2, 4, &t, (4, 6)));
        assert_eq!(a.functions().len(), 10);
        assert!(a.duration_ms() < 4 * 60_000);
        for f in a.functions() {
            let times: Vec<u64> = a
                .entries()
                .iter()
                .filter(|e| e.function == f)
                .map(|e| e.time_ms)
                .collect();
            // Bursts: runs of arrivals within 50 ms, 4 to 6 of them, the same size for a function.
            let mut bursts: Vec<Vec<u64>> = Vec::new();
            for &x in &times {
                match bursts.last_mut() {
                    Some(b) if x - b[0] <= 50 => b.push(x),
                    _ => bursts.push(vec![x]),
                }
            }
            assert!(bursts.len() >= 2, "{f}: {bursts:?}");
            let k = bursts[0].len();
            assert!((4..=6).contains(&k), "{f}: {k}");
            for w in bursts.windows(2) {
                assert_eq!(w[0].len(), k, "{f}");
                let gap = (w[1][0] - w[0][0]) as f64 / 1000.0;
                assert!(gap > 60.0 && gap < 90.0, "{f}: gap {gap} s");
            }
        }
    }

    #[test]
    fn burst_range_parses_and_rejects_nonsense() {
        assert_eq!(parse_range("4-6"), Ok((4, 6)));
        assert_eq!(parse_range("3"), Ok((3, 3)));
        assert!(parse_range("6-4").is_err());
        assert!(parse_range("0-2").is_err());
        assert!(parse_range("a-b").is_err());
    }
}
