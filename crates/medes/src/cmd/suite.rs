//! `medes suite` (owned by the workload work, issue 3): deploy, run and list the ten functions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medes_workload::{Client, ClientConfig, Manifest, RunOptions, RunTable};

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
    /// A client for these arguments.
    pub fn client(&self) -> anyhow::Result<Client> {
        let auth = match &self.auth {
            Some(a) => a.clone(),
            None => crate::platform::read_auth_file(&self.data_dir)?,
        };
        Client::new(&ClientConfig::new(&self.url, auth)).context("building the API client")
    }
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
            } => {
                let cgroup_dir =
                    (cgroup_dir.as_os_str() != "none" && cgroup_dir.is_dir()).then_some(cgroup_dir);
                let opts = RunOptions {
                    invocations,
                    cgroup_dir,
                    ..Default::default()
                };
                let reports = medes_workload::run(&client, &manifest, &names, &opts).await;
                println!("{}", RunTable(&reports));
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
