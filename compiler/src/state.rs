//! The compiler's decisions, as plain functions over its state: which engines share a compiler
//! context, when a batch of identical cells is compiled once, when a group of engines is forked
//! into its own context because their histories diverge, and what verdict evcxr sees.
//!
//! Model: every engine belongs to one *group*; a group owns one evcxr context whose variables are
//! a subset of every member's variables (evcxr aborts a runtime that lacks a variable it
//! believes in). A cell is compiled once per group and loaded by every member. When only some
//! members run a cell (a subset target, a slow engine still busy, a panic on some), those engines
//! move to a new group whose context is rebuilt by replaying the group's history without running
//! anything ("dry" replay), so every engine always has a context that matches its own state.
//! A subset cell that may leave the context as it found it ([`neutral`]) runs in the group's
//! own context instead; only if it did change it do the other members fork off. Groups whose
//! histories become identical again are merged.
//!
//! Nothing here touches sockets or evcxr: callers feed events and carry out [`Action`]s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rpx_protocol::compile::{msg_type, Artifact, CellReply, Load, LoadOutcome};
use serde_json::Value;

/// An engine's routing identity (its uuid).
pub type Ident = Bytes;
/// A compiler context (and the group that owns it).
pub type CtxId = u64;

/// What evcxr is told about one load, reduced over the engines that ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Some engine panicked or died: evcxr forgets the variables the cell defined.
    Panic,
    /// A `?` returned an error: evcxr forgets the cell's new variables.
    ErrorOccurred,
    /// Every engine reported the same variables changed type: evcxr recompiles and reruns.
    ChangedTypes(Vec<String>),
}

impl Verdict {
    /// The marker lines the relay writes before `EVCXR_EXECUTION_COMPLETE`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Verdict::Ok => vec![],
            Verdict::Panic => vec!["EVCXR_PANIC_NOTIFICATION".into()],
            Verdict::ErrorOccurred => vec!["EVCXR_ERROR_OCCURRED".into()],
            Verdict::ChangedTypes(v) => v.iter().map(|n| format!("EVCXR_VARIABLE_CHANGED_TYPE:{n}")).collect(),
        }
    }

    /// The verdict one engine's outcome implies on its own.
    fn of(outcome: &LoadOutcome) -> Verdict {
        match outcome {
            LoadOutcome::Complete { panicked: true, .. } | LoadOutcome::Died { .. } | LoadOutcome::Skipped { .. } => Verdict::Panic,
            LoadOutcome::Complete { error_occurred: true, .. } => Verdict::ErrorOccurred,
            LoadOutcome::Complete { changed_types, .. } if !changed_types.is_empty() => Verdict::ChangedTypes(changed_types.clone()),
            LoadOutcome::Complete { .. } => Verdict::Ok,
        }
    }

    /// Reduce the outcomes of every engine that ran a load.
    pub fn reduce<'a>(outcomes: impl IntoIterator<Item = &'a LoadOutcome>) -> Verdict {
        let all: Vec<Verdict> = outcomes.into_iter().map(Verdict::of).collect();
        if all.contains(&Verdict::Panic) {
            return Verdict::Panic;
        }
        if all.contains(&Verdict::ErrorOccurred) {
            return Verdict::ErrorOccurred;
        }
        match all.first() {
            Some(first @ Verdict::ChangedTypes(_)) if all.iter().all(|v| v == first) => first.clone(),
            // Some engines saw a type change and skipped the cell, others ran it: forget it.
            _ if all.iter().any(|v| matches!(v, Verdict::ChangedTypes(_))) => Verdict::Panic,
            _ => Verdict::Ok,
        }
    }

    /// The verdict to record in a history for replay (a type-change retry replays as a plain run).
    fn for_history(&self) -> Verdict {
        match self {
            Verdict::ChangedTypes(_) => Verdict::Ok,
            v => v.clone(),
        }
    }
}

/// One cell of a group's history: replaying these in a fresh context rebuilds its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    pub code: String,
    pub verdict: Verdict,
}

