//! What the engine sends to the controller: replies on the socket each request came from,
//! iopub publications (status, inputs, results, errors) and the stdout/stderr text of the
//! worker, buffered and published at least every [`FLUSH_PERIOD`] (at once past
//! [`FLUSH_BYTES`]), with the running request as parent.
//!
//! The engine's decisions say what to send; [`Outbox`] signs it and queues it on the outlet of
//! the right socket ([`crate::net::Outlets`]), never blocking the engine loop.
//!
//! An rpx `apply_request` holds its `busy` status back ([`Outbox::defer_busy`]): it goes out
//! just before the first publication for anything, and a request answered by [`Outbox::ok`]
//! with nothing published is answered quietly (no status at all, the reply's metadata says
//! [`rpx_protocol::apply::QUIET_KEY`]). A trivial closure call costs one reply, not three
//! messages.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::content::ReplyMetadata;
use rpx_protocol::hub::UnregistrationRequest;
use rpx_protocol::{Header, Session};
use serde_json::{json, Value};
use tracing::warn;

use crate::net::{push, Outlets};
use crate::queue::Request;
use crate::reply::{self, EngineError, Identity};

/// Streams are flushed at least this often while output is pending.
pub const FLUSH_PERIOD: Duration = Duration::from_millis(50);
/// Stream buffers are flushed early beyond this size.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// The last line of stderr waits this long before a periodic flush publishes it: the text of
/// the error a top-level `?` returned is written there just before the cell ends, and is
/// shown as the cell's error instead ([`Outbox::drop_stderr_tail`]), not twice.
pub const STDERR_TAIL_HOLD: Duration = Duration::from_millis(100);

/// The worker's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Signs and queues everything the engine sends, and buffers the worker's output.
pub struct Outbox {
    me: Identity,
    session: Session,
    pub outlets: Outlets,
    out_buf: String,
    err_buf: String,
    stream_parent: Option<Header>,
    last_flush: Instant,
    /// When stderr text was last buffered.
    err_written: Instant,
    /// The request whose `busy` status waits for its first publication.
    held_busy: Mutex<Option<Header>>,
}

impl Outbox {
    pub fn new(me: Identity, session: Session, outlets: Outlets) -> Outbox {
        Outbox {
            me,
            session,
            outlets,
            out_buf: String::new(),
            err_buf: String::new(),
            stream_parent: None,
            last_flush: Instant::now(),
            err_written: Instant::now(),
            held_busy: Mutex::new(None),
        }
    }

    /// The engine's id changed (it registered again under a new one).
    pub fn set_identity(&mut self, me: Identity) {
        self.me = me;
    }

    /// Sign with `session` from now on (the controller's key changed).
    pub fn set_session(&mut self, session: Session) {
        self.session = session;
    }

    /// Answer `req` on the socket it came from.
    pub fn reply(&self, req: &Request, content: Value, md: ReplyMetadata) {
        self.reply_with_buffers(req, content, md, &[]);
    }

    pub fn reply_with_buffers(&self, req: &Request, content: Value, md: ReplyMetadata, buffers: &[Bytes]) {
        let msg_type = reply::reply_type(req.msg_type());
        let md = reply::finish_metadata(md, &content, &self.me);
        let (_, frames) = self.session.msg(&req.idents, &msg_type, content, Some(&req.header), md, buffers);
        match self.outlets.for_channel(req.channel) {
            Some(o) => push(o, frames, &msg_type),
            None => warn!(msg_type, "no socket to reply on"),
        }
    }

    /// Publish on iopub under the topic `engine.<id>.<kind>` (after the held `busy`, if any).
    pub fn publish(&self, kind: &str, msg_type: &str, content: Value, parent: Option<&Header>) {
        let held = self.held_busy.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(busy) = held {
            self.send_iopub("status", "status", json!({"execution_state": "busy"}), Some(&busy));
        }
        self.send_iopub(kind, msg_type, content, parent);
    }

    fn send_iopub(&self, kind: &str, msg_type: &str, content: Value, parent: Option<&Header>) {
        let topic = Bytes::from(self.me.topic(kind));
        let (_, frames) = self.session.msg(&[topic], msg_type, content, parent, reply::plain_metadata(&self.me), &[]);
        push(&self.outlets.iopub, frames, msg_type);
    }

    /// Hold the `busy` status of the request `parent` until something is published.
    pub fn defer_busy(&self, parent: &Header) {
        *self.held_busy.lock().unwrap_or_else(|p| p.into_inner()) = Some(parent.clone());
    }

