//! The streaming ZMTP 3 check: a state machine over the bytes a peer sends, which validates the
//! greeting and every frame header and bounds each frame, each multipart message and each
//! command before a byte of it is passed on. It never allocates and never buffers a body: a
//! body is skipped by counting, so a peer's declared length costs nothing until it sends bytes.

use std::fmt;

use crate::Limits;

/// Bytes in a ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
/// Frames above this size are announced to the caller ([`Step::Reserve`]) before their header
/// is passed on, so it can account for the memory the receiver will set aside for them.
pub const RESERVE_ABOVE: u64 = 64 * 1024;

/// The greeting a ZMTP 3.0 peer with the NULL mechanism sends (tests and probes use it).
pub fn null_greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

const FLAG_MORE: u8 = 0b001;
const FLAG_LONG: u8 = 0b010;
const FLAG_COMMAND: u8 = 0b100;

/// What a peer sent that the guard refuses; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The 64-byte greeting is not ZMTP 3 with the NULL mechanism.
    Greeting(&'static str),
    /// A frame header sets flag bits ZMTP reserves.
    ReservedFlags(u8),
    /// A command frame claims to continue a multipart message.
    CommandWithMore,
    /// A command frame is larger than [`Limits::max_command`].
    CommandTooLarge { len: u64, max: u64 },
    /// A message frame is larger than [`Limits::max_frame`].
    FrameTooLarge { len: u64, max: u64 },
    /// A multipart message adds up to more than [`Limits::max_message`].
    MessageTooLarge { total: u64, max: u64 },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Greeting(why) => write!(f, "bad ZMTP greeting: {why}"),
            Violation::ReservedFlags(flags) => write!(f, "frame flags {flags:#04x} set reserved bits"),
            Violation::CommandWithMore => write!(f, "a command frame has the MORE flag"),
            Violation::CommandTooLarge { len, max } => write!(f, "command frame of {len} bytes exceeds the limit of {max}"),
            Violation::FrameTooLarge { len, max } => write!(f, "frame of {len} bytes exceeds the limit of {max}"),
            Violation::MessageTooLarge { total, max } => write!(f, "message of at least {total} bytes exceeds the limit of {max}"),
        }
    }
}

impl std::error::Error for Violation {}

/// What to do with the bytes given to [`FrameCheck::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Pass on this many bytes (all of the input).
    Forward(usize),
    /// Pass on `forward` bytes, which end with the header of a frame of `len` bytes, once `len`
    /// bytes of receive budget are set aside; call `step` again with the rest.
    Reserve { forward: usize, len: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting { seen: usize },
    Header,
    Length { flags: u8, need: u8, acc: u64 },
    Body { left: u64 },
}

/// The check for one connection's inbound bytes.
#[derive(Debug, Clone)]
pub struct FrameCheck {
    limits: Limits,
    state: State,
    /// Bytes of the current multipart message's frames so far.
    message: u64,
    /// Whether the last message frame continues into another one (a command in between does
    /// not end the message: zeromq keeps collecting it).
    more: bool,
    /// Whether the frame being received was announced by [`Step::Reserve`].
    reserved: bool,
    /// Whether the greeting and the first command (READY) have been received.
    handshaken: bool,
}

impl FrameCheck {
    pub fn new(limits: Limits) -> FrameCheck {
        FrameCheck { limits, state: State::Greeting { seen: 0 }, message: 0, more: false, reserved: false, handshaken: false }
    }

    /// Whether the peer has completed the ZMTP handshake (greeting and READY).
    pub fn handshaken(&self) -> bool {
        self.handshaken
    }

    /// Whether a frame announced by [`Step::Reserve`] is still being received.
    pub fn holds_reservation(&self) -> bool {
        self.reserved
    }