impl Hist {
    /// A cell of an engine's own history, as it ran on that engine.
    pub fn from_engine(code: String, outcome: &LoadOutcome) -> Hist {
        Hist { code, verdict: Verdict::of(outcome).for_history() }
    }
}

/// How an eval ended in a context.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalResult {
    Ok {
        has_vars: bool,
        /// The eval changed the context's variables (names or types) or item names.
        changed: bool,
    },
    CompileError {
        evalue: String,
        traceback: Vec<String>,
    },
    Failed {
        message: String,
    },
}

/// Something the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a compile-protocol message to an engine.
    Send { to: Ident, msg_type: &'static str, content: Value },
    /// Start a new context (a thread with its own evcxr context).
    NewContext { ctx: CtxId },
    /// Replay cells in a context without running them on engines.
    Replay { ctx: CtxId, cells: Vec<Hist> },
    /// Compile and run a cell in a context.
    Eval { ctx: CtxId, code: String },
    /// Answer the context's pending load with these marker lines.
    Verdict { ctx: CtxId, lines: Vec<String> },
    /// Drop a context.
    DropContext { ctx: CtxId },
    /// Call [`Compiler::on_tick`] at this time.
    WakeAt(Instant),
}

#[derive(Debug)]
struct EngineState {
    id: u64,
    group: Option<CtxId>,
}

#[derive(Debug, Default)]
struct Running {
    code: String,
    /// Engine -> its cell id, for the engines this eval runs on.
    members: BTreeMap<Ident, String>,
    replied: BTreeSet<Ident>,
    /// Engines the current load still waits for; `None` while compiling.
    pending: Option<BTreeSet<Ident>>,
    outcomes: BTreeMap<Ident, LoadOutcome>,
    /// The last load's verdict over the engines still in the group.
    verdict: Option<Verdict>,
    /// Only `members`, a part of the group, run this cell, in the group's own context: the
    /// other members did not run it (they fork off if it changes the context, or if they ask
    /// for a cell while it runs).
    in_place: bool,
}

#[derive(Debug)]
struct Group {
    engines: BTreeSet<Ident>,
    history: Vec<Hist>,
    has_vars: bool,
    running: Option<Running>,
    deferred: Vec<Batch>,
}

impl Group {
    fn new(history: Vec<Hist>) -> Group {
        let has_vars = !history.is_empty();
        Group { engines: BTreeSet::new(), history, has_vars, running: None, deferred: Vec::new() }
    }
    fn idle(&self) -> bool {
        self.running.is_none() && self.deferred.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Batch {
    group: CtxId,
    code: String,
    engines: BTreeMap<Ident, String>,
    deadline: Instant,
    /// The group's context is still starting: the batch waits for it (nothing could run
    /// sooner), collecting the engines that ask meanwhile, instead of running on (or forking)
    /// the engines that asked first.
    parked: bool,
}

/// When the compiler keeps a *spare* context ready (evcxr and rust-analyzer warmed up, ~0.4 GB),
/// so that a group forking off (a `%px --targets` subset, a panic on some engines) or an engine
/// arriving with a history does not wait seconds for a new context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SparePolicy {
    /// Always: the latency of the first fork is bought with a second context from the start.
    Always,
    /// Once a second group has existed: a cluster whose engines never diverge keeps one context.
    AfterFork,
    /// Never: every new group waits for its context to be created.
    Never,
}

/// The compiler's state.
#[derive(Debug)]
pub struct Compiler {
    engines: HashMap<Ident, EngineState>,
    groups: BTreeMap<CtxId, Group>,
    spare: Option<CtxId>,
    spare_policy: SparePolicy,
    /// More than one group has existed at once.
    forked: bool,
    next_ctx: CtxId,
    batches: Vec<Batch>,
    /// How long to wait for identical cells from the other engines of a group.
    window: Duration,
    /// Contexts that have started (evcxr and rust-analyzer warmed up, or failed to start).
    started: BTreeSet<CtxId>,
}

fn reply(to: &Ident, cell_id: &str, status: &str, ename: &str, evalue: &str, traceback: Vec<String>, note: Option<String>) -> Action {
    let r = CellReply {
        cell_id: cell_id.to_string(),
        status: status.to_string(),
        error: rpx_protocol::content::ErrorContent::bare(ename, evalue, traceback),
        note,
    };
    Action::Send { to: to.clone(), msg_type: msg_type::CELL_REPLY, content: serde_json::to_value(r).expect("serializes") }
}

fn ok_reply(to: &Ident, cell_id: &str) -> Action {
    reply(to, cell_id, "ok", "", "", vec![], None)
}

impl Compiler {
    #[cfg(test)]
    pub fn new(window: Duration) -> Compiler {
        Compiler::with_spare_policy(window, SparePolicy::AfterFork)
    }

