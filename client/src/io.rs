//! The client's sockets and the tasks that serve them, on two runtimes:
//! - the request runtime (`crate::drive`: run by the thread that waits for a reply, or by the
//!   drive thread): DEALERs to `registration`, `mux`, `task` and `control`, one reader task per
//!   socket that verifies and decodes what arrives, and a single dispatcher task that owns the
//!   table of pending requests, sends what the blocking API submits, and matches replies and
//!   iopub output to requests by `parent_header.msg_id`;
//! - the IO thread's runtime, always running: SUBs to `iopub` (output of this client's requests
//!   is passed to the dispatcher, the rest dropped) and `notification` (the engine table is
//!   kept current here, whether or not requests are outstanding).
//!
//! Failure paths (a client must never hang):
//! - a DEALER that disconnects (the controller died or closed) fails every pending task with
//!   [`crate::Error::Connection`]; zeromq 0.7 DEALERs do not reconnect, so the client stays
//!   closed;
//! - while tasks are pending and nothing has arrived for [`PROBE_AFTER`], the dispatcher sends
//!   a `connection_request`; no answer within [`LIVENESS_TIMEOUT`] counts as a lost controller
//!   (a frozen controller or a dead host never closes the TCP connection);
//! - every send is bounded by [`SEND_LIMIT`];
//! - iopub output is waited for at most [`IDLE_GRACE`] after a task's reply, and not at all
//!   after a quiet one (`rpx_protocol::apply::QUIET_KEY`: the engine published nothing for it).
//!
//! Messages are built and signed on the caller's thread ([`Frames`]); the dispatcher only
//! registers and sends them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why the connection is lost once the controller announced its shutdown.
pub(crate) const CONTROLLER_SHUT_DOWN: &str = "the controller shut down";

use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, warn};
use zeromq::{
    DealerRecvHalf, DealerSendHalf, DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqError,
};

use rpx_protocol::content::EngineMetadata;
use rpx_protocol::hub::{ConnectionReply, EngineNotification, OK};
use rpx_protocol::message::{now_iso, Header, PROTOCOL_VERSION};
use rpx_protocol::session::{json_frame, split_at_delimiter};
use rpx_protocol::{batch, ClientConnection, Session};

use crate::closures::{self, AfterReply, ClosureCall, Compiled, Naming};
use crate::drive::Drive;
use crate::error::{Error, Result};
use crate::tracker::{LazyJson, Outcome, ReplyData, Tracker};

/// Quiet time with tasks pending before the controller is probed.
pub const PROBE_AFTER: Duration = Duration::from_secs(2);
/// How long a probe may go unanswered before the controller counts as lost.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one socket send.
pub const SEND_LIMIT: Duration = Duration::from_secs(10);
/// How long after a reply a task's iopub output (up to its `idle` status) is still awaited.
pub const IDLE_GRACE: Duration = Duration::from_millis(1500);
const TICK: Duration = Duration::from_millis(100);

/// The controller's sockets a client sends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chan {
    Query,
    Mux,
    Task,
    Control,
}

impl Chan {
    fn name(self) -> &'static str {
        match self {
            Chan::Query => "registration",
            Chan::Mux => "mux",
            Chan::Task => "task",
            Chan::Control => "control",
        }
    }
}

/// One message to send for task `idx` of `tracker`.
pub(crate) struct Outgoing {
    pub chan: Chan,
    pub frames: Vec<Bytes>,
    pub msg_id: String,
    pub tracker: Arc<Tracker>,
    pub idx: usize,
    /// A closure call: what its reply teaches, or takes to send it again.
    pub closure: Option<ClosureCall>,
}

/// What the blocking API asks of the dispatcher.
pub(crate) enum IoRequest {
    /// Register each message's task, then send it (in order).
    Submit(Vec<Outgoing>),
    /// Refresh the engine table with a `connection_request`.
    Refresh,
    /// Fail what is pending and stop.
    Close,
}

/// The engine table, kept current by the notification reader and the dispatcher.
#[derive(Debug, Default)]
pub(crate) struct EngineTable {
    pub by_id: BTreeMap<usize, String>,
    /// uuid -> where an rpx engine keeps its values (from the controller), for the same-host
    /// data plane (`crate::dataplane`).
    pub hosts: std::collections::HashMap<String, rpx_protocol::dataplane::HostIdentity>,
    /// Every engine uuid ever seen, with its id (replies from engines that died still name them).
    pub seen: HashMap<String, usize>,
}

impl EngineTable {
    fn set(&mut self, engines: BTreeMap<usize, String>) {
        for (id, uuid) in &engines {
            self.seen.insert(uuid.clone(), *id);
        }
        self.by_id = engines;
    }
}

