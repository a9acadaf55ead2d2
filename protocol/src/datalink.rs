//! The cross-host data plane ("data link"): a pushed or pulled value of an engine on another
//! host streams straight between the client and the engine over a TCP connection of their own,
//! instead of as message buffers the controller stores and forwards.
//!
//! The request still goes through the controller, signed as always, and is the same as on one
//! host ([`crate::dataplane`]): it names the value by its transfer file, size and BLAKE3
//! ([`ValueFile`]), so the HMAC of the signed request covers the digest of the bytes. The link
//! only carries bytes, and what it delivers is checked against that digest before it is used.
//!
//! | op | on the link | through the controller |
//! |---|---|---|
//! | push | client: signed [`Hello`] (`Push`), [frames](write_frame) of at most [`STREAM_CHUNK`] bytes, an empty frame; engine: [`Ack::Stored`] (the transfer file it wrote, size, BLAKE3) | then `Op::Push { files }` naming that file: the engine adopts it as a same-host push |
//! | pull | client: signed [`Hello`] (`Fetch`, a file the reply named); engine: [`Ack::Sending`], the bytes | first `Op::Pull { files: Some(PullFiles::DataLink) }`: the reply names a snapshot (`ValueFile`) of each value |
//!
//! Bounds: a hello is at most [`MAX_HELLO`] bytes and is checked (signature, engine) before the
//! engine allocates or writes anything; frames are at most [`STREAM_CHUNK`] bytes and a value
//! at most the receiver's maximum message size. The client checks a fetched value's size
//! against the signed reply before it allocates, and its BLAKE3 before it decodes.
//!
//! Who uses it: an engine announces its link ([`crate::dataplane::HostIdentity::data`]) only
//! when it reaches the controller on an address other than loopback, and the client uses it for
//! engines that are not on its host, for values of at least [`STREAM_CHUNK`] bytes (smaller
//! ones stay buffers), unless `RPX_DATA_PLANE=buffers`. A client that cannot reach the link
//! sends buffers, as before.
//!
//! This module only reads and writes what it is given (`Read`, `Write`); the client and the
//! engine own the sockets.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub use crate::dataplane::{ValueFile, STREAM_CHUNK};
use crate::Session;

/// Largest hello (JSON and signature) an engine reads.
pub const MAX_HELLO: usize = 4096;
/// Largest acknowledgement a client reads.
pub const MAX_ACK: usize = 64 * 1024;

/// What a connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkOp {
    /// Frames follow; the engine writes them into a transfer file. `size`, the value's size
    /// if the client knows it ahead, lets the engine write it over a spare's pages
    /// (`crate::dataplane::claim_spare`); the file is cut to what arrives whatever it says.
    Push {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// The engine sends the named transfer file (a snapshot a pull reply announced).
    Fetch { file: String },
}

/// The first thing on a connection, signed with the cluster key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The engine the client means (a link reached by mistake refuses).
    pub engine: String,
    pub op: LinkOp,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// A push was written to this transfer file, with this size and digest.
    Stored(ValueFile),
    /// A fetch: `size` bytes follow.
    Sending { size: u64 },
    /// Refused, and why.
    Refused(String),
}

fn write_blob(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("a link message above 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)
}

fn read_len(r: &mut impl Read) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    Ok(u32::from_be_bytes(len) as usize)
}

