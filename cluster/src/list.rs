//! `ipcluster list`: every cluster under `$RPX_DIR` with its state, as a table or JSON, and
//! under each cluster what each launcher runs (`ssh 10.0.0.2: 2 engines (ssh pid 123)`,
//! `mpi: 4 ranks (mpiexec pid 456)`), from the launchers' batched status, and what its
//! supervisor does and did (restarts, their last reason, members given up).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{Format, ListArgs};
use crate::hub::HubClient;
use crate::launcher::{self, LaunchStatus};
use crate::procs;
use crate::restart::Policy;
use crate::state::{self, ClusterState, Supervision};
use crate::stop::profile_of;

/// One row of the listing.
#[derive(Debug, Serialize)]
pub struct Row {
    pub profile: String,
    pub cluster_id: String,
    /// The controller is alive.
    pub running: bool,
    /// Registered engines as the controller reports them, or, when the controller cannot be
    /// asked, live local engine processes plus the engines of launches whose process lives.
    pub engines: usize,
    /// Whether `engines` came from the controller (`true`) or from the process table.
    pub engines_from_controller: bool,
    pub controller_pid: u32,
    pub compiler_pid: Option<u32>,
    /// Local engines' pids.
    pub engine_pids: Vec<u32>,
    pub ipcluster_pid: Option<u32>,
    pub started: String,
    pub client_file: String,
    /// What each launcher runs: local engines, each mpiexec, each ssh connection.
    pub launchers: Vec<LaunchStatus>,
    /// The supervising ipcluster (`ipcluster_pid`) is alive.
    pub supervisor_alive: bool,
    /// The supervisor's policy, restarts and members given up, as the cluster file has them.
    pub supervision: Option<Supervision>,
}

fn row(file: &std::path::Path, st: ClusterState) -> Row {
    let profile = profile_of(file, &st);
    let running = state::is_running(&st, procs::is_proc);
    let registered: Option<BTreeSet<u64>> = if running {
        let t = Duration::from_millis(1500);
        HubClient::connect(&profile.client_file(), t).and_then(|mut h| h.engines(t)).ok().map(|m| m.into_keys().collect())
    } else {
        None
    };
    let launchers = launcher::status_all(&st, registered.as_ref());
    // Without the controller: live local engines, and every engine of a launch that lives.
    let alive: usize = launchers
        .iter()
        .map(|l| {
            if l.launcher == "local" {
                l.alive
            } else if l.alive > 0 {
                l.engines
            } else {
                0
            }
        })
        .sum();
    Row {
        profile: st.profile.clone(),
        cluster_id: st.cluster_id.clone(),
        running,
        engines: registered.as_ref().map_or(alive, BTreeSet::len),
        engines_from_controller: registered.is_some(),
        controller_pid: st.controller_pid,
        compiler_pid: st.compiler_pid,
        engine_pids: st.engines.iter().map(|e| e.pid).collect(),
        ipcluster_pid: st.ipcluster_pid,
        started: st.started.clone(),
        client_file: profile.client_file().display().to_string(),
        launchers,
        supervisor_alive: st.ipcluster_pid.is_some_and(|p| procs::is_proc(p, "ipcluster")),
        supervision: st.supervision.clone(),
    }
}

