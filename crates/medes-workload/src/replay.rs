//! The open-loop replayer: fires every trace row at its (scaled) time, concurrently.
//!
//! One dispatcher walks the sorted trace, sleeps until each row's target instant
//! (`start + time_ms / speed`) and spawns a task for it; the task records when it actually sent
//! the request, so **lateness** (sent − target) is measured, never absorbed: a slow dispatcher,
//! a saturated runtime or the in-flight bound all show up as lateness. Responses never delay
//! later sends (open loop). Every row ends as exactly one [`InvocationRecord`]: success, an
//! application error, an HTTP error or a transport error.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medes_trace::Trace;
use serde::{Deserialize, Serialize};
use serde_json::Map;
use tokio::sync::{Semaphore, mpsc};

use crate::client::{Client, Invoked};

/// Replay parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Time scaling: 2.0 replays twice as fast. Default 1.0.
    pub speed: f64,
    /// Upper bound on requests in flight (a safety net, not a pacing device). Default 10 000.
    pub max_in_flight: usize,
    /// How long to poll an activation the API accepted (202) before recording it unfinished.
    /// Default 120 s.
    pub accepted_wait: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            speed: 1.0,
            max_in_flight: 10_000,
            accepted_wait: Duration::from_secs(120),
        }
    }
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// `speed` is not a positive finite number.
    #[error("speed must be a positive number, got {0}")]
    Speed(f64),
    /// `max_in_flight` is zero.
    #[error("max_in_flight must be positive")]
    InFlight,
}

/// One replayed invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Row index in the sorted trace.
    pub index: usize,
    /// Action name.
    pub function: String,
    /// The row's `time_ms` (trace time, unscaled).
    pub scheduled_ms: u64,
    /// Target send time, ms from the replay's start (`scheduled_ms / speed`).
    pub target_ms: f64,
    /// Actual send time, ms from the replay's start.
    pub sent_ms: f64,
    /// `sent_ms − target_ms`.
    pub lateness_ms: f64,
    /// Client-side latency (send to response), ms.
    pub latency_ms: f64,
    /// `cold`, `warm`, `dedup`, ... (empty if unknown).
    pub start_kind: String,
    /// `success`, `application error`, `action developer error`, `whisk internal error`,
    /// `http error`, `transport error` or `unfinished`.
    pub status: String,
    /// HTTP status, if any.
    pub http_status: Option<u16>,
    /// The activation's duration, ms.
    pub duration_ms: Option<u64>,
    /// `initTime`, ms.
    pub init_ms: Option<f64>,
    /// `waitTime`, ms.
    pub wait_ms: Option<f64>,
    /// Activation id (empty if none).
    pub activation_id: String,
    /// Error text (empty on success).
    pub error: String,
}

/// Percentiles of a sample, ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `xs` (any order).
    pub fn of(xs: &[f64]) -> Percentiles {
        if xs.is_empty() {
            return Percentiles::default();
        }
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[(((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Percentiles {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(50.0),
            p90: q(90.0),
            p99: q(99.0),
            p999: q(99.9),
            max: v[v.len() - 1],
        }
    }
}

/// Per-function summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSummary {
    /// Action name.
    pub function: String,
    /// Rows.
    pub invocations: usize,
    /// Successes.
    pub succeeded: usize,
    /// Start kinds and their counts.
    pub start_kinds: std::collections::BTreeMap<String, usize>,
    /// Client latency of successful calls.
    pub latency_ms: Percentiles,
}

/// The replay's summary (also written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplaySummary {
    /// Rows in the trace.
    pub trace_invocations: usize,
    /// Records produced (always equal to `trace_invocations`).
    pub recorded: usize,
    /// The speed factor used.
    pub speed: f64,
    /// The trace's span, ms (unscaled).
    pub trace_span_ms: u64,
    /// Wall time of the replay, s.
    pub wall_s: f64,
    /// Successes.
    pub succeeded: usize,
    /// Activations that ran and failed (application/developer/internal errors).
    pub failed_activations: usize,
    /// HTTP errors (4xx/5xx without an activation, e.g. 503 no capacity).
    pub http_errors: usize,
    /// Transport errors (connection refused, timeouts).
    pub transport_errors: usize,
    /// Accepted (202) but not finished within the polling window.
    pub unfinished: usize,
    /// Start kinds over all activations.
    pub start_kinds: std::collections::BTreeMap<String, usize>,
    /// Lateness of every send, ms.
    pub lateness_ms: Percentiles,
    /// Client latency of successful calls, ms.
    pub latency_ms: Percentiles,
    /// Per function.
    pub functions: Vec<FunctionSummary>,
}

/// Records and summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOutcome {
    /// Summary.
    pub summary: ReplaySummary,
    /// One record per trace row, in row order.
    pub records: Vec<InvocationRecord>,
}

