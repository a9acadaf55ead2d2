//! Launchers: the ways `ipcluster` starts engines (`--engines local|mpi|ssh`), behind one
//! trait, [`Launcher`], as HyperQueue's `QueueHandler` puts schedulers behind one.
//!
//! A launcher starts N engines as one or more *launches* (local: one process per engine;
//! mpi: one `mpiexec`; ssh: one ssh connection per host; a batch scheduler would make one job
//! per submission). Each launch is recorded in the cluster file ([`ClusterState`]) as the
//! launcher's own [`Record`] type, so `ipcluster list` asks each launcher for the status of all
//! of its launches at once ([`Launcher::status`]) and `ipcluster stop` asks it to end them
//! ([`Launcher::stop`]), whichever `ipcluster start` or `ipcluster engines` made them. Output of
//! every launch goes to a log file on the launching host ([`Record::log`]).
//!
//! This module also holds what the launching process keeps about the launches it just made
//! ([`Batch`]: their records and local children, watched while the engines register) and the
//! walks over every launcher's records of a cluster ([`stop_all`], [`status_all`], ...).
//!
//! - [`local`]: one `ipengine` process per engine on this host.
//! - [`mpi`]: one `mpiexec -n N ipengine --mpi`, Open MPI or MPICH.
//! - [`ssh`]: one ssh connection per host whose life is the life of that host's engines.
//! - [`hosts`]: `--hosts` / `--hostfile` parsing and placing engines on hosts.
//! - [`batch`]: what the batch schedulers share (job options, job scripts rendered through a
//!   template, submission records, job states, the generic [`batch::BatchLauncher`]);
//!   [`slurm`], [`sge`] and [`pbs`]: each scheduler's script dialect, ids and status parsing.

pub mod batch;
pub mod hosts;
pub mod local;
pub mod mpi;
pub mod pbs;
pub mod sge;
pub mod slurm;
pub mod ssh;

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use serde::Serialize;

use crate::procs;
use crate::state::ClusterState;
use rpx_protocol::connection::ConnectionInfo;
use rpx_protocol::Profile;

/// Each engine gets its start index (0, 1, ...; `ipcluster engines` continues the count) in
/// this environment variable, which its worker inherits: code on the engine can read it.
/// (`ipengine --mpi` sets it itself from its rank.)
pub const ENGINE_INDEX_ENV: &str = "RPX_ENGINE_INDEX";

/// Arguments that name the cluster to a member started on this host: `--profile P
/// [--cluster-id C]`.
pub fn profile_args(profile: &Profile) -> Vec<String> {
    let mut a = vec!["--profile".to_string(), profile.name.clone()];
    if !profile.cluster_id.is_empty() {
        a.push("--cluster-id".into());
        a.push(profile.cluster_id.clone());
    }
    a
}

/// What a launcher is given to start engines.
pub struct LaunchCtx<'a> {
    pub profile: &'a Profile,
    /// The cluster's `RPX_CLUSTER_INSTANCE`.
    pub instance: &'a str,
    /// The `ipengine` next to this `ipcluster`.
    pub engine_bin: &'a Path,
    /// `RPX_CONNECTION_INFO` (one line of JSON; holds the key: never on a command line).
    /// Present for launchers with [`Launcher::NEEDS_CONNECTION_INFO`].
    pub connection: Option<&'a str>,
}

impl LaunchCtx<'_> {
    /// The connection info, for launchers that declared they need it.
    pub fn connection(&self) -> anyhow::Result<&str> {
        self.connection.ok_or_else(|| anyhow::anyhow!("internal error: no connection info for remote engines"))
    }
}

