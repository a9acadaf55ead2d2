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

use cargo_metadata::diagnostic::{Diagnostic, DiagnosticLevel};
use cargo_metadata::Message;
use rpx_diagnostics::{render, Diag, DiagSpan};
use tokio::sync::mpsc::UnboundedSender;

use crate::closure::Wrapper;
use crate::context::Event;

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
    for message in Message::parse_stream(stdout.as_bytes()).map_while(Result::ok) {
        match message {
            Message::CompilerArtifact(a) if a.target.name == CRATE => {
                library = a.filenames.iter().find(|f| f.as_str().ends_with(".so")).map(|f| PathBuf::from(f.as_std_path()));
            }
            Message::CompilerArtifact(a) if !a.fresh => deps_built += 1,
            Message::CompilerMessage(m) if m.target.name == CRATE => diags.push(diag_from_rustc(&m.message, "src/lib.rs")),
            _ => {}
        }
    }
    (deps_built, library, diags)
}

/// A rustc diagnostic of the closure crate as a [`Diag`]; only spans in `file` (the one source
/// file the code was written to) are kept.
fn diag_from_rustc(d: &Diagnostic, file: &str) -> Diag {
    let spans = d
        .spans
        .iter()
        .filter(|s| s.file_name.ends_with(file))
        .map(|s| DiagSpan {
            start_line: s.line_start,
            start_column: s.column_start,
            end_line: s.line_end,
            end_column: s.column_end,
            is_primary: s.is_primary,
            label: s.label.clone().unwrap_or_default(),
        })
        .collect();
    let help = d
        .children
        .iter()
        .filter(|c| c.level == DiagnosticLevel::Help)
        .map(|c| {
            let mut text = c.message.clone();
            if let Some(r) = c.spans.first().and_then(|s| s.suggested_replacement.as_deref()) {
                text.push_str(&format!("\n\n{}", r.trim_end()));
            }
            text
        })
        .collect();
    Diag {
        level: level_name(d.level).to_string(),
        code: d.code.as_ref().map(|c| c.code.clone()),
        message: d.message.clone(),
        spans,
        help,
        hint: None,
    }
}

