//! The fake-host kit ([`rpx_tests::TestHosts`] and `rpx-testhosts`) as the multi-host tests use
//! it: each host answers ssh under its own name, has its own empty `/tmp` and no Rust toolchain,
//! runs only its init and sshd, reaches the other hosts and the head node's bridge address and
//! nothing else, becomes unreachable when its sshd stops, and leaves nothing behind (links,
//! processes, directory), also when a test panics.
//!
//! Needs root, `unshare`/`nsenter`, `ip` and OpenSSH: without them these tests FAIL, unless
//! `RPX_SKIP_HOST_TESTS=1` is set (then they say why and pass).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rpx_tests::{run, show, TestHosts};

const LIMIT: Duration = Duration::from_secs(20);

/// The hosts, or `None` when they cannot be created and `RPX_SKIP_HOST_TESTS=1` says to skip.
fn create_or_skip(names: &[&str]) -> Option<TestHosts> {
    match TestHosts::create(names) {
        Ok(h) => Some(h),
        Err(e) => {
            skip_or_fail(&format!("{e:#}"));
            None
        }
    }
}

fn skip_or_fail(why: &str) {
    if std::env::var("RPX_SKIP_HOST_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped (RPX_SKIP_HOST_TESTS=1): {why}");
    } else {
        panic!("{why}\n(set RPX_SKIP_HOST_TESTS=1 to skip the fake-host tests on a machine that cannot run them)");
    }
}