    /// Inspect the next bytes the peer sent. An error means the connection must be closed
    /// without passing anything more on.
    pub fn step(&mut self, data: &[u8]) -> Result<Step, Violation> {
        let mut at = 0;
        while at < data.len() {
            match self.state {
                State::Greeting { seen } => {
                    let take = (GREETING_LEN - seen).min(data.len() - at);
                    for (i, &b) in data[at..at + take].iter().enumerate() {
                        check_greeting_byte(seen + i, b)?;
                    }
                    at += take;
                    self.state = if seen + take == GREETING_LEN { State::Header } else { State::Greeting { seen: seen + take } };
                }
                State::Header => {
                    let flags = data[at];
                    at += 1;
                    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
                        return Err(Violation::ReservedFlags(flags));
                    }
                    if flags & FLAG_COMMAND != 0 && flags & FLAG_MORE != 0 {
                        return Err(Violation::CommandWithMore);
                    }
                    let need = if flags & FLAG_LONG != 0 { 8 } else { 1 };
                    self.state = State::Length { flags, need, acc: 0 };
                }
                State::Length { flags, need, acc } => {
                    let acc = (acc << 8) | u64::from(data[at]);
                    at += 1;
                    if need > 1 {
                        self.state = State::Length { flags, need: need - 1, acc };
                        continue;
                    }
                    let len = acc;
                    self.admit(flags, len)?;
                    self.state = State::Body { left: len };
                    if len > RESERVE_ABOVE {
                        self.reserved = true;
                        return Ok(Step::Reserve { forward: at, len });
                    }
                    self.end_body_if_done();
                }
                State::Body { left } => {
                    let take = left.min((data.len() - at) as u64);
                    at += take as usize;
                    self.state = State::Body { left: left - take };
                    self.end_body_if_done();
                }
            }
        }
        Ok(Step::Forward(data.len()))
    }

    /// Check a frame's declared length against the limits, and count it into its message.
    fn admit(&mut self, flags: u8, len: u64) -> Result<(), Violation> {
        if flags & FLAG_COMMAND != 0 {
            if len > self.limits.max_command {
                return Err(Violation::CommandTooLarge { len, max: self.limits.max_command });
            }
            return Ok(());
        }
        if len > self.limits.max_frame {
            return Err(Violation::FrameTooLarge { len, max: self.limits.max_frame });
        }
        let total = self.message.saturating_add(len);
        if total > self.limits.max_message {
            return Err(Violation::MessageTooLarge { total, max: self.limits.max_message });
        }
        self.message = total;
        self.more = flags & FLAG_MORE != 0;
        Ok(())
    }

    fn end_body_if_done(&mut self) {
        if self.state == (State::Body { left: 0 }) {
            self.state = State::Header;
            self.reserved = false;
            self.handshaken = true;
            if !self.more {
                self.message = 0;
            }
        }
    }
}

