//! The local runtime's stdout relay, so that a cell whose `?` returned an error is an error.
//!
//! evcxr's generated cell code turns the error of a top-level `?` into `eprintln!("{}", e)`
//! followed by `EVCXR_ERROR_OCCURRED` on stdout, and evcxr consumes that line without telling its
//! caller. In the runtime process (this binary as the engines' worker), [`install`] puts a pipe
//! on fd 1 and a thread that copies it to the real stdout; after an `EVCXR_ERROR_OCCURRED` line
//! it writes [`ERROR_MARK`] on stderr (after the error's text, which the cell wrote there
//! first) and a content block of mime type [`ERROR_MIME`] on stdout, which evcxr returns with
//! the cell's outputs. The kernel then knows the cell failed when `execute` returns, and its
//! stderr forwarder knows which stderr lines were the error's text (those just before the mark).
//!
//! Only stdout is relayed: stderr stays the process's own, so an abort's last words are never
//! lost in a relay. At exit the relay is drained (bounded) so a cell's last stdout lines are not.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use rpx_worker::markers::ERROR_OCCURRED;

/// The mime type of the content block that tells the kernel a cell's `?` returned an error.
pub const ERROR_MIME: &str = "application/vnd.rpx.question-mark-error";
/// Written on stderr after the error's text: the lines before it were the error.
pub const ERROR_MARK: &str = "RPX_QUESTION_MARK_ERROR_END";

/// evcxr cuts an input request's prompt at its first `:` (`EVCXR_INPUT_REQUEST:pin: ` asks
/// `pin`): the relay writes the prompt's colons as this private-use character, and the kernel
/// turns them back ([`restore_prompt`]).
pub const PROMPT_COLON: char = '\u{E03A}';

/// An input request's prompt as the cell wrote it.
pub fn restore_prompt(prompt: &str) -> String {
    prompt.replace(PROMPT_COLON, ":")
}

/// Signalled when the relay thread has copied everything (at EOF).
static DRAINED: Mutex<Option<mpsc::Receiver<()>>> = Mutex::new(None);

/// Put the relay on fd 1. On failure stdout stays as it was (a `?` error is then only on stderr).
pub fn install() {
    let mut fds = [0i32; 2];
    // SAFETY: plain fd syscalls on fds this function owns; fd 1 is replaced by dup2 atomically.
    let real_out = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return;
        }
        let real_out = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if real_out < 0 || libc::dup2(fds[1], 1) < 0 {
            libc::close(fds[0]);
            libc::close(fds[1]);
            return;
        }
        libc::close(fds[1]);
        real_out
    };
    let read_end = fds[0];
    let (done_tx, done_rx) = mpsc::channel();
    *DRAINED.lock().unwrap_or_else(|p| p.into_inner()) = Some(done_rx);
    let spawned = std::thread::Builder::new().name("stdout-relay".into()).spawn(move || {
        // SIGINT is for the thread running the cell (the worker's interrupts).
        // SAFETY: a signal mask for this thread only.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        // SAFETY: both fds are owned by this thread from here on.
        let mut input = unsafe { std::fs::File::from_raw_fd(read_end) };
        let mut out = unsafe { std::fs::File::from_raw_fd(real_out) };
        relay(&mut input, &mut out);
        let _ = done_tx.send(());
    });
    if spawned.is_ok() {
        extern "C" fn drain_at_exit() {
            // Close our write end so the relay sees EOF once the cell's children (if any) let go.
            // SAFETY: replacing fd 1 with /dev/null.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if null >= 0 {
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
            if let Some(rx) = DRAINED.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = rx.recv_timeout(Duration::from_secs(1));
            }
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(drain_at_exit) };
    }
}

/// Copy `input` to `out` line by line, adding the error notice after [`ERROR_OCCURRED`].
fn relay(input: &mut impl std::io::Read, out: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        let Some(last_nl) = pending.iter().rposition(|&b| b == b'\n') else { continue };
        let complete: Vec<u8> = pending.drain(..=last_nl).collect();
        let _ = out.write_all(&relayed(&complete));
        let _ = out.flush();
    }
    if !pending.is_empty() {
        let _ = out.write_all(&pending);
        let _ = out.flush();
    }
}

