//! What the batch-scheduler launchers (`--engines slurm|sge|pbs`) share: job-script options
//! ([`JobOptions`]), rendering a job script through a template ([`render`], minijinja: the
//! scheduler's default template or the user's `--job-template FILE`), the record each
//! submission leaves in the cluster file ([`BatchJob`]), job states ([`JobState`]) and the
//! generic [`BatchLauncher`] that submits, polls and cancels through a [`Scheduler`].
//!
//! One submission per `--engines-per-job` engines (default: all of them in one job). Each has
//! a working directory `<profile>/batch/<kind>[-cid]-<first index>/` (mode 0700) holding the
//! rendered `job.sh` and the `job_id`; the job's output goes to
//! `log/ipengine[-cid]-<kind>-<first index>.log`. The submission command runs with
//! `RPX_CONNECTION_INFO` and `RPX_CLUSTER_INSTANCE` in its environment, and the job scripts
//! export the environment to the job (`--export=ALL`, `-V`): the key is never in the script,
//! nor on a command line, and no file needs to be shared with the nodes.
//!
//! Status: one scheduler call for all jobs of a cluster (`squeue`, `qstat`), parsed by the
//! scheduler's pure function. Stop: one cancel call for all jobs (`scancel`, `qdel`), then a
//! bounded wait until none of them is pending or running.

use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{LaunchCtx, LaunchStatus, Launcher, Record, Spawned};
use crate::procs;
use crate::state::{self, ClusterState, INSTANCE_ENV};
use crate::Fail;
use rpx_protocol::connection::CONNECTION_INFO_ENV;

/// How long one scheduler command (submit, status, cancel) may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
/// How long `stop` waits for cancelled jobs to leave the pending and running states.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Job-script options shared by the schedulers (each takes the ones it has; one it lacks is a
/// usage error from [`Scheduler::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOptions {
    /// `--partition` (Slurm) / `--queue` (SGE, PBS).
    pub queue: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time`, in seconds (checked from `[D-]HH:MM:SS`, `MM:SS` or minutes).
    pub time: Option<u64>,
    pub nodes: Option<usize>,
    pub engines_per_node: Option<usize>,
    /// `--directive`: extra scheduler options, one per line, without the `#SBATCH`-style
    /// prefix (a line that starts with `#` is taken as it is).
    pub directives: Vec<String>,
    /// `--job-template FILE`: its path and text.
    pub template: Option<(PathBuf, String)>,
    /// `--engines-per-job`: at most this many engines per submission.
    pub engines_per_job: Option<usize>,
    /// `--engine-cmd`: the ipengine command on the nodes (default: this ipengine's path).
    pub engine_cmd: Option<Vec<String>>,
}

/// Parse a time limit: `MINUTES`, `MM:SS`, `HH:MM:SS` or `D-HH:MM:SS` (Slurm's forms), to
/// seconds.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || format!("--time {s:?}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS");
    let num =
        |p: &str| if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) { p.parse::<u64>().map_err(|_| bad()) } else { Err(bad()) };
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (num(d)?, r),
        None => (0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let secs = match (days > 0 || s.contains('-'), parts.as_slice()) {
        (false, [m]) => num(m)? * 60,
        (false, [m, sec]) => num(m)? * 60 + num(sec)?,
        (_, [h, m, sec]) => num(h)? * 3600 + num(m)? * 60 + num(sec)?,
        _ => return Err(bad()),
    } + days * 86_400;
    if secs == 0 {
        return Err(format!("--time {s:?}: the time limit must be more than 0"));
    }
    Ok(secs)
}

