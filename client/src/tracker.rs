//! The state one request (one or many tasks) shares between the dispatcher, which records
//! replies and iopub output as they arrive, and the user-facing handles ([`crate::AsyncResult`],
//! [`crate::AsyncMapResult`], [`crate::Imap`]) that wait on it. One mutex per request, held
//! briefly. A waiting thread runs the request runtime itself while it waits (`crate::drive`),
//! woken through a waker; a thread that cannot (it is inside a tokio runtime) sleeps on a
//! condvar; futures register wakers.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use rpx_protocol::content::{DisplayContent, Stream};
use serde_json::{Map, Value};

use crate::io::Shared;

/// A JSON frame of a received message, checked to be JSON when it arrived and built into a
/// [`Value`] only the first time something reads it. Most replies are only counted and their
/// value decoded from buffers: building (and later freeing) a tree for each of a map's
/// thousands of replies was a fifth of the client's CPU per task (perf, 10,000 trivial tasks).
#[derive(Debug, Clone)]
pub(crate) struct LazyJson {
    raw: Bytes,
    value: OnceLock<Value>,
}

impl LazyJson {
    /// A frame already checked to be JSON.
    pub fn new(raw: Bytes) -> LazyJson {
        LazyJson { raw, value: OnceLock::new() }
    }

    /// A frame made here (tests).
    #[cfg(test)]
    pub fn from_value(v: Value) -> LazyJson {
        let raw = Bytes::from(serde_json::to_vec(&v).expect("json serializes"));
        LazyJson { raw, value: OnceLock::from(v) }
    }

    /// The frame as it came.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
}

impl std::ops::Deref for LazyJson {
    type Target = Value;

    fn deref(&self) -> &Value {
        // Checked when received: a parse error cannot happen here; `null` if it somehow did.
        self.value.get_or_init(|| serde_json::from_slice(&self.raw).unwrap_or(Value::Null))
    }
}

/// A reply as received: what typed results are decoded from.
#[derive(Debug, Clone)]
pub(crate) struct ReplyData {
    /// `ok`, `error` or `aborted`.
    pub status: String,
    pub content: LazyJson,
    pub metadata: LazyJson,
    /// The reply header's date (ISO-8601).
    pub date: String,
    pub buffers: Vec<Bytes>,
}

/// How a task ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Reply(ReplyData),
    /// The client gave up on it: the connection is gone, or it could not be sent.
    Lost(String),
}

/// iopub output gathered for a task.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskIo {
    pub stdout: String,
    pub stderr: String,
    /// `data` of each `execute_result`.
    pub results: Vec<Map<String, Value>>,
    /// `data` of each `display_data`.
    pub displays: Vec<Map<String, Value>>,
}

/// One task: one message sent, one reply expected.
#[derive(Debug, Clone)]
pub(crate) struct TaskState {
    pub msg_id: String,
    /// Known at submission for direct requests, from the reply for load-balanced ones.
    pub engine_id: Option<usize>,
    /// The request header's date.
    pub submitted: String,
    pub outcome: Option<Outcome>,
    pub io: TaskIo,
    /// Output is complete: iopub `idle` arrived, its grace period passed, or the task was lost.
    pub settled: bool,
}

impl TaskState {
    pub fn new(msg_id: String, engine_id: Option<usize>, submitted: String) -> TaskState {
        TaskState { msg_id, engine_id, submitted, outcome: None, io: TaskIo::default(), settled: false }
    }

    pub fn reply(&self) -> Option<&ReplyData> {
        match &self.outcome {
            Some(Outcome::Reply(r)) => Some(r),
            _ => None,
        }
    }
}

/// One entry of a request's arrival log.
#[derive(Debug, Clone)]
pub(crate) enum LogEntry {
    /// Task `idx` published `msg_type` with `content` on iopub.
    Io { idx: usize, msg_type: String, content: Value },
    /// Task `idx` got its outcome.
    Done(usize),
}

/// Mutable state of a request.
#[derive(Debug)]
pub(crate) struct TrackerState {
    pub tasks: Vec<TaskState>,
    pub replied: usize,
    pub settled: usize,
    /// Task indices in the order their replies arrived.
    pub done_order: Vec<usize>,
    /// Outputs and replies in arrival order (what [`crate::AsyncResult::next_events`] reads).
    pub log: Vec<LogEntry>,
    /// No more tasks will be added (false only while an `imap` is still submitting).
    pub sealed: bool,
    /// Threads waiting for any change.
    waiters: usize,
    /// Threads waiting for completion only: woken once, not at every reply.
    complete_waiters: usize,
    /// Woken on completion (futures, and threads waiting for completion on the request runtime).
    wakers: Vec<Waker>,
    /// Woken at every change (threads waiting on the request runtime for any change).
    change_wakers: Vec<Waker>,
}

