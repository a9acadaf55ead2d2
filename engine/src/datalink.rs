//! The engine's end of the cross-host data link (`rpx_protocol::datalink`): a TCP listener on
//! the address the engine reaches the controller from, and a thread per connection that writes
//! a pushed value into a transfer file of the namespace or sends a pull's snapshot, off the
//! engine's event loop.
//!
//! What the link did is kept in a ledger the event loop reads: the transfer files it received
//! (with the size and BLAKE3 it computed itself as they were written: adopting one hashes
//! nothing again) and the pull snapshots clients may fetch (each once). Entries nobody claimed
//! within [`UNCLAIMED`] are removed with their files.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rpx_protocol::datalink::{self as link, Ack, LinkOp};
use rpx_protocol::dataplane::{self as dp, ValueFile};
use rpx_protocol::Session;
use tracing::{debug, info, warn};

/// Connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 16;
/// How long a new connection has to send its hello (a connection that says nothing holds one
/// of the [`MAX_CONNECTIONS`] no longer than this).
const HELLO: Duration = Duration::from_secs(5);
/// Longest silence of a client in the middle of a transfer.
const STALL: Duration = Duration::from_secs(30);
/// How long a received file or an offered snapshot waits for its request before it is removed.
pub const UNCLAIMED: Duration = Duration::from_secs(600);

/// Transfer files the link wrote and snapshots it may send, with when.
#[derive(Debug, Default)]
pub struct Ledger {
    received: HashMap<String, (u64, Option<String>, Instant)>,
    offered: HashMap<String, Instant>,
}

impl Ledger {
    /// What this link knows of the transfer file `vf` names: whether it received it whole
    /// with exactly that size and digest (the entry is then used up).
    pub fn take_received(&mut self, vf: &ValueFile) -> Received {
        match self.received.get(&vf.file) {
            None => Received::NotByLink,
            Some((size, digest, _)) if *size == vf.size && digest.is_some() && *digest == vf.blake3 => {
                self.received.remove(&vf.file);
                Received::AsAnnounced
            }
            Some(_) => Received::NotAsAnnounced,
        }
    }

    /// Entries older than `UNCLAIMED` at `now`: their file names (the entries are dropped, as
    /// are those whose file is gone: a snapshot a same-host client read and removed itself).
    fn expired(&mut self, now: Instant, exists: impl Fn(&str) -> bool) -> Vec<String> {
        self.received.retain(|f, _| exists(f));
        self.offered.retain(|f, _| exists(f));
        let old = |t: &Instant| now.saturating_duration_since(*t) >= UNCLAIMED;
        let mut out: Vec<String> = self.received.iter().filter(|(_, (_, _, t))| old(t)).map(|(f, _)| f.clone()).collect();
        out.extend(self.offered.iter().filter(|(_, t)| old(t)).map(|(f, _)| f.clone()));
        self.received.retain(|_, (_, _, t)| !old(t));
        self.offered.retain(|_, t| !old(t));
        out
    }
}

/// What the data link says of a transfer file a push names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The link did not write it (a client on this host did, or nobody).
    NotByLink,
    /// The link wrote it, and hashed it on the way, with the size and digest announced.
    AsAnnounced,
    /// The link wrote it, but the push announces another size or digest (or none).
    NotAsAnnounced,
}

/// The engine's link: where clients reach it, and its ledger.
#[derive(Debug, Clone)]
pub struct DataLink {
    pub address: SocketAddr,
    pub ledger: Arc<Mutex<Ledger>>,
}

static LINK: OnceLock<Option<DataLink>> = OnceLock::new();

/// The link of this process, once [`start`] made one.
pub fn current() -> Option<&'static DataLink> {
    LINK.get().and_then(Option::as_ref)
}

/// `ip:port` to announce in the engine's host identity.
pub fn announced() -> Option<String> {
    current().map(|l| l.address.to_string())
}

/// What the link knows of `vf` (see [`Ledger::take_received`]).
pub fn received(vf: &ValueFile) -> Received {
    match current() {
        Some(l) => l.ledger.lock().unwrap_or_else(|p| p.into_inner()).take_received(vf),
        None => Received::NotByLink,
    }
}

/// Let clients fetch these pull snapshots (once each).
pub fn offer(files: &[ValueFile]) {
    if let Some(l) = current() {
        let now = Instant::now();
        let mut ledger = l.ledger.lock().unwrap_or_else(|p| p.into_inner());
        for f in files {
            ledger.offered.insert(f.file.clone(), now);
        }
    }
}

