//! The Medes policy (MEDES.md §5.1–§5.2, the prototype's `DedupBoundaryHeuristic`).
//!
//! Every `idle_period` (60 s) an idle warm or dedup sandbox is decided on, per function:
//! - λ_max: the peak per-minute arrival count over the last `window_minutes` (10) minutes, per
//!   second. Buckets are keyed by the minute of the clock, so the window slides with time, not
//!   with arrivals (the prototype only closed buckets on arrivals);
//! - reuse periods R_W = (s̄_W + exec + 0.5 s), R_D = (s̄_D + exec + 0.5 s), with s̄ an EWMA
//!   (weight 0.1) of measured start latencies, seeded with the function's profiled latencies
//!   (the prototype seeded s̄_D with 300 ms);
//! - N = warm (running and starting included) + base + dedup sandboxes of the function,
//!   cluster-wide; c = R_W / R_D;
//! - load bound d_λ = (N − λ_max·R_W)/(1 − c);
//! - **latency mode** (P1, α): d_lat = (α·R_W·λ_max − N)/(s̄_D·c/s̄_W − 1); d_λ < 0 → keep warm;
//!   d_lat < 0 → purge; dedup while #dedup < min(d_lat, d_λ);
//! - **memory mode** (P2, budget M0): the function's share M_f = 0.95·M0·λ_f/Σλ_g;
//!   d_mem = (N − M_f/m_W)/b_f; d_mem < 0 → keep warm; d_mem > N → dedup; d_mem < d_λ → dedup
//!   while #dedup < d_mem; otherwise (infeasible) dedup aggressively;
//! - timers first: a warm sandbox idle ≥ keep-alive (10 min) is purged, a dedup sandbox idle ≥
//!   keep-dedup (15 min) is purged;
//! - base rule: while #dedup ≥ #base·T (T = 40), a warm sandbox is made a base; bases are kept
//!   for the whole run (never purged, never evicted). The count of bases is the real count
//!   (the prototype incremented a counter on every BASE answer, even when it failed);
//! - there is no policy-driven DEDUP → WARM: a dedup sandbox becomes warm only by serving.
//!
//! Eviction (by the caller, under pressure) takes the least recently used idle warm or dedup
//! sandbox of the most over-provisioned function: the highest (warm + dedup + base) / mean
//! arrival rate over the window.
//!
//! Two options go beyond the prototype, both off by default (measured in the simulator on the
//! evaluation workload, `docs/EVALUATION.md`):
//! - `dedup_at_keep_alive`: at keep-alive expiry a warm sandbox is deduplicated (and kept until
//!   keep-dedup) instead of purged. Measured: about 5% fewer cold starts than the prototype's
//!   rule for about 2% more memory (`medes-dka` in the report);
//! - `pressure_watermark`: idle warm sandboxes of a node above the watermark are deduplicated
//!   at once (least recently used first). Measured: *more* cold starts and evictions at the
//!   20 GB pool, because every dedup start on a full node needs room for the restore (m_R) and
//!   evicts for it; so it stays off.

use std::collections::{BTreeMap, VecDeque};

use medes_core::StartKind;
use serde::{Deserialize, Serialize};

use super::{
    AfterRun, ClusterPolicy, FleetView, FnId, FunctionCosts, FunctionCounts, IdleSandbox,
    IdleState, Verdict,
};
use crate::Timestamp;

const MINUTE_MS: u64 = 60_000;

/// The operator's knob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum MedesMode {
    /// P1: keep the average start latency ≤ α·s̄_W, minimise memory.
    Latency {
        /// The latency factor α (> 1; the paper: 2.5).
        alpha: f64,
    },
    /// P2: keep memory under the budget, minimise latency.
    Memory {
        /// The budget M0 in MB; `None`: the cluster's memory budget.
        budget_mb: Option<f64>,
    },
}

/// Parameters of the Medes policy (defaults: the paper's and the prototype's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MedesConfig {
    /// The global knob.
    pub mode: MedesMode,
    /// Per-function knobs overriding `mode`, by function name.
    #[serde(default)]
    pub per_function: BTreeMap<String, MedesMode>,
    /// Decision interval for idle sandboxes, ms.
    pub idle_period_ms: u64,
    /// Warm keep-alive, ms.
    pub keep_alive_ms: u64,
    /// Keep-dedup, ms.
    pub keep_dedup_ms: u64,
    /// Buffer added to reuse periods, ms.
    pub reuse_ms: f64,
    /// λ_max window in minutes.
    pub window_minutes: u64,
    /// T: one more base per function while #dedup ≥ #base·T.
    pub dedup_per_base: usize,
    /// EWMA weight of the newest start latency.
    pub ewma_weight: f64,
    /// Share of the budget the policy plans with (0.95).
    pub budget_fraction: f64,
    /// At keep-alive expiry, deduplicate a warm sandbox (kept until keep-dedup) instead of
    /// purging it. The prototype purges (`false`); see the crate docs for the measurement.
    #[serde(default)]
    pub dedup_at_keep_alive: bool,
    /// Deduplicate idle warm sandboxes (least recently used first) of a node fuller than this
    /// share of its budget, without waiting for their idle period. The prototype has no such
    /// rule (`None`); see the crate docs for the measurement.
    #[serde(default)]
    pub pressure_watermark: Option<f64>,
    /// Smallest idle time before a sandbox may be deduplicated under pressure, ms.
    #[serde(default)]
    pub pressure_min_idle_ms: u64,
    /// Memory mode with an explicit budget: the budget is this function's own (a per-function
    /// knob) rather than the cluster's split by arrival rate. Default false.
    #[serde(default)]
    pub own_budget: bool,
    /// Memory mode: while the cluster uses less than this share of its budget, the timers do
    /// not destroy: a warm sandbox past keep-alive is deduplicated (kept warm if dedup saves
    /// nothing) and a dedup sandbox past keep-dedup is kept; eviction under pressure removes
    /// them in the policy's order. The prototype purges on the timers regardless (`None`).
    #[serde(default)]
    pub hold_below: Option<f64>,
    /// Eviction by value instead of the prototype's over-provisioning order: the idle sandbox
    /// with the lowest expected saving per MB freed goes first, i.e. mean arrival rate × (cold
    /// start − its own start latency) ÷ the memory it holds (m_D for a dedup sandbox, m_W for a
    /// warm one); least recently used among equals. Default false (the prototype's order).
    #[serde(default)]
    pub evict_by_value: bool,
    /// Arrival prediction (`medes-predict`): keep the function's live sandboxes (warm, running,
    /// starting, dedup and bases) at least at the concurrency its recent arrival rate needs,
    /// pre-warming the difference off the request path. `None` (the default, the paper's
    /// Medes): no pre-warming.
    #[serde(default)]
    pub predict: Option<PredictConfig>,
    /// Eviction in Greedy-Dual order (FaasCache) with dedup as the cheaper state: an idle
    /// sandbox's priority is the clock when it last served plus the function's invocation
    /// count × the start time it saves (the function's cold start minus its own warm or dedup
    /// start) ÷ the memory it holds (m_W, or m_D deduplicated); the lowest goes first and the
    /// clock becomes its priority. With template starts on, least recently used first (a kept
    /// sandbox then saves only a template start: measured better, docs/EVALUATION.md). Default
    /// false (the prototype's over-provisioning order).
    #[serde(default)]
    pub evict_greedy_dual: bool,
    /// Live controller only: the fraction of m_W a dedup is assumed to save (b_f) until a dedup
    /// of the function has been measured and no profiled cost is known. Default 0.5; 0 makes an
    /// unmeasured function never deduplicated (besides its base).
    #[serde(default = "default_assumed_saving")]
    pub assumed_saving: f64,
    /// Bases on demand: a warm sandbox is made a base only when it would otherwise be
    /// deduplicated (its tentative verdict is DEDUP) and the function has too few bases for its
    /// dedup sandboxes. The prototype makes every function's first idle sandbox a base at its
    /// first decision, and lets the base rule override a tentative PURGE (`false`). A base costs
    /// its page image on top of the sandbox and, pinned, its sandbox too: a function that never
    /// deduplicates pays that for nothing (measured, docs/EVALUATION.md).
    #[serde(default)]
    pub bases_on_demand: bool,
    /// With `bases_on_demand`: what a function's first base costs, in warm footprints m_W (its
    /// pinned sandbox plus its page image: 2). It is made only when its candidates (dedup and
    /// idle warm sandboxes) × the dedup saving b_f reach this; otherwise the sandbox stays warm
    /// (and is purged at keep-dedup, as `dedup_at_keep_alive` would after a dedup).
    #[serde(default = "default_base_cost")]
    pub base_cost_factor: f64,
    /// Base retirement: a base with no dependents (no dedup sandbox may reference its pages)
    /// that has been idle for the keep-dedup period (as long as a dedup sandbox is kept) is
    /// purged (unless memory is held, `hold_below`). The prototype keeps bases for the whole
    /// run (`false`).
    #[serde(default)]
    pub retire_bases: bool,
}

