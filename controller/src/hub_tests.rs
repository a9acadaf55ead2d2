//! Unit tests of the hub's decisions, driven through a recording [`Comm`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use rpx_protocol::{Message, Session};

use crate::hub::{first_ping_spacing, Comm, Hub, HubConfig, HubEvent, Sock, FIRST_PING_EVERY, REGISTRATION_FALLBACK};
use crate::scheduler::Scheme;
use crate::wire::{self, Chan};

#[derive(Default)]
struct TestComm {
    sent: Vec<(Sock, Vec<Bytes>)>,
    /// Peers the hub said read rpx batches.
    batches: Vec<(Sock, Bytes)>,
}

impl Comm for TestComm {
    fn send(&mut self, sock: Sock, frames: Vec<Bytes>) {
        self.sent.push((sock, frames));
    }

    fn batches_to(&mut self, sock: Sock, ident: Bytes) {
        self.batches.push((sock, ident));
    }
}

impl TestComm {
    fn take(&mut self) -> Vec<(Sock, Vec<Bytes>)> {
        std::mem::take(&mut self.sent)
    }
}

const KEY: &[u8] = b"test-key";

struct Env {
    hub: Hub,
    comm: TestComm,
    client: Session,
    now: Instant,
}

fn env(hwm: usize) -> Env {
    let now = Instant::now();
    let cfg = HubConfig {
        scheme: Scheme::LeastLoad,
        hwm,
        ping: Duration::from_millis(1000),
        record_limit: 1024,
        record_bytes: 1 << 30,
        queue_limit: 1_000_000,
        engine_info: json!({}),
    };
    Env { hub: Hub::new(Session::new(KEY, "hub"), cfg, now), comm: TestComm::default(), client: Session::new(KEY, "client"), now }
}

fn decode(frames: &[Bytes]) -> Message {
    Session::new(KEY, "x").decode(frames.to_vec()).expect("hub output verifies")
}

fn uuid(i: u64) -> String {
    format!("engine-uuid-{i}")
}

impl Env {
    fn ev(&mut self, ev: HubEvent) {
        self.hub.on_event(&mut self.comm, ev, self.now);
    }

    fn query(&mut self, ident: &'static [u8], msg_type: &str, content: Value) -> Message {
        let (_, f) = self.client.msg(&[Bytes::from_static(ident)], msg_type, content, None, json!({}), &[]);
        self.ev(HubEvent::Query(f));
        let out = self.comm.take();
        let (_, frames) = out.into_iter().find(|(s, _)| *s == Sock::Query).expect("a query reply");
        decode(&frames)
    }

    /// Register an engine and make it reachable; returns its id.
    fn engine(&mut self, i: u64) -> u64 {
        let u = uuid(i);
        let (_, f) = self.client.msg(&[Bytes::from(u.clone())], "registration_request", json!({"uuid": u}), None, json!({}), &[]);
        self.ev(HubEvent::Query(f));
        let reply = self.comm.take().into_iter().find(|(s, _)| *s == Sock::Query).map(|(_, f)| decode(&f)).unwrap();
        assert_eq!(reply.content["status"], "ok");
        for chan in Chan::ALL {
            self.ev(HubEvent::Peer { sock: Sock::Engine(chan), ident: Bytes::from(u.clone()), connected: true });
        }
        self.ev(HubEvent::Pong(Bytes::from(u.clone())));
        self.comm.take();
        reply.content["id"].as_u64().unwrap()
    }

    fn submit(&mut self, meta: Value) -> String {
        let (h, f) =
            self.client.msg(&[Bytes::from_static(b"client-1")], "apply_request", json!({}), None, meta, &[Bytes::from_static(b"f")]);
        let r = wire::parse_request(&self.client, Chan::Task, f).unwrap();
        self.ev(HubEvent::Request(Box::new(r)));
        h.msg_id
    }

    /// Engines (by uuid) that got task frames in the last batch, with msg ids.
    fn dispatched(&mut self) -> Vec<(String, String)> {
        self.comm
            .take()
            .into_iter()
            .filter(|(s, _)| *s == Sock::Engine(Chan::Task))
            .map(|(_, f)| (String::from_utf8(f[0].to_vec()).unwrap(), decode(&f).header.msg_id))
            .collect()
    }

    fn engine_reply(&mut self, engine: u64, chan: Chan, msg_id: &str, status: &str) {
        let es = Session::new(KEY, &uuid(engine));
        let parent = rpx_protocol::Header {
            msg_id: msg_id.into(),
            msg_type: "apply_request".into(),
            username: "u".into(),
            session: "s".into(),
            date: String::new(),
            version: "5.4".into(),
        };
        let (_, f) = es.msg(
            &[Bytes::from(uuid(engine)), Bytes::from_static(b"client-1")],
            "apply_reply",
            json!({"status": status}),
            Some(&parent),
            json!({"status": status, "engine": uuid(engine), "started": "2026-01-01T00:00:00.000000Z"}),
            &[],
        );
        let r = wire::parse_reply(&es, chan, f).unwrap();
        self.ev(HubEvent::Reply(Box::new(r)));
    }
}

