//! Unit tests of the hub with a task database (`--db sqlite`): records evicted from memory, or
//! written by a previous hub, are answered from the database; purges reach it; a failed lookup
//! is a `hub_error`. The hub's store operations are applied to a real [`Writer`] on a temporary
//! file, and its answers fed back as [`HubEvent::Stored`], as the network layer does.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use rpx_protocol::{Message, Session};

use crate::hub::{Comm, Hub, HubConfig, HubEvent, Sock};
use crate::scheduler::Scheme;
use crate::store::{self, Answer, StoreMsg, StoreOp, Writer};
use crate::wire::{self, Chan};

const KEY: &[u8] = b"test-key";

#[derive(Default)]
struct Sent(Vec<(Sock, Vec<Bytes>)>);

impl Comm for Sent {
    fn send(&mut self, sock: Sock, frames: Vec<Bytes>) {
        self.0.push((sock, frames));
    }
}

struct Env {
    hub: Hub,
    comm: Sent,
    writer: Writer,
    client: Session,
    now: Instant,
    /// Answers to hand back instead of the writer's (to test failures).
    fail_lookups: bool,
}

fn decode(frames: &[Bytes]) -> Message {
    Session::new(KEY, "x").decode(frames.to_vec()).expect("hub output verifies")
}

fn hub(record_limit: usize) -> Hub {
    let cfg = HubConfig {
        scheme: Scheme::LeastLoad,
        hwm: 0,
        ping: Duration::from_millis(1000),
        record_limit,
        record_bytes: 1 << 30,
        queue_limit: 1_000_000,
        engine_info: json!({}),
    };
    let mut h = Hub::new(Session::new(KEY, "hub"), cfg, Instant::now());
    h.persist = true;
    h
}

fn env(dir: &std::path::Path, record_limit: usize, restore: bool) -> Env {
    let path = dir.join("tasks.db");
    let writer = Writer::new(store::open(&path, restore).unwrap(), path);
    Env {
        hub: hub(record_limit),
        comm: Sent::default(),
        writer,
        client: Session::new(KEY, "client"),
        now: Instant::now(),
        fail_lookups: false,
    }
}

const ENGINE: &str = "engine-uuid-0";

impl Env {
    /// One event, then the store round trips it caused, as `net` does.
    fn ev(&mut self, ev: HubEvent) {
        self.hub.on_event(&mut self.comm, ev, self.now);
        while !self.hub.store_ops.is_empty() {
            let mut answers = Vec::new();
            let mut batch = Vec::new();
            for op in std::mem::take(&mut self.hub.store_ops) {
                let reply = if let StoreOp::Query { token, .. } = &op {
                    let (tx, rx) = oneshot::channel();
                    answers.push((*token, rx));
                    Some(tx)
                } else {
                    None
                };
                batch.push(StoreMsg { op, reply });
            }
            self.writer.apply(batch);
            for (token, mut rx) in answers {
                let answer = if self.fail_lookups {
                    Answer::failed(rpx_protocol::content::ErrorName::RuntimeError, "disk on fire")
                } else {
                    rx.try_recv().expect("answered in the batch")
                };
                self.hub.on_event(&mut self.comm, HubEvent::Stored { token, answer }, self.now);
            }
        }
    }

    fn query(&mut self, msg_type: &str, content: Value) -> Message {
        let (_, f) = self.client.msg(&[Bytes::from_static(b"q")], msg_type, content, None, json!({}), &[]);
        self.ev(HubEvent::Query(f));
        let out = std::mem::take(&mut self.comm.0);
        let (_, frames) = out.into_iter().rev().find(|(s, _)| *s == Sock::Query).expect("a query reply");
        decode(&frames)
    }

    fn engine(&mut self) {
        let (_, f) = self.client.msg(&[Bytes::from(ENGINE)], "registration_request", json!({"uuid": ENGINE}), None, json!({}), &[]);
        self.ev(HubEvent::Query(f));
        for chan in Chan::ALL {
            self.ev(HubEvent::Peer { sock: Sock::Engine(chan), ident: Bytes::from(ENGINE), connected: true });
        }
        self.ev(HubEvent::Pong(Bytes::from(ENGINE)));
        self.comm.0.clear();
    }

    /// Submit a task and answer it from the engine with `result` as its buffer; returns its id.
    fn run_task(&mut self, i: usize) -> String {
        let (h, f) = self.client.msg(
            &[Bytes::from_static(b"client-1")],
            "apply_request",
            json!({}),
            None,
            json!({}),
            &[Bytes::from(format!("arg{i}"))],
        );
        let msg_id = h.msg_id.clone();
        self.ev(HubEvent::Request(Box::new(wire::parse_request(&self.client, Chan::Task, f).unwrap())));
        let es = Session::new(KEY, ENGINE);
        let result = vec![Bytes::from(vec![i as u8, 0, 255]), Bytes::from(format!("result {i}"))];
        let (_, f) = es.msg(
            &[Bytes::from(ENGINE), Bytes::from_static(b"client-1")],
            "apply_reply",
            json!({"status": "ok"}),
            Some(&h),
            json!({"status": "ok", "engine": ENGINE, "started": "2026-01-01T00:00:00.000000Z"}),
            &result,
        );
        self.ev(HubEvent::Reply(Box::new(wire::parse_reply(&es, Chan::Task, f).unwrap())));
        self.ev(HubEvent::Io {
            parent: msg_id.clone(),
            msg_type: "stream".into(),
            content: json!({"name": "stdout", "text": format!("late {i}\n")}),
        });
        self.comm.0.clear();
        msg_id
    }
}

