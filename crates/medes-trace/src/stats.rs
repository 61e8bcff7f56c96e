//! Statistics of replay traces and of 2019-format traces, with the published reference values.

use std::collections::BTreeMap;
use std::fmt;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution};
use serde::{Deserialize, Serialize};

use crate::arrivals::{MINUTE_MS, Spread, iat_cv, minute_arrivals};
use crate::azure::{FunctionInvocations, Trigger};
use crate::replay::Trace;
use crate::synth::{PUBLISHED_INVOCATION_SHARE, TRIGGER_MIX};

/// Per-function statistics of a replay trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionStats {
    /// Action name.
    pub function: String,
    /// Invocations.
    pub invocations: u64,
    /// Mean invocations per minute over the trace's span (rounded up to whole minutes).
    pub mean_per_min: f64,
    /// Largest count in any one minute (minutes counted from the trace's start).
    pub peak_per_min: u64,
    /// Coefficient of variation of the inter-arrival times (`None` with fewer than 3 arrivals).
    pub iat_cv: Option<f64>,
}

/// Statistics of a replay trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceStats {
    /// Total invocations.
    pub invocations: u64,
    /// Span in minutes (last arrival's minute + 1).
    pub minutes: u64,
    /// Peak per-minute count over all functions.
    pub peak_per_min: u64,
    /// Per function, sorted by name.
    pub functions: Vec<FunctionStats>,
}

impl TraceStats {
    /// Computes the statistics of a replay trace.
    pub fn of(trace: &Trace) -> TraceStats {
        let minutes = trace.duration_ms() / MINUTE_MS + 1;
        let mut times: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut all_per_min = vec![0u64; minutes as usize];
        for e in trace.entries() {
            times
                .entry(e.function.as_str())
                .or_default()
                .push(e.time_ms);
            all_per_min[(e.time_ms / MINUTE_MS) as usize] += 1;
        }
        let functions = times
            .into_iter()
            .map(|(f, ts)| {
                let mut per_min: BTreeMap<u64, u64> = BTreeMap::new();
                for t in &ts {
                    *per_min.entry(t / MINUTE_MS).or_default() += 1;
                }
                FunctionStats {
                    function: f.to_string(),
                    invocations: ts.len() as u64,
                    mean_per_min: ts.len() as f64 / minutes as f64,
                    peak_per_min: per_min.values().copied().max().unwrap_or(0),
                    iat_cv: iat_cv(&ts),
                }
            })
            .collect();
        TraceStats {
            invocations: trace.len() as u64,
            minutes,
            peak_per_min: all_per_min.iter().copied().max().unwrap_or(0),
            functions,
        }
    }
}

impl fmt::Display for TraceStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} invocations over {} min (peak {} /min overall)",
            self.invocations, self.minutes, self.peak_per_min
        )?;
        writeln!(
            f,
            "{:<16} {:>11} {:>9} {:>9} {:>7}",
            "function", "invocations", "mean/min", "peak/min", "IAT CV"
        )?;
        for s in &self.functions {
            let cv = s.iat_cv.map_or("-".to_string(), |c| format!("{c:.2}"));
            writeln!(
                f,
                "{:<16} {:>11} {:>9.2} {:>9} {:>7}",
                s.function, s.invocations, s.mean_per_min, s.peak_per_min, cv
            )?;
        }
        Ok(())
    }
}

/// Per-trigger statistics of a 2019-format trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerStats {
    /// Trigger group (storage counted as others).
    pub trigger: Trigger,
    /// Functions.
    pub functions: u64,
    /// Invocations.
    pub invocations: u64,
    /// Share of functions, %.
    pub pct_functions: f64,
    /// Share of invocations, %.
    pub pct_invocations: f64,
    /// Published share of functions, % (\[S\] Fig. 2a).
    pub published_pct_functions: f64,
    /// Published share of invocations, %.
    pub published_pct_invocations: f64,
    /// Median inter-arrival CV over the functions with a CV.
    pub median_iat_cv: Option<f64>,
    /// Fraction of those functions with CV < 0.1 (periodic).
    pub frac_cv_below_0_1: f64,
    /// Fraction with CV > 1.2 (burstier than Poisson).
    pub frac_cv_above_1_2: f64,
}

