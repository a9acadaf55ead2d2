//! Persisted task records (`ipcontroller --db sqlite`): the SQLite file, its schema, the writer
//! thread, and the lookups the hub defers to it.
//!
//! The hub never touches SQLite. It queues [`StoreOp`]s (finished records, late output,
//! resubmissions, purges, lookups) in [`crate::hub::Hub::store_ops`]; the network layer hands
//! them to one dedicated thread over a bounded channel ([`spawn`]). The thread applies what has
//! queued up in one transaction per batch (so a burst of finished tasks costs one commit) and
//! answers lookups on the same connection, in order: a lookup always sees every write queued
//! before it. Answers go back through a oneshot per lookup and reach the hub as
//! [`crate::hub::HubEvent::Stored`].
//!
//! Only finished records are written (a crash loses in-flight tasks anyway). Records are never
//! loaded wholesale: after `--restore`, `result_request`, `history_request`, `db_request` and
//! `resubmit_request` read what they need from the file, and memory holds only the hub's bounded
//! in-memory records (`--record-limit`, `--record-bytes`) as before.
//!
//! One row per task in table `tasks`: the request's and the reply's JSON frames exactly as they
//! were on the wire (so results come back byte for byte), their buffers (see
//! [`encode_buffers`]), the timestamps, engine and client, and the output the engine published.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, OpenFlags, Row};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use rpx_protocol::hub::{ResultIo, ResultRecord};
use rpx_protocol::Profile;

use crate::hub::matches_query;
use crate::state::Record;
use crate::wire::Chan;
use crate::{Error, Result};

/// Where task records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DbKind {
    /// In memory only, bounded by `--record-limit` / `--record-bytes` (ipyparallel 9's default,
    /// its `DictDB`).
    #[default]
    Memory,
    /// Also in `<profile>/security/tasks[-<cluster_id>].db` (like ipyparallel's `SQLiteDB`).
    Sqlite,
}

impl FromStr for DbKind {
    type Err = String;
    fn from_str(s: &str) -> Result<DbKind, String> {
        match s {
            "memory" | "dict" | "dictdb" => Ok(DbKind::Memory),
            "sqlite" | "sqlitedb" => Ok(DbKind::Sqlite),
            other => Err(format!("unknown --db {other:?}: use memory or sqlite")),
        }
    }
}

/// The database file of a profile's cluster.
pub fn db_path(profile: &Profile) -> PathBuf {
    let name = if profile.cluster_id.is_empty() { "tasks.db".to_string() } else { format!("tasks-{}.db", profile.cluster_id) };
    profile.security_dir().join(name)
}

/// Version stored in `PRAGMA user_version`; a file with another version is refused.
pub const SCHEMA_VERSION: i64 = 1;
/// Messages queued for the writer thread before the hub waits for it.
pub const QUEUE: usize = 16_384;
/// Most operations applied in one transaction.
const BATCH: usize = 4096;
/// How long the hub waits for room in the writer's queue before dropping a write.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a deferred client query may wait for the database.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

const COLUMNS: &[(&str, &str)] = &[
    ("msg_id", "TEXT PRIMARY KEY NOT NULL"),
    ("queue", "TEXT NOT NULL"),
    ("client_uuid", "BLOB"),
    ("engine_uuid", "TEXT"),
    ("submitted", "TEXT NOT NULL"),
    ("started", "TEXT"),
    ("completed", "TEXT"),
    ("received", "TEXT"),
    ("resubmitted", "TEXT"),
    ("header", "TEXT NOT NULL"),
    ("parent", "TEXT"),
    ("metadata", "TEXT"),
    ("content", "TEXT"),
    ("buffers", "BLOB"),
    ("result_header", "TEXT"),
    ("result_parent", "TEXT"),
    ("result_metadata", "TEXT"),
    ("result_content", "TEXT"),
    ("result_buffers", "BLOB"),
    ("execute_input", "TEXT"),
    ("execute_result", "TEXT"),
    ("error", "TEXT"),
    ("stdout", "TEXT"),
    ("stderr", "TEXT"),
];

/// Record keys that are plain text columns: `db_request` filters on them run in SQL (the full
/// query is still checked on every row, so this only narrows the scan).
const TEXT_KEYS: &[&str] = &["msg_id", "queue", "engine_uuid", "submitted", "started", "completed", "received", "resubmitted"];

/// What the hub asks of the store.
#[derive(Debug)]
pub enum StoreOp {
    /// A finished record: insert it, or replace an earlier version.
    Put(Box<Record>),
    /// Output (stdout, stderr, results, errors) that arrived after the record was written.
    Io(Box<Record>),
    /// The record `msg_id` was resubmitted as `new_id`.
    Resubmitted {
        msg_id: String,
        new_id: String,
    },
    Purge(Purge),
    /// A lookup; the answer comes back as `HubEvent::Stored { token, .. }`.
    Query {
        token: u64,
        query: Query,
    },
}

/// Which finished records `purge_request` drops.
#[derive(Debug, Clone, PartialEq)]
pub enum Purge {
    All,
    Ids(Vec<String>),
    /// Every record of the engine with this uuid.
    Engine(String),
}

/// A lookup the hub could not answer from memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// These records, if stored.
    Records(Vec<String>),
    /// Records matching a `db_request` query, in submission order; buffers only if asked for.
    Find { query: Map<String, Value>, buffers: bool, result_buffers: bool },
    /// `(msg_id, submitted)` of every stored record, in submission order.
    History,
}

