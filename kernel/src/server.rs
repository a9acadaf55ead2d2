//! The Jupyter side of the kernel: binds the five sockets of the connection file, verifies and
//! signs every message (HMAC-SHA256 with the connection key), publishes on iopub, answers the
//! heartbeat, and handles the control channel (interrupt, shutdown, kernel_info) itself while
//! shell requests go, one at a time, to the [`crate::shell::Kernel`] thread.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use rpx_guard::zmq::{frames, message};
use rpx_protocol::connection::KernelConnection as ConnectionInfo;
use rpx_protocol::content::{read_or_default, InputReply, InputRequest, InterruptReply, ShutdownRequest, Status};
use rpx_protocol::message::Header;
use rpx_protocol::{Message, Session};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tracing::{debug, info, warn};
use zeromq::{PubSocket, RepSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use rpx_magics::{IopubMsg, StreamName};

/// A send that takes longer than this is abandoned (zeromq 0.7 queues without bound otherwise).
const SEND_LIMIT: Duration = Duration::from_secs(5);

/// State shared by the socket tasks, the shell thread and the output forwarders.
pub struct Shared {
    pub session: Session,
    iopub: UnboundedSender<ZmqMessage>,
    /// The request whose output is being produced (parent of iopub messages).
    parent: Mutex<Option<Header>>,
    /// Set by `interrupt_request`; whoever runs the cell takes it.
    pub interrupted: AtomicBool,
    /// A local (evcxr) cell is running: an interrupt sends SIGINT to its runtime (the engines'
    /// worker, which turns it into a panic in the cell, so earlier variables stay) and kills the
    /// runtime only if the cell is still running after [`crate::local::LOCAL_GRACE`].
    pub local_running: AtomicBool,
    /// Counts local cells (so a late interrupt watchdog does not kill a later cell's runtime).
    pub local_seq: AtomicU64,
    /// The panic message of the running local cell (`thread '..' panicked at ..:` and what follows).
    pub panic: Mutex<PanicText>,
    /// The local runtime's stderr lines not yet forwarded (to wait for a panic message).
    pub stderr_rx: Mutex<Option<crossbeam_channel::Receiver<String>>>,
    /// The evcxr runtime process, once the context exists.
    pub child: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    /// The local cell's last stderr lines, held back briefly (see [`StderrHold`]).
    pub hold: Mutex<StderrHold>,
    /// Notified when a `?` error's text has been taken out of stderr.
    pub hold_cv: Condvar,
    /// The frontend's `input_reply`s (the stdin socket's task sends them here).
    pub input_replies: Mutex<Option<mpsc::Receiver<Message>>>,
    /// Where `input_request`s go (to the stdin socket's task).
    pub input_requests: Mutex<Option<UnboundedSender<ZmqMessage>>>,
    /// The running `execute_request` (idents, header) when it allows stdin (`allow_stdin`).
    pub stdin_parent: Mutex<Option<(Vec<Bytes>, Header)>>,
    /// A local cell asked for input that could not be given: its prompt (empty: a plain read).
    pub stdin_refused: Mutex<Option<String>>,
    /// An input request of the local cell is waiting for its reply.
    pub in_input: AtomicBool,
    topic_prefix: String,
}

/// How long a local cell's last stderr lines are held back before they are published: long
/// enough for the relay's [`crate::relay::ERROR_MARK`] to follow a `?` error's text (written
/// microseconds apart), short enough not to be seen.
pub const STDERR_HOLD: Duration = Duration::from_millis(100);

/// A local cell's stderr lines not yet published, in case they turn out to be the text of an
/// error that a `?` returned (the relay's mark follows them); and that text once it did.
#[derive(Debug, Default)]
pub struct StderrHold {
    held: Vec<String>,
    since: Option<Instant>,
    /// The text of the `?` error of the running cell, once its mark arrived.
    pub error: Option<Vec<String>>,
}

impl StderrHold {
    /// New stderr lines of the running cell: returns those to publish now, and whether a mark
    /// came. The line just before a mark is the error's text (evcxr writes `Display` of the
    /// error with one `eprintln!`: one line for almost every error; the lines of a longer one
    /// before its last are published as stderr, not lost). The last lines of a batch are held.
    pub fn note(&mut self, lines: Vec<String>, now: Instant) -> (Vec<String>, bool) {
        let mut publish = Vec::new();
        let mut marked = false;
        for l in lines {
            if l == crate::relay::ERROR_MARK {
                let mut text = std::mem::take(&mut self.held);
                let last = text.pop();
                publish.append(&mut text);
                self.since = None;
                self.error = Some(last.into_iter().collect());
                marked = true;
            } else {
                if self.held.is_empty() {
                    self.since = Some(now);
                }
                self.held.push(l);
            }
        }
        (publish, marked)
    }

    /// The held lines, if they have waited [`STDERR_HOLD`] (or `all`).
    pub fn release(&mut self, now: Instant, all: bool) -> Vec<String> {
        match self.since {
            Some(t) if all || now.duration_since(t) >= STDERR_HOLD => {
                self.since = None;
                std::mem::take(&mut self.held)
            }
            _ => Vec::new(),
        }
    }
}

impl Shared {
    /// Publish on iopub with the current parent.
    pub fn publish(&self, msg: &IopubMsg) {
        let parent = self.parent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.publish_raw(msg.msg_type(), msg.content(), parent.as_ref());
    }

    /// Publish text on a stream with the current parent.
    pub fn publish_stream(&self, name: StreamName, text: &str) {
        self.publish(&IopubMsg::Stream { name, text: text.to_string() });
    }

    /// Publish any message.
    pub fn publish_raw(&self, msg_type: &str, content: Value, parent: Option<&Header>) {
        let topic = Bytes::from(format!("{}.{msg_type}", self.topic_prefix));
        let (_, f) = self.session.msg(&[topic], msg_type, content, parent, json!({}), &[]);
        let _ = self.iopub.send(message(f));
    }

    /// `status` (`busy`, `idle`) for a request.
    pub fn status(&self, state: &str, parent: &Header) {
        self.publish_raw("status", json!(Status { execution_state: state.to_string() }), Some(parent));
    }

    pub fn set_parent(&self, parent: Option<Header>) {
        *self.parent.lock().unwrap_or_else(|p| p.into_inner()) = parent;
    }

    /// Interrupt the running local cell: SIGINT to its runtime (the cell panics, earlier
    /// variables stay), and if it is still running after [`crate::local::LOCAL_GRACE`], kill
    /// the runtime (evcxr restarts it on the next cell). `%px` waits see the flag themselves.
    fn interrupt(self: &Arc<Self>) {
        self.interrupted.store(true, Ordering::SeqCst);
        if !self.local_running.load(Ordering::SeqCst) {
            return;
        }
        let Some(child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let pid = child.lock().unwrap_or_else(|p| p.into_inner()).id();
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        let seq = self.local_seq.load(Ordering::SeqCst);
        let shared = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(crate::local::LOCAL_GRACE);
            if shared.local_running.load(Ordering::SeqCst) && shared.local_seq.load(Ordering::SeqCst) == seq {
                warn!("the interrupted local cell did not stop; killing its runtime");
                let _ = child.lock().unwrap_or_else(|p| p.into_inner()).kill();
            }
        });
    }

    /// Keep the panic message of the running local cell, from its stderr lines.
    /// Take note of a local cell's stderr lines; returns those to publish as its stderr (a
    /// panic report is not among them: it becomes the cell's error, shown once).
    pub fn note_stderr(&self, lines: &[String]) -> Vec<String> {
        self.panic.lock().unwrap_or_else(|p| p.into_inner()).note(lines)
    }

    /// Publish the local cell's held stderr lines (at its end, or when they have waited).
    pub fn release_stderr(&self, all: bool) {
        let lines = self.hold.lock().unwrap_or_else(|p| p.into_inner()).release(Instant::now(), all);
        self.publish_lines(StreamName::Stderr, lines);
    }

    /// Publish whole lines on a stream.
    pub fn publish_lines(&self, name: StreamName, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let mut text = lines.join("\n");
        text.push('\n');
        self.publish(&IopubMsg::Stream { name, text });
    }

    /// Wait (at most `limit`) for the text of the running local cell's `?` error.
    pub fn take_error_text(&self, limit: Duration) -> Option<Vec<String>> {
        let g = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = self.hold_cv.wait_timeout_while(g, limit, |h| h.error.is_none()).unwrap_or_else(|p| p.into_inner());
        g.error.take()
    }

    /// A local cell reads input (`evcxr_input::get_string`): ask the frontend with an
    /// `input_request` on the stdin channel and wait for its `input_reply` (or an interrupt).
    /// Without a frontend that accepts input (`allow_stdin` false) the cell gets an empty line
    /// and fails when it ends (see [`Shared::stdin_refused`]).
    pub fn read_input(&self, prompt: &str, password: bool) -> String {
        let parent = self.stdin_parent.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some((idents, header)) = parent else {
            self.stdin_refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| prompt.to_string());
            return String::new();
        };
        let replies = self.input_replies.lock().unwrap_or_else(|p| p.into_inner());
        let Some(replies) = replies.as_ref() else { return String::new() };
        self.in_input.store(true, Ordering::SeqCst);
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _done = Done(&self.in_input);
        while replies.try_recv().is_ok() {}
        let request = json!(InputRequest { prompt: prompt.to_string(), password });
        let (_, f) = self.session.msg(&idents, "input_request", request, Some(&header), json!({}), &[]);
        if let Some(tx) = self.input_requests.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(message(f));
        }
        loop {
            match replies.recv_timeout(Duration::from_millis(50)) {
                Ok(m) if m.parent_msg_id().is_some_and(|id| id != header.msg_id) => continue,
                Ok(m) => return read_or_default::<InputReply>(&m.content).value,
                Err(mpsc::RecvTimeoutError::Timeout) if self.interrupted.load(Ordering::SeqCst) => return String::new(),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return String::new(),
            }
        }
    }

    fn kill_runtime(&self) {
        if let Some(child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = child.lock().unwrap_or_else(|p| p.into_inner()).kill();
        }
    }
}

