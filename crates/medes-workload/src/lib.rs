//! Driving a medes (or any OpenWhisk-compatible) platform over its REST API: a small client,
//! the ten-function benchmark suite (deploy, run, verify) and an open-loop trace replayer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use medes_workload::{Client, ClientConfig, ReplayOptions, replay};
//! let client = Client::new(&ClientConfig::new("http://127.0.0.1:3233", "uuid:key"))?;
//! let trace = medes_trace::Trace::read_path("trace.csv")?;
//! let out = replay(&client, &trace, &ReplayOptions { speed: 2.0, ..Default::default() }, true).await?;
//! println!("{}", out.summary);
//! # Ok(()) }
//! ```
//!
//! # Design
//! - The client speaks OpenWhisk's real wire format (`/api/v1/namespaces/_/actions/{name}`,
//!   basic auth `uuid:key`, activation records with `annotations`), so the same tools drive stock
//!   OpenWhisk too. Start kind comes from the `startKind` annotation (or `initTime`).
//! - The replayer is open loop: a single dispatcher sleeps until each row's scaled time and
//!   spawns the request; the send time is recorded by the request's task, so lateness is measured
//!   and reported rather than hidden. Every trace row yields exactly one record.
//! - The suite reads `functions/manifest.toml`: limits, default params and exact expected
//!   values, the same file `functions/test_functions.py` checks in-process.
//!
//! # What this crate does not do
//! It starts no platform and takes no checkpoints: it reports what the API returns, client-side
//! timings and, when the platform runs on the same machine, the sandboxes' PSS/RSS read from
//! `/proc` ([`footprint`]).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod footprint;
pub mod replay;
pub mod suite;

pub use client::{
    ActionSpec, ActivationRecord, Client, ClientConfig, ClientError, Invoked, RequestError,
};
pub use replay::{
    InvocationRecord, Percentiles, ReplayError, ReplayOptions, ReplayOutcome, ReplaySummary,
    WriteOutputsError, replay, write_outputs,
};
pub use suite::{
    DeployError, DeployReport, FunctionSpec, Manifest, ManifestError, RunOptions, RunReport,
    RunTable, check_result, deploy, run,
};

/// An error and its sources, joined with `: ` (for records and tables).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
