//! The TCP side of a guarded socket: the listener peers connect to, the private Unix socket the
//! zeromq socket is bound on, and one relay per peer that passes inbound bytes through
//! [`FrameCheck`] and outbound bytes unchanged, and the identities of each listener's live
//! connections (`Holders`), checked against the listener's [`Takeover`] policy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};
use zeromq::{Endpoint, Socket};

use crate::zmtp::{FrameCheck, Step, Violation};
use crate::{Error, Limits, Options, Takeover};

/// Bytes relayed at a time, each way (large messages cross in few, large copies).
const READ_CHUNK: usize = 64 * 1024;
/// Refusals logged in full; after that, one line per thousand.
const LOGGED_REFUSALS: u64 = 100;
/// How long a connection presenting a held identity waits for the holder to go before it is
/// refused: a peer that reconnects often does so before its old connection's end has been read
/// here (a process that was stopped, then resumed, reads both at once).
const HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

static REFUSALS: AtomicU64 = AtomicU64::new(0);

/// The process's receive budget for large frames, in KiB, shared by every guarded socket (sized
/// by the first bind's [`Limits::budget`]).
fn budget(limits: &Limits) -> Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    BUDGET
        .get_or_init(|| {
            Arc::new(Semaphore::new(usize::try_from(limits.budget / 1024).unwrap_or(Semaphore::MAX_PERMITS).min(Semaphore::MAX_PERMITS)))
        })
        .clone()
}

/// Why a peer's connection was closed by the guard.
#[derive(Debug)]
enum Refused {
    Violation(Violation),
    Handshake,
    Stalled,
    Budget,
    /// A live connection holds the identity this one presented.
    IdentityHeld(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Violation(v) => v.fmt(f),
            Refused::Handshake => f.write_str("no ZMTP handshake in time"),
            Refused::Stalled => f.write_str("stalled in the middle of a large frame"),
            Refused::Budget => f.write_str("the receive budget for large frames stayed exhausted"),
            Refused::IdentityHeld(id) => write!(f, "identity {id:?} is held by a live connection and may not be taken over"),
        }
    }
}

fn split_tcp(endpoint: &str) -> Result<(&str, u16), Error> {
    let bad = || Error::Endpoint(endpoint.to_string());
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host, port.parse().map_err(|_| bad())?))
}

/// The identities of one listener's live connections, each with the token of the connection
/// holding it.
struct Holders {
    live: Mutex<HashMap<Vec<u8>, u64>>,
    next: AtomicU64,
    takeover: Takeover,
    /// Notified whenever a connection lets its identity go.
    released: Notify,
}

/// A connection's hold on its identity, released when dropped (unless taken over since).
struct Claim {
    holders: Arc<Holders>,
    identity: Vec<u8>,
    token: u64,
}

impl Holders {
    fn new(takeover: Takeover) -> Arc<Holders> {
        Arc::new(Holders { live: Mutex::new(HashMap::new()), next: AtomicU64::new(0), takeover, released: Notify::new() })
    }

    /// Hold `identity` for a new connection, unless a live connection holds it and the policy
    /// does not let it be taken over: then wait up to [`HOLDER_GRACE`] for the holder to go.
    async fn claim(self: &Arc<Self>, identity: &[u8], peer: SocketAddr) -> Result<Claim, Refused> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + HOLDER_GRACE;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
                let held = live.contains_key(identity);
                if !held || (self.takeover)(identity) {
                    if held {
                        info!(%peer, identity = %String::from_utf8_lossy(identity), "guard: a new connection takes over the identity of a live one, as the policy allows");
                    }
                    live.insert(identity.to_vec(), token);
                    return Ok(Claim { holders: self.clone(), identity: identity.to_vec(), token });
                }
            }
            if timeout_at(until, released).await.is_err() {
                return Err(Refused::IdentityHeld(String::from_utf8_lossy(identity).into_owned()));
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut live = self.holders.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.identity) == Some(&self.token) {
            live.remove(&self.identity);
            self.holders.released.notify_waiters();
        }
    }
}

/// [`crate::bind`] with explicit limits.
pub async fn bind_with<S: Socket>(socket: &mut S, endpoint: &str, limits: Limits) -> Result<Endpoint, Error> {
    bind_options(socket, endpoint, Options::new(limits)).await
}

