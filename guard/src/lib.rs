//! The front of every socket rpx binds (controller, compiler, kernel).
//!
//! The zeromq crate's decoder sets aside the length a frame header declares before reading the
//! body, so one unauthenticated header declaring 2^62 bytes aborts the process. rpx therefore
//! never lets a peer talk to zeromq directly: [`bind`] listens on the TCP address itself and
//! binds the zeromq socket on a Unix socket in a private (0700) directory; each accepted peer
//! is relayed to it through [`zmtp::FrameCheck`], which validates the ZMTP greeting and every
//! frame header and refuses a frame, message or command above [`Limits`] before any byte of it
//! reaches zeromq. Frames above 64 KiB also take their length from one receive budget per
//! process before their header is passed on, so the memory zeromq sets aside for frames in
//! flight is bounded across all peers. Outbound bytes are relayed unchanged.
//!
//! zeromq 0.7 keys a ROUTER's peers by the identity each presents in its READY command, and a
//! second connection with a live peer's identity replaces it: it would receive what is routed
//! to that peer. The guard therefore remembers, per listener, the identities of its live
//! connections, and closes a new connection presenting one of them before its READY command
//! reaches zeromq, unless the listener's [`Takeover`] policy lets that identity be taken over
//! (the controller allows it for engines it no longer considers alive). An identity is free
//! again once its connection ends.
//!
//! - [`zmtp`]: the pure streaming check.
//! - [`front`]: the TCP listener and the per-connection relay.
//! - [`zmq`]: frames to and from `zeromq` messages, for every process that talks over zeromq.

pub mod front;
pub mod zmq;
pub mod zmtp;

use std::sync::Arc;
use std::time::Duration;

use zeromq::{Endpoint, Socket, ZmqError};

/// Environment variable bounding every received message and frame (bytes; `K`, `M`, `G`
/// suffixes accepted).
pub const MAX_MESSAGE_ENV: &str = "RPX_MAX_MESSAGE_SIZE";

/// Bounds on what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message frame (data and buffers).
    pub max_frame: u64,
    /// Largest multipart message (sum of its frames).
    pub max_message: u64,
    /// Largest ZMTP command frame (READY, SUBSCRIBE, PING).
    pub max_command: u64,
    /// Bytes of large frames (above 64 KiB) in flight at once over all peers of a process.
    pub budget: u64,
    /// Time a new peer has to complete the ZMTP handshake.
    pub handshake_timeout: Duration,
    /// Longest silence of a peer in the middle of a large frame, or waiting for budget.
    pub stall_timeout: Duration,
    /// Peers connected at once on one listener; more are refused.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: 1 << 30,
            max_message: 1 << 30,
            max_command: 64 << 10,
            budget: 2 << 30,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

impl Limits {
    /// The defaults, with the message and frame bound taken from [`MAX_MESSAGE_ENV`] if set.
    pub fn from_env() -> Result<Limits, Error> {
        match std::env::var(MAX_MESSAGE_ENV) {
            Ok(v) => Limits::with_max_message(
                parse_size(&v)
                    .ok_or_else(|| Error::Limits(format!("{MAX_MESSAGE_ENV}={v:?} is not a size (bytes, or a number with K, M or G)")))?,
            ),
            Err(_) => Ok(Limits::default()),
        }
    }

    /// The defaults with messages and frames bounded at `max` bytes (64 KiB to 1 TiB); the
    /// budget is twice that.
    pub fn with_max_message(max: u64) -> Result<Limits, Error> {
        if max < 64 << 10 {
            return Err(Error::Limits(format!("a maximum message size of {max} bytes is below the minimum of 64 KiB")));
        }
        if max > 1 << 40 {
            return Err(Error::Limits(format!("a maximum message size of {max} bytes is above the maximum of 1 TiB")));
        }
        Ok(Limits { max_frame: max, max_message: max, budget: 2 * max, ..Limits::default() })
    }
}

/// `123`, `64K`, `512M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Why a socket could not be bound behind the guard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad endpoint {0:?}: expected tcp://HOST:PORT")]
    Endpoint(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot create the private socket directory: {0}")]
    Private(std::io::Error),
    #[error(transparent)]
    Zmq(#[from] ZmqError),
    #[error("{0}")]
    Limits(String),
}

/// Whether a new connection may take over `identity`, which a live connection on the same
/// listener holds (its READY command presented the same non-empty identity). Called from the
/// guard's tasks: it must be cheap and must not block.
pub type Takeover = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// The policy of [`bind`]: a live connection's identity is never taken over.
pub fn never_take_over() -> Takeover {
    Arc::new(|_: &[u8]| false)
}

/// How a socket is guarded.
#[derive(Clone)]
pub struct Options {
    pub limits: Limits,
    pub takeover: Takeover,
}

impl Options {
    /// These limits, and identities of live connections never taken over.
    pub fn new(limits: Limits) -> Options {
        Options { limits, takeover: never_take_over() }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Bind `socket` on `endpoint` (`tcp://HOST:PORT`; `*` or `0.0.0.0` for every interface, port 0
/// for any free one) behind the guard, with [`Limits::from_env`]; an identity held by a live
/// connection is never taken over. Returns the TCP endpoint peers connect to. Must run inside
/// a tokio runtime, which the relay tasks live in.
pub async fn bind<S: Socket>(socket: &mut S, endpoint: &str) -> Result<Endpoint, Error> {
    front::bind_options(socket, endpoint, Options::new(Limits::from_env()?)).await
}

/// [`bind`], with `takeover` deciding whether a new connection may take over an identity a
/// live connection holds.
pub async fn bind_with_takeover<S: Socket>(socket: &mut S, endpoint: &str, takeover: Takeover) -> Result<Endpoint, Error> {
    front::bind_options(socket, endpoint, Options { limits: Limits::from_env()?, takeover }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size(" 2G "), Some(2 << 30));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn a_max_message_sets_frames_and_budget_and_has_a_floor() {
        let l = Limits::with_max_message(8 << 20).unwrap();
        assert_eq!((l.max_frame, l.max_message, l.budget), (8 << 20, 8 << 20, 16 << 20));
        assert!(Limits::with_max_message(1000).is_err());
        assert!(Limits::with_max_message(u64::MAX).is_err());
    }
}
