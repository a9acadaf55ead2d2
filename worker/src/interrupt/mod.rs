//! Interrupting the code a worker runs: SIGINT becomes a panic injected into the running cell
//! (or closure call), so that the cell stops and evcxr's wrapper catches it, keeping the
//! variables that existed before the cell (the compiler handles it as any panicked cell).
//!
//! The panic is raised with `std::panic::resume_unwind` *of the cells' libstd*, with a payload
//! boxed ahead of time (no panic hook, nothing on stderr). Cells link std dynamically
//! (`-C prefer-dynamic`); a panic raised by this binary's own copy of std would be a foreign
//! exception to their `catch_unwind` and abort the process, so the function is looked up in the
//! loaded `libstd-*.so` by its mangled name, as is its global panic count.
//!
//! The SIGINT handler (`SA_SIGINFO`, `extern "C-unwind"`) raises it only where the compiler's
//! own unwind tables allow, two ways:
//! - **Blocked in a system call**: the interrupted instruction follows a `syscall` that returned
//!   `-EINTR`, in a libc wrapper of a blocking call that is a thread-cancellation point (sleep,
//!   read, write, poll, wait, accept, ...: glibc's `pthread_cancel` unwinds from these very
//!   points). The handler unwinds from the signal frame at once. Futex waits (std's locks,
//!   condition variables, parking, scoped joins) are never unwound from.
//! - **Running**: the handler walks the stack and finds the innermost return address that is a
//!   call the compiler marked as able to unwind (a call site with a landing pad), and replaces it
//!   with a trampoline. When the callee returns, the trampoline raises the panic as if the callee
//!   had panicked at its end, so only unwinds the compiler planned for happen (the callee's
//!   return value is leaked). A loop that calls such functions (most Rust functions, `println!`,
//!   std's I/O) stops at its next return from one.
//!
//! Either way a dry run of the unwinder's search phase (`_Unwind_Backtrace`, reading each frame's
//! call-site table exactly as Rust's personality routine does) must reach a `catch_unwind` before
//! any frame where unwinding would abort ("cannot unwind") and before this binary's frames, and no
//! panic may be in progress. Otherwise the handler arms a one-shot timer that delivers SIGINT to
//! the main thread again 1-2 ms later. Code that never reaches such a point (a loop whose body
//! cannot unwind: arithmetic, allocation; a cell waiting for its own threads) is not interrupted;
//! the engine kills the worker after a grace period.
//!
//! One interrupt is delivered per command. SIGINT while no command runs is ignored; while a
//! command is being prepared (library loading) it is remembered and delivered once user code
//! runs. A SIGINT that reaches another thread (one a cell started) is passed to the main thread.
//!
//! A callee that does not return within a few attempts (the cell's own loop, when it was the
//! innermost such frame) gets its return address back and a deeper frame is chosen next time.
//!
//! Known limits: a real panic inside the callee whose return address was replaced, in the
//! moment before it returns, cannot unwind past the trampoline and aborts the worker (reported
//! as a worker death); so does a callee that leaves by `longjmp`. Unwinding from a blocked
//! system call passes frames that called libc as if it could not unwind (as thread cancellation
//! does); frames with destructors there refuse it (their call-site tables say so), frames
//! without any are unwound through.
//!
//! # Layout
//! This file: the state the handler and the worker share, [`Interrupts`] (the worker's side),
//! the SIGINT handler and the trampoline. `search`: the dry run of the unwinder's search phase
//! that finds where a panic may be raised. `libstd`: finding `resume_unwind` and the panic count
//! in the cells' libstd.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU8, AtomicUsize, Ordering::SeqCst};

mod libstd;
mod search;

use libstd::find_libstd;
use search::{plan, Plan};

/// The payload of the injected panic (what a closure's caught panic reports as its message).
pub const PAYLOAD_TEXT: &str = "KeyboardInterrupt: interrupted by SIGINT";

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const RUNNING: u8 = 2;

