//! Live runs of a trace on an own platform instance, in the simulator's output format, and their
//! comparison with simulated runs (`medes demo`, `medes eval validate`).
//!
//! A live run starts a fresh single-node platform (its own data directory, cgroup and port)
//! with a memory budget and a policy knob, deploys the suite, replays the trace open-loop,
//! samples the controller's charged memory every second, stops the platform, and converts the
//! replay records into a [`SimOutput`], so `medes report` plots live and simulated runs alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use medes_core::StartKind;
use medes_policy::policies::{
    ClusterPolicy, FixedKeepAlive, Medes, MedesConfig, MedesMode, PredictConfig,
};
use medes_policy::{KnobMode, PolicyChoice, PolicySettings, StateKind};
use medes_sim::{
    ClusterConfig, Counters, FunctionProfile, InvocationRecord, MemorySample, Profile, SimConfig,
    SimOutput, SummaryBuilder, simulate,
};
use medes_trace::{RecipeConfig, Trace};
use medes_workload::replay::InvocationRecord as ReplayRecord;
use medes_workload::{Client, ClientConfig, Manifest, ReplayOptions};

use crate::config::MedesConfig as PlatformConfig;
use crate::platform::Platform;

/// The hold threshold of `medes-predict` (`PolicyUpdate::medes_predict`, the simulator's
/// `medes-predict`).
const PREDICT_HOLD: f64 = 0.9;

/// The two policies compared live, with timers scaled to a short trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timers {
    /// Idle period before Medes decides, s.
    pub idle_period_s: u64,
    /// Keep-alive (both policies), s.
    pub keep_alive_s: u64,
    /// Keep-dedup (Medes), s.
    pub keep_dedup_s: u64,
    /// Medes's memory-mode budget M0, MB; `None`: the node's budget.
    pub medes_m0_mb: Option<f64>,
    /// Medes live: release a base's process once its image is taken (the knob's
    /// `release_base_process`; the simulator does not model it).
    pub medes_release_base_process: bool,
    /// Medes as `medes-predict` (hold below 90% of the budget, pre-warming, Greedy-Dual
    /// eviction; `medes policy set --preset medes-predict`), live and simulated.
    pub medes_predict: bool,
}

impl Timers {
    /// The paper's timers (60 s / 10 min / 15 min) divided by `factor`.
    pub fn scaled(factor: f64) -> Timers {
        let f = factor.max(1.0);
        let s = |v: f64| ((v / f).round() as u64).max(1);
        Timers {
            idle_period_s: s(60.0),
            keep_alive_s: s(600.0),
            keep_dedup_s: s(900.0),
            medes_m0_mb: None,
            medes_release_base_process: false,
            medes_predict: false,
        }
    }
}

/// Which policy a live or simulated run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Fixed keep-alive, LRU eviction, no dedup.
    Fixed,
    /// Medes, memory mode (M0: [`Timers::medes_m0_mb`], else the node's budget).
    Medes,
}

impl Which {
    /// Both, in report order.
    pub const BOTH: [Which; 2] = [Which::Fixed, Which::Medes];

    /// The run's label.
    pub fn label(self, t: &Timers) -> String {
        match self {
            Which::Fixed => format!("fixed-{}s", t.keep_alive_s),
            Which::Medes if t.medes_predict => "medes-predict".into(),
            Which::Medes => "medes".into(),
        }
    }

    /// The live knob.
    pub fn settings(self, t: &Timers) -> PolicySettings {
        PolicySettings {
            policy: match self {
                Which::Fixed => PolicyChoice::KeepAlive,
                Which::Medes => PolicyChoice::Medes,
            },
            mode: KnobMode::Memory,
            budget_mb: t.medes_m0_mb,
            idle_period_s: Some(t.idle_period_s),
            keep_alive_s: Some(t.keep_alive_s),
            keep_dedup_s: Some(t.keep_dedup_s),
            release_base_process: self == Which::Medes && t.medes_release_base_process,
            hold_below: (self == Which::Medes && t.medes_predict).then_some(PREDICT_HOLD),
            predict: self == Which::Medes && t.medes_predict,
            greedy_dual: self == Which::Medes && t.medes_predict,
            ..PolicySettings::default()
        }
    }