fn ssh(config: &Path, ip: &str, argv: &[&str]) -> Output {
    run(Command::new("ssh").arg("-F").arg(config).arg(ip).args(argv), LIMIT)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `ip -o link show` of the root namespace.
fn links() -> String {
    let o = run(Command::new("ip").args(["-o", "link", "show"]), LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Names of the links enslaved to `bridge`.
fn ports_of(bridge: &str) -> Vec<String> {
    let o = run(Command::new("ip").args(["-o", "link", "show", "master", bridge]), LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| n.trim_end_matches(':').split('@').next().unwrap().to_string())
        .collect()
}

fn pid_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// What must be gone once the hosts are dropped.
struct Footprint {
    bridge: String,
    veths: Vec<String>,
    inits: Vec<(u32, PathBuf)>,
    dir: PathBuf,
}

impl Footprint {
    fn of(hosts: &TestHosts) -> Footprint {
        let bridge = hosts.bridge().to_string();
        let veths = ports_of(&bridge);
        let inits = hosts.hosts().iter().map(|h| (h.pid, pid_ns(h.pid).expect("init is alive"))).collect();
        Footprint { bridge, veths, inits, dir: hosts.dir().to_path_buf() }
    }

    fn assert_gone(&self) {
        let links = links();
        for l in std::iter::once(&self.bridge).chain(&self.veths) {
            assert!(!links.contains(&format!(" {l}:")) && !links.contains(&format!(" {l}@")), "link {l} left behind:\n{links}");
        }
        for (pid, ns) in &self.inits {
            assert_ne!(pid_ns(*pid).as_ref(), Some(ns), "init {pid} is still alive");
            // No process at all is left in that pid namespace.
            let left: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .filter(|p| pid_ns(*p).as_ref() == Some(ns))
                .map(|p| p.to_string())
                .collect();
            assert!(left.is_empty(), "processes {left:?} left in the pid namespace of init {pid}");
        }
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
    }
}

fn rust_sysroot() -> Option<PathBuf> {
    let o = Command::new("rustc").args(["--print", "sysroot"]).output().ok()?;
    o.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// Wait until the host runs nothing but its init and sshd (ssh sessions just closed may take
/// a moment to end); returns what is left.
fn wait_quiet(hosts: &TestHosts, host: &str) -> Vec<(u32, String)> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let p = hosts.processes(host);
        if p.is_empty() || Instant::now() >= end {
            return p;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_hosts_are_separate_machines_until_dropped() {
    let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    let Some(hosts) = create_or_skip(&["h1", "h2"]) else { return };
    let cfg = hosts.ssh_config();
    let cfg_s = cfg.to_str().unwrap();
    let (h1, h2) = (hosts.host("h1").clone(), hosts.host("h2").clone());
    let gw = hosts.gateway().to_string();
    let prefix = gw.strip_suffix(".1").unwrap_or_else(|| panic!("gateway {gw} is .1")).to_string();
    assert!(gw.starts_with("10.213."), "{gw}");
    assert_eq!(hosts.subnet(), format!("{prefix}.0/24"));
    assert_eq!((h1.ip.as_str(), h2.ip.as_str()), (format!("{prefix}.2").as_str(), format!("{prefix}.3").as_str()));
    assert!(
        hosts.dir().starts_with("/var/tmp") && hosts.dir().file_name().unwrap().to_str().unwrap().starts_with("rpx-hosts-"),
        "{}",
        hosts.dir().display()
    );
    assert_eq!(std::fs::metadata(hosts.dir()).unwrap().permissions().mode() & 0o777, 0o700);
    let bridge = hosts.bridge().to_string();
    assert!(bridge.starts_with("rpxb") && bridge.len() == 10, "{bridge}");
    let veths = ports_of(&bridge);
    assert_eq!(veths.len(), 2, "two veths on {bridge}: {veths:?}");
    assert!(veths.iter().all(|v| v.starts_with("rpxv") && v.len() <= 15), "{veths:?}");
    let footprint = Footprint::of(&hosts);

    // Each host answers ssh under its own name, directly and through the wrapper script.
    for h in hosts.hosts() {
        let o = ssh(&cfg, &h.ip, &["hostname"]);
        assert!(o.status.success(), "ssh {}: {}", h.ip, show(&o));
        assert_eq!(stdout(&o), h.name);
        let o = run(Command::new(hosts.ssh_wrapper()).args([h.ip.as_str(), "hostname"]), LIMIT);
        assert!(o.status.success(), "{}", show(&o));
        assert_eq!(stdout(&o), h.name);
    }

    // Private /tmp and /dev/shm: empty inside, and the root namespace's files are not there.
    let marker = tempfile::Builder::new().prefix("rpx-hosts-marker-").tempfile_in("/tmp").unwrap();
    let marker = marker.path().to_str().unwrap().to_string();
    for h in ["h1", "h2"] {
        for d in ["/tmp", "/dev/shm"] {
            let o = hosts.exec(h, &["ls", "-A", d], LIMIT);
            assert!(o.status.success(), "{}", show(&o));
            assert_eq!(stdout(&o), "", "{d} of {h} is not empty");
        }
        let o = hosts.exec(h, &["test", "-e", &marker], LIMIT);
        assert_eq!(o.status.code(), Some(1), "{marker} is visible in {h}: {}", show(&o));
    }
    let o = hosts.exec("h1", &["sh", "-c", "echo h1 > /tmp/only-in-h1 && cat /tmp/only-in-h1"], LIMIT);
    assert_eq!(stdout(&o), "h1", "{}", show(&o));
    assert_eq!(hosts.exec("h2", &["test", "-e", "/tmp/only-in-h1"], LIMIT).status.code(), Some(1), "h1's /tmp is visible in h2");
    assert!(!Path::new("/tmp/only-in-h1").exists(), "h1's /tmp is the root namespace's");

    // A per-host ~/.cache: empty inside, and what one host writes there stays there.
    let cache = format!("{}/.cache", std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let probe = format!("{cache}/rpx-hosts-probe-{}", std::process::id());
    for h in ["h1", "h2"] {
        let o = hosts.exec(h, &["ls", "-A", &cache], LIMIT);
        assert!(o.status.success(), "{}", show(&o));
        assert_eq!(stdout(&o), "", "{cache} of {h} is not empty");
    }
    assert!(hosts.exec("h1", &["sh", "-c", &format!("echo x > {probe}")], LIMIT).status.success());
    assert_eq!(hosts.exec("h2", &["test", "-e", &probe], LIMIT).status.code(), Some(1), "h1's ~/.cache is visible in h2");
    assert!(!Path::new(&probe).exists(), "h1's ~/.cache is the root namespace's");

    // No Rust toolchain: the sysroot is an empty directory inside.
    match rust_sysroot() {
        Some(sysroot) => {
            assert!(std::fs::read_dir(&sysroot).unwrap().next().is_some(), "{} is empty outside", sysroot.display());
            for h in ["h1", "h2"] {
                let o = hosts.exec(h, &["ls", "-A", sysroot.to_str().unwrap()], LIMIT);
                assert!(o.status.success(), "{}", show(&o));
                assert_eq!(stdout(&o), "", "the Rust sysroot is visible in {h}");
            }
        }
        None => eprintln!("rustc is not installed: the sysroot check is skipped"),
    }

    // Each pid namespace holds only its init and sshd ...
    for h in ["h1", "h2"] {
        assert_eq!(wait_quiet(&hosts, h), vec![], "{h} runs more than its init and sshd");
    }
    // ... and a process started there shows up (with its pid in the namespace) until it is
    // killed, then the host's init reaps it.
    let o = hosts.exec("h1", &["sh", "-c", "sleep 300 >/dev/null 2>&1 &"], LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    let end = Instant::now() + Duration::from_secs(5);
    let sleeper = loop {
        if let Some(p) = hosts.processes("h1").into_iter().find(|(_, c)| c == "sleep 300") {
            break p.0;
        }
        assert!(Instant::now() < end, "sleep 300 not seen in h1: {:?}", hosts.processes("h1"));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(sleeper > 1, "pid {sleeper} is the namespace's pid");
    assert_eq!(hosts.processes("h2"), vec![], "h1's process seen in h2");
    let o = hosts.exec("h1", &["sh", "-c", &format!("kill -9 {sleeper}")], LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(wait_quiet(&hosts, "h1"), vec![]);
    let end = Instant::now() + Duration::from_secs(5);
    while hosts.exec("h1", &["test", "-e", &format!("/proc/{sleeper}")], LIMIT).status.success() {
        assert!(Instant::now() < end, "the killed orphan {sleeper} was not reaped by h1's init");
        std::thread::sleep(Duration::from_millis(20));
    }

    // h1 reaches h2 over ssh with the same configuration.
    let o = hosts.exec("h1", &["ssh", "-F", cfg_s, &h2.ip, "hostname"], LIMIT);
    assert!(o.status.success(), "ssh from h1 to h2: {}", show(&o));
    assert_eq!(stdout(&o), "h2");

    // The network: the subnet on eth0, no default route; the head node's bridge address is
    // reachable, the rest of the world is not.
    for h in ["h1", "h2"] {
        let o = hosts.exec(h, &["ip", "-o", "link", "show", "lo"], LIMIT);
        assert!(o.status.success() && stdout(&o).contains(",UP"), "lo is not up in {h}: {}", show(&o));
        let o = hosts.exec(h, &["ip", "route"], LIMIT);
        let routes = stdout(&o);
        assert!(o.status.success() && routes.contains(&format!("{prefix}.0/24 dev eth0")), "{h}: {}", show(&o));
        assert!(!routes.contains("default"), "{h} has a default route:\n{routes}");
    }
    let listener = TcpListener::bind((gw.as_str(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        (peer.ip().to_string(), text)
    });
    let o = hosts.exec("h1", &["bash", "-c", &format!("echo hello-from-h1 > /dev/tcp/{gw}/{port}")], LIMIT);
    assert!(o.status.success(), "h1 cannot reach the head node at {gw}:{port}: {}", show(&o));
    let (peer, text) = accepted.join().unwrap();
    assert_eq!((peer.as_str(), text.trim()), (h1.ip.as_str(), "hello-from-h1"));
    // No route leads anywhere else: asking the kernel sends nothing.
    let o = hosts.exec("h1", &["ip", "route", "get", "1.1.1.1"], LIMIT);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "h1 has a route to the outside: {}",
        show(&o)
    );
    assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default(), forward_before, "ip forwarding changed");

    // Without its sshd, a host refuses connections at once; the other one still answers.
    hosts.stop_sshd("h2");
    let o = ssh(&cfg, &h2.ip, &["true"]);
    assert!(!o.status.success(), "ssh to h2 after stop_sshd: {}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Connection refused"), "{}", show(&o));
    assert_eq!(wait_quiet(&hosts, "h2"), vec![], "h2 after stop_sshd");
    hosts.stop_sshd("h2"); // idempotent
    let o = ssh(&cfg, &h1.ip, &["hostname"]);
    assert_eq!(stdout(&o), "h1", "{}", show(&o));

    // Dropped: links, processes and the directory are gone.
    drop(hosts);
    footprint.assert_gone();
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let Some(hosts) = create_or_skip(&["p1"]) else { return };
    let footprint = Footprint::of(&hosts);
    assert_eq!(footprint.veths.len(), 1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _hosts = hosts;
        panic!("a test panics while its hosts exist");
    }));
    assert!(r.is_err());
    footprint.assert_gone();
}

#[test]
fn bad_names_are_refused() {
    for names in [&[][..], &["a b"][..], &["-x"][..], &["h1", "h1"][..]] {
        let e = TestHosts::create(names).err().unwrap_or_else(|| panic!("{names:?} accepted"));
        let e = format!("{e:#}");
        assert!(e.contains("name") || e.contains("between 1 and 253"), "{names:?}: {e}");
    }
}

/// The binary the Python fixtures hold: one JSON line, then it waits; stdin EOF or SIGTERM
/// ends it, cleanly.
#[test]
fn rpx_testhosts_ends_on_stdin_eof_and_on_sigterm() {
    for how in ["stdin EOF", "SIGTERM"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rpx-testhosts"))
            .args(["up", "b1", "b2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("rpx-testhosts printed nothing within 60 s");
        if line.is_empty() {
            let status = child.wait().unwrap();
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            skip_or_fail(&format!("rpx-testhosts up failed ({status}): {err}"));
            return;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let s = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("no {k}: {v}")).to_string();
        let dir = PathBuf::from(s("dir"));
        let bridge = s("bridge");
        assert!(
            dir.is_dir()
                && s("ssh_config") == dir.join("ssh_config").to_str().unwrap()
                && s("ssh_wrapper") == dir.join("ssh").to_str().unwrap(),
            "{v}"
        );
        assert!(s("gateway").starts_with("10.213.") && s("subnet").ends_with(".0/24"), "{v}");
        let hosts = v["hosts"].as_array().unwrap();
        assert_eq!(hosts.iter().map(|h| h["name"].as_str().unwrap()).collect::<Vec<_>>(), ["b1", "b2"]);
        let mut inits = Vec::new();
        for h in hosts {
            let o = run(Command::new(s("ssh_wrapper")).args([h["ip"].as_str().unwrap(), "hostname"]), LIMIT);
            assert_eq!(stdout(&o), h["name"].as_str().unwrap(), "{}", show(&o));
            let pid = h["pid"].as_u64().unwrap() as u32;
            inits.push((pid, pid_ns(pid).expect("init alive")));
        }
        let footprint = Footprint { veths: ports_of(&bridge), bridge, inits, dir };
        assert_eq!(footprint.veths.len(), 2);
        match how {
            "stdin EOF" => drop(child.stdin.take()),
            _ => unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            },
        }
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "rpx-testhosts did not end within 30 s of {how}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "after {how}: {status}\n{err}");
        assert_eq!(err, "", "after {how}");
        footprint.assert_gone();
    }
}
