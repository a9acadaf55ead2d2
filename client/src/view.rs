//! Views: [`DirectView`] (each call goes to every targeted engine through `mux`: execute,
//! apply, map, push, pull, scatter, gather) and [`LoadBalancedView`] (each task goes to one
//! engine the controller's scheduler picks: apply, map with chunks, retries, timeouts,
//! dependencies, and the lazy [`Imap`]). Requests carry rpx's `apply_request` payloads
//! ([`rpx_protocol::apply::Op`]) with postcard-encoded buffers.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use rpx_protocol::apply::{NamedType, Op};

use crate::client::{ClientInner, Jobs};
use crate::error::{Error, Result};
use crate::io::{Chan, Frames};
use crate::remote::{storage_type_name, type_name_of, Remote, RemoteFn};
use crate::result::{
    collect_each, collect_one, decode_buffer, decode_chunk, decode_pulled, describe_item, finish_execute, finish_execute_results,
    AsyncMapResult, AsyncResult, Describe, ExecuteResult,
};
use crate::targets::{chunk_ranges, partition, TargetError, TargetSpec, Targets};
use crate::tracker::Tracker;
use crate::vecview::VecView;
use rpx_runtime::PlainElem;

fn encode<T: Serialize + ?Sized>(v: &T) -> Bytes {
    Bytes::from(rpx_runtime::encode(v))
}

// ---------------------------------------------------------------------------------------------
// DirectView

/// Requests sent to each targeted engine, with one result per engine in target order.
///
/// Targets are resolved at each call, so `client.direct_view(..)` includes engines that joined
/// after it was made.
#[derive(Clone)]
pub struct DirectView {
    client: Arc<ClientInner>,
    targets: std::result::Result<TargetSpec, TargetError>,
}

impl Debug for DirectView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectView").field("targets", &self.targets).finish()
    }
}

impl DirectView {
    pub(crate) fn new(client: Arc<ClientInner>, targets: std::result::Result<TargetSpec, TargetError>) -> DirectView {
        DirectView { client, targets }
    }

    fn targets_now(&self) -> Result<Vec<(usize, String)>> {
        match &self.targets {
            Ok(spec) => self.client.resolve(spec),
            Err(e) => Err(e.clone().into()),
        }
    }

    /// The engine ids this view addresses right now.
    pub fn targets(&self) -> Result<Vec<usize>> {
        Ok(self.targets_now()?.into_iter().map(|(id, _)| id).collect())
    }

    /// The same client, other targets.
    pub fn with_targets(&self, targets: impl Targets) -> DirectView {
        DirectView::new(self.client.clone(), targets.to_spec())
    }

    fn mux(&self, targets: &[(usize, String)], content: &Value, buffers: Vec<Vec<Bytes>>, needs_idle: bool) -> Result<Arc<Tracker>> {
        let msg_type = if needs_idle { "execute_request" } else { "apply_request" };
        self.client.direct(Chan::Mux, msg_type, &json!({}), content, targets, buffers, needs_idle)
    }

    /// Run a Rust cell on every targeted engine and wait for each engine's outcome and output.
    ///
    /// A cell that fails on any engine (compile error, panic, a `?` on an `Err`, engine died)
    /// is an `Err`, as for [`DirectView::apply`] and [`DirectView::map`]: [`Error::Execute`],
    /// which still holds every engine's stdout, stderr, result and error
    /// ([`Error::execute_result`]). To get per-engine results with the failures inside, use
    /// [`DirectView::execute_results`].
    pub fn execute(&self, code: &str) -> Result<ExecuteResult> {
        self.execute_async(code)?.get()
    }

    /// [`DirectView::execute`] without waiting.
    pub fn execute_async(&self, code: &str) -> Result<AsyncResult<ExecuteResult>> {
        self.submit_execute(code, finish_execute)
    }