/// The panic report in a local cell's stderr: `thread '..' panicked at FILE:`, the message lines
/// after it, and what the runtime adds (`note: run with RUST_BACKTRACE=1 ...`, or with
/// `RUST_BACKTRACE` set, `stack backtrace:` and its indented frames and closing note). It is the
/// cell's error, so it is kept out of the cell's stderr stream.
#[derive(Debug, Default)]
pub struct PanicText {
    pub lines: Vec<String>,
    state: PanicState,
    /// Blank lines not yet published: the runtime writes one before a panic report.
    held_blanks: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PanicState {
    /// No panic seen in this cell.
    #[default]
    None,
    /// In the message lines.
    Message,
    /// In `stack backtrace:`'s frames.
    Backtrace,
    /// Just after the report's closing note: the blank line the runtime writes after it.
    Trailing,
    /// The report ended: later lines are ordinary stderr.
    Done,
}

/// The most lines of a panic message kept out of stderr (a panic printing more is unusual; the
/// rest is published as stderr, nothing is lost).
const PANIC_MESSAGE_LINES: usize = 50;

impl PanicText {
    /// Returns the lines that are not part of the panic report (blank lines are held until the
    /// next line shows whether a report starts; [`PanicText::take_held_blanks`] at the cell's end).
    fn note(&mut self, lines: &[String]) -> Vec<String> {
        let mut rest = Vec::new();
        for l in lines {
            match self.state {
                PanicState::None if l.trim().is_empty() => self.held_blanks += 1,
                PanicState::None if l.starts_with("thread '") && l.contains("panicked at") => {
                    self.held_blanks = 0;
                    self.lines.push(l.clone());
                    self.state = PanicState::Message;
                }
                PanicState::None => {
                    rest.extend(std::iter::repeat_n(String::new(), std::mem::take(&mut self.held_blanks)));
                    rest.push(l.clone());
                }
                PanicState::Message if l.starts_with("stack backtrace:") => {
                    self.lines.push(l.clone());
                    self.state = PanicState::Backtrace;
                }
                PanicState::Message | PanicState::Backtrace if l.starts_with("note: ") => {
                    self.lines.push(l.clone());
                    self.state = PanicState::Trailing;
                }
                PanicState::Trailing if l.trim().is_empty() => {}
                PanicState::Message if self.lines.len() < PANIC_MESSAGE_LINES => self.lines.push(l.clone()),
                PanicState::Backtrace if l.starts_with(' ') => self.lines.push(l.clone()),
                PanicState::Message | PanicState::Backtrace | PanicState::Trailing => {
                    self.state = PanicState::Done;
                    rest.push(l.clone());
                }
                PanicState::Done => rest.push(l.clone()),
            }
        }
        rest
    }

