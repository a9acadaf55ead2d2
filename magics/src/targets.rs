//! The `--targets` grammar: [`TargetSpec`] parses `all`, `3`, `-1`, `0:4`, `::2`, `1,3,5` and
//! `[1,3,5]`, and resolves them against the engine ids the client knows, as ipyparallel does:
//! a slice selects *positions* in the id list (`client.ids[0:4]`), a single number or a list
//! names *engine ids* (a negative number counts from the end of the id list).

use std::fmt;
use std::str::FromStr;

use crate::error::{MagicError, Result};

/// A Python-style slice over the list of engine ids. `None` parts take Python's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Slice {
    /// First position (negative: from the end).
    pub start: Option<i64>,
    /// Position to stop before (negative: from the end).
    pub stop: Option<i64>,
    /// Step; never zero. Negative walks backwards.
    pub step: Option<i64>,
}

impl Slice {
    /// The positions `0..len` this slice selects, in order, with Python's clamping: parts out of
    /// range are clamped, so a slice past the end selects nothing.
    pub fn indices(&self, len: usize) -> Vec<usize> {
        let n = len as i64;
        let step = self.step.unwrap_or(1);
        let mut out = Vec::new();
        if step > 0 {
            let clamp = |v: i64| {
                let v = if v < 0 { v + n } else { v };
                v.clamp(0, n)
            };
            let start = self.start.map_or(0, clamp);
            let stop = self.stop.map_or(n, clamp);
            let mut i = start;
            while i < stop {
                out.push(i as usize);
                i += step;
            }
        } else if step < 0 {
            let clamp = |v: i64| {
                let v = if v < 0 { v + n } else { v };
                v.clamp(-1, n - 1)
            };
            let start = self.start.map_or(n - 1, clamp);
            let stop = self.stop.map_or(-1, clamp);
            let mut i = start;
            while i > stop {
                out.push(i as usize);
                i += step;
            }
        }
        out
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |p: Option<i64>| p.map(|v| v.to_string()).unwrap_or_default();
        write!(f, "{}:{}", part(self.start), part(self.stop))?;
        if let Some(step) = self.step {
            write!(f, ":{step}")?;
        }
        Ok(())
    }
}

/// Which engines a `%px` runs on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum TargetSpec {
    /// Every registered engine (`all`).
    #[default]
    All,
    /// One engine id (`3`); negative counts from the end of the id list (`-1`: the last engine).
    Index(i64),
    /// Several engine ids (`1,3,5`, `[0]`); negatives count from the end as for [`Self::Index`].
    List(Vec<i64>),
    /// Positions in the id list (`0:4`, `::2`, `:`).
    Slice(Slice),
}

impl TargetSpec {
    /// Whether this names exactly one engine by number (`-t 1`). ipyparallel reports a failure
    /// on such a target as a plain `RemoteError` rather than a `CompositeError`.
    pub fn is_single(&self) -> bool {
        matches!(self, TargetSpec::Index(_))
    }

    /// The engine ids this selects out of `ids` (the registered engines, in the client's order,
    /// normally ascending). Duplicates in a list are dropped, keeping the first.
    ///
    /// Errors: [`MagicError::NoEngines`] if `ids` is empty, [`MagicError::NoSuchEngine`] for an
    /// id or negative index that is not there, [`MagicError::NoTargets`] for a slice that
    /// selects nothing.
    pub fn resolve(&self, ids: &[usize]) -> Result<Vec<usize>> {
        if ids.is_empty() {
            return Err(MagicError::NoEngines);
        }
        let pick = |requested: i64| -> Result<usize> {
            let missing = || MagicError::NoSuchEngine { requested, ids: ids.to_vec() };
            if requested < 0 {
                let pos = ids.len() as i64 + requested;
                if pos < 0 {
                    return Err(missing());
                }
                Ok(ids[pos as usize])
            } else {
                let id = usize::try_from(requested).map_err(|_| missing())?;
                if ids.contains(&id) {
                    Ok(id)
                } else {
                    Err(missing())
                }
            }
        };
        match self {
            TargetSpec::All => Ok(ids.to_vec()),
            TargetSpec::Index(i) => Ok(vec![pick(*i)?]),
            TargetSpec::List(list) => {
                let mut out: Vec<usize> = Vec::with_capacity(list.len());
                for &i in list {
                    let id = pick(i)?;
                    if !out.contains(&id) {
                        out.push(id);
                    }
                }
                Ok(out)
            }
            TargetSpec::Slice(s) => {
                let out: Vec<usize> = s.indices(ids.len()).into_iter().map(|p| ids[p]).collect();
                if out.is_empty() {
                    Err(MagicError::NoTargets { spec: self.to_string(), ids: ids.to_vec() })
                } else {
                    Ok(out)
                }
            }
        }
    }
}