    /// The opt-out of [`DirectView::execute`]'s rule: per-engine results, `Ok` even when the
    /// cell failed on some engines (each failing engine has its `error`; see
    /// [`ExecuteResult::errors`], [`ExecuteResult::check`]). Only a failure to reach the
    /// engines is an `Err`.
    pub fn execute_results(&self, code: &str) -> Result<ExecuteResult> {
        self.execute_results_async(code)?.get()
    }

    /// [`DirectView::execute_results`] without waiting.
    pub fn execute_results_async(&self, code: &str) -> Result<AsyncResult<ExecuteResult>> {
        self.submit_execute(code, finish_execute_results)
    }

    fn submit_execute(
        &self,
        code: &str,
        finish: fn(&[crate::tracker::TaskState]) -> Result<ExecuteResult>,
    ) -> Result<AsyncResult<ExecuteResult>> {
        let targets = self.targets_now()?;
        let content = json!({"code": code, "silent": false, "store_history": true, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
        let tracker = self.mux(&targets, &content, vec![Vec::new(); targets.len()], true)?;
        Ok(AsyncResult::new(tracker, finish))
    }

    /// Call `remote` with `args` (a tuple: `()`, `(a,)`, `(a, b)`, ...) on every targeted
    /// engine; one result per engine, in target order.
    pub fn apply<F, Args>(&self, remote: Remote<F>, args: Args) -> Result<Vec<F::Output>>
    where
        F: RemoteFn<Args>,
        Args: Serialize,
        F::Output: DeserializeOwned + 'static,
    {
        self.apply_async(remote, args)?.get()
    }

    /// [`DirectView::apply`] without waiting.
    pub fn apply_async<F, Args>(&self, remote: Remote<F>, args: Args) -> Result<AsyncResult<Vec<F::Output>>>
    where
        F: RemoteFn<Args>,
        Args: Serialize,
        F::Output: DeserializeOwned + 'static,
    {
        let targets = self.targets_now()?;
        let buf = encode(&args);
        let tracker = self.client.direct_calls(
            &targets,
            remote.closure::<Args>(),
            |closure| Op::Apply { closure },
            vec![vec![buf]; targets.len()],
        )?;
        Ok(AsyncResult::new(tracker, |tasks| collect_each(tasks, |t, r| decode_buffer(t, r, 0))))
    }

    /// Map `remote` over `items`: one contiguous chunk per engine (the first `n % k` engines get
    /// one item more), results in item order. An empty input returns at once, sending nothing.
    pub fn map<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<Vec<R>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        self.map_async(remote, items)?.get()
    }

    /// Every item's own result (a failing item does not fail the others).
    pub fn map_results<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<Vec<Result<R>>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        Ok(self.map_async(remote, items)?.results())
    }

