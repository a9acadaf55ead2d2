//! The compiler builds closures' dependencies once, when the cluster starts, in the background:
//! a closure sent while that build runs waits for it instead of starting a second one, and
//! every closure then compiles only its own code. Read from the compiler's log lines
//! (`closure builder warm ... deps_built=N`, `closure compiled ... deps_built=0`), never from
//! timings. A closure that does not compile still gets rustc's diagnostic.

mod common;

use std::time::{Duration, Instant};

use common::{client, serial, TestCluster};
use rpx::{Error, RemoteErrorKind};

/// Defined here, so the closure below builds on the client but not on the cluster.
fn not_defined_remotely(x: u64) -> u64 {
    x
}

/// The compiler's log, as the cluster file names it.
fn compiler_log(cluster: &TestCluster) -> String {
    let path = cluster.cluster_state().expect("cluster file")["compiler_log"].as_str().expect("compiler_log").to_string();
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of `key=` in a tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn closures_compile_against_dependencies_built_once_at_startup() {
    let _serial = serial();
    let cluster = TestCluster::start(1);
    let c = client(&cluster);
    let dv = c.direct_view(0);

    // Sent at once: the warm-up build is most likely still running, and this waits for it.
    let r: Vec<u64> = dv.apply(rpx::remote!(|x: u64| x + 1), (41u64,)).expect("first closure");
    assert_eq!(r, vec![42]);

    let deadline = Instant::now() + Duration::from_secs(300);
    let warm = loop {
        let log = compiler_log(&cluster);
        if let Some(l) = log.lines().find(|l| l.contains("closure builder warm")) {
            break l.to_string();
        }
        assert!(!log.contains("closure builder not warm"), "the warm-up build failed:\n{log}");
        assert!(Instant::now() < deadline, "no warm-up line in the compiler log:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let warm_deps: usize = field(&warm, "deps_built").and_then(|v| v.parse().ok()).expect("deps_built");
    assert!(warm_deps > 0, "the warm-up build compiled rpx_runtime and its dependencies: {warm}");

    let r: Vec<u64> = dv.apply(rpx::remote!(|x: u64| x * 3), (14u64,)).expect("second closure");
    assert_eq!(r, vec![42]);

    let e = dv.apply(rpx::remote!(|x: u64| not_defined_remotely(x)), (1u64,)).unwrap_err();
    match &e {
        Error::Remote(r) => {
            assert_eq!(r.kind, RemoteErrorKind::Compile, "{e}");
            assert!(r.message.contains("not_defined_remotely"), "{e}");
        }
        other => panic!("expected a compile error, got {other}"),
    }

    let log = compiler_log(&cluster);
    let compiled: Vec<&str> = log.lines().filter(|l| l.contains("closure compiled")).collect();
    assert_eq!(compiled.len(), 3, "{log}");
    for l in &compiled {
        assert_eq!(field(l, "deps_built"), Some("0"), "no closure built a dependency: {l}");
    }
    assert_eq!(field(compiled[1], "warm"), Some("true"), "{}", compiled[1]);
    assert_eq!(field(compiled[2], "ok"), Some("false"), "{}", compiled[2]);
    // Exactly one build compiled the dependencies: the warm-up.
    let builds_with_deps = log.lines().filter(|l| field(l, "deps_built").is_some_and(|v| v != "0")).count();
    assert_eq!(builds_with_deps, 1, "{log}");
}
