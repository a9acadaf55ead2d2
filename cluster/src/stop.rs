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
    /// Processes that needed SIGKILL.
    pub killed: usize,
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
    if !from_foreground {
        if let Some(p) = st.ipcluster_pid.filter(|p| *p != me && procs::is_proc(*p, "ipcluster")) {
            // The foreground ipcluster stops its own cluster; give it time to do so.
            report.was_alive.push(("ipcluster".into(), p));
            procs::signal(p, libc::SIGTERM);
            procs::wait_until(Duration::from_secs(12), || !procs::alive(p));
        }
    }
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

    let engine_groups: Vec<u32> = st.engines.iter().map(|e| e.pid).collect();
    let all_groups: Vec<u32> = st.pids();
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
        if report.was_alive.is_empty() && report.killed == 0 {
            problems.push(format!(
                "no cluster is running under {} (its processes had already exited; removed the stale cluster file)",
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
