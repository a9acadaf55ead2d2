//! Count primes in ranges on a running cluster with a load-balanced map.
//!
//! ```sh
//! ipcluster start -n 4 --daemonize
//! cargo run --release -p rpx --example map_squares
//! ```

use std::time::{Duration, Instant};

fn main() -> rpx::Result<()> {
    let client = rpx::Client::connect()?;
    let ids = client.wait_for_engines(1, Duration::from_secs(30))?;
    println!("{} engines: {ids:?}", ids.len());

    // A warm-up: squares, one small task per item.
    let squares: Vec<u64> = client.view().map(rpx::remote!(|x: u64| x * x), 0..10u64)?;
    println!("squares: {squares:?}");

    // Count the primes below 2,000,000 in 40 ranges of 50,000 numbers, four ranges per task.
    let ranges: Vec<(u64, u64)> = (0..40u64).map(|i| (i * 50_000, (i + 1) * 50_000)).collect();
    let count_primes = rpx::remote!(|r: (u64, u64)| {
        let is_prime = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
        (r.0..r.1).filter(|&n| is_prime(n)).count() as u64
    });
    let t = Instant::now();
    let ar = client.view().chunksize(4).map_async(count_primes, ranges.clone())?;
    // A progress bar on a terminal; per-range counts in order.
    let counts: Vec<u64> = ar.wait_interactive()?;
    let total: u64 = counts.iter().sum();
    println!("{total} primes below 2,000,000 (expected 148933), in {:.2?}", t.elapsed());
    for (r, n) in ranges.iter().zip(&counts).take(3) {
        println!("  [{}, {}): {n}", r.0, r.1);
    }
    let engines: std::collections::BTreeSet<usize> = ar.engine_ids().into_iter().flatten().collect();
    println!("tasks ran on engines {engines:?}");
    Ok(())
}
