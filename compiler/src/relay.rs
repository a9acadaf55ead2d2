//! The relay: the "child process" evcxr starts for each compiler context.
//!
//! evcxr talks to its child over stdin/stdout (`LOAD_AND_RUN <so> <fn>` in, marker lines and
//! `EVCXR_EXECUTION_COMPLETE` out). The relay only bridges those pipes to the compiler process
//! over a Unix socket, so the compiler itself decides which engines run each artifact and what
//! verdict evcxr sees. It dies with its parent (PDEATHSIG).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

/// Environment variable naming the Unix socket a relay connects to.
pub const RELAY_SOCKET_ENV: &str = "RPX_RELAY_SOCKET";

/// Run as a relay if this process was started as one; never returns in that case.
pub fn run_if_relay() {
    let Some(path) = std::env::var_os(RELAY_SOCKET_ENV) else { return };
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rpx relay: cannot connect to {}: {e}", path.to_string_lossy());
            std::process::exit(98);
        }
    };
    let mut to_compiler = stream.try_clone().expect("clone unix stream");
    let from_compiler = stream;
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if writeln!(to_compiler, "{line}").is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let mut out = std::io::stdout();
    for line in BufReader::new(from_compiler).lines() {
        let Ok(line) = line else { break };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    std::process::exit(0);
}