/// One row to send.
struct Job {
    idx: usize,
    function: String,
    scheduled_ms: u64,
    target_ms: f64,
    params: Map<String, serde_json::Value>,
    start: Instant,
    accepted_wait: Duration,
}

async fn fire(client: Client, job: Job) -> InvocationRecord {
    let Job {
        idx,
        function,
        scheduled_ms,
        target_ms,
        params,
        start,
        accepted_wait,
    } = job;
    let sent = Instant::now();
    let sent_ms = sent.duration_since(start).as_secs_f64() * 1e3;
    let mut rec = InvocationRecord {
        index: idx,
        function: function.clone(),
        scheduled_ms,
        target_ms,
        sent_ms,
        lateness_ms: sent_ms - target_ms,
        latency_ms: 0.0,
        start_kind: String::new(),
        status: String::new(),
        http_status: None,
        duration_ms: None,
        init_ms: None,
        wait_ms: None,
        activation_id: String::new(),
        error: String::new(),
    };
    let mut result = client.invoke(&function, &params, true).await;
    if let Ok(Invoked::Accepted { activation_id }) = &result {
        rec.activation_id = activation_id.clone();
        rec.http_status = Some(202);
        match client
            .wait_activation(
                activation_id,
                Duration::from_millis(500),
                sent + accepted_wait,
            )
            .await
        {
            Ok(Some(r)) => {
                result = Ok(Invoked::Completed {
                    record: Box::new(r),
                    http_status: 202,
                })
            }
            Ok(None) => {}
            Err(e) => result = Err(e),
        }
    }
    rec.latency_ms = sent.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(Invoked::Completed {
            record,
            http_status,
        }) => {
            rec.http_status = Some(http_status);
            rec.start_kind = record.start_kind();
            rec.duration_ms = record.duration;
            rec.init_ms = record.init_time_ms();
            rec.wait_ms = record.wait_time_ms();
            rec.activation_id = record.activation_id.clone();
            rec.status = record.response.status.clone();
            if !record.succeeded() {
                rec.error = record.response.result.get("error").map_or_else(
                    || record.response.result.to_string(),
                    |e| e.as_str().map_or_else(|| e.to_string(), str::to_string),
                );
            }
        }
        Ok(Invoked::Accepted { .. }) => {
            rec.status = "unfinished".into();
            rec.error = format!(
                "accepted but not finished within {} s",
                accepted_wait.as_secs()
            );
        }
        Err(e) => {
            rec.http_status = e.status();
            rec.status = if e.status().is_some() {
                "http error"
            } else {
                "transport error"
            }
            .into();
            rec.error = crate::error_chain(&e);
        }
    }
    rec
}

