//! The supervisor's handle on its worker process: the command that starts it, spawning it,
//! reading its pipes, noticing its death, and the [`WorkerSlot`] holding the running one.
//!
//! One reader task per worker incarnation owns the child and both pipes and sends
//! [`WorkerEvent`]s tagged with the incarnation number, so events of a killed worker are easy to
//! ignore. Killing is by pid; the reader task reaps the process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

/// What a worker produced.
#[derive(Debug)]
pub enum WorkerEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// A closure call returned (`rpx_runtime::abi` status and output bytes); `ends` names the
    /// streams on which a `CALL_END` marker follows its output (`rpx_worker::process::END_ON_STDOUT`,
    /// `END_ON_STDERR`): the others were read to the end of its output before this event.
    CallResult {
        status: u32,
        ends: u32,
        data: Vec<u8>,
    },
    /// The worker is gone; the status described (`signal 6 (SIGABRT)`, `exit status 99`).
    Exited(String),
}

/// Splits the result pipe's byte stream into `[status u32][ends u32][len u64][bytes]` frames.
#[derive(Debug, Default)]
pub struct ResultFramer {
    buf: Vec<u8>,
}

/// One frame's header: status, ends, length.
const FRAME_HEAD: usize = 16;

/// A call's result as the worker framed it: status, ends, bytes.
pub type CallFrame = (u32, u32, Vec<u8>);

impl ResultFramer {
    /// Feed bytes; returns the complete frames.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<CallFrame> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < FRAME_HEAD {
                break;
            }
            let word = |at: usize| u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes"));
            let (status, ends) = (word(0), word(4));
            let len = u64::from_le_bytes(self.buf[8..FRAME_HEAD].try_into().expect("8 bytes")) as usize;
            if self.buf.len() < FRAME_HEAD + len {
                self.buf.reserve(FRAME_HEAD + len - self.buf.len());
                break;
            }
            let rest = self.buf.split_off(FRAME_HEAD + len);
            let mut frame = std::mem::replace(&mut self.buf, rest);
            frame.drain(..FRAME_HEAD);
            out.push((status, ends, frame));
        }
        out
    }
}

/// Environment variable that makes `ipengine` run as its worker ([`rpx_worker::run`]).
pub const WORKER_ENV: &str = "RPX_ENGINE_WORKER";

/// How to start workers.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The program to run (normally `current_exe()`).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment for the worker.
    pub env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// Re-execute this binary as a worker, with `libdirs` (where the runtime libraries that
    /// compiled cells link are) first on `LD_LIBRARY_PATH`.
    pub fn this_binary(libdirs: &[String]) -> std::io::Result<WorkerCommand> {
        let mut env =
            vec![(WORKER_ENV.to_string(), "1".to_string()), (rpx_worker::process::PARENT_ENV.to_string(), std::process::id().to_string())];
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            env.push(("RUST_BACKTRACE".into(), "0".into()));
        }
        let mut dirs: Vec<String> = libdirs.iter().filter(|d| !d.is_empty()).cloned().collect();
        if !dirs.is_empty() {
            dirs.extend(std::env::var("LD_LIBRARY_PATH").ok().filter(|old| !old.is_empty()));
            env.push(("LD_LIBRARY_PATH".into(), dirs.join(":")));
        }
        Ok(WorkerCommand { program: std::env::current_exe()?, args: vec![], env })
    }

    /// [`WorkerCommand::this_binary`] for the worker of engine `engine_id`, whose namespace is
    /// `ns_dir`: cells can read their engine's id (`RPX_ENGINE_ID`) and index
    /// ([`crate::engine::ENGINE_INDEX_ENV`], the id unless ipcluster's launcher set it).
    pub fn for_engine(libdirs: &[String], engine_id: u64, ns_dir: &Path) -> std::io::Result<WorkerCommand> {
        let mut c = WorkerCommand::this_binary(libdirs)?;
        c.env.push(("RPX_ENGINE_ID".to_string(), engine_id.to_string()));
        if std::env::var_os(crate::engine::ENGINE_INDEX_ENV).is_none() {
            // Engines not started by ipcluster's local launcher (MPI ranks, by hand).
            c.env.push((crate::engine::ENGINE_INDEX_ENV.to_string(), engine_id.to_string()));
        }
        c.env.push((rpx_runtime::NS_DIR_ENV.to_string(), ns_dir.display().to_string()));
        Ok(c)
    }
}

