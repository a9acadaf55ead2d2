//! Sockets: registering with the controller, connecting them, and the small tasks that pump
//! frames between them and the engine loop.
//!
//! Each DEALER is split: a receive task forwards every message to the engine loop as an
//! [`LoopEvent`], and a send task drains a bounded channel, bounding every send with a timeout
//! (zeromq 0.7 can block forever on a stalled peer). The heartbeat runs on its own task and only
//! counts the pings that arrive. The tasks of one set of controller sockets are held in
//! [`Tasks`] (dropped: stopped), and their closed connections are reported as
//! [`LoopEvent::ControllerLost`], so that [`rejoin`] can replace them after a controller restart
//! (zeromq 0.7's DEALERs do not reconnect by themselves).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::compile::{msg_type, EngineHello, EngineHelloReply, HistoryCell};
use rpx_protocol::connection::{read_json, CompilerConnection, EngineConnection};
use rpx_protocol::registration::{msg_type as reg_msg, RegistrationReply, RegistrationRequest};
use rpx_protocol::{batch, Session};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zeromq::{DealerSocket, PubSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::{Error, Result};

/// A multipart message.
pub type Frames = Vec<Bytes>;
/// Where to send frames for one socket.
pub type Outlet = mpsc::Sender<Frames>;

/// The shell sockets a request can arrive on (replies go back on the same one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Mux,
    Task,
    Broadcast,
    Control,
}

/// Where outgoing messages go, one outlet per socket.
#[derive(Debug)]
pub struct Outlets {
    pub mux: Outlet,
    pub task: Outlet,
    pub broadcast: Option<Outlet>,
    pub control: Outlet,
    pub iopub: Outlet,
    pub registration: Outlet,
}

impl Outlets {
    /// The outlet replies to a request from channel `c` go to.
    pub fn for_channel(&self, c: Channel) -> Option<&Outlet> {
        match c {
            Channel::Mux => Some(&self.mux),
            Channel::Task => Some(&self.task),
            Channel::Broadcast => self.broadcast.as_ref(),
            Channel::Control => Some(&self.control),
        }
    }
}

/// Queue `frames` on `outlet`; a full or closed outlet drops them (said in the log).
pub fn push(outlet: &Outlet, frames: Frames, what: &str) {
    if let Err(e) = outlet.try_send(frames) {
        warn!(what, error = %e, "outgoing queue full or closed; message dropped");
    }
}

