//! The clock, the compiler, artifacts: the periodic tick (flushes, heartbeat and compiler
//! silence, interrupts), a compiler that is gone, artifact fetches, progress, and shutdown.

use std::time::{Duration, Instant};

use rpx_protocol::compile::{msg_type as cmsg, ArtifactRequest};
use serde_json::json;
use tracing::{debug, error, info};

use super::Engine;
use crate::artifacts::{RuntimeStep, Step};
use crate::call::Call;
use crate::liveness::Watch;
use crate::outbox::Stream;
use crate::reply::EngineError;

impl Engine {
    pub(super) async fn on_tick(&mut self) {
        self.follow_interrupt().await;
        self.check_stdin_read();
        if let Some(t) = self.parser.take_partial_text() {
            if let Some(t) = self.hold_for_piped(Stream::Stdout, &t) {
                self.out.append(Stream::Stdout, t);
            }
        }
        if let Some(t) = self.stderr_marks.take_held() {
            self.on_stderr_text(&t);
        }
        self.out.flush_if_due(Instant::now());
        self.spares.expire(Instant::now());
        self.maybe_finish();
        for (sha, step) in self.fetcher.poll(Instant::now()) {
            match step {
                Step::Request(sha) => self.request_artifact(sha),
                _ => debug!(sha256 = %sha, "artifact settled by another engine of this host"),
            }
        }
        self.progress().await;
        // A compiler that died, froze or lost its host never answers what waits on it.
        let waiting = self.current.as_ref().is_some_and(|c| c.reply.is_none())
            || self.call.as_ref().is_some_and(Call::waiting)
            || self.fetcher.busy();
        match self.compiler.check(Instant::now(), waiting) {
            Watch::Quiet => {}
            Watch::Ping => {
                self.to_compiler(cmsg::PING, json!({}));
            }
            Watch::Gone(silent) => self.compiler_gone(format!("it answered nothing for {} s", silent.as_secs())),
        }
        if let Some(why) = self.compiler.absent() {
            if self.fail_what_waits_on_compiler(EngineError::compiler_died(why), EngineError::compiler_died("it stopped answering")) {
                self.spawn_reconnect();
            }
        }
    }

    /// The compiler is gone (`why`): what waits on it fails now, and a new one is looked for.
    pub(super) fn compiler_gone(&mut self, why: String) {
        let Some(url) = self.compiler.gone(&why) else { return };
        error!(%url, %why, "the compiler is gone");
        self.fetcher.abort_all(&why);
        self.spawn_reconnect();
        let died = EngineError::compiler_died(&why);
        self.fail_what_waits_on_compiler(died.clone(), died);
    }

    pub(super) fn request_artifact(&mut self, sha256: String) {
        debug!(%sha256, "fetching an artifact from the compiler");
        if !self.to_compiler(cmsg::ARTIFACT_REQUEST, ArtifactRequest { sha256: sha256.clone() }) {
            self.fetcher.abort_all("no compiler connected");
        }
    }

    /// Move on with whatever waited for artifacts: the worker command (runtime libraries), the
    /// next load, the waiting call.
    pub(super) async fn progress(&mut self) {
        if let Some(libs) = self.runtime_libs.as_ref().filter(|_| !self.workers.has_command()) {
            match self.fetcher.runtime_dirs(libs, Instant::now()) {
                RuntimeStep::Request(sha) => return self.request_artifact(sha),
                RuntimeStep::Wait => return,
                RuntimeStep::Ready(dirs) => {
                    info!(?dirs, "runtime libraries ready");
                    self.command_libs = self.runtime_libs.take();
                    self.set_worker_cmd(dirs);
                    self.ensure_worker();
                }
            }
        }
        self.run_next_load().await;
        if self.call.as_ref().is_some_and(Call::waiting) {
            self.run_call().await;
        }
        self.maybe_finish();
    }

    /// Unregister, stop the worker and let queued messages go out.
    pub(super) async fn shutdown(&mut self, code: i32) -> i32 {
        self.out.flush_streams();
        if let Some(mut w) = self.workers.take() {
            w.kill();
        }
        let _ = std::fs::remove_dir_all(&self.ns_dir);
        self.out.unregister();
        // Sends are queued: give them a moment to leave.
        tokio::time::sleep(Duration::from_millis(200)).await;
        info!(code, "engine stopped");
        code
    }
}
