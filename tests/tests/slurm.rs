//! `ipcluster --engines slurm` against a real Slurm on this machine: a private munged, slurmctld
//! in the root namespace and a slurmd on each of two namespace hosts `n1`, `n2` (each its own
//! hostname, network, pid namespace and `/tmp`, on a bridge with no uplink), started and ended
//! by the test ([`rpx_tests::TestSlurm`], [`rpx_tests::TestHosts`]). The controller and the
//! compiler run here, bound to the bridge address; the engines run as Slurm job steps on the
//! nodes and reach them through `RPX_CONNECTION_INFO` exported to the job.
//!
//! What a user would check: `ipcluster start -n 4 --engines slurm` runs cells and a
//! load-balanced map on engines of both nodes; `ipcluster list` shows the jobs; `ipcluster
//! engines` adds jobs; `ipcluster stop` cancels every job (squeue empty, no engine left); a
//! partition that does not exist gives Slurm's error; a job that never starts or fails gives
//! its state, reason and output file; a job cancelled from outside is reported by `list`;
//! engines whose controller died exit by themselves, so their job ends.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::{Duration, Instant};

use rpx_tests::{show, TestCluster, TestHosts, TestSlurm};

/// One test at a time here (each makes its own hosts and Slurm).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Hosts and Slurm, or `None` when `RPX_SKIP_HOST_TESTS=1` says this machine cannot run them.
fn setup() -> Option<(TestHosts, TestSlurm)> {
    let skip = std::env::var("RPX_SKIP_HOST_TESTS").as_deref() == Ok("1");
    let hosts = match TestHosts::create(&["n1", "n2"]) {
        Ok(h) => h,
        Err(e) if skip => {
            eprintln!("skipped (RPX_SKIP_HOST_TESTS=1): {e:#}");
            return None;
        }
        Err(e) => panic!("{e:#}"),
    };
    match TestSlurm::start(&hosts, 4) {
        Ok(s) => Some((hosts, s)),
        Err(e) => panic!("{e:#}"),
    }
}

/// `ipcluster ARGS` of `cluster`, using `slurm`'s configuration (3 min at most).
fn ipcluster(cluster: &TestCluster, slurm: &TestSlurm, args: &[&str]) -> Output {
    let mut cmd = cluster.command(args);
    cmd.envs(slurm.env());
    rpx_tests::run(&mut cmd, Duration::from_secs(180))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The job ids the cluster file records for the slurm launcher.
fn job_ids(cluster: &TestCluster) -> Vec<String> {
    let st = cluster.cluster_state().unwrap_or_default();
    st["slurm"].as_array().into_iter().flatten().filter_map(|j| j["job_id"].as_str().map(str::to_string)).collect()
}

/// Poll `f` every 100 ms until it gives `Some`, for at most `limit`.
fn wait_for<T>(limit: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    rpx_tests::poll(limit, Duration::from_millis(100), f)
}

/// Named steps: each runs even if an earlier one failed; the test fails at the end listing
/// every failed step.
#[derive(Default)]
struct Steps {
    failed: Vec<String>,
}

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce()) {
        eprintln!("--- step: {name}");
        let t = Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(()) => eprintln!("--- ok: {name} ({:.1?})", t.elapsed()),
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                eprintln!("--- FAILED: {name}: {msg}");
                self.failed.push(format!("{name}: {msg}"));
            }
        }
    }

    fn finish(self) {
        assert!(self.failed.is_empty(), "failed steps:\n{}", self.failed.join("\n"));
    }
}

