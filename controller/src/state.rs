//! What the hub knows: registered engines, messages in flight on each engine, the
//! load-balanced task queue, dependency bookkeeping and the bounded task records.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
// foldhash, not std's SipHash, for the maps keyed by msg_id: SipHash was 5% of the controller's
// CPU under many small tasks (perf). Keys come only from signed messages and the hasher is
// seeded per process, so flooding a map with collisions takes the cluster's key.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use serde::Deserialize;
use serde_json::Value;

use rpx_protocol::hub::Dependency;

use crate::wire::Chan;

/// A message sent to an engine and not yet answered.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub chan: Chan,
    /// Where the reply goes; `None` for requests the hub made itself (resubmissions).
    pub client: Option<Bytes>,
    pub msg_type: String,
    /// The request's header frame (raw JSON), the parent of any reply the hub makes up.
    pub header: Bytes,
}

/// One engine.
#[derive(Debug)]
pub struct Engine {
    pub id: u64,
    pub uuid: String,
    /// Routing identity on every engine-facing socket (the uuid's bytes).
    pub ident: Bytes,
    /// Registered (in `ids`, notification published) rather than waiting to become routable.
    pub ready: bool,
    /// The msg_id of the `registration_request` that made this registration.
    pub registration: String,
    /// rpx engines: the registration-socket identity an [`rpx_protocol::registration::EvictionNotice`]
    /// goes to if this registration ends while the engine lives.
    pub notice_to: Option<Bytes>,
    /// rpx engines: where the engine keeps its values (forwarded to clients, which decide
    /// whether they can hand values over as files: `rpx_protocol::dataplane`).
    pub host: Option<rpx_protocol::dataplane::HostIdentity>,
    pub registered_at: Instant,
    /// Last pong or message from the engine.
    pub last_seen: Instant,
    pub ponged: bool,
    /// Engine-facing sockets on which this identity is connected.
    pub connected: HashSet<Chan>,
    /// Frames waiting for the engine's connection on a socket.
    pub outbox: Vec<(Chan, Vec<Bytes>)>,
    /// msg_id -> request, for everything sent and not answered.
    pub inflight: HashMap<String, InFlight>,
    /// Load-balanced tasks in flight.
    pub task_load: usize,
    /// How fast it finishes them (its task limit: `crate::scheduler::Pace`).
    pub pace: crate::scheduler::Pace,
    pub completed: u64,
    /// The most recent completed msg_ids (for verbose `queue_request`).
    pub recent_completed: VecDeque<String>,
}

impl Engine {
    /// Connected on a socket tasks or direct requests reach it by.
    pub fn routable(&self) -> bool {
        self.connected.contains(&Chan::Mux) || self.connected.contains(&Chan::Task)
    }
}

/// How many completed msg_ids per engine `queue_request(verbose=True)` can list.
pub const RECENT_COMPLETED: usize = 1000;

impl Engine {
    pub fn new(id: u64, uuid: &str, now: Instant) -> Engine {
        Engine {
            id,
            uuid: uuid.to_string(),
            ident: Bytes::copy_from_slice(uuid.as_bytes()),
            ready: false,
            registration: String::new(),
            notice_to: None,
            host: None,
            registered_at: now,
            last_seen: now,
            ponged: false,
            connected: HashSet::new(),
            outbox: Vec::new(),
            inflight: HashMap::new(),
            task_load: 0,
            pace: Default::default(),
            completed: 0,
            recent_completed: VecDeque::new(),
        }
    }

    pub fn note_completed(&mut self, msg_id: &str) {
        self.completed += 1;
        if self.recent_completed.len() >= RECENT_COMPLETED {
            self.recent_completed.pop_front();
        }
        self.recent_completed.push_back(msg_id.to_string());
    }

    /// In-flight msg_ids on a channel.
    pub fn inflight_on(&self, chan: Chan) -> Vec<String> {
        let mut v: Vec<String> = self.inflight.iter().filter(|(_, f)| f.chan == chan).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }
}

/// A dependency (`after` or `follow`) in ipyparallel's form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dep {
    pub ids: HashSet<String>,
    pub all: bool,
    pub success: bool,
    pub failure: bool,
}

