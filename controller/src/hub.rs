//! Every decision the controller makes, as methods over the [`Hub`] state and a [`Comm`] that
//! sends frames: registration (an engine is ready once it is reachable for routing and its heart
//! answered, or after [`REGISTRATION_FALLBACK`]), routing between clients and engines,
//! load-balanced scheduling (queue limit, retries, timeouts, dependencies), broadcast fan-out and
//! coalesced replies, heartbeats, eviction (and the notice that makes an evicted rpx engine
//! register again), engine death, task records (with their iopub output), and client queries
//! (queue, result, history, db, purge, resubmit, shutdown). With `--db sqlite` the hub queues the
//! task database's work in [`Hub::store_ops`] for the network layer and parks a query that needs
//! a lookup until [`HubEvent::Stored`] answers it.
//!
//! Nothing here touches a socket: frames are decoded, built and signed with the hub's
//! [`Session`] and handed to the [`Comm`]. Callers pass `now` for every timing decision; only
//! the ISO dates written into message headers and task records read the wall clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use tracing::{debug, info, warn};

use rpx_protocol::message::{engine_info, error_content, now_iso};
use rpx_protocol::registration::{msg_type as reg_msg, EvictionNotice, RegistrationReply, RegistrationRequest};
use rpx_protocol::session::{join_frames, DELIMITER};
use rpx_protocol::{Message, Session};

use crate::scheduler::{choose, has_capacity, Scheme};
use crate::state::{Answered, Dep, DoneLog, Engine, Engines, Evicted, Evictions, InFlight, Job, Record, Records};
use crate::store::{Answer, Purge, Query, StoreOp};
use crate::wire::{reply_type, Chan, Reply, Request};

/// The controller's sockets, as the hub names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sock {
    /// `registration` ROUTER: engine registration and client queries.
    Query,
    /// `notification` PUB.
    Notification,
    /// `hb_ping` PUB.
    HbPing,
    /// `hb_pong` ROUTER.
    HbPong,
    /// Client-facing ROUTER of a channel.
    Client(Chan),
    /// Engine-facing ROUTER of a channel.
    Engine(Chan),
}

/// Sends frames. For ROUTER sockets the first frame is the destination identity.
pub trait Comm {
    fn send(&mut self, sock: Sock, frames: Vec<Bytes>);
}

/// What the network layer tells the hub.
#[derive(Debug)]
pub enum HubEvent {
    /// Raw frames from the `registration` ROUTER (decoded by the hub: this path is rare).
    Query(Vec<Bytes>),
    /// A verified request from a client (boxed, as is the reply: events wait by the ten
    /// thousand in the hub's queue, whose memory is sized by the largest variant).
    Request(Box<Request>),
    /// A verified message from an engine.
    Reply(Box<Reply>),
    /// A heartbeat answer from `ident`.
    Pong(Bytes),
    /// A peer connected to (`connected`) or disconnected from a socket.
    Peer { sock: Sock, ident: Bytes, connected: bool },
    /// An engine published output for the request `parent` (iopub).
    Io { parent: String, msg_type: String, content: Value },
    /// A send to `ident` failed or timed out.
    SendFailed { sock: Sock, ident: Bytes, reason: String },
    /// The task database answered the lookup `token` (see [`StoreOp::Query`]).
    Stored { token: u64, answer: Answer },
}

/// How long an engine may stay unreachable for routing, or without a first pong, after its
/// registration reply before the hub registers it anyway.
pub const REGISTRATION_FALLBACK: Duration = Duration::from_secs(3);
/// Heartbeat periods an engine may miss once it has answered one.
pub const HB_MISSES: u32 = 3;
/// Minimum grace before a never-answering engine is evicted.
pub const FIRST_PONG_GRACE: Duration = Duration::from_secs(15);
/// How often pings go out while an engine waits for its first pong (see [`Hub::first_ping_at`]),
/// in a small cluster.
pub const FIRST_PING_EVERY: Duration = Duration::from_millis(20);
/// Heartbeat answers per second the extra pings may draw at most: every engine's heart answers
/// every ping, so the extra pings are spaced by the number of engines over this (1,000 engines:
/// one extra ping per 0.5 s, not 50,000 answers a second during a registration storm).
pub const FIRST_PONGS_PER_SEC: u64 = 2000;
/// The reason [`Hub::on_engine_died`] gets for an engine that left by `unregistration_request`
/// (it is not told it was evicted).
pub const UNREGISTERED: &str = "unregistered";
/// The end of the reason [`Hub::on_engine_died`] gets when one of the engine's connections
/// closed (an evicted engine that is alive must then connect new sockets).
pub const CONNECTION_CLOSED: &str = "connection closed";
/// Evicted rpx engines remembered (to tell them to register again when heard from).
const EVICTIONS_LIMIT: usize = 4096;
/// msg_ids answered by the hub for dead or evicted engines, remembered to drop stale replies.
const ANSWERED_LIMIT: usize = 200_000;

/// The hub's settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub scheme: Scheme,
    pub hwm: usize,
    pub ping: Duration,
    pub record_limit: usize,
    pub record_bytes: usize,
    /// Unfinished load-balanced tasks held at most (`--queue-limit`).
    pub queue_limit: usize,
    /// The engine connection dict sent in `registration_reply.connection_info`.
    pub engine_info: Value,
}

struct Coalesce {
    client: Bytes,
    route: Vec<Bytes>,
    targets: Vec<(String, u64)>,
    replies: HashMap<String, Vec<Bytes>>,
}

