//! The client's end of the cross-host data link (`rpx_protocol::datalink`): values of at least
//! 1 MiB for engines on other hosts are encoded straight onto a TCP connection to the engine
//! (one pass: each 1 MiB piece hashed and written to every engine that gets the value), and
//! pulled values are fetched from it, checked against the digest of the engine's signed reply
//! (a vector of plain numbers straight into its own memory, in huge pages, each piece hashed
//! as it arrives; the parts of a gather fetched at the same time). The controller routes
//! only the requests.
//!
//! An engine whose link cannot be reached is remembered, and its values go as message buffers
//! through the controller, as before; a link that fails in the middle of a push falls back the
//! same way, so nothing is lost.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use rpx_protocol::datalink::{self as link, Ack, Hello, LinkOp};
use rpx_protocol::dataplane::{ValueFile, STREAM_CHUNK};
use serde::Serialize;
use tracing::warn;

use crate::client::ClientInner;

/// How long connecting to an engine's link may take.
const CONNECT: Duration = Duration::from_secs(3);
/// Longest silence of an engine in the middle of a transfer.
const STALL: Duration = Duration::from_secs(60);

impl ClientInner {
    /// The data link of engine `uuid`, if values should take it: the data plane is on, the
    /// engine is on another host and announced one, and it was not found unreachable.
    pub fn link_address(&self, uuid: &str) -> Option<SocketAddr> {
        if !self.shared_memory.load(std::sync::atomic::Ordering::Relaxed) || self.local_namespace(uuid).is_some() {
            return None;
        }
        let addr: SocketAddr = self.io.shared.host(uuid)?.data?.parse().ok()?;
        let known = self.links.lock().unwrap_or_else(|p| p.into_inner()).get(uuid).copied();
        match known {
            Some(reachable) => reachable.then_some(addr),
            None => {
                // First use: find out once whether this host can reach it.
                let reachable = TcpStream::connect_timeout(&addr, CONNECT).is_ok();
                if !reachable {
                    warn!(engine = %uuid, %addr, "cannot reach the engine's data link; its values go through the controller");
                }
                self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(uuid.to_string(), reachable);
                reachable.then_some(addr)
            }
        }
    }

    fn link_failed(&self, uuid: &str, addr: SocketAddr, why: &str) {
        warn!(engine = %uuid, %addr, error = %why, "the engine's data link failed; its values go through the controller");
        self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(uuid.to_string(), false);
    }

    /// Open a link to engine `uuid` for `op`.
    fn open_link(&self, uuid: &str, addr: SocketAddr, op: LinkOp) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&addr, CONNECT)?;
        s.set_read_timeout(Some(STALL))?;
        s.set_write_timeout(Some(STALL))?;
        s.set_nodelay(true)?;
        link::write_hello(&mut s, &self.session, &Hello { engine: uuid.to_string(), op })?;
        Ok(s)
    }
}

/// What [`push_over_links`] did: the file each target's link stored (`None`: send it buffers),
/// and the encoded value if it was too small for a link (the buffer to send).
pub(crate) struct LinkPush {
    pub files: Vec<Option<ValueFile>>,
    pub small: Option<Bytes>,
}

