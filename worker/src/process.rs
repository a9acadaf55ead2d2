//! The worker process: loads compiled cells and runs them. Plain std, no tokio, no sockets.
//!
//! `ipengine` re-executes itself as its worker, and `rpx-kernel` runs as one for its local cells
//! (evcxr's runtime); [`run`] then reads instructions on stdin:
//! - `LOAD_AND_RUN <so_path> <fn_name>`: call a cell function with the variable store pointer,
//!   then print `EVCXR_EXECUTION_COMPLETE` on stdout.
//! - `CALL <so_path> <fn_name> <mode> <len>` followed by `len` raw bytes: call a compiled closure
//!   (`rpx_runtime::abi`) and, after the closure's own output was flushed, write a
//!   [`crate::markers::CALL_END`] line on each of stdout and stderr whose pipe still holds
//!   unread output, then `[status: u32 LE][ends: u32 LE][len: u64 LE][bytes]` on the result
//!   pipe (fd [`RESULT_FD`]), `ends` saying which streams got the marker ([`END_ON_STDOUT`],
//!   [`END_ON_STDERR`]). A stream whose pipe was empty has been read to its end: its reader
//!   has had all of the call's output on it before the result, which it reads first. Calls may
//!   be written ahead: the worker reads its instructions in order.
//!
//! SIGINT interrupts the running cell or closure by injecting a panic into it (see [`crate::interrupt`]);
//! the worker then prints [`crate::markers::INTERRUPTED`] before `EVCXR_EXECUTION_COMPLETE`, or
//! answers a call with [`STATUS_INTERRUPTED`]. SIGINT while nothing runs is ignored.
//!
//! Libraries are never unloaded (cells register TLS destructors and leak statics into the store).

use std::collections::HashMap;
use std::ffi::c_void;
use std::io::{BufRead, Read, Write};

/// The supervisor's pid, so the worker can tell whether it was orphaned before PDEATHSIG was set.
pub const PARENT_ENV: &str = "RPX_ENGINE_PARENT";

/// Exit status for protocol errors (as evcxr's runtime).
pub const EXIT_PROTOCOL: i32 = 99;

/// The worker's end of the result pipe.
pub const RESULT_FD: i32 = 3;

/// Bit of a call result's `ends`: a [`crate::markers::CALL_END`] line follows the call's output
/// on stdout.
pub const END_ON_STDOUT: u32 = 1;
/// Bit of a call result's `ends`: a [`crate::markers::CALL_END`] line follows the call's output
/// on stderr.
pub const END_ON_STDERR: u32 = 2;

/// Status written on the result pipe when the closure symbol cannot be loaded.
pub const STATUS_LOAD_FAILED: u32 = 100;
/// Status written on the result pipe when the closure was interrupted (SIGINT); the bytes are a
/// message.
pub const STATUS_INTERRUPTED: u32 = 101;

/// What one stdin line tells the worker to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Instruction<'a> {
    Load { so_path: &'a str, fn_name: &'a str },
    Call { so_path: &'a str, fn_name: &'a str, mode: u32, len: usize },
}

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

    let mut intr = crate::interrupt::Interrupts::new();
    if let Err(e) = intr.install() {
        eprintln!("rpx engine worker: interrupts are off ({e}); SIGINT is ignored");
    }

    let mut store: *mut c_void = std::ptr::null_mut();
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut input = stdin.lock();
    // SAFETY: the supervisor opens fd 3 as the write end of the result pipe for every worker.
    let mut results = std::io::BufWriter::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(RESULT_FD) });
    let mut libs: HashMap<String, libloading::Library> = HashMap::new();
    let mut args = Vec::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => std::process::exit(0),
            Ok(_) => {}
            Err(e) => fail(&format!("cannot read stdin: {e}")),
        }
        let cmd = line.trim_end_matches(['\n', '\r']);
        if cmd.is_empty() {
            // The answer to an input request whose reader was interrupted (evcxr sends one).
            continue;
        }
        intr.busy();
        match parse_instruction(cmd) {
            Some(Instruction::Load { so_path, fn_name }) => {
                let interrupted;
                (store, interrupted) = load_and_run(so_path, fn_name, store, &mut intr);
                let mut out = std::io::stdout().lock();
                if interrupted {
                    let _ = writeln!(out, "{}", crate::markers::INTERRUPTED);
                }
                let _ = writeln!(out, "{}", crate::markers::EXECUTION_COMPLETE);
                let _ = out.flush();
            }
            Some(Instruction::Call { so_path, fn_name, mode, len }) => {
                args.resize(len, 0);
                if let Err(e) = input.read_exact(&mut args) {
                    fail(&format!("cannot read {len} argument bytes: {e}"));
                }
                let (status, out) = call(&mut libs, so_path, fn_name, mode, &args, &mut intr);
                // The call's own output was flushed (by the runtime) before it returned: what
                // follows on stdout and stderr belongs to the next call. A stream whose pipe
                // still holds some of it gets a marker behind it (one write); one the engine has
                // read to its end needs none, which spares a write and a wakeup per stream on
                // every quiet call. The markers go first, so the engine usually finds all of
                // them when it wakes.
                let end = format!("{}\n", crate::markers::CALL_END);
                let mut ends = 0;
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.flush();
                // A marker that could not be written is not announced (the engine would wait for it).
                if unread_output(libc::STDOUT_FILENO) && stdout.write_all(end.as_bytes()).and_then(|_| stdout.flush()).is_ok() {
                    ends |= END_ON_STDOUT;
                }
                if unread_output(libc::STDERR_FILENO) && std::io::stderr().lock().write_all(end.as_bytes()).is_ok() {
                    ends |= END_ON_STDERR;
                }
                let written = results
                    .write_all(&status.to_le_bytes())
                    .and_then(|_| results.write_all(&ends.to_le_bytes()))
                    .and_then(|_| results.write_all(&(out.len() as u64).to_le_bytes()))
                    .and_then(|_| results.write_all(&out))
                    .and_then(|_| results.flush());
                if let Err(e) = written {
                    fail(&format!("cannot write a result: {e}"));
                }
                args.clear();
            }
            None => fail(&format!("unrecognised line {cmd:?} (expected `LOAD_AND_RUN <so> <fn>` or `CALL <so> <fn> <mode> <len>`)")),
        }
        intr.idle();
    }
}

