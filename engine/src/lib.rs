//! rpx's thin engine: speaks ipyparallel 9's engine protocol to the controller and runs Rust
//! cells compiled by the cluster's shared `rpx-compiler` in a supervised worker process.
//!
//! The `ipengine` process is a small single-threaded tokio supervisor that owns every socket.
//! It re-executes itself as a worker (`RPX_ENGINE_WORKER=1`) that loads each compiled cell
//! (`.so`) and calls it with the engine's variable store. User code that aborts, segfaults or
//! exits kills only the worker; the supervisor reports it and starts a new one.
//!
//! # Layout
//! - [`engine`]: the engine loop: wires socket, compiler, worker and clock events to the
//!   decisions below and carries out what they return (send, publish, write to the worker);
//!   control requests, heartbeat check, shutdown.
//!
//! Decisions, pure (unit-tested without sockets or processes):
//! - [`queue`]: the shell request queue: which queued request may start now (one that needs
//!   the compiler waits while it connects), aborted ids, abort of everything queued.
//! - [`cell`]: a cell's state and the verdict it ends with (refused artifact, worker died,
//!   interrupted, panic, compiler error), the panic grace, the loads the compiler sent (which
//!   runs next, which are skipped), the pull error mapping, and the pushed-values bookkeeping
//!   (what the next cell binds, which values are fresh, how a pull is answered).
//! - [`call`]: closure calls: what a `closure_reply` means for the waiting call, the closures
//!   compiled so far, the worker's result status as a reply or an error.
//! - [`supervise`]: restarting the worker (at once, or on demand after five deaths at
//!   startup) and following up an interrupt (SIGINT again, kill after the grace period).
//! - [`compiler`]: the compiler as the engine sees it: connecting, ready or absent (and why),
//!   one connection attempt at a time, gone when its connection drops or it stays silent;
//!   decoding its messages.
//! - [`liveness`]: whether the compiler is still there, from its connection and pings.
//! - [`link`]: the link to the controller: registered or lost (evicted, connection closed,
//!   heartbeat silence while awake), when to register again and over which sockets, when to
//!   give up (`ipengine --reconnect-timeout`).
//! - [`artifacts`]: where compiled artifacts and runtime libraries are loaded from: by path on
//!   the compiler's host, else the per-host cache filled by one checked fetch per artifact and
//!   host (decisions over the cache directory).
//! - [`output`]: parsing the worker's stdout (user text, evcxr markers, content blocks) and
//!   finding panic messages in its stderr (the markers are `rpx_worker::markers`).
//! - [`reply`]: reply metadata and contents in ipyparallel's shape, and the engine's error kinds.
//! - [`signals`]: signal names for `signal_request` and exit-status descriptions.
//!
//! Carrying them out:
//! - [`outbox`]: what goes out to the controller: replies on the request's socket, iopub
//!   publications, the worker's stdout/stderr buffered and flushed to iopub.
//! - [`net`]: registration, connecting sockets, the send/receive pump tasks (which hand the
//!   loop [`net::LoopEvent`]s), the heart, registering again over new sockets, the compiler
//!   handshake.
//! - [`child`]: the worker command, spawning the worker, reading its pipes, noticing its death,
//!   the slot holding the running worker. The worker process itself (`LOAD_AND_RUN` and `CALL`
//!   on stdin, markers out, SIGINT as a panic in the running cell) is the `rpx-worker` crate,
//!   shared with the kernel.
//! - [`namespace`]: the engine namespace on disk (pushed and pulled values, one file per name)
//!   and the code that binds pushed values into cells or writes variables out for a pull. Pure
//!   apart from file reads and writes.
//! - [`datalink`]: the cross-host data link: a listener and a thread per transfer writing a
//!   pushed value into the namespace or sending a pull's snapshot, and the ledger of what it
//!   received and may send (`rpx_protocol::datalink`).
//!
//! # Example
//! ```
//! use rpx_engine::output::{StdoutEvent, StdoutParser};
//! let mut p = StdoutParser::new();
//! let ev = p.feed(b"hello\nEVCXR_EXECUTION_COMPLETE\n");
//! assert_eq!(ev, vec![StdoutEvent::Text("hello\n".into()), StdoutEvent::Complete]);
//! ```

pub mod artifacts;
pub mod call;
pub mod cell;
pub mod child;
pub mod compiler;
pub mod datalink;
pub mod engine;
pub mod history;
pub mod link;
pub mod liveness;
pub mod namespace;
pub mod net;
pub mod outbox;
pub mod output;
pub mod queue;
pub mod reply;
pub mod signals;
pub mod supervise;

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
