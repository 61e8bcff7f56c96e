//! The OpenWhisk JSON wire format and its mapping to and from `medes_core` types.
//!
//! Nothing outside this module knows OpenWhisk's field names.

use base64::Engine as _;
use medes_core::{Action, Activation, ActivationStatus, Code, Limits};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The runtime kind every accepted kind is normalised to.
pub(crate) const PYTHON_KIND: &str = "python:3";

/// OpenWhisk's limit ranges.
pub(crate) const MEMORY_MB: (u64, u64) = (128, 2048);
pub(crate) const TIMEOUT_MS: (u64, u64) = (100, 300_000);
pub(crate) const CONCURRENCY: (u64, u64) = (1, 500);
pub(crate) const LOGS_MB: (u64, u64) = (0, 10);

/// An OpenWhisk `{key, value}` pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyValue {
    pub key: String,
    pub value: Value,
    /// OpenWhisk's `init` flag on parameters (accepted, ignored).
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    pub init: Option<bool>,
}

/// Body of `PUT .../actions/{name}`. Unknown fields are ignored, as OpenWhisk does.
#[derive(Debug, Deserialize)]
pub(crate) struct ActionPut {
    pub exec: Option<ExecPut>,
    pub parameters: Option<Vec<KeyValue>>,
    pub annotations: Option<Vec<KeyValue>>,
    pub limits: Option<LimitsPut>,
    pub publish: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ExecPut {
    pub kind: Option<String>,
    pub code: Option<String>,
    pub binary: Option<bool>,
    pub main: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LimitsPut {
    pub timeout: Option<u64>,
    pub memory: Option<u64>,
    pub logs: Option<u64>,
    pub concurrency: Option<u64>,
}

/// Why an action PUT body is invalid (all map to 400 except `CodeTooLarge`, 413).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecError {
    #[error("exec undefined")]
    Missing,
    #[error("exec kind undefined")]
    KindMissing,
    #[error("kind '{kind}' is not supported; supported kinds: {supported}")]
    UnknownKind { kind: String, supported: String },
    #[error("exec code undefined")]
    CodeMissing,
    #[error("The action code is too large: {size} bytes exceeds the allowed limit of {max} bytes")]
    CodeTooLarge { size: usize, max: usize },
    #[error("exec code is marked binary but is not valid base64: {0}")]
    Base64(#[source] base64::DecodeError),
    #[error("exec code is not a valid zip archive: {0}")]
    Zip(#[source] zip::result::ZipError),
    #[error("the zip archive does not include __main__.py")]
    NoMainPy,
    #[error("exec main '{0}' is not a valid Python identifier")]
    BadMain(String),
    #[error("{0}")]
    Limit(String),
}

/// Builds the domain exec from the wire one.
pub(crate) fn exec_from_wire(
    e: ExecPut,
    allow_kinds: &[String],
    max_code_bytes: usize,
) -> Result<medes_core::Exec, ExecError> {
    let kind = e.kind.ok_or(ExecError::KindMissing)?;
    if !allow_kinds.iter().any(|k| k == &kind) {
        return Err(ExecError::UnknownKind {
            kind,
            supported: allow_kinds.join(", "),
        });
    }
    let code = e.code.ok_or(ExecError::CodeMissing)?;
    if code.len() > max_code_bytes {
        return Err(ExecError::CodeTooLarge {
            size: code.len(),
            max: max_code_bytes,
        });
    }
    let main = e
        .main
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "main".to_owned());
    let valid_main = main
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && main.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_main {
        return Err(ExecError::BadMain(main));
    }
    let binary = match e.binary {
        Some(b) => b,
        None => looks_like_base64_zip(&code),
    };
    let code = if binary {
        let compact: String = code.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(ExecError::Base64)?;
        let mut archive =
            zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice())).map_err(ExecError::Zip)?;
        if archive.by_name("__main__.py").is_err() {
            return Err(ExecError::NoMainPy);
        }
        drop(archive);
        Code::Zip(bytes)
    } else {
        Code::Source(code)
    };
    Ok(medes_core::Exec {
        kind: PYTHON_KIND.to_owned(),
        code,
        main,
    })
}

/// OpenWhisk infers `binary` when the client leaves it out; we do when the code is base64 of
/// something that starts like a zip archive.
fn looks_like_base64_zip(code: &str) -> bool {
    let t = code.trim();
    // "UEsDB" is base64 of the zip local-file-header magic `PK\x03\x04`.
    t.len().is_multiple_of(4) && t.starts_with("UEsDB")
}

