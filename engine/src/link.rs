//! The engine's link to the controller, as a pure state machine: registered (up) or lost (down)
//! and why, when to try to register again and whether over the existing sockets or new ones,
//! and when to give up and exit. The engine loop feeds it events and carries out its steps (see
//! [`crate::net::rejoin`]); the worker and its variables are untouched throughout.
//!
//! A link is lost in one of three explicit ways:
//! - the controller sent an [`EvictionNotice`] for the current registration (it evicted this
//!   engine, for example after a pause longer than its heartbeat limit, and is alive): register
//!   again over the connected sockets (only the registration socket is new);
//! - a connection to the controller closed (it died or restarted): new sockets;
//! - no heartbeat ping for [`Link::silence_limit`] of time the engine was awake (a frozen
//!   controller, a lost network): new sockets. Time spent frozen itself (SIGSTOP) does not
//!   count, so an engine that resumes is not fooled by its own pause.
//!
//! While down, one attempt runs at a time, retried after [`RETRY_DELAY`], until
//! [`Link::reconnect_timeout`] has passed since the link was lost; then the engine exits.

use std::time::{Duration, Instant};

use rpx_protocol::registration::EvictionNotice;

/// Pause between a failed attempt and the next one.
pub const RETRY_DELAY: Duration = Duration::from_millis(250);
/// Failed attempts over the existing sockets before new ones are tried.
const ATTEMPTS_BEFORE_REBUILD: u32 = 3;
/// Longest stretch between two ticks counted as awake silence (a longer one is a pause of the
/// engine itself).
const MAX_TICK_GAP: Duration = Duration::from_secs(2);

/// What the engine loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Quiet,
    /// Start a registration attempt; `rebuild`: connect new sockets first.
    Attempt {
        rebuild: bool,
    },
    /// Give up: exit with this message.
    GiveUp(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Up,
    Down { since: Instant, why: String, rebuild: bool, attempting: bool, failures: u32, next_attempt: Instant },
}

/// The link to the controller.
#[derive(Debug)]
pub struct Link {
    state: State,
    /// msg_id of the registration request of the current (or last) registration.
    registration: String,
    /// How long the engine keeps trying once the link is lost.
    pub reconnect_timeout: Duration,
    /// Awake time without a ping after which the controller counts as lost.
    pub silence_limit: Duration,
    silent: Duration,
    last_tick: Instant,
    pings_seen: u64,
}

