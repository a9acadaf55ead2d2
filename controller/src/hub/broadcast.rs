//! Broadcast fan-out to the targeted engines and coalesced replies.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tracing::warn;

use rpx_protocol::message::error_content;
use rpx_protocol::session::join_frames;

use super::{Coalesce, Comm, Hub, Sock};
use crate::state::InFlight;
use crate::wire::{reply_type, Chan, Reply, Request};

impl Hub {
    pub(super) fn on_broadcast<C: Comm>(&mut self, c: &mut C, r: Request) {
        let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(&r.signed[1]) else {
            return warn!("dropped a broadcast with a bad header");
        };
        let mut meta = match serde_json::from_slice::<Value>(&r.signed[3]) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let orig = meta.get("original_msg_id").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| r.msg_id.clone());
        meta.insert("original_msg_id".into(), json!(orig));
        meta.insert("is_broadcast".into(), json!(true));
        meta.insert("is_coalescing".into(), json!(r.info.is_coalescing));
        if r.info.is_coalescing {
            self.coalesce.insert(
                orig.clone(),
                Coalesce {
                    client: r.client.clone(),
                    route: r.route.clone(),
                    targets: r.info.bcast_targets.clone(),
                    replies: HashMap::new(),
                },
            );
        }
        let m = Bytes::from(serde_json::to_vec(&meta).expect("json"));
        for (uuid, _) in &r.info.bcast_targets {
            let child = format!("{orig}_{uuid}");
            header.insert("msg_id".into(), json!(child));
            let h = Bytes::from(serde_json::to_vec(&header).expect("json"));
            let sig = Bytes::from(self.session.sign(&[&h, &r.signed[2], &m, &r.signed[4]]));
            let mut signed = vec![sig, h.clone(), r.signed[2].clone(), m.clone(), r.signed[4].clone()];
            signed.extend(r.signed[5..].iter().cloned());
            match self.engines.id_of(uuid.as_bytes()) {
                Some(id) => {
                    let e = self.engines.get_mut(id).expect("indexed");
                    let ident = e.ident.clone();
                    e.inflight.insert(
                        child.clone(),
                        InFlight { chan: Chan::Bcast, client: Some(r.client.clone()), msg_type: r.msg_type.clone(), header: h },
                    );
                    let mut idents = vec![ident, r.client.clone()];
                    idents.extend(r.route.iter().cloned());
                    self.send_to_engine(c, Chan::Bcast, id, join_frames(idents, signed));
                }
                None => {
                    warn!(engine = %uuid, "broadcast to an unknown engine");
                    self.coalesce.remove(&orig);
                    let evalue = format!("Engine {uuid:?} is not registered; cannot run task {child}");
                    let content = error_content("EngineError", &evalue, vec![format!("EngineError: {evalue}")], None);
                    let parent: Value = Value::Object(header.clone());
                    let md =
                        json!({"status": "error", "is_broadcast": true, "is_coalescing": r.info.is_coalescing, "original_msg_id": orig});
                    let signed = self.make_signed(&reply_type(&r.msg_type), &parent, &md, &content, &[]);
                    c.send(Sock::Client(Chan::Bcast), join_frames(vec![r.client.clone()], signed));
                }
            }
        }
    }

    pub(super) fn on_coalesced_reply<C: Comm>(&mut self, c: &mut C, orig: &str, uuid: &str, r: Reply) {
        let co = self.coalesce.get_mut(orig).expect("checked");
        co.replies.insert(uuid.to_string(), r.signed[5..].to_vec());
        if co.replies.len() < co.targets.len() {
            return;
        }
        let co = self.coalesce.remove(orig).expect("present");
        let parse = |b: &Bytes| serde_json::from_slice::<Value>(b).unwrap_or_else(|_| json!({}));
        let (h, p, mut m, content) = (parse(&r.signed[1]), parse(&r.signed[2]), parse(&r.signed[3]), parse(&r.signed[4]));
        m["broadcast_targets"] = json!(co.targets.iter().map(|(u, i)| json!([u, i])).collect::<Vec<_>>());
        m["original_msg_id"] = json!(orig);
        m["is_coalescing"] = json!(true);
        m["is_broadcast"] = json!(true);
        let mut buffers = Vec::new();
        for (u, _) in &co.targets {
            buffers.extend(co.replies.get(u).cloned().unwrap_or_default());
        }
        let enc = |v: &Value| Bytes::from(serde_json::to_vec(v).expect("json"));
        let (h, p, m, content) = (enc(&h), enc(&p), enc(&m), enc(&content));
        let sig = Bytes::from(self.session.sign(&[&h, &p, &m, &content]));
        let mut signed = vec![sig, h, p, m, content];
        signed.extend(buffers);
        let mut idents = vec![co.client];
        idents.extend(co.route);
        c.send(Sock::Client(Chan::Bcast), join_frames(idents, signed));
    }
}
