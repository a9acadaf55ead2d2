//! Parsing what the worker writes: its stdout stream into user text and evcxr's markers and
//! content blocks, and the stderr tail into a panic message.
//!
//! Pure code, no I/O: the supervisor feeds it raw chunks as they are read from the pipes.

use std::collections::VecDeque;

use rpx_worker::markers::{
    BEGIN_CONTENT, CALL_END, END_CONTENT, ERROR_OCCURRED, EXECUTION_COMPLETE, INPUT_REQUEST, INTERRUPTED, PANIC_NOTIFICATION,
    VARIABLE_CHANGED_TYPE,
};

/// One thing recognised in the worker's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdoutEvent {
    /// User output: whole lines, each ending in `\n` (a final partial line at EOF has none).
    /// Consecutive user lines from one chunk are coalesced into one event.
    Text(String),
    Panic,
    /// The worker's [`INTERRUPTED`] marker.
    Interrupted,
    ErrorOccurred,
    ChangedType(String),
    /// A complete `EVCXR_BEGIN_CONTENT <mime>` ... `EVCXR_END_CONTENT` block; lines joined by `\n`.
    Content {
        mime: String,
        data: String,
    },
    /// The cell asks for input; `password` for the password variant.
    InputRequest {
        prompt: String,
        password: bool,
    },
    Complete,
    /// The worker's [`CALL_END`] marker.
    CallEnd,
}

/// Incremental parser for the worker's stdout. Keeps a partial line and an open content block
/// between chunks.
#[derive(Debug, Default)]
pub struct StdoutParser {
    partial: Vec<u8>,
    content: Option<(String, String)>,
}

impl StdoutParser {
    pub fn new() -> StdoutParser {
        StdoutParser::default()
    }

    /// Feed a chunk as read from the pipe; returns the events of the complete lines in it.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<StdoutEvent> {
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.partial.is_empty() {
                let text = String::from_utf8_lossy(line).into_owned();
                self.line(text, &mut out);
            } else {
                self.partial.extend_from_slice(line);
                let text = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
                self.line(text, &mut out);
            }
        }
        self.partial.extend_from_slice(rest);
        out
    }

    /// True when a partial line or an open content block is buffered.
    pub fn has_pending(&self) -> bool {
        !self.partial.is_empty() || self.content.is_some()
    }

    /// User text of an unterminated line (a `print!` followed by a flush), so that it can be
    /// shown before its newline arrives. Keeps back anything that could be the start of a
    /// marker, and an incomplete UTF-8 sequence.
    pub fn take_partial_text(&mut self) -> Option<String> {
        if self.content.is_some() || self.partial.is_empty() {
            return None;
        }
        let p = &self.partial;
        let end = [&b"EVCXR_"[..], b"RPX_"].into_iter().map(|mark| held_from(p, mark)).min().unwrap_or(p.len());
        let end = match std::str::from_utf8(&p[..end]) {
            Ok(_) => end,
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => end, // invalid bytes: passed on lossily
        };
        if end == 0 {
            return None;
        }
        let text = String::from_utf8_lossy(&p[..end]).into_owned();
        self.partial.drain(..end);
        Some(text)
    }

    /// The worker's pipe was read to the end of a call's output and no marker follows it: the
    /// partial line (if any) is that output's last text, whatever it looks like (a possible
    /// start of a marker included). An open content block is kept (closures print none).
    pub fn take_call_tail(&mut self) -> Option<String> {
        if self.content.is_some() || self.partial.is_empty() {
            return None;
        }
        Some(String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned())
    }

    /// End of stream: the partial line (if any) becomes user text without a newline; an
    /// unterminated content block is returned as user text too, so nothing is lost.
    pub fn finish(&mut self) -> Vec<StdoutEvent> {
        let mut out = Vec::new();
        if let Some((mime, data)) = self.content.take() {
            let mut text = format!("{BEGIN_CONTENT}{mime}\n");
            if !data.is_empty() {
                text.push_str(&data);
                text.push('\n');
            }
            push_text(&mut out, &text);
        }
        if !self.partial.is_empty() {
            let text = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            push_text(&mut out, &text);
        }
        out
    }

    fn line(&mut self, line: String, out: &mut Vec<StdoutEvent>) {
        if let Some((mime, mut data)) = self.content.take() {
            if line == END_CONTENT {
                out.push(StdoutEvent::Content { mime, data });
            } else if line == PANIC_NOTIFICATION {
                // evcxr closes the block on a panic and keeps what it had.
                out.push(StdoutEvent::Content { mime, data });
                out.push(StdoutEvent::Panic);
            } else {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(&line);
                self.content = Some((mime, data));
            }
            return;
        }
        // Markers are whole lines; user output that lacked a final newline may sit in front of
        // a marker printed by the wrapper (same stdout buffer), so accept a prefix and pass it
        // on as user text.
        for (marker, event) in [
            (EXECUTION_COMPLETE, StdoutEvent::Complete),
            (PANIC_NOTIFICATION, StdoutEvent::Panic),
            (INTERRUPTED, StdoutEvent::Interrupted),
            (CALL_END, StdoutEvent::CallEnd),
            (ERROR_OCCURRED, StdoutEvent::ErrorOccurred),
        ] {
            if let Some(prefix) = line.strip_suffix(marker) {
                push_text(out, prefix);
                out.push(event);
                return;
            }
        }
        if let Some(pos) = line.find(VARIABLE_CHANGED_TYPE) {
            push_text(out, &line[..pos]);
            out.push(StdoutEvent::ChangedType(line[pos + VARIABLE_CHANGED_TYPE.len()..].to_string()));
            return;
        }
        if let Some(pos) = line.find(BEGIN_CONTENT) {
            let mime = line[pos + BEGIN_CONTENT.len()..].split(' ').next().unwrap_or("").to_string();
            if !mime.is_empty() {
                push_text(out, &line[..pos]);
                self.content = Some((mime, String::new()));
                return;
            }
        }
        if let Some(rest) = line.strip_prefix(INPUT_REQUEST) {
            let (password, rest) = match rest.strip_prefix("_PASSWORD") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if let Some(prompt) = rest.strip_prefix(':') {
                out.push(StdoutEvent::InputRequest { prompt: prompt.to_string(), password });
                return;
            }
        }
        let mut text = line;
        text.push('\n');
        push_text(out, &text);
    }
}

