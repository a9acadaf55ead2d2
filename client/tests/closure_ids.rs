//! A closure's source crosses the wire until the client has seen it compile; after that, calls
//! name it by its id. An engine that joins later runs it by id (the compiler resolves the id);
//! after the compiler restarts, knowing no ids, a call by id that reaches an engine without the
//! closure is sent again with the source, and nothing is lost. Read from the requests as the
//! controller recorded them (`db_request`, ipyparallel's `db_query`), which is where a user
//! would look.

mod common;

use std::time::{Duration, Instant};

use common::{client, serial, TestCluster};
use rpx_tests::poll;
use serde_json::{json, Value};

const SOURCE: &str = "|x: u64| x * 3";

/// The recorded requests and results of these tasks, by msg_id, in submission order.
fn records(hub: &mut rpx_tests::Client, msg_ids: &[String]) -> Vec<Value> {
    let m = hub
        .query(
            "db_request",
            json!({"query": {"msg_id": {"$in": msg_ids}}, "keys": ["content", "result_content", "engine_uuid"]}),
            Duration::from_secs(10),
        )
        .expect("db_request");
    let records = m.content["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), msg_ids.len(), "one record per task: {:#}", m.content);
    records
}

/// How a recorded request named its closure: `Some(id)` by id alone, `None` with its source.
fn by_id(record: &Value) -> Option<String> {
    let closure = &record["content"]["rpx"]["closure"];
    match closure["code"]["source"].as_str() {
        Some(source) => {
            assert_eq!(source, SOURCE, "{record:#}");
            None
        }
        None => {
            assert_eq!(closure.as_object().map(|o| o.len()), Some(1), "an id and nothing else: {record:#}");
            Some(closure["id"].as_str().expect("an id").to_string())
        }
    }
}

#[test]
fn closures_go_by_id_after_their_first_use_and_survive_a_compiler_restart() {
    let _serial = serial();
    let cluster = TestCluster::start(2);
    let c = client(&cluster);
    let mut hub = cluster.client();
    let view = c.view().chunksize(1);
    let triple = rpx::remote!(|x: u64| x * 3);
    let want = |n: u64| (0..n).map(|x| x * 3).collect::<Vec<u64>>();

    // The first map sends the source with every task (none has been answered when they go).
    let first = view.map_async(triple, 0..8u64).unwrap();
    let first_ids = first.msg_ids();
    assert_eq!(first.get().unwrap(), want(8));
    let sent = records(&mut hub, &first_ids);
    assert!(sent.iter().all(|r| by_id(r).is_none()), "the first map carries the source");

    // After it, a map sends ids only, and an apply too.
    let second = view.map_async(triple, 0..16u64).unwrap();
    let second_ids = second.msg_ids();
    assert_eq!(second.get().unwrap(), want(16));
    let sent = records(&mut hub, &second_ids);
    let id = by_id(&sent[0]).expect("named by id");
    assert!(sent.iter().all(|r| by_id(r).as_deref() == Some(id.as_str())), "every task by the same id");
    let engines: std::collections::BTreeSet<&str> = sent.iter().filter_map(|r| r["engine_uuid"].as_str()).collect();
    assert_eq!(engines.len(), 2, "both engines ran it by id: {sent:#?}");
    let ar = c.direct_view(..).apply_async(triple, (7u64,)).unwrap();
    let apply_ids = ar.msg_ids();
    assert_eq!(ar.get().unwrap(), vec![21, 21]);
    assert!(records(&mut hub, &apply_ids).iter().all(|r| by_id(r).is_some()), "direct calls too");

    // An engine that joins now never saw the closure: the compiler resolves the id for it.
    let out = cluster.ipcluster(&["engines", "-n", "1", "--timeout", "120"]);
    assert!(out.status.success(), "{}", rpx_tests::show(&out));
    c.wait_for_engines(3, Duration::from_secs(60)).unwrap();
    let ar = c.direct_view(2).apply_async(triple, (5u64,)).unwrap();
    let ids = ar.msg_ids();
    assert_eq!(ar.get().unwrap(), vec![15]);
    assert_eq!(by_id(&records(&mut hub, &ids)[0]).as_deref(), Some(id.as_str()), "the new engine ran it by id");

    // The compiler is killed and the supervisor starts a new one, which knows no ids.
    let compiler_file = cluster.profile().compiler_file();
    let state = |cl: &TestCluster| cl.cluster_state().expect("cluster file");
    let old = state(&cluster)["compiler_pid"].as_u64().unwrap() as u32;
    common::kill(old);
    let new = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        state(&cluster)["compiler_pid"].as_u64().map(|p| p as u32).filter(|p| *p != old)
    })
    .expect("the supervisor starts a new compiler");
    poll(Duration::from_secs(60), Duration::from_millis(50), || {
        rpx_protocol::connection::read_json::<rpx_protocol::connection::CompilerConnection>(&compiler_file).ok().filter(|f| f.pid == new)
    })
    .expect("the new compiler writes its connection file");

    // Engines that ran the closure still run it by id.
    let ar = c.direct_view(..).apply_async(triple, (2u64,)).unwrap();
    let ids = ar.msg_ids();
    assert_eq!(ar.get().unwrap(), vec![6, 6, 6]);
    assert!(records(&mut hub, &ids).iter().all(|r| by_id(r).is_some()));

    // A new engine does not have it and the compiler no longer knows the id: each call that
    // reaches the engine by id before one with the source is sent again with the source, and
    // every caller gets its result. (The requests that were sent again are in the hub's
    // history, not among the map's tasks.)
    let out = cluster.ipcluster(&["engines", "-n", "1", "--timeout", "120"]);
    assert!(out.status.success(), "{}", rpx_tests::show(&out));
    c.wait_for_engines(4, Duration::from_secs(60)).unwrap();
    let before: std::collections::HashSet<String> = c.hub_history().unwrap().into_iter().collect();
    let t0 = Instant::now();
    let burst = view.targets(3).map_async(triple, 0..10u64).unwrap();
    assert_eq!(burst.get().unwrap(), want(10), "after {:.1?}", t0.elapsed());
    let answered = burst.msg_ids();
    let sent: Vec<String> = c.hub_history().unwrap().into_iter().filter(|m| !before.contains(m)).collect();
    let declined: Vec<String> = sent.iter().filter(|m| !answered.contains(m)).cloned().collect();
    assert!(!declined.is_empty(), "the first call by id cannot have been resolved");
    assert_eq!(sent.len(), answered.len() + declined.len(), "nothing else was sent");
    for r in records(&mut hub, &declined) {
        assert_eq!(by_id(&r).as_deref(), Some(id.as_str()));
        assert_eq!(r["result_content"]["ename"], "UnknownClosure", "{r:#}");
        let evalue = r["result_content"]["evalue"].as_str().unwrap_or_default();
        assert!(evalue.contains(&format!("does not know closure {id}")), "{r:#}");
    }
    let answers = records(&mut hub, &answered);
    assert!(answers.iter().all(|r| r["result_content"]["status"] == "ok"), "{answers:#?}");
    assert!(answers.iter().any(|r| by_id(r).is_none()), "one went again with the source");
    eprintln!("{} of 10 calls sent again with the source, {:.1?}", declined.len(), t0.elapsed());

    // From then on, by id again, on every engine and load-balanced.
    let last = view.map_async(triple, 0..20u64).unwrap();
    let last_ids = last.msg_ids();
    assert_eq!(last.get().unwrap(), want(20));
    assert!(records(&mut hub, &last_ids).iter().all(|r| by_id(r).as_deref() == Some(id.as_str())));
    let ar = c.direct_view(..).apply_async(triple, (1u64,)).unwrap();
    let ids = ar.msg_ids();
    assert_eq!(ar.get().unwrap(), vec![3; 4]);
    assert!(records(&mut hub, &ids).iter().all(|r| by_id(r).is_some()));
}
