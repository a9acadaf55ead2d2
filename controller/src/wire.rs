//! From raw frames to routing facts: signature verification and the few header and metadata
//! fields the hub needs (msg_id, msg_type, dates, task metadata). The signed part of a message is
//! kept as received so that it can be forwarded unchanged.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use rpx_protocol::Session;

/// The four request/reply channels that route between clients and engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chan {
    Mux,
    Task,
    Control,
    Bcast,
}

impl Chan {
    pub const ALL: [Chan; 4] = [Chan::Mux, Chan::Task, Chan::Control, Chan::Bcast];

    pub fn name(&self) -> &'static str {
        match self {
            Chan::Mux => "mux",
            Chan::Task => "task",
            Chan::Control => "control",
            Chan::Bcast => "broadcast",
        }
    }

    /// Identity of the controller's engine-facing ROUTER (Python engines' ROUTERs address it).
    pub fn engine_side_identity(&self) -> &'static [u8] {
        match self {
            Chan::Mux => b"mux_out",
            Chan::Task => b"task_out",
            Chan::Control => b"control_out",
            Chan::Bcast => b"bcast_out",
        }
    }

    /// Identity of the controller's client-facing ROUTER.
    pub fn client_side_identity(&self) -> &'static [u8] {
        match self {
            Chan::Mux => b"mux_in",
            Chan::Task => b"task_in",
            Chan::Control => b"control_in",
            Chan::Bcast => b"bcast_in",
        }
    }
}

/// Why frames were dropped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DropReason {
    #[error("bad frames: {0}")]
    Malformed(String),
    #[error("invalid signature")]
    BadSignature,
    #[error("missing routing identity")]
    NoIdentity,
}

fn verify(session: &Session, frames: Vec<Bytes>) -> Result<(Vec<Bytes>, Vec<Bytes>), DropReason> {
    session.verify_frames(frames).map_err(|e| match e {
        rpx_protocol::Error::BadSignature => DropReason::BadSignature,
        other => DropReason::Malformed(other.to_string()),
    })
}

#[derive(Deserialize)]
struct HeaderLite {
    msg_id: String,
    msg_type: String,
    #[serde(default)]
    date: Option<String>,
}

#[derive(Deserialize)]
struct ParentLite {
    #[serde(default)]
    msg_id: Option<String>,
}

#[derive(Deserialize, Default)]
struct RequestMeta {
    #[serde(default)]
    targets: Option<Value>,
    #[serde(default)]
    retries: Option<Value>,
    #[serde(default)]
    timeout: Option<Value>,
    #[serde(default)]
    after: Option<Value>,
    #[serde(default)]
    follow: Option<Value>,
    #[serde(default)]
    is_coalescing: Option<bool>,
}

#[derive(Deserialize, Default)]
struct ReplyMeta {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    dependencies_met: Option<bool>,
    #[serde(default)]
    started: Option<String>,
}

#[derive(Deserialize)]
struct StatusOnly {
    #[serde(default)]
    status: Option<String>,
}

fn header(signed: &[Bytes]) -> Result<HeaderLite, DropReason> {
    serde_json::from_slice(&signed[1]).map_err(|e| DropReason::Malformed(format!("header: {e}")))
}

/// Metadata of a request that the schedulers read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// `targets` of a load-balanced task: engine uuids.
    pub targets: Vec<String>,
    /// `targets` of a broadcast: `[uuid, id]` pairs.
    pub bcast_targets: Vec<(String, u64)>,
    pub retries: u32,
    /// Seconds the task may wait in the queue.
    pub timeout: Option<f64>,
    pub after: Option<Value>,
    pub follow: Option<Value>,
    pub is_coalescing: bool,
}

/// A verified request from a client.
#[derive(Debug, Clone)]
pub struct Request {
    pub chan: Chan,
    /// The client's routing identity.
    pub client: Bytes,
    /// Identities after the client's (for mux/control: the target engine uuid first).
    pub route: Vec<Bytes>,
    /// `[signature, header, parent, metadata, content, buffers...]`, unchanged.
    pub signed: Vec<Bytes>,
    pub msg_id: String,
    pub msg_type: String,
    pub date: Option<String>,
    pub info: RequestInfo,
}

