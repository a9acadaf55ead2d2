//! Typed contents of the execution family of Jupyter and ipyparallel messages that rpx sends or
//! reads: `execute_request` / `execute_reply`, `apply_reply`'s error content and metadata
//! ([`EngineInfo`]), the iopub outputs (`stream`, `error`, `display_data`,
//! `update_display_data`, `execute_result`, `execute_input`, `status`), `input_request` /
//! `input_reply`, the shell and control requests rpx-kernel reads, `abort_request` and the
//! engine's `signal_request`; and the one error type, [`ErrorContent`] with its [`ErrorName`].
//!
//! Where `jupyter-protocol`'s types fit (replies rpx-kernel builds) they are re-exported from
//! here. Where they are stricter than rpx must be when reading (required fields that Jupyter
//! front ends and ipyparallel's client may leave out, and that rpx has always defaulted), or
//! where they would change the bytes rpx forwards (its typed mime bundle), rpx has its own type
//! and says why. Reading is lenient (a missing field takes the default the old code gave it);
//! writing gives the same JSON as before.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

pub use jupyter_protocol::{
    CodeMirrorMode, CommInfoReply, CompleteReply, HelpLink, InspectReply, InterruptReply, IsCompleteReply, IsCompleteReplyStatus,
    KernelInfoReply, LanguageInfo, ReplyStatus,
};

mod error;

pub use error::{EngineInfo, EngineRef, ErrorContent, ErrorName};
use error::{ErrorMessage, ExecuteFields};

/// A string, or `""` for anything else (null, a number) a foreign peer sent.
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        _ => String::new(),
    })
}

/// The strings of an array (other items dropped), or `[]` for anything else.
pub(crate) fn lenient_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(a) => a.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s) } else { None }).collect(),
        _ => Vec::new(),
    })
}

/// `Some(value)` when present, also for null (`None` only when absent, by `default`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// `Some` when the value reads as `T`, `None` when it is absent or does not.
fn lenient_option<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).ok())
}

/// What rpx reads of any reply content: its `status` and, for errors, the error and the
/// engine that reported it. A status other than `ok`, `error` and `aborted` reads as `None`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct ReplyContent {
    #[serde(default, deserialize_with = "lenient_option")]
    pub status: Option<ReplyStatus>,
    #[serde(flatten)]
    pub error: ErrorContent,
    #[serde(default, deserialize_with = "lenient_option")]
    pub engine_info: Option<EngineInfo>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub execution_count: Option<u64>,
}

impl ReplyContent {
    /// Read a reply content; anything that is not an object reads as empty.
    pub fn read(content: &Value) -> ReplyContent {
        Deserialize::deserialize(content).unwrap_or_default()
    }

    /// The id of the engine the content names in `engine_info`.
    pub fn engine_id(&self) -> Option<u64> {
        self.engine_info.as_ref().map(|i| i.engine_id)
    }
}

/// The metadata of an engine's reply, in ipyparallel's shape: started when the engine takes the
/// request (its kernel's `init_metadata`: when, which engine, the broadcast fields copied from
/// the request) and completed when it answers (`finish_metadata`: the reply's `status` and, on
/// errors, `engine_info`). Written straight to JSON, not built as a map per reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyMetadata {
    pub started: String,
    pub dependencies_met: bool,
    /// The engine's uuid.
    pub engine: String,
    pub is_broadcast: Value,
    pub is_coalescing: Value,
    pub original_msg_id: Value,
    pub label: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<ReplyStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_info: Option<EngineInfo>,
    /// Nothing was published for the request, not even `idle` ([`crate::apply::QUIET_KEY`]).
    #[serde(rename = "rpx_quiet", skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// The fields of a request's metadata that its reply's metadata repeats.
#[derive(Debug, Default, Deserialize)]
struct CopiedFields {
    #[serde(default)]
    is_broadcast: Option<Value>,
    #[serde(default)]
    is_coalescing: Option<Value>,
    #[serde(default)]
    original_msg_id: Option<Value>,
    #[serde(default)]
    label: Option<Value>,
}

impl ReplyMetadata {
    /// Started now, by engine `engine` (uuid), for a request with `request_metadata`.
    pub fn start(request_metadata: &Value, engine: &str, started: String) -> ReplyMetadata {
        let c: CopiedFields = Deserialize::deserialize(request_metadata).unwrap_or_default();
        ReplyMetadata {
            started,
            dependencies_met: true,
            engine: engine.to_string(),
            is_broadcast: c.is_broadcast.unwrap_or(Value::Bool(false)),
            is_coalescing: c.is_coalescing.unwrap_or(Value::Bool(false)),
            original_msg_id: c.original_msg_id.unwrap_or_else(|| Value::String(String::new())),
            label: c.label.unwrap_or(Value::Null),
            status: None,
            engine_info: None,
            quiet: false,
        }
    }
}

