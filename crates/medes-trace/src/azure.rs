//! Streaming loaders for the Azure Functions 2019 and 2021 public traces.
//!
//! Each reader wraps a [`csv::Reader`], reuses one record buffer and yields one typed row at a
//! time, so multi-gigabyte files stream in constant memory. The header is checked when the reader
//! is created; every malformed row becomes a [`ReadError`] naming the line and the column.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Minutes in one day file of the 2019 trace.
pub const MINUTES_PER_DAY: usize = 1440;

/// Why a trace file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The file could not be opened.
    #[error("opening {path:?}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The CSV layer failed (I/O error, invalid UTF-8, unbalanced quotes).
    #[error("line {line}: malformed csv")]
    Csv {
        /// 1-based line number.
        line: u64,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// The header is not the expected one.
    #[error("line 1, column {column}: expected header {expected:?}, found {found:?}")]
    Header {
        /// 1-based column number.
        column: usize,
        /// Expected name.
        expected: String,
        /// Found name (empty if missing).
        found: String,
    },
    /// A row has the wrong number of columns.
    #[error("line {line}: expected {expected} columns, found {found}")]
    Width {
        /// 1-based line number.
        line: u64,
        /// Expected column count.
        expected: usize,
        /// Found column count.
        found: usize,
    },
    /// A field could not be parsed.
    #[error("line {line}, column {column} ({name}): {problem}: {value:?}")]
    Field {
        /// 1-based line number.
        line: u64,
        /// 1-based column number.
        column: usize,
        /// Column name.
        name: String,
        /// The offending text.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// The trigger of a function in the 2019 trace (`Trigger` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// HTTP request.
    Http,
    /// Queue message (Service Bus, Storage queue).
    Queue,
    /// Event (Event Hub, Event Grid).
    Event,
    /// Timer (CRON schedule).
    Timer,
    /// Durable Functions orchestration.
    Orchestration,
    /// Blob storage.
    Storage,
    /// Anything else.
    Others,
}

impl Trigger {
    /// All triggers in the order used by reports.
    pub const ALL: [Trigger; 7] = [
        Trigger::Http,
        Trigger::Queue,
        Trigger::Event,
        Trigger::Timer,
        Trigger::Orchestration,
        Trigger::Storage,
        Trigger::Others,
    ];

    /// The trace's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Http => "http",
            Trigger::Queue => "queue",
            Trigger::Event => "event",
            Trigger::Timer => "timer",
            Trigger::Orchestration => "orchestration",
            Trigger::Storage => "storage",
            Trigger::Others => "others",
        }
    }

    /// The group of the published trigger mix (storage is counted with "others").
    pub fn group(self) -> Trigger {
        match self {
            Trigger::Storage => Trigger::Others,
            t => t,
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown trigger name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown trigger {0:?}")]
pub struct ParseTriggerError(pub String);

impl FromStr for Trigger {
    type Err = ParseTriggerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "http" => Trigger::Http,
            "queue" => Trigger::Queue,
            "event" => Trigger::Event,
            "timer" => Trigger::Timer,
            "orchestration" => Trigger::Orchestration,
            "storage" => Trigger::Storage,
            "others" | "other" => Trigger::Others,
            _ => return Err(ParseTriggerError(s.to_string())),
        })
    }
}

/// One row of `invocations_per_function_md.anon.dNN.csv`: a function's per-minute counts for a day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInvocations {
    /// `HashOwner`.
    pub owner: String,
    /// `HashApp`.
    pub app: String,
    /// `HashFunction`.
    pub function: String,
    /// `Trigger`.
    pub trigger: Trigger,
    /// Invocations in each minute of the day (`1` .. `1440`).
    pub counts: Vec<u32>,
}

impl FunctionInvocations {
    /// Total invocations over the row.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }
}

/// One row of `function_durations_percentiles.anon.dNN.csv` (all times in ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDurations {
    /// `HashOwner`.
    pub owner: String,
    /// `HashApp`.
    pub app: String,
    /// `HashFunction`.
    pub function: String,
    /// `Average`.
    pub average_ms: f64,
    /// `Count`.
    pub count: u64,
    /// `Minimum`.
    pub minimum_ms: f64,
    /// `Maximum`.
    pub maximum_ms: f64,
    /// `percentile_Average_{0,1,25,50,75,99,100}`.
    pub percentiles_ms: [f64; 7],
}

/// One row of `app_memory_percentiles.anon.dNN.csv` (MB).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppMemory {
    /// `HashOwner`.
    pub owner: String,
    /// `HashApp`.
    pub app: String,
    /// `SampleCount`.
    pub sample_count: u64,
    /// `AverageAllocatedMb`.
    pub average_mb: f64,
    /// `AverageAllocatedMb_pct{1,5,25,50,75,95,99,100}`.
    pub percentiles_mb: [f64; 8],
}

