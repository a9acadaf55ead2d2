//! `ipcluster start` and `ipcluster engines`: launch the controller, then the compiler and the
//! engines at once, record them in the cluster file, wait until the engines are registered,
//! and (without `--daemonize`) stay in the foreground until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::{self, EnginesArgs, StartArgs, Target};
use crate::hub::Hub;
use crate::procs;
use crate::state::{self, ClusterState, EngineProc};
use crate::stop;
use crate::Fail;
use rpx_protocol::Profile;

/// Each engine ipcluster starts gets its start index (0, 1, ...; `engines` continues the count)
/// in this environment variable, which its worker inherits: code on the engine can read it.
pub const ENGINE_INDEX_ENV: &str = "RPX_ENGINE_INDEX";

/// Arguments every member gets: `--profile P [--cluster-id C]`.
fn member_args(profile: &Profile) -> Vec<String> {
    let mut a = vec!["--profile".to_string(), profile.name.clone()];
    if !profile.cluster_id.is_empty() {
        a.push("--cluster-id".into());
        a.push(profile.cluster_id.clone());
    }
    a
}

/// Remove this cluster's logs from earlier runs (as ipyparallel's `--clean-logs` does).
fn clean_logs(profile: &Profile) {
    let Ok(rd) = std::fs::read_dir(profile.log_dir()) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ["ipcontroller", "rpx-compiler", "ipengine"].iter().any(|p| state::is_log_of(&name, p, &profile.cluster_id)) {
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
                    if report.processes_before == 0 { String::new() } else { format!(" (stopped {} leftover process(es))", report.processes_before) }
                );
            }
            Err(e) => eprintln!("ipcluster: removing unreadable cluster file: {e:#}"),
        }
    }
    // No cluster of ours runs here: connection files are leftovers and would mislead the wait.
    stop::remove_files(profile);
    Ok(())
}

/// Members started by this process, for reaping and for failure reports.
struct Launched {
    controller: Child,
    compiler: Option<Child>,
    engines: Vec<(EngineProc, Child)>,
}

/// Start N engines with indices from `first`.
fn spawn_engines(bin: &std::path::Path, profile: &Profile, first: usize, n: usize, instance: &str) -> anyhow::Result<Vec<(EngineProc, Child)>> {
    let mut out = Vec::with_capacity(n);
    for index in first..first + n {
        let log = state::log_path(profile, "ipengine", index);
        let child = procs::spawn(bin, &member_args(profile), &log, instance, &[(ENGINE_INDEX_ENV, index.to_string())])?;
        out.push((EngineProc { pid: child.id(), index, log }, child));
    }
    Ok(out)
}

