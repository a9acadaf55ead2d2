//! Handles on submitted work: [`AsyncResult`] (apply, execute, push, pull, scatter, gather),
//! [`AsyncMapResult`] (maps: ordered and unordered iteration, per-item results), the per-engine
//! [`ExecuteResult`], task timings and outputs, and the decoding of replies into typed values
//! and [`Error`]s. Every handle is also a `Future`.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rpx_protocol::content::{ErrorName, ReplyContent, TEXT_PLAIN};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{combine_engine_errors, Error, RemoteError, Result};
use crate::tracker::{LogEntry, Outcome, ReplyData, TaskState, Tracker, TrackerState};

// ---------------------------------------------------------------------------------------------
// Reply decoding

/// Why one task did not produce a value.
pub(crate) enum Failure {
    /// The engine or scheduler reported an error.
    Remote(Box<RemoteError>),
    /// Anything else (connection, protocol): fails the whole request.
    Fatal(Error),
}

impl Failure {
    pub(crate) fn into_error(self) -> Error {
        match self {
            Failure::Remote(e) => Error::Remote(e),
            Failure::Fatal(e) => e,
        }
    }
}

/// The successful reply of a task, or why there is none.
pub(crate) fn ok_reply(t: &TaskState) -> std::result::Result<&ReplyData, Failure> {
    match &t.outcome {
        None => Err(Failure::Fatal(Error::Protocol(format!("task {} has no reply yet", t.msg_id)))),
        Some(Outcome::Lost(why)) => Err(Failure::Fatal(Error::Connection(why.clone()))),
        Some(Outcome::Reply(r)) if r.status == "ok" => Ok(r),
        Some(Outcome::Reply(r)) => {
            Err(Failure::Remote(Box::new(RemoteError::from_reply(&r.content, t.engine_id).with_output(&t.io.stdout, &t.io.stderr))))
        }
    }
}

pub(crate) fn engine_label(t: &TaskState) -> String {
    t.engine_id.map_or_else(|| "the engine".to_string(), |id| format!("engine {id}"))
}

/// Decode buffer `i` of a reply as `T`.
pub(crate) fn decode_buffer<T: DeserializeOwned>(t: &TaskState, r: &ReplyData, i: usize) -> std::result::Result<T, Failure> {
    decode_buffer_with(t, r, i, rpx_runtime::decode)
}

/// [`decode_buffer`] with the decoder given.
fn decode_buffer_with<T>(
    t: &TaskState,
    r: &ReplyData,
    i: usize,
    decode: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
) -> std::result::Result<T, Failure> {
    let Some(buf) = r.buffers.get(i) else { return Err(no_buffer(t)) };
    decode(buf).map_err(|e| undecodable(t, &e))
}

/// A reply that carries no result buffer where one was expected.
fn no_buffer(t: &TaskState) -> Failure {
    Failure::Fatal(Error::Protocol(format!("{} sent no result buffer for task {} (is it an rpx engine?)", engine_label(t), t.msg_id)))
}

/// A value from `t`'s engine that does not decode as the type asked for.
pub(crate) fn undecodable(t: &TaskState, e: &str) -> Failure {
    Failure::Fatal(Error::Protocol(format!(
        "the value from {} does not decode: {e}; the type the engines produce must match the one asked for here",
        engine_label(t)
    )))
}

/// [`decode_buffer`] for a pull: the value comes from a same-host file or the data link when the
/// reply names one; vectors of plain numbers decode by one copy (`rpx_runtime::decode_owned`).
pub(crate) fn decode_pulled<T: DeserializeOwned + 'static>(
    t: &TaskState,
    r: &ReplyData,
    pulled: &crate::dataplane::Pulled,
) -> std::result::Result<T, Failure> {
    let decode = |bytes: &Bytes| rpx_runtime::decode_owned(bytes).map_err(|e| undecodable(t, &e));
    if let Some(read) = pulled.read_plain::<T>(t, &r.content, &engine_label(t)) {
        return match read {
            Ok(value) => value.map_err(|e| undecodable(t, &e)),
            Err(e) => Err(Failure::Fatal(Error::Protocol(e))),
        };
    }
    match pulled.value(t, &r.content, &engine_label(t), decode) {
        None => decode_buffer_with(t, r, 0, rpx_runtime::decode_owned::<T>),
        Some(Err(e)) => Err(Failure::Fatal(Error::Protocol(e))),
        Some(Ok(value)) => value,
    }
}

/// The vector a pull reply holds (a same-host snapshot, a file on another host's data link,
/// or the reply's buffer) as a [`crate::VecView`]: a snapshot mapped stays where it lies.
pub(crate) fn view_pulled<E: rpx_runtime::PlainElem>(
    t: &TaskState,
    r: &ReplyData,
    pulled: &crate::dataplane::Pulled,
) -> std::result::Result<crate::VecView<E>, Failure> {
    let view = |bytes: &Bytes| crate::VecView::from_encoded(bytes.clone()).map_err(|e| undecodable(t, &e));
    match pulled.value(t, &r.content, &engine_label(t), view) {
        None => r.buffers.first().map_or_else(|| Err(no_buffer(t)), view),
        Some(Err(e)) => Err(Failure::Fatal(Error::Protocol(e))),
        Some(Ok(value)) => value,
    }
}

