//! Reply metadata and contents in ipyparallel's shape (`init_metadata` / `finish_metadata` of
//! ipyparallel's kernel), and the error kinds an rpx engine reports.
//!
//! Pure functions over JSON values; the engine loop decides which one to send.

use rpx_protocol::apply::Op;
use rpx_protocol::message::{engine_info, error_content, now_iso};
use serde_json::{json, Value};

/// Who this engine is, for `metadata.engine` and `engine_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: u64,
    pub uuid: String,
}

impl Identity {
    pub fn engine_info(&self, method: &str) -> Value {
        engine_info(self.id, &self.uuid, method)
    }

    /// The iopub topic for `kind` (`stdout`, `status`, ...): `engine.<id>.<kind>`.
    pub fn topic(&self, kind: &str) -> String {
        format!("engine.{}.{}", self.id, kind)
    }
}

/// Metadata of a reply before the handler runs, copying the broadcast fields of the request.
pub fn init_metadata(request_metadata: &Value, me: &Identity) -> Value {
    let get = |k: &str| request_metadata.get(k).cloned();
    json!({
        "started": now_iso(),
        "dependencies_met": true,
        "engine": me.uuid,
        "is_broadcast": get("is_broadcast").unwrap_or(Value::Bool(false)),
        "is_coalescing": get("is_coalescing").unwrap_or(Value::Bool(false)),
        "original_msg_id": get("original_msg_id").unwrap_or_else(|| Value::String(String::new())),
        "label": get("label").unwrap_or(Value::Null),
    })
}

/// Complete reply metadata from the reply content: `status`, and `engine_info` on errors.
pub fn finish_metadata(mut md: Value, content: &Value, me: &Identity) -> Value {
    let status = content.get("status").cloned().unwrap_or_else(|| Value::String("ok".into()));
    md["status"] = status.clone();
    if status == "error" {
        md["engine_info"] = content.get("engine_info").cloned().unwrap_or_else(|| me.engine_info(""));
    }
    md
}

/// Metadata for any message the engine sends that is not a request reply.
pub fn plain_metadata(me: &Identity) -> Value {
    json!({"engine": me.uuid})
}

/// `execute_reply` content for success.
pub fn execute_ok(execution_count: u64) -> Value {
    json!({"status": "ok", "execution_count": execution_count, "user_expressions": {}, "payload": []})
}

/// `execute_reply` content for an error.
pub fn execute_error(err: &EngineError, execution_count: u64, me: &Identity) -> Value {
    let mut c = error_content(&err.ename, &err.evalue, err.traceback.clone(), Some(me.engine_info("execute")));
    c["execution_count"] = json!(execution_count);
    c["user_expressions"] = json!({});
    c["payload"] = json!([]);
    c
}

/// iopub `error` content for an error.
pub fn iopub_error(err: &EngineError, me: &Identity, method: &str) -> Value {
    json!({
        "ename": err.ename,
        "evalue": err.evalue,
        "traceback": err.traceback,
        "engine_info": me.engine_info(method),
    })
}

/// Content of the reply to an aborted request.
pub fn aborted() -> Value {
    json!({"status": "aborted"})
}

/// Error reply content for a request the engine refuses (`method`: what was asked).
pub fn simple_error(ename: &str, evalue: &str, me: &Identity, method: &str) -> Value {
    error_content(ename, evalue, vec![format!("{ename}: {evalue}")], Some(me.engine_info(method)))
}

/// Reply content for a request type rpx engines do not handle.
pub fn unsupported(msg_type: &str, me: &Identity) -> Value {
    simple_error("UnsupportedRequest", &format!("rpx engines do not handle {msg_type}"), me, msg_type)
}

/// `kernel_info_reply` content.
pub fn kernel_info() -> Value {
    json!({
        "status": "ok",
        "protocol_version": rpx_protocol::message::PROTOCOL_VERSION,
        "implementation": "rpx",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"},
        "banner": "rpx engine (Rust)",
    })
}

