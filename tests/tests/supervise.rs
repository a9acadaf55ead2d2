//! `ipcluster` heals its cluster (issue 9, supervision): a SIGKILLed engine comes back under
//! the same engine id within 10 s and serves (without its variables, which the listing says),
//! a SIGKILLed compiler comes back on the same port and cells work again within 60 s, an
//! engine that crashes at once on every start is given up after the restart limit with a clear
//! message, and `ipcluster stop` leaves no process behind (the detached supervisor included).
//!
//! Events are ordered by polling conditions with bounded deadlines; the only timing bounds
//! asserted are the (10 s, 60 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rpx_protocol::connection::{engine_namespace_dir, read_json, CompilerConnection};
use rpx_tests::{bin, run, show, wait_no_process_mentioning, TestCluster};
use serde_json::Value;

/// A cell's compile and run (the first one starts evcxr).
const CELL: Duration = Duration::from_secs(240);

/// Held by the tests that compile cells: two evcxr cold starts at once on a small machine
/// would eat the 60 s the issue gives a restarted compiler.
static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn compiling() -> std::sync::MutexGuard<'static, ()> {
    COMPILING.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill({pid}, {sig})");
}

fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    !matches!(stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()), Some("Z") | Some("X") | None)
}

/// Poll `f` every 50 ms until it gives a value or `limit` passes.
fn poll<T>(limit: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    rpx_tests::poll(limit, Duration::from_millis(50), f)
}

fn state(c: &TestCluster) -> Value {
    c.cluster_state().expect("the cluster file")
}

/// The pid of the local engine with start index `index`.
fn engine_pid(st: &Value, index: u64) -> u32 {
    st["engines"].as_array().unwrap().iter().find(|e| e["index"] == index).unwrap_or_else(|| panic!("no engine {index} in {st:#}"))["pid"]
        .as_u64()
        .unwrap() as u32
}

