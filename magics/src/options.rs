//! Option lines of `%%px`, `%pxconfig` and `%pxresult`: the shell-like word splitter, the option
//! table (which magic takes which option, with ipyparallel's flags: `-b/--block`, `-a/--noblock`,
//! `-t/--targets`, `-r`, `-e`, ...), argparse's rules (unique `--prefix` abbreviations,
//! `--opt=value`, bundled short flags `-be`, `-t1`, later options win) and the parsed values
//! ([`PxOptions`], [`GroupOutputs`], [`Signal`]). Also the usage text behind `--help`.

use std::fmt;
use std::str::FromStr;

use rpx_protocol::signals;

use crate::error::{MagicError, Result};
use crate::TargetSpec;

/// The magics, as named in errors and help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Magic {
    /// `%px CODE` (line magic; no options).
    Px,
    /// `%%px [options]` (cell magic).
    CellPx,
    /// `%autopx` (toggle; no options).
    Autopx,
    /// `%pxresult [options]` (also `%result`).
    PxResult,
    /// `%pxconfig [options]`.
    PxConfig,
}

impl Magic {
    /// The magic as written: `%px`, `%%px`, `%autopx`, `%pxresult`, `%pxconfig`.
    pub fn as_str(self) -> &'static str {
        match self {
            Magic::Px => "%px",
            Magic::CellPx => "%%px",
            Magic::Autopx => "%autopx",
            Magic::PxResult => "%pxresult",
            Magic::PxConfig => "%pxconfig",
        }
    }

    fn accepts(self, opt: Opt) -> bool {
        use Opt::*;
        let exec = matches!(opt, Targets | Block | NoBlock | Stream | NoStream | Verbose | NoVerbose | ProgressAfter | SignalOnInterrupt);
        let output = matches!(opt, GroupOutputs | GroupOrder | GroupEngine);
        opt == Help
            || match self {
                Magic::CellPx => true,
                Magic::PxConfig => exec || output,
                Magic::PxResult => output,
                Magic::Px | Magic::Autopx => false,
            }
    }

    fn specs(self) -> impl Iterator<Item = &'static OptSpec> {
        OPTS.iter().filter(move |s| self.accepts(s.opt))
    }

    /// One line listing this magic's options, for error messages.
    pub fn options_summary(self) -> String {
        let list: Vec<String> = self.specs().map(|s| s.synopsis()).collect();
        list.join(", ")
    }

    /// The `--help` text: usage, what the magic does, and its options.
    pub fn usage(self) -> String {
        let (synopsis, what) = match self {
            Magic::Px => ("%px CODE", "Run CODE (the rest of the line) on the engines. Takes no options: use %%px or %pxconfig to choose targets, blocking and output."),
            Magic::CellPx => ("%%px [options]\nCODE...", "Run the rest of the cell on the engines. Options hold for this cell only."),
            Magic::Autopx => ("%autopx", "Toggle running every following cell on the engines, as %%px with the %pxconfig defaults. Magics keep working; a cell `%autopx` turns it off."),
            Magic::PxResult => ("%pxresult [options]", "Wait for the last %px and show its outputs (also %result)."),
            Magic::PxConfig => ("%pxconfig [options]", "Set the defaults of later %px, %%px and %autopx cells."),
        };
        let mut s = format!("usage: {synopsis}\n\n{what}\n");
        let rows: Vec<(String, &str)> = self.specs().map(|o| (o.synopsis(), o.help)).collect();
        if !rows.is_empty() {
            let width = rows.iter().map(|(a, _)| a.len()).max().unwrap_or(0);
            s.push_str("\noptions:\n");
            for (a, h) in rows {
                s.push_str(&format!("  {a:width$}  {h}\n"));
            }
        }
        s
    }
}

impl fmt::Display for Magic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How `%%px --no-stream` and `%pxresult` order the outputs of several engines (ipyparallel's
/// `--group-outputs`). Streamed output always appears in arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum GroupOutputs {
    /// All stdout (engine by engine), then all stderr, then all rich outputs, then all results.
    #[default]
    Type,
    /// Everything of the first engine, then everything of the next, ...
    Engine,
    /// Like `Type`, but the i-th rich output of every engine is shown together (first plots of
    /// all engines, then the second plots, ...).
    Order,
}

