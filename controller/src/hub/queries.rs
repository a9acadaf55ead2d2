//! Client queries on the registration socket: connection, queue, result, history, db, purge,
//! resubmit, load and shutdown requests, with lookups parked until the task database answers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt, HashSet};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::{debug, info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::hub::{
    ConnectionReply, DbReply, DbRequest, EngineQueue, EngineRef, HistoryReply, LoadReply, PurgeIds, PurgeRequest, QueueReply, QueueRequest,
    ResubmitReply, ResubmitRequest, ResultReply, ResultRequest, StatusReply, Targets, Unassigned, UnregistrationRequest, OK,
};
use rpx_protocol::message::now_iso;
use rpx_protocol::Message;

use super::{Comm, Deferred, Hub, HUB_IDENT, UNREGISTERED};
use crate::state::Record;
use crate::store::{Answer, Purge, Query, StoreOp};
use crate::wire::{Chan, Request};

/// The `msg_type` of a stored request's header.
#[derive(Deserialize)]
struct MsgType {
    msg_type: String,
}

impl Hub {
    pub(super) fn on_query<C: Comm>(&mut self, c: &mut C, frames: Vec<Bytes>, now: Instant) {
        let msg = match self.session.decode(frames) {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "dropped a bad message on the registration socket"),
        };
        let Some(ident) = msg.idents.first().cloned() else {
            return warn!("dropped a query without a routing identity");
        };
        debug!(msg_type = %msg.msg_type(), "query");
        match msg.msg_type() {
            "registration_request" => self.on_register(c, &ident, &msg, now),
            "unregistration_request" => {
                let eid = UnregistrationRequest::deserialize(&msg.content).unwrap_or_default().id;
                match eid.filter(|id| self.engines.get(*id).is_some()) {
                    Some(id) => self.on_engine_died(c, id, UNREGISTERED, now),
                    None => info!(?eid, "unregistration of an unknown engine"),
                }
            }
            "connection_request" => {
                let ready = || self.engines.by_id.values().filter(|e| e.ready);
                let engines = ready().map(|e| (e.id.to_string(), e.uuid.clone())).collect();
                let hosts: BTreeMap<_, _> = ready().filter_map(|e| Some((e.uuid.clone(), e.host.clone()?))).collect();
                let content = ConnectionReply { status: OK.into(), engines, hosts: (!hosts.is_empty()).then_some(hosts), batches: true };
                self.query_reply(c, &ident, "connection_reply", &content, &msg, &[]);
            }
            "queue_request" => self.on_queue_request(c, &ident, &msg),
            "result_request" => self.on_result_request(c, &ident, &msg, None),
            "history_request" => self.on_history_request(c, &ident, &msg, None),
            "load_request" => {
                let loads = self.engines.by_id.values().filter(|e| e.ready).map(|e| (e.id.to_string(), e.inflight.len())).collect();
                let content = LoadReply { status: OK.into(), loads };
                self.query_reply(c, &ident, "load_reply", &content, &msg, &[]);
            }
            "purge_request" => self.on_purge(c, &ident, &msg),
            "resubmit_request" => self.on_resubmit(c, &ident, &msg, now, None),
            "db_request" => self.on_db_request(c, &ident, &msg, None),
            "shutdown_request" => {
                info!("hub shutdown requested");
                self.query_reply(c, &ident, "shutdown_reply", &StatusReply::ok(), &msg, &[]);
                self.notify(c, "shutdown_notification", &StatusReply::ok());
                self.exit_at = Some(now + Duration::from_secs(1));
            }
            other => {
                warn!(msg_type = other, "unknown query type");
                self.hub_error(c, &ident, &msg, ErrorName::KeyError, &format!("Bad Message Type: {other:?}"));
            }
        }
    }

    fn on_queue_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message) {
        let Some(req) = self.query_content::<QueueRequest, C>(c, ident, msg) else { return };
        let ids = match self.validate_targets(req.targets) {
            Ok(ids) => ids,
            Err(e) => return self.hub_error(c, ident, msg, ErrorName::IndexError, &e),
        };
        let mut engines = BTreeMap::new();
        for id in ids {
            let e = self.engines.get(id).expect("validated");
            let (mux, task) = (e.inflight_on(Chan::Mux), e.inflight_on(Chan::Task));
            let queues = if req.verbose {
                EngineQueue::Verbose { queue: mux, completed: e.recent_completed.iter().cloned().collect(), tasks: task }
            } else {
                EngineQueue::Counts { queue: mux.len(), completed: e.completed, tasks: task.len() }
            };
            engines.insert(id.to_string(), queues);
        }
        let unassigned = self.unassigned();
        let unassigned = if req.verbose { Unassigned::Ids(unassigned) } else { Unassigned::Count(unassigned.len()) };
        self.query_reply(c, ident, "queue_reply", &QueueReply { status: OK.into(), engines, unassigned }, msg, &[]);
    }

    /// Engine ids from `targets`: null (all), an int, a uuid, or a list of those.
    fn validate_targets(&self, targets: Option<Targets>) -> Result<Vec<u64>, String> {
        let Some(targets) = targets else { return Ok(self.ids()) };
        let mut out = Vec::new();
        for t in targets.into_vec() {
            let id = match &t {
                EngineRef::Id(n) => Some(*n).filter(|id| self.engines.get(*id).is_some_and(|e| e.ready)),
                EngineRef::Uuid(s) => self.engines.by_uuid(s).filter(|e| e.ready).map(|e| e.id),
                EngineRef::Other(_) => None,
            };
            out.push(id.ok_or_else(|| format!("No Such Engine: {t}"))?);
        }
        if out.is_empty() {
            return Err("No Engines Registered".into());
        }
        Ok(out)
    }

    /// The content of a query as `T`, or `None` after answering a `hub_error` that says why not.
    fn query_content<T: DeserializeOwned, C: Comm>(&self, c: &mut C, ident: &Bytes, msg: &Message) -> Option<T> {
        match T::deserialize(&msg.content) {
            Ok(t) => Some(t),
            Err(e) => {
                self.hub_error(c, ident, msg, ErrorName::ValueError, &format!("bad {}: {e}", msg.msg_type()));
                None
            }
        }
    }

    /// `stored`: the task database's answer, once a lookup of ids not in memory came back.
    fn on_result_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let looked_up = stored.is_some();
        let fetched = fetched_by_id(stored);
        let mut missing = Vec::new();
        let Some(ResultRequest { msg_ids: mut ids, status_only }) = self.query_content(c, ident, msg) else { return };
        ids.sort();
        ids.dedup();
        let mut results = BTreeMap::new();
        let (mut pending, mut completed, mut buffers) = (Vec::new(), Vec::new(), Vec::new());
        for id in &ids {
            let Some(r) = self.records.get(id).or_else(|| fetched.get(id)) else {
                if self.jobs.contains_key(id) {
                    pending.push(id.clone());
                    continue;
                }
                if self.persist && !looked_up {
                    missing.push(id.clone());
                    continue;
                }
                return self.hub_error(c, ident, msg, ErrorName::KeyError, &format!("No such message: {id}"));
            };
            if r.pending() {
                pending.push(id.clone());
                continue;
            }
            completed.push(id.clone());
            if !status_only {
                results.insert(id.clone(), crate::store::result_record(r));
                buffers.extend(r.result.as_ref().map(|s| s[5..].to_vec()).unwrap_or_default());
            }
        }
        if !missing.is_empty() {
            return self.defer(ident, msg, Query::Records(missing));
        }
        let content = ResultReply { status: OK.into(), results, pending, completed };
        self.query_reply(c, ident, "result_reply", &content, msg, &buffers);
    }

    fn on_purge<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message) {
        let Some(req) = self.query_content::<PurgeRequest, C>(c, ident, msg) else { return };
        match req.msg_ids {
            Some(PurgeIds::Named(s)) if s == "all" => {
                let ids: Vec<String> = self.records.map.values().filter(|r| !r.pending()).map(|r| r.msg_id.clone()).collect();
                for id in ids {
                    self.records.remove(&id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::All));
                }
            }
            Some(PurgeIds::Ids(ids)) => {
                if let Some(p) = ids.iter().find(|id| self.records.get(id).is_some_and(Record::pending)) {
                    return self.hub_error(c, ident, msg, ErrorName::IndexError, &format!("msg pending: {p:?}"));
                }
                for id in &ids {
                    self.records.remove(id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::Ids(ids)));
                }
            }
            _ => {}
        }
        if let Some(eids) = req.engine_ids {
            for eid in eids {
                let id = match eid {
                    EngineRef::Id(id) => Some(id),
                    _ => None,
                };
                let Some(uuid) = id.and_then(|id| self.engines.get(id)).map(|e| e.uuid.clone()) else {
                    return self.hub_error(c, ident, msg, ErrorName::IndexError, &format!("No such engine: {eid}"));
                };
                let ids: Vec<String> = self
                    .records
                    .map
                    .values()
                    .filter(|r| !r.pending() && r.engine_uuid.as_deref() == Some(&uuid))
                    .map(|r| r.msg_id.clone())
                    .collect();
                for id in ids {
                    self.records.remove(&id);
                }
                if self.persist {
                    self.store_ops.push(StoreOp::Purge(Purge::Engine(uuid)));
                }
            }
        }
        self.query_reply(c, ident, "purge_reply", &StatusReply::ok(), msg, &[]);
    }

    fn on_resubmit<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, now: Instant, stored: Option<Answer>) {
        let looked_up = stored.is_some();
        let fetched = fetched_by_id(stored);
        let Some(ResubmitRequest { msg_ids: ids }) = self.query_content(c, ident, msg) else { return };
        let missing: Vec<String> = ids.iter().filter(|id| self.records.get(id).is_none() && !fetched.contains_key(*id)).cloned().collect();
        if !missing.is_empty() {
            if self.persist && !looked_up {
                return self.defer(ident, msg, Query::Records(missing));
            }
            return self.hub_error(c, ident, msg, ErrorName::KeyError, &format!("No such msg(s): {missing:?}"));
        }
        let mut mapping = BTreeMap::new();
        for old in &ids {
            let rec = self.records.get(old).or_else(|| fetched.get(old)).expect("checked").clone();
            let Ok(Value::Object(mut header)) = serde_json::from_slice::<Value>(&rec.request[1]) else {
                return self.hub_error(c, ident, msg, ErrorName::ValueError, &format!("stored request {old} has a bad header"));
            };
            let parent = Value::Object(header.clone());
            let new_id = self.session.new_msg_id();
            header.insert("msg_id".into(), json!(new_id));
            header.insert("date".into(), json!(now_iso()));
            let msg_type = serde_json::from_slice::<MsgType>(&rec.request[1]).map_or_else(|_| "apply_request".to_string(), |h| h.msg_type);
            let content: Value = serde_json::from_slice(&rec.request[4]).unwrap_or_else(|_| json!({}));
            let signed = self.make_signed_with_header(&Value::Object(header), &parent, &json!({}), &content, &rec.request[5..]);
            self.records.update(old, |r| r.resubmitted = Some(new_id.clone()));
            if self.persist {
                self.store_ops.push(StoreOp::Resubmitted { msg_id: old.clone(), new_id: new_id.clone() });
            }
            let req = Request {
                chan: Chan::Task,
                client: Bytes::from_static(HUB_IDENT),
                route: vec![],
                signed,
                msg_id: new_id.clone(),
                msg_type,
                date: None,
                info: Default::default(),
            };
            self.on_task_submitted(c, req, now);
            if let Some(j) = self.jobs.get_mut(&new_id) {
                j.client = None;
            }
            self.records.update(&new_id, |r| r.client = None);
            mapping.insert(old.clone(), new_id);
        }
        self.query_reply(c, ident, "resubmit_reply", &ResubmitReply { status: OK.into(), resubmitted: mapping }, msg, &[]);
    }

    /// With `--db sqlite` the matching finished records come from the database (`stored`, after
    /// a lookup) and only records not written yet (pending ones) from memory.
    fn on_db_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let Some(DbRequest { query, keys }) = self.query_content(c, ident, msg) else { return };
        let Value::Object(query) = query else {
            return self.hub_error(c, ident, msg, ErrorName::TypeError, "db query must be a dict");
        };
        let mut records = Vec::new();
        let (mut buffer_lens, mut result_buffer_lens, mut buffers) = (Vec::new(), Vec::new(), Vec::new());
        let want = |k: &str| keys.as_ref().is_some_and(|ks| ks.iter().any(|x| x == k));
        let fetched = match stored {
            Some(Answer::Records(rs)) => rs,
            _ if self.persist => {
                return self.defer(ident, msg, Query::Find { query, buffers: want("buffers"), result_buffers: want("result_buffers") })
            }
            _ => Vec::new(),
        };
        let history = self.records.history();
        let mut candidates: Vec<&Record> = fetched.iter().collect();
        {
            let stored_ids: HashSet<&str> = fetched.iter().map(|r| r.msg_id.as_str()).collect();
            candidates
                .extend(history.iter().filter(|id| !stored_ids.contains(id.as_str())).map(|id| self.records.get(id).expect("in history")));
        }
        if !fetched.is_empty() {
            candidates.sort_by(|a, b| a.submitted.cmp(&b.submitted));
        }
        for r in candidates {
            let full = crate::store::record_json(r);
            match matches_query(&full, &query) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return self.hub_error(c, ident, msg, ErrorName::ValueError, &e),
            }
            let rec = match &keys {
                Some(ks) => {
                    let mut m = Map::new();
                    m.insert("msg_id".into(), json!(r.msg_id));
                    for k in ks {
                        if let Some(v) = full.get(k) {
                            m.insert(k.clone(), v.clone());
                        }
                    }
                    Value::Object(m)
                }
                None => full,
            };
            if want("buffers") {
                let b = r.request[5..].to_vec();
                buffer_lens.push(b.len());
                buffers.extend(b);
            }
            if want("result_buffers") {
                let b = r.result.as_ref().map(|s| s[5..].to_vec()).unwrap_or_default();
                result_buffer_lens.push(b.len());
                buffers.extend(b);
            }
            records.push(rec);
        }
        let content = DbReply {
            status: OK.into(),
            records,
            buffer_lens: want("buffers").then_some(buffer_lens),
            result_buffer_lens: want("result_buffers").then_some(result_buffer_lens),
        };
        self.query_reply(c, ident, "db_reply", &content, msg, &buffers);
    }

    fn on_history_request<C: Comm>(&mut self, c: &mut C, ident: &Bytes, msg: &Message, stored: Option<Answer>) {
        let history: Vec<String> = if !self.persist {
            self.records.history()
        } else {
            let Some(Answer::History(mut all)) = stored else {
                return self.defer(ident, msg, Query::History);
            };
            // Stored (finished) records, then those only in memory (pending), by submission.
            let stored_ids: HashSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
            for id in self.records.history() {
                if !stored_ids.contains(&id) {
                    let submitted = self.records.get(&id).map(|r| r.submitted.clone()).unwrap_or_default();
                    all.push((id, submitted));
                }
            }
            all.sort_by(|a, b| a.1.cmp(&b.1));
            all.into_iter().map(|(id, _)| id).collect()
        };
        self.query_reply(c, ident, "history_reply", &HistoryReply { status: OK.into(), history }, msg, &[]);
    }

    /// Park a client query until the task database answers `query`.
    fn defer(&mut self, ident: &Bytes, msg: &Message, query: Query) {
        self.next_token += 1;
        let token = self.next_token;
        self.deferred.insert(token, Deferred { ident: ident.clone(), msg: msg.clone() });
        self.store_ops.push(StoreOp::Query { token, query });
    }

    /// The task database answered: finish the query that waited for it.
    pub(super) fn on_stored<C: Comm>(&mut self, c: &mut C, token: u64, answer: Answer, now: Instant) {
        let Some(Deferred { ident, msg }) = self.deferred.remove(&token) else {
            return warn!(token, "an answer from the task database that no query waits for");
        };
        if let Answer::Failed { ename, evalue } = &answer {
            return self.hub_error(c, &ident, &msg, ename.clone(), evalue);
        }
        match msg.msg_type() {
            "result_request" => self.on_result_request(c, &ident, &msg, Some(answer)),
            "history_request" => self.on_history_request(c, &ident, &msg, Some(answer)),
            "resubmit_request" => self.on_resubmit(c, &ident, &msg, now, Some(answer)),
            "db_request" => self.on_db_request(c, &ident, &msg, Some(answer)),
            other => warn!(msg_type = other, "a deferred query of an unexpected type"),
        }
    }
}

