//! `ipcluster stop`: stop a cluster's engines (whatever launchers started them), compiler and
//! controller with no orphans, and remove its cluster and connection files.
//!
//! Order: a foreground `ipcluster` first (it stops its own cluster), then every launcher's
//! stop (SIGTERM to the local engines' and mpiexecs' process groups; for ssh, the remote kill
//! on every host, then SIGTERM to the ssh groups), so engines can unregister while the
//! controller still listens; then SIGTERM to the compiler's and the controller's groups; after
//! ~5 s SIGKILL to whatever is left in those groups or carries the cluster's instance tag
//! (workers, relays and MPI ranks included); a compiler that had to be killed leaves its work
//! directory, which is removed then.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::{self, StopArgs, Target};
use crate::launcher::{self, local::Local, Launcher};
use crate::procs;
use crate::state::{self, ClusterState};
use crate::Fail;
use rpx_protocol::Profile;

/// What one stop did.
#[derive(Debug, Default)]
pub struct StopReport {
    /// Recorded members that were alive when the stop began: (role, pid), for the
    /// controller, the compiler and local engines (`engine 3`).
    pub was_alive: Vec<(String, u32)>,
    /// Launches of the other launchers alive when the stop began: `mpiexec (pid 456, 4
    /// ranks)`, `ssh to h1 (pid 123, 2 engines)`.
    pub launches: Vec<String>,
    /// Live processes of the cluster (members, their workers and relays) when the stop began.
    pub processes_before: usize,
    /// Processes that needed SIGKILL.
    pub killed: usize,
    /// The foreground `ipcluster` that was asked to stop its cluster.
    pub foreground: Option<u32>,
    /// Processes still alive after SIGKILL (should be empty).
    pub survivors: Vec<u32>,
}

/// The profile a cluster file belongs to, from where the file lives.
pub fn profile_of(file: &Path, st: &ClusterState) -> Profile {
    let dir = file.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| st.profile_dir.clone());
    Profile { name: st.profile.clone(), dir, cluster_id: st.cluster_id.clone() }
}

/// Stop every process of the cluster. `from_foreground` is set when the foreground
/// `ipcluster` stops its own cluster (so it does not signal itself).
pub fn stop_state(st: &ClusterState, from_foreground: bool) -> StopReport {
    let mut report = StopReport::default();
    note_alive(st, &mut report);
    if !from_foreground {
        stop_foreground(st, &mut report);
    }
    let all_groups: Vec<u32> = st.pids();
    report.processes_before = procs::members(&all_groups, &st.instance).len();
    let start = Instant::now();
    let work_dir = compiler_work_dir(st);

    launcher::stop_all(st);
    let launch_groups = st.launch_pids();
    procs::wait_until(Duration::from_secs(2), || procs::members(&launch_groups, "").is_empty());
    for g in st.compiler_pid.iter().chain([&st.controller_pid]) {
        if !procs::members(&[*g], "").is_empty() {
            procs::signal_group(*g, libc::SIGTERM);
        }
    }
    let rest = Duration::from_secs(5).saturating_sub(start.elapsed()).max(Duration::from_millis(500));
    procs::wait_until(rest, || procs::members(&all_groups, &st.instance).is_empty());
    kill_rest(st, &all_groups, &mut report);
    // Engines killed here (or before, unsupervised) could not remove their namespaces.
    rpx_protocol::connection::sweep_dead_namespaces();
    // A compiler that had to be killed could not remove its work directory (evcxr's builds).
    if let Some(dir) = work_dir {
        let _ = crate::supervise::remove_work_dir(&dir);
    }
    report
}

/// The work directory the running compiler named in its connection file (if that file is the
/// recorded compiler's).
fn compiler_work_dir(st: &ClusterState) -> Option<std::path::PathBuf> {
    let profile = Profile { name: st.profile.clone(), dir: st.profile_dir.clone(), cluster_id: st.cluster_id.clone() };
    let conn: rpx_protocol::connection::CompilerConnection = rpx_protocol::connection::read_json(&profile.compiler_file()).ok()?;
    (Some(conn.pid) == st.compiler_pid).then_some(conn.work_dir).flatten()
}

/// Which recorded members are alive before anything is signalled.
fn note_alive(st: &ClusterState, report: &mut StopReport) {
    for (kind, r) in launcher::all_records(st) {
        if r.leader().is_none() {
            // A batch job: cancelled through its scheduler, whatever its state.
            report.launches.push(format!("{kind} {} ({}, cancelled)", r.label(), r.count()));
            continue;
        }
        let Some(pid) = r.leader().filter(|_| r.alive(&st.instance)) else { continue };
        if kind == Local::KIND {
            report.was_alive.push((r.label(), pid));
        } else {
            report.launches.push(format!("{} (pid {pid}, {})", r.label(), r.count()));
        }
    }
    for (role, pid, prog) in
        st.compiler_pid.map(|c| ("compiler", c, "rpx-compiler")).into_iter().chain([("controller", st.controller_pid, "ipcontroller")])
    {
        if procs::is_proc(pid, prog) {
            report.was_alive.push((role.to_string(), pid));
        }
    }
}