    pub fn with_spare_policy(window: Duration, spare_policy: SparePolicy) -> Compiler {
        Compiler {
            engines: HashMap::new(),
            groups: BTreeMap::new(),
            spare: None,
            spare_policy,
            forked: false,
            next_ctx: 1,
            batches: Vec::new(),
            window,
            started: BTreeSet::new(),
        }
    }

    /// Start warming the first context (the spare that the first engines' group takes).
    pub fn start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.ensure_spare(&mut out);
        out
    }

    /// Number of live contexts (groups plus the spare).
    pub fn context_count(&self) -> usize {
        self.groups.len() + usize::from(self.spare.is_some())
    }

    /// Engine ids per group, for logs and tests.
    pub fn groups(&self) -> Vec<Vec<u64>> {
        self.groups
            .values()
            .map(|g| {
                let mut ids: Vec<u64> = g.engines.iter().filter_map(|e| self.engines.get(e)).map(|e| e.id).collect();
                ids.sort();
                ids
            })
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// Create a spare context unless there is one.
    fn ensure_spare(&mut self, out: &mut Vec<Action>) {
        if self.spare.is_none() {
            let ctx = self.next_ctx;
            self.next_ctx += 1;
            self.spare = Some(ctx);
            out.push(Action::NewContext { ctx });
        }
    }

    /// A new group on the spare context (created now if there is none), and a new spare if the
    /// [`SparePolicy`] asks for one.
    fn take_spare(&mut self, history: Vec<Hist>, out: &mut Vec<Action>) -> CtxId {
        self.ensure_spare(out);
        let ctx = self.spare.take().expect("spare exists");
        if !history.is_empty() {
            out.push(Action::Replay { ctx, cells: history.clone() });
        }
        self.groups.insert(ctx, Group::new(history));
        self.forked |= self.groups.len() > 1;
        let keep = match self.spare_policy {
            SparePolicy::Always => true,
            SparePolicy::AfterFork => self.forked,
            SparePolicy::Never => false,
        };
        if keep {
            self.ensure_spare(out);
        }
        ctx
    }

    fn in_open_batch(&self, ctx: CtxId) -> bool {
        self.batches.iter().any(|b| b.group == ctx)
    }

    /// Put an engine with an empty variable store into a group that believes in no variables.
    fn assign_fresh(&mut self, e: &Ident, out: &mut Vec<Action>) {
        // A group collecting a cell takes no newcomer (its batch would no longer cover it and
        // the engines that asked would fork), unless its context is still starting: then the
        // batch waits anyway, and the newcomer asks for the same cell meanwhile.
        let joinable = self
            .groups
            .iter()
            .find(|(ctx, g)| {
                !g.engines.is_empty() && !g.has_vars && g.idle() && (!self.in_open_batch(**ctx) || !self.started.contains(*ctx))
            })
            .map(|(ctx, _)| *ctx);
        let ctx = match joinable {
            Some(ctx) => ctx,
            None => self.take_spare(Vec::new(), out),
        };
        self.groups.get_mut(&ctx).expect("group").engines.insert(e.clone());
        if let Some(st) = self.engines.get_mut(e) {
            st.group = Some(ctx);
        }
    }

    /// An engine introduced itself. `history` is what its running worker has run (empty for a
    /// fresh worker): the engine joins an idle group with exactly that history, or a new group
    /// whose context replays it, so its context never believes in a variable it lacks. An
    /// engine already known (it reconnected to this same compiler) keeps its group.
    pub fn on_hello(&mut self, e: Ident, engine_id: u64, history: Vec<Hist>) -> Vec<Action> {
        let mut out = Vec::new();
        if self.engines.contains_key(&e) {
            return out;
        }
        self.engines.insert(e.clone(), EngineState { id: engine_id, group: None });
        if history.is_empty() {
            self.assign_fresh(&e, &mut out);
            return out;
        }
        let same = self
            .groups
            .iter()
            .find(|(ctx, g)| !g.engines.is_empty() && g.history == history && g.idle() && !self.in_open_batch(**ctx))
            .map(|(ctx, _)| *ctx);
        let ctx = match same {
            Some(ctx) => ctx,
            None => self.take_spare(history, &mut out),
        };
        self.groups.get_mut(&ctx).expect("group").engines.insert(e.clone());
        if let Some(st) = self.engines.get_mut(&e) {
            st.group = Some(ctx);
        }
        out
    }

    /// An engine asks to compile and run `code` on it.
    pub fn on_cell_request(&mut self, e: Ident, cell_id: String, code: String, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(group) = self.engines.get(&e).and_then(|s| s.group) else {
            out.push(reply(
                &e,
                &cell_id,
                "error",
                "CompilerError",
                "this engine has not introduced itself to the compiler (engine_hello)",
                vec![],
                None,
            ));
            return out;
        };
        let deadline = now + self.window;
        let idx = match self.batches.iter().position(|b| b.group == group && b.code == code && !b.engines.contains_key(&e)) {
            Some(i) => i,
            None => {
                self.batches.push(Batch { group, code, engines: BTreeMap::new(), deadline, parked: false });
                self.batches.len() - 1
            }
        };
        self.batches[idx].engines.insert(e, cell_id);
        let g = &self.groups[&group];
        let covers = self.batches[idx].engines.keys().eq(g.engines.iter());
        if covers && g.running.is_none() && !self.started.contains(&group) {
            // Nothing can run before the context has started, and engines that introduce
            // themselves meanwhile join this group (see `assign_fresh`): they ask too.
            self.batches[idx].parked = true;
        } else if covers && g.running.is_none() {
            let b = self.batches.remove(idx);
            self.dispatch(b, &mut out);
        } else {
            out.push(Action::WakeAt(self.batches[idx].deadline));
        }
        out
    }

    /// Dispatch batches whose collection window has closed.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let (due, rest): (Vec<Batch>, Vec<Batch>) =
            std::mem::take(&mut self.batches).into_iter().partition(|b| b.deadline <= now && !b.parked);
        self.batches = rest;
        for b in due {
            self.dispatch(b, &mut out);
        }
        if let Some(next) = self.batches.iter().filter(|b| !b.parked).map(|b| b.deadline).min() {
            out.push(Action::WakeAt(next));
        }
        out
    }