fn listing(c: &TestCluster) -> String {
    let out = c.ipcluster(&["list"]);
    assert!(out.status.success(), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The detached supervisor's log, for failure messages.
fn supervisor_log(c: &TestCluster) -> String {
    let log = c.cluster_state().and_then(|s| s["supervision"]["log"].as_str().map(PathBuf::from));
    match log {
        Some(l) => format!("--- supervisor log {}:\n{}", l.display(), std::fs::read_to_string(&l).unwrap_or_default()),
        None => "(no supervisor log)".into(),
    }
}

/// `ipcluster stop` succeeds and nothing of the cluster survives it: no process mentions its
/// `RPX_DIR` (supervisor, controller, compiler, engines, workers), the supervisor is gone and
/// no namespace of `uuids` is left.
fn stop_leaves_nothing(c: &TestCluster, uuids: &[String]) {
    let supervisor = state(c)["ipcluster_pid"].as_u64().map(|p| p as u32);
    let out = c.ipcluster(&["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stopped cluster") && text.contains("through its supervising ipcluster"), "{}", show(&out));
    let left = wait_no_process_mentioning(&c.rpx_dir().to_string_lossy(), Duration::from_secs(5));
    assert!(left.is_empty(), "processes survived ipcluster stop: {left:#?}");
    if let Some(p) = supervisor {
        assert!(!alive(p), "the supervisor {p} is gone");
    }
    for u in uuids {
        assert!(!engine_namespace_dir(u).exists(), "namespace of engine {u} left behind");
    }
    assert!(!c.profile().cluster_file().exists());
}

#[test]
fn a_killed_engine_is_replaced_under_its_id_within_10_s_and_serves() {
    let _one_at_a_time = compiling();
    let c = TestCluster::start(4);
    let st = state(&c);
    let supervisor = st["ipcluster_pid"].as_u64().expect("--daemonize leaves a supervisor") as u32;
    assert!(alive(supervisor), "the detached supervisor runs");
    assert_eq!(st["supervision"]["restart"], true, "{st:#}");
    let mut client = c.client();
    let before: BTreeMap<u64, String> = client.connection_request().unwrap();
    assert_eq!(before.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3], "local engines take their start index as id");
    let out = client.execute(&[0, 1, 2, 3], "let kept = 7u32;", CELL).unwrap();
    assert!(out.iter().all(|o| o.status == "ok"), "{out:#?}");

    let victim = engine_pid(&st, 2);
    let old_uuid = before[&2].clone();
    assert!(engine_namespace_dir(&old_uuid).is_dir(), "engine 2 has a namespace");
    signal(victim, libc::SIGKILL);
    let killed = Instant::now();

    // Healed: 4 engines, ids 0..3, id 2 held by a new engine.
    let healed = poll(Duration::from_secs(30), || {
        let now = client.connection_request().ok()?;
        (now.len() == 4 && now.keys().copied().eq(0..4) && now[&2] != old_uuid).then_some(now)
    });
    let took = killed.elapsed();
    let healed = healed.unwrap_or_else(|| panic!("not healed within 30 s\n{}", listing(&c)));
    eprintln!("engine 2 was replaced {took:.2?} after SIGKILL");
    assert!(took <= Duration::from_secs(10), "healed to 4 engines in {took:?}, more than the 10 s the issue allows");
    let new_pid = engine_pid(&state(&c), 2);
    assert_ne!(new_pid, victim);
    assert!(!engine_namespace_dir(&old_uuid).exists(), "the dead engine's namespace was removed");
    let text = listing(&c);
    let row = text.lines().find(|l| l.starts_with("default")).unwrap();
    assert_eq!(row.split_whitespace().nth(3), Some("4"), "{text}");

    // The listing and the cluster file say what happened; the variables of engine 2 are gone.
    assert!(text.contains(&format!("supervisor: pid {supervisor}, restarts on")), "{text}");
    assert!(
        text.contains(&format!("restarts: 1, last: engine 2 (id 2) was killed by signal 9 (SIGKILL), restarted as pid {new_pid}"))
            && text.contains("its variables are lost"),
        "{text}"
    );
    let sup = &state(&c)["supervision"];
    assert_eq!(sup["restarts"], 1, "{sup:#}");
    assert_eq!(sup["recent"][0]["old_pid"], victim);
    let log = PathBuf::from(sup["log"].as_str().expect("the detached supervisor's log"));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains(&format!("engine 2 (id 2) (pid {victim}) was killed by signal 9 (SIGKILL)"))
            && log_text.contains("its variables are lost"),
        "{log_text}"
    );

    // A cell runs on all 4; the others still have `kept`, engine 2 starts over.
    let out = client.execute(&[0, 1, 3], "println!(\"{kept}\");", CELL).unwrap();
    assert!(out.iter().all(|o| o.status == "ok" && o.stdout.trim() == "7"), "{out:#?}");
    let out = client.execute_one(2, "println!(\"{}\", 6 * 7);", CELL).unwrap();
    assert_eq!((out.status.as_str(), out.stdout.trim()), ("ok", "42"), "{out:#?}");
    // Its first request told the client (on stderr, as `%px` shows it) that it was restarted.
    assert!(
        out.stderr.contains("[ipcluster] engine 2 was restarted: its previous process was killed by signal 9 (SIGKILL)")
            && out.stderr.contains("its variables are lost"),
        "{out:#?}"
    );
    let out = client.execute(&[0, 2], "println!(\"again\");", CELL).unwrap();
    assert!(out.iter().all(|o| o.status == "ok" && o.stderr.is_empty()), "the notice comes once, and only from engine 2: {out:#?}");
    let out = client.execute_one(2, "println!(\"{kept}\");", CELL).unwrap();
    assert_eq!(out.status, "error", "engine 2's variables were lost: {out:#?}");
    drop(client);

    stop_leaves_nothing(&c, &healed.into_values().chain([old_uuid]).collect::<Vec<_>>());
}

