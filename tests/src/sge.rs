//! A real Grid Engine (Debian's `gridengine-*` 8.1.9) on this machine for tests: a private
//! `SGE_ROOT` (a fresh `/var/tmp/rpx-sge-*`, mode 0700, whose `bin`, `lib`, `util` and `utilbin`
//! link to Debian's) with its own cell, classic spooling, free ports, `sge_qmaster` and one
//! `sge_execd` on this host (`localhost`), a queue `all.q` with `slots` slots, and a scheduler
//! that runs every second. Nothing of Debian's own cell is used or changed; commands find the
//! cell through [`TestSge::env`] (`SGE_ROOT`, `SGE_CELL`, `SGE_QMASTER_PORT`, `SGE_EXECD_PORT`).
//!
//! Single execution host: Grid Engine checks that a client's address resolves back to the name
//! it gives, and namespace hosts have no name service of their own, so its execution daemon
//! runs here (the Slurm tests cover engines on other hosts).
//!
//! Dropping a [`TestSge`] deletes every job, waits (bounded) until `qstat` lists none, ends the
//! daemons (TERM, then KILL) and removes the directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Debian's Grid Engine programs.
const SGE_BIN: &str = "/usr/lib/gridengine";
const SGE_SHARE: &str = "/usr/share/gridengine";
/// The queue jobs go to.
pub const QUEUE: &str = "all.q";
const START_LIMIT: Duration = Duration::from_secs(60);

/// A running Grid Engine cell (see the module documentation).
pub struct TestSge {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    ports: (u16, u16),
    daemons: Vec<Child>,
}

/// What is missing for a Grid Engine test.
pub fn missing() -> Vec<String> {
    [
        "/usr/sbin/sge_qmaster",
        "/usr/sbin/sge_execd",
        "/usr/lib/gridengine/qsub",
        "/usr/lib/gridengine/spoolinit",
        "/usr/lib/gridengine/spooldefaults",
        "/var/lib/gridengine/bin",
    ]
    .iter()
    .filter(|p| !Path::new(p).exists())
    .map(|p| format!("{p} (apt-get install gridengine-master gridengine-exec gridengine-client)"))
    .collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("0.0.0.0:0")?.local_addr()?.port())
}

const EXEC_HOST: &str = "hostname localhost\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n";

fn queue(slots: usize) -> String {
    let mut q = format!("qname {QUEUE}\nhostlist localhost\nseq_no 0\nload_thresholds NONE\nsuspend_thresholds NONE\nnsuspend 1\nsuspend_interval 00:05:00\npriority 0\nmin_cpu_interval 00:05:00\nprocessors UNDEFINED\nqtype BATCH INTERACTIVE\nckpt_list NONE\npe_list NONE\nrerun FALSE\nslots {slots}\ntmpdir /tmp\nshell /bin/sh\nprolog NONE\nepilog NONE\nshell_start_mode unix_behavior\nstarter_method NONE\nsuspend_method NONE\nresume_method NONE\nterminate_method NONE\nnotify 00:00:60\nowner_list NONE\nuser_lists NONE\nxuser_lists NONE\nsubordinate_list NONE\ncomplex_values NONE\nprojects NONE\nxprojects NONE\ncalendar NONE\ninitial_state default\n");
    for l in ["rt", "cpu", "fsize", "data", "stack", "core", "rss", "vmem"] {
        q.push_str(&format!("s_{l} INFINITY\nh_{l} INFINITY\n"));
    }
    q
}