/// The store's answer to a [`Query`].
#[derive(Debug, Clone)]
pub enum Answer {
    Records(Vec<Record>),
    History(Vec<(String, String)>),
    /// The lookup failed; the hub answers the client with this error.
    Failed {
        ename: String,
        evalue: String,
    },
}

impl Answer {
    pub fn failed(ename: &str, evalue: impl Into<String>) -> Answer {
        Answer::Failed { ename: ename.into(), evalue: evalue.into() }
    }
}

/// What the writer thread receives: an operation, and for lookups where to answer.
#[derive(Debug)]
pub struct StoreMsg {
    pub op: StoreOp,
    pub reply: Option<oneshot::Sender<Answer>>,
}

/// The running writer thread.
#[derive(Debug)]
pub struct StoreHandle {
    pub tx: mpsc::Sender<StoreMsg>,
    /// Completes when the thread has committed everything and exited.
    pub done: oneshot::Receiver<()>,
    pub path: PathBuf,
    /// The writer did not take an operation within [`SEND_TIMEOUT`] (or stopped): operations
    /// that find its queue full are dropped at once until it takes one again.
    stuck: bool,
    /// Operations dropped since the writer got stuck.
    dropped: u64,
}

/// A lookup in flight; resolves to the token and the answer (an error answer if the writer
/// stopped or did not answer within [`QUERY_TIMEOUT`]).
pub type Lookup = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Answer)> + Send>>;

impl StoreHandle {
    /// Hand the hub's queued work to the writer thread, in order. A full queue makes the hub
    /// wait (back-pressure), at most [`SEND_TIMEOUT`] once; if the writer is still stuck, work
    /// is dropped without waiting (an error in the log, with a count when it recovers), and a
    /// dropped lookup is answered with an error.
    pub async fn submit(&mut self, ops: Vec<StoreOp>, lookups: &mut futures::stream::FuturesUnordered<Lookup>) {
        for op in ops {
            let reply = match &op {
                StoreOp::Query { token, .. } => {
                    let (tx, rx) = oneshot::channel();
                    let token = *token;
                    lookups.push(Box::pin(async move {
                        let answer = match tokio::time::timeout(QUERY_TIMEOUT, rx).await {
                            Ok(Ok(a)) => a,
                            Ok(Err(_)) => Answer::failed(
                                "RuntimeError",
                                "the task database is unavailable (its writer stopped or is stuck; see the controller log)",
                            ),
                            Err(_) => Answer::failed(
                                "TimeoutError",
                                format!("the task database did not answer within {} s", QUERY_TIMEOUT.as_secs()),
                            ),
                        };
                        (token, answer)
                    }));
                    Some(tx)
                }
                _ => None,
            };
            let msg = match self.tx.try_send(StoreMsg { op, reply }) {
                Ok(()) => {
                    if std::mem::take(&mut self.stuck) {
                        warn!(path = %self.path.display(), dropped = self.dropped, "the task database writer takes work again");
                        self.dropped = 0;
                    }
                    continue;
                }
                Err(mpsc::error::TrySendError::Full(msg)) if !self.stuck => msg,
                Err(_) => {
                    self.note_dropped("stopped or is stuck");
                    continue;
                }
            };
            match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.note_dropped("stopped"),
                Err(_) => self.note_dropped("took nothing for 10 s"),
            }
        }
    }

    fn note_dropped(&mut self, why: &str) {
        self.dropped += 1;
        if !self.stuck {
            self.stuck = true;
            error!(path = %self.path.display(), "the task database writer {why}: records are not persisted (and lookups fail) until it takes work again");
        }
    }
}

// ----------------------------------------------------------------------------------- opening

fn db_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Db { path: path.to_path_buf(), message: what.to_string() }
}

/// Move `path` (and its `-wal`/`-shm` companions) to `path.prev`, replacing an older one.
fn set_aside(path: &Path) -> Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    let prev = PathBuf::from(format!("{}.prev", path.display()));
    for suffix in ["", "-wal", "-shm"] {
        let (from, to) = (PathBuf::from(format!("{}{suffix}", path.display())), PathBuf::from(format!("{}{suffix}", prev.display())));
        match std::fs::remove_file(&to) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(db_error(&to, format!("cannot remove the older copy: {e}"))),
        }
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(db_error(&from, format!("cannot move the previous database aside to {}: {e}", to.display()))),
        }
    }
    Ok(Some(prev))
}

