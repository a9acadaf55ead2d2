//! The marker lines on a worker's stdout (and [`CALL_END`] on stderr): evcxr's, written by the
//! code it generates around a cell, and the worker's own. The engine's output parser and the
//! kernel's stdout relay read them.

/// The worker finished a `LOAD_AND_RUN`.
pub const EXECUTION_COMPLETE: &str = "EVCXR_EXECUTION_COMPLETE";
/// User code panicked (caught by the generated wrapper).
pub const PANIC_NOTIFICATION: &str = "EVCXR_PANIC_NOTIFICATION";
/// The worker's own marker: the cell was interrupted (SIGINT); printed after the cell returned,
/// before [`EXECUTION_COMPLETE`].
pub const INTERRUPTED: &str = "RPX_INTERRUPTED";
/// The worker's own marker after a closure call's output, on stdout or stderr when that
/// stream's pipe still held some of it as the call returned (the call's result says which): what
/// came before it on that stream was the call's output (calls are handed to the worker ahead of
/// time, so a stream can hold the next call's output right behind it).
pub const CALL_END: &str = "RPX_CALL_END";
/// A `?` in user code returned an error.
pub const ERROR_OCCURRED: &str = "EVCXR_ERROR_OCCURRED";
/// Prefix of `EVCXR_VARIABLE_CHANGED_TYPE:<name>`.
pub const VARIABLE_CHANGED_TYPE: &str = "EVCXR_VARIABLE_CHANGED_TYPE:";
/// Prefix of `EVCXR_BEGIN_CONTENT <mime>`.
pub const BEGIN_CONTENT: &str = "EVCXR_BEGIN_CONTENT ";
/// End of a content block.
pub const END_CONTENT: &str = "EVCXR_END_CONTENT";
/// Prefix of `EVCXR_INPUT_REQUEST:<prompt>` (and `EVCXR_INPUT_REQUEST_PASSWORD:<prompt>`).
pub const INPUT_REQUEST: &str = "EVCXR_INPUT_REQUEST";
