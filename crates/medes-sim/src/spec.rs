//! Policies by name, as the command line and the evaluation spell them.

use std::fmt;
use std::str::FromStr;

use medes_policy::policies::{
    ClusterPolicy, FixedKeepAlive, FunctionCosts, GreedyDual, HistogramConfig, HybridHistogram,
    Medes, MedesConfig, MedesMode, PredictConfig,
};
use serde::{Deserialize, Serialize};

/// A policy and its knob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PolicySpec {
    /// `fixed-<N>m` (or `ka-<N>`): fixed keep-alive of N minutes.
    Fixed {
        /// Keep-alive, minutes.
        minutes: f64,
    },
    /// `hybrid-histogram`, `hybrid-histogram-<N>m` (range N minutes; default 240),
    /// `hybrid-histogram-margin-<x>` (margin on the windows; default 0.1).
    Hybrid {
        /// Histogram range and fallback keep-alive, minutes.
        range_minutes: f64,
        /// Margin on the histogram windows.
        margin: f64,
    },
    /// `greedy-dual`.
    GreedyDual,
    /// `medes` (memory mode with the cluster budget), `medes-kd-<N>m` (keep-dedup N minutes),
    /// `medes-ka-<N>m` (keep-alive), `medes-latency[-<α>]` (latency mode, α = 2.5),
    /// `medes-budget-<GB>` (memory mode with budget M0 = GB). Suffixes combine in that order:
    /// `medes-latency-2.5-kd-10m`.
    Medes {
        /// The knob.
        mode: MedesMode,
        /// Keep-alive, minutes.
        keep_alive_minutes: f64,
        /// Keep-dedup, minutes.
        keep_dedup_minutes: f64,
        /// `-dka`: deduplicate at keep-alive expiry instead of purging.
        dedup_at_keep_alive: bool,
        /// `-pw-<x>`: deduplicate idle sandboxes of nodes fuller than x of their budget.
        pressure_watermark: Option<f64>,
        /// `-hold-<x>`: memory mode, no timer purges while the cluster is below x of its
        /// budget.
        hold_below: Option<f64>,
        /// `-value`: eviction by expected saving per MB.
        evict_by_value: bool,
        /// `-prewarm`: arrival prediction (pre-warms to the concurrency the recent rate needs).
        predict: bool,
        /// `-gd`: Greedy-Dual eviction order with dedup as the cheaper state.
        evict_gd: bool,
        /// `-lazybase`: bases on demand (only where a dedup is wanted).
        #[serde(default)]
        bases_on_demand: bool,
        /// `-retire`: bases without dependents retire at keep-dedup.
        #[serde(default)]
        retire_bases: bool,
        /// `-ip-<N>s`: idle period (decision interval) in seconds (default 60).
        #[serde(default = "default_idle_s")]
        idle_period_s: f64,
    },
    /// `<policy>+template`: the policy with template starts (issue 8): a node's later starts
    /// of a function after its first real cold start there are restores from the function's
    /// template ([`crate::SimConfig::templates`]).
    Template(Box<PolicySpec>),
}

fn default_idle_s() -> f64 {
    60.0
}

/// The hold threshold `-predict` implies: `medes-predict` = `medes-hold-0.9-prewarm-gd`.
pub const PREDICT_HOLD: f64 = 0.9;

/// A policy name that is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown policy {0:?} (fixed-<N>m, hybrid-histogram, greedy-dual, medes, medes-kd-<N>m, medes-latency[-<alpha>], medes-budget-<GB>)"
)]
pub struct ParsePolicyError(pub String);

fn minutes(s: &str) -> Option<f64> {
    let v: f64 = s.strip_suffix('m').unwrap_or(s).parse().ok()?;
    (v.is_finite() && v > 0.0).then_some(v)
}

