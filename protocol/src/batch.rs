//! rpx-only batches: several complete, individually signed messages carried in one zeromq
//! message between rpx peers that announced they read them (an engine in its
//! `registration_request`, the controller in its `registration_reply`:
//! [`crate::registration::RegistrationRequest::batches`]). ipyparallel's peers never get one.
//!
//! A batch is a transport detail: each message inside keeps its own msg_id, signature, routing
//! identities and meaning, and the reader handles them one by one, in order, exactly as if
//! they had come separately. Only messages that are already queued are put together: nothing
//! waits for a batch to fill.
//!
//! Frames: `[MARKER, <IDS|MSG>, signature, header, parent_header, metadata, content,
//! inner frames...]`, an ordinary signed message of type [`MSG_TYPE`] whose content
//! ([`BatchContent`]) gives the number of frames of each inner message, and whose buffers are
//! the inner messages' frames one after the other (each with its own identities, delimiter
//! and signature). The marker stands where a routing identity would, so a reader tells a batch
//! from an ordinary message by its first frame, without parsing anything.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::session::{json_frame, Session, DELIMITER};
use crate::{Error, Result};

/// First frame of a batch (a routing identity no zeromq peer gets: identities that zeromq
/// makes up start with a zero byte and are 5 bytes long).
pub const MARKER: &[u8] = b"\0rpx-batch-1";
/// `msg_type` of a batch's header.
pub const MSG_TYPE: &str = "rpx_batch";
/// Most messages in one batch.
pub const MAX_MESSAGES: usize = 64;
/// Largest message put in a batch (bytes over its frames); a larger one goes alone.
pub const MAX_INNER_BYTES: usize = 64 * 1024;
/// Most bytes of inner messages in one batch.
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest content frame of a batch: `{"parts":[..]}` with [`MAX_MESSAGES`] counts of up to
/// 10 digits fits well under it, and a larger one is refused before it is parsed.
const MAX_CONTENT_BYTES: usize = 1024;
/// Fewest frames of an inner message: `<IDS|MSG>`, signature and the four JSON frames.
const MIN_INNER_FRAMES: u32 = 6;

/// The content of a batch: the number of frames of each inner message, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchContent {
    pub parts: Vec<u32>,
}

/// Whether `frames` (as received, after the reader's own routing identities) are a batch.
pub fn is_batch(frames: &[Bytes]) -> bool {
    frames.first().is_some_and(|f| f.as_ref() == MARKER)
}

/// Bytes over the frames of one message.
pub fn size(frames: &[Bytes]) -> usize {
    frames.iter().map(|f| f.len()).sum()
}

/// Whether a message of `frames` may go in a batch (small enough).
pub fn fits(frames: &[Bytes]) -> bool {
    size(frames) <= MAX_INNER_BYTES
}

/// One signed batch of `messages` (each the frames a reader would get had it come alone:
/// identities, delimiter, signed part). `idents` go in front of the marker (a ROUTER's peer).
/// The caller keeps to [`MAX_MESSAGES`] and [`MAX_BATCH_BYTES`] ([`Batcher`] does).
pub fn encode(session: &Session, idents: Vec<Bytes>, messages: Vec<Vec<Bytes>>) -> Vec<Bytes> {
    let content = BatchContent { parts: messages.iter().map(|m| m.len() as u32).collect() };
    let header = json_frame(&session.header(MSG_TYPE));
    let empty = Bytes::from_static(b"{}");
    let mut out = idents;
    out.push(Bytes::from_static(MARKER));
    out.extend(session.frames(std::iter::empty(), header, empty.clone(), empty, json_frame(&content), messages.into_iter().flatten()));
    out
}

