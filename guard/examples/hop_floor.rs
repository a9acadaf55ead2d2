//! The floor under an rpx round trip: the same process topology as a direct `apply` (client ->
//! controller -> engine -> worker and back) built from nothing but the zeromq crate and a pipe,
//! with no rpx logic (no signing, JSON, scheduling or task records). Each process runs a
//! current-thread tokio runtime, as rpx's controller and engine do.
//!
//! Measures, interleaved round by round so every setup sees the same machine noise, medians of
//! 100-byte round trips:
//! 1. `one_hop`: client DEALER <-> echo DEALER through one ROUTER (the zeromq crate's own round trip);
//! 2. `two_hops`: client -> forwarding process (ROUTER front, ROUTER back) -> echo process;
//! 3. `two_hops_pipe`: as 2, the echo process asking a child process over a pipe pair for each
//!    reply (the engine -> worker round trip);
//! 4. `two_hops_pipe_guarded`: as 3, the forwarding process binding both of its sockets behind
//!    [`rpx_guard::bind`], as the controller does (every frame header checked and relayed over a
//!    Unix socket before zeromq reads it);
//! 5. `two_hops_pipe_guarded_io_thread`: as 4, the client's socket owned by an IO thread, as
//!    rpx's client's are: the caller hands each request to it over a channel and sleeps until
//!    the IO thread's reader task hands the reply back (the cost of the client's two threads).
//!
//! and the transport floor under a 100 MB push to an engine on another host: one 100 MB message
//! through the forwarding process to a process that answers with a 1-byte acknowledgement
//! (`push_100mb_gb_per_s`, as the client benchmark counts: bytes / time until the answer).
//!
//! `cargo run --release -p rpx-guard --example hop_floor -- [ROUNDS] [OUT.json]`
//!
//! `hop_floor profile [TRIPS]` runs only setup 4 for TRIPS round trips (default 6,000), after
//! printing `client <pid>`, `forwarder <pid>` and `echo <pid>`, for `bench/roundtrip_profile.py`
//! to account each process's time next to rpx's.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use zeromq::{DealerSocket, Endpoint, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const BODY: usize = 100;
const TRIPS: usize = 1000;
const LARGE: usize = 100_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn port(ep: Endpoint) -> u16 {
    let Endpoint::Tcp(_, port) = ep else { panic!("tcp endpoint") };
    port
}

/// Start this example again in `role`; returns the child and the port it prints first.
fn spawn(role: &str, args: &[String]) -> (Child, u16) {
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .arg(role)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("port line");
    (child, line.trim().parse().expect("a port"))
}

/// Forwarding process: clients on `front`, echo processes on `back` (the first that says hello);
/// `guarded`: both bound behind the guard.
async fn forward(guarded: bool) {
    let (mut front, mut back) = (RouterSocket::new(), RouterSocket::new());
    let any = "tcp://127.0.0.1:0";
    let (fp, bp) = if guarded {
        (port(rpx_guard::bind(&mut front, any).await.expect("bind")), port(rpx_guard::bind(&mut back, any).await.expect("bind")))
    } else {
        (port(front.bind(any).await.expect("bind")), port(back.bind(any).await.expect("bind")))
    };
    println!("{fp}");
    println!("{bp}");
    let echo_id = back.recv().await.expect("hello").get(0).expect("identity").clone();
    loop {
        tokio::select! {
            m = front.recv() => {
                let Ok(m) = m else { break };
                let mut frames = m.into_vec();
                // [client, body] -> [echo, client, body]
                frames.insert(0, echo_id.clone());
                if back.send(ZmqMessage::try_from(frames).expect("frames")).await.is_err() { break }
            }
            m = back.recv() => {
                let Ok(m) = m else { break };
                let mut frames = m.into_vec();
                // [echo, client, body] -> [client, body]
                frames.remove(0);
                if front.send(ZmqMessage::try_from(frames).expect("frames")).await.is_err() { break }
            }
        }
    }
}

