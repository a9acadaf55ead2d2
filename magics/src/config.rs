//! The kernel's `%px` defaults: [`PxConfig`] (ipyparallel's defaults; changed only by
//! `%pxconfig`, stickily) and [`ExecOptions`], the options one cell runs with (the config with
//! that cell's `%%px` options on top, which never stick).

use crate::options::{GroupOutputs, PxOptions, Signal};
use crate::TargetSpec;

/// Defaults for `%px`, `%%px` and `%autopx` cells, kept by the kernel for its lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct PxConfig {
    /// Engines to run on (default: all).
    pub targets: TargetSpec,
    /// Wait for the engines (default: true).
    pub block: bool,
    /// How to group outputs when not streaming (default: type).
    pub group_outputs: GroupOutputs,
    /// Show output as it arrives (default: true, as ipyparallel in an interactive session).
    pub stream: bool,
    /// Print `Parallel execution on engine(s): ...` before each run (default: false).
    pub verbose: bool,
    /// Seconds before a progress bar appears (default 2; negative: never; 0: at once).
    pub progress_after: f64,
    /// Signal sent to the engines when a blocking run is interrupted (default SIGINT).
    pub signal_on_interrupt: Signal,
}

impl Default for PxConfig {
    fn default() -> Self {
        PxConfig {
            targets: TargetSpec::All,
            block: true,
            group_outputs: GroupOutputs::Type,
            stream: true,
            verbose: false,
            progress_after: 2.0,
            signal_on_interrupt: Signal::default(),
        }
    }
}

/// The options one `%px` cell runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecOptions {
    /// Engines to run on (resolve with [`TargetSpec::resolve`]).
    pub targets: TargetSpec,
    /// Wait for the result; if false, keep it for `%pxresult` and return at once.
    pub block: bool,
    /// How to group outputs when not streaming.
    pub group_outputs: GroupOutputs,
    /// Stream outputs as they arrive (only meaningful when blocking).
    pub stream: bool,
    /// Print the verbose line ([`crate::verbose_line`]) first.
    pub verbose: bool,
    /// Seconds before a progress bar appears.
    pub progress_after: f64,
    /// Signal for the engines on interrupt.
    pub signal_on_interrupt: Signal,
    /// Also run the code in the kernel (`%%px --local`): submit without blocking, run locally,
    /// then wait if `block`.
    pub local: bool,
}

impl PxConfig {
    /// `%pxconfig OPTIONS`: every option given replaces the default for all later cells.
    pub fn apply(&mut self, opts: &PxOptions) {
        if let Some(t) = &opts.targets {
            self.targets = t.clone();
        }
        if let Some(b) = opts.block {
            self.block = b;
        }
        if let Some(g) = opts.group_outputs {
            self.group_outputs = g;
        }
        if let Some(s) = opts.stream {
            self.stream = s;
        }
        if let Some(v) = opts.verbose {
            self.verbose = v;
        }
        if let Some(p) = opts.progress_after {
            self.progress_after = p;
        }
        if let Some(s) = &opts.signal_on_interrupt {
            self.signal_on_interrupt = s.clone();
        }
    }

    /// The options for one cell: the config, overridden by the cell's own `%%px` options
    /// (pass `&PxOptions::default()` for `%px` and `%autopx` cells). The config is unchanged.
    pub fn effective(&self, opts: &PxOptions) -> ExecOptions {
        let mut cell = self.clone();
        cell.apply(opts);
        let PxConfig { targets, block, group_outputs, stream, verbose, progress_after, signal_on_interrupt } = cell;
        ExecOptions { targets, block, group_outputs, stream, verbose, progress_after, signal_on_interrupt, local: opts.local }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Magic;
    use crate::{Selector, Slice};

    fn opts(magic: Magic, line: &str) -> PxOptions {
        PxOptions::parse(magic, line).unwrap()
    }

    #[test]
    fn defaults_are_ipyparallels() {
        let c = PxConfig::default();
        assert_eq!(c.targets, TargetSpec::All);
        assert!(c.block);
        assert_eq!(c.group_outputs, GroupOutputs::Type);
        assert!(c.stream);
        assert!(!c.verbose);
        assert_eq!(c.progress_after, 2.0);
        assert_eq!(c.signal_on_interrupt, Signal::Name("SIGINT".into()));
        let e = c.effective(&PxOptions::default());
        assert_eq!(
            e,
            ExecOptions {
                targets: TargetSpec::All,
                block: true,
                group_outputs: GroupOutputs::Type,
                stream: true,
                verbose: false,
                progress_after: 2.0,
                signal_on_interrupt: Signal::default(),
                local: false,
            }
        );
    }

    #[test]
    fn pxconfig_is_sticky() {
        let mut c = PxConfig::default();
        c.apply(&opts(Magic::PxConfig, "-t ::2 --noblock"));
        assert_eq!(c.targets, TargetSpec::Select(vec![Selector::Slice(Slice { step: Some(2), ..Slice::default() })]));
        assert!(!c.block);
        // A later %pxconfig changes only what it names.
        c.apply(&opts(Magic::PxConfig, "--verbose --no-stream -e"));
        assert_eq!(c.targets, TargetSpec::Select(vec![Selector::Slice(Slice { step: Some(2), ..Slice::default() })]));
        assert!(!c.block);
        assert!(c.verbose);
        assert!(!c.stream);
        assert_eq!(c.group_outputs, GroupOutputs::Engine);
        c.apply(&opts(Magic::PxConfig, "-t 1 --block --progress-after -1 --signal-on-interrupt 9"));
        assert_eq!(c.targets, TargetSpec::One(1));
        assert!(c.block);
        assert_eq!(c.progress_after, -1.0);
        assert_eq!(c.signal_on_interrupt, Signal::Number(9));
        // Every later cell sees it.
        let e = c.effective(&PxOptions::default());
        assert_eq!(e.targets, TargetSpec::One(1));
        assert!(e.verbose);
    }

    #[test]
    fn cell_options_are_not_sticky() {
        let c = PxConfig::default();
        let before = c.clone();
        let e = c.effective(&opts(Magic::CellPx, "--targets 0:2 --noblock --no-stream --verbose -r --local"));
        assert_eq!(e.targets, TargetSpec::Select(vec![Selector::Slice(Slice { start: Some(0), stop: Some(2), step: None })]));
        assert!(!e.block);
        assert!(!e.stream);
        assert!(e.verbose);
        assert!(e.local);
        assert_eq!(e.group_outputs, GroupOutputs::Order);
        // The config did not move: the next cell runs with the defaults again.
        assert_eq!(c, before);
        let next = c.effective(&PxOptions::default());
        assert_eq!(next.targets, TargetSpec::All);
        assert!(next.block);
        assert!(!next.local);
    }

    #[test]
    fn cell_options_override_config() {
        let mut c = PxConfig::default();
        c.apply(&opts(Magic::PxConfig, "--noblock -t 1,2"));
        let e = c.effective(&opts(Magic::CellPx, "--block"));
        assert!(e.block);
        assert_eq!(e.targets, TargetSpec::Select(vec![Selector::Id(1), Selector::Id(2)]));
        let e = c.effective(&opts(Magic::CellPx, "-t all"));
        assert!(!e.block);
        assert_eq!(e.targets, TargetSpec::All);
    }
}