impl GroupOutputs {
    /// `type`, `engine` or `order`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupOutputs::Type => "type",
            GroupOutputs::Engine => "engine",
            GroupOutputs::Order => "order",
        }
    }
}

impl fmt::Display for GroupOutputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupOutputs {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        match s {
            "type" => Ok(GroupOutputs::Type),
            "engine" => Ok(GroupOutputs::Engine),
            "order" => Ok(GroupOutputs::Order),
            _ => Err(()),
        }
    }
}

/// The signal names `--signal-on-interrupt` accepts (with or without `SIG`, any case): those of
/// the one table in `rpx_protocol::signals`, for the error message.
pub fn signal_names() -> String {
    signals::SIGNALS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// The signal sent to the engines when the user interrupts a blocking `%px`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// A number (`0` sends nothing, as ipyparallel's nop).
    Number(u8),
    /// A name from `rpx_protocol::signals::SIGNALS`, upper case with `SIG`.
    Name(String),
}

impl Default for Signal {
    fn default() -> Self {
        Signal::Name("SIGINT".to_string())
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signal::Number(n) => write!(f, "{n}"),
            Signal::Name(s) => f.write_str(s),
        }
    }
}

impl FromStr for Signal {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u8>() {
                Ok(n) if i32::from(n) <= signals::MAX_SIGNAL => Ok(Signal::Number(n)),
                _ => Err(()),
            };
        }
        signals::lookup(s).map(|(name, _)| Signal::Name(name.to_string())).ok_or(())
    }
}

/// The options given on one magic line. `None` means "not given": the [`crate::PxConfig`]
/// default applies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PxOptions {
    /// `-t/--targets T`.
    pub targets: Option<TargetSpec>,
    /// `-b/--block` (true) or `-a/--noblock` (false).
    pub block: Option<bool>,
    /// `--stream` / `--no-stream`.
    pub stream: Option<bool>,
    /// `--verbose` / `--no-verbose`.
    pub verbose: Option<bool>,
    /// `--group-outputs=type|engine|order`, `-e` (engine), `-r` (order).
    pub group_outputs: Option<GroupOutputs>,
    /// `--progress-after SECONDS` (-1: never show progress, 0: at once).
    pub progress_after: Option<f64>,
    /// `--signal-on-interrupt SIG`.
    pub signal_on_interrupt: Option<Signal>,
    /// `--local` (`%%px` only): also run the cell in the kernel.
    pub local: bool,
    /// `-h/--help`: show the usage instead of running anything.
    pub help: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Targets,
    Block,
    NoBlock,
    Stream,
    NoStream,
    Verbose,
    NoVerbose,
    ProgressAfter,
    SignalOnInterrupt,
    GroupOutputs,
    GroupEngine,
    GroupOrder,
    Local,
    Help,
}

struct OptSpec {
    opt: Opt,
    short: Option<char>,
    long: Option<&'static str>,
    /// What the value looks like; `None` for flags.
    metavar: Option<&'static str>,
    help: &'static str,
}

impl OptSpec {
    fn name(&self) -> String {
        match (self.long, self.short) {
            (Some(l), _) => format!("--{l}"),
            (None, Some(c)) => format!("-{c}"),
            (None, None) => unreachable!("every option has a name"),
        }
    }

    fn synopsis(&self) -> String {
        let mut s = match (self.short, self.long) {
            (Some(c), Some(l)) => format!("-{c}/--{l}"),
            _ => self.name(),
        };
        if let Some(m) = self.metavar {
            s.push(' ');
            s.push_str(m);
        }
        s
    }
}

