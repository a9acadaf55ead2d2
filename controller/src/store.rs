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

use rusqlite::{params_from_iter, Connection, OpenFlags};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::Profile;

use crate::hub::matches_query;
use crate::state::Record;
use crate::{Error, Result};

mod rows;
#[cfg(test)]
mod tests;

pub use rows::{decode_buffers, encode_buffers, record_json, result_record};
use rows::{from_row, io_text, sql_prefilter, text, to_row};

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
        ename: ErrorName,
        evalue: String,
    },
}

impl Answer {
    pub fn failed(ename: ErrorName, evalue: impl Into<String>) -> Answer {
        Answer::Failed { ename, evalue: evalue.into() }
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
                                ErrorName::RuntimeError,
                                "the task database is unavailable (its writer stopped or is stuck; see the controller log)",
                            ),
                            Err(_) => Answer::failed(
                                ErrorName::TimeoutError,
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
                        .unwrap_or_else(|e| Answer::failed(ErrorName::RuntimeError, format!("task database {}: {e}", self.path.display())));
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
                        Err(e) => return Ok(Answer::failed(ErrorName::ValueError, e)),
                    }
                }
                Ok(Answer::Records(out))
            }
        }
    }
}