    /// The simulator's policy (the same code's cluster form, same timers).
    pub fn sim_policy(
        self,
        t: &Timers,
        costs: Vec<medes_policy::policies::FunctionCosts>,
    ) -> Box<dyn ClusterPolicy> {
        match self {
            Which::Fixed => Box::new(FixedKeepAlive::new(t.keep_alive_s * 1000)),
            Which::Medes => Box::new(Medes::new(
                MedesConfig {
                    mode: MedesMode::Memory {
                        budget_mb: t.medes_m0_mb,
                    },
                    idle_period_ms: t.idle_period_s * 1000,
                    keep_alive_ms: t.keep_alive_s * 1000,
                    keep_dedup_ms: t.keep_dedup_s * 1000,
                    hold_below: t.medes_predict.then_some(PREDICT_HOLD),
                    predict: t.medes_predict.then(PredictConfig::default),
                    evict_greedy_dual: t.medes_predict,
                    ..MedesConfig::default()
                },
                costs,
            )),
        }
    }
}

/// A short trace of the ten suite functions: one real-looking window of `minutes` per function
/// (the paper's recipe on a synthetic Azure-2019-format day), rates between `min_per_hour` and
/// `max_per_hour` (after the recipe's ×5).
pub fn short_trace(
    minutes: u32,
    seed: u64,
    min_per_hour: f64,
    max_per_hour: f64,
) -> anyhow::Result<Trace> {
    let cfg = RecipeConfig {
        window_minutes: minutes.max(1),
        min_per_hour,
        max_per_hour,
        ..RecipeConfig::default()
    };
    let mut v = medes_sim::eval::patterns_with(1, seed, &cfg, 2000)
        .context("building the trace with the paper's recipe")?;
    v.pop().context("the recipe built no trace")
}

/// Where the suite lives (./functions, else the source tree's).
pub fn functions_dir() -> PathBuf {
    let local = PathBuf::from("functions");
    if local.join("manifest.toml").is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../functions")
}

/// Settings of one live run.
pub struct LiveSpec<'a> {
    /// The trace.
    pub trace: &'a Trace,
    /// The policy.
    pub which: Which,
    /// Timers.
    pub timers: Timers,
    /// The node's memory budget, MiB.
    pub budget_mb: u64,
    /// Parent of the instance's data directory.
    pub data_root: &'a Path,
    /// Progress bar.
    pub progress: bool,
}

fn state_mb(st: StateKind, charged: u64, m: &mut MemorySample) {
    let mb = charged as f64 / 1e6;
    match st {
        StateKind::Warm | StateKind::Running => m.warm_mb += mb,
        StateKind::Dedup | StateKind::Checkpointing => {
            m.dedup_mb += mb;
            m.dedup_sandboxes += 1;
        }
        StateKind::Base => m.base_mb += mb,
        _ => m.transient_mb += mb,
    }
}

/// Where a live instance's charged memory sits at one time, finer than [`MemorySample`]: a
/// base's process apart from its resident page image, and what no sandbox accounts for. MB
/// (10⁶ bytes), as the controller charges them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryBreakdown {
    /// Time since the replay started, ms.
    pub time_ms: u64,
    /// Everything charged on the node (the sum of the rest).
    pub used_mb: f64,
    /// Warm and running sandboxes that are not bases (PSS, capped at the limit).
    pub warm_mb: f64,
    /// Cold starts in progress (their memory limit, reserved until measured).
    pub starting_mb: f64,
    /// Dedup sandboxes: everything stored for them (patches, page table, non-page images).
    pub dedup_mb: f64,
    /// Checkpoints in progress (the process plus the image being written) and dedup starts
    /// in progress (the restored process's limit plus m_R).
    pub checkpoint_restore_mb: f64,
    /// Bases' processes (a base keeps serving warm starts).
    pub base_process_mb: f64,
    /// Bases' resident page images (what dedup sandboxes are patches against).
    pub base_image_mb: f64,
    /// Charged to no sandbox the controller lists: purges in progress, bases kept for dedup
    /// sandboxes after their process went, templates.
    pub other_mb: f64,
    /// Warm and running sandboxes (bases excluded).
    pub warm: usize,
    /// Dedup sandboxes.
    pub dedup: usize,
    /// Bases.
    pub bases: usize,
}

