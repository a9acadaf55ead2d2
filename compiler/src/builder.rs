//! The closure builder: compiles `remote!` closure wrappers ([`crate::closure`]) with plain
//! cargo, in one crate that lives as long as the compiler, on its own thread.
//!
//! A closure wrapper is one item that depends on `rpx_runtime` and nothing else: it needs no
//! variable store and no type inference, so evcxr (rust-analyzer, ~0.4 GB, ~6 s to create)
//! brings nothing to it. The crate is written and built once when the compiler's first cell
//! context is ready (or at the first closure, if that comes sooner), in the background and at
//! low priority, with a trivial closure: that build compiles `rpx_runtime`
//! and its dependencies (serde, postcard) into the crate's own `target/`, where every later
//! closure finds them fresh, so a closure only compiles its own code. A closure that arrives
//! while that build runs waits for it in the thread's queue (one build at a time, never two).
//!
//! The crate is configured as evcxr configures its cells (edition 2024, cdylib,
//! `-Cprefer-dynamic`, opt-level 2, rpath, unwinding panics), so engines load a closure
//! exactly as before. Each compiled library is renamed to a path of its own before it is
//! announced: the next build would replace the file cargo wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::closure::Wrapper;
use crate::context::Event;
use crate::diagnostics::{render, Diag};

/// The closure crate's name (and its library's).
const CRATE: &str = "rpx_closures";

/// How a closure compile ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ClosureOutcome {
    Compiled {
        so_path: String,
    },
    /// rustc refused it: final for this source.
    CompileError {
        evalue: String,
        traceback: Vec<String>,
    },
    /// Anything else (cargo failed, a dependency did not build): worth retrying later.
    Failed {
        message: String,
    },
}

/// What one cargo build did.
#[derive(Debug, Default, PartialEq)]
pub struct BuildReport {
    /// Crates other than the closure crate that cargo compiled (not fresh) in this build.
    pub deps_built: usize,
    /// The closure crate's compiled library, if it built.
    pub library: Option<PathBuf>,
    /// rustc's diagnostics for the closure crate.
    pub diags: Vec<Diag>,
    pub success: bool,
    /// The end of cargo's stderr (for failures that are not rustc diagnostics).
    pub stderr_tail: String,
}

/// Read cargo's `--message-format=json` output.
pub fn parse_cargo_json(stdout: &str) -> (usize, Option<PathBuf>, Vec<Diag>) {
    let (mut deps_built, mut library, mut diags) = (0, None, Vec::new());
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let ours = v["target"]["name"].as_str() == Some(CRATE);
        match v["reason"].as_str() {
            Some("compiler-artifact") if ours => {
                library = v["filenames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .find(|f| f.ends_with(".so"))
                    .map(PathBuf::from);
            }
            Some("compiler-artifact") if v["fresh"].as_bool() == Some(false) => deps_built += 1,
            Some("compiler-message") if ours => diags.push(Diag::from_rustc_json(&v["message"], "src/lib.rs")),
            _ => {}
        }
    }
    (deps_built, library, diags)
}

/// The host's target triple (evcxr passes `--target` so `RUSTFLAGS` skip build scripts).
fn host_triple() -> String {
    Command::new("rustc")
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)))
        .unwrap_or_else(|| "x86_64-unknown-linux-gnu".into())
}

/// The closure crate on disk.
pub struct Crate {
    dir: PathBuf,
    triple: String,
    /// Compiled closures so far (names their kept copies).
    built: usize,
}

impl Crate {
    /// Write the crate (manifest and a placeholder source) under `dir`.
    pub fn create(dir: &Path, runtime_dir: &Path) -> std::io::Result<Crate> {
        std::fs::create_dir_all(dir.join("src"))?;
        std::fs::create_dir_all(dir.join("out"))?;
        let manifest = format!(
            r#"[package]
name = "{CRATE}"
version = "0.0.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]
path = "src/lib.rs"

# As evcxr builds cells.
[profile.dev]
opt-level = 2
debug = false
strip = "debuginfo"
rpath = true
lto = false
debug-assertions = true
codegen-units = 16
panic = 'unwind'
incremental = true
overflow-checks = true

[dependencies]
rpx_runtime = {{ package = "rpx-runtime", path = {:?} }}

[workspace]
"#,
            runtime_dir.display().to_string()
        );
        std::fs::write(dir.join("Cargo.toml"), manifest)?;
        Ok(Crate { dir: dir.to_path_buf(), triple: host_triple(), built: 0 })
    }

    /// `cargo build` of `code` as the crate's whole source; `nice` lowers its priority.
    pub fn build(&self, code: &str, nice: bool) -> std::io::Result<BuildReport> {
        std::fs::write(self.dir.join("src/lib.rs"), code)?;
        let target = self.dir.join("target");
        let mut cmd = if nice {
            let mut c = Command::new("nice");
            c.args(["-n", "10", "cargo"]);
            c
        } else {
            Command::new("cargo")
        };
        cmd.args(["build", "--target", &self.triple, "--message-format=json"])
            .current_dir(&self.dir)
            .env("CARGO_TARGET_DIR", &target)
            .env("CARGO_BUILD_BUILD_DIR", &target)
            .env("RUSTFLAGS", "-Cprefer-dynamic")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_BUILD_TARGET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = match cmd.output() {
            Err(e) if nice && e.kind() == std::io::ErrorKind::NotFound => return self.build(code, false),
            r => r?,
        };
        let (deps_built, library, diags) = parse_cargo_json(&String::from_utf8_lossy(&out.stdout));
        let stderr_text = String::from_utf8_lossy(&out.stderr);
        let stderr: Vec<&str> = stderr_text.lines().filter(|l| !l.trim().is_empty()).collect();
        let stderr_tail = stderr[stderr.len().saturating_sub(12)..].join("\n");
        Ok(BuildReport { deps_built, library, diags, success: out.status.success(), stderr_tail })
    }

