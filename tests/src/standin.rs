//! Stand-in engines: many lightweight engines in one process, for registration at scale.
//!
//! A stand-in engine speaks the real engine side of ipyparallel 9's registration and heartbeat
//! protocol, and nothing else: it sends a signed `registration_request {uuid}` on its own
//! DEALER to the controller's registration socket (resent with jittered, doubling waits while
//! no reply comes, within a bounded total), and once `registration_reply` says ok it connects
//! its shell DEALERs to `mux` and `task` and its heart (a SUB on `hb_ping`, a DEALER whose
//! identity is its uuid on `hb_pong`) and echoes every ping, as ipyparallel's `Heart` does. It
//! runs no code. Every stand-in has its own sockets and identity; one process hosts hundreds or
//! thousands of them, which makes 1,000 engines feasible on 2 cores. Because only the wire
//! protocol is used, the same stand-ins register against rpx's `ipcontroller` and against
//! ipyparallel's.
//!
//! [`Observer`] is the client's view: it subscribes to the controller's `notification` socket
//! before the stand-ins start and counts their `registration_notification`s (and any
//! `unregistration_notification`), and asks `connection_request` for the hub's engine list.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use rpx_protocol::Session;

/// Where a controller listens, read from a connection file of rpx or of ipyparallel 9 (only the
/// keys both write are read).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub interface: String,
    pub key: String,
    pub ports: HashMap<String, u16>,
}

impl Endpoints {
    /// Read an engine or client connection file.
    pub fn read(path: &Path) -> anyhow::Result<Endpoints> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let interface = v["interface"].as_str().ok_or_else(|| anyhow!("{}: no interface", path.display()))?.to_string();
        let key = v["key"].as_str().unwrap_or_default().to_string();
        let mut ports = HashMap::new();
        if let Value::Object(m) = &v {
            for (k, p) in m {
                if let Some(p) = p.as_u64() {
                    ports.insert(k.clone(), p as u16);
                }
            }
        }
        Ok(Endpoints { interface, key, ports })
    }

    /// `tcp://<interface>:<port of name>`.
    pub fn url(&self, name: &str) -> anyhow::Result<String> {
        let port = self.ports.get(name).ok_or_else(|| anyhow!("no {name} port in the connection file"))?;
        Ok(format!("{}:{port}", self.interface))
    }
}

/// How stand-ins register.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for one registration, all resends included.
    pub register_within: Duration,
    /// First wait for a reply before the request is sent again (doubles, with jitter).
    pub first_resend: Duration,
    /// Longest single socket operation (connect, send).
    pub socket_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options { register_within: Duration::from_secs(60), first_resend: Duration::from_secs(5), socket_timeout: Duration::from_secs(30) }
    }
}

/// Counters shared by all stand-ins of a process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Registration replies with status ok.
    pub replies: AtomicU64,
    /// Registrations that failed (error reply, timeout, socket error).
    pub failures: AtomicU64,
    /// Registration requests sent again after a wait.
    pub resends: AtomicU64,
    /// Pings received and answered, over all stand-ins.
    pub pongs: AtomicU64,
    /// Microseconds from the start to each ok reply.
    pub reply_us: Mutex<Vec<u64>>,
    /// The first failures, for the report.
    pub errors: Mutex<Vec<String>>,
}

/// A registered stand-in: its sockets stay open (and its heart beating) while this lives.
pub struct Standin {
    pub uuid: String,
    pub id: u64,
    heart: tokio::task::JoinHandle<()>,
    _sockets: Vec<DealerSocket>,
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.heart.abort();
    }
}

fn dealer(identity: Option<&str>, timeout: Duration) -> DealerSocket {
    let mut o = SocketOptions::default();
    if let Some(id) = identity {
        o.peer_identity(id.as_bytes().try_into().expect("a uuid is a valid identity"));
    }
    o.connect_timeout(timeout);
    DealerSocket::with_options(o)
}

async fn connect<S: Socket>(s: &mut S, url: &str, timeout: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(timeout + Duration::from_millis(500), s.connect(url)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("connect {url}: {e}"),
        Err(_) => bail!("connect {url}: timed out after {timeout:?}"),
    }
}

/// A pseudo-random factor in [0.5, 1.5) for jitter, from the uuid and the attempt.
fn jitter(uuid: &str, attempt: u32) -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(uuid.as_bytes());
    h.write_u32(attempt);
    0.5 + (h.finish() % 1000) as f64 / 1000.0
}

