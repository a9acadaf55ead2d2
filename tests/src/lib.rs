//! Helpers for rpx black-box tests: they run the real release binaries as a user would.
//!
//! # Layout
//! - binaries: [`bin`] finds `target/release/<name>` (or `$RPX_BIN_DIR/<name>`).
//! - commands: [`run`] runs a command with a time limit and captures its output.
//! - clusters: [`TestCluster`] starts `ipcluster start -n N --daemonize` under a private
//!   temporary `RPX_DIR` and stops it (then SIGKILLs leftovers) on drop.
//! - protocol: [`Client`] is a minimal synchronous client of the controller (connection,
//!   queue, execute on chosen engines with per-engine replies and iopub output).
//! - processes: [`processes_mentioning`] scans `/proc` for processes whose command line or
//!   environment mentions a string (the test's `RPX_DIR`), to prove nothing survives.
//! - hosts: [`hosts`] / [`TestHosts`] make fake hosts on this machine (Linux namespaces with
//!   their own hostname, `/tmp`, no Rust toolchain, a real `sshd`) on a private bridge, for
//!   multi-host tests (root only); the `rpx-testhosts` binary offers them to the Python tests.
//! - stand-ins: [`standin`] runs many lightweight engines (registration and heartbeat only) in
//!   one process, against rpx's controller or ipyparallel's; the `rpx-standin` binary drives
//!   them for `bench/scale_bench.py`.
//! - batch schedulers: [`slurm`] / [`TestSlurm`] run a real Slurm (munged, slurmctld, a slurmd
//!   per test host) and [`sge`] / [`TestSge`] a real Grid Engine, for the batch launchers.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket};

use rpx_protocol::connection::read_json;
use rpx_protocol::{ClientConnection, Message, Profile, Session};

pub mod hosts;
pub mod sge;
pub mod slurm;
pub mod standin;
pub use hosts::{TestHost, TestHosts};
pub use sge::TestSge;
pub use slurm::TestSlurm;

// ---------------------------------------------------------------------------------------------
// Binaries and commands

/// Orders a test against a cell running on an engine of this host by explicit signals: the
/// cell's code from [`Gate::hold`] says it started, then waits (at most 120 s) until the test
/// [`Gate::open`]s the gate.
pub struct Gate {
    dir: tempfile::TempDir,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate { dir: tempfile::tempdir().expect("a private directory for the gate") }
    }

    /// Code for a cell: signal "started", then wait for the gate to open.
    pub fn hold(&self) -> String {
        let started = self.dir.path().join("started");
        let open = self.dir.path().join("open");
        format!(
            "std::fs::write({started:?}, b\"\").unwrap(); \
             let t0 = std::time::Instant::now(); \
             while !std::path::Path::new({open:?}).exists() && t0.elapsed() < std::time::Duration::from_secs(120) {{ std::thread::sleep(std::time::Duration::from_millis(5)); }}"
        )
    }

    /// Wait (at most 120 s) until the cell said it started.
    pub fn wait_started(&self) {
        let started = self.dir.path().join("started");
        assert!(
            poll(Duration::from_secs(120), Duration::from_millis(5), || started.exists().then_some(())).is_some(),
            "the cell never started"
        );
    }

    pub fn open(&self) {
        std::fs::write(self.dir.path().join("open"), b"").expect("open the gate");
    }

    /// The gate's directory (for code that writes `started` and waits for `open` itself).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Call `f` every `every` until it gives `Some` or `limit` has passed (then `None`): the one
/// bounded wait of the tests for a state they cannot be told about.
pub fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where the binaries are: `$RPX_BIN_DIR`, else `$CARGO_TARGET_DIR/release`, else
/// `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RPX_BIN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() { d.join("release") } else { workspace_root().join(d).join("release") };
    }
    workspace_root().join("target/release")
}

/// The path of a release binary; panics if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing: run `cargo build --release` first", p.display());
    p
}

/// Run `cmd` to completion within `limit`, capturing stdout and stderr; kill it on timeout
/// and panic with what it printed.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A daemonizing command may leave the pipes open in children that forgot to close them;
    // do not wait forever for EOF.
    let stdout = join_limited(t_out, Duration::from_secs(5));
    let stderr = join_limited(t_err, Duration::from_secs(5));
    Output { status, stdout, stderr }
}