/// The hub: all controller state.
pub struct Hub {
    pub session: Session,
    cfg: HubConfig,
    pub engines: Engines,
    pub jobs: HashMap<String, Job>,
    /// Queued (unassigned) job ids, oldest first; entries of jobs no longer queued are skipped.
    queue: VecDeque<String>,
    deadlines: BinaryHeap<Reverse<(Instant, String)>>,
    done: DoneLog,
    coalesce: HashMap<String, Coalesce>,
    pub records: Records,
    /// Evicted rpx engines, told to register again when heard from.
    pub evictions: Evictions,
    /// Requests the hub answered for dead or evicted engines: late replies to them are stale.
    answered: Answered,
    /// Identities connected to each engine-facing socket (also before they register).
    connected: HashMap<Chan, HashSet<Bytes>>,
    started: Instant,
    last_ping: Option<Instant>,
    /// Registered engines whose heart has not answered yet (kept here so that whether an extra
    /// ping is due is known in O(1), not by a pass over every engine after each event).
    awaiting_pong: HashSet<u64>,
    /// The last extra ping sent for engines awaiting their first pong.
    last_first_ping: Option<Instant>,
    /// No registration completes before this time (see [`Hub::hold_registrations`]).
    hold_until: Option<Instant>,
    exit_at: Option<Instant>,
    rng: rand::rngs::StdRng,
    /// Records are also persisted (`--db sqlite`): finished records, purges and lookups of
    /// records no longer in memory go to [`Hub::store_ops`].
    pub persist: bool,
    /// Work for the task database, taken by the network layer after every event.
    pub store_ops: Vec<StoreOp>,
    /// Client queries waiting for a database lookup, by token.
    deferred: HashMap<u64, Deferred>,
    next_token: u64,
}

/// A client query parked until the task database answers.
struct Deferred {
    ident: Bytes,
    msg: Message,
}

/// The error name of a task refused because the queue is full.
pub const QUEUE_FULL: &str = "QueueFull";
/// Outcomes of finished tasks remembered for dependencies.
const DONE_LIMIT: usize = 200_000;
/// The identity the hub uses as "client" for its own requests (resubmissions).
const HUB_IDENT: &[u8] = b"hub";

impl Hub {
    pub fn new(session: Session, cfg: HubConfig, now: Instant) -> Hub {
        Hub {
            session,
            records: Records::new(cfg.record_limit, cfg.record_bytes),
            evictions: Evictions::new(EVICTIONS_LIMIT, cfg.ping.max(Duration::from_secs(1))),
            answered: Answered::new(ANSWERED_LIMIT),
            cfg,
            engines: Engines::default(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            done: DoneLog::new(DONE_LIMIT),
            coalesce: HashMap::new(),
            connected: HashMap::new(),
            started: now,
            last_ping: None,
            awaiting_pong: HashSet::new(),
            last_first_ping: None,
            hold_until: None,
            exit_at: None,
            rng: rand::rngs::StdRng::from_entropy(),
            persist: false,
            store_ops: Vec::new(),
            deferred: HashMap::new(),
            next_token: 0,
        }
    }

    /// When the hub wants the process to exit (after a hub `shutdown_request`).
    pub fn exit_at(&self) -> Option<Instant> {
        self.exit_at
    }

    /// Ready engine ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.engines.by_id.values().filter(|e| e.ready).map(|e| e.id).collect()
    }

    /// Queued (unassigned) load-balanced tasks.
    pub fn unassigned(&self) -> Vec<String> {
        let mut v: Vec<String> = self.queue.iter().filter(|id| self.jobs.get(*id).is_some_and(|j| j.engine.is_none())).cloned().collect();
        v.dedup();
        v
    }

    // ------------------------------------------------------------------ dispatch

    /// Handle one event.
    /// Change `--queue-limit` (tests).
    pub fn set_queue_limit(&mut self, limit: usize) {
        self.cfg.queue_limit = limit.max(1);
    }

    pub fn on_event<C: Comm>(&mut self, c: &mut C, ev: HubEvent, now: Instant) {
        match ev {
            HubEvent::Query(frames) => self.on_query(c, frames, now),
            HubEvent::Request(r) => self.on_request(c, *r, now),
            HubEvent::Reply(r) => self.on_reply(c, *r, now),
            HubEvent::Pong(ident) => self.on_pong(c, &ident, now),
            HubEvent::Io { parent, msg_type, content } => {
                if self.records.update(&parent, |r| r.add_io(&msg_type, &content)) && self.persist {
                    if let Some(r) = self.records.get(&parent).filter(|r| !r.pending()) {
                        self.store_ops.push(StoreOp::Io(Box::new(r.clone())));
                    }
                }
            }
            HubEvent::Peer { sock, ident, connected } => self.on_peer(c, sock, ident, connected, now),
            HubEvent::SendFailed { sock, ident, reason } => {
                if let (Sock::Engine(_) | Sock::HbPong, Some(id)) = (sock, self.engines.id_of(&ident)) {
                    self.on_engine_died(c, id, &format!("send failed: {reason}"), now);
                } else {
                    warn!(?sock, ident = %String::from_utf8_lossy(&ident), %reason, "dropped a message: send failed");
                }
            }
            HubEvent::Stored { token, answer } => self.on_stored(c, token, answer, now),
        }
    }

