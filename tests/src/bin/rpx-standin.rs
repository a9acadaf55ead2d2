//! `rpx-standin`: N stand-in engines (see `rpx_tests::standin`) registering at once with a
//! controller (rpx's or ipyparallel's), then answering its heartbeats until told to stop.
//!
//! ```text
//! rpx-standin --engine-file ENGINE.json --client-file CLIENT.json -n 1000
//!             [--within SECS] [--hold SECS] [--threads K]
//! ```
//! Signals on stdout, one line each, in this order:
//! - `registered <announced> <seconds to the last announcement>` once every stand-in's
//!   `registration_notification` has been seen (or `--within` ran out);
//! - then the stand-ins keep answering pings until a line (or EOF) on stdin, or `--hold` seconds;
//! - `result <json>`: counts (announced, in the hub's `connection_request` list, replies,
//!   failures, resends, unregistered meanwhile, pongs while held) and times.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rpx_tests::standin::{self, Counters, Endpoints, Observer, Options};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let mut engine_file: Option<PathBuf> = None;
    let mut client_file: Option<PathBuf> = None;
    let (mut n, mut within, mut hold, mut threads) = (100usize, 120.0f64, 600.0f64, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--engine-file" => engine_file = Some(val()?.into()),
            "--client-file" => client_file = Some(val()?.into()),
            "-n" => n = val()?.parse()?,
            "--within" => within = val()?.parse()?,
            "--hold" => hold = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            other => bail!("unknown argument {other:?} (see the doc comment of rpx-standin)"),
        }
    }
    let engine = Endpoints::read(&engine_file.context("--engine-file is required")?)?;
    let client = Endpoints::read(&client_file.context("--client-file is required")?)?;
    let limit = standin::raise_open_files_limit();
    if (limit as usize) < n * 6 + 64 {
        eprintln!("rpx-standin: warning: the open-file limit {limit} may be too low for {n} stand-ins (5 sockets each)");
    }
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    rt.block_on(run(engine, client, n, Duration::from_secs_f64(within), Duration::from_secs_f64(hold)))
}

async fn run(engine: Endpoints, client: Endpoints, n: usize, within: Duration, hold: Duration) -> anyhow::Result<()> {
    let mut observer = Observer::connect(&client).await?;
    let uuids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let want: HashSet<String> = uuids.iter().cloned().collect();
    let counters = Arc::new(Counters::default());
    let opts = Options { register_within: within, ..Options::default() };
    let t0 = Instant::now();
    let handles = standin::spawn_many(&engine, &uuids, &opts, &counters, t0);
    let announced = observer.wait_registered(&want, within + Duration::from_secs(5)).await;
    let last = want.iter().filter_map(|u| observer.registered.get(u)).max().map(|t| t.duration_since(t0).as_secs_f64());
    let mut times: Vec<f64> = want.iter().filter_map(|u| observer.registered.get(u)).map(|t| t.duration_since(t0).as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    println!("registered {announced} {:.3}", last.unwrap_or(f64::NAN));
    std::io::stdout().flush()?;
    let mut standins = Vec::new();
    for h in handles {
        if let Ok(Some(s)) = h.await {
            standins.push(s);
        }
    }
    // Held: the stand-ins answer pings until told to stop (a line or EOF on stdin) or `hold`.
    let pongs_before = counters.pongs.load(Ordering::Relaxed);
    let held_from = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stop_tx.send(());
    });
    let _ = tokio::time::timeout(hold, stop_rx).await;
    let held = held_from.elapsed().as_secs_f64();
    let pongs = counters.pongs.load(Ordering::Relaxed) - pongs_before;
    observer.refresh();
    let hub = observer.engines(Duration::from_secs(30)).await?;
    let in_hub = hub.values().filter(|u| want.contains(*u)).count();
    let unregistered = observer.unregistered.iter().filter(|u| want.contains(*u)).count();
    let mut reply_s: Vec<f64> = counters.reply_us.lock().unwrap().iter().map(|us| *us as f64 / 1e6).collect();
    reply_s.sort_by(f64::total_cmp);
    let median = |v: &[f64]| if v.is_empty() { f64::NAN } else { v[v.len() / 2] };
    let result = json!({
        "n": n,
        "announced": announced,
        "in_hub": in_hub,
        "replies_ok": counters.replies.load(Ordering::Relaxed),
        "failures": counters.failures.load(Ordering::Relaxed),
        "resends": counters.resends.load(Ordering::Relaxed),
        "errors": *counters.errors.lock().unwrap(),
        "unregistered": unregistered,
        "last_registration_s": last,
        "median_registration_s": median(&times),
        "last_reply_s": reply_s.last(),
        "median_reply_s": median(&reply_s),
        "held_s": held,
        "pongs_while_held": pongs,
        "standins_alive": standins.len(),
    });
    println!("result {result}");
    std::io::stdout().flush()?;
    drop(standins);
    Ok(())
}