/// Metadata of an engine's messages as rpx reads it: the `engine` uuid that ipyparallel's
/// engines (and rpx's) put in every message they send.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct EngineMetadata {
    #[serde(default, deserialize_with = "lenient_option")]
    pub engine: Option<String>,
    /// A reply the engine answered quietly: nothing was published for its request, not even
    /// `idle` ([`crate::apply::QUIET_KEY`]).
    #[serde(rename = "rpx_quiet", default, deserialize_with = "lenient_option")]
    pub quiet: Option<bool>,
}

impl EngineMetadata {
    /// Read a message's metadata.
    pub fn read(metadata: &Value) -> EngineMetadata {
        read_or_default(metadata)
    }
}

/// `execute_request` as rpx reads it. rpx's own type: `jupyter_protocol::ExecuteRequest`
/// requires `silent` and `store_history`, which clients may leave out and rpx defaults
/// (`silent: false`, `store_history: !silent`), and it wants `user_expressions` as strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecuteRequest {
    #[serde(default, deserialize_with = "lenient_string")]
    pub code: String,
    #[serde(default, deserialize_with = "lenient_option")]
    pub silent: Option<bool>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub store_history: Option<bool>,
    /// Only the names are used (rpx evaluates none).
    #[serde(default, deserialize_with = "lenient_option")]
    pub user_expressions: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub allow_stdin: Option<bool>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub stop_on_error: Option<bool>,
}

impl ExecuteRequest {
    /// Read an `execute_request` content; fields that do not read take their defaults.
    pub fn read(content: &Value) -> ExecuteRequest {
        Deserialize::deserialize(content).unwrap_or(ExecuteRequest {
            code: String::new(),
            silent: None,
            store_history: None,
            user_expressions: None,
            allow_stdin: None,
            stop_on_error: None,
        })
    }

    /// `silent`, default `false`.
    pub fn silent(&self) -> bool {
        self.silent.unwrap_or(false)
    }

    /// Whether the cell goes into the history: `store_history` (default: not silent), and never
    /// when silent.
    pub fn store_history(&self) -> bool {
        self.store_history.unwrap_or(!self.silent()) && !self.silent()
    }

    /// `stop_on_error`, default `true`.
    pub fn stop_on_error(&self) -> bool {
        self.stop_on_error.unwrap_or(true)
    }

    /// `allow_stdin`, default `false`.
    pub fn allow_stdin(&self) -> bool {
        self.allow_stdin.unwrap_or(false)
    }
}

/// `execute_reply` content. rpx's own type: `jupyter_protocol::ExecuteReply` writes
/// `user_expressions` and `payload` in its own types and an error's fields flattened from a
/// boxed optional; rpx writes exactly ipykernel's fields.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecuteReply {
    /// The cell ran; `user_expressions` as answered.
    Ok { execution_count: u64, user_expressions: Map<String, Value> },
    /// The cell failed.
    Error { execution_count: u64, error: ErrorContent, engine_info: Option<EngineInfo> },
    /// The cell was not run (an earlier cell failed).
    Aborted { execution_count: u64 },
}

impl ExecuteReply {
    /// The content as sent.
    pub fn to_value(&self) -> Value {
        match self {
            ExecuteReply::Ok { execution_count, user_expressions } => {
                json!({ "status": "ok", "execution_count": execution_count, "user_expressions": user_expressions, "payload": [] })
            }
            ExecuteReply::Error { execution_count, error, engine_info } => {
                let execute = Some(ExecuteFields { execution_count: *execution_count, user_expressions: Map::new(), payload: [] });
                json!(ErrorMessage { status: Some(ReplyStatus::Error), error, engine_info: engine_info.as_ref(), execute })
            }
            ExecuteReply::Aborted { execution_count } => json!({ "status": "aborted", "execution_count": execution_count }),
        }
    }
}

/// `stream` content as rpx reads it (`None` for a missing or non-string field). rpx's own
/// type: a stream name other than `stdout` or `stderr`, or a missing field, reads (and the
/// reader decides) instead of failing as `jupyter_protocol::StreamContent`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Stream {
    #[serde(default, deserialize_with = "lenient_option")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub text: Option<String>,
}

