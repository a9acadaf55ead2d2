//! `rpx-demo`: connect to a running cluster and split real work across its engines.
//!
//! A first cell gives every engine the engine count and its rank (its start index, from
//! `RPX_ENGINE_INDEX`, which `ipcluster` sets; or pushed engine by engine when that does not
//! give ranks 0..N), then every engine runs the same Rust cell: count the primes in its own slice of 0..2,000,000. The
//! demo prints each engine's output and checks the total against a sieve computed here.
//!
//! Usage: `rpx-demo [--profile P] [--cluster-id C] [--timeout SECS]` (default profile from
//! `RPX_PROFILE`, else `default`; the cluster must be running, e.g. `ipcluster start -n 4 --daemonize`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rpx_protocol::Profile;
use rpx_tests::Client;

const LIMIT: u64 = 2_000_000;

const CELL: &str = r#"
let lo: u64 = LIMIT * rank / size;
let hi: u64 = LIMIT * (rank + 1) / size;
let primes: usize = {
    fn is_prime(n: u64) -> bool {
        if n < 2 { return false; }
        if n % 2 == 0 { return n == 2; }
        let mut d = 3;
        while d * d <= n {
            if n % d == 0 { return false; }
            d += 2;
        }
        true
    }
    (lo..hi).filter(|&k| is_prime(k)).count()
};
println!("engine rank {rank}/{size}: {primes} primes in [{lo}, {hi})");
"#;

fn sieve(n: u64) -> usize {
    let n = n as usize;
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            let mut j = i * i;
            while j < n {
                composite[j] = true;
                j += i;
            }
        }
    }
    count
}

fn main() {
    if let Err(e) = run() {
        eprintln!("rpx-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let mut profile = rpx_protocol::connection::default_profile_name();
    let mut cluster_id = String::new();
    let mut timeout = 600.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => profile = args.next().context("--profile needs a value")?,
            "--cluster-id" => cluster_id = args.next().context("--cluster-id needs a value")?,
            "--timeout" => timeout = args.next().context("--timeout needs a value")?.parse()?,
            "-h" | "--help" => {
                println!("usage: rpx-demo [--profile P] [--cluster-id C] [--timeout SECS]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let limit = Duration::from_secs_f64(timeout);
    let profile = Profile::new(&profile, &cluster_id);
    let file = profile.client_file();
    if !file.exists() {
        bail!("no cluster connection file at {}; start a cluster first: ipcluster start -n 4 --daemonize", file.display());
    }
    let mut client = Client::connect(&file, Duration::from_secs(10))?;
    let ids = client.wait_for_engines(1, Duration::from_secs(30))?;
    let size = ids.len();
    println!("connected to {} with {size} engines: {ids:?}", file.display());

    // First cell, the same on every engine (so it is compiled once): the engine count, and
    // the engine's start index, which ipcluster gives each engine in RPX_ENGINE_INDEX.
    let t = Instant::now();
    let first = format!(
        "let size: u64 = {size};\nlet rank: u64 = std::env::var(\"RPX_ENGINE_INDEX\").ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);\nprintln!(\"{{rank}}\");"
    );
    let outs = client.execute(&ids, &first, limit)?;
    let mut ranks = Vec::new();
    for o in &outs {
        if o.status != "ok" {
            bail!("engine {} failed the first cell: {} {}", o.engine_id, o.status, o.reply);
        }
        ranks.push(o.stdout.trim().parse::<u64>().unwrap_or(u64::MAX));
    }
    let mut sorted = ranks.clone();
    sorted.sort_unstable();
    if sorted == (0..size as u64).collect::<Vec<_>>() {
        println!("every engine read its rank from RPX_ENGINE_INDEX (one cell, compiled once) in {:.2} s", t.elapsed().as_secs_f64());
    } else {
        // Engines started by hand or added later: push each engine its rank instead. The
        // engines' histories diverge, so the compiler compiles per engine from here on.
        let t = Instant::now();
        let cells: Vec<(u64, String)> = ids.iter().enumerate().map(|(rank, id)| (*id, format!("let rank: u64 = {rank};"))).collect();
        for o in client.execute_each(&cells, limit)? {
            if o.status != "ok" {
                bail!("engine {} could not set its rank: {} {}", o.engine_id, o.status, o.reply);
            }
        }
        println!("pushed each engine its rank in {:.2} s", t.elapsed().as_secs_f64());
    }

    let t = Instant::now();
    let code = CELL.replace("LIMIT", &LIMIT.to_string());
    let outs = client.execute(&ids, &code, limit)?;
    let elapsed = t.elapsed();
    let mut total = 0usize;
    for o in &outs {
        for line in o.stdout.lines() {
            println!("[stdout:{}] {line}", o.engine_id);
        }
        if o.status != "ok" {
            let detail = o.reply.get("evalue").and_then(|v| v.as_str()).unwrap_or_default();
            bail!("engine {} failed: {} {detail}", o.engine_id, o.status);
        }
        let n: usize = o
            .stdout
            .split_whitespace()
            .nth(3)
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("engine {} printed no prime count: {:?}", o.engine_id, o.stdout))?;
        total += n;
    }
    let expected = sieve(LIMIT);
    println!("total: {total} primes below {LIMIT} on {size} engines in {:.2} s (a local sieve says {expected})", elapsed.as_secs_f64());
    if total != expected {
        bail!("the engines' total {total} differs from the local sieve's {expected}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sieve_counts_primes() {
        assert_eq!(super::sieve(10), 4);
        assert_eq!(super::sieve(2_000_000), 148_933);
    }
}
