//! The replayable trace file: `time_ms,function,params`.
//!
//! One row per invocation: milliseconds from the start of the trace, the action's name, and
//! optional JSON parameters (a JSON object, CSV-quoted; empty means the action's defaults).
//! Rows may come in any order; [`Trace`] keeps them sorted by time (stable).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The header of a replay file.
pub const REPLAY_HEADER: [&str; 3] = ["time_ms", "function", "params"];

/// One scheduled invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// Milliseconds from the start of the trace.
    pub time_ms: u64,
    /// Action name (e.g. `linalg` or `pkg/linalg`).
    pub function: String,
    /// Parameters; `None` means the action's defaults.
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A replayable trace, sorted by time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    entries: Vec<TraceEntry>,
}

/// Why a replay file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceReadError {
    /// The file could not be opened.
    #[error("opening {path:?}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The CSV layer failed.
    #[error("line {line}: malformed csv")]
    Csv {
        /// 1-based line.
        line: u64,
        /// The cause.
        #[source]
        source: csv::Error,
    },
    /// The header is not `time_ms,function,params`.
    #[error("line 1: expected header time_ms,function,params, found {found:?}")]
    Header {
        /// What was found.
        found: String,
    },
    /// A row has a bad field.
    #[error("line {line}, column {column} ({name}): {problem}: {value:?}")]
    Field {
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: usize,
        /// Column name.
        name: &'static str,
        /// Offending text (truncated to 200 characters).
        value: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Why a replay file could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceWriteError {
    /// Creating the file failed.
    #[error("creating {path:?}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing failed.
    #[error("writing the trace")]
    Write(#[source] csv::Error),
}

/// Whether `name` is a plausible action name: 1..=256 characters of `[A-Za-z0-9_.@/-]`, not
/// starting with `/` (OpenWhisk's entity name rules, package-qualified names allowed).
pub fn valid_action_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('/')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '/' | '-' | ' '))
        && !name.ends_with(' ')
        && !name.starts_with(' ')
}

impl Trace {
    /// Builds a trace, sorting the entries by time (stable).
    pub fn new(mut entries: Vec<TraceEntry>) -> Self {
        entries.sort_by_key(|e| e.time_ms);
        Trace { entries }
    }

    /// The entries, sorted by time.
    pub fn entries(&self) -> &[TraceEntry] {
        &self.entries
    }

    /// Number of invocations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the trace is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Time of the last invocation, ms (0 for an empty trace).
    pub fn duration_ms(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.time_ms)
    }

    /// Distinct function names, sorted.
    pub fn functions(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.iter().map(|e| e.function.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Reads a replay file.
    pub fn read_path(path: impl AsRef<Path>) -> Result<Self, TraceReadError> {
        let path = path.as_ref();
        let f = File::open(path).map_err(|source| TraceReadError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read(BufReader::new(f))
    }

    /// Reads a replay CSV from any reader.
    pub fn read<R: Read>(inner: R) -> Result<Self, TraceReadError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(inner);
        let header = rdr
            .headers()
            .map_err(|source| TraceReadError::Csv { line: 1, source })?;
        let names: Vec<&str> = header.iter().map(str::trim).collect();
        if names != REPLAY_HEADER {
            return Err(TraceReadError::Header {
                found: names.join(","),
            });
        }
        let mut rec = csv::StringRecord::new();
        let mut entries = Vec::new();
        loop {
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(source) => {
                    let line = source.position().map_or(0, |p| p.line());
                    return Err(TraceReadError::Csv { line, source });
                }
            }
            let line = rec.position().map_or(0, |p| p.line());
            entries.push(parse_row(&rec, line)?);
        }
        Ok(Trace::new(entries))
    }

    /// Writes the trace as CSV.
    pub fn write<W: Write>(&self, out: W) -> Result<(), TraceWriteError> {
        let mut w = csv::WriterBuilder::new().from_writer(out);
        w.write_record(REPLAY_HEADER)
            .map_err(TraceWriteError::Write)?;
        for e in &self.entries {
            let params = match &e.params {
                Some(p) => serde_json::Value::Object(p.clone()).to_string(),
                None => String::new(),
            };
            w.write_record([
                e.time_ms.to_string().as_str(),
                e.function.as_str(),
                params.as_str(),
            ])
            .map_err(TraceWriteError::Write)?;
        }
        w.flush().map_err(|e| TraceWriteError::Write(e.into()))?;
        Ok(())
    }

    /// Writes the trace to a file.
    pub fn write_path(&self, path: impl AsRef<Path>) -> Result<(), TraceWriteError> {
        let path = path.as_ref();
        let f = File::create(path).map_err(|source| TraceWriteError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        self.write(BufWriter::new(f))
    }
}

fn parse_row(rec: &csv::StringRecord, line: u64) -> Result<TraceEntry, TraceReadError> {
    let field_err = |column: usize, value: &str, problem: &'static str| TraceReadError::Field {
        line,
        column,
        name: REPLAY_HEADER[column - 1],
        value: value.chars().take(200).collect(),
        problem,
    };
    if rec.len() < 2 || rec.len() > 3 {
        return Err(field_err(
            rec.len().min(3) + 1,
            "",
            "expected 2 or 3 columns",
        ));
    }
    let t = rec[0].trim();
    let time_ms: u64 = t
        .parse()
        .map_err(|_| field_err(1, t, "not a non-negative integer"))?;
    let function = rec[1].trim();
    if !valid_action_name(function) {
        return Err(field_err(2, function, "not a valid action name"));
    }
    let raw = rec.get(2).unwrap_or("").trim();
    let params = if raw.is_empty() {
        None
    } else {
        match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            Ok(_) => return Err(field_err(3, raw, "params must be a json object")),
            Err(_) => return Err(field_err(3, raw, "invalid json")),
        }
    };
    Ok(TraceEntry {
        time_ms,
        function: function.to_string(),
        params,
    })
}