/// Summary of a 2019-format trace (one day file or a synthetic one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Azure2019Summary {
    /// Function rows.
    pub functions: u64,
    /// Distinct apps.
    pub apps: u64,
    /// Total invocations.
    pub invocations: u64,
    /// Minute columns.
    pub minutes: usize,
    /// Orders of magnitude between the most and least invoked function (log10 of the ratio of
    /// their totals, among functions invoked at least once).
    pub rate_spread_orders: f64,
    /// Fraction of functions invoked less than once per minute on average.
    pub frac_functions_below_1_per_min: f64,
    /// Fraction of apps (all their functions together) invoked less than once per minute on average.
    pub frac_apps_below_1_per_min: f64,
    /// Fraction of apps invoked at most once per hour on average.
    pub frac_apps_at_most_1_per_hour: f64,
    /// Fraction of apps with a single function.
    pub frac_single_function_apps: f64,
    /// Peak ÷ trough of the hourly invocation totals (diurnal swing), if the trace spans ≥ 2 hours.
    pub diurnal_peak_to_trough: Option<f64>,
    /// Per trigger group.
    pub triggers: Vec<TriggerStats>,
}

/// Published reference values for [`Azure2019Summary`] (\[S\] = Shahrad et al., ATC '20).
pub const PUBLISHED_REFERENCE: &str = "\
published (Shahrad et al., ATC'20, 2019 trace): invocation rates span ~8 orders of magnitude (Fig. 5);
  81% of apps invoked at most once per minute, 45% at most once per hour (§3.3);
  54% of apps have one function (§3.1); trigger mix % functions/% invocations: http 55/36,
  queue 15/34, event 2/25, timer 16/2, orchestration 7/2, others 5/1 (Fig. 2a);
  IAT CV: timer-only apps ~0, a large group ~1 (Poisson), many > 1 (bursty) (Fig. 6);
  clear diurnal pattern of the total (Fig. 3).";

/// Streaming accumulator for [`Azure2019Summary`].
#[derive(Debug)]
pub struct Azure2019Stats {
    rng: ChaCha8Rng,
    minutes: usize,
    functions: u64,
    totals: Vec<u64>,
    apps: BTreeMap<String, (u64, u32)>,
    per_trigger: BTreeMap<Trigger, (u64, u64, Vec<f64>)>,
    per_minute: Vec<u64>,
    scratch: Vec<u64>,
}

/// Functions with more invocations than this are binomially thinned to about this many before
/// their IAT CV is computed (thinning preserves Poisson-ness and the time profile).
pub const CV_MAX_ARRIVALS: u64 = 200_000;
/// Functions with fewer invocations get no CV.
pub const CV_MIN_ARRIVALS: u64 = 10;

