//! Fake "hosts" on this machine for multi-host tests: each host is a set of Linux namespaces
//! running a real `sshd`, joined to the root namespace by a private bridge.
//!
//! This module owns everything [`TestHosts`] creates and removes again on drop:
//! - a private directory `/var/tmp/rpx-hosts-*` (mode 0700; not `/tmp`, which each host hides)
//!   holding the ssh host key, the client key, `authorized_keys`, one `sshd` config, pid file and
//!   log per host, the client `ssh_config` and the `ssh` wrapper script (for `mpiexec`'s
//!   `plm_rsh_agent` / `-launcher-exec`);
//! - a bridge `rpxb<6 hex>` in the root namespace with the address `10.213.<n>.1/24` (the "head
//!   node" address a controller binds to), on a subnet checked to be unused. No uplink, no NAT,
//!   no default route in the hosts, IP forwarding left alone: traffic only flows between the
//!   bridge address and the hosts, and between hosts;
//! - per host: `unshare --net --mount --uts --ipc --pid --fork --mount-proc` whose pid-1 (the
//!   host's init) sets the hostname, mounts tmpfs (inside the namespace only) over `/tmp`,
//!   `/dev/shm`, the Rust sysroot (`rustc --print sysroot`: the host has no Rust toolchain) and
//!   `$HOME/.cache`, brings `lo` up, then reaps orphans; a veth pair `rpxv<8 hex>` (root side,
//!   on the bridge) / `eth0` (inside) with the address `10.213.<n>.<2+i>/24`; and `sshd` started
//!   inside all the host's namespaces with `nsenter`, accepting the client key for root.
//!
//! Ending a host SIGKILLs its init, which makes the kernel kill every process of its pid
//! namespace; teardown waits until the init is reaped, deletes the veth, the bridge and the
//! directory. It runs on drop (so a panicking test cleans up), is idempotent, and also runs when
//! creation fails halfway. If the owning process dies without dropping, the init sees its stdin
//! (a pipe whose only writer is the owner) reach EOF and exits, which ends the host's processes
//! and its network namespace (the bridge and the directory are then left behind).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The `PATH` given to every command this module starts (`ip` and `sshd` live in sbin).
const SYS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `sshd` must be started by absolute path (it re-executes itself).
const SSHD: &str = "/usr/sbin/sshd";
/// How long the hosts' `sshd`s get to accept a first login.
const SSH_READY_LIMIT: Duration = Duration::from_secs(15);

/// Run as pid 1 of each host by `sh -c SETUP rpx-host-setup NAME SYSROOT CACHE REAPER`.
const SETUP: &str = r#"set -eu
name=$1 sysroot=$2 cache=$3
hostname "$name" 2>/dev/null || printf '%s\n' "$name" >/proc/sys/kernel/hostname
mount -t tmpfs -o mode=1777 rpx-tmp /tmp
mount -t tmpfs -o mode=1777 rpx-shm /dev/shm
if [ -n "$sysroot" ]; then mount -t tmpfs -o mode=0755 rpx-no-rust "$sysroot"; fi
mount -t tmpfs -o mode=0700 rpx-cache "$cache"
ip link set lo up
echo ready
exec perl -e "$4" "$name" >/dev/null
"#;

/// The host's init once set up: reap every child (orphans are re-parented to pid 1) and exit
/// when stdin reaches EOF, i.e. when the process owning the [`TestHosts`] is gone.
/// (WNOHANG is 1 and EINTR 4 on Linux.)
const REAPER: &str = r#"
$0 = "rpx-host-init " . $ARGV[0];
$SIG{CHLD} = sub {};
while (1) {
    1 while waitpid(-1, 1) > 0;
    my $rin = ''; vec($rin, 0, 1) = 1;
    my $n = select(my $rout = $rin, undef, undef, 0.5);
    if ($n > 0) {
        my $r = sysread(STDIN, my $buf, 512);
        next if !defined $r && $! == 4;
        exit 0 unless $r;
    }
}
"#;

/// Serializes subnet choice and bridge creation between threads of this process; other
/// processes are detected after the fact (see [`TestHosts::make_bridge`]).
static NET_LOCK: Mutex<()> = Mutex::new(());

