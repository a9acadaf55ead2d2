//! [`Client`]: the connection to a cluster's controller. Finds the connection file, starts the
//! client's sockets (`crate::io`), keeps the live engine ids current, makes views, and sends the hub and control
//! requests (queue status, abort, signals, shutdown, history).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use rpx_protocol::connection::{default_profile_name, read_json};
use rpx_protocol::{ClientConnection, Profile, Session};

use rpx_protocol::apply::Closure;

use crate::closures::MakeOp;
use crate::error::{combine_engine_errors, Error, RemoteError, Result};
use crate::io::{Chan, Frames, Io, IoRequest, MsgIds, Outgoing};
use crate::result::{AsyncMapResult, AsyncResult};
use crate::targets::{TargetError, TargetSpec, Targets};
use crate::tracker::{Outcome, ReplyData, TaskState, Tracker};
use crate::view::{DirectView, LoadBalancedView};

/// How long the connection file may take to appear.
const FILE_WAIT: Duration = Duration::from_secs(2);
/// How long connecting and the first `connection_request` may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Limit for hub queries and control requests.
const QUERY_LIMIT: Duration = Duration::from_secs(10);
/// Load-balanced tasks of one submission in the first piece handed to the dispatcher (see
/// [`ClientInner::tasks`]), and in each piece after it.
const FIRST_PIECE: usize = 32;
const PIECE: usize = 512;

pub(crate) struct ClientInner {
    pub io: Io,
    pub session: Session,
    pub ids: Arc<MsgIds>,
    pub file: PathBuf,
    /// Hand values to same-host engines as files, and stream them over data links to engines
    /// on other hosts ([`Client::set_shared_memory`]).
    pub shared_memory: std::sync::atomic::AtomicBool,
    /// Engine uuid -> whether its data link can be reached from here (`crate::datalink`).
    pub links: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// Same-host engines' spares mapped ahead of the pushes that write over them.
    pub premaps: crate::premap::Premaps,
}

impl ClientInner {
    pub fn ids(&self) -> Vec<usize> {
        self.io.shared.ids()
    }

    /// Resolve a target selection against the live engines, with their uuids.
    pub fn resolve(&self, spec: &TargetSpec) -> Result<Vec<(usize, String)>> {
        let ids = spec.resolve(&self.ids())?;
        ids.into_iter()
            .map(|id| {
                self.io
                    .shared
                    .uuid(id)
                    .map(|u| (id, u))
                    .ok_or_else(|| Error::Targets(TargetError::NoSuchEngine { requested: id as i64, ids: self.ids() }))
            })
            .collect()
    }

    fn tracker(&self, tasks: Vec<TaskState>, needs_idle: bool) -> Arc<Tracker> {
        Tracker::new(tasks, needs_idle, Some(self.io.shared.clone()))
    }

