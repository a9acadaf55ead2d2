//! Who runs the client's request runtime: the thread that waits for a reply, when there is one.
//!
//! The DEALER sockets (`registration`, `mux`, `task`, `control`), their reader tasks and the
//! dispatcher (`crate::io`) live on one current-thread tokio runtime that no thread owns. A
//! thread that waits for a reply runs it itself ([`Drive::wait`]), so its request is sent and
//! the reply read, verified and matched on that thread, with no hand-over between threads on
//! the way (two hand-overs cost a round trip 34 µs on the floor under it: `hop_floor`'s
//! `two_hops_pipe_guarded_io_thread` against `two_hops_pipe_guarded`). A thread that submits
//! while nobody runs it runs it until its request is sent ([`Drive::submit`]). While requests
//! are outstanding and no thread waits (results polled with `ready()`, awaited as futures, or
//! waited for from inside another runtime), the drive thread runs it, and gives it up as soon
//! as a thread wants to wait. With nothing outstanding nobody runs it: replies only come to
//! requests, and what arrives unasked (engine notifications, output) is read by the IO
//! thread's own runtime (`crate::io`), which always runs.
//!
//! Only code of the copy of this crate that made the client runs its runtime: a Jupyter kernel
//! links the crate into every cell it compiles, each copy with its own tokio thread-locals, and
//! the tasks on the runtime (the first copy's code) find their runtime through their own copy's
//! thread-locals, which another copy's `block_on` does not set. Calls from another copy wait as
//! a thread inside another runtime does, while the drive thread runs the runtime.
//!
//! The drive thread is not woken each time a thread stops running the runtime with requests
//! outstanding (between sending a request and waiting for its reply, that would be a wake-up
//! per round trip): while requests were outstanding in the last [`ATTENTIVE`], it looks every
//! [`CHECK`] whether it should take over, so an unwatched reply is read within [`CHECK`] (and
//! the controller never finds this client not reading); after that it sleeps until the next
//! submission.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// How often the drive thread looks whether it should run the runtime, while requests are or
/// were lately outstanding.
pub const CHECK: Duration = Duration::from_millis(2);
/// How long after requests were last outstanding the drive thread keeps looking.
pub const ATTENTIVE: Duration = Duration::from_secs(1);

/// This copy of the crate's code (the address of a static of its own).
fn this_copy() -> usize {
    static COPY: u8 = 0;
    std::ptr::addr_of!(COPY) as usize
}

/// The request runtime and the rule deciding which thread runs it.
#[derive(Debug)]
pub(crate) struct Drive {
    /// Taken only by `Drop` (which shuts it down without blocking, wherever the last reference
    /// goes).
    rt: Option<Runtime>,
    state: Mutex<DriveState>,
    /// The drive thread sleeps here while it has nothing to run.
    wake: Condvar,
    /// Tells the drive thread, while it runs the runtime, to look again at whether it should.
    recheck: Notify,
    /// Commands handed to the dispatcher, and those it has finished with.
    submitted: AtomicU64,
    sent: AtomicU64,
    sent_notify: Notify,
    /// The copy of this crate's code that made the runtime and spawned its tasks.
    copy: usize,
}

#[derive(Debug, Default)]
struct DriveState {
    /// Threads other than the drive thread running the runtime or waiting to.
    threads: usize,
    /// The drive thread is running it.
    background: bool,
    /// Requests are outstanding (or commands not yet handled): someone must run it.
    work: bool,
    /// The dispatcher has ended: nothing more will run.
    closed: bool,
    /// The drive thread sleeps until woken (not looking every [`CHECK`]).
    asleep: bool,
    /// Until when the drive thread keeps looking.
    attentive_until: Option<Instant>,
}

impl Drive {
    pub fn new(rt: Runtime) -> Drive {
        Drive {
            rt: Some(rt),
            state: Mutex::default(),
            wake: Condvar::new(),
            recheck: Notify::new(),
            submitted: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            sent_notify: Notify::new(),
            copy: this_copy(),
        }
    }

    /// Whether this thread, running this code, may run the runtime: not from inside another
    /// runtime, and only as the copy of the crate that made it.
    fn runnable_here(&self) -> bool {
        self.copy == this_copy() && tokio::runtime::Handle::try_current().is_err()
    }

