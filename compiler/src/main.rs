//! `rpx-compiler`: the one evcxr compiler of a cluster. Engines send it their cells; it compiles
//! each cell once per group of engines with the same history and tells them which artifact to load.
//!
//! # Layout
//! - [`state`]: every decision (batching, groups, forks, merges, verdicts) as plain functions.
//! - [`context`]: one evcxr context per thread, and the Unix socket its relay talks to.
//! - [`closure`]: closure wrappers and the cache that compiles each closure once.
//! - [`builder`]: the thread that compiles closures with plain cargo, its dependencies built
//!   once at startup.
//! - [`relay`]: the tiny child evcxr starts per context; bridges evcxr's pipes to the compiler.
//! - [`artifacts`]: every compiled file announced to engines, by SHA-256, and the bytes served
//!   to engines on other hosts.
//! - this file: arguments, the engine-facing ROUTER socket and the event loop (`Server`: what
//!   the loop owns, a method per kind of event; rustc's diagnostics render with
//!   `rpx_diagnostics`).

mod artifacts;
mod builder;
mod closure;
mod context;
mod memory;
mod relay;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use rpx_protocol::compile::{
    msg_type, ArtifactReply, ArtifactRequest, CellRequest, ClosureReply, ClosureRequest, EngineHello, EngineHelloReply, HostProbe, LoadDone,
};
use rpx_protocol::connection::{read_json, write_private_json, CompilerConnection};
use rpx_protocol::content::{ErrorContent, ErrorName};
use rpx_protocol::{EngineConnection, Profile, Session};
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend};

use crate::builder::ClosureOutcome;
use crate::closure::{Entry, Next};
use crate::context::{Event, Job};
use crate::state::{Action, Compiler, EvalResult, Hist, SparePolicy};

/// The shared compiler of an rpx cluster.
#[derive(Parser, Debug)]
#[command(name = "rpx-compiler", version)]
struct Args {
    /// Profile whose cluster this compiler serves.
    #[arg(long, env = "RPX_PROFILE", default_value = "default")]
    profile: String,
    /// Cluster id within the profile.
    #[arg(long, default_value = "")]
    cluster_id: String,
    /// Engine connection file to take the key from (default: the profile's).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Seconds to wait for the engine connection file.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Milliseconds to wait for identical cells from the other engines of a group.
    #[arg(long, default_value_t = 15)]
    batch_window_ms: u64,
    /// When to keep a spare context warm (~0.4 GB) so that engines forking into a group of their
    /// own (`%px --targets`, a panic on some) do not wait for one: `after-fork` keeps one only
    /// once engines have diverged.
    #[arg(long, value_enum, env = "RPX_COMPILER_SPARE", default_value = "after-fork")]
    spare_context: SparePolicy,
    /// Interface to bind (`*` or `0.0.0.0` for all interfaces); engines on other hosts need an
    /// address they can reach.
    #[arg(long, default_value = "127.0.0.1")]
    ip: String,
    /// Address written into the compiler's connection file when binding all interfaces.
    #[arg(long)]
    location: Option<String>,
    /// Port to bind (0: any free port); a restarted compiler takes its predecessor's.
    #[arg(long, default_value_t = 0)]
    port: u16,
}

impl Args {
    /// The address to bind and the one engines should use, as `ipcontroller` decides them.
    fn addresses(&self) -> (String, String) {
        let bind = match self.ip.as_str() {
            "*" | "0.0.0.0" => "0.0.0.0".to_string(),
            "localhost" => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        };
        let public = if bind == "0.0.0.0" { self.location.clone().unwrap_or_else(|| "127.0.0.1".into()) } else { bind.clone() };
        (bind, public)
    }
}

fn main() {
    relay::run_if_relay();
    evcxr::runtime_hook();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,rpx_compiler=info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(args)) {
        eprintln!("rpx-compiler: {e:#}");
        std::process::exit(1);
    }
}

