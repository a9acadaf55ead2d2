//! The rpx controller (hub): one tokio process that speaks ipyparallel 9's wire protocol, so the
//! real Python `ipyparallel.Client` and Python engines work against it, as do rpx's own engines.
//!
//! # Layout
//! - [`config`]: command-line arguments ([`config::Args`]) checked into a [`config::Config`].
//! - [`scheduler`]: the load-balancing schemes (`leastload`, `lru`, `plainrandom`, `twobin`,
//!   `weighted`) as pure functions over engine loads.
//! - [`state`]: what the hub knows: engines, in-flight messages, the task queue and task records.
//! - [`wire`]: verifying raw frames and reading the few header/metadata fields routing needs.
//! - [`hub`]: every decision (registration, routing, scheduling, retries, timeouts, engine death,
//!   client queries) as `on_*` methods over the state and a [`hub::Comm`] that sends frames.
//!   No socket in sight; unit tests drive it with a recording `Comm`. `hub/mod.rs` holds the
//!   state, event dispatch and ticks; `engines.rs` registration, heartbeats, eviction and engine
//!   death; `routing.rs` mux/control routing and replies; `tasks.rs` load-balanced scheduling and
//!   task records; `broadcast.rs` fan-out and coalescing; `queries.rs` the client queries.
//! - [`store`]: persisted task records (`--db sqlite`, `--restore`): the SQLite file and the
//!   writer thread that applies the hub's writes in batches and answers its lookups.
//! - [`net`]: the tokio layer: binds the sockets, writes the connection files, runs one reader
//!   task per socket, one bounded writer per peer, and the single hub task.
//!
//! # Concurrency
//! The hub is a single task that owns all state (no locks). Reader tasks verify signatures and
//! parse headers in parallel and send [`hub::HubEvent`]s over a channel; the hub answers
//! through per-peer bounded writer tasks, so a stuck engine never blocks the others. The one
//! thing shared is the set of alive engine identities ([`state::AliveEngines`], a `RwLock`
//! written by the hub when an engine registers or dies, read by the guard's tasks when a
//! connection presents an identity already held), so the guard lets only a dead engine's
//! identity be taken over.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> rpx_controller::Result<()> {
//! use clap::Parser;
//! let config = rpx_controller::config::Args::parse_from(["ipcontroller", "--ping", "250"]).check()?;
//! rpx_controller::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod config;
pub mod hub;
pub mod net;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod wire;

#[cfg(test)]
mod hub_store_tests;
#[cfg(test)]
mod hub_tests;

pub use net::{run, run_with_ready, Ready};

/// Errors of the controller library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command-line value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: rpx_guard::Error,
    },
    /// The task database cannot be used (`--db sqlite`).
    #[error("task database {path}: {message}")]
    Db { path: std::path::PathBuf, message: String },
    /// Connection files or profile directories could not be written.
    #[error(transparent)]
    Protocol(#[from] rpx_protocol::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
