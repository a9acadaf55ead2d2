//! `ipcluster`: start, stop, list and grow rpx clusters under profiles, with engines on this
//! host (`--engines local`), under one mpiexec (`--engines mpi`), over ssh on other hosts
//! (`--engines ssh`) or in batch jobs (`--engines slurm|sge|pbs`).
//!
//! # Layout
//! - [`cli`]: clap arguments ([`cli::ClusterCommand`]: the subcommands) and their validation into
//!   checked values (the launcher and its options, the engine count, addresses).
//! - [`launcher`]: the [`launcher::Launcher`] trait (start N engines, batched status, stop,
//!   logs) and what a launching process keeps of its launches ([`launcher::Batch`]);
//!   [`launcher::local`], [`launcher::mpi`] and [`launcher::ssh`] implement it, each with the
//!   record it leaves in the cluster file; [`launcher::hosts`] parses `--hosts`/`--hostfile`
//!   and places engines on hosts; [`launcher::batch`] implements it once for the batch
//!   schedulers ([`launcher::slurm`], [`launcher::sge`], [`launcher::pbs`]: job-script dialect,
//!   job ids, status parsing).
//! - [`state`]: the cluster state file (`security/cluster[-cid].json`: controller, compiler and
//!   every launcher's records) and the pure decisions made from it (running or stale, which
//!   logs belong to a cluster).
//! - [`procs`]: spawning members in their own session, `/proc` inspection, process-group
//!   signals, bounded child waits, log tails, and the SIGINT/SIGTERM flag.
//! - [`hub`]: [`hub::HubClient`], a tiny synchronous `connection_request` client of the
//!   controller's hub.
//! - [`start`]: `start` and `engines` (launch, wait for registration, then supervise).
//! - [`supervise`]: the supervisor: watch the compiler and the local engines, clean up after
//!   and restart the dead ones (same engine id, same compiler port), record it for `list`.
//! - [`restart`]: the restart policy as pure decisions (backoff, crash-loop limit).
//! - [`daemon`]: `start --daemonize` runs itself again as the detached supervisor and relays
//!   its start.
//! - [`stop`]: `stop` (every launcher's stop, then TERM, wait, KILL whole groups and tagged
//!   stragglers, remove files).
//! - [`list`]: `list` as a table or JSON, with each launcher's engines.
//!
//! Exit codes: 0 success, 1 failure (with a message saying what to do), 2 unsupported
//! option or bad usage.

mod cli;
mod daemon;
mod hub;
mod launcher;
mod list;
mod procs;
mod restart;
mod start;
mod state;
mod stop;
mod supervise;

use std::time::Instant;

use clap::Parser;

/// An error that ends `ipcluster` with a given exit code and message.
#[derive(Debug)]
pub struct Fail {
    pub code: i32,
    pub msg: String,
}

impl Fail {
    pub fn new(code: i32, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
    /// A usage error: exit code 2.
    pub fn usage(msg: impl Into<String>) -> Fail {
        Fail::new(2, msg)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Fail {}

fn main() {
    let t0 = Instant::now();
    // Writing to a closed pipe (`ipcluster list | head`) must not panic.
    // SAFETY: restoring the default disposition of SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::ClusterCommand::Start(a) => start::start(a, t0),
        cli::ClusterCommand::Stop(a) => stop::stop(a),
        cli::ClusterCommand::List(a) => list::list(a),
        cli::ClusterCommand::Engines(a) => start::engines(a, t0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if let Some(f) = e.downcast_ref::<Fail>() {
                eprintln!("ipcluster: {}", f.msg);
                std::process::exit(f.code);
            }
            eprintln!("ipcluster: error: {e:#}");
            std::process::exit(1);
        }
    }
}
