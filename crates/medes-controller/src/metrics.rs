//! Metric handles, registered once (per action or globally) so the invocation path only bumps
//! atomics. The binary installs the recorder; it must do so before the controller is created.

use medes_core::{ActionName, ActivationStatus, StartKind};
use medes_policy::StateKind;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

const KINDS: [StartKind; 4] = [
    StartKind::Cold,
    StartKind::Warm,
    StartKind::Dedup,
    StartKind::Template,
];
const STATUSES: [ActivationStatus; 4] = [
    ActivationStatus::Success,
    ActivationStatus::ApplicationError,
    ActivationStatus::DeveloperError,
    ActivationStatus::InternalError,
];

fn kind_idx(k: StartKind) -> usize {
    match k {
        StartKind::Cold => 0,
        StartKind::Warm => 1,
        StartKind::Dedup => 2,
        StartKind::Template => 3,
    }
}

fn status_label(s: ActivationStatus) -> &'static str {
    match s {
        ActivationStatus::Success => "success",
        ActivationStatus::ApplicationError => "application_error",
        ActivationStatus::DeveloperError => "developer_error",
        ActivationStatus::InternalError => "internal_error",
    }
}

/// Per-action counters and histograms.
pub(crate) struct ActionMetrics {
    invocations: [[Counter; 4]; 4],
    duration: [Histogram; 4],
    /// m_R: the memory a dedup start of the action holds transiently (measured, EWMA), bytes.
    restore_transient: Gauge,
}

impl ActionMetrics {
    pub(crate) fn new(action: &ActionName) -> Self {
        let name = action.to_string();
        let invocations = KINDS.map(|k| {
            STATUSES.map(|s| {
                counter!("medes_invocations_total", "action" => name.clone(), "start_kind" => k.as_str(), "status" => status_label(s))
            })
        });
        let duration = KINDS.map(|k| {
            histogram!("medes_invocation_duration_seconds", "action" => name.clone(), "start_kind" => k.as_str())
        });
        ActionMetrics {
            invocations,
            duration,
            restore_transient: gauge!("medes_restore_transient_bytes", "action" => name),
        }
    }

    pub(crate) fn restore_transient(&self, bytes: f64) {
        self.restore_transient.set(bytes);
    }

    pub(crate) fn record(&self, kind: StartKind, status: ActivationStatus, seconds: f64) {
        self.invocations[kind_idx(kind)][status.code() as usize].increment(1);
        self.duration[kind_idx(kind)].record(seconds);
    }
}

/// Node-wide metrics.
pub(crate) struct GlobalMetrics {
    start_latency: [Histogram; 4],
    pub(crate) sandboxes: [Gauge; 8],
    pub(crate) memory: [Gauge; 8],
    pub(crate) evictions: Counter,
    pub(crate) rejections: Counter,
    pub(crate) dedups: Counter,
    pub(crate) bases: Counter,
    pub(crate) prewarms: Counter,
    pub(crate) dedup_start: Histogram,
    /// `read_base`, `rebuild`, `restore`, `total` (the agent's view of a dedup start).
    pub(crate) restore_phases: [Histogram; 4],
    /// Checkpoint + dedup (or register) time, by purpose: `base`, `dedup`.
    pub(crate) checkpoint: [Histogram; 2],
}

impl GlobalMetrics {
    pub(crate) fn new() -> Self {
        GlobalMetrics {
            start_latency: KINDS
                .map(|k| histogram!("medes_start_latency_seconds", "start_kind" => k.as_str())),
            sandboxes: StateKind::ALL.map(|s| gauge!("medes_sandboxes", "state" => s.as_str())),
            memory: StateKind::ALL.map(|s| gauge!("medes_memory_bytes", "state" => s.as_str())),
            evictions: counter!("medes_evictions_total"),
            rejections: counter!("medes_admission_rejections_total"),
            dedups: counter!("medes_dedups_total"),
            bases: counter!("medes_bases_total"),
            prewarms: counter!("medes_prewarms_total"),
            dedup_start: histogram!("medes_dedup_start_seconds"),
            restore_phases: ["read_base", "rebuild", "restore", "total"]
                .map(|p| histogram!("medes_dedup_restore_phase_seconds", "phase" => p)),
            checkpoint: ["base", "dedup"]
                .map(|p| histogram!("medes_checkpoint_seconds", "purpose" => p)),
        }
    }

    pub(crate) fn start_latency(&self, kind: StartKind, seconds: f64) {
        self.start_latency[kind_idx(kind)].record(seconds);
    }

    /// A sandbox could not be made a base or deduplicated (`reason` is a short fixed label).
    pub(crate) fn dedup_failure(&self, reason: &'static str) {
        counter!("medes_dedup_failures_total", "reason" => reason).increment(1);
    }

    /// Memory a node holds for sandboxes the controller does not know of (bases whose process
    /// is gone while dedup sandboxes depend on them), bytes.
    pub(crate) fn unowned(&self, bytes: f64) {
        gauge!("medes_unowned_memory_bytes").set(bytes);
    }

    /// The node's armed dedup sandboxes (restored ahead of their request and left stopped;
    /// the agent reports a dedup sandbox's process memory only when it is armed): how many,
    /// and their stopped trees' memory, bytes (also inside `medes_memory_bytes{state="dedup"}`,
    /// which counts everything held for dedup sandboxes).
    pub(crate) fn armed(&self, node: &str, sandboxes: &[medes_agent::SandboxStatus]) {
        let armed = sandboxes
            .iter()
            .filter(|s| s.form == medes_agent::SandboxForm::Dedup)
            .filter_map(|s| s.memory);
        let (n, bytes) = armed.fold((0u64, 0u64), |(n, b), m| (n + 1, b + m.cgroup_usage.0));
        gauge!("medes_armed_sandboxes", "node" => node.to_string()).set(n as f64);
        gauge!("medes_armed_memory_bytes", "node" => node.to_string()).set(bytes as f64);
    }

    /// A dedup start failed and fell back to a cold start (`reason` is a short fixed label).
    pub(crate) fn dedup_start_failure(&self, reason: &'static str) {
        counter!("medes_dedup_start_failures_total", "reason" => reason).increment(1);
    }
}
