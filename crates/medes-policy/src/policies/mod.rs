//! Cluster-level sandbox-management policies: Medes and the baselines it is measured against.
//!
//! Every policy here implements [`ClusterPolicy`], a pure, clock-free interface driven by a
//! caller (the simulator in `medes-sim`, later the live controller) that owns the sandboxes:
//!
//! - [`Medes`]: the paper's policy (MEDES.md §5), latency or memory mode, with the idle,
//!   keep-alive and keep-dedup timers and the base rule;
//! - [`FixedKeepAlive`]: OpenWhisk's fixed keep-alive with least-recently-used eviction;
//! - [`HybridHistogram`]: the adaptive keep-alive of *Serverless in the Wild* with pre-warming;
//! - [`GreedyDual`]: FaasCache's Greedy-Dual keep-alive (no timer; priority-ordered eviction).
//!
//! # Design
//! The crate's [`crate::Policy`] trait decides the fate of one idle sandbox on one node. A
//! cluster policy needs more than that, so this module has its own trait, [`ClusterPolicy`]:
//! it also sees cluster-wide per-function counts ([`FunctionCounts`]) and the memory budget
//! ([`FleetView`]), learns start latencies ([`ClusterPolicy::on_start`]), says what happens
//! when an invocation ends (keep with a deadline, or unload and pre-warm later:
//! [`AfterRun`]), and ranks eviction victims ([`ClusterPolicy::evict_rank`]). Per-sandbox
//! policy data (a deadline, a Greedy-Dual priority) is handed back by the caller inside
//! [`IdleSandbox`], so the policies keep no per-sandbox tables that could leak.
//! Functions are dense indices ([`FnId`]) into the [`FunctionCosts`] table given at
//! construction. Policies that are not Medes never answer [`Verdict::Dedup`] or
//! [`Verdict::MakeBase`].
//!
//! # What this module does not do
//! No clock (every call takes `now`), no I/O, no placement: choosing nodes, charging memory and
//! carrying out verdicts is the caller's job.

mod greedy_dual;
mod histogram;
mod keepalive;
mod medes;

pub use greedy_dual::GreedyDual;
pub use histogram::{HistogramConfig, HybridHistogram, IdleHistogram, Pattern, Windows};
pub use keepalive::FixedKeepAlive;
pub use medes::{
    LambdaWindow, Medes, MedesConfig, MedesInputs, MedesMode, MedesTrace, PredictConfig,
    SecondWindow, decide as medes_decide,
};

use medes_core::StartKind;
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// A function: an index into the cost table the policy was built with.
pub type FnId = usize;

/// What a policy knows about a function's costs (measured or from the paper).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCosts {
    /// Action name.
    pub name: String,
    /// Typical execution time, ms.
    pub exec_ms: f64,
    /// Cold-start latency, ms.
    pub cold_ms: f64,
    /// Warm-start latency, ms.
    pub warm_ms: f64,
    /// Dedup-start (restore) latency, ms.
    pub dedup_ms: f64,
    /// Footprint of a warm sandbox, MB (m_W).
    pub warm_mb: f64,
    /// Footprint of a dedup sandbox, MB (m_D).
    pub dedup_mb: f64,
    /// Transient extra memory of a dedup start, MB (m_R).
    pub restore_mb: f64,
    /// Template-start latency, ms, when template starts are on (issue 8); `None`: off.
    #[serde(default)]
    pub template_ms: Option<f64>,
}

