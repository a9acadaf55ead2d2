//! SIGINT to the real worker process while it runs cells shaped like evcxr's (an `extern "C"`
//! function running the user code inside `catch_unwind`, in a cdylib linked to std dynamically):
//! the cell stops, the worker reports it interrupted and keeps its store; SIGINT while idle does
//! nothing. Each case prints how long the interrupt took (for the record, not asserted);
//! `RPX_INTERRUPT_ROUNDS=N` interrupts each cell N times (default 5).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{build_cells, rustc_libdir};

use rpx_engine::child::{Worker, WorkerCommand, WorkerEvent};
use rpx_engine::output::{StdoutEvent, StdoutParser};
use tokio::sync::mpsc;

/// Cells built at evcxr's default optimisation level.
const EVCXR_OPT: &[&str] = &["-C", "opt-level=2"];

const CELLS: &str = r#"
use std::ffi::c_void;
use std::hint::black_box;

fn slot(store: *mut c_void) -> &'static mut u64 {
    unsafe { &mut *(store as *mut u64) }
}

#[no_mangle]
pub extern "C" fn set_kept(store: *mut c_void) -> *mut c_void {
    let s = if store.is_null() { Box::into_raw(Box::new(0u64)) } else { store as *mut u64 };
    unsafe { *s = 41 };
    s as *mut c_void
}

#[no_mangle]
pub extern "C" fn print_kept(store: *mut c_void) -> *mut c_void {
    println!("kept+1={}", *slot(store) + 1);
    store
}

macro_rules! cell {
    ($name:ident, $kept:ident, $body:block) => {
        #[no_mangle]
        pub extern "C" fn $name(store: *mut c_void) -> *mut c_void {
            let $kept = slot(store);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                println!("started");
                $body
            })) {
                Ok(_) => {}
                Err(_) => println!("EVCXR_PANIC_NOTIFICATION"),
            }
            store
        }
    };
}

cell!(cell_sleep, _k, { std::thread::sleep(std::time::Duration::from_secs(60)); });
cell!(cell_calls, _k, { loop { black_box(vec![1u8; 10]); } });
cell!(cell_yield, _k, { for i in 0u64.. { if i % 1000 == 0 { std::thread::yield_now(); } black_box(i); } });
cell!(cell_tight, _k, { let mut x = 0u64; loop { x = black_box(x.wrapping_add(1)); } });
cell!(cell_tight_with_drop, _k, {
    let s = String::from("held across the loop");
    let mut x = 0u64;
    loop { x = black_box(x.wrapping_add(s.len() as u64)); }
});
cell!(cell_mutex, _k, {
    let m = std::sync::Mutex::new(0u64);
    loop { *m.lock().unwrap() += 1; black_box(&m); }
});
cell!(cell_print, _k, { loop { println!("spam"); } });
cell!(cell_threads, _k, {
    // Waits for its own threads (std's futex wait): not interruptible by design.
    std::thread::scope(|s| { s.spawn(|| std::thread::sleep(std::time::Duration::from_secs(60))); });
});
#[inline(never)]
fn step(v: &mut Vec<u64>, i: u64) {
    v.push(i);
    if v.len() > 1000 {
        v.clear();
    }
}
cell!(cell_fn_calls, _k, { let mut v = Vec::new(); for i in 0u64.. { step(&mut v, i); } });
cell!(cell_quick, kept, { *kept += 0; });
cell!(cell_clock, _k, {
    let t = std::time::Instant::now();
    let mut x = 0u64;
    while t.elapsed().as_secs() < 60 { for _ in 0..1000 { x = black_box(x + 1); } }
});

#[no_mangle]
pub extern "C" fn cell_sleep_no_catch(store: *mut c_void) -> *mut c_void {
    println!("started");
    std::thread::sleep(std::time::Duration::from_secs(60));
    store
}
"#;

struct W {
    w: Worker,
    rx: mpsc::Receiver<(u64, WorkerEvent)>,
    parser: StdoutParser,
    so: String,
    text: String,
}

/// How a cell run ended.
#[derive(Debug, PartialEq)]
enum End {
    Complete { panicked: bool, interrupted: bool },
    Exited(String),
}

impl W {
    fn start(so: &Path) -> W {
        let mut cmd = WorkerCommand::this_binary(&[rustc_libdir()]).unwrap();
        cmd.program = env!("CARGO_BIN_EXE_ipengine").into();
        let (tx, rx) = mpsc::channel(256);
        let w = Worker::spawn(&cmd, 1, tx).unwrap();
        W { w, rx, parser: StdoutParser::new(), so: so.display().to_string(), text: String::new() }
    }

    async fn load(&mut self, f: &str) {
        self.w.send_line(&format!("LOAD_AND_RUN {} {f}", self.so)).await.unwrap();
    }

