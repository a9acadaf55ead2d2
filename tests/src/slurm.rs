//! A real Slurm cluster on this machine for tests: a private `munged`, `slurmctld` in the root
//! namespace (on the bridge's address) and one `slurmd` per [`TestHosts`] host (each in its
//! namespace, node name = host name), as `reference/multihost.md` describes.
//!
//! Everything lives in a fresh private directory `/var/tmp/rpx-slurm-*` (mode 0700; not `/tmp`,
//! which the hosts hide): the munge key and socket, `slurm.conf`, state, spool, pid and log
//! files. Nothing global is used: munge's socket is the test's own (`AuthInfo=socket=`), the
//! ports are free ones picked at start, and commands find the configuration through
//! `SLURM_CONF`. Dropping a [`TestSlurm`] cancels every job, waits (bounded) until `squeue` is
//! empty, then ends the daemons (TERM, then KILL) and removes the directory; the slurmds also
//! die with their hosts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::hosts::TestHosts;

/// The partition every node is in.
pub const PARTITION: &str = "debug";

/// How long the daemons get to come up (slurmctld answering, every node idle).
const START_LIMIT: Duration = Duration::from_secs(60);

/// A running Slurm cluster (see the module documentation).
pub struct TestSlurm {
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    conf: PathBuf,
    daemons: Vec<Child>,
    nodes: Vec<String>,
}

/// Whether this machine has what a Slurm test needs, or what is missing.
pub fn missing() -> Vec<String> {
    [
        "/usr/sbin/munged",
        "/usr/bin/munge",
        "/usr/sbin/slurmctld",
        "/usr/sbin/slurmd",
        "/usr/bin/sbatch",
        "/usr/bin/squeue",
        "/usr/bin/scancel",
    ]
    .iter()
    .filter(|p| !Path::new(p).exists())
    .map(|p| format!("{p} (apt-get install slurm-wlm munge)"))
    .collect()
}

/// A TCP port free on this host now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?.local_addr()?.port())
}

fn short_hostname() -> anyhow::Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(h.trim().split('.').next().unwrap_or("").to_string())
}

