//! Drives the real `ipengine` binary against a fake controller and a fake compiler (sockets bound
//! here), with real compiled cells: a tiny cdylib built once with `rustc -C prefer-dynamic`,
//! whose functions behave like evcxr's generated cell functions.
//!
//! What a user would check: output arrives on iopub, results and errors come back in
//! ipyparallel's shape, a panic or a crash of user code is reported and the engine keeps
//! serving, control requests are answered while a cell runs, shutdown unregisters.

mod common;

use common::build_cells;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use rpx_protocol::connection::{write_private_json, CompilerConnection, ConnectionInfo, EngineConnection, CONNECTION_INFO_ENV};
use rpx_protocol::{Message, Session};
use serde_json::{json, Value};
use zeromq::{PubSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket};

const KEY: &str = "test-key";
const T: Duration = Duration::from_secs(20);

const CELLS: &str = r#"
use std::ffi::c_void;

#[no_mangle]
pub extern "C" fn cell_ok(store: *mut c_void) -> *mut c_void {
    println!("hello from cell");
    eprintln!("a warning");
    let n = if store.is_null() { 0u64 } else { unsafe { *Box::from_raw(store as *mut u64) } } + 1;
    println!("calls={n}");
    println!("EVCXR_BEGIN_CONTENT text/plain\n42\nEVCXR_END_CONTENT");
    Box::into_raw(Box::new(n)) as *mut c_void
}

#[no_mangle]
pub extern "C" fn cell_panic(store: *mut c_void) -> *mut c_void {
    if std::panic::catch_unwind(|| panic!("boom {}", 7)).is_err() {
        println!("EVCXR_PANIC_NOTIFICATION");
    }
    store
}

#[no_mangle]
pub extern "C" fn cell_abort(_store: *mut c_void) -> *mut c_void {
    eprintln!("about to abort");
    std::process::abort()
}

#[no_mangle]
pub extern "C" fn cell_sleep(store: *mut c_void) -> *mut c_void {
    println!("sleeping");
    std::thread::sleep(std::time::Duration::from_secs(60));
    store
}

/// As evcxr generates it: the user code inside catch_unwind, so an interrupt can stop it.
#[no_mangle]
pub extern "C" fn cell_sleep_catch(store: *mut c_void) -> *mut c_void {
    if std::panic::catch_unwind(|| {
        println!("sleeping");
        std::thread::sleep(std::time::Duration::from_secs(60));
    })
    .is_err()
    {
        println!("EVCXR_PANIC_NOTIFICATION");
    }
    store
}
"#;

async fn router(id: Option<&str>) -> (RouterSocket, u16) {
    let mut o = SocketOptions::default();
    if let Some(id) = id {
        o.peer_identity(id.as_bytes().try_into().unwrap());
    }
    let mut s = RouterSocket::with_options(o);
    let ep = s.bind("tcp://127.0.0.1:0").await.unwrap();
    (s, port(&ep))
}

fn port(ep: &zeromq::Endpoint) -> u16 {
    ep.to_string().rsplit(':').next().unwrap().parse().unwrap()
}

async fn recv(s: &mut impl SocketRecv, session: &Session, what: &str) -> Message {
    let m = tokio::time::timeout(T, s.recv()).await.unwrap_or_else(|_| panic!("timed out waiting for {what}")).unwrap();
    session.decode(m.into_vec()).unwrap()
}

struct Fake {
    s: Session,
    uuid: Bytes,
    mux: RouterSocket,
    task: RouterSocket,
    control: RouterSocket,
    reg: RouterSocket,
    iopub: SubSocket,
    compiler: RouterSocket,
    /// The test cells as an artifact (path, SHA-256, size).
    art: Value,
}

impl Fake {
    async fn send_engine(&mut self, which: &str, msg_type: &str, content: Value) -> String {
        let idents = [self.uuid.clone(), Bytes::from_static(b"client-1")];
        let (h, frames) = self.s.msg(&idents, msg_type, content, None, json!({}), &[]);
        let sock = match which {
            "mux" => &mut self.mux,
            "task" => &mut self.task,
            _ => &mut self.control,
        };
        sock.send(rpx_guard::zmq::message(frames)).await.unwrap();
        h.msg_id
    }