impl MemoryBreakdown {
    /// The breakdown of `sandboxes` with `used` charged in all.
    pub fn of(
        time_ms: u64,
        sandboxes: &[medes_controller::SandboxInfo],
        used_mb: f64,
    ) -> MemoryBreakdown {
        let mb = |b: u64| b as f64 / 1e6;
        let mut m = MemoryBreakdown {
            time_ms,
            used_mb,
            ..MemoryBreakdown::default()
        };
        for s in sandboxes {
            let charged = mb(s.charged.0);
            match s.state {
                StateKind::Warm | StateKind::Running => {
                    m.warm_mb += charged;
                    m.warm += 1;
                }
                StateKind::Starting => m.starting_mb += charged,
                StateKind::Dedup => {
                    m.dedup_mb += charged;
                    m.dedup += 1;
                }
                StateKind::Checkpointing | StateKind::Restoring => {
                    m.checkpoint_restore_mb += charged;
                }
                StateKind::Base => {
                    let image = s.image.map_or(0.0, |b| mb(b.0)).min(charged);
                    m.base_image_mb += image;
                    m.base_process_mb += charged - image;
                    m.bases += 1;
                }
                _ => m.other_mb += charged,
            }
        }
        let listed = m.warm_mb
            + m.starting_mb
            + m.dedup_mb
            + m.checkpoint_restore_mb
            + m.base_process_mb
            + m.base_image_mb
            + m.other_mb;
        m.other_mb += (used_mb - listed).max(0.0);
        m
    }

    /// The time-weighted mean of `samples` (each holds until the next; counts rounded).
    pub fn mean(samples: &[MemoryBreakdown]) -> MemoryBreakdown {
        let mut acc = MemoryBreakdown::default();
        let mut total = 0.0;
        let (mut warm, mut dedup, mut bases) = (0.0, 0.0, 0.0);
        for w in samples.windows(2) {
            let (s, dt) = (&w[0], w[1].time_ms.saturating_sub(w[0].time_ms) as f64);
            total += dt;
            acc.used_mb += s.used_mb * dt;
            acc.warm_mb += s.warm_mb * dt;
            acc.starting_mb += s.starting_mb * dt;
            acc.dedup_mb += s.dedup_mb * dt;
            acc.checkpoint_restore_mb += s.checkpoint_restore_mb * dt;
            acc.base_process_mb += s.base_process_mb * dt;
            acc.base_image_mb += s.base_image_mb * dt;
            acc.other_mb += s.other_mb * dt;
            warm += s.warm as f64 * dt;
            dedup += s.dedup as f64 * dt;
            bases += s.bases as f64 * dt;
        }
        if total <= 0.0 {
            return samples.last().copied().unwrap_or_default();
        }
        MemoryBreakdown {
            time_ms: total as u64,
            used_mb: acc.used_mb / total,
            warm_mb: acc.warm_mb / total,
            starting_mb: acc.starting_mb / total,
            dedup_mb: acc.dedup_mb / total,
            checkpoint_restore_mb: acc.checkpoint_restore_mb / total,
            base_process_mb: acc.base_process_mb / total,
            base_image_mb: acc.base_image_mb / total,
            other_mb: acc.other_mb / total,
            warm: (warm / total).round() as usize,
            dedup: (dedup / total).round() as usize,
            bases: (bases / total).round() as usize,
        }
    }
}

/// A live run: in the simulator's format (policy = `live-<label>`) and the replay's records.
pub struct LiveRun {
    /// Simulator format.
    pub output: SimOutput,
    /// The replay's own records (activation durations, init times).
    pub raw: Vec<ReplayRecord>,
    /// Memory by state, every second (empty when read back from a run written without it).
    pub breakdown: Vec<MemoryBreakdown>,
    /// The controller's dedup counters at the end of the replay.
    pub dedup: medes_controller::DedupStats,
    /// Every sandbox the controller listed, every second (empty when read back).
    pub sandboxes: Vec<SandboxRow>,
}