impl TestSge {
    /// Make the cell, start qmaster and execd, and return once the queue instance is up.
    pub fn start(slots: usize) -> anyhow::Result<TestSge> {
        let m = missing();
        if !m.is_empty() {
            bail!("cannot start Grid Engine: missing {}", m.join(", "));
        }
        let dir = tempfile::Builder::new().prefix("rpx-sge-").tempdir_in("/var/tmp").context("create a private directory in /var/tmp")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let root = dir.path().to_path_buf();
        let mut s = TestSge { root: root.clone(), dir: Some(dir), ports: (free_port()?, free_port()?), daemons: Vec::new() };
        for x in ["bin", "lib", "util", "utilbin"] {
            std::os::unix::fs::symlink(format!("/var/lib/gridengine/{x}"), root.join(x))?;
        }
        let common = root.join("default/common");
        for d in [&common, &root.join("qmaster"), &root.join("execd"), &root.join("files")] {
            std::fs::create_dir_all(d)?;
        }
        let r = root.display();
        std::fs::write(
            common.join("bootstrap"),
            format!("admin_user none\ndefault_domain none\nignore_fqdn true\nspooling_method classic\nspooling_lib libspoolc\nspooling_params {r}/default/common;{r}/qmaster\nbinary_path /usr/sbin\nqmaster_spool_dir {r}/qmaster\nsecurity_mode none\nlistener_threads 2\nworker_threads 2\nscheduler_threads 1\n"),
        )?;
        // This host's name resolves to 127.0.0.1, whose name is `localhost`: one host.
        std::fs::write(common.join("act_qmaster"), "localhost\n")?;
        let me = std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string();
        std::fs::write(common.join("host_aliases"), format!("localhost {me}\n"))?;
        let conf = std::fs::read_to_string(format!("{SGE_SHARE}/default-configuration"))?;
        let conf: String = conf
            .lines()
            .map(|l| match l.split_whitespace().next() {
                Some("execd_spool_dir") => format!("execd_spool_dir {r}/execd"),
                Some("min_uid") => "min_uid 0".into(),
                Some("min_gid") => "min_gid 0".into(),
                _ => l.to_string(),
            })
            .map(|l| l + "\n")
            .collect();
        let conf_file = root.join("files/configuration");
        std::fs::write(&conf_file, conf)?;
        s.check(Command::new(format!("{SGE_BIN}/spoolinit")).args([
            "classic",
            "libspoolc",
            &format!("{r}/default/common;{r}/qmaster"),
            "init",
        ]))?;
        s.check(Command::new(format!("{SGE_BIN}/spooldefaults")).arg("configuration").arg(&conf_file))?;
        s.check(Command::new(format!("{SGE_BIN}/spooldefaults")).args(["complexes", &format!("{SGE_SHARE}/util/resources/centry")]))?;
        s.check(Command::new(format!("{SGE_BIN}/spooldefaults")).args(["usersets", &format!("{SGE_SHARE}/util/resources/usersets")]))?;
        s.check(Command::new(format!("{SGE_BIN}/spooldefaults")).args(["managers", "root"]))?;

        let qmaster = s.daemon("/usr/sbin/sge_qmaster", "qmaster")?;
        s.daemons.push(qmaster);
        s.wait("sge_qmaster to answer", |s| s.qconf(&["-sh"]).status.success())?;
        let f = root.join("files");
        std::fs::write(f.join("exechost"), EXEC_HOST)?;
        std::fs::write(f.join("queue"), queue(slots))?;
        let sconf = String::from_utf8_lossy(&s.qconf(&["-ssconf"]).stdout)
            .lines()
            .map(|l| if l.starts_with("schedule_interval") { "schedule_interval 0:0:1\n".to_string() } else { format!("{l}\n") })
            .collect::<String>();
        std::fs::write(f.join("sconf"), sconf)?;
        for args in [vec!["-Ae", "exechost"], vec!["-as", "localhost"], vec!["-Msconf", "sconf"], vec!["-Aq", "queue"]] {
            let a: Vec<String> = args
                .iter()
                .enumerate()
                .map(|(i, a)| if i == 1 && args[0] != "-as" { f.join(a).display().to_string() } else { a.to_string() })
                .collect();
            let o = s.qconf(&a.iter().map(String::as_str).collect::<Vec<_>>());
            if !o.status.success() {
                bail!("qconf {a:?} failed: {}", crate::show(&o));
            }
        }
        let execd = s.daemon("/usr/sbin/sge_execd", "execd")?;
        s.daemons.push(execd);
        s.wait("the execution host to report", |s| {
            let o = s.run("qstat", &["-f", "-u", "*"]);
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().any(|l| l.starts_with(&format!("{QUEUE}@localhost")) && l.contains("lx-amd64") && !l.trim_end().ends_with("au"))
        })?;
        Ok(s)
    }

    fn daemon(&self, program: &str, name: &str) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.root.join(format!("files/{name}.out")))?;
        let mut c = Command::new(program);
        c.envs(self.env()).env("SGE_ND", "1").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        c.spawn().with_context(|| format!("start {program}"))
    }

    fn check(&self, cmd: &mut Command) -> anyhow::Result<()> {
        cmd.envs(self.env());
        let desc = format!("{cmd:?}");
        let o = crate::run(cmd, Duration::from_secs(30));
        if !o.status.success() {
            bail!("{desc} failed: {}", crate::show(&o));
        }
        Ok(())
    }

    fn wait(&self, what: &str, ok: impl Fn(&TestSge) -> bool) -> anyhow::Result<()> {
        if crate::poll(START_LIMIT, Duration::from_millis(100), || ok(self).then_some(())).is_none() {
            bail!("Grid Engine: gave up waiting {} s for {what}\n{}", START_LIMIT.as_secs(), self.logs());
        }
        Ok(())
    }

    fn qconf(&self, args: &[&str]) -> Output {
        self.run("qconf", args)
    }

    /// The daemons' output and messages files (tails).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in [
            self.root.join("files/qmaster.out"),
            self.root.join("files/execd.out"),
            self.root.join("qmaster/messages"),
            self.root.join("execd/localhost/messages"),
        ] {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n{}\n", p.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }

    /// The environment that selects this cell.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SGE_ROOT".into(), self.root.display().to_string()),
            ("SGE_CELL".into(), "default".into()),
            ("SGE_QMASTER_PORT".into(), self.ports.0.to_string()),
            ("SGE_EXECD_PORT".into(), self.ports.1.to_string()),
        ]
    }

    /// A Grid Engine client command (`qsub`, `qstat`, ...) of this cell.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(format!("{SGE_BIN}/{program}"));
        c.envs(self.env());
        c
    }

    /// Run a client command to completion (30 s at most).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        crate::run(self.command(program).args(args), Duration::from_secs(30))
    }

    /// `qstat -u '*'` job rows (empty when no job is left).
    pub fn jobs(&self) -> String {
        let o = self.run("qstat", &["-u", "*"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for TestSge {
    fn drop(&mut self) {
        if self.daemons.len() == 2 {
            let _ = self.command("qdel").args(["-f", "-u", "*"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end && !self.jobs().is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for c in self.daemons.iter().rev() {
            crate::kill(c.id() as i32, libc::SIGTERM);
        }
        for c in self.daemons.iter_mut() {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shepherds and job processes carry the cell's SGE_ROOT in their environment.
        let needle = self.root.display().to_string();
        for p in crate::wait_no_process_mentioning(&needle, Duration::from_secs(5)) {
            crate::kill(p.pid as i32, libc::SIGKILL);
        }
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}
