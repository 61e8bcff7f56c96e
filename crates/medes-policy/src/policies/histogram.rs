//! The hybrid-histogram adaptive keep-alive of *Serverless in the Wild* (Shahrad et al., ATC '20).
//!
//! Per function, the idle times (from the end of the function's last invocation to the next
//! arrival; 0 while an invocation is in flight) go into a histogram of `bin_ms` bins over
//! `range_ms`. After each invocation:
//! - **representative** histogram (coefficient of variation of the bin counts ≥ `cv_threshold`):
//!   if the head percentile (5th) is above zero, the sandbox is unloaded and a fresh one is
//!   **pre-warmed** at head × (1 − margin), kept until (tail bin + 1) × (1 + margin) after the
//!   invocation ended (tail = 99th percentile); otherwise it is kept until that tail time;
//! - **not representative**: a fixed keep-alive equal to the range, no pre-warm;
//! - **out of range** (at least `oob_threshold` of the idle times exceed the range): the paper
//!   forecasts the next idle time with ARIMA. In its place we use simple exponential smoothing
//!   (weight `forecast_weight`) of the out-of-range idle times, with the same ±15% margins:
//!   pre-warm at forecast × 0.85, keep until forecast × 1.15. In one-hour runs with a four-hour
//!   range this branch never triggers.
//!
//! Defaults follow the published policy and DSLab FaaS's re-implementation: 60 s bins, 4 h range,
//! CV threshold 2, out-of-range threshold 0.5, histogram margin 0.1, forecast margin 0.15, head
//! 5%, tail 99%. Under memory pressure the least recently used idle sandbox is evicted.

use serde::{Deserialize, Serialize};

use super::{AfterRun, ClusterPolicy, FleetView, FnId, IdleSandbox, Verdict};
use crate::Timestamp;

/// Parameters of the hybrid-histogram policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HistogramConfig {
    /// Bin width, ms.
    pub bin_ms: u64,
    /// Histogram range, ms (also the fallback keep-alive).
    pub range_ms: u64,
    /// Smallest CV of the bin counts for which the histogram is trusted.
    pub cv_threshold: f64,
    /// Share of out-of-range idle times from which the forecast is used.
    pub oob_threshold: f64,
    /// Margin on the histogram windows.
    pub hist_margin: f64,
    /// Margin on the forecast windows.
    pub forecast_margin: f64,
    /// Weight of the newest out-of-range idle time in the forecast.
    pub forecast_weight: f64,
    /// Pre-warm percentile.
    pub head: f64,
    /// Keep-alive percentile.
    pub tail: f64,
}

impl Default for HistogramConfig {
    fn default() -> Self {
        HistogramConfig {
            bin_ms: 60_000,
            range_ms: 4 * 3_600_000,
            cv_threshold: 2.0,
            oob_threshold: 0.5,
            hist_margin: 0.1,
            forecast_margin: 0.15,
            forecast_weight: 0.5,
            head: 0.05,
            tail: 0.99,
        }
    }
}

/// How a function's idle times look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Too spread out (or no data): fixed keep-alive = range.
    Uncertain,
    /// Representative histogram.
    Certain,
    /// Mostly beyond the range: forecast.
    OutOfBounds,
}

/// The windows chosen after an invocation, relative to its end, ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Windows {
    /// Pre-warm after this long (0: keep the sandbox loaded).
    pub prewarm_ms: u64,
    /// Keep alive until this long after the end.
    pub keep_until_ms: u64,
}

/// One function's idle-time histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleHistogram {
    bins: Vec<u32>,
    in_range: u64,
    oob: u64,
    forecast_ms: Option<f64>,
    last_end: Option<Timestamp>,
    in_flight: usize,
}

impl IdleHistogram {
    /// An empty histogram for `cfg`.
    pub fn new(cfg: &HistogramConfig) -> Self {
        let n = (cfg.range_ms / cfg.bin_ms.max(1)).max(2) as usize;
        IdleHistogram {
            bins: vec![0; n],
            in_range: 0,
            oob: 0,
            forecast_ms: None,
            last_end: None,
            in_flight: 0,
        }
    }

    /// Records one idle time.
    pub fn record(&mut self, cfg: &HistogramConfig, idle_ms: u64) {
        let bin = (idle_ms / cfg.bin_ms.max(1)) as usize;
        if bin < self.bins.len() {
            self.bins[bin] += 1;
            self.in_range += 1;
        } else {
            self.oob += 1;
            let x = idle_ms as f64;
            self.forecast_ms = Some(match self.forecast_ms {
                None => x,
                Some(f) => cfg.forecast_weight * x + (1.0 - cfg.forecast_weight) * f,
            });
        }
    }

