//! Closure calls (`apply` and `map` of Rust closures): the call in progress, the closures this
//! engine has had compiled, what a `closure_reply` means for the waiting call, and how the
//! worker's result status becomes the reply or an error.
//!
//! Pure: the engine loop sends the `closure_request`, writes the call to the worker and
//! answers the request with what these functions decide. Calls of a closure the worker already
//! runs are written to it ahead of time ([`PIPE_DEPTH`]); each is answered once its result and
//! the worker's end-of-call markers on stdout and stderr are in ([`Call::settled`]), so its
//! output is exactly what the worker wrote before those markers.

use std::collections::HashMap;

use rpx_protocol::apply::{ename, ClosureId, ClosureRef};
use rpx_protocol::compile::{Artifact, ClosureReply, ClosureRequest};
use rpx_protocol::content::{ErrorName, ReplyMetadata};
use rpx_runtime::abi;

use crate::queue::Request;
use crate::reply::EngineError;

/// How many calls the engine hands the worker ahead of the one whose output it is publishing.
/// Each saves the worker a wait for the engine between two calls; they are started when
/// written, so an abort no longer reaches them. Measured with `bench_ops` (10,000 trivial
/// tasks on 2 engines, tasks/s per run): 1 ahead 21k (no gain); 2 ahead 23-26k; 4 ahead
/// 26-27k; 8 ahead 24-28k. 4 keeps nearly all the gain with few calls past an abort.
pub const PIPE_DEPTH: usize = 4;

/// A closure call (apply or map) in progress.
#[derive(Debug)]
pub struct Call {
    pub req: Request,
    /// Reply metadata, started when the call started.
    pub md: ReplyMetadata,
    /// `rpx_runtime::abi::MODE_APPLY` or `MODE_MAP`.
    pub mode: u32,
    /// The closure as the request named it: by id, with its code on its first calls.
    pub closure: ClosureRef,
    /// Set once the worker was asked to run it.
    pub running: bool,
    /// SIGINT arrived while the closure was being compiled: it is not run.
    pub interrupt_requested: bool,
    /// What the worker answered, once it has.
    pub result: Option<Result<Vec<u8>, EngineError>>,
    /// The call's output on stdout / on stderr is all in: the worker's end-of-call marker was
    /// seen there, or its result said none follows (the stream was read to its end).
    pub stdout_done: bool,
    pub stderr_done: bool,
    /// Output the worker wrote for this call while an earlier one was still being answered:
    /// published when this call's turn comes.
    pub held_stdout: String,
    pub held_stderr: String,
}

/// What to do with a call the worker has not been asked to run yet.
#[derive(Debug, Clone, PartialEq)]
pub enum CallStep {
    /// Answer it with this error: SIGINT arrived before it ran.
    Interrupted(EngineError),
    /// Its closure is being compiled: wait for the `closure_reply`.
    Compiling,
    /// Load this artifact and call this symbol.
    Run { artifact: Artifact, func: String },
}

/// What a `closure_reply` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ClosureVerdict {
    /// No call waits for it: dropped.
    Dropped,
    /// The closure compiled; the waiting call can run.
    Compiled,
    /// The closure did not compile: answer the waiting call with this error.
    Failed(EngineError),
}

/// Refuse a call without its argument buffer.
pub fn check_arguments(req: &Request) -> Result<(), EngineError> {
    if req.buffers.is_empty() {
        return Err(EngineError::new(ename::UNSUPPORTED_PAYLOAD, "the call has no argument buffer", vec![]));
    }
    Ok(())
}

impl Call {
    pub fn new(req: Request, md: ReplyMetadata, mode: u32, closure: ClosureRef) -> Call {
        Call {
            req,
            md,
            mode,
            closure,
            running: false,
            interrupt_requested: false,
            result: None,
            stdout_done: false,
            stderr_done: false,
            held_stdout: String::new(),
            held_stderr: String::new(),
        }
    }