/// What the worker is doing: waiting for a command, preparing or finishing one, running user code.
static STATE: AtomicU8 = AtomicU8::new(IDLE);
/// An interrupt was asked for during the current command and not delivered yet.
static PENDING: AtomicBool = AtomicBool::new(false);
/// A return address was replaced by the trampoline and the panic is not raised yet.
static HIJACKED: AtomicBool = AtomicBool::new(false);
/// The return address the trampoline stands in for, and where it was.
static HIJACK_RET: AtomicUsize = AtomicUsize::new(0);
static HIJACK_SLOT: AtomicUsize = AtomicUsize::new(0);
/// Attempts since the return address was replaced; after a few the callee is taken to be one
/// that does not return soon (a loop), the address is put back and a deeper frame is chosen.
static HIJACK_AGE: AtomicU32 = AtomicU32::new(0);
/// Only frames deeper than this return address slot may be chosen (one whose callee did not
/// return soon).
static STALE_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
const HIJACK_PATIENCE: u32 = 3;
/// The interrupt was delivered (the panic raised) during the current user code run.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// `std::panic::resume_unwind` of the cells' libstd, once found.
static RESUME: AtomicUsize = AtomicUsize::new(0);
/// The address of libstd's `GLOBAL_PANIC_COUNT` (panics in progress, all threads), once found.
static PANIC_COUNT: AtomicUsize = AtomicUsize::new(0);
static MAIN_TID: AtomicI32 = AtomicI32::new(0);
/// The retry timer (a `timer_t`; the kernel's first timer id is 0, a null pointer), delivering
/// SIGINT to the main thread; TIMER_OK once created.
static TIMER: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static TIMER_OK: AtomicBool = AtomicBool::new(false);
/// The retry timer is armed: `end` disarms it only then (a system call per closure call saved).
static TIMER_ARMED: AtomicBool = AtomicBool::new(false);
/// The handler ran since the last `end`: SIGINT may still be blocked on this thread (an unwind
/// out of the handler leaves it so), and `end` unblocks it only then.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

const FIXED: usize = 4;
/// Executable ranges of this binary (frames the search must not reach).
static OWN_CODE: [(AtomicUsize, AtomicUsize); FIXED] = [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; FIXED];
/// Executable ranges of libc.
static LIBC_CODE: [(AtomicUsize, AtomicUsize); FIXED] = [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; FIXED];

/// Attempts that found no point to interrupt at, and why (`RPX_INTERRUPT_DEBUG=1` prints them).
static DEBUG: AtomicBool = AtomicBool::new(false);
static REFUSED: AtomicU32 = AtomicU32::new(0);
static REFUSED_ABORT: AtomicU32 = AtomicU32::new(0);
static REFUSED_NO_CATCH: AtomicU32 = AtomicU32::new(0);
static REFUSED_PANICKING: AtomicU32 = AtomicU32::new(0);
static DELIVERED_HOW: AtomicU8 = AtomicU8::new(0);

/// The payload, boxed while no user code runs and taken once per run by the handler (on the
/// main thread, while it runs user code) or by the trampoline, so the two never touch it at once.
struct Slot(UnsafeCell<Option<Box<dyn Any + Send>>>);
// SAFETY: see above; only the main thread (and its signal handler) use the slot.
unsafe impl Sync for Slot {}
static PAYLOAD: Slot = Slot(UnsafeCell::new(None));
static PAYLOAD_READY: AtomicBool = AtomicBool::new(false);

type ResumeUnwind = fn(Box<dyn Any + Send>) -> !;

/// The worker's side of interrupts.
#[derive(Debug, Default)]
pub struct Interrupts {
    installed: bool,
}

/// One loaded object (the executable, a library): its path, load bias and executable ranges.
#[derive(Debug)]
struct Object {
    name: String,
    base: usize,
    exec: Vec<(usize, usize)>,
}

fn loaded_objects() -> Vec<Object> {
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid info; data is the Vec below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<Object>)) };
        let name =
            if info.dlpi_name.is_null() { String::new() } else { unsafe { CStr::from_ptr(info.dlpi_name) }.to_string_lossy().into_owned() };
        let mut exec = Vec::new();
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dlpi_phdr has dlpi_phnum entries.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
                exec.push((start, start + ph.p_memsz as usize));
            }
        }
        out.push(Object { name, base: info.dlpi_addr as usize, exec });
        0
    }
    let mut out: Vec<Object> = Vec::new();
    // SAFETY: the callback only reads the info it is given.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut out as *mut Vec<Object> as *mut c_void) };
    out
}