/// One row of the 2021 trace (`app,func,end_timestamp,duration`, seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation2021 {
    /// `app`.
    pub app: String,
    /// `func`.
    pub func: String,
    /// `end_timestamp`, seconds from the start of the trace.
    pub end_s: f64,
    /// `duration`, seconds.
    pub duration_s: f64,
}

impl Invocation2021 {
    /// Arrival time (end − duration), seconds from the start of the trace.
    pub fn start_s(&self) -> f64 {
        self.end_s - self.duration_s
    }
}

/// Durations file header.
pub const DURATIONS_HEADER: [&str; 14] = [
    "HashOwner",
    "HashApp",
    "HashFunction",
    "Average",
    "Count",
    "Minimum",
    "Maximum",
    "percentile_Average_0",
    "percentile_Average_1",
    "percentile_Average_25",
    "percentile_Average_50",
    "percentile_Average_75",
    "percentile_Average_99",
    "percentile_Average_100",
];

/// Memory file header.
pub const MEMORY_HEADER: [&str; 12] = [
    "HashOwner",
    "HashApp",
    "SampleCount",
    "AverageAllocatedMb",
    "AverageAllocatedMb_pct1",
    "AverageAllocatedMb_pct5",
    "AverageAllocatedMb_pct25",
    "AverageAllocatedMb_pct50",
    "AverageAllocatedMb_pct75",
    "AverageAllocatedMb_pct95",
    "AverageAllocatedMb_pct99",
    "AverageAllocatedMb_pct100",
];

/// 2021 trace header.
pub const INVOCATIONS_2021_HEADER: [&str; 4] = ["app", "func", "end_timestamp", "duration"];

/// Shared machinery: a CSV reader with a reusable record and typed field accessors.
struct Rows<R> {
    rdr: csv::Reader<R>,
    rec: csv::StringRecord,
    names: Vec<String>,
}

impl<R: Read> Rows<R> {
    fn new(inner: R) -> Result<(Self, csv::StringRecord), ReadError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(inner);
        let header = rdr
            .headers()
            .map_err(|source| ReadError::Csv { line: 1, source })?
            .clone();
        let names = header.iter().map(|s| s.trim().to_string()).collect();
        Ok((
            Rows {
                rdr,
                rec: csv::StringRecord::new(),
                names,
            },
            header,
        ))
    }

    /// Reads the next record; `None` at the end.
    fn next(&mut self) -> Option<Result<u64, ReadError>> {
        match self.rdr.read_record(&mut self.rec) {
            Ok(false) => None,
            Ok(true) => {
                let line = self.rec.position().map_or(0, |p| p.line());
                if self.rec.len() != self.names.len() {
                    return Some(Err(ReadError::Width {
                        line,
                        expected: self.names.len(),
                        found: self.rec.len(),
                    }));
                }
                Some(Ok(line))
            }
            Err(source) => {
                let line = source.position().map_or(0, |p| p.line());
                Some(Err(ReadError::Csv { line, source }))
            }
        }
    }

    fn str(&self, line: u64, col: usize) -> Result<String, ReadError> {
        let v = self.rec.get(col).unwrap_or("").trim();
        if v.is_empty() {
            return Err(self.field_err(line, col, v, "empty field"));
        }
        Ok(v.to_string())
    }

    fn parse<T: FromStr>(
        &self,
        line: u64,
        col: usize,
        problem: &'static str,
    ) -> Result<T, ReadError> {
        let v = self.rec.get(col).unwrap_or("").trim();
        v.parse().map_err(|_| self.field_err(line, col, v, problem))
    }

    fn f64(&self, line: u64, col: usize) -> Result<f64, ReadError> {
        let x: f64 = self.parse(line, col, "not a number")?;
        if !x.is_finite() {
            let v = self.rec.get(col).unwrap_or("");
            return Err(self.field_err(line, col, v, "not a finite number"));
        }
        Ok(x)
    }

    fn nonneg_f64(&self, line: u64, col: usize) -> Result<f64, ReadError> {
        let x = self.f64(line, col)?;
        if x < 0.0 {
            let v = self.rec.get(col).unwrap_or("");
            return Err(self.field_err(line, col, v, "negative value"));
        }
        Ok(x)
    }

    fn field_err(&self, line: u64, col: usize, value: &str, problem: &'static str) -> ReadError {
        ReadError::Field {
            line,
            column: col + 1,
            name: self.names.get(col).cloned().unwrap_or_default(),
            value: value.to_string(),
            problem,
        }
    }
}