/// State shared between the IO thread, the request runtime and the blocking API.
#[derive(Debug)]
pub(crate) struct Shared {
    pub engines: Mutex<EngineTable>,
    pub engines_cv: Condvar,
    /// Why the connection is gone, once it is.
    pub lost: Mutex<Option<String>>,
    /// The dispatcher has ended (normally after failing everything pending; this flag also
    /// covers a panic, so that waiters never wait for a task that is gone).
    pub stopped: std::sync::atomic::AtomicBool,
    /// The request runtime and who runs it.
    pub drive: Drive,
    /// The closures seen to compile, which calls name by id.
    pub compiled: Compiled,
}

impl Shared {
    fn new(drive: Drive) -> Shared {
        Shared {
            engines: Mutex::default(),
            engines_cv: Condvar::new(),
            lost: Mutex::default(),
            stopped: Default::default(),
            drive,
            compiled: Compiled::default(),
        }
    }

    pub fn table(&self) -> std::sync::MutexGuard<'_, EngineTable> {
        self.engines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the table's engines (a `connection_reply`), and their hosts if it says.
    fn set_engines(&self, engines: BTreeMap<usize, String>, hosts: Option<HashMap<String, rpx_protocol::dataplane::HostIdentity>>) {
        let mut t = self.table();
        if let Some(hosts) = hosts {
            t.hosts = hosts;
        }
        t.set(engines);
        drop(t);
        self.engines_cv.notify_all();
    }

    /// The id of engine `uuid`, if it was ever seen.
    fn seen(&self, uuid: &str) -> Option<usize> {
        self.table().seen.get(uuid).copied()
    }

    /// Apply an engine notification to the table; true if it announces the controller's
    /// shutdown.
    fn on_notification(&self, msg_type: &str, content: &Value) -> bool {
        let note = EngineNotification::deserialize(content).ok();
        let mut t = self.table();
        match (msg_type, note) {
            ("registration_notification", Some(EngineNotification { id, uuid, host })) => {
                if let Some(host) = host {
                    t.hosts.insert(uuid.clone(), host);
                }
                t.seen.insert(uuid.clone(), id as usize);
                t.by_id.insert(id as usize, uuid);
            }
            ("unregistration_notification", Some(EngineNotification { id, .. })) => {
                t.by_id.remove(&(id as usize));
            }
            ("shutdown_notification", _) => return true,
            _ => return false,
        }
        drop(t);
        self.engines_cv.notify_all();
        false
    }

    pub fn ids(&self) -> Vec<usize> {
        self.table().by_id.keys().copied().collect()
    }

    pub fn uuid(&self, id: usize) -> Option<String> {
        self.table().by_id.get(&id).cloned()
    }

    pub fn host(&self, uuid: &str) -> Option<rpx_protocol::dataplane::HostIdentity> {
        self.table().hosts.get(uuid).cloned()
    }

    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Unique message ids for one client: `<session>_<pid>_<n>`, as Python's Session writes them
/// (without a `getpid` per message).
#[derive(Debug)]
pub(crate) struct MsgIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl MsgIds {
    pub fn new(session: &Session) -> MsgIds {
        MsgIds { prefix: format!("{}_{}_", session.session, std::process::id()), next: Default::default() }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut s = String::with_capacity(self.prefix.len() + 8);
        s.push_str(&self.prefix);
        s.push_str(&n.to_string());
        s
    }
}

/// Builds signed frames for many messages that share metadata and content (a map's tasks):
/// those JSON frames are serialized once, each message gets its own header and signature.
#[derive(Clone)]
pub(crate) struct Frames {
    session: Session,
    ids: Arc<MsgIds>,
    date: String,
    parent: Bytes,
    metadata: Bytes,
    content: Bytes,
    /// Closure calls: how they name their closure.
    naming: Option<Naming>,
}

impl Frames {
    pub fn new(session: &Session, ids: &Arc<MsgIds>, metadata: &Value, content: &Value) -> Frames {
        Frames {
            session: session.clone(),
            ids: ids.clone(),
            date: now_iso(),
            parent: Bytes::from_static(b"{}"),
            metadata: Bytes::from(serde_json::to_vec(metadata).expect("json serializes")),
            content: Bytes::from(serde_json::to_vec(content).expect("json serializes")),
            naming: None,
        }
    }

    /// These frames are closure calls that name their closure so.
    pub fn naming(self, naming: Naming) -> Frames {
        Frames { naming: Some(naming), ..self }
    }

    #[cfg(test)]
    pub fn naming_of(&self) -> Option<&Naming> {
        self.naming.as_ref()
    }

    /// What the dispatcher keeps of a request built from these frames, sent on `chan` to
    /// `ident` with `buffers`: something if it is a closure call.
    pub fn closure_call(&self, chan: Chan, ident: Option<&str>, buffers: &[Bytes]) -> Option<ClosureCall> {
        self.naming.as_ref().map(|n| ClosureCall::of(n, chan, ident, buffers))
    }

    /// The submission date written into every header.
    pub fn date(&self) -> &str {
        &self.date
    }