    /// [`DirectView::map`] without waiting.
    pub fn map_async<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<AsyncMapResult<R>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        let items: Vec<A> = items.into_iter().collect();
        if items.is_empty() {
            return Ok(self.client.empty_map(true));
        }
        let targets = self.targets_now()?;
        let parts: Vec<(Range<usize>, (usize, String))> =
            partition(items.len(), targets.len()).into_iter().zip(targets).filter(|(r, _)| !r.is_empty()).collect();
        let inputs: Vec<Bytes> = parts.iter().map(|(r, _)| encode(&items[r.clone()])).collect();
        let engines: Vec<(usize, String)> = parts.iter().map(|(_, t)| t.clone()).collect();
        let buffers = inputs.iter().map(|b| vec![b.clone()]).collect();
        let tracker = self.client.direct_calls(&engines, remote.closure::<(A,)>(), |closure| Op::Map { closure }, buffers)?;
        let describe: Describe = describe_item::<A>;
        Ok(AsyncMapResult::new(tracker, parts.into_iter().map(|(r, _)| r).collect(), inputs, describe, items.len(), true))
    }

    /// Store `value` as `name` on every targeted engine; cells see it as a variable of the same
    /// type, closures read it with [`crate::get`]. The value is encoded once for all engines.
    pub fn push<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        self.push_async(name, value)?.get()
    }

    /// [`DirectView::push`] without waiting.
    pub fn push_async<T: Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<AsyncResult<()>> {
        let targets = self.targets_now()?;
        let named = NamedType { name: name.to_string(), type_name: storage_type_name::<T>() };
        self.send_pushes(&targets, named, &[value], &vec![0; targets.len()])
    }

    /// Push `values[value_of[i]]` to target `i`: as files to same-host engines, else buffers.
    fn send_pushes<V: Serialize + ?Sized>(
        &self,
        targets: &[(usize, String)],
        named: NamedType,
        values: &[&V],
        value_of: &[usize],
    ) -> Result<AsyncResult<()>> {
        let (parts, written) = crate::dataplane::push_parts(&self.client, targets, named, values, value_of)?;
        let tracker = self
            .client
            .direct_each(Chan::Mux, "apply_request", targets, parts, false)
            .inspect_err(|_| crate::dataplane::remove_files(&written))?;
        // Same-host engines name their spares in the reply: mapped ahead of the next push.
        let dirs: std::collections::HashMap<usize, std::path::PathBuf> = written.into_iter().map(|(id, dir, _)| (id, dir)).collect();
        let client = self.client.clone();
        Ok(AsyncResult::new(tracker, move |tasks| {
            collect_each(tasks, |t, r| {
                if let Some(dir) = t.engine_id.and_then(|id| dirs.get(&id)) {
                    let spares = rpx_protocol::dataplane::spares_from_content(&r.content);
                    if !spares.is_empty() {
                        client.premaps.offer(dir, spares);
                    }
                }
                Ok(())
            })
            .map(|_| ())
        }))
    }

    /// The value of `name` on each targeted engine, in target order.
    pub fn pull<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<Vec<T>> {
        self.pull_with(name, true)?.get()
    }

    /// [`DirectView::pull`] without waiting.
    pub fn pull_async<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<AsyncResult<Vec<T>>> {
        self.pull_with(name, false)
    }

    /// A pull; `once` when its result is read once, at once (`crate::dataplane::pull_parts`).
    fn pull_with<T: DeserializeOwned + 'static>(&self, name: &str, once: bool) -> Result<AsyncResult<Vec<T>>> {
        let (tracker, pulled) = self.send_pulls(name, once)?;
        Ok(AsyncResult::new(tracker, move |tasks| collect_each(tasks, |t, r| decode_pulled(t, r, &pulled))))
    }

    /// Pull requests for `name` sent to every target, and the file side of their replies
    /// (`once` as for [`DirectView::pull_with`]): what `pull`, `pull_view` and `gather` share.
    fn send_pulls(&self, name: &str, once: bool) -> Result<(Arc<Tracker>, crate::dataplane::Pulled)> {
        let targets = self.targets_now()?;
        let (parts, pulled) = crate::dataplane::pull_parts(&self.client, &targets, name, once);
        let tracker = self.client.direct_each(Chan::Mux, "apply_request", &targets, parts, false)?;
        Ok((tracker, pulled))
    }

    /// The vector `name` (a `Vec` of `f64`, `f32`, `u8` or `i8`) on each targeted engine, in
    /// target order, read where it lies: from an engine on this host, its snapshot is mapped
    /// into this process instead of copied into a new vector (no copy, no memory beyond the
    /// engine's; see [`VecView`]). Use it like a slice; [`VecView::into_vec`] copies it out.
    ///
    /// ```no_run
    /// # fn main() -> rpx::Result<()> {
    /// let dv = rpx::Client::connect()?.direct_view(..);
    /// dv.push("x", &vec![0.5f64; 1 << 20])?;
    /// for x in dv.pull_view::<f64>("x")? {
    ///     println!("{} elements, sum {}", x.len(), x.iter().sum::<f64>());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn pull_view<E: PlainElem>(&self, name: &str) -> Result<Vec<VecView<E>>> {
        self.pull_view_async(name)?.get()
    }

    /// [`DirectView::pull_view`] without waiting.
    pub fn pull_view_async<E: PlainElem>(&self, name: &str) -> Result<AsyncResult<Vec<VecView<E>>>> {
        let (tracker, pulled) = self.send_pulls(name, false)?;
        Ok(AsyncResult::new(tracker, move |tasks| collect_each(tasks, |t, r| crate::result::view_pulled(t, r, &pulled))))
    }

    /// Split `items` into contiguous chunks, one per targeted engine in order (the first
    /// `n % k` engines get one item more), and store engine `i`'s chunk as `name` (a `Vec<T>`).
    pub fn scatter<T: Serialize>(&self, name: &str, items: &[T]) -> Result<()> {
        self.scatter_async(name, items)?.get()
    }

    /// [`DirectView::scatter`] without waiting.
    pub fn scatter_async<T: Serialize>(&self, name: &str, items: &[T]) -> Result<AsyncResult<()>> {
        let targets = self.targets_now()?;
        let named = NamedType { name: name.to_string(), type_name: format!("Vec<{}>", type_name_of::<T>()) };
        let values: Vec<&[T]> = partition(items.len(), targets.len()).into_iter().map(|r| &items[r]).collect();
        self.send_pushes(&targets, named, &values, &(0..targets.len()).collect::<Vec<_>>())
    }

    /// Pull `name` (a `Vec<T>`) from each targeted engine and concatenate in engine order.
    /// A vector of `f64`, `f32`, `u8` or `i8` is made at its final size and each engine's part
    /// read straight into its place, the parts at the same time (no copy to concatenate).
    pub fn gather<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<Vec<T>> {
        self.gather_with(name, true)?.get()
    }

    /// [`DirectView::gather`] without waiting.
    pub fn gather_async<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<AsyncResult<Vec<T>>> {
        self.gather_with(name, false)
    }

    /// A gather; `once` as for [`DirectView::pull_with`].
    fn gather_with<T: DeserializeOwned + 'static>(&self, name: &str, once: bool) -> Result<AsyncResult<Vec<T>>> {
        let (tracker, pulled) = self.send_pulls(name, once)?;
        Ok(AsyncResult::new(tracker, move |tasks| match pulled.gather_plain::<Vec<T>>(tasks) {
            Some(whole) => whole,
            None => collect_each(tasks, |t, r| decode_pulled::<Vec<T>>(t, r, &pulled)).map(concat),
        }))
    }
}

