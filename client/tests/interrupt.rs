//! Interrupting engines through the client on a real cluster (`Client::send_signal("SIGINT", ..)`,
//! what a Jupyter kernel does on an interrupt): the running cell stops with a `KeyboardInterrupt`
//! error and the engine keeps its variables; the variables the interrupted cell was defining are
//! gone (the compiler treats it as a panicked cell); code that cannot be interrupted is killed
//! after a grace period and the error says the variables were lost; SIGINT to an idle engine
//! changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::{client, serial, Steps, TestCluster};
use rpx::{AsyncResult, Error, RemoteError, RemoteErrorKind};

/// Wait (bounded) until the cell printed "started" on its engine (it was compiled and runs).
fn wait_started<T: std::fmt::Debug>(ar: &AsyncResult<T>) {
    let end = Instant::now() + Duration::from_secs(120);
    while !ar.stdout().iter().any(|s| s.contains("started")) {
        assert!(!ar.ready(), "the cell ended before it was interrupted: {:?}", ar.get());
        assert!(Instant::now() < end, "the cell did not start within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `code` on engine 0, interrupt it once it runs, and return the error it ended with.
fn interrupt(c: &rpx::Client, code: &str) -> RemoteError {
    let ar = c.direct_view(0usize).execute_async(code).unwrap();
    wait_started(&ar);
    c.send_signal("SIGINT", 0usize).unwrap();
    let e = ar.get_timeout(Duration::from_secs(60)).expect_err("the interrupted cell fails");
    let r = e.execute_result().unwrap_or_else(|| panic!("a failed cell holds every engine's outcome: {e}"));
    r.engines[0].error.clone().unwrap_or_else(|| panic!("the interrupted cell failed: {r}"))
}

fn assert_interrupted(e: &RemoteError) {
    assert_eq!(e.kind, RemoteErrorKind::Interrupted, "{e}");
    assert_eq!(e.ename, "KeyboardInterrupt");
    assert_eq!(e.message, "the cell was interrupted (SIGINT); the engine kept its variables");
    assert_eq!(e.engine_id, Some(0));
}

fn stdout_of(c: &rpx::Client, target: usize, code: &str) -> String {
    let r = c.direct_view(target).execute(code).unwrap();
    assert!(r.errors().is_empty(), "{r}");
    r.stdout()[0].clone()
}

#[test]
fn sigint_stops_the_running_cell_and_keeps_the_engines_variables() {
    let _serial = serial();
    let cluster = TestCluster::start(2);
    let c = client(&cluster);
    let mut steps = Steps::default();

    steps.run("define a variable on both engines", || {
        let r = c.direct_view(..).execute("let kept: u64 = 41;").unwrap();
        assert!(r.errors().is_empty(), "{r}");
    });

    steps.run("a cell blocked in sleep is interrupted; its new variable is dropped, the old one kept", || {
        let e = interrupt(
            &c,
            "let fresh: u64 = 5; println!(\"started\"); std::thread::sleep(std::time::Duration::from_secs(60)); println!(\"{fresh}\");",
        );
        assert_interrupted(&e);
        assert!(e.to_string().contains("interrupted on engine 0"), "{e}");
        assert_eq!(stdout_of(&c, 0, "println!(\"{}\", kept + 1);"), "42\n");
        let r = c.direct_view(0usize).execute_results("println!(\"{}\", fresh);").unwrap();
        let e = r.engines[0].error.as_ref().expect("`fresh` was not kept");
        assert_eq!(e.kind, RemoteErrorKind::Compile, "{e}");
    });

    steps.run("a loop that calls functions is interrupted", || {
        let e = interrupt(
            &c,
            "let mut v: Vec<u64> = Vec::new(); println!(\"started\"); for i in 0u64.. { v.push(i); if v.len() > 1000 { v.clear(); } if i % 1000 == 0 { std::thread::yield_now(); } }",
        );
        assert_interrupted(&e);
        assert_eq!(stdout_of(&c, 0, "println!(\"{}\", kept + 1);"), "42\n");
    });

    steps.run("a loop that prints is interrupted", || {
        let e = interrupt(&c, "println!(\"started\"); let mut n = 0u64; loop { n += 1; if n % 100_000 == 0 { println!(\"{n}\"); } }");
        assert_interrupted(&e);
        assert_eq!(stdout_of(&c, 0, "println!(\"{}\", kept + 1);"), "42\n");
    });

    steps.run("both engines run later cells together, with their variables", || {
        let r = c.direct_view(..).execute("let later = kept + 2; println!(\"{later}\");").unwrap();
        assert!(r.errors().is_empty(), "{r}");
        assert_eq!(r.stdout(), vec!["43\n".to_string(), "43\n".to_string()]);
    });

    steps.run("SIGINT to an idle engine changes nothing", || {
        c.send_signal("SIGINT", ..).unwrap();
        c.send_signal(2, 0usize).unwrap();
        let r = c.direct_view(..).execute("println!(\"{} {}\", kept + 1, later);").unwrap();
        assert!(r.errors().is_empty(), "{r}");
        assert_eq!(r.stdout(), vec!["42 43\n".to_string(), "42 43\n".to_string()]);
    });

    steps.run("a closure call is interrupted too", || {
        let f = rpx::remote!(|secs: u64| -> u64 {
            println!("started");
            std::thread::sleep(std::time::Duration::from_secs(secs));
            secs
        });
        let dv = c.direct_view(0usize);
        assert_eq!(dv.apply(f, (0u64,)).unwrap(), vec![0], "compiled and run once");
        let ar = dv.apply_async(f, (60u64,)).unwrap();
        wait_started(&ar);
        c.send_signal("SIGINT", 0usize).unwrap();
        match ar.get_timeout(Duration::from_secs(60)) {
            Err(Error::Remote(e)) => {
                assert_eq!(
                    (e.kind.clone(), e.ename.as_str(), e.engine_id),
                    (RemoteErrorKind::Interrupted, "KeyboardInterrupt", Some(0)),
                    "{e}"
                );
                assert_eq!(e.message, "the call was interrupted (SIGINT); the engine kept its variables");
            }
            other => panic!("expected an interrupted call, got {other:?}"),
        }
        assert_eq!(stdout_of(&c, 0, "println!(\"{}\", kept + 1);"), "42\n");
    });

    steps.run("loops that cannot be interrupted: killed after the grace period, variables lost", || {
        // Nothing in these loops can unwind (allocation, arithmetic), so no panic can be
        // injected where the cell's catch_unwind would catch it: the engine kills its worker
        // when the grace period is over.
        for code in [
            "println!(\"started\"); loop { std::hint::black_box(vec![1u8; 10]); }",
            "println!(\"started\"); let mut x = 0u64; loop { x = std::hint::black_box(x.wrapping_add(1)); }",
        ] {
            let e = interrupt(&c, code);
            eprintln!("{code}: {e}");
            match e.kind {
                RemoteErrorKind::EngineDied => {
                    assert!(e.message.contains("SIGINT") && e.message.contains("did not stop") && e.message.contains("lost"), "{e}");
                    let r = c.direct_view(0usize).execute_results("println!(\"{}\", kept);").unwrap();
                    assert_eq!(r.engines[0].error.as_ref().map(|e| e.kind.clone()), Some(RemoteErrorKind::Compile), "{r}");
                    // Put the variable back for the next case.
                    assert_eq!(stdout_of(&c, 0, "let kept: u64 = 41; println!(\"again\");"), "again\n");
                }
                // A compiler that makes the loop interruptible is fine too.
                _ => assert_interrupted(&e),
            }
            assert_eq!(stdout_of(&c, 0, "println!(\"{}\", kept + 1);"), "42\n");
        }
        assert_eq!(stdout_of(&c, 1, "println!(\"{}\", kept + 1);"), "42\n", "the other engine kept its variables");
    });

    steps.finish();
}
