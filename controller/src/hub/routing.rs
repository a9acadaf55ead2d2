//! Routing between clients and engines on mux and control, and replies from engines.

use std::time::Instant;

use serde_json::{json, Value};
use tracing::{debug, info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::message::error_content;
use rpx_protocol::session::join_frames;

use super::{Comm, Hub, Sock, HUB_IDENT};
use crate::state::{InFlight, Record};
use crate::wire::{reply_type, Chan, Reply, Request};

impl Hub {
    pub(super) fn on_request<C: Comm>(&mut self, c: &mut C, r: Request, now: Instant) {
        match r.chan {
            Chan::Mux | Chan::Control => self.on_direct_request(c, r),
            Chan::Task => self.on_task_submitted(c, r, now),
            Chan::Bcast => self.on_broadcast(c, r),
        }
    }

    fn on_direct_request<C: Comm>(&mut self, c: &mut C, mut r: Request) {
        let target = if r.route.is_empty() { None } else { Some(r.route.remove(0)) };
        let id = target.as_ref().and_then(|t| self.engines.id_of(t));
        let Some(id) = id else {
            let who = target.map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
            warn!(chan = r.chan.name(), engine = %who, msg_id = %r.msg_id, "request for an unknown engine");
            let evalue = format!("Engine {who:?} is not registered; cannot run task {}", r.msg_id);
            let content = error_content(ErrorName::EngineError, &evalue, vec![format!("EngineError: {evalue}")], None);
            let parent: Value = serde_json::from_slice(&r.signed[1]).unwrap_or_else(|_| json!({}));
            let signed = self.make_signed(&reply_type(&r.msg_type), &parent, &json!({"status": "error"}), &content);
            c.send(Sock::Client(r.chan), join_frames(vec![r.client], signed));
            return;
        };
        let e = self.engines.get_mut(id).expect("indexed");
        let ident = e.ident.clone();
        e.inflight.insert(
            r.msg_id.clone(),
            InFlight { chan: r.chan, client: Some(r.client.clone()), msg_type: r.msg_type.clone(), header: r.signed[1].clone() },
        );
        if r.chan == Chan::Mux {
            let mut rec = Record::submitted(&r.msg_id, Chan::Mux, &r.signed, &r.client);
            rec.engine_uuid = Some(String::from_utf8_lossy(&ident).into_owned());
            self.records.insert(rec);
        }
        let mut idents = Vec::with_capacity(2 + r.route.len());
        idents.push(ident);
        idents.push(r.client);
        idents.extend(r.route);
        self.send_to_engine(c, r.chan, id, join_frames(idents, r.signed));
    }

    pub(super) fn on_reply<C: Comm>(&mut self, c: &mut C, r: Reply, now: Instant) {
        let Some(id) = self.engines.id_of(&r.engine) else {
            warn!(chan = r.chan.name(), engine = %String::from_utf8_lossy(&r.engine), msg_type = %r.msg_type, "dropped a message from an unregistered engine");
            self.tell_evicted(c, &r.engine, now);
            return;
        };
        let e = self.engines.get_mut(id).expect("indexed");
        e.last_seen = now;
        if !e.connected.contains(&r.chan) {
            e.connected.insert(r.chan);
            self.flush_outbox(c, id);
        }
        self.make_ready(c, id, now);
        let e = self.engines.get_mut(id).expect("indexed");
        let uuid = e.uuid.clone();
        let parent = r.parent_msg_id.clone().unwrap_or_default();
        let inf = e.inflight.remove(&parent);
        if inf.is_some() && matches!(r.chan, Chan::Mux | Chan::Task) {
            e.note_completed(&parent);
        }
        if inf.is_none() && self.answered.contains(&parent) {
            // Answered (failed or queued again) when this engine was evicted; it ran it anyway.
            info!(engine_id = id, msg_id = %parent, msg_type = %r.msg_type, "dropped a stale reply to a request answered when its engine was evicted");
            return;
        }
        match r.chan {
            Chan::Mux | Chan::Control => {
                if r.chan == Chan::Mux && inf.is_some() {
                    self.complete_record(&parent, &r.signed, r.started.clone(), r.date.clone(), &uuid);
                }
                self.forward_reply(c, r);
            }
            Chan::Task => self.on_task_reply(c, id, r, inf.is_some(), now),
            Chan::Bcast => {
                let orig = parent.strip_suffix(&format!("_{uuid}")).unwrap_or(&parent).to_string();
                if self.coalesce.contains_key(&orig) {
                    self.on_coalesced_reply(c, &orig, &uuid, r);
                } else {
                    self.forward_reply(c, r);
                }
            }
        }
    }

    /// `[engine, client, rest...]` -> `[client, engine, rest...]` to the client-facing socket.
    pub(super) fn forward_reply<C: Comm>(&mut self, c: &mut C, r: Reply) {
        if r.route.is_empty() || r.route[0].as_ref() == HUB_IDENT {
            if r.route.is_empty() {
                debug!(msg_type = %r.msg_type, "engine message without a client route; not forwarded");
            }
            return;
        }
        let mut route = r.route;
        let client = route.remove(0);
        let mut idents = Vec::with_capacity(2 + route.len());
        idents.push(client);
        idents.push(r.engine);
        idents.extend(route);
        c.send(Sock::Client(r.chan), join_frames(idents, r.signed));
    }
}