/// Applies `limits` over `base`, checking OpenWhisk's ranges.
pub(crate) fn limits_from_wire(l: Option<LimitsPut>, base: Limits) -> Result<Limits, ExecError> {
    let Some(l) = l else { return Ok(base) };
    let check = |what: &str, unit: &str, v: u64, (lo, hi): (u64, u64)| {
        if v < lo || v > hi {
            Err(ExecError::Limit(format!(
                "{what} limit {v} {unit} is out of the allowed range {lo} to {hi} {unit}"
            )))
        } else {
            Ok(v)
        }
    };
    let mut out = base;
    if let Some(t) = l.timeout {
        out.timeout_ms = check("timeout", "ms", t, TIMEOUT_MS)?;
    }
    if let Some(m) = l.memory {
        out.memory_mb = check("memory", "MB", m, MEMORY_MB)?;
    }
    if let Some(c) = l.concurrency {
        out.concurrency = check("concurrency", "activations", c, CONCURRENCY)? as u32;
    }
    if let Some(g) = l.logs {
        out.logs_kb = check("logs", "MB", g, LOGS_MB)? * 1024;
    }
    Ok(out)
}

pub(crate) fn params_from_wire(kv: Vec<KeyValue>) -> Map<String, Value> {
    kv.into_iter().map(|p| (p.key, p.value)).collect()
}

pub(crate) fn annotations_from_wire(kv: Vec<KeyValue>) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::with_capacity(kv.len());
    for p in kv {
        match out.iter_mut().find(|(k, _)| *k == p.key) {
            Some(slot) => slot.1 = p.value,
            None => out.push((p.key, p.value)),
        }
    }
    out
}

/// Sets the `exec` annotation OpenWhisk adds to every action.
pub(crate) fn with_exec_annotation(
    mut a: Vec<(String, Value)>,
    kind: &str,
) -> Vec<(String, Value)> {
    a.retain(|(k, _)| k != "exec");
    a.push(("exec".to_owned(), Value::String(kind.to_owned())));
    a
}

fn kv_list<'a>(it: impl Iterator<Item = (&'a String, &'a Value)>) -> Value {
    Value::Array(it.map(|(k, v)| json!({"key": k, "value": v})).collect())
}

pub(crate) fn limits_json(l: &Limits) -> Value {
    json!({
        "concurrency": l.concurrency,
        "logs": l.logs_kb / 1024,
        "memory": l.memory_mb,
        "timeout": l.timeout_ms,
    })
}

/// How much of the action to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActionView {
    /// Everything, including the code.
    Full,
    /// Everything but the code (`?code=false`).
    NoCode,
    /// The list form: no code, parameters or main.
    Summary,
}

/// The OpenWhisk JSON of an action.
pub(crate) fn action_json(a: &Action, view: ActionView) -> Value {
    let binary = matches!(a.exec.code, Code::Zip(_));
    let mut exec = Map::new();
    exec.insert("kind".into(), a.exec.kind.clone().into());
    exec.insert("binary".into(), binary.into());
    if view == ActionView::Full {
        let code = match &a.exec.code {
            Code::Source(s) => s.clone(),
            Code::Zip(z) => base64::engine::general_purpose::STANDARD.encode(z),
        };
        exec.insert("code".into(), code.into());
    }
    if view != ActionView::Summary {
        exec.insert("main".into(), a.exec.main.clone().into());
    }
    let annotations = kv_list(a.annotations.iter().map(|(k, v)| (k, v)));
    let mut out = Map::new();
    out.insert("namespace".into(), a.name.namespace.0.clone().into());
    out.insert("name".into(), a.name.name.clone().into());
    out.insert("version".into(), a.version.clone().into());
    out.insert("exec".into(), Value::Object(exec));
    out.insert("annotations".into(), annotations);
    if view != ActionView::Summary {
        out.insert("parameters".into(), kv_list(a.parameters.iter()));
    }
    out.insert("limits".into(), limits_json(&a.limits));
    out.insert("publish".into(), a.publish.into());
    out.insert("updated".into(), a.updated.into());
    Value::Object(out)
}

/// OpenWhisk's `response` object of an activation (also the `/result` body).
pub(crate) fn response_json(a: &Activation) -> Value {
    let s = a.response.status;
    json!({
        "status": s.as_str(),
        "statusCode": s.code(),
        "success": s == ActivationStatus::Success,
        "result": a.response.result,
    })
}

