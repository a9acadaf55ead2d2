//! The engine's view of its compiler: connecting (at startup), ready (a live link) or absent
//! (and why); at most one connection attempt at a time; whether a compiler that was ready is
//! gone (its connection closed, or it stayed silent while something waited on it, see
//! [`crate::liveness`]).
//!
//! Also decoding what the compiler sends into [`CompilerMessage`]s. Pure apart from queueing
//! messages on the link's outlet: the engine loop starts connection attempts when
//! [`Compiler::start_attempt`] says so, and fails what waited on a compiler that is gone.

use std::time::Instant;

use bytes::Bytes;
use rpx_protocol::compile::{msg_type, ArtifactReply, CellReply, ClosureReply, Load};
use serde_json::Value;
use tracing::{debug, warn};

use crate::liveness::{CompilerWatch, Watch};
use crate::net::{self, CompilerLink, Frames};

/// A message from the compiler the engine acts on.
#[derive(Debug)]
pub enum CompilerMessage {
    /// Nothing to do beyond having heard from it (`pong`, a late `engine_hello_reply`).
    Heard,
    /// An artifact asked for, with its bytes.
    ArtifactReply(ArtifactReply, Option<Bytes>),
    /// Run a compiled cell's code in the worker.
    Load(Load),
    /// The verdict for a cell.
    CellReply(CellReply),
    /// A compiled closure, or why it did not compile.
    ClosureReply(ClosureReply),
}

#[derive(Debug)]
enum State {
    Connecting,
    Ready(Box<CompilerLink>),
    Absent(String),
}

/// The compiler connection as the engine sees it.
#[derive(Debug)]
pub struct Compiler {
    state: State,
    /// A connection attempt is under way.
    attempting: bool,
    /// The compiler's liveness, from its messages.
    watch: CompilerWatch,
}

impl Compiler {
    /// At startup: the first connection attempt is under way.
    pub fn new(now: Instant) -> Compiler {
        Compiler { state: State::Connecting, attempting: true, watch: CompilerWatch::new(now) }
    }

    /// Still connecting at startup: requests that need the compiler wait.
    pub fn connecting(&self) -> bool {
        matches!(self.state, State::Connecting)
    }

    /// The live link, if a compiler is ready.
    pub fn link(&self) -> Option<&CompilerLink> {
        match &self.state {
            State::Ready(link) => Some(link),
            _ => None,
        }
    }

    /// Why there is no compiler, if there is none (cells then fail with `NoCompiler`).
    pub fn absent(&self) -> Option<&str> {
        match &self.state {
            State::Absent(why) => Some(why),
            _ => None,
        }
    }

    /// A connection attempt succeeded at `now`.
    pub fn connected(&mut self, link: CompilerLink, now: Instant) {
        self.attempting = false;
        self.watch = CompilerWatch::new(now);
        self.state = State::Ready(Box::new(link));
    }

    /// A connection attempt failed.
    pub fn failed(&mut self, why: String) {
        self.attempting = false;
        self.state = State::Absent(why);
    }

    /// Whether the link `link_id` (whose connection dropped) is the current one; an older
    /// link's drop means nothing.
    pub fn is_current(&self, link_id: u64) -> bool {
        self.link().is_some_and(|l| l.id == link_id)
    }

    /// Something needs a compiler that is not there: returns whether the caller should start a
    /// connection attempt (not while one is under way).
    pub fn start_attempt(&mut self) -> bool {
        !std::mem::replace(&mut self.attempting, true)
    }

    /// The ready compiler is gone (`why`): it is absent from now on. Returns its url, or `None`
    /// if none was ready (then nothing changes).
    pub fn gone(&mut self, why: &str) -> Option<String> {
        let url = self.link()?.url.clone();
        self.state = State::Absent(format!("the compiler at {url} is gone: {why}"));
        Some(url)
    }