fn containing(objects: &[Object], addr: usize) -> Option<&Object> {
    objects.iter().find(|o| o.exec.iter().any(|&(s, e)| s <= addr && addr < e))
}

fn store_fixed(slots: &[(AtomicUsize, AtomicUsize); FIXED], ranges: &[(usize, usize)]) {
    for (slot, r) in slots.iter().zip(ranges) {
        slot.0.store(r.0, SeqCst);
        slot.1.store(r.1, SeqCst);
    }
}

fn in_fixed(slots: &[(AtomicUsize, AtomicUsize); FIXED], addr: usize) -> bool {
    slots.iter().any(|(s, e)| s.load(SeqCst) <= addr && addr < e.load(SeqCst))
}

impl Interrupts {
    pub fn new() -> Interrupts {
        Interrupts::default()
    }

    /// Install the SIGINT handler and the retry timer. On failure SIGINT is ignored (and the
    /// reason returned), so an interrupt never kills the worker by itself.
    pub fn install(&mut self) -> Result<(), String> {
        let r = self.try_install();
        if r.is_err() {
            // SAFETY: setting a signal disposition.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        }
        r
    }

    fn try_install(&mut self) -> Result<(), String> {
        // SAFETY: plain system calls and lookups; the handler only reads statics set here.
        unsafe {
            MAIN_TID.store(libc::gettid(), SeqCst);
            let objects = loaded_objects();
            let own = containing(&objects, Interrupts::install as *const () as usize).ok_or("cannot find this binary's code")?;
            store_fixed(&OWN_CODE, &own.exec);
            let nanosleep = libc::dlsym(libc::RTLD_DEFAULT, c"nanosleep".as_ptr()) as usize;
            let libc_obj = containing(&objects, nanosleep).ok_or("cannot find libc's code")?;
            store_fixed(&LIBC_CODE, &libc_obj.exec);

            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = libc::SIGINT;
            ev.sigev_notify_thread_id = libc::gettid();
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer) != 0 {
                return Err(format!("timer_create: {}", std::io::Error::last_os_error()));
            }
            TIMER.store(timer, SeqCst);
            TIMER_OK.store(true, SeqCst);

            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigint as *const () as usize;
            // No SA_RESTART: a blocked system call returns EINTR, which is where unwinding at
            // once is sound. No SA_NODEFER: SIGINT stays blocked in the handler (and after an
            // unwind out of it, until `end`).
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0 {
                return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
            }
        }
        DEBUG.store(std::env::var_os("RPX_INTERRUPT_DEBUG").is_some(), SeqCst);
        self.installed = true;
        Ok(())
    }

    /// A command was read: SIGINT is remembered from now on.
    pub fn busy(&mut self) {
        STATE.store(BUSY, SeqCst);
    }

    /// A cell or closure library was loaded: find the cells' libstd if not found yet.
    pub fn loaded(&mut self) {
        if self.installed && RESUME.load(SeqCst) == 0 {
            if let Some((resume, count)) = find_libstd(&loaded_objects()) {
                PANIC_COUNT.store(count, SeqCst);
                RESUME.store(resume, SeqCst);
            }
        }
    }

    /// User code is about to run.
    pub fn begin(&mut self) {
        if !self.installed {
            return;
        }
        if !PAYLOAD_READY.load(SeqCst) {
            // SAFETY: no user code runs, so neither the handler nor the trampoline use the slot.
            unsafe { *PAYLOAD.0.get() = Some(Box::new(PAYLOAD_TEXT)) };
            PAYLOAD_READY.store(true, SeqCst);
        }
        INTERRUPTED.store(false, SeqCst);
        HIJACKED.store(false, SeqCst);
        STALE_SLOT.store(usize::MAX, SeqCst);
        STATE.store(RUNNING, SeqCst);
        if PENDING.load(SeqCst) {
            // Asked for while the command was being prepared: deliver it now.
            arm_timer(10_000);
        }
    }