/// A length-prefixed blob of at most `max` bytes (checked before anything is allocated).
fn read_blob(r: &mut impl Read, max: usize, what: &str) -> Result<Vec<u8>, String> {
    let len = read_len(r).map_err(|e| format!("no {what}: {e}"))?;
    if len > max {
        return Err(format!("a {what} of {len} bytes (at most {max})"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(|e| format!("a cut {what}: {e}"))?;
    Ok(buf)
}

/// Send `hello`, signed.
pub fn write_hello(w: &mut impl Write, session: &Session, hello: &Hello) -> std::io::Result<()> {
    let json = serde_json::to_vec(hello).expect("a hello serializes");
    let sig = session.sign(&[&json]);
    let mut out = Vec::with_capacity(8 + json.len() + sig.len());
    write_blob(&mut out, &json)?;
    write_blob(&mut out, sig.as_bytes())?;
    w.write_all(&out)?;
    w.flush()
}

/// Read a hello: bounded, signed with the cluster key, and meant for `engine`.
pub fn read_hello(r: &mut impl Read, session: &Session, engine: &str) -> Result<Hello, String> {
    let json = read_blob(r, MAX_HELLO, "hello")?;
    let sig = read_blob(r, MAX_HELLO, "hello signature")?;
    if !session.verify_parts(&sig, &[&json]) {
        return Err("a hello with an invalid signature".into());
    }
    let hello: Hello = serde_json::from_slice(&json).map_err(|e| format!("a malformed hello: {e}"))?;
    if hello.engine != engine {
        return Err(format!("a hello for engine {}, not this one", hello.engine));
    }
    if let LinkOp::Fetch { file } = &hello.op {
        if !crate::dataplane::is_transfer_name(file) {
            return Err(format!("`{file}` is not a transfer file name"));
        }
    }
    Ok(hello)
}

/// Send one frame of a pushed value (empty frames are skipped: an empty frame ends the value).
pub fn write_frame(w: &mut impl Write, piece: &[u8]) -> std::io::Result<()> {
    for p in piece.chunks(STREAM_CHUNK) {
        write_blob(w, p)?;
    }
    Ok(())
}

/// End a pushed value.
pub fn end_frames(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&0u32.to_be_bytes())?;
    w.flush()
}

/// Read a pushed value's frames into `sink` until the empty frame, refusing frames above
/// [`STREAM_CHUNK`] and a value above `max` bytes. Returns the value's size.
pub fn read_frames(r: &mut impl Read, max: u64, mut sink: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<u64> {
    let mut buf = Vec::new();
    let mut total = 0u64;
    loop {
        let len = read_len(r)?;
        if len == 0 {
            return Ok(total);
        }
        if len > STREAM_CHUNK {
            return Err(std::io::Error::other(format!("a frame of {len} bytes (at most {STREAM_CHUNK})")));
        }
        total += len as u64;
        if total > max {
            return Err(std::io::Error::other(format!("a value above the maximum of {max} bytes")));
        }
        buf.resize(len, 0);
        r.read_exact(&mut buf)?;
        sink(&buf)?;
    }
}

/// Send the engine's answer.
pub fn write_ack(w: &mut impl Write, ack: &Ack) -> std::io::Result<()> {
    write_blob(w, &serde_json::to_vec(ack).expect("an ack serializes"))?;
    w.flush()
}

/// Read the engine's answer.
pub fn read_ack(r: &mut impl Read) -> Result<Ack, String> {
    let bytes = read_blob(r, MAX_ACK, "link answer")?;
    serde_json::from_slice(&bytes).map_err(|e| format!("a malformed link answer: {e}"))
}

/// Read a fetched value after [`Ack::Sending`]: exactly the `announced` file's size (from the
/// signed pull reply: checked before allocating), hashed as it arrives, refused unless its
/// BLAKE3 is the announced one.
pub fn read_fetched(r: &mut impl Read, sending: u64, announced: &ValueFile) -> Result<Vec<u8>, String> {
    if sending != announced.size {
        return Err(format!("the link offered {sending} bytes where the engine's reply announced {}", announced.size));
    }
    let size = usize::try_from(sending).map_err(|_| "a value larger than this machine's memory".to_string())?;
    let mut out = vec![0u8; size];
    rpx_runtime::advise_huge_pages(&mut out);
    let mut hasher = blake3::Hasher::new();
    read_hashed(r, &mut out, &mut hasher).map_err(|e| format!("the link was cut before {size} bytes arrived: {e}"))?;
    check_digest(hasher, announced)?;
    Ok(out)
}

/// Whether the bytes `hasher` saw are the `announced` value (its BLAKE3, from the signed reply).
pub fn check_digest(hasher: blake3::Hasher, announced: &ValueFile) -> Result<(), String> {
    let Some(digest) = &announced.blake3 else {
        return Err("the engine's reply announced no digest for bytes that cross hosts".into());
    };
    if hasher.finalize().to_hex().as_str() != digest {
        return Err("the bytes on the link do not match the digest in the engine's signed reply".into());
    }
    Ok(())
}

/// Read exactly `dst.len()` bytes from `r` into `dst`, hashing them into `hasher` in order,
/// [`STREAM_CHUNK`] by [`STREAM_CHUNK`], each piece hashed while it is still in cache. (Hashing
/// on a second thread while the next pieces are read paid while filling `dst` took a page fault
/// per 4 KiB; into memory in huge pages, measured with `link_micro`, inline is faster: 44-67 ms
/// for 100 MB against 71-86.)
pub fn read_hashed(r: &mut impl Read, dst: &mut [u8], hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    for piece in dst.chunks_mut(STREAM_CHUNK) {
        r.read_exact(piece)?;
        hasher.update(piece);
    }
    Ok(())
}

/// How much of a snapshot [`send_file`] reads before writing it on.
const SEND_PIECE: usize = 256 << 10;

/// Send the first `size` bytes of `f` (a pull snapshot) to `to`, read and written on through a
/// buffer of `SEND_PIECE` bytes; a file that ends early is an error. Not `sendfile(2)`: with the
/// receiver on the same machine (the test hosts), `link_micro` pulled 100 MB in 111-114 ms with
/// `sendfile` against 69-87 ms this way, since each piece reaches the receiver while still in
/// cache (`std::io::copy`'s 8 KiB pieces: 94-106 ms).
pub fn send_file(mut f: &std::fs::File, size: u64, mut to: impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; SEND_PIECE.min(usize::try_from(size).unwrap_or(usize::MAX))];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match f.read(&mut buf[..want]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => read?,
        };
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("the file ended {left} bytes early")));
        }
        to.write_all(&buf[..n])?;
        left -= n as u64;
    }
    to.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(b"key", "u")
    }

    #[test]
    fn send_file_sends_exactly_the_file_and_refuses_one_that_ends_early() {
        use std::io::Write as _;
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..3_000_017u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            a.read_to_end(&mut got).unwrap();
            got
        });
        let mut from_start = f.try_clone().unwrap();
        std::io::Seek::rewind(&mut from_start).unwrap();
        send_file(&from_start, bytes.len() as u64, &b).unwrap();
        // Asked for more than the file holds: an error after what there was.
        std::io::Seek::rewind(&mut from_start).unwrap();
        let e = send_file(&from_start, bytes.len() as u64 + 1, &b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        drop(b);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 2 * bytes.len());
        assert!(got[..bytes.len()] == bytes[..] && got[bytes.len()..] == bytes[..], "the file's bytes, in order");
    }

    #[test]
    fn a_hello_round_trips_and_is_refused_when_forged_or_misdirected() {
        let s = session();
        let hello = Hello { engine: "e1".into(), op: LinkOp::Fetch { file: crate::dataplane::transfer_name() } };
        let mut buf = Vec::new();
        write_hello(&mut buf, &s, &hello).unwrap();
        assert_eq!(read_hello(&mut buf.as_slice(), &s, "e1").unwrap(), hello);
        assert!(read_hello(&mut buf.as_slice(), &s, "e2").unwrap_err().contains("not this one"));
        let other = Session::new(b"other key", "u");
        assert!(read_hello(&mut buf.as_slice(), &other, "e1").unwrap_err().contains("invalid signature"));
        // A hello claiming to be huge is refused before its bytes are read.
        let mut huge = (MAX_HELLO as u32 + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_hello(&mut huge.as_slice(), &s, "e1").unwrap_err().contains("at most"));
        // A fetch of a path, not a transfer file.
        let mut bad = Vec::new();
        write_hello(&mut bad, &s, &Hello { engine: "e1".into(), op: LinkOp::Fetch { file: "../x".into() } }).unwrap();
        assert!(read_hello(&mut bad.as_slice(), &s, "e1").unwrap_err().contains("not a transfer file"));
    }

    #[test]
    fn frames_carry_a_value_and_are_bounded() {
        let value: Vec<u8> = (0..(STREAM_CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        write_frame(&mut wire, &value).unwrap();
        write_frame(&mut wire, &[]).unwrap();
        end_frames(&mut wire).unwrap();
        let mut got = Vec::new();
        let n = read_frames(&mut wire.as_slice(), 1 << 30, |p| {
            got.extend_from_slice(p);
            Ok(())
        })
        .unwrap();
        assert_eq!((n, got == value), (value.len() as u64, true));
        let err = read_frames(&mut wire.as_slice(), STREAM_CHUNK as u64, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("maximum"), "{err}");
        let mut oversized = (STREAM_CHUNK as u32 + 1).to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0; 8]);
        assert!(read_frames(&mut oversized.as_slice(), 1 << 30, |_| Ok(())).unwrap_err().to_string().contains("a frame of"));
        // A link cut before the end frame is an error, not a short value.
        assert!(read_frames(&mut &wire[..wire.len() - 4], 1 << 30, |_| Ok(())).is_err());
    }

    #[test]
    fn a_fetched_value_must_match_the_signed_size_and_digest() {
        let value = vec![7u8; STREAM_CHUNK + 5];
        let vf =
            ValueFile { file: crate::dataplane::transfer_name(), size: value.len() as u64, blake3: Some(crate::dataplane::digest(&value)) };
        assert_eq!(read_fetched(&mut value.as_slice(), vf.size, &vf).unwrap(), value);
        assert!(read_fetched(&mut value.as_slice(), vf.size + 1, &vf).unwrap_err().contains("announced"));
        let mut changed = value.clone();
        changed[3] ^= 1;
        assert!(read_fetched(&mut changed.as_slice(), vf.size, &vf).unwrap_err().contains("do not match"));
        assert!(read_fetched(&mut &value[..10], vf.size, &vf).unwrap_err().contains("was cut"));
        // Many pieces: the same bytes and digest, in order, and
        // a stream cut in the middle is an error, not a value.
        let big: Vec<u8> = (0..5 * STREAM_CHUNK + 3).map(|i| (i % 253) as u8).collect();
        let vf_big =
            ValueFile { file: crate::dataplane::transfer_name(), size: big.len() as u64, blake3: Some(crate::dataplane::digest(&big)) };
        assert!(read_fetched(&mut big.as_slice(), vf_big.size, &vf_big).unwrap() == big);
        let mut dst = vec![0u8; big.len()];
        let mut h = blake3::Hasher::new();
        read_hashed(&mut big.as_slice(), &mut dst, &mut h).unwrap();
        assert!(dst == big && Some(h.finalize().to_hex().as_str()) == vf_big.blake3.as_deref());
        assert!(read_hashed(&mut &big[..3 * STREAM_CHUNK + 7], &mut dst, &mut blake3::Hasher::new()).is_err());
        assert!(read_fetched(&mut &big[..3 * STREAM_CHUNK], vf_big.size, &vf_big).unwrap_err().contains("was cut"));
        let mut wire = Vec::new();
        write_ack(&mut wire, &Ack::Stored(vf.clone())).unwrap();
        assert_eq!(read_ack(&mut wire.as_slice()).unwrap(), Ack::Stored(vf));
    }
}
