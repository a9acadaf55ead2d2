//! The one error type of the crate: [`Error`], and [`RemoteError`] for what went wrong on an
//! engine (its kind, where, and what to do), built from ipyparallel-shaped error replies.

use std::fmt;

use rpx_protocol::content::{ErrorContent, ErrorName, ReplyContent, ReplyStatus};
use serde_json::Value;

use crate::targets::TargetError;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an engine (or the controller, for a task) reported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The closure or cell did not compile; the message holds rustc's diagnostic.
    Compile,
    /// The closure or cell panicked.
    Panic,
    /// The engine (or its worker) died while running the task; its variables are gone.
    EngineDied,
    /// A load-balanced task did not start within its `timeout` (`TaskTimeout`).
    Timeout,
    /// The task was aborted before it ran.
    Aborted,
    /// A pulled or gathered name is not defined on the engine.
    Name,
    /// The cell or call was interrupted (`Client::send_signal("SIGINT", ..)`, ename
    /// `KeyboardInterrupt`); the engine kept its variables.
    Interrupted,
    /// Anything else, with its `ename`.
    Other(String),
}

impl RemoteErrorKind {
    /// The kind for an `ename` of an error reply.
    pub fn from_ename(ename: &str) -> RemoteErrorKind {
        match ErrorName::parse(ename) {
            ErrorName::CompileError => RemoteErrorKind::Compile,
            ErrorName::Panic => RemoteErrorKind::Panic,
            // `EngineError`: the controller's name when an engine died with the task.
            ErrorName::EngineWorkerDied | ErrorName::EngineError => RemoteErrorKind::EngineDied,
            ErrorName::TaskTimeout => RemoteErrorKind::Timeout,
            ErrorName::TaskAborted => RemoteErrorKind::Aborted,
            ErrorName::NameError => RemoteErrorKind::Name,
            ErrorName::KeyboardInterrupt => RemoteErrorKind::Interrupted,
            other => RemoteErrorKind::Other(other.as_str().to_string()),
        }
    }

    /// What a user can do about an error of this kind.
    pub fn hint(&self) -> &'static str {
        match self {
            RemoteErrorKind::Compile => {
                "fix the code shown above; closure argument and return types must be nameable on the engines (std types, or types defined there under the same name)"
            }
            RemoteErrorKind::Panic => "handle this input in the code, or use map_results() to keep the other items' results",
            RemoteErrorKind::EngineDied => {
                "the engine's variables are lost; run the task again (a load-balanced view with .retries(n) reruns it on another engine)"
            }
            RemoteErrorKind::Timeout => "the task could not start in time: raise .timeout(..), add engines, or check its dependencies",
            RemoteErrorKind::Aborted => "the task was aborted before it ran (Client::abort); submit it again if you still need it",
            RemoteErrorKind::Name => "push the value first (DirectView::push or scatter) or define it in a cell on that engine",
            RemoteErrorKind::Interrupted => "the engine kept its variables (those the interrupted cell was defining are not kept); run the cell again if needed",
            RemoteErrorKind::Other(_) => "see the message and traceback above",
        }
    }
}

/// An error reported for one task (or one map item) by an engine or the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    /// The engine that reported it, when known (a `TaskTimeout` comes from the scheduler).
    pub engine_id: Option<usize>,
    pub kind: RemoteErrorKind,
    /// The error name as sent (`CompileError`, `Panic`, `EngineError`, ...).
    pub ename: String,
    /// The error value: a panic message, rustc's diagnostic, ...
    pub message: String,
    pub traceback: Vec<String>,
    /// For a map: which item, as `index: Debug text of the input`.
    pub item: Option<String>,
    /// What the failing task printed on stdout before it failed (for a map, its whole chunk's).
    pub stdout: String,
    /// What the failing task printed on stderr before it failed.
    pub stderr: String,
}

