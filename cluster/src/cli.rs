//! Command-line arguments (clap derive) and their validation into checked settings.
//!
//! Two phases, as ripgrep does it: clap parses the raw arguments, then [`Target::new`] and
//! the `check` methods turn them into values the commands can trust (safe file-name parts,
//! a supported launcher, a positive timeout).

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rpx_protocol::Profile;

use crate::Fail;

/// Start, stop, list and grow rpx clusters (a controller, a shared compiler and N engines).
#[derive(Debug, Parser)]
#[command(name = "ipcluster", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a controller, the compiler and N engines; stay in the foreground until Ctrl-C
    /// unless --daemonize.
    Start(StartArgs),
    /// Stop a running cluster: engines, compiler and controller, with no orphans.
    Stop(StopArgs),
    /// List the clusters under $RPX_DIR with their engine counts.
    List(ListArgs),
    /// Start N more engines against a running cluster.
    Engines(EnginesArgs),
}

/// Which cluster: a profile and a cluster id within it.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Profile name (directory `$RPX_DIR/profile_<name>`).
    #[arg(long, env = "RPX_PROFILE", default_value = "default")]
    pub profile: String,
    /// Cluster id, for several clusters in one profile (default: none).
    #[arg(long = "cluster-id", default_value = "", hide_default_value = true)]
    pub cluster_id: String,
}

/// Where engines are launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Launcher {
    Local,
    Mpi,
    Ssh,
    Slurm,
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// Number of engines (default: the number of CPUs).
    #[arg(short = 'n', long = "n")]
    pub n: Option<usize>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address the controller binds to (default 127.0.0.1).
    #[arg(long)]
    pub ip: Option<String>,
    /// Return once all engines are registered and leave the cluster running.
    #[arg(long)]
    pub daemonize: bool,
    /// Engine launcher. Only `local` is supported so far.
    #[arg(long, value_enum, default_value = "local")]
    pub engines: Launcher,
    /// Seconds to wait for the controller's connection files, and again for the engines to
    /// register.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Stop every cluster of the profile, whatever its cluster id.
    #[arg(long)]
    pub all: bool,
}

/// Output format of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: Format,
}

#[derive(Debug, Clone, Args)]
pub struct EnginesArgs {
    /// Number of engines to add.
    #[arg(short = 'n', long = "n")]
    pub n: usize,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Engine launcher. Only `local` is supported so far.
    #[arg(long, value_enum, default_value = "local")]
    pub engines: Launcher,
    /// Seconds to wait for the new engines to register.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// A checked profile + cluster id.
#[derive(Debug, Clone)]
pub struct Target {
    pub profile: Profile,
}

impl Target {
    pub fn new(args: &ClusterArgs) -> Result<Target, Fail> {
        check_name("profile", &args.profile, false)?;
        check_name("cluster id", &args.cluster_id, true)?;
        Ok(Target { profile: Profile::new(&args.profile, &args.cluster_id) })
    }

    /// `profile default` or `profile default, cluster id c1`, for messages.
    pub fn describe(&self) -> String {
        describe(&self.profile.name, &self.profile.cluster_id)
    }

    /// The `--profile P [--cluster-id C]` flags that name this cluster on a command line.
    pub fn flags(&self) -> String {
        flags(&self.profile.name, &self.profile.cluster_id)
    }
}

pub fn describe(profile: &str, cluster_id: &str) -> String {
    if cluster_id.is_empty() {
        format!("profile {profile}")
    } else {
        format!("profile {profile}, cluster id {cluster_id}")
    }
}

pub fn flags(profile: &str, cluster_id: &str) -> String {
    if cluster_id.is_empty() {
        format!("--profile {profile}")
    } else {
        format!("--profile {profile} --cluster-id {cluster_id}")
    }
}

/// Profile names and cluster ids become parts of file names: letters, digits, `_`, `-`, `.`.
fn check_name(what: &str, value: &str, may_be_empty: bool) -> Result<(), Fail> {
    if value.is_empty() {
        return if may_be_empty { Ok(()) } else { Err(Fail::usage(format!("the {what} must not be empty"))) };
    }
    let ok = value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Fail::usage(format!("invalid {what} {value:?}: use letters, digits, '_', '-' and '.' (not leading)")))
    }
}

