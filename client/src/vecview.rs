//! Pulled vectors read where they lie: [`VecView`], what [`crate::DirectView::pull_view`]
//! returns.

use std::marker::PhantomData;
use std::mem::size_of;

use bytes::Bytes;
use rpx_runtime::PlainElem;

/// A pulled vector of `f64`, `f32`, `u8` or `i8`, read-only, used as a slice (`&view[..]`,
/// `view.iter()`, `view.len()`).
///
/// From an engine on this host it is the engine's snapshot of the value mapped into this
/// process, not copied: pulling 100 MB costs mapping its pages (about 7 ms here) and no memory
/// beyond the engine's own copy. The mapping is private and keeps the pulled value as it was
/// whatever the engine does with the name afterwards; it is freed when the view is dropped.
/// Vectors under 64 KiB (whose elements do not lie aligned) and values from other hosts are
/// copied into a vector of their own, as are values that came through the controller unless
/// their elements lie aligned in the received message ([`VecView::is_zero_copy`] says which).
pub struct VecView<E: PlainElem> {
    inner: Inner<E>,
}

enum Inner<E> {
    /// The elements at `start..start + len * size_of::<E>()` of an encoding, aligned for `E`.
    Mapped { bytes: Bytes, start: usize, len: usize, elem: PhantomData<E> },
    /// The elements copied out (the encoding's elements were not aligned for `E`).
    Owned(Vec<E>),
}

impl<E: PlainElem> VecView<E> {
    /// The vector encoded in `bytes` (`rpx_runtime::encode`'s bytes of a `Vec<E>`), used in
    /// place when its elements lie aligned for `E`, else copied. `Err` if `bytes` are not
    /// exactly such a vector.
    pub(crate) fn from_encoded(bytes: Bytes) -> Result<VecView<E>, String> {
        let not = || format!("{} bytes are not a vector of {}", bytes.len(), std::any::type_name::<E>());
        // The length prefix as written (postcard's shortest, or the 8-byte one of large vectors).
        let (n, elements) = rpx_runtime::postcard::take_from_bytes::<u64>(&bytes).map_err(|_| not())?;
        let n = usize::try_from(n).map_err(|_| not())?;
        if n.checked_mul(size_of::<E>()) != Some(elements.len()) {
            return Err(not());
        }
        let start = bytes.len() - elements.len();
        let inner = if bytes.as_ptr().wrapping_add(start).cast::<E>().is_aligned() {
            Inner::Mapped { bytes, start, len: n, elem: PhantomData }
        } else {
            Inner::Owned(rpx_runtime::decode_owned::<Vec<E>>(&bytes)?)
        };
        Ok(VecView { inner })
    }

    /// Whether the elements are read where they arrived (the engine's snapshot on this host,
    /// mapped, or the received message), not copied into a vector of the view's own.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// The elements in a `Vec` of their own (a copy, unless they already were one).
    pub fn into_vec(self) -> Vec<E> {
        match self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { .. } => self.to_vec(),
        }
    }
}

impl<E: PlainElem> std::ops::Deref for VecView<E> {
    type Target = [E];

    fn deref(&self) -> &[E] {
        match &self.inner {
            Inner::Owned(v) => v,
            // SAFETY: `from_encoded` checked that `start..start + len * size_of::<E>()` lies in
            // `bytes` and that `start` is aligned for `E`; any bytes are a valid plain element;
            // `Bytes` never changes or moves what it holds while it lives (a private mapping of a
            // snapshot nobody writes, or memory of its own).
            Inner::Mapped { bytes, start, len, .. } => unsafe { std::slice::from_raw_parts(bytes.as_ptr().add(*start).cast::<E>(), *len) },
        }
    }
}

impl<E: PlainElem> AsRef<[E]> for VecView<E> {
    fn as_ref(&self) -> &[E] {
        self
    }
}

impl<E: PlainElem> std::fmt::Debug for VecView<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<E: PlainElem + PartialEq> PartialEq<[E]> for VecView<E> {
    fn eq(&self, other: &[E]) -> bool {
        **self == *other
    }
}

impl<E: PlainElem + PartialEq> PartialEq<Vec<E>> for VecView<E> {
    fn eq(&self, other: &Vec<E>) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::VecView;
    use bytes::Bytes;

    /// An encoding whose elements lie aligned is used in place; one shifted by a byte is copied;
    /// both read as the vector; bytes that are not a vector of the type are refused.
    #[test]
    fn aligned_elements_are_used_in_place_and_others_copied() {
        let v: Vec<f64> = (0..20_000).map(|i| i as f64 * 0.25).collect();
        let enc = rpx_runtime::encode(&v);
        // In memory that starts aligned for f64, as a mapping does; and one byte further on.
        for shift in [0usize, 1] {
            let mut words: Vec<u64> = vec![0; (enc.len() + shift).div_ceil(8)];
            // SAFETY: u64 has no padding; the slice covers the vector's initialised memory.
            let raw = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
            raw[shift..shift + enc.len()].copy_from_slice(&enc);
            let bytes = Bytes::from_owner(AlignedBuf(words)).slice(shift..shift + enc.len());
            let view = VecView::<f64>::from_encoded(bytes).unwrap();
            assert_eq!(view.is_zero_copy(), shift == 0, "shifted by {shift}");
            assert_eq!(view, v);
            assert_eq!(view.into_vec(), v);
        }
        // The same vector with postcard's shortest prefix (as written before large vectors got
        // an 8-byte one) reads the same.
        let shortest = rpx_runtime::postcard::to_stdvec(&v).unwrap();
        assert!(shortest.len() < enc.len());
        assert_eq!(VecView::<f64>::from_encoded(Bytes::from(shortest)).unwrap(), v);
        // Small vectors (a short prefix) read the same way.
        let small = rpx_runtime::encode(&vec![1u8, 2, 3]);
        assert_eq!(VecView::<u8>::from_encoded(Bytes::from(small)).unwrap(), vec![1u8, 2, 3]);
        // Not a vector of f32 (7 bytes of elements), and a prefix that says another length.
        assert!(VecView::<f32>::from_encoded(Bytes::from(vec![7u8, 1, 2, 3, 4, 5, 6, 7])).is_err());
        let mut wrong = rpx_runtime::encode(&vec![1.0f64, 2.0]);
        wrong[0] = 3;
        assert!(VecView::<f64>::from_encoded(Bytes::from(wrong)).is_err());
    }

    /// Memory aligned for 8-byte elements, as bytes.
    struct AlignedBuf(Vec<u64>);

    impl AsRef<[u8]> for AlignedBuf {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: u64 has no padding; the slice covers the vector's initialised memory.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
        }
    }
}