impl FunctionCosts {
    /// Fraction of a warm sandbox's memory that deduplication saves (b_f), in `[0, 1]`.
    pub fn dedup_saving(&self) -> f64 {
        if self.warm_mb > 0.0 {
            ((self.warm_mb - self.dedup_mb) / self.warm_mb).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Cluster-wide sandbox counts of one function, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCounts {
    /// Cold starts (or pre-warms) in progress.
    pub starting: usize,
    /// Serving an invocation (dedup starts in progress included).
    pub running: usize,
    /// Idle warm (bases excluded).
    pub warm: usize,
    /// Being deduplicated.
    pub deduping: usize,
    /// Deduplicated.
    pub dedup: usize,
    /// Bases (idle or running).
    pub base: usize,
    /// Nodes holding a template image of the function (not sandboxes: not in
    /// [`FunctionCounts::total`]). With template starts the template is the function's first
    /// base on its node.
    #[serde(default)]
    pub templates: usize,
}

impl FunctionCounts {
    /// Every live sandbox.
    pub fn total(&self) -> usize {
        self.starting + self.running + self.warm + self.deduping + self.dedup + self.base
    }
    /// Sandboxes counted as warm capacity (running and starting ones included, bases excluded).
    pub fn warm_like(&self) -> usize {
        self.starting + self.running + self.warm
    }
    /// Sandboxes counted as deduplicated (in progress included).
    pub fn dedup_like(&self) -> usize {
        self.deduping + self.dedup
    }
}

/// What a policy sees of the cluster when deciding.
#[derive(Debug, Clone, Copy)]
pub struct FleetView<'a> {
    /// Per-function counts, indexed by [`FnId`].
    pub counts: &'a [FunctionCounts],
    /// The cluster's memory budget, MB (sum of the nodes' caps).
    pub budget_mb: f64,
    /// Memory charged now, MB.
    pub used_mb: f64,
}

/// The state of an idle sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdleState {
    /// Warm (paused), not a base.
    Warm,
    /// Deduplicated.
    Dedup,
    /// A base: warm, checkpointed, its pages in the registry.
    Base,
}

/// What a policy sees of one idle sandbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleSandbox {
    /// Its state.
    pub state: IdleState,
    /// When it last finished serving (or became ready).
    pub idle_since: Timestamp,
    /// The deadline set by [`AfterRun::deadline`], if any.
    pub deadline: Option<Timestamp>,
    /// The policy's per-sandbox value set by [`AfterRun::score`] (Greedy-Dual priority).
    pub score: f64,
    /// Whether it failed to deduplicate before (never offered DEDUP or BASE again).
    pub blacklisted: bool,
    /// For a base: dedup sandboxes that may reference its pages (0 for other sandboxes).
    pub dependents: usize,
}

/// The answer for an idle sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Leave it as it is (warm stays warm, dedup stays dedup, a base stays a base).
    Keep,
    /// Deduplicate it (warm → DEDUP).
    Dedup,
    /// Make it a base (warm → BASE).
    MakeBase,
    /// Destroy it.
    Purge,
}

/// What happens to a sandbox once an invocation in it ends.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AfterRun {
    /// Keep it idle until this time (then [`ClusterPolicy::decide`] is asked); `None`: no deadline.
    pub deadline: Option<Timestamp>,
    /// Destroy it now instead of keeping it.
    pub unload: bool,
    /// Start a fresh sandbox at `.0` and keep it until `.1` (pre-warming).
    pub prewarm: Option<(Timestamp, Timestamp)>,
    /// Per-sandbox value returned in [`IdleSandbox::score`].
    pub score: f64,
}

/// A sandbox-management policy for a whole cluster (see the module docs).
pub trait ClusterPolicy: Send {
    /// Name used in reports (e.g. `fixed-10m`).
    fn name(&self) -> String;

    /// Whether the policy may deduplicate (only Medes does).
    fn dedups(&self) -> bool {
        false
    }

    /// An invocation of `f` arrived.
    fn on_arrival(&mut self, _f: FnId, _now: Timestamp) {}

    /// An invocation of `f` started with `kind` after `latency_ms` (for EWMA start latencies).
    fn on_start(&mut self, _f: FnId, _kind: StartKind, _latency_ms: f64, _now: Timestamp) {}

    /// An invocation of `f` ended at `now`; its sandbox is idle (or unloaded, per the answer).
    fn on_finish(&mut self, f: FnId, now: Timestamp) -> AfterRun;

    /// When to call [`ClusterPolicy::decide`] next for an idle sandbox; `None`: never.
    fn next_decision(&self, f: FnId, sandbox: &IdleSandbox, now: Timestamp) -> Option<Timestamp>;