    fn lock(&self) -> MutexGuard<'_, DriveState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("the runtime lives as long as the drive")
    }

    /// Run `f` on the runtime on this thread, or `None` if this thread cannot (it is inside a
    /// runtime already, or this is another copy of the crate) or nothing runs any more: then
    /// the caller waits without it (the drive thread runs it for as long as requests are
    /// outstanding).
    pub fn wait<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        if !self.runnable_here() {
            return None;
        }
        let s = self.lock();
        if s.closed {
            return None;
        }
        Some(self.run_here(s, f))
    }

    /// Run `f` on this thread: take the runtime over from the drive thread if it runs it
    /// (waiting for it to let go), and on leaving hand it back if requests are outstanding.
    fn run_here<T>(&self, mut s: MutexGuard<'_, DriveState>, f: impl Future<Output = T>) -> T {
        s.threads += 1;
        let background = s.background;
        drop(s);
        if background {
            self.recheck.notify_one();
        }
        let _leave = Leave(self);
        self.rt().block_on(f)
    }

    /// Hand a command to the dispatcher (`push`, which fails if the dispatcher is gone). If
    /// nobody runs the runtime, this thread runs it until the dispatcher has sent the command
    /// (a thread that then waits for the reply takes the runtime up again at once; the push
    /// itself is then made on the runtime, so waking the dispatcher costs no system call);
    /// otherwise whoever runs it sends it.
    pub fn submit<E>(&self, push: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let seq = self.submitted.fetch_add(1, Ordering::SeqCst) + 1;
        let s = self.lock();
        if s.threads > 0 || s.background || s.closed || !self.runnable_here() {
            // Pushed before the work is marked: the dispatcher, reporting under the lock
            // whether commands are queued (`set_work`), then either sees this one or is
            // overruled below; never marks the work done with it stranded in the queue.
            drop(s);
            let pushed = push();
            let mut s = self.lock();
            self.mark_work(&mut s);
            if s.threads == 0 && !s.background {
                // Nobody runs it (this thread cannot): the drive thread takes it at once.
                self.wake.notify_one();
            }
            return pushed;
        }
        let mut s = s;
        self.mark_work(&mut s);
        self.run_here(s, async {
            push()?;
            // The dispatcher, woken by the push, runs (and zeromq's writer after it) before this
            // future is polled again; the notification is for a dispatcher held up by a send.
            for _ in 0..4 {
                if self.sent.load(Ordering::SeqCst) >= seq {
                    return Ok(());
                }
                tokio::task::yield_now().await;
            }
            loop {
                let notified = self.sent_notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.sent.load(Ordering::SeqCst) >= seq || self.lock().closed {
                    return Ok(());
                }
                notified.await;
            }
        })
    }

    /// Requests are outstanding: someone must run the runtime, and the drive thread keeps
    /// looking for a while (woken if it slept).
    fn mark_work(&self, s: &mut DriveState) {
        s.work = true;
        s.attentive_until = Some(Instant::now() + ATTENTIVE);
        if s.asleep {
            s.asleep = false;
            self.wake.notify_one();
        }
    }

    /// Someone waits for outstanding requests without running the runtime (a future polled, a
    /// thread inside another runtime): the drive thread runs it at once if nobody does.
    pub fn attend(&self) {
        let mut s = self.lock();
        if s.work && s.threads == 0 && !s.background && !s.closed {
            s.asleep = false;
            self.wake.notify_one();
        }
    }

    /// The dispatcher is done with one command.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.sent_notify.notify_waiters();
    }

    /// The dispatcher's view after handling what came: whether requests are `outstanding`, and
    /// (read under the lock, so that no command slips in between) whether commands are still
    /// `queued`. With neither, nobody needs to run the runtime.
    pub fn set_work(&self, outstanding: bool, queued: impl FnOnce() -> bool) {
        let mut s = self.lock();
        let work = outstanding || queued();
        if s.work != work {
            s.work = work;
            if !work && s.background {
                drop(s);
                self.recheck.notify_one();
            }
        }
    }

    /// The dispatcher has ended (closed, lost, or panicked) or never started: the drive thread
    /// stops, and nobody waits for a command to be sent.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
        self.recheck.notify_one();
        self.sent_notify.notify_waiters();
    }

    /// The drive thread's loop: run the runtime while requests are outstanding and no other
    /// thread does; return once the dispatcher has ended.
    pub fn run_background(&self) {
        let mut s = self.lock();
        loop {
            if s.closed {
                return;
            }
            if s.work && s.threads == 0 {
                s.background = true;
                drop(s);
                self.rt().block_on(async {
                    loop {
                        self.recheck.notified().await;
                        let s = self.lock();
                        if s.closed || s.threads > 0 || !s.work {
                            break;
                        }
                    }
                });
                s = self.lock();
                s.background = false;
                continue;
            }
            let now = Instant::now();
            if s.work {
                s.attentive_until = Some(now + ATTENTIVE);
            }
            if s.attentive_until.is_some_and(|t| now < t) {
                s = self.wake.wait_timeout(s, CHECK).unwrap_or_else(|p| p.into_inner()).0;
            } else {
                s.asleep = true;
                s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                s.asleep = false;
            }
        }
    }

    /// Run `f` to its end on this thread before any other thread can use the runtime (the
    /// drive thread's start: connecting the sockets).
    pub fn start<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt().block_on(f)
    }
}

