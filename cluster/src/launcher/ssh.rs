//! `--engines ssh --hosts h1:2,h2:3` (or `--hostfile F`): ONE ssh connection per host, tied
//! to the life of that host's engines, as HyperQueue's `deploy-ssh` does.
//!
//! ipcluster spawns `ssh [--ssh-args] -o BatchMode=yes HOST -- sh -c '<script>'` as a member
//! (own session, instance tag), with stdout and stderr going to a log file on this host,
//! `log/ipengine[-cid]-ssh-<host>-<first index>.log`, so the remote engines' output (each line
//! prefixed `[engine <i>] `) is readable here. The script ([`remote_script`]) holds no secret:
//! it reads ONE line from stdin, the connection info with the key, exports it as
//! `RPX_CONNECTION_INFO`, starts the host's engines in the background (each with
//! `RPX_ENGINE_INDEX` and `RPX_CLUSTER_INSTANCE`), prints `rpx-ssh-started <pid>...` (recorded
//! in the cluster file), then waits for stdin to end and ends the engines (TERM, up to ~3 s,
//! KILL).
//!
//! ssh's stdin ([`stdin_with_line`]) is a pipe holding that line, re-opened read-write through
//! `/proc/self/fd`: ssh itself holds a writer, so the remote side sees EOF exactly when the ssh
//! connection ends (ssh killed here, or the network gone), even after `ipcluster start
//! --daemonize` has exited.
//!
//! Stop: per host `ssh HOST -- sh -c '<kill the recorded pids: TERM, ~3 s, KILL>'`
//! ([`stop_script`]), all hosts at once and bounded in time, then SIGTERM to the local ssh
//! groups (and the usual KILL sweep), so nothing of the cluster is left on any host.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hosts::{self, HostSpec, Placement};
use super::{start_each, term_leaders, LaunchCtx, LaunchStatus, Launcher, Record, Spawned};
use crate::procs;
use crate::state::{self, ClusterState, INSTANCE_ENV};
use rpx_protocol::connection::{ConnectionInfo, CONNECTION_INFO_ENV};

/// The line the remote script prints once its engines run: `rpx-ssh-started <pid> <pid>...`.
pub const STARTED: &str = "rpx-ssh-started";

/// How long `stop` gives the remote kills of all hosts together.
const STOP_LIMIT: Duration = Duration::from_secs(12);

/// Shell functions shared by the start and the stop scripts:
/// - `rpx_ours PID`: the process still carries this cluster's instance tag (so it has not
///   exited, and is not a reused pid); where there is no `/proc`, merely alive;
/// - `rpx_end PID...`: TERM them, wait up to ~3 s while any is alive, KILL what is left.
fn shell_functions(instance: &str) -> Vec<String> {
    vec![
        format!("rpx_tag={INSTANCE_ENV}={instance}"),
        r#"rpx_ours() { if [ -r /proc/self/environ ]; then tr "\0" "\n" 2>/dev/null <"/proc/$1/environ" | grep -qxF "$rpx_tag"; else kill -0 "$1" 2>/dev/null; fi; }"#.into(),
        r#"rpx_end() { set -- $(for p in "$@"; do rpx_ours "$p" && echo "$p"; done); [ $# -gt 0 ] || return 0; kill -TERM "$@" 2>/dev/null; t=0; while [ $t -lt 30 ]; do a=; for p in "$@"; do rpx_ours "$p" && a=1; done; [ -n "$a" ] || return 0; if sleep 0.1 2>/dev/null; then t=$((t+1)); else sleep 1; t=$((t+10)); fi; done; for p in "$@"; do rpx_ours "$p" && kill -KILL "$p" 2>/dev/null; done; return 0; }"#.into(),
    ]
}