impl FromStr for PolicySpec {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePolicyError(s.to_string());
        if let Some(inner) = s.strip_suffix("+template") {
            let inner: PolicySpec = inner.parse().map_err(|_| err())?;
            if inner.template_starts() {
                return Err(err());
            }
            return Ok(PolicySpec::Template(Box::new(inner)));
        }
        if let Some(rest) = s.strip_prefix("fixed-").or(s.strip_prefix("ka-")) {
            return Ok(PolicySpec::Fixed {
                minutes: minutes(rest).ok_or_else(err)?,
            });
        }
        if s == "hybrid-histogram" || s == "hybrid" {
            return Ok(PolicySpec::Hybrid {
                range_minutes: 240.0,
                margin: 0.1,
            });
        }
        if let Some(rest) = s.strip_prefix("hybrid-histogram-") {
            let (range, margin) = match rest.split_once("margin-") {
                Some((r, m)) => (r.strip_suffix('-').unwrap_or(r), Some(m)),
                None => (rest, None),
            };
            let range_minutes = if range.is_empty() {
                240.0
            } else {
                minutes(range).ok_or_else(err)?
            };
            let margin = match margin {
                Some(m) => m
                    .parse::<f64>()
                    .ok()
                    .filter(|m| m.is_finite() && *m >= 0.0 && *m < 100.0)
                    .ok_or_else(err)?,
                None => 0.1,
            };
            return Ok(PolicySpec::Hybrid {
                range_minutes,
                margin,
            });
        }
        if s == "greedy-dual" {
            return Ok(PolicySpec::GreedyDual);
        }
        let Some(rest) = s.strip_prefix("medes") else {
            return Err(err());
        };
        let mut mode = MedesMode::Memory { budget_mb: None };
        let mut ka = 10.0;
        let mut kd = 15.0;
        let mut dka = false;
        let mut pw = None;
        let mut hold = None;
        let mut value = false;
        let mut predict = false;
        let mut gd = false;
        let mut lazy = false;
        let mut idle_s = 60.0;
        let mut retire = false;
        let mut bundle = false;
        let parts: Vec<&str> = rest.split('-').filter(|p| !p.is_empty()).collect();
        let mut i = 0;
        while i < parts.len() {
            match parts[i] {
                "latency" => {
                    let alpha = parts
                        .get(i + 1)
                        .and_then(|a| a.parse::<f64>().ok())
                        .filter(|a| a.is_finite() && *a > 1.0);
                    if alpha.is_some() {
                        i += 1;
                    }
                    mode = MedesMode::Latency {
                        alpha: alpha.unwrap_or(2.5),
                    };
                }
                "budget" => {
                    let gb = parts
                        .get(i + 1)
                        .and_then(|a| a.parse::<f64>().ok())
                        .filter(|a| a.is_finite() && *a > 0.0)
                        .ok_or_else(err)?;
                    i += 1;
                    mode = MedesMode::Memory {
                        budget_mb: Some(gb * 1000.0),
                    };
                }
                "kd" => {
                    kd = parts.get(i + 1).and_then(|m| minutes(m)).ok_or_else(err)?;
                    i += 1;
                }
                "ka" => {
                    ka = parts.get(i + 1).and_then(|m| minutes(m)).ok_or_else(err)?;
                    i += 1;
                }
                "ip" => {
                    idle_s = parts
                        .get(i + 1)
                        .and_then(|v| v.strip_suffix('s'))
                        .and_then(|v| v.parse::<f64>().ok())
                        .filter(|v| v.is_finite() && *v >= 1.0)
                        .ok_or_else(err)?;
                    i += 1;
                }
                "dka" => dka = true,
                "value" => value = true,
                "prewarm" => predict = true,
                "gd" => gd = true,
                "lazybase" => lazy = true,
                "retire" => retire = true,
                "predict" => bundle = true,
                "hold" => {
                    hold = Some(
                        parts
                            .get(i + 1)
                            .and_then(|a| a.parse::<f64>().ok())
                            .filter(|a| *a > 0.0 && *a <= 1.0)
                            .ok_or_else(err)?,
                    );
                    i += 1;
                }
                "pw" => {
                    pw = Some(
                        parts
                            .get(i + 1)
                            .and_then(|a| a.parse::<f64>().ok())
                            .filter(|a| *a > 0.0 && *a <= 1.0)
                            .ok_or_else(err)?,
                    );
                    i += 1;
                }
                _ => return Err(err()),
            }
            i += 1;
        }
        if bundle {
            if hold.is_some() || predict || gd {
                return Err(err());
            }
            (hold, predict, gd) = (Some(PREDICT_HOLD), true, true);
        }
        Ok(PolicySpec::Medes {
            mode,
            keep_alive_minutes: ka,
            keep_dedup_minutes: kd,
            dedup_at_keep_alive: dka,
            pressure_watermark: pw,
            hold_below: hold,
            evict_by_value: value,
            predict,
            evict_gd: gd,
            bases_on_demand: lazy,
            retire_bases: retire,
            idle_period_s: idle_s,
        })
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySpec::Fixed { minutes } => write!(f, "fixed-{}m", fmt_num(*minutes)),
            PolicySpec::Hybrid {
                range_minutes,
                margin,
            } => {
                f.write_str("hybrid-histogram")?;
                if *range_minutes != 240.0 {
                    write!(f, "-{}m", fmt_num(*range_minutes))?;
                }
                if *margin != 0.1 {
                    write!(f, "-margin-{}", fmt_num(*margin))?;
                }
                Ok(())
            }
            PolicySpec::GreedyDual => f.write_str("greedy-dual"),
            PolicySpec::Template(inner) => write!(f, "{inner}+template"),
            PolicySpec::Medes {
                mode,
                keep_alive_minutes,
                keep_dedup_minutes,
                dedup_at_keep_alive,
                pressure_watermark,
                hold_below,
                evict_by_value,
                predict,
                evict_gd,
                bases_on_demand,
                retire_bases,
                idle_period_s,
            } => {
                f.write_str("medes")?;
                match mode {
                    MedesMode::Memory { budget_mb: None } => {}
                    MedesMode::Memory {
                        budget_mb: Some(mb),
                    } => write!(f, "-budget-{}", fmt_num(mb / 1000.0))?,
                    MedesMode::Latency { alpha } if *alpha == 2.5 => f.write_str("-latency")?,
                    MedesMode::Latency { alpha } => write!(f, "-latency-{}", fmt_num(*alpha))?,
                }
                if *idle_period_s != 60.0 {
                    write!(f, "-ip-{}s", fmt_num(*idle_period_s))?;
                }
                if *keep_alive_minutes != 10.0 {
                    write!(f, "-ka-{}m", fmt_num(*keep_alive_minutes))?;
                }
                if *keep_dedup_minutes != 15.0 {
                    write!(f, "-kd-{}m", fmt_num(*keep_dedup_minutes))?;
                }
                if *dedup_at_keep_alive {
                    f.write_str("-dka")?;
                }
                if let Some(w) = pressure_watermark {
                    write!(f, "-pw-{}", fmt_num(*w))?;
                }
                if *predict && *evict_gd && *hold_below == Some(PREDICT_HOLD) {
                    f.write_str("-predict")?;
                } else {
                    if let Some(h) = hold_below {
                        write!(f, "-hold-{}", fmt_num(*h))?;
                    }
                    if *predict {
                        f.write_str("-prewarm")?;
                    }
                    if *evict_gd {
                        f.write_str("-gd")?;
                    }
                }
                if *evict_by_value {
                    f.write_str("-value")?;
                }
                if *bases_on_demand {
                    f.write_str("-lazybase")?;
                }
                if *retire_bases {
                    f.write_str("-retire")?;
                }
                Ok(())
            }
        }
    }
}

