//! Property tests of the message decoder: arbitrary frame lists, signed or not, never panic,
//! are refused unless correctly signed, and never allocate more than a small multiple of their
//! own size. `PROPTEST_CASES` sets the number of inputs (256 by default; the benchmark run uses
//! 1,000,000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use proptest::prelude::*;
use rpx_protocol::Session;

/// Tracks this thread's largest single allocation while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ARMED.try_with(|armed| {
            if armed.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
            }
        });
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEY: &[u8] = b"property-key";

/// Decode, returning whether it was accepted and the largest single allocation it made.
fn decode(frames: Vec<Bytes>) -> (bool, usize) {
    let s = Session::new(KEY, "props");
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let ok = s.decode(frames).is_ok();
    ARMED.with(|a| a.set(false));
    (ok, LARGEST.with(Cell::get))
}

fn frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        Just(b"<IDS|MSG>".to_vec()),
        Just(b"{}".to_vec()),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        Just(
            br#"{"msg_id":"a","msg_type":"execute_request","username":"u","session":"s","date":"2026-01-01T00:00:00Z","version":"5.3"}"#
                .to_vec()
        ),
    ]
}

/// Bytes a decode of `frames` may take in one allocation: a small multiple of the input.
fn allowance(frames: &[Bytes]) -> usize {
    4 * (frames.iter().map(Bytes::len).sum::<usize>() + frames.len() * 16) + 1024
}

proptest! {
    #[test]
    fn arbitrary_frames_are_refused_without_panic_or_large_allocation(frames in proptest::collection::vec(frame_bytes(), 0..12)) {
        let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
        let allowed = allowance(&frames);
        let (ok, largest) = decode(frames);
        prop_assert!(!ok, "an unsigned message was accepted");
        prop_assert!(largest <= allowed, "allocated {} bytes, allowed {}", largest, allowed);
    }

    #[test]
    fn signed_arbitrary_json_frames_never_panic(parts in proptest::collection::vec(frame_bytes(), 4..5), buffers in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..32), 0..3)) {
        // Correctly signed, so the decoder goes on to parse whatever the four JSON frames hold.
        let s = Session::new(KEY, "props");
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let sig = s.sign(&refs);
        let mut frames = vec![Bytes::from_static(b"peer"), Bytes::from_static(b"<IDS|MSG>"), Bytes::from(sig)];
        frames.extend(parts.iter().cloned().map(Bytes::from));
        frames.extend(buffers.into_iter().map(Bytes::from));
        let allowed = allowance(&frames);
        let (_ok, largest) = decode(frames);
        prop_assert!(largest <= allowed, "allocated {} bytes, allowed {}", largest, allowed);
    }
}
