//! Compiled artifacts on an engine's host: where each one is loaded from, the per-host cache
//! that engines on one host share, and the fetches in progress.
//!
//! An engine on the compiler's host loads an artifact by its path (zero copies). Any other engine
//! looks in its host's cache (`$RPX_CACHE_DIR`, else `$XDG_CACHE_HOME/rpx`, else
//! `~/.cache/rpx`; directory 0700), and otherwise fetches it from the compiler: one engine per
//! host takes the artifact's lock file (`flock`), asks the compiler, checks size and SHA-256,
//! writes a temporary file and renames it into place; the other engines of the host wait for
//! the file or for the lock to become free. Nothing is loaded that failed its check.
//!
//! [`Fetcher`] makes every decision as a plain function over its state and the file system; the
//! engine loop sends the `artifact_request`s it asks for and feeds it the replies.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rpx_protocol::compile::{Artifact, ArtifactReply, HostProbe, RuntimeLib};
use sha2::{Digest, Sha256};

/// Overrides where the per-host artifact cache lives.
pub const CACHE_ENV: &str = "RPX_CACHE_DIR";
/// Largest artifact an engine accepts (checked before anything is fetched).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// How long one fetch may take, including waiting for another engine of the host.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The default cache directory: `$RPX_CACHE_DIR`, `$XDG_CACHE_HOME/rpx` or `~/.cache/rpx`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("rpx");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("rpx")
}

/// What an artifact is for, which decides its file name in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A cell or closure, loaded by path: `<sha256>.so`.
    Code,
    /// A library found by the dynamic linker under its own name: `runtime/<sha256>/<name>`.
    Runtime { name: String },
}

/// Check `bytes` against the artifact's size and hash.
pub fn verify(a: &Artifact, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() as u64 != a.size {
        return Err(format!(
            "artifact {} is {} bytes, expected {} (truncated or replaced); refused",
            short(&a.sha256),
            bytes.len(),
            a.size
        ));
    }
    let got = const_hex::encode(Sha256::digest(bytes));
    if got != a.sha256 {
        return Err(format!("artifact {} failed its SHA-256 check (got {}); refused, nothing ran", short(&a.sha256), short(&got)));
    }
    Ok(())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// An exclusive `flock` on one artifact's lock file, released when dropped.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

/// The per-host cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Open (creating, mode 0700) the cache at `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir.join("runtime"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Cache { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact lives in the cache.
    pub fn path_for(&self, a: &Artifact, kind: &Kind) -> PathBuf {
        match kind {
            Kind::Code => self.dir.join(format!("{}.so", a.sha256)),
            Kind::Runtime { name } => self.dir.join("runtime").join(&a.sha256).join(name),
        }
    }

    /// The cached file, if it is there with the right size (files only appear whole, by rename).
    pub fn lookup(&self, a: &Artifact, kind: &Kind) -> Option<PathBuf> {
        let p = self.path_for(a, kind);
        (std::fs::metadata(&p).ok()?.len() == a.size).then_some(p)
    }

    /// Take the artifact's lock without waiting; `None` if another process holds it.
    pub fn try_lock(&self, sha256: &str) -> std::io::Result<Option<Lock>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(format!("{sha256}.lock")))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(Lock(f)));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Check `bytes` and put them in place atomically (temporary file, then rename).
    pub fn store(&self, a: &Artifact, kind: &Kind, bytes: &[u8]) -> Result<PathBuf, String> {
        verify(a, bytes)?;
        let dest = self.path_for(a, kind);
        let dir = dest.parent().expect("cache paths have a parent");
        let io = |e: std::io::Error| format!("cannot write artifact {} to {}: {e}", short(&a.sha256), dir.display());
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(".{}.{}.tmp", a.sha256, std::process::id()));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &dest).map_err(io)?;
        Ok(dest)
    }
}

/// What to do about an artifact the engine wants.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Load it from this path.
    Ready(PathBuf),
    /// Send an `artifact_request` for this hash, then wait.
    Request(String),
    /// Wait: a fetch (this engine's or another engine's on this host) is under way.
    Wait,
    /// It cannot be had; the error says why. Nothing may run.
    Failed(String),
}

