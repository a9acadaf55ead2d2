//! The `rpx` client crate compiled ahead of the first cell that needs it.
//!
//! Building the client crate and its dependency tree inside evcxr takes minutes the first time.
//! `rpx-kernel prepare` (run by `rpx-kernel install` unless `--no-prepare`, and in the
//! background, at low priority, by a kernel that starts and finds nothing prepared) does that
//! build once, in an evcxr context of its own, and keeps the context's build directory as a
//! *seed*: `$XDG_CACHE_HOME/rpx/kernel/seed-<key>` (else `~/.cache/rpx/...`; directories
//! 0700). A kernel's first `rpx::` cell copies the seed's compiled dependencies into its own
//! evcxr build directory ([`merge_seed`]), so cargo finds them fresh and builds only the cell.
//!
//! The seed is only a cache: cargo's own fingerprints decide what is fresh, so a stale seed (a
//! new toolchain) costs a rebuild, never a wrong result; an edited client crate or a rebuilt
//! kernel keys a new seed ([`seed_dir`]), and the one built last replaces the others. A seed is
//! built in `building-<pid>` under an exclusive lock and renamed into place when complete, so a
//! kernel never copies half a build.
//!
//! A seed is relocatable because cargo records the files a crate was compiled from relative to
//! the target directory when they are inside it (a build script's `OUT_DIR` output, such as the
//! `private.rs` that serde_core and thiserror `include!`). That holds only if rustc wrote the
//! dep-info in this build: evcxr's compilation cache (`:cache`, `$XDG_CACHE_HOME/evcxr`) hands
//! back a cached crate's files verbatim, `.d` included, and that names the `OUT_DIR` of the
//! build that filled the cache (an earlier `building-<pid>`, long gone). Cargo then finds the
//! file missing, so the crate and everything that depends on it is rebuilt by every cargo run
//! of every kernel (and the rebuild, again from the cache, records the same missing path). So a
//! seed build compiles every crate itself ([`SEED_BUILD_ENV`], [`wrapper_hook`]), and checks
//! that the dep-info it keeps names only files that exist ([`missing_dep_files`]).

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// `RPX_KERNEL_PREPARE=0`: a starting kernel does not prepare the client crate in the
/// background.
pub const PREPARE_ENV: &str = "RPX_KERNEL_PREPARE";

/// The longest a prepare may take, and so the longest anyone waits for one.
pub const PREPARE_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Set in a prepare's environment, so that cargo and the rustc wrapper it runs (this binary)
/// inherit it: the wrapper then compiles instead of taking crates from evcxr's cache
/// ([`wrapper_hook`]). Cargo tracks no such variable, so the build is the one a kernel's cargo
/// sees.
pub const SEED_BUILD_ENV: &str = "RPX_KERNEL_SEED_BUILD";

/// evcxr's marks on the rustc wrapper: the process is the wrapper; `:cache` is on.
const EVCXR_WRAPPER_ENV: &str = "EVCXR_RUSTC_WRAPPER";
const EVCXR_CACHE_ENV: &str = "EVCXR_CACHE_ENABLED";

/// The file that marks a complete seed.
const READY: &str = "READY";

/// The cell a prepare runs: it names the client crate, so evcxr builds it and its dependencies.
const PROBE: &str = "let _rpx_prepared = std::any::type_name::<rpx::Client>();";

/// The evcxr commands that add the client crate at `client` to a context: the same in a
/// prepare and in a kernel, so cargo sees the same build in both.
pub fn setup_commands(client: &Path) -> Vec<String> {
    let cache_mb = std::env::var("RPX_KERNEL_CACHE_MB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(1024);
    let mut c = Vec::new();
    if cache_mb > 0 {
        c.push(format!(":cache {cache_mb}"));
    }
    c.push(format!(":dep rpx = {{ path = {:?} }}", client.to_string_lossy()));
    c
}

/// `$XDG_CACHE_HOME/rpx/kernel`, else `$HOME/.cache/rpx/kernel`.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?).join(".cache"),
    };
    Ok(base.join("rpx").join("kernel"))
}