    /// Tests: every context that exists has started.
    #[cfg(test)]
    pub fn mark_all_started(&mut self) {
        let all: Vec<CtxId> = self.groups.keys().copied().chain(self.spare).collect();
        self.started.extend(all);
    }

    /// Context `ctx` has started (or failed to): batches parked for it go out now, with every
    /// engine that asked meanwhile.
    pub fn on_context_started(&mut self, ctx: CtxId, now: Instant) -> Vec<Action> {
        self.started.insert(ctx);
        for b in self.batches.iter_mut().filter(|b| b.group == ctx && b.parked) {
            b.parked = false;
            b.deadline = now;
        }
        self.on_tick(now)
    }

    fn dispatch(&mut self, mut b: Batch, out: &mut Vec<Action>) {
        // Requests of engines that have left the group since they asked (a panic split, a fork,
        // a merge) are re-filed under their engine's current group; gone engines are dropped.
        let members = self.groups.get(&b.group).map(|g| &g.engines);
        let moved: Vec<Ident> = b.engines.keys().filter(|e| !members.is_some_and(|m| m.contains(*e))).cloned().collect();
        for e in moved {
            let cell_id = b.engines.remove(&e).expect("listed");
            if self.engines.contains_key(&e) {
                out.extend(self.on_cell_request(e, cell_id, b.code.clone(), b.deadline));
            }
        }
        if b.engines.is_empty() {
            return;
        }
        let g = self.groups.get_mut(&b.group).expect("a group with members");
        if let Some(r) = &g.running {
            // Members that already finished the running cell ask for the next one, or (a cell
            // run in place on a part of the group) members that did not run it.
            let loading = r.pending.as_ref().is_some_and(|p| !p.is_empty());
            if !loading {
                // The eval is compiling or about to finish: wait for it.
                g.deferred.push(b);
                return;
            }
            // The cell may run for long: fork them, split by what it did on each of them (`None`:
            // did not run it, and keeps the group's history as it is).
            let mut by_verdict: BTreeMap<String, (Option<Verdict>, BTreeMap<Ident, String>)> = BTreeMap::new();
            for (e, cell) in b.engines {
                let v = r.members.contains_key(&e).then(|| r.outcomes.get(&e).map(Verdict::of).unwrap_or(Verdict::Panic).for_history());
                by_verdict.entry(format!("{v:?}")).or_insert_with(|| (v, BTreeMap::new())).1.insert(e, cell);
            }
            let running_code = r.code.clone();
            for (_, (v, engines)) in by_verdict {
                let mut history = self.groups[&b.group].history.clone();
                history.extend(v.map(|verdict| Hist { code: running_code.clone(), verdict }));
                self.fork(b.group, engines, history, Some(b.code.clone()), out);
            }
            return;
        }
        if b.engines.keys().eq(g.engines.iter()) {
            g.running = Some(Running { code: b.code.clone(), members: b.engines, ..Default::default() });
            out.push(Action::Eval { ctx: b.group, code: b.code });
        } else if !self.started.contains(&b.group) {
            // Forking the engines that asked first would start a second context (and a spare)
            // that is no sooner ready than this one: wait for it with the rest of the group.
            b.parked = true;
            self.batches.push(b);
        } else if neutral::may_leave_context_alone(&b.code, g.history.last()) {
            // Likely nothing for the others to fork from: run it here for the engines that
            // asked; if it did change the context, the others fork off (`on_eval_done`).
            g.running = Some(Running { code: b.code.clone(), members: b.engines, in_place: true, ..Default::default() });
            out.push(Action::Eval { ctx: b.group, code: b.code });
        } else {
            let history = g.history.clone();
            self.fork(b.group, b.engines, history, Some(b.code), out);
        }
    }

