//! The operator's knob: which policy runs the live platform, its mode (latency α or memory M0),
//! its timers, globally and per function, and how it becomes a [`Policy`].
//!
//! The same settings come from the configuration file (`[controller.policy]`), the REST API
//! (`/api/v1/namespaces/{ns}/medes/policy`) and the CLI (`medes policy set`); the controller
//! builds a fresh [`Policy`] from them with [`PolicySettings::build`] whenever they change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::evict::EvictionOrder;
use crate::policies::{Medes, MedesConfig, MedesMode};
use crate::policy::{Decision, DedupRule, KeepAlive, Policy, Prewarm, RuleConfig};
use crate::view::{ClusterView, FunctionView, SandboxView};

/// Which idle-sandbox policy the platform runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyChoice {
    /// The simple rule of issue 5: after the idle period a sandbox becomes a base or is
    /// deduplicated; keep-alive, keep-dedup, T dedups per base ([`DedupRule`]).
    #[default]
    DedupRule,
    /// The Medes policy (paper §5): latency or memory mode ([`Medes`]).
    Medes,
    /// Fixed keep-alive, no deduplication ([`KeepAlive`]).
    KeepAlive,
}

impl PolicyChoice {
    /// The name used in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyChoice::DedupRule => "dedup-rule",
            PolicyChoice::Medes => "medes",
            PolicyChoice::KeepAlive => "keep-alive",
        }
    }
}

impl std::str::FromStr for PolicyChoice {
    type Err = KnobError;
    fn from_str(s: &str) -> Result<Self, KnobError> {
        match s {
            "dedup-rule" => Ok(PolicyChoice::DedupRule),
            "medes" => Ok(PolicyChoice::Medes),
            "keep-alive" | "fixed" => Ok(PolicyChoice::KeepAlive),
            _ => Err(KnobError::UnknownPolicy(s.to_string())),
        }
    }
}

/// The Medes policy's objective (paper §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KnobMode {
    /// P1: average start latency ≤ α·s_W, least memory.
    Latency,
    /// P2: memory ≤ M0, least latency.
    #[default]
    Memory,
}

/// Settings of one function (every field optional: missing ones come from the global settings).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionKnob {
    /// Latency or memory mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<KnobMode>,
    /// α of the latency mode (> 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// M0 of the memory mode, MB: for a function, its own budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_mb: Option<f64>,
    /// Idle period before a decision, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_period_s: Option<u64>,
    /// Keep-alive of a warm sandbox, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<u64>,
    /// Keep-dedup of a dedup sandbox, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_dedup_s: Option<u64>,
}

/// The knob: global settings and per-function overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    /// Which policy. Default `dedup-rule`.
    pub policy: PolicyChoice,
    /// Medes's mode. Default `memory`.
    pub mode: KnobMode,
    /// α of the latency mode (> 1). Default 2.5 (the paper's).
    pub alpha: f64,
    /// M0 of the memory mode, MB; absent (or 0 in an update): the cluster's memory budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_mb: Option<f64>,
    /// Idle period, s; absent: the controller's `idle_period_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_period_s: Option<u64>,
    /// Keep-alive, s; absent: the controller's `keep_alive_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<u64>,
    /// Keep-dedup, s; absent: the controller's `keep_dedup_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_dedup_s: Option<u64>,
    /// Medes, memory mode: no timer destroys a sandbox while the cluster uses less than this
    /// share of its budget (`MedesConfig::hold_below`); absent (or 0 in an update): the
    /// prototype's timers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_below: Option<f64>,
    /// Medes: arrival prediction (`MedesConfig::predict`, the pre-warming of `medes-predict`).
    /// Default false; `[controller.policy] predict = true` in the configuration file, or
    /// `{"predict": true}` in a `PUT .../medes/policy` (`medes policy set --predict true`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub predict: bool,
    /// Medes: evict idle sandboxes in Greedy-Dual order with dedup as the cheaper state
    /// (`MedesConfig::evict_greedy_dual`, [`crate::greedy_dual_rank`], the aging clock kept per
    /// node by the controller) instead of the prototype's over-provisioning order. Default
    /// false; `medes-predict` is `hold_below = 0.9`, `predict` and `greedy_dual`
    /// (`medes policy set --preset medes-predict`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub greedy_dual: bool,
    /// Medes: at keep-alive expiry a warm sandbox is deduplicated (kept until keep-dedup)
    /// instead of purged (`MedesConfig::dedup_at_keep_alive`, the simulator's `-dka`). Default
    /// false (the prototype purges).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dedup_at_keep_alive: bool,
    /// Medes: bases on demand (`MedesConfig::bases_on_demand`, the simulator's `-lazybase`): a
    /// sandbox becomes a base only when it would otherwise be deduplicated, a function's first
    /// base only if its candidates save at least `base_cost_factor` × m_W. Default false (the
    /// prototype makes every function's first idle sandbox a base).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bases_on_demand: bool,
    /// Medes, with `bases_on_demand`: what a function's first base costs, in warm footprints
    /// m_W (finite, ≥ 0); absent: `MedesConfig`'s default (2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_cost_factor: Option<f64>,
    /// Medes: base retirement (`MedesConfig::retire_bases`, the simulator's `-retire`): a base
    /// with no dependents idle for the keep-dedup period is purged. Default false (bases are
    /// kept for the whole run).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retire_bases: bool,
    /// The platform: once a base's page image is taken the controller ends its process and
    /// keeps the base as its image only (charged the image, counted as a base, never given an
    /// invocation, retired only by `retire_bases` or eviction). Default false (a base keeps
    /// its process as well as its image).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub release_base_process: bool,
    /// Per-function overrides, by action name (in every namespace).
    pub functions: BTreeMap<String, FunctionKnob>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            policy: PolicyChoice::DedupRule,
            mode: KnobMode::Memory,
            alpha: 2.5,
            budget_mb: None,
            idle_period_s: None,
            keep_alive_s: None,
            keep_dedup_s: None,
            hold_below: None,
            predict: false,
            greedy_dual: false,
            dedup_at_keep_alive: false,
            bases_on_demand: false,
            base_cost_factor: None,
            retire_bases: false,
            release_base_process: false,
            functions: BTreeMap::new(),
        }
    }
}

