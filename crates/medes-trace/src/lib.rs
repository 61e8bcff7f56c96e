//! Invocation traces for medes: Azure Functions trace loaders, a synthetic 2019-format generator,
//! the Medes paper's workload recipe, the replay file format and trace statistics.
//!
//! ```
//! use medes_trace::{RecipeConfig, SynthConfig, Synthetic, TraceStats, recipe};
//! // A synthetic day of 2000 functions, then the paper's recipe: one hour per function, ×5.
//! let rows = Synthetic::new(SynthConfig { seed: 7, functions: 2000, ..Default::default() });
//! let out = recipe(rows.map(Ok), &RecipeConfig::default()).unwrap();
//! assert_eq!(out.picks.len(), 10);
//! let mut csv = Vec::new();
//! out.trace.write(&mut csv).unwrap();
//! assert!(csv.starts_with(b"time_ms,function,params\n"));
//! println!("{}", TraceStats::of(&out.trace));
//! ```
//!
//! # Design
//! - **Streaming.** The real 2019 day files and the 2021 file are gigabytes: every loader is an
//!   iterator over typed rows with one reused record buffer ([`InvocationsReader`],
//!   [`DurationsReader`], [`MemoryReader`], [`Invocations2021Reader`]); the recipe and the stats
//!   consume such iterators with reservoir sampling and running sums.
//! - **Errors name the place.** A malformed row is a [`ReadError`] with its line and column (and the
//!   column's name and the offending text); the header is checked before the first row.
//! - **Fixed parameters.** The synthetic generator ([`synth`]) is a pure function of its seed and
//!   its constants, each documented with the published fact it reproduces. Nothing is fitted to
//!   the trace being studied.
//! - **Determinism.** Everything random is ChaCha8 seeded from an explicit `u64`.
//!
//! # What this crate does not do
//! No network, no async, no clock: it reads and writes files and computes. Replaying a trace
//! against the platform lives in `medes-workload`. It does not download the Azure traces (they
//! cannot be fetched on these machines); users bring the files.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod arrivals;
pub mod azure;
pub mod recipe;
pub mod replay;
pub mod stats;
pub mod synth;

pub use azure::{
    AppMemory, DurationsReader, FunctionDurations, FunctionInvocations, Invocation2021,
    Invocations2021Reader, InvocationsReader, MemoryReader, ReadError, Trigger, bin_2021,
    write_invocations,
};
pub use recipe::{PAPER_FUNCTIONS, Recipe, RecipeConfig, RecipeError, RecipePick, recipe};
pub use replay::{Trace, TraceEntry, TraceReadError, TraceWriteError};
pub use stats::{Azure2019Stats, Azure2019Summary, FunctionStats, TraceStats};
pub use synth::{SynthConfig, Synthetic};
