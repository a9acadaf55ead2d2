//! The small crate that rpx closures and cells link against on engines, and that the client
//! shares so both ends agree on encodings.
//!
//! # Layout
//! - [`encode`] / [`decode`]: the one value encoding of rpx (postcard over serde);
//!   [`encode_chunked`] hands the same bytes out in pieces.
//! - [`get`] / [`put`]: the engine namespace of pushed and pulled values, one file per
//!   name in the directory `RPX_NS_DIR` that the engine gives its worker.
//! - Plain vectors (`f64`, `f32`, `u8`, `i8`): encoded from and decoded into their memory in one
//!   copy ([`is_plain`], [`plain_zeroed`], [`copy_on_every_core`], [`Mapped`] files), in huge
//!   pages when large ([`advise_huge_pages`]).
//! - [`abi`]: the C ABI of a compiled closure (`serve0` .. `serve4`), which decodes arguments,
//!   calls the closure, catches panics and encodes results.
//!
//! ```
//! let bytes = rpx_runtime::encode(&vec![1u64, 2, 3]);
//! let back: Vec<u64> = rpx_runtime::decode(&bytes).unwrap();
//! assert_eq!(back, vec![1, 2, 3]);
//! ```

use std::path::PathBuf;

pub use postcard;
pub use serde;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Environment variable naming the engine's namespace directory.
pub const NS_DIR_ENV: &str = "RPX_NS_DIR";

/// Encode a value the way every rpx transfer does. A `Vec` or slice of `f64`, `f32`, `u8` or `i8`
/// is its length prefix and one copy of its elements' memory, on every core.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    if let Some(elements) = plain_elements(value) {
        let prefix = elements.prefix();
        let mut buf = vec![0u8; prefix.len() + elements.bytes.len()];
        advise_huge_pages(&mut buf);
        buf[..prefix.len()].copy_from_slice(prefix.bytes());
        copy_on_every_core(&mut buf[prefix.len()..], elements.bytes);
        return buf;
    }
    // Sized first, then written once into a buffer of exactly that size (no regrowth copies:
    // a 100 MB value would otherwise be copied about twice more while the buffer doubles).
    let size = postcard::serialize_with_flavor::<T, _, usize>(value, postcard::ser_flavors::Size::default())
        .expect("postcard sizing cannot fail for serde types");
    let mut buf = vec![0u8; size];
    advise_huge_pages(&mut buf);
    let used = postcard::to_slice(value, &mut buf).expect("postcard encoding into a buffer of its exact size cannot fail").len();
    debug_assert_eq!(used, size);
    buf.truncate(used);
    buf
}

/// [`encode`] in pieces of `chunk` bytes (the last one shorter) handed to `sink` as the value is
/// walked: the same bytes, never held whole (how a same-host push writes a value straight into
/// its transfer file). The elements of a `Vec` or slice of `f64`, `f32`, `u8` or `i8` are handed
/// out from the value's own memory, not copied. The first error of `sink` stops the encoding
/// and is returned.
pub fn encode_chunked<T, F>(value: &T, chunk: usize, sink: F) -> std::io::Result<()>
where
    T: Serialize + ?Sized,
    F: FnMut(&[u8]) -> std::io::Result<()>,
{
    if let Some(elements) = plain_elements(value) {
        return elements.in_pieces(chunk.max(1), sink);
    }
    let mut failed = None;
    // The buffer grows to `chunk` as needed: a small value costs no large allocation.
    let flavor = Chunks { buf: Vec::new(), chunk: chunk.max(1), sink, failed: &mut failed };
    match postcard::serialize_with_flavor::<T, _, ()>(value, flavor) {
        Ok(()) => Ok(()),
        Err(e) => Err(failed.unwrap_or_else(|| std::io::Error::other(format!("cannot encode the value: {e}")))),
    }
}

/// The elements of a plain vector or slice, as [`encode`] lays them out after the length prefix.
struct PlainElements<'a> {
    count: u64,
    bytes: &'a [u8],
}

impl PlainElements<'_> {
    /// The length prefix written before these elements.
    fn prefix(&self) -> LengthPrefix {
        LengthPrefix::of(self.count, self.bytes.len())
    }

    /// The encoding (length prefix, then the elements) in pieces of `chunk` bytes, the last
    /// shorter, as [`encode_chunked`]'s generic path cuts them: the first piece is assembled
    /// (prefix and the first elements), every later one is a slice of the value's memory.
    fn in_pieces(&self, chunk: usize, mut sink: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut first = self.prefix().bytes().to_vec();
        // Enough elements to end the pieces holding the prefix on a piece boundary.
        let head = ((chunk - first.len() % chunk) % chunk).min(self.bytes.len());
        first.extend_from_slice(&self.bytes[..head]);
        for piece in first.chunks(chunk) {
            sink(piece)?;
        }
        self.bytes[head..].chunks(chunk).try_for_each(sink)
    }
}

/// The size of [`encode`]'s bytes for a vector or slice of `f64`, `f32`, `u8` or `i8`, known
/// without encoding it (a same-host push picks the file it writes over by it); `None` for other
/// types.
pub fn plain_encoded_len<T: ?Sized>(value: &T) -> Option<usize> {
    let elements = plain_elements(value)?;
    Some(elements.prefix().len() + elements.bytes.len())
}

/// Write [`encode`]'s bytes of a vector or slice of `f64`, `f32`, `u8` or `i8` into `dst`, which
/// must be exactly [`plain_encoded_len`] bytes (a mapping of the file it goes to): the length
/// prefix, then the elements copied on every core. `false`, with nothing written, for any other
/// type or length.
pub fn encode_plain_into<T: ?Sized>(value: &T, dst: &mut [u8]) -> bool {
    let Some(elements) = plain_elements(value) else { return false };
    let prefix = elements.prefix();
    if dst.len() != prefix.len() + elements.bytes.len() {
        return false;
    }
    let (head, body) = dst.split_at_mut(prefix.len());
    head.copy_from_slice(prefix.bytes());
    copy_on_every_core(body, elements.bytes);
    true
}

/// Plain vectors with at least this many bytes of elements get an 8-byte length prefix (an
/// overlong varint, which postcard reads like any other), so their elements start 8 bytes into
/// the encoding: in a file mapped at a page boundary they lie aligned for every plain type, and a
/// pulled vector can be read where it lies instead of copied. Smaller ones keep postcard's
/// shortest prefix.
pub const ALIGNED_FROM: usize = 64 * 1024;

/// Where the elements of a vector of [`ALIGNED_FROM`] bytes or more start in its encoding.
pub const ALIGNED_PREFIX: usize = 8;

/// The length prefix written before a plain vector of `count` elements taking `body` bytes: a
/// varint of 1 to 10 bytes (postcard's), or of [`ALIGNED_PREFIX`] bytes from [`ALIGNED_FROM`]
/// bytes of elements. The one place a plain vector's prefix is made or measured.
struct LengthPrefix {
    buf: [u8; 10],
    len: usize,
}

