//! The supervisor: what the supervising `ipcluster` (the foreground `ipcluster start`, or the
//! detached supervisor of `--daemonize`, see [`crate::daemon`]) does while the cluster runs.
//! It watches the compiler and the local launcher's engines (its own children by their exit
//! status, engines added by `ipcluster engines` by their pid), cleans up after a member that
//! died (the rest of its process group, an engine's namespace directory), restarts it as
//! [`crate::restart`] decides (an engine under the same engine id, the compiler on the same
//! port), says so in its log and records it in the cluster file's `supervision` section, which
//! `ipcluster list` shows. It ends when asked to stop (SIGINT/SIGTERM/SIGHUP, as `ipcluster
//! stop` does), when the controller dies, or when the cluster file is removed.
//!
//! Engines of the mpi and ssh launchers are not restarted (their launch is one process for
//! many engines); their exits are reported.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::hub::HubClient;
use crate::launcher::local::{self, EngineProc};
use crate::procs;
use crate::restart::{Decision, Policy, Tracker};
use crate::state::{ClusterState, GaveUp, RestartNote, Supervision};
use rpx_protocol::connection::{engine_namespace_dir, read_json, CompilerConnection};
use rpx_protocol::Profile;

/// Time between two looks at the members.
const TICK: Duration = Duration::from_millis(100);
/// Time between two `connection_request`s while an engine's uuid is not known yet.
const UUID_POLL: Duration = Duration::from_secs(1);

/// What the supervisor needs to restart members.
pub struct Setup {
    pub profile: Profile,
    /// The cluster's `RPX_CLUSTER_INSTANCE`.
    pub instance: String,
    pub policy: Policy,
    pub engine_bin: PathBuf,
    pub compiler_bin: PathBuf,
    /// `rpx-compiler` arguments as first started (profile and addresses), without `--port`.
    pub compiler_args: Vec<String>,
    /// The `--profile P [--cluster-id C]` flags, for messages.
    pub flags: String,
}

/// The processes the supervisor was handed, still running (or not) when it starts.
pub struct Members {
    pub controller: Child,
    pub compiler: Option<Child>,
    /// Local engines this process started, by pid.
    pub engines: HashMap<u32, Child>,
}

/// How supervision ended.
pub enum End {
    /// Asked to stop (the signal's name) or the cluster file is gone: exit 0.
    Stopped(Option<&'static str>),
    /// The controller died: stop the cluster, exit 1 with this message.
    ControllerDied(String),
}

/// What a member is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Compiler,
    Engine { index: usize, id: u64 },
}

/// Where a member is in its life.
#[derive(Debug)]
enum Life {
    Running,
    /// Died; to be started again at `at`.
    Due {
        at: Instant,
        reason: String,
        old_pid: u32,
    },
    /// Not restarted any more (a crash loop, or restarts are off).
    Done,
}

/// One supervised process.
struct Member {
    role: Role,
    pid: u32,
    /// Our child, if this process started it (its exit status is then known).
    child: Option<Child>,
    log: PathBuf,
    tracker: Tracker,
    life: Life,
    /// Engines: the uuid the controller reports for this engine's id (its namespace
    /// directory's name), once known.
    uuid: Option<String>,
    /// Engines: the uuid of the process before a restart, not to be mistaken for the new one.
    old_uuid: Option<String>,
    /// The compiler: its work directory, from its connection file.
    work_dir: Option<PathBuf>,
}

impl Member {
    /// `engine 2 (id 2)`, `the compiler`.
    fn label(&self) -> String {
        match self.role {
            Role::Compiler => "the compiler".into(),
            Role::Engine { index, id } => format!("engine {index} (id {id})"),
        }
    }

    /// `engine 2 (id 2)`, `compiler`: the member as the cluster file names it.
    fn name(&self) -> String {
        match self.role {
            Role::Compiler => "compiler".into(),
            _ => self.label(),
        }
    }

    /// Why it is gone, if it is.
    fn gone(&mut self, instance: &str) -> Option<String> {
        match self.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(describe_exit(status)),
                Ok(None) => None,
                Err(e) => Some(format!("could not be waited for ({e})")),
            },
            None => (!procs::is_member(self.pid, instance))
                .then(|| "is gone (exit status unknown: another ipcluster command started it)".to_string()),
        }
    }
}