fn default_assumed_saving() -> f64 {
    0.5
}

fn default_base_cost() -> f64 {
    2.0
}

/// Settings of Medes's arrival prediction ([`MedesConfig::predict`]).
///
/// The rate estimate λ̂ of a function is the largest per-second arrival count over the last
/// `window_s` seconds (the current, partial second included, so a burst is seen while it
/// builds). By Little's law the function needs λ̂ × (s̄_W + exec) sandboxes busy at once; the
/// target is that plus `z`·√ of it (Poisson headroom), rounded up. Whenever the function has
/// fewer live sandboxes than the target (counting the ones starting and the deduplicated
/// ones, which serve as dedup starts), the difference is pre-warmed, at most `max_batch` per
/// call, and only while the cluster uses less than `max_used` of its budget. Pre-warmed
/// sandboxes are then ordinary idle sandboxes under Medes's rules (deduplicated when idle).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PredictConfig {
    /// Window of the rate estimate, s.
    pub window_s: u64,
    /// Headroom in standard deviations (Poisson: √ of the need).
    pub z: f64,
    /// Largest number of pre-warms per call.
    pub max_batch: usize,
    /// No pre-warm while the cluster uses this share of its budget or more.
    pub max_used: f64,
}

impl Default for PredictConfig {
    fn default() -> Self {
        PredictConfig {
            window_s: 10,
            z: 1.0,
            max_batch: 64,
            max_used: 0.9,
        }
    }
}

/// Per-second arrival counts over a short sliding window (for [`PredictConfig`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecondWindow {
    buckets: VecDeque<(u64, u32)>,
}

impl SecondWindow {
    /// Counts one arrival at `now`.
    pub fn add(&mut self, now: Timestamp) {
        let sec = now.0 / 1000;
        match self.buckets.back_mut() {
            Some((b, c)) if *b == sec => *c = c.saturating_add(1),
            _ => self.buckets.push_back((sec, 1)),
        }
    }

    /// The largest per-second count in the `window_s` seconds ending at `now` (current second
    /// included), per second; drops older buckets.
    pub fn peak(&mut self, now: Timestamp, window_s: u64) -> f64 {
        let cur = now.0 / 1000;
        while let Some(&(b, _)) = self.buckets.front() {
            if b + window_s.max(1) <= cur {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
        f64::from(self.buckets.iter().map(|&(_, c)| c).max().unwrap_or(0))
    }
}

impl Default for MedesConfig {
    fn default() -> Self {
        MedesConfig {
            mode: MedesMode::Memory { budget_mb: None },
            per_function: BTreeMap::new(),
            idle_period_ms: 60_000,
            keep_alive_ms: 600_000,
            keep_dedup_ms: 900_000,
            dedup_at_keep_alive: false,
            pressure_watermark: None,
            pressure_min_idle_ms: 10_000,
            own_budget: false,
            hold_below: None,
            evict_by_value: false,
            predict: None,
            evict_greedy_dual: false,
            assumed_saving: default_assumed_saving(),
            bases_on_demand: false,
            base_cost_factor: default_base_cost(),
            retire_bases: false,
            reuse_ms: 500.0,
            window_minutes: 10,
            dedup_per_base: 40,
            ewma_weight: 0.1,
            budget_fraction: 0.95,
        }
    }
}

/// Per-minute arrival counts over a sliding window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LambdaWindow {
    buckets: VecDeque<(u64, u32)>,
}

impl LambdaWindow {
    /// Counts one arrival at `now`.
    pub fn add(&mut self, now: Timestamp) {
        let m = now.0 / MINUTE_MS;
        match self.buckets.back_mut() {
            Some((bm, c)) if *bm == m => *c += 1,
            _ => self.buckets.push_back((m, 1)),
        }
    }