    /// Move `engines` out of `from` into a new group replayed from `history`, then run `code` there.
    fn fork(&mut self, from: CtxId, engines: BTreeMap<Ident, String>, history: Vec<Hist>, code: Option<String>, out: &mut Vec<Action>) {
        let ctx = self.take_spare(history, out);
        if let Some(g) = self.groups.get_mut(&from) {
            for e in engines.keys() {
                g.engines.remove(e);
                if let Some(r) = &mut g.running {
                    r.members.remove(e);
                    r.outcomes.remove(e);
                }
            }
        }
        for e in engines.keys() {
            if let Some(st) = self.engines.get_mut(e) {
                st.group = Some(ctx);
            }
        }
        let g = self.groups.get_mut(&ctx).expect("new group");
        g.engines = engines.keys().cloned().collect();
        if let Some(code) = code {
            g.running = Some(Running { code: code.clone(), members: engines, ..Default::default() });
            out.push(Action::Eval { ctx, code });
        }
        self.drop_if_empty(from, out);
    }

    fn drop_if_empty(&mut self, ctx: CtxId, out: &mut Vec<Action>) {
        if self.groups.get(&ctx).is_some_and(|g| g.engines.is_empty() && g.idle()) && !self.in_open_batch(ctx) {
            self.groups.remove(&ctx);
            self.started.remove(&ctx);
            out.push(Action::DropContext { ctx });
        }
    }

