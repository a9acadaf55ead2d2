//! Unit tests of the hub's records and engine state.

use super::*;

fn record(id: &str) -> Record {
    Record::submitted(id, Chan::Task, &[Bytes::from_static(b"req")], &Bytes::from_static(b"client"))
}

fn finish(r: &mut Records, id: &str) {
    assert!(r.update(id, |rec| rec.result = Some(vec![Bytes::from_static(b"reply")])));
}

#[test]
fn pending_records_are_kept_and_the_oldest_finished_go_first() {
    let mut r = Records::new(3, usize::MAX);
    for id in ["a", "b", "c", "d", "e"] {
        r.insert(record(id));
    }
    // Five pending records over a limit of three: none may go.
    assert_eq!(r.map.len(), 5);
    finish(&mut r, "d");
    finish(&mut r, "b");
    assert!(!r.map.contains_key("d") && !r.map.contains_key("b"), "the two finished records were dropped, oldest finished first");
    finish(&mut r, "a");
    assert_eq!(r.map.len(), 3);
    assert!(r.map.contains_key("a"));
    r.insert(record("f"));
    assert!(!r.map.contains_key("a"), "a finished record makes room for a new one");
    assert_eq!(r.history(), vec!["c", "e", "f"]);
}

/// Regression: culling used to rotate pending records to the back of the submission order,
/// so `history_request` listed tasks out of order once more than the limit were pending.
#[test]
fn history_keeps_submission_order_with_many_pending() {
    let mut r = Records::new(2, usize::MAX);
    let ids: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    for id in &ids {
        r.insert(record(id));
    }
    assert_eq!(r.history(), ids);
}

#[test]
fn ids_are_never_reused_unless_requested_after_their_engine_died() {
    let mut e = Engines::default();
    let now = Instant::now();
    // As the hub does: allocate, then register under the id.
    let register = |e: &mut Engines, requested: Option<u64>| {
        let id = e.allocate_id(requested, &format!("uuid-{requested:?}"));
        e.insert(Engine::new(id, &format!("uuid-{id}-{requested:?}"), now));
        id
    };
    assert_eq!(register(&mut e, None), 0);
    assert_eq!(register(&mut e, None), 1);
    assert_eq!(register(&mut e, Some(5)), 5);
    assert_eq!(register(&mut e, Some(5)), 6, "held by a registered engine");
    assert_eq!(register(&mut e, Some(1)), 7);
    assert_eq!(register(&mut e, Some(3)), 3);
    assert_eq!(register(&mut e, None), 8);
    // Engine 1 dies: a restarted engine asking for 1 gets it back; nobody else does.
    e.remove(1);
    assert_eq!(register(&mut e, None), 9, "unrequested ids are never reused");
    assert_eq!(register(&mut e, Some(1)), 1);
}

#[test]
fn an_engine_gets_its_old_id_back_when_no_live_engine_holds_it() {
    let mut e = Engines::default();
    assert_eq!(e.allocate_id(None, "a"), 0);
    // Engine "a" is gone (evicted): asking again for 0 under its own uuid gives 0 back.
    assert_eq!(e.allocate_id(Some(0), "a"), 0);
    // An id held by a live engine is not given out, even to the uuid that held it.
    e.insert(Engine::new(0, "a", Instant::now()));
    assert_eq!(e.allocate_id(Some(0), "a"), 1);
    // A restarted controller has no history: the id asked for is free and never used.
    let mut fresh = Engines::default();
    assert_eq!(fresh.allocate_id(Some(4), "a"), 4);
    assert_eq!(fresh.allocate_id(None, "z"), 5);
}

fn evicted(id: u64) -> Evicted {
    let notice = rpx_protocol::registration::EvictionNotice {
        id,
        uuid: format!("u{id}"),
        registration: "r".into(),
        reason: "missed heartbeats".into(),
        answered: vec![],
        reconnect: false,
    };
    Evicted { notice_to: Bytes::from(format!("reg{id}")), notice, last_sent: None }
}

#[test]
fn an_evicted_engine_is_told_when_heard_from_at_most_once_per_period() {
    let t0 = Instant::now();
    let mut ev = Evictions::new(8, std::time::Duration::from_secs(1));
    assert!(ev.heard("u1", t0).is_none(), "never evicted: nothing to tell");
    ev.insert("u1", evicted(1));
    let (to, notice) = ev.heard("u1", t0).expect("told at once");
    assert_eq!((to.as_ref(), notice.id), (&b"reg1"[..], 1));
    assert!(ev.heard("u1", t0 + std::time::Duration::from_millis(500)).is_none(), "not again within the period");
    assert!(ev.heard("u1", t0 + std::time::Duration::from_secs(1)).is_some(), "again after it");
    ev.forget("u1");
    assert!(ev.heard("u1", t0 + std::time::Duration::from_secs(5)).is_none(), "registered again: nothing to tell");
}

#[test]
fn evictions_and_answered_ids_are_bounded_oldest_first() {
    let mut ev = Evictions::new(2, std::time::Duration::ZERO);
    for i in 0..3 {
        ev.insert(&format!("u{i}"), evicted(i));
    }
    assert_eq!(ev.len(), 2);
    assert!(ev.heard("u0", Instant::now()).is_none() && ev.heard("u2", Instant::now()).is_some());
    let mut a = Answered::new(2);
    for id in ["a", "b", "c"] {
        a.insert(id);
    }
    assert!(!a.contains("a") && a.contains("b") && a.contains("c"));
}

#[test]
fn dependency_semantics() {
    let done = |id: &str| id == "a" || id == "b";
    let failed = |id: &str| id == "f";
    let d = Dep::parse(Some(&serde_json::json!(["a", "b"]))).unwrap();
    assert!(d.check(done, failed));
    let d = Dep::parse(Some(&serde_json::json!(["a", "c"]))).unwrap();
    assert!(!d.check(done, failed));
    assert!(!d.unreachable(done, failed));
    let d = Dep::parse(Some(&serde_json::json!({"dependencies": ["a", "c"], "all": false}))).unwrap();
    assert!(d.check(done, failed));
    let d = Dep::parse(Some(&serde_json::json!(["f"]))).unwrap();
    assert!(d.unreachable(done, failed));
    let d = Dep::parse(Some(&serde_json::json!({"dependencies": ["f"], "success": false, "failure": true}))).unwrap();
    assert!(d.check(done, failed));
}
