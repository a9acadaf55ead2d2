//! Property tests of the ZMTP check: arbitrary bytes and arbitrary frame sequences, cut into
//! arbitrary reads, never panic, never allocate, forward only what the limits allow, and agree
//! with a direct reading of the frames; the identity read from a READY command is the one
//! zeromq would read. `PROPTEST_CASES` sets the number of inputs (256 by
//! default; the benchmark run uses 1,000,000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use rpx_guard::zmtp::{null_greeting, FrameCheck, Step, Violation};
use rpx_guard::Limits;

/// Counts this thread's allocations while armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ARMED.try_with(|armed| {
            if armed.get() {
                let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
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

fn limits() -> Limits {
    Limits { max_frame: 200_000, max_message: 300_000, max_command: 300, ..Limits::default() }
}

fn greeting() -> Vec<u8> {
    null_greeting().to_vec()
}

/// Feed `data` in reads of the given sizes, as the relay does; returns the bytes forwarded and
/// the verdict, and counts allocations made by the check.
fn run(data: &[u8], reads: &[usize]) -> (usize, Result<(), Violation>, usize) {
    let (forwarded, verdict, allocations, _) = run_check(data, reads);
    (forwarded, verdict, allocations)
}

/// [`run`], also returning the identity the check read (checked to be at most 255 bytes).
fn run_check(data: &[u8], reads: &[usize]) -> (usize, Result<(), Violation>, usize, Option<Vec<u8>>) {
    let mut check = FrameCheck::new(limits());
    let (mut at, mut forwarded) = (0, 0);
    let mut sizes = reads.iter().copied().cycle();
    ALLOCATIONS.with(|n| n.set(0));
    ARMED.with(|a| a.set(true));
    let verdict = loop {
        if at >= data.len() {
            break Ok(());
        }
        let end = (at + sizes.next().unwrap_or(1).max(1)).min(data.len());
        let mut chunk = &data[at..end];
        let mut failed = None;
        while !chunk.is_empty() {
            match check.step(chunk) {
                Ok(Step::Forward(n)) => {
                    assert_eq!(n, chunk.len(), "Forward covers the whole input");
                    forwarded += n;
                    chunk = &chunk[n..];
                }
                Ok(Step::Reserve { forward, len }) => {
                    assert!(forward >= 1 && forward <= chunk.len(), "Reserve forwards part of its input");
                    assert!(len <= limits().max_frame, "a reservation never exceeds the frame limit");
                    forwarded += forward;
                    chunk = &chunk[forward..];
                }
                Err(v) => {
                    failed = Some(v);
                    break;
                }
            }
        }
        if let Some(v) = failed {
            break Err(v);
        }
        at = end;
    };
    ARMED.with(|a| a.set(false));
    let identity = check.identity().map(<[u8]>::to_vec);
    assert!(identity.as_ref().is_none_or(|id| id.len() <= 255));
    (forwarded, verdict, ALLOCATIONS.with(Cell::get), identity)
}

/// A READY command frame with these properties, and the identity zeromq reads from it (the last
/// `Identity` property; empty if none).
fn ready_frame(props: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, Vec<u8>) {
    let mut body = b"\x05READY".to_vec();
    let mut identity = Vec::new();
    for (name, value) in props {
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
        if name == b"Identity" {
            identity = value.clone();
        }
    }
    let mut frame = vec![0x04, body.len() as u8];
    if body.len() > 255 {
        frame = vec![0x06];
        frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
    }
    frame.extend(body);
    (frame, identity)
}

fn property() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let name = prop_oneof![
        Just(b"Identity".to_vec()),
        Just(b"Socket-Type".to_vec()),
        Just(b"identity".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..10)
    ];
    (name, proptest::collection::vec(any::<u8>(), 0..40))
}

/// A frame as a peer would write it.
#[derive(Debug, Clone)]
struct Frame {
    command: bool,
    more: bool,
    long: bool,
    len: usize,
}

