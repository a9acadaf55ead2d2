//! The hub's own messages: the contents of client queries and their replies on the
//! `registration` socket (connection, queue, result, history, db, purge, resubmit, load,
//! shutdown), the notifications it publishes, the broadcast and coalescing keys it writes into
//! metadata, and task dependencies (`after`, `follow`) as ipyparallel writes them.
//!
//! Reading is lenient where ipyparallel's hub is: optional fields default. What is written is
//! what ipyparallel's Python client reads (field names, `null`s, defaults).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::dataplane::HostIdentity;

/// `status` of a successful reply.
pub const OK: &str = "ok";

fn ok() -> String {
    OK.to_string()
}

fn yes() -> bool {
    true
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// An engine named by a client: its integer id or its uuid (anything else is kept to be named in
/// the error that refuses it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EngineRef {
    Id(u64),
    Uuid(String),
    Other(Value),
}

impl fmt::Display for EngineRef {
    /// As JSON (`3`, `"uuid"`), as ipyparallel's hub names it in errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineRef::Id(id) => write!(f, "{id}"),
            EngineRef::Uuid(s) => write!(f, "{}", Value::String(s.clone())),
            EngineRef::Other(v) => write!(f, "{v}"),
        }
    }
}

/// `targets` of a `queue_request`: one engine or a list (`null` or absent: all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    Many(Vec<EngineRef>),
    One(EngineRef),
}

impl Targets {
    /// The engines named, as a list.
    pub fn into_vec(self) -> Vec<EngineRef> {
        match self {
            Targets::Many(v) => v,
            Targets::One(t) => vec![t],
        }
    }
}

/// Content of `queue_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueRequest {
    #[serde(default)]
    pub verbose: bool,
    #[serde(default)]
    pub targets: Option<Targets>,
}

/// One engine's queues in a `queue_reply`: counts, or msg_ids when `verbose`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EngineQueue {
    Counts { queue: usize, completed: u64, tasks: usize },
    Verbose { queue: Vec<String>, completed: Vec<String>, tasks: Vec<String> },
}

/// Queued load-balanced tasks in a `queue_reply`: a count, or msg_ids when `verbose`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Unassigned {
    Count(usize),
    Ids(Vec<String>),
}

/// Content of `queue_reply`: `{status, "<engine id>": EngineQueue, ..., unassigned}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueReply {
    #[serde(default = "ok")]
    pub status: String,
    /// By engine id (as a string, the JSON key).
    #[serde(flatten)]
    pub engines: BTreeMap<String, EngineQueue>,
    pub unassigned: Unassigned,
}

/// Content of `result_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultRequest {
    #[serde(default)]
    pub msg_ids: Vec<String>,
    #[serde(default)]
    pub status_only: bool,
}

/// A finished task's iopub output in a [`ResultRecord`] (`null` for what it did not publish;
/// `""` for no stream output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultIo {
    pub execute_input: Value,
    pub execute_result: Value,
    pub error: Value,
    pub stdout: Value,
    pub stderr: Value,
}

/// One finished task in a `result_reply` (its buffers follow the reply's frames).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub header: Value,
    pub metadata: Value,
    pub result_header: Value,
    pub result_metadata: Value,
    pub result_content: Value,
    pub received: Option<String>,
    pub io: ResultIo,
}

/// Content of `result_reply`: `{status, "<msg_id>": ResultRecord, ..., pending, completed}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultReply {
    #[serde(default = "ok")]
    pub status: String,
    #[serde(flatten)]
    pub results: BTreeMap<String, ResultRecord>,
    pub pending: Vec<String>,
    pub completed: Vec<String>,
}

/// `msg_ids` of a `purge_request`: a list, or `"all"` (finished records of every task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PurgeIds {
    Ids(Vec<String>),
    Named(String),
}

/// Content of `purge_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PurgeRequest {
    #[serde(default)]
    pub msg_ids: Option<PurgeIds>,
    /// Engines whose finished records go.
    #[serde(default)]
    pub engine_ids: Option<Vec<EngineRef>>,
}

