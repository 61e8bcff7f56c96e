//! Sandbox lifecycle and sandbox-management policy, as pure code.
//!
//! This crate decides; it never acts. The controller (and the simulator) owns the sandboxes,
//! feeds this crate *views* of them together with the current time, and carries out what comes
//! back:
//!
//! - [`SandboxState`] is the lifecycle state machine of one sandbox (the paper's Fig. 4b:
//!   `STARTING → RUNNING ⇄ WARM → CHECKPOINTING → DEDUP → RESTORING → RUNNING`, and
//!   `PURGING`); [`SandboxState::apply`] is the only way to move between states, so an illegal
//!   transition is an error rather than a silent corruption. A *base* is not a state but a
//!   [`Form`] of a live sandbox: it keeps serving like a warm one.
//! - [`Policy`] answers what to do with an idle sandbox ([`Decision`]: keep, dedup, make base,
//!   purge), when to ask again, how to rank eviction victims, and (on a timer) which functions
//!   to pre-warm. [`enforce`] applies the platform's invariants to any policy's answer.
//!   [`KeepAlive`] is the fixed keep-alive policy (10 minutes); [`DedupRule`] is the simple
//!   dedup rule of issue 5 (idle period → base or dedup, keep-dedup, T dedups per base).
//! - [`PolicySettings`] is the operator's knob (policy choice, Medes's latency α or memory M0,
//!   the timers, globally and per function); [`PolicySettings::build`] turns it into a
//!   [`Policy`] ([`Tuned`]: one policy per overridden function).
//! - [`FunctionView`], [`SandboxView`] and [`ClusterView`] are what a policy sees: counts per
//!   state, arrival statistics ([`ArrivalWindow`]: λ_max over a sliding window of per-minute
//!   buckets), measured start latencies ([`Ewma`]) and footprints.
//! - [`admit`] and [`choose_victims`] implement admission under a per-node memory budget with
//!   eviction of idle sandboxes in the policy's order: its own [`Policy::eviction_rank`], or
//!   Greedy-Dual with dedup as the cheaper state ([`EvictionOrder`], [`greedy_dual_rank`], the
//!   one ranking the simulator's Medes and the live controller share).
//!
//! ```
//! use medes_core::{ActionName, Bytes, Namespace};
//! use medes_policy::*;
//! let mut p = DedupRule::new(RuleConfig::default());
//! let name = ActionName { namespace: Namespace("guest".into()), name: "f".into() };
//! let f = FunctionView::new(name, Bytes::mib(256));
//! let s = SandboxView::new(SandboxState::Warm { idle_since: Timestamp(0) }, Timestamp(0), Bytes::mib(30));
//! let c = ClusterView::default();
//! assert_eq!(p.next_decision(&f, &s, Timestamp(0)), Some(Timestamp(60_000)));
//! assert_eq!(p.on_idle(&c, &f, &s, Timestamp(59_999)), Decision::KeepWarm);
//! // The first sandbox of the function on its node to reach a decision becomes a base.
//! assert_eq!(p.on_idle(&c, &f, &s, Timestamp(60_000)), Decision::Base);
//! ```
//!
//! # Design
//! Time is a caller-supplied [`Timestamp`] (milliseconds on any monotonic clock), so tests use a
//! fake clock and the simulator replays traces faster than real time. The statistics a policy
//! needs are kept by the caller with the pure helpers here and passed in views, so the live
//! controller and the simulator feed a policy the same numbers; a policy keeps only its own
//! private state (histograms, priorities). The enums later issues extend are `#[non_exhaustive]`.
//!
//! # What this crate does not do
//! No I/O, no async runtime, no clock, no locking: it does not know how sandboxes are started,
//! checkpointed or destroyed, and it does not keep the list of sandboxes (the controller does).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod admission;
mod evict;
mod knob;
mod lifecycle;
pub mod policies;
mod policy;
mod view;

use serde::{Deserialize, Serialize};

pub use admission::{Admission, Victim, admit, choose_victims};
pub use evict::{
    EvictionOrder, GreedyDualClock, GreedyDualInput, greedy_dual_rank, live_greedy_dual_input,
};
pub use knob::{
    FunctionKnob, KnobError, KnobMode, PolicyChoice, PolicyControl, PolicySettings, PolicyUpdate,
    Timers, Tuned,
};
pub use lifecycle::{Event, Form, Purpose, SandboxState, StateKind, TransitionError, label};
pub use policy::{Decision, DedupRule, KeepAlive, Policy, Prewarm, RuleConfig, enforce};
pub use view::{
    ArrivalSummary, ArrivalWindow, ClusterView, Counts, Ewma, Footprints, FunctionView,
    SandboxView, StartLatencies,
};

/// A point in time, in milliseconds on the caller's monotonic clock.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self + ms`, saturating.
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
    /// Milliseconds from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests;
