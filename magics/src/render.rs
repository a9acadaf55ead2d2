//! Rendering finished outputs as ipyparallel's `display_outputs` does (used by
//! `%%px --no-stream` and `%pxresult`): [`render_outputs`] in the three `--group-outputs`
//! orders, plus the pieces the streaming renderer shares: the stream printer that writes
//! `[stdout:N] ` once per change of engine or stream, the `[output:N]` header, the
//! `Out[N:k]: ` result, and the `--verbose` line.

use serde_json::{json, Value};

use crate::error::fmt_ids;
use crate::options::{GroupOutputs, Signal};
use crate::output::{with_engine, EngineOutput, IopubMsg, OutputEvent, StreamName};
use crate::TargetSpec;

/// Presentation choices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Colour the `Out[N:k]: ` prefix red with ANSI escapes, as ipyparallel does in a kernel
    /// whose colours are not `NoColor`. Off by default: plain text is easier to read back.
    pub color: bool,
}

/// Appends stream text, merging it into the previous message if that is the same stream.
pub(crate) fn push_stream(out: &mut Vec<IopubMsg>, name: StreamName, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(IopubMsg::Stream { name: n, text: t }) = out.last_mut() {
        if *n == name {
            t.push_str(text);
            return;
        }
    }
    out.push(IopubMsg::Stream { name, text: text.to_string() });
}

/// ipyparallel's `_display_stream` state: the prefix `[stdout:N] ` plus a newline is written
/// when the (stream, engine) changes, never twice in a row, and a missing final newline is
/// added before a new prefix, so no line runs into the next and no blank line appears.
#[derive(Debug)]
pub(crate) struct StreamPrinter {
    last: Option<(StreamName, usize)>,
    last_name: StreamName,
    trailing_newline: bool,
}

impl StreamPrinter {
    pub(crate) fn new() -> Self {
        StreamPrinter { last: None, last_name: StreamName::Stdout, trailing_newline: true }
    }

    fn close_line(&mut self, out: &mut Vec<IopubMsg>) {
        if !self.trailing_newline {
            // ipyparallel writes this newline into the *new* stream; it belongs to the one
            // that lacks it (otherwise the new stream starts with a blank line).
            push_stream(out, self.last_name, "\n");
            self.trailing_newline = true;
        }
    }

    /// Engine `engine_id` wrote `text` to `name`.
    pub(crate) fn show(&mut self, out: &mut Vec<IopubMsg>, name: StreamName, engine_id: usize, text: &str) {
        if text.is_empty() {
            return;
        }
        let mut s = String::new();
        if self.last != Some((name, engine_id)) {
            self.close_line(out);
            self.last = Some((name, engine_id));
            s.push_str(&format!("[{name}:{engine_id}] \n"));
        }
        s.push_str(text);
        self.trailing_newline = text.ends_with('\n');
        self.last_name = name;
        push_stream(out, name, &s);
    }

    /// Text not from an engine's stream (a streamed error): ends any open line first, and the
    /// next engine text gets its prefix again.
    pub(crate) fn raw(&mut self, out: &mut Vec<IopubMsg>, name: StreamName, text: &str) {
        self.close_line(out);
        self.last = None;
        push_stream(out, name, text);
        self.trailing_newline = text.is_empty() || text.ends_with('\n');
        self.last_name = name;
    }

    /// A display or result was published between stream chunks: the next stream text starts a
    /// new output area, so it gets its prefix again and needs no newline before it.
    pub(crate) fn interrupt(&mut self) {
        self.last = None;
        self.trailing_newline = true;
    }
}

/// The `[output:N]` line ipyparallel shows above an engine's rich outputs (a `display_data`
/// with only `text/plain`).
pub fn output_header(engine_id: usize) -> IopubMsg {
    IopubMsg::DisplayData { data: json!({ "text/plain": format!("[output:{engine_id}]") }), metadata: json!({}), display_id: None }
}