/// Per-task values of a request made to several engines: all of them, or one error (a
/// connection or protocol error first; else the remote errors, combined).
pub(crate) fn collect_each<T>(
    tasks: &[TaskState],
    mut value: impl FnMut(&TaskState, &ReplyData) -> std::result::Result<T, Failure>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut remote = Vec::new();
    for t in tasks {
        match ok_reply(t).and_then(|r| value(t, r)) {
            Ok(v) => out.push(v),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Remote(e)) => remote.push(*e),
        }
    }
    if remote.is_empty() {
        Ok(out)
    } else {
        Err(combine_engine_errors(remote, tasks.len(), tasks.iter().map(output).collect()))
    }
}

/// The value of a single-task request.
pub(crate) fn collect_one<T>(
    tasks: &[TaskState],
    value: impl FnOnce(&TaskState, &ReplyData) -> std::result::Result<T, Failure>,
) -> Result<T> {
    let t = tasks.first().ok_or_else(|| Error::Protocol("a request without tasks".into()))?;
    ok_reply(t).and_then(|r| value(t, r)).map_err(Failure::into_error)
}

// ---------------------------------------------------------------------------------------------
// Timings and outputs

/// When a task was submitted, started and completed (from the request header and the reply's
/// metadata and header).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskTiming {
    pub msg_id: String,
    pub engine_id: Option<usize>,
    pub submitted: Option<DateTime<Utc>>,
    pub started: Option<DateTime<Utc>>,
    pub completed: Option<DateTime<Utc>>,
}

impl TaskTiming {
    /// `completed - started`, when both are known.
    pub fn duration(&self) -> Option<chrono::Duration> {
        Some(self.completed? - self.started?)
    }
}

/// Parse an ISO-8601 date as the protocol writes it.
pub fn parse_date(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|d| d.with_timezone(&Utc))
}

fn timing(t: &TaskState) -> TaskTiming {
    let r = t.reply();
    let md = |k: &str| r.and_then(|r| r.metadata.get(k)).and_then(Value::as_str).and_then(parse_date);
    TaskTiming {
        msg_id: t.msg_id.clone(),
        engine_id: t.engine_id,
        submitted: parse_date(&t.submitted),
        started: md("started"),
        completed: md("completed").or_else(|| r.and_then(|r| parse_date(&r.date))),
    }
}

/// What one task printed (iopub `stream` messages whose parent is the task's request).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskOutput {
    pub msg_id: String,
    pub engine_id: Option<usize>,
    pub stdout: String,
    pub stderr: String,
}

fn output(t: &TaskState) -> TaskOutput {
    TaskOutput { msg_id: t.msg_id.clone(), engine_id: t.engine_id, stdout: t.io.stdout.clone(), stderr: t.io.stderr.clone() }
}

// ---------------------------------------------------------------------------------------------
// Progress bars

/// Whether `wait_interactive` draws a bar: stderr is a terminal and `RPX_NO_PROGRESS` is unset.
fn show_progress() -> bool {
    use std::io::IsTerminal;
    !cfg!(test) && std::io::stderr().is_terminal() && std::env::var_os("RPX_NO_PROGRESS").is_none()
}

fn wait_with_bar(tracker: &Tracker, unit: &str, progress: impl Fn(&TrackerState) -> (usize, usize)) {
    if !show_progress() {
        tracker.wait_complete(None);
        return;
    }
    let (done, total) = progress(&tracker.lock());
    let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(done as u64);
    while !tracker.wait_complete(Some(Instant::now() + Duration::from_millis(100))) {
        let (done, total) = progress(&tracker.lock());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    }
    let (done, total) = progress(&tracker.lock());
    bar.set_length(total as u64);
    bar.set_position(done as u64);
    bar.finish();
}

/// One thing that happened to a request, in arrival order ([`AsyncResult::next_events`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskEvent {
    /// A task's iopub output: `stream`, `display_data`, `execute_result` or `error`, with the
    /// message content as the engine sent it.
    Output { engine_id: Option<usize>, msg_type: String, content: Value },
    /// A task's reply arrived: `error` when it failed (or the connection was lost).
    Done { engine_id: Option<usize>, error: Option<RemoteError> },
}

