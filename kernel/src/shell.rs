//! Shell requests, one at a time on their own thread: `execute` (magics parsed by `rpx_magics`,
//! local code to evcxr, `%px` to the cluster), `complete`, `inspect`, `is_complete`, `history`,
//! `kernel_info`, `comm_info` and comms (none are offered, so every `comm_open` is closed).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use rpx_protocol::content::{
    plain_text, read_or_default, CodeAtCursor, CodeMirrorMode, CommInfoReply, CommOpen, CompleteReply, ErrorContent, ErrorName,
    ExecuteInput, ExecuteReply, ExecuteRequest, HelpLink, HistoryRequest, InspectReply, IsCompleteReply, IsCompleteReplyStatus,
    IsCompleteRequest, KernelInfoReply, LanguageInfo, ReplyStatus, ShutdownRequest,
};
use serde_json::{json, Map, Value};
use tracing::{debug, warn};

use rpx_magics::{autopx_message, parse_cell_autopx, CellStep, IopubMsg, StreamName};

use crate::local::{Local, LocalOutcome};
use crate::px::{Px, PxError};
use crate::server::{reply, Shared, ShellRequest};
use crate::syntax::{is_complete, Completeness};

/// The kernel's cell-running state.
pub struct Kernel {
    shared: Arc<Shared>,
    local: Local,
    px: Px,
    execution_count: u64,
    /// `(line number, input, result text)` of every cell run with `store_history`.
    history: Vec<(u64, String, Option<String>)>,
    /// The `text/plain` result of the cell running now (for the history's outputs).
    result_text: Option<String>,
    /// The running cell is `silent`: its result is not published (as ipykernel).
    silent: bool,
}

/// A failed cell: published as `error` and put in the `execute_reply`.
pub type CellError = ErrorContent;

impl From<PxError> for CellError {
    fn from(e: PxError) -> CellError {
        match e {
            PxError::Usage(e) => e.into(),
            PxError::Cell(c) => c,
        }
    }
}

/// The `kernel_info_reply` content.
pub fn kernel_info() -> Value {
    let reply = KernelInfoReply {
        status: ReplyStatus::Ok,
        protocol_version: "5.4".into(),
        implementation: "rpx".into(),
        implementation_version: env!("CARGO_PKG_VERSION").into(),
        language_info: LanguageInfo {
            name: "rust".into(),
            version: rustc_version(),
            mimetype: Some("text/rust".into()),
            file_extension: Some(".rs".into()),
            pygments_lexer: Some("rust".into()),
            codemirror_mode: Some(CodeMirrorMode::Simple("rust".into())),
            nbconvert_exporter: None,
        },
        banner: format!(
            "rpx {} - Rust on evcxr, with %px, %%px, %autopx, %pxresult and %pxconfig to run cells on an rpx cluster",
            env!("CARGO_PKG_VERSION")
        ),
        help_links: vec![HelpLink { text: "evcxr".into(), url: "https://github.com/evcxr/evcxr".into() }],
        debugger: false,
        error: None,
    };
    serde_json::to_value(reply).expect("serializable")
}

fn rustc_version() -> String {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default()
    })
    .clone()
}

/// Byte offset of the `chars`-th character (Jupyter cursor positions count code points).
fn byte_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b)
}

fn char_offset(s: &str, bytes: usize) -> usize {
    s[..bytes.min(s.len())].chars().count()
}

impl Kernel {
    pub fn new(shared: Arc<Shared>) -> Kernel {
        Kernel {
            local: Local::start(shared.clone()),
            px: Px::new(shared.clone()),
            shared,
            execution_count: 0,
            history: Vec::new(),
            result_text: None,
            silent: false,
        }
    }

    /// Handle shell requests until the socket side goes away. After a cell fails with
    /// `stop_on_error` (the default), the `execute_request`s already waiting are answered
    /// `aborted` without running, as ipykernel does, so "Run all" stops at the failed cell;
    /// other requests waiting are handled as usual.
    pub fn serve(mut self, rx: mpsc::Receiver<ShellRequest>) {
        while let Ok(req) = rx.recv() {
            self.shared.status("busy", &req.msg.header);
            let behind = self.handle(&req, &rx);
            self.shared.status("idle", &req.msg.header);
            for next in behind {
                self.shared.status("busy", &next.msg.header);
                if next.msg.msg_type() == "execute_request" {
                    debug!(msg_id = %next.msg.header.msg_id, "aborted: an earlier cell failed");
                    reply(
                        &self.shared.session,
                        &next,
                        "execute_reply",
                        ExecuteReply::Aborted { execution_count: self.execution_count }.to_value(),
                    );
                } else {
                    self.handle(&next, &rx);
                }
                self.shared.status("idle", &next.msg.header);
            }
        }
    }

