//! Where a push and a pull of 100 MB of f64 over a data link (`rpx_protocol::datalink`) spend
//! their time, step by step, over loopback TCP in one process (`BENCH_REPS` runs, 5 by default;
//! the minimum and median of each step). The engine's side is played by a thread doing what the
//! engine's link does (frames into a transfer file, hashed; a snapshot sent with
//! `rpx_protocol::datalink::send_file`); the client's side is the client's own code path:
//! - push: the value encoded in 1 MiB pieces, each hashed and framed onto the socket, while the
//!   other side hashes them and writes them into a tmpfs file on a second thread, as the engine does;
//! - pull: the snapshot sent by the kernel, read into memory and hashed, then decoded as the
//!   client decodes a pull (`rpx_runtime::decode_owned`: a `Vec<f64>` by one copy);
//!
//! - pull as a blocking `pull` reads it: straight into the `Vec<f64>` (huge pages), each piece
//!   hashed as it arrives (`rpx_protocol::datalink::read_hashed`), no copy of the bytes; and,
//!   to compare, read by `rpx_runtime::read_plain_into` with the hashing inline;
//!
//! and, for reference, the bare socket: 100 MB into a buffer allocated once.
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use rpx_protocol::datalink::{self as link, Ack};
use rpx_protocol::dataplane::{self as dp, STREAM_CHUNK};

fn main() {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let data: Vec<f64> = (0..12_500_000).map(|i| i as f64 * 0.5).collect();
    let tmp = tempfile::Builder::new().prefix("rpx-link-micro-").tempdir_in("/dev/shm").unwrap();
    let dir = tmp.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut record = |step: &'static str, ms: f64| times.entry(step).or_default().push(ms);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut raw = vec![0u8; 100_000_000];
    for _ in 0..reps {
        // Push as rpx does now, then the earlier ways alternated with it: the client encoding
        // element by element (the generic path), the engine writing the file on its reading thread.
        let mut pushed = None;
        for (label, plain, beside) in PUSHES {
            let (vf, digest, whole, client, engine) = push(&listener, addr, &dir, &data, plain, beside);
            assert_eq!(vf.blake3.as_deref(), Some(digest.as_str()));
            record(label[0], whole);
            record(label[1], client);
            record(label[2], engine);
            if plain && beside {
                pushed = Some(vf);
            } else {
                let _ = std::fs::remove_file(dir.join(&vf.file));
            }
        }
        let vf = pushed.expect("the first push is rpx's own");

        // Pull: the engine's side sends the snapshot as the engine does.
        let engine = send_snapshot(&listener, dir.join(&vf.file));
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        let Ack::Sending { size } = link::read_ack(&mut s).unwrap() else { panic!() };
        let bytes = link::read_fetched(&mut s, size, &vf).unwrap();
        record("2a pull: fetch (read, hashed)", ms(t));
        let t2 = Instant::now();
        let back: Vec<f64> = rpx_runtime::decode_owned(&bytes).unwrap();
        record("2b pull: decode", ms(t2));
        record("2 pull: whole", ms(t));
        assert_eq!(back.len(), data.len());
        drop((bytes, back));
        engine.join().unwrap();

        // A pull straight into the Vec<f64>, hashed inline as the bytes are read.
        let vf2 = {
            let mut h = blake3::Hasher::new();
            rpx_runtime::encode_chunked(&data, STREAM_CHUNK, |p| {
                h.update(p);
                Ok(())
            })
            .unwrap();
            let file = dir.join(dp::transfer_name());
            std::fs::write(&file, rpx_runtime::encode(&data)).unwrap();
            (file, h.finalize().to_hex().to_string())
        };
        let engine = send_snapshot(&listener, vf2.0.clone());
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        let Ack::Sending { size } = link::read_ack(&mut s).unwrap() else { panic!() };
        let size = size as usize;
        let n = rpx_runtime::plain_count::<Vec<f64>>(size).unwrap();
        let mut back: Vec<f64> = rpx_runtime::plain_zeroed(n).unwrap();
        let mut h = blake3::Hasher::new();
        rpx_runtime::read_plain_into(&mut s, size, n, rpx_runtime::plain_bytes_mut(&mut back).unwrap(), |p| {
            h.update(p);
        })
        .unwrap()
        .unwrap();
        assert_eq!(h.finalize().to_hex().as_str(), vf2.1);
        record("4a pull read straight into the value, hashed inline", ms(t));
        assert_eq!(back.len(), data.len());
        drop(back);
        engine.join().unwrap();

        // As a blocking `pull` reads it now: into the vector made at its size, hashed piece by
        // piece as it is read (`datalink::read_hashed`).
        let engine = send_snapshot(&listener, {
            let f = dir.join(dp::transfer_name());
            std::fs::write(&f, rpx_runtime::encode(&data)).unwrap();
            f
        });
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        let Ack::Sending { size } = link::read_ack(&mut s).unwrap() else { panic!() };
        let size = size as usize;
        let n = rpx_runtime::plain_count::<Vec<f64>>(size).unwrap();
        let mut back: Vec<f64> = rpx_runtime::plain_zeroed(n).unwrap();
        let body = rpx_runtime::plain_bytes_mut(&mut back).unwrap();
        let mut h = blake3::Hasher::new();
        rpx_runtime::read_plain_prefix(&mut s, size, n, body.len(), &mut |p: &[u8]| {
            h.update(p);
        })
        .unwrap()
        .unwrap();
        link::read_hashed(&mut s, body, &mut h).unwrap();
        assert_eq!(h.finalize().to_hex().as_str(), vf2.1);
        record("4 pull read straight into the value (blocking pull)", ms(t));
        assert_eq!(back.len(), data.len());
        drop(back);
        engine.join().unwrap();

        // Reference: the bare socket, from a buffer filled before the clock starts into one
        // allocated (and faulted in) once.
        let out = vec![1u8; 100_000_000];
        let sender = {
            let l = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                s.write_all(&out).unwrap();
            })
        };
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        std::io::Read::read_exact(&mut s, &mut raw).unwrap();
        record("3 reference: bare socket, 100 MB", ms(t));
        sender.join().unwrap();
    }
    for (step, mut v) in times {
        v.sort_by(f64::total_cmp);
        println!(
            "{step:<40} min {:7.1} ms  median {:7.1} ms  ({:.2} GB/s at the median)",
            v[0],
            v[v.len() / 2],
            0.1 / (v[v.len() / 2] / 1e3)
        );
    }
}

