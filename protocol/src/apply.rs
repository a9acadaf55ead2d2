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

impl Closure {
    /// This closure's id: the BLAKE3 of its source and argument types (each with its length,
    /// so no two closures share an encoding).
    pub fn id(&self) -> ClosureId {
        let mut h = blake3::Hasher::new();
        for part in std::iter::once(&self.source).chain(&self.arg_types) {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        ClosureId(h.finalize().to_hex().to_string())
    }
}

/// A closure's content address ([`Closure::id`]): 64 lowercase hex digits. Once the client
/// has seen a closure compile, its calls name it by this id alone, not by its source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClosureId(String);

impl ClosureId {
    /// The id as hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClosureId {
    type Error = String;
    fn try_from(s: String) -> Result<ClosureId, String> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ClosureId(s))
        } else {
            Err(format!("a closure id is 64 lowercase hex digits, not {:?}", s.chars().take(80).collect::<String>()))
        }
    }
}

impl From<ClosureId> for String {
    fn from(id: ClosureId) -> String {
        id.0
    }
}

impl std::fmt::Display for ClosureId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A closure as a call names it: always by its id, and with its code until the client has seen
/// it compile. Whoever holds the code for an id keeps it; a call by id alone is resolved by the
/// engine (closures it ran) or the compiler (closures it compiled), and one neither can resolve
/// is answered [`ename::UNKNOWN_CLOSURE`], which the client answers by sending the code again.
///
/// Read only through its checks: an id that is not the code's own is a malformed payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "ClosureRefWire")]
pub struct ClosureRef {
    pub id: ClosureId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Closure>,
}

/// [`ClosureRef`] as read, before its id is checked against its code.
#[derive(Deserialize)]
struct ClosureRefWire {
    id: ClosureId,
    #[serde(default)]
    code: Option<Closure>,
}

impl TryFrom<ClosureRefWire> for ClosureRef {
    type Error = String;
    fn try_from(w: ClosureRefWire) -> Result<ClosureRef, String> {
        match &w.code {
            Some(code) if code.id() != w.id => Err(format!("closure id {} is not the id of the code sent with it", w.id)),
            _ => Ok(ClosureRef { id: w.id, code: w.code }),
        }
    }
}

impl ClosureRef {
    /// Named with its code (the first calls).
    pub fn with_code(code: Closure) -> ClosureRef {
        ClosureRef { id: code.id(), code: Some(code) }
    }

    /// Named by its id alone.
    pub fn by_id(id: ClosureId) -> ClosureRef {
        ClosureRef { id, code: None }
    }
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
    Apply { closure: ClosureRef },
    /// Call the (one-argument) closure on every item of the chunk in `buffers[0]`.
    Map { closure: ClosureRef },
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
    /// A call named its closure by an id that neither the engine nor the compiler can resolve
    /// (the compiler restarted since): nothing ran, nothing was published, and the client sends
    /// the call again with the closure's code.
    pub const UNKNOWN_CLOSURE: ErrorName = ErrorName::UnknownClosure;
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
        let op = Op::Map { closure: ClosureRef::with_code(Closure { source: "|x: u64| x * x".into(), arg_types: vec!["u64".into()] }) };
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

    fn closure(source: &str, types: &[&str]) -> Closure {
        Closure { source: source.into(), arg_types: types.iter().map(|t| t.to_string()).collect() }
    }

    #[test]
    fn a_closure_id_is_its_source_and_types_and_nothing_else() {
        let id = closure("|x: u64| x", &["u64"]).id();
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(id, closure("|x: u64| x", &["u64"]).id());
        assert_ne!(id, closure("|x: u64| x ", &["u64"]).id());
        assert_ne!(id, closure("|x: u64| x", &["u32"]).id());
        // Lengths keep the parts apart: moving text between source and types changes the id.
        assert_ne!(closure("ab", &["c"]).id(), closure("a", &["bc"]).id());
        assert_ne!(closure("a", &["b", "c"]).id(), closure("a", &["bc"]).id());
    }

    #[test]
    fn a_call_names_its_closure_by_code_or_by_id_and_a_mismatch_is_malformed() {
        let code = closure("|x: u64| x * 2", &["u64"]);
        let first = Op::Apply { closure: ClosureRef::with_code(code.clone()) };
        let content = first.to_content();
        assert_eq!(content["rpx"]["closure"]["code"]["source"], "|x: u64| x * 2");
        assert_eq!(Op::from_content(&content).unwrap().unwrap(), first);

        let later = Op::Apply { closure: ClosureRef::by_id(code.id()) };
        let content = later.to_content();
        assert_eq!(content["rpx"]["closure"], serde_json::json!({"id": code.id().as_str()}), "an id and nothing else");
        assert_eq!(Op::from_content(&content).unwrap().unwrap(), later);

        let mut forged = first.to_content();
        forged["rpx"]["closure"]["code"]["source"] = "|x: u64| x * 3".into();
        let err = Op::from_content(&forged).unwrap().unwrap_err().to_string();
        assert!(err.contains("is not the id of the code sent with it"), "{err}");
        for bad in ["", "ABC", &"g".repeat(64), &"A".repeat(64)] {
            let content = serde_json::json!({"rpx": {"op": "apply", "closure": {"id": bad}}});
            let err = Op::from_content(&content).unwrap().unwrap_err().to_string();
            assert!(err.contains("64 lowercase hex digits"), "{bad:?}: {err}");
        }
    }
}
