//! Worker supervision: whether a dead worker is started again at once or only when work needs
//! one (a worker that keeps dying at startup), and the follow-up of an interrupt: SIGINT again
//! every [`INTERRUPT_REPEAT`] while the interrupted code runs, and after [`INTERRUPT_GRACE`]
//! the worker is killed.
//!
//! Pure: the engine loop passes the time and what runs, and carries out what these return
//! (start a worker, signal it, kill it).

use std::time::{Duration, Instant};

/// After SIGINT, how long running user code has to stop before the worker is killed (its
/// variables are lost then). A cell in a loop whose body cannot unwind (arithmetic, allocation)
/// can only be stopped this way.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// SIGINT is sent again this often during the grace period (one that raced with the worker
/// starting the code is not lost).
pub const INTERRUPT_REPEAT: Duration = Duration::from_millis(250);
/// A worker that dies this soon after it was started died at startup.
pub const QUICK_DEATH: Duration = Duration::from_secs(1);
/// After this many deaths at startup in a row, a worker is started on demand only.
pub const MAX_QUICK_DEATHS: u32 = 5;

/// When to start a new worker after one died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// At once.
    Now,
    /// When work needs one (a cell, a call): it keeps dying at startup.
    OnDemand,
}

/// What to do about an interrupt in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptStep {
    /// Nothing now.
    Quiet,
    /// Send SIGINT to the worker again.
    Poke,
    /// The code did not stop in time: kill the worker and start a new one; the status says why.
    Kill(String),
}

/// An interrupt in progress: the load or call it targets, and when to give up on it.
#[derive(Debug)]
struct Interrupt {
    /// The cell id of the load, or the msg id of the call.
    target: String,
    deadline: Instant,
    next_poke: Instant,
}

/// The supervisor's memory of its worker: when it started, how often it died at startup, and
/// the interrupt being followed up.
#[derive(Debug)]
pub struct Supervisor {
    spawned_at: Instant,
    quick_deaths: u32,
    interrupt: Option<Interrupt>,
}

impl Supervisor {
    pub fn new(now: Instant) -> Supervisor {
        Supervisor { spawned_at: now, quick_deaths: 0, interrupt: None }
    }

    /// A worker was started at `now`.
    pub fn spawned(&mut self, now: Instant) {
        self.spawned_at = now;
    }

    /// The worker died at `now`. One that dies within [`QUICK_DEATH`] of its start
    /// [`MAX_QUICK_DEATHS`] times in a row is restarted on demand only; any worker that lived
    /// longer starts the count over.
    pub fn died(&mut self, now: Instant) -> Restart {
        let quick = now.duration_since(self.spawned_at) < QUICK_DEATH;
        self.quick_deaths = if quick { self.quick_deaths + 1 } else { 0 };
        if self.quick_deaths < MAX_QUICK_DEATHS {
            Restart::Now
        } else {
            Restart::OnDemand
        }
    }

    /// The worker is restarted on purpose (clear, a new compiler, an interrupt that did not
    /// stop): earlier deaths at startup are forgotten.
    pub fn restarted(&mut self) {
        self.quick_deaths = 0;
    }

    /// SIGINT was sent for the running load or call `target` at `now`: follow it up. A second
    /// SIGINT for the same code keeps the first one's deadline.
    pub fn interrupting(&mut self, target: &str, now: Instant) {
        if self.interrupt.as_ref().is_none_or(|i| i.target != target) {
            self.interrupt =
                Some(Interrupt { target: target.to_string(), deadline: now + INTERRUPT_GRACE, next_poke: now + INTERRUPT_REPEAT });
        }
    }

    /// The worker is gone: there is nothing left to interrupt.
    pub fn worker_gone(&mut self) {
        self.interrupt = None;
    }

