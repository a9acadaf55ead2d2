//! The worker process: loads compiled cells and runs them. Plain std, no tokio, no sockets.
//!
//! `ipengine` re-executes itself with `RPX_ENGINE_WORKER=1`; [`run`] then reads
//! `LOAD_AND_RUN <so_path> <fn_name>` lines on stdin, calls each cell function with the variable
//! store pointer and prints `EVCXR_EXECUTION_COMPLETE`. Libraries are never unloaded (cells
//! register TLS destructors and leak statics into the store).

use std::ffi::c_void;
use std::io::{BufRead, Write};

/// Environment variable that makes `ipengine` run as a worker.
pub const WORKER_ENV: &str = "RPX_ENGINE_WORKER";
/// The supervisor's pid, so the worker can tell whether it was orphaned before PDEATHSIG was set.
pub const PARENT_ENV: &str = "RPX_ENGINE_PARENT";

/// Exit status for protocol errors (as evcxr's runtime).
pub const EXIT_PROTOCOL: i32 = 99;

/// Run the worker loop; never returns.
pub fn run() -> ! {
    // Die with the supervisor, whatever killed it.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
    }
    if let Some(parent) = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok()) {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            eprintln!("rpx engine worker: the engine (pid {parent}) is gone; exiting");
            std::process::exit(1);
        }
    }

    let mut store: *mut c_void = std::ptr::null_mut();
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut input = stdin.lock();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => std::process::exit(0),
            Ok(_) => {}
            Err(e) => fail(&format!("cannot read stdin: {e}")),
        }
        let cmd = line.trim_end_matches(['\n', '\r']);
        let Some((so_path, fn_name)) = parse_command(cmd) else {
            fail(&format!("unrecognised line {cmd:?} (expected `LOAD_AND_RUN <so_path> <fn_name>`)"));
        };
        store = load_and_run(so_path, fn_name, store);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", crate::output::EXECUTION_COMPLETE);
        let _ = out.flush();
    }
}

/// `LOAD_AND_RUN <so_path> <fn_name>` -> `(so_path, fn_name)`.
pub fn parse_command(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("LOAD_AND_RUN ")?;
    let (so, func) = rest.split_once(' ')?;
    if so.is_empty() || func.is_empty() || func.contains(' ') {
        return None;
    }
    Some((so, func))
}

fn load_and_run(so_path: &str, fn_name: &str, store: *mut c_void) -> *mut c_void {
    // SAFETY: loading a library runs its initialisers; the compiler built it for this purpose.
    let lib = match unsafe { libloading::Library::new(so_path) } {
        Ok(lib) => lib,
        Err(e) => fail(&format!("dlopen failed for {so_path}: {e}")),
    };
    let result = {
        // SAFETY: evcxr's generated cell functions have exactly this signature.
        let f = match unsafe { lib.get::<extern "C" fn(*mut c_void) -> *mut c_void>(fn_name.as_bytes()) } {
            Ok(f) => f,
            Err(e) => fail(&format!("dlsym failed for {fn_name} in {so_path}: {e}")),
        };
        f(store)
    };
    // Never unload: the store and TLS destructors may point into the library.
    std::mem::forget(lib);
    result
}

fn fail(msg: &str) -> ! {
    eprintln!("rpx engine worker: {msg}");
    std::process::exit(EXIT_PROTOCOL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse_command("LOAD_AND_RUN /tmp/a.so run_user_code_3"), Some(("/tmp/a.so", "run_user_code_3")));
        assert_eq!(parse_command("LOAD_AND_RUN /tmp/a.so"), None);
        assert_eq!(parse_command("RUN /tmp/a.so f"), None);
        assert_eq!(parse_command("LOAD_AND_RUN /tmp/a.so f g"), None);
    }
}
