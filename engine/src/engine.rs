//! The engine loop: it wires events (requests, compiler messages, worker output, the clock) to
//! the engine's decisions and carries out what they return: replies and publications through
//! the [`Outbox`], messages to the compiler, lines to the worker.
//!
//! The decisions live in pure modules: which queued request starts ([`crate::queue`]), how a
//! cell and its loads go ([`crate::cell`]), how a closure call ends ([`crate::call`]), when the
//! worker is restarted or killed after SIGINT ([`crate::supervise`]), whether there is a
//! compiler ([`crate::compiler`], [`crate::liveness`]), where artifacts come from
//! ([`crate::artifacts`]), whether the controller still has this engine and when to register
//! again or give up ([`crate::link`]).
//!
//! Single-threaded by design (a `current_thread` runtime): one loop owns all state and handles
//! one event at a time, so no locks are needed; socket I/O lives in small tasks (see
//! [`crate::net`]) that never block the loop. A cell is a state machine advanced by compiler
//! messages and worker events, so control requests are answered while a cell runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::apply::{ename, Closure, Op};
use rpx_protocol::compile::{msg_type as cmsg, ArtifactRequest, CellRequest, Load, LoadDone, RuntimeLib, WorkerRestarted};
use rpx_protocol::connection::EngineConnection;
use rpx_protocol::registration::{msg_type as reg_msg, EvictionNotice};
use rpx_protocol::Session;
use rpx_runtime::abi;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::artifacts::{Fetcher, Kind, RuntimeStep, Step};
use crate::call::{self, Call, CallStep, ClosureVerdict, Closures};
use crate::cell::{Bindings, Cell, Ending, LoadStep, Loads, PullPlan, Purpose, Skip};
use crate::child::{WorkerCommand, WorkerEvent, WorkerSlot, WriteFailed};
use crate::compiler::{Compiler, CompilerMessage};
use crate::history::WorkerHistory;
use crate::link::{self, Link};
use crate::liveness::Watch;
use crate::net::{self, Channel, CompilerLink, CompilerSource, ControllerSource, Frames, Inbound, Outlets, Pings, Rejoined, Tasks};
use crate::outbox::{Outbox, Stream, FLUSH_PERIOD};
use crate::output::{StderrMarks, StderrPiece, StderrTail, StdoutEvent, StdoutParser};
use crate::queue::{Next, Queue, Request};
use crate::reply::{self, EngineError, Identity};
use crate::supervise::{InterruptStep, Restart, Supervisor};
use crate::{Error, Result};

pub use crate::supervise::INTERRUPT_GRACE;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub connection: EngineConnection,
    /// The engine connection file `connection` came from, read again when registering anew.
    pub connection_file: Option<PathBuf>,
    pub compiler: CompilerSource,
    /// The engine id to ask the controller for (`ipengine --mpi`: the rank).
    pub requested_id: Option<u64>,
    /// Registration timeout.
    pub timeout: Duration,
    /// How long to wait for the compiler at startup.
    pub compiler_wait: Duration,
    /// This engine replaces one that died (ipcluster's supervisor says so): the notice to
    /// publish on stderr with the first request it runs.
    pub restart_notice: Option<String>,
    /// How long to keep trying to register again once the controller is lost (then exit).
    pub reconnect_timeout: Duration,
}

/// Longest single attempt to register again (connects and the reply); attempts repeat until
/// the reconnect timeout.
const REJOIN_ATTEMPT: Duration = Duration::from_secs(3);

/// Awake time without a heartbeat ping after which the controller counts as lost.
fn silence_limit(hb_period: Duration) -> Duration {
    (hb_period * 10).max(Duration::from_secs(5))
}

/// The engine's start index (ipcluster's launchers set it; otherwise the worker gets the id).
pub const ENGINE_INDEX_ENV: &str = "RPX_ENGINE_INDEX";

/// Ticks (of [`crate::outbox::FLUSH_PERIOD`] while a cell runs) a worker blocked reading its
/// stdin is left before the cell is refused input.
const STDIN_READ_TICKS: u32 = 8;

/// Lines of worker stderr kept for error reports.
const STDERR_TAIL: usize = 20;