/// Echo process: a DEALER connected to `port`; with `pipe`, each reply first goes through a
/// child process over a pipe pair (8-byte length, then the body); with `ack`, the reply's body
/// is one byte.
async fn echo(port: u16, pipe: bool, ack: bool) {
    let mut d = DealerSocket::new();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    d.send(ZmqMessage::from(Bytes::from_static(b"hello"))).await.expect("hello");
    let mut worker = pipe.then(|| {
        Command::new(std::env::current_exe().expect("exe"))
            .arg("pipe-child")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the pipe child")
    });
    while let Ok(m) = d.recv().await {
        let mut frames = m.into_vec();
        if let Some(w) = worker.as_mut() {
            let body = frames.pop().expect("body");
            let (i, o) = (w.stdin.as_mut().expect("stdin"), w.stdout.as_mut().expect("stdout"));
            i.write_all(&(body.len() as u64).to_le_bytes()).and_then(|()| i.write_all(&body)).expect("to the child");
            let mut len = [0u8; 8];
            o.read_exact(&mut len).expect("from the child");
            let mut back = vec![0u8; u64::from_le_bytes(len) as usize];
            o.read_exact(&mut back).expect("from the child");
            frames.push(Bytes::from(back));
        }
        if ack {
            frames.pop();
            frames.push(Bytes::from_static(b"k"));
        }
        if d.send(ZmqMessage::try_from(frames).expect("frames")).await.is_err() {
            break;
        }
    }
}

/// The worker's stand-in: reads length-prefixed bodies on stdin, writes them back on stdout.
fn pipe_child() {
    let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut len = [0u8; 8];
    while i.read_exact(&mut len).is_ok() {
        let mut body = vec![0u8; u64::from_le_bytes(len) as usize];
        i.read_exact(&mut body).expect("body");
        o.write_all(&len).and_then(|()| o.write_all(&body)).and_then(|()| o.flush()).expect("reply");
    }
}

/// One-hop echo: a ROUTER that sends every message back.
async fn router_echo() {
    let mut r = RouterSocket::new();
    println!("{}", port(r.bind("tcp://127.0.0.1:0").await.expect("bind")));
    while let Ok(m) = r.recv().await {
        if r.send(m).await.is_err() {
            break;
        }
    }
}

async fn client(port: u16) -> DealerSocket {
    let mut d = DealerSocket::new();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    d
}