#[test]
fn engine_ids_are_handed_out_in_order_and_never_reused_unless_requested() {
    let mut e = env(0);
    assert_eq!(e.engine(0), 0);
    assert_eq!(e.engine(1), 1);
    let id = e.hub.engines.id_of(uuid(0).as_bytes()).unwrap();
    e.hub.on_engine_died(&mut e.comm, id, "test", e.now);
    assert_eq!(e.engine(2), 2, "a dead engine's id is not handed out unasked");
    let mut register = |uuid: &str, id: u64| {
        let (_, f) =
            e.client.msg(&[Bytes::from_static(b"r")], "registration_request", json!({"uuid": uuid, "id": id}), None, json!({}), &[]);
        e.ev(HubEvent::Query(f));
        e.comm.take().into_iter().find(|(s, _)| *s == Sock::Query).map(|(_, f)| decode(&f)).unwrap().content["id"].clone()
    };
    // A requested id is honoured unless a registered engine holds it: ipcluster restarts a
    // dead engine under its id (`ipengine --id 0`); engine 1 still holds its own.
    assert_eq!(register("x", 0), 0);
    assert_eq!(register("y", 1), 3);
}

#[test]
fn a_uuid_in_use_is_refused() {
    let mut e = env(0);
    e.engine(0);
    let m = e.query(b"again", "registration_request", json!({"uuid": uuid(0)}));
    assert_eq!(m.header.msg_type, "registration_reply");
    assert_eq!(m.content["status"], "error");
    assert_eq!(e.hub.ids(), vec![0]);
}