impl Drop for Drive {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A thread stops running the runtime: if requests are still outstanding and no other thread
/// runs it, the drive thread takes over.
struct Leave<'a>(&'a Drive);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.threads -= 1;
        // An attentive drive thread notices by itself (within `CHECK`).
        if s.threads == 0 && s.work && s.asleep {
            s.asleep = false;
            self.0.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread::ThreadId;

    use tokio::sync::mpsc;

    use super::*;

    /// A drive with a stand-in dispatcher: each command is a sender for the id of the thread
    /// that handled it; it is answered, counted as sent, and the work left is reported as the
    /// dispatcher does.
    fn drive() -> (Arc<Drive>, mpsc::UnboundedSender<std::sync::mpsc::Sender<ThreadId>>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let d = Arc::new(Drive::new(rt));
        let (tx, mut rx) = mpsc::unbounded_channel::<std::sync::mpsc::Sender<ThreadId>>();
        let dd = d.clone();
        d.start(async move {
            tokio::spawn(async move {
                while let Some(reply) = rx.recv().await {
                    let _ = reply.send(std::thread::current().id());
                    dd.sent();
                    dd.set_work(false, || !rx.is_empty());
                }
                dd.close();
            });
        });
        (d, tx)
    }

    #[test]
    fn a_submitting_thread_runs_the_runtime_itself_when_nobody_does() {
        let (d, tx) = drive();
        let (reply, handled) = std::sync::mpsc::channel();
        d.submit(|| tx.send(reply)).unwrap();
        // Sent before submit returned, on this thread.
        assert_eq!(handled.try_recv().unwrap(), std::thread::current().id());
        // A waiting thread runs it too: a task spawned on it runs here.
        let here = d.wait(async { tokio::spawn(async { std::thread::current().id() }).await.unwrap() });
        assert_eq!(here, Some(std::thread::current().id()));
    }

    #[test]
    fn the_drive_thread_runs_it_while_work_is_outstanding_and_hands_it_to_a_waiter() {
        let (d, tx) = drive();
        let bg = {
            let d = d.clone();
            std::thread::spawn(move || d.run_background())
        };
        let bg_id = bg.thread().id();
        // Outstanding work, nobody waiting: the drive thread picks it up (within CHECK).
        d.lock().work = true;
        d.attend();
        let (reply, handled) = std::sync::mpsc::channel();
        d.submit(|| tx.send(reply)).unwrap();
        let by = handled.recv_timeout(Duration::from_secs(10)).expect("handled while nobody waited");
        // Either this thread ran it to send (nobody did yet) or the drive thread did.
        assert!(by == std::thread::current().id() || by == bg_id);
        d.lock().work = true;
        d.attend();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.lock().background {
            assert!(Instant::now() < deadline, "the drive thread did not take the outstanding work");
            std::thread::yield_now();
        }
        // A thread that waits takes the runtime over: its future's tasks run on it.
        let here = d.wait(async { tokio::spawn(async { std::thread::current().id() }).await.unwrap() });
        assert_eq!(here, Some(std::thread::current().id()));
        // The dispatcher's end stops the drive thread.
        drop(tx);
        bg.join().unwrap();
    }

    #[test]
    fn a_thread_inside_a_runtime_or_another_copy_of_the_crate_does_not_run_it() {
        let (d, tx) = drive();
        let other = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(other.block_on(async { d.wait(async { 1 }) }), None);
        // As if the client had been made by another copy of this code (a kernel's earlier cell).
        let mut foreign = Drive::new(tokio::runtime::Builder::new_current_thread().build().unwrap());
        foreign.copy = this_copy() + 1;
        assert_eq!(foreign.wait(async { 1 }), None);
        let (reply, handled) = std::sync::mpsc::channel();
        foreign.submit(|| tx.send(reply)).unwrap();
        assert!(handled.try_recv().is_err(), "not run on this thread");
        assert_eq!(d.wait(async { 1 }), Some(1));
        d.close();
        assert_eq!(d.wait(async { 1 }), None, "nothing runs once the dispatcher ended");
    }
}