#[test]
fn slurm_engines_on_two_nodes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some((hosts, slurm)) = setup() else { return };
    let cluster = TestCluster::empty_in(std::path::Path::new("/var/tmp"));
    let gw = hosts.gateway().to_string();
    let t = Instant::now();
    let out = ipcluster(
        &cluster,
        &slurm,
        &["start", "-n", "4", "--daemonize", "--ip", &gw, "--engines", "slurm", "--engines-per-node", "2", "--timeout", "120"],
    );
    assert!(out.status.success(), "ipcluster start --engines slurm failed\n{}\n{}", show(&out), slurm.logs());
    eprintln!("started 4 engines through Slurm in {:.1?}", t.elapsed());
    let first_job = job_ids(&cluster);
    assert_eq!(first_job.len(), 1, "one job: {first_job:?}");
    let c = rpx::Client::from_file(cluster.client_file()).expect("connect");
    c.wait_for_engines(4, Duration::from_secs(60)).expect("4 engines");
    let mut steps = Steps::default();

    steps.run("ipcluster list shows the job running on both nodes", || {
        let out = ipcluster(&cluster, &slurm, &["list"]);
        let text = stdout(&out);
        let line = text.lines().find(|l| l.contains(&format!("slurm job {}", first_job[0]))).unwrap_or_else(|| panic!("{}", show(&out)));
        assert!(line.contains("4 engines") && line.contains("running on n[1-2]") && line.contains("4 registered"), "{line}");
    });

    let mut where_: BTreeMap<usize, String> = BTreeMap::new();
    steps.run("the job script is private and holds no key (the key travels in the job's environment)", || {
        use std::os::unix::fs::PermissionsExt;
        let st = cluster.cluster_state().expect("cluster file");
        let script = std::path::Path::new(st["slurm"][0]["dir"].as_str().expect("job dir")).join("job.sh");
        let text = std::fs::read_to_string(&script).unwrap();
        let conn: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cluster.client_file()).unwrap()).unwrap();
        let key = conn["key"].as_str().expect("key").to_string();
        assert!(!key.is_empty() && !text.contains(&key), "{text}");
        assert!(text.contains("#SBATCH --ntasks=4") && text.contains("#SBATCH --ntasks-per-node=2") && text.contains("srun "), "{text}");
        assert_eq!(std::fs::metadata(&script).unwrap().permissions().mode() & 0o077, 0, "{} is private", script.display());
    });

    steps.run("cells run on two engines of each node, ids from SLURM_PROCID", || {
        let dv = c.direct_view(..);
        let r = dv.execute("let host = std::fs::read_to_string(\"/proc/sys/kernel/hostname\").unwrap(); println!(\"{} {}\", host.trim(), std::env::var(\"SLURM_PROCID\").unwrap());").unwrap();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        for (id, line) in r.engine_ids().into_iter().zip(r.stdout()) {
            let (h, rank) = line.trim().split_once(' ').expect("host rank");
            assert_eq!(rank, id.to_string(), "engine {id} has the rank as its id");
            where_.insert(id, h.to_string());
        }
        let per_host = where_.values().fold(BTreeMap::<&str, usize>::new(), |mut m, h| {
            *m.entry(h.as_str()).or_default() += 1;
            m
        });
        assert_eq!(per_host, BTreeMap::from([("n1", 2), ("n2", 2)]), "{where_:?}");
        let r = dv.execute("println!(\"{}\", host.trim());").unwrap();
        assert!(r.errors().is_empty(), "state kept across cells: {:?}", r.errors());
    });

    steps.run("a load-balanced map runs on engines of both nodes", || {
        let got: Vec<(u64, String)> = c
            .view()
            .map(rpx::remote!(|x: u64| (x * x, std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string())), 0..64u64)
            .unwrap();
        assert_eq!(got.iter().map(|(v, _)| *v).collect::<Vec<_>>(), (0..64u64).map(|x| x * x).collect::<Vec<_>>());
        let hosts_used: BTreeSet<&str> = got.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts_used, BTreeSet::from(["n1", "n2"]));
    });

    steps.run("ipcluster engines adds engines as more jobs (--engines-per-job 1)", || {
        let out = ipcluster(&cluster, &slurm, &["engines", "-n", "2", "--engines", "slurm", "--engines-per-job", "1", "--timeout", "120"]);
        assert!(out.status.success(), "{}", show(&out));
        let ids = job_ids(&cluster);
        assert_eq!(ids.len(), 3, "{ids:?}");
        c.wait_for_engines(6, Duration::from_secs(60)).expect("6 engines");
        let text = stdout(&ipcluster(&cluster, &slurm, &["list"]));
        for id in &ids {
            assert!(text.contains(&format!("slurm job {id}: ")), "{text}");
        }
        assert!(text.contains("1 engine (ids 4..5), running on n") && text.contains("1 engine (ids 5..6), running on n"), "{text}");
    });
    drop(c);

    steps.run("ipcluster stop cancels every job: squeue is empty and no engine is left", || {
        let out = ipcluster(&cluster, &slurm, &["stop"]);
        assert!(out.status.success(), "{}", show(&out));
        assert_eq!(slurm.live_jobs(), "", "squeue after stop");
        for h in ["n1", "n2"] {
            let left: Vec<_> = hosts.processes(h).into_iter().filter(|(_, cmd)| !cmd.contains("slurmd")).collect();
            assert!(left.is_empty(), "{h} still runs {left:?}");
        }
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.run("a partition that does not exist gives Slurm's error", || {
        let out = ipcluster(
            &cluster,
            &slurm,
            &["start", "-n", "1", "--daemonize", "--ip", &gw, "--engines", "slurm", "--partition", "nope", "--timeout", "60"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Slurm refused the job") && err.contains("invalid partition specified: nope"), "{err}");
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
        assert_eq!(slurm.live_jobs(), "");
    });

    steps.run("a job that never starts: its state and reason, then it is cancelled", || {
        let out = ipcluster(
            &cluster,
            &slurm,
            &["start", "-n", "1", "--daemonize", "--ip", &gw, "--engines", "slurm", "--directive", "--begin=now+1hour", "--timeout", "8"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("only 0 of 1 engines registered") && err.contains("is pending (BeginTime)") && err.contains("job output file: "),
            "{err}"
        );
        assert_eq!(slurm.live_jobs(), "", "the pending job was cancelled");
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.run("a job that fails: its state, reason and output", || {
        let out = ipcluster(
            &cluster,
            &slurm,
            &[
                "start",
                "-n",
                "2",
                "--daemonize",
                "--ip",
                &gw,
                "--engines",
                "slurm",
                "--engine-cmd",
                "/nonexistent/ipengine",
                "--timeout",
                "60",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is FAILED") && err.contains("job output file: ") && err.contains("/nonexistent/ipengine"), "{err}");
        assert_eq!(slurm.live_jobs(), "");
    });

    steps.run("a job cancelled from outside (scancel) is reported by ipcluster list", || {
        let out = ipcluster(&cluster, &slurm, &["start", "-n", "2", "--daemonize", "--ip", &gw, "--engines", "slurm", "--timeout", "120"]);
        assert!(out.status.success(), "{}", show(&out));
        let ids = job_ids(&cluster);
        let o = slurm.run("scancel", &[&ids[0]]);
        assert!(o.status.success(), "{}", show(&o));
        let cancelled = wait_for(Duration::from_secs(30), || {
            let o = slurm.run("squeue", &["-h", "-t", "all", "-j", &ids[0], "-o", "%T"]);
            (stdout(&o).trim() == "CANCELLED").then_some(())
        });
        assert!(cancelled.is_some(), "squeue never showed the job CANCELLED");
        let text = stdout(&ipcluster(&cluster, &slurm, &["list"]));
        assert!(text.contains(&format!("slurm job {}: 2 engines (ids 0..2), CANCELLED", ids[0])), "{text}");
        let out = ipcluster(&cluster, &slurm, &["stop"]);
        assert!(out.status.success(), "{}", show(&out));
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.run("engines whose controller is gone for good exit by themselves and their job ends", || {
        // No supervisor (it would cancel the job itself), and engines that give the controller
        // 3 s to come back (RPX_RECONNECT_TIMEOUT reaches them through the job's environment).
        let mut cmd =
            cluster.command(&["start", "-n", "2", "--daemonize", "--no-restart", "--ip", &gw, "--engines", "slurm", "--timeout", "120"]);
        cmd.envs(slurm.env()).env("RPX_RECONNECT_TIMEOUT", "3");
        let out = rpx_tests::run(&mut cmd, Duration::from_secs(180));
        assert!(out.status.success(), "{}", show(&out));
        let st = cluster.cluster_state().expect("cluster file");
        for pid in [st["controller_pid"].as_i64().unwrap(), st["compiler_pid"].as_i64().unwrap()] {
            // SAFETY: plain syscall on a pid of this test's cluster.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let t = Instant::now();
        let ended = wait_for(Duration::from_secs(60), || slurm.live_jobs().is_empty().then_some(()));
        assert!(ended.is_some(), "the job still runs: {}", slurm.live_jobs());
        eprintln!("the job ended {:.1?} after its controller was killed", t.elapsed());
        for h in ["n1", "n2"] {
            let left: Vec<_> = hosts.processes(h).into_iter().filter(|(_, cmd)| !cmd.contains("slurmd")).collect();
            assert!(left.is_empty(), "{h} still runs {left:?}");
        }
        let out = ipcluster(&cluster, &slurm, &["stop"]);
        assert!(out.status.success() || out.status.code() == Some(1), "{}", show(&out));
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.finish();
}
