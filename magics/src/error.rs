//! The crate's one error type, [`MagicError`]: every way a magic line, an option, a target
//! specification or a `%pxresult` can be wrong. Each message names the problem and, where there
//! is a fixed set of valid choices, lists them, so the kernel can show it as the error reply as is.

use crate::options::Magic;

/// `Result` with [`MagicError`] as the default error.
pub type Result<T, E = MagicError> = std::result::Result<T, E>;

/// The magics rpx knows, as listed in error messages.
pub const VALID_MAGICS: &str = "%px CODE, %%px [options], %autopx, %pxresult [options], %pxconfig [options]";

use rpx_protocol::targets::TargetError;
pub use rpx_protocol::targets::{fmt_ids, TARGET_FORMS};

/// Everything that can be wrong with a magic. Nothing has been sent to any engine when one of
/// these is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MagicError {
    /// A `%name` or `%%name` that rpx does not know.
    #[error("unknown magic `{given}`{}; valid magics: {VALID_MAGICS}", did_you_mean(.suggestion))]
    UnknownMagic {
        /// The magic as written, with its `%` or `%%`.
        given: String,
        /// A close known magic, with its `%` or `%%`.
        suggestion: Option<String>,
    },
    /// A line magic written as a cell magic (`%%pxconfig`).
    #[error("`%%{name}` is not a cell magic: write `%{name}` (one `%`); the only cell magic is %%px")]
    NotACellMagic {
        /// The magic's name without `%`.
        name: String,
    },
    /// A `%%` cell magic below the first line of the cell.
    #[error("`{given}` must be on the first line of the cell (it is on line {line}); use `%px CODE` for a single line")]
    CellMagicNotFirst {
        /// The magic as written.
        given: String,
        /// 1-based line number.
        line: usize,
    },
    /// `%px` with nothing after it, or a `%%px` cell with an empty body.
    #[error("{magic} needs code to run on the engines, e.g. {}", code_example(*.magic))]
    MissingCode {
        /// Which magic.
        magic: Magic,
    },
    /// `%px --targets 0 CODE`: the line magic takes no options.
    #[error("%px takes no options (the rest of the line is code, and `{option}` is not Rust); put the options on a cell magic: `%%px {option} ...` on the first line, the code below")]
    LineMagicTakesNoOptions {
        /// The option-like word that starts the code.
        option: String,
    },
    /// An option this magic does not have.
    #[error("unknown option `{option}` for {magic}; valid options: {}", .magic.options_summary())]
    UnknownOption {
        /// Which magic.
        magic: Magic,
        /// The option as written.
        option: String,
    },
    /// A `--prefix` that abbreviates several options.
    #[error("ambiguous option `{option}` for {magic}: could be {}", .candidates.join(", "))]
    AmbiguousOption {
        /// Which magic.
        magic: Magic,
        /// The option as written.
        option: String,
        /// The options it could mean, with their dashes.
        candidates: Vec<String>,
    },
    /// An option that takes a value, given none.
    #[error("option `{option}` of {magic} needs a value: {option} {metavar}")]
    MissingValue {
        /// Which magic.
        magic: Magic,
        /// The option (canonical long or short form).
        option: String,
        /// What the value looks like.
        metavar: &'static str,
    },
    /// A flag given a value (`--block=yes`).
    #[error("option `{option}` of {magic} takes no value (got `{value}`)")]
    UnexpectedValue {
        /// Which magic.
        magic: Magic,
        /// The option.
        option: String,
        /// The value given.
        value: String,
    },
    /// An option value that does not parse.
    #[error("invalid value `{value}` for `{option}` of {magic}: expected {expected}")]
    InvalidValue {
        /// Which magic.
        magic: Magic,
        /// The option.
        option: String,
        /// The value given.
        value: String,
        /// What would have been valid.
        expected: String,
    },
    /// A word on an option line that is not an option.
    #[error("unexpected argument `{arg}` for {magic}; {}", takes(*.magic))]
    UnexpectedArgument {
        /// Which magic.
        magic: Magic,
        /// The word.
        arg: String,
    },
    /// An option line with an unclosed `'` or `"`.
    #[error("unclosed quote in the options of {magic}")]
    UnclosedQuote {
        /// Which magic.
        magic: Magic,
    },
    /// A target specification that does not parse, names an engine that is not registered or
    /// selects none (the one grammar's error, `rpx_protocol::targets`).
    #[error(transparent)]
    Targets(TargetError),
    /// No engine is registered at all.
    #[error("no engines are registered; start some with `ipcluster start -n 4` or `ipcluster engines -n 4`")]
    NoEngines,
    /// `%pxresult` before any `%px`.
    #[error("%pxresult recalls last %px result, which has not yet been used.")]
    NoLastResult,
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

fn code_example(m: Magic) -> &'static str {
    match m {
        Magic::CellPx => "`%%px` on the first line and `println!(\"hi\");` below it",
        _ => "`%px println!(\"hi\");`",
    }
}

fn takes(m: Magic) -> String {
    match m {
        Magic::Autopx => "%autopx takes no arguments (it toggles)".to_string(),
        m => format!("valid options: {}", m.options_summary()),
    }
}

/// A target error is [`MagicError::Targets`], except "no engines at all", which is
/// [`MagicError::NoEngines`] (its message says how to start some).
impl From<TargetError> for MagicError {
    fn from(e: TargetError) -> MagicError {
        match e {
            TargetError::NoEngines => MagicError::NoEngines,
            other => MagicError::Targets(other),
        }
    }
}

/// A magic used wrongly, as the cell's error: `UsageError` with the message.
impl From<MagicError> for rpx_protocol::content::ErrorContent {
    fn from(e: MagicError) -> Self {
        rpx_protocol::content::ErrorContent::new(rpx_protocol::content::ErrorName::UsageError, e.to_string(), vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_without_a_parser_test_elsewhere() {
        assert_eq!(MagicError::NoLastResult.to_string(), "%pxresult recalls last %px result, which has not yet been used.");
        assert_eq!(
            MagicError::NoEngines.to_string(),
            "no engines are registered; start some with `ipcluster start -n 4` or `ipcluster engines -n 4`"
        );
        assert_eq!(
            MagicError::UnknownMagic { given: "%x".into(), suggestion: None }.to_string(),
            format!("unknown magic `%x`; valid magics: {VALID_MAGICS}")
        );
        assert_eq!(fmt_ids(&[]), "[]");
        assert_eq!(fmt_ids(&[3, 1]), "[3, 1]");
    }
}