/// The supervising `ipcluster` (foreground, or the detached supervisor of `--daemonize`) stops
/// its own cluster, so it restarts nothing while the rest is stopped; give it time to do so,
/// and SIGKILL it if it did not (the members are then stopped from here).
fn stop_foreground(st: &ClusterState, report: &mut StopReport) {
    let me = std::process::id();
    if let Some(p) = st.ipcluster_pid.filter(|p| *p != me && procs::is_proc(*p, "ipcluster")) {
        report.foreground = Some(p);
        procs::signal(p, libc::SIGTERM);
        if !procs::wait_until(Duration::from_secs(12), || !procs::alive(p)) {
            procs::signal(p, libc::SIGKILL);
            report.killed += 1;
            procs::wait_until(Duration::from_secs(2), || !procs::alive(p));
        }
    }
}

/// SIGKILL whatever is left in the cluster's groups or carries its tag.
fn kill_rest(st: &ClusterState, all_groups: &[u32], report: &mut StopReport) {
    let left = procs::members(all_groups, &st.instance);
    if left.is_empty() {
        return;
    }
    report.killed += left.len();
    for g in all_groups {
        procs::signal_group(*g, libc::SIGKILL);
    }
    for p in &left {
        procs::signal(*p, libc::SIGKILL);
    }
    procs::wait_until(Duration::from_secs(3), || procs::members(all_groups, &st.instance).is_empty());
    report.survivors = procs::members(all_groups, &st.instance);
}

/// Remove the cluster file (and its lock file) and the connection files of `profile`'s
/// cluster.
pub fn remove_files(profile: &Profile) {
    for f in [
        profile.cluster_file(),
        state::lock_path(&profile.cluster_file()),
        profile.client_file(),
        profile.engine_file(),
        profile.compiler_file(),
    ] {
        let _ = std::fs::remove_file(f);
    }
}

/// One line describing what was stopped.
pub fn summary(st: &ClusterState, report: &StopReport) -> String {
    let engines: Vec<String> = report.was_alive.iter().filter(|(r, _)| r.starts_with("engine")).map(|(_, p)| p.to_string()).collect();
    let mut parts = Vec::new();
    for role in ["controller", "compiler"] {
        if let Some((_, p)) = report.was_alive.iter().find(|(r, _)| r == role) {
            parts.push(format!("{role} (pid {p})"));
        }
    }
    if !engines.is_empty() {
        parts.push(format!("{} engine{} (pids {})", engines.len(), if engines.len() == 1 { "" } else { "s" }, engines.join(", ")));
    }
    parts.extend(report.launches.iter().cloned());
    let mut line = format!("stopped cluster ({}): {}", cli::describe(&st.profile, &st.cluster_id), parts.join(", "));
    if let Some(p) = report.foreground {
        line.push_str(&format!(" (through its supervising ipcluster, pid {p})"));
    }
    if report.killed > 0 {
        line.push_str(&format!("; {} process(es) ignored SIGTERM and were killed", report.killed));
    }
    line
}

