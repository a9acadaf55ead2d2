//! `ipcluster stop`: stop a cluster's engines, compiler and controller with no orphans, and
//! remove its cluster and connection files.
//!
//! Order: a foreground `ipcluster` first (it stops its own cluster), then SIGTERM to the
//! engines' process groups (so they can unregister while the controller still listens),
//! then the compiler's and the controller's; after ~5 s SIGKILL to whatever is left in those
//! groups or carries the cluster's instance tag (workers and relays included).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::{self, StopArgs, Target};
use crate::procs;
use crate::state::{self, ClusterState};
use crate::Fail;
use rpx_protocol::Profile;

/// What one stop did.
#[derive(Debug, Default)]
pub struct StopReport {
    /// Recorded members that were alive when the stop began: (role, pid).
    pub was_alive: Vec<(String, u32)>,
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
    let me = std::process::id();
    let mut roles: Vec<(String, u32, &str)> = Vec::new();
    for e in &st.engines {
        roles.push((format!("engine {}", e.index), e.pid, "ipengine"));
    }
    if let Some(c) = st.compiler_pid {
        roles.push(("compiler".into(), c, "rpx-compiler"));
    }
    roles.push(("controller".into(), st.controller_pid, "ipcontroller"));
    for (role, pid, prog) in &roles {
        if procs::is_proc(*pid, prog) {
            report.was_alive.push((role.clone(), *pid));
        }
    }

    if !from_foreground {
        if let Some(p) = st.ipcluster_pid.filter(|p| *p != me && procs::is_proc(*p, "ipcluster")) {
            // The foreground ipcluster stops its own cluster; give it time to do so.
            report.foreground = Some(p);
            procs::signal(p, libc::SIGTERM);
            procs::wait_until(Duration::from_secs(12), || !procs::alive(p));
        }
    }
    let engine_groups: Vec<u32> = st.engines.iter().map(|e| e.pid).collect();
    let all_groups: Vec<u32> = st.pids();
    report.processes_before = procs::members(&all_groups, &st.instance).len();
    let start = Instant::now();

    for g in &engine_groups {
        if !procs::members(&[*g], "").is_empty() {
            procs::signal_group(*g, libc::SIGTERM);
        }
    }
    procs::wait_until(Duration::from_secs(2), || procs::members(&engine_groups, "").is_empty());
    for g in st.compiler_pid.iter().chain([&st.controller_pid]) {
        if !procs::members(&[*g], "").is_empty() {
            procs::signal_group(*g, libc::SIGTERM);
        }
    }
    let rest = Duration::from_secs(5).saturating_sub(start.elapsed()).max(Duration::from_millis(500));
    procs::wait_until(rest, || procs::members(&all_groups, &st.instance).is_empty());

    let left = procs::members(&all_groups, &st.instance);
    if !left.is_empty() {
        report.killed = left.len();
        for g in &all_groups {
            procs::signal_group(*g, libc::SIGKILL);
        }
        for p in &left {
            procs::signal(*p, libc::SIGKILL);
        }
        procs::wait_until(Duration::from_secs(3), || procs::members(&all_groups, &st.instance).is_empty());
        report.survivors = procs::members(&all_groups, &st.instance);
    }
    report
}

/// Remove the cluster file and the connection files of `profile`'s cluster.
pub fn remove_files(profile: &Profile) {
    for f in [profile.cluster_file(), profile.client_file(), profile.engine_file(), profile.compiler_file()] {
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
    let mut line = format!("stopped cluster ({}): {}", cli::describe(&st.profile, &st.cluster_id), parts.join(", "));
    if let Some(p) = report.foreground {
        line.push_str(&format!(" (through its foreground ipcluster, pid {p})"));
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
        return Err(Fail::new(1, format!("no cluster is running under {what} (no cluster file in {})", target.profile.security_dir().display())).into());
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
            let leftovers = if report.processes_before > 0 { format!("stopped {} leftover process(es), ", report.processes_before) } else { String::new() };
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
    use crate::state::EngineProc;

    #[test]
    fn stop_kills_whole_groups_even_when_term_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let instance = uuid::Uuid::new_v4().to_string();
        let sh = Path::new("/bin/sh");
        // A "controller" that exits on TERM, and an "engine" that ignores TERM and has a worker.
        let mut ctl = procs::spawn(sh, &["-c".into(), "sleep 1000 & wait".into()], &dir.path().join("c.log"), &instance, &[]).unwrap();
        let script = "trap '' TERM; sh -c 'trap \"\" TERM; sleep 1000' & sleep 1000 & wait";
        let mut eng = procs::spawn(sh, &["-c".into(), script.into()], &dir.path().join("e.log"), &instance, &[]).unwrap();
        assert!(procs::wait_until(Duration::from_secs(5), || procs::members(&[], &instance).len() >= 5));
        let st = ClusterState {
            profile: "t".into(),
            cluster_id: String::new(),
            profile_dir: dir.path().into(),
            controller_pid: ctl.id(),
            compiler_pid: None,
            engines: vec![EngineProc { pid: eng.id(), index: 0, log: dir.path().join("e.log") }],
            started: String::new(),
            ipcluster_pid: None,
            instance: instance.clone(),
            launcher: "local".into(),
            controller_log: Default::default(),
            compiler_log: Default::default(),
            client_file: Default::default(),
        };
        let report = stop_state(&st, true);
        let _ = ctl.wait();
        let _ = eng.wait();
        assert!(report.killed >= 3, "the engine, its worker and its sleep ignored TERM: {report:?}");
        assert!(report.survivors.is_empty());
        assert!(procs::members(&st.pids(), &instance).is_empty(), "no orphan survives");
    }
}
