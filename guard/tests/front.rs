//! Guarded zeromq sockets on real TCP: ordinary peers are served as before, peers breaking the
//! limits are cut off before zeromq sees their frames, and the socket keeps serving; the
//! identity of a live connection is not taken over unless the policy allows it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rpx_guard::front::{bind_options, bind_with};
use rpx_guard::zmtp::{null_greeting, ready_command};
use rpx_guard::{Limits, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeromq::{DealerSocket, Endpoint, RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

const WAIT: Duration = Duration::from_secs(20);

/// A guarded ROUTER that echoes every message back to its sender.
async fn echo_router(limits: Limits) -> u16 {
    let mut router = RouterSocket::new();
    let ep = bind_with(&mut router, "tcp://127.0.0.1:0", limits).await.expect("bind");
    tokio::spawn(async move {
        while let Ok(m) = router.recv().await {
            if router.send(m).await.is_err() {
                break;
            }
        }
    });
    match ep {
        Endpoint::Tcp(_, port) => port,
        other => panic!("unexpected endpoint {other}"),
    }
}

async fn round_trip(port: u16, body: Bytes) -> Bytes {
    let mut d = DealerSocket::new();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    d.send(ZmqMessage::from(body)).await.expect("send");
    let reply = tokio::time::timeout(WAIT, d.recv()).await.expect("a reply in time").expect("recv");
    reply.into_vec().pop().expect("one frame")
}

fn greeting() -> Vec<u8> {
    null_greeting().to_vec()
}

/// Send `bytes` on a raw TCP connection and wait for the guard to close it; returns how many
/// bytes the server sent before closing (its greeting and handshake).
async fn sent_until_closed(port: u16, bytes: &[u8]) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect");
    s.write_all(bytes).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await.expect("the guard closes the connection in time").ok();
    got.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_messages_small_and_large_pass_unchanged() {
    let port = echo_router(Limits::default()).await;
    assert_eq!(round_trip(port, Bytes::from_static(b"hello")).await, Bytes::from_static(b"hello"));
    let big: Bytes = (0..8u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    assert_eq!(round_trip(port, big.clone()).await, big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_two_to_the_62_header_is_cut_off_and_the_socket_keeps_serving() {
    let port = echo_router(Limits::default()).await;
    let mut forged = greeting();
    forged.push(0x02);
    forged.extend_from_slice(&(1u64 << 62).to_be_bytes());
    sent_until_closed(port, &forged).await;
    // Had zeromq seen the header, this process would have aborted on the allocation.
    assert_eq!(round_trip(port, Bytes::from_static(b"still here")).await, Bytes::from_static(b"still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_the_limit_are_refused_and_below_it_pass() {
    let limits = Limits::with_max_message(1 << 20).unwrap();
    let port = echo_router(limits).await;
    let mut d = DealerSocket::new();
    let mut events = d.monitor();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    // Two frames of 600 KiB: each under the frame limit, together over the message limit.
    let part = Bytes::from(vec![1u8; 600 << 10]);
    let mut m = ZmqMessage::from(part.clone());
    m.push_back(part);
    d.send(m).await.expect("send");
    // The guard closes the connection instead of passing the message on.
    let closed = async {
        while let Some(ev) = events.next().await {
            if matches!(ev, SocketEvent::Disconnected(_)) {
                return;
            }
        }
    };
    let outcome = tokio::time::timeout(WAIT, async {
        tokio::select! {
            r = d.recv() => panic!("an over-limit message came back: {:?}", r.map(|m| m.len())),
            () = closed => {}
        }
    });
    outcome.await.expect("the guard closes the sender's connection");
    drop(d);
    let fits = Bytes::from(vec![2u8; 1000 << 10]);
    assert_eq!(round_trip(port, fits.clone()).await, fits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_peers_are_closed() {
    let limits = Limits { handshake_timeout: Duration::from_millis(300), ..Limits::default() };
    let port = echo_router(limits).await;
    sent_until_closed(port, b"GET / HTTP/1.1\r\n\r\n").await;
    // Says nothing at all: closed once the handshake time is up.
    sent_until_closed(port, b"").await;
    assert_eq!(round_trip(port, Bytes::from_static(b"ok")).await, Bytes::from_static(b"ok"));
}

/// A guarded ROUTER that echoes every message back to its sender, with its monitor.
async fn monitored_echo_router(options: Options) -> (u16, futures::channel::mpsc::Receiver<SocketEvent>) {
    let mut router = RouterSocket::new();
    let ep = bind_options(&mut router, "tcp://127.0.0.1:0", options).await.expect("bind");
    let events = router.monitor();
    tokio::spawn(async move {
        while let Ok(m) = router.recv().await {
            if router.send(m).await.is_err() {
                break;
            }
        }
    });
    match ep {
        Endpoint::Tcp(_, port) => (port, events),
        other => panic!("unexpected endpoint {other}"),
    }
}

async fn dealer_as(identity: &str, port: u16) -> (DealerSocket, futures::channel::mpsc::Receiver<SocketEvent>) {
    let mut o = SocketOptions::default();
    o.peer_identity(identity.as_bytes().try_into().expect("identity"));
    let mut d = DealerSocket::with_options(o);
    let events = d.monitor();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    (d, events)
}

async fn echo(d: &mut DealerSocket, body: &'static [u8]) {
    d.send(ZmqMessage::from(Bytes::from_static(body))).await.expect("send");
    let reply = tokio::time::timeout(WAIT, d.recv()).await.expect("a reply in time").expect("recv");
    assert_eq!(reply.into_vec(), vec![Bytes::from_static(body)]);
}

/// Wait (bounded) for the first event matching `want`.
async fn wait_for(events: &mut futures::channel::mpsc::Receiver<SocketEvent>, what: &str, want: impl Fn(&SocketEvent) -> bool) {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if want(&ev) {
                return;
            }
        }
        panic!("the monitor ended before {what}");
    });
    found.await.unwrap_or_else(|_| panic!("no {what} in time"));
}

/// The READY command a DEALER presenting `identity` sends, as raw ZMTP.
fn ready_as(identity: &[u8]) -> Vec<u8> {
    ready_command(b"DEALER", identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_identity_is_not_taken_over_and_is_free_once_its_connection_ends() {
    let (port, mut router_events) = monitored_echo_router(Options::new(Limits::default())).await;
    let (mut first, _first_events) = dealer_as("engine-1", port).await;
    echo(&mut first, b"first").await;

    // A raw peer presenting the same identity, with a message right behind its READY: closed,
    // and nothing of it reaches the router (else the router would echo "stolen" to whoever
    // holds engine-1).
    let raw = [greeting(), ready_as(b"engine-1"), vec![0x00, 6], b"stolen".to_vec()].concat();
    sent_until_closed(port, &raw).await;

    // A zeromq DEALER presenting it: the guard closes its connection.
    let mut o = SocketOptions::default();
    o.peer_identity(b"engine-1".as_slice().try_into().expect("identity"));
    let mut second = DealerSocket::with_options(o);
    if second.connect(&format!("tcp://127.0.0.1:{port}")).await.is_ok() {
        // Its handshake may complete on its side before the guard reads its READY; it then
        // finds its connection closed (a DEALER's monitor does not report that: its sends
        // start failing).
        let closed = async {
            while second.send(ZmqMessage::from(Bytes::from_static(b"from second"))).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(WAIT, closed).await.expect("the second connection is closed in time");
    }

    // The first connection still gets what is routed to engine-1, and only it.
    echo(&mut first, b"still mine").await;
    echo(&mut first, b"and again").await;
    assert!(tokio::time::timeout(Duration::from_millis(200), second.recv()).await.is_err(), "the refused DEALER received something");
    drop(second);

    // Once the first connection has ended (its disconnection is what the router reports, after
    // the guard released the identity), the identity is free.
    drop(first);
    wait_for(&mut router_events, "engine-1 disconnected", |ev| matches!(ev, SocketEvent::Disconnected(id) if id.as_ref() == b"engine-1"))
        .await;
    let (mut again, _) = dealer_as("engine-1", port).await;
    echo(&mut again, b"back").await;
    // Other identities (and empty ones) were never affected.
    let (mut other, _) = dealer_as("engine-2", port).await;
    echo(&mut other, b"other").await;
    assert_eq!(round_trip(port, Bytes::from_static(b"anonymous")).await, Bytes::from_static(b"anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_can_let_a_live_identity_be_taken_over() {
    let options = Options { limits: Limits::default(), takeover: Arc::new(|id: &[u8]| id == b"evicted") };
    let (port, _router_events) = monitored_echo_router(options).await;
    // The old holder, on raw ZMTP: it sends one message and reads until its echo is back, so it
    // holds the identity.
    let mut old = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect");
    old.write_all(&[greeting(), ready_as(b"evicted"), vec![0x00, 10], b"old-holder".to_vec()].concat()).await.expect("write");
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !seen.windows(10).any(|w| w == b"old-holder") {
            let mut buf = [0u8; 1024];
            let n = old.read(&mut buf).await.expect("read");
            assert!(n > 0, "the old holder was closed before its echo");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the old holder's echo in time");

    let (mut new, _) = dealer_as("evicted", port).await;
    echo(&mut new, b"new").await;
    // zeromq dropped the replaced connection, and the guard closed it.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, old.read_to_end(&mut rest)).await.expect("the old holder is closed in time").ok();
    assert!(!rest.windows(3).any(|w| w == b"new"), "the old holder received the new one's message");
    echo(&mut new, b"new again").await;

    // The policy is per identity: a live "alive" is still not taken over.
    let (mut alive, _) = dealer_as("alive", port).await;
    echo(&mut alive, b"alive").await;
    let raw = [greeting(), ready_as(b"alive"), vec![0x00, 6], b"stolen".to_vec()].concat();
    sent_until_closed(port, &raw).await;
    echo(&mut alive, b"alive still").await;
}