/// The pushes measured: step labels (whole, client, engine), whether the client sends a plain
/// vector from its memory (else element by element), whether the engine writes beside its reads.
const PUSHES: [([&str; 3], bool, bool); 4] = [
    (["1 push: whole (client ‖ engine)", "1a push: client encode+hash+send", "1b push: engine recv+hash+write"], true, true),
    (["5 push, before: element by element, written inline", "5a client", "5b engine"], false, false),
    (["6 push: element by element, written beside", "6a client", "6b engine"], false, true),
    (["7 push: from memory, written inline", "7a client", "7b engine"], true, false),
];

/// One push of `data` over a link: the transfer file, the client's digest, and the times (ms) of
/// the whole push, the client's sending and the engine's side.
fn push(
    listener: &TcpListener,
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    data: &Vec<f64>,
    plain: bool,
    beside: bool,
) -> (dp::ValueFile, String, f64, f64, f64) {
    /// The same bytes as a `Vec<f64>`, serialized element by element (serde's generic path).
    struct Elementwise<'a>(&'a [f64]);
    impl serde::Serialize for Elementwise<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter())
        }
    }
    let recv_dir = dir.to_path_buf();
    let engine = {
        let l = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let t = Instant::now();
            let mut r = std::io::BufReader::with_capacity(256 << 10, &s);
            let fill = |w: &mut dp::Streamer| link::read_frames(&mut r, u64::MAX, |p| w.write_all(p)).map(|_| ());
            let vf = if beside {
                dp::write_value_file_beside(&recv_dir, dp::Integrity::Digest, None, fill)
            } else {
                dp::write_value_file_with(&recv_dir, dp::Integrity::Digest, fill)
            }
            .unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            link::write_ack(&mut s, &Ack::Stored(vf.clone())).unwrap();
            (vf, ms)
        })
    };
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut send = |p: &[u8]| {
        hasher.update(p);
        link::write_frame(&mut s, p)
    };
    if plain {
        rpx_runtime::encode_chunked(data, STREAM_CHUNK, &mut send).unwrap();
    } else {
        rpx_runtime::encode_chunked(&Elementwise(data), STREAM_CHUNK, &mut send).unwrap();
    }
    let sent = t.elapsed().as_secs_f64() * 1e3;
    link::end_frames(&mut s).unwrap();
    let Ack::Stored(vf) = link::read_ack(&mut s).unwrap() else { panic!() };
    let whole = t.elapsed().as_secs_f64() * 1e3;
    let (_, engine_ms) = engine.join().unwrap();
    (vf, hasher.finalize().to_hex().to_string(), whole, sent, engine_ms)
}

/// Play the engine's side of a fetch: accept one connection, announce the file and send it
/// as the engine does (`link::send_file`), then remove it.
fn send_snapshot(listener: &TcpListener, file: std::path::PathBuf) -> std::thread::JoinHandle<()> {
    let l = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let f = std::fs::File::open(&file).unwrap();
        let size = f.metadata().unwrap().len();
        link::write_ack(&mut s, &Ack::Sending { size }).unwrap();
        link::send_file(&f, size, &s).unwrap();
        let _ = std::fs::remove_file(&file);
    })
}
