//! One module per subcommand. Each exposes `Args` (clap) and `run(Args) -> anyhow::Result<ExitCode>`.

pub mod agent;
pub mod bench;
pub mod bench_cluster;
pub mod bench_cycle;
pub mod bench_dedup;
pub mod cluster;
pub mod controller;
pub mod demo;
pub mod eval;
pub mod live;
pub mod policy;
pub mod profile;
pub mod replay;
pub mod report;
pub mod serve;
pub mod sim;
mod splitmix;
pub mod suite;
pub mod trace;
