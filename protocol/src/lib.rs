//! The rpx wire protocol: ipyparallel 9's message framing and HMAC-SHA256 signing, connection
//! files and profile directories, and the messages rpx's own processes exchange.
//!
//! # Layout
//! - [`session`]: [`Session`] signs and encodes messages into multipart frames (from JSON values,
//!   or from frames already serialized: [`Session::frames`], [`Session::signed_part`]) and decodes
//!   and verifies them back into [`Message`]s. The only place that knows the frame layout.
//! - [`message`]: [`Header`] and [`Message`], plus helpers to build replies and error contents.
//! - [`content`]: typed contents of the execution family (`execute_*`, `apply_reply`'s error and
//!   `engine_info`, iopub outputs, stdin, the kernel's shell and control requests, `abort_request`,
//!   `signal_request`) on `jupyter-protocol`'s types, and the one error type
//!   ([`content::ErrorContent`], [`content::ErrorName`]).
//! - [`connection`]: the `ipcontroller-{client,engine}.json` files in ipyparallel's format,
//!   profile directories under `$RPX_DIR`, and private (0600), atomic file writes.
//! - [`dataplane`]: the same-host data plane: values handed over as files in the engine's
//!   namespace (the rule deciding who may, transfer files, digests).
//! - [`datalink`]: the cross-host data plane: values streamed between a client and an engine
//!   on another host over a connection of their own, checked against the signed request's digest.
//! - [`compile`]: the messages between thin engines and the shared compiler.
//! - [`hub`]: the hub's query, reply and notification contents (connection, queue, result,
//!   history, db, purge, resubmit, load), broadcast metadata keys and task dependencies.
//! - [`apply`]: rpx's closure, map, push and pull payloads inside `apply_request`.
//! - [`registration`]: engine registration contents and the eviction notice that makes an
//!   evicted rpx engine register again.
//! - [`targets`]: the one target grammar (`all`, `3`, `0:4`, `1,3,5`) and its resolution, read
//!   by the client's views and the magics' `--targets`.
//! - [`signals`]: the one table of signal names and numbers.
//! - [`batch`]: rpx-only batches, several signed messages in one zeromq message between rpx
//!   peers that announced them (the load-balanced task path).
//!
//! This crate opens no sockets and does not depend on zeromq: the conversion between frames
//! and zeromq messages is `rpx_guard::zmq`, and transports live in the crates that use it.

pub mod apply;
pub mod batch;
pub mod compile;
pub mod connection;
pub mod content;
pub mod datalink;
pub mod dataplane;
pub mod hub;
pub mod message;
pub mod registration;
pub mod session;
pub mod signals;
pub mod targets;

pub use connection::{ClientConnection, EngineConnection, Profile};
pub use message::{Header, Message};
pub use session::Session;

/// Errors from decoding, verifying and file handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The frames have no `<IDS|MSG>` delimiter or fewer than four JSON frames after it.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The HMAC signature does not match the message.
    #[error("invalid message signature")]
    BadSignature,
    /// A JSON frame did not parse.
    #[error("bad JSON in message frame: {0}")]
    Json(#[from] serde_json::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