/// The parts of a gather in order, in one vector: the first part grown to the total (no
/// element-by-element regrowth), the others moved in after it.
fn concat<T>(parts: Vec<Vec<T>>) -> Vec<T> {
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut parts = parts.into_iter();
    let mut out = parts.next().unwrap_or_default();
    out.reserve_exact(total - out.len());
    parts.for_each(|mut p| out.append(&mut p));
    out
}

// ---------------------------------------------------------------------------------------------
// LoadBalancedView

/// Options of a [`LoadBalancedView`], set with its builder methods.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// Items per task (default 1).
    pub chunksize: usize,
    /// Blocking `map` and iteration of its result follow item order (default) or completion order.
    pub ordered: bool,
    /// How many times a failed task is rerun on another engine (default 0).
    pub retries: u32,
    /// A task that has not started within this time fails with `TaskTimeout`.
    pub timeout: Option<Duration>,
    /// Start only after these tasks finished (msg_ids).
    pub after: Vec<String>,
    /// Run on the engine that ran these tasks (msg_ids).
    pub follow: Vec<String>,
    /// Restrict the engines the scheduler may pick (resolved at submission).
    pub targets: Option<TargetSpec>,
}

impl Default for MapOptions {
    fn default() -> MapOptions {
        MapOptions { chunksize: 1, ordered: true, retries: 0, timeout: None, after: Vec::new(), follow: Vec::new(), targets: None }
    }
}