#[test]
fn a_killed_compiler_comes_back_on_its_port_and_cells_work_within_60_s() {
    let _one_at_a_time = compiling();
    let c = TestCluster::start(2);
    let mut client = c.client();
    let ids = client.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    let out = client.execute(&ids, "println!(\"before\");", CELL).unwrap();
    assert!(out.iter().all(|o| o.status == "ok"), "{out:#?}");
    let compiler_file = c.profile().compiler_file();
    let first: CompilerConnection = read_json(&compiler_file).unwrap();
    let old = state(&c)["compiler_pid"].as_u64().unwrap() as u32;
    assert_eq!(first.pid, old);
    // The supervisor learned the port it will restart the compiler on.
    let port = poll(Duration::from_secs(10), || state(&c)["supervision"]["compiler_port"].as_u64())
        .expect("the supervisor records the compiler's port");
    assert!(first.url.ends_with(&format!(":{port}")), "{} vs {port}", first.url);

    signal(old, libc::SIGKILL);
    let killed = Instant::now();
    let new = poll(Duration::from_secs(30), || state(&c)["compiler_pid"].as_u64().map(|p| p as u32).filter(|p| *p != old && alive(*p)))
        .unwrap_or_else(|| panic!("no new compiler\n{}", listing(&c)));
    let second: CompilerConnection =
        poll(Duration::from_secs(60), || read_json::<CompilerConnection>(&compiler_file).ok().filter(|f| f.pid == new))
            .expect("the new compiler writes its connection file");
    assert_eq!(second.url, first.url, "same address and port");
    // The dead compiler's work directory (evcxr's builds) was removed; the new one has its own.
    let old_work = first.work_dir.clone().expect("the compiler names its work directory");
    assert!(poll(Duration::from_secs(10), || (!old_work.exists()).then_some(())).is_some(), "{} left behind", old_work.display());
    assert!(second.work_dir.as_ref().is_some_and(|w| w.is_dir() && *w != old_work));

    // Cells work again (the first ones may fail while the engines reconnect).
    let deadline = killed + Duration::from_secs(60);
    let mut tries = Vec::new();
    let ok = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        match client.execute(&ids, "println!(\"after\");", left) {
            Ok(out) if out.iter().all(|o| o.status == "ok" && o.stdout.trim() == "after") => break true,
            Ok(out) => {
                for o in &out {
                    let ename = o.reply["ename"].as_str().unwrap_or_default().to_string();
                    assert!(
                        o.status == "ok" || ename == "CompilerDied" || ename == "NoCompiler",
                        "only 'compiler gone' errors while reconnecting: {o:#?}"
                    );
                }
                tries.push(out.iter().map(|o| o.status.clone()).collect::<Vec<_>>());
            }
            Err(e) => tries.push(vec![e.to_string()]),
        }
    };
    let took = killed.elapsed();
    assert!(ok, "cells did not work again within 60 s of the compiler's SIGKILL; tries: {tries:?}\n{}", listing(&c));
    eprintln!("cells worked again {took:.1?} after the compiler's SIGKILL ({} failed tries)", tries.len());
    let text = listing(&c);
    assert!(
        text.contains(&format!("restarts: 1, last: compiler was killed by signal 9 (SIGKILL), restarted as pid {new}")),
        "{text}\n{}",
        supervisor_log(&c)
    );
    drop(client);
    stop_leaves_nothing(&c, &[]);
    assert!(!second.work_dir.unwrap().exists(), "a stopped compiler removes its work directory");
}

/// A directory with this build's `ipcluster`, `ipcontroller` and `rpx-compiler`, and an
/// `ipengine` that runs the real engine on its first start and crashes at once on any later
/// start (marks under `marks`).
fn crashing_engine_bin_dir(dir: &Path) -> PathBuf {
    let bins = dir.join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    // ipcluster finds its members next to its own executable: copy it, link the others.
    std::fs::copy(bin("ipcluster"), bins.join("ipcluster")).unwrap();
    for name in ["ipcontroller", "rpx-compiler"] {
        std::os::unix::fs::symlink(bin(name), bins.join(name)).unwrap();
    }
    let script = format!(
        "#!/bin/sh\nmark=\"$RPX_TEST_MARKS/started-$RPX_ENGINE_INDEX\"\nif [ -e \"$mark\" ]; then echo 'ipengine (test): crashing at once on purpose' >&2; exit 1; fi\n: > \"$mark\"\nexec {} \"$@\"\n",
        bin("ipengine").display()
    );
    let engine = bins.join("ipengine");
    std::fs::write(&engine, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o755)).unwrap();
    bins
}