/// One fake host.
#[derive(Debug, Clone)]
pub struct TestHost {
    /// Its hostname (also the name given to [`TestHosts::create`]).
    pub name: String,
    /// Its address on the bridge's subnet, e.g. `10.213.57.2`; `sshd` listens there on port 22.
    pub ip: String,
    /// The namespace's init, as seen from the root namespace
    pub pid: u32,
}

/// What this module holds for one host, for teardown.
struct HostState {
    name: String,
    /// `unshare`; the host's init is its only child.
    unshare: Option<Child>,
    /// The write end of the init's stdin: closing it makes the init exit.
    lifeline: Option<ChildStdin>,
    init_pid: Option<u32>,
    /// The host's pid namespace (`pid:[inode]`), to check that none of its processes is left.
    pid_ns: Option<PathBuf>,
    /// The root-side veth, once created.
    veth: Option<String>,
    sshd: Mutex<Option<Sshd>>,
}

/// A running `sshd`: the `nsenter` that started it (its parent) and its pid in the root namespace.
struct Sshd {
    nsenter: Child,
    pid: Option<u32>,
}

/// A set of fake hosts (see the module documentation). Dropping it ends them all.
pub struct TestHosts {
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    bridge: Option<String>,
    bridge_name: String,
    subnet: String,
    gateway: String,
    hosts: Vec<TestHost>,
    state: Vec<HostState>,
}