fn task_event(tasks: &[TaskState], e: &LogEntry) -> TaskEvent {
    match e {
        LogEntry::Io { idx, msg_type, content } => {
            TaskEvent::Output { engine_id: tasks[*idx].engine_id, msg_type: msg_type.clone(), content: content.clone() }
        }
        LogEntry::Done(idx) => {
            let t = &tasks[*idx];
            let error = match &t.outcome {
                Some(Outcome::Reply(r)) if r.status == "ok" => None,
                Some(Outcome::Reply(r)) => Some(RemoteError::from_reply(&r.content, t.engine_id)),
                Some(Outcome::Lost(why)) => Some(RemoteError::new(ErrorName::ConnectionLost, why.clone(), t.engine_id)),
                None => None,
            };
            TaskEvent::Done { engine_id: t.engine_id, error }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AsyncResult

type Finish<T> = Arc<dyn Fn(&[TaskState]) -> Result<T> + Send + Sync>;

/// A request in flight: one task per engine for direct views, one task for a load-balanced
/// `apply`. Blocking `get()`, polling (`ready`, `progress`, `wait`), or `.await`.
pub struct AsyncResult<T> {
    tracker: Arc<Tracker>,
    finish: Finish<T>,
}

impl<T> Clone for AsyncResult<T> {
    fn clone(&self) -> Self {
        AsyncResult { tracker: self.tracker.clone(), finish: self.finish.clone() }
    }
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (done, total) = self.progress();
        f.debug_struct("AsyncResult").field("msg_ids", &self.msg_ids()).field("done", &done).field("total", &total).finish()
    }
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(tracker: Arc<Tracker>, finish: impl Fn(&[TaskState]) -> Result<T> + Send + Sync + 'static) -> AsyncResult<T> {
        AsyncResult { tracker, finish: Arc::new(finish) }
    }

    fn finish_now(&self) -> Result<T> {
        // Decode outside the lock (a large pull takes a while; the dispatcher may need the lock
        // for late output). The replies' buffers are shared, not copied.
        let tasks = self.tracker.lock().tasks.clone();
        (self.finish)(&tasks)
    }

    /// Wait for every reply, then return the value (or the error).
    pub fn get(&self) -> Result<T> {
        self.tracker.wait_complete(None);
        self.finish_now()
    }

    /// Like [`AsyncResult::get`], failing with [`Error::Timeout`] if the work is not done within
    /// `timeout` (it keeps running).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        if !self.tracker.wait_complete(Some(Instant::now() + timeout)) {
            let (done, total) = self.progress();
            return Err(Error::Timeout(format!("{done} of {total} tasks finished within {timeout:?}; the rest are still running (wait again, or abort them with Client::abort)")));
        }
        self.finish_now()
    }

    /// Wait up to `timeout`; `Ok(true)` once every reply is in.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        Ok(self.tracker.wait_complete(Some(Instant::now() + timeout)))
    }

    /// Every reply is in.
    pub fn ready(&self) -> bool {
        self.tracker.is_complete()
    }

    /// `(tasks done, tasks)`.
    pub fn progress(&self) -> (usize, usize) {
        let s = self.tracker.lock();
        (s.replied, s.tasks.len())
    }

    /// Wait with a progress bar on stderr when it is a terminal, then [`AsyncResult::get`].
    pub fn wait_interactive(&self) -> Result<T> {
        wait_with_bar(&self.tracker, "tasks", |s| (s.replied, s.tasks.len()));
        self.get()
    }

    /// The msg_id of each task (for `Client::abort`, the hub's records, dependencies).
    pub fn msg_ids(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.msg_id.clone()).collect()
    }

    /// The engine of each task (known at once for direct views, on reply for load-balanced).
    pub fn engine_ids(&self) -> Vec<Option<usize>> {
        self.tracker.lock().tasks.iter().map(|t| t.engine_id).collect()
    }

    /// Submitted / started / completed times of each task.
    pub fn timings(&self) -> Vec<TaskTiming> {
        self.tracker.lock().tasks.iter().map(timing).collect()
    }

    /// Outputs and replies from `*cursor` on, in arrival order, waiting up to `timeout` for at
    /// least one (returns early, possibly empty, once [`AsyncResult::finished`]). Advances the
    /// cursor; start it at 0. This is how a front end streams each engine's output as it comes.
    pub fn next_events(&self, cursor: &mut usize, timeout: Duration) -> Vec<TaskEvent> {
        let at = *cursor;
        self.tracker.wait_until(Some(Instant::now() + timeout), |s| s.log.len() > at || (s.complete(true)));
        let s = self.tracker.lock();
        let events: Vec<TaskEvent> = s.log.get(at..).unwrap_or_default().iter().map(|e| task_event(&s.tasks, e)).collect();
        *cursor = s.log.len();
        events
    }

    /// Every reply and every task's output is in (the end of [`AsyncResult::next_events`]).
    pub fn finished(&self) -> bool {
        self.tracker.lock().complete(true)
    }

    /// What each task printed so far, with its engine.
    pub fn outputs(&self) -> Vec<TaskOutput> {
        self.tracker.lock().tasks.iter().map(output).collect()
    }

    /// stdout of each task (one per engine for direct views), as received so far.
    pub fn stdout(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.io.stdout.clone()).collect()
    }

    /// stderr of each task, as received so far.
    pub fn stderr(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.io.stderr.clone()).collect()
    }

    /// Wait for each task's output to arrive (its iopub `idle`, or a short grace period after
    /// its reply), at most `timeout`; whether it did.
    pub fn wait_for_output(&self, timeout: Duration) -> bool {
        self.tracker.wait_until(Some(Instant::now() + timeout), |s| s.replied == s.tasks.len() && s.settled == s.tasks.len())
    }
}

