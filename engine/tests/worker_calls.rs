//! Closure calls in the real worker process, as the engine hands them over: a call's output on
//! stdout and stderr reaches the engine before the call's result, or the result announces an
//! end marker that follows it on that stream; a quiet call is answered by its result alone.

mod common;

use std::time::Duration;

use common::{build_cells, rustc_libdir};

use rpx_engine::child::{Worker, WorkerCommand, WorkerEvent};
use rpx_engine::output::{StderrMarks, StderrPiece, StdoutEvent, StdoutParser};
use rpx_worker::process::{END_ON_STDERR, END_ON_STDOUT};
use tokio::sync::mpsc;

/// Closures with `rpx_runtime::abi`'s signature: `quiet` only answers, `loud` prints its
/// argument on both streams (odd ones without a newline) and answers it, `closes_stdout` closes
/// the worker's stdout and answers.
const CLOSURES: &str = r#"
use std::ffi::c_void;
type Sink = extern "C" fn(*mut c_void, *const u8, usize);

#[no_mangle]
pub unsafe extern "C" fn quiet(_mode: u32, args: *const u8, len: usize, sink: Sink, ctx: *mut c_void) -> u32 {
    sink(ctx, args, len);
    0
}

#[no_mangle]
pub unsafe extern "C" fn loud(_mode: u32, args: *const u8, len: usize, sink: Sink, ctx: *mut c_void) -> u32 {
    use std::io::Write;
    let x = std::slice::from_raw_parts(args, len)[0];
    if x % 2 == 1 {
        print!("out {x}");
        eprint!("err {x}");
    } else {
        println!("out {x}");
        eprintln!("err {x}");
    }
    std::io::stdout().flush().unwrap();
    sink(ctx, args, len);
    0
}

extern "C" {
    fn close(fd: i32) -> i32;
}

#[no_mangle]
pub unsafe extern "C" fn closes_stdout(_mode: u32, args: *const u8, len: usize, sink: Sink, ctx: *mut c_void) -> u32 {
    close(1);
    sink(ctx, args, len);
    0
}
"#;

/// What the engine learns of one call: its result, and the output it had on each stream when
/// the call's output was all in (at the result, or at the marker the result announced).
#[derive(Debug, PartialEq)]
struct Seen {
    result: Vec<u8>,
    ends: u32,
    stdout: String,
    stderr: String,
}

/// Run one call and follow the worker's events until its output is all in, as the engine does.
async fn call(w: &mut Worker, rx: &mut mpsc::Receiver<(u64, WorkerEvent)>, so: &str, f: &str, x: u8) -> Seen {
    w.send_calls(so, f, 0, &[&[x]]).await.unwrap();
    let (mut parser, mut marks) = (StdoutParser::new(), StderrMarks::default());
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let (mut result, mut ends) = (None, 0);
    // Ends still awaited: before the result both, after it those it announced.
    let (mut out_open, mut err_open) = (true, true);
    while result.is_none() || out_open || err_open {
        let (_, ev) = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("worker events").expect("open");
        match ev {
            WorkerEvent::Stdout(b) => {
                for e in parser.feed(&b) {
                    match e {
                        StdoutEvent::Text(t) => stdout.push_str(&t),
                        StdoutEvent::CallEnd => out_open = false,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            WorkerEvent::Stderr(b) => {
                for p in marks.feed(&String::from_utf8_lossy(&b)) {
                    match p {
                        StderrPiece::Text(t) => stderr.push_str(&t),
                        StderrPiece::CallEnd => err_open = false,
                    }
                }
            }
            WorkerEvent::CallResult { status, ends: e, data } => {
                assert_eq!(status, 0);
                assert!(out_open && err_open, "an end marker came before the result");
                (result, ends) = (Some(data), e);
                // A stream without a marker was read to its end: what is held back is its last text.
                if e & END_ON_STDOUT == 0 {
                    stdout.extend(parser.take_call_tail());
                    out_open = false;
                }
                if e & END_ON_STDERR == 0 {
                    stderr.extend(marks.take_held());
                    err_open = false;
                }
            }
            WorkerEvent::Exited(st) => panic!("the worker exited: {st}"),
        }
    }
    Seen { result: result.expect("a result"), ends, stdout, stderr }
}

#[tokio::test]
async fn a_calls_output_is_in_before_its_result_or_ends_at_the_marker_it_announces() {
    let dir = tempfile::tempdir().unwrap();
    let so = build_cells(dir.path(), CLOSURES, &["-C", "opt-level=2"]).display().to_string();
    let mut cmd = WorkerCommand::this_binary(&[rustc_libdir()]).unwrap();
    cmd.program = env!("CARGO_BIN_EXE_ipengine").into();
    let (tx, mut rx) = mpsc::channel(256);
    let mut w = Worker::spawn(&cmd, 1, tx).unwrap();

    // Quiet calls: the result alone, no marker on either stream.
    for x in 0..50u8 {
        let seen = call(&mut w, &mut rx, &so, "quiet", x).await;
        assert_eq!(seen, Seen { result: vec![x], ends: 0, stdout: String::new(), stderr: String::new() });
    }
    // Calls that print: each call's output, exactly, whichever way it was ended.
    let mut marked = 0;
    for x in 0..100u8 {
        let seen = call(&mut w, &mut rx, &so, "loud", x).await;
        let nl = if x % 2 == 1 { "" } else { "\n" };
        assert_eq!((seen.result, seen.stdout, seen.stderr), (vec![x], format!("out {x}{nl}"), format!("err {x}{nl}")), "call {x}");
        marked += (seen.ends != 0) as u32;
    }
    // How often the engine had not read the output yet when the call returned (for the record).
    eprintln!("{marked} of 100 printing calls ended with a marker");
    // A quiet call after them is answered by its result alone again.
    let seen = call(&mut w, &mut rx, &so, "quiet", 7).await;
    assert_eq!((seen.ends, seen.stdout.as_str(), seen.stderr.as_str()), (0, "", ""));
    // User code that closes stdout: no marker can follow on it, and none is announced (the
    // engine would wait for it); the worker goes on answering.
    let seen = call(&mut w, &mut rx, &so, "closes_stdout", 8).await;
    assert_eq!((seen.result, seen.ends & END_ON_STDOUT), (vec![8], 0));
    let seen = call(&mut w, &mut rx, &so, "quiet", 9).await;
    assert_eq!((seen.result, seen.ends), (vec![9], 0));
}