/// A diagnostic level as rustc spells it in its JSON.
fn level_name(level: DiagnosticLevel) -> &'static str {
    match level {
        DiagnosticLevel::Ice => "error: internal compiler error",
        DiagnosticLevel::Error => "error",
        DiagnosticLevel::Warning => "warning",
        DiagnosticLevel::FailureNote => "failure-note",
        DiagnosticLevel::Note => "note",
        DiagnosticLevel::Help => "help",
        _ => "",
    }
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

    /// One line of cargo's JSON output for package `name`, `reason` and the rest of the fields.
    fn cargo_line(reason: &str, name: &str, rest: serde_json::Value) -> String {
        let mut v = serde_json::json!({
            "reason": reason, "package_id": format!("registry+https://github.com/rust-lang/crates.io-index#{name}@1.0.0"),
            "manifest_path": format!("/r/{name}/Cargo.toml"),
            "target": {"kind": ["lib"], "crate_types": ["lib"], "name": name, "src_path": format!("/r/{name}/src/lib.rs"), "edition": "2021", "doc": true, "doctest": true, "test": true},
        });
        let (serde_json::Value::Object(v), serde_json::Value::Object(rest)) = (&mut v, rest) else { unreachable!() };
        v.extend(rest);
        serde_json::to_string(v).unwrap()
    }

    /// A `compiler-artifact` line.
    fn artifact(name: &str, file: &str, fresh: bool) -> String {
        let profile =
            serde_json::json!({"opt_level": "2", "debuginfo": 0, "debug_assertions": false, "overflow_checks": false, "test": false});
        cargo_line(
            "compiler-artifact",
            name,
            serde_json::json!({"profile": profile, "features": [], "filenames": [file], "executable": null, "fresh": fresh}),
        )
    }

    /// rustc's JSON for a span.
    fn span(file: &str, line: usize, columns: (usize, usize), primary: bool, label: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "file_name": file, "byte_start": 0, "byte_end": 1, "line_start": line, "line_end": line, "column_start": columns.0,
            "column_end": columns.1, "is_primary": primary, "label": label, "text": [], "suggested_replacement": null,
            "suggestion_applicability": null, "expansion": null
        })
    }

    #[test]
    fn cargo_json_gives_the_library_the_dependencies_built_and_the_errors() {
        let message = serde_json::json!({"level": "error", "message": "mismatched types", "code": {"code": "E0308", "explanation": null}, "spans": [], "children": [], "rendered": null});
        let out = [
            artifact("serde", "/t/libserde.rlib", false),
            artifact("postcard", "/t/libpostcard.rlib", true),
            cargo_line("compiler-message", "rpx_closures", serde_json::json!({"message": message})),
            artifact("rpx_closures", "/t/x/debug/librpx_closures.so", false),
            "not json".into(),
            r#"{"reason":"build-finished","success":true}"#.into(),
        ]
        .join("\n");
        let (deps, lib, diags) = parse_cargo_json(&out);
        assert_eq!(deps, 1);
        assert_eq!(lib, Some(PathBuf::from("/t/x/debug/librpx_closures.so")));
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].code.as_deref(), Some("E0308"));
    }

    #[test]
    fn rustc_json_errors_render_against_the_code() {
        let code = "fn f() {\n    helper(1)\n}";
        let m = serde_json::json!({
            "level": "error", "message": "cannot find function `helper` in this scope",
            "code": {"code": "E0425", "explanation": "..."},
            "spans": [
                span("src/lib.rs", 2, (5, 11), true, Some("not found in this scope")),
                span("/home/x/.cargo/registry/src/serde/lib.rs", 90, (1, 2), false, None)
            ],
            "children": [
                {"level": "help", "message": "consider importing this function", "spans": [], "children": [], "code": null, "rendered": null},
                {"level": "note", "message": "n", "spans": [], "children": [], "code": null, "rendered": null}
            ],
            "rendered": null
        });
        let d = diag_from_rustc(&serde_json::from_value(m).unwrap(), "src/lib.rs");
        assert_eq!(d.spans.len(), 1);
        let (evalue, tb) = render(code, "closure", &[d, Diag { level: "warning".into(), ..Diag::default() }]);
        assert_eq!(evalue, "cannot find function `helper` in this scope");
        assert_eq!(tb.len(), 1);
        assert_eq!(tb[0], "error[E0425]: cannot find function `helper` in this scope\n --> closure:2:5\n  |\n2 |     helper(1)\n  |     ^^^^^^ not found in this scope\nhelp: consider importing this function");
    }

    #[test]
    fn cargo_json_as_cargo_writes_it() {
        // Captured from `cargo build --message-format=json` (rust 1.95) on a closure crate.
        let out = concat!(
            r#"{"reason":"compiler-message","package_id":"path+file:///tmp/c#rpx_closures@0.0.0","manifest_path":"/tmp/c/Cargo.toml","target":{"kind":["cdylib"],"crate_types":["cdylib"],"name":"rpx_closures","src_path":"/tmp/c/src/lib.rs","edition":"2021","doc":true,"doctest":false,"test":true},"message":{"rendered":"error[E0425]: cannot find function `helper` in this scope\n","$message_type":"diagnostic","children":[],"level":"error","message":"cannot find function `helper` in this scope","spans":[{"byte_end":26,"byte_start":20,"column_end":11,"column_start":5,"expansion":null,"file_name":"src/lib.rs","is_primary":true,"label":"not found in this scope","line_end":2,"line_start":2,"suggested_replacement":null,"suggestion_applicability":null,"text":[{"highlight_end":11,"highlight_start":5,"text":"    helper(1)"}]}],"code":{"code":"E0425","explanation":"An unresolved name was used."}}}"#,
            "\n",
            r#"{"reason":"compiler-message","package_id":"path+file:///tmp/c#rpx_closures@0.0.0","manifest_path":"/tmp/c/Cargo.toml","target":{"kind":["cdylib"],"crate_types":["cdylib"],"name":"rpx_closures","src_path":"/tmp/c/src/lib.rs","edition":"2021","doc":true,"doctest":false,"test":true},"message":{"rendered":"For more information about this error, try `rustc --explain E0425`.\n","$message_type":"diagnostic","children":[],"level":"failure-note","message":"For more information about this error, try `rustc --explain E0425`.","spans":[],"code":null}}"#,
            "\n",
            r#"{"reason":"compiler-artifact","package_id":"path+file:///tmp/c#rpx_closures@0.0.0","manifest_path":"/tmp/c/Cargo.toml","target":{"kind":["cdylib"],"crate_types":["cdylib"],"name":"rpx_closures","src_path":"/tmp/c/src/lib.rs","edition":"2021","doc":true,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":false},"features":[],"filenames":["/tmp/c/t/debug/librpx_closures.so"],"executable":null,"fresh":false}"#,
            "\n",
            r#"{"reason":"build-finished","success":false}"#,
        );
        let (deps, lib, diags) = parse_cargo_json(out);
        assert_eq!((deps, lib), (0, Some(PathBuf::from("/tmp/c/t/debug/librpx_closures.so"))));
        assert_eq!(diags.iter().map(|d| d.level.as_str()).collect::<Vec<_>>(), ["error", "failure-note"]);
        let (evalue, tb) = render("fn f() -> u32 {\n    helper(1)\n}", "closure", &diags);
        assert_eq!(evalue, "cannot find function `helper` in this scope");
        assert_eq!(tb, ["error[E0425]: cannot find function `helper` in this scope\n --> closure:2:5\n  |\n2 |     helper(1)\n  |     ^^^^^^ not found in this scope"]);
    }
}
