//! `medes sim`: one policy, one trace, one cluster, in the simulator.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_sim::{ClusterConfig, PolicySpec, Profile, SimConfig, simulate};
use medes_trace::Trace;

/// Prints to stdout, ignoring a closed pipe (e.g. `| head`).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Arguments of `medes sim`.
#[derive(clap::Args)]
pub struct Args {
    /// Policy: fixed-<N>m, hybrid-histogram[-<N>m], greedy-dual, medes, medes-kd-<N>m,
    /// medes-ka-<N>m, medes-latency[-<alpha>], medes-budget-<GB>, medes-predict; a
    /// `+template` suffix adds template starts (e.g. fixed-10m+template).
    #[arg(long, default_value = "medes")]
    policy: String,
    /// Trace file (`time_ms,function,params`); default: pattern `--pattern` of the paper's
    /// evaluation workload.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Which synthetic one-hour pattern (seed 1 + N) when no trace is given.
    #[arg(long, default_value_t = 0)]
    pattern: u64,
    /// Cost profile (TOML or JSON, e.g. from `medes profile`; `measured`: the live platform's
    /// shipped profile; `platform-memory`: the paper's with the platform's memory ratios);
    /// default: the paper's numbers.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Let idle bases with no dedup sandbox on their node be evicted (as the live controller
    /// does; the paper's setup pins bases).
    #[arg(long)]
    evict_idle_bases: bool,
    /// Turn away an invocation that waited this long for memory, ms, as the live controller
    /// does (its `admission_wait_ms`, 10000); default 0: invocations wait without bound.
    #[arg(long, default_value_t = 0)]
    admission_timeout_ms: u64,
    /// Worker nodes.
    #[arg(long, default_value_t = 19)]
    nodes: usize,
    /// Memory pool of the whole cluster, GB (split evenly over the nodes).
    #[arg(long, default_value_t = 40.0)]
    pool_gb: f64,
    /// Per-node memory budget, MB (overrides --pool-gb).
    #[arg(long)]
    node_mb: Option<f64>,
    /// Seed for execution-time draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write invocations.csv, memory.csv and summary.json here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The profile named by a flag (or the paper's); `measured` names the live platform's profile
/// shipped with the simulator ([`Profile::measured`]), `paper` the paper's, `platform-memory`
/// the paper's with the platform's memory ratios ([`Profile::platform_memory`]).
pub fn load_profile(path: Option<&PathBuf>) -> anyhow::Result<Profile> {
    match path {
        Some(p) if p.as_os_str() == "measured" => Ok(Profile::measured()),
        Some(p) if p.as_os_str() == "paper" => Ok(Profile::paper()),
        Some(p) if p.as_os_str() == "platform-memory" => Ok(Profile::platform_memory()),
        Some(p) => Profile::load(p).with_context(|| format!("loading profile {}", p.display())),
        None => Ok(Profile::paper()),
    }
}

/// Runs `medes sim`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spec: PolicySpec = args.policy.parse()?;
    let profile = load_profile(args.profile.as_ref())?;
    let trace = match &args.trace {
        Some(p) => Trace::read_path(p).with_context(|| format!("reading {}", p.display()))?,
        None => {
            let mut v = medes_sim::eval::paper_patterns(1, 1 + args.pattern)
                .context("building the synthetic pattern")?;
            v.swap_remove(0)
        }
    };
    let node_mb = args
        .node_mb
        .unwrap_or(args.pool_gb * 1000.0 / args.nodes.max(1) as f64);
    let cluster = ClusterConfig {
        nodes: args.nodes,
        node_mb,
        evict_idle_bases: args.evict_idle_bases,
        admission_timeout_ms: args.admission_timeout_ms,
        ..ClusterConfig::paper(40.0)
    };
    let mut cfg = SimConfig::new(cluster);
    cfg.seed = args.seed;
    cfg.templates = spec.template_starts();
    let names = trace.functions();
    let costs = profile
        .costs_for(&names, spec.template_starts())
        .with_context(|| format!("the profile lacks one of the trace's functions {names:?}"))?;
    let mut policy = spec.build(costs);
    let t0 = std::time::Instant::now();
    let out = simulate(&trace, &profile, &mut policy, &cfg)?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(dir) = &args.out {
        out.write_dir(dir)
            .with_context(|| format!("writing {}", dir.display()))?;
    }
    let s = &out.summary;
    if args.json {
        say!("{}", serde_json::to_string_pretty(s)?);
    } else {
        say!(
            "{}: {} invocations on {} nodes × {:.0} MB ({} functions) in {:.2} s",
            s.policy,
            s.invocations,
            cluster.nodes,
            cluster.node_mb,
            names.len(),
            secs
        );
        say!(
            "starts: {} cold, {} template, {} dedup, {} warm; dropped {}",
            s.cold_starts,
            s.template_starts,
            s.dedup_starts,
            s.warm_starts,
            s.dropped
        );
        say!(
            "end to end: p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms; startup p99.9 {:.0} ms",
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.startup_p999_ms
        );
        say!(
            "memory: mean {:.2} GB, peak {:.2} GB of {:.2} GB; dedup share {:.1}%; evictions {}, dedup ops {}, bases {}, pre-warms {}",
            s.mean_memory_gb,
            s.peak_memory_gb,
            s.budget_gb,
            100.0 * s.mean_dedup_share,
            s.counters.evictions,
            s.counters.dedup_ops,
            s.counters.bases,
            s.counters.prewarms
        );
        let mut t = comfy_table::Table::new();
        t.set_header([
            "function",
            "invocations",
            "cold",
            "dedup",
            "warm",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "startup p99.9",
        ]);
        for f in &s.functions {
            t.add_row([
                f.name.clone(),
                f.invocations.to_string(),
                f.cold_starts.to_string(),
                f.dedup_starts.to_string(),
                f.warm_starts.to_string(),
                format!("{:.0}", f.p50_ms),
                format!("{:.0}", f.p99_ms),
                format!("{:.0}", f.p999_ms),
                format!("{:.0}", f.startup_p999_ms),
            ]);
        }
        say!("{t}");
        if let Some(dir) = &args.out {
            say!("outputs in {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
