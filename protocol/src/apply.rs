//! rpx's own `apply_request` payloads: closures, chunked maps and namespace transfers between a
//! Rust client (`rpx::Client`) and Rust engines.
//!
//! The message is an ordinary ipyparallel `apply_request` (so the controller schedules, retries,
//! times out and records it like any task), but its content carries `{"rpx": <Op>}` and its
//! buffers carry [postcard](https://docs.rs/postcard)-encoded values instead of pickles. A Python
//! engine receiving it fails the task with an error reply, and a Rust engine answers a Python
//! payload the same way.
//!
//! | op | request buffers | `apply_reply` buffers (status `ok`) |
//! |---|---|---|
//! | `apply` | `[postcard((A1, .., An))]` | `[postcard(R)]` |
//! | `map` | `[postcard(Vec<A>)]` (one chunk) | `[postcard(Vec<Result<R, String>>)]`, one per item; `Err` holds a panic message |
//! | `push` | one `postcard(T)` per name | `[]` |
//! | `pull` | `[]` | one `postcard(T)` per name |
//!
//! On one host, `push` and `pull` carry no value buffers: the values are files in the engine's
//! namespace named in the op ([`crate::dataplane`]).
//!
//! Error replies carry `status: "error"`, `ename` (one of [`ename`]), `evalue`, `traceback` and
//! `engine_info`.
//!
//! An rpx request that publishes nothing on iopub (a closure without output, a push, a pull
//! from files) publishes no `busy`/`idle` status either: its reply's metadata says so with
//! [`QUIET_KEY`], and the reply is then all there is to wait for. A request that does publish
//! (output, an error) gets `busy` before its first publication and `idle` after its reply, as
//! every other request.

use serde::{Deserialize, Serialize};

use crate::dataplane::ValueFile;

/// Key of the payload in the `apply_request` content.
pub const CONTENT_KEY: &str = "rpx";
/// Reply metadata key, `true` when the engine published nothing on iopub for the request (no
/// status, no output): no `idle` follows the reply.
pub const QUIET_KEY: &str = "rpx_quiet";

/// A closure to run on engines, as the client wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Closure {
    /// The closure's source, e.g. `|x: u64| x * x` (as `stringify!` renders it).
    pub source: String,
    /// Rust type of each argument as it can be written in the engine's code (`u64`,
    /// `Vec<String>`, `(u8, f64)`); the compiler annotates the closure with them.
    pub arg_types: Vec<String>,
}

/// A value to store in the engine namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedType {
    pub name: String,
    /// Rust type as written in the engine's code; cells see the variable with this type.
    pub type_name: String,
}

/// The operation an rpx `apply_request` asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Call the closure once with the argument tuple in `buffers[0]`.
    Apply { closure: Closure },
    /// Call the (one-argument) closure on every item of the chunk in `buffers[0]`.
    Map { closure: Closure },
    /// Store `buffers[i]` as `names[i]` in the engine namespace; or, with `files` (same host,
    /// no buffers), adopt `files[i]` as `names[i]` ([`crate::dataplane`]).
    Push {
        names: Vec<NamedType>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<ValueFile>,
    },
    /// Send back the current value of each name: as buffers, or with `files` as files the
    /// client reads ([`crate::dataplane::REPLY_FILES_KEY`]) on this host or over the engine's
    /// data link.
    Pull {
        names: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        files: Option<PullFiles>,
    },
}

/// Who reads a pull's files, which decides whether they are announced with a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullFiles {
    /// A client on the engine's host, in the engine's private namespace directory: the files
    /// are guarded by that directory's permissions ([`crate::dataplane`]), no digest.
    SameHost,
    /// A client on another host, over the engine's data link: each file with its BLAKE3, which
    /// the signed reply carries and the client checks as the bytes arrive.
    DataLink,
}

impl PullFiles {
    /// What vouches for the files such a reader gets.
    pub fn integrity(self) -> crate::dataplane::Integrity {
        match self {
            PullFiles::SameHost => crate::dataplane::Integrity::Namespace,
            PullFiles::DataLink => crate::dataplane::Integrity::Digest,
        }
    }
}

impl Op {
    /// The payload as `apply_request` content.
    pub fn to_content(&self) -> serde_json::Value {
        serde_json::json!({ CONTENT_KEY: self })
    }

    /// The payload of an `apply_request` content, if it is an rpx one.
    pub fn from_content(content: &serde_json::Value) -> Option<Result<Op, serde_json::Error>> {
        content.get(CONTENT_KEY).map(Op::deserialize)
    }
}

/// `ename` values of rpx error replies.
pub mod ename {
    use crate::content::ErrorName;

    /// The closure (or a pull's serializing cell) did not compile; `evalue` has rustc's diagnostic.
    pub const COMPILE_ERROR: ErrorName = ErrorName::CompileError;
    /// The closure panicked (apply); `evalue` is the panic message.
    pub const PANIC: ErrorName = ErrorName::Panic;
    /// The engine's worker died while running the task (or a cell); its variables are gone.
    pub const ENGINE_DIED: ErrorName = ErrorName::EngineWorkerDied;
    /// A pulled name is not defined on the engine.
    pub const NAME_ERROR: ErrorName = ErrorName::NameError;
    /// A payload this engine cannot run (bad encoding, wrong arity, Python payload).
    pub const UNSUPPORTED_PAYLOAD: ErrorName = ErrorName::UnsupportedPayload;
    /// The task was aborted before it ran.
    pub const ABORTED: ErrorName = ErrorName::TaskAborted;
    /// The cell or call was interrupted (`signal_request` with SIGINT); the engine kept its
    /// variables (Python's name, which ipyparallel's users know).
    pub const INTERRUPTED: ErrorName = ErrorName::KeyboardInterrupt;
    /// A compiled artifact could not be had or failed its hash check; nothing ran.
    pub const ARTIFACT_ERROR: ErrorName = ErrorName::ArtifactError;
    /// A `?` at a cell's top level returned this error (its `Display` text is the message).
    pub const QUESTION_MARK_ERROR: ErrorName = ErrorName::Error;
    /// The code asked for input (`evcxr_input`), which engines cannot give.
    pub const STDIN_NOT_IMPLEMENTED: ErrorName = ErrorName::StdinNotImplementedError;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_content() {
        let op = Op::Map { closure: Closure { source: "|x: u64| x * x".into(), arg_types: vec!["u64".into()] } };
        let content = op.to_content();
        assert_eq!(content["rpx"]["op"], "map");
        assert_eq!(Op::from_content(&content).unwrap().unwrap(), op);
        assert!(Op::from_content(&serde_json::json!({})).is_none());
        assert!(Op::from_content(&serde_json::json!({"rpx": {"op": "fly"}})).unwrap().is_err());
        // The buffer forms stay as they were; the file forms only add fields.
        let pull = Op::Pull { names: vec!["a".into()], files: None };
        assert_eq!(pull.to_content(), serde_json::json!({"rpx": {"op": "pull", "names": ["a"]}}));
        let pull = Op::Pull { names: vec!["a".into()], files: Some(PullFiles::SameHost) };
        assert_eq!(pull.to_content(), serde_json::json!({"rpx": {"op": "pull", "names": ["a"], "files": "same_host"}}));
        let push: Op = serde_json::from_value(serde_json::json!({"op": "push", "names": [{"name": "a", "type_name": "u8"}]})).unwrap();
        assert_eq!(push, Op::Push { names: vec![NamedType { name: "a".into(), type_name: "u8".into() }], files: vec![] });
    }
}