/// Where the seed for this kernel binary and this client crate lives: keyed by the binary
/// (path, size, modification time), the client crate's path and sources ([`sources_stamp`]) and
/// the setup commands, so an edited client crate or a rebuilt kernel gets a seed of its own
/// instead of rebuilding the changed crates at every kernel's first `rpx::` cell.
pub fn seed_dir(root: &Path, client: &Path) -> PathBuf {
    // SipHash with fixed keys: the same key for the same binary, client and options.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut h);
    let exe = std::env::current_exe().ok();
    exe.hash(&mut h);
    exe.and_then(|e| e.metadata().ok()).map(|m| (m.len(), m.modified().ok())).hash(&mut h);
    sources_stamp(client).hash(&mut h);
    setup_commands(client).hash(&mut h);
    root.join(format!("seed-{}-{:016x}", env!("CARGO_PKG_VERSION"), h.finish()))
}

/// Most source files a stamp looks at (a client path pointing somewhere huge stays cheap).
const STAMP_FILES: usize = 20_000;

/// The relative path, size and modification time of every Rust source, `Cargo.toml` and
/// `Cargo.lock` in the client crate's workspace (its parent directory, where its path
/// dependencies live; `target` and hidden directories skipped), in a stable order.
fn sources_stamp(client: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let base = client.parent().unwrap_or(client);
    let mut out: Vec<_> = walkdir::WalkDir::new(base)
        .max_depth(6)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !(e.file_name() == "target" || e.file_name().to_string_lossy().starts_with('.')))
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy();
            e.file_type().is_file() && (name.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock")
        })
        .take(STAMP_FILES)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path().strip_prefix(base).unwrap_or(e.path()).to_path_buf(), m.len(), m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// The seed, if one is complete.
pub fn ready_seed(client: &Path) -> Option<PathBuf> {
    let dir = seed_dir(&cache_root().ok()?, client);
    dir.join(READY).is_file().then_some(dir)
}

/// How a prepare ended.
pub enum Prepared {
    /// Built now, in this long.
    Built(PathBuf, Duration),
    /// It was there already.
    Ready(PathBuf),
    /// Another prepare holds the lock (only when not waiting for it).
    Busy,
}

/// The exclusive lock on a cache root: held while a seed is built (released when the file
/// closes).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Take the lock; `wait` bounds how long to wait for another holder (zero: try once).
    fn take(root: &Path, wait: Duration) -> Result<Option<Lock>> {
        let path = root.join("lock");
        let f = File::options().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let end = Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is passed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(Lock(f)));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether some process holds the lock of `root` now.
    fn held(root: &Path) -> bool {
        matches!(Lock::take(root, Duration::ZERO), Ok(None))
    }
}

/// A private directory (0700), created with its parents.
fn private_dir(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).with_context(|| format!("cannot create {}", p.display()))
}