impl LengthPrefix {
    fn of(count: u64, body: usize) -> LengthPrefix {
        let mut buf = [0u8; 10];
        if body >= ALIGNED_FROM && count < 1 << (7 * ALIGNED_PREFIX) {
            // Seven bits a byte, low bits first, every byte but the last marked "more follows".
            for (i, b) in buf[..ALIGNED_PREFIX].iter_mut().enumerate() {
                let more = if i + 1 < ALIGNED_PREFIX { 0x80 } else { 0 };
                *b = ((count >> (7 * i)) & 0x7f) as u8 | more;
            }
            return LengthPrefix { buf, len: ALIGNED_PREFIX };
        }
        let len = postcard::to_slice(&count, &mut buf).expect("a u64 varint fits in 10 bytes").len();
        LengthPrefix { buf, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The element types whose vectors (and slices) are plain: `f64`, `f32`, `u8` and `i8`. No
/// padding, every bit pattern a value, and postcard writes each as its little-endian bytes,
/// which on a little-endian machine are its bytes in memory. Sealed: implemented for exactly
/// the types `with_plain` recognises (`plain_elem_types!` lists them for both traits).
pub trait PlainElem: sealed::Sealed + Copy + Default + Send + Sync + std::fmt::Debug + Serialize + DeserializeOwned + 'static {}

/// `PlainElem` (and its seal) for each plain element type, listed once.
macro_rules! plain_elem_types {
    ($($t:ty),*) => {
        $(impl PlainElem for $t {} impl sealed::Sealed for $t {})*
    };
}
plain_elem_types!(f64, f32, u8, i8);

mod sealed {
    /// Keeps [`super::PlainElem`] to the types `plain_elem_types!` lists.
    pub trait Sealed {}
}

/// Work done knowing the element type `E` of a plain vector or slice `T` ([`with_plain`] calls
/// [`OnPlain::on`] only when `T` is `Vec<E>`, or `[E]` if slices are asked for).
trait OnPlain {
    type Out;
    fn on<E: PlainElem>(self) -> Self::Out;
}

/// `work.on::<E>()` if `T` is `Vec<E>` (or, with `slices`, `[E]`) for a plain element type `E`
/// (`f64`, `f32`, `u8`, `i8`) on a little-endian machine; `None` for every other type. `T` need
/// not be `'static` (`typeid` compares types with their lifetimes erased; the types matched have
/// none).
fn with_plain<T: ?Sized, W: OnPlain>(slices: bool, work: W) -> Option<W::Out> {
    fn is<T: ?Sized, E: 'static>(slices: bool) -> bool {
        let t = typeid::of::<T>();
        t == std::any::TypeId::of::<Vec<E>>() || (slices && t == std::any::TypeId::of::<[E]>())
    }
    if !cfg!(target_endian = "little") {
        None
    } else if is::<T, f64>(slices) {
        Some(work.on::<f64>())
    } else if is::<T, f32>(slices) {
        Some(work.on::<f32>())
    } else if is::<T, u8>(slices) {
        Some(work.on::<u8>())
    } else if is::<T, i8>(slices) {
        Some(work.on::<i8>())
    } else {
        None
    }
}

/// The size of one element (what [`with_plain`] learns first of every plain type).
struct ElemSize;

impl OnPlain for ElemSize {
    type Out = usize;
    fn on<E: PlainElem>(self) -> usize {
        std::mem::size_of::<E>()
    }
}

/// A `Vec<E>` as the `T` it is.
///
/// # Safety
/// `T` must be `Vec<E>`.
unsafe fn vec_as<E, T>(v: Vec<E>) -> T {
    let v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `T` is `Vec<E>` (the caller's promise): the vector is moved into a `T`, and
    // `ManuallyDrop` keeps it from being dropped twice.
    unsafe { std::mem::transmute_copy::<Vec<E>, T>(&v) }
}

/// The bytes of a slice of plain elements.
fn elem_bytes<E: PlainElem>(v: &[E]) -> &[u8] {
    // SAFETY: a plain element has no padding: every byte of the slice is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The bytes of a slice of plain elements, to fill in place.
fn elem_bytes_mut<E: PlainElem>(v: &mut [E]) -> &mut [u8] {
    // SAFETY: a plain element has no padding and any bytes written are a valid value.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The elements of `value` if it is a vector or slice of `f64`, `f32`, `u8` or `i8` (`Vec<E>` or
/// `[E]`) on a little-endian machine, whose postcard encoding is a varint length and then the
/// elements' bytes as they lie in memory; `None` for any other type.
fn plain_elements<T: ?Sized>(value: &T) -> Option<PlainElements<'_>> {
    struct Elements<'a, T: ?Sized>(&'a T);
    impl<'a, T: ?Sized> OnPlain for Elements<'a, T> {
        type Out = PlainElements<'a>;
        fn on<E: PlainElem>(self) -> PlainElements<'a> {
            let v: &[E] = if typeid::of::<T>() == std::any::TypeId::of::<Vec<E>>() {
                // SAFETY: `T` is `Vec<E>` (same type id, and `Vec<E>` has no lifetime to differ in).
                unsafe { &*(self.0 as *const T).cast::<Vec<E>>() }.as_slice()
            } else {
                // SAFETY: `T` is `[E]` (`with_plain`'s promise): its size is the elements' and the
                // pointer is to the first.
                unsafe {
                    std::slice::from_raw_parts((self.0 as *const T).cast::<E>(), std::mem::size_of_val(self.0) / std::mem::size_of::<E>())
                }
            };
            PlainElements { count: v.len() as u64, bytes: elem_bytes(v) }
        }
    }
    with_plain::<T, _>(true, Elements(value))
}

/// The postcard flavor of [`encode_chunked`]: a buffer of up to `chunk` bytes, emptied into
/// `sink` when full (the common small writes stay inlined copies).
struct Chunks<'a, F> {
    buf: Vec<u8>,
    chunk: usize,
    sink: F,
    failed: &'a mut Option<std::io::Error>,
}

impl<F: FnMut(&[u8]) -> std::io::Result<()>> Chunks<'_, F> {
    /// Fill the buffer with `data`, handing it to the sink each time it is full.
    #[cold]
    fn spill(&mut self, mut data: &[u8]) -> postcard::Result<()> {
        loop {
            let take = data.len().min(self.chunk - self.buf.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if data.is_empty() && self.buf.len() < self.chunk {
                return Ok(());
            }
            self.hand_out()?;
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    fn hand_out(&mut self) -> postcard::Result<()> {
        let given = (self.sink)(&self.buf);
        self.buf.clear();
        given.map_err(|e| {
            *self.failed = Some(e);
            postcard::Error::SerializeBufferFull
        })
    }
}

impl<F: FnMut(&[u8]) -> std::io::Result<()>> postcard::ser_flavors::Flavor for Chunks<'_, F> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() <= self.chunk - self.buf.len() {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.spill(data)
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(mut self) -> postcard::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.hand_out()
    }
}

/// Decode a value encoded by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("cannot decode the value as {}: {e}", std::any::type_name::<T>()))
}

/// [`decode`] for owned values, with vectors of `f64`, `f32`, `u8` and `i8` read by copying
/// their bytes (postcard lays such a vector out as a varint length and then each element's
/// little-endian bytes, its layout in memory on a little-endian machine): the value is the one
/// [`decode`] gives; a 100 MB `Vec<f64>` decodes in one copy instead of element by element.
/// Anything else, or bytes that are not exactly such a vector, goes through [`decode`].
pub fn decode_owned<T: DeserializeOwned + 'static>(bytes: &[u8]) -> Result<T, String> {
    match plain_vec_from(bytes, copy_on_every_core) {
        Some(v) => Ok(v),
        None => decode(bytes),
    }
}

