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
//!
//! # Layout
//! - this file: the [`Hub`] state, [`HubEvent`] dispatch, ticks, and the helpers that sign
//!   replies and notifications;
//! - `engines.rs`: heartbeats, registration, eviction notices, engine death;
//! - `routing.rs`: mux and control requests, and replies from engines;
//! - `tasks.rs`: load-balanced submission, scheduling, retries, failures, task records;
//! - `broadcast.rs`: broadcast fan-out and coalesced replies;
//! - `queries.rs`: client queries on the registration socket (contents typed in
//!   [`rpx_protocol::hub`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use rand::SeedableRng;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::message::error_content;
use rpx_protocol::session::json_frame;
use rpx_protocol::{Message, Session};

use crate::scheduler::Scheme;
use crate::state::{Answered, DoneLog, Engines, Evictions, Job, Records};
use crate::store::{Answer, StoreOp};
use crate::wire::{Chan, Reply, Request};

mod broadcast;
mod engines;
mod queries;
mod routing;
mod tasks;

pub use queries::matches_query;

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
    /// The peer `ident` on `sock` reads rpx batches ([`rpx_protocol::batch`]): messages queued
    /// for it together may go as one.
    fn batches_to(&mut self, _sock: Sock, _ident: Bytes) {}
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
    /// The client `ident` sent an rpx batch on `sock`: it reads them too.
    BatchesFrom { sock: Sock, ident: Bytes },
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
    /// Unfinished load-balanced tasks, each boxed (as [`crate::state::Records::map`]'s records are).
    pub jobs: HashMap<String, Box<Job>>,
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

    /// Change `--queue-limit` (tests).
    pub fn set_queue_limit(&mut self, limit: usize) {
        self.cfg.queue_limit = limit.max(1);
    }

    /// Handle one event.
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
            HubEvent::BatchesFrom { sock, ident } => c.batches_to(sock, ident),
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
                self.fail_job(c, &id, ErrorName::TaskTimeout, &format!("Task {id} timed out before it could start"));
            }
        }
    }

    // ------------------------------------------------------------------ helpers

    /// The signed part of a new message from the hub (see [`Session::signed_part`]).
    fn make_signed(&self, msg_type: &str, parent: &Value, metadata: &impl Serialize, content: &impl Serialize) -> Vec<Bytes> {
        self.make_signed_with_header(&self.session.header(msg_type), parent, metadata, content, &[])
    }

    fn make_signed_with_header(
        &self,
        header: &impl Serialize,
        parent: &Value,
        metadata: &impl Serialize,
        content: &impl Serialize,
        buffers: &[Bytes],
    ) -> Vec<Bytes> {
        self.session.signed_part(json_frame(header), json_frame(parent), json_frame(metadata), json_frame(content), buffers.iter().cloned())
    }

    fn query_reply<C: Comm>(
        &self,
        c: &mut C,
        ident: &Bytes,
        msg_type: &str,
        content: &impl Serialize,
        parent: &Message,
        buffers: &[Bytes],
    ) {
        let header = json_frame(&self.session.header(msg_type));
        let frames = self.session.frames(
            [ident.clone()],
            header,
            json_frame(&parent.header),
            json_frame(&json!({})),
            json_frame(content),
            buffers.iter().cloned(),
        );
        c.send(Sock::Query, frames);
    }

    fn hub_error<C: Comm>(&self, c: &mut C, ident: &Bytes, msg: &Message, ename: ErrorName, evalue: &str) {
        warn!(msg_type = %msg.msg_type(), %ename, %evalue, "query failed");
        let traceback = vec![format!("{ename}: {evalue}")];
        let content = error_content(ename, evalue, traceback, None);
        self.query_reply(c, ident, "hub_error", &content, msg, &[]);
    }

    fn notify<C: Comm>(&self, c: &mut C, msg_type: &str, content: &impl Serialize) {
        let header = json_frame(&self.session.header(msg_type));
        let frames = self.session.frames([], header, json_frame(&json!({})), json_frame(&json!({})), json_frame(content), []);
        c.send(Sock::Notification, frames);
    }
}

/// The least time between two extra pings (see [`Hub::first_ping_at`]) with `engines`
/// registered engines, each of whose hearts answers every ping.
pub fn first_ping_spacing(engines: usize) -> Duration {
    FIRST_PING_EVERY.max(Duration::from_micros(engines as u64 * 1_000_000 / FIRST_PONGS_PER_SEC))
}