#[test]
fn registration_is_announced_once_the_engine_is_routable_and_its_heart_beats() {
    let mut e = env(0);
    assert_eq!(e.hub.first_ping_at(), None, "no engine waits for a first pong");
    let (_, f) = e.client.msg(&[Bytes::from_static(b"r")], "registration_request", json!({"uuid": "u9"}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    let out = e.comm.take();
    assert!(out.iter().all(|(s, _)| *s != Sock::Notification), "not yet routable");
    assert!(e.hub.ids().is_empty());
    // Until its heart answers, pings go out every FIRST_PING_EVERY rather than every period.
    let at = e.hub.first_ping_at().expect("an extra ping is due");
    assert!(at <= e.now);
    e.hub.on_first_ping(&mut e.comm, e.now);
    assert_eq!(e.comm.take().iter().filter(|(s, _)| *s == Sock::HbPing).count(), 1);
    assert_eq!(e.hub.first_ping_at(), Some(e.now + FIRST_PING_EVERY));
    for chan in [Chan::Mux, Chan::Task] {
        e.ev(HubEvent::Peer { sock: Sock::Engine(chan), ident: Bytes::from_static(b"u9"), connected: true });
    }
    let out = e.comm.take();
    assert!(out.iter().all(|(s, _)| *s != Sock::Notification), "routable, but its heart has not beaten: still starting up");
    assert!(e.hub.ids().is_empty());
    let a = e.submit(json!({}));
    assert!(e.dispatched().is_empty(), "no task goes to an engine still starting up");
    e.ev(HubEvent::Pong(Bytes::from_static(b"u9")));
    assert_eq!(e.hub.first_ping_at(), None);
    let out = e.comm.take();
    assert!(out.iter().any(|(s, f)| *s == Sock::Engine(Chan::Task) && decode(f).header.msg_id == a), "the queued task goes to it now");
    let note = out.iter().find(|(s, _)| *s == Sock::Notification).map(|(_, f)| decode(f)).unwrap();
    assert_eq!(note.header.msg_type, "registration_notification");
    assert_eq!(note.content, json!({"id": 0, "uuid": "u9"}));
    let m = e.query(b"c", "connection_request", json!({}));
    assert_eq!(m.content["engines"], json!({"0": "u9"}));
}

/// Regression: whether an extra ping was due was found by a pass over every engine, after every
/// event (every pong): O(engines) per pong, quadratic per heartbeat period. The engines awaiting
/// their first pong are now a set, and the extra pings are spaced by the number of engines.
#[test]
fn engines_awaiting_a_first_pong_are_a_set_and_extra_pings_are_spaced_by_the_engine_count() {
    let mut e = env(0);
    let n = 1000u64;
    for i in 0..n {
        let u = uuid(i);
        let (_, f) = e.client.msg(&[Bytes::from(u.clone())], "registration_request", json!({"uuid": u}), None, json!({}), &[]);
        e.ev(HubEvent::Query(f));
        for chan in [Chan::Mux, Chan::Task] {
            e.ev(HubEvent::Peer { sock: Sock::Engine(chan), ident: Bytes::from(uuid(i)), connected: true });
        }
    }
    e.comm.take();
    assert_eq!(e.hub.awaiting_first_pong(), n as usize);
    // 1,000 hearts answer every ping: one extra ping per 0.5 s keeps them at 2,000 answers/s.
    assert_eq!(first_ping_spacing(n as usize), Duration::from_millis(500));
    assert_eq!(first_ping_spacing(8), FIRST_PING_EVERY, "a small cluster is pinged as often as before");
    e.hub.on_first_ping(&mut e.comm, e.now);
    assert_eq!(e.hub.first_ping_at(), Some(e.now + Duration::from_millis(500)));
    for i in 0..n - 1 {
        e.ev(HubEvent::Pong(Bytes::from(uuid(i))));
    }
    // A second pong of an engine that answered already changes nothing.
    e.ev(HubEvent::Pong(Bytes::from(uuid(0))));
    assert_eq!(e.hub.awaiting_first_pong(), 1);
    assert_eq!(e.hub.ids().len(), (n - 1) as usize, "each engine registered at its first pong");
    assert!(e.hub.first_ping_at().is_some(), "one engine still waits");
    // The last one dies before its heart beats: nothing waits any more.
    e.ev(HubEvent::Peer { sock: Sock::HbPong, ident: Bytes::from(uuid(n - 1)), connected: false });
    assert_eq!(e.hub.awaiting_first_pong(), 0);
    assert_eq!(e.hub.first_ping_at(), None);
    let notes = e.comm.take().into_iter().filter(|(s, _)| *s == Sock::Notification).count();
    assert_eq!(notes, n as usize, "999 registrations and one unregistration");
}

#[test]
fn an_engine_whose_heart_stays_silent_is_registered_after_the_fallback_delay() {
    let mut e = env(0);
    let (_, f) = e.client.msg(&[Bytes::from_static(b"r")], "registration_request", json!({"uuid": "u9"}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    e.ev(HubEvent::Peer { sock: Sock::Engine(Chan::Task), ident: Bytes::from_static(b"u9"), connected: true });
    e.hub.on_tick(&mut e.comm, e.now + REGISTRATION_FALLBACK / 2);
    assert!(e.hub.ids().is_empty());
    e.hub.on_tick(&mut e.comm, e.now + REGISTRATION_FALLBACK);
    assert_eq!(e.hub.ids(), vec![0]);
}

#[test]
fn a_restarted_controller_completes_registrations_after_its_hold() {
    let mut e = env(0);
    let until = e.now + Duration::from_secs(1);
    e.hub.hold_registrations(until);
    e.engine(0);
    assert!(e.hub.ids().is_empty(), "routable and ponged, but held");
    e.hub.on_tick(&mut e.comm, until - Duration::from_millis(1));
    assert!(e.hub.ids().is_empty());
    e.hub.on_tick(&mut e.comm, until);
    assert_eq!(e.hub.ids(), vec![0]);
    let out = e.comm.take();
    assert!(out.iter().any(|(s, f)| *s == Sock::Notification && decode(f).header.msg_type == "registration_notification"));
}

#[test]
fn leastload_ties_go_to_the_least_recently_used_engine() {
    let mut e = env(0);
    e.engine(0);
    e.engine(1);
    let a = e.submit(json!({}));
    let b = e.submit(json!({}));
    let c = e.submit(json!({}));
    let d = e.dispatched();
    assert_eq!(d, vec![(uuid(0), a), (uuid(1), b), (uuid(0), c)]);
}

#[test]
fn hwm_is_respected_and_the_queue_drains_on_replies() {
    let mut e = env(1);
    e.engine(0);
    e.engine(1);
    let ids: Vec<String> = (0..3).map(|_| e.submit(json!({}))).collect();
    let d = e.dispatched();
    assert_eq!(d.len(), 2);
    assert_eq!(e.hub.unassigned(), vec![ids[2].clone()]);
    let (first_engine, first_id) = d[0].clone();
    let eid = if first_engine == uuid(0) { 0 } else { 1 };
    e.engine_reply(eid, Chan::Task, &first_id, "ok");
    let out = e.comm.take();
    let to_client: Vec<_> = out.iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).collect();
    assert_eq!(to_client.len(), 1);
    assert_eq!(to_client[0].1[0], Bytes::from_static(b"client-1"));
    assert_eq!(to_client[0].1[1], Bytes::from(uuid(eid)));
    let sent: Vec<_> = out.iter().filter(|(s, _)| *s == Sock::Engine(Chan::Task)).map(|(_, f)| decode(f).header.msg_id).collect();
    assert_eq!(sent, vec![ids[2].clone()]);
    assert!(e.hub.unassigned().is_empty());
}

#[test]
fn targets_restrict_the_engine() {
    let mut e = env(0);
    e.engine(0);
    e.engine(1);
    for _ in 0..3 {
        e.submit(json!({"targets": [uuid(1)]}));
    }
    assert!(e.dispatched().iter().all(|(u, _)| *u == uuid(1)));
    // Targets that are all gone: ImpossibleDependency.
    e.submit(json!({"targets": ["nobody"]}));
    let out = e.comm.take();
    let m = decode(&out.iter().find(|(s, _)| *s == Sock::Client(Chan::Task)).unwrap().1);
    assert_eq!(m.content["ename"], "ImpossibleDependency");
}

#[test]
fn retries_go_to_a_different_engine() {
    let mut e = env(0);
    e.engine(0);
    e.engine(1);
    let id = e.submit(json!({"retries": 1}));
    let d = e.dispatched();
    let first = d[0].0.clone();
    let eid = if first == uuid(0) { 0 } else { 1 };
    e.engine_reply(eid, Chan::Task, &id, "error");
    let out = e.comm.take();
    assert!(out.iter().all(|(s, _)| *s != Sock::Client(Chan::Task)), "the failure is not relayed while retries remain");
    let again: Vec<_> =
        out.iter().filter(|(s, _)| *s == Sock::Engine(Chan::Task)).map(|(_, f)| String::from_utf8(f[0].to_vec()).unwrap()).collect();
    assert_eq!(again, vec![uuid(1 - eid)]);
    e.engine_reply(1 - eid, Chan::Task, &id, "error");
    let out = e.comm.take();
    assert_eq!(out.iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).count(), 1, "out of retries: the error goes to the client");
}

#[test]
fn engine_death_fails_exactly_its_tasks() {
    let mut e = env(0);
    e.engine(0);
    e.engine(1);
    let a = e.submit(json!({}));
    let b = e.submit(json!({}));
    let d = e.dispatched();
    assert_eq!(d, vec![(uuid(0), a.clone()), (uuid(1), b.clone())]);
    // A direct (mux) request to engine 0 as well.
    let (mh, f) = e.client.msg(
        &[Bytes::from_static(b"client-1"), Bytes::from(uuid(0))],
        "execute_request",
        json!({"code": "1"}),
        None,
        json!({}),
        &[],
    );
    e.ev(HubEvent::Request(Box::new(wire::parse_request(&e.client, Chan::Mux, f).unwrap())));
    e.comm.take();
    e.ev(HubEvent::Peer { sock: Sock::Engine(Chan::Mux), ident: Bytes::from(uuid(0)), connected: false });
    let out = e.comm.take();
    let note = decode(&out.iter().find(|(s, _)| *s == Sock::Notification).unwrap().1);
    assert_eq!(note.header.msg_type, "unregistration_notification");
    assert_eq!(note.content, json!({"id": 0, "uuid": uuid(0)}));
    let task_err: Vec<Message> = out.iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).map(|(_, f)| decode(f)).collect();
    assert_eq!(task_err.len(), 1);
    assert_eq!(task_err[0].parent_msg_id(), Some(a.as_str()));
    assert_eq!(task_err[0].header.msg_type, "apply_reply");
    assert_eq!(task_err[0].content["ename"], "EngineError");
    assert_eq!(task_err[0].content["evalue"], format!("Engine 0 died while running task {a}"));
    assert_eq!(task_err[0].content["engine_info"]["engine_uuid"], uuid(0));
    assert_eq!(task_err[0].metadata["engine"], uuid(0));
    assert_eq!(task_err[0].metadata["status"], "error");
    let mux_err: Vec<Message> = out.iter().filter(|(s, _)| *s == Sock::Client(Chan::Mux)).map(|(_, f)| decode(f)).collect();
    assert_eq!(mux_err.len(), 1);
    assert_eq!(mux_err[0].header.msg_type, "execute_reply");
    assert_eq!(mux_err[0].parent_msg_id(), Some(mh.msg_id.as_str()));
    assert_eq!(e.hub.ids(), vec![1]);
    // Engine 1's task is untouched and still completes.
    e.engine_reply(1, Chan::Task, &b, "ok");
    assert_eq!(e.comm.take().iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).count(), 1);
}

