//! The ten-function suite: the manifest, packaging, `deploy`, `run` and its report.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::{ActionSpec, Client, ExecSpec, Invoked, LimitsSpec, RequestError, base64};
use crate::footprint::{SandboxFootprint, sandbox_footprints};

/// One function of `functions/manifest.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Directory under `functions/` (default: the function's name).
    #[serde(default)]
    pub file: Option<String>,
    /// Memory limit, MiB.
    pub memory_mb: u64,
    /// Timeout, ms.
    pub timeout_ms: u64,
    /// The paper's execution time, ms (Table 2).
    #[serde(default)]
    pub paper_ms: Option<f64>,
    /// The paper's memory, MB (Table 2).
    #[serde(default)]
    pub paper_mb: Option<f64>,
    /// Default parameters.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Parameters that must produce `{"error": ...}`.
    #[serde(default)]
    pub bad_params: Option<Map<String, Value>>,
    /// Keys the result must have.
    #[serde(default)]
    pub expect_keys: Vec<String>,
    /// Exact expected values (floats: relative tolerance 1e-6).
    #[serde(default)]
    pub expect: Map<String, Value>,
}

/// `functions/manifest.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Functions by name.
    pub functions: BTreeMap<String, FunctionSpec>,
}

/// Why the manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Reading failed.
    #[error("reading {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Parsing failed.
    #[error("parsing {path:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
}

impl Manifest {
    /// Loads `DIR/manifest.toml`.
    pub fn load(functions_dir: &Path) -> Result<Self, ManifestError> {
        let path = functions_dir.join("manifest.toml");
        let text = fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ManifestError::Parse {
            path,
            source: Box::new(source),
        })
    }

    /// Names in the paper's order, then any others alphabetically.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = medes_trace::PAPER_FUNCTIONS
            .iter()
            .filter(|n| self.functions.contains_key(**n))
            .map(|s| s.to_string())
            .collect();
        out.extend(
            self.functions
                .keys()
                .filter(|k| !out.contains(k))
                .cloned()
                .collect::<Vec<_>>(),
        );
        out
    }
}

/// Deep equality with a relative tolerance of 1e-6 on numbers (the Python test's rule).
pub fn same(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()) + 1e-9,
            _ => a == b,
        },
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        _ => want == got,
    }
}

/// Problems with a result under the manifest's check (empty when it passes).
pub fn check_result(spec: &FunctionSpec, result: &Value) -> Vec<String> {
    let Some(obj) = result.as_object() else {
        return vec![format!("result is not an object: {result}")];
    };
    if let Some(e) = obj.get("error") {
        return vec![format!("returned error: {e}")];
    }
    let mut problems: Vec<String> = spec
        .expect_keys
        .iter()
        .filter(|k| !obj.contains_key(*k))
        .map(|k| format!("missing key {k:?}"))
        .collect();
    for (k, want) in &spec.expect {
        let got = obj.get(k).unwrap_or(&Value::Null);
        if !same(want, got) {
            problems.push(format!("{k}: expected {want}, got {got}"));
        }
    }
    problems
}

/// Why an action could not be packaged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// Reading the directory or a file failed.
    #[error("reading {path:?}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The directory has no `__main__.py`.
    #[error("{0:?} has no __main__.py")]
    NoMain(PathBuf),
    /// Zipping failed.
    #[error("zipping {path:?}")]
    Zip {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: zip::result::ZipError,
    },
}

fn files_under(
    dir: &Path,
    base: &Path,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), PackageError> {
    let rd = fs::read_dir(dir).map_err(|source| PackageError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "__pycache__" || name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            files_under(&p, base, out)?;
        } else {
            let rel = p
                .strip_prefix(base)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            out.push((rel, p));
        }
    }
    Ok(())
}

/// The `PUT` body for one function: plain source if its directory holds only `__main__.py`,
/// else a base64 zip of the directory (`binary: true`); limits from the manifest.
pub fn action_spec(
    functions_dir: &Path,
    name: &str,
    spec: &FunctionSpec,
) -> Result<ActionSpec, PackageError> {
    let dir = functions_dir.join(spec.file.as_deref().unwrap_or(name));
    let mut files = Vec::new();
    files_under(&dir, &dir, &mut files)?;
    if !files.iter().any(|(rel, _)| rel == "__main__.py") {
        return Err(PackageError::NoMain(dir));
    }
    let read = |p: &PathBuf| {
        fs::read(p).map_err(|source| PackageError::Read {
            path: p.clone(),
            source,
        })
    };
    let (code, binary) = if files.len() == 1 {
        (
            String::from_utf8_lossy(&read(&files[0].1)?).into_owned(),
            false,
        )
    } else {
        let mut buf = io::Cursor::new(Vec::new());
        {
            let mut zw = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            for (rel, p) in &files {
                let zerr = |source| PackageError::Zip {
                    path: dir.clone(),
                    source,
                };
                zw.start_file(rel.as_str(), opts).map_err(zerr)?;
                zw.write_all(&read(p)?).map_err(|e| zerr(e.into()))?;
            }
            zw.finish().map_err(|source| PackageError::Zip {
                path: dir.clone(),
                source,
            })?;
        }
        (base64(&buf.into_inner()), true)
    };
    Ok(ActionSpec {
        exec: ExecSpec {
            kind: "python:3".into(),
            code,
            binary,
            main: None,
        },
        limits: LimitsSpec {
            timeout: spec.timeout_ms,
            memory: spec.memory_mb,
        },
        parameters: Vec::new(),
        annotations: Vec::new(),
    })
}

