//! Sandbox lifecycle and sandbox-management policy, as pure code.
//!
//! This crate decides; it never acts. The controller (and later the simulator) owns the
//! sandboxes, feeds this crate *views* of them together with the current time, and carries out
//! what comes back:
//!
//! - [`SandboxState`] is the lifecycle state machine of one sandbox (today's platforms:
//!   `STARTING → RUNNING ⇄ WARM → PURGING`); [`SandboxState::apply`] is the only way to move
//!   between states, so an illegal transition is an error rather than a silent corruption.
//! - [`Policy`] answers what to do with an idle sandbox ([`Decision`]) and when to ask again;
//!   [`KeepAlive`] is the fixed keep-alive policy of OpenWhisk-like platforms (10 minutes by
//!   default).
//! - [`admit`] and [`choose_victims`] implement admission under a per-node memory budget with
//!   least-recently-used eviction of idle sandboxes.
//!
//! ```
//! use medes_policy::{KeepAlive, Policy, Decision, SandboxState, SandboxView, FunctionView, Timestamp};
//! use medes_core::Bytes;
//! let mut p = KeepAlive::new(600_000);
//! let f = FunctionView { memory_limit: Bytes::mib(256), n_sandboxes: 1, n_idle: 1 };
//! let s = SandboxView { state: SandboxState::Warm { idle_since: Timestamp(0) }, created: Timestamp(0), memory: Bytes::mib(30) };
//! assert_eq!(p.next_decision(&f, &s), Some(Timestamp(600_000)));
//! assert_eq!(p.on_idle(&f, &s, Timestamp(599_999)), Decision::KeepWarm);
//! assert_eq!(p.on_idle(&f, &s, Timestamp(600_000)), Decision::Purge);
//! ```
//!
//! # Design
//! Time is a caller-supplied [`Timestamp`] (milliseconds on any monotonic clock), so tests use a
//! fake clock and the simulator replays traces faster than real time. The enums that later issues
//! extend ([`SandboxState`], [`StateKind`], [`Decision`]) are `#[non_exhaustive]`: the DEDUP and
//! BASE states of issue 5 and the Medes policy of issue 6 slot in behind the same [`Policy`] trait.
//!
//! # What this crate does not do
//! No I/O, no async runtime, no clock, no locking: it does not know how sandboxes are started or
//! destroyed, and it does not keep the list of sandboxes (the controller does).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;

use medes_core::Bytes;
use serde::{Deserialize, Serialize};

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

/// The lifecycle state of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxState {
    /// Being created and initialised (a cold start in progress).
    Starting,
    /// Serving `in_flight` invocations (≥ 1).
    Running {
        /// Invocations currently inside the sandbox.
        in_flight: u32,
    },
    /// Initialised and idle since the given time.
    Warm {
        /// When the last invocation finished (or the sandbox became ready).
        idle_since: Timestamp,
    },
    /// Being destroyed; never assigned again.
    Purging,
}

/// The state without its data, for metrics labels and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StateKind {
    /// [`SandboxState::Starting`].
    Starting,
    /// [`SandboxState::Running`].
    Running,
    /// [`SandboxState::Warm`].
    Warm,
    /// [`SandboxState::Purging`].
    Purging,
}

impl StateKind {
    /// Every kind, in a fixed order (for gauges).
    pub const ALL: [StateKind; 4] = [
        StateKind::Starting,
        StateKind::Running,
        StateKind::Warm,
        StateKind::Purging,
    ];

    /// Lowercase name used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Starting => "starting",
            StateKind::Running => "running",
            StateKind::Warm => "warm",
            StateKind::Purging => "purging",
        }
    }

    /// Position in [`StateKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            StateKind::Starting => 0,
            StateKind::Running => 1,
            StateKind::Warm => 2,
            StateKind::Purging => 3,
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happens to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The cold start finished; the sandbox serves the invocation that caused it.
    Started,
    /// An invocation was assigned to the sandbox; allowed while fewer than `concurrency`
    /// invocations are in flight.
    Assign {
        /// The action's per-sandbox concurrency limit (values below 1 count as 1).
        concurrency: u32,
    },
    /// One invocation finished (successfully or not, with the runtime still usable).
    Finished,
    /// The sandbox is to be destroyed (policy decision, eviction, failure, shutdown).
    Purge,
}

/// An event that the state machine does not allow in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event:?} is not allowed in state {state:?}")]
pub struct TransitionError {
    /// The state the sandbox was in.
    pub state: SandboxState,
    /// The rejected event.
    pub event: Event,
}