#[test]
fn queue_status_counts() {
    let mut e = env(0);
    e.engine(0);
    let a = e.submit(json!({}));
    e.submit(json!({}));
    e.dispatched();
    e.engine_reply(0, Chan::Task, &a, "ok");
    e.comm.take();
    e.submit(json!({"targets": [uuid(0)], "after": [], "follow": []}));
    e.dispatched();
    let m = e.query(b"c", "queue_request", json!({"targets": null, "verbose": false}));
    assert_eq!(m.header.msg_type, "queue_reply");
    assert_eq!(m.content["0"], json!({"queue": 0, "completed": 1, "tasks": 2}));
    assert_eq!(m.content["unassigned"], 0);
    let m = e.query(b"c", "queue_request", json!({"targets": [7], "verbose": false}));
    assert_eq!(m.header.msg_type, "hub_error");
}

#[test]
fn bad_messages_are_dropped() {
    let mut e = env(0);
    let other = Session::new(b"wrong", "x");
    let (_, f) = other.msg(&[Bytes::from_static(b"c")], "connection_request", json!({}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    e.ev(HubEvent::Query(vec![Bytes::from_static(b"garbage")]));
    assert!(e.comm.take().is_empty());
    // A reply from an engine nobody registered is dropped too.
    e.engine_reply(5, Chan::Mux, "m", "ok");
    assert!(e.comm.take().is_empty());
    // Unknown query types get a hub_error, not silence.
    let m = e.query(b"c", "frobnicate_request", json!({}));
    assert_eq!(m.header.msg_type, "hub_error");
    assert_eq!(m.content["status"], "error");
}

#[test]
fn tasks_time_out_in_the_queue() {
    let mut e = env(0);
    let id = e.submit(json!({"timeout": 1.0}));
    assert_eq!(e.hub.unassigned(), vec![id.clone()]);
    let later = e.now + Duration::from_secs(2);
    e.hub.on_tick(&mut e.comm, later);
    let out = e.comm.take();
    let m = decode(&out.iter().find(|(s, _)| *s == Sock::Client(Chan::Task)).unwrap().1);
    assert_eq!(m.content["ename"], "TaskTimeout");
    assert_eq!(m.parent_msg_id(), Some(id.as_str()));
    assert!(e.hub.unassigned().is_empty());
}

#[test]
fn a_task_beyond_the_queue_limit_is_refused_at_once_and_the_others_run() {
    let mut e = env(1);
    e.hub.set_queue_limit(2);
    e.engine(0);
    let a = e.submit(json!({}));
    let b = e.submit(json!({}));
    assert_eq!(e.dispatched(), vec![(uuid(0), a.clone())], "a runs, b waits (hwm 1)");
    let c = e.submit(json!({}));
    let out = e.comm.take();
    let m = decode(&out.iter().find(|(s, _)| *s == Sock::Client(Chan::Task)).expect("an answer to the third").1);
    assert_eq!(m.parent_msg_id(), Some(c.as_str()));
    assert_eq!(m.content["ename"], "QueueFull");
    assert!(m.content["evalue"].as_str().unwrap().contains("holds 2 unfinished"), "{}", m.content);
    assert_eq!(e.hub.unassigned(), vec![b.clone()], "nothing queued was lost");
    e.engine_reply(0, Chan::Task, &a, "ok");
    assert_eq!(e.dispatched(), vec![(uuid(0), b)]);
    let d = e.submit(json!({}));
    assert_eq!(e.hub.unassigned(), vec![d], "room again once a task finished");
}

#[test]
fn unknown_dependencies_are_invalid_and_after_waits() {
    let mut e = env(0);
    e.engine(0);
    e.submit(json!({"after": ["no-such-task"]}));
    let out = e.comm.take();
    let m = decode(&out.iter().find(|(s, _)| *s == Sock::Client(Chan::Task)).unwrap().1);
    assert_eq!(m.content["ename"], "InvalidDependency");
    let a = e.submit(json!({}));
    let b = e.submit(json!({"after": [a.clone()]}));
    assert_eq!(e.dispatched(), vec![(uuid(0), a.clone())]);
    e.engine_reply(0, Chan::Task, &a, "ok");
    let sent: Vec<_> =
        e.comm.take().into_iter().filter(|(s, _)| *s == Sock::Engine(Chan::Task)).map(|(_, f)| decode(&f).header.msg_id).collect();
    assert_eq!(sent, vec![b]);
}

#[test]
fn a_waiting_task_keeps_its_place_while_later_tasks_pass_it() {
    let mut e = env(2);
    e.engine(0);
    let a = e.submit(json!({}));
    let b = e.submit(json!({"after": [a.clone()]}));
    let c = e.submit(json!({}));
    let d = e.submit(json!({}));
    let sent: Vec<String> = e.dispatched().into_iter().map(|(_, id)| id).collect();
    assert_eq!(sent, vec![a.clone(), c.clone()], "b waits for a; c passes it; d waits for room");
    assert_eq!(e.hub.unassigned(), vec![b.clone(), d.clone()], "the queue keeps its order");
    e.engine_reply(0, Chan::Task, &a, "ok");
    assert_eq!(e.dispatched().into_iter().map(|(_, id)| id).collect::<Vec<_>>(), vec![b], "b goes first once a is done");
    e.engine_reply(0, Chan::Task, &c, "ok");
    assert_eq!(e.dispatched().into_iter().map(|(_, id)| id).collect::<Vec<_>>(), vec![d]);
    assert!(e.hub.unassigned().is_empty());
}

#[test]
fn results_and_history_are_served() {
    let mut e = env(0);
    e.engine(0);
    let a = e.submit(json!({}));
    let b = e.submit(json!({}));
    e.dispatched();
    e.engine_reply(0, Chan::Task, &a, "ok");
    e.comm.take();
    let m = e.query(b"c", "result_request", json!({"msg_ids": [a, b], "status_only": false}));
    assert_eq!(m.content["completed"], json!([a]));
    assert_eq!(m.content["pending"], json!([b]));
    assert_eq!(m.content[a.as_str()]["result_content"]["status"], "ok");
    assert_eq!(m.content[a.as_str()]["result_metadata"]["started"], "2026-01-01T00:00:00.000000Z");
    let h = e.query(b"c", "history_request", json!({}));
    assert_eq!(h.content["history"], json!([a, b]));
    let m = e.query(b"c", "result_request", json!({"msg_ids": ["nope"]}));
    assert_eq!(m.header.msg_type, "hub_error");
}

#[test]
fn broadcast_fans_out_with_rewritten_ids() {
    let mut e = env(0);
    e.engine(0);
    e.engine(1);
    let (h, f) = e.client.msg(
        &[Bytes::from_static(b"client-1")],
        "apply_request",
        json!({}),
        None,
        json!({"targets": [[uuid(0), 0], [uuid(1), 1]], "is_coalescing": false}),
        &[],
    );
    e.ev(HubEvent::Request(Box::new(wire::parse_request(&e.client, Chan::Bcast, f).unwrap())));
    let out = e.comm.take();
    let sent: Vec<Message> = out.iter().filter(|(s, _)| *s == Sock::Engine(Chan::Bcast)).map(|(_, f)| decode(f)).collect();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].header.msg_id, format!("{}_{}", h.msg_id, uuid(0)));
    assert_eq!(sent[1].metadata["original_msg_id"], h.msg_id);
    assert_eq!(sent[1].metadata["is_broadcast"], true);
}