    /// The blank lines still held back (none are after this).
    pub fn take_held_blanks(&mut self) -> usize {
        std::mem::take(&mut self.held_blanks)
    }
}

/// A shell request for the shell thread, and where its reply goes.
pub struct ShellRequest {
    pub msg: Message,
    pub reply: UnboundedSender<ZmqMessage>,
}

/// Read the connection file and serve until a `shutdown_request`.
pub fn run(connection_file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(connection_file).with_context(|| format!("cannot read {}", connection_file.display()))?;
    let info: ConnectionInfo =
        serde_json::from_str(&text).with_context(|| format!("{} is not a Jupyter connection file", connection_file.display()))?;
    if !info.signature_scheme.is_empty() && info.signature_scheme != "hmac-sha256" {
        bail!("unsupported signature scheme {:?} (rpx-kernel signs with hmac-sha256)", info.signature_scheme);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(info))
}

fn endpoint(info: &ConnectionInfo, port: u16) -> Result<String> {
    let transport = serde_json::to_value(&info.transport)?.as_str().unwrap_or("tcp").to_string();
    if transport != "tcp" {
        bail!("transport {transport:?} is not supported (use tcp)");
    }
    Ok(format!("tcp://{}:{port}", info.ip))
}

/// The five sockets of the connection file, bound.
struct Sockets {
    shell: RouterSocket,
    control: RouterSocket,
    stdin: RouterSocket,
    iopub: PubSocket,
    hb: RepSocket,
}

async fn bind_sockets(info: &ConnectionInfo) -> Result<Sockets> {
    let mut shell = RouterSocket::new();
    rpx_guard::bind(&mut shell, &endpoint(info, info.shell_port)?).await.context("cannot bind the shell socket")?;
    let mut control = RouterSocket::new();
    rpx_guard::bind(&mut control, &endpoint(info, info.control_port)?).await.context("cannot bind the control socket")?;
    let mut stdin = RouterSocket::new();
    rpx_guard::bind(&mut stdin, &endpoint(info, info.stdin_port)?).await.context("cannot bind the stdin socket")?;
    let mut iopub = PubSocket::new();
    rpx_guard::bind(&mut iopub, &endpoint(info, info.iopub_port)?).await.context("cannot bind the iopub socket")?;
    let mut hb = RepSocket::new();
    rpx_guard::bind(&mut hb, &endpoint(info, info.hb_port)?).await.context("cannot bind the heartbeat socket")?;
    Ok(Sockets { shell, control, stdin, iopub, hb })
}

async fn serve(info: ConnectionInfo) -> Result<()> {
    let session = Session::new(info.key.as_bytes(), "rpx-kernel");
    let Sockets { shell, control, stdin, iopub, hb } = bind_sockets(&info).await?;
    info!(ip = %info.ip, shell = info.shell_port, "rpx kernel listening");
    let iopub_tx = spawn_iopub(iopub);
    spawn_heartbeat(hb);
    let (input_rx, input_req_tx) = spawn_stdin(stdin, session.clone());
    let shared = Arc::new(Shared {
        topic_prefix: format!("kernel.{}", session.session),
        session: session.clone(),
        iopub: iopub_tx,
        parent: Mutex::new(None),
        interrupted: AtomicBool::new(false),
        local_running: AtomicBool::new(false),
        local_seq: AtomicU64::new(0),
        panic: Mutex::new(PanicText::default()),
        stderr_rx: Mutex::new(None),
        child: Mutex::new(None),
        hold: Mutex::new(StderrHold::default()),
        hold_cv: Condvar::new(),
        input_replies: Mutex::new(Some(input_rx)),
        input_requests: Mutex::new(Some(input_req_tx)),
        stdin_parent: Mutex::new(None),
        stdin_refused: Mutex::new(None),
        in_input: AtomicBool::new(false),
    });
    spawn_shell(shell, session.clone(), shared.clone())?;
    control_loop(control, session, shared).await
}

/// The iopub socket's task: sends what the returned channel carries.
fn spawn_iopub(mut iopub: PubSocket) -> UnboundedSender<ZmqMessage> {
    let (iopub_tx, mut iopub_rx) = unbounded_channel::<ZmqMessage>();
    tokio::spawn(async move {
        while let Some(m) = iopub_rx.recv().await {
            if tokio::time::timeout(SEND_LIMIT, iopub.send(m)).await.is_err() {
                warn!("an iopub message took too long to send; dropped");
            }
        }
    });
    iopub_tx
}

/// The heartbeat socket's task: echoes every ping.
fn spawn_heartbeat(mut hb: RepSocket) {
    tokio::spawn(async move {
        loop {
            match hb.recv().await {
                Ok(m) => {
                    if tokio::time::timeout(SEND_LIMIT, hb.send(m)).await.is_err() {
                        warn!("heartbeat reply timed out");
                    }
                }
                Err(e) => {
                    debug!(error = %e, "heartbeat socket");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// The stdin socket's tasks: `input_request`s out (for the local cell reading input, sent on
/// the returned sender), `input_reply`s in (on the returned receiver).
fn spawn_stdin(stdin: RouterSocket, session: Session) -> (mpsc::Receiver<Message>, UnboundedSender<ZmqMessage>) {
    let (input_tx, input_rx) = mpsc::channel::<Message>();
    let (input_req_tx, input_req_rx) = unbounded_channel::<ZmqMessage>();
    let (stdin_send, mut stdin_recv) = stdin.split();
    spawn_sender(stdin_send, input_req_rx, "an input_request");
    tokio::spawn(async move {
        loop {
            match stdin_recv.recv().await {
                Ok(m) => match session.decode(frames(m)) {
                    Ok(msg) if msg.msg_type() == "input_reply" => {
                        let _ = input_tx.send(msg);
                    }
                    Ok(msg) => debug!(msg_type = msg.msg_type(), "unexpected message on stdin"),
                    Err(e) => warn!(error = %e, "dropped a stdin message"),
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    (input_rx, input_req_tx)
}

/// Shell: requests go to one thread ([`crate::shell::Kernel`]), in order; its replies come back
/// to be sent.
fn spawn_shell(shell: RouterSocket, session: Session, shared: Arc<Shared>) -> Result<()> {
    let (shell_tx, shell_rx) = mpsc::channel::<ShellRequest>();
    let (reply_tx, reply_rx) = unbounded_channel::<ZmqMessage>();
    std::thread::Builder::new().name("shell".into()).spawn(move || crate::shell::Kernel::new(shared).serve(shell_rx))?;
    let (shell_send, mut shell_recv) = shell.split();
    spawn_sender(shell_send, reply_rx, "a shell reply");
    tokio::spawn(async move {
        loop {
            let m = match shell_recv.recv().await {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "shell socket");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            match session.decode(frames(m)) {
                Ok(msg) => {
                    if shell_tx.send(ShellRequest { msg, reply: reply_tx.clone() }).is_err() {
                        break;
                    }
                }
                Err(e) => warn!(error = %e, "dropped a shell message"),
            }
        }
    });
    Ok(())
}

/// Control, handled here so that it answers while a cell runs; exits the process after a
/// `shutdown_request`.
async fn control_loop(mut control: RouterSocket, session: Session, shared: Arc<Shared>) -> Result<()> {
    loop {
        let m = match control.recv().await {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "control socket");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let msg = match session.decode(frames(m)) {
            Ok(msg) => msg,
            Err(e) => {
                warn!(error = %e, "dropped a control message");
                continue;
            }
        };
        shared.status("busy", &msg.header);
        let Some((content, exit)) = control_reply(&shared, &msg)? else {
            shared.status("idle", &msg.header);
            continue;
        };
        let reply_type = msg.msg_type().replace("_request", "_reply");
        let (_, f) = session.msg(&msg.idents, &reply_type, content, Some(&msg.header), json!({}), &[]);
        let _ = tokio::time::timeout(SEND_LIMIT, control.send(message(f))).await;
        shared.status("idle", &msg.header);
        if exit {
            shared.kill_runtime();
            crate::prepare::BuildDir::remove();
            // Let the reply and the status leave before the process does.
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::process::exit(0);
        }
    }
}

/// The reply content to a control request and whether the kernel then exits; `None` for a
/// request the kernel does not answer.
fn control_reply(shared: &Arc<Shared>, msg: &Message) -> Result<Option<(Value, bool)>> {
    Ok(Some(match msg.msg_type() {
        "kernel_info_request" => (crate::shell::kernel_info(), false),
        "interrupt_request" => {
            info!("interrupt requested");
            shared.interrupt();
            (serde_json::to_value(InterruptReply::new())?, false)
        }
        "shutdown_request" => {
            let req: ShutdownRequest = read_or_default(&msg.content);
            info!(restart = req.restart(), "shutdown requested");
            (req.reply(), true)
        }
        other => {
            debug!(msg_type = other, "unhandled control message");
            return Ok(None);
        }
    }))
}

/// Send what `rx` carries on a ROUTER's send half, each send bounded by [`SEND_LIMIT`] (`what`
/// names the message in the warning when one is dropped).
fn spawn_sender(mut half: zeromq::RouterSendHalf, mut rx: tokio::sync::mpsc::UnboundedReceiver<ZmqMessage>, what: &'static str) {
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if tokio::time::timeout(SEND_LIMIT, half.send(m)).await.is_err() {
                warn!("{what} took too long to send; dropped");
            }
        }
    });
}

/// Encode a reply on the shell channel.
pub fn reply(session: &Session, req: &ShellRequest, msg_type: &str, content: Value) {
    let (_, f) = session.msg(&req.msg.idents, msg_type, content, Some(&req.msg.header), json!({}), &[]);
    let _ = req.reply.send(message(f));
}

#[cfg(test)]
mod panic_tests {
    use super::PanicText;

    fn lines(t: &str) -> Vec<String> {
        t.lines().map(String::from).collect()
    }

    #[test]
    fn a_panic_report_is_taken_out_of_stderr_and_the_rest_is_kept() {
        let mut p = PanicText::default();
        assert_eq!(p.note(&lines("before\n\nmore")), ["before", "", "more"], "blank lines between others are kept");
        assert!(p.note(&["".to_string()]).is_empty(), "a blank line is held: a report may follow");
        let rest = p.note(&lines("thread 'main' panicked at src/lib.rs:3:5:\nboom 7\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace"));
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(p.take_held_blanks(), 0, "the blank line before the report was part of it");
        assert_eq!(p.lines[1], "boom 7");
        assert!(p.note(&["".to_string()]).is_empty(), "the blank line after the report is part of it");
        assert_eq!(p.note(&lines("after\n")), ["after"]);
        assert_eq!(p.note(&["".to_string()]), [""], "after the report, blank lines pass");
        let mut q = PanicText::default();
        assert_eq!(q.note(&["x".to_string(), String::new()]), ["x"]);
        assert_eq!(q.take_held_blanks(), 1, "a blank line at the end of a cell without a panic is the cell's own");
    }

    #[test]
    fn the_line_before_a_question_mark_mark_is_the_error_and_the_rest_is_stderr() {
        use super::{StderrHold, STDERR_HOLD};
        let t0 = std::time::Instant::now();
        let mut h = StderrHold::default();
        let (now, marked) = h.note(lines("before"), t0);
        assert!(now.is_empty() && !marked, "the last lines are held");
        let (now, marked) = h.note(lines(&format!("invalid digit found in string\n{}", crate::relay::ERROR_MARK)), t0);
        assert_eq!((now, marked), (vec!["before".to_string()], true));
        assert_eq!(h.error.take(), Some(vec!["invalid digit found in string".to_string()]));
        assert!(h.note(lines("later"), t0).0.is_empty());
        assert!(h.release(t0, false).is_empty(), "held until it has waited");
        assert_eq!(h.release(t0 + STDERR_HOLD, false), ["later"]);
        h.note(lines("end"), t0);
        assert_eq!(h.release(t0, true), ["end"], "the cell's end releases everything");
    }

    #[test]
    fn a_backtrace_split_over_several_reads_stays_in_the_report() {
        let mut p = PanicText::default();
        assert!(p.note(&lines("thread 'main' panicked at src/lib.rs:3:5:\nboom")).is_empty());
        assert!(p
            .note(&lines("stack backtrace:\n   0: rust_begin_unwind\n             at /rustc/library/std/src/panicking.rs:5"))
            .is_empty());
        assert!(p
            .note(&lines(
                "   1: ctx::run_user_code_1\nnote: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace."
            ))
            .is_empty());
        assert_eq!(p.lines.len(), 7);
        assert_eq!(p.note(&lines("later output")), ["later output"]);
    }
}
