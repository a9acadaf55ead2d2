//! `rpx-kernel`: the rpx Jupyter kernel. Plain cells run locally in an evcxr context; the
//! magics `%px`, `%%px`, `%autopx`, `%pxresult` and `%pxconfig` run cells on the engines of an
//! rpx cluster and show each engine's output as ipyparallel does. `rpx-kernel install` writes
//! the `rpx` kernelspec.
//!
//! # Layout
//! - [`server`]: the five Jupyter sockets, signing, iopub, heartbeat, the control channel.
//! - [`shell`]: shell requests (execute, complete, inspect, is_complete, history, comms).
//! - [`local`]: the kernel's own evcxr context for local cells.
//! - [`px`]: the `%px` family through `rpx::Client` and `rpx_magics`.
//! - [`syntax`]: `is_complete` for Rust cells.
//! - [`relay`]: the local runtime's stdout relay that tells the kernel a `?` returned an error.
//! - [`install`]: the kernelspec.
//! - [`prepare`]: the `rpx` client crate compiled ahead of the first cell that uses it.
//!
//! The local runtime is `rpx_worker`'s worker process (this binary re-executed), and compile
//! errors render with `rpx_diagnostics`, as the cluster's compiler renders them.

mod install;
mod local;
mod prepare;
mod px;
mod relay;
mod server;
mod shell;
mod syntax;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "rpx-kernel", version, about = "The rpx Jupyter kernel: Rust on evcxr, with %px for rpx clusters")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the kernel (Jupyter starts it with the connection file).
    Kernel {
        /// The Jupyter connection file.
        #[arg(long, short = 'f')]
        connection_file: PathBuf,
    },
    /// Install the `rpx` kernelspec.
    Install {
        /// Into the user's Jupyter data directory.
        #[arg(long, conflicts_with = "prefix")]
        user: bool,
        /// Into PREFIX/share/jupyter/kernels (e.g. a virtualenv's prefix).
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Do not compile the `rpx` client crate now (the first cell that uses it will, or a
        /// kernel in the background).
        #[arg(long)]
        no_prepare: bool,
    },
    /// Compile the `rpx` client crate into the user's cache, so that a kernel's first `rpx::`
    /// cell takes seconds, not minutes.
    Prepare {
        /// Quiet, and give up at once if another prepare is running (a kernel's background run).
        #[arg(long)]
        background: bool,
    },
}

/// `rpx-kernel prepare`, also the last step of `rpx-kernel install`.
fn run_prepare(background: bool) -> anyhow::Result<()> {
    let client = local::client_crate_path()
        .ok_or_else(|| anyhow::anyhow!("cannot find the rpx client crate's sources (set RPX_CLIENT_PATH to its directory)"))?;
    if !background && prepare::ready_seed(&client).is_none() {
        println!("Compiling the rpx client crate for the kernel (minutes, once)...");
    }
    match prepare::prepare(&client, !background)? {
        prepare::Prepared::Built(dir, took) if !background => {
            println!("Prepared the rpx client crate in {:.0} s: {}", took.as_secs_f64(), dir.display())
        }
        prepare::Prepared::Ready(dir) if !background => println!("The rpx client crate is prepared already: {}", dir.display()),
        _ => {}
    }
    Ok(())
}

fn main() {
    // This binary is also the runtime of the local cells (the engines' worker, which turns
    // SIGINT into a panic in the running cell) and evcxr's rustc wrapper: that must come first.
    if std::env::var_os(local::WORKER_ENV).is_some() {
        relay::install();
        rpx_worker::run();
    }
    // A seed build's rustc wrapper compiles rather than take crates from evcxr's cache (see
    // `prepare`), so the seed's dep-info names its own files.
    prepare::wrapper_hook();
    evcxr::runtime_hook();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RPX_KERNEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let r = match args.cmd {
        Cmd::Kernel { connection_file } => prepare::BuildDir::create().and_then(|_| {
            let r = server::run(&connection_file);
            prepare::BuildDir::remove();
            r
        }),
        Cmd::Install { user, prefix, no_prepare } => install::install(user, prefix.as_deref()).and_then(|dir| {
            println!("Installed the `{}` kernelspec in {}", install::KERNEL_NAME, dir.display());
            if no_prepare {
                return Ok(());
            }
            run_prepare(false)
        }),
        Cmd::Prepare { background } => run_prepare(background),
    };
    if let Err(e) = r {
        eprintln!("rpx-kernel: {e:#}");
        std::process::exit(1);
    }
}