/// Refuse launchers other than `local` with exit code 2.
pub fn check_launcher(l: Launcher) -> Result<(), Fail> {
    match l {
        Launcher::Local => Ok(()),
        other => {
            let name = format!("{other:?}").to_lowercase();
            Err(Fail::new(2, format!("--engines {name} is not supported yet; only --engines local is")))
        }
    }
}

pub fn check_timeout(secs: f64) -> Result<Duration, Fail> {
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(Fail::usage(format!("--timeout must be a number of seconds > 0, got {secs}")))
    }
}

/// `--ip` must be an IP address or `*` (the controller binds to it).
pub fn check_ip(ip: &Option<String>) -> Result<Option<String>, Fail> {
    match ip {
        None => Ok(None),
        Some(s) if s == "*" => Ok(Some(s.clone())),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(_) => Ok(Some(s.clone())),
            Err(_) => Err(Fail::usage(format!("--ip {s:?} is not an IP address (for example 127.0.0.1, 0.0.0.0 or *)"))),
        },
    }
}

/// Number of engines for `start`: `-n`, or the number of CPUs.
pub fn engine_count(n: Option<usize>) -> Result<usize, Fail> {
    let n = n.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    if n > 4096 {
        return Err(Fail::usage(format!("-n {n} is more engines than one ipcluster starts (at most 4096)")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ipcluster").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_arguments() {
        let cli = parse(&["start", "-n", "8", "--profile", "big", "--daemonize", "--cluster-id", "c1", "--ip", "0.0.0.0"]).unwrap();
        let Command::Start(a) = cli.command else { panic!("not start") };
        assert_eq!(a.n, Some(8));
        assert!(a.daemonize);
        assert_eq!(a.engines, Launcher::Local);
        assert_eq!(a.timeout, 30.0);
        let t = Target::new(&a.cluster).unwrap();
        assert_eq!(t.profile.name, "big");
        assert_eq!(t.profile.cluster_id, "c1");
        assert_eq!(t.flags(), "--profile big --cluster-id c1");
        assert_eq!(check_ip(&a.ip).unwrap().as_deref(), Some("0.0.0.0"));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["start", "-n", "-3"]).is_err());
        assert!(parse(&["start", "--engines", "pbs"]).is_err());
        assert!(parse(&["engines"]).is_err(), "engines needs -n");
        assert!(check_timeout(0.0).is_err());
        assert!(check_timeout(f64::NAN).is_err());
        assert!(check_timeout(2.5).is_ok());
        assert!(check_ip(&Some("localhost:80".into())).is_err());
        assert!(check_ip(&Some("*".into())).is_ok());
        let bad = ClusterArgs { profile: "../etc".into(), cluster_id: String::new() };
        assert_eq!(Target::new(&bad).unwrap_err().code, 2, "bad usage");
        let bad = ClusterArgs { profile: "ok".into(), cluster_id: "a/b".into() };
        assert!(Target::new(&bad).is_err());
        let bad = ClusterArgs { profile: "".into(), cluster_id: "".into() };
        assert!(Target::new(&bad).is_err());
    }

    #[test]
    fn other_launchers_exit_2() {
        assert!(check_launcher(Launcher::Local).is_ok());
        for l in [Launcher::Mpi, Launcher::Ssh, Launcher::Slurm] {
            let e = check_launcher(l).unwrap_err();
            assert_eq!(e.code, 2);
            assert!(e.msg.contains("not supported yet"), "{}", e.msg);
        }
    }

    #[test]
    fn list_output_format() {
        let cli = parse(&["list", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, Command::List(ListArgs { output: Format::Json })));
        let cli = parse(&["list"]).unwrap();
        assert!(matches!(cli.command, Command::List(ListArgs { output: Format::Text })));
    }
}
