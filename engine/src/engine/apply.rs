//! rpx apply payloads: push, pull, and closure calls (waiting for the compiler, run in the
//! worker, answered).

use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::apply::{ename, ClosureRef, Op, PullFiles};
use rpx_protocol::compile::msg_type as cmsg;
use rpx_protocol::content::ReplyMetadata;
use rpx_runtime::abi;
use serde_json::json;
use tracing::{debug, info, warn};

use super::Engine;
use crate::artifacts::{Kind, Step};
use crate::call::{Call, CallStep, ClosureVerdict};
use crate::cell::{PullPlan, Purpose};
use crate::child::WriteFailed;
use crate::compiler::CompilerMessage;
use crate::net::Frames;
use crate::queue::Request;
use crate::reply::EngineError;
use crate::{call, net, reply, Result};

impl Engine {
    pub(super) async fn start_apply(&mut self, req: Request) {
        let md = reply::init_metadata(&req.metadata, &self.me);
        let op = match reply::apply_op(&req.content, &self.me) {
            Ok(op) => op,
            Err(err) => return self.out.apply_error(&req, md, &err),
        };
        match op {
            Op::Push { names, files } if !files.is_empty() => {
                // The values are in the namespace already: written by a client on this host, or
                // by the data link for a client on another.
                let adopted = if req.buffers.is_empty() {
                    crate::namespace::adopt(&self.ns_dir, &names, &files, &mut self.digests, crate::datalink::received)
                } else {
                    crate::namespace::discard(&self.ns_dir, &files);
                    Err("a push with files must carry no buffers".into())
                };
                match adopted {
                    Ok(replaced) => {
                        for n in names {
                            self.bindings.pushed(n.name, n.type_name);
                        }
                        // Spares first, so that the reply can name them (a same-host client maps
                        // one ahead of its next push); what is freed is freed after the reply.
                        let removing = self.spares.retire(&self.ns_dir, replaced, Instant::now());
                        let spares = self.spares.listed();
                        if spares.is_empty() {
                            self.out.ok(&req, md, &[]);
                        } else {
                            self.out.ok_with(&req, md, rpx_protocol::dataplane::REPLY_SPARES_KEY, json!(spares));
                        }
                        crate::namespace::remove_later(removing);
                    }
                    Err(e) => self.out.apply_error(&req, md, &EngineError::new(ename::UNSUPPORTED_PAYLOAD, e, vec![])),
                }
            }
            Op::Push { names, .. } => match crate::namespace::store(&self.ns_dir, &names, &req.buffers) {
                Ok(()) => {
                    for n in names {
                        self.bindings.pushed(n.name, n.type_name);
                    }
                    self.out.ok(&req, md, &[]);
                }
                Err(e) => self.out.apply_error(&req, md, &EngineError::new(ename::UNSUPPORTED_PAYLOAD, e, vec![])),
            },
            Op::Pull { names, .. } => match self.bindings.plan_pull(&names, self.compiler.absent().is_some()) {
                PullPlan::Refuse(err) => self.out.apply_error(&req, md, &err),
                PullPlan::FromFiles => self.finish_pull(&req, md, &names),
                PullPlan::NoCompiler => {
                    self.spawn_reconnect();
                    self.out.apply_error(&req, md, &EngineError::no_compiler());
                }
                // The variables live in the worker: a small cell writes them to the namespace.
                PullPlan::WriteOut(stale) => self.start_cell(req, crate::namespace::put_cell(&stale), true, Purpose::Pull(names)),
            },
            Op::Apply { closure } => self.start_call(req, md, abi::MODE_APPLY, closure).await,
            Op::Map { closure } => self.start_call(req, md, abi::MODE_MAP, closure).await,
        }
    }

    /// Answer a request aborted before it ran (a same-host push's files are removed).
    pub(super) fn aborted(&self, req: &Request) {
        if let Some(Ok(Op::Push { files, .. })) = Op::from_content(&req.content) {
            crate::namespace::discard(&self.ns_dir, &files);
        }
        self.out.aborted(req);
    }

    pub(super) fn finish_pull(&mut self, req: &Request, md: ReplyMetadata, names: &[String]) {
        if let Some(Ok(Op::Pull { files: Some(reader), .. })) = Op::from_content(&req.content) {
            // Hard links the client reads (same host) or fetches (data link), not the bytes.
            return match crate::namespace::export(&self.ns_dir, names, reader.integrity(), &self.digests) {
                Ok(files) => {
                    if reader == PullFiles::DataLink {
                        crate::datalink::offer(&files);
                    }
                    self.out.ok_with(req, md, rpx_protocol::dataplane::REPLY_FILES_KEY, json!(files))
                }
                Err(e) => self.out.apply_error(req, md, &EngineError::new(ename::NAME_ERROR, e, vec![])),
            };
        }
        match crate::namespace::load(&self.ns_dir, names) {
            Ok(buffers) => self.out.ok(req, md, &buffers),
            Err(e) => self.out.apply_error(req, md, &EngineError::new(ename::NAME_ERROR, e, vec![])),
        }
    }

