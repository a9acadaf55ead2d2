//! The kernel's own evcxr context, for cells that run locally: created in the background at
//! start, streams the cell's stdout/stderr to iopub while it runs, turns rich output
//! (`EVCXR_BEGIN_CONTENT mime`) into Jupyter mime bundles and rustc errors into tracebacks,
//! answers completion and hover. The runtime that runs the cells is the engines' worker (this
//! binary with [`WORKER_ENV`]), so an interrupt is a panic injected into the running cell: the
//! cell stops and the variables from earlier cells stay; a cell that cannot be interrupted that
//! way is killed after [`LOCAL_GRACE`] (its runtime restarts, local variables are lost). A cell
//! that panics is an error (evcxr itself reports it only on stderr). A cell that mentions `rpx::`
//! first gets the `rpx` client crate as a dependency, compiled ahead of time where
//! [`crate::prepare`] has done so.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use evcxr::{CommandContext, EvalContext, EvalContextOutputs};
use rpx_protocol::content::{plain_text, ErrorContent, ErrorName};
use serde_json::{Map, Value};

use crate::prepare;
use crate::server::Shared;
use rpx_magics::{IopubMsg, StreamName};

/// Set on the runtime process: run as the engines' worker instead of evcxr's runtime.
pub const WORKER_ENV: &str = "RPX_KERNEL_WORKER";

/// How long an interrupted local cell gets to stop before its runtime is killed.
pub const LOCAL_GRACE: Duration = Duration::from_secs(3);

/// How a local cell ended.
pub enum LocalOutcome {
    /// Ran; its result or rich output, if any (mime type -> data).
    Ok(Option<Map<String, Value>>),
    /// Failed.
    Err(ErrorContent),
}

type Job = Box<dyn FnOnce(&mut CommandContext) + Send>;

/// A handle on the evcxr context, which lives on a thread of its own for the kernel's lifetime
/// (the runtime it spawns dies with that thread: `PR_SET_PDEATHSIG`).
pub struct Local {
    jobs: mpsc::Sender<Job>,
    /// Why the context could not be created, once known.
    failed: Arc<Mutex<Option<String>>>,
    shared: Arc<Shared>,
    rpx_added: bool,
    /// The background `rpx-kernel prepare` this kernel started, if any (dies with the kernel).
    _prepare: Option<std::process::Child>,
}

impl Local {
    /// Start creating the context in the background (evcxr warms rust-analyzer up: seconds).
    pub fn start(shared: Arc<Shared>) -> Local {
        let (jobs, rx) = mpsc::channel::<Job>();
        let failed = Arc::new(Mutex::new(None));
        let (fail, sh) = (failed.clone(), shared.clone());
        std::thread::Builder::new()
            .name("evcxr".into())
            .spawn(move || {
                let mut ctx = match new_context() {
                    Ok((ctx, outputs)) => {
                        *sh.stderr_rx.lock().unwrap_or_else(|p| p.into_inner()) = Some(outputs.stderr.clone());
                        forward(outputs.stdout, StreamName::Stdout, sh.clone());
                        forward_stderr(outputs.stderr, sh.clone());
                        *sh.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.process_handle());
                        ctx
                    }
                    Err(e) => {
                        *fail.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("cannot start evcxr: {e}"));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut ctx);
                }
            })
            .expect("spawn a thread");
        Local { jobs, failed, shared, rpx_added: false, _prepare: client_crate_path().and_then(|c| prepare::spawn_background(&c)) }
    }

    /// Run `f` on the context's thread and wait for it.
    fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut CommandContext) -> R + Send + 'static) -> Result<R, String> {
        let (tx, rx) = mpsc::channel();
        let gone = || self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| "the evcxr thread is gone".into());
        self.jobs.send(Box::new(move |ctx| drop(tx.send(f(ctx))))).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }

    /// Run a cell.
    pub fn execute(&mut self, code: &str) -> LocalOutcome {
        if !self.rpx_added && mentions_rpx(code) {
            if let Some(path) = client_crate_path() {
                if let err @ LocalOutcome::Err(..) = self.add_rpx(&path) {
                    return err;
                }
                self.rpx_added = true;
            }
        }
        self.run(code, code)
    }

    /// Add the client crate at `path` to the context: from the prepared seed when there is one
    /// (waiting for a prepare that is running), else built here.
    fn add_rpx(&mut self, path: &std::path::Path) -> LocalOutcome {
        let say = |text: &str| self.shared.publish_stream(StreamName::Stderr, text);
        if prepare::ready_seed(path).is_none() && prepare::running() {
            say("Waiting for the rpx client crate, which is being compiled in the background (`rpx-kernel prepare`)...\n");
            prepare::wait_for_running(path);
        }
        match (prepare::ready_seed(path), prepare::BuildDir::get()) {
            (Some(seed), Some(tmpdir)) => {
                if let Err(e) = prepare::merge_seed(&seed, tmpdir) {
                    say(&format!("Could not use the prepared rpx client crate ({e:#}); building it...\n"));
                }
            }
            _ => say("Adding the rpx client crate to this kernel (its first build takes minutes; `rpx-kernel prepare` does it ahead of time)...\n"),
        }
        for cmd in prepare::setup_commands(path) {
            if let err @ LocalOutcome::Err(..) = self.run(&cmd, &cmd) {
                return err;
            }
        }
        LocalOutcome::Ok(None)
    }

    fn run(&mut self, code: &str, shown: &str) -> LocalOutcome {
        let (shared, code, shown) = (self.shared.clone(), code.to_string(), shown.to_string());
        self.call(move |ctx| run_in(ctx, &code, &shown, &shared))
            .unwrap_or_else(|e| LocalOutcome::Err(ErrorContent::new(ErrorName::KernelError, e, vec![])))
    }

    /// Completions at byte `pos`: `(matches, start byte, end byte)`.
    pub fn complete(&mut self, code: &str, pos: usize) -> Result<(Vec<String>, usize, usize), String> {
        let code = code.to_string();
        self.call(move |ctx| {
            let c = ctx.completions(&code, pos).map_err(|e| e.to_string())?;
            Ok((c.completions.into_iter().map(|c| c.code).collect(), c.start_offset, c.end_offset))
        })?
    }

    /// Hover text at byte `pos`: `(plain, html)`.
    pub fn inspect(&mut self, code: &str, pos: usize) -> Result<(String, String), String> {
        let code = code.to_string();
        self.call(move |ctx| ctx.hover_at(&code, pos).map_err(|e| e.to_string()))?
    }
}

