//! `ipengine`: an rpx engine. Takes its connection info from `RPX_CONNECTION_INFO` (controller and
//! compiler, nothing to copy between hosts) or from the profile's connection files, registers
//! with the controller (with `--mpi`, under its MPI rank), finds the cluster's compiler and serves
//! until shut down. Run with `RPX_ENGINE_WORKER=1` it is instead the worker process that runs
//! compiled cells (see `rpx_worker`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rpx_engine::engine::{self, Config};
use rpx_engine::net::CompilerSource;
use rpx_protocol::connection::{read_json, ConnectionInfo, EngineConnection, CONNECTION_INFO_ENV, ENGINE_RESTARTED_ENV};
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
    /// Seconds to wait for the connection file, and in all for registration: while the
    /// controller does not answer, the request is sent again after jittered, doubling waits.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Seconds to wait for the compiler at startup.
    #[arg(long, default_value_t = 30.0)]
    compiler_timeout: f64,
    /// Seconds to keep trying to register again once the controller is lost (it died, restarted
    /// or evicted this engine); the worker and its variables are kept meanwhile. Then exit.
    #[arg(long, env = "RPX_RECONNECT_TIMEOUT", default_value_t = 60.0)]
    reconnect_timeout: f64,
    /// Take the engine id from the MPI launcher's rank (OMPI_COMM_WORLD_RANK, PMIX_RANK,
    /// PMI_RANK or SLURM_PROCID), plus --id-base.
    #[arg(long)]
    mpi: bool,
    /// Added to the rank under --mpi (for engines added to a cluster that has ids 0..N).
    #[arg(long, default_value_t = 0, requires = "mpi")]
    id_base: u64,
    /// Ask the controller for this engine id (granted unless a registered engine holds it;
    /// ipcluster restarts a dead engine under its old id this way).
    #[arg(long, conflicts_with = "mpi")]
    id: Option<u64>,
}

/// The rank variables of MPI launchers (and Slurm), in the order they are consulted.
const RANK_VARS: [&str; 4] = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"];

/// The launcher's rank, from the first rank variable that is set.
fn mpi_rank(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<u64> {
    for var in RANK_VARS {
        if let Some(v) = get(var) {
            return v.trim().parse().with_context(|| format!("{var}={v:?} is not a rank"));
        }
    }
    bail!("--mpi: none of {} is set; run ipengine --mpi under mpiexec or srun", RANK_VARS.join(", "))
}

fn main() {
    // The worker must not start a runtime or parse arguments: detect it first.
    if std::env::var_os(rpx_engine::child::WORKER_ENV).is_some() {
        rpx_worker::run();
    }
    // No glibc fastbins in the engine (the worker keeps the default for the user's code): each
    // message frees chunks that make glibc consolidate its fastbins, a third of the engine's
    // CPU per task. Measured (bench_ops, 10,000 load-balanced tasks): engine 46 -> 40 us.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: a malloc tuning call with a documented parameter, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
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
    if !(args.reconnect_timeout >= 0.0 && args.reconnect_timeout <= 1e9) {
        bail!("--reconnect-timeout must be a number of seconds, 0 or more");
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let requested_id = if args.mpi { Some(mpi_rank(|v| std::env::var(v).ok())? + args.id_base) } else { args.id };
    let (connection, connection_file, compiler) = match std::env::var(CONNECTION_INFO_ENV).ok().filter(|_| args.file.is_none()) {
        Some(line) => {
            let info = ConnectionInfo::parse(&line).with_context(|| format!("{CONNECTION_INFO_ENV} is not an rpx connection info"))?;
            (info.engine, None, CompilerSource::Given(info.compiler))
        }
        None => {
            let profile = Profile::new(&args.profile, &args.cluster_id);
            let file = args.file.clone().unwrap_or_else(|| profile.engine_file());
            let connection = wait_for_file(&file, timeout)?;
            let compiler_file = args.compiler_file.clone().unwrap_or_else(|| {
                let name = profile.compiler_file().file_name().expect("has a name").to_owned();
                file.parent().map_or_else(|| profile.compiler_file(), |d| d.join(&name))
            });
            (connection, Some(file), CompilerSource::File(compiler_file))
        }
    };
    let restart_notice = std::env::var(ENGINE_RESTARTED_ENV).ok().filter(|n| !n.trim().is_empty());
    let cfg = Config {
        connection,
        connection_file,
        compiler,
        requested_id,
        timeout,
        compiler_wait: Duration::from_secs_f64(args.compiler_timeout),
        reconnect_timeout: Duration::from_secs_f64(args.reconnect_timeout),
        restart_notice,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_comes_from_the_first_launcher_variable_set() {
        let env =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(mpi_rank(env(&[("OMPI_COMM_WORLD_RANK", "3"), ("PMI_RANK", "9")])).unwrap(), 3);
        assert_eq!(mpi_rank(env(&[("PMI_RANK", "2")])).unwrap(), 2);
        assert_eq!(mpi_rank(env(&[("SLURM_PROCID", "7")])).unwrap(), 7);
        assert!(mpi_rank(env(&[("PMIX_RANK", "x")])).unwrap_err().to_string().contains("not a rank"));
        assert!(mpi_rank(env(&[])).unwrap_err().to_string().contains("mpiexec"));
    }

    #[test]
    fn mpi_options_parse() {
        let a = Args::try_parse_from(["ipengine", "--mpi", "--id-base", "4"]).unwrap();
        assert!(a.mpi && a.id_base == 4);
        assert!(Args::try_parse_from(["ipengine", "--id-base", "4"]).is_err(), "--id-base needs --mpi");
        assert_eq!(Args::try_parse_from(["ipengine", "--id", "3"]).unwrap().id, Some(3));
        assert!(Args::try_parse_from(["ipengine", "--id", "3", "--mpi"]).is_err(), "--id or --mpi, not both");
    }
}