/// The inner messages of a batch: `frames` start at the [`MARKER`] (a ROUTER reader strips
/// its peer's identity first). The batch's signature is checked, its sizes are checked
/// against the frames actually there before anything is split, and every inner message must
/// hold a delimiter followed by its signed part; any failure refuses the whole batch with an error saying why. The inner
/// messages' own signatures are left to their reader, as for any message.
pub fn decode(session: &Session, frames: Vec<Bytes>) -> Result<Vec<Vec<Bytes>>> {
    if !is_batch(&frames) {
        return Err(Error::Malformed("not a batch: the first frame is not the rpx batch marker".into()));
    }
    // [MARKER, <IDS|MSG>, signature, header, parent, metadata, content, ..]
    if let Some(content) = frames.get(6).filter(|c| c.len() > MAX_CONTENT_BYTES) {
        return Err(Error::Malformed(format!("a batch's content of {} bytes (at most {MAX_CONTENT_BYTES})", content.len())));
    }
    let msg = session.decode(frames)?;
    if msg.header.msg_type != MSG_TYPE {
        return Err(Error::Malformed(format!("a batch's header says {:?}, not {MSG_TYPE:?}", msg.header.msg_type)));
    }
    if msg.idents.len() != 1 {
        return Err(Error::Malformed(format!(
            "a batch has {} routing frames before its delimiter, need the marker alone",
            msg.idents.len()
        )));
    }
    let content: BatchContent =
        serde_json::from_value(msg.content).map_err(|e| Error::Malformed(format!("a batch's content is not its frame counts: {e}")))?;
    if content.parts.is_empty() || content.parts.len() > MAX_MESSAGES {
        return Err(Error::Malformed(format!("a batch of {} messages (1 to {MAX_MESSAGES} allowed)", content.parts.len())));
    }
    if let Some(p) = content.parts.iter().find(|p| **p < MIN_INNER_FRAMES) {
        return Err(Error::Malformed(format!("a batched message of {p} frames (at least {MIN_INNER_FRAMES})")));
    }
    let total: u64 = content.parts.iter().map(|p| u64::from(*p)).sum();
    if total != msg.buffers.len() as u64 {
        return Err(Error::Malformed(format!("a batch announces {total} frames and carries {}", msg.buffers.len())));
    }
    let mut rest = msg.buffers.into_iter();
    let mut out = Vec::with_capacity(content.parts.len());
    for (i, p) in content.parts.iter().enumerate() {
        let inner: Vec<Bytes> = rest.by_ref().take(*p as usize).collect();
        let signed = inner.iter().position(|f| f.as_ref() == DELIMITER).map_or(0, |d| inner.len() - d - 1);
        if signed < 5 {
            return Err(Error::Malformed(format!(
                "batched message {i} has no <IDS|MSG> delimiter followed by a signature and four JSON frames"
            )));
        }
        out.push(inner);
    }
    Ok(out)
}

/// Puts queued messages together for one peer: [`Batcher::push`] each message that is ready,
/// then [`Batcher::finish`]; what comes out is the messages in their order, as few sends as
/// the bounds allow (a lone message goes as it is, not as a batch of one).
#[derive(Debug, Default)]
pub struct Batcher {
    out: Vec<Send>,
    open: Vec<Vec<Bytes>>,
    open_bytes: usize,
}

/// One send a [`Batcher`] decided on.
#[derive(Debug, PartialEq)]
pub enum Send {
    /// A message as it is.
    Single(Vec<Bytes>),
    /// Messages to go out as one batch ([`encode`]).
    Batch(Vec<Vec<Bytes>>),
}

impl Batcher {
    /// Add the next message.
    pub fn push(&mut self, frames: Vec<Bytes>) {
        let n = size(&frames);
        if n > MAX_INNER_BYTES {
            self.close();
            self.out.push(Send::Single(frames));
            return;
        }
        if self.open.len() >= MAX_MESSAGES || self.open_bytes + n > MAX_BATCH_BYTES {
            self.close();
        }
        self.open_bytes += n;
        self.open.push(frames);
    }

    fn close(&mut self) {
        let open = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        match open.len() {
            0 => {}
            1 => self.out.push(Send::Single(open.into_iter().next().expect("one"))),
            _ => self.out.push(Send::Batch(open)),
        }
    }