#[test]
fn evicted_and_restored_records_are_answered_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = env(dir.path(), 2, false);
    e.engine();
    let ids: Vec<String> = (0..5).map(|i| e.run_task(i)).collect();
    assert_eq!(e.hub.records.map.len(), 2, "memory keeps only --record-limit records");

    let check = |e: &mut Env, ids: &[String]| {
        let m = e.query("result_request", json!({"msg_ids": ids, "status_only": false}));
        assert_eq!(m.header.msg_type, "result_reply", "{:?}", m.content);
        let mut sorted = ids.to_vec();
        sorted.sort();
        assert_eq!(m.content["completed"], json!(sorted));
        // Buffers of every result, in sorted msg_id order, byte for byte.
        let want: Vec<Bytes> = sorted
            .iter()
            .flat_map(|id| {
                let i = ids.iter().position(|x| x == id).unwrap();
                [Bytes::from(vec![i as u8, 0, 255]), Bytes::from(format!("result {i}"))]
            })
            .collect();
        assert_eq!(m.buffers, want);
        let first = &m.content[ids[0].as_str()];
        assert_eq!(first["result_content"], json!({"status": "ok"}));
        assert_eq!(first["io"]["stdout"], "late 0\n", "output that came after the reply is stored too");

        let h = e.query("history_request", json!({}));
        assert_eq!(h.content["history"], json!(ids));

        let d = e.query(
            "db_request",
            json!({"query": {"msg_id": {"$in": ids}}, "keys": ["msg_id", "buffers", "result_buffers", "engine_uuid"]}),
        );
        assert_eq!(d.content["records"].as_array().unwrap().len(), ids.len());
        assert_eq!(d.content["records"][1]["engine_uuid"], ENGINE);
        assert_eq!(d.content["buffer_lens"], json!(vec![1; ids.len()]));
        assert_eq!(d.content["result_buffer_lens"], json!(vec![2; ids.len()]));
        assert_eq!(d.buffers[0], Bytes::from("arg0"));
        assert_eq!(d.buffers[1], Bytes::from(vec![0u8, 0, 255]));
    };
    check(&mut e, &ids);

    // A new controller on the same file (--restore) answers for all of them, with no record in
    // memory.
    let Env { writer, .. } = e;
    drop(writer);
    let mut e = env(dir.path(), 2, true);
    assert!(e.hub.records.map.is_empty());
    check(&mut e, &ids);

    let m = e.query("result_request", json!({"msg_ids": [ids[0].clone(), "nope"]}));
    assert_eq!(m.header.msg_type, "hub_error");
    assert_eq!(m.content["ename"], "KeyError");

    // Resubmission of a restored record: a new task with the stored request.
    e.engine();
    let m = e.query("resubmit_request", json!({"msg_ids": [ids[1].clone()]}));
    assert_eq!(m.header.msg_type, "resubmit_reply", "{:?}", m.content);
    let new_id = m.content["resubmitted"][ids[1].as_str()].as_str().unwrap().to_string();
    let d = e.query("db_request", json!({"query": {"msg_id": ids[1].clone()}, "keys": ["resubmitted"]}));
    assert_eq!(d.content["records"][0]["resubmitted"], new_id);

    // Purges reach the database.
    let m = e.query("purge_request", json!({"msg_ids": [ids[0].clone()]}));
    assert_eq!(m.header.msg_type, "purge_reply");
    let m = e.query("result_request", json!({"msg_ids": [ids[0].clone()]}));
    assert_eq!(m.content["ename"], "KeyError");
    let m = e.query("purge_request", json!({"msg_ids": "all"}));
    assert_eq!(m.header.msg_type, "purge_reply");
    let h = e.query("history_request", json!({}));
    assert_eq!(h.content["history"], json!([new_id]), "only the pending resubmission is left");
}

#[test]
fn a_failed_lookup_is_a_hub_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = env(dir.path(), 10, false);
    e.fail_lookups = true;
    let m = e.query("result_request", json!({"msg_ids": ["x"]}));
    assert_eq!(m.header.msg_type, "hub_error");
    assert_eq!((m.content["ename"].as_str(), m.content["evalue"].as_str()), (Some("RuntimeError"), Some("disk on fire")));
    let m = e.query("db_request", json!({"query": {}}));
    assert_eq!(m.content["ename"], "RuntimeError");
}
