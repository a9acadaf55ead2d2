//! The data rendering works on: what engines produced ([`OutputEvent`], grouped per engine in
//! [`EngineOutput`], convertible from iopub contents with [`OutputEvent::from_iopub`]) and what
//! the kernel publishes ([`IopubMsg`], with its Jupyter `msg_type` and `content`).

use std::fmt;

use rpx_protocol::content::{plain_text, DisplayContent, ErrorContent, ErrorName, Stream};
use serde_json::{json, Map, Value};

/// `stdout` or `stderr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl StreamName {
    /// `stdout` or `stderr`, as in Jupyter's `stream` content.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        }
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One output of one engine, in the order the engine produced it.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputEvent {
    /// A chunk of stdout or stderr text.
    Stream {
        /// Which stream.
        name: StreamName,
        /// The text.
        text: String,
    },
    /// The value of the cell.
    ExecuteResult {
        /// The engine's execution count (the `k` of `Out[N:k]`).
        execution_count: u64,
        /// Mime bundle.
        data: Value,
        /// Metadata (an object or null).
        metadata: Value,
    },
    /// Rich output (`display_data`).
    DisplayData {
        /// Mime bundle.
        data: Value,
        /// Metadata (an object or null).
        metadata: Value,
    },
    /// An error raised on an engine (iopub `error` content, or an error reply); its traceback
    /// is empty if there is none.
    Error(ErrorContent),
}

impl OutputEvent {
    /// Stdout text.
    pub fn stdout(text: impl Into<String>) -> Self {
        OutputEvent::Stream { name: StreamName::Stdout, text: text.into() }
    }

    /// Stderr text.
    pub fn stderr(text: impl Into<String>) -> Self {
        OutputEvent::Stream { name: StreamName::Stderr, text: text.into() }
    }

    /// An execute result with only `text/plain`.
    pub fn result_text(execution_count: u64, text: impl Into<String>) -> Self {
        OutputEvent::ExecuteResult { execution_count, data: json!({ "text/plain": text.into() }), metadata: json!({}) }
    }

    /// An error.
    pub fn error(ename: impl Into<ErrorName>, evalue: impl Into<String>, traceback: Vec<String>) -> Self {
        OutputEvent::Error(ErrorContent::bare(ename, evalue, traceback))
    }

    /// The event for an engine's iopub message, from its `msg_type` and `content`: `stream`,
    /// `execute_result`, `display_data` and `error` become events; anything else (`status`,
    /// `execute_input`, ...) or a content missing its fields is `None`.
    pub fn from_iopub(msg_type: &str, content: &Value) -> Option<OutputEvent> {
        match msg_type {
            "stream" => {
                let stream = Stream::read(content);
                let name = match stream.name.as_deref()? {
                    "stdout" => StreamName::Stdout,
                    "stderr" => StreamName::Stderr,
                    _ => return None,
                };
                Some(OutputEvent::Stream { name, text: stream.text? })
            }
            "execute_result" | "display_data" => {
                let d = DisplayContent::read(content);
                let metadata = d.metadata.unwrap_or_else(|| json!({}));
                Some(match msg_type {
                    "execute_result" => {
                        OutputEvent::ExecuteResult { execution_count: d.execution_count.unwrap_or(0), data: d.data?, metadata }
                    }
                    _ => OutputEvent::DisplayData { data: d.data?, metadata },
                })
            }
            "error" => Some(OutputEvent::Error(rpx_protocol::content::read_or_default(content))),
            _ => None,
        }
    }
}

/// Everything one engine produced for one execution, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineOutput {
    /// The engine id (the `N` of `[stdout:N]`).
    pub engine_id: usize,
    /// Its outputs, in the order the engine produced them.
    pub events: Vec<OutputEvent>,
}

impl EngineOutput {
    /// An engine's outputs.
    pub fn new(engine_id: usize, events: Vec<OutputEvent>) -> Self {
        EngineOutput { engine_id, events }
    }

    /// The errors among the events.
    pub fn errors(&self) -> impl Iterator<Item = &ErrorContent> {
        self.events.iter().filter_map(|e| match e {
            OutputEvent::Error(err) => Some(err),
            _ => None,
        })
    }
}

/// A message for the kernel to publish on its iopub socket (parented to the cell's
/// `execute_request`).
#[derive(Clone, Debug, PartialEq)]
pub enum IopubMsg {
    /// `stream`.
    Stream {
        /// Which stream.
        name: StreamName,
        /// The text.
        text: String,
    },
    /// `display_data`; with a `display_id` (in `transient`) if it will be updated.
    DisplayData {
        /// Mime bundle.
        data: Value,
        /// Metadata object.
        metadata: Value,
        /// `transient.display_id`.
        display_id: Option<String>,
    },
    /// `update_display_data` for an earlier [`IopubMsg::DisplayData`] with this id.
    UpdateDisplayData {
        /// Mime bundle.
        data: Value,
        /// Metadata object.
        metadata: Value,
        /// `transient.display_id`.
        display_id: String,
    },
    /// `execute_result`. The renderers never produce it (ipyparallel shows engine results as
    /// `display_data`); the kernel may, for its own values.
    ExecuteResult {
        /// Mime bundle.
        data: Value,
        /// Metadata object.
        metadata: Value,
        /// The kernel's execution count.
        execution_count: u64,
    },
    /// `error`; its traceback lines are shown joined with newlines.
    Error(ErrorContent),
}