/// Register, connect everything, and serve until shutdown. Returns the process exit code.
pub async fn run(cfg: Config) -> Result<i32> {
    let conn = &cfg.connection;
    let uuid = uuid::Uuid::new_v4().to_string();
    let username = std::env::var("USER").unwrap_or_else(|_| "rpx".into());
    let session = Session::with_id(conn.key.as_bytes(), &username, &uuid);
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<Inbound>(1024);
    for dir in rpx_protocol::connection::sweep_dead_namespaces() {
        info!(dir = %dir.display(), "removed the namespace of an engine that is gone");
    }
    crate::namespace::create(&uuid)?;

    let registration = net::register(&session, &conn.url(conn.registration), &uuid, cfg.requested_id, cfg.timeout, &inbound_tx).await?;
    let id = registration.id;
    let me = Identity { id, uuid: uuid.clone() };
    let sockets = net::connect_engine(conn, &uuid, id, cfg.timeout, &inbound_tx).await?;
    let outlets = Outlets {
        mux: sockets.mux.clone(),
        task: sockets.task.clone(),
        control: sockets.control.clone(),
        broadcast: None,
        iopub: sockets.iopub.clone(),
        registration: registration.outlet.clone(),
    };
    tokio::spawn(net::connect_compiler(
        cfg.compiler.clone(),
        uuid.clone(),
        id,
        username.clone(),
        cfg.compiler_wait,
        Vec::new(),
        inbound_tx.clone(),
    ));

    let source = match &cfg.connection_file {
        Some(f) => ControllerSource::File(f.clone(), conn.clone()),
        None => ControllerSource::Given(conn.clone()),
    };
    let link = Link::new(registration.request.clone(), cfg.reconnect_timeout, silence_limit(registration.hb_period), Instant::now());
    let controller = Controller {
        link,
        source,
        key: conn.key.clone(),
        reg_generation: registration.generation,
        sock_generation: sockets.generation,
        pings: sockets.pings,
        reg_tasks: registration.tasks,
        sock_tasks: sockets.tasks,
    };
    let (worker_tx, mut worker_rx) = mpsc::channel::<(u64, WorkerEvent)>(256);
    let mut engine = Engine::new(me, session, outlets, worker_tx, inbound_tx, cfg.compiler.clone(), username, controller);
    engine.restart_notice = cfg.restart_notice.clone();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(Error::Io)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(Error::Io)?;
    let mut next_tick = tokio::time::Instant::now() + Duration::from_secs(1);
    let code = loop {
        tokio::select! {
            Some(ev) = inbound_rx.recv() => engine.on_inbound(ev).await,
            Some((generation, ev)) = worker_rx.recv() => engine.on_worker(generation, ev).await,
            _ = tokio::time::sleep_until(next_tick) => {
                engine.on_tick().await;
                engine.step_link();
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

/// The engine's side of the controller: the link's state and the sockets it holds.
struct Controller {
    link: Link,
    source: ControllerSource,
    /// The key of the connection info in use.
    key: String,
    /// Generations of the current registration socket and other sockets (events of older
    /// ones are ignored).
    reg_generation: u64,
    sock_generation: u64,
    pings: Pings,
    /// The tasks serving the sockets (dropping them closes the sockets).
    reg_tasks: Tasks,
    sock_tasks: Tasks,
}

struct Engine {
    me: Identity,
    controller: Controller,
    session: Session,
    out: Outbox,
    inbound_tx: mpsc::Sender<Inbound>,
    compiler_source: CompilerSource,
    username: String,
    compiler: Compiler,
    /// Where artifacts are loaded from, and the fetches under way.
    fetcher: Fetcher,
    /// The current compiler's runtime libraries, until the worker command names them.
    runtime_libs: Option<Vec<RuntimeLib>>,
    /// The runtime libraries the worker command was made for.
    command_libs: Option<Vec<RuntimeLib>>,

    queue: Queue,
    current: Option<Cell>,
    /// The worker (pid) and the buffer of its own blocked read of commands, seen while idle
    /// (see [`Engine::check_stdin_read`]).
    worker_read: Option<(i32, String)>,
    execution_count: u64,

    workers: WorkerSlot,
    parser: StdoutParser,
    stderr_tail: StderrTail,
    loads: Loads,
    supervisor: Supervisor,

    exit_code: Option<i32>,
    /// What the running worker has run, for a new compiler after a crash.
    history: WorkerHistory,
    /// The connection attempt under way carries the worker's whole history.
    history_sent: bool,
    /// Published on stderr with the first execute or apply request (see
    /// [`Config::restart_notice`]).
    restart_notice: Option<String>,

    /// The engine namespace: one file per pushed or pulled name (`rpx_runtime::get`).
    ns_dir: PathBuf,
    /// Digests of value files adopted from same-host pushes (a pull of them hashes nothing).
    digests: crate::namespace::Digests,
    bindings: Bindings,
    closures: Closures,
    /// The call whose output is being published: waiting for its closure, or in the worker.
    call: Option<Call>,
    /// Calls handed to the worker after `call`, in order (see [`call::PIPE_DEPTH`]).
    piped: std::collections::VecDeque<Call>,
    /// Finds the worker's end-of-call markers in its stderr.
    stderr_marks: StderrMarks,
}

impl Engine {
    #[allow(clippy::too_many_arguments)] // the parts the engine loop is made of, each built in `run`
    fn new(
        me: Identity,
        session: Session,
        outlets: Outlets,
        worker_tx: mpsc::Sender<(u64, WorkerEvent)>,
        inbound_tx: mpsc::Sender<Inbound>,
        compiler_source: CompilerSource,
        username: String,
        controller: Controller,
    ) -> Engine {
        Engine {
            controller,
            out: Outbox::new(me.clone(), session.clone(), outlets),
            ns_dir: crate::namespace::dir_for(&me.uuid),
            digests: Default::default(),
            me,
            session,
            inbound_tx,
            compiler_source,
            username,
            compiler: Compiler::new(Instant::now()),
            fetcher: Fetcher::new(true, None),
            runtime_libs: None,
            command_libs: None,
            queue: Queue::new(),
            current: None,
            worker_read: None,
            execution_count: 0,
            workers: WorkerSlot::new(worker_tx),
            parser: StdoutParser::new(),
            stderr_tail: StderrTail::new(STDERR_TAIL),
            loads: Loads::default(),
            supervisor: Supervisor::new(Instant::now()),
            exit_code: None,
            history: WorkerHistory::default(),
            history_sent: false,
            restart_notice: None,
            bindings: Bindings::default(),
            closures: Closures::default(),
            call: None,
            piped: Default::default(),
            stderr_marks: StderrMarks::default(),
        }
    }

    fn tick_period(&self) -> Duration {
        let busy = self.current.is_some() || self.call.is_some() || self.out.pending() || self.fetcher.busy();
        if busy {
            FLUSH_PERIOD
        } else {
            Duration::from_secs(1)
        }
    }

    /// Send to the compiler; `false` if none is ready.
    fn to_compiler(&self, msg_type: &str, content: impl serde::Serialize) -> bool {
        self.compiler.send(msg_type, serde_json::to_value(content).expect("serializes"), reply::plain_metadata(&self.me))
    }

    fn load_done(&mut self, done: LoadDone) {
        self.history.loaded(&done.cell_id, &done.outcome);
        self.to_compiler(cmsg::LOAD_DONE, done);
    }

    /// The runtime libraries of the compiler are still being fetched: nothing can load yet.
    fn runtime_pending(&self) -> bool {
        !self.workers.has_command() && self.runtime_libs.is_some()
    }

    // ----- events -----

    async fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Shell(channel, frames) => match self.session.decode(frames) {
                Ok(m) => {
                    debug!(msg_type = m.msg_type(), msg_id = m.msg_id(), ?channel, "shell request");
                    let msg_id = m.msg_id().to_string();
                    if !self.queue.push(Request::from_message(channel, m)) {
                        info!(%msg_id, "dropped a request the controller answered when it evicted this engine");
                    }
                }
                Err(e) => warn!(error = %e, ?channel, "bad shell message dropped"),
            },
            Inbound::Control(frames) => match self.session.decode(frames) {
                Ok(m) => self.on_control(Request::from_message(Channel::Control, m)).await,
                Err(e) => warn!(error = %e, "bad control message dropped"),
            },
            Inbound::Compiler(frames) => self.on_compiler(frames).await,
            Inbound::CompilerReady(link) => self.on_compiler_ready(*link).await,
            Inbound::CompilerFailed(why) => {
                warn!(%why, "no compiler");
                self.compiler.failed(why);
                if !self.workers.has_command() {
                    // Pushes and pulls of pushed values need no compiled code.
                    self.set_worker_cmd(vec![]);
                }
                self.ensure_worker();
            }
            Inbound::CompilerLost(link_id) => {
                if self.compiler.is_current(link_id) {
                    self.compiler_gone("its connection closed".into());
                }
            }
            Inbound::BroadcastReady(generation, out, tasks) => {
                if generation == self.controller.sock_generation {
                    self.out.outlets.broadcast = Some(out);
                    self.controller.sock_tasks.absorb(tasks);
                }
            }
            Inbound::Registration(generation, frames) => {
                if generation == self.controller.reg_generation {
                    self.on_registration_message(frames);
                }
            }
            Inbound::ControllerLost(generation, socket) => {
                let c = &mut self.controller;
                if generation == c.reg_generation || generation == c.sock_generation {
                    if c.link.is_up() {
                        warn!(socket, "the connection to the controller closed; registering again");
                    }
                    c.link.lost(&format!("its {socket} connection closed"), true, Instant::now());
                    self.step_link();
                }
            }
            Inbound::Rejoined(outcome) => self.on_rejoined(*outcome),
        }
    }

    // ----- the controller link -----

    /// A message on the registration socket: an eviction notice ends the current
    /// registration (the controller is alive), so the engine registers again.
    fn on_registration_message(&mut self, frames: Frames) {
        let m = match self.session.decode(frames) {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "bad message on the registration socket dropped"),
        };
        if m.msg_type() != reg_msg::EVICTION_NOTICE {
            return debug!(msg_type = m.msg_type(), "unexpected message on the registration socket");
        }
        let notice: EvictionNotice = match serde_json::from_value(m.content) {
            Ok(n) => n,
            Err(e) => return warn!(error = %e, "malformed eviction notice dropped"),
        };
        if !self.controller.link.notice_applies(&notice, &self.me.uuid) {
            return debug!(registration = %notice.registration, "eviction notice for an earlier registration ignored");
        }
        let dropped = self.queue.drop_answered(&notice.answered);
        let running = [self.current.as_ref().map(|c| c.id().to_string()), self.call.as_ref().map(|c| c.id().to_string())];
        let running_answered = running.iter().flatten().find(|id| notice.answered.contains(id));
        warn!(
            engine_id = notice.id,
            reason = %notice.reason,
            answered = notice.answered.len(),
            dropped = dropped.len(),
            running_answered = ?running_answered,
            "the controller evicted this engine; registering again (the worker and its variables are kept; requests it answered meanwhile will not run)"
        );
        self.controller.link.lost(&format!("evicted by the controller ({})", notice.reason), notice.reconnect, Instant::now());
        self.step_link();
    }

    /// Advance the link: start an attempt to register again, or give up and exit.
    fn step_link(&mut self) {
        let now = Instant::now();
        let c = &mut self.controller;
        match c.link.tick(now, c.pings.count()) {
            link::Step::Quiet => {}
            link::Step::Attempt { rebuild } => {
                if rebuild {
                    // The old sockets are no good: close them before new ones connect.
                    c.sock_tasks = Tasks::default();
                    c.sock_generation = 0;
                }
                let limit = REJOIN_ATTEMPT.min(c.link.time_left(now)).max(Duration::from_millis(200));
                debug!(rebuild, ?limit, "registering with the controller again");
                tokio::spawn(net::rejoin(
                    c.source.clone(),
                    self.username.clone(),
                    self.me.uuid.clone(),
                    self.me.id,
                    rebuild,
                    limit,
                    self.inbound_tx.clone(),
                ));
            }
            link::Step::GiveUp(msg) => {
                error!("{msg}");
                self.exit_code = Some(1);
            }
        }
    }

    /// The outcome of an attempt to register again.
    fn on_rejoined(&mut self, outcome: std::result::Result<Rejoined, String>) {
        let now = Instant::now();
        let r = match outcome {
            Ok(r) => r,
            Err(why) => {
                let left = self.controller.link.time_left(now);
                info!(%why, left_s = left.as_secs(), "registering again failed; retrying");
                self.controller.link.attempt_failed(now);
                return;
            }
        };
        let Rejoined { conn, session, registration, sockets } = r;
        let (down_for, why) =
            self.controller.link.down_since().map(|(t, w)| (now.saturating_duration_since(t), w.to_string())).unwrap_or_default();
        if registration.id != self.me.id {
            warn!(old = self.me.id, new = registration.id, "registered again under a new engine id: the old one is held by another engine");
            self.me.id = registration.id;
            self.out.set_identity(self.me.clone());
        }
        let c = &mut self.controller;
        if conn.key != c.key {
            info!("the controller's key changed; signing with the new one");
            c.key = conn.key.clone();
            self.session = session.clone();
            self.out.set_session(session);
        }
        self.out.outlets.registration = registration.outlet;
        c.reg_generation = registration.generation;
        c.reg_tasks = registration.tasks;
        if let Some(s) = sockets {
            let o = &mut self.out.outlets;
            (o.mux, o.task, o.control, o.iopub, o.broadcast) = (s.mux, s.task, s.control, s.iopub, None);
            c.sock_generation = s.generation;
            c.pings = s.pings;
            c.sock_tasks = s.tasks;
        }
        c.link.silence_limit = silence_limit(registration.hb_period);
        c.link.joined(registration.request, now);
        info!(engine_id = self.me.id, down_s = down_for.as_secs_f64(), %why, "registered with the controller again; the worker and its variables were kept");
    }

    async fn on_compiler_ready(&mut self, link: CompilerLink) {
        self.fetcher = Fetcher::for_compiler(&link.hello.probe);
        info!(url = %link.url, same_host = self.fetcher.same_host(), cache = ?self.fetcher.cache_dir(), "compiler ready");
        let fresh_worker = self.workers.get().is_none();
        let kept = link.hello.history_restored && self.history_sent;
        let libs_changed = self.command_libs.as_ref().is_some_and(|old| *old != link.hello.runtime_libs);
        self.runtime_libs = Some(link.hello.runtime_libs.clone());
        self.compiler.connected(link, Instant::now());
        if libs_changed || !self.workers.has_command() {
            // The worker command waits for this compiler's runtime libraries.
            self.workers.set_command(None);
        } else {
            // Same libraries: the worker command stands.
            self.runtime_libs = None;
        }
        if !fresh_worker {
            if kept && !libs_changed {
                info!("the new compiler rebuilt this worker's context; variables kept");
            } else {
                // A new compiler that could not take the worker's history knows nothing of its
                // variables.
                self.restart_worker("killed by a new compiler connected (variables lost)").await;
            }
        }
        self.progress().await;
    }

    fn set_worker_cmd(&mut self, libdirs: Vec<String>) {
        match WorkerCommand::for_engine(&libdirs, self.me.id, &self.ns_dir) {
            Ok(c) => self.workers.set_command(Some(c)),
            Err(e) => error!(error = %e, "cannot locate the ipengine binary to start workers"),
        }
    }

    async fn on_control(&mut self, req: Request) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.out.status("busy", &req.header);
        match req.msg_type() {
            "abort_request" => {
                for r in self.queue.abort(&req.content) {
                    self.aborted(&r);
                }
                self.out.reply(&req, json!({"status": "ok"}), md);
            }
            "clear_request" => {
                self.restart_worker("killed by clear_request").await;
                self.out.reply(&req, json!({"status": "ok"}), md);
            }
            "signal_request" => {
                let content =
                    self.signal(&rpx_protocol::content::read_or_default::<rpx_protocol::content::SignalRequest>(&req.content).sig);
                self.out.reply(&req, content, md);
            }
            "shutdown_request" => {
                let shutdown: rpx_protocol::content::ShutdownRequest = rpx_protocol::content::read_or_default(&req.content);
                self.out.reply(&req, shutdown.reply(), md);
                self.out.status("idle", &req.header);
                self.exit_code = Some(0);
                return;
            }
            "kernel_info_request" => self.out.reply(&req, reply::kernel_info(), md),
            other => {
                warn!(msg_type = other, "unsupported control request");
                self.out.reply(&req, reply::unsupported(other, &self.me), md);
            }
        }
        self.out.status("idle", &req.header);
    }

    /// `signal_request`: SIGINT interrupts the running code, other signals go to the worker.
    /// Returns the reply content.
    fn signal(&mut self, sig: &Value) -> Value {
        match crate::signals::parse_signal(sig) {
            Ok(libc::SIGINT) => {
                self.interrupt();
                json!({"status": "ok"})
            }
            Ok(sig) => match self.workers.signal(sig) {
                Ok(()) => json!({"status": "ok"}),
                Err(e) => reply::simple_error("SignalError", &format!("cannot signal the worker: {e}"), &self.me, "signal"),
            },
            Err(e) => reply::simple_error("ValueError", &e, &self.me, "signal"),
        }
    }

    /// The load or call the worker is running: its cell id or msg id.
    fn running_target(&self) -> Option<String> {
        self.loads
            .running
            .as_ref()
            .map(|l| l.cell_id.clone())
            .or_else(|| self.call.as_ref().filter(|c| c.running).map(|c| c.id().to_string()))
    }

    /// SIGINT: interrupt the running cell or call, keeping the engine's variables (see
    /// [`crate::worker::interrupt`]); if it has not stopped after [`INTERRUPT_GRACE`] the worker
    /// is killed. A cell or closure still being compiled is not run. Otherwise nothing happens.
    fn interrupt(&mut self) {
        if let Some(cell) = &mut self.current {
            cell.interrupt_requested = true;
        }
        if let Some(call) = self.call.as_mut().filter(|c| c.waiting()) {
            call.interrupt_requested = true;
        }
        if let Some(target) = self.running_target() {
            self.supervisor.interrupting(&target, Instant::now());
            info!(%target, "SIGINT: interrupting the running code");
        }
        // The worker ignores SIGINT while it runs nothing.
        if let Err(e) = self.workers.interrupt() {
            warn!(error = %e, "cannot send SIGINT to the worker");
        }
    }

    /// A cell that reads stdin without evcxr's input request (a plain `std::io::stdin()` read)
    /// would wait on the worker's command pipe forever. Seen blocked in `read(0, ..)` for
    /// [`STDIN_READ_TICKS`] ticks in a row while it runs the cell (a command in the pipe is
    /// read at once), it is stopped and refused as an input request is.
    fn check_stdin_read(&mut self) {
        let running = self.loads.running.as_ref().map(|l| l.cell_id.clone());
        let pid = self.workers.get().map_or(-1, |w| w.pid);
        let reading = crate::output::reading_stdin(pid);
        if running.is_none() && self.call.is_none() {
            // Idle: this is the worker's own read of its commands.
            if reading.is_some() {
                self.worker_read = reading.map(|b| (pid, b));
            }
            return;
        }
        let own = self.worker_read.as_ref().is_some_and(|(p, b)| *p == pid && Some(b) == reading.as_ref());
        let Some(cell) = self.current.as_mut() else { return };
        if cell.stdin_refused.is_some() || running.as_deref() != Some(cell.id()) || reading.is_none() || own {
            cell.stdin_reads_seen = 0;
            return;
        }
        cell.stdin_reads_seen += 1;
        if cell.stdin_reads_seen >= STDIN_READ_TICKS {
            warn!("the running cell reads stdin; engines cannot give it input");
            cell.stdin_refused = Some(String::new());
            self.interrupt();
        }
    }

    /// Follow an interrupt: poke the worker again, or kill it when the grace period is over.
    async fn follow_interrupt(&mut self) {
        let (loading, call) = (&self.loads.running, &self.call);
        let running = |target: &str| {
            loading.as_ref().is_some_and(|l| l.cell_id == target) || call.as_ref().is_some_and(|c| c.running && c.id() == target)
        };
        match self.supervisor.follow(Instant::now(), running) {
            InterruptStep::Quiet => {}
            InterruptStep::Poke => {
                let _ = self.workers.interrupt();
            }
            InterruptStep::Kill(status) => {
                warn!(grace = ?INTERRUPT_GRACE, "the interrupted code did not stop; killing the worker");
                self.restart_worker(&status).await;
            }
        }
    }

    /// Start queued requests while nothing is running.
    async fn pump(&mut self) {
        while self.current.is_none() && self.call.is_none() && self.exit_code.is_none() {
            match self.queue.next(self.compiler.connecting()) {
                None => break,
                Some(Next::Aborted(req)) => self.aborted(&req),
                Some(Next::Start(req)) => self.start(req).await,
            }
        }
        self.pipe_calls().await;
    }

    /// Hand the worker the next queued calls of the closure it is running, up to
    /// [`call::PIPE_DEPTH`] ahead, so it goes from one to the next without waiting for the
    /// engine. Anything else in the queue (a cell, a push, another closure, an abort) waits
    /// for its turn as usual.
    async fn pipe_calls(&mut self) {
        while self.piped.len() < call::PIPE_DEPTH && self.current.is_none() && self.exit_code.is_none() && self.restart_notice.is_none() {
            let Some(head) = self.call.as_ref().filter(|c| c.running) else { return };
            let Some(front) = self.queue.front() else { return };
            if front.msg_type() != "apply_request" || call::check_arguments(front).is_err() {
                return;
            }
            let (mode, closure) = match Op::from_content(&front.content) {
                Some(Ok(Op::Apply { closure })) => (abi::MODE_APPLY, closure),
                Some(Ok(Op::Map { closure })) => (abi::MODE_MAP, closure),
                _ => return,
            };
            if closure != head.closure {
                return;
            }
            let Some((artifact, func)) = self.closures.compiled(&closure) else { return };
            let so = match self.fetcher.want(&artifact, Kind::Code, Instant::now()) {
                Step::Ready(path) => path.display().to_string(),
                Step::Request(sha) => return self.request_artifact(sha),
                _ => return,
            };
            let req = match self.queue.next(self.compiler.connecting()) {
                Some(Next::Start(req)) => req,
                // Named by an abort before it was handed ahead: answered now, as `pump` would.
                Some(Next::Aborted(req)) => return self.aborted(&req),
                None => return,
            };
            let md = reply::init_metadata(&req.metadata, &self.me);
            let mut c = Call::new(req, md, mode, closure);
            c.running = true;
            match self.workers.send_call(&so, &func, mode, &c.req.buffers[0]).await {
                Ok(()) => self.piped.push_back(c),
                Err(WriteFailed::NoWorker(e)) => {
                    // Answered in its turn, after the calls ahead of it.
                    c.result = Some(Err(EngineError::worker_died(&self.me, &format!("not run: {e}"), vec![])));
                    (c.stdout_done, c.stderr_done) = (true, true);
                    self.piped.push_back(c);
                    return;
                }
                // The worker is dying; its exit event fails the call.
                Err(WriteFailed::Dying(e)) => {
                    warn!(error = %e, "cannot write to the worker");
                    self.piped.push_back(c);
                    return;
                }
            }
        }
    }

    /// Answer the calls at the head whose result and output are all in, in order; each next
    /// one becomes the call whose output is published.
    fn settle_calls(&mut self) {
        while let Some(outcome) = self.call.as_mut().filter(|c| c.settled()).and_then(|c| c.result.take()) {
            self.finish_call(outcome);
            if let Some(next) = self.piped.pop_front() {
                self.promote(next);
            }
        }
    }

    /// `next`, handed to the worker ahead, becomes the call whose output is published (what
    /// it wrote meanwhile first).
    fn promote(&mut self, mut next: Call) {
        self.out.flush_streams();
        self.out.defer_busy(&next.req.header);
        self.out.set_stream_parent(next.req.header.clone());
        self.stderr_tail.clear();
        let (out, err) = (std::mem::take(&mut next.held_stdout), std::mem::take(&mut next.held_stderr));
        self.call = Some(next);
        if !out.is_empty() {
            self.out.write(Stream::Stdout, &out);
        }
        if !err.is_empty() {
            self.publish_stderr(&err);
        }
    }

    /// Worker output for a call handed to it ahead: the head call's output on `stream` is all
    /// in, so this text is a later call's. Returns the text back when it is the head's (or a
    /// cell's) to publish now.
    fn hold_for_piped<'a>(&mut self, stream: Stream, text: &'a str) -> Option<&'a str> {
        let head_done = |c: &Call| c.running && if stream == Stream::Stdout { c.stdout_done } else { c.stderr_done };
        if !self.call.as_ref().is_some_and(head_done) {
            return Some(text);
        }
        let held = match stream {
            Stream::Stdout => self.piped.iter_mut().find(|c| !c.stdout_done).map(|c| &mut c.held_stdout),
            Stream::Stderr => self.piped.iter_mut().find(|c| !c.stderr_done).map(|c| &mut c.held_stderr),
        };
        match held {
            Some(h) => {
                h.push_str(text);
                None
            }
            None => Some(text),
        }
    }

    /// The first call in the worker for which `pending` holds (calls are answered in order).
    fn first_in_worker(&mut self, pending: impl Fn(&Call) -> bool) -> Option<&mut Call> {
        self.call.iter_mut().filter(|c| c.running).chain(self.piped.iter_mut()).find(|c| pending(c))
    }

    async fn start(&mut self, req: Request) {
        if req.msg_type() == "apply_request" {
            // The previous request's output goes out under its own parent; this one's `busy`
            // waits for its first publication (a quiet call answers with its reply alone).
            self.out.flush_streams();
            self.out.defer_busy(&req.header);
        }
        if matches!(req.msg_type(), "execute_request" | "apply_request") {
            if let Some(notice) = self.restart_notice.take() {
                self.out.set_stream_parent(req.header.clone());
                self.out.append(Stream::Stderr, &format!("{notice}\n"));
                self.out.flush_streams();
            }
        }
        match req.msg_type() {
            "execute_request" => {
                self.out.status("busy", &req.header);
                let exec = rpx_protocol::content::ExecuteRequest::read(&req.content);
                let (silent, code) = (exec.silent(), exec.code);
                self.start_cell(req, code, silent, Purpose::Execute);
            }
            "apply_request" => self.start_apply(req).await,
            "kernel_info_request" => self.out.answer(&req, reply::kernel_info()),
            other => {
                warn!(msg_type = other, "unsupported shell request");
                self.out.answer(&req, reply::unsupported(other, &self.me));
            }
        }
    }

    fn start_cell(&mut self, req: Request, code: String, silent: bool, purpose: Purpose) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.out.flush_streams();
        self.out.set_stream_parent(req.header.clone());
        if code.trim().is_empty() {
            self.out.reply(&req, reply::execute_ok(self.execution_count), md);
            self.out.status("idle", &req.header);
            return;
        }
        if !silent {
            self.execution_count += 1;
            self.out.publish(
                "execute_input",
                "execute_input",
                json!({"code": code, "execution_count": self.execution_count}),
                Some(&req.header),
            );
        }
        let count = self.execution_count;
        if let Some(why) = self.compiler.absent() {
            debug!(%why, "no compiler for this cell");
            self.spawn_reconnect();
            self.out.execute_error(&req, md, &EngineError::no_compiler(), count);
            return;
        }
        self.stderr_tail.clear();
        self.ensure_worker();
        let cell_id = req.msg_id().to_string();
        info!(%cell_id, count, ?purpose, "cell");
        let code = crate::namespace::with_bindings(self.bindings.unbound(), &code);
        self.history.requested(&cell_id, &code);
        self.to_compiler(cmsg::CELL_REQUEST, CellRequest { cell_id, code });
        self.current = Some(Cell::new(req, purpose, silent, count, md));
    }

    // ----- rpx apply payloads: push, pull, closures -----

    async fn start_apply(&mut self, req: Request) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        let op = match reply::apply_op(&req.content, &self.me) {
            Ok(op) => op,
            Err(err) => return self.out.apply_error(&req, md, &err),
        };
        match op {
            Op::Push { names, files } if !files.is_empty() => {
                // Same host: the client wrote the values into the namespace (no buffers).
                let adopted = if req.buffers.is_empty() {
                    crate::namespace::adopt(&self.ns_dir, &names, &files, &mut self.digests)
                } else {
                    crate::namespace::discard(&self.ns_dir, &files);
                    Err("a push with files must carry no buffers".into())
                };
                match adopted {
                    Ok(()) => {
                        for n in names {
                            self.bindings.pushed(n.name, n.type_name);
                        }
                        self.out.ok(&req, md, &[]);
                    }
                    Err(e) => self.out.apply_error(&req, md, &EngineError::new(ename::UNSUPPORTED_PAYLOAD, e, vec![])),
                }
            }
            Op::Push { names, .. } => match crate::namespace::store(&self.ns_dir, &names, &req.buffers) {
                Ok(()) => {
                    for n in names {
                        self.bindings.pushed(n.name, n.type_name);
                    }
                    self.out.ok(&req, md, &[]);
                }
                Err(e) => self.out.apply_error(&req, md, &EngineError::new(ename::UNSUPPORTED_PAYLOAD, e, vec![])),
            },
            Op::Pull { names, .. } => match self.bindings.plan_pull(&names, self.compiler.absent().is_some()) {
                PullPlan::Refuse(err) => self.out.apply_error(&req, md, &err),
                PullPlan::FromFiles => self.finish_pull(&req, md, &names),
                PullPlan::NoCompiler => {
                    self.spawn_reconnect();
                    self.out.apply_error(&req, md, &EngineError::no_compiler());
                }
                // The variables live in the worker: a small cell writes them to the namespace.
                PullPlan::WriteOut(stale) => self.start_cell(req, crate::namespace::put_cell(&stale), true, Purpose::Pull(names)),
            },
            Op::Apply { closure } => self.start_call(req, md, abi::MODE_APPLY, closure).await,
            Op::Map { closure } => self.start_call(req, md, abi::MODE_MAP, closure).await,
        }
    }

    /// Answer a request aborted before it ran (a same-host push's files are removed).
    fn aborted(&self, req: &Request) {
        if let Some(Ok(Op::Push { files, .. })) = Op::from_content(&req.content) {
            crate::namespace::discard(&self.ns_dir, &files);
        }
        self.out.aborted(req);
    }

    fn finish_pull(&mut self, req: &Request, md: Value, names: &[String]) {
        if matches!(Op::from_content(&req.content), Some(Ok(Op::Pull { files: true, .. }))) {
            // Same host: hard links the client reads, instead of the bytes.
            return match crate::namespace::export(&self.ns_dir, names, &self.digests) {
                Ok(files) => self.out.ok_with(req, md, rpx_protocol::dataplane::REPLY_FILES_KEY, json!(files)),
                Err(e) => self.out.apply_error(req, md, &EngineError::new(ename::NAME_ERROR, e, vec![])),
            };
        }
        match crate::namespace::load(&self.ns_dir, names) {
            Ok(buffers) => self.out.ok(req, md, &buffers),
            Err(e) => self.out.apply_error(req, md, &EngineError::new(ename::NAME_ERROR, e, vec![])),
        }
    }

    async fn start_call(&mut self, req: Request, md: Value, mode: u32, closure: Closure) {
        if let Err(err) = call::check_arguments(&req) {
            return self.out.apply_error(&req, md, &err);
        }
        self.out.flush_streams();
        self.out.set_stream_parent(req.header.clone());
        self.stderr_tail.clear();
        let call = Call::new(req, md, mode, closure);
        let compiled = self.closures.knows(&call.closure);
        let request = call.closure_request();
        self.call = Some(call);
        if compiled {
            return self.run_call().await;
        }
        // The first call of this closure here: the compiler compiles it (once per cluster).
        if !self.to_compiler(cmsg::CLOSURE_REQUEST, request) {
            self.spawn_reconnect();
            let call = self.call.take().expect("set");
            self.out.apply_error(&call.req, call.md, &EngineError::no_compiler());
        }
    }

    /// Hand the current call to the worker.
    async fn run_call(&mut self) {
        let Some(call) = &self.call else { return };
        let (artifact, func) = match call.next_step(&self.closures) {
            CallStep::Interrupted(err) => return self.finish_call(Err(err)),
            CallStep::Compiling => return,
            CallStep::Run { artifact, func } => (artifact, func),
        };
        if self.runtime_pending() {
            return;
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
        let Some(call) = &self.call else { return };
        match self.workers.send_call(&so, &func, call.mode, &call.req.buffers[0]).await {
            Ok(()) => {}
            Err(WriteFailed::NoWorker(e)) => self.finish_call(Err(EngineError::worker_died(&self.me, &format!("not run: {e}"), vec![]))),
            // The worker is dying; its exit event fails the call.
            Err(WriteFailed::Dying(e)) => warn!(error = %e, "cannot write to the worker"),
        }
    }

    /// Answer the current call with its output bytes or an error.
    fn finish_call(&mut self, outcome: Result<Vec<u8>, EngineError>) {
        let Some(call) = self.call.take() else { return };
        self.out.flush_streams();
        match outcome {
            Ok(data) => self.out.ok(&call.req, call.md, &[Bytes::from(data)]),
            Err(e) => {
                info!(msg_id = call.id(), ename = %e.ename, "call failed");
                self.out.apply_error(&call.req, call.md, &e);
            }
        }
    }

    fn spawn_reconnect(&mut self) {
        if !self.compiler.start_attempt() {
            return;
        }
        // A running worker's history lets a new compiler rebuild a context that matches it.
        let history = if self.workers.get().is_some() { self.history.snapshot() } else { Some(Vec::new()) };
        self.history_sent = history.is_some();
        tokio::spawn(net::connect_compiler(
            self.compiler_source.clone(),
            self.me.uuid.clone(),
            self.me.id,
            self.username.clone(),
            Duration::from_secs(30),
            history.unwrap_or_default(),
            self.inbound_tx.clone(),
        ));
    }

    async fn on_compiler(&mut self, frames: Frames) {
        let Some(msg) = self.compiler.decode(frames, Instant::now()) else { return };
        match msg {
            CompilerMessage::Heard => {}
            CompilerMessage::ArtifactReply(r, bytes) => {
                match self.fetcher.on_reply(&r, bytes.as_deref()) {
                    Some((sha, true)) => {
                        info!(sha256 = %sha, size = r.size, fetched = self.fetcher.fetched, "artifact fetched from the compiler")
                    }
                    Some((sha, false)) => warn!(sha256 = %sha, "artifact refused"),
                    None => debug!(sha256 = %r.sha256, "artifact_reply nobody waits for; dropped"),
                }
                self.progress().await;
            }
            CompilerMessage::Load(load) => {
                debug!(cell_id = %load.cell_id, so = %load.artifact.path, "load");
                self.loads.push(load);
                self.run_next_load().await;
            }
            CompilerMessage::CellReply(r) => match &mut self.current {
                Some(cell) if cell.id() == r.cell_id => {
                    cell.reply = Some(r);
                    self.maybe_finish();
                }
                _ => warn!(cell_id = %r.cell_id, "cell_reply for a cell that is not running; dropped"),
            },
            CompilerMessage::ClosureReply(r) => {
                let request_id = r.request_id.clone();
                match self.closures.on_reply(self.call.as_ref(), r) {
                    ClosureVerdict::Dropped => warn!(%request_id, "closure_reply for a call that is not waiting; dropped"),
                    ClosureVerdict::Compiled => {}
                    ClosureVerdict::Failed(err) => self.finish_call(Err(err)),
                }
                if self.call.as_ref().is_some_and(Call::waiting) {
                    self.run_call().await;
                }
            }
        }
    }

    // ----- the worker -----

    fn ensure_worker(&mut self) {
        if self.workers.ensure() {
            self.parser = StdoutParser::new();
            self.stderr_marks = StderrMarks::default();
            self.supervisor.spawned(Instant::now());
        }
    }

    /// Skip a load the worker will not run: tell the compiler (it handles a skipped load as a
    /// panicked one) and mark the cell.
    fn skip_load(&mut self, load: Load, why: Skip) {
        if let Skip::Refused(why) = &why {
            error!(cell_id = %load.cell_id, %why, "artifact refused; the cell does not run");
        }
        if let Some(cell) = self.current.as_mut().filter(|c| c.id() == load.cell_id) {
            cell.skipped(&why);
        }
        info!(cell_id = %load.cell_id, reason = %why.reason(), "load skipped");
        self.load_done(why.load_done(load.cell_id));
    }

    async fn run_next_load(&mut self) {
        if self.runtime_pending() {
            return; // the runtime libraries are still being fetched
        }
        let (load, path) = loop {
            let (fetcher, now) = (&mut self.fetcher, Instant::now());
            match self.loads.next(self.current.as_ref(), |a| fetcher.want(a, Kind::Code, now)) {
                LoadStep::Idle | LoadStep::Wait => return,
                LoadStep::Request(sha) => return self.request_artifact(sha),
                LoadStep::Skip(load, why) => self.skip_load(load, why),
                LoadStep::Run(load, path) => break (load, path),
            }
        };
        self.ensure_worker();
        let line = format!("LOAD_AND_RUN {} {}", path.display(), load.fn_name);
        match self.workers.send_line(&line).await {
            Ok(()) => {}
            // Nothing will report an exit: answer now.
            Err(WriteFailed::NoWorker(e)) => {
                let done = self.loads.worker_died(self.current.as_mut(), &format!("not run: {e}"));
                self.load_done(done.expect("the load runs"));
            }
            // The worker is dying; its exit event finishes this load.
            Err(WriteFailed::Dying(e)) => warn!(error = %e, "cannot write to the worker"),
        }
    }

    async fn on_worker(&mut self, generation: u64, ev: WorkerEvent) {
        if !self.workers.is_current(generation) {
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
                for piece in self.stderr_marks.feed(&String::from_utf8_lossy(&bytes)) {
                    match piece {
                        StderrPiece::Text(text) => self.on_stderr_text(&text),
                        StderrPiece::CallEnd => match self.first_in_worker(|c| !c.stderr_done) {
                            Some(c) => {
                                c.stderr_done = true;
                                self.settle_calls();
                            }
                            None => warn!("an end of call on stderr nobody waits for"),
                        },
                    }
                }
            }
            WorkerEvent::CallResult { status, data } => match self.first_in_worker(|c| c.result.is_none()) {
                Some(c) => {
                    c.result = Some(call::outcome(status, data));
                    self.settle_calls();
                }
                None => warn!(status, "a call result nobody waits for; dropped"),
            },
            WorkerEvent::Exited(status) => self.on_worker_exit(status).await,
        }
    }

    fn on_stderr_text(&mut self, text: &str) {
        if let Some(text) = self.hold_for_piped(Stream::Stderr, text) {
            self.publish_stderr(text);
        }
    }

    fn publish_stderr(&mut self, text: &str) {
        self.stderr_tail.feed(text);
        self.out.write(Stream::Stderr, text);
        if self.current.as_ref().is_some_and(Cell::waits_for_panic_message) {
            self.maybe_finish();
        }
    }

    async fn on_worker_exit(&mut self, status: String) {
        let events = self.parser.finish();
        self.on_stdout_events(events).await;
        self.workers.exited();
        warn!(%status, "worker died");
        let restart = self.supervisor.died(Instant::now());
        self.worker_gone(&status);
        match restart {
            Restart::Now => self.ensure_worker(),
            Restart::OnDemand => error!("the worker keeps dying at startup; it will be restarted on demand only"),
        }
        self.run_next_load().await;
        self.maybe_finish();
    }

    /// The worker is gone (died or killed): tell the compiler through the running load if there
    /// is one, else with `worker_restarted`, and mark the running cell.
    fn worker_gone(&mut self, status: &str) {
        self.history.clear();
        self.supervisor.worker_gone();
        self.bindings.worker_gone();
        if let Some(t) = self.stderr_marks.take_held() {
            self.on_stderr_text(&t);
        }
        if self.call.as_ref().is_some_and(|c| c.running) {
            let err = EngineError::worker_died(&self.me, status, self.stderr_tail.lines());
            self.finish_call(Err(err));
            // The calls handed to it after that one did not run to the end either.
            while let Some(next) = self.piped.pop_front() {
                self.promote(next);
                let err = EngineError::worker_died(&self.me, status, self.stderr_tail.lines());
                self.finish_call(Err(err));
            }
        }
        match self.loads.worker_died(self.current.as_mut(), status) {
            Some(done) => self.load_done(done),
            None => {
                self.to_compiler(cmsg::WORKER_RESTARTED, WorkerRestarted { engine_id: self.me.id });
            }
        }
    }

    /// Kill the worker and start a new one; `status` says why (it is reported as how the
    /// worker died).
    async fn restart_worker(&mut self, status: &str) {
        if let Some(mut w) = self.workers.take() {
            info!(pid = w.pid, status, "restarting the worker");
            w.kill();
            self.worker_gone(status);
        }
        self.supervisor.restarted();
        self.ensure_worker();
        self.run_next_load().await;
        self.maybe_finish();
    }

    async fn on_stdout_events(&mut self, events: Vec<StdoutEvent>) {
        for ev in events {
            match ev {
                StdoutEvent::Text(t) => {
                    if let Some(t) = self.hold_for_piped(Stream::Stdout, &t) {
                        self.out.write(Stream::Stdout, t);
                    }
                }
                StdoutEvent::InputRequest { prompt, .. } => {
                    // No frontend to ask: stop the code where it waits for its line (the
                    // interrupt unwinds the blocked read), and say why in the cell's error.
                    warn!(%prompt, "the running code asked for input; engines cannot give it");
                    if let Some(cell) = &mut self.current {
                        cell.stdin_refused.get_or_insert(prompt);
                    }
                    self.interrupt();
                }
                StdoutEvent::CallEnd => match self.first_in_worker(|c| !c.stdout_done) {
                    Some(c) => {
                        c.stdout_done = true;
                        self.settle_calls();
                    }
                    None => warn!("an end of call on stdout nobody waits for"),
                },
                StdoutEvent::Complete => {
                    match self.loads.completed() {
                        Some(done) => self.load_done(done),
                        None => warn!("worker completed a load nobody asked for"),
                    }
                    self.run_next_load().await;
                    self.maybe_finish();
                }
                marker => {
                    if let Some(l) = &mut self.loads.running {
                        let cell = self.current.as_mut().filter(|c| c.id() == l.cell_id);
                        l.note(marker, cell);
                    }
                }
            }
        }
    }

    // ----- finishing cells -----

    /// Finish the running cell if its reply is in and no load of it is running.
    fn maybe_finish(&mut self) {
        let Some(cell) = &mut self.current else { return };
        let loads_pending = self.loads.has(cell.id());
        if cell.ready_to_finish(loads_pending, &self.stderr_tail, Instant::now()) {
            let cell = self.current.take().expect("checked");
            self.finalize(cell, None);
        }
    }

    /// Answer a finished cell; `override_err` (the compiler is gone) replaces its verdict.
    fn finalize(&mut self, cell: Cell, override_err: Option<EngineError>) {
        if let Some(text) = cell.question_mark_error_text(&self.stderr_tail) {
            // Shown once: as the cell's error, not also as its last stderr line.
            self.out.drop_stderr_tail(&text);
        }
        self.out.flush_streams();
        if let Some(note) = cell.note() {
            self.out.append(Stream::Stderr, &note);
            self.out.flush_streams();
        }
        let err = override_err.or_else(|| cell.verdict(&self.me, &self.stderr_tail));
        if let Some(said) = self.bindings.after_cell(&cell.purpose, err.as_ref()) {
            self.out.append(Stream::Stderr, &said);
        }
        let ending = cell.ending(err, self.me.id);
        let Cell { req, md, count, .. } = cell;
        match ending {
            Ending::Pulled(names) => self.finish_pull(&req, md, &names),
            Ending::PullFailed(err) => self.out.apply_error(&req, md, &err),
            Ending::Failed(err) => {
                info!(cell_id = req.msg_id(), ename = %err.ename, "cell failed");
                self.out.execute_error(&req, md, &err, count);
            }
            Ending::Succeeded(result) => {
                if let Some(p) = result {
                    self.out.publish(p.kind, p.msg_type, p.content, Some(&req.header));
                }
                self.out.reply(&req, reply::execute_ok(count), md);
                self.out.status("idle", &req.header);
            }
        }
    }

    /// No compiler will answer: a call waiting on it fails with `call_err`; a cell still
    /// waiting for its reply fails with `cell_err` (one whose reply is in finishes as usual),
    /// unless a load runs (its end finishes the cell). Returns whether a call failed.
    fn fail_what_waits_on_compiler(&mut self, call_err: EngineError, cell_err: EngineError) -> bool {
        let call_failed = self.call.as_ref().is_some_and(Call::waiting);
        if call_failed {
            self.finish_call(Err(call_err));
        }
        if self.loads.running.is_some() {
            return call_failed;
        }
        match &self.current {
            Some(cell) if cell.reply.is_some() => self.maybe_finish(),
            Some(_) => {
                let cell = self.current.take().expect("checked");
                self.finalize(cell, Some(cell_err));
            }
            None => {}
        }
        call_failed
    }

    // ----- the clock, the compiler, artifacts -----

    async fn on_tick(&mut self) {
        self.follow_interrupt().await;
        self.check_stdin_read();
        if let Some(t) = self.parser.take_partial_text() {
            if let Some(t) = self.hold_for_piped(Stream::Stdout, &t) {
                self.out.append(Stream::Stdout, t);
            }
        }
        if let Some(t) = self.stderr_marks.take_held() {
            self.on_stderr_text(&t);
        }
        self.out.flush_if_due(Instant::now());
        self.maybe_finish();
        for (sha, step) in self.fetcher.poll(Instant::now()) {
            match step {
                Step::Request(sha) => self.request_artifact(sha),
                _ => debug!(sha256 = %sha, "artifact settled by another engine of this host"),
            }
        }
        self.progress().await;
        // A compiler that died, froze or lost its host never answers what waits on it.
        let waiting = self.current.as_ref().is_some_and(|c| c.reply.is_none())
            || self.call.as_ref().is_some_and(Call::waiting)
            || self.fetcher.busy();
        match self.compiler.check(Instant::now(), waiting) {
            Watch::Quiet => {}
            Watch::Ping => {
                self.to_compiler(cmsg::PING, json!({}));
            }
            Watch::Gone(silent) => self.compiler_gone(format!("it answered nothing for {} s", silent.as_secs())),
        }
        if let Some(why) = self.compiler.absent() {
            if self.fail_what_waits_on_compiler(EngineError::compiler_died(why), EngineError::compiler_died("it stopped answering")) {
                self.spawn_reconnect();
            }
        }
    }

    /// The compiler is gone (`why`): what waits on it fails now, and a new one is looked for.
    fn compiler_gone(&mut self, why: String) {
        let Some(url) = self.compiler.gone(&why) else { return };
        error!(%url, %why, "the compiler is gone");
        self.fetcher.abort_all(&why);
        self.spawn_reconnect();
        let died = EngineError::compiler_died(&why);
        self.fail_what_waits_on_compiler(died.clone(), died);
    }

    fn request_artifact(&mut self, sha256: String) {
        debug!(%sha256, "fetching an artifact from the compiler");
        if !self.to_compiler(cmsg::ARTIFACT_REQUEST, ArtifactRequest { sha256: sha256.clone() }) {
            self.fetcher.abort_all("no compiler connected");
        }
    }

    /// Move on with whatever waited for artifacts: the worker command (runtime libraries), the
    /// next load, the waiting call.
    async fn progress(&mut self) {
        if let Some(libs) = self.runtime_libs.as_ref().filter(|_| !self.workers.has_command()) {
            match self.fetcher.runtime_dirs(libs, Instant::now()) {
                RuntimeStep::Request(sha) => return self.request_artifact(sha),
                RuntimeStep::Wait => return,
                RuntimeStep::Ready(dirs) => {
                    info!(?dirs, "runtime libraries ready");
                    self.command_libs = self.runtime_libs.take();
                    self.set_worker_cmd(dirs);
                    self.ensure_worker();
                }
            }
        }
        self.run_next_load().await;
        if self.call.as_ref().is_some_and(Call::waiting) {
            self.run_call().await;
        }
        self.maybe_finish();
    }

    /// Unregister, stop the worker and let queued messages go out.
    async fn shutdown(&mut self, code: i32) -> i32 {
        self.out.flush_streams();
        if let Some(mut w) = self.workers.take() {
            w.kill();
        }
        let _ = std::fs::remove_dir_all(&self.ns_dir);
        self.out.unregister();
        // Sends are queued: give them a moment to leave.
        tokio::time::sleep(Duration::from_millis(200)).await;
        info!(code, "engine stopped");
        code
    }
}
