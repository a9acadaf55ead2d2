//! Cell text → [`CellStep`]s: recognises `%%px [options]` on the first line, the line magics
//! `%px CODE`, `%autopx`, `%pxresult`, `%pxconfig` on any line (runs of other lines are local
//! code), refuses unknown `%magic`s, and turns local code into `%%px` runs while `%autopx` is on
//! ([`parse_cell_autopx`]). The whole cell is checked before anything runs.

use crate::error::{MagicError, Result};
use crate::options::{is_long_option, Magic, PxOptions};

/// Printed (stdout, with a newline) when `%autopx` turns on.
pub const AUTOPX_ENABLED: &str = "%autopx enabled";
/// Printed (stdout, with a newline) when `%autopx` turns off.
pub const AUTOPX_DISABLED: &str = "%autopx disabled";

/// One thing to do, in cell order.
#[derive(Clone, Debug, PartialEq)]
pub enum CellStep {
    /// Rust code for the kernel's own evcxr context (a plain cell, or lines between magics).
    Local(String),
    /// Run `code` on the engines with these options (`%px CODE` has none; `%%px OPTIONS` has
    /// the first line's). Combine with [`crate::PxConfig::effective`].
    Px {
        /// The code, without the magic line.
        code: String,
        /// The cell's own options.
        options: PxOptions,
    },
    /// Toggle autopx; print [`AUTOPX_ENABLED`] or [`AUTOPX_DISABLED`].
    Autopx,
    /// Show the last `%px` result (group with `options.group_outputs`, else the config's).
    PxResult(PxOptions),
    /// Change the defaults: [`crate::PxConfig::apply`].
    PxConfig(PxOptions),
    /// `--help` was given: print `text` (stdout) and run nothing else of this magic.
    Help {
        /// Which magic.
        magic: Magic,
        /// Its usage text.
        text: String,
    },
}

const LINE_MAGICS: &[&str] = &["px", "autopx", "pxresult", "pxconfig", "result"];

/// Parses a cell into the commands to run, in order.
///
/// - A cell whose first non-blank line is `%%px [options]` is one [`CellStep::Px`] with the rest
///   of the cell as code (an empty body is an error).
/// - Otherwise every line that starts (after indentation) with `%name` is a line magic, and the
///   runs of other lines between them are [`CellStep::Local`] (blank runs are dropped).
/// - A cell with no magic line is exactly `[CellStep::Local(text)]`, unchanged.
///
/// A line counts as a magic line only if `%` is followed by a letter or `_` (or `%%` by one),
/// so `% b` continuing a Rust expression is code. Every magic in the cell is checked before
/// anything is returned: on `Err`, nothing should run.
pub fn parse_cell(text: &str) -> Result<Vec<CellStep>> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let Some(first) = lines.iter().position(|l| !l.trim().is_empty()) else {
        return Ok(vec![CellStep::Local(text.to_string())]);
    };
    if let Some(after) = cell_magic(lines[first]) {
        let (name, rest) = split_name(after);
        return match name {
            "px" => {
                let options = PxOptions::parse(Magic::CellPx, rest)?;
                if options.help {
                    return Ok(vec![help(Magic::CellPx)]);
                }
                let code = lines[first + 1..].concat();
                if code.trim().is_empty() {
                    return Err(MagicError::MissingCode { magic: Magic::CellPx });
                }
                Ok(vec![CellStep::Px { code, options }])
            }
            n if LINE_MAGICS.contains(&n) => Err(MagicError::NotACellMagic { name: n.to_string() }),
            n => Err(MagicError::UnknownMagic { given: format!("%%{n}"), suggestion: suggest(n, &["px"]).map(|s| format!("%%{s}")) }),
        };
    }
    if !lines.iter().any(|l| line_magic(l).is_some() || cell_magic(l).is_some()) {
        return Ok(vec![CellStep::Local(text.to_string())]);
    }
    let mut out = Vec::new();
    let mut local = String::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(after) = cell_magic(line) {
            return Err(MagicError::CellMagicNotFirst { given: format!("%%{}", split_name(after).0), line: i + 1 });
        }
        let Some(after) = line_magic(line) else {
            local.push_str(line);
            continue;
        };
        if !local.trim().is_empty() {
            out.push(CellStep::Local(std::mem::take(&mut local)));
        }
        local.clear();
        out.push(parse_line_magic(after)?);
    }
    if !local.trim().is_empty() {
        out.push(CellStep::Local(local));
    }
    Ok(out)
}