/// `HH:MM:SS` (hours may pass 24), as SGE's `h_rt` and PBS's `walltime` take it.
pub fn hms(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `D-HH:MM:SS`, as Slurm's `--time` takes it.
pub fn dhms(secs: u64) -> String {
    format!("{}-{:02}:{:02}:{:02}", secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

/// One job to render: what the template is given besides the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The job name (`rpx-<profile>[-cid]-<first>`).
    pub name: String,
    /// Start index of its first engine.
    pub first: usize,
    /// Engines in this job.
    pub n: usize,
    /// The job's output file.
    pub output: PathBuf,
    /// The ipengine command on the nodes (program and arguments).
    pub engine: Vec<String>,
}

/// The variables a job template sees. The default templates use them all; a user template must
/// use `engine_command`, and either `directives` or the variable of every option given.
#[derive(Debug, Serialize)]
pub struct TemplateVars {
    pub name: String,
    pub first_index: usize,
    /// Engines in this job.
    pub n: usize,
    pub nodes: Option<usize>,
    pub engines_per_node: Option<usize>,
    pub queue: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// The time limit in the scheduler's form.
    pub time: Option<String>,
    pub output: String,
    /// The scheduler's option lines for every option given (`#SBATCH --partition=debug`, ...),
    /// the `--directive` lines last.
    pub directives: String,
    /// The shell command that starts this job's engines (`srun ... ipengine --mpi --id-base
    /// 4`): the last line of the script.
    pub engine_command: String,
}

/// Variables that stand for an option: (variable, the option, given?).
fn option_vars(o: &JobOptions) -> [(&'static str, &'static str, bool); 6] {
    [
        ("queue", "--partition/--queue", o.queue.is_some()),
        ("account", "--account", o.account.is_some()),
        ("qos", "--qos", o.qos.is_some()),
        ("time", "--time", o.time.is_some()),
        ("nodes", "--nodes", o.nodes.is_some()),
        ("engines_per_node", "--engines-per-node", o.engines_per_node.is_some()),
    ]
}

/// Render `template` (minijinja syntax, e.g. `{{ engine_command }}`) with `vars`. Undefined
/// variables are errors, so a misspelled name is reported rather than rendered empty.
pub fn render(template_name: &str, template: &str, vars: &TemplateVars) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.add_template(template_name, template).map_err(|e| format!("job template {template_name}: {e:#}"))?;
    let t = env.get_template(template_name).map_err(|e| format!("job template {template_name}: {e:#}"))?;
    t.render(vars).map_err(|e| format!("job template {template_name}: {e:#}"))
}

/// Check a user template before anything is started: it parses, starts the engines
/// (`engine_command`), and honours every option given (through `directives` or the option's
/// own variable).
pub fn check_template(path: &Path, text: &str, opts: &JobOptions) -> Result<(), String> {
    let name = path.display().to_string();
    let mut env = minijinja::Environment::new();
    env.add_template(&name, text).map_err(|e| format!("--job-template {name}: {e:#}"))?;
    let t = env.get_template(&name).map_err(|e| format!("--job-template {name}: {e:#}"))?;
    let used: std::collections::HashSet<String> = t.undeclared_variables(false);
    if !used.contains("engine_command") {
        return Err(format!("--job-template {name} never uses {{{{ engine_command }}}}, so its jobs would start no engine: put it on the script's last line"));
    }
    if !used.contains("directives") {
        let unused: Vec<&str> =
            option_vars(opts).iter().filter(|(var, _, given)| *given && !used.contains(*var)).map(|(_, flag, _)| *flag).collect();
        if !unused.is_empty() || !opts.directives.is_empty() {
            let mut flags = unused;
            if !opts.directives.is_empty() {
                flags.push("--directive");
            }
            return Err(format!(
                "--job-template {name} uses neither {{{{ directives }}}} nor the variables of {}: those options would be ignored; add {{{{ directives }}}} to the template",
                flags.join(", ")
            ));
        }
    }
    Ok(())
}

/// Where a job is in its scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to start (`reason`: the scheduler's, e.g. `Resources`).
    Pending { reason: String },
    /// Running (`nodes`: where, when the scheduler says).
    Running { nodes: String },
    /// Ended, cancelled or failed: `state` is the scheduler's word (CANCELLED, FAILED,
    /// TIMEOUT, COMPLETED, `Eqw` for SGE's error state).
    Ended { state: String, reason: String },
    /// The scheduler no longer knows the job (it ended a while ago).
    Gone,
}

impl JobState {
    /// `running on n1,n2`, `pending (Resources)`, `CANCELLED (...)`.
    pub fn describe(&self) -> String {
        match self {
            JobState::Pending { reason } if reason.is_empty() || reason == "None" => "pending".into(),
            JobState::Pending { reason } => format!("pending ({reason})"),
            JobState::Running { nodes } if nodes.is_empty() => "running".into(),
            JobState::Running { nodes } => format!("running on {nodes}"),
            JobState::Ended { state, reason } if reason.is_empty() || reason == "None" => state.clone(),
            JobState::Ended { state, reason } => format!("{state} ({reason})"),
            JobState::Gone => "ended (no longer known to the scheduler)".into(),
        }
    }

