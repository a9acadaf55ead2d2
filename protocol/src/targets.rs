//! The one target grammar: which engines a selection names, as the client's views
//! (`rpx::TargetSpec`) and the magics' `--targets` read it, and its resolution against the
//! engine ids there are. Pure: no I/O.
//!
//! | text | engines |
//! |---|---|
//! | `all` | every engine |
//! | `3`, `-1` | engine 3; the last engine (a negative number counts from the end of the ids) |
//! | `0:4`, `::2`, `1::2`, `-2:`, `:` | that Python slice of the sorted ids (positions, not ids) |
//! | `1,3,5`, `[1, 3]`, `(2,)`, `0:2,7` | several, in that order, duplicates dropped |
//!
//! A bare number is kept apart from a one-element list (`3` vs `[3]`): ipyparallel reports a
//! failure on a single-engine target as a plain `RemoteError`, on a list as a `CompositeError`.

use std::fmt;
use std::str::FromStr;

/// The forms a target may take, for error messages.
pub const TARGET_FORMS: &str =
    "all, an engine id (0, or -1 for the last), a slice of the engine list (0:4, ::2, 1::2, -2:), a list (1,3,5 or [1,3,5])";

/// A Python slice over the sorted engine ids. `None` parts take Python's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Slice {
    /// First position (negative: from the end).
    pub start: Option<i64>,
    /// Position to stop before (negative: from the end).
    pub stop: Option<i64>,
    /// Step; never zero once parsed. Negative walks backwards.
    pub step: Option<i64>,
}

impl Slice {
    /// The positions `0..len` this slice selects, in order, with Python's `slice.indices`
    /// clamping: parts out of range are clamped, so a slice past the end selects nothing. A
    /// zero step selects nothing.
    pub fn indices(&self, len: usize) -> Vec<usize> {
        let len = len as i64;
        let step = self.step.unwrap_or(1);
        let norm = |v: i64| if v < 0 { v + len } else { v };
        let mut out = Vec::new();
        if step > 0 {
            let start = self.start.map_or(0, |s| norm(s).clamp(0, len));
            let stop = self.stop.map_or(len, |s| norm(s).clamp(0, len));
            let mut i = start;
            while i < stop {
                out.push(i as usize);
                i += step;
            }
        } else if step < 0 {
            let start = self.start.map_or(len - 1, |s| norm(s).clamp(-1, len - 1));
            let stop = self.stop.map_or(-1, |s| norm(s).clamp(-1, len - 1));
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

/// One element of a list of targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// An engine id; a negative number counts from the end of the ids (`-1` is the last).
    Id(i64),
    /// A slice of the sorted ids.
    Slice(Slice),
}

/// A target selection, resolved against the engine ids at each use, so `All` includes engines
/// that joined after it was made.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum TargetSpec {
    /// Every engine (`all`).
    #[default]
    All,
    /// One engine written as a bare number (`3`, `-1`).
    One(i64),
    /// A slice, or a list of ids and slices (`0:4`, `1,3,5`, `[0]`).
    Select(Vec<Selector>),
}

/// Why a target selection is invalid or selects nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The text does not parse.
    #[error("invalid targets `{spec}`: {reason}; valid forms: {TARGET_FORMS}")]
    Invalid {
        /// The selection as written.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No engine is registered at all.
    #[error("no engines are registered")]
    NoEngines,
    /// An engine id that is not registered, or a negative index past the start.
    #[error("no engine {requested} (engines: {})", fmt_ids(.ids))]
    NoSuchEngine {
        /// The id or negative index asked for.
        requested: i64,
        /// The engines there are.
        ids: Vec<usize>,
    },
    /// A selection that names no engine (a slice past the end).
    #[error("targets `{spec}` select no engine (engines: {})", fmt_ids(.ids))]
    NoTargets {
        /// The selection.
        spec: String,
        /// The engines there are.
        ids: Vec<usize>,
    },
}

/// `[0, 1, 2]`.
pub fn fmt_ids(ids: &[usize]) -> String {
    let inner: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("[{}]", inner.join(", "))
}

impl TargetSpec {
    /// Explicit engine ids, as a list.
    pub fn ids(ids: impl IntoIterator<Item = usize>) -> TargetSpec {
        TargetSpec::Select(ids.into_iter().map(|i| Selector::Id(i as i64)).collect())
    }

    /// Parse the grammar of the module documentation.
    pub fn parse(text: &str) -> Result<TargetSpec, TargetError> {
        text.parse()
    }

    /// Whether this names exactly one engine by a bare number (`-t 1`).
    pub fn is_single(&self) -> bool {
        matches!(self, TargetSpec::One(_))
    }