/// The text table.
pub fn render(rows: &[Row]) -> String {
    let mut cells = vec![["PROFILE".to_string(), "CLUSTER ID".into(), "RUNNING".into(), "ENGINES".into(), "PIDS".into()]];
    for r in rows {
        let mut pids = format!("controller {}", r.controller_pid);
        if let Some(c) = r.compiler_pid {
            pids.push_str(&format!(", compiler {c}"));
        }
        if !r.engine_pids.is_empty() {
            let e: Vec<String> = r.engine_pids.iter().map(u32::to_string).collect();
            pids.push_str(&format!(", engines {}", e.join(",")));
        }
        let engines = if r.engines_from_controller || !r.running { r.engines.to_string() } else { format!("{} (processes)", r.engines) };
        cells.push([
            r.profile.clone(),
            if r.cluster_id.is_empty() { "''".into() } else { r.cluster_id.clone() },
            r.running.to_string(),
            engines,
            pids,
        ]);
    }
    let widths: Vec<usize> = (0..5).map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (k, c) in cells.iter().enumerate() {
        let line: Vec<String> = (0..5).map(|i| if i == 4 { c[i].clone() } else { format!("{:<w$}", c[i], w = widths[i]) }).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        let Some(r) = k.checked_sub(1).map(|k| &rows[k]) else { continue };
        // Under a cluster with engines from other launchers: one line per launch.
        if r.launchers.iter().any(|l| l.launcher != "local") {
            for l in &r.launchers {
                out.push_str(&format!("  {}\n", l.line()));
            }
        }
        for line in supervision_lines(r) {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

/// What a cluster's supervisor does and did: `supervisor: pid 5, restarts on (...)`,
/// `restarts: 2, last: engine 1 (id 1) was killed by signal 9 (SIGKILL), restarted as pid 9 at
/// T; its variables are lost`, and one `not restarted: ...` line per member given up.
pub fn supervision_lines(r: &Row) -> Vec<String> {
    let Some(v) = &r.supervision else { return Vec::new() };
    let mut out = Vec::new();
    let policy = Policy {
        restart: v.restart,
        limit: v.restart_limit,
        window: Duration::from_secs_f64(v.restart_window.max(0.0)),
        ..Policy::default()
    }
    .describe();
    let mut line = match r.ipcluster_pid {
        Some(p) if r.supervisor_alive => format!("supervisor: pid {p}, {policy}"),
        Some(p) => format!("supervisor: pid {p} is not running: nothing is restarted"),
        None => "supervisor: none".to_string(),
    };
    if let Some(log) = &v.log {
        line.push_str(&format!(", log {}", log.display()));
    }
    out.push(line);
    if let Some(last) = v.recent.last() {
        out.push(format!("restarts: {}, last: {}", v.restarts, last.line()));
    } else if v.restart {
        out.push("restarts: 0".to_string());
    }
    out.extend(v.given_up.iter().map(|g| format!("not restarted (since {}): {}", g.at, g.message)));
    out
}

pub fn list(args: ListArgs) -> anyhow::Result<i32> {
    let dir = rpx_protocol::connection::rpx_dir();
    let mut rows = Vec::new();
    for file in state::all_cluster_files(&dir) {
        match ClusterState::read(&file) {
            Ok(st) => rows.push(row(&file, st)),
            Err(e) => eprintln!("ipcluster: skipping {}: {e:#}", file.display()),
        }
    }
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Text if rows.is_empty() => println!("no clusters under {}", dir.display()),
        Format::Text => print!("{}", render(&rows)),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_the_columns_a_user_reads() {
        let r = Row {
            profile: "default".into(),
            cluster_id: String::new(),
            running: true,
            engines: 2,
            engines_from_controller: true,
            controller_pid: 10,
            compiler_pid: Some(11),
            engine_pids: vec![12, 13],
            ipcluster_pid: None,
            started: "t".into(),
            client_file: "f".into(),
            launchers: Vec::new(),
            supervisor_alive: false,
            supervision: None,
        };
        let t = render(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PROFILE  CLUSTER ID  RUNNING  ENGINES  PIDS"), "{t}");
        assert!(lines[1].starts_with("default  ''          true     2        controller 10, compiler 11, engines 12,13"), "{t}");
        assert_eq!(lines.len(), 2, "a local-only cluster has no launcher lines: {t}");
    }

    #[test]
    fn supervision_is_listed_with_restarts_and_crash_loops() {
        use crate::state::{GaveUp, RestartNote};
        let mut v = Supervision {
            restart: true,
            restart_limit: 5,
            restart_window: 60.0,
            log: Some("/l/ipcluster-9.log".into()),
            ..Default::default()
        };
        let row = |v: &Supervision, alive: bool| Row {
            profile: "default".into(),
            cluster_id: String::new(),
            running: true,
            engines: 4,
            engines_from_controller: true,
            controller_pid: 10,
            compiler_pid: Some(11),
            engine_pids: vec![12],
            ipcluster_pid: Some(9),
            started: "t".into(),
            client_file: "f".into(),
            launchers: Vec::new(),
            supervisor_alive: alive,
            supervision: Some(v.clone()),
        };
        assert_eq!(
            supervision_lines(&row(&v, true)),
            ["supervisor: pid 9, restarts on (give up after 5 in a row that each died within 60 s), log /l/ipcluster-9.log", "restarts: 0"]
        );
        v.note(RestartNote {
            at: "T1".into(),
            member: "compiler".into(),
            reason: "exited with status 1".into(),
            old_pid: 11,
            new_pid: 20,
            lost: None,
        });
        v.note(RestartNote {
            at: "T2".into(),
            member: "engine 2 (id 2)".into(),
            reason: "was killed by signal 9 (SIGKILL)".into(),
            old_pid: 12,
            new_pid: 21,
            lost: Some("its variables are lost".into()),
        });
        v.given_up.push(GaveUp { at: "T3".into(), member: "engine 3 (id 3)".into(), message: "engine 3 (id 3) ... a crash loop".into() });
        let t = render(&[row(&v, false)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[2], "  supervisor: pid 9 is not running: nothing is restarted, log /l/ipcluster-9.log", "{t}");
        assert_eq!(
            lines[3],
            "  restarts: 2, last: engine 2 (id 2) was killed by signal 9 (SIGKILL), restarted as pid 21 at T2; its variables are lost",
            "{t}"
        );
        assert_eq!(lines[4], "  not restarted (since T3): engine 3 (id 3) ... a crash loop", "{t}");
        assert_eq!(lines.len(), 5, "{t}");
    }

    #[test]
    fn launches_are_listed_under_their_cluster() {
        use crate::launcher::mpi::{Flavour, MpiLaunch};
        use crate::launcher::ssh::SshLaunch;
        use crate::state::EngineProc;
        let st = ClusterState {
            profile: "p".into(),
            cluster_id: "c1".into(),
            profile_dir: "/r/profile_p".into(),
            controller_pid: 10,
            compiler_pid: Some(11),
            engines: vec![EngineProc { pid: 12, index: 0, log: "/l/0".into() }],
            mpi: vec![MpiLaunch { pid: 456, first_index: 1, n: 4, log: "/l/m".into(), mpiexec: "/m".into(), flavour: Flavour::Mpich }],
            ssh: vec![SshLaunch {
                pid: 123,
                host: "10.0.0.2".into(),
                first_index: 5,
                n: 2,
                log: "/l/s".into(),
                remote_pids: vec![7, 8],
                ssh: vec!["ssh".into()],
            }],
            slurm: Vec::new(),
            sge: Vec::new(),
            pbs: Vec::new(),
            started: "t".into(),
            ipcluster_pid: None,
            supervision: None,
            instance: "no-such-instance".into(),
            launcher: "local".into(),
            controller_log: "/l/c".into(),
            compiler_log: "/l/x".into(),
            client_file: "/f".into(),
        };
        let r = row(std::path::Path::new("/r/profile_p/security/cluster-c1.json"), st);
        assert!(!r.running);
        assert_eq!(r.engines, 0, "nothing runs");
        let t = render(&[r]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("p        c1          false    0"), "{t}");
        assert_eq!(lines[2], "  local: 1 engine (pids 12), exited", "{t}");
        assert_eq!(lines[3], "  mpi: 4 ranks (mpiexec pid 456), exited", "{t}");
        assert_eq!(lines[4], "  ssh 10.0.0.2: 2 engines (ssh pid 123, remote pids 7,8), exited", "{t}");
    }
}
