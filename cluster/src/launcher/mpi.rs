//! `--engines mpi [--mpi-args ARGS] [--mpiexec CMD]`: one `mpiexec -n N [ARGS] ipengine --mpi
//! --id-base <first index>` per launch, spawned like every member (own session, instance tag,
//! log `log/ipengine[-cid]-mpi-<first index>.log`) with `RPX_CONNECTION_INFO` in its
//! environment. Each rank takes its engine id (and `RPX_ENGINE_INDEX`) from its rank plus the
//! id base.
//!
//! The flavour of `mpiexec` is told from `mpiexec --version` ([`detect`]): Open MPI gets
//! `--oversubscribe`, the root permission variables when run as root, and `-x` for every
//! variable remote ranks need; MPICH (Hydra) gets `-genvlist`. Stop: SIGTERM to mpiexec's
//! process group (mpiexec forwards it to every rank), then the usual KILL sweep by group and
//! instance tag (ranks do not stay in mpiexec's group).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{term_leaders, LaunchCtx, LaunchStatus, Launcher, Record, Spawned};
use crate::procs;
use crate::state::{self, ClusterState, INSTANCE_ENV};
use crate::Fail;
use rpx_protocol::connection::CONNECTION_INFO_ENV;

/// Which MPI implementation an `mpiexec` belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// Open MPI (`mpiexec --version` says "Open MPI" or "OpenRTE").
    OpenMpi,
    /// MPICH and other Hydra-based mpiexecs ("HYDRA").
    Mpich,
    /// Unknown: no flavour-specific options.
    #[default]
    Other,
}

/// The flavour from the output of `mpiexec --version`.
pub fn detect(version_text: &str) -> Flavour {
    if version_text.contains("Open MPI") || version_text.contains("OpenRTE") {
        Flavour::OpenMpi
    } else if version_text.contains("HYDRA") {
        Flavour::Mpich
    } else {
        Flavour::Other
    }
}

const OMPI_ROOT_VARS: [&str; 2] = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"];

/// The arguments after the mpiexec program: `[flavour options] -n N [mpi args] ENGINE --mpi
/// --id-base FIRST`. Both flavours also prefix each output line with its rank in the log.
pub fn argv(flavour: Flavour, n: usize, mpi_args: &[String], engine: &Path, first: usize, as_root: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    match flavour {
        Flavour::OpenMpi => {
            a.extend(["--oversubscribe".to_string(), "--tag-output".into()]);
            let mut vars = vec![CONNECTION_INFO_ENV, INSTANCE_ENV];
            if as_root {
                vars.extend(OMPI_ROOT_VARS);
            }
            for v in vars {
                a.extend(["-x".to_string(), v.to_string()]);
            }
        }
        Flavour::Mpich => a.extend(["-prepend-rank".to_string(), "-genvlist".into(), format!("{CONNECTION_INFO_ENV},{INSTANCE_ENV}")]),
        Flavour::Other => {}
    }
    a.extend(["-n".to_string(), n.to_string()]);
    a.extend(mpi_args.iter().cloned());
    a.push(engine.display().to_string());
    a.extend(["--mpi".to_string(), "--id-base".to_string(), first.to_string()]);
    a
}

/// Environment for mpiexec (besides the instance tag every member gets).
pub fn env(flavour: Flavour, connection: &str, as_root: bool) -> Vec<(&'static str, String)> {
    let mut e = vec![(CONNECTION_INFO_ENV, connection.to_string())];
    if flavour == Flavour::OpenMpi && as_root {
        e.extend(OMPI_ROOT_VARS.map(|v| (v, "1".to_string())));
    }
    e
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The mpi launcher: which mpiexec, with which extra arguments.
#[derive(Debug, Clone)]
pub struct Mpi {
    /// `--mpiexec` as given (default `mpiexec`).
    pub command: String,
    /// `--mpi-args`, split like a shell would.
    pub args: Vec<String>,
    /// The program `command` names (set by `prepare`; it is still run as `command`).
    pub path: PathBuf,
    pub flavour: Flavour,
}

impl Mpi {
    pub fn new(command: Option<String>, args: Vec<String>) -> Mpi {
        let command = command.unwrap_or_else(|| "mpiexec".into());
        Mpi { path: PathBuf::from(&command), command, args, flavour: Flavour::Other }
    }
}

/// One mpiexec started by ipcluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpiLaunch {
    /// mpiexec's pid (its own session and process group).
    pub pid: u32,
    pub first_index: usize,
    /// Ranks (engines).
    pub n: usize,
    pub log: PathBuf,
    pub mpiexec: PathBuf,
    #[serde(default)]
    pub flavour: Flavour,
}

impl Record for MpiLaunch {
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
        "mpiexec".into()
    }
    fn count(&self) -> String {
        format!("{} rank{}", self.n, if self.n == 1 { "" } else { "s" })
    }
}

impl Launcher for Mpi {
    type Record = MpiLaunch;
    const KIND: &'static str = "mpi";
    const NEEDS_CONNECTION_INFO: bool = true;

