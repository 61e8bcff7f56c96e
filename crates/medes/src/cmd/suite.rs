//! `medes suite` (owned by the workload work, issue 3): deploy, run and list the ten functions.
//!
//! `run --state dedup` (issue 5) forces every function through a dedup start over HTTP: after a
//! normal call, two concurrent calls make two sandboxes, the medes extension
//! `POST .../actions/{name}/medes/idle` runs the idle decision now (the first sandbox becomes a
//! base, the other a dedup sandbox), then two concurrent calls follow: one may take the idle base
//! (a base serves like a warm sandbox unless the server runs with `bases_serve = false`), the
//! other must restore the dedup sandbox. Repeated (bounded) until a call was a dedup start; every
//! call's result is checked like a normal run and its start kind reported.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_workload::suite::{CallReport, FunctionSpec, RunReport};
use medes_workload::{Client, ClientConfig, Manifest, RunOptions, RunTable};
use serde_json::Value;

/// Where the API is and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// API base URL.
    #[arg(long, env = "MEDES_API_URL", default_value = "http://127.0.0.1:3233")]
    pub url: String,
    /// Credentials `uuid:key` (default: the key `medes serve` wrote into the data directory).
    #[arg(long, env = "MEDES_AUTH", hide_env_values = true)]
    pub auth: Option<String>,
    /// The platform's data directory, where `medes serve` writes its API key.
    #[arg(long, env = "MEDES_DATA_DIR", default_value = "/var/lib/medes")]
    pub data_dir: PathBuf,
}

impl ApiArgs {
    /// The credentials: `--auth`, else the key in the data directory.
    fn auth(&self) -> anyhow::Result<String> {
        match &self.auth {
            Some(a) => Ok(a.clone()),
            None => crate::platform::read_auth_file(&self.data_dir),
        }
    }

    /// A client for these arguments.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&ClientConfig::new(&self.url, self.auth()?)).context("building the API client")
    }
}

/// Which sandbox state `suite run` starts the functions from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StartState {
    /// Cold, then warm (sequential calls).
    Normal,
    /// Additionally through a dedup start (forced idle decision, then a restore).
    Dedup,
}

/// Arguments of `medes suite`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    api: ApiArgs,
    /// The functions directory (holding manifest.toml); default ./functions, else the source tree's.
    #[arg(long, env = "MEDES_FUNCTIONS")]
    functions: Option<PathBuf>,
    #[command(subcommand)]
    command: SuiteCommand,
}

#[derive(clap::Subcommand)]
enum SuiteCommand {
    /// Deploy (create or overwrite) the actions with the manifest's limits.
    Deploy {
        /// Only these functions (default: all ten).
        names: Vec<String>,
    },
    /// Invoke each action with its default input, verify the result, print cold/warm latency.
    Run {
        /// Only these functions (default: all ten).
        names: Vec<String>,
        /// Sequential invocations per function (the first after a deploy is cold).
        #[arg(long, default_value_t = 3)]
        invocations: u32,
        /// Also write the reports as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The sandboxes' memory cgroup directory (platform on this machine): each function's warm
        /// sandbox PSS/RSS is read from /proc after its calls. `none` to skip.
        #[arg(long, default_value = medes_workload::footprint::DEFAULT_CGROUP_DIR)]
        cgroup_dir: PathBuf,
        /// `dedup`: after the normal calls, force every function through a dedup start (needs a
        /// medes server: uses the `medes/idle` extension) and check those results too.
        #[arg(long, value_enum, default_value = "normal")]
        state: StartState,
        /// With `--state dedup`: rounds (idle decision + two concurrent calls) tried per function
        /// before giving up on seeing a dedup start.
        #[arg(long, default_value_t = 5)]
        dedup_attempts: u32,
    },
    /// List the manifest's functions and what the API has deployed.
    List,
}

fn functions_dir(given: Option<PathBuf>) -> PathBuf {
    if let Some(d) = given {
        return d;
    }
    let local = PathBuf::from("functions");
    if local.join("manifest.toml").is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../functions")
}