    /// Pending or running: the job may still hold engines.
    pub fn is_live(&self) -> bool {
        matches!(self, JobState::Pending { .. } | JobState::Running { .. })
    }
}

/// One batch scheduler: its programs, job-script dialect and status parsing. The pure parts
/// ([`Scheduler::directives`], [`Scheduler::engine_command`], [`Scheduler::parse_job_id`],
/// [`Scheduler::parse_status`]) are unit-tested on text.
pub trait Scheduler {
    /// The `--engines` value.
    const KIND: &'static str;
    /// For messages: `Slurm`, `Grid Engine`, `PBS`.
    const NAME: &'static str;
    /// Submit, status and cancel programs.
    const SUBMIT: &'static str;
    const STATUS: &'static str;
    const CANCEL: &'static str;
    /// Where the client programs come from (`Debian: apt-get install slurm-client`).
    const PACKAGE: &'static str;
    /// The job template used without `--job-template`.
    const DEFAULT_TEMPLATE: &'static str;

    /// Options this scheduler cannot honour: a usage error naming them.
    fn check(opts: &JobOptions) -> Result<(), String>;
    /// The option lines for the options given (prefix included), `--directive` lines last.
    fn directives(opts: &JobOptions, job: &JobSpec) -> Vec<String>;
    /// The command that starts the job's engines, each with its start index from the
    /// scheduler's rank variable.
    fn engine_command(job: &JobSpec) -> String;
    /// Arguments of the submit program before the script path.
    fn submit_args() -> Vec<String>;
    /// The job id from the submit program's output.
    fn parse_job_id(stdout: &str) -> Option<String>;
    /// Arguments of the status program for these jobs.
    fn status_args(ids: &[String]) -> Vec<String>;
    /// The states of `ids` from the status program's output (ids it does not list: absent).
    fn parse_status(text: &str, ids: &[String]) -> BTreeMap<String, JobState>;
    /// More about jobs the status output lists as failed or in error, when the scheduler has a
    /// separate call for it (SGE: `qstat -j`). Default: nothing.
    fn details(_ids: &[String]) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn records(st: &ClusterState) -> &[BatchJob];
    fn records_mut(st: &mut ClusterState) -> &mut Vec<BatchJob>;
}

/// The directive lines of a scheduler from `(option, value)` pairs and the `--directive`s.
pub fn directive_lines(prefix: &str, pairs: Vec<String>, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = pairs.into_iter().map(|p| format!("{prefix} {p}")).collect();
    out.extend(extra.iter().map(|d| if d.starts_with('#') { d.clone() } else { format!("{prefix} {d}") }));
    out
}

/// The template variables of `job` under `opts` for scheduler `S`.
pub fn vars<S: Scheduler>(opts: &JobOptions, job: &JobSpec, time: Option<String>) -> TemplateVars {
    TemplateVars {
        name: job.name.clone(),
        first_index: job.first,
        n: job.n,
        nodes: opts.nodes,
        engines_per_node: opts.engines_per_node,
        queue: opts.queue.clone(),
        account: opts.account.clone(),
        qos: opts.qos.clone(),
        time,
        output: job.output.display().to_string(),
        directives: S::directives(opts, job).join("\n"),
        engine_command: S::engine_command(job),
    }
}

/// One job submitted by ipcluster, as the cluster file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchJob {
    /// The scheduler's job id.
    pub job_id: String,
    pub first_index: usize,
    /// Engines in this job.
    pub n: usize,
    /// The job's output file (written on the node that runs the job script).
    pub output: PathBuf,
    /// The submission's working directory (job.sh, job_id).
    pub dir: PathBuf,
    /// ISO-8601 UTC.
    pub submitted: String,
}

impl Record for BatchJob {
    fn leader(&self) -> Option<u32> {
        None
    }
    fn indices(&self) -> Range<usize> {
        self.first_index..self.first_index + self.n
    }
    fn log(&self) -> &Path {
        &self.output
    }
    fn label(&self) -> String {
        format!("job {}", self.job_id)
    }
}

/// A batch launcher over scheduler `S`.
#[derive(Debug, Clone)]
pub struct BatchLauncher<S> {
    pub opts: JobOptions,
    _s: PhantomData<S>,
}