/// Build the seed for `client` unless it is there. With `wait`, waits (at most
/// [`PREPARE_LIMIT`]) for a prepare that another process is running; without, returns
/// [`Prepared::Busy`]. Must run before this process starts threads: it sets `EVCXR_TMPDIR`.
pub fn prepare(client: &Path, wait: bool) -> Result<Prepared> {
    let root = cache_root()?;
    private_dir(&root)?;
    let seed = seed_dir(&root, client);
    if seed.join(READY).is_file() {
        return Ok(Prepared::Ready(seed));
    }
    let Some(_lock) = Lock::take(&root, if wait { PREPARE_LIMIT } else { Duration::ZERO })? else {
        if wait {
            bail!("another `rpx-kernel prepare` held {} for longer than {:?}", root.display(), PREPARE_LIMIT);
        }
        return Ok(Prepared::Busy);
    };
    if seed.join(READY).is_file() {
        return Ok(Prepared::Ready(seed));
    }
    // Builds that died half-way (the lock is ours: nobody else is building).
    for e in std::fs::read_dir(&root)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("building-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let started = Instant::now();
    let build = root.join(format!("building-{}", std::process::id()));
    private_dir(&build)?;
    std::env::set_var("EVCXR_TMPDIR", &build);
    std::env::set_var(SEED_BUILD_ENV, "1");
    let (mut ctx, outputs) = crate::local::new_context().map_err(|e| anyhow::anyhow!("cannot start evcxr: {e}"))?;
    // evcxr's compiler output: shown to whoever runs the prepare, and kept for its error.
    let stderr = std::thread::spawn(move || outputs.stderr.iter().collect::<Vec<_>>());
    let mut failure = None;
    for cmd in setup_commands(client).iter().chain([&PROBE.to_string()]) {
        if let Err(e) = ctx.execute(cmd) {
            failure = Some(format!("`{cmd}` failed: {e}"));
            break;
        }
    }
    drop(ctx);
    let lines = stderr.join().unwrap_or_default();
    if let Some(f) = failure {
        let _ = std::fs::remove_dir_all(&build);
        bail!("{f}\n{}", lines.join("\n"));
    }
    let missing = missing_dep_files(&build);
    if !missing.is_empty() {
        let shown: Vec<_> = missing.iter().take(5).map(|p| p.display().to_string()).collect();
        tracing::warn!(
            "the prepared build's dep-info names {} files that do not exist (e.g. {}): cargo will rebuild the crates \
             compiled from them in every kernel",
            missing.len(),
            shown.join(", ")
        );
    }
    File::create(build.join(READY))?;
    if seed.exists() {
        std::fs::remove_dir_all(&seed)?;
    }
    std::fs::rename(&build, &seed).with_context(|| format!("cannot move {} to {}", build.display(), seed.display()))?;
    // Seeds of earlier builds or sources (hundreds of MB each) go: a kernel still using one
    // has copied it already, and one that has not rebuilds what changed.
    for e in std::fs::read_dir(&root)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("seed-") && e.path() != seed {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(Prepared::Built(seed, started.elapsed()))
}

/// Called first thing in `main`: when this process is evcxr's rustc wrapper in a seed build,
/// turn evcxr's compilation cache off for it, so rustc compiles the crate and writes dep-info
/// that names this build's own files (see the module's doc). Single-threaded at that point.
pub fn wrapper_hook() {
    if bypass_evcxr_cache(std::env::var_os(EVCXR_WRAPPER_ENV).is_some(), std::env::var_os(SEED_BUILD_ENV).is_some()) {
        std::env::remove_var(EVCXR_CACHE_ENV);
    }
}

/// Whether a process takes crates from evcxr's cache: not the wrapper of a seed build.
fn bypass_evcxr_cache(is_wrapper: bool, seed_build: bool) -> bool {
    is_wrapper && seed_build
}

/// The files named as dependencies by the dep-info (`.d`) files under `<dir>/target` that do
/// not exist (relative ones are relative to `dir`, where cargo runs rustc for the context's own
/// crate): each makes cargo rebuild its crate at every build.
pub fn missing_dep_files(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = walkdir::WalkDir::new(dir.join("target"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "d"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|text| dep_info_files(&text))
        .filter(|p| !dir.join(p).exists())
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// The dependencies listed in a Makefile-style dep-info file as rustc writes it (`out: dep dep`,
/// spaces in paths escaped with `\`; `# env-dep:` comments skipped).
fn dep_info_files(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        // The target ends at the first unescaped ": ".
        let Some(deps) = split_unescaped(line, ": ").map(|(_, d)| d) else { continue };
        let mut cur = String::new();
        let mut chars = deps.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ' ' => out.extend((!cur.is_empty()).then(|| PathBuf::from(std::mem::take(&mut cur)))),
                c => cur.push(c),
            }
        }
        out.extend((!cur.is_empty()).then(|| PathBuf::from(cur)));
    }
    out
}

/// `line` split at the first `sep` not preceded by a backslash.
fn split_unescaped<'a>(line: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let mut from = 0;
    while let Some(i) = line[from..].find(sep).map(|i| i + from) {
        if !line[..i].ends_with('\\') {
            return Some((&line[..i], &line[i + sep.len()..]));
        }
        from = i + 1;
    }
    None
}