impl TestSlurm {
    /// Start munged, slurmctld (on `hosts`' bridge address) and a slurmd on every host, each
    /// offering `cpus` CPUs; return once `sinfo` shows every node idle.
    pub fn start(hosts: &TestHosts, cpus: usize) -> anyhow::Result<TestSlurm> {
        let m = missing();
        if !m.is_empty() {
            bail!("cannot start Slurm: missing {}", m.join(", "));
        }
        let dir = tempfile::Builder::new().prefix("rpx-slurm-").tempdir_in("/var/tmp").context("create a private directory in /var/tmp")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let d = dir.path().to_path_buf();
        let mut s = TestSlurm {
            dir_path: d.clone(),
            dir: Some(dir),
            conf: d.join("slurm.conf"),
            daemons: Vec::new(),
            nodes: hosts.hosts().iter().map(|h| h.name.clone()).collect(),
        };
        // From here on, an error drops `s`, which ends what was started.
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir(d.join(sub))?;
        }
        let key: Vec<u8> = (0..128).map(|_| rand_byte()).collect();
        let key_file = d.join("munge/munge.key");
        std::fs::write(&key_file, key)?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o400))?;
        let sock = d.join("munge/munge.sock");
        let munged = Command::new("/usr/sbin/munged")
            .arg("-F")
            .arg("-f")
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--key-file={}", key_file.display()))
            .arg(format!("--log-file={}", d.join("munge/munged.log").display()))
            .arg(format!("--pid-file={}", d.join("munge/munged.pid").display()))
            .arg(format!("--seed-file={}", d.join("munge/munged.seed").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start munged")?;
        s.daemons.push(munged);
        s.wait("munged to answer", Duration::from_secs(20), |s| s.munge_ok(&sock))?;

        let ctl_host = short_hostname()?;
        let (ctl_port, node_port) = (free_port()?, free_port()?);
        let mut conf = format!(
            "ClusterName=rpxtest\nSlurmctldHost={ctl_host}({gw})\nSlurmctldPort={ctl_port}\nSlurmdPort={node_port}\n\
             AuthType=auth/munge\nAuthInfo=socket={sock}\nCredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool/%n\nSlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSlurmdParameters=config_overrides\nReturnToService=2\nMpiDefault=none\nKillWait=5\nMinJobAge=600\n\
             SlurmctldTimeout=30\nSlurmdTimeout=30\n",
            gw = hosts.gateway(),
            sock = sock.display(),
            d = d.display(),
        );
        for h in hosts.hosts() {
            conf.push_str(&format!("NodeName={} NodeAddr={} CPUs={cpus} State=UNKNOWN\n", h.name, h.ip));
        }
        conf.push_str(&format!("PartitionName={PARTITION} Nodes={} Default=YES MaxTime=INFINITE State=UP\n", s.nodes.join(",")));
        std::fs::write(&s.conf, conf)?;

        let ctld = Command::new("/usr/sbin/slurmctld")
            .args(["-D", "-i", "-f"])
            .arg(&s.conf)
            .env("SLURM_CONF", &s.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("log/slurmctld.stderr"))?)
            .spawn()
            .context("start slurmctld")?;
        s.daemons.push(ctld);
        s.wait("slurmctld to answer", START_LIMIT, |s| s.command("sinfo").arg("-h").output().is_ok_and(|o| o.status.success()))?;
        for h in hosts.hosts() {
            let mut cmd = hosts.command(&h.name);
            cmd.args(["/usr/sbin/slurmd", "-D", "-N", &h.name, "-f"])
                .arg(&s.conf)
                .env("SLURM_CONF", &s.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join(format!("log/slurmd-{}.stderr", h.name)))?);
            s.daemons.push(cmd.spawn().with_context(|| format!("start slurmd on {}", h.name))?);
        }
        s.wait("every node to be idle", START_LIMIT, |s| {
            let text = s.sinfo_nodes();
            s.nodes.iter().all(|n| text.lines().any(|l| l.starts_with(&format!("{n} ")) && l.contains("idle")))
        })?;
        Ok(s)
    }

    fn munge_ok(&self, sock: &Path) -> bool {
        let Ok(enc) = Command::new("munge").arg("-S").arg(sock).arg("-n").stderr(Stdio::null()).output() else { return false };
        if !enc.status.success() {
            return false;
        }
        let mut un =
            match Command::new("unmunge").arg("-S").arg(sock).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
                Ok(c) => c,
                Err(_) => return false,
            };
        if let Some(mut i) = un.stdin.take() {
            let _ = std::io::Write::write_all(&mut i, &enc.stdout);
        }
        un.wait().is_ok_and(|s| s.success())
    }

    /// Poll `ok` every 100 ms until it holds or `limit` passes (then fail with the logs).
    fn wait(&self, what: &str, limit: Duration, ok: impl Fn(&TestSlurm) -> bool) -> anyhow::Result<()> {
        if crate::poll(limit, Duration::from_millis(100), || ok(self).then_some(())).is_none() {
            bail!("Slurm: gave up waiting {:.0} s for {what}\n{}", limit.as_secs_f64(), self.logs());
        }
        Ok(())
    }

    /// The tails of the daemons' logs.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(rd) = std::fs::read_dir(self.dir_path.join("log")) else { return out };
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }

    /// `sinfo -h -N -o '%N %t'`: one `node state` line per node.
    pub fn sinfo_nodes(&self) -> String {
        self.command("sinfo")
            .args(["-h", "-N", "-o", "%N %t"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// A Slurm client command (`sbatch`, `squeue`, ...) that uses this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// The environment a process needs to use this cluster's commands.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SLURM_CONF".into(), self.conf.display().to_string())]
    }

    /// Run a Slurm command to completion (30 s at most).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        crate::run(self.command(program).args(args), Duration::from_secs(30))
    }

    /// `squeue -h -o '%i %T'` of pending and running jobs (every user): empty when no job is
    /// left.
    pub fn live_jobs(&self) -> String {
        String::from_utf8_lossy(&self.run("squeue", &["-h", "-o", "%i %T %N"]).stdout).trim().to_string()
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }
}

/// A byte from the kernel's random source.
fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most one byte into `b`.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
    b[0]
}

impl Drop for TestSlurm {
    fn drop(&mut self) {
        if self.daemons.len() > 1 {
            // Cancel every job and let slurmd end their processes.
            let _ = self.command("scancel").args(["--full", "-u", "root"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end && !self.live_jobs().is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // slurmds first (their nsenter parents are the children here), slurmctld, munged last.
        for c in self.daemons.iter().rev() {
            crate::kill(c.id() as i32, libc::SIGTERM);
        }
        // The slurmds are nsenter's children: end them by their config path.
        let needle = self.conf.display().to_string();
        for p in crate::processes_mentioning(&needle) {
            crate::kill(p.pid as i32, libc::SIGTERM);
        }
        let left = crate::wait_no_process_mentioning(&needle, Duration::from_secs(10));
        for p in left {
            crate::kill(p.pid as i32, libc::SIGKILL);
        }
        for c in self.daemons.iter_mut() {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}
