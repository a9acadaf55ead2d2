//! The one error type, [`ErrorContent`] (`ename`, `evalue`, `traceback`) with its
//! [`ErrorName`]s, the errors rpx engines report, and [`EngineInfo`], which says which engine
//! reported one.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

use super::{lenient_string, lenient_strings, ReplyStatus};

/// Declares [`ErrorName`]: one variant per name rpx emits, plus [`ErrorName::Other`].
macro_rules! error_names {
    ($($(#[$doc:meta])* $variant:ident = $text:literal,)*) => {
        /// The `ename` of an error: the names rpx's processes emit, and any other name a foreign
        /// peer sent ([`ErrorName::Other`]). Serialized as the name itself.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorName {
            $($(#[$doc])* $variant,)*
            /// A name rpx does not emit, as read (also the empty name of a content without one).
            Other(String),
        }

        impl ErrorName {
            /// The name as sent.
            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorName::$variant => $text,)*
                    ErrorName::Other(s) => s,
                }
            }

            /// The variant for a name as read.
            pub fn parse(name: &str) -> ErrorName {
                match name {
                    $($text => ErrorName::$variant,)*
                    other => ErrorName::Other(other.to_string()),
                }
            }
        }
    };
}

error_names! {
    /// rustc rejected the cell or closure; `evalue` has its diagnostic.
    CompileError = "CompileError",
    /// The compiler failed other than with compile errors (or the engine is unknown to it).
    CompilerError = "CompilerError",
    /// No compiler is reachable from the engine.
    NoCompiler = "NoCompiler",
    /// The compiler went away while compiling.
    CompilerDied = "CompilerDied",
    /// User code panicked.
    Panic = "Panic",
    /// A `?` at a cell's top level returned this error.
    Error = "Error",
    /// The engine's worker died; its variables are gone.
    EngineWorkerDied = "EngineWorkerDied",
    /// The controller's name for a task whose engine died (and for engine-side failures).
    EngineError = "EngineError",
    /// A pulled name is not defined.
    NameError = "NameError",
    /// A call named its closure by an id nobody could resolve; the client sends it again with
    /// the closure's code.
    UnknownClosure = "UnknownClosure",
    /// A payload the engine cannot run (a Python one, a malformed one).
    UnsupportedPayload = "UnsupportedPayload",
    /// A request type rpx engines do not handle.
    UnsupportedRequest = "UnsupportedRequest",
    /// The task was aborted before it ran.
    TaskAborted = "TaskAborted",
    /// A load-balanced task did not start within its timeout.
    TaskTimeout = "TaskTimeout",
    /// The cell or call was interrupted by SIGINT (Python's name).
    KeyboardInterrupt = "KeyboardInterrupt",
    /// A compiled artifact could not be had or failed its hash check.
    ArtifactError = "ArtifactError",
    /// The code asked for input where none can be given.
    StdinNotImplementedError = "StdinNotImplementedError",
    /// The engine could not signal its worker.
    SignalError = "SignalError",
    /// A bad value in a request (Python's name).
    ValueError = "ValueError",
    /// A missing key (Python's name, from the controller).
    KeyError = "KeyError",
    /// A bad index (Python's name, from the controller).
    IndexError = "IndexError",
    /// A bad type (Python's name, from the controller).
    TypeError = "TypeError",
    /// A runtime failure (Python's name, from the controller's task database).
    RuntimeError = "RuntimeError",
    /// A time-out (Python's name, from the controller's task database).
    TimeoutError = "TimeoutError",
    /// Something rpx does not implement (Python's name).
    NotImplementedError = "NotImplementedError",
    /// One engine's error, as `%px` reports it for a single target.
    RemoteError = "RemoteError",
    /// Several engines' errors, as `%px` reports them.
    CompositeError = "CompositeError",
    /// `%px` errors that were already shown as they came.
    AlreadyDisplayedError = "AlreadyDisplayedError",
    /// A magic was used wrongly.
    UsageError = "UsageError",
    /// rpx-kernel's own failure running a local cell.
    KernelError = "KernelError",
    /// The kernel's local worker died.
    RuntimeDied = "RuntimeDied",
    /// The kernel lost or could not reach the cluster.
    ConnectionError = "ConnectionError",
    /// The kernel found no cluster to connect to.
    NoCluster = "NoCluster",
    /// The client lost its connection while a task was waiting (rpx's client).
    ConnectionLost = "ConnectionLost",
    /// A type was redefined and the kernel's local variables of that type were dropped.
    VariablesLost = "VariablesLost",
    /// An error reply without a name, as rpx's client reports it.
    UnknownError = "UnknownError",
    InvalidDependency = "InvalidDependency",
    ImpossibleDependency = "ImpossibleDependency",
    QueueFull = "QueueFull",
}