/// Register one stand-in engine named `uuid` with the controller at `ep` and start its heart.
/// `t0` is the start of the run (reply times are counted from it).
pub async fn register(ep: &Endpoints, uuid: String, opts: &Options, counters: &Arc<Counters>, t0: Instant) -> anyhow::Result<Standin> {
    let session = Session::new(ep.key.as_bytes(), "standin");
    let deadline = Instant::now() + opts.register_within;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut reg = dealer(None, opts.socket_timeout.min(left()));
    connect(&mut reg, &ep.url("registration")?, opts.socket_timeout.min(left())).await?;
    // The same signed request each time: a controller that answers a copy late answers the
    // same msg_id, and a second copy of an accepted request is harmless to wait out.
    let (header, frames) = session.msg(&[], "registration_request", json!({"uuid": uuid}), None, json!({}), &[]);
    let mut wait = opts.first_resend;
    let mut attempt = 0u32;
    let reply = 'outer: loop {
        match tokio::time::timeout(opts.socket_timeout.min(left()), reg.send(rpx_guard::zmq::message(frames.clone()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("sending registration_request: {e}"),
            Err(_) => bail!("sending registration_request timed out"),
        }
        let until = Instant::now() + wait.mul_f64(jitter(&uuid, attempt)).min(left());
        loop {
            let Ok(got) = tokio::time::timeout(until.saturating_duration_since(Instant::now()), reg.recv()).await else { break };
            let m = got.map_err(|e| anyhow!("registration socket: {e}"))?;
            let msg = session.decode(m.into_vec()).map_err(|e| anyhow!("bad registration reply: {e}"))?;
            if msg.msg_type() == "registration_reply" && msg.parent_msg_id().is_none_or(|p| p == header.msg_id) {
                break 'outer msg;
            }
        }
        if left().is_zero() {
            bail!("no registration_reply within {:?} ({} requests sent)", opts.register_within, attempt + 1);
        }
        attempt += 1;
        wait = (wait * 2).min(Duration::from_secs(30));
        counters.resends.fetch_add(1, Ordering::Relaxed);
    };
    if reply.content["status"] != "ok" {
        bail!("registration refused: {}", reply.content);
    }
    let id = reply.content["id"].as_u64().ok_or_else(|| anyhow!("registration_reply without id: {}", reply.content))?;
    counters.replies.fetch_add(1, Ordering::Relaxed);
    counters.reply_us.lock().unwrap().push(t0.elapsed().as_micros() as u64);

    // Shell sockets (an engine is routable once they are connected) and the heart.
    let t = opts.socket_timeout;
    let mut mux = dealer(Some(&uuid), t);
    connect(&mut mux, &ep.url("mux")?, t).await?;
    let mut task = dealer(Some(&uuid), t);
    connect(&mut task, &ep.url("task")?, t).await?;
    let mut sub = SubSocket::new();
    sub.subscribe("").await.map_err(|e| anyhow!("subscribe: {e}"))?;
    connect(&mut sub, &ep.url("hb_ping")?, t).await?;
    let mut pong = dealer(Some(&uuid), t);
    connect(&mut pong, &ep.url("hb_pong")?, t).await?;
    let c = counters.clone();
    let heart = tokio::spawn(async move {
        while let Ok(m) = sub.recv().await {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), pong.send(m)).await {
                c.pongs.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(Standin { uuid, id, heart, _sockets: vec![reg, mux, task] })
}

/// The client's view of a controller: its notifications and its engine list.
pub struct Observer {
    session: Session,
    query: DealerSocket,
    events: tokio::sync::mpsc::UnboundedReceiver<(Instant, String, String)>,
    reader: tokio::task::JoinHandle<()>,
    /// uuid -> time of its `registration_notification`.
    pub registered: HashMap<String, Instant>,
    /// uuids of `unregistration_notification`s.
    pub unregistered: HashSet<String>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Observer {
    /// Connect to the controller of the client connection file `ep` and subscribe to its
    /// notifications.
    pub async fn connect(ep: &Endpoints) -> anyhow::Result<Observer> {
        let session = Session::new(ep.key.as_bytes(), "standin-observer");
        let mut sub = SubSocket::new();
        sub.subscribe("").await.map_err(|e| anyhow!("subscribe: {e}"))?;
        connect(&mut sub, &ep.url("notification")?, Duration::from_secs(10)).await?;
        let mut query = dealer(None, Duration::from_secs(10));
        connect(&mut query, &ep.url("registration")?, Duration::from_secs(10)).await?;
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let s = session.clone();
        let reader = tokio::spawn(async move {
            while let Ok(m) = sub.recv().await {
                let Ok(msg) = s.decode(m.into_vec()) else { continue };
                let uuid = msg.content["uuid"].as_str().unwrap_or_default().to_string();
                if tx.send((Instant::now(), msg.msg_type().to_string(), uuid)).is_err() {
                    break;
                }
            }
        });
        let mut o = Observer { session, query, events, reader, registered: HashMap::new(), unregistered: HashSet::new() };
        // PUB/SUB has no acknowledgement: once the controller answers a query on another
        // connection it is up, and a short pause lets the subscription reach its publisher.
        // (The hub's own list, `engines`, is the authoritative count in any case.)
        o.engines(Duration::from_secs(10)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(o)
    }

    fn drain(&mut self) {
        while let Ok((t, kind, uuid)) = self.events.try_recv() {
            self.note(t, &kind, uuid);
        }
    }

    fn note(&mut self, t: Instant, kind: &str, uuid: String) {
        match kind {
            "registration_notification" => {
                self.registered.entry(uuid).or_insert(t);
            }
            "unregistration_notification" => {
                self.unregistered.insert(uuid);
            }
            _ => {}
        }
    }

    /// Wait until every uuid of `want` has been announced, or until `limit`; returns how many were.
    pub async fn wait_registered(&mut self, want: &HashSet<String>, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            self.drain();
            let n = want.iter().filter(|u| self.registered.contains_key(*u)).count();
            if n == want.len() {
                return n;
            }
            match tokio::time::timeout(end.saturating_duration_since(Instant::now()), self.events.recv()).await {
                Ok(Some((t, kind, uuid))) => self.note(t, &kind, uuid),
                _ => return n,
            }
        }
    }

    /// Notifications received so far are taken into account.
    pub fn refresh(&mut self) {
        self.drain();
    }

    /// The hub's engine list (`connection_request`): id -> uuid.
    pub async fn engines(&mut self, limit: Duration) -> anyhow::Result<HashMap<String, String>> {
        let (header, frames) = self.session.msg(&[], "connection_request", json!({}), None, json!({}), &[]);
        tokio::time::timeout(limit, self.query.send(rpx_guard::zmq::message(frames)))
            .await
            .map_err(|_| anyhow!("connection_request send timed out"))??;
        let end = Instant::now() + limit;
        loop {
            let m: ZmqMessage = tokio::time::timeout(end.saturating_duration_since(Instant::now()), self.query.recv())
                .await
                .map_err(|_| anyhow!("no connection_reply within {limit:?}"))??;
            let msg = self.session.decode(m.into_vec())?;
            if msg.msg_type() == "connection_reply" && msg.parent_msg_id() == Some(header.msg_id.as_str()) {
                let mut out = HashMap::new();
                if let Value::Object(m) = &msg.content["engines"] {
                    for (k, v) in m {
                        out.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                return Ok(out);
            }
        }
    }
}

/// Start `n` stand-ins at once (each its own task); failures are counted in `counters`.
pub fn spawn_many(
    ep: &Endpoints,
    uuids: &[String],
    opts: &Options,
    counters: &Arc<Counters>,
    t0: Instant,
) -> Vec<tokio::task::JoinHandle<Option<Standin>>> {
    uuids
        .iter()
        .map(|u| {
            let (ep, u, opts, c) = (ep.clone(), u.clone(), opts.clone(), counters.clone());
            tokio::spawn(async move {
                match register(&ep, u.clone(), &opts, &c, t0).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        c.failures.fetch_add(1, Ordering::Relaxed);
                        let mut errs = c.errors.lock().unwrap();
                        if errs.len() < 10 {
                            errs.push(format!("{u}: {e:#}"));
                        }
                        None
                    }
                }
            })
        })
        .collect()
}

/// Raise this process's soft open-file limit to its hard limit (each stand-in holds 5 sockets);
/// returns the limit in force.
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid rlimit of this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}