    fn records(st: &ClusterState) -> &[MpiLaunch] {
        &st.mpi
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<MpiLaunch> {
        &mut st.mpi
    }

    /// Find mpiexec and tell its flavour.
    fn prepare(&mut self) -> anyhow::Result<()> {
        self.path = super::require_program(&self.command, "mpiexec", "mpi", "openmpi-bin or mpich", "--mpiexec")?;
        let (_, text) = procs::output_bounded(Command::new(&self.path).arg("--version"), Duration::from_secs(15))
            .map_err(|e| Fail::new(1, format!("cannot run {} --version: {e}", self.path.display())))?;
        self.flavour = detect(&text);
        if self.flavour == Flavour::Other {
            eprintln!(
                "ipcluster: {} --version names neither Open MPI nor MPICH (Hydra); starting it without flavour-specific options",
                self.path.display()
            );
        }
        Ok(())
    }

    fn start(&self, ctx: &LaunchCtx, first: usize, n: usize) -> anyhow::Result<Vec<Spawned<MpiLaunch>>> {
        let root = running_as_root();
        let log = state::log_path(ctx.profile, "ipengine", format!("mpi-{first}"));
        let args = argv(self.flavour, n, &self.args, ctx.engine_bin, first, root);
        // Run it by the name given, as a user would: Open MPI takes an absolute path to mean
        // `--prefix` (and `/bin/mpiexec` would mean the prefix `/`).
        let child = procs::spawn(Path::new(&self.command), &args, &log, ctx.instance, &env(self.flavour, ctx.connection()?, root))?;
        let record = MpiLaunch { pid: child.id(), first_index: first, n, log, mpiexec: self.path.clone(), flavour: self.flavour };
        Ok(vec![Spawned { record, child: Some(child) }])
    }

    fn explain_exit(rec: &MpiLaunch, status: ExitStatus) -> String {
        format!(
            "mpiexec (pid {}) exited with {status} before its {} engines registered\n{}",
            rec.pid,
            rec.n,
            procs::tail_block("mpiexec log", &rec.log)
        )
    }

    /// mpiexec alive, and how many engines with ids in its range the controller reports.
    fn status(records: &[MpiLaunch], instance: &str, registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus> {
        records
            .iter()
            .map(|r| LaunchStatus {
                launcher: Self::KIND,
                host: None,
                first_index: r.first_index,
                engines: r.n,
                pids: vec![r.pid],
                alive: usize::from(r.alive(instance)),
                remote_pids: Vec::new(),
                registered: registered.map(|ids| ids.iter().filter(|id| r.indices().contains(&(**id as usize))).count()),
                logs: vec![r.log.clone()],
                job: None,
                state: None,
            })
            .collect()
    }

    fn stop(records: &[MpiLaunch], _instance: &str) {
        term_leaders(records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours_are_told_from_version_text() {
        assert_eq!(detect("mpiexec (OpenRTE) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/"), Flavour::OpenMpi);
        assert_eq!(detect("mpirun (Open MPI) 5.0.3"), Flavour::OpenMpi);
        assert_eq!(detect("HYDRA build details:\n    Version: 4.0.2"), Flavour::Mpich);
        assert_eq!(detect("Intel(R) MPI Library"), Flavour::Other);
    }

    #[test]
    fn open_mpi_argv_exports_what_remote_ranks_need() {
        let a = argv(Flavour::OpenMpi, 4, &["--host".into(), "a,b".into()], Path::new("/opt/rpx/ipengine"), 8, true);
        assert_eq!(
            a.join(" "),
            "--oversubscribe --tag-output -x RPX_CONNECTION_INFO -x RPX_CLUSTER_INSTANCE -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
             -n 4 --host a,b /opt/rpx/ipengine --mpi --id-base 8"
        );
        let a = argv(Flavour::OpenMpi, 2, &[], Path::new("/e"), 0, false);
        assert_eq!(a.join(" "), "--oversubscribe --tag-output -x RPX_CONNECTION_INFO -x RPX_CLUSTER_INSTANCE -n 2 /e --mpi --id-base 0");
        let e = env(Flavour::OpenMpi, "{\"k\":1}", true);
        assert_eq!(
            e,
            vec![
                ("RPX_CONNECTION_INFO", "{\"k\":1}".to_string()),
                ("OMPI_ALLOW_RUN_AS_ROOT", "1".into()),
                ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".into())
            ]
        );
        assert_eq!(env(Flavour::OpenMpi, "x", false).len(), 1);
    }

    #[test]
    fn mpich_argv_passes_the_variables_with_genvlist() {
        let a = argv(Flavour::Mpich, 3, &["-iface".into(), "br0".into()], Path::new("/e"), 2, true);
        assert_eq!(a.join(" "), "-prepend-rank -genvlist RPX_CONNECTION_INFO,RPX_CLUSTER_INSTANCE -n 3 -iface br0 /e --mpi --id-base 2");
        assert_eq!(env(Flavour::Mpich, "x", true), vec![("RPX_CONNECTION_INFO", "x".to_string())], "Hydra runs as root as is");
        assert_eq!(argv(Flavour::Other, 1, &[], Path::new("/e"), 0, false).join(" "), "-n 1 /e --mpi --id-base 0");
    }

    #[test]
    fn missing_mpiexec_says_what_to_do() {
        let mut m = Mpi::new(Some("/nonexistent/mpiexec".into()), Vec::new());
        let e = m.prepare().unwrap_err();
        let f = e.downcast_ref::<Fail>().unwrap();
        assert_eq!(f.code, 1);
        assert!(f.msg.contains("apt-get install openmpi-bin or mpich") && f.msg.contains("--mpiexec"), "{}", f.msg);
    }

    #[test]
    fn status_counts_registered_ids_in_its_range() {
        let r = MpiLaunch { pid: 0, first_index: 4, n: 3, log: "/l".into(), mpiexec: "/m".into(), flavour: Flavour::Mpich };
        let ids: BTreeSet<u64> = [0, 1, 4, 6, 7].into();
        let s = Mpi::status(&[r], "x", Some(&ids));
        assert_eq!(s[0].registered, Some(2));
        assert_eq!(s[0].alive, 0);
        assert_eq!(s[0].line(), "mpi: 3 ranks (mpiexec pid 0), exited, 2 registered");
    }
}