fn target_libdir() -> String {
    std::process::Command::new("rustc")
        .args(["--print", "target-libdir"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let profile = Profile::new(&args.profile, &args.cluster_id);
    let engine_file = args.file.clone().unwrap_or_else(|| profile.engine_file());
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let conn: EngineConnection = loop {
        match read_json(&engine_file) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => bail!("no engine connection file at {} ({e}); start the controller first", engine_file.display()),
        }
    };
    let session = Session::new(conn.key.as_bytes(), "rpx-compiler");

    // Work files (relay sockets, evcxr's build directories, compiled artifacts) live in one
    // private directory (0700, unpredictable name) that goes away with the compiler.
    let work_dir = tempfile::Builder::new().prefix("rpx-compiler-").tempdir().context("creating the compiler's work directory")?;
    let work = work_dir.path().to_path_buf();
    std::env::set_var("TMPDIR", &work);
    let runtime_dir = write_runtime_crate(&work).context("writing the rpx_runtime crate for evcxr")?;
    // Engines that can read this token share the compiler's files and load artifacts by path.
    let probe = HostProbe { path: work.join("host-token").display().to_string(), token: uuid::Uuid::new_v4().to_string() };
    std::fs::write(&probe.path, &probe.token).context("writing the host token")?;

    let (bind, public) = args.addresses();
    let mut router = zeromq::RouterSocket::new();
    let monitor = router.monitor();
    let endpoint = rpx_guard::bind(&mut router, &format!("tcp://{bind}:{}", args.port))
        .await
        .with_context(|| format!("binding the compiler socket on {bind}"))?;
    let port = match &endpoint {
        zeromq::Endpoint::Tcp(_, port) => *port,
        other => bail!("the compiler bound an unexpected endpoint {other}"),
    };
    let url = format!("tcp://{public}:{port}");
    let compiler_file = args
        .file
        .as_ref()
        .and_then(|f| f.parent())
        .map_or_else(|| profile.compiler_file(), |d| d.join(profile.compiler_file().file_name().expect("file name")));
    write_private_json(
        &compiler_file,
        &CompilerConnection { url: url.clone(), key: conn.key.clone(), pid: std::process::id(), work_dir: Some(work.clone()) },
    )?;
    tracing::info!(%url, file = %compiler_file.display(), "compiler listening");
    let mut registry = artifacts::Registry::new(&work.join("artifacts")).context("creating the artifact store")?;
    let runtime_libs = registry.runtime_libs(std::path::Path::new(&target_libdir()));
    if runtime_libs.is_empty() {
        tracing::warn!("no libstd-*.so found in rustc's target-libdir: engines on other hosts cannot run cells");
    }
    let hello = EngineHelloReply { probe, runtime_libs, history_restored: false };

    let exe = std::env::current_exe().context("locating the rpx-compiler binary")?;
    let env = context::Env { exe, socket_dir: work.clone(), runtime_dir };
    let result = event_loop(
        router,
        monitor,
        session,
        hello,
        registry,
        env,
        Compiler::with_spare_policy(Duration::from_millis(args.batch_window_ms), args.spare_context),
    )
    .await;
    let _ = std::fs::remove_file(&compiler_file);
    drop(work_dir);
    result
}

/// The `rpx_runtime` crate's source, built into this binary and written out for evcxr's `:dep`.
fn write_runtime_crate(work: &std::path::Path) -> std::io::Result<PathBuf> {
    let dir = work.join("rpx-runtime");
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("Cargo.toml"), include_str!("../../runtime/Cargo.toml"))?;
    std::fs::write(dir.join("src/lib.rs"), include_str!("../../runtime/src/lib.rs"))?;
    Ok(dir)
}

