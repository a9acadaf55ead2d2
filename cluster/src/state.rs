//! The cluster state file (`security/cluster[-cid].json`): which processes make up a running
//! cluster (controller, compiler, and what each launcher started: local engines, mpiexecs,
//! ssh connections), read by `stop`, `list` and `engines`; plus the pure decisions made from it
//! (is the cluster still running, which log files belong to it).
//!
//! Files written before launchers existed still read: every newer field has a default.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::launcher;
use crate::launcher::batch::BatchJob;
use crate::launcher::mpi::MpiLaunch;
use crate::launcher::ssh::SshLaunch;
use rpx_protocol::connection::{read_json, write_private_json};
use rpx_protocol::Profile;

pub use crate::launcher::local::EngineProc;

/// The contents of `cluster[-cid].json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub profile: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub profile_dir: PathBuf,
    pub controller_pid: u32,
    #[serde(default)]
    pub compiler_pid: Option<u32>,
    /// Engines of the local launcher, one process each.
    #[serde(default)]
    pub engines: Vec<EngineProc>,
    /// mpiexecs of the mpi launcher, one per `start`/`engines` call.
    #[serde(default)]
    pub mpi: Vec<MpiLaunch>,
    /// ssh connections of the ssh launcher, one per host and `start`/`engines` call.
    #[serde(default)]
    pub ssh: Vec<SshLaunch>,
    /// Batch jobs submitted to Slurm, Grid Engine and PBS, one per submission.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slurm: Vec<BatchJob>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sge: Vec<BatchJob>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pbs: Vec<BatchJob>,
    /// ISO-8601 UTC.
    pub started: String,
    /// The supervising `ipcluster` process: the foreground `ipcluster start`, or with
    /// `--daemonize` the detached supervisor it left behind; absent with `--daemonize
    /// --no-restart`. `stop` asks it to stop its cluster first.
    #[serde(default)]
    pub ipcluster_pid: Option<u32>,
    /// What the supervisor does and did: its policy, restarts, members given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervision: Option<Supervision>,
    /// Value of `RPX_CLUSTER_INSTANCE` in every process ipcluster started (and so in their
    /// children): `stop` finds stragglers by it.
    #[serde(default)]
    pub instance: String,
    /// The launcher `ipcluster start` used (`engines` may add others).
    #[serde(default = "local")]
    pub launcher: String,
    #[serde(default)]
    pub controller_log: PathBuf,
    #[serde(default)]
    pub compiler_log: PathBuf,
    #[serde(default)]
    pub client_file: PathBuf,
}

/// The supervisor's section of the cluster file (written by the supervisor only).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Supervision {
    /// Dead members are restarted (false: `--no-restart`).
    pub restart: bool,
    /// `--restart-limit`: restarts in a row, each followed by a death within the window,
    /// before a member is given up.
    pub restart_limit: u32,
    /// `--restart-window`, seconds.
    pub restart_window: f64,
    /// The detached supervisor's log (`log/ipcluster[-cid]-<pid>.log`); none in the
    /// foreground, which writes to its terminal.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// The compiler's port, once known: a restarted compiler binds the same one.
    #[serde(default)]
    pub compiler_port: Option<u16>,
    /// Restarts done since the cluster started.
    #[serde(default)]
    pub restarts: u64,
    /// The latest restarts, oldest first (at most [`Supervision::KEPT`]).
    #[serde(default)]
    pub recent: Vec<RestartNote>,
    /// Members no longer restarted (crash loops), oldest first.
    #[serde(default)]
    pub given_up: Vec<GaveUp>,
}

impl Supervision {
    /// Restart notes kept in the file.
    pub const KEPT: usize = 20;

    /// Count a restart and keep its note.
    pub fn note(&mut self, n: RestartNote) {
        self.restarts += 1;
        self.recent.push(n);
        let over = self.recent.len().saturating_sub(Self::KEPT);
        self.recent.drain(..over);
    }
}