/// One sandbox as the controller listed it at one time (`sandboxes.csv` of a live run): what
/// it was charged, to compare with the simulator's per-function footprints.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    /// Time since the replay started, ms.
    pub time_ms: u64,
    /// The sandbox.
    pub id: String,
    /// Its function.
    pub action: String,
    /// Its state label.
    pub state: StateKind,
    /// Charged against the node's budget, MB.
    pub charged_mb: f64,
    /// Last measured PSS, MB (none until measured).
    pub measured_mb: Option<f64>,
    /// Invocations running in it.
    pub in_flight: u32,
}

/// Runs `spec.trace` live.
pub async fn run_live(spec: &LiveSpec<'_>) -> anyhow::Result<LiveRun> {
    let label = spec.which.label(&spec.timers);
    let pid = std::process::id();
    let mut cfg = PlatformConfig::default();
    cfg.data_dir = spec.data_root.join(format!("live-{label}"));
    if cfg.data_dir.exists() {
        std::fs::remove_dir_all(&cfg.data_dir)
            .with_context(|| format!("clearing {}", cfg.data_dir.display()))?;
    }
    cfg.api.listen = "127.0.0.1:0".parse()?;
    cfg.agent.sandbox.cgroup_name = format!("medes-live-{pid}");
    cfg.agent.sandbox.run_dir = format!("/run/medes/live-{pid}").into();
    cfg.controller.node_memory_budget_mb = spec.budget_mb;
    cfg.controller.policy = spec.which.settings(&spec.timers);
    cfg.finish();
    cfg.validate()?;
    let platform = Platform::start(cfg).await?;
    let result = drive(&platform, spec, &label).await;
    // The run's data dir is thrown away (cleared at the next run): so are its kept dedup stores.
    platform.stop_and_purge().await?;
    result
}

async fn drive(platform: &Platform, spec: &LiveSpec<'_>, label: &str) -> anyhow::Result<LiveRun> {
    let client = Client::new(&ClientConfig::new(
        platform.url.clone(),
        platform.auth.clone(),
    ))?;
    let dir = functions_dir();
    let manifest = Manifest::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let names = spec.trace.functions();
    for r in medes_workload::deploy(&client, &dir, &manifest, &names).await {
        if let Err(e) = r.result {
            anyhow::bail!("deploying {}: {}", r.name, medes_workload::error_chain(&e));
        }
    }
    // Memory sampler: the controller's charged memory by state, every second.
    let ctl = platform.controller.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let t0 = Instant::now();
    // Without a terminal the replay's progress bar is hidden: a line every 30 s instead.
    let lines = spec.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let total = spec.trace.len();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let mut m = MemorySample {
                    time_ms: t0.elapsed().as_millis() as u64,
                    used_mb: 0.0,
                    max_node_mb: 0.0,
                    warm_mb: 0.0,
                    dedup_mb: 0.0,
                    base_mb: 0.0,
                    transient_mb: 0.0,
                    sandboxes: 0,
                    dedup_sandboxes: 0,
                };
                let sandboxes = ctl.sandboxes();
                for s in &sandboxes {
                    m.sandboxes += 1;
                    state_mb(s.state, s.charged.0, &mut m);
                }
                m.used_mb = ctl.memory_used().iter().map(|b| b.0 as f64 / 1e6).sum();
                m.max_node_mb = m.used_mb;
                let b = MemoryBreakdown::of(m.time_ms, &sandboxes, m.used_mb);
                let rows: Vec<SandboxRow> = sandboxes
                    .iter()
                    .map(|s| SandboxRow {
                        time_ms: m.time_ms,
                        id: s.id.0.clone(),
                        action: s.action.to_string(),
                        state: s.state,
                        charged_mb: s.charged.0 as f64 / 1e6,
                        measured_mb: s.measured.map(|b| b.0 as f64 / 1e6),
                        in_flight: s.in_flight,
                    })
                    .collect();
                if lines && (m.time_ms / 1000).is_multiple_of(30) && m.time_ms >= 1000 {
                    let d = ctl.dedup_stats();
                    eprintln!(
                        "   [{:>3} s] {:.0} MB charged: {} warm {:.0} MB, {} dedup {:.0} MB, {} bases {:.0} MB; {} dedup starts, {} evictions so far (trace of {total})",
                        m.time_ms / 1000,
                        m.used_mb,
                        b.warm,
                        b.warm_mb,
                        b.dedup,
                        b.dedup_mb,
                        b.bases,
                        b.base_process_mb + b.base_image_mb,
                        d.dedup_starts,
                        ctl.evictions()
                    );
                }
                out.push((m, b, rows));
            }
            out
        })
    };
    let opts = ReplayOptions::default();
    let outcome = medes_workload::replay(&client, spec.trace, &opts, spec.progress).await;
    stop.cancel();
    let mut memory = Vec::new();
    let mut breakdown = Vec::new();
    let mut sandboxes = Vec::new();
    for (m, b, rows) in sampler.await.unwrap_or_default() {
        memory.push(m);
        breakdown.push(b);
        sandboxes.extend(rows);
    }
    let outcome = outcome.context("replaying the trace")?;
    let stats = platform.controller.dedup_stats();
    let counters = Counters {
        evictions: platform.controller.evictions(),
        dedup_ops: stats.dedups,
        bases: stats.bases,
        prewarms: stats.prewarms,
        ..Counters::default()
    };
    let output = to_sim_output(
        &format!("live-{label}"),
        spec.trace,
        &outcome.records,
        memory,
        spec.budget_mb as f64 * 1.048_576,
        counters,
    );
    Ok(LiveRun {
        output,
        raw: outcome.records,
        breakdown,
        dedup: stats,
        sandboxes,
    })
}