    /// A message from the compiler arrived at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.watch.heard(now);
    }

    /// Decode `frames` from the compiler, arriving at `now` (hearing from it). `None`: dropped
    /// (not from the current compiler, badly signed, malformed or unexpected; said in the log).
    pub fn decode(&mut self, frames: Frames, now: Instant) -> Option<CompilerMessage> {
        let Some(link) = self.link() else {
            debug!("message from a compiler that is no longer current; dropped");
            return None;
        };
        let m = link.session.decode(frames).map_err(|e| warn!(error = %e, "bad message from the compiler dropped")).ok()?;
        self.watch.heard(now);
        let (content, buffers) = (m.content, m.buffers);
        let msg = match m.header.msg_type.as_str() {
            msg_type::PONG | msg_type::ENGINE_HELLO_REPLY => CompilerMessage::Heard,
            msg_type::ARTIFACT_REPLY => {
                CompilerMessage::ArtifactReply(parse(content, msg_type::ARTIFACT_REPLY)?, buffers.into_iter().next())
            }
            msg_type::LOAD => CompilerMessage::Load(parse(content, msg_type::LOAD)?),
            msg_type::CELL_REPLY => CompilerMessage::CellReply(parse(content, msg_type::CELL_REPLY)?),
            msg_type::CLOSURE_REPLY => CompilerMessage::ClosureReply(parse(content, msg_type::CLOSURE_REPLY)?),
            other => {
                warn!(msg_type = other, "unexpected message from the compiler");
                return None;
            }
        };
        Some(msg)
    }

    /// Check the ready compiler's liveness at `now`; `waiting`: something waits on it.
    pub fn check(&mut self, now: Instant, waiting: bool) -> Watch {
        if self.link().is_none() {
            return Watch::Quiet;
        }
        self.watch.check(now, waiting)
    }

    /// Queue a message for the ready compiler; `false` if there is none.
    pub fn send(&self, msg_type: &str, content: Value, metadata: Value) -> bool {
        let Some(link) = self.link() else { return false };
        let (_, frames) = link.session.msg(&[], msg_type, content, None, metadata, &[]);
        net::push(&link.out, frames, msg_type);
        true
    }
}