impl fmt::Display for TargetSpec {
    /// The canonical spelling, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::All => f.write_str("all"),
            TargetSpec::Index(i) => write!(f, "{i}"),
            TargetSpec::List(l) => {
                let parts: Vec<String> = l.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", parts.join(","))
            }
            TargetSpec::Slice(s) => write!(f, "{s}"),
        }
    }
}

impl FromStr for TargetSpec {
    type Err = MagicError;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |reason: &str| MagicError::InvalidTargets { spec: spec.to_string(), reason: reason.to_string() };
        let s = spec.trim();
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.eq_ignore_ascii_case("all") {
            return Ok(TargetSpec::All);
        }
        let int = |p: &str| -> Result<i64> { p.trim().parse::<i64>().map_err(|_| bad(&format!("`{}` is not an integer", p.trim()))) };
        // `[1,3]` / `(1,3)` are lists; so is `[0]`.
        let bracketed = (s.starts_with('[') && s.ends_with(']')) || (s.starts_with('(') && s.ends_with(')'));
        if bracketed || s.contains(',') {
            let inner = if bracketed { &s[1..s.len() - 1] } else { s };
            if inner.contains(':') {
                return Err(bad("a list cannot contain a slice"));
            }
            let mut parts: Vec<&str> = inner.split(',').collect();
            // Python allows one trailing comma: `1,` is a one-element tuple.
            if parts.len() > 1 && parts.last().is_some_and(|p| p.trim().is_empty()) {
                parts.pop();
            }
            if parts.len() == 1 && parts[0].trim().is_empty() {
                return Err(bad("the list is empty"));
            }
            let list = parts.into_iter().map(int).collect::<Result<Vec<i64>>>()?;
            return Ok(TargetSpec::List(list));
        }
        if s.contains(':') {
            let parts: Vec<&str> = s.split(':').collect();
            if parts.len() > 3 {
                return Err(bad("a slice has at most three parts (start:stop:step)"));
            }
            let opt = |p: &str| -> Result<Option<i64>> {
                if p.trim().is_empty() {
                    Ok(None)
                } else {
                    int(p).map(Some)
                }
            };
            let slice = Slice {
                start: opt(parts[0])?,
                stop: opt(parts[1])?,
                step: match parts.get(2) {
                    Some(p) => opt(p)?,
                    None => None,
                },
            };
            if slice.step == Some(0) {
                return Err(bad("slice step cannot be zero"));
            }
            return Ok(TargetSpec::Slice(slice));
        }
        Ok(TargetSpec::Index(int(s)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TargetSpec {
        s.parse().unwrap()
    }

    fn r(s: &str, ids: &[usize]) -> Vec<usize> {
        t(s).resolve(ids).unwrap()
    }

    const IDS: [usize; 6] = [0, 1, 2, 3, 4, 5];

    #[test]
    fn parses_every_form() {
        assert_eq!(t("all"), TargetSpec::All);
        assert_eq!(t(" ALL "), TargetSpec::All);
        assert_eq!(t("0"), TargetSpec::Index(0));
        assert_eq!(t("-1"), TargetSpec::Index(-1));
        assert_eq!(t("1,3,5"), TargetSpec::List(vec![1, 3, 5]));
        assert_eq!(t("1, 3 ,5"), TargetSpec::List(vec![1, 3, 5]));
        assert_eq!(t("1,"), TargetSpec::List(vec![1]));
        assert_eq!(t("[0,3]"), TargetSpec::List(vec![0, 3]));
        assert_eq!(t("[0]"), TargetSpec::List(vec![0]));
        assert_eq!(t("(2,-1)"), TargetSpec::List(vec![2, -1]));
        let sl = |start, stop, step| TargetSpec::Slice(Slice { start, stop, step });
        assert_eq!(t("0:4"), sl(Some(0), Some(4), None));
        assert_eq!(t("::2"), sl(None, None, Some(2)));
        assert_eq!(t("1::2"), sl(Some(1), None, Some(2)));
        assert_eq!(t(":"), sl(None, None, None));
        assert_eq!(t("-2:"), sl(Some(-2), None, None));
        assert_eq!(t("::-1"), sl(None, None, Some(-1)));
    }

    #[test]
    fn display_round_trips() {
        for s in ["all", "3", "-1", "[1,3,5]", "0:4", "::2", "1::2", ":", "-2:", "::-1", "1:5:2"] {
            assert_eq!(t(s).to_string(), s);
            assert_eq!(t(&t(s).to_string()), t(s));
        }
    }

    #[test]
    fn resolves_slices_like_python() {
        assert_eq!(r(":", &IDS), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(r("0:4", &IDS), vec![0, 1, 2, 3]);
        assert_eq!(r("::2", &IDS), vec![0, 2, 4]);
        assert_eq!(r("1::2", &IDS), vec![1, 3, 5]);
        assert_eq!(r("-2:", &IDS), vec![4, 5]);
        assert_eq!(r(":-2", &IDS), vec![0, 1, 2, 3]);
        assert_eq!(r("::-1", &IDS), vec![5, 4, 3, 2, 1, 0]);
        assert_eq!(r("4:1:-1", &IDS), vec![4, 3, 2]);
        assert_eq!(r("-1:-4:-2", &IDS), vec![5, 3]);
        assert_eq!(r("2:100", &IDS), vec![2, 3, 4, 5]);
        assert_eq!(r("-100:2", &IDS), vec![0, 1]);
        assert_eq!(r("100::-1", &IDS), vec![5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn slices_select_positions_not_ids() {
        // ipyparallel: client.ids[0:2] -> the first two registered engines.
        let ids = [3, 7, 8, 10];
        assert_eq!(r("0:2", &ids), vec![3, 7]);
        assert_eq!(r("::2", &ids), vec![3, 8]);
        assert_eq!(r("-1", &ids), vec![10]);
        assert_eq!(r("7", &ids), vec![7]);
        assert_eq!(r("10,3", &ids), vec![10, 3]);
    }

    #[test]
    fn indices_and_lists_name_engine_ids() {
        assert_eq!(r("all", &IDS), IDS.to_vec());
        assert_eq!(r("0", &IDS), vec![0]);
        assert_eq!(r("-1", &IDS), vec![5]);
        assert_eq!(r("-6", &IDS), vec![0]);
        assert_eq!(r("1,3,5", &IDS), vec![1, 3, 5]);
        assert_eq!(r("5,1", &IDS), vec![5, 1]);
        assert_eq!(r("1,-1", &IDS), vec![1, 5]);
        assert_eq!(r("1,1,3", &IDS), vec![1, 3]);
    }

    #[test]
    fn out_of_range_errors_say_so() {
        let e = t("6").resolve(&IDS).unwrap_err();
        assert_eq!(e, MagicError::NoSuchEngine { requested: 6, ids: IDS.to_vec() });
        assert_eq!(e.to_string(), "no engine 6 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("-7").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "no engine -7 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("1,9").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "no engine 9 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("10:").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "targets `10:` select no engine (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("3:1").resolve(&IDS).unwrap_err();
        assert!(matches!(e, MagicError::NoTargets { .. }));
        assert_eq!(t("all").resolve(&[]).unwrap_err(), MagicError::NoEngines);
        assert_eq!(t("0:2").resolve(&[]).unwrap_err(), MagicError::NoEngines);
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let err = |s: &str| s.parse::<TargetSpec>().unwrap_err().to_string();
        assert_eq!(err("x"), format!("invalid targets `x`: `x` is not an integer; valid forms: {}", crate::error::TARGET_FORMS));
        assert!(err("").starts_with("invalid targets ``: it is empty;"));
        assert!(err("::0").starts_with("invalid targets `::0`: slice step cannot be zero;"));
        assert!(err("1:2:3:4").starts_with("invalid targets `1:2:3:4`: a slice has at most three parts"));
        assert!(err("1,,2").starts_with("invalid targets `1,,2`: `` is not an integer"));
        assert!(err("[]").starts_with("invalid targets `[]`: the list is empty"));
        assert!(err("[0:2]").starts_with("invalid targets `[0:2]`: a list cannot contain a slice"));
        assert!(err("a:2").starts_with("invalid targets `a:2`: `a` is not an integer"));
        assert!(err("1.5").starts_with("invalid targets `1.5`: `1.5` is not an integer"));
    }

    #[test]
    fn single_means_one_number() {
        assert!(t("1").is_single());
        assert!(t("-1").is_single());
        assert!(!t("[1]").is_single());
        assert!(!t("1:2").is_single());
        assert!(!t("all").is_single());
    }
}