/// Writes a live run: the simulator-format directory plus `replay.json` (the raw records).
pub fn write_live(run: &LiveRun, dir: &Path) -> anyhow::Result<()> {
    write_run(&run.output, dir)?;
    let p = dir.join("replay.json");
    std::fs::write(&p, serde_json::to_vec(&run.raw)?)
        .with_context(|| format!("writing {}", p.display()))?;
    let p = dir.join("memory_breakdown.json");
    std::fs::write(&p, serde_json::to_vec(&run.breakdown)?)
        .with_context(|| format!("writing {}", p.display()))?;
    let p = dir.join("sandboxes.csv");
    std::fs::write(&p, sandboxes_csv(&run.sandboxes))
        .with_context(|| format!("writing {}", p.display()))?;
    let p = dir.join("dedup_stats.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&run.dedup)?)
        .with_context(|| format!("writing {}", p.display()))
}

/// Reads what [`write_live`] wrote (`replay.json` and `memory_breakdown.json` may be missing:
/// then no raw records, no breakdown; the dedup counters are not read back).
pub fn read_live(dir: &Path) -> anyhow::Result<LiveRun> {
    let output = SimOutput::read_dir(dir)
        .with_context(|| format!("reading the live run in {}", dir.display()))?;
    let p = dir.join("replay.json");
    let raw = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
        Err(_) => Vec::new(),
    };
    let p = dir.join("memory_breakdown.json");
    let breakdown = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
        Err(_) => Vec::new(),
    };
    let sandboxes = match std::fs::read_to_string(dir.join("sandboxes.csv")) {
        Ok(text) => parse_sandboxes(&text),
        Err(_) => Vec::new(),
    };
    Ok(LiveRun {
        output,
        raw,
        breakdown,
        dedup: medes_controller::DedupStats::default(),
        sandboxes,
    })
}

/// `sandboxes.csv`: a header line, then one line per row (MB to the kB).
fn sandboxes_csv(rows: &[SandboxRow]) -> String {
    let mut csv = String::from("time_ms,id,action,state,charged_mb,measured_mb,in_flight\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{:.3},{},{}\n",
            r.time_ms,
            r.id,
            r.action,
            r.state,
            r.charged_mb,
            r.measured_mb.map_or(String::new(), |m| format!("{m:.3}")),
            r.in_flight
        ));
    }
    csv
}