impl SandboxState {
    /// The state after `event` at time `now`, or an error if the transition is illegal.
    pub fn apply(self, event: Event, now: Timestamp) -> Result<SandboxState, TransitionError> {
        use SandboxState as S;
        let next = match (self, event) {
            (S::Starting, Event::Started) => S::Running { in_flight: 1 },
            (S::Warm { .. }, Event::Assign { .. }) => S::Running { in_flight: 1 },
            (S::Running { in_flight }, Event::Assign { concurrency })
                if in_flight < concurrency.max(1) =>
            {
                S::Running {
                    in_flight: in_flight + 1,
                }
            }
            (S::Running { in_flight }, Event::Finished) if in_flight > 1 => S::Running {
                in_flight: in_flight - 1,
            },
            (S::Running { .. }, Event::Finished) => S::Warm { idle_since: now },
            (S::Purging, Event::Purge) => return Err(TransitionError { state: self, event }),
            (_, Event::Purge) => S::Purging,
            _ => return Err(TransitionError { state: self, event }),
        };
        Ok(next)
    }

    /// The state's kind.
    pub fn kind(&self) -> StateKind {
        match self {
            SandboxState::Starting => StateKind::Starting,
            SandboxState::Running { .. } => StateKind::Running,
            SandboxState::Warm { .. } => StateKind::Warm,
            SandboxState::Purging => StateKind::Purging,
        }
    }

    /// Whether an invocation may be assigned now, given the action's concurrency limit.
    pub fn can_assign(&self, concurrency: u32) -> bool {
        match *self {
            SandboxState::Warm { .. } => true,
            SandboxState::Running { in_flight } => in_flight < concurrency.max(1),
            _ => false,
        }
    }

    /// Since when the sandbox is idle, if it is.
    pub fn idle_since(&self) -> Option<Timestamp> {
        match *self {
            SandboxState::Warm { idle_since } => Some(idle_since),
            _ => None,
        }
    }
}

/// What the policy sees of a function (action version) when deciding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionView {
    /// The action's memory limit.
    pub memory_limit: Bytes,
    /// Sandboxes of the function on the node, in any state.
    pub n_sandboxes: usize,
    /// Of which idle (warm).
    pub n_idle: usize,
}

/// What the policy sees of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxView {
    /// Current state.
    pub state: SandboxState,
    /// When the sandbox was created.
    pub created: Timestamp,
    /// Memory currently charged to it.
    pub memory: Bytes,
}

/// What to do with an idle sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Leave it warm; ask again at [`Policy::next_decision`].
    KeepWarm,
    /// Destroy it.
    Purge,
}

/// A sandbox-management policy: decides the fate of idle sandboxes.
///
/// The controller asks [`Policy::next_decision`] whenever a sandbox becomes idle, arms a timer
/// for that time, and calls [`Policy::on_idle`] when it fires (re-asking `next_decision` if the
/// answer was to keep it).
pub trait Policy: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// The decision for an idle sandbox at `now`.
    fn on_idle(
        &mut self,
        function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Decision;

    /// When to call [`Policy::on_idle`] for this sandbox next; `None`: never (not idle).
    fn next_decision(&self, function: &FunctionView, sandbox: &SandboxView) -> Option<Timestamp>;

    /// An invocation of the function arrived (for policies that learn arrival rates).
    fn on_arrival(&mut self, _function: &FunctionView, _now: Timestamp) {}
}

/// The fixed keep-alive policy of today's platforms: an idle sandbox is purged once it has been
/// idle for the keep-alive period.
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

    fn on_idle(&mut self, _: &FunctionView, sandbox: &SandboxView, now: Timestamp) -> Decision {
        match sandbox.state.idle_since() {
            Some(t) if now.since(t) >= self.keep_alive_ms => Decision::Purge,
            _ => Decision::KeepWarm,
        }
    }

    fn next_decision(&self, _: &FunctionView, sandbox: &SandboxView) -> Option<Timestamp> {
        sandbox
            .state
            .idle_since()
            .map(|t| t.plus_ms(self.keep_alive_ms))
    }
}

/// A sandbox that could be evicted to make room: an idle one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Victim<K> {
    /// The caller's handle for the sandbox.
    pub key: K,
    /// Since when it is idle (least recently used first).
    pub idle_since: Timestamp,
    /// Memory that evicting it frees.
    pub memory: Bytes,
}

