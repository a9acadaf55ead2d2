//! Which engines a view addresses, and how work is split among them: the [`Targets`] trait
//! (`..`, ranges, ids, lists, Python-slice strings), the pure [`TargetSpec`] grammar and its
//! resolution against the live engine ids, and the [`partition`] / [`chunk_ranges`] splits used
//! by `scatter`, direct `map` and load-balanced `map`.

use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo};

use crate::error::{Error, Result};

/// One element of a target selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// An engine id; a negative number counts from the end of the live ids (`-1` is the last).
    Id(i64),
    /// A Python slice over the sorted live ids (`0:4`, `::2`, `1::2`, `-2:`).
    Slice { start: Option<i64>, stop: Option<i64>, step: Option<i64> },
}

/// A target selection, resolved against the live engine ids at each call, so `All` includes
/// engines that joined after the view was made.
///
/// The string form is the `%px --targets` grammar, Python-slice style:
///
/// | text | engines |
/// |---|---|
/// | `all` (or `:`) | every live engine |
/// | `3`, `-1` | engine 3; the last live engine |
/// | `0:4`, `::2`, `1::2`, `-2:` | that slice of the sorted live ids |
/// | `1,3,5`, `[1, 3]`, `0:2,7` | several, in that order (duplicates dropped) |
///
/// ```
/// use rpx::TargetSpec;
/// let ids = [0, 1, 2, 3, 4, 5];
/// assert_eq!(TargetSpec::parse("::2").unwrap().resolve(&ids).unwrap(), vec![0, 2, 4]);
/// assert_eq!(TargetSpec::parse("1,3,-1").unwrap().resolve(&ids).unwrap(), vec![1, 3, 5]);
/// assert_eq!(TargetSpec::parse("all").unwrap().resolve(&ids).unwrap(), ids.to_vec());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    All,
    Select(Vec<Selector>),
}

fn parse_int(s: &str, whole: &str) -> Result<i64> {
    s.trim().parse::<i64>().map_err(|_| {
        Error::Targets(format!("`{whole}`: `{}` is not an engine number (use e.g. `all`, `0`, `0:4`, `::2`, `1,3,5`)", s.trim()))
    })
}

fn parse_opt(s: &str, whole: &str) -> Result<Option<i64>> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        parse_int(s, whole).map(Some)
    }
}

