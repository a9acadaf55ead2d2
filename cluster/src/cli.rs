//! Command-line arguments (clap derive) and their validation into checked settings.
//!
//! Two phases, as ripgrep does it: clap parses the raw arguments, then [`Target::new`] and
//! the `check` methods turn them into values the commands can trust (safe file-name parts,
//! a supported launcher with only its own options, host lists, a positive timeout):
//! [`StartArgs::check`] gives a [`StartConfig`], [`EnginesArgs::check`] an [`EnginesConfig`],
//! each with the chosen [`Launch`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rpx_protocol::Profile;

use crate::launcher::batch::{self, JobOptions};
use crate::launcher::hosts::{self, HostSpec};
use crate::launcher::local::Local;
use crate::launcher::mpi::Mpi;
use crate::launcher::ssh::Ssh;
use crate::launcher::{PbsLauncher, SgeLauncher, SlurmLauncher};
use crate::restart::Policy;
use crate::Fail;

/// Start, stop, list and grow rpx clusters (a controller, a shared compiler and N engines).
#[derive(Debug, Parser)]
#[command(name = "ipcluster", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// What `ipcluster` does: its subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a controller, the compiler and N engines; stay in the foreground until Ctrl-C
    /// unless --daemonize.
    Start(StartArgs),
    /// Stop a running cluster: engines, compiler and controller, with no orphans.
    Stop(StopArgs),
    /// List the clusters under $RPX_DIR with their engine counts and what each launcher runs.
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

/// Where engines are launched (`--engines`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherKind {
    Local,
    Mpi,
    Ssh,
    Slurm,
    Sge,
    Pbs,
}

impl LauncherKind {
    pub fn name(self) -> &'static str {
        match self {
            LauncherKind::Local => "local",
            LauncherKind::Mpi => "mpi",
            LauncherKind::Ssh => "ssh",
            LauncherKind::Slurm => "slurm",
            LauncherKind::Sge => "sge",
            LauncherKind::Pbs => "pbs",
        }
    }
}

/// How engines are launched: options shared by `start` and `engines`.
#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Engine launcher: local (processes on this host), mpi (one mpiexec), ssh (one ssh
    /// connection per host), or a batch scheduler: slurm (sbatch), sge (Grid Engine qsub) or
    /// pbs (PBS Pro/OpenPBS qsub).
    #[arg(long, value_enum, default_value = "local")]
    pub engines: LauncherKind,
    /// mpi: extra mpiexec arguments, split like a shell would (e.g. "--host a,b").
    #[arg(long = "mpi-args", value_name = "ARGS", allow_hyphen_values = true)]
    pub mpi_args: Option<String>,
    /// mpi: the mpiexec command (default: mpiexec from PATH; Open MPI and MPICH are told apart).
    #[arg(long, value_name = "CMD")]
    pub mpiexec: Option<String>,
    /// ssh: hosts with engine counts, h1:2,h2:3 (or h1,h2: -n engines spread round-robin).
    #[arg(long, value_name = "LIST")]
    pub hosts: Option<String>,
    /// ssh: a file of hosts, one a line: `host`, `host:n` or `host slots=n`; `#` comments.
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// ssh, slurm, sge, pbs: the ipengine command on the hosts or nodes, split like a shell
    /// would (default: this ipengine's absolute path, as on a shared filesystem).
    #[arg(long = "engine-cmd", value_name = "CMD")]
    pub engine_cmd: Option<String>,
    /// ssh: the ssh program (default: ssh from PATH).
    #[arg(long, value_name = "CMD")]
    pub ssh: Option<String>,
    /// ssh: extra ssh arguments, split like a shell would (e.g. "-F ssh_config" or "-p 2222").
    #[arg(long = "ssh-args", value_name = "ARGS", allow_hyphen_values = true)]
    pub ssh_args: Option<String>,
    /// slurm: the partition to submit to.
    #[arg(long, value_name = "NAME")]
    pub partition: Option<String>,
    /// sge, pbs: the queue to submit to.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// slurm, sge, pbs: the account (project) to charge.
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// slurm: the quality of service.
    #[arg(long, value_name = "NAME")]
    pub qos: Option<String>,
    /// slurm, sge, pbs: the jobs' time limit: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS.
    #[arg(long, value_name = "TIME")]
    pub time: Option<String>,
    /// slurm: nodes per job.
    #[arg(long, value_name = "N")]
    pub nodes: Option<usize>,
    /// slurm: engines (tasks) per node.
    #[arg(long = "engines-per-node", value_name = "N")]
    pub engines_per_node: Option<usize>,
    /// slurm, sge, pbs: at most this many engines per job; more engines make more jobs
    /// (default: one job for all).
    #[arg(long = "engines-per-job", value_name = "N")]
    pub engines_per_job: Option<usize>,
    /// slurm, sge, pbs: an extra scheduler option for the job script, without its prefix
    /// (e.g. "--mem=2G" for slurm, "-l mem_free=2G" for sge); repeatable.
    #[arg(long = "directive", value_name = "OPTION", allow_hyphen_values = true)]
    pub directives: Vec<String>,
    /// slurm, sge, pbs: the job script template (minijinja syntax; variables: name, n,
    /// first_index, output, directives, engine_command, queue, account, qos, time, nodes,
    /// engines_per_node). It must use {{ engine_command }}.
    #[arg(long = "job-template", value_name = "FILE")]
    pub job_template: Option<PathBuf>,
}

