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
use rpx_protocol::content::ReplyMetadata;
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
    pub md: ReplyMetadata,
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
    pub fn new(req: Request, purpose: Purpose, silent: bool, count: u64, md: ReplyMetadata) -> Cell {
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
mod tests;
