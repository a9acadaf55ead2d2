//! `--engines slurm`: one `sbatch --parsable` per `--engines-per-job` engines. The job script
//! ([`DEFAULT_TEMPLATE`], or `--job-template FILE`) asks for one task per engine and runs
//! `srun ipengine --mpi --id-base FIRST`, so each engine takes its id from `SLURM_PROCID`.
//! Status: `squeue -h -t all -j IDS -o '%i|%T|%r|%N'` for all jobs at once; stop: `scancel
//! IDS`.

use std::collections::BTreeMap;

use super::batch::{dhms, directive_lines, BatchJob, JobOptions, JobSpec, JobState, Scheduler};
use crate::state::ClusterState;

/// The job script without `--job-template`.
pub const DEFAULT_TEMPLATE: &str = "#!/bin/sh
#SBATCH --job-name={{ name }}
#SBATCH --ntasks={{ n }}
#SBATCH --output={{ output }}
#SBATCH --export=ALL
{{ directives }}
{{ engine_command }}
";

/// The Slurm scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Slurm;

impl Scheduler for Slurm {
    const KIND: &'static str = "slurm";
    const NAME: &'static str = "Slurm";
    const SUBMIT: &'static str = "sbatch";
    const STATUS: &'static str = "squeue";
    const CANCEL: &'static str = "scancel";
    const PACKAGE: &'static str = "Debian: apt-get install slurm-client";
    const DEFAULT_TEMPLATE: &'static str = DEFAULT_TEMPLATE;

    fn check(_opts: &JobOptions) -> Result<(), String> {
        Ok(())
    }

