//! Load-balanced tasks: submission (queue limit, dependencies, timeouts), scheduling onto
//! engines, retries, failures, and completing task records.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashSet, HashSetExt};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use rpx_protocol::content::ErrorName;
use rpx_protocol::message::{error_content, now_iso};
use rpx_protocol::session::join_frames;

use super::{Comm, Hub, Sock, HUB_IDENT};
use crate::scheduler::{choose, has_capacity};
use crate::state::{Dep, InFlight, Job, Record};
use crate::store::StoreOp;
use crate::wire::{reply_type, Chan, Reply, Request};

impl Hub {
    pub(super) fn on_task_submitted<C: Comm>(&mut self, c: &mut C, r: Request, now: Instant) {
        let msg_id = r.msg_id.clone();
        self.records.insert(Record::submitted(&msg_id, Chan::Task, &r.signed, &r.client));
        let deps = Dep::parse(r.info.after.as_ref()).and_then(|a| Dep::parse(r.info.follow.as_ref()).map(|f| (a, f)));
        let job = |after: Dep, follow: Dep| Job {
            msg_id: msg_id.clone(),
            client: Some(r.client.clone()),
            signed: r.signed.clone(),
            msg_type: r.msg_type.clone(),
            targets: r.info.targets.iter().cloned().collect(),
            retries: r.info.retries,
            deadline: r.info.timeout.map(|t| now + Duration::from_secs_f64(t.min(1e9))),
            after,
            follow,
            blacklist: HashSet::new(),
            engine: None,
        };
        if self.jobs.len() >= self.cfg.queue_limit {
            // Refused whole and at once: the client hears why, and nothing queued is lost.
            self.jobs.insert(msg_id.clone(), Box::new(job(Dep::default(), Dep::default())));
            let limit = self.cfg.queue_limit;
            warn!(msg_id = %msg_id, limit, "refused a task: the queue is full");
            return self.fail_job(
                c,
                &msg_id,
                ErrorName::QueueFull,
                &format!("Task {msg_id} refused: the controller holds {limit} unfinished load-balanced tasks (--queue-limit)"),
            );
        }
        let (after, follow) = match deps {
            Ok(d) => d,
            Err(e) => {
                self.jobs.insert(msg_id.clone(), Box::new(job(Dep::default(), Dep::default())));
                return self.fail_job(c, &msg_id, ErrorName::InvalidDependency, &format!("Task {msg_id}: {e}"));
            }
        };
        let j = job(after, follow);
        // Dependencies are checked before the job is queued (a task naming itself is invalid,
        // so its own entry makes no difference), and the job is moved in, not copied.
        let refused = [&j.after, &j.follow].into_iter().find_map(|dep| {
            if dep.ids.iter().any(|d| *d == msg_id || !(self.jobs.contains_key(d) || self.done.contains(d))) {
                return Some((ErrorName::InvalidDependency, format!("Task {msg_id} depends on unknown or invalid tasks")));
            }
            dep.unreachable(|d| self.done.get(d).is_some_and(|x| x.success), |d| self.done.get(d).is_some_and(|x| !x.success))
                .then(|| (ErrorName::ImpossibleDependency, format!("Task {msg_id} has dependencies that cannot be met")))
        });
        let deadline = j.deadline;
        self.jobs.insert(msg_id.clone(), Box::new(j));
        if let Some((name, why)) = refused {
            return self.fail_job(c, &msg_id, name, &why);
        }
        if let Some(d) = deadline {
            self.deadlines.push(Reverse((d, msg_id.clone())));
        }
        self.queue.push_back(msg_id);
        self.schedule(c);
    }