    /// `(msg_id, frames)` of a new message; `ident` is the target engine's uuid on mux/control.
    pub fn build(&self, msg_type: &str, ident: Option<&str>, buffers: &[Bytes]) -> (String, Vec<Bytes>) {
        let msg_id = self.ids.next();
        let frames = self.build_as(msg_id.clone(), msg_type, ident, buffers);
        (msg_id, frames)
    }

    /// A msg_id for a message built later with [`Frames::build_as`].
    pub fn next_id(&self) -> String {
        self.ids.next()
    }

    /// The frames of a new message with a msg_id taken from [`Frames::next_id`].
    pub fn build_as(&self, msg_id: String, msg_type: &str, ident: Option<&str>, buffers: &[Bytes]) -> Vec<Bytes> {
        let header = Header {
            msg_id,
            msg_type: msg_type.to_string(),
            username: self.session.username.clone(),
            session: self.session.session.clone(),
            date: self.date.clone(),
            version: PROTOCOL_VERSION.to_string(),
        };
        let h = json_frame(&header);
        let ident = ident.map(|id| Bytes::copy_from_slice(id.as_bytes()));
        self.session.frames(ident, h, self.parent.clone(), self.metadata.clone(), self.content.clone(), buffers.iter().cloned())
    }
}

/// A verified message with only what the dispatcher reads (the parent header is not parsed
/// beyond its msg_id).
struct Light {
    msg_type: String,
    date: String,
    parent: Option<String>,
    metadata: LazyJson,
    content: LazyJson,
    buffers: Vec<Bytes>,
}

#[derive(Deserialize)]
struct HeaderLite {
    msg_type: String,
    #[serde(default)]
    date: String,
}

/// Verify and decode `frames` into a [`Light`].
fn decode_light(session: &Session, frames: Vec<Bytes>) -> std::result::Result<Light, String> {
    let (_, signed) = session.verify_frames(frames).map_err(|e| e.to_string())?;
    let h: HeaderLite = serde_json::from_slice(&signed[1]).map_err(|e| format!("header: {e}"))?;
    let parent = serde_json::from_slice::<ParentId>(&signed[2]).map_err(|e| format!("parent header: {e}"))?.msg_id;
    // Checked to be JSON now (nothing is built); parsed when something reads them.
    for (i, name) in [(3, "metadata"), (4, "content")] {
        serde_json::from_slice::<serde::de::IgnoredAny>(&signed[i]).map_err(|e| format!("{name}: {e}"))?;
    }
    let (metadata, content) = (LazyJson::new(signed[3].clone()), LazyJson::new(signed[4].clone()));
    Ok(Light { msg_type: h.msg_type, date: h.date, parent, metadata, content, buffers: signed[5..].to_vec() })
}

/// What reader tasks tell the dispatcher.
enum ReaderEvent {
    /// A reply on a DEALER.
    Reply(Light),
    /// iopub output (`stream`, `execute_result`, `display_data`, `error`).
    Io(Light),
    /// iopub `status: idle` for the request `parent`.
    Idle(String),
    Lost(String),
}

/// Handle to the client's sockets: the dispatcher's command queue and the two threads.
pub(crate) struct Io {
    pub shared: Arc<Shared>,
    cmd: UnboundedSender<IoRequest>,
    /// Ends the IO thread's runtime.
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The IO thread and the drive thread.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Io {
    /// Start the IO and drive threads, connect every socket within `limit`, and return once
    /// connected.
    pub fn start(conn: &ClientConnection, session: Session, ids: Arc<MsgIds>, limit: Duration) -> Result<Io> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Io)?;
        let shared = Arc::new(Shared::new(Drive::new(rt)));
        let (cmd_tx, cmd_rx) = unbounded_channel();
        let (in_tx, in_rx) = unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut threads = Vec::new();
        let (c, sh, ss, tx, ready) = (conn.clone(), shared.clone(), session.clone(), in_tx.clone(), ready_tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name("rpx-client-io".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready.send(Err(Error::Io(e)));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let (iopub, notification) = match tokio::try_join!(sub(c.url(c.iopub), limit), sub(c.url(c.notification), limit)) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = ready.send(Err(e));
                                return;
                            }
                        };
                        tokio::spawn(read_iopub(iopub, ss.clone(), tx.clone()));
                        tokio::spawn(read_notifications(notification, ss, sh, tx));
                        let _ = ready.send(Ok(()));
                        let _ = stop_rx.await;
                    });
                    rt.shutdown_timeout(Duration::from_millis(200));
                })
                .map_err(Error::Io)?,
        );
        let (c, sh) = (conn.clone(), shared.clone());
        let spawned = std::thread::Builder::new().name("rpx-client-drive".into()).spawn(move || {
            let opened = sh.drive.start(async {
                let sends = open(&c, &session, limit, in_tx).await?;
                let d = Dispatcher {
                    shared: sh.clone(),
                    session,
                    ids,
                    sends,
                    routes: HashMap::new(),
                    linger: VecDeque::new(),
                    unreplied: 0,
                    last_rx: Instant::now(),
                    probe: None,
                    lost: None,
                    touched: Vec::new(),
                    batches: false,
                };
                tokio::spawn(d.run(cmd_rx, in_rx));
                Ok(())
            });
            let ok = opened.is_ok();
            let _ = ready_tx.send(opened);
            if ok {
                sh.drive.run_background();
            } else {
                sh.drive.close();
            }
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                let _ = stop_tx.send(());
                return Err(Error::Io(e));
            }
        }
        let io = Io { shared, cmd: cmd_tx, stop: Mutex::new(Some(stop_tx)), threads: Mutex::new(threads) };
        let deadline = Instant::now() + limit + Duration::from_secs(5);
        for _ in 0..2 {
            match ready_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Connection(format!("could not connect to the controller within {limit:?}"))),
            }
        }
        Ok(io)
    }

    /// Hand a command to the dispatcher.
    pub fn send(&self, cmd: IoRequest) -> Result<()> {
        if let Some(why) = self.shared.lost() {
            if let IoRequest::Submit(out) = &cmd {
                fail_outgoing(out, &why);
            }
            return Err(Error::Connection(why));
        }
        self.shared.drive.submit(|| {
            self.cmd.send(cmd).map_err(|e| {
                let why = "the client's dispatcher has stopped".to_string();
                if let IoRequest::Submit(out) = &e.0 {
                    fail_outgoing(out, &why);
                }
                Error::Connection(why)
            })
        })
    }

    /// Stop the dispatcher (pending requests fail with a connection error) and both threads,
    /// and wait for them.
    pub fn close(&self) {
        let _ = self.shared.drive.submit(|| self.cmd.send(IoRequest::Close));
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        self.close();
    }
}