/// A checked launcher with its options.
#[derive(Debug, Clone)]
pub enum Launch {
    Local(Local),
    Mpi(Mpi),
    Ssh(Ssh),
    Slurm(SlurmLauncher),
    Sge(SgeLauncher),
    Pbs(PbsLauncher),
}

impl LaunchArgs {
    /// The launcher and the number of engines: `n` is `-n`; `default_n` the number without
    /// `-n` (`None`: `-n` is required). ssh hosts with counts fix the number themselves.
    pub fn check(&self, n: Option<usize>, default_n: Option<usize>) -> Result<(Launch, usize), Fail> {
        self.check_foreign_options()?;
        let count = |n: Option<usize>| {
            n.or(default_n)
                .ok_or_else(|| Fail::usage(format!("-n is required with --engines {}", self.engines.name())))
                .and_then(check_count)
        };
        match self.engines {
            LauncherKind::Mpi => Ok((Launch::Mpi(Mpi::new(self.mpiexec.clone(), split("--mpi-args", &self.mpi_args)?)), count(n)?)),
            LauncherKind::Ssh => {
                let specs = self.host_specs()?;
                let total = hosts::total(&specs, n).map_err(Fail::usage).and_then(check_count)?;
                let engine_cmd = match split("--engine-cmd", &self.engine_cmd)? {
                    words if words.is_empty() && self.engine_cmd.is_some() => return Err(Fail::usage("--engine-cmd is empty")),
                    words if words.is_empty() => None,
                    words => Some(words),
                };
                Ok((Launch::Ssh(Ssh::new(specs, self.ssh.clone(), split("--ssh-args", &self.ssh_args)?, engine_cmd)), total))
            }
            LauncherKind::Slurm => Ok((Launch::Slurm(SlurmLauncher::new(self.job_options()?)?), count(n)?)),
            LauncherKind::Sge => Ok((Launch::Sge(SgeLauncher::new(self.job_options()?)?), count(n)?)),
            LauncherKind::Pbs => Ok((Launch::Pbs(PbsLauncher::new(self.job_options()?)?), count(n)?)),
            LauncherKind::Local => Ok((Launch::Local(Local), count(n)?)),
        }
    }