    /// Follow up the interrupt at `now`; `running(target)` says whether the interrupted load or
    /// call still runs. Code that stopped ends the follow-up.
    pub fn follow(&mut self, now: Instant, running: impl FnOnce(&str) -> bool) -> InterruptStep {
        let Some(i) = &mut self.interrupt else { return InterruptStep::Quiet };
        if !running(&i.target) {
            self.interrupt = None;
            InterruptStep::Quiet
        } else if now >= i.deadline {
            self.interrupt = None;
            InterruptStep::Kill(format!("killed after SIGINT: the code did not stop within {} s", INTERRUPT_GRACE.as_secs()))
        } else if now >= i.next_poke {
            i.next_poke = now + INTERRUPT_REPEAT;
            InterruptStep::Poke
        } else {
            InterruptStep::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_worker_that_dies_five_times_within_a_second_is_restarted_on_demand_only() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        let mut t = t0;
        for death in 1..=4 {
            s.spawned(t);
            t += 100 * MS;
            assert_eq!(s.died(t), Restart::Now, "death {death} at startup");
        }
        s.spawned(t);
        assert_eq!(s.died(t + 999 * MS), Restart::OnDemand);
        // Started on demand, it dies at startup again: still on demand only.
        s.spawned(t + 5000 * MS);
        assert_eq!(s.died(t + 5010 * MS), Restart::OnDemand);
    }

    #[test]
    fn a_worker_that_lived_a_second_is_restarted_at_once_and_the_count_starts_over() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        for _ in 0..4 {
            s.spawned(t0);
            s.died(t0);
        }
        s.spawned(t0);
        assert_eq!(s.died(t0 + QUICK_DEATH), Restart::Now, "it lived a second: not a death at startup");
        for _ in 0..4 {
            s.spawned(t0);
            assert_eq!(s.died(t0), Restart::Now);
        }
    }

    #[test]
    fn a_restart_on_purpose_forgets_deaths_at_startup() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        for _ in 0..4 {
            s.died(t0);
        }
        s.restarted();
        for _ in 0..4 {
            assert_eq!(s.died(t0), Restart::Now);
        }
        assert_eq!(s.died(t0), Restart::OnDemand);
    }

    #[test]
    fn interrupted_code_gets_sigint_again_every_250ms_and_its_worker_is_killed_after_three_seconds() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        s.interrupting("cell-1", t0);
        assert_eq!(s.follow(t0 + 100 * MS, |_| true), InterruptStep::Quiet);
        assert_eq!(s.follow(t0 + INTERRUPT_REPEAT, |_| true), InterruptStep::Poke);
        assert_eq!(s.follow(t0 + INTERRUPT_REPEAT + 100 * MS, |_| true), InterruptStep::Quiet);
        let mut pokes = 1;
        let mut t = t0 + INTERRUPT_REPEAT;
        let status = loop {
            t += 50 * MS;
            match s.follow(t, |target| target == "cell-1") {
                InterruptStep::Quiet => {}
                InterruptStep::Poke => pokes += 1,
                InterruptStep::Kill(status) => break status,
            }
        };
        assert_eq!(t, t0 + INTERRUPT_GRACE, "killed when the grace period is over");
        assert_eq!(pokes, 11);
        assert_eq!(status, "killed after SIGINT: the code did not stop within 3 s");
        assert_eq!(s.follow(t + INTERRUPT_GRACE, |_| true), InterruptStep::Quiet, "killed once");
    }

    #[test]
    fn code_that_stopped_after_sigint_is_left_alone() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        s.interrupting("cell-1", t0);
        assert_eq!(s.follow(t0 + INTERRUPT_REPEAT, |_| false), InterruptStep::Quiet);
        // Another cell running later under the same id is not killed.
        assert_eq!(s.follow(t0 + INTERRUPT_GRACE, |_| true), InterruptStep::Quiet);
    }

    #[test]
    fn a_second_sigint_for_the_same_code_keeps_the_first_deadline_and_new_code_gets_its_own() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        s.interrupting("cell-1", t0);
        s.interrupting("cell-1", t0 + 2000 * MS);
        assert!(matches!(s.follow(t0 + INTERRUPT_GRACE, |_| true), InterruptStep::Kill(_)));
        s.interrupting("cell-1", t0);
        s.interrupting("call-2", t0 + 2000 * MS);
        assert_eq!(s.follow(t0 + INTERRUPT_GRACE, |t| t == "call-2"), InterruptStep::Poke);
        assert!(matches!(s.follow(t0 + 2000 * MS + INTERRUPT_GRACE, |t| t == "call-2"), InterruptStep::Kill(_)));
    }

    #[test]
    fn a_worker_gone_ends_the_interrupt() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(t0);
        s.interrupting("cell-1", t0);
        s.worker_gone();
        assert_eq!(s.follow(t0 + INTERRUPT_GRACE, |_| true), InterruptStep::Quiet);
    }
}