/// Verify and read a request received on a client-facing ROUTER.
pub fn parse_request(session: &Session, chan: Chan, frames: Vec<Bytes>) -> Result<Request, DropReason> {
    let (mut idents, signed) = verify(session, frames)?;
    if idents.is_empty() {
        return Err(DropReason::NoIdentity);
    }
    let client = idents.remove(0);
    let h = header(&signed)?;
    // A correctly signed message whose other JSON frames do not parse would reach an engine that
    // can never answer it; refuse it here (validation only, nothing is built).
    for (i, name) in [(2, "parent_header"), (3, "metadata"), (4, "content")] {
        serde_json::from_slice::<serde::de::IgnoredAny>(&signed[i]).map_err(|e| DropReason::Malformed(format!("{name}: {e}")))?;
    }
    let mut info = RequestInfo::default();
    if matches!(chan, Chan::Task | Chan::Bcast) {
        let m: RequestMeta = serde_json::from_slice(&signed[3]).unwrap_or_default();
        match (chan, m.targets) {
            (Chan::Task, Some(Value::Array(ts))) => {
                info.targets = ts.iter().filter_map(|t| t.as_str().map(str::to_string)).collect();
            }
            (Chan::Task, Some(Value::String(t))) => info.targets = vec![t],
            (Chan::Bcast, Some(Value::Array(ts))) => {
                for t in ts {
                    let uuid = t.get(0).and_then(Value::as_str);
                    let id = t.get(1).and_then(Value::as_u64);
                    match (uuid, id) {
                        (Some(u), Some(i)) => info.bcast_targets.push((u.to_string(), i)),
                        _ => return Err(DropReason::Malformed(format!("broadcast target {t}"))),
                    }
                }
            }
            _ => {}
        }
        info.retries = m.retries.as_ref().and_then(Value::as_u64).unwrap_or(0) as u32;
        info.timeout = m.timeout.as_ref().and_then(Value::as_f64).filter(|t| *t > 0.0);
        info.after = m.after.filter(|v| !v.is_null());
        info.follow = m.follow.filter(|v| !v.is_null());
        info.is_coalescing = m.is_coalescing.unwrap_or(false);
    }
    Ok(Request { chan, client, route: idents, signed, msg_id: h.msg_id, msg_type: h.msg_type, date: h.date, info })
}

/// A verified reply (or other message) from an engine.
#[derive(Debug, Clone)]
pub struct Reply {
    pub chan: Chan,
    /// The engine's routing identity (its uuid).
    pub engine: Bytes,
    /// Identities after the engine's: the route back to the client.
    pub route: Vec<Bytes>,
    pub signed: Vec<Bytes>,
    pub msg_type: String,
    /// Header date: when the engine completed the request.
    pub date: Option<String>,
    pub parent_msg_id: Option<String>,
    /// Metadata `status` (or content `status` when the metadata has none).
    pub status: Option<String>,
    pub dependencies_met: bool,
    pub started: Option<String>,
}

/// Verify and read a message received on an engine-facing ROUTER.
pub fn parse_reply(session: &Session, chan: Chan, frames: Vec<Bytes>) -> Result<Reply, DropReason> {
    let (mut idents, signed) = verify(session, frames)?;
    if idents.is_empty() {
        return Err(DropReason::NoIdentity);
    }
    let engine = idents.remove(0);
    let h = header(&signed)?;
    let parent: ParentLite = serde_json::from_slice(&signed[2]).unwrap_or(ParentLite { msg_id: None });
    let meta: ReplyMeta = serde_json::from_slice(&signed[3]).unwrap_or_default();
    let status = match meta.status {
        Some(s) => Some(s),
        None => serde_json::from_slice::<StatusOnly>(&signed[4]).ok().and_then(|s| s.status),
    };
    Ok(Reply {
        chan,
        engine,
        route: idents,
        signed,
        msg_type: h.msg_type,
        date: h.date,
        parent_msg_id: parent.msg_id,
        status,
        dependencies_met: meta.dependencies_met.unwrap_or(true),
        started: meta.started,
    })
}

