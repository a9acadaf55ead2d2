//! How a failed `%px` ends: [`ErrorReport`], the `error` message and `execute_reply` error
//! fields, built as ipyparallel builds them: a `CompositeError` listing each failed engine as
//! `[N:execute]` (at most four tracebacks, then `... K more exceptions ...`), a `RemoteError`
//! for a single-engine target, or, when the errors were already streamed, an
//! `AlreadyDisplayedError` that just says `N errors`.

use rpx_protocol::content::{ErrorContent, ErrorName};
use serde_json::Value;

use crate::output::{EngineOutput, IopubMsg};

/// How many tracebacks a `CompositeError` shows (and how many a stream prints in full).
pub const TB_LIMIT: usize = 4;

/// The method in `[N:execute]` labels.
const METHOD: &str = "execute";

/// What the kernel reports for a failed cell: publish [`Self::to_iopub`] on iopub and put
/// [`Self::reply_content`] in the `execute_reply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReport {
    /// `ename`: `CompositeError`, `RemoteError` or `AlreadyDisplayedError`; `evalue`: the
    /// summary (for `CompositeError`: the first line plus one `[N:execute]Kind: message` line per
    /// failed engine); `traceback`: the lines a front end shows.
    pub error: ErrorContent,
    /// The engines that failed, in engine order as given.
    pub failed_engines: Vec<usize>,
}

impl ErrorReport {
    /// The iopub `error` message.
    pub fn to_iopub(&self) -> IopubMsg {
        IopubMsg::Error(self.error.clone())
    }

    /// The `execute_reply` content for this failure (without `execution_count`, which the
    /// kernel adds).
    pub fn reply_content(&self) -> Value {
        self.error.reply(None)
    }
}

/// `[N:execute]`.
pub fn engine_label(engine_id: usize) -> String {
    format!("[{engine_id}:{METHOD}]")
}

/// The traceback's lines (the list joined and split again, as ipyparallel does), or
/// `No traceback available`.
fn traceback_lines(err: &ErrorContent) -> Vec<String> {
    let joined = err.traceback.join("\n");
    if joined.is_empty() {
        vec!["No traceback available".to_string()]
    } else {
        joined.lines().map(str::to_string).collect()
    }
}

/// A single engine's error as a `RemoteError` renders it: `[N:execute]`, then the traceback.
pub(crate) fn remote_traceback(engine_id: usize, err: &ErrorContent) -> Vec<String> {
    let mut lines = vec![engine_label(engine_id)];
    lines.extend(traceback_lines(err));
    lines
}

/// `[N:execute] Kind: message`, a `RemoteError`'s one-line form.
pub(crate) fn remote_line(engine_id: usize, err: &ErrorContent) -> String {
    format!("{} {}: {}", engine_label(engine_id), err.ename, err.evalue)
}

/// The report for a finished `%px` whose errors were *not* streamed, or `None` if no engine
/// failed. `single` is [`crate::TargetSpec::is_single`] of the cell's targets: then the one
/// error is a `RemoteError`; otherwise all are gathered in a `CompositeError`.
pub fn error_report(engines: &[EngineOutput], single: bool) -> Option<ErrorReport> {
    let errors: Vec<(usize, &ErrorContent)> = engines.iter().flat_map(|e| e.errors().map(move |err| (e.engine_id, err))).collect();
    if errors.is_empty() {
        return None;
    }
    let mut failed_engines: Vec<usize> = errors.iter().map(|(id, _)| *id).collect();
    failed_engines.dedup();
    if single && errors.len() == 1 {
        let (id, err) = errors[0];
        let error = ErrorContent::bare(ErrorName::RemoteError, remote_line(id, err), remote_traceback(id, err));
        return Some(ErrorReport { error, failed_engines });
    }
    let mut evalue = "one or more exceptions raised in: %px".to_string();
    let mut traceback = Vec::new();
    for (id, err) in errors.iter().take(TB_LIMIT) {
        evalue.push_str(&format!("\n{}{}: {}", engine_label(*id), err.ename, err.evalue));
        traceback.push(format!("{}:", engine_label(*id)));
        traceback.extend(traceback_lines(err));
        traceback.push(String::new());
    }
    if errors.len() > TB_LIMIT {
        let more = errors.len() - TB_LIMIT;
        evalue.push_str(&format!("\n.... {more} more exceptions ..."));
        traceback.push(format!("... {more} more exceptions ..."));
    }
    Some(ErrorReport { error: ErrorContent::bare(ErrorName::CompositeError, evalue, traceback), failed_engines })
}