/// Replays `trace` against the API. Never fails after it starts: every row becomes a record.
pub async fn replay(
    client: &Client,
    trace: &Trace,
    opts: &ReplayOptions,
    progress: bool,
) -> Result<ReplayOutcome, ReplayError> {
    if !(opts.speed.is_finite() && opts.speed > 0.0) {
        return Err(ReplayError::Speed(opts.speed));
    }
    if opts.max_in_flight == 0 {
        return Err(ReplayError::InFlight);
    }
    let n = trace.len();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} done, {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let sem = Arc::new(Semaphore::new(opts.max_in_flight));
    let (tx, mut rx) = mpsc::unbounded_channel::<InvocationRecord>();
    let start = Instant::now();
    let tokio_start = tokio::time::Instant::from_std(start);
    let collector = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut out: Vec<Option<InvocationRecord>> = vec![None; n];
            let (mut ok, mut bad) = (0usize, 0usize);
            while let Some(r) = rx.recv().await {
                if r.status == "success" {
                    ok += 1
                } else {
                    bad += 1
                }
                bar.set_message(format!("{ok} ok, {bad} failed"));
                bar.inc(1);
                let i = r.index;
                out[i] = Some(r);
            }
            out
        })
    };
    for (idx, e) in trace.entries().iter().enumerate() {
        let target_ms = e.time_ms as f64 / opts.speed;
        tokio::time::sleep_until(tokio_start + Duration::from_secs_f64(target_ms / 1e3)).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let tx = tx.clone();
        let job = Job {
            idx,
            function: e.function.clone(),
            scheduled_ms: e.time_ms,
            target_ms,
            params: e.params.clone().unwrap_or_default(),
            start,
            accepted_wait: opts.accepted_wait,
        };
        tokio::spawn(async move {
            let rec = fire(client, job).await;
            drop(permit);
            let _ = tx.send(rec);
        });
    }
    drop(tx);
    let slots = collector.await.unwrap_or_default();
    bar.finish();
    let wall_s = start.elapsed().as_secs_f64();
    // A task that panicked would leave a hole: record it rather than lose the row.
    let records: Vec<InvocationRecord> = slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                let e = &trace.entries()[i];
                InvocationRecord {
                    index: i,
                    function: e.function.clone(),
                    scheduled_ms: e.time_ms,
                    target_ms: e.time_ms as f64 / opts.speed,
                    sent_ms: f64::NAN,
                    lateness_ms: f64::NAN,
                    latency_ms: f64::NAN,
                    start_kind: String::new(),
                    status: "transport error".into(),
                    http_status: None,
                    duration_ms: None,
                    init_ms: None,
                    wait_ms: None,
                    activation_id: String::new(),
                    error: "replay task lost".into(),
                }
            })
        })
        .collect();
    let summary = summarize(trace, &records, opts.speed, wall_s);
    Ok(ReplayOutcome { summary, records })
}

