//! Conversions between medes-agent's protocol types and the wire messages of `medes.node.v1`.
//!
//! Encoding never fails; decoding fails with [`DecodeError`] on a message that misses a
//! required field, carries an unknown enum value or malformed JSON.

use std::collections::BTreeMap;

use medes_agent as ag;
use medes_core::{ActionName, Bytes, Code, Namespace, NodeId, SandboxId};

use crate::pb;

/// A wire message that does not decode into medes-agent's types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A required field (a message or a `oneof`) is absent.
    #[error("message {message} lacks field {field}")]
    Missing {
        /// The message.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An enum field holds a value this version does not know.
    #[error("field {field} holds unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The value.
        value: i32,
    },
    /// A JSON-carrying field does not parse (or is not of the expected shape).
    #[error("field {field} is not valid JSON: {reason}")]
    Json {
        /// The field.
        field: &'static str,
        /// The parser's message.
        reason: String,
    },
}

fn missing(message: &'static str, field: &'static str) -> DecodeError {
    DecodeError::Missing { message, field }
}

// ---- small pieces ----

fn action_to(a: &ActionName) -> pb::ActionName {
    pb::ActionName {
        namespace: a.namespace.0.clone(),
        name: a.name.clone(),
    }
}

fn action_from(
    a: Option<pb::ActionName>,
    message: &'static str,
) -> Result<ActionName, DecodeError> {
    let a = a.ok_or(missing(message, "action"))?;
    Ok(ActionName {
        namespace: Namespace(a.namespace),
        name: a.name,
    })
}

