//! The engine loop: registration, the request queue, cells through the compiler and the worker,
//! control requests, iopub, heartbeat and shutdown.
//!
//! Single-threaded by design (a `current_thread` runtime): one loop owns all state and handles
//! one event at a time, so no locks are needed; socket I/O lives in small tasks (see
//! [`crate::net`]) that never block the loop. A cell is a state machine advanced by compiler
//! messages and worker events, so control requests are answered while a cell runs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::apply::{ename, Closure, Op};
use rpx_protocol::compile::{msg_type as cmsg, Artifact, ArtifactReply, ArtifactRequest, CellReply, CellRequest, ClosureReply, ClosureRequest, Load, LoadDone, LoadOutcome, RuntimeLib, WorkerRestarted};
use rpx_runtime::abi;
use rpx_protocol::connection::EngineConnection;
use rpx_protocol::{Header, Message, Session};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::artifacts::{self, Fetcher, Kind, Step};
use crate::child::{Worker, WorkerCommand, WorkerEvent};
use crate::liveness::{CompilerWatch, Watch};
use crate::net::{self, Channel, CompilerLink, CompilerSource, Frames, Inbound, LastPing, Outlet};
use crate::output::{find_panic, StderrTail, StdoutEvent, StdoutParser};
use crate::reply::{self, EngineError, Identity};
use crate::{Error, Result};

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub connection: EngineConnection,
    pub compiler: CompilerSource,
    /// The engine id to ask the controller for (`ipengine --mpi`: the rank).
    pub requested_id: Option<u64>,
    /// Registration timeout.
    pub timeout: Duration,
    /// How long to wait for the compiler at startup.
    pub compiler_wait: Duration,
}

/// The engine's start index (ipcluster's launchers set it; otherwise the worker gets the id).
pub const ENGINE_INDEX_ENV: &str = "RPX_ENGINE_INDEX";

/// Streams are flushed at least this often while output is pending.
const FLUSH_PERIOD: Duration = Duration::from_millis(50);
/// Stream buffers are flushed early beyond this size.
const FLUSH_BYTES: usize = 64 * 1024;
/// How long to wait for a panic message on stderr after the cell finished.
const PANIC_GRACE: Duration = Duration::from_millis(150);
/// Lines of worker stderr kept for error reports.
const STDERR_TAIL: usize = 20;
/// After SIGINT, how long running user code has to stop before the worker is killed (its
/// variables are lost then). A cell in a loop whose body cannot unwind (arithmetic, allocation)
/// can only be stopped this way.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// SIGINT is sent again this often during the grace period (one that raced with the worker
/// starting the code is not lost).
const INTERRUPT_REPEAT: Duration = Duration::from_millis(250);

/// Register, connect everything, and serve until shutdown. Returns the process exit code.
pub async fn run(cfg: Config) -> Result<i32> {
    let conn = &cfg.connection;
    let uuid = uuid::Uuid::new_v4().to_string();
    let username = std::env::var("USER").unwrap_or_else(|_| "rpx".into());
    let session = Session::with_id(conn.key.as_bytes(), &username, &uuid);
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Inbound>(1024);

    // Registration.
    let reg_url = conn.url(conn.registration);
    info!(url = %reg_url, %uuid, "registering with the controller");
    let reg = net::connect_dealer(&reg_url, &uuid, cfg.timeout)
        .await
        .map_err(|e| Error::Registration(format!("cannot reach the controller's registration port: {e}")))?;
    let (mut reg_send, mut reg_recv) = reg.split();
    let mut request = json!({"uuid": uuid});
    if let Some(id) = cfg.requested_id {
        request["id"] = json!(id);
    }
    let (_, frames) = session.msg(&[], "registration_request", request, None, json!({"engine": uuid}), &[]);
    send_now(&mut reg_send, frames).await?;
    let deadline = Instant::now() + cfg.timeout;
    let reply = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = match tokio::time::timeout(left, zeromq::SocketRecv::recv(&mut reg_recv)).await {
            Err(_) => {
                return Err(Error::Registration(format!(
                    "no registration reply from the controller at {reg_url} within {:?}; is ipcontroller running?",
                    cfg.timeout
                )))
            }
            Ok(Err(e)) => {
                debug!(error = %e, "registration receive error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ok(Ok(m)) => m,
        };
        match session.decode(m.into_vec()) {
            Ok(msg) if msg.msg_type() == "registration_reply" => break msg,
            Ok(msg) => warn!(msg_type = msg.msg_type(), "unexpected message on the registration socket"),
            Err(e) => warn!(error = %e, "bad message on the registration socket dropped"),
        }
    };
    if reply.content_str("status") != Some("ok") {
        let why = reply.content_str("evalue").or(reply.content_str("reason")).unwrap_or("no reason given");
        return Err(Error::Registration(format!("the controller refused registration: {why}")));
    }
    let id = reply.content.get("id").and_then(Value::as_u64).ok_or_else(|| Error::Registration("registration reply has no id".into()))?;
    let hb_period = Duration::from_millis(reply.content.get("hb_period").and_then(Value::as_u64).unwrap_or(3000).max(10));
    info!(engine_id = id, ?hb_period, "registered");
    let me = Identity { id, uuid: uuid.clone() };

    // Registration socket stays for unregistration.
    let (reg_tx, mut reg_rx) = mpsc::channel::<Frames>(16);
    tokio::spawn(async move {
        while let Some(f) = reg_rx.recv().await {
            let _ = tokio::time::timeout(Duration::from_secs(2), zeromq::SocketSend::send(&mut reg_send, rpx_protocol::zmq::message(f))).await;
        }
        drop(reg_recv);
    });

    // Shell, control, iopub, heartbeat.
    let t = cfg.timeout;
    let mux = net::connect_dealer(&conn.url(conn.mux), &uuid, t).await?;
    let task = net::connect_dealer(&conn.url(conn.task), &uuid, t).await?;
    let control = net::connect_dealer(&conn.url(conn.control), &uuid, t).await?;
    let iopub = net::connect_iopub(&conn.url(conn.iopub), &uuid, t).await?;
    let last_ping = LastPing::new();
    net::start_heart(&conn.url(conn.hb_ping), &conn.url(conn.hb_pong), &uuid, t, last_ping.clone()).await?;
    let outlets = Outlets {
        mux: net::spawn_dealer(mux, "mux", inbound_tx.clone(), |f| Inbound::Shell(Channel::Mux, f)),
        task: net::spawn_dealer(task, "task", inbound_tx.clone(), |f| Inbound::Shell(Channel::Task, f)),
        control: net::spawn_dealer(control, "control", inbound_tx.clone(), Inbound::Control),
        broadcast: None,
        iopub,
        registration: reg_tx,
    };
    if !conn.broadcast.is_empty() {
        let url = conn.url(conn.broadcast[(id as usize) % conn.broadcast.len()]);
        let (uuid, inbound) = (uuid.clone(), inbound_tx.clone());
        tokio::spawn(async move {
            match net::connect_dealer(&url, &uuid, Duration::from_secs(30)).await {
                Ok(s) => {
                    let out = net::spawn_dealer(s, "broadcast", inbound.clone(), |f| Inbound::Shell(Channel::Broadcast, f));
                    let _ = inbound.send(Inbound::BroadcastReady(out)).await;
                }
                Err(e) => warn!(error = %e, "no broadcast scheduler connection; broadcast requests will not reach this engine"),
            }
        });
    }

    // Compiler.
    tokio::spawn(net::connect_compiler(cfg.compiler.clone(), uuid.clone(), id, username.clone(), cfg.compiler_wait, inbound_tx.clone()));

    let (worker_tx, mut worker_rx) = mpsc::channel::<(u64, WorkerEvent)>(256);
    let mut engine = Engine::new(me, session, outlets, worker_tx, inbound_tx, cfg.compiler.clone(), username);
    let hb_limit = (hb_period * 10).max(Duration::from_secs(5));

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Io)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(Error::Io)?;
    let mut next_tick = tokio::time::Instant::now() + Duration::from_secs(1);
    let code = loop {
        tokio::select! {
            Some(ev) = inbound_rx.recv() => engine.on_inbound(ev).await,
            Some((generation, ev)) = worker_rx.recv() => engine.on_worker(generation, ev).await,
            _ = tokio::time::sleep_until(next_tick) => {
                engine.on_tick().await;
                if last_ping.since() > hb_limit {
                    error!(silence = ?last_ping.since(), "no heartbeat from the controller; it is gone, exiting");
                    break engine.shutdown(1).await;
                }
                next_tick = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break engine.shutdown(0).await; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break engine.shutdown(0).await; }
        }
        if let Some(code) = engine.exit_code {
            break engine.shutdown(code).await;
        }
        engine.pump().await;
        // Flush pending output promptly while something is happening.
        let soon = tokio::time::Instant::now() + engine.tick_period();
        if soon < next_tick {
            next_tick = soon;
        }
    };
    Ok(code)
}