/// Complete lines as relayed: an [`ERROR_OCCURRED`] line gets the mark on stderr (written at
/// once, before the stdout that follows it is relayed) and the content block after it.
fn relayed(lines: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.len());
    for line in lines.split_inclusive(|&b| b == b'\n') {
        // The worker's markers follow the cell's flushed stdout, which may end without a
        // newline: evcxr finds a marker only on a line of its own.
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let marker = [rpx_worker::markers::EXECUTION_COMPLETE, rpx_worker::markers::INTERRUPTED]
            .into_iter()
            .find(|m| body.len() > m.len() && body.ends_with(m.as_bytes()));
        let (text, line) = match marker {
            Some(m) => line.split_at(body.len() - m.len()),
            None => (&line[..0], line),
        };
        if !text.is_empty() {
            out.extend_from_slice(text);
            out.push(b'\n');
        }
        if let Some(rest) = line.strip_prefix(b"EVCXR_INPUT_REQUEST") {
            // `EVCXR_INPUT_REQUEST:<prompt>` or `EVCXR_INPUT_REQUEST_PASSWORD:<prompt>`.
            let text = String::from_utf8_lossy(rest);
            if let Some((kind, prompt)) = text.split_once(':') {
                if kind.is_empty() || kind == "_PASSWORD" {
                    out.extend_from_slice(
                        format!("EVCXR_INPUT_REQUEST{kind}:{}", prompt.replace(':', &PROMPT_COLON.to_string())).as_bytes(),
                    );
                    continue;
                }
            }
        }
        // The worker's own notice of an interrupted cell is for an engine's supervisor; evcxr
        // would show it as the cell's output.
        if line.strip_suffix(b"\n").unwrap_or(line) == rpx_worker::markers::INTERRUPTED.as_bytes() {
            continue;
        }
        out.extend_from_slice(line);
        if line.strip_suffix(b"\n").unwrap_or(line) == ERROR_OCCURRED.as_bytes() {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{ERROR_MARK}");
            let _ = err.flush();
            out.extend_from_slice(format!("EVCXR_BEGIN_CONTENT {ERROR_MIME}\n1\nEVCXR_END_CONTENT\n").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_line_gets_a_content_block_and_the_rest_passes_unchanged() {
        let mut out = Vec::new();
        relay(&mut &b"a\nEVCXR_ERROR_OCCURRED\nb\npartial"[..], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("a\nEVCXR_ERROR_OCCURRED\nEVCXR_BEGIN_CONTENT {ERROR_MIME}\n1\nEVCXR_END_CONTENT\nb\npartial")
        );
        let mut out = Vec::new();
        relay(&mut &b"RPX_INTERRUPTED\nEVCXR_EXECUTION_COMPLETE\n"[..], &mut out);
        assert_eq!(out, b"EVCXR_EXECUTION_COMPLETE\n", "the worker's interrupt notice is not the cell's output");
        let mut out = Vec::new();
        relay(&mut &b"p1EVCXR_EXECUTION_COMPLETE\np2RPX_INTERRUPTED\nEVCXR_EXECUTION_COMPLETE\n"[..], &mut out);
        assert_eq!(
            out, b"p1\nEVCXR_EXECUTION_COMPLETE\np2\nEVCXR_EXECUTION_COMPLETE\n",
            "a marker after a flushed partial line gets a line of its own"
        );
        let mut out = Vec::new();
        relay(&mut &b"xEVCXR_ERROR_OCCURRED\n"[..], &mut out);
        assert_eq!(out, b"xEVCXR_ERROR_OCCURRED\n", "only the whole line is the marker");
    }

    #[test]
    fn colons_in_an_input_prompt_survive_evcxr() {
        let mut out = Vec::new();
        relay(&mut &b"EVCXR_INPUT_REQUEST_PASSWORD:pin: \nEVCXR_INPUT_REQUEST:a:b\nplain: x\n"[..], &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "plain: x");
        // What evcxr does with the line, then the kernel.
        for (line, want) in [(lines[0], "pin: "), (lines[1], "a:b")] {
            let prompt = line.split(':').nth(1).unwrap_or_default();
            assert_eq!(restore_prompt(prompt), want);
        }
    }
}