/// Why a write to the worker failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailed {
    /// No worker runs (none could be started): nothing will report an exit.
    NoWorker(String),
    /// The worker is dying: its exit event follows.
    Dying(String),
}

impl WriteFailed {
    fn no_worker() -> WriteFailed {
        WriteFailed::NoWorker("the worker could not be started".into())
    }
}

/// The supervisor's worker slot: how to start workers, the running incarnation, and the
/// incarnation number its events carry.
#[derive(Debug)]
pub struct WorkerSlot {
    command: Option<WorkerCommand>,
    worker: Option<Worker>,
    generation: u64,
    events: mpsc::Sender<(u64, WorkerEvent)>,
}

impl WorkerSlot {
    /// An empty slot; workers will send their events to `events`.
    pub fn new(events: mpsc::Sender<(u64, WorkerEvent)>) -> WorkerSlot {
        WorkerSlot { command: None, worker: None, generation: 0, events }
    }

    /// Whether workers can be started (the command is known).
    pub fn has_command(&self) -> bool {
        self.command.is_some()
    }

    pub fn set_command(&mut self, command: Option<WorkerCommand>) {
        self.command = command;
    }

    /// The running worker.
    pub fn get(&self) -> Option<&Worker> {
        self.worker.as_ref()
    }

    /// Whether an event tagged `generation` comes from the running worker.
    pub fn is_current(&self, generation: u64) -> bool {
        generation == self.generation && self.worker.is_some()
    }

    /// Start a worker unless one runs or the command is not known yet. Returns whether one was
    /// started.
    pub fn ensure(&mut self) -> bool {
        if self.worker.is_some() {
            return false;
        }
        let Some(cmd) = &self.command else { return false };
        self.generation += 1;
        match Worker::spawn(cmd, self.generation, self.events.clone()) {
            Ok(w) => {
                tracing::info!(pid = w.pid, generation = self.generation, "worker started");
                self.worker = Some(w);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the worker");
                false
            }
        }
    }

    /// The running worker exited and was reaped: its pid is never signalled again.
    pub fn exited(&mut self) {
        if let Some(w) = &mut self.worker {
            w.pid = -1;
        }
        self.worker = None;
    }

    /// Send `sig` to the running worker; without one there is nothing to signal.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let Some(w) = &self.worker else { return Ok(()) };
        w.signal(sig)?;
        tracing::info!(sig, pid = w.pid, "signalled the worker");
        Ok(())
    }

    /// SIGINT to the running worker's main thread (see [`Worker::interrupt`]), if one runs.
    pub fn interrupt(&self) -> std::io::Result<()> {
        self.worker.as_ref().map_or(Ok(()), Worker::interrupt)
    }

    /// Write a command line to the running worker.
    pub async fn send_line(&mut self, line: &str) -> Result<(), WriteFailed> {
        let w = self.worker.as_mut().ok_or_else(WriteFailed::no_worker)?;
        w.send_line(line).await.map_err(|e| WriteFailed::Dying(e.to_string()))
    }

    /// Ask the running worker to call a compiled closure (see [`Worker::send_call`]).
    pub async fn send_call(&mut self, so_path: &str, fn_name: &str, mode: u32, args: &[u8]) -> Result<(), WriteFailed> {
        let w = self.worker.as_mut().ok_or_else(WriteFailed::no_worker)?;
        w.send_call(so_path, fn_name, mode, args).await.map_err(|e| WriteFailed::Dying(e.to_string()))
    }

    /// Ask the running worker for several calls of one closure in one write (see
    /// [`Worker::send_calls`]).
    pub async fn send_calls(&mut self, so_path: &str, fn_name: &str, mode: u32, args: &[&[u8]]) -> Result<(), WriteFailed> {
        let w = self.worker.as_mut().ok_or_else(WriteFailed::no_worker)?;
        w.send_calls(so_path, fn_name, mode, args).await.map_err(|e| WriteFailed::Dying(e.to_string()))
    }

    /// Take the running worker out of the slot (to kill it).
    pub fn take(&mut self) -> Option<Worker> {
        self.worker.take()
    }
}

