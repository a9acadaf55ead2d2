//! Whether a cell is complete (`is_complete_request`): a small Rust lexer that tracks brackets,
//! strings, raw strings, char literals and nested comments. Magic lines (`%px ...`) and evcxr
//! commands (`:dep ...`) are not Rust and are skipped; a `%%px` cell is judged by its body.

/// The verdict for a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    /// Ready to run.
    Complete,
    /// More input is needed; the indent for the next line.
    Incomplete(String),
    /// A closing bracket without its opener, or of the wrong kind: running it shows rustc's error.
    Invalid,
}

/// Judge a cell.
pub fn is_complete(code: &str) -> Completeness {
    let mut rust = String::with_capacity(code.len());
    let mut lines = code.split_inclusive('\n').peekable();
    // A `%%px` cell: only its body is Rust.
    while lines.peek().is_some_and(|l| l.trim().is_empty()) {
        lines.next();
    }
    if lines.peek().is_some_and(|l| l.trim_start().starts_with("%%")) {
        lines.next();
    }
    for line in lines {
        let t = line.trim_start();
        if (t.starts_with('%') && t[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')) || t.starts_with(':') {
            rust.push('\n');
        } else {
            rust.push_str(line);
        }
    }
    scan(&rust)
}

fn scan(code: &str) -> Completeness {
    let c: Vec<char> = code.chars().collect();
    let mut stack: Vec<char> = Vec::new();
    let mut i = 0;
    let n = c.len();
    while i < n {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < n && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 1;
                i += 2;
                while i < n && depth > 0 {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                if depth > 0 {
                    return Completeness::Incomplete(indent(stack.len()));
                }
                continue;
            }
            '"' => match skip_string(&c, i + 1) {
                Some(end) => i = end,
                None => return Completeness::Incomplete(String::new()),
            },
            'r' | 'b' if starts_raw(&c, i) && !ident_before(&c, i) => {
                let mut j = i + 1;
                if c[i] == 'b' {
                    j += 1; // br
                }
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                // c[j] == '"'
                j += 1;
                let mut closed = false;
                while j < n {
                    if c[j] == '"' && (1..=hashes).all(|h| c.get(j + h) == Some(&'#')) {
                        j += 1 + hashes;
                        closed = true;
                        break;
                    }
                    j += 1;
                }
                if !closed {
                    return Completeness::Incomplete(String::new());
                }
                i = j;
                continue;
            }
            '\'' => {
                // A char literal ('a', '\n', '\u{1F600}') or a lifetime / label ('a, 'static).
                if c.get(i + 1) == Some(&'\\') {
                    let mut j = i + 2;
                    while j < n && c[j] != '\'' && c[j] != '\n' {
                        j += 1;
                    }
                    i = j;
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 2;
                }
            }
            o @ ('(' | '[' | '{') => stack.push(o),
            close @ (')' | ']' | '}') => {
                let open = match close {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return Completeness::Invalid;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if stack.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Incomplete(indent(stack.len()))
    }
}

fn indent(depth: usize) -> String {
    "    ".repeat(depth)
}

/// From just after an opening `"`, the index of the closing quote (escapes honoured).
fn skip_string(c: &[char], mut i: usize) -> Option<usize> {
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// `r"`, `r#"`, `br"`, `br#"` at `i`.
fn starts_raw(c: &[char], i: usize) -> bool {
    let mut j = i;
    if c[j] == 'b' {
        if c.get(j + 1) != Some(&'r') {
            return false;
        }
        j += 1;
    }
    j += 1;
    while c.get(j) == Some(&'#') {
        j += 1;
    }
    c.get(j) == Some(&'"')
}

fn ident_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incomplete(code: &str) -> bool {
        matches!(is_complete(code), Completeness::Incomplete(_))
    }

    #[test]
    fn balanced_code_is_complete() {
        for code in ["1 + 1", "let x = 1;", "fn f() { if true { 1 } else { 2 } }", "let v = vec![1, 2, (3)];", ""] {
            assert_eq!(is_complete(code), Completeness::Complete, "{code}");
        }
    }

    #[test]
    fn open_brackets_are_incomplete_with_an_indent() {
        assert_eq!(is_complete("fn f() {"), Completeness::Incomplete("    ".into()));
        assert_eq!(is_complete("fn f() {\n    if x {"), Completeness::Incomplete("        ".into()));
        assert!(incomplete("let v = vec![1,"));
        assert!(incomplete("foo(1,\n 2"));
    }

    #[test]
    fn strings_and_comments_hide_brackets() {
        assert_eq!(is_complete(r#"let s = "{ not a block";"#), Completeness::Complete);
        assert_eq!(is_complete("let s = r#\"a \" } b\"#;"), Completeness::Complete);
        assert_eq!(is_complete("// fn f() {\nlet x = 1;"), Completeness::Complete);
        assert_eq!(is_complete("/* { /* nested */ { */ let x = 1;"), Completeness::Complete);
        assert_eq!(is_complete(r"let c = '{'; let d = '\''; let e = b'(';"), Completeness::Complete);
        assert_eq!(is_complete("fn f<'a>(x: &'a str) -> &'a str { x }"), Completeness::Complete);
        assert_eq!(is_complete(r#"let s = "esc \" {";"#), Completeness::Complete);
    }

    #[test]
    fn unterminated_strings_and_comments_are_incomplete() {
        assert!(incomplete("let s = \"abc"));
        assert!(incomplete("let s = r#\"abc\"; "));
        assert!(incomplete("/* still open"));
    }

    #[test]
    fn stray_closers_are_invalid() {
        assert_eq!(is_complete("}"), Completeness::Invalid);
        assert_eq!(is_complete("let x = (1];"), Completeness::Invalid);
    }

    #[test]
    fn magic_and_command_lines_are_not_rust() {
        assert_eq!(is_complete("%px let x = {"), Completeness::Complete);
        assert_eq!(is_complete("%%px --targets 0:2\nfn f() {"), Completeness::Incomplete("    ".into()));
        assert_eq!(is_complete("%%px\nlet x = 1;"), Completeness::Complete);
        assert_eq!(is_complete(":dep rand = { version = \"0.8\"\nlet x = 1;"), Completeness::Complete);
        // `% b` continuing an expression is code.
        assert!(incomplete("let r = (a\n% b"));
    }
}
