//! The Medes paper's workload recipe: one one-hour arrival pattern per function, rates ×5.
//!
//! From a 2019-format trace (loaded or synthetic), every aligned window of `window_minutes`
//! (default 60) of every function row is a candidate pattern. A candidate is eligible if its
//! scaled invocation rate lies in `[min_per_hour, max_per_hour]`. One eligible window is drawn per
//! row, then `functions.len()` rows are drawn (reservoir sampling, so gigabyte files stream in
//! constant memory), shuffled, and mapped onto the functions in order. Each non-timer pattern's
//! per-minute counts are scaled by `scale` (stochastic rounding) and turned into uniform arrival
//! times inside each minute (a Poisson process given the minute's count). A timer pattern stays
//! strictly periodic: its period is divided by `scale`. Everything is a pure function of the
//! input and the seed.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arrivals::{MINUTE_MS, Spread, minute_arrivals, scale_count};
use crate::azure::{FunctionInvocations, ReadError, Trigger};
use crate::replay::{Trace, TraceEntry};

/// The ten benchmark actions, in the paper's order.
pub const PAPER_FUNCTIONS: [&str; 10] = [
    "vanilla",
    "linalg",
    "imagepro",
    "videopro",
    "mapreduce",
    "htmlserve",
    "authenc",
    "featuregen",
    "modelserve",
    "modeltrain",
];

/// Recipe parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeConfig {
    /// Seed for the choice of patterns and the arrival times.
    pub seed: u64,
    /// Rate multiplier (the paper: 5).
    pub scale: f64,
    /// Window length in minutes (the paper: 60); windows start at multiples of it.
    pub window_minutes: u32,
    /// Action names, one pattern each.
    pub functions: Vec<String>,
    /// Smallest eligible scaled rate, invocations per hour.
    pub min_per_hour: f64,
    /// Largest eligible scaled rate, invocations per hour.
    pub max_per_hour: f64,
}

impl Default for RecipeConfig {
    fn default() -> Self {
        RecipeConfig {
            seed: 1,
            scale: 5.0,
            window_minutes: 60,
            functions: PAPER_FUNCTIONS.iter().map(|s| s.to_string()).collect(),
            min_per_hour: 12.0,
            max_per_hour: 1800.0,
        }
    }
}

/// Which source pattern a function got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipePick {
    /// Action name.
    pub function: String,
    /// Source `HashOwner`.
    pub source_owner: String,
    /// Source `HashApp`.
    pub source_app: String,
    /// Source `HashFunction`.
    pub source_function: String,
    /// Source trigger.
    pub trigger: Trigger,
    /// First minute of the window in the source day.
    pub start_minute: u32,
    /// Invocations in the source window (before scaling).
    pub source_invocations: u64,
    /// Invocations in the output (after scaling).
    pub invocations: u64,
}

/// The recipe's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// The replayable trace.
    pub trace: Trace,
    /// One pick per function, in `functions` order.
    pub picks: Vec<RecipePick>,
}

/// Why the recipe could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecipeError {
    /// The source trace could not be read.
    #[error("reading the source trace")]
    Read(#[from] ReadError),
    /// A parameter is out of range.
    #[error("invalid recipe config: {0}")]
    Config(&'static str),
    /// Too few rows have an eligible window.
    #[error(
        "only {found} functions have a window with {min}..={max} scaled invocations per hour; {wanted} needed"
    )]
    NotEnough {
        /// Patterns needed.
        wanted: usize,
        /// Eligible rows found.
        found: usize,
        /// Rate bounds.
        min: f64,
        /// Rate bounds.
        max: f64,
    },
}

struct Candidate {
    row_owner: String,
    row_app: String,
    row_function: String,
    trigger: Trigger,
    start: usize,
    counts: Vec<u32>,
}

/// A timer pattern scaled by `scale` stays strictly periodic: its period is divided by `scale`
/// (replicating each minute's count would instead fire `scale` calls in a burst every period).
/// The first arrival keeps the source's phase (its first minute, placed as [`Spread::Even`]).
fn timer_arrivals<R: Rng>(counts: &[u32], scale: f64, rng: &mut R, out: &mut Vec<u64>) {
    let n: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    let window_ms = counts.len() as u64 * MINUTE_MS;
    let Some(first_minute) = counts.iter().position(|&c| c > 0) else {
        return;
    };
    let first = first_minute as u64 * MINUTE_MS + MINUTE_MS / (2 * u64::from(counts[first_minute]));
    let scaled = u64::from(scale_count(
        u32::try_from(n).unwrap_or(u32::MAX),
        scale,
        rng,
    ));
    if scaled == 0 {
        return;
    }
    let period = window_ms as f64 / scaled as f64;
    let phase = first as f64 % period;
    out.extend(
        (0..scaled)
            .map(|i| (phase + i as f64 * period) as u64)
            .filter(|&t| t < window_ms),
    );
}