/// Append user text, merging with a preceding text event.
fn push_text(out: &mut Vec<StdoutEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(StdoutEvent::Text(prev)) = out.last_mut() {
        prev.push_str(text);
    } else {
        out.push(StdoutEvent::Text(text.to_string()));
    }
}

/// The last lines the worker wrote on stderr, to explain a panic or a death.
#[derive(Debug)]
pub struct StderrTail {
    lines: VecDeque<String>,
    partial: String,
    cap: usize,
    /// The last panic report (header and message lines), kept apart from the tail so that a
    /// long backtrace (`RUST_BACKTRACE=1`) cannot push it out.
    panic: Vec<String>,
    in_panic: bool,
}

impl StderrTail {
    pub fn new(cap: usize) -> StderrTail {
        StderrTail { lines: VecDeque::with_capacity(cap), partial: String::new(), cap, panic: Vec::new(), in_panic: false }
    }

    pub fn feed(&mut self, chunk: &str) {
        let mut rest = chunk;
        while let Some(pos) = rest.find('\n') {
            self.partial.push_str(&rest[..pos]);
            let line = std::mem::take(&mut self.partial);
            if is_panic_header(&line) {
                self.panic = vec![line.clone()];
                self.in_panic = true;
            } else if self.in_panic {
                if is_panic_end(&line) || self.panic.len() >= 4 * self.cap {
                    self.in_panic = false;
                } else {
                    self.panic.push(line.clone());
                }
            }
            if self.lines.len() == self.cap {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
            rest = &rest[pos + 1..];
        }
        self.partial.push_str(rest);
    }

    pub fn clear(&mut self) {
        self.lines.clear();
        self.partial.clear();
        self.panic.clear();
        self.in_panic = false;
    }

    /// Lines to search for a panic: the last panic report if one was seen, else the tail.
    pub fn panic_lines(&self) -> Vec<String> {
        if self.panic.is_empty() {
            self.lines()
        } else {
            self.panic.clone()
        }
    }

    /// The kept lines, including a trailing partial line.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            v.push(self.partial.clone());
        }
        v
    }
}

