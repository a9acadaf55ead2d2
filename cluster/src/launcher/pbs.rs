//! `--engines pbs`: PBS Pro / OpenPBS (and Torque, whose array index variable the script also
//! reads). One array job (`-J 1-K`, one subjob per engine; a plain job for one engine, as PBS
//! Pro wants at least two subjobs in an array) per `--engines-per-job` engines, submitted with
//! `qsub`; each subjob starts one engine with the start index `FIRST + PBS_ARRAY_INDEX - 1` as
//! its id. Status: `qstat -f IDS`; stop: `qdel IDS`.
//!
//! No PBS server is packaged for Debian, so this launcher is tested on its text only (the job
//! script, job ids, `qstat -f` output), never against a real server.

use std::collections::BTreeMap;

use super::batch::{directive_lines, hms, BatchJob, JobOptions, JobSpec, JobState, Scheduler};
use crate::state::ClusterState;

/// The job script without `--job-template`.
pub const DEFAULT_TEMPLATE: &str = "#!/bin/sh
#PBS -N {{ name }}
{% if n > 1 %}#PBS -J 1-{{ n }}
{% endif %}#PBS -o {{ output }}
#PBS -j oe
#PBS -V
{{ directives }}
{{ engine_command }}
";

/// The PBS scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Pbs;

impl Scheduler for Pbs {
    const KIND: &'static str = "pbs";
    const NAME: &'static str = "PBS";
    const SUBMIT: &'static str = "qsub";
    const STATUS: &'static str = "qstat";
    const CANCEL: &'static str = "qdel";
    const PACKAGE: &'static str = "from OpenPBS, PBS Pro or Torque; Debian packages none";
    const DEFAULT_TEMPLATE: &'static str = DEFAULT_TEMPLATE;

    fn check(o: &JobOptions) -> Result<(), String> {
        for (flag, given) in
            [("--qos", o.qos.is_some()), ("--nodes", o.nodes.is_some()), ("--engines-per-node", o.engines_per_node.is_some())]
        {
            if given {
                return Err(format!("{flag} has no PBS equivalent here (each engine is one subjob of an array job): use --directive with the resource request you mean (e.g. --directive \"-l select=1:ncpus=1\")"));
            }
        }
        Ok(())
    }