    /// Handed to the worker, and its result and all its output are in: it can be answered.
    pub fn settled(&self) -> bool {
        self.running && self.result.is_some() && self.stdout_done && self.stderr_done
    }

    /// The call id: its request's msg id.
    pub fn id(&self) -> &str {
        self.req.msg_id()
    }

    /// Still waiting (for its closure's compile, an artifact or the runtime libraries), not
    /// handed to the worker yet.
    pub fn waiting(&self) -> bool {
        !self.running
    }

    /// What the compiler is asked when this engine has not had the closure compiled yet: the
    /// closure as the call named it (by id alone once the client has seen it compile).
    pub fn closure_request(&self) -> ClosureRequest {
        ClosureRequest { request_id: self.id().to_string(), closure: self.closure.clone() }
    }

    /// What to do now with this call, given the closures compiled so far.
    pub fn next_step(&self, closures: &Closures) -> CallStep {
        if self.interrupt_requested {
            return CallStep::Interrupted(EngineError::interrupted("call", true));
        }
        match closures.0.get(&self.closure.id) {
            Some((artifact, func)) => CallStep::Run { artifact: artifact.clone(), func: func.clone() },
            None => CallStep::Compiling,
        }
    }
}

/// The closures compiled for this engine, by id: artifact and symbol of each (compiled once,
/// called any number of times, named by id or with their code).
#[derive(Debug, Default)]
pub struct Closures(HashMap<ClosureId, (Artifact, String)>);

impl Closures {
    pub fn knows(&self, id: &ClosureId) -> bool {
        self.0.contains_key(id)
    }

    /// The artifact and symbol of a compiled closure.
    pub fn compiled(&self, id: &ClosureId) -> Option<(Artifact, String)> {
        self.0.get(id).cloned()
    }

    /// The compiler's `closure_reply` `r`: it concerns `call` if that call waits and has the
    /// reply's id. A compiled closure is remembered.
    pub fn on_reply(&mut self, call: Option<&Call>, r: ClosureReply) -> ClosureVerdict {
        let Some(call) = call.filter(|c| c.waiting() && c.id() == r.request_id) else { return ClosureVerdict::Dropped };
        match (r.status == "ok", r.artifact) {
            (true, Some(artifact)) => {
                self.0.insert(call.closure.id.clone(), (artifact, r.fn_name));
                ClosureVerdict::Compiled
            }
            _ => {
                let ename = if r.error.ename.as_str().is_empty() { ename::COMPILE_ERROR } else { r.error.ename };
                ClosureVerdict::Failed(EngineError::new(ename, r.error.evalue, r.error.traceback))
            }
        }
    }
}

