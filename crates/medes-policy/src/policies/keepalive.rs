//! Fixed keep-alive (OpenWhisk, OpenFaaS, AWS Lambda): an idle sandbox is destroyed once it has
//! been idle for a fixed period; under memory pressure the least recently used idle sandbox is
//! evicted first.

use super::{AfterRun, ClusterPolicy, FleetView, FnId, IdleSandbox, Verdict};
use crate::Timestamp;

/// Fixed keep-alive with LRU eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedKeepAlive {
    keep_alive_ms: u64,
}

impl FixedKeepAlive {
    /// A policy keeping idle sandboxes for `keep_alive_ms`.
    pub fn new(keep_alive_ms: u64) -> Self {
        FixedKeepAlive { keep_alive_ms }
    }

    /// The period, ms.
    pub fn keep_alive_ms(&self) -> u64 {
        self.keep_alive_ms
    }
}

impl ClusterPolicy for FixedKeepAlive {
    fn name(&self) -> String {
        let ms = self.keep_alive_ms;
        if ms.is_multiple_of(60_000) {
            format!("fixed-{}m", ms / 60_000)
        } else {
            format!("fixed-{}s", ms / 1000)
        }
    }

    fn on_finish(&mut self, _f: FnId, now: Timestamp) -> AfterRun {
        AfterRun {
            deadline: Some(now.plus_ms(self.keep_alive_ms)),
            ..AfterRun::default()
        }
    }

    fn next_decision(&self, _f: FnId, sb: &IdleSandbox, _now: Timestamp) -> Option<Timestamp> {
        Some(
            sb.deadline
                .unwrap_or_else(|| sb.idle_since.plus_ms(self.keep_alive_ms)),
        )
    }

    fn decide(
        &mut self,
        _f: FnId,
        sb: &IdleSandbox,
        _view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        let due = sb
            .deadline
            .unwrap_or_else(|| sb.idle_since.plus_ms(self.keep_alive_ms));
        if now >= due {
            Verdict::Purge
        } else {
            Verdict::Keep
        }
    }

    fn evict_rank(
        &self,
        _f: FnId,
        sb: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> f64 {
        // Least recently used first.
        sb.idle_since.0 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::idle;
    use super::super::{FunctionCounts, IdleState};
    use super::*;

    #[test]
    fn expires_after_the_period_and_evicts_lru() {
        let mut p = FixedKeepAlive::new(600_000);
        assert_eq!(p.name(), "fixed-10m");
        assert_eq!(FixedKeepAlive::new(90_000).name(), "fixed-90s");
        let counts = [FunctionCounts::default()];
        let view = FleetView {
            counts: &counts,
            budget_mb: 1000.0,
            used_mb: 0.0,
        };
        let after = p.on_finish(0, Timestamp(5_000));
        assert_eq!(after.deadline, Some(Timestamp(605_000)));
        assert!(!after.unload && after.prewarm.is_none());
        let mut sb = idle(IdleState::Warm, 5_000);
        sb.deadline = after.deadline;
        assert_eq!(
            p.next_decision(0, &sb, Timestamp(5_000)),
            Some(Timestamp(605_000))
        );
        assert_eq!(p.decide(0, &sb, &view, Timestamp(604_999)), Verdict::Keep);
        assert_eq!(p.decide(0, &sb, &view, Timestamp(605_000)), Verdict::Purge);
        // A clock that went backwards never purges early.
        assert_eq!(p.decide(0, &sb, &view, Timestamp(0)), Verdict::Keep);
        let old = idle(IdleState::Warm, 1_000);
        let new = idle(IdleState::Warm, 2_000);
        assert!(
            p.evict_rank(0, &old, &view, Timestamp(3_000))
                < p.evict_rank(0, &new, &view, Timestamp(3_000))
        );
    }
}
