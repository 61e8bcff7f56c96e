//! What a policy sees: views of a function, a sandbox and the cluster, and the small pure
//! statistics (arrival windows, moving averages) the caller keeps to fill them.

use std::collections::VecDeque;

use medes_core::{ActionName, Bytes};

use crate::Timestamp;
use crate::lifecycle::{Form, SandboxState, StateKind, label};

/// Sandboxes of a function by what they are. Each sandbox counts once: a base counts as
/// [`Counts::base`] whatever it does (warm, running, being checkpointed into a base); a sandbox
/// being checkpointed for dedup already counts as [`Counts::dedup`]. Purging sandboxes are not
/// counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Being created.
    pub starting: usize,
    /// Serving (bases excluded).
    pub running: usize,
    /// Idle warm (bases excluded).
    pub warm: usize,
    /// Bases (including sandboxes being made bases).
    pub base: usize,
    /// Dedup sandboxes (including sandboxes being checkpointed for dedup).
    pub dedup: usize,
    /// Being restored (dedup starts in progress).
    pub restoring: usize,
}

impl Counts {
    /// Counts one sandbox.
    pub fn add(&mut self, state: SandboxState, form: Form) {
        match (label(state, form), state) {
            (StateKind::Starting, _) => self.starting += 1,
            (StateKind::Running, _) => self.running += 1,
            (StateKind::Warm, _) => self.warm += 1,
            (StateKind::Base, _) => self.base += 1,
            (
                StateKind::Checkpointing,
                SandboxState::Checkpointing {
                    purpose: crate::Purpose::Base,
                    ..
                },
            ) => self.base += 1,
            (StateKind::Checkpointing | StateKind::Dedup, _) => self.dedup += 1,
            (StateKind::Restoring, _) => self.restoring += 1,
            _ => {}
        }
    }

    /// Every counted sandbox.
    pub fn total(&self) -> usize {
        self.starting + self.running + self.warm + self.base + self.dedup + self.restoring
    }
}

/// Arrivals of a function, as the caller's [`ArrivalWindow`] summarises them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArrivalSummary {
    /// Every arrival so far.
    pub total: u64,
    /// The latest arrival.
    pub last: Option<Timestamp>,
    /// Arrivals in the current (still open) minute bucket.
    pub current_minute: u32,
    /// The highest per-minute count over the window (the current minute included): λ_max in
    /// requests per minute.
    pub peak_per_minute: u32,
    /// Arrivals within the window.
    pub in_window: u64,
}

impl ArrivalSummary {
    /// λ_max in requests per second.
    pub fn peak_rate(&self) -> f64 {
        f64::from(self.peak_per_minute) / 60.0
    }
}

/// Per-minute arrival counts over a sliding window (default 10 minutes), closed by time rather
/// than by the next arrival, so that a function that stopped receiving requests sees its λ_max
/// fall when the window passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrivalWindow {
    window_minutes: u64,
    /// (minute number, count), oldest first.
    buckets: VecDeque<(u64, u32)>,
    total: u64,
    last: Option<Timestamp>,
}

impl Default for ArrivalWindow {
    fn default() -> Self {
        ArrivalWindow::new(10)
    }
}

impl ArrivalWindow {
    /// A window of `window_minutes` one-minute buckets (at least 1).
    pub fn new(window_minutes: u64) -> Self {
        ArrivalWindow {
            window_minutes: window_minutes.max(1),
            buckets: VecDeque::new(),
            total: 0,
            last: None,
        }
    }

    fn expire(&mut self, minute: u64) {
        while let Some(&(m, _)) = self.buckets.front() {
            if m + self.window_minutes <= minute {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Records an arrival at `now`. A `now` earlier than the latest bucket counts in it.
    pub fn record(&mut self, now: Timestamp) {
        let minute = now.0 / 60_000;
        self.expire(minute);
        self.total += 1;
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        match self.buckets.back_mut() {
            Some((m, n)) if *m >= minute => *n = n.saturating_add(1),
            _ => self.buckets.push_back((minute, 1)),
        }
    }

    /// The summary as of `now` (buckets older than the window ignored).
    pub fn summary(&self, now: Timestamp) -> ArrivalSummary {
        let minute = now.0 / 60_000;
        let live = self
            .buckets
            .iter()
            .filter(|&&(m, _)| m + self.window_minutes > minute);
        let (mut peak, mut in_window, mut current) = (0u32, 0u64, 0u32);
        for &(m, n) in live {
            peak = peak.max(n);
            in_window += u64::from(n);
            if m == minute {
                current = n;
            }
        }
        ArrivalSummary {
            total: self.total,
            last: self.last,
            current_minute: current,
            peak_per_minute: peak,
            in_window,
        }
    }
}

/// An exponentially weighted moving average (the prototype uses α = 0.1 for start latencies).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    /// The weight of a new sample in Medes's prototype.
    pub const ALPHA: f64 = 0.1;

    /// Adds a sample with weight [`Ewma::ALPHA`]; the first sample is taken as is. Non-finite
    /// samples are ignored.
    pub fn add(&mut self, sample: f64) {
        if !sample.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(v) => v + Self::ALPHA * (sample - v),
        });
    }

