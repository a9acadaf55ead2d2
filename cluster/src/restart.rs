//! The restart policy of the supervisor, as pure decisions: whether a member that died (an
//! engine or the compiler) is restarted, after which delay, and when a crash loop ends.
//!
//! A member that dies less than [`Policy::window`] after it was (re)started failed *quickly*.
//! Each quick failure in a row doubles the delay before the next start ([`Policy::backoff`]:
//! 0.5 s, 1 s, 2 s, ... up to 30 s by default), and after [`Policy::limit`] restarts in a row
//! that all failed quickly the member is given up. A member that ran for at least the window
//! before dying starts the count over, so an engine killed once an hour is always restarted,
//! while one that crashes at once on every start is given up after `limit` restarts (about
//! 16 s with the defaults), whatever the delays.

use std::time::{Duration, Instant};

/// How the supervisor restarts members (`--no-restart`, `--restart-limit`,
/// `--restart-window`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Restart members that die (false: `--no-restart`).
    pub restart: bool,
    /// Restarts in a row, each ending in a quick failure, before a member is given up.
    pub limit: u32,
    /// A member that dies sooner than this after its start failed quickly.
    pub window: Duration,
    /// Delay before the first restart after a quick failure.
    pub first_delay: Duration,
    /// The delay doubles up to this.
    pub max_delay: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            restart: true,
            limit: 5,
            window: Duration::from_secs(60),
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl Policy {
    /// The delay before the `nth` restart in a row (1-based): `first_delay` doubled `nth - 1`
    /// times, at most `max_delay`.
    pub fn backoff(&self, nth: u32) -> Duration {
        let doublings = nth.saturating_sub(1).min(30);
        self.first_delay.saturating_mul(1u32 << doublings).min(self.max_delay)
    }

    /// `restarts on (at most 5 in a row within 60 s each)` / `restarts off`, for listings.
    pub fn describe(&self) -> String {
        if self.restart {
            format!("restarts on (give up after {} in a row that each died within {} s)", self.limit, self.window.as_secs_f64())
        } else {
            "restarts off (--no-restart)".to_string()
        }
    }
}

/// What to do about a member that died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after `after`; this is restart number `nth` in a row.
    Restart { after: Duration, nth: u32 },
    /// A crash loop: it was restarted `restarts` times in a row and died quickly each time.
    GiveUp { restarts: u32 },
    /// Restarts are turned off.
    Off,
}

/// One member's restart history: when it last started and its quick failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    started: Instant,
    /// Restarts in a row that were followed by a quick failure (or are pending).
    in_a_row: u32,
}

impl Tracker {
    /// A member started at `now`.
    pub fn new(now: Instant) -> Tracker {
        Tracker { started: now, in_a_row: 0 }
    }

    /// The member was (re)started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started = now;
    }

    /// The member died at `now`: restart it (after which delay) or give it up.
    pub fn on_exit(&mut self, policy: &Policy, now: Instant) -> Decision {
        if !policy.restart {
            return Decision::Off;
        }
        if now.saturating_duration_since(self.started) >= policy.window {
            self.in_a_row = 0;
        }
        if self.in_a_row >= policy.limit {
            return Decision::GiveUp { restarts: self.in_a_row };
        }
        self.in_a_row += 1;
        Decision::Restart { after: policy.backoff(self.in_a_row), nth: self.in_a_row }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn backoff_doubles_from_half_a_second_to_thirty() {
        let p = Policy::default();
        let delays: Vec<u64> = (1..=9).map(|n| p.backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(p.backoff(0), MS(500), "no restart yet counts as the first");
        assert_eq!(p.backoff(u32::MAX), p.max_delay, "no overflow");
    }

    #[test]
    fn a_crash_loop_is_given_up_after_the_limit() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let mut now = t0;
        let mut waited = Duration::ZERO;
        for nth in 1..=5 {
            // Dies at once on every start.
            now += MS(100);
            match t.on_exit(&p, now) {
                Decision::Restart { after, nth: n } => {
                    assert_eq!(n, nth);
                    waited += after;
                    now += after;
                    t.started(now);
                }
                other => panic!("restart {nth} expected, got {other:?}"),
            }
        }
        assert_eq!(waited, MS(500 + 1000 + 2000 + 4000 + 8000));
        assert_eq!(t.on_exit(&p, now + MS(100)), Decision::GiveUp { restarts: 5 });
        assert_eq!(t.on_exit(&p, now + MS(200)), Decision::GiveUp { restarts: 5 }, "stays given up");
    }

    #[test]
    fn a_member_that_ran_for_the_window_starts_the_count_over() {
        let p = Policy { limit: 2, ..Policy::default() };
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert_eq!(t.on_exit(&p, t0 + MS(10)), Decision::Restart { after: MS(500), nth: 1 });
        t.started(t0 + MS(510));
        assert_eq!(t.on_exit(&p, t0 + MS(600)), Decision::Restart { after: MS(1000), nth: 2 });
        // This start lives a whole window: its death is not part of a crash loop.
        let later = t0 + MS(2000);
        t.started(later);
        assert_eq!(t.on_exit(&p, later + p.window), Decision::Restart { after: MS(500), nth: 1 });
    }

    #[test]
    fn killed_once_after_start_is_restarted_at_once_and_limits_apply_per_member() {
        let p = Policy::default();
        let t0 = Instant::now();
        let (mut a, mut b) = (Tracker::new(t0), Tracker::new(t0));
        assert_eq!(a.on_exit(&p, t0 + MS(1)), Decision::Restart { after: MS(500), nth: 1 });
        assert_eq!(b.on_exit(&p, t0 + MS(1)), Decision::Restart { after: MS(500), nth: 1 }, "b has its own count");
    }

    #[test]
    fn off_and_zero_limit() {
        let t0 = Instant::now();
        let off = Policy { restart: false, ..Policy::default() };
        assert_eq!(Tracker::new(t0).on_exit(&off, t0), Decision::Off);
        assert_eq!(off.describe(), "restarts off (--no-restart)");
        let never = Policy { limit: 0, ..Policy::default() };
        assert_eq!(Tracker::new(t0).on_exit(&never, t0), Decision::GiveUp { restarts: 0 });
        assert_eq!(Policy::default().describe(), "restarts on (give up after 5 in a row that each died within 60 s)");
    }
}
