//! `--engines local` (the default): one `ipengine` process per engine on this host, each in
//! its own session, reading the connection files of the profile itself (so it starts at
//! once, with the compiler, without waiting for anything), log `log/ipengine[-cid]-<index>.log`.
//! Its records are the cluster file's `engines` list ([`EngineProc`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{profile_args, start_each, term_leaders, LaunchCtx, LaunchStatus, Launcher, Record, Spawned, ENGINE_INDEX_ENV};
use crate::procs;
use crate::state::{self, ClusterState};
use rpx_protocol::connection::ENGINE_RESTARTED_ENV;
use rpx_protocol::Profile;

/// The local launcher (it has no options).
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

/// One engine process started by ipcluster on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineProc {
    pub pid: u32,
    /// Position in start order (0, 1, ...), continued by `ipcluster engines`. Not the engine
    /// id the controller assigns.
    pub index: usize,
    #[serde(default)]
    pub log: PathBuf,
}

impl Record for EngineProc {
    fn leader(&self) -> Option<u32> {
        Some(self.pid)
    }
    fn indices(&self) -> Range<usize> {
        self.index..self.index + 1
    }
    fn log(&self) -> &Path {
        &self.log
    }
    fn label(&self) -> String {
        format!("engine {}", self.index)
    }
    /// By program name, as before launchers existed (cluster files of that time have no tag).
    fn alive(&self, _instance: &str) -> bool {
        procs::is_proc(self.pid, "ipengine")
    }
}

/// The engine id a local engine asks the controller for: its start index, so the supervisor
/// can restart a dead engine under the same id.
pub fn engine_id(index: usize) -> u64 {
    index as u64
}

/// `ipengine` arguments of the local engine with start index `index`: the profile, and its
/// engine id ([`engine_id`]).
pub fn engine_args(profile: &Profile, index: usize) -> Vec<String> {
    let mut a = profile_args(profile);
    a.extend(["--id".to_string(), engine_id(index).to_string()]);
    a
}

/// Start the local engine with start index `index` again after it died, with the same id and
/// log (appended to, after a line saying why, so the crash stays readable). The new engine
/// tells its first client request that it was restarted and its variables are lost
/// ([`ENGINE_RESTARTED_ENV`]).
pub fn restart_engine(
    profile: &Profile,
    engine_bin: &Path,
    instance: &str,
    rec: &EngineProc,
    why: &str,
) -> anyhow::Result<std::process::Child> {
    procs::append_line(&rec.log, &format!("--- ipcluster: engine {} {why}; restarting it", rec.index));
    let notice = format!(
        "[ipcluster] engine {} was restarted: its previous process {why} (at {}); its variables are lost",
        engine_id(rec.index),
        rpx_protocol::message::now_iso()
    );
    let env = [(ENGINE_INDEX_ENV, rec.index.to_string()), (ENGINE_RESTARTED_ENV, notice)];
    procs::spawn_appending(engine_bin, &engine_args(profile, rec.index), &rec.log, instance, &env)
}

impl Launcher for Local {
    type Record = EngineProc;
    const KIND: &'static str = "local";
    const NEEDS_CONNECTION_INFO: bool = false;

    fn records(st: &ClusterState) -> &[EngineProc] {
        &st.engines
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<EngineProc> {
        &mut st.engines
    }

    fn start(&self, ctx: &LaunchCtx, first: usize, n: usize) -> anyhow::Result<Vec<Spawned<EngineProc>>> {
        start_each(first..first + n, |index| {
            let log = state::log_path(ctx.profile, "ipengine", index);
            let child = procs::spawn(
                ctx.engine_bin,
                &engine_args(ctx.profile, index),
                &log,
                ctx.instance,
                &[(ENGINE_INDEX_ENV, index.to_string())],
            )?;
            Ok(Spawned { record: EngineProc { pid: child.id(), index, log }, child: Some(child) })
        })
    }

    /// One line for all local engines: the controller's count is the cluster's own column.
    fn status(records: &[EngineProc], instance: &str, _registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus> {
        if records.is_empty() {
            return Vec::new();
        }
        vec![LaunchStatus {
            launcher: Self::KIND,
            host: None,
            first_index: records.iter().map(|e| e.index).min().unwrap_or(0),
            engines: records.len(),
            pids: records.iter().map(|e| e.pid).collect(),
            alive: records.iter().filter(|e| e.alive(instance)).count(),
            remote_pids: Vec::new(),
            registered: None,
            logs: records.iter().map(|e| e.log.clone()).collect(),
            job: None,
            state: None,
        }]
    }

    fn stop(records: &[EngineProc], _instance: &str) {
        term_leaders(records);
    }
}