impl Default for ErrorName {
    /// The empty name, which a content without `ename` reads as.
    fn default() -> ErrorName {
        ErrorName::Other(String::new())
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `name == "KeyError"`: compares the name as it is written on the wire.
impl PartialEq<str> for ErrorName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl From<&str> for ErrorName {
    fn from(name: &str) -> ErrorName {
        ErrorName::parse(name)
    }
}

impl From<String> for ErrorName {
    fn from(name: String) -> ErrorName {
        ErrorName::parse(&name)
    }
}

impl From<&String> for ErrorName {
    fn from(name: &String) -> ErrorName {
        ErrorName::parse(name)
    }
}

impl PartialEq<&str> for ErrorName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorName {
    /// Any string; anything else (a foreign peer's null) reads as the empty name.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ErrorName, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => ErrorName::parse(&s),
            _ => ErrorName::default(),
        })
    }
}

/// The one error type: `ename`, `evalue` and `traceback`, as an iopub `error` content and the
/// error fields of every reply (`execute_reply`, `apply_reply`, hub replies). Missing fields
/// read as empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ErrorContent {
    #[serde(default)]
    pub ename: ErrorName,
    #[serde(default, deserialize_with = "lenient_string")]
    pub evalue: String,
    #[serde(default, deserialize_with = "lenient_strings")]
    pub traceback: Vec<String>,
}

impl ErrorContent {
    /// An error; an empty `traceback` becomes the one line `ename: evalue`.
    pub fn new(ename: impl Into<ErrorName>, evalue: impl Into<String>, traceback: Vec<String>) -> ErrorContent {
        let (ename, evalue) = (ename.into(), evalue.into());
        let traceback = if traceback.is_empty() { vec![format!("{ename}: {evalue}")] } else { traceback };
        ErrorContent { ename, evalue, traceback }
    }

    /// The error as it is: no traceback is made up.
    pub fn bare(ename: impl Into<ErrorName>, evalue: impl Into<String>, traceback: Vec<String>) -> ErrorContent {
        ErrorContent { ename: ename.into(), evalue: evalue.into(), traceback }
    }

    /// An error reply's content: `status: error`, the error, and `engine_info` when given.
    pub fn reply(&self, engine_info: Option<&EngineInfo>) -> Value {
        json!(ErrorMessage { status: Some(ReplyStatus::Error), error: self, engine_info, execute: None })
    }

    /// An error reply's content with an `engine_info` already in JSON (the controller's).
    pub fn reply_with_info(&self, engine_info: Option<Value>) -> Value {
        json!(ErrorMessage { status: Some(ReplyStatus::Error), error: self, engine_info, execute: None })
    }

    /// The iopub `error` content, with `engine_info` when given (engines add it).
    pub fn iopub(&self, engine_info: Option<&EngineInfo>) -> Value {
        json!(ErrorMessage { status: None, error: self, engine_info, execute: None })
    }
}

/// An error as sent: iopub `error` (no `status`), an error reply, or an `execute_reply` error.
#[derive(Serialize)]
pub(super) struct ErrorMessage<'a, I: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) status: Option<ReplyStatus>,
    #[serde(flatten)]
    pub(super) error: &'a ErrorContent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) engine_info: Option<I>,
    #[serde(flatten)]
    pub(super) execute: Option<ExecuteFields>,
}