    /// Whether nothing was published for `req` since its `busy` was held (and forget it).
    fn take_quiet(&self, req: &Request) -> bool {
        let mut held = self.held_busy.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = held.as_ref().is_some_and(|h| h.msg_id == req.header.msg_id);
        if quiet {
            *held = None;
        }
        quiet
    }

    /// Answer `req` with `content` and publish `idle`, or answer it quietly if nothing was
    /// published for it.
    fn finish(&self, req: &Request, content: Value, mut md: ReplyMetadata, buffers: &[Bytes]) {
        if self.take_quiet(req) {
            md.quiet = true;
            return self.reply_with_buffers(req, content, md, buffers);
        }
        self.reply_with_buffers(req, content, md, buffers);
        self.status("idle", &req.header);
    }

    /// Publish the engine's execution state (`busy`, `idle`) for the request `parent`.
    pub fn status(&self, state: &str, parent: &Header) {
        self.publish("status", "status", json!({"execution_state": state}), Some(parent));
    }

    /// Answer `req` at once with `content`, between `busy` and `idle`.
    pub fn answer(&self, req: &Request, content: Value) {
        self.status("busy", &req.header);
        let md = reply::init_metadata(&req.metadata, &self.me);
        self.reply(req, content, md);
        self.status("idle", &req.header);
    }

    /// Answer `req` with success and these buffers (pushed, pulled or computed values), then
    /// publish `idle` (or nothing, if nothing was published for it since [`Outbox::defer_busy`]).
    pub fn ok(&self, req: &Request, md: ReplyMetadata, buffers: &[Bytes]) {
        self.finish(req, json!({"status": "ok"}), md, buffers);
    }

    /// Answer `req` with success and `key: value` in the content, no buffers.
    pub fn ok_with(&self, req: &Request, md: ReplyMetadata, key: &str, value: Value) {
        let mut content = json!({"status": "ok"});
        content[key] = value;
        self.finish(req, content, md, &[]);
    }

    /// Answer a request aborted before it ran.
    pub fn aborted(&self, req: &Request) {
        self.answer(req, reply::aborted());
    }

    /// A cell (execution `count`) failed: publish the error and answer its `execute_request`.
    pub fn execute_error(&mut self, req: &Request, md: ReplyMetadata, err: &EngineError, count: u64) {
        self.flush_streams();
        self.publish("error", "error", reply::iopub_error(err, &self.me, "execute"), Some(&req.header));
        self.reply(req, reply::execute_error(err, count, &self.me), md);
        self.status("idle", &req.header);
    }

    /// An `apply_request` (push, pull, call) failed: publish the error and answer it.
    pub fn apply_error(&mut self, req: &Request, md: ReplyMetadata, err: &EngineError) {
        self.flush_streams();
        self.publish("error", "error", reply::iopub_error(err, &self.me, "apply"), Some(&req.header));
        self.reply(req, err.reply(Some(&self.me.engine_info("apply"))), md);
        self.status("idle", &req.header);
    }

    /// Answer `req` with an error that is for the client to handle, not for its user (a closure
    /// id nobody could resolve): nothing is published for it, so the reply is quiet unless the
    /// request published before.
    pub fn declined(&mut self, req: &Request, md: ReplyMetadata, err: &EngineError) {
        self.flush_streams();
        self.finish(req, err.reply(Some(&self.me.engine_info("apply"))), md, &[]);
    }

    /// Tell the controller this engine is going away.
    pub fn unregister(&self) {
        let content = serde_json::to_value(UnregistrationRequest { id: Some(self.me.id) }).expect("content serializes");
        let (_, frames) = self.session.msg(&[], "unregistration_request", content, None, reply::plain_metadata(&self.me), &[]);
        push(&self.outlets.registration, frames, "unregistration_request");
    }

    /// Output from now on belongs to the request with this header.
    pub fn set_stream_parent(&mut self, parent: Header) {
        self.stream_parent = Some(parent);
    }

    fn buffer(&mut self, stream: Stream) -> &mut String {
        match stream {
            Stream::Stdout => &mut self.out_buf,
            Stream::Stderr => &mut self.err_buf,
        }
    }

    /// Output of the worker: buffered, and published at once when the stream's buffer is
    /// over [`FLUSH_BYTES`].
    pub fn write(&mut self, stream: Stream, text: &str) {
        if stream == Stream::Stderr {
            self.err_written = Instant::now();
        }
        self.buffer(stream).push_str(text);
        if self.buffer(stream).len() > FLUSH_BYTES {
            self.flush_streams();
        }
    }

