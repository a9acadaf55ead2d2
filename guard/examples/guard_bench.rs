//! What the guard costs: the same DEALER -> ROUTER echo over TCP with the ROUTER bound plainly
//! and behind the guard, interleaved round by round so both see the same machine noise.
//! Reports medians of small-message round trips (latency) and of large-message round trips
//! (throughput), and their ratios.
//!
//! `cargo run --release -p rpx-guard --example guard_bench -- [ROUNDS] [OUT.json]`

use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_guard::front::bind_with;
use rpx_guard::Limits;
use zeromq::{DealerSocket, Endpoint, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const SMALL: usize = 100;
const SMALL_TRIPS: usize = 2000;
const LARGE: usize = 16 << 20;
const LARGE_TRIPS: usize = 8;

async fn echo(guarded: bool) -> DealerSocket {
    let mut router = RouterSocket::new();
    let ep = if guarded {
        bind_with(&mut router, "tcp://127.0.0.1:0", Limits::default()).await.expect("guarded bind")
    } else {
        router.bind("tcp://127.0.0.1:0").await.expect("bind")
    };
    tokio::spawn(async move {
        while let Ok(m) = router.recv().await {
            if router.send(m).await.is_err() {
                break;
            }
        }
    });
    let Endpoint::Tcp(_, port) = ep else { panic!("tcp endpoint") };
    let mut d = DealerSocket::new();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.expect("connect");
    d
}

async fn trips(d: &mut DealerSocket, body: &Bytes, n: usize) -> Duration {
    let t0 = Instant::now();
    for _ in 0..n {
        d.send(ZmqMessage::from(body.clone())).await.expect("send");
        let r = d.recv().await.expect("recv");
        assert_eq!(r.get(0).map(Bytes::len), Some(body.len()));
    }
    t0.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let out = args.next();
    let (mut plain, mut guarded) = (echo(false).await, echo(true).await);
    let small = Bytes::from(vec![7u8; SMALL]);
    let large = Bytes::from(vec![9u8; LARGE]);
    // Warm both paths.
    trips(&mut plain, &small, 200).await;
    trips(&mut guarded, &small, 200).await;
    let (mut lat_p, mut lat_g, mut thr_p, mut thr_g) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        lat_p.push(trips(&mut plain, &small, SMALL_TRIPS).await.as_secs_f64() * 1e6 / SMALL_TRIPS as f64);
        lat_g.push(trips(&mut guarded, &small, SMALL_TRIPS).await.as_secs_f64() * 1e6 / SMALL_TRIPS as f64);
        let mib = (2 * LARGE * LARGE_TRIPS) as f64 / (1 << 20) as f64;
        thr_p.push(mib / trips(&mut plain, &large, LARGE_TRIPS).await.as_secs_f64());
        thr_g.push(mib / trips(&mut guarded, &large, LARGE_TRIPS).await.as_secs_f64());
    }
    let (lp, lg, tp, tg) = (median(lat_p), median(lat_g), median(thr_p), median(thr_g));
    let report = format!(
        "{{\"rounds\": {rounds}, \"small_bytes\": {SMALL}, \"small_round_trips_per_round\": {SMALL_TRIPS}, \"large_bytes\": {LARGE}, \"large_round_trips_per_round\": {LARGE_TRIPS}, \
         \"round_trip_us_median\": {{\"plain\": {lp:.1}, \"guarded\": {lg:.1}, \"ratio\": {:.2}}}, \
         \"throughput_mib_s_median\": {{\"plain\": {tp:.0}, \"guarded\": {tg:.0}, \"ratio\": {:.2}}}}}",
        lg / lp,
        tg / tp
    );
    println!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, format!("{report}\n")).expect("write the report");
    }
}
