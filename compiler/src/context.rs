//! One evcxr context on its own thread, with the Unix socket its relay connects to.
//!
//! The thread takes [`Job`]s in order (replay, eval) and reports [`Event`]s. While an eval
//! runs, evcxr writes `LOAD_AND_RUN` to its relay; the relay's connection is served here, and
//! each load is either answered at once (dry replay) or handed to the compiler's main loop, which
//! dispatches it to engines and answers with the verdict lines.
//!
//! Closures are not compiled here: [`crate::builder`] compiles them with plain cargo. Any
//! context whose code mentions `rpx_runtime` gets that crate as a dependency first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use evcxr::EvalContext;
use tokio::sync::mpsc::UnboundedSender;

use crate::builder::ClosureOutcome;
use crate::relay::RELAY_SOCKET_ENV;
use crate::state::{CtxId, EvalResult, Hist};

/// Work for a context thread.
#[derive(Debug)]
pub enum Job {
    Replay(Vec<Hist>),
    Eval(String),
}

/// What a context thread reports to the main loop.
#[derive(Debug)]
pub enum Event {
    Ready {
        ctx: CtxId,
        elapsed_ms: u128,
    },
    StartFailed {
        ctx: CtxId,
        message: String,
    },
    /// evcxr asked the relay to run an artifact; answer through `reply`.
    Load {
        ctx: CtxId,
        so_path: String,
        fn_name: String,
        reply: mpsc::Sender<Vec<String>>,
    },
    EvalDone {
        ctx: CtxId,
        result: EvalResult,
    },
    ReplayDone {
        ctx: CtxId,
        has_vars: bool,
    },
    /// The closure builder's warm-up build ended (`error`: it failed; closures then build
    /// their dependencies themselves).
    ClosuresWarm {
        elapsed_ms: u128,
        deps_built: usize,
        error: Option<String>,
    },
    /// A closure compile ended; `deps_built` counts the dependency crates it had to compile.
    ClosureDone {
        fn_name: String,
        outcome: ClosureOutcome,
        deps_built: usize,
        elapsed_ms: u128,
    },
}

/// How the relay connection answers loads right now.
#[derive(Debug, Clone)]
enum Mode {
    /// Answer at once with these lines (warm-up and replay: nothing runs on engines).
    Dry(Vec<String>),
    /// Hand loads to the main loop.
    Live,
}

/// Handle to a context thread. Dropping it ends the thread (and the evcxr context).
pub struct Handle {
    pub tx: mpsc::Sender<Job>,
}

/// Where the `rpx_runtime` crate's source is, for `:dep`.
#[derive(Debug, Clone)]
pub struct Env {
    /// This binary, as found at startup.
    pub exe: PathBuf,
    pub socket_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

/// Start a context thread.
pub fn spawn(ctx: CtxId, env: Env, events: UnboundedSender<Event>) -> Handle {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("ctx-{ctx}"))
        .spawn(move || {
            if let Err(message) = run(ctx, env, rx, events.clone()) {
                let _ = events.send(Event::StartFailed { ctx, message });
            }
        })
        .expect("spawn context thread");
    Handle { tx }
}

/// Evaluates code in one evcxr context, adding the `rpx_runtime` dependency to the state of
/// the first eval that mentions it (it stays once that eval commits). evcxr's artifact cache
/// (`:cache`) stays off: its rustc wrapper failed when several compilers filled the shared
/// cache at once, so each context builds rpx_runtime's dependencies itself, once.
struct Evaluator {
    /// `{ package = "rpx-runtime", path = "..." }`: the crate's source, written out by main.
    dep_config: String,
    added: bool,
}

impl Evaluator {
    fn eval(&mut self, ectx: &mut evcxr::EvalContext, code: &str) -> Result<evcxr::EvalOutputs, evcxr::Error> {
        let mut state = ectx.state();
        let needs = !self.added && code.contains("rpx_runtime");
        if needs {
            state.add_dep("rpx_runtime", &self.dep_config)?;
        }
        let out = ectx.eval_with_state(code, state)?;
        self.added |= needs;
        Ok(out)
    }
}