/// A change of the global settings: present fields replace the current ones.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyUpdate {
    /// Which policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyChoice>,
    /// Latency or memory mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<KnobMode>,
    /// α (> 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// M0, MB; 0 goes back to the cluster's budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_mb: Option<f64>,
    /// Idle period, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_period_s: Option<u64>,
    /// Keep-alive, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<u64>,
    /// Keep-dedup, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_dedup_s: Option<u64>,
    /// Hold threshold (0 < x ≤ 1); 0 removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_below: Option<f64>,
    /// Medes: arrival prediction (pre-warming) on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predict: Option<bool>,
    /// Medes: Greedy-Dual eviction order on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub greedy_dual: Option<bool>,
    /// Medes: dedup (instead of purge) at keep-alive expiry on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_at_keep_alive: Option<bool>,
    /// Medes: bases on demand on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bases_on_demand: Option<bool>,
    /// Medes: the first base's cost in m_W (finite, ≥ 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_cost_factor: Option<f64>,
    /// Medes: base retirement on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retire_bases: Option<bool>,
    /// The platform: release a base's process once its image is taken, on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_base_process: Option<bool>,
}

impl PolicyUpdate {
    /// The recommended variant, `medes-predict` (docs/EVALUATION.md): Medes in memory mode,
    /// holding sandboxes past the timers below 90% of the budget, pre-warming ahead of
    /// predicted arrivals, evicting in Greedy-Dual order. Other fields absent (kept).
    pub fn medes_predict() -> PolicyUpdate {
        PolicyUpdate {
            policy: Some(PolicyChoice::Medes),
            mode: Some(KnobMode::Memory),
            hold_below: Some(0.9),
            predict: Some(true),
            greedy_dual: Some(true),
            ..PolicyUpdate::default()
        }
    }

    /// `medes-lean`, the simulator's `medes-ka-1m-kd-12m-dka-lazybase-retire` (docs/EVALUATION.md,
    /// memory at the same latency): Medes in memory mode, idle period 60 s, keep-alive 60 s,
    /// dedup at keep-alive expiry, keep-dedup 12 min, bases on demand (first base at 2 × m_W),
    /// bases retired; no hold, no prediction, the prototype's eviction order. The budget (M0)
    /// and per-function overrides are kept.
    pub fn medes_lean() -> PolicyUpdate {
        PolicyUpdate {
            policy: Some(PolicyChoice::Medes),
            mode: Some(KnobMode::Memory),
            idle_period_s: Some(60),
            keep_alive_s: Some(60),
            keep_dedup_s: Some(12 * 60),
            hold_below: Some(0.0),
            predict: Some(false),
            greedy_dual: Some(false),
            dedup_at_keep_alive: Some(true),
            bases_on_demand: Some(true),
            base_cost_factor: Some(crate::policies::MedesConfig::default().base_cost_factor),
            retire_bases: Some(true),
            ..PolicyUpdate::default()
        }
    }

    /// A preset by name: `medes-predict` or `medes-lean`.
    pub fn preset(name: &str) -> Result<PolicyUpdate, KnobError> {
        match name {
            "medes-predict" => Ok(PolicyUpdate::medes_predict()),
            "medes-lean" => Ok(PolicyUpdate::medes_lean()),
            _ => Err(KnobError::UnknownPreset(name.to_string())),
        }
    }