/// Tasks the controller's scheduler places on engines, one task per `apply` and one per chunk
/// of a `map`.
///
/// Options are set by builder methods that return a new view:
/// `client.view().chunksize(100).retries(1).map(rpx::remote!(|x: u64| x + 1), 0..10_000)`.
/// They travel as ipyparallel task metadata (`retries`, `timeout` in seconds, `after`,
/// `follow`, `targets`).
#[derive(Clone)]
pub struct LoadBalancedView {
    client: Arc<ClientInner>,
    opts: MapOptions,
    /// An invalid `targets(..)` selection, reported at submission.
    bad_targets: Option<TargetError>,
}

impl Debug for LoadBalancedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancedView").field("options", &self.opts).finish()
    }
}

impl LoadBalancedView {
    pub(crate) fn new(client: Arc<ClientInner>) -> LoadBalancedView {
        LoadBalancedView { client, opts: MapOptions::default(), bad_targets: None }
    }

    /// The current options.
    pub fn options(&self) -> &MapOptions {
        &self.opts
    }

    /// This view with all options replaced.
    pub fn with_options(&self, opts: MapOptions) -> LoadBalancedView {
        LoadBalancedView { client: self.client.clone(), opts, bad_targets: None }
    }

    fn with(&self, f: impl FnOnce(&mut MapOptions)) -> LoadBalancedView {
        let mut v = self.clone();
        f(&mut v.opts);
        v
    }

    /// Items per task for `map` (at least 1).
    pub fn chunksize(&self, n: usize) -> LoadBalancedView {
        self.with(|o| o.chunksize = n.max(1))
    }

    /// `false`: blocking `map`, iteration of `map_async` and `imap` follow completion order.
    pub fn ordered(&self, ordered: bool) -> LoadBalancedView {
        self.with(|o| o.ordered = ordered)
    }

    /// Rerun a failed task up to `n` times, each time on an engine that has not failed it.
    pub fn retries(&self, n: u32) -> LoadBalancedView {
        self.with(|o| o.retries = n)
    }

    /// Fail a task with `TaskTimeout` if it has not started within `timeout`.
    pub fn timeout(&self, timeout: Duration) -> LoadBalancedView {
        self.with(|o| o.timeout = Some(timeout))
    }

    /// Start tasks only after `jobs` have finished.
    pub fn after(&self, jobs: &(impl Jobs + ?Sized)) -> LoadBalancedView {
        let ids = jobs.job_ids();
        self.with(|o| o.after = ids)
    }

    /// Run tasks on the engine(s) that ran `jobs`.
    pub fn follow(&self, jobs: &(impl Jobs + ?Sized)) -> LoadBalancedView {
        let ids = jobs.job_ids();
        self.with(|o| o.follow = ids)
    }

    /// Let the scheduler pick only among `targets`.
    pub fn targets(&self, targets: impl Targets) -> LoadBalancedView {
        match targets.to_spec() {
            Ok(spec) => {
                let mut v = self.with(|o| o.targets = Some(spec));
                v.bad_targets = None;
                v
            }
            Err(e) => {
                let mut v = self.clone();
                v.bad_targets = Some(e);
                v
            }
        }
    }