    /// Handle one request; when it was a cell that failed with `stop_on_error`, the requests
    /// that were waiting when it failed (taken from `waiting`).
    fn handle(&mut self, req: &ShellRequest, waiting: &mpsc::Receiver<ShellRequest>) -> Vec<ShellRequest> {
        let c = &req.msg.content;
        let shared = self.shared.clone();
        let session = &shared.session;
        match req.msg.msg_type() {
            "kernel_info_request" => reply(session, req, "kernel_info_reply", kernel_info()),
            "execute_request" => return self.execute(req, waiting),
            "is_complete_request" => {
                let r = match is_complete(&read_or_default::<IsCompleteRequest>(c).code) {
                    Completeness::Complete => IsCompleteReply::new(IsCompleteReplyStatus::Complete, String::new()),
                    Completeness::Incomplete(indent) => IsCompleteReply::incomplete(indent),
                    Completeness::Invalid => IsCompleteReply::new(IsCompleteReplyStatus::Invalid, String::new()),
                };
                let incomplete = matches!(r.status, IsCompleteReplyStatus::Incomplete);
                let mut v = serde_json::to_value(r).expect("serializable");
                if !incomplete {
                    v.as_object_mut().expect("object").remove("indent");
                }
                reply(session, req, "is_complete_reply", v);
            }
            "complete_request" => {
                let at: CodeAtCursor = read_or_default(c);
                let r = self.complete(&at.code, at.cursor());
                reply(session, req, "complete_reply", serde_json::to_value(r).expect("serializable"));
            }
            "inspect_request" => {
                let at: CodeAtCursor = read_or_default(c);
                let mut r = InspectReply::default();
                match self.local.inspect(&at.code, byte_offset(&at.code, at.cursor())) {
                    Ok((plain, html)) if has_documentation(&plain) => {
                        r.found = true;
                        r.data = serde_json::from_value(json!({ "text/plain": plain, "text/html": html })).unwrap_or_default();
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "inspect"),
                }
                reply(session, req, "inspect_reply", serde_json::to_value(r).expect("serializable"));
            }
            "history_request" => {
                let history = self.history_entries(&read_or_default(c));
                reply(session, req, "history_reply", json!({ "status": "ok", "history": history }));
            }
            "comm_info_request" => {
                reply(session, req, "comm_info_reply", serde_json::to_value(CommInfoReply::default()).expect("serializable"))
            }
            "comm_open" => {
                // No comm targets are offered: close it at once, as the protocol asks.
                self.shared.publish_raw("comm_close", read_or_default::<CommOpen>(c).close(), Some(&req.msg.header));
            }
            "comm_msg" | "comm_close" => {}
            "shutdown_request" => {
                reply(session, req, "shutdown_reply", read_or_default::<ShutdownRequest>(c).reply());
            }
            other => warn!(msg_type = other, "unhandled shell message"),
        }
        Vec::new()
    }

    fn complete(&mut self, code: &str, cursor: usize) -> CompleteReply {
        let pos = byte_offset(code, cursor);
        let mut r = CompleteReply { cursor_start: cursor, cursor_end: cursor, ..Default::default() };
        // A magic name being typed: offer the magics.
        let line_start = code[..pos].rfind('\n').map_or(0, |i| i + 1);
        let word = code[line_start..pos].trim_start();
        if word.starts_with('%') && !word.contains(char::is_whitespace) {
            let start = pos - word.len();
            r.matches = ["%px", "%%px", "%autopx", "%pxresult", "%pxconfig"]
                .iter()
                .filter(|m| m.starts_with(word))
                .map(|m| m.to_string())
                .collect();
            r.cursor_start = char_offset(code, start);
            return r;
        }
        match self.local.complete(code, pos) {
            Ok((matches, start, end)) => {
                r.matches = matches;
                r.cursor_start = char_offset(code, start);
                r.cursor_end = char_offset(code, end);
            }
            Err(e) => debug!(error = %e, "completion"),
        }
        r
    }