    fn directives(o: &JobOptions, _job: &JobSpec) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(q) = &o.queue {
            p.push(format!("-q {q}"));
        }
        if let Some(a) = &o.account {
            p.push(format!("-A {a}"));
        }
        if let Some(t) = o.time {
            p.push(format!("-l walltime={}", hms(t)));
        }
        directive_lines("#PBS", p, &o.directives)
    }

    fn engine_command(job: &JobSpec) -> String {
        format!(
            "RPX_ENGINE_INDEX=$(( {} + ${{PBS_ARRAY_INDEX:-${{PBS_ARRAYID:-1}}}} - 1 )); export RPX_ENGINE_INDEX; exec {} --id \"$RPX_ENGINE_INDEX\"",
            job.first,
            shell_words::join(&job.engine)
        )
    }

    fn submit_args() -> Vec<String> {
        Vec::new()
    }

    /// `123.server` or `123[].server`: kept whole (qstat and qdel take it as it is).
    fn parse_job_id(stdout: &str) -> Option<String> {
        let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
        (line.bytes().next().is_some_and(|b| b.is_ascii_digit()) && !line.contains(char::is_whitespace)).then(|| line.to_string())
    }

    fn status_args(ids: &[String]) -> Vec<String> {
        let mut a = vec!["-f".to_string()];
        a.extend(ids.iter().cloned());
        a
    }

    /// `qstat -f` blocks: `Job Id: ID`, then `    job_state = R`, `exec_host = ...`,
    /// `comment = ...`.
    fn parse_status(text: &str, ids: &[String]) -> BTreeMap<String, JobState> {
        let mut out = BTreeMap::new();
        let mut cur: Option<(String, String, String, String)> = None;
        let flush = |c: Option<(String, String, String, String)>, out: &mut BTreeMap<String, JobState>| {
            if let Some((id, state, host, comment)) = c {
                if ids.contains(&id) {
                    let s = match state.as_str() {
                        "Q" | "H" | "W" | "T" | "M" => JobState::Pending { reason: comment },
                        "R" | "B" | "E" | "S" | "U" | "X" => JobState::Running { nodes: host },
                        other => JobState::Ended { state: other.to_string(), reason: comment },
                    };
                    out.insert(id, s);
                }
            }
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("Job Id:") {
                flush(cur.take(), &mut out);
                cur = Some((id.trim().to_string(), String::new(), String::new(), String::new()));
            } else if let (Some(c), Some((k, v))) = (cur.as_mut(), line.split_once(" = ")) {
                match k.trim() {
                    "job_state" => c.1 = v.trim().to_string(),
                    "exec_host" => c.2 = v.trim().to_string(),
                    "comment" => c.3 = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        flush(cur, &mut out);
        out
    }

    fn records(st: &ClusterState) -> &[BatchJob] {
        &st.pbs
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<BatchJob> {
        &mut st.pbs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::batch::BatchLauncher;

    fn job() -> JobSpec {
        JobSpec {
            name: "rpx-default-0".into(),
            first: 0,
            n: 8,
            output: "/p/log/ipengine-pbs-0.log".into(),
            engine: vec!["/opt/ipengine".into()],
        }
    }

    #[test]
    fn default_script_is_an_array_job_of_one_engine_per_subjob() {
        let o = JobOptions {
            queue: Some("workq".into()),
            account: Some("p1".into()),
            time: Some(5400),
            directives: vec!["-l select=1:ncpus=1".into()],
            ..JobOptions::default()
        };
        let s = BatchLauncher::<Pbs>::new(o).unwrap().script(&job()).unwrap();
        assert_eq!(
            s,
            "#!/bin/sh\n#PBS -N rpx-default-0\n#PBS -J 1-8\n#PBS -o /p/log/ipengine-pbs-0.log\n#PBS -j oe\n#PBS -V\n\
             #PBS -q workq\n#PBS -A p1\n#PBS -l walltime=01:30:00\n#PBS -l select=1:ncpus=1\n\
             RPX_ENGINE_INDEX=$(( 0 + ${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-1}} - 1 )); export RPX_ENGINE_INDEX; exec /opt/ipengine --id \"$RPX_ENGINE_INDEX\"\n"
        );
        assert!(BatchLauncher::<Pbs>::new(JobOptions { nodes: Some(2), ..JobOptions::default() }).is_err());
        let one = BatchLauncher::<Pbs>::new(JobOptions::default()).unwrap().script(&JobSpec { n: 1, ..job() }).unwrap();
        assert!(one.starts_with("#!/bin/sh\n#PBS -N rpx-default-0\n#PBS -o ") && !one.contains("-J"), "one engine, no array: {one}");
    }

    #[test]
    fn the_index_arithmetic_runs_in_a_posix_shell() {
        // The engine command with `echo` for the engine: subjob 3 of a job whose first index is 5.
        let j = JobSpec { first: 5, engine: vec!["echo".into()], ..job() };
        let out = std::process::Command::new("sh").args(["-c", &Pbs::engine_command(&j)]).env("PBS_ARRAY_INDEX", "3").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "--id 7\n");
    }

    #[test]
    fn ids_and_qstat_f_are_parsed() {
        assert_eq!(Pbs::parse_job_id("123[].pbs1\n"), Some("123[].pbs1".into()));
        assert_eq!(Pbs::parse_job_id("qsub: Unknown queue\n"), None);
        let text = "Job Id: 123[].pbs1\n    Job_Name = rpx-default-0\n    job_state = B\n    exec_host = n1/0+n2/0\n\nJob Id: 124.pbs1\n    job_state = Q\n    comment = Not Running: Insufficient amount of resource: ncpus\n\nJob Id: 125.pbs1\n    job_state = F\n    comment = Job run at ... and finished\n";
        let ids: Vec<String> = ["123[].pbs1", "124.pbs1", "125.pbs1"].map(String::from).to_vec();
        let m = Pbs::parse_status(text, &ids);
        assert_eq!(m["123[].pbs1"], JobState::Running { nodes: "n1/0+n2/0".into() });
        assert_eq!(m["124.pbs1"].describe(), "pending (Not Running: Insufficient amount of resource: ncpus)");
        assert!(!m["125.pbs1"].is_live());
    }
}