/// The least recently used idle sandboxes whose eviction frees at least `need`, oldest first;
/// `None` if all of them together do not free enough. `need == 0` yields an empty list.
pub fn choose_victims<K: Copy>(
    candidates: impl IntoIterator<Item = Victim<K>>,
    need: Bytes,
) -> Option<Vec<K>> {
    if need.0 == 0 {
        return Some(Vec::new());
    }
    let mut all: Vec<Victim<K>> = candidates.into_iter().collect();
    all.sort_by_key(|v| v.idle_since);
    let mut freed = 0u64;
    let mut out = Vec::new();
    for v in all {
        freed = freed.saturating_add(v.memory.0);
        out.push(v.key);
        if freed >= need.0 {
            return Some(out);
        }
    }
    None
}

/// The outcome of admitting a sandbox of `need` bytes on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<K> {
    /// It fits as things are.
    Fits,
    /// It fits once these idle sandboxes (least recently used first) are evicted.
    Evict(Vec<K>),
    /// It does not fit now, but may once running sandboxes finish or shrink.
    Wait,
    /// It can never fit: the request exceeds the whole budget.
    Reject,
}

/// Admission of a new sandbox needing `need` on a node with `budget`, of which `used` is charged,
/// given the idle sandboxes that may be evicted. Following the answer never takes the charged
/// total above the budget.
pub fn admit<K: Copy>(
    budget: Bytes,
    used: Bytes,
    need: Bytes,
    idle: impl IntoIterator<Item = Victim<K>>,
) -> Admission<K> {
    if need > budget {
        return Admission::Reject;
    }
    let after = used.0.saturating_add(need.0);
    if after <= budget.0 {
        return Admission::Fits;
    }
    match choose_victims(idle, Bytes(after - budget.0)) {
        Some(v) => Admission::Evict(v),
        None => Admission::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Timestamp = Timestamp(1_000);

    fn check(state: SandboxState, event: Event, now: u64, expect: &str) {
        let got = match state.apply(event, Timestamp(now)) {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "{state:?} + {event:?}");
    }

    #[test]
    fn lifecycle_transitions() {
        use SandboxState as S;
        let warm = S::Warm { idle_since: T0 };
        check(S::Starting, Event::Started, 5, "Running { in_flight: 1 }");
        check(
            warm,
            Event::Assign { concurrency: 1 },
            5,
            "Running { in_flight: 1 }",
        );
        check(
            S::Running { in_flight: 1 },
            Event::Assign { concurrency: 1 },
            5,
            "error: event Assign { concurrency: 1 } is not allowed in state Running { in_flight: 1 }",
        );
        check(
            S::Running { in_flight: 1 },
            Event::Assign { concurrency: 3 },
            5,
            "Running { in_flight: 2 }",
        );
        check(
            S::Running { in_flight: 0 },
            Event::Assign { concurrency: 0 },
            5,
            "Running { in_flight: 1 }",
        );
        check(
            S::Running { in_flight: 2 },
            Event::Finished,
            5,
            "Running { in_flight: 1 }",
        );
        check(
            S::Running { in_flight: 1 },
            Event::Finished,
            7,
            "Warm { idle_since: Timestamp(7) }",
        );
        check(
            warm,
            Event::Finished,
            5,
            "error: event Finished is not allowed in state Warm { idle_since: Timestamp(1000) }",
        );
        check(
            S::Starting,
            Event::Assign { concurrency: 5 },
            5,
            "error: event Assign { concurrency: 5 } is not allowed in state Starting",
        );
        check(S::Starting, Event::Purge, 5, "Purging");
        check(warm, Event::Purge, 5, "Purging");
        check(S::Running { in_flight: 2 }, Event::Purge, 5, "Purging");
        check(
            S::Purging,
            Event::Purge,
            5,
            "error: event Purge is not allowed in state Purging",
        );
        check(
            S::Purging,
            Event::Assign { concurrency: 1 },
            5,
            "error: event Assign { concurrency: 1 } is not allowed in state Purging",
        );
        check(
            warm,
            Event::Started,
            5,
            "error: event Started is not allowed in state Warm { idle_since: Timestamp(1000) }",
        );
    }

    #[test]
    fn can_assign_matches_apply() {
        use SandboxState as S;
        for s in [
            S::Starting,
            S::Running { in_flight: 1 },
            S::Running { in_flight: 2 },
            S::Warm { idle_since: T0 },
            S::Purging,
        ] {
            for c in 0..4 {
                assert_eq!(
                    s.can_assign(c),
                    s.apply(Event::Assign { concurrency: c }, T0).is_ok(),
                    "{s:?} concurrency {c}"
                );
            }
        }
    }

    fn check_keep_alive(state: SandboxState, now: u64, expect: &str) {
        let mut p = KeepAlive::new(600_000);
        let f = FunctionView {
            memory_limit: Bytes::mib(256),
            n_sandboxes: 1,
            n_idle: 1,
        };
        let s = SandboxView {
            state,
            created: Timestamp(0),
            memory: Bytes::mib(20),
        };
        let got = format!(
            "{:?} next={:?}",
            p.on_idle(&f, &s, Timestamp(now)),
            p.next_decision(&f, &s).map(|t| t.0)
        );
        assert_eq!(got, expect, "{state:?} at {now}");
    }

    #[test]
    fn keep_alive_decisions() {
        use SandboxState as S;
        check_keep_alive(
            S::Warm { idle_since: T0 },
            1_000,
            "KeepWarm next=Some(601000)",
        );
        check_keep_alive(
            S::Warm { idle_since: T0 },
            600_999,
            "KeepWarm next=Some(601000)",
        );
        check_keep_alive(
            S::Warm { idle_since: T0 },
            601_000,
            "Purge next=Some(601000)",
        );
        check_keep_alive(
            S::Warm { idle_since: T0 },
            10_000_000,
            "Purge next=Some(601000)",
        );
        // A clock that went backwards never purges early.
        check_keep_alive(S::Warm { idle_since: T0 }, 0, "KeepWarm next=Some(601000)");
        check_keep_alive(
            S::Running { in_flight: 1 },
            10_000_000,
            "KeepWarm next=None",
        );
        check_keep_alive(S::Starting, 10_000_000, "KeepWarm next=None");
        check_keep_alive(
            S::Warm {
                idle_since: Timestamp(u64::MAX - 1),
            },
            0,
            "KeepWarm next=Some(18446744073709551615)",
        );
    }

    fn v(key: u32, idle: u64, mb: u64) -> Victim<u32> {
        Victim {
            key,
            idle_since: Timestamp(idle),
            memory: Bytes::mib(mb),
        }
    }

    fn check_admit(budget_mb: u64, used_mb: u64, need_mb: u64, idle: &[Victim<u32>], expect: &str) {
        let got = format!(
            "{:?}",
            admit(
                Bytes::mib(budget_mb),
                Bytes::mib(used_mb),
                Bytes::mib(need_mb),
                idle.iter().copied()
            )
        );
        assert_eq!(
            got, expect,
            "budget {budget_mb} used {used_mb} need {need_mb}"
        );
    }

    #[test]
    fn admission_and_lru_eviction() {
        check_admit(1024, 0, 256, &[], "Fits");
        check_admit(1024, 768, 256, &[v(1, 5, 100)], "Fits");
        check_admit(1024, 1024, 2048, &[], "Reject");
        check_admit(1024, 900, 256, &[], "Wait");
        // Oldest idle first, only as many as needed.
        check_admit(
            1024,
            1000,
            256,
            &[v(1, 50, 300), v(2, 10, 100), v(3, 30, 200)],
            "Evict([2, 3])",
        );
        check_admit(
            1024,
            1000,
            256,
            &[v(1, 50, 300), v(2, 10, 300)],
            "Evict([2])",
        );
        // Not enough idle memory: wait rather than evict uselessly.
        check_admit(1024, 1024, 256, &[v(1, 1, 100), v(2, 2, 100)], "Wait");
        check_admit(1024, 2000, 256, &[v(1, 1, 1000)], "Wait");
        check_admit(1024, 0, 0, &[], "Fits");
    }

    proptest! {
        /// Following admission decisions never takes the charged total above the budget.
        #[test]
        fn admission_never_exceeds_budget(
            budget in 1u64..10_000,
            needs in proptest::collection::vec(0u64..3_000, 1..40),
            finishes in proptest::collection::vec(any::<bool>(), 40),
        ) {
            // (key, memory, idle) of every live sandbox
            let mut live: Vec<(u32, u64, bool)> = Vec::new();
            let mut next_key = 0u32;
            for (i, need) in needs.into_iter().enumerate() {
                let used: u64 = live.iter().map(|s| s.1).sum();
                let idle = live.iter().filter(|s| s.2).map(|s| Victim { key: s.0, idle_since: Timestamp(u64::from(s.0)), memory: Bytes(s.1) });
                match admit(Bytes(budget), Bytes(used), Bytes(need), idle) {
                    Admission::Fits => {}
                    Admission::Evict(keys) => live.retain(|s| !keys.contains(&s.0)),
                    Admission::Wait | Admission::Reject => continue,
                }
                live.push((next_key, need, false));
                next_key += 1;
                let total: u64 = live.iter().map(|s| s.1).sum();
                prop_assert!(total <= budget, "total {} > budget {}", total, budget);
                if finishes[i] {
                    for s in &mut live { s.2 = true; }
                }
            }
        }
    }
}