impl<T> Future for AsyncResult<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        if self.tracker.poll_complete(cx.waker()) {
            Poll::Ready(self.finish_now())
        } else {
            Poll::Pending
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Execute

/// What one engine did for an `execute`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOutput {
    pub engine_id: usize,
    pub msg_id: String,
    /// The engine's execution counter for this cell, when it ran.
    pub execution_count: Option<u64>,
    pub stdout: String,
    pub stderr: String,
    /// The `execute_result` data (mime type -> value), when the cell ended in an expression.
    pub result: Option<Map<String, Value>>,
    /// `display_data` outputs, in order.
    pub displays: Vec<Map<String, Value>>,
    /// The error, when the cell failed (compile error, panic, engine died, aborted).
    pub error: Option<RemoteError>,
}

impl EngineOutput {
    /// The `text/plain` form of the result.
    pub fn result_text(&self) -> Option<&str> {
        self.result.as_ref()?.get(TEXT_PLAIN)?.as_str()
    }

    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }
}

/// The per-engine outcome of a cell, in target order: what [`crate::DirectView::execute`]
/// returns when every engine succeeded, what [`Error::Execute`] holds when some failed, and
/// what [`crate::DirectView::execute_results`] always returns (each failing engine has its
/// `error`; [`ExecuteResult::check`] turns failures into an [`Error::Execute`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecuteResult {
    pub engines: Vec<EngineOutput>,
}

impl ExecuteResult {
    /// stdout of each engine, in target order.
    pub fn stdout(&self) -> Vec<String> {
        self.engines.iter().map(|e| e.stdout.clone()).collect()
    }

    /// stderr of each engine, in target order.
    pub fn stderr(&self) -> Vec<String> {
        self.engines.iter().map(|e| e.stderr.clone()).collect()
    }

    /// `text/plain` of each engine's result (`None` when the cell ended in a statement).
    pub fn results(&self) -> Vec<Option<String>> {
        self.engines.iter().map(|e| e.result_text().map(str::to_string)).collect()
    }

    pub fn engine_ids(&self) -> Vec<usize> {
        self.engines.iter().map(|e| e.engine_id).collect()
    }

    /// The errors, one per failing engine.
    pub fn errors(&self) -> Vec<&RemoteError> {
        self.engines.iter().filter_map(|e| e.error.as_ref()).collect()
    }

    /// The output of engine `id`.
    pub fn engine(&self, id: usize) -> Option<&EngineOutput> {
        self.engines.iter().find(|e| e.engine_id == id)
    }

    /// `Ok(self)` when every engine succeeded, else [`Error::Execute`] holding all of it.
    pub fn check(self) -> Result<ExecuteResult> {
        if self.engines.iter().all(EngineOutput::is_ok) {
            Ok(self)
        } else {
            Err(Error::Execute(Box::new(self)))
        }
    }
}

impl fmt::Display for ExecuteResult {
    /// ipyparallel's layout: `[stdout:0] ...`, `[stderr:0] ...`, `Out[0:3]: ...`, errors per
    /// engine.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.engines {
            if !e.stdout.is_empty() {
                writeln!(f, "[stdout:{}] {}", e.engine_id, e.stdout.trim_end())?;
            }
        }
        for e in &self.engines {
            if !e.stderr.is_empty() {
                writeln!(f, "[stderr:{}] {}", e.engine_id, e.stderr.trim_end())?;
            }
        }
        for e in &self.engines {
            if let Some(text) = e.result_text() {
                let count = e.execution_count.map_or(String::new(), |c| c.to_string());
                writeln!(f, "Out[{}:{count}]: {text}", e.engine_id)?;
            }
        }
        for e in &self.engines {
            if let Some(err) = &e.error {
                writeln!(f, "[{}:execute] {err}", e.engine_id)?;
            }
        }
        Ok(())
    }
}

/// The outcome of an execute request: [`Error::Execute`] when the cell failed on an engine.
pub(crate) fn finish_execute(tasks: &[TaskState]) -> Result<ExecuteResult> {
    finish_execute_results(tasks)?.check()
}

/// Build the [`ExecuteResult`] of an execute request. Only connection loss is an `Err`.
pub(crate) fn finish_execute_results(tasks: &[TaskState]) -> Result<ExecuteResult> {
    let mut engines = Vec::with_capacity(tasks.len());
    for t in tasks {
        let mut e = EngineOutput {
            engine_id: t.engine_id.unwrap_or_default(),
            msg_id: t.msg_id.clone(),
            stdout: t.io.stdout.clone(),
            stderr: t.io.stderr.clone(),
            result: t.io.results.last().cloned(),
            displays: t.io.displays.clone(),
            ..Default::default()
        };
        match &t.outcome {
            Some(Outcome::Lost(why)) => return Err(Error::Connection(why.clone())),
            None => return Err(Error::Protocol(format!("execute {} has no reply", t.msg_id))),
            Some(Outcome::Reply(r)) => {
                e.execution_count = ReplyContent::read(&r.content).execution_count;
                if r.status != "ok" {
                    e.error = Some(RemoteError::from_reply(&r.content, t.engine_id).with_output(&t.io.stdout, &t.io.stderr));
                }
            }
        }
        engines.push(e);
    }
    Ok(ExecuteResult { engines })
}

