//! Load-balancing schemes and each engine's task limit, as pure functions.
//!
//! Each scheme gets the loads (outstanding tasks) of the eligible engines in LRU order (least
//! recently used first) and returns the index of the engine to use, as ipyparallel's
//! `task_scheduler.py` choosers do.

use std::time::{Duration, Instant};

use rand::Rng;

/// A load-balancing scheme (`--scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Lowest load; the least recently used among equals (default).
    LeastLoad,
    /// Always the least recently used engine.
    Lru,
    /// Uniformly random.
    PlainRandom,
    /// Two random picks, the least recently used of the two.
    TwoBin,
    /// Two random picks weighted by inverse load, the less loaded of the two.
    Weighted,
}

impl Scheme {
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::LeastLoad => "leastload",
            Scheme::Lru => "lru",
            Scheme::PlainRandom => "plainrandom",
            Scheme::TwoBin => "twobin",
            Scheme::Weighted => "weighted",
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Scheme, String> {
        Ok(match s {
            "leastload" => Scheme::LeastLoad,
            "lru" => Scheme::Lru,
            "plainrandom" => Scheme::PlainRandom,
            "twobin" => Scheme::TwoBin,
            "weighted" => Scheme::Weighted,
            other => return Err(format!("unknown scheme {other:?}; use leastload, lru, plainrandom, twobin or weighted")),
        })
    }
}

/// Pick one of `loads` (non-empty, LRU order) with `scheme`.
pub fn choose<R: Rng + ?Sized>(scheme: Scheme, loads: &[usize], rng: &mut R) -> usize {
    assert!(!loads.is_empty(), "choose needs at least one engine");
    let n = loads.len();
    match scheme {
        Scheme::LeastLoad => leastload(loads),
        Scheme::Lru => 0,
        Scheme::PlainRandom => rng.gen_range(0..n),
        Scheme::TwoBin => rng.gen_range(0..n).min(rng.gen_range(0..n)),
        Scheme::Weighted => {
            let weights: Vec<f64> = loads.iter().map(|&l| 1.0 / (1e-6 + l as f64)).collect();
            let total: f64 = weights.iter().sum();
            let mut pick = || {
                let x = rng.gen::<f64>() * total;
                let mut acc = 0.0;
                for (i, w) in weights.iter().enumerate() {
                    acc += w;
                    if acc >= x {
                        return i;
                    }
                }
                n - 1
            };
            let (a, b) = (pick(), pick());
            if weights[b] > weights[a] {
                b
            } else {
                a
            }
        }
    }
}

/// Index of the first lowest load.
pub fn leastload(loads: &[usize]) -> usize {
    let mut best = 0;
    for (i, &l) in loads.iter().enumerate() {
        if l < loads[best] {
            best = i;
        }
    }
    best
}

/// Whether an engine with `load` outstanding tasks can take another under high-water mark `hwm`
/// (0 = unlimited).
pub fn has_capacity(load: usize, hwm: usize) -> bool {
    hwm == 0 || load < hwm
}

/// Work (by the engine's recent pace) an engine may have queued beyond the high-water mark.
pub const QUEUED_WORK: Duration = Duration::from_millis(20);
/// At most this many times the high-water mark in flight on one engine.
pub const DEEPEN: usize = 4;

/// How fast an engine finishes load-balanced tasks while it is busy: an average of the time
/// between its completions, counted only while it had more tasks in flight (so idle time is not
/// mistaken for work). It lets an engine that finishes tasks quickly hold more of them than the
/// high-water mark: up to [`DEEPEN`] times it, as long as that is under [`QUEUED_WORK`] of its
/// work. Slow tasks keep the mark as it is, so engines that join late or finish early still find
/// most of a large backlog in the controller.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    /// The last completion, if the engine stayed busy after it.
    busy_since: Option<Instant>,
    mean: Option<Duration>,
}