impl RemoteError {
    /// A new error of `ename` (the kind follows from it).
    pub fn new(ename: impl Into<ErrorName>, message: impl Into<String>, engine_id: Option<usize>) -> RemoteError {
        let ename = ename.into();
        RemoteError {
            engine_id,
            kind: RemoteErrorKind::from_ename(ename.as_str()),
            ename: ename.as_str().to_string(),
            message: message.into(),
            traceback: Vec::new(),
            item: None,
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    /// The error carried by a reply content (`status: error` with `ename`, `evalue`,
    /// `traceback`, `engine_info`, or `status: aborted`). `engine_id` is used when the content
    /// does not name the engine.
    pub fn from_reply(content: &Value, engine_id: Option<usize>) -> RemoteError {
        let reply = ReplyContent::read(content);
        let engine_id = reply.engine_id().map(|i| i as usize).or(engine_id);
        if reply.status == Some(ReplyStatus::Aborted) {
            let mut e = RemoteError::new(ErrorName::TaskAborted, "the task was aborted before it started", engine_id);
            e.kind = RemoteErrorKind::Aborted;
            return e;
        }
        let ErrorContent { ename, evalue, traceback } = reply.error;
        // A reply without an `ename` (or with a non-string or empty one).
        let ename = if ename.as_str().is_empty() { ErrorName::UnknownError } else { ename };
        RemoteError { traceback, ..RemoteError::new(ename, evalue, engine_id) }
    }

    /// The same error, with what its task printed.
    pub fn with_output(mut self, stdout: &str, stderr: &str) -> RemoteError {
        self.stdout = stdout.to_string();
        self.stderr = stderr.to_string();
        self
    }

    /// The same error, for map item `index` whose input reads `debug`.
    pub fn for_item(mut self, index: usize, debug: Option<&str>) -> RemoteError {
        self.item = Some(match debug {
            Some(d) => format!("{index}: {d}"),
            None => index.to_string(),
        });
        self
    }

    fn headline(&self) -> String {
        let on = match self.engine_id {
            Some(id) => format!(" on engine {id}"),
            None => String::new(),
        };
        let what = match &self.kind {
            RemoteErrorKind::Compile => format!("compile error{on}"),
            RemoteErrorKind::Panic => format!("panic{on}"),
            RemoteErrorKind::EngineDied => match self.engine_id {
                Some(id) => format!("engine {id} died while running the task"),
                None => "the engine died while running the task".to_string(),
            },
            RemoteErrorKind::Timeout => format!("task timed out{on}"),
            RemoteErrorKind::Aborted => format!("task aborted{on}"),
            RemoteErrorKind::Name => format!("name not defined{on}"),
            RemoteErrorKind::Interrupted => format!("interrupted{on}"),
            RemoteErrorKind::Other(ename) => format!("{ename}{on}"),
        };
        match &self.item {
            Some(item) => format!("{what} (map item {item})"),
            None => what,
        }
    }

    /// Traceback lines that add something to the message.
    fn useful_traceback(&self) -> Vec<&str> {
        let plain = format!("{}: {}", self.ename, self.message);
        self.traceback
            .iter()
            .map(String::as_str)
            .filter(|l| !l.trim().is_empty() && *l != plain && !self.message.contains(l.trim()))
            .collect()
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self.message.trim_end();
        if msg.contains('\n') {
            write!(f, "{}:\n{msg}", self.headline())?;
        } else {
            write!(f, "{}: {msg}", self.headline())?;
        }
        let tb = self.useful_traceback();
        if !tb.is_empty() {
            write!(f, "\n{}", tb.join("\n"))?;
        }
        write!(f, "\n  hint: {}", self.kind.hint())
    }
}

impl std::error::Error for RemoteError {}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// One task failed on an engine (or in the scheduler). Boxed to keep `Result`s small; its
    /// fields read through it (`e.kind`, `e.engine_id`).
    #[error("{0}")]
    Remote(Box<RemoteError>),
    /// Some items of a map failed: `(item index, error)`, in item order, out of `total` items.
    #[error("{}", map_message(failed, *total))]
    Map { failed: Vec<(usize, RemoteError)>, total: usize },
    /// A direct request failed on several engines: one error per failing engine, out of
    /// `total` engines.
    /// `outputs` holds what every engine printed (stdout and stderr), failed or not.
    #[error("{}", engines_message(failed, *total))]
    Engines { failed: Vec<RemoteError>, total: usize, outputs: Vec<crate::result::TaskOutput> },
    /// A cell ([`crate::DirectView::execute`]) failed on one or more engines. It holds every
    /// engine's outcome, failed or not: stdout, stderr, results, errors ([`Error::execute_result`]).
    /// [`crate::DirectView::execute_results`] returns the same as `Ok` instead.
    #[error("{}", execute_message(.0))]
    Execute(Box<crate::result::ExecuteResult>),
    /// The controller cannot be reached (never was, went away, or this client was closed).
    #[error("cannot reach the rpx controller: {0}")]
    Connection(String),
    /// A wait ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// No engine is registered with the controller.
    #[error("no engines are registered: start some with `ipcluster start -n 4 --daemonize` (or `ipcluster engines -n 4`), or wait with Client::wait_for_engines")]
    NoEngines,
    /// A target selection is malformed or names engines that are not registered.
    #[error(transparent)]
    Targets(TargetError),
    /// A message or value did not have the expected shape.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Every engine's outcome of a failed cell ([`Error::Execute`]): stdout, stderr, results
    /// and errors, in target order.
    pub fn execute_result(&self) -> Option<&crate::result::ExecuteResult> {
        match self {
            Error::Execute(r) => Some(r),
            _ => None,
        }
    }

    /// [`Error::execute_result`], by value.
    pub fn into_execute_result(self) -> Option<crate::result::ExecuteResult> {
        match self {
            Error::Execute(r) => Some(*r),
            _ => None,
        }
    }

    /// The remote errors this error carries, whatever its shape (one task, several engines, map
    /// items, a cell); empty for local errors (connection, timeout, ...).
    pub fn remote_errors(&self) -> Vec<&RemoteError> {
        match self {
            Error::Remote(e) => vec![e],
            Error::Map { failed, .. } => failed.iter().map(|(_, e)| e).collect(),
            Error::Engines { failed, .. } => failed.iter().collect(),
            Error::Execute(r) => r.errors(),
            _ => Vec::new(),
        }
    }
}

fn execute_message(r: &crate::result::ExecuteResult) -> String {
    let failed: Vec<&RemoteError> = r.errors();
    let total = r.engines.len();
    let mut s = if total == 1 && failed.len() == 1 {
        return format!("the cell failed: {}\n  (Error::execute_result() has its output; DirectView::execute_results() returns per-engine results instead)", failed[0]);
    } else {
        let ids: Vec<String> = failed.iter().map(|e| e.engine_id.map_or("?".to_string(), |i| i.to_string())).collect();
        format!("the cell failed on {} of {total} engines ({})", failed.len(), ids.join(", "))
    };
    for e in failed.iter().take(LISTED) {
        s.push_str("\n- ");
        s.push_str(&e.to_string().replace('\n', "\n  "));
    }
    if failed.len() > LISTED {
        s.push_str(&format!("\n- ... and {} more", failed.len() - LISTED));
    }
    s.push_str("\n  (Error::execute_result() has every engine's output; DirectView::execute_results() returns per-engine results instead)");
    s
}

/// A target error is [`Error::Targets`], except "no engines at all", which is [`Error::NoEngines`]
/// (its message says how to start some).
impl From<TargetError> for Error {
    fn from(e: TargetError) -> Error {
        match e {
            TargetError::NoEngines => Error::NoEngines,
            other => Error::Targets(other),
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Error {
        Error::Remote(Box::new(e))
    }
}

/// How many distinct failures `Display` lists before summarising.
const LISTED: usize = 5;

fn map_message(failed: &[(usize, RemoteError)], total: usize) -> String {
    let mut s = if failed.len() == total {
        format!("all {total} map items failed")
    } else {
        format!("{} of {total} map items failed", failed.len())
    };
    let items: Vec<String> = failed.iter().take(20).map(|(i, _)| i.to_string()).collect();
    s.push_str(&format!(" (items {}{})", items.join(", "), if failed.len() > 20 { ", ..." } else { "" }));
    // Group identical causes (a compile error fails every item the same way).
    let mut groups: Vec<(&RemoteError, Vec<usize>)> = Vec::new();
    for (i, e) in failed {
        match groups.iter_mut().find(|(g, _)| g.kind == e.kind && g.message == e.message && g.engine_id == e.engine_id) {
            Some((_, v)) => v.push(*i),
            None => groups.push((e, vec![*i])),
        }
    }
    for (e, idx) in groups.iter().take(LISTED) {
        s.push_str("\n- ");
        if idx.len() > 1 {
            s.push_str(&format!("{} items like this: ", idx.len()));
        }
        s.push_str(&e.to_string().replace('\n', "\n  "));
    }
    if groups.len() > LISTED {
        s.push_str(&format!("\n- ... and {} more distinct errors", groups.len() - LISTED));
    }
    s.push_str("\n  (use map_results() to get every item's result or error)");
    s
}

fn engines_message(failed: &[RemoteError], total: usize) -> String {
    let ids: Vec<String> = failed.iter().map(|e| e.engine_id.map_or("?".to_string(), |i| i.to_string())).collect();
    let mut s = format!("failed on {} of {total} engines ({})", failed.len(), ids.join(", "));
    for e in failed.iter().take(LISTED) {
        s.push_str("\n- ");
        s.push_str(&e.to_string().replace('\n', "\n  "));
    }
    if failed.len() > LISTED {
        s.push_str(&format!("\n- ... and {} more", failed.len() - LISTED));
    }
    s
}

/// One error for several per-engine errors: the error itself when there is one.
/// `outputs`: what every engine printed.
pub(crate) fn combine_engine_errors(mut failed: Vec<RemoteError>, total: usize, outputs: Vec<crate::result::TaskOutput>) -> Error {
    if failed.len() == 1 && total == 1 {
        Error::Remote(Box::new(failed.remove(0)))
    } else {
        Error::Engines { failed, total, outputs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn enames_map_to_kinds() {
        assert_eq!(RemoteErrorKind::from_ename("CompileError"), RemoteErrorKind::Compile);
        assert_eq!(RemoteErrorKind::from_ename("Panic"), RemoteErrorKind::Panic);
        assert_eq!(RemoteErrorKind::from_ename("EngineWorkerDied"), RemoteErrorKind::EngineDied);
        assert_eq!(RemoteErrorKind::from_ename("EngineError"), RemoteErrorKind::EngineDied);
        assert_eq!(RemoteErrorKind::from_ename("TaskTimeout"), RemoteErrorKind::Timeout);
        assert_eq!(RemoteErrorKind::from_ename("TaskAborted"), RemoteErrorKind::Aborted);
        assert_eq!(RemoteErrorKind::from_ename("NameError"), RemoteErrorKind::Name);
        assert_eq!(RemoteErrorKind::from_ename("UnsupportedPayload"), RemoteErrorKind::Other("UnsupportedPayload".into()));
    }

    #[test]
    fn replies_become_remote_errors() {
        let c = json!({"status": "error", "ename": "Panic", "evalue": "boom", "traceback": ["Panic: boom"], "engine_info": {"engine_id": 3, "engine_uuid": "u", "method": "apply"}});
        let e = RemoteError::from_reply(&c, None);
        assert_eq!((e.kind.clone(), e.engine_id, e.message.as_str()), (RemoteErrorKind::Panic, Some(3), "boom"));
        let text = e.to_string();
        assert!(text.starts_with("panic on engine 3: boom"), "{text}");
        assert!(text.contains("hint:"), "{text}");
        assert!(!text.contains("Panic: boom"), "the traceback repeating the message is not shown: {text}");

        let aborted = RemoteError::from_reply(&json!({"status": "aborted"}), Some(1));
        assert_eq!((aborted.kind.clone(), aborted.engine_id), (RemoteErrorKind::Aborted, Some(1)));
        assert!(aborted.to_string().contains("task aborted on engine 1"));

        let died = RemoteError::from_reply(
            &json!({"status": "error", "ename": "EngineError", "evalue": "Engine 2 died while running task m1", "engine_info": {"engine_id": 2}}),
            None,
        );
        assert_eq!(died.kind, RemoteErrorKind::EngineDied);
        assert!(died.to_string().starts_with("engine 2 died while running the task"), "{died}");

        let timeout = RemoteError::from_reply(&json!({"status": "error", "ename": "TaskTimeout", "evalue": "Task m timed out"}), None);
        assert_eq!((timeout.kind.clone(), timeout.engine_id), (RemoteErrorKind::Timeout, None));
        assert!(timeout.to_string().contains("raise .timeout"), "{timeout}");
    }

    #[test]
    fn item_and_multiline_messages_display() {
        let e =
            RemoteError::new("CompileError", "error[E0425]: cannot find value `y`\n --> src/lib.rs:1:5", Some(0)).for_item(4, Some("7"));
        let text = e.to_string();
        assert!(text.starts_with("compile error on engine 0 (map item 4: 7):\nerror[E0425]"), "{text}");
    }

    #[test]
    fn map_errors_group_identical_causes() {
        let failed: Vec<(usize, RemoteError)> =
            (0..3).map(|i| (i, RemoteError::new("CompileError", "bad code", Some(0)).for_item(i, None))).collect();
        let text = Error::Map { failed, total: 3 }.to_string();
        assert!(text.starts_with("all 3 map items failed (items 0, 1, 2)"), "{text}");
        assert!(text.contains("3 items like this: compile error on engine 0"), "{text}");
        assert!(text.contains("map_results()"), "{text}");

        let failed = vec![(5, RemoteError::new("Panic", "x was 5", Some(1)).for_item(5, Some("5")))];
        let text = Error::Map { failed, total: 10 }.to_string();
        assert!(text.starts_with("1 of 10 map items failed (items 5)"), "{text}");
        assert!(text.contains("panic on engine 1 (map item 5: 5): x was 5"), "{text}");
    }

    #[test]
    fn engine_errors_combine() {
        let one = combine_engine_errors(vec![RemoteError::new("NameError", "no `x`", Some(2))], 1, vec![]);
        assert!(matches!(one, Error::Remote(ref e) if e.kind == RemoteErrorKind::Name));
        let two = combine_engine_errors(
            vec![RemoteError::new("NameError", "no `x`", Some(2)), RemoteError::new("NameError", "no `x`", Some(3))],
            4,
            vec![],
        );
        let text = two.to_string();
        assert!(text.starts_with("failed on 2 of 4 engines (2, 3)"), "{text}");
        assert!(Error::NoEngines.to_string().contains("ipcluster start"));
    }
}