const OPTS: &[OptSpec] = &[
    OptSpec {
        opt: Opt::Targets,
        short: Some('t'),
        long: Some("targets"),
        metavar: Some("T"),
        help: "engines to run on: all, 0, -1, 0:4, ::2, 1,3,5 (default all)",
    },
    OptSpec {
        opt: Opt::Block,
        short: Some('b'),
        long: Some("block"),
        metavar: None,
        help: "wait for the engines and show their output (default)",
    },
    OptSpec {
        opt: Opt::NoBlock,
        short: Some('a'),
        long: Some("noblock"),
        metavar: None,
        help: "return at once; see the output with %pxresult",
    },
    OptSpec { opt: Opt::Stream, short: None, long: Some("stream"), metavar: None, help: "show output as it arrives (default)" },
    OptSpec {
        opt: Opt::NoStream,
        short: None,
        long: Some("no-stream"),
        metavar: None,
        help: "show output when all engines are done, grouped by --group-outputs",
    },
    OptSpec { opt: Opt::Verbose, short: None, long: Some("verbose"), metavar: None, help: "print which engines each execution runs on" },
    OptSpec { opt: Opt::NoVerbose, short: None, long: Some("no-verbose"), metavar: None, help: "do not (default)" },
    OptSpec {
        opt: Opt::ProgressAfter,
        short: None,
        long: Some("progress-after"),
        metavar: Some("SECONDS"),
        help: "show a progress bar after this long (default 2; -1 never, 0 at once)",
    },
    OptSpec {
        opt: Opt::SignalOnInterrupt,
        short: None,
        long: Some("signal-on-interrupt"),
        metavar: Some("SIG"),
        help: "signal sent to the engines on interrupt: SIGINT (default), SIGKILL, 9, 0 (none), ...",
    },
    OptSpec {
        opt: Opt::GroupOutputs,
        short: None,
        long: Some("group-outputs"),
        metavar: Some("engine|order|type"),
        help: "how to order outputs when not streaming (default type)",
    },
    OptSpec { opt: Opt::GroupEngine, short: Some('e'), long: None, metavar: None, help: "same as --group-outputs=engine" },
    OptSpec { opt: Opt::GroupOrder, short: Some('r'), long: None, metavar: None, help: "same as --group-outputs=order" },
    OptSpec { opt: Opt::Local, short: None, long: Some("local"), metavar: None, help: "also run the cell in the kernel" },
    OptSpec { opt: Opt::Help, short: Some('h'), long: Some("help"), metavar: None, help: "show this help" },
];

/// Whether `word` (the first word of a `%px` line) is one of the long options, so that
/// `%px --targets 0 x` can be refused instead of sent to the engines as code.
pub(crate) fn is_long_option(word: &str) -> bool {
    let Some(name) = word.strip_prefix("--") else {
        return false;
    };
    let name = name.split('=').next().unwrap_or(name);
    OPTS.iter().any(|s| s.long == Some(name))
}

impl PxOptions {
    /// Parses the options of `magic` from `line` (the text after the magic's name).
    pub fn parse(magic: Magic, line: &str) -> Result<PxOptions> {
        let words = split_words(magic, line)?;
        let mut opts = PxOptions::default();
        let mut i = 0;
        while i < words.len() {
            let word = &words[i];
            i += 1;
            if let Some(long) = word.strip_prefix("--") {
                if long.is_empty() || long.starts_with('=') {
                    return Err(MagicError::UnexpectedArgument { magic, arg: word.clone() });
                }
                let (name, inline) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                let spec = lookup_long(magic, name, word)?;
                let value = match (spec.metavar, inline) {
                    (None, None) => None,
                    (None, Some(v)) => return Err(MagicError::UnexpectedValue { magic, option: spec.name(), value: v }),
                    (Some(_), Some(v)) => Some(v),
                    (Some(m), None) => Some(take_value(magic, spec, m, &words, &mut i)?),
                };
                opts.set(magic, spec, value)?;
            } else if word.len() > 1 && word.starts_with('-') && !looks_negative(word) {
                // Short flags, possibly bundled (`-be`), the last one possibly with its value
                // attached (`-t1`, `-bt0:2`).
                let mut rest = &word[1..];
                while let Some(c) = rest.chars().next() {
                    rest = &rest[c.len_utf8()..];
                    let spec = magic
                        .specs()
                        .find(|s| s.short == Some(c))
                        .ok_or_else(|| MagicError::UnknownOption { magic, option: format!("-{c}") })?;
                    match spec.metavar {
                        None => opts.set(magic, spec, None)?,
                        Some(m) => {
                            let value = if rest.is_empty() {
                                take_value(magic, spec, m, &words, &mut i)?
                            } else {
                                rest.strip_prefix('=').unwrap_or(rest).to_string()
                            };
                            opts.set(magic, spec, Some(value))?;
                            break;
                        }
                    }
                }
            } else {
                return Err(MagicError::UnexpectedArgument { magic, arg: word.clone() });
            }
        }
        Ok(opts)
    }