    /// User code returned (normally, or through its `catch_unwind` after an interrupt).
    /// Returns whether the interrupt was delivered to it.
    pub fn end(&mut self) -> bool {
        if !self.installed {
            return false;
        }
        // From here on the handler neither arms the timer nor unwinds (the state is not RUNNING),
        // so the two checks below see everything it did.
        STATE.store(BUSY, SeqCst);
        if TIMER_ARMED.load(SeqCst) {
            arm_timer(0);
        }
        HIJACKED.store(false, SeqCst);
        // After an unwind out of the handler SIGINT is still blocked on this thread.
        if SIGNALLED.swap(false, SeqCst) {
            // SAFETY: changing this thread's signal mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
        let delivered = INTERRUPTED.swap(false, SeqCst);
        let refused = REFUSED.swap(0, SeqCst);
        if DEBUG.load(SeqCst) && (refused > 0 || delivered) {
            let how = match DELIVERED_HOW.swap(0, SeqCst) {
                1 => "unwound from a blocked system call",
                2 => "raised at the return of a call",
                _ => "not delivered",
            };
            eprintln!(
                "rpx interrupt: {how}; {refused} attempts refused ({} would abort, {} no catch_unwind reached, {} a panic in progress)",
                REFUSED_ABORT.swap(0, SeqCst),
                REFUSED_NO_CATCH.swap(0, SeqCst),
                REFUSED_PANICKING.swap(0, SeqCst),
            );
        }
        delivered
    }

    /// The command is done: SIGINT is ignored until the next one.
    pub fn idle(&mut self) {
        STATE.store(IDLE, SeqCst);
        PENDING.store(false, SeqCst);
    }
}

/// Arm the retry timer to fire in `ns` nanoseconds (0 disarms it).
fn arm_timer(ns: i64) {
    if !TIMER_OK.load(SeqCst) {
        return;
    }
    TIMER_ARMED.store(ns > 0, SeqCst);
    let t = TIMER.load(SeqCst);
    let its =
        libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: libc::timespec { tv_sec: 0, tv_nsec: ns } };
    // SAFETY: timer_settime is async-signal-safe; `t` is the timer created at install.
    unsafe { libc::timer_settime(t, 0, &its, std::ptr::null_mut()) };
}

