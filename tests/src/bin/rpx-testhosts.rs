//! `rpx-testhosts`: fake hosts ([`rpx_tests::TestHosts`]) for the Python test suite.
//!
//! Usage: `rpx-testhosts up NAME...` (root only). Creates one host per name, prints ONE line of
//! JSON on stdout and flushes it:
//! `{"dir":..., "gateway":..., "bridge":..., "subnet":..., "ssh_config":..., "ssh_wrapper":...,
//! "hosts":[{"name":..., "ip":..., "pid":...}]}`,
//! then stays until its stdin reaches EOF or it gets SIGTERM, SIGINT or SIGHUP; then it tears
//! every host down and exits 0. A fixture holds it with `Popen(stdin=PIPE)` and closes stdin
//! to end it. If the hosts cannot be created it prints why on stderr and exits 1 (2 on bad usage).

use std::io::Write;
use std::process::ExitCode;

use rpx_tests::TestHosts;
use serde_json::json;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args[0] != "up" {
        eprintln!("usage: rpx-testhosts up NAME...");
        return ExitCode::from(2);
    }
    // Block the ending signals before any thread exists (threads inherit the mask; spawned
    // commands get an empty mask from std): they stay pending until `sigwait` below, so one
    // arriving while the hosts are being created still ends them cleanly.
    let signals = ending_signals();
    // SAFETY: `signals` is an initialized sigset.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
    }
    let names: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let hosts = match TestHosts::create(&names) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("rpx-testhosts: {e:#}");
            return ExitCode::from(1);
        }
    };
    let line = json!({
        "dir": hosts.dir(),
        "gateway": hosts.gateway(),
        "bridge": hosts.bridge(),
        "subnet": hosts.subnet(),
        "ssh_config": hosts.ssh_config(),
        "ssh_wrapper": hosts.ssh_wrapper(),
        "hosts": hosts.hosts().iter().map(|h| json!({"name": h.name, "ip": h.ip, "pid": h.pid})).collect::<Vec<_>>(),
    });
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        eprintln!("rpx-testhosts: cannot write to stdout; tearing down");
        drop(hosts);
        return ExitCode::from(1);
    }
    drop(out);
    // stdin EOF becomes a SIGTERM to ourselves, so the main thread waits for one thing only.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        // SAFETY: plain syscalls.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    });
    let mut sig = 0;
    // SAFETY: `signals` is initialized and blocked in every thread.
    unsafe {
        libc::sigwait(&signals, &mut sig);
    }
    drop(hosts);
    ExitCode::SUCCESS
}

fn ending_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}