impl Stream {
    /// Read a stream content.
    pub fn read(content: &Value) -> Stream {
        read_or_default(content)
    }

    /// Whether this is stderr (anything else counts as stdout where rpx collects text).
    pub fn is_stderr(&self) -> bool {
        self.name.as_deref() == Some("stderr")
    }

    /// The content as sent: `name` (`stdout`, `stderr`) and `text`.
    pub fn content(name: &str, text: &str) -> Value {
        json!({ "name": name, "text": text })
    }
}

/// `display_data`, `update_display_data` and `execute_result` contents. rpx's own type:
/// `jupyter_protocol::Media` parses and re-serializes mime bundles, while rpx forwards an
/// engine's bundle byte for byte. `data` and `metadata` are kept as read (`None` when
/// absent); `transient.display_id` and `execution_count` when present.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct DisplayContent {
    #[serde(default, deserialize_with = "present")]
    pub data: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub metadata: Option<Value>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub transient: Option<Transient>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub execution_count: Option<u64>,
}

/// `transient` of a display: its `display_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transient {
    pub display_id: String,
}

impl DisplayContent {
    /// Read a display content.
    pub fn read(content: &Value) -> DisplayContent {
        Deserialize::deserialize(content).unwrap_or_default()
    }

    /// `display_data` content: `data`, `metadata`, and `transient.display_id` when given.
    pub fn display_data(data: &Value, metadata: &Value, display_id: Option<&str>) -> Value {
        match display_id {
            Some(id) => json!({ "data": data, "metadata": metadata, "transient": Transient { display_id: id.to_string() } }),
            None => json!({ "data": data, "metadata": metadata }),
        }
    }

    /// `update_display_data` content.
    pub fn update_display_data(data: &Value, metadata: &Value, display_id: &str) -> Value {
        DisplayContent::display_data(data, metadata, Some(display_id))
    }

    /// `execute_result` content.
    pub fn execute_result(data: &Value, metadata: &Value, execution_count: u64) -> Value {
        json!({ "data": data, "metadata": metadata, "execution_count": execution_count })
    }

    /// The `data` as a map (empty when absent or not an object).
    pub fn data_map(&self) -> Map<String, Value> {
        match &self.data {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        }
    }
}

/// The plain-text mime type, the key of a bundle's text form.
pub const TEXT_PLAIN: &str = "text/plain";

/// The `text/plain` entry of a mime bundle, if it is a string.
pub fn plain_text(data: &Value) -> Option<&str> {
    data.as_object()?.get(TEXT_PLAIN)?.as_str()
}

/// `execute_input` content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteInput {
    pub code: String,
    pub execution_count: u64,
}

impl ExecuteInput {
    /// The `code` of an `execute_input` content as it was sent (`null` when absent), for the
    /// hub's task records, which keep what the engine published.
    pub fn code_as_sent(content: &Value) -> Value {
        #[derive(Deserialize, Default)]
        struct Code {
            #[serde(default)]
            code: Value,
        }
        read_or_default::<Code>(content).code
    }
}

/// `status` content: `busy`, `idle` or `starting`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub execution_state: String,
}

/// `input_request` content.
pub use jupyter_protocol::InputRequest;

/// `input_reply` as rpx reads it: only `value` (default empty). rpx's own type:
/// `jupyter_protocol::InputReply` fails on a `status` other than `ok`, `error`, `aborted`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct InputReply {
    #[serde(default, deserialize_with = "lenient_string")]
    pub value: String,
}

/// `complete_request` and `inspect_request` as rpx-kernel reads them. rpx's own type:
/// `jupyter_protocol::{CompleteRequest, InspectRequest}` require `cursor_pos`, which rpx
/// defaults to the end of the code.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct CodeAtCursor {
    #[serde(default, deserialize_with = "lenient_string")]
    pub code: String,
    #[serde(default, deserialize_with = "lenient_option")]
    pub cursor_pos: Option<u64>,
}

impl CodeAtCursor {
    /// The cursor in characters (default: after the last one).
    pub fn cursor(&self) -> usize {
        self.cursor_pos.map_or(self.code.chars().count(), |p| p as usize)
    }
}

/// `is_complete_request`. rpx's own type, so that a missing `code` reads as empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct IsCompleteRequest {
    #[serde(default, deserialize_with = "lenient_string")]
    pub code: String,
}

