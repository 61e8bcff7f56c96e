//! `medes cluster up --nodes N` / `medes cluster down` / `medes cluster status`: a multi-host
//! cluster on this machine (issue 7). `up` creates N emulated hosts (network namespaces on a
//! bridge, `medes_testbed`), starts `medes controller` in the root namespace (registry and
//! REST API on the bridge address `10.77.K.1`) and one `medes agent` per host, each serving at
//! its host's own address, so controller ↔ agent traffic crosses real TCP between "hosts". It
//! waits until the REST API answers, prints the endpoint and key, records what it started in
//! `<dir>/cluster.json`, and returns, leaving the processes running (their logs in `<dir>`).
//! `down` stops them (controller first, so it destroys the sandboxes through the agents;
//! SIGTERM, then SIGKILL after a grace period), removes the hosts and, with `--purge`, the
//! dedup stores the agents keep across restarts. It also cleans up after a crash: processes
//! recorded in the state file are checked by start time, and test beds whose owner died are
//! removed. `partition A B` / `heal A B` cut and restore the traffic between two nodes
//! (silent drops: connections time out), `link NODE down|up` cuts a node off from everyone.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use medes_testbed::{BedId, Testbed};
use serde::{Deserialize, Serialize};

use crate::platform::read_auth_file;

/// Arguments of `medes cluster`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Create N namespaced hosts, start the controller and one agent per host, print the REST
    /// endpoint, and return (the cluster keeps running).
    Up(UpArgs),
    /// Stop the cluster started in `--dir` and remove its hosts (also after a crash).
    Down(DownArgs),
    /// Show the cluster recorded in `--dir` and which of its processes are alive.
    Status(DirArg),
    /// Cut two nodes off from each other (both keep reaching the controller).
    Partition(PairArgs),
    /// Undo `partition`.
    Heal(PairArgs),
    /// Take a node's link down (it reaches no one) or up again.
    Link(LinkArgs),
}

#[derive(clap::Args)]
struct PairArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The two nodes (e.g. `node-0 node-1`).
    #[arg(num_args = 2, required = true)]
    nodes: Vec<String>,
}

#[derive(clap::Args)]
struct LinkArgs {
    #[command(flatten)]
    dir: DirArg,
    /// The node (e.g. `node-2`).
    node: String,
    /// `up` or `down`.
    #[arg(value_parser = ["up", "down"])]
    state: String,
}

#[derive(clap::Args)]
struct DirArg {
    /// Directory holding the cluster's state file, logs and data directories.
    #[arg(long, default_value = "/tmp/medes-cluster")]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Number of hosts (one agent each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    nodes: u32,
    #[command(flatten)]
    dir: DirArg,
    /// Configuration file for the controller and the agents (`--data-dir` is set per process).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Memory budget of each node, MiB, reported by its agent (default: the configuration's
    /// `controller.node_memory_budget_mb`; 0 there means half of the machine's memory for every
    /// node, so set this when the nodes share one machine).
    #[arg(long)]
    node_budget_mb: Option<u64>,
    /// Port of the REST API on the bridge address.
    #[arg(long, default_value_t = 3233)]
    api_port: u16,
    /// Port of the controller's registry on the bridge address.
    #[arg(long, default_value_t = 3240)]
    rpc_port: u16,
    /// Port each agent serves at on its host's address.
    #[arg(long, default_value_t = 3241)]
    agent_port: u16,
    /// Agents remove their kept dedup stores and bases when they stop.
    #[arg(long)]
    purge_on_exit: bool,
    /// How long to wait for the REST API, seconds.
    #[arg(long, default_value_t = 120)]
    wait_s: u64,
}

#[derive(clap::Args)]
struct DownArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Also remove the dedup stores and bases the agents keep across restarts.
    #[arg(long)]
    purge: bool,
    /// Seconds each process is given to stop after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 20)]
    grace_s: u64,
}

/// One process the cluster started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proc {
    /// `controller` or the node id.
    name: String,
    pid: u32,
    /// Start time (field 22 of `/proc/PID/stat`), to tell a reused pid apart.
    start: u64,
    /// Its data directory.
    data_dir: PathBuf,
    /// Its log file.
    log: PathBuf,
    /// Where it serves (the registry for the controller, gRPC for an agent).
    address: String,
    /// An agent's own sandbox run directory (a tmpfs it mounts), removed by `down`.
    #[serde(default)]
    run_dir: Option<PathBuf>,
}

