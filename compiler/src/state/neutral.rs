//! Which cells can leave a compiler context's state as they found it, read from their source.
//!
//! A cell that only runs statements (no items, `use`, `extern crate`, attributes, `:` commands,
//! macro calls in braces, which may expand to items, `?` or `.await`, which switch evcxr's
//! modes) changes what its context believes in only
//! through the variables its top-level `let`s bind or the variables it moves. With no `let`,
//! or with exactly the `let`s of the group's last cell (same names, same mutability), the
//! context is unchanged if its variables' names and types are: the eval reports that, and
//! together they let a subset of a group run such a cell in the group's own context without
//! forking (a cell that prints a value on one engine, the same cell again on one engine).

use syn::parse::Parser;
use syn::visit::Visit;
use syn::{Block, ExprAwait, ExprTry, MacroDelimiter, Stmt};

use super::{Hist, Verdict};

/// Whether `code` can leave a context's state unchanged, given the last cell of the group's
/// history. Only a candidate: the eval must still find the variables unchanged.
pub fn may_leave_context_alone(code: &str, last: Option<&Hist>) -> bool {
    let Ok(stmts) = Block::parse_within.parse_str(code) else { return false };
    let mut binds = false;
    for stmt in &stmts {
        match stmt {
            Stmt::Item(_) => return false,
            Stmt::Macro(m) if matches!(m.mac.delimiter, MacroDelimiter::Brace(_)) => return false,
            Stmt::Local(_) => binds = true,
            Stmt::Expr(..) | Stmt::Macro(_) => {}
        }
    }
    let mut modes = ModeSwitches::default();
    for stmt in &stmts {
        modes.visit_stmt(stmt);
    }
    if modes.found {
        return false;
    }
    !binds || last.is_some_and(|h| h.code == code && h.verdict == Verdict::Ok)
}

/// Finds the expressions that make evcxr switch a context's mode (`?` and `.await`).
#[derive(Default)]
struct ModeSwitches {
    found: bool,
}

impl<'ast> Visit<'ast> for ModeSwitches {
    fn visit_expr_try(&mut self, _: &'ast ExprTry) {
        self.found = true;
    }
    fn visit_expr_await(&mut self, _: &'ast ExprAwait) {
        self.found = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(code: &str, verdict: Verdict) -> Hist {
        Hist { code: code.into(), verdict }
    }

    #[test]
    fn statements_without_let_are_candidates() {
        for code in ["println!(\"{x}\");", "x.push(1); x.len()", "v[0] = 3;", "{ let inner = 1; inner + 1 }", "", "if x > 1 { y = 2; }"] {
            assert!(may_leave_context_alone(code, None), "{code}");
        }
    }

    #[test]
    fn a_let_is_a_candidate_only_as_a_repeat_of_the_last_clean_cell() {
        let code = "let _t = 1;";
        assert!(!may_leave_context_alone(code, None));
        assert!(may_leave_context_alone(code, Some(&last(code, Verdict::Ok))));
        assert!(!may_leave_context_alone(code, Some(&last("let mut _t = 1;", Verdict::Ok))), "mutability may differ");
        assert!(!may_leave_context_alone(code, Some(&last(code, Verdict::Panic))), "the panic made evcxr forget it");
    }

    #[test]
    fn items_commands_and_mode_switches_are_not() {
        for code in [
            "fn f() {}",
            "use std::fmt;",
            "extern crate serde;",
            "struct S;",
            "impl S {}",
            "macro_rules! m { () => {} }",
            "thread_local! { static X: u8 = 1; }",
            ":dep serde",
            "#![allow(unused)]\nx",
            "let y = f()?;",
            "g()?;",
            "fut.await;",
            "let x = ",
        ] {
            assert!(!may_leave_context_alone(code, Some(&last(code, Verdict::Ok))), "{code}");
        }
    }
}
