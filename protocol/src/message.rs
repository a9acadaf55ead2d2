//! Message headers and decoded messages, as ipyparallel 9 (Jupyter protocol 5.4) frames them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::{EngineInfo, ErrorContent, ErrorName};

/// Protocol version written into every header.
pub const PROTOCOL_VERSION: &str = "5.4";

/// A Jupyter message header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub msg_id: String,
    pub msg_type: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub date: String,
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_version() -> String {
    PROTOCOL_VERSION.to_string()
}

/// ISO-8601 UTC timestamp with microseconds and a `Z`, as Python's Session writes.
pub fn now_iso() -> String {
    // The same text as `%Y-%m-%dT%H:%M:%S%.6fZ`, without parsing a format string per message.
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A decoded, verified message. `frames` keeps the original signed JSON frames so that a
/// router can forward the message unchanged.
#[derive(Debug, Clone)]
pub struct Message {
    /// Routing identities before the delimiter.
    pub idents: Vec<Bytes>,
    pub header: Header,
    /// The parent header; `{}` when there is none.
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Message {
    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    pub fn msg_id(&self) -> &str {
        &self.header.msg_id
    }

    /// The parent's `msg_id`, if this message has a parent.
    pub fn parent_msg_id(&self) -> Option<&str> {
        /// The one field of a parent header read here, borrowed.
        #[derive(Deserialize)]
        struct ParentId<'a> {
            msg_id: &'a str,
        }
        ParentId::deserialize(&self.parent_header).ok().map(|p| p.msg_id)
    }

    /// The parent header as a typed value, if present and well formed.
    pub fn parent(&self) -> Option<Header> {
        serde_json::from_value(self.parent_header.clone()).ok()
    }

    /// A string field of the content.
    pub fn content_str(&self, key: &str) -> Option<&str> {
        self.content.get(key).and_then(Value::as_str)
    }
}

/// Content of an error reply in ipyparallel's shape: `status`, `ename`, `evalue`, `traceback`
/// and, when an engine produced it, `engine_info` (as [`engine_info`] builds it). Built by
/// [`ErrorContent::reply`].
pub fn error_content(ename: impl Into<ErrorName>, evalue: &str, traceback: Vec<String>, engine_info: Option<Value>) -> Value {
    ErrorContent::bare(ename, evalue, traceback).reply_with_info(engine_info)
}

/// The `engine_info` block that engine errors carry ([`EngineInfo`] as JSON).
pub fn engine_info(engine_id: u64, engine_uuid: &str, method: &str) -> Value {
    serde_json::to_value(EngineInfo::new(engine_id, engine_uuid, method)).expect("serializable")
}

#[cfg(test)]
mod content_tests {
    use serde_json::json;

    #[test]
    fn parent_ids_and_error_contents() {
        let mut m =
            crate::Session::new(b"k", "s").decode(crate::Session::new(b"k", "s").msg(&[], "x", json!({}), None, json!({}), &[]).1).unwrap();
        assert_eq!(m.parent_msg_id(), None);
        m.parent_header = json!({"msg_id": "p1", "msg_type": "execute_request"});
        assert_eq!(m.parent_msg_id(), Some("p1"));
        m.parent_header = json!({"msg_id": 3});
        assert_eq!(m.parent_msg_id(), None);
        let c = super::error_content("KeyError", "k", vec!["KeyError: k".into()], Some(super::engine_info(1, "u", "m")));
        assert_eq!(
            c,
            json!({"status": "error", "ename": "KeyError", "evalue": "k", "traceback": ["KeyError: k"],
                   "engine_info": {"engine_id": 1, "engine_uuid": "u", "method": "m"}})
        );
    }
}

#[cfg(test)]
mod date_tests {
    #[test]
    fn dates_are_utc_with_microseconds_as_python_writes_them() {
        let d = super::now_iso();
        let parsed = chrono::NaiveDateTime::parse_from_str(&d, "%Y-%m-%dT%H:%M:%S%.6fZ");
        assert!(parsed.is_ok() && d.len() == "2026-12-04T05:50:23.123456Z".len(), "{d}");
    }
}
