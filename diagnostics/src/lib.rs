//! Rendering of rustc's diagnostics against the user's code, in rustc's familiar layout, so that
//! the kernel's local cells and the cluster's compiler show compile errors alike.
//!
//! Diagnostics come from evcxr (cells) or from cargo's JSON messages (the compiler's closures);
//! both become a [`Diag`] first. A crate of its own, used by the kernel and the compiler only:
//! it depends on evcxr, which must stay out of the engine (in a shared crate, Cargo's feature
//! unification linked evcxr into `ipengine`: 7.8 MB became 26.5 MB, +5 MiB per engine).

use evcxr::CompilationError;

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
    fn errors_render_against_the_code_and_warnings_are_left_out() {
        let error = Diag {
            level: "error".into(),
            code: Some("E0308".into()),
            message: "mismatched types".into(),
            spans: vec![DiagSpan {
                start_line: 1,
                start_column: 14,
                end_line: 1,
                end_column: 18,
                is_primary: true,
                label: "expected `u32`".into(),
            }],
            help: vec!["try `1`".into()],
            hint: Some("a hint".into()),
        };
        let warning = Diag { level: "warning".into(), message: "unused".into(), ..Diag::default() };
        let (evalue, tb) = render("let x: u32 = \"a\";", "cell", &[warning.clone(), error]);
        assert_eq!(evalue, "mismatched types");
        assert_eq!(
            tb,
            ["error[E0308]: mismatched types\n --> cell:1:14\n  |\n1 | let x: u32 = \"a\";\n  |              ^^^^ expected `u32`\nhelp: try `1`\nhint: a hint"]
        );
        assert_eq!(render("", "cell", &[warning]), ("compilation failed".into(), vec!["error: compilation failed".into()]));
    }
}
