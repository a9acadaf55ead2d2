//! Reply metadata and contents in ipyparallel's shape (`init_metadata` / `finish_metadata` of
//! ipyparallel's kernel), and the error kinds an rpx engine reports.
//!
//! Pure functions over typed metadata and JSON contents; the engine loop decides which one to send.

use rpx_protocol::apply::Op;
use rpx_protocol::content::{EngineInfo, EngineRef, ErrorContent, ErrorName, ExecuteReply, ReplyContent, ReplyMetadata, ReplyStatus};
use rpx_protocol::message::now_iso;
use serde_json::{json, Value};

/// Who this engine is, for `metadata.engine` and `engine_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: u64,
    pub uuid: String,
}

impl Identity {
    pub fn engine_info(&self, method: &str) -> EngineInfo {
        EngineInfo::new(self.id, &self.uuid, method)
    }

    /// The iopub topic for `kind` (`stdout`, `status`, ...): `engine.<id>.<kind>`.
    pub fn topic(&self, kind: &str) -> String {
        format!("engine.{}.{}", self.id, kind)
    }
}

/// Metadata of a reply before the handler runs, copying the broadcast fields of the request.
pub fn init_metadata(request_metadata: &Value, me: &Identity) -> ReplyMetadata {
    ReplyMetadata::start(request_metadata, &me.uuid, now_iso())
}

/// Complete reply metadata from the reply content: `status`, and `engine_info` on errors.
pub fn finish_metadata(mut md: ReplyMetadata, content: &Value, me: &Identity) -> ReplyMetadata {
    let reply = ReplyContent::read(content);
    let status = reply.status.unwrap_or_default();
    md.engine_info = (status == ReplyStatus::Error).then(|| reply.engine_info.unwrap_or_else(|| me.engine_info("")));
    md.status = Some(status);
    md
}

/// Metadata for any message the engine sends that is not a request reply.
pub fn plain_metadata(me: &Identity) -> Value {
    json!({"engine": me.uuid})
}

/// `execute_reply` content for success.
pub fn execute_ok(execution_count: u64) -> Value {
    ExecuteReply::Ok { execution_count, user_expressions: Default::default() }.to_value()
}

/// `execute_reply` content for an error.
pub fn execute_error(err: &EngineError, execution_count: u64, me: &Identity) -> Value {
    ExecuteReply::Error { execution_count, error: err.clone(), engine_info: Some(me.engine_info("execute")) }.to_value()
}

/// iopub `error` content for an error.
pub fn iopub_error(err: &EngineError, me: &Identity, method: &str) -> Value {
    err.iopub(Some(&me.engine_info(method)))
}

/// Content of the reply to an aborted request.
pub fn aborted() -> Value {
    json!({"status": "aborted"})
}

/// Error reply content for a request the engine refuses (`method`: what was asked).
pub fn simple_error(ename: impl Into<ErrorName>, evalue: &str, me: &Identity, method: &str) -> Value {
    ErrorContent::new(ename, evalue, vec![]).reply(Some(&me.engine_info(method)))
}

/// Reply content for a request type rpx engines do not handle.
pub fn unsupported(msg_type: &str, me: &Identity) -> Value {
    simple_error(ErrorName::UnsupportedRequest, &format!("rpx engines do not handle {msg_type}"), me, msg_type)
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
        Some(Err(e)) => Err(EngineError::new(ErrorName::UnsupportedPayload, format!("malformed rpx payload: {e}"), vec![])),
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

/// An error an rpx engine reports for a request: the one error type, whose constructors
/// ([`ErrorContent::no_compiler`], [`ErrorContent::worker_died`], ...) say what users see.
pub type EngineError = ErrorContent;

impl EngineRef for Identity {
    fn engine_id(&self) -> u64 {
        self.id
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
        let start = init_metadata(&json!({"is_broadcast": true, "original_msg_id": "m1"}), &me());
        let md = serde_json::to_value(&start).unwrap();
        assert_eq!(md["engine"], "u-3");
        assert_eq!(md["dependencies_met"], true);
        assert_eq!(md["is_broadcast"], true);
        assert_eq!(md["original_msg_id"], "m1");
        assert_eq!(md["is_coalescing"], false);
        assert!(md["started"].as_str().unwrap().ends_with('Z'));

        let ok = serde_json::to_value(finish_metadata(start.clone(), &execute_ok(1), &me())).unwrap();
        assert_eq!(ok["status"], "ok");
        assert!(ok.get("engine_info").is_none());

        let err = EngineError::panic("boom", vec![]);
        let c = execute_error(&err, 4, &me());
        let md = serde_json::to_value(finish_metadata(start, &c, &me())).unwrap();
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
        let pull = Op::Pull { names: vec!["x".into()], files: None };
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