/// Map in the pages under `bytes` ahead of reading them: one call for the range instead of a
/// fault every few pages. A hint: where it fails (kernels before 5.14) the reads fault as usual.
fn populate_read(bytes: &[u8]) {
    const PAGE: usize = 4096;
    let at = bytes.as_ptr() as usize;
    let start = at & !(PAGE - 1);
    // SAFETY: the range is the pages under `bytes`, mapped while it is borrowed; populating
    // only maps pages in and changes no byte.
    unsafe { libc::madvise(start as *mut libc::c_void, bytes.len() + (at - start), libc::MADV_POPULATE_READ) };
}

/// From this many bytes on, [`copy_on_every_core`] splits its copy between threads.
const PARALLEL_COPY_FROM: usize = 16 << 20;

/// `dst.copy_from_slice(src)` (same lengths), for a large copy by up to 4 threads taking 4 MiB
/// parts in turn: a filled vector is new memory whose pages the kernel supplies as the copy
/// first touches them, and split, that work is done on every core at once. A thread that
/// cannot be started leaves its parts to the others.
pub fn copy_on_every_core(dst: &mut [u8], src: &[u8]) {
    copy_parts(dst, src, false);
}

/// [`copy_on_every_core`] from a file mapping whose pages are not mapped in yet
/// ([`Mapped::unpopulated`]): each thread maps in its part's pages in one call
/// (`MADV_POPULATE_READ`) before copying it, so setting up the mapping's page tables is done on
/// every core too, instead of on one before the copy (`MAP_POPULATE`). A 100 MB same-host pull,
/// builds run by turns: 3.10 -> 3.71 GB/s (medians of 7 runs, faster in each of the 7 pairs;
/// `bench/results/ab-populate-20261206.md`); a gather, whose parts are mapped at once already,
/// did not change.
pub fn copy_from_mapping_on_every_core(dst: &mut [u8], src: &[u8]) {
    copy_parts(dst, src, true);
}

fn copy_parts(dst: &mut [u8], src: &[u8], populate: bool) {
    const PART: usize = 4 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if dst.len() < PARALLEL_COPY_FROM || threads < 2 {
        dst.copy_from_slice(src);
        return;
    }
    let parts = std::sync::Mutex::new(dst.chunks_mut(PART).zip(src.chunks(PART)));
    let work = || loop {
        let next = parts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
        let Some((d, from)) = next else { break };
        if populate {
            populate_read(from);
        }
        d.copy_from_slice(from);
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            let _ = std::thread::Builder::new().spawn_scoped(s, work);
        }
        work();
    });
}

/// Whether [`decode_owned`] and the `plain_*` functions take `T` by copying its bytes (a vector of
/// `f64`, `f32`, `u8` or `i8` on a little-endian machine).
pub fn is_plain<T: 'static>() -> bool {
    is_plain_vec::<T>()
}

/// [`is_plain`] for any `T`, `'static` or not.
fn is_plain_vec<T: ?Sized>() -> bool {
    with_plain::<T, _>(false, ElemSize).is_some()
}

/// For a plain vector type `T` ([`is_plain`]): how many elements an encoding of `size` bytes
/// holds (a varint length `n`, then `n` elements), or `None` for another type or a size no such
/// vector has. Lets a gather size its whole result before any part is read.
pub fn plain_count<T: 'static>(size: usize) -> Option<usize> {
    count_in(size, plain_elem_size::<T>()?)
}

/// How many elements of `elem` bytes an encoding of `size` bytes holds, if it can be one.
fn count_in(size: usize, elem: usize) -> Option<usize> {
    (1..=10).find_map(|prefix| {
        let body = size.checked_sub(prefix)?;
        let n = (body % elem == 0).then_some(body / elem)?;
        (LengthPrefix::of(n as u64, body).len() == prefix).then_some(n)
    })
}

/// The size in bytes of one element of a plain vector type `T` ([`is_plain`]).
pub fn plain_elem_size<T: 'static>() -> Option<usize> {
    with_plain::<T, _>(false, ElemSize)
}

/// A plain vector `T` ([`is_plain`]) of `n` zeroed elements (fresh pages, untouched until they
/// are filled, in huge pages where the kernel has them: [`advise_huge_pages`]), to be filled in
/// place through [`plain_bytes_mut`]; `None` for another type.
pub fn plain_zeroed<T: 'static>(n: usize) -> Option<T> {
    with_plain::<T, _>(false, Zeroed::<T>(n, std::marker::PhantomData))
}

/// A plain vector `T` of `n` zeroed elements ([`plain_zeroed`]).
struct Zeroed<T>(usize, std::marker::PhantomData<T>);

impl<T> OnPlain for Zeroed<T> {
    type Out = T;
    fn on<E: PlainElem>(self) -> T {
        // Zeroed memory straight from the allocator (fresh pages for a large vector).
        let mut v = vec![E::default(); self.0];
        advise_huge_pages(elem_bytes_mut(&mut v));
        // SAFETY: `with_plain` calls `on` only when `T` is `Vec<E>`.
        unsafe { vec_as::<E, T>(v) }
    }
}

/// From this size on, [`advise_huge_pages`] asks for huge pages.
const HUGE_PAGES_FROM: usize = 8 << 20;

/// Ask the kernel to supply the untouched memory of a large new buffer in transparent huge
/// pages (`MADV_HUGEPAGE`, for kernels whose THP mode is `madvise`, the usual default): filling
/// it then takes a fault per 2 MiB instead of per 4 KiB, 5x faster for 100 MB on the VM
/// the benchmarks run on (`dp_micro`'s reference steps). Only whole pages inside the buffer are
/// advised; the advice is a hint, and where huge pages are off or short it changes nothing.
pub fn advise_huge_pages(buf: &mut [u8]) {
    if buf.len() < HUGE_PAGES_FROM {
        return;
    }
    const PAGE: usize = 4096;
    let start = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE);
    let end = (buf.as_mut_ptr() as usize + buf.len()) & !(PAGE - 1);
    if end > start {
        // SAFETY: advice on whole pages inside `buf`, memory this process owns; MADV_HUGEPAGE
        // never changes the contents, and a failure (THP not built in) is ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// The bytes of a plain vector's elements ([`is_plain`]), to fill in place; `None` for another type.
pub fn plain_bytes_mut<T: 'static>(v: &mut T) -> Option<&mut [u8]> {
    struct BytesMut<'a, T>(&'a mut T);
    impl<'a, T> OnPlain for BytesMut<'a, T> {
        type Out = &'a mut [u8];
        fn on<E: PlainElem>(self) -> &'a mut [u8] {
            // SAFETY: `with_plain` calls `on` only when `T` is `Vec<E>`.
            elem_bytes_mut(unsafe { &mut *(self.0 as *mut T).cast::<Vec<E>>() })
        }
    }
    with_plain::<T, _>(false, BytesMut(v))
}

