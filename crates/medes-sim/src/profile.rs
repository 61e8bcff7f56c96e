//! Per-function cost profiles: the paper's numbers (built in) or measured on the live platform.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medes_policy::policies::FunctionCosts;
use serde::{Deserialize, Serialize};

/// What one function costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionProfile {
    /// Mean execution time, ms.
    pub exec_ms: f64,
    /// Coefficient of variation of the execution time (log-normal); 0: fixed.
    #[serde(default)]
    pub exec_cv: f64,
    /// An empirical execution-time distribution, ms: equally spaced quantiles from the 0th to
    /// the 100th percentile (at least two, non-decreasing), e.g. of a live run's warm
    /// activations. When given, execution times are drawn from it (inverse CDF, linear between
    /// quantiles) instead of from `exec_ms`/`exec_cv`; `exec_ms` stays the mean the policy sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_quantiles_ms: Vec<f64>,
    /// Cold-start latency, ms.
    pub cold_ms: f64,
    /// Warm-start latency, ms.
    pub warm_ms: f64,
    /// Dedup-start (restore) latency, ms.
    pub dedup_ms: f64,
    /// m_W: a warm sandbox, MB.
    pub warm_mb: f64,
    /// m_D: a dedup sandbox, MB.
    pub dedup_mb: f64,
    /// m_R: transient extra memory during a dedup start, MB.
    pub restore_mb: f64,
    /// Extra memory a base holds (its resident page image), MB.
    pub base_extra_mb: f64,
    /// Duration of the dedup operation (checkpoint, fingerprint, patch), ms.
    pub dedup_op_ms: f64,
    /// Memory a cold start reserves until its first invocation ends, MB, if more than m_W (the
    /// live controller admits a new sandbox with its memory limit until it is measured);
    /// 0: m_W.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_mb: f64,
    /// Template-start latency (a new sandbox restored from the function's post-init template,
    /// issue 8), ms; 0: unknown, the dedup-start latency is used ([`Self::template_start_ms`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub template_ms: f64,
    /// Memory a node holds for the function's template image, MB; 0: unknown, m_W is used.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub template_mb: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl FunctionProfile {
    /// The execution time at uniform draw `u` in [0, 1] of [`Self::exec_quantiles_ms`] (linear
    /// between quantiles); `None` without an empirical distribution.
    pub fn exec_quantile(&self, u: f64) -> Option<f64> {
        let q = &self.exec_quantiles_ms;
        if q.len() < 2 {
            return None;
        }
        let x = u.clamp(0.0, 1.0) * (q.len() - 1) as f64;
        let i = (x.floor() as usize).min(q.len() - 2);
        Some(q[i] + (q[i + 1] - q[i]) * (x - i as f64))
    }

    /// `n + 1` equally spaced quantiles (0th to 100th percentile, nearest rank) of `samples`;
    /// empty if there are none or `n` is 0.
    pub fn quantiles_of(samples: &[f64], n: usize) -> Vec<f64> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() || n == 0 {
            return Vec::new();
        }
        v.sort_by(f64::total_cmp);
        (0..=n)
            .map(|k| v[((k as f64 / n as f64) * (v.len() - 1) as f64).round() as usize])
            .collect()
    }

    /// What a cold start reserves, MB.
    pub fn start_reserve_mb(&self) -> f64 {
        self.warm_mb.max(self.start_mb)
    }

    /// Template-start latency, ms: `template_ms` if measured, else the dedup-start latency (a
    /// restore of a checkpoint, which is what the paper's emulated Catalyzer replaced cold
    /// starts with, §7.6; an upper bound, since a template restore reads one local image and
    /// patches nothing).
    pub fn template_start_ms(&self) -> f64 {
        if self.template_ms > 0.0 {
            self.template_ms
        } else {
            self.dedup_ms
        }
    }

    /// Memory of one node's template image of the function, MB (`template_mb`, else m_W: a
    /// CRIU image of the sandbox is about its resident memory).
    pub fn template_image_mb(&self) -> f64 {
        if self.template_mb > 0.0 {
            self.template_mb
        } else {
            self.warm_mb
        }
    }
}

