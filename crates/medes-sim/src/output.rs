//! What a simulation produces: per-invocation records, memory samples and a summary.

use std::path::Path;

use medes_core::StartKind;
use serde::{Deserialize, Serialize};

use crate::engine::Counters;

/// One invocation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Index of the invocation in the trace.
    pub request: u32,
    /// Index into [`SimOutput::functions`].
    pub function: u32,
    /// Arrival time, ms from the trace start.
    pub arrival_ms: u64,
    /// How it started.
    pub start: StartKind,
    /// From arrival to the sandbox being ready (waiting for memory included), ms.
    pub startup_ms: f64,
    /// End to end: startup + execution, ms.
    pub e2e_ms: f64,
    /// Node it ran on.
    pub node: u32,
}

/// Cluster memory at one time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// Time, ms.
    pub time_ms: u64,
    /// Charged on all nodes, MB.
    pub used_mb: f64,
    /// The fullest node, MB.
    pub max_node_mb: f64,
    /// Warm and running sandboxes (bases excluded), MB.
    pub warm_mb: f64,
    /// Dedup sandboxes (and ones being deduplicated), MB.
    pub dedup_mb: f64,
    /// Bases (with their page images), MB.
    pub base_mb: f64,
    /// Cold starts and restores in progress, MB.
    pub transient_mb: f64,
    /// Live sandboxes.
    pub sandboxes: usize,
    /// Of which deduplicated.
    pub dedup_sandboxes: usize,
}

/// Per-function figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSummary {
    /// Action name.
    pub name: String,
    /// Invocations served.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Dedup starts.
    pub dedup_starts: u64,
    /// Warm starts.
    pub warm_starts: u64,
    /// Template starts.
    #[serde(default)]
    pub template_starts: u64,
    /// Startup milliseconds of cold and template starts, summed.
    #[serde(default)]
    pub cold_template_ms: f64,
    /// End-to-end percentiles, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// p99.9, ms.
    pub p999_ms: f64,
    /// Startup p99.9 (end to end minus execution), ms.
    pub startup_p999_ms: f64,
}

/// A run's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Policy name.
    pub policy: String,
    /// Invocations served.
    pub invocations: u64,
    /// Invocations never served (must be 0).
    pub dropped: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Dedup starts.
    pub dedup_starts: u64,
    /// Warm starts.
    pub warm_starts: u64,
    /// Template starts.
    #[serde(default)]
    pub template_starts: u64,
    /// Startup milliseconds (wait included) of cold and template starts, summed.
    #[serde(default)]
    pub cold_template_ms: f64,
    /// End-to-end p50, ms.
    pub p50_ms: f64,
    /// End-to-end p99, ms.
    pub p99_ms: f64,
    /// End-to-end p99.9, ms.
    pub p999_ms: f64,
    /// Startup p50, ms.
    pub startup_p50_ms: f64,
    /// Startup p99, ms.
    pub startup_p99_ms: f64,
    /// Startup p99.9, ms.
    pub startup_p999_ms: f64,
    /// Mean cluster memory over the trace, GB (10^3 MB).
    pub mean_memory_gb: f64,
    /// Peak cluster memory, GB.
    pub peak_memory_gb: f64,
    /// Mean share of live sandboxes that are deduplicated.
    pub mean_dedup_share: f64,
    /// Mean live sandboxes.
    pub mean_sandboxes: f64,
    /// The cluster budget, GB.
    pub budget_gb: f64,
    /// Other counters.
    pub counters: Counters,
    /// Per function, in [`SimOutput::functions`] order.
    pub functions: Vec<FunctionSummary>,
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Accumulates records into a [`Summary`].
#[derive(Debug, Default)]
pub struct SummaryBuilder {
    names: Vec<String>,
    e2e: Vec<Vec<f64>>,
    startup: Vec<Vec<f64>>,
    kinds: Vec<[u64; 4]>,
    cold_template_ms: Vec<f64>,
    expected: u64,
}

impl SummaryBuilder {
    /// A builder for these functions.
    pub fn new(names: &[String]) -> Self {
        SummaryBuilder {
            names: names.to_vec(),
            e2e: vec![Vec::new(); names.len()],
            startup: vec![Vec::new(); names.len()],
            kinds: vec![[0; 4]; names.len()],
            cold_template_ms: vec![0.0; names.len()],
            expected: 0,
        }
    }

