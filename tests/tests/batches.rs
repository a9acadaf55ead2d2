//! rpx batches from a client on the controller's task socket, on a real cluster: a batch of
//! load-balanced requests becomes that many tasks, each answered on its own (the replies may
//! come back batched, each still its own signed reply); a malformed batch
//! is refused whole (the controller says why in its log, none of its messages becomes a task)
//! and the controller goes on serving.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use rpx_protocol::batch::{self, BatchContent};
use rpx_protocol::connection::read_json;
use rpx_protocol::session::json_frame;
use rpx_protocol::{ClientConnection, Session};
use rpx_tests::TestCluster;
use serde_json::json;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend};

/// A load-balanced `apply_request` whose payload no engine runs (not an rpx one): each engine
/// answers it with its own error reply, which is all this test needs from it.
fn request(session: &Session) -> (String, Vec<Bytes>) {
    let (h, frames) = session.msg(&[], "apply_request", json!({}), None, json!({}), &[]);
    (h.msg_id, frames)
}

/// The replies' parent msg_ids, until `want` of them are in (a client that sent a batch may
/// get its replies in batches too).
async fn replies(s: &mut DealerSocket, session: &Session, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < want {
        let m = tokio::time::timeout(Duration::from_secs(60), s.recv()).await.expect("a reply within a minute").unwrap();
        let frames = m.into_vec();
        let messages = if batch::is_batch(&frames) { batch::decode(session, frames).expect("a valid batch") } else { vec![frames] };
        for frames in messages {
            let m = session.decode(frames).expect("a signed reply");
            assert_eq!(m.msg_type(), "apply_reply");
            got.push(m.parent_msg_id().expect("a parent").to_string());
        }
    }
    got
}

#[test]
fn a_clients_batch_becomes_separate_tasks_and_a_malformed_one_is_refused() {
    let cluster = TestCluster::start_with(2, &["--no-restart"]);
    let mut client = cluster.client();
    client.wait_for_engines(2, Duration::from_secs(60)).expect("2 engines");
    let conn: ClientConnection = read_json(&cluster.client_file()).unwrap();
    let session = Session::new(conn.key.as_bytes(), "batcher");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (sent, malformed_ids) = rt.block_on(async {
        let mut s = DealerSocket::new();
        s.connect(&conn.url(conn.task)).await.unwrap();

        // A batch of 8 requests: 8 tasks, 8 replies, each to its own request.
        let reqs: Vec<(String, Vec<Bytes>)> = (0..8).map(|_| request(&session)).collect();
        let ids: HashSet<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
        let frames = batch::encode(&session, vec![], reqs.into_iter().map(|(_, f)| f).collect());
        s.send(rpx_guard::zmq::message(frames)).await.unwrap();
        let got = replies(&mut s, &session, 8).await;
        assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), ids, "one reply per batched request");

        // A signed batch whose frame counts do not match what it carries: refused whole.
        let bad: Vec<(String, Vec<Bytes>)> = (0..2).map(|_| request(&session)).collect();
        let malformed_ids: Vec<String> = bad.iter().map(|(id, _)| id.clone()).collect();
        let parts = vec![bad[0].1.len() as u32, bad[1].1.len() as u32 + 1];
        let frames = session.frames(
            [Bytes::from_static(batch::MARKER)],
            json_frame(&session.header(batch::MSG_TYPE)),
            Bytes::from_static(b"{}"),
            Bytes::from_static(b"{}"),
            json_frame(&BatchContent { parts }),
            bad.into_iter().flat_map(|(_, f)| f),
        );
        s.send(rpx_guard::zmq::message(frames)).await.unwrap();

        // The controller reads in order: once a request sent after it is answered, the
        // malformed batch was handled.
        let (after, frames) = request(&session);
        s.send(rpx_guard::zmq::message(frames)).await.unwrap();
        assert_eq!(replies(&mut s, &session, 1).await, vec![after.clone()], "the controller serves after a malformed batch");
        (ids.into_iter().chain([after]).collect::<Vec<_>>(), malformed_ids)
    });

    let history = client.query("history_request", json!({}), Duration::from_secs(10)).unwrap();
    let history: Vec<String> = serde_json::from_value(history.content["history"].clone()).unwrap();
    for id in &sent {
        assert!(history.contains(id), "task {id} is recorded");
    }
    for id in &malformed_ids {
        assert!(!history.contains(id), "a message of the refused batch became a task: {id}");
    }
    let log_dir = cluster.profile().log_dir();
    let logs: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("controller"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("refused a malformed batch") && logs.contains("a batch announces 13 frames and carries 12"),
        "the controller's log says why it refused the batch:\n{logs}"
    );
    let stop = cluster.ipcluster(&["stop"]);
    assert!(stop.status.success(), "{}", rpx_tests::show(&stop));
}