/// `history_request` as rpx-kernel reads it. rpx's own type: `jupyter_protocol::HistoryRequest`
/// requires every field of each access type (and `i32` numbers); rpx defaults them as IPython
/// does (`tail`, `n` 10; `range` from 1 to the end; `search` for `*`, all hits).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct HistoryRequest {
    #[serde(default, deserialize_with = "lenient_option")]
    pub hist_access_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub output: Option<bool>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub start: Option<u64>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub stop: Option<u64>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub pattern: Option<String>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub unique: Option<bool>,
    #[serde(default, deserialize_with = "lenient_option")]
    pub n: Option<u64>,
}

/// `shutdown_request`. rpx's own type, so that a missing or non-boolean `restart` reads as
/// `false` instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ShutdownRequest {
    #[serde(default, deserialize_with = "lenient_option")]
    pub restart: Option<bool>,
}

impl ShutdownRequest {
    /// `restart`, default `false`.
    pub fn restart(&self) -> bool {
        self.restart.unwrap_or(false)
    }

    /// The `shutdown_reply` content.
    pub fn reply(&self) -> Value {
        json!({ "status": "ok", "restart": self.restart() })
    }
}

/// `comm_open` as rpx-kernel reads it: the `comm_id` to close (kept as sent, null if absent).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct CommOpen {
    #[serde(default)]
    pub comm_id: Value,
}

impl CommOpen {
    /// The `comm_close` content answering it.
    pub fn close(&self) -> Value {
        json!({ "comm_id": self.comm_id, "data": {} })
    }
}

/// `abort_request`: the `msg_ids` to abort (a list, or one id as a string); none named means
/// everything queued.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct AbortRequest {
    #[serde(default, deserialize_with = "lenient_ids")]
    pub msg_ids: Vec<String>,
}

fn lenient_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => vec![s],
        other => lenient_strings(other).unwrap_or_default(),
    })
}

/// `signal_request` (ipyparallel's engine control message): `sig` is a number or a name
/// (`SIGINT`, `INT`), read by the engine's signal table; null when absent.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct SignalRequest {
    #[serde(default)]
    pub sig: Value,
}

