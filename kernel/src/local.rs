//! The kernel's own evcxr context, for cells that run locally: created in the background at
//! start, streams the cell's stdout/stderr to iopub while it runs, turns rich output
//! (`EVCXR_BEGIN_CONTENT mime`) into Jupyter mime bundles and rustc errors into tracebacks,
//! answers completion and hover, and is interrupted by killing its runtime (as evcxr_jupyter).
//! A cell that mentions `rpx::` first gets the `rpx` client crate as a dependency.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

use evcxr::{CommandContext, EvalContextOutputs};
use serde_json::{Map, Value};

use crate::server::Shared;
use rpx_magics::{IopubMsg, StreamName};

/// How a local cell ended.
pub enum LocalOutcome {
    /// Ran; its result or rich output, if any (mime type -> data).
    Ok(Option<Map<String, Value>>),
    /// Failed: `(ename, evalue, traceback)`.
    Err(String, String, Vec<String>),
}

/// The evcxr context, or why there is none.
pub struct Local {
    ctx: Option<Result<CommandContext, String>>,
    init: Option<mpsc::Receiver<Result<(CommandContext, EvalContextOutputs), String>>>,
    shared: Arc<Shared>,
    rpx_added: bool,
}

impl Local {
    /// Start creating the context in the background (evcxr warms rust-analyzer up: seconds).
    pub fn start(shared: Arc<Shared>) -> Local {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("evcxr-init".into())
            .spawn(move || {
                let r = CommandContext::new().map_err(|e| format!("cannot start evcxr: {e}"));
                let _ = tx.send(r);
            })
            .expect("spawn a thread");
        Local { ctx: None, init: Some(rx), shared, rpx_added: false }
    }