/// Open (creating it 0600 if needed) and check the database at `path`.
///
/// Without `restore`, an existing file is first moved aside to `<path>.prev` (one generation is
/// kept), so every controller starts with an empty history unless asked to restore it. A file
/// that is not a database, has another schema, or cannot be written is an error here, before
/// the controller binds anything.
pub fn open(path: &Path, restore: bool) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| db_error(dir, format!("cannot create the directory: {e}")))?;
    }
    if !restore {
        if let Some(prev) = set_aside(path)? {
            info!(previous = %prev.display(), "started a new task database; the previous one was kept (use --restore to serve it)");
        }
    } else if !path.exists() {
        warn!(path = %path.display(), "--restore: no task database to restore; starting an empty one");
    }
    // Create the file ourselves so that it is 0600 from the start; SQLite gives its -wal and
    // -shm files the database file's mode.
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| db_error(path, format!("cannot make it private (0600): {e}")))?;
        }
        Err(e) => return Err(db_error(path, format!("cannot create it: {e}"))),
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| db_error(path, format!("cannot open it: {e}")))?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
        return Err(db_error(path, "the file is not writable (check its owner and mode)"));
    }
    let corrupt = |e: rusqlite::Error| {
        db_error(path, format!("{e}; the file is damaged or not an rpx task database: move it away, or start without --restore"))
    };
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(corrupt)?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(%mode, "the task database could not switch to WAL mode; writes will be slower");
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;").map_err(corrupt)?;
    if restore {
        let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).map_err(corrupt)?;
        if check != "ok" {
            return Err(db_error(path, format!("integrity check failed ({check}): move the file away, or start without --restore")));
        }
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(corrupt)?;
    let has_table: bool = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='tasks'", [], |r| r.get::<_, i64>(0))
        .map_err(corrupt)?
        > 0;
    match (version, has_table) {
        (0, false) => {
            let cols: Vec<String> = COLUMNS.iter().map(|(n, t)| format!("{n} {t}")).collect();
            let ddl = format!("BEGIN; CREATE TABLE tasks ({}); PRAGMA user_version={SCHEMA_VERSION}; COMMIT;", cols.join(", "));
            conn.execute_batch(&ddl)
                .map_err(|e| db_error(path, format!("cannot create the schema (is the disk full or read-only?): {e}")))?;
        }
        (SCHEMA_VERSION, true) => {
            let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('tasks')").map_err(corrupt)?;
            let names: Vec<String> =
                stmt.query_map([], |r| r.get(0)).map_err(corrupt)?.collect::<rusqlite::Result<_>>().map_err(corrupt)?;
            let want: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
            if names != want {
                return Err(db_error(path, format!("table `tasks` has columns {names:?}, expected {want:?}: move the file away")));
            }
        }
        (v, _) => {
            return Err(db_error(
                path,
                format!("schema version {v} is not {SCHEMA_VERSION} (written by another rpx version?): move the file away"),
            ))
        }
    }
    // Prove the file takes writes now rather than at the first finished task.
    conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}")).map_err(|e| db_error(path, format!("cannot write to it: {e}")))?;
    Ok(conn)
}

/// Open the database for `profile` and start the writer thread.
pub fn spawn(profile: &Profile, restore: bool) -> Result<StoreHandle> {
    let path = db_path(profile);
    let conn = open(&path, restore)?;
    if restore {
        let n: i64 = conn.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0)).map_err(|e| db_error(&path, e))?;
        info!(path = %path.display(), records = n, "restored the task database (records are read on demand, not loaded)");
    } else {
        info!(path = %path.display(), "task records are written to SQLite");
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let (done_tx, done) = oneshot::channel();
    let p = path.clone();
    std::thread::Builder::new()
        .name("rpx-taskdb".into())
        .spawn(move || {
            Writer::new(conn, p).run(rx);
            let _ = done_tx.send(());
        })
        .map_err(|e| db_error(&path, format!("cannot start the writer thread: {e}")))?;
    Ok(StoreHandle { tx, done, path, stuck: false, dropped: 0 })
}

// ----------------------------------------------------------------------------------- encoding

/// Buffers as one blob: for each, its length as 8 little-endian bytes, then its bytes. An empty
/// list is stored as NULL.
pub fn encode_buffers(bufs: &[Bytes]) -> Option<Vec<u8>> {
    if bufs.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(bufs.iter().map(|b| b.len() + 8).sum());
    for b in bufs {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    Some(out)
}

/// The inverse of [`encode_buffers`]; an inconsistent blob is an error, never a panic.
pub fn decode_buffers(blob: Option<&[u8]>) -> Result<Vec<Bytes>, String> {
    let Some(mut rest) = blob else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 8 {
            return Err("truncated buffer length".into());
        }
        let n = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        rest = &rest[8..];
        let n = usize::try_from(n).ok().filter(|n| *n <= rest.len()).ok_or("buffer length beyond the blob")?;
        out.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    Ok(out)
}

/// A JSON frame as SQL: text when it is UTF-8 (always, for frames that parsed), else a blob.
fn frame_sql(b: Option<&Bytes>) -> ToSqlOutput<'_> {
    match b {
        None => ToSqlOutput::Borrowed(ValueRef::Null),
        Some(b) if std::str::from_utf8(b).is_ok() => ToSqlOutput::Borrowed(ValueRef::Text(b)),
        Some(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
    }
}

fn opt_text(s: Option<&str>) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(s.map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes())))
}

fn text(s: &str) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
}

fn blob(b: Option<Vec<u8>>) -> ToSqlOutput<'static> {
    b.map_or(ToSqlOutput::Borrowed(ValueRef::Null), |b| ToSqlOutput::Owned(SqlValue::Blob(b)))
}

fn io_text<'a>(r: &'a Record, key: &str) -> ToSqlOutput<'a> {
    match r.io.get(key) {
        None => ToSqlOutput::Borrowed(ValueRef::Null),
        Some(Value::String(s)) if key == "stdout" || key == "stderr" => text(s),
        Some(v) => ToSqlOutput::Owned(SqlValue::Text(v.to_string())),
    }
}