    /// A context's relay received `LOAD_AND_RUN`: send the artifact to the group's engines.
    pub fn on_load_requested(&mut self, ctx: CtxId, artifact: &Artifact, fn_name: &str) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(r) = self.groups.get_mut(&ctx).and_then(|g| g.running.as_mut()) else {
            out.push(Action::Verdict { ctx, lines: vec![] });
            return out;
        };
        if r.members.is_empty() {
            out.push(Action::Verdict { ctx, lines: vec![] });
            return out;
        }
        r.outcomes.clear();
        r.pending = Some(r.members.keys().cloned().collect());
        for (e, cell_id) in &r.members {
            let load = Load { cell_id: cell_id.clone(), artifact: artifact.clone(), fn_name: fn_name.to_string() };
            out.push(Action::Send { to: e.clone(), msg_type: msg_type::LOAD, content: serde_json::to_value(load).expect("serializes") });
        }
        out
    }

    /// An engine finished (or failed) a load.
    pub fn on_load_done(&mut self, e: Ident, outcome: LoadOutcome) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(ctx) = self.engines.get(&e).and_then(|s| s.group) else { return out };
        let Some(g) = self.groups.get_mut(&ctx) else { return out };
        let Some(r) = g.running.as_mut() else { return out };
        if !r.pending.as_mut().is_some_and(|p| p.remove(&e)) {
            return out;
        }
        let cell_id = r.members.get(&e).cloned().unwrap_or_default();
        let died = matches!(outcome, LoadOutcome::Died { .. });
        let early = match &outcome {
            LoadOutcome::Complete { changed_types, .. } => changed_types.is_empty(),
            _ => true,
        };
        r.outcomes.insert(e.clone(), outcome.clone());
        if early {
            r.replied.insert(e.clone());
            if let LoadOutcome::Died { status } = &outcome {
                out.push(reply(
                    &e,
                    &cell_id,
                    "error",
                    "EngineWorkerDied",
                    &format!("the engine's worker process died ({status}); it was restarted and this engine's variables were lost"),
                    vec![],
                    None,
                ));
            } else {
                out.push(ok_reply(&e, &cell_id));
            }
        }
        if died {
            // Its store is empty now: it leaves this group (the outcome still counts as a panic).
            r.members.remove(&e);
            g.engines.remove(&e);
            self.assign_fresh(&e, &mut out);
        }
        self.maybe_finish_load(ctx, &mut out);
        out
    }

    fn maybe_finish_load(&mut self, ctx: CtxId, out: &mut Vec<Action>) {
        let Some(r) = self.groups.get_mut(&ctx).and_then(|g| g.running.as_mut()) else { return };
        if r.pending.as_ref().is_some_and(|p| p.is_empty()) {
            let v = Verdict::reduce(r.outcomes.values());
            r.pending = None;
            out.push(Action::Verdict { ctx, lines: v.lines() });
            r.verdict = Some(v);
        }
    }

    /// A context finished an eval.
    pub fn on_eval_done(&mut self, ctx: CtxId, result: EvalResult) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(g) = self.groups.get_mut(&ctx) else { return out };
        let Some(r) = g.running.take() else { return out };
        let unreplied: Vec<(Ident, String)> =
            r.members.iter().filter(|(e, _)| !r.replied.contains(*e)).map(|(e, c)| (e.clone(), c.clone())).collect();
        let mut splits: Vec<(BTreeMap<Ident, String>, Vec<Hist>)> = Vec::new();
        match &result {
            EvalResult::CompileError { evalue, traceback } => {
                for (e, c) in &unreplied {
                    out.push(reply(e, c, "error", "CompileError", evalue, traceback.clone(), None));
                }
            }
            EvalResult::Failed { message } => {
                for (e, c) in &unreplied {
                    out.push(reply(e, c, "error", "CompilerError", message, vec![], None));
                }
            }
            EvalResult::Ok { has_vars, changed } => {
                for (e, c) in &unreplied {
                    out.push(ok_reply(e, c));
                }
                // A part of the group's cell that left the context as it was changes nothing:
                // the group stays whole, its history too.
                if *changed || !r.in_place {
                    if r.in_place {
                        // The context now holds what the engines that ran the cell hold: the
                        // others fork off with the history they have.
                        let rest: BTreeMap<Ident, String> =
                            g.engines.iter().filter(|e| !r.members.contains_key(*e)).map(|e| (e.clone(), String::new())).collect();
                        if !rest.is_empty() {
                            splits.push((rest, g.history.clone()));
                        }
                    }
                    let verdict = r.verdict.clone().unwrap_or(Verdict::Ok).for_history();
                    // Engines that ran the cell cleanly while others panicked keep its variables
                    // in a context of their own; the panicked ones stay here, where evcxr forgot
                    // them.
                    if verdict == Verdict::Panic {
                        let clean: BTreeMap<Ident, String> = r
                            .outcomes
                            .iter()
                            .filter(|(e, o)| g.engines.contains(*e) && Verdict::of(o) == Verdict::Ok)
                            .map(|(e, _)| (e.clone(), String::new()))
                            .collect();
                        if !clean.is_empty() {
                            let mut h = g.history.clone();
                            h.push(Hist { code: r.code.clone(), verdict: Verdict::Ok });
                            splits.push((clean, h));
                        }
                    }
                    g.history.push(Hist { code: r.code.clone(), verdict });
                    g.has_vars = *has_vars;
                }
            }
        }
        for (engines, history) in splits {
            self.fork(ctx, engines, history, None, &mut out);
        }
        if let Some(g) = self.groups.get_mut(&ctx) {
            let deferred = std::mem::take(&mut g.deferred);
            for b in deferred {
                self.dispatch(b, &mut out);
            }
        }
        self.drop_if_empty(ctx, &mut out);
        self.try_merge(ctx, &mut out);
        out
    }

    /// A replay finished in a context.
    pub fn on_replay_done(&mut self, ctx: CtxId, has_vars: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(g) = self.groups.get_mut(&ctx) {
            g.has_vars = has_vars;
        }
        self.try_merge(ctx, &mut out);
        out
    }

    /// Merge `ctx` into another idle group with the same history.
    fn try_merge(&mut self, ctx: CtxId, out: &mut Vec<Action>) {
        let Some(g) = self.groups.get(&ctx) else { return };
        if !g.idle() || self.in_open_batch(ctx) || g.engines.is_empty() {
            return;
        }
        let twin = self
            .groups
            .iter()
            .find(|(other, h)| {
                **other != ctx && h.idle() && !h.engines.is_empty() && h.history == g.history && !self.in_open_batch(**other)
            })
            .map(|(other, _)| *other);
        if let Some(into) = twin {
            let moved: Vec<Ident> =
                self.groups.get_mut(&ctx).map(|g| std::mem::take(&mut g.engines)).unwrap_or_default().into_iter().collect();
            for e in &moved {
                if let Some(st) = self.engines.get_mut(e) {
                    st.group = Some(into);
                }
            }
            self.groups.get_mut(&into).expect("twin").engines.extend(moved);
            self.drop_if_empty(ctx, out);
        }
    }

    /// An engine disconnected: it died or shut down.
    pub fn on_engine_gone(&mut self, e: &Ident) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(st) = self.engines.remove(e) else { return out };
        for b in &mut self.batches {
            b.engines.remove(e);
        }
        self.batches.retain(|b| !b.engines.is_empty());
        let Some(ctx) = st.group else { return out };
        if let Some(g) = self.groups.get_mut(&ctx) {
            g.engines.remove(e);
            if let Some(r) = &mut g.running {
                r.members.remove(e);
                if r.pending.as_mut().is_some_and(|p| p.remove(e)) {
                    r.outcomes.insert(e.clone(), LoadOutcome::Died { status: "engine disconnected".into() });
                }
            }
        }
        self.maybe_finish_load(ctx, &mut out);
        self.drop_if_empty(ctx, &mut out);
        out
    }

    /// An engine's worker restarted outside a cell: its variables are gone.
    pub fn on_worker_restarted(&mut self, e: &Ident) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(ctx) = self.engines.get(e).and_then(|s| s.group) else { return out };
        let Some(g) = self.groups.get_mut(&ctx) else { return out };
        if !g.has_vars || g.running.as_ref().is_some_and(|r| r.members.contains_key(e)) {
            return out;
        }
        g.engines.remove(e);
        self.assign_fresh(e, &mut out);
        self.drop_if_empty(ctx, &mut out);
        out
    }
}

mod neutral;
#[cfg(test)]
mod tests;
