//! Engines on other hosts, started by `ipcluster start --engines ssh`: two "hosts" are network +
//! mount + pid + uts namespaces with their own hostname, private `/tmp`, `/dev/shm` and
//! `~/.cache`, no Rust toolchain, and a real sshd, on a bridge with no uplink
//! (`rpx_tests::TestHosts`). The controller and the compiler stay on this host, bound to the
//! bridge's address.
//!
//! What a user would check: cells and `remote!` closures run on the engines of both hosts and
//! keep per-engine state; pushed, pulled, scattered and gathered values arrive whole, the large
//! ones straight over the engines' data links (the controller refuses anything above 4 MiB
//! here), the small ones and all of them with the data plane off as message buffers through the
//! controller; every compiled artifact (and libstd) crosses to each host once; an
//! artifact tampered with on its way is refused and nothing runs; the compiler's files and pid
//! do not exist on those hosts; `ipcluster stop` leaves nothing behind on any host; a host whose
//! sshd is down, refused authentication and engines that cannot register give clear errors.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{serial, Steps, TestCluster};
use rpx_tests::{show, TestHosts};

/// Create the hosts, or explain why not (a test that cannot create them fails, unless
/// `RPX_SKIP_HOST_TESTS=1` says this machine cannot run them).
fn hosts(names: &[&str]) -> Option<TestHosts> {
    match TestHosts::create(names) {
        Ok(h) => Some(h),
        Err(e) if std::env::var("RPX_SKIP_HOST_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipped (RPX_SKIP_HOST_TESTS=1): {e:#}");
            None
        }
        Err(e) => panic!("{e:#}"),
    }
}

/// `(sha256, host, times, path)` of every "artifact served" line of the compiler's log.
fn served(log: &str) -> Vec<(String, String, u32, String)> {
    let field = |line: &str, key: &str| -> String {
        let start = line.find(&format!(" {key}=")).map(|i| i + key.len() + 2).unwrap_or(line.len());
        line[start..].split_whitespace().next().unwrap_or("").to_string()
    };
    log.lines()
        .filter(|l| l.contains("artifact served"))
        .map(|l| (field(l, "sha256"), field(l, "host"), field(l, "times").parse().unwrap_or(0), field(l, "path")))
        .collect()
}

