//! Guarded zeromq sockets on real TCP: ordinary peers are served as before, peers breaking the
//! limits are cut off before zeromq sees their frames, and the socket keeps serving.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use rpx_guard::front::bind_with;
use rpx_guard::zmtp::null_greeting;
use rpx_guard::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeromq::{DealerSocket, Endpoint, RouterSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

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