/// The compiler's loop: engine messages, the router's monitor, the context threads' and the
/// closure builder's events, and the clock, each turned into [`Action`]s that [`Server::carry_out`]
/// carries out.
async fn event_loop(
    router: zeromq::RouterSocket,
    mut monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    session: Session,
    hello: EngineHelloReply,
    registry: artifacts::Registry,
    env: context::Env,
    state: Compiler,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let (send, mut recv) = router.split();
    let (ev_tx, mut ev_rx) = unbounded_channel::<Event>();
    let mut server = Server::new(send, session, hello, registry, env, state, ev_tx);
    let mut pending = server.state.start();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    let trimmer = memory::Trimmer::spawn();
    loop {
        server.carry_out(std::mem::take(&mut pending)).await;
        if std::mem::take(&mut server.trim_due) {
            trimmer.request();
        }
        let sleep_until = server.wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            msg = recv.recv() => {
                let frames = match msg {
                    Ok(m) => rpx_guard::zmq::frames(m),
                    Err(e) => { tracing::warn!("receive failed: {e}"); continue; }
                };
                pending = server.on_message(frames).await;
            }
            ev = monitor.next() => {
                if let Some(SocketEvent::Disconnected(peer)) = ev {
                    let ident = Bytes::copy_from_slice(peer.as_ref());
                    tracing::info!(engine = %String::from_utf8_lossy(&ident), "engine disconnected");
                    server.hosts.remove(&ident);
                    pending = server.state.on_engine_gone(&ident);
                }
            }
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { continue };
                pending = server.on_event(ev);
            }
            _ = tokio::time::sleep_until(sleep_until.into()) => {
                server.wake = None;
                pending = server.state.on_tick(Instant::now());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

/// What the compiler's loop owns: the router's sending half, the decisions ([`Compiler`]), the
/// context threads, the closure cache and builder, and the artifacts.
struct Server {
    send: zeromq::RouterSendHalf,
    session: Session,
    hello: EngineHelloReply,
    registry: artifacts::Registry,
    env: context::Env,
    state: Compiler,
    ev_tx: tokio::sync::mpsc::UnboundedSender<Event>,
    contexts: HashMap<u64, context::Handle>,
    /// Contexts that could not start, and why (their evals fail at once).
    failed: HashMap<u64, String>,
    /// Loads evcxr waits on, by context: answered with the verdict lines.
    loads: HashMap<u64, mpsc::Sender<Vec<String>>>,
    closures: closure::Cache,
    builder: Option<builder::Handle>,
    closures_warm: bool,
    /// Each engine's host (from its hello), for the artifact log.
    hosts: HashMap<Bytes, String>,
    /// The earliest time the decisions asked to be woken at.
    wake: Option<Instant>,
    /// Work ended (a context warmed, evaluated, replayed or went away; a closure built): the
    /// heap's freed pages go back to the system once the actions are carried out.
    trim_due: bool,
}

impl Server {
    fn new(
        send: zeromq::RouterSendHalf,
        session: Session,
        hello: EngineHelloReply,
        registry: artifacts::Registry,
        env: context::Env,
        state: Compiler,
        ev_tx: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> Server {
        Server {
            send,
            session,
            hello,
            registry,
            env,
            state,
            ev_tx,
            contexts: HashMap::new(),
            failed: HashMap::new(),
            loads: HashMap::new(),
            closures: closure::Cache::default(),
            builder: None,
            closures_warm: false,
            hosts: HashMap::new(),
            wake: None,
            trim_due: false,
        }
    }

    /// The closure builder, started if it is not running. Closures compile in their own crate,
    /// warmed up in the background once the first cell context is ready (so the two warm-ups do
    /// not share the CPU), or at the first closure.
    fn builder(&mut self) -> &mut builder::Handle {
        let (dir, runtime_dir, ev_tx) = (self.env.socket_dir.join("closures"), self.env.runtime_dir.clone(), self.ev_tx.clone());
        self.builder.get_or_insert_with(|| builder::spawn(dir, runtime_dir, ev_tx))
    }

    /// Carry out actions; a failed context answers its evals at once.
    async fn carry_out(&mut self, mut pending: Vec<Action>) {
        while !pending.is_empty() {
            let mut next = Vec::new();
            for action in pending.drain(..) {
                match action {
                    Action::Send { to, msg_type, content } => {
                        let (_, frames) = self.session.msg(std::slice::from_ref(&to), msg_type, content, None, json!({}), &[]);
                        let sent = tokio::time::timeout(Duration::from_secs(5), self.send.send(rpx_guard::zmq::message(frames))).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::warn!(engine = %String::from_utf8_lossy(&to), msg_type, "could not send to engine");
                        }
                    }
                    Action::NewContext { ctx } => {
                        self.contexts.insert(ctx, context::spawn(ctx, self.env.clone(), self.ev_tx.clone()));
                    }
                    Action::Replay { ctx, cells } => {
                        if let Some(h) = self.contexts.get(&ctx) {
                            let _ = h.tx.send(Job::Replay(cells));
                        }
                    }
                    Action::Eval { ctx, code } => match self.failed.get(&ctx) {
                        Some(message) => next.extend(self.state.on_eval_done(ctx, EvalResult::Failed { message: message.clone() })),
                        None => {
                            if let Some(h) = self.contexts.get(&ctx) {
                                let _ = h.tx.send(Job::Eval(code));
                            }
                        }
                    },
                    Action::Verdict { ctx, lines } => {
                        if let Some(tx) = self.loads.remove(&ctx) {
                            let _ = tx.send(lines);
                        }
                    }
                    Action::DropContext { ctx } => {
                        self.contexts.remove(&ctx);
                        self.failed.remove(&ctx);
                        self.trim_due = true;
                        tracing::debug!(ctx, "dropped context");
                    }
                    Action::WakeAt(t) => self.wake = Some(self.wake.map_or(t, |w| w.min(t))),
                }
            }
            pending = next;
        }
    }

    /// A message from an engine: pings and artifact requests are answered here, closure
    /// requests go to the closure cache, the rest to the decisions.
    async fn on_message(&mut self, frames: Vec<Bytes>) -> Vec<Action> {
        let msg = match self.session.decode(frames) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("dropped a message: {e}");
                return vec![];
            }
        };
        let Some(from) = msg.idents.first().cloned() else { return vec![] };
        match msg.msg_type() {
            msg_type::PING => {
                send_to(&mut self.send, &self.session, &from, msg_type::PONG, json!({}), &[]).await;
                return vec![];
            }
            msg_type::ARTIFACT_REQUEST => {
                let host = self.hosts.get(&from).map_or("?", String::as_str);
                let (content, buffers) = serve_artifact(&mut self.registry, host, msg.content);
                send_to(&mut self.send, &self.session, &from, msg_type::ARTIFACT_REPLY, content, &buffers).await;
                return vec![];
            }
            msg_type::ENGINE_HELLO => {
                if let Ok(h) = serde_json::from_value::<EngineHello>(msg.content.clone()) {
                    self.hosts.insert(from.clone(), h.hostname);
                }
            }
            msg_type::CLOSURE_REQUEST => return self.on_closure_request(from, msg.content),
            _ => {}
        }
        handle_engine_message(&mut self.state, &self.session, &self.hello, from, msg)
    }

    /// A `closure_request`: answered from the cache, or waiting for a build under way, or
    /// handed to the builder.
    fn on_closure_request(&mut self, from: Bytes, content: serde_json::Value) -> Vec<Action> {
        let req = match serde_json::from_value::<ClosureRequest>(content) {
            Ok(r) => r,
            Err(e) => return bad(&self.session, &from, e),
        };
        let code = match self.closures.resolve(req.closure) {
            Ok(code) => code,
            Err(why) => {
                tracing::info!(request_id = %req.request_id, "{why}");
                let error = ErrorContent::bare(ErrorName::UnknownClosure, why, vec![]);
                let reply =
                    ClosureReply { request_id: req.request_id, status: "error".into(), artifact: None, fn_name: String::new(), error };
                return vec![Action::Send {
                    to: from,
                    msg_type: msg_type::CLOSURE_REPLY,
                    content: serde_json::to_value(reply).expect("serializes"),
                }];
            }
        };
        let wrapper = match closure::wrap(&code) {
            Ok(w) => w,
            Err(why) => return vec![closure_reply(from, req.request_id, &Entry::Failed { evalue: why.clone(), traceback: vec![why] })],
        };
        match self.closures.request(wrapper, from.clone(), req.request_id.clone()) {
            Next::Answer(entry) => vec![closure_reply(from, req.request_id, &entry)],
            Next::Wait => vec![],
            Next::Compile(w) => {
                tracing::info!(fn_name = %w.fn_name, warm = self.closures_warm, "compiling a closure");
                if let Err(mpsc::SendError(w)) = self.builder().tx.send(w) {
                    // The builder thread is gone (it panicked): start another.
                    tracing::error!("the closure builder stopped; starting a new one");
                    self.builder = None;
                    let _ = self.builder().tx.send(w);
                }
                vec![]
            }
        }
    }

    /// An event of a context thread or of the closure builder.
    fn on_event(&mut self, ev: Event) -> Vec<Action> {
        self.trim_due = !matches!(ev, Event::Load { .. });
        match ev {
            Event::Ready { ctx, elapsed_ms } => {
                tracing::info!(ctx, elapsed_ms, contexts = self.state.context_count(), "context ready");
                self.builder();
                self.state.on_context_started(ctx, Instant::now())
            }
            Event::ClosuresWarm { elapsed_ms, deps_built, error } => {
                match error {
                    None => {
                        self.closures_warm = true;
                        tracing::info!(elapsed_ms, deps_built, "closure builder warm");
                    }
                    Some(e) => tracing::warn!(elapsed_ms, "closure builder not warm: {e}"),
                }
                vec![]
            }
            Event::ClosureDone { fn_name, outcome, deps_built, elapsed_ms } => {
                self.on_closure_done(fn_name, outcome, deps_built, elapsed_ms)
            }
            Event::StartFailed { ctx, message } => {
                tracing::error!(ctx, "{message}");
                self.builder();
                self.failed.insert(ctx, message.clone());
                // An eval may already be queued there; parked batches go out (and fail at once).
                let mut out = self.state.on_eval_done(ctx, EvalResult::Failed { message });
                out.extend(self.state.on_context_started(ctx, Instant::now()));
                out
            }
            Event::Load { ctx, so_path, fn_name, reply } => match self.registry.register(std::path::Path::new(&so_path)) {
                Ok(artifact) => {
                    self.loads.insert(ctx, reply);
                    self.state.on_load_requested(ctx, &artifact, &fn_name)
                }
                Err(e) => {
                    // evcxr sees a panicked run; the eval then fails for its engines.
                    tracing::error!(%so_path, "cannot read a compiled cell: {e}");
                    let _ = reply.send(vec!["EVCXR_PANIC_NOTIFICATION".into()]);
                    vec![]
                }
            },
            Event::EvalDone { ctx, result } => {
                let out = self.state.on_eval_done(ctx, result);
                tracing::debug!(groups = ?self.state.groups(), "eval done");
                out
            }
            Event::ReplayDone { ctx, has_vars } => self.state.on_replay_done(ctx, has_vars),
        }
    }

    /// A closure build ended: its artifact is registered and every request waiting for it answered.
    fn on_closure_done(&mut self, fn_name: String, outcome: ClosureOutcome, deps_built: usize, elapsed_ms: u128) -> Vec<Action> {
        let (entry, final_) = match outcome {
            ClosureOutcome::Compiled { so_path } => match self.registry.register(std::path::Path::new(&so_path)) {
                Ok(artifact) => {
                    // The registry keeps its own copy.
                    let _ = std::fs::remove_file(&so_path);
                    (Entry::Ready { artifact, fn_name: fn_name.clone() }, true)
                }
                Err(e) => (Entry::Failed { evalue: format!("cannot read the compiled closure {so_path}: {e}"), traceback: vec![] }, false),
            },
            ClosureOutcome::CompileError { evalue, traceback } => (Entry::Failed { evalue, traceback }, true),
            ClosureOutcome::Failed { message } => {
                (Entry::Failed { evalue: format!("compiling the closure failed: {message}"), traceback: vec![] }, false)
            }
        };
        tracing::info!(%fn_name, ok = matches!(entry, Entry::Ready { .. }), warm = self.closures_warm, deps_built, elapsed_ms, cached = self.closures.len(), "closure compiled");
        self.closures.finish(&fn_name, entry.clone(), final_).into_iter().map(|(to, id)| closure_reply(to, id, &entry)).collect()
    }
}