    pub(super) async fn start_call(&mut self, req: Request, md: ReplyMetadata, mode: u32, closure: ClosureRef) {
        if let Err(err) = call::check_arguments(&req) {
            return self.out.apply_error(&req, md, &err);
        }
        self.out.flush_streams();
        self.out.set_stream_parent(req.header.clone());
        self.stderr_tail.clear();
        let call = Call::new(req, md, mode, closure);
        let compiled = self.closures.knows(&call.closure.id);
        let request = call.closure_request();
        self.call = Some(call);
        if compiled {
            return self.run_call().await;
        }
        // The first call of this closure here: the compiler compiles it (once per cluster), or
        // has it already if the call names it by id.
        if !self.to_compiler(cmsg::CLOSURE_REQUEST, request) {
            self.spawn_reconnect();
            let call = self.call.take().expect("set");
            self.out.apply_error(&call.req, call.md, &EngineError::no_compiler());
        }
    }

    /// Hand the current call to the worker.
    pub(super) async fn run_call(&mut self) {
        let Some(call) = &self.call else { return };
        let (artifact, func) = match call.next_step(&self.closures) {
            CallStep::Interrupted(err) => return self.finish_call(Err(err)),
            CallStep::Compiling => return,
            CallStep::Run { artifact, func } => (artifact, func),
        };
        if self.runtime_pending() {
            return;
        }
        let so = match self.fetcher.want(&artifact, Kind::Code, Instant::now()) {
            Step::Ready(path) => path.display().to_string(),
            Step::Request(sha) => return self.request_artifact(sha),
            Step::Wait => return,
            Step::Failed(why) => return self.finish_call(Err(EngineError::new(ename::ARTIFACT_ERROR, why, vec![]))),
        };
        let Some(call) = &mut self.call else { return };
        call.running = true;
        self.ensure_worker();
        let Some(call) = &self.call else { return };
        match self.workers.send_call(&so, &func, call.mode, &call.req.buffers[0]).await {
            Ok(()) => {}
            Err(WriteFailed::NoWorker(e)) => self.finish_call(Err(EngineError::worker_died(&self.me, &format!("not run: {e}"), vec![]))),
            // The worker is dying; its exit event fails the call.
            Err(WriteFailed::Dying(e)) => warn!(error = %e, "cannot write to the worker"),
        }
    }

    /// Answer the current call with its output bytes or an error.
    pub(super) fn finish_call(&mut self, outcome: Result<Vec<u8>, EngineError>) {
        let Some(call) = self.call.take() else { return };
        self.out.flush_streams();
        match outcome {
            Ok(data) => self.out.ok(&call.req, call.md, &[Bytes::from(data)]),
            // Not the user's error but the client's to mend: it sends the call again with the
            // closure's code, so nothing is published for this one.
            Err(e) if e.ename == ename::UNKNOWN_CLOSURE => {
                info!(msg_id = call.id(), closure = %call.closure.id, "closure id unknown to the compiler; the client sends its code");
                self.out.declined(&call.req, call.md, &e);
            }
            Err(e) => {
                info!(msg_id = call.id(), ename = %e.ename, "call failed");
                self.out.apply_error(&call.req, call.md, &e);
            }
        }
    }

    pub(super) fn spawn_reconnect(&mut self) {
        if !self.compiler.start_attempt() {
            return;
        }
        // A running worker's history lets a new compiler rebuild a context that matches it.
        let history = if self.workers.get().is_some() { self.history.snapshot() } else { Some(Vec::new()) };
        self.history_sent = history.is_some();
        tokio::spawn(net::connect_compiler(
            self.compiler_source.clone(),
            self.me.uuid.clone(),
            self.me.id,
            self.username.clone(),
            Duration::from_secs(30),
            history.unwrap_or_default(),
            self.inbound_tx.clone(),
        ));
    }

    pub(super) async fn on_compiler(&mut self, frames: Frames) {
        let Some(msg) = self.compiler.decode(frames, Instant::now()) else { return };
        match msg {
            CompilerMessage::Heard => {}
            CompilerMessage::ArtifactReply(r, bytes) => {
                match self.fetcher.on_reply(&r, bytes.as_deref()) {
                    Some((sha, true)) => {
                        info!(sha256 = %sha, size = r.size, fetched = self.fetcher.fetched, "artifact fetched from the compiler")
                    }
                    Some((sha, false)) => warn!(sha256 = %sha, "artifact refused"),
                    None => debug!(sha256 = %r.sha256, "artifact_reply nobody waits for; dropped"),
                }
                self.progress().await;
            }
            CompilerMessage::Load(load) => {
                debug!(cell_id = %load.cell_id, so = %load.artifact.path, "load");
                self.loads.push(load);
                self.run_next_load().await;
            }
            CompilerMessage::CellReply(r) => match &mut self.current {
                Some(cell) if cell.id() == r.cell_id => {
                    cell.reply = Some(r);
                    self.maybe_finish();
                }
                _ => warn!(cell_id = %r.cell_id, "cell_reply for a cell that is not running; dropped"),
            },
            CompilerMessage::ClosureReply(r) => {
                let request_id = r.request_id.clone();
                match self.closures.on_reply(self.call.as_ref(), r) {
                    ClosureVerdict::Dropped => warn!(%request_id, "closure_reply for a call that is not waiting; dropped"),
                    ClosureVerdict::Compiled => {}
                    ClosureVerdict::Failed(err) => self.finish_call(Err(err)),
                }
                if self.call.as_ref().is_some_and(Call::waiting) {
                    self.run_call().await;
                }
            }
        }
    }
}
