//! Helpers shared by the client's integration tests: a cluster per test file, steps that
//! report every failure at the end, and process helpers.
#![allow(dead_code)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use rpx_tests::TestCluster;

/// Tests of one file run one at a time (each may hold a cluster and its compiler).
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client of `cluster` with all its engines registered.
pub fn client(cluster: &TestCluster) -> rpx::Client {
    let c = rpx::Client::from_file(cluster.client_file()).expect("connect to the test cluster");
    c.wait_for_engines(cluster.n, Duration::from_secs(60)).expect("engines register");
    c
}

/// Named steps of one scenario on one cluster: each runs even if an earlier one failed; the
/// test fails at the end listing every failed step.
#[derive(Default)]
pub struct Steps {
    failed: Vec<String>,
    passed: Vec<String>,
}

impl Steps {
    pub fn run(&mut self, name: &str, f: impl FnOnce()) {
        eprintln!("--- step: {name}");
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => {
                eprintln!("--- ok: {name} ({:.1?})", t.elapsed());
                self.passed.push(name.to_string());
            }
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                eprintln!("--- FAILED: {name}: {msg}");
                self.failed.push(format!("{name}: {msg}"));
            }
        }
    }

    pub fn finish(self) {
        eprintln!("passed steps: {:?}", self.passed);
        if !self.failed.is_empty() {
            panic!("{} step(s) failed:\n{}", self.failed.len(), self.failed.join("\n\n"));
        }
    }
}

/// SIGKILL a process.
pub fn kill(pid: u32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()), Some("Z") | Some("X") | None),
        Err(_) => false,
    }
}

/// Wait (bounded) until `pid` is gone; whether it is.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}