impl TestHosts {
    /// Create one host per name (hostnames: letters, digits and `-`), each running `sshd`
    /// that accepts [`TestHosts::ssh_config`] logins as root, and return once every host
    /// accepted an ssh login. Fails, saying what is missing, unless running as root with
    /// `unshare`, `nsenter`, `ip`, `perl`, `ssh`, `ssh-keygen` and `/usr/sbin/sshd` installed;
    /// on any failure, what was already created is removed.
    pub fn create(names: &[&str]) -> anyhow::Result<TestHosts> {
        check_names(names)?;
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            bail!("cannot create test hosts: {}", missing.join(", "));
        }
        // Found before any host exists (and from the root namespace).
        let sysroot = rust_sysroot();
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        let cache = home.join(".cache");
        std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
        check(sys_command("install").args(["-d", "-m", "0755", "/run/sshd"]))?;
        let dir = tempfile::Builder::new().prefix("rpx-hosts-").tempdir_in("/var/tmp").context("create a private directory in /var/tmp")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let mut hosts = TestHosts {
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            bridge: None,
            bridge_name: String::new(),
            subnet: String::new(),
            gateway: String::new(),
            hosts: Vec::new(),
            state: Vec::new(),
        };
        // From here on, an error drops `hosts`, which removes whatever exists.
        hosts.write_ssh_files()?;
        hosts.make_bridge()?;
        let prefix = hosts.gateway.rsplit_once('.').expect("dotted quad").0.to_string();
        for (i, name) in names.iter().enumerate() {
            let ip = format!("{prefix}.{}", i + 2);
            hosts.start_host(name, &ip, sysroot.as_deref(), &cache).with_context(|| format!("start host {name}"))?;
        }
        hosts.wait_for_sshd()?;
        Ok(hosts)
    }

    /// The hosts, in the order given to [`TestHosts::create`].
    pub fn hosts(&self) -> &[TestHost] {
        &self.hosts
    }

    /// The host called `name`; panics if there is none.
    pub fn host(&self, name: &str) -> &TestHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no test host {name:?} (have {:?})", self.hosts.iter().map(|h| &h.name).collect::<Vec<_>>()))
    }

    /// The bridge's address, e.g. `10.213.57.1`: the root namespace as the hosts reach it.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The bridge's name, `rpxb` and 6 hex digits (e.g. for MPICH's `-iface`).
    pub fn bridge(&self) -> &str {
        &self.bridge_name
    }

    /// The hosts' subnet, e.g. `10.213.57.0/24` (e.g. for Open MPI's `*_if_include`).
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// The private directory (under `/var/tmp`, visible from every host).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The client configuration: `ssh -F <this> <host ip> ...` logs in as root.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir_path.join("ssh_config")
    }

    /// An executable `ssh` that uses [`TestHosts::ssh_config`] (`<dir>/ssh`).
    pub fn ssh_wrapper(&self) -> PathBuf {
        self.dir_path.join("ssh")
    }

    /// Run a command inside the host (all its namespaces, working directory `/`, environment
    /// reduced to `PATH`, `HOME`, `USER`, `LOGNAME` and `LANG=C`) with a time limit; returns its
    /// Output. Panics if it cannot be started or does not finish within `limit`.
    pub fn exec(&self, host: &str, argv: &[&str], limit: Duration) -> Output {
        let pid = self.host(host).pid;
        let mut cmd = host_command(pid);
        cmd.arg("--").args(argv);
        crate::run(&mut cmd, limit)
    }

    /// A command that runs inside the host (all its namespaces, working directory `/`, the same
    /// reduced environment as [`TestHosts::exec`]): add the program and its arguments, spawn
    /// it, and end it yourself (it also ends with the host). For daemons such as `slurmd`.
    pub fn command(&self, host: &str) -> Command {
        let mut cmd = host_command(self.host(host).pid);
        cmd.arg("--");
        cmd
    }

    /// Processes in the host's pid namespace other than its init and its sshd (pid in the
    /// namespace, command line), sorted by pid. Zombies are left out.
    pub fn processes(&self, host: &str) -> Vec<(u32, String)> {
        let h = self.host(host);
        let st = self.state(host);
        let sshd_pid = st.sshd.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|s| s.pid);
        let Some(ns) = pid_ns(h.pid) else { return Vec::new() };
        let mut out = Vec::new();
        for pid in all_pids() {
            if pid == h.pid || Some(pid) == sshd_pid || pid_ns(pid).as_ref() != Some(&ns) {
                continue;
            }
            let Some(stat) = Stat::read(pid) else { continue };
            if stat.state == "Z" || stat.state == "X" {
                continue;
            }
            let Some(ns_pid) = ns_pid(pid) else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string();
            if cmdline.is_empty() {
                cmdline = format!("[{}]", stat.comm);
            }
            out.push((ns_pid, cmdline));
        }
        out.sort();
        out
    }

    /// Stop (SIGKILL) the host's sshd, and wait until it is gone: for "host unreachable" tests.
    /// New connections are then refused; sessions already open live on. Does nothing if it is
    /// already stopped.
    pub fn stop_sshd(&self, host: &str) {
        let st = self.state(host);
        let sshd = st.sshd.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sshd) = sshd {
            if let Err(e) = end_sshd(sshd) {
                panic!("stop sshd of {host}: {e:#}");
            }
        }
    }

    fn state(&self, host: &str) -> &HostState {
        self.state.iter().find(|s| s.name == host).unwrap_or_else(|| panic!("no test host {host:?}"))
    }

    /// Keys, `authorized_keys`, the client's `ssh_config` and the `ssh` wrapper.
    fn write_ssh_files(&self) -> anyhow::Result<()> {
        let d = &self.dir_path;
        for key in ["host_ed25519", "id_ed25519"] {
            check(sys_command("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "rpx-testhosts", "-f"]).arg(d.join(key)))?;
        }
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).context("write authorized_keys")?;
        let config = format!(
            "Host *\n    IdentityFile {}\n    IdentitiesOnly yes\n    User root\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    BatchMode yes\n    ConnectTimeout 5\n    LogLevel ERROR\n    ServerAliveInterval 5\n    ServerAliveCountMax 3\n",
            d.join("id_ed25519").display()
        );
        std::fs::write(self.ssh_config(), config).context("write ssh_config")?;
        let wrapper = self.ssh_wrapper();
        std::fs::write(&wrapper, format!("#!/bin/sh\nexec ssh -F '{}' \"$@\"\n", self.ssh_config().display()))
            .context("write the ssh wrapper")?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// Pick an unused `10.213.<n>.0/24`, create the bridge and give it `.1`. Another process
    /// may pick the same subnet at the same time: after assigning the address, check that no
    /// other interface has one on the subnet, else back off and pick again.
    fn make_bridge(&mut self) -> anyhow::Result<()> {
        let _guard = NET_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..40 {
            let r = random_bytes();
            let n = 1 + r[0] % 254;
            if !subnet_conflicts(n, None)?.is_empty() {
                continue;
            }
            let name = format!("rpxb{}", &hex(&r[1..])[..6]);
            let out = output_within(sys_command("ip").args(["link", "add", &name, "type", "bridge"]), Duration::from_secs(10))?;
            if !out.status.success() {
                if String::from_utf8_lossy(&out.stderr).contains("File exists") {
                    continue;
                }
                bail!("ip link add {name} type bridge: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            self.bridge = Some(name.clone());
            self.bridge_name = name.clone();
            let gateway = format!("10.213.{n}.1");
            ip(&["addr", "add", &format!("{gateway}/24"), "dev", &name])?;
            let others = subnet_conflicts(n, Some(&name))?;
            if !others.is_empty() {
                // Someone else took it meanwhile: give it back.
                ip(&["link", "del", &name])?;
                self.bridge = None;
                continue;
            }
            ip(&["link", "set", &name, "up"])?;
            self.gateway = gateway;
            self.subnet = format!("10.213.{n}.0/24");
            return Ok(());
        }
        bail!("found no unused subnet 10.213.<n>.0/24 in 40 tries (see `ip -4 addr` and `ip route`)")
    }

    /// Start one host's namespaces, network and sshd (readiness is checked later, for all
    /// hosts at once).
    fn start_host(&mut self, name: &str, ip_addr: &str, sysroot: Option<&Path>, cache: &Path) -> anyhow::Result<()> {
        let log_path = self.dir_path.join(format!("init-{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = sys_command("unshare");
        cmd.args([
            "--net",
            "--mount",
            "--uts",
            "--ipc",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "--kill-child",
            "--",
            "sh",
            "-c",
            SETUP,
            "rpx-host-setup",
            name,
        ])
        .arg(sysroot.map(Path::as_os_str).unwrap_or_default())
        .arg(cache)
        .arg(REAPER)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log);
        let mut child = cmd.spawn().context("run unshare")?;
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let unshare_pid = child.id();
        self.state.push(HostState {
            name: name.to_string(),
            unshare: Some(child),
            lifeline,
            init_pid: None,
            pid_ns: None,
            veth: None,
            sshd: Mutex::new(None),
        });

        // The init prints `ready` once its mounts and hostname are set.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .map_err(|_| anyhow!("the namespace did not get ready within 15 s; {}", log_tail(&log_path)))?;
        if line.trim() != "ready" {
            bail!("setting up the namespace failed; {}", log_tail(&log_path));
        }
        let init = match children_of(unshare_pid).as_slice() {
            [pid] => *pid,
            other => bail!("expected one child of unshare (pid {unshare_pid}), found {other:?}"),
        };
        if ns_pid(init) != Some(1) {
            bail!("process {init} (child of unshare) is not pid 1 of a new pid namespace");
        }
        let st = self.state.last_mut().expect("pushed");
        st.init_pid = Some(init);
        st.pid_ns = pid_ns(init);

        // The veth pair: root side on the bridge, `eth0` inside.
        let veth = loop {
            let v = format!("rpxv{}", &hex(&random_bytes())[..8]);
            let out = output_within(
                sys_command("ip").args(["link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &init.to_string()]),
                Duration::from_secs(10),
            )?;
            if out.status.success() {
                break v;
            }
            if !String::from_utf8_lossy(&out.stderr).contains("File exists") {
                bail!("ip link add {v} type veth peer name eth0 netns {init}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        };
        st.veth = Some(veth.clone());
        ip(&["link", "set", &veth, "master", &self.bridge_name, "up"])?;
        let inside = |args: &[&str]| check(sys_command("nsenter").args(["-t", &init.to_string(), "-n", "--", "ip"]).args(args));
        inside(&["addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;

        // sshd, inside every namespace of the host.
        let d = &self.dir_path;
        let config = format!(
            "Port 22\nListenAddress {ip_addr}\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nPermitRootLogin yes\nLogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 100\nPrintMotd no\nSubsystem sftp internal-sftp\n",
            d.join("host_ed25519").display(),
            d.join(format!("sshd-{name}.pid")).display(),
            d.join("authorized_keys").display(),
        );
        let config_path = d.join(format!("sshd-{name}.conf"));
        std::fs::write(&config_path, config)?;
        let sshd_log = std::fs::File::create(d.join(format!("sshd-{name}.log")))?;
        let mut cmd = host_command(init);
        cmd.args(["--", SSHD, "-D", "-e", "-f"]).arg(&config_path).stdin(Stdio::null()).stdout(Stdio::null()).stderr(sshd_log);
        let nsenter = cmd.spawn().context("run nsenter ... sshd")?;
        *st.sshd.lock().unwrap_or_else(|e| e.into_inner()) = Some(Sshd { nsenter, pid: None });
        self.hosts.push(TestHost { name: name.to_string(), ip: ip_addr.to_string(), pid: init });
        Ok(())
    }

    /// Poll every host with `ssh <ip> true` until each accepted a login (15 s in all), then
    /// note each sshd's pid.
    fn wait_for_sshd(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SSH_READY_LIMIT;
        let mut waiting: Vec<usize> = (0..self.hosts.len()).collect();
        let mut last_error = String::new();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for &i in &waiting {
                let (h, st) = (&self.hosts[i], &self.state[i]);
                let mut guard = st.sshd.lock().unwrap_or_else(|e| e.into_inner());
                let sshd = guard.as_mut().expect("started");
                if let Some(status) = sshd.nsenter.try_wait()? {
                    bail!("sshd of {} exited ({status}); {}", h.name, log_tail(&self.dir_path.join(format!("sshd-{}.log", h.name))));
                }
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(500));
                let out = output_within(self.ssh_command(&h.ip).arg("true"), left)?;
                if out.status.success() {
                    let nsenter_pid = sshd.nsenter.id();
                    sshd.pid = children_of(nsenter_pid).first().copied();
                    if sshd.pid.is_none() {
                        bail!("sshd of {} answered but is not a child of nsenter {nsenter_pid}", h.name);
                    }
                } else {
                    last_error = format!("{}: {}", h.name, String::from_utf8_lossy(&out.stderr).trim());
                    still.push(i);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = waiting.iter().map(|&i| self.hosts[i].name.as_str()).collect();
                bail!(
                    "sshd of {names:?} did not accept a login within {SSH_READY_LIMIT:?} (last error: {last_error}); {}",
                    log_tail(&self.dir_path.join(format!("sshd-{}.log", names[0])))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn ssh_command(&self, ip_addr: &str) -> Command {
        let mut cmd = sys_command("ssh");
        cmd.arg("-F").arg(self.ssh_config()).arg(ip_addr);
        cmd
    }

    /// End every host, then delete the bridge and the directory. Idempotent; reports problems
    /// on stderr (it runs in `Drop`).
    fn teardown(&mut self) {
        let mut problems = Vec::new();
        while let Some(mut st) = self.state.pop() {
            if let Err(e) = end_host(&mut st) {
                problems.push(format!("host {}: {e:#}", st.name));
            }
        }
        self.hosts.clear();
        if let Some(bridge) = self.bridge.take() {
            if let Err(e) = ip_del(&bridge) {
                problems.push(format!("{e:#}"));
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                problems.push(format!("remove {}: {e}", path.display()));
            }
        }
        for p in problems {
            eprintln!("rpx-tests: test hosts teardown: {p}");
        }
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// SIGKILL the host's init and wait until `unshare` reaped it (the kernel has then killed and
/// reaped every process of its pid namespace); then the sshd's `nsenter` and the veth.
fn end_host(st: &mut HostState) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    if let Some(mut unshare) = st.unshare.take() {
        let upid = unshare.id();
        // The init is unshare's only child; unshare is not reaped yet, so the pid is not reused.
        let init = st.init_pid.or_else(|| children_of(upid).first().copied());
        let own_ns = pid_ns(std::process::id());
        let ns = st
            .pid_ns
            .take()
            .or_else(|| init.filter(|p| Stat::read(*p).is_some_and(|s| s.ppid == upid)).and_then(pid_ns))
            .filter(|ns| Some(ns) != own_ns.as_ref());
        if matches!(unshare.try_wait(), Ok(None)) {
            if let Some(init) = init.filter(|p| Stat::read(*p).is_some_and(|s| s.ppid == upid)) {
                kill(init, libc::SIGKILL);
            }
            st.lifeline.take();
            if wait_child(&mut unshare, Duration::from_secs(10)).is_none() {
                // unshare --kill-child SIGKILLs the init when unshare dies.
                let _ = unshare.kill();
                if wait_child(&mut unshare, Duration::from_secs(10)).is_none() {
                    problems.push(format!("unshare {upid} did not exit"));
                }
            }
        }
        // Once unshare has reaped the init, the kernel has killed and reaped every process of
        // the namespace; check anyway.
        if let Some(ns) = ns {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let left: Vec<u32> = all_pids().into_iter().filter(|p| pid_ns(*p).as_ref() == Some(&ns)).collect();
                if left.is_empty() {
                    break;
                }
                if Instant::now() >= end {
                    problems.push(format!("processes {left:?} of its pid namespace are still there"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    st.lifeline.take();
    let sshd = st.sshd.get_mut().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(sshd) = sshd {
        if let Err(e) = end_sshd(sshd) {
            problems.push(format!("{e:#}"));
        }
    }
    if let Some(veth) = st.veth.take() {
        if let Err(e) = ip_del(&veth) {
            problems.push(format!("{e:#}"));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// SIGKILL an sshd (if it is still nsenter's child) and wait for nsenter, which reaps it.
fn end_sshd(mut sshd: Sshd) -> anyhow::Result<()> {
    let parent = sshd.nsenter.id();
    if matches!(sshd.nsenter.try_wait(), Ok(None)) {
        let pid = sshd.pid.or_else(|| children_of(parent).first().copied());
        if let Some(pid) = pid.filter(|p| Stat::read(*p).is_some_and(|s| s.ppid == parent)) {
            kill(pid, libc::SIGKILL);
        } else {
            let _ = sshd.nsenter.kill();
        }
        if wait_child(&mut sshd.nsenter, Duration::from_secs(10)).is_none() {
            let _ = sshd.nsenter.kill();
            wait_child(&mut sshd.nsenter, Duration::from_secs(5)).ok_or_else(|| anyhow!("nsenter {parent} (sshd) did not exit"))?;
        }
    }
    Ok(())
}

/// Delete a link and wait until it is gone; a link already gone is fine.
fn ip_del(link: &str) -> anyhow::Result<()> {
    let sys = Path::new("/sys/class/net").join(link);
    if sys.exists() {
        let out = output_within(sys_command("ip").args(["link", "del", link]), Duration::from_secs(10))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("Cannot find device") {
            bail!("ip link del {link}: {}", err.trim());
        }
    }
    let end = Instant::now() + Duration::from_secs(10);
    while sys.exists() {
        if Instant::now() >= end {
            bail!("link {link} still exists");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks

fn check_names(names: &[&str]) -> anyhow::Result<()> {
    if names.is_empty() || names.len() > 253 {
        bail!("test hosts: give between 1 and 253 names, not {}", names.len());
    }
    for (i, n) in names.iter().enumerate() {
        let ok = !n.is_empty() && n.len() <= 63 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !n.starts_with('-');
        if !ok {
            bail!("test host name {n:?}: use letters, digits and '-' (at most 63, not starting with '-')");
        }
        if names[..i].contains(n) {
            bail!("test host name {n:?} given twice");
        }
    }
    Ok(())
}

/// Why hosts cannot be created here: not root, missing tools (with their Debian package).
fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        missing.push(format!("not running as root (uid {uid})"));
    }
    for (tool, package) in [
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("perl", "perl-base"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ] {
        if !SYS_PATH.split(':').any(|d| Path::new(d).join(tool).is_file()) {
            missing.push(format!("{tool} is missing (Debian package {package})"));
        }
    }
    if !Path::new(SSHD).is_file() {
        missing.push(format!("{SSHD} is missing (Debian package openssh-server)"));
    }
    missing
}

/// `rustc --print sysroot`, if rustc runs.
fn rust_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustc").args(["--print", "sysroot"]).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    (out.status.success() && p.is_absolute() && p.is_dir()).then_some(p)
}

/// Addresses and routes of the root namespace that overlap `10.213.<n>.0/24`, other than
/// those of `ours` (the bridge just made). A covering route shorter than /16 (e.g. a VPN's
/// 10.0.0.0/8) does not count: the /24 on the bridge is more specific.
fn subnet_conflicts(n: u8, ours: Option<&str>) -> anyhow::Result<Vec<String>> {
    let base = u32::from_be_bytes([10, 213, n, 0]);
    let mut conflicts = Vec::new();
    for args in [&["-4", "-o", "addr", "show"][..], &["-4", "route", "show", "table", "all"][..]] {
        let out = output_within(sys_command("ip").args(args), Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(ours) = ours {
                if line.split_whitespace().any(|w| w == ours) {
                    continue;
                }
            }
            for word in line.split_whitespace() {
                let Some((addr, len)) = parse_prefix(word) else { continue };
                let common = len.min(24);
                let mask = if common == 0 { 0 } else { u32::MAX << (32 - common) };
                if addr & mask == base & mask && len >= 16 {
                    conflicts.push(line.trim().to_string());
                }
            }
        }
    }
    Ok(conflicts)
}

/// `a.b.c.d` (a /32) or `a.b.c.d/len`.
fn parse_prefix(word: &str) -> Option<(u32, u32)> {
    let (addr, len) = match word.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok().filter(|l| *l <= 32)?),
        None => (word, 32),
    };
    let ip: std::net::Ipv4Addr = addr.parse().ok()?;
    Some((u32::from(ip), len))
}

// ---------------------------------------------------------------------------------------------
// Commands and processes

fn sys_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", SYS_PATH);
    cmd
}

/// `nsenter` into every namespace of the process `pid` (a host's init), with a clean environment.
fn host_command(pid: u32) -> Command {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut cmd = Command::new("nsenter");
    cmd.env_clear()
        .env("PATH", SYS_PATH)
        .env("HOME", home)
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("LANG", "C")
        .current_dir("/")
        .args(["-t", &pid.to_string(), "-a"]);
    // nsenter is looked up with the PATH given to the child.
    cmd
}

/// Run an `ip` command in the root namespace; fail with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    check(sys_command("ip").args(args))
}

/// Run a command to completion (10 s at most); fail with its stderr unless it succeeded.
fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let out = output_within(cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!("{desc} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Run a command with stdin from /dev/null, capturing its output; kill it and fail after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("cannot run {desc}"))?;
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    })
    .collect();
    let status = match wait_child(&mut child, limit) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {limit:?}");
        }
    };
    let mut outs = readers.into_iter().map(|h| h.join().unwrap_or_default());
    Ok(Output { status, stdout: outs.next().unwrap_or_default(), stderr: outs.next().unwrap_or_default() })
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The fields of `/proc/<pid>/stat` this module needs.
struct Stat {
    comm: String,
    state: String,
    ppid: u32,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (s.find('(')?, s.rfind(')')?);
        let mut rest = s[close + 1..].split_whitespace();
        let state = rest.next()?.to_string();
        let ppid = rest.next()?.parse().ok()?;
        Some(Stat { comm: s[open + 1..close].to_string(), state, ppid })
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect())
        .unwrap_or_default()
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut v: Vec<u32> = all_pids().into_iter().filter(|p| Stat::read(*p).is_some_and(|s| s.ppid == parent)).collect();
    v.sort();
    v
}

/// The pid namespace of a process (`pid:[inode]`).
fn pid_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// A process's pid in its own (innermost) pid namespace.
fn ns_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
}

fn random_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The end of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.trim().is_empty() {
        format!("{} is empty", path.display())
    } else {
        format!("{}:\n{tail}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes() {
        assert_eq!(parse_prefix("10.213.5.1/24"), Some((u32::from_be_bytes([10, 213, 5, 1]), 24)));
        assert_eq!(parse_prefix("192.0.2.255"), Some((u32::from_be_bytes([192, 0, 2, 255]), 32)));
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("10.0.0.0/33"), None);
    }

    #[test]
    fn test_hosts_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TestHosts>();
    }

    #[test]
    fn rejects_bad_names() {
        assert!(check_names(&["h1", "h-2"]).is_ok());
        assert!(check_names(&[]).is_err());
        assert!(check_names(&["a b"]).is_err());
        assert!(check_names(&["-x"]).is_err());
        assert!(check_names(&["h1", "h1"]).is_err());
        assert!(check_names(&["a/b"]).is_err());
    }
}