/// What an `apply_request` with this content asks (its rpx payload), or the error it is
/// answered with: Python's pickled functions are not for rpx engines.
pub fn apply_op(content: &Value, me: &Identity) -> Result<Op, EngineError> {
    match Op::from_content(content) {
        None => Err(EngineError::unsupported_apply(me)),
        Some(Err(e)) => {
            Err(EngineError::new(rpx_protocol::apply::ename::UNSUPPORTED_PAYLOAD, format!("malformed rpx payload: {e}"), vec![]))
        }
        Some(Ok(op)) => Ok(op),
    }
}

/// `foo_request` -> `foo_reply`.
pub fn reply_type(request_type: &str) -> String {
    match request_type.strip_suffix("_request") {
        Some(base) => format!("{base}_reply"),
        None => format!("{request_type}_reply"),
    }
}

/// An error an rpx engine reports for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl EngineError {
    pub fn new(ename: &str, evalue: impl Into<String>, traceback: Vec<String>) -> EngineError {
        let evalue = evalue.into();
        let traceback = if traceback.is_empty() { vec![format!("{ename}: {evalue}")] } else { traceback };
        EngineError { ename: ename.to_string(), evalue, traceback }
    }

    /// A Python client sent pickled Python in an `apply_request`.
    pub fn unsupported_apply(me: &Identity) -> EngineError {
        EngineError::new(
            "UnsupportedPayload",
            format!(
                "engine {} is an rpx engine: it runs Rust cells and cannot unpickle Python functions; \
                 use execute() with Rust code, or start Python engines for apply()",
                me.id
            ),
            vec![],
        )
    }

    /// No compiler is reachable.
    pub fn no_compiler() -> EngineError {
        EngineError::new("NoCompiler", "no rpx compiler for this cluster (start the cluster with ipcluster)", vec![])
    }

    /// The compiler process went away while this cell was being compiled.
    pub fn compiler_died(detail: &str) -> EngineError {
        EngineError::new(
            "CompilerDied",
            format!("the rpx compiler went away while compiling this cell ({detail}); restart the cluster"),
            vec![],
        )
    }

    /// The worker died while running the cell.
    pub fn worker_died(me: &Identity, status: &str, stderr_tail: Vec<String>) -> EngineError {
        let evalue = format!(
            "the worker process of engine {} died ({status}) while running this cell; it was restarted \
             and all of this engine's variables were lost",
            me.id
        );
        let mut tb = stderr_tail;
        let ename = rpx_protocol::apply::ename::ENGINE_DIED;
        tb.push(format!("{ename}: {evalue}"));
        EngineError::new(ename, evalue, tb)
    }

    /// The cell or closure call (`what`) was interrupted by SIGINT: a panic injected into it
    /// unwound to its `catch_unwind`, so the engine kept its variables (a cell's new ones are
    /// dropped, as after any panic). `before_run`: it was stopped before the worker ran it.
    pub fn interrupted(what: &str, before_run: bool) -> EngineError {
        let when = if before_run { " before it ran" } else { "" };
        let evalue = format!("the {what} was interrupted (SIGINT){when}; the engine kept its variables");
        EngineError::new(rpx_protocol::apply::ename::INTERRUPTED, evalue, vec![])
    }

    /// User code panicked.
    pub fn panic(message: &str, lines: Vec<String>) -> EngineError {
        let evalue = if message.is_empty() { "the cell panicked".to_string() } else { message.to_string() };
        EngineError::new("Panic", evalue, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Identity {
        Identity { id: 3, uuid: "u-3".into() }
    }

    #[test]
    fn metadata_copies_broadcast_fields_and_marks_errors() {
        let md = init_metadata(&json!({"is_broadcast": true, "original_msg_id": "m1"}), &me());
        assert_eq!(md["engine"], "u-3");
        assert_eq!(md["dependencies_met"], true);
        assert_eq!(md["is_broadcast"], true);
        assert_eq!(md["original_msg_id"], "m1");
        assert_eq!(md["is_coalescing"], false);
        assert!(md["started"].as_str().unwrap().ends_with('Z'));

        let ok = finish_metadata(md.clone(), &execute_ok(1), &me());
        assert_eq!(ok["status"], "ok");
        assert!(ok.get("engine_info").is_none());

        let err = EngineError::panic("boom", vec![]);
        let c = execute_error(&err, 4, &me());
        let md = finish_metadata(md, &c, &me());
        assert_eq!(md["status"], "error");
        assert_eq!(md["engine_info"], json!({"engine_id": 3, "engine_uuid": "u-3", "method": "execute"}));
    }

    #[test]
    fn error_contents() {
        let c = execute_error(&EngineError::new("CompileError", "bad", vec!["tb".into()]), 7, &me());
        assert_eq!(c["status"], "error");
        assert_eq!(c["ename"], "CompileError");
        assert_eq!(c["evalue"], "bad");
        assert_eq!(c["traceback"], json!(["tb"]));
        assert_eq!(c["execution_count"], 7);
        assert_eq!(c["engine_info"]["engine_id"], 3);
        let e = EngineError::unsupported_apply(&me());
        assert_eq!(e.ename, "UnsupportedPayload");
        assert!(e.evalue.contains("cannot unpickle Python functions"));
        assert_eq!(e.traceback, vec![format!("UnsupportedPayload: {}", e.evalue)]);
        let d = EngineError::worker_died(&me(), "signal 6 (SIGABRT)", vec!["x".into()]);
        assert!(d.evalue.contains("signal 6 (SIGABRT)") && d.evalue.contains("variables were lost"));
        assert_eq!(iopub_error(&d, &me(), "execute")["engine_info"]["method"], "execute");
        let i = EngineError::interrupted("cell", false);
        assert_eq!(
            (i.ename.as_str(), i.evalue.as_str()),
            ("KeyboardInterrupt", "the cell was interrupted (SIGINT); the engine kept its variables")
        );
        assert!(EngineError::interrupted("call", true).evalue.contains("call was interrupted (SIGINT) before it ran"));
    }

    #[test]
    fn a_request_rpx_does_not_handle_is_answered_with_unsupported_request() {
        let c = unsupported("history_request", &me());
        assert_eq!(c["status"], "error");
        assert_eq!(c["ename"], "UnsupportedRequest");
        assert_eq!(c["evalue"], "rpx engines do not handle history_request");
        assert_eq!(c["traceback"], json!(["UnsupportedRequest: rpx engines do not handle history_request"]));
        assert_eq!(c["engine_info"]["method"], "history_request");
        assert_eq!(kernel_info()["language_info"]["name"], "rust");
    }

    #[test]
    fn an_apply_request_without_an_rpx_payload_is_refused_as_python() {
        let e = apply_op(&json!({"f": "pickled"}), &me()).unwrap_err();
        assert_eq!(e, EngineError::unsupported_apply(&me()));
        let bad = apply_op(&json!({"rpx": {"op": "fly"}}), &me()).unwrap_err();
        assert_eq!(bad.ename, "UnsupportedPayload");
        assert!(bad.evalue.starts_with("malformed rpx payload: "), "{}", bad.evalue);
        let pull = Op::Pull { names: vec!["x".into()], files: false };
        assert_eq!(apply_op(&pull.to_content(), &me()), Ok(pull));
    }

    #[test]
    fn reply_types() {
        assert_eq!(reply_type("execute_request"), "execute_reply");
        assert_eq!(reply_type("apply_request"), "apply_reply");
        assert_eq!(reply_type("odd"), "odd_reply");
        assert_eq!(me().topic("stdout"), "engine.3.stdout");
    }
}
