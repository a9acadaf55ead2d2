//! Starting queued requests: the pump, calls handed to the worker ahead of time and settled
//! in order, and execute requests becoming cells.

use std::time::Instant;

use rpx_protocol::apply::Op;
use rpx_protocol::compile::{msg_type as cmsg, CellRequest};
use rpx_runtime::abi;
use serde_json::json;
use tracing::{debug, info, warn};

use super::Engine;
use crate::artifacts::{Kind, Step};
use crate::call::Call;
use crate::cell::{Cell, Purpose};
use crate::child::WriteFailed;
use crate::outbox::Stream;
use crate::queue::{Next, Request};
use crate::reply::EngineError;
use crate::{call, reply};

impl Engine {
    /// Start queued requests while nothing is running.
    pub(super) async fn pump(&mut self) {
        while self.current.is_none() && self.call.is_none() && self.exit_code.is_none() {
            match self.queue.next(self.compiler.connecting()) {
                None => break,
                Some(Next::Aborted(req)) => self.aborted(&req),
                Some(Next::Start(req)) => self.start(req).await,
            }
        }
        self.pipe_calls().await;
    }

    /// Hand the worker the next queued calls of the closure it is running, up to
    /// [`call::PIPE_DEPTH`] ahead, so it goes from one to the next without waiting for the
    /// engine. The calls that are queued now go in one write (nothing waits for more to
    /// arrive). Anything else in the queue (a cell, a push, another closure, an abort) waits
    /// for its turn as usual.
    pub(super) async fn pipe_calls(&mut self) {
        let mut batch: Vec<Call> = Vec::new();
        let mut target: Option<(String, String, u32)> = None;
        while self.piped.len() + batch.len() < call::PIPE_DEPTH
            && self.current.is_none()
            && self.exit_code.is_none()
            && self.restart_notice.is_none()
        {
            let Some(head) = self.call.as_ref().filter(|c| c.running) else { break };
            let Some(front) = self.queue.front() else { break };
            if front.msg_type() != "apply_request" || call::check_arguments(front).is_err() {
                break;
            }
            let (mode, closure) = match Op::from_content(&front.content) {
                Some(Ok(Op::Apply { closure })) => (abi::MODE_APPLY, closure),
                Some(Ok(Op::Map { closure })) => (abi::MODE_MAP, closure),
                _ => break,
            };
            if closure.id != head.closure.id || target.as_ref().is_some_and(|t| t.2 != mode) {
                break;
            }
            let Some((artifact, func)) = self.closures.compiled(&closure.id) else { break };
            let so = match self.fetcher.want(&artifact, Kind::Code, Instant::now()) {
                Step::Ready(path) => path.display().to_string(),
                Step::Request(sha) => {
                    self.request_artifact(sha);
                    break;
                }
                _ => break,
            };
            let req = match self.queue.next(self.compiler.connecting()) {
                Some(Next::Start(req)) => req,
                // Named by an abort before it was handed ahead: answered now, as `pump` would.
                Some(Next::Aborted(req)) => {
                    self.aborted(&req);
                    break;
                }
                None => break,
            };
            let md = reply::init_metadata(&req.metadata, &self.me);
            let mut c = Call::new(req, md, mode, closure);
            c.running = true;
            batch.push(c);
            target.get_or_insert((so, func, mode));
        }
        let Some((so, func, mode)) = target else { return };
        let args: Vec<&[u8]> = batch.iter().map(|c| &c.req.buffers[0][..]).collect();
        let written = self.workers.send_calls(&so, &func, mode, &args).await;
        for mut c in batch {
            match &written {
                Ok(()) => {}
                Err(WriteFailed::NoWorker(e)) => {
                    // Answered in its turn, after the calls ahead of it.
                    c.result = Some(Err(EngineError::worker_died(&self.me, &format!("not run: {e}"), vec![])));
                    (c.stdout_done, c.stderr_done) = (true, true);
                }
                // The worker is dying; its exit event fails the call.
                Err(WriteFailed::Dying(_)) => {}
            }
            self.piped.push_back(c);
        }
        if let Err(WriteFailed::Dying(e)) = &written {
            warn!(error = %e, "cannot write to the worker");
        }
    }

    /// Answer the calls at the head whose result and output are all in, in order; each next
    /// one becomes the call whose output is published.
    pub(super) fn settle_calls(&mut self) {
        while let Some(outcome) = self.call.as_mut().filter(|c| c.settled()).and_then(|c| c.result.take()) {
            self.finish_call(outcome);
            if let Some(next) = self.piped.pop_front() {
                self.promote(next);
            }
        }
    }