impl TrackerState {
    /// Every reply is in (and, for requests that want it, every task's output).
    pub fn complete(&self, needs_idle: bool) -> bool {
        self.sealed && self.replied == self.tasks.len() && (!needs_idle || self.settled == self.tasks.len())
    }
}

/// How often a waiter looks again without news (its deadline, the dispatcher's end).
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A request's shared state.
#[derive(Debug)]
pub(crate) struct Tracker {
    state: Mutex<TrackerState>,
    cv: Condvar,
    /// Completion also waits for each task's iopub `idle` (execute: so stdout is complete).
    pub needs_idle: bool,
    /// The client's shared state: waiters run its request runtime, and check that its
    /// dispatcher is still there.
    io: Option<Arc<Shared>>,
}

impl Tracker {
    pub fn new(tasks: Vec<TaskState>, needs_idle: bool, io: Option<Arc<Shared>>) -> Arc<Tracker> {
        Arc::new(Tracker {
            state: Mutex::new(TrackerState {
                tasks,
                replied: 0,
                settled: 0,
                done_order: Vec::new(),
                log: Vec::new(),
                sealed: true,
                waiters: 0,
                complete_waiters: 0,
                wakers: Vec::new(),
                change_wakers: Vec::new(),
            }),
            cv: Condvar::new(),
            needs_idle,
            io,
        })
    }

    /// A tracker that grows as tasks are submitted (`imap`); [`Tracker::seal`] ends it.
    pub fn open(io: Option<Arc<Shared>>) -> Arc<Tracker> {
        let t = Tracker::new(Vec::new(), false, io);
        t.lock().sealed = false;
        t
    }

    pub fn lock(&self) -> MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a task; returns its index.
    pub fn push(&self, task: TaskState) -> usize {
        let mut s = self.lock();
        s.tasks.push(task);
        s.tasks.len() - 1
    }

    pub fn seal(&self) {
        self.lock().sealed = true;
        self.notify();
    }

    // ----- dispatcher side -----

    /// Record the outcome of task `idx` (the first one wins).
    pub fn set_outcome(&self, idx: usize, outcome: Outcome, engine_id: Option<usize>) {
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(idx) else { return };
        if t.outcome.is_some() {
            return;
        }
        let lost = matches!(outcome, Outcome::Lost(_));
        t.outcome = Some(outcome);
        if engine_id.is_some() {
            t.engine_id = engine_id;
        }
        let newly_settled = lost && !t.settled;
        if lost {
            t.settled = true;
        }
        s.replied += 1;
        if newly_settled {
            s.settled += 1;
        }
        s.done_order.push(idx);
        s.log.push(LogEntry::Done(idx));
    }

    /// Task `idx`, not answered yet, was sent again as `msg_id` (`crate::closures`): what the
    /// first request published is dropped, and its replies go by the new msg_id.
    pub fn retry(&self, idx: usize, msg_id: String) {
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(idx) else { return };
        t.msg_id = msg_id;
        t.io = TaskIo::default();
        s.log.retain(|e| !matches!(e, LogEntry::Io { idx: i, .. } if *i == idx));
    }

    /// Fail every task without an outcome (and settle every task).
    pub fn fail_unreplied(&self, why: &str) {
        let n = self.lock().tasks.len();
        for i in 0..n {
            self.set_outcome(i, Outcome::Lost(why.to_string()), None);
            self.settle(i);
        }
        self.lock().sealed = true;
        self.notify();
    }

    /// Task `idx`'s output is complete.
    pub fn settle(&self, idx: usize) {
        let mut s = self.lock();
        if let Some(t) = s.tasks.get_mut(idx) {
            if !t.settled {
                t.settled = true;
                s.settled += 1;
            }
        }
    }

    /// Apply an iopub message's effect on task `idx`.
    pub fn add_io(&self, idx: usize, msg_type: &str, content: &Value) {
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(idx) else { return };
        let data = || DisplayContent::read(content).data_map();
        match msg_type {
            "stream" => {
                let stream = Stream::read(content);
                let text = stream.text.as_deref().unwrap_or_default();
                if stream.is_stderr() {
                    t.io.stderr.push_str(text);
                } else {
                    t.io.stdout.push_str(text);
                }
            }
            "execute_result" => t.io.results.push(data()),
            "display_data" => t.io.displays.push(data()),
            "error" => {}
            _ => return,
        }
        s.log.push(LogEntry::Io { idx, msg_type: msg_type.to_string(), content: content.clone() });
    }