/// [`parse_cell`] for a kernel whose autopx is `autopx_on` at the start of the cell: while
/// autopx is on (following the [`CellStep::Autopx`] toggles inside the cell), local code becomes
/// [`CellStep::Px`] with no options, so it runs on the engines with the config's defaults.
/// Magics keep working; a cell that is just `%autopx` turns it off. The kernel still flips its
/// own flag on each [`CellStep::Autopx`].
pub fn parse_cell_autopx(text: &str, autopx_on: bool) -> Result<Vec<CellStep>> {
    let mut on = autopx_on;
    let mut out = Vec::new();
    for cmd in parse_cell(text)? {
        match cmd {
            CellStep::Autopx => {
                on = !on;
                out.push(CellStep::Autopx);
            }
            CellStep::Local(code) if on => {
                if !code.trim().is_empty() {
                    out.push(CellStep::Px { code, options: PxOptions::default() });
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// The message to print after an `%autopx` toggle left autopx `now_on`.
pub fn autopx_message(now_on: bool) -> &'static str {
    if now_on {
        AUTOPX_ENABLED
    } else {
        AUTOPX_DISABLED
    }
}

fn help(magic: Magic) -> CellStep {
    CellStep::Help { magic, text: magic.usage() }
}

/// The text after `%` if `line` is a line magic (`%` then a letter or `_`).
fn line_magic(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('%')?;
    rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_').then_some(rest)
}

/// The text after `%%` if `line` is a cell magic.
fn cell_magic(line: &str) -> Option<&str> {
    line_magic(line.trim_start().strip_prefix('%')?)
}

/// `name rest...` → (`name`, `rest...` without the trailing newline).
fn split_name(after: &str) -> (&str, &str) {
    let after = after.trim_end_matches(['\n', '\r']);
    match after.find(char::is_whitespace) {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    }
}

fn parse_line_magic(after: &str) -> Result<CellStep> {
    let (name, rest) = split_name(after);
    let is_help = matches!(rest.trim(), "--help" | "-h");
    match name {
        "px" => {
            let code = rest.trim();
            if code.is_empty() {
                return Err(MagicError::MissingCode { magic: Magic::Px });
            }
            if is_help {
                return Ok(help(Magic::Px));
            }
            let first = code.split_whitespace().next().unwrap_or_default();
            if is_long_option(first) {
                return Err(MagicError::LineMagicTakesNoOptions { option: first.to_string() });
            }
            Ok(CellStep::Px { code: code.to_string(), options: PxOptions::default() })
        }
        "autopx" => {
            if is_help {
                return Ok(help(Magic::Autopx));
            }
            match rest.split_whitespace().next() {
                None => Ok(CellStep::Autopx),
                Some(arg) => Err(MagicError::UnexpectedArgument { magic: Magic::Autopx, arg: arg.to_string() }),
            }
        }
        "pxresult" | "result" => {
            let o = PxOptions::parse(Magic::PxResult, rest)?;
            Ok(if o.help { help(Magic::PxResult) } else { CellStep::PxResult(o) })
        }
        "pxconfig" => {
            let o = PxOptions::parse(Magic::PxConfig, rest)?;
            Ok(if o.help { help(Magic::PxConfig) } else { CellStep::PxConfig(o) })
        }
        n => Err(MagicError::UnknownMagic { given: format!("%{n}"), suggestion: suggest(n, LINE_MAGICS).map(|s| format!("%{s}")) }),
    }
}

/// The known name closest to `name`, if it is a likely typo (edit distance ≤ 2, or `name`
/// extends a known name, as `pxx` or `pxconfigs`).
fn suggest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2 || (name.starts_with(k) && k.len() >= 2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::GroupOutputs;
    use crate::{Selector, Slice, TargetSpec};

    fn parse(s: &str) -> Vec<CellStep> {
        parse_cell(s).unwrap()
    }

    fn err(s: &str) -> String {
        parse_cell(s).unwrap_err().to_string()
    }

    fn px(code: &str) -> CellStep {
        CellStep::Px { code: code.to_string(), options: PxOptions::default() }
    }

    #[test]
    fn plain_cells_are_untouched() {
        for s in ["let a = 1;", "", "  \n", "let x = a\n    % b;\n", "let x = a\n%2;", "println!(\"%px\");"] {
            assert_eq!(parse(s), vec![CellStep::Local(s.to_string())], "{s:?}");
        }
        // The limit: a line of a string literal that starts with `%name` is read as a magic.
        assert!(parse_cell("let s = \"\n%px\";").is_err());
    }

    #[test]
    fn line_px() {
        assert_eq!(parse("%px let v: Vec<u64> = (0..10).collect();"), vec![px("let v: Vec<u64> = (0..10).collect();")]);
        assert_eq!(parse("  %px   a += 1;  \n"), vec![px("a += 1;")]);
        assert_eq!(parse("\n%px a\n\n"), vec![px("a")]);
        // The rest of the line is code, even if it looks like options for another magic.
        assert_eq!(parse("%px -t"), vec![px("-t")]);
        assert_eq!(parse("%px --x"), vec![px("--x")]);
    }

    #[test]
    fn line_px_without_code_is_an_error() {
        assert_eq!(parse_cell("%px").unwrap_err(), MagicError::MissingCode { magic: Magic::Px });
        assert_eq!(err("%px   "), "%px needs code to run on the engines, e.g. `%px println!(\"hi\");`");
    }

    #[test]
    fn line_px_takes_no_options() {
        assert_eq!(
            err("%px --targets 0 a"),
            "%px takes no options (the rest of the line is code, and `--targets` is not Rust); put the options on a cell magic: `%%px --targets ...` on the first line, the code below"
        );
        assert!(matches!(parse_cell("%px --block=1 x").unwrap_err(), MagicError::LineMagicTakesNoOptions { .. }));
    }

    #[test]
    fn cell_px() {
        assert_eq!(parse("%%px\nlet a = 1;\nlet b = 2;\n"), vec![px("let a = 1;\nlet b = 2;\n")]);
        assert_eq!(
            parse("\n%%px --targets 0:2 --noblock\nprintln!(\"{}\", 1);"),
            vec![CellStep::Px {
                code: "println!(\"{}\", 1);".into(),
                options: PxOptions {
                    targets: Some(TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(0), stop: Some(2), step: None })])),
                    block: Some(false),
                    ..PxOptions::default()
                }
            }]
        );
        // The body goes to the engines verbatim, magics and all.
        assert_eq!(parse("%%px\n%px x\n"), vec![px("%px x\n")]);
        // CRLF line ends.
        assert_eq!(
            parse("%%px -e\r\nx\r\n"),
            vec![CellStep::Px {
                code: "x\r\n".into(),
                options: PxOptions { group_outputs: Some(GroupOutputs::Engine), ..PxOptions::default() }
            }]
        );
    }

    #[test]
    fn cell_px_errors() {
        assert_eq!(parse_cell("%%px").unwrap_err(), MagicError::MissingCode { magic: Magic::CellPx });
        assert_eq!(
            err("%%px -t 0\n  \n"),
            "%%px needs code to run on the engines, e.g. `%%px` on the first line and `println!(\"hi\");` below it"
        );
        assert!(err("%%px --targts 1\nx").starts_with("unknown option `--targts` for %%px; valid options: -t/--targets T, "));
        assert_eq!(
            err("let a = 1;\n%%px\nx"),
            "`%%px` must be on the first line of the cell (it is on line 2); use `%px CODE` for a single line"
        );
    }

    #[test]
    fn other_line_magics() {
        assert_eq!(parse("%autopx"), vec![CellStep::Autopx]);
        assert_eq!(parse("%pxresult"), vec![CellStep::PxResult(PxOptions::default())]);
        assert_eq!(
            parse("%result -e"),
            vec![CellStep::PxResult(PxOptions { group_outputs: Some(GroupOutputs::Engine), ..PxOptions::default() })]
        );
        assert_eq!(parse("%pxconfig"), vec![CellStep::PxConfig(PxOptions::default())]);
        assert_eq!(
            parse("%pxconfig --noblock -t ::2"),
            vec![CellStep::PxConfig(PxOptions {
                block: Some(false),
                targets: Some(TargetSpec::Select(vec![Selector::Slice(Slice { step: Some(2), ..Slice::default() })])),
                ..PxOptions::default()
            })]
        );
        assert_eq!(err("%autopx on"), "unexpected argument `on` for %autopx; %autopx takes no arguments (it toggles)");
        assert!(err("%pxresult --block").starts_with("unknown option `--block` for %pxresult"));
        assert!(err("%pxconfig --local").starts_with("unknown option `--local` for %pxconfig"));
    }

    #[test]
    fn help() {
        for (s, m) in [
            ("%%px --help\n", Magic::CellPx),
            ("%%px -h\nx", Magic::CellPx),
            ("%px --help", Magic::Px),
            ("%autopx -h", Magic::Autopx),
            ("%pxresult --help", Magic::PxResult),
            ("%pxconfig --help", Magic::PxConfig),
        ] {
            assert_eq!(parse(s), vec![CellStep::Help { magic: m, text: m.usage() }], "{s}");
        }
    }

    #[test]
    fn unknown_magics_say_so() {
        assert_eq!(
            err("%pxx a"),
            "unknown magic `%pxx` (did you mean `%px`?); valid magics: %px CODE, %%px [options], %autopx, %pxresult [options], %pxconfig [options]"
        );
        assert_eq!(
            parse_cell("%pxconfigs -t 1").unwrap_err(),
            MagicError::UnknownMagic { given: "%pxconfigs".into(), suggestion: Some("%pxconfig".into()) }
        );
        assert_eq!(
            parse_cell("%autpx").unwrap_err(),
            MagicError::UnknownMagic { given: "%autopx".replace("autopx", "autpx"), suggestion: Some("%autopx".into()) }
        );
        assert_eq!(parse_cell("%timeit x").unwrap_err(), MagicError::UnknownMagic { given: "%timeit".into(), suggestion: None });
        assert_eq!(
            err("%%pxx\nx"),
            "unknown magic `%%pxx` (did you mean `%%px`?); valid magics: %px CODE, %%px [options], %autopx, %pxresult [options], %pxconfig [options]"
        );
        assert_eq!(parse_cell("%%time\nx").unwrap_err(), MagicError::UnknownMagic { given: "%%time".into(), suggestion: None });
        assert_eq!(err("%%pxconfig -t 1\n"), "`%%pxconfig` is not a cell magic: write `%pxconfig` (one `%`); the only cell magic is %%px");
        for n in ["autopx", "pxresult", "result"] {
            assert_eq!(parse_cell(&format!("%%{n}")).unwrap_err(), MagicError::NotACellMagic { name: n.into() });
        }
    }

    #[test]
    fn mixed_cells_run_in_order() {
        let cell = "%pxconfig --targets 0:2\nlet local = 1;\nlet more = 2;\n%px let a = 1;\n\n%pxresult\nprintln!(\"done\");";
        assert_eq!(
            parse(cell),
            vec![
                CellStep::PxConfig(PxOptions {
                    targets: Some(TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(0), stop: Some(2), step: None })])),
                    ..PxOptions::default()
                }),
                CellStep::Local("let local = 1;\nlet more = 2;\n".into()),
                px("let a = 1;"),
                CellStep::PxResult(PxOptions::default()),
                CellStep::Local("println!(\"done\");".into()),
            ]
        );
    }

    #[test]
    fn a_bad_magic_anywhere_fails_the_whole_cell() {
        assert!(parse_cell("%px a\n%px b\n%pxconfig --bogus").is_err());
        assert!(parse_cell("let a = 1;\n%pxx b").is_err());
    }

    #[test]
    fn autopx_runs_plain_code_on_engines() {
        let on = |s| parse_cell_autopx(s, true).unwrap();
        let off = |s| parse_cell_autopx(s, false).unwrap();
        assert_eq!(on("let a = 5;\nlet b = 6;"), vec![px("let a = 5;\nlet b = 6;")]);
        assert_eq!(off("let a = 5;"), vec![CellStep::Local("let a = 5;".into())]);
        // Magics still work while autopx is on.
        assert_eq!(on("%pxconfig --noblock"), vec![CellStep::PxConfig(PxOptions { block: Some(false), ..PxOptions::default() })]);
        assert_eq!(on("%pxresult"), vec![CellStep::PxResult(PxOptions::default())]);
        assert_eq!(on("%%px -t 0\nx"), parse("%%px -t 0\nx"));
        // A cell `%autopx` turns it off; nothing runs on the engines.
        assert_eq!(on("%autopx"), vec![CellStep::Autopx]);
        assert_eq!(on("  %autopx  \n"), vec![CellStep::Autopx]);
        // The toggle applies to the lines after it in the same cell.
        assert_eq!(on("%autopx\nlet a = 1;"), vec![CellStep::Autopx, CellStep::Local("let a = 1;".into())]);
        assert_eq!(off("%autopx\nlet a = 1;"), vec![CellStep::Autopx, px("let a = 1;")]);
        // An empty cell does nothing, on or off.
        assert_eq!(on(""), vec![]);
        assert_eq!(on("\n  \n"), vec![]);
        assert_eq!(autopx_message(true), "%autopx enabled");
        assert_eq!(autopx_message(false), "%autopx disabled");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("px", "px"), 0);
        assert_eq!(edit_distance("pxx", "px"), 1);
        assert_eq!(edit_distance("autpx", "autopx"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest("pxcnfig", LINE_MAGICS), Some("pxconfig"));
        assert_eq!(suggest("time", LINE_MAGICS), None);
    }
}
