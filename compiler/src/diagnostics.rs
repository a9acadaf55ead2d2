//! Rendering of rustc's diagnostics against the user's cell, in rustc's familiar layout.

use evcxr::CompilationError;

/// `(evalue, traceback)` for a failed compile: the first error's message, and every error
/// rendered with the cell line it points at.
pub fn render(code: &str, errors: &[CompilationError]) -> (String, Vec<String>) {
    let lines: Vec<&str> = code.lines().collect();
    let mut traceback = Vec::new();
    let errors: Vec<&CompilationError> = errors.iter().filter(|e| e.level() == "error").collect::<Vec<_>>();
    for e in &errors {
        let mut text = match e.code() {
            Some(c) => format!("error[{c}]: {}", e.message()),
            None => format!("error: {}", e.message()),
        };
        for m in e.spanned_messages() {
            let Some(span) = &m.span else { continue };
            let Some(src) = lines.get(span.start_line.saturating_sub(1)) else { continue };
            let n = span.start_line.to_string();
            let pad = " ".repeat(n.len());
            let width = if span.end_line == span.start_line { span.end_column.saturating_sub(span.start_column).max(1) } else { 1 };
            text.push_str(&format!(
                "\n{pad}--> cell:{}:{}\n{pad} |\n{n} | {src}\n{pad} | {}{} {}",
                span.start_line,
                span.start_column,
                " ".repeat(span.start_column.saturating_sub(1)),
                if m.is_primary { "^" } else { "-" }.repeat(width),
                m.label
            ));
        }
        for h in e.help() {
            text.push_str(&format!("\nhelp: {h}"));
        }
        if let Some(hint) = e.evcxr_extra_hint() {
            text.push_str(&format!("\nhint: {hint}"));
        }
        traceback.push(text);
    }
    let evalue = errors.first().map(|e| e.message()).unwrap_or_else(|| "compilation failed".into());
    if traceback.is_empty() {
        traceback.push(format!("error: {evalue}"));
    }
    (evalue, traceback)
}
