//! What it costs on this machine to fill new memory right after other memory was freed, and
//! after the process sat idle: no cluster, no rpx code. A pulled or gathered value lands in new
//! memory, so this is the floor under those rows, and on a virtual machine whose balloon reports
//! free pages to its host (virtio-balloon's free page reporting) the floor depends on how long
//! the free memory had been free: pages reported to the host fault in from the host again when
//! next touched.
//!
//! Each round maps `MIB` MiB (200 by default) of anonymous memory, asks for huge pages (as the
//! client's pulled vectors do), writes one byte per 4 KiB page and unmaps it: once right after
//! the previous round (`warm`), once after sleeping `IDLE_S` seconds (10 by default, `idle`).
//!
//! `cargo run --release -p rpx --example idle_memory -- [ROUNDS (5)] [IDLE_S] [MIB]`

use std::time::{Duration, Instant};

/// Fill `bytes` of new memory (one write per page); seconds taken.
fn fill_new(bytes: usize) -> f64 {
    // SAFETY: a fresh private anonymous mapping of `bytes`, written only inside its bounds and
    // unmapped before returning.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
        assert!(p != libc::MAP_FAILED, "mmap failed");
        libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
        let t = Instant::now();
        let base = p.cast::<u8>();
        for at in (0..bytes).step_by(4096) {
            base.add(at).write_volatile(1);
        }
        let secs = t.elapsed().as_secs_f64();
        libc::munmap(p, bytes);
        secs
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(5) as usize;
    let idle = Duration::from_secs(args.get(1).copied().unwrap_or(10));
    let bytes = (args.get(2).copied().unwrap_or(200) as usize) << 20;
    let gb = bytes as f64 / 1e9;
    fill_new(bytes); // the first fill of the process, not counted
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let w = fill_new(bytes);
        std::thread::sleep(idle);
        let c = fill_new(bytes);
        println!("round {round}: warm {:.2} GB/s, after {} s idle {:.2} GB/s", gb / w, idle.as_secs(), gb / c);
        warm.push(gb / w);
        cold.push(gb / c);
    }
    println!("medians: warm {:.2} GB/s, after {} s idle {:.2} GB/s", median(warm), idle.as_secs(), median(cold));
}
