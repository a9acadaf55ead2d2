//! Unit tests of the task store: schema, rows, buffers, lookups and the writer.

use super::*;
use crate::wire::Chan;
use bytes::Bytes;
use serde_json::json;

fn record(id: &str, engine: &str, submitted: &str, bufs: &[&'static [u8]], result_bufs: &[&'static [u8]]) -> Record {
    let mut request = vec![
        Bytes::from_static(b"sig"),
        Bytes::from(format!(r#"{{"msg_id": "{id}", "msg_type": "apply_request"}}"#)),
        Bytes::from_static(b"{}"),
        Bytes::from_static(br#"{"label": "L"}"#),
        Bytes::from_static(b"{ }"),
    ];
    request.extend(bufs.iter().map(|b| Bytes::from_static(b)));
    let mut result = vec![
        Bytes::from_static(b"rsig"),
        Bytes::from(format!(r#"{{"msg_type":"apply_reply","msg_id":"r{id}"}}"#)),
        request[1].clone(),
        Bytes::from_static(br#"{"status":"ok"}"#),
        Bytes::from_static(br#"{"status":  "ok"}"#),
    ];
    result.extend(result_bufs.iter().map(|b| Bytes::from_static(b)));
    let mut io = Map::new();
    io.insert("stdout".into(), json!("out\n"));
    io.insert("execute_result".into(), json!({"data": {"text/plain": "42"}}));
    Record {
        msg_id: id.into(),
        chan: Chan::Task,
        request,
        client: Some(Bytes::from_static(b"\0client\xff")),
        engine_uuid: Some(engine.into()),
        submitted: submitted.into(),
        started: Some("2026-01-01T00:00:01.000000Z".into()),
        completed: Some("2026-01-01T00:00:02.000000Z".into()),
        received: Some("2026-01-01T00:00:03.000000Z".into()),
        result: Some(result),
        resubmitted: None,
        io,
    }
}

/// The stored form drops the signatures (never read back); everything else round-trips.
fn unsigned(mut r: Record) -> Record {
    r.request[0] = Bytes::new();
    if let Some(s) = r.result.as_mut() {
        s[0] = Bytes::new();
    }
    r
}

fn writer(dir: &Path) -> Writer {
    let path = dir.join("tasks.db");
    Writer::new(open(&path, false).unwrap(), path)
}

fn put(w: &mut Writer, r: &Record) {
    w.apply(vec![StoreMsg { op: StoreOp::Put(Box::new(r.clone())), reply: None }]);
}

fn records(a: Answer) -> Vec<Record> {
    match a {
        Answer::Records(r) => r,
        other => panic!("expected records, got {other:?}"),
    }
}

#[test]
fn buffers_round_trip_and_bad_blobs_are_errors() {
    let bufs = vec![Bytes::from_static(b""), Bytes::from_static(b"\0\x01\x02"), Bytes::from(vec![7u8; 100_000])];
    assert_eq!(decode_buffers(encode_buffers(&bufs).as_deref()).unwrap(), bufs);
    assert_eq!(encode_buffers(&[]), None);
    assert_eq!(decode_buffers(None).unwrap(), Vec::<Bytes>::new());
    assert!(decode_buffers(Some(&[1, 2, 3])).is_err());
    assert!(decode_buffers(Some(&[9, 0, 0, 0, 0, 0, 0, 0, 1])).is_err());
    assert!(decode_buffers(Some(&u64::MAX.to_le_bytes())).is_err());
}

#[test]
fn records_round_trip_byte_for_byte_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = record("a", "e0", "2026-01-01T00:00:00.000001Z", &[b"in\0put", b""], &[b"\xffresult", b"2"]);
    let mut b = record("b", "e1", "2026-01-01T00:00:00.000002Z", &[], &[]);
    b.result = None;
    b.client = None;
    b.io.clear();
    {
        let mut w = writer(dir.path());
        put(&mut w, &a);
        put(&mut w, &b);
    }
    let path = dir.path().join("tasks.db");
    let w = Writer::new(open(&path, true).unwrap(), path);
    let got = records(w.query(&Query::Records(vec!["b".into(), "a".into(), "missing".into(), "a".into()])).unwrap());
    assert_eq!(got, vec![unsigned(b), unsigned(a.clone())]);
    assert_eq!(record_json(&got[1]), record_json(&a));
    match w.query(&Query::History).unwrap() {
        Answer::History(h) => assert_eq!(h.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), ["a", "b"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn late_output_resubmission_and_purges_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    let (a, b, c) = (record("a", "e0", "1", &[], &[]), record("b", "e1", "2", &[], &[]), record("c", "e1", "3", &[], &[]));
    for r in [&a, &b, &c] {
        put(&mut w, r);
    }
    let mut late = a.clone();
    late.io.insert("stderr".into(), json!("warn\n"));
    w.apply(vec![
        StoreMsg { op: StoreOp::Io(Box::new(late)), reply: None },
        StoreMsg { op: StoreOp::Resubmitted { msg_id: "a".into(), new_id: "a2".into() }, reply: None },
    ]);
    let got = records(w.query(&Query::Records(vec!["a".into()])).unwrap());
    assert_eq!(got[0].io["stderr"], "warn\n");
    assert_eq!(got[0].io["stdout"], "out\n");
    assert_eq!(got[0].resubmitted.as_deref(), Some("a2"));

    w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::Engine("e1".into())), reply: None }]);
    let ids = |w: &Writer| {
        records(w.query(&Query::Find { query: Map::new(), buffers: false, result_buffers: false }).unwrap())
            .into_iter()
            .map(|r| r.msg_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&w), ["a"]);
    put(&mut w, &b);
    w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::Ids(vec!["a".into(), "zz".into()])), reply: None }]);
    assert_eq!(ids(&w), ["b"]);
    w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::All), reply: None }]);
    assert!(ids(&w).is_empty());
}