/// Runs `medes suite`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = functions_dir(args.functions);
    let manifest = Manifest::load(&dir)
        .with_context(|| format!("loading the manifest in {}", dir.display()))?;
    let client = args.api.client()?;
    let idle = Idle::new(&args.api)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(async move {
        match args.command {
            SuiteCommand::Deploy { names } => {
                let reports = medes_workload::deploy(&client, &dir, &manifest, &names).await;
                let mut failed = 0;
                for r in &reports {
                    match &r.result {
                        Ok(v) => println!(
                            "deployed {:<12} version {v} ({})",
                            r.name,
                            if r.binary { "zip" } else { "source" }
                        ),
                        Err(e) => {
                            failed += 1;
                            println!("FAILED   {:<12} {}", r.name, medes_workload::error_chain(e));
                        }
                    }
                }
                Ok(if failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            SuiteCommand::Run {
                names,
                invocations,
                json,
                cgroup_dir,
                state,
                dedup_attempts,
            } => {
                let cgroup_dir =
                    (cgroup_dir.as_os_str() != "none" && cgroup_dir.is_dir()).then_some(cgroup_dir);
                let opts = RunOptions {
                    invocations,
                    cgroup_dir,
                    ..Default::default()
                };
                let mut reports = medes_workload::run(&client, &manifest, &names, &opts).await;
                if state == StartState::Dedup {
                    for r in &mut reports {
                        let Some(spec) = manifest.functions.get(&r.name) else {
                            continue;
                        };
                        dedup_round(&client, &idle, r, spec, dedup_attempts).await;
                    }
                }
                println!("{}", RunTable(&reports));
                if state == StartState::Dedup {
                    print_dedup(&reports);
                }
                for r in reports.iter().filter(|r| !r.passed()) {
                    for (i, c) in r.calls.iter().enumerate() {
                        for p in &c.problems {
                            println!("{} call {}: {p}", r.name, i + 1);
                        }
                    }
                    if r.bad_params_rejected == Some(false) {
                        println!("{}: bad params were not rejected", r.name);
                    }
                }
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_vec_pretty(&reports)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                let passed = reports.iter().filter(|r| r.passed()).count();
                println!("{passed} passed, {} failed", reports.len() - passed);
                Ok(if passed == reports.len() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            SuiteCommand::List => {
                let deployed = client.list_actions().await.context("listing actions")?;
                println!(
                    "{:<12} {:>7} {:>10} {:>9}  deployed",
                    "function", "mem MiB", "timeout ms", "paper MB"
                );
                for name in manifest.names() {
                    let f = &manifest.functions[&name];
                    let d = deployed
                        .iter()
                        .find(|a| a.name == name)
                        .map_or("-".to_string(), |a| a.version.clone());
                    let paper = f.paper_mb.map_or("-".to_string(), |m| format!("{m:.1}"));
                    println!(
                        "{name:<12} {:>7} {:>10} {paper:>9}  {d}",
                        f.memory_mb, f.timeout_ms
                    );
                }
                for a in deployed
                    .iter()
                    .filter(|a| !manifest.functions.contains_key(&a.name))
                {
                    println!(
                        "{:<12} {:>7} {:>10} {:>9}  {} (not in the manifest)",
                        a.name, "-", "-", "-", a.version
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// The `medes/idle` extension of a medes server.
struct Idle {
    http: reqwest::Client,
    base: String,
    user: String,
    key: String,
}

impl Idle {
    fn new(api: &ApiArgs) -> anyhow::Result<Idle> {
        let auth = api.auth()?;
        let (user, key) = auth
            .split_once(':')
            .context("the credentials are not `uuid:key`")?;
        Ok(Idle {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(180))
                .build()
                .context("building the HTTP client")?,
            base: api.url.trim_end_matches('/').to_string(),
            user: user.into(),
            key: key.into(),
        })
    }

    /// Runs the idle decision of `name`'s sandboxes now; returns the states of its sandboxes.
    async fn decide(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let url = format!(
            "{}/api/v1/namespaces/_/actions/{name}/medes/idle",
            self.base
        );
        let resp = self
            .http
            .post(&url)
            .basic_auth(&self.user, Some(&self.key))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status.is_success(),
            "POST {url}: {status} {body} (is the server a medes server with dedup enabled?)"
        );
        Ok(body
            .get("sandboxes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.get("state").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// One checked call (like the normal suite run's).
async fn call(client: &Client, name: &str, spec: &FunctionSpec) -> CallReport {
    medes_workload::suite::call(client, name, &spec.params, spec).await
}

/// Forces `r`'s function through a dedup start; appends every call to `r.calls`.
async fn dedup_round(
    client: &Client,
    idle: &Idle,
    r: &mut RunReport,
    spec: &FunctionSpec,
    attempts: u32,
) {
    let name = r.name.clone();
    let pair = || async {
        let (a, b) = tokio::join!(call(client, &name, spec), call(client, &name, spec));
        [a, b]
    };
    // Two sandboxes (a base and a dedup sandbox to be).
    r.calls.extend(pair().await);
    for _ in 0..attempts.max(1) {
        let states = match idle.decide(&name).await {
            Ok(s) => s,
            Err(e) => {
                r.calls.push(problem(format!("idle decision: {e:#}")));
                return;
            }
        };
        let calls = pair().await;
        let done = calls.iter().any(|c| c.start_kind == "dedup");
        r.calls.extend(calls);
        if done {
            return;
        }
        tracing::info!(function = %name, ?states, "no dedup start yet; trying again");
    }
    r.calls.push(problem(format!(
        "no dedup start after {attempts} forced idle decisions"
    )));
}

fn problem(p: String) -> CallReport {
    CallReport {
        start_kind: "-".into(),
        client_ms: 0.0,
        duration_ms: None,
        init_ms: None,
        wait_ms: None,
        problems: vec![p],
    }
}

/// Per function: whether it passed, the dedup starts' client latency and every call's kind.
fn print_dedup(reports: &[RunReport]) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(["function", "ok", "dedup starts", "dedup ms", "start kinds"]);
    for r in reports {
        let dedup: Vec<&CallReport> = r.calls.iter().filter(|c| c.start_kind == "dedup").collect();
        let ok = dedup.iter().all(|c| c.problems.is_empty()) && !dedup.is_empty() && r.passed();
        t.add_row([
            r.name.clone(),
            if ok { "yes".into() } else { "NO".into() },
            dedup.len().to_string(),
            dedup
                .iter()
                .map(|c| format!("{:.1}", c.client_ms))
                .collect::<Vec<_>>()
                .join(", "),
            r.calls
                .iter()
                .map(|c| c.start_kind.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    println!("{t}");
}
