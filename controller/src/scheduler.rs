//! Load-balancing schemes, as pure functions.
//!
//! Each scheme gets the loads (outstanding tasks) of the eligible engines in LRU order (least
//! recently used first) and returns the index of the engine to use, as ipyparallel's
//! `task_scheduler.py` choosers do.

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
