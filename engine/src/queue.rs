//! The shell request queue: requests wait here while a cell or a call runs. It decides which
//! queued request may start now (one that needs the compiler waits while the compiler is still
//! being connected at startup), answers ids aborted before they ran, and aborts everything
//! queued on an `abort_request` without ids. Pure: the engine loop pushes requests and carries
//! out what [`Queue::next`] and [`Queue::abort`] return.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use rpx_protocol::content::{read_or_default, AbortRequest, ExecuteRequest};
use rpx_protocol::{Header, Message};
use serde_json::Value;

use crate::net::Channel;

/// A request waiting for or being handled.
#[derive(Debug)]
pub struct Request {
    pub channel: Channel,
    pub idents: Vec<Bytes>,
    pub header: Header,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Request {
    pub fn from_message(channel: Channel, m: Message) -> Request {
        Request { channel, idents: m.idents, header: m.header, metadata: m.metadata, content: m.content, buffers: m.buffers }
    }

    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    pub fn msg_id(&self) -> &str {
        &self.header.msg_id
    }

    /// A request as the engine would have decoded it (for the unit tests of the modules that
    /// handle requests).
    #[cfg(test)]
    pub(crate) fn for_test(msg_id: &str, msg_type: &str, content: Value) -> Request {
        let mut header = rpx_protocol::Session::new(b"k", "test").header(msg_type);
        header.msg_id = msg_id.to_string();
        Request { channel: Channel::Mux, idents: vec![], header, metadata: Value::Object(Default::default()), content, buffers: vec![] }
    }
}

/// Whether handling `req` may need the compiler: an `execute_request` with code, or an
/// `apply_request` carrying an rpx payload (closures and pulls may need a compile).
pub fn needs_compiler(req: &Request) -> bool {
    match req.msg_type() {
        "execute_request" => !ExecuteRequest::read(&req.content).code.trim().is_empty(),
        "apply_request" => req.content.get(rpx_protocol::apply::CONTENT_KEY).is_some(),
        _ => false,
    }
}

/// What the engine does with the request [`Queue::next`] hands it.
#[derive(Debug)]
pub enum Next {
    /// Handle it.
    Start(Request),
    /// It was aborted before it ran: answer it `aborted`.
    Aborted(Request),
}

/// Requests waiting to run, and ids aborted before they ran.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: VecDeque<Request>,
    aborted: HashSet<String>,
    /// Ids the controller answered itself when it evicted this engine (oldest first): they
    /// never run here, queued now or arriving later.
    answered: HashSet<String>,
    answered_order: VecDeque<String>,
}

/// Answered ids remembered for requests still in transit.
const ANSWERED_LIMIT: usize = 10_000;

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    /// Queue `req`; `false` if the controller already answered it (it is dropped).
    pub fn push(&mut self, req: Request) -> bool {
        if self.answered.contains(req.msg_id()) {
            return false;
        }
        self.waiting.push_back(req);
        true
    }

    /// The controller answered these requests when it evicted this engine (failed them, or
    /// queued them again for another engine): drop the queued ones, without a reply, and any
    /// that arrive later. Returns the ids dropped now.
    pub fn drop_answered(&mut self, ids: &[String]) -> Vec<String> {
        for id in ids {
            if self.answered.insert(id.clone()) {
                self.answered_order.push_back(id.clone());
            }
        }
        while self.answered.len() > ANSWERED_LIMIT {
            let Some(old) = self.answered_order.pop_front() else { break };
            self.answered.remove(&old);
        }
        let answered = &self.answered;
        let (gone, kept): (Vec<Request>, Vec<Request>) = self.waiting.drain(..).partition(|r| answered.contains(r.msg_id()));
        self.waiting = kept.into();
        gone.iter().map(|r| r.msg_id().to_string()).collect()
    }

    /// The request [`Queue::next`] would consider first, left queued.
    pub fn front(&self) -> Option<&Request> {
        self.waiting.front()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The request to handle now, in arrival order. `compiler_connecting`: the compiler is
    /// still being connected at startup; a request that needs it then waits (and holds back
    /// the ones behind it), unless it was aborted.
    pub fn next(&mut self, compiler_connecting: bool) -> Option<Next> {
        let front = self.waiting.front()?;
        if compiler_connecting && needs_compiler(front) && !self.aborted.contains(front.msg_id()) {
            return None;
        }
        let req = self.waiting.pop_front().expect("front exists");
        if self.aborted.remove(req.msg_id()) {
            Some(Next::Aborted(req))
        } else {
            Some(Next::Start(req))
        }
    }

    /// An `abort_request` with this content: the ids it names (`msg_ids`, a list or one
    /// string) are answered `aborted` when they come up, queued now or arriving later. Without
    /// ids everything queued now is aborted: those requests are returned, to be answered.
    pub fn abort(&mut self, content: &Value) -> Vec<Request> {
        match abort_ids(content) {
            Some(ids) => {
                self.aborted.extend(ids);
                Vec::new()
            }
            None => self.waiting.drain(..).collect(),
        }
    }
}

