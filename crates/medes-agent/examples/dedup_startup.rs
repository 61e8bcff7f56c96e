//! Start-up latencies and memory of suite functions through the agent, in process: cold start,
//! plain CRIU restore from the full image on tmpfs (the floor), dedup start (with its
//! breakdown), warm PSS and dedup memory.
//!
//! ```text
//! cargo run --release -p medes-agent --example dedup_startup -- [--runs N] [--functions DIR] [--json] [--plain] NAME...
//! ```
//! Each function gets a base sandbox (MakeBase) and one target sandbox that cycles
//! Dedup → Restore → first run `N` times (the first Dedup checkpoints; later ones reuse the store
//! as the paper does). Times are wall-clock milliseconds as the agent's caller sees them; "+run"
//! adds the first invocation after the start. `--plain` turns the lazy restore off (dedup starts
//! from rebuilt pages files). Needs root and CRIU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use medes_agent::{Agent, AgentConfig, Command, NodeAgent, Reply, RunCommand, SpawnCommand};
use medes_core::{ActionName, Bytes, Code, Namespace, SandboxId};
use medes_sandbox::{
    CheckpointMode, InitRequest, RunRequest, Sandbox, SandboxConfig, SandboxSpec, become_subreaper,
    preflight,
};
use serde_json::{Map, Value, json};

struct Func {
    name: String,
    code: String,
    memory: Bytes,
    params: Map<String, Value>,
}

fn load(functions: &Path, name: &str) -> Result<Func, String> {
    let manifest: toml::Table = std::fs::read_to_string(functions.join("manifest.toml"))
        .map_err(|e| format!("manifest: {e}"))?
        .parse()
        .map_err(|e| format!("manifest: {e}"))?;
    let f = manifest
        .get("functions")
        .and_then(|t| t.get(name))
        .ok_or_else(|| format!("{name} is not in the manifest"))?;
    let memory = f
        .get("memory_mb")
        .and_then(toml::Value::as_integer)
        .unwrap_or(256);
    let params: Value = serde_json::to_value(
        f.get("params")
            .cloned()
            .unwrap_or(toml::Value::Table(Default::default())),
    )
    .map_err(|e| e.to_string())?;
    let code = std::fs::read_to_string(functions.join(name).join("__main__.py"))
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(Func {
        name: name.to_string(),
        code,
        memory: Bytes::mib(u64::try_from(memory).unwrap_or(256)),
        params: params.as_object().cloned().unwrap_or_default(),
    })
}

fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn spawn_cmd(f: &Func, sb: &SandboxId) -> Command {
    Command::Spawn(SpawnCommand {
        sandbox: sb.clone(),
        action: ActionName {
            namespace: Namespace("bench".into()),
            name: f.name.clone(),
        },
        version: "1".into(),
        code: Code::Source(f.code.clone()),
        main: "main".into(),
        memory_limit: f.memory,
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "bench".to_string())]),
        init_timeout_ms: 120_000,
    })
}

fn run_cmd(f: &Func, sb: &SandboxId) -> Command {
    Command::Run(RunCommand {
        sandbox: sb.clone(),
        params: f.params.clone(),
        env: BTreeMap::new(),
        timeout_ms: 120_000,
    })
}

async fn must(agent: &Agent, cmd: Command) -> Reply {
    let name = cmd.name();
    match agent.execute(cmd).await {
        Ok(r) => r,
        Err(e) => panic!("{name}: {e}"),
    }
}

async fn held(agent: &Agent, sb: &SandboxId) -> (u64, u64) {
    let Reply::Status(st) = must(agent, Command::Status).await else {
        unreachable!()
    };
    st.sandboxes
        .iter()
        .find(|s| &s.id == sb)
        .map(|s| (s.held_bytes, s.memory.map_or(0, |m| m.pss.0)))
        .unwrap_or_default()
}

fn plain_spec(f: &Func, code_dir: &Path, n: &str) -> SandboxSpec {
    SandboxSpec {
        id: SandboxId(format!("pr{}-{}-{n}", std::process::id(), f.name)),
        code_dir: code_dir.to_path_buf(),
        memory_limit: f.memory,
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "bench".to_string())]),
    }
}

fn plain_req(f: &Func) -> RunRequest {
    RunRequest {
        value: f.params.clone(),
        env: BTreeMap::new(),
        timeout: std::time::Duration::from_secs(120),
    }
}