/// Run one cell in the context (on its thread) and say how it ended.
fn run_in(ctx: &mut CommandContext, code: &str, shown: &str, shared: &Shared) -> LocalOutcome {
    shared.interrupted.store(false, Ordering::SeqCst);
    *shared.panic.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    shared.local_seq.fetch_add(1, Ordering::SeqCst);
    *shared.hold.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    *shared.stdin_refused.lock().unwrap_or_else(|p| p.into_inner()) = None;
    shared.local_running.store(true, Ordering::SeqCst);
    let mut r = execute_watched(ctx, code, shared);
    shared.local_running.store(false, Ordering::SeqCst);
    // The relay's notice that a `?` returned an error (see `crate::relay`).
    let question_mark = r.as_mut().is_ok_and(|out| out.content_by_mime_type.remove(crate::relay::ERROR_MIME).is_some());
    let interrupted = shared.interrupted.swap(false, Ordering::SeqCst);
    if r.is_ok() && !interrupted {
        let_stderr_arrive(shared);
    }
    // The error's text is on stderr, just before the relay's mark: wait for the forwarder to
    // take it out (bounded: without it the error still shows, with a generic message).
    let question_mark = question_mark.then(|| shared.take_error_text(Duration::from_secs(2)).unwrap_or_default());
    let stdin_refused = shared.stdin_refused.lock().unwrap_or_else(|p| p.into_inner()).take();
    let mut report = std::mem::take(&mut *shared.panic.lock().unwrap_or_else(|p| p.into_inner()));
    // Blank lines held back in case a panic report followed them (it starts with one) were the
    // cell's own.
    let held = report.take_held_blanks();
    if held > 0 {
        shared.publish(&IopubMsg::Stream { name: StreamName::Stderr, text: "\n".repeat(held) });
    }
    shared.release_stderr(true);
    let ended = Ended { interrupted, panic: report.lines, stdin_refused, question_mark };
    outcome(r, ended, shown)
}

/// Run the cell in the evcxr context, watching for plain stdin reads of the runtime meanwhile.
fn execute_watched(ctx: &mut CommandContext, code: &str, shared: &Shared) -> Result<evcxr::EvalOutputs, evcxr::Error> {
    let mut callbacks =
        evcxr::EvalCallbacks { input_reader: &|req| shared.read_input(&crate::relay::restore_prompt(&req.prompt), req.is_password) };
    let runtime_pid =
        shared.child.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).id() as i32);
    // The idle runtime waits for its next command: the buffer of that read is its own.
    let idle_read = runtime_pid.and_then(|pid| rpx_worker::stdin::reading_stdin(pid).map(|b| (pid, b)));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        if let Some((pid, own)) = idle_read {
            let done = &done;
            scope.spawn(move || watch_plain_stdin_reads(shared, pid, &own, done));
        }
        let r = ctx.execute_with_callbacks(code, &mut callbacks);
        done.store(true, Ordering::SeqCst);
        r
    })
}