    /// `self` with the fields present in `over` replaced by `over`'s (a preset, then flags).
    pub fn then(self, over: &PolicyUpdate) -> PolicyUpdate {
        PolicyUpdate {
            policy: over.policy.or(self.policy),
            mode: over.mode.or(self.mode),
            alpha: over.alpha.or(self.alpha),
            budget_mb: over.budget_mb.or(self.budget_mb),
            idle_period_s: over.idle_period_s.or(self.idle_period_s),
            keep_alive_s: over.keep_alive_s.or(self.keep_alive_s),
            keep_dedup_s: over.keep_dedup_s.or(self.keep_dedup_s),
            hold_below: over.hold_below.or(self.hold_below),
            predict: over.predict.or(self.predict),
            greedy_dual: over.greedy_dual.or(self.greedy_dual),
            dedup_at_keep_alive: over.dedup_at_keep_alive.or(self.dedup_at_keep_alive),
            bases_on_demand: over.bases_on_demand.or(self.bases_on_demand),
            base_cost_factor: over.base_cost_factor.or(self.base_cost_factor),
            retire_bases: over.retire_bases.or(self.retire_bases),
            release_base_process: over.release_base_process.or(self.release_base_process),
        }
    }
}

/// Why settings were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KnobError {
    /// Not one of `dedup-rule`, `medes`, `keep-alive`.
    #[error("unknown policy {0:?} (expected dedup-rule, medes or keep-alive)")]
    UnknownPolicy(String),
    /// α must be a finite number above 1.
    #[error("{scope}: alpha must be a finite number above 1, not {value}")]
    Alpha {
        /// `global` or the function.
        scope: String,
        /// The value.
        value: f64,
    },
    /// M0 must be a finite positive number.
    #[error("{scope}: budget_mb must be a finite positive number, not {value}")]
    Budget {
        /// `global` or the function.
        scope: String,
        /// The value.
        value: f64,
    },
    /// A timer out of range (1 s .. 7 days).
    #[error("{scope}: {timer} must be between 1 and 604800 s, not {value}")]
    Timer {
        /// `global` or the function.
        scope: String,
        /// Which timer.
        timer: &'static str,
        /// The value.
        value: u64,
    },
    /// The hold threshold must be within (0, 1].
    #[error("hold_below must be within (0, 1], not {0}")]
    Hold(f64),
    /// The first base's cost must be a finite number ≥ 0.
    #[error("base_cost_factor must be a finite number of at least 0, not {0}")]
    BaseCost(f64),
    /// Not one of `medes-predict`, `medes-lean`.
    #[error("unknown preset {0:?} (expected medes-predict or medes-lean)")]
    UnknownPreset(String),
    /// An empty function name.
    #[error("a function name must not be empty")]
    EmptyName,
}

/// Something whose knob can be read and set at run time (the live controller); the REST API
/// talks to it through this trait.
pub trait PolicyControl: Send + Sync {
    /// The settings in force.
    fn policy_settings(&self) -> PolicySettings;
    /// Replaces the settings; returns the ones now in force (absent timers filled in).
    fn set_policy_settings(&self, settings: PolicySettings) -> Result<PolicySettings, KnobError>;
}

/// Timers in seconds, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Idle period, s.
    pub idle_period_s: u64,
    /// Keep-alive, s.
    pub keep_alive_s: u64,
    /// Keep-dedup, s.
    pub keep_dedup_s: u64,
}

const MAX_TIMER_S: u64 = 7 * 24 * 3600;

fn check_timer(scope: &str, timer: &'static str, v: Option<u64>) -> Result<(), KnobError> {
    match v {
        Some(value) if value == 0 || value > MAX_TIMER_S => Err(KnobError::Timer {
            scope: scope.to_string(),
            timer,
            value,
        }),
        _ => Ok(()),
    }
}

fn check_alpha(scope: &str, v: Option<f64>) -> Result<(), KnobError> {
    match v {
        Some(value) if !(value.is_finite() && value > 1.0) => Err(KnobError::Alpha {
            scope: scope.to_string(),
            value,
        }),
        _ => Ok(()),
    }
}

fn check_budget(scope: &str, v: Option<f64>) -> Result<(), KnobError> {
    match v {
        Some(value) if !(value.is_finite() && value > 0.0) => Err(KnobError::Budget {
            scope: scope.to_string(),
            value,
        }),
        _ => Ok(()),
    }
}

impl FunctionKnob {
    /// Checks ranges; `scope` names the function in errors.
    pub fn validate(&self, scope: &str) -> Result<(), KnobError> {
        check_alpha(scope, self.alpha)?;
        check_budget(scope, self.budget_mb)?;
        check_timer(scope, "idle_period_s", self.idle_period_s)?;
        check_timer(scope, "keep_alive_s", self.keep_alive_s)?;
        check_timer(scope, "keep_dedup_s", self.keep_dedup_s)
    }

    /// Whether it overrides nothing.
    pub fn is_empty(&self) -> bool {
        *self == FunctionKnob::default()
    }
}

