//! The [`Policy`] trait, the platform's invariants on its answers ([`enforce`]), and the two
//! policies shipped here: fixed keep-alive and the simple dedup rule of issue 5.

use medes_core::ActionName;
use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::evict::EvictionOrder;
use crate::lifecycle::{Form, SandboxState};
use crate::view::{ClusterView, FunctionView, SandboxView};

/// What to do with an idle sandbox (warm, base or dedup) whose decision time came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Decision {
    /// Leave it as it is (warm, base or dedup); ask again at [`Policy::next_decision`].
    KeepWarm,
    /// Checkpoint and deduplicate it (a warm sandbox only).
    Dedup,
    /// Make it a base: checkpoint it, register its pages, keep it serving (a warm sandbox only).
    Base,
    /// Destroy it (a base only once no dedup sandbox depends on it).
    Purge,
}

/// A request to start sandboxes without an invocation (pre-warming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prewarm {
    /// The function.
    pub function: ActionName,
    /// How many sandboxes to start now.
    pub count: usize,
}

/// A sandbox-management policy: decides the fate of idle sandboxes, optionally on a timer.
///
/// The caller (the controller, or the simulator) drives it so:
/// - whenever a sandbox becomes idle (warm after a run, base after its checkpoint, dedup after
///   its dedup), it asks [`Policy::next_decision`] and arms a timer for that time;
/// - when the timer fires it calls [`Policy::on_idle`], passes the answer through [`enforce`]
///   and carries it out; if the sandbox stays, it asks `next_decision` again;
/// - on each invocation it calls [`Policy::on_arrival`] (before scheduling it);
/// - if [`Policy::tick_ms`] is `Some`, it calls [`Policy::on_tick`] that often with every
///   known function and starts the sandboxes asked for;
/// - under memory pressure it evicts idle sandboxes in increasing [`Policy::eviction_rank`]
///   (never a base with dependents), telling the policy through [`Policy::on_removed`].
///
/// The caller keeps the statistics in the views ([`crate::ArrivalWindow`], [`crate::Ewma`]);
/// a policy keeps whatever else it needs (histograms, priorities) in `self`.
pub trait Policy: Send + Sync {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// The decision for an idle sandbox at `now`.
    fn on_idle(
        &mut self,
        cluster: &ClusterView,
        function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Decision;

    /// When to call [`Policy::on_idle`] for this sandbox next: a time after `now`, or `None`
    /// for never (the sandbox is not idle, or nothing will change by itself).
    fn next_decision(
        &self,
        function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp>;

    /// An invocation of the function arrived (`function.arrivals` already counts it).
    fn on_arrival(&mut self, _function: &FunctionView, _now: Timestamp) {}

    /// How often [`Policy::on_tick`] wants to run, ms; `None` (the default): never.
    fn tick_ms(&self) -> Option<u64> {
        None
    }

    /// Timer-driven work (e.g. recomputing λ_max, budget splits); returns sandboxes to pre-warm.
    fn on_tick(
        &mut self,
        _cluster: &ClusterView,
        _functions: &[FunctionView],
        _now: Timestamp,
    ) -> Vec<Prewarm> {
        Vec::new()
    }

    /// Eviction order under memory pressure: lower goes first. The default is least recently
    /// used (the time the sandbox last served, in ms).
    fn eviction_rank(
        &self,
        _function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> f64 {
        sandbox.state.last_used().unwrap_or(now).0 as f64
    }

    /// Which eviction order the caller uses: [`EvictionOrder::Policy`] (the default) ranks
    /// by [`Policy::eviction_rank`]; [`EvictionOrder::GreedyDual`] by
    /// [`crate::greedy_dual_rank`], the caller keeping the aging clock per node and each
    /// sandbox's clock when it last served.
    fn eviction_order(&self) -> EvictionOrder {
        EvictionOrder::Policy
    }

    /// A sandbox of the function is gone (purged by decision, evicted, failed).
    fn on_removed(&mut self, _function: &FunctionView, _sandbox: &SandboxView, _now: Timestamp) {}
}

/// The platform's invariants applied to a policy's answer:
/// - only warm and dedup sandboxes are decided about; anything else is kept as it is;
/// - there is no policy-driven DEDUP → WARM: a dedup sandbox is kept (deduplicated) or purged;
/// - a base is never purged while dedup sandboxes depend on it, nor checkpointed again;
/// - a sandbox that is not deduplicable, or any sandbox when `dedup_enabled` is false, is never
///   made a base or dedup.
pub fn enforce(decision: Decision, sandbox: &SandboxView, dedup_enabled: bool) -> Decision {
    match sandbox.state {
        SandboxState::Dedup { .. } => match decision {
            Decision::Purge => Decision::Purge,
            _ => Decision::KeepWarm,
        },
        SandboxState::Warm { .. } => match (decision, sandbox.form) {
            (Decision::Purge, Form::Base) if sandbox.dependents > 0 => Decision::KeepWarm,
            (Decision::Dedup | Decision::Base, Form::Base) => Decision::KeepWarm,
            (Decision::Dedup | Decision::Base, _) if !dedup_enabled || !sandbox.deduplicable => {
                Decision::KeepWarm
            }
            (d, _) => d,
        },
        _ => Decision::KeepWarm,
    }
}

/// The fixed keep-alive policy of today's platforms: an idle sandbox is purged once it has been
/// idle for the keep-alive period. It never deduplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    keep_alive_ms: u64,
}

impl KeepAlive {
    /// The default keep-alive period, 10 minutes (OpenWhisk's default).
    pub const DEFAULT_MS: u64 = 600_000;

    /// A keep-alive policy with the given period in milliseconds.
    pub fn new(keep_alive_ms: u64) -> Self {
        KeepAlive { keep_alive_ms }
    }

    /// The period in milliseconds.
    pub fn keep_alive_ms(&self) -> u64 {
        self.keep_alive_ms
    }
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive::new(Self::DEFAULT_MS)
    }
}

impl Policy for KeepAlive {
    fn name(&self) -> &'static str {
        "keep-alive"
    }