/// The address this host reaches `controller` (a `tcp://host` interface) from, unless that is
/// loopback (then clients elsewhere could not use it and same-host clients use files).
pub fn local_address_towards(controller: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let host = controller.strip_prefix("tcp://").unwrap_or(controller);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let target = (host, 9).to_socket_addrs().ok()?.next()?;
    if target.ip().is_loopback() || target.ip().is_unspecified() {
        return None;
    }
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
    // Connecting a UDP socket sends nothing: it only picks the route and so the local address.
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Start the link for engine `uuid` (namespace `dir`), listening on the address it reaches the
/// controller at `interface` from; values are bounded by `max` bytes. Nothing is started when
/// that address is loopback or `RPX_DATA_PLANE=buffers`. Started once per process.
pub fn start(interface: &str, uuid: &str, session: &Session, dir: &Path, max: u64) -> Option<&'static DataLink> {
    LINK.get_or_init(|| {
        if dp::buffers_forced() {
            return None;
        }
        let ip = local_address_towards(interface)?;
        let listener = match TcpListener::bind((ip, 0)) {
            Ok(l) => l,
            Err(e) => {
                warn!(%ip, error = %e, "cannot listen for the data link; values go through the controller");
                return None;
            }
        };
        let address = listener.local_addr().ok()?;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let server = Server { session: session.clone(), engine: uuid.to_string(), dir: dir.to_path_buf(), max, ledger: ledger.clone() };
        let serving = std::thread::Builder::new().name("rpx-datalink".into()).spawn(move || server.listen(listener));
        if let Err(e) = serving {
            warn!(error = %e, "cannot start the data link's thread");
            return None;
        }
        let swept = ledger.clone();
        let sweep_dir = dir.to_path_buf();
        let _ = std::thread::Builder::new().name("rpx-datalink-sweep".into()).spawn(move || loop {
            std::thread::sleep(UNCLAIMED / 10);
            let expired = swept.lock().unwrap_or_else(|p| p.into_inner()).expired(Instant::now(), |f| sweep_dir.join(f).exists());
            for f in expired {
                if dp::is_transfer_name(&f) && std::fs::remove_file(sweep_dir.join(&f)).is_ok() {
                    info!(file = %f, "removed a data link transfer nobody claimed");
                }
            }
        });
        info!(%address, "data link listening");
        Some(DataLink { address, ledger })
    })
    .as_ref()
}

struct Server {
    session: Session,
    engine: String,
    dir: PathBuf,
    max: u64,
    ledger: Arc<Mutex<Ledger>>,
}

