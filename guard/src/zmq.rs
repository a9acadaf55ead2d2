//! Conversion between the multipart frames `rpx_protocol::Session` builds and reads and
//! `zeromq` messages: the glue every process that talks over zeromq uses.

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
