//! How a task [`Record`] becomes a row of the `tasks` table and back: buffers as one blob,
//! frames as text, the record's JSON for `db_request`, the `result_request` record, and the SQL
//! pre-filter a `db_request` query narrows rows with.

use bytes::Bytes;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::Row;
use serde_json::{json, Map, Value};

use rpx_protocol::hub::{ResultIo, ResultRecord};

use crate::state::Record;
use crate::wire::Chan;

use super::TEXT_KEYS;

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
pub(super) fn frame_sql(b: Option<&Bytes>) -> ToSqlOutput<'_> {
    match b {
        None => ToSqlOutput::Borrowed(ValueRef::Null),
        Some(b) if std::str::from_utf8(b).is_ok() => ToSqlOutput::Borrowed(ValueRef::Text(b)),
        Some(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
    }
}

pub(super) fn opt_text(s: Option<&str>) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(s.map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes())))
}

pub(super) fn text(s: &str) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
}

pub(super) fn blob(b: Option<Vec<u8>>) -> ToSqlOutput<'static> {
    b.map_or(ToSqlOutput::Borrowed(ValueRef::Null), |b| ToSqlOutput::Owned(SqlValue::Blob(b)))
}

pub(super) fn io_text<'a>(r: &'a Record, key: &str) -> ToSqlOutput<'a> {
    match r.io.get(key) {
        None => ToSqlOutput::Borrowed(ValueRef::Null),
        Some(Value::String(s)) if key == "stdout" || key == "stderr" => text(s),
        Some(v) => ToSqlOutput::Owned(SqlValue::Text(v.to_string())),
    }
}

/// The row of a record, in [`COLUMNS`] order, borrowing from it where it can.
pub(super) fn to_row(r: &Record) -> Vec<ToSqlOutput<'_>> {
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

pub(super) fn bytes_at(row: &Row, i: usize) -> rusqlite::Result<Option<Bytes>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(Bytes::copy_from_slice(t)),
        other => Some(Bytes::from(format!("{other:?}"))),
    })
}

pub(super) fn conversion(i: usize, e: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Blob, e.into())
}

/// A record from a row selected with all [`COLUMNS`] in order.
pub(super) fn from_row(row: &Row) -> rusqlite::Result<Record> {
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
pub(super) struct Labelled {
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
pub(super) fn record_io(r: &Record, key: &str) -> Value {
    match r.io.get(key) {
        Some(v) => v.clone(),
        None if key == "stdout" || key == "stderr" => json!(""),
        None => Value::Null,
    }
}

/// The SQL pre-filter for a `db_request` query: conditions on [`TEXT_KEYS`] with string
/// arguments (`= $eq $gt $gte $lt $lte $in`). Every row it keeps is still checked with
/// [`matches_query`], so it may only drop rows the query would drop too.
pub(super) fn sql_prefilter(query: &Map<String, Value>) -> (String, Vec<SqlValue>) {
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