/// A panic is only on stderr, written before the cell ended: let its lines arrive.
fn let_stderr_arrive(shared: &Shared) {
    let end = Instant::now() + Duration::from_millis(50);
    let pending = || shared.stderr_rx.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|rx| !rx.is_empty());
    while pending() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(2));
}

/// What was seen of a local cell's end besides evcxr's result.
struct Ended {
    /// An interrupt came while it ran.
    interrupted: bool,
    /// Its panic report's lines (empty: no panic).
    panic: Vec<String>,
    /// It asked for input that could not be given: the prompt.
    stdin_refused: Option<String>,
    /// A `?` returned an error: its text's lines.
    question_mark: Option<Vec<String>>,
}

/// How the cell ended, from evcxr's result and what else was seen.
fn outcome(r: Result<evcxr::EvalOutputs, evcxr::Error>, ended: Ended, shown: &str) -> LocalOutcome {
    let Ended { interrupted, panic, stdin_refused, question_mark } = ended;
    let err = |ename: ErrorName, evalue: String, tb: Vec<String>| LocalOutcome::Err(ErrorContent::new(ename, evalue, tb));
    match r {
        Ok(_) if !interrupted && panic.is_empty() && stdin_refused.is_some() => {
            let prompt = stdin_refused.unwrap_or_default();
            let evalue = if prompt.is_empty() {
                "the cell read stdin, but this frontend does not accept input requests (allow_stdin is false); the cell was stopped there"
                    .to_string()
            } else {
                format!("the cell asked for input ({prompt:?}), but this frontend does not accept input requests (allow_stdin is false), so it got an empty line")
            };
            err(ErrorName::StdinNotImplementedError, evalue, vec![])
        }
        Ok(_) if !interrupted && panic.is_empty() && question_mark.is_some() => {
            let text = question_mark.unwrap_or_default();
            let evalue = text.join("\n").trim().to_string();
            let evalue = if evalue.is_empty() { "a `?` in the cell returned an error (its text was empty)".to_string() } else { evalue };
            let mut tb: Vec<String> =
                text.iter().enumerate().map(|(i, l)| if i == 0 { format!("Error: {l}") } else { l.clone() }).collect();
            if tb.is_empty() {
                tb.push(format!("Error: {evalue}"));
            }
            tb.push("note: a `?` in the cell returned this error, so the cell stopped there; variables it defined are not kept".into());
            err(ErrorName::Error, evalue, tb)
        }
        Ok(_) if interrupted => err(
            ErrorName::KeyboardInterrupt,
            "the cell was interrupted (SIGINT); the kernel kept the variables of earlier cells".into(),
            vec![],
        ),
        Ok(_) if !panic.is_empty() => {
            let evalue = panic.get(1).cloned().unwrap_or_else(|| panic[0].clone());
            err(ErrorName::Panic, evalue, panic)
        }
        Ok(out) if out.content_by_mime_type.is_empty() => LocalOutcome::Ok(None),
        Ok(out) if out.content_by_mime_type.len() == 1 && out.content_by_mime_type.get("text/plain").is_some_and(|t| t == "()") => {
            LocalOutcome::Ok(None)
        }
        Ok(out) => {
            let data = out
                .content_by_mime_type
                .into_iter()
                .map(|(mime, text)| {
                    let v = if mime.contains("json") {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    } else {
                        Value::String(text)
                    };
                    (mime, v)
                })
                .collect();
            LocalOutcome::Ok(Some(data))
        }
        Err(evcxr::Error::CompilationErrors(errors)) => {
            let (evalue, tb) = rpx_diagnostics::render_evcxr(shown, &errors);
            err(ErrorName::CompileError, evalue, tb)
        }
        Err(evcxr::Error::SubprocessTerminated(why)) if interrupted => err(
            ErrorName::KeyboardInterrupt,
            "the cell was interrupted; the kernel's local variables were lost (its Rust runtime restarted)".into(),
            vec![why],
        ),
        Err(evcxr::Error::SubprocessTerminated(why)) => {
            err(ErrorName::RuntimeDied, format!("{why}; the kernel's local variables were lost (its Rust runtime restarted)"), vec![])
        }
        Err(evcxr::Error::TypeRedefinedVariablesLost(vars)) => {
            err(ErrorName::VariablesLost, format!("a type was redefined, so these variables were dropped: {}", vars.join(", ")), vec![])
        }
        Err(e) => {
            let msg = e.to_string();
            let ename = if msg.contains("panicked") { ErrorName::Panic } else { ErrorName::Error };
            err(ename, msg.trim_end().to_string(), vec![])
        }
    }
}

/// How often, and how many times in a row, the runtime must be seen blocked reading its stdin
/// (outside an input request) before the kernel acts on it.
const STDIN_POLL: Duration = Duration::from_millis(50);
const STDIN_POLLS: u32 = 8;