fn fail_outgoing(out: &[Outgoing], why: &str) {
    for o in out {
        o.tracker.set_outcome(o.idx, Outcome::Lost(why.to_string()), None);
        o.tracker.notify();
    }
}

struct Sends {
    query: DealerSendHalf,
    mux: DealerSendHalf,
    task: DealerSendHalf,
    control: DealerSendHalf,
}

async fn dealer(url: String, limit: Duration) -> Result<(DealerSocket, futures::channel::mpsc::Receiver<SocketEvent>)> {
    let mut opts = SocketOptions::default();
    opts.connect_timeout(limit);
    let mut s = DealerSocket::with_options(opts);
    let mon = s.monitor();
    match tokio::time::timeout(limit, s.connect(&url)).await {
        Ok(Ok(())) => Ok((s, mon)),
        Ok(Err(e)) => Err(Error::Connection(format!("cannot connect to {url}: {e}"))),
        Err(_) => {
            Err(Error::Connection(format!("no controller answered at {url} within {limit:?}: is the cluster running? (`ipcluster list`)")))
        }
    }
}

async fn sub(url: String, limit: Duration) -> Result<SubSocket> {
    let mut s = SubSocket::new();
    match tokio::time::timeout(limit, s.connect(&url)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connection(format!("cannot connect to {url}: {e}"))),
        Err(_) => return Err(Error::Connection(format!("no controller answered at {url} within {limit:?}"))),
    }
    s.subscribe("").await.map_err(|e| Error::Connection(format!("cannot subscribe to {url}: {e}")))?;
    Ok(s)
}

/// Connect the DEALERs and start their reader tasks.
async fn open(conn: &ClientConnection, session: &Session, limit: Duration, tx: UnboundedSender<ReaderEvent>) -> Result<Sends> {
    let (q, m, t, c) = tokio::try_join!(
        dealer(conn.url(conn.registration), limit),
        dealer(conn.url(conn.mux), limit),
        dealer(conn.url(conn.task), limit),
        dealer(conn.url(conn.control), limit),
    )?;
    let mut halves = Vec::new();
    for (chan, (sock, mon)) in [(Chan::Query, q), (Chan::Mux, m), (Chan::Task, t), (Chan::Control, c)] {
        let (send, recv) = sock.split();
        tokio::spawn(read_dealer(recv, chan, session.clone(), tx.clone()));
        tokio::spawn(watch(mon, chan, tx.clone()));
        halves.push(send);
    }
    let mut it = halves.into_iter();
    let mut next = || it.next().expect("four dealers");
    Ok(Sends { query: next(), mux: next(), task: next(), control: next() })
}

async fn watch(mut mon: futures::channel::mpsc::Receiver<SocketEvent>, chan: Chan, tx: UnboundedSender<ReaderEvent>) {
    while let Some(ev) = mon.next().await {
        if let SocketEvent::Disconnected(_) = ev {
            let _ = tx.send(ReaderEvent::Lost(format!("the controller closed the {} connection (it stopped or crashed)", chan.name())));
            return;
        }
    }
}