/// The row of a record, in [`COLUMNS`] order, borrowing from it where it can.
fn to_row(r: &Record) -> Vec<ToSqlOutput<'_>> {
    let res = r.result.as_deref();
    vec![
        text(&r.msg_id),
        text(r.chan.name()),
        ToSqlOutput::Borrowed(r.client.as_ref().map_or(ValueRef::Null, |c| ValueRef::Blob(c))),
        opt_text(r.engine_uuid.as_deref()),
        text(&r.submitted),
        opt_text(r.started.as_deref()),
        opt_text(r.completed.as_deref()),
        opt_text(r.received.as_deref()),
        opt_text(r.resubmitted.as_deref()),
        frame_sql(r.request.get(1)),
        frame_sql(r.request.get(2)),
        frame_sql(r.request.get(3)),
        frame_sql(r.request.get(4)),
        blob(encode_buffers(r.request.get(5..).unwrap_or_default())),
        frame_sql(res.and_then(|s| s.get(1))),
        frame_sql(res.and_then(|s| s.get(2))),
        frame_sql(res.and_then(|s| s.get(3))),
        frame_sql(res.and_then(|s| s.get(4))),
        blob(res.and_then(|s| encode_buffers(s.get(5..).unwrap_or_default()))),
        io_text(r, "execute_input"),
        io_text(r, "execute_result"),
        io_text(r, "error"),
        io_text(r, "stdout"),
        io_text(r, "stderr"),
    ]
}

fn bytes_at(row: &Row, i: usize) -> rusqlite::Result<Option<Bytes>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(Bytes::copy_from_slice(t)),
        other => Some(Bytes::from(format!("{other:?}"))),
    })
}

fn conversion(i: usize, e: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, e.into())
}

/// A record from a row selected with all [`COLUMNS`] in order.
fn from_row(row: &Row) -> rusqlite::Result<Record> {
    let text = |i: usize| row.get::<_, Option<String>>(i);
    let queue: String = row.get(1)?;
    let chan = Chan::ALL.into_iter().find(|c| c.name() == queue).ok_or_else(|| conversion(1, format!("unknown queue {queue:?}")))?;
    let frame = |i: usize| bytes_at(row, i).map(|b| b.unwrap_or_default());
    let bufs = |i: usize| -> rusqlite::Result<Vec<Bytes>> {
        let b = bytes_at(row, i)?;
        decode_buffers(b.as_deref()).map_err(|e| conversion(i, e))
    };
    let mut request = vec![Bytes::new(), frame(9)?, frame(10)?, frame(11)?, frame(12)?];
    request.extend(bufs(13)?);
    let result = match bytes_at(row, 14)? {
        None => None,
        Some(h) => {
            let mut s = vec![Bytes::new(), h, frame(15)?, frame(16)?, frame(17)?];
            s.extend(bufs(18)?);
            Some(s)
        }
    };
    let mut io = Map::new();
    for (i, key) in [(19, "execute_input"), (20, "execute_result"), (21, "error"), (22, "stdout"), (23, "stderr")] {
        if let Some(s) = text(i)? {
            let v = if key == "stdout" || key == "stderr" {
                Value::String(s)
            } else {
                serde_json::from_str(&s).map_err(|e| conversion(i, e.to_string()))?
            };
            io.insert(key.into(), v);
        }
    }
    Ok(Record {
        msg_id: row.get(0)?,
        chan,
        request,
        client: bytes_at(row, 2)?,
        engine_uuid: text(3)?,
        submitted: row.get(4)?,
        started: text(5)?,
        completed: text(6)?,
        received: text(7)?,
        result,
        resubmitted: text(8)?,
        io,
    })
}

/// A record as ipyparallel's `TaskRecord` dict (what `db_request` returns and filters on).
pub fn record_json(r: &Record) -> Value {
    let parse = |b: Option<&Bytes>| b.and_then(|b| serde_json::from_slice::<Value>(b).ok()).unwrap_or(Value::Null);
    let res = r.result.as_ref();
    let io = |key: &str| record_io(r, key);
    json!({
        "msg_id": r.msg_id,
        "header": parse(r.request.get(1)),
        "metadata": parse(r.request.get(3)),
        "content": parse(r.request.get(4)),
        "submitted": r.submitted,
        "client_uuid": r.client.as_ref().map(|c| String::from_utf8_lossy(c).into_owned()),
        "engine_uuid": r.engine_uuid,
        "started": r.started,
        "completed": r.completed,
        "resubmitted": r.resubmitted,
        "received": r.received,
        "result_header": parse(res.and_then(|s| s.get(1))),
        "result_metadata": parse(res.and_then(|s| s.get(3))),
        "result_content": parse(res.and_then(|s| s.get(4))),
        "queue": r.chan.name(),
        "execute_input": io("execute_input"), "execute_result": io("execute_result"), "error": io("error"),
        "stdout": io("stdout"), "stderr": io("stderr"),
        "label": r.request.get(3).and_then(|m| serde_json::from_slice::<Labelled>(m).ok()).map_or(Value::Null, |m| m.label),
    })
}

/// The `label` a client may put in a request's metadata.
#[derive(serde::Deserialize)]
struct Labelled {
    #[serde(default)]
    label: Value,
}