#[test]
fn an_engine_crashing_on_every_start_is_given_up_after_the_limit() {
    let c = TestCluster::empty();
    let work = tempfile::tempdir().unwrap();
    let bins = crashing_engine_bin_dir(work.path());
    let marks = work.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let mut cmd = std::process::Command::new(bins.join("ipcluster"));
    cmd.args(["start", "-n", "2", "--daemonize", "--restart-limit", "2", "--timeout", "120"])
        .env("RPX_DIR", c.rpx_dir())
        .env_remove("RPX_PROFILE")
        .env("RPX_TEST_MARKS", &marks);
    let out = run(&mut cmd, Duration::from_secs(180));
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("supervisor: pid"), "{}", show(&out));

    let victim = engine_pid(&state(&c), 1);
    signal(victim, libc::SIGKILL);
    // Restarted twice (crashing each time), then given up.
    let gave_up = poll(Duration::from_secs(60), || {
        let st = state(&c);
        st["supervision"]["given_up"].as_array().filter(|g| !g.is_empty()).map(|g| g[0].clone())
    })
    .unwrap_or_else(|| panic!("engine 1 was never given up\n{}", listing(&c)));
    assert_eq!(gave_up["member"], "engine 1 (id 1)", "{gave_up:#}");
    let msg = gave_up["message"].as_str().unwrap();
    for part in
        ["engine 1 (id 1)", "exited with status 1", "a crash loop", "not restarted again", "ipengine-1.log", "ipcluster engines -n 1"]
    {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    let st = state(&c);
    assert_eq!(st["supervision"]["restarts"], 2, "{st:#}");
    let text = listing(&c);
    assert!(text.contains("not restarted (since") && text.contains("a crash loop"), "{text}");
    assert!(text.contains("restarts: 2, last: engine 1 (id 1) exited with status 1"), "{text}");
    // The engine's log keeps every start's output, with the supervisor's lines between.
    let log = std::fs::read_to_string(c.profile().dir.join("log/ipengine-1.log")).unwrap();
    assert_eq!(log.matches("crashing at once on purpose").count(), 2, "{log}");
    assert!(log.contains("--- ipcluster: engine 1 was killed by signal 9 (SIGKILL); restarting it"), "{log}");
    // Engine 0 serves on; no restart is attempted any more.
    let mut client = c.client();
    assert_eq!(client.ids().unwrap(), [0]);
    drop(client);
    stop_leaves_nothing(&c, &[]);
}

#[test]
fn the_foreground_ipcluster_supervises_too() {
    use std::io::Read;
    let c = TestCluster::empty();
    let mut child = c
        .command(&["start", "-n", "2", "--timeout", "120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = poll(Duration::from_secs(120), || {
        let mut cl = rpx_tests::Client::connect(&c.client_file(), Duration::from_secs(5)).ok()?;
        (cl.ids().ok()?.len() == 2).then_some(cl)
    })
    .expect("the foreground cluster's engines registered");
    let st = state(&c);
    assert_eq!(st["ipcluster_pid"], child.id(), "the foreground ipcluster supervises");
    let before = client.connection_request().unwrap();
    let victim = engine_pid(&st, 1);
    signal(victim, libc::SIGKILL);
    let killed = Instant::now();
    poll(Duration::from_secs(30), || {
        client.connection_request().ok().filter(|now| now.len() == 2 && now.get(&1).is_some_and(|u| *u != before[&1]))
    })
    .unwrap_or_else(|| panic!("not healed\n{}", listing(&c)));
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(10), "healed in {took:?}");
    drop(client);

    signal(child.id(), libc::SIGTERM);
    let status = poll(Duration::from_secs(30), || child.try_wait().unwrap()).expect("the foreground ipcluster ends after SIGTERM");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{status}\n{err}");
    assert!(
        err.contains(&format!("engine 1 (id 1) (pid {victim}) was killed by signal 9 (SIGKILL)"))
            && err.contains("restarted engine 1 (id 1) as pid"),
        "{err}"
    );
    let left = wait_no_process_mentioning(&c.rpx_dir().to_string_lossy(), Duration::from_secs(5));
    assert!(left.is_empty(), "{left:#?}");
}
