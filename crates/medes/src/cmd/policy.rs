//! `medes policy get|set|unset`: the operator's knob on a running `medes serve` (through
//! `/api/v1/namespaces/_/medes/policy`), globally or for one action.

use std::process::ExitCode;

use anyhow::Context;
use medes_policy::{FunctionKnob, KnobMode, PolicyChoice, PolicySettings, PolicyUpdate};
use serde_json::Value;

use super::suite::ApiArgs;

/// Arguments of `medes policy`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Print the knob in force (or one action's overrides).
    Get {
        /// Only this action's overrides.
        #[arg(long)]
        action: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the knob: given fields only (globally, or as one action's overrides).
    Set(SetArgs),
    /// Remove one action's overrides.
    Unset {
        /// The action.
        #[arg(long)]
        action: String,
    },
}

#[derive(clap::Args)]
struct SetArgs {
    /// Apply to this action only (its overrides; replaces its previous ones).
    #[arg(long)]
    action: Option<String>,
    /// The policy: medes, dedup-rule or keep-alive (global only).
    #[arg(long)]
    policy: Option<String>,
    /// Medes's mode: latency or memory (implied by --alpha / --budget-mb when absent).
    #[arg(long)]
    mode: Option<String>,
    /// Latency mode: average start latency ≤ alpha × warm start (> 1).
    #[arg(long)]
    alpha: Option<f64>,
    /// Memory mode: the budget M0 in MB (globally 0 = the cluster's budget; for an action, its
    /// own budget).
    #[arg(long)]
    budget_mb: Option<f64>,
    /// Idle period before a decision, s.
    #[arg(long)]
    idle_period_s: Option<u64>,
    /// Keep-alive of a warm sandbox, s.
    #[arg(long)]
    keep_alive_s: Option<u64>,
    /// Keep-dedup of a dedup sandbox, s.
    #[arg(long)]
    keep_dedup_s: Option<u64>,
    /// Medes, memory mode: no timer destroys a sandbox while the cluster is below this share of
    /// its budget (global only; 0 removes it).
    #[arg(long)]
    hold_below: Option<f64>,
    /// Medes: arrival prediction, pre-warming ahead of predicted arrivals (`medes-predict`;
    /// global only).
    #[arg(long)]
    predict: Option<bool>,
    /// Medes: evict idle sandboxes in Greedy-Dual order with dedup as the cheaper state
    /// (global only).
    #[arg(long)]
    greedy_dual: Option<bool>,
    /// Medes: at keep-alive expiry deduplicate a warm sandbox (kept until keep-dedup) instead
    /// of purging it (the simulator's `-dka`; global only).
    #[arg(long)]
    dedup_at_keep_alive: Option<bool>,
    /// Medes: bases on demand: a sandbox becomes a base only when it would otherwise be
    /// deduplicated (the simulator's `-lazybase`; global only).
    #[arg(long)]
    bases_on_demand: Option<bool>,
    /// Medes, with --bases-on-demand: a function's first base is made only if its candidates
    /// save at least this many warm footprints m_W (≥ 0; default 2; global only).
    #[arg(long)]
    base_cost_factor: Option<f64>,
    /// Medes: purge a base with no dependents idle for the keep-dedup period (the simulator's
    /// `-retire`; global only).
    #[arg(long)]
    retire_bases: Option<bool>,
    /// The platform: end a base's process once its page image is taken, keeping the base as
    /// its image only (charged the image, never given an invocation; global only).
    #[arg(long)]
    release_base_process: Option<bool>,
    /// A named setting first, then the other flags on top (global only): `medes-predict`
    /// (Medes, memory mode, --hold-below 0.9, --predict true, --greedy-dual true) or
    /// `medes-lean` (the simulator's medes-ka-1m-kd-12m-dka-lazybase-retire: Medes, memory
    /// mode, idle period 60 s, keep-alive 60 s, keep-dedup 720 s, --dedup-at-keep-alive true,
    /// --bases-on-demand true, --base-cost-factor 2, --retire-bases true, no hold, no
    /// prediction, the prototype's eviction order).
    #[arg(long)]
    preset: Option<String>,
}

fn mode(args: &SetArgs) -> anyhow::Result<Option<KnobMode>> {
    Ok(match args.mode.as_deref() {
        Some("latency") => Some(KnobMode::Latency),
        Some("memory") => Some(KnobMode::Memory),
        Some(other) => anyhow::bail!("--mode must be latency or memory, not {other:?}"),
        None if args.alpha.is_some() && args.budget_mb.is_some() => {
            anyhow::bail!("give --mode with both --alpha and --budget-mb")
        }
        None if args.alpha.is_some() => Some(KnobMode::Latency),
        None if args.budget_mb.is_some() => Some(KnobMode::Memory),
        None => None,
    })
}

fn show_settings(s: &PolicySettings) {
    let mode = match s.mode {
        KnobMode::Latency => format!("latency (alpha {})", s.alpha),
        KnobMode::Memory => format!(
            "memory (budget {})",
            s.budget_mb
                .map_or("the cluster's".to_string(), |b| format!("{b} MB"))
        ),
    };
    let t = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} s"));
    println!("policy        {}", s.policy.as_str());
    println!("mode          {mode}");
    println!("idle period   {}", t(s.idle_period_s));
    println!("keep-alive    {}", t(s.keep_alive_s));
    println!("keep-dedup    {}", t(s.keep_dedup_s));
    if let Some(h) = s.hold_below {
        println!("hold below    {:.0}% of the budget", h * 100.0);
    }
    if s.predict {
        println!("prediction    on (pre-warms ahead of predicted arrivals)");
    }
    if s.greedy_dual {
        println!("eviction      greedy-dual (dedup as the cheaper state)");
    }
    if s.dedup_at_keep_alive {
        println!("at keep-alive dedup (kept until keep-dedup)");
    }
    if s.bases_on_demand {
        println!(
            "bases         on demand (first base at {} x m_W)",
            s.base_cost_factor
                .unwrap_or(medes_policy::policies::MedesConfig::default().base_cost_factor)
        );
    } else if let Some(c) = s.base_cost_factor {
        println!("base cost     {c} x m_W (used with bases on demand, now off)");
    }
    if s.retire_bases {
        println!("retire bases  idle past keep-dedup without dependents");
    }
    if s.release_base_process {
        println!("base process  released once its image is taken (a base is its image only)");
    }
    for (name, k) in &s.functions {
        println!("  {name}: {}", serde_json::to_string(k).unwrap_or_default());
    }
}

