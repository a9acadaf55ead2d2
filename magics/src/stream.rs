//! Streaming (`--stream`, the default): [`Streamer`] turns each engine output into messages as
//! it arrives, in arrival order, remembering what it showed last, and at the end says how many
//! errors it showed ([`Streamer::error_report`]).

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::failure::{already_displayed, remote_line, remote_traceback, ErrorReport, TB_LIMIT};
use crate::output::{IopubMsg, OutputEvent, StreamName};
use crate::render::{output_header, push_stream, republish, result_display, RenderOptions, StreamPrinter};

/// How streamed stdout/stderr appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStyle {
    /// `stream` messages, as ipyparallel prints in a terminal: `[stdout:N] ` and a newline
    /// whenever the engine (or stream) differs from the previous chunk's, then the text.
    /// Interleaved engines repeat their prefix; a line cut by another engine is ended first.
    Text,
    /// As ipyparallel does inside a Jupyter kernel: one `display_data` per engine and stream,
    /// `[stdout:N] ` + everything so far, updated in place (`update_display_data`) as text
    /// arrives. Display ids are `<base>-<N>-<stream>`.
    DisplayUpdate,
}

/// Renders one `%px` run's outputs as they arrive. Make one per run.
#[derive(Debug)]
pub struct Streamer {
    style: StreamStyle,
    display_id_base: String,
    opts: RenderOptions,
    printer: StreamPrinter,
    so_far: HashMap<(usize, StreamName), String>,
    shown: HashSet<String>,
    errors: usize,
    failed: Vec<usize>,
}

impl Streamer {
    /// A streamer. `display_id_base` must be unique per run (the cell's msg_id will do); it is
    /// used only by [`StreamStyle::DisplayUpdate`].
    pub fn new(style: StreamStyle, display_id_base: impl Into<String>, opts: RenderOptions) -> Self {
        Streamer {
            style,
            display_id_base: display_id_base.into(),
            opts,
            printer: StreamPrinter::new(),
            so_far: HashMap::new(),
            shown: HashSet::new(),
            errors: 0,
            failed: Vec::new(),
        }
    }

    /// The messages to publish now for `event` from engine `engine_id`:
    ///
    /// - stdout/stderr: see [`StreamStyle`];
    /// - a display: `[output:N]`, then the display with `metadata.engine`;
    /// - a result: `Out[N:k]: value` (a `display_data`);
    /// - an error: on stderr, `[N:execute]` and the traceback for the first four errors, the
    ///   one line `[N:execute] Kind: message` after that.
    pub fn event(&mut self, engine_id: usize, event: &OutputEvent) -> Vec<IopubMsg> {
        let mut out = Vec::new();
        match event {
            OutputEvent::Stream { name, text } => match self.style {
                StreamStyle::Text => self.printer.show(&mut out, *name, engine_id, text),
                StreamStyle::DisplayUpdate => {
                    if text.is_empty() {
                        return out;
                    }
                    let so_far = self.so_far.entry((engine_id, *name)).or_default();
                    so_far.push_str(text);
                    let data = json!({ "text/plain": format!("[{name}:{engine_id}] {so_far}") });
                    let display_id = format!("{}-{engine_id}-{name}", self.display_id_base);
                    if self.shown.insert(display_id.clone()) {
                        out.push(IopubMsg::DisplayData { data, metadata: json!({}), display_id: Some(display_id) });
                    } else {
                        out.push(IopubMsg::UpdateDisplayData { data, metadata: json!({}), display_id });
                    }
                }
            },
            OutputEvent::DisplayData { data, metadata } => {
                self.printer.interrupt();
                out.push(output_header(engine_id));
                out.push(republish(engine_id, data, metadata));
            }
            OutputEvent::ExecuteResult { execution_count, data, metadata } => {
                self.printer.interrupt();
                out.push(result_display(engine_id, *execution_count, data, metadata, &self.opts));
            }
            OutputEvent::Error(err) => {
                self.errors += 1;
                if !self.failed.contains(&engine_id) {
                    self.failed.push(engine_id);
                }
                let mut text =
                    if self.errors <= TB_LIMIT { remote_traceback(engine_id, err).join("\n") } else { remote_line(engine_id, err) };
                text.push('\n');
                match self.style {
                    StreamStyle::Text => self.printer.raw(&mut out, StreamName::Stderr, &text),
                    StreamStyle::DisplayUpdate => push_stream(&mut out, StreamName::Stderr, &text),
                }
            }
        }
        out
    }

