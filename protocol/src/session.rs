//! Signing, encoding and decoding of multipart messages.
//!
//! Frames: `[idents...] <IDS|MSG> signature header parent_header metadata content [buffers...]`,
//! where the signature is the hex HMAC-SHA256 of the four JSON frames under the cluster key
//! (empty when the key is empty).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::message::{now_iso, Header, Message, PROTOCOL_VERSION};
use crate::{Error, Result};

/// The delimiter between routing identities and the signed part.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

type HmacSha256 = Hmac<Sha256>;

/// One party's session: the shared key plus the session id and user name written into headers.
#[derive(Clone)]
pub struct Session {
    /// The HMAC already keyed (cloned per message), `None` when the key is empty.
    mac: Option<HmacSha256>,
    /// This process's id, in every message id (read once: `getpid` per message showed in
    /// profiles).
    pid: u32,
    /// Session id (ipyparallel uses the engine uuid as an engine's session id).
    pub session: String,
    pub username: String,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("session", &self.session).finish_non_exhaustive()
    }
}

impl Session {
    /// A session with a fresh random id.
    pub fn new(key: &[u8], username: &str) -> Session {
        Session::with_id(key, username, &uuid::Uuid::new_v4().to_string())
    }

    /// A session with a given id.
    pub fn with_id(key: &[u8], username: &str, session: &str) -> Session {
        Session {
            mac: (!key.is_empty()).then(|| HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")),
            pid: std::process::id(),
            session: session.to_string(),
            username: username.to_string(),
            counter: Default::default(),
        }
    }

    /// A new unique message id.
    pub fn new_msg_id(&self) -> String {
        let n = self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}_{}_{}", self.session, self.pid, n)
    }

    /// A header for a new message of `msg_type` from this session.
    pub fn header(&self, msg_type: &str) -> Header {
        Header {
            msg_id: self.new_msg_id(),
            msg_type: msg_type.to_string(),
            username: self.username.clone(),
            session: self.session.clone(),
            date: now_iso(),
            version: PROTOCOL_VERSION.to_string(),
        }
    }

    /// Hex HMAC-SHA256 over the given frames; empty when the key is empty.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        let Some(mut mac) = self.mac.clone() else { return String::new() };
        for p in parts {
            mac.update(p);
        }
        const_hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `signature` (hex) is this key's HMAC over `parts`; always true with an empty key.
    pub fn verify_parts(&self, signature: &[u8], parts: &[&[u8]]) -> bool {
        self.verify(signature, parts)
    }

    fn verify(&self, signature: &[u8], parts: &[&[u8]]) -> bool {
        let Some(mut mac) = self.mac.clone() else { return true };
        // An HMAC-SHA256 is 32 bytes; any other length is not a signature of this key.
        let Ok(sig) = const_hex::decode_to_array::<_, 32>(signature) else { return false };
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(&sig).is_ok()
    }

    /// Encode a message into signed frames.
    pub fn encode(
        &self,
        idents: &[Bytes],
        header: &Header,
        parent_header: &Value,
        metadata: &Value,
        content: &Value,
        buffers: &[Bytes],
    ) -> Vec<Bytes> {
        let (h, p, m, c) = (json_frame(header), json_frame(parent_header), json_frame(metadata), json_frame(content));
        self.frames(idents.iter().cloned(), h, p, m, c, buffers.iter().cloned())
    }

    /// The signed part of a message from its already-serialized JSON frames:
    /// `[signature, header, parent_header, metadata, content, buffers...]`. Nothing is copied, so
    /// a router can forward a message with a new header or metadata and the content as received.
    /// [`join_frames`] puts routing identities in front.
    pub fn signed_part(
        &self,
        header: Bytes,
        parent_header: Bytes,
        metadata: Bytes,
        content: Bytes,
        buffers: impl IntoIterator<Item = Bytes>,
    ) -> Vec<Bytes> {
        let sig = Bytes::from(self.sign(&[&header, &parent_header, &metadata, &content]));
        let mut out = vec![sig, header, parent_header, metadata, content];
        out.extend(buffers);
        out
    }

    /// Frames ready to send: `idents`, the delimiter, then [`Session::signed_part`].
    pub fn frames(
        &self,
        idents: impl IntoIterator<Item = Bytes>,
        header: Bytes,
        parent_header: Bytes,
        metadata: Bytes,
        content: Bytes,
        buffers: impl IntoIterator<Item = Bytes>,
    ) -> Vec<Bytes> {
        join_frames(idents.into_iter().collect(), self.signed_part(header, parent_header, metadata, content, buffers))
    }

    /// Build and encode a new message of `msg_type` in reply to `parent` (if any); the metadata
    /// is any serializable value (a JSON object, or a typed one such as
    /// [`crate::content::ReplyMetadata`], written straight to JSON).
    pub fn msg(
        &self,
        idents: &[Bytes],
        msg_type: &str,
        content: Value,
        parent: Option<&Header>,
        metadata: impl serde::Serialize,
        buffers: &[Bytes],
    ) -> (Header, Vec<Bytes>) {
        let header = self.header(msg_type);
        // The parent header is written as it is, not through a `Value`.
        let parent = parent.map_or_else(|| Bytes::from_static(b"{}"), json_frame);
        let frames = self.frames(
            idents.iter().cloned(),
            json_frame(&header),
            parent,
            json_frame(&metadata),
            json_frame(&content),
            buffers.iter().cloned(),
        );
        (header, frames)
    }

