//! The `%px` family of magics for the rpx kernel, pure: it parses cells into commands and
//! renders engines' outputs into the Jupyter messages the kernel publishes, in ipyparallel 9's
//! format (`[stdout:0]`, `[output:0]`, `Out[0:3]: ...`, `[0:execute]`, `CompositeError`). No I/O,
//! no sockets: the kernel runs the commands through the client and feeds the outputs back.
//!
//! # Layout
//! - [`parse`]: cell text → [`CellStep`]s ([`parse_cell`], [`parse_cell_autopx`]): `%px CODE`,
//!   `%%px [options]`, `%autopx`, `%pxresult`, `%pxconfig`, local code between them; unknown
//!   magics refused.
//! - [`options`]: option lines → [`PxOptions`]: the flags each magic takes (ipyparallel's,
//!   argparse-style), [`GroupOutputs`], [`Signal`], `--help` text ([`Magic::usage`]).
//! - `--targets`: the one target grammar of `rpx_protocol::targets`, re-exported as
//!   [`TargetSpec`] (with [`TargetSpec::resolve`]).
//! - [`config`]: [`PxConfig`] (sticky `%pxconfig` defaults) and [`ExecOptions`] (one cell's).
//! - [`output`]: what engines produced ([`OutputEvent`], [`EngineOutput`]) and what the kernel
//!   publishes ([`IopubMsg`]).
//! - [`render`]: finished outputs grouped by `--group-outputs` ([`render_outputs`]); the
//!   `--verbose` and interrupt lines.
//! - [`stream`]: outputs rendered as they arrive ([`Streamer`]).
//! - [`progress`]: the progress display of a long blocking `%px` (`--progress-after`).
//! - [`failure`]: the error a failed run reports ([`ErrorReport`], [`error_report`]).
//! - [`error`]: [`MagicError`], everything that can be wrong with a magic.
//!
//! # Kernel flow
//! 1. `parse_cell_autopx(code, autopx_on)?`; on `Err`, reply with the error and run nothing.
//! 2. For each [`CellStep`]: `Local` → evcxr; `PxConfig(o)` → [`PxConfig::apply`]; `Autopx` →
//!    flip the flag, print [`autopx_message`]; `Help` → print the text; `PxResult(o)` → render
//!    the last run (or [`MagicError::NoLastResult`]); `Px { code, options }` →
//!    `let run = config.effective(&options)`, resolve `run.targets`, print [`verbose_line`] if
//!    `run.verbose`, execute, then either feed each arriving output to a [`Streamer`]
//!    (`run.stream`) or collect them and call [`render_outputs`] with `run.group_outputs`.
//! 3. If an engine failed: [`Streamer::error_report`] (streamed) or [`error_report`] (not), as
//!    the cell's `error` message and `execute_reply`.
//!
//! # Differences from ipyparallel (on purpose)
//! - `--group-outputs=order` shows every engine's i-th display; ipyparallel skips engines that
//!   have fewer displays than the most.
//! - A missing final newline is added to the stream that lacks it, not to the start of the next
//!   (which in a notebook is a blank first line when the next is the other stream). After a
//!   display, result or streamed error, the next stream chunk gets its `[stdout:N]` again.
//! - Output of a single-engine target keeps its `[stdout:N]` prefix when not streaming.
//! - Results carry `metadata.engine` plus the engine's own metadata, not ipyparallel's whole
//!   result metadata; `Out[N:k]: ` is uncoloured unless [`RenderOptions::color`].
//! - `%%px --verbose` holds for that cell; `%pxconfig` also takes `--group-outputs`/`-e`/`-r`.
//!   `-o/--out NAME` does not exist (no Python namespace to store an `AsyncResult` in).
//!   `--help` works on every magic. Target lists drop duplicate engines.
//!
//! # Example
//! ```
//! use rpx_magics::{
//!     error_report, parse_cell, render_outputs, CellStep, EngineOutput, IopubMsg, OutputEvent, PxConfig,
//!     RenderOptions, StreamName,
//! };
//!
//! let mut config = PxConfig::default();
//! for cmd in parse_cell("%pxconfig --no-stream").unwrap() {
//!     if let CellStep::PxConfig(opts) = cmd {
//!         config.apply(&opts); // sticky
//!     }
//! }
//!
//! let cmds = parse_cell("%%px --targets ::2\nprintln!(\"hi\");").unwrap();
//! let CellStep::Px { code, options } = &cmds[0] else { unreachable!() };
//! assert_eq!(code, "println!(\"hi\");");
//! let run = config.effective(options); // --targets holds for this cell only
//! assert_eq!(run.targets.resolve(&[0, 1, 2, 3]).unwrap(), vec![0, 2]);
//! assert!(!run.stream);
//!
//! // A bad magic anywhere in a cell: nothing runs, and the message says why.
//! let err = parse_cell("%px a\n%pxconfig --targts 1").unwrap_err();
//! assert!(err.to_string().starts_with("unknown option `--targts` for %pxconfig; valid options: -t/--targets T"));
//!
//! // The engines answered; show it as ipyparallel does.
//! let outputs = vec![
//!     EngineOutput::new(0, vec![OutputEvent::stdout("hi\n"), OutputEvent::result_text(1, "()")]),
//!     EngineOutput::new(2, vec![OutputEvent::stdout("hi\n"), OutputEvent::error("Panic", "boom", vec![])]),
//! ];
//! let msgs = render_outputs(&outputs, run.group_outputs, &RenderOptions::default());
//! assert_eq!(msgs[0], IopubMsg::Stream { name: StreamName::Stdout, text: "[stdout:0] \nhi\n[stdout:2] \nhi\n".into() });
//! assert_eq!(msgs[1].text(), Some("Out[0:1]: ()"));
//! let failure = error_report(&outputs, run.targets.is_single()).unwrap();
//! assert_eq!(failure.error.ename, "CompositeError");
//! assert_eq!(failure.error.evalue, "one or more exceptions raised in: %px\n[2:execute]Panic: boom");
//! ```

pub mod config;
pub mod error;
pub mod failure;
pub mod options;
pub mod output;
pub mod parse;
pub mod progress;
pub mod render;
pub mod stream;

pub use config::{ExecOptions, PxConfig};
pub use error::{MagicError, Result};
pub use failure::{engine_label, error_report, ErrorReport, TB_LIMIT};
pub use options::{GroupOutputs, Magic, PxOptions, Signal};
pub use output::{EngineOutput, IopubMsg, OutputEvent, StreamName};
pub use parse::{autopx_message, parse_cell, parse_cell_autopx, CellStep, AUTOPX_DISABLED, AUTOPX_ENABLED};
pub use progress::{progress_due, progress_message, progress_text};
pub use render::{interrupt_line, output_header, render_outputs, result_display, verbose_line, RenderOptions};
pub use rpx_protocol::targets::{Selector, Slice, TargetError, TargetSpec};
pub use stream::{StreamStyle, Streamer};
