//! rpx's client benchmark, in the shapes of ipyparallel's peer benchmark
//! (`../shared/bench/peers/ipp_ops.py latency throughput data`) so the two compare side by side:
//! on a 2-engine cluster, one trivial apply round trip (direct and load-balanced), 10,000
//! trivial load-balanced tasks at chunksize 1, a direct map over both engines, 100 MB push, pull
//! (into a new vector, and read where it lies with `pull_view`),
//! scatter and gather, and the compile of a new closure against later calls of it (as soon as the
//! cluster is up, and again on a warm cluster), and where a direct round trip's time goes.
//!
//! ```sh
//! cargo run --release -p rpx --example bench_ops -- [OUT.json]   # BENCH_REPS (3), BENCH_N (2)
//! BENCH_ONLY=latency|throughput|data, BENCH_NTASKS (10,000), BENCH_NBYTES (1e8)
//! ```
//! It starts its own cluster (`ipcluster start --daemonize` under a private `RPX_DIR`) from the
//! binaries next to this one, and prints min/median/max per measure as JSON.

use std::time::{Duration, Instant};

use rpx::remote;
use serde_json::json;

fn stats(mut xs: Vec<f64>) -> serde_json::Value {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let med = if xs.len() % 2 == 1 { xs[xs.len() / 2] } else { (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0 };
    json!({"min": xs[0], "median": med, "max": xs[xs.len() - 1], "n": xs.len()})
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[xs.len() / 2]
}

/// Clock ticks per second of `/proc`'s CPU times.
fn tick() -> f64 {
    // SAFETY: plain sysconf query.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds (user + system) used so far by process `pid` (or `self`).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / tick())
}

/// CPU seconds (user + system) used so far by this process (`client`) and by each kind of
/// process of the cluster under `rpx_dir` (found by their environment), summed per kind.
fn cpu_by_role(rpx_dir: &std::path::Path) -> std::collections::BTreeMap<&'static str, f64> {
    let mut out = std::collections::BTreeMap::new();
    out.insert("client", cpu_seconds("self").unwrap_or(0.0));
    for p in rpx_tests::processes_mentioning(&rpx_dir.display().to_string()) {
        let environ = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
        let role = if environ.windows(19).any(|w| w == b"RPX_ENGINE_WORKER=1") {
            "worker"
        } else if p.cmdline.contains("ipcontroller") {
            "controller"
        } else if p.cmdline.contains("ipengine") {
            "engine"
        } else {
            // The compiler and what it runs (cargo, rustc warming the closure crate's
            // dependencies after start-up), and ipcluster.
            "compiler"
        };
        *out.entry(role).or_insert(0.0) += cpu_seconds(&p.pid.to_string()).unwrap_or(0.0);
    }
    out
}

/// Wait until the machine is quiet, as the peers' scripts do before they measure
/// (`../shared/bench/peers/common.py`, `wait_quiet`): every other process together uses under
/// `BENCH_QUIET_CORES` (0.25) cores over 2 s, for at most `BENCH_QUIET_WAIT` (300) seconds. This
/// covers the compiler's start-up work (cargo and rustc warming the closure crate's
/// dependencies), whose short-lived processes a sample of the cluster's own processes misses.
/// Returns the seconds waited and whether the machine became quiet.
fn wait_quiet() -> (f64, bool) {
    let env = |k: &str, d: f64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (threshold, max_wait) = (env("BENCH_QUIET_CORES", 0.25), env("BENCH_QUIET_WAIT", 300.0));
    // CPU seconds the whole machine spent busy (user, nice, system, irq, softirq, steal).
    let busy = || -> f64 {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<f64>() / tick()
    };
    let own = || cpu_seconds("self").unwrap_or(0.0);
    let t = Instant::now();
    loop {
        let (b, o) = (busy(), own());
        std::thread::sleep(Duration::from_secs(2));
        let foreign = ((busy() - b) - (own() - o)) / 2.0;
        if foreign < threshold {
            return (t.elapsed().as_secs_f64(), true);
        }
        if t.elapsed().as_secs_f64() > max_wait {
            return (t.elapsed().as_secs_f64(), false);
        }
    }
}

/// [`wait_quiet`], said on stderr and recorded in the report.
fn wait_quiet_into(report: &mut serde_json::Map<String, serde_json::Value>) {
    let (waited, quiet) = wait_quiet();
    eprintln!("machine quiet: {quiet} after {waited:.1} s");
    report.insert("quiet_wait_s".into(), json!(waited));
    report.insert("quiet".into(), json!(quiet));
}

