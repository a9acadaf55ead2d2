//! Where a same-host push of 100 MB of f64 spends its time (encode, digest, write, read, decode).
use std::time::Instant;
fn main() {
    let data: Vec<f64> = (0..12_500_000).map(|i| i as f64 * 0.5).collect();
    let t = Instant::now();
    let buf = rpx_runtime::encode(&data);
    println!("encode {:?}", t.elapsed());
    let t = Instant::now();
    let d = rpx_protocol::dataplane::digest(&buf);
    println!("digest {:?}", t.elapsed());
    let path = std::path::PathBuf::from(format!("/dev/shm/rpx-dp-micro-{}", std::process::id()));
    std::fs::create_dir(&path).unwrap();
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Gone(path);
    impl Gone {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    let t = Instant::now();
    let vf = rpx_protocol::dataplane::write_value_file(dir.path(), &buf).unwrap();
    println!("write+digest {:?}", t.elapsed());
    let t = Instant::now();
    rpx_protocol::dataplane::verify_value_file(dir.path(), &vf).unwrap();
    println!("verify {:?}", t.elapsed());
    let t = Instant::now();
    let back = rpx_protocol::dataplane::read_value_file(dir.path(), &vf).unwrap();
    println!("read+digest {:?}", t.elapsed());
    let t = Instant::now();
    let v: Vec<f64> = rpx_runtime::decode(&back).unwrap();
    println!("decode {:?} {}", t.elapsed(), v.len() + d.len());
}