    /// The sends, in order.
    pub fn finish(mut self) -> Vec<Send> {
        self.close();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(s: &Session, route: &'static [u8], n: usize, buf: usize) -> Vec<Bytes> {
        s.msg(&[Bytes::from_static(route)], "apply_request", json!({"n": n}), None, json!({}), &[Bytes::from(vec![7u8; buf])]).1
    }

    #[test]
    fn a_batch_round_trips_its_messages_in_order() {
        let s = Session::new(b"key", "u");
        let msgs: Vec<Vec<Bytes>> = (0..5).map(|i| msg(&s, b"client", i, i * 10)).collect();
        let frames = encode(&s, vec![], msgs.clone());
        assert!(is_batch(&frames));
        assert_eq!(decode(&s, frames).unwrap(), msgs);
        // Behind a ROUTER's peer identity, the reader strips it first.
        let routed = encode(&s, vec![Bytes::from_static(b"engine")], msgs.clone());
        assert_eq!(routed[0].as_ref(), b"engine");
        assert_eq!(decode(&s, routed[1..].to_vec()).unwrap(), msgs);
        // Each inner message still verifies on its own.
        for (i, m) in decode(&s, encode(&s, vec![], msgs)).unwrap().into_iter().enumerate() {
            assert_eq!(s.decode(m).unwrap().content["n"], i);
        }
    }

    #[test]
    fn malformed_batches_are_refused_with_a_reason() {
        let s = Session::new(b"key", "u");
        let msgs: Vec<Vec<Bytes>> = (0..3).map(|i| msg(&s, b"c", i, 1)).collect();
        let good = encode(&s, vec![], msgs.clone());
        let err = |frames: Vec<Bytes>| decode(&s, frames).unwrap_err().to_string();

        // Signed with another key.
        let other = Session::new(b"other", "u");
        assert!(matches!(decode(&s, encode(&other, vec![], msgs.clone())), Err(Error::BadSignature)));
        // A frame missing, or one too many: the counts no longer match.
        let mut short = good.clone();
        short.pop();
        assert!(err(short).contains("announces 24 frames and carries 23"));
        let mut long = good.clone();
        long.push(Bytes::from_static(b"x"));
        assert!(err(long).contains("carries 25"));
        // Counts that are signed but lie (an inner message without its delimiter).
        let lying = |parts: Vec<u32>, buffers: Vec<Bytes>| {
            s.frames(
                [Bytes::from_static(MARKER)],
                json_frame(&s.header(MSG_TYPE)),
                Bytes::from_static(b"{}"),
                Bytes::from_static(b"{}"),
                json_frame(&BatchContent { parts }),
                buffers,
            )
        };
        let flat: Vec<Bytes> = msgs.iter().flatten().cloned().collect();
        assert!(err(lying(vec![6, 6, 12], flat.clone())).contains("batched message 0 has no <IDS|MSG> delimiter"));
        assert!(err(lying(vec![3, 21], flat.clone())).contains("of 3 frames"));
        assert!(err(lying(vec![], vec![])).contains("a batch of 0 messages"));
        assert!(err(lying(vec![6; MAX_MESSAGES + 1], flat.clone())).contains("a batch of 65 messages"));
        assert!(err(lying(vec![u32::MAX, u32::MAX, 12], flat)).contains("carries 24"));
        // Counts too many to be read at all: refused by size before the content is parsed.
        assert!(err(lying(vec![6; 1000], vec![])).contains("bytes (at most 1024)"));
        // Not a batch at all, or a batch marker on another message type.
        assert!(err(msgs[0].clone()).contains("not a batch"));
        let mut wrong_type = s.msg(&[Bytes::from_static(MARKER)], "apply_request", json!({"parts": [6]}), None, json!({}), &[]).1;
        wrong_type.extend(msgs[0][1..].iter().cloned());
        assert!(err(wrong_type).contains("not \"rpx_batch\""));
    }

    #[test]
    fn the_batcher_keeps_order_and_bounds() {
        let s = Session::new(b"key", "u");
        let smalls: Vec<Vec<Bytes>> = (0..MAX_MESSAGES + 2).map(|i| msg(&s, b"c", i, 10)).collect();
        let small = |i: usize| smalls[i].clone();
        let big = msg(&s, b"c", 99, MAX_INNER_BYTES + 1);
        // One message alone goes as it is.
        let mut b = Batcher::default();
        b.push(small(0));
        assert_eq!(b.finish(), vec![Send::Single(small(0))]);
        // A large message splits the run, in order.
        let mut b = Batcher::default();
        for i in 0..3 {
            b.push(small(i));
        }
        b.push(big.clone());
        b.push(small(3));
        assert_eq!(b.finish(), vec![Send::Batch((0..3).map(small).collect()), Send::Single(big), Send::Single(small(3))]);
        // At most MAX_MESSAGES per batch.
        let mut b = Batcher::default();
        for i in 0..MAX_MESSAGES + 2 {
            b.push(small(i));
        }
        let sends = b.finish();
        assert_eq!(sends.len(), 2);
        assert!(matches!(&sends[0], Send::Batch(m) if m.len() == MAX_MESSAGES));
        assert!(matches!(&sends[1], Send::Batch(m) if m.len() == 2));
        // At most MAX_BATCH_BYTES per batch.
        let mut b = Batcher::default();
        let per = MAX_INNER_BYTES - 1_000;
        let n = MAX_BATCH_BYTES / per + 1;
        for i in 0..n {
            b.push(msg(&s, b"c", i, per));
        }
        let sends = b.finish();
        assert_eq!(sends.len(), 2);
        for send in &sends {
            if let Send::Batch(m) = send {
                assert!(m.iter().map(|f| size(f)).sum::<usize>() <= MAX_BATCH_BYTES);
            }
        }
    }
}