/// Where the compiler's runtime libraries are.
#[derive(Debug, PartialEq, Eq)]
pub enum RuntimeStep {
    /// All that can be had are ready, in these directories (for the worker's library path).
    Ready(Vec<String>),
    /// Send an `artifact_request` for this hash, then wait.
    Request(String),
    /// Wait: a fetch is under way.
    Wait,
}

#[derive(Debug)]
struct Fetch {
    artifact: Artifact,
    kind: Kind,
    /// Held while this engine fetches; `None` while another engine of the host does.
    lock: Option<Lock>,
    started: Instant,
}

/// Where artifacts come from for this engine, and the fetches in progress.
#[derive(Debug)]
pub struct Fetcher {
    /// Engines on the compiler's host load artifacts by path.
    same_host: bool,
    cache: Option<Cache>,
    fetches: HashMap<String, Fetch>,
    /// Failures not yet reported to whoever wanted the artifact.
    failed: HashMap<String, String>,
    /// Artifacts this engine fetched from the compiler (for logs and tests).
    pub fetched: u64,
}

impl Fetcher {
    /// `cache` is `None` when the cache directory could not be opened (then only same-host
    /// artifacts can be loaded).
    pub fn new(same_host: bool, cache: Option<Cache>) -> Fetcher {
        Fetcher { same_host, cache, fetches: HashMap::new(), failed: HashMap::new(), fetched: 0 }
    }

    /// The fetcher for a newly connected compiler: this engine is on the compiler's host if it
    /// can read the compiler's probe file; otherwise it uses the host's cache ([`default_dir`]).
    pub fn for_compiler(probe: &HostProbe) -> Fetcher {
        let same_host = std::fs::read_to_string(&probe.path).is_ok_and(|t| t == probe.token);
        let cache = if same_host {
            None
        } else {
            let dir = default_dir();
            Cache::open(&dir).map_err(|e| tracing::error!(dir = %dir.display(), error = %e, "cannot open the artifact cache")).ok()
        };
        Fetcher::new(same_host, cache)
    }

    pub fn same_host(&self) -> bool {
        self.same_host
    }

