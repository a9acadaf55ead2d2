//! Rust cells on a real 8-engine cluster (controller, shared compiler and engines as processes on
//! loopback), driven through the wire protocol the way a client does: per-engine output, state
//! across cells, compile errors, a panic on one engine, an abort, divergent histories (a cell on
//! one engine that moves a variable), and a long cell on one engine that must not hold up the
//! others.
//!
//! One cluster serves the whole scenario (an evcxr context costs seconds to warm), so the steps
//! run in order inside one test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rpx_tests::{ExecOutput, Gate, TestCluster};

const LIMIT: Duration = Duration::from_secs(240);

fn assert_ok(outs: &[ExecOutput]) {
    for o in outs {
        assert_eq!(o.status, "ok", "engine {} failed: {:#}\nstderr: {}", o.engine_id, o.reply, o.stderr);
    }
}

fn evalue(o: &ExecOutput) -> &str {
    o.reply["evalue"].as_str().unwrap_or_default()
}

#[test]
fn eight_engines_run_rust_cells() {
    let cluster = TestCluster::start(8);
    let mut c = cluster.client();
    let ids = c.wait_for_engines(8, Duration::from_secs(60)).expect("8 engines register");
    assert_eq!(ids, (0..8).collect::<Vec<u64>>());

    // Per-engine stdout, from one cell sent to all eight engines.
    let outs = c
        .execute(
            &ids,
            r#"let eid: u64 = std::env::var("RPX_ENGINE_ID").unwrap().parse().unwrap(); println!("engine {eid} says hi");"#,
            LIMIT,
        )
        .unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.stdout, format!("engine {} says hi\n", o.engine_id));
    }

    // A cell's output is published before its reply: every stream message is older than the
    // execute_reply (dates are fixed-width UTC, so they compare as text), and none is missing.
    let code = r#"for i in 0..3 { println!("out {i}"); eprintln!("err {i}"); std::thread::sleep(std::time::Duration::from_millis(60)); } println!("last out"); eprint!("last err");"#;
    let outs = c.execute(&ids, code, LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(
            (o.stdout.as_str(), o.stderr.as_str()),
            ("out 0\nout 1\nout 2\nlast out\n", "err 0\nerr 1\nerr 2\nlast err"),
            "engine {}",
            o.engine_id
        );
        assert!(o.idle, "engine {}: idle follows the reply", o.engine_id);
        assert!(o.stream_dates.len() >= 2, "output over 180 ms goes out in several messages: {:?}", o.stream_dates);
        assert_eq!(o.reply_date.len(), "2026-12-04T16:50:00.123456Z".len(), "{}", o.reply_date);
        for d in &o.stream_dates {
            assert!(
                d.as_str() <= o.reply_date.as_str(),
                "engine {}: stream published at {d}, after its reply at {}",
                o.engine_id,
                o.reply_date
            );
        }
    }

    // Output without a final newline belongs to its own cell, not to the start of the next one.
    let outs = c.execute(&ids, r#"print!("p1"); eprint!("e1");"#, LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("p1", "e1"), "engine {}", o.engine_id);
    }
    let outs = c.execute(&ids, r#"println!("p2");"#, LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.stdout, "p2\n", "engine {}: nothing of the previous cell", o.engine_id);
    }

    // A top-level `?` on an `Err` fails the cell with the error's text, shown once: as the error,
    // not also as the cell's last stderr line. Output before it stays.
    let outs = c.execute(&ids, r#"eprintln!("before"); let n: u64 = "12x".parse()?; println!("not reached {n}");"#, LIMIT).unwrap();
    for o in &outs {
        assert_eq!(o.status, "error", "engine {}: {:#}", o.engine_id, o.reply);
        assert_eq!((o.reply["ename"].as_str(), evalue(o)), (Some("Error"), "invalid digit found in string"));
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("", "before\n"), "engine {}", o.engine_id);
    }

    // State persists: the last expression becomes each engine's execute_result.
    let outs = c.execute(&ids, "eid * 10", LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.result_text(), Some((o.engine_id * 10).to_string().as_str()), "{o:?}");
    }

    // A compile error reaches every engine with rustc's diagnostic and the engine's id.
    let outs = c.execute(&ids, "let w: u64 = not_defined_anywhere;", LIMIT).unwrap();
    for o in &outs {
        assert_eq!(o.status, "error");
        assert_eq!(o.reply["ename"], "CompileError");
        assert!(evalue(o).contains("cannot find value `not_defined_anywhere`"), "{}", evalue(o));
        assert_eq!(o.reply["engine_info"]["engine_id"], o.engine_id);
    }

    // A panic on engine 3 only: it reports the panic; the others succeed and keep the variable.
    let outs = c.execute(&ids, r#"let kept: u64 = eid + 100; if eid == 3 { panic!("boom on engine three"); }"#, LIMIT).unwrap();
    for o in &outs {
        if o.engine_id == 3 {
            assert_eq!(o.status, "error");
            assert!(evalue(o).contains("boom on engine three"), "{:#}", o.reply);
        } else {
            assert_eq!(o.status, "ok", "{:#}", o.reply);
        }
    }
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != 3).collect();
    let outs = c.execute(&others, "kept", LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.result_text(), Some((o.engine_id + 100).to_string().as_str()));
    }
    let o = c.execute_one(3, "eid", LIMIT).unwrap();
    assert_eq!(o.result_text(), Some("3"), "engine 3 keeps its earlier state: {:#}", o.reply);

    // A cell on a subset defines a variable there; then a cell on all engines still runs everywhere.
    let outs = c.execute(&[0, 1], "let sub: u64 = eid * 2;", LIMIT).unwrap();
    assert_ok(&outs);
    let outs = c.execute(&[0, 1], "sub + 1", LIMIT).unwrap();
    assert_ok(&outs);
    assert_eq!(outs.iter().map(|o| o.result_text().unwrap_or_default().to_string()).collect::<Vec<_>>(), ["1", "3"]);
    let outs = c.execute(&ids, r#"println!("all {eid}");"#, LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.stdout, format!("all {}\n", o.engine_id));
    }

    // A cell without `let` on one engine runs in its group's own context; when it moved a
    // variable, that context follows the engine that ran it and the others keep theirs.
    let outs = c.execute(&ids, r#"let moved: String = format!("m{eid}");"#, LIMIT).unwrap();
    assert_ok(&outs);
    let o = c.execute_one(1, "moved.len()", LIMIT).unwrap();
    assert_eq!(o.result_text(), Some("2"), "{:#}", o.reply);
    let o = c.execute_one(0, "drop(moved);", LIMIT).unwrap();
    assert_eq!(o.status, "ok", "{:#}", o.reply);
    let outs = c.execute(&ids, "moved.len()", LIMIT).unwrap();
    for o in &outs {
        if o.engine_id == 0 {
            assert_eq!(o.status, "error");
            assert!(evalue(o).contains("cannot find value `moved`"), "{:#}", o.reply);
        } else {
            assert_eq!(o.result_text(), Some("2"), "engine {}: {:#}", o.engine_id, o.reply);
        }
    }

    // An abort in user code kills engine 5's worker: reported, restarted, variables gone, still serving.
    let o = c.execute_one(5, "std::process::abort();", LIMIT).unwrap();
    assert_eq!(o.status, "error");
    assert!(evalue(&o).contains("variables were lost"), "{:#}", o.reply);
    let o = c.execute_one(5, "eid", LIMIT).unwrap();
    assert_eq!(o.status, "error");
    assert!(evalue(&o).contains("cannot find value `eid`"), "{:#}", o.reply);
    let o = c.execute_one(5, "let fresh: u64 = 5; fresh + 1", LIMIT).unwrap();
    assert_eq!(o.result_text(), Some("6"), "{:#}", o.reply);

    // A cell held running on engine 0 does not hold up engines 1..7, even for cells that define
    // variables: they answer while it is still running (it waits for the test's gate).
    let gate = Gate::new();
    let slow_done = Arc::new(AtomicBool::new(false));
    let mut slow_client = cluster.client();
    let slow = {
        let (slow_done, code) = (slow_done.clone(), format!("{} println!(\"slow done\");", gate.hold()));
        std::thread::spawn(move || {
            let o = slow_client.execute_one(0, &code, LIMIT);
            slow_done.store(true, Ordering::SeqCst);
            o
        })
    };
    gate.wait_started();
    let rest: Vec<u64> = (1..8).collect();
    let outs = c.execute(&rest, r#"let after: String = std::env::var("RPX_ENGINE_ID").unwrap();"#, LIMIT).unwrap();
    assert_ok(&outs);
    let outs = c.execute(&rest, "after.len()", LIMIT).unwrap();
    assert_ok(&outs);
    assert!(!slow_done.load(Ordering::SeqCst), "engines 1..7 answered only after engine 0's held cell finished");
    gate.open();
    let o = slow.join().unwrap().unwrap();
    assert_eq!(o.status, "ok", "{:#}", o.reply);
    assert_eq!(o.stdout, "slow done\n");

    // Every engine still runs cells together afterwards.
    let outs = c.execute(&ids, r#"println!("{}", std::env::var("RPX_ENGINE_ID").unwrap());"#, LIMIT).unwrap();
    assert_ok(&outs);
    for o in &outs {
        assert_eq!(o.stdout, format!("{}\n", o.engine_id));
    }
}