async fn send_now(s: &mut zeromq::DealerSendHalf, frames: Frames) -> Result<()> {
    match tokio::time::timeout(Duration::from_secs(5), zeromq::SocketSend::send(s, rpx_protocol::zmq::message(frames))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Connect(format!("send failed: {e}"))),
        Err(_) => Err(Error::Connect("send timed out".into())),
    }
}

/// Where outgoing messages go.
struct Outlets {
    mux: Outlet,
    task: Outlet,
    broadcast: Option<Outlet>,
    control: Outlet,
    iopub: Outlet,
    registration: Outlet,
}

impl Outlets {
    fn for_channel(&self, c: Channel) -> Option<&Outlet> {
        match c {
            Channel::Mux => Some(&self.mux),
            Channel::Task => Some(&self.task),
            Channel::Broadcast => self.broadcast.as_ref(),
            Channel::Control => Some(&self.control),
        }
    }
}

fn push(outlet: &Outlet, frames: Frames, what: &str) {
    if let Err(e) = outlet.try_send(frames) {
        warn!(what, error = %e, "outgoing queue full or closed; message dropped");
    }
}

/// A request waiting for or being handled.
#[derive(Debug)]
struct Request {
    channel: Channel,
    idents: Vec<Bytes>,
    header: Header,
    metadata: Value,
    content: Value,
    buffers: Vec<Bytes>,
}

impl Request {
    fn from_message(channel: Channel, m: Message) -> Request {
        Request { channel, idents: m.idents, header: m.header, metadata: m.metadata, content: m.content, buffers: m.buffers }
    }
    fn msg_type(&self) -> &str {
        &self.header.msg_type
    }
    fn msg_id(&self) -> &str {
        &self.header.msg_id
    }
}

/// Why a cell runs.
#[derive(Debug, Clone, PartialEq)]
enum Purpose {
    /// The user's code (`execute_request`).
    Execute,
    /// Serializing variables into the namespace for a pull of these names.
    Pull(Vec<String>),
}

/// The cell being executed.
#[derive(Debug)]
struct Cell {
    req: Request,
    purpose: Purpose,
    silent: bool,
    count: u64,
    md: Value,
    panicked: bool,
    died: Option<String>,
    content: BTreeMap<String, String>,
    reply: Option<CellReply>,
    grace_until: Option<Instant>,
    /// SIGINT arrived for this cell: loads of it not started yet are skipped.
    interrupt_requested: bool,
    /// The cell was interrupted (`Some(true)`: before the worker ran it).
    interrupted: Option<bool>,
    /// An artifact of the cell could not be had or failed its check: it did not run.
    refused: Option<String>,
}

/// A closure call (apply or map) in progress.
#[derive(Debug)]
struct Call {
    req: Request,
    md: Value,
    mode: u32,
    closure: Closure,
    /// Set once the worker was asked to run it.
    running: bool,
    /// SIGINT arrived while the closure was being compiled: it is not run.
    interrupt_requested: bool,
}

/// An interrupt in progress: the load or call it targets, and when to give up on it.
#[derive(Debug)]
struct Interrupt {
    /// The cell id of the load, or the msg id of the call.
    target: String,
    deadline: Instant,
    next_poke: Instant,
}

/// The load the worker is running.
#[derive(Debug)]
struct Loading {
    cell_id: String,
    panicked: bool,
    error_occurred: bool,
    changed_types: Vec<String>,
}

#[derive(Debug)]
enum CompilerState {
    Connecting,
    Ready(CompilerLink),
    Absent(String),
}

struct Engine {
    me: Identity,
    session: Session,
    out: Outlets,
    inbound_tx: mpsc::Sender<Inbound>,
    compiler_source: CompilerSource,
    username: String,
    compiler: CompilerState,
    reconnecting: bool,
    /// The compiler's liveness, from its messages.
    watch: CompilerWatch,
    /// Where artifacts are loaded from, and the fetches under way.
    fetcher: Fetcher,
    /// The current compiler's runtime libraries, until the worker command names them.
    runtime_libs: Option<Vec<RuntimeLib>>,

    queue: VecDeque<Request>,
    aborted: HashSet<String>,
    current: Option<Cell>,
    execution_count: u64,

    worker_cmd: Option<WorkerCommand>,
    worker: Option<Worker>,
    generation: u64,
    worker_tx: mpsc::Sender<(u64, WorkerEvent)>,
    parser: StdoutParser,
    stderr_tail: StderrTail,
    loading: Option<Loading>,
    pending_loads: VecDeque<Load>,
    spawned_at: Instant,
    quick_deaths: u32,

    out_buf: String,
    err_buf: String,
    stream_parent: Option<Header>,
    last_flush: Instant,

    exit_code: Option<i32>,

    /// The engine namespace: one file per pushed or pulled name (`rpx_runtime::get`).
    ns_dir: PathBuf,
    /// Pushed values not yet bound as cell variables: name -> type, bound by the next cell.
    unbound: BTreeMap<String, String>,
    /// Names whose namespace file holds the variable's current value (no cell ran since).
    fresh: HashSet<String>,
    /// Closures this engine has compiled: artifact and symbol.
    closures: HashMap<Closure, (Artifact, String)>,
    call: Option<Call>,
    interrupt: Option<Interrupt>,
}