/// Read a request content as `T`, or `T::default()` when it does not read (not an object).
pub fn read_or_default<T: serde::de::DeserializeOwned + Default>(content: &Value) -> T {
    Deserialize::deserialize(content).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_metadata_copies_the_request_fields_and_writes_quiet_under_its_key() {
        let md = ReplyMetadata::start(&json!({"is_broadcast": true, "original_msg_id": "m1", "label": [1]}), "u-3", "t".into());
        let v = serde_json::to_value(&md).unwrap();
        assert_eq!(
            v,
            json!({"started": "t", "dependencies_met": true, "engine": "u-3", "is_broadcast": true, "is_coalescing": false,
                   "original_msg_id": "m1", "label": [1]})
        );
        // Metadata that is not an object copies nothing; status, engine_info and quiet appear once set.
        let mut md = ReplyMetadata::start(&json!("odd"), "u-3", "t".into());
        (md.status, md.engine_info, md.quiet) = (Some(ReplyStatus::Error), Some(EngineInfo::new(3, "u-3", "apply")), true);
        let v = serde_json::to_value(&md).unwrap();
        assert_eq!((&v["is_broadcast"], &v["original_msg_id"], &v["label"]), (&json!(false), &json!(""), &Value::Null));
        assert_eq!(v["status"], "error");
        assert_eq!(v["engine_info"], json!({"engine_id": 3, "engine_uuid": "u-3", "method": "apply"}));
        assert_eq!(v[crate::apply::QUIET_KEY], true);
        assert_eq!(EngineMetadata::read(&v).quiet, Some(true));
    }

    #[test]
    fn engine_metadata_reads_the_quiet_marker_from_value_or_bytes() {
        let md = json!({"engine": "u1", crate::apply::QUIET_KEY: true, "started": "x"});
        let read = EngineMetadata::read(&md);
        assert_eq!((read.engine.as_deref(), read.quiet), (Some("u1"), Some(true)));
        let from_bytes: EngineMetadata = serde_json::from_slice(md.to_string().as_bytes()).unwrap();
        assert_eq!(from_bytes, read);
        // A marker that is not a bool is ignored, and the uuid still read.
        let odd: EngineMetadata = serde_json::from_slice(br#"{"engine": "u2", "rpx_quiet": "yes"}"#).unwrap();
        assert_eq!((odd.engine.as_deref(), odd.quiet), (Some("u2"), None));
    }

    #[test]
    fn error_names_round_trip_as_their_strings() {
        for name in ["KeyboardInterrupt", "CompileError", "TaskAborted", "Error", "ZeroDivisionError", ""] {
            let n = ErrorName::parse(name);
            assert_eq!(serde_json::to_value(&n).unwrap(), json!(name));
            assert_eq!(serde_json::from_value::<ErrorName>(json!(name)).unwrap(), n);
        }
        assert_eq!(ErrorName::parse("Panic"), ErrorName::Panic);
        assert_eq!(ErrorName::parse("ZeroDivisionError"), ErrorName::Other("ZeroDivisionError".into()));
    }

    #[test]
    fn error_contents_read_leniently_and_write_as_before() {
        let e = ErrorContent::new(ErrorName::NameError, "no x", vec![]);
        assert_eq!(e.traceback, vec!["NameError: no x"]);
        let info = EngineInfo::new(3, "u", "apply");
        assert_eq!(
            e.reply(Some(&info)),
            json!({"status": "error", "ename": "NameError", "evalue": "no x", "traceback": ["NameError: no x"],
                   "engine_info": {"engine_id": 3, "engine_uuid": "u", "method": "apply"}})
        );
        assert_eq!(e.iopub(None), json!({"ename": "NameError", "evalue": "no x", "traceback": ["NameError: no x"]}));
        let r = ReplyContent::read(&json!({"status": "error", "evalue": 1, "traceback": ["a", 2, "b"], "engine_info": {"engine_id": 2}}));
        assert_eq!(r.status, Some(ReplyStatus::Error));
        assert_eq!((r.error.ename.as_str(), r.error.evalue.as_str()), ("", ""));
        assert_eq!(r.error.traceback, vec!["a", "b"]);
        assert_eq!(r.engine_id(), Some(2));
        assert_eq!(ReplyContent::read(&json!({"engine_info": {"engine_uuid": "u"}})).engine_id(), None);
        assert_eq!(ReplyContent::read(&json!(null)).status, None);
    }

    #[test]
    fn requests_take_rpx_defaults() {
        let r = ExecuteRequest::read(&json!({"code": "1"}));
        assert!(!r.silent() && r.store_history() && r.stop_on_error() && !r.allow_stdin());
        assert!(!ExecuteRequest::read(&json!({"code": "", "silent": true, "store_history": true})).store_history());
        assert_eq!(CodeAtCursor { code: "abé".into(), cursor_pos: None }.cursor(), 3);
        assert_eq!(read_or_default::<AbortRequest>(&json!({"msg_ids": "m"})).msg_ids, vec!["m"]);
        assert_eq!(read_or_default::<AbortRequest>(&json!({"msg_ids": ["a", 1, "b"]})).msg_ids, vec!["a", "b"]);
        assert!(read_or_default::<AbortRequest>(&json!({})).msg_ids.is_empty());
        assert!(!read_or_default::<ShutdownRequest>(&json!({"restart": "yes"})).restart());
        assert_eq!(read_or_default::<ShutdownRequest>(&json!({"restart": true})).reply(), json!({"status": "ok", "restart": true}));
    }

    #[test]
    fn execute_replies_have_ipykernels_fields() {
        let ok = ExecuteReply::Ok { execution_count: 2, user_expressions: Map::new() };
        assert_eq!(ok.to_value(), json!({"status": "ok", "execution_count": 2, "user_expressions": {}, "payload": []}));
        let err = ExecuteReply::Error { execution_count: 3, error: ErrorContent::new("Panic", "boom", vec![]), engine_info: None };
        assert_eq!(
            err.to_value(),
            json!({"status": "error", "execution_count": 3, "ename": "Panic", "evalue": "boom", "traceback": ["Panic: boom"],
                   "user_expressions": {}, "payload": []})
        );
        assert_eq!(ExecuteReply::Aborted { execution_count: 1 }.to_value(), json!({"status": "aborted", "execution_count": 1}));
    }

    #[test]
    fn displays_keep_their_bundles() {
        let c = DisplayContent::display_data(&json!({"text/plain": "x"}), &json!({}), Some("d"));
        assert_eq!(c, json!({"data": {"text/plain": "x"}, "metadata": {}, "transient": {"display_id": "d"}}));
        let d = DisplayContent::read(&c);
        assert_eq!(d.transient.map(|t| t.display_id).as_deref(), Some("d"));
        assert_eq!(plain_text(d.data.as_ref().unwrap()), Some("x"));
    }
}
