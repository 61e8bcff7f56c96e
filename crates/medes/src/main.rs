//! The `medes` command line: one binary, one subcommand per job.
//!
//! Only this crate uses `anyhow`, installs the tracing subscriber and the metrics recorder, and
//! merges configuration files with flags. `main` maps any error to an exit code in one place.

// Configurations are built as "defaults, then override a few fields" on purpose: it reads as a
// diff against the documented defaults.
#![allow(clippy::field_reassign_with_default)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod config;
mod platform;

/// medes: a serverless platform whose idle sandboxes can be deduplicated.
#[derive(Parser)]
#[command(name = "medes", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform (controller + one node agent) on this machine.
    Serve(cmd::serve::Args),
    /// Run the controller (scheduler, store, REST API) with node agents in other processes.
    Controller(cmd::controller::Args),
    /// Run one node agent that joins a `medes controller` over gRPC.
    Agent(cmd::agent::Args),
    /// A multi-host cluster on this machine (namespaced hosts): `up`, `down`, `status`, faults.
    Cluster(cmd::cluster::Args),
    /// Measure the platform: `startup`, `dedup`.
    Bench(cmd::bench::Args),
    /// Deploy, run and list the ten-function workload suite.
    Suite(cmd::suite::Args),
    /// Load, generate and summarise invocation traces.
    Trace(cmd::trace::Args),
    /// Replay a trace file against a running platform (open loop).
    Replay(cmd::replay::Args),
    /// Trace-driven simulation of a cluster under a policy.
    Sim(cmd::sim::Args),
    /// Run the paper's evaluation in the simulator and write the report.
    Eval(cmd::eval::Args),
    /// Write a Markdown report with plots from replay/sim outputs.
    Report(cmd::report::Args),
    /// Write a per-function cost profile measured on the live platform.
    Profile(cmd::profile::Args),
    /// Read or change the policy knob of a running platform (global or per action).
    Policy(cmd::policy::Args),
    /// The README's first command: replay a short trace of the suite live under fixed keep-alive and Medes, write the report (`--quick`: one action, cold then warm).
    Demo(cmd::demo::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => cmd::serve::run(a),
        Command::Controller(a) => cmd::controller::run(a),
        Command::Agent(a) => cmd::agent::run(a),
        Command::Cluster(a) => cmd::cluster::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Suite(a) => cmd::suite::run(a),
        Command::Trace(a) => cmd::trace::run(a),
        Command::Replay(a) => cmd::replay::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Sim(a) => cmd::sim::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Profile(a) => cmd::profile::run(a),
        Command::Policy(a) => cmd::policy::run(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