    /// The verdict for an idle sandbox at `now`.
    fn decide(
        &mut self,
        f: FnId,
        sandbox: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict;

    /// Eviction order: the idle sandbox with the lowest rank goes first (ties: least recently
    /// used). Bases are never offered.
    fn evict_rank(
        &self,
        _f: FnId,
        _sandbox: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> f64 {
        0.0
    }

    /// A sandbox of `f` with eviction rank `rank` was evicted.
    fn on_evicted(&mut self, _f: FnId, _rank: f64) {}

    /// Periodic timer (the caller calls it at least once a second of trace time).
    fn tick(&mut self, _now: Timestamp) {}

    /// How many sandboxes of `f` to start now without an invocation (pre-warms, off the
    /// request path). The caller asks after every arrival of `f` and, for every function, on
    /// every tick; it starts what fits without evicting and counts them in
    /// [`FunctionCounts::starting`] at once. The default: none.
    fn prewarm(&mut self, _f: FnId, _view: &FleetView<'_>, _now: Timestamp) -> usize {
        0
    }

    /// A node fuller than this share of its budget is under pressure: the caller then offers
    /// its idle warm sandboxes (least recently used first) to [`ClusterPolicy::on_pressure`] on
    /// each tick until enough memory is being freed. `None` (the default): never.
    fn pressure_watermark(&self) -> Option<f64> {
        None
    }

    /// The verdict for an idle warm sandbox on a node under pressure ([`Verdict::Dedup`] to
    /// shrink it; anything else leaves it).
    fn on_pressure(
        &mut self,
        _f: FnId,
        _sandbox: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> Verdict {
        Verdict::Keep
    }
}

/// A boxed policy is a policy.
impl<P: ClusterPolicy + ?Sized> ClusterPolicy for Box<P> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn dedups(&self) -> bool {
        (**self).dedups()
    }
    fn on_arrival(&mut self, f: FnId, now: Timestamp) {
        (**self).on_arrival(f, now)
    }
    fn on_start(&mut self, f: FnId, kind: StartKind, latency_ms: f64, now: Timestamp) {
        (**self).on_start(f, kind, latency_ms, now)
    }
    fn on_finish(&mut self, f: FnId, now: Timestamp) -> AfterRun {
        (**self).on_finish(f, now)
    }
    fn next_decision(&self, f: FnId, sandbox: &IdleSandbox, now: Timestamp) -> Option<Timestamp> {
        (**self).next_decision(f, sandbox, now)
    }
    fn decide(
        &mut self,
        f: FnId,
        sandbox: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        (**self).decide(f, sandbox, view, now)
    }
    fn evict_rank(
        &self,
        f: FnId,
        sandbox: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> f64 {
        (**self).evict_rank(f, sandbox, view, now)
    }
    fn on_evicted(&mut self, f: FnId, rank: f64) {
        (**self).on_evicted(f, rank)
    }
    fn tick(&mut self, now: Timestamp) {
        (**self).tick(now)
    }
    fn prewarm(&mut self, f: FnId, view: &FleetView<'_>, now: Timestamp) -> usize {
        (**self).prewarm(f, view, now)
    }
    fn pressure_watermark(&self) -> Option<f64> {
        (**self).pressure_watermark()
    }
    fn on_pressure(
        &mut self,
        f: FnId,
        sandbox: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        (**self).on_pressure(f, sandbox, view, now)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Two functions with the paper's LinAlg and RNNModel costs.
    pub fn costs() -> Vec<FunctionCosts> {
        vec![
            FunctionCosts {
                name: "linalg".into(),
                exec_ms: 250.0,
                cold_ms: 835.0,
                warm_ms: 10.0,
                dedup_ms: 157.0,
                warm_mb: 32.0,
                dedup_mb: 21.5,
                restore_mb: 32.0,
                template_ms: None,
            },
            FunctionCosts {
                name: "modelserve".into(),
                exec_ms: 1000.0,
                cold_ms: 1575.0,
                warm_ms: 10.0,
                dedup_ms: 490.0,
                warm_mb: 90.0,
                dedup_mb: 37.8,
                restore_mb: 90.0,
                template_ms: None,
            },
        ]
    }

    pub fn idle(state: IdleState, since: u64) -> IdleSandbox {
        IdleSandbox {
            state,
            idle_since: Timestamp(since),
            deadline: None,
            score: 0.0,
            blacklisted: false,
            dependents: 0,
        }
    }
}
