//! `ipcontroller`: parse arguments, set up logging, run until SIGINT/SIGTERM or a hub
//! `shutdown_request`.

use clap::Parser;

/// mimalloc rather than glibc's malloc: under a long load-balanced run glibc keeps the pages of
/// freed task messages (its heap cannot shrink past live allocations), so the controller's
/// resident size climbs in steps; see bench/results/soak-*.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One runtime thread: the hub is one task, and the relays and sockets around it do little per
/// message, so on a busy machine a second runtime thread cost more in wake-ups than it won
/// (CPU per load-balanced task 128 -> 62 µs, bench_ops BENCH_ONLY=throughput).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // No transparent huge pages: mimalloc asks for them, and then each region it had returned to
    // the system costs a 2 MiB clearing fault when reused, which under a stream of small task
    // messages was 40% of the controller's CPU (perf, 100,000 tasks).
    // SAFETY: plain prctl on this process; failure only leaves huge pages on.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match rpx_controller::net::raise_open_files_limit() {
        Ok((now, before)) if now != before => tracing::info!(before, now, "raised the open-file limit to its hard limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit; many engines may exhaust it"),
    }
    let config = rpx_controller::config::Args::parse().check()?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    rpx_controller::run(config, shutdown).await?;
    Ok(())
}