    /// Periodic work: heartbeats and evictions, registration fallback, task timeouts.
    pub fn on_tick<C: Comm>(&mut self, c: &mut C, now: Instant) {
        if self.last_ping.is_none_or(|t| now.duration_since(t) >= self.cfg.ping) {
            self.last_ping = Some(now);
            self.send_ping(c, now);
        }
        let ping = self.cfg.ping;
        let mut dead = Vec::new();
        let mut late = Vec::new();
        let mut held = Vec::new();
        for e in self.engines.by_id.values() {
            if !e.ready && e.routable() && e.ponged {
                held.push(e.id);
            }
            let limit = if e.ponged { ping * HB_MISSES + ping / 2 } else { (ping * 10).max(FIRST_PONG_GRACE) };
            if now.duration_since(e.last_seen) > limit {
                dead.push(e.id);
            } else if !e.ready && now.duration_since(e.registered_at) >= REGISTRATION_FALLBACK {
                late.push(e.id);
            }
        }
        for id in dead {
            self.on_engine_died(c, id, "missed heartbeats", now);
        }
        for id in held {
            self.make_ready(c, id, now);
        }
        for id in late {
            warn!(engine_id = id, "engine never became reachable for routing; registering it anyway");
            if let Some(e) = self.engines.get_mut(id) {
                e.connected.extend(Chan::ALL);
            }
            self.flush_outbox(c, id);
            self.force_ready(c, id, now);
        }
        while let Some(Reverse((t, _))) = self.deadlines.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, id)) = self.deadlines.pop().expect("peeked");
            if self.jobs.get(&id).is_some_and(|j| j.engine.is_none()) {
                info!(msg_id = %id, "task timed out in the queue");
                self.fail_job(c, &id, "TaskTimeout", &format!("Task {id} timed out before it could start"));
            }
        }
    }

    // ------------------------------------------------------------------ engines

    fn on_pong<C: Comm>(&mut self, c: &mut C, ident: &[u8], now: Instant) {
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

    fn send_ping<C: Comm>(&self, c: &mut C, now: Instant) {
        let lifetime = now.duration_since(self.started).as_secs_f64();
        c.send(Sock::HbPing, vec![Bytes::from(format!("{lifetime:.6}"))]);
    }

    /// `ident` (an engine's uuid) was heard from but is not registered: if it is an rpx engine
    /// this hub evicted, send it an [`EvictionNotice`] so that it registers again.
    fn tell_evicted<C: Comm>(&mut self, c: &mut C, ident: &[u8], now: Instant) {
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

    fn on_peer<C: Comm>(&mut self, c: &mut C, sock: Sock, ident: Bytes, connected: bool, now: Instant) {
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

    fn on_register<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, now: Instant) {
        let req: RegistrationRequest = match serde_json::from_value(msg.content.clone()) {
            Ok(r) => r,
            Err(_) if msg.content.get("uuid").is_none() => {
                return self.hub_error(c, ident, msg, "KeyError", "registration_request without uuid")
            }
            Err(e) => return self.hub_error(c, ident, msg, "ValueError", &format!("bad registration_request: {e}")),
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
                info!(engine_id = id, %uuid, "engine registered again while still registered; it keeps its id and tasks");
                return self.registration_ok(c, ident, msg, id);
            }
            warn!(%uuid, "registration refused: uuid in use");
            let content =
                error_content("KeyError", &format!("uuid {uuid:?} in use"), vec![format!("KeyError: uuid {uuid:?} in use")], None);
            return self.query_reply(c, ident, "registration_reply", content, msg, &[]);
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
        };
        let content = serde_json::to_value(&reply).expect("reply serializes");
        self.query_reply(c, ident, reg_msg::REGISTRATION_REPLY, content, msg, &[]);
    }

    /// Registration completes, as in ipyparallel's hub, once the engine is reachable for routing
    /// and its heart has beaten: an engine still starting up gets no tasks.
    fn make_ready<C: Comm>(&mut self, c: &mut C, id: u64, now: Instant) {
        let Some(e) = self.engines.get(id) else { return };
        if e.ready || !e.routable() || !e.ponged || self.hold_until.is_some_and(|t| now < t) {
            return;
        }
        self.force_ready(c, id, now);
    }

    fn force_ready<C: Comm>(&mut self, c: &mut C, id: u64, _now: Instant) {
        let Some(e) = self.engines.get_mut(id) else { return };
        if e.ready {
            return;
        }
        e.ready = true;
        let uuid = e.uuid.clone();
        let mut note = json!({"id": id, "uuid": uuid});
        if let Some(host) = &e.host {
            // Extra key: ipyparallel's client reads only id and uuid.
            note[rpx_protocol::dataplane::NOTIFICATION_KEY] = json!(host);
        }
        self.engines.lru.push_back(id);
        info!(engine_id = id, %uuid, "engine registered");
        self.notify(c, "registration_notification", note);
        self.schedule(c);
    }

    fn flush_outbox<C: Comm>(&mut self, c: &mut C, id: u64) {
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

    fn send_to_engine<C: Comm>(&mut self, c: &mut C, chan: Chan, id: u64, frames: Vec<Bytes>) {
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
        self.notify(c, "unregistration_notification", json!({"id": id, "uuid": e.uuid}));
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
            let content =
                error_content("EngineError", &evalue, vec![format!("EngineError: {evalue}")], Some(engine_info(id, &e.uuid, &method)));
            let parent: Value = serde_json::from_slice(&inf.header).unwrap_or_else(|_| json!({}));
            let mut md =
                json!({"engine": e.uuid, "status": "error", "dependencies_met": true, "engine_info": engine_info(id, &e.uuid, &method)});
            if inf.chan == Chan::Bcast {
                let orig = msg_id.strip_suffix(&format!("_{}", e.uuid)).unwrap_or(&msg_id).to_string();
                let coalescing = self.coalesce.remove(&orig).is_some();
                md["is_broadcast"] = json!(true);
                md["is_coalescing"] = json!(coalescing);
                md["original_msg_id"] = json!(orig);
            }
            let signed = self.make_signed(&reply_type(&inf.msg_type), &parent, &md, &content, &[]);
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

    // ------------------------------------------------------------------ routing

    fn on_request<C: Comm>(&mut self, c: &mut C, r: Request, now: Instant) {
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
            let content = error_content("EngineError", &evalue, vec![format!("EngineError: {evalue}")], None);
            let parent: Value = serde_json::from_slice(&r.signed[1]).unwrap_or_else(|_| json!({}));
            let signed = self.make_signed(&reply_type(&r.msg_type), &parent, &json!({"status": "error"}), &content, &[]);
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

    fn on_reply<C: Comm>(&mut self, c: &mut C, r: Reply, now: Instant) {
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
            Chan::Task => self.on_task_reply(c, id, r, inf.is_some()),
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
    fn forward_reply<C: Comm>(&mut self, c: &mut C, r: Reply) {
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

    // ------------------------------------------------------------------ load balancing

    fn on_task_submitted<C: Comm>(&mut self, c: &mut C, r: Request, now: Instant) {
        let msg_id = r.msg_id.clone();
        self.records.insert(Record::submitted(&msg_id, Chan::Task, &r.signed, &r.client));
        let deps = Dep::parse(r.info.after.as_ref()).and_then(|a| Dep::parse(r.info.follow.as_ref()).map(|f| (a, f)));
        let job = |after: Dep, follow: Dep| Job {
            msg_id: msg_id.clone(),
            client: Some(r.client.clone()),
            signed: r.signed.clone(),
            msg_type: r.msg_type.clone(),
            targets: r.info.targets.iter().cloned().collect(),
            retries: r.info.retries,
            deadline: r.info.timeout.map(|t| now + Duration::from_secs_f64(t.min(1e9))),
            after,
            follow,
            blacklist: HashSet::new(),
            engine: None,
        };
        if self.jobs.len() >= self.cfg.queue_limit {
            // Refused whole and at once: the client hears why, and nothing queued is lost.
            self.jobs.insert(msg_id.clone(), job(Dep::default(), Dep::default()));
            let limit = self.cfg.queue_limit;
            warn!(msg_id = %msg_id, limit, "refused a task: the queue is full");
            return self.fail_job(
                c,
                &msg_id,
                QUEUE_FULL,
                &format!("Task {msg_id} refused: the controller holds {limit} unfinished load-balanced tasks (--queue-limit)"),
            );
        }
        let (after, follow) = match deps {
            Ok(d) => d,
            Err(e) => {
                self.jobs.insert(msg_id.clone(), job(Dep::default(), Dep::default()));
                return self.fail_job(c, &msg_id, "InvalidDependency", &format!("Task {msg_id}: {e}"));
            }
        };
        let j = job(after, follow);
        self.jobs.insert(msg_id.clone(), j.clone());
        for dep in [&j.after, &j.follow] {
            if dep.ids.iter().any(|d| *d == msg_id || !(self.jobs.contains_key(d) || self.done.contains(d))) {
                return self.fail_job(c, &msg_id, "InvalidDependency", &format!("Task {msg_id} depends on unknown or invalid tasks"));
            }
            if dep.unreachable(|d| self.done.get(d).is_some_and(|x| x.success), |d| self.done.get(d).is_some_and(|x| !x.success)) {
                return self.fail_job(c, &msg_id, "ImpossibleDependency", &format!("Task {msg_id} has dependencies that cannot be met"));
            }
        }
        if let Some(d) = j.deadline {
            self.deadlines.push(Reverse((d, msg_id.clone())));
        }
        self.queue.push_back(msg_id);
        self.schedule(c);
    }

    /// Assign queued tasks to engines while any engine has room.
    pub fn schedule<C: Comm>(&mut self, c: &mut C) {
        if self.queue.is_empty() {
            return;
        }
        let mut free: usize = if self.cfg.hwm == 0 {
            usize::MAX
        } else {
            self.engines.lru.iter().filter_map(|id| self.engines.get(*id)).map(|e| self.cfg.hwm.saturating_sub(e.task_load)).sum()
        };
        if free == 0 {
            // Every engine is at its high-water mark: nothing to place, and the queue stays as
            // it is (no pass over thousands of queued tasks per submission).
            return;
        }
        // Tasks that must wait stay at the front, in their order; the rest of the queue is not
        // touched, so a submission or a reply costs O(tasks looked at), not O(queue length).
        let mut kept = Vec::new();
        let mut seen = HashSet::new();
        while free > 0 {
            let Some(msg_id) = self.queue.pop_front() else { break };
            let queued = self.jobs.get(&msg_id).is_some_and(|j| j.engine.is_none());
            if !queued || !seen.insert(msg_id.clone()) {
                continue;
            }
            match self.place(c, &msg_id) {
                Placement::Placed => free = free.saturating_sub(1),
                Placement::Wait => kept.push(msg_id),
                Placement::Failed => {}
            }
        }
        for msg_id in kept.into_iter().rev() {
            self.queue.push_front(msg_id);
        }
    }

    fn place<C: Comm>(&mut self, c: &mut C, msg_id: &str) -> Placement {
        let job = self.jobs.get(msg_id).expect("queued job exists");
        let done = &self.done;
        let completed = |d: &str| done.get(d).is_some_and(|x| x.success);
        let failed = |d: &str| done.get(d).is_some_and(|x| !x.success);
        if !job.after.check(completed, failed) {
            if job.after.unreachable(completed, failed) {
                self.fail_job(c, msg_id, "ImpossibleDependency", &format!("Task {msg_id} has dependencies that cannot be met"));
                return Placement::Failed;
            }
            return Placement::Wait;
        }
        let mut candidates = Vec::new();
        let mut loads = Vec::new();
        for &eid in &self.engines.lru {
            let e = self.engines.get(eid).expect("lru engines exist");
            if !has_capacity(e.task_load, self.cfg.hwm) || job.blacklist.contains(&eid) {
                continue;
            }
            if !job.targets.is_empty() && !job.targets.contains(&e.uuid) {
                continue;
            }
            let on = |d: &str| done.get(d).is_some_and(|x| *x.engine == *e.uuid);
            if !job.follow.check(|d| completed(d) && on(d), |d| failed(d) && on(d)) {
                continue;
            }
            candidates.push(eid);
            loads.push(e.task_load);
        }
        if candidates.is_empty() {
            if !job.targets.is_empty() {
                let live: HashSet<&str> =
                    self.engines.by_id.values().filter(|e| !job.blacklist.contains(&e.id)).map(|e| e.uuid.as_str()).collect();
                if !job.targets.iter().any(|t| live.contains(t.as_str())) {
                    self.fail_job(
                        c,
                        msg_id,
                        "ImpossibleDependency",
                        &format!("Task {msg_id} targets only engines that are gone or already failed it"),
                    );
                    return Placement::Failed;
                }
            }
            if job.follow.all && !job.follow.is_empty() {
                let dests: HashSet<&str> = job.follow.ids.iter().filter_map(|d| done.get(d)).map(|x| &*x.engine).collect();
                if dests.len() > 1 {
                    self.fail_job(c, msg_id, "ImpossibleDependency", &format!("Task {msg_id} follows tasks that ran on different engines"));
                    return Placement::Failed;
                }
            }
            return Placement::Wait;
        }
        let pick = candidates[choose(self.cfg.scheme, &loads, &mut self.rng)];
        let job = self.jobs.get_mut(msg_id).expect("exists");
        job.engine = Some(pick);
        let client = job.client.clone();
        let frames_signed = job.signed.clone();
        let msg_type = job.msg_type.clone();
        let header = job.signed[1].clone();
        self.engines.touch(pick);
        let e = self.engines.get_mut(pick).expect("exists");
        e.task_load += 1;
        e.inflight.insert(msg_id.to_string(), InFlight { chan: Chan::Task, client: client.clone(), msg_type, header });
        let ident = e.ident.clone();
        let uuid = e.uuid.clone();
        self.records.update(msg_id, |r| r.engine_uuid = Some(uuid));
        let route = client.unwrap_or_else(|| Bytes::from_static(HUB_IDENT));
        debug!(msg_id, engine_id = pick, load = self.engines.get(pick).map(|e| e.task_load), "task placed");
        self.send_to_engine(c, Chan::Task, pick, join_frames(vec![ident, route], frames_signed));
        Placement::Placed
    }

    fn on_task_reply<C: Comm>(&mut self, c: &mut C, eid: u64, r: Reply, was_inflight: bool) {
        let parent = r.parent_msg_id.clone().unwrap_or_default();
        let e = self.engines.get_mut(eid).expect("exists");
        let uuid = e.uuid.clone();
        let ours = was_inflight && self.jobs.get(&parent).is_some_and(|j| j.engine == Some(eid));
        if !ours {
            if self.jobs.contains_key(&parent) || self.done.contains(&parent) {
                // The task is queued, running elsewhere or finished: this reply is not its answer.
                info!(engine_id = eid, msg_id = %parent, "dropped a reply to a task this engine no longer runs");
            } else {
                self.forward_reply(c, r);
            }
            return;
        }
        e.task_load = e.task_load.saturating_sub(1);
        let success = r.status.as_deref() == Some("ok");
        let job = self.jobs.get_mut(&parent).expect("checked");
        if !r.dependencies_met || (!success && job.retries > 0) {
            if r.dependencies_met {
                job.retries -= 1;
            }
            job.engine = None;
            job.blacklist.insert(eid);
            debug!(msg_id = %parent, engine_id = eid, "resubmitting task to another engine");
            self.queue.push_front(parent);
        } else {
            self.finish_job(&parent, success, &uuid);
            self.complete_record(&parent, &r.signed, r.started.clone(), r.date.clone(), &uuid);
            self.forward_reply(c, r);
        }
        self.schedule(c);
    }

    fn finish_job(&mut self, msg_id: &str, success: bool, engine: &str) {
        self.jobs.remove(msg_id);
        self.done.insert(msg_id, success, engine);
    }

    /// Fail a job from the scheduler (TaskTimeout, InvalidDependency, ImpossibleDependency).
    fn fail_job<C: Comm>(&mut self, c: &mut C, msg_id: &str, ename: &str, evalue: &str) {
        let Some(job) = self.jobs.get(msg_id) else { return };
        if let Some(eid) = job.engine {
            if let Some(e) = self.engines.get_mut(eid) {
                e.inflight.remove(msg_id);
                e.task_load = e.task_load.saturating_sub(1);
            }
        }
        let parent: Value = serde_json::from_slice(&job.signed[1]).unwrap_or_else(|_| json!({}));
        let content = error_content(ename, evalue, vec![format!("{ename}: {evalue}")], None);
        let signed = self.make_signed(&reply_type(&job.msg_type), &parent, &json!({}), &content, &[]);
        let client = job.client.clone();
        self.finish_job(msg_id, false, "");
        self.complete_record(msg_id, &signed, None, None, "");
        if let Some(client) = client {
            c.send(Sock::Client(Chan::Task), join_frames(vec![client], signed));
        }
    }

    // ------------------------------------------------------------------ broadcast

    fn on_broadcast<C: Comm>(&mut self, c: &mut C, r: Request) {
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

    fn on_coalesced_reply<C: Comm>(&mut self, c: &mut C, orig: &str, uuid: &str, r: Reply) {
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

    // ------------------------------------------------------------------ records

    fn complete_record(&mut self, msg_id: &str, signed: &[Bytes], started: Option<String>, completed: Option<String>, engine: &str) {
        let persist = self.persist;
        let mut finished = None;
        self.records.update(msg_id, |r| {
            r.result = Some(signed.to_vec());
            r.started = started;
            r.completed = Some(completed.unwrap_or_else(now_iso));
            r.received = Some(now_iso());
            if !engine.is_empty() {
                r.engine_uuid = Some(engine.to_string());
            }
            if persist {
                finished = Some(Box::new(r.clone()));
            }
        });
        if let Some(r) = finished {
            self.store_ops.push(StoreOp::Put(r));
        }
    }

    // ------------------------------------------------------------------ queries

    fn on_query<C: Comm>(&mut self, c: &mut C, frames: Vec<Bytes>, now: Instant) {
        let msg = match self.session.decode(frames) {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "dropped a bad message on the registration socket"),
        };
        let Some(ident) = msg.idents.first().cloned() else {
            return warn!("dropped a query without a routing identity");
        };
        debug!(msg_type = %msg.msg_type(), "query");
        match msg.msg_type() {
            "registration_request" => self.on_register(c, &ident, &msg, now),
            "unregistration_request" => {
                let eid = msg.content.get("id").and_then(Value::as_u64);
                match eid.filter(|id| self.engines.get(*id).is_some()) {
                    Some(id) => self.on_engine_died(c, id, UNREGISTERED, now),
                    None => info!(?eid, "unregistration of an unknown engine"),
                }
            }
            "connection_request" => {
                let engines: Map<String, Value> =
                    self.engines.by_id.values().filter(|e| e.ready).map(|e| (e.id.to_string(), json!(e.uuid))).collect();
                let mut content = json!({"status": "ok", "engines": engines});
                let hosts: Map<String, Value> = self
                    .engines
                    .by_id
                    .values()
                    .filter(|e| e.ready)
                    .filter_map(|e| Some((e.uuid.clone(), json!(e.host.as_ref()?))))
                    .collect();
                if !hosts.is_empty() {
                    content[rpx_protocol::dataplane::CONNECTION_REPLY_KEY] = Value::Object(hosts);
                }
                self.query_reply(c, &ident, "connection_reply", content, &msg, &[]);
            }
            "queue_request" => self.on_queue_request(c, &ident, &msg),
            "result_request" => self.on_result_request(c, &ident, &msg, None),
            "history_request" => self.on_history_request(c, &ident, &msg, None),
            "load_request" => {
                let mut content = json!({"status": "ok"});
                for e in self.engines.by_id.values().filter(|e| e.ready) {
                    content[e.id.to_string()] = json!(e.inflight.len());
                }
                self.query_reply(c, &ident, "load_reply", content, &msg, &[]);
            }
            "purge_request" => self.on_purge(c, &ident, &msg),
            "resubmit_request" => self.on_resubmit(c, &ident, &msg, now, None),
            "db_request" => self.on_db_request(c, &ident, &msg, None),
            "shutdown_request" => {
                info!("hub shutdown requested");
                self.query_reply(c, &ident, "shutdown_reply", json!({"status": "ok"}), &msg, &[]);
                self.notify(c, "shutdown_notification", json!({"status": "ok"}));
                self.exit_at = Some(now + Duration::from_secs(1));
            }
            other => {
                warn!(msg_type = other, "unknown query type");
                self.hub_error(c, &ident, &msg, "KeyError", &format!("Bad Message Type: {other:?}"));
            }
        }
    }

    fn on_queue_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message) {
        let verbose = msg.content.get("verbose").and_then(Value::as_bool).unwrap_or(false);
        let ids = match self.validate_targets(msg.content.get("targets")) {
            Ok(ids) => ids,
            Err(e) => return self.hub_error(c, ident, msg, "IndexError", &e),
        };
        let mut content = json!({"status": "ok"});
        for id in ids {
            let e = self.engines.get(id).expect("validated");
            let (mux, task) = (e.inflight_on(Chan::Mux), e.inflight_on(Chan::Task));
            content[id.to_string()] = if verbose {
                json!({"queue": mux, "completed": e.recent_completed, "tasks": task})
            } else {
                json!({"queue": mux.len(), "completed": e.completed, "tasks": task.len()})
            };
        }
        let unassigned = self.unassigned();
        content["unassigned"] = if verbose { json!(unassigned) } else { json!(unassigned.len()) };
        self.query_reply(c, ident, "queue_reply", content, msg, &[]);
    }

    /// Engine ids from `targets`: null (all), an int, a uuid, or a list of those.
    fn validate_targets(&self, targets: Option<&Value>) -> Result<Vec<u64>, String> {
        let list = match targets {
            None | Some(Value::Null) => return Ok(self.ids()),
            Some(Value::Array(a)) => a.clone(),
            Some(v) => vec![v.clone()],
        };
        let mut out = Vec::new();
        for t in list {
            let id = match &t {
                Value::Number(n) => n.as_u64().filter(|id| self.engines.get(*id).is_some_and(|e| e.ready)),
                Value::String(s) => self.engines.by_uuid(s).filter(|e| e.ready).map(|e| e.id),
                _ => None,
            };
            out.push(id.ok_or_else(|| format!("No Such Engine: {t}"))?);
        }
        if out.is_empty() {
            return Err("No Engines Registered".into());
        }
        Ok(out)
    }

    fn record_json(&self, r: &Record) -> Value {
        crate::store::record_json(r)
    }

    /// `stored`: the task database's answer, once a lookup of ids not in memory came back.
    fn on_result_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let looked_up = stored.is_some();
        let fetched = fetched_by_id(stored);
        let mut missing = Vec::new();
        let status_only = msg.content.get("status_only").and_then(Value::as_bool).unwrap_or(false);
        let mut ids: Vec<String> = msg
            .content
            .get("msg_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        let mut content = json!({"status": "ok"});
        let (mut pending, mut completed, mut buffers) = (Vec::new(), Vec::new(), Vec::new());
        for id in &ids {
            let Some(r) = self.records.get(id).or_else(|| fetched.get(id)) else {
                if self.jobs.contains_key(id) {
                    pending.push(id.clone());
                    continue;
                }
                if self.persist && !looked_up {
                    missing.push(id.clone());
                    continue;
                }
                return self.hub_error(c, ident, msg, "KeyError", &format!("No such message: {id}"));
            };
            if r.pending() {
                pending.push(id.clone());
                continue;
            }
            completed.push(id.clone());
            if !status_only {
                let full = self.record_json(r);
                content[id.as_str()] = json!({
                    "header": full["header"], "metadata": full["metadata"],
                    "result_header": full["result_header"], "result_metadata": full["result_metadata"],
                    "result_content": full["result_content"], "received": full["received"],
                    "io": {"execute_input": full["execute_input"], "execute_result": full["execute_result"], "error": full["error"], "stdout": full["stdout"], "stderr": full["stderr"]},
                });
                buffers.extend(r.result.as_ref().map(|s| s[5..].to_vec()).unwrap_or_default());
            }
        }
        if !missing.is_empty() {
            return self.defer(ident, msg, Query::Records(missing));
        }
        content["pending"] = json!(pending);
        content["completed"] = json!(completed);
        self.query_reply(c, ident, "result_reply", content, msg, &buffers);
    }

    fn on_purge<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message) {
        match msg.content.get("msg_ids") {
            Some(Value::String(s)) if s == "all" => {
                let ids: Vec<String> = self.records.map.values().filter(|r| !r.pending()).map(|r| r.msg_id.clone()).collect();
                for id in ids {
                    self.records.remove(&id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::All));
                }
            }
            Some(Value::Array(a)) => {
                let ids: Vec<String> = a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
                if let Some(p) = ids.iter().find(|id| self.records.get(id).is_some_and(Record::pending)) {
                    return self.hub_error(c, ident, msg, "IndexError", &format!("msg pending: {p:?}"));
                }
                for id in &ids {
                    self.records.remove(id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::Ids(ids)));
                }
            }
            _ => {}
        }
        if let Some(Value::Array(eids)) = msg.content.get("engine_ids") {
            for eid in eids {
                let Some(uuid) = eid.as_u64().and_then(|id| self.engines.get(id)).map(|e| e.uuid.clone()) else {
                    return self.hub_error(c, ident, msg, "IndexError", &format!("No such engine: {eid}"));
                };
                let ids: Vec<String> = self
                    .records
                    .map
                    .values()
                    .filter(|r| !r.pending() && r.engine_uuid.as_deref() == Some(&uuid))
                    .map(|r| r.msg_id.clone())
                    .collect();
                for id in ids {
                    self.records.remove(&id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::Engine(uuid)));
                }
            }
        }
        self.query_reply(c, ident, "purge_reply", json!({"status": "ok"}), msg, &[]);
    }

    fn on_resubmit<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, now: Instant, stored: Option<Answer>) {
        let looked_up = stored.is_some();
        let fetched = fetched_by_id(stored);
        let ids: Vec<String> = msg
            .content
            .get("msg_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let missing: Vec<String> = ids.iter().filter(|id| self.records.get(id).is_none() && !fetched.contains_key(*id)).cloned().collect();
        if !missing.is_empty() {
            if self.persist && !looked_up {
                return self.defer(ident, msg, Query::Records(missing));
            }
            return self.hub_error(c, ident, msg, "KeyError", &format!("No such msg(s): {missing:?}"));
        }
        let mut mapping = Map::new();
        for old in &ids {
            let rec = self.records.get(old).or_else(|| fetched.get(old)).expect("checked").clone();
            let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(&rec.request[1]) else {
                return self.hub_error(c, ident, msg, "ValueError", &format!("stored request {old} has a bad header"));
            };
            let parent = Value::Object(header.clone());
            let new_id = self.session.new_msg_id();
            header.insert("msg_id".into(), json!(new_id));
            header.insert("date".into(), json!(now_iso()));
            let msg_type = header.get("msg_type").and_then(Value::as_str).unwrap_or("apply_request").to_string();
            let content: Value = serde_json::from_slice(&rec.request[4]).unwrap_or_else(|_| json!({}));
            let signed = self.make_signed_with_header(&Value::Object(header), &parent, &json!({}), &content, &rec.request[5..]);
            self.records.update(old, |r| r.resubmitted = Some(new_id.clone()));
            if self.persist {
                self.store_ops.push(StoreOp::Resubmitted { msg_id: old.clone(), new_id: new_id.clone() });
            }
            let req = Request {
                chan: Chan::Task,
                client: Bytes::from_static(HUB_IDENT),
                route: vec![],
                signed,
                msg_id: new_id.clone(),
                msg_type,
                date: None,
                info: Default::default(),
            };
            self.on_task_submitted(c, req, now);
            if let Some(j) = self.jobs.get_mut(&new_id) {
                j.client = None;
            }
            self.records.update(&new_id, |r| r.client = None);
            mapping.insert(old.clone(), json!(new_id));
        }
        self.query_reply(c, ident, "resubmit_reply", json!({"status": "ok", "resubmitted": mapping}), msg, &[]);
    }

    /// With `--db sqlite` the matching finished records come from the database (`stored`, after
    /// a lookup) and only records not written yet (pending ones) from memory.
    fn on_db_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let query = msg.content.get("query").cloned().unwrap_or_else(|| json!({}));
        let keys: Option<Vec<String>> =
            msg.content.get("keys").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
        let Value::Object(query) = query else {
            return self.hub_error(c, ident, msg, "TypeError", "db query must be a dict");
        };
        let mut records = Vec::new();
        let (mut buffer_lens, mut result_buffer_lens, mut buffers) = (Vec::new(), Vec::new(), Vec::new());
        let want = |k: &str| keys.as_ref().is_some_and(|ks| ks.iter().any(|x| x == k));
        let fetched = match stored {
            Some(Answer::Records(rs)) => rs,
            _ if self.persist => {
                return self.defer(ident, msg, Query::Find { query, buffers: want("buffers"), result_buffers: want("result_buffers") })
            }
            _ => Vec::new(),
        };
        let history = self.records.history();
        let mut candidates: Vec<&Record> = fetched.iter().collect();
        {
            let stored_ids: HashSet<&str> = fetched.iter().map(|r| r.msg_id.as_str()).collect();
            candidates
                .extend(history.iter().filter(|id| !stored_ids.contains(id.as_str())).map(|id| self.records.get(id).expect("in history")));
        }
        if !fetched.is_empty() {
            candidates.sort_by(|a, b| a.submitted.cmp(&b.submitted));
        }
        for r in candidates {
            let full = self.record_json(r);
            match matches_query(&full, &query) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return self.hub_error(c, ident, msg, "ValueError", &e),
            }
            let rec = match &keys {
                Some(ks) => {
                    let mut m = Map::new();
                    m.insert("msg_id".into(), full["msg_id"].clone());
                    for k in ks {
                        if let Some(v) = full.get(k) {
                            m.insert(k.clone(), v.clone());
                        }
                    }
                    Value::Object(m)
                }
                None => full,
            };
            if want("buffers") {
                let b = r.request[5..].to_vec();
                buffer_lens.push(b.len());
                buffers.extend(b);
            }
            if want("result_buffers") {
                let b = r.result.as_ref().map(|s| s[5..].to_vec()).unwrap_or_default();
                result_buffer_lens.push(b.len());
                buffers.extend(b);
            }
            records.push(rec);
        }
        let content = json!({
            "status": "ok",
            "records": records,
            "buffer_lens": if want("buffers") { json!(buffer_lens) } else { Value::Null },
            "result_buffer_lens": if want("result_buffers") { json!(result_buffer_lens) } else { Value::Null },
        });
        self.query_reply(c, ident, "db_reply", content, msg, &buffers);
    }

    fn on_history_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let history: Vec<String> = if !self.persist {
            self.records.history()
        } else {
            let Some(Answer::History(mut all)) = stored else {
                return self.defer(ident, msg, Query::History);
            };
            // Stored (finished) records, then those only in memory (pending), by submission.
            let stored_ids: HashSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
            for id in self.records.history() {
                if !stored_ids.contains(&id) {
                    let submitted = self.records.get(&id).map(|r| r.submitted.clone()).unwrap_or_default();
                    all.push((id, submitted));
                }
            }
            all.sort_by(|a, b| a.1.cmp(&b.1));
            all.into_iter().map(|(id, _)| id).collect()
        };
        self.query_reply(c, ident, "history_reply", json!({"status": "ok", "history": history}), msg, &[]);
    }

    /// Park a client query until the task database answers `query`.
    fn defer(&mut self, ident: &Bytes, msg: &Message, query: Query) {
        self.next_token += 1;
        let token = self.next_token;
        self.deferred.insert(token, Deferred { ident: ident.clone(), msg: msg.clone() });
        self.store_ops.push(StoreOp::Query { token, query });
    }

    /// The task database answered: finish the query that waited for it.
    fn on_stored<C: Comm>(&mut self, c: &mut C, token: u64, answer: Answer, now: Instant) {
        let Some(Deferred { ident, msg }) = self.deferred.remove(&token) else {
            return warn!(token, "an answer from the task database that no query waits for");
        };
        if let Answer::Failed { ename, evalue } = &answer {
            return self.hub_error(c, &ident, &msg, ename, evalue);
        }
        match msg.msg_type() {
            "result_request" => self.on_result_request(c, &ident, &msg, Some(answer)),
            "history_request" => self.on_history_request(c, &ident, &msg, Some(answer)),
            "resubmit_request" => self.on_resubmit(c, &ident, &msg, now, Some(answer)),
            "db_request" => self.on_db_request(c, &ident, &msg, Some(answer)),
            other => warn!(msg_type = other, "a deferred query of an unexpected type"),
        }
    }

    // ------------------------------------------------------------------ helpers

    fn make_signed(&self, msg_type: &str, parent: &Value, metadata: &Value, content: &Value, buffers: &[Bytes]) -> Vec<Bytes> {
        let header = serde_json::to_value(self.session.header(msg_type)).expect("header serializes");
        self.make_signed_with_header(&header, parent, metadata, content, buffers)
    }

    fn make_signed_with_header(&self, header: &Value, parent: &Value, metadata: &Value, content: &Value, buffers: &[Bytes]) -> Vec<Bytes> {
        let enc = |v: &Value| Bytes::from(serde_json::to_vec(v).expect("json"));
        let (h, p, m, c) = (enc(header), enc(parent), enc(metadata), enc(content));
        let sig = Bytes::from(self.session.sign(&[&h, &p, &m, &c]));
        let mut out = vec![sig, h, p, m, c];
        out.extend(buffers.iter().cloned());
        out
    }

    fn query_reply<C: Comm>(&self, c: &mut C, ident: &Bytes, msg_type: &str, content: Value, parent: &Message, buffers: &[Bytes]) {
        let (_, frames) = self.session.msg(std::slice::from_ref(ident), msg_type, content, Some(&parent.header), json!({}), buffers);
        c.send(Sock::Query, frames);
    }

    fn hub_error<C: Comm>(&self, c: &mut C, ident: &Bytes, msg: &Message, ename: &str, evalue: &str) {
        warn!(msg_type = %msg.msg_type(), %ename, %evalue, "query failed");
        let content = error_content(ename, evalue, vec![format!("{ename}: {evalue}")], None);
        self.query_reply(c, ident, "hub_error", content, msg, &[]);
    }

    fn notify<C: Comm>(&self, c: &mut C, msg_type: &str, content: Value) {
        let (_, frames) = self.session.msg(&[], msg_type, content, None, json!({}), &[]);
        c.send(Sock::Notification, frames);
    }
}