    fn metadata(&self) -> Result<Value> {
        if let Some(e) = &self.bad_targets {
            return Err(e.clone().into());
        }
        let mut m = Map::new();
        if self.opts.retries > 0 {
            m.insert("retries".into(), json!(self.opts.retries));
        }
        if let Some(t) = self.opts.timeout {
            m.insert("timeout".into(), json!(t.as_secs_f64()));
        }
        if !self.opts.after.is_empty() {
            m.insert("after".into(), json!(self.opts.after));
        }
        if !self.opts.follow.is_empty() {
            m.insert("follow".into(), json!(self.opts.follow));
        }
        match &self.opts.targets {
            Some(spec) => {
                let uuids: Vec<String> = self.client.resolve(spec)?.into_iter().map(|(_, u)| u).collect();
                m.insert("targets".into(), json!(uuids));
            }
            None => {
                if self.client.ids().is_empty() {
                    return Err(Error::NoEngines);
                }
            }
        }
        Ok(Value::Object(m))
    }

    /// Call `remote` with `args` (a tuple) on one engine the scheduler picks.
    pub fn apply<F, Args>(&self, remote: Remote<F>, args: Args) -> Result<F::Output>
    where
        F: RemoteFn<Args>,
        Args: Serialize,
        F::Output: DeserializeOwned + 'static,
    {
        self.apply_async(remote, args)?.get()
    }

    /// [`LoadBalancedView::apply`] without waiting.
    pub fn apply_async<F, Args>(&self, remote: Remote<F>, args: Args) -> Result<AsyncResult<F::Output>>
    where
        F: RemoteFn<Args>,
        Args: Serialize,
        F::Output: DeserializeOwned + 'static,
    {
        let frames = self.client.call_frames(&self.metadata()?, remote.closure::<Args>(), |closure| Op::Apply { closure });
        let tracker = self.client.tasks(&frames, vec![vec![encode(&args)]])?;
        Ok(AsyncResult::new(tracker, |tasks| collect_one(tasks, |t, r| decode_buffer(t, r, 0))))
    }

    /// Map `remote` over `items`, one task per `chunksize` items; all results (in item order,
    /// or completion order with `.ordered(false)`), or [`Error::Map`] naming every failed item.
    /// An empty input returns at once, sending nothing.
    pub fn map<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<Vec<R>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        self.map_async(remote, items)?.get()
    }

    /// Every item's own result, in item order (a failing item does not fail the others).
    pub fn map_results<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<Vec<Result<R>>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        Ok(self.map_async(remote, items)?.results())
    }

    /// [`LoadBalancedView::map`] without waiting.
    pub fn map_async<F, A, R>(&self, remote: Remote<F>, items: impl IntoIterator<Item = A>) -> Result<AsyncMapResult<R>>
    where
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        let items: Vec<A> = items.into_iter().collect();
        if items.is_empty() {
            return Ok(self.client.empty_map(self.opts.ordered));
        }
        let frames = self.client.call_frames(&self.metadata()?, remote.closure::<(A,)>(), |closure| Op::Map { closure });
        let chunks = chunk_ranges(items.len(), self.opts.chunksize);
        let inputs: Vec<Bytes> = chunks.iter().map(|r| encode(&items[r.clone()])).collect();
        let tracker = self.client.tasks(&frames, inputs.iter().map(|b| vec![b.clone()]).collect())?;
        let describe: Describe = describe_item::<A>;
        Ok(AsyncMapResult::new(tracker, chunks, inputs, describe, items.len(), self.opts.ordered))
    }

    /// A lazy map: consumes `items` as it goes (an endless iterator is fine), keeps at most
    /// `max_in_flight` tasks (of `chunksize` items) submitted, and yields each item's result in
    /// item order (or completion order with `.ordered(false)`). Failed items yield `Err`
    /// without stopping the iteration.
    pub fn imap<F, A, R, I>(&self, remote: Remote<F>, items: I, max_in_flight: usize) -> Imap<I::IntoIter, A, R>
    where
        I: IntoIterator<Item = A>,
        F: RemoteFn<(A,), Output = R>,
        A: Serialize + DeserializeOwned + Debug,
        R: DeserializeOwned,
    {
        let setup = self.metadata().map(|md| self.client.call_frames(&md, remote.closure::<(A,)>(), |closure| Op::Map { closure }));
        Imap {
            client: self.client.clone(),
            frames: setup,
            input: items.into_iter(),
            exhausted: false,
            tracker: Tracker::open(Some(self.client.io.shared.clone())),
            chunks: Vec::new(),
            inputs: Vec::new(),
            chunksize: self.opts.chunksize,
            max_in_flight: max_in_flight.max(1),
            ordered: self.opts.ordered,
            consumed: 0,
            buf: VecDeque::new(),
            failed: false,
            describe: describe_item::<A>,
            _r: std::marker::PhantomData,
        }
    }
}