    /// Send one message per engine (`mux` or `control`), each with its own buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn direct(
        &self,
        chan: Chan,
        msg_type: &str,
        metadata: &Value,
        content: &Value,
        targets: &[(usize, String)],
        buffers: Vec<Vec<Bytes>>,
        needs_idle: bool,
    ) -> Result<Arc<Tracker>> {
        let frames = Frames::new(&self.session, &self.ids, metadata, content);
        self.direct_frames(chan, msg_type, targets, buffers.into_iter().map(|b| (&frames, b)).collect(), needs_idle)
    }

    /// Closure calls of `code` under `op` on each engine, each with its own buffers; the
    /// closure is named by id once this client has seen it compile (`crate::closures`).
    pub fn direct_calls(&self, targets: &[(usize, String)], code: Closure, op: MakeOp, buffers: Vec<Vec<Bytes>>) -> Result<Arc<Tracker>> {
        let frames = self.call_frames(&json!({}), code, op);
        self.direct_frames(Chan::Mux, "apply_request", targets, buffers.into_iter().map(|b| (&frames, b)).collect(), false)
    }

    /// The frames of closure calls of `code` under `op` with `metadata` (`crate::closures`).
    pub fn call_frames(&self, metadata: &Value, code: Closure, op: MakeOp) -> Frames {
        crate::closures::call_frames(&self.io.shared.compiled, &self.session, &self.ids, metadata, code, op)
    }

    /// [`ClientInner::direct`] with a content of its own for each engine (same-host transfers
    /// name each engine's files).
    pub fn direct_each(
        &self,
        chan: Chan,
        msg_type: &str,
        targets: &[(usize, String)],
        parts: crate::dataplane::Parts,
        needs_idle: bool,
    ) -> Result<Arc<Tracker>> {
        let md = json!({});
        let frames: Vec<(Frames, Vec<Bytes>)> =
            parts.into_iter().map(|(content, b)| (Frames::new(&self.session, &self.ids, &md, &content), b)).collect();
        self.direct_frames(chan, msg_type, targets, frames.iter().map(|(f, b)| (f, b.clone())).collect(), needs_idle)
    }

    fn direct_frames(
        &self,
        chan: Chan,
        msg_type: &str,
        targets: &[(usize, String)],
        each: Vec<(&Frames, Vec<Bytes>)>,
        needs_idle: bool,
    ) -> Result<Arc<Tracker>> {
        let mut tasks = Vec::with_capacity(targets.len());
        let mut msgs = Vec::with_capacity(targets.len());
        for ((id, uuid), (frames, bufs)) in targets.iter().zip(each) {
            let (msg_id, f) = frames.build(msg_type, Some(uuid), &bufs);
            tasks.push(TaskState::new(msg_id.clone(), Some(*id), frames.date().to_string()));
            msgs.push((msg_id, f, frames.closure_call(chan, Some(uuid), &bufs)));
        }
        let tracker = self.tracker(tasks, needs_idle);
        let out = msgs
            .into_iter()
            .enumerate()
            .map(|(idx, (msg_id, frames, closure))| Outgoing { chan, frames, msg_id, tracker: tracker.clone(), idx, closure })
            .collect();
        self.io.send(IoRequest::Submit(out))?;
        Ok(tracker)
    }

    /// Submit load-balanced tasks (one per buffer list) on the `task` socket.
    pub fn tasks(&self, frames: &Frames, buffers: Vec<Vec<Bytes>>) -> Result<Arc<Tracker>> {
        let ids: Vec<String> = buffers.iter().map(|_| frames.next_id()).collect();
        let tasks = ids.iter().map(|id| TaskState::new(id.clone(), None, frames.date().to_string())).collect();
        let tracker = self.tracker(tasks, false);
        // Signed and handed to the dispatcher in pieces, the first one small: the engines start
        // on it while this thread signs the rest, instead of idling until all are signed.
        let mut pending = ids.into_iter().zip(buffers).enumerate().peekable();
        let mut piece = FIRST_PIECE;
        while pending.peek().is_some() {
            let out = pending
                .by_ref()
                .take(piece)
                .map(|(idx, (msg_id, bufs))| Outgoing {
                    chan: Chan::Task,
                    frames: frames.build_as(msg_id.clone(), "apply_request", None, &bufs),
                    msg_id,
                    tracker: tracker.clone(),
                    idx,
                    closure: frames.closure_call(Chan::Task, None, &bufs),
                })
                .collect();
            self.io.send(IoRequest::Submit(out))?;
            piece = PIECE;
        }
        Ok(tracker)
    }

    /// One more task for an open tracker (`imap`).
    pub fn task_into(&self, tracker: &Arc<Tracker>, frames: &Frames, buffers: &[Bytes]) -> Result<()> {
        let (msg_id, f) = frames.build("apply_request", None, buffers);
        let idx = tracker.push(TaskState::new(msg_id.clone(), None, frames.date().to_string()));
        let closure = frames.closure_call(Chan::Task, None, buffers);
        self.io.send(IoRequest::Submit(vec![Outgoing { chan: Chan::Task, frames: f, msg_id, tracker: tracker.clone(), idx, closure }]))
    }

    /// A hub query on the registration socket; the reply, or an error.
    pub fn query(&self, msg_type: &str, content: Value, limit: Duration) -> Result<ReplyData> {
        let frames = Frames::new(&self.session, &self.ids, &json!({}), &content);
        let (msg_id, f) = frames.build(msg_type, None, &[]);
        let tracker = self.tracker(vec![TaskState::new(msg_id.clone(), None, frames.date().to_string())], false);
        self.io.send(IoRequest::Submit(vec![Outgoing {
            chan: Chan::Query,
            frames: f,
            msg_id,
            tracker: tracker.clone(),
            idx: 0,
            closure: None,
        }]))?;
        if !tracker.wait_complete(Some(Instant::now() + limit)) {
            return Err(Error::Timeout(format!("the controller did not answer a {msg_type} within {limit:?}")));
        }
        let s = tracker.lock();
        match &s.tasks[0].outcome {
            Some(Outcome::Reply(r)) if r.status == "ok" => Ok(r.clone()),
            Some(Outcome::Reply(r)) => Err(RemoteError::from_reply(&r.content, None).into()),
            Some(Outcome::Lost(why)) => Err(Error::Connection(why.clone())),
            None => Err(Error::Protocol(format!("no reply to {msg_type}"))),
        }
    }

    /// A control request to each engine; waits for every reply (bounded).
    pub fn control(&self, targets: &[(usize, String)], msg_type: &str, content: Value, limit: Duration) -> Result<()> {
        let tracker = self.direct(Chan::Control, msg_type, &json!({}), &content, targets, vec![Vec::new(); targets.len()], false)?;
        if !tracker.wait_complete(Some(Instant::now() + limit)) {
            let s = tracker.lock();
            let missing: Vec<usize> = s.tasks.iter().filter(|t| t.outcome.is_none()).filter_map(|t| t.engine_id).collect();
            return Err(Error::Timeout(format!("engines {missing:?} did not answer the {msg_type} within {limit:?}")));
        }
        let s = tracker.lock();
        let mut failed = Vec::new();
        for t in &s.tasks {
            match &t.outcome {
                Some(Outcome::Reply(r)) if r.status == "ok" => {}
                Some(Outcome::Reply(r)) => {
                    failed.push(RemoteError::from_reply(&r.content, t.engine_id).with_output(&t.io.stdout, &t.io.stderr))
                }
                Some(Outcome::Lost(why)) => return Err(Error::Connection(why.clone())),
                None => {}
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            let outputs = s
                .tasks
                .iter()
                .map(|t| crate::result::TaskOutput {
                    msg_id: t.msg_id.clone(),
                    engine_id: t.engine_id,
                    stdout: t.io.stdout.clone(),
                    stderr: t.io.stderr.clone(),
                })
                .collect();
            Err(combine_engine_errors(failed, s.tasks.len(), outputs))
        }
    }

    /// An already-complete, empty map (nothing is sent).
    pub fn empty_map<R>(&self, ordered: bool) -> AsyncMapResult<R> {
        AsyncMapResult::new(self.tracker(Vec::new(), false), Vec::new(), Vec::new(), |_, _| None, 0, ordered)
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.io.close();
    }
}