    fn on_idle(
        &mut self,
        _: &ClusterView,
        _: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Decision {
        match sandbox.state.last_used() {
            Some(t) if now.since(t) >= self.keep_alive_ms => Decision::Purge,
            _ => Decision::KeepWarm,
        }
    }

    fn next_decision(
        &self,
        _: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let t = sandbox.state.last_used()?.plus_ms(self.keep_alive_ms);
        (t > now).then_some(t)
    }
}

/// Settings of [`DedupRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Idle time after which a warm sandbox is decided about (made base or dedup), ms.
    /// Default 60 000 (the paper's idle period).
    pub idle_period_ms: u64,
    /// Idle time after which a warm sandbox (a base only without dependents) is purged, ms.
    /// Default 600 000.
    pub keep_alive_ms: u64,
    /// Time a dedup sandbox is kept, from its dedup, ms. Default 900 000 (the paper's 15 min).
    pub keep_dedup_ms: u64,
    /// T: one more base of a function on a node whenever dedup ÷ base > T. Default 40.
    pub dedup_per_base: u32,
    /// Whether sandboxes are deduplicated at all; `false` is plain keep-alive. Default true.
    pub dedup_enabled: bool,
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig {
            idle_period_ms: 60_000,
            keep_alive_ms: KeepAlive::DEFAULT_MS,
            keep_dedup_ms: 900_000,
            dedup_per_base: 40,
            dedup_enabled: true,
        }
    }
}

/// The simple dedup rule used until the Medes policy lands:
/// - a warm sandbox idle for the idle period becomes a **base** if its function has no base on
///   its node, or if dedup ÷ base > T there; otherwise it is **deduplicated**;
/// - a warm sandbox that is not deduplicable (and a base) is purged after the keep-alive;
/// - a dedup sandbox is purged after keep-dedup (from its dedup); never turned back warm;
/// - with `dedup_enabled = false` it is exactly [`KeepAlive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DedupRule {
    cfg: RuleConfig,
}

impl DedupRule {
    /// The rule with the given settings.
    pub fn new(cfg: RuleConfig) -> Self {
        DedupRule { cfg }
    }

    /// Its settings.
    pub fn config(&self) -> &RuleConfig {
        &self.cfg
    }

    fn wants_dedup(&self, sandbox: &SandboxView) -> bool {
        self.cfg.dedup_enabled && sandbox.deduplicable && sandbox.form == Form::Plain
    }
}

impl Policy for DedupRule {
    fn name(&self) -> &'static str {
        if self.cfg.dedup_enabled {
            "dedup-rule"
        } else {
            "keep-alive"
        }
    }

    fn on_idle(
        &mut self,
        _: &ClusterView,
        _: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Decision {
        match sandbox.state {
            SandboxState::Dedup { since, .. } => {
                if now.since(since) >= self.cfg.keep_dedup_ms {
                    Decision::Purge
                } else {
                    Decision::KeepWarm
                }
            }
            SandboxState::Warm { idle_since } => {
                let idle = now.since(idle_since);
                if idle >= self.cfg.keep_alive_ms {
                    Decision::Purge
                } else if !self.wants_dedup(sandbox) || idle < self.cfg.idle_period_ms {
                    Decision::KeepWarm
                } else {
                    let l = &sandbox.local;
                    let t = l.base.saturating_mul(self.cfg.dedup_per_base as usize);
                    if l.base == 0 || l.dedup > t {
                        Decision::Base
                    } else {
                        Decision::Dedup
                    }
                }
            }
            _ => Decision::KeepWarm,
        }
    }

    fn next_decision(
        &self,
        _: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let candidates = match sandbox.state {
            SandboxState::Dedup { since, .. } => {
                [Some(since.plus_ms(self.cfg.keep_dedup_ms)), None]
            }
            SandboxState::Warm { idle_since } => [
                self.wants_dedup(sandbox)
                    .then(|| idle_since.plus_ms(self.cfg.idle_period_ms)),
                Some(idle_since.plus_ms(self.cfg.keep_alive_ms)),
            ],
            _ => [None, None],
        };
        candidates.into_iter().flatten().filter(|&t| t > now).min()
    }
}