/// `was killed by signal 9 (SIGKILL)`, `exited with status 1`.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        return format!("was killed by signal {}", rpx_protocol::signals::describe(sig));
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended ({status})"),
    }
}

/// The port of a `tcp://host:port` url.
pub fn url_port(url: &str) -> Option<u16> {
    url.rsplit_once(':')?.1.parse().ok()
}

/// One line in the supervisor's log (stderr: the terminal in the foreground, the log file once
/// detached).
fn say(msg: &str) {
    eprintln!("[{}] ipcluster: {msg}", rpx_protocol::message::now_iso());
}

/// The supervisor of one cluster.
pub struct Supervisor {
    setup: Setup,
    file: PathBuf,
    controller: Child,
    controller_pid: u32,
    controller_log: PathBuf,
    members: Vec<Member>,
    /// The file's supervision section as this supervisor keeps it.
    record: Supervision,
    hub: Option<HubClient>,
    last_poll: Option<Instant>,
    /// The cluster file could not be read at the last look (said once).
    unreadable: bool,
}

impl Supervisor {
    /// Take over the members of the running cluster `st`, and learn the engines' uuids once
    /// (bounded), so an engine killed right after the start is cleaned up after too.
    pub fn new(setup: Setup, st: &ClusterState, members: Members) -> Supervisor {
        let now = Instant::now();
        let Members { controller, compiler, engines: mut children } = members;
        let mut list = Vec::new();
        if let Some(pid) = st.compiler_pid {
            list.push(Member {
                role: Role::Compiler,
                pid,
                child: compiler,
                log: st.compiler_log.clone(),
                tracker: Tracker::new(now),
                life: Life::Running,
                uuid: None,
                old_uuid: None,
                work_dir: None,
            });
        }
        let record = st.supervision.clone().unwrap_or_else(|| Supervision {
            restart: setup.policy.restart,
            restart_limit: setup.policy.limit,
            restart_window: setup.policy.window.as_secs_f64(),
            ..Default::default()
        });
        let mut s = Supervisor {
            file: setup.profile.cluster_file(),
            controller_pid: st.controller_pid,
            controller_log: st.controller_log.clone(),
            controller,
            members: list,
            record,
            hub: None,
            last_poll: None,
            unreadable: false,
            setup,
        };
        for e in &st.engines {
            let child = children.remove(&e.pid);
            s.members.push(engine_member(e, child, now));
        }
        s.poll_uuids(now, Duration::from_secs(2));
        s
    }

    /// Supervise until stopped. `extra` reports exits of other launchers' launches (lines).
    pub fn run(&mut self, mut extra: impl FnMut() -> Vec<String>) -> End {
        loop {
            if let Some(sig) = procs::stop_signal() {
                return End::Stopped(Some(sig));
            }
            if let Ok(Some(status)) = self.controller.try_wait() {
                return End::ControllerDied(format!(
                    "the controller (pid {}) {}; stopping the cluster\n{}",
                    self.controller_pid,
                    describe_exit(status),
                    procs::tail_block("ipcontroller log", &self.controller_log)
                ));
            }
            if !self.file.exists() {
                // `ipcluster stop` racing us removed the cluster: end quietly.
                return End::Stopped(None);
            }
            let now = Instant::now();
            // Written atomically, so a read fails only if something is badly wrong: say so once
            // and go on watching the members known so far.
            match ClusterState::read(&self.file) {
                Ok(st) => {
                    self.unreadable = false;
                    self.sync_engines(&st, now);
                }
                Err(e) if !self.unreadable => {
                    self.unreadable = true;
                    say(&format!("{e:#}; supervising the members known so far"));
                }
                Err(_) => {}
            }
            self.tick(now);
            for line in extra() {
                say(&line);
            }
            std::thread::sleep(TICK);
        }
    }