/// A panic found in stderr lines: the message and the lines from the `panicked at` line on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanicInfo {
    pub message: String,
    pub location: String,
    pub lines: Vec<String>,
}

const PANICKED_AT: &str = " panicked at ";

fn is_panic_header(line: &str) -> bool {
    line.starts_with("thread '") && line.contains(PANICKED_AT)
}

fn is_panic_end(line: &str) -> bool {
    line.starts_with("note: ") || line.starts_with("stack backtrace:") || line.starts_with(PANIC_NOTIFICATION)
}

/// Find the last panic report in `lines`.
///
/// Current Rust prints `thread '<name>' (<tid>) panicked at <file>:<line>:<col>:` (the thread
/// id since 1.9x; earlier without it) followed by the
/// message lines and a `note: run with RUST_BACKTRACE=1 ...` line; older releases printed
/// `thread '<name>' panicked at '<msg>', <file>:<line>:<col>` on one line.
pub fn find_panic(lines: &[String]) -> Option<PanicInfo> {
    let start = lines.iter().rposition(|l| is_panic_header(l))?;
    let head = &lines[start];
    let after = &head[head.find(PANICKED_AT).unwrap() + PANICKED_AT.len()..];
    let mut message_lines = Vec::new();
    for l in &lines[start + 1..] {
        if is_panic_end(l) {
            break;
        }
        message_lines.push(l.clone());
    }
    let (message, location) = if let Some(loc) = after.strip_suffix(':') {
        (message_lines.join("\n"), loc.to_string())
    } else if let Some((msg, loc)) = after.rsplit_once("', ") {
        // Old one-line format.
        (msg.trim_start_matches('\'').to_string(), loc.to_string())
    } else {
        (message_lines.join("\n"), after.to_string())
    };
    let end = lines[start..].iter().position(|l| l.starts_with("note: ")).map_or(lines.len(), |p| start + p);
    Some(PanicInfo { message, location, lines: lines[start..end].to_vec() })
}

/// Where the text that may belong to a marker starting with `mark` begins in `p`: the first
/// `mark`, else a trailing prefix of it ("EV", "EVCX", ...), else the end.
fn held_from(p: &[u8], mark: &[u8]) -> usize {
    if let Some(at) = p.windows(mark.len()).position(|w| w == mark) {
        return at;
    }
    (1..mark.len()).rev().find(|&k| p.len() >= k && p[p.len() - k..] == mark[..k]).map_or(p.len(), |k| p.len() - k)
}

/// One piece of the worker's stderr: user text, or the end of a call's output ([`CALL_END`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrPiece {
    Text(String),
    CallEnd,
}

/// Finds [`CALL_END`] lines in the worker's stderr, which is otherwise passed on as it comes:
/// only a trailing prefix of the marker is held back until the next chunk (or [`Self::take_held`]).
#[derive(Debug, Default)]
pub struct StderrMarks {
    held: String,
}

impl StderrMarks {
    pub fn feed(&mut self, chunk: &str) -> Vec<StderrPiece> {
        let mark = format!("{CALL_END}\n");
        let mut text = std::mem::take(&mut self.held);
        text.push_str(chunk);
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(&mark) {
            if at > 0 {
                out.push(StderrPiece::Text(rest[..at].to_string()));
            }
            out.push(StderrPiece::CallEnd);
            rest = &rest[at + mark.len()..];
        }
        let keep = held_from(rest.as_bytes(), mark.as_bytes());
        if keep > 0 {
            out.push(StderrPiece::Text(rest[..keep].to_string()));
        }
        self.held = rest[keep..].to_string();
        out
    }

    /// Text held back as a possible start of the marker (for a periodic flush, or at the end).
    pub fn take_held(&mut self) -> Option<String> {
        (!self.held.is_empty()).then(|| std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StdoutEvent::*;

    fn text(s: &str) -> StdoutEvent {
        Text(s.to_string())
    }

    #[test]
    fn user_lines_are_coalesced_and_markers_split_them() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"a\nb\nEVCXR_ERROR_OCCURRED\nc\nEVCXR_EXECUTION_COMPLETE\n");
        assert_eq!(ev, vec![text("a\nb\n"), ErrorOccurred, text("c\n"), Complete]);
        assert!(!p.has_pending());
    }

