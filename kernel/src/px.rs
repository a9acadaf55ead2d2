//! `%px`, `%%px` and `%pxresult` through `rpx::Client`: connects to the cluster of
//! `RPX_PROFILE` on first use (and again after the cluster went away), resolves `--targets`,
//! submits the cell to a direct view, then streams or groups each engine's output with
//! `rpx_magics`. An interrupt while waiting sends the configured signal to the engines still
//! running the cell and keeps waiting (bounded) for their replies.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpx::{AsyncResult, ExecuteResult, TaskEvent};
use rpx_magics::{
    error_report, interrupt_line, progress_due, progress_message, progress_text, render_outputs, verbose_line, EngineOutput, ExecOptions,
    GroupOutputs, MagicError, OutputEvent, PxConfig, PxOptions, RenderOptions, Signal, StreamName, StreamStyle, Streamer,
};

use crate::server::Shared;
use crate::shell::CellError;
use rpx_protocol::content::ErrorName;

/// How often a waiting `%px` looks for an interrupt.
const TICK: Duration = Duration::from_millis(50);
/// How long engines get to stop after an interrupt before the cell gives up waiting.
const INTERRUPT_GRACE: Duration = Duration::from_secs(15);
/// How long a `%px` waits for a first engine when none is registered yet.
const ENGINE_WAIT: Duration = Duration::from_secs(2);

/// Why a `%px` did not run or failed.
pub enum PxError {
    /// The magic's arguments do not fit the cluster (targets, no result yet).
    Usage(MagicError),
    /// The cell failed (on the engines, or reaching them).
    Cell(CellError),
}

impl From<MagicError> for PxError {
    fn from(e: MagicError) -> PxError {
        PxError::Usage(e)
    }
}

impl From<CellError> for PxError {
    fn from(e: CellError) -> PxError {
        PxError::Cell(e)
    }
}

/// A submitted `%px`.
pub struct Run {
    ar: AsyncResult<ExecuteResult>,
    targets: Vec<usize>,
    single: bool,
    display_id: String,
    submitted: Instant,
}

/// The magics' state: the client, the sticky config, autopx and the last run.
pub struct Px {
    shared: Arc<Shared>,
    client: Option<rpx::Client>,
    pub config: PxConfig,
    pub autopx: bool,
    last: Option<Run>,
}

impl Px {
    pub fn new(shared: Arc<Shared>) -> Px {
        Px { shared, client: None, config: PxConfig::default(), autopx: false, last: None }
    }

    fn client(&mut self) -> Result<&rpx::Client, PxError> {
        if self.client.is_none() {
            let profile = rpx_protocol::connection::default_profile_name();
            let c = rpx::Client::connect().map_err(|e| {
                CellError::new(ErrorName::NoCluster, format!("cannot reach an rpx cluster for profile `{profile}`: {e}"), vec![])
            })?;
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("set above"))
    }

    /// Send a cell to its targets (`--block` or not, nothing is awaited here).
    pub fn submit(&mut self, code: &str, run: &ExecOptions, display_id: &str) -> Result<Run, PxError> {
        match self.try_submit(code, run, display_id) {
            // The cluster we knew went away (restarted?): connect again once.
            Err(PxError::Cell(e)) if e.ename == ErrorName::ConnectionError => {
                self.client = None;
                self.try_submit(code, run, display_id)
            }
            r => r,
        }
    }

    fn try_submit(&mut self, code: &str, run: &ExecOptions, display_id: &str) -> Result<Run, PxError> {
        let shared = self.shared.clone();
        let client = self.client()?;
        let mut ids = client.ids();
        if ids.is_empty() {
            ids = client.wait_for_engines(1, ENGINE_WAIT).unwrap_or_default();
        }
        let targets = run.targets.resolve(&ids).map_err(MagicError::from)?;
        if run.verbose {
            shared.publish_stream(StreamName::Stdout, &verbose_line(run.block, &run.targets, &targets));
        }
        let ar = client.direct_view(targets.clone()).execute_async(code).map_err(|e| {
            let ename = if matches!(e, rpx::Error::Connection(_)) { ErrorName::ConnectionError } else { ErrorName::EngineError };
            CellError::new(ename, e.to_string(), vec![])
        })?;
        Ok(Run { ar, targets, single: run.targets.is_single(), display_id: display_id.to_string(), submitted: Instant::now() })
    }

    /// After [`Px::submit`]: wait and show the outputs (`--block`), or keep the run for
    /// `%pxresult` (`--noblock`).
    pub fn finish(&mut self, run: Run, opts: &ExecOptions) -> Result<(), PxError> {
        if !opts.block {
            self.last = Some(run);
            return Ok(());
        }
        let r = self.collect(&run, opts.stream, opts.group_outputs, &opts.signal_on_interrupt, opts.progress_after);
        self.last = Some(run);
        r
    }

    /// `%pxresult`: wait for the last run and show its outputs, grouped.
    pub fn result(&mut self, opts: &PxOptions) -> Result<(), PxError> {
        let run = self.last.take().ok_or(MagicError::NoLastResult)?;
        let group = opts.group_outputs.unwrap_or(self.config.group_outputs);
        let signal = self.config.signal_on_interrupt.clone();
        let r = self.collect(&run, false, group, &signal, self.config.progress_after);
        self.last = Some(run);
        r
    }

