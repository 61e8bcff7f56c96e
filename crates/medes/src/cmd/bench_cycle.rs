//! `medes bench cycle`: a long mixed run that keeps sandboxes of every suite function cycling
//! warm → dedup → restored (issue 5's 30-minute target).
//!
//! An own platform instance runs with short timers (idle period and keep-dedup from the
//! arguments). One driver per function sends invocations with mixed gaps drawn from a seeded
//! generator: short gaps (warm starts), gaps past the idle period (the sandbox is deduplicated
//! meanwhile: dedup starts), gaps past keep-dedup (cold starts) and small concurrent bursts
//! (more sandboxes, so bases and dedup sandboxes of one function coexist). Every result is
//! checked against the manifest. At the end it prints invocations by start kind, failures (and
//! those on the dedup path), dedup-start fallbacks and checkpoint failures by reason as the
//! controller counted them, cross-checked with the node agent's own counters, and the memory
//! charged over time.

use super::splitmix::SplitMix64;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medes_policy::StateKind;
use medes_workload::{Client, ClientConfig, FunctionSpec, Invoked, Manifest};
use parking_lot_free::Mutex;
use serde::Serialize;
use serde_json::Value;

use crate::platform::{Platform, init_tracing};

/// `std::sync::Mutex` with a panic-free lock (a poisoned lock still gives its data).
mod parking_lot_free {
    pub struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub fn new(t: T) -> Self {
            Mutex(std::sync::Mutex::new(t))
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// Arguments of `medes bench cycle`.
#[derive(clap::Args)]
pub struct CycleArgs {
    /// Length of the run, minutes.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// The controller's idle period (warm → policy decision), seconds.
    #[arg(long, default_value_t = 3)]
    idle_s: u64,
    /// The controller's keep-dedup period, seconds.
    #[arg(long, default_value_t = 40)]
    keep_dedup_s: u64,
    /// Only these functions (comma-separated; default: the ten of the suite).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The workload suite's directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../functions"))]
    functions_dir: PathBuf,
    /// Data directory of the own instance (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the arrival generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often memory is sampled, seconds.
    #[arg(long, default_value_t = 15)]
    sample_s: u64,
}

/// Per function counts.
#[derive(Debug, Default, Clone, Serialize)]
struct FnCounts {
    invocations: u64,
    warm: u64,
    dedup: u64,
    /// m_R the controller reserves for a dedup start (measured: see `restore_transient_measured`).
    restore_transient_mb: Option<f64>,
    restore_transient_measured: bool,
    cold: u64,
    other: u64,
    failures: u64,
    dedup_path_failures: u64,
    #[serde(skip)]
    latency: BTreeMap<String, Vec<f64>>,
}

/// One failed invocation (the first few are kept).
#[derive(Debug, Clone, Serialize)]
struct Failure {
    function: String,
    at_s: f64,
    start_kind: Option<String>,
    error: String,
}

/// Memory charged on the node at one time.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    at_s: f64,
    charged_mb: f64,
    /// Sandboxes per state label.
    sandboxes: BTreeMap<String, usize>,
    /// Charged MB per state label.
    mb: BTreeMap<String, f64>,
    /// Mean over the dedup sandboxes of (what is charged for it ÷ its function's warm PSS),
    /// percent; `None` without a dedup sandbox whose function's warm PSS is known.
    dedup_pct_of_warm: Option<f64>,
}

/// Dedup sandbox memory relative to the warm sandbox's, as the platform holds it: for every
/// memory sample and every dedup sandbox in it, what is charged for the dedup sandbox (its
/// store, metadata, non-page images and, when armed, its stopped tree) ÷ the PSS last
/// measured of a warm sandbox of its function (issue 5's "≤ 15% of warm on average").
#[derive(Debug, Default, Serialize)]
struct DedupRatio {
    /// Mean over every (sample, dedup sandbox), percent.
    mean_pct: Option<f64>,
    /// (sample, dedup sandbox) pairs.
    n: u64,
    /// Per function: mean percent.
    per_function: BTreeMap<String, f64>,
    #[serde(skip)]
    sums: BTreeMap<String, (f64, u64)>,
}

impl DedupRatio {
    fn add(&mut self, function: &str, pct: f64) {
        let e = self.sums.entry(function.to_string()).or_default();
        e.0 += pct;
        e.1 += 1;
    }

