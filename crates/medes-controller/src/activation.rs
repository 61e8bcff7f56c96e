//! Turning agent replies into OpenWhisk-style activation outcomes and log lines.

use std::fmt::Write as _;

use medes_agent::{LogLine, RunOutcome, Stream};
use medes_core::{ActivationStatus, UnixMillis};
use serde_json::{Map, Value};

/// `{"error": msg}`.
pub(crate) fn error_result(msg: impl Into<String>) -> Value {
    let mut m = Map::with_capacity(1);
    m.insert("error".into(), Value::String(msg.into()));
    Value::Object(m)
}

/// Message of a run that hit the action's time limit (OpenWhisk's wording).
pub(crate) fn timeout_message(limit_ms: u64) -> String {
    format!("The action exceeded its time limits of {limit_ms} milliseconds.")
}

/// Message of a run killed for exceeding its memory limit (OpenWhisk's wording).
pub(crate) const OOM_MESSAGE: &str = "The action exhausted its memory and was aborted.";

/// Message of a runtime that died without answering (OpenWhisk's wording).
pub(crate) const CRASH_MESSAGE: &str =
    "The action did not produce a valid response and exited unexpectedly.";

/// Status, result and timeout flag of a run.
pub(crate) fn classify(outcome: RunOutcome) -> (ActivationStatus, Value, bool) {
    match outcome {
        RunOutcome::Returned(Value::Object(m)) => {
            let status = if m.contains_key("error") {
                ActivationStatus::ApplicationError
            } else {
                ActivationStatus::Success
            };
            (status, Value::Object(m), false)
        }
        RunOutcome::Returned(_) => (
            ActivationStatus::DeveloperError,
            error_result("The action did not return a dictionary."),
            false,
        ),
        RunOutcome::ActionError(msg) => {
            (ActivationStatus::DeveloperError, error_result(msg), false)
        }
        RunOutcome::Timeout { limit_ms } => (
            ActivationStatus::DeveloperError,
            error_result(timeout_message(limit_ms)),
            true,
        ),
        RunOutcome::OutOfMemory { .. } => (
            ActivationStatus::DeveloperError,
            error_result(OOM_MESSAGE),
            false,
        ),
        RunOutcome::Crashed(_) => (
            ActivationStatus::DeveloperError,
            error_result(CRASH_MESSAGE),
            false,
        ),
        RunOutcome::Protocol(detail) => (
            ActivationStatus::InternalError,
            error_result(format!(
                "The action did not produce a valid response: {detail}"
            )),
            false,
        ),
    }
}

/// Formats captured lines OpenWhisk style (`2026-11-27T05:00:00.123000Z stdout: text`), keeping
/// at most `limit_bytes` of text; past the limit a final line says the logs were truncated.
pub(crate) struct LogBuilder {
    lines: Vec<String>,
    used: usize,
    limit: usize,
    truncated: bool,
}

impl LogBuilder {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        LogBuilder {
            lines: Vec::new(),
            used: 0,
            limit: limit_bytes,
            truncated: false,
        }
    }

    pub(crate) fn extend(&mut self, lines: Vec<LogLine>) {
        for (at, stream, text) in lines {
            if self.truncated {
                return;
            }
            let size = text.len();
            if self.used + size > self.limit {
                self.truncated = true;
                return;
            }
            self.used += size;
            self.lines.push(format_line(at, stream, &text));
        }
    }

    pub(crate) fn finish(mut self) -> Vec<String> {
        if self.truncated {
            self.lines.push(format!(
                "Logs were truncated because the total bytes size exceeds the limit of {} bytes.",
                self.limit
            ));
        }
        self.lines
    }
}

fn format_line(at: UnixMillis, stream: Stream, text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 40);
    write_iso8601_micros(&mut s, at);
    s.push_str(match stream {
        Stream::Stdout => " stdout: ",
        Stream::Stderr => " stderr: ",
    });
    s.push_str(text.strip_suffix('\n').unwrap_or(text));
    s
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for a Unix time in ms (proleptic Gregorian, UTC).
pub(crate) fn write_iso8601_micros(out: &mut String, unix_ms: UnixMillis) {
    let secs = unix_ms / 1000;
    let millis = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}000Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_openwhisk_style() {
        let check = |ms: u64, expect: &str| {
            let mut s = String::new();
            write_iso8601_micros(&mut s, ms);
            assert_eq!(s, expect, "{ms}");
        };
        check(0, "1970-01-01T00:00:00.000000Z");
        check(1_795_755_600_123, "2026-11-27T05:00:00.123000Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000000Z");
        check(4_102_444_799_999, "2099-12-31T23:59:59.999000Z");
    }

    #[test]
    fn logs_are_formatted_and_truncated() {
        let mut b = LogBuilder::new(10);
        b.extend(vec![
            (0, Stream::Stdout, "hello\n".into()),
            (1, Stream::Stderr, "oops".into()),
            (2, Stream::Stdout, "too much".into()),
            (3, Stream::Stdout, "x".into()),
        ]);
        assert_eq!(
            b.finish(),
            vec![
                "1970-01-01T00:00:00.000000Z stdout: hello",
                "1970-01-01T00:00:00.001000Z stderr: oops",
                "Logs were truncated because the total bytes size exceeds the limit of 10 bytes.",
            ]
        );
    }

    fn check(outcome: RunOutcome, expect: &str) {
        let (status, result, timeout) = classify(outcome);
        assert_eq!(
            format!("{} {} {}", status.as_str(), result, timeout),
            expect
        );
    }

    #[test]
    fn outcomes_map_to_openwhisk_statuses() {
        check(
            RunOutcome::Returned(json!({"a": 1})),
            r#"success {"a":1} false"#,
        );
        check(
            RunOutcome::Returned(json!({"error": "no"})),
            r#"application error {"error":"no"} false"#,
        );
        check(
            RunOutcome::Returned(json!([1])),
            r#"action developer error {"error":"The action did not return a dictionary."} false"#,
        );
        check(
            RunOutcome::ActionError("An error has occurred: boom".into()),
            r#"action developer error {"error":"An error has occurred: boom"} false"#,
        );
        check(
            RunOutcome::Timeout { limit_ms: 300 },
            r#"action developer error {"error":"The action exceeded its time limits of 300 milliseconds."} true"#,
        );
        check(
            RunOutcome::OutOfMemory {
                limit: medes_core::Bytes::mib(128),
            },
            r#"action developer error {"error":"The action exhausted its memory and was aborted."} false"#,
        );
        check(
            RunOutcome::Crashed("signal 9".into()),
            r#"action developer error {"error":"The action did not produce a valid response and exited unexpectedly."} false"#,
        );
        check(
            RunOutcome::Protocol("bad json".into()),
            r#"whisk internal error {"error":"The action did not produce a valid response: bad json"} false"#,
        );
    }
}
