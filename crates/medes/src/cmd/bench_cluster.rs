//! `medes bench cluster`: the cluster figures of issue 7 (numbers only, never timed
//! assertions).
//!
//! It sets up its own two namespaced hosts (`medes_testbed`: two network namespaces joined by
//! veth pairs to a bridge; `--loopback` uses 127.0.0.1 instead) and runs one real node agent
//! in each (its own tokio runtime on a thread inside the host's namespace, serving `Node` and
//! `Pages` on the host's address), then measures:
//! - `remote_read_gb_per_s`: node A streams node B's whole base image over the page wire
//!   (`medes_rpc::wire`, four concurrent connections, 1 MiB frames), 10^9 bytes/s, median of
//!   `--reads` (`grpc_read_gb_per_s`: the same over gRPC streaming, for comparison);
//! - `remote_vs_local_dedup_start_ratio`: a sandbox on A deduplicated against B's base (all
//!   its base pages remote) and a sandbox on B deduplicated against the same base (local)
//!   cycle dedup start → run → re-dedup, interleaved; median `RestoreReply::total_ms` of A over
//!   that of B;
//! - `scheduling_decisions_per_s`: the real `medes_controller::Controller` over four fake
//!   agents answering at once, 64 concurrent callers invoking 50 actions on a 2-worker runtime
//!   (both cores): invocations placed (warm pick or cold placement + run) per second;
//! - `registry_page_lookups_per_s`: the in-memory registry holding four bases built from B's
//!   real base pages (K = 5 sampled chunks per page), looked up with slightly changed copies of
//!   those pages (no exact hit: each lookup is the 5 chunk lookups and the base choice), on two
//!   threads;
//! - `redis_lookup_us_per_page`: `medes_registry_redis::bench::bench_lookup` against a local
//!   3-master Redis Cluster it starts (or `--redis URL...`); `null` with the reason in
//!   `redis_note` when `redis-server` is not installed.
//!
//! Everything it made (hosts, agents, sandboxes, kept stores, the Redis cluster) is removed
//! before it returns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::future::BoxFuture;
use medes_agent::{
    Agent, AgentConfig, AgentError, Command, NodeAgent, NodeStatus, PageSource, RemoteBase, Reply,
    RunCommand, RunOutcome, RunReply, SpawnCommand, SpawnReply,
};
use medes_controller::{Controller, ControllerConfig};
use medes_core::{
    Action, ActionName, ActivationId, Bytes, Code, Exec, InvokeRequest, Invoker, Limits, Namespace,
    NodeId, SandboxId,
};
use medes_dedup::{BaseId, BaseMeta, FingerprintConfig, PAGE, Page, Registry, fingerprint};
use medes_rpc::{PageClient, PageClientConfig, PageTransport, serve_agent};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Arguments of `medes bench cluster`.
#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Print one JSON object (the output contract) instead of lines.
    #[arg(long)]
    json: bool,
    /// Dedup starts measured per side (remote, local).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Whole-base remote reads measured.
    #[arg(long, default_value_t = 15)]
    reads: usize,
    /// Seconds of each throughput measurement (scheduling, lookups).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rows of the benchmark function's in-memory table (its memory: ~110 bytes a row).
    #[arg(long, default_value_t = 300_000)]
    rows: u64,
    /// Concurrent connections of each whole-base read.
    #[arg(long, default_value_t = 4)]
    streams: u64,
    /// Pages per frame of the remote reads (1 MiB = 256).
    #[arg(long, default_value_t = medes_rpc::DEFAULT_CHUNK_PAGES)]
    chunk_pages: u32,
    /// Run the agents on 127.0.0.1 instead of two namespaced hosts.
    #[arg(long)]
    loopback: bool,
    /// Redis Cluster node URLs for `redis_lookup_us_per_page` (default: start a local one).
    #[arg(long)]
    redis: Vec<String>,
}