    async fn execute(&mut self, code: &str) -> String {
        self.send_engine("mux", "execute_request", json!({"code": code, "silent": false, "user_expressions": {}})).await
    }

    async fn reply(&mut self, which: &str) -> Message {
        let sock = match which {
            "mux" => &mut self.mux,
            "task" => &mut self.task,
            _ => &mut self.control,
        };
        let m = recv(sock, &self.s, which).await;
        assert_eq!(m.idents, vec![self.uuid.clone(), Bytes::from_static(b"client-1")], "reply routed back by the same identities");
        assert_eq!(m.metadata["engine"], String::from_utf8_lossy(&self.uuid).as_ref(), "replies carry metadata.engine");
        m
    }

    /// The engine's next message to the compiler, past its liveness pings (sent while it waits).
    async fn compiler_recv(&mut self) -> Message {
        loop {
            let m = recv(&mut self.compiler, &self.s, "compiler message").await;
            assert_eq!(m.idents, vec![self.uuid.clone()]);
            if m.msg_type() != "compiler_ping" {
                return m;
            }
        }
    }

    async fn compiler_send(&mut self, msg_type: &str, content: Value) {
        let (_, frames) = self.s.msg(std::slice::from_ref(&self.uuid), msg_type, content, None, json!({}), &[]);
        self.compiler.send(rpx_guard::zmq::message(frames)).await.unwrap();
    }

    /// Play the compiler for one cell whose code names the cell function; returns load_done.
    async fn compile_and_load(&mut self) -> (String, Value) {
        let req = self.compiler_recv().await;
        assert_eq!(req.msg_type(), "cell_request");
        let cell_id = req.content["cell_id"].as_str().unwrap().to_string();
        let fn_name = req.content["code"].as_str().unwrap().trim().to_string();
        self.compiler_send("load", json!({"cell_id": cell_id, "artifact": self.art, "fn_name": fn_name})).await;
        let done = self.compiler_recv().await;
        assert_eq!(done.msg_type(), "load_done");
        assert_eq!(done.content["cell_id"], cell_id.as_str());
        (cell_id, done.content["outcome"].clone())
    }

    async fn cell_reply(&mut self, cell_id: &str, status: &str, extra: Value) {
        let mut c = json!({"cell_id": cell_id, "status": status});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        self.compiler_send("cell_reply", c).await;
    }

    /// Wait until request `msg_id` printed `text` on stdout.
    async fn iopub_until_stdout(&mut self, msg_id: &str, text: &str) {
        let mut out = String::new();
        while !out.contains(text) {
            let m = recv(&mut self.iopub, &self.s, "iopub").await;
            if m.parent_msg_id() == Some(msg_id) && m.msg_type() == "stream" && m.content["name"] == "stdout" {
                out.push_str(m.content["text"].as_str().unwrap_or(""));
            }
        }
    }

    /// iopub messages for request `msg_id` up to its idle status.
    async fn iopub_until_idle(&mut self, msg_id: &str) -> Vec<Message> {
        let mut v = Vec::new();
        loop {
            let m = recv(&mut self.iopub, &self.s, "iopub").await;
            if m.parent_msg_id() != Some(msg_id) {
                continue;
            }
            let idle = m.msg_type() == "status" && m.content["execution_state"] == "idle";
            v.push(m);
            if idle {
                return v;
            }
        }
    }
}

/// The artifact description of a file, as the compiler sends it.
fn artifact(path: &std::path::Path) -> Value {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    json!({"path": path, "sha256": const_hex::encode(sha2::Sha256::digest(&bytes)), "size": bytes.len()})
}