/// The report after errors were streamed as they came: `AlreadyDisplayedError`, `N errors`.
pub(crate) fn already_displayed(count: usize, failed_engines: Vec<usize>) -> ErrorReport {
    let text = format!("{count} errors");
    ErrorReport { error: ErrorContent::bare(ErrorName::AlreadyDisplayedError, text.clone(), vec![text]), failed_engines }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputEvent;
    use serde_json::json;

    fn failing(id: usize) -> EngineOutput {
        EngineOutput::new(
            id,
            vec![
                OutputEvent::stdout("before\n"),
                OutputEvent::error(
                    "Panic",
                    format!("oops! {id}"),
                    vec![format!("thread 'main' panicked at src/lib.rs:3:5:\noops! {id}"), "note: run with RUST_BACKTRACE=1".into()],
                ),
            ],
        )
    }

    fn ok(id: usize) -> EngineOutput {
        EngineOutput::new(id, vec![OutputEvent::stdout("fine\n")])
    }

    #[test]
    fn no_errors_no_report() {
        assert_eq!(error_report(&[ok(0), ok(1)], false), None);
        assert_eq!(error_report(&[], false), None);
    }

    #[test]
    fn composite_error() {
        let r = error_report(&[ok(0), failing(1), failing(2)], false).unwrap();
        assert_eq!(r.error.ename, "CompositeError");
        assert_eq!(r.error.evalue, "one or more exceptions raised in: %px\n[1:execute]Panic: oops! 1\n[2:execute]Panic: oops! 2");
        assert_eq!(
            r.error.traceback,
            vec![
                "[1:execute]:",
                "thread 'main' panicked at src/lib.rs:3:5:",
                "oops! 1",
                "note: run with RUST_BACKTRACE=1",
                "",
                "[2:execute]:",
                "thread 'main' panicked at src/lib.rs:3:5:",
                "oops! 2",
                "note: run with RUST_BACKTRACE=1",
                "",
            ]
        );
        assert_eq!(r.failed_engines, vec![1, 2]);
        assert_eq!(r.to_iopub(), IopubMsg::Error(r.error.clone()));
        assert_eq!(
            r.reply_content(),
            json!({ "status": "error", "ename": "CompositeError", "evalue": r.error.evalue, "traceback": r.error.traceback })
        );
    }

    #[test]
    fn composite_error_caps_tracebacks_at_four() {
        let engines: Vec<EngineOutput> = (0..6).map(failing).collect();
        let r = error_report(&engines, false).unwrap();
        assert_eq!(
            r.error.evalue,
            "one or more exceptions raised in: %px\n[0:execute]Panic: oops! 0\n[1:execute]Panic: oops! 1\n[2:execute]Panic: oops! 2\n[3:execute]Panic: oops! 3\n.... 2 more exceptions ..."
        );
        assert_eq!(r.error.traceback.iter().filter(|l| l.ends_with(":execute]:")).count(), 4);
        assert_eq!(r.error.traceback.last().unwrap(), "... 2 more exceptions ...");
        assert_eq!(r.failed_engines, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn missing_traceback() {
        let dead = EngineOutput::new(3, vec![OutputEvent::error("EngineError", "engine 3 died (signal 9)", vec![])]);
        let r = error_report(std::slice::from_ref(&dead), false).unwrap();
        assert_eq!(r.error.traceback, vec!["[3:execute]:", "No traceback available", ""]);
        let r = error_report(&[dead], true).unwrap();
        assert_eq!(r.error.traceback, vec!["[3:execute]", "No traceback available"]);
    }

    #[test]
    fn single_target_is_a_remote_error() {
        let r = error_report(&[failing(1)], true).unwrap();
        assert_eq!(
            r,
            ErrorReport {
                error: ErrorContent::bare(
                    "RemoteError",
                    "[1:execute] Panic: oops! 1",
                    vec![
                        "[1:execute]".into(),
                        "thread 'main' panicked at src/lib.rs:3:5:".into(),
                        "oops! 1".into(),
                        "note: run with RUST_BACKTRACE=1".into()
                    ]
                ),
                failed_engines: vec![1],
            }
        );
    }

    #[test]
    fn already_displayed_says_how_many() {
        let r = already_displayed(6, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(r.error.ename, "AlreadyDisplayedError");
        assert_eq!(r.error.evalue, "6 errors");
        assert_eq!(r.error.traceback, vec!["6 errors"]);
    }
}