fn split_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

fn activation_annotations(a: &Activation) -> Value {
    let mut ann = vec![
        json!({"key": "path", "value": format!("{}/{}", a.action.namespace, a.action.name)}),
        json!({"key": "waitTime", "value": a.wait_time_ms}),
        json!({"key": "kind", "value": PYTHON_KIND}),
        json!({"key": "timeout", "value": a.timeout}),
        json!({"key": "limits", "value": limits_json(&a.limits)}),
    ];
    if let Some(init) = a.init_time_ms {
        ann.push(json!({"key": "initTime", "value": init}));
    }
    ann.push(json!({"key": "startKind", "value": a.start_kind.as_str()}));
    if let Some(main) = a.main_ms {
        ann.push(json!({"key": "mainTime", "value": main}));
    }
    Value::Array(ann)
}

/// The full OpenWhisk activation record.
pub(crate) fn activation_json(a: &Activation) -> Value {
    json!({
        "namespace": a.action.namespace.0,
        "name": split_name(&a.action.name),
        "version": a.version,
        "subject": a.subject,
        "activationId": a.id.0,
        "start": a.start,
        "end": a.end,
        "duration": a.duration_ms(),
        "statusCode": a.response.status.code(),
        "response": response_json(a),
        "logs": a.logs,
        "annotations": activation_annotations(a),
        "publish": false,
    })
}

/// The listing form of an activation (no response, no logs), as OpenWhisk's view returns.
pub(crate) fn activation_summary_json(a: &Activation) -> Value {
    json!({
        "namespace": a.action.namespace.0,
        "name": split_name(&a.action.name),
        "version": a.version,
        "publish": false,
        "annotations": activation_annotations(a),
        "activationId": a.id.0,
        "start": a.start,
        "end": a.end,
        "duration": a.duration_ms(),
        "statusCode": a.response.status.code(),
    })
}

/// OpenWhisk entity name rule: `\A([\w]|[\w][\w@ .-]*[\w@.-]+)\z`, at most 256 characters.
pub(crate) fn valid_entity_name(s: &str) -> bool {
    let b = s.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mid = |c: u8| word(c) || matches!(c, b'@' | b' ' | b'.' | b'-');
    let last = |c: u8| word(c) || matches!(c, b'@' | b'.' | b'-');
    match b {
        [] => false,
        _ if b.len() > 256 => false,
        [c] => word(*c),
        [first, middle @ .., end] => word(*first) && middle.iter().all(|&c| mid(c)) && last(*end),
    }
}

/// An action name: `name` or `package/name`, each part a valid entity name.
pub(crate) fn valid_action_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2 && parts.iter().all(|p| valid_entity_name(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_names_follow_openwhisk_rules() {
        for ok in [
            "a",
            "_",
            "hello",
            "Hello_World-1.0",
            "a@b",
            "my action",
            "a.",
            "x-",
        ] {
            assert!(valid_entity_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "@a",
            "a ",
            " a",
            "a/b",
            "a$b",
            "ü",
            "a\0b",
            &"a".repeat(257),
        ] {
            assert!(!valid_entity_name(bad), "{bad:?}");
        }
        assert!(valid_action_name("pkg/act"));
        assert!(!valid_action_name("a/b/c"));
        assert!(!valid_action_name("pkg/"));
    }

    #[test]
    fn limits_ranges() {
        let base = Limits::default();
        let l = |t, m, c, g| LimitsPut {
            timeout: t,
            memory: m,
            concurrency: c,
            logs: g,
        };
        assert_eq!(limits_from_wire(None, base).unwrap(), base);
        let got =
            limits_from_wire(Some(l(Some(100), Some(2048), Some(500), Some(0))), base).unwrap();
        assert_eq!(
            (got.timeout_ms, got.memory_mb, got.concurrency, got.logs_kb),
            (100, 2048, 500, 0)
        );
        for bad in [
            l(Some(99), None, None, None),
            l(Some(300_001), None, None, None),
            l(None, Some(127), None, None),
            l(None, Some(2049), None, None),
            l(None, None, Some(0), None),
            l(None, None, Some(501), None),
            l(None, None, None, Some(11)),
        ] {
            assert!(limits_from_wire(Some(bad), base).is_err());
        }
    }
}
