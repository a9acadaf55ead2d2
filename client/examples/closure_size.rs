//! What a closure's length costs each load-balanced task. A call carries the closure's source
//! only until the client has seen it compile, then its id; with the source in every task, a long
//! closure's tasks were longer messages, signed, checked and parsed at every hop (0.72x the
//! tasks/s of a one-line closure). On a 2-engine cluster this runs 10,000 tasks at chunksize 1 of a
//! one-line closure and of a closure of about 5 KB of source that computes the same value, by
//! turns, and prints each one's tasks/s (medians of the rounds), their ratio and the sources'
//! sizes.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! target/release/examples/closure_size [ROUNDS] [OUT.json]     # BENCH_NTASKS (10,000)
//! ```
//! It starts its own cluster (a private `RPX_DIR`) from the binaries next to it.

use std::time::{Duration, Instant};

use rpx::remote;
use serde_json::json;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[xs.len() / 2]
}

fn main() -> rpx::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(5);
    let out_path = args.next();
    let ntasks: u64 = std::env::var("BENCH_NTASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let cluster = rpx_tests::TestCluster::start(2);
    let client = rpx::Client::from_file(cluster.client_file())?;
    client.wait_for_engines(2, Duration::from_secs(120))?;
    let lb = client.view().chunksize(1);
    let short = remote!(|x: u64| x);
    // The identity too: 48 steps, each undone in reverse order.
    let long = remote!(|x: u64| {
        let s00 = x.rotate_left(1) ^ 0x9e3779b1;
        let s01 = s00.rotate_left(8) ^ 0x3c6ef362;
        let s02 = s01.rotate_left(15) ^ 0xdaa66d13;
        let s03 = s02.rotate_left(22) ^ 0x78dde6c4;
        let s04 = s03.rotate_left(29) ^ 0x17156075;
        let s05 = s04.rotate_left(36) ^ 0xb54cda26;
        let s06 = s05.rotate_left(43) ^ 0x538453d7;
        let s07 = s06.rotate_left(50) ^ 0xf1bbcd88;
        let s08 = s07.rotate_left(57) ^ 0x8ff34739;
        let s09 = s08.rotate_left(1) ^ 0x2e2ac0ea;
        let s10 = s09.rotate_left(8) ^ 0xcc623a9b;
        let s11 = s10.rotate_left(15) ^ 0x6a99b44c;
        let s12 = s11.rotate_left(22) ^ 0x08d12dfd;
        let s13 = s12.rotate_left(29) ^ 0xa708a7ae;
        let s14 = s13.rotate_left(36) ^ 0x4540215f;
        let s15 = s14.rotate_left(43) ^ 0xe3779b10;
        let s16 = s15.rotate_left(50) ^ 0x81af14c1;
        let s17 = s16.rotate_left(57) ^ 0x1fe68e72;
        let s18 = s17.rotate_left(1) ^ 0xbe1e0823;
        let s19 = s18.rotate_left(8) ^ 0x5c5581d4;
        let s20 = s19.rotate_left(15) ^ 0xfa8cfb85;
        let s21 = s20.rotate_left(22) ^ 0x98c47536;
        let s22 = s21.rotate_left(29) ^ 0x36fbeee7;
        let s23 = s22.rotate_left(36) ^ 0xd5336898;
        let s24 = s23.rotate_left(43) ^ 0x736ae249;
        let s25 = s24.rotate_left(50) ^ 0x11a25bfa;
        let s26 = s25.rotate_left(57) ^ 0xafd9d5ab;
        let s27 = s26.rotate_left(1) ^ 0x4e114f5c;
        let s28 = s27.rotate_left(8) ^ 0xec48c90d;
        let s29 = s28.rotate_left(15) ^ 0x8a8042be;
        let s30 = s29.rotate_left(22) ^ 0x28b7bc6f;
        let s31 = s30.rotate_left(29) ^ 0xc6ef3620;
        let s32 = s31.rotate_left(36) ^ 0x6526afd1;
        let s33 = s32.rotate_left(43) ^ 0x035e2982;
        let s34 = s33.rotate_left(50) ^ 0xa195a333;
        let s35 = s34.rotate_left(57) ^ 0x3fcd1ce4;
        let s36 = s35.rotate_left(1) ^ 0xde049695;
        let s37 = s36.rotate_left(8) ^ 0x7c3c1046;
        let s38 = s37.rotate_left(15) ^ 0x1a7389f7;
        let s39 = s38.rotate_left(22) ^ 0xb8ab03a8;
        let s40 = s39.rotate_left(29) ^ 0x56e27d59;
        let s41 = s40.rotate_left(36) ^ 0xf519f70a;
        let s42 = s41.rotate_left(43) ^ 0x935170bb;
        let s43 = s42.rotate_left(50) ^ 0x3188ea6c;
        let s44 = s43.rotate_left(57) ^ 0xcfc0641d;
        let s45 = s44.rotate_left(1) ^ 0x6df7ddce;
        let s46 = s45.rotate_left(8) ^ 0x0c2f577f;
        let s47 = s46.rotate_left(15) ^ 0xaa66d130;
        let u47 = (s47 ^ 0xaa66d130).rotate_right(15);
        let u46 = (u47 ^ 0x0c2f577f).rotate_right(8);
        let u45 = (u46 ^ 0x6df7ddce).rotate_right(1);
        let u44 = (u45 ^ 0xcfc0641d).rotate_right(57);
        let u43 = (u44 ^ 0x3188ea6c).rotate_right(50);
        let u42 = (u43 ^ 0x935170bb).rotate_right(43);
        let u41 = (u42 ^ 0xf519f70a).rotate_right(36);
        let u40 = (u41 ^ 0x56e27d59).rotate_right(29);
        let u39 = (u40 ^ 0xb8ab03a8).rotate_right(22);
        let u38 = (u39 ^ 0x1a7389f7).rotate_right(15);
        let u37 = (u38 ^ 0x7c3c1046).rotate_right(8);
        let u36 = (u37 ^ 0xde049695).rotate_right(1);
        let u35 = (u36 ^ 0x3fcd1ce4).rotate_right(57);
        let u34 = (u35 ^ 0xa195a333).rotate_right(50);
        let u33 = (u34 ^ 0x035e2982).rotate_right(43);
        let u32 = (u33 ^ 0x6526afd1).rotate_right(36);
        let u31 = (u32 ^ 0xc6ef3620).rotate_right(29);
        let u30 = (u31 ^ 0x28b7bc6f).rotate_right(22);
        let u29 = (u30 ^ 0x8a8042be).rotate_right(15);
        let u28 = (u29 ^ 0xec48c90d).rotate_right(8);
        let u27 = (u28 ^ 0x4e114f5c).rotate_right(1);
        let u26 = (u27 ^ 0xafd9d5ab).rotate_right(57);
        let u25 = (u26 ^ 0x11a25bfa).rotate_right(50);
        let u24 = (u25 ^ 0x736ae249).rotate_right(43);
        let u23 = (u24 ^ 0xd5336898).rotate_right(36);
        let u22 = (u23 ^ 0x36fbeee7).rotate_right(29);
        let u21 = (u22 ^ 0x98c47536).rotate_right(22);
        let u20 = (u21 ^ 0xfa8cfb85).rotate_right(15);
        let u19 = (u20 ^ 0x5c5581d4).rotate_right(8);
        let u18 = (u19 ^ 0xbe1e0823).rotate_right(1);
        let u17 = (u18 ^ 0x1fe68e72).rotate_right(57);
        let u16 = (u17 ^ 0x81af14c1).rotate_right(50);
        let u15 = (u16 ^ 0xe3779b10).rotate_right(43);
        let u14 = (u15 ^ 0x4540215f).rotate_right(36);
        let u13 = (u14 ^ 0xa708a7ae).rotate_right(29);
        let u12 = (u13 ^ 0x08d12dfd).rotate_right(22);
        let u11 = (u12 ^ 0x6a99b44c).rotate_right(15);
        let u10 = (u11 ^ 0xcc623a9b).rotate_right(8);
        let u09 = (u10 ^ 0x2e2ac0ea).rotate_right(1);
        let u08 = (u09 ^ 0x8ff34739).rotate_right(57);
        let u07 = (u08 ^ 0xf1bbcd88).rotate_right(50);
        let u06 = (u07 ^ 0x538453d7).rotate_right(43);
        let u05 = (u06 ^ 0xb54cda26).rotate_right(36);
        let u04 = (u05 ^ 0x17156075).rotate_right(29);
        let u03 = (u04 ^ 0x78dde6c4).rotate_right(22);
        let u02 = (u03 ^ 0xdaa66d13).rotate_right(15);
        let u01 = (u02 ^ 0x3c6ef362).rotate_right(8);
        (u01 ^ 0x9e3779b1).rotate_right(1)
    });
    // Each compiled once, before anything is timed.
    let warm: Vec<u64> = lb.map(short, 0..8u64)?;
    assert_eq!(warm, (0..8).collect::<Vec<u64>>());
    let warm: Vec<u64> = lb.map(long, 0..8u64)?;
    assert_eq!(warm, (0..8).collect::<Vec<u64>>(), "the long closure is the identity");
    let (mut short_rates, mut long_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = Instant::now();
        let r: Vec<u64> = lb.map(short, 0..ntasks)?;
        short_rates.push(ntasks as f64 / t.elapsed().as_secs_f64());
        assert_eq!(r.last(), Some(&(ntasks - 1)));
        let t = Instant::now();
        let r: Vec<u64> = lb.map(long, 0..ntasks)?;
        long_rates.push(ntasks as f64 / t.elapsed().as_secs_f64());
        assert_eq!(r.last(), Some(&(ntasks - 1)));
        eprintln!("round {}: short {:.0} tasks/s, long {:.0} tasks/s", round + 1, short_rates[round], long_rates[round]);
    }
    let (s, l) = (median(short_rates.clone()), median(long_rates.clone()));
    let report = json!({
        "tasks": ntasks,
        "rounds": rounds,
        "short_source_bytes": short.source().len(),
        "long_source_bytes": long.source().len(),
        "short_tasks_per_s": short_rates,
        "long_tasks_per_s": long_rates,
        "short_median": s,
        "long_median": l,
        "long_over_short": l / s,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    eprintln!(
        "sources {} and {} bytes: {s:.0} and {l:.0} tasks/s (medians of {rounds}), the long one at {:.2}x",
        short.source().len(),
        long.source().len(),
        l / s
    );
    if let Some(p) = out_path {
        std::fs::write(&p, serde_json::to_string_pretty(&report).expect("json"))
            .map_err(|e| rpx::Error::Connection(format!("{p}: {e}")))?;
    }
    Ok(())
}