impl IopubMsg {
    /// The Jupyter `msg_type`.
    pub fn msg_type(&self) -> &'static str {
        match self {
            IopubMsg::Stream { .. } => "stream",
            IopubMsg::DisplayData { .. } => "display_data",
            IopubMsg::UpdateDisplayData { .. } => "update_display_data",
            IopubMsg::ExecuteResult { .. } => "execute_result",
            IopubMsg::Error(_) => "error",
        }
    }

    /// The Jupyter message `content`.
    pub fn content(&self) -> Value {
        match self {
            IopubMsg::Stream { name, text } => Stream::content(name.as_str(), text),
            IopubMsg::DisplayData { data, metadata, display_id } => DisplayContent::display_data(data, metadata, display_id.as_deref()),
            IopubMsg::UpdateDisplayData { data, metadata, display_id } => DisplayContent::update_display_data(data, metadata, display_id),
            IopubMsg::ExecuteResult { data, metadata, execution_count } => DisplayContent::execute_result(data, metadata, *execution_count),
            IopubMsg::Error(error) => error.iopub(None),
        }
    }

    /// The `text/plain` of a display, or the text of a stream (for tests and logs).
    pub fn text(&self) -> Option<&str> {
        match self {
            IopubMsg::Stream { text, .. } => Some(text),
            IopubMsg::DisplayData { data, .. } | IopubMsg::UpdateDisplayData { data, .. } | IopubMsg::ExecuteResult { data, .. } => {
                plain_text(data)
            }
            IopubMsg::Error(_) => None,
        }
    }
}

/// `metadata` (an object, or null/other treated as empty) with `"engine": engine_id` added, as
/// ipyparallel republishes engine displays.
pub(crate) fn with_engine(metadata: &Value, engine_id: usize) -> Value {
    let mut m = match metadata {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    m.insert("engine".to_string(), json!(engine_id));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_iopub_contents() {
        assert_eq!(OutputEvent::from_iopub("stream", &json!({"name": "stdout", "text": "hi\n"})), Some(OutputEvent::stdout("hi\n")));
        assert_eq!(OutputEvent::from_iopub("stream", &json!({"name": "stderr", "text": "x"})), Some(OutputEvent::stderr("x")));
        assert_eq!(OutputEvent::from_iopub("stream", &json!({"name": "other", "text": "x"})), None);
        assert_eq!(
            OutputEvent::from_iopub("execute_result", &json!({"execution_count": 3, "data": {"text/plain": "42"}, "metadata": {}})),
            Some(OutputEvent::result_text(3, "42"))
        );
        assert_eq!(
            OutputEvent::from_iopub("display_data", &json!({"data": {"text/html": "<b>x</b>"}})),
            Some(OutputEvent::DisplayData { data: json!({"text/html": "<b>x</b>"}), metadata: json!({}) })
        );
        assert_eq!(
            OutputEvent::from_iopub("error", &json!({"ename": "Panic", "evalue": "boom", "traceback": ["a", "b"]})),
            Some(OutputEvent::error("Panic", "boom", vec!["a".into(), "b".into()]))
        );
        assert_eq!(OutputEvent::from_iopub("status", &json!({"execution_state": "idle"})), None);
        assert_eq!(OutputEvent::from_iopub("display_data", &json!({})), None);
    }

    #[test]
    fn contents() {
        let m = IopubMsg::Stream { name: StreamName::Stderr, text: "x".into() };
        assert_eq!((m.msg_type(), m.content()), ("stream", json!({"name": "stderr", "text": "x"})));
        let m = IopubMsg::DisplayData { data: json!({"text/plain": "a"}), metadata: json!({}), display_id: None };
        assert_eq!((m.msg_type(), m.content()), ("display_data", json!({"data": {"text/plain": "a"}, "metadata": {}})));
        assert_eq!(m.text(), Some("a"));
        let m = IopubMsg::DisplayData { data: json!({}), metadata: json!({}), display_id: Some("d".into()) };
        assert_eq!(m.content(), json!({"data": {}, "metadata": {}, "transient": {"display_id": "d"}}));
        let m = IopubMsg::UpdateDisplayData { data: json!({}), metadata: json!({}), display_id: "d".into() };
        assert_eq!(
            (m.msg_type(), m.content()),
            ("update_display_data", json!({"data": {}, "metadata": {}, "transient": {"display_id": "d"}}))
        );
        let m = IopubMsg::ExecuteResult { data: json!({}), metadata: json!({}), execution_count: 4 };
        assert_eq!((m.msg_type(), m.content()), ("execute_result", json!({"data": {}, "metadata": {}, "execution_count": 4})));
        let m = IopubMsg::Error(ErrorContent::bare("E", "v", vec!["t".into()]));
        assert_eq!((m.msg_type(), m.content()), ("error", json!({"ename": "E", "evalue": "v", "traceback": ["t"]})));
    }

    #[test]
    fn engine_metadata() {
        assert_eq!(with_engine(&Value::Null, 3), json!({"engine": 3}));
        assert_eq!(with_engine(&json!({"a": 1}), 0), json!({"a": 1, "engine": 0}));
    }
}
