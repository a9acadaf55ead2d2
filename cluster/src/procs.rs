//! Processes: spawning cluster members in their own session, finding programs on `PATH`,
//! inspecting processes through `/proc` (alive, program, instance tag), signalling whole
//! process groups, running and waiting for helper commands within a time bound, and reading
//! log tails.
//!
//! Every member runs in its own session (`setsid`), so the terminal's Ctrl-C reaches only
//! `ipcluster`, and so its process group (pgid = its pid) also holds the workers and relays it
//! starts. Every member also carries `RPX_CLUSTER_INSTANCE=<uuid>` in its environment, which
//! its children inherit; `stop` uses both to leave no orphan behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::state::INSTANCE_ENV;

/// The sibling binary `name` of the running `ipcluster`.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the ipcluster executable")?;
    let dir = exe.parent().context("ipcluster has no parent directory")?;
    let p = dir.join(name);
    if !p.is_file() {
        anyhow::bail!(
            "{name} not found next to ipcluster (looked for {}); build the whole workspace with `cargo build --release --workspace`",
            p.display()
        );
    }
    Ok(p)
}

/// Start `bin args...` in a new session with stdin closed and stdout+stderr written to `log`,
/// tagged with the cluster instance, with extra environment variables `env`.
pub fn spawn(bin: &Path, args: &[String], log: &Path, instance: &str, env: &[(&str, String)]) -> anyhow::Result<Child> {
    spawn_with(bin, args, log, instance, env, Stdio::null())
}

/// [`spawn`], appending to `log` instead of truncating it (a restarted member keeps its
/// predecessor's log).
pub fn spawn_appending(bin: &Path, args: &[String], log: &Path, instance: &str, env: &[(&str, String)]) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    spawn_logged(bin, args, out, instance, env, Stdio::null())
}

/// Append one line to a log file (best effort: a log that cannot be written is no reason to
/// fail).
pub fn append_line(log: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

/// [`spawn`] with a given stdin (the ssh launcher hands ssh a pipe that never ends).
pub fn spawn_with(bin: &Path, args: &[String], log: &Path, instance: &str, env: &[(&str, String)], stdin: Stdio) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    spawn_logged(bin, args, out, instance, env, stdin)
}

/// Start `bin` in a new session with stdout and stderr to the open log `out`.
fn spawn_logged(bin: &Path, args: &[String], out: File, instance: &str, env: &[(&str, String)], stdin: Stdio) -> anyhow::Result<Child> {
    let err = out.try_clone().context("cannot duplicate the log file descriptor")?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(stdin).stdout(out).stderr(err).env(INSTANCE_ENV, instance);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))
}

/// The program `cmd` names: a path (with a `/`; made absolute) if it is an executable file,
/// else the first executable `cmd` on `PATH`.
pub fn find_program(cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if cmd.is_empty() {
        return None;
    }
    if cmd.contains('/') {
        let p = std::path::absolute(cmd).ok()?;
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| executable(p))
}

/// Run `cmd` (stdin closed) for at most `limit`; its stdout and stderr together, and its exit
/// status (`None` if it had to be killed).
pub fn output_bounded(cmd: &mut Command, limit: Duration) -> std::io::Result<(Option<std::process::ExitStatus>, String)> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let readers: Vec<_> = [
        child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
        child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    })
    .collect();
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text =
        readers.into_iter().filter_map(|h| h.join().ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).collect::<Vec<_>>().join("");
    Ok((status, text))
}

/// Wait for all `children` for at most `limit`; SIGKILL and reap the ones still running.
pub fn wait_all(children: &mut [Child], limit: Duration) {
    wait_until(limit, || children.iter_mut().all(|c| !matches!(c.try_wait(), Ok(None))));
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub pgid: i32,
}

/// Parse `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub fn parse_stat(s: &str) -> Option<Stat> {
    let close = s.rfind(')')?;
    let mut it = s[close + 1..].split_whitespace();
    let state = it.next()?.chars().next()?;
    let _ppid = it.next()?;
    let pgid = it.next()?.parse().ok()?;
    Some(Stat { state, pgid })
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A live process: exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    pid > 0 && matches!(stat(pid), Some(s) if s.state != 'Z' && s.state != 'X')
}

/// The program name of `argv[0]` of `pid`.
pub fn program(pid: u32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmd.split(|b| *b == 0).next()?;
    let name = Path::new(std::str::from_utf8(argv0).ok()?).file_name()?.to_string_lossy().into_owned();
    Some(name)
}

/// `pid` is alive and runs the program `name` (guards against reused pids).
pub fn is_proc(pid: u32, name: &str) -> bool {
    alive(pid) && program(pid).as_deref() == Some(name)
}

fn all_pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// Does `pid` carry `RPX_CLUSTER_INSTANCE=<instance>` in its environment?
fn has_tag(pid: u32, tag: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).map(|env| env.split(|b| *b == 0).any(|kv| kv == tag)).unwrap_or(false)
}