/// Checkpoints a warm sandbox of `f` (after one run) into a full image on tmpfs; returns the
/// page image bytes.
async fn plain_checkpoint(cfg: &SandboxConfig, f: &Func, code_dir: &Path, dir: &Path) -> u64 {
    let sb = Sandbox::start(cfg, plain_spec(f, code_dir, "orig"))
        .await
        .expect("start");
    let init = sb
        .init(InitRequest {
            main: "main".into(),
        })
        .await
        .expect("init");
    assert!(init.ok, "init failed: {:?}", init.error);
    sb.run(plain_req(f)).await.expect("run");
    let _ = std::fs::remove_dir_all(dir);
    let info = sb
        .checkpoint(dir, CheckpointMode::LeaveRunning)
        .await
        .expect("checkpoint");
    sb.destroy().await.expect("destroy");
    info.page_image_bytes.0
}

/// One plain CRIU restore from the full image, then its first run: (restore ms, + run ms).
async fn plain_restore(
    cfg: &SandboxConfig,
    f: &Func,
    code_dir: &Path,
    dir: &Path,
    i: usize,
) -> (f64, f64) {
    let t0 = Instant::now();
    let copy = Sandbox::restore(cfg, plain_spec(f, code_dir, &i.to_string()), dir)
        .await
        .expect("restore");
    let restore = ms(t0);
    copy.run(plain_req(f)).await.expect("run");
    let with_run = ms(t0);
    copy.destroy().await.expect("destroy");
    (restore, with_run)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let mut runs = 10usize;
    let mut functions = PathBuf::from("functions");
    let mut json_out = false;
    let mut names = Vec::new();
    let mut plain = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--functions" => functions = args.next().map(PathBuf::from).unwrap_or(functions),
            "--json" => json_out = true,
            "--plain" => plain = true,
            _ => names.push(a),
        }
    }
    if names.is_empty() {
        names = vec![
            "vanilla".into(),
            "linalg".into(),
            "imagepro".into(),
            "modeltrain".into(),
        ];
    }
    let sandbox = SandboxConfig::default();
    if let Err(e) = preflight(&sandbox) {
        eprintln!("cannot run sandboxes here: {e}");
        std::process::exit(2);
    }
    let _ = become_subreaper();
    let data = std::env::temp_dir().join(format!("medes-dedup-startup-{}", std::process::id()));
    let agent = Agent::new(AgentConfig {
        data_dir: data.clone(),
        sandbox: sandbox.clone(),
        lazy_restore: !plain,
        ..Default::default()
    })
    .expect("agent");
    let pid = std::process::id();
    let mut out = Vec::new();
    for name in &names {
        let f = match load(&functions, name) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let base = SandboxId(format!("b{pid}-{name}"));
        let target = SandboxId(format!("t{pid}-{name}"));

        // Cold starts (spawn + first run).
        let (mut cold, mut cold_run) = (Vec::new(), Vec::new());
        for i in 0..runs.min(5) {
            let sb = SandboxId(format!("c{pid}-{name}-{i}"));
            let t0 = Instant::now();
            must(&agent, spawn_cmd(&f, &sb)).await;
            cold.push(ms(t0));
            must(&agent, run_cmd(&f, &sb)).await;
            cold_run.push(ms(t0));
            must(&agent, Command::Purge { sandbox: sb }).await;
        }

        // Base and target.
        must(&agent, spawn_cmd(&f, &base)).await;
        must(&agent, run_cmd(&f, &base)).await;
        let Reply::BaseReady(b) = must(
            &agent,
            Command::MakeBase {
                sandbox: base.clone(),
            },
        )
        .await
        else {
            unreachable!()
        };
        must(&agent, spawn_cmd(&f, &target)).await;
        must(&agent, run_cmd(&f, &target)).await;
        let (_, warm_pss) = held(&agent, &target).await;
        let code_dir = data.join("code/bench").join(name).join("1");
        let plain_dir = agent.images_dir().join(format!("plain-{name}"));
        let image = plain_checkpoint(&sandbox, &f, &code_dir, &plain_dir).await;
        let (mut plain, mut plain_run) = (Vec::new(), Vec::new());
        let mut dedup_mb = 0.0;
        let mut first_dedup = None;
        let (mut start, mut start_run) = (Vec::new(), Vec::new());
        let (mut read_base, mut rebuild, mut restore, mut first_resp) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let Reply::Deduped(d) = must(
                &agent,
                Command::Dedup {
                    sandbox: target.clone(),
                },
            )
            .await
            else {
                unreachable!()
            };
            if i == 0 {
                dedup_mb = held(&agent, &target).await.0 as f64 / 1048576.0;
                first_dedup = Some(d);
            }
            let t0 = Instant::now();
            let Reply::Restored(r) = must(
                &agent,
                Command::Restore {
                    sandbox: target.clone(),
                },
            )
            .await
            else {
                unreachable!()
            };
            start.push(ms(t0));
            let t1 = Instant::now();
            let Reply::Ran(got) = must(&agent, run_cmd(&f, &target)).await else {
                unreachable!()
            };
            first_resp.push(ms(t1));
            start_run.push(ms(t0));
            read_base.push(r.read_base_ms);
            rebuild.push(r.rebuild_ms);
            restore.push(r.restore_ms);
            if !matches!(got.outcome, medes_agent::RunOutcome::Returned(_)) {
                eprintln!("{name}: run after a dedup start: {:?}", got.outcome);
            }
            // The floor, interleaved so that both see the same machine load.
            let (p, pr) = plain_restore(&sandbox, &f, &code_dir, &plain_dir, i).await;
            plain.push(p);
            plain_run.push(pr);
        }
        if std::env::var_os("MEDES_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&plain_dir);
        }
        must(
            &agent,
            Command::Purge {
                sandbox: target.clone(),
            },
        )
        .await;
        must(
            &agent,
            Command::Purge {
                sandbox: base.clone(),
            },
        )
        .await;

        let d = first_dedup.expect("dedup");
        let row = json!({
            "function": name,
            "runs": runs,
            "cold_ms_p50": p50(&mut cold),
            "cold_run_ms_p50": p50(&mut cold_run),
            "criu_restore_ms_p50": p50(&mut plain),
            "criu_restore_run_ms_p50": p50(&mut plain_run),
            "dedup_ms_p50": p50(&mut start),
            "dedup_ms_p99": p99(&mut start),
            "dedup_run_ms_p50": p50(&mut start_run),
            "dedup_breakdown_ms": {
                "read_base": p50(&mut read_base),
                "rebuild": p50(&mut rebuild),
                "restore": p50(&mut restore),
                "first_response": p50(&mut first_resp),
            },
            "page_image_mb": image as f64 / 1048576.0,
            "base_image_mb": b.image_bytes as f64 / 1048576.0,
            "warm_mb": warm_pss as f64 / 1048576.0,
            "dedup_mb": dedup_mb,
            "dedup_checkpoint_ms": d.checkpoint_ms,
            "dedup_op_ms": d.dedup_ms,
        });
        if !json_out {
            let g = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            let bd = &row["dedup_breakdown_ms"];
            let h = |k: &str| bd[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{name:>10}: cold {:7.1} | criu restore {:6.1} | dedup start {:6.1} (p99 {:6.1}; read {:4.1} rebuild {:5.1} restore {:6.1}; ratio {:.2}) | +first run: cold {:7.1} criu {:6.1} dedup {:6.1} | pages {:5.1} MB | warm {:5.1} MB dedup {:5.2} MB ({:.1}%) | dedup op: ckpt {:.0} ms + {:.0} ms",
                g("cold_ms_p50"),
                g("criu_restore_ms_p50"),
                g("dedup_ms_p50"),
                g("dedup_ms_p99"),
                h("read_base"),
                h("rebuild"),
                h("restore"),
                g("dedup_ms_p50") / g("criu_restore_ms_p50"),
                g("cold_run_ms_p50"),
                g("criu_restore_run_ms_p50"),
                g("dedup_run_ms_p50"),
                g("page_image_mb"),
                g("warm_mb"),
                g("dedup_mb"),
                100.0 * g("dedup_mb") / g("warm_mb"),
                g("dedup_checkpoint_ms"),
                g("dedup_op_ms"),
            );
        }
        out.push(row);
    }
    if json_out {
        println!("{}", json!({ "functions": out }));
    }
    agent.shutdown().await;
    medes_sandbox::release_spare_netns();
    let _ = std::fs::remove_dir_all(&data);
}