/// Start `rpx-kernel prepare --background` at low priority, unless [`PREPARE_ENV`] is `0`, a
/// seed is ready or another prepare is running. It dies with this process.
pub fn spawn_background(client: &Path) -> Option<Child> {
    if std::env::var(PREPARE_ENV).is_ok_and(|v| v == "0") || ready_seed(client).is_some() {
        return None;
    }
    let root = cache_root().ok()?;
    if Lock::held(&root) {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let mut cmd = Command::new(exe);
    cmd.args(["prepare", "--background"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
    cmd.spawn().ok()
}

/// Wait (at most [`PREPARE_LIMIT`]) while a prepare is running anywhere for this cache: true if
/// a seed is ready at the end.
pub fn wait_for_running(client: &Path) -> bool {
    let Ok(root) = cache_root() else { return false };
    let end = Instant::now() + PREPARE_LIMIT;
    while ready_seed(client).is_none() && Lock::held(&root) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
    }
    ready_seed(client).is_some()
}

/// Whether a prepare is running for this user's cache now.
pub fn running() -> bool {
    cache_root().is_ok_and(|r| Lock::held(&r))
}

/// Copy the seed's build into the evcxr build directory `tmpdir` (files already there are kept:
/// the context's own crate), with its lock file unless the context already locks other crates.
pub fn merge_seed(seed: &Path, tmpdir: &Path) -> Result<()> {
    let out = Command::new("cp")
        .args(["-a", "-n", "--reflink=auto"])
        .arg(seed.join("target").join("."))
        .arg(tmpdir.join("target"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run cp")?;
    if !out.status.success() {
        bail!("copying {} failed: {}", seed.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let lock = tmpdir.join("Cargo.lock");
    let packages = std::fs::read_to_string(&lock).map(|t| t.matches("[[package]]").count()).unwrap_or(0);
    if packages <= 1 {
        std::fs::copy(seed.join("Cargo.lock"), &lock).context("cannot copy the seed's Cargo.lock")?;
    }
    Ok(())
}

/// The evcxr build directory of this kernel: made at start (0700, `EVCXR_TMPDIR`), removed
/// when the kernel exits.
pub struct BuildDir;

static BUILD_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

impl BuildDir {
    /// Create it and point evcxr at it. Call before any thread starts.
    pub fn create() -> Result<&'static Path> {
        let dir = tempfile::Builder::new()
            .prefix("rpx-kernel-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("cannot create the kernel's build directory")?
            .keep();
        std::env::set_var("EVCXR_TMPDIR", &dir);
        Ok(BUILD_DIR.get_or_init(|| dir))
    }

    /// The directory, once created.
    pub fn get() -> Option<&'static Path> {
        BUILD_DIR.get().map(PathBuf::as_path)
    }

    /// Remove it (the kernel is exiting).
    pub fn remove() {
        if let Some(d) = BUILD_DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_keyed_by_client_crate_and_kept_under_the_cache_root() {
        let root = Path::new("/cache/rpx/kernel");
        let a = seed_dir(root, Path::new("/src/a/client"));
        let b = seed_dir(root, Path::new("/src/b/client"));
        assert_ne!(a, b);
        assert_eq!(a, seed_dir(root, Path::new("/src/a/client")));
        assert!(a.starts_with(root), "{a:?}");
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(concat!("seed-", env!("CARGO_PKG_VERSION"))));
    }

    #[test]
    fn an_edited_client_workspace_keys_a_new_seed_and_its_build_output_does_not() {
        let t = tempfile::tempdir().unwrap();
        let (ws, root) = (t.path().join("ws"), t.path().join("cache"));
        let client = ws.join("client");
        for d in [client.join("src"), ws.join("protocol/src"), ws.join("target/release")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(client.join("Cargo.toml"), "[package]\nname = \"rpx\"\n").unwrap();
        std::fs::write(client.join("src/lib.rs"), "pub struct Client;\n").unwrap();
        std::fs::write(ws.join("protocol/src/lib.rs"), "pub struct Session;\n").unwrap();
        let first = seed_dir(&root, &client);
        assert_eq!(first, seed_dir(&root, &client), "the same sources key the same seed");
        std::fs::write(ws.join("target/release/libx.rlib"), "built").unwrap();
        assert_eq!(first, seed_dir(&root, &client), "build output is not a source");
        std::fs::write(ws.join("protocol/src/lib.rs"), "pub struct Session { pub key: Vec<u8> }\n").unwrap();
        let edited = seed_dir(&root, &client);
        assert_ne!(first, edited, "a path dependency of the client was edited");
        std::fs::write(client.join("src/extra.rs"), "").unwrap();
        assert_ne!(edited, seed_dir(&root, &client), "a source file was added to the client");
    }

    #[test]
    fn kernels_and_prepares_add_the_client_crate_with_the_same_commands() {
        let c = setup_commands(Path::new("/src/client"));
        assert_eq!(c.last().unwrap(), r#":dep rpx = { path = "/src/client" }"#);
    }

    #[test]
    fn only_the_rustc_wrapper_of_a_seed_build_bypasses_evcxrs_cache() {
        assert!(bypass_evcxr_cache(true, true));
        assert!(!bypass_evcxr_cache(true, false), "a kernel's own builds keep evcxr's cache");
        assert!(!bypass_evcxr_cache(false, true), "the prepare process itself is not the wrapper");
    }

    #[test]
    fn dep_info_lists_the_dependencies_with_escaped_spaces_and_without_env_deps() {
        let text = "/t/deps/serde_core-1.d: /reg/serde_core/src/lib.rs /t/build/serde_core-2/out/private.rs\n\
                    \n\
                    /t/deps/libserde_core-1.rmeta: /reg/serde_core/src/lib.rs /my\\ dir/a.rs\n\
                    \n\
                    /reg/serde_core/src/lib.rs:\n\
                    /t/build/serde_core-2/out/private.rs:\n\
                    \n\
                    # env-dep:OUT_DIR=/t/build/serde_core-2/out\n";
        let files = dep_info_files(text);
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            files,
            [
                p("/reg/serde_core/src/lib.rs"),
                p("/t/build/serde_core-2/out/private.rs"),
                p("/reg/serde_core/src/lib.rs"),
                p("/my dir/a.rs")
            ]
        );
        assert_eq!(dep_info_files("/a\\: b.d: /x.rs\n"), [p("/x.rs")], "an escaped colon is part of the target");
    }

    #[test]
    fn dep_info_naming_another_builds_out_dir_is_found() {
        // What evcxr's cache gave a seed build: dep-info naming an earlier build's OUT_DIR.
        let t = tempfile::tempdir().unwrap();
        let build = t.path().join("building-2");
        let (target, src) = (build.join("target"), t.path().join("src.rs"));
        let out = target.join("x86_64-unknown-linux-gnu/debug/build/serde_core-2/out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("private.rs"), "").unwrap();
        std::fs::write(&src, "").unwrap();
        let deps = target.join("x86_64-unknown-linux-gnu/debug/deps");
        std::fs::create_dir_all(&deps).unwrap();
        let gone = t.path().join("building-1/target/x86_64-unknown-linux-gnu/debug/build/serde_core-2/out/private.rs");
        std::fs::write(deps.join("serde_core-9.d"), format!("{}: {} {}\n", deps.join("x.rmeta").display(), src.display(), gone.display()))
            .unwrap();
        std::fs::write(deps.join("thiserror-9.d"), format!("x: {} {}\n", src.display(), out.join("private.rs").display())).unwrap();
        std::fs::create_dir_all(build.join("src")).unwrap();
        std::fs::write(build.join("src/lib.rs"), "").unwrap();
        std::fs::write(deps.join("ctx-9.d"), "x: src/lib.rs\n").unwrap();
        assert_eq!(missing_dep_files(&build), [gone]);
        std::fs::remove_file(deps.join("serde_core-9.d")).unwrap();
        assert!(missing_dep_files(&build).is_empty(), "this build's own OUT_DIR files exist, and the context's relative source");
    }

    #[test]
    fn a_merge_keeps_the_contexts_own_files_and_takes_the_seeds_dependencies() {
        let t = tempfile::tempdir().unwrap();
        let (seed, ctx) = (t.path().join("seed"), t.path().join("ctx"));
        for d in [seed.join("target/debug/deps"), ctx.join("target/debug/deps")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(seed.join("target/debug/deps/libdep.rlib"), "dep").unwrap();
        std::fs::write(seed.join("target/debug/deps/libctx.so"), "old").unwrap();
        std::fs::write(ctx.join("target/debug/deps/libctx.so"), "new").unwrap();
        std::fs::write(seed.join("Cargo.lock"), "[[package]]\nname = \"ctx\"\n[[package]]\nname = \"rpx\"\n").unwrap();
        std::fs::write(ctx.join("Cargo.lock"), "[[package]]\nname = \"ctx\"\n").unwrap();
        merge_seed(&seed, &ctx).unwrap();
        let read = |p: &str| std::fs::read_to_string(ctx.join(p)).unwrap();
        assert_eq!(read("target/debug/deps/libdep.rlib"), "dep");
        assert_eq!(read("target/debug/deps/libctx.so"), "new");
        assert!(read("Cargo.lock").contains("rpx"));
    }
}
