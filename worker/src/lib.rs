//! What the rpx engine (`ipengine`) and the rpx kernel (`rpx-kernel`) share: the worker process
//! that loads compiled cells and closures and runs them (both binaries re-execute themselves as
//! one), how SIGINT interrupts it, and the marker lines it and evcxr's generated code write.
//! Nothing here depends on evcxr: it is linked into every engine (rustc's diagnostics, which
//! the kernel and the compiler render alike, are `rpx-diagnostics`).
//!
//! # Layout
//! - [`process`]: the worker process itself (plain std): `LOAD_AND_RUN` and `CALL` on stdin,
//!   markers on stdout, closure results on the result pipe; [`run`] is its entry point.
//! - [`interrupt`]: SIGINT becomes a panic injected into the running cell (the handler and its
//!   state; the dry run of the unwinder's search phase in `interrupt/search.rs`; finding the
//!   cells' libstd in `interrupt/libstd.rs`).
//! - [`markers`]: the marker lines on the worker's stdout and stderr.
//! - [`stdin`]: whether the worker's main thread is blocked reading stdin (a cell's plain read).
//!
//! # Example
//! ```
//! use rpx_worker::process::{parse_instruction, Instruction};
//! assert_eq!(
//!     parse_instruction("LOAD_AND_RUN /tmp/a.so run_user_code_3"),
//!     Some(Instruction::Load { so_path: "/tmp/a.so", fn_name: "run_user_code_3" })
//! );
//! ```

pub mod markers;
pub mod process;
pub mod stdin;

pub use process::run;

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
pub mod interrupt;

/// Interrupts are implemented for x86_64 Linux with glibc only; elsewhere the worker ignores
/// SIGINT and the engine kills it when the grace period after an interrupt is over.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
pub mod interrupt {
    /// No-op stand-in for the x86_64 Linux implementation.
    #[derive(Debug, Default)]
    pub struct Interrupts;

    impl Interrupts {
        pub fn new() -> Interrupts {
            Interrupts
        }
        /// Ignore SIGINT.
        pub fn install(&mut self) -> Result<(), String> {
            // SAFETY: setting a signal disposition.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            Ok(())
        }
        pub fn busy(&mut self) {}
        pub fn loaded(&mut self) {}
        pub fn begin(&mut self) {}
        pub fn end(&mut self) -> bool {
            false
        }
        pub fn idle(&mut self) {}
    }
}
