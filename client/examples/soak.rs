//! The rpx side of the soak benchmark (`bench/soak_bench.py` runs it and samples RSS): `--tasks`
//! trivial load-balanced tasks, `rpx::remote!(|x: u64| x + 1)` through `client.view()`, one
//! `apply_async` per item (one task per item, as `map` at chunksize 1), with a backlog of
//! `--backlog` tasks outstanding at all times.
//!
//! ```sh
//! cargo build --release -p rpx --example soak
//! target/release/examples/soak --file $RPX_DIR/profile_default/security/ipcontroller-client.json \
//!     [--tasks 1000000] [--backlog 40000] [--time-limit S] [--drain-limit S] [--engines 2]
//! ```
//! Shape: submit `--backlog` tasks, then wait for the oldest outstanding task, check its value,
//! drop its handle (so the client keeps nothing of it), collect every other finished task at the
//! front of the queue, and top up to `--backlog` outstanding until `--tasks` were submitted (or
//! `--time-limit` seconds have passed: then submission stops and the backlog drains). Nothing is
//! purged on the controller.
//!
//! Prints `progress <done> <submitted> <elapsed_s>` on stdout about every 250 ms, and a final
//! JSON line `{"done": .., "elapsed_s": .., ...}`.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

struct Args {
    file: String,
    tasks: u64,
    backlog: usize,
    time_limit: Option<f64>,
    drain_limit: Option<f64>,
    engines: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { file: String::new(), tasks: 1_000_000, backlog: 40_000, time_limit: None, drain_limit: None, engines: 2 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => a.file = val()?,
            "--tasks" => a.tasks = val()?.replace('_', "").parse().map_err(|e| format!("--tasks: {e}"))?,
            "--backlog" => a.backlog = val()?.replace('_', "").parse().map_err(|e| format!("--backlog: {e}"))?,
            "--time-limit" => a.time_limit = Some(val()?.parse().map_err(|e| format!("--time-limit: {e}"))?),
            "--drain-limit" => a.drain_limit = Some(val()?.parse().map_err(|e| format!("--drain-limit: {e}"))?),
            "--engines" => a.engines = val()?.parse().map_err(|e| format!("--engines: {e}"))?,
            "-h" | "--help" => {
                println!("usage: soak --file CLIENT.json [--tasks N] [--backlog B] [--time-limit S] [--drain-limit S] [--engines N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.file.is_empty() {
        return Err("--file CLIENT.json is required".into());
    }
    if a.backlog == 0 {
        return Err("--backlog must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("soak: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> rpx::Result<()> {
    let client = rpx::Client::from_file(&args.file)?;
    client.wait_for_engines(args.engines, Duration::from_secs(120))?;
    let lb = client.view().chunksize(1);
    let f = rpx::remote!(|x: u64| x + 1);
    // Compile the closure (and warm the path) before the clock starts.
    let v: u64 = lb.apply(f, (41u64,))?;
    assert_eq!(v, 42);

    let mut out = std::io::stdout().lock();
    let mut outstanding: VecDeque<(u64, rpx::AsyncResult<u64>)> = VecDeque::with_capacity(args.backlog);
    let (mut submitted, mut done) = (0u64, 0u64);
    let mut max_outstanding = 0usize;
    let start = Instant::now();
    let deadline = args.time_limit.map(|s| start + Duration::from_secs_f64(s));
    let mut next_report = start;
    let mut stopped_by_time = false;
    let mut abandoned = 0usize;
    let _ = writeln!(out, "progress 0 0 0.000");
    let _ = out.flush();
    loop {
        // Top up to the backlog.
        while outstanding.len() < args.backlog && submitted < args.tasks && !stopped_by_time {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                stopped_by_time = true;
                break;
            }
            outstanding.push_back((submitted, lb.apply_async(f, (submitted,))?));
            submitted += 1;
            if submitted % 1000 == 0 && Instant::now() >= next_report {
                let _ = writeln!(out, "progress {done} {submitted} {:.3}", start.elapsed().as_secs_f64());
                let _ = out.flush();
                next_report = Instant::now() + Duration::from_millis(250);
            }
        }
        max_outstanding = max_outstanding.max(outstanding.len());
        if let (true, Some(d), Some(drain)) = (stopped_by_time, deadline, args.drain_limit) {
            if Instant::now() >= d + Duration::from_secs_f64(drain) {
                abandoned = outstanding.len();
                break;
            }
        }
        let Some((i, ar)) = outstanding.pop_front() else { break };
        // The oldest: wait for it; then every finished one behind it.
        let v = ar.get()?;
        assert_eq!(v, i + 1, "task {i}");
        done += 1;
        while outstanding.front().is_some_and(|(_, ar)| ar.ready()) {
            let (i, ar) = outstanding.pop_front().expect("front exists");
            assert_eq!(ar.get()?, i + 1, "task {i}");
            done += 1;
        }
        let now = Instant::now();
        if now >= next_report {
            let _ = writeln!(out, "progress {done} {submitted} {:.3}", start.elapsed().as_secs_f64());
            let _ = out.flush();
            next_report = now + Duration::from_millis(250);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = writeln!(out, "progress {done} {submitted} {elapsed:.3}");
    let summary = serde_json::json!({
        "done": done,
        "submitted": submitted,
        "elapsed_s": elapsed,
        "tasks_per_s": done as f64 / elapsed,
        "max_outstanding": max_outstanding,
        "backlog": args.backlog,
        "stopped_by_time": stopped_by_time,
        "abandoned": abandoned,
    });
    let _ = writeln!(out, "{summary}");
    let _ = out.flush();
    if abandoned > 0 {
        std::process::exit(0); // do not wait for the abandoned backlog
    }
    client.close();
    Ok(())
}
