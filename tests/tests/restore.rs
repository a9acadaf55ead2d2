//! Task records survive a controller crash (`ipcontroller --db sqlite`, then `--restore`): the
//! real `ipcontroller` binary runs tasks for a client through a protocol-level engine, is
//! SIGKILLed, and a new controller started with `--restore` on the same profile answers
//! `result_request` (contents and buffers byte for byte), `history_request` and `db_request`
//! for the tasks finished before the crash; purges persist; a damaged database file stops the
//! controller at start with a message naming the file.
//!
//! The engine is simulated in the test (DEALERs with the engine's identity, as an engine
//! connects), so these tests need only the `ipcontroller` binary: no compiler.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend};

use rpx_protocol::connection::read_json;
use rpx_protocol::{ClientConnection, EngineConnection, Message, Profile, Session};
use rpx_tests::{bin, run, show};

const WAIT: Duration = Duration::from_secs(20);
const ENGINE: &str = "restore-test-engine";

/// A controller process, SIGKILLed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn profile(rpx_dir: &Path) -> Profile {
    Profile { name: "default".into(), dir: rpx_dir.join("profile_default"), cluster_id: String::new() }
}

/// Start `ipcontroller ARGS` and wait for its connection files.
async fn start(rpx_dir: &Path, args: &[&str], n: usize) -> (Controller, ClientConnection, EngineConnection) {
    let p = profile(rpx_dir);
    let _ = std::fs::remove_file(p.client_file());
    let _ = std::fs::remove_file(p.engine_file());
    let log = rpx_dir.join(format!("controller-{n}.log"));
    let child = Command::new(bin("ipcontroller"))
        .args(["--ping", "5000"])
        .args(args)
        .env("RPX_DIR", rpx_dir)
        .env_remove("RPX_PROFILE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start ipcontroller");
    let mut c = Controller { child, log };
    let t0 = Instant::now();
    loop {
        if let (Ok(cl), Ok(en)) = (read_json::<ClientConnection>(&p.client_file()), read_json::<EngineConnection>(&p.engine_file())) {
            return (c, cl, en);
        }
        if let Ok(Some(status)) = c.child.try_wait() {
            panic!("ipcontroller {args:?} exited with {status}:\n{}", c.log());
        }
        assert!(t0.elapsed() < WAIT, "no connection files from ipcontroller {args:?}:\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dealer(url: &str, identity: Option<&str>) -> DealerSocket {
    let mut opts = zeromq::SocketOptions::default();
    if let Some(id) = identity {
        opts.peer_identity(id.as_bytes().to_vec().try_into().unwrap());
    }
    let mut s = DealerSocket::with_options(opts);
    tokio::time::timeout(WAIT, s.connect(url)).await.expect("connect in time").unwrap();
    s
}

async fn recv(s: &mut DealerSocket, session: &Session) -> Message {
    let m = tokio::time::timeout(WAIT, s.recv()).await.expect("a message in time").unwrap();
    session.decode(m.into_vec()).unwrap()
}

async fn send(s: &mut DealerSocket, frames: Vec<Bytes>) {
    tokio::time::timeout(WAIT, s.send(rpx_guard::zmq::message(frames))).await.unwrap().unwrap();
}

/// A client's query socket.
struct Query {
    sock: DealerSocket,
    session: Session,
}

impl Query {
    async fn new(c: &ClientConnection) -> Query {
        Query { sock: dealer(&c.url(c.registration), None).await, session: Session::new(c.key.as_bytes(), "restore-test-client") }
    }

    async fn ask(&mut self, msg_type: &str, content: Value) -> Message {
        let (h, f) = self.session.msg(&[], msg_type, content, None, json!({}), &[]);
        send(&mut self.sock, f).await;
        loop {
            let m = recv(&mut self.sock, &self.session).await;
            if m.parent_msg_id() == Some(h.msg_id.as_str()) {
                return m;
            }
        }
    }
}

/// Register the simulated engine, run `n` load-balanced tasks and one direct (mux) request,
/// each with request buffers, answered with result buffers; returns their msg_ids.
async fn run_tasks(c: &ClientConnection, e: &EngineConnection, n: usize) -> Vec<String> {
    let eng = Session::with_id(e.key.as_bytes(), "engine", ENGINE);
    let mut reg = dealer(&e.url(e.registration), Some(ENGINE)).await;
    send(&mut reg, eng.msg(&[], "registration_request", json!({"uuid": ENGINE}), None, json!({}), &[]).1).await;
    let reply = recv(&mut reg, &eng).await;
    assert_eq!(reply.content["status"], "ok", "{:?}", reply.content);
    let mut emux = dealer(&e.url(e.mux), Some(ENGINE)).await;
    let mut etask = dealer(&e.url(e.task), Some(ENGINE)).await;
    let mut q = Query::new(c).await;
    let t0 = Instant::now();
    while q.ask("connection_request", json!({})).await.content["engines"]["0"] != ENGINE {
        assert!(t0.elapsed() < WAIT, "the engine never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cli = Session::new(c.key.as_bytes(), "restore-test-client");
    let mut ctask = dealer(&c.url(c.task), None).await;
    let mut cmux = dealer(&c.url(c.mux), None).await;
    let mut ids = Vec::new();
    // Binary buffers, some empty, some large, so that a byte lost or reordered shows.
    let result_bufs =
        |i: usize| vec![Bytes::from(vec![(i % 251) as u8; 1 + i * 997]), Bytes::new(), Bytes::from(format!("\0\u{ff}result {i}"))];
    for i in 0..n {
        let (h, f) = cli.msg(
            &[],
            "apply_request",
            json!({}),
            None,
            json!({"retries": 0}),
            &[Bytes::from(format!("arg {i}")), Bytes::from_static(b"\xff\x00")],
        );
        send(&mut ctask, f).await;
        let got = recv(&mut etask, &eng).await;
        assert_eq!(got.header.msg_id, h.msg_id);
        let md = json!({"engine": ENGINE, "status": "ok", "started": rpx_protocol::message::now_iso()});
        send(&mut etask, eng.msg(&got.idents, "apply_reply", json!({"status": "ok"}), Some(&got.header), md, &result_bufs(i)).1).await;
        let back = recv(&mut ctask, &cli).await;
        assert_eq!(back.buffers, result_bufs(i));
        ids.push(h.msg_id);
    }
    let (h, f) = cli.msg(&[Bytes::from(ENGINE)], "execute_request", json!({"code": "direct"}), None, json!({}), &[]);
    send(&mut cmux, f).await;
    let got = recv(&mut emux, &eng).await;
    send(
        &mut emux,
        eng.msg(
            &got.idents,
            "execute_reply",
            json!({"status": "ok", "execution_count": 1}),
            Some(&got.header),
            json!({"engine": ENGINE, "status": "ok"}),
            &[],
        )
        .1,
    )
    .await;
    recv(&mut cmux, &cli).await;
    ids.push(h.msg_id);
    ids
}

/// Wait until the database file holds `n` committed records (what survives a SIGKILL).
async fn wait_committed(db: &Path, n: i64) {
    let t0 = Instant::now();
    loop {
        let count = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT count(*) FROM tasks", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(-1);
        if count == n {
            eprintln!("{n} records committed {:?} after the last reply", t0.elapsed());
            return;
        }
        assert!(t0.elapsed() < WAIT, "{count} of {n} records committed to {}", db.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_survive_a_sigkilled_controller_with_restore() {
    let dir = tempfile::Builder::new().prefix("rpx-restore-").tempdir().unwrap();
    let db = dir.path().join("profile_default/security/tasks.db");
    let (mut first, c, e) = start(dir.path(), &["--db", "sqlite"], 1).await;
    let ids = run_tasks(&c, &e, 30).await;
    wait_committed(&db, ids.len() as i64).await;
    assert_eq!(mode(&db), 0o600);
    for companion in ["tasks.db-wal", "tasks.db-shm"] {
        let p = dir.path().join("profile_default/security").join(companion);
        assert_eq!(mode(&p), 0o600, "{companion} holds task data too");
    }

    // What the live controller answers: the reference.
    let mut q = Query::new(&c).await;
    let before = q.ask("result_request", json!({"msg_ids": ids, "status_only": false})).await;
    assert_eq!(before.header.msg_type, "result_reply", "{:?}", before.content);
    let history_before = q.ask("history_request", json!({})).await.content["history"].clone();
    assert_eq!(history_before, json!(ids));
    let keys = json!([
        "msg_id",
        "header",
        "content",
        "buffers",
        "result_header",
        "result_content",
        "result_buffers",
        "engine_uuid",
        "queue",
        "submitted",
        "completed"
    ]);
    let db_before = q.ask("db_request", json!({"query": {"engine_uuid": ENGINE}, "keys": keys})).await;

    // Crash.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);

    let (second, c2, _) = start(dir.path(), &["--db", "sqlite", "--restore"], 2).await;
    assert!(second.log().contains("restored the task database"), "{}", second.log());
    assert_ne!(c2.registration, 0);
    let mut q = Query::new(&c2).await;
    let after = q.ask("result_request", json!({"msg_ids": ids, "status_only": false})).await;
    assert_eq!(after.header.msg_type, "result_reply", "{:?}", after.content);
    assert_eq!(after.content, before.content, "the same records after the crash");
    assert_eq!(after.buffers, before.buffers, "the same result buffers, byte for byte");
    assert_eq!(after.buffers.len(), 3 * (ids.len() - 1));
    assert_eq!(q.ask("history_request", json!({})).await.content["history"], history_before);
    let db_after = q.ask("db_request", json!({"query": {"engine_uuid": ENGINE}, "keys": keys})).await;
    assert_eq!(db_after.content, db_before.content);
    assert_eq!(db_after.buffers, db_before.buffers);
    let some =
        q.ask("db_request", json!({"query": {"msg_id": {"$in": [ids[3].clone(), ids[7].clone()]}}, "keys": ["msg_id", "queue"]})).await;
    assert_eq!(some.content["records"], json!([{"msg_id": ids[3], "queue": "task"}, {"msg_id": ids[7], "queue": "task"}]));
    let mux = q.ask("db_request", json!({"query": {"queue": "mux"}, "keys": ["msg_id"]})).await;
    assert_eq!(mux.content["records"], json!([{"msg_id": ids.last().unwrap()}]));

    // A purge persists across another crash.
    let p = q.ask("purge_request", json!({"msg_ids": [ids[0].clone()]})).await;
    assert_eq!(p.header.msg_type, "purge_reply");
    wait_committed(&db, ids.len() as i64 - 1).await;
    drop(second);
    let (third, c3, _) = start(dir.path(), &["--db", "sqlite", "--restore"], 3).await;
    let mut q = Query::new(&c3).await;
    let gone = q.ask("result_request", json!({"msg_ids": [ids[0].clone()]})).await;
    assert_eq!(gone.content["ename"], "KeyError", "{:?}", gone.content);
    let kept = q.ask("result_request", json!({"msg_ids": [ids[1].clone()], "status_only": false})).await;
    assert_eq!(kept.content[ids[1].as_str()], before.content[ids[1].as_str()]);
    drop(third);

    // Without --restore a controller starts a new database and keeps the old one aside.
    let (_fourth, c4, _) = start(dir.path(), &["--db", "sqlite"], 4).await;
    let mut q = Query::new(&c4).await;
    let fresh = q.ask("result_request", json!({"msg_ids": [ids[1].clone()]})).await;
    assert_eq!(fresh.content["ename"], "KeyError");
    assert!(dir.path().join("profile_default/security/tasks.db.prev").exists());
}

#[test]
fn a_damaged_database_is_a_clear_startup_error() {
    let dir = tempfile::Builder::new().prefix("rpx-restore-").tempdir().unwrap();
    let sec = dir.path().join("profile_default/security");
    std::fs::create_dir_all(&sec).unwrap();
    std::fs::write(sec.join("tasks.db"), vec![0x42u8; 4096]).unwrap();
    let mut cmd = Command::new(bin("ipcontroller"));
    cmd.args(["--db", "sqlite", "--restore"]).env("RPX_DIR", dir.path()).env_remove("RPX_PROFILE");
    let out = run(&mut cmd, WAIT);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tasks.db") && err.contains("not an rpx task database"), "{}", show(&out));
    assert!(!sec.join("ipcontroller-client.json").exists(), "nothing was started");

    let mut cmd = Command::new(bin("ipcontroller"));
    cmd.args(["--restore"]).env("RPX_DIR", dir.path());
    let out = run(&mut cmd, WAIT);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--restore needs --db sqlite"), "{}", show(&out));
}
