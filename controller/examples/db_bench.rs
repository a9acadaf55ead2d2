//! The cost of `--db sqlite` on the hot path: N trivial load-balanced tasks through an
//! in-process controller whose engines (protocol-level, in this process) answer at once, so the
//! figure is pure controller overhead: `--db memory` vs `--db sqlite`, alternating, REPS times.
//!
//! ```sh
//! cargo run --release -p rpx-controller --example db_bench -- [N] [REPS] [OUT.json]
//! ```
//! Requests carry 2 buffers (200 + 16 bytes, the size of a pickled trivial `apply`), replies 1
//! (64 bytes). All N are submitted at once (the controller queues them, 16 in flight per
//! engine); the time is from the first submission to the last reply. For sqlite it also reports
//! when the last record was committed to the file, and how long the writer thread alone takes to
//! store N such records (its CPU cost per record, which on a busy machine competes with the
//! hub for cores).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::oneshot;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

use rpx_controller::config::Config;
use rpx_controller::store::DbKind;
use rpx_protocol::{Profile, Session};

const ENGINES: usize = 2;

async fn dealer(url: &str, identity: Option<&str>) -> DealerSocket {
    let mut opts = SocketOptions::default();
    if let Some(id) = identity {
        opts.peer_identity(id.as_bytes().to_vec().try_into().unwrap());
    }
    let mut s = DealerSocket::with_options(opts);
    s.connect(url).await.unwrap();
    s
}

/// One run: returns (seconds for N tasks, seconds until all were committed if sqlite).
async fn one(db: DbKind, n: usize) -> (f64, Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let profile = Profile { name: "bench".into(), dir: dir.path().to_path_buf(), cluster_id: String::new() };
    let mut config = Config::for_tests(profile.clone());
    config.db = db;
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
    let (c, e) = (ready.client.clone(), ready.engine.clone());

    let mut engines = Vec::new();
    for i in 0..ENGINES {
        let uuid = format!("bench-engine-{i}");
        let eng = Session::with_id(key.as_bytes(), "engine", &uuid);
        let mut reg = dealer(&e.url(e.registration), Some(&uuid)).await;
        reg.send(rpx_guard::zmq::message(eng.msg(&[], "registration_request", json!({"uuid": uuid}), None, json!({}), &[]).1))
            .await
            .unwrap();
        reg.recv().await.unwrap();
        let _mux = dealer(&e.url(e.mux), Some(&uuid)).await;
        let mut task = dealer(&e.url(e.task), Some(&uuid)).await;
        engines.push(tokio::spawn(async move {
            let _keep = (reg, _mux);
            let result = [Bytes::from(vec![7u8; 64])];
            while let Ok(m) = task.recv().await {
                let m = eng.decode(m.into_vec()).unwrap();
                let md = json!({"engine": uuid, "status": "ok", "started": rpx_protocol::message::now_iso()});
                let f = eng.msg(&m.idents, "apply_reply", json!({"status": "ok"}), Some(&m.header), md, &result).1;
                if task.send(rpx_guard::zmq::message(f)).await.is_err() {
                    break;
                }
            }
        }));
    }
    let cli = Session::new(key.as_bytes(), "bench-client");
    let mut query = dealer(&c.url(c.registration), None).await;
    loop {
        query.send(rpx_guard::zmq::message(cli.msg(&[], "connection_request", json!({}), None, json!({}), &[]).1)).await.unwrap();
        let r = cli.decode(query.recv().await.unwrap().into_vec()).unwrap();
        if r.content["engines"].as_object().is_some_and(|o| o.len() == ENGINES) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut tx, mut rx) = dealer(&c.url(c.task), None).await.split();
    let bufs = [Bytes::from(vec![1u8; 200]), Bytes::from(vec![2u8; 16])];
    let t0 = Instant::now();
    let sender = {
        let cli = cli.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                let f = cli.msg(&[], "apply_request", json!({}), None, json!({"retries": 0}), &bufs).1;
                tx.send(rpx_guard::zmq::message(f)).await.unwrap();
            }
            tx
        })
    };
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("replies keep coming").unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let _tx = sender.await.unwrap();
    let committed = if db == DbKind::Sqlite {
        let path = rpx_controller::store::db_path(&profile);
        loop {
            let count = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| c.query_row("SELECT count(*) FROM tasks", [], |r| r.get::<_, i64>(0)))
                .unwrap_or(0);
            if count as usize >= n {
                break Some(t0.elapsed().as_secs_f64());
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "records never committed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        None
    };
    drop(stop_tx);
    let _ = tokio::time::timeout(Duration::from_secs(30), ctrl).await;
    for e in engines {
        e.abort();
    }
    (elapsed, committed)
}