/// One launch as recorded in the cluster file: what every launcher's record tells.
pub trait Record {
    /// The local process holding this launch (a session and process-group leader), if any;
    /// a batch job would have none.
    fn leader(&self) -> Option<u32>;
    /// Start indices of the engines this launch started.
    fn indices(&self) -> Range<usize>;
    /// Where its output goes, on the launching host.
    fn log(&self) -> &Path;
    /// `engine 3`, `mpiexec`, `ssh to h1`: for messages.
    fn label(&self) -> String;
    /// `2 engines`, `4 ranks`: for messages.
    fn count(&self) -> String {
        let n = self.indices().len();
        format!("{n} engine{}", if n == 1 { "" } else { "s" })
    }
    /// Is the local process holding it alive? (Checked by the instance tag: a reused pid does
    /// not count.)
    fn alive(&self, instance: &str) -> bool {
        self.leader().is_some_and(|p| procs::is_member(p, instance))
    }
}

/// A launch this process has just made: its record and its local child, if it has one.
pub struct Spawned<R> {
    pub record: R,
    pub child: Option<Child>,
}

/// What `ipcluster list` shows of one launch (for `local`: of all local engines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchStatus {
    /// `local`, `mpi` or `ssh`.
    pub launcher: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub first_index: usize,
    /// Engines started.
    pub engines: usize,
    /// Local processes holding the launch (local: the engines; mpi: mpiexec; ssh: ssh).
    pub pids: Vec<u32>,
    /// How many of `pids` are alive.
    pub alive: usize,
    /// Engine pids on the remote host (ssh).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_pids: Vec<u32>,
    /// This launch's engines the controller reports, when that can be told (mpi: engines
    /// registered with ids in its index range, as `ipengine --mpi` asks for).
    pub registered: Option<usize>,
    pub logs: Vec<PathBuf>,
    /// The batch scheduler's job id (slurm, sge, pbs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The job's state as the scheduler reports it: `running on h1,h2`, `pending (Resources)`,
    /// `CANCELLED`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl LaunchStatus {
    /// `ssh 10.0.0.2: 2 engines (ssh pid 123)`, `mpi: 4 ranks (mpiexec pid 456)`.
    pub fn line(&self) -> String {
        if let Some(job) = &self.job {
            let n = self.engines;
            let mut line = format!(
                "{} job {job}: {n} engine{} (ids {}..{}), {}",
                self.launcher,
                if n == 1 { "" } else { "s" },
                self.first_index,
                self.first_index + n,
                self.state.as_deref().unwrap_or("unknown")
            );
            if let Some(r) = self.registered {
                line.push_str(&format!(", {r} registered"));
            }
            if let Some(log) = self.logs.first() {
                line.push_str(&format!("; output {}", log.display()));
            }
            return line;
        }
        let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
        let (what, holder) = match self.launcher {
            "local" => (format!("{} engine{}", self.engines, if self.engines == 1 { "" } else { "s" }), format!("pids {}", pids.join(","))),
            "mpi" => {
                (format!("{} rank{}", self.engines, if self.engines == 1 { "" } else { "s" }), format!("mpiexec pid {}", pids.join(",")))
            }
            other => {
                (format!("{} engine{}", self.engines, if self.engines == 1 { "" } else { "s" }), format!("{other} pid {}", pids.join(",")))
            }
        };
        let mut line = match &self.host {
            Some(h) => format!("{} {h}: {what} ({holder}", self.launcher),
            None => format!("{}: {what} ({holder}", self.launcher),
        };
        if !self.remote_pids.is_empty() {
            let r: Vec<String> = self.remote_pids.iter().map(u32::to_string).collect();
            line.push_str(&format!(", remote pids {}", r.join(",")));
        }
        line.push(')');
        if self.alive < self.pids.len() {
            line.push_str(if self.pids.len() == 1 { ", exited" } else { ", some exited" });
            if self.pids.len() > 1 {
                line.push_str(&format!(" ({} of {} alive)", self.alive, self.pids.len()));
            }
        }
        if let Some(r) = self.registered {
            line.push_str(&format!(", {r} registered"));
        }
        line
    }
}

/// A way of starting engines. `start` needs the launcher's options; everything else works
/// from the records alone, since `ipcluster stop` and `list` have nothing but the cluster file.
pub trait Launcher {
    /// What one launch leaves in the cluster file.
    type Record: Record + Clone;
    /// The `--engines` value.
    const KIND: &'static str;
    /// The engines get `RPX_CONNECTION_INFO`, so `start` must first wait for the compiler's
    /// connection file (the local launcher's engines read the files themselves).
    const NEEDS_CONNECTION_INFO: bool;

