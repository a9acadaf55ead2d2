//! Cell state: a cell from its `execute_request` (or from a pull that has the worker write
//! variables out) until its reply, the loads the compiler sent for it (which one runs next,
//! which are skipped), and the verdict a finished cell gets: refused artifact, worker died,
//! interrupted, panic, or the compiler's error. Also the bookkeeping of pushed values: which
//! ones the next cell binds as variables, which namespace files still hold their variable's
//! value, and so how a pull is answered.
//!
//! Pure: the functions here return what to publish and reply (an [`Ending`]) or what to tell
//! the compiler ([`LoadDone`]); the engine loop sends it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rpx_protocol::apply::ename;
use rpx_protocol::compile::{Artifact, CellReply, Load, LoadDone, LoadOutcome};
use serde_json::{json, Value};

use crate::artifacts::Step;
use crate::output::{find_panic, StderrTail, StdoutEvent};
use crate::queue::Request;
use crate::reply::{EngineError, Identity};

/// How long to wait for a panic message on stderr after the cell finished.
pub const PANIC_GRACE: Duration = Duration::from_millis(150);

/// Why a cell runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Purpose {
    /// The user's code (`execute_request`).
    Execute,
    /// Serializing variables into the namespace for a pull of these names.
    Pull(Vec<String>),
}

/// The cell being executed.
#[derive(Debug)]
pub struct Cell {
    pub req: Request,
    pub purpose: Purpose,
    pub silent: bool,
    pub count: u64,
    /// Reply metadata, started when the cell started.
    pub md: Value,
    /// User code panicked (or a load of the cell was skipped).
    pub panicked: bool,
    /// The worker died while running the cell: how.
    pub died: Option<String>,
    /// Rich output of the cell: mime type -> data.
    pub content: BTreeMap<String, String>,
    /// The compiler's verdict, once it came.
    pub reply: Option<CellReply>,
    grace_until: Option<Instant>,
    /// SIGINT arrived for this cell: loads of it not started yet are skipped.
    pub interrupt_requested: bool,
    /// The cell was interrupted (`Some(true)`: before the worker ran it).
    pub interrupted: Option<bool>,
    /// An artifact of the cell could not be had or failed its check: it did not run.
    pub refused: Option<String>,
    /// A `?` at the cell's top level returned an error (evcxr's `EVCXR_ERROR_OCCURRED`).
    pub error_occurred: bool,
    /// The cell asked for input (its prompt): engines have no frontend, so it was stopped.
    pub stdin_refused: Option<String>,
    /// Ticks in a row the worker was seen blocked reading stdin while running this cell.
    pub stdin_reads_seen: u32,
}

/// Why a load of the cell is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// SIGINT arrived before the worker started it.
    Interrupted,
    /// Its artifact could not be had or failed its check.
    Refused(String),
    /// Its cell is no longer running (it failed while the compiler was unreachable): a cell
    /// that was reported failed must not run later.
    Stale,
}

impl Skip {
    /// The reason the compiler is told.
    pub fn reason(&self) -> String {
        match self {
            Skip::Interrupted => "interrupted (SIGINT) before it ran".into(),
            Skip::Refused(why) => why.clone(),
            Skip::Stale => "its cell had already ended".into(),
        }
    }

    /// What the compiler is told about the skipped load of `cell_id` (it handles a skipped
    /// load as a panicked one).
    pub fn load_done(&self, cell_id: String) -> LoadDone {
        LoadDone { cell_id, outcome: LoadOutcome::Skipped { reason: self.reason() } }
    }
}

/// Something to publish on iopub: topic kind, message type, content.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub kind: &'static str,
    pub msg_type: &'static str,
    pub content: Value,
}

/// How a finished cell is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// A pull whose variables are now in the namespace: answer with these names' values.
    Pulled(Vec<String>),
    /// A pull that failed: answer the `apply_request` with this error.
    PullFailed(EngineError),
    /// The user's cell failed: publish and answer this error.
    Failed(EngineError),
    /// The user's cell succeeded: publish its result (if any), then answer ok.
    Succeeded(Option<Publication>),
}

impl Cell {
    pub fn new(req: Request, purpose: Purpose, silent: bool, count: u64, md: Value) -> Cell {
        Cell {
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
            error_occurred: false,
            stdin_refused: None,
            stdin_reads_seen: 0,
        }
    }

    /// The cell id: its request's msg id.
    pub fn id(&self) -> &str {
        self.req.msg_id()
    }

    /// The worker died (`status`) while this cell was running; the first death counts.
    pub fn worker_died(&mut self, status: &str) {
        self.died.get_or_insert_with(|| status.to_string());
    }

    /// Whether a load of this cell that has not started yet is skipped rather than run.
    pub fn skips_loads(&self) -> bool {
        self.interrupt_requested
    }

    /// A load of this cell was skipped: the cell counts as panicked, and says why.
    pub fn skipped(&mut self, why: &Skip) {
        self.panicked = true;
        match why {
            Skip::Interrupted => {
                self.interrupted.get_or_insert(true);
            }
            Skip::Refused(w) => {
                self.refused.get_or_insert_with(|| w.clone());
            }
            Skip::Stale => {}
        }
    }

    /// Whether it waits for a panic message on stderr (so stderr output may finish it).
    pub fn waits_for_panic_message(&self) -> bool {
        self.grace_until.is_some()
    }