impl<S: Scheduler> BatchLauncher<S> {
    /// A launcher with checked options (a usage error for options `S` cannot honour, or a user
    /// template that would ignore some).
    pub fn new(opts: JobOptions) -> Result<BatchLauncher<S>, Fail> {
        S::check(&opts).map_err(Fail::usage)?;
        if let Some((path, text)) = &opts.template {
            check_template(path, text, &opts).map_err(Fail::usage)?;
        }
        Ok(BatchLauncher { opts, _s: PhantomData })
    }

    /// The job script of `job`, rendered from the user's template or `S`'s default.
    pub fn script(&self, job: &JobSpec) -> Result<String, String> {
        let time = self.opts.time.map(|t| if S::KIND == "slurm" { dhms(t) } else { hms(t) });
        let v = vars::<S>(&self.opts, job, time);
        match &self.opts.template {
            Some((path, text)) => render(&path.display().to_string(), text, &v),
            None => render(&format!("{} default template", S::KIND), S::DEFAULT_TEMPLATE, &v),
        }
    }

    /// Engines per submission: `n` split into jobs of at most `--engines-per-job`.
    pub fn split(&self, first: usize, n: usize) -> Vec<Range<usize>> {
        let k = self.opts.engines_per_job.unwrap_or(n).max(1);
        (first..first + n).step_by(k).map(|s| s..(s + k).min(first + n)).collect()
    }

    /// Write the script and submit it; the record on success, the scheduler's error otherwise.
    fn submit(&self, ctx: &LaunchCtx, range: Range<usize>) -> anyhow::Result<BatchJob> {
        let profile = ctx.profile;
        let first = range.start;
        let cid = if profile.cluster_id.is_empty() { String::new() } else { format!("-{}", profile.cluster_id) };
        let dir = profile.dir.join("batch").join(format!("{}{cid}-{first}", S::KIND));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let output = state::log_path(profile, "ipengine", format!("{}-{first}", S::KIND));
        let _ = std::fs::remove_file(&output);
        let engine = self.opts.engine_cmd.clone().unwrap_or_else(|| vec![ctx.engine_bin.display().to_string()]);
        let cname = if profile.cluster_id.is_empty() { String::new() } else { format!("-{}", profile.cluster_id) };
        let job = JobSpec { name: format!("rpx-{}{cname}-{first}", profile.name), first, n: range.len(), output: output.clone(), engine };
        let text = self.script(&job).map_err(|e| Fail::new(1, e))?;
        let script = dir.join("job.sh");
        write_private(&script, &text)?;
        let mut cmd = Command::new(S::SUBMIT);
        cmd.args(S::submit_args())
            .arg(&script)
            .current_dir(&dir)
            .env(CONNECTION_INFO_ENV, ctx.connection()?)
            .env(INSTANCE_ENV, ctx.instance);
        let (status, out) =
            procs::output_bounded(&mut cmd, COMMAND_LIMIT).map_err(|e| Fail::new(1, format!("cannot run {}: {e}", S::SUBMIT)))?;
        let id = match status {
            Some(s) if s.success() => S::parse_job_id(&out),
            _ => None,
        };
        let Some(job_id) = id else {
            let how = status.map_or_else(|| format!("did not finish within {} s", COMMAND_LIMIT.as_secs()), |s| format!("failed ({s})"));
            return Err(Fail::new(
                1,
                format!(
                    "{} refused the job for engines {first}..{} ({} {how}):\n{}\njob script: {}",
                    S::NAME,
                    range.end,
                    S::SUBMIT,
                    out.trim_end(),
                    script.display()
                ),
            )
            .into());
        };
        let _ = write_private(&dir.join("job_id"), &format!("{job_id}\n"));
        Ok(BatchJob { job_id, first_index: first, n: range.len(), output, dir, submitted: rpx_protocol::message::now_iso() })
    }
}

