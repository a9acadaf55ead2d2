//! Broadcast fan-out to the targeted engines and coalesced replies.

use foldhash::{HashMap, HashMapExt};
use serde_json::{json, Value};
use tracing::warn;

use rpx_protocol::content::ErrorName;
use rpx_protocol::hub::BroadcastMetadata;
use rpx_protocol::message::error_content;
use rpx_protocol::session::{join_frames, json_frame};

use super::{Coalesce, Comm, Hub, Sock};
use crate::state::InFlight;
use crate::wire::{reply_type, Chan, Reply, Request};

impl Hub {
    pub(super) fn on_broadcast<C: Comm>(&mut self, c: &mut C, r: Request) {
        let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(&r.signed[1]) else {
            return warn!("dropped a broadcast with a bad header");
        };
        let mut meta: BroadcastMetadata = serde_json::from_slice(&r.signed[3]).unwrap_or_default();
        let orig = meta.original_msg_id.clone().unwrap_or_else(|| r.msg_id.clone());
        meta.original_msg_id = Some(orig.clone());
        meta.is_broadcast = true;
        meta.is_coalescing = r.info.is_coalescing;
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
        let m = json_frame(&meta);
        for (uuid, _) in &r.info.bcast_targets {
            let child = format!("{orig}_{uuid}");
            header.insert("msg_id".into(), json!(child));
            // A new header and metadata; the content and buffers are forwarded as received.
            let h = json_frame(&header);
            let signed =
                self.session.signed_part(h.clone(), r.signed[2].clone(), m.clone(), r.signed[4].clone(), r.signed[5..].iter().cloned());
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
                    let content = error_content(ErrorName::EngineError, &evalue, vec![format!("EngineError: {evalue}")], None);
                    let parent: Value = Value::Object(header.clone());
                    let md = BroadcastMetadata {
                        is_broadcast: true,
                        is_coalescing: r.info.is_coalescing,
                        original_msg_id: Some(orig.clone()),
                        broadcast_targets: None,
                        other: [("status".to_string(), json!("error"))].into_iter().collect(),
                    };
                    let signed = self.make_signed(&reply_type(&r.msg_type), &parent, &md, &content);
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
        let mut m: BroadcastMetadata = serde_json::from_slice(&r.signed[3]).unwrap_or_default();
        m.broadcast_targets = Some(co.targets.clone());
        m.original_msg_id = Some(orig.to_string());
        m.is_coalescing = true;
        m.is_broadcast = true;
        let mut buffers = Vec::new();
        for (u, _) in &co.targets {
            buffers.extend(co.replies.get(u).cloned().unwrap_or_default());
        }
        // The last engine's reply with the metadata above and every engine's buffers; its
        // header, parent and content are forwarded as received.
        let signed = self.session.signed_part(r.signed[1].clone(), r.signed[2].clone(), json_frame(&m), r.signed[4].clone(), buffers);
        let mut idents = vec![co.client];
        idents.extend(co.route);
        c.send(Sock::Client(Chan::Bcast), join_frames(idents, signed));
    }
}
