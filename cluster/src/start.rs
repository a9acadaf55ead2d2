//! `ipcluster start` and `ipcluster engines`: launch the controller, then the compiler and the
//! engines (through the chosen [`Launcher`]), record them in the cluster file, wait until the
//! engines are registered, then supervise the cluster ([`crate::supervise`]) until
//! SIGINT/SIGTERM: in the foreground, or with `--daemonize` as the detached supervisor
//! ([`crate::daemon`]; `--daemonize --no-restart` leaves no supervisor).
//!
//! The local launcher's engines read the profile's connection files themselves, so the compiler
//! and the engines start at once. Engines of the other launchers get `RPX_CONNECTION_INFO`
//! instead, so for them `start` first waits (bounded by `--timeout`) for the compiler's
//! connection file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::{EnginesArgs, EnginesConfig, Launch, StartArgs, StartConfig, Target};
use crate::daemon;
use crate::hub::HubClient;
use crate::launcher::local::Local;
use crate::launcher::{profile_args, Batch, LaunchCtx, Launcher, Record};
use crate::procs;
use crate::state::{self, ClusterState, Supervision};
use crate::stop;
use crate::supervise::{End, Members, Setup, Supervisor};
use crate::Fail;
use rpx_protocol::connection::ConnectionInfo;
use rpx_protocol::Profile;