/// Builds the summary of a set of records.
pub fn summarize(
    trace: &Trace,
    records: &[InvocationRecord],
    speed: f64,
    wall_s: f64,
) -> ReplaySummary {
    use std::collections::BTreeMap;
    let count = |s: &str| records.iter().filter(|r| r.status == s).count();
    let mut start_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_fn: BTreeMap<&str, Vec<&InvocationRecord>> = BTreeMap::new();
    for r in records {
        if !r.start_kind.is_empty() {
            *start_kinds.entry(r.start_kind.clone()).or_default() += 1;
        }
        per_fn.entry(r.function.as_str()).or_default().push(r);
    }
    let ok_latency = |rs: &[&InvocationRecord]| {
        Percentiles::of(
            &rs.iter()
                .filter(|r| r.status == "success")
                .map(|r| r.latency_ms)
                .collect::<Vec<_>>(),
        )
    };
    let functions = per_fn
        .into_iter()
        .map(|(f, rs)| {
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for r in &rs {
                if !r.start_kind.is_empty() {
                    *kinds.entry(r.start_kind.clone()).or_default() += 1;
                }
            }
            FunctionSummary {
                function: f.to_string(),
                invocations: rs.len(),
                succeeded: rs.iter().filter(|r| r.status == "success").count(),
                start_kinds: kinds,
                latency_ms: ok_latency(&rs),
            }
        })
        .collect();
    let all: Vec<&InvocationRecord> = records.iter().collect();
    ReplaySummary {
        trace_invocations: trace.len(),
        recorded: records.len(),
        speed,
        trace_span_ms: trace.duration_ms(),
        wall_s,
        succeeded: count("success"),
        failed_activations: records
            .iter()
            .filter(|r| {
                matches!(
                    r.status.as_str(),
                    "application error" | "action developer error" | "whisk internal error"
                )
            })
            .count(),
        http_errors: count("http error"),
        transport_errors: count("transport error"),
        unfinished: count("unfinished"),
        start_kinds,
        lateness_ms: Percentiles::of(
            &records
                .iter()
                .map(|r| r.lateness_ms)
                .filter(|x| x.is_finite())
                .collect::<Vec<_>>(),
        ),
        latency_ms: ok_latency(&all),
        functions,
    }
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} of {} invocations recorded in {:.1} s (speed ×{}): {} ok, {} failed activations, {} http errors, {} transport errors, {} unfinished",
            self.recorded,
            self.trace_invocations,
            self.wall_s,
            self.speed,
            self.succeeded,
            self.failed_activations,
            self.http_errors,
            self.transport_errors,
            self.unfinished
        )?;
        let kinds: Vec<String> = self
            .start_kinds
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "start kinds: {}", kinds.join(", "))?;
        let p = &self.lateness_ms;
        writeln!(
            f,
            "lateness ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            p.p50, p.p99, p.p999, p.max
        )?;
        let p = &self.latency_ms;
        writeln!(
            f,
            "latency ms (ok): p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            p.p50, p.p99, p.p999, p.max
        )?;
        writeln!(
            f,
            "{:<14} {:>6} {:>6} {:>9} {:>9}  start kinds",
            "function", "calls", "ok", "p50 ms", "p99 ms"
        )?;
        for s in &self.functions {
            let kinds: Vec<String> = s
                .start_kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            writeln!(
                f,
                "{:<14} {:>6} {:>6} {:>9.1} {:>9.1}  {}",
                s.function,
                s.invocations,
                s.succeeded,
                s.latency_ms.p50,
                s.latency_ms.p99,
                kinds.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Why the replay's outputs could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteOutputsError {
    /// Creating the directory or a file failed.
    #[error("writing {path:?}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the CSV failed.
    #[error("writing {path:?}")]
    Csv {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// Serialising the summary failed.
    #[error("writing {path:?}")]
    Json {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `DIR/invocations.csv` (one row per record) and `DIR/summary.json`; returns their paths.
pub fn write_outputs(
    dir: &Path,
    outcome: &ReplayOutcome,
) -> Result<(PathBuf, PathBuf), WriteOutputsError> {
    fs::create_dir_all(dir).map_err(|source| WriteOutputsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let csv_path = dir.join("invocations.csv");
    let f = File::create(&csv_path).map_err(|source| WriteOutputsError::Io {
        path: csv_path.clone(),
        source,
    })?;
    let mut w = csv::Writer::from_writer(BufWriter::new(f));
    for r in &outcome.records {
        w.serialize(r).map_err(|source| WriteOutputsError::Csv {
            path: csv_path.clone(),
            source,
        })?;
    }
    w.flush().map_err(|source| WriteOutputsError::Io {
        path: csv_path.clone(),
        source,
    })?;
    let json_path = dir.join("summary.json");
    let f = File::create(&json_path).map_err(|source| WriteOutputsError::Io {
        path: json_path.clone(),
        source,
    })?;
    serde_json::to_writer_pretty(BufWriter::new(f), &outcome.summary).map_err(|source| {
        WriteOutputsError::Json {
            path: json_path.clone(),
            source,
        }
    })?;
    Ok((csv_path, json_path))
}