/// Builds the workload from 2019-format rows.
pub fn recipe<I>(rows: I, cfg: &RecipeConfig) -> Result<Recipe, RecipeError>
where
    I: IntoIterator<Item = Result<FunctionInvocations, ReadError>>,
{
    if !(cfg.scale.is_finite() && cfg.scale > 0.0) {
        return Err(RecipeError::Config("scale must be a positive number"));
    }
    if cfg.window_minutes == 0 {
        return Err(RecipeError::Config("window_minutes must be positive"));
    }
    if cfg.functions.is_empty() {
        return Err(RecipeError::Config("no functions given"));
    }
    if !(cfg.min_per_hour >= 0.0 && cfg.min_per_hour <= cfg.max_per_hour) {
        return Err(RecipeError::Config(
            "min_per_hour must be within 0..=max_per_hour",
        ));
    }
    let k = cfg.functions.len();
    let w = cfg.window_minutes as usize;
    let hours = f64::from(cfg.window_minutes) / 60.0;
    let (lo, hi) = (
        cfg.min_per_hour * hours / cfg.scale,
        cfg.max_per_hour * hours / cfg.scale,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut reservoir: Vec<Candidate> = Vec::with_capacity(k);
    let mut seen = 0usize;
    for row in rows {
        let row = row?;
        // Reservoir of one over this row's eligible windows.
        let mut chosen: Option<usize> = None;
        let mut n_eligible = 0u64;
        for start in (0..row.counts.len().saturating_sub(w - 1)).step_by(w) {
            let total: u64 = row.counts[start..start + w]
                .iter()
                .map(|&c| u64::from(c))
                .sum();
            let t = total as f64;
            if total > 0 && t >= lo && t <= hi {
                n_eligible += 1;
                if rng.random_range(0..n_eligible) == 0 {
                    chosen = Some(start);
                }
            }
        }
        let Some(start) = chosen else { continue };
        seen += 1;
        let slot = if reservoir.len() < k {
            Some(reservoir.len())
        } else {
            Some(rng.random_range(0..seen)).filter(|&j| j < k)
        };
        if let Some(j) = slot {
            let c = Candidate {
                row_owner: row.owner,
                row_app: row.app,
                row_function: row.function,
                trigger: row.trigger,
                start,
                counts: row.counts[start..start + w].to_vec(),
            };
            if j == reservoir.len() {
                reservoir.push(c)
            } else {
                reservoir[j] = c
            }
        }
    }
    if reservoir.len() < k {
        return Err(RecipeError::NotEnough {
            wanted: k,
            found: reservoir.len(),
            min: cfg.min_per_hour,
            max: cfg.max_per_hour,
        });
    }
    reservoir.shuffle(&mut rng);
    let mut entries = Vec::new();
    let mut picks = Vec::with_capacity(k);
    let mut times = Vec::new();
    for (i, (c, name)) in reservoir.into_iter().zip(&cfg.functions).enumerate() {
        let mut prng = ChaCha8Rng::seed_from_u64(cfg.seed);
        prng.set_stream(1 + i as u64);
        times.clear();
        if c.trigger == Trigger::Timer {
            timer_arrivals(&c.counts, cfg.scale, &mut prng, &mut times);
        } else {
            for (m, &count) in c.counts.iter().enumerate() {
                let scaled = scale_count(count, cfg.scale, &mut prng);
                minute_arrivals(scaled, m as u64, Spread::Uniform, &mut prng, &mut times);
            }
        }
        entries.extend(times.iter().map(|&t| TraceEntry {
            time_ms: t,
            function: name.clone(),
            params: None,
        }));
        picks.push(RecipePick {
            function: name.clone(),
            source_owner: c.row_owner,
            source_app: c.row_app,
            source_function: c.row_function,
            trigger: c.trigger,
            start_minute: c.start as u32,
            source_invocations: c.counts.iter().map(|&x| u64::from(x)).sum(),
            invocations: times.len() as u64,
        });
    }
    Ok(Recipe {
        trace: Trace::new(entries),
        picks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_timers_stay_periodic() {
        let mut counts = vec![0u32; 60];
        for m in (2..60).step_by(5) {
            counts[m] = 1;
        }
        let mut out = Vec::new();
        timer_arrivals(&counts, 5.0, &mut ChaCha8Rng::seed_from_u64(1), &mut out);
        assert_eq!(out.len(), 60);
        assert!(out.windows(2).all(|w| w[1] - w[0] == 60_000), "{out:?}");
        assert_eq!(out[0], 30_000);
    }

    #[test]
    fn bad_configs_are_rejected() {
        let rows = std::iter::empty::<Result<FunctionInvocations, ReadError>>;
        for cfg in [
            RecipeConfig {
                scale: 0.0,
                ..Default::default()
            },
            RecipeConfig {
                window_minutes: 0,
                ..Default::default()
            },
            RecipeConfig {
                functions: vec![],
                ..Default::default()
            },
            RecipeConfig {
                min_per_hour: 10.0,
                max_per_hour: 1.0,
                ..Default::default()
            },
        ] {
            assert!(matches!(recipe(rows(), &cfg), Err(RecipeError::Config(_))));
        }
        assert!(matches!(
            recipe(rows(), &RecipeConfig::default()),
            Err(RecipeError::NotEnough { found: 0, .. })
        ));
    }
}