impl TargetSpec {
    /// Parse the `%px --targets` grammar (see the type's documentation).
    pub fn parse(text: &str) -> Result<TargetSpec> {
        let mut s = text.trim();
        if (s.starts_with('[') && s.ends_with(']')) || (s.starts_with('(') && s.ends_with(')')) {
            s = s[1..s.len() - 1].trim();
        }
        if s.eq_ignore_ascii_case("all") || s == ":" || s == "::" {
            return Ok(TargetSpec::All);
        }
        let mut sel = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if part.contains(':') {
                let fields: Vec<&str> = part.split(':').collect();
                if fields.len() > 3 {
                    return Err(Error::Targets(format!("`{text}`: a slice has at most three fields (start:stop:step)")));
                }
                let start = parse_opt(fields[0], text)?;
                let stop = parse_opt(fields[1], text)?;
                let step = match fields.get(2) {
                    Some(f) => parse_opt(f, text)?,
                    None => None,
                };
                if step == Some(0) {
                    return Err(Error::Targets(format!("`{text}`: a slice step cannot be zero")));
                }
                sel.push(Selector::Slice { start, stop, step });
            } else if part.eq_ignore_ascii_case("all") {
                return Err(Error::Targets(format!("`{text}`: `all` cannot be combined with other targets")));
            } else {
                sel.push(Selector::Id(parse_int(part, text)?));
            }
        }
        if sel.is_empty() {
            return Err(Error::Targets(format!("`{text}` selects nothing (use e.g. `all`, `0`, `0:4`, `::2`, `1,3,5`)")));
        }
        Ok(TargetSpec::Select(sel))
    }

    /// Explicit engine ids.
    pub fn ids(ids: impl IntoIterator<Item = usize>) -> TargetSpec {
        TargetSpec::Select(ids.into_iter().map(|i| Selector::Id(i as i64)).collect())
    }

    /// The engine ids this selection names among the live `ids` (sorted ascending), in
    /// selection order without duplicates. Fails when no engine is live, when an id is not
    /// live, or when the selection is empty.
    pub fn resolve(&self, ids: &[usize]) -> Result<Vec<usize>> {
        if ids.is_empty() {
            return Err(Error::NoEngines);
        }
        let sel = match self {
            TargetSpec::All => return Ok(ids.to_vec()),
            TargetSpec::Select(sel) => sel,
        };
        let n = ids.len() as i64;
        let mut out: Vec<usize> = Vec::new();
        for s in sel {
            match s {
                Selector::Id(i) if *i < 0 => {
                    let pos = n + i;
                    if pos < 0 {
                        return Err(Error::Targets(format!("engine index {i} is out of range: {n} engines are registered ({ids:?})")));
                    }
                    out.push(ids[pos as usize]);
                }
                Selector::Id(i) => {
                    let id = *i as usize;
                    if !ids.contains(&id) {
                        return Err(Error::Targets(format!("engine {id} is not registered (registered engines: {ids:?})")));
                    }
                    out.push(id);
                }
                Selector::Slice { start, stop, step } => {
                    out.extend(slice_indices(ids.len(), *start, *stop, *step).into_iter().map(|p| ids[p]));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|id| seen.insert(*id));
        if out.is_empty() {
            return Err(Error::Targets(format!("{self} selects none of the registered engines {ids:?}")));
        }
        Ok(out)
    }
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: &Option<i64>| v.map(|x| x.to_string()).unwrap_or_default();
        match self {
            TargetSpec::All => write!(f, "all"),
            TargetSpec::Select(sel) => {
                let parts: Vec<String> = sel
                    .iter()
                    .map(|s| match s {
                        Selector::Id(i) => i.to_string(),
                        Selector::Slice { start, stop, step: None } => format!("{}:{}", opt(start), opt(stop)),
                        Selector::Slice { start, stop, step } => format!("{}:{}:{}", opt(start), opt(stop), opt(step)),
                    })
                    .collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}

/// Positions selected by a Python slice over a sequence of `len` items (Python's
/// `slice.indices` semantics, negative values counting from the end).
pub fn slice_indices(len: usize, start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> Vec<usize> {
    let len = len as i64;
    let step = step.unwrap_or(1);
    if step == 0 {
        return Vec::new();
    }
    let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    let norm = |v: i64| if v < 0 { v + len } else { v };
    let mut out = Vec::new();
    if step > 0 {
        let start = start.map_or(0, |s| clamp(norm(s), 0, len));
        let stop = stop.map_or(len, |s| clamp(norm(s), 0, len));
        let mut i = start;
        while i < stop {
            out.push(i as usize);
            i += step;
        }
    } else {
        let start = start.map_or(len - 1, |s| clamp(norm(s), -1, len - 1));
        let stop = stop.map_or(-1, |s| clamp(norm(s), -1, len - 1));
        let mut i = start;
        while i > stop {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

/// Anything that selects engines for [`crate::Client::direct_view`]:
///
/// - `..`: every live engine, resolved at each call (engines that join later are included);
/// - ranges (`0..4`, `0..=3`, `2..`, `..2`): Python-style slices of the sorted live ids, like
///   `%px --targets 0:4` (with engines `0..n` alive, `0..4` is engines 0 to 3);
/// - an integer, `Vec`, slice or array of integers (`2`, `[1, 3]`): engine ids, a negative one
///   counting from the end of the live ids (`-1` is the last engine);
/// - `&str` / `String`: the [`TargetSpec`] grammar (`"all"`, `"::2"`, `"1,3,5"`);
/// - a [`TargetSpec`].
pub trait Targets {
    /// The selection, or why it is invalid.
    fn to_spec(&self) -> Result<TargetSpec>;
}

impl Targets for TargetSpec {
    fn to_spec(&self) -> Result<TargetSpec> {
        Ok(self.clone())
    }
}

impl Targets for RangeFull {
    fn to_spec(&self) -> Result<TargetSpec> {
        Ok(TargetSpec::All)
    }
}

fn range_spec(start: Option<i64>, stop: Option<i64>) -> Result<TargetSpec> {
    Ok(TargetSpec::Select(vec![Selector::Slice { start, stop, step: None }]))
}

// Integer literals default to `i32`, so `direct_view(2)`, `direct_view(0..4)` and
// `direct_view([1, 3])` work without suffixes; negative values count from the end.
macro_rules! int_targets {
    ($($t:ty),*) => {$(
        impl Targets for Range<$t> {
            fn to_spec(&self) -> Result<TargetSpec> {
                range_spec(Some(self.start as i64), Some(self.end as i64))
            }
        }

        impl Targets for RangeInclusive<$t> {
            fn to_spec(&self) -> Result<TargetSpec> {
                let end = *self.end() as i64;
                // `..=-1` is "through the last": no stop.
                range_spec(Some(*self.start() as i64), if end == -1 { None } else { Some(end + 1) })
            }
        }

        impl Targets for RangeFrom<$t> {
            fn to_spec(&self) -> Result<TargetSpec> {
                range_spec(Some(self.start as i64), None)
            }
        }

        impl Targets for RangeTo<$t> {
            fn to_spec(&self) -> Result<TargetSpec> {
                range_spec(None, Some(self.end as i64))
            }
        }

        impl Targets for $t {
            fn to_spec(&self) -> Result<TargetSpec> {
                Ok(TargetSpec::Select(vec![Selector::Id(*self as i64)]))
            }
        }

        impl Targets for [$t] {
            fn to_spec(&self) -> Result<TargetSpec> {
                if self.is_empty() {
                    return Err(Error::Targets("an empty list of engines selects nothing".into()));
                }
                Ok(TargetSpec::Select(self.iter().map(|i| Selector::Id(*i as i64)).collect()))
            }
        }

        impl Targets for Vec<$t> {
            fn to_spec(&self) -> Result<TargetSpec> {
                self.as_slice().to_spec()
            }
        }

        impl<const N: usize> Targets for [$t; N] {
            fn to_spec(&self) -> Result<TargetSpec> {
                self.as_slice().to_spec()
            }
        }
    )*};
}

int_targets!(usize, u32, u64, i32, i64);

impl Targets for str {
    fn to_spec(&self) -> Result<TargetSpec> {
        TargetSpec::parse(self)
    }
}

impl Targets for String {
    fn to_spec(&self) -> Result<TargetSpec> {
        TargetSpec::parse(self)
    }
}

impl<T: Targets + ?Sized> Targets for &T {
    fn to_spec(&self) -> Result<TargetSpec> {
        (**self).to_spec()
    }
}

/// Split `n` items into `k` contiguous parts, in order: the first `n % k` parts get one item
/// more. Part `i` goes to the `i`-th engine (`scatter`, direct `map`). Parts may be empty when
/// `n < k`.
///
/// ```
/// assert_eq!(rpx::partition(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
/// ```
pub fn partition(n: usize, k: usize) -> Vec<Range<usize>> {
    if k == 0 {
        return Vec::new();
    }
    let (base, extra) = (n / k, n % k);
    let mut out = Vec::with_capacity(k);
    let mut start = 0;
    for i in 0..k {
        let len = base + usize::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Split `n` items into consecutive chunks of `chunksize` (the last may be shorter): one
/// load-balanced task per chunk.
///
/// ```
/// assert_eq!(rpx::chunk_ranges(10, 3), vec![0..3, 3..6, 6..9, 9..10]);
/// ```
pub fn chunk_ranges(n: usize, chunksize: usize) -> Vec<Range<usize>> {
    let size = chunksize.max(1);
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str, ids: &[usize]) -> Result<Vec<usize>> {
        TargetSpec::parse(text)?.resolve(ids)
    }

    #[test]
    fn grammar_of_targets() {
        let ids: Vec<usize> = (0..8).collect();
        assert_eq!(r("all", &ids).unwrap(), ids);
        assert_eq!(r(" ALL ", &ids).unwrap(), ids);
        assert_eq!(r(":", &ids).unwrap(), ids);
        assert_eq!(r("0", &ids).unwrap(), vec![0]);
        assert_eq!(r("0:4", &ids).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(r("::2", &ids).unwrap(), vec![0, 2, 4, 6]);
        assert_eq!(r("1::2", &ids).unwrap(), vec![1, 3, 5, 7]);
        assert_eq!(r("1,3,5", &ids).unwrap(), vec![1, 3, 5]);
        assert_eq!(r("[1, 3]", &ids).unwrap(), vec![1, 3]);
        assert_eq!(r("(2,)", &ids).unwrap(), vec![2]);
        assert_eq!(r("-1", &ids).unwrap(), vec![7]);
        assert_eq!(r("-2:", &ids).unwrap(), vec![6, 7]);
        assert_eq!(r("::-1", &ids).unwrap(), vec![7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(r("0:2,7", &ids).unwrap(), vec![0, 1, 7]);
        assert_eq!(r("1,1,2", &ids).unwrap(), vec![1, 2], "duplicates dropped");
        assert_eq!(r(":100", &ids).unwrap(), ids, "slices clamp like Python");
    }

    #[test]
    fn slices_index_the_live_ids() {
        // Engines 1 and 4 died: slices select positions among the survivors, ids must be live.
        let ids = [0, 2, 3, 5];
        assert_eq!(r("0:2", &ids).unwrap(), vec![0, 2]);
        assert_eq!(r("::2", &ids).unwrap(), vec![0, 3]);
        assert_eq!(r("-1", &ids).unwrap(), vec![5]);
        let e = r("1", &ids).unwrap_err().to_string();
        assert!(e.contains("engine 1 is not registered") && e.contains("[0, 2, 3, 5]"), "{e}");
    }

    #[test]
    fn bad_targets_say_why() {
        for bad in ["", "x", "1:2:3:4", "::0", "all,1", "1.5", ","] {
            let e = TargetSpec::parse(bad).unwrap_err();
            assert!(matches!(e, Error::Targets(_)), "{bad:?}: {e}");
        }
        assert!(TargetSpec::parse("x").unwrap_err().to_string().contains("`x` is not an engine number"));
        assert!(matches!(r("all", &[]), Err(Error::NoEngines)));
        assert!(r("-9", &[0, 1]).unwrap_err().to_string().contains("out of range"));
        assert!(r("5:", &[0, 1]).unwrap_err().to_string().contains("selects none"));
    }

    #[test]
    fn rust_values_as_targets() {
        let ids: Vec<usize> = (0..6).collect();
        let res = |t: &dyn Targets| t.to_spec().and_then(|s| s.resolve(&ids));
        assert_eq!(res(&..).unwrap(), ids);
        assert_eq!(res(&(0..4)).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(res(&(1..=2)).unwrap(), vec![1, 2]);
        assert_eq!(res(&(4..)).unwrap(), vec![4, 5]);
        assert_eq!(res(&(..2)).unwrap(), vec![0, 1]);
        assert_eq!(res(&2usize).unwrap(), vec![2]);
        assert_eq!(res(&vec![5usize, 1]).unwrap(), vec![5, 1]);
        assert_eq!(res(&2).unwrap(), vec![2], "plain integer literals");
        assert_eq!(res(&-1).unwrap(), vec![5]);
        assert_eq!(res(&[1, 3]).unwrap(), vec![1, 3]);
        assert_eq!(res(&(0..2)).unwrap(), vec![0, 1]);
        assert_eq!(res(&(-2..)).unwrap(), vec![4, 5]);
        assert_eq!(res(&std::ops::RangeInclusive::new(3, -1)).unwrap(), vec![3, 4, 5], "`..=-1` runs through the last engine");
        assert_eq!(res(&[1usize, 3]).unwrap(), vec![1, 3]);
        assert_eq!(res(&&[1usize, 3][..]).unwrap(), vec![1, 3]);
        assert_eq!(res(&"::3").unwrap(), vec![0, 3]);
        assert_eq!(res(&String::from("all")).unwrap(), ids);
        assert!(res(&Vec::<usize>::new()).is_err());
        assert_eq!(TargetSpec::parse("0:4,::2,7").unwrap().to_string(), "0:4,::2,7");
    }

    #[test]
    fn python_slice_semantics() {
        assert_eq!(slice_indices(5, None, None, None), vec![0, 1, 2, 3, 4]);
        assert_eq!(slice_indices(5, Some(-3), None, None), vec![2, 3, 4]);
        assert_eq!(slice_indices(5, None, Some(-1), None), vec![0, 1, 2, 3]);
        assert_eq!(slice_indices(5, Some(4), Some(0), Some(-2)), vec![4, 2]);
        assert_eq!(slice_indices(5, Some(10), None, None), Vec::<usize>::new());
        assert_eq!(slice_indices(0, None, None, Some(-1)), Vec::<usize>::new());
    }

    #[test]
    fn scatter_partition_gives_extras_first() {
        assert_eq!(partition(16, 4), vec![0..4, 4..8, 8..12, 12..16]);
        assert_eq!(partition(101, 4), vec![0..26, 26..51, 51..76, 76..101]);
        assert_eq!(partition(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(partition(0, 3), vec![0..0, 0..0, 0..0]);
        assert!(partition(5, 0).is_empty());
        for (n, k) in [(7, 3), (100, 7), (3, 8)] {
            let parts = partition(n, k);
            assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), n);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start && w[0].len() >= w[1].len()));
        }
    }

    #[test]
    fn map_chunking() {
        assert_eq!(chunk_ranges(10, 3), vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(chunk_ranges(10, 3).len(), 4);
        assert_eq!(chunk_ranges(4, 1), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(chunk_ranges(4, 0), vec![0..1, 1..2, 2..3, 3..4], "chunksize 0 is treated as 1");
        assert_eq!(chunk_ranges(3, 10), vec![0..3]);
        assert!(chunk_ranges(0, 5).is_empty());
    }
}