    /// Assign queued tasks to engines while any engine has room.
    pub fn schedule<C: Comm>(&mut self, c: &mut C) {
        if self.queue.is_empty() {
            return;
        }
        let mut free: usize = if self.cfg.hwm == 0 {
            usize::MAX
        } else {
            self.engines
                .lru
                .iter()
                .filter_map(|id| self.engines.get(*id))
                .map(|e| e.pace.limit(self.cfg.hwm).saturating_sub(e.task_load))
                .sum()
        };
        if free == 0 {
            // Every engine is at its high-water mark: nothing to place, and the queue stays as
            // it is (no pass over thousands of queued tasks per submission).
            return;
        }
        // Tasks that must wait stay at the front, in their order; the rest of the queue is not
        // touched, so a submission or a reply costs O(tasks looked at), not O(queue length).
        let mut kept = Vec::new();
        let mut seen = HashSet::new();
        while free > 0 {
            let Some(msg_id) = self.queue.pop_front() else { break };
            let queued = self.jobs.get(&msg_id).is_some_and(|j| j.engine.is_none());
            if !queued || !seen.insert(msg_id.clone()) {
                continue;
            }
            match self.place(c, &msg_id) {
                Placement::Placed => free = free.saturating_sub(1),
                Placement::Wait => kept.push(msg_id),
                Placement::Failed => {}
            }
        }
        for msg_id in kept.into_iter().rev() {
            self.queue.push_front(msg_id);
        }
    }

    fn place<C: Comm>(&mut self, c: &mut C, msg_id: &str) -> Placement {
        let job = self.jobs.get(msg_id).expect("queued job exists");
        let done = &self.done;
        let completed = |d: &str| done.get(d).is_some_and(|x| x.success);
        let failed = |d: &str| done.get(d).is_some_and(|x| !x.success);
        if !job.after.check(completed, failed) {
            if job.after.unreachable(completed, failed) {
                self.fail_job(c, msg_id, ErrorName::ImpossibleDependency, &format!("Task {msg_id} has dependencies that cannot be met"));
                return Placement::Failed;
            }
            return Placement::Wait;
        }
        let mut candidates = Vec::new();
        let mut loads = Vec::new();
        for &eid in &self.engines.lru {
            let e = self.engines.get(eid).expect("lru engines exist");
            if !has_capacity(e.task_load, e.pace.limit(self.cfg.hwm)) || job.blacklist.contains(&eid) {
                continue;
            }
            if !job.targets.is_empty() && !job.targets.contains(&e.uuid) {
                continue;
            }
            let on = |d: &str| done.get(d).is_some_and(|x| *x.engine == *e.uuid);
            if !job.follow.check(|d| completed(d) && on(d), |d| failed(d) && on(d)) {
                continue;
            }
            candidates.push(eid);
            loads.push(e.task_load);
        }
        if candidates.is_empty() {
            if !job.targets.is_empty() {
                let live: HashSet<&str> =
                    self.engines.by_id.values().filter(|e| !job.blacklist.contains(&e.id)).map(|e| e.uuid.as_str()).collect();
                if !job.targets.iter().any(|t| live.contains(t.as_str())) {
                    self.fail_job(
                        c,
                        msg_id,
                        ErrorName::ImpossibleDependency,
                        &format!("Task {msg_id} targets only engines that are gone or already failed it"),
                    );
                    return Placement::Failed;
                }
            }
            if job.follow.all && !job.follow.is_empty() {
                let dests: HashSet<&str> = job.follow.ids.iter().filter_map(|d| done.get(d)).map(|x| &*x.engine).collect();
                if dests.len() > 1 {
                    self.fail_job(
                        c,
                        msg_id,
                        ErrorName::ImpossibleDependency,
                        &format!("Task {msg_id} follows tasks that ran on different engines"),
                    );
                    return Placement::Failed;
                }
            }
            return Placement::Wait;
        }
        let pick = candidates[choose(self.cfg.scheme, &loads, &mut self.rng)];
        let job = self.jobs.get_mut(msg_id).expect("exists");
        job.engine = Some(pick);
        let client = job.client.clone();
        let frames_signed = job.signed.clone();
        let msg_type = job.msg_type.clone();
        let header = job.signed[1].clone();
        self.engines.touch(pick);
        let e = self.engines.get_mut(pick).expect("exists");
        e.task_load += 1;
        e.inflight.insert(msg_id.to_string(), InFlight { chan: Chan::Task, client: client.clone(), msg_type, header });
        let ident = e.ident.clone();
        let uuid = e.uuid.clone();
        self.records.update(msg_id, |r| r.engine_uuid = Some(uuid));
        let route = client.unwrap_or_else(|| Bytes::from_static(HUB_IDENT));
        debug!(msg_id, engine_id = pick, load = self.engines.get(pick).map(|e| e.task_load), "task placed");
        self.send_to_engine(c, Chan::Task, pick, join_frames(vec![ident, route], frames_signed));
        Placement::Placed
    }