    /// Reap the children this supervisor started or was handed (after the cluster stopped).
    pub fn reap(&mut self) {
        let _ = self.controller.try_wait();
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                let _ = c.try_wait();
            }
        }
    }

    /// Follow the cluster file's local engines: supervise ones `ipcluster engines` added, drop
    /// ones it removed.
    fn sync_engines(&mut self, st: &ClusterState, now: Instant) {
        self.members.retain(|m| match m.role {
            Role::Compiler => true,
            Role::Engine { index, .. } => st.engines.iter().any(|e| e.index == index),
        });
        for e in &st.engines {
            if !self.members.iter().any(|m| matches!(m.role, Role::Engine { index, .. } if index == e.index)) {
                self.members.push(engine_member(e, None, now));
            }
        }
    }

    /// Notice deaths, start what is due, learn what is missing.
    fn tick(&mut self, now: Instant) {
        for i in 0..self.members.len() {
            if matches!(self.members[i].life, Life::Running) {
                if let Some(reason) = self.members[i].gone(&self.setup.instance) {
                    self.on_death(i, reason, now);
                }
            }
        }
        for i in 0..self.members.len() {
            if matches!(self.members[i].life, Life::Due { at, .. } if at <= now) {
                self.restart(i, now);
            }
        }
        if self.members.iter().any(|m| matches!(m.role, Role::Engine { .. }) && matches!(m.life, Life::Running) && m.uuid.is_none()) {
            self.poll_uuids(now, UUID_POLL);
        }
        if self.members.iter().any(|m| m.role == Role::Compiler && matches!(m.life, Life::Running) && m.work_dir.is_none()) {
            self.learn_compiler();
        }
    }

    /// A member died: clean up after it, then restart it later or give it up.
    fn on_death(&mut self, i: usize, reason: String, now: Instant) {
        let policy = self.setup.policy;
        let m = &mut self.members[i];
        // Whatever it left in its process group (the compiler's relays, helpers) goes too:
        // the processes of that group that carry the cluster's tag.
        for p in procs::members(&[m.pid], "").into_iter().filter(|p| procs::is_member(*p, &self.setup.instance)) {
            procs::signal(p, libc::SIGKILL);
        }
        let mut cleaned = String::new();
        if let Some(uuid) = m.uuid.take() {
            let dir = engine_namespace_dir(&uuid);
            if dir.exists() {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => cleaned = format!("; removed its namespace {}", dir.display()),
                    Err(e) => cleaned = format!("; could not remove its namespace {}: {e}", dir.display()),
                }
            }
            m.old_uuid = Some(uuid);
        }
        if let Some(dir) = m.work_dir.take() {
            match remove_work_dir(&dir) {
                Ok(true) => cleaned = format!("; removed its work directory {}", dir.display()),
                Ok(false) => {}
                Err(e) => cleaned = format!("; could not remove its work directory {}: {e}", dir.display()),
            }
        }
        let lost = match m.role {
            Role::Engine { .. } => "its variables are lost",
            Role::Compiler => "engines connect to its successor on their next cell",
        };
        let what = format!("{} (pid {}) {reason}{cleaned}", m.label(), m.pid);
        match m.tracker.on_exit(&policy, now) {
            Decision::Restart { after, nth } => {
                say(&format!(
                    "{what}; {lost}; restarting it in {:.1} s (restart {nth} of at most {} in a row)",
                    after.as_secs_f64(),
                    policy.limit
                ));
                m.life = Life::Due { at: now + after, reason, old_pid: m.pid };
            }
            Decision::GiveUp { restarts } => {
                m.life = Life::Done;
                let advice = match m.role {
                    Role::Engine { .. } => {
                        format!("once the cause is fixed, add an engine with `ipcluster engines -n 1 {}`", self.setup.flags)
                    }
                    Role::Compiler => format!(
                        "cells fail until the cluster is restarted (`ipcluster stop {0}`, then `ipcluster start {0}`)",
                        self.setup.flags
                    ),
                };
                let message = format!(
                    "{what}; it died within {} s of each of its last {restarts} restarts: a crash loop, so it is not restarted again; see its log {}; {advice}",
                    policy.window.as_secs_f64(),
                    m.log.display()
                );
                say(&message);
                let gave_up = GaveUp { at: rpx_protocol::message::now_iso(), member: m.name(), message };
                self.record.given_up.push(gave_up);
                self.save(|_| {});
            }
            Decision::Off => {
                m.life = Life::Done;
                say(&format!("{what}; {lost}; not restarted (--no-restart); see its log {}", m.log.display()));
            }
        }
    }

    /// Start a member whose restart is due.
    fn restart(&mut self, i: usize, now: Instant) {
        let Life::Due { reason, old_pid, .. } = std::mem::replace(&mut self.members[i].life, Life::Running) else { return };
        let spawned = match self.members[i].role {
            Role::Compiler => self.spawn_compiler(&self.members[i].log, &reason),
            Role::Engine { index, .. } => {
                let rec = EngineProc { pid: old_pid, index, log: self.members[i].log.clone() };
                local::restart_engine(&self.setup.profile, &self.setup.engine_bin, &self.setup.instance, &rec, &reason)
            }
        };
        let m = &mut self.members[i];
        m.tracker.started(now);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                m.pid = old_pid;
                return self.on_death(i, format!("could not be started again: {e:#}"), now);
            }
        };
        m.pid = child.id();
        m.child = Some(child);
        let note = RestartNote {
            at: rpx_protocol::message::now_iso(),
            member: m.name(),
            reason,
            old_pid,
            new_pid: m.pid,
            lost: matches!(m.role, Role::Engine { .. }).then(|| "its variables are lost".to_string()),
        };
        say(&format!("restarted {} as pid {}", m.label(), m.pid));
        let (role, pid) = (m.role.clone(), m.pid);
        self.record.note(note);
        self.save(|st| match role {
            Role::Compiler => st.compiler_pid = Some(pid),
            Role::Engine { index, .. } => {
                if let Some(e) = st.engines.iter_mut().find(|e| e.index == index) {
                    e.pid = pid;
                }
            }
        });
    }

    /// Start the compiler again, on its predecessor's port when known.
    fn spawn_compiler(&self, log: &Path, why: &str) -> anyhow::Result<Child> {
        let mut args = self.setup.compiler_args.clone();
        match self.record.compiler_port {
            Some(port) => args.extend(["--port".to_string(), port.to_string()]),
            None => say("the compiler's port was never learned: its successor takes a new one (engines on other hosts cannot find it)"),
        }
        procs::append_line(log, &format!("--- ipcluster: the compiler {why}; restarting it"));
        procs::spawn_appending(&self.setup.compiler_bin, &args, log, &self.setup.instance, &[])
    }

    /// The running compiler's port and work directory, from its connection file (once it
    /// wrote it).
    fn learn_compiler(&mut self) {
        let Some(m) = self.members.iter_mut().find(|m| m.role == Role::Compiler && matches!(m.life, Life::Running)) else { return };
        let Ok(conn) = read_json::<CompilerConnection>(&self.setup.profile.compiler_file()) else { return };
        if conn.pid != m.pid {
            return;
        }
        // Learned once per compiler process (an old compiler file without one: nothing to do).
        m.work_dir = Some(conn.work_dir.unwrap_or_default());
        let port = url_port(&conn.url);
        if port.is_some() && port != self.record.compiler_port {
            self.record.compiler_port = port;
            self.save(|_| {});
        }
    }

    /// Ask the controller which uuid each engine id has (at most every `every`), for the
    /// engines whose uuid is not known yet.
    fn poll_uuids(&mut self, now: Instant, every: Duration) {
        if self.last_poll.is_some_and(|t| now.saturating_duration_since(t) < every) {
            return;
        }
        self.last_poll = Some(now);
        let limit = Duration::from_secs(1);
        if self.hub.is_none() {
            self.hub = HubClient::connect(&self.setup.profile.client_file(), limit).ok();
        }
        let Some(hub) = self.hub.as_mut() else { return };
        let registered = match hub.engines(limit) {
            Ok(r) => r,
            Err(_) => {
                self.hub = None;
                return;
            }
        };
        for m in &mut self.members {
            if let (Role::Engine { id, .. }, Life::Running, None) = (&m.role, &m.life, &m.uuid) {
                if let Some(uuid) = registered.get(id).filter(|u| m.old_uuid.as_ref() != Some(*u)) {
                    m.uuid = Some(uuid.clone());
                }
            }
        }
    }

    /// Write the supervision section (and `f`'s changes) into the cluster file.
    fn save(&self, f: impl FnOnce(&mut ClusterState)) {
        let record = self.record.clone();
        if let Err(e) = ClusterState::update(&self.file, |st| {
            f(st);
            st.supervision = Some(record);
        }) {
            say(&format!("cannot record in the cluster file: {e:#}"));
        }
    }
}