    /// This launcher's records in the cluster file.
    fn records(st: &ClusterState) -> &[Self::Record];
    fn records_mut(st: &mut ClusterState) -> &mut Vec<Self::Record>;

    /// Check what the launcher needs (its programs) before anything is started.
    fn prepare(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// A warning about the connection info the engines will get (ssh: a controller on
    /// loopback that other hosts cannot reach).
    fn warning(&self, _info: &ConnectionInfo) -> Option<String> {
        None
    }
    /// Start `n` engines with start indices `first..first + n`.
    fn start(&self, ctx: &LaunchCtx, first: usize, n: usize) -> anyhow::Result<Vec<Spawned<Self::Record>>>;
    /// Learn what a running launch reports about itself after it started (ssh: the remote
    /// engine pids). Returns whether the record changed.
    fn observe(_rec: &mut Self::Record) -> bool {
        false
    }
    /// Whether [`observe`](Launcher::observe) has nothing left to learn.
    fn settled(_rec: &Self::Record) -> bool {
        true
    }
    /// Why a launch whose local process exited before its engines registered failed, and
    /// what to do.
    fn explain_exit(rec: &Self::Record, status: ExitStatus) -> String {
        let pid = rec.leader().map(|p| format!(" (pid {p})")).unwrap_or_default();
        format!("{}{pid} exited with {status}\n{}", rec.label(), procs::tail_block(&format!("{} log", rec.label()), rec.log()))
    }
    /// A launch that failed or ended without a local process to tell it (batch jobs: the
    /// scheduler's state), explained; polled at most once a second while engines register.
    fn failed(_records: &[Self::Record]) -> Option<String> {
        None
    }
    /// The logs to show when engines did not register in time.
    fn explain_timeout(records: &[Self::Record]) -> String {
        records.first().map(|r| procs::tail_block(&format!("{} log", r.label()), r.log())).unwrap_or_default()
    }
    /// The status of all of this launcher's launches at once (`registered`: the engine ids
    /// the controller reports, if it could be asked).
    fn status(records: &[Self::Record], instance: &str, registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus>;
    /// Ask every launch to end (the polite phase, bounded in time): `stop` then waits, and
    /// SIGKILLs what is left in the leaders' process groups or carries the instance tag.
    fn stop(records: &[Self::Record], instance: &str);
}

/// SIGTERM the process group of each launch's leader that still has a live member.
pub fn term_leaders<R: Record>(records: &[R]) {
    for g in records.iter().filter_map(Record::leader) {
        if !procs::members(&[g], "").is_empty() {
            procs::signal_group(g, libc::SIGTERM);
        }
    }
}

/// Start one launch per item; if one fails, SIGKILL the ones already started and fail.
pub fn start_each<I, R: Record>(
    items: impl IntoIterator<Item = I>,
    mut one: impl FnMut(I) -> anyhow::Result<Spawned<R>>,
) -> anyhow::Result<Vec<Spawned<R>>> {
    let mut out = Vec::new();
    for item in items {
        match one(item) {
            Ok(s) => out.push(s),
            Err(e) => {
                kill_spawned(&mut out);
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// SIGKILL the process groups of launches this process made, and reap them.
pub fn kill_spawned<R: Record>(spawned: &mut [Spawned<R>]) {
    for s in spawned.iter_mut() {
        if let Some(p) = s.record.leader() {
            procs::signal_group(p, libc::SIGKILL);
        }
        if let Some(c) = s.child.as_mut() {
            let _ = c.wait();
        }
    }
}

/// Every launch record of a cluster, whatever its launcher: `(kind, record)`.
pub fn all_records(st: &ClusterState) -> Vec<(&'static str, &dyn Record)> {
    let mut v: Vec<(&'static str, &dyn Record)> = Vec::new();
    v.extend(st.engines.iter().map(|r| (local::Local::KIND, r as &dyn Record)));
    v.extend(st.mpi.iter().map(|r| (mpi::Mpi::KIND, r as &dyn Record)));
    v.extend(st.ssh.iter().map(|r| (ssh::Ssh::KIND, r as &dyn Record)));
    v.extend(st.slurm.iter().map(|r| ("slurm", r as &dyn Record)));
    v.extend(st.sge.iter().map(|r| ("sge", r as &dyn Record)));
    v.extend(st.pbs.iter().map(|r| ("pbs", r as &dyn Record)));
    v
}

/// The batch launchers.
pub type SlurmLauncher = batch::BatchLauncher<slurm::Slurm>;
pub type SgeLauncher = batch::BatchLauncher<sge::Sge>;
pub type PbsLauncher = batch::BatchLauncher<pbs::Pbs>;

/// The status of every launch of a cluster, launcher by launcher.
pub fn status_all(st: &ClusterState, registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus> {
    let mut v = local::Local::status(&st.engines, &st.instance, registered);
    v.extend(mpi::Mpi::status(&st.mpi, &st.instance, registered));
    v.extend(ssh::Ssh::status(&st.ssh, &st.instance, registered));
    v.extend(SlurmLauncher::status(&st.slurm, &st.instance, registered));
    v.extend(SgeLauncher::status(&st.sge, &st.instance, registered));
    v.extend(PbsLauncher::status(&st.pbs, &st.instance, registered));
    v
}

/// Ask every launch of a cluster to end (local and mpi at once, then ssh's remote kills).
pub fn stop_all(st: &ClusterState) {
    local::Local::stop(&st.engines, &st.instance);
    mpi::Mpi::stop(&st.mpi, &st.instance);
    ssh::Ssh::stop(&st.ssh, &st.instance);
    SlurmLauncher::stop(&st.slurm, &st.instance);
    SgeLauncher::stop(&st.sge, &st.instance);
    PbsLauncher::stop(&st.pbs, &st.instance);
}

/// What the launching process keeps about the launches it just made: their records (the
/// cluster file holds copies from position `at` of the launcher's records) and children.
pub struct Batch<L: Launcher> {
    pub at: usize,
    pub spawned: Vec<Spawned<L::Record>>,
    /// Leaders whose exit was already reported.
    reported: Vec<u32>,
    /// When [`Launcher::failed`] was last asked.
    polled: Option<std::time::Instant>,
}

impl<L: Launcher> Batch<L> {
    /// Nothing launched yet; launches will be recorded after the `st`'s current ones.
    pub fn new(st: &ClusterState) -> Batch<L> {
        Batch { at: L::records(st).len(), spawned: Vec::new(), reported: Vec::new(), polled: None }
    }

    /// Copy the records into the cluster state (replacing earlier copies).
    pub fn record_into(&self, st: &mut ClusterState) {
        let recs = L::records_mut(st);
        recs.truncate(self.at);
        recs.extend(self.spawned.iter().map(|s| s.record.clone()));
    }

    pub fn records(&self) -> Vec<L::Record> {
        self.spawned.iter().map(|s| s.record.clone()).collect()
    }

    /// The first launch whose local process exited, explained.
    pub fn exited(&mut self) -> Option<String> {
        let exit = self.spawned.iter_mut().find_map(|s| {
            let status = s.child.as_mut()?.try_wait().ok()??;
            Some(L::explain_exit(&s.record, status))
        });
        if exit.is_some() {
            return exit;
        }
        if self.polled.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        self.polled = Some(std::time::Instant::now());
        L::failed(&self.records())
    }

    /// Launches whose local process exited since the last call: one line each, for a
    /// foreground `ipcluster`.
    pub fn newly_exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.spawned.iter_mut() {
            let Some(pid) = s.record.leader() else { continue };
            if self.reported.contains(&pid) {
                continue;
            }
            if let Some(Ok(Some(status))) = s.child.as_mut().map(Child::try_wait) {
                self.reported.push(pid);
                out.push(format!("{} (pid {pid}) exited with {status}; see {}", s.record.label(), s.record.log().display()));
            }
        }
        out
    }

    /// Let each launch report what it learned; true if any record changed.
    pub fn observe(&mut self) -> bool {
        let mut changed = false;
        for s in self.spawned.iter_mut().filter(|s| !L::settled(&s.record)) {
            changed |= L::observe(&mut s.record);
        }
        changed
    }

    /// Observe until every launch is settled or `limit` passes; true if a record changed.
    pub fn settle(&mut self, limit: Duration) -> bool {
        let mut changed = false;
        procs::wait_until(limit, || {
            changed |= self.observe();
            self.all_settled()
        });
        changed
    }

    pub fn all_settled(&self) -> bool {
        self.spawned.iter().all(|s| L::settled(&s.record))
    }

    pub fn explain_timeout(&self) -> String {
        L::explain_timeout(&self.records())
    }

    /// Hand the local children over (to the supervisor), by their leader's pid.
    pub fn take_children(&mut self) -> std::collections::HashMap<u32, Child> {
        self.spawned.iter_mut().filter_map(|s| Some((s.record.leader()?, s.child.take()?))).collect()
    }

    /// Reap children that exited (no zombies while the foreground `ipcluster` runs on).
    pub fn reap(&mut self) {
        for c in self.spawned.iter_mut().filter_map(|s| s.child.as_mut()) {
            let _ = c.try_wait();
        }
    }

    /// End these launches only (a failed `ipcluster engines`), leaving the cluster running.
    pub fn end(&mut self, instance: &str) {
        L::stop(&self.records(), instance);
        kill_spawned(&mut self.spawned);
    }
}

/// The program a launcher runs (`command`: a name on PATH or a path), or a failure naming the
/// Debian package that has it and the option that picks another.
pub fn require_program(command: &str, default: &str, launcher: &str, package: &str, option: &str) -> anyhow::Result<PathBuf> {
    procs::find_program(command).ok_or_else(|| {
        let what =
            if command == default { format!("{default} on PATH") } else { format!("{default}, and {option} {command:?} is not a program") };
        crate::Fail::new(1, format!("--engines {launcher} needs {what} (Debian: apt-get install {package}), or pass {option}")).into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(launcher: &'static str, host: Option<&str>, alive: usize) -> LaunchStatus {
        LaunchStatus {
            launcher,
            host: host.map(str::to_string),
            first_index: 0,
            engines: 2,
            pids: vec![123],
            alive,
            remote_pids: Vec::new(),
            registered: None,
            logs: Vec::new(),
            job: None,
            state: None,
        }
    }

    #[test]
    fn status_lines_read_as_a_user_expects() {
        assert_eq!(status("ssh", Some("10.0.0.2"), 1).line(), "ssh 10.0.0.2: 2 engines (ssh pid 123)");
        let mut s = status("ssh", Some("h1"), 0);
        s.remote_pids = vec![7, 8];
        assert_eq!(s.line(), "ssh h1: 2 engines (ssh pid 123, remote pids 7,8), exited");
        let mut m = status("mpi", None, 1);
        m.engines = 4;
        m.pids = vec![456];
        m.registered = Some(3);
        assert_eq!(m.line(), "mpi: 4 ranks (mpiexec pid 456), 3 registered");
        let mut l = status("local", None, 1);
        l.pids = vec![1, 2];
        assert_eq!(l.line(), "local: 2 engines (pids 1,2), some exited (1 of 2 alive)");
        let mut j = status("slurm", None, 1);
        j.pids = Vec::new();
        j.job = Some("42".into());
        j.state = Some("running on h1,h2".into());
        j.registered = Some(2);
        j.logs = vec!["/p/log/ipengine-slurm-0.log".into()];
        assert_eq!(j.line(), "slurm job 42: 2 engines (ids 0..2), running on h1,h2, 2 registered; output /p/log/ipengine-slurm-0.log");
    }
}