/// Write a file only its owner may read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// The states of `records`' jobs in one scheduler call (`Gone` for jobs it no longer lists),
/// or the scheduler's error.
pub fn poll<S: Scheduler>(records: &[BatchJob]) -> Result<BTreeMap<String, JobState>, String> {
    let ids: Vec<String> = records.iter().map(|r| r.job_id.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (status, out) = procs::output_bounded(Command::new(S::STATUS).args(S::status_args(&ids)), COMMAND_LIMIT)
        .map_err(|e| format!("cannot run {}: {e}", S::STATUS))?;
    let mut states = S::parse_status(&out, &ids);
    // squeue -j with only unknown ids fails; qstat -j likewise: the jobs are then gone.
    if states.is_empty()
        && !status.is_some_and(|s| s.success())
        && !out.to_lowercase().contains("invalid job id")
        && !out.contains("do not exist")
        && !out.contains("Unknown Job Id")
    {
        return Err(format!("{} failed: {}", S::STATUS, out.trim()));
    }
    for id in &ids {
        states.entry(id.clone()).or_insert(JobState::Gone);
    }
    Ok(states)
}

/// Why a job (of the scheduler `kind`) is not running, with its output file's tail.
fn explain_job(kind: &str, rec: &BatchJob, state: &JobState, detail: Option<&String>) -> String {
    let mut s = format!("{kind} job {} (engines {}..{}) is {}", rec.job_id, rec.first_index, rec.first_index + rec.n, state.describe());
    if let Some(d) = detail.filter(|d| !d.is_empty()) {
        s.push_str(&format!(": {d}"));
    }
    s.push_str(&format!("\njob output file: {} (on the node that ran the job script)", rec.output.display()));
    if rec.output.exists() {
        s.push('\n');
        s.push_str(&procs::tail_block(&format!("job {} output", rec.job_id), &rec.output));
    }
    s
}

/// `Launcher` through a [`Scheduler`].
impl<S: Scheduler> Launcher for BatchLauncher<S> {
    type Record = BatchJob;
    const KIND: &'static str = S::KIND;
    const NEEDS_CONNECTION_INFO: bool = true;

    fn records(st: &ClusterState) -> &[BatchJob] {
        S::records(st)
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<BatchJob> {
        S::records_mut(st)
    }

    fn prepare(&mut self) -> anyhow::Result<()> {
        for p in [S::SUBMIT, S::STATUS, S::CANCEL] {
            if procs::find_program(p).is_none() {
                return Err(Fail::new(
                    1,
                    format!(
                        "--engines {} needs {p} on PATH ({}): run ipcluster where {} jobs can be submitted",
                        S::KIND,
                        S::PACKAGE,
                        S::NAME
                    ),
                )
                .into());
            }
        }
        Ok(())
    }

    fn start(&self, ctx: &LaunchCtx, first: usize, n: usize) -> anyhow::Result<Vec<Spawned<BatchJob>>> {
        let mut out: Vec<Spawned<BatchJob>> = Vec::new();
        for range in self.split(first, n) {
            match self.submit(ctx, range) {
                Ok(record) => out.push(Spawned { record, child: None }),
                Err(e) => {
                    let done: Vec<BatchJob> = out.into_iter().map(|s| s.record).collect();
                    Self::stop(&done, ctx.instance);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn failed(records: &[BatchJob]) -> Option<String> {
        let states = poll::<S>(records).ok()?;
        let bad: Vec<&BatchJob> = records.iter().filter(|r| states.get(&r.job_id).is_some_and(|s| !s.is_live())).collect();
        if bad.is_empty() {
            return None;
        }
        let details = S::details(&bad.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>());
        Some(bad.iter().map(|r| explain_job(S::KIND, r, &states[&r.job_id], details.get(&r.job_id))).collect::<Vec<_>>().join("\n"))
    }

    fn explain_timeout(records: &[BatchJob]) -> String {
        match poll::<S>(records) {
            Ok(states) => {
                let details = S::details(&records.iter().map(|r| r.job_id.clone()).collect::<Vec<_>>());
                records.iter().map(|r| format!("{}\n", explain_job(S::KIND, r, &states[&r.job_id], details.get(&r.job_id)))).collect()
            }
            Err(e) => format!("cannot ask {} about the jobs: {e}\n", S::NAME),
        }
    }

    fn status(records: &[BatchJob], _instance: &str, registered: Option<&BTreeSet<u64>>) -> Vec<LaunchStatus> {
        let states = poll::<S>(records);
        records
            .iter()
            .map(|r| {
                let (state, live) = match &states {
                    Ok(m) => (m[&r.job_id].describe(), m[&r.job_id].is_live()),
                    Err(e) => (format!("unknown ({e})"), false),
                };
                LaunchStatus {
                    launcher: S::KIND,
                    host: None,
                    first_index: r.first_index,
                    engines: r.n,
                    pids: Vec::new(),
                    alive: usize::from(live),
                    remote_pids: Vec::new(),
                    registered: registered.map(|ids| ids.iter().filter(|id| r.indices().contains(&(**id as usize))).count()),
                    logs: vec![r.output.clone()],
                    job: Some(r.job_id.clone()),
                    state: Some(state),
                }
            })
            .collect()
    }

    /// Cancel every job in one call, then wait (bounded) until none is pending or running.
    fn stop(records: &[BatchJob], _instance: &str) {
        let ids: Vec<String> = records.iter().map(|r| r.job_id.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = procs::output_bounded(Command::new(S::CANCEL).args(&ids), COMMAND_LIMIT) {
            eprintln!("ipcluster: cannot run {} {}: {e}", S::CANCEL, ids.join(" "));
            return;
        }
        let deadline = Instant::now() + CANCEL_WAIT;
        while Instant::now() < deadline {
            match poll::<S>(records) {
                Ok(m) if m.values().all(|s| !s.is_live()) => return,
                Err(_) => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        eprintln!(
            "ipcluster: warning: {} still lists jobs {} as pending or running {} s after {}",
            S::NAME,
            ids.join(" "),
            CANCEL_WAIT.as_secs(),
            S::CANCEL
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_parse_in_slurms_forms() {
        assert_eq!(parse_time("30"), Ok(1800));
        assert_eq!(parse_time("5:30"), Ok(330));
        assert_eq!(parse_time("01:02:03"), Ok(3723));
        assert_eq!(parse_time("2-01:00:00"), Ok(2 * 86_400 + 3600));
        for bad in ["", "x", "1:2:3:4", "-1", "0", "1-2", "1.5"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(hms(3723), "01:02:03");
        assert_eq!(hms(2 * 86_400), "48:00:00");
        assert_eq!(dhms(2 * 86_400 + 3723), "2-01:02:03");
    }

    #[test]
    fn templates_render_strictly() {
        let v = TemplateVars {
            name: "j".into(),
            first_index: 0,
            n: 2,
            nodes: None,
            engines_per_node: None,
            queue: None,
            account: None,
            qos: None,
            time: None,
            output: "/o".into(),
            directives: String::new(),
            engine_command: "run".into(),
        };
        assert_eq!(render("t", "#!/bin/sh\n{{ engine_command }} # {{ n }}\n", &v).unwrap(), "#!/bin/sh\nrun # 2\n");
        let e = render("t", "{{ engine_comand }}", &v).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
        assert!(render("t", "{% if %}", &v).is_err());
    }

    #[test]
    fn a_user_template_must_start_engines_and_honour_every_option() {
        let p = Path::new("/t.sh");
        let opts = JobOptions { queue: Some("q".into()), ..JobOptions::default() };
        let e = check_template(p, "#!/bin/sh\necho hi\n", &JobOptions::default()).unwrap_err();
        assert!(e.contains("engine_command"), "{e}");
        let e = check_template(p, "#!/bin/sh\n{{ engine_command }}\n", &opts).unwrap_err();
        assert!(e.contains("--partition/--queue") && e.contains("directives"), "{e}");
        check_template(p, "#!/bin/sh\n#SBATCH -p {{ queue }}\n{{ engine_command }}\n", &opts).unwrap();
        check_template(p, "#!/bin/sh\n{{ directives }}\n{{ engine_command }}\n", &opts).unwrap();
        let d = JobOptions { directives: vec!["--mem=1G".into()], ..JobOptions::default() };
        assert!(check_template(p, "#!/bin/sh\n{{ engine_command }}\n", &d).unwrap_err().contains("--directive"));
    }

    #[test]
    fn job_states_read_as_a_user_expects() {
        assert_eq!(JobState::Pending { reason: "Resources".into() }.describe(), "pending (Resources)");
        assert_eq!(JobState::Pending { reason: "None".into() }.describe(), "pending");
        assert_eq!(JobState::Running { nodes: "h1,h2".into() }.describe(), "running on h1,h2");
        assert_eq!(JobState::Ended { state: "CANCELLED".into(), reason: String::new() }.describe(), "CANCELLED");
        assert!(!JobState::Gone.is_live() && JobState::Running { nodes: String::new() }.is_live());
    }
}
