//! The unwinder's search phase, run dry from the interrupted instruction: whether a panic raised
//! there (or at a call site further out) would reach a `catch_unwind`, reading each frame's
//! call-site table as Rust's personality routine does.

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering::SeqCst;

use super::{in_fixed, OWN_CODE, REFUSED_ABORT, REFUSED_NO_CATCH, STALE_SLOT};

#[allow(non_camel_case_types)]
type _Unwind_Context = c_void;

#[link(name = "gcc_s")]
extern "C" {
    fn _Unwind_Backtrace(trace: extern "C" fn(*mut _Unwind_Context, *mut c_void) -> c_int, arg: *mut c_void) -> c_int;
    fn _Unwind_GetIPInfo(ctx: *mut _Unwind_Context, ip_before_insn: *mut c_int) -> usize;
    fn _Unwind_GetCFA(ctx: *mut _Unwind_Context) -> usize;
    fn _Unwind_GetLanguageSpecificData(ctx: *mut _Unwind_Context) -> *const u8;
    fn _Unwind_GetRegionStart(ctx: *mut _Unwind_Context) -> usize;
}

const URC_NO_REASON: c_int = 0;
const URC_STOP: c_int = 5;
const MAX_FRAMES: u32 = 512;

/// Where (and whether) to raise the panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Unwind from the signal frame now.
    Unwind,
    /// Replace the return address at `slot` (which holds `ret`) with the trampoline.
    Hijack {
        slot: usize,
        ret: usize,
    },
    NotHere,
}

struct Walk {
    pc: usize,
    /// Unwinding from the signal frame is allowed (blocked in a system call).
    blocked: bool,
    seen: bool,
    frames: u32,
    /// Every frame so far lets a panic raised in the signal frame through.
    direct: bool,
    /// The innermost return address so far that is a call site with a landing pad, and the
    /// frames since let a panic through.
    hijack: Option<(usize, usize)>,
    plan: Plan,
}

/// Walk the stack from the interrupted instruction the way the unwinder's search phase would.
pub(super) fn plan(pc: usize, blocked: bool) -> Plan {
    let mut w = Walk { pc, blocked, seen: false, frames: 0, direct: blocked, hijack: None, plan: Plan::NotHere };
    // SAFETY: the callback only reads the unwinder's context.
    unsafe { _Unwind_Backtrace(step, &mut w as *mut Walk as *mut c_void) };
    if w.plan == Plan::NotHere {
        REFUSED_NO_CATCH.fetch_add(1, SeqCst);
    }
    w.plan
}

extern "C" fn step(ctx: *mut _Unwind_Context, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the Walk passed by `plan`; ctx is the unwinder's, valid in the callback.
    let w = unsafe { &mut *(arg as *mut Walk) };
    w.frames += 1;
    if w.frames > MAX_FRAMES {
        return URC_STOP;
    }
    let mut before: c_int = 0;
    let ip = unsafe { _Unwind_GetIPInfo(ctx, &mut before) };
    // The CFA of the frame inside this one (the callee), see below.
    let cfa = unsafe { _Unwind_GetCFA(ctx) };
    let first = !w.seen;
    if first {
        // The handler's own frames and the signal trampoline come first.
        if ip != w.pc || before == 0 {
            return URC_NO_REASON;
        }
        w.seen = true;
    } else if before != 0 {
        return URC_STOP; // another signal frame: do not reason across it
    }
    if in_fixed(&OWN_CODE, ip) {
        return URC_STOP; // no catch_unwind in cell code around the interrupted code
    }
    let (lsda, start) = unsafe { (_Unwind_GetLanguageSpecificData(ctx), _Unwind_GetRegionStart(ctx)) };
    let action = if lsda.is_null() {
        Action::Pass
    } else {
        let lookup = if before != 0 { ip } else { ip.wrapping_sub(1) };
        // SAFETY: the unwinder's LSDA pointer is a valid call-site table.
        match unsafe { find_action(lsda, start, lookup) } {
            Some(a) => a,
            None => Action::Abort,
        }
    };
    if first {
        // The interrupted frame: only matters for unwinding from the signal frame.
        match action {
            Action::Abort => w.direct = false,
            Action::Catch if w.blocked => {
                w.plan = Plan::Unwind;
                return URC_STOP;
            }
            _ => {}
        }
        return URC_NO_REASON;
    }
    if action == Action::Abort {
        REFUSED_ABORT.fetch_add(1, SeqCst);
        w.direct = false;
        w.hijack = None;
        return URC_NO_REASON;
    }
    if w.hijack.is_none() && matches!(action, Action::Cleanup | Action::Catch) && cfa >= 8 {
        // A call site with a landing pad. libgcc's context for a caller holds the CFA of the
        // frame just unwound (the callee): its return address is just below.
        let slot = cfa - 8;
        // SAFETY: the slot is in this thread's stack, in the callee's frame.
        if slot < STALE_SLOT.load(SeqCst) && unsafe { *(slot as *const usize) } == ip {
            w.hijack = Some((slot, ip));
        }
    }
    if action == Action::Catch {
        w.plan = if w.direct {
            Plan::Unwind
        } else if let Some((slot, ret)) = w.hijack {
            Plan::Hijack { slot, ret }
        } else {
            Plan::NotHere
        };
        return URC_STOP;
    }
    URC_NO_REASON
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// No landing pad for this instruction (or no table): a panic passes on to the caller.
    Pass,
    /// A cleanup landing pad (drops), after which the panic goes on.
    Cleanup,
    /// A `catch_unwind`.
    Catch,
    /// Unwinding would abort here (the instruction is not covered by the call-site table, or an
    /// exception filter).
    Abort,
}