    fn finish(&mut self) {
        let (mut sum, mut n) = (0.0, 0u64);
        for (f, (s, k)) in &self.sums {
            self.per_function
                .insert(f.clone(), (s / *k as f64 * 10.0).round() / 10.0);
            sum += s;
            n += k;
        }
        self.n = n;
        self.mean_pct = (n > 0).then(|| (sum / n as f64 * 10.0).round() / 10.0);
    }
}

#[derive(Debug, Serialize)]
struct LatencyRow {
    function: String,
    kind: String,
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct CycleReport {
    minutes: f64,
    idle_s: u64,
    keep_dedup_s: u64,
    seed: u64,
    invocations: u64,
    failures: u64,
    dedup_path_failures: u64,
    warm_starts: u64,
    dedup_starts: u64,
    cold_starts: u64,
    /// Dedup starts that failed and fell back to a cold start, by reason (controller).
    fallbacks: BTreeMap<String, u64>,
    fallbacks_total: u64,
    /// Make-base or dedup checkpoints that failed, by reason (controller).
    checkpoint_failures: BTreeMap<String, u64>,
    /// Controller counters.
    bases: u64,
    dedups: u64,
    controller_dedup_starts: u64,
    /// Node agent counters.
    agent: medes_agent::DedupCounters,
    /// Every fallback has a reason, the client's dedup starts match the controller's, and the
    /// agent's restore counts match the controller's.
    accounted: bool,
    accounting_notes: Vec<String>,
    per_function: BTreeMap<String, FnCounts>,
    latency: Vec<LatencyRow>,
    memory: Vec<Sample>,
    /// Dedup sandbox memory ÷ warm, as held during the run.
    dedup_of_warm: DedupRatio,
    peak_charged_mb: f64,
    first_failures: Vec<Failure>,
    load_at_end: String,
}

/// What a driver does next.
enum Step {
    /// Wait this long, then invoke `n` times at once.
    Invoke { gap_s: f64, n: usize },
}

fn next_step(rng: &mut SplitMix64, idle_s: f64, keep_s: f64) -> Step {
    let r = rng.unit();
    // 1 to 3 calls at once: an idle base serves the first like a warm sandbox, the others
    // restore the function's dedup sandboxes (or cold-start if there are none).
    let burst = |rng: &mut SplitMix64| match rng.unit() {
        x if x < 0.3 => 1,
        x if x < 0.7 => 2,
        _ => 3,
    };
    if r < 0.30 {
        // Within the idle period: a warm start.
        Step::Invoke {
            gap_s: rng.between(0.1, (idle_s * 0.6).max(0.2)),
            n: 1,
        }
    } else if r < 0.75 {
        // Past the idle period (and the checkpoint), within keep-dedup: dedup starts.
        Step::Invoke {
            gap_s: rng.between(idle_s + 6.0, (keep_s - 3.0).max(idle_s + 7.0)),
            n: burst(rng),
        }
    } else if r < 0.85 {
        // Past keep-dedup: cold starts.
        Step::Invoke {
            gap_s: rng.between(keep_s + idle_s + 5.0, keep_s + idle_s + 20.0),
            n: 1 + (rng.next() % 2) as usize,
        }
    } else {
        // A burst soon after: more sandboxes of the function.
        Step::Invoke {
            gap_s: rng.between(0.1, idle_s * 0.6),
            n: 2 + (rng.next() % 2) as usize,
        }
    }
}

#[derive(Default)]
struct Shared {
    per_function: BTreeMap<String, FnCounts>,
    failures: Vec<Failure>,
}

/// Runs `medes bench cycle`.
pub fn run(args: CycleArgs) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let manifest = Manifest::load(&args.functions_dir)
        .with_context(|| format!("loading {}", args.functions_dir.display()))?;
    let mut names = manifest.names();
    if !args.only.is_empty() {
        names.retain(|n| args.only.contains(n));
    }
    anyhow::ensure!(!names.is_empty(), "no function selected");
    anyhow::ensure!(
        args.keep_dedup_s > args.idle_s + 10,
        "--keep-dedup-s must exceed --idle-s by more than 10 s"
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (mut cfg, _tmp) = super::bench::own_instance_config("cycle", args.data_dir.as_deref())?;
        cfg.controller.dedup_enabled = true;
        cfg.controller.idle_period_s = args.idle_s;
        cfg.controller.keep_dedup_s = args.keep_dedup_s;
        cfg.controller.keep_alive_s = args.keep_dedup_s;
        cfg.finish();
        let platform = Platform::start(cfg).await?;
        let client = Client::new(&ClientConfig::new(
            platform.url.clone(),
            platform.auth.clone(),
        ))?;
        let deployed =
            medes_workload::deploy(&client, &args.functions_dir, &manifest, &names).await;
        for d in &deployed {
            if let Err(e) = &d.result {
                anyhow::bail!("deploying {}: {}", d.name, medes_workload::error_chain(e));
            }
        }
        let report = drive(&platform, &client, &manifest, &names, &args).await;
        platform.stop_and_purge().await?;
        let report = report?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
        Ok(if report.failures == 0 && report.accounted {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

async fn drive(
    platform: &Platform,
    client: &Client,
    manifest: &Manifest,
    names: &[String],
    args: &CycleArgs,
) -> anyhow::Result<CycleReport> {
    let total = Duration::from_secs_f64(args.minutes.max(0.05) * 60.0);
    let t0 = Instant::now();
    let end = t0 + total;
    let shared = Arc::new(Mutex::new(Shared::default()));
    // SIGINT / SIGTERM end the run early (the report covers what ran; the platform is stopped).
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                },
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            stop.cancel();
        });
    }
    let bar = ProgressBar::new(total.as_secs());
    bar.set_style(
        ProgressStyle::with_template("cycle [{bar:30}] {elapsed_precise}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());

    let mut drivers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let spec = manifest.functions[name].clone();
        let (client, shared, name) = (client.clone(), shared.clone(), name.clone());
        let stop = stop.clone();
        let mut rng = SplitMix64(args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let (idle, keep) = (args.idle_s as f64, args.keep_dedup_s as f64);
        drivers.push(tokio::spawn(async move {
            // Staggered first calls (cold starts), so they do not all land at once.
            tokio::time::sleep(Duration::from_secs_f64(i as f64 * 1.5)).await;
            let mut calls = Vec::new();
            let mut n = 1;
            loop {
                for _ in 0..n {
                    let (c, s, nm, sp) =
                        (client.clone(), shared.clone(), name.clone(), spec.clone());
                    calls.push(tokio::spawn(
                        async move { one_call(&c, &nm, &sp, &s, t0).await },
                    ));
                }
                let Step::Invoke { gap_s, n: next_n } = next_step(&mut rng, idle, keep);
                n = next_n;
                // The gap runs from the end of the previous calls (an idle period must pass).
                for c in calls.drain(..) {
                    let _ = c.await;
                }
                let wake = Instant::now() + Duration::from_secs_f64(gap_s);
                if wake >= end || stop.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }));
    }

    let mut memory = Vec::new();
    let mut ratio = DedupRatio::default();
    let mut warm_pss = BTreeMap::new();
    let mut seen: BTreeMap<String, medes_core::ActionName> = BTreeMap::new();
    let sample_every = Duration::from_secs(args.sample_s.max(1));
    let mut next_sample = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            for s in platform.controller.sandboxes() {
                seen.insert(s.action.name.clone(), s.action);
            }
            memory.push(sample(platform, t0, &mut warm_pss, &mut ratio));
            next_sample += sample_every;
        }
        let (n, f, d) = {
            let s = shared.lock();
            let n: u64 = s.per_function.values().map(|c| c.invocations).sum();
            let f: u64 = s.per_function.values().map(|c| c.failures).sum();
            let d: u64 = s.per_function.values().map(|c| c.dedup).sum();
            (n, f, d)
        };
        let st = platform.controller.dedup_stats();
        let fb: u64 = st.dedup_start_failures.values().sum();
        bar.set_position(t0.elapsed().as_secs().min(total.as_secs()));
        bar.set_message(format!(
            "{n} calls, {d} dedup starts, {f} failed, {fb} fallbacks, {} MB",
            memory.last().map_or(0.0, |s: &Sample| s.charged_mb).round()
        ));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => break,
        }
    }
    for d in drivers {
        let _ = d.await;
    }
    memory.push(sample(platform, t0, &mut warm_pss, &mut ratio));
    ratio.finish();
    bar.finish_and_clear();
    // Let the last checkpoints end, so the counters are final.
    let _ = tokio::time::timeout(Duration::from_secs(60), platform.controller.wait_settled()).await;