/// How long a launch may take to report what it learns after its engines registered (ssh: the
/// remote pids, printed before the engines even start).
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Remove this cluster's logs from earlier runs (as ipyparallel's `--clean-logs` does).
fn clean_logs(profile: &Profile) {
    let Ok(rd) = std::fs::read_dir(profile.log_dir()) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ["ipcontroller", "rpx-compiler", "ipengine", "ipcluster"].iter().any(|p| state::is_log_of(&name, p, &profile.cluster_id)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Refuse if a cluster is running under this profile; clean up after one that died.
fn check_not_running(target: &Target) -> anyhow::Result<()> {
    let profile = &target.profile;
    let file = profile.cluster_file();
    if file.exists() {
        match ClusterState::read(&file) {
            Ok(st) if state::is_running(&st, procs::is_proc) => {
                let flags = target.flags();
                return Err(Fail::new(
                    1,
                    format!(
                        "a cluster is already running under {} (controller pid {}); stop it with `ipcluster stop {flags}`",
                        target.describe(),
                        st.controller_pid
                    ),
                )
                .into());
            }
            Ok(st) => {
                // Stale: the controller is gone. Take down whatever it left behind.
                let report = stop::stop_state(&st, false);
                eprintln!(
                    "ipcluster: removed the stale cluster file of a cluster under {} that is no longer running{}",
                    target.describe(),
                    if report.processes_before == 0 {
                        String::new()
                    } else {
                        format!(" (stopped {} leftover process(es))", report.processes_before)
                    }
                );
            }
            Err(e) => eprintln!("ipcluster: removing unreadable cluster file: {e:#}"),
        }
    }
    // No cluster of ours runs here: connection files are leftovers and would mislead the wait.
    stop::remove_files(profile);
    Ok(())
}

/// Why a wait ended without success.
enum WaitEnd {
    Died(String),
    Interrupted(&'static str),
    TimedOut,
}

/// Wait until the controller reports at least `want` engines, checking `watch` (a member
/// died?) and the stop signal between polls.
fn wait_registered(
    hub: &mut HubClient,
    want: usize,
    limit: Duration,
    mut watch: impl FnMut() -> Option<String>,
) -> Result<usize, (WaitEnd, usize)> {
    let deadline = Instant::now() + limit;
    let mut last = 0;
    loop {
        if let Some(sig) = procs::stop_signal() {
            return Err((WaitEnd::Interrupted(sig), last));
        }
        if let Some(why) = watch() {
            return Err((WaitEnd::Died(why), last));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err((WaitEnd::TimedOut, last));
        }
        if let Ok(m) = hub.engines((deadline - now).min(Duration::from_secs(2))) {
            last = m.len();
            if last >= want {
                return Ok(last);
            }
        }
        std::thread::sleep(Duration::from_millis(15));
    }
}

/// `--profile P [--cluster-id C] [--ip ADDR] [--location HOST]`: for the controller and the
/// compiler (the address options only when given, so a plain start passes what it always did).
fn address_args(cfg: &StartConfig) -> Vec<String> {
    let mut a = profile_args(&cfg.target.profile);
    for (flag, value) in [("--ip", &cfg.ip), ("--location", &cfg.location)] {
        if let Some(v) = value {
            a.extend([flag.to_string(), v.clone()]);
        }
    }
    a
}

/// The binaries `start` runs, next to ipcluster.
struct Bins {
    controller: PathBuf,
    compiler: PathBuf,
    engine: PathBuf,
}

impl Bins {
    fn find() -> anyhow::Result<Bins> {
        Ok(Bins {
            controller: procs::sibling("ipcontroller")?,
            compiler: procs::sibling("rpx-compiler")?,
            engine: procs::sibling("ipengine")?,
        })
    }
}

pub fn start(args: StartArgs, t0: Instant) -> anyhow::Result<i32> {
    let (cfg, launch) = args.check()?;
    if cfg.daemonize && !cfg.detached && cfg.policy.restart {
        return daemon::start_detached(cfg.limit);
    }
    match launch {
        Launch::Local(l) => start_with(cfg, l, t0),
        Launch::Mpi(m) => start_with(cfg, m, t0),
        Launch::Ssh(s) => start_with(cfg, s, t0),
        Launch::Slurm(b) => start_with(cfg, b, t0),
        Launch::Sge(b) => start_with(cfg, b, t0),
        Launch::Pbs(b) => start_with(cfg, b, t0),
    }
}

fn start_with<L: Launcher>(cfg: StartConfig, mut launcher: L, t0: Instant) -> anyhow::Result<i32> {
    launcher.prepare()?;
    procs::catch_stop_signals();
    let bins = Bins::find()?;
    let profile = cfg.target.profile.clone();
    profile.create_dirs().with_context(|| format!("cannot create the profile directory {}", profile.dir.display()))?;
    check_not_running(&cfg.target)?;
    clean_logs(&profile);

    let mut s = Starting::<L>::controller(&cfg, &bins.controller)?;
    let controller_log = s.st.controller_log.clone();
    s.wait_files(&[profile.client_file(), profile.engine_file()], "the controller", &controller_log, cfg.limit)?;
    s.spawn_compiler(&cfg, &bins.compiler)?;
    let info = if L::NEEDS_CONNECTION_INFO { Some(s.connection_info(&launcher, cfg.limit)?) } else { None };
    s.launch(&launcher, &bins.engine, info.as_deref(), cfg.n)?;
    let count = s.wait_engines(cfg.n, cfg.limit)?;

    println!("cluster started: {}, {count} engines registered in {:.2} s", cfg.target.describe(), t0.elapsed().as_secs_f64());
    if L::KIND != Local::KIND {
        for line in L::status(&s.batch.records(), &s.st.instance, None).iter().map(|l| l.line()) {
            println!("  {line}");
        }
    }
    println!("connection file: {}", profile.client_file().display());
    println!("logs: {}", profile.log_dir().display());
    if !cfg.supervises() {
        println!("stop it with: ipcluster stop {}", cfg.target.flags());
        return Ok(0);
    }
    let setup = Setup {
        profile: profile.clone(),
        instance: s.st.instance.clone(),
        policy: cfg.policy,
        engine_bin: bins.engine.clone(),
        compiler_bin: bins.compiler.clone(),
        compiler_args: address_args(&cfg),
        flags: cfg.target.flags(),
    };
    let log = s.st.supervision.as_ref().and_then(|v| v.log.clone()).filter(|_| cfg.detached);
    s.supervise(setup, || match log {
        Some(log) => {
            println!("supervisor: pid {}, {}; log {}", std::process::id(), cfg.policy.describe(), log.display());
            println!("stop it with: ipcluster stop {}", cfg.target.flags());
            daemon::hand_off(&log)
        }
        None => {
            println!("running in the foreground ({}); Ctrl-C stops the cluster", cfg.policy.describe());
            Ok(())
        }
    })
}

/// A cluster being started: what runs so far, to record, watch, and stop on failure.
struct Starting<L: Launcher> {
    target: Target,
    st: ClusterState,
    controller: Child,
    compiler: Option<Child>,
    batch: Batch<L>,
}

impl<L: Launcher> Starting<L> {
    /// Start the controller and record it at once, so a concurrent start refuses and a crash
    /// is cleanable.
    fn controller(cfg: &StartConfig, bin: &Path) -> anyhow::Result<Starting<L>> {
        let profile = &cfg.target.profile;
        let me = std::process::id();
        let instance = uuid::Uuid::new_v4().to_string();
        let controller_log = state::log_path(profile, "ipcontroller", me);
        let mut args = address_args(cfg);
        if let Some(db) = &cfg.db {
            args.extend(["--db".to_string(), db.clone()]);
        }
        let controller = procs::spawn(bin, &args, &controller_log, &instance, &[])?;
        let st = ClusterState {
            profile: profile.name.clone(),
            cluster_id: profile.cluster_id.clone(),
            profile_dir: profile.dir.clone(),
            controller_pid: controller.id(),
            compiler_pid: None,
            engines: Vec::new(),
            mpi: Vec::new(),
            ssh: Vec::new(),
            slurm: Vec::new(),
            sge: Vec::new(),
            pbs: Vec::new(),
            started: rpx_protocol::message::now_iso(),
            ipcluster_pid: cfg.supervises().then_some(me),
            supervision: cfg.supervises().then(|| Supervision {
                restart: cfg.policy.restart,
                restart_limit: cfg.policy.limit,
                restart_window: cfg.policy.window.as_secs_f64(),
                log: cfg.detached.then(|| state::log_path(profile, "ipcluster", me)),
                ..Supervision::default()
            }),
            instance,
            launcher: L::KIND.into(),
            controller_log,
            compiler_log: PathBuf::new(),
            client_file: profile.client_file(),
        };
        let mut s = Starting { target: cfg.target.clone(), batch: Batch::new(&st), st, controller, compiler: None };
        s.write()?;
        Ok(s)
    }

    /// Write the cluster file; on failure stop everything.
    fn write(&mut self) -> anyhow::Result<()> {
        match self.st.write(&self.target.profile.cluster_file()) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abort(format!("{e:#}"))),
        }
    }

    /// The controller or the compiler exited (`when`: appended to "exited with STATUS").
    fn member_exit(&mut self, when: &str) -> Option<String> {
        if let Ok(Some(status)) = self.controller.try_wait() {
            return Some(format!(
                "the controller exited with {status}{when}\n{}",
                procs::tail_block("ipcontroller log", &self.st.controller_log)
            ));
        }
        if let Some(Ok(Some(status))) = self.compiler.as_mut().map(Child::try_wait) {
            return Some(format!(
                "the compiler exited with {status}{when}\n{}",
                procs::tail_block("rpx-compiler log", &self.st.compiler_log)
            ));
        }
        None
    }

    /// Wait until `files` exist (written by `who`, whose log is `log`).
    fn wait_files(&mut self, files: &[PathBuf], who: &str, log: &Path, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if files.iter().all(|f| f.exists()) {
                return Ok(());
            }
            if let Some(why) = self.member_exit(" before writing its connection files") {
                return Err(self.abort(why));
            }
            if let Some(sig) = procs::stop_signal() {
                return Err(self.abort(format!("interrupted by {sig} while starting; stopped what was started")));
            }
            if Instant::now() >= deadline {
                let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let msg = format!(
                    "{who} did not write {} within {:.0} s\n{}",
                    files[0].display(),
                    limit.as_secs_f64(),
                    procs::tail_block(&name, log)
                );
                return Err(self.abort(msg));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn_compiler(&mut self, cfg: &StartConfig, bin: &Path) -> anyhow::Result<()> {
        let log = state::log_path(&cfg.target.profile, "rpx-compiler", std::process::id());
        match procs::spawn(bin, &address_args(cfg), &log, &self.st.instance, &[]) {
            Ok(c) => {
                self.st.compiler_pid = Some(c.id());
                self.st.compiler_log = log;
                self.compiler = Some(c);
            }
            Err(e) => return Err(self.abort(format!("{e:#}"))),
        }
        // Remote launchers wait for the compiler first: record it meanwhile.
        if L::NEEDS_CONNECTION_INFO {
            self.write()?;
        }
        Ok(())
    }

    /// Wait for the compiler's connection file, then `RPX_CONNECTION_INFO` for the engines.
    fn connection_info(&mut self, launcher: &L, limit: Duration) -> anyhow::Result<String> {
        let profile = self.target.profile.clone();
        let log = self.st.compiler_log.clone();
        self.wait_files(&[profile.compiler_file()], "the compiler", &log, limit)?;
        match ConnectionInfo::read(&profile.engine_file(), &profile.compiler_file()) {
            Ok(info) => {
                if let Some(w) = launcher.warning(&info) {
                    eprintln!("ipcluster: {w}");
                }
                Ok(info.to_line())
            }
            Err(e) => Err(self.abort(format!("cannot read the connection files for the engines: {e}"))),
        }
    }

    fn launch(&mut self, launcher: &L, engine_bin: &Path, info: Option<&str>, n: usize) -> anyhow::Result<()> {
        let (profile, instance) = (self.target.profile.clone(), self.st.instance.clone());
        let ctx = LaunchCtx { profile: &profile, instance: &instance, engine_bin, connection: info };
        match launcher.start(&ctx, 0, n) {
            Ok(spawned) => self.batch.spawned = spawned,
            Err(e) => return Err(self.abort(format!("{e:#}"))),
        }
        self.batch.record_into(&mut self.st);
        self.write()
    }

    /// Between polls: a member died? a launch exited? a launch reported something to record?
    fn watch(&mut self) -> Option<String> {
        if let Some(why) = self.member_exit("") {
            return Some(why);
        }
        if self.batch.observe() {
            self.batch.record_into(&mut self.st);
            let _ = self.st.write(&self.target.profile.cluster_file());
        }
        self.batch.exited()
    }

    fn wait_engines(&mut self, n: usize, limit: Duration) -> anyhow::Result<usize> {
        let mut hub = match HubClient::connect(&self.target.profile.client_file(), limit) {
            Ok(h) => h,
            Err(e) => return Err(self.abort(format!("{e:#}\n{}", procs::tail_block("ipcontroller log", &self.st.controller_log)))),
        };
        let waited = wait_registered(&mut hub, n, limit, || self.watch());
        drop(hub);
        match waited {
            Ok(count) => {
                if settle(&mut self.batch, &mut self.st) {
                    self.write()?;
                }
                Ok(count)
            }
            Err((end, got)) => {
                let msg = match end {
                    WaitEnd::Died(why) => format!("{why}\n({got} of {n} engines had registered)"),
                    WaitEnd::Interrupted(sig) => format!("interrupted by {sig} while starting; stopped what was started"),
                    WaitEnd::TimedOut => format!(
                        "only {got} of {n} engines registered within {:.0} s; stopped the cluster\n{}{}{}",
                        limit.as_secs_f64(),
                        procs::tail_block("ipcontroller log", &self.st.controller_log),
                        self.batch.explain_timeout(),
                        procs::tail_block("rpx-compiler log", &self.st.compiler_log)
                    ),
                };
                Err(self.abort(msg))
            }
        }
    }

    /// Stop everything started so far, remove the files, and turn `msg` into the error to exit
    /// with.
    fn abort(&mut self, msg: String) -> anyhow::Error {
        let _ = stop::stop_state(&self.st, true);
        self.reap();
        stop::remove_files(&self.target.profile);
        Fail::new(1, msg).into()
    }

    fn reap(&mut self) {
        let _ = self.controller.try_wait();
        if let Some(c) = self.compiler.as_mut() {
            let _ = c.try_wait();
        }
        self.batch.reap();
    }

    /// Take the members over, call `ready` (which says the cluster runs), and supervise until
    /// SIGINT/SIGTERM (exit 0 after stopping) or the controller's death (exit 1), then stop
    /// the cluster.
    fn supervise(mut self, setup: Setup, ready: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<i32> {
        let profile = setup.profile.clone();
        // The local launcher's engines are supervised one by one; other launches are watched
        // and their exits reported.
        let engines = if L::KIND == Local::KIND { self.batch.take_children() } else { HashMap::new() };
        let members = Members { controller: self.controller, compiler: self.compiler.take(), engines };
        // Built before `ready`, so it knows the engines' uuids before anyone learns that the
        // cluster runs (and can clean up after an engine killed at once).
        let mut sup = Supervisor::new(setup, &self.st, members);
        let outcome = match ready() {
            Err(e) => Err(format!("{e:#}; stopping the cluster")),
            Ok(()) => {
                let batch = &mut self.batch;
                match sup.run(|| batch.newly_exited()) {
                    End::Stopped(Some(sig)) => {
                        println!("{sig} received: stopping the cluster");
                        Ok(0)
                    }
                    End::Stopped(None) => Ok(0),
                    End::ControllerDied(msg) => Err(msg),
                }
            }
        };
        // Engines added by `ipcluster engines` and restarts are in the file, not in `self`.
        let current = ClusterState::read(&profile.cluster_file()).unwrap_or_else(|_| self.st.clone());
        let report = stop::stop_state(&current, true);
        sup.reap();
        self.batch.reap();
        stop::remove_files(&profile);
        println!("{}", stop::summary(&current, &report));
        outcome.map_err(|msg| Fail::new(1, msg).into())
    }
}

/// Let the new launches report what they learn (bounded); copy it into `st`. True if the
/// records changed (and so the file needs writing).
fn settle<L: Launcher>(batch: &mut Batch<L>, st: &mut ClusterState) -> bool {
    let changed = batch.settle(SETTLE_LIMIT);
    if !batch.all_settled() {
        eprintln!("ipcluster: warning: not every launch reported its engines' pids within {} s; `ipcluster stop` ends them through their connection", SETTLE_LIMIT.as_secs());
    }
    if changed {
        batch.record_into(st);
    }
    changed
}

pub fn engines(args: EnginesArgs, t0: Instant) -> anyhow::Result<i32> {
    let (cfg, launch) = args.check()?;
    match launch {
        Launch::Local(l) => engines_with(cfg, l, t0),
        Launch::Mpi(m) => engines_with(cfg, m, t0),
        Launch::Ssh(s) => engines_with(cfg, s, t0),
        Launch::Slurm(b) => engines_with(cfg, b, t0),
        Launch::Sge(b) => engines_with(cfg, b, t0),
        Launch::Pbs(b) => engines_with(cfg, b, t0),
    }
}

/// The state of the running cluster `target`, or the error saying none runs.
fn running_cluster(target: &Target) -> anyhow::Result<ClusterState> {
    let file = target.profile.cluster_file();
    let not_running = || {
        Fail::new(1, format!("no cluster is running under {}; start one with `ipcluster start -n N {}`", target.describe(), target.flags()))
    };
    if !file.exists() {
        return Err(not_running().into());
    }
    let st = ClusterState::read(&file)?;
    if !state::is_running(&st, procs::is_proc) {
        return Err(not_running().into());
    }
    Ok(st)
}

/// `RPX_CONNECTION_INFO` of a running cluster, from its connection files.
fn read_connection_info<L: Launcher>(launcher: &L, profile: &Profile) -> anyhow::Result<String> {
    let info = ConnectionInfo::read(&profile.engine_file(), &profile.compiler_file()).map_err(|e| {
        Fail::new(
            1,
            format!(
                "cannot read the cluster's connection files ({e}); engines on other hosts need both {} and {}",
                profile.engine_file().display(),
                profile.compiler_file().display()
            ),
        )
    })?;
    if let Some(w) = launcher.warning(&info) {
        eprintln!("ipcluster: {w}");
    }
    Ok(info.to_line())
}

fn engines_with<L: Launcher>(cfg: EnginesConfig, mut launcher: L, t0: Instant) -> anyhow::Result<i32> {
    let profile = cfg.target.profile.clone();
    let file = profile.cluster_file();
    let mut st = running_cluster(&cfg.target)?;
    launcher.prepare()?;
    procs::catch_stop_signals();
    let engine_bin = procs::sibling("ipengine")?;
    let info = if L::NEEDS_CONNECTION_INFO { Some(read_connection_info(&launcher, &profile)?) } else { None };
    let mut hub = HubClient::connect(&profile.client_file(), cfg.limit)?;
    let before = hub.engines(cfg.limit)?.len();
    let mut batch = Batch::<L>::new(&st);
    let instance = st.instance.clone();
    let ctx = LaunchCtx { profile: &profile, instance: &instance, engine_bin: &engine_bin, connection: info.as_deref() };
    batch.spawned = launcher.start(&ctx, st.next_index(), cfg.n)?;
    // The supervisor may write the file meanwhile: change it under its lock.
    match ClusterState::update(&file, |cur| batch.record_into(cur)) {
        Ok(()) => batch.record_into(&mut st),
        Err(e) => {
            batch.end(&instance);
            return Err(e);
        }
    }
    let controller = st.controller_pid;
    let waited = wait_registered(&mut hub, before + cfg.n, cfg.limit, || {
        if !procs::is_proc(controller, "ipcontroller") {
            return Some(format!("the controller (pid {controller}) exited"));
        }
        if batch.observe() {
            batch.record_into(&mut st);
            let _ = ClusterState::update(&file, |cur| batch.record_into(cur));
        }
        batch.exited()
    });
    match waited {
        Ok(count) => {
            if settle(&mut batch, &mut st) {
                ClusterState::update(&file, |cur| batch.record_into(cur))?;
            }
            let new: Vec<String> =
                batch.spawned.iter().map(|s| format!("{} (pid {})", s.record.label(), s.record.leader().unwrap_or(0))).collect();
            let s = if cfg.n == 1 { "" } else { "s" };
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "added {} engine{s} to the cluster ({}): {count} engines registered in {secs:.2} s (new: {})",
                cfg.n,
                cfg.target.describe(),
                new.join(", ")
            );
            Ok(0)
        }
        Err((end, got)) => {
            // Explained first (a batch job's state before it is cancelled), then the new
            // engines are taken down again and forgotten.
            let why = match end {
                WaitEnd::Died(w) => w,
                WaitEnd::Interrupted(sig) => format!("interrupted by {sig}"),
                WaitEnd::TimedOut => {
                    format!("the new engines did not register within {:.0} s\n{}", cfg.limit.as_secs_f64(), batch.explain_timeout())
                }
            };
            batch.end(&instance);
            forget(&file, &batch);
            Err(Fail::new(1, format!("{why}\n({got} engines registered, wanted {}); removed the new engines", before + cfg.n)).into())
        }
    }
}

/// Remove `batch`'s launches from the cluster file (told by their first engine index, which
/// no other launch shares).
fn forget<L: Launcher>(file: &Path, batch: &Batch<L>) {
    let firsts: Vec<usize> = batch.records().iter().map(|r| r.indices().start).collect();
    let _ = ClusterState::update(file, |cur| L::records_mut(cur).retain(|r| !firsts.contains(&r.indices().start)));
}