/// A cost profile for a set of functions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Where the numbers come from.
    pub source: String,
    /// Per function, by action name.
    pub functions: BTreeMap<String, FunctionProfile>,
}

/// Why a profile could not be loaded or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// A file could not be read.
    #[error("reading {path:?}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A TOML profile is malformed.
    #[error("parsing {path:?} as a TOML profile")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A JSON file is malformed.
    #[error("parsing {path:?} as JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A value is out of range.
    #[error("function {function:?}: {field} = {value} is out of range")]
    Invalid {
        /// The function.
        function: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: f64,
    },
    /// The profile names no function.
    #[error("the profile has no functions")]
    Empty,
}

/// The paper's numbers for its ten functions (name, exec ms, m_W MB, cold ms, dedup ms,
/// saved MB). Exec time and memory: Table 2; cold and dedup start: Fig. 8 (read from the
/// figure); saved memory per dedup sandbox: Table 3. See MEDES.md §4.3, §6.1, §6.3.
const PAPER: [(&str, f64, f64, f64, f64, f64); 10] = [
    ("vanilla", 150.0, 17.0, 680.0, 115.0, 4.6),
    ("linalg", 250.0, 32.0, 835.0, 157.0, 10.5),
    ("imagepro", 1200.0, 26.4, 820.0, 173.0, 11.36),
    ("videopro", 2000.0, 48.0, 740.0, 139.0, 12.22),
    ("mapreduce", 500.0, 32.0, 670.0, 108.0, 5.10),
    ("htmlserve", 400.0, 22.3, 795.0, 153.0, 9.88),
    ("authenc", 400.0, 22.3, 730.0, 127.0, 4.79),
    ("featuregen", 1000.0, 66.0, 930.0, 288.0, 25.67),
    ("modelserve", 1000.0, 90.0, 1575.0, 490.0, 52.23),
    ("modeltrain", 3000.0, 87.5, 1235.0, 294.0, 26.33),
];

impl Profile {
    /// The paper's profile (Medes, EuroSys '22):
    /// - execution time and warm footprint m_W: Table 2 (execution was emulated with fixed
    ///   times in the prototype, so `exec_cv` = 0);
    /// - cold and dedup start latency: Fig. 8;
    /// - dedup footprint m_D = m_W − the saving per dedup sandbox of Table 3;
    /// - warm start 10 ms (the paper's 1–20 ms for an unpause, §1);
    /// - m_R = m_W (the restore path rebuilds the whole page image in memory, §4.2);
    /// - a base holds its page image: + m_W;
    /// - dedup operation 2–3.3 s (§7.7), interpolated by footprint;
    /// - template start (issue 8; the paper has none): `template_ms` = 0, i.e. the dedup-start
    ///   latency of Fig. 8 ([`FunctionProfile::template_start_ms`]); the template image m_W.
    pub fn paper() -> Profile {
        let functions = PAPER
            .iter()
            .map(|&(name, exec, mw, cold, dedup, saved)| {
                let op = 2000.0 + 1300.0 * ((mw - 17.0) / (90.0 - 17.0)).clamp(0.0, 1.0);
                (
                    name.to_string(),
                    FunctionProfile {
                        exec_ms: exec,
                        exec_cv: 0.0,
                        exec_quantiles_ms: Vec::new(),
                        cold_ms: cold,
                        warm_ms: 10.0,
                        dedup_ms: dedup,
                        warm_mb: mw,
                        dedup_mb: mw - saved,
                        restore_mb: mw,
                        base_extra_mb: mw,
                        dedup_op_ms: op.round(),
                        start_mb: 0.0,
                        template_ms: 0.0,
                        template_mb: 0.0,
                    },
                )
            })
            .collect();
        Profile {
            source: "paper: Medes (EuroSys '22) Table 2, Fig. 8, Table 3".into(),
            functions,
        }
    }