/// The length of the length prefix of a plain vector's encoding of `size` bytes whose elements
/// take `body` bytes (1 to 10 bytes), or why there is none.
fn plain_prefix_len(size: usize, body: usize) -> Result<usize, String> {
    size.checked_sub(body)
        .filter(|p| (1..=10).contains(p))
        .ok_or_else(|| format!("{size} bytes cannot hold a vector of {body} bytes of elements"))
}

/// Whether `prefix` is exactly the length prefix of a plain vector of `n` elements (the value
/// of `size` bytes it starts); the error says why not.
fn check_plain_prefix(prefix: &[u8], n: usize, size: usize) -> Result<(), String> {
    match postcard::take_from_bytes::<u64>(prefix) {
        Ok((len, [])) if len == n as u64 => Ok(()),
        _ => Err(format!("the value is not a vector of {n} elements in {size} bytes")),
    }
}

/// Read the length prefix of a plain vector's encoding of `size` bytes whose `n` elements take
/// `body` bytes, and pass it to `seen`: the inner `Err` if it does not say exactly that. `r` is
/// then at the elements' bytes.
pub fn read_plain_prefix(
    r: &mut impl std::io::Read,
    size: usize,
    n: usize,
    body: usize,
    seen: &mut impl FnMut(&[u8]),
) -> std::io::Result<Result<(), String>> {
    let prefix_len = match plain_prefix_len(size, body) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let mut prefix = [0u8; 10];
    r.read_exact(&mut prefix[..prefix_len])?;
    seen(&prefix[..prefix_len]);
    Ok(check_plain_prefix(&prefix[..prefix_len], n, size))
}

/// Read one plain vector's encoding of `size` bytes from `r` into `dst`, the bytes of `n`
/// elements (a part of a larger vector made by [`plain_zeroed`]): the inner `Err` if its length
/// prefix does not say `n` elements in exactly `size` bytes. `seen` gets every byte read, in
/// order; the caller must not use `dst` before it has checked them.
pub fn read_plain_into(
    r: &mut impl std::io::Read,
    size: usize,
    n: usize,
    dst: &mut [u8],
    mut seen: impl FnMut(&[u8]),
) -> std::io::Result<Result<(), String>> {
    if let Err(e) = read_plain_prefix(r, size, n, dst.len(), &mut seen)? {
        return Ok(Err(e));
    }
    for piece in dst.chunks_mut(1 << 20) {
        r.read_exact(piece)?;
        seen(piece);
    }
    Ok(Ok(()))
}

/// A private read-only mapping of a whole file.
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for Mapped {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Map `len` (> 0) bytes of `f`, its pages mapped up front (`MAP_POPULATE`).
    pub fn of(f: &std::fs::File, len: usize) -> std::io::Result<Mapped> {
        Mapped::map(f, len, libc::MAP_POPULATE)
    }

    /// Map `len` (> 0) bytes of `f`, its pages mapped in as they are read: for a reader that
    /// maps them in itself, such as [`copy_from_mapping_on_every_core`].
    pub fn unpopulated(f: &std::fs::File, len: usize) -> std::io::Result<Mapped> {
        Mapped::map(f, len, 0)
    }

    fn map(f: &std::fs::File, len: usize, flags: libc::c_int) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh mapping of `len` (> 0) bytes of an open file, checked for failure.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE | flags, f.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    /// Unmap now, in pieces, calling `before_piece` before each one: a caller unmapping in the
    /// background waits there while others need the process's mapping lock.
    pub fn unmap_pausing(mut self, mut before_piece: impl FnMut()) {
        self.unmap(&mut before_piece);
    }

    fn unmap(&mut self, before_piece: &mut dyn FnMut()) {
        let mut at = 0;
        while at < self.len {
            before_piece();
            let piece = UNMAP_PIECE.min(self.len - at);
            // SAFETY: unmapping what `of` mapped, once, piece by piece (`at` is a multiple of
            // the piece size, itself a multiple of the page size); `len` is then 0, so drop
            // unmaps nothing again.
            unsafe { libc::munmap((self.ptr as *mut u8).add(at) as *mut libc::c_void, piece) };
            at += piece;
        }
        self.len = 0;
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// [`Mapped`] unmaps in pieces of this many bytes: each `munmap` holds the process's mapping
/// lock while it tears its pages down (about 3.5 ms per 100 MB at once), and between pieces
/// other threads' mappings and page faults go on.
const UNMAP_PIECE: usize = 8 << 20;

impl Drop for Mapped {
    fn drop(&mut self) {
        self.unmap(&mut || ());
    }
}

fn ns_path(name: &str) -> PathBuf {
    match std::env::var_os(NS_DIR_ENV) {
        Some(dir) => PathBuf::from(dir).join(name),
        None => panic!("rpx::get/put read the engine namespace: they work only in code running on an rpx engine"),
    }
}

/// The value pushed to this engine as `name` (for example by `DirectView::push`).
///
/// Panics when nothing was pushed under that name or it does not decode as `T`.
///
/// A vector of `f64`, `f32`, `u8` or `i8` is copied from a mapping of the file straight into its
/// memory (in huge pages when large, on every core, each copying thread mapping in its part of
/// the file); anything else is read whole and decoded.
pub fn get<T: DeserializeOwned>(name: &str) -> T {
    let path = ns_path(name);
    let absent = |e: std::io::Error| -> ! { panic!("no value named `{name}` was pushed to this engine ({e})") };
    let f = std::fs::File::open(&path).unwrap_or_else(|e| absent(e));
    let size = f.metadata().ok().and_then(|m| usize::try_from(m.len()).ok()).unwrap_or(0);
    if size > 0 && is_plain_vec::<T>() {
        // Its pages are mapped in by the threads that copy them, as a same-host pull's are.
        if let Some(v) = Mapped::unpopulated(&f, size).ok().and_then(|m| plain_vec_from::<T>(m.as_ref(), copy_from_mapping_on_every_core)) {
            return v;
        }
    }
    // Not a plain vector, or not one of the file's size: postcard reads it and says what is wrong.
    let bytes = std::fs::read(&path).unwrap_or_else(|e| absent(e));
    decode(&bytes).unwrap_or_else(|e| panic!("pushed value `{name}`: {e}"))
}

/// A plain vector `T` (a `Vec` of `f64`, `f32`, `u8` or `i8`; `T` need not be `'static`)
/// decoded from `bytes` by one copy of its elements with `copy` ([`copy_on_every_core`], or
/// [`copy_from_mapping_on_every_core`] when `bytes` is a mapping not mapped in yet); `None` for
/// other types, or bytes that are not exactly such a vector.
fn plain_vec_from<T>(bytes: &[u8], copy: fn(&mut [u8], &[u8])) -> Option<T> {
    struct FromBytes<'a, T>(&'a [u8], fn(&mut [u8], &[u8]), std::marker::PhantomData<T>);
    impl<T> OnPlain for FromBytes<'_, T> {
        type Out = Option<T>;
        fn on<E: PlainElem>(self) -> Option<T> {
            let (bytes, copy) = (self.0, self.1);
            let n = count_in(bytes.len(), std::mem::size_of::<E>())?;
            let mut v: Vec<E> = Zeroed::<Vec<E>>(n, std::marker::PhantomData).on::<E>();
            let dst = elem_bytes_mut(&mut v);
            let mut elements = bytes;
            read_plain_prefix(&mut elements, bytes.len(), n, dst.len(), &mut |_| ()).ok()?.ok()?;
            if elements.len() != dst.len() {
                return None;
            }
            copy(dst, elements);
            // SAFETY: `with_plain` calls `on` only when `T` is `Vec<E>`.
            Some(unsafe { vec_as::<E, T>(v) })
        }
    }
    with_plain::<T, _>(false, FromBytes(bytes, copy, std::marker::PhantomData)).flatten()
}