/// Load per engine, from [`Client::queue_status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineQueue {
    /// Direct requests waiting or running on the engine.
    pub queue: usize,
    /// Requests the engine has completed.
    pub completed: usize,
    /// Load-balanced tasks assigned to the engine and not finished.
    pub tasks: usize,
}

/// The controller's view of the queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStatus {
    pub engines: BTreeMap<usize, EngineQueue>,
    /// Load-balanced tasks not yet assigned to an engine.
    pub unassigned: usize,
}

impl QueueStatus {
    /// Completed requests over all engines.
    pub fn completed(&self) -> usize {
        self.engines.values().map(|e| e.completed).sum()
    }

    /// Requests queued or running anywhere (direct, load-balanced, unassigned).
    pub fn pending(&self) -> usize {
        self.unassigned + self.engines.values().map(|e| e.queue + e.tasks).sum::<usize>()
    }
}

/// Work that can be aborted or depended on: anything that knows its msg_ids.
pub trait Jobs {
    fn job_ids(&self) -> Vec<String>;
}

impl<T> Jobs for AsyncResult<T> {
    fn job_ids(&self) -> Vec<String> {
        self.msg_ids()
    }
}

impl<R> Jobs for AsyncMapResult<R> {
    fn job_ids(&self) -> Vec<String> {
        self.msg_ids()
    }
}

impl Jobs for str {
    fn job_ids(&self) -> Vec<String> {
        vec![self.to_string()]
    }
}

impl Jobs for String {
    fn job_ids(&self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl Jobs for [String] {
    fn job_ids(&self) -> Vec<String> {
        self.to_vec()
    }
}

impl Jobs for Vec<String> {
    fn job_ids(&self) -> Vec<String> {
        self.clone()
    }
}

impl<J: Jobs + ?Sized> Jobs for &J {
    fn job_ids(&self) -> Vec<String> {
        (**self).job_ids()
    }
}

/// A signal for [`Client::send_signal`]: a number (`2`) or a name (`"SIGINT"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Number(i32),
    Name(String),
}

impl From<i32> for Signal {
    fn from(n: i32) -> Signal {
        Signal::Number(n)
    }
}

impl From<&str> for Signal {
    fn from(s: &str) -> Signal {
        Signal::Name(s.to_string())
    }
}

/// A connection to an rpx (or ipyparallel 9) controller.
///
/// Cheap to clone; the connection (and its threads) closes when the client and every view
/// made from it are dropped. Requests still pending then fail with [`Error::Connection`].
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("file", &self.inner.file).field("ids", &self.ids()).finish()
    }
}

impl Client {
    /// Connect to the cluster of the profile named by `RPX_PROFILE` (default `default`).
    pub fn connect() -> Result<Client> {
        Client::connect_profile(&default_profile_name())
    }