    /// The engine ids this selects out of `ids` (the registered engines, normally ascending),
    /// in selection order without duplicates.
    pub fn resolve(&self, ids: &[usize]) -> Result<Vec<usize>, TargetError> {
        if ids.is_empty() {
            return Err(TargetError::NoEngines);
        }
        let pick = |requested: i64| -> Result<usize, TargetError> {
            let missing = || TargetError::NoSuchEngine { requested, ids: ids.to_vec() };
            if requested < 0 {
                let pos = usize::try_from(ids.len() as i64 + requested).map_err(|_| missing())?;
                Ok(ids[pos])
            } else {
                usize::try_from(requested).ok().filter(|id| ids.contains(id)).ok_or_else(missing)
            }
        };
        let selectors = match self {
            TargetSpec::All => return Ok(ids.to_vec()),
            TargetSpec::One(i) => return Ok(vec![pick(*i)?]),
            TargetSpec::Select(selectors) => selectors,
        };
        let mut out: Vec<usize> = Vec::new();
        for s in selectors {
            match s {
                Selector::Id(i) => out.push(pick(*i)?),
                Selector::Slice(slice) => out.extend(slice.indices(ids.len()).into_iter().map(|p| ids[p])),
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|id| seen.insert(*id));
        if out.is_empty() {
            return Err(TargetError::NoTargets { spec: self.to_string(), ids: ids.to_vec() });
        }
        Ok(out)
    }
}

impl fmt::Display for TargetSpec {
    /// The canonical spelling, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::All => f.write_str("all"),
            TargetSpec::One(i) => write!(f, "{i}"),
            TargetSpec::Select(selectors) => {
                let parts: Vec<String> = selectors
                    .iter()
                    .map(|s| match s {
                        Selector::Id(i) => i.to_string(),
                        Selector::Slice(slice) => slice.to_string(),
                    })
                    .collect();
                if selectors.iter().all(|s| matches!(s, Selector::Id(_))) {
                    write!(f, "[{}]", parts.join(","))
                } else {
                    f.write_str(&parts.join(","))
                }
            }
        }
    }
}

impl FromStr for TargetSpec {
    type Err = TargetError;

