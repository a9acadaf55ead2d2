//! The tokio layer: binds every socket, writes the connection files, and runs
//! - one reader task per socket (engine- and client-facing ROUTERs are split and always polled,
//!   so a dead peer is noticed at once), which verifies and parses frames into [`HubEvent`]s;
//! - one monitor task per ROUTER, turning `Accepted`/`Disconnected` into peer events;
//! - the iopub forwarder (SUB -> PUB, signature checked, frames unchanged), which never touches
//!   the hub;
//! - the hub task, which owns the [`Hub`] and a [`NetComm`] with one bounded writer task per
//!   peer, so every send is bounded and a stuck engine only blocks its own writer. Its clock
//!   comes before other events, and heartbeat pongs have their own queue drained before every
//!   liveness check, so a flood of requests can neither stop pings nor evict a live engine.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use zeromq::{
    Endpoint, PubSocket, RouterSendHalf, RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use rpx_guard::{never_take_over, Takeover};
use rpx_protocol::connection::write_private_json;
use rpx_protocol::{batch, ClientConnection, EngineConnection, Session};

use crate::config::Config;
use crate::hub::{Comm, Hub, HubConfig, HubEvent, Sock};
use crate::state::{AliveEngines, Engines};
use crate::store::{self, DbKind};
use crate::wire::{self, Chan};
use crate::{Error, Result};

/// Messages queued per peer before the peer counts as stuck.
pub const PEER_QUEUE: usize = 8192;
/// Longest a single send may take before the peer counts as stuck.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Events queued from readers to the hub.
const INBOUND_QUEUE: usize = 65536;
/// Heartbeat pongs queued for the hub, on their own channel: they are drained before every
/// liveness check, however many other events wait.
const PONG_QUEUE: usize = 65536;
/// Events (or pongs) the hub handles in one turn once it wakes: what is ready is drained, then
/// the loop looks at its clock again.
const BATCH: usize = 1024;

/// Raise this process's soft limit on open files to its hard limit: every engine holds several
/// connections to the controller (and the guard relays each through a socket pair), so a
/// thousand engines need far more than the usual soft limit of 1024. Returns the limit now in
/// force and the one before, or the error of `setrlimit`.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write to / read from a valid rlimit of this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((lim.rlim_cur, before))
    }
}

/// What a running controller tells its starter: the contents of its connection files.
#[derive(Debug, Clone)]
pub struct Ready {
    pub client: ClientConnection,
    pub engine: EngineConnection,
}

/// Run the controller until `shutdown` completes or a client sends a hub `shutdown_request`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_with_ready(config, shutdown, None).await
}

fn port_of(ep: &Endpoint) -> u16 {
    match ep {
        Endpoint::Tcp(_, port) => *port,
        _ => 0,
    }
}

fn router(identity: Option<&'static [u8]>) -> RouterSocket {
    let mut opts = SocketOptions::default();
    if let Some(id) = identity {
        opts.peer_identity(id.try_into().expect("short identity"));
    }
    RouterSocket::with_options(opts)
}

/// How long a `--reuse` controller retries binding a port of its connection files. The port
/// was an ephemeral one, so while the controller was down an outgoing connection (an engine
/// trying to reconnect, say) may briefly hold it as its local port.
const REUSE_BIND_RETRY: Duration = Duration::from_secs(10);

