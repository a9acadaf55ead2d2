//! `--engines sge`: Grid Engine. One array job (`-t 1-K`, one task per engine) per
//! `--engines-per-job` engines, submitted with `qsub -terse`; each task starts one engine with
//! the start index `FIRST + SGE_TASK_ID - 1` as its id. Status: one `qstat -u '*'` for all jobs
//! (`qstat -j IDS` for error reasons); stop: `qdel IDS`.

use std::collections::BTreeMap;

use super::batch::{directive_lines, hms, BatchJob, JobOptions, JobSpec, JobState, Scheduler};
use crate::state::ClusterState;

/// The job script without `--job-template`.
pub const DEFAULT_TEMPLATE: &str = "#!/bin/sh
#$ -N {{ name }}
#$ -S /bin/sh
#$ -t 1-{{ n }}
#$ -o {{ output }}
#$ -j y
#$ -V
{{ directives }}
{{ engine_command }}
";

/// The Grid Engine scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Sge;

/// The states `qstat` prints; the letters combine (`qw`, `hqw`, `Eqw`, `dr`, `Rr`).
fn state_of(letters: &str, queue: &str) -> JobState {
    if letters.contains('E') {
        JobState::Ended { state: letters.to_string(), reason: "error state; qstat -j tells why".into() }
    } else if letters.contains('r')
        || letters.contains('t')
        || letters.contains('s')
        || letters.contains('S')
        || letters.contains('T')
        || letters.contains('d')
    {
        JobState::Running { nodes: queue.split_once('@').map_or(queue, |(_, h)| h).to_string() }
    } else {
        JobState::Pending { reason: letters.to_string() }
    }
}

impl Scheduler for Sge {
    const KIND: &'static str = "sge";
    const NAME: &'static str = "Grid Engine";
    const SUBMIT: &'static str = "qsub";
    const STATUS: &'static str = "qstat";
    const CANCEL: &'static str = "qdel";
    const PACKAGE: &'static str = "Debian: apt-get install gridengine-client";
    const DEFAULT_TEMPLATE: &'static str = DEFAULT_TEMPLATE;

    /// Array tasks are placed one by one: nodes, engines per node and QOS have no meaning here.
    fn check(o: &JobOptions) -> Result<(), String> {
        for (flag, given) in
            [("--qos", o.qos.is_some()), ("--nodes", o.nodes.is_some()), ("--engines-per-node", o.engines_per_node.is_some())]
        {
            if given {
                return Err(format!("{flag} has no Grid Engine equivalent (each engine is one task of an array job): use --directive with the resource request you mean (e.g. --directive \"-l h=node1\")"));
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
            p.push(format!("-l h_rt={}", hms(t)));
        }
        directive_lines("#$", p, &o.directives)
    }

    fn engine_command(job: &JobSpec) -> String {
        format!(
            "RPX_ENGINE_INDEX=$(( {} + SGE_TASK_ID - 1 )); export RPX_ENGINE_INDEX; exec {} --id \"$RPX_ENGINE_INDEX\"",
            job.first,
            shell_words::join(&job.engine)
        )
    }

    fn submit_args() -> Vec<String> {
        vec!["-terse".into()]
    }

    /// `123` or, for an array job, `123.1-4:1`.
    fn parse_job_id(stdout: &str) -> Option<String> {
        let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
        let id = line.split('.').next()?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
    }

    fn status_args(_ids: &[String]) -> Vec<String> {
        vec!["-u".into(), "*".into()]
    }

    /// `qstat` rows: `id prior name user state date time [queue] slots [tasks]`; an array job
    /// has a row per running task and one for its pending tasks. Running wins over pending;
    /// an error state wins over both.
    fn parse_status(text: &str, ids: &[String]) -> BTreeMap<String, JobState> {
        let mut out: BTreeMap<String, JobState> = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 7 || !ids.iter().any(|i| i == f[0]) {
                continue;
            }
            let queue = if f.len() >= 9 && f[7].contains('@') { f[7] } else { "" };
            let s = state_of(f[4], queue);
            let rank = |s: &JobState| match s {
                JobState::Ended { .. } => 3,
                JobState::Running { .. } => 2,
                _ => 1,
            };
            match out.get_mut(f[0]) {
                Some(JobState::Running { nodes }) if matches!(&s, JobState::Running { .. }) => {
                    if let JobState::Running { nodes: n } = &s {
                        if !n.is_empty() && !nodes.split(',').any(|x| x == n) {
                            nodes.push(',');
                            nodes.push_str(n);
                        }
                    }
                }
                Some(cur) if rank(cur) >= rank(&s) => {}
                _ => {
                    out.insert(f[0].to_string(), s);
                }
            }
        }
        out
    }