/// Content of `resubmit_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResubmitRequest {
    #[serde(default)]
    pub msg_ids: Vec<String>,
}

/// Content of `resubmit_reply`: the new msg_id of each task resubmitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResubmitReply {
    pub status: String,
    pub resubmitted: BTreeMap<String, String>,
}

/// Content of `history_reply`: every task's msg_id, by submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReply {
    pub status: String,
    pub history: Vec<String>,
}

impl HistoryReply {
    /// The msg_ids of a `history_reply` as a client reads them: entries that are not strings
    /// are skipped, a missing list is empty.
    pub fn read_history(content: &serde_json::Value) -> Vec<String> {
        #[derive(Deserialize, Default)]
        struct History {
            #[serde(default, deserialize_with = "crate::content::lenient_strings")]
            history: Vec<String>,
        }
        crate::content::read_or_default::<History>(content).history
    }
}

/// Content of `db_request`: a Mongo-style `query` over task records and the `keys` to return.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbRequest {
    #[serde(default = "empty_object")]
    pub query: Value,
    #[serde(default)]
    pub keys: Option<Vec<String>>,
}

/// Content of `db_reply` (the buffers follow its frames, counted by the `*_lens` lists, which
/// are `null` when not asked for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbReply {
    pub status: String,
    pub records: Vec<Value>,
    pub buffer_lens: Option<Vec<usize>>,
    pub result_buffer_lens: Option<Vec<usize>>,
}

/// Content of `load_reply`: `{status, "<engine id>": tasks in flight, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReply {
    pub status: String,
    #[serde(flatten)]
    pub loads: BTreeMap<String, usize>,
}

/// Content of `connection_reply`: the ready engines by id, and where rpx engines keep their
/// values (absent when none says).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionReply {
    #[serde(default)]
    pub status: String,
    /// Engine uuids by engine id (as a string, the JSON key).
    #[serde(default)]
    pub engines: BTreeMap<String, String>,
    /// Key [`crate::dataplane::CONNECTION_REPLY_KEY`].
    #[serde(rename = "rpx_hosts", default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<BTreeMap<String, HostIdentity>>,
    /// rpx controllers: load-balanced requests may come in [`crate::batch`] batches (an extra
    /// key: ipyparallel's client reads only `engines`). A client that sends one is answered in
    /// batches too.
    #[serde(rename = "rpx_batches", default, skip_serializing_if = "std::ops::Not::not")]
    pub batches: bool,
}

/// Content of `unregistration_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnregistrationRequest {
    #[serde(default)]
    pub id: Option<u64>,
}

/// Content of `registration_notification` and `unregistration_notification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineNotification {
    pub id: u64,
    pub uuid: String,
    /// Key [`crate::dataplane::NOTIFICATION_KEY`]: where an rpx engine keeps its values (an
    /// extra key: ipyparallel's client reads only id and uuid).
    #[serde(rename = "rpx_host", default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostIdentity>,
}

/// Content with only a status: `purge_reply`, `shutdown_reply`, `shutdown_notification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub status: String,
}

impl StatusReply {
    /// `{"status": "ok"}`.
    pub fn ok() -> StatusReply {
        StatusReply { status: ok() }
    }
}

/// The keys the hub writes into a broadcast request's and reply's metadata, with the rest of
/// the metadata kept as it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BroadcastMetadata {
    #[serde(default)]
    pub is_broadcast: bool,
    #[serde(default)]
    pub is_coalescing: bool,
    /// The client's msg_id of the broadcast (each engine's copy has `<original>_<uuid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_msg_id: Option<String>,
    /// In a coalesced reply: the `[uuid, id]` of each engine, in the order of the buffers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast_targets: Option<Vec<(String, u64)>>,
    /// Every other key.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A task dependency (`after` or `follow` in a load-balanced request's metadata): one msg_id, a
/// list, or ipyparallel's `Dependency` dict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dependency {
    One(String),
    Ids(Vec<String>),
    Spec(DependencySpec),
}