    fn ctx(&mut self) -> Result<&mut CommandContext, String> {
        if let Some(rx) = self.init.take() {
            let r = rx.recv().unwrap_or_else(|_| Err("the evcxr start-up thread died".into()));
            self.ctx = Some(r.map(|(ctx, outputs)| {
                forward(outputs.stdout, StreamName::Stdout, self.shared.clone());
                forward(outputs.stderr, StreamName::Stderr, self.shared.clone());
                *self.shared.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.process_handle());
                ctx
            }));
        }
        match self.ctx.as_mut().expect("set above") {
            Ok(c) => Ok(c),
            Err(e) => Err(e.clone()),
        }
    }

    /// Run a cell.
    pub fn execute(&mut self, code: &str) -> LocalOutcome {
        if !self.rpx_added && mentions_rpx(code) {
            if let Some(path) = client_crate_path() {
                self.shared.publish_stream(
                    StreamName::Stderr,
                    "Adding the rpx client crate to this kernel (its first build takes minutes; later kernels reuse evcxr's build cache)...\n",
                );
                let cache_mb = std::env::var("RPX_KERNEL_CACHE_MB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1024);
                if cache_mb > 0 {
                    let cache = format!(":cache {cache_mb}");
                    if let err @ LocalOutcome::Err(..) = self.run(&cache, &cache) {
                        return err;
                    }
                }
                let dep = format!(":dep rpx = {{ path = {:?} }}", path.to_string_lossy());
                match self.run(&dep, &dep) {
                    LocalOutcome::Ok(_) => self.rpx_added = true,
                    err => return err,
                }
            }
        }
        self.run(code, code)
    }

    fn run(&mut self, code: &str, shown: &str) -> LocalOutcome {
        let shared = self.shared.clone();
        let ctx = match self.ctx() {
            Ok(c) => c,
            Err(e) => return LocalOutcome::Err("KernelError".into(), e, vec![]),
        };
        shared.interrupted.store(false, Ordering::SeqCst);
        shared.local_running.store(true, Ordering::SeqCst);
        let r = ctx.execute(code);
        shared.local_running.store(false, Ordering::SeqCst);
        let interrupted = shared.interrupted.swap(false, Ordering::SeqCst);
        match r {
            Ok(out) if out.content_by_mime_type.is_empty() => LocalOutcome::Ok(None),
            Ok(out) if out.content_by_mime_type.len() == 1 && out.content_by_mime_type.get("text/plain").is_some_and(|t| t == "()") => LocalOutcome::Ok(None),
            Ok(out) => {
                let data = out
                    .content_by_mime_type
                    .into_iter()
                    .map(|(mime, text)| {
                        let v = if mime.contains("json") { serde_json::from_str(&text).unwrap_or(Value::String(text)) } else { Value::String(text) };
                        (mime, v)
                    })
                    .collect();
                LocalOutcome::Ok(Some(data))
            }
            Err(evcxr::Error::CompilationErrors(errors)) => {
                let (evalue, tb) = crate::diagnostics::render(shown, &errors);
                LocalOutcome::Err("CompileError".into(), evalue, tb)
            }
            Err(evcxr::Error::SubprocessTerminated(why)) if interrupted => LocalOutcome::Err(
                "KeyboardInterrupt".into(),
                "the cell was interrupted; the kernel's local variables were lost (its Rust runtime restarted)".into(),
                vec![why],
            ),
            Err(evcxr::Error::SubprocessTerminated(why)) => LocalOutcome::Err(
                "RuntimeDied".into(),
                format!("{why}; the kernel's local variables were lost (its Rust runtime restarted)"),
                vec![],
            ),
            Err(evcxr::Error::TypeRedefinedVariablesLost(vars)) => LocalOutcome::Err(
                "VariablesLost".into(),
                format!("a type was redefined, so these variables were dropped: {}", vars.join(", ")),
                vec![],
            ),
            Err(e) => {
                let msg = e.to_string();
                let ename = if msg.contains("panicked") { "Panic" } else { "Error" };
                LocalOutcome::Err(ename.into(), msg.trim_end().to_string(), vec![])
            }
        }
    }

    /// Completions at byte `pos`: `(matches, start byte, end byte)`.
    pub fn complete(&mut self, code: &str, pos: usize) -> Result<(Vec<String>, usize, usize), String> {
        let ctx = self.ctx()?;
        let c = ctx.completions(code, pos).map_err(|e| e.to_string())?;
        Ok((c.completions.into_iter().map(|c| c.code).collect(), c.start_offset, c.end_offset))
    }

    /// Hover text at byte `pos`: `(plain, html)`.
    pub fn inspect(&mut self, code: &str, pos: usize) -> Result<(String, String), String> {
        let ctx = self.ctx()?;
        ctx.hover_at(code, pos).map_err(|e| e.to_string())
    }
}

/// A result that is just `()` (a cell ending in `println!(..)` without `;`): not shown, as
/// ipyparallel does not show `None`.
pub fn is_unit(data: &Value) -> bool {
    data.as_object().is_some_and(|d| d.len() == 1 && d.get("text/plain").and_then(Value::as_str) == Some("()"))
}

fn mentions_rpx(code: &str) -> bool {
    code.contains("rpx::") && !code.lines().any(|l| l.trim_start().starts_with(":dep rpx"))
}

/// The `rpx` client crate's sources: `$RPX_CLIENT_PATH`, else the workspace this kernel was built in.
fn client_crate_path() -> Option<PathBuf> {
    let p = match std::env::var_os("RPX_CLIENT_PATH") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../client")),
    };
    let p = p.canonicalize().ok()?;
    p.join("Cargo.toml").is_file().then_some(p)
}

/// Forward a stream of evcxr output lines to iopub, batching lines that are already waiting.
fn forward(rx: crossbeam_channel::Receiver<String>, name: StreamName, shared: Arc<Shared>) {
    std::thread::Builder::new()
        .name(format!("evcxr-{}", name.as_str()))
        .spawn(move || {
            while let Ok(line) = rx.recv() {
                let mut text = line + "\n";
                while let Ok(more) = rx.try_recv() {
                    text.push_str(&more);
                    text.push('\n');
                }
                shared.publish(&IopubMsg::Stream { name, text });
            }
        })
        .expect("spawn a thread");
}