    /// Coefficient of variation of the bin counts (0 without data).
    pub fn cv(&self) -> f64 {
        if self.in_range == 0 {
            return 0.0;
        }
        let n = self.bins.len() as f64;
        let mean = self.in_range as f64 / n;
        let var = self
            .bins
            .iter()
            .map(|&c| (f64::from(c) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        var.sqrt() / mean
    }

    /// The bin holding the `p` percentile of the in-range idle times.
    pub fn percentile_bin(&self, p: f64) -> usize {
        let target = (p * self.in_range as f64).ceil().max(1.0) as u64;
        let mut acc = 0u64;
        for (i, &c) in self.bins.iter().enumerate() {
            acc += u64::from(c);
            if acc >= target {
                return i;
            }
        }
        self.bins.len() - 1
    }

    /// The current pattern.
    pub fn pattern(&self, cfg: &HistogramConfig) -> Pattern {
        let total = self.in_range + self.oob;
        if total > 0 && self.oob as f64 / total as f64 >= cfg.oob_threshold {
            Pattern::OutOfBounds
        } else if self.cv() < cfg.cv_threshold {
            Pattern::Uncertain
        } else {
            Pattern::Certain
        }
    }

    /// The pre-warm and keep-alive windows now.
    pub fn windows(&self, cfg: &HistogramConfig) -> Windows {
        match self.pattern(cfg) {
            Pattern::Uncertain => Windows {
                prewarm_ms: 0,
                keep_until_ms: cfg.range_ms,
            },
            Pattern::Certain => {
                let head = self.percentile_bin(cfg.head) as f64 * cfg.bin_ms as f64;
                let tail = (self.percentile_bin(cfg.tail) + 1) as f64 * cfg.bin_ms as f64;
                Windows {
                    prewarm_ms: (head * (1.0 - cfg.hist_margin)) as u64,
                    keep_until_ms: (tail * (1.0 + cfg.hist_margin)) as u64,
                }
            }
            Pattern::OutOfBounds => {
                let f = self.forecast_ms.unwrap_or(cfg.range_ms as f64);
                Windows {
                    prewarm_ms: (f * (1.0 - cfg.forecast_margin)) as u64,
                    keep_until_ms: (f * (1.0 + cfg.forecast_margin)) as u64,
                }
            }
        }
    }
}

/// The hybrid-histogram policy (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct HybridHistogram {
    cfg: HistogramConfig,
    functions: Vec<IdleHistogram>,
}

impl HybridHistogram {
    /// A policy for `n_functions` functions.
    pub fn new(cfg: HistogramConfig, n_functions: usize) -> Self {
        HybridHistogram {
            functions: vec![IdleHistogram::new(&cfg); n_functions],
            cfg,
        }
    }

    /// The histogram of `f`.
    pub fn histogram(&self, f: FnId) -> Option<&IdleHistogram> {
        self.functions.get(f)
    }
}

impl ClusterPolicy for HybridHistogram {
    fn name(&self) -> String {
        "hybrid-histogram".into()
    }

    fn on_arrival(&mut self, f: FnId, now: Timestamp) {
        let cfg = self.cfg;
        let Some(h) = self.functions.get_mut(f) else {
            return;
        };
        if let Some(end) = h.last_end {
            let idle = if h.in_flight > 0 { 0 } else { now.since(end) };
            h.record(&cfg, idle);
        }
        h.in_flight += 1;
    }

    fn on_finish(&mut self, f: FnId, now: Timestamp) -> AfterRun {
        let cfg = self.cfg;
        let Some(h) = self.functions.get_mut(f) else {
            return AfterRun {
                deadline: Some(now.plus_ms(cfg.range_ms)),
                ..AfterRun::default()
            };
        };
        h.in_flight = h.in_flight.saturating_sub(1);
        h.last_end = Some(now);
        let w = h.windows(&cfg);
        if w.prewarm_ms > 0 && w.keep_until_ms > w.prewarm_ms {
            AfterRun {
                deadline: None,
                unload: true,
                prewarm: Some((now.plus_ms(w.prewarm_ms), now.plus_ms(w.keep_until_ms))),
                score: 0.0,
            }
        } else {
            AfterRun {
                deadline: Some(now.plus_ms(w.keep_until_ms)),
                ..AfterRun::default()
            }
        }
    }

    fn next_decision(&self, _f: FnId, sb: &IdleSandbox, _now: Timestamp) -> Option<Timestamp> {
        Some(
            sb.deadline
                .unwrap_or_else(|| sb.idle_since.plus_ms(self.cfg.range_ms)),
        )
    }

    fn decide(
        &mut self,
        f: FnId,
        sb: &IdleSandbox,
        view: &FleetView<'_>,
        now: Timestamp,
    ) -> Verdict {
        let _ = (f, view);
        match self.next_decision(f, sb, now) {
            Some(t) if now >= t => Verdict::Purge,
            _ => Verdict::Keep,
        }
    }

