//! Rendering of rustc's diagnostics against the user's code, in rustc's familiar layout.
//!
//! Diagnostics come from evcxr (cells) or straight from cargo's JSON messages (closures,
//! [`crate::builder`]); both become a [`Diag`] first.

use evcxr::CompilationError;
use serde_json::Value;

/// One rustc diagnostic, with spans in lines of the code it is rendered against.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diag {
    pub level: String,
    pub code: Option<String>,
    pub message: String,
    pub spans: Vec<DiagSpan>,
    pub help: Vec<String>,
    pub hint: Option<String>,
}

/// A span (1-based lines and columns) and its label.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiagSpan {
    pub start_line: usize,
    pub start_column: usize,
    pub end_line: usize,
    pub end_column: usize,
    pub is_primary: bool,
    pub label: String,
}

impl Diag {
    /// An error evcxr reported, its spans already mapped to the user's cell.
    pub fn from_evcxr(e: &CompilationError) -> Diag {
        Diag {
            level: e.level().to_string(),
            code: e.code().map(str::to_string),
            message: e.message(),
            spans: e
                .spanned_messages()
                .iter()
                .filter_map(|m| {
                    let s = m.span.as_ref()?;
                    Some(DiagSpan {
                        start_line: s.start_line,
                        start_column: s.start_column,
                        end_line: s.end_line,
                        end_column: s.end_column,
                        is_primary: m.is_primary,
                        label: m.label.clone(),
                    })
                })
                .collect(),
            help: e.help(),
            hint: e.evcxr_extra_hint().map(str::to_string),
        }
    }

    /// The `message` of a cargo `compiler-message` (rustc's JSON diagnostic); only spans in
    /// `file` (the one source file the code was written to) are kept.
    pub fn from_rustc_json(m: &Value, file: &str) -> Diag {
        let spans = m["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["file_name"].as_str().is_some_and(|f| f.ends_with(file)))
            .map(|s| {
                let n = |k: &str| s[k].as_u64().unwrap_or(0) as usize;
                DiagSpan {
                    start_line: n("line_start"),
                    start_column: n("column_start"),
                    end_line: n("line_end"),
                    end_column: n("column_end"),
                    is_primary: s["is_primary"].as_bool().unwrap_or(false),
                    label: s["label"].as_str().unwrap_or_default().to_string(),
                }
            })
            .collect();
        let help = m["children"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["level"].as_str() == Some("help"))
            .filter_map(|c| {
                let mut text = c["message"].as_str()?.to_string();
                if let Some(r) = c["spans"][0]["suggested_replacement"].as_str() {
                    text.push_str(&format!("\n\n{}", r.trim_end()));
                }
                Some(text)
            })
            .collect();
        Diag {
            level: m["level"].as_str().unwrap_or_default().to_string(),
            code: m["code"]["code"].as_str().map(str::to_string),
            message: m["message"].as_str().unwrap_or_default().to_string(),
            spans,
            help,
            hint: None,
        }
    }
}

/// [`render`] for the errors evcxr reported against a cell.
pub fn render_evcxr(code: &str, errors: &[CompilationError]) -> (String, Vec<String>) {
    render(code, "cell", &errors.iter().map(Diag::from_evcxr).collect::<Vec<_>>())
}

/// `(evalue, traceback)` for a failed compile: the first error's message, and every error
/// rendered with the line of `code` it points at (`--> {origin}:line:column`).
pub fn render(code: &str, origin: &str, diags: &[Diag]) -> (String, Vec<String>) {
    let lines: Vec<&str> = code.lines().collect();
    let mut traceback = Vec::new();
    let errors: Vec<&Diag> = diags.iter().filter(|e| e.level == "error").collect();
    for e in &errors {
        let mut text = match &e.code {
            Some(c) => format!("error[{c}]: {}", e.message),
            None => format!("error: {}", e.message),
        };
        for span in &e.spans {
            let Some(src) = lines.get(span.start_line.saturating_sub(1)) else { continue };
            let n = span.start_line.to_string();
            let pad = " ".repeat(n.len());
            let width = if span.end_line == span.start_line { span.end_column.saturating_sub(span.start_column).max(1) } else { 1 };
            text.push_str(&format!(
                "\n{pad}--> {origin}:{}:{}\n{pad} |\n{n} | {src}\n{pad} | {}{} {}",
                span.start_line,
                span.start_column,
                " ".repeat(span.start_column.saturating_sub(1)),
                if span.is_primary { "^" } else { "-" }.repeat(width),
                span.label
            ));
        }
        for h in &e.help {
            text.push_str(&format!("\nhelp: {h}"));
        }
        if let Some(hint) = &e.hint {
            text.push_str(&format!("\nhint: {hint}"));
        }
        traceback.push(text);
    }
    let evalue = errors.first().map(|e| e.message.clone()).unwrap_or_else(|| "compilation failed".into());
    if traceback.is_empty() {
        traceback.push(format!("error: {evalue}"));
    }
    (evalue, traceback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustc_json_errors_render_against_the_code() {
        let code = "fn f() {\n    helper(1)\n}";
        let m = serde_json::json!({
            "level": "error", "message": "cannot find function `helper` in this scope",
            "code": {"code": "E0425", "explanation": "..."},
            "spans": [
                {"file_name": "src/lib.rs", "line_start": 2, "line_end": 2, "column_start": 5, "column_end": 11, "is_primary": true, "label": "not found in this scope"},
                {"file_name": "/home/x/.cargo/registry/src/serde/lib.rs", "line_start": 90, "line_end": 90, "column_start": 1, "column_end": 2, "is_primary": false, "label": null}
            ],
            "children": [{"level": "help", "message": "consider importing this function", "spans": []}, {"level": "note", "message": "n", "spans": []}]
        });
        let d = Diag::from_rustc_json(&m, "src/lib.rs");
        assert_eq!(d.spans.len(), 1);
        let (evalue, tb) = render(code, "closure", &[d, Diag { level: "warning".into(), ..Diag::default() }]);
        assert_eq!(evalue, "cannot find function `helper` in this scope");
        assert_eq!(tb.len(), 1);
        assert_eq!(tb[0], "error[E0425]: cannot find function `helper` in this scope\n --> closure:2:5\n  |\n2 |     helper(1)\n  |     ^^^^^^ not found in this scope\nhelp: consider importing this function");
    }
}