    fn set(&mut self, magic: Magic, spec: &OptSpec, value: Option<String>) -> Result<()> {
        let value = value.unwrap_or_default();
        let invalid =
            |expected: &str| MagicError::InvalidValue { magic, option: spec.name(), value: value.clone(), expected: expected.to_string() };
        match spec.opt {
            Opt::Targets => self.targets = Some(value.parse::<TargetSpec>().map_err(MagicError::from)?),
            Opt::Block => self.block = Some(true),
            Opt::NoBlock => self.block = Some(false),
            Opt::Stream => self.stream = Some(true),
            Opt::NoStream => self.stream = Some(false),
            Opt::Verbose => self.verbose = Some(true),
            Opt::NoVerbose => self.verbose = Some(false),
            Opt::GroupEngine => self.group_outputs = Some(GroupOutputs::Engine),
            Opt::GroupOrder => self.group_outputs = Some(GroupOutputs::Order),
            Opt::GroupOutputs => {
                let g = value.parse().map_err(|_| invalid("one of engine, order, type"))?;
                self.group_outputs = Some(g);
            }
            Opt::ProgressAfter => {
                let secs: f64 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| invalid("a number of seconds (-1: never show progress, 0: show it at once)"))?;
                self.progress_after = Some(secs);
            }
            Opt::SignalOnInterrupt => {
                let sig = value.trim().parse().map_err(|_| {
                    invalid(&format!("a signal number 0-{} (0: send none) or a name: {}", signals::MAX_SIGNAL, signal_names()))
                })?;
                self.signal_on_interrupt = Some(sig);
            }
            Opt::Local => self.local = true,
            Opt::Help => self.help = true,
        }
        Ok(())
    }
}

/// `-1`, `-2:`, `-1,3`: values, not options.
fn looks_negative(word: &str) -> bool {
    word.as_bytes().get(1).is_some_and(|b| b.is_ascii_digit())
}

fn take_value(magic: Magic, spec: &OptSpec, metavar: &'static str, words: &[String], i: &mut usize) -> Result<String> {
    match words.get(*i) {
        Some(w) if !(w.starts_with('-') && w.len() > 1 && !looks_negative(w)) => {
            *i += 1;
            Ok(w.clone())
        }
        _ => Err(MagicError::MissingValue { magic, option: spec.name(), metavar }),
    }
}

fn lookup_long(magic: Magic, name: &str, written: &str) -> Result<&'static OptSpec> {
    let longs = || magic.specs().filter(|s| s.long.is_some());
    if let Some(s) = longs().find(|s| s.long == Some(name)) {
        return Ok(s);
    }
    let candidates: Vec<&OptSpec> = longs().filter(|s| s.long.is_some_and(|l| l.starts_with(name))).collect();
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(MagicError::UnknownOption { magic, option: written.split('=').next().unwrap_or(written).to_string() }),
        many => {
            Err(MagicError::AmbiguousOption { magic, option: written.to_string(), candidates: many.iter().map(|s| s.name()).collect() })
        }
    }
}