/// Check one greeting byte: signature, major version 3, the NULL mechanism.
fn check_greeting_byte(i: usize, b: u8) -> Result<(), Violation> {
    const NULL: &[u8] = b"NULL";
    match i {
        0 if b != 0xff => Err(Violation::Greeting("the signature does not start with 0xff")),
        9 if b & 1 != 1 => Err(Violation::Greeting("the signature does not end with 0x7f")),
        10 if b != 3 => Err(Violation::Greeting("not ZMTP version 3")),
        12..=15 if b != NULL[i - 12] => Err(Violation::Greeting("the mechanism is not NULL")),
        16..=31 if b != 0 => Err(Violation::Greeting("the mechanism is not NULL")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_frame: 1000, max_message: 1500, max_command: 100, ..Limits::default() }
    }

    fn greeting() -> Vec<u8> {
        null_greeting().to_vec()
    }

    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        if body.len() > 255 {
            f.push(flags | FLAG_LONG);
            f.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            f.push(flags);
            f.push(body.len() as u8);
        }
        f.extend_from_slice(body);
        f
    }

    /// Feed everything, honouring reservations; returns the bytes forwarded and the lengths
    /// reserved.
    fn feed(check: &mut FrameCheck, data: &[u8]) -> Result<(usize, Vec<u64>), Violation> {
        let (mut at, mut reserved) = (0, Vec::new());
        while at < data.len() {
            match check.step(&data[at..])? {
                Step::Forward(n) => at += n,
                Step::Reserve { forward, len } => {
                    at += forward;
                    reserved.push(len);
                }
            }
        }
        Ok((at, reserved))
    }

    #[test]
    fn a_valid_session_passes_byte_by_byte_and_whole() {
        let mut bytes = greeting();
        bytes.extend(frame(FLAG_COMMAND, b"\x05READY"));
        bytes.extend(frame(FLAG_MORE, b"identity"));
        bytes.extend(frame(0, &[7u8; 900]));
        let mut whole = FrameCheck::new(limits());
        assert_eq!(feed(&mut whole, &bytes).unwrap().0, bytes.len());
        assert!(whole.handshaken());
        let mut single = FrameCheck::new(limits());
        for b in &bytes {
            assert_eq!(single.step(std::slice::from_ref(b)).unwrap(), Step::Forward(1));
        }
    }

    #[test]
    fn the_forged_header_of_the_report_is_refused_before_its_body() {
        // One frame header declaring 2^62 bytes right after the greeting.
        let mut bytes = greeting();
        bytes.push(FLAG_LONG);
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        let err = feed(&mut FrameCheck::new(Limits::default()), &bytes).unwrap_err();
        assert_eq!(err, Violation::FrameTooLarge { len: 1 << 62, max: Limits::default().max_frame });
    }

    #[test]
    fn frames_commands_and_messages_are_bounded() {
        let mut c = FrameCheck::new(limits());
        assert!(matches!(feed(&mut c, &[greeting(), frame(0, &[0; 1001])].concat()), Err(Violation::FrameTooLarge { len: 1001, max: 1000 })));
        let mut c = FrameCheck::new(limits());
        let two = [greeting(), frame(FLAG_MORE, &[0; 1000]), frame(0, &[0; 501])].concat();
        assert!(matches!(feed(&mut c, &two), Err(Violation::MessageTooLarge { total: 1501, max: 1500 })));
        let mut c = FrameCheck::new(limits());
        assert!(matches!(feed(&mut c, &[greeting(), frame(FLAG_COMMAND, &[0; 101])].concat()), Err(Violation::CommandTooLarge { .. })));
        let mut c = FrameCheck::new(limits());
        assert_eq!(feed(&mut c, &[greeting(), frame(FLAG_COMMAND | FLAG_MORE, b"x")].concat()), Err(Violation::CommandWithMore));
        let mut c = FrameCheck::new(limits());
        assert_eq!(feed(&mut c, &[greeting(), vec![0x08, 0]].concat()), Err(Violation::ReservedFlags(0x08)));
    }

    #[test]
    fn message_totals_reset_between_messages() {
        // Two messages of 1000 bytes each: each is under the 1500-byte message limit.
        let bytes = [greeting(), frame(0, &[0; 1000]), frame(0, &[0; 1000])].concat();
        assert!(feed(&mut FrameCheck::new(limits()), &bytes).is_ok());
    }

    #[test]
    fn bad_greetings_are_refused_at_the_first_wrong_byte() {
        for (at, value) in [(0, 0x00), (9, 0x00), (10, 2), (12, b'C'), (20, b'x')] {
            let mut g = greeting();
            g[at] = value;
            let mut c = FrameCheck::new(limits());
            assert!(c.step(&g[..at]).is_ok(), "bytes before {at} are fine");
            assert!(matches!(c.step(&g[at..]), Err(Violation::Greeting(_))), "byte {at}");
        }
    }

    #[test]
    fn large_frames_are_announced_at_their_header_and_released_at_their_end() {
        let big = vec![1u8; (RESERVE_ABOVE + 1) as usize];
        let l = Limits { max_frame: 1 << 20, max_message: 1 << 20, ..Limits::default() };
        let bytes = [greeting(), frame(0, &big), frame(0, b"next")].concat();
        let mut c = FrameCheck::new(l);
        let header_end = GREETING_LEN + 9;
        assert_eq!(c.step(&bytes).unwrap(), Step::Reserve { forward: header_end, len: RESERVE_ABOVE + 1 });
        assert!(c.holds_reservation());
        assert_eq!(c.step(&bytes[header_end..header_end + 10]).unwrap(), Step::Forward(10));
        assert!(c.holds_reservation());
        assert_eq!(c.step(&bytes[header_end + 10..]).unwrap(), Step::Forward(bytes.len() - header_end - 10));
        assert!(!c.holds_reservation());
    }
}