impl PolicySettings {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), KnobError> {
        let g = "global";
        check_alpha(g, Some(self.alpha))?;
        check_budget(g, self.budget_mb)?;
        check_timer(g, "idle_period_s", self.idle_period_s)?;
        check_timer(g, "keep_alive_s", self.keep_alive_s)?;
        check_timer(g, "keep_dedup_s", self.keep_dedup_s)?;
        if let Some(h) = self.hold_below
            && !(h.is_finite() && h > 0.0 && h <= 1.0)
        {
            return Err(KnobError::Hold(h));
        }
        if let Some(c) = self.base_cost_factor
            && !(c.is_finite() && c >= 0.0)
        {
            return Err(KnobError::BaseCost(c));
        }
        for (name, k) in &self.functions {
            if name.trim().is_empty() {
                return Err(KnobError::EmptyName);
            }
            k.validate(name)?;
        }
        Ok(())
    }

    /// Applies an update of the global settings (validated; on error nothing changes).
    pub fn apply(&mut self, u: &PolicyUpdate) -> Result<(), KnobError> {
        let mut next = self.clone();
        if let Some(p) = u.policy {
            next.policy = p;
        }
        if let Some(m) = u.mode {
            next.mode = m;
        }
        if let Some(a) = u.alpha {
            next.alpha = a;
        }
        match u.budget_mb {
            Some(0.0) => next.budget_mb = None,
            Some(b) => next.budget_mb = Some(b),
            None => {}
        }
        next.idle_period_s = u.idle_period_s.or(next.idle_period_s);
        next.keep_alive_s = u.keep_alive_s.or(next.keep_alive_s);
        next.keep_dedup_s = u.keep_dedup_s.or(next.keep_dedup_s);
        match u.hold_below {
            Some(0.0) => next.hold_below = None,
            Some(h) => next.hold_below = Some(h),
            None => {}
        }
        next.predict = u.predict.unwrap_or(next.predict);
        next.greedy_dual = u.greedy_dual.unwrap_or(next.greedy_dual);
        next.dedup_at_keep_alive = u.dedup_at_keep_alive.unwrap_or(next.dedup_at_keep_alive);
        next.bases_on_demand = u.bases_on_demand.unwrap_or(next.bases_on_demand);
        next.base_cost_factor = u.base_cost_factor.or(next.base_cost_factor);
        next.retire_bases = u.retire_bases.unwrap_or(next.retire_bases);
        next.release_base_process = u.release_base_process.unwrap_or(next.release_base_process);
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Sets (or, with an empty knob, removes) a function's overrides.
    pub fn set_function(&mut self, name: &str, knob: FunctionKnob) -> Result<(), KnobError> {
        if name.trim().is_empty() {
            return Err(KnobError::EmptyName);
        }
        knob.validate(name)?;
        if knob.is_empty() {
            self.functions.remove(name);
        } else {
            self.functions.insert(name.to_string(), knob);
        }
        Ok(())
    }

    /// Fills absent global timers from `defaults` (the controller's configuration).
    pub fn resolve(&mut self, defaults: Timers) {
        self.idle_period_s.get_or_insert(defaults.idle_period_s);
        self.keep_alive_s.get_or_insert(defaults.keep_alive_s);
        self.keep_dedup_s.get_or_insert(defaults.keep_dedup_s);
    }

    /// The global timers (absent ones from `defaults`).
    pub fn timers(&self, defaults: Timers) -> Timers {
        Timers {
            idle_period_s: self.idle_period_s.unwrap_or(defaults.idle_period_s),
            keep_alive_s: self.keep_alive_s.unwrap_or(defaults.keep_alive_s),
            keep_dedup_s: self.keep_dedup_s.unwrap_or(defaults.keep_dedup_s),
        }
    }

    /// The Medes mode of the global settings or of a function's overrides.
    fn medes_mode(&self, k: &FunctionKnob) -> MedesMode {
        match k.mode.unwrap_or(self.mode) {
            KnobMode::Latency => MedesMode::Latency {
                alpha: k.alpha.unwrap_or(self.alpha),
            },
            KnobMode::Memory => MedesMode::Memory {
                budget_mb: k.budget_mb.or(self.budget_mb),
            },
        }
    }

    fn one(
        &self,
        k: &FunctionKnob,
        defaults: Timers,
        dedup_per_base: u32,
        dedup_enabled: bool,
    ) -> Box<dyn Policy> {
        let t = self.timers(defaults);
        let ms = |own: Option<u64>, global: u64| own.unwrap_or(global).saturating_mul(1000);
        let idle_period_ms = ms(k.idle_period_s, t.idle_period_s);
        let keep_alive_ms = ms(k.keep_alive_s, t.keep_alive_s);
        let keep_dedup_ms = ms(k.keep_dedup_s, t.keep_dedup_s);
        match self.policy {
            PolicyChoice::KeepAlive => Box::new(KeepAlive::new(keep_alive_ms)),
            PolicyChoice::DedupRule => Box::new(DedupRule::new(RuleConfig {
                idle_period_ms,
                keep_alive_ms,
                keep_dedup_ms,
                dedup_per_base,
                dedup_enabled,
            })),
            PolicyChoice::Medes => Box::new(Medes::new(
                MedesConfig {
                    mode: self.medes_mode(k),
                    idle_period_ms,
                    keep_alive_ms,
                    keep_dedup_ms,
                    dedup_per_base: dedup_per_base.max(1) as usize,
                    // A function's own M0 is its own budget, not a share of the cluster's.
                    own_budget: k.budget_mb.is_some(),
                    hold_below: self.hold_below,
                    predict: self.predict.then(crate::policies::PredictConfig::default),
                    evict_greedy_dual: self.greedy_dual,
                    dedup_at_keep_alive: self.dedup_at_keep_alive,
                    bases_on_demand: self.bases_on_demand,
                    base_cost_factor: self
                        .base_cost_factor
                        .unwrap_or(MedesConfig::default().base_cost_factor),
                    retire_bases: self.retire_bases,
                    ..MedesConfig::default()
                },
                Vec::new(),
            )),
        }
    }

    /// The policy these settings describe: per function, the global settings with that
    /// function's overrides. `defaults` fills absent timers; `dedup_per_base` is T.
    pub fn build(&self, defaults: Timers, dedup_per_base: u32, dedup_enabled: bool) -> Tuned {
        let global = self.one(
            &FunctionKnob::default(),
            defaults,
            dedup_per_base,
            dedup_enabled,
        );
        let per = self
            .functions
            .iter()
            .map(|(n, k)| {
                (
                    n.clone(),
                    self.one(k, defaults, dedup_per_base, dedup_enabled),
                )
            })
            .collect();
        Tuned { global, per }
    }
}

