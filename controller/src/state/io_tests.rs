//! Unit tests of how a task record keeps the output published for it (`add_io`).

use super::*;
use serde_json::json;

#[test]
fn records_collect_stream_output_and_results() {
    let mut r = Record::submitted("m", Chan::Mux, &[], &Bytes::from_static(b"client"));
    r.add_io("stream", &json!({"name": "stdout", "text": "a\n"}));
    r.add_io("stream", &json!({"name": "stdout", "text": "b\n"}));
    r.add_io("stream", &json!({"name": "stderr", "text": "e\n"}));
    r.add_io("execute_result", &json!({"data": {"text/plain": "42"}}));
    r.add_io("status", &json!({"execution_state": "idle"}));
    assert_eq!(r.io["stdout"], "a\nb\n");
    assert_eq!(r.io["stderr"], "e\n");
    assert_eq!(r.io["execute_result"]["data"]["text/plain"], "42");
    assert!(!r.io.contains_key("status"));
}

#[test]
fn the_done_log_keeps_the_last_outcomes_and_shares_engine_uuids() {
    let mut log = DoneLog::new(3);
    log.insert("a", true, "engine-1");
    log.insert("b", false, "engine-1");
    log.insert("a", false, "engine-2");
    assert_eq!(log.get("a"), Some(&Done { success: true, engine: "engine-1".into() }), "the first outcome counts");
    assert!(Arc::ptr_eq(&log.get("a").unwrap().engine, &log.get("b").unwrap().engine), "one uuid for both");
    log.insert("c", true, "engine-2");
    log.insert("d", true, "engine-2");
    assert_eq!(log.len(), 3);
    assert!(!log.contains("a"), "the oldest went");
    assert!(log.contains("b") && log.contains("c") && log.contains("d"));
    assert!(!log.contains("e"));
}

#[test]
fn the_done_log_forgets_uuids_no_outcome_refers_to() {
    let mut log = DoneLog::new(1);
    for i in 0..2000 {
        log.insert(&format!("task-{i}"), true, &format!("engine-{i}"));
    }
    assert!(log.engines.len() <= 1024, "{}", log.engines.len());
    assert_eq!(log.get("task-1999").map(|d| &*d.engine), Some("engine-1999"));
}

#[test]
fn a_record_keeps_at_most_a_mebibyte_of_each_stream_and_says_where_it_was_cut() {
    let mut r = Record::submitted("m", Chan::Task, &[], &Bytes::from_static(b"c"));
    let line = "é".repeat(1000) + "\n"; // 2001 bytes, two-byte chars
    for _ in 0..1000 {
        r.add_io("stream", &serde_json::json!({"name": "stdout", "text": line}));
    }
    r.add_io("stream", &serde_json::json!({"name": "stderr", "text": "e\n"}));
    let out = r.io["stdout"].as_str().unwrap();
    assert!(out.len() <= RECORD_STREAM_LIMIT + RECORD_STREAM_CUT.len(), "{}", out.len());
    assert!(out.ends_with(RECORD_STREAM_CUT) && out.starts_with(&line));
    assert_eq!(out.matches("[rpx: output beyond").count(), 1);
    assert_eq!(r.io["stderr"], "e\n");
    assert_eq!(r.bytes(), out.len() + 2);
}

#[test]
fn output_counts_toward_the_record_byte_limit() {
    let mut recs = Records::new(100, 4096);
    recs.insert(Record::submitted("a", Chan::Task, &[], &Bytes::from_static(b"c")));
    assert!(recs.update("a", |r| {
        r.add_io("stream", &serde_json::json!({"name": "stdout", "text": "x".repeat(3000)}));
        r.result = Some(vec![]);
    }));
    recs.insert(Record::submitted("b", Chan::Task, &[], &Bytes::from_static(b"c")));
    assert!(recs.update("b", |r| {
        r.add_io("stream", &serde_json::json!({"name": "stdout", "text": "y".repeat(3000)}));
        r.result = Some(vec![]);
    }));
    assert!(recs.get("a").is_none(), "the oldest finished record went to stay under 4096 bytes");
    assert_eq!(recs.bytes, 3000);
}
