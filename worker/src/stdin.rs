//! Telling whether a worker's main thread is blocked reading its stdin in a cell (`std::io::stdin()`
//! without an input request), from `/proc/<pid>/syscall`.

/// The buffer address of a `read(0, buf, len)` that a line of `/proc/<pid>/syscall` shows the
/// thread blocked in (the syscall number in decimal, then the arguments in hex); `None` for
/// any other state. The worker's own command reads use one buffer; a cell's read of stdin
/// (through its own copy of std) another, which tells them apart.
pub fn stdin_read_buffer(syscall_line: &str) -> Option<&str> {
    let mut parts = syscall_line.split_whitespace();
    if parts.next().and_then(|n| n.parse::<i64>().ok()) != Some(libc::SYS_read) || parts.next() != Some("0x0") {
        return None;
    }
    parts.next()
}

/// The buffer of the `read(0, ..)` process `pid`'s main thread is blocked in, if it is (`None`
/// too when it cannot be told).
pub fn reading_stdin(pid: i32) -> Option<String> {
    if pid <= 0 {
        return None;
    }
    let line = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    stdin_read_buffer(&line).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_of_fd_0_is_told_from_other_syscalls() {
        let read = libc::SYS_read;
        assert_eq!(stdin_read_buffer(&format!("{read} 0x0 0x5581a0 0x2000 0x0 0x0 0x0 0x7ffc 0x7f12\n")), Some("0x5581a0"));
        assert_eq!(stdin_read_buffer(&format!("{read} 0x3 0x5581a0 0x2000 0x0 0x0 0x0 0x7ffc 0x7f12")), None, "another fd");
        assert_eq!(stdin_read_buffer("running"), None);
        assert_eq!(stdin_read_buffer(&format!("{} 0x0 0x1", read + 1)), None);
    }
}