impl Dep {
    /// Read `[ids...]` or `{dependencies, all, success, failure}`; `None` means no dependency.
    pub fn parse(v: Option<&Value>) -> Result<Dep, String> {
        let empty = Dep { ids: HashSet::new(), all: true, success: true, failure: false };
        let dep = match v {
            None | Some(Value::Null) => return Ok(empty),
            Some(v) => Dependency::deserialize(v).map_err(|e| format!("bad dependency {v}: {e}"))?,
        };
        Ok(match dep {
            Dependency::One(id) => Dep { ids: HashSet::from_iter([id]), ..empty },
            Dependency::Ids(ids) => Dep { ids: ids.into_iter().collect(), ..empty },
            Dependency::Spec(s) => {
                Dep { ids: s.dependencies.unwrap_or_default().into_iter().collect(), all: s.all, success: s.success, failure: s.failure }
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether the dependency is met, given predicates for "completed" and "failed".
    pub fn check(&self, completed: impl Fn(&str) -> bool, failed: impl Fn(&str) -> bool) -> bool {
        if self.ids.is_empty() {
            return true;
        }
        let good = |id: &str| (self.success && completed(id)) || (self.failure && failed(id));
        if self.all {
            self.ids.iter().all(|i| good(i))
        } else {
            self.ids.iter().any(|i| good(i))
        }
    }

    /// Whether the dependency can no longer be met.
    pub fn unreachable(&self, completed: impl Fn(&str) -> bool, failed: impl Fn(&str) -> bool) -> bool {
        if self.ids.is_empty() || (self.success && self.failure) {
            return false;
        }
        let bad = |id: &str| if self.success { failed(id) } else { completed(id) };
        if self.all {
            self.ids.iter().any(|i| bad(i))
        } else {
            self.ids.iter().all(|i| bad(i))
        }
    }
}

/// A load-balanced task.
#[derive(Debug, Clone)]
pub struct Job {
    pub msg_id: String,
    pub client: Option<Bytes>,
    pub signed: Vec<Bytes>,
    pub msg_type: String,
    /// Allowed engine uuids (empty = any).
    pub targets: HashSet<String>,
    pub retries: u32,
    pub deadline: Option<Instant>,
    pub after: Dep,
    pub follow: Dep,
    /// Engines that failed this task (retries) or did not meet its dependencies.
    pub blacklist: HashSet<u64>,
    /// The engine running it, or `None` while queued.
    pub engine: Option<u64>,
}

impl Job {
    /// Can run anywhere, now: no targets, blacklist or dependencies.
    pub fn unrestricted(&self) -> bool {
        self.targets.is_empty() && self.blacklist.is_empty() && self.after.is_empty() && self.follow.is_empty()
    }
}

/// Outcome of a finished load-balanced task, for dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub success: bool,
    /// The uuid of the engine that ran it (shared by every task that ran there).
    pub engine: Arc<str>,
}

/// The outcomes of the last `limit` finished load-balanced tasks, compact enough to keep
/// hundreds of thousands: a task is known by a 128-bit digest of its msg_id (collisions are
/// out of reach: below 2^-90 for 10^9 tasks), and engine uuids are shared, not copied.
#[derive(Debug)]
pub struct DoneLog {
    limit: usize,
    map: HashMap<u128, Done>,
    order: VecDeque<u128>,
    engines: HashSet<Arc<str>>,
}

impl DoneLog {
    pub fn new(limit: usize) -> DoneLog {
        DoneLog { limit, map: HashMap::new(), order: VecDeque::new(), engines: HashSet::new() }
    }

    fn key(msg_id: &str) -> u128 {
        use sha2::Digest;
        let d = sha2::Sha256::digest(msg_id.as_bytes());
        u128::from_le_bytes(d[..16].try_into().expect("16 bytes"))
    }

    pub fn get(&self, msg_id: &str) -> Option<&Done> {
        self.map.get(&DoneLog::key(msg_id))
    }

    pub fn contains(&self, msg_id: &str) -> bool {
        self.get(msg_id).is_some()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember an outcome (the first one for a task counts); the oldest beyond the limit goes.
    pub fn insert(&mut self, msg_id: &str, success: bool, engine: &str) {
        let key = DoneLog::key(msg_id);
        if self.map.contains_key(&key) {
            return;
        }
        let engine = match self.engines.get(engine) {
            Some(e) => e.clone(),
            None => {
                // Uuids of engines no task remembers any more are dropped with the last of them.
                if self.engines.len() >= 1024 {
                    self.engines.retain(|e| Arc::strong_count(e) > 1);
                }
                let e: Arc<str> = Arc::from(engine);
                self.engines.insert(e.clone());
                e
            }
        };
        self.map.insert(key, Done { success, engine });
        self.order.push_back(key);
        while self.order.len() > self.limit {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

/// A task record for `result_request`, `history_request` and `queue_request`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub msg_id: String,
    pub chan: Chan,
    /// The request's signed frames `[sig, header, parent, metadata, content, buffers...]`.
    pub request: Vec<Bytes>,
    pub client: Option<Bytes>,
    pub engine_uuid: Option<String>,
    pub submitted: String,
    pub started: Option<String>,
    pub completed: Option<String>,
    pub received: Option<String>,
    /// The reply's signed frames.
    pub result: Option<Vec<Bytes>>,
    pub resubmitted: Option<String>,
    /// Output the engine published for this request (stdout, stderr, execute_input,
    /// execute_result, error), in ipyparallel's record keys.
    pub io: serde_json::Map<String, serde_json::Value>,
}

impl Record {
    /// Bytes held: request and reply frames, and the output kept.
    pub fn bytes(&self) -> usize {
        let frames: usize = self.request.iter().chain(self.result.iter().flatten()).map(Bytes::len).sum();
        frames
            + ["stdout", "stderr"].iter().filter_map(|k| self.io.get(*k).and_then(serde_json::Value::as_str)).map(str::len).sum::<usize>()
    }
    /// A new record for a request the controller just received from `client`.
    pub fn submitted(msg_id: &str, chan: Chan, request: &[Bytes], client: &Bytes) -> Record {
        Record {
            msg_id: msg_id.to_string(),
            chan,
            request: request.to_vec(),
            client: Some(client.clone()),
            engine_uuid: None,
            submitted: rpx_protocol::message::now_iso(),
            started: None,
            completed: None,
            received: None,
            result: None,
            resubmitted: None,
            io: Default::default(),
        }
    }

    /// Record one iopub message whose parent is this request.
    pub fn add_io(&mut self, msg_type: &str, content: &serde_json::Value) {
        use rpx_protocol::content::{ExecuteInput, Stream};
        use serde_json::Value;
        match msg_type {
            "stream" => {
                let stream = Stream::read(content);
                let name = if stream.is_stderr() { "stderr" } else { "stdout" };
                let text = stream.text.as_deref().unwrap_or_default();
                let Value::String(kept) = self.io.entry(name).or_insert_with(|| Value::String(String::new())) else { return };
                append_bounded(kept, text, RECORD_STREAM_LIMIT);
            }
            "execute_input" => {
                self.io.insert("execute_input".into(), ExecuteInput::code_as_sent(content));
            }
            "execute_result" | "error" => {
                self.io.insert(msg_type.into(), content.clone());
            }
            _ => {}
        }
    }

    pub fn pending(&self) -> bool {
        self.result.is_none()
    }
}

/// Bytes of each output stream (stdout, stderr) a task record keeps; clients still receive all
/// of it on iopub as it is published.
pub const RECORD_STREAM_LIMIT: usize = 1 << 20;
/// Appended once where a record's stream was cut.
pub const RECORD_STREAM_CUT: &str = "\n[rpx: output beyond 1 MiB is not kept in the task record]\n";

/// Append `text` to `kept` while it stays within `limit` bytes (cut at a char boundary), then
/// mark the cut once.
fn append_bounded(kept: &mut String, text: &str, limit: usize) {
    if kept.ends_with(RECORD_STREAM_CUT) {
        return;
    }
    if kept.len() + text.len() <= limit {
        kept.push_str(text);
        return;
    }
    let mut end = limit.saturating_sub(kept.len()).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    kept.push_str(&text[..end]);
    kept.push_str(RECORD_STREAM_CUT);
}

/// Bounded task records: the oldest finished ones are dropped first; pending ones are kept.
#[derive(Debug, Default)]
pub struct Records {
    /// Each record boxed: a table entry is a key and a pointer, so inserting, growing the
    /// table and looking a task up touch a few bytes, not a whole record (a load-balanced map
    /// holds a record for every queued task).
    pub map: HashMap<String, Box<Record>>,
    /// Submission order (for `history_request`); may still name evicted ids until compacted.
    pub order: VecDeque<String>,
    /// Finished ids, oldest first: the eviction queue. An id here may since have been removed
    /// or resubmitted; `cull` skips those.
    finished: VecDeque<String>,
    pub bytes: usize,
    pub limit: usize,
    pub byte_limit: usize,
}

impl Records {
    pub fn new(limit: usize, byte_limit: usize) -> Records {
        Records { limit, byte_limit, ..Default::default() }
    }

    pub fn insert(&mut self, rec: Record) {
        self.bytes += rec.bytes();
        let id = rec.msg_id.clone();
        if !rec.pending() {
            self.finished.push_back(id.clone());
        }
        if let Some(old) = self.map.insert(id.clone(), Box::new(rec)) {
            self.bytes -= old.bytes();
        } else {
            self.order.push_back(id);
        }
        self.cull();
    }

    /// Evict the oldest finished records while over a bound. Each step consumes one entry of
    /// the eviction queue, so a burst of thousands of pending tasks costs nothing here.
    fn cull(&mut self) {
        while self.map.len() > self.limit || self.bytes > self.byte_limit {
            let Some(id) = self.finished.pop_front() else { break };
            if self.map.get(&id).is_some_and(|r| !r.pending()) {
                let r = self.map.remove(&id).expect("present");
                self.bytes -= r.bytes();
            }
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }

    pub fn get(&self, id: &str) -> Option<&Record> {
        self.map.get(id).map(|r| &**r)
    }

    /// Update a record in place, keeping the byte count right.
    pub fn update(&mut self, id: &str, f: impl FnOnce(&mut Record)) -> bool {
        let Some(r) = self.map.get_mut(id) else { return false };
        let (before, was_pending) = (r.bytes(), r.pending());
        f(r);
        let after = r.bytes();
        if was_pending && !r.pending() {
            self.finished.push_back(id.to_string());
        }
        self.bytes = self.bytes + after - before;
        self.cull();
        true
    }

    pub fn remove(&mut self, id: &str) -> Option<Record> {
        let r = self.map.remove(id)?;
        self.bytes -= r.bytes();
        Some(*r)
    }

    /// msg_ids in submission order.
    pub fn history(&self) -> Vec<String> {
        self.order.iter().filter(|id| self.map.contains_key(*id)).cloned().collect()
    }
}

/// The identities of the engines the hub considers alive: registered, and not since evicted
/// (missed heartbeats, a closed connection, a stuck send) or unregistered. Shared with the
/// guard's tasks, which let a new connection take over an engine identity a live connection
/// holds only when its engine is not alive ([`AliveEngines::may_take_over`]). Updated by
/// [`Engines::insert`] and [`Engines::remove`] only, so it is exactly `Engines::by_ident`'s keys.
#[derive(Debug, Clone, Default)]
pub struct AliveEngines(Arc<RwLock<HashSet<Bytes>>>);

impl AliveEngines {
    pub fn contains(&self, ident: &[u8]) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contains(ident)
    }

    /// The guard's takeover policy: a live connection holding `ident` may be replaced only when
    /// no alive engine has that identity (its engine was evicted or unregistered, so a restarted
    /// or reconnecting engine gets in even while its old connection is half-open).
    pub fn may_take_over(&self, ident: &[u8]) -> bool {
        !self.contains(ident)
    }

    fn insert(&self, ident: Bytes) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(ident);
    }

    fn remove(&self, ident: &[u8]) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(ident);
    }
}

/// The engines, with id allocation.
#[derive(Debug, Default)]
pub struct Engines {
    pub by_id: BTreeMap<u64, Engine>,
    pub by_ident: HashMap<Bytes, u64>,
    /// `by_ident`'s keys, shared with the guard (see [`AliveEngines`]).
    alive: AliveEngines,
    /// Ready engine ids, least recently used first.
    pub lru: VecDeque<u64>,
    next_id: u64,
    /// Every id handed out, with the uuid of the engine that held it last.
    holders: HashMap<u64, String>,
}

impl Engines {
    /// A new engine id for the engine `uuid`: the `requested` one unless a registered engine
    /// holds it, else the next never used of 0, 1, 2, ... A requested id may be one whose
    /// engine is gone: an evicted engine registers again under its id, and ipcluster's
    /// supervisor restarts a dead engine under its id (`ipengine --id N`), so clients keep
    /// addressing it by the same id. Unrequested ids are never reused.
    pub fn allocate_id(&mut self, requested: Option<u64>, uuid: &str) -> u64 {
        if let Some(r) = requested {
            if !self.by_id.contains_key(&r) {
                self.holders.insert(r, uuid.to_string());
                self.next_id = self.next_id.max(r + 1);
                return r;
            }
        }
        while self.holders.contains_key(&self.next_id) {
            self.next_id += 1;
        }
        let id = self.next_id;
        self.holders.insert(id, uuid.to_string());
        self.next_id += 1;
        id
    }

    pub fn get(&self, id: u64) -> Option<&Engine> {
        self.by_id.get(&id)
    }
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Engine> {
        self.by_id.get_mut(&id)
    }
    pub fn id_of(&self, ident: &[u8]) -> Option<u64> {
        self.by_ident.get(ident).copied()
    }
    pub fn by_uuid(&self, uuid: &str) -> Option<&Engine> {
        self.id_of(uuid.as_bytes()).and_then(|id| self.by_id.get(&id))
    }

    /// The engines with these alive identities (the network layer shares its set with the
    /// guard before any engine registers).
    pub fn with_alive(alive: AliveEngines) -> Engines {
        Engines { alive, ..Engines::default() }
    }

    /// A handle on the identities of the alive engines.
    pub fn alive(&self) -> AliveEngines {
        self.alive.clone()
    }

    pub fn insert(&mut self, e: Engine) {
        self.by_ident.insert(e.ident.clone(), e.id);
        self.alive.insert(e.ident.clone());
        self.by_id.insert(e.id, e);
    }

    pub fn remove(&mut self, id: u64) -> Option<Engine> {
        let e = self.by_id.remove(&id)?;
        self.by_ident.remove(&e.ident);
        self.alive.remove(&e.ident);
        self.lru.retain(|x| *x != id);
        Some(e)
    }

    /// Move an engine to the back of the LRU order.
    pub fn touch(&mut self, id: u64) {
        if let Some(pos) = self.lru.iter().position(|x| *x == id) {
            self.lru.remove(pos);
            self.lru.push_back(id);
        }
    }
}

/// An rpx engine whose registration ended while it may still live (missed heartbeats, a stuck
/// send): what to tell it if it is heard from again.
#[derive(Debug, Clone)]
pub struct Evicted {
    /// Its registration-socket identity.
    pub notice_to: Bytes,
    pub notice: rpx_protocol::registration::EvictionNotice,
    /// When a notice was last sent (they are sent at most once per [`Evictions::repeat`]).
    pub last_sent: Option<Instant>,
}

/// Evicted rpx engines by uuid, the oldest forgotten first beyond a bound.
#[derive(Debug)]
pub struct Evictions {
    map: HashMap<String, Evicted>,
    order: VecDeque<String>,
    limit: usize,
    /// Least time between two notices to one engine.
    pub repeat: std::time::Duration,
}

impl Evictions {
    pub fn new(limit: usize, repeat: std::time::Duration) -> Evictions {
        Evictions { map: HashMap::new(), order: VecDeque::new(), limit: limit.max(1), repeat }
    }

    /// Remember an eviction (replacing an older one of the same engine).
    pub fn insert(&mut self, uuid: &str, e: Evicted) {
        if self.map.insert(uuid.to_string(), e).is_none() {
            self.order.push_back(uuid.to_string());
        }
        while self.map.len() > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            self.map.remove(&old);
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|u| map.contains_key(u));
        }
    }

    /// The engine registered again: nothing more to tell it.
    pub fn forget(&mut self, uuid: &str) {
        self.map.remove(uuid);
    }

    /// The engine `uuid` was heard from at `now` (a pong, a reply): the notice to send it, if
    /// it was evicted and none was sent within [`Self::repeat`].
    pub fn heard(&mut self, uuid: &str, now: Instant) -> Option<(Bytes, rpx_protocol::registration::EvictionNotice)> {
        let e = self.map.get_mut(uuid)?;
        if e.last_sent.is_some_and(|t| now.saturating_duration_since(t) < self.repeat) {
            return None;
        }
        e.last_sent = Some(now);
        Some((e.notice_to.clone(), e.notice.clone()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// msg_ids the hub answered itself because the engine running them died or was evicted (or
/// queued again for another engine): a late reply to one of them from the old engine is stale
/// and is dropped, never delivered a second time. Bounded: the oldest are forgotten first.
#[derive(Debug)]
pub struct Answered {
    set: HashSet<String>,
    order: VecDeque<String>,
    limit: usize,
}

impl Answered {
    pub fn new(limit: usize) -> Answered {
        Answered { set: HashSet::new(), order: VecDeque::new(), limit: limit.max(1) }
    }

    pub fn insert(&mut self, msg_id: &str) {
        if self.set.insert(msg_id.to_string()) {
            self.order.push_back(msg_id.to_string());
        }
        while self.set.len() > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            self.set.remove(&old);
        }
    }

    pub fn contains(&self, msg_id: &str) -> bool {
        self.set.contains(msg_id)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod io_tests;
