//! FaasCache's Greedy-Dual keep-alive (Fuerst & Sharma, ASPLOS '21): keep-alive as caching.
//!
//! Idle sandboxes never expire on a timer. Each one carries a priority set when it last served:
//! `clock + frequency × cold-start cost / size`, where frequency is the function's invocation
//! count, the cost is its cold-start latency (ms) and the size its warm footprint (MB). Under
//! memory pressure the lowest priority goes first, and the clock becomes that priority, so
//! sandboxes not used for a long time age out relative to fresh ones.

use super::{AfterRun, ClusterPolicy, FleetView, FnId, FunctionCosts, IdleSandbox, Verdict};
use crate::Timestamp;

/// Greedy-Dual keep-alive.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyDual {
    costs: Vec<FunctionCosts>,
    freq: Vec<u64>,
    clock: f64,
}

impl GreedyDual {
    /// A policy for the functions in `costs`.
    pub fn new(costs: Vec<FunctionCosts>) -> Self {
        GreedyDual {
            freq: vec![0; costs.len()],
            costs,
            clock: 0.0,
        }
    }

    /// The current clock.
    pub fn clock(&self) -> f64 {
        self.clock
    }

    /// The priority a sandbox of `f` gets when it serves now.
    pub fn priority(&self, f: FnId) -> f64 {
        let Some(c) = self.costs.get(f) else {
            return self.clock;
        };
        let freq = self.freq.get(f).copied().unwrap_or(0) as f64;
        self.clock + freq * c.cold_ms.max(0.0) / c.warm_mb.max(1e-3)
    }
}

impl ClusterPolicy for GreedyDual {
    fn name(&self) -> String {
        "greedy-dual".into()
    }

    fn on_arrival(&mut self, f: FnId, _now: Timestamp) {
        if let Some(n) = self.freq.get_mut(f) {
            *n += 1;
        }
    }

    fn on_finish(&mut self, f: FnId, _now: Timestamp) -> AfterRun {
        AfterRun {
            score: self.priority(f),
            ..AfterRun::default()
        }
    }

    fn next_decision(&self, _f: FnId, _sb: &IdleSandbox, _now: Timestamp) -> Option<Timestamp> {
        None
    }

    fn decide(
        &mut self,
        _f: FnId,
        _sb: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> Verdict {
        Verdict::Keep
    }

    fn evict_rank(
        &self,
        _f: FnId,
        sb: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> f64 {
        sb.score
    }

    fn on_evicted(&mut self, _f: FnId, rank: f64) {
        if rank > self.clock {
            self.clock = rank;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{costs, idle};
    use super::super::{FunctionCounts, IdleState};
    use super::*;

    #[test]
    fn eviction_order_follows_priority_and_the_clock_ages_old_sandboxes() {
        // f0: linalg (835 ms / 32 MB ≈ 26 per use), f1: modelserve (1575 / 90 ≈ 17.5 per use).
        let mut p = GreedyDual::new(costs());
        let counts = [FunctionCounts::default(); 2];
        let view = FleetView {
            counts: &counts,
            budget_mb: 1.0,
            used_mb: 0.0,
        };
        let t = Timestamp(0);
        p.on_arrival(0, t);
        let a = p.on_finish(0, t);
        p.on_arrival(1, t);
        let b = p.on_finish(1, t);
        assert!((a.score - 835.0 / 32.0).abs() < 1e-9);
        assert!((b.score - 1575.0 / 90.0).abs() < 1e-9);
        assert!(a.deadline.is_none() && !a.unload);
        let mut sa = idle(IdleState::Warm, 0);
        sa.score = a.score;
        let mut sb = idle(IdleState::Warm, 0);
        sb.score = b.score;
        assert_eq!(p.decide(0, &sa, &view, Timestamp(u64::MAX)), Verdict::Keep);
        assert_eq!(p.next_decision(0, &sa, t), None);
        // modelserve is cheaper per MB to lose: evicted first.
        let (ra, rb) = (
            p.evict_rank(0, &sa, &view, t),
            p.evict_rank(1, &sb, &view, t),
        );
        assert!(rb < ra);
        p.on_evicted(1, rb);
        assert_eq!(p.clock(), rb);
        // A modelserve sandbox used now outranks the old linalg one: the clock aged it.
        p.on_arrival(1, t);
        let c = p.on_finish(1, t);
        assert!(c.score > a.score, "{} vs {}", c.score, a.score);
        // Evicting something older never moves the clock back.
        p.on_evicted(0, 1.0);
        assert_eq!(p.clock(), rb);
    }
}
