//! The lifecycle state machine of one sandbox.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Why a warm sandbox is being checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// To become a base: its page image is registered and stays resident; the sandbox keeps
    /// running (warm) afterwards.
    Base,
    /// To become a dedup sandbox: the process is gone afterwards, only the deduplicated image is
    /// kept.
    Dedup,
}

/// What a live sandbox is, beyond its state: a plain sandbox or a base (a warm sandbox whose
/// checkpoint pages are registered so that dedup sandboxes reference them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// An ordinary sandbox.
    #[default]
    Plain,
    /// A base sandbox: serves like a warm sandbox, keeps a resident page image.
    Base,
}

/// The lifecycle state of one sandbox.
///
/// ```text
///  Starting ──Started──▶ Running ⇄ Warm ──Checkpoint(Dedup)──▶ Checkpointing ──Done──▶ Dedup
///     │ Ready                       ▲ │                          │ Failed ─▶ Warm
///     └──────────────────▶ Warm     │ └─Checkpoint(Base)─▶ Checkpointing ──Done──▶ Warm (form Base)
///                                   │
///  Dedup ──Restore──▶ Restoring ──Restored──▶ Running ──Finished──▶ Warm
///  (any state but Purging) ──Purge──▶ Purging
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SandboxState {
    /// Being created and initialised (a cold start or a pre-warm in progress).
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
    /// Being checkpointed (transient; never assigned).
    Checkpointing {
        /// Idle since (unchanged by the checkpoint).
        idle_since: Timestamp,
        /// What the checkpoint is for.
        purpose: Purpose,
    },
    /// Checkpointed and deduplicated: no process, only the deduplicated image.
    Dedup {
        /// When it became a dedup sandbox.
        since: Timestamp,
        /// When it last finished serving (the idle clock of the original warm sandbox).
        idle_since: Timestamp,
    },
    /// Being restored from its deduplicated image for an invocation (a dedup start).
    Restoring,
    /// Being destroyed; never assigned again.
    Purging,
}

/// The state without its data, for metrics labels and counting. [`StateKind::Base`] is never
/// the kind of a [`SandboxState`]: it is the label of a live sandbox of [`Form::Base`] (see
/// [`label`]).
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
    /// [`SandboxState::Checkpointing`].
    Checkpointing,
    /// [`SandboxState::Dedup`].
    Dedup,
    /// [`SandboxState::Restoring`].
    Restoring,
    /// A base sandbox (warm, running or being checkpointed).
    Base,
    /// [`SandboxState::Purging`].
    Purging,
}

impl StateKind {
    /// Every kind, in a fixed order (for gauges).
    pub const ALL: [StateKind; 8] = [
        StateKind::Starting,
        StateKind::Running,
        StateKind::Warm,
        StateKind::Checkpointing,
        StateKind::Dedup,
        StateKind::Restoring,
        StateKind::Base,
        StateKind::Purging,
    ];

    /// Lowercase name used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Starting => "starting",
            StateKind::Running => "running",
            StateKind::Warm => "warm",
            StateKind::Checkpointing => "checkpointing",
            StateKind::Dedup => "dedup",
            StateKind::Restoring => "restoring",
            StateKind::Base => "base",
            StateKind::Purging => "purging",
        }
    }

    /// Position in [`StateKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            StateKind::Starting => 0,
            StateKind::Running => 1,
            StateKind::Warm => 2,
            StateKind::Checkpointing => 3,
            StateKind::Dedup => 4,
            StateKind::Restoring => 5,
            StateKind::Base => 6,
            StateKind::Purging => 7,
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The label of a sandbox in `state` of `form`: [`StateKind::Base`] for a base that is alive
/// and not being purged, else the state's kind.
pub fn label(state: SandboxState, form: Form) -> StateKind {
    match (form, state.kind()) {
        (Form::Base, StateKind::Warm | StateKind::Running | StateKind::Checkpointing) => {
            StateKind::Base
        }
        (_, k) => k,
    }
}

/// Something that happens to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The cold start finished; the sandbox serves the invocation that caused it.
    Started,
    /// The sandbox was started without an invocation (a pre-warm) and is ready.
    Ready,
    /// An invocation was assigned to the sandbox; allowed while fewer than `concurrency`
    /// invocations are in flight.
    Assign {
        /// The action's per-sandbox concurrency limit (values below 1 count as 1).
        concurrency: u32,
    },
    /// One invocation finished (successfully or not, with the runtime still usable).
    Finished,
    /// A checkpoint of the idle sandbox begins.
    Checkpoint(Purpose),
    /// The checkpoint succeeded.
    CheckpointDone,
    /// The checkpoint failed and the sandbox is still warm (if it died, purge it).
    CheckpointFailed,
    /// An invocation was assigned to the dedup sandbox: restore it.
    Restore,
    /// The restore succeeded; the sandbox serves the invocation that caused it.
    Restored,
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
            (S::Starting, Event::Ready) => S::Warm { idle_since: now },
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
            (S::Warm { idle_since }, Event::Checkpoint(purpose)) => S::Checkpointing {
                idle_since,
                purpose,
            },
            (
                S::Checkpointing {
                    idle_since,
                    purpose: Purpose::Base,
                },
                Event::CheckpointDone,
            ) => S::Warm { idle_since },
            (
                S::Checkpointing {
                    idle_since,
                    purpose: Purpose::Dedup,
                },
                Event::CheckpointDone,
            ) => S::Dedup {
                since: now,
                idle_since,
            },
            (S::Checkpointing { idle_since, .. }, Event::CheckpointFailed) => {
                S::Warm { idle_since }
            }
            (S::Dedup { .. }, Event::Restore) => S::Restoring,
            (S::Restoring, Event::Restored) => S::Running { in_flight: 1 },
            (S::Purging, Event::Purge) => return Err(TransitionError { state: self, event }),
            (_, Event::Purge) => S::Purging,
            _ => return Err(TransitionError { state: self, event }),
        };
        Ok(next)
    }

    /// The state's kind (never [`StateKind::Base`]; see [`label`]).
    pub fn kind(&self) -> StateKind {
        match self {
            SandboxState::Starting => StateKind::Starting,
            SandboxState::Running { .. } => StateKind::Running,
            SandboxState::Warm { .. } => StateKind::Warm,
            SandboxState::Checkpointing { .. } => StateKind::Checkpointing,
            SandboxState::Dedup { .. } => StateKind::Dedup,
            SandboxState::Restoring => StateKind::Restoring,
            SandboxState::Purging => StateKind::Purging,
        }
    }

    /// Whether an invocation may be assigned now (without a restore), given the action's
    /// concurrency limit.
    pub fn can_assign(&self, concurrency: u32) -> bool {
        match *self {
            SandboxState::Warm { .. } => true,
            SandboxState::Running { in_flight } => in_flight < concurrency.max(1),
            _ => false,
        }
    }

    /// Whether an invocation may be assigned through a restore (a dedup start).
    pub fn can_restore(&self) -> bool {
        matches!(self, SandboxState::Dedup { .. })
    }

    /// Since when the sandbox is idle and warm, if it is.
    pub fn idle_since(&self) -> Option<Timestamp> {
        match *self {
            SandboxState::Warm { idle_since } => Some(idle_since),
            _ => None,
        }
    }

    /// Since when the sandbox last served, if it is idle (warm, checkpointing or dedup).
    pub fn last_used(&self) -> Option<Timestamp> {
        match *self {
            SandboxState::Warm { idle_since }
            | SandboxState::Checkpointing { idle_since, .. }
            | SandboxState::Dedup { idle_since, .. } => Some(idle_since),
            _ => None,
        }
    }
}
