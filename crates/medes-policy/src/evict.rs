//! Eviction order under memory pressure, shared by the simulator's Medes
//! ([`crate::policies::Medes`] with `evict_greedy_dual`) and the live controller
//! ([`crate::Policy::eviction_order`]).
//!
//! **Greedy-Dual** (FaasCache, Fuerst & Sharma ASPLOS '21) with deduplication as the cheaper
//! state: an idle sandbox's priority is
//!
//! `L + n × max(s_cold − s_own, 0) ÷ m`
//!
//! where `L` is its node's aging clock when the sandbox last served ([`GreedyDualClock`]), `n`
//! the function's invocations so far, `s_cold` its cold-start latency, `s_own` the start the
//! sandbox offers (a warm start, or a dedup start for a dedup sandbox) and `m` the memory it
//! holds (m_W, or m_D deduplicated). The lowest priority is evicted first and the clock becomes
//! its priority, so sandboxes unused for long age out relative to fresh ones. With template
//! starts on, keeping any idle sandbox saves only a template start minus its own (100–300 ms for
//! every suite function), so the order is least recently used (measured better in the
//! simulator, docs/EVALUATION.md).
//!
//! The caller keeps `L` per sandbox and the clock per node (the simulator: one clock in the
//! policy; the live controller: one per node, in its books).

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::lifecycle::SandboxState;
use crate::view::{FunctionView, SandboxView};

/// How the live controller orders idle sandboxes for eviction ([`crate::Policy::eviction_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionOrder {
    /// The policy's own [`crate::Policy::eviction_rank`] (least recently used by default).
    #[default]
    Policy,
    /// Greedy-Dual with dedup as the cheaper state ([`greedy_dual_rank`]), aged by a
    /// [`GreedyDualClock`] per node.
    GreedyDual,
}

/// What Greedy-Dual ranks one idle sandbox by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GreedyDualInput {
    /// `L`: the node's clock when the sandbox last served (0 if it never did).
    pub clock_at_use: f64,
    /// `n`: the function's invocations so far.
    pub arrivals: u64,
    /// The function's cold-start latency, ms.
    pub cold_ms: f64,
    /// The start this sandbox offers (warm, or dedup for a dedup sandbox), ms.
    pub own_start_ms: f64,
    /// The memory it holds, MB (any unit, as long as it is the same for every sandbox).
    pub held_mb: f64,
    /// Template starts are on: least recently used instead (see the module docs).
    pub template_starts: bool,
    /// When it last served (the order with template starts).
    pub last_used: Timestamp,
}

/// The sandbox's Greedy-Dual priority: lower is evicted first (see the module docs).
pub fn greedy_dual_rank(i: &GreedyDualInput) -> f64 {
    if i.template_starts {
        return i.last_used.0 as f64;
    }
    let saved = (i.cold_ms - i.own_start_ms).max(0.0);
    let rank = i.clock_at_use + i.arrivals as f64 * saved / i.held_mb.max(1e-3);
    if rank.is_nan() { i.clock_at_use } else { rank }
}

/// Greedy-Dual's aging clock (one per cache: a node).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GreedyDualClock(f64);

impl GreedyDualClock {
    /// Its value: a sandbox that serves now takes it as its `L`.
    pub fn value(&self) -> f64 {
        self.0
    }

    /// A sandbox of priority `rank` was evicted: the clock moves up to it (never back).
    pub fn on_evicted(&mut self, rank: f64) {
        if rank.is_finite() && rank > self.0 {
            self.0 = rank;
        }
    }
}

/// Defaults when a function has no measurement yet (the prototype's, MEDES.md §5): warm start
/// 10 ms, dedup start 300 ms; an unknown cold start is taken as 1 s.
const DEFAULT_WARM_MS: f64 = 10.0;
const DEFAULT_DEDUP_MS: f64 = 300.0;
const DEFAULT_COLD_MS: f64 = 1_000.0;