/// A policy made of one policy per function (the knob's overrides) and one for the rest.
pub struct Tuned {
    global: Box<dyn Policy>,
    per: BTreeMap<String, Box<dyn Policy>>,
}

impl std::fmt::Debug for Tuned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuned")
            .field("policy", &self.global.name())
            .field("overrides", &self.per.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Tuned {
    fn of(&self, f: &FunctionView) -> &dyn Policy {
        self.per
            .get(&f.name.name)
            .map_or(self.global.as_ref(), |p| p.as_ref())
    }
    fn of_mut(&mut self, f: &FunctionView) -> &mut dyn Policy {
        match self.per.get_mut(&f.name.name) {
            Some(p) => p.as_mut(),
            None => self.global.as_mut(),
        }
    }
}

impl Policy for Tuned {
    fn name(&self) -> &'static str {
        self.global.name()
    }

    fn on_idle(
        &mut self,
        cluster: &ClusterView,
        function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Decision {
        self.of_mut(function)
            .on_idle(cluster, function, sandbox, now)
    }

    fn next_decision(
        &self,
        function: &FunctionView,
        sandbox: &SandboxView,
        now: Timestamp,
    ) -> Option<Timestamp> {
        self.of(function).next_decision(function, sandbox, now)
    }

    fn on_arrival(&mut self, function: &FunctionView, now: Timestamp) {
        self.of_mut(function).on_arrival(function, now)
    }

    fn tick_ms(&self) -> Option<u64> {
        self.global.tick_ms()
    }

    fn on_tick(
        &mut self,
        cluster: &ClusterView,
        functions: &[FunctionView],
        now: Timestamp,
    ) -> Vec<Prewarm> {
        self.global.on_tick(cluster, functions, now)
    }

    fn eviction_rank(&self, function: &FunctionView, sandbox: &SandboxView, now: Timestamp) -> f64 {
        // One order across functions: the global policy's.
        self.global.eviction_rank(function, sandbox, now)
    }

    fn eviction_order(&self) -> EvictionOrder {
        // One order across functions: the global policy's.
        self.global.eviction_order()
    }

    fn on_removed(&mut self, function: &FunctionView, sandbox: &SandboxView, now: Timestamp) {
        self.of_mut(function).on_removed(function, sandbox, now)
    }
}

#[cfg(test)]
mod tests {
    use medes_core::{ActionName, Bytes, Namespace};

    use super::*;
    use crate::SandboxState;

    const T: Timers = Timers {
        idle_period_s: 60,
        keep_alive_s: 600,
        keep_dedup_s: 900,
    };

    fn fv(name: &str) -> FunctionView {
        FunctionView::new(
            ActionName {
                namespace: Namespace("guest".into()),
                name: name.into(),
            },
            Bytes::mib(256),
        )
    }

    fn warm(since: u64) -> SandboxView {
        SandboxView::new(
            SandboxState::Warm {
                idle_since: Timestamp(since),
            },
            Timestamp(0),
            Bytes::mib(30),
        )
    }

    #[test]
    fn default_settings_are_todays_dedup_rule() {
        let s = PolicySettings::default();
        let p = s.build(T, 40, true);
        assert_eq!(p.name(), "dedup-rule");
        assert_eq!(
            p.next_decision(&fv("f"), &warm(0), Timestamp(0)),
            Some(Timestamp(60_000))
        );
    }

    #[test]
    fn per_function_timers_override_the_global_ones() {
        let mut s = PolicySettings {
            policy: PolicyChoice::KeepAlive,
            keep_alive_s: Some(120),
            ..PolicySettings::default()
        };
        s.set_function(
            "g",
            FunctionKnob {
                keep_alive_s: Some(5),
                ..FunctionKnob::default()
            },
        )
        .unwrap();
        let mut p = s.build(T, 40, true);
        let c = ClusterView::default();
        assert_eq!(p.name(), "keep-alive");
        assert_eq!(
            p.next_decision(&fv("f"), &warm(0), Timestamp(0)),
            Some(Timestamp(120_000))
        );
        assert_eq!(
            p.next_decision(&fv("g"), &warm(0), Timestamp(0)),
            Some(Timestamp(5_000))
        );
        assert_eq!(
            p.on_idle(&c, &fv("g"), &warm(0), Timestamp(5_000)),
            Decision::Purge
        );
        assert_eq!(
            p.on_idle(&c, &fv("f"), &warm(0), Timestamp(5_000)),
            Decision::KeepWarm
        );
        // An empty knob removes the override.
        s.set_function("g", FunctionKnob::default()).unwrap();
        assert!(s.functions.is_empty());
    }

    #[test]
    fn updates_merge_and_bad_values_change_nothing() {
        let mut s = PolicySettings::default();
        s.apply(&PolicyUpdate {
            policy: Some(PolicyChoice::Medes),
            mode: Some(KnobMode::Latency),
            alpha: Some(1.5),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(
            (s.policy, s.mode, s.alpha),
            (PolicyChoice::Medes, KnobMode::Latency, 1.5)
        );
        let before = s.clone();
        for bad in [
            PolicyUpdate {
                alpha: Some(0.5),
                ..PolicyUpdate::default()
            },
            PolicyUpdate {
                alpha: Some(f64::NAN),
                ..PolicyUpdate::default()
            },
            PolicyUpdate {
                budget_mb: Some(-3.0),
                ..PolicyUpdate::default()
            },
            PolicyUpdate {
                keep_alive_s: Some(0),
                ..PolicyUpdate::default()
            },
        ] {
            assert!(s.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(s, before);
        }
        s.apply(&PolicyUpdate {
            budget_mb: Some(512.0),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(s.budget_mb, Some(512.0));
        s.apply(&PolicyUpdate {
            budget_mb: Some(0.0),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(s.budget_mb, None);
        s.apply(&PolicyUpdate {
            hold_below: Some(0.9),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(s.hold_below, Some(0.9));
        assert!(
            s.apply(&PolicyUpdate {
                hold_below: Some(1.5),
                ..PolicyUpdate::default()
            })
            .is_err()
        );
        s.apply(&PolicyUpdate {
            hold_below: Some(0.0),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(s.hold_below, None);
        s.apply(&PolicyUpdate {
            predict: Some(true),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert!(s.predict);
        s.apply(&PolicyUpdate::default()).unwrap();
        assert!(s.predict, "an absent field keeps the setting");
        assert!("lru".parse::<PolicyChoice>().is_err());
        assert!(
            s.set_function(
                "f",
                FunctionKnob {
                    alpha: Some(1.0),
                    ..FunctionKnob::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn medes_latency_knob_changes_decisions() {
        // A function with a steady load of 60/min and 3 idle warm sandboxes: with a loose α
        // Medes deduplicates, with a tight α it keeps them warm.
        let mut f = fv("f");
        f.arrivals.peak_per_minute = 60;
        f.counts.warm = 3;
        f.counts.base = 1;
        f.latency.warm_ms = Some(10.0);
        f.latency.dedup_ms = Some(300.0);
        f.exec_ms = Some(1000.0);
        f.footprint.warm = Some(Bytes::mib(100));
        f.footprint.dedup = Some(Bytes::mib(10));
        let c = ClusterView {
            budget: Bytes::mib(10_000),
            peak_rate_sum: 1.0,
            functions: 1,
            ..ClusterView::default()
        };
        let decide = |alpha: f64| {
            let s = PolicySettings {
                policy: PolicyChoice::Medes,
                mode: KnobMode::Latency,
                alpha,
                ..PolicySettings::default()
            };
            let mut p = s.build(T, 40, true);
            p.on_idle(&c, &f, &warm(0), Timestamp(60_000))
        };
        assert_eq!(decide(1.01), Decision::Purge);
        assert_eq!(decide(20.0), Decision::Dedup);
    }

    #[test]
    fn live_medes_with_prediction_prewarms_on_its_timer() {
        let s = PolicySettings {
            policy: PolicyChoice::Medes,
            predict: true,
            ..PolicySettings::default()
        };
        let mut p = s.build(T, 40, true);
        assert_eq!(p.tick_ms(), Some(1_000));
        let mut f = fv("f");
        f.exec_ms = Some(990.0);
        f.latency.warm_ms = Some(10.0);
        f.counts.warm = 2;
        for i in 0..16 {
            p.on_arrival(&f, Timestamp(1_000 + i * 50));
        }
        let c = ClusterView {
            budget: Bytes::mib(4096),
            used: Bytes::mib(100),
            ..ClusterView::default()
        };
        // 16/s × 1 s = 16 busy sandboxes, + √16 = 20; 2 live: 18 more.
        let asks = p.on_tick(&c, std::slice::from_ref(&f), Timestamp(1_900));
        assert_eq!(asks.len(), 1);
        assert_eq!((asks[0].function.name.as_str(), asks[0].count), ("f", 18));
        // Memory short: nothing.
        let full = ClusterView {
            used: Bytes::mib(4000),
            ..c
        };
        assert!(
            p.on_tick(&full, std::slice::from_ref(&f), Timestamp(1_900))
                .is_empty()
        );
        // Without the switch: no timer, no pre-warms.
        let mut plain = PolicySettings {
            policy: PolicyChoice::Medes,
            ..PolicySettings::default()
        }
        .build(T, 40, true);
        plain.on_arrival(&f, Timestamp(1_000));
        assert_eq!(plain.tick_ms(), None);
        assert!(
            plain
                .on_tick(&c, std::slice::from_ref(&f), Timestamp(1_900))
                .is_empty()
        );
        let back: PolicySettings =
            serde_json::from_str(r#"{"policy": "medes", "predict": true}"#).unwrap();
        assert!(back.predict);
    }

    #[test]
    fn greedy_dual_eviction_is_asked_for_by_medes_only_when_on() {
        let mut s = PolicySettings::default();
        assert_eq!(s.build(T, 40, true).eviction_order(), EvictionOrder::Policy);
        s.apply(&PolicyUpdate::medes_predict()).unwrap();
        assert_eq!(
            (s.policy, s.mode, s.hold_below, s.predict, s.greedy_dual),
            (PolicyChoice::Medes, KnobMode::Memory, Some(0.9), true, true)
        );
        assert_eq!(
            s.build(T, 40, true).eviction_order(),
            EvictionOrder::GreedyDual
        );
        s.apply(&PolicyUpdate {
            greedy_dual: Some(false),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert!(s.predict && !s.greedy_dual);
        assert_eq!(s.build(T, 40, true).eviction_order(), EvictionOrder::Policy);
        // Only Medes has the option.
        s.greedy_dual = true;
        s.policy = PolicyChoice::KeepAlive;
        assert_eq!(s.build(T, 40, true).eviction_order(), EvictionOrder::Policy);
        let back: PolicySettings =
            serde_json::from_str(r#"{"policy": "medes", "greedy_dual": true}"#).unwrap();
        assert!(back.greedy_dual);
    }

    #[test]
    fn release_base_process_is_off_by_default_and_set_by_an_update() {
        let old: PolicySettings = serde_json::from_str(r#"{"policy": "medes"}"#).unwrap();
        assert!(!old.release_base_process);
        assert!(
            serde_json::to_value(&old)
                .unwrap()
                .get("release_base_process")
                .is_none()
        );
        let u: PolicyUpdate = serde_json::from_str(r#"{"release_base_process": true}"#).unwrap();
        let mut s = old.clone();
        s.apply(&u).unwrap();
        assert!(s.release_base_process && s.policy == PolicyChoice::Medes);
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["release_base_process"], true);
        assert_eq!(serde_json::from_value::<PolicySettings>(j).unwrap(), s);
        // Presets leave it alone; an update turns it off.
        s.apply(&PolicyUpdate::medes_lean()).unwrap();
        assert!(s.release_base_process);
        s.apply(&PolicyUpdate {
            release_base_process: Some(false),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert!(!s.release_base_process);
    }

    #[test]
    fn base_rules_are_set_validated_and_reach_medes() {
        // Old JSON (without the new fields) still parses, with the rules off.
        let old: PolicySettings =
            serde_json::from_str(r#"{"policy": "medes", "hold_below": 0.9, "predict": true}"#)
                .unwrap();
        assert!(!old.bases_on_demand && !old.retire_bases && !old.dedup_at_keep_alive);
        assert_eq!(old.base_cost_factor, None);
        let u: PolicyUpdate = serde_json::from_str(
            r#"{"bases_on_demand": true, "retire_bases": true, "base_cost_factor": 3}"#,
        )
        .unwrap();
        let mut s = PolicySettings {
            policy: PolicyChoice::Medes,
            ..PolicySettings::default()
        };
        s.apply(&u).unwrap();
        assert!(s.bases_on_demand && s.retire_bases && !s.dedup_at_keep_alive);
        assert_eq!(s.base_cost_factor, Some(3.0));
        // Serialised: present only when on / set; round trip.
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["bases_on_demand"], true);
        assert_eq!(j["base_cost_factor"], 3.0);
        assert!(j.get("dedup_at_keep_alive").is_none());
        assert_eq!(serde_json::from_value::<PolicySettings>(j).unwrap(), s);
        // Bad factors change nothing; 0 is allowed (any candidate pays for the first base).
        let before = s.clone();
        for bad in [-0.5, f64::NAN, f64::INFINITY] {
            let r = s.apply(&PolicyUpdate {
                base_cost_factor: Some(bad),
                ..PolicyUpdate::default()
            });
            assert!(matches!(r, Err(KnobError::BaseCost(_))), "{bad}: {r:?}");
            assert_eq!(s, before);
        }
        s.apply(&PolicyUpdate {
            base_cost_factor: Some(0.0),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(s.base_cost_factor, Some(0.0));
        // Off again.
        s.apply(&PolicyUpdate {
            bases_on_demand: Some(false),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert!(!s.bases_on_demand && s.retire_bases);
    }

    #[test]
    fn bases_on_demand_and_retirement_change_live_decisions() {
        // One function, one idle warm sandbox, plenty of memory: the prototype makes it the
        // function's base at its first decision; on demand it stays warm (nothing to dedup).
        let mut f = fv("f");
        f.counts.warm = 1;
        f.latency.warm_ms = Some(10.0);
        f.exec_ms = Some(1000.0);
        let c = ClusterView {
            budget: Bytes::mib(10_000),
            functions: 1,
            ..ClusterView::default()
        };
        let decide = |s: &PolicySettings, sb: &SandboxView, now: u64| {
            s.build(T, 40, true).on_idle(&c, &f, sb, Timestamp(now))
        };
        let proto = PolicySettings {
            policy: PolicyChoice::Medes,
            ..PolicySettings::default()
        };
        assert_eq!(decide(&proto, &warm(0), 60_000), Decision::Base);
        let mut lean = proto.clone();
        lean.apply(&PolicyUpdate {
            bases_on_demand: Some(true),
            retire_bases: Some(true),
            ..PolicyUpdate::default()
        })
        .unwrap();
        assert_eq!(decide(&lean, &warm(0), 60_000), Decision::KeepWarm);
        // An idle base without dependents: kept for good by the prototype (no next decision),
        // retired after keep-dedup (900 s) with `retire_bases`.
        let mut base = warm(0);
        base.form = crate::Form::Base;
        assert_eq!(
            proto
                .build(T, 40, true)
                .next_decision(&f, &base, Timestamp(0)),
            None
        );
        assert!(
            lean.build(T, 40, true)
                .next_decision(&f, &base, Timestamp(0))
                .is_some()
        );
        assert_eq!(decide(&lean, &base, 960_000), Decision::Purge);
        assert_eq!(decide(&lean, &base, 600_000), Decision::KeepWarm);
    }

    #[test]
    fn presets_merge_under_flags() {
        let lean = PolicyUpdate::preset("medes-lean").unwrap();
        assert_eq!(lean, PolicyUpdate::medes_lean());
        assert!(PolicyUpdate::preset("lean").is_err());
        let mut s = PolicySettings::default();
        s.apply(&PolicyUpdate::medes_predict()).unwrap();
        s.apply(&lean.then(&PolicyUpdate {
            keep_dedup_s: Some(600),
            ..PolicyUpdate::default()
        }))
        .unwrap();
        assert_eq!(
            (s.policy, s.mode, s.hold_below, s.predict, s.greedy_dual),
            (PolicyChoice::Medes, KnobMode::Memory, None, false, false)
        );
        assert_eq!(
            (s.idle_period_s, s.keep_alive_s, s.keep_dedup_s),
            (Some(60), Some(60), Some(600)),
            "the flag overrides the preset's 12 min"
        );
        assert!(s.dedup_at_keep_alive && s.bases_on_demand && s.retire_bases);
        assert_eq!(s.base_cost_factor, Some(2.0));
    }

    #[test]
    fn settings_round_trip_as_toml_and_json() {
        let mut s = PolicySettings {
            policy: PolicyChoice::Medes,
            budget_mb: Some(2048.0),
            ..PolicySettings::default()
        };
        s.set_function(
            "linalg",
            FunctionKnob {
                mode: Some(KnobMode::Latency),
                alpha: Some(1.5),
                ..FunctionKnob::default()
            },
        )
        .unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PolicySettings>(&j).unwrap(), s);
        assert!(serde_json::from_str::<PolicySettings>(r#"{"polcy":"medes"}"#).is_err());
    }
}