    /// The cache directory, if this engine uses one.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_ref().map(Cache::dir)
    }

    /// The directories of the runtime libraries `libs` once each can be loaded (in order,
    /// without repeats in a row). A library that cannot be had is left out (said in the log):
    /// cells that need it will not load.
    pub fn runtime_dirs(&mut self, libs: &[RuntimeLib], now: Instant) -> RuntimeStep {
        let mut dirs = Vec::new();
        for lib in libs {
            match self.want(&lib.artifact, Kind::Runtime { name: lib.name.clone() }, now) {
                Step::Ready(p) => dirs.extend(p.parent().map(|d| d.display().to_string())),
                Step::Request(sha) => return RuntimeStep::Request(sha),
                Step::Wait => return RuntimeStep::Wait,
                Step::Failed(why) => tracing::error!(lib = %lib.name, %why, "runtime library refused; cells that need it will not load"),
            }
        }
        dirs.dedup();
        RuntimeStep::Ready(dirs)
    }

    /// Is a fetch under way (the engine then ticks often to [`Fetcher::poll`])?
    pub fn busy(&self) -> bool {
        !self.fetches.is_empty()
    }

    /// The engine wants `a` as `kind`.
    pub fn want(&mut self, a: &Artifact, kind: Kind, now: Instant) -> Step {
        if self.same_host {
            return Step::Ready(PathBuf::from(&a.path));
        }
        if let Some(why) = self.failed.remove(&a.sha256) {
            return Step::Failed(why);
        }
        if !Artifact::valid_hash(&a.sha256) {
            return Step::Failed(format!("the compiler named an artifact with a malformed hash {:?}; refused", a.sha256));
        }
        if a.size > MAX_ARTIFACT_BYTES {
            return Step::Failed(format!(
                "artifact {} is {} bytes, more than the {} bytes an engine accepts; refused",
                short(&a.sha256),
                a.size,
                MAX_ARTIFACT_BYTES
            ));
        }
        let Some(cache) = &self.cache else {
            return Step::Failed(
                "this engine is not on the compiler's host and has no artifact cache directory (set RPX_CACHE_DIR)".into(),
            );
        };
        if let Some(p) = cache.lookup(a, &kind) {
            return Step::Ready(p);
        }
        if self.fetches.contains_key(&a.sha256) {
            return Step::Wait;
        }
        let fetch = Fetch { artifact: a.clone(), kind, lock: None, started: now };
        self.fetches.insert(a.sha256.clone(), fetch);
        self.take_lock(&a.sha256)
    }

    /// Try to become the host's fetcher of `sha`: take its lock, then look again (another
    /// engine may have finished between) or ask for it.
    fn take_lock(&mut self, sha: &str) -> Step {
        let (Some(cache), Some(f)) = (&self.cache, self.fetches.get_mut(sha)) else { return Step::Wait };
        match cache.try_lock(sha) {
            Ok(Some(lock)) => {
                if let Some(p) = cache.lookup(&f.artifact, &f.kind) {
                    self.fetches.remove(sha);
                    return Step::Ready(p);
                }
                f.lock = Some(lock);
                Step::Request(sha.to_string())
            }
            Ok(None) => Step::Wait,
            Err(e) => {
                self.fetches.remove(sha);
                Step::Failed(format!("cannot lock the artifact cache {}: {e}", cache.dir().display()))
            }
        }
    }

    /// The compiler's `artifact_reply` with its buffer. Returns the hash it settled and whether
    /// it is now ready; a failure is kept for the next [`Fetcher::want`] of that hash.
    pub fn on_reply(&mut self, reply: &ArtifactReply, bytes: Option<&[u8]>) -> Option<(String, bool)> {
        let f = self.fetches.remove(&reply.sha256)?;
        let cache = self.cache.as_ref().expect("fetches need a cache");
        let outcome = match (reply.status.as_str(), bytes) {
            ("ok", Some(b)) => cache.store(&f.artifact, &f.kind, b).map(|_| ()),
            ("ok", None) => Err(format!("the compiler sent artifact {} without its bytes; refused", short(&reply.sha256))),
            _ => Err(format!("the compiler could not send artifact {}: {}", short(&reply.sha256), reply.evalue)),
        };
        drop(f.lock);
        match outcome {
            Ok(()) => {
                self.fetched += 1;
                Some((reply.sha256.clone(), true))
            }
            Err(why) => {
                self.failed.insert(reply.sha256.clone(), why);
                Some((reply.sha256.clone(), false))
            }
        }
    }

    /// Advance fetches that wait: another engine's fetch finished (or gave up its lock), or a
    /// fetch took too long. Returns the steps for hashes that moved (requests to send, or
    /// settled ones: the engine then asks [`Fetcher::want`] again).
    pub fn poll(&mut self, now: Instant) -> Vec<(String, Step)> {
        let mut out = Vec::new();
        let shas: Vec<String> = self.fetches.keys().cloned().collect();
        for sha in shas {
            let f = &self.fetches[&sha];
            if now.duration_since(f.started) > FETCH_TIMEOUT {
                self.fetches.remove(&sha);
                self.failed.insert(
                    sha.clone(),
                    format!("fetching artifact {} from the compiler took more than {} s; gave up", short(&sha), FETCH_TIMEOUT.as_secs()),
                );
                out.push((sha, Step::Wait));
                continue;
            }
            if f.lock.is_some() {
                continue;
            }
            match self.take_lock(&sha) {
                Step::Wait => {}
                step => out.push((sha, step)),
            }
        }
        out
    }

    /// The compiler went away: every fetch fails with `why`.
    pub fn abort_all(&mut self, why: &str) {
        for (sha, _) in self.fetches.drain() {
            self.failed.insert(sha, format!("the compiler went away while sending this artifact ({why})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(bytes: &[u8]) -> Artifact {
        Artifact { path: "/compiler/only/libcode_1.so".into(), sha256: const_hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
    }

    fn ok(a: &Artifact) -> ArtifactReply {
        ArtifactReply { sha256: a.sha256.clone(), status: "ok".into(), size: a.size, evalue: String::new() }
    }

    #[test]
    fn same_host_engines_load_by_path_without_a_cache() {
        let a = artifact(b"code");
        let mut f = Fetcher::new(true, None);
        assert_eq!(f.want(&a, Kind::Code, Instant::now()), Step::Ready("/compiler/only/libcode_1.so".into()));
        assert!(!f.busy());
    }

    #[test]
    fn a_remote_engine_fetches_once_then_loads_from_its_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        assert_eq!(std::fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        let a = artifact(b"cell bytes");
        let mut f = Fetcher::new(false, Some(cache.clone()));
        let now = Instant::now();
        assert_eq!(f.want(&a, Kind::Code, now), Step::Request(a.sha256.clone()));
        assert_eq!(f.want(&a, Kind::Code, now), Step::Wait, "one request per artifact");
        assert_eq!(f.on_reply(&ok(&a), Some(b"cell bytes")), Some((a.sha256.clone(), true)));
        let path = cache.path_for(&a, &Kind::Code);
        assert_eq!(f.want(&a, Kind::Code, now), Step::Ready(path.clone()));
        assert_eq!(std::fs::read(&path).unwrap(), b"cell bytes");
        assert_eq!(f.fetched, 1);
        // A second engine of the host finds it without asking.
        let mut g = Fetcher::new(false, Some(cache));
        assert_eq!(g.want(&a, Kind::Code, now), Step::Ready(path));
        assert_eq!(g.fetched, 0);
    }

    #[test]
    fn tampered_or_truncated_bytes_are_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let a = artifact(b"the real code");
        let mut f = Fetcher::new(false, Some(cache.clone()));
        let now = Instant::now();
        for (bad, what) in [(&b"the fake code"[..], "SHA-256"), (&b"the real"[..], "truncated")] {
            assert!(matches!(f.want(&a, Kind::Code, now), Step::Request(_)));
            assert_eq!(f.on_reply(&ok(&a), Some(bad)), Some((a.sha256.clone(), false)));
            match f.want(&a, Kind::Code, now) {
                Step::Failed(why) => assert!(why.contains(what) && why.contains("refused"), "{why}"),
                other => panic!("{other:?}"),
            }
            assert!(cache.lookup(&a, &Kind::Code).is_none());
        }
        // The failure was reported once; the next want tries again.
        assert!(matches!(f.want(&a, Kind::Code, now), Step::Request(_)));
    }

    #[test]
    fn engines_of_one_host_share_a_fetch_through_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let a = artifact(b"libstd");
        let kind = Kind::Runtime { name: "libstd-x.so".into() };
        let now = Instant::now();
        let mut first = Fetcher::new(false, Some(cache.clone()));
        let mut second = Fetcher::new(false, Some(cache.clone()));
        assert!(matches!(first.want(&a, kind.clone(), now), Step::Request(_)));
        assert_eq!(second.want(&a, kind.clone(), now), Step::Wait, "the first engine holds the lock");
        assert!(second.poll(now).is_empty(), "still fetching");
        first.on_reply(&ok(&a), Some(b"libstd"));
        let path = dir.path().join("runtime").join(&a.sha256).join("libstd-x.so");
        assert_eq!(second.poll(now), vec![(a.sha256.clone(), Step::Ready(path.clone()))]);
        assert_eq!(second.want(&a, kind, now), Step::Ready(path));
        assert_eq!((first.fetched, second.fetched), (1, 0));
    }

    #[test]
    fn a_fetcher_that_failed_leaves_the_lock_to_the_next_engine() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let a = artifact(b"x");
        let now = Instant::now();
        let mut first = Fetcher::new(false, Some(cache.clone()));
        let mut second = Fetcher::new(false, Some(cache));
        assert!(matches!(first.want(&a, Kind::Code, now), Step::Request(_)));
        assert_eq!(second.want(&a, Kind::Code, now), Step::Wait);
        first.abort_all("gone");
        first.on_reply(&ok(&a), Some(b"x")); // late reply for an aborted fetch: ignored
        assert!(matches!(first.want(&a, Kind::Code, now), Step::Failed(w) if w.contains("went away")));
        // Still holding nothing: the second engine takes over.
        assert_eq!(second.poll(now), vec![(a.sha256.clone(), Step::Request(a.sha256.clone()))]);
    }

    fn lib(name: &str, path: &str, bytes: &[u8]) -> RuntimeLib {
        RuntimeLib { name: name.into(), artifact: Artifact { path: path.into(), ..artifact(bytes) } }
    }

    #[test]
    fn the_runtime_libraries_are_found_where_the_compiler_keeps_them_on_its_host() {
        let libs = [
            lib("libstd-a.so", "/rt/lib/libstd-a.so", b"std"),
            lib("libfoo.so", "/rt/lib/libfoo.so", b"foo"),
            lib("libbar.so", "/other/libbar.so", b"bar"),
        ];
        let mut f = Fetcher::new(true, None);
        assert_eq!(f.runtime_dirs(&libs, Instant::now()), RuntimeStep::Ready(vec!["/rt/lib".into(), "/other".into()]));
    }

    #[test]
    fn a_remote_engine_fetches_the_runtime_libraries_into_its_cache_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let libs = [lib("libstd-a.so", "/rt/libstd-a.so", b"std")];
        let mut f = Fetcher::new(false, Some(cache));
        let now = Instant::now();
        let sha = libs[0].artifact.sha256.clone();
        assert_eq!(f.runtime_dirs(&libs, now), RuntimeStep::Request(sha.clone()));
        assert_eq!(f.runtime_dirs(&libs, now), RuntimeStep::Wait);
        f.on_reply(&ok(&libs[0].artifact), Some(b"std"));
        let want = dir.path().join("runtime").join(&sha).display().to_string();
        assert_eq!(f.runtime_dirs(&libs, now), RuntimeStep::Ready(vec![want]));
    }

    #[test]
    fn a_runtime_library_that_cannot_be_had_is_left_out() {
        let mut f = Fetcher::new(false, None);
        assert_eq!(f.runtime_dirs(&[lib("libstd-a.so", "/rt/libstd-a.so", b"std")], Instant::now()), RuntimeStep::Ready(vec![]));
    }

    #[test]
    fn an_engine_that_reads_the_compilers_probe_is_on_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join("probe");
        std::fs::write(&probe, "token-1").unwrap();
        let mut f = Fetcher::for_compiler(&HostProbe { path: probe.display().to_string(), token: "token-1".into() });
        assert!(f.same_host() && f.cache_dir().is_none());
        assert_eq!(
            f.runtime_dirs(&[lib("libstd-a.so", "/rt/libstd-a.so", b"std")], Instant::now()),
            RuntimeStep::Ready(vec!["/rt".into()])
        );
    }

    #[test]
    fn malformed_oversized_and_slow_artifacts_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fetcher::new(false, Some(Cache::open(dir.path()).unwrap()));
        let now = Instant::now();
        let bad = Artifact { path: String::new(), sha256: "../../x".into(), size: 1 };
        assert!(matches!(f.want(&bad, Kind::Code, now), Step::Failed(w) if w.contains("malformed")));
        let huge = Artifact { size: MAX_ARTIFACT_BYTES + 1, ..artifact(b"h") };
        assert!(matches!(f.want(&huge, Kind::Code, now), Step::Failed(w) if w.contains("more than")));
        let a = artifact(b"slow");
        assert!(matches!(f.want(&a, Kind::Code, now), Step::Request(_)));
        let later = now + FETCH_TIMEOUT + Duration::from_secs(1);
        assert_eq!(f.poll(later).len(), 1);
        assert!(matches!(f.want(&a, Kind::Code, later), Step::Failed(w) if w.contains("gave up")));
        let mut none = Fetcher::new(false, None);
        assert!(matches!(none.want(&a, Kind::Code, now), Step::Failed(w) if w.contains("RPX_CACHE_DIR")));
    }
}
