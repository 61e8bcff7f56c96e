//! Turning per-minute counts into arrival times inside each minute.

use rand::Rng;

use crate::azure::Trigger;

/// How the arrivals of one minute are placed inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Evenly spaced at `(i + 1/2) · 60 s / k`: a timer's strictly periodic arrivals.
    Even,
    /// Independent uniform times, sorted: a Poisson process conditioned on the minute's count.
    Uniform,
}

impl Spread {
    /// Timers are periodic; every other trigger is placed uniformly.
    pub fn for_trigger(t: Trigger) -> Spread {
        if t == Trigger::Timer {
            Spread::Even
        } else {
            Spread::Uniform
        }
    }
}

/// Milliseconds in a minute.
pub const MINUTE_MS: u64 = 60_000;

/// Appends the arrival times (ms from the start of the trace) of `count` invocations in minute
/// `minute` to `out`, sorted.
pub fn minute_arrivals<R: Rng>(
    count: u32,
    minute: u64,
    spread: Spread,
    rng: &mut R,
    out: &mut Vec<u64>,
) {
    let base = minute * MINUTE_MS;
    let k = u64::from(count);
    let start = out.len();
    match spread {
        Spread::Even => {
            out.extend((0..k).map(|i| base + (2 * i + 1) * MINUTE_MS / (2 * k)));
        }
        Spread::Uniform => {
            out.extend((0..k).map(|_| base + rng.random_range(0..MINUTE_MS)));
            out[start..].sort_unstable();
        }
    }
}

/// Coefficient of variation (σ/μ) of the gaps between sorted arrival times; `None` with fewer
/// than 3 arrivals or a zero mean gap.
pub fn iat_cv(times: &[u64]) -> Option<f64> {
    if times.len() < 3 {
        return None;
    }
    let (mut n, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
    for w in times.windows(2) {
        let x = w[1].saturating_sub(w[0]) as f64;
        n += 1.0;
        let d = x - mean;
        mean += d / n;
        m2 += d * (x - mean);
    }
    if mean <= 0.0 {
        return None;
    }
    Some((m2 / n).sqrt() / mean)
}

/// Scales a count by `scale`, rounding stochastically so the expectation is exact.
pub fn scale_count<R: Rng>(count: u32, scale: f64, rng: &mut R) -> u32 {
    let x = f64::from(count) * scale;
    let floor = x.floor();
    let extra = u32::from(rng.random::<f64>() < x - floor);
    (floor as u32).saturating_add(extra)
}