/// Everything the engine loop receives from its sockets and helper tasks.
#[derive(Debug)]
pub enum LoopEvent {
    Shell(Channel, Frames),
    Control(Frames),
    Compiler(Frames),
    /// The compiler answered `engine_hello`.
    CompilerReady(Box<CompilerLink>),
    /// No compiler could be reached.
    CompilerFailed(String),
    /// The connection to the compiler with this link id dropped (socket monitor).
    CompilerLost(u64),
    /// The broadcast leaf connection of the sockets of this generation is up.
    BroadcastReady(u64, Outlet, Tasks),
    /// A message on the registration socket of this generation (an eviction notice).
    Registration(u64, Frames),
    /// A connection to the controller (of this generation, on this socket) closed.
    ControllerLost(u64, &'static str),
    /// The outcome of a [`rejoin`] attempt.
    Rejoined(Box<std::result::Result<Rejoined, String>>),
}

/// A connected compiler.
#[derive(Debug)]
pub struct CompilerLink {
    /// Tells this connection's [`LoopEvent::CompilerLost`] from an older one's.
    pub id: u64,
    pub url: String,
    pub out: Outlet,
    pub session: Session,
    pub hello: EngineHelloReply,
    /// The tasks that read the connection: stopped when the link is dropped, so the socket
    /// closes and the compiler (even one that was frozen) sees this connection end.
    pub(crate) readers: Vec<tokio::task::AbortHandle>,
}

impl Drop for CompilerLink {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Where an engine finds its compiler.
#[derive(Debug, Clone)]
pub enum CompilerSource {
    /// The compiler's connection file (same host or shared filesystem), read at each connect.
    File(PathBuf),
    /// Given whole, from `RPX_CONNECTION_INFO`.
    Given(CompilerConnection),
}

impl CompilerSource {
    fn describe(&self) -> String {
        match self {
            CompilerSource::File(f) => format!("in {}", f.display()),
            CompilerSource::Given(c) => format!("at {} (RPX_CONNECTION_INFO)", c.url),
        }
    }
}

/// This host's name (its UTS namespace's), for the compiler's log.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

const SEND_TIMEOUT: Duration = Duration::from_secs(5);
const OUTLET_CAPACITY: usize = 4096;

fn options(identity: &str, connect_timeout: Duration) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.peer_identity(identity.as_bytes().try_into().expect("a uuid is a valid zmq identity"));
    o.connect_timeout(connect_timeout);
    o
}

/// A DEALER with `identity`, connected to `url` (waits up to `timeout` for the peer).
pub async fn connect_dealer(url: &str, identity: &str, timeout: Duration) -> Result<DealerSocket> {
    connect(DealerSocket::with_options(options(identity, timeout)), url, timeout).await
}

async fn connect(mut s: DealerSocket, url: &str, timeout: Duration) -> Result<DealerSocket> {
    match tokio::time::timeout(timeout + Duration::from_millis(500), s.connect(url)).await {
        Ok(Ok(())) => Ok(s),
        Ok(Err(e)) => Err(Error::Connect(format!("{url}: {e}"))),
        Err(_) => Err(Error::Connect(format!("{url}: timed out after {timeout:?}"))),
    }
}

/// The tasks serving one set of controller sockets. Dropping it stops them, which closes the
/// sockets: a link that is replaced leaves nothing behind.
#[derive(Debug, Default)]
pub struct Tasks(Vec<tokio::task::AbortHandle>);

impl Tasks {
    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&mut self, f: F) {
        self.0.push(tokio::spawn(f).abort_handle());
    }