/// Why one function could not be deployed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// Packaging failed.
    #[error("packaging")]
    Package(#[from] PackageError),
    /// The API refused it.
    #[error("put action")]
    Put(#[from] RequestError),
}

/// The outcome of deploying one function.
#[derive(Debug)]
pub struct DeployReport {
    /// Name.
    pub name: String,
    /// Whether the code went as a zip.
    pub binary: bool,
    /// Version string the API returned, or the error.
    pub result: Result<String, DeployError>,
}

/// Deploys the named functions (all if `names` is empty), sequentially.
pub async fn deploy(
    client: &Client,
    functions_dir: &Path,
    manifest: &Manifest,
    names: &[String],
) -> Vec<DeployReport> {
    let mut out = Vec::new();
    for name in select(manifest, names) {
        let spec = &manifest.functions[&name];
        let (binary, result) = match action_spec(functions_dir, &name, spec) {
            Err(e) => (false, Err(e.into())),
            Ok(a) => {
                let binary = a.exec.binary;
                let r = client
                    .put_action(&name, &a)
                    .await
                    .map_err(DeployError::from)
                    .map(|v| {
                        v.get("version")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    });
                (binary, r)
            }
        };
        out.push(DeployReport {
            name,
            binary,
            result,
        });
    }
    out
}

fn select(manifest: &Manifest, names: &[String]) -> Vec<String> {
    if names.is_empty() {
        manifest.names()
    } else {
        names.to_vec()
    }
}

/// `run` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Invocations per function, sequential (the first after a deploy is cold). Default 3.
    pub invocations: u32,
    /// Also check that `bad_params` yields an error. Default true.
    pub check_bad_params: bool,
    /// Where to find the sandboxes' memory cgroups when the platform runs on this machine
    /// (see [`crate::footprint`]); `None` skips the measurement. Default `None`.
    pub cgroup_dir: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            invocations: 3,
            check_bad_params: true,
            cgroup_dir: None,
        }
    }
}

/// One invocation of `run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallReport {
    /// Start kind from the activation (`cold`, `warm`, ...), or `-` on failure.
    pub start_kind: String,
    /// Client-side latency, ms.
    pub client_ms: f64,
    /// The activation's duration, ms.
    pub duration_ms: Option<u64>,
    /// `initTime`, ms.
    pub init_ms: Option<f64>,
    /// `waitTime`, ms.
    pub wait_ms: Option<f64>,
    /// Check failures (empty = pass).
    pub problems: Vec<String>,
}

/// The result of running one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Name.
    pub name: String,
    /// The calls with default params.
    pub calls: Vec<CallReport>,
    /// Outcome of the bad-params call (`None` if not checked); `Some(true)` = rejected as expected.
    pub bad_params_rejected: Option<bool>,
    /// Paper's exec time, ms.
    pub paper_ms: Option<f64>,
    /// Paper's memory, MB.
    pub paper_mb: Option<f64>,
    /// The warm sandbox's memory right after the calls (host-side; `None` if not measured).
    pub footprint: Option<SandboxFootprint>,
}

impl RunReport {
    /// Whether every call passed.
    pub fn passed(&self) -> bool {
        !self.calls.is_empty()
            && self.calls.iter().all(|c| c.problems.is_empty())
            && self.bad_params_rejected != Some(false)
    }
}

