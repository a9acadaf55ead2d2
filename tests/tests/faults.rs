//! Fault injection on a real cluster: packets from peers that know no key. Every port the
//! controller and the compiler listen on gets a ZMTP greeting and one frame header declaring
//! 2^62 bytes (what used to abort the controller), garbage, and a silent connection; the
//! guard closes each, and the cluster goes on serving with its processes and variables intact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rpx_guard::zmtp::{null_greeting, ready_command};
use rpx_protocol::connection::read_json;
use rpx_tests::TestCluster;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(240);

/// A ZMTP 3.0 greeting with the NULL mechanism.
fn greeting() -> Vec<u8> {
    null_greeting().to_vec()
}

/// Send `bytes` to `port` and wait (bounded) until the other side closes the connection.
fn send_until_closed(port: u16, bytes: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("port {port} did not close the connection: {e}"),
        }
    }
}

/// Every port number in a connection file (top-level numbers and arrays of numbers).
fn ports(file: &Value) -> Vec<u16> {
    let mut out = Vec::new();
    for v in file.as_object().expect("a JSON object").values() {
        let items: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        out.extend(items.into_iter().filter_map(Value::as_u64).filter(|p| (1..=65535).contains(p)).map(|p| p as u16));
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn alive(pid: i64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn forged_headers_garbage_and_silence_close_the_connection_and_the_cluster_keeps_serving() {
    let cluster = TestCluster::start(2);
    let mut c = cluster.client();
    let ids = c.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    for out in c.execute(&ids, "let kept = 41u64;", LIMIT).unwrap() {
        assert_eq!(out.status, "ok", "{:#}", out.reply);
    }

    let profile = cluster.profile();
    let mut targets = ports(&read_json::<Value>(&profile.client_file()).unwrap());
    targets.extend(ports(&read_json::<Value>(&profile.engine_file()).unwrap()));
    let compiler = read_json::<Value>(&profile.compiler_file()).unwrap();
    let url = compiler["url"].as_str().unwrap();
    targets.push(url.rsplit(':').next().unwrap().parse().unwrap());
    targets.sort_unstable();
    targets.dedup();
    assert!(targets.len() >= 8, "the controller's and the compiler's ports: {targets:?}");

    let mut forged = greeting();
    forged.push(0x02); // a long frame...
    forged.extend_from_slice(&(1u64 << 62).to_be_bytes()); // ...of 2^62 bytes
    for &port in &targets {
        send_until_closed(port, &forged);
        send_until_closed(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    // Connections that never speak are closed after the handshake time (10 s); all at once.
    let silent: Vec<TcpStream> = targets.iter().map(|&p| TcpStream::connect(("127.0.0.1", p)).unwrap()).collect();
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("a silent connection is closed by the guard");
    }

    let state = cluster.cluster_state().unwrap();
    for key in ["controller_pid", "compiler_pid"] {
        assert!(alive(state[key].as_i64().unwrap()), "{key} died: {state:#}");
    }
    assert_eq!(c.wait_for_engines(2, Duration::from_secs(30)).unwrap(), ids, "engines stay registered");
    // Compiling and running still work, and variables are intact.
    for out in c.execute(&ids, "println!(\"{}\", kept + 1);", LIMIT).unwrap() {
        assert_eq!(out.status, "ok", "{:#}", out.reply);
        assert_eq!(out.stdout.trim(), "42");
    }
}

/// The READY command of a DEALER presenting `identity`, as raw ZMTP.
fn ready_as(identity: &[u8]) -> Vec<u8> {
    ready_command(b"DEALER", identity)
}

#[test]
fn a_peer_presenting_a_live_engines_identity_on_its_mux_port_gets_nothing() {
    use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

    let cluster = TestCluster::start(1);
    let mut c = cluster.client();
    let ids = c.wait_for_engines(1, Duration::from_secs(60)).unwrap();
    let id = ids[0];
    let uuid = c.connection_request().unwrap()[&id].clone();
    let engine_file = read_json::<Value>(&cluster.profile().engine_file()).unwrap();
    let mux = engine_file["mux"].as_u64().unwrap() as u16;
    for out in c.execute(&ids, "let kept = 41u64;", LIMIT).unwrap() {
        assert_eq!(out.status, "ok", "{:#}", out.reply);
    }

    // On raw ZMTP, with a message right behind the READY command: the guard closes the
    // connection (a takeover would have let zeromq route the engine's messages here).
    let raw = [greeting(), ready_as(uuid.as_bytes()), vec![0x00, 6], b"stolen".to_vec()].concat();
    send_until_closed(mux, &raw);

    // A zeromq DEALER with the engine's identity: its connection is closed too. Its handshake
    // may complete on its side before the guard has read its READY; its sends then start
    // failing once it sees the connection closed.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _in_rt = rt.enter();
    let mut o = SocketOptions::default();
    o.peer_identity(uuid.as_bytes().try_into().expect("a uuid is a valid identity"));
    let mut attacker = DealerSocket::with_options(o);
    let url = format!("tcp://127.0.0.1:{mux}");
    rt.block_on(async {
        if tokio::time::timeout(Duration::from_secs(30), attacker.connect(&url)).await.is_ok_and(|r| r.is_ok()) {
            let closed = async {
                while attacker.send(ZmqMessage::from("not an engine reply")).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(30), closed).await.expect("the guard closes the attacker's connection");
        }
    });

    // The real engine still gets what is sent to it, runs it and answers.
    let out = c.execute_one(id, "println!(\"{}\", kept + 1);", LIMIT).unwrap();
    assert_eq!(out.status, "ok", "{:#}", out.reply);
    assert_eq!(out.stdout.trim(), "42");
    assert_eq!(c.wait_for_engines(1, Duration::from_secs(30)).unwrap(), ids, "the engine stays registered");
    // And the attacker got nothing (had it taken the identity over, the request would have
    // been routed to it before the engine could answer).
    let got = rt.block_on(tokio::time::timeout(Duration::from_secs(1), attacker.recv()));
    assert!(!matches!(got, Ok(Ok(_))), "the attacker received {got:?}");
}