// ---------------------------------------------------------------------------------------------
// Maps

/// Debug text of item `i` of an encoded chunk, for error messages.
pub(crate) type Describe = fn(&[u8], usize) -> Option<String>;

/// [`Describe`] for items of type `A`.
pub(crate) fn describe_item<A: DeserializeOwned + fmt::Debug>(chunk: &[u8], i: usize) -> Option<String> {
    let items: Vec<A> = rpx_runtime::decode(chunk).ok()?;
    let mut s = format!("{:?}", items.get(i)?);
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    Some(s)
}

/// The per-item results of one map task covering items `range`.
pub(crate) fn decode_chunk<R: DeserializeOwned>(t: &TaskState, range: Range<usize>, input: &[u8], describe: Describe) -> Vec<Result<R>> {
    let n = range.len();
    let item_err = |e: &RemoteError, i: usize| Err(e.clone().for_item(range.start + i, describe(input, i).as_deref()).into());
    let fatal = |make: &dyn Fn() -> Error| (0..n).map(|_| Err(make())).collect::<Vec<_>>();
    match &t.outcome {
        None => fatal(&|| Error::Protocol(format!("map task {} has no reply yet", t.msg_id))),
        Some(Outcome::Lost(why)) => fatal(&|| Error::Connection(why.clone())),
        Some(Outcome::Reply(r)) if r.status != "ok" => {
            let e = RemoteError::from_reply(&r.content, t.engine_id).with_output(&t.io.stdout, &t.io.stderr);
            (0..n).map(|i| item_err(&e, i)).collect()
        }
        Some(Outcome::Reply(r)) => {
            let items: Vec<std::result::Result<R, String>> = match decode_buffer(t, r, 0) {
                Ok(v) => v,
                Err(f) => {
                    let msg = f.into_error().to_string();
                    return fatal(&|| Error::Protocol(msg.clone()));
                }
            };
            if items.len() != n {
                let msg = format!("{} returned {} results for a chunk of {n} items", engine_label(t), items.len());
                return fatal(&|| Error::Protocol(msg.clone()));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Ok(v) => Ok(v),
                    Err(panic) => {
                        item_err(&RemoteError::new(ErrorName::Panic, panic, t.engine_id).with_output(&t.io.stdout, &t.io.stderr), i)
                    }
                })
                .collect()
        }
    }
}

/// All items, or one error: a connection/protocol error if any, else [`Error::Map`] listing
/// every failed item.
pub(crate) fn combine_items<R>(items: Vec<(usize, Result<R>)>, total: usize) -> Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    let mut failed = Vec::new();
    for (i, r) in items {
        match r {
            Ok(v) => out.push(v),
            Err(Error::Remote(e)) => failed.push((i, *e)),
            Err(other) => return Err(other),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        failed.sort_by_key(|(i, _)| *i);
        Err(Error::Map { failed, total })
    }
}

/// A map in flight: one task per chunk of items. `get()` returns every result in item order
/// (or, for a load-balanced map with `.ordered(false)`, in completion order); `iter()` yields
/// results in item order as they arrive, `iter_unordered()` as tasks complete; `results()` gives
/// each item's own `Result`.
pub struct AsyncMapResult<R> {
    tracker: Arc<Tracker>,
    chunks: Arc<[Range<usize>]>,
    inputs: Arc<[Bytes]>,
    describe: Describe,
    total: usize,
    ordered: bool,
    _r: PhantomData<fn() -> R>,
}

impl<R> Clone for AsyncMapResult<R> {
    fn clone(&self) -> Self {
        AsyncMapResult {
            tracker: self.tracker.clone(),
            chunks: self.chunks.clone(),
            inputs: self.inputs.clone(),
            describe: self.describe,
            total: self.total,
            ordered: self.ordered,
            _r: PhantomData,
        }
    }
}

impl<R> fmt::Debug for AsyncMapResult<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (done, total) = self.progress();
        f.debug_struct("AsyncMapResult").field("tasks", &self.chunks.len()).field("done_items", &done).field("items", &total).finish()
    }
}

impl<R> AsyncMapResult<R> {
    pub(crate) fn new(
        tracker: Arc<Tracker>,
        chunks: Vec<Range<usize>>,
        inputs: Vec<Bytes>,
        describe: Describe,
        total: usize,
        ordered: bool,
    ) -> AsyncMapResult<R> {
        AsyncMapResult { tracker, chunks: chunks.into(), inputs: inputs.into(), describe, total, ordered, _r: PhantomData }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Every task has replied.
    pub fn ready(&self) -> bool {
        self.tracker.is_complete()
    }

    /// Wait up to `timeout`; `Ok(true)` once every task has replied.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        Ok(self.tracker.wait_complete(Some(Instant::now() + timeout)))
    }

