//! Which engines a view addresses, and how work is split among them: the [`Targets`] trait
//! (`..`, ranges, ids, lists, strings in the one target grammar of `rpx_protocol::targets`,
//! re-exported here as [`TargetSpec`]), and the [`partition`] / [`chunk_ranges`] splits used by
//! `scatter`, direct `map` and load-balanced `map`.

use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo};

pub use rpx_protocol::targets::{Selector, Slice, TargetError, TargetSpec};

/// Positions selected by a Python slice over a sequence of `len` items (Python's
/// `slice.indices` semantics, negative values counting from the end; a zero step selects
/// nothing).
pub fn slice_indices(len: usize, start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> Vec<usize> {
    Slice { start, stop, step }.indices(len)
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
    fn to_spec(&self) -> Result<TargetSpec, TargetError>;
}

impl Targets for TargetSpec {
    fn to_spec(&self) -> Result<TargetSpec, TargetError> {
        Ok(self.clone())
    }
}

impl Targets for RangeFull {
    fn to_spec(&self) -> Result<TargetSpec, TargetError> {
        Ok(TargetSpec::All)
    }
}

fn range_spec(start: Option<i64>, stop: Option<i64>) -> Result<TargetSpec, TargetError> {
    Ok(TargetSpec::Select(vec![Selector::Slice(Slice { start, stop, step: None })]))
}

// Integer literals default to `i32`, so `direct_view(2)`, `direct_view(0..4)` and
// `direct_view([1, 3])` work without suffixes; negative values count from the end.
macro_rules! int_targets {
    ($($t:ty),*) => {$(
        impl Targets for Range<$t> {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                range_spec(Some(self.start as i64), Some(self.end as i64))
            }
        }

        impl Targets for RangeInclusive<$t> {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                let end = *self.end() as i64;
                // `..=-1` is "through the last": no stop.
                range_spec(Some(*self.start() as i64), if end == -1 { None } else { Some(end + 1) })
            }
        }

        impl Targets for RangeFrom<$t> {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                range_spec(Some(self.start as i64), None)
            }
        }

        impl Targets for RangeTo<$t> {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                range_spec(None, Some(self.end as i64))
            }
        }

        impl Targets for $t {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                Ok(TargetSpec::Select(vec![Selector::Id(*self as i64)]))
            }
        }

        impl Targets for [$t] {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                if self.is_empty() {
                    return Err(TargetError::Invalid { spec: "[]".into(), reason: "an empty list of engines selects nothing".into() });
                }
                Ok(TargetSpec::Select(self.iter().map(|i| Selector::Id(*i as i64)).collect()))
            }
        }

        impl Targets for Vec<$t> {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                self.as_slice().to_spec()
            }
        }

        impl<const N: usize> Targets for [$t; N] {
            fn to_spec(&self) -> Result<TargetSpec, TargetError> {
                self.as_slice().to_spec()
            }
        }
    )*};
}

int_targets!(usize, u32, u64, i32, i64);

impl Targets for str {
    fn to_spec(&self) -> Result<TargetSpec, TargetError> {
        TargetSpec::parse(self)
    }
}

impl Targets for String {
    fn to_spec(&self) -> Result<TargetSpec, TargetError> {
        TargetSpec::parse(self)
    }
}

impl<T: Targets + ?Sized> Targets for &T {
    fn to_spec(&self) -> Result<TargetSpec, TargetError> {
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

    // The grammar itself is tested in rpx_protocol::targets; these are the Rust values.

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