struct Reader {
    p: *const u8,
}

impl Reader {
    unsafe fn u8(&mut self) -> u8 {
        let v = unsafe { *self.p };
        self.p = unsafe { self.p.add(1) };
        v
    }
    unsafe fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for x in &mut b {
            *x = unsafe { self.u8() };
        }
        b
    }
    unsafe fn uleb(&mut self) -> u64 {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = unsafe { self.u8() };
            if shift < 64 {
                v |= ((b & 0x7f) as u64) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                return v;
            }
        }
    }
    unsafe fn sleb(&mut self) -> i64 {
        let (mut v, mut shift) = (0i64, 0u32);
        loop {
            let b = unsafe { self.u8() };
            if shift < 64 {
                v |= ((b & 0x7f) as i64) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return v;
            }
        }
    }
    /// A value in DWARF EH encoding `enc` (its low nibble; offsets and plain values only).
    unsafe fn encoded(&mut self, enc: u8) -> Option<u64> {
        Some(match enc & 0x0f {
            0x00 => u64::from_le_bytes(unsafe { self.fixed::<8>() }),
            0x01 => unsafe { self.uleb() },
            0x02 => u16::from_le_bytes(unsafe { self.fixed::<2>() }) as u64,
            0x03 => u32::from_le_bytes(unsafe { self.fixed::<4>() }) as u64,
            0x04 => u64::from_le_bytes(unsafe { self.fixed::<8>() }),
            0x09 => (unsafe { self.sleb() }) as u64,
            0x0a => i16::from_le_bytes(unsafe { self.fixed::<2>() }) as i64 as u64,
            0x0b => i32::from_le_bytes(unsafe { self.fixed::<4>() }) as i64 as u64,
            0x0c => i64::from_le_bytes(unsafe { self.fixed::<8>() }) as u64,
            _ => return None,
        })
    }
}

const DW_EH_PE_OMIT: u8 = 0xff;

/// What the personality routine's search phase does at `ip` in the function starting at
/// `func_start`, from its LSDA (the gcc_except_table format, as read by Rust's
/// `find_eh_action`). `None` when the table uses an encoding this reader does not know.
unsafe fn find_action(lsda: *const u8, func_start: usize, ip: usize) -> Option<Action> {
    let mut r = Reader { p: lsda };
    unsafe {
        let lpstart_enc = r.u8();
        if lpstart_enc != DW_EH_PE_OMIT {
            // Only its size matters here; indirect or aligned encodings are not expected.
            if lpstart_enc & 0x70 > 0x30 || lpstart_enc & 0x80 != 0 {
                return None;
            }
            r.encoded(lpstart_enc)?;
        }
        let ttype_enc = r.u8();
        if ttype_enc != DW_EH_PE_OMIT {
            r.uleb();
        }
        let cs_enc = r.u8();
        let cs_len = r.uleb() as usize;
        let action_table = r.p.add(cs_len);
        while r.p < action_table {
            let cs_start = r.encoded(cs_enc)? as usize;
            let cs_size = r.encoded(cs_enc)? as usize;
            let cs_lpad = r.encoded(cs_enc)?;
            let cs_action = r.uleb();
            if ip < func_start.wrapping_add(cs_start) {
                break;
            }
            if ip < func_start.wrapping_add(cs_start + cs_size) {
                if cs_lpad == 0 {
                    return Some(Action::Pass);
                }
                if cs_action == 0 {
                    return Some(Action::Cleanup);
                }
                let mut a = Reader { p: action_table.add(cs_action as usize - 1) };
                let ttype_index = a.sleb();
                return Some(match ttype_index {
                    0 => Action::Cleanup,
                    i if i > 0 => Action::Catch,
                    _ => Action::Abort,
                });
            }
        }
        Some(Action::Abort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_site_tables() {
        // lpstart omit, ttype udata4 (offset 0), call sites uleb128:
        // [0x10, +0x08) no landing pad; [0x20, +0x10) lpad 0x40 action 1 (catch);
        // [0x30, +0x04) lpad 0x50 action 0 (cleanup). Action table: ttype 1, next 0.
        let lsda: Vec<u8> =
            vec![0xff, 0x03, 0x00, 0x01, 12, 0x10, 0x08, 0x00, 0x00, 0x20, 0x10, 0x40, 0x01, 0x30, 0x04, 0x50, 0x00, 0x01, 0x00];
        let f = 0x1000usize;
        let at = |ip: usize| unsafe { find_action(lsda.as_ptr(), f, f + ip) };
        assert_eq!(at(0x12), Some(Action::Pass));
        assert_eq!(at(0x25), Some(Action::Catch));
        assert_eq!(at(0x31), Some(Action::Cleanup));
        assert_eq!(at(0x05), Some(Action::Abort));
        assert_eq!(at(0x19), Some(Action::Abort));
        assert_eq!(at(0x40), Some(Action::Abort));
    }
}
