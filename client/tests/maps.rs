//! Closures on a real 4-engine cluster: direct and load-balanced apply and map, chunking,
//! ordered and unordered iteration, `imap`, per-item errors (panics, compile errors), retries,
//! timeouts, aborting a queued task, timings and output; replies read whoever waits (nobody, several
//! threads, a thread inside a tokio runtime).

mod common;

use std::time::{Duration, Instant};

use common::{client, serial, Steps, TestCluster};
use rpx::{Error, RemoteErrorKind};
use rpx_tests::Gate;

/// Defined only in this test: a closure calling it compiles here but not on the engines.
#[allow(dead_code)]
fn helper_only_on_the_client(x: u64) -> u64 {
    x + 1
}

fn marker(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("rpx-client-maps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

#[test]
fn closures_on_four_engines() {
    let _serial = serial();
    let cluster = TestCluster::start(4);
    let c = client(&cluster);
    let view = c.view();
    let dv = c.direct_view(..);
    let mut steps = Steps::default();

    steps.run("direct apply: one result per engine, in target order", || {
        let ids: Vec<String> = dv.apply(rpx::remote!(|| std::env::var("RPX_ENGINE_ID").unwrap()), ()).unwrap();
        assert_eq!(ids, vec!["0", "1", "2", "3"]);
        let sums: Vec<u64> = c.direct_view([2usize, 0]).apply(rpx::remote!(|a: u64, b: u64| a + b), (40, 2)).unwrap();
        assert_eq!(sums, vec![42, 42]);
    });

    steps.run("load-balanced apply", || {
        let sum: u64 = view.apply(rpx::remote!(|a: u64, b: u64| a + b), (1, 2)).unwrap();
        assert_eq!(sum, 3);
        let s: String = view
            .apply(
                rpx::remote!(|a: String, n: usize, sep: char, upper: bool| {
                    let s = vec![a; n].join(&sep.to_string());
                    if upper {
                        s.to_uppercase()
                    } else {
                        s
                    }
                }),
                ("ab".to_string(), 3usize, '-', true),
            )
            .unwrap();
        assert_eq!(s, "AB-AB-AB");
    });

    steps.run("maps return results in item order", || {
        let sq: Vec<u64> = view.map(rpx::remote!(|x: u64| x * x), 0..100u64).unwrap();
        assert_eq!(sq, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
        let sq: Vec<u64> = dv.map(rpx::remote!(|x: u64| x * x), 0..100u64).unwrap();
        assert_eq!(sq, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    });

    steps.run("direct map: one contiguous chunk per engine", || {
        let where_: Vec<(u64, String)> = dv.map(rpx::remote!(|x: u64| (x, std::env::var("RPX_ENGINE_ID").unwrap())), 0..10u64).unwrap();
        let engines: Vec<&str> = where_.iter().map(|(_, e)| e.as_str()).collect();
        assert_eq!(engines, vec!["0", "0", "0", "1", "1", "1", "2", "2", "3", "3"]);
        assert_eq!(where_.iter().map(|(x, _)| *x).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    });

    steps.run("chunksize 3 over 10 items: 4 tasks, 10 results in order", || {
        let ar = view.chunksize(3).map_async(rpx::remote!(|x: u64| x + 100), 0..10u64).unwrap();
        assert_eq!(ar.msg_ids().len(), 4);
        assert_eq!(ar.len(), 10);
        assert_eq!(ar.chunks(), vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(ar.get().unwrap(), (100..110).collect::<Vec<u64>>());
        assert_eq!(ar.progress(), (10, 10));
        assert!(ar.engine_ids().iter().all(Option::is_some), "{:?}", ar.engine_ids());
        for t in ar.timings() {
            assert!(t.submitted.is_some() && t.started.is_some() && t.completed.is_some(), "{t:?}");
            assert!(t.submitted.unwrap() <= t.started.unwrap() && t.started.unwrap() <= t.completed.unwrap(), "{t:?}");
        }
    });

    steps.run("ordered vs unordered iteration when later items finish first", || {
        // Ordered by signals: item x ends only once the test has created `go-x`, and the test
        // creates it only after the client has received the result of item x + 1; so results
        // reach the client in the order 3, 2, 1, 0, whatever the machine's load.
        let gated = rpx::remote!(|x: u64| {
            let dir: String = rpx::get("chain_dir");
            let go = std::path::Path::new(&dir).join(format!("go-{x}"));
            let t0 = std::time::Instant::now();
            while !go.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            x
        });
        let fresh_dir = || {
            let d = tempfile::tempdir().unwrap();
            dv.push("chain_dir", &d.path().display().to_string()).unwrap();
            d
        };
        // Release items 3, 2, 1, 0 one by one, each after the client holds the one before.
        let release = |dir: &std::path::Path, progress: &dyn Fn() -> usize| {
            for (done, x) in (0..4u64).rev().enumerate() {
                std::fs::write(dir.join(format!("go-{x}")), b"").unwrap();
                let t0 = Instant::now();
                while progress() < done + 1 {
                    assert!(t0.elapsed() < Duration::from_secs(60), "item {x}'s result never reached the client");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        // Warm up: every engine has the closure before the ordered items start.
        let warm = fresh_dir();
        std::fs::write(warm.path().join("go-3"), b"").unwrap();
        let _: Vec<u64> = dv.apply(gated, (3u64,)).unwrap();
        drop(warm);
        let d = fresh_dir();
        let ar = view.map_async(gated, 0..4u64).unwrap();
        release(d.path(), &|| ar.progress().0);
        let in_order: Vec<u64> = ar.iter().map(|r| r.unwrap()).collect();
        assert_eq!(in_order, vec![0, 1, 2, 3]);
        let done_order: Vec<u64> = ar.iter_unordered().map(|r| r.unwrap()).collect();
        assert_eq!(done_order, vec![3, 2, 1, 0]);
        // A map made unordered returns completion order.
        let d = fresh_dir();
        let ar = view.ordered(false).map_async(gated, 0..4u64).unwrap();
        release(d.path(), &|| ar.progress().0);
        assert_eq!(ar.get().unwrap(), vec![3, 2, 1, 0]);
    });

    steps.run("imap keeps a bounded number of tasks in flight", || {
        let out: Vec<u64> = view.imap(rpx::remote!(|x: u64| x * 2), 0..20u64, 3).map(|r| r.unwrap()).collect();
        assert_eq!(out, (0..20).map(|x| x * 2).collect::<Vec<u64>>());
        let mut out: Vec<u64> =
            view.ordered(false).chunksize(4).imap(rpx::remote!(|x: u64| x * 2), 0..10u64, 2).map(|r| r.unwrap()).collect();
        out.sort();
        assert_eq!(out, (0..10).map(|x| x * 2).collect::<Vec<u64>>());
        // An endless input is consumed lazily.
        let first: Vec<u64> = view.imap(rpx::remote!(|x: u64| x + 1), 0u64.., 4).take(5).map(|r| r.unwrap()).collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
    });

    steps.run("a panicking item: its message, engine and item reach the caller", || {
        let f = rpx::remote!(|x: u64| if x == 3 { panic!("three is not allowed") } else { x * 10 });
        let results = view.map_results(f, 0..6u64).unwrap();
        assert_eq!(results.len(), 6);
        for (i, r) in results.iter().enumerate() {
            if i == 3 {
                match r {
                    Err(Error::Remote(e)) => {
                        assert_eq!(e.kind, RemoteErrorKind::Panic);
                        assert!(e.message.contains("three is not allowed"), "{e}");
                        assert!(e.engine_id.is_some(), "{e}");
                        assert_eq!(e.item.as_deref(), Some("3: 3"));
                    }
                    other => panic!("{other:?}"),
                }
            } else {
                assert_eq!(r.as_ref().unwrap(), &(i as u64 * 10));
            }
        }
        match view.map(f, 0..6u64).unwrap_err() {
            Error::Map { failed, total } => {
                assert_eq!(total, 6);
                assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3]);
                let text = Error::Map { failed, total }.to_string();
                assert!(
                    text.contains("1 of 6 map items failed") && text.contains("three is not allowed") && text.contains("map item 3"),
                    "{text}"
                );
            }
            other => panic!("{other}"),
        }
        // A panic in apply.
        let e = view.apply(rpx::remote!(|x: u64| -> u64 { panic!("bad input {x}") }), (7u64,)).unwrap_err();
        match &e {
            Error::Remote(r) => {
                assert_eq!(r.kind, RemoteErrorKind::Panic);
                assert!(r.message.contains("bad input 7"), "{e}");
                assert!(r.engine_id.is_some());
            }
            other => panic!("{other}"),
        }
    });

    steps.run("a compile error reaches the caller with rustc's diagnostic", || {
        let e = view.apply(rpx::remote!(|x: u64| helper_only_on_the_client(x)), (1u64,)).unwrap_err();
        match &e {
            Error::Remote(r) => {
                assert_eq!(r.kind, RemoteErrorKind::Compile, "{e}");
                assert!(r.message.contains("helper_only_on_the_client"), "{e}");
            }
            other => panic!("{other}"),
        }
        match dv.map(rpx::remote!(|x: u64| helper_only_on_the_client(x)), 0..8u64).unwrap_err() {
            Error::Map { failed, total } => {
                assert_eq!((failed.len(), total), (8, 8));
                assert!(failed.iter().all(|(_, e)| e.kind == RemoteErrorKind::Compile));
            }
            other => panic!("{other}"),
        }
    });

    steps.run("retries: a task failing on its first engine succeeds on another", || {
        let fails_first_time = rpx::remote!(|path: String| {
            use std::io::Write;
            let id = std::env::var("RPX_ENGINE_ID").unwrap();
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                f.write_all(id.as_bytes()).unwrap();
                panic!("first attempt fails on engine {id}");
            }
            id
        });
        let path = marker("retry");
        let id: String = view.retries(1).apply(fails_first_time, (path.clone(),)).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_ne!(id, first, "the retry ran on another engine");
        // Without retries the same closure fails.
        let e = view.apply(fails_first_time, (marker("no-retry"),)).unwrap_err();
        assert!(matches!(&e, Error::Remote(r) if r.kind == RemoteErrorKind::Panic), "{e}");
    });

    steps.run("timeout: a task that cannot start in time fails with TaskTimeout", || {
        let long = view.apply_async(rpx::remote!(|ms: u64| std::thread::sleep(std::time::Duration::from_millis(ms))), (4000u64,)).unwrap();
        let e = view.after(&long).timeout(Duration::from_secs(1)).apply(rpx::remote!(|| 1u8), ()).unwrap_err();
        match &e {
            Error::Remote(r) => assert_eq!(r.kind, RemoteErrorKind::Timeout, "{e}"),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("timeout"), "{e}");
        long.get().unwrap();
    });

    steps.run("abort a queued task: it fails with Aborted, the running one completes", || {
        let on_one = view.targets(0usize);
        // The first task runs until the test opens its gate: the second is still queued when
        // it is aborted.
        let gate = Gate::new();
        let first = on_one
            .apply_async(
                rpx::remote!(|dir: String| {
                    let dir = std::path::Path::new(&dir);
                    std::fs::write(dir.join("started"), b"").unwrap();
                    let t0 = std::time::Instant::now();
                    while !dir.join("open").exists() && t0.elapsed() < std::time::Duration::from_secs(120) {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    3000u64
                }),
                (gate.path().display().to_string(),),
            )
            .unwrap();
        gate.wait_started();
        let second = on_one.apply_async(rpx::remote!(|| 2u8), ()).unwrap();
        c.abort(&second).unwrap();
        assert!(!first.ready(), "the first task still runs when the second is aborted");
        // The engine answers the aborted task when its turn comes, after the first.
        gate.open();
        match second.get().unwrap_err() {
            Error::Remote(r) => assert_eq!(r.kind, RemoteErrorKind::Aborted, "{r}"),
            other => panic!("{other}"),
        }
        assert_eq!(first.get().unwrap(), 3000);
        assert_eq!(first.engine_ids(), vec![Some(0)]);
    });

    steps.run("output printed by closures is gathered per task", || {
        let ar = dv.apply_async(rpx::remote!(|| println!("hello from {}", std::env::var("RPX_ENGINE_ID").unwrap())), ()).unwrap();
        ar.get().unwrap();
        assert!(ar.wait_for_output(Duration::from_secs(5)));
        assert_eq!(ar.stdout(), (0..4).map(|i| format!("hello from {i}\n")).collect::<Vec<_>>());
    });

    steps.run("a call that prints nothing is complete with its reply (no wait for iopub)", || {
        let ar = dv.apply_async(rpx::remote!(|x: u64| x * 2), (21u64,)).unwrap();
        assert_eq!(ar.get().unwrap(), vec![42u64; 4]);
        assert!(ar.wait_for_output(Duration::ZERO), "the engines answered quietly: nothing more to wait for");
        assert_eq!(ar.stdout(), vec![String::new(); 4]);
    });

    steps.run("each load-balanced task's output is its own, though engines hand calls to their worker ahead", || {
        // Odd items end their output without a newline: the next call's output follows it
        // on the worker's pipes at once.
        let f = rpx::remote!(|x: u64| {
            if x % 2 == 1 {
                print!("out {x}");
                eprint!("err {x}");
            } else {
                println!("out {x}");
                eprintln!("err {x}");
            }
            x
        });
        let ar = view.chunksize(1).map_async(f, 0..400u64).unwrap();
        assert_eq!(ar.get().unwrap(), (0..400).collect::<Vec<u64>>());
        assert!(ar.wait_for_output(Duration::from_secs(30)));
        let outs = ar.outputs();
        assert_eq!(outs.len(), 400);
        for (x, o) in outs.iter().enumerate() {
            let nl = if x % 2 == 1 { "" } else { "\n" };
            assert_eq!(
                (o.stdout.as_str(), o.stderr.as_str()),
                (format!("out {x}{nl}").as_str(), format!("err {x}{nl}").as_str()),
                "task {x} on engine {:?}",
                o.engine_id
            );
        }
    });

    steps.run("a long map at chunksize 1, batched between controller and engines: every task its own, results in order", || {
        // Thousands of queued tasks go to the engines, and their replies come back, in rpx
        // batches (protocol/src/batch.rs); each task keeps its msg_id, engine and result.
        let n = 3000u64;
        let f = rpx::remote!(|x: u64| {
            if x % 499 == 7 {
                panic!("item {x} fails");
            }
            x * 3
        });
        let ar = view.chunksize(1).map_async(f, 0..n).unwrap();
        let results = ar.results();
        assert_eq!(results.len(), n as usize);
        for (x, r) in (0..n).zip(&results) {
            match r {
                Ok(v) => assert_eq!((x, *v), (x, x * 3)),
                Err(e) => {
                    assert_eq!(x % 499, 7, "item {x} failed: {e}");
                    assert!(e.to_string().contains(&format!("item {x} fails")), "{e}");
                }
            }
        }
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), (0..n).filter(|x| x % 499 == 7).count());
        let ids: std::collections::HashSet<String> = ar.msg_ids().into_iter().collect();
        assert_eq!(ids.len(), n as usize, "one task, one msg_id each");
        assert!(ar.engine_ids().iter().all(|e| e.is_some()));
    });

    steps.run(".await on a map", || {
        let ar = view.chunksize(5).map_async(rpx::remote!(|x: u64| x + 1), 0..50u64).unwrap();
        let out = futures::executor::block_on(ar).unwrap();
        assert_eq!(out, (1..51).collect::<Vec<u64>>());
    });

    steps.run("replies are read while nobody waits for them (results polled with ready())", || {
        let ars: Vec<_> = (0..20u64).map(|i| view.apply_async(rpx::remote!(|x: u64| x * 2), (i,)).unwrap()).collect();
        let end = Instant::now() + Duration::from_secs(60);
        while !ars.iter().all(|a| a.ready()) {
            assert!(Instant::now() < end, "replies not read within 60 s while nobody waited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let out: Vec<u64> = ars.into_iter().map(|a| a.get().unwrap()).collect();
        assert_eq!(out, (0..20).map(|i| i * 2).collect::<Vec<u64>>());
    });

    steps.run("threads waiting at once each get their own replies", || {
        std::thread::scope(|s| {
            for t in 0..4usize {
                let dv = c.direct_view(t);
                s.spawn(move || {
                    for i in 0..50u64 {
                        let x = 1000 * t as u64 + i;
                        let out: Vec<(String, u64)> =
                            dv.apply(rpx::remote!(|x: u64| (std::env::var("RPX_ENGINE_ID").unwrap(), x + 1)), (x,)).unwrap();
                        assert_eq!(out, vec![(t.to_string(), x + 1)]);
                    }
                });
            }
        });
    });

    steps.run("a blocking call and .await inside a tokio runtime", || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (blocking, awaited) = rt.block_on(async {
            let blocking: u64 = view.apply(rpx::remote!(|x: u64| x + 1), (41,)).unwrap();
            let awaited: u64 = view.apply_async(rpx::remote!(|x: u64| x * 3), (14,)).unwrap().await.unwrap();
            (blocking, awaited)
        });
        assert_eq!((blocking, awaited), (42, 42));
    });

    steps.finish();
}

#[test]
fn an_engine_killed_mid_map_fails_only_its_items() {
    let _serial = serial();
    // Without supervision: a restarted engine 1 would take later items under the same id.
    let cluster = TestCluster::start_with(3, &["--no-restart"]);
    let c = client(&cluster);
    let napper = rpx::remote!(|ms: u64| {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        std::env::var("RPX_ENGINE_ID").unwrap()
    });
    // Every engine has its compiler (a cell waits for it) and the closure before the map starts.
    c.direct_view(..).execute("1").unwrap().check().unwrap();
    let _: Vec<String> = c.direct_view(..).map(napper, vec![0u64; 3]).unwrap();
    // The engine process of engine 1 is its worker's parent.
    let victim: Vec<u32> = c.direct_view(1usize).apply(rpx::remote!(std::os::unix::process::parent_id), ()).unwrap();
    let victim = victim[0];
    let pids: Vec<u32> =
        cluster.cluster_state().unwrap()["engines"].as_array().unwrap().iter().map(|e| e["pid"].as_u64().unwrap() as u32).collect();
    assert!(pids.contains(&victim), "engine 1's process {victim} is one of the cluster's engines {pids:?}");

    let ar = c.view().map_async(napper, vec![1500u64; 12]).unwrap();
    // Let the first tasks start, then kill engine 1.
    ar.wait(Duration::from_millis(700)).unwrap();
    common::kill(victim);
    let results = ar.results();
    let mut failed = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(engine) => assert_ne!(engine, "1", "item {i} cannot have succeeded on the killed engine"),
            Err(Error::Remote(e)) => {
                assert_eq!(e.kind, RemoteErrorKind::EngineDied, "item {i}: {e}");
                assert_eq!(e.engine_id, Some(1), "item {i}: {e}");
                assert!(e.item.as_deref().is_some_and(|s| s.starts_with(&format!("{i}:"))), "{e}");
                failed.push(i);
            }
            Err(other) => panic!("item {i}: {other}"),
        }
    }
    assert!(!failed.is_empty(), "the killed engine had items");
    assert!(failed.len() < 12, "the other engines finished theirs");
    match ar.get().unwrap_err() {
        Error::Map { failed: listed, total } => {
            assert_eq!(total, 12);
            assert_eq!(listed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), failed);
            let text = Error::Map { failed: listed, total }.to_string();
            assert!(text.contains("engine 1 died"), "{text}");
        }
        other => panic!("{other}"),
    }
    // The engine leaves the client's ids; the others keep working.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while c.ids().contains(&1) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.ids(), vec![0, 2]);
    let out: Vec<u64> = c.view().map(rpx::remote!(|x: u64| x + 1), 0..4u64).unwrap();
    assert_eq!(out, vec![1, 2, 3, 4]);
}