/// A compiler message's content as `T`; a malformed one is dropped (said in the log).
fn parse<T: serde::de::DeserializeOwned>(content: Value, msg_type: &str) -> Option<T> {
    serde_json::from_value(content).map_err(|e| warn!(error = %e, "malformed {msg_type} dropped")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::SILENCE;
    use rpx_protocol::compile::{EngineHelloReply, HostProbe};
    use rpx_protocol::Session;
    use serde_json::json;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn link(id: u64) -> (CompilerLink, mpsc::Receiver<net::Frames>) {
        let (out, rx) = mpsc::channel(8);
        let hello = EngineHelloReply {
            probe: HostProbe { path: "/nonexistent".into(), token: "t".into() },
            runtime_libs: vec![],
            history_restored: false,
        };
        (
            CompilerLink {
                id,
                url: format!("tcp://compiler:{id}"),
                out,
                session: Session::new(b"ck", "engine"),
                hello,
                readers: Vec::new(),
            },
            rx,
        )
    }

    #[test]
    fn at_startup_the_engine_waits_for_its_first_connection_attempt() {
        let mut c = Compiler::new(Instant::now());
        assert!(c.connecting());
        assert!(c.absent().is_none() && c.link().is_none());
        assert!(!c.start_attempt(), "the first attempt is already under way");
        assert!(!c.send("ping", json!({}), json!({})), "nothing to send to yet");
    }

    #[test]
    fn a_failed_attempt_makes_the_compiler_absent_and_the_next_need_tries_again_once() {
        let mut c = Compiler::new(Instant::now());
        c.failed("no compiler announced in /x within 5s".into());
        assert!(!c.connecting());
        assert_eq!(c.absent(), Some("no compiler announced in /x within 5s"));
        assert!(c.start_attempt());
        assert!(!c.start_attempt(), "one attempt at a time");
    }

    #[test]
    fn a_ready_compiler_gets_messages_and_is_gone_once() {
        let t0 = Instant::now();
        let mut c = Compiler::new(t0);
        let (l, mut rx) = link(3);
        c.connected(l, t0);
        assert!(!c.connecting() && c.absent().is_none());
        assert!(c.send("cell_request", json!({"cell_id": "c"}), json!({"engine": "u"})));
        let m = Session::new(b"ck", "x").decode(rx.try_recv().unwrap()).unwrap();
        assert_eq!((m.msg_type(), m.content["cell_id"].as_str()), ("cell_request", Some("c")));
        assert_eq!(c.gone("its connection closed").as_deref(), Some("tcp://compiler:3"));
        assert_eq!(c.absent(), Some("the compiler at tcp://compiler:3 is gone: its connection closed"));
        assert_eq!(c.gone("again"), None, "gone only once");
        assert!(!c.send("ping", json!({}), json!({})));
    }

    #[test]
    fn only_the_current_links_drop_counts() {
        let t0 = Instant::now();
        let mut c = Compiler::new(t0);
        assert!(!c.is_current(1));
        c.connected(link(1).0, t0);
        assert!(c.is_current(1));
        c.connected(link(2).0, t0);
        assert!(!c.is_current(1), "an older connection dropping is not the compiler going away");
        assert!(c.is_current(2));
    }

    fn from_compiler(msg_type: &str, content: Value) -> Frames {
        Session::new(b"ck", "compiler").msg(&[], msg_type, content, None, json!({}), &[]).1
    }

    #[test]
    fn compiler_messages_are_decoded_and_count_as_hearing_from_it() {
        let t0 = Instant::now();
        let mut c = Compiler::new(t0);
        assert!(c.decode(from_compiler(msg_type::PONG, json!({})), t0).is_none(), "no compiler is ready");
        c.connected(link(1).0, t0);
        let reply = json!({"cell_id": "c1", "status": "error", "ename": "CompileError", "evalue": "bad"});
        match c.decode(from_compiler("cell_reply", reply), t0 + SILENCE) {
            Some(CompilerMessage::CellReply(r)) => assert_eq!((r.cell_id.as_str(), r.error.ename.as_str()), ("c1", "CompileError")),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.check(t0 + SILENCE * 2 - Duration::from_millis(1), true), Watch::Ping, "heard at the cell_reply");
        assert!(matches!(c.decode(from_compiler(msg_type::PONG, json!({})), t0), Some(CompilerMessage::Heard)));
    }

    #[test]
    fn malformed_unexpected_or_badly_signed_compiler_messages_are_dropped() {
        let t0 = Instant::now();
        let mut c = Compiler::new(t0);
        c.connected(link(1).0, t0);
        assert!(c.decode(from_compiler("load", json!({"cell_id": "c1"})), t0).is_none(), "a load without its artifact");
        assert!(c.decode(from_compiler("teleport", json!({})), t0).is_none());
        let forged = Session::new(b"other key", "x").msg(&[], msg_type::PONG, json!({}), None, json!({}), &[]).1;
        assert!(c.decode(forged, t0 + SILENCE * 2).is_none());
        assert!(matches!(c.check(t0 + SILENCE * 2, true), Watch::Gone(_)), "a forged message is not hearing from the compiler");
    }

    #[test]
    fn silence_is_only_checked_while_a_compiler_is_ready() {
        let t0 = Instant::now();
        let mut c = Compiler::new(t0);
        let late = t0 + SILENCE * 2;
        assert_eq!(c.check(late, true), Watch::Quiet, "no compiler: nothing to declare gone");
        c.connected(link(1).0, t0);
        assert!(matches!(c.check(late, true), Watch::Gone(_)));
        c.connected(link(2).0, late);
        c.heard(late + SILENCE);
        assert_eq!(c.check(late + SILENCE + Duration::from_secs(1), true), Watch::Ping);
    }
}