fn env_to(env: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    env.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn env_from(env: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    env.into_iter().collect()
}

fn stream_to(s: ag::Stream) -> i32 {
    match s {
        ag::Stream::Stdout => pb::Stream::Stdout as i32,
        ag::Stream::Stderr => pb::Stream::Stderr as i32,
    }
}

fn stream_from(v: i32) -> Result<ag::Stream, DecodeError> {
    match pb::Stream::try_from(v) {
        Ok(pb::Stream::Stdout) => Ok(ag::Stream::Stdout),
        Ok(pb::Stream::Stderr) => Ok(ag::Stream::Stderr),
        _ => Err(DecodeError::UnknownEnum {
            field: "LogLine.stream",
            value: v,
        }),
    }
}

fn logs_to(logs: &[ag::LogLine]) -> Vec<pb::LogLine> {
    logs.iter()
        .map(|(at, s, text)| pb::LogLine {
            at_ms: *at,
            stream: stream_to(*s),
            text: text.clone(),
        })
        .collect()
}

fn logs_from(logs: Vec<pb::LogLine>) -> Result<Vec<ag::LogLine>, DecodeError> {
    logs.into_iter()
        .map(|l| Ok((l.at_ms, stream_from(l.stream)?, l.text)))
        .collect()
}

fn form_to(f: ag::SandboxForm) -> i32 {
    match f {
        ag::SandboxForm::Warm => pb::SandboxForm::Warm as i32,
        ag::SandboxForm::Dedup => pb::SandboxForm::Dedup as i32,
        ag::SandboxForm::Base => pb::SandboxForm::Base as i32,
    }
}

fn form_from(v: i32, field: &'static str) -> Result<ag::SandboxForm, DecodeError> {
    match pb::SandboxForm::try_from(v) {
        Ok(pb::SandboxForm::Warm) => Ok(ag::SandboxForm::Warm),
        Ok(pb::SandboxForm::Dedup) => Ok(ag::SandboxForm::Dedup),
        Ok(pb::SandboxForm::Base) => Ok(ag::SandboxForm::Base),
        _ => Err(DecodeError::UnknownEnum { field, value: v }),
    }
}

fn sb(id: &SandboxId) -> pb::SandboxRef {
    pb::SandboxRef {
        sandbox: id.0.clone(),
    }
}

fn json_err(field: &'static str, e: serde_json::Error) -> DecodeError {
    DecodeError::Json {
        field,
        reason: e.to_string(),
    }
}

// ---- commands ----

/// A command as a wire message.
pub fn command_to_pb(cmd: &ag::Command) -> pb::Command {
    use pb::command::Command as C;
    let c = match cmd {
        ag::Command::Spawn(s) => C::Spawn(pb::SpawnCommand {
            sandbox: s.sandbox.0.clone(),
            action: Some(action_to(&s.action)),
            version: s.version.clone(),
            code: Some(pb::Code {
                code: Some(match &s.code {
                    Code::Source(t) => pb::code::Code::Source(t.clone()),
                    Code::Zip(z) => pb::code::Code::Zip(z.clone()),
                }),
            }),
            main: s.main.clone(),
            memory_limit: s.memory_limit.0,
            env: env_to(&s.env),
            init_timeout_ms: s.init_timeout_ms,
        }),
        ag::Command::Run(r) => C::Run(pb::RunCommand {
            sandbox: r.sandbox.0.clone(),
            // A map of JSON values always serialises.
            params_json: serde_json::to_string(&r.params).unwrap_or_else(|_| "{}".into()),
            env: env_to(&r.env),
            timeout_ms: r.timeout_ms,
        }),
        ag::Command::Purge { sandbox } => C::Purge(sb(sandbox)),
        ag::Command::Status => C::Status(pb::Empty {}),
        ag::Command::MakeBase { sandbox } => C::MakeBase(sb(sandbox)),
        ag::Command::Dedup { sandbox } => C::Dedup(sb(sandbox)),
        ag::Command::Restore { sandbox } => C::Restore(sb(sandbox)),
        ag::Command::MakeTemplate { sandbox } => C::MakeTemplate(sb(sandbox)),
        ag::Command::ReleaseBase { sandbox } => C::ReleaseBase(sb(sandbox)),
        ag::Command::TemplateStart(t) => C::TemplateStart(pb::TemplateStartCommand {
            sandbox: t.sandbox.0.clone(),
            action: Some(action_to(&t.action)),
            version: t.version.clone(),
            memory_limit: t.memory_limit.0,
            env: env_to(&t.env),
        }),
    };
    pb::Command { command: Some(c) }
}

/// A wire message as a command.
pub fn command_from_pb(cmd: pb::Command) -> Result<ag::Command, DecodeError> {
    use pb::command::Command as C;
    let id = |r: pb::SandboxRef| SandboxId(r.sandbox);
    Ok(match cmd.command.ok_or(missing("Command", "command"))? {
        C::Spawn(s) => ag::Command::Spawn(ag::SpawnCommand {
            sandbox: SandboxId(s.sandbox),
            action: action_from(s.action, "SpawnCommand")?,
            version: s.version,
            code: match s.code.and_then(|c| c.code) {
                Some(pb::code::Code::Source(t)) => Code::Source(t),
                Some(pb::code::Code::Zip(z)) => Code::Zip(z),
                None => return Err(missing("SpawnCommand", "code")),
            },
            main: s.main,
            memory_limit: Bytes(s.memory_limit),
            env: env_from(s.env),
            init_timeout_ms: s.init_timeout_ms,
        }),
        C::Run(r) => ag::Command::Run(ag::RunCommand {
            sandbox: SandboxId(r.sandbox),
            params: serde_json::from_str(&r.params_json)
                .map_err(|e| json_err("RunCommand.params_json", e))?,
            env: env_from(r.env),
            timeout_ms: r.timeout_ms,
        }),
        C::Purge(r) => ag::Command::Purge { sandbox: id(r) },
        C::Status(_) => ag::Command::Status,
        C::MakeBase(r) => ag::Command::MakeBase { sandbox: id(r) },
        C::Dedup(r) => ag::Command::Dedup { sandbox: id(r) },
        C::Restore(r) => ag::Command::Restore { sandbox: id(r) },
        C::MakeTemplate(r) => ag::Command::MakeTemplate { sandbox: id(r) },
        C::ReleaseBase(r) => ag::Command::ReleaseBase { sandbox: id(r) },
        C::TemplateStart(t) => ag::Command::TemplateStart(ag::TemplateStartCommand {
            sandbox: SandboxId(t.sandbox),
            action: action_from(t.action, "TemplateStartCommand")?,
            version: t.version,
            memory_limit: Bytes(t.memory_limit),
            env: env_from(t.env),
        }),
    })
}

// ---- replies ----

fn outcome_to(o: &ag::RunOutcome) -> pb::RunOutcome {
    use pb::run_outcome::Outcome as O;
    let o = match o {
        // A `serde_json::Value` always serialises.
        ag::RunOutcome::Returned(v) => O::ReturnedJson(v.to_string()),
        ag::RunOutcome::ActionError(m) => O::ActionError(m.clone()),
        ag::RunOutcome::Timeout { limit_ms } => O::TimeoutLimitMs(*limit_ms),
        ag::RunOutcome::OutOfMemory { limit } => O::OutOfMemoryLimit(limit.0),
        ag::RunOutcome::Crashed(m) => O::Crashed(m.clone()),
        ag::RunOutcome::Protocol(m) => O::Protocol(m.clone()),
    };
    pb::RunOutcome { outcome: Some(o) }
}

fn outcome_from(o: Option<pb::RunOutcome>) -> Result<ag::RunOutcome, DecodeError> {
    use pb::run_outcome::Outcome as O;
    Ok(
        match o
            .and_then(|o| o.outcome)
            .ok_or(missing("RunReply", "outcome"))?
        {
            O::ReturnedJson(j) => ag::RunOutcome::Returned(
                serde_json::from_str(&j).map_err(|e| json_err("RunOutcome.returned_json", e))?,
            ),
            O::ActionError(m) => ag::RunOutcome::ActionError(m),
            O::TimeoutLimitMs(limit_ms) => ag::RunOutcome::Timeout { limit_ms },
            O::OutOfMemoryLimit(l) => ag::RunOutcome::OutOfMemory { limit: Bytes(l) },
            O::Crashed(m) => ag::RunOutcome::Crashed(m),
            O::Protocol(m) => ag::RunOutcome::Protocol(m),
        },
    )
}

/// A node status as a wire message.
pub fn status_to_pb(s: &ag::NodeStatus) -> pb::NodeStatus {
    pb::NodeStatus {
        node: s.node.0.clone(),
        sandboxes: s
            .sandboxes
            .iter()
            .map(|x| pb::SandboxStatus {
                id: x.id.0.clone(),
                alive: x.alive,
                memory: x.memory.map(|m| pb::SandboxMemory {
                    pss: m.pss.0,
                    rss: m.rss.0,
                    cgroup_usage: m.cgroup_usage.0,
                }),
                form: form_to(x.form),
                held_bytes: x.held_bytes,
                action: x.action.as_ref().map(action_to),
                version: x.version.clone(),
                domain: x.domain.clone(),
                memory_limit: x.memory_limit.map(|b| b.0),
                image_bytes: x.image_bytes,
            })
            .collect(),
        restore_transient: s
            .restore_transient
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        templates: s
            .templates
            .iter()
            .map(|t| pb::TemplateStatus {
                action: Some(action_to(&t.action)),
                version: t.version.clone(),
                state: t.state.clone(),
                held_bytes: t.held_bytes,
                image_bytes: t.image_bytes,
                reason: t.reason.clone(),
                domain: t.domain.clone(),
            })
            .collect(),
    }
}

/// A wire message as a node status.
pub fn status_from_pb(s: pb::NodeStatus) -> Result<ag::NodeStatus, DecodeError> {
    let sandboxes = s
        .sandboxes
        .into_iter()
        .map(|x| {
            Ok(ag::SandboxStatus {
                id: SandboxId(x.id),
                alive: x.alive,
                memory: x.memory.map(|m| ag::SandboxMemory {
                    pss: Bytes(m.pss),
                    rss: Bytes(m.rss),
                    cgroup_usage: Bytes(m.cgroup_usage),
                }),
                form: form_from(x.form, "SandboxStatus.form")?,
                held_bytes: x.held_bytes,
                action: x.action.map(|a| ActionName {
                    namespace: Namespace(a.namespace),
                    name: a.name,
                }),
                version: x.version,
                domain: x.domain,
                memory_limit: x.memory_limit.map(Bytes),
                image_bytes: x.image_bytes,
            })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let templates = s
        .templates
        .into_iter()
        .map(|t| {
            Ok(ag::TemplateStatus {
                action: action_from(t.action, "TemplateStatus")?,
                version: t.version,
                state: t.state,
                held_bytes: t.held_bytes,
                image_bytes: t.image_bytes,
                reason: t.reason,
                domain: t.domain,
            })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    Ok(ag::NodeStatus {
        node: NodeId(s.node),
        sandboxes,
        restore_transient: s.restore_transient.into_iter().collect(),
        templates,
    })
}

/// A reply as a wire message.
pub fn reply_to_pb(r: &ag::Reply) -> pb::Reply {
    use pb::reply::Reply as R;
    let r = match r {
        ag::Reply::Spawned(s) => R::Spawned(pb::SpawnReply {
            init_error: s.init_error.clone(),
            start_ms: s.start_ms,
            init_ms: s.init_ms,
            logs: logs_to(&s.logs),
        }),
        ag::Reply::Ran(r) => R::Ran(pb::RunReply {
            outcome: Some(outcome_to(&r.outcome)),
            logs: logs_to(&r.logs),
            main_ms: r.main_ms,
        }),
        ag::Reply::Purged => R::Purged(pb::Empty {}),
        ag::Reply::Status(s) => R::Status(status_to_pb(s)),
        ag::Reply::BaseReady(b) => R::BaseReady(pb::BaseReply {
            image_bytes: b.image_bytes,
            pages: b.pages,
            checkpoint_ms: b.checkpoint_ms,
            register_ms: b.register_ms,
        }),
        ag::Reply::Deduped(d) => R::Deduped(pb::DedupReply {
            image_bytes: d.image_bytes,
            stored_bytes: d.stored_bytes,
            checkpoint_ms: d.checkpoint_ms,
            dedup_ms: d.dedup_ms,
            pages: d.pages,
            reused_previous: d.reused_previous,
        }),
        ag::Reply::Restored(x) => R::Restored(pb::RestoreReply {
            read_base_ms: x.read_base_ms,
            rebuild_ms: x.rebuild_ms,
            restore_ms: x.restore_ms,
            total_ms: x.total_ms,
            transient_bytes: x.transient_bytes,
            transient_images_bytes: x.transient_images_bytes,
            transient_criu_bytes: x.transient_criu_bytes,
        }),
        ag::Reply::TemplateReady(t) => R::TemplateReady(pb::TemplateReply {
            image_bytes: t.image_bytes,
            held_bytes: t.held_bytes,
            checkpoint_ms: t.checkpoint_ms,
            checksum_ms: t.checksum_ms,
            existed: t.existed,
        }),
        ag::Reply::TemplateStarted(t) => R::TemplateStarted(pb::TemplateStartReply {
            verify_ms: t.verify_ms,
            restore_ms: t.restore_ms,
            total_ms: t.total_ms,
        }),
    };
    pb::Reply { reply: Some(r) }
}

/// A wire message as a reply.
pub fn reply_from_pb(r: pb::Reply) -> Result<ag::Reply, DecodeError> {
    use pb::reply::Reply as R;
    Ok(match r.reply.ok_or(missing("Reply", "reply"))? {
        R::Spawned(s) => ag::Reply::Spawned(ag::SpawnReply {
            init_error: s.init_error,
            start_ms: s.start_ms,
            init_ms: s.init_ms,
            logs: logs_from(s.logs)?,
        }),
        R::Ran(r) => ag::Reply::Ran(ag::RunReply {
            outcome: outcome_from(r.outcome)?,
            logs: logs_from(r.logs)?,
            main_ms: r.main_ms,
        }),
        R::Purged(_) => ag::Reply::Purged,
        R::Status(s) => ag::Reply::Status(status_from_pb(s)?),
        R::BaseReady(b) => ag::Reply::BaseReady(ag::BaseReply {
            image_bytes: b.image_bytes,
            pages: b.pages,
            checkpoint_ms: b.checkpoint_ms,
            register_ms: b.register_ms,
        }),
        R::Deduped(d) => ag::Reply::Deduped(ag::DedupReply {
            image_bytes: d.image_bytes,
            stored_bytes: d.stored_bytes,
            checkpoint_ms: d.checkpoint_ms,
            dedup_ms: d.dedup_ms,
            pages: d.pages,
            reused_previous: d.reused_previous,
        }),
        R::Restored(x) => ag::Reply::Restored(ag::RestoreReply {
            read_base_ms: x.read_base_ms,
            rebuild_ms: x.rebuild_ms,
            restore_ms: x.restore_ms,
            total_ms: x.total_ms,
            transient_bytes: x.transient_bytes,
            transient_images_bytes: x.transient_images_bytes,
            transient_criu_bytes: x.transient_criu_bytes,
        }),
        R::TemplateReady(t) => ag::Reply::TemplateReady(ag::TemplateReply {
            image_bytes: t.image_bytes,
            held_bytes: t.held_bytes,
            checkpoint_ms: t.checkpoint_ms,
            checksum_ms: t.checksum_ms,
            existed: t.existed,
        }),
        R::TemplateStarted(t) => ag::Reply::TemplateStarted(ag::TemplateStartReply {
            verify_ms: t.verify_ms,
            restore_ms: t.restore_ms,
            total_ms: t.total_ms,
        }),
    })
}

// ---- errors ----

fn reason(sandbox: &SandboxId, reason: &str) -> pb::SandboxReason {
    pb::SandboxReason {
        sandbox: sandbox.0.clone(),
        reason: reason.to_string(),
        restore_kind: pb::RestoreFailure::Other as i32,
    }
}

fn checkpoint_failure_to(k: ag::CheckpointFailure) -> pb::CheckpointFailure {
    use ag::CheckpointFailure as K;
    use pb::CheckpointFailure as P;
    match k {
        K::TcpSocket => P::TcpSocket,
        K::Criu => P::Criu,
        K::Timeout => P::Timeout,
        K::NotRunning => P::NotRunning,
        K::Image => P::Image,
        K::Other => P::Other,
    }
}

/// Unknown values (a newer peer) read as `Other`.
fn checkpoint_failure_from(v: i32) -> ag::CheckpointFailure {
    use ag::CheckpointFailure as K;
    use pb::CheckpointFailure as P;
    match P::try_from(v).unwrap_or(P::Other) {
        P::TcpSocket => K::TcpSocket,
        P::Criu => K::Criu,
        P::Timeout => K::Timeout,
        P::NotRunning => K::NotRunning,
        P::Image => K::Image,
        P::Other => K::Other,
    }
}

fn restore_failure_to(k: ag::RestoreFailure) -> pb::RestoreFailure {
    use ag::RestoreFailure as K;
    use pb::RestoreFailure as P;
    match k {
        K::MissingBase => P::MissingBase,
        K::RemoteBase => P::RemoteBase,
        K::Corrupt => P::Corrupt,
        K::Criu => P::Criu,
        K::Timeout => P::Timeout,
        K::Other => P::Other,
    }
}

/// Unknown values (a newer peer) read as `Other`.
fn restore_failure_from(v: i32) -> ag::RestoreFailure {
    use ag::RestoreFailure as K;
    use pb::RestoreFailure as P;
    match P::try_from(v).unwrap_or(P::Other) {
        P::MissingBase => K::MissingBase,
        P::RemoteBase => K::RemoteBase,
        P::Corrupt => K::Corrupt,
        P::Criu => K::Criu,
        P::Timeout => K::Timeout,
        P::Other => K::Other,
    }
}

/// An agent error as a wire message.
pub fn error_to_pb(e: &ag::AgentError) -> pb::AgentError {
    use ag::AgentError as A;
    use pb::agent_error::Error as E;
    let e = match e {
        A::UnknownSandbox(s) => E::UnknownSandbox(s.0.clone()),
        A::BadSandboxId(s) => E::BadSandboxId(s.0.clone()),
        A::Code { action, reason } => E::Code(pb::CodeError {
            action: Some(action_to(action)),
            reason: reason.clone(),
        }),
        A::Start { sandbox, reason: r } => E::Start(reason(sandbox, r)),
        A::NotDeduplicable {
            sandbox,
            reason,
            sandbox_alive,
            kind,
        } => E::NotDeduplicable(pb::NotDeduplicable {
            sandbox: sandbox.0.clone(),
            reason: reason.clone(),
            sandbox_alive: *sandbox_alive,
            kind: checkpoint_failure_to(*kind) as i32,
        }),
        A::RestoreFailed {
            sandbox,
            reason: r,
            kind,
        } => E::RestoreFailed(pb::SandboxReason {
            restore_kind: restore_failure_to(*kind) as i32,
            ..reason(sandbox, r)
        }),
        A::BaseInUse {
            sandbox,
            dependents,
        } => E::BaseInUse(pb::BaseInUse {
            sandbox: sandbox.0.clone(),
            dependents: *dependents,
        }),
        A::WrongForm {
            sandbox,
            form,
            reason,
        } => E::WrongForm(pb::WrongForm {
            sandbox: sandbox.0.clone(),
            form: form_to(*form),
            reason: reason.clone(),
        }),
        A::TemplateUnavailable {
            action,
            version,
            reason,
        } => E::TemplateUnavailable(pb::TemplateUnavailable {
            action: Some(action_to(action)),
            version: version.clone(),
            reason: reason.clone(),
        }),
        A::TemplateStartFailed {
            sandbox,
            reason,
            disabled,
        } => E::TemplateStartFailed(pb::TemplateStartFailed {
            sandbox: sandbox.0.clone(),
            reason: reason.clone(),
            disabled: *disabled,
        }),
        A::ShuttingDown => E::ShuttingDown(pb::Empty {}),
        A::Unavailable(m) => E::Unavailable(m.clone()),
        // Made on the caller's side of a transport; relayed as unavailable.
        A::NotDelivered(m) => E::Unavailable(m.clone()),
    };
    pb::AgentError { error: Some(e) }
}

/// A wire message as an agent error.
pub fn error_from_pb(e: pb::AgentError) -> Result<ag::AgentError, DecodeError> {
    use ag::AgentError as A;
    use pb::agent_error::Error as E;
    Ok(match e.error.ok_or(missing("AgentError", "error"))? {
        E::UnknownSandbox(s) => A::UnknownSandbox(SandboxId(s)),
        E::BadSandboxId(s) => A::BadSandboxId(SandboxId(s)),
        E::Code(c) => A::Code {
            action: action_from(c.action, "CodeError")?,
            reason: c.reason,
        },
        E::Start(r) => A::Start {
            sandbox: SandboxId(r.sandbox),
            reason: r.reason,
        },
        E::NotDeduplicable(n) => A::NotDeduplicable {
            sandbox: SandboxId(n.sandbox),
            reason: n.reason,
            sandbox_alive: n.sandbox_alive,
            kind: checkpoint_failure_from(n.kind),
        },
        E::RestoreFailed(r) => A::RestoreFailed {
            sandbox: SandboxId(r.sandbox),
            reason: r.reason,
            kind: restore_failure_from(r.restore_kind),
        },
        E::BaseInUse(b) => A::BaseInUse {
            sandbox: SandboxId(b.sandbox),
            dependents: b.dependents,
        },
        E::WrongForm(w) => A::WrongForm {
            sandbox: SandboxId(w.sandbox),
            form: form_from(w.form, "WrongForm.form")?,
            reason: w.reason,
        },
        E::TemplateUnavailable(t) => A::TemplateUnavailable {
            action: action_from(t.action, "TemplateUnavailable")?,
            version: t.version,
            reason: t.reason,
        },
        E::TemplateStartFailed(t) => A::TemplateStartFailed {
            sandbox: SandboxId(t.sandbox),
            reason: t.reason,
            disabled: t.disabled,
        },
        E::ShuttingDown(_) => A::ShuttingDown,
        E::Unavailable(m) => A::Unavailable(m),
    })
}

/// An agent's result as a wire message.
pub fn result_to_pb(r: &Result<ag::Reply, ag::AgentError>) -> pb::ExecuteResponse {
    use pb::execute_response::Result as R;
    pb::ExecuteResponse {
        result: Some(match r {
            Ok(reply) => R::Reply(reply_to_pb(reply)),
            Err(e) => R::Error(error_to_pb(e)),
        }),
    }
}

/// A wire message as an agent's result (the outer error: it does not decode).
#[allow(clippy::type_complexity)]
pub fn result_from_pb(
    r: pb::ExecuteResponse,
) -> Result<Result<ag::Reply, ag::AgentError>, DecodeError> {
    use pb::execute_response::Result as R;
    Ok(
        match r.result.ok_or(missing("ExecuteResponse", "result"))? {
            R::Reply(reply) => Ok(reply_from_pb(reply)?),
            R::Error(e) => Err(error_from_pb(e)?),
        },
    )
}