/// The pieces [`put`] writes a value in (small enough to stay in cache).
const PUT_CHUNK: usize = 1 << 20;

/// Store `value` as `name` in this engine's namespace, where a pull reads it.
pub fn put<T: Serialize + ?Sized>(name: &str, value: &T) {
    let path = ns_path(name);
    let tmp = path.with_extension("rpx-tmp");
    if let Some(dir) = path.parent() {
        // Only a push creates the namespace directory: a pull of a cell's variable may come first.
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Readable by the engine's user only, as every file of the namespace.
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // Straight into the file in pieces: a large value is never encoded whole in memory.
        encode_chunked(value, PUT_CHUNK, |piece| f.write_all(piece))?;
        drop(f);
        std::fs::rename(&tmp, &path)
    };
    write().unwrap_or_else(|e| panic!("cannot store `{name}`: {e}"));
}

/// The C ABI of compiled closures.
///
/// The compiler wraps a closure `|x: u64| x * x` as
/// `#[no_mangle] extern "C" fn rpx_closure_<hash>(mode, input, len, sink, ctx) -> u32` calling
/// [`abi::serve1`]; the engine's worker calls that symbol. Results and messages leave through
/// `sink`, so no allocation crosses the library boundary.
pub mod abi {
    use std::ffi::c_void;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    /// Receives the output bytes: `sink(ctx, ptr, len)`, called once per call.
    pub type Sink = extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize);
    /// Signature of the exported closure function.
    pub type ClosureFn = unsafe extern "C" fn(mode: u32, input: *const u8, len: usize, sink: Sink, ctx: *mut c_void) -> u32;

    /// Call once with an argument tuple; output is the encoded result.
    pub const MODE_APPLY: u32 = 0;
    /// Call on each item of an encoded `Vec<A>`; output is an encoded `Vec<Result<R, String>>`.
    pub const MODE_MAP: u32 = 1;

    /// The call returned; output is the encoded result.
    pub const STATUS_OK: u32 = 0;
    /// The closure panicked (apply mode); output is the panic message.
    pub const STATUS_PANIC: u32 = 1;
    /// The input did not decode or the mode does not fit the closure; output is the reason.
    pub const STATUS_BAD_INPUT: u32 = 2;

    /// The message of a caught panic.
    pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
        if let Some(s) = p.downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "the closure panicked with a non-string payload".to_string()
        }
    }

    fn emit(sink: Sink, ctx: *mut c_void, bytes: &[u8]) {
        sink(ctx, bytes.as_ptr(), bytes.len());
    }

    fn flush() {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
    }

    unsafe fn input<'a>(input: *const u8, len: usize) -> &'a [u8] {
        if len == 0 {
            &[]
        } else {
            // SAFETY: the caller passes a buffer of `len` bytes that outlives the call.
            unsafe { std::slice::from_raw_parts(input, len) }
        }
    }

    fn apply<Args: DeserializeOwned, R: Serialize>(bytes: &[u8], sink: Sink, ctx: *mut c_void, call: impl FnOnce(Args) -> R) -> u32 {
        let args: Args = match super::decode(bytes) {
            Ok(a) => a,
            Err(e) => {
                emit(sink, ctx, e.as_bytes());
                return STATUS_BAD_INPUT;
            }
        };
        let out = catch_unwind(AssertUnwindSafe(|| call(args)));
        flush();
        match out {
            Ok(r) => {
                emit(sink, ctx, &super::encode(&r));
                STATUS_OK
            }
            Err(p) => {
                emit(sink, ctx, panic_message(&*p).as_bytes());
                STATUS_PANIC
            }
        }
    }

    /// Serve a one-argument closure, in apply or map mode.
    ///
    /// # Safety
    /// `input` must point to `len` readable bytes.
    pub unsafe fn serve1<A: DeserializeOwned, R: Serialize, F: Fn(A) -> R>(
        f: F,
        mode: u32,
        input_ptr: *const u8,
        len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32 {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { input(input_ptr, len) };
        match mode {
            MODE_APPLY => apply(bytes, sink, ctx, |(a,): (A,)| f(a)),
            MODE_MAP => {
                let items: Vec<A> = match super::decode(bytes) {
                    Ok(v) => v,
                    Err(e) => {
                        emit(sink, ctx, e.as_bytes());
                        return STATUS_BAD_INPUT;
                    }
                };
                let results: Vec<Result<R, String>> =
                    items.into_iter().map(|a| catch_unwind(AssertUnwindSafe(|| f(a))).map_err(|p| panic_message(&*p))).collect();
                flush();
                emit(sink, ctx, &super::encode(&results));
                STATUS_OK
            }
            other => {
                emit(sink, ctx, format!("unknown call mode {other}").as_bytes());
                STATUS_BAD_INPUT
            }
        }
    }

    fn apply_only(mode: u32, arity: usize, sink: Sink, ctx: *mut c_void) -> bool {
        if mode == MODE_APPLY {
            return true;
        }
        emit(sink, ctx, format!("a closure of {arity} arguments can only be applied, not mapped").as_bytes());
        false
    }

    /// Serve a closure of no arguments (apply mode, argument `()`).
    ///
    /// # Safety
    /// `input` must point to `len` readable bytes.
    pub unsafe fn serve0<R: Serialize, F: Fn() -> R>(
        f: F,
        mode: u32,
        input_ptr: *const u8,
        len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32 {
        if !apply_only(mode, 0, sink, ctx) {
            return STATUS_BAD_INPUT;
        }
        // SAFETY: forwarded from the caller.
        apply(unsafe { input(input_ptr, len) }, sink, ctx, |(): ()| f())
    }

    /// Serve a closure of two arguments (apply mode).
    ///
    /// # Safety
    /// `input` must point to `len` readable bytes.
    pub unsafe fn serve2<A: DeserializeOwned, B: DeserializeOwned, R: Serialize, F: Fn(A, B) -> R>(
        f: F,
        mode: u32,
        input_ptr: *const u8,
        len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32 {
        if !apply_only(mode, 2, sink, ctx) {
            return STATUS_BAD_INPUT;
        }
        // SAFETY: forwarded from the caller.
        apply(unsafe { input(input_ptr, len) }, sink, ctx, |(a, b): (A, B)| f(a, b))
    }

    /// Serve a closure of three arguments (apply mode).
    ///
    /// # Safety
    /// `input` must point to `len` readable bytes.
    pub unsafe fn serve3<A: DeserializeOwned, B: DeserializeOwned, C: DeserializeOwned, R: Serialize, F: Fn(A, B, C) -> R>(
        f: F,
        mode: u32,
        input_ptr: *const u8,
        len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32 {
        if !apply_only(mode, 3, sink, ctx) {
            return STATUS_BAD_INPUT;
        }
        // SAFETY: forwarded from the caller.
        apply(unsafe { input(input_ptr, len) }, sink, ctx, |(a, b, c): (A, B, C)| f(a, b, c))
    }

    /// Serve a closure of four arguments (apply mode).
    ///
    /// # Safety
    /// `input` must point to `len` readable bytes.
    pub unsafe fn serve4<
        A: DeserializeOwned,
        B: DeserializeOwned,
        C: DeserializeOwned,
        D: DeserializeOwned,
        R: Serialize,
        F: Fn(A, B, C, D) -> R,
    >(
        f: F,
        mode: u32,
        input_ptr: *const u8,
        len: usize,
        sink: Sink,
        ctx: *mut c_void,
    ) -> u32 {
        if !apply_only(mode, 4, sink, ctx) {
            return STATUS_BAD_INPUT;
        }
        // SAFETY: forwarded from the caller.
        apply(unsafe { input(input_ptr, len) }, sink, ctx, |(a, b, c, d): (A, B, C, D)| f(a, b, c, d))
    }
}

#[cfg(test)]
mod tests {
    use super::abi::*;
    use super::{advise_huge_pages, copy_on_every_core, decode_owned, encode, plain_zeroed, HUGE_PAGES_FROM, PARALLEL_COPY_FROM};
    use std::ffi::c_void;

    /// A memory file named `name` holding `bytes` (its name shows in `/proc/self/maps`).
    fn memfd(name: &std::ffi::CStr, bytes: &[u8]) -> std::fs::File {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create reads a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd, owned by the File from here on.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(bytes).unwrap();
        f
    }

    /// A large copy out of a mapping not populated yet, from an offset off a page boundary (a
    /// plain vector's elements after their length prefix), gives the file's bytes, each part
    /// mapped in by the thread that copies it.
    #[test]
    fn a_copy_from_an_unpopulated_mapping_is_the_files_bytes() {
        let len = PARALLEL_COPY_FROM + 3 * (4 << 20) + 4096 + 13;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 239) as u8).collect();
        let f = memfd(c"rpx-populate-test", &bytes);
        let mapped = super::Mapped::unpopulated(&f, len).unwrap();
        let mut dst = vec![0u8; len - 8];
        super::copy_from_mapping_on_every_core(&mut dst, &mapped.as_ref()[8..]);
        assert!(dst[..] == bytes[8..]);
    }

    /// A mapping unmapped in pieces reads the file's bytes until then, announces each piece once
    /// (the last one short), and is gone from the process afterwards (drop unmaps nothing again).
    #[test]
    fn a_mapping_unmapped_in_pieces_is_gone() {
        let len = 2 * super::UNMAP_PIECE + 4096 * 3;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        let f = memfd(c"rpx-unmap-pieces-test", &bytes);
        let mapped = super::Mapped::of(&f, len).unwrap();
        assert!(mapped.as_ref() == &bytes[..]);
        let in_maps = || std::fs::read_to_string("/proc/self/maps").unwrap().contains("rpx-unmap-pieces-test");
        assert!(in_maps());
        let mut pieces = 0;
        mapped.unmap_pausing(|| pieces += 1);
        assert_eq!(pieces, 3);
        assert!(!in_maps(), "the whole mapping is gone");
    }

    #[test]
    fn plain_vectors_decode_to_what_postcard_gives() {
        use super::{decode, decode_owned, encode};
        fn same<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + 'static>(v: T) {
            let bytes = encode(&v);
            assert_eq!(decode_owned::<T>(&bytes).unwrap(), v);
            assert_eq!(decode_owned::<T>(&bytes).unwrap(), decode::<T>(&bytes).unwrap());
        }
        // Lengths around the varint's byte boundaries, and odd bit patterns.
        // The last two are copied in 4 MiB parts on several threads, the last part short.
        let large = super::PARALLEL_COPY_FROM;
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 100_001, large + 1, large + 3 * (4 << 20) + 11] {
            same((0..n).map(|i| i as f64 * -0.37).collect::<Vec<f64>>());
            same((0..n).map(|i| i as f32 + 0.5).collect::<Vec<f32>>());
            same((0..n).map(|i| (i * 31) as u8).collect::<Vec<u8>>());
            same((0..n).map(|i| (i * 31) as i8).collect::<Vec<i8>>());
        }
        let odd = vec![f64::INFINITY, -0.0, f64::MIN_POSITIVE, f64::from_bits(0x7ff8_0000_0000_0001)];
        let back: Vec<f64> = decode_owned(&encode(&odd)).unwrap();
        assert_eq!(back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), odd.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        // Not exactly such a vector: postcard decides (a short value is an error, as it is there).
        let bytes = encode(&vec![1.5f64; 10]);
        assert!(decode_owned::<Vec<f64>>(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode_owned::<Vec<f64>>(&longer).unwrap(), decode::<Vec<f64>>(&longer).unwrap());
        // Other types are postcard's alone.
        same(vec![(1u64, "a".to_string())]);
        same(vec![300u32, 7]);
    }

    #[test]
    fn plain_values_are_what_decode_gives_and_a_stream_read_into_place_is_seen_whole() {
        use super::{decode, decode_owned, encode, is_plain, plain_bytes_mut, plain_count, plain_zeroed, read_plain_into};
        assert!(is_plain::<Vec<f64>>() && is_plain::<Vec<u8>>() && !is_plain::<Vec<u64>>() && !is_plain::<f64>());
        for n in [0usize, 1, 200, 300_000] {
            let v: Vec<f64> = (0..n).map(|i| i as f64 / 3.0).collect();
            let bytes = encode(&v);
            assert_eq!(decode_owned::<Vec<f64>>(&bytes).unwrap(), v);
            let mut got: Vec<f64> = plain_zeroed(plain_count::<Vec<f64>>(bytes.len()).unwrap()).unwrap();
            let mut seen = Vec::new();
            read_plain_into(&mut &bytes[..], bytes.len(), n, plain_bytes_mut(&mut got).unwrap(), |p| seen.extend_from_slice(p))
                .unwrap()
                .unwrap();
            assert_eq!((got, seen), (v, bytes.clone()));
            let s: Vec<String> = (0..n.min(500)).map(|i| i.to_string()).collect();
            assert_eq!(decode_owned::<Vec<String>>(&encode(&s)).unwrap(), s);
        }
        // A length that does not match the size: postcard decides.
        let mut bytes = encode(&vec![2.5f64; 100]);
        bytes.extend_from_slice(&[9, 9]);
        assert_eq!(decode_owned::<Vec<f64>>(&bytes).unwrap(), decode::<Vec<f64>>(&bytes).unwrap());
        assert!(decode_owned::<Vec<u8>>(&bytes[..5]).is_err(), "a value cut short is an error");
        // A stream that ends early is an I/O error, not a value.
        let mut dst = vec![0u8; 800];
        assert!(read_plain_into(&mut &bytes[..50], 801, 100, &mut dst, |_| ()).is_err());
    }

    #[test]
    fn plain_vectors_fill_in_place_from_parts_as_decode_reads_them() {
        use super::{decode, encode, plain_bytes_mut, plain_count, plain_zeroed, read_plain_into};
        // Parts across the varint boundaries, read into one vector in order.
        let parts: Vec<Vec<f64>> = [0usize, 1, 127, 128, 16_384, 5].iter().map(|&n| (0..n).map(|i| i as f64 - 0.25).collect()).collect();
        let sizes: Vec<usize> = parts.iter().map(|p| encode(p).len()).collect();
        let counts: Vec<usize> = sizes.iter().map(|&s| plain_count::<Vec<f64>>(s).unwrap()).collect();
        assert_eq!(counts, parts.iter().map(Vec::len).collect::<Vec<_>>());
        let mut out: Vec<f64> = plain_zeroed(counts.iter().sum()).unwrap();
        let mut rest = plain_bytes_mut(&mut out).unwrap();
        for (p, (&size, &n)) in parts.iter().zip(sizes.iter().zip(&counts)) {
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n * 8);
            rest = tail;
            let bytes = encode(p);
            let mut seen = Vec::new();
            read_plain_into(&mut &bytes[..], size, n, dst, |b| seen.extend_from_slice(b)).unwrap().unwrap();
            assert_eq!(seen, bytes, "every byte is seen, in order");
        }
        assert_eq!(out, parts.concat());
        // Bytes of other vectors: u8 with every size, i8, f32.
        for n in [0usize, 1, 127, 128, 300] {
            let v: Vec<u8> = (0..n).map(|i| i as u8).collect();
            assert_eq!(plain_count::<Vec<u8>>(encode(&v).len()), Some(n));
        }
        let v = vec![-3i8, 4];
        let mut o: Vec<i8> = plain_zeroed(2).unwrap();
        read_plain_into(&mut &encode(&v)[..], 3, 2, plain_bytes_mut(&mut o).unwrap(), |_| ()).unwrap().unwrap();
        assert_eq!(o, v);
        assert_eq!(decode::<Vec<f32>>(&encode(&vec![1.5f32])).unwrap(), vec![1.5]);
        assert_eq!(plain_count::<Vec<f32>>(encode(&vec![1.5f32; 3]).len()), Some(3));
        // Not plain, impossible sizes, a prefix that says another length, a cut stream.
        assert_eq!(plain_count::<Vec<u64>>(9), None);
        assert!(plain_zeroed::<Vec<String>>(1).is_none());
        assert_eq!(plain_count::<Vec<f64>>(0), None);
        assert_eq!(plain_count::<Vec<f64>>(10), None);
        let bytes = encode(&vec![1.0f64, 2.0]);
        let mut dst = [0u8; 8];
        assert!(read_plain_into(&mut &bytes[..], 9, 1, &mut dst, |_| ()).unwrap().is_err(), "2 elements are not 1");
        let mut dst = [0u8; 16];
        assert!(read_plain_into(&mut &bytes[..10], 17, 2, &mut dst, |_| ()).is_err(), "a stream that ends early");
    }

    /// Plain vectors and slices, taken from their memory, encode to postcard's bytes, whole and
    /// in pieces cut where the generic encoder cuts them; borrowed and other types are unchanged.
    #[test]
    fn plain_vectors_and_slices_encode_from_their_memory_to_postcards_bytes() {
        use super::{encode, encode_chunked, plain_elements};
        fn pieces<T: serde::Serialize + ?Sized>(v: &T, chunk: usize) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            encode_chunked(v, chunk, |p| {
                got.push(p.to_vec());
                Ok(())
            })
            .unwrap();
            got
        }
        fn check<T: serde::Serialize + ?Sized>(v: &T, plain: bool) {
            let canonical = postcard::to_stdvec(v).unwrap();
            assert_eq!(plain_elements(v).is_some(), plain, "{}", std::any::type_name::<T>());
            // From ALIGNED_FROM bytes of elements the prefix is the same length as an overlong
            // varint of 8 bytes, and the elements follow it as postcard writes them.
            let expected = match plain_elements(v) {
                Some(e) if e.bytes.len() >= super::ALIGNED_FROM => {
                    let mut x = encode(v);
                    assert_eq!(postcard::take_from_bytes::<u64>(&x[..super::ALIGNED_PREFIX]).unwrap(), (e.count, &[][..]));
                    assert!(x[super::ALIGNED_PREFIX..] == canonical[canonical.len() - e.bytes.len()..]);
                    x.truncate(super::ALIGNED_PREFIX + e.bytes.len());
                    x
                }
                _ => canonical,
            };
            assert!(encode(v) == expected, "{}", std::any::type_name::<T>());
            assert_eq!(super::plain_encoded_len(v), plain.then_some(expected.len()));
            let mut into = vec![0xAAu8; expected.len()];
            assert_eq!(super::encode_plain_into(v, &mut into), plain);
            assert!(into == if plain { expected.clone() } else { vec![0xAA; expected.len()] }, "{}", std::any::type_name::<T>());
            let mut longer = vec![0xAAu8; expected.len() + 1];
            assert!(
                !super::encode_plain_into(v, &mut longer) && longer.iter().all(|&b| b == 0xAA),
                "a buffer of another size is left alone"
            );
            for chunk in [1, 2, 3, 7, 128, 129, 1 << 20] {
                let cut: Vec<Vec<u8>> = expected.chunks(chunk).map(<[u8]>::to_vec).collect();
                assert!(pieces(v, chunk) == cut, "{} in pieces of {chunk}", std::any::type_name::<T>());
            }
        }
        let large = super::PARALLEL_COPY_FROM / 8 + 5;
        for n in [0usize, 1, 127, 128, 16_384, 200_001, large] {
            let f: Vec<f64> = (0..n).map(|i| i as f64 * -0.37).collect();
            check(&f, true);
            check(&f[n / 3..], true);
            check(&(0..n).map(|i| i as f32 + 0.5).collect::<Vec<f32>>(), true);
            let b: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
            check(&b, true);
            check(&b[..n / 2], true);
            check(&(0..n.min(1000)).map(|i| (i * 7) as i8).collect::<Vec<i8>>()[..], true);
        }
        // Types that only look alike, and types with a lifetime, go through postcard.
        check(&vec![300u64, 7], false);
        check(&[1.5f64, 2.5], false);
        let text = String::from("borrowed");
        check(&vec![text.as_str(); 3], false);
        check(&vec![vec![1.0f64; 4]; 2], false);
    }

    /// A plain vector of ALIGNED_FROM bytes of elements or more is written with an 8-byte
    /// prefix (its elements 8 bytes in) that postcard and every plain reader take as its length;
    /// one byte less keeps the shortest prefix. Each size has exactly one element count.
    #[test]
    fn large_plain_vectors_put_their_elements_eight_bytes_in() {
        use super::{decode, decode_owned, encode, plain_count, ALIGNED_FROM, ALIGNED_PREFIX};
        use std::collections::VecDeque;
        for n in [ALIGNED_FROM / 8 - 1, ALIGNED_FROM / 8, ALIGNED_FROM / 8 + 1, 3 << 20] {
            let v: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 7.0).collect();
            let bytes = encode(&v);
            let prefix = bytes.len() - n * 8;
            assert_eq!(prefix == ALIGNED_PREFIX, n * 8 >= ALIGNED_FROM, "{n} elements: {prefix}-byte prefix");
            assert_eq!(plain_count::<Vec<f64>>(bytes.len()), Some(n));
            assert_eq!(decode_owned::<Vec<f64>>(&bytes).unwrap(), v);
            // Through postcard's own reader (a type that is not plain).
            assert_eq!(decode::<VecDeque<f64>>(&bytes).unwrap(), VecDeque::from(v.clone()));
        }
        for n in [ALIGNED_FROM - 1, ALIGNED_FROM] {
            let v: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let bytes = encode(&v);
            assert_eq!(bytes.len() - n == ALIGNED_PREFIX, n >= ALIGNED_FROM);
            assert_eq!(plain_count::<Vec<u8>>(bytes.len()), Some(n));
            assert_eq!(decode::<Vec<u8>>(&bytes).unwrap(), v);
        }
        // Every size from below to above the boundary is the encoding of at most one count
        // (some of none), and plain_count finds it.
        for size in ALIGNED_FROM - 16..ALIGNED_FROM + 32 {
            let fits: Vec<usize> = (1..=10).filter_map(|p| size.checked_sub(p)).filter(|&n| encode(&vec![0u8; n]).len() == size).collect();
            assert!(fits.len() <= 1, "{size} bytes: {fits:?}");
            assert_eq!(plain_count::<Vec<u8>>(size), fits.first().copied(), "{size} bytes");
        }
    }

    /// A large copy in parts on several threads (the last part short) and a small one whole:
    /// every byte lands at its own offset.
    #[test]
    fn a_copy_on_every_core_puts_each_part_at_its_offset() {
        for len in [1000, PARALLEL_COPY_FROM + (8 << 20) + 123] {
            let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            copy_on_every_core(&mut dst, &src);
            assert!(dst == src, "len {len}");
        }
    }

    /// Huge-page advice changes nothing a program sees: bytes written before it stay, a zeroed
    /// vector made with it reads as zeros and round-trips.
    #[test]
    fn huge_page_advice_keeps_the_bytes() {
        let mut written: Vec<u8> = (0..HUGE_PAGES_FROM + 4099).map(|i| (i % 253) as u8).collect();
        advise_huge_pages(&mut written);
        assert!(written.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
        let mut v: Vec<f64> = plain_zeroed(3_000_000).unwrap();
        assert!(v.iter().all(|x| *x == 0.0));
        v[2_999_999] = 1.5;
        let bytes = encode(&v);
        assert_eq!(decode_owned::<Vec<f64>>(&bytes).unwrap(), v);
    }

    #[test]
    fn chunked_encoding_gives_the_same_bytes_in_pieces_and_stops_at_the_first_error() {
        let values: (Vec<f64>, String, Vec<(u64, bool)>) = ((0..1000).map(|i| i as f64).collect(), "x".repeat(300), vec![(7, true); 50]);
        let whole = super::encode(&values);
        for chunk in [1, 7, 8, 64, 1000, whole.len(), whole.len() + 1] {
            let mut pieces: Vec<Vec<u8>> = vec![];
            super::encode_chunked(&values, chunk, |p| {
                pieces.push(p.to_vec());
                Ok(())
            })
            .unwrap();
            assert!(pieces.iter().all(|p| !p.is_empty()), "chunk {chunk}");
            assert!(pieces.iter().rev().skip(1).all(|p| p.len() >= chunk), "only the last piece is short (chunk {chunk})");
            assert_eq!(pieces.concat(), whole, "chunk {chunk}");
        }
        let mut calls = 0;
        let err = super::encode_chunked(&values, 64, |_| {
            calls += 1;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!((err.to_string().as_str(), calls), ("disk full", 1));
        super::encode_chunked(&(), 64, |_| panic!("nothing to hand out")).unwrap();
    }

    extern "C" fn collect(ctx: *mut c_void, ptr: *const u8, len: usize) {
        // SAFETY: tests pass a &mut Vec<u8> as ctx and a valid buffer.
        unsafe { (*(ctx as *mut Vec<u8>)).extend_from_slice(std::slice::from_raw_parts(ptr, len)) }
    }

    fn call(mode: u32, input: &[u8], f: impl Fn(u64) -> u64) -> (u32, Vec<u8>) {
        let mut out = Vec::new();
        // SAFETY: valid buffer and sink context.
        let st = unsafe { serve1(f, mode, input.as_ptr(), input.len(), collect, &mut out as *mut Vec<u8> as *mut c_void) };
        (st, out)
    }

    #[test]
    fn apply_and_map_encode_results_and_catch_panics() {
        let (st, out) = call(MODE_APPLY, &super::encode(&(7u64,)), |x| x * x);
        assert_eq!((st, super::decode::<u64>(&out).unwrap()), (STATUS_OK, 49));

        let (st, out) = call(MODE_MAP, &super::encode(&vec![1u64, 0, 4]), |x| 12 / x);
        assert_eq!(st, STATUS_OK);
        let r: Vec<Result<u64, String>> = super::decode(&out).unwrap();
        assert_eq!(r[0], Ok(12));
        assert!(r[1].as_ref().unwrap_err().contains("divide by zero"), "{r:?}");
        assert_eq!(r[2], Ok(3));

        let (st, out) = call(MODE_APPLY, &super::encode(&(3u64,)), |_| panic!("boom {}", 3));
        assert_eq!((st, String::from_utf8(out).unwrap()), (STATUS_PANIC, "boom 3".to_string()));

        let (st, _) = call(MODE_APPLY, b"", |x| x);
        assert_eq!(st, STATUS_BAD_INPUT);
    }

    #[test]
    fn namespace_round_trip() {
        let dir = std::env::temp_dir().join(format!("rpx-runtime-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var(super::NS_DIR_ENV, &dir);
        super::put("v", &vec![(1u8, "a".to_string())]);
        assert_eq!(super::get::<Vec<(u8, String)>>("v"), vec![(1, "a".to_string())]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join("v")).unwrap().permissions().mode() & 0o777, 0o600, "values are the owner's only");
        assert!(std::panic::catch_unwind(|| super::get::<u8>("missing")).is_err());
        // Plain vectors are read into place: the values postcard gives, at every size (the
        // last copied by threads that map in their own parts of the file).
        for n in [0usize, 1, 128, 200_001, (super::HUGE_PAGES_FROM / 8) + 3, (super::PARALLEL_COPY_FROM / 8) + 5] {
            let f: Vec<f64> = (0..n).map(|i| i as f64 * 1.25 - 7.0).collect();
            super::put("f", &f);
            assert!(super::get::<Vec<f64>>("f") == f, "{n}");
            let b: Vec<u8> = (0..n).map(|i| (i % 255) as u8).collect();
            super::put("b", &b[..]);
            assert!(super::get::<Vec<u8>>("b") == b, "{n}");
            if n > 0 {
                assert!(std::panic::catch_unwind(|| super::get::<Vec<f32>>("b")).is_err(), "{n} bytes are not {n} f32s");
            }
        }
        // A file cut short is an error whichever way it is read, not a shorter vector.
        super::put("f", &vec![1.5f64; 1000]);
        let cut = std::fs::read(dir.join("f")).unwrap();
        std::fs::write(dir.join("f"), &cut[..cut.len() - 3]).unwrap();
        let err = std::panic::catch_unwind(|| super::get::<Vec<f64>>("f")).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("pushed value `f`"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