    /// Text for a stream that goes out with the next flush.
    pub fn append(&mut self, stream: Stream, text: &str) {
        self.buffer(stream).push_str(text);
    }

    /// Is output waiting to be published?
    pub fn pending(&self) -> bool {
        !self.out_buf.is_empty() || !self.err_buf.is_empty()
    }

    /// Publish the buffered output, stdout first.
    pub fn flush_streams(&mut self) {
        for (name, buf) in [("stdout", std::mem::take(&mut self.out_buf)), ("stderr", std::mem::take(&mut self.err_buf))] {
            if !buf.is_empty() {
                self.publish(name, "stream", json!({"name": name, "text": buf}), self.stream_parent.as_ref());
            }
        }
        self.last_flush = Instant::now();
    }

    /// Publish the buffered output if some waits and the last flush is [`FLUSH_PERIOD`] old at
    /// `now`; the last line of stderr stays until it is [`STDERR_TAIL_HOLD`] old.
    pub fn flush_if_due(&mut self, now: Instant) {
        if !self.pending() || now.saturating_duration_since(self.last_flush) < FLUSH_PERIOD {
            return;
        }
        let held =
            if now.saturating_duration_since(self.err_written) < STDERR_TAIL_HOLD { self.take_last_stderr_line() } else { String::new() };
        self.flush_streams();
        self.err_buf = held;
    }

    /// Where the last line of the unpublished stderr starts (ended by a newline or not).
    fn last_stderr_line_start(&self) -> usize {
        let body = self.err_buf.strip_suffix('\n').unwrap_or(&self.err_buf);
        body.rfind('\n').map_or(0, |i| i + 1)
    }

    /// The last complete line of the unpublished stderr, taken out of it.
    fn take_last_stderr_line(&mut self) -> String {
        if !self.err_buf.ends_with('\n') {
            return String::new();
        }
        let start = self.last_stderr_line_start();
        self.err_buf.split_off(start)
    }

    /// Remove `text` (one line) from the end of the unpublished stderr, if it is there: it is
    /// the text of a `?` error that the cell's error shows. Returns whether it was.
    pub fn drop_stderr_tail(&mut self, text: &str) -> bool {
        let start = self.last_stderr_line_start();
        if self.err_buf[start..].trim_end() != text.trim_end() {
            return false;
        }
        self.err_buf.truncate(start);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Channel, Frames};
    use rpx_protocol::Message;
    use tokio::sync::mpsc;

    const KEY: &[u8] = b"outbox-key";

    struct Sockets {
        mux: mpsc::Receiver<Frames>,
        task: mpsc::Receiver<Frames>,
        iopub: mpsc::Receiver<Frames>,
        registration: mpsc::Receiver<Frames>,
    }

    fn outbox() -> (Outbox, Sockets) {
        let (mux, mux_rx) = mpsc::channel(64);
        let (task, task_rx) = mpsc::channel(64);
        let (control, _) = mpsc::channel(64);
        let (iopub, iopub_rx) = mpsc::channel(64);
        let (registration, reg_rx) = mpsc::channel(64);
        let outlets = Outlets { mux, task, broadcast: None, control, iopub, registration };
        let me = Identity { id: 2, uuid: "u-2".into() };
        (
            Outbox::new(me, Session::new(KEY, "engine"), outlets),
            Sockets { mux: mux_rx, task: task_rx, iopub: iopub_rx, registration: reg_rx },
        )
    }

    fn drain(rx: &mut mpsc::Receiver<Frames>) -> Vec<(String, Message)> {
        let mut out = Vec::new();
        while let Ok(frames) = rx.try_recv() {
            let topic = String::from_utf8_lossy(&frames[0]).into_owned();
            out.push((topic, Session::new(KEY, "test").decode(frames).expect("signed with the key")));
        }
        out
    }

    fn request(channel: Channel) -> Request {
        let mut r = Request::for_test("req-1", "execute_request", json!({"code": "1"}));
        r.channel = channel;
        r.idents = vec![Bytes::from_static(b"client")];
        r
    }

    #[test]
    fn a_reply_goes_back_on_the_socket_its_request_came_from() {
        let (out, mut s) = outbox();
        let req = request(Channel::Task);
        out.reply(&req, reply::execute_ok(3), reply::init_metadata(&json!({}), &out.me));
        assert!(drain(&mut s.mux).is_empty());
        let msgs = drain(&mut s.task);
        assert_eq!(msgs.len(), 1);
        let (ident, m) = &msgs[0];
        assert_eq!(ident, "client");
        assert_eq!(m.msg_type(), "execute_reply");
        assert_eq!(m.parent_header["msg_id"], "req-1");
        assert_eq!(m.content["execution_count"], 3);
        assert_eq!(m.metadata["status"], "ok");
        assert_eq!(m.metadata["engine"], "u-2");
    }

