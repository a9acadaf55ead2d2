//! Control requests (abort, clear, shutdown, signals) and interrupts: SIGINT to the running
//! cell or call, the follow-up after it, and a cell blocked reading stdin.

use std::time::Instant;

use serde_json::{json, Value};
use tracing::{info, warn};

use rpx_protocol::content::ErrorName;

use super::{Engine, STDIN_READ_TICKS};
use crate::queue::Request;
use crate::reply;
use crate::supervise::{InterruptStep, INTERRUPT_GRACE};

impl Engine {
    pub(super) async fn on_control(&mut self, req: Request) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.out.status("busy", &req.header);
        match req.msg_type() {
            "abort_request" => {
                for r in self.queue.abort(&req.content) {
                    self.aborted(&r);
                }
                self.out.reply(&req, json!({"status": "ok"}), md);
            }
            "clear_request" => {
                self.restart_worker("killed by clear_request").await;
                self.out.reply(&req, json!({"status": "ok"}), md);
            }
            "signal_request" => {
                let content =
                    self.signal(&rpx_protocol::content::read_or_default::<rpx_protocol::content::SignalRequest>(&req.content).sig);
                self.out.reply(&req, content, md);
            }
            "shutdown_request" => {
                let shutdown: rpx_protocol::content::ShutdownRequest = rpx_protocol::content::read_or_default(&req.content);
                self.out.reply(&req, shutdown.reply(), md);
                self.out.status("idle", &req.header);
                self.exit_code = Some(0);
                return;
            }
            "kernel_info_request" => self.out.reply(&req, reply::kernel_info(), md),
            other => {
                warn!(msg_type = other, "unsupported control request");
                self.out.reply(&req, reply::unsupported(other, &self.me), md);
            }
        }
        self.out.status("idle", &req.header);
    }

    /// `signal_request`: SIGINT interrupts the running code, other signals go to the worker.
    /// Returns the reply content.
    pub(super) fn signal(&mut self, sig: &Value) -> Value {
        match crate::signals::parse_signal(sig) {
            Ok(libc::SIGINT) => {
                self.interrupt();
                json!({"status": "ok"})
            }
            Ok(sig) => match self.workers.signal(sig) {
                Ok(()) => json!({"status": "ok"}),
                Err(e) => reply::simple_error(ErrorName::SignalError, &format!("cannot signal the worker: {e}"), &self.me, "signal"),
            },
            Err(e) => reply::simple_error(ErrorName::ValueError, &e, &self.me, "signal"),
        }
    }

    /// The load or call the worker is running: its cell id or msg id.
    pub(super) fn running_target(&self) -> Option<String> {
        self.loads
            .running
            .as_ref()
            .map(|l| l.cell_id.clone())
            .or_else(|| self.call.as_ref().filter(|c| c.running).map(|c| c.id().to_string()))
    }

    /// SIGINT: interrupt the running cell or call, keeping the engine's variables (see
    /// [`rpx_worker::interrupt`]); if it has not stopped after [`INTERRUPT_GRACE`] the worker
    /// is killed. A cell or closure still being compiled is not run. Otherwise nothing happens.
    pub(super) fn interrupt(&mut self) {
        if let Some(cell) = &mut self.current {
            cell.interrupt_requested = true;
        }
        if let Some(call) = self.call.as_mut().filter(|c| c.waiting()) {
            call.interrupt_requested = true;
        }
        if let Some(target) = self.running_target() {
            self.supervisor.interrupting(&target, Instant::now());
            info!(%target, "SIGINT: interrupting the running code");
        }
        // The worker ignores SIGINT while it runs nothing.
        if let Err(e) = self.workers.interrupt() {
            warn!(error = %e, "cannot send SIGINT to the worker");
        }
    }

    /// A cell that reads stdin without evcxr's input request (a plain `std::io::stdin()` read)
    /// would wait on the worker's command pipe forever. Seen blocked in `read(0, ..)` for
    /// [`STDIN_READ_TICKS`] ticks in a row while it runs the cell (a command in the pipe is
    /// read at once), it is stopped and refused as an input request is.
    pub(super) fn check_stdin_read(&mut self) {
        let running = self.loads.running.as_ref().map(|l| l.cell_id.clone());
        let pid = self.workers.get().map_or(-1, |w| w.pid);
        let reading = rpx_worker::stdin::reading_stdin(pid);
        if running.is_none() && self.call.is_none() {
            // Idle: this is the worker's own read of its commands.
            if reading.is_some() {
                self.worker_read = reading.map(|b| (pid, b));
            }
            return;
        }
        let own = self.worker_read.as_ref().is_some_and(|(p, b)| *p == pid && Some(b) == reading.as_ref());
        let Some(cell) = self.current.as_mut() else { return };
        if cell.stdin_refused.is_some() || running.as_deref() != Some(cell.id()) || reading.is_none() || own {
            cell.stdin_reads_seen = 0;
            return;
        }
        cell.stdin_reads_seen += 1;
        if cell.stdin_reads_seen >= STDIN_READ_TICKS {
            warn!("the running cell reads stdin; engines cannot give it input");
            cell.stdin_refused = Some(String::new());
            self.interrupt();
        }
    }

    /// Follow an interrupt: poke the worker again, or kill it when the grace period is over.
    pub(super) async fn follow_interrupt(&mut self) {
        let (loading, call) = (&self.loads.running, &self.call);
        let running = |target: &str| {
            loading.as_ref().is_some_and(|l| l.cell_id == target) || call.as_ref().is_some_and(|c| c.running && c.id() == target)
        };
        match self.supervisor.follow(Instant::now(), running) {
            InterruptStep::Quiet => {}
            InterruptStep::Poke => {
                let _ = self.workers.interrupt();
            }
            InterruptStep::Kill(status) => {
                warn!(grace = ?INTERRUPT_GRACE, "the interrupted code did not stop; killing the worker");
                self.restart_worker(&status).await;
            }
        }
    }
}