    /// How many errors were shown.
    pub fn error_count(&self) -> usize {
        self.errors
    }

    /// The engines whose errors were shown, in arrival order.
    pub fn failed_engines(&self) -> &[usize] {
        &self.failed
    }

    /// After the run: `None` if no error was shown, else the `AlreadyDisplayedError` report
    /// (`N errors`) for the cell's error reply; the tracebacks are already on screen.
    pub fn error_report(&self) -> Option<ErrorReport> {
        (self.errors > 0).then(|| already_displayed(self.errors, self.failed.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputEvent as Ev;
    use serde_json::Value;

    fn text_streamer() -> Streamer {
        Streamer::new(StreamStyle::Text, "m", RenderOptions::default())
    }

    /// Feeds `(engine, event)`s and returns every message, in order.
    fn feed(s: &mut Streamer, events: &[(usize, Ev)]) -> Vec<IopubMsg> {
        events.iter().flat_map(|(id, ev)| s.event(*id, ev)).collect()
    }

    /// What a notebook would show for consecutive stream messages of one name: their
    /// concatenation (Jupyter merges them).
    fn joined(msgs: &[IopubMsg], name: StreamName) -> String {
        msgs.iter()
            .filter_map(|m| match m {
                IopubMsg::Stream { name: n, text } if *n == name => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn stream(name: StreamName, text: &str) -> IopubMsg {
        IopubMsg::Stream { name, text: text.to_string() }
    }

    #[test]
    fn prefix_only_when_the_engine_changes() {
        let mut s = text_streamer();
        let msgs = feed(
            &mut s,
            &[(0, Ev::stdout("a\n")), (0, Ev::stdout("b\n")), (1, Ev::stdout("c\n")), (0, Ev::stdout("d\n")), (0, Ev::stdout("e\n"))],
        );
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \na\n"),
                stream(StreamName::Stdout, "b\n"),
                stream(StreamName::Stdout, "[stdout:1] \nc\n"),
                stream(StreamName::Stdout, "[stdout:0] \nd\n"),
                stream(StreamName::Stdout, "e\n"),
            ]
        );
        assert_eq!(joined(&msgs, StreamName::Stdout), "[stdout:0] \na\nb\n[stdout:1] \nc\n[stdout:0] \nd\ne\n");
    }

    #[test]
    fn a_line_cut_by_another_engine_is_ended_first() {
        let mut s = text_streamer();
        let msgs = feed(&mut s, &[(0, Ev::stdout("hel")), (1, Ev::stdout("x\n")), (0, Ev::stdout("lo\n"))]);
        let all = joined(&msgs, StreamName::Stdout);
        assert_eq!(all, "[stdout:0] \nhel\n[stdout:1] \nx\n[stdout:0] \nlo\n");
        assert!(!all.contains("\n\n"));
        // The same engine continuing its line gets no prefix and no newline.
        let mut s = text_streamer();
        let msgs = feed(&mut s, &[(0, Ev::stdout("hel")), (0, Ev::stdout("lo\n"))]);
        assert_eq!(joined(&msgs, StreamName::Stdout), "[stdout:0] \nhello\n");
    }

    #[test]
    fn stdout_and_stderr_have_their_own_prefixes() {
        let mut s = text_streamer();
        let msgs = feed(&mut s, &[(0, Ev::stdout("o1\n")), (0, Ev::stderr("e1\n")), (0, Ev::stdout("o2\n")), (1, Ev::stderr("e2"))]);
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \no1\n"),
                stream(StreamName::Stderr, "[stderr:0] \ne1\n"),
                stream(StreamName::Stdout, "[stdout:0] \no2\n"),
                stream(StreamName::Stderr, "[stderr:1] \ne2"),
            ]
        );
    }

    #[test]
    fn displays_and_results() {
        let mut s = text_streamer();
        let html = Ev::DisplayData { data: json!({ "text/html": "<i>x</i>" }), metadata: json!({ "k": "v" }) };
        let msgs = feed(&mut s, &[(0, Ev::stdout("a")), (0, html), (0, Ev::stdout("b\n")), (1, Ev::result_text(4, "42"))]);
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \na"),
                IopubMsg::DisplayData { data: json!({ "text/plain": "[output:0]" }), metadata: json!({}), display_id: None },
                IopubMsg::DisplayData {
                    data: json!({ "text/html": "<i>x</i>" }),
                    metadata: json!({ "k": "v", "engine": 0 }),
                    display_id: None
                },
                // A new output area after the display: the prefix again.
                stream(StreamName::Stdout, "[stdout:0] \nb\n"),
                IopubMsg::DisplayData { data: json!({ "text/plain": "Out[1:4]: 42" }), metadata: json!({ "engine": 1 }), display_id: None },
            ]
        );
    }

