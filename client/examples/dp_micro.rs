//! Where a same-host push and pull of 100 MB of f64 spend their time, step by step as the data
//! plane takes them (`BENCH_REPS` runs, 5 by default; the minimum and median of each step):
//! - push, client: the value encoded straight into a transfer file (hashed on the way);
//! - push, engine: the file verified (size, BLAKE3);
//! - pull, client: the file mapped and its digest checked, then decoded;
//!
//! and, for reference, the separate passes before the push was streamed: encode into memory,
//! digest, write+digest of encoded bytes, decode alone.
use std::collections::BTreeMap;
use std::time::Instant;

use rpx_protocol::dataplane as dp;

fn main() {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let data: Vec<f64> = (0..12_500_000).map(|i| i as f64 * 0.5).collect();
    let path = std::path::PathBuf::from(format!("/dev/shm/rpx-dp-micro-{}", std::process::id()));
    std::fs::create_dir(&path).unwrap();
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Gone(path);
    let dir = dir.0.as_path();
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut time = |step: &'static str, t: Instant| times.entry(step).or_default().push(t.elapsed().as_secs_f64() * 1e3);
    for _ in 0..reps {
        // The data plane's steps.
        let t = Instant::now();
        let vf = dp::write_value_file_with(dir, |w| {
            rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| std::io::Write::write_all(w, p))
        })
        .unwrap();
        time("1 push: encode+digest+write (streamed)", t);
        let t = Instant::now();
        dp::verify_value_file(dir, &vf).unwrap();
        time("2 push: engine verify", t);
        let t = Instant::now();
        let bytes = dp::read_value_file(dir, &vf).unwrap();
        time("3 pull: map+digest", t);
        let t = Instant::now();
        let back: Vec<f64> = rpx_runtime::decode(&bytes).unwrap();
        time("4 pull: decode", t);
        assert_eq!(back.len(), data.len());
        drop((back, bytes));
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        // The separate passes, for reference.
        let t = Instant::now();
        let buf = rpx_runtime::encode(&data);
        time("r encode into memory", t);
        let t = Instant::now();
        let d = dp::digest(&buf);
        time("r digest (all cores)", t);
        let t = Instant::now();
        let vf = dp::write_value_file(dir, &buf).unwrap();
        time("r write+digest of encoded bytes", t);
        assert_eq!(vf.blake3, d);
        let t = Instant::now();
        let back: Vec<f64> = rpx_runtime::decode(&buf).unwrap();
        time("r decode alone", t);
        assert_eq!(back.len(), data.len());
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
    }
    for (step, mut ms) in times {
        ms.sort_by(|a, b| a.total_cmp(b));
        println!("{step:42} min {:6.1} ms  median {:6.1} ms", ms[0], ms[ms.len() / 2]);
    }
}