/// [`crate::bind`] with explicit limits and takeover policy.
pub async fn bind_options<S: Socket>(socket: &mut S, endpoint: &str, options: Options) -> Result<Endpoint, Error> {
    let Options { limits, takeover } = options;
    let (host, port) = split_tcp(endpoint)?;
    let host = if host == "*" { "0.0.0.0" } else { host };
    let listener = match port {
        0 => listen_outside_ephemeral(host).await,
        port => listen(host, port).await,
    };
    let listener = listener.map_err(|source| Error::Listen { addr: endpoint.to_string(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Listen { addr: endpoint.to_string(), source })?;
    let dir = tempfile::Builder::new().prefix(&format!("rpx-guard-{}-", std::process::id())).tempdir().map_err(Error::Private)?;
    if let Some(parent) = dir.path().parent() {
        sweep_stale(parent);
    }
    let path = dir.path().join("zmq");
    let unix = std::os::unix::net::UnixListener::bind(&path).map_err(Error::Private)?;
    socket.bind_listener(unix).await?;
    let public = format!("tcp://{host}:{}", local.port()).parse::<Endpoint>().map_err(|_| Error::Endpoint(endpoint.to_string()))?;
    let budget = budget(&limits);
    tokio::spawn(accept(listener, dir, path, limits, budget, Holders::new(takeover)));
    Ok(public)
}

/// The kernel's range of ephemeral (outgoing) ports.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Connections a listener holds waiting for `accept` (the kernel caps it at
/// `net.core.somaxconn`). Tokio's default of 1024 overflowed when a thousand engines connected
/// their five sockets at once: each connection whose handshake found the queue full was
/// retried by its peer's kernel one second later (SYN retransmission), which put seconds on
/// registration at scale.
pub const LISTEN_BACKLOG: u32 = 8192;

/// A TCP listener on `host:port` (as `TcpListener::bind`, `SO_REUSEADDR` set) with a queue of
/// [`LISTEN_BACKLOG`] connections.
async fn listen(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("{host}: no address to listen on"))))
}

/// A free port that no outgoing connection can take: outside the ephemeral range, so a
/// process restarted on the same port (a compiler, `ipcontroller --reuse`) finds it free
/// instead of held by some connection's source port (even an engine's own reconnect attempt,
/// which can connect to itself). Falls back to any port.
async fn listen_outside_ephemeral(host: &str) -> std::io::Result<TcpListener> {
    let (low, high) = ephemeral_range();
    let mut candidates: Vec<u16> = (10000..low.max(10000)).chain(high.saturating_add(1).max(10000)..=65535).collect();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as usize)
        ^ std::process::id() as usize;
    for i in 0..candidates.len().min(64) {
        let pick = (seed.wrapping_mul(2654435761).wrapping_add(i * 7919)) % candidates.len();
        let port = candidates.swap_remove(pick);
        if let Ok(l) = listen(host, port).await {
            return Ok(l);
        }
    }
    listen(host, 0).await
}