/// The `closure_reply` to `to` for a finished closure entry.
fn closure_reply(to: Bytes, request_id: String, entry: &Entry) -> Action {
    let reply = match entry {
        Entry::Ready { artifact, fn_name } => ClosureReply {
            request_id,
            status: "ok".into(),
            artifact: Some(artifact.clone()),
            fn_name: fn_name.clone(),
            error: Default::default(),
        },
        Entry::Failed { evalue, traceback } => ClosureReply {
            request_id,
            status: "error".into(),
            artifact: None,
            fn_name: String::new(),
            error: ErrorContent::bare(ErrorName::CompileError, evalue.clone(), traceback.clone()),
        },
        Entry::Compiling { .. } => unreachable!("only finished entries are sent"),
    };
    Action::Send { to, msg_type: msg_type::CLOSURE_REPLY, content: serde_json::to_value(reply).expect("serializes") }
}

/// Sign and send one message to an engine, with a bounded wait.
async fn send_to(
    send: &mut zeromq::RouterSendHalf,
    session: &Session,
    to: &Bytes,
    msg_type: &'static str,
    content: serde_json::Value,
    buffers: &[Bytes],
) {
    let (_, frames) = session.msg(std::slice::from_ref(to), msg_type, content, None, json!({}), buffers);
    let sent = tokio::time::timeout(Duration::from_secs(5), send.send(rpx_guard::zmq::message(frames))).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::warn!(engine = %String::from_utf8_lossy(to), msg_type, "could not send to engine");
    }
}

