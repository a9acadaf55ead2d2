//! The supervisor's side of the worker pipes, with fake workers (shell scripts), and the real
//! worker's answers to bad input.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use rpx_engine::child::{Worker, WorkerCommand, WorkerEvent};
use rpx_engine::output::{StdoutEvent, StdoutParser};
use tokio::sync::mpsc;

fn sh(script: &str) -> WorkerCommand {
    WorkerCommand { program: "/bin/sh".into(), args: vec!["-c".into(), script.into()], env: vec![] }
}

/// What a worker produced until it exited.
struct Run {
    out: String,
    err: String,
    status: String,
    /// Closure results from the result pipe, as `(status, bytes)`.
    calls: Vec<(u32, u32, Vec<u8>)>,
}

/// Collect a worker's events until it exits.
async fn run_to_exit(cmd: &WorkerCommand, stdin_line: Option<&str>) -> (String, String, String) {
    let r = run(cmd, stdin_line).await;
    (r.out, r.err, r.status)
}

async fn run(cmd: &WorkerCommand, stdin_line: Option<&str>) -> Run {
    let (tx, mut rx) = mpsc::channel(64);
    let mut w = Worker::spawn(cmd, 7, tx).unwrap();
    if let Some(l) = stdin_line {
        w.send_line(l).await.unwrap();
    }
    let (mut out, mut err, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let (generation, ev) = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("worker events").expect("open");
        assert_eq!(generation, 7);
        match ev {
            WorkerEvent::Stdout(b) => out.extend(b),
            WorkerEvent::Stderr(b) => err.extend(b),
            WorkerEvent::CallResult { status, ends, data } => calls.push((status, ends, data)),
            WorkerEvent::Exited(status) => {
                return Run { out: String::from_utf8(out).unwrap(), err: String::from_utf8(err).unwrap(), status, calls };
            }
        }
    }
}

#[tokio::test]
async fn output_then_abort_is_reported_with_the_signal() {
    let cmd = sh("echo user line; echo EVCXR_BEGIN_CONTENT text/plain; echo 42; echo EVCXR_END_CONTENT; echo oops >&2; kill -ABRT $$");
    let (out, err, status) = run_to_exit(&cmd, None).await;
    assert_eq!(status, "signal 6 (SIGABRT)");
    assert_eq!(err, "oops\n");
    let mut p = StdoutParser::new();
    let mut ev = p.feed(out.as_bytes());
    ev.extend(p.finish());
    assert_eq!(ev, vec![StdoutEvent::Text("user line\n".into()), StdoutEvent::Content { mime: "text/plain".into(), data: "42".into() }]);
}

#[tokio::test]
async fn closure_results_arrive_framed_on_the_result_pipe() {
    // A fake worker: prints, then writes two framed results on fd 3 ([status u32][ends u32]
    // [len u64][bytes]).
    let cmd = sh(
        r"echo printed by the closure; printf '\000\000\000\000\003\000\000\000\005\000\000\000\000\000\000\000hello\001\000\000\000\000\000\000\000\004\000\000\000\000\000\000\000boom' >&3",
    );
    let r = run(&cmd, None).await;
    assert_eq!(r.out, "printed by the closure\n");
    assert_eq!(r.calls, vec![(0, 3, b"hello".to_vec()), (1, 0, b"boom".to_vec())]);
    assert_eq!(r.status, "exit status 0");
}

#[tokio::test]
async fn stdin_lines_reach_the_worker_and_exit_codes_are_described() {
    let cmd = sh("read line; echo \"got $line\"; printf 'partial'; exit 3");
    let (out, _, status) = run_to_exit(&cmd, Some("LOAD_AND_RUN /x.so f")).await;
    assert_eq!(out, "got LOAD_AND_RUN /x.so f\npartial");
    assert_eq!(status, "exit status 3");
}

#[tokio::test]
async fn a_grandchild_holding_the_pipes_does_not_hide_the_exit() {
    let cmd = sh("sleep 30 & echo $! >&2; exit 0");
    let (_, err, status) = run_to_exit(&cmd, None).await;
    assert_eq!(status, "exit status 0");
    // Clean up the grandchild (started by this test).
    let pid: i32 = err.trim().parse().unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[tokio::test]
async fn killing_a_worker_is_seen_as_sigkill() {
    let (tx, mut rx) = mpsc::channel(64);
    let mut w = Worker::spawn(&sh("echo ready; sleep 30"), 1, tx).unwrap();
    let (_, first) = rx.recv().await.unwrap();
    assert!(matches!(first, WorkerEvent::Stdout(_)));
    w.kill();
    let status = loop {
        if let (_, WorkerEvent::Exited(s)) = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap() {
            break s;
        }
    };
    assert_eq!(status, "signal 9 (SIGKILL)");
}

fn real_worker(input: &str) -> (Option<i32>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ipengine"))
        .env("RPX_ENGINE_WORKER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_worker_rejects_unknown_lines_with_status_99() {
    let (code, err) = real_worker("HELLO\n");
    assert_eq!(code, Some(99));
    assert!(err.contains("unrecognised line \"HELLO\""), "{err}");
}

#[test]
fn the_worker_reports_a_missing_library_with_status_99() {
    let (code, err) = real_worker("LOAD_AND_RUN /nonexistent/libcode_1.so run_user_code_1\n");
    assert_eq!(code, Some(99));
    assert!(err.contains("dlopen failed for /nonexistent/libcode_1.so"), "{err}");
}

#[test]
fn the_worker_exits_cleanly_at_end_of_input() {
    assert_eq!(real_worker("").0, Some(0));
}