#[test]
fn ssh_engines_on_two_hosts() {
    let _serial = serial();
    let Some(hosts) = hosts(&["h1", "h2"]) else { return };
    let (h1, h2) = (hosts.host("h1").ip.clone(), hosts.host("h2").ip.clone());
    let mut cluster = TestCluster::empty();
    cluster.n = 4;
    let ssh_args = format!("-F {}", hosts.ssh_config().display());
    let hosts_arg = format!("{h1}:2,{h2}:2");
    // The controller refuses messages above 4 MiB: the 8 MiB values below can only have taken
    // the engines' data links.
    let mut start = cluster.command(&[
        "start",
        "--daemonize",
        "--ip",
        hosts.gateway(),
        "--engines",
        "ssh",
        "--hosts",
        &hosts_arg,
        "--ssh-args",
        &ssh_args,
        "--timeout",
        "120",
    ]);
    let out = rpx_tests::run(start.env("RPX_MAX_MESSAGE_SIZE", "4M"), Duration::from_secs(180));
    assert!(out.status.success(), "ipcluster start --engines ssh failed\n{}", show(&out));
    let c = common::client(&cluster);
    let dv = c.direct_view(..);
    let state = cluster.cluster_state().expect("cluster file");
    let compiler_pid = state["compiler_pid"].as_u64().expect("compiler pid");
    let compiler_log = state["compiler_log"].as_str().expect("compiler log").to_string();
    let mut steps = Steps::default();

    steps.run("ipcluster list shows the ssh launcher's engines on both hosts", || {
        let out = cluster.ipcluster(&["list"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(&h1) && text.contains(&h2), "{}", show(&out));
    });

    // Engine id -> host name, from a cell (compiled once, shipped to both hosts).
    let mut where_: BTreeMap<usize, String> = BTreeMap::new();
    steps.run("a cell runs on the engines of both hosts", || {
        let r = dv
            .execute("let host = std::fs::read_to_string(\"/proc/sys/kernel/hostname\").unwrap(); println!(\"{}\", host.trim());")
            .unwrap();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        where_ = r.engine_ids().into_iter().zip(r.stdout().into_iter().map(|s| s.trim().to_string())).collect();
        let per_host = where_.values().fold(BTreeMap::<&str, usize>::new(), |mut m, h| {
            *m.entry(h.as_str()).or_default() += 1;
            m
        });
        assert_eq!(per_host, BTreeMap::from([("h1", 2), ("h2", 2)]), "{where_:?}");
    });

    steps.run("each engine keeps its own state across cells", || {
        let r = dv.execute("let mine: String = format!(\"{}-{}\", std::env::var(\"RPX_ENGINE_ID\").unwrap(), host.trim());").unwrap();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        let r = dv.execute("println!(\"{mine}\");").unwrap();
        let got: Vec<String> = r.stdout().iter().map(|s| s.trim().to_string()).collect();
        let want: Vec<String> = r.engine_ids().iter().map(|id| format!("{id}-{}", where_[id])).collect();
        assert_eq!(got, want);
    });

    steps.run("remote! closures run on both hosts, direct and load-balanced", || {
        let hostnames: Vec<String> =
            dv.apply(rpx::remote!(|| std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()), ()).unwrap();
        assert_eq!(hostnames.iter().collect::<BTreeSet<_>>(), BTreeSet::from([&"h1".to_string(), &"h2".to_string()]));
        let sq: Vec<u64> = c.view().map(rpx::remote!(|x: u64| x * x), 0..40u64).unwrap();
        assert_eq!(sq, (0..40u64).map(|x| x * x).collect::<Vec<_>>());
    });

    steps.run("values reach engines on other hosts whole: large ones over the engines' data links", || {
        assert!(c.shared_memory_namespaces().is_empty(), "no engine's namespace is on this host: {:?}", c.shared_memory_namespaces());
        let links = c.data_links();
        assert_eq!(links.keys().copied().collect::<Vec<_>>(), c.ids(), "every engine has a reachable data link");
        for (id, addr) in &links {
            assert_eq!(
                addr.ip().to_string(),
                if where_[id] == "h1" { h1.clone() } else { h2.clone() },
                "engine {id}'s link is on its host"
            );
        }
        // Small values go as buffers through the controller.
        let nested: BTreeMap<String, Vec<Option<u32>>> = BTreeMap::from([("a".to_string(), vec![Some(1), None]), (String::new(), vec![])]);
        dv.push("nested", &nested).unwrap();
        assert_eq!(dv.pull::<BTreeMap<String, Vec<Option<u32>>>>("nested").unwrap(), vec![nested.clone(); 4]);
        // 8 MiB is twice what the controller accepts: these went over the links.
        let big: Vec<u8> = (0..8usize << 20).map(|i| (i % 249) as u8).collect();
        dv.push("big", &big).unwrap();
        let back: Vec<Vec<u8>> = dv.pull("big").unwrap();
        assert!(back.iter().all(|b| *b == big), "8 MiB came back whole from every engine");
        let views = dv.pull_view::<u8>("big").unwrap();
        assert!(views.len() == 4 && views.iter().all(|w| **w == big[..]), "pull_view: 8 MiB over every link");
        let sums: Vec<u64> = dv.apply(rpx::remote!(|| rpx::get::<Vec<u8>>("big").iter().map(|b| *b as u64).sum::<u64>()), ()).unwrap();
        assert_eq!(sums, vec![big.iter().map(|b| *b as u64).sum::<u64>(); 4], "closures read the streamed value");
        let r = dv.execute("let n = big.len(); println!(\"{n} {}\", big[12345]);").unwrap();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        assert!(r.stdout().iter().all(|s| s.trim() == format!("{} {}", 8usize << 20, 12345 % 249)), "{:?}", r.stdout());
        let xs: Vec<u64> = (0..(3usize << 20) as u64).collect();
        dv.scatter("xs", &xs).unwrap();
        assert_eq!(dv.gather::<u64>("xs").unwrap(), xs, "a 24 MiB scatter/gather keeps engine order across hosts");
        let fs: Vec<f64> = (0..3usize << 20).map(|i| i as f64 * 0.25).collect();
        dv.scatter("fs", &fs).unwrap();
        assert_eq!(dv.gather::<f64>("fs").unwrap(), fs, "a 24 MiB gather of f64, each part fetched into its place");
        let small: Vec<u64> = (0..101).collect();
        dv.scatter("small", &small).unwrap();
        assert_eq!(dv.gather::<u64>("small").unwrap(), small);
        dv.push("empty", &Vec::<u8>::new()).unwrap();
        assert_eq!(dv.pull::<Vec<u8>>("empty").unwrap(), vec![Vec::<u8>::new(); 4]);
    });

    steps.run("with the data plane off, values go through the controller as buffers", || {
        c.set_shared_memory(false);
        assert!(c.data_links().is_empty());
        let mid: Vec<u8> = (0..2usize << 20).map(|i| (i % 241) as u8).collect();
        dv.push("mid", &mid).unwrap();
        assert!(dv.pull::<Vec<u8>>("mid").unwrap().iter().all(|b| *b == mid));
        c.set_shared_memory(true);
        assert!(dv.pull::<Vec<u8>>("mid").unwrap().iter().all(|b| *b == mid), "and over the links again");
    });

    steps.run("every artifact crossed to each host once, libstd included", || {
        let log = std::fs::read_to_string(&compiler_log).unwrap();
        let s = served(&log);
        let per_host = |h: &str| s.iter().filter(|(_, host, _, _)| host == h).map(|(sha, ..)| sha.clone()).collect::<Vec<_>>();
        for h in ["h1", "h2"] {
            let shas = per_host(h);
            let distinct: BTreeSet<&String> = shas.iter().collect();
            assert_eq!(shas.len(), distinct.len(), "{h} fetched an artifact twice:\n{log}");
            // libstd, the three cells and the two closures so far.
            assert!(shas.len() >= 6, "{h}: {shas:?}");
            assert!(s.iter().any(|(_, host, _, path)| host == h && path.contains("libstd-")), "{h} got libstd");
        }
        assert!(s.iter().all(|(_, _, times, _)| *times == 1), "{s:?}");
        assert!(s.iter().all(|(_, host, ..)| host == "h1" || host == "h2"), "nothing crossed to this host: {s:?}");
    });

    steps.run("the compiler's files, pid and toolchain do not exist on the hosts", || {
        // The compiled cells and closures the hosts fetched live in the compiler's private work
        // directory here.
        let log = std::fs::read_to_string(&compiler_log).unwrap();
        let paths: Vec<String> = served(&log).into_iter().map(|(.., path)| path).filter(|p| !p.contains("libstd-")).collect();
        assert!(!paths.is_empty());
        for p in &paths {
            assert!(std::path::Path::new(p).is_file(), "{p} exists here");
        }
        let tmpdir = std::path::Path::new(&paths[0]).ancestors().find(|a| a.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rpx-compiler-"))).expect("artifacts live in the compiler's work directory").display().to_string();
        let sysroot = String::from_utf8(std::process::Command::new("rustc").args(["--print", "sysroot"]).output().unwrap().stdout).unwrap().trim().to_string();
        for h in ["h1", "h2"] {
            let o = hosts.exec(h, &["sh", "-c", &format!("test -e {tmpdir} && echo work; test -e {} && echo artifact; ls -A {sysroot}; cat /proc/{compiler_pid}/cmdline 2>/dev/null | tr '\\0' ' '", paths[0])], Duration::from_secs(10));
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(!text.contains("work") && !text.contains("artifact"), "{h} sees the compiler's work directory {tmpdir}");
            assert!(!text.contains("rpx-compiler"), "{h} sees the compiler's pid {compiler_pid}: {text}");
            assert!(text.trim().is_empty(), "{h} has a Rust toolchain or another trace: {text:?}");
        }
    });

    steps.run("an artifact tampered with on its way to a host is refused and does not run", || {
        let on = |h: &str| where_.iter().filter(|(_, host)| host.as_str() == h).map(|(id, _)| *id).collect::<Vec<_>>();
        // Compiled and fetched by h1 only.
        let r: Vec<u64> = c.direct_view(on("h1")).apply(rpx::remote!(|x: u64| x + 1000), (1,)).unwrap();
        assert_eq!(r, vec![1001, 1001]);
        let log = std::fs::read_to_string(&compiler_log).unwrap();
        let (sha, _, _, path) = served(&log).into_iter().rev().find(|(_, host, ..)| host == "h1").unwrap();
        // Change the compiled file on the compiler's host: the bytes no longer match the hash
        // the compiler announced in the signed message.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = c.direct_view(on("h2")).apply(rpx::remote!(|x: u64| x + 1000), (1,)).unwrap_err();
        let text = format!("{err}");
        assert!(text.contains("ArtifactError") && text.contains("refused"), "{text}");
        assert!(!text.contains("1001"));
        // h1 loaded it before the change: it still runs there; h2 cached nothing.
        let r: Vec<u64> = c.direct_view(on("h1")).apply(rpx::remote!(|x: u64| x + 1000), (2,)).unwrap();
        assert_eq!(r, vec![1002, 1002]);
        let cached =
            hosts.exec("h2", &["sh", "-c", &format!("ls ~/.cache/rpx/{sha}.so ~/.cache/rpx/runtime/{sha} 2>&1")], Duration::from_secs(10));
        assert!(!cached.status.success(), "nothing bad was cached on h2: {}", String::from_utf8_lossy(&cached.stdout));
    });

    steps.run("ipcluster stop leaves no process on any host", || {
        let out = cluster.ipcluster(&["stop"]);
        assert!(out.status.success(), "{}", show(&out));
        for h in ["h1", "h2"] {
            let left = hosts.processes(h);
            assert!(left.iter().all(|(_, cmd)| cmd.contains("sshd")), "{h} still runs {left:?}");
        }
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.run("refused authentication gives a clear error", || {
        let args = format!("{ssh_args} -o PubkeyAuthentication=no");
        let out = cluster.ipcluster(&[
            "start",
            "--daemonize",
            "--ip",
            hosts.gateway(),
            "--engines",
            "ssh",
            "--hosts",
            &format!("{h1}:1"),
            "--ssh-args",
            &args,
            "--timeout",
            "60",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&h1) && err.contains("Permission denied"), "{err}");
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });

    steps.run("engines that cannot reach the controller time out with their host's log tail", || {
        // The controller on loopback: the engines on h1 start but can never register.
        let out = cluster.ipcluster(&[
            "start",
            "--daemonize",
            "--engines",
            "ssh",
            "--hosts",
            &format!("{h1}:1"),
            "--ssh-args",
            &ssh_args,
            "--timeout",
            "5",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("within 5 s") && err.contains(&h1), "{err}");
        assert!(err.contains("ipengine") || err.contains("registration"), "the host's log tail is shown: {err}");
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
        let left = hosts.processes("h1");
        assert!(left.iter().all(|(_, cmd)| cmd.contains("sshd")), "h1 still runs {left:?}");
    });

    steps.run("a host whose sshd is down gives a clear error and leaves nothing running", || {
        hosts.stop_sshd("h2");
        let out = cluster.ipcluster(&[
            "start",
            "--daemonize",
            "--ip",
            hosts.gateway(),
            "--engines",
            "ssh",
            "--hosts",
            &format!("{h2}:1"),
            "--ssh-args",
            &ssh_args,
            "--timeout",
            "60",
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&h2) && err.contains("Connection refused"), "{err}");
        assert!(cluster.processes().is_empty(), "{:?}", cluster.processes());
    });
    steps.finish();
}