    fn from_str(spec: &str) -> Result<TargetSpec, TargetError> {
        let bad = |reason: String| TargetError::Invalid { spec: spec.to_string(), reason };
        let s = spec.trim();
        if s.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if s.eq_ignore_ascii_case("all") {
            return Ok(TargetSpec::All);
        }
        let int = |p: &str| -> Result<i64, TargetError> {
            p.trim().parse::<i64>().map_err(|_| bad(format!("`{}` is not an engine number", p.trim())))
        };
        let bracketed = (s.starts_with('[') && s.ends_with(']')) || (s.starts_with('(') && s.ends_with(')'));
        if !bracketed && !s.contains(',') && !s.contains(':') {
            return Ok(TargetSpec::One(int(s)?));
        }
        let inner = if bracketed { &s[1..s.len() - 1] } else { s };
        let mut parts: Vec<&str> = inner.split(',').collect();
        // Python allows one trailing comma: `1,` is a one-element tuple.
        if parts.len() > 1 && parts.last().is_some_and(|p| p.trim().is_empty()) {
            parts.pop();
        }
        if parts.len() == 1 && parts[0].trim().is_empty() {
            return Err(bad("the list is empty".into()));
        }
        let mut selectors = Vec::with_capacity(parts.len());
        for part in parts {
            if !part.contains(':') {
                selectors.push(Selector::Id(int(part)?));
                continue;
            }
            let fields: Vec<&str> = part.split(':').collect();
            if fields.len() > 3 {
                return Err(bad("a slice has at most three parts (start:stop:step)".into()));
            }
            let opt = |p: &str| if p.trim().is_empty() { Ok(None) } else { int(p).map(Some) };
            let slice = Slice { start: opt(fields[0])?, stop: opt(fields[1])?, step: fields.get(2).map_or(Ok(None), |p| opt(p))? };
            if slice.step == Some(0) {
                return Err(bad("slice step cannot be zero".into()));
            }
            selectors.push(Selector::Slice(slice));
        }
        Ok(TargetSpec::Select(selectors))
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

    fn ids(list: &[i64]) -> TargetSpec {
        TargetSpec::Select(list.iter().map(|i| Selector::Id(*i)).collect())
    }

    fn sl(start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> TargetSpec {
        TargetSpec::Select(vec![Selector::Slice(Slice { start, stop, step })])
    }

    const IDS: [usize; 6] = [0, 1, 2, 3, 4, 5];

    #[test]
    fn parses_every_form() {
        assert_eq!(t("all"), TargetSpec::All);
        assert_eq!(t(" ALL "), TargetSpec::All);
        assert_eq!(t("0"), TargetSpec::One(0));
        assert_eq!(t("-1"), TargetSpec::One(-1));
        assert_eq!(t("1,3,5"), ids(&[1, 3, 5]));
        assert_eq!(t("1, 3 ,5"), ids(&[1, 3, 5]));
        assert_eq!(t("1,"), ids(&[1]));
        assert_eq!(t("[0,3]"), ids(&[0, 3]));
        assert_eq!(t("[0]"), ids(&[0]));
        assert_eq!(t("(2,-1)"), ids(&[2, -1]));
        assert_eq!(t("(2,)"), ids(&[2]));
        assert_eq!(t("0:4"), sl(Some(0), Some(4), None));
        assert_eq!(t("::2"), sl(None, None, Some(2)));
        assert_eq!(t("1::2"), sl(Some(1), None, Some(2)));
        assert_eq!(t(":"), sl(None, None, None));
        assert_eq!(t("-2:"), sl(Some(-2), None, None));
        assert_eq!(t("::-1"), sl(None, None, Some(-1)));
        let mixed = TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(0), stop: Some(2), step: None }), Selector::Id(7)]);
        assert_eq!(t("0:2,7"), mixed);
        assert_eq!(t("[0:2,7]"), mixed, "a list may hold slices");
    }

    #[test]
    fn display_round_trips() {
        for s in ["all", "3", "-1", "[1,3,5]", "[0]", "0:4", "::2", "1::2", ":", "-2:", "::-1", "1:5:2", "0:4,::2,7"] {
            assert_eq!(t(s).to_string(), s);
            assert_eq!(t(&t(s).to_string()), t(s));
        }
        assert_eq!(TargetSpec::ids([2, 0]).to_string(), "[2,0]");
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
        assert_eq!(Slice { step: Some(-1), ..Slice::default() }.indices(0), Vec::<usize>::new());
        assert_eq!(Slice { step: Some(0), ..Slice::default() }.indices(3), Vec::<usize>::new());
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
        assert_eq!(r("0:2,10", &ids), vec![3, 7, 10]);
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
        assert_eq!(r("1,1,3", &IDS), vec![1, 3], "duplicates dropped");
        assert_eq!(r("0:2,1", &IDS), vec![0, 1], "duplicates dropped across slices");
    }

    #[test]
    fn out_of_range_errors_say_so() {
        let e = t("6").resolve(&IDS).unwrap_err();
        assert_eq!(e, TargetError::NoSuchEngine { requested: 6, ids: IDS.to_vec() });
        assert_eq!(e.to_string(), "no engine 6 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("-7").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "no engine -7 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("1,9").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "no engine 9 (engines: [0, 1, 2, 3, 4, 5])");
        let e = t("10:").resolve(&IDS).unwrap_err();
        assert_eq!(e.to_string(), "targets `10:` select no engine (engines: [0, 1, 2, 3, 4, 5])");
        assert!(matches!(t("3:1").resolve(&IDS).unwrap_err(), TargetError::NoTargets { .. }));
        assert_eq!(t("all").resolve(&[]).unwrap_err(), TargetError::NoEngines);
        assert_eq!(t("0:2").resolve(&[]).unwrap_err(), TargetError::NoEngines);
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let err = |s: &str| s.parse::<TargetSpec>().unwrap_err().to_string();
        assert_eq!(err("x"), format!("invalid targets `x`: `x` is not an engine number; valid forms: {TARGET_FORMS}"));
        assert!(err("").starts_with("invalid targets ``: it is empty;"));
        assert!(err("::0").starts_with("invalid targets `::0`: slice step cannot be zero;"));
        assert!(err("1:2:3:4").starts_with("invalid targets `1:2:3:4`: a slice has at most three parts"));
        assert!(err("1,,2").starts_with("invalid targets `1,,2`: `` is not an engine number"));
        assert!(err("[]").starts_with("invalid targets `[]`: the list is empty"));
        assert!(err("a:2").starts_with("invalid targets `a:2`: `a` is not an engine number"));
        assert!(err("1.5").starts_with("invalid targets `1.5`: `1.5` is not an engine number"));
        assert!(err("all,1").starts_with("invalid targets `all,1`: `all` is not an engine number"));
        assert!(err(",").starts_with("invalid targets `,`: the list is empty"));
    }

    #[test]
    fn single_means_one_bare_number() {
        assert!(t("1").is_single());
        assert!(t("-1").is_single());
        assert!(!t("[1]").is_single());
        assert!(!t("1,").is_single());
        assert!(!t("1:2").is_single());
        assert!(!t("all").is_single());
    }
}