/// Runs `medes policy`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let auth = match &args.api.auth {
        Some(a) => a.clone(),
        None => crate::platform::read_auth_file(&args.api.data_dir)?,
    };
    let (user, key) = auth
        .split_once(':')
        .context("the key must be of the form uuid:key")?;
    let base = format!("{}/api/v1/namespaces/_", args.api.url.trim_end_matches('/'));
    let url = |action: Option<&str>| match action {
        Some(a) => format!("{base}/actions/{a}/medes/policy"),
        None => format!("{base}/medes/policy"),
    };
    let (method, target, body): (reqwest::Method, String, Option<Value>) = match &args.command {
        PolicyCommand::Get { action, .. } => (reqwest::Method::GET, url(action.as_deref()), None),
        PolicyCommand::Unset { action } => (reqwest::Method::DELETE, url(Some(action)), None),
        PolicyCommand::Set(s) => {
            let mode = mode(s)?;
            let body = match &s.action {
                Some(_) => {
                    anyhow::ensure!(
                        s.policy.is_none()
                            && s.hold_below.is_none()
                            && s.predict.is_none()
                            && s.greedy_dual.is_none()
                            && s.dedup_at_keep_alive.is_none()
                            && s.bases_on_demand.is_none()
                            && s.base_cost_factor.is_none()
                            && s.retire_bases.is_none()
                            && s.release_base_process.is_none()
                            && s.preset.is_none(),
                        "--policy, --hold-below, --predict, --greedy-dual, --dedup-at-keep-alive, \
                         --bases-on-demand, --base-cost-factor, --retire-bases, \
                         --release-base-process and --preset are global"
                    );
                    serde_json::to_value(FunctionKnob {
                        mode,
                        alpha: s.alpha,
                        budget_mb: s.budget_mb,
                        idle_period_s: s.idle_period_s,
                        keep_alive_s: s.keep_alive_s,
                        keep_dedup_s: s.keep_dedup_s,
                    })?
                }
                None => {
                    let policy = s
                        .policy
                        .as_deref()
                        .map(str::parse::<PolicyChoice>)
                        .transpose()?;
                    let preset = match s.preset.as_deref() {
                        None => PolicyUpdate::default(),
                        Some(name) => PolicyUpdate::preset(name)?,
                    };
                    serde_json::to_value(preset.then(&PolicyUpdate {
                        policy,
                        mode,
                        alpha: s.alpha,
                        budget_mb: s.budget_mb,
                        idle_period_s: s.idle_period_s,
                        keep_alive_s: s.keep_alive_s,
                        keep_dedup_s: s.keep_dedup_s,
                        hold_below: s.hold_below,
                        predict: s.predict,
                        greedy_dual: s.greedy_dual,
                        dedup_at_keep_alive: s.dedup_at_keep_alive,
                        bases_on_demand: s.bases_on_demand,
                        base_cost_factor: s.base_cost_factor,
                        retire_bases: s.retire_bases,
                        release_base_process: s.release_base_process,
                    }))?
                }
            };
            (reqwest::Method::PUT, url(s.action.as_deref()), Some(body))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let (status, reply): (reqwest::StatusCode, Value) = rt.block_on(async {
        let mut req = reqwest::Client::new()
            .request(method, &target)
            .basic_auth(user, Some(key));
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {target} (is `medes serve` running?)"))?;
        let status = resp.status();
        let v = resp.json().await.unwrap_or(Value::Null);
        anyhow::Ok((status, v))
    })?;
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            reply["error"].as_str().unwrap_or(&reply.to_string())
        );
    }
    let as_json = matches!(args.command, PolicyCommand::Get { json: true, .. });
    match serde_json::from_value::<PolicySettings>(reply.clone()) {
        Ok(s) if !as_json => show_settings(&s),
        _ => println!("{}", serde_json::to_string_pretty(&reply)?),
    }
    Ok(ExitCode::SUCCESS)
}