#[test]
fn lookups_in_a_batch_see_the_writes_queued_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    let (tx, mut rx) = oneshot::channel();
    let a = record("a", "e0", "1", &[b"x"], &[]);
    w.apply(vec![
        StoreMsg { op: StoreOp::Put(Box::new(a.clone())), reply: None },
        StoreMsg { op: StoreOp::Query { token: 1, query: Query::Records(vec!["a".into()]) }, reply: Some(tx) },
    ]);
    assert_eq!(records(rx.try_recv().unwrap()), vec![unsigned(a)]);
}

#[test]
fn find_supports_the_query_operators_db_query_has() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    for (i, e) in ["e0", "e1", "e0", "e2"].iter().enumerate() {
        put(&mut w, &record(&format!("m{i}"), e, &format!("2026-01-01T00:00:0{i}.000000Z"), &[b"req"], &[b"res"]));
    }
    let find = |q: Value, buffers: bool| -> Vec<Record> {
        let Value::Object(q) = q else { panic!() };
        records(w.query(&Query::Find { query: q, buffers, result_buffers: buffers }).unwrap())
    };
    let ids = |rs: Vec<Record>| rs.into_iter().map(|r| r.msg_id).collect::<Vec<_>>();
    assert_eq!(ids(find(json!({}), false)), ["m0", "m1", "m2", "m3"]);
    assert_eq!(ids(find(json!({"engine_uuid": "e0"}), false)), ["m0", "m2"]);
    assert_eq!(ids(find(json!({"msg_id": {"$in": ["m1", "m3", "nope"]}}), false)), ["m1", "m3"]);
    assert_eq!(ids(find(json!({"msg_id": {"$nin": ["m1", "m3"]}}), false)), ["m0", "m2"]);
    assert_eq!(ids(find(json!({"submitted": {"$gte": "2026-01-01T00:00:01", "$lt": "2026-01-01T00:00:03"}}), false)), ["m1", "m2"]);
    assert_eq!(ids(find(json!({"engine_uuid": {"$ne": "e0"}, "completed": {"$gt": "2000"}}), false)), ["m1", "m3"]);
    // Keys that are not columns are matched on the record dict.
    assert_eq!(ids(find(json!({"header": {"$eq": {"msg_id": "m2", "msg_type": "apply_request"}}}), false)), ["m2"]);
    assert_eq!(ids(find(json!({"stdout": "out\n", "resubmitted": null}), false)).len(), 4);
    assert_eq!(ids(find(json!({"label": "L", "queue": "task"}), false)).len(), 4);
    // Buffers only when asked for.
    let with = find(json!({"msg_id": "m0"}), true);
    assert_eq!(with[0].request[5..], [Bytes::from_static(b"req")]);
    assert_eq!(with[0].result.as_ref().unwrap()[5..], [Bytes::from_static(b"res")]);
    let without = find(json!({"msg_id": "m0"}), false);
    assert_eq!(without[0].request.len(), 5);
    match w
        .query(&Query::Find {
            query: json!({"msg_id": {"$regex": "m"}}).as_object().unwrap().clone(),
            buffers: false,
            result_buffers: false,
        })
        .unwrap()
    {
        Answer::Failed { ename, evalue } => assert!(ename == "ValueError" && evalue.contains("$regex"), "{evalue}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_new_database_sets_the_previous_one_aside_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sec/tasks.db");
    {
        let conn = open(&path, false).unwrap();
        let w = Writer::new(conn, path.clone());
        let mut w = w;
        put(&mut w, &record("old", "e", "1", &[], &[]));
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let w = Writer::new(open(&path, false).unwrap(), path.clone());
    assert!(records(w.query(&Query::Records(vec!["old".into()])).unwrap()).is_empty(), "a fresh start without --restore");
    let prev = PathBuf::from(format!("{}.prev", path.display()));
    let old = Writer::new(open(&prev, true).unwrap(), prev);
    assert_eq!(records(old.query(&Query::Records(vec!["old".into()])).unwrap()).len(), 1, "kept as tasks.db.prev");
}

#[test]
fn corrupt_foreign_and_unwritable_files_are_startup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let e = open(&garbage, true).unwrap_err().to_string();
    assert!(e.contains("garbage.db") && e.contains("not an rpx task database"), "{e}");

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE tasks (x INTEGER); PRAGMA user_version=1;").unwrap();
    let e = open(&foreign, true).unwrap_err().to_string();
    assert!(e.contains("expected"), "{e}");
    let other = dir.path().join("other.db");
    Connection::open(&other).unwrap().execute_batch("PRAGMA user_version=7;").unwrap();
    let e = open(&other, true).unwrap_err().to_string();
    assert!(e.contains("schema version 7"), "{e}");

    // A location that cannot hold a file.
    let e = open(&garbage.join("tasks.db"), false).unwrap_err().to_string();
    assert!(e.contains("cannot create the directory"), "{e}");

    // A directory we cannot write into (root ignores modes: skip the check then).
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    if std::fs::write(ro.join("probe"), b"").is_err() {
        let e = open(&ro.join("tasks.db"), false).unwrap_err().to_string();
        assert!(e.contains("cannot create"), "{e}");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// A write that fails later (here: the file may not grow, as on a full disk) is counted and
/// logged; the writer keeps applying and answering what comes after it.
#[test]
fn a_failed_write_is_counted_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    put(&mut w, &record("small", "e", "1", &[], &[]));
    let pages: i64 = w.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    w.conn.query_row(&format!("PRAGMA max_page_count={pages}"), [], |r| r.get::<_, i64>(0)).unwrap();
    let big: &'static [u8] = Box::leak(vec![9u8; 1 << 20].into_boxed_slice());
    put(&mut w, &record("big", "e", "2", &[big], &[]));
    assert!(w.failed_writes >= 1, "the full database refused the record");
    let (tx, mut rx) = oneshot::channel();
    w.apply(vec![
        StoreMsg { op: StoreOp::Resubmitted { msg_id: "small".into(), new_id: "s2".into() }, reply: None },
        StoreMsg { op: StoreOp::Query { token: 1, query: Query::Records(vec!["small".into(), "big".into()]) }, reply: Some(tx) },
    ]);
    let got = records(rx.try_recv().unwrap());
    assert_eq!(got.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>(), ["small"]);
    assert_eq!(got[0].resubmitted.as_deref(), Some("s2"), "later writes still land");
}

#[tokio::test]
async fn a_stopped_writer_fails_lookups_instead_of_hanging() {
    use futures::StreamExt;
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let (_keep, done) = oneshot::channel();
    let mut h = StoreHandle { tx, done, path: "tasks.db".into(), stuck: false, dropped: 0 };
    let mut lookups = futures::stream::FuturesUnordered::new();
    h.submit(vec![StoreOp::Purge(Purge::All), StoreOp::Query { token: 7, query: Query::History }], &mut lookups).await;
    let (token, answer) = tokio::time::timeout(Duration::from_secs(5), lookups.next()).await.unwrap().unwrap();
    assert_eq!(token, 7);
    assert!(matches!(answer, Answer::Failed { ref ename, .. } if ename == "RuntimeError"), "{answer:?}");
    assert_eq!((h.stuck, h.dropped), (true, 2));
}

#[test]
fn db_kind_parses() {
    assert_eq!("sqlite".parse::<DbKind>(), Ok(DbKind::Sqlite));
    assert_eq!("memory".parse::<DbKind>(), Ok(DbKind::Memory));
    assert!("mongodb".parse::<DbKind>().is_err());
}