/// The worker's result for the running call (an `rpx_runtime::abi` status and the bytes it
/// wrote): the output to send back, or the error the call ends with.
pub fn outcome(status: u32, data: Vec<u8>) -> Result<Vec<u8>, EngineError> {
    let text = || String::from_utf8_lossy(&data).into_owned();
    match status {
        abi::STATUS_OK => Ok(data),
        abi::STATUS_PANIC => Err(EngineError::panic(&text(), vec![])),
        abi::STATUS_BAD_INPUT => Err(EngineError::new(ename::UNSUPPORTED_PAYLOAD, text(), vec![])),
        rpx_worker::process::STATUS_INTERRUPTED => Err(EngineError::interrupted("call", false)),
        _ => Err(EngineError::new(ErrorName::CompilerError, text(), vec![])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpx_protocol::content::ErrorContent;
    use serde_json::json;

    fn closure(src: &str) -> ClosureRef {
        ClosureRef::with_code(rpx_protocol::apply::Closure { source: src.into(), arg_types: vec!["u64".into()] })
    }

    fn call_of(id: &str, closure: ClosureRef) -> Call {
        let mut req = Request::for_test(id, "apply_request", json!({}));
        req.buffers = vec![bytes::Bytes::from_static(b"\x01")];
        Call::new(req, ReplyMetadata::start(&json!({}), "u", String::new()), abi::MODE_APPLY, closure)
    }

    fn call(id: &str, src: &str) -> Call {
        call_of(id, closure(src))
    }

    fn artifact() -> Artifact {
        Artifact { path: "/tmp/c.so".into(), sha256: "ab".repeat(32), size: 10 }
    }

    fn ok_reply(id: &str) -> ClosureReply {
        ClosureReply {
            request_id: id.into(),
            status: "ok".into(),
            artifact: Some(artifact()),
            fn_name: "rpx_closure_1".into(),
            error: Default::default(),
        }
    }

    fn error_reply(id: &str, ename: &str) -> ClosureReply {
        ClosureReply {
            status: "error".into(),
            artifact: None,
            fn_name: String::new(),
            error: ErrorContent::bare(ename, "mismatched types", vec![]),
            ..ok_reply(id)
        }
    }

    #[test]
    fn a_call_without_its_argument_buffer_is_refused() {
        let mut c = call("a", "|x: u64| x");
        assert_eq!(check_arguments(&c.req), Ok(()));
        c.req.buffers.clear();
        let e = check_arguments(&c.req).unwrap_err();
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("UnsupportedPayload", "the call has no argument buffer"));
    }

    #[test]
    fn a_call_waits_for_its_closure_to_compile_then_runs_the_compiled_symbol() {
        let mut closures = Closures::default();
        let c = call("a", "|x: u64| x * 2");
        assert_eq!(c.closure_request(), ClosureRequest { request_id: "a".into(), closure: closure("|x: u64| x * 2") });
        assert_eq!(c.next_step(&closures), CallStep::Compiling);
        assert_eq!(closures.on_reply(Some(&c), ok_reply("a")), ClosureVerdict::Compiled);
        assert_eq!(c.next_step(&closures), CallStep::Run { artifact: artifact(), func: "rpx_closure_1".into() });
    }

    #[test]
    fn a_closure_compiled_once_is_not_compiled_again_for_the_next_call() {
        let mut closures = Closures::default();
        let first = call("a", "|x: u64| x + 1");
        closures.on_reply(Some(&first), ok_reply("a"));
        let second = call("b", "|x: u64| x + 1");
        assert!(closures.knows(&second.closure.id));
        assert!(matches!(second.next_step(&closures), CallStep::Run { .. }));
        assert!(!closures.knows(&closure("|x: u64| x + 2").id));
        // Later calls name it by id alone: the same compiled symbol runs.
        let by_id = call_of("c", ClosureRef::by_id(first.closure.id.clone()));
        assert_eq!(by_id.next_step(&closures), CallStep::Run { artifact: artifact(), func: "rpx_closure_1".into() });
    }

    #[test]
    fn a_call_by_an_id_this_engine_never_compiled_asks_the_compiler_by_id() {
        let mut closures = Closures::default();
        let id = closure("|x: u64| x + 5").id;
        let c = call_of("a", ClosureRef::by_id(id.clone()));
        assert_eq!(c.next_step(&closures), CallStep::Compiling);
        assert_eq!(c.closure_request().closure, ClosureRef::by_id(id.clone()), "the id alone: the compiler has the code");
        assert_eq!(closures.on_reply(Some(&c), ok_reply("a")), ClosureVerdict::Compiled);
        assert!(closures.knows(&id));

        // A compiler that does not know the id (it restarted): the call fails with the name the
        // client answers by sending the code again.
        let d = call_of("b", ClosureRef::by_id(closure("|x: u64| x + 6").id));
        let ClosureVerdict::Failed(e) = closures.on_reply(Some(&d), error_reply("b", "UnknownClosure")) else { panic!("failed") };
        assert_eq!(e.ename, ename::UNKNOWN_CLOSURE);
        assert!(!closures.knows(&d.closure.id));
    }

    #[test]
    fn a_call_interrupted_while_its_closure_compiled_is_answered_interrupted_before_it_ran() {
        let mut closures = Closures::default();
        let mut c = call("a", "|x: u64| x");
        closures.on_reply(Some(&c), ok_reply("a"));
        c.interrupt_requested = true;
        let CallStep::Interrupted(e) = c.next_step(&closures) else { panic!("not run") };
        assert_eq!(e.ename, "KeyboardInterrupt");
        assert_eq!(e.evalue, "the call was interrupted (SIGINT) before it ran; the engine kept its variables");
    }

    #[test]
    fn a_closure_that_does_not_compile_fails_its_call_with_the_compilers_error() {
        let mut closures = Closures::default();
        let c = call("a", "|x: u64| x.nope()");
        let ClosureVerdict::Failed(e) = closures.on_reply(Some(&c), error_reply("a", "")) else { panic!("failed") };
        assert_eq!((e.ename.as_str(), e.evalue.as_str()), ("CompileError", "mismatched types"), "unnamed errors are compile errors");
        let ClosureVerdict::Failed(e) = closures.on_reply(Some(&c), error_reply("a", "CompilerError")) else { panic!("failed") };
        assert_eq!(e.ename, "CompilerError");
        // `ok` without an artifact cannot run either.
        let no_artifact = ClosureReply { artifact: None, ..ok_reply("a") };
        assert!(matches!(closures.on_reply(Some(&c), no_artifact), ClosureVerdict::Failed(_)));
        assert!(!closures.knows(&c.closure.id));
    }

    #[test]
    fn a_closure_reply_nobody_waits_for_is_dropped() {
        let mut closures = Closures::default();
        assert_eq!(closures.on_reply(None, ok_reply("a")), ClosureVerdict::Dropped);
        let mut c = call("a", "|x: u64| x");
        assert_eq!(closures.on_reply(Some(&c), ok_reply("other")), ClosureVerdict::Dropped);
        c.running = true;
        assert_eq!(closures.on_reply(Some(&c), ok_reply("a")), ClosureVerdict::Dropped);
        assert!(!closures.knows(&c.closure.id), "nothing was remembered");
    }

    #[test]
    fn a_call_is_answered_once_its_result_and_both_end_markers_are_in() {
        let mut c = call("a", "|x: u64| x");
        c.result = Some(Ok(vec![1]));
        (c.stdout_done, c.stderr_done) = (true, true);
        assert!(!c.settled(), "not handed to the worker yet");
        c.running = true;
        assert!(c.settled());
        for unset in 0..3 {
            let mut d = call("b", "|x: u64| x");
            d.running = true;
            d.result = (unset != 0).then(|| Ok(vec![]));
            (d.stdout_done, d.stderr_done) = (unset != 1, unset != 2);
            assert!(!d.settled(), "missing piece {unset}: its output may still be on its way");
        }
    }

    #[test]
    fn the_workers_result_status_becomes_the_reply_or_an_error() {
        assert_eq!(outcome(abi::STATUS_OK, vec![1, 2]), Ok(vec![1, 2]));
        let panic = outcome(abi::STATUS_PANIC, b"index out of bounds".to_vec()).unwrap_err();
        assert_eq!((panic.ename.as_str(), panic.evalue.as_str()), ("Panic", "index out of bounds"));
        assert_eq!(outcome(abi::STATUS_PANIC, vec![]).unwrap_err().evalue, "the cell panicked");
        let bad = outcome(abi::STATUS_BAD_INPUT, b"cannot decode the arguments".to_vec()).unwrap_err();
        assert_eq!((bad.ename.as_str(), bad.evalue.as_str()), ("UnsupportedPayload", "cannot decode the arguments"));
        let int = outcome(rpx_worker::process::STATUS_INTERRUPTED, vec![]).unwrap_err();
        assert_eq!(
            (int.ename.as_str(), int.evalue.as_str()),
            ("KeyboardInterrupt", "the call was interrupted (SIGINT); the engine kept its variables")
        );
        let load = outcome(rpx_worker::process::STATUS_LOAD_FAILED, b"cannot open c.so".to_vec()).unwrap_err();
        assert_eq!((load.ename.as_str(), load.evalue.as_str()), ("CompilerError", "cannot open c.so"));
    }
}