/// A policy named by a spec, reporting the spec as its name.
struct Named<P> {
    name: String,
    inner: P,
}

macro_rules! forward {
    () => {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn dedups(&self) -> bool {
            self.inner.dedups()
        }
        fn on_arrival(&mut self, f: usize, now: medes_policy::Timestamp) {
            self.inner.on_arrival(f, now)
        }
        fn on_start(
            &mut self,
            f: usize,
            kind: medes_core::StartKind,
            latency_ms: f64,
            now: medes_policy::Timestamp,
        ) {
            self.inner.on_start(f, kind, latency_ms, now)
        }
        fn on_finish(
            &mut self,
            f: usize,
            now: medes_policy::Timestamp,
        ) -> medes_policy::policies::AfterRun {
            self.inner.on_finish(f, now)
        }
        fn next_decision(
            &self,
            f: usize,
            sb: &medes_policy::policies::IdleSandbox,
            now: medes_policy::Timestamp,
        ) -> Option<medes_policy::Timestamp> {
            self.inner.next_decision(f, sb, now)
        }
        fn decide(
            &mut self,
            f: usize,
            sb: &medes_policy::policies::IdleSandbox,
            view: &medes_policy::policies::FleetView<'_>,
            now: medes_policy::Timestamp,
        ) -> medes_policy::policies::Verdict {
            self.inner.decide(f, sb, view, now)
        }
        fn evict_rank(
            &self,
            f: usize,
            sb: &medes_policy::policies::IdleSandbox,
            view: &medes_policy::policies::FleetView<'_>,
            now: medes_policy::Timestamp,
        ) -> f64 {
            self.inner.evict_rank(f, sb, view, now)
        }
        fn on_evicted(&mut self, f: usize, rank: f64) {
            self.inner.on_evicted(f, rank)
        }
        fn tick(&mut self, now: medes_policy::Timestamp) {
            self.inner.tick(now)
        }
        fn prewarm(
            &mut self,
            f: usize,
            view: &medes_policy::policies::FleetView<'_>,
            now: medes_policy::Timestamp,
        ) -> usize {
            self.inner.prewarm(f, view, now)
        }
        fn pressure_watermark(&self) -> Option<f64> {
            self.inner.pressure_watermark()
        }
        fn on_pressure(
            &mut self,
            f: usize,
            sb: &medes_policy::policies::IdleSandbox,
            view: &medes_policy::policies::FleetView<'_>,
            now: medes_policy::Timestamp,
        ) -> medes_policy::policies::Verdict {
            self.inner.on_pressure(f, sb, view, now)
        }
    };
}

