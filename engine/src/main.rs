//! `ipengine`: an rpx engine. Reads the engine connection file, registers with the controller,
//! finds the cluster's compiler and serves until shut down. Run with `RPX_ENGINE_WORKER=1` it is
//! instead the worker process that runs compiled cells (see `rpx_engine::worker`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rpx_engine::engine::{self, Config};
use rpx_protocol::connection::{read_json, EngineConnection};
use rpx_protocol::Profile;

/// An rpx engine: runs Rust cells for an rpx (ipyparallel-compatible) controller.
#[derive(Debug, Parser)]
#[command(name = "ipengine", version)]
struct Args {
    /// Engine connection file (default: the profile's security/ipcontroller[-CLUSTER_ID]-engine.json).
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Profile name under $RPX_DIR.
    #[arg(long, env = "RPX_PROFILE", default_value = "default")]
    profile: String,
    /// Cluster id within the profile.
    #[arg(long, default_value = "")]
    cluster_id: String,
    /// Compiler connection file (default: rpx-compiler[-CLUSTER_ID].json next to the engine file).
    #[arg(long)]
    compiler_file: Option<PathBuf>,
    /// Seconds to wait for the connection file and the registration reply.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Seconds to wait for the compiler at startup.
    #[arg(long, default_value_t = 30.0)]
    compiler_timeout: f64,
}

fn main() {
    // The worker must not start a runtime or parse arguments: detect it first.
    if std::env::var_os(rpx_engine::worker::WORKER_ENV).is_some() {
        rpx_engine::worker::run();
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ipengine: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> anyhow::Result<i32> {
    if !(args.timeout > 0.0 && args.compiler_timeout >= 0.0) {
        bail!("--timeout must be positive and --compiler-timeout not negative");
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let profile = Profile::new(&args.profile, &args.cluster_id);
    let file = args.file.clone().unwrap_or_else(|| profile.engine_file());
    let connection = wait_for_file(&file, timeout)?;
    let compiler_file = args.compiler_file.clone().unwrap_or_else(|| {
        let name = profile.compiler_file().file_name().expect("has a name").to_owned();
        file.parent().map_or_else(|| profile.compiler_file(), |d| d.join(&name))
    });
    let cfg = Config { connection, compiler_file, timeout, compiler_wait: Duration::from_secs_f64(args.compiler_timeout) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    let code = rt.block_on(engine::run(cfg))?;
    // Do not wait for lingering socket tasks.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(code)
}

/// Read the engine connection file, waiting up to `timeout` for it to appear.
fn wait_for_file(file: &std::path::Path, timeout: Duration) -> anyhow::Result<EngineConnection> {
    let deadline = Instant::now() + timeout;
    loop {
        match read_json::<EngineConnection>(file) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                bail!("cannot read the engine connection file {} ({e}); start ipcontroller first or pass --file", file.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