async fn read_dealer(mut recv: DealerRecvHalf, chan: Chan, session: Session, tx: UnboundedSender<ReaderEvent>) {
    loop {
        match recv.recv().await {
            Ok(m) => {
                let frames = rpx_guard::zmq::frames(m);
                let messages = if batch::is_batch(&frames) {
                    match batch::decode(&session, frames) {
                        Ok(messages) => messages,
                        Err(e) => {
                            warn!(socket = chan.name(), error = %e, "refused a malformed batch from the controller");
                            continue;
                        }
                    }
                } else {
                    vec![frames]
                };
                for frames in messages {
                    match decode_light(&session, frames) {
                        Ok(msg) => {
                            if tx.send(ReaderEvent::Reply(msg)).is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!(socket = chan.name(), error = %e, "dropped a bad message"),
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(ReaderEvent::Lost(format!("receiving on the {} socket failed: {e}", chan.name())));
                return;
            }
        }
    }
}

#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(borrow)]
    msg_type: std::borrow::Cow<'a, str>,
}

/// The `status` of a reply's content, if it says.
#[derive(Deserialize)]
struct ReplyStatus {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct StateOnly<'a> {
    #[serde(borrow, default)]
    execution_state: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ParentId {
    #[serde(default)]
    msg_id: Option<String>,
}

/// A parent header's session: whose request an iopub message answers.
#[derive(Deserialize)]
struct ParentSession<'a> {
    #[serde(borrow, default)]
    session: Option<std::borrow::Cow<'a, str>>,
}

async fn read_iopub(mut sub: SubSocket, session: Session, tx: UnboundedSender<ReaderEvent>) {
    loop {
        let m = match sub.recv().await {
            Ok(m) => m,
            Err(ZmqError::NoMessage) => {
                // No publisher right now (the SUB reconnects by itself); DEALERs report loss.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => {
                debug!(error = %e, "iopub receive error");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let frames = rpx_guard::zmq::frames(m);
        let Some((_, signed)) = split_at_delimiter(&frames).filter(|(_, s)| s.len() >= 5) else { continue };
        // Only output of this client's requests matters (and is signed with its key); the
        // rest is dropped here, so nothing piles up while no request is outstanding.
        let ours = serde_json::from_slice::<ParentSession>(&signed[2]).ok().and_then(|p| p.session).is_some_and(|s| s == session.session);
        if !ours {
            continue;
        }
        // Read the type first: most iopub traffic (busy/idle, inputs) needs no full decode.
        let kind = match serde_json::from_slice::<TypeOnly>(&signed[1]) {
            Ok(t) => t.msg_type.into_owned(),
            Err(_) => continue,
        };
        let ev = match kind.as_str() {
            "status" => {
                let idle =
                    serde_json::from_slice::<StateOnly>(&signed[4]).ok().and_then(|s| s.execution_state).is_some_and(|s| s == "idle");
                if !idle {
                    continue;
                }
                let Ok((_, signed)) = session.verify_frames(frames) else {
                    warn!("dropped an iopub status with a bad signature");
                    continue;
                };
                match serde_json::from_slice::<ParentId>(&signed[2]).ok().and_then(|p| p.msg_id) {
                    Some(id) => ReaderEvent::Idle(id),
                    None => continue,
                }
            }
            "stream" | "execute_result" | "display_data" | "error" => match decode_light(&session, frames) {
                Ok(msg) => ReaderEvent::Io(msg),
                Err(e) => {
                    warn!(error = %e, "dropped a bad iopub message");
                    continue;
                }
            },
            _ => continue,
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

/// Engine notifications, applied to the engine table as they come; the controller's shutdown
/// is also passed to the dispatcher (pending requests fail).
async fn read_notifications(mut sub: SubSocket, session: Session, shared: Arc<Shared>, tx: UnboundedSender<ReaderEvent>) {
    loop {
        match sub.recv().await {
            Ok(m) => match decode_light(&session, rpx_guard::zmq::frames(m)) {
                Ok(msg) => {
                    if shared.on_notification(&msg.msg_type, &msg.content) {
                        *shared.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(CONTROLLER_SHUT_DOWN.into());
                        shared.engines_cv.notify_all();
                        // Outstanding requests fail once the dispatcher reads this (whoever
                        // waits for them runs it); new ones are refused already.
                        if tx.send(ReaderEvent::Lost(CONTROLLER_SHUT_DOWN.into())).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => warn!(error = %e, "dropped a bad notification"),
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Marks the dispatcher's end, however it ends (returning or panicking): waiters stop waiting
/// for it, and nothing runs the request runtime any more.
struct Ended(Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.engines_cv.notify_all();
        self.0.drive.close();
    }
}

/// Where a reply or iopub message for a msg_id goes.
struct Route {
    tracker: Arc<Tracker>,
    idx: usize,
    replied: bool,
    idle: bool,
    closure: Option<ClosureCall>,
}

struct Dispatcher {
    shared: Arc<Shared>,
    session: Session,
    ids: Arc<MsgIds>,
    sends: Sends,
    routes: HashMap<String, Route>,
    /// Replied tasks still waiting for their iopub `idle`, with the time to stop waiting.
    linger: VecDeque<(Instant, String)>,
    unreplied: usize,
    last_rx: Instant,
    probe: Option<(String, Instant)>,
    lost: Option<String>,
    touched: Vec<Arc<Tracker>>,
    /// The controller reads rpx batches ([`ConnectionReply::batches`]): the load-balanced
    /// requests of one submission go in batches.
    batches: bool,
}

impl Dispatcher {
    async fn run(mut self, mut cmd_rx: UnboundedReceiver<IoRequest>, mut in_rx: UnboundedReceiver<ReaderEvent>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inbound = Vec::with_capacity(256);
        let mut cmds = Vec::with_capacity(16);
        let _ended = Ended(self.shared.clone());
        loop {
            tokio::select! {
                n = in_rx.recv_many(&mut inbound, 256) => {
                    if n == 0 {
                        self.lose("the client's sockets have closed".into());
                        return;
                    }
                    for ev in inbound.drain(..) {
                        self.on_inbound(ev).await;
                    }
                    self.flush();
                }
                n = cmd_rx.recv_many(&mut cmds, 16) => {
                    if n == 0 {
                        self.lose("the client was closed".into());
                        return;
                    }
                    for c in std::mem::take(&mut cmds) {
                        match c {
                            IoRequest::Close => {
                                self.lose("the client was closed".into());
                                self.flush();
                                self.shared.drive.sent();
                                return;
                            }
                            IoRequest::Refresh => self.refresh().await,
                            IoRequest::Submit(out) => self.submit(out).await,
                        }
                        self.shared.drive.sent();
                    }
                    self.flush();
                }
                _ = tick.tick() => {
                    self.on_tick().await;
                    self.flush();
                }
            }
            self.shared.drive.set_work(!self.routes.is_empty() || self.probe.is_some(), || !cmd_rx.is_empty());
        }
    }

    fn flush(&mut self) {
        if self.touched.is_empty() {
            return;
        }
        self.touched.sort_by_key(|t| Arc::as_ptr(t) as usize);
        self.touched.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for t in self.touched.drain(..) {
            t.notify();
        }
    }

    async fn send(&mut self, chan: Chan, frames: Vec<Bytes>) -> std::result::Result<(), String> {
        let sock = match chan {
            Chan::Query => &mut self.sends.query,
            Chan::Mux => &mut self.sends.mux,
            Chan::Task => &mut self.sends.task,
            Chan::Control => &mut self.sends.control,
        };
        let mut msg = rpx_guard::zmq::message(frames);
        let deadline = Instant::now() + SEND_LIMIT;
        let mut retried = Duration::ZERO;
        loop {
            match tokio::time::timeout_at(deadline.into(), sock.send(msg)).await {
                Ok(Ok(())) => return Ok(()),
                // Not connected (yet, or any more): retry briefly, then give up.
                Ok(Err(ZmqError::ReturnToSender { message, .. })) if retried < Duration::from_millis(500) => {
                    msg = message;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    retried += Duration::from_millis(20);
                }
                Ok(Err(e)) => return Err(format!("cannot send on the {} socket: {e}", chan.name())),
                Err(_) => {
                    return Err(format!(
                        "sending on the {} socket did not finish within {SEND_LIMIT:?}: the controller is not reading",
                        chan.name()
                    ))
                }
            }
        }
    }

    async fn submit(&mut self, out: Vec<Outgoing>) {
        // Load-balanced requests of one submission go to a controller that reads batches in
        // batches (each still its own signed request); the others one by one, in order.
        let mut tasks = batch::Batcher::default();
        let mut queued = 0;
        for o in out {
            if let Some(why) = &self.lost {
                o.tracker.set_outcome(o.idx, Outcome::Lost(why.clone()), None);
                self.touched.push(o.tracker);
                continue;
            }
            self.routes.insert(
                o.msg_id.clone(),
                Route { tracker: o.tracker.clone(), idx: o.idx, replied: false, idle: false, closure: o.closure },
            );
            self.unreplied += 1;
            if self.batches && o.chan == Chan::Task {
                tasks.push(o.frames);
                queued += 1;
                continue;
            }
            if queued > 0 {
                queued = 0;
                self.send_tasks(std::mem::take(&mut tasks)).await;
            }
            if let Err(why) = self.send(o.chan, o.frames).await {
                self.lose(why);
            }
        }
        if queued > 0 {
            self.send_tasks(tasks).await;
        }
    }

    async fn send_tasks(&mut self, tasks: batch::Batcher) {
        for send in tasks.finish() {
            let frames = match send {
                batch::Send::Single(frames) => frames,
                batch::Send::Batch(messages) => batch::encode(&self.session, vec![], messages),
            };
            if let Err(why) = self.send(Chan::Task, frames).await {
                self.lose(why);
            }
        }
    }

    async fn refresh(&mut self) {
        if self.lost.is_some() {
            return;
        }
        let (msg_id, frames) = Frames::new(&self.session, &self.ids, &json!({}), &json!({})).build("connection_request", None, &[]);
        if self.probe.is_none() {
            self.probe = Some((msg_id, Instant::now()));
        }
        if let Err(why) = self.send(Chan::Query, frames).await {
            self.lose(why);
        }
    }

    /// The engine a reply came from: its `engine` uuid (`uuid`, read once from the metadata by
    /// the caller) if known, else the `engine_info` of the content.
    fn engine_of(&self, uuid: Option<&str>, msg: &Light) -> Option<usize> {
        if let Some(id) = uuid.and_then(|u| self.shared.seen(u)) {
            return Some(id);
        }
        rpx_protocol::content::ReplyContent::read(&msg.content).engine_id().map(|i| i as usize)
    }

    async fn on_inbound(&mut self, ev: ReaderEvent) {
        self.last_rx = Instant::now();
        match ev {
            ReaderEvent::Reply(msg) => self.on_reply(msg).await,
            ReaderEvent::Io(msg) => {
                if let Some(r) = msg.parent.as_deref().and_then(|p| self.routes.get(p)) {
                    r.tracker.add_io(r.idx, &msg.msg_type, &msg.content);
                    self.touched.push(r.tracker.clone());
                }
            }
            ReaderEvent::Idle(parent) => {
                let Some(r) = self.routes.get_mut(&parent) else { return };
                r.idle = true;
                r.tracker.settle(r.idx);
                self.touched.push(r.tracker.clone());
                if r.replied {
                    self.routes.remove(&parent);
                }
            }
            ReaderEvent::Lost(why) => self.lose(why),
        }
    }

    async fn on_reply(&mut self, msg: Light) {
        let parent = msg.parent.clone().unwrap_or_default();
        if self.probe.as_ref().is_some_and(|(id, _)| *id == parent) {
            self.probe = None;
        }
        if msg.msg_type == "connection_reply" {
            if let Some(ConnectionReply { engines, hosts, batches, .. }) =
                ConnectionReply::deserialize(&*msg.content).ok().filter(|r| r.status == OK)
            {
                self.batches = batches;
                let table: BTreeMap<usize, String> = engines.into_iter().filter_map(|(k, v)| Some((k.parse().ok()?, v))).collect();
                self.shared.set_engines(table, hosts.map(|h| h.into_iter().collect()));
            }
        }
        // Read straight from the frame: the metadata is built into a `Value` only if asked for.
        let EngineMetadata { engine: uuid, quiet } = serde_json::from_slice(msg.metadata.raw()).unwrap_or_default();
        let engine_id = self.engine_of(uuid.as_deref(), &msg);
        let unknown_engine = uuid.as_deref().is_some_and(|u| !u.is_empty() && self.shared.seen(u).is_none());
        let Some(route) = self.routes.get_mut(&parent) else {
            debug!(msg_type = %msg.msg_type, %parent, "reply to no pending request");
            return;
        };
        if route.replied {
            return;
        }
        route.replied = true;
        self.unreplied = self.unreplied.saturating_sub(1);
        let status = serde_json::from_slice::<ReplyStatus>(msg.content.raw())
            .ok()
            .and_then(|s| s.status)
            .unwrap_or_else(|| if msg.msg_type == "hub_error" { "error" } else { "ok" }.to_string());
        if let Some(call) = route.closure.take() {
            match closures::after_reply(call, &status, || rpx_protocol::content::ReplyContent::read(&msg.content).error.ename) {
                AfterReply::Nothing => {}
                AfterReply::Compiled(id) => self.shared.compiled.learn(id),
                AfterReply::Resend { id, code, chan, ident, buffers } => {
                    // The engines could not resolve the closure's id (the compiler restarted):
                    // the same request goes again with the code, under a new msg_id; the
                    // caller sees only its reply.
                    debug!(closure = %id, %parent, "closure id not resolved; sending its code");
                    self.shared.compiled.forget(&id);
                    let route = self.routes.remove(&parent).expect("looked up above");
                    let msg_id = code.next_id();
                    let frames = code.build_as(msg_id.clone(), "apply_request", ident.as_deref(), &buffers);
                    route.tracker.retry(route.idx, msg_id.clone());
                    let again = Route { replied: false, idle: false, closure: Some(ClosureCall::Code(id)), ..route };
                    self.routes.insert(msg_id, again);
                    self.unreplied += 1;
                    if let Err(why) = self.send(chan, frames).await {
                        self.lose(why);
                    }
                    return;
                }
            }
        }
        let Light { metadata, content, buffers, date, .. } = msg;
        // The engine published nothing for it (not even `idle`): the reply is all there is.
        let quiet = quiet == Some(true);
        let reply = ReplyData { status, content, metadata, date, buffers };
        route.tracker.set_outcome(route.idx, Outcome::Reply(reply), engine_id);
        self.touched.push(route.tracker.clone());
        if quiet {
            route.tracker.settle(route.idx);
            self.routes.remove(&parent);
        } else if route.idle {
            self.routes.remove(&parent);
        } else {
            self.linger.push_back((Instant::now() + IDLE_GRACE, parent));
        }
        if unknown_engine {
            // A reply from an engine this client has not heard of: a notification was missed.
            self.refresh().await;
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        while let Some((t, _)) = self.linger.front() {
            if *t > now {
                break;
            }
            let (_, id) = self.linger.pop_front().expect("front exists");
            if let Some(r) = self.routes.remove(&id) {
                r.tracker.settle(r.idx);
                self.touched.push(r.tracker);
            }
        }
        if self.lost.is_some() {
            return;
        }
        match &self.probe {
            Some((_, sent)) if now.duration_since(*sent) > LIVENESS_TIMEOUT => {
                self.lose(format!("the controller did not answer for {LIVENESS_TIMEOUT:?} (it may be frozen or its host unreachable)"));
            }
            None if self.unreplied > 0 && now.duration_since(self.last_rx) > PROBE_AFTER => self.refresh().await,
            _ => {}
        }
    }

    /// The controller is gone: fail everything pending, refuse what comes next.
    fn lose(&mut self, why: String) {
        if self.lost.is_none() {
            warn!(reason = %why, "lost the controller");
            self.lost = Some(why.clone());
            *self.shared.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            self.shared.engines_cv.notify_all();
        }
        let why = self.lost.clone().expect("set above");
        for (_, r) in self.routes.drain() {
            if !r.replied {
                r.tracker.set_outcome(r.idx, Outcome::Lost(why.clone()), None);
            }
            r.tracker.settle(r.idx);
            self.touched.push(r.tracker);
        }
        self.linger.clear();
        self.unreplied = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_share_content_and_sign_each_message() {
        let session = Session::new(b"key", "me");
        let ids = Arc::new(MsgIds::new(&session));
        let b = Frames::new(&session, &ids, &json!({"retries": 1}), &json!({"rpx": {"op": "pull", "names": ["x"]}}));
        let (id1, f1) = b.build("apply_request", Some("engine-uuid"), &[Bytes::from_static(b"buf")]);
        let (id2, f2) = b.build("apply_request", None, &[]);
        assert_ne!(id1, id2);
        let light = decode_light(&session, f1.clone()).expect("valid signature");
        assert_eq!((light.msg_type.as_str(), light.parent, light.date.as_str()), ("apply_request", None, b.date()));
        assert_eq!(light.content["rpx"]["op"], "pull");
        let m1 = session.decode(f1).expect("valid signature");
        assert_eq!(m1.idents, vec![Bytes::from_static(b"engine-uuid")]);
        assert_eq!(m1.msg_id(), id1);
        assert_eq!(m1.metadata["retries"], 1);
        assert_eq!(m1.content["rpx"]["op"], "pull");
        assert_eq!(m1.buffers, vec![Bytes::from_static(b"buf")]);
        assert_eq!(m1.header.date, b.date());
        let m2 = session.decode(f2).expect("valid signature");
        assert!(m2.idents.is_empty());
        assert_eq!(m2.parent_header, json!({}));
        assert!(id1.starts_with(&format!("{}_{}_", session.session, std::process::id())));
    }

    #[test]
    fn a_reply_is_checked_to_be_json_when_it_arrives_and_read_when_asked() {
        let session = Session::new(b"key", "me");
        let parent = session.header("apply_request");
        let md = json!({"engine": "u-1", rpx_protocol::apply::QUIET_KEY: true, "started": "2024-01-01T00:00:00Z"});
        let (_, frames) = session.msg(&[], "apply_reply", json!({"status": "ok"}), Some(&parent), md.clone(), &[]);
        let light = decode_light(&session, frames).expect("valid reply");
        assert_eq!(light.parent.as_deref(), Some(parent.msg_id.as_str()));
        // What the dispatcher reads straight from the frame...
        let read: EngineMetadata = serde_json::from_slice(light.metadata.raw()).unwrap();
        assert_eq!((read.engine.as_deref(), read.quiet), (Some("u-1"), Some(true)));
        // ...and the whole value, for whoever asks for it later.
        assert_eq!(*light.metadata, md);
        assert_eq!(light.content["status"], "ok");
        // A signed reply whose metadata or content is not JSON is refused, saying which.
        for (i, name) in [(3, "metadata"), (4, "content")] {
            let h = json_frame(&session.header("apply_reply"));
            let mut json = [json_frame(&parent), json_frame(&md), json_frame(&json!({"status": "ok"}))];
            json[i - 2] = Bytes::from_static(b"{not json");
            let [p, m, c] = json;
            let frames = session.frames(std::iter::empty(), h, p, m, c, std::iter::empty());
            let err = decode_light(&session, frames).err().expect("refused");
            assert!(err.starts_with(name), "{err}");
        }
    }
}