/// The reply type for a request type: `x_request` -> `x_reply`.
pub fn reply_type(request_type: &str) -> String {
    match request_type.strip_suffix("_request") {
        Some(stem) => format!("{stem}_reply"),
        None => format!("{request_type}_reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpx_protocol::session::json_frame;
    use serde_json::json;

    fn frames(s: &Session, idents: &[&'static [u8]], meta: Value) -> Vec<Bytes> {
        let ids: Vec<Bytes> = idents.iter().map(|i| Bytes::from_static(i)).collect();
        s.msg(&ids, "apply_request", json!({}), None, meta, &[Bytes::from_static(b"buf")]).1
    }

    #[test]
    fn task_request_metadata_is_read() {
        let s = Session::new(b"k", "t");
        let f = frames(&s, &[b"client"], json!({"targets": ["u1", "u2"], "retries": 2, "timeout": 1.5, "after": [], "follow": null}));
        let r = parse_request(&s, Chan::Task, f).unwrap();
        assert_eq!(r.client, Bytes::from_static(b"client"));
        assert!(r.route.is_empty());
        assert_eq!(r.info.targets, vec!["u1", "u2"]);
        assert_eq!(r.info.retries, 2);
        assert_eq!(r.info.timeout, Some(1.5));
        assert_eq!(r.info.follow, None);
        assert_eq!(r.msg_type, "apply_request");
        assert_eq!(r.signed.len(), 6);
    }

    #[test]
    fn signed_request_with_non_json_content_is_dropped_not_routed() {
        let s = Session::new(b"k", "t");
        let h = serde_json::to_vec(&s.header("execute_request")).unwrap();
        let content = b"not json at all".to_vec();
        let f = s.frames(
            [Bytes::from_static(b"client")],
            Bytes::from(h),
            json_frame(&json!({})),
            json_frame(&json!({})),
            Bytes::from(content),
            [],
        );
        assert!(matches!(parse_request(&s, Chan::Mux, f), Err(DropReason::Malformed(m)) if m.starts_with("content")));
    }

    #[test]
    fn bad_signature_and_garbage_are_dropped() {
        let s = Session::new(b"k", "t");
        let other = Session::new(b"other", "t");
        let f = frames(&other, &[b"client"], json!({}));
        assert_eq!(parse_request(&s, Chan::Mux, f).unwrap_err(), DropReason::BadSignature);
        assert!(matches!(parse_request(&s, Chan::Mux, vec![Bytes::from_static(b"x")]), Err(DropReason::Malformed(_))));
        let f = frames(&s, &[], json!({}));
        assert_eq!(parse_request(&s, Chan::Mux, f).unwrap_err(), DropReason::NoIdentity);
    }

    #[test]
    fn broadcast_targets_are_pairs() {
        let s = Session::new(b"k", "t");
        let f = frames(&s, &[b"c"], json!({"targets": [["u1", 0], ["u2", 3]], "is_coalescing": true}));
        let r = parse_request(&s, Chan::Bcast, f).unwrap();
        assert_eq!(r.info.bcast_targets, vec![("u1".to_string(), 0), ("u2".to_string(), 3)]);
        assert!(r.info.is_coalescing);
    }

    #[test]
    fn reply_fields_are_read() {
        let s = Session::new(b"k", "t");
        let parent = s.header("apply_request");
        let (_, f) = s.msg(
            &[Bytes::from_static(b"engine"), Bytes::from_static(b"client")],
            "apply_reply",
            json!({"status": "ok"}),
            Some(&parent),
            json!({"started": "2020-01-01T00:00:00Z", "dependencies_met": false}),
            &[],
        );
        let r = parse_reply(&s, Chan::Task, f).unwrap();
        assert_eq!(r.engine, Bytes::from_static(b"engine"));
        assert_eq!(r.route, vec![Bytes::from_static(b"client")]);
        assert_eq!(r.parent_msg_id.as_deref(), Some(parent.msg_id.as_str()));
        assert_eq!(r.status.as_deref(), Some("ok"));
        assert!(!r.dependencies_met);
        assert_eq!(r.started.as_deref(), Some("2020-01-01T00:00:00Z"));
    }

    #[test]
    fn reply_types() {
        assert_eq!(reply_type("apply_request"), "apply_reply");
        assert_eq!(reply_type("weird"), "weird_reply");
    }
}