/// Answer an `artifact_request`: the reply's content and its one buffer (the bytes).
fn serve_artifact(registry: &mut artifacts::Registry, host: &str, content: serde_json::Value) -> (serde_json::Value, Vec<Bytes>) {
    let req = match serde_json::from_value::<ArtifactRequest>(content) {
        Ok(r) => r,
        Err(e) => {
            let r = ArtifactReply {
                sha256: String::new(),
                status: "error".into(),
                size: 0,
                evalue: format!("malformed artifact_request: {e}"),
            };
            return (serde_json::to_value(r).expect("serializes"), vec![]);
        }
    };
    match registry.serve(&req.sha256, host) {
        Ok((bytes, times, path)) => {
            tracing::info!(sha256 = %req.sha256, size = bytes.len(), %host, times, path = %path.display(), "artifact served");
            let r = ArtifactReply { sha256: req.sha256, status: "ok".into(), size: bytes.len() as u64, evalue: String::new() };
            (serde_json::to_value(r).expect("serializes"), vec![Bytes::from(bytes)])
        }
        Err(evalue) => {
            tracing::warn!(sha256 = %req.sha256, %host, "artifact not served: {evalue}");
            let r = ArtifactReply { sha256: req.sha256, status: "error".into(), size: 0, evalue };
            (serde_json::to_value(r).expect("serializes"), vec![])
        }
    }
}