/// Stream `value` to each `(uuid, link)` target at once: encoded once in 1 MiB pieces, each
/// hashed and written to every link. A value under one piece is not streamed (`small`).
pub(crate) fn push_over_links<T: Serialize + ?Sized>(client: &ClientInner, value: &T, targets: &[(String, SocketAddr)]) -> LinkPush {
    let mut links: Vec<Option<TcpStream>> = Vec::new();
    let mut small: Option<Bytes> = None;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let announced = rpx_runtime::plain_encoded_len(value).map(|n| n as u64);
    let encoded = rpx_runtime::encode_chunked(value, STREAM_CHUNK, |piece| {
        if links.is_empty() && small.is_none() {
            if piece.len() < STREAM_CHUNK {
                // The whole value, in one short piece: a buffer costs less than a connection.
                small = Some(Bytes::copy_from_slice(piece));
                return Ok(());
            }
            links = targets
                .iter()
                .map(|(uuid, addr)| {
                    client
                        .open_link(uuid, *addr, LinkOp::Push { size: announced })
                        .map_err(|e| client.link_failed(uuid, *addr, &e.to_string()))
                        .ok()
                })
                .collect();
        }
        hasher.update(piece);
        size += piece.len() as u64;
        for (l, (uuid, addr)) in links.iter_mut().zip(targets) {
            if let Some(s) = l {
                if let Err(e) = link::write_frame(s, piece) {
                    client.link_failed(uuid, *addr, &e.to_string());
                    *l = None;
                }
            }
        }
        if links.iter().all(Option::is_none) {
            return Err(std::io::Error::other("no link left"));
        }
        Ok(())
    });
    let mut files = vec![None; targets.len()];
    if encoded.is_err() || small.is_some() {
        return LinkPush { files, small };
    }
    let digest = hasher.finalize().to_hex().to_string();
    for ((l, (uuid, addr)), file) in links.into_iter().zip(targets).zip(files.iter_mut()) {
        let Some(mut s) = l else { continue };
        let stored = link::end_frames(&mut s).map_err(|e| e.to_string()).and_then(|_| link::read_ack(&mut s));
        match stored {
            Ok(Ack::Stored(vf)) if vf.size == size && vf.blake3.as_ref() == Some(&digest) => *file = Some(vf),
            Ok(Ack::Stored(vf)) => client.link_failed(uuid, *addr, &format!("the engine stored {} bytes with another digest", vf.size)),
            Ok(Ack::Refused(why)) => client.link_failed(uuid, *addr, &why),
            Ok(other) => client.link_failed(uuid, *addr, &format!("an answer out of place: {other:?}")),
            Err(e) => client.link_failed(uuid, *addr, &e),
        }
    }
    LinkPush { files, small: None }
}

/// Ask engine `uuid`'s link for the pull snapshot `vf`: the connection, positioned at its bytes,
/// and their count (the signed reply's size, which the link must offer).
fn open_fetch(client: &ClientInner, uuid: &str, addr: SocketAddr, vf: &ValueFile) -> Result<(TcpStream, usize), String> {
    let mut s = client
        .open_link(uuid, addr, LinkOp::Fetch { file: vf.file.clone() })
        .map_err(|e| format!("cannot reach the engine's data link at {addr}: {e}"))?;
    let size = match link::read_ack(&mut s)? {
        Ack::Sending { size } if size == vf.size => size,
        Ack::Sending { size } => return Err(format!("the link offered {size} bytes where the engine's reply announced {}", vf.size)),
        Ack::Refused(why) => return Err(format!("the engine's data link refused the fetch: {why}")),
        other => return Err(format!("the engine's data link answered out of place: {other:?}")),
    };
    let size = usize::try_from(size).map_err(|_| "a value larger than this machine's memory".to_string())?;
    Ok((s, size))
}

/// Fetch the pull snapshot `vf` from engine `uuid`'s link: its bytes, checked against the size
/// and digest of the engine's signed reply.
pub(crate) fn fetch(client: &ClientInner, uuid: &str, addr: SocketAddr, vf: &ValueFile) -> Result<Vec<u8>, String> {
    let (mut s, size) = open_fetch(client, uuid, addr, vf)?;
    link::read_fetched(&mut s, size as u64, vf)
}

/// [`fetch`] into `dst`, the bytes of the `n` elements of a plain vector the snapshot encodes
/// (a pulled vector, or a part of a gather read in its place), hashed as it is read
/// (`link::read_hashed`). `dst` holds the value only once this returns `Ok(Ok(()))`; the inner
/// error is a value that is not such a vector.
pub(crate) fn fetch_into(
    client: &ClientInner,
    uuid: &str,
    addr: SocketAddr,
    vf: &ValueFile,
    n: usize,
    dst: &mut [u8],
) -> Result<Result<(), String>, String> {
    let (mut s, size) = open_fetch(client, uuid, addr, vf)?;
    let cut = |e: std::io::Error| format!("the link was cut: {e}");
    let mut hasher = blake3::Hasher::new();
    if let Err(e) = rpx_runtime::read_plain_prefix(&mut s, size, n, dst.len(), &mut |p: &[u8]| {
        hasher.update(p);
    })
    .map_err(cut)?
    {
        return Ok(Err(e));
    }
    link::read_hashed(&mut s, dst, &mut hasher).map_err(cut)?;
    link::check_digest(hasher, vf).map(Ok)
}
