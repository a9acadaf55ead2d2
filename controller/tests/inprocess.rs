//! The controller in-process on loopback with real zeromq sockets: a fake engine (DEALERs with
//! identity = uuid) registers, a client DEALER sends requests via mux and task, replies come back
//! with the right identity frames, bad signatures are dropped, and a dead engine's in-flight
//! request fails with EngineError.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::oneshot;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

use rpx_controller::config::Config;
use rpx_protocol::{Message, Profile, Session};

const WAIT: Duration = Duration::from_secs(20);

async fn dealer(url: &str, identity: Option<&str>) -> DealerSocket {
    let mut opts = SocketOptions::default();
    if let Some(id) = identity {
        opts.peer_identity(id.as_bytes().to_vec().try_into().unwrap());
    }
    let mut s = DealerSocket::with_options(opts);
    s.connect(url).await.unwrap();
    s
}

async fn recv(s: &mut DealerSocket, session: &Session) -> Message {
    let m = tokio::time::timeout(WAIT, s.recv()).await.expect("a message in time").unwrap();
    session.decode(m.into_vec()).unwrap()
}

async fn send(s: &mut DealerSocket, frames: Vec<Bytes>) {
    tokio::time::timeout(WAIT, s.send(rpx_guard::zmq::message(frames))).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_engine_and_client_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let profile = Profile { name: "t".into(), dir: dir.path().to_path_buf(), cluster_id: String::new() };
    let config = Config::for_tests(profile);
    let key = config.key.clone();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let ctrl = tokio::spawn(rpx_controller::run_with_ready(
        config,
        async {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let ready = ready_rx.await.unwrap();
    let (c, e) = (&ready.client, &ready.engine);

    // The engine registers.
    let uuid = "0f0f0f0f-fake-engine";
    let eng = Session::with_id(key.as_bytes(), "engine", uuid);
    let mut reg = dealer(&e.url(e.registration), Some(uuid)).await;
    send(&mut reg, eng.msg(&[], "registration_request", json!({"uuid": uuid}), None, json!({}), &[]).1).await;
    let reply = recv(&mut reg, &eng).await;
    assert_eq!(reply.header.msg_type, "registration_reply");
    assert_eq!(reply.content["status"], "ok");
    assert_eq!(reply.content["id"], 0);
    let mut emux = dealer(&e.url(e.mux), Some(uuid)).await;
    let mut etask = dealer(&e.url(e.task), Some(uuid)).await;

    // The client sees it.
    let cli = Session::new(key.as_bytes(), "client");
    let mut query = dealer(&c.url(c.registration), None).await;
    loop {
        send(&mut query, cli.msg(&[], "connection_request", json!({}), None, json!({}), &[]).1).await;
        let r = recv(&mut query, &cli).await;
        if r.content["engines"]["0"] == uuid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // mux: a bad signature is dropped, the next good message goes through.
    let mut cmux = dealer(&c.url(c.mux), None).await;
    let mut bad = cli.msg(&[Bytes::from(uuid)], "execute_request", json!({"code": "bad"}), None, json!({}), &[]).1;
    bad[2] = Bytes::from_static(b"0000");
    send(&mut cmux, bad).await;
    let (h, good) = cli.msg(&[Bytes::from(uuid)], "execute_request", json!({"code": "1+1"}), None, json!({}), &[]);
    send(&mut cmux, good).await;
    let got = recv(&mut emux, &eng).await;
    assert_eq!(got.header.msg_id, h.msg_id, "the bad message was dropped");
    assert_eq!(got.idents.len(), 1, "engine gets [client_id, DELIM, ...]");
    let client_id = got.idents[0].clone();
    send(
        &mut emux,
        eng.msg(
            std::slice::from_ref(&client_id),
            "execute_reply",
            json!({"status": "ok", "execution_count": 1}),
            Some(&got.header),
            json!({"engine": uuid, "status": "ok"}),
            &[],
        )
        .1,
    )
    .await;
    let back = recv(&mut cmux, &cli).await;
    assert_eq!(back.idents, vec![Bytes::from(uuid)], "client gets [engine_uuid, DELIM, ...]");
    assert_eq!(back.parent_msg_id(), Some(h.msg_id.as_str()));

    // task: load-balanced to the only engine.
    let mut ctask = dealer(&c.url(c.task), None).await;
    let (th, f) = cli.msg(&[], "apply_request", json!({}), None, json!({"targets": [], "retries": 0}), &[Bytes::from_static(b"payload")]);
    send(&mut ctask, f).await;
    let got = recv(&mut etask, &eng).await;
    assert_eq!(got.header.msg_id, th.msg_id);
    assert_eq!(got.buffers, vec![Bytes::from_static(b"payload")]);
    send(
        &mut etask,
        eng.msg(
            &got.idents,
            "apply_reply",
            json!({"status": "ok"}),
            Some(&got.header),
            json!({"engine": uuid, "status": "ok"}),
            &[Bytes::from_static(b"result")],
        )
        .1,
    )
    .await;
    let back = recv(&mut ctask, &cli).await;
    assert_eq!(back.parent_msg_id(), Some(th.msg_id.as_str()));
    assert_eq!(back.buffers, vec![Bytes::from_static(b"result")]);

    // queue_status sees one completed task and one completed mux request.
    send(&mut query, cli.msg(&[], "queue_request", json!({"targets": null, "verbose": false}), None, json!({}), &[]).1).await;
    let q = recv(&mut query, &cli).await;
    assert_eq!(q.content["0"], json!({"queue": 0, "completed": 2, "tasks": 0}));

    // The engine dies with a task in flight: the client gets EngineError.
    let (th, f) = cli.msg(&[], "apply_request", json!({}), None, json!({}), &[]);
    send(&mut ctask, f).await;
    let got = recv(&mut etask, &eng).await;
    assert_eq!(got.header.msg_id, th.msg_id);
    drop((emux, etask, reg));
    let back = recv(&mut ctask, &cli).await;
    assert_eq!(back.parent_msg_id(), Some(th.msg_id.as_str()));
    assert_eq!(back.content["ename"], "EngineError");
    assert_eq!(back.content["evalue"], format!("Engine 0 died while running task {}", th.msg_id));
    assert_eq!(back.metadata["engine"], uuid);

    // The hub answers shutdown and the controller exits.
    send(&mut query, cli.msg(&[], "shutdown_request", json!({}), None, json!({}), &[]).1).await;
    let r = recv(&mut query, &cli).await;
    assert_eq!(r.header.msg_type, "shutdown_reply");
    tokio::time::timeout(WAIT, ctrl).await.expect("controller exits after shutdown").unwrap().unwrap();
    drop(stop_tx);
}