#[test]
fn shutdown_request_replies_notifies_and_schedules_exit() {
    let mut e = env(0);
    let (_, f) = e.client.msg(&[Bytes::from_static(b"c")], "shutdown_request", json!({}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    let out = e.comm.take();
    assert!(out.iter().any(|(s, f)| *s == Sock::Query && decode(f).header.msg_type == "shutdown_reply"));
    assert!(out.iter().any(|(s, f)| *s == Sock::Notification && decode(f).header.msg_type == "shutdown_notification"));
    assert!(e.hub.exit_at().is_some());
}

// ------------------------------------------------------------------ eviction and coming back

impl Env {
    /// Register engine `i` as an rpx engine (asking for eviction notices) from the registration
    /// socket `reg-i`, asking for `id`; returns the reply and the request's msg_id.
    fn rpx_register(&mut self, i: u64, id: Option<u64>) -> (Message, String) {
        let u = uuid(i);
        let content = serde_json::to_value(rpx_protocol::registration::RegistrationRequest {
            uuid: u.clone(),
            id,
            notify_eviction: true,
            host: None,
            batches: false,
        })
        .unwrap();
        let (h, f) = self.client.msg(&[Bytes::from(format!("reg-{i}"))], "registration_request", content, None, json!({}), &[]);
        self.ev(HubEvent::Query(f));
        let reply = self.comm.take().into_iter().find(|(s, _)| *s == Sock::Query).map(|(_, f)| decode(&f)).expect("a registration reply");
        // Its heart answers the next ping.
        self.ev(HubEvent::Pong(Bytes::from(u)));
        (reply, h.msg_id)
    }

    fn rpx_engine(&mut self, i: u64) -> (u64, String) {
        let (reply, reg) = self.rpx_register(i, None);
        assert_eq!(reply.content["status"], "ok");
        for chan in Chan::ALL {
            self.ev(HubEvent::Peer { sock: Sock::Engine(chan), ident: Bytes::from(uuid(i)), connected: true });
        }
        self.comm.take();
        (reply.content["id"].as_u64().unwrap(), reg)
    }

    fn evict(&mut self, i: u64) -> Vec<(Sock, Vec<Bytes>)> {
        self.now += Duration::from_secs(20);
        self.hub.on_tick(&mut self.comm, self.now);
        // Other engines answered their pings.
        let out = self.comm.take();
        assert!(self.hub.engines.id_of(uuid(i).as_bytes()).is_none(), "engine {i} was evicted");
        out
    }
}

fn notices(out: &[(Sock, Vec<Bytes>)]) -> Vec<(Bytes, rpx_protocol::registration::EvictionNotice)> {
    out.iter()
        .filter(|(s, f)| *s == Sock::Query && decode(f).header.msg_type == "eviction_notice")
        .map(|(_, f)| (f[0].clone(), serde_json::from_value(decode(f).content).unwrap()))
        .collect()
}

#[test]
fn an_evicted_rpx_engine_is_told_with_what_was_answered_for_it_and_gets_its_id_back() {
    let mut e = env(0);
    let (id, reg) = e.rpx_engine(0);
    let a = e.submit(json!({}));
    assert_eq!(e.dispatched(), vec![(uuid(0), a.clone())]);
    let out = e.evict(0);
    // The task failed (no retries) and the engine is told at once, on its registration socket.
    assert_eq!(out.iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).count(), 1);
    let told = notices(&out);
    assert_eq!(told.len(), 1);
    let (to, n) = &told[0];
    assert_eq!(to.as_ref(), b"reg-0");
    assert_eq!(
        (n.id, n.uuid.as_str(), n.registration.as_str(), n.reason.as_str()),
        (id, uuid(0).as_str(), reg.as_str(), "missed heartbeats")
    );
    assert_eq!(n.answered, vec![a.clone()]);
    assert!(!n.reconnect, "its connections are fine: it registers again over them");
    // Its pongs resume: told again, but at most once per period.
    e.now += Duration::from_secs(2);
    e.ev(HubEvent::Pong(Bytes::from(uuid(0))));
    assert_eq!(notices(&e.comm.take()).len(), 1);
    e.ev(HubEvent::Pong(Bytes::from(uuid(0))));
    assert!(notices(&e.comm.take()).is_empty());
    // It registers again asking for its id: it gets it, and is routable at once over the
    // connections it kept.
    let (reply, _) = e.rpx_register(0, Some(id));
    assert_eq!((reply.content["status"].as_str(), reply.content["id"].as_u64()), (Some("ok"), Some(id)));
    assert_eq!(e.hub.ids(), vec![id]);
    // The late reply to the task failed at eviction is stale: dropped, not delivered twice.
    e.engine_reply(0, Chan::Task, &a, "ok");
    assert!(e.comm.take().iter().all(|(s, _)| !matches!(s, Sock::Client(_))), "no second reply to the client");
    // Nothing more to tell it.
    e.ev(HubEvent::Pong(Bytes::from(uuid(0))));
    assert!(notices(&e.comm.take()).is_empty());
}

#[test]
fn a_task_retried_elsewhere_is_answered_once_by_the_engine_now_running_it() {
    let mut e = env(0);
    e.rpx_engine(0);
    let a = e.submit(json!({"retries": 1}));
    assert_eq!(e.dispatched(), vec![(uuid(0), a.clone())]);
    e.rpx_engine(1);
    // Engine 1 keeps answering pings; engine 0 is evicted and its task goes to engine 1.
    e.now += Duration::from_secs(20);
    e.ev(HubEvent::Pong(Bytes::from(uuid(1))));
    e.hub.on_tick(&mut e.comm, e.now);
    let out = e.comm.take();
    assert!(out.iter().all(|(s, _)| *s != Sock::Client(Chan::Task)), "retried, not failed");
    let moved: Vec<String> =
        out.iter().filter(|(s, _)| *s == Sock::Engine(Chan::Task)).map(|(_, f)| String::from_utf8(f[0].to_vec()).unwrap()).collect();
    assert_eq!(moved, vec![uuid(1)]);
    // Engine 0 comes back and finishes the task anyway: dropped.
    let (reply, _) = e.rpx_register(0, Some(0));
    assert_eq!(reply.content["id"], 0);
    e.engine_reply(0, Chan::Task, &a, "ok");
    assert!(e.comm.take().iter().all(|(s, _)| *s != Sock::Client(Chan::Task)));
    // Engine 1's answer is the one the client gets.
    e.engine_reply(1, Chan::Task, &a, "ok");
    assert_eq!(e.comm.take().iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).count(), 1);
}