    let st = platform.controller.dedup_stats();
    let agent = platform.agent().dedup_counters();
    let shared = std::mem::take(&mut *shared.lock());
    let mut per_function = shared.per_function;
    for s in platform.controller.sandboxes() {
        seen.insert(s.action.name.clone(), s.action);
    }
    for (name, c) in per_function.iter_mut() {
        if let Some((b, measured)) = seen
            .get(name)
            .and_then(|a| platform.controller.restore_transient(a))
        {
            c.restore_transient_mb = Some((b.0 as f64 / 1e5).round() / 10.0);
            c.restore_transient_measured = measured;
        }
    }
    let sum = |f: fn(&FnCounts) -> u64| per_function.values().map(f).sum::<u64>();
    let dedup_starts = sum(|c| c.dedup);
    let fallbacks_total: u64 = st.dedup_start_failures.values().sum();
    let mut notes = Vec::new();
    if dedup_starts != st.dedup_starts {
        notes.push(format!(
            "client saw {dedup_starts} dedup starts, the controller counted {}",
            st.dedup_starts
        ));
    }
    if agent.restores != st.dedup_starts {
        notes.push(format!(
            "the agent restored {} sandboxes, the controller counted {} dedup starts",
            agent.restores, st.dedup_starts
        ));
    }
    let agent_side: u64 = st
        .dedup_start_failures
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "timeout" | "agent_unavailable" | "unexpected_reply"
            )
        })
        .map(|(_, v)| v)
        .sum();
    if agent.restore_failures > agent_side {
        notes.push(format!(
            "the agent failed {} dedup starts, the controller attributed {agent_side}",
            agent.restore_failures
        ));
    }
    if st.dedup_start_failures.keys().any(|k| k.is_empty()) {
        notes.push("a fallback without a reason".into());
    }
    let mut latency = Vec::new();
    for (name, c) in &per_function {
        for (kind, v) in &c.latency {
            latency.push(LatencyRow {
                function: name.clone(),
                kind: kind.clone(),
                n: v.len(),
                p50_ms: pct(v, 50.0),
                p99_ms: pct(v, 99.0),
            });
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(CycleReport {
        minutes: (t0.elapsed().as_secs_f64() / 60.0 * 10.0).round() / 10.0,
        idle_s: args.idle_s,
        keep_dedup_s: args.keep_dedup_s,
        seed: args.seed,
        invocations: sum(|c| c.invocations),
        failures: sum(|c| c.failures),
        dedup_path_failures: sum(|c| c.dedup_path_failures),
        warm_starts: sum(|c| c.warm),
        dedup_starts,
        cold_starts: sum(|c| c.cold),
        fallbacks: st.dedup_start_failures.clone(),
        fallbacks_total,
        checkpoint_failures: st.dedup_failures.clone(),
        bases: st.bases,
        dedups: st.dedups,
        controller_dedup_starts: st.dedup_starts,
        agent,
        accounted: notes.is_empty(),
        accounting_notes: notes,
        peak_charged_mb: memory.iter().map(|s| s.charged_mb).fold(0.0, f64::max),
        per_function,
        latency,
        memory,
        dedup_of_warm: ratio,
        first_failures: shared.failures,
        load_at_end: load.trim().to_string(),
    })
}

/// One invocation, checked; counted in `shared`.
async fn one_call(
    client: &Client,
    name: &str,
    spec: &FunctionSpec,
    shared: &Mutex<Shared>,
    t0: Instant,
) {
    let t = Instant::now();
    let r = client.invoke(name, &spec.params, true).await;
    let r = match r {
        Ok(Invoked::Accepted { activation_id }) => {
            // The blocking wait expired: poll for the record.
            let deadline = Instant::now() + Duration::from_millis(spec.timeout_ms + 30_000);
            match client
                .wait_activation(&activation_id, Duration::from_millis(200), deadline)
                .await
            {
                Ok(Some(rec)) => Ok(rec),
                Ok(None) => Err(format!("activation {activation_id} never finished")),
                Err(e) => Err(medes_workload::error_chain(&e)),
            }
        }
        Ok(Invoked::Completed { record, .. }) => Ok(*record),
        Err(e) => Err(medes_workload::error_chain(&e)),
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (kind, problem) = match r {
        Ok(rec) => {
            let kind = rec.start_kind();
            let problem = if rec.succeeded() {
                let p = medes_workload::check_result(spec, &rec.response.result);
                (!p.is_empty()).then(|| p.join("; "))
            } else {
                Some(format!(
                    "{}: {}",
                    rec.response.status,
                    compact(&rec.response.result)
                ))
            };
            (Some(kind), problem)
        }
        Err(e) => (None, Some(e)),
    };
    let mut s = shared.lock();
    let c = s.per_function.entry(name.to_string()).or_default();
    c.invocations += 1;
    match kind.as_deref() {
        Some("warm") => c.warm += 1,
        Some("dedup") => c.dedup += 1,
        Some("cold") => c.cold += 1,
        _ => c.other += 1,
    }
    if let Some(k) = &kind {
        c.latency.entry(k.clone()).or_default().push(ms);
    }
    if let Some(error) = problem {
        c.failures += 1;
        let lower = error.to_ascii_lowercase();
        if kind.as_deref() == Some("dedup") || lower.contains("restor") || lower.contains("dedup") {
            c.dedup_path_failures += 1;
        }
        if s.failures.len() < 20 {
            s.failures.push(Failure {
                function: name.to_string(),
                at_s: t0.elapsed().as_secs_f64(),
                start_kind: kind,
                error,
            });
        }
    }
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    s.chars().take(300).collect()
}

/// One memory sample; `warm_pss` keeps the PSS last measured of a warm sandbox of each
/// function (a dedup sandbox is compared with it), `ratio` gathers the dedup ÷ warm ratios.
fn sample(
    platform: &Platform,
    t0: Instant,
    warm_pss: &mut BTreeMap<String, f64>,
    ratio: &mut DedupRatio,
) -> Sample {
    let mut sandboxes = BTreeMap::new();
    let mut mb = BTreeMap::new();
    let all = platform.controller.sandboxes();
    for s in &all {
        *sandboxes.entry(s.state.as_str().to_string()).or_insert(0) += 1;
        *mb.entry(s.state.as_str().to_string()).or_insert(0.0) += s.charged.0 as f64 / 1e6;
        if s.state == StateKind::Warm
            && let Some(m) = s.measured.filter(|m| m.0 > 0)
        {
            warm_pss.insert(s.action.name.clone(), m.0 as f64);
        }
    }
    let mut pcts = Vec::new();
    for s in all.iter().filter(|s| s.state == StateKind::Dedup) {
        if let Some(w) = warm_pss.get(&s.action.name) {
            let pct = 100.0 * s.charged.0 as f64 / w;
            ratio.add(&s.action.name, pct);
            pcts.push(pct);
        }
    }
    for k in StateKind::ALL {
        sandboxes.entry(k.as_str().to_string()).or_insert(0);
        mb.entry(k.as_str().to_string()).or_insert(0.0);
    }
    let charged: u64 = platform.controller.memory_used().iter().map(|b| b.0).sum();
    Sample {
        at_s: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        charged_mb: (charged as f64 / 1e6 * 10.0).round() / 10.0,
        sandboxes,
        mb: mb
            .into_iter()
            .map(|(k, v)| (k, (v * 10.0).round() / 10.0))
            .collect(),
        dedup_pct_of_warm: (!pcts.is_empty())
            .then(|| (pcts.iter().sum::<f64>() / pcts.len() as f64 * 10.0).round() / 10.0),
    }
}

/// The `p`-th percentile (nearest rank); 0 for an empty set.
fn pct(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    (v[rank.clamp(1, v.len()) - 1] * 10.0).round() / 10.0
}

fn print_report(r: &CycleReport) {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "function",
        "calls",
        "warm",
        "dedup",
        "cold",
        "failed",
        "warm p50",
        "dedup p50",
        "dedup p99",
        "cold p50",
        "m_R MB",
    ]);
    for (name, c) in &r.per_function {
        let p = |k: &str, q: f64| {
            c.latency
                .get(k)
                .map_or("-".to_string(), |v| format!("{:.0}", pct(v, q)))
        };
        t.add_row([
            name.clone(),
            c.invocations.to_string(),
            c.warm.to_string(),
            c.dedup.to_string(),
            c.cold.to_string(),
            c.failures.to_string(),
            p("warm", 50.0),
            p("dedup", 50.0),
            p("dedup", 99.0),
            p("cold", 50.0),
            match (c.restore_transient_mb, c.restore_transient_measured) {
                (Some(m), true) => format!("{m:.1}"),
                (Some(m), false) => format!("({m:.1})"),
                (None, _) => "-".into(),
            },
        ]);
    }
    println!("{t}");
    println!(
        "{:.1} min, idle {} s, keep-dedup {} s: {} invocations ({} warm, {} dedup, {} cold starts), {} failed ({} on the dedup path)",
        r.minutes,
        r.idle_s,
        r.keep_dedup_s,
        r.invocations,
        r.warm_starts,
        r.dedup_starts,
        r.cold_starts,
        r.failures,
        r.dedup_path_failures
    );
    println!(
        "controller: {} bases, {} dedups, {} dedup starts; fallbacks {} {:?}; checkpoint failures {:?}",
        r.bases,
        r.dedups,
        r.controller_dedup_starts,
        r.fallbacks_total,
        r.fallbacks,
        r.checkpoint_failures
    );
    println!(
        "agent: {} dedups, {} reused, {} bases, {} retired, {} restores, {} restore failures, {} not deduplicable",
        r.agent.dedups,
        r.agent.reused,
        r.agent.bases,
        r.agent.retired,
        r.agent.restores,
        r.agent.restore_failures,
        r.agent.not_deduplicable
    );
    println!(
        "accounted: {}{}",
        r.accounted,
        if r.accounting_notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.accounting_notes.join("; "))
        }
    );
    let mut m = comfy_table::Table::new();
    m.set_header([
        "t s",
        "charged MB",
        "warm",
        "base",
        "dedup",
        "dedup MB",
        "base MB",
    ]);
    let every = (r.memory.len() / 15).max(1);
    for s in r.memory.iter().step_by(every) {
        let n = |k: &str| s.sandboxes.get(k).copied().unwrap_or(0).to_string();
        let mb = |k: &str| format!("{:.1}", s.mb.get(k).copied().unwrap_or(0.0));
        m.add_row([
            format!("{:.0}", s.at_s),
            format!("{:.1}", s.charged_mb),
            n("warm"),
            n("base"),
            n("dedup"),
            mb("dedup"),
            mb("base"),
        ]);
    }
    println!("{m}");
    if let Some(p) = r.dedup_of_warm.mean_pct {
        let per: Vec<String> = r
            .dedup_of_warm
            .per_function
            .iter()
            .map(|(f, v)| format!("{f} {v:.1}%"))
            .collect();
        println!(
            "dedup sandbox memory ÷ its function's warm PSS, as held: mean {p:.1}% over {} samples ({})",
            r.dedup_of_warm.n,
            per.join(", ")
        );
    }
    println!(
        "peak charged {:.1} MB; load at end: {}",
        r.peak_charged_mb, r.load_at_end
    );
    for f in &r.first_failures {
        println!(
            "FAILED {} at {:.0} s ({}): {}",
            f.function,
            f.at_s,
            f.start_kind.as_deref().unwrap_or("no record"),
            f.error
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedup_ratio_weighs_every_sample_and_sandbox_alike() {
        let mut r = DedupRatio::default();
        r.finish();
        assert_eq!((r.mean_pct, r.n), (None, 0));
        for p in [10.0, 20.0, 30.0] {
            r.add("a", p);
        }
        r.add("b", 60.0);
        r.finish();
        assert_eq!(r.n, 4);
        assert_eq!(r.mean_pct, Some(30.0));
        assert_eq!(r.per_function["a"], 20.0);
        assert_eq!(r.per_function["b"], 60.0);
    }

    #[test]
    fn gaps_cover_every_start_kind() {
        let mut rng = SplitMix64(7);
        let (mut short, mut mid, mut long, mut concurrent) = (0, 0, 0, 0);
        for _ in 0..1000 {
            let Step::Invoke { gap_s, n } = next_step(&mut rng, 3.0, 40.0);
            if n > 1 {
                concurrent += 1;
            }
            if gap_s < 3.0 {
                short += 1;
            } else if gap_s < 40.0 {
                mid += 1;
            } else {
                long += 1;
            }
        }
        assert!(
            short > 350 && mid > 380 && long > 60 && concurrent > 350,
            "{short} {mid} {long} {concurrent}"
        );
    }
}