#[derive(Serialize)]
struct Output {
    remote_read_gb_per_s: f64,
    remote_vs_local_dedup_start_ratio: f64,
    scheduling_decisions_per_s: f64,
    registry_page_lookups_per_s: f64,
    redis_lookup_us_per_page: Option<f64>,
    redis_note: Option<String>,
    hosts: String,
    base_mb: f64,
    remote_dedup_start_ms_p50: f64,
    local_dedup_start_ms_p50: f64,
    remote_read_base_ms_p50: f64,
    local_read_base_ms_p50: f64,
    remote_rebuild_ms_p50: f64,
    local_rebuild_ms_p50: f64,
    remote_store_mb: f64,
    local_store_mb: f64,
    remote_read_ms_p50: f64,
    grpc_read_gb_per_s: f64,
    remote_read_gb_per_cpu_s: f64,
    memory_lookup_us_per_page: Option<f64>,
}

/// Runs `medes bench cluster`.
pub fn run(args: ClusterArgs) -> anyhow::Result<ExitCode> {
    if !args.json {
        crate::platform::init_tracing("warn");
    }
    medes_sandbox::preflight(&medes_sandbox::SandboxConfig::default())
        .context("this machine cannot run sandboxes (run scripts/setup.sh as root)")?;
    medes_sandbox::become_subreaper().context("becoming a child subreaper")?;
    let bed = if args.loopback {
        None
    } else {
        Some(medes_testbed::Testbed::up(2).context("setting up two namespaced hosts")?)
    };
    let r = measure(&args, bed.as_ref());
    if let Some(bed) = bed {
        bed.down().context("tearing the namespaced hosts down")?;
    }
    let out = r?;
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("hosts: {}", out.hosts);
        println!(
            "remote_read_gb_per_s: {:.2} (base {:.1} MB, {:.1} ms per whole-base read, {:.2} GB per CPU second; gRPC streaming {:.2})",
            out.remote_read_gb_per_s,
            out.base_mb,
            out.remote_read_ms_p50,
            out.remote_read_gb_per_cpu_s,
            out.grpc_read_gb_per_s
        );
        println!(
            "remote_vs_local_dedup_start_ratio: {:.2} (remote {:.1} ms, local {:.1} ms; read {:.1}/{:.1} ms, rebuild {:.1}/{:.1} ms)",
            out.remote_vs_local_dedup_start_ratio,
            out.remote_dedup_start_ms_p50,
            out.local_dedup_start_ms_p50,
            out.remote_read_base_ms_p50,
            out.local_read_base_ms_p50,
            out.remote_rebuild_ms_p50,
            out.local_rebuild_ms_p50
        );
        println!(
            "scheduling_decisions_per_s: {:.0}",
            out.scheduling_decisions_per_s
        );
        println!(
            "registry_page_lookups_per_s: {:.0}",
            out.registry_page_lookups_per_s
        );
        match (out.redis_lookup_us_per_page, &out.redis_note) {
            (Some(us), _) => println!("redis_lookup_us_per_page: {us:.2}"),
            (None, note) => println!(
                "redis_lookup_us_per_page: null ({})",
                note.as_deref().unwrap_or("")
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One node agent on its own runtime, inside a host's network namespace.
struct HostNode {
    agent: Agent,
    handle: tokio::runtime::Handle,
    address: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl HostNode {
    /// Runs `f` on this node's runtime (its tasks run on threads inside the host's namespace).
    fn on<F, T>(&self, f: F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let j = self.handle.spawn(f);
        futures::executor::block_on(j).context("a task on a host's runtime failed")
    }

    fn exec(&self, cmd: Command) -> anyhow::Result<Reply> {
        let a = self.agent.clone();
        let name = cmd.name();
        self.on(async move { a.execute(cmd).await })?
            .with_context(|| format!("{name} on {}", self.agent.node_id()))
    }

    fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_node(
    name: &str,
    host: Option<&medes_testbed::Host>,
    ip: IpAddr,
) -> anyhow::Result<HostNode> {
    let data = tempfile::Builder::new()
        .prefix("medes-bench-cluster-")
        .tempdir()?;
    let mut cfg = AgentConfig {
        node_id: NodeId(name.into()),
        data_dir: data.path().to_path_buf(),
        ..Default::default()
    };
    cfg.dedup.remote_read_timeout_ms = 5_000;
    let (tx, rx) = std::sync::mpsc::channel();
    let body =
        move || {
            let r =
                (|| -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let agent = Agent::new(cfg).context("starting a node agent")?;
                        let l = tokio::net::TcpListener::bind((ip, 0)).await?;
                        let address = l.local_addr()?;
                        let stop = CancellationToken::new();
                        let s = stop.clone();
                        let server = tokio::spawn(serve_agent(agent.clone(), l, async move {
                            s.cancelled().await
                        }));
                        let _ = tx.send(Ok((
                            agent.clone(),
                            tokio::runtime::Handle::current(),
                            address,
                            stop.clone(),
                        )));
                        stop.cancelled().await;
                        let _ = server.await;
                        agent.shutdown().await;
                        agent.purge_kept().await;
                        Ok::<_, anyhow::Error>(())
                    })
                })();
            if let Err(e) = r {
                let _ = tx.send(Err(e));
            }
        };
    let thread = match host {
        Some(h) => {
            let j = h.thread(body)?;
            std::thread::spawn(move || {
                let _ = j.join();
            })
        }
        None => std::thread::spawn(body),
    };
    let (agent, handle, address, stop) = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the host's agent did not start")??;
    Ok(HostNode {
        agent,
        handle,
        address,
        stop,
        thread: Some(thread),
        _data: data,
    })
}

fn code(rows: u64) -> String {
    format!(
        r#"
import hashlib
TABLE = [hashlib.sha256(str(i).encode()).hexdigest() for i in range({rows})]
INDEX = {{t[:8]: i for i, t in enumerate(TABLE[:50000])}}
def main(args):
    x = int(args.get("x", 0))
    return {{"x": x, "h": TABLE[x % len(TABLE)][:12]}}
"#
    )
}

fn action() -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: format!("benchcluster{}", std::process::id()),
    }
}

