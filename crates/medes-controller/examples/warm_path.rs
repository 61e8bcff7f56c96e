//! Measures the scheduler's warm path over the real node agent and real sandboxes:
//! per-invocation latency and platform overhead (latency minus time inside `main`) with one
//! client, then throughput of a no-op action with N concurrent clients.
//!
//! `cargo run --release -p medes-controller --example warm_path -- [RUNS] [CLIENTS] [SECONDS]`
//! (root; needs what `medes_sandbox::preflight` checks). Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medes_agent::{Agent, AgentConfig};
use medes_controller::{Controller, ControllerConfig};
use medes_core::{
    Action, ActionName, ActivationId, Code, Exec, InvokeRequest, Invoker, Limits, Namespace,
};
use serde_json::Map;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn request(a: &Arc<Action>) -> InvokeRequest {
    InvokeRequest {
        id: ActivationId::random(),
        action: a.clone(),
        params: Map::new(),
        subject: "bench".into(),
        api_key: "bench:key".into(),
        arrived: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let runs = args.first().copied().unwrap_or(2000) as usize;
    let clients = args.get(1).copied().unwrap_or(16) as usize;
    let seconds = args.get(2).copied().unwrap_or(5);

    let sandbox = medes_sandbox::SandboxConfig::default();
    medes_sandbox::preflight(&sandbox)?;
    medes_sandbox::become_subreaper()?;
    let data = tempfile::tempdir()?;
    let agent = Agent::new(AgentConfig {
        data_dir: data.path().into(),
        sandbox,
        ..Default::default()
    })?;
    let cfg = ControllerConfig {
        node_memory_budget_mb: 4096,
        ..Default::default()
    };
    let ctl = Controller::new(
        cfg,
        vec![(agent.node_id().clone(), Arc::new(agent.clone()) as _)],
    );
    let a = Arc::new(Action {
        name: ActionName {
            namespace: Namespace("guest".into()),
            name: "noop".into(),
        },
        version: "0.0.1".into(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source("def main(args):\n    return {}\n".into()),
            main: "main".into(),
        },
        parameters: Map::new(),
        annotations: vec![],
        limits: Limits {
            memory_mb: 128,
            ..Limits::default()
        },
        publish: false,
        updated: 0,
    });

    let t = Instant::now();
    ctl.invoke(request(&a)).await?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;

    let mut lat = Vec::with_capacity(runs);
    let mut overhead = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let act = ctl.invoke(request(&a)).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        lat.push(ms);
        overhead.push(ms - act.main_ms.unwrap_or(0.0));
    }
    lat.sort_by(f64::total_cmp);
    overhead.sort_by(f64::total_cmp);

    // Warm up one sandbox per client, then measure throughput.
    let warmups: Vec<_> = (0..clients).map(|_| ctl.invoke(request(&a))).collect();
    for r in futures::future::join_all(warmups).await {
        r?;
    }
    let stop = Instant::now() + Duration::from_secs(seconds);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ctl = ctl.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop {
                ctl.invoke(request(&a)).await.expect("admitted");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let sandboxes = ctl.sandboxes().len();
    ctl.shutdown().await;
    agent.shutdown().await;
    println!(
        "{}",
        serde_json::json!({
            "cold_ms": cold_ms,
            "warm_ms_p50": percentile(&lat, 0.5),
            "warm_ms_p99": percentile(&lat, 0.99),
            "warm_overhead_ms_p50": percentile(&overhead, 0.5),
            "warm_overhead_ms_p99": percentile(&overhead, 0.99),
            "noop_invocations_per_s": rate,
            "clients": clients,
            "sandboxes": sandboxes,
        })
    );
    Ok(())
}
