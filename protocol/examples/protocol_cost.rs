//! The wire protocol's own CPU time under one direct `apply` round trip, with no sockets, no
//! threads and no rpx logic: the least that ipyparallel 9's protocol asks of the three processes
//! a round trip crosses, each step done once, with the same `rpx_protocol` calls rpx makes.
//!
//! 1. `client_request`: a new header, the four JSON frames of the request, their HMAC;
//! 2. `controller_request`: the signature checked, the header and metadata read (to route and
//!    record it; the signed frames are forwarded as they are);
//! 3. `engine_request`: the signature checked, the four frames parsed, the closure read;
//! 4. `engine_reply`: the reply's metadata, header and four frames, their HMAC;
//! 5. `controller_reply`: the signature checked, the header, parent header and metadata read;
//! 6. `client_reply`: the signature checked, the four frames parsed.
//!
//! One round trip is the six steps in turn, on one thread with warm caches: a lower bound on
//! what the processes of a real round trip spend on the protocol, next to `hop_floor`'s floor
//! of the same processes and hops with no protocol at all (`bench/issue_table.py` adds them).
//!
//! `cargo run --release -p rpx-protocol --example protocol_cost -- [ROUNDS] [OUT.json]`

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use rpx_protocol::apply::{Closure, ClosureRef, Op};
use rpx_protocol::content::{ReplyMetadata, ReplyStatus};
use rpx_protocol::message::now_iso;
use rpx_protocol::session::{json_frame, DELIMITER};
use rpx_protocol::{Header, Session};
use serde_json::{json, Value};

/// Round trips per round (each round's steps are timed over all of them).
const TRIPS: usize = 20_000;
/// The six steps, in order.
const STEPS: [&str; 6] = ["client_request", "controller_request", "engine_request", "engine_reply", "controller_reply", "client_reply"];

/// The parties of one round trip: the same key, their own session ids, as in a cluster.
struct Parties {
    client: Session,
    controller: Session,
    /// Its session id is its uuid, as an engine's is: the identity the client routes to.
    engine: Session,
    content: Bytes,
    args: Bytes,
}

/// One round trip; `lap` is called after each step with its index.
fn round_trip(p: &Parties, mut lap: impl FnMut(usize)) {
    // 1. The client's request to the engine (routed by the controller's mux by its uuid).
    let header = p.client.header("apply_request");
    let req = p.client.frames(
        [Bytes::from(p.engine.session.clone())],
        json_frame(&header),
        Bytes::from_static(b"{}"),
        Bytes::from_static(b"{}"),
        p.content.clone(),
        [p.args.clone()],
    );
    lap(0);
    // 2. The controller: verify, read what it routes and records by.
    let (idents, signed) = p.controller.verify_frames(req).expect("signed by the same key");
    let h: Header = serde_json::from_slice(&signed[1]).expect("a header");
    let md: Value = serde_json::from_slice(&signed[3]).expect("metadata");
    black_box((&idents, &h, &md));
    lap(1);
    // 3. The engine: verify, parse the four frames, read the closure.
    let mut frames = vec![Bytes::from_static(b"mux_out"), Bytes::from_static(DELIMITER)];
    frames.extend(signed);
    let msg = p.engine.decode(frames).expect("a valid request");
    let op = Op::from_content(&msg.content).expect("an rpx payload").expect("an op");
    black_box(&op);
    lap(2);
    // 4. The engine's reply.
    let mut md = ReplyMetadata::start(&msg.metadata, &p.engine.session, now_iso());
    md.status = Some(ReplyStatus::Ok);
    md.quiet = true;
    let (_, reply) =
        p.engine.msg(&msg.idents, "apply_reply", json!({"status": "ok"}), Some(&msg.header), &md, std::slice::from_ref(&p.args));
    lap(3);
    // 5. The controller: verify, read the reply's header, its parent (the task) and metadata.
    let (idents, signed) = p.controller.verify_frames(reply).expect("signed by the same key");
    let h: Header = serde_json::from_slice(&signed[1]).expect("a header");
    let parent: Header = serde_json::from_slice(&signed[2]).expect("a parent header");
    let md: Value = serde_json::from_slice(&signed[3]).expect("metadata");
    black_box((&idents, &h, &parent, &md));
    lap(4);
    // 6. The client: verify and parse.
    let mut frames = vec![Bytes::from_static(DELIMITER)];
    frames.extend(signed);
    black_box(p.client.decode(frames).expect("a valid reply"));
    lap(5);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(7);
    let out = args.get(1);
    // A cluster's key is a uuid's text, as ipyparallel's connection files hold it.
    let key = uuid::Uuid::new_v4().to_string();
    let engine_uuid = uuid::Uuid::new_v4().to_string();
    let closure = Closure { source: "| x : u64 | x".into(), arg_types: vec!["u64".into()] };
    let p = Parties {
        client: Session::new(key.as_bytes(), "rpx"),
        controller: Session::new(key.as_bytes(), "controller"),
        engine: Session::with_id(key.as_bytes(), "rpx-engine", &engine_uuid),
        // A call after the closure's first use names it by id.
        content: json_frame(&Op::Apply { closure: ClosureRef::by_id(closure.id()) }.to_content()),
        args: Bytes::from_static(&[7]),
    };
    for _ in 0..TRIPS / 10 {
        round_trip(&p, |_| {}); // warm-up
    }
    let mut per_step: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    for _ in 0..rounds {
        let mut spent = [0f64; STEPS.len()];
        for _ in 0..TRIPS {
            let mut last = Instant::now();
            round_trip(&p, |i| {
                let now = Instant::now();
                spent[i] += (now - last).as_secs_f64();
                last = now;
            });
        }
        for (i, s) in spent.iter().enumerate() {
            per_step[i].push(s / TRIPS as f64 * 1e6);
        }
    }
    // The steps' clock reads cost time too: the round trip is timed in a loop without them.
    let mut untimed = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..TRIPS {
            round_trip(&p, |_| {});
        }
        untimed.push(start.elapsed().as_secs_f64() / TRIPS as f64 * 1e6);
    }
    let mut report = serde_json::Map::new();
    report.insert("round_trip_us".into(), json!({"median": median(untimed.clone()), "rounds": untimed}));
    for (name, v) in STEPS.iter().zip(per_step) {
        report.insert(format!("{name}_us"), json!({"median": median(v.clone()), "rounds": v}));
    }
    report.insert("trips_per_round".into(), json!(TRIPS));
    let text = serde_json::to_string_pretty(&Value::Object(report)).expect("json");
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(path, &text).expect("write the report");
    }
}
