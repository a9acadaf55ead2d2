//! Messages between thin engines and the shared compiler (`rpx-compiler`).
//!
//! They travel as signed messages (the same framing as the rest of the cluster) over a DEALER in
//! each engine (identity = engine uuid) and a ROUTER in the compiler. The `msg_type` names the
//! struct below; the content is the struct as JSON.
//!
//! A cell's life: the engine sends [`CellRequest`]; the compiler batches identical requests from
//! engines with the same history, compiles once, and sends each engine one or more [`Load`]s
//! (evcxr may retry a cell after a type change); the engine runs each artifact in its worker and
//! answers [`LoadDone`]; finally the compiler sends [`CellReply`] with the cell's verdict.

use serde::{Deserialize, Serialize};

/// `engine_hello`: an engine introduces itself after registering with the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineHello {
    pub engine_id: u64,
    pub uuid: String,
    pub pid: u32,
}

/// `cell_request`: compile `code` and run it on the sending engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellRequest {
    /// The engine's id for this cell (the execute_request's msg_id).
    pub cell_id: String,
    pub code: String,
}

/// `load`: run a compiled artifact in the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub cell_id: String,
    /// Artifact path on this host; never reused for another artifact.
    pub so_path: String,
    pub fn_name: String,
}

/// How one load ended in an engine's worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LoadOutcome {
    /// The function returned. `panicked` when user code panicked (caught), `error_occurred` when
    /// a `?` returned an error, `changed_types` when stored variables changed type.
    Complete { panicked: bool, error_occurred: bool, changed_types: Vec<String> },
    /// The worker died (abort, segfault, exit); it has been restarted with no variables.
    Died { status: String },
    /// The engine did not run the artifact (for example it was told to skip it).
    Skipped { reason: String },
}

/// `load_done`: the engine's answer to a [`Load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadDone {
    pub cell_id: String,
    pub outcome: LoadOutcome,
}

/// `cell_reply`: the verdict for a cell on one engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellReply {
    pub cell_id: String,
    /// `ok` or `error`.
    pub status: String,
    /// For errors: `CompileError`, `Panic`, `EngineDied`, `OutOfSync`, `CompilerError`.
    #[serde(default)]
    pub ename: String,
    #[serde(default)]
    pub evalue: String,
    #[serde(default)]
    pub traceback: Vec<String>,
    /// Text to show on the engine's stderr after the cell, e.g. which variables were not kept.
    #[serde(default)]
    pub note: Option<String>,
}

/// `worker_restarted`: the engine's worker was restarted outside a cell; its variables are gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRestarted {
    pub engine_id: u64,
}

/// `closure_request`: compile a closure into a callable function (once per cluster; the
/// compiler caches by the generated source, so this is cheap for a known closure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosureRequest {
    /// The engine's id for this request, echoed in the reply.
    pub request_id: String,
    pub closure: crate::apply::Closure,
}

/// `closure_reply`: where the compiled closure is, or why it did not compile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosureReply {
    pub request_id: String,
    /// `ok` or `error`.
    pub status: String,
    /// Artifact exporting `fn_name` with the `rpx_runtime::abi` signature (status `ok`).
    #[serde(default)]
    pub so_path: String,
    #[serde(default)]
    pub fn_name: String,
    /// For errors: `CompileError` or `CompilerError`.
    #[serde(default)]
    pub ename: String,
    #[serde(default)]
    pub evalue: String,
    #[serde(default)]
    pub traceback: Vec<String>,
}

/// Message type names.
pub mod msg_type {
    pub const ENGINE_HELLO: &str = "engine_hello";
    pub const ENGINE_HELLO_REPLY: &str = "engine_hello_reply";
    pub const CELL_REQUEST: &str = "cell_request";
    pub const LOAD: &str = "load";
    pub const LOAD_DONE: &str = "load_done";
    pub const CELL_REPLY: &str = "cell_reply";
    pub const WORKER_RESTARTED: &str = "worker_restarted";
    pub const CLOSURE_REQUEST: &str = "closure_request";
    pub const CLOSURE_REPLY: &str = "closure_reply";
}