    fn evict_rank(
        &self,
        _f: FnId,
        sb: &IdleSandbox,
        _view: &FleetView<'_>,
        _now: Timestamp,
    ) -> f64 {
        sb.idle_since.0 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::idle;
    use super::super::{FunctionCounts, IdleState};
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn no_data_means_range_keep_alive() {
        let mut p = HybridHistogram::new(HistogramConfig::default(), 1);
        p.on_arrival(0, Timestamp(0));
        let a = p.on_finish(0, Timestamp(1_000));
        assert_eq!(a.deadline, Some(Timestamp(1_000 + 4 * 60 * MIN)));
        assert!(!a.unload && a.prewarm.is_none());
        assert_eq!(p.histogram(0).unwrap().pattern(&p.cfg), Pattern::Uncertain);
    }

    #[test]
    fn periodic_idle_times_prewarm_before_and_keep_after() {
        let mut p = HybridHistogram::new(HistogramConfig::default(), 1);
        // An invocation every 10 minutes, each lasting 1 s: idle times of 9 min 59 s (bin 9).
        let mut t = 0;
        let mut last = AfterRun::default();
        for _ in 0..20 {
            p.on_arrival(0, Timestamp(t));
            last = p.on_finish(0, Timestamp(t + 1_000));
            t += 10 * MIN;
        }
        let h = p.histogram(0).unwrap();
        assert_eq!(h.pattern(&p.cfg), Pattern::Certain, "cv {}", h.cv());
        assert_eq!((h.percentile_bin(0.05), h.percentile_bin(0.99)), (9, 9));
        let end = Timestamp(19 * 10 * MIN + 1_000);
        assert!(last.unload);
        // Pre-warm at 9 min × 0.9, keep until 10 min × 1.1 after the end.
        assert_eq!(
            last.prewarm,
            Some((end.plus_ms(9 * MIN * 9 / 10), end.plus_ms(11 * MIN)))
        );
    }

    #[test]
    fn spread_idle_times_fall_back_to_range() {
        let mut p = HybridHistogram::new(HistogramConfig::default(), 1);
        let mut t = 0;
        // Idle times spread evenly over every bin: CV ≈ 0.
        for i in 0..240u64 {
            p.on_arrival(0, Timestamp(t));
            p.on_finish(0, Timestamp(t));
            t += i * MIN + 30_000;
        }
        let h = p.histogram(0).unwrap();
        assert_eq!(h.pattern(&p.cfg), Pattern::Uncertain, "cv {}", h.cv());
    }

    #[test]
    fn out_of_range_uses_the_forecast() {
        let cfg = HistogramConfig {
            range_ms: 10 * MIN,
            ..Default::default()
        };
        let mut p = HybridHistogram::new(cfg, 1);
        let mut t = 0;
        let mut last = AfterRun::default();
        for _ in 0..5 {
            p.on_arrival(0, Timestamp(t));
            last = p.on_finish(0, Timestamp(t));
            t += 20 * MIN;
        }
        assert_eq!(p.histogram(0).unwrap().pattern(&cfg), Pattern::OutOfBounds);
        let end = Timestamp(4 * 20 * MIN);
        assert_eq!(
            last.prewarm,
            Some((end.plus_ms(17 * MIN), end.plus_ms(23 * MIN)))
        );
    }

    #[test]
    fn concurrent_invocations_record_zero_idle_and_keep_until_tail() {
        let mut p = HybridHistogram::new(HistogramConfig::default(), 1);
        let mut last = AfterRun::default();
        for i in 0..30u64 {
            // Two overlapping invocations every 30 s.
            p.on_arrival(0, Timestamp(i * 30_000));
            p.on_arrival(0, Timestamp(i * 30_000 + 10));
            p.on_finish(0, Timestamp(i * 30_000 + 100));
            last = p.on_finish(0, Timestamp(i * 30_000 + 200));
        }
        assert!(!last.unload);
        assert_eq!(last.deadline, Some(Timestamp(29 * 30_000 + 200 + 66_000)));
        let counts = [FunctionCounts::default()];
        let view = FleetView {
            counts: &counts,
            budget_mb: 1.0,
            used_mb: 0.0,
        };
        let mut sb = idle(IdleState::Warm, 29 * 30_000 + 200);
        sb.deadline = last.deadline;
        assert_eq!(
            p.decide(0, &sb, &view, Timestamp(29 * 30_000 + 66_199)),
            Verdict::Keep
        );
        assert_eq!(
            p.decide(0, &sb, &view, Timestamp(29 * 30_000 + 66_200)),
            Verdict::Purge
        );
    }
}