/// ipyparallel's `Dependency` as a dict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DependencySpec {
    #[serde(default)]
    pub dependencies: Option<Vec<String>>,
    /// All of them (or any one) must be met.
    #[serde(default = "yes")]
    pub all: bool,
    /// A dependency that succeeded counts as met.
    #[serde(default = "yes")]
    pub success: bool,
    /// A dependency that failed counts as met.
    #[serde(default)]
    pub failure: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_keys_match_the_dataplane_constants() {
        let n = EngineNotification { id: 1, uuid: "u".into(), host: Some(host()) };
        assert!(serde_json::to_value(&n).unwrap().get(crate::dataplane::NOTIFICATION_KEY).is_some());
        // The engine's data link reaches clients through the controller unchanged.
        let back: EngineNotification = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(back.host.and_then(|h| h.data).as_deref(), Some("10.0.0.2:4000"));
        let r = ConnectionReply { status: ok(), engines: BTreeMap::new(), hosts: Some([("u".to_string(), host())].into()), batches: false };
        assert!(serde_json::to_value(&r).unwrap().get(crate::dataplane::CONNECTION_REPLY_KEY).is_some());
    }

    fn host() -> HostIdentity {
        HostIdentity { hostname: "h".into(), boot_id: "b".into(), ns_dir: "/n".into(), data: Some("10.0.0.2:4000".into()) }
    }

    #[test]
    fn requests_default_missing_fields() {
        let q: QueueRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!(q, QueueRequest { verbose: false, targets: None });
        let q: QueueRequest = serde_json::from_value(json!({"targets": [0, "u", -1], "verbose": true})).unwrap();
        let t = q.targets.unwrap().into_vec();
        assert_eq!(t, vec![EngineRef::Id(0), EngineRef::Uuid("u".into()), EngineRef::Other(json!(-1))]);
        assert_eq!(t.iter().map(ToString::to_string).collect::<Vec<_>>(), ["0", "\"u\"", "-1"]);
        let d: DbRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!((d.query, d.keys), (json!({}), None));
        let p: PurgeRequest = serde_json::from_value(json!({"msg_ids": "all"})).unwrap();
        assert_eq!(p.msg_ids, Some(PurgeIds::Named("all".into())));
    }

    #[test]
    fn replies_keep_ipyparallel_shapes() {
        let r = QueueReply {
            status: ok(),
            engines: [("0".to_string(), EngineQueue::Counts { queue: 1, completed: 2, tasks: 3 })].into(),
            unassigned: Unassigned::Count(0),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"status": "ok", "0": {"queue": 1, "completed": 2, "tasks": 3}, "unassigned": 0})
        );
        let d = DbReply { status: ok(), records: vec![], buffer_lens: None, result_buffer_lens: Some(vec![1]) };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"status": "ok", "records": [], "buffer_lens": null, "result_buffer_lens": [1]})
        );
        let n = EngineNotification { id: 3, uuid: "u".into(), host: None };
        assert_eq!(serde_json::to_value(&n).unwrap(), json!({"id": 3, "uuid": "u"}));
    }

    #[test]
    fn broadcast_metadata_keeps_other_keys() {
        let mut m: BroadcastMetadata = serde_json::from_value(json!({"is_coalescing": true, "x": 1})).unwrap();
        assert!(m.is_coalescing && !m.is_broadcast);
        m.is_broadcast = true;
        m.original_msg_id = Some("o".into());
        assert_eq!(serde_json::to_value(&m).unwrap(), json!({"is_broadcast": true, "is_coalescing": true, "original_msg_id": "o", "x": 1}));
    }

    #[test]
    fn dependencies_in_every_form() {
        let d = |v: Value| serde_json::from_value::<Dependency>(v).unwrap();
        assert_eq!(d(json!("a")), Dependency::One("a".into()));
        assert_eq!(d(json!(["a"])), Dependency::Ids(vec!["a".into()]));
        assert_eq!(
            d(json!({"dependencies": ["a"], "all": false})),
            Dependency::Spec(DependencySpec { dependencies: Some(vec!["a".into()]), all: false, success: true, failure: false })
        );
    }
}