    #[test]
    fn interrupted_marker_after_the_panic_notification() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"working\nEVCXR_PANIC_NOTIFICATION\npartialRPX_INTERRUPTED\nEVCXR_EXECUTION_COMPLETE\n");
        assert_eq!(ev, vec![text("working\n"), Panic, text("partial"), Interrupted, Complete]);
    }

    #[test]
    fn lines_split_across_reads() {
        let mut p = StdoutParser::new();
        assert_eq!(p.feed(b"hel"), vec![]);
        assert!(p.has_pending());
        assert_eq!(p.feed(b"lo\nEVCXR_EXEC"), vec![text("hello\n")]);
        assert_eq!(p.feed(b"UTION_COMPLETE\n"), vec![Complete]);
    }

    #[test]
    fn content_block_split_across_reads_last_wins_elsewhere() {
        let mut p = StdoutParser::new();
        let mut ev = p.feed(b"x\nEVCXR_BEGIN_CONTENT text/plain\n4");
        ev.extend(p.feed(b"2\nsecond line\nEVCXR_END_"));
        ev.extend(p.feed(b"CONTENT\nEVCXR_EXECUTION_COMPLETE\n"));
        assert_eq!(ev, vec![text("x\n"), Content { mime: "text/plain".into(), data: "42\nsecond line".into() }, Complete]);
    }

    #[test]
    fn marker_like_lines_inside_content_are_data() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"EVCXR_BEGIN_CONTENT text/html\nEVCXR_ERROR_OCCURRED\nEVCXR_END_CONTENT\n");
        assert_eq!(ev, vec![Content { mime: "text/html".into(), data: "EVCXR_ERROR_OCCURRED".into() }]);
    }

    #[test]
    fn panic_closes_an_open_content_block() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"EVCXR_BEGIN_CONTENT text/plain\npart\nEVCXR_PANIC_NOTIFICATION\nEVCXR_EXECUTION_COMPLETE\n");
        assert_eq!(ev, vec![Content { mime: "text/plain".into(), data: "part".into() }, Panic, Complete]);
    }

    #[test]
    fn changed_types_and_input_requests() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"EVCXR_VARIABLE_CHANGED_TYPE:q\nEVCXR_INPUT_REQUEST:name?\nEVCXR_INPUT_REQUEST_PASSWORD:pw\n");
        assert_eq!(
            ev,
            vec![
                ChangedType("q".into()),
                InputRequest { prompt: "name?".into(), password: false },
                InputRequest { prompt: "pw".into(), password: true }
            ]
        );
    }

    #[test]
    fn unterminated_user_text_before_a_marker_is_kept() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"no newlineEVCXR_PANIC_NOTIFICATION\nEVCXR_EXECUTION_COMPLETE\n");
        assert_eq!(ev, vec![text("no newline"), Panic, Complete]);
    }

    #[test]
    fn final_partial_line_and_open_block_at_eof() {
        let mut p = StdoutParser::new();
        assert_eq!(p.feed(b"done\nlast"), vec![text("done\n")]);
        assert_eq!(p.finish(), vec![text("last")]);
        assert!(!p.has_pending());
        assert_eq!(p.feed(b"EVCXR_BEGIN_CONTENT text/plain\nabc\n"), vec![]);
        assert_eq!(p.finish(), vec![text("EVCXR_BEGIN_CONTENT text/plain\nabc\n")]);
    }

    #[test]
    fn partial_text_is_released_but_not_marker_starts() {
        let mut p = StdoutParser::new();
        assert_eq!(p.feed(b"progress 1.."), vec![]);
        assert_eq!(p.take_partial_text().as_deref(), Some("progress 1.."));
        assert_eq!(p.take_partial_text(), None);
        assert_eq!(p.feed(b"2..EVCX"), vec![]);
        assert_eq!(p.take_partial_text().as_deref(), Some("2.."));
        assert_eq!(p.feed(b"R_PANIC_NOTIFICATION\n"), vec![Panic]);
        // An incomplete UTF-8 sequence waits for its last byte.
        assert_eq!(p.feed(&[b'a', 0xc3]), vec![]);
        assert_eq!(p.take_partial_text().as_deref(), Some("a"));
        assert_eq!(p.feed(&[0xa9, b'\n']), vec![text("\u{e9}\n")]);
        // Nothing is released from inside a content block.
        p.feed(b"EVCXR_BEGIN_CONTENT text/plain\nabc");
        assert_eq!(p.take_partial_text(), None);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let mut p = StdoutParser::new();
        assert_eq!(p.feed(b"a\xffb\n"), vec![text("a\u{fffd}b\n")]);
    }

    #[test]
    fn stderr_tail_keeps_last_lines() {
        let mut t = StderrTail::new(3);
        t.feed("1\n2\n3");
        t.feed("x\n4\n5");
        assert_eq!(t.lines(), vec!["2", "3x", "4", "5"]);
        t.clear();
        assert!(t.lines().is_empty());
    }

    #[test]
    fn a_long_backtrace_does_not_hide_the_panic() {
        let mut t = StderrTail::new(5);
        t.feed("before\nthread 'main' (7) panicked at src/lib.rs:1:1:\nboom\nstack backtrace:\n");
        for i in 0..50 {
            t.feed(&format!("  {i}: frame\n"));
        }
        assert_eq!(find_panic(&t.panic_lines()).unwrap().message, "boom");
        assert_eq!(t.lines().len(), 5);
        t.clear();
        assert!(t.panic_lines().is_empty());
    }

    #[test]
    fn panic_message_current_format() {
        let lines: Vec<String> = [
            "earlier output",
            "thread 'main' (1234) panicked at src/lib.rs:42:5:",
            "index out of bounds: the len is 3 but the index is 7",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace",
        ]
        .map(String::from)
        .to_vec();
        let p = find_panic(&lines).unwrap();
        assert_eq!(p.message, "index out of bounds: the len is 3 but the index is 7");
        assert_eq!(p.location, "src/lib.rs:42:5");
        assert_eq!(p.lines.len(), 2);
    }

    #[test]
    fn panic_message_multiline_and_old_format() {
        let lines: Vec<String> = ["thread 'main' panicked at src/lib.rs:1:1:", "line one", "line two"].map(String::from).to_vec();
        assert_eq!(find_panic(&lines).unwrap().message, "line one\nline two");
        let old: Vec<String> = ["thread 'main' panicked at 'boom', src/lib.rs:3:9"].map(String::from).to_vec();
        let p = find_panic(&old).unwrap();
        assert_eq!((p.message.as_str(), p.location.as_str()), ("boom", "src/lib.rs:3:9"));
        assert!(find_panic(&["no panic here".to_string()]).is_none());
    }

    #[test]
    fn call_ends_on_stdout_follow_partial_lines() {
        let mut p = StdoutParser::new();
        let ev = p.feed(b"one\nRPX_CALL_END\ntwoRPX_CALL_END\nthr");
        assert_eq!(
            ev,
            vec![StdoutEvent::Text("one\n".into()), StdoutEvent::CallEnd, StdoutEvent::Text("two".into()), StdoutEvent::CallEnd]
        );
        assert_eq!(p.take_partial_text().as_deref(), Some("thr"));
        p.feed(b"ee RPX_CA");
        assert_eq!(p.take_partial_text().as_deref(), Some("ee "), "a possible marker start is held back");
        assert_eq!(p.feed(b"LL_END\n"), vec![StdoutEvent::CallEnd]);
    }

    #[test]
    fn call_ends_on_stderr_split_anywhere() {
        let mut m = StderrMarks::default();
        assert_eq!(
            m.feed("err 1\nRPX_CALL_END\nerr"),
            vec![StderrPiece::Text("err 1\n".into()), StderrPiece::CallEnd, StderrPiece::Text("err".into())]
        );
        assert_eq!(m.feed(" 2RPX_CALL"), vec![StderrPiece::Text(" 2".into())]);
        assert_eq!(m.feed("_END\n"), vec![StderrPiece::CallEnd]);
        assert_eq!(m.feed("RPX_ is text"), vec![StderrPiece::Text("RPX_ is text".into())]);
        assert_eq!(m.feed("tail RPX"), vec![StderrPiece::Text("tail ".into())]);
        assert_eq!(m.take_held().as_deref(), Some("RPX"));
        assert_eq!(m.take_held(), None);
    }
}
