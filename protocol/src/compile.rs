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
//!
//! Compiled code travels by content: every [`Load`] and [`ClosureReply`] names an [`Artifact`]
//! (path on the compiler's host, SHA-256, size) inside the signed content. An engine on the
//! compiler's host loads the path as is; any other engine finds the artifact in its host's cache
//! or asks for it with [`ArtifactRequest`], gets the bytes as the one buffer of an
//! [`ArtifactReply`] and checks them against the hash before anything runs. The runtime libraries
//! that artifacts link (`libstd-*.so`) are named in [`EngineHelloReply`] and travel the same way.
//! While an engine waits on the compiler it sends [`msg_type::PING`]; the compiler answers
//! [`msg_type::PONG`], so liveness comes from the connection, not from a process id.

use serde::{Deserialize, Serialize};

use crate::content::ErrorContent;

/// `engine_hello`: an engine introduces itself after registering with the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineHello {
    pub engine_id: u64,
    pub uuid: String,
    pub pid: u32,
    /// The engine's host name, for the compiler's log and its per-host fetch counts.
    #[serde(default)]
    pub hostname: String,
    /// The cells the engine's running worker has run, in order, when it reconnects to a new
    /// compiler (the old one crashed): the compiler rebuilds a context for it by replaying them,
    /// so the worker and its variables are kept. Empty for a fresh worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryCell>,
}

/// One cell a worker ran: the code the compiler compiled for it and what it did there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryCell {
    pub code: String,
    pub outcome: LoadOutcome,
}

/// A compiled file named by its content.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Artifact {
    /// Path on the compiler's host; never reused for other content.
    pub path: String,
    /// SHA-256 of the file's bytes, lowercase hex (64 characters).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl Artifact {
    /// Is `sha256` a well-formed lowercase hex SHA-256 (safe to use as a file name)?
    pub fn valid_hash(sha256: &str) -> bool {
        sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// A shared library that artifacts link dynamically (the toolchain's `libstd-<hash>.so`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeLib {
    /// The file name the dynamic linker looks for (`libstd-d1237ef7159db0a2.so`).
    pub name: String,
    pub artifact: Artifact,
}

/// A file only processes on the compiler's host can read, and what it holds: an engine that
/// reads `token` at `path` shares the compiler's files and loads artifacts by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbe {
    pub path: String,
    pub token: String,
}

/// `engine_hello_reply`: how this compiler's artifacts reach the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineHelloReply {
    pub probe: HostProbe,
    /// Libraries every worker needs on its library path.
    pub runtime_libs: Vec<RuntimeLib>,
    /// The compiler took the hello's history: the engine keeps its worker and variables.
    /// (Absent from older compilers: the engine starts its worker over.)
    #[serde(default)]
    pub history_restored: bool,
}

/// `artifact_request`: send the artifact with this hash (only artifacts this compiler announced
/// are served).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRequest {
    pub sha256: String,
}

/// `artifact_reply`: the artifact's bytes in the message's one buffer (status `ok`), or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactReply {
    pub sha256: String,
    /// `ok` or `error`.
    pub status: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub evalue: String,
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
    pub artifact: Artifact,
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
    /// For errors, what rpx-compiler sends: `CompileError` (rustc rejected the cell),
    /// `CompilerError` (the engine has not sent `engine_hello`, or the evcxr context failed to
    /// start or failed other than with compile errors) or `EngineWorkerDied` (the engine's
    /// [`LoadDone`] said its worker died). Panics and `?` errors are not sent here: the engine
    /// reports those from what its worker said. An empty `ename` reads as `CompileError`.
    /// Sent as top-level `ename`, `evalue`, `traceback` (empty for `ok`).
    #[serde(flatten)]
    pub error: ErrorContent,
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
/// compiler caches by the closure's id, so this is cheap for a known closure). A closure named
/// by its id alone is one the compiler compiled before; if it does not know the id (it
/// restarted since), it answers `UnknownClosure`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosureRequest {
    /// The engine's id for this request, echoed in the reply.
    pub request_id: String,
    pub closure: crate::apply::ClosureRef,
}

/// `closure_reply`: where the compiled closure is, or why it did not compile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosureReply {
    pub request_id: String,
    /// `ok` or `error`.
    pub status: String,
    /// Artifact exporting `fn_name` with the `rpx_runtime::abi` signature (status `ok`).
    #[serde(default)]
    pub artifact: Option<Artifact>,
    #[serde(default)]
    pub fn_name: String,
    /// For errors: `UnknownClosure` for an id the compiler does not know, else `CompileError`,
    /// also when the closure could not be wrapped, cargo could not run or the built library
    /// could not be kept or read (the `evalue` says which); an empty `ename` reads as
    /// `CompileError` on the engine.
    /// Sent as top-level `ename`, `evalue`, `traceback` (empty for `ok`).
    #[serde(flatten)]
    pub error: ErrorContent,
}

/// What every compiled cell exports besides its own function, for the worker that runs it.
pub mod cell_abi {
    /// The symbol the worker calls after each cell: it flushes the cells' `std::io::stdout`.
    /// Cells link the toolchain's shared libstd, whose stdout buffer the worker's own (static)
    /// std cannot reach; without this a cell's last line without a newline would show up in
    /// the next cell's output.
    pub const FLUSH_FN: &[u8] = b"rpx_flush_stdio";
    /// The item that defines [`FLUSH_FN`]: evaluated once in every evcxr context that compiles
    /// cells (evcxr re-emits a context's items into each cell it compiles). The worker's
    /// completion marker may then follow a partial line on stdout: the engine's output parser
    /// finds it there, and the kernel's stdout relay puts it on a line of its own for evcxr.
    pub const FLUSH_ITEM: &str =
        "#[unsafe(no_mangle)] pub extern \"C\" fn rpx_flush_stdio() { use std::io::Write as _; let _ = std::io::stdout().flush(); }";
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
    pub const ARTIFACT_REQUEST: &str = "artifact_request";
    pub const ARTIFACT_REPLY: &str = "artifact_reply";
    /// An engine waiting on the compiler checks it is alive; empty content.
    pub const PING: &str = "compiler_ping";
    /// The compiler's answer to [`PING`]; empty content.
    pub const PONG: &str = "compiler_pong";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_hashes_are_checked_before_use_as_names() {
        assert!(Artifact::valid_hash(&"ab".repeat(32)));
        assert!(!Artifact::valid_hash(&"AB".repeat(32)), "uppercase is not what we write");
        assert!(!Artifact::valid_hash("../../etc/passwd"));
        assert!(!Artifact::valid_hash(&"a".repeat(63)));
    }

    #[test]
    fn load_carries_the_artifact_in_its_content() {
        let load = Load {
            cell_id: "c".into(),
            artifact: Artifact { path: "/w/libcode_1.so".into(), sha256: "0".repeat(64), size: 3 },
            fn_name: "run_user_code_1".into(),
        };
        let v = serde_json::to_value(&load).unwrap();
        assert_eq!(v["artifact"]["sha256"], "0".repeat(64));
        assert_eq!(v["artifact"]["size"], 3);
        assert_eq!(serde_json::from_value::<Load>(v).unwrap(), load);
    }
}