    /// Split frames at the delimiter, verify the signature and parse the four JSON frames.
    pub fn decode(&self, frames: Vec<Bytes>) -> Result<Message> {
        let (idents, rest) = split_frames(frames)?;
        let [sig, h, p, m, c] = [&rest[0], &rest[1], &rest[2], &rest[3], &rest[4]];
        if !self.verify(sig, &[h, p, m, c]) {
            return Err(Error::BadSignature);
        }
        let header: Header = serde_json::from_slice(h)?;
        let parent_header: Value = serde_json::from_slice(p)?;
        let metadata: Value = serde_json::from_slice(m)?;
        let content: Value = serde_json::from_slice(c)?;
        let buffers = rest[5..].to_vec();
        Ok(Message { idents, header, parent_header, metadata, content, buffers })
    }

    /// Verify the signature without parsing the JSON frames, returning the identities and the
    /// signed part (delimiter onwards). Routers use this to forward a message unchanged.
    pub fn verify_frames(&self, frames: Vec<Bytes>) -> Result<(Vec<Bytes>, Vec<Bytes>)> {
        let (idents, rest) = split_frames(frames)?;
        if !self.verify(&rest[0], &[&rest[1], &rest[2], &rest[3], &rest[4]]) {
            return Err(Error::BadSignature);
        }
        Ok((idents, rest))
    }
}

/// One JSON frame.
pub fn json_frame<T: serde::Serialize + ?Sized>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("message frames serialize"))
}

/// Split raw frames into identities and `[signature, header, parent, metadata, content, buffers...]`.
fn split_frames(mut frames: Vec<Bytes>) -> Result<(Vec<Bytes>, Vec<Bytes>)> {
    let pos = frames.iter().position(|f| f.as_ref() == DELIMITER).ok_or_else(|| Error::Malformed("no <IDS|MSG> delimiter".into()))?;
    let rest = frames.split_off(pos + 1);
    frames.pop();
    if rest.len() < 5 {
        return Err(Error::Malformed(format!("{} frames after the delimiter, need at least 5", rest.len())));
    }
    Ok((frames, rest))
}

/// Split `[idents.., <IDS|MSG>, signed..]` without verifying anything, for a reader that peeks
/// at a frame (the header's type) before deciding to decode.
pub fn split_at_delimiter(frames: &[Bytes]) -> Option<(&[Bytes], &[Bytes])> {
    let pos = frames.iter().position(|f| f.as_ref() == DELIMITER)?;
    Some((&frames[..pos], &frames[pos + 1..]))
}

/// Rebuild frames from identities and a signed part produced by [`Session::verify_frames`].
pub fn join_frames(idents: Vec<Bytes>, signed: Vec<Bytes>) -> Vec<Bytes> {
    let mut out = idents;
    out.reserve(signed.len() + 1);
    out.push(Bytes::from_static(DELIMITER));
    out.extend(signed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_everything() {
        let s = Session::new(b"secret", "test");
        let (h, frames) = s.msg(
            &[Bytes::from_static(b"id1")],
            "execute_request",
            json!({"code": "1"}),
            None,
            json!({"a": 1}),
            &[Bytes::from_static(b"buf")],
        );
        let m = s.decode(frames).unwrap();
        assert_eq!(m.idents, vec![Bytes::from_static(b"id1")]);
        assert_eq!(m.header, h);
        assert_eq!(m.content["code"], "1");
        assert_eq!(m.metadata["a"], 1);
        assert_eq!(m.buffers, vec![Bytes::from_static(b"buf")]);
        assert_eq!(m.parent_header, json!({}));
    }

    #[test]
    fn signature_matches_python_hmac() {
        // hmac.new(b"key", b"".join([b"{}"]*4), sha256).hexdigest()
        let s = Session::new(b"key", "t");
        let sig = s.sign(&[b"{}", b"{}", b"{}", b"{}"]);
        assert_eq!(sig, "ca767b02c5bc061ed184a9a029e7f93a7f2f7ed4e8fe74120fc1212f0b008fa3");
    }

    #[test]
    fn wrong_key_is_rejected() {
        let a = Session::new(b"one", "t");
        let b = Session::new(b"two", "t");
        let (_, frames) = a.msg(&[], "x", json!({}), None, json!({}), &[]);
        assert!(matches!(b.decode(frames), Err(Error::BadSignature)));
    }

    #[test]
    fn tampered_content_is_rejected() {
        let s = Session::new(b"k", "t");
        let (_, mut frames) = s.msg(&[], "x", json!({"v": 1}), None, json!({}), &[]);
        let last = frames.len() - 1;
        frames[last] = Bytes::from_static(b"{\"v\":2}");
        assert!(matches!(s.decode(frames), Err(Error::BadSignature)));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let s = Session::new(b"k", "t");
        assert!(matches!(s.decode(vec![Bytes::from_static(b"junk")]), Err(Error::Malformed(_))));
        let short = vec![Bytes::from_static(DELIMITER), Bytes::from_static(b"sig")];
        assert!(matches!(s.decode(short), Err(Error::Malformed(_))));
    }

    #[test]
    fn verify_and_join_forward_unchanged() {
        let s = Session::new(b"k", "t");
        let (_, frames) = s.msg(&[Bytes::from_static(b"a")], "x", json!({}), None, json!({}), &[]);
        let (idents, signed) = s.verify_frames(frames.clone()).unwrap();
        assert_eq!(join_frames(idents, signed), frames);
    }
}