impl Frame {
    fn bytes(&self) -> Vec<u8> {
        let flags = u8::from(self.more) | (u8::from(self.long) << 1) | (u8::from(self.command) << 2);
        let mut out = vec![flags];
        if self.long {
            out.extend_from_slice(&(self.len as u64).to_be_bytes());
        } else {
            out.push(self.len as u8);
        }
        out.extend(std::iter::repeat_n(0x5a, self.len));
        out
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    (any::<bool>(), any::<bool>(), prop_oneof![0usize..256, 256usize..250_000]).prop_map(|(command, more, len)| Frame {
        command,
        more: more && !command,
        long: len > 255,
        len,
    })
}

/// The verdict read straight off the frame list: the first frame that breaks a limit.
fn expected(frames: &[Frame]) -> Option<usize> {
    let l = limits();
    let mut message = 0u64;
    for (i, f) in frames.iter().enumerate() {
        let len = f.len as u64;
        if f.command {
            if len > l.max_command {
                return Some(i);
            }
            continue;
        }
        if len > l.max_frame || message + len > l.max_message {
            return Some(i);
        }
        message = if f.more { message + len } else { 0 };
    }
    None
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_allocate_or_overrun(data in proptest::collection::vec(any::<u8>(), 0..512), reads in proptest::collection::vec(1usize..80, 1..8)) {
        let (forwarded, _verdict, allocations) = run(&data, &reads);
        prop_assert!(forwarded <= data.len());
        prop_assert_eq!(allocations, 0);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_greeting(tail in proptest::collection::vec(any::<u8>(), 0..512), reads in proptest::collection::vec(1usize..80, 1..8)) {
        let data = [greeting(), tail].concat();
        let (forwarded, verdict, allocations) = run(&data, &reads);
        prop_assert_eq!(allocations, 0);
        if verdict.is_ok() {
            prop_assert_eq!(forwarded, data.len());
        }
    }

    #[test]
    fn arbitrary_ready_commands_never_panic_or_allocate(body in proptest::collection::vec(any::<u8>(), 0..300), tail in proptest::collection::vec(any::<u8>(), 0..64), reads in proptest::collection::vec(1usize..80, 1..8)) {
        // A command frame whose body starts like READY and goes on with arbitrary bytes.
        let mut ready = b"\x05READY".to_vec();
        ready.extend(body);
        let mut data = greeting();
        data.push(0x04);
        data.push(ready.len().min(255) as u8);
        ready.truncate(255);
        data.extend(ready);
        data.extend(tail);
        let (forwarded, _verdict, allocations, _identity) = run_check(&data, &reads);
        prop_assert!(forwarded <= data.len());
        prop_assert_eq!(allocations, 0);
    }

    #[test]
    fn the_identity_is_the_one_zeromq_reads(props in proptest::collection::vec(property(), 0..6), reads in proptest::collection::vec(1usize..40, 1..8)) {
        let (frame, identity) = ready_frame(&props);
        let data = [greeting(), frame, vec![0x00, 0x01, 0x5a]].concat();
        let (forwarded, verdict, allocations, read) = run_check(&data, &reads);
        prop_assert_eq!(allocations, 0);
        prop_assert!(verdict.is_ok(), "refused a well-formed READY: {:?}", verdict);
        prop_assert_eq!(forwarded, data.len());
        prop_assert_eq!(read, Some(identity));
    }

    #[test]
    fn frame_sequences_are_judged_like_a_direct_reading(frames in proptest::collection::vec(frame(), 1..6), reads in proptest::collection::vec(1usize..70_000, 1..6)) {
        let mut data = greeting();
        let mut ends = Vec::new();
        for f in &frames {
            data.extend(f.bytes());
            ends.push(data.len());
        }
        let (forwarded, verdict, allocations) = run(&data, &reads);
        prop_assert_eq!(allocations, 0);
        match expected(&frames) {
            None => {
                prop_assert!(verdict.is_ok(), "refused a valid sequence: {:?}", verdict);
                prop_assert_eq!(forwarded, data.len());
            }
            Some(bad) => {
                prop_assert!(verdict.is_err(), "accepted frame {} over the limits", bad);
                // Nothing of the bad frame's body was passed on.
                let body_start = ends[bad] - frames[bad].len;
                prop_assert!(forwarded <= body_start, "forwarded {} bytes, the bad body starts at {}", forwarded, body_start);
            }
        }
    }
}