/// `pid` is a live process of the cluster `instance` (it carries the instance tag, so a reused
/// pid does not count, whatever program it runs).
pub fn is_member(pid: u32, instance: &str) -> bool {
    !instance.is_empty() && alive(pid) && has_tag(pid, format!("{INSTANCE_ENV}={instance}").as_bytes())
}

/// Live processes whose process group is one of `pgids` or whose environment carries the
/// cluster instance tag, except this process.
pub fn members(pgids: &[u32], instance: &str) -> Vec<u32> {
    let me = std::process::id();
    let tag = format!("{INSTANCE_ENV}={instance}");
    let mut out = Vec::new();
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        let Some(st) = stat(pid) else { continue };
        if st.state == 'Z' || st.state == 'X' {
            continue;
        }
        let in_group = st.pgid > 0 && pgids.contains(&(st.pgid as u32));
        if in_group || (!instance.is_empty() && has_tag(pid, tag.as_bytes())) {
            out.push(pid);
        }
    }
    out
}

/// Send `sig` to the process group `pgid` (ignoring "no such group").
pub fn signal_group(pgid: u32, sig: i32) {
    if pgid > 1 {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(-(pgid as i32), sig);
        }
    }
}

/// Send `sig` to one process.
pub fn signal(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

/// Poll `done` every 20 ms until it is true or `limit` passes; returns whether it became true.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else { return format!("(no log at {})", path.display()) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    if all.is_empty() {
        return "(log is empty)".into();
    }
    all[from..].join("\n")
}

static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Catch SIGINT, SIGTERM and SIGHUP into a flag (see [`stop_signal`]) so ipcluster can stop
/// what it started instead of dying and leaving it behind.
pub fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The name of the stop signal received, if any.
pub fn stop_signal() -> Option<&'static str> {
    match STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => Some("a signal"),
    }
}

/// A log tail as an indented block under a title, for error messages.
pub fn tail_block(title: &str, path: &Path) -> String {
    tail_block_n(title, path, 40)
}

/// [`tail_block`] with the last `lines` lines.
pub fn tail_block_n(title: &str, path: &Path, lines: usize) -> String {
    let body: String = tail(path, lines).lines().map(|l| format!("    {l}\n")).collect();
    format!("--- {title} ({}):\n{body}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_names() {
        let s = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(s), Some(Stat { state: 'S', pgid: 1234 }));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_named() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(program(me).is_some());
        assert!(!alive(0));
        assert!(!is_proc(me, "certainly-not-this-program"));
    }

    #[test]
    fn spawned_member_has_its_own_group_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let tag = uuid::Uuid::new_v4().to_string();
        let mut child = spawn(Path::new("/bin/sh"), &["-c".into(), "echo hello; sleep 30 & wait".into()], &log, &tag, &[]).unwrap();
        let pid = child.id();
        assert!(wait_until(Duration::from_secs(5), || members(&[], &tag).len() == 2), "sh and its sleep carry the tag");
        assert_eq!(stat(pid).unwrap().pgid as u32, pid, "own process group");
        assert_eq!(members(&[pid], "").len(), 2, "sleep is in the group");
        signal_group(pid, libc::SIGKILL);
        let _ = child.wait();
        assert!(wait_until(Duration::from_secs(5), || members(&[pid], &tag).is_empty()));
        assert!(tail(&log, 5).contains("hello"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        std::fs::write(&p, (0..100).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        assert_eq!(tail(&p, 2), "line 98\nline 99");
        assert!(tail(&dir.path().join("missing"), 2).contains("no log"));
    }

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert_eq!(find_program("sh").map(|p| p.is_absolute()), Some(true));
        assert_eq!(find_program("/bin/sh"), Some(PathBuf::from("/bin/sh")));
        assert_eq!(find_program("/etc/passwd"), None, "not executable");
        assert_eq!(find_program("certainly-not-a-program-here"), None);
        assert_eq!(find_program(""), None);
    }

    #[test]
    fn bounded_output_and_waits() {
        let (status, out) = output_bounded(Command::new("/bin/sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(5)).unwrap();
        assert!(status.unwrap().success());
        assert!(out.contains("out") && out.contains("err"), "{out}");
        let (status, _) = output_bounded(Command::new("/bin/sh").args(["-c", "exec sleep 30"]), Duration::from_millis(200)).unwrap();
        assert!(status.is_none(), "killed at the limit, with no exit status");
        let mut kids = vec![Command::new("sleep").arg("30").spawn().unwrap(), Command::new("true").spawn().unwrap()];
        wait_all(&mut kids, Duration::from_millis(200));
        assert!(kids.iter_mut().all(|c| c.try_wait().unwrap().is_some()), "all reaped");
    }

    #[test]
    fn members_are_known_by_their_tag() {
        let dir = tempfile::tempdir().unwrap();
        let tag = uuid::Uuid::new_v4().to_string();
        let mut child = spawn(Path::new("sleep"), &["30".into()], &dir.path().join("s.log"), &tag, &[]).unwrap();
        assert!(is_member(child.id(), &tag));
        assert!(!is_member(child.id(), "other"));
        assert!(!is_member(child.id(), ""));
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        assert!(!is_member(child.id(), &tag));
    }
}