/// The iterator of [`LoadBalancedView::imap`].
pub struct Imap<I, A, R> {
    client: Arc<ClientInner>,
    frames: Result<Frames>,
    input: I,
    exhausted: bool,
    tracker: Arc<Tracker>,
    chunks: Vec<Range<usize>>,
    inputs: Vec<Bytes>,
    chunksize: usize,
    max_in_flight: usize,
    ordered: bool,
    /// Tasks whose results went into `buf`.
    consumed: usize,
    buf: VecDeque<Result<R>>,
    failed: bool,
    describe: Describe,
    _r: std::marker::PhantomData<fn(A) -> R>,
}

impl<I, A, R> Imap<I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize + DeserializeOwned + Debug,
    R: DeserializeOwned,
{
    /// The msg_ids submitted so far.
    pub fn msg_ids(&self) -> Vec<String> {
        self.tracker.lock().tasks.iter().map(|t| t.msg_id.clone()).collect()
    }

    /// Submit tasks until `max_in_flight` are outstanding or the input ends.
    fn top_up(&mut self) -> Result<()> {
        let frames = match &self.frames {
            Ok(f) => f,
            Err(e) => return Err(Error::Protocol(format!("cannot submit: {e}"))),
        };
        loop {
            let outstanding = {
                let s = self.tracker.lock();
                s.tasks.len() - s.replied
            };
            if self.exhausted || outstanding >= self.max_in_flight {
                return Ok(());
            }
            let chunk: Vec<A> = self.input.by_ref().take(self.chunksize).collect();
            if chunk.is_empty() {
                self.exhausted = true;
                self.tracker.seal();
                return Ok(());
            }
            let start = self.chunks.last().map_or(0, |r| r.end);
            let bytes = encode(&chunk);
            self.chunks.push(start..start + chunk.len());
            self.inputs.push(bytes.clone());
            self.client.task_into(&self.tracker, frames, &[bytes])?;
        }
    }
}

impl<I, A, R> Iterator for Imap<I, A, R>
where
    I: Iterator<Item = A>,
    A: Serialize + DeserializeOwned + Debug,
    R: DeserializeOwned,
{
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        loop {
            if let Some(r) = self.buf.pop_front() {
                return Some(r);
            }
            if self.failed {
                return None;
            }
            if let Err(e) = self.top_up() {
                self.failed = true;
                return Some(Err(e));
            }
            let submitted = self.tracker.lock().tasks.len();
            if self.consumed >= submitted {
                return None; // input exhausted and everything yielded
            }
            // Wait for the next task to yield, topping up as other tasks finish.
            let want = self.consumed;
            let ordered = self.ordered;
            let seen = self.tracker.lock().replied;
            self.tracker.wait_until(
                None,
                |s| if ordered { s.tasks[want].outcome.is_some() } else { s.done_order.len() > want } || s.replied > seen,
            );
            let task = {
                let s = self.tracker.lock();
                if ordered {
                    s.tasks[want].outcome.is_some().then_some(want)
                } else {
                    s.done_order.get(want).copied()
                }
            };
            let Some(task) = task else { continue };
            self.consumed += 1;
            let s = self.tracker.lock();
            let results = decode_chunk(&s.tasks[task], self.chunks[task].clone(), &self.inputs[task], self.describe);
            drop(s);
            self.buf.extend(results);
        }
    }
}