fn run(ctx: CtxId, env: Env, rx: mpsc::Receiver<Job>, events: UnboundedSender<Event>) -> Result<(), String> {
    let started = std::time::Instant::now();
    let path = env.socket_dir.join(format!("ctx-{ctx}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    let mode = Arc::new(Mutex::new(Mode::Dry(vec![])));
    {
        let mode = mode.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name(format!("relay-{ctx}"))
            .spawn(move || {
                // evcxr restarts its child after a crash: accept every new relay connection.
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => serve_relay(ctx, s, &mode, &events),
                        Err(e) => tracing::warn!(ctx, "relay accept failed: {e}"),
                    }
                }
            })
            .expect("spawn relay thread");
    }
    // Contexts warm up one at a time: two at once on a small machine delay the first one, the
    // one an engine is usually waiting for.
    static WARMING: Mutex<()> = Mutex::new(());
    let warming = WARMING.lock().unwrap_or_else(|e| e.into_inner());
    // The relay and evcxr's rustc wrapper are this binary. Its path is taken once at startup:
    // `/proc/self/exe` would name cargo when cargo runs the wrapper, and a path taken after a
    // rebuild replaced the binary would end in " (deleted)".
    let exe = env.exe.clone();
    let mut cmd = std::process::Command::new(exe);
    cmd.env(RELAY_SOCKET_ENV, &path);
    let (mut ectx, outputs) =
        evcxr::EvalContext::with_subprocess_command(cmd).map_err(|e| format!("creating the evcxr context failed: {e}"))?;
    // Nothing useful arrives here (engines stream their own output), but the channels must drain.
    for rx in [outputs.stdout, outputs.stderr] {
        std::thread::spawn(move || while rx.recv().is_ok() {});
    }
    let mut dep = Evaluator {
        dep_config: format!("{{ package = \"rpx-runtime\", path = {:?} }}", env.runtime_dir.display().to_string()),
        added: false,
    };
    // Pay rust-analyzer's warm-up (seconds, at the first variable-binding cell) now, before
    // any engine waits, then forget the variable (clear keeps the warm analyzer).
    if dep.eval(&mut ectx, "let rpx_warm_up: u64 = 1;").is_ok() {
        ectx.clear().map_err(|e| format!("resetting the warmed-up context failed: {e}"))?;
    }
    // Every cell compiled from here on exports the worker's flush (nothing runs on engines: the
    // relay is still dry).
    if let Err(e) = dep.eval(&mut ectx, rpx_protocol::compile::cell_abi::FLUSH_ITEM) {
        tracing::warn!(ctx, "cells will not flush their stdout: {e}");
    }
    drop(warming);
    let _ = events.send(Event::Ready { ctx, elapsed_ms: started.elapsed().as_millis() });
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Job::Replay(cells) => {
                for cell in cells {
                    *mode.lock().expect("mode lock") = Mode::Dry(cell.verdict.lines());
                    if let Err(e) = dep.eval(&mut ectx, &cell.code) {
                        tracing::warn!(ctx, "replaying a cell failed: {e}");
                    }
                }
                let has_vars = ectx.variables_and_types().next().is_some();
                let _ = events.send(Event::ReplayDone { ctx, has_vars });
            }
            Job::Eval(code) => {
                *mode.lock().expect("mode lock") = Mode::Live;
                let before = believed(&ectx);
                let result = match dep.eval(&mut ectx, &code) {
                    Ok(_) => {
                        let after = believed(&ectx);
                        EvalResult::Ok { has_vars: !after.0.is_empty(), changed: after != before }
                    }
                    Err(evcxr::Error::CompilationErrors(errors)) => {
                        let (evalue, traceback) = rpx_diagnostics::render_evcxr(&code, &errors);
                        EvalResult::CompileError { evalue, traceback }
                    }
                    Err(e) => EvalResult::Failed { message: e.to_string() },
                };
                *mode.lock().expect("mode lock") = Mode::Dry(vec![]);
                let _ = events.send(Event::EvalDone { ctx, result });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// What a context believes in: its variables with their types, and its item names.
fn believed(ectx: &EvalContext) -> (BTreeMap<String, String>, BTreeSet<String>) {
    (
        ectx.variables_and_types().map(|(v, t)| (v.to_string(), t.to_string())).collect(),
        ectx.defined_item_names().map(str::to_string).collect(),
    )
}

fn serve_relay(ctx: CtxId, stream: UnixStream, mode: &Mutex<Mode>, events: &UnboundedSender<Event>) {
    let Ok(mut out) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Some(rest) = line.strip_prefix("LOAD_AND_RUN ") else {
            tracing::warn!(ctx, "unexpected line from evcxr: {line}");
            continue;
        };
        let mut parts = rest.splitn(2, ' ');
        let (so_path, fn_name) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
        let current = mode.lock().expect("mode lock").clone();
        let lines = match current {
            Mode::Dry(lines) => lines,
            Mode::Live => {
                let (tx, rx) = mpsc::channel();
                if events.send(Event::Load { ctx, so_path, fn_name, reply: tx }).is_err() {
                    vec!["EVCXR_PANIC_NOTIFICATION".into()]
                } else {
                    // The main loop always answers: every engine completes, dies or disconnects.
                    rx.recv().unwrap_or_else(|_| vec!["EVCXR_PANIC_NOTIFICATION".into()])
                }
            }
        };
        let mut text = String::new();
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
        text.push_str("EVCXR_EXECUTION_COMPLETE\n");
        if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}