/// One restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartNote {
    /// ISO-8601 UTC, when the new process was started.
    pub at: String,
    /// `engine 2 (id 2)` or `compiler`.
    pub member: String,
    /// Why it was restarted: `killed by signal 9 (SIGKILL)`, `exited with status 1`.
    pub reason: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// What the restart lost, said to the user (`the engine's variables are lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

impl RestartNote {
    /// `engine 2 (id 2) killed by signal 9 (SIGKILL), restarted as pid 456 at T; its variables are lost`.
    pub fn line(&self) -> String {
        let mut s = format!("{} {}, restarted as pid {} at {}", self.member, self.reason, self.new_pid, self.at);
        if let Some(l) = &self.lost {
            s.push_str("; ");
            s.push_str(l);
        }
        s
    }
}

/// A member the supervisor gave up on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaveUp {
    pub at: String,
    pub member: String,
    /// The whole message, saying why and where to look.
    pub message: String,
}

fn local() -> String {
    "local".into()
}

/// The environment variable that tags every process of one cluster.
pub const INSTANCE_ENV: &str = "RPX_CLUSTER_INSTANCE";

impl ClusterState {
    pub fn read(path: &Path) -> anyhow::Result<ClusterState> {
        read_json(path).with_context(|| format!("cannot read cluster file {}", path.display()))
    }

    /// Write atomically with mode 0600.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_private_json(path, self).with_context(|| format!("cannot write cluster file {}", path.display()))
    }

    /// Read the cluster file at `path`, change it with `f` and write it back, holding an
    /// exclusive lock (`<file>.lock`) so the supervisor and `ipcluster engines` do not undo
    /// each other's changes. Fails if the file is gone (the cluster was stopped): it is never
    /// recreated.
    pub fn update<T>(path: &Path, f: impl FnOnce(&mut ClusterState) -> T) -> anyhow::Result<T> {
        let _lock = Lock::take(path)?;
        let mut st = ClusterState::read(path)?;
        let out = f(&mut st);
        st.write(path)?;
        Ok(out)
    }

    /// The next engine index for `ipcluster engines`, after every launcher's engines.
    pub fn next_index(&self) -> usize {
        launcher::all_records(self).iter().map(|(_, r)| r.indices().end).max().unwrap_or(0)
    }

    /// The local processes of every launch (each leads its own process group).
    pub fn launch_pids(&self) -> Vec<u32> {
        launcher::all_records(self).iter().filter_map(|(_, r)| r.leader()).collect()
    }

    /// Every local pid recorded (each leads its own process group), controller first.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.controller_pid];
        v.extend(self.compiler_pid);
        v.extend(self.launch_pids());
        v
    }
}

/// The lock file of a cluster file.
pub fn lock_path(cluster_file: &Path) -> PathBuf {
    let mut name = cluster_file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    cluster_file.with_file_name(name)
}

/// An exclusive `flock` on a cluster file's lock file, released on drop.
struct Lock(std::fs::File);

