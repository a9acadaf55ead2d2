//! `ipcontroller`: parse arguments, set up logging, run until SIGINT/SIGTERM or a hub
//! `shutdown_request`.

use clap::Parser;

/// mimalloc rather than glibc's malloc: under a long load-balanced run glibc keeps the pages of
/// freed task messages (its heap cannot shrink past live allocations), so the controller's
/// resident size climbs in steps; see bench/results/soak-*.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