/// A running worker incarnation.
#[derive(Debug)]
pub struct Worker {
    pub generation: u64,
    pub pid: i32,
    stdin: Option<ChildStdin>,
}

impl Worker {
    /// Spawn a worker; its events arrive on `events` tagged with `generation`.
    pub fn spawn(cmd: &WorkerCommand, generation: u64, events: mpsc::Sender<(u64, WorkerEvent)>) -> std::io::Result<Worker> {
        let (read_end, write_end) = result_pipe()?;
        let mut child = worker_process(cmd, write_end.as_raw_fd()).spawn()?;
        drop(write_end);
        let results = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(forward_pipes(child, stdout, stderr, results, generation, events));
        Ok(Worker { generation, pid, stdin })
    }

    /// Write one command line to the worker's stdin (bounded wait).
    pub async fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.write(&[line.as_bytes(), b"\n"]).await
    }

    /// Ask the worker to call a compiled closure; the answer is a [`WorkerEvent::CallResult`].
    pub async fn send_call(&mut self, so_path: &str, fn_name: &str, mode: u32, args: &[u8]) -> std::io::Result<()> {
        let mut line = format!("CALL {so_path} {fn_name} {mode} {}\n", args.len()).into_bytes();
        if args.len() <= 64 * 1024 {
            // Small arguments go in the same write: one wake-up of the worker, not two.
            line.extend_from_slice(args);
            return self.write(&[&line]).await;
        }
        self.write(&[&line, args]).await
    }

    /// Several calls of one closure, written as consecutive `CALL` instructions: the small ones
    /// in one write (one wake-up of the worker for all of them), each large argument on its own.
    pub async fn send_calls(&mut self, so_path: &str, fn_name: &str, mode: u32, args: &[&[u8]]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for a in args {
            buf.extend_from_slice(format!("CALL {so_path} {fn_name} {mode} {}\n", a.len()).as_bytes());
            if a.len() <= 64 * 1024 {
                buf.extend_from_slice(a);
            } else {
                self.write(&[&buf, a]).await?;
                buf.clear();
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.write(&[&buf]).await
    }

    /// Write `parts` to the worker's stdin. The bound is 5 s plus 20 ms per MB, so large
    /// arguments take as long as the worker needs to read them and a stuck worker is still noticed.
    async fn write(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| std::io::Error::other("worker stdin closed"))?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let limit = Duration::from_secs(5) + Duration::from_millis((len / 1_000_000) as u64 * 20);
        match tokio::time::timeout(limit, async {
            for p in parts {
                stdin.write_all(p).await?;
            }
            stdin.flush().await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "worker stdin is not accepting input")),
        }
    }

    /// Send a signal to the worker.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        if self.pid <= 0 {
            return Err(std::io::Error::other("worker has no pid"));
        }
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(self.pid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Send SIGINT to the worker's main thread, where cells run (see [`rpx_worker::interrupt`]).
    pub fn interrupt(&self) -> std::io::Result<()> {
        if self.pid <= 0 {
            return Err(std::io::Error::other("worker has no pid"));
        }
        // SAFETY: tgkill has no memory effects; the main thread's id is the process id.
        if unsafe { libc::tgkill(self.pid, self.pid, libc::SIGINT) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Kill the worker (SIGKILL) and close its stdin; the reader task reaps it.
    pub fn kill(&mut self) {
        let _ = self.signal(libc::SIGKILL);
        self.stdin = None;
    }
}

/// The result pipe (close-on-exec): the worker writes closure results on its write end, which
/// becomes its fd [`rpx_worker::process::RESULT_FD`].
fn result_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that we now own.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((read_end, write_end))
}

/// The worker's process: `cmd` with `write_fd` (the result pipe) as its fd
/// [`rpx_worker::process::RESULT_FD`], its standard streams piped, in a process group of its own.
fn worker_process(cmd: &WorkerCommand, write_fd: i32) -> Command {
    let mut c = Command::new(&cmd.program);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let fd = rpx_worker::process::RESULT_FD;
            if write_fd == fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(write_fd, fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // A terminal's Ctrl-C goes to the supervisor, which then stops the worker itself.
        .process_group(0)
        .kill_on_drop(true);
    c
}

/// Forward the worker's stdout, stderr and closure results to `events` as they come (tagged
/// with `generation`), then its exit status once it is gone and its pipes are drained.
async fn forward_pipes(
    mut child: Child,
    mut stdout: ChildStdout,
    mut stderr: ChildStderr,
    mut results: tokio::net::unix::pipe::Receiver,
    generation: u64,
    events: mpsc::Sender<(u64, WorkerEvent)>,
) {
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let mut res_buf = vec![0u8; 256 * 1024];
    let mut framer = ResultFramer::default();
    let (mut out_open, mut err_open, mut res_open) = (true, true, true);
    let mut status: Option<String> = None;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let pipes_open = out_open || err_open || res_open;
        if !pipes_open && status.is_some() {
            break;
        }
        if !pipes_open && status.is_none() {
            // Pipes closed: the process is exiting.
            let st = child.wait().await.map(|s| crate::signals::describe_exit(&s));
            status = Some(st.unwrap_or_else(|e| format!("unknown status ({e})")));
            continue;
        }
        let deadline = drain_deadline;
        tokio::select! {
            // Results first: a call's result is written after all of its output the worker
            // did not mark (that output was read already, see `rpx_worker::process`), and
            // before the next call's output, which must not be read ahead of it.
            biased;
            r = results.read(&mut res_buf), if res_open => match r {
                Ok(0) | Err(_) => res_open = false,
                Ok(n) => {
                    for (status, ends, data) in framer.feed(&res_buf[..n]) {
                        if events.send((generation, WorkerEvent::CallResult { status, ends, data })).await.is_err() {
                            return;
                        }
                    }
                }
            },
            r = stderr.read(&mut err_buf), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    if events.send((generation, WorkerEvent::Stderr(err_buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
            },
            r = stdout.read(&mut out_buf), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    if events.send((generation, WorkerEvent::Stdout(out_buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
            },
            st = child.wait(), if status.is_none() => {
                status = Some(match st {
                    Ok(s) => crate::signals::describe_exit(&s),
                    Err(e) => format!("unknown status ({e})"),
                });
                // Something the worker started may hold the pipes open; do not wait long.
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(200));
            },
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break,
        }
    }
    let _ = events.send((generation, WorkerEvent::Exited(status.unwrap_or_default()))).await;
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::ResultFramer;

    fn frame(status: u32, data: &[u8]) -> Vec<u8> {
        let mut v = status.to_le_bytes().to_vec();
        v.extend((status % 4).to_le_bytes());
        v.extend((data.len() as u64).to_le_bytes());
        v.extend(data);
        v
    }

    #[test]
    fn frames_split_across_reads_and_back_to_back() {
        let mut bytes = frame(0, b"hello");
        bytes.extend(frame(1, b""));
        bytes.extend(frame(2, &[7u8; 1000]));
        let mut f = ResultFramer::default();
        let mut got = Vec::new();
        for chunk in bytes.chunks(7) {
            got.extend(f.feed(chunk));
        }
        assert_eq!(got, vec![(0, 0, b"hello".to_vec()), (1, 1, vec![]), (2, 2, vec![7u8; 1000])]);
        assert!(f.feed(&[]).is_empty());
    }
}
