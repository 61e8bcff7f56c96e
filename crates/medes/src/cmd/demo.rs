//! `medes demo`: the README's first command. Starts a platform instance, deploys a sample
//! action, invokes it cold and warm, prints what happened and where to look next.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use medes_workload::client::{ExecSpec, LimitsSpec};
use medes_workload::{ActionSpec, Client, ClientConfig, Invoked};
use serde_json::{Map, Value, json};

use crate::config::MedesConfig;
use crate::platform::{Platform, init_tracing};

const HELLO: &str = include_str!("../../../../examples/hello.py");

/// Arguments of `medes demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Data directory of the demo instance (its store, key and action code).
    #[arg(long, default_value = "/var/lib/medes-demo")]
    pub data_dir: PathBuf,
    /// Listen address of the demo instance (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

/// Runs `medes demo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let mut cfg = MedesConfig::default();
    cfg.data_dir = args.data_dir;
    cfg.api.listen = args.listen;
    cfg.agent.sandbox.cgroup_name = format!("medes-demo-{}", std::process::id());
    cfg.agent.sandbox.run_dir = format!("/run/medes/demo-{}", std::process::id()).into();
    cfg.finish();
    let rt = tokio::runtime::Runtime::new()?;
    let ok = rt.block_on(async move {
        println!(
            "1. starting medes (controller + node agent, data in {})",
            cfg.data_dir.display()
        );
        let t = Instant::now();
        let platform = Platform::start(cfg).await?;
        println!(
            "   API at {} in {:.0} ms",
            platform.url,
            t.elapsed().as_secs_f64() * 1e3
        );
        let result = demo(&platform).await;
        platform.stop().await?;
        result
    })?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn demo(platform: &Platform) -> anyhow::Result<bool> {
    let client = Client::new(&ClientConfig::new(
        platform.url.clone(),
        platform.auth.clone(),
    ))?;
    println!(
        "2. deploying examples/hello.py as action `hello` (PUT /api/v1/namespaces/_/actions/hello)"
    );
    let spec = ActionSpec {
        exec: ExecSpec {
            kind: "python:3".into(),
            code: HELLO.into(),
            binary: false,
            main: None,
        },
        limits: LimitsSpec {
            timeout: 10_000,
            memory: 128,
        },
        parameters: vec![],
        annotations: vec![],
    };
    client
        .put_action("hello", &spec)
        .await
        .context("deploying hello")?;
    let mut all_ok = true;
    let mut last = String::new();
    for (i, who) in ["cold", "warm"].iter().enumerate() {
        let mut params = Map::new();
        params.insert("name".into(), json!(format!("medes ({who} call)")));
        let t = Instant::now();
        let out = client
            .invoke("hello", &params, true)
            .await
            .context("invoking hello")?;
        let client_ms = t.elapsed().as_secs_f64() * 1e3;
        let Invoked::Completed { record, .. } = out else {
            anyhow::bail!("the invocation did not complete within the blocking wait");
        };
        println!(
            "{}. invoke #{}: startKind={} initTime={} client latency {:.1} ms, activation {}",
            3 + i,
            i + 1,
            record.start_kind(),
            record
                .init_time_ms()
                .map_or("-".into(), |v| format!("{v:.0} ms")),
            client_ms,
            record.activation_id
        );
        println!("   result: {}", record.response.result);
        all_ok &= record.succeeded() && record.start_kind() == *who;
        last = record.activation_id.clone();
    }
    let logs_url = format!(
        "{}/api/v1/namespaces/_/activations/{last}/logs",
        platform.url
    );
    let (user, key) = platform.auth.split_once(':').unwrap_or_default();
    let logs: Value = reqwest::Client::new()
        .get(&logs_url)
        .basic_auth(user, Some(key))
        .send()
        .await?
        .json()
        .await?;
    println!("5. GET {logs_url}\n   {logs}");
    println!();
    println!(
        "{}",
        if all_ok {
            "demo OK: the first call was a cold start, the second a warm one."
        } else {
            "demo FAILED: see above."
        }
    );
    println!("Where to look next:");
    println!(
        "  medes serve                      # the platform on 127.0.0.1:3233 (key printed at start)"
    );
    println!("  medes suite deploy && medes suite run   # the ten FunctionBench-style functions");
    println!("  medes bench startup --json       # cold/warm latency and platform overhead");
    println!("  docs/ARCHITECTURE.md, docs/BENCHMARKS.md");
    Ok(all_ok)
}