    #[test]
    fn output_is_held_until_flushed_then_published_per_stream_with_the_request_as_parent() {
        let (mut out, mut s) = outbox();
        out.set_stream_parent(request(Channel::Mux).header);
        out.write(Stream::Stderr, "warn\n");
        out.write(Stream::Stdout, "hello ");
        out.append(Stream::Stdout, "world\n");
        assert!(out.pending());
        assert!(drain(&mut s.iopub).is_empty(), "nothing published before a flush");
        out.flush_streams();
        assert!(!out.pending());
        let msgs = drain(&mut s.iopub);
        let got: Vec<(&str, &str, &str)> =
            msgs.iter().map(|(t, m)| (t.as_str(), m.content["name"].as_str().unwrap(), m.content["text"].as_str().unwrap())).collect();
        assert_eq!(got, [("engine.2.stdout", "stdout", "hello world\n"), ("engine.2.stderr", "stderr", "warn\n")]);
        assert!(msgs.iter().all(|(_, m)| m.parent_header["msg_id"] == "req-1"));
    }

    #[test]
    fn output_past_64_kib_is_published_at_once() {
        let (mut out, mut s) = outbox();
        let big = "x".repeat(FLUSH_BYTES + 1);
        out.append(Stream::Stdout, &big);
        assert!(drain(&mut s.iopub).is_empty(), "appended text waits for the next flush");
        out.flush_streams();
        drain(&mut s.iopub);
        out.write(Stream::Stdout, &big[..FLUSH_BYTES]);
        assert!(drain(&mut s.iopub).is_empty(), "64 KiB exactly still waits");
        out.write(Stream::Stdout, "y");
        assert_eq!(drain(&mut s.iopub).len(), 1);
    }

    #[test]
    fn pending_output_goes_out_once_the_flush_period_passed() {
        let (mut out, mut s) = outbox();
        out.flush_streams();
        let flushed = Instant::now();
        out.flush_if_due(flushed + FLUSH_PERIOD);
        assert!(drain(&mut s.iopub).is_empty(), "nothing pending: nothing published");
        out.append(Stream::Stdout, "tick\n");
        out.flush_if_due(flushed);
        assert!(out.pending());
        out.flush_if_due(Instant::now() + FLUSH_PERIOD);
        assert_eq!(drain(&mut s.iopub).len(), 1);
    }

    #[test]
    fn the_last_stderr_line_waits_for_its_hold_and_can_be_dropped_as_an_error_text() {
        let (mut out, mut s) = outbox();
        out.write(Stream::Stderr, "warning: slow\nparse error: bad digit\n");
        let written = Instant::now();
        out.flush_if_due(written + FLUSH_PERIOD);
        let texts: Vec<String> = drain(&mut s.iopub).into_iter().map(|(_, m)| m.content["text"].as_str().unwrap().to_string()).collect();
        assert_eq!(texts, ["warning: slow\n"], "the last line is held");
        assert!(out.drop_stderr_tail("parse error: bad digit"));
        out.flush_streams();
        assert!(drain(&mut s.iopub).is_empty(), "the error's text is not published as stderr");

        // A line that is not the error's text goes out once its hold is over.
        out.write(Stream::Stderr, "progress 1\n");
        assert!(!out.drop_stderr_tail("another text"));
        out.flush_if_due(Instant::now() + STDERR_TAIL_HOLD + FLUSH_PERIOD);
        let texts: Vec<String> = drain(&mut s.iopub).into_iter().map(|(_, m)| m.content["text"].as_str().unwrap().to_string()).collect();
        assert_eq!(texts, ["progress 1\n"]);
    }

    #[test]
    fn a_failed_apply_publishes_the_error_and_answers_with_status_error() {
        let (mut out, mut s) = outbox();
        let mut req = request(Channel::Mux);
        req.header.msg_type = "apply_request".into();
        out.append(Stream::Stdout, "before\n");
        out.apply_error(
            &req,
            reply::init_metadata(&json!({}), &out.me),
            &EngineError::new("NameError", "name `x` is not defined on engine 2", vec![]),
        );
        let pubs: Vec<String> = drain(&mut s.iopub).into_iter().map(|(_, m)| m.msg_type().to_string()).collect();
        assert_eq!(pubs, ["stream", "error", "status"], "output first, then the error, then idle");
        let (_, r) = drain(&mut s.mux).pop().expect("a reply");
        assert_eq!(r.msg_type(), "apply_reply");
        assert_eq!((r.content["status"].as_str(), r.content["ename"].as_str()), (Some("error"), Some("NameError")));
        assert_eq!(r.metadata["status"], "error");
        assert_eq!(r.metadata["engine_info"]["method"], "apply");
    }

