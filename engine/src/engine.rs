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
//!
//! # Layout
//! This file holds the loop ([`run`]), the engine's state and its events; the handlers are in
//! `impl Engine` blocks, one file per part:
//! - `controller`: the controller link (eviction notices, registering again) and the compiler once
//!   ready.
//! - `control`: control requests and interrupts.
//! - `requests`: starting queued requests, calls handed to the worker ahead.
//! - `apply`: rpx apply payloads (push, pull, closure calls).
//! - `worker`: the worker (loads, its output, its exit and restart).
//! - `finish`: finishing cells.
//! - `clock`: the clock, a compiler that is gone, artifact fetches, progress, shutdown.

mod apply;
mod clock;
mod control;
mod controller;
mod finish;
mod requests;
mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rpx_protocol::compile::{msg_type as cmsg, LoadDone, RuntimeLib};
use rpx_protocol::connection::EngineConnection;
use rpx_protocol::Session;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::artifacts::Fetcher;
use crate::call::{Call, Closures};
use crate::cell::{Bindings, Cell, Loads};
use crate::child::{WorkerEvent, WorkerSlot};
use crate::compiler::Compiler;
use crate::history::WorkerHistory;
use crate::link::Link;
use crate::net::{Channel, CompilerSource, ControllerSource, LoopEvent, Outlets, Pings, Tasks};
use crate::outbox::{Outbox, FLUSH_PERIOD};
use crate::output::{StderrMarks, StderrTail, StdoutParser};
use crate::queue::{Queue, Request};
use crate::reply::Identity;
use crate::supervise::Supervisor;
use crate::{net, reply, Error, Result};

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

/// Most events that are already waiting handled in one turn of the loop before it pumps the
/// queue (a bound, so the clock and signals still get their turn under a flood).
const DRAIN: usize = 64;

/// Lines of worker stderr kept for error reports.
const STDERR_TAIL: usize = 20;

/// Register, connect everything, and serve until shutdown. Returns the process exit code.
pub async fn run(cfg: Config) -> Result<i32> {
    let conn = &cfg.connection;
    let uuid = uuid::Uuid::new_v4().to_string();
    let username = std::env::var("USER").unwrap_or_else(|_| "rpx".into());
    let session = Session::with_id(conn.key.as_bytes(), &username, &uuid);
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<LoopEvent>(1024);
    for dir in rpx_protocol::connection::sweep_dead_namespaces() {
        info!(dir = %dir.display(), "removed the namespace of an engine that is gone");
    }
    let ns_dir = crate::namespace::create(&uuid)?;
    // Values of engines on other hosts stream over a link of their own (announced at registration).
    let max_value = rpx_guard::Limits::from_env().map(|l| l.max_message).unwrap_or(rpx_guard::Limits::default().max_message);
    crate::datalink::start(&conn.interface, &uuid, &session, &ns_dir, max_value);

    let registration = net::register(&session, &conn.url(conn.registration), &uuid, cfg.requested_id, cfg.timeout, &inbound_tx).await?;
    let id = registration.id;
    let me = Identity { id, uuid: uuid.clone() };
    let sockets = net::connect_engine(conn, &session, &uuid, id, cfg.timeout, &inbound_tx).await?;
    sockets.batches.store(registration.batches, std::sync::atomic::Ordering::Relaxed);
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
            // What else is already waiting is handled before the queue is pumped, so the calls
            // that arrived together go to the worker together (see `Engine::pipe_calls`).
            Some(ev) = inbound_rx.recv() => {
                engine.on_inbound(ev).await;
                for _ in 0..DRAIN {
                    let Ok(ev) = inbound_rx.try_recv() else { break };
                    engine.on_inbound(ev).await;
                }
            }
            Some((generation, ev)) = worker_rx.recv() => {
                engine.on_worker(generation, ev).await;
                for _ in 0..DRAIN {
                    let Ok((generation, ev)) = worker_rx.try_recv() else { break };
                    engine.on_worker(generation, ev).await;
                }
            }
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
    inbound_tx: mpsc::Sender<LoopEvent>,
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
    /// Replaced values kept for later transfer files to be written over.
    spares: crate::namespace::Spares,
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
        inbound_tx: mpsc::Sender<LoopEvent>,
        compiler_source: CompilerSource,
        username: String,
        controller: Controller,
    ) -> Engine {
        Engine {
            controller,
            out: Outbox::new(me.clone(), session.clone(), outlets),
            ns_dir: crate::namespace::dir_for(&me.uuid),
            digests: Default::default(),
            spares: Default::default(),
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

    async fn on_inbound(&mut self, ev: LoopEvent) {
        match ev {
            LoopEvent::Shell(channel, frames) => match self.session.decode(frames) {
                Ok(m) => {
                    debug!(msg_type = m.msg_type(), msg_id = m.msg_id(), ?channel, "shell request");
                    let msg_id = m.msg_id().to_string();
                    if !self.queue.push(Request::from_message(channel, m)) {
                        info!(%msg_id, "dropped a request the controller answered when it evicted this engine");
                    }
                }
                Err(e) => warn!(error = %e, ?channel, "bad shell message dropped"),
            },
            LoopEvent::Control(frames) => match self.session.decode(frames) {
                Ok(m) => self.on_control(Request::from_message(Channel::Control, m)).await,
                Err(e) => warn!(error = %e, "bad control message dropped"),
            },
            LoopEvent::Compiler(frames) => self.on_compiler(frames).await,
            LoopEvent::CompilerReady(link) => self.on_compiler_ready(*link).await,
            LoopEvent::CompilerFailed(why) => {
                warn!(%why, "no compiler");
                self.compiler.failed(why);
                if !self.workers.has_command() {
                    // Pushes and pulls of pushed values need no compiled code.
                    self.set_worker_cmd(vec![]);
                }
                self.ensure_worker();
            }
            LoopEvent::CompilerLost(link_id) => {
                if self.compiler.is_current(link_id) {
                    self.compiler_gone("its connection closed".into());
                }
            }
            LoopEvent::BroadcastReady(generation, out, tasks) => {
                if generation == self.controller.sock_generation {
                    self.out.outlets.broadcast = Some(out);
                    self.controller.sock_tasks.absorb(tasks);
                }
            }
            LoopEvent::Registration(generation, frames) => {
                if generation == self.controller.reg_generation {
                    self.on_registration_message(frames);
                }
            }
            LoopEvent::ControllerLost(generation, socket) => {
                let c = &mut self.controller;
                if generation == c.reg_generation || generation == c.sock_generation {
                    if c.link.is_up() {
                        warn!(socket, "the connection to the controller closed; registering again");
                    }
                    c.link.lost(&format!("its {socket} connection closed"), true, Instant::now());
                    self.step_link();
                }
            }
            LoopEvent::Rejoined(outcome) => self.on_rejoined(*outcome),
        }
    }
}