extern "C-unwind" fn on_sigint(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    SIGNALLED.store(true, SeqCst);
    // SAFETY: errno is this thread's.
    let errno = unsafe { *libc::__errno_location() };
    if let Some((resume, payload)) = decide(info, ctx) {
        resume(payload);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The handler's decision: `Some` to unwind from the signal frame now, with the function and
/// payload to do it; otherwise it may have replaced a return address, or armed the retry timer.
#[inline(never)]
fn decide(info: *mut libc::siginfo_t, ctx: *mut c_void) -> Option<(ResumeUnwind, Box<dyn Any + Send>)> {
    let main = MAIN_TID.load(SeqCst);
    // SAFETY: gettid and tgkill are async-signal-safe system calls.
    if unsafe { libc::gettid() } != main {
        // A thread a cell started got the process-directed signal: pass it on.
        unsafe { libc::tgkill(libc::getpid(), main, libc::SIGINT) };
        return None;
    }
    if STATE.load(SeqCst) == IDLE {
        return None;
    }
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let from_timer = unsafe { (*info).si_code } == libc::SI_TIMER;
    if !from_timer {
        PENDING.store(true, SeqCst);
    } else if !PENDING.load(SeqCst) {
        return None;
    }
    if STATE.load(SeqCst) != RUNNING || INTERRUPTED.load(SeqCst) {
        // Remembered (`begin` delivers it), or delivered: one per command.
        return None;
    }
    // SAFETY: with SA_SIGINFO the third argument is the interrupted context.
    let (pc, rax) = unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        (uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize, uc.uc_mcontext.gregs[libc::REG_RAX as usize])
    };
    if HIJACKED.load(SeqCst) {
        let trampoline = rpx_engine_interrupt_trampoline as *const () as usize;
        if (trampoline..trampoline + 32).contains(&pc) {
            return None; // the panic is on its way
        }
        let age = HIJACK_AGE.fetch_add(1, SeqCst) + 1;
        if age < HIJACK_PATIENCE {
            rearm(age);
            return None;
        }
        // The callee has not returned: put its return address back and choose a deeper frame.
        let slot = HIJACK_SLOT.load(SeqCst);
        // SAFETY: the callee has not returned (the trampoline did not run), so its frame and
        // the slot are live and hold the trampoline's address.
        unsafe {
            if *(slot as *const usize) == trampoline {
                *(slot as *mut usize) = HIJACK_RET.load(SeqCst);
            }
        }
        HIJACKED.store(false, SeqCst);
        STALE_SLOT.store(slot, SeqCst);
    }
    let resume = RESUME.load(SeqCst);
    if resume == 0 || !PAYLOAD_READY.load(SeqCst) {
        return None; // cannot raise a panic the cells catch; the engine's grace period applies
    }
    if panicking() {
        REFUSED_PANICKING.fetch_add(1, SeqCst);
        return retry();
    }
    match plan(pc, blocked_in_syscall(pc, rax)) {
        Plan::Unwind => {
            PAYLOAD_READY.store(false, SeqCst);
            // SAFETY: READY was set, so the main thread filled the slot and does not touch it now.
            let payload = unsafe { (*PAYLOAD.0.get()).take() }?;
            PENDING.store(false, SeqCst);
            INTERRUPTED.store(true, SeqCst);
            DELIVERED_HOW.store(1, SeqCst);
            // SAFETY: RESUME is the address of libstd's `std::panic::resume_unwind`.
            let f: ResumeUnwind = unsafe { std::mem::transmute::<usize, ResumeUnwind>(resume) };
            Some((f, payload))
        }
        Plan::Hijack { slot, ret } => {
            HIJACK_RET.store(ret, SeqCst);
            HIJACK_SLOT.store(slot, SeqCst);
            HIJACK_AGE.store(0, SeqCst);
            HIJACKED.store(true, SeqCst);
            // SAFETY: `slot` is the return address slot of a frame of this thread's stack; it
            // held `ret` (checked by `plan`).
            unsafe { *(slot as *mut usize) = rpx_engine_interrupt_trampoline as *const () as usize };
            // Check on it soon: a callee that does not return soon is replaced by a deeper one.
            rearm(0);
            None
        }
        Plan::NotHere => retry(),
    }
}

/// Arm the timer for the next attempt in 1-2 ms (varying with `n`, so that a periodic loop is
/// not sampled at the same place).
fn rearm(n: u32) {
    arm_timer(1_000_000 + (n.wrapping_mul(7919) % 1000) as i64 * 1000);
}

/// No point to interrupt at: try again soon.
fn retry() -> Option<(ResumeUnwind, Box<dyn Any + Send>)> {
    let n = REFUSED.fetch_add(1, SeqCst);
    if DEBUG.load(SeqCst) && n % 256 == 255 {
        let counts = [
            n as usize + 1,
            REFUSED_ABORT.load(SeqCst) as usize,
            REFUSED_NO_CATCH.load(SeqCst) as usize,
            REFUSED_PANICKING.load(SeqCst) as usize,
        ];
        debug_write(b"rpx interrupt: refused (total, would abort, no catch_unwind, panicking):", &counts);
    }
    rearm(n);
    None
}

/// Write `head` and decimal numbers on stderr with write(2) only (usable in the handler).
fn debug_write(head: &[u8], values: &[usize]) {
    let mut buf = [0u8; 256];
    let mut n = head.len().min(160);
    buf[..n].copy_from_slice(&head[..n]);
    for &v in values {
        buf[n] = b' ';
        n += 1;
        let mut digits = [0u8; 20];
        let (mut k, mut x) = (0, v);
        loop {
            digits[k] = b'0' + (x % 10) as u8;
            k += 1;
            x /= 10;
            if x == 0 {
                break;
            }
        }
        while k > 0 {
            k -= 1;
            buf[n] = digits[k];
            n += 1;
        }
    }
    buf[n] = b'\n';
    // SAFETY: write(2) is async-signal-safe; buf is valid for n + 1 bytes.
    unsafe { libc::write(2, buf.as_ptr() as *const c_void, n + 1) };
}

/// Whether a panic is in progress on any thread (libstd's global panic count).
fn panicking() -> bool {
    let p = PANIC_COUNT.load(SeqCst);
    if p == 0 {
        return true; // unknown: do not risk it
    }
    // SAFETY: `p` is the address of libstd's `GLOBAL_PANIC_COUNT`, an AtomicUsize.
    let count = unsafe { (*(p as *const AtomicUsize)).load(SeqCst) };
    count & !(1usize << (usize::BITS - 1)) != 0
}

/// System calls a libc wrapper may be blocked in and be unwound from (x86_64 numbers): blocking
/// calls that are thread-cancellation points. Futex waits are not among them.
const UNWINDABLE_SYSCALLS: &[u32] = &[
    0,   // read
    1,   // write
    7,   // poll
    17,  // pread64
    18,  // pwrite64
    19,  // readv
    20,  // writev
    23,  // select
    34,  // pause
    35,  // nanosleep
    42,  // connect
    43,  // accept
    44,  // sendto
    45,  // recvfrom
    46,  // sendmsg
    47,  // recvmsg
    61,  // wait4
    69,  // msgsnd
    70,  // msgrcv
    72,  // fcntl (F_SETLKW)
    73,  // flock
    128, // rt_sigtimedwait
    130, // rt_sigsuspend
    230, // clock_nanosleep
    232, // epoll_wait
    247, // waitid
    257, // openat (a FIFO)
    270, // pselect6
    271, // ppoll
    281, // epoll_pwait
    288, // accept4
    299, // recvmmsg
    307, // sendmmsg
    441, // epoll_pwait2
];

/// Whether the interrupted instruction follows a `syscall` in libc that returned `-EINTR`, and
/// that call (`mov $nr, %eax` or `xor %eax, %eax` right before it) is one of
/// [`UNWINDABLE_SYSCALLS`].
fn blocked_in_syscall(pc: usize, rax: i64) -> bool {
    if rax != -(libc::EINTR as i64) || !in_fixed(&LIBC_CODE, pc.wrapping_sub(7)) || !in_fixed(&LIBC_CODE, pc) {
        return false;
    }
    // SAFETY: pc - 7 .. pc is inside libc's mapped code.
    let b = unsafe { std::slice::from_raw_parts((pc - 7) as *const u8, 7) };
    if b[5..7] != [0x0f, 0x05] {
        return false;
    }
    let nr = if b[0] == 0xb8 {
        u32::from_le_bytes([b[1], b[2], b[3], b[4]])
    } else if b[3..5] == [0x31, 0xc0] {
        0
    } else {
        return false;
    };
    UNWINDABLE_SYSCALLS.contains(&nr)
}

// ----- the trampoline -----

// When the callee whose return address was replaced returns, it lands here with the stack as
// right after its return: mark the interrupt delivered (so the handler leaves it alone), push the
// real return address back and jump to `raise_interrupt`, which then looks called from the call
// site the compiler prepared for an unwind.
std::arch::global_asm!(
    ".pushsection .text.rpx_engine_interrupt_trampoline,\"ax\",@progbits",
    ".globl rpx_engine_interrupt_trampoline",
    ".hidden rpx_engine_interrupt_trampoline",
    ".p2align 4",
    "rpx_engine_interrupt_trampoline:",
    "mov byte ptr [rip + {interrupted}], 1",
    "mov byte ptr [rip + {hijacked}], 0",
    "push qword ptr [rip + {ret}]",
    "jmp {raise}",
    ".popsection",
    interrupted = sym INTERRUPTED,
    hijacked = sym HIJACKED,
    ret = sym HIJACK_RET,
    raise = sym raise_interrupt,
);

extern "C" {
    fn rpx_engine_interrupt_trampoline();
}

extern "C-unwind" fn raise_interrupt() -> ! {
    let resume = RESUME.load(SeqCst);
    PAYLOAD_READY.store(false, SeqCst);
    // SAFETY: the handler checked READY before replacing the return address; nothing else takes
    // the payload while HIJACKED is set.
    let payload = unsafe { (*PAYLOAD.0.get()).take() };
    let Some(payload) = payload.filter(|_| resume != 0) else { std::process::abort() };
    PENDING.store(false, SeqCst);
    DELIVERED_HOW.store(2, SeqCst);
    // SAFETY: RESUME is the address of libstd's `std::panic::resume_unwind`.
    let f: ResumeUnwind = unsafe { std::mem::transmute::<usize, ResumeUnwind>(resume) };
    f(payload)
}