    /// The average, if any sample was added.
    pub fn get(&self) -> Option<f64> {
        self.value
    }
}

/// Measured start latencies of a function (EWMA, ms, from arrival to the sandbox being ready).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StartLatencies {
    /// Cold starts.
    pub cold_ms: Option<f64>,
    /// Warm starts.
    pub warm_ms: Option<f64>,
    /// Dedup starts (restores).
    pub dedup_ms: Option<f64>,
}

/// Measured memory footprints of a function's sandboxes (averages over the live ones, or the
/// latest measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprints {
    /// m_W: a warm sandbox (PSS).
    pub warm: Option<Bytes>,
    /// m_D: a dedup sandbox (everything held for it, bases excluded).
    pub dedup: Option<Bytes>,
    /// A base (PSS plus its resident page image).
    pub base: Option<Bytes>,
    /// m_R: the transient memory of a restore.
    pub restore: Option<Bytes>,
}

/// What a policy sees of a function (one action, all its live sandboxes on the cluster).
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionView {
    /// The function.
    pub name: ActionName,
    /// The action's memory limit.
    pub memory_limit: Bytes,
    /// Its sandboxes on the whole cluster.
    pub counts: Counts,
    /// Its arrivals.
    pub arrivals: ArrivalSummary,
    /// Its measured start latencies.
    pub latency: StartLatencies,
    /// EWMA of its execution time (inside the sandbox), ms.
    pub exec_ms: Option<f64>,
    /// Its measured footprints.
    pub footprint: Footprints,
}

impl FunctionView {
    /// A view of a function nothing is known about yet.
    pub fn new(name: ActionName, memory_limit: Bytes) -> Self {
        FunctionView {
            name,
            memory_limit,
            counts: Counts::default(),
            arrivals: ArrivalSummary::default(),
            latency: StartLatencies::default(),
            exec_ms: None,
            footprint: Footprints::default(),
        }
    }
}

/// What a policy sees of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxView {
    /// Current state.
    pub state: SandboxState,
    /// Plain or base.
    pub form: Form,
    /// When the sandbox was created.
    pub created: Timestamp,
    /// Memory currently charged to it.
    pub memory: Bytes,
    /// `false` once a checkpoint or dedup of it failed for a reason that will not go away (it is
    /// never made a base or dedup again).
    pub deduplicable: bool,
    /// For a base: dedup sandboxes that may reference its pages (it must not go while > 0).
    pub dependents: usize,
    /// The function's sandboxes on this sandbox's node (bases are per node: a dedup sandbox can
    /// only reference pages on its own node).
    pub local: Counts,
}

impl SandboxView {
    /// A plain, deduplicable sandbox with no dependents and nothing else on its node.
    pub fn new(state: SandboxState, created: Timestamp, memory: Bytes) -> Self {
        SandboxView {
            state,
            form: Form::Plain,
            created,
            memory,
            deduplicable: true,
            dependents: 0,
            local: Counts::default(),
        }
    }

    /// Its label ([`StateKind::Base`] for a live base).
    pub fn label(&self) -> StateKind {
        label(self.state, self.form)
    }
}

/// What a policy sees of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClusterView {
    /// Nodes.
    pub nodes: usize,
    /// Sum of the nodes' memory budgets.
    pub budget: Bytes,
    /// Memory charged on all nodes.
    pub used: Bytes,
    /// Σ over functions of λ_max (requests per second), for splitting the budget by rate.
    pub peak_rate_sum: f64,
    /// Functions with live sandboxes or arrivals in the window.
    pub functions: usize,
}