/// Parses `sandboxes.csv` (as [`write_live`] writes it); malformed rows are skipped.
fn parse_sandboxes(text: &str) -> Vec<SandboxRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let v: Vec<&str> = line.split(',').collect();
            if v.len() != 7 {
                return None;
            }
            Some(SandboxRow {
                time_ms: v[0].parse().ok()?,
                id: v[1].to_string(),
                action: v[2].to_string(),
                state: StateKind::ALL.into_iter().find(|k| k.as_str() == v[3])?,
                charged_mb: v[4].parse().ok()?,
                measured_mb: v[5].parse().ok(),
                in_flight: v[6].parse().ok()?,
            })
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Replay records as simulator records: end to end = the client's latency; execution = the
/// function's median warm-start activation duration (the simulator's execution times are fixed
/// per function too); startup = end to end − execution. Failed invocations are dropped.
pub fn to_sim_output(
    policy: &str,
    trace: &Trace,
    recs: &[medes_workload::replay::InvocationRecord],
    memory: Vec<MemorySample>,
    budget_mb: f64,
    counters: Counters,
) -> SimOutput {
    let names = trace.functions();
    let exec: Vec<f64> = names
        .iter()
        .map(|n| {
            median(
                recs.iter()
                    .filter(|r| &r.function == n && r.start_kind == "warm" && r.status == "success")
                    .filter_map(|r| r.duration_ms.map(|d| d as f64))
                    .collect(),
            )
            .unwrap_or(0.0)
        })
        .collect();
    let mut b = SummaryBuilder::new(&names);
    b.expect(trace.len() as u64);
    let mut records = Vec::new();
    for r in recs {
        if r.status != "success" || !r.latency_ms.is_finite() {
            continue;
        }
        let Some(f) = names.iter().position(|n| n == &r.function) else {
            continue;
        };
        let start = match r.start_kind.as_str() {
            "cold" => StartKind::Cold,
            "dedup" => StartKind::Dedup,
            "template" => StartKind::Template,
            _ => StartKind::Warm,
        };
        let rec = InvocationRecord {
            request: r.index as u32,
            function: f as u32,
            arrival_ms: r.scheduled_ms,
            start,
            startup_ms: (r.latency_ms - exec[f]).max(0.0),
            e2e_ms: r.latency_ms,
            node: 0,
        };
        b.add(&rec);
        records.push(rec);
    }
    let summary = b.finish(
        policy.to_string(),
        &memory,
        trace.duration_ms(),
        budget_mb,
        counters,
    );
    SimOutput {
        policy: policy.to_string(),
        functions: names,
        records,
        memory,
        summary,
    }
}

/// How the simulated node models the live one (see [`ClusterConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeModel {
    /// CPU cores (0: no CPU model).
    pub cores: usize,
    /// A cold start's reservation kept this long after its first invocation, ms.
    pub start_hold_ms: u64,
    /// Invocations waiting longer than this for memory are turned away, ms (0: no bound).
    pub admission_timeout_ms: u64,
}

/// The same trace in the simulator: one node with the live budget, the profile's costs and
/// the node model.
pub fn run_sim(
    trace: &Trace,
    profile: &Profile,
    which: Which,
    timers: &Timers,
    budget_mb: u64,
    model: NodeModel,
) -> anyhow::Result<SimOutput> {
    let names = trace.functions();
    let costs = profile
        .costs(&names)
        .with_context(|| format!("the profile lacks one of {names:?}"))?;
    let mut policy = which.sim_policy(timers, costs);
    let cluster = ClusterConfig {
        nodes: 1,
        node_mb: budget_mb as f64 * 1.048_576,
        // The live controller admits a new sandbox up to the whole budget (`make_room`), not
        // the paper scheduler's 95%.
        admit_fraction: 1.0,
        evict_idle_bases: true,
        cores: model.cores,
        start_hold_ms: model.start_hold_ms,
        admission_timeout_ms: model.admission_timeout_ms,
        ..ClusterConfig::paper(1.0)
    };
    let mut cfg = SimConfig::new(cluster);
    cfg.sample_ms = 1_000;
    let mut out = simulate(trace, profile, &mut policy, &cfg)?;
    out.policy = format!("sim-{}", which.label(timers));
    out.summary.policy = out.policy.clone();
    Ok(out)
}

/// Relative difference of `sim` from `live`, %.
pub fn diff_pct(live: f64, sim: f64) -> f64 {
    if live.abs() < 1e-9 {
        if sim.abs() < 1e-9 { 0.0 } else { 100.0 }
    } else {
        100.0 * (sim - live) / live
    }
}