impl Pace {
    /// A task finished at `now`, leaving `in_flight` tasks on the engine.
    pub fn finished(&mut self, now: Instant, in_flight: usize) {
        if let Some(since) = self.busy_since {
            let dt = now.saturating_duration_since(since);
            // An exponential average (1/8 for the newest interval): steady, and it follows a
            // change of task size within a few dozen tasks.
            self.mean = Some(self.mean.map_or(dt, |m| (m * 7 + dt) / 8));
        }
        self.busy_since = (in_flight > 0).then_some(now);
    }

    /// The tasks this engine may have in flight under high-water mark `hwm` (0: unlimited).
    pub fn limit(&self, hwm: usize) -> usize {
        let Some(mean) = self.mean.filter(|_| hwm > 0) else { return hwm };
        let fits = QUEUED_WORK.as_nanos() / mean.as_nanos().max(1);
        usize::try_from(fits).unwrap_or(usize::MAX).clamp(hwm, hwm.saturating_mul(DEEPEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fast_engines_hold_more_tasks_and_slow_ones_keep_the_mark() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut p = Pace::default();
        assert_eq!(p.limit(16), 16, "no pace yet");
        // 100 µs tasks, back to back: 20 ms holds 200 of them; capped at 4 x 16.
        for i in 0..50 {
            p.finished(at(i * 100), 5);
        }
        assert_eq!(p.limit(16), 64);
        assert_eq!(p.limit(1), 4);
        assert_eq!(p.limit(0), 0, "unlimited stays unlimited");
        // The tasks become 1 ms: 20 of them in 20 ms.
        for i in 0..200 {
            p.finished(at(5_000 + i * 1000), 5);
        }
        assert_eq!(p.limit(16), 20);
        // 50 ms tasks: the mark.
        for i in 0..200 {
            p.finished(at(300_000 + i * 50_000), 5);
        }
        assert_eq!(p.limit(16), 16);
    }

    #[test]
    fn idle_time_between_tasks_is_not_counted_as_work() {
        let t0 = Instant::now();
        let mut p = Pace::default();
        for i in 0..20 {
            p.finished(t0 + Duration::from_micros(i * 100), 3);
        }
        // The engine ran out of tasks, then a new one finished 10 s later.
        p.finished(t0 + Duration::from_micros(2_000), 0);
        p.finished(t0 + Duration::from_secs(10), 2);
        assert_eq!(p.limit(16), 64, "the idle 10 s did not slow its pace");
    }

    #[test]
    fn leastload_ties_go_to_the_least_recently_used() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(choose(Scheme::LeastLoad, &[2, 1, 1, 3], &mut rng), 1);
        assert_eq!(choose(Scheme::LeastLoad, &[0, 0, 0], &mut rng), 0);
        assert_eq!(choose(Scheme::LeastLoad, &[5, 4, 3, 0], &mut rng), 3);
    }

    #[test]
    fn lru_takes_the_front() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(choose(Scheme::Lru, &[9, 0, 0], &mut rng), 0);
    }

    #[test]
    fn random_schemes_stay_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for scheme in [Scheme::PlainRandom, Scheme::TwoBin, Scheme::Weighted] {
            for _ in 0..200 {
                assert!(choose(scheme, &[1, 2, 3], &mut rng) < 3);
            }
        }
    }

    #[test]
    fn weighted_prefers_idle_engines() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let idle = (0..200).filter(|_| choose(Scheme::Weighted, &[10, 0, 10], &mut rng) == 1).count();
        assert!(idle > 190, "idle engine picked {idle} of 200 times");
    }

    #[test]
    fn hwm_zero_is_unlimited() {
        assert!(has_capacity(1000, 0));
        assert!(has_capacity(0, 1));
        assert!(!has_capacity(1, 1));
    }

    #[test]
    fn scheme_names_round_trip() {
        for s in ["leastload", "lru", "plainrandom", "twobin", "weighted"] {
            assert_eq!(s.parse::<Scheme>().unwrap().name(), s);
        }
        assert!("pure".parse::<Scheme>().is_err());
    }
}