    /// Connect to the default cluster of profile `name` (under `$RPX_DIR`, default `~/.rpx`).
    pub fn connect_profile(name: &str) -> Result<Client> {
        Client::from_file(Profile::new(name, "").client_file())
    }

    /// Connect with a client connection file (`ipcontroller-client.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref().to_path_buf();
        let end = Instant::now() + FILE_WAIT;
        while !path.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !path.exists() {
            return Err(Error::Connection(format!(
                "no connection file at {}: is a cluster running? Start one with `ipcluster start -n 4 --daemonize` (or pick another profile with RPX_PROFILE)",
                path.display()
            )));
        }
        let conn: ClientConnection =
            read_json(&path).map_err(|e| Error::Connection(format!("cannot read the connection file {}: {e}", path.display())))?;
        Client::from_connection(&conn, path)
    }

    /// Connect with connection info already read.
    pub fn from_connection(conn: &ClientConnection, file: PathBuf) -> Result<Client> {
        if conn.signature_scheme != "hmac-sha256" {
            return Err(Error::Connection(format!("unsupported signature scheme {:?} (rpx speaks hmac-sha256)", conn.signature_scheme)));
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "rpx".into());
        let session = Session::new(conn.key.as_bytes(), &user);
        let ids = Arc::new(MsgIds::new(&session));
        let io = Io::start(conn, session.clone(), ids.clone(), CONNECT_LIMIT)?;
        let client = Client {
            inner: Arc::new(ClientInner {
                io,
                session,
                ids,
                file,
                shared_memory: (!rpx_protocol::dataplane::buffers_forced()).into(),
                links: Default::default(),
                premaps: Default::default(),
            }),
        };
        client.inner.query("connection_request", json!({}), CONNECT_LIMIT)?;
        Ok(client)
    }

    /// The connection file this client was made from.
    pub fn connection_file(&self) -> &Path {
        &self.inner.file
    }

    /// Whether `push`, `pull`, `scatter` and `gather` may hand values to engines on this host as
    /// files in their namespace (shared memory) instead of message buffers through the
    /// controller, and stream values of 1 MiB or more straight to engines on other hosts over
    /// their data links. On by default; off when `RPX_DATA_PLANE=buffers` is set. Engines that
    /// cannot be verified as this host's and have no reachable link get buffers.
    pub fn set_shared_memory(&self, on: bool) {
        self.inner.shared_memory.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The engines this client hands values to through shared memory right now, with their
    /// namespace directories (empty when [`Client::set_shared_memory`] turned it off).
    pub fn shared_memory_namespaces(&self) -> BTreeMap<usize, PathBuf> {
        let engines = self.inner.io.shared.table().by_id.clone();
        engines.into_iter().filter_map(|(id, uuid)| Some((id, self.inner.local_namespace(&uuid)?))).collect()
    }

    /// The engines on other hosts this client streams large values to over their data links
    /// right now, with the links' addresses (empty when [`Client::set_shared_memory`] turned
    /// the data plane off). Finding out whether a link is reachable connects to it once.
    pub fn data_links(&self) -> BTreeMap<usize, std::net::SocketAddr> {
        let engines = self.inner.io.shared.table().by_id.clone();
        engines.into_iter().filter_map(|(id, uuid)| Some((id, self.inner.link_address(&uuid)?))).collect()
    }

    /// Ids of the live engines, ascending (kept current from the controller's notifications).
    pub fn ids(&self) -> Vec<usize> {
        self.inner.ids()
    }

    /// Wait until at least `n` engines are registered; their ids. Fails with [`Error::Timeout`]
    /// (saying how many are up) after `timeout`, or at once if the controller is gone.
    pub fn wait_for_engines(&self, n: usize, timeout: Duration) -> Result<Vec<usize>> {
        let shared = &self.inner.io.shared;
        let end = Instant::now() + timeout;
        let mut next_refresh = Instant::now() + Duration::from_millis(500);
        let mut table = shared.table();
        loop {
            if table.by_id.len() >= n {
                return Ok(table.by_id.keys().copied().collect());
            }
            if let Some(why) = shared.lost() {
                return Err(Error::Connection(why));
            }
            let now = Instant::now();
            if now >= end {
                let up = table.by_id.len();
                return Err(Error::Timeout(format!(
                    "only {up} of {n} engines are registered after {timeout:?} (ids {:?}); start more with `ipcluster engines -n {}` or wait longer",
                    table.by_id.keys().collect::<Vec<_>>(),
                    n - up
                )));
            }
            if now >= next_refresh {
                // Notifications are the fast path; a periodic refresh covers a missed one.
                let _ = self.inner.io.send(IoRequest::Refresh);
                next_refresh = now + Duration::from_secs(1);
            }
            let wait = (end.min(next_refresh)).saturating_duration_since(now).max(Duration::from_millis(1));
            table = shared.engines_cv.wait_timeout(table, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A load-balanced view over all engines (the same as [`Client::load_balanced_view`]).
    pub fn view(&self) -> LoadBalancedView {
        self.load_balanced_view()
    }

    /// A load-balanced view over all engines: the scheduler picks an engine for each task.
    pub fn load_balanced_view(&self) -> LoadBalancedView {
        LoadBalancedView::new(self.inner.clone())
    }

    /// A direct view on `targets` (see [`Targets`]): `..` is every engine, resolved at each call.
    pub fn direct_view(&self, targets: impl Targets) -> DirectView {
        DirectView::new(self.inner.clone(), targets.to_spec())
    }

    /// The controller's queue counts per engine, plus unassigned load-balanced tasks.
    pub fn queue_status(&self) -> Result<QueueStatus> {
        let r = self.inner.query("queue_request", json!({"targets": Value::Null, "verbose": false}), QUERY_LIMIT)?;
        let mut out = QueueStatus::default();
        let Some(obj) = r.content.as_object() else { return Err(Error::Protocol("queue_reply is not an object".into())) };
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        for (k, v) in obj {
            if k == "unassigned" {
                out.unassigned = v.as_u64().unwrap_or(0) as usize;
            } else if let Ok(id) = k.parse::<usize>() {
                out.engines.insert(id, EngineQueue { queue: n(v, "queue"), completed: n(v, "completed"), tasks: n(v, "tasks") });
            }
        }
        Ok(out)
    }

    /// Every msg_id the controller has recorded, in submission order (its records are bounded).
    pub fn hub_history(&self) -> Result<Vec<String>> {
        let r = self.inner.query("history_request", json!({}), QUERY_LIMIT)?;
        Ok(rpx_protocol::hub::HistoryReply::read_history(&r.content))
    }

    /// Abort the unfinished tasks of `jobs` that have not started yet: they fail with
    /// [`crate::RemoteErrorKind::Aborted`]. Running tasks are not interrupted (see
    /// [`Client::send_signal`]). An engine hands its worker the next few queued calls of the
    /// closure it is running ahead of time; those count as started.
    pub fn abort<J: Jobs + ?Sized>(&self, jobs: &J) -> Result<()> {
        let ids = jobs.job_ids();
        if ids.is_empty() {
            return Ok(());
        }
        let targets = self.inner.resolve(&TargetSpec::All)?;
        self.inner.control(&targets, "abort_request", json!({"msg_ids": ids}), QUERY_LIMIT)
    }

    /// Send a signal to the code running on `targets` (e.g. `2` / `"SIGINT"` to interrupt it).
    pub fn send_signal(&self, sig: impl Into<Signal>, targets: impl Targets) -> Result<()> {
        let sig = match sig.into() {
            Signal::Number(n) => json!(n),
            Signal::Name(s) => json!(s),
        };
        let targets = self.inner.resolve(&targets.to_spec()?)?;
        self.inner.control(&targets, "signal_request", json!({"sig": sig}), QUERY_LIMIT)
    }

    /// Reset the engines' state (their workers restart with no variables).
    pub fn clear(&self, targets: impl Targets) -> Result<()> {
        let targets = self.inner.resolve(&targets.to_spec()?)?;
        self.inner.control(&targets, "clear_request", json!({}), QUERY_LIMIT)
    }

    /// Stop the cluster: every engine, then the controller. Afterwards this client is closed.
    pub fn shutdown(&self) -> Result<()> {
        let targets =
            self.inner.resolve(&TargetSpec::All).or_else(|e| if matches!(e, Error::NoEngines) { Ok(Vec::new()) } else { Err(e) })?;
        if !targets.is_empty() {
            if let Err(e) = self.inner.control(&targets, "shutdown_request", json!({"restart": false}), QUERY_LIMIT) {
                tracing::warn!(error = %e, "engines did not all confirm shutdown; stopping the controller anyway");
            }
        }
        // The controller's shutdown notification (on another socket) may beat
        // its reply here; either one confirms the shutdown.
        match self.inner.query("shutdown_request", json!({}), QUERY_LIMIT) {
            Ok(_) => Ok(()),
            Err(Error::Connection(why)) if why == crate::io::CONTROLLER_SHUT_DOWN => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Close the connection now (also done when the last handle is dropped).
    pub fn close(&self) {
        self.inner.io.close();
    }
}
