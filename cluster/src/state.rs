//! The cluster state file (`security/cluster[-cid].json`): which processes make up a running
//! cluster, read by `stop`, `list` and `engines`; plus the pure decisions made from it
//! (is the cluster still running, which log files belong to it).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use rpx_protocol::connection::{read_json, write_private_json};
use rpx_protocol::Profile;

/// One engine process started by ipcluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineProc {
    pub pid: u32,
    /// Position in start order (0, 1, ...), continued by `ipcluster engines`. Not the engine
    /// id the controller assigns.
    pub index: usize,
    #[serde(default)]
    pub log: PathBuf,
}

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
    #[serde(default)]
    pub engines: Vec<EngineProc>,
    /// ISO-8601 UTC.
    pub started: String,
    /// The foreground `ipcluster start` process; absent with `--daemonize`.
    #[serde(default)]
    pub ipcluster_pid: Option<u32>,
    /// Value of `RPX_CLUSTER_INSTANCE` in every process ipcluster started (and so in their
    /// children): `stop` finds stragglers by it.
    #[serde(default)]
    pub instance: String,
    #[serde(default = "local")]
    pub launcher: String,
    #[serde(default)]
    pub controller_log: PathBuf,
    #[serde(default)]
    pub compiler_log: PathBuf,
    #[serde(default)]
    pub client_file: PathBuf,
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

    /// The next engine index for `ipcluster engines`.
    pub fn next_index(&self) -> usize {
        self.engines.iter().map(|e| e.index + 1).max().unwrap_or(0)
    }

    /// Every pid recorded, controller first.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.controller_pid];
        v.extend(self.compiler_pid);
        v.extend(self.engines.iter().map(|e| e.pid));
        v
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
/// controller and compiler logs end in the launching pid the same way.
pub fn is_log_of(name: &str, prog: &str, cid: &str) -> bool {
    let base = if cid.is_empty() { format!("{prog}-") } else { format!("{prog}-{cid}-") };
    let Some(rest) = name.strip_prefix(&base) else { return false };
    let Some(num) = rest.strip_suffix(".log") else { return false };
    !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit())
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
            started: "2026-01-01T00:00:00.000000Z".into(),
            ipcluster_pid: None,
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
        let p = Profile { name: "d".into(), dir: "/r/profile_d".into(), cluster_id: "c1".into() };
        assert_eq!(log_path(&p, "ipengine", 4), PathBuf::from("/r/profile_d/log/ipengine-c1-4.log"));
    }

    #[test]
    fn finds_cluster_files_of_every_profile() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["profile_a/security/cluster.json", "profile_b/security/cluster-c1.json", "profile_b/security/ipcontroller-client.json", "other/security/cluster.json"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "{}").unwrap();
        }
        let found: Vec<_> = all_cluster_files(dir.path()).iter().map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf()).collect();
        assert_eq!(found, vec![PathBuf::from("profile_a/security/cluster.json"), PathBuf::from("profile_b/security/cluster-c1.json")]);
        assert!(!is_cluster_file_name("cluster-.json"));
    }
}
