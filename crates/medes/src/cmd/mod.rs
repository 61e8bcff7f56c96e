//! One module per subcommand. Each exposes `Args` (clap) and `run(Args) -> anyhow::Result<ExitCode>`.

pub mod bench;
pub mod bench_dedup;
pub mod demo;
pub mod replay;
pub mod serve;
pub mod suite;
pub mod trace;