impl Engine {
    fn new(
        me: Identity,
        session: Session,
        out: Outlets,
        worker_tx: mpsc::Sender<(u64, WorkerEvent)>,
        inbound_tx: mpsc::Sender<Inbound>,
        compiler_source: CompilerSource,
        username: String,
    ) -> Engine {
        let me_uuid = me.uuid.clone();
        Engine {
            me,
            session,
            out,
            inbound_tx,
            compiler_source,
            username,
            compiler: CompilerState::Connecting,
            reconnecting: true,
            watch: CompilerWatch::new(Instant::now()),
            fetcher: Fetcher::new(true, None),
            runtime_libs: None,
            queue: VecDeque::new(),
            aborted: HashSet::new(),
            current: None,
            execution_count: 0,
            worker_cmd: None,
            worker: None,
            generation: 0,
            worker_tx,
            parser: StdoutParser::new(),
            stderr_tail: StderrTail::new(STDERR_TAIL),
            loading: None,
            pending_loads: VecDeque::new(),
            spawned_at: Instant::now(),
            quick_deaths: 0,
            out_buf: String::new(),
            err_buf: String::new(),
            stream_parent: None,
            last_flush: Instant::now(),
            exit_code: None,
            ns_dir: crate::namespace::dir_for(&me_uuid),
            unbound: BTreeMap::new(),
            fresh: HashSet::new(),
            closures: HashMap::new(),
            call: None,
            interrupt: None,
        }
    }

    fn tick_period(&self) -> Duration {
        let busy = self.current.is_some() || self.call.is_some() || !self.out_buf.is_empty() || !self.err_buf.is_empty() || self.fetcher.busy();
        if busy {
            FLUSH_PERIOD
        } else {
            Duration::from_secs(1)
        }
    }

    // ----- messages out -----

    fn reply(&self, req: &Request, content: Value, md: Value) {
        self.reply_with_buffers(req, content, md, &[]);
    }

    fn reply_with_buffers(&self, req: &Request, content: Value, md: Value, buffers: &[Bytes]) {
        let msg_type = reply::reply_type(req.msg_type());
        let md = reply::finish_metadata(md, &content, &self.me);
        let (_, frames) = self.session.msg(&req.idents, &msg_type, content, Some(&req.header), md, buffers);
        match self.out.for_channel(req.channel) {
            Some(o) => push(o, frames, &msg_type),
            None => warn!(msg_type, "no socket to reply on"),
        }
    }

    fn publish(&self, kind: &str, msg_type: &str, content: Value, parent: Option<&Header>) {
        let topic = Bytes::from(self.me.topic(kind));
        let (_, frames) = self.session.msg(&[topic], msg_type, content, parent, reply::plain_metadata(&self.me), &[]);
        push(&self.out.iopub, frames, msg_type);
    }

    fn status(&self, state: &str, parent: &Header) {
        self.publish("status", "status", json!({"execution_state": state}), Some(parent));
    }

    fn flush_streams(&mut self) {
        for (name, buf) in [("stdout", std::mem::take(&mut self.out_buf)), ("stderr", std::mem::take(&mut self.err_buf))] {
            if !buf.is_empty() {
                self.publish(name, "stream", json!({"name": name, "text": buf}), self.stream_parent.as_ref());
            }
        }
        self.last_flush = Instant::now();
    }

    fn to_compiler(&self, msg_type: &str, content: Value) -> bool {
        let CompilerState::Ready(link) = &self.compiler else { return false };
        let (_, frames) = link.session.msg(&[], msg_type, content, None, reply::plain_metadata(&self.me), &[]);
        push(&link.out, frames, msg_type);
        true
    }

    // ----- events -----