fn stream_text(msgs: &[Message], name: &str) -> String {
    msgs.iter()
        .filter(|m| m.msg_type() == "stream" && m.content["name"] == name)
        .map(|m| m.content["text"].as_str().unwrap().to_string())
        .collect()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the fake compiler presents itself to the engine.
#[derive(Clone, Copy, PartialEq)]
enum Host {
    /// The engine can read the compiler's host probe: it loads artifacts by path.
    Same,
    /// It cannot (another host): it fetches artifacts into the cache directory given.
    Other,
}

/// Bind a fake controller and compiler, start the real `ipengine` against them (connection
/// files for a same-host engine, `RPX_CONNECTION_INFO` for another host's), register it and
/// answer its `engine_hello`.
async fn start(dir: &std::path::Path, host: Host, cache: &std::path::Path) -> (Fake, Kill, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let so = build_cells(dir, CELLS, &[]);
    let s = Session::new(KEY.as_bytes(), "fake");

    let (mut reg, reg_port) = router(None).await;
    let (mux, mux_port) = router(Some("mux_out")).await;
    let (task, task_port) = router(Some("task_out")).await;
    let (control, control_port) = router(Some("control_out")).await;
    let (mut pong, pong_port) = router(None).await;
    let mut iopub = SubSocket::new();
    iopub.subscribe("").await.unwrap();
    let iopub_port = port(&iopub.bind("tcp://127.0.0.1:0").await.unwrap());
    let mut ping = PubSocket::new();
    let ping_port = port(&ping.bind("tcp://127.0.0.1:0").await.unwrap());
    let (mut compiler, compiler_port) = router(None).await;

    let conn = EngineConnection {
        ssh: String::new(),
        interface: "tcp://127.0.0.1".into(),
        registration: reg_port,
        control: control_port,
        mux: mux_port,
        task: task_port,
        iopub: iopub_port,
        hb_ping: ping_port,
        hb_pong: pong_port,
        broadcast: vec![],
        key: KEY.into(),
        curve_serverkey: None,
        location: "localhost".into(),
        pack: "json".into(),
        unpack: "json".into(),
        signature_scheme: "hmac-sha256".into(),
    };
    let compiler_conn = CompilerConnection { url: format!("tcp://127.0.0.1:{compiler_port}"), key: KEY.into(), pid: 0, work_dir: None };

    // Heartbeat: ping every 200 ms, drain pongs.
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            n += 1;
            let _ = ping.send(zeromq::ZmqMessage::from(format!("{n}.0"))).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let pongs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p2 = pongs.clone();
    tokio::spawn(async move {
        while pong.recv().await.is_ok() {
            p2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipengine"));
    cmd.env("RUST_LOG", "info").env("RPX_CACHE_DIR", cache).stderr(Stdio::inherit());
    match host {
        Host::Same => {
            let engine_file = dir.join("ipcontroller-engine.json");
            write_private_json(&engine_file, &conn).unwrap();
            let compiler_file = dir.join("rpx-compiler.json");
            write_private_json(&compiler_file, &compiler_conn).unwrap();
            cmd.arg("--file").arg(&engine_file).arg("--compiler-file").arg(&compiler_file);
        }
        Host::Other => {
            let info = ConnectionInfo { engine: conn, compiler: compiler_conn };
            cmd.env(CONNECTION_INFO_ENV, info.to_line()).env("RPX_PROFILE", "no-such-profile");
        }
    }
    let engine = Kill(cmd.spawn().unwrap());

    // Registration.
    let m = recv(&mut reg, &s, "registration_request").await;
    assert_eq!(m.msg_type(), "registration_request");
    let uuid = m.content["uuid"].as_str().unwrap().to_string();
    // The registration socket has an identity of its own per connection (never the uuid, so a
    // new registration socket cannot take over an old one's identity at the controller).
    assert_eq!(m.idents.len(), 1);
    assert_ne!(m.idents[0], Bytes::from(uuid.clone()));
    assert_eq!(m.content["notify_eviction"], true);
    let (_, frames) = s.msg(
        &m.idents,
        "registration_reply",
        json!({"id": 0, "status": "ok", "hb_period": 1000, "connection_info": {}}),
        Some(&m.header),
        json!({}),
        &[],
    );
    reg.send(rpx_guard::zmq::message(frames)).await.unwrap();

    // Compiler hello.
    let hello = recv(&mut compiler, &s, "engine_hello").await;
    assert_eq!(hello.msg_type(), "engine_hello");
    assert_eq!(hello.content["uuid"], uuid.as_str());
    assert_eq!(hello.content["engine_id"], 0);
    assert_eq!(hello.content["hostname"], std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim());
    // A same-host engine reads the probe and loads artifacts by path; another host's cannot.
    let probe = dir.join("host-token");
    if host == Host::Same {
        std::fs::write(&probe, "token-1").unwrap();
    }
    let libstd = common::libstd();
    let reply = json!({"probe": {"path": probe, "token": "token-1"}, "runtime_libs": [{"name": libstd.file_name().unwrap().to_str().unwrap(), "artifact": artifact(&libstd)}]});
    let (_, frames) = s.msg(&hello.idents, "engine_hello_reply", reply, None, json!({}), &[]);
    compiler.send(rpx_guard::zmq::message(frames)).await.unwrap();

    let f = Fake { s, uuid: Bytes::from(uuid), mux, task, control, reg, iopub, compiler, art: artifact(&so) };
    // Let iopub subscriptions settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (f, engine, pongs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_runs_cells_survives_failures_and_answers_control() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (mut f, mut engine, pongs) = start(dir.path(), Host::Same, &cache).await;
    let uuid = String::from_utf8(f.uuid.to_vec()).unwrap();

    // 1. A cell that prints and returns a value.
    let id = f.execute("cell_ok").await;
    let (cell_id, outcome) = f.compile_and_load().await;
    assert_eq!(cell_id, id);
    assert_eq!(outcome, json!({"kind": "complete", "panicked": false, "error_occurred": false, "changed_types": []}));
    f.cell_reply(&cell_id, "ok", json!({"note": "variable q was not kept"})).await;
    let r = f.reply("mux").await;
    assert_eq!(r.msg_type(), "execute_reply");
    assert_eq!(r.content["status"], "ok");
    assert_eq!(r.content["execution_count"], 1);
    assert_eq!(r.metadata["status"], "ok");
    assert_eq!(r.metadata["dependencies_met"], true);
    let io = f.iopub_until_idle(&id).await;
    assert_eq!(stream_text(&io, "stdout"), "hello from cell\ncalls=1\n");
    let err = stream_text(&io, "stderr");
    assert!(err.contains("a warning") && err.contains("variable q was not kept"), "stderr: {err:?}");
    let result = io.iter().find(|m| m.msg_type() == "execute_result").expect("execute_result");
    assert_eq!(result.content["data"]["text/plain"], "42");
    assert_eq!(result.content["execution_count"], 1);
    assert!(io.iter().any(|m| m.msg_type() == "execute_input" && m.content["code"] == "cell_ok"));
    assert!(io.iter().any(|m| m.msg_type() == "status" && m.content["execution_state"] == "busy"));
    assert!(io.iter().all(|m| m.metadata["engine"] == uuid.as_str()));
    assert_eq!(io[0].idents, vec![Bytes::from("engine.0.status")]);

    // 2. State persists.
    let id = f.execute("cell_ok").await;
    let (cell_id, _) = f.compile_and_load().await;
    f.cell_reply(&cell_id, "ok", json!({})).await;
    assert_eq!(f.reply("mux").await.content["execution_count"], 2);
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=2"));

    // 3. A caught panic is an error with the panic message, even if the compiler says ok.
    let id = f.execute("cell_panic").await;
    let (cell_id, outcome) = f.compile_and_load().await;
    assert_eq!(outcome["panicked"], true);
    f.cell_reply(&cell_id, "ok", json!({})).await;
    let r = f.reply("mux").await;
    assert_eq!(r.content["status"], "error");
    assert_eq!(r.content["ename"], "Panic");
    assert_eq!(r.content["evalue"], "boom 7");
    assert_eq!(r.content["engine_info"]["engine_uuid"], uuid.as_str());
    assert_eq!(r.content["engine_info"]["method"], "execute");
    assert_eq!(r.metadata["status"], "error");
    assert_eq!(r.metadata["engine_info"]["engine_id"], 0);
    let io = f.iopub_until_idle(&id).await;
    assert!(io.iter().any(|m| m.msg_type() == "error" && m.content["ename"] == "Panic"));

    // 4. An abort kills only the worker: reported, restarted, variables gone.
    let id = f.execute("cell_abort").await;
    let (cell_id, outcome) = f.compile_and_load().await;
    assert_eq!(outcome["kind"], "died");
    assert_eq!(outcome["status"], "signal 6 (SIGABRT)");
    f.cell_reply(&cell_id, "error", json!({"ename": "EngineDied", "evalue": "engine died"})).await;
    let r = f.reply("mux").await;
    assert_eq!(r.content["ename"], "EngineWorkerDied");
    let ev = r.content["evalue"].as_str().unwrap();
    assert!(ev.contains("SIGABRT") && ev.contains("restarted") && ev.contains("lost"), "{ev}");
    f.iopub_until_idle(&id).await;
    let id = f.execute("cell_ok").await;
    let (cell_id, _) = f.compile_and_load().await;
    f.cell_reply(&cell_id, "ok", json!({})).await;
    assert_eq!(f.reply("mux").await.content["status"], "ok");
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=1"), "fresh worker, fresh store");

    // 5. Blank code is answered without the compiler; a compile error passes through.
    let id = f.execute("  \n ").await;
    let r = f.reply("mux").await;
    assert_eq!((r.content["status"].as_str(), r.parent_msg_id()), (Some("ok"), Some(id.as_str())));
    let id = f.execute("let x: u32 = \"no\";").await;
    let req = f.compiler_recv().await;
    assert_eq!(req.msg_type(), "cell_request", "the blank cell never reached the compiler");
    f.cell_reply(
        &id,
        "error",
        json!({"ename": "CompileError", "evalue": "error[E0308]: mismatched types", "traceback": ["error[E0308]: mismatched types"]}),
    )
    .await;
    let r = f.reply("mux").await;
    assert_eq!(r.content["ename"], "CompileError");
    assert_eq!(r.content["evalue"], "error[E0308]: mismatched types");

    // 6. Python's apply_request gets a clear error on the task channel.
    f.send_engine("task", "apply_request", json!({})).await;
    let r = f.reply("task").await;
    assert_eq!(r.msg_type(), "apply_reply");
    assert_eq!(r.content["ename"], "UnsupportedPayload");
    assert_eq!(r.content["engine_info"]["method"], "apply");

    // 7. Control while a cell runs: abort a queued request; SIGINT interrupts the running cell
    //    (a panic injected into it) and the engine keeps its variables.
    let sleeping = f.execute("cell_sleep_catch").await;
    let req = f.compiler_recv().await;
    f.compiler_send("load", json!({"cell_id": req.content["cell_id"], "artifact": f.art, "fn_name": "cell_sleep_catch"})).await;
    let queued = f.execute("cell_ok").await;
    f.send_engine("control", "abort_request", json!({"msg_ids": [queued]})).await;
    let r = f.reply("control").await;
    assert_eq!((r.msg_type(), r.content["status"].as_str()), ("abort_reply", Some("ok")));
    f.iopub_until_stdout(&sleeping, "sleeping").await;
    f.send_engine("control", "signal_request", json!({"sig": "SIGINT"})).await;
    let r = f.reply("control").await;
    assert_eq!((r.msg_type(), r.content["status"].as_str()), ("signal_reply", Some("ok")));
    let done = f.compiler_recv().await;
    assert_eq!(
        done.content["outcome"],
        json!({"kind": "complete", "panicked": true, "error_occurred": false, "changed_types": []}),
        "a panic to the compiler"
    );
    f.cell_reply(&sleeping, "ok", json!({})).await;
    let r = f.reply("mux").await;
    assert_eq!(r.parent_msg_id(), Some(sleeping.as_str()));
    assert_eq!(r.content["status"], "error");
    assert_eq!(r.content["ename"], "KeyboardInterrupt");
    assert_eq!(r.content["evalue"], "the cell was interrupted (SIGINT); the engine kept its variables");
    assert_eq!(r.content["engine_info"]["engine_id"], 0);
    let r = f.reply("mux").await;
    assert_eq!((r.parent_msg_id(), r.content["status"].as_str()), (Some(queued.as_str()), Some("aborted")));
    let id = f.execute("cell_ok").await;
    let (cell_id, _) = f.compile_and_load().await;
    f.cell_reply(&cell_id, "ok", json!({})).await;
    assert_eq!(f.reply("mux").await.content["status"], "ok");
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=2"), "same worker, same store");

    // 7b. SIGINT to code that cannot be interrupted (no catch_unwind around it): after the grace
    //     period the worker is killed, and the reply says the variables are lost.
    let id = f.execute("cell_sleep").await;
    let req = f.compiler_recv().await;
    f.compiler_send("load", json!({"cell_id": req.content["cell_id"], "artifact": f.art, "fn_name": "cell_sleep"})).await;
    f.iopub_until_stdout(&id, "sleeping").await;
    f.send_engine("control", "signal_request", json!({"sig": 2})).await;
    assert_eq!(f.reply("control").await.content["status"], "ok");
    let done = f.compiler_recv().await;
    assert_eq!(done.content["outcome"]["kind"], "died");
    let status = done.content["outcome"]["status"].as_str().unwrap();
    assert!(status.contains("SIGINT") && status.contains("did not stop"), "{status}");
    f.cell_reply(&id, "error", json!({"ename": "EngineDied", "evalue": "x"})).await;
    let r = f.reply("mux").await;
    assert_eq!((r.parent_msg_id(), r.content["ename"].as_str()), (Some(id.as_str()), Some("EngineWorkerDied")));
    let ev = r.content["evalue"].as_str().unwrap();
    assert!(ev.contains("did not stop") && ev.contains("lost"), "{ev}");

    // 7c. SIGINT while nothing runs changes nothing.
    for (i, sig) in [(1, None), (2, Some("SIGINT"))] {
        if let Some(sig) = sig {
            f.send_engine("control", "signal_request", json!({"sig": sig})).await;
            assert_eq!(f.reply("control").await.content["status"], "ok");
        }
        let id = f.execute("cell_ok").await;
        let (cell_id, outcome) = f.compile_and_load().await;
        assert_eq!(outcome["panicked"], false);
        f.cell_reply(&cell_id, "ok", json!({})).await;
        assert_eq!(f.reply("mux").await.content["status"], "ok");
        let out = stream_text(&f.iopub_until_idle(&id).await, "stdout");
        assert!(out.contains(&format!("calls={i}")), "a fresh worker after the kill, then kept across an idle SIGINT: {out}");
    }

    // 7d. SIGINT while the cell is being compiled: it does not run (the load is skipped, which
    //     the compiler handles as a panic) and the reply says so.
    let id = f.execute("cell_ok").await;
    let req = f.compiler_recv().await;
    assert_eq!(req.msg_type(), "cell_request");
    f.send_engine("control", "signal_request", json!({"sig": "SIGINT"})).await;
    assert_eq!(f.reply("control").await.content["status"], "ok");
    f.compiler_send("load", json!({"cell_id": id, "artifact": f.art, "fn_name": "cell_ok"})).await;
    let done = f.compiler_recv().await;
    assert_eq!(done.content["outcome"]["kind"], "skipped");
    f.cell_reply(&id, "ok", json!({})).await;
    let r = f.reply("mux").await;
    assert_eq!((r.parent_msg_id(), r.content["ename"].as_str()), (Some(id.as_str()), Some("KeyboardInterrupt")));
    assert_eq!(r.content["evalue"], "the cell was interrupted (SIGINT) before it ran; the engine kept its variables");
    assert!(!stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls="), "the cell did not run");
    let id = f.execute("cell_ok").await;
    f.compile_and_load().await;
    f.cell_reply(&id, "ok", json!({})).await;
    assert_eq!(f.reply("mux").await.content["status"], "ok");
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=3"), "the store is as before");

    // 8. clear_request restarts the worker and tells the compiler.
    f.send_engine("control", "clear_request", json!({})).await;
    assert_eq!(f.reply("control").await.content["status"], "ok");
    let m = f.compiler_recv().await;
    assert_eq!((m.msg_type(), &m.content), ("worker_restarted", &json!({"engine_id": 0})));

    // 9. Heartbeats were answered all along.
    assert!(pongs.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // 10. shutdown_request: reply, unregister, exit 0.
    f.send_engine("control", "shutdown_request", json!({"restart": false})).await;
    assert_eq!(f.reply("control").await.msg_type(), "shutdown_reply");
    let m = recv(&mut f.reg, &f.s, "unregistration_request").await;
    assert_eq!((m.msg_type(), &m.content), ("unregistration_request", &json!({"id": 0})));
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(st) = engine.0.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(!cache.exists(), "a same-host engine never needed the artifact cache");
}

impl Fake {
    /// Answer the engine's `artifact_request` for `expect` (an artifact value) with `bytes`.
    async fn serve_artifact(&mut self, expect: &Value, bytes: &[u8]) {
        let req = self.compiler_recv().await;
        assert_eq!(req.msg_type(), "artifact_request");
        assert_eq!(req.content["sha256"], expect["sha256"]);
        let (_, frames) = self.s.msg(
            std::slice::from_ref(&self.uuid),
            "artifact_reply",
            json!({"sha256": expect["sha256"], "status": "ok", "size": bytes.len()}),
            None,
            json!({}),
            &[Bytes::copy_from_slice(bytes)],
        );
        self.compiler.send(rpx_guard::zmq::message(frames)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_another_host_fetches_each_artifact_once_and_refuses_tampered_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("host-cache");
    let (f, _engine, _) = start(dir.path(), Host::Other, &cache).await;
    let mut f = f;
    let libstd = common::libstd();
    let libstd_art = artifact(&libstd);

    // The first cell: the runtime library, then the cell's artifact, each fetched and checked.
    let id = f.execute("cell_ok").await;
    f.serve_artifact(&libstd_art, &std::fs::read(&libstd).unwrap()).await;
    let req = f.compiler_recv().await;
    assert_eq!(req.msg_type(), "cell_request");
    let art = f.art.clone();
    f.compiler_send("load", json!({"cell_id": id, "artifact": art, "fn_name": "cell_ok"})).await;
    let so = std::fs::read(art["path"].as_str().unwrap()).unwrap();
    f.serve_artifact(&art, &so).await;
    let done = f.compiler_recv().await;
    assert_eq!((done.msg_type(), done.content["outcome"]["kind"].as_str()), ("load_done", Some("complete")));
    f.cell_reply(&id, "ok", json!({})).await;
    assert_eq!(f.reply("mux").await.content["status"], "ok");
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=1"));
    // The cache holds both, private to the user.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read(cache.join(format!("{}.so", art["sha256"].as_str().unwrap()))).unwrap(), so);

    // The same artifact again: loaded from the cache, no request (the next message is load_done).
    let id = f.execute("cell_ok").await;
    f.compiler_recv().await;
    f.compiler_send("load", json!({"cell_id": id, "artifact": art, "fn_name": "cell_ok"})).await;
    let done = f.compiler_recv().await;
    assert_eq!((done.msg_type(), done.content["outcome"]["kind"].as_str()), ("load_done", Some("complete")));
    f.cell_reply(&id, "ok", json!({})).await;
    assert!(stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls=2"), "state kept across cells");
    assert_eq!(f.reply("mux").await.content["status"], "ok");

    // A tampered artifact (bytes that do not match the signed hash) is refused; nothing runs.
    let id = f.execute("cell_ok").await;
    f.compiler_recv().await;
    let mut bad = so.clone();
    bad[so.len() / 2] ^= 0xff;
    let claimed = json!({"path": "/compiler/libcode_9.so", "sha256": "ab".repeat(32), "size": so.len()});
    f.compiler_send("load", json!({"cell_id": id, "artifact": claimed, "fn_name": "cell_ok"})).await;
    f.serve_artifact(&claimed, &bad).await;
    let done = f.compiler_recv().await;
    assert_eq!(done.content["outcome"]["kind"], "skipped");
    f.cell_reply(&id, "ok", json!({})).await;
    let r = f.reply("mux").await;
    assert_eq!(r.content["ename"], "ArtifactError");
    let ev = r.content["evalue"].as_str().unwrap();
    assert!(ev.contains("SHA-256") && ev.contains("refused"), "{ev}");
    assert!(!stream_text(&f.iopub_until_idle(&id).await, "stdout").contains("calls="), "the cell did not run");
    assert!(!cache.join(format!("{}.so", "ab".repeat(32))).exists(), "nothing bad was cached");

    // The compiler's connection drops while a cell waits for it: the cell fails at once.
    let id = f.execute("cell_ok").await;
    f.compiler_recv().await;
    drop(std::mem::replace(&mut f.compiler, RouterSocket::new()));
    let r = f.reply("mux").await;
    assert_eq!(r.content["ename"], "CompilerDied");
    assert!(r.content["evalue"].as_str().unwrap().contains("connection closed"), "{}", r.content["evalue"]);
    let _ = id;
}