/// Median round trip (µs) of `TRIPS` sequential 100-byte messages.
async fn trips(d: &mut DealerSocket) -> f64 {
    let body = Bytes::from(vec![7u8; BODY]);
    let mut times = Vec::with_capacity(TRIPS);
    for _ in 0..TRIPS {
        let t = Instant::now();
        d.send(ZmqMessage::from(body.clone())).await.expect("send");
        let r = d.recv().await.expect("recv");
        assert_eq!(r.get(r.len() - 1).map(Bytes::len), Some(BODY));
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(times)
}

/// A client whose socket lives on its own IO thread (a current-thread runtime with a reader
/// task and a sending task), used from a caller thread that blocks for each reply.
struct IoThreadClient {
    requests: tokio::sync::mpsc::UnboundedSender<Bytes>,
    replies: std::sync::mpsc::Receiver<ZmqMessage>,
}

impl IoThreadClient {
    fn start(port: u16) -> IoThreadClient {
        let (requests, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let (mut send, mut recv) = client(port).await.split();
                tokio::spawn(async move {
                    while let Ok(m) = recv.recv().await {
                        if reply_tx.send(m).is_err() {
                            break;
                        }
                    }
                });
                ready_tx.send(()).expect("ready");
                while let Some(body) = rx.recv().await {
                    send.send(ZmqMessage::from(body)).await.expect("send");
                }
            })
        });
        ready.recv().expect("the IO thread connected");
        IoThreadClient { requests, replies }
    }

    /// Median round trip (µs) of `TRIPS` sequential 100-byte messages, each handed to the IO
    /// thread and its reply waited for on this thread.
    fn trips(&self) -> f64 {
        let body = Bytes::from(vec![7u8; BODY]);
        let mut times = Vec::with_capacity(TRIPS);
        for _ in 0..TRIPS {
            let t = Instant::now();
            self.requests.send(body.clone()).expect("the IO thread runs");
            let r = self.replies.recv().expect("a reply");
            assert_eq!(r.get(r.len() - 1).map(Bytes::len), Some(BODY));
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        median(times)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A forwarding process (`forward`: plain or guarded) with an echo process behind it (`mode`:
/// direct, pipe or ack); returns the children and the forwarder's front port.
fn two_hops(forward: &str, mode: &str) -> (Vec<Child>, u16) {
    let mut fwd = Command::new(std::env::current_exe().expect("exe")).arg(forward).stdout(Stdio::piped()).spawn().expect("spawn");
    let mut out = BufReader::new(fwd.stdout.take().expect("stdout"));
    let mut read = || {
        let mut line = String::new();
        out.read_line(&mut line).expect("port line");
        line.trim().parse::<u16>().expect("a port")
    };
    let (front, back) = (read(), read());
    let echo = Command::new(std::env::current_exe().expect("exe")).args(["echo", &back.to_string(), mode]).spawn().expect("spawn");
    (vec![fwd, echo], front)
}

/// Setup 4 alone (guarded forwarder, echo process, pipe child), `n` round trips one at a time.
fn profile(n: usize) {
    let (mut children, port) = two_hops("forward-guarded", "pipe");
    println!("client {}", std::process::id());
    println!("forwarder {}", children[0].id());
    println!("echo {}", children[1].id());
    runtime().block_on(async {
        let mut s = client(port).await;
        for _ in 0..n.div_ceil(TRIPS) {
            trips(&mut s).await;
        }
    });
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("forward") => return runtime().block_on(forward(false)),
        Some("forward-guarded") => return runtime().block_on(forward(true)),
        Some("echo") => return runtime().block_on(echo(args[1].parse().expect("port"), args[2] == "pipe", args[2] == "ack")),
        Some("router-echo") => return runtime().block_on(router_echo()),
        Some("pipe-child") => return pipe_child(),
        Some("profile") => return profile(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(6000)),
        _ => {}
    }
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let out = args.get(1).cloned();
    let rt = runtime();
    let (mut one_child, one_port) = spawn("router-echo", &[]);
    let (mut two, two_port) = two_hops("forward", "direct");
    let (mut three, three_port) = two_hops("forward", "pipe");
    let (mut four, four_port) = two_hops("forward-guarded", "pipe");
    let (mut five, five_port) = two_hops("forward-guarded", "pipe");
    let (mut big, big_port) = two_hops("forward", "ack");
    let mut pushes = Vec::new();
    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("one_hop", vec![]),
        ("two_hops", vec![]),
        ("two_hops_pipe", vec![]),
        ("two_hops_pipe_guarded", vec![]),
        ("two_hops_pipe_guarded_io_thread", vec![]),
    ];
    let (mut socks, mut big_sock) = rt.block_on(async {
        let mut socks = [client(one_port).await, client(two_port).await, client(three_port).await, client(four_port).await];
        for s in socks.iter_mut() {
            trips(s).await; // warm-up
        }
        (socks, client(big_port).await)
    });
    let io_thread = IoThreadClient::start(five_port);
    io_thread.trips(); // warm-up
    let value = Bytes::from(vec![1u8; LARGE]);
    for _ in 0..rounds {
        rt.block_on(async {
            for (i, s) in socks.iter_mut().enumerate() {
                let m = trips(s).await;
                results[i].1.push(m);
            }
        });
        results[4].1.push(io_thread.trips());
        rt.block_on(async {
            let t = Instant::now();
            big_sock.send(ZmqMessage::from(value.clone())).await.expect("send");
            let r = big_sock.recv().await.expect("recv");
            assert_eq!(r.get(r.len() - 1).map(Bytes::len), Some(1));
            pushes.push(LARGE as f64 / t.elapsed().as_secs_f64() / 1e9);
        });
    }
    let mut json = serde_json::Map::new();
    for (name, meds) in &results {
        let m = median(meds.clone());
        eprintln!("{name}: median round trip {m:.1} µs (rounds: {meds:.0?})");
        json.insert(format!("{name}_us"), serde_json::json!({"median": m, "rounds": meds}));
    }
    let m = median(pushes.clone());
    eprintln!("push_100mb: median {m:.2} GB/s (rounds: {pushes:.2?})");
    json.insert("push_100mb_gb_per_s".into(), serde_json::json!({"median": m, "rounds": pushes}));
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("json");
    println!("{text}");
    if let Some(p) = out {
        std::fs::write(&p, text).expect("write the results");
    }
    for c in [&mut one_child]
        .into_iter()
        .chain(two.iter_mut())
        .chain(three.iter_mut())
        .chain(four.iter_mut())
        .chain(five.iter_mut())
        .chain(big.iter_mut())
    {
        let _ = c.kill();
        let _ = c.wait();
    }
}