    /// Whether the cell can be finished at `now`: the compiler's reply is in and no load of it
    /// is running or waiting (`loads_pending`). A cell that panicked gets [`PANIC_GRACE`] for
    /// its panic message to arrive on stderr (stdout and stderr are separate pipes), unless the
    /// message is there already or the worker died or was interrupted.
    pub fn ready_to_finish(&mut self, loads_pending: bool, stderr: &StderrTail, now: Instant) -> bool {
        if self.reply.is_none() || loads_pending {
            return false;
        }
        let panic_text_missing =
            self.panicked && self.interrupted.is_none() && find_panic(&stderr.panic_lines()).is_none_or(|p| p.message.is_empty());
        let error_text_missing = self.error_occurred && !self.panicked && question_mark_text(stderr).is_none();
        if self.died.is_none() && self.stdin_refused.is_none() && (panic_text_missing || error_text_missing) {
            match self.grace_until {
                None => {
                    self.grace_until = Some(now + PANIC_GRACE);
                    return false;
                }
                Some(t) if now < t => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// The compiler's note to show on stderr after the cell, newline-terminated.
    pub fn note(&self) -> Option<String> {
        let note = self.reply.as_ref()?.note.as_ref().filter(|n| !n.is_empty())?;
        Some(if note.ends_with('\n') { note.clone() } else { format!("{note}\n") })
    }

    /// The error the cell ends with, `None` if it succeeded. In order: an artifact refused, the
    /// worker died, an interrupt that stopped it, a panic (its message from `stderr`), the
    /// compiler's error reply.
    pub fn verdict(&self, me: &Identity, stderr: &StderrTail) -> Option<EngineError> {
        if let Some(why) = &self.refused {
            return Some(EngineError::new(ename::ARTIFACT_ERROR, why.clone(), vec![]));
        }
        if let Some(prompt) = &self.stdin_refused {
            let prompt = if prompt.is_empty() { "a plain read of stdin".to_string() } else { format!("{prompt:?}") };
            let lost =
                if self.died.is_some() { " (its worker did not stop and was restarted: the engine's variables are lost)" } else { "" };
            return Some(EngineError::new(
                ename::STDIN_NOT_IMPLEMENTED,
                format!("the cell asked for input ({prompt}) on engine {}, but engines have no frontend to answer input requests; the cell was stopped there{lost}. Give engines their input with push or scatter, or in the cell's code", me.id),
                vec![],
            ));
        }
        if let Some(status) = &self.died {
            return Some(EngineError::worker_died(me, status, stderr.lines()));
        }
        if let Some(before_run) = self.interrupted.filter(|_| self.panicked) {
            return Some(EngineError::interrupted("cell", before_run));
        }
        if self.panicked {
            return Some(match find_panic(&stderr.panic_lines()) {
                Some(p) => EngineError::panic(&p.message, p.lines),
                None => EngineError::panic("", stderr.lines()),
            });
        }
        if self.error_occurred {
            let text = question_mark_text(stderr).unwrap_or_else(|| "a `?` in the cell returned an error (its text was empty)".into());
            let tb = vec![
                format!("Error: {text}"),
                "note: a `?` in the cell returned this error, so the cell stopped there; variables it defined are not kept".into(),
            ];
            return Some(EngineError::new(ename::QUESTION_MARK_ERROR, text, tb));
        }
        match &self.reply {
            Some(r) if r.status != "ok" => {
                let ename = if r.error.ename.as_str().is_empty() { ename::COMPILE_ERROR } else { r.error.ename.clone() };
                Some(EngineError::new(ename, r.error.evalue.clone(), r.error.traceback.clone()))
            }
            _ => None,
        }
    }

    /// How the cell is answered, given its error (`err`); `engine_id` names the engine in a
    /// pull's `NameError`.
    pub fn ending(&self, err: Option<EngineError>, engine_id: u64) -> Ending {
        match (&self.purpose, err) {
            (Purpose::Pull(names), None) => Ending::Pulled(names.clone()),
            (Purpose::Pull(names), Some(e)) => Ending::PullFailed(pull_error(e, names, engine_id)),
            (Purpose::Execute, Some(e)) => Ending::Failed(e),
            (Purpose::Execute, None) => Ending::Succeeded(self.result()),
        }
    }

    /// The result of a successful cell: `execute_result` when it has a `text/plain`
    /// representation, else `display_data`; nothing when silent or without rich output.
    fn result(&self) -> Option<Publication> {
        if self.silent || self.content.is_empty() {
            return None;
        }
        let data: serde_json::Map<String, Value> = self.content.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        Some(if data.contains_key("text/plain") {
            Publication {
                kind: "execute_result",
                msg_type: "execute_result",
                content: json!({"data": data, "metadata": {}, "execution_count": self.count}),
            }
        } else {
            Publication { kind: "displaypub", msg_type: "display_data", content: json!({"data": data, "metadata": {}, "transient": {}}) }
        })
    }
}

impl Cell {
    /// The text of the error its top-level `?` returned, if one did (it is the cell's error).
    pub fn question_mark_error_text(&self, stderr: &StderrTail) -> Option<String> {
        if self.error_occurred && !self.panicked {
            question_mark_text(stderr)
        } else {
            None
        }
    }
}

/// The text of the error a top-level `?` returned: evcxr's generated code writes it on stderr
/// (`Display`) just before its marker, so it is the last line there.
fn question_mark_text(stderr: &StderrTail) -> Option<String> {
    stderr.lines().into_iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim_end().to_string())
}

/// The error a failed pull of `names` reports: a compile error that cannot find one of the
/// names is a `NameError`; any other compile error says the pull failed.
pub fn pull_error(e: EngineError, names: &[String], engine_id: u64) -> EngineError {
    if e.ename != ename::COMPILE_ERROR {
        return e;
    }
    let missing = names.iter().find(|n| {
        let needle = format!("cannot find value `{n}`");
        e.evalue.contains(&needle) || e.traceback.iter().any(|l| l.contains(&needle))
    });
    match missing {
        Some(n) => EngineError::new(ename::NAME_ERROR, format!("name `{n}` is not defined on engine {engine_id}"), vec![]),
        None => EngineError::new(ename::COMPILE_ERROR, format!("cannot pull {}: {}", names.join(", "), e.evalue), e.traceback),
    }
}

/// The load the worker is running.
#[derive(Debug)]
pub struct Loading {
    pub cell_id: String,
    panicked: bool,
    error_occurred: bool,
    changed_types: Vec<String>,
}

impl Loading {
    pub fn new(cell_id: String) -> Loading {
        Loading { cell_id, panicked: false, error_occurred: false, changed_types: vec![] }
    }

    /// A marker the worker printed while running this load (panic, interrupt, error,
    /// changed type, rich content); `cell` is the running cell when this load is one of it.
    /// Text, input requests and completion are the engine loop's business and ignored here.
    pub fn note(&mut self, ev: StdoutEvent, cell: Option<&mut Cell>) {
        match ev {
            StdoutEvent::Panic => {
                self.panicked = true;
                if let Some(c) = cell {
                    c.panicked = true;
                }
            }
            StdoutEvent::Interrupted => {
                if let Some(c) = cell {
                    c.interrupted = Some(false);
                }
            }
            StdoutEvent::ErrorOccurred => {
                self.error_occurred = true;
                if let Some(c) = cell {
                    c.error_occurred = true;
                }
            }
            StdoutEvent::ChangedType(name) => self.changed_types.push(name),
            StdoutEvent::Content { mime, data } => {
                if let Some(c) = cell {
                    c.content.insert(mime, data);
                }
            }
            StdoutEvent::Text(_) | StdoutEvent::InputRequest { .. } | StdoutEvent::Complete | StdoutEvent::CallEnd => {}
        }
    }

    /// The load returned: what the compiler is told.
    pub fn completed(self) -> LoadDone {
        LoadDone {
            cell_id: self.cell_id,
            outcome: LoadOutcome::Complete {
                panicked: self.panicked,
                error_occurred: self.error_occurred,
                changed_types: self.changed_types,
            },
        }
    }

    /// The worker died (`status`) while running it: what the compiler is told.
    pub fn died(self, status: &str) -> LoadDone {
        LoadDone { cell_id: self.cell_id, outcome: LoadOutcome::Died { status: status.to_string() } }
    }
}

/// The loads the compiler sent: those waiting in line, and the one the worker runs.
#[derive(Debug, Default)]
pub struct Loads {
    waiting: VecDeque<Load>,
    /// The load the worker is running.
    pub running: Option<Loading>,
}

/// What to do about the next load.
#[derive(Debug, PartialEq)]
pub enum LoadStep {
    /// Nothing: no load waits, or one is running.
    Idle,
    /// Do not run this load (tell the compiler, mark its cell), then look at the next.
    Skip(Load, Skip),
    /// Run this load from this path; it is the running load now.
    Run(Load, PathBuf),
    /// Ask the compiler for the artifact with this hash, then wait.
    Request(String),
    /// Wait for the artifact being fetched.
    Wait,
}

impl Loads {
    /// The compiler asks for `load` to run (after those already waiting).
    pub fn push(&mut self, load: Load) {
        self.waiting.push_back(load);
    }

    /// Whether a load of the cell `cell_id` runs or waits.
    pub fn has(&self, cell_id: &str) -> bool {
        self.running.as_ref().is_some_and(|l| l.cell_id == cell_id) || self.waiting.iter().any(|l| l.cell_id == cell_id)
    }

    /// The next step for the first waiting load, one load at a time, in order. `cell` is the
    /// running cell: its loads are skipped once it was interrupted. `fetch` says where an
    /// artifact can be loaded from (the artifact fetcher's `want`); a refused one is skipped.
    pub fn next(&mut self, cell: Option<&Cell>, fetch: impl FnOnce(&Artifact) -> Step) -> LoadStep {
        if self.running.is_some() {
            return LoadStep::Idle;
        }
        let Some(load) = self.waiting.front() else { return LoadStep::Idle };
        if cell.is_some_and(|c| c.skips_loads() && c.id() == load.cell_id) {
            let load = self.waiting.pop_front().expect("front exists");
            return LoadStep::Skip(load, Skip::Interrupted);
        }
        if cell.is_none_or(|c| c.id() != load.cell_id) {
            let load = self.waiting.pop_front().expect("front exists");
            return LoadStep::Skip(load, Skip::Stale);
        }
        match fetch(&load.artifact) {
            Step::Ready(path) => {
                let load = self.waiting.pop_front().expect("front exists");
                self.running = Some(Loading::new(load.cell_id.clone()));
                LoadStep::Run(load, path)
            }
            Step::Request(sha) => LoadStep::Request(sha),
            Step::Wait => LoadStep::Wait,
            Step::Failed(why) => LoadStep::Skip(self.waiting.pop_front().expect("front exists"), Skip::Refused(why)),
        }
    }
}

impl Loads {
    /// The running load returned: what the compiler is told (`None`: no load was running).
    pub fn completed(&mut self) -> Option<LoadDone> {
        self.running.take().map(Loading::completed)
    }

    /// The worker died (`status`). The running load, if any, died with it: returned for the
    /// compiler, and its cell (if it is the running `cell`) is marked. With no load running the
    /// running cell is marked and `None` returned (the compiler is told the worker restarted).
    pub fn worker_died(&mut self, cell: Option<&mut Cell>, status: &str) -> Option<LoadDone> {
        let Some(l) = self.running.take() else {
            if let Some(c) = cell {
                c.worker_died(status);
            }
            return None;
        };
        let done = l.died(status);
        if let Some(c) = cell.filter(|c| c.id() == done.cell_id) {
            c.worker_died(status);
        }
        Some(done)
    }
}

/// How a pull of names is answered.
#[derive(Debug, Clone, PartialEq)]
pub enum PullPlan {
    /// Refuse it with this error.
    Refuse(EngineError),
    /// Every name's namespace file holds its value: answer from the files.
    FromFiles,
    /// The values live in the worker, and there is no compiler to build the cell writing them.
    NoCompiler,
    /// Run a cell writing these (stale) variables to the namespace, then answer from the files.
    WriteOut(Vec<String>),
}

/// Pushed values: which ones the next cell binds as variables, and which names' namespace
/// files still hold their variable's current value (a pull of those needs no cell).
#[derive(Debug, Default)]
pub struct Bindings {
    /// Pushed values not yet bound as cell variables: name -> type, bound by the next cell.
    unbound: BTreeMap<String, String>,
    /// Names whose namespace file holds the variable's current value (no cell ran since).
    fresh: HashSet<String>,
}

impl Bindings {
    /// A value of `type_name` was pushed as `name` (its file is written).
    pub fn pushed(&mut self, name: String, type_name: String) {
        self.fresh.insert(name.clone());
        self.unbound.insert(name, type_name);
    }

    /// Pushed values the next cell binds: name -> type.
    pub fn unbound(&self) -> &BTreeMap<String, String> {
        &self.unbound
    }

    /// Of `names`, those whose namespace file may not hold the variable's value: a cell has
    /// to write them out before they can be pulled.
    pub fn stale(&self, names: &[String]) -> Vec<String> {
        names.iter().filter(|n| !self.fresh.contains(*n)).cloned().collect()
    }

    /// How to answer a pull of `names`; `compiler_absent`: no compiler is connected.
    pub fn plan_pull(&self, names: &[String], compiler_absent: bool) -> PullPlan {
        if let Some(bad) = names.iter().find(|n| !crate::namespace::is_identifier(n)) {
            return PullPlan::Refuse(EngineError::new(ename::NAME_ERROR, format!("`{bad}` is not a variable name"), vec![]));
        }
        let stale = self.stale(names);
        if stale.is_empty() {
            PullPlan::FromFiles
        } else if compiler_absent {
            PullPlan::NoCompiler
        } else {
            PullPlan::WriteOut(stale)
        }
    }

    /// A cell for `purpose` finished with `err`. Pushed values are bound by any cell that
    /// compiled; a binding that cannot compile is dropped (the returned text says so, for
    /// stderr) rather than breaking every later cell. A successful pull leaves its names
    /// fresh; any user cell that compiled may have changed every variable.
    pub fn after_cell(&mut self, purpose: &Purpose, err: Option<&EngineError>) -> Option<String> {
        let compile_failed = err.is_some_and(|e| e.ename == ename::COMPILE_ERROR);
        let mut said = None;
        if !compile_failed {
            self.unbound.clear();
        } else if let Some(e) = err {
            if !self.unbound.is_empty() && (e.evalue.contains("rpx_runtime") || e.traceback.iter().any(|l| l.contains("rpx_runtime"))) {
                let names: Vec<String> = std::mem::take(&mut self.unbound).into_keys().collect();
                said = Some(format!(
                    "[rpx] the pushed values {} could not become variables (see the error); push them again with a type the engines can name\n",
                    names.join(", ")
                ));
            }
        }
        match purpose {
            Purpose::Pull(names) if err.is_none() => self.fresh.extend(names.iter().cloned()),
            Purpose::Pull(_) => {}
            Purpose::Execute if !compile_failed => self.fresh.clear(),
            Purpose::Execute => {}
        }
        said
    }

    /// The worker is gone: bound variables died with it; pushed values not yet bound are
    /// still in their files.
    pub fn worker_gone(&mut self) {
        let unbound = &self.unbound;
        self.fresh.retain(|n| unbound.contains_key(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpx_protocol::content::ErrorContent;

    fn me() -> Identity {
        Identity { id: 4, uuid: "u-4".into() }
    }

    fn cell(purpose: Purpose) -> Cell {
        Cell::new(Request::for_test("c1", "execute_request", json!({"code": "1"})), purpose, false, 7, json!({}))
    }

    fn reply(status: &str, ename: &str, evalue: &str) -> CellReply {
        CellReply { cell_id: "c1".into(), status: status.into(), error: ErrorContent::bare(ename, evalue, vec![]), note: None }
    }

    fn stderr(text: &str) -> StderrTail {
        let mut t = StderrTail::new(20);
        t.feed(text);
        t
    }

    const PANIC_TEXT: &str = "thread 'main' panicked at src/lib.rs:3:5:\nboom 7\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_cell_the_compiler_accepted_succeeds() {
        let mut c = cell(Purpose::Execute);
        c.reply = Some(reply("ok", "", ""));
        assert_eq!(c.verdict(&me(), &stderr("a warning\n")), None);
        assert_eq!(c.ending(None, 4), Ending::Succeeded(None));
    }

    #[test]
    fn a_cell_whose_worker_died_reports_engine_worker_died_even_if_the_compiler_said_ok() {
        let mut c = cell(Purpose::Execute);
        c.reply = Some(reply("ok", "", ""));
        c.panicked = true;
        c.worker_died("signal 6 (SIGABRT)");
        c.worker_died("killed by clear_request");
        let e = c.verdict(&me(), &stderr("about to abort\n")).expect("an error");
        assert_eq!(e.ename, "EngineWorkerDied");
        assert!(e.evalue.contains("engine 4 died (signal 6 (SIGABRT))"), "the first death counts: {}", e.evalue);
        assert_eq!(e.traceback[0], "about to abort", "the traceback shows the worker's last stderr");
    }

    #[test]
    fn a_refused_artifact_is_reported_before_anything_else() {
        let mut c = cell(Purpose::Execute);
        c.reply = Some(reply("error", "Panic", "skipped"));
        c.skipped(&Skip::Refused("artifact abc failed its SHA-256 check".into()));
        c.worker_died("exit status 1");
        let e = c.verdict(&me(), &stderr("")).unwrap();
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("ArtifactError", "artifact abc failed its SHA-256 check"));
    }

    #[test]
    fn a_cell_interrupted_before_its_load_ran_reports_keyboard_interrupt_before_it_ran() {
        let mut c = cell(Purpose::Execute);
        c.interrupt_requested = true;
        assert!(c.skips_loads());
        c.skipped(&Skip::Interrupted);
        c.reply = Some(reply("error", "Panic", "the cell panicked"));
        let e = c.verdict(&me(), &stderr("")).unwrap();
        assert_eq!(e.ename, "KeyboardInterrupt");
        assert_eq!(e.evalue, "the cell was interrupted (SIGINT) before it ran; the engine kept its variables");
        assert_eq!(
            Skip::Interrupted.load_done("c1".into()).outcome,
            LoadOutcome::Skipped { reason: "interrupted (SIGINT) before it ran".into() }
        );
    }

    #[test]
    fn a_running_cell_stopped_by_sigint_reports_keyboard_interrupt_not_a_panic() {
        let mut c = cell(Purpose::Execute);
        let mut l = Loading::new("c1".into());
        l.note(StdoutEvent::Interrupted, Some(&mut c));
        l.note(StdoutEvent::Panic, Some(&mut c));
        c.reply = Some(reply("error", "Panic", "panicked"));
        let e = c.verdict(&me(), &stderr(PANIC_TEXT)).unwrap();
        assert_eq!(e.evalue, "the cell was interrupted (SIGINT); the engine kept its variables");
        assert_eq!(l.completed().outcome, LoadOutcome::Complete { panicked: true, error_occurred: false, changed_types: vec![] });
    }

    #[test]
    fn an_interrupt_that_did_not_stop_the_cell_leaves_the_compilers_verdict() {
        let mut c = cell(Purpose::Execute);
        c.interrupted = Some(false);
        c.reply = Some(reply("ok", "", ""));
        assert_eq!(c.verdict(&me(), &stderr("")), None);
    }

    #[test]
    fn a_panicking_cell_reports_the_panic_message_from_stderr() {
        let mut c = cell(Purpose::Execute);
        c.panicked = true;
        c.reply = Some(reply("error", "Panic", "from the compiler"));
        let e = c.verdict(&me(), &stderr(&format!("hello\n{PANIC_TEXT}"))).unwrap();
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("Panic", "boom 7"));
        assert!(e.traceback[0].contains("panicked at src/lib.rs:3:5"), "{:?}", e.traceback);
    }

    #[test]
    fn a_panic_without_a_message_says_the_cell_panicked_and_shows_stderr() {
        let mut c = cell(Purpose::Execute);
        c.panicked = true;
        c.reply = Some(reply("ok", "", ""));
        let e = c.verdict(&me(), &stderr("some output\n")).unwrap();
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("Panic", "the cell panicked"));
        assert_eq!(e.traceback, vec!["some output".to_string()]);
    }

    #[test]
    fn a_compile_error_reports_the_compilers_error_named_compile_error_when_unnamed() {
        let mut c = cell(Purpose::Execute);
        c.reply = Some(CellReply {
            error: ErrorContent::bare("", "cannot find value `y`", vec!["error[E0425]".into()]),
            ..reply("error", "", "cannot find value `y`")
        });
        let e = c.verdict(&me(), &stderr("")).unwrap();
        assert_eq!(
            (e.ename.as_str(), e.evalue.as_str(), e.traceback.clone()),
            ("CompileError", "cannot find value `y`", vec!["error[E0425]".to_string()])
        );
        c.reply = Some(reply("error", "OutOfSync", "lost"));
        assert_eq!(c.verdict(&me(), &stderr("")).unwrap().ename, "OutOfSync");
        assert_eq!(c.ending(Some(e.clone()), 4), Ending::Failed(e));
    }

    #[test]
    fn a_cell_finishes_only_once_the_compiler_replied_and_its_loads_are_done() {
        let now = Instant::now();
        let mut c = cell(Purpose::Execute);
        assert!(!c.ready_to_finish(false, &stderr(""), now), "no reply yet");
        c.reply = Some(reply("ok", "", ""));
        assert!(!c.ready_to_finish(true, &stderr(""), now), "a load of it still runs");
        assert!(c.ready_to_finish(false, &stderr(""), now));
    }

    #[test]
    fn a_panicked_cell_waits_a_moment_for_its_panic_message() {
        let now = Instant::now();
        let mut c = cell(Purpose::Execute);
        c.panicked = true;
        c.reply = Some(reply("error", "Panic", ""));
        assert!(!c.ready_to_finish(false, &stderr(""), now));
        assert!(c.waits_for_panic_message());
        assert!(!c.ready_to_finish(false, &stderr(""), now + PANIC_GRACE - Duration::from_millis(1)));
        // The message arrives: finish at once.
        assert!(c.ready_to_finish(false, &stderr(PANIC_TEXT), now + Duration::from_millis(10)));
        // Or it never does: finish when the grace period is over.
        assert!(c.ready_to_finish(false, &stderr(""), now + PANIC_GRACE));
    }

    #[test]
    fn a_panicked_cell_whose_worker_died_or_was_interrupted_finishes_without_waiting() {
        let now = Instant::now();
        let marks: [fn(&mut Cell); 2] = [|c| c.worker_died("exit status 3"), |c| c.interrupted = Some(false)];
        for mark in marks {
            let mut c = cell(Purpose::Execute);
            c.panicked = true;
            c.reply = Some(reply("ok", "", ""));
            mark(&mut c);
            assert!(c.ready_to_finish(false, &stderr(""), now));
            assert!(!c.waits_for_panic_message());
        }
    }

    #[test]
    fn a_result_with_text_is_an_execute_result_and_other_content_is_display_data() {
        let mut c = cell(Purpose::Execute);
        let mut l = Loading::new("c1".into());
        l.note(StdoutEvent::Content { mime: "text/plain".into(), data: "42".into() }, Some(&mut c));
        let Ending::Succeeded(Some(p)) = c.ending(None, 4) else { panic!("a result") };
        assert_eq!((p.kind, p.msg_type), ("execute_result", "execute_result"));
        assert_eq!(p.content, json!({"data": {"text/plain": "42"}, "metadata": {}, "execution_count": 7}));

        c.content = BTreeMap::from([("text/html".to_string(), "<b>x</b>".to_string())]);
        let Ending::Succeeded(Some(p)) = c.ending(None, 4) else { panic!("a display") };
        assert_eq!((p.kind, p.msg_type), ("displaypub", "display_data"));
        assert_eq!(p.content, json!({"data": {"text/html": "<b>x</b>"}, "metadata": {}, "transient": {}}));

        c.silent = true;
        assert_eq!(c.ending(None, 4), Ending::Succeeded(None), "a silent cell publishes no result");
    }

    #[test]
    fn markers_of_a_load_of_another_cell_do_not_touch_the_running_cell() {
        let mut c = cell(Purpose::Execute);
        let mut l = Loading::new("old".into());
        l.note(StdoutEvent::Panic, None);
        l.note(StdoutEvent::ErrorOccurred, None);
        l.note(StdoutEvent::ChangedType("x".into()), None);
        l.note(StdoutEvent::Content { mime: "text/plain".into(), data: "1".into() }, None);
        assert!(!c.panicked && c.content.is_empty());
        assert_eq!(
            l.completed(),
            LoadDone {
                cell_id: "old".into(),
                outcome: LoadOutcome::Complete { panicked: true, error_occurred: true, changed_types: vec!["x".into()] }
            }
        );
        c.reply = Some(reply("ok", "", ""));
        assert_eq!(c.verdict(&me(), &stderr("")), None);
        assert_eq!(Loading::new("c1".into()).died("signal 9 (SIGKILL)").outcome, LoadOutcome::Died { status: "signal 9 (SIGKILL)".into() });
    }

    #[test]
    fn the_compilers_note_is_shown_on_its_own_line() {
        let mut c = cell(Purpose::Execute);
        assert_eq!(c.note(), None);
        c.reply = Some(CellReply { note: Some("x was not kept".into()), ..reply("ok", "", "") });
        assert_eq!(c.note().as_deref(), Some("x was not kept\n"));
        c.reply = Some(CellReply { note: Some(String::new()), ..reply("ok", "", "") });
        assert_eq!(c.note(), None);
    }

    #[test]
    fn a_pull_of_an_undefined_name_is_a_name_error() {
        let names = names(&["a", "b"]);
        let e = EngineError::new("CompileError", "error[E0425]: cannot find value `b` in this scope", vec![]);
        let p = pull_error(e, &names, 4);
        assert_eq!((p.ename.as_str(), p.evalue.as_str()), ("NameError", "name `b` is not defined on engine 4"));
        let in_traceback = EngineError::new("CompileError", "1 error", vec!["cannot find value `a` in this scope".into()]);
        assert_eq!(pull_error(in_traceback, &names, 4).evalue, "name `a` is not defined on engine 4");
    }

    #[test]
    fn a_pull_that_does_not_compile_for_another_reason_says_which_names_it_could_not_pull() {
        let e = EngineError::new("CompileError", "the trait `Serialize` is not implemented", vec!["tb".into()]);
        let p = pull_error(e, &names(&["a", "b"]), 4);
        assert_eq!((p.ename.as_str(), p.evalue.as_str()), ("CompileError", "cannot pull a, b: the trait `Serialize` is not implemented"));
        assert_eq!(p.traceback, vec!["tb".to_string()]);
        let panic = EngineError::panic("boom", vec![]);
        assert_eq!(pull_error(panic.clone(), &names(&["a"]), 4), panic, "other errors pass unchanged");
    }

    #[test]
    fn a_pull_cell_answers_with_the_names_or_the_pull_error() {
        let c = cell(Purpose::Pull(names(&["x"])));
        assert_eq!(c.ending(None, 4), Ending::Pulled(names(&["x"])));
        let e = EngineError::new("CompileError", "cannot find value `x` in this scope", vec![]);
        let Ending::PullFailed(p) = c.ending(Some(e), 4) else { panic!("a failed pull") };
        assert_eq!(p.ename, "NameError");
    }

    fn load(cell_id: &str, sha: char) -> Load {
        Load {
            cell_id: cell_id.into(),
            artifact: Artifact { path: format!("/a/{sha}.so"), sha256: sha.to_string().repeat(64), size: 1 },
            fn_name: "run_user_code_1".into(),
        }
    }

    /// The running cell with this id.
    fn running(id: &str) -> Cell {
        Cell::new(Request::for_test(id, "execute_request", json!({"code": "1"})), Purpose::Execute, false, 7, json!({}))
    }

    fn ready(a: &Artifact) -> Step {
        Step::Ready(PathBuf::from(&a.path))
    }

    #[test]
    fn loads_run_one_at_a_time_in_the_order_the_compiler_sent_them() {
        let mut loads = Loads::default();
        assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Idle);
        loads.push(load("c1", 'a'));
        loads.push(load("c1", 'b'));
        assert!(loads.has("c1") && !loads.has("c2"));
        assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'a'), "/a/a.so".into()));
        assert_eq!(loads.running.as_ref().map(|l| l.cell_id.as_str()), Some("c1"));
        assert_eq!(loads.next(Some(&running("c1")), |_| panic!("no fetch while one runs")), LoadStep::Idle);
        loads.running.take();
        assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'b'), "/a/b.so".into()));
        loads.running.take();
        assert!(!loads.has("c1"));
    }

    #[test]
    fn a_cell_whose_load_was_running_when_the_worker_died_reports_its_death() {
        let mut loads = Loads::default();
        loads.push(load("c1", 'a'));
        loads.next(Some(&running("c1")), ready);
        let mut c = cell(Purpose::Execute);
        let done = loads.worker_died(Some(&mut c), "signal 11 (SIGSEGV)").expect("the load died");
        assert_eq!(done, LoadDone { cell_id: "c1".into(), outcome: LoadOutcome::Died { status: "signal 11 (SIGSEGV)".into() } });
        assert_eq!(c.died.as_deref(), Some("signal 11 (SIGSEGV)"));
        assert!(loads.running.is_none() && loads.completed().is_none());
    }

    #[test]
    fn a_worker_dying_between_loads_still_fails_the_running_cell() {
        let mut loads = Loads::default();
        let mut c = cell(Purpose::Execute);
        assert_eq!(loads.worker_died(Some(&mut c), "killed by clear_request"), None, "the compiler is told the worker restarted");
        assert_eq!(c.died.as_deref(), Some("killed by clear_request"));
        // A load of an older cell dying does not mark the running cell.
        loads.push(load("old", 'a'));
        loads.next(Some(&running("old")), ready);
        let mut fresh = cell(Purpose::Execute);
        assert_eq!(loads.worker_died(Some(&mut fresh), "exit status 1").map(|d| d.cell_id), Some("old".to_string()));
        assert_eq!(fresh.died, None);
    }

    #[test]
    fn a_completed_load_reports_what_it_saw() {
        let mut loads = Loads::default();
        assert_eq!(loads.completed(), None, "a completion nobody asked for");
        loads.push(load("c1", 'a'));
        loads.next(Some(&running("c1")), ready);
        if let Some(l) = &mut loads.running {
            l.note(StdoutEvent::ErrorOccurred, None);
        }
        assert_eq!(
            loads.completed().map(|d| d.outcome),
            Some(LoadOutcome::Complete { panicked: false, error_occurred: true, changed_types: vec![] })
        );
    }

    #[test]
    fn a_load_waits_while_its_artifact_is_fetched() {
        let mut loads = Loads::default();
        loads.push(load("c1", 'a'));
        let sha = "a".repeat(64);
        assert_eq!(loads.next(Some(&running("c1")), |a| Step::Request(a.sha256.clone())), LoadStep::Request(sha));
        assert_eq!(loads.next(Some(&running("c1")), |_| Step::Wait), LoadStep::Wait);
        assert!(loads.running.is_none() && loads.has("c1"), "it still waits");
        assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'a'), "/a/a.so".into()));
    }

    #[test]
    fn a_load_whose_artifact_was_refused_is_skipped_and_the_next_one_runs() {
        let mut loads = Loads::default();
        loads.push(load("c1", 'a'));
        loads.push(load("c2", 'b'));
        let step = loads.next(Some(&running("c1")), |_| Step::Failed("artifact aaaa failed its SHA-256 check".into()));
        assert_eq!(step, LoadStep::Skip(load("c1", 'a'), Skip::Refused("artifact aaaa failed its SHA-256 check".into())));
        assert!(loads.running.is_none());
        assert_eq!(loads.next(Some(&running("c2")), ready), LoadStep::Run(load("c2", 'b'), "/a/b.so".into()));
    }

    #[test]
    fn the_loads_of_a_cell_interrupted_before_they_ran_are_skipped_without_fetching() {
        let mut loads = Loads::default();
        loads.push(load("c1", 'a'));
        loads.push(load("other", 'b'));
        let mut c = cell(Purpose::Execute);
        assert_eq!(loads.next(Some(&c), |_| Step::Wait), LoadStep::Wait, "not interrupted: it waits for its artifact");
        c.interrupt_requested = true;
        assert_eq!(
            loads.next(Some(&c), |_| panic!("an interrupted cell's artifact is not fetched")),
            LoadStep::Skip(load("c1", 'a'), Skip::Interrupted)
        );
        assert_eq!(
            loads.next(Some(&running("other")), ready),
            LoadStep::Run(load("other", 'b'), "/a/b.so".into()),
            "the next cell's load runs"
        );
    }

    #[test]
    fn a_pull_of_values_still_in_their_files_needs_no_cell_and_no_compiler() {
        let mut b = Bindings::default();
        b.pushed("x".into(), "u64".into());
        assert_eq!(b.plan_pull(&names(&["x"]), true), PullPlan::FromFiles);
        assert_eq!(b.plan_pull(&names(&["x", "y"]), false), PullPlan::WriteOut(names(&["y"])), "only the stale ones are written out");
        assert_eq!(b.plan_pull(&names(&["y"]), true), PullPlan::NoCompiler);
        let PullPlan::Refuse(e) = b.plan_pull(&names(&["x", "not a name"]), false) else { panic!("refused") };
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("NameError", "`not a name` is not a variable name"));
    }

    #[test]
    fn pushed_values_are_bound_by_the_next_cell_that_compiles() {
        let mut b = Bindings::default();
        b.pushed("n".into(), "u64".into());
        assert_eq!(b.unbound().get("n").map(String::as_str), Some("u64"));
        assert!(b.stale(&names(&["n"])).is_empty(), "a pushed value can be pulled back without a cell");
        // A cell that does not compile for its own reasons keeps them for the next cell.
        let own = EngineError::new("CompileError", "expected `;`", vec![]);
        assert_eq!(b.after_cell(&Purpose::Execute, Some(&own)), None);
        assert_eq!(b.unbound().len(), 1);
        assert!(b.stale(&names(&["n"])).is_empty());
        // A cell that ran (even one that panicked) bound them, and may have changed them.
        assert_eq!(b.after_cell(&Purpose::Execute, Some(&EngineError::panic("boom", vec![]))), None);
        assert!(b.unbound().is_empty());
        assert_eq!(b.stale(&names(&["n"])), names(&["n"]));
    }

    #[test]
    fn a_pushed_value_whose_binding_cannot_compile_is_dropped_and_said_so() {
        let mut b = Bindings::default();
        b.pushed("a".into(), "Foo".into());
        b.pushed("b".into(), "u8".into());
        let e = EngineError::new("CompileError", "cannot find type `Foo`", vec!["let a: Foo = ::rpx_runtime::get(\"a\");".into()]);
        let said = b.after_cell(&Purpose::Execute, Some(&e)).expect("a message");
        assert_eq!(
            said,
            "[rpx] the pushed values a, b could not become variables (see the error); push them again with a type the engines can name\n"
        );
        assert!(b.unbound().is_empty(), "the next cell does not try again");
    }

    #[test]
    fn a_pull_leaves_its_names_fresh_until_a_cell_runs() {
        let mut b = Bindings::default();
        assert_eq!(b.stale(&names(&["x", "y"])), names(&["x", "y"]));
        b.after_cell(&Purpose::Pull(names(&["x"])), None);
        assert_eq!(b.stale(&names(&["x", "y"])), names(&["y"]));
        b.after_cell(&Purpose::Pull(names(&["y"])), Some(&EngineError::panic("", vec![])));
        assert_eq!(b.stale(&names(&["x", "y"])), names(&["y"]), "a failed pull freshens nothing");
        b.after_cell(&Purpose::Execute, None);
        assert_eq!(b.stale(&names(&["x"])), names(&["x"]));
    }

    #[test]
    fn after_the_worker_dies_only_values_not_yet_bound_can_be_pulled_without_a_cell() {
        let mut b = Bindings::default();
        b.pushed("old".into(), "u8".into());
        b.after_cell(&Purpose::Execute, None);
        b.after_cell(&Purpose::Pull(names(&["v"])), None);
        b.pushed("new".into(), "u8".into());
        b.worker_gone();
        assert_eq!(b.stale(&names(&["old", "v", "new"])), names(&["old", "v"]));
    }

    #[test]
    fn loads_of_a_cell_that_already_ended_are_skipped_not_run() {
        // The cell failed while the compiler was unreachable; its load arrives afterwards.
        let mut loads = Loads::default();
        loads.push(load("gone", 'a'));
        loads.push(load("c1", 'b'));
        assert_eq!(loads.next(None, ready), LoadStep::Skip(load("gone", 'a'), Skip::Stale));
        assert_eq!(loads.next(Some(&running("c1")), ready), LoadStep::Run(load("c1", 'b'), "/a/b.so".into()));
    }
}
