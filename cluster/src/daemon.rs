//! `ipcluster start --daemonize` with supervision: the command runs itself again as a detached
//! supervisor (the same arguments plus the hidden `--detached-supervisor`, in a session of its
//! own, so no terminal signal reaches it) and relays what that process prints while it starts
//! the cluster. The detached process starts everything as a foreground `ipcluster start`
//! would, so the controller, the compiler and the engines are its children and it knows how
//! each one ended; once the engines are registered it prints a ready marker ([`READY`]), moves
//! its output to its log ([`hand_off`]) and supervises (see [`crate::supervise`]).
//!
//! The launching command exits 0 when it sees the marker, or with the detached process's exit
//! code if that process ended without it (its error was relayed). SIGINT/SIGTERM of the
//! launching command are forwarded, so Ctrl-C during the start still stops what was started.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procs;
use crate::Fail;

/// The hidden option that makes `ipcluster start --daemonize` the detached supervisor.
pub const DETACHED_FLAG: &str = "--detached-supervisor";

/// The line the detached supervisor prints (on stdout, its last line there) once the cluster
/// runs.
pub const READY: &str = "\u{1}rpx-ipcluster-supervisor-ready";

/// Run `ipcluster start ... --daemonize` again as the detached supervisor; relay its output
/// until it is ready or fails. `limit` is `--timeout` (the detached process bounds each of its
/// waits by it; this bounds the whole start by a multiple of it).
pub fn start_detached(limit: Duration) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("cannot locate the ipcluster executable")?;
    let mut cmd = Command::new(&exe);
    cmd.args(std::env::args_os().skip(1)).arg(DETACHED_FLAG).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    procs::catch_stop_signals();
    let mut child = cmd.spawn().with_context(|| format!("cannot start the detached supervisor {}", exe.display()))?;
    let ready = Arc::new(AtomicBool::new(false));
    let out = relay(child.stdout.take().expect("piped"), Some(ready.clone()), false);
    let err = relay(child.stderr.take().expect("piped"), None, true);

    // Starting waits for the controller, the compiler's file (remote engines) and the engines,
    // each within `limit`, then settles launches; stopping after a failure takes ~20 s more.
    let deadline = Instant::now() + limit * 3 + Duration::from_secs(30);
    let mut asked_to_stop = false;
    while !(out.is_finished() && err.is_finished()) {
        if !asked_to_stop {
            if let Some(sig) = procs::stop_signal() {
                eprintln!("ipcluster: {sig} received: stopping what was started");
                procs::signal(child.id(), libc::SIGTERM);
                asked_to_stop = true;
            } else if Instant::now() >= deadline {
                eprintln!("ipcluster: the detached supervisor (pid {}) did not finish starting in time: stopping it", child.id());
                procs::signal(child.id(), libc::SIGTERM);
                asked_to_stop = true;
            }
        }
        if Instant::now() >= deadline + Duration::from_secs(30) {
            procs::signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            return Err(Fail::new(1, format!("the detached supervisor did not start the cluster within {:.0} s and was killed; `ipcluster stop` cleans up what it left", (limit * 3).as_secs_f64())).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if ready.load(Ordering::SeqCst) {
        // Reaped by init once it ends: it is not our child to wait for any more.
        return Ok(0);
    }
    // It ended without saying it is ready: its error was relayed; exit as it did.
    let waited = procs::wait_until(Duration::from_secs(30), || !matches!(child.try_wait(), Ok(None)));
    match child.try_wait() {
        Ok(Some(status)) => Ok(status.code().unwrap_or(1)),
        _ => {
            let msg = if waited {
                "cannot learn how the detached supervisor ended"
            } else {
                "the detached supervisor closed its output without being ready or exiting"
            };
            Err(Fail::new(1, format!("{msg} (pid {}); check with `ipcluster list`", child.id())).into())
        }
    }
}

/// Copy `from` line by line to our stdout (or stderr), until EOF. With `ready`, the ready
/// marker is not copied but flagged.
fn relay(from: impl Read + Send + 'static, ready: Option<Arc<AtomicBool>>, to_stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some(flag) = &ready {
                if line.strip_suffix(b"\n").unwrap_or(&line) == READY.as_bytes() {
                    flag.store(true, Ordering::SeqCst);
                    continue;
                }
            }
            let _ = if to_stderr {
                std::io::stderr().write_all(&line)
            } else {
                std::io::stdout().write_all(&line).and_then(|()| std::io::stdout().flush())
            };
        }
    })
}

/// In the detached supervisor, once the cluster runs: print the ready marker, then send
/// stdout and stderr to `log` (closing the pipes to the launching command, which then exits).
pub fn hand_off(log: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    println!("{READY}");
    std::io::stdout().flush().context("cannot tell the launching ipcluster that the cluster runs")?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open the supervisor log {}", log.display()))?;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 onto the standard descriptors; `f` stays open until both are done.
        if unsafe { libc::dup2(f.as_raw_fd(), fd) } == -1 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot write to the supervisor log {}", log.display()));
        }
    }
    Ok(())
}
