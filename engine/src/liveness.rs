//! Is the compiler still there? Decided from the connection alone (a compiler may run on
//! another host, so its pid means nothing here): a dropped socket is reported by the socket
//! monitor at once, and while the engine waits on the compiler it pings it; a compiler silent
//! for [`SILENCE`] (stopped, frozen, or its host gone) is declared gone. Pure: the engine loop
//! feeds it the time and what it heard.

use std::time::{Duration, Instant};

/// A ping is sent this often while the engine waits on the compiler.
pub const PING_EVERY: Duration = Duration::from_secs(1);
/// A compiler that answers nothing for this long while the engine waits on it is gone. Compiles
/// run on the compiler's own threads; its event loop answers pings while a cell compiles.
pub const SILENCE: Duration = Duration::from_secs(15);

/// What to do now about the compiler.
#[derive(Debug, PartialEq, Eq)]
pub enum Watch {
    /// Nothing.
    Quiet,
    /// Send a ping.
    Ping,
    /// It has been silent for this long while the engine waited: it is gone.
    Gone(Duration),
}

/// When the compiler was last heard and pinged.
#[derive(Debug, Clone)]
pub struct CompilerWatch {
    last_heard: Instant,
    last_ping: Instant,
}

impl CompilerWatch {
    pub fn new(now: Instant) -> CompilerWatch {
        CompilerWatch { last_heard: now, last_ping: now }
    }

    /// Any message from the compiler arrived.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Check at `now`; `waiting` says whether anything waits on the compiler (a cell's reply, a
    /// closure compile, an artifact). Silence only counts while something waits.
    pub fn check(&mut self, now: Instant, waiting: bool) -> Watch {
        if !waiting {
            self.last_heard = now;
            return Watch::Quiet;
        }
        let silent = now.duration_since(self.last_heard);
        if silent > SILENCE {
            return Watch::Gone(silent);
        }
        if now.duration_since(self.last_ping) >= PING_EVERY {
            self.last_ping = now;
            return Watch::Ping;
        }
        Watch::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answering_compiler_is_pinged_and_kept() {
        let t0 = Instant::now();
        let mut w = CompilerWatch::new(t0);
        assert_eq!(w.check(t0, true), Watch::Quiet);
        let mut t = t0;
        for _ in 0..60 {
            t += PING_EVERY;
            assert_eq!(w.check(t, true), Watch::Ping);
            w.heard(t + Duration::from_millis(1));
        }
    }

    #[test]
    fn a_silent_compiler_is_gone_only_while_someone_waits() {
        let t0 = Instant::now();
        let mut w = CompilerWatch::new(t0);
        // Idle for a long time: nobody waits, nothing is decided.
        assert_eq!(w.check(t0 + SILENCE * 10, false), Watch::Quiet);
        // Then a cell waits on a compiler that stopped answering.
        let start = t0 + SILENCE * 10;
        let mut t = start;
        let mut pings = 0;
        loop {
            t += PING_EVERY;
            match w.check(t, true) {
                Watch::Ping => pings += 1,
                Watch::Gone(silent) => {
                    assert!(silent > SILENCE);
                    break;
                }
                Watch::Quiet => {}
            }
        }
        assert!(pings >= 10, "it was pinged before being given up ({pings})");
        assert!(t - start > SILENCE && t - start <= SILENCE + PING_EVERY * 2);
    }
}