/// Invokes `name` once (blocking) with `params` and checks the result against `spec`; a failed
/// or unfinished call is a report with a problem, never an error.
pub async fn call(
    client: &Client,
    name: &str,
    params: &Map<String, Value>,
    spec: &FunctionSpec,
) -> CallReport {
    let t0 = Instant::now();
    let r = client.invoke(name, params, true).await;
    let client_ms = t0.elapsed().as_secs_f64() * 1e3;
    match r {
        Ok(Invoked::Completed { record, .. }) => CallReport {
            start_kind: record.start_kind(),
            client_ms,
            duration_ms: record.duration,
            init_ms: record.init_time_ms(),
            wait_ms: record.wait_time_ms(),
            problems: check_result(spec, &record.response.result),
        },
        Ok(Invoked::Accepted { activation_id }) => CallReport {
            start_kind: "-".into(),
            client_ms,
            duration_ms: None,
            init_ms: None,
            wait_ms: None,
            problems: vec![format!(
                "blocking call not finished in time (activation {activation_id})"
            )],
        },
        Err(e) => CallReport {
            start_kind: "-".into(),
            client_ms,
            duration_ms: None,
            init_ms: None,
            wait_ms: None,
            problems: vec![crate::error_chain(&e)],
        },
    }
}

/// Invokes each function `opts.invocations` times with its default params and checks the results.
pub async fn run(
    client: &Client,
    manifest: &Manifest,
    names: &[String],
    opts: &RunOptions,
) -> Vec<RunReport> {
    let mut out = Vec::new();
    for name in select(manifest, names) {
        let Some(spec) = manifest.functions.get(&name) else {
            out.push(RunReport {
                name: name.clone(),
                calls: vec![CallReport {
                    start_kind: "-".into(),
                    client_ms: 0.0,
                    duration_ms: None,
                    init_ms: None,
                    wait_ms: None,
                    problems: vec![format!("{name} is not in the manifest")],
                }],
                bad_params_rejected: None,
                paper_ms: None,
                paper_mb: None,
                footprint: None,
            });
            continue;
        };
        let mut calls = Vec::new();
        for _ in 0..opts.invocations.max(1) {
            calls.push(call(client, &name, &spec.params, spec).await);
        }
        let bad_params_rejected = match (&spec.bad_params, opts.check_bad_params) {
            (Some(bad), true) => Some(match client.invoke(&name, bad, true).await {
                Ok(Invoked::Completed { record, .. }) => {
                    record.response.result.get("error").is_some()
                }
                _ => false,
            }),
            _ => None,
        };
        // The sandbox that served the calls: this action's, the one with the most processes and
        // memory if an older one is still alive.
        let footprint = opts
            .cgroup_dir
            .as_deref()
            .and_then(|d| sandbox_footprints(d).ok())
            .and_then(|fps| {
                fps.into_iter()
                    .filter(|f| f.action == name)
                    .max_by_key(|f| (f.processes, f.pss))
            });
        out.push(RunReport {
            name,
            calls,
            bad_params_rejected,
            paper_ms: spec.paper_ms,
            paper_mb: spec.paper_mb,
            footprint,
        });
    }
    out
}

/// A table of run reports: cold and warm latency next to the paper's numbers.
pub struct RunTable<'a>(pub &'a [RunReport]);

impl fmt::Display for RunTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        t.set_header([
            "function",
            "ok",
            "1st kind",
            "1st ms",
            "1st init ms",
            "warm ms (med)",
            "warm exec ms",
            "paper exec ms",
            "PSS MB",
            "RSS MB",
            "USS MB",
            "procs",
            "paper MB",
        ]);
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        for r in self.0 {
            let first = r.calls.first();
            let mut warm: Vec<&CallReport> = r
                .calls
                .iter()
                .skip(1)
                .filter(|c| c.start_kind == "warm")
                .collect();
            warm.sort_by(|a, b| a.client_ms.total_cmp(&b.client_ms));
            let med = warm.get(warm.len() / 2);
            let ok = if r.passed() {
                "yes".to_string()
            } else {
                let p: Vec<&str> = r
                    .calls
                    .iter()
                    .flat_map(|c| c.problems.iter().map(String::as_str))
                    .take(1)
                    .collect();
                format!(
                    "NO: {}",
                    p.first().copied().unwrap_or("bad params accepted")
                )
            };
            t.add_row([
                r.name.clone(),
                ok,
                first.map_or("-".into(), |c| c.start_kind.clone()),
                ms(first.map(|c| c.client_ms)),
                ms(first.and_then(|c| c.init_ms)),
                ms(med.map(|c| c.client_ms)),
                ms(med.and_then(|c| c.duration_ms.map(|d| d as f64))),
                ms(r.paper_ms),
                ms(r.footprint.as_ref().map(|f| f.pss as f64 / 1e6)),
                ms(r.footprint.as_ref().map(|f| f.rss as f64 / 1e6)),
                ms(r.footprint.as_ref().map(|f| f.private as f64 / 1e6)),
                r.footprint
                    .as_ref()
                    .map_or("-".to_string(), |f| f.processes.to_string()),
                ms(r.paper_mb),
            ]);
        }
        write!(f, "{t}")
    }
}