    /// The batch options, checked (the scheduler then refuses those it has no use for).
    fn job_options(&self) -> Result<JobOptions, Fail> {
        let positive = |flag: &str, v: Option<usize>| match v {
            Some(0) => Err(Fail::usage(format!("{flag} must be at least 1"))),
            v => Ok(v),
        };
        let name = |flag: &str, v: &Option<String>| match v {
            Some(s) if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                Err(Fail::usage(format!("{flag} {s:?}: a name without spaces")))
            }
            v => Ok(v.clone()),
        };
        for d in &self.directives {
            if d.trim().is_empty() || d.contains(['\n', '\r']) {
                return Err(Fail::usage(format!("--directive {d:?}: one scheduler option on one line")));
            }
        }
        let template = match &self.job_template {
            None => None,
            Some(p) => Some((
                p.clone(),
                std::fs::read_to_string(p).map_err(|e| Fail::usage(format!("cannot read --job-template {}: {e}", p.display())))?,
            )),
        };
        let engine_cmd = match split("--engine-cmd", &self.engine_cmd)? {
            words if words.is_empty() && self.engine_cmd.is_some() => return Err(Fail::usage("--engine-cmd is empty")),
            words if words.is_empty() => None,
            words => Some(words),
        };
        Ok(JobOptions {
            queue: name("--partition", &self.partition)?.or(name("--queue", &self.queue)?),
            account: name("--account", &self.account)?,
            qos: name("--qos", &self.qos)?,
            time: self.time.as_deref().map(batch::parse_time).transpose().map_err(Fail::usage)?,
            nodes: positive("--nodes", self.nodes)?,
            engines_per_node: positive("--engines-per-node", self.engines_per_node)?,
            directives: self.directives.clone(),
            template,
            engines_per_job: positive("--engines-per-job", self.engines_per_job)?,
            engine_cmd,
        })
    }

    /// Options of one launcher given with another: a usage error naming the right one.
    fn check_foreign_options(&self) -> Result<(), Fail> {
        use LauncherKind::{Mpi, Pbs, Sge, Slurm, Ssh};
        const BATCH: &[LauncherKind] = &[Slurm, Sge, Pbs];
        let given: [(&str, bool, &[LauncherKind]); 17] = [
            ("--mpi-args", self.mpi_args.is_some(), &[Mpi]),
            ("--mpiexec", self.mpiexec.is_some(), &[Mpi]),
            ("--hosts", self.hosts.is_some(), &[Ssh]),
            ("--hostfile", self.hostfile.is_some(), &[Ssh]),
            ("--engine-cmd", self.engine_cmd.is_some(), &[Ssh, Slurm, Sge, Pbs]),
            ("--ssh", self.ssh.is_some(), &[Ssh]),
            ("--ssh-args", self.ssh_args.is_some(), &[Ssh]),
            ("--partition", self.partition.is_some(), &[Slurm]),
            ("--queue", self.queue.is_some(), &[Sge, Pbs]),
            ("--account", self.account.is_some(), BATCH),
            ("--qos", self.qos.is_some(), &[Slurm]),
            ("--time", self.time.is_some(), BATCH),
            ("--nodes", self.nodes.is_some(), &[Slurm]),
            ("--engines-per-node", self.engines_per_node.is_some(), &[Slurm]),
            ("--engines-per-job", self.engines_per_job.is_some(), BATCH),
            ("--directive", !self.directives.is_empty(), BATCH),
            ("--job-template", self.job_template.is_some(), BATCH),
        ];
        match given.iter().find(|(_, set, kinds)| *set && !kinds.contains(&self.engines)) {
            Some((flag, _, kinds)) => {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                Err(Fail::usage(format!("{flag} goes with --engines {} (this is --engines {})", names.join("|"), self.engines.name())))
            }
            None => Ok(()),
        }
    }

    /// The hosts of `--hosts` or `--hostfile` (exactly one of them).
    fn host_specs(&self) -> Result<Vec<HostSpec>, Fail> {
        match (&self.hosts, &self.hostfile) {
            (Some(_), Some(_)) => Err(Fail::usage("give --hosts or --hostfile, not both")),
            (Some(list), None) => hosts::parse_hosts(list).map_err(|e| Fail::usage(format!("--hosts {list:?}: {e}"))),
            (None, Some(file)) => {
                let text =
                    std::fs::read_to_string(file).map_err(|e| Fail::usage(format!("cannot read --hostfile {}: {e}", file.display())))?;
                hosts::parse_hostfile(&text).map_err(|e| Fail::usage(format!("--hostfile {}: {e}", file.display())))
            }
            (None, None) => Err(Fail::usage("--engines ssh needs --hosts h1:2,h2:3 or --hostfile FILE")),
        }
    }
}

