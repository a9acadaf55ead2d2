//! An engine learns that the compiler is gone from its connection, not from a pid (the compiler
//! may run on another host): a frozen compiler (SIGSTOP) stops answering the engine's pings, a
//! killed one closes its socket. Either way the cell waiting on it fails with a clear error
//! instead of hanging, and a compiler that comes back is used again.

use std::time::{Duration, Instant};

use rpx_tests::TestCluster;

const LIMIT: Duration = Duration::from_secs(240);

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn a_frozen_or_killed_compiler_fails_the_waiting_cell_with_a_clear_error() {
    let cluster = TestCluster::start(1);
    let mut c = cluster.client();
    let id = c.wait_for_engines(1, Duration::from_secs(60)).unwrap()[0];
    let out = c.execute_one(id, "let kept = 5u8;", LIMIT).unwrap();
    assert_eq!(out.status, "ok", "{:#}", out.reply);
    let compiler = cluster.cluster_state().unwrap()["compiler_pid"].as_i64().unwrap() as i32;

    // Frozen: the cell fails once the compiler has not answered pings for the silence limit.
    signal(compiler, libc::SIGSTOP);
    let t0 = Instant::now();
    let out = c.execute_one(id, "println!(\"{kept}\");", Duration::from_secs(90)).unwrap();
    let waited = t0.elapsed();
    signal(compiler, libc::SIGCONT);
    assert_eq!(out.reply["ename"], "CompilerDied", "{:#}", out.reply);
    assert!(out.reply["evalue"].as_str().unwrap().contains("answered nothing"), "{:#}", out.reply);
    eprintln!("a frozen compiler was given up after {waited:.1?}");

    // Thawed: the engine connects again and cells run on the same worker, with its variables;
    // the cell that failed while the compiler was frozen never runs late.
    // (It first works off what arrived while it was frozen, so this may take a few seconds.)
    let mut ok = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = c.execute_one(id, "println!(\"back {kept}\");", LIMIT).unwrap();
        if out.status == "ok" {
            ok = Some(out);
            break;
        }
        assert_eq!(out.reply["ename"], "NoCompiler", "only 'no compiler yet' while it reconnects: {:#}", out.reply);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(ok.expect("cells run again once the compiler answers").stdout.trim(), "back 5");

    // Killed: its socket closes and the waiting cell fails at once, without the silence limit.
    signal(compiler, libc::SIGKILL);
    let t0 = Instant::now();
    let out = c.execute_one(id, "println!(\"again\");", Duration::from_secs(60)).unwrap();
    assert_eq!(out.status, "error", "{:#}", out.reply);
    let ename = out.reply["ename"].as_str().unwrap();
    assert!(ename == "CompilerDied" || ename == "NoCompiler", "{:#}", out.reply);
    eprintln!("a killed compiler failed the cell after {:.1?} ({ename})", t0.elapsed());
}

/// A compiler started again on the same port after a crash (as `ipcluster`'s supervisor does)
/// rebuilds every engine's context from the engine's own history: workers and variables are
/// kept, including those of engines whose histories diverged.
#[test]
fn a_compiler_restarted_after_a_crash_keeps_the_engines_variables() {
    let cluster = TestCluster::start(2);
    let mut c = cluster.client();
    let ids = c.wait_for_engines(2, Duration::from_secs(60)).unwrap();
    for out in c.execute(&ids, "let kept = 5u8;", LIMIT).unwrap() {
        assert_eq!(out.status, "ok", "{:#}", out.reply);
    }
    let out = c.execute_one(ids[0], "let only0 = String::from(\"first\");", LIMIT).unwrap();
    assert_eq!(out.status, "ok", "{:#}", out.reply);

    let state = cluster.cluster_state().unwrap();
    let old = state["compiler_pid"].as_i64().unwrap() as i32;
    let file: serde_json::Value = rpx_protocol::connection::read_json(&cluster.profile().compiler_file()).unwrap();
    let port = file["url"].as_str().unwrap().rsplit(':').next().unwrap().to_string();
    signal(old, libc::SIGKILL);
    let gone_by = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{old}/stat")).exists()
        && std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| !s.contains(") Z"))
    {
        assert!(Instant::now() < gone_by, "the killed compiler is still there");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::File::create(cluster.rpx_dir().join("restarted-compiler.log")).unwrap();
    let mut compiler = std::process::Command::new(rpx_tests::bin("rpx-compiler"))
        .args(["--profile", "default", "--port", &port])
        .env("RPX_DIR", cluster.rpx_dir())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start rpx-compiler");

    // Cells fail with "no compiler" until the engines have reconnected, then run with the
    // variables they had.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outs = loop {
        let outs = c.execute(&ids, "println!(\"{}\", kept + 1);", LIMIT).unwrap();
        if outs.iter().all(|o| o.status == "ok") {
            break outs;
        }
        for o in outs.iter().filter(|o| o.status != "ok") {
            let ename = o.reply["ename"].as_str().unwrap_or_default();
            assert!(ename == "NoCompiler" || ename == "CompilerDied", "only 'no compiler' while it comes back: {:#}", o.reply);
        }
        if Instant::now() > deadline {
            let logs = cluster.rpx_dir().join("profile_default/log");
            let mut text = std::fs::read_to_string(cluster.rpx_dir().join("restarted-compiler.log")).unwrap_or_default();
            for e in std::fs::read_dir(&logs).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("ipengine")) {
                text += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
            panic!("cells did not work again within 60 s of the restart; last replies {outs:#?}\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for o in &outs {
        assert_eq!(o.stdout.trim(), "6", "the variable survived the compiler crash: {:#}", o.reply);
    }
    let out = c.execute_one(ids[0], "println!(\"{only0}\");", LIMIT).unwrap();
    assert_eq!((out.status.as_str(), out.stdout.trim()), ("ok", "first"), "{:#}", out.reply);
    let _ = compiler.kill();
    let _ = compiler.wait();
}