    fn directives(o: &JobOptions, _job: &JobSpec) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(q) = &o.queue {
            p.push(format!("--partition={q}"));
        }
        if let Some(a) = &o.account {
            p.push(format!("--account={a}"));
        }
        if let Some(q) = &o.qos {
            p.push(format!("--qos={q}"));
        }
        if let Some(t) = o.time {
            p.push(format!("--time={}", dhms(t)));
        }
        if let Some(n) = o.nodes {
            p.push(format!("--nodes={n}"));
        }
        if let Some(e) = o.engines_per_node {
            p.push(format!("--ntasks-per-node={e}"));
        }
        directive_lines("#SBATCH", p, &o.directives)
    }

    fn engine_command(job: &JobSpec) -> String {
        format!("exec srun {} --mpi --id-base {}", shell_words::join(&job.engine), job.first)
    }

    fn submit_args() -> Vec<String> {
        vec!["--parsable".into()]
    }

    /// `123` or `123;cluster`.
    fn parse_job_id(stdout: &str) -> Option<String> {
        let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
        let id = line.split(';').next()?.trim();
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_')).then(|| id.to_string())
    }

    fn status_args(ids: &[String]) -> Vec<String> {
        vec!["-h".into(), "-t".into(), "all".into(), "-j".into(), ids.join(","), "-o".into(), "%i|%T|%r|%N".into()]
    }

    fn parse_status(text: &str, ids: &[String]) -> BTreeMap<String, JobState> {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.trim().splitn(4, '|').collect();
            let [id, state, reason, nodes] = f.as_slice() else { continue };
            if !ids.iter().any(|i| i == id) {
                continue;
            }
            let s = match *state {
                "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD" | "RESIZING" => {
                    JobState::Pending { reason: reason.to_string() }
                }
                "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "STAGE_OUT" => {
                    JobState::Running { nodes: nodes.to_string() }
                }
                other => JobState::Ended { state: other.to_string(), reason: reason.to_string() },
            };
            out.insert(id.to_string(), s);
        }
        out
    }

    fn records(st: &ClusterState) -> &[BatchJob] {
        &st.slurm
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<BatchJob> {
        &mut st.slurm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::batch::BatchLauncher;
    use std::path::PathBuf;

    fn job() -> JobSpec {
        JobSpec {
            name: "rpx-default-4".into(),
            first: 4,
            n: 3,
            output: "/p/log/ipengine-slurm-4.log".into(),
            engine: vec!["/opt/rpx bin/ipengine".into()],
        }
    }

    #[test]
    fn default_script_asks_one_task_per_engine_and_runs_them_with_srun() {
        let l = BatchLauncher::<Slurm>::new(JobOptions::default()).unwrap();
        assert_eq!(
            l.script(&job()).unwrap(),
            "#!/bin/sh\n#SBATCH --job-name=rpx-default-4\n#SBATCH --ntasks=3\n#SBATCH --output=/p/log/ipengine-slurm-4.log\n#SBATCH --export=ALL\n\n\
             exec srun '/opt/rpx bin/ipengine' --mpi --id-base 4\n"
        );
    }

    #[test]
    fn every_option_becomes_a_directive() {
        let o = JobOptions {
            queue: Some("debug".into()),
            account: Some("proj1".into()),
            qos: Some("high".into()),
            time: Some(90 * 60),
            nodes: Some(2),
            engines_per_node: Some(2),
            directives: vec!["--mem=1G".into(), "#SBATCH --exclusive".into()],
            ..JobOptions::default()
        };
        let l = BatchLauncher::<Slurm>::new(o).unwrap();
        let s = l.script(&job()).unwrap();
        assert!(
            s.contains(
                "#SBATCH --export=ALL\n#SBATCH --partition=debug\n#SBATCH --account=proj1\n#SBATCH --qos=high\n#SBATCH --time=0-01:30:00\n\
                 #SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --mem=1G\n#SBATCH --exclusive\nexec srun"
            ),
            "{s}"
        );
    }

    #[test]
    fn a_user_template_gets_the_same_variables() {
        let t = "#!/bin/bash\n#SBATCH -J {{ name }} -n {{ n }} -o {{ output }}\n#SBATCH -p {{ queue }}\nmodule load rust\n{{ engine_command }}\n";
        let o = JobOptions { queue: Some("gpu".into()), template: Some((PathBuf::from("/t.sh"), t.into())), ..JobOptions::default() };
        let s = BatchLauncher::<Slurm>::new(o).unwrap().script(&job()).unwrap();
        assert_eq!(s, "#!/bin/bash\n#SBATCH -J rpx-default-4 -n 3 -o /p/log/ipengine-slurm-4.log\n#SBATCH -p gpu\nmodule load rust\nexec srun '/opt/rpx bin/ipengine' --mpi --id-base 4\n");
        let bad = JobOptions { account: Some("a".into()), template: Some((PathBuf::from("/t.sh"), t.into())), ..JobOptions::default() };
        let e = BatchLauncher::<Slurm>::new(bad).unwrap_err();
        assert!(e.msg.contains("--account") && e.code == 2, "{}", e.msg);
    }

    #[test]
    fn engines_are_split_into_jobs() {
        let o = JobOptions { engines_per_job: Some(3), ..JobOptions::default() };
        let l = BatchLauncher::<Slurm>::new(o).unwrap();
        assert_eq!(l.split(2, 7), vec![2..5, 5..8, 8..9]);
        assert_eq!(BatchLauncher::<Slurm>::new(JobOptions::default()).unwrap().split(0, 4), vec![0..4]);
    }

    #[test]
    fn job_ids_and_states_are_parsed() {
        assert_eq!(Slurm::parse_job_id("42\n"), Some("42".into()));
        assert_eq!(Slurm::parse_job_id("42;cluster1\n"), Some("42".into()));
        assert_eq!(Slurm::parse_job_id("sbatch: error: x\n"), None);
        let ids = vec!["7".to_string(), "8".into(), "9".into(), "10".into()];
        let text = "7|RUNNING|None|h1,h2\n8|PENDING|Resources|\n9|CANCELLED|None|h1\n10|FAILED|NonZeroExitCode|h2\n11|RUNNING|None|x\n";
        let m = Slurm::parse_status(text, &ids);
        assert_eq!(m["7"], JobState::Running { nodes: "h1,h2".into() });
        assert_eq!(m["8"].describe(), "pending (Resources)");
        assert_eq!(m["9"].describe(), "CANCELLED");
        assert_eq!(m["10"].describe(), "FAILED (NonZeroExitCode)");
        assert!(!m.contains_key("11"));
        assert_eq!(Slurm::status_args(&ids[..2]).join(" "), "-h -t all -j 7,8 -o %i|%T|%r|%N");
    }
}
