//! The engine loop's side of the controller link: eviction notices on the registration socket,
//! registering again over new sockets, and the compiler once it is ready (its runtime
//! libraries name the worker command).

use std::time::{Duration, Instant};

use rpx_protocol::registration::{msg_type as reg_msg, EvictionNotice};
use tracing::{debug, error, info, warn};

use super::{silence_limit, Engine, REJOIN_ATTEMPT};
use crate::artifacts::Fetcher;
use crate::child::WorkerCommand;
use crate::net::{CompilerLink, Frames, Rejoined, Tasks};
use crate::{link, net};

impl Engine {
    /// A message on the registration socket: an eviction notice ends the current
    /// registration (the controller is alive), so the engine registers again.
    pub(super) fn on_registration_message(&mut self, frames: Frames) {
        let m = match self.session.decode(frames) {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "bad message on the registration socket dropped"),
        };
        if m.msg_type() != reg_msg::EVICTION_NOTICE {
            return debug!(msg_type = m.msg_type(), "unexpected message on the registration socket");
        }
        let notice: EvictionNotice = match serde_json::from_value(m.content) {
            Ok(n) => n,
            Err(e) => return warn!(error = %e, "malformed eviction notice dropped"),
        };
        if !self.controller.link.notice_applies(&notice, &self.me.uuid) {
            return debug!(registration = %notice.registration, "eviction notice for an earlier registration ignored");
        }
        let dropped = self.queue.drop_answered(&notice.answered);
        let running = [self.current.as_ref().map(|c| c.id().to_string()), self.call.as_ref().map(|c| c.id().to_string())];
        let running_answered = running.iter().flatten().find(|id| notice.answered.contains(id));
        warn!(
            engine_id = notice.id,
            reason = %notice.reason,
            answered = notice.answered.len(),
            dropped = dropped.len(),
            running_answered = ?running_answered,
            "the controller evicted this engine; registering again (the worker and its variables are kept; requests it answered meanwhile will not run)"
        );
        self.controller.link.lost(&format!("evicted by the controller ({})", notice.reason), notice.reconnect, Instant::now());
        self.step_link();
    }

    /// Advance the link: start an attempt to register again, or give up and exit.
    pub(super) fn step_link(&mut self) {
        let now = Instant::now();
        let c = &mut self.controller;
        match c.link.tick(now, c.pings.count()) {
            link::Step::Quiet => {}
            link::Step::Attempt { rebuild } => {
                if rebuild {
                    // The old sockets are no good: close them before new ones connect.
                    c.sock_tasks = Tasks::default();
                    c.sock_generation = 0;
                }
                let limit = REJOIN_ATTEMPT.min(c.link.time_left(now)).max(Duration::from_millis(200));
                debug!(rebuild, ?limit, "registering with the controller again");
                tokio::spawn(net::rejoin(
                    c.source.clone(),
                    self.username.clone(),
                    self.me.uuid.clone(),
                    self.me.id,
                    rebuild,
                    limit,
                    self.inbound_tx.clone(),
                ));
            }
            link::Step::GiveUp(msg) => {
                error!("{msg}");
                self.exit_code = Some(1);
            }
        }
    }

    /// The outcome of an attempt to register again.
    pub(super) fn on_rejoined(&mut self, outcome: std::result::Result<Rejoined, String>) {
        let now = Instant::now();
        let r = match outcome {
            Ok(r) => r,
            Err(why) => {
                let left = self.controller.link.time_left(now);
                info!(%why, left_s = left.as_secs(), "registering again failed; retrying");
                self.controller.link.attempt_failed(now);
                return;
            }
        };
        let Rejoined { conn, session, registration, sockets } = r;
        let (down_for, why) =
            self.controller.link.down_since().map(|(t, w)| (now.saturating_duration_since(t), w.to_string())).unwrap_or_default();
        if registration.id != self.me.id {
            warn!(old = self.me.id, new = registration.id, "registered again under a new engine id: the old one is held by another engine");
            self.me.id = registration.id;
            self.out.set_identity(self.me.clone());
        }
        let c = &mut self.controller;
        if conn.key != c.key {
            info!("the controller's key changed; signing with the new one");
            c.key = conn.key.clone();
            self.session = session.clone();
            self.out.set_session(session);
        }
        self.out.outlets.registration = registration.outlet;
        c.reg_generation = registration.generation;
        c.reg_tasks = registration.tasks;
        if let Some(s) = sockets {
            let o = &mut self.out.outlets;
            (o.mux, o.task, o.control, o.iopub, o.broadcast) = (s.mux, s.task, s.control, s.iopub, None);
            c.sock_generation = s.generation;
            c.pings = s.pings;
            c.sock_tasks = s.tasks;
        }
        c.link.silence_limit = silence_limit(registration.hb_period);
        c.link.joined(registration.request, now);
        info!(engine_id = self.me.id, down_s = down_for.as_secs_f64(), %why, "registered with the controller again; the worker and its variables were kept");
    }

    pub(super) async fn on_compiler_ready(&mut self, link: CompilerLink) {
        self.fetcher = Fetcher::for_compiler(&link.hello.probe);
        info!(url = %link.url, same_host = self.fetcher.same_host(), cache = ?self.fetcher.cache_dir(), "compiler ready");
        let fresh_worker = self.workers.get().is_none();
        let kept = link.hello.history_restored && self.history_sent;
        let libs_changed = self.command_libs.as_ref().is_some_and(|old| *old != link.hello.runtime_libs);
        self.runtime_libs = Some(link.hello.runtime_libs.clone());
        self.compiler.connected(link, Instant::now());
        if libs_changed || !self.workers.has_command() {
            // The worker command waits for this compiler's runtime libraries.
            self.workers.set_command(None);
        } else {
            // Same libraries: the worker command stands.
            self.runtime_libs = None;
        }
        if !fresh_worker {
            if kept && !libs_changed {
                info!("the new compiler rebuilt this worker's context; variables kept");
            } else {
                // A new compiler that could not take the worker's history knows nothing of its
                // variables.
                self.restart_worker("killed by a new compiler connected (variables lost)").await;
            }
        }
        self.progress().await;
    }

    pub(super) fn set_worker_cmd(&mut self, libdirs: Vec<String>) {
        match WorkerCommand::for_engine(&libdirs, self.me.id, &self.ns_dir) {
            Ok(c) => self.workers.set_command(Some(c)),
            Err(e) => error!(error = %e, "cannot locate the ipengine binary to start workers"),
        }
    }
}
