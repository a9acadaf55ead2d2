//! The one signal table: the names rpx accepts and shows for signal numbers, shared by the engine
//! (`signal_request`), the magics (`--signal-on-interrupt`) and ipcluster (how a process ended).

/// Every signal name rpx knows, with this platform's number, in number order.
pub const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGINT", libc::SIGINT),
    ("SIGQUIT", libc::SIGQUIT),
    ("SIGILL", libc::SIGILL),
    ("SIGTRAP", libc::SIGTRAP),
    ("SIGABRT", libc::SIGABRT),
    ("SIGBUS", libc::SIGBUS),
    ("SIGFPE", libc::SIGFPE),
    ("SIGKILL", libc::SIGKILL),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGSEGV", libc::SIGSEGV),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGPIPE", libc::SIGPIPE),
    ("SIGALRM", libc::SIGALRM),
    ("SIGTERM", libc::SIGTERM),
    ("SIGCHLD", libc::SIGCHLD),
    ("SIGCONT", libc::SIGCONT),
    ("SIGSTOP", libc::SIGSTOP),
    ("SIGTSTP", libc::SIGTSTP),
    ("SIGTTIN", libc::SIGTTIN),
    ("SIGTTOU", libc::SIGTTOU),
    ("SIGURG", libc::SIGURG),
    ("SIGXCPU", libc::SIGXCPU),
    ("SIGXFSZ", libc::SIGXFSZ),
    ("SIGVTALRM", libc::SIGVTALRM),
    ("SIGPROF", libc::SIGPROF),
    ("SIGWINCH", libc::SIGWINCH),
    ("SIGIO", libc::SIGIO),
    ("SIGSYS", libc::SIGSYS),
];

/// Largest signal number a request may name (Linux's real-time signals end at 64).
pub const MAX_SIGNAL: i32 = 64;

/// The name of a signal number, e.g. `SIGABRT` for 6.
pub fn name(sig: i32) -> Option<&'static str> {
    SIGNALS.iter().find(|(_, n)| *n == sig).map(|(name, _)| *name)
}

/// The canonical name (`SIGINT`) of a name given with or without `SIG`, in any case
/// (`int`, `SigInt`, ` SIGINT `), with its number; `None` for a name not in [`SIGNALS`].
pub fn lookup(text: &str) -> Option<(&'static str, i32)> {
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    SIGNALS.iter().find(|(n, _)| *n == full).copied()
}

/// `9 (SIGKILL)`, or the bare number for a signal without a name here.
pub fn describe(sig: i32) -> String {
    match name(sig) {
        Some(n) => format!("{sig} ({n})"),
        None => sig.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (n, sig) in SIGNALS {
            assert_eq!(name(*sig), Some(*n));
            assert_eq!(lookup(n), Some((*n, *sig)));
        }
        assert_eq!(lookup("int"), Some(("SIGINT", libc::SIGINT)));
        assert_eq!(lookup(" sigterm "), Some(("SIGTERM", libc::SIGTERM)));
        assert_eq!(lookup("SIGNOPE"), None);
        assert_eq!(lookup(""), None);
        assert_eq!(describe(9), "9 (SIGKILL)");
        assert_eq!(describe(40), "40");
    }
}