fn join_limited(h: std::thread::JoinHandle<Vec<u8>>, limit: Duration) -> Vec<u8> {
    let end = Instant::now() + limit;
    while !h.is_finished() {
        if Instant::now() >= end {
            return b"<output pipe still open: some child kept it>".to_vec();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap_or_default()
}

/// stdout + stderr of an output, for assertion messages.
pub fn show(o: &Output) -> String {
    format!("status: {}\n--- stdout:\n{}--- stderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A live process found in `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub cmdline: String,
}

/// Live (non-zombie) processes, other than this one, whose command line or environment
/// contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<ProcInfo> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
        if matches!(state.as_deref(), Some("Z") | Some("X") | None) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let hit = |b: &[u8]| b.windows(needle.len().max(1)).any(|w| w == needle.as_bytes());
        if hit(&cmdline) || hit(&environ) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string();
            out.push(ProcInfo { pid, cmdline });
        }
    }
    out
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Wait up to `limit` until no process mentions `needle`; returns the survivors.
pub fn wait_no_process_mentioning(needle: &str, limit: Duration) -> Vec<ProcInfo> {
    let end = Instant::now() + limit;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters

/// A cluster started with `ipcluster start -n N --daemonize` under a private `RPX_DIR`.
/// Dropping it runs `ipcluster stop`, then SIGKILLs whatever is left.
pub struct TestCluster {
    dir: tempfile::TempDir,
    pub profile: String,
    pub n: usize,
}

impl TestCluster {
    /// A private `RPX_DIR` without a cluster yet.
    pub fn empty() -> TestCluster {
        let dir = tempfile::Builder::new().prefix("rpx-test-").tempdir().expect("temp dir");
        TestCluster { dir, profile: "default".into(), n: 0 }
    }

    /// [`TestCluster::empty`] with its private `RPX_DIR` (mode 0700) under `parent`: e.g.
    /// `/var/tmp`, which test hosts see (they hide `/tmp`), for batch jobs whose output files
    /// the nodes write into the profile's log directory.
    pub fn empty_in(parent: &Path) -> TestCluster {
        let dir = tempfile::Builder::new().prefix("rpx-test-").tempdir_in(parent).expect("temp dir");
        TestCluster { dir, profile: "default".into(), n: 0 }
    }

    /// Start N engines and wait until they are registered; panics with ipcluster's output if
    /// it fails.
    pub fn start(n: usize) -> TestCluster {
        TestCluster::start_with(n, &[])
    }

    /// [`TestCluster::start`] with more `ipcluster start` options (e.g. `--no-restart`).
    pub fn start_with(n: usize, extra: &[&str]) -> TestCluster {
        let mut c = TestCluster::empty();
        c.n = n;
        let count = n.to_string();
        let mut args = vec!["start", "-n", &count, "--daemonize", "--timeout", "120"];
        args.extend_from_slice(extra);
        let out = c.ipcluster(&args);
        assert!(out.status.success(), "ipcluster start -n {n} --daemonize {extra:?} failed\n{}", show(&out));
        c
    }

    pub fn rpx_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ipcluster` with this cluster's `RPX_DIR`, as a command to adjust.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("ipcluster"));
        cmd.args(args).env("RPX_DIR", self.rpx_dir()).env_remove("RPX_PROFILE");
        cmd
    }

    /// Run `ipcluster ARGS` (limit 3 min).
    pub fn ipcluster(&self, args: &[&str]) -> Output {
        run(&mut self.command(args), Duration::from_secs(180))
    }

    pub fn profile(&self) -> Profile {
        Profile { name: self.profile.clone(), dir: self.rpx_dir().join(format!("profile_{}", self.profile)), cluster_id: String::new() }
    }

    pub fn client_file(&self) -> PathBuf {
        self.profile().client_file()
    }

    /// The cluster file as JSON, if present.
    pub fn cluster_state(&self) -> Option<Value> {
        read_json(&self.profile().cluster_file()).ok()
    }

    /// A protocol client connected to this cluster.
    pub fn client(&self) -> Client {
        Client::connect(&self.client_file(), Duration::from_secs(30)).expect("connect to the test cluster")
    }

    /// Live processes that mention this cluster's `RPX_DIR`.
    pub fn processes(&self) -> Vec<ProcInfo> {
        processes_mentioning(&self.rpx_dir().to_string_lossy())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let pids: Vec<i64> = self
            .cluster_state()
            .map(|s| {
                let mut v = vec![s["controller_pid"].as_i64().unwrap_or(0), s["compiler_pid"].as_i64().unwrap_or(0)];
                v.extend(s["engines"].as_array().into_iter().flatten().map(|e| e["pid"].as_i64().unwrap_or(0)));
                v
            })
            .unwrap_or_default();
        if self.profile().cluster_file().exists() {
            let mut cmd = self.command(&["stop"]);
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        for pid in pids.into_iter().filter(|p| *p > 1) {
            kill(-(pid as i32), libc::SIGKILL);
            kill(pid as i32, libc::SIGKILL);
        }
        for p in self.processes() {
            kill(p.pid as i32, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Protocol client

/// What one engine did for one `execute_request`.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub engine_id: u64,
    pub msg_id: String,
    /// `ok`, `error` or `aborted`; empty if no reply came.
    pub status: String,
    /// The `execute_reply` content.
    pub reply: Value,
    pub reply_metadata: Value,
    pub stdout: String,
    pub stderr: String,
    /// `data` of each `execute_result`.
    pub results: Vec<Value>,
    /// Content of each iopub `error`.
    pub errors: Vec<Value>,
    /// Whether iopub `status: idle` for this request arrived.
    pub idle: bool,
    /// `header.date` of each iopub `stream` message, in arrival order.
    pub stream_dates: Vec<String>,
    /// `header.date` of the `execute_reply`.
    pub reply_date: String,
}

impl ExecOutput {
    /// `text/plain` of the first execute_result.
    pub fn result_text(&self) -> Option<&str> {
        self.results.first().and_then(|d| d.get("text/plain")).and_then(Value::as_str)
    }
}

/// A minimal synchronous client: query (registration), mux and control DEALERs and an iopub SUB.
pub struct Client {
    rt: tokio::runtime::Runtime,
    pub session: Session,
    pub conn: ClientConnection,
    query: DealerSocket,
    mux: DealerSocket,
    control: DealerSocket,
    iopub: SubSocket,
    engines: BTreeMap<u64, String>,
    /// How long to keep waiting for iopub `idle` after a reply arrived.
    pub idle_grace: Duration,
}

fn dealer(rt: &tokio::runtime::Runtime, url: &str, limit: Duration) -> anyhow::Result<DealerSocket> {
    let mut opts = SocketOptions::default();
    opts.connect_timeout(limit);
    let mut s = DealerSocket::with_options(opts);
    rt.block_on(tokio::time::timeout(limit, s.connect(url)))
        .map_err(|_| anyhow!("timed out connecting to {url}"))?
        .with_context(|| format!("connect {url}"))?;
    Ok(s)
}

impl Client {
    /// Connect to the controller described by a client connection file.
    pub fn connect(client_file: &Path, limit: Duration) -> anyhow::Result<Client> {
        let conn: ClientConnection = read_json(client_file).with_context(|| format!("read {}", client_file.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // zeromq sockets spawn tasks when created: create them inside the runtime.
        let _guard = rt.enter();
        let query = dealer(&rt, &conn.url(conn.registration), limit)?;
        let mux = dealer(&rt, &conn.url(conn.mux), limit)?;
        let control = dealer(&rt, &conn.url(conn.control), limit)?;
        let mut iopub = SubSocket::new();
        let url = conn.url(conn.iopub);
        rt.block_on(async {
            tokio::time::timeout(limit, iopub.connect(&url)).await.map_err(|_| anyhow!("timed out connecting to {url}"))??;
            iopub.subscribe("").await?;
            // Let the subscription reach the publisher before anything is sent.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, anyhow::Error>(())
        })?;
        let session = Session::new(conn.key.as_bytes(), "rpx-tests");
        drop(_guard);
        Ok(Client { rt, session, conn, query, mux, control, iopub, engines: BTreeMap::new(), idle_grace: Duration::from_secs(3) })
    }

    /// Send a message on the query socket and wait for the reply to it.
    pub fn query(&mut self, msg_type: &str, content: Value, limit: Duration) -> anyhow::Result<Message> {
        let (header, frames) = self.session.msg(&[], msg_type, content, None, json!({}), &[]);
        request(&self.rt, &self.session, &mut self.query, header.msg_id, frames, limit)
    }

    /// Send a message to one engine on the control channel and wait for its reply.
    pub fn control(&mut self, engine_id: u64, msg_type: &str, content: Value, limit: Duration) -> anyhow::Result<Message> {
        let uuid = self.uuid(engine_id)?;
        let (header, frames) = self.session.msg(&[Bytes::from(uuid)], msg_type, content, None, json!({}), &[]);
        request(&self.rt, &self.session, &mut self.control, header.msg_id, frames, limit)
    }

    /// `connection_request`: registered engines, id -> uuid.
    pub fn connection_request(&mut self) -> anyhow::Result<BTreeMap<u64, String>> {
        let m = self.query("connection_request", json!({}), Duration::from_secs(10))?;
        let mut out = BTreeMap::new();
        for (k, v) in m.content["engines"].as_object().ok_or_else(|| anyhow!("connection_reply without engines: {}", m.content))? {
            out.insert(k.parse()?, v.as_str().unwrap_or_default().to_string());
        }
        self.engines = out.clone();
        Ok(out)
    }

    /// Registered engine ids, sorted.
    pub fn ids(&mut self) -> anyhow::Result<Vec<u64>> {
        Ok(self.connection_request()?.into_keys().collect())
    }

    /// Wait until at least `n` engines are registered.
    pub fn wait_for_engines(&mut self, n: usize, limit: Duration) -> anyhow::Result<Vec<u64>> {
        let end = Instant::now() + limit;
        loop {
            let ids = self.ids()?;
            if ids.len() >= n {
                return Ok(ids);
            }
            if Instant::now() >= end {
                bail!("only {} of {n} engines registered within {limit:?}", ids.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `queue_request` for some engines (or all with `None`).
    pub fn queue_request(&mut self, targets: Option<&[u64]>) -> anyhow::Result<Value> {
        let m = self.query("queue_request", json!({"targets": targets, "verbose": false}), Duration::from_secs(10))?;
        Ok(m.content)
    }

    fn uuid(&mut self, engine_id: u64) -> anyhow::Result<String> {
        if !self.engines.contains_key(&engine_id) {
            self.connection_request()?;
        }
        self.engines
            .get(&engine_id)
            .cloned()
            .ok_or_else(|| anyhow!("engine {engine_id} is not registered (have {:?})", self.engines.keys()))
    }

    /// Run `code` on one engine.
    pub fn execute_one(&mut self, engine_id: u64, code: &str, limit: Duration) -> anyhow::Result<ExecOutput> {
        Ok(self.execute(&[engine_id], code, limit)?.remove(0))
    }

    /// Run `code` on each engine of `targets` (direct, through mux) and collect each engine's
    /// reply and iopub output, in the order of `targets`. Fails if a reply does not arrive
    /// within `limit`.
    pub fn execute(&mut self, targets: &[u64], code: &str, limit: Duration) -> anyhow::Result<Vec<ExecOutput>> {
        let codes: Vec<(u64, String)> = targets.iter().map(|t| (*t, code.to_string())).collect();
        self.execute_each(&codes, limit)
    }

    /// Like [`Client::execute`] with a different cell per engine.
    pub fn execute_each(&mut self, cells: &[(u64, String)], limit: Duration) -> anyhow::Result<Vec<ExecOutput>> {
        let mut outs: Vec<ExecOutput> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut frames_out = Vec::new();
        for (engine_id, code) in cells {
            let uuid = self.uuid(*engine_id)?;
            let content = json!({"code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
            let (header, frames) = self.session.msg(&[Bytes::from(uuid)], "execute_request", content, None, json!({}), &[]);
            by_id.insert(header.msg_id.clone(), outs.len());
            outs.push(ExecOutput { engine_id: *engine_id, msg_id: header.msg_id, ..Default::default() });
            frames_out.push(frames);
        }
        let deadline = Instant::now() + limit;
        let grace = self.idle_grace;
        let (session, mux, iopub) = (&self.session, &mut self.mux, &mut self.iopub);
        self.rt.block_on(async {
            for frames in frames_out {
                send_bounded(mux, frames, deadline).await?;
            }
            let mut replies_done_at: Option<Instant> = None;
            loop {
                let all_replied = outs.iter().all(|o| !o.status.is_empty());
                let all_idle = outs.iter().all(|o| o.idle);
                if all_replied && all_idle {
                    return Ok(());
                }
                if all_replied && replies_done_at.is_none() {
                    replies_done_at = Some(Instant::now());
                }
                let wait_until = match replies_done_at {
                    Some(t) => t + grace,
                    None => deadline,
                };
                if Instant::now() >= wait_until {
                    if all_replied {
                        return Ok(()); // replies are in; iopub idle never came
                    }
                    let missing: Vec<u64> = outs.iter().filter(|o| o.status.is_empty()).map(|o| o.engine_id).collect();
                    bail!("no execute_reply from engine(s) {missing:?} within {limit:?}");
                }
                tokio::select! {
                    m = mux.recv() => {
                        let m = m.map_err(|e| anyhow!("mux recv: {e}"))?;
                        let Ok(msg) = session.decode(rpx_guard::zmq::frames(m)) else { continue };
                        if let Some(&i) = msg.parent_msg_id().and_then(|p| by_id.get(p)) {
                            let o = &mut outs[i];
                            o.status = msg.content_str("status").unwrap_or("unknown").to_string();
                            o.reply_date = msg.header.date.clone();
                            o.reply = msg.content;
                            o.reply_metadata = msg.metadata;
                        }
                    }
                    m = iopub.recv() => {
                        let m = m.map_err(|e| anyhow!("iopub recv: {e}"))?;
                        let Ok(msg) = session.decode(rpx_guard::zmq::frames(m)) else { continue };
                        if let Some(&i) = msg.parent_msg_id().and_then(|p| by_id.get(p)) {
                            let o = &mut outs[i];
                            match msg.msg_type() {
                                "stream" => {
                                    o.stream_dates.push(msg.header.date.clone());
                                    let text = msg.content_str("text").unwrap_or_default().to_string();
                                    if msg.content_str("name") == Some("stderr") { o.stderr.push_str(&text) } else { o.stdout.push_str(&text) }
                                }
                                "execute_result" => o.results.push(msg.content["data"].clone()),
                                "error" => o.errors.push(msg.content.clone()),
                                "status" if msg.content_str("execution_state") == Some("idle") => o.idle = true,
                                _ => {}
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(wait_until.into()) => {}
                }
            }
        })?;
        Ok(outs)
    }
}

async fn send_bounded(sock: &mut DealerSocket, frames: Vec<Bytes>, deadline: Instant) -> anyhow::Result<()> {
    tokio::time::timeout_at(deadline.into(), sock.send(rpx_guard::zmq::message(frames)))
        .await
        .map_err(|_| anyhow!("timed out sending"))?
        .map_err(|e| anyhow!("send failed: {e}"))
}

fn request(
    rt: &tokio::runtime::Runtime,
    session: &Session,
    sock: &mut DealerSocket,
    msg_id: String,
    frames: Vec<Bytes>,
    limit: Duration,
) -> anyhow::Result<Message> {
    let deadline = Instant::now() + limit;
    rt.block_on(async {
        send_bounded(sock, frames, deadline).await?;
        loop {
            let m = tokio::time::timeout_at(deadline.into(), sock.recv())
                .await
                .map_err(|_| anyhow!("no reply to {msg_id} within {limit:?}"))?
                .map_err(|e| anyhow!("recv: {e}"))?;
            let Ok(msg) = session.decode(rpx_guard::zmq::frames(m)) else { continue };
            if msg.parent_msg_id() == Some(msg_id.as_str()) {
                return Ok(msg);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_processes_by_environment() {
        let tag = format!("rpx-tests-marker-{}", std::process::id());
        let mut child = Command::new("sleep").arg("30").env("RPX_DIR", &tag).spawn().unwrap();
        let found = wait_until_found(&tag);
        assert!(found.iter().any(|p| p.pid == child.id()), "{found:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(wait_no_process_mentioning(&tag, Duration::from_secs(5)).is_empty());
    }

    fn wait_until_found(tag: &str) -> Vec<ProcInfo> {
        for _ in 0..100 {
            let v = processes_mentioning(tag);
            if !v.is_empty() {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Vec::new()
    }

    #[test]
    fn run_captures_output_and_status() {
        let o = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }
}
