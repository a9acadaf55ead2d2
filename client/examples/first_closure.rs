//! The first call of a new `remote!` closure on a warm cluster, and the compiler's memory.
//!
//! For each of `RUNS` (3) fresh 2-engine clusters: start, run one cell (the cells' compiler
//! context is then warm), wait until the compiler and its children are idle (under 5% of a core
//! for 2 s and no cargo or rustc running under it, at most 180 s), then time the first call of a closure nobody compiled yet, then a
//! second new closure. The compiler's RSS (its own and with its child processes) is read when
//! idle before the first closure and again after the second. With `--cold`, the first closure
//! is called as soon as the engines are registered (no cell, no wait): the latency from
//! `ipcluster start` a user sees at worst.
//!
//! ```sh
//! cargo run --release -p rpx --example first_closure -- [--cold] [OUT.json]   # RUNS (3)
//! ```
//! `RPX_BIN_DIR` selects the binaries (ipcluster, rpx-compiler, ...) to measure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rpx::remote;
use serde_json::json;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// (pid, ppid, utime+stime ticks, rss pages) of every process.
fn procs() -> Vec<(i64, i64, u64, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name, which may contain spaces.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push((pid, num(1) as i64, num(11) + num(12), num(21)));
    }
    out
}

/// Whether a cargo or rustc runs under `root` (a build, however starved of CPU).
fn building(root: i64) -> bool {
    let all = procs();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid != root && (comm.trim() == "cargo" || comm.trim() == "rustc") {
            return true;
        }
        stack.extend(all.iter().filter(|p| p.1 == pid).map(|p| p.0));
    }
    false
}

/// `root` and its descendants: (cpu ticks, rss bytes of root, rss bytes of the tree).
fn tree(root: i64) -> (u64, u64, u64) {
    let all = procs();
    let mut children: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, p) in all.iter().enumerate() {
        children.entry(p.1).or_default().push(i);
    }
    let page = 4096u64;
    let (mut cpu, mut own, mut total) = (0, 0, 0);
    let mut stack: Vec<usize> = all.iter().position(|p| p.0 == root).into_iter().collect();
    while let Some(i) = stack.pop() {
        let p = all[i];
        cpu += p.2;
        total += p.3 * page;
        if p.0 == root {
            own = p.3 * page;
        }
        stack.extend(children.get(&p.0).into_iter().flatten().copied());
    }
    (cpu, own, total)
}

/// Wait until the compiler's process tree uses under 5% of a core over 2 s and runs no cargo
/// or rustc (at most `limit`).
fn wait_idle(root: i64, limit: Duration) -> f64 {
    let t0 = Instant::now();
    let ticks = 100.0; // USER_HZ
    let mut last = tree(root).0;
    while t0.elapsed() < limit {
        std::thread::sleep(Duration::from_secs(2));
        let now = tree(root).0;
        let used = (now - last) as f64 / ticks / 2.0;
        last = now;
        if used < 0.05 && !building(root) {
            break;
        }
    }
    t0.elapsed().as_secs_f64()
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> rpx::Result<()> {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cold = args.iter().any(|a| a == "--cold");
    let out_path = args.iter().find(|a| !a.starts_with("--")).cloned();
    let mut per_run = Vec::new();
    for run in 0..runs {
        let t_start = Instant::now();
        let cluster = rpx_tests::TestCluster::start(2);
        let client = rpx::Client::from_file(cluster.client_file())?;
        client.wait_for_engines(2, Duration::from_secs(120))?;
        let registered_s = t_start.elapsed().as_secs_f64();
        let compiler = cluster.cluster_state().and_then(|s| s["compiler_pid"].as_i64()).expect("compiler pid");
        let dv0 = client.direct_view(0);
        let mut rec = serde_json::Map::new();
        rec.insert("engines_registered_s".into(), json!(registered_s));
        if !cold {
            let t = Instant::now();
            client.direct_view(..).execute("let rpx_bench_warm: u64 = 1;")?;
            rec.insert("first_cell_s".into(), json!(t.elapsed().as_secs_f64()));
            rec.insert("idle_wait_s".into(), json!(wait_idle(compiler, Duration::from_secs(180))));
            let (_, own, total) = tree(compiler);
            rec.insert("compiler_rss_idle_mib".into(), json!(own as f64 / MIB));
            rec.insert("compiler_tree_rss_idle_mib".into(), json!(total as f64 / MIB));
        }
        let nonce = std::process::id() as u64 + run as u64;
        let t = Instant::now();
        let r: Vec<u64> = dv0.apply(remote!(|x: u64| x ^ 0x5eed), (nonce,))?;
        let first = t.elapsed().as_secs_f64();
        assert_eq!(r[0], nonce ^ 0x5eed);
        let t = Instant::now();
        let r: Vec<u64> = dv0.apply(remote!(|x: u64| x.wrapping_mul(3) + 1), (nonce,))?;
        let second = t.elapsed().as_secs_f64();
        assert_eq!(r[0], nonce.wrapping_mul(3) + 1);
        let (_, own, total) = tree(compiler);
        rec.insert("first_closure_s".into(), json!(first));
        rec.insert("second_closure_s".into(), json!(second));
        rec.insert("first_closure_from_start_s".into(), json!(t_start.elapsed().as_secs_f64() - second));
        rec.insert("compiler_rss_after_mib".into(), json!(own as f64 / MIB));
        rec.insert("compiler_tree_rss_after_mib".into(), json!(total as f64 / MIB));
        eprintln!("run {run}: {}", serde_json::Value::Object(rec.clone()));
        per_run.push(serde_json::Value::Object(rec));
        drop(cluster);
    }
    let mut medians = serde_json::Map::new();
    if let Some(first) = per_run.first().and_then(|r| r.as_object()) {
        for key in first.keys() {
            let xs: Vec<f64> = per_run.iter().filter_map(|r| r[key].as_f64()).collect();
            medians.insert(key.clone(), json!(median(xs)));
        }
    }
    let report = json!({
        "mode": if cold { "cold" } else { "warm" },
        "bin_dir": rpx_tests::bin_dir().display().to_string(),
        "runs": per_run,
        "median": medians,
    });
    let text = serde_json::to_string_pretty(&report).expect("serializes");
    println!("{text}");
    if let Some(p) = out_path {
        std::fs::write(&p, text + "\n").expect("write the report");
    }
    Ok(())
}