    /// Drops buckets older than `window` minutes before `now`.
    pub fn prune(&mut self, now: Timestamp, window: u64) {
        let cur = now.0 / MINUTE_MS;
        while let Some(&(m, _)) = self.buckets.front() {
            if m + window <= cur {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn in_window(&self, now: Timestamp, window: u64) -> impl Iterator<Item = u32> + '_ {
        let cur = now.0 / MINUTE_MS;
        self.buckets
            .iter()
            .filter(move |&&(m, _)| m + window > cur && m <= cur)
            .map(|&(_, c)| c)
    }

    /// λ_max: the largest per-minute count in the window ending at `now`, per second.
    pub fn lambda_max(&self, now: Timestamp, window: u64) -> f64 {
        f64::from(self.in_window(now, window).max().unwrap_or(0)) / 60.0
    }

    /// Mean rate over the window, per second.
    pub fn mean_rate(&self, now: Timestamp, window: u64) -> f64 {
        let n: u64 = self.in_window(now, window).map(u64::from).sum();
        n as f64 / (window.max(1) * 60) as f64
    }
}

#[derive(Debug, Clone, PartialEq)]
struct FnState {
    lambda: LambdaWindow,
    /// Invocations so far.
    arrivals: u64,
    recent: SecondWindow,
    s_w: f64,
    s_d: f64,
}

/// The numbers behind one decision (for tests, logs and the report).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MedesTrace {
    /// λ_max, per second.
    pub lambda_max: f64,
    /// N.
    pub n: usize,
    /// Current dedup sandboxes of the function.
    pub n_dedup: usize,
    /// R_W, s.
    pub r_w: f64,
    /// R_D, s.
    pub r_d: f64,
    /// Largest D meeting the load.
    pub d_lambda: f64,
    /// Latency mode: largest D meeting the latency target.
    pub d_lat: Option<f64>,
    /// Memory mode: smallest D fitting the budget share.
    pub d_mem: Option<f64>,
    /// Memory mode: the function's budget share, MB.
    pub share_mb: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
}

/// The Medes policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Medes {
    cfg: MedesConfig,
    costs: Vec<FunctionCosts>,
    modes: Vec<MedesMode>,
    fns: Vec<FnState>,
    /// Greedy-Dual clock ([`MedesConfig::evict_greedy_dual`]).
    clock: crate::evict::GreedyDualClock,
    /// Live controller ([`crate::Policy`]): recent arrivals per function for the prediction.
    live_recent: BTreeMap<medes_core::ActionName, SecondWindow>,
}

impl Medes {
    /// A policy for the functions in `costs`.
    pub fn new(cfg: MedesConfig, costs: Vec<FunctionCosts>) -> Self {
        let modes = costs
            .iter()
            .map(|c| cfg.per_function.get(&c.name).copied().unwrap_or(cfg.mode))
            .collect();
        let fns = costs
            .iter()
            .map(|c| FnState {
                lambda: LambdaWindow::default(),
                arrivals: 0,
                recent: SecondWindow::default(),
                s_w: c.warm_ms.max(0.0),
                s_d: c.dedup_ms.max(0.0),
            })
            .collect();
        Medes {
            cfg,
            costs,
            modes,
            fns,
            clock: crate::evict::GreedyDualClock::default(),
            live_recent: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MedesConfig {
        &self.cfg
    }

    /// λ_max of `f` at `now`, per second.
    pub fn lambda_max(&self, f: FnId, now: Timestamp) -> f64 {
        self.fns
            .get(f)
            .map_or(0.0, |s| s.lambda.lambda_max(now, self.cfg.window_minutes))
    }

    /// Whether `f`'s memory-mode budget is its own (not split with other functions).
    fn own_budget(&self, f: FnId) -> bool {
        self.cfg.own_budget
            && matches!(
                self.modes.get(f),
                Some(MedesMode::Memory { budget_mb: Some(_) })
            )
    }

    /// The EWMA warm and dedup start latencies of `f`, ms.
    pub fn start_latencies(&self, f: FnId) -> Option<(f64, f64)> {
        self.fns.get(f).map(|s| (s.s_w, s.s_d))
    }

    /// The decision for an idle sandbox with the numbers behind it (no state change).
    pub fn explain(
        &self,
        f: FnId,
        sb: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> MedesTrace {
        let (Some(c), Some(st)) = (self.costs.get(f), self.fns.get(f)) else {
            return MedesTrace::keep();
        };
        let counts = view.counts.get(f).copied().unwrap_or_default();
        let w = self.cfg.window_minutes;
        let inputs = MedesInputs {
            state: sb.state,
            idle_ms: now.since(sb.idle_since),
            blacklisted: sb.blacklisted,
            dependents: sb.dependents,
            lambda_max: st.lambda.lambda_max(now, w),
            lambda_sum: if self.own_budget(f) {
                st.lambda.lambda_max(now, w)
            } else {
                self.fns.iter().map(|s| s.lambda.lambda_max(now, w)).sum()
            },
            functions: if self.own_budget(f) {
                1
            } else {
                self.fns.len()
            },
            n_warm: counts.warm_like(),
            n_idle_warm: counts.warm,
            n_dedup: counts.dedup_like(),
            // With template starts, a node's template is the function's first base there.
            n_base: counts.base + counts.templates,
            s_w_ms: st.s_w,
            s_d_ms: st.s_d,
            exec_ms: c.exec_ms,
            warm_mb: c.warm_mb,
            // A dedup start that is no faster than a template start saves nothing: a template
            // start needs no memory while idle and less to start (m_W, not m_W − m_D + m_R).
            saving: match c.template_ms {
                Some(t) if counts.templates > 0 && t <= st.s_d => 0.0,
                _ => c.dedup_saving(),
            },
            budget_mb: view.budget_mb,
            used_mb: view.used_mb,
        };
        let mode = self.modes.get(f).copied().unwrap_or(self.cfg.mode);
        decide(&self.cfg, mode, &inputs)
    }
}

/// Everything one Medes decision depends on (plain numbers, so the live controller and the
/// simulator can feed it from their own statistics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MedesInputs {
    /// The sandbox's state.
    pub state: IdleState,
    /// How long it has been idle (since it last served), ms.
    pub idle_ms: u64,
    /// Never to be made dedup or base.
    pub blacklisted: bool,
    /// For a base: dedup sandboxes that may reference its pages (it is never retired while
    /// any remain).
    pub dependents: usize,
    /// λ_max of the function, per second.
    pub lambda_max: f64,
    /// Σ of λ_max over all functions, per second.
    pub lambda_sum: f64,
    /// Number of functions sharing the budget.
    pub functions: usize,
    /// Warm sandboxes of the function (running and starting included, bases excluded).
    pub n_warm: usize,
    /// Of which idle (the candidates for deduplication).
    pub n_idle_warm: usize,
    /// Dedup sandboxes (in progress included).
    pub n_dedup: usize,
    /// Bases.
    pub n_base: usize,
    /// EWMA warm-start latency, ms.
    pub s_w_ms: f64,
    /// EWMA dedup-start latency, ms.
    pub s_d_ms: f64,
    /// Execution time, ms.
    pub exec_ms: f64,
    /// m_W, MB.
    pub warm_mb: f64,
    /// b_f: the fraction of m_W that dedup saves.
    pub saving: f64,
    /// The cluster budget, MB (used when the mode names none).
    pub budget_mb: f64,
    /// Memory charged in the cluster now, MB.
    pub used_mb: f64,
}

impl MedesTrace {
    fn keep() -> Self {
        MedesTrace {
            lambda_max: 0.0,
            n: 0,
            n_dedup: 0,
            r_w: 0.0,
            r_d: 0.0,
            d_lambda: 0.0,
            d_lat: None,
            d_mem: None,
            share_mb: None,
            verdict: Verdict::Keep,
        }
    }
}

/// The Medes decision rules (MEDES.md §5.2) for one idle sandbox, with the numbers behind them.
pub fn decide(cfg: &MedesConfig, mode: MedesMode, i: &MedesInputs) -> MedesTrace {
    let lambda = if i.lambda_max.is_finite() {
        i.lambda_max.max(0.0)
    } else {
        0.0
    };
    let n = i.n_warm + i.n_base + i.n_dedup;
    let reuse = i.exec_ms.max(0.0) + cfg.reuse_ms;
    let s_w = i.s_w_ms.max(0.0);
    let r_w = (s_w + reuse) / 1000.0;
    let r_d = ((i.s_d_ms.max(0.0) + reuse) / 1000.0).max(r_w + 1e-6);
    let ratio = r_w / r_d;
    let nf = n as f64;
    let nd = i.n_dedup as f64;
    let d_lambda = (nf - lambda * r_w) / (1.0 - ratio);
    let mut out = MedesTrace {
        lambda_max: lambda,
        n,
        n_dedup: i.n_dedup,
        r_w,
        r_d,
        d_lambda,
        d_lat: None,
        d_mem: None,
        share_mb: None,
        verdict: Verdict::Keep,
    };

    // Timers first (held back while memory is plentiful, with `hold_below`).
    let hold = matches!(mode, MedesMode::Memory { .. })
        && cfg.hold_below.is_some_and(|h| {
            i.budget_mb > 0.0 && i.used_mb.is_finite() && i.used_mb < h * i.budget_mb
        });
    let tentative = if i.state == IdleState::Base {
        // A base outlives the timers unless it may retire: no dependents, idle for the
        // keep-dedup period (as long as a dedup sandbox is kept), memory not held.
        if cfg.retire_bases && !hold && i.dependents == 0 && i.idle_ms >= cfg.keep_dedup_ms {
            Verdict::Purge
        } else {
            Verdict::Keep
        }
    } else if hold && i.state == IdleState::Warm && i.idle_ms >= cfg.keep_alive_ms {
        if i.saving.is_finite() && i.saving >= 1e-3 && !i.blacklisted {
            Verdict::Dedup
        } else {
            Verdict::Keep
        }
    } else if hold && i.state == IdleState::Dedup {
        Verdict::Keep
    } else if i.state == IdleState::Warm && i.idle_ms >= cfg.keep_alive_ms {
        if cfg.dedup_at_keep_alive
            && i.saving.is_finite()
            && i.saving >= 1e-3
            && i.idle_ms < cfg.keep_dedup_ms
        {
            Verdict::Dedup
        } else {
            Verdict::Purge
        }
    } else if i.state == IdleState::Dedup {
        if i.idle_ms >= cfg.keep_dedup_ms {
            Verdict::Purge
        } else {
            Verdict::Keep
        }
    } else {
        match mode {
            MedesMode::Latency { alpha } => {
                let frac = i.s_d_ms.max(0.0) * ratio / s_w.max(1e-3) - 1.0;
                let d_lat = if frac > 0.0 {
                    (alpha * r_w * lambda - nf) / frac
                } else {
                    f64::INFINITY
                };
                out.d_lat = Some(d_lat);
                if d_lambda < 0.0 {
                    Verdict::Keep
                } else if d_lat < 0.0 {
                    Verdict::Purge
                } else if nd < d_lat.min(d_lambda) {
                    Verdict::Dedup
                } else {
                    Verdict::Keep
                }
            }
            MedesMode::Memory { budget_mb } => {
                let budget = budget_mb.unwrap_or(i.budget_mb).max(0.0);
                let share = if i.lambda_sum > 0.0 {
                    (lambda / i.lambda_sum).min(1.0)
                } else {
                    1.0 / i.functions.max(1) as f64
                };
                let m_f = cfg.budget_fraction * budget * share;
                out.share_mb = Some(m_f);
                let b = if i.saving.is_finite() {
                    i.saving.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                if b < 1e-3 || i.warm_mb <= 0.0 {
                    // Deduplication would save nothing.
                    Verdict::Keep
                } else {
                    let d_mem = (nf - m_f / i.warm_mb) / b;
                    out.d_mem = Some(d_mem);
                    if d_mem < 0.0 {
                        Verdict::Keep
                    } else if d_mem > nf {
                        Verdict::Dedup
                    } else if d_mem < d_lambda {
                        if nd < d_mem {
                            Verdict::Dedup
                        } else {
                            Verdict::Keep
                        }
                    } else {
                        // Infeasible: deduplicate aggressively.
                        Verdict::Dedup
                    }
                }
            }
        }
    };

    // Overrides.
    out.verdict = match i.state {
        IdleState::Base => tentative,
        // A base serves dedup sandboxes: none while deduplication would save nothing (with
        // template starts no faster than a dedup start, the template is the base).
        IdleState::Warm
            if !i.blacklisted
                && i.saving.is_finite()
                && i.saving >= 1e-3
                && i.n_dedup >= i.n_base * cfg.dedup_per_base.max(1)
                && (!cfg.bases_on_demand || tentative == Verdict::Dedup) =>
        {
            // On demand, a function's first base must pay for itself: its candidates (dedup
            // sandboxes and idle warm ones) must save more than the base holds.
            let candidates = (i.n_dedup + i.n_idle_warm) as f64;
            if cfg.bases_on_demand
                && i.n_base == 0
                && candidates * i.saving < cfg.base_cost_factor.max(0.0)
            {
                Verdict::Keep
            } else {
                Verdict::MakeBase
            }
        }
        IdleState::Dedup if tentative == Verdict::Dedup => Verdict::Keep,
        _ if i.blacklisted && tentative == Verdict::Dedup => Verdict::Keep,
        _ => tentative,
    };
    out
}

impl ClusterPolicy for Medes {
    fn name(&self) -> String {
        "medes".into()
    }

    fn dedups(&self) -> bool {
        true
    }

    fn on_arrival(&mut self, f: FnId, now: Timestamp) {
        if let Some(s) = self.fns.get_mut(f) {
            s.lambda.add(now);
            s.arrivals += 1;
            if self.cfg.predict.is_some() {
                s.recent.add(now);
            }
        }
    }

    fn prewarm(&mut self, f: FnId, view: &FleetView<'_>, now: Timestamp) -> usize {
        let Some(p) = self.cfg.predict else { return 0 };
        if !(view.budget_mb > 0.0 && view.used_mb < p.max_used * view.budget_mb) {
            return 0;
        }
        let (Some(c), Some(st)) = (self.costs.get(f), self.fns.get_mut(f)) else {
            return 0;
        };
        let rate = st.recent.peak(now, p.window_s);
        if rate <= 0.0 {
            return 0;
        }
        let need = rate * (st.s_w.max(0.0) + c.exec_ms.max(0.0)) / 1000.0;
        let target = (need + p.z.max(0.0) * need.sqrt()).ceil();
        let have = view.counts.get(f).map_or(0, FunctionCounts::total) as f64;
        if target.is_finite() && target > have {
            ((target - have) as usize).min(p.max_batch)
        } else {
            0
        }
    }

    fn on_start(&mut self, f: FnId, kind: StartKind, latency_ms: f64, _now: Timestamp) {
        let a = self.cfg.ewma_weight.clamp(0.0, 1.0);
        let Some(s) = self.fns.get_mut(f) else { return };
        if !latency_ms.is_finite() || latency_ms < 0.0 {
            return;
        }
        match kind {
            StartKind::Warm => s.s_w = a * latency_ms + (1.0 - a) * s.s_w,
            StartKind::Dedup => s.s_d = a * latency_ms + (1.0 - a) * s.s_d,
            _ => {}
        }
    }

    fn on_finish(&mut self, _f: FnId, _now: Timestamp) -> AfterRun {
        AfterRun {
            score: self.clock.value(),
            ..AfterRun::default()
        }
    }

    fn next_decision(&self, _f: FnId, sb: &IdleSandbox, now: Timestamp) -> Option<Timestamp> {
        if sb.state == IdleState::Base && !self.cfg.retire_bases {
            return None;
        }
        // The next multiple of the idle period after `idle_since` that is later than `now`.
        let p = self.cfg.idle_period_ms.max(1);
        let k = now.since(sb.idle_since) / p + 1;
        Some(sb.idle_since.plus_ms(k.saturating_mul(p)))
    }

    fn decide(
        &mut self,
        f: FnId,
        sb: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        self.explain(f, sb, view, now).verdict
    }

    fn evict_rank(&self, f: FnId, sb: &IdleSandbox, view: &FleetView<'_>, now: Timestamp) -> f64 {
        let counts = view.counts.get(f).copied().unwrap_or_default();
        let rate = self
            .fns
            .get(f)
            .map_or(0.0, |s| s.lambda.mean_rate(now, self.cfg.window_minutes));
        if self.cfg.evict_greedy_dual
            && let (Some(c), Some(st)) = (self.costs.get(f), self.fns.get(f))
        {
            let (own, mb) = match sb.state {
                IdleState::Dedup => (st.s_d, c.dedup_mb),
                _ => (st.s_w, c.warm_mb),
            };
            // The ranking the live controller uses too (`crate::evict`).
            return crate::evict::greedy_dual_rank(&crate::evict::GreedyDualInput {
                clock_at_use: sb.score,
                arrivals: st.arrivals,
                cold_ms: c.cold_ms,
                own_start_ms: own,
                held_mb: mb,
                template_starts: c.template_ms.is_some(),
                last_used: sb.idle_since,
            });
        }
        if self.cfg.evict_by_value
            && let (Some(c), Some(st)) = (self.costs.get(f), self.fns.get(f))
        {
            let (start, mb) = match sb.state {
                IdleState::Dedup => (st.s_d, c.dedup_mb),
                _ => (st.s_w, c.warm_mb),
            };
            let saved = (c.cold_ms - start).max(0.0);
            return rate * saved / mb.max(1.0);
        }
        let held = (counts.warm + counts.dedup_like() + counts.base) as f64;
        // Most over-provisioned first: the lowest rank.
        -(held / (rate + 1e-3))
    }

    fn on_evicted(&mut self, _f: FnId, rank: f64) {
        if self.cfg.evict_greedy_dual {
            self.clock.on_evicted(rank);
        }
    }

    fn tick(&mut self, now: Timestamp) {
        let w = self.cfg.window_minutes;
        for s in &mut self.fns {
            s.lambda.prune(now, w);
        }
    }

    fn pressure_watermark(&self) -> Option<f64> {
        self.cfg.pressure_watermark
    }

    fn on_pressure(
        &mut self,
        f: FnId,
        sb: &IdleSandbox,
        _view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        let worth = self.costs.get(f).is_some_and(|c| c.dedup_saving() >= 1e-3);
        if self.cfg.pressure_watermark.is_some()
            && sb.state == IdleState::Warm
            && !sb.blacklisted
            && worth
            && now.since(sb.idle_since) >= self.cfg.pressure_min_idle_ms
        {
            Verdict::Dedup
        } else {
            Verdict::Keep
        }
    }
}

/// The live controller's interface: the same rules, fed from the caller's views
/// ([`crate::FunctionView`]: λ_max from its arrival window, EWMA start latencies, footprints;
/// [`crate::ClusterView`]: the budget and Σλ_max). Unknown latencies fall back to the function's
/// profiled costs when the policy was built with them, else to the prototype's defaults
/// (dedup start 300 ms; warm start 10 ms); an unknown dedup footprint is assumed to save
/// [`MedesConfig::assumed_saving`] of m_W until the first dedup of the function measures it.
/// With [`MedesConfig::predict`] it pre-warms on its 1 s timer as the cluster form does
/// ([`ClusterPolicy::prewarm`]). With [`MedesConfig::evict_greedy_dual`] it asks the controller
/// for the Greedy-Dual eviction order ([`crate::Policy::eviction_order`]), the same ranking
/// ([`crate::greedy_dual_rank`]) with the aging clock kept per node by the controller.
impl crate::Policy for Medes {
    fn name(&self) -> &'static str {
        "medes"
    }

    fn on_arrival(&mut self, function: &crate::FunctionView, now: Timestamp) {
        if self.cfg.predict.is_some() {
            self.live_recent
                .entry(function.name.clone())
                .or_default()
                .add(now);
        }
    }

    fn tick_ms(&self) -> Option<u64> {
        self.cfg.predict.map(|_| 1_000)
    }

    fn on_tick(
        &mut self,
        cluster: &crate::ClusterView,
        functions: &[crate::FunctionView],
        now: Timestamp,
    ) -> Vec<crate::Prewarm> {
        let Some(p) = self.cfg.predict else {
            return Vec::new();
        };
        let mb = |b: medes_core::Bytes| b.0 as f64 / (1024.0 * 1024.0);
        let (budget, used) = (mb(cluster.budget), mb(cluster.used));
        if !(budget > 0.0 && used < p.max_used * budget) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for f in functions {
            let Some(w) = self.live_recent.get_mut(&f.name) else {
                continue;
            };
            let rate = w.peak(now, p.window_s);
            let known = self.costs.iter().find(|c| c.name == f.name.name);
            let s_w = f
                .latency
                .warm_ms
                .or(known.map(|c| c.warm_ms))
                .unwrap_or(10.0);
            let exec = f.exec_ms.or(known.map(|c| c.exec_ms)).unwrap_or(0.0);
            let need = rate * (s_w.max(0.0) + exec.max(0.0)) / 1000.0;
            let target = (need + p.z.max(0.0) * need.sqrt()).ceil();
            let c = &f.counts;
            let have = (c.starting + c.running + c.warm + c.base + c.dedup + c.restoring) as f64;
            if target.is_finite() && target > have {
                out.push(crate::Prewarm {
                    function: f.name.clone(),
                    count: ((target - have) as usize).min(p.max_batch),
                });
            }
        }
        self.live_recent
            .retain(|_, w| w.peak(now, p.window_s) > 0.0);
        out
    }

    fn on_idle(
        &mut self,
        cluster: &crate::ClusterView,
        function: &crate::FunctionView,
        sandbox: &crate::SandboxView,
        now: Timestamp,
    ) -> crate::Decision {
        use crate::{Decision, Form, SandboxState};
        let state = match (sandbox.state, sandbox.form) {
            (SandboxState::Warm { .. }, Form::Base) => IdleState::Base,
            (SandboxState::Warm { .. }, _) => IdleState::Warm,
            (SandboxState::Dedup { .. }, _) => IdleState::Dedup,
            _ => return Decision::KeepWarm,
        };
        let known = self.costs.iter().find(|c| c.name == function.name.name);
        let mb = |b: medes_core::Bytes| b.0 as f64 / (1024.0 * 1024.0);
        let warm_mb = function
            .footprint
            .warm
            .map(mb)
            .or(known.map(|c| c.warm_mb))
            .unwrap_or_else(|| mb(function.memory_limit));
        let saving = match (function.footprint.dedup, known) {
            (Some(d), _) if warm_mb > 0.0 => (1.0 - mb(d) / warm_mb).clamp(0.0, 1.0),
            (_, Some(c)) => c.dedup_saving(),
            _ if self.cfg.assumed_saving.is_finite() => self.cfg.assumed_saving.clamp(0.0, 1.0),
            _ => 0.0,
        };
        let mode = self
            .cfg
            .per_function
            .get(&function.name.name)
            .copied()
            .unwrap_or(self.cfg.mode);
        let own = self.cfg.own_budget && matches!(mode, MedesMode::Memory { budget_mb: Some(_) });
        let c = &function.counts;
        let inputs = MedesInputs {
            state,
            idle_ms: sandbox.state.last_used().map_or(0, |t| now.since(t)),
            blacklisted: !sandbox.deduplicable,
            dependents: sandbox.dependents,
            lambda_max: function.arrivals.peak_rate(),
            lambda_sum: if own {
                function.arrivals.peak_rate()
            } else {
                cluster.peak_rate_sum
            },
            functions: if own { 1 } else { cluster.functions.max(1) },
            n_warm: c.starting + c.running + c.warm + c.restoring,
            n_idle_warm: c.warm,
            n_dedup: c.dedup,
            n_base: c.base,
            s_w_ms: function
                .latency
                .warm_ms
                .or(known.map(|c| c.warm_ms))
                .unwrap_or(10.0),
            s_d_ms: function
                .latency
                .dedup_ms
                .or(known.map(|c| c.dedup_ms))
                .unwrap_or(300.0),
            exec_ms: function.exec_ms.or(known.map(|c| c.exec_ms)).unwrap_or(0.0),
            warm_mb,
            saving,
            budget_mb: mb(cluster.budget),
            used_mb: mb(cluster.used),
        };
        match decide(&self.cfg, mode, &inputs).verdict {
            Verdict::Keep => Decision::KeepWarm,
            Verdict::Dedup => Decision::Dedup,
            Verdict::MakeBase => Decision::Base,
            Verdict::Purge => Decision::Purge,
        }
    }

    fn next_decision(
        &self,
        _function: &crate::FunctionView,
        sandbox: &crate::SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp> {
        use crate::{Form, SandboxState};
        let since = match (sandbox.state, sandbox.form) {
            (SandboxState::Warm { idle_since }, Form::Base) if self.cfg.retire_bases => idle_since,
            (SandboxState::Warm { .. }, Form::Base) => return None,
            (SandboxState::Warm { idle_since }, _) => idle_since,
            (SandboxState::Dedup { idle_since, .. }, _) => idle_since,
            _ => return None,
        };
        let p = self.cfg.idle_period_ms.max(1);
        let k = now.since(since) / p + 1;
        Some(since.plus_ms(k.saturating_mul(p)))
    }

    fn eviction_order(&self) -> crate::EvictionOrder {
        if self.cfg.evict_greedy_dual {
            crate::EvictionOrder::GreedyDual
        } else {
            crate::EvictionOrder::Policy
        }
    }

    fn eviction_rank(
        &self,
        function: &crate::FunctionView,
        sandbox: &crate::SandboxView,
        now: Timestamp,
    ) -> f64 {
        let c = &function.counts;
        let held = (c.warm + c.dedup + c.base) as f64;
        let rate =
            function.arrivals.in_window as f64 / (self.cfg.window_minutes.max(1) * 60) as f64;
        // Most over-provisioned function first; least recently used within it.
        let lru = sandbox.state.last_used().unwrap_or(now).0 as f64 * 1e-12;
        -(held / (rate + 1e-3)) + lru
    }
}

#[cfg(test)]
mod tests {
    use super::super::FunctionCounts;
    use super::super::testutil::idle as idle_sb;
    use super::super::testutil::{costs, idle};
    use super::*;

    const MIN: u64 = 60_000;

    fn counts(warm: usize, dedup: usize, base: usize) -> FunctionCounts {
        FunctionCounts {
            warm,
            dedup,
            base,
            ..FunctionCounts::default()
        }
    }

    /// `per_min` arrivals per minute of f0 (and f1) for the 10 minutes before `now`.
    fn loaded(cfg: MedesConfig, per_min: [u32; 2], now: u64) -> Medes {
        let mut p = Medes::new(cfg, costs());
        for m in 0..10u64 {
            for (f, &k) in per_min.iter().enumerate() {
                for i in 0..k {
                    let t = now - (10 - m) * MIN + u64::from(i);
                    p.on_arrival(f, Timestamp(t));
                }
            }
        }
        p
    }

    #[test]
    fn lambda_max_slides_with_time_not_arrivals() {
        let mut w = LambdaWindow::default();
        for i in 0..30 {
            w.add(Timestamp(i * 1000)); // 30 in minute 0
        }
        w.add(Timestamp(5 * MIN)); // 1 in minute 5
        assert_eq!(w.lambda_max(Timestamp(9 * MIN), 10), 0.5);
        // Minute 0 leaves the window at minute 10 even though nothing arrived since.
        assert!((w.lambda_max(Timestamp(10 * MIN), 10) - 1.0 / 60.0).abs() < 1e-12);
        assert_eq!(w.lambda_max(Timestamp(15 * MIN), 10), 0.0);
        w.prune(Timestamp(15 * MIN), 10);
        assert!(w.buckets.is_empty());
    }

    #[test]
    fn timers_and_decision_times() {
        let p = loaded(MedesConfig::default(), [0, 0], 20 * MIN);
        let c = [counts(1, 1, 1), counts(0, 0, 0)];
        let view = FleetView {
            counts: &c,
            budget_mb: 1e9,
            used_mb: 0.0,
        };
        let now = Timestamp(20 * MIN);
        let warm = idle(IdleState::Warm, now.0 - 10 * MIN);
        assert_eq!(p.explain(0, &warm, &view, now).verdict, Verdict::Purge);
        let warm = idle(IdleState::Warm, now.0 - 10 * MIN + 1);
        assert_eq!(p.explain(0, &warm, &view, now).verdict, Verdict::Keep);
        let dedup = idle(IdleState::Dedup, now.0 - 14 * MIN);
        assert_eq!(p.explain(0, &dedup, &view, now).verdict, Verdict::Keep);
        let dedup = idle(IdleState::Dedup, now.0 - 15 * MIN);
        assert_eq!(p.explain(0, &dedup, &view, now).verdict, Verdict::Purge);
        let base = idle(IdleState::Base, 0);
        assert_eq!(p.explain(0, &base, &view, now).verdict, Verdict::Keep);
        assert_eq!(p.next_decision(0, &base, now), None);
        let warm = idle(IdleState::Warm, 1_000);
        assert_eq!(
            p.next_decision(0, &warm, Timestamp(1_000)),
            Some(Timestamp(61_000))
        );
        assert_eq!(
            p.next_decision(0, &warm, Timestamp(61_000)),
            Some(Timestamp(121_000))
        );
        assert_eq!(
            p.next_decision(0, &warm, Timestamp(61_001)),
            Some(Timestamp(121_000))
        );
    }

    #[test]
    fn first_sandbox_becomes_a_base_then_one_per_forty_dedup() {
        let p = loaded(MedesConfig::default(), [6, 6], 20 * MIN);
        let now = Timestamp(20 * MIN);
        let sb = idle(IdleState::Warm, now.0 - MIN);
        for (c, expect) in [
            (counts(1, 0, 0), Verdict::MakeBase),
            (counts(1, 39, 1), Verdict::Keep),
            (counts(1, 40, 1), Verdict::MakeBase),
        ] {
            let cs = [c, counts(0, 0, 0)];
            let view = FleetView {
                counts: &cs,
                budget_mb: 1e9,
                used_mb: 0.0,
            };
            assert_eq!(p.explain(0, &sb, &view, now).verdict, expect, "{c:?}");
        }
        let mut bl = sb;
        bl.blacklisted = true;
        let cs = [counts(1, 0, 0), counts(0, 0, 0)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 1e9,
            used_mb: 0.0,
        };
        assert_eq!(p.explain(0, &bl, &view, now).verdict, Verdict::Keep);
    }

    #[test]
    fn bases_on_demand_and_retirement() {
        let now = Timestamp(40 * MIN);
        let view = |c: FunctionCounts| {
            let cs = [c, counts(0, 0, 0)];
            move |p: &Medes, sb: &IdleSandbox| {
                p.explain(
                    0,
                    sb,
                    &FleetView {
                        counts: &cs,
                        budget_mb: 1e9,
                        used_mb: 0.0,
                    },
                    now,
                )
                .verdict
            }
        };
        let dka = MedesConfig {
            keep_alive_ms: 2 * MIN,
            keep_dedup_ms: 10 * MIN,
            dedup_at_keep_alive: true,
            ..Default::default()
        };
        let lazy = MedesConfig {
            bases_on_demand: true,
            retire_bases: true,
            ..dka.clone()
        };
        let (proto, p) = (
            loaded(dka, [6, 6], 40 * MIN),
            loaded(lazy, [6, 6], 40 * MIN),
        );
        let young = idle(IdleState::Warm, now.0 - MIN);
        let old = idle(IdleState::Warm, now.0 - 3 * MIN);
        // The prototype: the first idle sandbox becomes a base at once.
        assert_eq!(view(counts(3, 0, 0))(&proto, &young), Verdict::MakeBase);
        // On demand: not while it would stay warm anyway ...
        assert_eq!(view(counts(3, 0, 0))(&p, &young), Verdict::Keep);
        // ... only when it would be deduplicated, and only if the candidates pay for the base
        // (b = 0.33 for linalg: 3 idle warm × 0.33 < 2 → keep; 7 × 0.33 ≥ 2 → base).
        assert_eq!(view(counts(3, 0, 0))(&p, &old), Verdict::Keep);
        let mut many = counts(7, 0, 0);
        assert_eq!(view(many)(&p, &old), Verdict::MakeBase);
        // With a base, the next candidate is deduplicated.
        many.base = 1;
        assert_eq!(view(many)(&p, &old), Verdict::Dedup);
        // Retirement: a base idle past keep-dedup with no dependents goes; with dependents,
        // or younger, it stays; the prototype keeps bases forever.
        let mut base = idle(IdleState::Base, now.0 - 11 * MIN);
        assert_eq!(view(many)(&p, &base), Verdict::Purge);
        assert!(p.next_decision(0, &base, now).is_some());
        assert_eq!(view(many)(&proto, &base), Verdict::Keep);
        assert_eq!(proto.next_decision(0, &base, now), None);
        base.dependents = 1;
        assert_eq!(view(many)(&p, &base), Verdict::Keep);
        let young_base = idle(IdleState::Base, now.0 - 9 * MIN);
        assert_eq!(view(many)(&p, &young_base), Verdict::Keep);
    }

    #[test]
    fn memory_mode_dedups_only_beyond_the_share() {
        // f0 and f1 both at 6/min: equal shares of the budget.
        let p = loaded(MedesConfig::default(), [6, 6], 20 * MIN);
        let now = Timestamp(20 * MIN);
        let sb = idle(IdleState::Warm, now.0 - MIN);
        let decide = |warm: usize, dedup: usize, budget_mb: f64| {
            let cs = [counts(warm, dedup, 1), counts(0, 0, 0)];
            let view = FleetView {
                counts: &cs,
                budget_mb,
                used_mb: 0.0,
            };
            p.explain(0, &sb, &view, now)
        };
        // Plenty of memory: stay warm.
        let t = decide(10, 0, 10_000.0);
        assert_eq!(t.verdict, Verdict::Keep, "{t:?}");
        assert!(t.d_mem.unwrap() < 0.0);
        // Share 0.95·1000/2 = 475 MB = 14.8 linalg sandboxes; 20 held: d_mem = (20 − 14.8)/b.
        let t = decide(19, 0, 1_000.0);
        let b = costs()[0].dedup_saving();
        assert!(
            (t.d_mem.unwrap() - (20.0 - 475.0 / 32.0) / b).abs() < 1e-9,
            "{t:?}"
        );
        assert!(t.d_mem.unwrap() < t.d_lambda, "{t:?}");
        assert_eq!(t.verdict, Verdict::Dedup, "{t:?}");
        // Enough already deduplicated: keep this one warm.
        let t = decide(2, 16, 1_000.0);
        assert!(16.0 >= t.d_mem.unwrap(), "{t:?}");
        assert_eq!(t.verdict, Verdict::Keep, "{t:?}");
        // Far over the share: everything goes to dedup (d_mem > N).
        let t = decide(30, 0, 100.0);
        assert!(t.d_mem.unwrap() > t.n as f64, "{t:?}");
        assert_eq!(t.verdict, Verdict::Dedup);
    }

    #[test]
    fn memory_mode_infeasible_dedups_aggressively() {
        // 600 arrivals/min = 10/s of linalg: N = 3 cannot meet the load (d_λ < 0), and the
        // share is exceeded (tiny budget): infeasible → DEDUP.
        let p = loaded(MedesConfig::default(), [600, 0], 20 * MIN);
        let now = Timestamp(20 * MIN);
        let sb = idle(IdleState::Warm, now.0 - MIN);
        let cs = [counts(2, 0, 1), counts(0, 0, 0)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 10.0,
            used_mb: 0.0,
        };
        let t = p.explain(0, &sb, &view, now);
        assert!(t.d_lambda < 0.0 && t.d_mem.unwrap() >= t.d_lambda, "{t:?}");
        assert_eq!(t.verdict, Verdict::Dedup);
    }

    #[test]
    fn latency_mode_keeps_purges_and_dedups() {
        let cfg = MedesConfig {
            mode: MedesMode::Latency { alpha: 2.5 },
            ..Default::default()
        };
        let now = Timestamp(20 * MIN);
        let sb = idle(IdleState::Warm, now.0 - MIN);
        let run = |per_min: u32, warm: usize, dedup: usize| {
            let p = loaded(cfg.clone(), [per_min, 0], 20 * MIN);
            let cs = [counts(warm, dedup, 1), counts(0, 0, 0)];
            let view = FleetView {
                counts: &cs,
                budget_mb: 1e9,
                used_mb: 0.0,
            };
            p.explain(0, &sb, &view, now)
        };
        // Load above capacity: keep warm (d_λ < 0).
        let t = run(600, 2, 0);
        assert!(t.d_lambda < 0.0);
        assert_eq!(t.verdict, Verdict::Keep, "{t:?}");
        // No load: more sandboxes than needed: purge (d_lat < 0).
        let t = run(0, 2, 0);
        assert!(t.d_lat.unwrap() < 0.0);
        assert_eq!(t.verdict, Verdict::Purge, "{t:?}");
        // Warm start 10 ms, dedup 157 ms: frac ≈ 13.1; with λ = 100/min and R_W = 0.76 s,
        // α·R_W·λ ≈ 3.17, so with N = 2 d_lat ≈ 0.09 > #dedup = 0: DEDUP.
        let t = run(100, 1, 0);
        assert!(t.d_lat.unwrap() > 0.0 && t.d_lambda > 0.0, "{t:?}");
        assert_eq!(t.verdict, Verdict::Dedup, "{t:?}");
        // With one already deduplicated, the next stays warm.
        let t = run(100, 1, 1);
        assert!(t.d_lat.unwrap() < 1.0);
        assert_ne!(t.verdict, Verdict::Dedup, "{t:?}");
    }

    #[test]
    fn optional_rules_dedup_at_keep_alive_and_under_pressure() {
        let cfg = MedesConfig {
            dedup_at_keep_alive: true,
            pressure_watermark: Some(0.8),
            ..Default::default()
        };
        let mut p = loaded(cfg, [0, 0], 40 * MIN);
        let now = Timestamp(40 * MIN);
        let cs = [counts(1, 0, 1), counts(0, 0, 0)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 1e9,
            used_mb: 0.0,
        };
        let at = |idle: u64| idle_sb(IdleState::Warm, now.0 - idle);
        assert_eq!(
            p.explain(0, &at(10 * MIN), &view, now).verdict,
            Verdict::Dedup
        );
        assert_eq!(
            p.explain(0, &at(15 * MIN), &view, now).verdict,
            Verdict::Purge
        );
        assert_eq!(p.pressure_watermark(), Some(0.8));
        assert_eq!(p.on_pressure(0, &at(5_000), &view, now), Verdict::Keep);
        assert_eq!(p.on_pressure(0, &at(10_000), &view, now), Verdict::Dedup);
        let mut bl = at(MIN);
        bl.blacklisted = true;
        assert_eq!(p.on_pressure(0, &bl, &view, now), Verdict::Keep);
        assert_eq!(
            p.on_pressure(0, &idle_sb(IdleState::Base, 0), &view, now),
            Verdict::Keep
        );
        // The prototype's rules: purge at keep-alive, nothing under pressure.
        let mut proto = loaded(MedesConfig::default(), [0, 0], 40 * MIN);
        assert_eq!(
            proto.explain(0, &at(10 * MIN), &view, now).verdict,
            Verdict::Purge
        );
        assert_eq!(proto.pressure_watermark(), None);
        assert_eq!(proto.on_pressure(0, &at(MIN), &view, now), Verdict::Keep);
    }

    #[test]
    fn hold_keeps_sandboxes_past_the_timers_only_while_memory_is_plentiful() {
        let cfg = MedesConfig {
            hold_below: Some(0.9),
            ..Default::default()
        };
        let p = loaded(cfg, [0, 0], 60 * MIN);
        let now = Timestamp(60 * MIN);
        let cs = [counts(1, 1, 1), counts(0, 0, 0)];
        let view = |used_mb: f64| FleetView {
            counts: &cs,
            budget_mb: 1000.0,
            used_mb,
        };
        let warm = idle_sb(IdleState::Warm, now.0 - 20 * MIN);
        let dedup = idle_sb(IdleState::Dedup, now.0 - 30 * MIN);
        // Plenty of memory: past keep-alive a warm sandbox is deduplicated, a dedup one kept.
        assert_eq!(
            p.explain(0, &warm, &view(100.0), now).verdict,
            Verdict::Dedup
        );
        assert_eq!(
            p.explain(0, &dedup, &view(100.0), now).verdict,
            Verdict::Keep
        );
        let mut bl = warm;
        bl.blacklisted = true;
        assert_eq!(p.explain(0, &bl, &view(100.0), now).verdict, Verdict::Keep);
        // Above 90% of the budget the timers purge again.
        assert_eq!(
            p.explain(0, &warm, &view(950.0), now).verdict,
            Verdict::Purge
        );
        assert_eq!(
            p.explain(0, &dedup, &view(950.0), now).verdict,
            Verdict::Purge
        );
        // Latency mode ignores it.
        let lat = loaded(
            MedesConfig {
                mode: MedesMode::Latency { alpha: 2.5 },
                hold_below: Some(0.9),
                ..Default::default()
            },
            [0, 0],
            60 * MIN,
        );
        assert_eq!(
            lat.explain(0, &dedup, &view(100.0), now).verdict,
            Verdict::Purge
        );
    }

    #[test]
    fn prediction_prewarms_to_the_needed_concurrency() {
        let cfg = MedesConfig {
            predict: Some(PredictConfig::default()),
            ..Default::default()
        };
        let mut p = Medes::new(cfg, costs());
        // 10 arrivals of linalg in one second: need = 10/s × (10 + 250) ms = 2.6 sandboxes,
        // + √2.6 headroom = 4.2 → 5; one is live: 4 more.
        for i in 0..10 {
            p.on_arrival(0, Timestamp(1_000 + i * 50));
        }
        let cs = [counts(1, 0, 0), counts(0, 0, 0)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 1e6,
            used_mb: 0.0,
        };
        assert_eq!(p.prewarm(0, &view, Timestamp(1_500)), 4);
        assert_eq!(p.prewarm(1, &view, Timestamp(1_500)), 0);
        // Enough live (dedup sandboxes count), memory short, or the burst long gone: none.
        let enough = [counts(2, 3, 0), counts(0, 0, 0)];
        let v2 = FleetView {
            counts: &enough,
            ..view
        };
        assert_eq!(p.prewarm(0, &v2, Timestamp(1_500)), 0);
        let full = FleetView {
            counts: &cs,
            budget_mb: 1_000.0,
            used_mb: 950.0,
        };
        assert_eq!(p.prewarm(0, &full, Timestamp(1_500)), 0);
        assert_eq!(p.prewarm(0, &view, Timestamp(12_000)), 0);
        // The paper's Medes never pre-warms.
        let mut plain = loaded(MedesConfig::default(), [600, 0], 20 * MIN);
        assert_eq!(plain.prewarm(0, &view, Timestamp(20 * MIN)), 0);
    }

    #[test]
    fn greedy_dual_eviction_with_dedup_as_the_cheaper_state() {
        let cfg = MedesConfig {
            evict_greedy_dual: true,
            ..Default::default()
        };
        let mut p = Medes::new(cfg, costs());
        for _ in 0..10 {
            p.on_arrival(0, Timestamp(0));
            p.on_arrival(1, Timestamp(0));
        }
        assert_eq!(p.on_finish(0, Timestamp(0)).score, 0.0);
        let cs = [counts(1, 1, 0), counts(1, 1, 0)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 1e6,
            used_mb: 0.0,
        };
        let (w, d) = (idle(IdleState::Warm, 0), idle(IdleState::Dedup, 0));
        let r = |f: FnId, sb: &IdleSandbox| p.evict_rank(f, sb, &view, Timestamp(0));
        // linalg warm 10 × (835 − 10)/32 ≈ 258 per MB; deduplicated 10 × (835 − 157)/21.5 ≈
        // 315; modelserve warm 10 × (1575 − 10)/90 ≈ 174: evicted first.
        assert!((r(0, &w) - 10.0 * 825.0 / 32.0).abs() < 1e-9);
        assert!(r(1, &w) < r(0, &w) && r(0, &w) < r(0, &d));
        let first = r(1, &w);
        p.on_evicted(1, first);
        assert_eq!(p.on_finish(0, Timestamp(0)).score, first);
        // With template starts: least recently used first.
        let mut tc = costs();
        tc[0].template_ms = Some(100.0);
        let q = Medes::new(
            MedesConfig {
                evict_greedy_dual: true,
                ..Default::default()
            },
            tc,
        );
        let (old, new) = (idle(IdleState::Warm, 5), idle(IdleState::Warm, 9));
        let rq = |sb: &IdleSandbox| q.evict_rank(0, sb, &view, Timestamp(10));
        assert!(rq(&old) < rq(&new));
    }

    #[test]
    fn template_faster_than_dedup_start_means_no_dedup() {
        let mut tc = costs();
        tc[0].template_ms = Some(100.0);
        let mut p = Medes::new(MedesConfig::default(), tc);
        for m in 0..10u64 {
            for i in 0..6 {
                p.on_arrival(0, Timestamp(10 * MIN + m * MIN + i));
                p.on_arrival(1, Timestamp(10 * MIN + m * MIN + i));
            }
        }
        let now = Timestamp(20 * MIN);
        let sb = idle(IdleState::Warm, now.0 - MIN);
        let mut c = counts(30, 0, 1);
        let view = |c: &[FunctionCounts; 2]| {
            p.explain(
                0,
                &sb,
                &FleetView {
                    counts: c,
                    budget_mb: 100.0,
                    used_mb: 0.0,
                },
                now,
            )
            .verdict
        };
        // Far over its share: deduplicated while the node has no template of it...
        assert_eq!(view(&[c, counts(0, 0, 0)]), Verdict::Dedup);
        // ... kept warm once a template starts it faster than a dedup start would.
        c.templates = 1;
        assert_eq!(view(&[c, counts(0, 0, 0)]), Verdict::Keep);
    }

    #[test]
    fn ewma_start_latencies_and_eviction_rank() {
        let mut p = loaded(MedesConfig::default(), [60, 1], 20 * MIN);
        p.on_start(0, StartKind::Dedup, 257.0, Timestamp(0));
        let (_, s_d) = p.start_latencies(0).unwrap();
        assert!((s_d - (0.1 * 257.0 + 0.9 * 157.0)).abs() < 1e-9);
        p.on_start(0, StartKind::Warm, f64::NAN, Timestamp(0));
        assert_eq!(p.start_latencies(0).unwrap().0, 10.0);
        let now = Timestamp(20 * MIN);
        let cs = [counts(5, 0, 1), counts(5, 0, 1)];
        let view = FleetView {
            counts: &cs,
            budget_mb: 1.0,
            used_mb: 0.0,
        };
        let sb = idle(IdleState::Warm, 0);
        // f1 has as many sandboxes for 1/60 of the load: evicted first.
        assert!(p.evict_rank(1, &sb, &view, now) < p.evict_rank(0, &sb, &view, now));
    }
}
