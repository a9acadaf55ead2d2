//! `ipcluster --engines sge` against a real Grid Engine on this machine: a private cell with
//! its own qmaster and one execution host (this host: see `rpx_tests::sge` for why one),
//! started and ended by the test ([`rpx_tests::TestSge`]). The engines run as the tasks of an
//! array job and reach the controller and the compiler through `RPX_CONNECTION_INFO` exported
//! to the job (`-V`).
//!
//! What a user would check: `ipcluster start -n 4 --engines sge` runs cells on four engines,
//! ids from `SGE_TASK_ID`; `ipcluster list` shows the job; `ipcluster engines` adds jobs, and
//! one deleted from outside (`qdel`) is reported by `list`; `ipcluster stop` deletes every job
//! (qstat empty, no engine left); an unknown queue gives Grid Engine's error.

use std::process::Output;
use std::time::{Duration, Instant};

use rpx_tests::{show, TestCluster, TestSge};

fn ipcluster(cluster: &TestCluster, sge: &TestSge, args: &[&str]) -> Output {
    let mut cmd = cluster.command(args);
    cmd.envs(sge.env());
    rpx_tests::run(&mut cmd, Duration::from_secs(180))
}

#[test]
fn sge_start_cells_stop() {
    let sge = match TestSge::start(8) {
        Ok(s) => s,
        Err(e) if std::env::var("RPX_SKIP_HOST_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipped (RPX_SKIP_HOST_TESTS=1): {e:#}");
            return;
        }
        Err(e) => panic!("{e:#}"),
    };
    let cluster = TestCluster::empty_in(std::path::Path::new("/var/tmp"));
    let t = Instant::now();
    let out = ipcluster(
        &cluster,
        &sge,
        &["start", "-n", "4", "--daemonize", "--engines", "sge", "--queue", rpx_tests::sge::QUEUE, "--timeout", "120"],
    );
    assert!(out.status.success(), "ipcluster start --engines sge failed\n{}\n{}", show(&out), sge.logs());
    eprintln!("started 4 engines through Grid Engine in {:.1?}", t.elapsed());
    let st = cluster.cluster_state().expect("cluster file");
    let job = st["sge"][0]["job_id"].as_str().expect("a job id").to_string();

    let out = ipcluster(&cluster, &sge, &["list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("sge job {job}: 4 engines (ids 0..4), running on localhost")) && text.contains("4 registered"),
        "{}",
        show(&out)
    );

    let c = rpx::Client::from_file(cluster.client_file()).expect("connect");
    c.wait_for_engines(4, Duration::from_secs(60)).expect("4 engines");
    let dv = c.direct_view(..);
    let r = dv.execute("let task: u64 = std::env::var(\"SGE_TASK_ID\").unwrap().parse().unwrap(); println!(\"{task}\");").unwrap();
    assert!(r.errors().is_empty(), "{:?}", r.errors());
    for (id, line) in r.engine_ids().into_iter().zip(r.stdout()) {
        assert_eq!(line.trim(), (id + 1).to_string(), "engine {id} is array task {}", id + 1);
    }
    let r = dv.execute("println!(\"{}\", task * 10);").unwrap();
    assert!(r.errors().is_empty(), "state kept: {:?}", r.errors());
    let sq: Vec<u64> = c.view().map(rpx::remote!(|x: u64| x * x), 0..20u64).unwrap();
    assert_eq!(sq, (0..20u64).map(|x| x * x).collect::<Vec<_>>());

    // Two more engines as two more jobs; one of them deleted from outside is reported.
    let out = ipcluster(&cluster, &sge, &["engines", "-n", "2", "--engines", "sge", "--engines-per-job", "1", "--timeout", "120"]);
    assert!(out.status.success(), "{}", show(&out));
    c.wait_for_engines(6, Duration::from_secs(60)).expect("6 engines");
    let st = cluster.cluster_state().expect("cluster file");
    let jobs: Vec<String> = st["sge"].as_array().unwrap().iter().map(|j| j["job_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let o = sge.run("qdel", &[&jobs[2]]);
    assert!(o.status.success(), "{}", show(&o));
    let end = Instant::now() + Duration::from_secs(30);
    while sge.jobs().lines().any(|l| l.split_whitespace().next() == Some(jobs[2].as_str())) {
        assert!(Instant::now() < end, "qstat still lists job {}: {}", jobs[2], sge.jobs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8_lossy(&ipcluster(&cluster, &sge, &["list"]).stdout).into_owned();
    assert!(text.contains(&format!("sge job {}: 1 engine (ids 5..6), ended (no longer known to the scheduler)", jobs[2])), "{text}");
    assert!(text.contains(&format!("sge job {}: 1 engine (ids 4..5), running on localhost", jobs[1])), "{text}");
    drop(c);

    let out = ipcluster(&cluster, &sge, &["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(sge.jobs(), "", "qstat after stop");
    assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());

    let out = ipcluster(&cluster, &sge, &["start", "-n", "1", "--daemonize", "--engines", "sge", "--queue", "nope.q", "--timeout", "60"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Grid Engine refused the job") && err.contains("unknown queue \"nope.q\""), "{err}");
    assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
}