/// What `result_request` returns for a finished record (the fields of [`record_json`] it names).
pub fn result_record(r: &Record) -> ResultRecord {
    let parse = |b: Option<&Bytes>| b.and_then(|b| serde_json::from_slice::<Value>(b).ok()).unwrap_or(Value::Null);
    let res = r.result.as_ref();
    ResultRecord {
        header: parse(r.request.get(1)),
        metadata: parse(r.request.get(3)),
        result_header: parse(res.and_then(|s| s.get(1))),
        result_metadata: parse(res.and_then(|s| s.get(3))),
        result_content: parse(res.and_then(|s| s.get(4))),
        received: r.received.clone(),
        io: ResultIo {
            execute_input: record_io(r, "execute_input"),
            execute_result: record_io(r, "execute_result"),
            error: record_io(r, "error"),
            stdout: record_io(r, "stdout"),
            stderr: record_io(r, "stderr"),
        },
    }
}

/// One kind of a record's iopub output: `""` for no stream output, `null` for the rest.
fn record_io(r: &Record, key: &str) -> Value {
    match r.io.get(key) {
        Some(v) => v.clone(),
        None if key == "stdout" || key == "stderr" => json!(""),
        None => Value::Null,
    }
}

/// The SQL pre-filter for a `db_request` query: conditions on [`TEXT_KEYS`] with string
/// arguments (`= $eq $gt $gte $lt $lte $in`). Every row it keeps is still checked with
/// [`matches_query`], so it may only drop rows the query would drop too.
fn sql_prefilter(query: &Map<String, Value>) -> (String, Vec<SqlValue>) {
    let mut exprs = Vec::new();
    let mut args = Vec::new();
    for (key, cond) in query {
        if !TEXT_KEYS.contains(&key.as_str()) {
            continue;
        }
        match cond {
            Value::String(s) => {
                exprs.push(format!("{key} = ?"));
                args.push(SqlValue::Text(s.clone()));
            }
            Value::Object(ops) => {
                for (op, arg) in ops {
                    let sym = match op.as_str() {
                        "$eq" => "=",
                        "$gt" => ">",
                        "$gte" => ">=",
                        "$lt" => "<",
                        "$lte" => "<=",
                        "$in" => {
                            let Some(items) = arg.as_array().filter(|a| !a.is_empty() && a.iter().all(Value::is_string)) else { continue };
                            exprs.push(format!("{key} IN ({})", vec!["?"; items.len()].join(",")));
                            args.extend(items.iter().map(|v| SqlValue::Text(v.as_str().expect("checked").to_string())));
                            continue;
                        }
                        _ => continue,
                    };
                    if let Value::String(s) = arg {
                        exprs.push(format!("{key} {sym} ?"));
                        args.push(SqlValue::Text(s.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    let clause = if exprs.is_empty() { String::new() } else { format!(" WHERE {}", exprs.join(" AND ")) };
    (clause, args)
}

// ----------------------------------------------------------------------------------- the writer

/// The writer thread's state: one connection, and counts for rate-limited error logs.
pub struct Writer {
    conn: Connection,
    path: PathBuf,
    failed_writes: u64,
    last_error_log: Option<Instant>,
    put_sql: String,
}

/// At most one write-failure log line per this period (the count of failures is in it).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

impl Writer {
    pub fn new(conn: Connection, path: PathBuf) -> Writer {
        let names: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
        let put_sql = format!("INSERT OR REPLACE INTO tasks ({}) VALUES ({})", names.join(","), vec!["?"; names.len()].join(","));
        Writer { conn, path, failed_writes: 0, last_error_log: None, put_sql }
    }

    /// Apply batches until every sender is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<StoreMsg>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.apply(std::mem::take(&mut batch));
        }
        if self.failed_writes > 0 {
            error!(path = %self.path.display(), failed = self.failed_writes, "task database: some records were not written");
        }
    }

    /// Apply one batch in one transaction; lookups in it see the writes before them.
    pub fn apply(&mut self, batch: Vec<StoreMsg>) {
        // Writes applied in the open transaction: lost too if it is rolled back.
        let mut in_tx = 0u64;
        let _ = self.conn.execute_batch("BEGIN");
        for m in batch {
            match m.op {
                StoreOp::Query { query, .. } => {
                    let answer = self
                        .query(&query)
                        .unwrap_or_else(|e| Answer::failed("RuntimeError", format!("task database {}: {e}", self.path.display())));
                    if let Some(reply) = m.reply {
                        let _ = reply.send(answer);
                    }
                }
                op => match self.write(&op) {
                    Ok(()) => in_tx += 1,
                    Err(e) => {
                        // Some errors (a full disk) roll the whole transaction back.
                        let lost = if self.conn.is_autocommit() { std::mem::take(&mut in_tx) } else { 0 };
                        self.write_failed(1 + lost, &e);
                        if self.conn.is_autocommit() {
                            let _ = self.conn.execute_batch("BEGIN");
                        }
                    }
                },
            }
        }
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                self.write_failed(in_tx, &e);
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
    }

    fn write_failed(&mut self, n: u64, e: &rusqlite::Error) {
        self.failed_writes += n;
        if self.last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
            self.last_error_log = Some(Instant::now());
            error!(path = %self.path.display(), error = %e, failed_so_far = self.failed_writes, "task database write failed; the controller keeps running, but these records are not persisted");
        }
    }

    fn write(&mut self, op: &StoreOp) -> rusqlite::Result<()> {
        match op {
            StoreOp::Put(r) => {
                self.conn.prepare_cached(&self.put_sql)?.execute(params_from_iter(to_row(r)))?;
            }
            StoreOp::Io(r) => {
                let vals = [
                    io_text(r, "execute_input"),
                    io_text(r, "execute_result"),
                    io_text(r, "error"),
                    io_text(r, "stdout"),
                    io_text(r, "stderr"),
                    text(&r.msg_id),
                ];
                self.conn
                    .prepare_cached("UPDATE tasks SET execute_input=?, execute_result=?, error=?, stdout=?, stderr=? WHERE msg_id=?")?
                    .execute(params_from_iter(vals))?;
            }
            StoreOp::Resubmitted { msg_id, new_id } => {
                self.conn.prepare_cached("UPDATE tasks SET resubmitted=? WHERE msg_id=?")?.execute([new_id, msg_id])?;
            }
            StoreOp::Purge(Purge::All) => {
                self.conn.execute("DELETE FROM tasks", [])?;
            }
            StoreOp::Purge(Purge::Ids(ids)) => {
                let mut stmt = self.conn.prepare_cached("DELETE FROM tasks WHERE msg_id=?")?;
                for id in ids {
                    stmt.execute([id])?;
                }
            }
            StoreOp::Purge(Purge::Engine(uuid)) => {
                self.conn.execute("DELETE FROM tasks WHERE engine_uuid=?", [uuid])?;
            }
            StoreOp::Query { .. } => {}
        }
        Ok(())
    }

    /// Answer a lookup.
    pub fn query(&self, q: &Query) -> rusqlite::Result<Answer> {
        let all: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
        match q {
            Query::Records(ids) => {
                let mut stmt = self.conn.prepare_cached(&format!("SELECT {} FROM tasks WHERE msg_id=?", all.join(",")))?;
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                for id in ids.iter().filter(|id| seen.insert(id.as_str())) {
                    let mut rows = stmt.query([id])?;
                    if let Some(row) = rows.next()? {
                        out.push(from_row(row)?);
                    }
                }
                Ok(Answer::Records(out))
            }
            Query::History => {
                let mut stmt = self.conn.prepare_cached("SELECT msg_id, submitted FROM tasks ORDER BY submitted, rowid")?;
                let ids = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<(String, String)>>>()?;
                Ok(Answer::History(ids))
            }
            Query::Find { query, buffers, result_buffers } => {
                let cols: Vec<&str> = all
                    .iter()
                    .map(|c| match *c {
                        "buffers" if !buffers => "NULL",
                        "result_buffers" if !result_buffers => "NULL",
                        c => c,
                    })
                    .collect();
                let (clause, args) = sql_prefilter(query);
                let mut stmt = self.conn.prepare(&format!("SELECT {} FROM tasks{clause} ORDER BY submitted, rowid", cols.join(",")))?;
                let mut rows = stmt.query(params_from_iter(args))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let r = from_row(row)?;
                    match matches_query(&record_json(&r), query) {
                        Ok(true) => out.push(r),
                        Ok(false) => {}
                        Err(e) => return Ok(Answer::failed("ValueError", e)),
                    }
                }
                Ok(Answer::Records(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, engine: &str, submitted: &str, bufs: &[&'static [u8]], result_bufs: &[&'static [u8]]) -> Record {
        let mut request = vec![
            Bytes::from_static(b"sig"),
            Bytes::from(format!(r#"{{"msg_id": "{id}", "msg_type": "apply_request"}}"#)),
            Bytes::from_static(b"{}"),
            Bytes::from_static(br#"{"label": "L"}"#),
            Bytes::from_static(b"{ }"),
        ];
        request.extend(bufs.iter().map(|b| Bytes::from_static(b)));
        let mut result = vec![
            Bytes::from_static(b"rsig"),
            Bytes::from(format!(r#"{{"msg_type":"apply_reply","msg_id":"r{id}"}}"#)),
            request[1].clone(),
            Bytes::from_static(br#"{"status":"ok"}"#),
            Bytes::from_static(br#"{"status":  "ok"}"#),
        ];
        result.extend(result_bufs.iter().map(|b| Bytes::from_static(b)));
        let mut io = Map::new();
        io.insert("stdout".into(), json!("out\n"));
        io.insert("execute_result".into(), json!({"data": {"text/plain": "42"}}));
        Record {
            msg_id: id.into(),
            chan: Chan::Task,
            request,
            client: Some(Bytes::from_static(b"\0client\xff")),
            engine_uuid: Some(engine.into()),
            submitted: submitted.into(),
            started: Some("2026-01-01T00:00:01.000000Z".into()),
            completed: Some("2026-01-01T00:00:02.000000Z".into()),
            received: Some("2026-01-01T00:00:03.000000Z".into()),
            result: Some(result),
            resubmitted: None,
            io,
        }
    }

    /// The stored form drops the signatures (never read back); everything else round-trips.
    fn unsigned(mut r: Record) -> Record {
        r.request[0] = Bytes::new();
        if let Some(s) = r.result.as_mut() {
            s[0] = Bytes::new();
        }
        r
    }

    fn writer(dir: &Path) -> Writer {
        let path = dir.join("tasks.db");
        Writer::new(open(&path, false).unwrap(), path)
    }

    fn put(w: &mut Writer, r: &Record) {
        w.apply(vec![StoreMsg { op: StoreOp::Put(Box::new(r.clone())), reply: None }]);
    }

    fn records(a: Answer) -> Vec<Record> {
        match a {
            Answer::Records(r) => r,
            other => panic!("expected records, got {other:?}"),
        }
    }

    #[test]
    fn buffers_round_trip_and_bad_blobs_are_errors() {
        let bufs = vec![Bytes::from_static(b""), Bytes::from_static(b"\0\x01\x02"), Bytes::from(vec![7u8; 100_000])];
        assert_eq!(decode_buffers(encode_buffers(&bufs).as_deref()).unwrap(), bufs);
        assert_eq!(encode_buffers(&[]), None);
        assert_eq!(decode_buffers(None).unwrap(), Vec::<Bytes>::new());
        assert!(decode_buffers(Some(&[1, 2, 3])).is_err());
        assert!(decode_buffers(Some(&[9, 0, 0, 0, 0, 0, 0, 0, 1])).is_err());
        assert!(decode_buffers(Some(&u64::MAX.to_le_bytes())).is_err());
    }

    #[test]
    fn records_round_trip_byte_for_byte_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = record("a", "e0", "2026-01-01T00:00:00.000001Z", &[b"in\0put", b""], &[b"\xffresult", b"2"]);
        let mut b = record("b", "e1", "2026-01-01T00:00:00.000002Z", &[], &[]);
        b.result = None;
        b.client = None;
        b.io.clear();
        {
            let mut w = writer(dir.path());
            put(&mut w, &a);
            put(&mut w, &b);
        }
        let path = dir.path().join("tasks.db");
        let w = Writer::new(open(&path, true).unwrap(), path);
        let got = records(w.query(&Query::Records(vec!["b".into(), "a".into(), "missing".into(), "a".into()])).unwrap());
        assert_eq!(got, vec![unsigned(b), unsigned(a.clone())]);
        assert_eq!(record_json(&got[1]), record_json(&a));
        match w.query(&Query::History).unwrap() {
            Answer::History(h) => assert_eq!(h.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), ["a", "b"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn late_output_resubmission_and_purges_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let (a, b, c) = (record("a", "e0", "1", &[], &[]), record("b", "e1", "2", &[], &[]), record("c", "e1", "3", &[], &[]));
        for r in [&a, &b, &c] {
            put(&mut w, r);
        }
        let mut late = a.clone();
        late.io.insert("stderr".into(), json!("warn\n"));
        w.apply(vec![
            StoreMsg { op: StoreOp::Io(Box::new(late)), reply: None },
            StoreMsg { op: StoreOp::Resubmitted { msg_id: "a".into(), new_id: "a2".into() }, reply: None },
        ]);
        let got = records(w.query(&Query::Records(vec!["a".into()])).unwrap());
        assert_eq!(got[0].io["stderr"], "warn\n");
        assert_eq!(got[0].io["stdout"], "out\n");
        assert_eq!(got[0].resubmitted.as_deref(), Some("a2"));

        w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::Engine("e1".into())), reply: None }]);
        let ids = |w: &Writer| {
            records(w.query(&Query::Find { query: Map::new(), buffers: false, result_buffers: false }).unwrap())
                .into_iter()
                .map(|r| r.msg_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&w), ["a"]);
        put(&mut w, &b);
        w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::Ids(vec!["a".into(), "zz".into()])), reply: None }]);
        assert_eq!(ids(&w), ["b"]);
        w.apply(vec![StoreMsg { op: StoreOp::Purge(Purge::All), reply: None }]);
        assert!(ids(&w).is_empty());
    }

    #[test]
    fn lookups_in_a_batch_see_the_writes_queued_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let (tx, mut rx) = oneshot::channel();
        let a = record("a", "e0", "1", &[b"x"], &[]);
        w.apply(vec![
            StoreMsg { op: StoreOp::Put(Box::new(a.clone())), reply: None },
            StoreMsg { op: StoreOp::Query { token: 1, query: Query::Records(vec!["a".into()]) }, reply: Some(tx) },
        ]);
        assert_eq!(records(rx.try_recv().unwrap()), vec![unsigned(a)]);
    }

    #[test]
    fn find_supports_the_query_operators_db_query_has() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        for (i, e) in ["e0", "e1", "e0", "e2"].iter().enumerate() {
            put(&mut w, &record(&format!("m{i}"), e, &format!("2026-01-01T00:00:0{i}.000000Z"), &[b"req"], &[b"res"]));
        }
        let find = |q: Value, buffers: bool| -> Vec<Record> {
            let Value::Object(q) = q else { panic!() };
            records(w.query(&Query::Find { query: q, buffers, result_buffers: buffers }).unwrap())
        };
        let ids = |rs: Vec<Record>| rs.into_iter().map(|r| r.msg_id).collect::<Vec<_>>();
        assert_eq!(ids(find(json!({}), false)), ["m0", "m1", "m2", "m3"]);
        assert_eq!(ids(find(json!({"engine_uuid": "e0"}), false)), ["m0", "m2"]);
        assert_eq!(ids(find(json!({"msg_id": {"$in": ["m1", "m3", "nope"]}}), false)), ["m1", "m3"]);
        assert_eq!(ids(find(json!({"msg_id": {"$nin": ["m1", "m3"]}}), false)), ["m0", "m2"]);
        assert_eq!(ids(find(json!({"submitted": {"$gte": "2026-01-01T00:00:01", "$lt": "2026-01-01T00:00:03"}}), false)), ["m1", "m2"]);
        assert_eq!(ids(find(json!({"engine_uuid": {"$ne": "e0"}, "completed": {"$gt": "2000"}}), false)), ["m1", "m3"]);
        // Keys that are not columns are matched on the record dict.
        assert_eq!(ids(find(json!({"header": {"$eq": {"msg_id": "m2", "msg_type": "apply_request"}}}), false)), ["m2"]);
        assert_eq!(ids(find(json!({"stdout": "out\n", "resubmitted": null}), false)).len(), 4);
        assert_eq!(ids(find(json!({"label": "L", "queue": "task"}), false)).len(), 4);
        // Buffers only when asked for.
        let with = find(json!({"msg_id": "m0"}), true);
        assert_eq!(with[0].request[5..], [Bytes::from_static(b"req")]);
        assert_eq!(with[0].result.as_ref().unwrap()[5..], [Bytes::from_static(b"res")]);
        let without = find(json!({"msg_id": "m0"}), false);
        assert_eq!(without[0].request.len(), 5);
        match w
            .query(&Query::Find {
                query: json!({"msg_id": {"$regex": "m"}}).as_object().unwrap().clone(),
                buffers: false,
                result_buffers: false,
            })
            .unwrap()
        {
            Answer::Failed { ename, evalue } => assert!(ename == "ValueError" && evalue.contains("$regex"), "{evalue}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_database_sets_the_previous_one_aside_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sec/tasks.db");
        {
            let conn = open(&path, false).unwrap();
            let w = Writer::new(conn, path.clone());
            let mut w = w;
            put(&mut w, &record("old", "e", "1", &[], &[]));
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let w = Writer::new(open(&path, false).unwrap(), path.clone());
        assert!(records(w.query(&Query::Records(vec!["old".into()])).unwrap()).is_empty(), "a fresh start without --restore");
        let prev = PathBuf::from(format!("{}.prev", path.display()));
        let old = Writer::new(open(&prev, true).unwrap(), prev);
        assert_eq!(records(old.query(&Query::Records(vec!["old".into()])).unwrap()).len(), 1, "kept as tasks.db.prev");
    }

    #[test]
    fn corrupt_foreign_and_unwritable_files_are_startup_errors() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let e = open(&garbage, true).unwrap_err().to_string();
        assert!(e.contains("garbage.db") && e.contains("not an rpx task database"), "{e}");

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE tasks (x INTEGER); PRAGMA user_version=1;").unwrap();
        let e = open(&foreign, true).unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("PRAGMA user_version=7;").unwrap();
        let e = open(&other, true).unwrap_err().to_string();
        assert!(e.contains("schema version 7"), "{e}");

        // A location that cannot hold a file.
        let e = open(&garbage.join("tasks.db"), false).unwrap_err().to_string();
        assert!(e.contains("cannot create the directory"), "{e}");

        // A directory we cannot write into (root ignores modes: skip the check then).
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        if std::fs::write(ro.join("probe"), b"").is_err() {
            let e = open(&ro.join("tasks.db"), false).unwrap_err().to_string();
            assert!(e.contains("cannot create"), "{e}");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    /// A write that fails later (here: the file may not grow, as on a full disk) is counted and
    /// logged; the writer keeps applying and answering what comes after it.
    #[test]
    fn a_failed_write_is_counted_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, &record("small", "e", "1", &[], &[]));
        let pages: i64 = w.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        w.conn.query_row(&format!("PRAGMA max_page_count={pages}"), [], |r| r.get::<_, i64>(0)).unwrap();
        let big: &'static [u8] = Box::leak(vec![9u8; 1 << 20].into_boxed_slice());
        put(&mut w, &record("big", "e", "2", &[big], &[]));
        assert!(w.failed_writes >= 1, "the full database refused the record");
        let (tx, mut rx) = oneshot::channel();
        w.apply(vec![
            StoreMsg { op: StoreOp::Resubmitted { msg_id: "small".into(), new_id: "s2".into() }, reply: None },
            StoreMsg { op: StoreOp::Query { token: 1, query: Query::Records(vec!["small".into(), "big".into()]) }, reply: Some(tx) },
        ]);
        let got = records(rx.try_recv().unwrap());
        assert_eq!(got.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>(), ["small"]);
        assert_eq!(got[0].resubmitted.as_deref(), Some("s2"), "later writes still land");
    }

    #[tokio::test]
    async fn a_stopped_writer_fails_lookups_instead_of_hanging() {
        use futures::StreamExt;
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let (_keep, done) = oneshot::channel();
        let mut h = StoreHandle { tx, done, path: "tasks.db".into(), stuck: false, dropped: 0 };
        let mut lookups = futures::stream::FuturesUnordered::new();
        h.submit(vec![StoreOp::Purge(Purge::All), StoreOp::Query { token: 7, query: Query::History }], &mut lookups).await;
        let (token, answer) = tokio::time::timeout(Duration::from_secs(5), lookups.next()).await.unwrap().unwrap();
        assert_eq!(token, 7);
        assert!(matches!(answer, Answer::Failed { ref ename, .. } if ename == "RuntimeError"), "{answer:?}");
        assert_eq!((h.stuck, h.dropped), (true, 2));
    }

    #[test]
    fn db_kind_parses() {
        assert_eq!("sqlite".parse::<DbKind>(), Ok(DbKind::Sqlite));
        assert_eq!("memory".parse::<DbKind>(), Ok(DbKind::Memory));
        assert!("mongodb".parse::<DbKind>().is_err());
    }
}