impl Lock {
    fn take(cluster_file: &Path) -> anyhow::Result<Lock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = lock_path(cluster_file);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // Holders only read and write one small file: a bounded wait is plenty.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // SAFETY: flock on an open descriptor owned by `f`.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Lock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
                return Err(anyhow::anyhow!("cannot lock {}: {e}", path.display()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking our own descriptor.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Is this cluster running? Its controller must be alive; `is_proc(pid, name)` says whether
/// `pid` is a live (non-zombie) process running the program `name` (so a reused pid does
/// not count).
pub fn is_running(state: &ClusterState, is_proc: impl Fn(u32, &str) -> bool) -> bool {
    is_proc(state.controller_pid, "ipcontroller")
}

/// Does the log file name `name` belong to the program `prog` in cluster `cid`?
/// `ipengine-3.log` is engine 3 of the default cluster, `ipengine-c1-3.log` of cluster `c1`;
/// controller and compiler logs end in the launching pid the same way; launchers' logs are
/// `ipengine[-cid]-mpi-<first>.log` and `ipengine[-cid]-ssh-<host>-<first>.log`.
pub fn is_log_of(name: &str, prog: &str, cid: &str) -> bool {
    let base = if cid.is_empty() { format!("{prog}-") } else { format!("{prog}-{cid}-") };
    let Some(rest) = name.strip_prefix(&base) else { return false };
    let Some(rest) = rest.strip_suffix(".log") else { return false };
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    for kind in ["mpi-", "slurm-", "sge-", "pbs-"] {
        if let Some(first) = rest.strip_prefix(kind) {
            return number(first);
        }
    }
    if let Some(host_first) = rest.strip_prefix("ssh-") {
        return host_first.rsplit_once('-').is_some_and(|(host, first)| !host.is_empty() && number(first));
    }
    number(rest)
}

/// `<prog>[-cid]-<n>.log` in the profile's log directory.
pub fn log_path(profile: &Profile, prog: &str, n: impl std::fmt::Display) -> PathBuf {
    let name = if profile.cluster_id.is_empty() { format!("{prog}-{n}.log") } else { format!("{prog}-{}-{n}.log", profile.cluster_id) };
    profile.log_dir().join(name)
}

/// Every cluster file under `$RPX_DIR`: `profile_*/security/cluster[-cid].json`, sorted.
pub fn all_cluster_files(rpx_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(rpx_dir) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("profile_") {
            continue;
        }
        out.extend(cluster_files_in(&e.path().join("security")));
    }
    out.sort();
    out
}

/// The cluster files in one profile's security directory.
pub fn cluster_files_in(security: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(security) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_cluster_file_name(&name) {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// `cluster.json` or `cluster-<cid>.json`.
pub fn is_cluster_file_name(name: &str) -> bool {
    name == "cluster.json" || (name.starts_with("cluster-") && name.ends_with(".json") && name.len() > "cluster-.json".len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterState {
        ClusterState {
            profile: "default".into(),
            cluster_id: String::new(),
            profile_dir: "/r/profile_default".into(),
            controller_pid: 100,
            compiler_pid: Some(101),
            engines: vec![EngineProc { pid: 102, index: 0, log: "/l/0".into() }, EngineProc { pid: 103, index: 1, log: "/l/1".into() }],
            mpi: Vec::new(),
            ssh: Vec::new(),
            slurm: Vec::new(),
            sge: Vec::new(),
            pbs: Vec::new(),
            started: "2026-01-01T00:00:00.000000Z".into(),
            ipcluster_pid: None,
            supervision: None,
            instance: "abc".into(),
            launcher: "local".into(),
            controller_log: "/l/c".into(),
            compiler_log: "/l/x".into(),
            client_file: "/r/profile_default/security/ipcontroller-client.json".into(),
        }
    }

    #[test]
    fn cluster_file_round_trip_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("security/cluster.json");
        let s = sample();
        s.write(&p).unwrap();
        assert_eq!(ClusterState::read(&p).unwrap(), s);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["controller_pid"], 100);
        assert_eq!(v["engines"][1]["pid"], 103);
        assert_eq!(v["engines"][1]["index"], 1);
    }

    #[test]
    fn minimal_file_reads_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.json");
        std::fs::write(&p, r#"{"profile":"x","controller_pid":5,"started":"t"}"#).unwrap();
        let s = ClusterState::read(&p).unwrap();
        assert_eq!(s.pids(), vec![5]);
        assert_eq!(s.next_index(), 0);
        assert_eq!(s.launcher, "local");
        std::fs::write(&p, "{not json").unwrap();
        assert!(ClusterState::read(&p).is_err());
    }

    #[test]
    fn launcher_records_round_trip_and_count() {
        use crate::launcher::mpi::Flavour;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.json");
        let mut s = sample();
        s.launcher = "ssh".into();
        s.ssh.push(SshLaunch {
            pid: 200,
            host: "10.0.0.2".into(),
            first_index: 2,
            n: 3,
            log: "/l/ipengine-ssh-10.0.0.2-2.log".into(),
            remote_pids: vec![7, 8, 9],
            ssh: vec!["/usr/bin/ssh".into(), "-F".into(), "/c".into()],
        });
        s.mpi.push(MpiLaunch {
            pid: 300,
            first_index: 5,
            n: 4,
            log: "/l/ipengine-mpi-5.log".into(),
            mpiexec: "/usr/bin/mpiexec".into(),
            flavour: Flavour::OpenMpi,
        });
        s.write(&p).unwrap();
        assert_eq!(ClusterState::read(&p).unwrap(), s);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["ssh"][0]["host"], "10.0.0.2");
        assert_eq!(v["ssh"][0]["remote_pids"], serde_json::json!([7, 8, 9]));
        assert_eq!(v["mpi"][0]["flavour"], "openmpi");
        assert_eq!(v["mpi"][0]["n"], 4);
        assert_eq!(s.next_index(), 9, "after the mpi ranks 5..9");
        assert_eq!(s.pids(), vec![100, 101, 102, 103, 300, 200]);
        assert_eq!(s.launch_pids(), vec![102, 103, 300, 200]);
        // A file written before launchers existed reads with empty launcher lists.
        std::fs::write(&p, r#"{"profile":"x","controller_pid":5,"started":"t","engines":[{"pid":6,"index":0}]}"#).unwrap();
        let old = ClusterState::read(&p).unwrap();
        assert!(old.mpi.is_empty() && old.ssh.is_empty());
        assert_eq!(old.next_index(), 1);
    }

    #[test]
    fn stale_when_controller_is_gone_or_reused() {
        let s = sample();
        assert!(is_running(&s, |pid, name| pid == 100 && name == "ipcontroller"));
        // Controller dead, engines alive: stale.
        assert!(!is_running(&s, |pid, _| pid != 100));
        // The pid now belongs to another program: stale.
        assert!(!is_running(&s, |_, name| name == "bash"));
    }

    #[test]
    fn next_index_continues_after_the_highest() {
        let mut s = sample();
        assert_eq!(s.next_index(), 2);
        s.engines.remove(0);
        assert_eq!(s.next_index(), 2);
        assert_eq!(s.pids(), vec![100, 101, 103]);
    }

    #[test]
    fn log_names_belong_to_their_cluster() {
        assert!(is_log_of("ipengine-3.log", "ipengine", ""));
        assert!(!is_log_of("ipengine-c1-3.log", "ipengine", ""));
        assert!(is_log_of("ipengine-c1-3.log", "ipengine", "c1"));
        assert!(!is_log_of("ipengine-c1-3.log", "ipengine", "c2"));
        assert!(!is_log_of("ipengine-.log", "ipengine", ""));
        assert!(!is_log_of("ipcontroller-12.txt", "ipcontroller", ""));
        assert!(is_log_of("ipengine-mpi-8.log", "ipengine", ""));
        assert!(is_log_of("ipengine-c1-ssh-10.0.0.2-0.log", "ipengine", "c1"));
        assert!(!is_log_of("ipengine-c1-ssh-10.0.0.2-0.log", "ipengine", ""));
        assert!(!is_log_of("ipengine-ssh--0.log", "ipengine", ""));
        assert!(!is_log_of("ipengine-mpi-x.log", "ipengine", ""));
        let p = Profile { name: "d".into(), dir: "/r/profile_d".into(), cluster_id: "c1".into() };
        assert_eq!(log_path(&p, "ipengine", 4), PathBuf::from("/r/profile_d/log/ipengine-c1-4.log"));
    }

    #[test]
    fn finds_cluster_files_of_every_profile() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "profile_a/security/cluster.json",
            "profile_b/security/cluster-c1.json",
            "profile_b/security/ipcontroller-client.json",
            "other/security/cluster.json",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "{}").unwrap();
        }
        let found: Vec<_> = all_cluster_files(dir.path()).iter().map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf()).collect();
        assert_eq!(found, vec![PathBuf::from("profile_a/security/cluster.json"), PathBuf::from("profile_b/security/cluster-c1.json")]);
        assert!(!is_cluster_file_name("cluster-.json"));
    }
}