    fn apply(msg_id: &str) -> Request {
        let mut req = Request::for_test(msg_id, "apply_request", json!({}));
        req.idents = vec![Bytes::from_static(b"client")];
        req
    }

    #[test]
    fn a_request_that_published_nothing_is_answered_by_its_reply_alone_marked_quiet() {
        let (out, mut s) = outbox();
        let req = apply("call-1");
        out.defer_busy(&req.header);
        out.ok(&req, reply::init_metadata(&json!({}), &out.me), &[Bytes::from_static(b"result")]);
        assert!(drain(&mut s.iopub).is_empty(), "no busy, no idle");
        let (_, r) = drain(&mut s.mux).pop().expect("a reply");
        assert_eq!(r.metadata[rpx_protocol::apply::QUIET_KEY], true);
        assert_eq!(r.buffers, vec![Bytes::from_static(b"result")]);
        // The next request is not quiet by inheritance: it is answered between busy and idle.
        out.aborted(&apply("call-2"));
        assert_eq!(drain(&mut s.iopub).len(), 2);
        assert!(drain(&mut s.mux).pop().unwrap().1.metadata.get(rpx_protocol::apply::QUIET_KEY).is_none());
    }

    #[test]
    fn a_declined_call_publishes_nothing_and_its_reply_carries_the_error() {
        let (mut out, mut s) = outbox();
        let req = apply("call-1");
        out.defer_busy(&req.header);
        let err = EngineError::new(rpx_protocol::apply::ename::UNKNOWN_CLOSURE, "closure id 00 is not known", vec![]);
        out.declined(&req, reply::init_metadata(&json!({}), &out.me), &err);
        assert!(drain(&mut s.iopub).is_empty(), "no error, no busy, no idle: the user sees nothing of it");
        let (_, r) = drain(&mut s.mux).pop().expect("a reply");
        assert_eq!((r.content["status"].as_str(), r.content["ename"].as_str()), (Some("error"), Some("UnknownClosure")));
        assert_eq!(r.metadata[rpx_protocol::apply::QUIET_KEY], true);
    }

    #[test]
    fn a_held_busy_goes_out_before_the_first_publication_and_idle_follows_the_reply() {
        let (mut out, mut s) = outbox();
        let req = apply("call-1");
        out.defer_busy(&req.header);
        out.set_stream_parent(req.header.clone());
        out.append(Stream::Stdout, "hi\n");
        out.flush_streams();
        out.ok(&req, reply::init_metadata(&json!({}), &out.me), &[]);
        let pubs: Vec<(String, String)> = drain(&mut s.iopub)
            .into_iter()
            .map(|(_, m)| (m.msg_type().to_string(), m.content["execution_state"].as_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(pubs, [("status".into(), "busy".into()), ("stream".into(), String::new()), ("status".into(), "idle".into())]);
        let (_, r) = drain(&mut s.mux).pop().expect("a reply");
        assert!(r.metadata.get(rpx_protocol::apply::QUIET_KEY).is_none());

        let failing = apply("call-2");
        out.defer_busy(&failing.header);
        out.apply_error(&failing, reply::init_metadata(&json!({}), &out.me), &EngineError::new("Panic", "boom", vec![]));
        let pubs: Vec<String> = drain(&mut s.iopub).into_iter().map(|(_, m)| m.msg_type().to_string()).collect();
        assert_eq!(pubs, ["status", "error", "status"], "busy, the error, idle");
    }

    #[test]
    fn an_aborted_request_is_answered_aborted_between_busy_and_idle() {
        let (out, mut s) = outbox();
        out.aborted(&request(Channel::Mux));
        let states: Vec<String> =
            drain(&mut s.iopub).into_iter().map(|(_, m)| m.content["execution_state"].as_str().unwrap().to_string()).collect();
        assert_eq!(states, ["busy", "idle"]);
        let (_, r) = drain(&mut s.mux).pop().unwrap();
        assert_eq!(r.content["status"], "aborted");
        out.unregister();
        let (_, u) = drain(&mut s.registration).pop().unwrap();
        assert_eq!((u.msg_type(), &u.content), ("unregistration_request", &json!({"id": 2})));
    }
}
