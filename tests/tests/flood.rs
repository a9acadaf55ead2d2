//! A flood of client requests, more than the controller can answer as they come, on a real
//! cluster: the hub's clock keeps its priority (pings go out, pongs are counted), so no live
//! engine is evicted, and the cluster serves when the flood ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rpx_protocol::connection::read_json;
use rpx_protocol::{ClientConnection, Session};
use rpx_tests::TestCluster;
use serde_json::json;
use tokio::sync::Semaphore;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket};

/// Heartbeat periods the flood lasts (an engine is evicted after 3.5 periods without a pong).
const PERIODS: u64 = 8;
/// Requests each of the 6 flooders keeps unanswered.
const WINDOW: usize = 2000;

#[test]
fn a_flood_of_requests_evicts_no_engine_and_the_cluster_serves_after_it() {
    let cluster = TestCluster::start_with(2, &["--no-restart"]);
    let mut client = cluster.client();
    let before = client.wait_for_engines(2, Duration::from_secs(60)).expect("2 engines");
    let engines = client.connection_request().unwrap();
    let conn: ClientConnection = read_json(&cluster.client_file()).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (answered, notices) = rt.block_on(async {
        let mut notes = SubSocket::new();
        notes.connect(&conn.url(conn.notification)).await.unwrap();
        notes.subscribe("").await.unwrap();
        let flooding = Arc::new(AtomicBool::new(true));
        let mut flooders = Vec::new();
        for _ in 0..6 {
            let mut s = DealerSocket::new();
            s.connect(&conn.url(conn.registration)).await.unwrap();
            let (mut tx, mut rx) = s.split();
            let session = Session::new(conn.key.as_bytes(), "flooder");
            // Each flooder keeps WINDOW requests unanswered: always more queued at the hub than
            // it handles in one turn, and a backlog it clears quickly once the flood stops.
            let window = Arc::new(Semaphore::new(WINDOW));
            let credit = window.clone();
            let reader = tokio::spawn(async move {
                let mut n = 0usize;
                while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                    credit.add_permits(1);
                    n += 1;
                }
                n
            });
            let flooding = flooding.clone();
            flooders.push(tokio::spawn(async move {
                while flooding.load(Ordering::SeqCst) {
                    window.acquire().await.unwrap().forget();
                    let frames = session.msg(&[], "queue_request", json!({"targets": null, "verbose": false}), None, json!({}), &[]).1;
                    if tx.send(rpx_guard::zmq::message(frames)).await.is_err() {
                        break;
                    }
                }
                reader.await.unwrap()
            }));
        }
        // The default heartbeat period is 1 s.
        tokio::time::sleep(Duration::from_secs(PERIODS)).await;
        flooding.store(false, Ordering::SeqCst);
        let mut answered = 0;
        for f in flooders {
            answered += f.await.unwrap();
        }
        // Everything the controller published meanwhile is queued on our subscription.
        let mut notices = Vec::new();
        while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), notes.recv()).await {
            notices.push(m);
        }
        (answered, notices)
    });
    eprintln!("{answered} flood requests answered in {PERIODS} s");
    assert!(answered > 0, "the flood was answered");
    let session = Session::new(conn.key.as_bytes(), "reader");
    let kinds: Vec<String> = notices.into_iter().filter_map(|m| session.decode(m.into_vec()).ok()).map(|m| m.header.msg_type).collect();
    assert!(!kinds.iter().any(|k| k == "unregistration_notification"), "no engine was evicted during the flood: {kinds:?}");
    assert_eq!(client.connection_request().unwrap(), engines, "the same engines, with the same uuids");
    let out = client.execute(&before, "let x = 1 + 1; println!(\"{x}\");", Duration::from_secs(120)).expect("cells run after the flood");
    for o in &out {
        assert_eq!(o.stdout.trim(), "2", "{o:?}");
    }
    let stop = cluster.ipcluster(&["stop"]);
    assert!(stop.status.success(), "{}", rpx_tests::show(&stop));
}