/// A plain `std::io::stdin()` read in a local cell (no `EVCXR_INPUT_REQUEST` line first) would
/// wait on evcxr's command pipe forever. Seen blocked in `read(0, ..)` for a while (a command in
/// the pipe is read at once), it gets its line from the frontend (an `input_request` with an
/// empty prompt, the reply written to the runtime's stdin) or, when the frontend takes no
/// input, the cell is stopped (the interrupt unwinds the read) and fails.
/// `own` is the buffer of the runtime's own read of its commands (evcxr's next `LOAD_AND_RUN`,
/// while the cell compiles), which is not the cell's.
fn watch_plain_stdin_reads(shared: &Shared, pid: i32, own: &str, done: &std::sync::atomic::AtomicBool) {
    let mut seen = 0;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(STDIN_POLL);
        let reading = rpx_worker::stdin::reading_stdin(pid);
        if shared.in_input.load(Ordering::SeqCst) || reading.is_none_or(|b| b == own) {
            seen = 0;
            continue;
        }
        seen += 1;
        if seen < STDIN_POLLS {
            continue;
        }
        seen = 0;
        if shared.stdin_parent.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            let line = shared.read_input("", false);
            if done.load(Ordering::SeqCst) {
                return;
            }
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/fd/0"))
                .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot give the local cell its input");
            }
        } else {
            shared.stdin_refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(String::new);
            // SAFETY: kill(2) with our runtime's pid and a valid signal number.
            unsafe { libc::kill(pid, libc::SIGINT) };
            return;
        }
    }
}

/// A result that is just `()` (a cell ending in `println!(..)` without `;`): not shown, as
/// ipyparallel does not show `None`.
pub fn is_unit(data: &Value) -> bool {
    data.as_object().is_some_and(|d| d.len() == 1) && plain_text(data) == Some("()")
}

/// An evcxr context whose runtime is this binary as the engines' worker.
pub fn new_context() -> Result<(CommandContext, EvalContextOutputs), evcxr::Error> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.env(WORKER_ENV, "1");
    let (mut ctx, outputs) = EvalContext::with_subprocess_command(cmd)?;
    // Every cell compiled from here on exports the worker's flush (see the relay for the
    // marker that may then follow a partial line).
    ctx.eval(rpx_protocol::compile::cell_abi::FLUSH_ITEM)?;
    Ok((CommandContext::with_eval_context(ctx), outputs))
}

fn mentions_rpx(code: &str) -> bool {
    code.contains("rpx::") && !code.lines().any(|l| l.trim_start().starts_with(":dep rpx"))
}

/// The `rpx` client crate's sources: `$RPX_CLIENT_PATH`, else the workspace this kernel was built in.
pub fn client_crate_path() -> Option<PathBuf> {
    let p = match std::env::var_os("RPX_CLIENT_PATH") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../client")),
    };
    let p = p.canonicalize().ok()?;
    p.join("Cargo.toml").is_file().then_some(p)
}

/// Forward a stream of evcxr output lines to iopub, batching lines that are already waiting.
fn forward(rx: crossbeam_channel::Receiver<String>, name: StreamName, shared: Arc<Shared>) {
    std::thread::Builder::new()
        .name(format!("evcxr-{}", name.as_str()))
        .spawn(move || {
            while let Ok(line) = rx.recv() {
                let mut lines = vec![line];
                while let Ok(more) = rx.try_recv() {
                    lines.push(more);
                }
                let mut text = lines.join("\n");
                text.push('\n');
                shared.publish(&IopubMsg::Stream { name, text });
            }
        })
        .expect("spawn a thread");
}

/// Forward the runtime's stderr to iopub: a panic report is kept out (it becomes the cell's
/// error), and the last lines are held for [`crate::server::STDERR_HOLD`] in case the relay's
/// mark says they were the text of an error a `?` returned (that too becomes the error).
fn forward_stderr(rx: crossbeam_channel::Receiver<String>, shared: Arc<Shared>) {
    std::thread::Builder::new()
        .name("evcxr-stderr".into())
        .spawn(move || loop {
            let line = match rx.recv_timeout(crate::server::STDERR_HOLD) {
                Ok(line) => line,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    shared.release_stderr(false);
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let mut lines = vec![line];
            while let Ok(more) = rx.try_recv() {
                lines.push(more);
            }
            let lines = shared.note_stderr(&lines);
            let (publish, marked) = shared.hold.lock().unwrap_or_else(|p| p.into_inner()).note(lines, Instant::now());
            if marked {
                shared.hold_cv.notify_all();
            }
            shared.publish_lines(StreamName::Stderr, publish);
            shared.release_stderr(false);
        })
        .expect("spawn a thread");
}