/// When each timed operation ran, by name: [start, end] on the monotonic clock (the clock
/// `perf record --clockid monotonic` stamps its samples with; `bench/data_profile.py` reads them).
type Windows = std::collections::BTreeMap<&'static str, Vec<[f64; 2]>>;

/// Seconds on the monotonic clock.
fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Run `op`, its window kept in `windows` under `name`: its value and its seconds.
fn timed<T>(windows: &mut Windows, name: &'static str, op: impl FnOnce() -> rpx::Result<T>) -> rpx::Result<(T, f64)> {
    let start = monotonic();
    let value = op()?;
    let end = monotonic();
    windows.entry(name).or_default().push([start, end]);
    Ok((value, end - start))
}

/// Seconds to do what a same-host `pull` (`parts` = 1) or `gather` (2) of `src` must do at the
/// least, with no cluster and no messages: map the snapshot files (written beforehand, untimed),
/// make the new vector and copy each part into place, the parts at once and each on every core
/// (each thread mapping in the pages it copies), as the client reads them. The mappings are
/// dropped after the clock stops (the client drops them off the caller's path too). The floor
/// under those rows for this machine, in this run; its window is added to `window`.
fn read_floor(dir: &std::path::Path, src: &[u8], parts: usize, window: &mut Vec<[f64; 2]>) -> rpx::Result<f64> {
    let err = |e: std::io::Error| rpx::Error::Connection(format!("read floor in {}: {e}", dir.display()));
    let part = src.len().div_ceil(parts);
    let mut files = Vec::new();
    for (i, chunk) in src.chunks(part).enumerate() {
        let path = dir.join(format!("snapshot-{i}"));
        std::fs::write(&path, chunk).map_err(err)?;
        files.push((std::fs::File::open(&path).map_err(err)?, chunk.len()));
        std::fs::remove_file(&path).map_err(err)?;
    }
    let start = monotonic();
    let mut out: Vec<f64> = rpx_runtime::plain_zeroed(src.len() / 8).expect("a plain vector");
    let dst = rpx_runtime::plain_bytes_mut(&mut out).expect("a plain vector");
    let maps = std::thread::scope(|s| {
        let mut rest = dst;
        let mut running = Vec::new();
        for (f, len) in &files {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(*len);
            rest = tail;
            running.push(s.spawn(move || {
                let map = rpx_runtime::Mapped::unpopulated(f, *len)?;
                rpx_runtime::copy_from_mapping_on_every_core(mine, map.as_ref());
                Ok::<_, std::io::Error>(map)
            }));
        }
        running.into_iter().map(|h| h.join().expect("no panic")).collect::<std::io::Result<Vec<_>>>()
    });
    let end = monotonic();
    window.push([start, end]);
    let maps = maps.map_err(err)?;
    assert!(rpx_runtime::plain_bytes_mut(&mut out).expect("a plain vector") == src, "the floor read the bytes it wrote");
    drop(maps);
    Ok(end - start)
}