/// Split an option's value into words like a shell would (quotes, backslashes).
fn split(flag: &str, value: &Option<String>) -> Result<Vec<String>, Fail> {
    match value {
        None => Ok(Vec::new()),
        Some(v) => shell_words::split(v).map_err(|e| Fail::usage(format!("cannot split {flag} {v:?} into words: {e}"))),
    }
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// Number of engines (default: the number of CPUs; with --engines ssh, the hosts' counts,
    /// else one per host).
    #[arg(short = 'n', long = "n")]
    pub n: Option<usize>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address the controller and the compiler bind to (default 127.0.0.1; `*` or 0.0.0.0 for
    /// all interfaces, as engines on other hosts need).
    #[arg(long)]
    pub ip: Option<String>,
    /// Address written into the connection files when binding all interfaces (this host's
    /// name or address as the engines' hosts reach it).
    #[arg(long, value_name = "HOST")]
    pub location: Option<String>,
    /// Return once all engines are registered and leave the cluster running.
    #[arg(long)]
    pub daemonize: bool,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Seconds to wait for the controller's connection files, and again for the engines to
    /// register (and, for engines on other hosts, for the compiler's connection file).
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// The controller's task record storage (`ipcontroller --db`): memory (default) or sqlite
    /// (`<profile>/security/tasks.db`, served again by `ipcontroller --restore`).
    #[arg(long, value_name = "memory|sqlite")]
    pub db: Option<String>,
    /// Do not restart local engines or the compiler when they die (with --daemonize: leave
    /// no supervisor process behind).
    #[arg(long)]
    pub no_restart: bool,
    /// Give up on an engine or the compiler after this many restarts in a row that each died
    /// within --restart-window of starting (a crash loop). Restarts wait 0.5 s, doubling up
    /// to 30 s.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub restart_limit: u32,
    /// Seconds: a member that dies sooner than this after its start counts towards
    /// --restart-limit; one that ran longer starts the count over.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub restart_window: f64,
    /// Internal: this process is the detached supervisor of `start --daemonize`.
    #[arg(long = "detached-supervisor", hide = true)]
    pub detached_supervisor: bool,
}

/// Checked `start` arguments.
#[derive(Debug, Clone)]
pub struct StartConfig {
    pub target: Target,
    pub n: usize,
    pub limit: Duration,
    pub ip: Option<String>,
    pub location: Option<String>,
    pub daemonize: bool,
    /// `--db` for the controller, when given.
    pub db: Option<String>,
    /// How dead members are restarted.
    pub policy: Policy,
    /// This process is the detached supervisor of `--daemonize`.
    pub detached: bool,
}

impl StartConfig {
    /// This process supervises the cluster once it runs: in the foreground, or as the
    /// detached supervisor.
    pub fn supervises(&self) -> bool {
        !self.daemonize || self.detached
    }
}

impl StartArgs {
    pub fn check(&self) -> Result<(StartConfig, Launch), Fail> {
        let (launch, n) = self.launch.check(self.n, Some(default_engine_count()))?;
        let cfg = StartConfig {
            limit: check_timeout(self.timeout)?,
            ip: check_ip(&self.ip)?,
            location: check_location(&self.location)?,
            target: Target::new(&self.cluster)?,
            n,
            daemonize: self.daemonize,
            db: match self.db.as_deref() {
                None => None,
                Some(v @ ("memory" | "sqlite")) => Some(v.to_string()),
                Some(other) => return Err(Fail::usage(format!("--db {other:?}: use memory or sqlite"))),
            },
            policy: check_policy(self.no_restart, self.restart_limit, self.restart_window)?,
            detached: self.detached_supervisor && self.daemonize,
        };
        Ok((cfg, launch))
    }
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
    /// Number of engines to add (with --engines ssh: default the hosts' counts, else one per
    /// host).
    #[arg(short = 'n', long = "n")]
    pub n: Option<usize>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Seconds to wait for the new engines to register.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// Checked `engines` arguments.
#[derive(Debug, Clone)]
pub struct EnginesConfig {
    pub target: Target,
    pub n: usize,
    pub limit: Duration,
}

impl EnginesArgs {
    pub fn check(&self) -> Result<(EnginesConfig, Launch), Fail> {
        let (launch, n) = self.launch.check(self.n, None)?;
        if n == 0 {
            return Err(Fail::usage("-n must be at least 1"));
        }
        Ok((EnginesConfig { limit: check_timeout(self.timeout)?, target: Target::new(&self.cluster)?, n }, launch))
    }
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

pub fn check_timeout(secs: f64) -> Result<Duration, Fail> {
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(Fail::usage(format!("--timeout must be a number of seconds > 0, got {secs}")))
    }
}

/// The restart policy from `--no-restart`, `--restart-limit` and `--restart-window`.
pub fn check_policy(no_restart: bool, limit: u32, window: f64) -> Result<Policy, Fail> {
    if !(window.is_finite() && window > 0.0 && window <= 86_400.0) {
        return Err(Fail::usage(format!("--restart-window must be a number of seconds > 0, got {window}")));
    }
    Ok(Policy { restart: !no_restart, limit, window: Duration::from_secs_f64(window), ..Policy::default() })
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

/// `--location`: a host name or address for the connection files.
pub fn check_location(location: &Option<String>) -> Result<Option<String>, Fail> {
    match location {
        Some(l) if l.is_empty() || l.starts_with('-') || l.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Err(Fail::usage(format!("--location {l:?} is not a host name or address")))
        }
        other => Ok(other.clone()),
    }
}

/// Engines `start` launches without `-n`: one per CPU.
pub fn default_engine_count() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// At most 4096 engines per call.
pub fn check_count(n: usize) -> Result<usize, Fail> {
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
        let ClusterCommand::Start(a) = cli.command else { panic!("not start") };
        assert_eq!(a.n, Some(8));
        assert!(a.daemonize);
        assert_eq!(a.launch.engines, LauncherKind::Local);
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
        assert!(parse(&["start", "--engines", "lsf"]).is_err());
        assert_eq!(engines_check(&["engines"]).unwrap_err().code, 2, "engines needs -n");
        assert_eq!(engines_check(&["engines", "-n", "0"]).unwrap_err().code, 2);
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

    fn start_check(args: &[&str]) -> Result<(StartConfig, Launch), Fail> {
        let ClusterCommand::Start(a) = parse(args).unwrap().command else { panic!("not start") };
        a.check()
    }

    #[test]
    fn start_passes_a_checked_db_choice() {
        assert_eq!(start_check(&["start", "-n", "1"]).unwrap().0.db, None);
        assert_eq!(start_check(&["start", "-n", "1", "--db", "sqlite"]).unwrap().0.db.as_deref(), Some("sqlite"));
        assert_eq!(start_check(&["start", "-n", "1", "--db", "mongodb"]).unwrap_err().code, 2);
    }

    fn engines_check(args: &[&str]) -> Result<(EnginesConfig, Launch), Fail> {
        let ClusterCommand::Engines(a) = parse(args).unwrap().command else { panic!("not engines") };
        a.check()
    }

    #[test]
    fn batch_launchers_take_their_options() {
        let (cfg, l) = start_check(&[
            "start",
            "--engines",
            "slurm",
            "-n",
            "8",
            "--partition",
            "debug",
            "--account",
            "a1",
            "--qos",
            "hi",
            "--time",
            "1:00:00",
            "--nodes",
            "2",
            "--engines-per-node",
            "2",
            "--engines-per-job",
            "4",
            "--directive",
            "--mem=1G",
            "--engine-cmd",
            "/opt/ipengine",
        ])
        .unwrap();
        let Launch::Slurm(s) = l else { panic!("slurm") };
        assert_eq!(cfg.n, 8);
        let o = &s.opts;
        assert_eq!(
            (o.queue.as_deref(), o.account.as_deref(), o.qos.as_deref(), o.time),
            (Some("debug"), Some("a1"), Some("hi"), Some(3600))
        );
        assert_eq!((o.nodes, o.engines_per_node, o.engines_per_job), (Some(2), Some(2), Some(4)));
        assert_eq!(o.directives, ["--mem=1G"]);
        assert_eq!(o.engine_cmd, Some(vec!["/opt/ipengine".to_string()]));
        let (_, l) = engines_check(&["engines", "-n", "2", "--engines", "sge", "--queue", "all.q", "--time", "30"]).unwrap();
        let Launch::Sge(s) = l else { panic!("sge") };
        assert_eq!((s.opts.queue.as_deref(), s.opts.time), (Some("all.q"), Some(1800)));
        assert!(matches!(start_check(&["start", "-n", "1", "--engines", "pbs"]).unwrap().1, Launch::Pbs(_)));
    }

    #[test]
    fn bad_batch_options_are_refused_with_exit_2() {
        let usage = |args: &[&str]| {
            let e = start_check(args).unwrap_err();
            assert_eq!(e.code, 2, "{args:?}: {}", e.msg);
            e.msg
        };
        assert!(usage(&["start", "--engines", "slurm", "--queue", "q"]).contains("--queue goes with --engines sge|pbs"));
        assert!(usage(&["start", "--engines", "sge", "--partition", "p"]).contains("--partition goes with --engines slurm"));
        assert!(usage(&["start", "--partition", "p"]).contains("(this is --engines local)"));
        assert!(usage(&["start", "--engines", "mpi", "--time", "5"]).contains("--time goes with"));
        assert!(usage(&["start", "--engines", "sge", "--nodes", "2"]).contains("--nodes goes with --engines slurm"));
        assert!(usage(&["start", "--engines", "slurm", "--time", "soon"]).contains("--time \"soon\""));
        assert!(usage(&["start", "--engines", "slurm", "--engines-per-job", "0"]).contains("at least 1"));
        assert!(usage(&["start", "--engines", "slurm", "--partition", "a b"]).contains("without spaces"));
        assert!(usage(&["start", "--engines", "slurm", "--directive", "a\nb"]).contains("one line"));
        assert!(usage(&["start", "--engines", "slurm", "--job-template", "/nonexistent/t.sh"]).contains("cannot read --job-template"));
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.sh");
        std::fs::write(&t, "#!/bin/sh\necho no engines\n").unwrap();
        assert!(usage(&["start", "--engines", "slurm", "--job-template", t.to_str().unwrap()]).contains("engine_command"));
        std::fs::write(&t, "#!/bin/sh\n{{ engine_command }}\n").unwrap();
        assert!(
            usage(&["start", "--engines", "slurm", "--account", "x", "--job-template", t.to_str().unwrap()]).contains("would be ignored")
        );
    }

    #[test]
    fn local_mpi_and_ssh_are_accepted() {
        let (cfg, l) = start_check(&["start", "-n", "3"]).unwrap();
        assert!(matches!(l, Launch::Local(_)));
        assert_eq!(cfg.n, 3);
        let (cfg, l) =
            start_check(&["start", "--engines", "mpi", "-n", "4", "--mpi-args", "--host 'a b',c -x FOO", "--mpiexec", "mpiexec.mpich"])
                .unwrap();
        let Launch::Mpi(m) = l else { panic!("mpi") };
        assert_eq!((cfg.n, m.command.as_str()), (4, "mpiexec.mpich"));
        assert_eq!(m.args, ["--host", "a b,c", "-x", "FOO"]);
        let (cfg, l) = start_check(&[
            "start",
            "--engines",
            "ssh",
            "--hosts",
            "h1:2,h2:3",
            "--ssh-args",
            "-F /x/cfg",
            "--engine-cmd",
            "/opt/rpx/ipengine --timeout 20",
            "--ip",
            "*",
            "--location",
            "head",
        ])
        .unwrap();
        let Launch::Ssh(s) = l else { panic!("ssh") };
        assert_eq!(cfg.n, 5, "the hosts' counts");
        assert_eq!((cfg.ip.as_deref(), cfg.location.as_deref()), (Some("*"), Some("head")));
        assert_eq!(s.ssh_args, ["-F", "/x/cfg"]);
        assert_eq!(s.engine_cmd, Some(vec!["/opt/rpx/ipengine".to_string(), "--timeout".into(), "20".into()]));
        assert_eq!(s.program, "ssh");
        let (cfg, _) = start_check(&["start", "--engines", "ssh", "--hosts", "h1,h2", "-n", "7"]).unwrap();
        assert_eq!(cfg.n, 7, "-n spread over hosts without counts");
        let (cfg, _) = engines_check(&["engines", "--engines", "ssh", "--hosts", "h1,h2"]).unwrap();
        assert_eq!(cfg.n, 2, "one per host by default");
    }

    #[test]
    fn hostfile_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hosts");
        std::fs::write(&f, "# two hosts\nh1 slots=2\nh2:1\n").unwrap();
        let (cfg, l) = start_check(&["start", "--engines", "ssh", "--hostfile", f.to_str().unwrap()]).unwrap();
        let Launch::Ssh(s) = l else { panic!("ssh") };
        assert_eq!((cfg.n, s.hosts.len()), (3, 2));
        std::fs::write(&f, "h1 bogus\n").unwrap();
        let e = start_check(&["start", "--engines", "ssh", "--hostfile", f.to_str().unwrap()]).unwrap_err();
        assert!(e.code == 2 && e.msg.contains("line 1"), "{}", e.msg);
        let e = start_check(&["start", "--engines", "ssh", "--hostfile", "/nonexistent/hosts"]).unwrap_err();
        assert!(e.code == 2 && e.msg.contains("cannot read --hostfile"), "{}", e.msg);
    }

    #[test]
    fn launcher_options_are_validated() {
        let usage = |args: &[&str]| {
            let e = start_check(args).unwrap_err();
            assert_eq!(e.code, 2, "{args:?}: {}", e.msg);
            e.msg
        };
        assert!(usage(&["start", "--hosts", "h1:2"]).contains("--hosts goes with --engines ssh (this is --engines local)"));
        assert!(usage(&["start", "--engines", "mpi", "--hostfile", "f"]).contains("--hostfile goes with --engines ssh"));
        assert!(usage(&["start", "--engines", "ssh", "--hosts", "h", "--mpi-args", "-x A"]).contains("--mpi-args goes with --engines mpi"));
        assert!(usage(&["start", "--mpiexec", "m"]).contains("--mpiexec goes with --engines mpi"));
        assert!(usage(&["start", "--ssh-args", "-p 2"]).contains("--ssh-args goes with --engines ssh"));
        assert!(usage(&["start", "--engines", "ssh"]).contains("needs --hosts"));
        assert!(usage(&["start", "--engines", "ssh", "--hosts", "a", "--hostfile", "f"]).contains("not both"));
        assert!(usage(&["start", "--engines", "ssh", "--hosts", "h1:2,h2:3", "-n", "4"]).contains("does not match"));
        assert!(usage(&["start", "--engines", "ssh", "--hosts", "h1:2,h2"]).contains("every host"));
        assert!(
            usage(&["start", "--engines", "ssh", "--hosts", "h1", "--ssh-args", "-o 'unterminated"]).contains("cannot split --ssh-args")
        );
        assert!(usage(&["start", "--engines", "ssh", "--hosts", "h1", "--engine-cmd", ""]).contains("--engine-cmd is empty"));
        assert!(usage(&["start", "--engines", "mpi", "-n", "5000"]).contains("at most 4096"));
        assert!(usage(&["start", "--location=-x"]).contains("--location"));
        assert!(engines_check(&["engines", "--engines", "mpi"]).unwrap_err().msg.contains("-n is required with --engines mpi"));
    }

    #[test]
    fn restart_options() {
        let (cfg, _) = start_check(&["start", "-n", "1"]).unwrap();
        assert_eq!(cfg.policy, Policy::default());
        assert!(cfg.supervises() && !cfg.detached, "the foreground supervises");
        let (cfg, _) =
            start_check(&["start", "-n", "1", "--daemonize", "--no-restart", "--restart-limit", "2", "--restart-window", "5"]).unwrap();
        assert!(!cfg.policy.restart);
        assert_eq!((cfg.policy.limit, cfg.policy.window), (2, Duration::from_secs(5)));
        assert!(!cfg.supervises(), "the launching command of --daemonize does not");
        let (cfg, _) = start_check(&["start", "-n", "1", "--daemonize", "--detached-supervisor"]).unwrap();
        assert!(cfg.detached && cfg.supervises());
        let (cfg, _) = start_check(&["start", "-n", "1", "--detached-supervisor"]).unwrap();
        assert!(!cfg.detached, "only with --daemonize");
        assert_eq!(start_check(&["start", "--restart-window", "0"]).unwrap_err().code, 2);
        assert!(parse(&["start", "--restart-limit", "-1"]).is_err());
        let help = Cli::command().find_subcommand_mut("start").unwrap().render_help().to_string();
        assert!(help.contains("--no-restart") && help.contains("--restart-limit") && !help.contains("detached-supervisor"), "{help}");
    }

    #[test]
    fn list_output_format() {
        let cli = parse(&["list", "-o", "json"]).unwrap();
        assert!(matches!(cli.command, ClusterCommand::List(ListArgs { output: Format::Json })));
        let cli = parse(&["list"]).unwrap();
        assert!(matches!(cli.command, ClusterCommand::List(ListArgs { output: Format::Text })));
    }
}