#[test]
fn an_evicted_engine_gets_its_old_id_back_and_keeps_it() {
    let mut e = env(0);
    e.rpx_engine(0);
    e.evict(0);
    let (reply, _) = e.rpx_register(0, Some(0));
    assert_eq!(reply.content["id"], 0);
    let (reply, _) = e.rpx_register(1, Some(0));
    assert_eq!(reply.content["id"], 1, "another engine does not get an id a live engine holds");
}

#[test]
fn an_rpx_engine_registering_again_while_registered_keeps_its_registration() {
    let mut e = env(0);
    let (id, _) = e.rpx_engine(0);
    let a = e.submit(json!({}));
    e.dispatched();
    let (reply, _) = e.rpx_register(0, Some(id));
    assert_eq!((reply.content["status"].as_str(), reply.content["id"].as_u64()), (Some("ok"), Some(id)));
    assert_eq!(e.hub.ids(), vec![id]);
    // Its task is still its own: the reply is delivered.
    e.engine_reply(0, Chan::Task, &a, "ok");
    assert_eq!(e.comm.take().iter().filter(|(s, _)| *s == Sock::Client(Chan::Task)).count(), 1);
    // A Python engine's duplicate uuid is still refused (a_uuid_in_use_is_refused), and so is
    // an rpx engine asking for another id under a uuid in use.
    let (reply, _) = e.rpx_register(0, Some(id + 1));
    assert_eq!(reply.content["status"], "error");
}