    /// Sets the number of invocations in the trace (for `dropped`).
    pub fn expect(&mut self, n: u64) {
        self.expected = n;
    }

    /// Adds one record.
    pub fn add(&mut self, r: &InvocationRecord) {
        let f = r.function as usize;
        if f >= self.e2e.len() {
            return;
        }
        self.e2e[f].push(r.e2e_ms);
        self.startup[f].push(r.startup_ms);
        let k = match r.start {
            StartKind::Cold => 0,
            StartKind::Dedup => 1,
            StartKind::Template => 3,
            _ => 2,
        };
        self.kinds[f][k] += 1;
        if k == 0 || k == 3 {
            self.cold_template_ms[f] += r.startup_ms;
        }
    }

    /// The summary.
    pub fn finish(
        self,
        policy: String,
        memory: &[MemorySample],
        duration_ms: u64,
        budget_mb: f64,
        counters: Counters,
    ) -> Summary {
        let mut functions = Vec::new();
        let mut all_e2e = Vec::new();
        let mut all_startup = Vec::new();
        let mut tot = [0u64; 4];
        let mut ct_ms = 0.0;
        for (i, name) in self.names.iter().enumerate() {
            let e = sorted(self.e2e[i].clone());
            let s = sorted(self.startup[i].clone());
            let k = self.kinds[i];
            for (t, v) in tot.iter_mut().zip(k) {
                *t += v;
            }
            ct_ms += self.cold_template_ms[i];
            functions.push(FunctionSummary {
                name: name.clone(),
                invocations: e.len() as u64,
                cold_starts: k[0],
                dedup_starts: k[1],
                warm_starts: k[2],
                template_starts: k[3],
                cold_template_ms: self.cold_template_ms[i],
                p50_ms: percentile(&e, 50.0),
                p99_ms: percentile(&e, 99.0),
                p999_ms: percentile(&e, 99.9),
                startup_p999_ms: percentile(&s, 99.9),
            });
            all_e2e.extend(e);
            all_startup.extend(s);
        }
        let e = sorted(all_e2e);
        let s = sorted(all_startup);
        let window: Vec<&MemorySample> = memory
            .iter()
            .filter(|m| m.time_ms <= duration_ms.max(1))
            .collect();
        let n = window.len().max(1) as f64;
        let mean_mem = window.iter().map(|m| m.used_mb).sum::<f64>() / n;
        let mean_sb = window.iter().map(|m| m.sandboxes as f64).sum::<f64>() / n;
        let mean_share = window
            .iter()
            .map(|m| {
                if m.sandboxes > 0 {
                    m.dedup_sandboxes as f64 / m.sandboxes as f64
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / n;
        let served = e.len() as u64;
        Summary {
            policy,
            invocations: served,
            dropped: self.expected.saturating_sub(served),
            cold_starts: tot[0],
            dedup_starts: tot[1],
            warm_starts: tot[2],
            template_starts: tot[3],
            cold_template_ms: ct_ms,
            p50_ms: percentile(&e, 50.0),
            p99_ms: percentile(&e, 99.0),
            p999_ms: percentile(&e, 99.9),
            startup_p50_ms: percentile(&s, 50.0),
            startup_p99_ms: percentile(&s, 99.0),
            startup_p999_ms: percentile(&s, 99.9),
            mean_memory_gb: mean_mem / 1000.0,
            peak_memory_gb: memory.iter().map(|m| m.used_mb).fold(0.0, f64::max) / 1000.0,
            mean_dedup_share: mean_share,
            mean_sandboxes: mean_sb,
            budget_gb: budget_mb / 1000.0,
            counters,
            functions,
        }
    }
}

/// Everything a run produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimOutput {
    /// Policy name.
    pub policy: String,
    /// Function names (records index into this).
    pub functions: Vec<String>,
    /// Per-invocation records, in start order (empty unless kept).
    pub records: Vec<InvocationRecord>,
    /// Memory samples.
    pub memory: Vec<MemorySample>,
    /// The summary.
    pub summary: Summary,
}

/// Why outputs could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// File system.
    #[error("{path:?}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// CSV.
    #[error("{path:?}: csv")]
    Csv {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// JSON.
    #[error("{path:?}: json")]
    Json {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A record names a function index outside the function list, or an unknown start kind.
    #[error("{path:?} line {line}: {what}")]
    Bad {
        /// The path.
        path: std::path::PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        what: &'static str,
    },
}

#[derive(Serialize, Deserialize)]
struct InvocationRow {
    request: u32,
    function: String,
    arrival_ms: u64,
    start: String,
    startup_ms: f64,
    e2e_ms: f64,
    node: u32,
}

impl SimOutput {
    /// Writes `invocations.csv`, `memory.csv` and `summary.json` into `dir` (created).
    pub fn write_dir(&self, dir: &Path) -> Result<(), OutputError> {
        std::fs::create_dir_all(dir).map_err(|source| OutputError::Io {
            path: dir.into(),
            source,
        })?;
        let p = dir.join("invocations.csv");
        let csv_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OutputError::Csv { path, source }
        };
        let mut w = csv::Writer::from_path(&p).map_err(csv_err(&p))?;
        for r in &self.records {
            w.serialize(InvocationRow {
                request: r.request,
                function: self
                    .functions
                    .get(r.function as usize)
                    .cloned()
                    .unwrap_or_default(),
                arrival_ms: r.arrival_ms,
                start: r.start.as_str().into(),
                startup_ms: r.startup_ms,
                e2e_ms: r.e2e_ms,
                node: r.node,
            })
            .map_err(csv_err(&p))?;
        }
        w.flush().map_err(|source| OutputError::Io {
            path: p.clone(),
            source,
        })?;
        let p = dir.join("memory.csv");
        let mut w = csv::Writer::from_path(&p).map_err(csv_err(&p))?;
        for m in &self.memory {
            w.serialize(m).map_err(csv_err(&p))?;
        }
        w.flush().map_err(|source| OutputError::Io {
            path: p.clone(),
            source,
        })?;
        let p = dir.join("summary.json");
        let text =
            serde_json::to_string_pretty(&self.summary).map_err(|source| OutputError::Json {
                path: p.clone(),
                source,
            })?;
        std::fs::write(&p, text).map_err(|source| OutputError::Io { path: p, source })
    }

    /// Reads a directory written by [`SimOutput::write_dir`] (or by a live replay in the same
    /// format).
    pub fn read_dir(dir: &Path) -> Result<SimOutput, OutputError> {
        let p = dir.join("summary.json");
        let text = std::fs::read_to_string(&p).map_err(|source| OutputError::Io {
            path: p.clone(),
            source,
        })?;
        let summary: Summary = serde_json::from_str(&text).map_err(|source| OutputError::Json {
            path: p.clone(),
            source,
        })?;
        let functions: Vec<String> = summary.functions.iter().map(|f| f.name.clone()).collect();
        let p = dir.join("invocations.csv");
        let mut rd = csv::Reader::from_path(&p).map_err(|source| OutputError::Csv {
            path: p.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for (i, row) in rd.deserialize::<InvocationRow>().enumerate() {
            let row = row.map_err(|source| OutputError::Csv {
                path: p.clone(),
                source,
            })?;
            let line = i as u64 + 2;
            let function =
                functions
                    .iter()
                    .position(|f| *f == row.function)
                    .ok_or(OutputError::Bad {
                        path: p.clone(),
                        line,
                        what: "unknown function",
                    })? as u32;
            let start = match row.start.as_str() {
                "cold" => StartKind::Cold,
                "warm" => StartKind::Warm,
                "dedup" => StartKind::Dedup,
                "template" => StartKind::Template,
                _ => {
                    return Err(OutputError::Bad {
                        path: p.clone(),
                        line,
                        what: "unknown start kind",
                    });
                }
            };
            records.push(InvocationRecord {
                request: row.request,
                function,
                arrival_ms: row.arrival_ms,
                start,
                startup_ms: row.startup_ms,
                e2e_ms: row.e2e_ms,
                node: row.node,
            });
        }
        let p = dir.join("memory.csv");
        let mut rd = csv::Reader::from_path(&p).map_err(|source| OutputError::Csv {
            path: p.clone(),
            source,
        })?;
        let memory = rd
            .deserialize::<MemorySample>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| OutputError::Csv {
                path: p.clone(),
                source,
            })?;
        Ok(SimOutput {
            policy: summary.policy.clone(),
            functions,
            records,
            memory,
            summary,
        })
    }
}