    async fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Shell(channel, frames) => match self.session.decode(frames) {
                Ok(m) => {
                    debug!(msg_type = m.msg_type(), msg_id = m.msg_id(), ?channel, "shell request");
                    self.queue.push_back(Request::from_message(channel, m));
                }
                Err(e) => warn!(error = %e, ?channel, "bad shell message dropped"),
            },
            Inbound::Control(frames) => match self.session.decode(frames) {
                Ok(m) => self.on_control(Request::from_message(Channel::Control, m)).await,
                Err(e) => warn!(error = %e, "bad control message dropped"),
            },
            Inbound::Compiler(frames) => self.on_compiler(frames).await,
            Inbound::CompilerReady(link) => {
                self.reconnecting = false;
                let same_host = std::fs::read_to_string(&link.hello.probe.path).is_ok_and(|t| t == link.hello.probe.token);
                let cache = if same_host {
                    None
                } else {
                    let dir = artifacts::default_dir();
                    artifacts::Cache::open(&dir).map_err(|e| error!(dir = %dir.display(), error = %e, "cannot open the artifact cache")).ok()
                };
                info!(url = %link.url, same_host, cache = ?cache.as_ref().map(|c| c.dir().to_path_buf()), "compiler ready");
                self.fetcher = Fetcher::new(same_host, cache);
                self.runtime_libs = Some(link.hello.runtime_libs.clone());
                self.watch = CompilerWatch::new(Instant::now());
                let fresh_worker = self.worker.is_none();
                self.compiler = CompilerState::Ready(link);
                // The worker command waits for this compiler's runtime libraries.
                self.worker_cmd = None;
                if !fresh_worker {
                    // A new compiler knows nothing of this worker's variables.
                    self.restart_worker("killed by a new compiler connected").await;
                }
                self.progress().await;
            }
            Inbound::CompilerFailed(why) => {
                warn!(%why, "no compiler");
                self.reconnecting = false;
                self.compiler = CompilerState::Absent(why);
                if self.worker_cmd.is_none() {
                    // Pushes and pulls of pushed values need no compiled code.
                    self.set_worker_cmd(vec![]);
                }
                self.ensure_worker();
            }
            Inbound::CompilerLost(link_id) => {
                if matches!(&self.compiler, CompilerState::Ready(l) if l.id == link_id) {
                    self.compiler_gone("its connection closed".into());
                }
            }
            Inbound::BroadcastReady(out) => self.out.broadcast = Some(out),
        }
    }

    fn set_worker_cmd(&mut self, libdirs: Vec<String>) {
        match WorkerCommand::this_binary(&libdirs) {
            Ok(mut c) => {
                // Cells can read their engine's id, as `std::env::var("RPX_ENGINE_ID")`.
                c.env.push(("RPX_ENGINE_ID".to_string(), self.me.id.to_string()));
                if std::env::var_os(ENGINE_INDEX_ENV).is_none() {
                    // Engines not started by ipcluster's local launcher (MPI ranks, by hand).
                    c.env.push((ENGINE_INDEX_ENV.to_string(), self.me.id.to_string()));
                }
                c.env.push((rpx_runtime::NS_DIR_ENV.to_string(), self.ns_dir.display().to_string()));
                self.worker_cmd = Some(c)
            }
            Err(e) => error!(error = %e, "cannot locate the ipengine binary to start workers"),
        }
    }

    async fn on_control(&mut self, req: Request) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.status("busy", &req.header);
        match req.msg_type() {
            "abort_request" => {
                let ids: Option<Vec<String>> = match req.content.get("msg_ids") {
                    Some(Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()),
                    Some(Value::String(s)) => Some(vec![s.clone()]),
                    _ => None,
                };
                match ids.filter(|v| !v.is_empty()) {
                    Some(ids) => self.aborted.extend(ids),
                    None => {
                        // Abort everything queued now.
                        for r in std::mem::take(&mut self.queue) {
                            self.reply_aborted(&r);
                        }
                    }
                }
                self.reply(&req, json!({"status": "ok"}), md);
            }
            "clear_request" => {
                self.restart_worker("killed by clear_request").await;
                self.reply(&req, json!({"status": "ok"}), md);
            }
            "signal_request" => {
                let content = match crate::signals::parse_signal(req.content.get("sig").unwrap_or(&Value::Null)) {
                    Ok(libc::SIGINT) => {
                        self.interrupt();
                        json!({"status": "ok"})
                    }
                    Ok(sig) => match &self.worker {
                        Some(w) => match w.signal(sig) {
                            Ok(()) => {
                                info!(sig, pid = w.pid, "signalled the worker");
                                json!({"status": "ok"})
                            }
                            Err(e) => error_value("SignalError", &format!("cannot signal the worker: {e}"), &self.me, "signal"),
                        },
                        None => json!({"status": "ok"}),
                    },
                    Err(e) => error_value("ValueError", &e, &self.me, "signal"),
                };
                self.reply(&req, content, md);
            }
            "shutdown_request" => {
                let restart = req.content.get("restart").cloned().unwrap_or(Value::Bool(false));
                self.reply(&req, json!({"status": "ok", "restart": restart}), md);
                self.status("idle", &req.header);
                self.exit_code = Some(0);
                return;
            }
            "kernel_info_request" => self.reply(&req, kernel_info(), md),
            other => {
                warn!(msg_type = other, "unsupported control request");
                let c = error_value("UnsupportedRequest", &format!("rpx engines do not handle {other}"), &self.me, other);
                self.reply(&req, c, md);
            }
        }
        self.status("idle", &req.header);
    }

    /// SIGINT: interrupt the running cell or call, keeping the engine's variables (see
    /// [`crate::worker::interrupt`]); if it has not stopped after [`INTERRUPT_GRACE`] the worker
    /// is killed. A cell or closure still being compiled is not run. Otherwise nothing happens.
    fn interrupt(&mut self) {
        if let Some(cell) = &mut self.current {
            cell.interrupt_requested = true;
        }
        if let Some(call) = self.call.as_mut().filter(|c| !c.running) {
            call.interrupt_requested = true;
        }
        let running = self.loading.as_ref().map(|l| l.cell_id.clone()).or_else(|| self.call.as_ref().filter(|c| c.running).map(|c| c.req.msg_id().to_string()));
        let now = Instant::now();
        if let Some(target) = running {
            if self.interrupt.as_ref().is_none_or(|i| i.target != target) {
                self.interrupt = Some(Interrupt { target: target.clone(), deadline: now + INTERRUPT_GRACE, next_poke: now + INTERRUPT_REPEAT });
            }
            info!(%target, "SIGINT: interrupting the running code");
        }
        // The worker ignores SIGINT while it runs nothing.
        if let Some(w) = &self.worker {
            if let Err(e) = w.interrupt() {
                warn!(error = %e, "cannot send SIGINT to the worker");
            }
        }
    }

    /// Follow an interrupt: poke the worker again, or kill it when the grace period is over.
    async fn follow_interrupt(&mut self) {
        let Some(i) = &mut self.interrupt else { return };
        let running = self.loading.as_ref().is_some_and(|l| l.cell_id == i.target) || self.call.as_ref().is_some_and(|c| c.running && c.req.msg_id() == i.target);
        let now = Instant::now();
        if !running {
            self.interrupt = None;
        } else if now >= i.deadline {
            self.interrupt = None;
            warn!(grace = ?INTERRUPT_GRACE, "the interrupted code did not stop; killing the worker");
            let status = format!("killed after SIGINT: the code did not stop within {} s", INTERRUPT_GRACE.as_secs());
            self.restart_worker(&status).await;
        } else if now >= i.next_poke {
            i.next_poke = now + INTERRUPT_REPEAT;
            if let Some(w) = &self.worker {
                let _ = w.interrupt();
            }
        }
    }

    fn reply_aborted(&self, req: &Request) {
        self.status("busy", &req.header);
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.reply(req, reply::aborted(), md);
        self.status("idle", &req.header);
    }

    /// Start queued requests while nothing is running.
    async fn pump(&mut self) {
        while self.current.is_none() && self.call.is_none() && self.exit_code.is_none() {
            let Some(front) = self.queue.front() else { break };
            let needs_compiler = match front.msg_type() {
                "execute_request" => !front.content.get("code").and_then(Value::as_str).unwrap_or("").trim().is_empty(),
                // Closures and pulls may need a compile; wait for the compiler as cells do.
                "apply_request" => front.content.get(rpx_protocol::apply::CONTENT_KEY).is_some(),
                _ => false,
            };
            if needs_compiler && matches!(self.compiler, CompilerState::Connecting) && !self.aborted.contains(front.msg_id()) {
                break;
            }
            let req = self.queue.pop_front().expect("front exists");
            if self.aborted.remove(req.msg_id()) {
                self.reply_aborted(&req);
                continue;
            }
            match req.msg_type() {
                "execute_request" => self.start_execute(req).await,
                "apply_request" => self.start_apply(req).await,
                "kernel_info_request" => {
                    self.status("busy", &req.header);
                    let md = reply::init_metadata(&req.metadata, &self.me);
                    self.reply(&req, kernel_info(), md);
                    self.status("idle", &req.header);
                }
                other => {
                    warn!(msg_type = other, "unsupported shell request");
                    self.status("busy", &req.header);
                    let md = reply::init_metadata(&req.metadata, &self.me);
                    let c = error_value("UnsupportedRequest", &format!("rpx engines do not handle {other}"), &self.me, other);
                    self.reply(&req, c, md);
                    self.status("idle", &req.header);
                }
            }
        }
    }

    async fn start_execute(&mut self, req: Request) {
        self.status("busy", &req.header);
        let code = req.content.get("code").and_then(Value::as_str).unwrap_or("").to_string();
        let silent = req.content.get("silent").and_then(Value::as_bool).unwrap_or(false);
        self.start_cell(req, code, silent, Purpose::Execute).await;
    }

    async fn start_cell(&mut self, req: Request, code: String, silent: bool, purpose: Purpose) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.flush_streams();
        self.stream_parent = Some(req.header.clone());
        if code.trim().is_empty() {
            self.reply(&req, reply::execute_ok(self.execution_count), md);
            self.status("idle", &req.header);
            return;
        }
        if !silent {
            self.execution_count += 1;
            self.publish("execute_input", "execute_input", json!({"code": code, "execution_count": self.execution_count}), Some(&req.header));
        }
        let count = self.execution_count;
        if let CompilerState::Absent(why) = &self.compiler {
            debug!(%why, "no compiler for this cell");
            let err = EngineError::no_compiler();
            self.spawn_reconnect();
            self.finish_with_error(&req, md, &err, count);
            return;
        }
        self.stderr_tail.clear();
        self.ensure_worker();
        let cell_id = req.msg_id().to_string();
        info!(%cell_id, count, ?purpose, "cell");
        let code = crate::namespace::with_bindings(&self.unbound, &code);
        self.to_compiler(cmsg::CELL_REQUEST, serde_json::to_value(CellRequest { cell_id, code }).expect("serializes"));
        self.current = Some(Cell {
            req,
            purpose,
            silent,
            count,
            md,
            panicked: false,
            died: None,
            content: BTreeMap::new(),
            reply: None,
            grace_until: None,
            interrupt_requested: false,
            interrupted: None,
            refused: None,
        });
    }

    // ----- rpx apply payloads: push, pull, closures -----

    async fn start_apply(&mut self, req: Request) {
        self.status("busy", &req.header);
        let md = reply::init_metadata(&req.metadata, &self.me);
        let op = match Op::from_content(&req.content) {
            None => return self.apply_failed(&req, md, &EngineError::unsupported_apply(&self.me)),
            Some(Err(e)) => {
                let err = EngineError::new(ename::UNSUPPORTED_PAYLOAD, format!("malformed rpx payload: {e}"), vec![]);
                return self.apply_failed(&req, md, &err);
            }
            Some(Ok(op)) => op,
        };
        match op {
            Op::Push { names } => {
                let result = crate::namespace::store(&self.ns_dir, &names, &req.buffers);
                match result {
                    Ok(()) => {
                        for n in names {
                            self.fresh.insert(n.name.clone());
                            self.unbound.insert(n.name, n.type_name);
                        }
                        self.reply(&req, json!({"status": "ok"}), md);
                        self.status("idle", &req.header);
                    }
                    Err(e) => self.apply_failed(&req, md, &EngineError::new(ename::UNSUPPORTED_PAYLOAD, e, vec![])),
                }
            }
            Op::Pull { names } => {
                if let Some(bad) = names.iter().find(|n| !crate::namespace::is_identifier(n)) {
                    let err = EngineError::new(ename::NAME_ERROR, format!("`{bad}` is not a variable name"), vec![]);
                    return self.apply_failed(&req, md, &err);
                }
                let stale: Vec<String> = names.iter().filter(|n| !self.fresh.contains(*n)).cloned().collect();
                if stale.is_empty() {
                    self.finish_pull(&req, md, &names);
                } else if let CompilerState::Absent(_) = &self.compiler {
                    self.spawn_reconnect();
                    self.apply_failed(&req, md, &EngineError::no_compiler());
                } else {
                    // The variables live in the worker: a small cell writes them to the namespace.
                    let code = crate::namespace::put_cell(&stale);
                    self.start_cell(req, code, true, Purpose::Pull(names)).await;
                }
            }
            Op::Apply { closure } => self.start_call(req, md, abi::MODE_APPLY, closure).await,
            Op::Map { closure } => self.start_call(req, md, abi::MODE_MAP, closure).await,
        }
    }

    fn apply_failed(&mut self, req: &Request, md: Value, err: &EngineError) {
        self.flush_streams();
        self.publish("error", "error", reply::iopub_error(err, &self.me, "apply"), Some(&req.header));
        let mut c = rpx_protocol::message::error_content(&err.ename, &err.evalue, err.traceback.clone(), Some(self.me.engine_info("apply")));
        c["status"] = json!("error");
        self.reply(req, c, md);
        self.status("idle", &req.header);
    }

    fn finish_pull(&mut self, req: &Request, md: Value, names: &[String]) {
        match crate::namespace::load(&self.ns_dir, names) {
            Ok(buffers) => {
                self.reply_with_buffers(req, json!({"status": "ok"}), md, &buffers);
                self.status("idle", &req.header);
            }
            Err(e) => self.apply_failed(req, md, &EngineError::new(ename::NAME_ERROR, e, vec![])),
        }
    }

    async fn start_call(&mut self, req: Request, md: Value, mode: u32, closure: Closure) {
        if req.buffers.is_empty() {
            let err = EngineError::new(ename::UNSUPPORTED_PAYLOAD, "the call has no argument buffer", vec![]);
            return self.apply_failed(&req, md, &err);
        }
        self.flush_streams();
        self.stream_parent = Some(req.header.clone());
        self.stderr_tail.clear();
        if self.closures.contains_key(&closure) {
            self.call = Some(Call { req, md, mode, closure, running: false, interrupt_requested: false });
            return self.run_call().await;
        }
        // The first call of this closure here: the compiler compiles it (once per cluster).
        let request = ClosureRequest { request_id: req.msg_id().to_string(), closure: closure.clone() };
        self.call = Some(Call { req, md, mode, closure, running: false, interrupt_requested: false });
        if !self.to_compiler(cmsg::CLOSURE_REQUEST, serde_json::to_value(request).expect("serializes")) {
            self.spawn_reconnect();
            let call = self.call.take().expect("set");
            self.apply_failed(&call.req, call.md, &EngineError::no_compiler());
        }
    }

    /// Hand the current call to the worker.
    async fn run_call(&mut self) {
        let Some(call) = &mut self.call else { return };
        if call.interrupt_requested {
            return self.finish_call(Err(EngineError::interrupted("call", true)));
        }
        let Some((artifact, func)) = self.closures.get(&call.closure).cloned() else { return };
        if self.worker_cmd.is_none() && self.runtime_libs.is_some() {
            return; // the runtime libraries are still being fetched
        }
        let so = match self.fetcher.want(&artifact, Kind::Code, Instant::now()) {
            Step::Ready(path) => path.display().to_string(),
            Step::Request(sha) => return self.request_artifact(sha),
            Step::Wait => return,
            Step::Failed(why) => return self.finish_call(Err(EngineError::new(ename::ARTIFACT_ERROR, why, vec![]))),
        };
        let Some(call) = &mut self.call else { return };
        call.running = true;
        self.ensure_worker();
        let sent = match (&mut self.worker, &self.call) {
            (Some(w), Some(call)) => w.send_call(&so, &func, call.mode, &call.req.buffers[0]).await.map_err(|e| e.to_string()),
            _ => Err("the worker could not be started".to_string()),
        };
        if let Err(e) = sent {
            if self.worker.is_none() {
                self.finish_call(Err(EngineError::worker_died(&self.me, &format!("not run: {e}"), vec![])));
            } else {
                // The worker is dying; its exit event fails the call.
                warn!(error = %e, "cannot write to the worker");
            }
        }
    }

    fn on_closure_reply(&mut self, r: ClosureReply) {
        let Some(call) = self.call.as_ref().filter(|c| !c.running && c.req.msg_id() == r.request_id) else {
            warn!(request_id = %r.request_id, "closure_reply for a call that is not waiting; dropped");
            return;
        };
        if let (true, Some(artifact)) = (r.status == "ok", r.artifact) {
            self.closures.insert(call.closure.clone(), (artifact, r.fn_name));
        } else {
            let ename = if r.ename.is_empty() { ename::COMPILE_ERROR.to_string() } else { r.ename };
            self.finish_call(Err(EngineError::new(&ename, r.evalue, r.traceback)));
        }
    }

    /// Answer the current call with its output bytes or an error.
    fn finish_call(&mut self, outcome: Result<Vec<u8>, EngineError>) {
        let Some(call) = self.call.take() else { return };
        self.flush_streams();
        match outcome {
            Ok(data) => {
                self.reply_with_buffers(&call.req, json!({"status": "ok"}), call.md, &[Bytes::from(data)]);
                self.status("idle", &call.req.header);
            }
            Err(e) => {
                info!(msg_id = call.req.msg_id(), ename = %e.ename, "call failed");
                self.apply_failed(&call.req, call.md, &e);
            }
        }
    }

    fn on_call_result(&mut self, status: u32, data: Vec<u8>) {
        if !self.call.as_ref().is_some_and(|c| c.running) {
            warn!(status, "a call result nobody waits for; dropped");
            return;
        }
        let text = || String::from_utf8_lossy(&data).into_owned();
        let outcome = match status {
            abi::STATUS_OK => Ok(data),
            abi::STATUS_PANIC => Err(EngineError::panic(&text(), vec![])),
            abi::STATUS_BAD_INPUT => Err(EngineError::new(ename::UNSUPPORTED_PAYLOAD, text(), vec![])),
            crate::worker::STATUS_INTERRUPTED => Err(EngineError::interrupted("call", false)),
            _ => Err(EngineError::new("CompilerError", text(), vec![])),
        };
        self.finish_call(outcome);
    }

    fn finish_with_error(&mut self, req: &Request, md: Value, err: &EngineError, count: u64) {
        self.flush_streams();
        self.publish("error", "error", reply::iopub_error(err, &self.me, "execute"), Some(&req.header));
        self.reply(req, reply::execute_error(err, count, &self.me), md);
        self.status("idle", &req.header);
    }

    fn spawn_reconnect(&mut self) {
        if self.reconnecting {
            return;
        }
        self.reconnecting = true;
        tokio::spawn(net::connect_compiler(
            self.compiler_source.clone(),
            self.me.uuid.clone(),
            self.me.id,
            self.username.clone(),
            Duration::from_secs(30),
            self.inbound_tx.clone(),
        ));
    }

    async fn on_compiler(&mut self, frames: Frames) {
        let CompilerState::Ready(link) = &self.compiler else {
            debug!("message from a compiler that is no longer current; dropped");
            return;
        };
        let m = match link.session.decode(frames) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "bad message from the compiler dropped");
                return;
            }
        };
        self.watch.heard(Instant::now());
        match m.msg_type() {
            cmsg::PONG => {}
            cmsg::ARTIFACT_REPLY => match serde_json::from_value::<ArtifactReply>(m.content) {
                Ok(r) => {
                    match self.fetcher.on_reply(&r, m.buffers.first().map(|b| &b[..])) {
                        Some((sha, true)) => info!(sha256 = %sha, size = r.size, fetched = self.fetcher.fetched, "artifact fetched from the compiler"),
                        Some((sha, false)) => warn!(sha256 = %sha, "artifact refused"),
                        None => debug!(sha256 = %r.sha256, "artifact_reply nobody waits for; dropped"),
                    }
                    self.progress().await;
                }
                Err(e) => warn!(error = %e, "malformed artifact_reply dropped"),
            },
            cmsg::LOAD => match serde_json::from_value::<Load>(m.content) {
                Ok(load) => {
                    debug!(cell_id = %load.cell_id, so = %load.artifact.path, "load");
                    self.pending_loads.push_back(load);
                    self.run_next_load().await;
                }
                Err(e) => warn!(error = %e, "malformed load dropped"),
            },
            cmsg::CELL_REPLY => match serde_json::from_value::<CellReply>(m.content) {
                Ok(r) => match &mut self.current {
                    Some(cell) if cell.req.msg_id() == r.cell_id => {
                        cell.reply = Some(r);
                        self.maybe_finish();
                    }
                    _ => warn!(cell_id = %r.cell_id, "cell_reply for a cell that is not running; dropped"),
                },
                Err(e) => warn!(error = %e, "malformed cell_reply dropped"),
            },
            cmsg::CLOSURE_REPLY => match serde_json::from_value::<ClosureReply>(m.content) {
                Ok(r) => {
                    self.on_closure_reply(r);
                    if self.call.as_ref().is_some_and(|c| !c.running) {
                        self.run_call().await;
                    }
                }
                Err(e) => warn!(error = %e, "malformed closure_reply dropped"),
            },
            cmsg::ENGINE_HELLO_REPLY => {}
            other => warn!(msg_type = other, "unexpected message from the compiler"),
        }
    }

    fn ensure_worker(&mut self) {
        if self.worker.is_some() {
            return;
        }
        let Some(cmd) = &self.worker_cmd else { return };
        self.generation += 1;
        match Worker::spawn(cmd, self.generation, self.worker_tx.clone()) {
            Ok(w) => {
                info!(pid = w.pid, generation = self.generation, "worker started");
                self.worker = Some(w);
                self.parser = StdoutParser::new();
                self.spawned_at = Instant::now();
            }
            Err(e) => error!(error = %e, "cannot start the worker"),
        }
    }

    /// Skip a load the worker will not run: tell the compiler (it handles a skipped load as a
    /// panicked one) and mark the cell.
    fn skip_load(&mut self, load: Load, reason: String, mark: impl FnOnce(&mut Cell)) {
        if let Some(cell) = self.current.as_mut().filter(|c| c.req.msg_id() == load.cell_id) {
            cell.panicked = true;
            mark(cell);
        }
        info!(cell_id = %load.cell_id, %reason, "load skipped");
        let outcome = LoadOutcome::Skipped { reason };
        self.to_compiler(cmsg::LOAD_DONE, serde_json::to_value(LoadDone { cell_id: load.cell_id, outcome }).expect("serializes"));
    }

    async fn run_next_load(&mut self) {
        if self.loading.is_some() || (self.worker_cmd.is_none() && self.runtime_libs.is_some()) {
            return; // busy, or the runtime libraries are still being fetched
        }
        let (load, path) = loop {
            let Some(load) = self.pending_loads.front().cloned() else { return };
            if self.current.as_ref().is_some_and(|c| c.interrupt_requested && c.req.msg_id() == load.cell_id) {
                self.pending_loads.pop_front();
                self.skip_load(load, "interrupted (SIGINT) before it ran".into(), |c| {
                    c.interrupted.get_or_insert(true);
                });
                continue;
            }
            match self.fetcher.want(&load.artifact, Kind::Code, Instant::now()) {
                Step::Ready(path) => {
                    self.pending_loads.pop_front();
                    break (load, path);
                }
                Step::Request(sha) => return self.request_artifact(sha),
                Step::Wait => return,
                Step::Failed(why) => {
                    self.pending_loads.pop_front();
                    error!(cell_id = %load.cell_id, %why, "artifact refused; the cell does not run");
                    self.skip_load(load, why.clone(), |c| {
                        c.refused.get_or_insert(why);
                    });
                }
            }
        };
        self.ensure_worker();
        self.loading = Some(Loading { cell_id: load.cell_id.clone(), panicked: false, error_occurred: false, changed_types: vec![] });
        let line = format!("LOAD_AND_RUN {} {}", path.display(), load.fn_name);
        let sent = match &mut self.worker {
            Some(w) => w.send_line(&line).await.map_err(|e| e.to_string()),
            None => Err("the worker could not be started".to_string()),
        };
        if let Err(e) = sent {
            if self.worker.is_none() {
                // Nothing will report an exit: answer now.
                self.load_died(&format!("not run: {e}"));
            } else {
                // The worker is dying; its exit event finishes this load.
                warn!(error = %e, "cannot write to the worker");
            }
        }
    }

    fn load_died(&mut self, status: &str) {
        if let Some(l) = self.loading.take() {
            self.to_compiler(cmsg::LOAD_DONE, serde_json::to_value(LoadDone { cell_id: l.cell_id.clone(), outcome: LoadOutcome::Died { status: status.to_string() } }).expect("serializes"));
            if let Some(cell) = &mut self.current {
                if cell.req.msg_id() == l.cell_id {
                    cell.died.get_or_insert_with(|| status.to_string());
                }
            }
        }
    }

    async fn on_worker(&mut self, generation: u64, ev: WorkerEvent) {
        if generation != self.generation || self.worker.is_none() {
            if let WorkerEvent::Exited(st) = &ev {
                debug!(generation, status = %st, "old worker exited");
            }
            return;
        }
        match ev {
            WorkerEvent::Stdout(bytes) => {
                let events = self.parser.feed(&bytes);
                self.on_stdout_events(events).await;
            }
            WorkerEvent::Stderr(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                self.stderr_tail.feed(&text);
                self.err_buf.push_str(&text);
                if self.err_buf.len() > FLUSH_BYTES {
                    self.flush_streams();
                }
                if self.current.as_ref().is_some_and(|c| c.grace_until.is_some()) {
                    self.maybe_finish();
                }
            }
            WorkerEvent::CallResult { status, data } => self.on_call_result(status, data),
            WorkerEvent::Exited(status) => {
                let events = self.parser.finish();
                self.on_stdout_events(events).await;
                if let Some(w) = &mut self.worker {
                    w.pid = -1; // reaped: never signal this pid again
                }
                self.worker = None;
                warn!(%status, "worker died");
                let quick = self.spawned_at.elapsed() < Duration::from_secs(1);
                self.quick_deaths = if quick { self.quick_deaths + 1 } else { 0 };
                self.worker_gone(&status);
                if self.quick_deaths < 5 {
                    self.ensure_worker();
                } else {
                    error!("the worker keeps dying at startup; it will be restarted on demand only");
                }
                self.run_next_load().await;
                self.maybe_finish();
            }
        }
    }

    /// The worker is gone (died or killed): tell the compiler through the running load if there
    /// is one, else with `worker_restarted`, and mark the running cell.
    fn worker_gone(&mut self, status: &str) {
        self.interrupt = None;
        // Bound variables died with the worker; pushed values not yet bound are still files.
        let unbound = &self.unbound;
        self.fresh.retain(|n| unbound.contains_key(n));
        if self.call.as_ref().is_some_and(|c| c.running) {
            let err = EngineError::worker_died(&self.me, status, self.stderr_tail.lines());
            self.finish_call(Err(err));
        }
        if self.loading.is_some() {
            self.load_died(status);
        } else {
            self.to_compiler(cmsg::WORKER_RESTARTED, serde_json::to_value(WorkerRestarted { engine_id: self.me.id }).expect("serializes"));
            if let Some(cell) = &mut self.current {
                cell.died.get_or_insert_with(|| status.to_string());
            }
        }
    }

    /// Kill the worker and start a new one; `status` says why (it is reported as how the
    /// worker died).
    async fn restart_worker(&mut self, status: &str) {
        if let Some(mut w) = self.worker.take() {
            info!(pid = w.pid, status, "restarting the worker");
            w.kill();
            self.worker_gone(status);
        }
        self.quick_deaths = 0;
        self.ensure_worker();
        self.run_next_load().await;
        self.maybe_finish();
    }

    async fn on_stdout_events(&mut self, events: Vec<StdoutEvent>) {
        for ev in events {
            match ev {
                StdoutEvent::Text(t) => {
                    self.out_buf.push_str(&t);
                    if self.out_buf.len() > FLUSH_BYTES {
                        self.flush_streams();
                    }
                }
                StdoutEvent::Panic => {
                    if let Some(l) = &mut self.loading {
                        l.panicked = true;
                        if let Some(c) = self.current.as_mut().filter(|c| c.req.msg_id() == l.cell_id) {
                            c.panicked = true;
                        }
                    }
                }
                StdoutEvent::Interrupted => {
                    if let Some(l) = &self.loading {
                        if let Some(c) = self.current.as_mut().filter(|c| c.req.msg_id() == l.cell_id) {
                            c.interrupted = Some(false);
                        }
                    }
                }
                StdoutEvent::ErrorOccurred => {
                    if let Some(l) = &mut self.loading {
                        l.error_occurred = true;
                    }
                }
                StdoutEvent::ChangedType(name) => {
                    if let Some(l) = &mut self.loading {
                        l.changed_types.push(name);
                    }
                }
                StdoutEvent::Content { mime, data } => {
                    let cell_id = self.loading.as_ref().map(|l| l.cell_id.clone());
                    if let Some(c) = self.current.as_mut().filter(|c| Some(c.req.msg_id().to_string()) == cell_id) {
                        c.content.insert(mime, data);
                    }
                }
                StdoutEvent::InputRequest { prompt, .. } => {
                    self.err_buf.push_str(&format!("[rpx] input is not supported on engines; {prompt:?} gets an empty line\n"));
                    if let Some(w) = &mut self.worker {
                        let _ = w.send_line("").await;
                    }
                }
                StdoutEvent::Complete => {
                    if let Some(l) = self.loading.take() {
                        let done = LoadDone {
                            cell_id: l.cell_id,
                            outcome: LoadOutcome::Complete { panicked: l.panicked, error_occurred: l.error_occurred, changed_types: l.changed_types },
                        };
                        self.to_compiler(cmsg::LOAD_DONE, serde_json::to_value(done).expect("serializes"));
                    } else {
                        warn!("worker completed a load nobody asked for");
                    }
                    self.run_next_load().await;
                    self.maybe_finish();
                }
            }
        }
    }

    /// Finish the running cell if its reply is in and no load of it is running.
    fn maybe_finish(&mut self) {
        let Some(cell) = &mut self.current else { return };
        if cell.reply.is_none() {
            return;
        }
        let id = cell.req.msg_id();
        if self.loading.as_ref().is_some_and(|l| l.cell_id == id) || self.pending_loads.iter().any(|l| l.cell_id == id) {
            return;
        }
        if cell.panicked && cell.died.is_none() && cell.interrupted.is_none() && find_panic(&self.stderr_tail.panic_lines()).is_none_or(|p| p.message.is_empty()) {
            // stdout and stderr are separate pipes: give the panic message a moment to arrive.
            match cell.grace_until {
                None => {
                    cell.grace_until = Some(Instant::now() + PANIC_GRACE);
                    return;
                }
                Some(t) if Instant::now() < t => return,
                Some(_) => {}
            }
        }
        let cell = self.current.take().expect("checked");
        self.finalize(cell, None);
    }

    fn finalize(&mut self, cell: Cell, override_err: Option<EngineError>) {
        self.flush_streams();
        if let Some(note) = cell.reply.as_ref().and_then(|r| r.note.as_ref()).filter(|n| !n.is_empty()) {
            self.err_buf.push_str(note);
            if !note.ends_with('\n') {
                self.err_buf.push('\n');
            }
            self.flush_streams();
        }
        let tail = self.stderr_tail.lines();
        let err = if let Some(e) = override_err {
            Some(e)
        } else if let Some(why) = &cell.refused {
            Some(EngineError::new(ename::ARTIFACT_ERROR, why.clone(), vec![]))
        } else if let Some(status) = &cell.died {
            Some(EngineError::worker_died(&self.me, status, tail))
        } else if let Some(before_run) = cell.interrupted.filter(|_| cell.panicked) {
            Some(EngineError::interrupted("cell", before_run))
        } else if cell.panicked {
            match find_panic(&self.stderr_tail.panic_lines()) {
                Some(p) => Some(EngineError::panic(&p.message, p.lines)),
                None => Some(EngineError::panic("", tail)),
            }
        } else {
            match &cell.reply {
                Some(r) if r.status != "ok" => {
                    let ename = if r.ename.is_empty() { "CompileError" } else { r.ename.as_str() };
                    Some(EngineError::new(ename, r.evalue.clone(), r.traceback.clone()))
                }
                _ => None,
            }
        };
        // Pushed values are bound by any cell that compiled; a binding that cannot compile is
        // dropped (and said so) rather than breaking every later cell.
        let compile_failed = err.as_ref().is_some_and(|e| e.ename == "CompileError");
        if !compile_failed {
            self.unbound.clear();
        } else if let Some(e) = &err {
            if !self.unbound.is_empty() && (e.evalue.contains("rpx_runtime") || e.traceback.iter().any(|l| l.contains("rpx_runtime"))) {
                let names: Vec<String> = std::mem::take(&mut self.unbound).into_keys().collect();
                self.err_buf.push_str(&format!("[rpx] the pushed values {} could not become variables (see the error); push them again with a type the engines can name\n", names.join(", ")));
            }
        }
        if let Purpose::Pull(names) = &cell.purpose {
            let req = &cell.req;
            match err {
                None => {
                    self.fresh.extend(names.iter().cloned());
                    self.finish_pull(req, cell.md, names);
                }
                Some(mut e) => {
                    if e.ename == "CompileError" {
                        let missing = names.iter().find(|n| e.evalue.contains(&format!("cannot find value `{n}`")) || e.traceback.iter().any(|l| l.contains(&format!("cannot find value `{n}`"))));
                        e = match missing {
                            Some(n) => EngineError::new(ename::NAME_ERROR, format!("name `{n}` is not defined on engine {}", self.me.id), vec![]),
                            None => EngineError::new(ename::COMPILE_ERROR, format!("cannot pull {}: {}", names.join(", "), e.evalue), e.traceback),
                        };
                    }
                    self.apply_failed(req, cell.md, &e);
                }
            }
            return;
        }
        if !compile_failed {
            self.fresh.clear();
        }
        let req = &cell.req;
        match err {
            Some(e) => {
                info!(cell_id = req.msg_id(), ename = %e.ename, "cell failed");
                self.finish_with_error(req, cell.md, &e, cell.count);
            }
            None => {
                if !cell.silent && !cell.content.is_empty() {
                    let data: serde_json::Map<String, Value> = cell.content.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                    if data.contains_key("text/plain") {
                        self.publish("execute_result", "execute_result", json!({"data": data, "metadata": {}, "execution_count": cell.count}), Some(&req.header));
                    } else {
                        self.publish("displaypub", "display_data", json!({"data": data, "metadata": {}, "transient": {}}), Some(&req.header));
                    }
                }
                self.reply(req, reply::execute_ok(cell.count), cell.md);
                self.status("idle", &req.header);
            }
        }
    }

    async fn on_tick(&mut self) {
        self.follow_interrupt().await;
        if let Some(t) = self.parser.take_partial_text() {
            self.out_buf.push_str(&t);
        }
        if (!self.out_buf.is_empty() || !self.err_buf.is_empty()) && self.last_flush.elapsed() >= FLUSH_PERIOD {
            self.flush_streams();
        }
        self.maybe_finish();
        for (sha, step) in self.fetcher.poll(Instant::now()) {
            match step {
                Step::Request(sha) => self.request_artifact(sha),
                _ => debug!(sha256 = %sha, "artifact settled by another engine of this host"),
            }
        }
        self.progress().await;
        // A compiler that died, froze or lost its host never answers what waits on it.
        if matches!(self.compiler, CompilerState::Ready(_)) {
            let waiting = (self.current.as_ref().is_some_and(|c| c.reply.is_none())) || self.call.as_ref().is_some_and(|c| !c.running) || self.fetcher.busy();
            match self.watch.check(Instant::now(), waiting) {
                Watch::Quiet => {}
                Watch::Ping => {
                    self.to_compiler(cmsg::PING, json!({}));
                }
                Watch::Gone(silent) => self.compiler_gone(format!("it answered nothing for {} s", silent.as_secs())),
            }
        }
        if let CompilerState::Absent(why) = &self.compiler {
            if self.call.as_ref().is_some_and(|c| !c.running) {
                let err = EngineError::compiler_died(why);
                self.finish_call(Err(err));
                self.spawn_reconnect();
            }
            if self.loading.is_none() {
                if let Some(cell) = self.current.take() {
                    if cell.reply.is_some() {
                        self.current = Some(cell);
                        self.maybe_finish();
                    } else {
                        self.finalize(cell, Some(EngineError::compiler_died("it stopped answering")));
                    }
                }
            }
        }
    }

    /// The compiler is gone (`why`): what waits on it fails now, and a new one is looked for.
    fn compiler_gone(&mut self, why: String) {
        let url = match &self.compiler {
            CompilerState::Ready(l) => l.url.clone(),
            _ => return,
        };
        error!(%url, %why, "the compiler is gone");
        self.compiler = CompilerState::Absent(format!("the compiler at {url} is gone: {why}"));
        self.fetcher.abort_all(&why);
        self.spawn_reconnect();
        let died = EngineError::compiler_died(&why);
        if self.call.as_ref().is_some_and(|c| !c.running) {
            self.finish_call(Err(died.clone()));
        }
        if self.loading.is_none() {
            if let Some(cell) = self.current.take() {
                if cell.reply.is_some() {
                    self.current = Some(cell);
                    self.maybe_finish();
                } else {
                    self.finalize(cell, Some(died));
                }
            }
        }
    }

    fn request_artifact(&mut self, sha256: String) {
        debug!(%sha256, "fetching an artifact from the compiler");
        if !self.to_compiler(cmsg::ARTIFACT_REQUEST, serde_json::to_value(ArtifactRequest { sha256: sha256.clone() }).expect("serializes")) {
            self.fetcher.abort_all("no compiler connected");
        }
    }

    /// Move on with whatever waited for artifacts: the worker command (runtime libraries), the
    /// next load, the waiting call.
    async fn progress(&mut self) {
        if self.worker_cmd.is_none() {
            if let Some(libs) = self.runtime_libs.clone() {
                let mut dirs = Vec::new();
                for lib in &libs {
                    match self.fetcher.want(&lib.artifact, Kind::Runtime { name: lib.name.clone() }, Instant::now()) {
                        Step::Ready(p) => dirs.extend(p.parent().map(|d| d.display().to_string())),
                        Step::Request(sha) => return self.request_artifact(sha),
                        Step::Wait => return,
                        Step::Failed(why) => error!(lib = %lib.name, %why, "runtime library refused; cells that need it will not load"),
                    }
                }
                dirs.dedup();
                info!(?dirs, "runtime libraries ready");
                self.runtime_libs = None;
                self.set_worker_cmd(dirs);
                self.ensure_worker();
            }
        }
        self.run_next_load().await;
        if self.call.as_ref().is_some_and(|c| !c.running) {
            self.run_call().await;
        }
        self.maybe_finish();
    }

    /// Unregister, stop the worker and let queued messages go out.
    async fn shutdown(&mut self, code: i32) -> i32 {
        self.flush_streams();
        if let Some(mut w) = self.worker.take() {
            w.kill();
        }
        let _ = std::fs::remove_dir_all(&self.ns_dir);
        let (_, frames) = self.session.msg(&[], "unregistration_request", json!({"id": self.me.id}), None, reply::plain_metadata(&self.me), &[]);
        push(&self.out.registration, frames, "unregistration_request");
        // Sends are queued: give them a moment to leave.
        tokio::time::sleep(Duration::from_millis(200)).await;
        info!(code, "engine stopped");
        code
    }
}

fn error_value(ename: &str, evalue: &str, me: &Identity, method: &str) -> Value {
    rpx_protocol::message::error_content(ename, evalue, vec![format!("{ename}: {evalue}")], Some(me.engine_info(method)))
}

fn kernel_info() -> Value {
    json!({
        "status": "ok",
        "protocol_version": rpx_protocol::message::PROTOCOL_VERSION,
        "implementation": "rpx",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"},
        "banner": "rpx engine (Rust)",
    })
}
