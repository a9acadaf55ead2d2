//! Engines started by `ipcluster start --engines mpi` under Debian's real Open MPI
//! (`mpiexec.openmpi`) and MPICH (`mpiexec.mpich`), on this host and, through Open MPI's ssh
//! launcher, on a namespace host (`rpx_tests::TestHosts`).
//!
//! What a user would check: engine ids equal the MPI ranks, a cell and a load-balanced map run
//! on every rank, and `ipcluster stop` ends every rank.

mod common;

use common::{serial, Steps, TestCluster};
use rpx_tests::{show, TestHosts};

/// `println!` of the rank as the launcher set it, read on each engine.
const RANK_CELL: &str = "let rank: String = [\"OMPI_COMM_WORLD_RANK\", \"PMI_RANK\"].iter().find_map(|v| std::env::var(v).ok()).unwrap(); println!(\"{rank}\");";

/// Start `-n 4 --engines mpi` with `mpiexec` and `extra` ipcluster arguments; check ids, ranks,
/// a cell, a load-balanced map; stop; check no rank is left. Returns the hostnames the
/// engines ran on.
fn four_ranks(steps: &mut Steps, mpiexec: &str, extra: &[&str]) -> Vec<String> {
    let mut cluster = TestCluster::empty();
    cluster.n = 4;
    let mut args = vec!["start", "-n", "4", "--daemonize", "--engines", "mpi", "--mpiexec", mpiexec, "--timeout", "120"];
    args.extend_from_slice(extra);
    let out = cluster.ipcluster(&args);
    assert!(out.status.success(), "ipcluster start --engines mpi --mpiexec {mpiexec} failed\n{}", show(&out));
    let c = common::client(&cluster);
    let mut hostnames = Vec::new();
    steps.run(&format!("{mpiexec}: engine ids are the ranks"), || {
        let mut ids = c.ids();
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        let r = c.direct_view(..).execute(RANK_CELL).unwrap();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        let ranks: Vec<String> = r.stdout().iter().map(|s| s.trim().to_string()).collect();
        let ids: Vec<String> = r.engine_ids().iter().map(|i| i.to_string()).collect();
        assert_eq!(ranks, ids);
    });
    steps.run(&format!("{mpiexec}: a load-balanced map runs on the ranks"), || {
        let got: Vec<(u64, String)> = c
            .view()
            .map(rpx::remote!(|x: u64| (x * 3, std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string())), 0..32u64)
            .unwrap();
        assert_eq!(got.iter().map(|(x, _)| *x).collect::<Vec<_>>(), (0..32u64).map(|x| x * 3).collect::<Vec<_>>());
        hostnames = got.into_iter().map(|(_, h)| h).collect();
    });
    steps.run(&format!("{mpiexec}: ipcluster list shows the mpi launcher"), || {
        let out = cluster.ipcluster(&["list"]);
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("mpi"), "{}", show(&out));
    });
    steps.run(&format!("{mpiexec}: ipcluster stop ends every rank"), || {
        let before = cluster.processes();
        assert!(before.iter().filter(|p| p.cmdline.contains("ipengine")).count() >= 4 || !extra.is_empty(), "{before:?}");
        let out = cluster.ipcluster(&["stop"]);
        assert!(out.status.success(), "{}", show(&out));
        assert!(cluster.processes().is_empty(), "left: {:?}", cluster.processes());
    });
    hostnames
}

#[test]
fn mpi_engines_under_open_mpi_and_mpich() {
    let _serial = serial();
    let mut steps = Steps::default();
    for mpiexec in ["mpiexec.openmpi", "mpiexec.mpich"] {
        let hosts = four_ranks(&mut steps, mpiexec, &[]);
        let here = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert!(hosts.iter().all(|h| h == here.trim()), "{hosts:?}");
    }
    steps.finish();
}

#[test]
fn mpi_ranks_on_another_host_through_mpiexecs_ssh_launcher() {
    let _serial = serial();
    let hosts = match TestHosts::create(&["m1"]) {
        Ok(h) => h,
        Err(e) if std::env::var("RPX_SKIP_HOST_TESTS").as_deref() == Ok("1") => return eprintln!("skipped: {e:#}"),
        Err(e) => panic!("{e:#}"),
    };
    let m1 = hosts.host("m1").ip.clone();
    let mpi_args = format!(
        "--host {m1}:4 --mca plm_rsh_agent {} --mca oob_tcp_if_include {} --mca btl_tcp_if_include {} --mca btl self,tcp",
        hosts.ssh_wrapper().display(),
        hosts.subnet(),
        hosts.subnet()
    );
    let mut steps = Steps::default();
    let names = four_ranks(&mut steps, "mpiexec.openmpi", &["--ip", hosts.gateway(), "--mpi-args", &mpi_args]);
    steps.run("every rank ran on the namespace host", || {
        assert!(!names.is_empty() && names.iter().all(|h| h == "m1"), "{names:?}");
        let left = hosts.processes("m1");
        assert!(left.iter().all(|(_, cmd)| cmd.contains("sshd")), "m1 still runs {left:?}");
    });
    steps.finish();
}