impl<P: ClusterPolicy> ClusterPolicy for Named<P> {
    forward!();
}

impl PolicySpec {
    /// Whether the runs of this policy use template starts (`+template`).
    pub fn template_starts(&self) -> bool {
        matches!(self, PolicySpec::Template(_))
    }

    /// The policy for functions with these costs (in the trace's function order).
    pub fn build(&self, costs: Vec<FunctionCosts>) -> Box<dyn ClusterPolicy> {
        let name = self.to_string();
        match self {
            PolicySpec::Template(inner) => Box::new(Named {
                name,
                inner: inner.build(costs),
            }),
            PolicySpec::Fixed { minutes } => Box::new(Named {
                name,
                inner: FixedKeepAlive::new((minutes * 60_000.0) as u64),
            }),
            PolicySpec::Hybrid {
                range_minutes,
                margin,
            } => Box::new(Named {
                name,
                inner: HybridHistogram::new(
                    HistogramConfig {
                        range_ms: (range_minutes * 60_000.0) as u64,
                        hist_margin: *margin,
                        ..HistogramConfig::default()
                    },
                    costs.len(),
                ),
            }),
            PolicySpec::GreedyDual => Box::new(Named {
                name,
                inner: GreedyDual::new(costs),
            }),
            PolicySpec::Medes {
                mode,
                keep_alive_minutes,
                keep_dedup_minutes,
                dedup_at_keep_alive,
                pressure_watermark,
                hold_below,
                evict_by_value,
                predict,
                evict_gd,
                bases_on_demand,
                retire_bases,
                idle_period_s,
            } => Box::new(Named {
                name,
                inner: Medes::new(
                    MedesConfig {
                        mode: *mode,
                        keep_alive_ms: (keep_alive_minutes * 60_000.0) as u64,
                        keep_dedup_ms: (keep_dedup_minutes * 60_000.0) as u64,
                        dedup_at_keep_alive: *dedup_at_keep_alive,
                        pressure_watermark: *pressure_watermark,
                        hold_below: *hold_below,
                        evict_by_value: *evict_by_value,
                        predict: predict.then(PredictConfig::default),
                        evict_greedy_dual: *evict_gd,
                        bases_on_demand: *bases_on_demand,
                        retire_bases: *retire_bases,
                        idle_period_ms: (idle_period_s * 1000.0) as u64,
                        ..MedesConfig::default()
                    },
                    costs,
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "fixed-10m",
            "fixed-5m",
            "fixed-0.5m",
            "hybrid-histogram",
            "hybrid-histogram-60m",
            "greedy-dual",
            "medes",
            "medes-kd-5m",
            "medes-latency",
            "medes-latency-4",
            "medes-budget-12",
            "medes-ka-5m-kd-20m",
            "medes-dka",
            "medes-kd-20m-dka",
            "medes-dka-pw-0.8",
            "medes-hold-0.9",
            "medes-kd-10m-hold-0.95",
            "medes-hold-0.9-value",
            "medes-predict",
            "medes-prewarm",
            "medes-hold-0.9-gd",
            "medes-hold-0.9-prewarm",
            "medes-hold-0.8-prewarm-gd",
            "medes-kd-20m-predict",
            "medes-ka-2m-kd-10m-dka-lazybase-retire",
            "medes-latency-predict-retire",
            "medes-ip-20s-ka-0.5m-kd-5m-dka-pw-0.9-prewarm-lazybase-retire",
            "fixed-10m+template",
            "medes+template",
            "medes-predict+template",
            "hybrid-histogram-margin-4",
            "hybrid-histogram-60m-margin-1",
        ] {
            let p: PolicySpec = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(
            "ka-10".parse::<PolicySpec>().unwrap().to_string(),
            "fixed-10m"
        );
        for bad in [
            "",
            "fixed-",
            "fixed-0m",
            "medes-kd",
            "medes-x",
            "lru",
            "medes-budget-",
            "medes-predict-gd",
            "medes-hold-0.8-predict",
            "medes+template+template",
            "+template",
        ] {
            assert!(bad.parse::<PolicySpec>().is_err(), "{bad}");
        }
    }
}