    /// Take over the tasks of `other`.
    pub fn absorb(&mut self, mut other: Tasks) {
        self.0.append(&mut other.0);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// A new number for a set of controller sockets, so that events of replaced sockets are told
/// from current ones.
fn next_generation() -> u64 {
    static GENERATIONS: AtomicU64 = AtomicU64::new(1);
    GENERATIONS.fetch_add(1, Ordering::Relaxed)
}

/// Report the first `Disconnected` of a socket's monitor as [`LoopEvent::ControllerLost`].
fn watch_connection(
    tasks: &mut Tasks,
    mut monitor: futures::channel::mpsc::Receiver<zeromq::SocketEvent>,
    generation: u64,
    socket: &'static str,
    inbound: mpsc::Sender<LoopEvent>,
) {
    tasks.spawn(async move {
        use futures::StreamExt;
        while let Some(ev) = monitor.next().await {
            if matches!(ev, zeromq::SocketEvent::Disconnected(_)) {
                let _ = inbound.send(LoopEvent::ControllerLost(generation, socket)).await;
                break;
            }
        }
    });
}

/// A registration with the controller.
#[derive(Debug)]
pub struct Registration {
    pub id: u64,
    /// The controller's heartbeat period.
    pub hb_period: Duration,
    /// The msg_id of the `registration_request` (eviction notices name it).
    pub request: String,
    /// The registration socket (unregistration goes out on it, eviction notices come in as
    /// [`LoopEvent::Registration`]).
    pub outlet: Outlet,
    pub generation: u64,
    pub tasks: Tasks,
    /// The controller reads batches of replies ([`RegistrationReply::batches`]).
    pub batches: bool,
}

/// First wait for a registration reply before the request is sent again.
pub const REGISTER_FIRST_WAIT: Duration = Duration::from_millis(1000);
/// Longest wait between two sends of the registration request.
pub const REGISTER_MAX_WAIT: Duration = Duration::from_secs(8);

/// The wait after the `attempt`-th send (0-based) of a registration request: doubling from
/// [`REGISTER_FIRST_WAIT`] up to [`REGISTER_MAX_WAIT`], scaled by `jitter` in [0, 1) to between
/// half and one and a half times that, so that a thousand engines started together do not
/// resend in step.
pub fn register_wait(attempt: u32, jitter: f64) -> Duration {
    let base = REGISTER_FIRST_WAIT.saturating_mul(1u32 << attempt.min(16)).min(REGISTER_MAX_WAIT);
    base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
}

/// Register with the controller at `url` over a new registration socket, asking for
/// `requested_id` if given, within `timeout` in all (connecting included).
///
/// While no reply comes, the same signed request is sent again after jittered, doubling waits
/// ([`register_wait`]): a controller busy with a storm of registrations answers the first copy
/// it reads, and a copy it reads after registering the engine is answered with the same
/// registration (the request asks for eviction notices, so the controller keeps the engine's
/// id: see the hub's `on_register`). When `timeout` runs out, the error says how many requests
/// went unanswered for how long.
///
/// The socket has no fixed identity: the controller answers the identity each connection gets,
/// so a new registration socket never takes over an older connection's identity. The request
/// asks for an eviction notice ([`RegistrationRequest::notify_eviction`]).
pub async fn register(
    session: &Session,
    url: &str,
    uuid: &str,
    requested_id: Option<u64>,
    timeout: Duration,
    inbound: &mpsc::Sender<LoopEvent>,
) -> Result<Registration> {
    info!(%url, %uuid, ?requested_id, "registering with the controller");
    let started = Instant::now();
    let deadline = started + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut o = SocketOptions::default();
    o.connect_timeout(timeout);
    let mut reg = connect(DealerSocket::with_options(o), url, timeout)
        .await
        .map_err(|e| Error::Registration(format!("cannot reach the controller's registration port: {e}")))?;
    let generation = next_generation();
    let mut tasks = Tasks::default();
    watch_connection(&mut tasks, reg.monitor(), generation, "registration", inbound.clone());
    let (mut reg_send, mut reg_recv) = reg.split();
    let request = RegistrationRequest {
        uuid: uuid.to_string(),
        id: requested_id,
        notify_eviction: true,
        host: Some(rpx_protocol::dataplane::HostIdentity {
            data: crate::datalink::announced(),
            ..rpx_protocol::dataplane::HostIdentity::of_engine(uuid)
        }),
        batches: true,
    };
    let content = serde_json::to_value(&request).expect("serializes");
    let (header, frames) = session.msg(&[], reg_msg::REGISTRATION_REQUEST, content, None, json!({"engine": uuid}), &[]);
    let mut sent = 0u32;
    let reply = 'sends: loop {
        match send_now(&mut reg_send, frames.clone(), left()).await {
            Ok(()) => sent += 1,
            Err(e) => warn!(error = %e, "cannot send the registration request; trying again"),
        }
        let until = Instant::now() + register_wait(sent.saturating_sub(1), rand::random::<f64>()).min(left());
        loop {
            let m = match tokio::time::timeout(until.saturating_duration_since(Instant::now()), reg_recv.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    debug!(error = %e, "registration receive error");
                    tokio::time::sleep(Duration::from_millis(20).min(left())).await;
                    if Instant::now() >= until {
                        break;
                    }
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            match session.decode(m.into_vec()) {
                Ok(msg) if msg.msg_type() == reg_msg::REGISTRATION_REPLY && msg.parent_msg_id().is_none_or(|p| p == header.msg_id) => {
                    break 'sends msg
                }
                Ok(msg) => warn!(msg_type = msg.msg_type(), "unexpected message on the registration socket"),
                Err(e) => warn!(error = %e, "bad message on the registration socket dropped"),
            }
        }
        if left().is_zero() {
            return Err(Error::Registration(format!(
                "no registration reply from the controller at {url}: {sent} request(s) over {:.1} s went unanswered; is ipcontroller running there (and is --timeout long enough for this many engines)?",
                started.elapsed().as_secs_f64()
            )));
        }
        debug!(sent, "no registration reply yet; sending the request again");
    };
    if reply.content_str("status") != Some("ok") {
        let why = reply.content_str("evalue").or(reply.content_str("reason")).unwrap_or("no reason given");
        return Err(Error::Registration(format!("the controller refused registration: {why}")));
    }
    let ok: RegistrationReply =
        serde_json::from_value(reply.content).map_err(|e| Error::Registration(format!("malformed registration reply: {e}")))?;
    let hb_period = Duration::from_millis(ok.hb_period.max(10));
    info!(engine_id = ok.id, ?hb_period, "registered");
    // The socket stays: unregistration goes out on it, eviction notices come in.
    let (outlet, mut rx) = mpsc::channel::<Frames>(16);
    tasks.spawn(async move {
        while let Some(f) = rx.recv().await {
            let _ = tokio::time::timeout(Duration::from_secs(2), reg_send.send(rpx_guard::zmq::message(f))).await;
        }
    });
    let to_loop = inbound.clone();
    tasks.spawn(async move {
        loop {
            match reg_recv.recv().await {
                Ok(m) => {
                    if to_loop.send(LoopEvent::Registration(generation, m.into_vec())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "registration receive error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(Registration { id: ok.id, hb_period, request: header.msg_id, outlet, generation, tasks, batches: ok.batches })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_waits_double_with_jitter_up_to_a_bound() {
        assert_eq!(register_wait(0, 0.5), REGISTER_FIRST_WAIT);
        assert_eq!(register_wait(1, 0.5), REGISTER_FIRST_WAIT * 2);
        assert_eq!(register_wait(2, 0.5), REGISTER_FIRST_WAIT * 4);
        assert_eq!(register_wait(30, 0.5), REGISTER_MAX_WAIT, "capped, however many attempts");
        assert_eq!(register_wait(0, 0.0), REGISTER_FIRST_WAIT / 2);
        assert_eq!(register_wait(0, 1.0), REGISTER_FIRST_WAIT * 3 / 2);
        assert_eq!(register_wait(u32::MAX, 7.0), REGISTER_MAX_WAIT * 3 / 2, "jitter is clamped");
    }

    /// No controller at all: registration gives up within its timeout with an error that says
    /// what went unanswered.
    #[tokio::test]
    async fn registration_without_a_controller_fails_within_its_timeout_with_a_clear_error() {
        // A ROUTER that never answers: the socket connects, the requests go unanswered.
        let mut silent = zeromq::RouterSocket::new();
        let ep = silent.bind("tcp://127.0.0.1:0").await.unwrap();
        let url = ep.to_string();
        let (tx, _rx) = mpsc::channel(16);
        let session = Session::new(b"k", "u");
        let t = Instant::now();
        let err = register(&session, &url, "uuid-x", None, Duration::from_millis(2500), &tx).await.unwrap_err().to_string();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(2400) && took < Duration::from_secs(5), "{took:?}");
        assert!(err.contains("no registration reply") && err.contains("went unanswered") && err.contains(&url), "{err}");
        let mut copies = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), silent.recv()).await {
            copies += 1;
        }
        assert!(copies >= 2, "the request was sent again while unanswered: {copies}");
    }
}

async fn send_now(s: &mut zeromq::DealerSendHalf, frames: Frames, limit: Duration) -> Result<()> {
    match tokio::time::timeout(limit.min(SEND_TIMEOUT), s.send(rpx_guard::zmq::message(frames))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Connect(format!("send failed: {e}"))),
        Err(_) => Err(Error::Connect("send timed out".into())),
    }
}

/// The engine's connected sockets to the controller, but for registration.
#[derive(Debug)]
pub struct Sockets {
    pub generation: u64,
    pub mux: Outlet,
    pub task: Outlet,
    pub control: Outlet,
    pub iopub: Outlet,
    /// Heartbeat pings received.
    pub pings: Pings,
    pub tasks: Tasks,
    /// Whether the task socket sends batches (set once the controller said it reads them).
    pub batches: Arc<AtomicBool>,
}

/// Connect the engine's sockets to the controller: shell (mux, task), control, iopub and the
/// heart, and in the background the broadcast leaf of engine `id` (announced to the engine
/// loop as [`LoopEvent::BroadcastReady`]). A closed connection of mux, task or control is
/// reported as [`LoopEvent::ControllerLost`].
pub async fn connect_engine(
    conn: &EngineConnection,
    session: &Session,
    uuid: &str,
    id: u64,
    t: Duration,
    inbound_tx: &mpsc::Sender<LoopEvent>,
) -> Result<Sockets> {
    let generation = next_generation();
    let mut tasks = Tasks::default();
    let mut mux = connect_dealer(&conn.url(conn.mux), uuid, t).await?;
    let mut task = connect_dealer(&conn.url(conn.task), uuid, t).await?;
    let mut control = connect_dealer(&conn.url(conn.control), uuid, t).await?;
    for (s, name) in [(&mut mux, "mux"), (&mut task, "task"), (&mut control, "control")] {
        watch_connection(&mut tasks, s.monitor(), generation, name, inbound_tx.clone());
    }
    let iopub = connect_iopub(&conn.url(conn.iopub), uuid, t, &mut tasks).await?;
    let pings = Pings::new();
    let batches = Arc::new(AtomicBool::new(false));
    start_heart(&conn.url(conn.hb_ping), &conn.url(conn.hb_pong), uuid, t, pings.clone(), &mut tasks).await?;
    let sockets = Sockets {
        generation,
        mux: spawn_dealer(mux, "mux", inbound_tx.clone(), |f| LoopEvent::Shell(Channel::Mux, f), &mut tasks, session, None),
        task: spawn_dealer(
            task,
            "task",
            inbound_tx.clone(),
            |f| LoopEvent::Shell(Channel::Task, f),
            &mut tasks,
            session,
            Some(batches.clone()),
        ),
        control: spawn_dealer(control, "control", inbound_tx.clone(), LoopEvent::Control, &mut tasks, session, None),
        iopub,
        pings,
        tasks,
        batches,
    };
    let mut sockets = sockets;
    if !conn.broadcast.is_empty() {
        let url = conn.url(conn.broadcast[(id as usize) % conn.broadcast.len()]);
        let (uuid, inbound, session) = (uuid.to_string(), inbound_tx.clone(), session.clone());
        sockets.tasks.spawn(async move {
            match connect_dealer(&url, &uuid, Duration::from_secs(30)).await {
                Ok(s) => {
                    let mut tasks = Tasks::default();
                    let out = spawn_dealer(
                        s,
                        "broadcast",
                        inbound.clone(),
                        |f| LoopEvent::Shell(Channel::Broadcast, f),
                        &mut tasks,
                        &session,
                        None,
                    );
                    let _ = inbound.send(LoopEvent::BroadcastReady(generation, out, tasks)).await;
                }
                Err(e) => warn!(error = %e, "no broadcast scheduler connection; broadcast requests will not reach this engine"),
            }
        });
    }
    Ok(sockets)
}

/// Start the receive and send tasks of a connected DEALER (kept in `tasks`); received messages
/// are wrapped by `wrap` and sent to the engine loop, those of a [`batch`] one by one in order.
/// With `batches` set (the controller reads them), the messages queued for sending when the
/// send task wakes go out together as batches.
pub fn spawn_dealer(
    sock: DealerSocket,
    name: &'static str,
    inbound: mpsc::Sender<LoopEvent>,
    wrap: fn(Frames) -> LoopEvent,
    tasks: &mut Tasks,
    session: &Session,
    batches: Option<Arc<AtomicBool>>,
) -> Outlet {
    let (mut tx_half, mut rx_half) = sock.split();
    let (out, mut rx) = mpsc::channel::<Frames>(OUTLET_CAPACITY);
    let reader = session.clone();
    tasks.spawn(async move {
        loop {
            match rx_half.recv().await {
                Ok(m) => {
                    let frames = m.into_vec();
                    let messages = if batch::is_batch(&frames) {
                        match batch::decode(&reader, frames) {
                            Ok(inner) => inner,
                            Err(e) => {
                                warn!(socket = name, error = %e, "refused a malformed batch from the controller");
                                continue;
                            }
                        }
                    } else {
                        vec![frames]
                    };
                    for frames in messages {
                        if inbound.send(wrap(frames)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    debug!(socket = name, error = %e, "receive error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let session = session.clone();
    tasks.spawn(async move {
        while let Some(frames) = rx.recv().await {
            if !batches.as_ref().is_some_and(|b| b.load(Ordering::Relaxed)) {
                send_bounded(&mut tx_half, name, frames).await;
                continue;
            }
            // What is queued now goes together; nothing waits for more.
            let mut batcher = batch::Batcher::default();
            batcher.push(frames);
            for _ in 1..batch::MAX_MESSAGES {
                match rx.try_recv() {
                    Ok(f) if f.is_empty() => {}
                    Ok(f) => batcher.push(f),
                    Err(_) => break,
                }
            }
            for send in batcher.finish() {
                let frames = match send {
                    batch::Send::Single(f) => f,
                    batch::Send::Batch(messages) => batch::encode(&session, vec![], messages),
                };
                send_bounded(&mut tx_half, name, frames).await;
            }
        }
    });
    out
}

async fn send_bounded<S: SocketSend>(s: &mut S, name: &str, frames: Frames) {
    if frames.is_empty() {
        return;
    }
    match tokio::time::timeout(SEND_TIMEOUT, s.send(rpx_guard::zmq::message(frames))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(socket = name, error = %e, "send failed; message dropped"),
        Err(_) => warn!(socket = name, "send timed out; message dropped"),
    }
}

/// A PUB connected to the controller's iopub SUB, with its send task (kept in `tasks`).
pub async fn connect_iopub(url: &str, identity: &str, timeout: Duration, tasks: &mut Tasks) -> Result<Outlet> {
    let mut s = PubSocket::with_options(options(identity, timeout));
    match tokio::time::timeout(timeout + Duration::from_millis(500), s.connect(url)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connect(format!("{url}: {e}"))),
        Err(_) => return Err(Error::Connect(format!("{url}: timed out after {timeout:?}"))),
    }
    let (out, mut rx) = mpsc::channel::<Frames>(OUTLET_CAPACITY);
    tasks.spawn(async move {
        while let Some(frames) = rx.recv().await {
            send_bounded(&mut s, "iopub", frames).await;
        }
    });
    Ok(out)
}

/// The number of heartbeat pings received, shared with the engine loop (see
/// [`crate::link::Link::tick`]).
#[derive(Debug, Clone, Default)]
pub struct Pings(Arc<AtomicU64>);

impl Pings {
    pub fn new() -> Pings {
        Pings::default()
    }
    fn touch(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The heart: a SUB on `hb_ping` echoing each ping on a DEALER (identity = uuid) to `hb_pong`.
pub async fn start_heart(ping_url: &str, pong_url: &str, identity: &str, timeout: Duration, pings: Pings, tasks: &mut Tasks) -> Result<()> {
    let mut sub = SubSocket::with_options(options(identity, timeout));
    sub.subscribe("").await.map_err(|e| Error::Connect(format!("hb_ping subscribe: {e}")))?;
    match tokio::time::timeout(timeout + Duration::from_millis(500), sub.connect(ping_url)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connect(format!("{ping_url}: {e}"))),
        Err(_) => return Err(Error::Connect(format!("{ping_url}: timed out"))),
    }
    let mut pong = connect_dealer(pong_url, identity, timeout).await?;
    // A first beat unasked: the controller schedules an engine once its heart has beaten, and
    // this one beats as soon as it listens, without waiting for the next ping.
    match tokio::time::timeout(timeout, pong.send(ZmqMessage::from("0"))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Connect(format!("{pong_url}: first beat: {e}"))),
        Err(_) => return Err(Error::Connect(format!("{pong_url}: first beat timed out"))),
    }
    tasks.spawn(async move {
        loop {
            match sub.recv().await {
                Ok(m) => {
                    pings.touch();
                    match tokio::time::timeout(Duration::from_secs(1), pong.send(m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(error = %e, "pong send failed"),
                        Err(_) => warn!("pong send timed out"),
                    }
                }
                Err(e) => {
                    debug!(error = %e, "hb_ping receive error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(())
}

/// What a successful [`rejoin`] brings.
#[derive(Debug)]
pub struct Rejoined {
    /// The connection info used (read again from the engine file, if it came from one).
    pub conn: EngineConnection,
    pub session: Session,
    pub registration: Registration,
    /// New sockets, when they were rebuilt.
    pub sockets: Option<Sockets>,
}

/// Where an engine finds its controller.
#[derive(Debug, Clone)]
pub enum ControllerSource {
    /// The engine connection file, read again at each attempt (a restarted controller may
    /// have written new ports or a new key).
    File(PathBuf, EngineConnection),
    /// Given whole (`RPX_CONNECTION_INFO`).
    Given(EngineConnection),
}

impl ControllerSource {
    /// The connection info to use now.
    pub fn current(&self) -> EngineConnection {
        match self {
            ControllerSource::File(path, last) => read_json::<EngineConnection>(path).unwrap_or_else(|e| {
                debug!(file = %path.display(), error = %e, "cannot read the engine connection file; using what was read before");
                last.clone()
            }),
            ControllerSource::Given(c) => c.clone(),
        }
    }
}

/// One attempt to register again after the link was lost: new sockets first when `rebuild`,
/// then a registration asking for `id` over a new registration socket. Every wait is bounded
/// by `limit`. Reported to the engine loop as [`LoopEvent::Rejoined`].
pub async fn rejoin(
    source: ControllerSource,
    username: String,
    uuid: String,
    id: u64,
    rebuild: bool,
    limit: Duration,
    inbound: mpsc::Sender<LoopEvent>,
) {
    let attempt = async {
        let conn = source.current();
        let session = Session::with_id(conn.key.as_bytes(), &username, &uuid);
        let sockets = if rebuild { Some(connect_engine(&conn, &session, &uuid, id, limit, &inbound).await?) } else { None };
        let registration = register(&session, &conn.url(conn.registration), &uuid, Some(id), limit, &inbound).await?;
        if let Some(s) = &sockets {
            s.batches.store(registration.batches, Ordering::Relaxed);
        }
        Ok::<_, Error>(Rejoined { conn, session, registration, sockets })
    };
    let outcome = attempt.await.map_err(|e| e.to_string());
    let _ = inbound.send(LoopEvent::Rejoined(Box::new(outcome))).await;
}

/// Find and greet the compiler: wait (up to `wait`) for its connection file if it comes from
/// one, connect, send `engine_hello` until `engine_hello_reply` arrives. Reports the outcome to
/// the engine loop as [`LoopEvent::CompilerReady`] or [`LoopEvent::CompilerFailed`]; later, a dropped
/// connection as [`LoopEvent::CompilerLost`].
///
/// `history` is what the engine's running worker has run (see [`crate::history`]), empty for a
/// fresh worker.
pub async fn connect_compiler(
    source: CompilerSource,
    uuid: String,
    engine_id: u64,
    username: String,
    wait: Duration,
    history: Vec<HistoryCell>,
    inbound: mpsc::Sender<LoopEvent>,
) {
    let outcome = compiler_handshake(&source, &uuid, engine_id, &username, wait, history, inbound.clone()).await;
    let msg = match outcome {
        Ok(link) => LoopEvent::CompilerReady(Box::new(link)),
        Err(e) => LoopEvent::CompilerFailed(e),
    };
    let _ = inbound.send(msg).await;
}

async fn compiler_handshake(
    source: &CompilerSource,
    uuid: &str,
    engine_id: u64,
    username: &str,
    wait: Duration,
    history: Vec<HistoryCell>,
    inbound: mpsc::Sender<LoopEvent>,
) -> std::result::Result<CompilerLink, String> {
    let deadline = Instant::now() + wait;
    let left = || deadline.saturating_duration_since(Instant::now());
    let conn: CompilerConnection = match source {
        CompilerSource::Given(c) => c.clone(),
        CompilerSource::File(file) => loop {
            match read_json::<CompilerConnection>(file) {
                Ok(c) => break c,
                Err(e) => debug!(error = %e, "no compiler file yet"),
            }
            if left().is_zero() {
                return Err(format!("no compiler announced {} within {wait:?}", source.describe()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        },
    };
    info!(url = %conn.url, "connecting to the compiler");
    let session = Session::with_id(conn.key.as_bytes(), username, uuid);
    let mut sock = connect_dealer(&conn.url, uuid, left().max(Duration::from_millis(100))).await.map_err(|e| e.to_string())?;
    let mut monitor = sock.monitor();
    let (mut tx_half, mut rx_half) = sock.split();
    let hello =
        serde_json::to_value(EngineHello { engine_id, uuid: uuid.to_string(), pid: std::process::id(), hostname: hostname(), history })
            .expect("serializes");
    let reply = loop {
        let (_, frames) = session.msg(&[], msg_type::ENGINE_HELLO, hello.clone(), None, json!({"engine": uuid}), &[]);
        if let Err(e) = tokio::time::timeout(SEND_TIMEOUT, tx_half.send(rpx_guard::zmq::message(frames)))
            .await
            .unwrap_or(Err(zeromq::ZmqError::NoMessage))
        {
            debug!(error = %e, "engine_hello send failed; retrying");
        }
        let until = Instant::now() + Duration::from_secs(2).min(left().max(Duration::from_millis(10)));
        let mut got = None;
        while got.is_none() {
            let Ok(r) = tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx_half.recv()).await else { break };
            let Ok(m) = r else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            match session.decode(m.into_vec()) {
                Ok(msg) if msg.msg_type() == msg_type::ENGINE_HELLO_REPLY => got = Some(msg),
                Ok(msg) => debug!(msg_type = msg.msg_type(), "ignoring compiler message before engine_hello_reply"),
                Err(e) => warn!(error = %e, "bad message from the compiler dropped"),
            }
        }
        if let Some(m) = got {
            break m;
        }
        if left().is_zero() {
            return Err(format!("the compiler at {} did not answer engine_hello within {wait:?}", conn.url));
        }
    };
    let hello: EngineHelloReply = serde_json::from_value(reply.content)
        .map_err(|e| format!("the compiler at {} sent a malformed engine_hello_reply ({e}); is it the same rpx version?", conn.url))?;
    static LINKS: AtomicU64 = AtomicU64::new(1);
    let id = LINKS.fetch_add(1, Ordering::Relaxed);
    // The connection's end is the compiler's end: a killed compiler's socket closes at once.
    let lost = inbound.clone();
    let watch = tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(ev) = monitor.next().await {
            if matches!(ev, zeromq::SocketEvent::Disconnected(_)) {
                let _ = lost.send(LoopEvent::CompilerLost(id)).await;
                break;
            }
        }
    });
    // Hand the socket over to the pump tasks.
    let (out, mut rx) = mpsc::channel::<Frames>(OUTLET_CAPACITY);
    let reader = tokio::spawn(async move {
        loop {
            match rx_half.recv().await {
                Ok(m) => {
                    if inbound.send(LoopEvent::Compiler(m.into_vec())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "compiler receive error");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(frames) = rx.recv().await {
            send_bounded(&mut tx_half, "compiler", frames).await;
        }
    });
    Ok(CompilerLink { id, url: conn.url, out, session, hello, readers: vec![watch.abort_handle(), reader.abort_handle()] })
}
