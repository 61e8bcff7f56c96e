//! A deterministic, trace-driven simulator of a serverless cluster under a sandbox-management
//! policy, the Medes paper's evaluation setup, and the evaluation report.
//!
//! - [`simulate`] replays a [`medes_trace::Trace`] through a
//!   [`medes_policy::policies::ClusterPolicy`] on a modelled cluster ([`ClusterConfig`]: nodes ×
//!   per-node memory budget) with per-function costs from a [`Profile`] (the paper's numbers
//!   built in, or measured on the live platform: [`Profile::from_bench`]). It returns
//!   per-invocation records, memory samples and a [`Summary`].
//! - [`PolicySpec`] names policies and their knobs (`fixed-10m`, `hybrid-histogram`,
//!   `greedy-dual`, `medes`, `medes-kd-5m`, `medes-latency`, ...).
//! - [`eval`] runs the paper's setup (19 nodes, 40/30/20 GB pools, ten functions, five one-hour
//!   patterns) for every policy in parallel, and [`report`] writes the Markdown report with
//!   PNG plots next to the paper's numbers.
//! - [`tradeoff`] compares memory at fixed keep-alive's latency and checks that Medes's
//!   cold-starts-vs-memory curve dominates every baseline's where memory is contended.
//!
//! # Model (the paper's scheduler, MEDES.md §5.3)
//! An invocation takes, in order: an idle warm sandbox (or base) of its function (most recently
//! used first), a dedup sandbox (a restore: at most 10 at once per node, needing room for
//! m_W − m_D + m_R), or a cold start on the node with the most free memory among those staying
//! under 0.95 × the node budget. Without such a node, idle warm and dedup sandboxes are evicted
//! in the policy's order (the policy's first victim picks the node); bases are never evicted.
//! If nothing can be freed, the invocation waits (its wait counts in its startup latency).
//! Idle sandboxes are decided on by timers the policy sets; a dedup operation takes its
//! profiled time during which the sandbox keeps its warm footprint; a restore holds m_R extra
//! until it completes. A sandbox serves one invocation at a time.
//!
//! # Design
//! Single-threaded discrete events ordered by (time, sequence number): the same trace, profile,
//! policy and seed give the same output, bit for bit. Execution times are drawn from a ChaCha8
//! stream in start order. Parallelism is across runs ([`eval`] uses rayon).
//!
//! # What this crate does not do
//! No CPU contention (a node runs any number of invocations at once), no network, no failures
//! (dedup and restores always succeed), no per-request queueing behind busy sandboxes.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod engine;
pub mod eval;
mod output;
mod profile;
pub mod report;
mod spec;
pub mod tradeoff;

pub use engine::{ClusterConfig, Counters, SimConfig, SimError, simulate};
pub use output::{
    FunctionSummary, InvocationRecord, MemorySample, OutputError, SimOutput, Summary,
    SummaryBuilder, percentile,
};
pub use profile::{FunctionProfile, Profile, ProfileError};
pub use spec::{ParsePolicyError, PolicySpec};