fn check_header(found: &csv::StringRecord, expected: &[&str]) -> Result<(), ReadError> {
    for (i, want) in expected.iter().enumerate() {
        let got = found.get(i).map(str::trim).unwrap_or("");
        if got != *want {
            return Err(ReadError::Header {
                column: i + 1,
                expected: (*want).to_string(),
                found: got.to_string(),
            });
        }
    }
    if found.len() > expected.len() {
        return Err(ReadError::Header {
            column: expected.len() + 1,
            expected: String::new(),
            found: found[expected.len()].to_string(),
        });
    }
    Ok(())
}

fn open(path: &Path) -> Result<BufReader<File>, ReadError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(1 << 20, f))
        .map_err(|source| ReadError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Streams `invocations_per_function_md.anon.dNN.csv`.
///
/// The header must be `HashOwner,HashApp,HashFunction,Trigger,1,2,...,N`; real files have
/// N = 1440, shorter fixtures are accepted as long as the minute columns are numbered from 1.
pub struct InvocationsReader<R> {
    rows: Rows<R>,
    minutes: usize,
}

impl InvocationsReader<BufReader<File>> {
    /// Opens a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        Self::new(open(path.as_ref())?)
    }
}

impl<R: Read> InvocationsReader<R> {
    /// Wraps a reader and checks the header.
    pub fn new(inner: R) -> Result<Self, ReadError> {
        let (rows, header) = Rows::new(inner)?;
        check_header_prefix(
            &header,
            &["HashOwner", "HashApp", "HashFunction", "Trigger"],
        )?;
        let minutes = header.len().saturating_sub(4);
        if minutes == 0 {
            return Err(ReadError::Header {
                column: 5,
                expected: "1".into(),
                found: String::new(),
            });
        }
        for m in 0..minutes {
            let got = header.get(4 + m).map(str::trim).unwrap_or("");
            if got != (m + 1).to_string() {
                return Err(ReadError::Header {
                    column: 5 + m,
                    expected: (m + 1).to_string(),
                    found: got.into(),
                });
            }
        }
        Ok(InvocationsReader { rows, minutes })
    }

    /// Number of minute columns (1440 in the real files).
    pub fn minutes(&self) -> usize {
        self.minutes
    }

    fn row(&mut self, line: u64) -> Result<FunctionInvocations, ReadError> {
        let r = &self.rows;
        let trigger_raw = r.str(line, 3)?;
        let trigger = trigger_raw
            .parse()
            .map_err(|_| r.field_err(line, 3, &trigger_raw, "unknown trigger"))?;
        let mut counts = Vec::with_capacity(self.minutes);
        for m in 0..self.minutes {
            counts.push(r.parse(line, 4 + m, "not a non-negative integer count")?);
        }
        Ok(FunctionInvocations {
            owner: r.str(line, 0)?,
            app: r.str(line, 1)?,
            function: r.str(line, 2)?,
            trigger,
            counts,
        })
    }
}

fn check_header_prefix(found: &csv::StringRecord, expected: &[&str]) -> Result<(), ReadError> {
    for (i, want) in expected.iter().enumerate() {
        let got = found.get(i).map(str::trim).unwrap_or("");
        if got != *want {
            return Err(ReadError::Header {
                column: i + 1,
                expected: (*want).to_string(),
                found: got.to_string(),
            });
        }
    }
    Ok(())
}

impl<R: Read> Iterator for InvocationsReader<R> {
    type Item = Result<FunctionInvocations, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.rows.next()? {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        Some(self.row(line))
    }
}

/// Streams `function_durations_percentiles.anon.dNN.csv`.
pub struct DurationsReader<R> {
    rows: Rows<R>,
}

impl DurationsReader<BufReader<File>> {
    /// Opens a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        Self::new(open(path.as_ref())?)
    }
}

impl<R: Read> DurationsReader<R> {
    /// Wraps a reader and checks the header.
    pub fn new(inner: R) -> Result<Self, ReadError> {
        let (rows, header) = Rows::new(inner)?;
        check_header(&header, &DURATIONS_HEADER)?;
        Ok(DurationsReader { rows })
    }
}

impl<R: Read> Iterator for DurationsReader<R> {
    type Item = Result<FunctionDurations, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.rows.next()? {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let r = &self.rows;
        let row = || -> Result<FunctionDurations, ReadError> {
            let mut percentiles_ms = [0.0; 7];
            for (i, p) in percentiles_ms.iter_mut().enumerate() {
                *p = r.nonneg_f64(line, 7 + i)?;
            }
            Ok(FunctionDurations {
                owner: r.str(line, 0)?,
                app: r.str(line, 1)?,
                function: r.str(line, 2)?,
                average_ms: r.nonneg_f64(line, 3)?,
                count: r.parse(line, 4, "not a non-negative integer")?,
                minimum_ms: r.nonneg_f64(line, 5)?,
                maximum_ms: r.nonneg_f64(line, 6)?,
                percentiles_ms,
            })
        };
        Some(row())
    }
}