    /// Checks every value (finite, non-negative; m_D ≤ m_W; m_W > 0).
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.functions.is_empty() {
            return Err(ProfileError::Empty);
        }
        for (name, f) in &self.functions {
            let bad = |field: &'static str, value: f64| ProfileError::Invalid {
                function: name.clone(),
                field,
                value,
            };
            for (field, v) in [
                ("exec_ms", f.exec_ms),
                ("exec_cv", f.exec_cv),
                ("cold_ms", f.cold_ms),
                ("warm_ms", f.warm_ms),
                ("dedup_ms", f.dedup_ms),
                ("dedup_mb", f.dedup_mb),
                ("restore_mb", f.restore_mb),
                ("base_extra_mb", f.base_extra_mb),
                ("dedup_op_ms", f.dedup_op_ms),
                ("start_mb", f.start_mb),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(field, v));
                }
            }
            if !(f.warm_mb.is_finite() && f.warm_mb > 0.0) {
                return Err(bad("warm_mb", f.warm_mb));
            }
            if f.dedup_mb > f.warm_mb {
                return Err(bad("dedup_mb", f.dedup_mb));
            }
            let q = &f.exec_quantiles_ms;
            if q.len() == 1 {
                return Err(bad("exec_quantiles_ms", q[0]));
            }
            for (i, &v) in q.iter().enumerate() {
                if !(v.is_finite() && v >= 0.0) || (i > 0 && v < q[i - 1]) {
                    return Err(bad("exec_quantiles_ms", v));
                }
            }
        }
        Ok(())
    }

    /// Loads a TOML profile (or JSON if the file name ends in `.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Profile, ProfileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.into(),
            source,
        })?;
        let p: Profile = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|source| ProfileError::Json {
                path: path.into(),
                source,
            })?
        } else {
            toml::from_str(&text).map_err(|source| ProfileError::Toml {
                path: path.into(),
                source,
            })?
        };
        p.validate()?;
        Ok(p)
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The policy-facing costs of `names`, in order (`None` if one is missing).
    pub fn costs(&self, names: &[String]) -> Option<Vec<FunctionCosts>> {
        self.costs_for(names, false)
    }

    /// [`Profile::costs`], with the template-start latency filled in if `templates`.
    pub fn costs_for(&self, names: &[String], templates: bool) -> Option<Vec<FunctionCosts>> {
        names
            .iter()
            .map(|n| {
                self.functions.get(n).map(|f| FunctionCosts {
                    name: n.clone(),
                    exec_ms: f.exec_ms,
                    cold_ms: f.cold_ms,
                    warm_ms: f.warm_ms,
                    dedup_ms: f.dedup_ms,
                    warm_mb: f.warm_mb,
                    dedup_mb: f.dedup_mb,
                    restore_mb: f.restore_mb,
                    template_ms: templates.then(|| f.template_start_ms()),
                })
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct StartupJson {
    functions: Vec<StartupRow>,
}

#[derive(Deserialize)]
struct StartupRow {
    name: String,
    cold_ms_p50: f64,
    warm_ms_p50: f64,
    main_ms_p50: f64,
    #[serde(default)]
    dedup_ms_p50: Option<f64>,
    #[serde(default)]
    warm_mb: Option<f64>,
    #[serde(default)]
    dedup_mb: Option<f64>,
    #[serde(default)]
    template_ms_p50: Option<f64>,
    /// The restore transient measured by the agent (m_R), MB.
    #[serde(default)]
    restore_transient_mb_p50: Option<f64>,
    /// The sandbox's page image (what a base keeps resident besides its process), MB.
    #[serde(default)]
    page_image_mb: Option<f64>,
}

#[derive(Deserialize)]
struct DedupJson {
    functions: Vec<DedupRow>,
}

#[derive(Deserialize)]
struct DedupRow {
    name: String,
    image_mb: f64,
    stored_mb: f64,
    #[serde(default)]
    savings_pct: Option<f64>,
    #[serde(default)]
    dedup_ms: Option<f64>,
}

/// `medes bench startup` output behind [`Profile::measured`].
const MEASURED_STARTUP: &str = include_str!("../profiles/startup-2026-11-27.json");

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ProfileError::Json {
        path: path.into(),
        source,
    })
}

impl Profile {
    /// A measured profile from `medes bench startup --json` output and (optionally) `medes bench
    /// dedup --json` output. Values the measurements lack come from `fallback` (normally
    /// [`Profile::paper`]) for functions it knows:
    /// - exec = `main_ms_p50`; cold = `cold_ms_p50` − exec, warm = `warm_ms_p50` − exec (the
    ///   bench's figures are whole invocations at the client; the simulator adds exec);
    /// - dedup start = `dedup_ms_p50` − exec if present, else the fallback's;
    /// - m_W = `warm_mb` if present, else the dedup bench's `image_mb`, else the fallback's;
    /// - m_D = `dedup_mb` if present, else m_W × `stored_mb`/`image_mb` (the measured saving
    ///   ratio applied to m_W), else the fallback's saving ratio;
    /// - m_R = the agent-measured restore transient `restore_transient_mb_p50` if present (the
    ///   lazy restore's rebuild buffers and sparse pages files), else m_W;
    /// - base extra = `page_image_mb` if present (a base keeps its canonical pages resident
    ///   beside its running process), else m_W;
    /// - dedup op = the dedup bench's `dedup_ms` if present, else the fallback's;
    /// - template start = `template_ms_p50` (from `bench startup --template`) − exec, like the
    ///   cold start (the slower first run after a restore counts in the start); unknown: the
    ///   dedup-start latency is used; template image = m_W.
    pub fn from_bench(
        startup: &Path,
        dedup: Option<&Path>,
        fallback: &Profile,
    ) -> Result<Profile, ProfileError> {
        let s: StartupJson = read_json(startup)?;
        let d: Option<DedupJson> = dedup.map(read_json).transpose()?;
        let source = format!(
            "measured: {}{}",
            startup.display(),
            dedup.map_or(String::new(), |p| format!(" + {}", p.display()))
        );
        Self::from_rows(s, d, fallback, source)
    }

    /// The live platform's measured profile shipped with the simulator: `medes bench startup
    /// --functions suite --runs 10 --template --json` on this machine, 2026-11-27 13:21–13:24
    /// UTC, quiet (load 1.6–2.1), lazy restore on (docs/BENCHMARKS.md, "Quiet run of the lazy
    /// path"), through [`Profile::from_bench`]'s rules: m_D measured (7.7% of m_W on average),
    /// m_R the agent-measured restore transient, a base's extra memory its page image; the
    /// dedup operation's duration is the paper's (§7.7), which the bench does not measure.
    pub fn measured() -> Profile {
        let s: Result<StartupJson, _> = serde_json::from_str(MEASURED_STARTUP);
        match s {
            Ok(s) => Self::from_rows(
                s,
                None,
                &Profile::paper(),
                "measured: medes bench startup --functions suite --runs 10 --template, 2026-11-27 13:21–13:24 UTC (crates/medes-sim/profiles/startup-2026-11-27.json)".into(),
            )
            .unwrap_or_else(|_| Profile::paper()),
            Err(_) => Profile::paper(),
        }
    }

    /// The paper's profile with the live platform's measured *memory ratios* (labelled
    /// "paper + platform memory"): every latency, execution time and m_W stays the paper's
    /// ([`Profile::paper`]); m_D, m_R and a base's page image are m_W × the ratio measured on the
    /// live platform for the same function ([`Profile::measured`]: dedup footprint ÷ warm PSS,
    /// 4–14%; restore transient ÷ warm PSS; page image ÷ warm PSS). It answers "what would the
    /// paper's workload save with this platform's dedup", without mixing two machines' latencies.
    pub fn platform_memory() -> Profile {
        let measured = Profile::measured();
        let mut p = Profile::paper();
        for (name, f) in &mut p.functions {
            if let Some(m) = measured.functions.get(name)
                && m.warm_mb > 0.0
            {
                let ratio = |v: f64| (v / m.warm_mb).clamp(0.0, 2.0);
                f.dedup_mb = (f.warm_mb * ratio(m.dedup_mb)).min(f.warm_mb);
                f.restore_mb = f.warm_mb * ratio(m.restore_mb);
                f.base_extra_mb = f.warm_mb * ratio(m.base_extra_mb);
            }
        }
        p.source = "paper + platform memory: the paper's profile with m_D, m_R and the base's page image scaled by the live platform's measured ratios to m_W (crates/medes-sim/profiles/startup-2026-11-27.json)".into();
        p
    }

    fn from_rows(
        s: StartupJson,
        d: Option<DedupJson>,
        fallback: &Profile,
        source: String,
    ) -> Result<Profile, ProfileError> {
        let mut functions = BTreeMap::new();
        for row in s.functions {
            let fb = fallback.functions.get(&row.name);
            let drow = d
                .as_ref()
                .and_then(|d| d.functions.iter().find(|f| f.name == row.name));
            let warm_mb = row
                .warm_mb
                .or(drow.map(|r| r.image_mb))
                .or(fb.map(|f| f.warm_mb))
                .unwrap_or(0.0);
            let ratio = drow
                .and_then(|r| {
                    if r.image_mb > 0.0 {
                        Some(r.stored_mb / r.image_mb)
                    } else {
                        r.savings_pct.map(|p| 1.0 - p / 100.0)
                    }
                })
                .or(fb.map(|f| f.dedup_mb / f.warm_mb))
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            let dedup_mb = row.dedup_mb.unwrap_or(warm_mb * ratio).min(warm_mb);
            // The bench's latencies are whole invocations seen by the client; the simulator
            // adds the execution time to a start latency, so it is taken out here.
            let exec = row.main_ms_p50.max(0.0);
            let start = |client_ms: f64| (client_ms - exec).max(0.0);
            let p = FunctionProfile {
                exec_ms: exec,
                exec_cv: 0.0,
                exec_quantiles_ms: Vec::new(),
                cold_ms: start(row.cold_ms_p50),
                warm_ms: start(row.warm_ms_p50),
                dedup_ms: row
                    .dedup_ms_p50
                    .map(start)
                    .or(fb.map(|f| f.dedup_ms))
                    .unwrap_or(start(row.cold_ms_p50)),
                warm_mb,
                dedup_mb,
                restore_mb: row
                    .restore_transient_mb_p50
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .unwrap_or(warm_mb),
                base_extra_mb: row
                    .page_image_mb
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .unwrap_or(warm_mb),
                dedup_op_ms: drow
                    .and_then(|r| r.dedup_ms)
                    .or(fb.map(|f| f.dedup_op_ms))
                    .unwrap_or(2000.0),
                start_mb: 0.0,
                // Like a cold start: the client latency minus a warm run, so the first run's
                // extra time after a restore counts in the start.
                template_ms: row
                    .template_ms_p50
                    .map(|t| start(t).max(1.0))
                    .unwrap_or(0.0),
                template_mb: 0.0,
            };
            functions.insert(row.name, p);
        }
        let profile = Profile { source, functions };
        profile.validate()?;
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_profile_is_valid_and_round_trips() {
        let p = Profile::paper();
        p.validate().unwrap();
        assert_eq!(p.functions.len(), 10);
        let m = &p.functions["modelserve"];
        assert!((m.dedup_mb - (90.0 - 52.23)).abs() < 1e-9);
        let back: Profile = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn measured_profile_from_bench_json() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("startup.json");
        let d = dir.path().join("dedup.json");
        std::fs::write(
            &s,
            r#"{"warm_overhead_ms_p50": 1, "functions": [
                {"name": "linalg", "cold_ms_p50": 900, "warm_ms_p50": 124, "main_ms_p50": 120},
                {"name": "new", "cold_ms_p50": 500, "warm_ms_p50": 3, "main_ms_p50": 10, "warm_mb": 40, "dedup_ms_p50": 90}
            ]}"#,
        )
        .unwrap();
        std::fs::write(
            &d,
            r#"{"functions": [{"name": "linalg", "image_mb": 50, "stored_mb": 10, "savings_pct": 80}]}"#,
        )
        .unwrap();
        let p = Profile::from_bench(&s, Some(&d), &Profile::paper()).unwrap();
        let l = &p.functions["linalg"];
        assert_eq!((l.exec_ms, l.cold_ms, l.warm_ms), (120.0, 780.0, 4.0));
        assert_eq!(l.warm_mb, 50.0);
        assert!((l.dedup_mb - 10.0).abs() < 1e-9);
        assert_eq!(l.dedup_ms, 157.0); // from the paper
        let n = &p.functions["new"];
        assert_eq!((n.warm_mb, n.dedup_mb, n.dedup_ms), (40.0, 40.0, 80.0));
        std::fs::write(&s, "{\"functions\": [{\"name\": 1}]}").unwrap();
        assert!(matches!(
            Profile::from_bench(&s, None, &Profile::paper()),
            Err(ProfileError::Json { .. })
        ));
    }

    #[test]
    fn shipped_measured_profile_uses_the_measured_transient_and_page_image() {
        let p = Profile::measured();
        assert!(p.source.starts_with("measured"), "{}", p.source);
        assert_eq!(p.functions.len(), 10);
        let f = &p.functions["featuregen"];
        // m_D ≈ 9% of m_W, m_R and the base's image measured (not m_W).
        assert!(f.dedup_mb < 0.15 * f.warm_mb, "{f:?}");
        assert!((f.restore_mb - 52.003).abs() < 1e-9, "{f:?}");
        assert!((f.base_extra_mb - 101.118).abs() < 1e-6, "{f:?}");
        assert!(f.exec_ms < 100.0 && f.cold_ms > 800.0, "{f:?}");
    }

    #[test]
    fn platform_memory_keeps_the_papers_latencies_and_scales_memory() {
        let (p, m, h) = (
            Profile::paper(),
            Profile::measured(),
            Profile::platform_memory(),
        );
        h.validate().unwrap();
        for (name, f) in &h.functions {
            let (pf, mf) = (&p.functions[name], &m.functions[name]);
            assert_eq!(
                (f.exec_ms, f.cold_ms, f.dedup_ms, f.warm_mb),
                (pf.exec_ms, pf.cold_ms, pf.dedup_ms, pf.warm_mb)
            );
            assert!(
                (f.dedup_mb / f.warm_mb - mf.dedup_mb / mf.warm_mb).abs() < 1e-9,
                "{name}"
            );
            assert!(
                (f.restore_mb / f.warm_mb - mf.restore_mb / mf.warm_mb).abs() < 1e-9,
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_profiles_are_rejected() {
        let mut p = Profile::paper();
        p.functions.get_mut("vanilla").unwrap().dedup_mb = 100.0;
        assert!(matches!(
            p.validate(),
            Err(ProfileError::Invalid {
                field: "dedup_mb",
                ..
            })
        ));
        let mut p = Profile::paper();
        p.functions.get_mut("vanilla").unwrap().cold_ms = f64::NAN;
        assert!(p.validate().is_err());
        assert!(matches!(
            Profile {
                source: String::new(),
                functions: BTreeMap::new()
            }
            .validate(),
            Err(ProfileError::Empty)
        ));
    }
}
