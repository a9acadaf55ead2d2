//! The client against a real cluster for what needs no closures: connecting, live engine ids,
//! waiting for engines, Rust cells with per-engine output, target selection, queue status,
//! an empty map that sends nothing, aborting a queued cell, signals, a controller that dies
//! under a pending request, and shutting a cluster down.

mod common;

use std::time::Duration;

use common::{alive, client, kill, serial, wait_gone, Steps, TestCluster};
use rpx::{Error, RemoteErrorKind};

#[test]
fn cells_queues_and_targets_on_four_engines() {
    let _serial = serial();
    let cluster = TestCluster::start(4);
    let c = client(&cluster);
    let mut steps = Steps::default();

    steps.run("ids and connecting by profile", || {
        assert_eq!(c.ids(), vec![0, 1, 2, 3]);
        // Client::connect_profile finds the same cluster through RPX_DIR.
        std::env::set_var("RPX_DIR", cluster.rpx_dir());
        let by_profile = rpx::Client::connect_profile("default").expect("connect by profile");
        assert_eq!(by_profile.ids(), vec![0, 1, 2, 3]);
        let by_env = rpx::Client::connect().expect("connect from RPX_PROFILE/default");
        assert_eq!(by_env.ids().len(), 4);
        let missing = rpx::Client::connect_profile("no-such-profile").unwrap_err();
        assert!(matches!(missing, Error::Connection(_)), "{missing}");
        assert!(missing.to_string().contains("ipcluster start"), "says what to do: {missing}");
    });

    steps.run("wait_for_engines times out clearly", || {
        assert_eq!(c.wait_for_engines(4, Duration::from_secs(5)).unwrap(), vec![0, 1, 2, 3]);
        let e = c.wait_for_engines(5, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        let text = e.to_string();
        assert!(text.contains("only 4 of 5 engines"), "{text}");
        assert!(text.contains("ipcluster engines"), "{text}");
    });

    steps.run("execute: stdout and results per engine, in target order", || {
        let dv = c.direct_view(..);
        let r = dv
            .execute(r#"let eid: u64 = std::env::var("RPX_ENGINE_ID").unwrap().parse().unwrap(); println!("engine {eid} says hi");"#)
            .unwrap();
        assert_eq!(r.engine_ids(), vec![0, 1, 2, 3]);
        assert_eq!(r.stdout(), (0..4).map(|i| format!("engine {i} says hi\n")).collect::<Vec<_>>());
        assert!(r.errors().is_empty(), "{r}");
        let r = dv.execute("eid * 10").unwrap();
        assert_eq!(r.results(), (0..4).map(|i| Some((i * 10).to_string())).collect::<Vec<_>>());
        assert!(r.to_string().contains("Out[2:"), "ipyparallel-style display: {r}");
    });

    steps.run("target selection", || {
        assert_eq!(c.direct_view("::2").targets().unwrap(), vec![0, 2]);
        assert_eq!(c.direct_view("1,3").targets().unwrap(), vec![1, 3]);
        assert_eq!(c.direct_view(1..3).targets().unwrap(), vec![1, 2]);
        assert_eq!(c.direct_view(2usize).targets().unwrap(), vec![2]);
        assert_eq!(c.direct_view(2..).targets().unwrap(), vec![2, 3]);
        // One cell on a subset, in the order asked for: each engine answers for itself.
        let r = c.direct_view([3usize, 1]).execute("eid").unwrap();
        assert_eq!(r.engine_ids(), vec![3, 1]);
        assert_eq!(r.results(), vec![Some("3".to_string()), Some("1".to_string())]);
        let e = c.direct_view(9usize).execute("eid").unwrap_err();
        assert!(matches!(e, Error::Targets(_)) && e.to_string().contains("no engine 9 (engines: "), "{e}");
        let e = c.direct_view("zz").execute("eid").unwrap_err();
        assert!(matches!(e, Error::Targets(_)), "{e}");
    });

    steps.run("execute: a compile error reaches the caller with rustc's diagnostic", || {
        let err = c.direct_view(0usize).execute("let w: u64 = not_defined_anywhere;").unwrap_err();
        assert!(err.to_string().contains("compile error on engine 0"), "{err}");
        let r = err.execute_result().expect("the error holds the cell's outcome");
        let e = r.engines[0].error.as_ref().expect("the cell failed");
        assert_eq!(e.kind, RemoteErrorKind::Compile);
        assert_eq!(e.engine_id, Some(0));
        assert!(e.message.contains("not_defined_anywhere"), "{e}");
        // The opt-out: per-engine results, the failure inside.
        let r = c.direct_view(0usize).execute_results("let w: u64 = not_defined_anywhere;").unwrap();
        assert_eq!(r.errors().len(), 1, "{r}");
        let err = r.check().unwrap_err();
        assert!(matches!(err, Error::Execute(_)), "{err}");
    });

    steps.run("execute: a cell failing on some engines is an Err that keeps every engine's output", || {
        let code = r#"println!("out {eid}"); eprintln!("err {eid}"); if eid % 2 == 1 { panic!("odd engine {eid}"); } let n: u64 = if eid == 2 { "x".parse()? } else { eid }; n * 100"#;
        let err = c.direct_view(..).execute(code).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("the cell failed on 3 of 4 engines (1, 2, 3)"), "{text}");
        assert!(text.contains("odd engine 1") && text.contains("invalid digit found in string"), "{text}");
        let r = err.execute_result().expect("every engine's outcome");
        assert_eq!(r.engine_ids(), vec![0, 1, 2, 3]);
        for (i, e) in r.engines.iter().enumerate() {
            assert!(e.stdout.contains(&format!("out {i}")), "engine {i}'s stdout is kept: {r}");
            assert!(e.stderr.contains(&format!("err {i}")), "engine {i}'s stderr is kept: {r}");
        }
        assert!(r.engines[0].is_ok() && r.engines[0].result_text() == Some("0"), "{r}");
        assert_eq!(r.engines[1].error.as_ref().map(|e| e.kind.clone()), Some(RemoteErrorKind::Panic), "{r}");
        let q = r.engines[2].error.as_ref().expect("a `?` on an Err is an error");
        assert_eq!((q.ename.as_str(), q.message.as_str()), ("Error", "invalid digit found in string"), "{q}");
        assert_eq!(err.remote_errors().len(), 3);
        // The same through the async handle on the targets a `%%px --targets 1:3` uses.
        let e2 = c.direct_view(1..3).execute_async(code).unwrap().get().unwrap_err();
        let r2 = e2.execute_result().expect("every targeted engine's outcome");
        assert_eq!((r2.engine_ids(), r2.errors().len()), (vec![1, 2], 2), "{e2}");
        assert_eq!(r2.stdout(), vec!["out 1\n".to_string(), "out 2\n".to_string()]);
        // The opt-out gives per-engine results, Ok.
        let all = c.direct_view(..).execute_results(code).unwrap();
        assert_eq!(all.errors().len(), 3, "{all}");
        assert_eq!(all.stdout()[3], "out 3\n");
        let all = c.direct_view(..).execute_results_async(code).unwrap().get().unwrap();
        assert_eq!(all.results()[0].as_deref(), Some("0"), "{all}");
    });

    steps.run("queue_status counts completed requests", || {
        let q = c.queue_status().unwrap();
        assert_eq!(q.engines.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert!(q.engines.values().all(|e| e.completed >= 2), "{q:?}");
        assert_eq!(q.pending(), 0, "{q:?}");
    });

    steps.run("an empty map returns empty and sends nothing", || {
        let before = c.hub_history().unwrap().len();
        let q_before = c.queue_status().unwrap();
        let out: Vec<u64> = c.view().map(rpx::remote!(|x: u64| x + 1), Vec::<u64>::new()).unwrap();
        assert!(out.is_empty());
        let out: Vec<u64> = c.direct_view(..).map(rpx::remote!(|x: u64| x + 1), Vec::<u64>::new()).unwrap();
        assert!(out.is_empty());
        let ar = c.view().chunksize(3).map_async(rpx::remote!(|x: u64| x + 1), 0..0u64).unwrap();
        assert!(ar.ready() && ar.msg_ids().is_empty() && ar.get().unwrap().is_empty());
        assert_eq!(c.hub_history().unwrap().len(), before, "no task was recorded by the controller");
        assert_eq!(c.queue_status().unwrap(), q_before);
    });

    steps.run("abort a queued cell: it is aborted, the running one completes", || {
        let dv = c.direct_view(1usize);
        let first = dv.execute_async("std::thread::sleep(std::time::Duration::from_secs(3)); println!(\"first done\");").unwrap();
        let second = dv.execute_async("println!(\"second ran\");").unwrap();
        c.abort(&second).unwrap();
        let err = second.get().unwrap_err();
        let r2 = err.execute_result().expect("the aborted cell's outcome");
        let e = r2.engines[0].error.as_ref().expect("the second cell was aborted");
        assert_eq!(e.kind, RemoteErrorKind::Aborted, "{e}");
        assert!(!r2.engines[0].stdout.contains("second ran"));
        let r1 = first.get().unwrap();
        assert!(r1.errors().is_empty(), "{r1}");
        assert_eq!(r1.stdout(), vec!["first done\n".to_string()]);
        let t = &first.timings()[0];
        assert!(t.submitted.is_some() && t.started.is_some() && t.completed.is_some(), "{t:?}");
        assert!(t.started.unwrap() <= t.completed.unwrap());
    });

    steps.run("non-blocking execute: progress, wait, and .await", || {
        let ar = c.direct_view(..).execute_async("eid + 1").unwrap();
        assert_eq!(ar.msg_ids().len(), 4);
        assert_eq!(ar.engine_ids(), vec![Some(0), Some(1), Some(2), Some(3)]);
        assert!(ar.wait(Duration::from_secs(120)).unwrap());
        assert!(ar.ready());
        assert_eq!(ar.progress(), (4, 4));
        let r = futures::executor::block_on(ar).unwrap();
        assert_eq!(r.results(), (1..5).map(|i| Some(i.to_string())).collect::<Vec<_>>());
    });

    steps.run("signals", || {
        c.send_signal("SIGCONT", ..).unwrap();
        let e = c.send_signal("NOT_A_SIGNAL", 0usize).unwrap_err();
        assert!(matches!(e, Error::Remote(ref r) if r.engine_id == Some(0)), "{e}");
    });

    steps.finish();
}

#[test]
fn a_dead_controller_fails_pending_requests() {
    let _serial = serial();
    let cluster = TestCluster::start(1);
    let c = client(&cluster);
    let ar = c.direct_view(..).execute_async("std::thread::sleep(std::time::Duration::from_secs(120));").unwrap();
    let pid = cluster.cluster_state().unwrap()["controller_pid"].as_u64().unwrap() as u32;
    kill(pid);
    let e = ar.get().unwrap_err();
    assert!(matches!(e, Error::Connection(_)), "{e}");
    assert!(e.to_string().contains("controller"), "{e}");
    // Later requests fail at once with the same kind of error.
    let e = c.queue_status().unwrap_err();
    assert!(matches!(e, Error::Connection(_)), "{e}");
    let e = c.direct_view(..).execute("1").unwrap_err();
    assert!(matches!(e, Error::Connection(_) | Error::NoEngines), "{e}");
}

/// Replies that never come (a frozen controller: the TCP connection stays open, nothing is
/// answered) end the wait with a connection error instead of hanging.
#[test]
fn a_frozen_controller_fails_pending_waits_instead_of_hanging() {
    let _serial = serial();
    let cluster = TestCluster::start(1);
    let c = client(&cluster);
    let ar = c.direct_view(..).execute_async("std::thread::sleep(std::time::Duration::from_secs(120));").unwrap();
    let pid = cluster.cluster_state().unwrap()["controller_pid"].as_u64().unwrap() as i32;
    // SAFETY: plain syscalls.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let e = ar.get().unwrap_err();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(matches!(e, Error::Connection(_)), "{e}");
    assert!(e.to_string().contains("controller"), "{e}");
}

#[test]
fn shutdown_stops_controller_and_engines() {
    let _serial = serial();
    let cluster = TestCluster::start(2);
    let c = client(&cluster);
    let state = cluster.cluster_state().unwrap();
    let controller = state["controller_pid"].as_u64().unwrap() as u32;
    let engines: Vec<u32> = state["engines"].as_array().unwrap().iter().map(|e| e["pid"].as_u64().unwrap() as u32).collect();
    assert!(alive(controller));
    c.shutdown().unwrap();
    assert!(wait_gone(controller, Duration::from_secs(30)), "the controller exits");
    for pid in engines {
        assert!(wait_gone(pid, Duration::from_secs(30)), "engine {pid} exits");
    }
    let e = c.queue_status().unwrap_err();
    assert!(matches!(e, Error::Connection(_)), "{e}");
}