    /// The progress display while the wait goes on: shown (or updated) when its text changed.
    fn show_progress(&self, run: &Run, done: usize, progress_id: &str, shown: &mut Option<String>) {
        let elapsed = run.submitted.elapsed();
        let text = progress_text(done, run.targets.len(), elapsed, false);
        if shown.as_deref() != Some(text.as_str()) {
            self.shared.publish(&progress_message(progress_id, shown.is_none(), done, run.targets.len(), elapsed, false));
            *shown = Some(text);
        }
    }

    /// The user interrupted the wait: say so, and send `signal` to the engines still running
    /// (none for signal 0).
    fn signal_running(&self, run: &Run, done: &HashSet<usize>, signal: &Signal) {
        self.shared.publish_stream(StreamName::Stderr, &interrupt_line(signal));
        let running: Vec<usize> = run.targets.iter().copied().filter(|id| !done.contains(id)).collect();
        if let (Some(client), false) = (&self.client, running.is_empty() || *signal == Signal::Number(0)) {
            let sig = match signal {
                Signal::Number(n) => rpx::Signal::Number(i32::from(*n)),
                Signal::Name(s) => rpx::Signal::Name(s.clone()),
            };
            if let Err(e) = client.send_signal(sig, running) {
                self.shared.publish_stream(StreamName::Stderr, &format!("could not signal the engines: {e}\n"));
            }
        }
    }

    fn collect(&mut self, run: &Run, stream: bool, group: GroupOutputs, signal: &Signal, progress_after: f64) -> Result<(), PxError> {
        let mut streamer = Streamer::new(StreamStyle::Text, run.display_id.clone(), RenderOptions::default());
        let mut outputs: Vec<EngineOutput> = run.targets.iter().map(|&id| EngineOutput::new(id, Vec::new())).collect();
        let mut done: HashSet<usize> = HashSet::new();
        let mut lost = false;
        let mut interrupted_at: Option<Instant> = None;
        let mut cursor = 0;
        // The progress display (`--progress-after`): its id and the text last shown.
        let progress_id = format!("px-progress-{}", run.display_id);
        let mut progress_shown: Option<String> = None;
        let waiting_since = Instant::now();
        loop {
            let events = run.ar.next_events(&mut cursor, TICK);
            let idle = events.is_empty();
            for ev in events {
                let (id, event) = match ev {
                    TaskEvent::Output { engine_id, msg_type, content } if msg_type != "error" => {
                        match (engine_id, OutputEvent::from_iopub(&msg_type, &content)) {
                            (Some(_), Some(OutputEvent::ExecuteResult { data, .. })) if crate::local::is_unit(&data) => continue,
                            (Some(id), Some(e)) => (id, e),
                            _ => continue,
                        }
                    }
                    TaskEvent::Done { engine_id: Some(id), error } => {
                        done.insert(id);
                        let Some(e) = error else { continue };
                        lost |= ErrorName::parse(&e.ename) == ErrorName::ConnectionLost;
                        (id, OutputEvent::error(e.ename, e.message, e.traceback))
                    }
                    _ => continue,
                };
                if stream {
                    for m in streamer.event(id, &event) {
                        self.shared.publish(&m);
                    }
                }
                if let Some(o) = outputs.iter_mut().find(|o| o.engine_id == id) {
                    o.events.push(event);
                }
            }
            if idle && run.ar.finished() {
                break;
            }
            // Only a wait that is still going shows progress (a cell that was done before this
            // wait, as for `%pxresult` of a finished run, shows none).
            if progress_due(progress_after, waiting_since.elapsed()) {
                self.show_progress(run, done.len(), &progress_id, &mut progress_shown);
            }
            if self.shared.interrupted.swap(false, Ordering::SeqCst) && interrupted_at.is_none() {
                interrupted_at = Some(Instant::now());
                self.signal_running(run, &done, signal);
            }
            if interrupted_at.is_some_and(|t| t.elapsed() > INTERRUPT_GRACE) {
                let running: Vec<usize> = run.targets.iter().copied().filter(|id| !done.contains(id)).collect();
                if progress_shown.is_some() {
                    // Finalized with what is known: not every engine is done.
                    let n = run.targets.len();
                    self.shared.publish(&progress_message(&progress_id, false, done.len().min(n), n, run.submitted.elapsed(), true));
                }
                return Err(CellError::new(
                    ErrorName::KeyboardInterrupt,
                    format!("interrupted; engines {running:?} did not stop within {INTERRUPT_GRACE:?} and keep running (see %pxresult)"),
                    vec![],
                )
                .into());
            }
        }
        if progress_shown.is_some() {
            let n = run.targets.len();
            self.shared.publish(&progress_message(&progress_id, false, done.len().min(n), n, run.submitted.elapsed(), true));
        }
        if lost {
            self.client = None;
        }
        if !stream {
            for m in render_outputs(&outputs, group, &RenderOptions::default()) {
                self.shared.publish(&m);
            }
        }
        let report = if stream { streamer.error_report() } else { error_report(&outputs, run.single) };
        match report {
            Some(r) => Err(r.error.into()),
            None => Ok(()),
        }
    }
}