/// Bind `s` on `ip:port` (0: any free port) behind the guard, with `takeover` deciding whether
/// a new connection may take over the identity of a live one; returns the port. A given port is
/// retried for [`REUSE_BIND_RETRY`].
async fn bind<S: Socket>(s: &mut S, ip: &str, port: u16, what: &'static str, takeover: &Takeover) -> Result<u16> {
    let addr = format!("tcp://{ip}:{port}");
    let deadline = Instant::now() + if port == 0 { Duration::ZERO } else { REUSE_BIND_RETRY };
    loop {
        match rpx_guard::bind_with_takeover(s, &addr, takeover.clone()).await {
            Ok(ep) => return Ok(port_of(&ep)),
            Err(source) if Instant::now() >= deadline => return Err(Error::Bind { what, addr, source }),
            Err(e) => {
                warn!(what, %addr, error = %e, "cannot bind the port of the connection file yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Like [`run`], and sends the connection info on `ready` once every socket is bound.
pub async fn run_with_ready(config: Config, shutdown: impl Future<Output = ()>, ready: Option<oneshot::Sender<Ready>>) -> Result<()> {
    // The task database first: a damaged or unwritable file stops the controller before it
    // binds anything or writes connection files.
    let store = match config.db {
        DbKind::Sqlite => Some(store::spawn(&config.profile, config.restore)?),
        DbKind::Memory => None,
    };
    let session = Session::new(config.key.as_bytes(), "rpx-controller");
    let (tx, rx) = mpsc::channel::<HubEvent>(INBOUND_QUEUE);
    let (pong_tx, pong_rx) = mpsc::channel::<HubEvent>(PONG_QUEUE);
    let mut tasks = JoinSet::new();
    let alive = AliveEngines::default();
    let bound = bind_sockets(&config, &session, &alive, &tx, pong_tx, &mut tasks).await?;
    let (client, engine) = connection_info(&config, &bound);
    if config.write_files {
        config.profile.create_dirs()?;
        write_private_json(&config.profile.client_file(), &client)?;
        write_private_json(&config.profile.engine_file(), &engine)?;
        info!(client = %config.profile.client_file().display(), engine = %config.profile.engine_file().display(), "wrote connection files");
    }
    let Bound { senders, client_ports, engine_ports, registration, hb_ping, hb_ping_port, hb_pong_port, notification, .. } = bound;
    info!(?client_ports, ?engine_ports, registration, hb_ping = hb_ping_port, hb_pong = hb_pong_port, "controller listening");
    let mut comm = NetComm {
        routers: senders,
        writers: HashMap::new(),
        pubs: HashMap::new(),
        failures: Vec::new(),
        tx: tx.clone(),
        batching: HashMap::new(),
        session: session.clone(),
    };
    let hub = new_hub(&config, session, &engine, alive, store.is_some());
    comm.pubs.insert(Sock::Notification, spawn_pub(notification));
    comm.pubs.insert(Sock::HbPing, spawn_pub(hb_ping));
    drop(tx);
    if let Some(r) = ready {
        let _ = r.send(Ready { client, engine });
    }
    let store = hub_loop(hub, comm, Queues { rx, pong_rx }, store, config.ping, shutdown).await;
    finish(&config, store, tasks).await;
    Ok(())
}

/// The bound sockets (their send halves and ports) that the connection files and the hub need.
struct Bound {
    senders: HashMap<Sock, RouterSendHalf>,
    client_ports: HashMap<Chan, u16>,
    engine_ports: HashMap<Chan, u16>,
    registration: u16,
    hb_ping: PubSocket,
    hb_ping_port: u16,
    hb_pong_port: u16,
    notification: PubSocket,
    notification_port: u16,
    iopub_engine_port: u16,
    iopub_client_port: u16,
}

/// Bind every socket (with `--reuse`, on the ports of the existing connection files) and spawn
/// its reader and monitor tasks, and the iopub forwarder.
async fn bind_sockets(
    config: &Config,
    session: &Session,
    alive: &AliveEngines,
    tx: &mpsc::Sender<HubEvent>,
    pong_tx: mpsc::Sender<HubEvent>,
    tasks: &mut JoinSet<()>,
) -> Result<Bound> {
    let ip = &config.bind_ip;
    let reused = config.reuse.as_ref();
    if let Some(r) = reused {
        info!(registration = r.client.registration, "--reuse: binding the ports of the existing connection files");
    }
    // An identity held by a live connection is never taken over on the client-facing sockets
    // and the registration socket (rpx engines register from a socket without a fixed
    // identity; ipyparallel engines do not reconnect); on the sockets engines connect to with
    // their uuid as identity, only once the hub no longer considers that engine alive.
    let never = never_take_over();
    let engine_policy: Takeover = {
        let alive = alive.clone();
        std::sync::Arc::new(move |ident: &[u8]| alive.may_take_over(ident))
    };

    // Registration (shared by clients and engines).
    let mut reg = router(None);
    let registration = bind(&mut reg, ip, reused.map_or(0, |r| r.client.registration), "registration", &never).await?;
    let reg_mon = reg.monitor();
    let (reg_send, reg_recv) = reg.split();
    spawn_monitor(tasks, Sock::Query, reg_mon, tx.clone());
    spawn_reader(tasks, Sock::Query, reg_recv, session.clone(), tx.clone());
    let mut senders: HashMap<Sock, RouterSendHalf> = HashMap::new();
    senders.insert(Sock::Query, reg_send);
    let (client_ports, engine_ports) = bind_channels(config, session, &engine_policy, tx, tasks, &mut senders).await?;

    // Heartbeat.
    let mut hb_ping = PubSocket::new();
    let hb_ping_port = bind(&mut hb_ping, ip, reused.map_or(0, |r| r.engine.hb_ping), "hb_ping", &engine_policy).await?;
    let mut hb_pong = router(None);
    let hb_pong_port = bind(&mut hb_pong, ip, reused.map_or(0, |r| r.engine.hb_pong), "hb_pong", &engine_policy).await?;
    let mon = hb_pong.monitor();
    let (send, recv) = hb_pong.split();
    spawn_monitor(tasks, Sock::HbPong, mon, tx.clone());
    spawn_reader(tasks, Sock::HbPong, recv, session.clone(), pong_tx);
    drop(send);

    // Notification.
    let mut notification = PubSocket::new();
    let notification_port = bind(&mut notification, ip, reused.map_or(0, |r| r.client.notification), "notification", &never).await?;

    // IOPub: engines' PUB/XPUB -> our SUB -> our PUB -> clients' SUB.
    let mut iopub_in = SubSocket::new();
    let iopub_engine_port = bind(&mut iopub_in, ip, reused.map_or(0, |r| r.engine.iopub), "iopub (engines)", &engine_policy).await?;
    iopub_in.subscribe("").await.map_err(|source| Error::Bind { what: "iopub subscribe", addr: ip.clone(), source: source.into() })?;
    let mut iopub_out = PubSocket::new();
    let iopub_client_port = bind(&mut iopub_out, ip, reused.map_or(0, |r| r.client.iopub), "iopub (clients)", &never).await?;
    tasks.spawn(iopub_forwarder(iopub_in, iopub_out, session.clone(), tx.clone()));
    Ok(Bound {
        senders,
        client_ports,
        engine_ports,
        registration,
        hb_ping,
        hb_ping_port,
        hb_pong_port,
        notification,
        notification_port,
        iopub_engine_port,
        iopub_client_port,
    })
}

/// Bind the client-facing and engine-facing ROUTER pair of every channel; returns their ports.
async fn bind_channels(
    config: &Config,
    session: &Session,
    engine_policy: &Takeover,
    tx: &mpsc::Sender<HubEvent>,
    tasks: &mut JoinSet<()>,
    senders: &mut HashMap<Sock, RouterSendHalf>,
) -> Result<(HashMap<Chan, u16>, HashMap<Chan, u16>)> {
    // `--reuse`: every socket on the port its connection file names (0: any free port).
    let reused = config.reuse.as_ref();
    let client_port = |chan: Chan| {
        reused.map_or(0, |r| match chan {
            Chan::Mux => r.client.mux,
            Chan::Task => r.client.task,
            Chan::Control => r.client.control,
            Chan::Bcast => r.client.broadcast,
        })
    };
    let engine_port = |chan: Chan| {
        reused.map_or(0, |r| match chan {
            Chan::Mux => r.engine.mux,
            Chan::Task => r.engine.task,
            Chan::Control => r.engine.control,
            Chan::Bcast => r.engine.broadcast[0],
        })
    };
    let never = never_take_over();
    let mut client_ports = HashMap::new();
    let mut engine_ports = HashMap::new();
    for chan in Chan::ALL {
        for (side, ports) in [(Sock::Client(chan), &mut client_ports), (Sock::Engine(chan), &mut engine_ports)] {
            let (ident, want, policy) = match side {
                Sock::Client(c) => (c.client_side_identity(), client_port(c), &never),
                _ => (chan.engine_side_identity(), engine_port(chan), engine_policy),
            };
            let mut s = router(Some(ident));
            let port = bind(&mut s, &config.bind_ip, want, chan.name(), policy).await?;
            ports.insert(chan, port);
            let mon = s.monitor();
            let (send, recv) = s.split();
            spawn_monitor(tasks, side, mon, tx.clone());
            spawn_reader(tasks, side, recv, session.clone(), tx.clone());
            senders.insert(side, send);
        }
    }
    Ok((client_ports, engine_ports))
}

/// The connection files' contents for the bound ports.
fn connection_info(config: &Config, b: &Bound) -> (ClientConnection, EngineConnection) {
    let interface = format!("tcp://{}", config.public_ip);
    let location = hostname();
    let client = ClientConnection {
        ssh: String::new(),
        interface: interface.clone(),
        registration: b.registration,
        control: b.client_ports[&Chan::Control],
        mux: b.client_ports[&Chan::Mux],
        task: b.client_ports[&Chan::Task],
        task_scheme: config.scheme.name().into(),
        iopub: b.iopub_client_port,
        notification: b.notification_port,
        broadcast: b.client_ports[&Chan::Bcast],
        key: config.key.clone(),
        curve_serverkey: None,
        location: location.clone(),
        pack: "json".into(),
        unpack: "json".into(),
        signature_scheme: "hmac-sha256".into(),
    };
    let engine = EngineConnection {
        ssh: String::new(),
        interface,
        registration: b.registration,
        control: b.engine_ports[&Chan::Control],
        mux: b.engine_ports[&Chan::Mux],
        task: b.engine_ports[&Chan::Task],
        iopub: b.iopub_engine_port,
        hb_ping: b.hb_ping_port,
        hb_pong: b.hb_pong_port,
        broadcast: vec![b.engine_ports[&Chan::Bcast]],
        key: config.key.clone(),
        curve_serverkey: None,
        location,
        pack: "json".into(),
        unpack: "json".into(),
        signature_scheme: "hmac-sha256".into(),
    };
    (client, engine)
}

/// The hub, configured, on the set of alive engines the guard's policy reads.
fn new_hub(config: &Config, session: Session, engine: &EngineConnection, alive: AliveEngines, persist: bool) -> Hub {
    let hub_cfg = HubConfig {
        scheme: config.scheme,
        hwm: config.hwm,
        ping: config.ping,
        record_limit: config.record_limit,
        record_bytes: config.record_bytes,
        queue_limit: config.queue_limit,
        engine_info: serde_json::to_value(engine).expect("serializes"),
    };
    let mut hub = Hub::new(session, hub_cfg, Instant::now());
    // No engine has registered yet: the hub starts on the set the guard's policy reads.
    hub.engines = Engines::with_alive(alive);
    hub.persist = persist;
    if config.reuse.is_some() {
        // Clients and engines of the previous controller reconnect together: registrations
        // complete after one heartbeat period, once the clients' notification subscriptions
        // are back, so no client misses an engine's return.
        hub.hold_registrations(Instant::now() + config.ping);
    }
    hub
}

/// The hub's event queues: everything but pongs, and pongs.
struct Queues {
    rx: mpsc::Receiver<HubEvent>,
    pong_rx: mpsc::Receiver<HubEvent>,
}

/// The hub task: runs until `shutdown`, a hub `shutdown_request`, or every sender is gone;
/// returns the task database handle to close.
async fn hub_loop(
    mut hub: Hub,
    mut comm: NetComm,
    Queues { mut rx, mut pong_rx }: Queues,
    mut store: Option<store::StoreHandle>,
    ping: Duration,
    shutdown: impl Future<Output = ()>,
) -> Option<store::StoreHandle> {
    let mut lookups = FuturesUnordered::<store::Lookup>::new();
    let tick_every = ping.min(Duration::from_millis(100));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // The order below is the priority: the clock comes before the flood of events, so pings
    // go out and liveness is judged every period however busy the hub is, and the pongs that
    // arrived before a check are always counted by it.
    loop {
        let first_ping = hub.first_ping_at();
        tokio::select! {
            biased;
            _ = &mut shutdown => {
                info!("shutting down on signal");
                break;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                while let Ok(ev) = pong_rx.try_recv() {
                    handle_at(&mut hub, &mut comm, ev, now);
                }
                hub.on_tick(&mut comm, now);
            }
            _ = tokio::time::sleep_until(first_ping.unwrap_or_else(Instant::now).into()), if first_ping.is_some() => {
                hub.on_first_ping(&mut comm, Instant::now());
            }
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                handle(&mut hub, &mut comm, ev);
                for _ in 0..BATCH {
                    match rx.try_recv() {
                        Ok(ev) => handle(&mut hub, &mut comm, ev),
                        Err(_) => break,
                    }
                }
            }
            // Pongs in batches: at a thousand engines a period brings a thousand of them, and
            // each wake-up of the hub costs more than handling one.
            Some(ev) = pong_rx.recv() => {
                let now = Instant::now();
                handle_at(&mut hub, &mut comm, ev, now);
                for _ in 0..BATCH {
                    match pong_rx.try_recv() {
                        Ok(ev) => handle_at(&mut hub, &mut comm, ev, now),
                        Err(_) => break,
                    }
                }
            }
            Some((token, answer)) = lookups.next(), if !lookups.is_empty() => handle(&mut hub, &mut comm, HubEvent::Stored { token, answer }),
        }
        if !hub.store_ops.is_empty() {
            match store.as_mut() {
                Some(s) => s.submit(std::mem::take(&mut hub.store_ops), &mut lookups).await,
                None => hub.store_ops.clear(),
            }
        }
        while !comm.failures.is_empty() {
            for ev in std::mem::take(&mut comm.failures) {
                handle(&mut hub, &mut comm, ev);
            }
        }
        if hub.exit_at().is_some_and(|t| Instant::now() >= t) {
            info!("hub shut down by request");
            break;
        }
    }
    store
}

/// Close the task database (waiting for its last writes), stop the socket tasks, and remove
/// the connection files (a `--reuse` controller keeps them, for the next one).
async fn finish(config: &Config, store: Option<store::StoreHandle>, mut tasks: JoinSet<()>) {
    if let Some(s) = store {
        drop(s.tx);
        if tokio::time::timeout(store::SEND_TIMEOUT, s.done).await.is_err() {
            error!(path = %s.path.display(), "the task database writer did not finish in time; the last records may be lost");
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // A `--reuse` controller keeps the files, for the next one started with `--reuse`.
    if config.write_files && config.reuse.is_none() {
        for f in [config.profile.client_file(), config.profile.engine_file()] {
            if let Err(e) = std::fs::remove_file(&f) {
                warn!(file = %f.display(), error = %e, "could not remove connection file");
            }
        }
    }
}

fn handle(hub: &mut Hub, comm: &mut NetComm, ev: HubEvent) {
    handle_at(hub, comm, ev, Instant::now());
}

fn handle_at(hub: &mut Hub, comm: &mut NetComm, ev: HubEvent, now: Instant) {
    if let HubEvent::Peer { sock, ident, connected: false } = &ev {
        comm.writers.remove(&(*sock, ident.clone()));
        if matches!(sock, Sock::Client(_)) {
            comm.batching.remove(&(*sock, ident.clone()));
        }
    }
    hub.on_event(comm, ev, now);
}

fn spawn_monitor(tasks: &mut JoinSet<()>, sock: Sock, mut mon: futures::channel::mpsc::Receiver<SocketEvent>, tx: mpsc::Sender<HubEvent>) {
    tasks.spawn(async move {
        while let Some(ev) = mon.next().await {
            let (ident, connected) = match ev {
                SocketEvent::Accepted(_, id) => (Bytes::from(id), true),
                SocketEvent::Disconnected(id) => (Bytes::from(id), false),
                _ => continue,
            };
            debug!(?sock, ident = %String::from_utf8_lossy(&ident), connected, "peer");
            if tx.send(HubEvent::Peer { sock, ident, connected }).await.is_err() {
                break;
            }
        }
    });
}

fn spawn_reader(tasks: &mut JoinSet<()>, sock: Sock, mut recv: zeromq::RouterRecvHalf, session: Session, tx: mpsc::Sender<HubEvent>) {
    tasks.spawn(async move {
        loop {
            let msg = match recv.recv().await {
                Ok(m) => m,
                Err(e) => {
                    debug!(?sock, error = %e, "recv failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let frames = msg.into_vec();
            let ev = match sock {
                Sock::Query => HubEvent::Query(frames),
                Sock::HbPong => HubEvent::Pong(frames[0].clone()),
                Sock::Client(_) | Sock::Engine(_) => {
                    let messages = unbatch(&session, sock, frames);
                    if let (Sock::Client(_), Some(ident)) = (sock, messages.batched_from) {
                        if tx.send(HubEvent::BatchesFrom { sock, ident }).await.is_err() {
                            return;
                        }
                    }
                    for frames in messages.messages {
                        let ev = match sock {
                            Sock::Client(chan) => match wire::parse_request(&session, chan, frames) {
                                Ok(r) => HubEvent::Request(Box::new(r)),
                                Err(e) => {
                                    warn!(chan = chan.name(), error = %e, "dropped a client message");
                                    continue;
                                }
                            },
                            Sock::Engine(chan) => match wire::parse_reply(&session, chan, frames) {
                                Ok(r) => HubEvent::Reply(Box::new(r)),
                                Err(e) => {
                                    warn!(chan = chan.name(), error = %e, "dropped an engine message");
                                    continue;
                                }
                            },
                            _ => unreachable!("client and engine sockets only"),
                        };
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Sock::Notification | Sock::HbPing => continue,
            };
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    });
}

/// The messages in `frames` from a peer of a ROUTER: the frames themselves, or the messages of
/// an rpx [`batch`] (each behind the peer's identity, as if it had come alone). A malformed
/// batch is refused whole, with the reason in the log.
fn unbatch(session: &Session, sock: Sock, mut frames: Vec<Bytes>) -> Unbatched {
    if !frames.get(1..).is_some_and(batch::is_batch) {
        return Unbatched { messages: vec![frames], batched_from: None };
    }
    let rest = frames.split_off(1);
    let ident = frames.pop().expect("one identity");
    match batch::decode(session, rest) {
        Ok(messages) => Unbatched { messages: messages.into_iter().map(|m| join_ident(&ident, m)).collect(), batched_from: Some(ident) },
        Err(e) => {
            warn!(?sock, peer = %String::from_utf8_lossy(&ident), error = %e, "refused a malformed batch");
            Unbatched { messages: Vec::new(), batched_from: None }
        }
    }
}

/// What [`unbatch`] found in one zeromq message.
struct Unbatched {
    messages: Vec<Vec<Bytes>>,
    /// The peer, when the messages came in a valid batch.
    batched_from: Option<Bytes>,
}

fn join_ident(ident: &Bytes, m: Vec<Bytes>) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(m.len() + 1);
    out.push(ident.clone());
    out.extend(m);
    out
}

/// Which iopub messages become part of a task record.
const RECORDED_IO: [&str; 4] = ["stream", "execute_input", "execute_result", "error"];

/// The parent msg_id, type and content of an iopub message worth recording, from its signed frames.
fn recorded_io(signed: &[Bytes]) -> Option<HubEvent> {
    #[derive(serde::Deserialize)]
    struct Head {
        msg_type: String,
    }
    #[derive(serde::Deserialize)]
    struct Parent {
        msg_id: Option<String>,
    }
    let head: Head = serde_json::from_slice(signed.get(1)?).ok()?;
    if !RECORDED_IO.contains(&head.msg_type.as_str()) {
        return None;
    }
    let parent: Parent = serde_json::from_slice(signed.get(2)?).ok()?;
    let content = serde_json::from_slice(signed.get(4)?).ok()?;
    Some(HubEvent::Io { parent: parent.msg_id?, msg_type: head.msg_type, content })
}

async fn iopub_forwarder(mut sub: SubSocket, mut publ: PubSocket, session: Session, tx: mpsc::Sender<HubEvent>) {
    loop {
        let msg = match sub.recv().await {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "iopub recv failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let frames = msg.into_vec();
        match session.verify_frames(frames.clone()) {
            Ok((_, signed)) => {
                // Records are best effort: never let a busy hub slow the output stream down.
                if let Some(io) = recorded_io(&signed) {
                    let _ = tx.try_send(io);
                }
                if let Err(e) = publ.send(rpx_guard::zmq::message(frames)).await {
                    warn!(error = %e, "iopub publish failed");
                }
            }
            Err(e) => warn!(error = %e, "dropped an iopub message"),
        }
    }
}

fn spawn_pub(mut s: PubSocket) -> mpsc::Sender<ZmqMessage> {
    let (tx, mut rx) = mpsc::channel::<ZmqMessage>(PEER_QUEUE);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match tokio::time::timeout(SEND_TIMEOUT, s.send(m)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "publish failed"),
                Err(_) => warn!("publish timed out"),
            }
        }
    });
    tx
}

/// [`Comm`] over the real sockets: one bounded writer task per (socket, peer). A writer to a
/// peer that reads rpx batches ([`Comm::batches_to`]) sends what is queued when it wakes as
/// batches.
pub struct NetComm {
    routers: HashMap<Sock, RouterSendHalf>,
    writers: HashMap<(Sock, Bytes), mpsc::Sender<Vec<Bytes>>>,
    /// Peers that read batches (shared with their writer tasks).
    batching: HashMap<(Sock, Bytes), Arc<AtomicBool>>,
    /// Signs batches.
    session: Session,
    pubs: HashMap<Sock, mpsc::Sender<ZmqMessage>>,
    /// Send failures noticed while sending, handed back to the hub.
    failures: Vec<HubEvent>,
    tx: mpsc::Sender<HubEvent>,
}

impl NetComm {
    fn writer(&mut self, sock: Sock, ident: Bytes) -> mpsc::Sender<Vec<Bytes>> {
        if let Some(w) = self.writers.get(&(sock, ident.clone())) {
            if !w.is_closed() {
                return w.clone();
            }
        }
        let (wtx, mut wrx) = mpsc::channel::<Vec<Bytes>>(PEER_QUEUE);
        let mut half = self.routers.get(&sock).expect("router socket").clone();
        let report = self.tx.clone();
        let id = ident.clone();
        let batching = self.batching.entry((sock, ident.clone())).or_default().clone();
        let session = self.session.clone();
        tokio::spawn(async move {
            while let Some(frames) = wrx.recv().await {
                let sends = if batching.load(Ordering::Relaxed) {
                    // What is queued now goes together; nothing waits for more.
                    let mut batcher = batch::Batcher::default();
                    batcher.push(frames[1..].to_vec());
                    for _ in 1..batch::MAX_MESSAGES {
                        match wrx.try_recv() {
                            Ok(f) => batcher.push(f[1..].to_vec()),
                            Err(_) => break,
                        }
                    }
                    batcher
                        .finish()
                        .into_iter()
                        .map(|send| match send {
                            batch::Send::Single(m) => join_ident(&id, m),
                            batch::Send::Batch(messages) => batch::encode(&session, vec![id.clone()], messages),
                        })
                        .collect()
                } else {
                    vec![frames]
                };
                for frames in sends {
                    let reason = match tokio::time::timeout(SEND_TIMEOUT, half.send(rpx_guard::zmq::message(frames))).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("send blocked for {SEND_TIMEOUT:?}"),
                    };
                    let _ = report.try_send(HubEvent::SendFailed { sock, ident: id.clone(), reason });
                    return;
                }
            }
        });
        self.writers.insert((sock, ident), wtx.clone());
        wtx
    }
}

impl Comm for NetComm {
    fn send(&mut self, sock: Sock, frames: Vec<Bytes>) {
        if let Some(p) = self.pubs.get(&sock) {
            if p.try_send(rpx_guard::zmq::message(frames)).is_err() {
                warn!(?sock, "publish queue full; message dropped");
            }
            return;
        }
        if !self.routers.contains_key(&sock) || frames.len() < 2 {
            error!(?sock, "no socket to send on");
            return;
        }
        let ident = frames[0].clone();
        let w = self.writer(sock, ident.clone());
        match w.try_send(frames) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.writers.remove(&(sock, ident.clone()));
                self.failures.push(HubEvent::SendFailed { sock, ident, reason: format!("{PEER_QUEUE} messages queued: peer stuck") });
            }
            Err(mpsc::error::TrySendError::Closed(m)) => {
                self.writers.remove(&(sock, ident.clone()));
                let w = self.writer(sock, ident);
                let _ = w.try_send(m);
            }
        }
    }

    fn batches_to(&mut self, sock: Sock, ident: Bytes) {
        self.batching.entry((sock, ident)).or_default().store(true, Ordering::Relaxed);
    }
}