impl Link {
    /// A link registered by the request `registration` at `now`.
    pub fn new(registration: String, reconnect_timeout: Duration, silence_limit: Duration, now: Instant) -> Link {
        Link { state: State::Up, registration, reconnect_timeout, silence_limit, silent: Duration::ZERO, last_tick: now, pings_seen: 0 }
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Why the link is down, and since when.
    pub fn down_since(&self) -> Option<(Instant, &str)> {
        match &self.state {
            State::Up => None,
            State::Down { since, why, .. } => Some((*since, why)),
        }
    }

    /// Does this notice end the current registration of the engine `uuid`? A notice for an
    /// older registration (sent before the engine registered again) is stale.
    pub fn notice_applies(&self, n: &EvictionNotice, uuid: &str) -> bool {
        n.uuid == uuid && n.registration == self.registration
    }

    /// The link is lost (`why`); `rebuild`: the sockets are no good either. Losing a link that
    /// is already down only widens what the next attempt does.
    pub fn lost(&mut self, why: &str, rebuild: bool, now: Instant) {
        match &mut self.state {
            State::Up => {
                self.state = State::Down { since: now, why: why.to_string(), rebuild, attempting: false, failures: 0, next_attempt: now };
            }
            State::Down { rebuild: r, .. } => *r |= rebuild,
        }
    }

    /// Registered again by the request `registration`.
    pub fn joined(&mut self, registration: String, now: Instant) {
        self.state = State::Up;
        self.registration = registration;
        self.silent = Duration::ZERO;
        self.last_tick = now;
    }

    /// The attempt under way failed (`why` is logged by the caller).
    pub fn attempt_failed(&mut self, now: Instant) {
        if let State::Down { attempting, failures, next_attempt, rebuild, .. } = &mut self.state {
            *attempting = false;
            *failures += 1;
            *next_attempt = now + RETRY_DELAY;
            if *failures >= ATTEMPTS_BEFORE_REBUILD {
                *rebuild = true;
            }
        }
    }

    /// The clock: `pings` is the number of heartbeat pings received so far. Says whether to
    /// start an attempt or give up.
    pub fn tick(&mut self, now: Instant, pings: u64) -> Step {
        let gap = now.saturating_duration_since(self.last_tick).min(MAX_TICK_GAP);
        self.last_tick = now;
        let heard = pings != self.pings_seen;
        self.pings_seen = pings;
        match &mut self.state {
            State::Up => {
                if heard {
                    self.silent = Duration::ZERO;
                } else {
                    self.silent += gap;
                }
                if self.silent > self.silence_limit {
                    let why = format!("no heartbeat from the controller for {} s", self.silent.as_secs());
                    self.lost(&why, true, now);
                    return self.tick_down(now);
                }
                Step::Quiet
            }
            State::Down { .. } => self.tick_down(now),
        }
    }

    fn tick_down(&mut self, now: Instant) -> Step {
        let State::Down { since, why, rebuild, attempting, next_attempt, .. } = &mut self.state else { return Step::Quiet };
        if now.saturating_duration_since(*since) >= self.reconnect_timeout {
            return Step::GiveUp(format!(
                "the controller is gone ({why}) and did not take this engine back within the reconnect timeout of {} s; exiting",
                self.reconnect_timeout.as_secs_f64()
            ));
        }
        if *attempting || now < *next_attempt {
            return Step::Quiet;
        }
        *attempting = true;
        Step::Attempt { rebuild: *rebuild }
    }

    /// Time left before giving up (zero while up).
    pub fn time_left(&self, now: Instant) -> Duration {
        match &self.state {
            State::Up => Duration::ZERO,
            State::Down { since, .. } => self.reconnect_timeout.saturating_sub(now.saturating_duration_since(*since)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn link(t0: Instant) -> Link {
        Link::new("reg-1".into(), Duration::from_secs(60), Duration::from_secs(10), t0)
    }

    fn notice(registration: &str) -> EvictionNotice {
        EvictionNotice {
            id: 3,
            uuid: "me".into(),
            registration: registration.into(),
            reason: "missed heartbeats".into(),
            answered: vec![],
            reconnect: false,
        }
    }

    #[test]
    fn an_eviction_notice_applies_only_to_the_current_registration_of_this_engine() {
        let t0 = Instant::now();
        let mut l = link(t0);
        assert!(l.notice_applies(&notice("reg-1"), "me"));
        assert!(!l.notice_applies(&notice("reg-1"), "someone else"));
        l.lost("evicted", false, t0);
        assert_eq!(l.tick(t0, 0), Step::Attempt { rebuild: false }, "evicted by a live controller: the sockets are kept");
        l.joined("reg-2".into(), t0 + S);
        assert!(!l.notice_applies(&notice("reg-1"), "me"), "a late notice for the old registration is stale");
        assert!(l.notice_applies(&notice("reg-2"), "me"));
    }

    #[test]
    fn one_attempt_at_a_time_retried_after_a_pause_then_over_new_sockets() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.lost("evicted", false, t0);
        assert_eq!(l.tick(t0, 0), Step::Attempt { rebuild: false });
        assert_eq!(l.tick(t0 + S, 0), Step::Quiet, "an attempt is under way");
        let mut t = t0 + S;
        for _ in 0..ATTEMPTS_BEFORE_REBUILD - 1 {
            l.attempt_failed(t);
            assert_eq!(l.tick(t, 0), Step::Quiet, "not before the retry delay");
            t += RETRY_DELAY;
            assert_eq!(l.tick(t, 0), Step::Attempt { rebuild: false });
        }
        l.attempt_failed(t);
        t += RETRY_DELAY;
        assert_eq!(l.tick(t, 0), Step::Attempt { rebuild: true }, "repeated failures: new sockets");
    }

    #[test]
    fn a_closed_connection_rebuilds_the_sockets_and_widens_a_pending_attempt() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.lost("evicted", false, t0);
        l.lost("the mux connection closed", true, t0);
        assert_eq!(l.tick(t0, 0), Step::Attempt { rebuild: true });
        assert_eq!(l.down_since().unwrap().1, "evicted", "the first reason is kept");
    }

    #[test]
    fn the_engine_gives_up_after_the_reconnect_timeout() {
        let t0 = Instant::now();
        let mut l = Link::new("r".into(), Duration::from_secs(3), Duration::from_secs(10), t0);
        l.lost("the mux connection closed", true, t0);
        assert_eq!(l.tick(t0, 0), Step::Attempt { rebuild: true });
        l.attempt_failed(t0 + S);
        assert_eq!(l.time_left(t0 + S), 2 * S);
        match l.tick(t0 + 3 * S, 0) {
            Step::GiveUp(msg) => assert!(msg.contains("mux connection closed") && msg.contains("reconnect timeout of 3 s"), "{msg}"),
            other => panic!("expected to give up, got {other:?}"),
        }
    }

    #[test]
    fn silence_counts_only_while_awake_so_a_paused_engine_is_not_fooled() {
        let t0 = Instant::now();
        let mut l = link(t0);
        // A 60 s pause (SIGSTOP) of the engine itself counts as one tick gap of at most 2 s.
        assert_eq!(l.tick(t0 + 60 * S, 0), Step::Quiet);
        assert!(l.is_up());
        // Pings resume: silence is reset.
        assert_eq!(l.tick(t0 + 61 * S, 1), Step::Quiet);
        // Ten seconds of awake ticks without a ping: lost, with new sockets.
        let mut t = t0 + 61 * S;
        let mut step = Step::Quiet;
        for _ in 0..11 {
            t += S;
            step = l.tick(t, 1);
            if step != Step::Quiet {
                break;
            }
        }
        assert_eq!(step, Step::Attempt { rebuild: true });
        assert!(l.down_since().unwrap().1.contains("no heartbeat"));
    }

    #[test]
    fn registering_again_brings_the_link_up() {
        let t0 = Instant::now();
        let mut l = link(t0);
        l.lost("x", true, t0);
        assert!(!l.is_up());
        l.joined("reg-2".into(), t0 + S);
        assert!(l.is_up() && l.down_since().is_none());
        assert_eq!(l.tick(t0 + 2 * S, 0), Step::Quiet);
    }
}
