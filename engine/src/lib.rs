//! rpx's thin engine: speaks ipyparallel 9's engine protocol to the controller and runs Rust
//! cells compiled by the cluster's shared `rpx-compiler` in a supervised worker process.
//!
//! The `ipengine` process is a small single-threaded tokio supervisor that owns every socket.
//! It re-executes itself as a worker (`RPX_ENGINE_WORKER=1`) that loads each compiled cell
//! (`.so`) and calls it with the engine's variable store. User code that aborts, segfaults or
//! exits kills only the worker; the supervisor reports it and starts a new one.
//!
//! # Layout
//! - [`engine`]: the engine loop: registration, request queue, cells (compiler messages and
//!   worker events as a state machine), control requests, iopub, heartbeat check, shutdown.
//! - [`net`]: connecting sockets, the send/receive pump tasks, the heart, the compiler handshake.
//! - [`artifacts`]: where compiled artifacts are loaded from: by path on the compiler's host,
//!   else the per-host cache filled by one checked fetch per artifact and host. Pure decisions.
//! - [`liveness`]: whether the compiler is still there, from its connection and pings. Pure.
//! - [`child`]: spawning the worker, reading its pipes, noticing its death.
//! - [`worker`]: the worker process itself (plain std): `LOAD_AND_RUN` lines in, markers out;
//!   [`worker::interrupt`] turns SIGINT into a panic injected into the running cell.
//! - [`namespace`]: the engine namespace on disk (pushed and pulled values, one file per name)
//!   and the code that binds pushed values into cells or writes variables out for a pull. Pure
//!   apart from file reads and writes.
//! - [`output`]: parsing the worker's stdout (user text, evcxr markers, content blocks) and
//!   finding panic messages in its stderr. Pure.
//! - [`reply`]: reply metadata and contents in ipyparallel's shape, and the engine's error kinds.
//!   Pure.
//! - [`signals`]: signal names for `signal_request` and exit-status descriptions. Pure.
//!
//! # Example
//! ```
//! use rpx_engine::output::{StdoutEvent, StdoutParser};
//! let mut p = StdoutParser::new();
//! let ev = p.feed(b"hello\nEVCXR_EXECUTION_COMPLETE\n");
//! assert_eq!(ev, vec![StdoutEvent::Text("hello\n".into()), StdoutEvent::Complete]);
//! ```

pub mod artifacts;
pub mod child;
pub mod engine;
pub mod liveness;
pub mod namespace;
pub mod net;
pub mod output;
pub mod reply;
pub mod signals;
pub mod worker;

/// Errors of the engine library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Registration with the controller failed.
    #[error("registration failed: {0}")]
    Registration(String),
    /// A socket could not connect or send.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Bad configuration (missing connection file, ...).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] rpx_protocol::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