    /// Wake whoever waits on this request.
    pub fn notify(&self) {
        let mut s = self.lock();
        let complete = s.complete(self.needs_idle);
        let wake_threads = s.waiters > 0 || (s.complete_waiters > 0 && complete);
        let mut wakers = if !s.wakers.is_empty() && complete { std::mem::take(&mut s.wakers) } else { Vec::new() };
        wakers.append(&mut s.change_wakers);
        // Wake after unlocking, so the woken thread does not block on the mutex at once.
        drop(s);
        if wake_threads {
            self.cv.notify_all();
        }
        for w in wakers {
            w.wake();
        }
    }

    // ----- user side -----

    /// Wait until `pred` holds or `deadline` passes; returns whether it holds. Woken at every
    /// change.
    pub fn wait_until(&self, deadline: Option<Instant>, pred: impl FnMut(&TrackerState) -> bool) -> bool {
        self.wait_inner(deadline, false, pred)
    }

    fn wait_inner(&self, deadline: Option<Instant>, only_complete: bool, mut pred: impl FnMut(&TrackerState) -> bool) -> bool {
        if let Some(io) = &self.io {
            // Run the request runtime while waiting (the reply is read on this thread); `None`
            // if this thread cannot or the dispatcher has ended: then wait below.
            if let Some(Some(holds)) = io.drive.wait(self.until(io, deadline, only_complete, &mut pred)) {
                return holds;
            }
            io.drive.attend();
        }
        let mut s = self.lock();
        loop {
            if pred(&s) {
                return true;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            if self.io.as_ref().is_some_and(|io| io.stopped.load(std::sync::atomic::Ordering::SeqCst)) {
                // Nobody will record anything any more: whatever is missing is lost.
                drop(s);
                self.fail_unreplied("the client's dispatcher has stopped");
                s = self.lock();
                if pred(&s) {
                    return true;
                }
                return false;
            }
            if only_complete {
                s.complete_waiters += 1;
            } else {
                s.waiters += 1;
            }
            // Wake at least every RECHECK even without news, to re-check the deadline.
            let slice = deadline.map_or(RECHECK, |d| (d - now).min(RECHECK));
            s = self.cv.wait_timeout(s, slice).unwrap_or_else(|p| p.into_inner()).0;
            if only_complete {
                s.complete_waiters -= 1;
            } else {
                s.waiters -= 1;
            }
        }
    }

    /// On the request runtime: `Some(true)` once `pred` holds, `Some(false)` once `deadline`
    /// passes, `None` if the dispatcher ends first.
    async fn until(
        &self,
        io: &Shared,
        deadline: Option<Instant>,
        only_complete: bool,
        pred: &mut impl FnMut(&TrackerState) -> bool,
    ) -> Option<bool> {
        loop {
            // Look again at least every RECHECK even without news, as the thread wait does.
            let slice = Instant::now() + RECHECK;
            let slice = deadline.map_or(slice, |d| d.min(slice));
            let changed = std::future::poll_fn(|cx| {
                let mut s = self.lock();
                if pred(&s) {
                    return Poll::Ready(Some(true));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Poll::Ready(Some(false));
                }
                if io.stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return Poll::Ready(None);
                }
                let list = if only_complete { &mut s.wakers } else { &mut s.change_wakers };
                if !list.iter().any(|w| w.will_wake(cx.waker())) {
                    list.push(cx.waker().clone());
                }
                Poll::Pending
            });
            tokio::select! {
                biased;
                r = changed => return r,
                _ = tokio::time::sleep_until(slice.into()) => {}
            }
        }
    }

    /// Wait until complete (see [`TrackerState::complete`]).
    pub fn wait_complete(&self, deadline: Option<Instant>) -> bool {
        let needs_idle = self.needs_idle;
        self.wait_inner(deadline, true, |s| s.complete(needs_idle))
    }

    pub fn is_complete(&self) -> bool {
        self.lock().complete(self.needs_idle)
    }