/// Records from a database answer, by msg_id.
fn fetched_by_id(stored: Option<Answer>) -> HashMap<String, Record> {
    match stored {
        Some(Answer::Records(rs)) => rs.into_iter().map(|r| (r.msg_id.clone(), r)).collect(),
        _ => HashMap::new(),
    }
}

/// Match a record against a Mongo-style query (`$in $nin $eq $ne $gt $gte $lt $lte`, or a value).
pub fn matches_query(rec: &Value, query: &Map<String, Value>) -> Result<bool, String> {
    use std::cmp::Ordering;
    fn cmp(a: &Value, b: &Value) -> Option<Ordering> {
        match (a, b) {
            (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
            (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
            _ => None,
        }
    }
    for (key, cond) in query {
        let v = rec.get(key).unwrap_or(&Value::Null);
        let ok = match cond {
            Value::Object(ops) if ops.keys().all(|k| k.starts_with('$')) => {
                let mut all = true;
                for (op, arg) in ops {
                    let r = match op.as_str() {
                        "$in" => arg.as_array().is_some_and(|a| a.contains(v)),
                        "$nin" => !arg.as_array().is_some_and(|a| a.contains(v)),
                        "$eq" => v == arg,
                        "$ne" => v != arg,
                        "$gt" => cmp(v, arg) == Some(Ordering::Greater),
                        "$gte" => matches!(cmp(v, arg), Some(Ordering::Greater | Ordering::Equal)),
                        "$lt" => cmp(v, arg) == Some(Ordering::Less),
                        "$lte" => matches!(cmp(v, arg), Some(Ordering::Less | Ordering::Equal)),
                        other => return Err(format!("unsupported query operator {other}")),
                    };
                    all &= r;
                }
                all
            }
            other => v == other,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}