/// An engine's `display_data`, republished with `metadata.engine` set.
pub(crate) fn republish(engine_id: usize, data: &Value, metadata: &Value) -> IopubMsg {
    IopubMsg::DisplayData { data: data.clone(), metadata: with_engine(metadata, engine_id), display_id: None }
}

/// An engine's execute result as ipyparallel shows it: a `display_data` whose `text/plain` is
/// `Out[N:k]: ` + the value's text (on the next line if the text has several lines), other mime
/// types unchanged, `metadata.engine` set.
pub fn result_display(engine_id: usize, execution_count: u64, data: &Value, metadata: &Value, opts: &RenderOptions) -> IopubMsg {
    let mut data = data.clone();
    if let Some(text) = rpx_protocol::content::plain_text(&data) {
        let plain = if text.is_empty() {
            String::new()
        } else {
            let body = if text.contains('\n') && !text.starts_with('\n') { format!("\n{text}") } else { text.to_string() };
            let (red, normal) = if opts.color { ("\x1b[0;31m", "\x1b[0m") } else { ("", "") };
            format!("{red}Out[{engine_id}:{execution_count}]: {normal}{body}")
        };
        if let Some(m) = data.as_object_mut() {
            m.insert("text/plain".into(), Value::String(plain));
        }
    }
    IopubMsg::DisplayData { data, metadata: with_engine(metadata, engine_id), display_id: None }
}

/// One engine's outputs, gathered by kind.
struct Gathered<'a> {
    id: usize,
    stdout: String,
    stderr: String,
    displays: Vec<(&'a Value, &'a Value)>,
    result: Option<(u64, &'a Value, &'a Value)>,
}

impl<'a> Gathered<'a> {
    fn new(e: &'a EngineOutput) -> Self {
        let mut g = Gathered { id: e.engine_id, stdout: String::new(), stderr: String::new(), displays: Vec::new(), result: None };
        for ev in &e.events {
            match ev {
                OutputEvent::Stream { name: StreamName::Stdout, text } => g.stdout.push_str(text),
                OutputEvent::Stream { name: StreamName::Stderr, text } => g.stderr.push_str(text),
                OutputEvent::DisplayData { data, metadata } => g.displays.push((data, metadata)),
                OutputEvent::ExecuteResult { execution_count, data, metadata } => g.result = Some((*execution_count, data, metadata)),
                OutputEvent::Error(_) => {}
            }
        }
        g
    }
}

/// The messages that show finished outputs, engines in the order given, grouped as
/// `--group-outputs` says (ipyparallel's `display_outputs`):
///
/// - `type`: every engine's stdout, then every stderr, then each engine's `[output:N]` and
///   displays, then every `Out[N:k]: ` result.
/// - `engine`: per engine: stdout, stderr, then `[output:N]` (if it has displays or a result),
///   its displays and its result.
/// - `order`: like `type`, but displays go round by round: every engine's first display (each
///   under its `[output:N]`), then every engine's second, ...
///
/// Streams are `stream` messages (`[stdout:N] ` + newline + text); consecutive text of one
/// stream is merged into one message. Errors are not shown here: see
/// [`crate::error_report`].
pub fn render_outputs(engines: &[EngineOutput], group: GroupOutputs, opts: &RenderOptions) -> Vec<IopubMsg> {
    let all: Vec<Gathered> = engines.iter().map(Gathered::new).collect();
    let mut out = Vec::new();
    let mut p = StreamPrinter::new();
    let result = |out: &mut Vec<IopubMsg>, g: &Gathered| {
        if let Some((count, data, md)) = g.result {
            out.push(result_display(g.id, count, data, md, opts));
        }
    };
    match group {
        GroupOutputs::Engine => {
            for g in &all {
                p.show(&mut out, StreamName::Stdout, g.id, &g.stdout);
                p.show(&mut out, StreamName::Stderr, g.id, &g.stderr);
                if !g.displays.is_empty() || g.result.is_some() {
                    p.interrupt();
                    out.push(output_header(g.id));
                }
                for (data, md) in &g.displays {
                    out.push(republish(g.id, data, md));
                }
                result(&mut out, g);
            }
        }
        GroupOutputs::Type | GroupOutputs::Order => {
            for g in &all {
                p.show(&mut out, StreamName::Stdout, g.id, &g.stdout);
            }
            for g in &all {
                p.show(&mut out, StreamName::Stderr, g.id, &g.stderr);
            }
            if group == GroupOutputs::Order {
                let rounds = all.iter().map(|g| g.displays.len()).max().unwrap_or(0);
                for i in 0..rounds {
                    for g in &all {
                        if let Some((data, md)) = g.displays.get(i) {
                            out.push(output_header(g.id));
                            out.push(republish(g.id, data, md));
                        }
                    }
                }
            } else {
                for g in &all {
                    if !g.displays.is_empty() {
                        out.push(output_header(g.id));
                    }
                    for (data, md) in &g.displays {
                        out.push(republish(g.id, data, md));
                    }
                }
            }
            for g in &all {
                result(&mut out, g);
            }
        }
    }
    out
}