/// Parse one stdin line.
pub fn parse_instruction(line: &str) -> Option<Instruction<'_>> {
    if let Some(rest) = line.strip_prefix("LOAD_AND_RUN ") {
        let (so_path, fn_name) = rest.split_once(' ')?;
        if so_path.is_empty() || fn_name.is_empty() || fn_name.contains(' ') {
            return None;
        }
        return Some(Instruction::Load { so_path, fn_name });
    }
    let rest = line.strip_prefix("CALL ")?;
    let mut parts = rest.split(' ');
    let (so_path, fn_name, mode, len) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    if so_path.is_empty() || fn_name.is_empty() || parts.next().is_some() {
        return None;
    }
    Some(Instruction::Call { so_path, fn_name, mode, len })
}

extern "C" fn collect(ctx: *mut c_void, ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: `call` passes a `&mut Vec<u8>` as ctx; the closure passes a valid buffer.
    unsafe { (*(ctx as *mut Vec<u8>)).extend_from_slice(std::slice::from_raw_parts(ptr, len)) }
}

/// Signature of a compiled closure (`rpx_runtime::abi::ClosureFn`).
type ClosureFn = unsafe extern "C" fn(u32, *const u8, usize, extern "C" fn(*mut c_void, *const u8, usize), *mut c_void) -> u32;

fn call(
    libs: &mut HashMap<String, libloading::Library>,
    so_path: &str,
    fn_name: &str,
    mode: u32,
    args: &[u8],
    intr: &mut crate::interrupt::Interrupts,
) -> (u32, Vec<u8>) {
    if !libs.contains_key(so_path) {
        // SAFETY: loading a library runs its initialisers; the compiler built it for this purpose.
        match unsafe { libloading::Library::new(so_path) } {
            Ok(lib) => {
                libs.insert(so_path.to_string(), lib);
            }
            Err(e) => return (STATUS_LOAD_FAILED, format!("cannot load {so_path}: {e}").into_bytes()),
        }
    }
    let lib = &libs[so_path];
    // SAFETY: the compiler exports closures with exactly this signature.
    let f = match unsafe { lib.get::<ClosureFn>(fn_name.as_bytes()) } {
        Ok(f) => f,
        Err(e) => return (STATUS_LOAD_FAILED, format!("no {fn_name} in {so_path}: {e}").into_bytes()),
    };
    let f: ClosureFn = *f;
    intr.loaded();
    let mut out = Vec::new();
    intr.begin();
    // SAFETY: `args` is a valid buffer for the call; `collect` matches the sink signature.
    let status = unsafe { f(mode, args.as_ptr(), args.len(), collect, &mut out as *mut Vec<u8> as *mut c_void) };
    if intr.end() && status != rpx_runtime::abi::STATUS_OK {
        return (STATUS_INTERRUPTED, b"the call was interrupted (SIGINT)".to_vec());
    }
    (status, out)
}

/// Whether the pipe (or other file) on `fd` may still hold output its reader has not read: true
/// unless the kernel says it holds none (`FIONREAD`, which a pipe answers on its write end too)
/// or `fd` is closed (user code closed it: nothing more comes through it, and std would drop a
/// marker written to it without an error).
fn unread_output(fd: i32) -> bool {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to one.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut pending) } == 0 {
        return pending != 0;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::EBADF)
}

/// Run a cell; returns the new store and whether the cell was interrupted.
fn load_and_run(so_path: &str, fn_name: &str, store: *mut c_void, intr: &mut crate::interrupt::Interrupts) -> (*mut c_void, bool) {
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
        let f: extern "C" fn(*mut c_void) -> *mut c_void = *f;
        intr.loaded();
        intr.begin();
        let store = f(store);
        let interrupted = intr.end();
        // The cell's output sits in the shared libstd's stdout buffer until flushed there.
        // SAFETY: the compiler's cells export this symbol with exactly this signature.
        if let Ok(flush) = unsafe { lib.get::<extern "C" fn()>(rpx_protocol::compile::cell_abi::FLUSH_FN) } {
            flush();
        }
        (store, interrupted)
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
        assert_eq!(
            parse_instruction("LOAD_AND_RUN /tmp/a.so run_user_code_3"),
            Some(Instruction::Load { so_path: "/tmp/a.so", fn_name: "run_user_code_3" })
        );
        assert_eq!(parse_instruction("LOAD_AND_RUN /tmp/a.so"), None);
        assert_eq!(parse_instruction("RUN /tmp/a.so f"), None);
        assert_eq!(parse_instruction("LOAD_AND_RUN /tmp/a.so f g"), None);
        assert_eq!(
            parse_instruction("CALL /tmp/c.so rpx_closure_ab 1 42"),
            Some(Instruction::Call { so_path: "/tmp/c.so", fn_name: "rpx_closure_ab", mode: 1, len: 42 })
        );
        assert_eq!(parse_instruction("CALL /tmp/c.so f 1"), None);
        assert_eq!(parse_instruction("CALL /tmp/c.so f x 3"), None);
        assert_eq!(parse_instruction("CALL /tmp/c.so f 1 3 4"), None);
    }
}