#[test]
fn an_engine_that_unregistered_is_not_told_to_come_back() {
    let mut e = env(0);
    let (id, _) = e.rpx_engine(0);
    let (_, f) = e.client.msg(&[Bytes::from_static(b"reg-0")], "unregistration_request", json!({"id": id}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    assert!(notices(&e.comm.take()).is_empty());
    assert!(e.hub.ids().is_empty());
    e.ev(HubEvent::Pong(Bytes::from(uuid(0))));
    assert!(notices(&e.comm.take()).is_empty());
}

#[test]
fn an_engine_whose_connection_closed_is_told_to_reconnect() {
    let mut e = env(0);
    e.rpx_engine(0);
    e.ev(HubEvent::Peer { sock: Sock::Engine(Chan::Mux), ident: Bytes::from(uuid(0)), connected: false });
    let told = notices(&e.comm.take());
    assert_eq!(told.len(), 1);
    assert!(told[0].1.reconnect && told[0].1.reason == "mux connection closed", "{:?}", told[0].1);
}

#[test]
fn an_engine_identity_may_be_taken_over_only_while_its_engine_is_not_alive() {
    let mut e = env(0);
    let alive = e.hub.engines.alive();
    let (u0, u1) = (uuid(0), uuid(1));
    // Not an engine (yet): nothing to protect.
    assert!(alive.may_take_over(u0.as_bytes()));
    // Registered: protected from the registration on, before it is routable.
    let (reply, _) = e.rpx_register(0, None);
    let id = reply.content["id"].as_u64().unwrap();
    assert!(!alive.may_take_over(u0.as_bytes()));
    e.rpx_engine(1);
    assert!(!alive.may_take_over(u1.as_bytes()));
    // Missed heartbeats: evicted, so the engine reconnecting gets in; the other is still alive.
    e.now += Duration::from_secs(20);
    e.ev(HubEvent::Pong(Bytes::from(u1.clone())));
    e.hub.on_tick(&mut e.comm, e.now);
    assert!(e.hub.engines.id_of(u0.as_bytes()).is_none());
    assert!(alive.may_take_over(u0.as_bytes()));
    assert!(!alive.may_take_over(u1.as_bytes()));
    // Registered again under its id: protected again.
    e.rpx_register(0, Some(id));
    assert!(!alive.may_take_over(u0.as_bytes()));
    // A closed mux connection, and an unregistration, each end it.
    e.ev(HubEvent::Peer { sock: Sock::Engine(Chan::Mux), ident: Bytes::from(u0.clone()), connected: false });
    assert!(alive.may_take_over(u0.as_bytes()));
    let id1 = e.hub.engines.id_of(u1.as_bytes()).unwrap();
    let (_, f) = e.client.msg(&[Bytes::from_static(b"reg-1")], "unregistration_request", json!({"id": id1}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    e.comm.take();
    assert!(alive.may_take_over(u1.as_bytes()));
    // The shared set is exactly the engines table.
    e.rpx_engine(2);
    assert!(!alive.may_take_over(uuid(2).as_bytes()));
    assert_eq!(e.hub.engines.by_ident.len(), 1);
}

#[test]
fn only_peers_that_announce_batches_get_them() {
    let mut e = env(0);
    // ipyparallel's engines send `{uuid}`: no batches for them, and the reply's extra key is
    // harmless to them.
    let (_, f) = e.client.msg(&[Bytes::from_static(b"py")], "registration_request", json!({"uuid": uuid(0)}), None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    let reply = e.comm.take().into_iter().find(|(s, _)| *s == Sock::Query).map(|(_, f)| decode(&f)).unwrap();
    assert_eq!(reply.content["status"], "ok");
    assert_eq!(reply.content["batches"], true, "the controller reads batches from any engine");
    assert!(e.comm.batches.is_empty());
    // An rpx engine that says it reads batches gets its task requests in batches.
    let content = serde_json::to_value(rpx_protocol::registration::RegistrationRequest {
        uuid: uuid(1),
        id: None,
        notify_eviction: true,
        host: None,
        batches: true,
    })
    .unwrap();
    let (_, f) = e.client.msg(&[Bytes::from_static(b"reg-1")], "registration_request", content, None, json!({}), &[]);
    e.ev(HubEvent::Query(f));
    assert_eq!(e.comm.batches, vec![(Sock::Engine(Chan::Task), Bytes::from(uuid(1)))]);
    let reply = e.comm.take().into_iter().find(|(s, _)| *s == Sock::Query).map(|(_, f)| decode(&f)).unwrap();
    assert_eq!(reply.content["batches"], true);
    // A client that sent a batch gets its replies in batches; connection_reply says the
    // controller reads them.
    e.ev(HubEvent::BatchesFrom { sock: Sock::Client(Chan::Task), ident: Bytes::from_static(b"client-1") });
    assert_eq!(e.comm.batches[1], (Sock::Client(Chan::Task), Bytes::from_static(b"client-1")));
    let reply = e.query(b"client-1", "connection_request", json!({}));
    assert_eq!(reply.content["rpx_batches"], true);
}