/// Splits an option line into words like a POSIX shell: whitespace separates, `'...'` and
/// `"..."` quote, a backslash escapes the next character (inside `"..."` only `\"` and `\\`).
fn split_words(magic: Magic, line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err(MagicError::UnclosedQuote { magic }),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\')) => cur.push(ch),
                            Some(ch) => {
                                cur.push('\\');
                                cur.push(ch);
                            }
                            None => return Err(MagicError::UnclosedQuote { magic }),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err(MagicError::UnclosedQuote { magic }),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    cur.push(ch);
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Selector, Slice};

    fn cell(line: &str) -> PxOptions {
        PxOptions::parse(Magic::CellPx, line).unwrap()
    }

    fn err(magic: Magic, line: &str) -> MagicError {
        PxOptions::parse(magic, line).unwrap_err()
    }

    #[test]
    fn empty_line_sets_nothing() {
        assert_eq!(cell(""), PxOptions::default());
        assert_eq!(cell("   "), PxOptions::default());
    }

    #[test]
    fn targets_in_every_spelling() {
        let two = Some(TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(0), stop: Some(2), step: None })]));
        assert_eq!(cell("--targets 0:2").targets, two);
        assert_eq!(cell("--targets=0:2").targets, two);
        assert_eq!(cell("-t 0:2").targets, two);
        assert_eq!(cell("-t0:2").targets, two);
        assert_eq!(cell("-t=0:2").targets, two);
        assert_eq!(cell("--tar 0:2").targets, two);
        assert_eq!(cell("--targets '0:2'").targets, two);
        assert_eq!(cell("-t -1").targets, Some(TargetSpec::One(-1)));
        assert_eq!(cell("-t -2:").targets, Some(TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(-2), ..Slice::default() })])));
        assert_eq!(cell("-t all").targets, Some(TargetSpec::All));
        assert_eq!(cell("-t 1,3,5").targets, Some(TargetSpec::Select(vec![Selector::Id(1), Selector::Id(3), Selector::Id(5)])));
        assert_eq!(cell("-t \"1, 3\"").targets, Some(TargetSpec::Select(vec![Selector::Id(1), Selector::Id(3)])));
        assert_eq!(cell("-t [0,3]").targets, Some(TargetSpec::Select(vec![Selector::Id(0), Selector::Id(3)])));
    }

    #[test]
    fn flags() {
        assert_eq!(cell("--block").block, Some(true));
        assert_eq!(cell("-b").block, Some(true));
        assert_eq!(cell("--noblock").block, Some(false));
        assert_eq!(cell("-a").block, Some(false));
        assert_eq!(cell("--stream").stream, Some(true));
        assert_eq!(cell("--no-stream").stream, Some(false));
        assert_eq!(cell("--verbose").verbose, Some(true));
        assert_eq!(cell("--no-verbose").verbose, Some(false));
        assert!(cell("--local").local);
        assert!(cell("--help").help);
        assert!(cell("-h").help);
        // Later options win, as with argparse.
        assert_eq!(cell("--block --noblock").block, Some(false));
        assert_eq!(cell("--no-stream --stream").stream, Some(true));
        // Unique prefixes, as with argparse.
        assert_eq!(cell("--nob").block, Some(false));
        assert_eq!(cell("--no-s").stream, Some(false));
        assert_eq!(cell("--verb").verbose, Some(true));
        assert!(cell("--loc").local);
    }

    #[test]
    fn group_outputs() {
        assert_eq!(cell("--group-outputs=engine").group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(cell("--group-outputs engine").group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(cell("--group-outputs=order").group_outputs, Some(GroupOutputs::Order));
        assert_eq!(cell("--group-outputs=type").group_outputs, Some(GroupOutputs::Type));
        assert_eq!(cell("--group engine").group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(cell("-e").group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(cell("-r").group_outputs, Some(GroupOutputs::Order));
        assert_eq!(cell("-e --group-outputs=type").group_outputs, Some(GroupOutputs::Type));
    }

    #[test]
    fn progress_and_signal() {
        assert_eq!(cell("--progress-after 5").progress_after, Some(5.0));
        assert_eq!(cell("--progress-after=-1").progress_after, Some(-1.0));
        assert_eq!(cell("--progress-after -1").progress_after, Some(-1.0));
        assert_eq!(cell("--progress-after 0.5").progress_after, Some(0.5));
        assert_eq!(cell("--signal-on-interrupt SIGKILL").signal_on_interrupt, Some(Signal::Name("SIGKILL".into())));
        assert_eq!(cell("--signal-on-interrupt term").signal_on_interrupt, Some(Signal::Name("SIGTERM".into())));
        assert_eq!(cell("--signal-on-interrupt 9").signal_on_interrupt, Some(Signal::Number(9)));
        assert_eq!(cell("--signal-on-interrupt 0").signal_on_interrupt, Some(Signal::Number(0)));
    }

    #[test]
    fn bundled_short_flags() {
        let o = cell("-be");
        assert_eq!((o.block, o.group_outputs), (Some(true), Some(GroupOutputs::Engine)));
        let o = cell("-at1");
        assert_eq!((o.block, o.targets), (Some(false), Some(TargetSpec::One(1))));
        let o = cell("-bt 0:2 --no-stream -r");
        assert_eq!(o.block, Some(true));
        assert_eq!(o.stream, Some(false));
        assert_eq!(o.group_outputs, Some(GroupOutputs::Order));
        assert!(o.targets.is_some());
    }

    #[test]
    fn everything_at_once() {
        let o = cell(
            "--targets ::2 --noblock --no-stream --verbose --group-outputs=engine --local --progress-after 3 --signal-on-interrupt SIGINT",
        );
        assert_eq!(
            o,
            PxOptions {
                targets: Some(TargetSpec::Select(vec![Selector::Slice(Slice { step: Some(2), ..Slice::default() })])),
                block: Some(false),
                stream: Some(false),
                verbose: Some(true),
                group_outputs: Some(GroupOutputs::Engine),
                progress_after: Some(3.0),
                signal_on_interrupt: Some(Signal::default()),
                local: true,
                help: false,
            }
        );
    }

    #[test]
    fn which_magic_takes_what() {
        // %pxconfig: execution options and output grouping, not --local.
        let o = PxOptions::parse(Magic::PxConfig, "-t ::2 --noblock --no-stream --verbose -e").unwrap();
        assert_eq!(o.block, Some(false));
        assert_eq!(o.group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(
            err(Magic::PxConfig, "--local").to_string(),
            "unknown option `--local` for %pxconfig; valid options: -t/--targets T, -b/--block, -a/--noblock, --stream, --no-stream, --verbose, --no-verbose, --progress-after SECONDS, --signal-on-interrupt SIG, --group-outputs engine|order|type, -e, -r, -h/--help"
        );
        // %pxresult: output grouping only.
        let o = PxOptions::parse(Magic::PxResult, "--group-outputs=order").unwrap();
        assert_eq!(o.group_outputs, Some(GroupOutputs::Order));
        assert_eq!(PxOptions::parse(Magic::PxResult, "-e").unwrap().group_outputs, Some(GroupOutputs::Engine));
        assert_eq!(
            err(Magic::PxResult, "--block").to_string(),
            "unknown option `--block` for %pxresult; valid options: --group-outputs engine|order|type, -e, -r, -h/--help"
        );
        assert_eq!(
            err(Magic::PxResult, "-t 1").to_string(),
            "unknown option `-t` for %pxresult; valid options: --group-outputs engine|order|type, -e, -r, -h/--help"
        );
        // %pxresult --no is not ambiguous there: nothing matches.
        assert!(matches!(err(Magic::PxResult, "--no"), MagicError::UnknownOption { .. }));
    }

    #[test]
    fn unknown_options_list_the_valid_ones() {
        let e = err(Magic::CellPx, "--targts 0");
        assert_eq!(
            e.to_string(),
            "unknown option `--targts` for %%px; valid options: -t/--targets T, -b/--block, -a/--noblock, --stream, --no-stream, --verbose, --no-verbose, --progress-after SECONDS, --signal-on-interrupt SIG, --group-outputs engine|order|type, -e, -r, --local, -h/--help"
        );
        assert_eq!(err(Magic::CellPx, "--bogus=3"), MagicError::UnknownOption { magic: Magic::CellPx, option: "--bogus".into() });
        assert_eq!(err(Magic::CellPx, "-x"), MagicError::UnknownOption { magic: Magic::CellPx, option: "-x".into() });
        assert_eq!(err(Magic::CellPx, "-bx"), MagicError::UnknownOption { magic: Magic::CellPx, option: "-x".into() });
        assert_eq!(err(Magic::CellPx, "-o out"), MagicError::UnknownOption { magic: Magic::CellPx, option: "-o".into() });
    }

    #[test]
    fn ambiguous_prefix() {
        assert_eq!(
            err(Magic::CellPx, "--no").to_string(),
            "ambiguous option `--no` for %%px: could be --noblock, --no-stream, --no-verbose"
        );
        assert_eq!(err(Magic::CellPx, "--s").to_string(), "ambiguous option `--s` for %%px: could be --stream, --signal-on-interrupt");
    }

    #[test]
    fn missing_and_unexpected_values() {
        assert_eq!(err(Magic::CellPx, "--targets").to_string(), "option `--targets` of %%px needs a value: --targets T");
        assert_eq!(err(Magic::CellPx, "-t").to_string(), "option `--targets` of %%px needs a value: --targets T");
        assert_eq!(err(Magic::CellPx, "-t --block").to_string(), "option `--targets` of %%px needs a value: --targets T");
        assert_eq!(
            err(Magic::CellPx, "--group-outputs").to_string(),
            "option `--group-outputs` of %%px needs a value: --group-outputs engine|order|type"
        );
        assert_eq!(err(Magic::CellPx, "--block=yes").to_string(), "option `--block` of %%px takes no value (got `yes`)");
    }

    #[test]
    fn invalid_values_say_what_is_valid() {
        assert_eq!(
            err(Magic::CellPx, "--group-outputs=time").to_string(),
            "invalid value `time` for `--group-outputs` of %%px: expected one of engine, order, type"
        );
        assert_eq!(
            err(Magic::CellPx, "--progress-after soon").to_string(),
            "invalid value `soon` for `--progress-after` of %%px: expected a number of seconds (-1: never show progress, 0: show it at once)"
        );
        assert!(err(Magic::CellPx, "--progress-after inf").to_string().starts_with("invalid value `inf`"));
        assert_eq!(
            err(Magic::CellPx, "--signal-on-interrupt SIGFOO").to_string(),
            format!(
                "invalid value `SIGFOO` for `--signal-on-interrupt` of %%px: expected a signal number 0-64 (0: send none) or a name: {}",
                signal_names()
            )
        );
        assert!(matches!(err(Magic::CellPx, "--signal-on-interrupt 99"), MagicError::InvalidValue { .. }));
        assert!(matches!(err(Magic::CellPx, "-t x"), MagicError::Targets(crate::TargetError::Invalid { .. })));
        assert!(err(Magic::CellPx, "--targets 1:2:3:4").to_string().starts_with("invalid targets `1:2:3:4`"));
    }

    #[test]
    fn stray_words_and_quotes() {
        assert_eq!(
            err(Magic::CellPx, "--block 0:2").to_string(),
            "unexpected argument `0:2` for %%px; valid options: -t/--targets T, -b/--block, -a/--noblock, --stream, --no-stream, --verbose, --no-verbose, --progress-after SECONDS, --signal-on-interrupt SIG, --group-outputs engine|order|type, -e, -r, --local, -h/--help"
        );
        assert_eq!(err(Magic::CellPx, "-t 1, 3"), MagicError::UnexpectedArgument { magic: Magic::CellPx, arg: "3".into() });
        assert_eq!(err(Magic::CellPx, "-1"), MagicError::UnexpectedArgument { magic: Magic::CellPx, arg: "-1".into() });
        assert_eq!(err(Magic::CellPx, "--"), MagicError::UnexpectedArgument { magic: Magic::CellPx, arg: "--".into() });
        assert_eq!(err(Magic::CellPx, "-t '0:2").to_string(), "unclosed quote in the options of %%px");
        assert_eq!(err(Magic::CellPx, "-t \"0:2").to_string(), "unclosed quote in the options of %%px");
    }

    #[test]
    fn word_splitting() {
        let w = |s| split_words(Magic::CellPx, s).unwrap();
        assert_eq!(w("a  b\tc"), vec!["a", "b", "c"]);
        assert_eq!(w("'a b' \"c d\" e\\ f"), vec!["a b", "c d", "e f"]);
        assert_eq!(w("\"a\\\"b\" 'x\\y'"), vec!["a\"b", "x\\y"]);
        assert_eq!(w("''"), vec![""]);
        assert_eq!(w(""), Vec::<String>::new());
    }

    #[test]
    fn usage_lists_options() {
        let u = Magic::CellPx.usage();
        assert!(u.starts_with("usage: %%px [options]\nCODE...\n\nRun the rest of the cell on the engines."));
        assert!(u.contains("\n  -t/--targets T  "));
        assert!(u.contains("--local"));
        let u = Magic::PxResult.usage();
        assert!(u.contains("--group-outputs engine|order|type"));
        assert!(!u.contains("--targets"));
        let u = Magic::Autopx.usage();
        assert!(u.contains("  -h/--help  show this help"));
        assert_eq!(Magic::Autopx.options_summary(), "-h/--help");
    }

    #[test]
    fn long_option_detection() {
        assert!(is_long_option("--targets"));
        assert!(is_long_option("--targets=0"));
        assert!(is_long_option("--block"));
        assert!(!is_long_option("--x"));
        assert!(!is_long_option("-t"));
        assert!(!is_long_option("let"));
    }
}