/// The script ssh runs on a host to start the engines with start indices `indices`
/// (`engine_cmd`: the ipengine command there). One line (login shells such as csh do not take
/// newlines inside quotes), no single quotes (unless `engine_cmd` has some), no secrets.
pub fn remote_script(instance: &str, engine_cmd: &[String], indices: Range<usize>) -> String {
    let prog = shell_words::quote(engine_cmd.first().map(String::as_str).unwrap_or("ipengine")).into_owned();
    let cmd = shell_words::join(engine_cmd);
    let mut lines = vec![
        format!(r#"IFS= read -r {CONNECTION_INFO_ENV} || {{ echo "rpx-ssh: no connection info on stdin" >&2; exit 3; }}"#),
        format!("export {CONNECTION_INFO_ENV}"),
        format!("{INSTANCE_ENV}={instance}"),
        format!("export {INSTANCE_ENV}"),
    ];
    lines.extend(shell_functions(instance));
    lines.extend([
        format!("rpx_prog={prog}"),
        r#"case $rpx_prog in */*) [ -x "$rpx_prog" ] ;; *) command -v "$rpx_prog" >/dev/null 2>&1 ;; esac || { echo "rpx-ssh: the engine command $rpx_prog is not on $(uname -n): pass --engine-cmd" >&2; exit 127; }"#.into(),
        r#"rpx_dir=$(mktemp -d "${TMPDIR:-/tmp}/rpx-ssh.XXXXXX") || exit 3"#.into(),
        "rpx_pids=".into(),
        // One engine: a FIFO opened here (then unlinked) carries its output to a loop that
        // prefixes each line; `$!` is the engine's own pid.
        format!(
            r#"rpx_start() {{ mkfifo "$rpx_dir/f" || exit 3; exec 4<>"$rpx_dir/f" 5<"$rpx_dir/f" 6>"$rpx_dir/f" 4>&-; rm -f "$rpx_dir/f"; (while IFS= read -r l || [ -n "$l" ]; do printf "[engine %s] %s\n" "$1" "$l"; done) <&5 5<&- 6>&- & RPX_ENGINE_INDEX=$1 {cmd} </dev/null >&6 2>&1 5<&- 6>&- & rpx_pids="$rpx_pids $!"; exec 5<&- 6>&-; }}"#
        ),
        format!("for i in {}; do rpx_start $i; done", indices.map(|i| i.to_string()).collect::<Vec<_>>().join(" ")),
        r#"rmdir "$rpx_dir""#.into(),
        format!(r#"echo "{STARTED}$rpx_pids""#),
        "cat >/dev/null".into(),
        "rpx_end $rpx_pids".into(),
    ]);
    lines.join("; ")
}

/// The script `stop` runs on a host: end the engines `pids` started there (only those still
/// carrying the instance tag).
pub fn stop_script(instance: &str, pids: &[u32]) -> String {
    let mut lines = shell_functions(instance);
    lines.push(format!("rpx_end {}", pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")));
    lines.join("; ")
}

/// ssh's arguments after the program: `[--ssh-args] -o BatchMode=yes [extra] HOST -- sh -c
/// '<script>'` (the user's options come first, so they win).
pub fn ssh_argv(ssh_args: &[String], extra: &[&str], host: &str, script: &str) -> Vec<String> {
    let mut a: Vec<String> = ssh_args.to_vec();
    a.extend(["-o", "BatchMode=yes"].iter().chain(extra).map(|s| s.to_string()));
    a.extend([host.to_string(), "--".into(), format!("sh -c {}", shell_words::quote(script))]);
    a
}

/// The remote engine pids from the `rpx-ssh-started` line of a log, once it is there.
pub fn parse_started(log: &str) -> Option<Vec<u32>> {
    let line = log.lines().find_map(|l| l.trim_end().strip_prefix(STARTED))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// `user@host:22` as a file-name part.
pub fn log_name_part(host: &str) -> String {
    host.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

/// What went wrong with the ssh session to `host` that ended with exit code `code`, from its
/// log, and what to do.
pub fn diagnose(host: &str, code: Option<i32>, log: &str) -> String {
    let has = |s: &str| log.contains(s);
    if has("Permission denied") {
        format!("ssh to {host}: authentication refused (Permission denied). ipcluster runs ssh with BatchMode=yes (no password prompts): install a key for this user on {host} (ssh-copy-id {host}), or name one with --ssh-args \"-i KEY\"")
    } else if has("Host key verification failed") {
        format!("ssh to {host}: its host key is unknown or changed (Host key verification failed): add it (ssh-keyscan {host} >> ~/.ssh/known_hosts), or pass --ssh-args \"-o StrictHostKeyChecking=accept-new\"")
    } else if has("Could not resolve hostname") || has("Name or service not known") {
        format!("ssh to {host}: no such host name: check --hosts / --hostfile (or your ssh config, --ssh-args \"-F FILE\")")
    } else if has("Connection refused") {
        format!("cannot reach {host}: connection refused: is sshd running there, on the port you mean? (pass --ssh-args \"-p PORT\" or \"-F FILE\")")
    } else if has("timed out") || has("No route to host") || has("Network is unreachable") {
        format!("cannot reach {host}: the connection timed out or there is no route: check the host name and the network")
    } else if has("rpx-ssh: the engine command") {
        format!("the engine command does not exist on {host}: pass --engine-cmd with the path of ipengine there (default: this ipengine's path, for a shared filesystem)")
    } else if code == Some(255) {
        format!("ssh to {host} failed (ssh's own error, exit status 255)")
    } else {
        let how = code.map_or_else(|| "by a signal".to_string(), |c| format!("with exit status {c}"));
        format!("the ssh session that runs the engines on {host} ended {how}")
    }
}

/// A stdin for ssh that delivers `line` and then never reaches EOF while ssh lives: a pipe
/// holding the line, re-opened read-write through `/proc/self/fd` (the originals closed), so
/// the only writer is ssh itself. (An extra fd would not do: ssh closes every fd above 2.)
pub fn stdin_with_line(line: &str) -> std::io::Result<File> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success; we own them at once.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut w = File::from(write);
    w.write_all(line.trim_end_matches('\n').as_bytes())?;
    w.write_all(b"\n")?;
    std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{}", read.as_raw_fd()))
}

/// Start `placement`'s engines over one ssh connection: `ssh_cmd` is the ssh program and its
/// options, `engine_cmd` the ipengine command on the host, `connection` the line for
/// `RPX_CONNECTION_INFO`. Output goes to `log` here.
pub fn start_host(
    ssh_cmd: &[String],
    placement: &Placement,
    engine_cmd: &[String],
    instance: &str,
    connection: &str,
    log: &Path,
) -> anyhow::Result<Spawned<SshLaunch>> {
    let (program, ssh_args) = ssh_cmd.split_first().ok_or_else(|| anyhow::anyhow!("no ssh program"))?;
    let script = remote_script(instance, engine_cmd, placement.first..placement.first + placement.n);
    let stdin = stdin_with_line(connection)?;
    let child =
        procs::spawn_with(Path::new(program), &ssh_argv(ssh_args, &[], &placement.host, &script), log, instance, &[], Stdio::from(stdin))?;
    let record = SshLaunch {
        pid: child.id(),
        host: placement.host.clone(),
        first_index: placement.first,
        n: placement.n,
        log: log.to_path_buf(),
        remote_pids: Vec::new(),
        ssh: ssh_cmd.to_vec(),
    };
    Ok(Spawned { record, child: Some(child) })
}

/// Run [`stop_script`] on `rec`'s host (ssh stdin closed, output appended to its log), or
/// `None` if no remote pid is known.
pub fn start_remote_kill(rec: &SshLaunch, instance: &str) -> Option<Child> {
    let (program, ssh_args) = rec.ssh.split_first()?;
    if rec.remote_pids.is_empty() {
        return None;
    }
    let argv = ssh_argv(ssh_args, &["-o", "ConnectTimeout=5"], &rec.host, &stop_script(instance, &rec.remote_pids));
    let out = std::fs::OpenOptions::new().append(true).create(true).open(&rec.log).ok();
    let (o, e) = match out.and_then(|f| Some((f.try_clone().ok()?, f))) {
        Some((o, e)) => (Stdio::from(o), Stdio::from(e)),
        None => (Stdio::null(), Stdio::null()),
    };
    Command::new(program).args(argv).stdin(Stdio::null()).stdout(o).stderr(e).spawn().ok()
}

/// The ssh launcher: hosts, the ssh command, the remote engine command.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub hosts: Vec<HostSpec>,
    /// `--ssh` (default `ssh`).
    pub program: String,
    /// `--ssh-args`, split like a shell would.
    pub ssh_args: Vec<String>,
    /// `--engine-cmd`, split like a shell would (default: the local ipengine's path).
    pub engine_cmd: Option<Vec<String>>,
    /// The program `program` names (set by `prepare`).
    pub path: PathBuf,
}

impl Ssh {
    pub fn new(hosts: Vec<HostSpec>, program: Option<String>, ssh_args: Vec<String>, engine_cmd: Option<Vec<String>>) -> Ssh {
        let program = program.unwrap_or_else(|| "ssh".into());
        Ssh { hosts, path: PathBuf::from(&program), program, ssh_args, engine_cmd }
    }

    /// The ssh program and its options.
    pub fn command(&self) -> Vec<String> {
        std::iter::once(self.path.display().to_string()).chain(self.ssh_args.iter().cloned()).collect()
    }
}

/// One ssh connection started by ipcluster, running one host's engines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshLaunch {
    /// The local ssh process (its own session and process group).
    pub pid: u32,
    pub host: String,
    pub first_index: usize,
    pub n: usize,
    /// On this host: ssh's stdout and stderr, i.e. the remote engines' output.
    pub log: PathBuf,
    /// The engines' pids on the host, from the `rpx-ssh-started` line.
    #[serde(default)]
    pub remote_pids: Vec<u32>,
    /// The ssh program and its options, to reach the host again at stop.
    #[serde(default)]
    pub ssh: Vec<String>,
}

impl Record for SshLaunch {
    fn leader(&self) -> Option<u32> {
        Some(self.pid)
    }
    fn indices(&self) -> Range<usize> {
        self.first_index..self.first_index + self.n
    }
    fn log(&self) -> &Path {
        &self.log
    }
    fn label(&self) -> String {
        format!("ssh to {}", self.host)
    }
}

/// The start of a log (where the `rpx-ssh-started` line is).
fn log_head(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(256 * 1024).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

impl Launcher for Ssh {
    type Record = SshLaunch;
    const KIND: &'static str = "ssh";
    const NEEDS_CONNECTION_INFO: bool = true;

    fn records(st: &ClusterState) -> &[SshLaunch] {
        &st.ssh
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<SshLaunch> {
        &mut st.ssh
    }

    fn prepare(&mut self) -> anyhow::Result<()> {
        self.path = super::require_program(&self.program, "ssh", "ssh", "openssh-client", "--ssh")?;
        Ok(())
    }

    fn warning(&self, info: &ConnectionInfo) -> Option<String> {
        loopback_warning("the controller", &info.engine.interface, &self.hosts)
            .or_else(|| loopback_warning("the compiler", &info.compiler.url, &self.hosts))
    }

    fn start(&self, ctx: &LaunchCtx, first: usize, n: usize) -> anyhow::Result<Vec<Spawned<SshLaunch>>> {
        let engine_cmd = self.engine_cmd.clone().unwrap_or_else(|| vec![ctx.engine_bin.display().to_string()]);
        let connection = ctx.connection()?;
        let ssh_cmd = self.command();
        start_each(hosts::place(&self.hosts, n, first), |p| {
            let log = state::log_path(ctx.profile, "ipengine", format!("ssh-{}-{}", log_name_part(&p.host), p.first));
            start_host(&ssh_cmd, &p, &engine_cmd, ctx.instance, connection, &log)
        })
    }

    fn observe(rec: &mut SshLaunch) -> bool {
        match parse_started(&log_head(&rec.log)) {
            Some(pids) if rec.remote_pids != pids => {
                rec.remote_pids = pids;
                true
            }
            _ => false,
        }
    }

    fn settled(rec: &SshLaunch) -> bool {
        !rec.remote_pids.is_empty()
    }

    fn explain_exit(rec: &SshLaunch, status: ExitStatus) -> String {
        let what = diagnose(&rec.host, status.code(), &procs::tail(&rec.log, 40));
        format!("{what}\n{}", procs::tail_block(&format!("ssh {} log", rec.host), &rec.log))
    }

    /// Every host's log: which host's engines are missing cannot be told from here.
    fn explain_timeout(records: &[SshLaunch]) -> String {
        records.iter().take(8).map(|r| procs::tail_block_n(&format!("ssh {} log", r.host), &r.log, 20)).collect()
    }

    fn status(records: &[SshLaunch], instance: &str, _registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus> {
        records
            .iter()
            .map(|r| LaunchStatus {
                launcher: Self::KIND,
                host: Some(r.host.clone()),
                first_index: r.first_index,
                engines: r.n,
                pids: vec![r.pid],
                alive: usize::from(r.alive(instance)),
                remote_pids: r.remote_pids.clone(),
                registered: None,
                logs: vec![r.log.clone()],
                job: None,
                state: None,
            })
            .collect()
    }

    /// Kill the engines on every host at once (bounded), then end the local ssh processes.
    fn stop(records: &[SshLaunch], instance: &str) {
        let mut kills: Vec<Child> = records.iter().filter_map(|r| start_remote_kill(r, instance)).collect();
        procs::wait_all(&mut kills, STOP_LIMIT);
        term_leaders(records);
    }
}

/// A warning when engines on other hosts would be told to reach `who` (the controller, the
/// compiler) at a loopback `address`.
pub fn loopback_warning(who: &str, address: &str, hosts: &[HostSpec]) -> Option<String> {
    let loopback = address.contains("127.") || address.contains("localhost") || address.contains("[::1]");
    let remote: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).filter(|h| !hosts::is_loopback_host(h)).collect();
    (loopback && !remote.is_empty()).then(|| {
        format!("warning: {who} listens on {address}, which engines on {} cannot reach: start the cluster with --ip '*' --location <this host's address> (or --ip <that address>)", remote.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCE: &str = "0b9e7a52-1111-4222-8333-944455556666";

    #[test]
    fn remote_script_is_one_secret_free_posix_line() {
        let s = remote_script(INSTANCE, &["/opt/rpx/ipengine".into()], 3..5);
        assert!(!s.contains('\n') && !s.contains('\''), "{s}");
        assert!(s.starts_with("IFS= read -r RPX_CONNECTION_INFO || "), "{s}");
        assert!(
            s.contains(
                "export RPX_CONNECTION_INFO; RPX_CLUSTER_INSTANCE=0b9e7a52-1111-4222-8333-944455556666; export RPX_CLUSTER_INSTANCE"
            ),
            "{s}"
        );
        assert!(s.contains("RPX_ENGINE_INDEX=$1 /opt/rpx/ipengine </dev/null >&6 2>&1"), "{s}");
        assert!(s.contains("for i in 3 4; do rpx_start $i; done"), "{s}");
        assert!(s.contains(r#"echo "rpx-ssh-started$rpx_pids"; cat >/dev/null; rpx_end $rpx_pids"#), "{s}");
        let status = Command::new("sh").args(["-n", "-c", &s]).status().unwrap();
        assert!(status.success(), "sh -n accepts the script");
        let stop = stop_script(INSTANCE, &[10, 11]);
        assert!(stop.ends_with("rpx_end 10 11") && !stop.contains('\''), "{stop}");
        assert!(Command::new("sh").args(["-n", "-c", &stop]).status().unwrap().success());
    }

    #[test]
    fn ssh_argv_puts_user_options_first_and_quotes_the_script() {
        let a = ssh_argv(&["-F".into(), "/x/cfg".into()], &["-o", "ConnectTimeout=5"], "h1", "echo \"a b\"; x=$y");
        assert_eq!(a, ["-F", "/x/cfg", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "h1", "--", "sh -c 'echo \"a b\"; x=$y'"]);
        // The login shell on the host splits it back into `sh -c <script>`.
        assert_eq!(shell_words::split(&a[8]).unwrap(), ["sh", "-c", "echo \"a b\"; x=$y"]);
    }

    #[test]
    fn started_line_and_log_names() {
        assert_eq!(parse_started("Warning: added\n[engine 0] hi\nrpx-ssh-started 12 13\n"), Some(vec![12, 13]));
        assert_eq!(parse_started("rpx-ssh-started\n"), Some(vec![]));
        assert_eq!(parse_started("nothing yet"), None);
        assert_eq!(parse_started("rpx-ssh-started 1 x"), None);
        assert_eq!(log_name_part("me@host:22"), "me_host_22");
        assert_eq!(log_name_part("fe80::1"), "fe80__1");
    }

    #[test]
    fn failures_name_what_to_do() {
        let d = |code, log| diagnose("h1", code, log);
        assert!(d(Some(255), "me@h1: Permission denied (publickey).").contains("ssh-copy-id h1"));
        assert!(d(Some(255), "ssh: connect to host h1 port 22: Connection refused").contains("is sshd running there"));
        assert!(d(Some(255), "ssh: connect to host h1 port 22: Connection timed out").contains("cannot reach h1"));
        assert!(d(Some(255), "ssh: connect to host h1 port 22: No route to host").contains("cannot reach h1"));
        assert!(d(Some(255), "ssh: Could not resolve hostname h1: Name or service not known").contains("no such host name"));
        assert!(d(Some(255), "Host key verification failed.").contains("StrictHostKeyChecking=accept-new"));
        assert!(d(Some(127), "rpx-ssh: the engine command /x is not on h1: pass --engine-cmd").contains("--engine-cmd"));
        assert!(d(Some(255), "weird").contains("exit status 255"));
        assert!(d(Some(1), "").contains("exit status 1"));
    }

    #[test]
    fn loopback_controller_warns_only_for_remote_hosts() {
        let hosts = hosts::parse_hosts("localhost:1,10.0.0.2:2").unwrap();
        let w = loopback_warning("the controller", "tcp://127.0.0.1", &hosts).unwrap();
        assert!(
            w.contains("the controller listens on tcp://127.0.0.1, which engines on 10.0.0.2 cannot reach") && w.contains("--ip"),
            "{w}"
        );
        assert!(loopback_warning("the compiler", "tcp://10.0.0.1:5", &hosts).is_none());
        assert!(loopback_warning("the controller", "tcp://127.0.0.1", &hosts::parse_hosts("localhost").unwrap()).is_none());
    }

    #[test]
    fn stdin_delivers_the_line_and_never_ends_while_the_reader_lives() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("r.log");
        let tag = uuid::Uuid::new_v4().to_string();
        let script = "IFS= read -r l; echo \"got $l\"; cat >/dev/null; echo eof";
        let stdin = Stdio::from(stdin_with_line("{\"key\":\"s3cret\"}").unwrap());
        let mut child = procs::spawn_with(Path::new("/bin/sh"), &["-c".into(), script.into()], &log, &tag, &[], stdin).unwrap();
        assert!(procs::wait_until(Duration::from_secs(5), || procs::tail(&log, 5).contains("got {\"key\":\"s3cret\"}")));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!procs::tail(&log, 5).contains("eof"), "no EOF while the reader lives");
        assert!(child.try_wait().unwrap().is_none());
        procs::signal_group(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }

    /// A stand-in for ssh: drops options up to `--` and the host, then runs the remote command
    /// in a new session fed through a pipe, as sshd would: killing this "ssh" ends the
    /// remote command's stdin.
    fn fake_ssh(dir: &Path) -> PathBuf {
        let p = dir.join("fake-ssh");
        let script = r#"#!/bin/sh
while [ "$1" != "--" ]; do shift; done; shift
f=$(mktemp -u); mkfifo "$f"
setsid -w sh -c "$*" <"$f" & r=$!
exec 3>"$f" 4<&0; rm -f "$f"
cat <&4 >&3 4<&- & c=$!
exec 3>&- 4<&-
wait $r; rc=$?
kill $c 2>/dev/null
exit $rc
"#;
        std::fs::write(&p, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn fake_engine() -> Vec<String> {
        ["sh", "-c", "echo \"engine $RPX_ENGINE_INDEX info $RPX_CONNECTION_INFO\"; exec sleep 1000"].map(String::from).to_vec()
    }

    fn settle(rec: &mut SshLaunch) {
        assert!(
            procs::wait_until(Duration::from_secs(10), || {
                Ssh::observe(rec);
                Ssh::settled(rec)
            }),
            "no started line:\n{}",
            procs::tail(&rec.log, 20)
        );
    }

    #[test]
    fn engines_end_when_the_connection_ends() {
        assert!(procs::find_program("setsid").is_some(), "the remote script starts engines with setsid (util-linux)");
        let dir = tempfile::tempdir().unwrap();
        let ssh = vec![fake_ssh(dir.path()).display().to_string(), "-F".into(), "/dev/null".into()];
        let tag = uuid::Uuid::new_v4().to_string();
        let p = Placement { host: "h1".into(), first: 3, n: 2 };
        let log = dir.path().join("ssh-h1.log");
        let mut s = start_host(&ssh, &p, &fake_engine(), &tag, "{\"key\":\"k\"}", &log).unwrap();
        settle(&mut s.record);
        assert_eq!(s.record.remote_pids.len(), 2);
        assert!(
            procs::wait_until(Duration::from_secs(5), || procs::tail(&log, 10).contains("[engine 4] engine 4 info {\"key\":\"k\"}")),
            "{}",
            procs::tail(&log, 10)
        );
        for p in &s.record.remote_pids {
            assert!(procs::is_member(*p, &tag), "engine {p} runs with the instance tag");
        }
        // The key is on no command line.
        for p in procs::members(&[], &tag) {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            assert!(!String::from_utf8_lossy(&cmd).contains("\"key\""), "pid {p}");
        }
        // Kill the local "ssh" only: the remote script sees EOF and ends its engines.
        procs::signal_group(s.record.pid, libc::SIGKILL);
        let _ = s.child.as_mut().unwrap().wait();
        assert!(
            procs::wait_until(Duration::from_secs(8), || procs::members(&[], &tag).is_empty()),
            "left: {:?}",
            procs::members(&[], &tag)
        );
    }

    #[test]
    fn stop_kills_remote_engines_first_then_the_connections() {
        assert!(procs::find_program("setsid").is_some(), "the remote script starts engines with setsid (util-linux)");
        let dir = tempfile::tempdir().unwrap();
        let ssh = vec![fake_ssh(dir.path()).display().to_string()];
        let tag = uuid::Uuid::new_v4().to_string();
        // An engine that ignores TERM: the remote kill must still end it.
        let stubborn: Vec<String> = ["sh", "-c", "trap \"\" TERM; while :; do sleep 1; done"].map(String::from).to_vec();
        let mut spawned: Vec<Spawned<SshLaunch>> = [("h1", 0, 1), ("h2", 1, 2)]
            .iter()
            .map(|(h, first, n)| {
                let p = Placement { host: h.to_string(), first: *first, n: *n };
                start_host(&ssh, &p, &stubborn, &tag, "{}", &dir.path().join(format!("{h}.log"))).unwrap()
            })
            .collect();
        for s in spawned.iter_mut() {
            settle(&mut s.record);
        }
        let records: Vec<SshLaunch> = spawned.iter().map(|s| s.record.clone()).collect();
        let remote: Vec<u32> = records.iter().flat_map(|r| r.remote_pids.clone()).collect();
        assert_eq!(remote.len(), 3);
        Ssh::stop(&records, &tag);
        assert!(remote.iter().all(|p| !procs::is_member(*p, &tag)), "remote engines are gone when stop returns");
        for s in spawned.iter_mut() {
            let _ = s.child.as_mut().unwrap().wait();
        }
        assert!(
            procs::wait_until(Duration::from_secs(5), || procs::members(&[], &tag).is_empty()),
            "left: {:?}",
            procs::members(&[], &tag)
        );
        let status = Ssh::status(&records, &tag, None);
        assert_eq!(
            status[1].line(),
            format!("ssh h2: 2 engines (ssh pid {}, remote pids {},{}), exited", records[1].pid, remote[1], remote[2])
        );
    }

    #[test]
    fn a_missing_engine_command_is_reported() {
        assert!(procs::find_program("setsid").is_some(), "the remote script starts engines with setsid (util-linux)");
        let dir = tempfile::tempdir().unwrap();
        let ssh = vec![fake_ssh(dir.path()).display().to_string()];
        let tag = uuid::Uuid::new_v4().to_string();
        let p = Placement { host: "h1".into(), first: 0, n: 1 };
        let log = dir.path().join("h1.log");
        let mut s = start_host(&ssh, &p, &["/nonexistent/ipengine".into()], &tag, "{}", &log).unwrap();
        assert!(procs::wait_until(Duration::from_secs(5), || procs::tail(&log, 5).contains("rpx-ssh: the engine command")));
        let status = s.child.as_mut().unwrap().wait().unwrap();
        let why = Ssh::explain_exit(&s.record, status);
        assert!(why.contains("pass --engine-cmd") && why.contains("ssh h1 log"), "{why}");
    }
}