pub fn stop(args: StopArgs) -> anyhow::Result<i32> {
    let target = Target::new(&args.cluster)?;
    let files = if args.all {
        state::cluster_files_in(&target.profile.security_dir())
    } else {
        let f = target.profile.cluster_file();
        if f.exists() {
            vec![f]
        } else {
            Vec::new()
        }
    };
    if files.is_empty() {
        let what = if args.all { format!("profile {}", target.profile.name) } else { target.describe() };
        return Err(Fail::new(
            1,
            format!("no cluster is running under {what} (no cluster file in {})", target.profile.security_dir().display()),
        )
        .into());
    }
    let mut stopped_any = false;
    let mut problems = Vec::new();
    for file in files {
        let st = match ClusterState::read(&file) {
            Ok(st) => st,
            Err(e) => {
                let _ = std::fs::remove_file(&file);
                problems.push(format!("{e:#}; removed it"));
                continue;
            }
        };
        let profile = profile_of(&file, &st);
        let report = stop_state(&st, false);
        remove_files(&profile);
        if !report.was_alive.iter().any(|(r, _)| r == "controller") && report.foreground.is_none() {
            let leftovers = if report.processes_before > 0 {
                format!("stopped {} leftover process(es), ", report.processes_before)
            } else {
                String::new()
            };
            problems.push(format!(
                "no cluster is running under {} (its controller had already exited; {leftovers}removed the stale cluster file)",
                cli::describe(&st.profile, &st.cluster_id)
            ));
            continue;
        }
        stopped_any = true;
        println!("{}", summary(&st, &report));
        if !report.survivors.is_empty() {
            problems.push(format!("processes {:?} survived SIGKILL", report.survivors));
        }
    }
    for p in &problems {
        eprintln!("ipcluster: {p}");
    }
    Ok(if stopped_any && problems.iter().all(|p| !p.contains("survived")) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::mpi::{Flavour, MpiLaunch};
    use crate::state::EngineProc;

    fn sh(script: &str, log: &Path, instance: &str) -> std::process::Child {
        procs::spawn(Path::new("/bin/sh"), &["-c".into(), script.into()], log, instance, &[]).unwrap()
    }

    fn state(dir: &Path, instance: &str, controller: u32) -> ClusterState {
        ClusterState {
            profile: "t".into(),
            cluster_id: String::new(),
            profile_dir: dir.into(),
            controller_pid: controller,
            compiler_pid: None,
            engines: Vec::new(),
            mpi: Vec::new(),
            ssh: Vec::new(),
            slurm: Vec::new(),
            sge: Vec::new(),
            pbs: Vec::new(),
            started: String::new(),
            ipcluster_pid: None,
            supervision: None,
            instance: instance.into(),
            launcher: "local".into(),
            controller_log: Default::default(),
            compiler_log: Default::default(),
            client_file: Default::default(),
        }
    }

    #[test]
    fn stop_kills_whole_groups_even_when_term_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let instance = uuid::Uuid::new_v4().to_string();
        // A "controller" that exits on TERM, and an "engine" that ignores TERM and has a worker.
        let mut ctl = sh("sleep 1000 & wait", &dir.path().join("c.log"), &instance);
        let mut eng = sh("trap '' TERM; sh -c 'trap \"\" TERM; sleep 1000' & sleep 1000 & wait", &dir.path().join("e.log"), &instance);
        assert!(procs::wait_until(Duration::from_secs(5), || procs::members(&[], &instance).len() >= 5));
        let mut st = state(dir.path(), &instance, ctl.id());
        st.engines = vec![EngineProc { pid: eng.id(), index: 0, log: dir.path().join("e.log") }];
        let report = stop_state(&st, true);
        let _ = ctl.wait();
        let _ = eng.wait();
        assert!(report.killed >= 3, "the engine, its worker and its sleep ignored TERM: {report:?}");
        assert!(report.survivors.is_empty());
        assert!(procs::members(&st.pids(), &instance).is_empty(), "no orphan survives");
    }

    #[test]
    fn stop_ends_launches_and_ranks_outside_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let instance = uuid::Uuid::new_v4().to_string();
        let mut ctl = sh("sleep 1000 & wait", &dir.path().join("c.log"), &instance);
        // A stand-in for MPICH's mpiexec: its "ranks" run in sessions of their own, so only the
        // instance tag finds them.
        let mut mpiexec = sh("setsid sleep 1000 & setsid sleep 1000 & wait", &dir.path().join("m.log"), &instance);
        assert!(procs::wait_until(Duration::from_secs(5), || procs::members(&[], &instance).len() >= 5));
        let mut st = state(dir.path(), &instance, ctl.id());
        st.mpi = vec![MpiLaunch {
            pid: mpiexec.id(),
            first_index: 0,
            n: 2,
            log: dir.path().join("m.log"),
            mpiexec: "/bin/sh".into(),
            flavour: Flavour::Other,
        }];
        let report = stop_state(&st, true);
        let _ = ctl.wait();
        let _ = mpiexec.wait();
        assert_eq!(report.launches, vec![format!("mpiexec (pid {}, 2 ranks)", mpiexec.id())]);
        assert!(report.survivors.is_empty());
        assert!(procs::members(&st.pids(), &instance).is_empty(), "no rank survives");
        let line = summary(&st, &report);
        assert!(line.starts_with("stopped cluster (profile t): "), "{line}");
        assert!(line.ends_with(&format!("mpiexec (pid {}, 2 ranks)", mpiexec.id())) || line.contains("ignored SIGTERM"), "{line}");
    }

    #[test]
    fn summary_lists_every_launcher() {
        let st = state(Path::new("/r"), "x", 1);
        let report = StopReport {
            was_alive: vec![("engine 0".into(), 3), ("compiler".into(), 2), ("controller".into(), 1)],
            launches: vec!["mpiexec (pid 5, 4 ranks)".into(), "ssh to h1 (pid 6, 2 engines)".into()],
            ..Default::default()
        };
        assert_eq!(
            summary(&st, &report),
            "stopped cluster (profile t): controller (pid 1), compiler (pid 2), 1 engine (pids 3), mpiexec (pid 5, 4 ranks), ssh to h1 (pid 6, 2 engines)"
        );
    }
}