/// The writer thread alone: seconds of one thread's work to store `n` records like the
/// benchmark's (batches as the writer takes them), i.e. its CPU cost per record.
fn writer_only(n: usize) -> f64 {
    use rpx_controller::state::Record;
    use rpx_controller::store::{self, StoreMsg, StoreOp, Writer};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tasks.db");
    let mut w = Writer::new(store::open(&path, false).unwrap(), path);
    let cli = Session::new(b"k", "bench-client");
    let eng = Session::new(b"k", "bench-engine");
    let records: Vec<Record> = (0..n)
        .map(|_| {
            let (h, req) = cli.msg(
                &[],
                "apply_request",
                json!({}),
                None,
                json!({"retries": 0}),
                &[Bytes::from(vec![1u8; 200]), Bytes::from(vec![2u8; 16])],
            );
            let (_, rep) =
                eng.msg(&[], "apply_reply", json!({"status": "ok"}), Some(&h), json!({"status": "ok"}), &[Bytes::from(vec![7u8; 64])]);
            let mut r = Record::submitted(&h.msg_id, rpx_controller::wire::Chan::Task, &req[1..], &Bytes::from_static(b"client"));
            r.result = Some(rep[1..].to_vec());
            r.completed = Some(rpx_protocol::message::now_iso());
            r
        })
        .collect();
    let t0 = Instant::now();
    for chunk in records.chunks(4096) {
        w.apply(chunk.iter().map(|r| StoreMsg { op: StoreOp::Put(Box::new(r.clone())), reply: None }).collect());
    }
    t0.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let out = args.get(3).cloned();
    let mut samples = json!({"memory": [], "sqlite": [], "sqlite_committed": []});
    // Warm-up (page cache, allocator), not recorded.
    one(DbKind::Memory, n / 10).await;
    for rep in 0..reps {
        for db in [DbKind::Memory, DbKind::Sqlite] {
            let (t, committed) = one(db, n).await;
            let name = if db == DbKind::Memory { "memory" } else { "sqlite" };
            eprintln!(
                "rep {rep} {name}: {n} tasks in {t:.3} s ({:.0} tasks/s){}",
                n as f64 / t,
                committed.map(|c| format!(", all committed at {c:.3} s")).unwrap_or_default()
            );
            samples[name].as_array_mut().unwrap().push(json!(t));
            if let Some(c) = committed {
                samples["sqlite_committed"].as_array_mut().unwrap().push(json!(c));
            }
        }
    }
    let median = |k: &str| {
        let mut v: Vec<f64> = samples[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (m, s) = (median("memory"), median("sqlite"));
    let w = writer_only(n);
    eprintln!("writer thread alone: {n} records in {w:.3} s ({:.1} us per record)", w * 1e6 / n as f64);
    let summary = json!({
        "tasks": n, "engines": ENGINES, "reps": reps,
        "median_s": {"memory": m, "sqlite": s, "sqlite_all_committed": median("sqlite_committed")},
        "tasks_per_s": {"memory": n as f64 / m, "sqlite": n as f64 / s},
        "sqlite_over_memory": s / m,
        "writer_thread_alone_s": w,
        "writer_us_per_record": w * 1e6 / n as f64,
        "samples_s": samples,
        "date": rpx_protocol::message::now_iso(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
}