/// The ids an `abort_request` names; `None` when it names none (abort everything queued).
fn abort_ids(content: &Value) -> Option<Vec<String>> {
    let ids = read_or_default::<AbortRequest>(content).msg_ids;
    (!ids.is_empty()).then_some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(msg_id: &str, msg_type: &str, content: Value) -> Request {
        Request::for_test(msg_id, msg_type, content)
    }

    fn execute(msg_id: &str, code: &str) -> Request {
        request(msg_id, "execute_request", json!({"code": code}))
    }

    fn started(n: Option<Next>) -> String {
        match n {
            Some(Next::Start(r)) => r.msg_id().to_string(),
            other => panic!("expected a request to start, got {other:?}"),
        }
    }

    fn aborted(n: Option<Next>) -> String {
        match n {
            Some(Next::Aborted(r)) => r.msg_id().to_string(),
            other => panic!("expected an aborted request, got {other:?}"),
        }
    }

    #[test]
    fn requests_start_in_the_order_they_arrived() {
        let mut q = Queue::new();
        q.push(execute("a", "1"));
        q.push(request("b", "kernel_info_request", json!({})));
        q.push(execute("c", "2"));
        assert_eq!(started(q.next(false)), "a");
        assert_eq!(started(q.next(false)), "b");
        assert_eq!(started(q.next(false)), "c");
        assert!(q.next(false).is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn a_cell_waits_while_the_compiler_connects_and_holds_back_the_requests_behind_it() {
        let mut q = Queue::new();
        q.push(execute("cell", "let x = 1;"));
        q.push(request("info", "kernel_info_request", json!({})));
        assert!(q.next(true).is_none());
        assert_eq!(q.len(), 2, "nothing was taken off the queue");
        assert_eq!(started(q.next(false)), "cell");
        assert_eq!(started(q.next(false)), "info");
    }

    #[test]
    fn requests_that_need_no_compiler_start_while_it_connects() {
        let mut q = Queue::new();
        q.push(execute("empty", "  \n"));
        q.push(request("info", "kernel_info_request", json!({})));
        // A pickled Python apply (no rpx payload) is refused without the compiler.
        q.push(request("python", "apply_request", json!({})));
        assert_eq!(started(q.next(true)), "empty");
        assert_eq!(started(q.next(true)), "info");
        assert_eq!(started(q.next(true)), "python");
    }

    #[test]
    fn what_needs_the_compiler() {
        assert!(needs_compiler(&execute("a", "println!(\"hi\");")));
        assert!(!needs_compiler(&execute("a", "")));
        assert!(!needs_compiler(&request("a", "execute_request", json!({}))));
        assert!(needs_compiler(&request("a", "apply_request", json!({"rpx": {"op": "pull", "names": ["x"]}}))));
        assert!(!needs_compiler(&request("a", "apply_request", json!({"f": "pickled"}))));
        assert!(!needs_compiler(&request("a", "kernel_info_request", json!({}))));
    }

    #[test]
    fn a_request_for_an_aborted_id_is_answered_aborted_without_running() {
        let mut q = Queue::new();
        q.push(execute("a", "1"));
        q.push(execute("b", "2"));
        assert!(q.abort(&json!({"msg_ids": ["a"]})).is_empty(), "named ids are answered when they come up");
        assert_eq!(aborted(q.next(false)), "a");
        assert_eq!(started(q.next(false)), "b");
    }

    #[test]
    fn an_aborted_cell_is_answered_even_while_the_compiler_connects() {
        let mut q = Queue::new();
        q.push(execute("a", "1"));
        q.abort(&json!({"msg_ids": "a"}));
        assert_eq!(aborted(q.next(true)), "a");
    }

    #[test]
    fn an_id_aborted_before_its_request_arrives_is_aborted_when_it_comes() {
        let mut q = Queue::new();
        q.abort(&json!({"msg_ids": ["later"]}));
        q.push(execute("now", "1"));
        q.push(execute("later", "2"));
        assert_eq!(started(q.next(false)), "now");
        assert_eq!(aborted(q.next(false)), "later");
        // An abort is used once: the same id again runs.
        q.push(execute("later", "2"));
        assert_eq!(started(q.next(false)), "later");
    }

    #[test]
    fn requests_the_controller_answered_at_eviction_never_run() {
        let mut q = Queue::new();
        q.push(execute("a", "1"));
        q.push(execute("b", "2"));
        assert_eq!(q.drop_answered(&["a".into(), "late".into()]), ["a"]);
        assert!(!q.push(execute("late", "3")), "one still in transit is dropped when it arrives");
        assert_eq!(started(q.next(false)), "b");
        assert!(q.next(false).is_none());
    }

    #[test]
    fn an_abort_without_ids_aborts_everything_queued_now() {
        for content in [json!({}), json!({"msg_ids": []}), json!({"msg_ids": null})] {
            let mut q = Queue::new();
            q.push(execute("a", "1"));
            q.push(execute("b", "2"));
            let gone: Vec<String> = q.abort(&content).iter().map(|r| r.msg_id().to_string()).collect();
            assert_eq!(gone, ["a", "b"], "{content}");
            assert!(q.next(false).is_none());
            // Requests arriving afterwards run.
            q.push(execute("c", "3"));
            assert_eq!(started(q.next(false)), "c");
        }
    }
}