    /// Events until the cell completes or the worker exits, or `limit` passes (None).
    async fn until_end(&mut self, limit: Duration, mut on_text: impl FnMut(&str) -> bool) -> Option<End> {
        let deadline = tokio::time::Instant::now() + limit;
        let (mut panicked, mut interrupted) = (false, false);
        loop {
            let (_, ev) = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(ev) => ev.expect("events"),
            };
            match ev {
                WorkerEvent::Stdout(b) => {
                    for e in self.parser.feed(&b) {
                        match e {
                            StdoutEvent::Text(t) => {
                                self.text.push_str(&t);
                                if on_text(&self.text) {
                                    return None;
                                }
                            }
                            StdoutEvent::Panic => panicked = true,
                            StdoutEvent::Interrupted => interrupted = true,
                            StdoutEvent::Complete => return Some(End::Complete { panicked, interrupted }),
                            _ => {}
                        }
                    }
                }
                WorkerEvent::Stderr(b) => eprint!("[worker stderr] {}", String::from_utf8_lossy(&b)),
                WorkerEvent::CallResult { .. } => {}
                WorkerEvent::Exited(st) => return Some(End::Exited(st)),
            }
        }
    }

    /// Run a cell to completion.
    async fn run(&mut self, f: &str) -> End {
        self.text.clear();
        self.load(f).await;
        self.until_end(Duration::from_secs(30), |_| false).await.expect("the cell completes")
    }

    /// Start `f`, wait until it printed "started", then interrupt it as the engine does (again
    /// every 250 ms) for up to `grace`. Returns how it ended (None: still running) and how long
    /// it took.
    async fn interrupt(&mut self, f: &str, grace: Duration) -> (Option<End>, Duration) {
        self.text.clear();
        self.load(f).await;
        let started = self.until_end(Duration::from_secs(30), |t| t.contains("started\n")).await;
        assert_eq!(started, None, "{f} started");
        // Let it get past printing "started" into its loop (not an assertion on time).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        loop {
            self.w.interrupt().unwrap();
            if let Some(end) = self.until_end(Duration::from_millis(250), |_| false).await {
                return (Some(end), t0.elapsed());
            }
            if t0.elapsed() > grace {
                return (None, t0.elapsed());
            }
        }
    }
}

const INTERRUPTED: End = End::Complete { panicked: true, interrupted: true };

#[tokio::test]
async fn sigint_unwinds_blocked_and_calling_cells_and_keeps_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let so = build_cells(dir.path(), CELLS, EVCXR_OPT);
    let mut w = W::start(&so);
    assert_eq!(w.run("set_kept").await, End::Complete { panicked: false, interrupted: false });

    // Idle: SIGINT is ignored.
    w.w.interrupt().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.w.interrupt().unwrap();
    assert_eq!(w.run("print_kept").await, End::Complete { panicked: false, interrupted: false });
    assert!(w.text.contains("kept+1=42"), "{}", w.text);

    for cell in ["cell_sleep", "cell_fn_calls", "cell_yield", "cell_clock", "cell_print"] {
        let mut times = Vec::new();
        let rounds: usize = std::env::var("RPX_INTERRUPT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
        for _ in 0..rounds {
            let (end, took) = w.interrupt(cell, Duration::from_secs(10)).await;
            assert_eq!(end, Some(INTERRUPTED), "{cell}");
            times.push(took);
            assert_eq!(w.run("print_kept").await, End::Complete { panicked: false, interrupted: false });
            assert!(w.text.contains("kept+1=42"), "{cell}: store kept: {}", w.text);
        }
        times.sort();
        eprintln!(
            "MEASURED {cell}: {} interrupts, time to stop min {:?} median {:?} max {:?}",
            times.len(),
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    // A quick cell after all that runs normally.
    assert_eq!(w.run("cell_quick").await, End::Complete { panicked: false, interrupted: false });
}

#[tokio::test]
async fn sigint_on_code_that_cannot_be_unwound_leaves_it_running() {
    let dir = tempfile::tempdir().unwrap();
    let so = build_cells(dir.path(), CELLS, EVCXR_OPT);
    for cell in ["cell_calls", "cell_mutex", "cell_tight", "cell_tight_with_drop", "cell_threads", "cell_sleep_no_catch"] {
        let mut w = W::start(&so);
        assert_eq!(w.run("set_kept").await, End::Complete { panicked: false, interrupted: false });
        let (end, took) = w.interrupt(cell, Duration::from_secs(2)).await;
        eprintln!("MEASURED {cell}: {end:?} after {took:?}");
        match end {
            // Not interruptible here: it keeps running (the engine kills it after its grace).
            None => {
                w.w.kill();
                let end = w.until_end(Duration::from_secs(20), |_| false).await;
                assert_eq!(end, Some(End::Exited("signal 9 (SIGKILL)".into())), "{cell}");
            }
            Some(end) => {
                assert_eq!(end, INTERRUPTED, "{cell}: interrupted cleanly or not at all, never a crash");
                assert_eq!(w.run("print_kept").await, End::Complete { panicked: false, interrupted: false });
                assert!(w.text.contains("kept+1=42"), "{cell}: {}", w.text);
            }
        }
    }
}