/// Why a wait ended without success.
enum WaitEnd {
    Died(String),
    Interrupted(&'static str),
    TimedOut,
}

/// Wait until the controller reports at least `want` engines, checking `watch` (a member
/// died?) and the stop signal between polls.
fn wait_registered(hub: &mut Hub, want: usize, limit: Duration, mut watch: impl FnMut() -> Option<String>) -> Result<usize, (WaitEnd, usize)> {
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

/// "engine 3 (pid 123) exited with exit status: 1" for the first engine that exited.
fn engine_exit(engines: &mut [(EngineProc, Child)]) -> Option<(String, PathBuf)> {
    for (e, c) in engines.iter_mut() {
        if let Ok(Some(status)) = c.try_wait() {
            return Some((format!("engine {} (pid {}) exited with {status}", e.index, e.pid), e.log.clone()));
        }
    }
    None
}

pub fn start(args: StartArgs, t0: Instant) -> anyhow::Result<i32> {
    cli::check_launcher(args.engines)?;
    let limit = cli::check_timeout(args.timeout)?;
    let ip = cli::check_ip(&args.ip)?;
    let n = cli::engine_count(args.n)?;
    let target = Target::new(&args.cluster)?;
    let profile = target.profile.clone();
    procs::catch_stop_signals();

    let controller_bin = procs::sibling("ipcontroller")?;
    let compiler_bin = procs::sibling("rpx-compiler")?;
    let engine_bin = procs::sibling("ipengine")?;
    profile.create_dirs().with_context(|| format!("cannot create the profile directory {}", profile.dir.display()))?;
    check_not_running(&target)?;
    clean_logs(&profile);

    let me = std::process::id();
    let instance = uuid::Uuid::new_v4().to_string();
    let controller_log = state::log_path(&profile, "ipcontroller", me);
    let mut cargs = member_args(&profile);
    if let Some(ip) = &ip {
        cargs.push("--ip".into());
        cargs.push(ip.clone());
    }
    let controller = procs::spawn(&controller_bin, &cargs, &controller_log, &instance, &[])?;
    let mut st = ClusterState {
        profile: profile.name.clone(),
        cluster_id: profile.cluster_id.clone(),
        profile_dir: profile.dir.clone(),
        controller_pid: controller.id(),
        compiler_pid: None,
        engines: Vec::new(),
        started: rpx_protocol::message::now_iso(),
        ipcluster_pid: (!args.daemonize).then_some(me),
        instance: instance.clone(),
        launcher: "local".into(),
        controller_log: controller_log.clone(),
        compiler_log: PathBuf::new(),
        client_file: profile.client_file(),
    };
    // Record the controller at once, so a concurrent start refuses and a crash is cleanable.
    st.write(&profile.cluster_file())?;
    let mut l = Launched { controller, compiler: None, engines: Vec::new() };

    // 1. The controller's connection files.
    let deadline = Instant::now() + limit;
    loop {
        if profile.client_file().exists() && profile.engine_file().exists() {
            break;
        }
        if let Ok(Some(status)) = l.controller.try_wait() {
            let msg = format!("the controller exited with {status} before writing its connection files\n{}", procs::tail_block("ipcontroller log", &controller_log));
            return Err(abort(&st, &profile, &mut l, msg));
        }
        if let Some(sig) = procs::stop_signal() {
            return Err(abort(&st, &profile, &mut l, format!("interrupted by {sig} while starting; stopped what was started")));
        }
        if Instant::now() >= deadline {
            let msg = format!(
                "the controller did not write {} within {:.0} s\n{}",
                profile.client_file().display(),
                limit.as_secs_f64(),
                procs::tail_block("ipcontroller log", &controller_log)
            );
            return Err(abort(&st, &profile, &mut l, msg));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // 2. The compiler and the engines, all at once.
    let compiler_log = state::log_path(&profile, "rpx-compiler", me);
    let launched = procs::spawn(&compiler_bin, &member_args(&profile), &compiler_log, &instance, &[]).and_then(|c| {
        st.compiler_pid = Some(c.id());
        st.compiler_log = compiler_log.clone();
        l.compiler = Some(c);
        spawn_engines(&engine_bin, &profile, 0, n, &instance)
    });
    match launched {
        Ok(engines) => {
            st.engines = engines.iter().map(|(e, _)| e.clone()).collect();
            l.engines = engines;
        }
        Err(e) => return Err(abort(&st, &profile, &mut l, format!("{e:#}"))),
    }
    if let Err(e) = st.write(&profile.cluster_file()) {
        return Err(abort(&st, &profile, &mut l, format!("{e:#}")));
    }

    // 3. Wait for registration.
    let remaining = deadline.saturating_duration_since(Instant::now()).max(limit / 2);
    let mut hub = match Hub::connect(&profile.client_file(), remaining) {
        Ok(h) => h,
        Err(e) => return Err(abort(&st, &profile, &mut l, format!("{e:#}\n{}", procs::tail_block("ipcontroller log", &controller_log)))),
    };
    let waited = wait_registered(&mut hub, n, limit, || {
        if let Ok(Some(status)) = l.controller.try_wait() {
            return Some(format!("the controller exited with {status}\n{}", procs::tail_block("ipcontroller log", &controller_log)));
        }
        if let Some(c) = l.compiler.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(format!("the compiler exited with {status}\n{}", procs::tail_block("rpx-compiler log", &compiler_log)));
            }
        }
        engine_exit(&mut l.engines).map(|(why, log)| format!("{why}\n{}", procs::tail_block("engine log", &log)))
    });
    drop(hub);
    match waited {
        Ok(count) => {
            println!("cluster started: {}, {count} engines registered in {:.2} s", target.describe(), t0.elapsed().as_secs_f64());
            println!("connection file: {}", profile.client_file().display());
            println!("logs: {}", profile.log_dir().display());
        }
        Err((end, got)) => {
            let msg = match end {
                WaitEnd::Died(why) => format!("{why}\n({got} of {n} engines had registered)"),
                WaitEnd::Interrupted(sig) => format!("interrupted by {sig} while starting; stopped what was started"),
                WaitEnd::TimedOut => {
                    let mut m = format!("only {got} of {n} engines registered within {:.0} s; stopped the cluster\n", limit.as_secs_f64());
                    m.push_str(&procs::tail_block("ipcontroller log", &controller_log));
                    if let Some((e, _)) = l.engines.first() {
                        m.push_str(&procs::tail_block(&format!("engine {} log", e.index), &e.log));
                    }
                    m.push_str(&procs::tail_block("rpx-compiler log", &compiler_log));
                    m
                }
            };
            return Err(abort(&st, &profile, &mut l, msg));
        }
    }

    if args.daemonize {
        println!("stop it with: ipcluster stop {}", target.flags());
        return Ok(0);
    }
    println!("running in the foreground; Ctrl-C stops the cluster");
    foreground(&target, st, l)
}

/// Stop everything started so far, remove the files, and turn `msg` into the error to exit with.
fn abort(st: &ClusterState, profile: &Profile, l: &mut Launched, msg: String) -> anyhow::Error {
    let _ = stop::stop_state(st, true);
    reap(l);
    stop::remove_files(profile);
    Fail::new(1, msg).into()
}

fn reap(l: &mut Launched) {
    let _ = l.controller.try_wait();
    if let Some(c) = l.compiler.as_mut() {
        let _ = c.try_wait();
    }
    for (_, c) in l.engines.iter_mut() {
        let _ = c.try_wait();
    }
}

/// Stay until SIGINT/SIGTERM (exit 0 after stopping) or the controller's death (exit 1).
fn foreground(target: &Target, st: ClusterState, mut l: Launched) -> anyhow::Result<i32> {
    let profile = &target.profile;
    let mut reported: Vec<u32> = Vec::new();
    let outcome = loop {
        if let Some(sig) = procs::stop_signal() {
            println!("{sig} received: stopping the cluster");
            break Ok(0);
        }
        if let Ok(Some(status)) = l.controller.try_wait() {
            break Err(format!("the controller (pid {}) exited with {status}; stopping the cluster\n{}", st.controller_pid, procs::tail_block("ipcontroller log", &st.controller_log)));
        }
        if !profile.cluster_file().exists() {
            // Someone else (`ipcluster stop` racing us) removed the cluster: end quietly.
            break Ok(0);
        }
        for (e, c) in l.engines.iter_mut() {
            if reported.contains(&e.pid) {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                reported.push(e.pid);
                eprintln!("ipcluster: engine {} (pid {}) exited with {status}; see {}", e.index, e.pid, e.log.display());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Engines added by `ipcluster engines` are in the file, not in `l`.
    let current = ClusterState::read(&profile.cluster_file()).unwrap_or(st);
    let report = stop::stop_state(&current, true);
    reap(&mut l);
    stop::remove_files(profile);
    println!("{}", stop::summary(&current, &report));
    match outcome {
        Ok(code) => Ok(code),
        Err(msg) => Err(Fail::new(1, msg).into()),
    }
}

pub fn engines(args: EnginesArgs, t0: Instant) -> anyhow::Result<i32> {
    cli::check_launcher(args.engines)?;
    let limit = cli::check_timeout(args.timeout)?;
    let target = Target::new(&args.cluster)?;
    if args.n == 0 {
        return Err(Fail::usage("-n must be at least 1").into());
    }
    let profile = target.profile.clone();
    let file = profile.cluster_file();
    let not_running = || Fail::new(1, format!("no cluster is running under {}; start one with `ipcluster start -n N {}`", target.describe(), target.flags()));
    if !file.exists() {
        return Err(not_running().into());
    }
    let mut st = ClusterState::read(&file)?;
    if !state::is_running(&st, procs::is_proc) {
        return Err(not_running().into());
    }
    procs::catch_stop_signals();
    let engine_bin = procs::sibling("ipengine")?;
    let mut hub = Hub::connect(&profile.client_file(), limit)?;
    let before = hub.engines(limit)?.len();
    let first = st.next_index();
    let mut new = spawn_engines(&engine_bin, &profile, first, args.n, &st.instance)?;
    st.engines.extend(new.iter().map(|(e, _)| e.clone()));
    st.write(&file)?;
    let controller = st.controller_pid;
    let waited = wait_registered(&mut hub, before + args.n, limit, || {
        if !procs::is_proc(controller, "ipcontroller") {
            return Some(format!("the controller (pid {controller}) exited"));
        }
        engine_exit(&mut new).map(|(why, log)| format!("{why}\n{}", procs::tail_block("engine log", &log)))
    });
    match waited {
        Ok(count) => {
            let ids: Vec<String> = new.iter().map(|(e, _)| e.pid.to_string()).collect();
            println!(
                "added {} engine{} to the cluster ({}): {count} engines registered in {:.2} s (new pids {})",
                args.n,
                if args.n == 1 { "" } else { "s" },
                target.describe(),
                t0.elapsed().as_secs_f64(),
                ids.join(", ")
            );
            Ok(0)
        }
        Err((end, got)) => {
            // Take the new engines down again and forget them.
            for (e, c) in new.iter_mut() {
                procs::signal_group(e.pid, libc::SIGKILL);
                let _ = c.wait();
            }
            let new_pids: Vec<u32> = new.iter().map(|(e, _)| e.pid).collect();
            if let Ok(mut cur) = ClusterState::read(&file) {
                cur.engines.retain(|e| !new_pids.contains(&e.pid));
                let _ = cur.write(&file);
            }
            let why = match end {
                WaitEnd::Died(w) => w,
                WaitEnd::Interrupted(sig) => format!("interrupted by {sig}"),
                WaitEnd::TimedOut => format!("the new engines did not register within {:.0} s\n{}", limit.as_secs_f64(), procs::tail_block("engine log", &new[0].0.log)),
            };
            Err(Fail::new(1, format!("{why}\n({got} engines registered, wanted {}); removed the new engines", before + args.n)).into())
        }
    }
}