    /// `next`, handed to the worker ahead, becomes the call whose output is published (what
    /// it wrote meanwhile first).
    pub(super) fn promote(&mut self, mut next: Call) {
        self.out.flush_streams();
        self.out.defer_busy(&next.req.header);
        self.out.set_stream_parent(next.req.header.clone());
        self.stderr_tail.clear();
        let (out, err) = (std::mem::take(&mut next.held_stdout), std::mem::take(&mut next.held_stderr));
        self.call = Some(next);
        if !out.is_empty() {
            self.out.write(Stream::Stdout, &out);
        }
        if !err.is_empty() {
            self.publish_stderr(&err);
        }
    }

    /// Worker output for a call handed to it ahead: the head call's output on `stream` is all
    /// in, so this text is a later call's. Returns the text back when it is the head's (or a
    /// cell's) to publish now.
    pub(super) fn hold_for_piped<'a>(&mut self, stream: Stream, text: &'a str) -> Option<&'a str> {
        let head_done = |c: &Call| c.running && if stream == Stream::Stdout { c.stdout_done } else { c.stderr_done };
        if !self.call.as_ref().is_some_and(head_done) {
            return Some(text);
        }
        let held = match stream {
            Stream::Stdout => self.piped.iter_mut().find(|c| !c.stdout_done).map(|c| &mut c.held_stdout),
            Stream::Stderr => self.piped.iter_mut().find(|c| !c.stderr_done).map(|c| &mut c.held_stderr),
        };
        match held {
            Some(h) => {
                h.push_str(text);
                None
            }
            None => Some(text),
        }
    }

    /// The first call in the worker for which `pending` holds (calls are answered in order).
    pub(super) fn first_in_worker(&mut self, pending: impl Fn(&Call) -> bool) -> Option<&mut Call> {
        self.call.iter_mut().filter(|c| c.running).chain(self.piped.iter_mut()).find(|c| pending(c))
    }

    pub(super) async fn start(&mut self, req: Request) {
        if req.msg_type() == "apply_request" {
            // The previous request's output goes out under its own parent; this one's `busy`
            // waits for its first publication (a quiet call answers with its reply alone).
            self.out.flush_streams();
            self.out.defer_busy(&req.header);
        }
        if matches!(req.msg_type(), "execute_request" | "apply_request") {
            if let Some(notice) = self.restart_notice.take() {
                self.out.set_stream_parent(req.header.clone());
                self.out.append(Stream::Stderr, &format!("{notice}\n"));
                self.out.flush_streams();
            }
        }
        match req.msg_type() {
            "execute_request" => {
                self.out.status("busy", &req.header);
                let exec = rpx_protocol::content::ExecuteRequest::read(&req.content);
                let (silent, code) = (exec.silent(), exec.code);
                self.start_cell(req, code, silent, Purpose::Execute);
            }
            "apply_request" => self.start_apply(req).await,
            "kernel_info_request" => self.out.answer(&req, reply::kernel_info()),
            other => {
                warn!(msg_type = other, "unsupported shell request");
                self.out.answer(&req, reply::unsupported(other, &self.me));
            }
        }
    }

    pub(super) fn start_cell(&mut self, req: Request, code: String, silent: bool, purpose: Purpose) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.out.flush_streams();
        self.out.set_stream_parent(req.header.clone());
        if code.trim().is_empty() {
            self.out.reply(&req, reply::execute_ok(self.execution_count), md);
            self.out.status("idle", &req.header);
            return;
        }
        if !silent {
            self.execution_count += 1;
            self.out.publish(
                "execute_input",
                "execute_input",
                json!({"code": code, "execution_count": self.execution_count}),
                Some(&req.header),
            );
        }
        let count = self.execution_count;
        if let Some(why) = self.compiler.absent() {
            debug!(%why, "no compiler for this cell");
            self.spawn_reconnect();
            self.out.execute_error(&req, md, &EngineError::no_compiler(), count);
            return;
        }
        self.stderr_tail.clear();
        self.ensure_worker();
        let cell_id = req.msg_id().to_string();
        info!(%cell_id, count, ?purpose, "cell");
        let code = crate::namespace::with_bindings(self.bindings.unbound(), &code);
        self.history.requested(&cell_id, &code);
        self.to_compiler(cmsg::CELL_REQUEST, CellRequest { cell_id, code });
        self.current = Some(Cell::new(req, purpose, silent, count, md));
    }
}
