//! One evcxr context on its own thread, with the Unix socket its relay connects to.
//!
//! The thread takes [`Command`]s in order (replay, eval) and reports [`Event`]s. While an eval
//! runs, evcxr writes `LOAD_AND_RUN` to its relay; the relay's connection is served here, and
//! each load is either answered at once (dry replay) or handed to the compiler's main loop, which
//! dispatches it to engines and answers with the verdict lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use crate::relay::RELAY_SOCKET_ENV;
use crate::state::{CtxId, EvalResult, Hist};

/// Work for a context thread.
#[derive(Debug)]
pub enum Command {
    Replay(Vec<Hist>),
    Eval(String),
}

/// What a context thread reports to the main loop.
#[derive(Debug)]
pub enum Event {
    Ready { ctx: CtxId, elapsed_ms: u128 },
    StartFailed { ctx: CtxId, message: String },
    /// evcxr asked the relay to run an artifact; answer through `reply`.
    Load { ctx: CtxId, so_path: String, fn_name: String, reply: mpsc::Sender<Vec<String>> },
    EvalDone { ctx: CtxId, result: EvalResult },
    ReplayDone { ctx: CtxId, has_vars: bool },
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
    pub tx: mpsc::Sender<Command>,
}

/// Start a context thread.
pub fn spawn(ctx: CtxId, socket_dir: PathBuf, events: UnboundedSender<Event>) -> Handle {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("ctx-{ctx}"))
        .spawn(move || {
            if let Err(message) = run(ctx, socket_dir, rx, events.clone()) {
                let _ = events.send(Event::StartFailed { ctx, message });
            }
        })
        .expect("spawn context thread");
    Handle { tx }
}

fn run(ctx: CtxId, socket_dir: PathBuf, rx: mpsc::Receiver<Command>, events: UnboundedSender<Event>) -> Result<(), String> {
    let started = std::time::Instant::now();
    let path = socket_dir.join(format!("ctx-{ctx}.sock"));
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
    // /proc/self/exe stays valid even if the binary is replaced (rebuilt) while the cluster runs.
    let exe = std::path::PathBuf::from("/proc/self/exe");
    let mut cmd = std::process::Command::new(exe);
    cmd.env(RELAY_SOCKET_ENV, &path);
    let (mut ectx, outputs) = evcxr::EvalContext::with_subprocess_command(cmd).map_err(|e| format!("creating the evcxr context failed: {e}"))?;
    // Nothing useful arrives here (engines stream their own output), but the channels must drain.
    for rx in [outputs.stdout, outputs.stderr] {
        std::thread::spawn(move || while rx.recv().is_ok() {});
    }
    // The first cell that binds a variable costs seconds of rust-analyzer warm-up: pay it now,
    // before any engine waits, then forget the variable (clear keeps the warm analyzer).
    if ectx.eval("let rpx_warm_up: u64 = 1;").is_ok() {
        ectx.clear().map_err(|e| format!("resetting the warmed-up context failed: {e}"))?;
    }
    drop(warming);
    let _ = events.send(Event::Ready { ctx, elapsed_ms: started.elapsed().as_millis() });
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Replay(cells) => {
                for cell in cells {
                    *mode.lock().expect("mode lock") = Mode::Dry(cell.verdict.lines());
                    if let Err(e) = ectx.eval(&cell.code) {
                        tracing::warn!(ctx, "replaying a cell failed: {e}");
                    }
                }
                let has_vars = ectx.variables_and_types().next().is_some();
                let _ = events.send(Event::ReplayDone { ctx, has_vars });
            }
            Command::Eval(code) => {
                *mode.lock().expect("mode lock") = Mode::Live;
                let result = match ectx.eval(&code) {
                    Ok(_) => EvalResult::Ok { has_vars: ectx.variables_and_types().next().is_some() },
                    Err(evcxr::Error::CompilationErrors(errors)) => {
                        let (evalue, traceback) = crate::diagnostics::render(&code, &errors);
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