    /// `(items done, items)`: a finished chunk counts all its items.
    pub fn progress(&self) -> (usize, usize) {
        let s = self.tracker.lock();
        (items_done(&s, &self.chunks), self.total)
    }

    /// The msg_id of each task (one per chunk).
    pub fn msg_ids(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.msg_id.clone()).collect()
    }

    /// The engine that ran each task, when known.
    pub fn engine_ids(&self) -> Vec<Option<usize>> {
        self.tracker.lock().tasks.iter().map(|t| t.engine_id).collect()
    }

    /// Which items each task covers.
    pub fn chunks(&self) -> Vec<Range<usize>> {
        self.chunks.to_vec()
    }

    /// Submitted / started / completed times of each task.
    pub fn timings(&self) -> Vec<TaskTiming> {
        self.tracker.lock().tasks.iter().map(timing).collect()
    }

    /// What each task printed so far, with its engine.
    pub fn outputs(&self) -> Vec<TaskOutput> {
        self.tracker.lock().tasks.iter().map(output).collect()
    }

    /// stdout of each task, as received so far.
    pub fn stdout(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.io.stdout.clone()).collect()
    }

    /// Wait for each task's output to arrive (as [`AsyncResult::wait_for_output`]), at most
    /// `timeout`; whether it did.
    pub fn wait_for_output(&self, timeout: Duration) -> bool {
        self.tracker.wait_until(Some(Instant::now() + timeout), |s| s.replied == s.tasks.len() && s.settled == s.tasks.len())
    }
}

fn items_done(s: &TrackerState, chunks: &[Range<usize>]) -> usize {
    s.done_order.iter().map(|&i| chunks.get(i).map_or(0, |c| c.len())).sum()
}

impl<R: DeserializeOwned> AsyncMapResult<R> {
    fn chunk_results(&self, s: &TrackerState, task: usize) -> Vec<Result<R>> {
        decode_chunk(&s.tasks[task], self.chunks[task].clone(), &self.inputs[task], self.describe)
    }

    /// Every item's result, in item order, after waiting for all of them.
    pub fn results(&self) -> Vec<Result<R>> {
        self.tracker.wait_complete(None);
        let s = self.tracker.lock();
        (0..self.chunks.len()).flat_map(|t| self.chunk_results(&s, t)).collect()
    }

    fn collect(&self) -> Result<Vec<R>> {
        let s = self.tracker.lock();
        let order: Vec<usize> = if self.ordered { (0..self.chunks.len()).collect() } else { s.done_order.clone() };
        let mut items = Vec::with_capacity(self.total);
        for t in order {
            let start = self.chunks[t].start;
            items.extend(self.chunk_results(&s, t).into_iter().enumerate().map(|(i, r)| (start + i, r)));
        }
        combine_items(items, self.total)
    }

    /// Wait for every item; all results (see the type's documentation for the order), or the
    /// error: [`Error::Map`] lists every failed item.
    pub fn get(&self) -> Result<Vec<R>> {
        self.tracker.wait_complete(None);
        self.collect()
    }

    /// Like [`AsyncMapResult::get`], failing with [`Error::Timeout`] if not done within `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<Vec<R>> {
        if !self.tracker.wait_complete(Some(Instant::now() + timeout)) {
            let (done, total) = self.progress();
            return Err(Error::Timeout(format!("{done} of {total} map items finished within {timeout:?}; the rest are still running")));
        }
        self.collect()
    }

    /// Wait with a progress bar on stderr when it is a terminal, then [`AsyncMapResult::get`].
    pub fn wait_interactive(&self) -> Result<Vec<R>> {
        let chunks = self.chunks.clone();
        let total = self.total;
        wait_with_bar(&self.tracker, "items", move |s| (items_done(s, &chunks), total));
        self.get()
    }

    /// Results in item order, each as soon as it (and every item before it) has arrived.
    pub fn iter(&self) -> MapIter<R> {
        MapIter { res: self.clone(), ordered: true, next: 0, buf: VecDeque::new() }
    }

    /// Results in the order their tasks complete.
    pub fn iter_unordered(&self) -> MapIter<R> {
        MapIter { res: self.clone(), ordered: false, next: 0, buf: VecDeque::new() }
    }
}

impl<R: DeserializeOwned> IntoIterator for AsyncMapResult<R> {
    type Item = Result<R>;
    type IntoIter = MapIter<R>;

    /// Iterate in item order, or in completion order for a map made with `.ordered(false)`.
    fn into_iter(self) -> MapIter<R> {
        let ordered = self.ordered;
        MapIter { res: self, ordered, next: 0, buf: VecDeque::new() }
    }
}

impl<R: DeserializeOwned> Future for AsyncMapResult<R> {
    type Output = Result<Vec<R>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Vec<R>>> {
        if self.tracker.poll_complete(cx.waker()) {
            Poll::Ready(self.collect())
        } else {
            Poll::Pending
        }
    }
}