impl Server {
    fn listen(self, listener: TcpListener) {
        let server = Arc::new(self);
        let busy = Arc::new(AtomicUsize::new(0));
        for conn in listener.incoming() {
            let mut stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "data link accept failed");
                    continue;
                }
            };
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                busy.fetch_sub(1, Ordering::SeqCst);
                warn!(%peer, "data link refused a connection: {MAX_CONNECTIONS} already open");
                let _ = link::write_ack(&mut stream, &Ack::Refused(format!("{MAX_CONNECTIONS} transfers already under way")));
                continue;
            }
            let (server, busy) = (server.clone(), busy.clone());
            let spawned = std::thread::Builder::new().name("rpx-datalink-conn".into()).spawn(move || {
                if let Err(e) = server.serve(&mut stream) {
                    warn!(%peer, error = %e, "data link transfer refused");
                    let _ = link::write_ack(&mut stream, &Ack::Refused(e));
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                warn!("cannot start a data link thread");
            }
        }
    }

    /// One connection: a signed hello, then a push or a fetch.
    fn serve(&self, stream: &mut TcpStream) -> Result<(), String> {
        stream.set_read_timeout(Some(HELLO)).and_then(|_| stream.set_write_timeout(Some(STALL))).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let hello = link::read_hello(stream, &self.session, &self.engine)?;
        stream.set_read_timeout(Some(STALL)).map_err(|e| e.to_string())?;
        match hello.op {
            LinkOp::Push { size } => self.receive(stream, size.filter(|s| *s <= self.max)),
            LinkOp::Fetch { file } => self.send(stream, &file),
        }
    }

    /// Receive a pushed value into a transfer file (over a spare's pages when `size` is given
    /// and one fits), hashed as it arrives.
    fn receive(&self, stream: &mut TcpStream, size: Option<u64>) -> Result<(), String> {
        let started = Instant::now();
        let mut reader = std::io::BufReader::with_capacity(256 << 10, &*stream);
        // Received and hashed on this thread, written to tmpfs on a second one: the kernel's work
        // of supplying the new file's pages is most of a write, and runs beside the next reads.
        let vf = dp::write_value_file_beside(&self.dir, dp::Integrity::Digest, size, |w| {
            link::read_frames(&mut reader, self.max, |piece| w.write_all(piece)).map(|_| ())
        })
        .map_err(|e| format!("the pushed value was not stored: {e}"))?;
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
            .insert(vf.file.clone(), (vf.size, vf.blake3.clone(), Instant::now()));
        debug!(file = %vf.file, size = vf.size, ms = started.elapsed().as_millis() as u64, "data link received a value");
        link::write_ack(stream, &Ack::Stored(vf)).map_err(|e| e.to_string())
    }

    fn send(&self, stream: &mut TcpStream, file: &str) -> Result<(), String> {
        if self.ledger.lock().unwrap_or_else(|p| p.into_inner()).offered.remove(file).is_none() {
            return Err(format!("`{file}` is not a pull snapshot on offer (already fetched, expired, or never announced)"));
        }
        let path = self.dir.join(file);
        let opened = std::fs::File::open(&path);
        // The snapshot is read through the open file from here on: its name can go.
        let _ = std::fs::remove_file(&path);
        let f = opened.map_err(|e| format!("`{file}`: {e}"))?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        link::write_ack(stream, &Ack::Sending { size }).map_err(|e| e.to_string())?;
        link::send_file(&f, size, &*stream).map_err(|e| format!("the link was cut while sending `{file}`: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_hands_out_each_received_file_once_and_only_as_received() {
        let mut l = Ledger::default();
        let vf = ValueFile { file: dp::transfer_name(), size: 10, blake3: Some("ab".into()) };
        l.received.insert(vf.file.clone(), (10, Some("ab".into()), Instant::now()));
        let other = |vf: ValueFile| ValueFile { file: dp::transfer_name(), ..vf };
        assert_eq!(l.take_received(&other(vf.clone())), Received::NotByLink);
        assert_eq!(l.take_received(&ValueFile { size: 11, ..vf.clone() }), Received::NotAsAnnounced, "another size");
        assert_eq!(l.take_received(&ValueFile { blake3: Some("cd".into()), ..vf.clone() }), Received::NotAsAnnounced, "another digest");
        assert_eq!(l.take_received(&ValueFile { blake3: None, ..vf.clone() }), Received::NotAsAnnounced, "no digest");
        assert_eq!(l.take_received(&vf), Received::AsAnnounced);
        assert_eq!(l.take_received(&vf), Received::NotByLink, "used up");
    }

    #[test]
    fn unclaimed_entries_expire() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        l.received.insert("a".into(), (1, Some("x".into()), t0));
        l.offered.insert("b".into(), t0);
        l.offered.insert("read-by-its-client".into(), t0);
        let exists = |f: &str| f != "read-by-its-client";
        assert!(l.expired(t0 + UNCLAIMED / 2, exists).is_empty());
        assert!(!l.offered.contains_key("read-by-its-client"), "entries whose file is gone are dropped");
        let mut gone = l.expired(t0 + UNCLAIMED, exists);
        gone.sort();
        assert_eq!(gone, vec!["a".to_string(), "b".to_string()]);
        assert!(l.received.is_empty() && l.offered.is_empty());
    }

    #[test]
    fn loopback_controllers_get_no_link() {
        assert_eq!(local_address_towards("tcp://127.0.0.1"), None);
        assert_eq!(local_address_towards("tcp://0.0.0.0"), None);
        assert_eq!(local_address_towards("tcp://[::1]"), None);
    }

    /// A real link on a real socket: a push stored whole, a forged hello refused with nothing
    /// written, a snapshot fetched once.
    #[test]
    fn pushes_and_fetches_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let session = Session::new(b"k", "u");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let server = Server { session: session.clone(), engine: "e".into(), dir: dir.path().into(), max: 8 << 20, ledger: ledger.clone() };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || server.listen(listener));

        let value: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 253) as u8).collect();
        let mut s = TcpStream::connect(addr).unwrap();
        link::write_hello(&mut s, &session, &link::Hello { engine: "e".into(), op: LinkOp::Push { size: None } }).unwrap();
        link::write_frame(&mut s, &value).unwrap();
        link::end_frames(&mut s).unwrap();
        let Ack::Stored(vf) = link::read_ack(&mut s).unwrap() else { panic!("not stored") };
        assert_eq!((vf.size, vf.blake3.clone()), (value.len() as u64, Some(dp::digest(&value))));
        assert_eq!(std::fs::read(dir.path().join(&vf.file)).unwrap(), value);
        assert_eq!(ledger.lock().unwrap().take_received(&vf), Received::AsAnnounced);

        // Signed with another key: refused, and no file appears.
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        let mut s = TcpStream::connect(addr).unwrap();
        link::write_hello(&mut s, &Session::new(b"other", "u"), &link::Hello { engine: "e".into(), op: LinkOp::Push { size: None } })
            .unwrap();
        let _ = link::write_frame(&mut s, &value[..1000]);
        let Ack::Refused(why) = link::read_ack(&mut s).unwrap() else { panic!("accepted a forged hello") };
        assert!(why.contains("signature"), "{why}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);

        // A snapshot on offer is sent once, then its name is gone.
        let fetch = |file: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            link::write_hello(&mut s, &session, &link::Hello { engine: "e".into(), op: LinkOp::Fetch { file: file.into() } }).unwrap();
            match link::read_ack(&mut s).unwrap() {
                Ack::Sending { size } => Ok(link::read_fetched(&mut s, size, &vf)),
                other => Err(other),
            }
        };
        assert!(matches!(fetch(&vf.file), Err(Ack::Refused(_))), "not offered yet");
        ledger.lock().unwrap().offered.insert(vf.file.clone(), Instant::now());
        assert_eq!(fetch(&vf.file).unwrap().unwrap(), value);
        assert!(!dir.path().join(&vf.file).exists());
        assert!(matches!(fetch(&vf.file), Err(Ack::Refused(_))), "fetched once");
    }
}