/// The live controller's [`GreedyDualInput`] for an idle sandbox: the function's measured
/// latencies (EWMA; the defaults above before any measurement) and invocations so far, the
/// memory the sandbox is charged (its own measurement: what evicting it frees; the function's
/// footprint if it is charged nothing).
pub fn live_greedy_dual_input(
    function: &FunctionView,
    sandbox: &SandboxView,
    clock_at_use: f64,
    template_starts: bool,
    now: Timestamp,
) -> GreedyDualInput {
    let mb = |b: medes_core::Bytes| b.0 as f64 / (1024.0 * 1024.0);
    let dedup = matches!(sandbox.state, SandboxState::Dedup { .. });
    let lat = &function.latency;
    let own_start_ms = if dedup {
        lat.dedup_ms.unwrap_or(DEFAULT_DEDUP_MS)
    } else {
        lat.warm_ms.unwrap_or(DEFAULT_WARM_MS)
    };
    let footprint = if dedup {
        function.footprint.dedup
    } else {
        function.footprint.warm
    };
    let held_mb = if sandbox.memory.0 > 0 {
        mb(sandbox.memory)
    } else {
        footprint.map_or(mb(function.memory_limit), mb)
    };
    GreedyDualInput {
        clock_at_use,
        arrivals: function.arrivals.total,
        cold_ms: lat.cold_ms.unwrap_or(DEFAULT_COLD_MS),
        own_start_ms,
        held_mb,
        template_starts,
        last_used: sandbox.state.last_used().unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use medes_core::{ActionName, Bytes, Namespace};

    use super::*;

    fn input(clock: f64, arrivals: u64, cold: f64, own: f64, mb: f64) -> GreedyDualInput {
        GreedyDualInput {
            clock_at_use: clock,
            arrivals,
            cold_ms: cold,
            own_start_ms: own,
            held_mb: mb,
            template_starts: false,
            last_used: Timestamp(7),
        }
    }

    #[test]
    fn priority_is_clock_plus_frequency_times_saving_per_mb() {
        // 10 × (835 − 10) / 32.
        let r = greedy_dual_rank(&input(5.0, 10, 835.0, 10.0, 32.0));
        assert!((r - (5.0 + 10.0 * 825.0 / 32.0)).abs() < 1e-9);
        // A dedup sandbox saves less but holds far less: it ranks above its warm twin.
        let d = greedy_dual_rank(&input(5.0, 10, 835.0, 157.0, 2.0));
        assert!(d > r);
        // A start no faster than a cold start saves nothing: only the clock remains.
        assert_eq!(greedy_dual_rank(&input(3.0, 10, 100.0, 500.0, 1.0)), 3.0);
        // Nothing held, NaN inputs: finite, never a panic.
        assert!(greedy_dual_rank(&input(0.0, 1, 100.0, 0.0, 0.0)).is_finite());
        assert_eq!(greedy_dual_rank(&input(2.0, 1, f64::NAN, 0.0, 1.0)), 2.0);
        // Template starts: least recently used.
        let mut t = input(5.0, 10, 835.0, 10.0, 32.0);
        t.template_starts = true;
        assert_eq!(greedy_dual_rank(&t), 7.0);
    }

    #[test]
    fn the_clock_only_moves_up() {
        let mut c = GreedyDualClock::default();
        c.on_evicted(12.5);
        c.on_evicted(3.0);
        c.on_evicted(f64::INFINITY);
        c.on_evicted(f64::NAN);
        assert_eq!(c.value(), 12.5);
    }

    #[test]
    fn live_input_takes_measurements_and_falls_back_to_defaults() {
        let name = ActionName {
            namespace: Namespace("guest".into()),
            name: "f".into(),
        };
        let mut f = FunctionView::new(name, Bytes::mib(256));
        f.arrivals.total = 4;
        let warm = SandboxView::new(
            SandboxState::Warm {
                idle_since: Timestamp(9),
            },
            Timestamp(0),
            Bytes::mib(64),
        );
        let i = live_greedy_dual_input(&f, &warm, 1.5, false, Timestamp(20));
        assert_eq!(
            (i.cold_ms, i.own_start_ms, i.held_mb, i.arrivals),
            (1_000.0, 10.0, 64.0, 4)
        );
        assert_eq!((i.clock_at_use, i.last_used), (1.5, Timestamp(9)));
        f.latency.cold_ms = Some(800.0);
        f.latency.dedup_ms = Some(120.0);
        f.footprint.dedup = Some(Bytes::mib(3));
        let dedup = SandboxView::new(
            SandboxState::Dedup {
                since: Timestamp(9),
                idle_since: Timestamp(9),
            },
            Timestamp(0),
            Bytes(0),
        );
        let i = live_greedy_dual_input(&f, &dedup, 0.0, false, Timestamp(20));
        assert_eq!((i.cold_ms, i.own_start_ms, i.held_mb), (800.0, 120.0, 3.0));
    }
}