/// Blocking iterator over a map's results (see [`AsyncMapResult::iter`]).
pub struct MapIter<R> {
    res: AsyncMapResult<R>,
    ordered: bool,
    /// Ordered: the next task index. Unordered: how many completions were consumed.
    next: usize,
    buf: VecDeque<Result<R>>,
}

impl<R: DeserializeOwned> Iterator for MapIter<R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        loop {
            if let Some(r) = self.buf.pop_front() {
                return Some(r);
            }
            let n = self.res.chunks.len();
            if self.next >= n {
                return None;
            }
            let want = self.next;
            let task = if self.ordered {
                self.res.tracker.wait_until(None, |s| s.tasks[want].outcome.is_some());
                want
            } else {
                self.res.tracker.wait_until(None, |s| s.done_order.len() > want);
                self.res.tracker.lock().done_order[want]
            };
            self.next += 1;
            let s = self.res.tracker.lock();
            self.buf.extend(self.res.chunk_results(&s, task));
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.buf.len(), Some(self.res.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::LazyJson;
    use serde_json::json;

    fn ok_task(engine: usize, buffers: Vec<Bytes>) -> TaskState {
        let mut t = TaskState::new(format!("m{engine}"), Some(engine), "2024-01-01T00:00:00.000000Z".into());
        t.outcome = Some(Outcome::Reply(ReplyData {
            status: "ok".into(),
            content: LazyJson::from_value(json!({"status": "ok"})),
            metadata: LazyJson::from_value(json!({"started": "2024-01-01T00:00:01.000000Z"})),
            date: "2024-01-01T00:00:03.500000Z".into(),
            buffers,
        }));
        t
    }

    fn err_task(engine: usize, content: Value) -> TaskState {
        let mut t = ok_task(engine, vec![]);
        if let Some(Outcome::Reply(r)) = &mut t.outcome {
            r.status = content["status"].as_str().unwrap().to_string();
            r.content = LazyJson::from_value(content);
        }
        t
    }

    fn enc<T: serde::Serialize>(v: &T) -> Bytes {
        Bytes::from(rpx_runtime::encode(v))
    }

    #[test]
    fn map_chunks_decode_per_item_with_panics_located() {
        let input = enc(&vec![3u64, 0, 5]);
        let reply: Vec<std::result::Result<u64, String>> = vec![Ok(4), Err("attempt to divide by zero".into()), Ok(2)];
        let t = ok_task(1, vec![enc(&reply)]);
        let r: Vec<Result<u64>> = decode_chunk(&t, 10..13, &input, describe_item::<u64>);
        assert_eq!(r[0].as_ref().unwrap(), &4);
        match &r[1] {
            Err(Error::Remote(e)) => {
                assert_eq!(e.kind, crate::RemoteErrorKind::Panic);
                assert_eq!(e.engine_id, Some(1));
                assert_eq!(e.item.as_deref(), Some("11: 0"));
                assert_eq!(e.message, "attempt to divide by zero");
            }
            other => panic!("{other:?}"),
        }
        let all = combine_items(r.into_iter().enumerate().map(|(i, r)| (10 + i, r)).collect(), 13);
        match all {
            Err(Error::Map { failed, total }) => {
                assert_eq!(total, 13);
                assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![11]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failed_chunks_fail_each_item() {
        let input = enc(&vec!["a".to_string(), "b".to_string()]);
        let t = err_task(2, json!({"status": "error", "ename": "EngineError", "evalue": "Engine 2 died", "engine_info": {"engine_id": 2}}));
        let r: Vec<Result<u8>> = decode_chunk(&t, 4..6, &input, describe_item::<String>);
        let items: Vec<String> = r
            .iter()
            .map(|x| match x {
                Err(Error::Remote(e)) => {
                    assert_eq!(e.kind, crate::RemoteErrorKind::EngineDied);
                    e.item.clone().unwrap()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(items, vec!["4: \"a\"", "5: \"b\""]);

        let mut lost = TaskState::new("x".into(), None, String::new());
        lost.outcome = Some(Outcome::Lost("controller gone".into()));
        let r: Vec<Result<u8>> = decode_chunk(&lost, 0..2, &input, describe_item::<String>);
        assert!(matches!(combine_items(r.into_iter().enumerate().collect(), 2), Err(Error::Connection(_))));
    }

    #[test]
    fn bad_chunk_replies_are_protocol_errors() {
        let input = enc(&vec![1u8, 2]);
        let short: Vec<std::result::Result<u8, String>> = vec![Ok(1)];
        let r: Vec<Result<u8>> = decode_chunk(&ok_task(0, vec![enc(&short)]), 0..2, &input, describe_item::<u8>);
        assert!(r.iter().all(|x| matches!(x, Err(Error::Protocol(m)) if m.contains("1 results for a chunk of 2"))));
        let r: Vec<Result<u8>> = decode_chunk(&ok_task(0, vec![]), 0..2, &input, describe_item::<u8>);
        assert!(r.iter().all(|x| matches!(x, Err(Error::Protocol(m)) if m.contains("no result buffer"))));
    }

    #[test]
    fn per_engine_values_and_errors() {
        let tasks = vec![ok_task(0, vec![enc(&7u64)]), ok_task(1, vec![enc(&8u64)])];
        let v: Vec<u64> = collect_each(&tasks, |t, r| decode_buffer(t, r, 0)).unwrap();
        assert_eq!(v, vec![7, 8]);
        let tasks = vec![
            ok_task(0, vec![enc(&7u64)]),
            err_task(1, json!({"status": "error", "ename": "NameError", "evalue": "`x` is not defined"})),
        ];
        match collect_each::<u64>(&tasks, |t, r| decode_buffer(t, r, 0)) {
            Err(Error::Engines { failed, total: 2, outputs }) => {
                assert_eq!((failed[0].engine_id, failed[0].kind.clone()), (Some(1), crate::RemoteErrorKind::Name));
                assert_eq!(outputs.iter().map(|o| o.engine_id).collect::<Vec<_>>(), [Some(0), Some(1)], "every engine's output");
            }
            other => panic!("{other:?}"),
        }
        let bad = vec![ok_task(0, vec![Bytes::new()])];
        assert!(matches!(collect_one::<u64>(&bad, |t, r| decode_buffer(t, r, 0)), Err(Error::Protocol(_))));
    }

    #[test]
    fn timings_come_from_header_and_metadata() {
        let t = timing(&ok_task(3, vec![]));
        assert_eq!(t.engine_id, Some(3));
        assert_eq!(t.submitted, parse_date("2024-01-01T00:00:00Z"));
        assert_eq!(t.duration(), Some(chrono::Duration::milliseconds(2500)));
    }

    #[test]
    fn execute_results_per_engine() {
        let mut a = ok_task(0, vec![]);
        a.io.stdout = "hi\n".into();
        a.io.results.push(json!({"text/plain": "42"}).as_object().unwrap().clone());
        if let Some(Outcome::Reply(r)) = &mut a.outcome {
            r.content = LazyJson::from_value(json!({"status": "ok", "execution_count": 3}));
        }
        let b = err_task(1, json!({"status": "error", "ename": "CompileError", "evalue": "error[E0425]", "engine_info": {"engine_id": 1}}));
        let tasks = [a, b];
        let r = finish_execute_results(&tasks).unwrap();
        assert_eq!(r.stdout(), vec!["hi\n".to_string(), String::new()]);
        assert_eq!(r.results(), vec![Some("42".to_string()), None]);
        assert_eq!(r.errors().len(), 1);
        let text = r.to_string();
        assert!(
            text.contains("[stdout:0] hi") && text.contains("Out[0:3]: 42") && text.contains("[1:execute] compile error on engine 1"),
            "{text}"
        );
        assert!(matches!(r.clone().check(), Err(Error::Execute(ref all)) if **all == r));
        // execute's rule: a failure is an Err that still holds every engine's outcome.
        let e = finish_execute(&tasks).unwrap_err();
        assert_eq!(e.execute_result(), Some(&r));
        assert_eq!(e.remote_errors().len(), 1);
        let text = e.to_string();
        assert!(text.starts_with("the cell failed on 1 of 2 engines (1)") && text.contains("execute_results()"), "{text}");
        let mut ok = ok_task(0, vec![]);
        if let Some(Outcome::Reply(r)) = &mut ok.outcome {
            r.content = LazyJson::from_value(json!({"status": "ok", "execution_count": 1}));
        }
        assert!(finish_execute(&[ok]).is_ok());
    }

    #[test]
    fn ordered_and_unordered_iteration() {
        let tracker = Tracker::new((0..3).map(|i| TaskState::new(format!("m{i}"), None, String::new())).collect(), false, None);
        let inputs: Vec<Bytes> = (0..3).map(|i| enc(&vec![i as u64])).collect();
        let res: AsyncMapResult<u64> = AsyncMapResult::new(tracker.clone(), vec![0..1, 1..2, 2..3], inputs, describe_item::<u64>, 3, true);
        // Tasks complete in reverse order.
        for i in (0..3).rev() {
            let out: Vec<std::result::Result<u64, String>> = vec![Ok(i as u64 * 10)];
            let t = ok_task(i, vec![enc(&out)]);
            tracker.set_outcome(i, t.outcome.unwrap(), Some(i));
        }
        tracker.notify();
        assert_eq!(res.iter().map(|r| r.unwrap()).collect::<Vec<_>>(), vec![0, 10, 20]);
        assert_eq!(res.iter_unordered().map(|r| r.unwrap()).collect::<Vec<_>>(), vec![20, 10, 0]);
        assert_eq!(res.get().unwrap(), vec![0, 10, 20]);
        assert_eq!(res.progress(), (3, 3));
        let unordered: AsyncMapResult<u64> = AsyncMapResult { ordered: false, ..res.clone() };
        assert_eq!(unordered.get().unwrap(), vec![20, 10, 0]);
        assert_eq!(unordered.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(), vec![20, 10, 0]);
    }
}
