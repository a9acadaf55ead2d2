//! Conversion between multipart frames and `zeromq` messages.

use bytes::Bytes;
use zeromq::ZmqMessage;

/// Frames of a received message.
pub fn frames(msg: ZmqMessage) -> Vec<Bytes> {
    msg.into_vec()
}

/// A message to send. Panics only on an empty frame list, which no caller builds.
pub fn message(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("a message has at least one frame")
}
