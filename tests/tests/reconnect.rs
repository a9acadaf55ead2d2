//! Engines that come back by themselves, on real processes: an engine paused (SIGSTOP) past its
//! eviction registers again when resumed, with its id and its variables; a controller killed and
//! restarted with `ipcontroller --reuse` gets its engines back with their variables; an engine
//! whose controller never returns exits after `--reconnect-timeout` and leaves no worker behind.
//!
//! Events are ordered by what the cluster reports (the controller's engine list, process states),
//! polled with bounded deadlines.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rpx_tests::{bin, run, show, Client, TestCluster};

const LIMIT: Duration = Duration::from_secs(240);

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Is `pid` a live process (not gone, not a zombie)?
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()), Some("Z" | "X")),
        Err(_) => false,
    }
}

/// Poll `cond` every 50 ms until it holds or `limit` passes; returns whether it held.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    rpx_tests::poll(limit, Duration::from_millis(50), || cond().then_some(())).is_some()
}

/// The ids the controller has registered now (an empty list while it cannot be asked).
fn ids(c: &mut Client) -> Vec<u64> {
    c.ids().unwrap_or_default()
}

/// Define `kept` on engine `id` and return the engine's pid and its worker's pid.
fn define_kept(c: &mut Client, id: u64, value: &str) -> (i32, i32) {
    let code = format!(
        "let kept: String = String::from({value:?}); println!(\"{{}} {{}}\", std::os::unix::process::parent_id(), std::process::id());"
    );
    let o = c.execute_one(id, &code, LIMIT).unwrap();
    assert_eq!(o.status, "ok", "{:#}\n{}", o.reply, o.stderr);
    let pids: Vec<i32> = o.stdout.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (engine, worker) = (pids[0], pids[1]);
    let cmdline = std::fs::read(format!("/proc/{engine}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("ipengine"), "the worker's parent is the engine");
    (engine, worker)
}

fn assert_kept(c: &mut Client, id: u64, value: &str) {
    let o = c.execute_one(id, "kept.clone()", LIMIT).unwrap();
    assert_eq!(o.status, "ok", "engine {id} lost its variables: {:#}\n{}", o.reply, o.stderr);
    assert_eq!(o.result_text(), Some(format!("{value:?}").as_str()), "{o:?}");
}

#[test]
fn an_engine_paused_past_its_eviction_serves_again_with_its_id_and_variables() {
    let cluster = TestCluster::start(2);
    let mut c = cluster.client();
    let all = c.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    let (id, other) = (all[0], all[1]);
    let (engine, _) = define_kept(&mut c, id, "before the pause");

    // Paused for 6 s: the controller evicts it (3 missed heartbeats of 1 s) meanwhile.
    let paused = Instant::now();
    signal(engine, libc::SIGSTOP);
    let evicted = wait_until(Duration::from_secs(30), || !ids(&mut c).contains(&id));
    if !evicted {
        signal(engine, libc::SIGCONT);
    }
    assert!(evicted, "the controller never evicted the paused engine {id}");
    std::thread::sleep(Duration::from_secs(6).saturating_sub(paused.elapsed()));
    signal(engine, libc::SIGCONT);
    let resumed = Instant::now();

    // Back within 15 s, under the same id, with its variables.
    assert!(wait_until(Duration::from_secs(15), || ids(&mut c).contains(&id)), "engine {id} did not register again within 15 s of SIGCONT");
    eprintln!("engine {id} registered again {:.1?} after SIGCONT", resumed.elapsed());
    assert_kept(&mut c, id, "before the pause");
    eprintln!("engine {id} served a cell using its old variable {:.1?} after SIGCONT", resumed.elapsed());
    assert!(alive(engine), "the same engine process serves");
    // The other engine never noticed.
    let o = c.execute_one(other, "1 + 1", LIMIT).unwrap();
    assert_eq!(o.result_text(), Some("2"), "{:#}", o.reply);
}

/// `ipcontroller --reuse` for the cluster's profile, logging to `log`; killed on drop.
struct Controller(Child);

impl Controller {
    fn start(rpx_dir: &Path, log: &Path) -> Controller {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(bin("ipcontroller"))
            .args(["--reuse", "--profile", "default"])
            .env("RPX_DIR", rpx_dir)
            .env_remove("RPX_PROFILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ipcontroller --reuse");
        Controller(child)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_controller_killed_and_restarted_with_reuse_gets_its_engines_back_with_their_variables() {
    // The controller is restarted by hand: without a supervisor, which stops the cluster when
    // its controller dies.
    let cluster = TestCluster::start_with(2, &["--no-restart"]);
    let mut c = cluster.client();
    let all = c.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    for &id in &all {
        define_kept(&mut c, id, &format!("engine {id} before the restart"));
    }
    let client_file = std::fs::read_to_string(cluster.client_file()).unwrap();
    let controller = cluster.cluster_state().unwrap()["controller_pid"].as_i64().unwrap() as i32;
    signal(controller, libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || !alive(controller)), "the controller survived SIGKILL");
    drop(c);

    let log = cluster.rpx_dir().join("ipcontroller-reuse.log");
    let _restarted = Controller::start(cluster.rpx_dir(), &log);
    let restarted_at = Instant::now();
    // A client reading the same connection file reaches it; the engines come back within 10 s.
    let mut c = wait_for_client(&cluster.client_file(), Duration::from_secs(10)).unwrap_or_else(|| {
        panic!("no client could connect to the restarted controller\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    let back = c.wait_for_engines(2, Duration::from_secs(10).saturating_sub(restarted_at.elapsed()));
    let back = back.unwrap_or_else(|e| panic!("{e}\n--- restarted controller:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    eprintln!("{} engines back {:.1?} after the restart", back.len(), restarted_at.elapsed());
    assert_eq!(back, all, "the engines kept their ids");
    assert_eq!(std::fs::read_to_string(cluster.client_file()).unwrap(), client_file, "same ports, same key");
    for &id in &all {
        assert_kept(&mut c, id, &format!("engine {id} before the restart"));
    }
}

/// A client connected to the controller of `file`, retried until `limit` (the controller may
/// still be binding).
fn wait_for_client(file: &Path, limit: Duration) -> Option<Client> {
    rpx_tests::poll(limit, Duration::from_millis(100), || {
        Client::connect(file, Duration::from_secs(2)).ok().and_then(|mut c| c.ids().is_ok().then_some(c))
    })
}

#[test]
fn reuse_without_connection_files_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        run(Command::new(bin("ipcontroller")).args(["--reuse", "--profile", "none"]).env("RPX_DIR", dir.path()), Duration::from_secs(30));
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--reuse: cannot read the connection file") && err.contains("ipcontroller-client.json"), "{}", show(&out));
}

#[test]
fn an_engine_whose_controller_never_returns_exits_after_its_reconnect_timeout() {
    let cluster = TestCluster::empty();
    let out = run(
        cluster.command(&["start", "-n", "1", "--daemonize", "--no-restart", "--timeout", "120"]).env("RPX_RECONNECT_TIMEOUT", "3"),
        Duration::from_secs(180),
    );
    assert!(out.status.success(), "{}", show(&out));
    let mut c = cluster.client();
    let id = c.wait_for_engines(1, Duration::from_secs(60)).unwrap()[0];
    let (engine, worker) = define_kept(&mut c, id, "x");
    drop(c);
    let controller = cluster.cluster_state().unwrap()["controller_pid"].as_i64().unwrap() as i32;
    signal(controller, libc::SIGKILL);
    let killed = Instant::now();
    // It keeps trying for 3 s, then exits; generous bound for a loaded machine.
    assert!(wait_until(Duration::from_secs(60), || !alive(engine)), "the engine outlived its controller by 60 s");
    eprintln!("the engine exited {:.1?} after its controller was killed", killed.elapsed());
    assert!(wait_until(Duration::from_secs(10), || !alive(worker)), "the engine's worker {worker} was left running");
    let logs = std::fs::read_dir(cluster.profile().log_dir()).unwrap();
    let said = logs
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ipengine"))
        .any(|e| std::fs::read_to_string(e.path()).unwrap_or_default().contains("reconnect timeout of 3 s"));
    assert!(said, "the engine's log says why it exited");
}