    /// `error reason` lines of `qstat -j IDS`, per job.
    fn details(ids: &[String]) -> BTreeMap<String, String> {
        let Ok((_, text)) = crate::procs::output_bounded(
            std::process::Command::new("qstat").args(["-j", &ids.join(",")]),
            std::time::Duration::from_secs(15),
        ) else {
            return BTreeMap::new();
        };
        parse_details(&text)
    }

    fn records(st: &ClusterState) -> &[BatchJob] {
        &st.sge
    }
    fn records_mut(st: &mut ClusterState) -> &mut Vec<BatchJob> {
        &mut st.sge
    }
}

/// From `qstat -j` output: per `job_number`, its `error reason` lines (and scheduling info).
pub fn parse_details(text: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut job = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("job_number:") {
            job = n.trim().to_string();
        } else if line.starts_with("error reason") || line.starts_with("scheduling info:") {
            let v = line.split_once(':').map_or(line, |(_, v)| v).trim();
            if !job.is_empty() && !v.is_empty() && !v.starts_with("(Collecting") {
                let e = out.entry(job.clone()).or_default();
                if !e.is_empty() {
                    e.push_str("; ");
                }
                e.push_str(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::batch::BatchLauncher;

    fn job() -> JobSpec {
        JobSpec {
            name: "rpx-default-2".into(),
            first: 2,
            n: 4,
            output: "/p/log/ipengine-sge-2.log".into(),
            engine: vec!["/opt/ipengine".into()],
        }
    }

    #[test]
    fn default_script_is_an_array_job_of_one_engine_per_task() {
        let s = BatchLauncher::<Sge>::new(JobOptions::default()).unwrap().script(&job()).unwrap();
        assert_eq!(
            s,
            "#!/bin/sh\n#$ -N rpx-default-2\n#$ -S /bin/sh\n#$ -t 1-4\n#$ -o /p/log/ipengine-sge-2.log\n#$ -j y\n#$ -V\n\n\
             RPX_ENGINE_INDEX=$(( 2 + SGE_TASK_ID - 1 )); export RPX_ENGINE_INDEX; exec /opt/ipengine --id \"$RPX_ENGINE_INDEX\"\n"
        );
    }

    #[test]
    fn options_become_directives_and_foreign_ones_are_refused() {
        let o = JobOptions {
            queue: Some("all.q".into()),
            account: Some("p".into()),
            time: Some(3600),
            directives: vec!["-l mem=1G".into()],
            ..JobOptions::default()
        };
        let s = BatchLauncher::<Sge>::new(o).unwrap().script(&job()).unwrap();
        assert!(s.contains("#$ -V\n#$ -q all.q\n#$ -A p\n#$ -l h_rt=01:00:00\n#$ -l mem=1G\nRPX_ENGINE_INDEX"), "{s}");
        for o in [
            JobOptions { qos: Some("x".into()), ..JobOptions::default() },
            JobOptions { nodes: Some(2), ..JobOptions::default() },
            JobOptions { engines_per_node: Some(2), ..JobOptions::default() },
        ] {
            let e = BatchLauncher::<Sge>::new(o).unwrap_err();
            assert!(e.code == 2 && e.msg.contains("no Grid Engine equivalent"), "{}", e.msg);
        }
    }

    #[test]
    fn qstat_rows_and_ids_are_parsed() {
        assert_eq!(Sge::parse_job_id("17.1-4:1\n"), Some("17".into()));
        assert_eq!(Sge::parse_job_id("18\n"), Some("18".into()));
        assert_eq!(Sge::parse_job_id("Unable to run job: x\n"), None);
        let text = "job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID
-----------------------------------------------------------------------------------------------------------------
     17 0.55500 rpx-defaul root         r     12/04/2026 13:00:01 all.q@sge1                         1 1
     17 0.55500 rpx-defaul root         r     12/04/2026 13:00:01 all.q@sge2                         1 2
     17 0.00000 rpx-defaul root         qw    12/04/2026 13:00:00                                    1 3,4
     18 0.00000 rpx-defaul root         qw    12/04/2026 13:00:00                                    1 1-2:1
     19 0.00000 rpx-defaul root         Eqw   12/04/2026 13:00:00                                    1 1-2:1
     20 0.00000 other      root         r     12/04/2026 13:00:00 all.q@sge1                         1
";
        let ids: Vec<String> = ["17", "18", "19"].map(String::from).to_vec();
        let m = Sge::parse_status(text, &ids);
        assert_eq!(m["17"], JobState::Running { nodes: "sge1,sge2".into() });
        assert_eq!(m["18"].describe(), "pending (qw)");
        assert!(!m["19"].is_live() && m["19"].describe().starts_with("Eqw"));
        assert!(!m.contains_key("20"));
        let d = parse_details("==============\njob_number:                 19\nerror reason    1:          12/04/2026 can't chdir to /nope: No such file\nscheduling info:            (Collecting of scheduler job information is turned off)\n");
        assert_eq!(d["19"], "12/04/2026 can't chdir to /nope: No such file");
    }
}