fn spawn_cmd(sandbox: &SandboxId, rows: u64) -> Command {
    Command::Spawn(SpawnCommand {
        sandbox: sandbox.clone(),
        action: action(),
        version: "0.0.1".into(),
        code: Code::Source(code(rows)),
        main: "main".into(),
        memory_limit: Bytes::mib(512),
        env: BTreeMap::from([("__OW_NAMESPACE".to_string(), "guest".to_string())]),
        init_timeout_ms: 60_000,
    })
}

fn run_cmd(sandbox: &SandboxId, x: u64) -> Command {
    Command::Run(RunCommand {
        sandbox: sandbox.clone(),
        params: json!({"x": x}).as_object().cloned().unwrap_or_default(),
        env: BTreeMap::new(),
        timeout_ms: 30_000,
    })
}

fn check_run(node: &HostNode, sb: &SandboxId, x: u64) -> anyhow::Result<()> {
    match node.exec(run_cmd(sb, x))? {
        Reply::Ran(RunReply {
            outcome: RunOutcome::Returned(v),
            ..
        }) if v["x"] == json!(x) => Ok(()),
        other => bail!("unexpected run reply {other:?}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sid(tag: &str) -> SandboxId {
    SandboxId(format!("bc{}-{tag}", std::process::id()))
}

fn measure(args: &ClusterArgs, bed: Option<&medes_testbed::Testbed>) -> anyhow::Result<Output> {
    let (ha, hb, hosts) = match bed {
        Some(b) => (
            b.host(0),
            b.host(1),
            format!(
                "two namespaced hosts {} and {} (veth + bridge)",
                b.hosts()[0].addr(),
                b.hosts()[1].addr()
            ),
        ),
        None => (None, None, "127.0.0.1 (loopback)".to_string()),
    };
    let ip = |h: Option<&medes_testbed::Host>| {
        h.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |h| IpAddr::V4(h.addr()))
    };
    let a = start_node("bench-a", ha, ip(ha))?;
    let b = start_node("bench-b", hb, ip(hb))?;
    let r = measure_nodes(args, &a, &b, hosts);
    a.stop();
    b.stop();
    r
}

fn measure_nodes(
    args: &ClusterArgs,
    a: &HostNode,
    b: &HostNode,
    hosts: String,
) -> anyhow::Result<Output> {
    // B: a base.
    let base_sb = sid("base");
    b.exec(spawn_cmd(&base_sb, args.rows))?;
    check_run(b, &base_sb, 1)?;
    let Reply::BaseReady(base) = b.exec(Command::MakeBase {
        sandbox: base_sb.clone(),
    })?
    else {
        bail!("make-base answered something else");
    };
    let infos = b.agent.local_bases();
    let info = infos.first().context("B reports no base")?.clone();
    // A imports it (as the controller's catalog push would).
    let catalog = vec![RemoteBase {
        info: info.clone(),
        address: b.address,
    }];
    let a2 = a.agent.clone();
    let rep = a.on(async move { a2.sync_bases(catalog, Vec::new()).await })?;
    if rep.imported != 1 {
        bail!("A did not import B's base: {rep:?}");
    }
    let base_bytes = info.pages * PAGE as u64;

    // Remote reads: A streams B's whole base (page wire, and gRPC for comparison).
    let cpu0 = cpu_seconds();
    let read_ms = remote_reads(a, b.address, &info, args, PageTransport::Wire)?;
    let cpu = cpu_seconds() - cpu0;
    let grpc_ms = remote_reads(a, b.address, &info, args, PageTransport::Grpc)?;
    let rate = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|ms| base_bytes as f64 / (ms / 1e3) / 1e9)
            .collect()
    };
    let gbps = rate(&read_ms);
    let grpc_gbps = rate(&grpc_ms);

    // Dedup starts: remote (A) vs local (B).
    let (sa, sb) = (sid("remote"), sid("local"));
    a.exec(spawn_cmd(&sa, args.rows))?;
    check_run(a, &sa, 2)?;
    b.exec(spawn_cmd(&sb, args.rows))?;
    check_run(b, &sb, 3)?;
    let Reply::Deduped(da) = a.exec(Command::Dedup {
        sandbox: sa.clone(),
    })?
    else {
        bail!("dedup on A answered something else");
    };
    let Reply::Deduped(db) = b.exec(Command::Dedup {
        sandbox: sb.clone(),
    })?
    else {
        bail!("dedup on B answered something else");
    };
    let deps: u64 = a.agent.imported_bases().iter().map(|i| i.dependents).sum();
    if deps == 0 {
        bail!("A's dedup store does not use B's base");
    }
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for i in 0..args.runs.max(1) {
        for (node, sb, out) in [(a, &sa, &mut ra), (b, &sb, &mut rb)] {
            let Reply::Restored(r) = node.exec(Command::Restore {
                sandbox: sb.clone(),
            })?
            else {
                bail!("restore answered something else");
            };
            check_run(node, sb, 10 + i as u64)?;
            node.exec(Command::Dedup {
                sandbox: sb.clone(),
            })?;
            out.push(r);
        }
    }
    let p50 = |v: &[medes_agent::RestoreReply], f: fn(&medes_agent::RestoreReply) -> f64| {
        median(v.iter().map(f).collect())
    };
    let remote_ms = p50(&ra, |r| r.total_ms);
    let local_ms = p50(&rb, |r| r.total_ms);
    for (node, sb) in [(a, &sa), (b, &sb)] {
        let _ = node.exec(Command::Purge {
            sandbox: sb.clone(),
        });
    }

    // Registry lookups from B's real pages.
    let reader = b
        .agent
        .base_reader(&info.domain, info.key.id)
        .context("B's base pages")?;
    let pages = reader
        .pages(0, reader.n_pages())
        .context("B's base pages")?;
    let lookups = registry_lookups(&pages, args.seconds);
    let _ = b.exec(Command::Purge { sandbox: base_sb });

    let decisions = scheduling(args.seconds)?;
    let (redis, redis_note, memory_us) = redis_lookups(&args.redis);
    let _ = base;
    Ok(Output {
        remote_read_gb_per_s: median(gbps),
        remote_vs_local_dedup_start_ratio: remote_ms / local_ms,
        scheduling_decisions_per_s: decisions,
        registry_page_lookups_per_s: lookups,
        redis_lookup_us_per_page: redis,
        redis_note,
        hosts,
        base_mb: base_bytes as f64 / 1e6,
        remote_dedup_start_ms_p50: remote_ms,
        local_dedup_start_ms_p50: local_ms,
        remote_read_base_ms_p50: p50(&ra, |r| r.read_base_ms),
        local_read_base_ms_p50: p50(&rb, |r| r.read_base_ms),
        remote_rebuild_ms_p50: p50(&ra, |r| r.rebuild_ms),
        local_rebuild_ms_p50: p50(&rb, |r| r.rebuild_ms),
        remote_store_mb: da.stored_bytes as f64 / 1e6,
        local_store_mb: db.stored_bytes as f64 / 1e6,
        remote_read_ms_p50: median(read_ms),
        grpc_read_gb_per_s: median(grpc_gbps),
        // Both ends are in this process: bytes moved per CPU second spent by sender and
        // receiver together (the warm-up read included), a figure the machine's load does not
        // change much.
        remote_read_gb_per_cpu_s: (args.reads.max(1) + 1) as f64 * base_bytes as f64
            / cpu.max(1e-9)
            / 1e9,
        memory_lookup_us_per_page: memory_us,
    })
}