    fn history_entries(&self, c: &HistoryRequest) -> Vec<Value> {
        let output = c.output.unwrap_or(false);
        let entry = |(n, code, out): &(u64, String, Option<String>)| if output { json!([1, n, [code, out]]) } else { json!([1, n, code]) };
        match c.hist_access_type.as_deref().unwrap_or("tail") {
            "range" => {
                let start = c.start.unwrap_or(1);
                let stop = c.stop.unwrap_or(u64::MAX);
                self.history.iter().filter(|(n, _, _)| *n >= start && *n < stop).map(entry).collect()
            }
            "search" => {
                let pattern = c.pattern.as_deref().unwrap_or("*");
                let unique = c.unique.unwrap_or(false);
                let mut seen = std::collections::HashSet::new();
                let hits: Vec<&(u64, String, Option<String>)> = self
                    .history
                    .iter()
                    .filter(|(_, code, _)| glob(pattern, code))
                    .filter(|(_, code, _)| !unique || seen.insert(code.clone()))
                    .collect();
                let n = c.n.map_or(hits.len(), |n| n as usize);
                hits[hits.len().saturating_sub(n)..].iter().map(|e| entry(e)).collect()
            }
            _ => {
                let n = c.n.unwrap_or(10) as usize;
                self.history[self.history.len().saturating_sub(n)..].iter().map(entry).collect()
            }
        }
    }

    /// Run a cell and reply. When it failed and asked `stop_on_error` (not silent), returns
    /// the requests waiting before its reply went out: "Run all" queued them behind it, while a
    /// request sent after the reply was seen is the user's next step and runs.
    fn execute(&mut self, req: &ShellRequest, waiting: &mpsc::Receiver<ShellRequest>) -> Vec<ShellRequest> {
        let c = ExecuteRequest::read(&req.msg.content);
        let (stop_on_error, silent, store_history) = (c.stop_on_error(), c.silent(), c.store_history());
        let code = c.code.clone();
        self.silent = silent;
        let user_expressions = unevaluated(&c);
        if store_history {
            self.execution_count += 1;
            self.history.push((self.execution_count, code.clone(), None));
        }
        let count = self.execution_count;
        self.shared.set_parent(Some(req.msg.header.clone()));
        let allow_stdin = c.allow_stdin();
        *self.shared.stdin_parent.lock().unwrap_or_else(|p| p.into_inner()) =
            allow_stdin.then(|| (req.msg.idents.clone(), req.msg.header.clone()));
        self.shared.interrupted.store(false, Ordering::SeqCst);
        if !silent {
            self.shared.publish_raw(
                "execute_input",
                json!(ExecuteInput { code: code.clone(), execution_count: count }),
                Some(&req.msg.header),
            );
        }
        self.result_text = None;
        let outcome = self.run_cell(&code, count, &req.msg.header.msg_id);
        if store_history {
            if let Some(last) = self.history.last_mut() {
                last.2 = self.result_text.take();
            }
        }
        let failed = outcome.is_err();
        let content = match outcome {
            Ok(()) => ExecuteReply::Ok { execution_count: count, user_expressions },
            Err(error) => {
                self.shared.publish(&IopubMsg::Error(error.clone()));
                ExecuteReply::Error { execution_count: count, error, engine_info: None }
            }
        };
        let behind: Vec<ShellRequest> =
            if failed && stop_on_error && !silent { std::iter::from_fn(|| waiting.try_recv().ok()).collect() } else { Vec::new() };
        reply(&self.shared.session, req, "execute_reply", content.to_value());
        self.shared.set_parent(None);
        *self.shared.stdin_parent.lock().unwrap_or_else(|p| p.into_inner()) = None;
        behind
    }