/// Remove a dead compiler's work directory: only a real directory (not a link) named
/// `rpx-compiler-*`, as the compiler creates them. Ok(false): nothing to remove.
pub fn remove_work_dir(dir: &Path) -> std::io::Result<bool> {
    let named_so = dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("rpx-compiler-"));
    let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    if !named_so || !is_dir {
        return Ok(false);
    }
    std::fs::remove_dir_all(dir).map(|()| true)
}

fn engine_member(e: &EngineProc, child: Option<Child>, now: Instant) -> Member {
    Member {
        role: Role::Engine { index: e.index, id: local::engine_id(e.index) },
        pid: e.pid,
        child,
        log: e.log.clone(),
        tracker: Tracker::new(now),
        life: Life::Running,
        uuid: None,
        old_uuid: None,
        work_dir: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn exits_are_described_for_a_user() {
        let st = Command::new("/bin/sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(describe_exit(st), "exited with status 3");
        let st = Command::new("/bin/sh").args(["-c", "kill -9 $$"]).status().unwrap();
        assert_eq!(describe_exit(st), "was killed by signal 9 (SIGKILL)");
        let st = Command::new("/bin/sh").args(["-c", "kill -USR1 $$"]).status().unwrap();
        assert_eq!(describe_exit(st), format!("was killed by signal {} (SIGUSR1)", libc::SIGUSR1));
        // A real-time signal has no name in the table: the number alone.
        let st = Command::new("/bin/sh").args(["-c", "kill -s RTMIN+3 $$ || kill -37 $$"]).status().unwrap();
        let sig = std::os::unix::process::ExitStatusExt::signal(&st).unwrap();
        assert_eq!(describe_exit(st), format!("was killed by signal {sig}"));
    }

    /// A cluster of stand-ins: `sleep` as the controller, and a "compiler" that is `/bin/sh -c
    /// SCRIPT` (so its restarts run the same script).
    fn stand_in(dir: &Path, script: &str, policy: Policy) -> Supervisor {
        let instance = uuid::Uuid::new_v4().to_string();
        let profile = Profile { name: "t".into(), dir: dir.to_path_buf(), cluster_id: String::new() };
        std::fs::create_dir_all(profile.security_dir()).unwrap();
        let args = vec!["-c".to_string(), script.to_string()];
        let controller = procs::spawn(Path::new("sleep"), &["1000".into()], &dir.join("c.log"), &instance, &[]).unwrap();
        let compiler = procs::spawn(Path::new("/bin/sh"), &args, &dir.join("x.log"), &instance, &[]).unwrap();
        let st = ClusterState {
            profile: "t".into(),
            cluster_id: String::new(),
            profile_dir: dir.into(),
            controller_pid: controller.id(),
            compiler_pid: Some(compiler.id()),
            engines: Vec::new(),
            mpi: Vec::new(),
            ssh: Vec::new(),
            slurm: Vec::new(),
            sge: Vec::new(),
            pbs: Vec::new(),
            started: String::new(),
            ipcluster_pid: Some(std::process::id()),
            supervision: None,
            instance: instance.clone(),
            launcher: "local".into(),
            controller_log: dir.join("c.log"),
            compiler_log: dir.join("x.log"),
            client_file: profile.client_file(),
        };
        st.write(&profile.cluster_file()).unwrap();
        let setup = Setup {
            profile,
            instance,
            policy,
            engine_bin: "/nonexistent".into(),
            compiler_bin: "/bin/sh".into(),
            compiler_args: args,
            flags: "--profile t".into(),
        };
        Supervisor::new(setup, &st, Members { controller, compiler: Some(compiler), engines: HashMap::new() })
    }

    fn supervision(sup: &Supervisor) -> Supervision {
        ClusterState::read(&sup.file).unwrap().supervision.unwrap_or_default()
    }

    /// Tick until `done` (bounded).
    fn tick_until(sup: &mut Supervisor, mut done: impl FnMut(&Supervisor) -> bool) -> bool {
        procs::wait_until(Duration::from_secs(10), || {
            sup.tick(Instant::now());
            done(sup)
        })
    }

    #[test]
    fn a_crash_looping_compiler_is_restarted_then_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy { limit: 2, first_delay: Duration::from_millis(10), ..Policy::default() };
        let mut sup = stand_in(dir.path(), "echo started; exit 7", policy);
        let first = sup.members[0].pid;
        assert!(tick_until(&mut sup, |s| matches!(s.members[0].life, Life::Done)), "given up");
        let v = supervision(&sup);
        assert_eq!(v.restarts, 2, "{v:?}");
        assert_eq!(v.recent[0].old_pid, first);
        assert_eq!(v.recent[0].reason, "exited with status 7");
        assert_eq!(v.given_up.len(), 1);
        assert!(v.given_up[0].message.starts_with("the compiler (pid "), "{}", v.given_up[0].message);
        assert!(
            v.given_up[0].message.contains("a crash loop") && v.given_up[0].message.contains("ipcluster stop --profile t"),
            "{}",
            v.given_up[0].message
        );
        let st = ClusterState::read(&sup.file).unwrap();
        assert_eq!(st.compiler_pid, Some(v.recent[1].new_pid), "the file follows the restarts");
        // Every start appended to the same log, with the supervisor's lines between.
        let log = std::fs::read_to_string(dir.path().join("x.log")).unwrap();
        assert_eq!(log.matches("started").count(), 3, "{log}");
        assert_eq!(log.matches("--- ipcluster: the compiler exited with status 7; restarting it").count(), 2, "{log}");
        procs::signal(sup.controller_pid, libc::SIGKILL);
        sup.reap();
    }

    #[test]
    fn restarts_are_off_with_no_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = stand_in(dir.path(), "exit 0", Policy { restart: false, ..Policy::default() });
        assert!(tick_until(&mut sup, |s| matches!(s.members[0].life, Life::Done)));
        let v = supervision(&sup);
        assert_eq!((v.restarts, v.given_up.len()), (0, 0), "nothing restarted, nothing given up: {v:?}");
        procs::signal(sup.controller_pid, libc::SIGKILL);
        sup.reap();
    }

    #[test]
    fn only_compiler_work_directories_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("rpx-compiler-abc123");
        std::fs::create_dir_all(work.join("target/debug")).unwrap();
        std::fs::write(work.join("host-token"), "t").unwrap();
        let other = tmp.path().join("precious");
        std::fs::create_dir(&other).unwrap();
        let link = tmp.path().join("rpx-compiler-link");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(!remove_work_dir(&other).unwrap(), "not a compiler's");
        assert!(!remove_work_dir(&link).unwrap(), "a link is not followed");
        assert!(!remove_work_dir(Path::new("")).unwrap());
        assert!(!remove_work_dir(&tmp.path().join("rpx-compiler-gone")).unwrap());
        assert!(remove_work_dir(&work).unwrap());
        assert!(!work.exists() && other.is_dir() && link.exists());
    }

    #[test]
    fn ports_come_from_urls() {
        assert_eq!(url_port("tcp://127.0.0.1:5555"), Some(5555));
        assert_eq!(url_port("tcp://[::1]:80"), Some(80));
        assert_eq!(url_port("tcp://host"), None);
        assert_eq!(url_port("tcp://h:99999"), None);
    }

    #[test]
    fn restart_notes_are_bounded_and_counted() {
        let mut s = Supervision::default();
        for i in 0..30u32 {
            s.note(RestartNote {
                at: "t".into(),
                member: "compiler".into(),
                reason: "exited with status 1".into(),
                old_pid: i,
                new_pid: i + 1,
                lost: None,
            });
        }
        assert_eq!(s.restarts, 30);
        assert_eq!(s.recent.len(), Supervision::KEPT);
        assert_eq!(s.recent.last().unwrap().old_pid, 29, "the newest is kept");
        let n = RestartNote {
            at: "T".into(),
            member: "engine 2 (id 2)".into(),
            reason: "was killed by signal 9 (SIGKILL)".into(),
            old_pid: 1,
            new_pid: 456,
            lost: Some("its variables are lost".into()),
        };
        assert_eq!(n.line(), "engine 2 (id 2) was killed by signal 9 (SIGKILL), restarted as pid 456 at T; its variables are lost");
    }
}
