//! Finishing cells: the verdict once the worker and the compiler are done, and failing what
//! waits on a compiler that is gone.

use std::time::Instant;

use tracing::info;

use super::Engine;
use crate::call::Call;
use crate::cell::{Cell, Ending};
use crate::outbox::Stream;
use crate::reply;
use crate::reply::EngineError;

impl Engine {
    /// Finish the running cell if its reply is in and no load of it is running.
    pub(super) fn maybe_finish(&mut self) {
        let Some(cell) = &mut self.current else { return };
        let loads_pending = self.loads.has(cell.id());
        if cell.ready_to_finish(loads_pending, &self.stderr_tail, Instant::now()) {
            let cell = self.current.take().expect("checked");
            self.finalize(cell, None);
        }
    }

    /// Answer a finished cell; `override_err` (the compiler is gone) replaces its verdict.
    pub(super) fn finalize(&mut self, cell: Cell, override_err: Option<EngineError>) {
        if let Some(text) = cell.question_mark_error_text(&self.stderr_tail) {
            // Shown once: as the cell's error, not also as its last stderr line.
            self.out.drop_stderr_tail(&text);
        }
        self.out.flush_streams();
        if let Some(note) = cell.note() {
            self.out.append(Stream::Stderr, &note);
            self.out.flush_streams();
        }
        let err = override_err.or_else(|| cell.verdict(&self.me, &self.stderr_tail));
        if let Some(said) = self.bindings.after_cell(&cell.purpose, err.as_ref()) {
            self.out.append(Stream::Stderr, &said);
        }
        let ending = cell.ending(err, self.me.id);
        let Cell { req, md, count, .. } = cell;
        match ending {
            Ending::Pulled(names) => self.finish_pull(&req, md, &names),
            Ending::PullFailed(err) => self.out.apply_error(&req, md, &err),
            Ending::Failed(err) => {
                info!(cell_id = req.msg_id(), ename = %err.ename, "cell failed");
                self.out.execute_error(&req, md, &err, count);
            }
            Ending::Succeeded(result) => {
                if let Some(p) = result {
                    self.out.publish(p.kind, p.msg_type, p.content, Some(&req.header));
                }
                self.out.reply(&req, reply::execute_ok(count), md);
                self.out.status("idle", &req.header);
            }
        }
    }

    /// No compiler will answer: a call waiting on it fails with `call_err`; a cell still
    /// waiting for its reply fails with `cell_err` (one whose reply is in finishes as usual),
    /// unless a load runs (its end finishes the cell). Returns whether a call failed.
    pub(super) fn fail_what_waits_on_compiler(&mut self, call_err: EngineError, cell_err: EngineError) -> bool {
        let call_failed = self.call.as_ref().is_some_and(Call::waiting);
        if call_failed {
            self.finish_call(Err(call_err));
        }
        if self.loads.running.is_some() {
            return call_failed;
        }
        match &self.current {
            Some(cell) if cell.reply.is_some() => self.maybe_finish(),
            Some(_) => {
                let cell = self.current.take().expect("checked");
                self.finalize(cell, Some(cell_err));
            }
            None => {}
        }
        call_failed
    }
}