    /// Run every command of a cell, stopping at the first failure.
    fn run_cell(&mut self, code: &str, count: u64, msg_id: &str) -> Result<(), CellError> {
        let commands = parse_cell_autopx(code, self.px.autopx)?;
        for cmd in commands {
            match cmd {
                CellStep::Local(code) => self.run_local(&code, count)?,
                CellStep::Autopx => {
                    self.px.autopx = !self.px.autopx;
                    self.shared.publish_stream(StreamName::Stdout, &format!("{}\n", autopx_message(self.px.autopx)));
                }
                CellStep::Help { text, .. } => self.shared.publish_stream(StreamName::Stdout, &format!("{}\n", text.trim_end())),
                CellStep::PxConfig(opts) => self.px.config.apply(&opts),
                CellStep::PxResult(opts) => self.px.result(&opts)?,
                CellStep::Px { code, options } => {
                    let run = self.px.config.effective(&options);
                    let pending = self.px.submit(&code, &run, msg_id)?;
                    if run.local {
                        // While the engines run it: `--local` runs it here too.
                        self.run_local(&code, count)?;
                    }
                    self.px.finish(pending, &run)?;
                }
            }
        }
        Ok(())
    }

    fn run_local(&mut self, code: &str, count: u64) -> Result<(), CellError> {
        match self.local.execute(code) {
            LocalOutcome::Ok(None) => Ok(()),
            LocalOutcome::Ok(Some(data)) => {
                self.show(data, count);
                Ok(())
            }
            LocalOutcome::Err(e) => Err(e),
        }
    }

    /// A value shown by a local cell: plain text is the cell's result; anything richer
    /// (`EVCXR_BEGIN_CONTENT text/html`, images) is displayed.
    fn show(&mut self, data: Map<String, Value>, count: u64) {
        let only_text = data.keys().all(|k| k == "text/plain");
        let data = Value::Object(data);
        self.result_text = plain_text(&data).map(str::to_string);
        if self.silent {
            return;
        }
        if only_text {
            self.shared.publish(&IopubMsg::ExecuteResult { data, metadata: json!({}), execution_count: count });
        } else {
            self.shared.publish(&IopubMsg::DisplayData { data, metadata: json!({}), display_id: None });
        }
    }
}

/// The `user_expressions` of an `execute_reply`: not evaluated (a Rust expression is a
/// compiled cell), each is answered with an error saying so, rather than dropped.
fn unevaluated(req: &ExecuteRequest) -> Map<String, Value> {
    let evalue = "rpx-kernel does not evaluate user_expressions; run the expression as a cell";
    let error = ErrorContent::new(ErrorName::NotImplementedError, evalue, vec![]).reply(None);
    req.user_expressions.iter().flat_map(|m| m.keys()).map(|k| (k.clone(), error.clone())).collect()
}

/// Whether hover text says something: rust-analyzer answers "No documentation found" (in
/// various wrappings) for a position it knows nothing about.
fn has_documentation(plain: &str) -> bool {
    let t = plain.trim().trim_matches(|c: char| c == '`' || c == '*' || c == '_' || c.is_whitespace());
    !t.is_empty() && !t.eq_ignore_ascii_case("No documentation found") && !t.eq_ignore_ascii_case("No documentation found.")
}

/// Shell-style glob (`*`, `?`) over the whole text, as IPython's history search.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|i| go(&p[1..], &t[i..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_ipython_history_search() {
        assert!(glob("*", "anything"));
        assert!(glob("let *", "let x = 1;"));
        assert!(!glob("let *", "println!()"));
        assert!(glob("?x*", "ax = 2"));
    }

    #[test]
    fn cursor_offsets_count_code_points() {
        let s = "let é = 1;";
        assert_eq!(byte_offset(s, 5), 6);
        assert_eq!(char_offset(s, 6), 5);
        assert_eq!(byte_offset(s, 100), s.len());
    }

    #[test]
    fn hover_without_documentation_is_not_found() {
        assert!(!has_documentation("No documentation found"));
        assert!(!has_documentation("  _No documentation found._\n"));
        assert!(!has_documentation(""));
        assert!(has_documentation("```rust\nlet x: i32\n```"));
    }

    #[test]
    fn kernel_info_names_the_rust_language() {
        let v = kernel_info();
        assert_eq!(v["language_info"]["name"], "rust");
        assert_eq!(v["language_info"]["file_extension"], ".rs");
        assert_eq!(v["implementation"], "rpx");
        assert_eq!(v["status"], "ok");
    }
}