/// Whole-base reads from `at` on A's runtime: `--streams` concurrent streams; ms per read.
fn remote_reads(
    a: &HostNode,
    at: SocketAddr,
    info: &medes_agent::BaseInfo,
    args: &ClusterArgs,
    transport: PageTransport,
) -> anyhow::Result<Vec<f64>> {
    let info = info.clone();
    let reads = args.reads.max(1);
    let (streams, chunk_pages) = (args.streams.max(1), args.chunk_pages.max(1));
    a.on(async move {
        let client = PageClient::new(PageClientConfig {
            transport,
            chunk_pages,
            ..PageClientConfig::default()
        });
        let n = info.pages;
        let per = n.div_ceil(streams).max(1);
        let mut out = Vec::new();
        // One warm-up read (the connection).
        for i in 0..=reads {
            let t = Instant::now();
            let streams = (0..n.div_ceil(per)).map(|k| {
                let first = k * per;
                let count = per.min(n - first);
                let mut s = client.read_pages(
                    at,
                    &info.domain,
                    info.key.id,
                    vec![(first, count)],
                    Duration::from_secs(30),
                );
                async move {
                    let mut bytes = 0u64;
                    while let Some(c) = s.next().await {
                        bytes += c.map_err(|e| anyhow::anyhow!(e))?.1.len() as u64;
                    }
                    Ok::<_, anyhow::Error>(bytes)
                }
            });
            let got: u64 = futures::future::try_join_all(streams).await?.iter().sum();
            if got != n * PAGE as u64 {
                bail!("read {got} bytes of a {n}-page base");
            }
            if i > 0 {
                out.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(out)
    })?
}

/// User + system CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Page lookups per second of the in-memory registry (two threads).
fn registry_lookups(pages: &[u8], seconds: f64) -> f64 {
    let cfg = FingerprintConfig { k: 5, mask_bits: 5 };
    let reg = Registry::new();
    let mut base_fps = Vec::new();
    let mut targets = Vec::new();
    let mut seed = 0x5EEDu64;
    for p in pages.chunks_exact(PAGE) {
        let page: &Page = p.try_into().unwrap_or(&[0u8; PAGE]);
        base_fps.push(fingerprint(page, &cfg));
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        // A slightly changed copy: no exact hit, most chunks shared.
        let mut t = *page;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (seed >> 33) as usize % (PAGE - 8);
        for b in &mut t[at..at + 8] {
            *b ^= 0x5A;
        }
        targets.push(fingerprint(&t, &cfg));
    }
    for id in 0..4u32 {
        let meta = BaseMeta {
            function: "bench".into(),
            node: medes_dedup::NodeId(id % 2),
        };
        let _ = reg.add_base(BaseId(id), meta, &base_fps, &[]);
    }
    if targets.is_empty() {
        return 0.0;
    }
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for th in 0..2usize {
            let (reg, targets, stop, done) = (&reg, &targets, &stop, &done);
            s.spawn(move || {
                let mut i = th * targets.len() / 2;
                let mut n = 0u64;
                let mut found = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = reg.reader();
                    for _ in 0..256 {
                        let fp = &targets[i % targets.len()];
                        found += u64::from(r.choose(fp, 0, medes_dedup::NodeId(0)).is_some());
                        i += 1;
                    }
                    n += 256;
                }
                std::hint::black_box(found);
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds.max(0.1)));
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// A node agent that answers every command at once (scheduler benchmark).
struct FakeAgent {
    node: NodeId,
}

impl NodeAgent for FakeAgent {
    fn execute(&self, cmd: Command) -> BoxFuture<'static, Result<Reply, AgentError>> {
        let r = match cmd {
            Command::Spawn(_) => Ok(Reply::Spawned(SpawnReply {
                init_error: None,
                start_ms: 0.0,
                init_ms: 0.0,
                logs: vec![],
            })),
            Command::Run(_) => Ok(Reply::Ran(RunReply {
                outcome: RunOutcome::Returned(json!({"ok": true})),
                logs: vec![],
                main_ms: Some(0.0),
            })),
            Command::Purge { .. } => Ok(Reply::Purged),
            Command::Status => Ok(Reply::Status(NodeStatus {
                node: self.node.clone(),
                sandboxes: vec![],
                restore_transient: BTreeMap::new(),
                templates: vec![],
            })),
            other => Err(AgentError::Unavailable(format!(
                "the fake agent does not {}",
                other.name()
            ))),
        };
        Box::pin(async move { r })
    }
}

/// Invocations placed per second by the controller over four fake agents (both cores).
fn scheduling(seconds: f64) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nodes: Vec<(NodeId, Arc<dyn NodeAgent>)> = (0..4)
            .map(|i| {
                let node = NodeId(format!("fake-{i}"));
                (
                    node.clone(),
                    Arc::new(FakeAgent { node }) as Arc<dyn NodeAgent>,
                )
            })
            .collect();
        let ctl = Controller::new(
            ControllerConfig {
                node_memory_budget_mb: 1 << 20,
                dedup_enabled: false,
                ..Default::default()
            },
            nodes,
        );
        let actions: Vec<Arc<Action>> = (0..50)
            .map(|i| {
                Arc::new(Action {
                    name: ActionName {
                        namespace: Namespace("guest".into()),
                        name: format!("sched{i}"),
                    },
                    version: "0.0.1".into(),
                    exec: Exec {
                        kind: "python:3".into(),
                        code: Code::Source("def main(a):\n  return a\n".into()),
                        main: "main".into(),
                    },
                    parameters: serde_json::Map::new(),
                    annotations: vec![],
                    limits: Limits {
                        timeout_ms: 60_000,
                        memory_mb: 128,
                        concurrency: 1,
                        logs_kb: 10,
                    },
                    publish: false,
                    updated: 0,
                })
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let callers: Vec<_> = (0..64usize)
            .map(|c| {
                let (ctl, actions, stop, done, failed) = (
                    ctl.clone(),
                    actions.clone(),
                    stop.clone(),
                    done.clone(),
                    failed.clone(),
                );
                tokio::spawn(async move {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let req = InvokeRequest {
                            id: ActivationId::random(),
                            action: actions[i % actions.len()].clone(),
                            params: serde_json::Map::new(),
                            subject: "bench".into(),
                            api_key: "u:k".into(),
                            arrived: 0,
                        };
                        match ctl.invoke(req).await {
                            Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        i += 7;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(seconds.max(0.1))).await;
        stop.store(true, Ordering::Relaxed);
        for c in callers {
            let _ = c.await;
        }
        let secs = t0.elapsed().as_secs_f64();
        ctl.shutdown().await;
        if failed.load(Ordering::Relaxed) > 0 {
            tracing::warn!(
                failed = failed.load(Ordering::Relaxed),
                "some scheduler-benchmark invocations failed"
            );
        }
        Ok(done.load(Ordering::Relaxed) as f64 / secs)
    })
}

/// Redis Cluster lookup µs/page (and the in-memory figure of the same workload), or why not.
fn redis_lookups(urls: &[String]) -> (Option<f64>, Option<String>, Option<f64>) {
    let run = |urls: &[String]| match medes_registry_redis::bench::bench_lookup_both(urls, 16_384) {
        Ok(b) => (Some(b.redis_us_per_page), None, Some(b.memory_us_per_page)),
        Err(e) => (None, Some(format!("redis benchmark failed: {e:#}")), None),
    };
    if !urls.is_empty() {
        return run(urls);
    }
    if let Some(why) = medes_registry_redis::local::redis_server_missing() {
        return (None, Some(why), None);
    }
    match medes_registry_redis::local::LocalCluster::start(3) {
        Ok(cluster) => {
            let r = run(&cluster.urls());
            drop(cluster);
            r
        }
        Err(e) => (
            None,
            Some(format!("starting a local redis cluster: {e}")),
            None,
        ),
    }
}