impl Default for Azure2019Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Azure2019Stats {
    /// An empty accumulator (the arrival placement for CVs uses a fixed seed).
    pub fn new() -> Self {
        Azure2019Stats {
            rng: ChaCha8Rng::seed_from_u64(0x5ee0),
            minutes: 0,
            functions: 0,
            totals: Vec::new(),
            apps: BTreeMap::new(),
            per_trigger: BTreeMap::new(),
            per_minute: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Adds one function row. Arrival times for the CV are placed inside each minute as the
    /// recipe places them ([`Spread::for_trigger`]).
    pub fn add(&mut self, row: &FunctionInvocations) {
        self.functions += 1;
        self.minutes = self.minutes.max(row.counts.len());
        if self.per_minute.len() < row.counts.len() {
            self.per_minute.resize(row.counts.len(), 0);
        }
        for (m, &c) in row.counts.iter().enumerate() {
            self.per_minute[m] += u64::from(c);
        }
        let total = row.total();
        self.totals.push(total);
        let app = self
            .apps
            .entry(format!("{}/{}", row.owner, row.app))
            .or_default();
        app.0 += total;
        app.1 += 1;
        let entry = self.per_trigger.entry(row.trigger.group()).or_default();
        entry.0 += 1;
        entry.1 += total;
        if total >= CV_MIN_ARRIVALS {
            let spread = Spread::for_trigger(row.trigger);
            let p = if total > CV_MAX_ARRIVALS {
                CV_MAX_ARRIVALS as f64 / total as f64
            } else {
                1.0
            };
            self.scratch.clear();
            for (m, &c) in row.counts.iter().enumerate() {
                let c = if p < 1.0 {
                    Binomial::new(u64::from(c), p).map_or(0, |b| b.sample(&mut self.rng)) as u32
                } else {
                    c
                };
                minute_arrivals(c, m as u64, spread, &mut self.rng, &mut self.scratch);
            }
            if let Some(cv) = iat_cv(&self.scratch) {
                entry.2.push(cv);
            }
        }
    }

    /// The summary.
    pub fn finish(self) -> Azure2019Summary {
        let invocations: u64 = self.totals.iter().sum();
        let minutes = self.minutes.max(1) as f64;
        let invoked: Vec<u64> = self.totals.iter().copied().filter(|&t| t > 0).collect();
        let rate_spread_orders = match (invoked.iter().min(), invoked.iter().max()) {
            (Some(&lo), Some(&hi)) => (hi as f64 / lo as f64).log10(),
            _ => 0.0,
        };
        let frac = |n: usize, d: usize| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let frac_functions_below_1_per_min = frac(
            self.totals
                .iter()
                .filter(|&&t| (t as f64) < minutes)
                .count(),
            self.totals.len(),
        );
        let frac_apps_below_1_per_min = frac(
            self.apps
                .values()
                .filter(|(t, _)| (*t as f64) < minutes)
                .count(),
            self.apps.len(),
        );
        let frac_apps_at_most_1_per_hour = frac(
            self.apps
                .values()
                .filter(|(t, _)| (*t as f64) <= minutes / 60.0)
                .count(),
            self.apps.len(),
        );
        let frac_single_function_apps = frac(
            self.apps.values().filter(|(_, n)| *n == 1).count(),
            self.apps.len(),
        );
        let hourly: Vec<u64> = self
            .per_minute
            .chunks_exact(60)
            .map(|h| h.iter().sum())
            .collect();
        let diurnal_peak_to_trough = if hourly.len() >= 2 {
            let lo = *hourly.iter().min().unwrap_or(&0);
            let hi = *hourly.iter().max().unwrap_or(&0);
            (lo > 0).then(|| hi as f64 / lo as f64)
        } else {
            None
        };
        let published = |t: Trigger, table: &[(Trigger, f64); 6]| {
            table
                .iter()
                .find(|(x, _)| *x == t)
                .map_or(0.0, |(_, s)| s * 100.0)
        };
        let triggers = self
            .per_trigger
            .into_iter()
            .map(|(trigger, (f, inv, mut cvs))| {
                cvs.sort_by(f64::total_cmp);
                let n = cvs.len();
                TriggerStats {
                    trigger,
                    functions: f,
                    invocations: inv,
                    pct_functions: 100.0 * frac(f as usize, self.functions as usize),
                    pct_invocations: if invocations == 0 {
                        0.0
                    } else {
                        100.0 * inv as f64 / invocations as f64
                    },
                    published_pct_functions: published(trigger, &TRIGGER_MIX),
                    published_pct_invocations: published(trigger, &PUBLISHED_INVOCATION_SHARE),
                    median_iat_cv: (n > 0).then(|| cvs[n / 2]),
                    frac_cv_below_0_1: frac(cvs.iter().filter(|&&c| c < 0.1).count(), n),
                    frac_cv_above_1_2: frac(cvs.iter().filter(|&&c| c > 1.2).count(), n),
                }
            })
            .collect();
        Azure2019Summary {
            functions: self.functions,
            apps: self.apps.len() as u64,
            invocations,
            minutes: self.minutes,
            rate_spread_orders,
            frac_functions_below_1_per_min,
            frac_apps_below_1_per_min,
            frac_apps_at_most_1_per_hour,
            frac_single_function_apps,
            diurnal_peak_to_trough,
            triggers,
        }
    }
}

impl fmt::Display for Azure2019Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} functions in {} apps, {} invocations over {} min",
            self.functions, self.apps, self.invocations, self.minutes
        )?;
        writeln!(
            f,
            "rate spread: {:.1} orders of magnitude (max/min invocations per function)",
            self.rate_spread_orders
        )?;
        writeln!(
            f,
            "invoked < once/min on average: {:.1}% of functions, {:.1}% of apps; apps <= once/hour: {:.1}%",
            100.0 * self.frac_functions_below_1_per_min,
            100.0 * self.frac_apps_below_1_per_min,
            100.0 * self.frac_apps_at_most_1_per_hour
        )?;
        writeln!(
            f,
            "single-function apps: {:.1}%",
            100.0 * self.frac_single_function_apps
        )?;
        if let Some(d) = self.diurnal_peak_to_trough {
            writeln!(f, "diurnal swing (peak/trough hourly total): {d:.2}")?;
        }
        writeln!(
            f,
            "{:<14} {:>8} {:>7} {:>7} {:>12} {:>7} {:>7} {:>8} {:>8}",
            "trigger",
            "funcs",
            "%func",
            "(pub)",
            "invocations",
            "%inv",
            "(pub)",
            "med. CV",
            "CV>1.2"
        )?;
        for t in &self.triggers {
            let cv = t
                .median_iat_cv
                .map_or("-".to_string(), |c| format!("{c:.2}"));
            writeln!(
                f,
                "{:<14} {:>8} {:>7.1} {:>7.1} {:>12} {:>7.1} {:>7.1} {:>8} {:>7.0}%",
                t.trigger.as_str(),
                t.functions,
                t.pct_functions,
                t.published_pct_functions,
                t.invocations,
                t.pct_invocations,
                t.published_pct_invocations,
                cv,
                100.0 * t.frac_cv_above_1_2
            )?;
        }
        write!(f, "{PUBLISHED_REFERENCE}")
    }
}