    /// Compile one closure wrapper; a compiled library is moved to a path of its own.
    pub fn compile(&mut self, w: &Wrapper) -> (ClosureOutcome, usize) {
        let report = match self.build(&w.code, false) {
            Ok(r) => r,
            Err(e) => return (ClosureOutcome::Failed { message: format!("running cargo failed: {e}") }, 0),
        };
        let outcome = match (&report.library, report.success) {
            (Some(lib), true) => {
                self.built += 1;
                let kept = self.dir.join("out").join(format!("closure_{}_{}.so", self.built, w.fn_name));
                match std::fs::rename(lib, &kept).or_else(|_| std::fs::copy(lib, &kept).map(|_| ())) {
                    Ok(()) => ClosureOutcome::Compiled { so_path: kept.display().to_string() },
                    Err(e) => ClosureOutcome::Failed { message: format!("keeping the compiled closure {}: {e}", lib.display()) },
                }
            }
            _ if report.diags.iter().any(|d| d.level == "error") => {
                let (evalue, traceback) = render(&w.code, "closure", &report.diags);
                ClosureOutcome::CompileError { evalue, traceback }
            }
            _ => ClosureOutcome::Failed { message: format!("cargo build failed:\n{}", report.stderr_tail) },
        };
        (outcome, report.deps_built)
    }
}

/// Handle to the builder thread.
pub struct Handle {
    pub tx: mpsc::Sender<Wrapper>,
}

/// Start the builder thread: write the crate under `dir`, warm it up (reported as
/// [`Event::ClosuresWarm`]), then compile each wrapper sent to it ([`Event::ClosureDone`]).
pub fn spawn(dir: PathBuf, runtime_dir: PathBuf, events: UnboundedSender<Event>) -> Handle {
    let (tx, rx) = mpsc::channel::<Wrapper>();
    std::thread::Builder::new()
        .name("closures".into())
        .spawn(move || {
            let started = Instant::now();
            let mut krate = match Crate::create(&dir, &runtime_dir) {
                Ok(k) => k,
                Err(e) => {
                    let message = format!("writing the closure crate in {} failed: {e}", dir.display());
                    let _ = events.send(Event::ClosuresWarm { elapsed_ms: 0, deps_built: 0, error: Some(message.clone()) });
                    // Answer every request so nobody waits for a builder that cannot build.
                    while let Ok(w) = rx.recv() {
                        let _ = events.send(Event::ClosureDone {
                            fn_name: w.fn_name,
                            outcome: ClosureOutcome::Failed { message: message.clone() },
                            deps_built: 0,
                            elapsed_ms: 0,
                        });
                    }
                    return;
                }
            };
            let warm_up =
                crate::closure::wrap(&rpx_protocol::apply::Closure { source: "|x: u64| x".into(), arg_types: vec!["u64".into()] })
                    .expect("the warm-up closure wraps");
            let (deps_built, error) = match krate.build(&warm_up.code, true) {
                Ok(r) if r.success => (r.deps_built, None),
                Ok(r) => (r.deps_built, Some(format!("the warm-up build failed:\n{}", r.stderr_tail))),
                Err(e) => (0, Some(format!("running cargo failed: {e}"))),
            };
            let _ = events.send(Event::ClosuresWarm { elapsed_ms: started.elapsed().as_millis(), deps_built, error });
            while let Ok(w) = rx.recv() {
                let t = Instant::now();
                let (outcome, deps_built) = krate.compile(&w);
                let _ = events.send(Event::ClosureDone { fn_name: w.fn_name, outcome, deps_built, elapsed_ms: t.elapsed().as_millis() });
            }
        })
        .expect("spawn the closure builder thread");
    Handle { tx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_json_gives_the_library_the_dependencies_built_and_the_errors() {
        let out = [
            r#"{"reason":"compiler-artifact","package_id":"serde 1.0","target":{"name":"serde"},"filenames":["/t/libserde.rlib"],"fresh":false}"#,
            r#"{"reason":"compiler-artifact","package_id":"postcard 1.0","target":{"name":"postcard"},"filenames":["/t/libpostcard.rlib"],"fresh":true}"#,
            r#"{"reason":"compiler-message","target":{"name":"rpx_closures"},"message":{"level":"error","message":"mismatched types","code":{"code":"E0308"},"spans":[],"children":[]}}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"rpx_closures"},"filenames":["/t/x/debug/librpx_closures.so"],"fresh":false}"#,
            "not json",
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        let (deps, lib, diags) = parse_cargo_json(&out);
        assert_eq!(deps, 1);
        assert_eq!(lib, Some(PathBuf::from("/t/x/debug/librpx_closures.so")));
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].code.as_deref(), Some("E0308"));
    }
}