/// Quantiles kept of a function's live execution times (every 2.5th percentile).
const EXEC_QUANTILES: usize = 40;

/// A profile calibrated from live runs' raw records (costs as they were under the replay's
/// load), memory figures from `base` (normally the measured profile): per function, execution =
/// the median activation duration of warm starts; cold start = the median `initTime` of cold
/// starts plus the median warm-start overhead (client latency − duration − `waitTime`: the
/// platform and HTTP); warm start = that overhead; dedup start = the median (duration −
/// execution) of dedup starts plus the overhead. Queueing for memory is left out (the
/// simulator models it): `waitTime` (arrival to grant, the wait for memory) is subtracted
/// from the overhead, and `initTime` and the activation's duration start after the grant.
/// Execution times keep their live spread (`exec_quantiles_ms`), and m_W is what the
/// controller charged measured warm sandboxes when the runs list them (`sandboxes.csv`).
pub fn calibrated_profile(live: &[LiveRun], base: &Profile) -> Profile {
    let mut p = base.clone();
    p.source = format!(
        "calibrated from the live runs' activations (execution, init, restore times under load); memory from {}",
        base.source
    );
    let all: Vec<&ReplayRecord> = live
        .iter()
        .flat_map(|r| r.raw.iter())
        .filter(|r| r.status == "success")
        .collect();
    for (name, f) in p.functions.iter_mut() {
        let of = |kind: &'static str| {
            all.iter()
                .filter(move |r| &r.function == name && r.start_kind == kind)
        };
        let durations: Vec<f64> = of("warm")
            .filter_map(|r| r.duration_ms.map(|d| d as f64))
            .collect();
        let Some(exec) = median(durations.clone()) else {
            continue;
        };
        let overhead = median(
            of("warm")
                .filter_map(|r| {
                    r.duration_ms
                        .map(|d| r.latency_ms - d as f64 - r.wait_ms.unwrap_or(0.0))
                })
                .filter(|v| v.is_finite() && *v >= 0.0)
                .collect(),
        )
        .unwrap_or(0.0);
        // Execution times as they were live, spread included (contention makes them vary
        // several-fold: linalg 15-78 ms from p10 to p99 at 512 MiB): the empirical
        // distribution, its mean as the policy's figure; the median below for restores.
        f.exec_quantiles_ms = FunctionProfile::quantiles_of(&durations, EXEC_QUANTILES);
        f.exec_ms = durations.iter().sum::<f64>() / durations.len() as f64;
        f.exec_cv = 0.0;
        f.warm_ms = overhead;
        if let Some(init) = median(of("cold").filter_map(|r| r.init_ms).collect()) {
            f.cold_ms = init + overhead;
        }
        if let Some(restore) = median(
            of("dedup")
                .filter_map(|r| r.duration_ms.map(|d| (d as f64 - exec).max(0.0)))
                .collect(),
        ) {
            f.dedup_ms = restore + overhead;
        }
        // m_W as the controller charged it: the median charge of the function's measured warm
        // sandboxes, sampled every second (PSS; 10-20% below the idle-machine bench's figure
        // on the suite, measured on vtrace2).
        let charged: Vec<f64> = live
            .iter()
            .flat_map(|r| r.sandboxes.iter())
            .filter(|s| {
                s.state == StateKind::Warm
                    && s.measured_mb.is_some()
                    && s.action.rsplit('/').next() == Some(name.as_str())
            })
            .map(|s| s.charged_mb)
            .collect();
        if let Some(m) = median(charged).filter(|m| m.is_finite() && *m > 0.0) {
            f.warm_mb = m;
            f.dedup_mb = f.dedup_mb.min(m);
        }
    }
    p
}

/// The profile with each suite function's memory limit as what its cold start reserves
/// (`start_mb`), as the live controller's admission does until the sandbox is measured.
pub fn with_limits(mut profile: Profile) -> anyhow::Result<Profile> {
    let dir = functions_dir();
    let manifest = Manifest::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    for (name, spec) in &manifest.functions {
        if let Some(f) = profile.functions.get_mut(name) {
            f.start_mb = spec.memory_mb as f64 * 1.048_576;
        }
    }
    Ok(profile)
}

