//! The Jupyter side of the kernel: binds the five sockets of the connection file, verifies and
//! signs every message (HMAC-SHA256 with the connection key), publishes on iopub, answers the
//! heartbeat, and handles the control channel (interrupt, shutdown, kernel_info) itself while
//! shell requests go, one at a time, to the [`crate::shell::Kernel`] thread.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use jupyter_protocol::ConnectionInfo;
use rpx_protocol::message::Header;
use rpx_protocol::zmq::{frames, message};
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
    /// A local (evcxr) cell is running: an interrupt kills its runtime.
    pub local_running: AtomicBool,
    /// Counts local cells (so a late watchdog does not kill a later cell's runtime).
    pub local_seq: AtomicU64,
    /// The panic message of the running local cell (`thread '..' panicked at ..:` and what follows).
    pub panic: Mutex<PanicText>,
    /// The local runtime's stderr lines not yet forwarded (to wait for a panic message).
    pub stderr_rx: Mutex<Option<crossbeam_channel::Receiver<String>>>,
    /// The evcxr runtime process, once the context exists.
    pub child: Mutex<Option<Arc<Mutex<std::process::Child>>>>,
    topic_prefix: String,
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
        self.publish_raw("status", json!({ "execution_state": state }), Some(parent));
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
    fn a_backtrace_split_over_several_reads_stays_in_the_report() {
        let mut p = PanicText::default();
        assert!(p.note(&lines("thread 'main' panicked at src/lib.rs:3:5:\nboom")).is_empty());
        assert!(p.note(&lines("stack backtrace:\n   0: rust_begin_unwind\n             at /rustc/library/std/src/panicking.rs:5")).is_empty());
        assert!(p.note(&lines("   1: ctx::run_user_code_1\nnote: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.")).is_empty());
        assert_eq!(p.lines.len(), 7);
        assert_eq!(p.note(&lines("later output")), ["later output"]);
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
    let info: ConnectionInfo = serde_json::from_str(&text).with_context(|| format!("{} is not a Jupyter connection file", connection_file.display()))?;
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

async fn serve(info: ConnectionInfo) -> Result<()> {
    let session = Session::new(info.key.as_bytes(), "rpx-kernel");
    let mut shell = RouterSocket::new();
    rpx_guard::bind(&mut shell, &endpoint(&info, info.shell_port)?).await.context("cannot bind the shell socket")?;
    let mut control = RouterSocket::new();
    rpx_guard::bind(&mut control, &endpoint(&info, info.control_port)?).await.context("cannot bind the control socket")?;
    let mut stdin = RouterSocket::new();
    rpx_guard::bind(&mut stdin, &endpoint(&info, info.stdin_port)?).await.context("cannot bind the stdin socket")?;
    let mut iopub = PubSocket::new();
    rpx_guard::bind(&mut iopub, &endpoint(&info, info.iopub_port)?).await.context("cannot bind the iopub socket")?;
    let mut hb = RepSocket::new();
    rpx_guard::bind(&mut hb, &endpoint(&info, info.hb_port)?).await.context("cannot bind the heartbeat socket")?;
    info!(ip = %info.ip, shell = info.shell_port, "rpx kernel listening");

    let (iopub_tx, mut iopub_rx) = unbounded_channel::<ZmqMessage>();
    tokio::spawn(async move {
        while let Some(m) = iopub_rx.recv().await {
            if tokio::time::timeout(SEND_LIMIT, iopub.send(m)).await.is_err() {
                warn!("an iopub message took too long to send; dropped");
            }
        }
    });
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
    // Keep the stdin socket open (input requests are not supported yet); drain anything sent.
    tokio::spawn(async move {
        loop {
            if stdin.recv().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

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
    });

    // Shell: requests go to one thread, in order; its replies come back to be sent.
    let (shell_tx, shell_rx) = mpsc::channel::<ShellRequest>();
    let (reply_tx, mut reply_rx) = unbounded_channel::<ZmqMessage>();
    {
        let shared = shared.clone();
        std::thread::Builder::new().name("shell".into()).spawn(move || crate::shell::Kernel::new(shared).serve(shell_rx))?;
    }
    let (mut shell_send, mut shell_recv) = shell.split();
    tokio::spawn(async move {
        while let Some(m) = reply_rx.recv().await {
            if tokio::time::timeout(SEND_LIMIT, shell_send.send(m)).await.is_err() {
                warn!("a shell reply took too long to send; dropped");
            }
        }
    });
    {
        let session = session.clone();
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
    }

    // Control, handled here so that it answers while a cell runs.
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
        let (content, exit) = match msg.msg_type() {
            "kernel_info_request" => (crate::shell::kernel_info(), false),
            "interrupt_request" => {
                info!("interrupt requested");
                shared.interrupt();
                (serde_json::to_value(jupyter_protocol::InterruptReply::new())?, false)
            }
            "shutdown_request" => {
                let restart = msg.content.get("restart").and_then(Value::as_bool).unwrap_or(false);
                info!(restart, "shutdown requested");
                (json!({ "status": "ok", "restart": restart }), true)
            }
            other => {
                debug!(msg_type = other, "unhandled control message");
                shared.status("idle", &msg.header);
                continue;
            }
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

/// Encode a reply on the shell channel.
pub fn reply(session: &Session, req: &ShellRequest, msg_type: &str, content: Value) {
    let (_, f) = session.msg(&req.msg.idents, msg_type, content, Some(&req.msg.header), json!({}), &[]);
    let _ = req.reply.send(message(f));
}