/// Streams `app_memory_percentiles.anon.dNN.csv`.
pub struct MemoryReader<R> {
    rows: Rows<R>,
}

impl MemoryReader<BufReader<File>> {
    /// Opens a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        Self::new(open(path.as_ref())?)
    }
}

impl<R: Read> MemoryReader<R> {
    /// Wraps a reader and checks the header.
    pub fn new(inner: R) -> Result<Self, ReadError> {
        let (rows, header) = Rows::new(inner)?;
        check_header(&header, &MEMORY_HEADER)?;
        Ok(MemoryReader { rows })
    }
}

impl<R: Read> Iterator for MemoryReader<R> {
    type Item = Result<AppMemory, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.rows.next()? {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let r = &self.rows;
        let row = || -> Result<AppMemory, ReadError> {
            let mut percentiles_mb = [0.0; 8];
            for (i, p) in percentiles_mb.iter_mut().enumerate() {
                *p = r.nonneg_f64(line, 4 + i)?;
            }
            Ok(AppMemory {
                owner: r.str(line, 0)?,
                app: r.str(line, 1)?,
                sample_count: r.parse(line, 2, "not a non-negative integer")?,
                average_mb: r.nonneg_f64(line, 3)?,
                percentiles_mb,
            })
        };
        Some(row())
    }
}

/// Streams the 2021 invocation trace (`app,func,end_timestamp,duration`).
pub struct Invocations2021Reader<R> {
    rows: Rows<R>,
}

impl Invocations2021Reader<BufReader<File>> {
    /// Opens a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        Self::new(open(path.as_ref())?)
    }
}

impl<R: Read> Invocations2021Reader<R> {
    /// Wraps a reader and checks the header.
    pub fn new(inner: R) -> Result<Self, ReadError> {
        let (rows, header) = Rows::new(inner)?;
        check_header(&header, &INVOCATIONS_2021_HEADER)?;
        Ok(Invocations2021Reader { rows })
    }
}

impl<R: Read> Iterator for Invocations2021Reader<R> {
    type Item = Result<Invocation2021, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.rows.next()? {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let r = &self.rows;
        let row = || -> Result<Invocation2021, ReadError> {
            Ok(Invocation2021 {
                app: r.str(line, 0)?,
                func: r.str(line, 1)?,
                end_s: r.nonneg_f64(line, 2)?,
                duration_s: r.nonneg_f64(line, 3)?,
            })
        };
        Some(row())
    }
}

/// Writes rows in the `invocations_per_function_md` format (header included).
pub fn write_invocations<W: io::Write>(
    out: W,
    rows: impl IntoIterator<Item = FunctionInvocations>,
    minutes: usize,
) -> Result<(), csv::Error> {
    let mut w = csv::WriterBuilder::new().from_writer(out);
    let mut header: Vec<String> = ["HashOwner", "HashApp", "HashFunction", "Trigger"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    header.extend((1..=minutes).map(|m| m.to_string()));
    w.write_record(&header)?;
    let mut rec: Vec<String> = Vec::with_capacity(4 + minutes);
    for row in rows {
        rec.clear();
        rec.extend([
            row.owner,
            row.app,
            row.function,
            row.trigger.as_str().to_string(),
        ]);
        rec.extend(row.counts.iter().map(u32::to_string));
        w.write_record(&rec)?;
    }
    w.flush()?;
    Ok(())
}

/// Bins a 2021 trace into per-minute arrival counts (arrival = end − duration) for day `day`
/// (0-based), in the 2019 row format with trigger `others` (the 2021 trace has no trigger).
/// Functions are keyed by (app, func); rows come out in first-seen order.
pub fn bin_2021<I>(rows: I, day: u32) -> Result<Vec<FunctionInvocations>, ReadError>
where
    I: IntoIterator<Item = Result<Invocation2021, ReadError>>,
{
    let mut index: std::collections::HashMap<(String, String), usize> = Default::default();
    let mut out: Vec<FunctionInvocations> = Vec::new();
    let day_start = f64::from(day) * 86_400.0;
    for row in rows {
        let row = row?;
        let t = row.start_s().max(0.0) - day_start;
        if !(0.0..86_400.0).contains(&t) {
            continue;
        }
        let minute = (t / 60.0) as usize;
        let key = (row.app, row.func);
        let i = match index.get(&key) {
            Some(&i) => i,
            None => {
                out.push(FunctionInvocations {
                    owner: key.0.clone(),
                    app: key.0.clone(),
                    function: key.1.clone(),
                    trigger: Trigger::Others,
                    counts: vec![0; MINUTES_PER_DAY],
                });
                index.insert(key, out.len() - 1);
                out.len() - 1
            }
        };
        out[i].counts[minute] = out[i].counts[minute].saturating_add(1);
    }
    Ok(out)
}