    /// For futures: true when complete, else the waker is kept and woken on completion.
    pub fn poll_complete(&self, waker: &Waker) -> bool {
        let mut s = self.lock();
        if s.complete(self.needs_idle) {
            return true;
        }
        if !s.wakers.iter().any(|w| w.will_wake(waker)) {
            s.wakers.push(waker.clone());
        }
        drop(s);
        if let Some(io) = &self.io {
            io.drive.attend();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: &str) -> Outcome {
        Outcome::Reply(ReplyData {
            status: status.into(),
            content: LazyJson::from_value(Value::Null),
            metadata: LazyJson::from_value(Value::Null),
            date: String::new(),
            buffers: vec![],
        })
    }

    fn tracker(n: usize, needs_idle: bool) -> Arc<Tracker> {
        Tracker::new((0..n).map(|i| TaskState::new(format!("m{i}"), None, String::new())).collect(), needs_idle, None)
    }

    #[test]
    fn completion_and_completion_order() {
        let t = tracker(3, false);
        t.set_outcome(2, reply("ok"), Some(5));
        t.set_outcome(0, reply("ok"), None);
        assert!(!t.is_complete());
        t.set_outcome(0, reply("error"), None); // a duplicate reply changes nothing
        t.set_outcome(1, reply("ok"), None);
        assert!(t.is_complete());
        let s = t.lock();
        assert_eq!(s.done_order, vec![2, 0, 1]);
        assert_eq!(s.tasks[2].engine_id, Some(5));
        assert_eq!(s.tasks[0].reply().unwrap().status, "ok");
    }

    #[test]
    fn execute_waits_for_output() {
        let t = tracker(2, true);
        t.set_outcome(0, reply("ok"), None);
        t.set_outcome(1, reply("ok"), None);
        assert!(!t.is_complete(), "replies alone do not complete an execute");
        t.add_io(0, "stream", &serde_json::json!({"name": "stdout", "text": "hi\n"}));
        t.add_io(0, "stream", &serde_json::json!({"name": "stderr", "text": "oops"}));
        t.settle(0);
        t.settle(1);
        t.settle(1);
        assert!(t.is_complete());
        assert_eq!(t.lock().tasks[0].io.stdout, "hi\n");
        assert_eq!(t.lock().tasks[0].io.stderr, "oops");
    }

    #[test]
    fn open_trackers_complete_only_when_sealed() {
        let t = Tracker::open(None);
        let i = t.push(TaskState::new("a".into(), None, String::new()));
        t.set_outcome(i, Outcome::Lost("gone".into()), None);
        assert!(!t.is_complete());
        t.seal();
        assert!(t.is_complete());
        assert!(t.lock().tasks[0].settled, "a lost task is settled");
    }

    #[test]
    fn waiting_threads_wake_on_notify() {
        let t = tracker(1, false);
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_complete(None));
        std::thread::sleep(std::time::Duration::from_millis(20));
        t.set_outcome(0, reply("ok"), None);
        t.notify();
        assert!(h.join().unwrap());
        assert!(!tracker(1, false).wait_complete(Some(Instant::now())), "a passed deadline returns at once");
    }

    #[test]
    fn a_task_sent_again_answers_to_its_new_msg_id_without_the_first_requests_output() {
        let t = tracker(2, false);
        t.add_io(0, "stream", &serde_json::json!({"name": "stdout", "text": "first try\n"}));
        t.add_io(1, "stream", &serde_json::json!({"name": "stdout", "text": "other\n"}));
        t.retry(0, "again".into());
        let s = t.lock();
        assert_eq!(s.tasks[0].msg_id, "again");
        assert_eq!((s.tasks[0].io.stdout.as_str(), s.tasks[1].io.stdout.as_str()), ("", "other\n"));
        assert!(matches!(s.log.as_slice(), [LogEntry::Io { idx: 1, .. }]), "{:?}", s.log);
        assert!(s.tasks[0].outcome.is_none() && s.replied == 0, "still waiting for its reply");
    }

    #[test]
    fn the_log_keeps_outputs_and_replies_in_arrival_order() {
        let t = tracker(2, true);
        t.add_io(1, "stream", &serde_json::json!({"name": "stdout", "text": "b"}));
        t.add_io(0, "status", &serde_json::json!({"execution_state": "busy"}));
        t.add_io(0, "display_data", &serde_json::json!({"data": {"text/plain": "d"}}));
        t.set_outcome(1, reply("ok"), None);
        t.add_io(0, "stream", &serde_json::json!({"name": "stderr", "text": "a"}));
        t.set_outcome(0, reply("ok"), None);
        let s = t.lock();
        let seen: Vec<String> = s
            .log
            .iter()
            .map(|e| match e {
                LogEntry::Io { idx, msg_type, .. } => format!("{idx}:{msg_type}"),
                LogEntry::Done(idx) => format!("{idx}:done"),
            })
            .collect();
        // Status messages are not outputs.
        assert_eq!(seen, ["1:stream", "0:display_data", "1:done", "0:stream", "0:done"]);
    }
}
