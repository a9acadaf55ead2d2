//! The streaming ZMTP 3 check: a state machine over the bytes a peer sends, which validates the
//! greeting and every frame header and bounds each frame, each multipart message and each
//! command before a byte of it is passed on. It never allocates and never buffers a body: a
//! body is skipped by counting, so a peer's declared length costs nothing until it sends bytes.
//! The one exception is the peer's READY command (the first frame after the greeting), whose
//! properties are read as they stream by so that the `Identity` the peer presents is known
//! ([`FrameCheck::identity`]) before the end of the command is passed on; the identity is kept
//! in a bounded inline buffer.

use std::fmt;

use crate::Limits;

/// Bytes in a ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
/// Frames above this size are announced to the caller ([`Step::Reserve`]) before their header
/// is passed on, so it can account for the memory the receiver will set aside for them.
pub const RESERVE_ABOVE: u64 = 64 * 1024;

/// Longest identity ZMTP allows (and zeromq accepts).
pub const MAX_IDENTITY: usize = 255;

/// The greeting a ZMTP 3.0 peer with the NULL mechanism sends (tests and probes use it).
pub fn null_greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// The READY command a ZMTP 3 peer of `socket_type` presenting `identity` sends after its
/// greeting (tests and probes use it).
pub fn ready_command(socket_type: &[u8], identity: &[u8]) -> Vec<u8> {
    let mut body = b"\x05READY".to_vec();
    for (name, value) in [(&b"Socket-Type"[..], socket_type), (b"Identity", identity)] {
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    let header = match u8::try_from(body.len()) {
        Ok(short) => vec![FLAG_COMMAND, short],
        Err(_) => [vec![FLAG_COMMAND | FLAG_LONG], (body.len() as u64).to_be_bytes().to_vec()].concat(),
    };
    [header, body].concat()
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
    /// The READY command's properties do not add up to its length, or its identity is longer
    /// than [`MAX_IDENTITY`].
    Ready(&'static str),
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
            Violation::Ready(why) => write!(f, "malformed READY command: {why}"),
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

/// Where the reading of the peer's READY command stands. Only the first frame after the greeting
/// is read, as zeromq does: a handshake whose first frame is not a READY command fails in
/// zeromq, and the peer never gets an identity there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadyParse {
    /// The first frame has not started.
    First,
    /// The command name's length byte.
    NameLen,
    /// The command name, `at` bytes of `len` read, all matching `READY` so far.
    Name { len: u8, at: u8 },
    /// The length byte of the next property's name (the command may also end here).
    PropNameLen,
    /// A property name, `at` bytes of `len` read; `identity`: matching `Identity` so far.
    PropName { len: u8, at: u8, identity: bool },
    /// The 4-byte big-endian length of a property value.
    ValueLen { identity: bool, need: u8, acc: u32 },
    /// A property value, `left` bytes to go; an identity's bytes are kept.
    Value { identity: bool, left: u32 },
    /// The READY command was received whole: [`FrameCheck::identity`] is known.
    Done,
    /// The first frame is not a READY command: zeromq refuses the handshake itself.
    NotReady,
}

const READY: &[u8] = b"READY";
const IDENTITY: &[u8] = b"Identity";

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
    ready: ReadyParse,
    /// The identity the READY command presents (the last `Identity` property, as zeromq reads
    /// it), `identity_len` bytes of it.
    identity: [u8; MAX_IDENTITY],
    identity_len: u8,
}

impl FrameCheck {
    pub fn new(limits: Limits) -> FrameCheck {
        FrameCheck {
            limits,
            state: State::Greeting { seen: 0 },
            message: 0,
            more: false,
            reserved: false,
            handshaken: false,
            ready: ReadyParse::First,
            identity: [0; MAX_IDENTITY],
            identity_len: 0,
        }
    }

    /// The identity the peer presented in its READY command, once that command has been
    /// received whole (before then, and forever if the first frame is not a READY command:
    /// `None`). Empty when the peer presented none or an empty one; zeromq then gives the
    /// connection a random identity.
    ///
    /// The last bytes of the READY command are in the input of the [`FrameCheck::step`] call
    /// after which this first returns `Some`, so a caller that looks after every step decides
    /// on the identity before zeromq has the whole command.
    pub fn identity(&self) -> Option<&[u8]> {
        (self.ready == ReadyParse::Done).then(|| &self.identity[..usize::from(self.identity_len)])
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
                    if self.ready == ReadyParse::First {
                        self.ready = if flags & FLAG_COMMAND != 0 { ReadyParse::NameLen } else { ReadyParse::NotReady };
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
                    self.end_body_if_done()?;
                }
                State::Body { left } => {
                    let take = left.min((data.len() - at) as u64);
                    if self.reading_ready() {
                        for &b in &data[at..at + take as usize] {
                            self.ready_byte(b)?;
                        }
                    }
                    at += take as usize;
                    self.state = State::Body { left: left - take };
                    self.end_body_if_done()?;
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

    fn end_body_if_done(&mut self) -> Result<(), Violation> {
        if self.state == (State::Body { left: 0 }) {
            self.state = State::Header;
            self.reserved = false;
            self.handshaken = true;
            if !self.more {
                self.message = 0;
            }
            self.end_ready()?;
        }
        Ok(())
    }

    /// Whether the body being received is the READY command, still being read.
    fn reading_ready(&self) -> bool {
        !matches!(self.ready, ReadyParse::First | ReadyParse::Done | ReadyParse::NotReady)
    }

    /// Read one byte of the first command's body.
    fn ready_byte(&mut self, b: u8) -> Result<(), Violation> {
        self.ready = match self.ready {
            ReadyParse::NameLen if usize::from(b) == READY.len() => ReadyParse::Name { len: b, at: 0 },
            ReadyParse::NameLen => ReadyParse::NotReady,
            ReadyParse::Name { len, at } if READY[usize::from(at)] == b => {
                if at + 1 == len {
                    ReadyParse::PropNameLen
                } else {
                    ReadyParse::Name { len, at: at + 1 }
                }
            }
            ReadyParse::Name { .. } => ReadyParse::NotReady,
            ReadyParse::PropNameLen if b == 0 => ReadyParse::ValueLen { identity: false, need: 4, acc: 0 },
            ReadyParse::PropNameLen => ReadyParse::PropName { len: b, at: 0, identity: usize::from(b) == IDENTITY.len() },
            ReadyParse::PropName { len, at, identity } => {
                let identity = identity && IDENTITY[usize::from(at)] == b;
                if at + 1 == len {
                    ReadyParse::ValueLen { identity, need: 4, acc: 0 }
                } else {
                    ReadyParse::PropName { len, at: at + 1, identity }
                }
            }
            ReadyParse::ValueLen { identity, need, acc } => {
                let acc = (acc << 8) | u32::from(b);
                if need > 1 {
                    ReadyParse::ValueLen { identity, need: need - 1, acc }
                } else {
                    if identity {
                        if acc as usize > MAX_IDENTITY {
                            return Err(Violation::Ready("the identity is longer than 255 bytes"));
                        }
                        // The last Identity property counts, as in zeromq.
                        self.identity_len = 0;
                    }
                    if acc == 0 {
                        ReadyParse::PropNameLen
                    } else {
                        ReadyParse::Value { identity, left: acc }
                    }
                }
            }
            ReadyParse::Value { identity, left } => {
                if identity {
                    self.identity[usize::from(self.identity_len)] = b;
                    self.identity_len += 1;
                }
                if left == 1 {
                    ReadyParse::PropNameLen
                } else {
                    ReadyParse::Value { identity, left: left - 1 }
                }
            }
            done @ (ReadyParse::First | ReadyParse::Done | ReadyParse::NotReady) => done,
        };
        Ok(())
    }

    /// The first frame ended: a READY command must end on a property boundary.
    fn end_ready(&mut self) -> Result<(), Violation> {
        self.ready = match self.ready {
            ReadyParse::PropNameLen => ReadyParse::Done,
            ReadyParse::PropName { .. } | ReadyParse::ValueLen { .. } | ReadyParse::Value { .. } => {
                return Err(Violation::Ready("a property runs past the end of the command"));
            }
            // An empty command or a short name: not a READY command.
            ReadyParse::NameLen | ReadyParse::Name { .. } => ReadyParse::NotReady,
            other => other,
        };
        Ok(())
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
        assert!(matches!(
            feed(&mut c, &[greeting(), frame(0, &[0; 1001])].concat()),
            Err(Violation::FrameTooLarge { len: 1001, max: 1000 })
        ));
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

    /// A READY command body with these properties, as zeromq writes it.
    fn ready(props: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut body = b"\x05READY".to_vec();
        for (name, value) in props {
            body.push(name.len() as u8);
            body.extend_from_slice(name);
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        body
    }

    fn session_with(ready_body: &[u8]) -> Vec<u8> {
        [greeting(), frame(FLAG_COMMAND, ready_body), frame(0, b"after")].concat()
    }

    /// Feed `bytes` cut at `cut`; returns the identity as soon as it is known, with the number
    /// of bytes handed to `step` by then.
    fn identity_split_at(bytes: &[u8], cut: usize) -> Result<(Option<Vec<u8>>, usize), Violation> {
        let mut c = FrameCheck::new(limits());
        let mut given = 0;
        for part in [&bytes[..cut], &bytes[cut..]] {
            feed(&mut c, part)?;
            given += part.len();
            if let Some(id) = c.identity() {
                return Ok((Some(id.to_vec()), given));
            }
        }
        Ok((None, given))
    }

    #[test]
    fn the_identity_is_read_from_ready_split_at_every_byte() {
        let body = ready(&[(b"Socket-Type", b"DEALER"), (b"Identity", b"engine-uuid-1234")]);
        let bytes = session_with(&body);
        let ready_end = GREETING_LEN + 2 + body.len();
        for cut in 0..=bytes.len() {
            let (id, given) = identity_split_at(&bytes, cut).unwrap();
            assert_eq!(id.as_deref(), Some(&b"engine-uuid-1234"[..]), "cut at {cut}");
            // Known in the step that received the READY command's last byte.
            assert_eq!(given, if cut >= ready_end { cut } else { bytes.len() }, "cut at {cut}");
        }
        let mut single = FrameCheck::new(limits());
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(single.identity().is_some(), i >= ready_end, "byte {i}");
            single.step(std::slice::from_ref(b)).unwrap();
        }
    }

    #[test]
    fn an_empty_or_absent_identity_is_empty_and_the_last_one_counts() {
        let empty = session_with(&ready(&[(b"Socket-Type", b"ROUTER"), (b"Identity", b"")]));
        let absent = session_with(&ready(&[(b"Socket-Type", b"ROUTER")]));
        let bare = session_with(&ready(&[]));
        let other_case = session_with(&ready(&[(b"identity", b"x")]));
        let empty_name = session_with(&ready(&[(b"", b"v"), (b"Identity", b"y")]));
        let twice = session_with(&ready(&[(b"Identity", b"first"), (b"Identity", b"second")]));
        let longest = session_with(&ready(&[(b"Identity", &[9u8; MAX_IDENTITY])]));
        for (bytes, want) in [
            (&empty, &b""[..]),
            (&absent, b""),
            (&bare, b""),
            (&other_case, b""),
            (&empty_name, b"y"),
            (&twice, b"second"),
            (&longest, &[9u8; MAX_IDENTITY]),
        ] {
            let mut c = FrameCheck::new(Limits { max_command: 1000, ..limits() });
            feed(&mut c, bytes).unwrap();
            assert_eq!(c.identity(), Some(want));
        }
    }

    #[test]
    fn ready_command_short_and_long_is_read_back() {
        for id in [&b"e"[..], &[7u8; MAX_IDENTITY]] {
            let bytes = [null_greeting().to_vec(), ready_command(b"DEALER", id)].concat();
            let mut c = FrameCheck::new(Limits { max_command: 1000, ..limits() });
            feed(&mut c, &bytes).unwrap();
            assert_eq!(c.identity(), Some(id));
        }
    }

    #[test]
    fn a_first_frame_that_is_not_ready_gives_no_identity() {
        for first in [
            frame(0, b"\x05READY"),
            frame(FLAG_COMMAND, b"\x04PING"),
            frame(FLAG_COMMAND, b""),
            frame(FLAG_COMMAND, b"\x05REA"),
            frame(FLAG_COMMAND, b"\x05READX\x08Identity"),
        ] {
            let mut c = FrameCheck::new(limits());
            feed(&mut c, &[greeting(), first.clone(), frame(FLAG_COMMAND, &ready(&[(b"Identity", b"late")]))].concat()).unwrap();
            assert_eq!(c.identity(), None, "{first:?}");
        }
    }

    #[test]
    fn malformed_ready_properties_are_violations() {
        let mut long_name = b"\x05READY\x09Identity".to_vec();
        long_name.extend_from_slice(&[0; 4]);
        let long_value = b"\x05READY\x08Identity\x00\x00\x00\x05abc".to_vec();
        let cut_length = b"\x05READY\x08Identity\x00\x00".to_vec();
        let no_length = b"\x05READY\x08Identity".to_vec();
        let mut too_long = b"\x05READY\x08Identity\x00\x00\x01\x00".to_vec();
        too_long.extend_from_slice(&[1; 256]);
        for body in [long_name, long_value, cut_length, no_length] {
            let mut c = FrameCheck::new(limits());
            assert!(matches!(feed(&mut c, &session_with(&body)), Err(Violation::Ready(_))), "{body:?}");
        }
        let mut c = FrameCheck::new(Limits { max_command: 1000, ..limits() });
        let bytes = session_with(&too_long);
        // Refused at the value's length, before any byte of the identity.
        let at = GREETING_LEN + 3 + 6 + 9 + 4;
        assert!(c.step(&bytes[..at - 1]).is_ok());
        assert_eq!(c.step(&bytes[at - 1..]), Err(Violation::Ready("the identity is longer than 255 bytes")));
    }
}