/// Remove the private directories of guards whose process is gone (killed before cleanup).
fn sweep_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("rpx-guard-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Accept peers until the zeromq socket behind the guard is gone. `dir` (the private
/// directory) lives as long as this task.
async fn accept(
    listener: TcpListener,
    dir: tempfile::TempDir,
    path: PathBuf,
    limits: Limits,
    budget: Arc<Semaphore>,
    holders: Arc<Holders>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "guard: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= limits.max_connections {
            log_refusal(peer, &format!("more than {} peers connected", limits.max_connections));
            continue;
        }
        let unix = match UnixStream::connect(&path).await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, path = %path.display(), "guard: the socket behind the guard is gone; no longer listening");
                break;
            }
        };
        active.fetch_add(1, Ordering::Relaxed);
        let (active, budget, holders) = (active.clone(), budget.clone(), holders.clone());
        tokio::spawn(async move {
            relay(tcp, unix, peer, limits, budget, holders).await;
            active.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(dir);
}

fn log_refusal(peer: SocketAddr, why: &str) {
    let n = REFUSALS.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= LOGGED_REFUSALS || n.is_multiple_of(1000) {
        warn!(%peer, refusals = n, "guard: connection closed: {why}");
    }
}

/// Relay one peer until either side closes or the peer breaks the limits.
async fn relay(tcp: TcpStream, unix: UnixStream, peer: SocketAddr, limits: Limits, budget: Arc<Semaphore>, holders: Arc<Holders>) {
    let _ = tcp.set_nodelay(true);
    let (mut from_peer, mut to_peer) = tcp.into_split();
    let (mut from_zmq, mut to_zmq) = unix.into_split();
    let outbound = async {
        while let Some(buf) = read_burst(&mut from_zmq, None).await {
            if to_peer.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = to_peer.shutdown().await;
    };
    tokio::select! {
        r = inbound(&mut from_peer, &mut to_zmq, peer, limits, budget, &holders) => if let Err(why) = r {
            log_refusal(peer, &why.to_string());
        },
        () = outbound => {}
    }
}

/// Wait until `from` is readable (at most until `deadline`), then read what is there in
/// chunks of up to [`READ_CHUNK`] until it would block. Buffers exist only while bytes flow, so
/// an idle peer costs no buffer. `None` at end of stream or on an error; `Some(empty)` when the
/// deadline passed.
async fn read_burst<R: Readable>(from: &mut R, deadline: Option<Instant>) -> Option<Vec<u8>> {
    let ready = from.ready();
    let ready = match deadline {
        Some(d) => match timeout_at(d, ready).await {
            Ok(r) => r,
            Err(_) => return Some(Vec::new()),
        },
        None => ready.await,
    };
    ready.ok()?;
    // Not zeroed: reads fill the spare capacity (zeroing 64 KiB for every small message was a
    // visible share of the controller's CPU under many small tasks).
    let mut buf = Vec::with_capacity(READ_CHUNK);
    while buf.len() < READ_CHUNK {
        match from.try_read_into(&mut buf) {
            Ok(0) if buf.is_empty() => return None,
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) if !buf.is_empty() => break,
            Err(_) => return None,
        }
    }
    // Empty: a spurious wake-up, nothing to read yet.
    Some(buf)
}

/// The read halves the relay reads from.
trait Readable {
    async fn ready(&self) -> std::io::Result<()>;
    /// Read into `buf`'s spare capacity (up to its capacity), appending.
    fn try_read_into(&self, buf: &mut Vec<u8>) -> std::io::Result<usize>;
}

impl Readable for OwnedReadHalf {
    async fn ready(&self) -> std::io::Result<()> {
        self.readable().await
    }
    fn try_read_into(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        self.try_read_buf(buf)
    }
}

impl Readable for tokio::net::unix::OwnedReadHalf {
    async fn ready(&self) -> std::io::Result<()> {
        self.readable().await
    }
    fn try_read_into(&self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        self.try_read_buf(buf)
    }
}

/// Pass the peer's bytes to zeromq as the check allows. `Ok` when either side closed. The
/// connection holds the identity its READY command presents until this returns (or is
/// dropped).
async fn inbound(
    from_peer: &mut OwnedReadHalf,
    to_zmq: &mut OwnedWriteHalf,
    peer: SocketAddr,
    limits: Limits,
    budget: Arc<Semaphore>,
    holders: &Arc<Holders>,
) -> Result<(), Refused> {
    let mut check = FrameCheck::new(limits);
    // `None` until the READY command has been seen whole; then the claim, if the identity is
    // not empty.
    let mut claim: Option<Option<Claim>> = None;
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let handshake_by = Instant::now() + limits.handshake_timeout;
    loop {
        let deadline = if !check.handshaken() {
            Some(handshake_by)
        } else if check.holds_reservation() {
            Some(Instant::now() + limits.stall_timeout)
        } else {
            None
        };
        let Some(buf) = read_burst(from_peer, deadline).await else { return Ok(()) };
        if buf.is_empty() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(if check.handshaken() { Refused::Stalled } else { Refused::Handshake });
            }
            continue;
        }
        let n = buf.len();
        let mut at = 0;
        while at < n {
            let step = check.step(&buf[at..n]).map_err(Refused::Violation)?;
            if claim.is_none() {
                // The bytes just checked end the READY command: decide on its identity before
                // passing them on.
                if let Some(identity) = check.identity() {
                    claim = Some(if identity.is_empty() { None } else { Some(holders.claim(identity, peer).await?) });
                }
            }
            let forward = match step {
                Step::Forward(k) => k,
                Step::Reserve { forward, len } => {
                    drop(permit.take());
                    let units = u32::try_from(len.div_ceil(1024)).map_err(|_| Refused::Budget)?;
                    let acquire = budget.clone().acquire_many_owned(units);
                    permit = Some(timeout(limits.stall_timeout, acquire).await.map_err(|_| Refused::Budget)?.map_err(|_| Refused::Budget)?);
                    forward
                }
            };
            if to_zmq.write_all(&buf[at..at + forward]).await.is_err() {
                return Ok(());
            }
            at += forward;
            if !check.holds_reservation() {
                permit = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn any_port_is_taken_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        for _ in 0..5 {
            let l = listen_outside_ephemeral("127.0.0.1").await.unwrap();
            let port = l.local_addr().unwrap().port();
            assert!(!(low..=high).contains(&port), "port {port} is in the ephemeral range {low}-{high}");
        }
    }

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(split_tcp("tcp://127.0.0.1:0").unwrap(), ("127.0.0.1", 0));
        assert_eq!(split_tcp("tcp://*:5555").unwrap(), ("*", 5555));
        assert_eq!(split_tcp("tcp://[::1]:80").unwrap(), ("::1", 80));
        assert!(split_tcp("ipc:///tmp/x").is_err());
        assert!(split_tcp("tcp://host").is_err());
        assert!(split_tcp("tcp://host:99999").is_err());
    }
}