fn main() -> rpx::Result<()> {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let n: usize = std::env::var("BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let out_path = std::env::args().nth(1);
    eprintln!("starting a {n}-engine cluster");
    let mut report = serde_json::Map::new();
    // BENCH_CLIENT_FILE: a running cluster's client connection file (engines elsewhere, e.g. on
    // other hosts), used instead of starting one; only with BENCH_ONLY=data.
    let external = std::env::var_os("BENCH_CLIENT_FILE").map(std::path::PathBuf::from);
    if external.is_some() && !std::env::var("BENCH_ONLY").is_ok_and(|v| v == "data") {
        return Err(rpx::Error::Connection("BENCH_CLIENT_FILE needs BENCH_ONLY=data".into()));
    }
    let cluster = external.is_none().then(|| rpx_tests::TestCluster::start(n));
    let client = rpx::Client::from_file(external.unwrap_or_else(|| cluster.as_ref().expect("started").client_file()))?;
    client.wait_for_engines(n, Duration::from_secs(120))?;
    report.insert("same_host_engines".into(), json!(client.shared_memory_namespaces().len()));
    report.insert("data_link_engines".into(), json!(client.data_links().len()));
    let dv0 = client.direct_view(0);
    let lb = client.view();
    let ident = remote!(|x: u64| x);
    report.insert("engines".into(), json!(n));
    report.insert("reps".into(), json!(reps));

    // BENCH_ONLY=data: only the 100 MB transfers.
    // BENCH_ONLY=throughput: only the 10,000 tasks (with CPU per task of each process).
    let only_data = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "data");
    let only_tasks = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "throughput");
    // BENCH_ONLY=latency: only the apply round trips.
    let only_latency = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "latency");
    let dv_all = client.direct_view(..);
    if !only_data {
        if !only_tasks && !only_latency {
            // Closure compile: the first call of a closure nobody compiled yet, then later calls.
            let nonce = std::process::id() as u64;
            let t = Instant::now();
            let first: Vec<u64> = dv0.apply(remote!(|x: u64| x ^ 0x5eed), (nonce,))?;
            let first_call = t.elapsed().as_secs_f64();
            assert_eq!(first[0], nonce ^ 0x5eed);
            let later: Vec<f64> = (0..200)
                .map(|i| {
                    let t = Instant::now();
                    let r: Vec<u64> = dv0.apply(remote!(|x: u64| x ^ 0x5eed), (i,)).expect("apply");
                    assert_eq!(r[0], i ^ 0x5eed);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            eprintln!("closure: first call {first_call:.3} s, later calls median {:.1} µs", median(later.clone()) * 1e6);
            report.insert("closure_first_call_s".into(), json!(first_call));
            report.insert("closure_later_call_s".into(), stats(later));
        }
        // The measured closure is compiled before the clock starts.
        let _: Vec<u64> = dv_all.apply(ident, (0,))?;
        // Nothing measured below competes with the compiler's start-up work.
        wait_quiet_into(&mut report);
        if !only_tasks && !only_latency {
            // The issue's row: the first call of a new closure on a warm cluster (the compiler's
            // start-up work, the closure builder's dependency build included, is over).
            let nonce = std::process::id() as u64;
            let t = Instant::now();
            let first: Vec<u64> = dv0.apply(remote!(|x: u64| x.rotate_left(7) ^ 0xc0ffee), (nonce,))?;
            let warm_first = t.elapsed().as_secs_f64();
            assert_eq!(first[0], nonce.rotate_left(7) ^ 0xc0ffee);
            eprintln!("closure: first call on a warm cluster {warm_first:.3} s");
            report.insert("closure_first_call_warm_s".into(), json!(warm_first));
        }
        if !only_tasks {
            // Latency: sequential trivial apply round trips, after warm-up.
            for (name, direct) in [("apply_direct", true), ("apply_lb", false)] {
                let mut per_rep = Vec::new();
                let mut per_rep_mean = Vec::new();
                let mut all = Vec::new();
                for _ in 0..reps {
                    for i in 0..100u64 {
                        if direct {
                            dv0.apply(ident, (i,))?;
                        } else {
                            lb.apply(ident, (i,))?;
                        }
                    }
                    let mut times = Vec::with_capacity(1000);
                    for i in 0..1000u64 {
                        let t = Instant::now();
                        if direct {
                            let r: Vec<u64> = dv0.apply(ident, (i,))?;
                            assert_eq!(r[0], i);
                        } else {
                            let r: u64 = lb.apply(ident, (i,))?;
                            assert_eq!(r, i);
                        }
                        times.push(t.elapsed().as_secs_f64());
                    }
                    per_rep.push(median(times.clone()));
                    per_rep_mean.push(times.iter().sum::<f64>() / times.len() as f64);
                    all.extend(times);
                }
                eprintln!("{name}: median {:.1} µs", median(all.clone()) * 1e6);
                report.insert(format!("{name}_s"), stats(per_rep));
                // The peers' scripts report the mean of each repetition's calls: the same, for them.
                report.insert(format!("{name}_mean_s"), stats(per_rep_mean));
            }
        }

        if !only_tasks {
            // Where a direct round trip's time goes, from the task's own timestamps: client to
            // engine (submitted -> started: client, controller, two sockets), in the engine
            // (started -> completed: decode, the worker's round trip, encode), engine to client
            // (completed -> the client has the result: two sockets, controller, client).
            let (mut to_engine, mut in_engine, mut back) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..1000u64 {
                let ar = dv0.apply_async(ident, (i,))?;
                let r = ar.get()?;
                let received = chrono::Utc::now();
                assert_eq!(r[0], i);
                let t = &ar.timings()[0];
                let us = |d: chrono::Duration| d.num_nanoseconds().unwrap_or(0) as f64 / 1e3;
                if let (Some(s), Some(b), Some(c)) = (t.submitted, t.started, t.completed) {
                    to_engine.push(us(b - s));
                    in_engine.push(us(c - b));
                    back.push(us(received - c));
                }
            }
            eprintln!(
                "direct round trip budget (medians, µs): client -> engine {:.0}, in the engine {:.0}, engine -> client {:.0}",
                median(to_engine.clone()),
                median(in_engine.clone()),
                median(back.clone())
            );
            report.insert("budget_to_engine_us".into(), stats(to_engine));
            report.insert("budget_in_engine_us".into(), stats(in_engine));
            report.insert("budget_back_us".into(), stats(back));
        }

        if !only_latency {
            // Throughput: 10,000 trivial tasks.
            let ntasks: u64 = std::env::var("BENCH_NTASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
            let mut lb_map = Vec::new();
            let mut dv_map = Vec::new();
            let mut cpu_per_task: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
            for _ in 0..reps {
                let before = cpu_by_role(cluster.as_ref().expect("started").rpx_dir());
                let t = Instant::now();
                let r: Vec<u64> = lb.chunksize(1).map(ident, 0..ntasks)?;
                lb_map.push(ntasks as f64 / t.elapsed().as_secs_f64());
                let after = cpu_by_role(cluster.as_ref().expect("started").rpx_dir());
                for (role, s) in after {
                    let used = s - before.get(role).copied().unwrap_or(0.0);
                    cpu_per_task.entry(role).or_default().push(used / ntasks as f64 * 1e6);
                }
                assert_eq!(r.len() as u64, ntasks);
                assert_eq!(r[ntasks as usize - 1], ntasks - 1);
                let t = Instant::now();
                let r: Vec<u64> = dv_all.map(ident, 0..ntasks)?;
                dv_map.push(ntasks as f64 / t.elapsed().as_secs_f64());
                assert_eq!(r.len() as u64, ntasks);
            }
            eprintln!(
                "lb map chunksize 1: median {:.0} tasks/s; direct map: {:.0} items/s",
                median(lb_map.clone()),
                median(dv_map.clone())
            );
            report.insert("lb_map_tasks_per_s".into(), stats(lb_map));
            for (role, us) in cpu_per_task {
                eprintln!("lb map: {role} {:.1} µs of CPU per task (median)", median(us.clone()));
                report.insert(format!("lb_map_cpu_us_per_task_{role}"), stats(us));
            }
            report.insert("dv_map_items_per_s".into(), stats(dv_map));
        }
    }

    // Data: 100 MB of f64 (1e8 bytes), as the peer's numpy array. Same-host engines get the
    // values through shared memory; BENCH_DATA_PLANE=both also measures the buffer path.
    let nbytes: usize = std::env::var("BENCH_NBYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000_000);
    let data: Vec<f64> = (0..nbytes / 8).map(|i| i as f64 * 0.5).collect();
    let gb = nbytes as f64 / 1e9;
    let planes: &[bool] = if only_tasks || only_latency {
        &[]
    } else if std::env::var("BENCH_DATA_PLANE").is_ok_and(|v| v == "both") {
        &[true, false]
    } else if rpx_protocol::dataplane::buffers_forced() {
        // RPX_DATA_PLANE=buffers: measure the buffer path alone, as asked.
        &[false]
    } else {
        &[true]
    };
    if only_data {
        // Nothing measured below competes with the compiler's start-up work (warming the
        // closure crate's dependencies), which the other systems do not have.
        wait_quiet_into(&mut report);
    }
    for &shm in planes {
        client.set_shared_memory(shm);
        let suffix = if shm { "" } else { "_buffers" };
        eprintln!("data plane: {}", if shm { "shared memory" } else { "buffers" });
        let (mut push, mut pull, mut scatter, mut gather) = (vec![], vec![], vec![], vec![]);
        let mut pull_view = vec![];
        let mut windows = Windows::new();
        for _ in 0..reps {
            let ((), secs) = timed(&mut windows, "push", || dv0.push("a", &data))?;
            push.push(gb / secs);
            let (back, secs) = timed(&mut windows, "pull", || -> rpx::Result<Vec<Vec<f64>>> { dv0.pull("a") })?;
            pull.push(gb / secs);
            assert_eq!(back[0].len(), data.len());
            assert_eq!(back[0][data.len() / 2], data[data.len() / 2]);
            drop(back);
            // The same value read where it lies (a view of the engine's snapshot on this host).
            let (view, secs) = timed(&mut windows, "pull_view", || dv0.pull_view::<f64>("a"))?;
            pull_view.push(gb / secs);
            assert_eq!(view[0].len(), data.len());
            assert_eq!(view[0][data.len() / 2], data[data.len() / 2]);
            drop(view);
            let ((), secs) = timed(&mut windows, "scatter", || dv_all.scatter("x", &data))?;
            scatter.push(gb / secs);
            let (g, secs) = timed(&mut windows, "gather", || -> rpx::Result<Vec<f64>> { dv_all.gather("x") })?;
            gather.push(gb / secs);
            assert_eq!(g.len(), data.len());
        }
        report.insert(format!("data_windows_s{suffix}"), json!(windows));
        eprintln!(
            "100 MB: push {:.2} GB/s, pull {:.2} GB/s, scatter {:.2} GB/s, gather {:.2} GB/s (medians)",
            median(push.clone()),
            median(pull.clone()),
            median(scatter.clone()),
            median(gather.clone())
        );
        report.insert(format!("push_gb_per_s{suffix}"), stats(push));
        report.insert(format!("pull_gb_per_s{suffix}"), stats(pull));
        eprintln!("100 MB: pull_view {:.2} GB/s (median)", median(pull_view.clone()));
        report.insert(format!("pull_view_gb_per_s{suffix}"), stats(pull_view));
        report.insert(format!("scatter_gb_per_s{suffix}"), stats(scatter));
        report.insert(format!("gather_gb_per_s{suffix}"), stats(gather));
    }
    if !planes.is_empty() {
        // The floor under any transfer that leaves the value in new memory (a pulled or gathered
        // vector in this process, a pushed value's new file in a namespace): the same bytes
        // copied into freshly allocated memory, and written into a new tmpfs file, in this run.
        let src: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let dir = tempfile::Builder::new().prefix("rpx-bench-floor-").tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir());
        let dir = dir.map_err(|e| rpx::Error::Connection(format!("no directory for the memory floor: {e}")))?;
        let (mut heap, mut heap_parallel, mut file) = (vec![], vec![], vec![]);
        let (mut read1, mut read2) = (vec![], vec![]);
        let mut windows = Windows::new();
        for _ in 0..reps {
            read1.push(gb / read_floor(dir.path(), &src, 1, windows.entry("snapshot_read_floor").or_default())?);
            read2.push(gb / read_floor(dir.path(), &src, 2, windows.entry("snapshot_read_floor_2").or_default())?);
            let t = Instant::now();
            let mut v: Vec<u8> = Vec::with_capacity(src.len());
            v.extend_from_slice(&src);
            heap.push(gb / t.elapsed().as_secs_f64());
            std::hint::black_box(&v);
            drop(v);
            // The same into a new vector made as a pull makes it (huge pages, filled on every
            // core): the least any pull into new memory costs here, whatever brings the bytes.
            let t = Instant::now();
            let mut v: Vec<u8> = rpx_runtime::plain_zeroed(src.len()).expect("a plain vector");
            rpx_runtime::copy_on_every_core(&mut v, &src);
            heap_parallel.push(gb / t.elapsed().as_secs_f64());
            std::hint::black_box(&v);
            drop(v);
            let t = Instant::now();
            let path = dir.path().join("floor");
            std::fs::write(&path, &src).map_err(|e| rpx::Error::Connection(format!("cannot write {}: {e}", path.display())))?;
            file.push(gb / t.elapsed().as_secs_f64());
            let _ = std::fs::remove_file(&path);
        }
        eprintln!(
            "fresh memory: a 100 MB copy {:.2} GB/s, a new 100 MB tmpfs file {:.2} GB/s (medians)",
            median(heap.clone()),
            median(file.clone())
        );
        eprintln!(
            "a 100 MB snapshot read into a new vector with no messages: from 1 file {:.2} GB/s, from 2 {:.2} GB/s (medians)",
            median(read1.clone()),
            median(read2.clone())
        );
        report.insert("floor_windows_s".into(), json!(windows));
        report.insert("snapshot_read_floor_gb_per_s".into(), stats(read1));
        report.insert("snapshot_read_floor_2_gb_per_s".into(), stats(read2));
        eprintln!("a 100 MB copy into a new vector in huge pages, on every core: {:.2} GB/s (median)", median(heap_parallel.clone()));
        report.insert("fresh_memory_copy_gb_per_s".into(), stats(heap));
        report.insert("fresh_memory_parallel_copy_gb_per_s".into(), stats(heap_parallel));
        report.insert("fresh_tmpfs_write_gb_per_s".into(), stats(file));
    }

    let text = serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json");
    println!("{text}");
    if let Some(p) = out_path {
        std::fs::write(&p, &text).map_err(|e| rpx::Error::Connection(format!("cannot write {p}: {e}")))?;
    }
    drop(client);
    drop(cluster);
    Ok(())
}
