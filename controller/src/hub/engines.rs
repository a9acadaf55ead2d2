//! Engines: heartbeats, registration (ready once reachable for routing and its heart answered),
//! eviction notices, and engine death (failing or retrying what it had).

use std::time::Instant;

use bytes::Bytes;
use serde_json::{json, Value};
use tracing::{info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::hub::{BroadcastMetadata, EngineNotification};
use rpx_protocol::message::{engine_info, error_content};
use rpx_protocol::registration::{msg_type as reg_msg, EvictionNotice, RegistrationReply, RegistrationRequest};
use rpx_protocol::session::join_frames;
use rpx_protocol::Message;

use super::{first_ping_spacing, Comm, Hub, Sock, CONNECTION_CLOSED, UNREGISTERED};
use crate::state::{Engine, Evicted, InFlight};
use crate::wire::{reply_type, Chan};

impl Hub {
    pub(super) fn on_pong<C: Comm>(&mut self, c: &mut C, ident: &[u8], now: Instant) {
        match self.engines.id_of(ident) {
            Some(id) => {
                let e = self.engines.get_mut(id).expect("indexed");
                e.last_seen = now;
                let first = !e.ponged;
                e.ponged = true;
                if first {
                    self.awaiting_pong.remove(&id);
                    if e.routable() {
                        self.make_ready(c, id, now);
                    }
                }
            }
            None => self.tell_evicted(c, ident, now),
        }
    }

    /// When to send an extra heartbeat ping: while an engine has registered but its heart has
    /// not answered yet, every [`FIRST_PING_EVERY`], so that an engine is scheduled as soon as
    /// its heart beats (as ipyparallel's hub does) rather than up to a period later. Spaced by
    /// [`first_ping_spacing`] so that the answers stay under [`FIRST_PONGS_PER_SEC`]. O(1): the
    /// network layer asks after every batch of events.
    pub fn first_ping_at(&self) -> Option<Instant> {
        if self.awaiting_pong.is_empty() {
            return None;
        }
        Some(self.last_first_ping.map_or(self.started, |t| t + first_ping_spacing(self.engines.by_id.len())))
    }

    /// Registered engines whose heart has not answered yet.
    pub fn awaiting_first_pong(&self) -> usize {
        self.awaiting_pong.len()
    }

    /// Complete no registration before `until` (a restarted controller: see `net`); the
    /// engines ready by then are registered at the first tick after it.
    pub fn hold_registrations(&mut self, until: Instant) {
        self.hold_until = Some(until);
    }

    /// Send the extra ping that [`Hub::first_ping_at`] asked for.
    pub fn on_first_ping<C: Comm>(&mut self, c: &mut C, now: Instant) {
        self.last_first_ping = Some(now);
        self.send_ping(c, now);
    }

    pub(super) fn send_ping<C: Comm>(&self, c: &mut C, now: Instant) {
        let lifetime = now.duration_since(self.started).as_secs_f64();
        c.send(Sock::HbPing, vec![Bytes::from(format!("{lifetime:.6}"))]);
    }

    /// `ident` (an engine's uuid) was heard from but is not registered: if it is an rpx engine
    /// this hub evicted, send it an [`EvictionNotice`] so that it registers again.
    pub(super) fn tell_evicted<C: Comm>(&mut self, c: &mut C, ident: &[u8], now: Instant) {
        if self.evictions.is_empty() {
            return;
        }
        let Ok(uuid) = std::str::from_utf8(ident) else { return };
        if let Some((to, notice)) = self.evictions.heard(uuid, now) {
            info!(engine_id = notice.id, %uuid, reason = %notice.reason, "an evicted engine is alive: telling it to register again");
            let content = serde_json::to_value(&notice).expect("notice serializes");
            let (_, frames) = self.session.msg(&[to], reg_msg::EVICTION_NOTICE, content, None, json!({}), &[]);
            c.send(Sock::Query, frames);
        }
    }

    pub(super) fn on_peer<C: Comm>(&mut self, c: &mut C, sock: Sock, ident: Bytes, connected: bool, now: Instant) {
        let chan = match sock {
            Sock::Engine(chan) => chan,
            Sock::HbPong => {
                if !connected {
                    if let Some(id) = self.engines.id_of(&ident) {
                        self.on_engine_died(c, id, &format!("heartbeat {CONNECTION_CLOSED}"), now);
                    }
                }
                return;
            }
            // Client disconnects (and the shared registration socket) say nothing about engines.
            _ => return,
        };
        let set = self.connected.entry(chan).or_default();
        if connected {
            set.insert(ident.clone());
            if let Some(id) = self.engines.id_of(&ident) {
                self.engines.get_mut(id).expect("indexed").connected.insert(chan);
                self.flush_outbox(c, id);
                if matches!(chan, Chan::Mux | Chan::Task) {
                    self.make_ready(c, id, now);
                }
            }
        } else {
            set.remove(&ident);
            if let Some(id) = self.engines.id_of(&ident) {
                self.engines.get_mut(id).expect("indexed").connected.remove(&chan);
                if matches!(chan, Chan::Mux | Chan::Task) {
                    self.on_engine_died(c, id, &format!("{} {CONNECTION_CLOSED}", chan.name()), now);
                }
            }
        }
    }

    pub(super) fn on_register<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, now: Instant) {
        let req: RegistrationRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(_) if !msg.content.as_object().is_some_and(|c| c.contains_key("uuid")) => {
                return self.hub_error(c, ident, msg, ErrorName::KeyError, "registration_request without uuid")
            }
            Err(e) => return self.hub_error(c, ident, msg, ErrorName::ValueError, &format!("bad registration_request: {e}")),
        };
        let uuid = req.uuid.clone();
        if let Some(id) = self.engines.id_of(uuid.as_bytes()) {
            // An rpx engine that believed us gone registers again while we still have it: it
            // keeps its registration (id, tasks); notices now go to its new socket.
            if req.notify_eviction && req.id.is_none_or(|r| r == id) {
                let e = self.engines.get_mut(id).expect("indexed");
                e.registration = msg.header.msg_id.clone();
                e.notice_to = Some(ident.clone());
                e.host = req.host.clone();
                e.last_seen = now;
                if req.batches {
                    c.batches_to(Sock::Engine(Chan::Task), e.ident.clone());
                }
                info!(engine_id = id, %uuid, "engine registered again while still registered; it keeps its id and tasks");
                return self.registration_ok(c, ident, msg, id);
            }
            warn!(%uuid, "registration refused: uuid in use");
            let content =
                error_content(ErrorName::KeyError, &format!("uuid {uuid:?} in use"), vec![format!("KeyError: uuid {uuid:?} in use")], None);
            return self.query_reply(c, ident, "registration_reply", &content, msg, &[]);
        }
        let id = self.engines.allocate_id(req.id, &uuid);
        if let Some(asked) = req.id.filter(|r| *r != id) {
            info!(asked, engine_id = id, %uuid, "the engine id asked for is held or was another engine's; a new one is given");
        }
        self.evictions.forget(&uuid);
        let mut e = Engine::new(id, &uuid, now);
        e.registration = msg.header.msg_id.clone();
        e.notice_to = req.notify_eviction.then(|| ident.clone());
        e.host = req.host.clone();
        if req.batches {
            c.batches_to(Sock::Engine(Chan::Task), e.ident.clone());
        }
        for chan in Chan::ALL {
            if self.connected.get(&chan).is_some_and(|s| s.contains(&e.ident)) {
                e.connected.insert(chan);
            }
        }
        self.engines.insert(e);
        self.awaiting_pong.insert(id);
        self.registration_ok(c, ident, msg, id);
        info!(engine_id = id, %uuid, "engine registering");
        self.make_ready(c, id, now);
    }

    fn registration_ok<C: Comm>(&self, c: &mut C, ident: &Bytes, msg: &Message, id: u64) {
        let reply = RegistrationReply {
            status: "ok".into(),
            id,
            hb_period: self.cfg.ping.as_millis() as u64,
            connection_info: self.cfg.engine_info.clone(),
            batches: true,
        };
        let content = serde_json::to_value(&reply).expect("reply serializes");
        self.query_reply(c, ident, reg_msg::REGISTRATION_REPLY, &content, msg, &[]);
    }

    /// Registration completes, as in ipyparallel's hub, once the engine is reachable for routing
    /// and its heart has beaten: an engine still starting up gets no tasks.
    pub(super) fn make_ready<C: Comm>(&mut self, c: &mut C, id: u64, now: Instant) {
        let Some(e) = self.engines.get(id) else { return };
        if e.ready || !e.routable() || !e.ponged || self.hold_until.is_some_and(|t| now < t) {
            return;
        }
        self.force_ready(c, id, now);
    }

    pub(super) fn force_ready<C: Comm>(&mut self, c: &mut C, id: u64, _now: Instant) {
        let Some(e) = self.engines.get_mut(id) else { return };
        if e.ready {
            return;
        }
        e.ready = true;
        let uuid = e.uuid.clone();
        let note = EngineNotification { id, uuid: uuid.clone(), host: e.host.clone() };
        self.engines.lru.push_back(id);
        info!(engine_id = id, %uuid, "engine registered");
        self.notify(c, "registration_notification", &note);
        self.schedule(c);
    }

    pub(super) fn flush_outbox<C: Comm>(&mut self, c: &mut C, id: u64) {
        let Some(e) = self.engines.get_mut(id) else { return };
        if e.outbox.is_empty() {
            return;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut e.outbox).into_iter().partition(|(ch, _)| e.connected.contains(ch));
        e.outbox = waiting;
        for (chan, frames) in ready {
            c.send(Sock::Engine(chan), frames);
        }
    }

    pub(super) fn send_to_engine<C: Comm>(&mut self, c: &mut C, chan: Chan, id: u64, frames: Vec<Bytes>) {
        let e = self.engines.get_mut(id).expect("engine exists");
        if e.connected.contains(&chan) {
            c.send(Sock::Engine(chan), frames);
        } else {
            e.outbox.push((chan, frames));
        }
    }

    /// An engine died (disconnected, missed heartbeats, unregistered or stuck): publish
    /// `unregistration_notification` and fail (or retry) everything it had.
    pub fn on_engine_died<C: Comm>(&mut self, c: &mut C, id: u64, reason: &str, now: Instant) {
        let Some(e) = self.engines.remove(id) else { return };
        self.awaiting_pong.remove(&id);
        info!(engine_id = id, uuid = %e.uuid, %reason, inflight = e.inflight.len(), "engine died");
        // The socket-level facts in `self.connected` stay as they are: an evicted engine may
        // still be connected, and registers again over those connections.
        self.notify(c, "unregistration_notification", &EngineNotification { id, uuid: e.uuid.clone(), host: None });
        let mut inflight: Vec<(String, InFlight)> = e.inflight.into_iter().collect();
        inflight.sort_by(|a, b| a.0.cmp(&b.0));
        for (msg_id, _) in &inflight {
            self.answered.insert(msg_id);
        }
        if let Some(to) = e.notice_to.clone().filter(|_| reason != UNREGISTERED) {
            let answered = inflight.iter().map(|(m, _)| m.clone()).collect();
            let reconnect = reason.ends_with(CONNECTION_CLOSED);
            let notice = EvictionNotice {
                id,
                uuid: e.uuid.clone(),
                registration: e.registration.clone(),
                reason: reason.to_string(),
                answered,
                reconnect,
            };
            self.evictions.insert(&e.uuid, Evicted { notice_to: to, notice, last_sent: None });
            // Told at once (a frozen engine reads it when it resumes), and again when heard from.
            self.tell_evicted(c, e.uuid.as_bytes(), now);
        }
        for (msg_id, inf) in inflight {
            if inf.chan == Chan::Task {
                if let Some(job) = self.jobs.get_mut(&msg_id) {
                    if job.engine == Some(id) {
                        job.engine = None;
                        if job.retries > 0 {
                            job.retries -= 1;
                            job.blacklist.insert(id);
                            info!(%msg_id, "retrying task from dead engine");
                            self.queue.push_front(msg_id);
                            continue;
                        }
                    }
                }
            }
            let evalue = format!("Engine {id} died while running task {msg_id}");
            let method = inf.msg_type.strip_suffix("_request").unwrap_or(&inf.msg_type).to_string();
            let content = error_content(
                ErrorName::EngineError,
                &evalue,
                vec![format!("EngineError: {evalue}")],
                Some(engine_info(id, &e.uuid, &method)),
            );
            let parent: Value = serde_json::from_slice(&inf.header).unwrap_or_else(|_| json!({}));
            let md =
                json!({"engine": e.uuid, "status": "error", "dependencies_met": true, "engine_info": engine_info(id, &e.uuid, &method)});
            let md = if inf.chan == Chan::Bcast {
                let orig = msg_id.strip_suffix(&format!("_{}", e.uuid)).unwrap_or(&msg_id).to_string();
                let coalescing = self.coalesce.remove(&orig).is_some();
                let other = serde_json::from_value(md).expect("an object");
                let bcast = BroadcastMetadata {
                    is_broadcast: true,
                    is_coalescing: coalescing,
                    original_msg_id: Some(orig),
                    broadcast_targets: None,
                    other,
                };
                serde_json::to_value(bcast).expect("metadata serializes")
            } else {
                md
            };
            let signed = self.make_signed(&reply_type(&inf.msg_type), &parent, &md, &content);
            if inf.chan == Chan::Task {
                self.finish_job(&msg_id, false, &e.uuid);
            }
            if matches!(inf.chan, Chan::Task | Chan::Mux) {
                self.complete_record(&msg_id, &signed, None, None, &e.uuid);
            }
            if let Some(client) = inf.client {
                c.send(Sock::Client(inf.chan), join_frames(vec![client, e.ident.clone()], signed));
            }
        }
        let _ = now;
        self.schedule(c);
    }
}
