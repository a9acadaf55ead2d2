//! The worker as the engine loop drives it: starting it, running the compiler's loads in it,
//! its stdout and stderr, its exit and restart.

use std::time::Instant;

use rpx_protocol::compile::{msg_type as cmsg, Load, WorkerRestarted};
use rpx_worker::process::{END_ON_STDERR, END_ON_STDOUT};
use tracing::{debug, error, info, warn};

use super::Engine;
use crate::artifacts::Kind;
use crate::call;
use crate::cell::{Cell, LoadStep, Skip};
use crate::child::{WorkerEvent, WriteFailed};
use crate::outbox::Stream;
use crate::output::{StderrMarks, StderrPiece, StdoutEvent, StdoutParser};
use crate::reply::EngineError;
use crate::supervise::Restart;

impl Engine {
    pub(super) fn ensure_worker(&mut self) {
        if self.workers.ensure() {
            self.parser = StdoutParser::new();
            self.stderr_marks = StderrMarks::default();
            self.supervisor.spawned(Instant::now());
        }
    }

    /// Skip a load the worker will not run: tell the compiler (it handles a skipped load as a
    /// panicked one) and mark the cell.
    pub(super) fn skip_load(&mut self, load: Load, why: Skip) {
        if let Skip::Refused(why) = &why {
            error!(cell_id = %load.cell_id, %why, "artifact refused; the cell does not run");
        }
        if let Some(cell) = self.current.as_mut().filter(|c| c.id() == load.cell_id) {
            cell.skipped(&why);
        }
        info!(cell_id = %load.cell_id, reason = %why.reason(), "load skipped");
        self.load_done(why.load_done(load.cell_id));
    }

    pub(super) async fn run_next_load(&mut self) {
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

    pub(super) async fn on_worker(&mut self, generation: u64, ev: WorkerEvent) {
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
            WorkerEvent::CallResult { status, ends, data } => self.on_call_result(status, ends, data).await,
            WorkerEvent::Exited(status) => self.on_worker_exit(status).await,
        }
    }

    /// A call's result: the first call in the worker without one is answered once its output
    /// is all in. A stream without an end marker for it (`ends`) was read to the end of its
    /// output already, so what the parsers still hold back is the last of it.
    async fn on_call_result(&mut self, status: u32, ends: u32, data: Vec<u8>) {
        if self.first_in_worker(|c| c.result.is_none()).is_none() {
            warn!(status, "a call result nobody waits for; dropped");
            return;
        }
        let (stdout_ended, stderr_ended) = (ends & END_ON_STDOUT == 0, ends & END_ON_STDERR == 0);
        if stdout_ended {
            if let Some(t) = self.parser.take_call_tail() {
                self.on_stdout_events(vec![StdoutEvent::Text(t)]).await;
            }
        }
        if stderr_ended {
            if let Some(t) = self.stderr_marks.take_held() {
                self.on_stderr_text(&t);
            }
        }
        if let Some(c) = self.first_in_worker(|c| c.result.is_none()) {
            c.result = Some(call::outcome(status, data));
            c.stdout_done |= stdout_ended;
            c.stderr_done |= stderr_ended;
        }
        self.settle_calls();
    }

    pub(super) fn on_stderr_text(&mut self, text: &str) {
        if let Some(text) = self.hold_for_piped(Stream::Stderr, text) {
            self.publish_stderr(text);
        }
    }

    pub(super) fn publish_stderr(&mut self, text: &str) {
        self.stderr_tail.feed(text);
        self.out.write(Stream::Stderr, text);
        if self.current.as_ref().is_some_and(Cell::waits_for_panic_message) {
            self.maybe_finish();
        }
    }

    pub(super) async fn on_worker_exit(&mut self, status: String) {
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
    pub(super) fn worker_gone(&mut self, status: &str) {
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
    pub(super) async fn restart_worker(&mut self, status: &str) {
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

    pub(super) async fn on_stdout_events(&mut self, events: Vec<StdoutEvent>) {
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
}