fn handle_engine_message(
    state: &mut Compiler,
    session: &Session,
    hello: &EngineHelloReply,
    from: Bytes,
    msg: rpx_protocol::Message,
) -> Vec<Action> {
    let content = msg.content.clone();
    match msg.msg_type() {
        msg_type::ENGINE_HELLO => match serde_json::from_value::<EngineHello>(content) {
            Ok(h) => {
                tracing::info!(engine_id = h.engine_id, pid = h.pid, host = %h.hostname, history = h.history.len(), "engine joined");
                let reply = EngineHelloReply { history_restored: true, ..hello.clone() };
                let mut out = vec![Action::Send {
                    to: from.clone(),
                    msg_type: msg_type::ENGINE_HELLO_REPLY,
                    content: serde_json::to_value(reply).expect("serializes"),
                }];
                let history = h.history.into_iter().map(|c| Hist::from_engine(c.code, &c.outcome)).collect();
                out.extend(state.on_hello(from, h.engine_id, history));
                out
            }
            Err(e) => bad(session, &from, e),
        },
        msg_type::CELL_REQUEST => match serde_json::from_value::<CellRequest>(content) {
            Ok(r) => state.on_cell_request(from, r.cell_id, r.code, Instant::now()),
            Err(e) => bad(session, &from, e),
        },
        msg_type::LOAD_DONE => match serde_json::from_value::<LoadDone>(content) {
            Ok(d) => state.on_load_done(from, d.outcome),
            Err(e) => bad(session, &from, e),
        },
        msg_type::WORKER_RESTARTED => state.on_worker_restarted(&from),
        other => {
            tracing::warn!(msg_type = other, "unknown message type from an engine");
            vec![]
        }
    }
}

fn bad(_session: &Session, from: &Bytes, e: serde_json::Error) -> Vec<Action> {
    tracing::warn!(engine = %String::from_utf8_lossy(from), "malformed message content: {e}");
    vec![]
}