/// The `--verbose` line (print it on stdout, newline included): `Parallel execution on
/// engine(s): all`, or `Async parallel ...` when not blocking. `all` stays `all`; other targets
/// show the resolved ids, a single id bare, more than ten as `[0, 1, 2, 3, ..., 12, 13, 14, 15]`.
pub fn verbose_line(block: bool, targets: &TargetSpec, resolved: &[usize]) -> String {
    let base = if block { "Parallel" } else { "Async parallel" };
    let shown = match targets {
        TargetSpec::All => "all".to_string(),
        TargetSpec::One(_) if resolved.len() == 1 => resolved[0].to_string(),
        _ if resolved.len() > 10 => {
            let head = fmt_ids(&resolved[..4]);
            let tail = fmt_ids(&resolved[resolved.len() - 4..]);
            format!("{}, ..., {}", &head[..head.len() - 1], &tail[1..])
        }
        _ => fmt_ids(resolved),
    };
    format!("{base} execution on engine(s): {shown}\n")
}

/// What to print on stderr when the user interrupts a blocking `%px` (newline included).
pub fn interrupt_line(signal: &Signal) -> String {
    format!("Received Keyboard Interrupt. Sending signal {signal} to engines...\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputEvent as Ev;

    fn plain() -> RenderOptions {
        RenderOptions::default()
    }

    fn stream(name: StreamName, text: &str) -> IopubMsg {
        IopubMsg::Stream { name, text: text.to_string() }
    }

    fn display(text: &str, engine: usize) -> IopubMsg {
        IopubMsg::DisplayData { data: json!({ "text/plain": text }), metadata: json!({ "engine": engine }), display_id: None }
    }

    fn html(i: usize) -> Ev {
        Ev::DisplayData { data: json!({ "text/html": format!("<p>{i}</p>"), "text/plain": format!("HTML {i}") }), metadata: Value::Null }
    }

    fn html_out(i: usize, engine: usize) -> IopubMsg {
        IopubMsg::DisplayData {
            data: json!({ "text/html": format!("<p>{i}</p>"), "text/plain": format!("HTML {i}") }),
            metadata: json!({ "engine": engine }),
            display_id: None,
        }
    }

    /// Two engines that each print to stdout and stderr, display two things and return a value
    /// (ipyparallel's `generate_output` test helper, in Rust terms).
    fn generated() -> Vec<EngineOutput> {
        (0..2)
            .map(|id| {
                EngineOutput::new(
                    id,
                    vec![
                        Ev::stdout("stdout\n"),
                        Ev::stderr("stderr\n"),
                        Ev::stdout("stdout2\n"),
                        Ev::stderr("stderr2\n"),
                        html(1),
                        html(2),
                        Ev::result_text(5, format!("{}", 10 + id)),
                    ],
                )
            })
            .collect()
    }

    #[test]
    fn group_type() {
        let msgs = render_outputs(&generated(), GroupOutputs::Type, &plain());
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \nstdout\nstdout2\n[stdout:1] \nstdout\nstdout2\n"),
                stream(StreamName::Stderr, "[stderr:0] \nstderr\nstderr2\n[stderr:1] \nstderr\nstderr2\n"),
                output_header(0),
                html_out(1, 0),
                html_out(2, 0),
                output_header(1),
                html_out(1, 1),
                html_out(2, 1),
                display("Out[0:5]: 10", 0),
                display("Out[1:5]: 11", 1),
            ]
        );
        assert_eq!(output_header(3).text(), Some("[output:3]"));
    }

    #[test]
    fn group_engine() {
        let msgs = render_outputs(&generated(), GroupOutputs::Engine, &plain());
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \nstdout\nstdout2\n"),
                stream(StreamName::Stderr, "[stderr:0] \nstderr\nstderr2\n"),
                output_header(0),
                html_out(1, 0),
                html_out(2, 0),
                display("Out[0:5]: 10", 0),
                stream(StreamName::Stdout, "[stdout:1] \nstdout\nstdout2\n"),
                stream(StreamName::Stderr, "[stderr:1] \nstderr\nstderr2\n"),
                output_header(1),
                html_out(1, 1),
                html_out(2, 1),
                display("Out[1:5]: 11", 1),
            ]
        );
    }

    #[test]
    fn group_order() {
        let msgs = render_outputs(&generated(), GroupOutputs::Order, &plain());
        assert_eq!(
            msgs,
            vec![
                stream(StreamName::Stdout, "[stdout:0] \nstdout\nstdout2\n[stdout:1] \nstdout\nstdout2\n"),
                stream(StreamName::Stderr, "[stderr:0] \nstderr\nstderr2\n[stderr:1] \nstderr\nstderr2\n"),
                output_header(0),
                html_out(1, 0),
                output_header(1),
                html_out(1, 1),
                output_header(0),
                html_out(2, 0),
                output_header(1),
                html_out(2, 1),
                display("Out[0:5]: 10", 0),
                display("Out[1:5]: 11", 1),
            ]
        );
    }

    #[test]
    fn order_shows_engines_with_fewer_displays() {
        // ipyparallel skips every display of an engine with fewer than the most; rpx shows them.
        let engines = vec![EngineOutput::new(0, vec![html(1), html(2)]), EngineOutput::new(1, vec![html(1)])];
        let msgs = render_outputs(&engines, GroupOutputs::Order, &plain());
        assert_eq!(msgs, vec![output_header(0), html_out(1, 0), output_header(1), html_out(1, 1), output_header(0), html_out(2, 0)]);
    }

    #[test]
    fn no_blank_lines_when_text_lacks_a_final_newline() {
        let engines = vec![
            EngineOutput::new(0, vec![Ev::stdout("a")]),
            EngineOutput::new(1, vec![Ev::stdout("b")]),
            EngineOutput::new(2, vec![Ev::stdout("c\n")]),
        ];
        let msgs = render_outputs(&engines, GroupOutputs::Type, &plain());
        assert_eq!(msgs, vec![stream(StreamName::Stdout, "[stdout:0] \na\n[stdout:1] \nb\n[stdout:2] \nc\n")]);
        assert!(!msgs[0].text().unwrap().contains("\n\n"));
    }

    #[test]
    fn missing_newline_goes_to_the_stream_that_lacks_it() {
        let engines = vec![EngineOutput::new(0, vec![Ev::stdout("out"), Ev::stderr("err")])];
        let msgs = render_outputs(&engines, GroupOutputs::Engine, &plain());
        assert_eq!(msgs, vec![stream(StreamName::Stdout, "[stdout:0] \nout\n"), stream(StreamName::Stderr, "[stderr:0] \nerr")]);
    }

    #[test]
    fn chunks_are_joined_per_engine() {
        let engines = vec![
            EngineOutput::new(0, vec![Ev::stdout("a"), Ev::stdout("b\n"), Ev::stdout("c\n")]),
            EngineOutput::new(1, vec![]),
            EngineOutput::new(2, vec![Ev::stdout("")]),
        ];
        let msgs = render_outputs(&engines, GroupOutputs::Type, &plain());
        assert_eq!(msgs, vec![stream(StreamName::Stdout, "[stdout:0] \nab\nc\n")]);
    }

    #[test]
    fn engine_header_also_for_a_lone_result() {
        let engines = vec![EngineOutput::new(3, vec![Ev::result_text(2, "42")]), EngineOutput::new(4, vec![Ev::stdout("x\n")])];
        assert_eq!(
            render_outputs(&engines, GroupOutputs::Engine, &plain()),
            vec![output_header(3), display("Out[3:2]: 42", 3), stream(StreamName::Stdout, "[stdout:4] \nx\n")]
        );
        // `type` shows no header for results alone.
        assert_eq!(
            render_outputs(&engines, GroupOutputs::Type, &plain()),
            vec![stream(StreamName::Stdout, "[stdout:4] \nx\n"), display("Out[3:2]: 42", 3)]
        );
    }

    #[test]
    fn nothing_to_show() {
        assert_eq!(render_outputs(&[], GroupOutputs::Type, &plain()), vec![]);
        let engines = vec![EngineOutput::new(0, vec![Ev::error("Panic", "boom", vec![])])];
        for g in [GroupOutputs::Type, GroupOutputs::Engine, GroupOutputs::Order] {
            assert_eq!(render_outputs(&engines, g, &plain()), vec![]);
        }
    }

    #[test]
    fn results() {
        let r = |text: &str| result_display(2, 7, &json!({ "text/plain": text }), &Value::Null, &plain());
        assert_eq!(r("42").text(), Some("Out[2:7]: 42"));
        assert_eq!(r("[\n    1,\n]").text(), Some("Out[2:7]: \n[\n    1,\n]"));
        assert_eq!(r("\nalready").text(), Some("Out[2:7]: \nalready"));
        assert_eq!(r("").text(), Some(""));
        let colored = result_display(0, 1, &json!({ "text/plain": "1" }), &Value::Null, &RenderOptions { color: true });
        assert_eq!(colored.text(), Some("\x1b[0;31mOut[0:1]: \x1b[0m1"));
        // Other mime types are kept; metadata gains the engine.
        let rich = result_display(1, 3, &json!({ "text/plain": "x", "text/html": "<b>x</b>" }), &json!({ "a": 1 }), &plain());
        assert_eq!(
            rich,
            IopubMsg::DisplayData {
                data: json!({ "text/plain": "Out[1:3]: x", "text/html": "<b>x</b>" }),
                metadata: json!({ "a": 1, "engine": 1 }),
                display_id: None
            }
        );
        let no_plain = result_display(1, 3, &json!({ "image/png": "AAA" }), &Value::Null, &plain());
        assert_eq!(no_plain.content()["data"], json!({ "image/png": "AAA" }));
    }

    #[test]
    fn verbose() {
        let ids: Vec<usize> = (0..16).collect();
        assert_eq!(verbose_line(true, &TargetSpec::All, &ids), "Parallel execution on engine(s): all\n");
        assert_eq!(verbose_line(false, &TargetSpec::All, &ids), "Async parallel execution on engine(s): all\n");
        assert_eq!(verbose_line(true, &TargetSpec::One(-1), &[15]), "Parallel execution on engine(s): 15\n");
        let t: TargetSpec = "0:4".parse().unwrap();
        assert_eq!(verbose_line(true, &t, &[0, 1, 2, 3]), "Parallel execution on engine(s): [0, 1, 2, 3]\n");
        let t: TargetSpec = ":".parse().unwrap();
        assert_eq!(verbose_line(true, &t, &ids), "Parallel execution on engine(s): [0, 1, 2, 3, ..., 12, 13, 14, 15]\n");
        assert_eq!(interrupt_line(&Signal::default()), "Received Keyboard Interrupt. Sending signal SIGINT to engines...\n");
    }
}