/// `<dir>/cluster.json`: what `up` started, for `down` and `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ClusterState {
    bed: Option<u8>,
    url: String,
    controller: Option<Proc>,
    agents: Vec<Proc>,
}

const STATE_FILE: &str = "cluster.json";

impl ClusterState {
    fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }
    fn load(dir: &Path) -> anyhow::Result<Option<ClusterState>> {
        let path = Self::path(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
    fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.controller.iter().chain(self.agents.iter())
    }
}

/// Runs `medes cluster`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Sub::Up(a) => up(a),
        Sub::Down(a) => down(&a.dir.dir, a.purge, Duration::from_secs(a.grace_s)),
        Sub::Status(a) => status(&a),
        Sub::Partition(a) => links(&a.dir, |bed, idx| {
            let (i, j) = (idx(&a.nodes[0])?, idx(&a.nodes[1])?);
            bed.partition(i, j)?;
            println!(
                "{} and {} no longer reach each other",
                a.nodes[0], a.nodes[1]
            );
            Ok(())
        }),
        Sub::Heal(a) => links(&a.dir, |bed, idx| {
            let (i, j) = (idx(&a.nodes[0])?, idx(&a.nodes[1])?);
            bed.heal(i, j)?;
            println!("{} and {} reach each other again", a.nodes[0], a.nodes[1]);
            Ok(())
        }),
        Sub::Link(a) => links(&a.dir, |bed, idx| {
            bed.set_link(idx(&a.node)?, a.state == "up")?;
            println!("{}'s link is {}", a.node, a.state);
            Ok(())
        }),
    }
}

/// Runs `change` on the hosts of the cluster recorded in `dir`; it gets the test bed and a
/// function from a node id to its host index.
fn links(
    dir: &DirArg,
    change: impl FnOnce(&Testbed, &dyn Fn(&str) -> anyhow::Result<usize>) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(&dir.dir).context("resolving --dir")?;
    let Some(state) = ClusterState::load(&dir)? else {
        bail!("no cluster recorded in {}", dir.display());
    };
    let bed = state.bed.context("the cluster has no hosts recorded")?;
    let bed = Testbed::attach(BedId(bed)).context("opening the cluster's hosts")?;
    let index = |node: &str| -> anyhow::Result<usize> {
        state
            .agents
            .iter()
            .position(|a| a.name == node)
            .with_context(|| format!("no node {node} in the cluster"))
    };
    change(&bed, &index)?;
    Ok(ExitCode::SUCCESS)
}

fn alive(p: &Proc) -> bool {
    medes_testbed::start_time(p.pid) == Some(p.start)
}

/// Whether `p` still has a `/proc` entry (alive, or a zombie not yet reaped).
fn exists(p: &Proc) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
        .ok()
        .and_then(|stat| {
            let rest = stat.rsplit_once(')')?.1.to_string();
            rest.split_whitespace().nth(19)?.parse::<u64>().ok()
        })
        == Some(p.start)
}

fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(&args.dir.dir).context("resolving --dir")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(old) = ClusterState::load(&dir)? {
        if old.procs().any(alive) {
            bail!(
                "a cluster is already up in {} (stop it with: medes cluster down --dir {})",
                dir.display(),
                dir.display()
            );
        }
        // What a crashed earlier run left.
        down(&dir, false, Duration::from_secs(1))?;
    }
    let n = args.nodes as usize;
    let bed = Testbed::up(n).context("creating the namespaced hosts")?;
    let gw = bed.gateway();
    let mut state = ClusterState {
        bed: Some(bed.id().0),
        url: format!("http://{gw}:{}", args.api_port),
        ..Default::default()
    };
    // Recorded before anything starts, so that `down` can clean up a crash from here on.
    let bed_id = bed.id();
    let bed_kept = bed.detach().context("keeping the hosts")?;
    debug_assert_eq!(bed_id, bed_kept);
    state.save(&dir)?;
    match start_all(&args, &dir, bed_id, &mut state) {
        Ok(()) => {}
        Err(e) => {
            let _ = down(&dir, false, Duration::from_secs(5));
            return Err(e);
        }
    }
    let auth = read_auth_file(&dir.join("controller"))?;
    println!("medes cluster: {n} node(s) on test bed {bed_id} (hosts 10.77.{bed_id}.2..)");
    println!("  REST API : {}", state.url);
    println!("  auth key : {auth}");
    for a in &state.agents {
        println!("  node     : {} at {} (pid {})", a.name, a.address, a.pid);
    }
    if let Some(c) = &state.controller {
        println!("  registry : {} (pid {})", c.address, c.pid);
    }
    println!("  logs     : {}/*.log", dir.display());
    println!("  stop with: medes cluster down --dir {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// A process started detached from this one (own process group, stdin closed, output to
/// `log`).
fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

fn start_all(
    args: &UpArgs,
    dir: &Path,
    bed: BedId,
    state: &mut ClusterState,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the medes binary")?;
    let gw = bed.gateway();
    let rpc = SocketAddr::from((gw, args.rpc_port));
    let api = SocketAddr::from((gw, args.api_port));
    let n = args.nodes as usize;
    let mut children: Vec<(String, Child)> = Vec::new();

    let data = dir.join("controller");
    let log = dir.join("controller.log");
    let mut cmd = Command::new(&exe);
    cmd.arg("controller")
        .args(["--nodes", &n.to_string()])
        // A fresh cluster: wait for every agent (as long as for the REST API).
        .args([
            "--wait-for-nodes-ms",
            &args.wait_s.saturating_mul(1000).to_string(),
        ])
        .args(["--rpc", &rpc.to_string()])
        .args(["--listen", &api.to_string()])
        .arg("--data-dir")
        .arg(&data);
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    let child = spawn(cmd, &log)?;
    state.controller = Some(Proc {
        name: "controller".into(),
        pid: child.id(),
        start: medes_testbed::start_time(child.id()).unwrap_or(0),
        data_dir: data,
        log,
        address: rpc.to_string(),
        run_dir: None,
    });
    children.push(("controller".into(), child));
    state.save(dir)?;

    for i in 0..n {
        let name = format!("node-{i}");
        let addr = SocketAddr::from((bed.host_addr(i), args.agent_port));
        let data = dir.join(&name);
        let log = dir.join(format!("{name}.log"));
        let (config, run_dir) = agent_config(args.config.as_deref(), dir, bed, &name)?;
        let mut cmd = Command::new(&exe);
        host_netns(bed, i, &mut cmd)?;
        cmd.arg("agent")
            .args(["--controller", &rpc.to_string()])
            .args(["--listen", &addr.to_string()])
            .args(["--node-id", &name])
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(config);
        if let Some(mb) = args.node_budget_mb {
            cmd.args(["--memory-budget-mb", &mb.to_string()]);
        }
        if args.purge_on_exit {
            cmd.arg("--purge-on-exit");
        }
        let child = spawn(cmd, &log)?;
        state.agents.push(Proc {
            name: name.clone(),
            pid: child.id(),
            start: medes_testbed::start_time(child.id()).unwrap_or(0),
            data_dir: data,
            log,
            address: addr.to_string(),
            run_dir: Some(run_dir),
        });
        children.push((name, child));
        state.save(dir)?;
    }

    // The controller opens the REST API once every agent registered.
    let deadline = Instant::now() + Duration::from_secs(args.wait_s);
    loop {
        for (name, child) in &mut children {
            if let Some(status) = child.try_wait()? {
                let log = dir.join(format!("{name}.log"));
                bail!(
                    "{name} exited ({status}) before the cluster was up; its log ({}):\n{}",
                    log.display(),
                    tail(&log, 20)
                );
            }
        }
        if TcpStream::connect_timeout(&api, Duration::from_millis(300)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the REST API at {api} did not open within {} s; the controller's log:\n{}",
                args.wait_s,
                tail(&dir.join("controller.log"), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `<dir>/<node>.toml`: the given configuration (or the defaults) with a sandbox run
/// directory of the node's own (agents that share one race in its cleanup and tmpfs mount).
/// Returns the file and that run directory.
fn agent_config(
    base: Option<&Path>,
    dir: &Path,
    bed: BedId,
    node: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut table: toml::Table = match base {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => toml::Table::new(),
    };
    let sandbox = table
        .entry("agent")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("`agent` is not a table")?
        .entry("sandbox")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .context("`agent.sandbox` is not a table")?;
    let base_run = sandbox
        .get("run_dir")
        .and_then(toml::Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| medes_sandbox::SandboxConfig::default().run_dir);
    let run_dir = PathBuf::from(format!("{}-c{bed}-{node}", base_run.display()));
    sandbox.insert(
        "run_dir".into(),
        toml::Value::String(run_dir.display().to_string()),
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, toml::to_string(&table)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((path, run_dir))
}

/// Makes `cmd` start inside host `i` of test bed `bed` (which was detached: its namespaces
/// are opened by name).
fn host_netns(bed: BedId, i: usize, cmd: &mut Command) -> anyhow::Result<()> {
    let host = medes_testbed::Host::open(bed, i)
        .with_context(|| format!("opening host {i} of test bed {bed}"))?;
    host.prepare(cmd);
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `sig` to `p` if it is still the process recorded.
fn signal(p: &Proc, sig: nix::sys::signal::Signal) {
    if alive(p) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), sig);
    }
}

/// SIGTERM to every process of `procs`, SIGKILL to those still alive after `grace`.
fn stop(procs: &[&Proc], grace: Duration) {
    use nix::sys::signal::Signal;
    for p in procs {
        signal(p, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while procs.iter().any(|p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in procs.iter().filter(|p| alive(p)) {
        eprintln!(
            "{} (pid {}) did not stop within {grace:?}: killing it",
            p.name, p.pid
        );
        signal(p, Signal::SIGKILL);
    }
}

fn down(dir: &Path, purge: bool, grace: Duration) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(dir).context("resolving --dir")?;
    let Some(state) = ClusterState::load(&dir)? else {
        let removed = medes_testbed::cleanup_stale().context("removing stale test beds")?;
        println!(
            "no cluster recorded in {} (removed {removed} stale test bed(s))",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    // The controller first: its shutdown destroys the sandboxes through the agents.
    if let Some(c) = &state.controller {
        stop(&[c], grace);
    }
    let agents: Vec<&Proc> = state.agents.iter().collect();
    stop(&agents, grace);
    let mut purge_failed = false;
    if purge {
        // An agent's kept state opens only once its process is reaped (a killed agent that
        // is not our child is reaped by init, usually within a second or two).
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.agents.iter().any(exists) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for a in &state.agents {
            // Reported, not fatal: the hosts must go all the same.
            if let Err(e) = purge_kept(a) {
                eprintln!("removing what {} kept: {e:#}", a.name);
                purge_failed = true;
            }
        }
    }
    for a in &state.agents {
        // Sandboxes of an agent that was killed (it could not destroy them).
        let config = dir.join(format!("{}.toml", a.name));
        if let Ok(cfg) = crate::config::MedesConfig::load(Some(&config)) {
            let removed = medes_sandbox::cleanup_stale(&cfg.agent.sandbox);
            if removed > 0 {
                println!("removed {removed} sandbox(es) {} left behind", a.name);
            }
        }
    }
    for run_dir in state.agents.iter().filter_map(|a| a.run_dir.as_ref()) {
        // The agent mounted a tmpfs there; it is empty once the agent stopped.
        let _ = nix::mount::umount2(run_dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(run_dir);
    }
    if let Some(k) = state.bed {
        medes_testbed::remove(BedId(k)).context("removing the hosts")?;
    }
    std::fs::remove_file(ClusterState::path(&dir))
        .with_context(|| format!("removing {}", ClusterState::path(&dir).display()))?;
    println!(
        "medes cluster in {} is down ({} node(s){})",
        dir.display(),
        state.agents.len(),
        match (purge, purge_failed) {
            (true, false) => ", kept stores purged",
            (true, true) => ", some kept stores NOT purged",
            _ => "",
        }
    );
    Ok(if purge_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Removes the dedup stores and bases an agent kept for its data directory (after it stopped).
fn purge_kept(p: &Proc) -> anyhow::Result<()> {
    let mut cfg = medes_agent::AgentConfig::default();
    cfg.node_id = medes_core::NodeId(p.name.clone());
    cfg.data_dir = p.data_dir.clone();
    if let Some(run_dir) = &p.run_dir {
        cfg.sandbox.run_dir = run_dir.clone();
    }
    let agent = medes_agent::Agent::new(cfg).context("opening the node's kept state")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        agent.shutdown().await;
        agent.purge_kept().await;
    });
    Ok(())
}

fn status(args: &DirArg) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(&args.dir).context("resolving --dir")?;
    let Some(state) = ClusterState::load(&dir)? else {
        println!("no cluster recorded in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    };
    println!(
        "cluster in {} on test bed {}: REST API {}",
        dir.display(),
        state.bed.map_or("-".into(), |b| b.to_string()),
        state.url
    );
    let mut all_up = true;
    for p in state.procs() {
        let up = alive(p);
        all_up &= up;
        println!(
            "  {:<12} {:<22} pid {:<8} {}",
            p.name,
            p.address,
            p.pid,
            if up { "running" } else { "gone" }
        );
    }
    Ok(if all_up {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