    pub(super) fn on_task_reply<C: Comm>(&mut self, c: &mut C, eid: u64, r: Reply, was_inflight: bool, now: Instant) {
        let parent = r.parent_msg_id.clone().unwrap_or_default();
        let e = self.engines.get_mut(eid).expect("exists");
        let uuid = e.uuid.clone();
        let ours = was_inflight && self.jobs.get(&parent).is_some_and(|j| j.engine == Some(eid));
        if !ours {
            if self.jobs.contains_key(&parent) || self.done.contains(&parent) {
                // The task is queued, running elsewhere or finished: this reply is not its answer.
                info!(engine_id = eid, msg_id = %parent, "dropped a reply to a task this engine no longer runs");
            } else {
                self.forward_reply(c, r);
            }
            return;
        }
        e.task_load = e.task_load.saturating_sub(1);
        e.pace.finished(now, e.task_load);
        let success = r.status.as_deref() == Some("ok");
        let job = self.jobs.get_mut(&parent).expect("checked");
        if !r.dependencies_met || (!success && job.retries > 0) {
            if r.dependencies_met {
                job.retries -= 1;
            }
            job.engine = None;
            job.blacklist.insert(eid);
            debug!(msg_id = %parent, engine_id = eid, "resubmitting task to another engine");
            self.queue.push_front(parent);
        } else {
            self.finish_job(&parent, success, &uuid);
            self.complete_record(&parent, &r.signed, r.started.clone(), r.date.clone(), &uuid);
            self.forward_reply(c, r);
        }
        self.schedule(c);
    }

    pub(super) fn finish_job(&mut self, msg_id: &str, success: bool, engine: &str) {
        self.jobs.remove(msg_id);
        self.done.insert(msg_id, success, engine);
    }

    /// Fail a job from the scheduler (TaskTimeout, InvalidDependency, ImpossibleDependency).
    pub(super) fn fail_job<C: Comm>(&mut self, c: &mut C, msg_id: &str, ename: ErrorName, evalue: &str) {
        let Some(job) = self.jobs.get(msg_id) else { return };
        if let Some(eid) = job.engine {
            if let Some(e) = self.engines.get_mut(eid) {
                e.inflight.remove(msg_id);
                e.task_load = e.task_load.saturating_sub(1);
            }
        }
        let parent: Value = serde_json::from_slice(&job.signed[1]).unwrap_or_else(|_| json!({}));
        let traceback = vec![format!("{ename}: {evalue}")];
        let content = error_content(ename, evalue, traceback, None);
        let signed = self.make_signed(&reply_type(&job.msg_type), &parent, &json!({}), &content);
        let client = job.client.clone();
        self.finish_job(msg_id, false, "");
        self.complete_record(msg_id, &signed, None, None, "");
        if let Some(client) = client {
            c.send(Sock::Client(Chan::Task), join_frames(vec![client], signed));
        }
    }

    pub(super) fn complete_record(
        &mut self,
        msg_id: &str,
        signed: &[Bytes],
        started: Option<String>,
        completed: Option<String>,
        engine: &str,
    ) {
        let persist = self.persist;
        let mut finished = None;
        self.records.update(msg_id, |r| {
            r.result = Some(signed.to_vec());
            r.started = started;
            r.completed = Some(completed.unwrap_or_else(now_iso));
            r.received = Some(now_iso());
            if !engine.is_empty() {
                r.engine_uuid = Some(engine.to_string());
            }
            if persist {
                finished = Some(Box::new(r.clone()));
            }
        });
        if let Some(r) = finished {
            self.store_ops.push(StoreOp::Put(r));
        }
    }
}

/// What [`Hub::place`] did with a queued task.
enum Placement {
    Placed,
    Wait,
    Failed,
}