/// Records from a database answer, by msg_id.
fn fetched_by_id(stored: Option<Answer>) -> HashMap<String, Record> {
    match stored {
        Some(Answer::Records(rs)) => rs.into_iter().map(|r| (r.msg_id.clone(), r)).collect(),
        _ => HashMap::new(),
    }
}

enum Placement {
    Placed,
    Wait,
    Failed,
}

/// Match a record against a Mongo-style query (`$in $nin $eq $ne $gt $gte $lt $lte`, or a value).
pub fn matches_query(rec: &Value, query: &Map<String, Value>) -> Result<bool, String> {
    use std::cmp::Ordering;
    fn cmp(a: &Value, b: &Value) -> Option<Ordering> {
        match (a, b) {
            (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
            (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
            _ => None,
        }
    }
    for (key, cond) in query {
        let v = rec.get(key).unwrap_or(&Value::Null);
        let ok = match cond {
            Value::Object(ops) if ops.keys().all(|k| k.starts_with('$')) => {
                let mut all = true;
                for (op, arg) in ops {
                    let r = match op.as_str() {
                        "$in" => arg.as_array().is_some_and(|a| a.contains(v)),
                        "$nin" => !arg.as_array().is_some_and(|a| a.contains(v)),
                        "$eq" => v == arg,
                        "$ne" => v != arg,
                        "$gt" => cmp(v, arg) == Some(Ordering::Greater),
                        "$gte" => matches!(cmp(v, arg), Some(Ordering::Greater | Ordering::Equal)),
                        "$lt" => cmp(v, arg) == Some(Ordering::Less),
                        "$lte" => matches!(cmp(v, arg), Some(Ordering::Less | Ordering::Equal)),
                        other => return Err(format!("unsupported query operator {other}")),
                    };
                    all &= r;
                }
                all
            }
            other => v == other,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The least time between two extra pings (see [`Hub::first_ping_at`]) with `engines`
/// registered engines, each of whose hearts answers every ping.
pub fn first_ping_spacing(engines: usize) -> Duration {
    FIRST_PING_EVERY.max(Duration::from_micros(engines as u64 * 1_000_000 / FIRST_PONGS_PER_SEC))
}

/// Frames after the delimiter, for tests and tools: split `[idents.., DELIM, signed..]`.
pub fn split_at_delimiter(frames: &[Bytes]) -> Option<(&[Bytes], &[Bytes])> {
    let pos = frames.iter().position(|f| f.as_ref() == DELIMITER)?;
    Some((&frames[..pos], &frames[pos + 1..]))
}