/// What an `execute_reply` adds to an error: ipykernel's fields.
#[derive(Serialize)]
pub(super) struct ExecuteFields {
    pub(super) execution_count: u64,
    pub(super) user_expressions: Map<String, Value>,
    pub(super) payload: [Value; 0],
}

/// Something that names an engine by its id (an engine's identity, or the id itself).
pub trait EngineRef {
    /// The engine id.
    fn engine_id(&self) -> u64;
}

impl EngineRef for u64 {
    fn engine_id(&self) -> u64 {
        *self
    }
}

/// The errors rpx engines report, with the text users see.
impl ErrorContent {
    /// A Python client sent pickled Python in an `apply_request`.
    pub fn unsupported_apply(engine: &impl EngineRef) -> ErrorContent {
        ErrorContent::new(
            ErrorName::UnsupportedPayload,
            format!(
                "engine {} is an rpx engine: it runs Rust cells and cannot unpickle Python functions; \
                 use execute() with Rust code, or start Python engines for apply()",
                engine.engine_id()
            ),
            vec![],
        )
    }

    /// No compiler is reachable.
    pub fn no_compiler() -> ErrorContent {
        ErrorContent::new(ErrorName::NoCompiler, "no rpx compiler for this cluster (start the cluster with ipcluster)", vec![])
    }

    /// The compiler process went away while this cell was being compiled.
    pub fn compiler_died(detail: &str) -> ErrorContent {
        ErrorContent::new(
            ErrorName::CompilerDied,
            format!("the rpx compiler went away while compiling this cell ({detail}); restart the cluster"),
            vec![],
        )
    }

    /// The worker died while running the cell.
    pub fn worker_died(engine: &impl EngineRef, status: &str, stderr_tail: Vec<String>) -> ErrorContent {
        let evalue = format!(
            "the worker process of engine {} died ({status}) while running this cell; it was restarted \
             and all of this engine's variables were lost",
            engine.engine_id()
        );
        let mut tb = stderr_tail;
        let ename = ErrorName::EngineWorkerDied;
        tb.push(format!("{ename}: {evalue}"));
        ErrorContent::new(ename, evalue, tb)
    }

    /// The cell or closure call (`what`) was interrupted by SIGINT: a panic injected into it
    /// unwound to its `catch_unwind`, so the engine kept its variables (a cell's new ones are
    /// dropped, as after any panic). `before_run`: it was stopped before the worker ran it.
    pub fn interrupted(what: &str, before_run: bool) -> ErrorContent {
        let when = if before_run { " before it ran" } else { "" };
        let evalue = format!("the {what} was interrupted (SIGINT){when}; the engine kept its variables");
        ErrorContent::new(ErrorName::KeyboardInterrupt, evalue, vec![])
    }

    /// User code panicked.
    pub fn panic(message: &str, lines: Vec<String>) -> ErrorContent {
        let evalue = if message.is_empty() { "the cell panicked".to_string() } else { message.to_string() };
        ErrorContent::new(ErrorName::Panic, evalue, lines)
    }
}

impl From<jupyter_protocol::ReplyError> for ErrorContent {
    fn from(e: jupyter_protocol::ReplyError) -> ErrorContent {
        ErrorContent::bare(e.ename.as_str(), e.evalue, e.traceback)
    }
}

/// `engine_info` of an engine's error (content and reply metadata): which engine, and the
/// method (`execute`, `apply`, the request type) that failed. Reading needs only `engine_id`
/// (the controller's replies for a dead engine may carry no more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub engine_id: u64,
    #[serde(default, deserialize_with = "lenient_string")]
    pub engine_uuid: String,
    #[serde(default, deserialize_with = "lenient_string")]
    pub method: String,
}

impl EngineInfo {
    /// The block for engine `engine_id` (`engine_uuid`) failing in `method`.
    pub fn new(engine_id: u64, engine_uuid: &str, method: &str) -> EngineInfo {
        EngineInfo { engine_id, engine_uuid: engine_uuid.to_string(), method: method.to_string() }
    }
}