    fn boom(id: usize) -> Ev {
        Ev::error("Panic", format!("oops! {id}"), vec![format!("panicked at src/lib.rs:1:1:\noops! {id}")])
    }

    #[test]
    fn errors_as_they_come() {
        let mut s = text_streamer();
        let msgs = feed(&mut s, &[(0, Ev::stderr("warn")), (0, boom(0)), (0, Ev::stderr("more\n"))]);
        assert_eq!(
            joined(&msgs, StreamName::Stderr),
            "[stderr:0] \nwarn\n[0:execute]\npanicked at src/lib.rs:1:1:\noops! 0\n[stderr:0] \nmore\n"
        );
        assert_eq!(s.error_count(), 1);
        assert_eq!(
            s.error_report(),
            Some(ErrorReport {
                error: rpx_protocol::content::ErrorContent::bare("AlreadyDisplayedError", "1 errors", vec!["1 errors".into()]),
                failed_engines: vec![0]
            })
        );
    }

    #[test]
    fn after_four_tracebacks_one_line_each() {
        let mut s = text_streamer();
        let events: Vec<(usize, Ev)> = (0..6).map(|id| (id, boom(id))).collect();
        let msgs = feed(&mut s, &events);
        let err = joined(&msgs, StreamName::Stderr);
        let expected_full: String = (0..4).map(|id| format!("[{id}:execute]\npanicked at src/lib.rs:1:1:\noops! {id}\n")).collect();
        assert_eq!(err, format!("{expected_full}[4:execute] Panic: oops! 4\n[5:execute] Panic: oops! 5\n"));
        assert_eq!(err.matches("oops!").count(), 6);
        let r = s.error_report().unwrap();
        assert_eq!(r.error.traceback, vec!["6 errors"]);
        assert_eq!(r.failed_engines, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(s.failed_engines(), &[0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn no_errors_no_report() {
        let mut s = text_streamer();
        feed(&mut s, &[(0, Ev::stdout("x\n"))]);
        assert_eq!(s.error_report(), None);
        assert_eq!(s.error_count(), 0);
    }

    #[test]
    fn empty_text_shows_nothing() {
        let mut s = text_streamer();
        assert_eq!(s.event(0, &Ev::stdout("")), vec![]);
        let mut s = Streamer::new(StreamStyle::DisplayUpdate, "m", RenderOptions::default());
        assert_eq!(s.event(0, &Ev::stdout("")), vec![]);
    }

    #[test]
    fn display_update_style() {
        let mut s = Streamer::new(StreamStyle::DisplayUpdate, "msg1", RenderOptions::default());
        let msgs =
            feed(&mut s, &[(0, Ev::stdout("a\n")), (1, Ev::stdout("x\n")), (0, Ev::stdout("b\n")), (0, Ev::stderr("e\n")), (1, boom(1))]);
        let d = |text: &str, id: &str, update: bool| {
            let data = json!({ "text/plain": text });
            if update {
                IopubMsg::UpdateDisplayData { data, metadata: json!({}), display_id: id.into() }
            } else {
                IopubMsg::DisplayData { data, metadata: json!({}), display_id: Some(id.into()) }
            }
        };
        assert_eq!(
            msgs,
            vec![
                d("[stdout:0] a\n", "msg1-0-stdout", false),
                d("[stdout:1] x\n", "msg1-1-stdout", false),
                d("[stdout:0] a\nb\n", "msg1-0-stdout", true),
                d("[stderr:0] e\n", "msg1-0-stderr", false),
                stream(StreamName::Stderr, "[1:execute]\npanicked at src/lib.rs:1:1:\noops! 1\n"),
            ]
        );
        assert_eq!(msgs[2].content()["transient"]["display_id"], Value::from("msg1-0-stdout"));
    }
}