/// Writes a run directory, returning it.
pub fn write_run(out: &SimOutput, dir: &Path) -> anyhow::Result<PathBuf> {
    out.write_dir(dir)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, latency: f64, duration: u64, init: Option<f64>, wait: f64) -> ReplayRecord {
        ReplayRecord {
            index: 0,
            function: "linalg".into(),
            scheduled_ms: 0,
            target_ms: 0.0,
            sent_ms: 0.0,
            lateness_ms: 0.0,
            latency_ms: latency,
            start_kind: kind.into(),
            status: "success".into(),
            http_status: Some(200),
            duration_ms: Some(duration),
            init_ms: init,
            wait_ms: Some(wait),
            activation_id: String::new(),
            error: String::new(),
        }
    }

    /// A live run of `linalg` alone: its raw records and sandbox listing, nothing simulated.
    fn linalg_run(raw: Vec<ReplayRecord>, sandboxes: Vec<SandboxRow>) -> LiveRun {
        LiveRun {
            output: SimOutput {
                policy: "live".into(),
                functions: vec!["linalg".into()],
                records: Vec::new(),
                memory: Vec::new(),
                summary: SummaryBuilder::new(&["linalg".to_string()]).finish(
                    "live".into(),
                    &[],
                    1,
                    1.0,
                    Counters::default(),
                ),
            },
            raw,
            breakdown: Vec::new(),
            dedup: medes_controller::DedupStats::default(),
            sandboxes,
        }
    }

    #[test]
    fn calibrated_costs_leave_out_the_wait_for_memory() {
        // Warm starts: 100 ms execution, 10 ms platform overhead, two of three waited for
        // memory (2 s, 5 s) before their grant. A cold start: 700 ms init, waited 3 s.
        let raw = vec![
            rec("warm", 110.0, 100, None, 0.0),
            rec("warm", 2_110.0, 100, None, 2_000.0),
            rec("warm", 5_110.0, 100, None, 5_000.0),
            rec("cold", 3_810.0, 800, Some(700.0), 3_000.0),
        ];
        let run = linalg_run(raw, Vec::new());
        let p = calibrated_profile(&[run], &Profile::paper());
        let f = &p.functions["linalg"];
        assert!((f.exec_ms - 100.0).abs() < 1e-9, "{}", f.exec_ms);
        assert!((f.warm_ms - 10.0).abs() < 1e-9, "{}", f.warm_ms);
        assert!((f.cold_ms - 710.0).abs() < 1e-9, "{}", f.cold_ms);
        // No sandbox listing: m_W stays the base profile's.
        assert_eq!(f.warm_mb, Profile::paper().functions["linalg"].warm_mb);
    }

    #[test]
    fn calibrated_memory_is_what_the_controller_charged_measured_warm_sandboxes() {
        let row = |t: u64, state: StateKind, charged: f64, measured: Option<f64>| SandboxRow {
            time_ms: t,
            id: "sb-1".into(),
            action: "/guest/linalg".into(),
            state,
            charged_mb: charged,
            measured_mb: measured,
            in_flight: 0,
        };
        // Its limit while starting and before its first measurement (left out), then 23-24 MB.
        let rows = vec![
            row(1_000, StateKind::Starting, 268.4, None),
            row(2_000, StateKind::Warm, 268.4, None),
            row(3_000, StateKind::Warm, 23.0, Some(23.0)),
            row(4_000, StateKind::Warm, 24.0, Some(24.0)),
            row(5_000, StateKind::Warm, 23.5, Some(23.5)),
            row(6_000, StateKind::Running, 40.0, Some(40.0)),
        ];
        let mut csv = sandboxes_csv(&rows);
        csv.push_str("garbage,row\n");
        assert_eq!(parse_sandboxes(&csv), rows);
        let run = linalg_run(vec![rec("warm", 110.0, 100, None, 0.0)], rows);
        let p = calibrated_profile(&[run], &Profile::paper());
        let f = &p.functions["linalg"];
        assert!((f.warm_mb - 23.5).abs() < 1e-9, "{}", f.warm_mb);
        assert!(f.dedup_mb <= f.warm_mb);
        p.validate().unwrap();
    }
}
