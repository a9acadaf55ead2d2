//! The engine namespace on disk, and the code that links it with cell variables.
//!
//! A push writes each value (postcard bytes, as sent) to `<dir>/<name>` and does not touch the
//! worker, so pushing costs one file write whatever the size. The next cell binds the pushed
//! names as variables (`let n: T = ::rpx_runtime::get("n");` before the user's code), so cells
//! see them with the pushed type. A pull reads the file while it still holds the variable's
//! value; otherwise a small cell writes the variables out first (`::rpx_runtime::put`).
//! Closures read pushed values with `rpx::get`, which reads the same files.
//!
//! A client on the same host hands values over as files instead (`rpx_protocol::dataplane`):
//! it writes them under transfer names (`.xfer-<uuid>`, never a variable name), and [`adopt`]
//! checks them (kind, owner, size; the digest of bytes that crossed hosts) and renames them
//! into place; a pull is answered by [`export`] with hard links the client reads. Neither
//! copies the bytes in the engine, and on one host neither reads them. A large value replaced
//! by a push is kept as a spare for the next transfer file to be written over ([`Spares`]),
//! when nothing but the engine can still read it: no other name, no other open file or mapping.
//!
//! The directory is private: created fresh (mode 0700) when the engine starts, refusing one that
//! already exists, and every value file is 0600. Its `.owner` file names the engine process, so
//! directories of killed engines are found and removed (by the next engine on the host and by
//! `ipcluster stop`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use rpx_protocol::apply::NamedType;
use rpx_protocol::dataplane::{Integrity, ValueFile};

use crate::datalink::Received;

/// The namespace directory of an engine: on tmpfs when there is one (ipcluster's supervisor
/// removes it after the engine crashed, so the rule lives in `rpx_protocol`).
pub fn dir_for(engine_uuid: &str) -> PathBuf {
    rpx_protocol::connection::engine_namespace_dir(engine_uuid)
}

/// Create the engine's namespace directory, fresh and private (0700). A directory (or link) that
/// already exists at that path is refused: nothing planted there is ever read.
pub fn create(engine_uuid: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dir_for(engine_uuid);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create the engine namespace {}: {e}", dir.display())))?;
    // Who owns it, so that whoever finds it after this engine was killed can tell it is dead.
    let stamp = rpx_protocol::connection::process_stamp(std::process::id()).unwrap_or_default();
    let owner = dir.join(rpx_protocol::connection::NAMESPACE_OWNER);
    write_private(&owner, &dir.join(".owner.tmp"), stamp.as_bytes())?;
    Ok(dir)
}

/// Write `bytes` to `path` through a temporary file, readable by the owner only.
fn write_private(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(tmp, path)
}

/// Whether `name` can be a variable name in a cell.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic());
    first_ok && chars.all(|c| c == '_' || c.is_ascii_alphanumeric()) && name != "_" && !is_keyword(name)
}

fn is_keyword(name: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern", "false", "fn", "for", "gen", "if",
        "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "self", "Self", "static", "struct", "super",
        "trait", "true", "type", "unsafe", "use", "where", "while",
    ];
    KEYWORDS.contains(&name)
}

/// Write pushed values: `buffers[i]` becomes `names[i]`. Each file is replaced atomically, so a
/// closure reading it never sees half a value.
pub fn store(dir: &Path, names: &[NamedType], buffers: &[Bytes]) -> Result<(), String> {
    if names.len() != buffers.len() {
        return Err(format!("push of {} names came with {} values", names.len(), buffers.len()));
    }
    if let Some(bad) = names.iter().find(|n| !is_identifier(&n.name)) {
        return Err(format!("`{}` is not a variable name", bad.name));
    }
    if !dir.is_dir() {
        // Removed behind the engine's back (a tmpfs cleaner): make it again, private.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the namespace {}: {e}", dir.display()))?;
    }
    for (n, b) in names.iter().zip(buffers) {
        let tmp = dir.join(format!(".{}.push", n.name));
        write_private(&dir.join(&n.name), &tmp, b).map_err(|e| format!("cannot store `{}`: {e}", n.name))?;
    }
    Ok(())
}

/// What the engine knows of its value files' digests: name -> (inode, size, BLAKE3), filled
/// when a pushed file that came with a digest is adopted (its digest was just checked), so that
/// pulling it back over a data link costs no hashing. A value's file is only ever replaced by
/// rename, never written while it is a value (a spare is written over only once no name holds
/// it), so an unchanged inode and size under a name mean unchanged bytes.
#[derive(Debug, Default)]
pub struct Digests(std::collections::HashMap<String, (u64, u64, String)>);

impl Digests {
    fn get(&self, name: &str, ino: u64, size: u64) -> Option<&str> {
        self.0.get(name).filter(|(i, s, _)| *i == ino && *s == size).map(|(_, _, d)| d.as_str())
    }
}

/// Adopt files a same-host client or the data link wrote into the namespace
/// (`rpx_protocol::dataplane`): `files[i]` becomes `names[i]`. Every file is checked (a
/// transfer name, a regular file of this user, the announced size, and the BLAKE3 if one was
/// announced) before any is renamed into place, so a refused push changes nothing; the refused
/// push's files are removed. A file for which `received` says the data link wrote it with
/// exactly the announced size and digest is not hashed again; one the link wrote must come with
/// that digest (bytes that crossed hosts are never taken on their size alone).
///
/// The values replaced are kept under [old names](OLD_PREFIX) and returned: freeing a large
/// file's pages costs about as much as writing them, so the caller hands them to
/// [`Spares::retire`] once the push is answered.
pub fn adopt(
    dir: &Path,
    names: &[NamedType],
    files: &[ValueFile],
    digests: &mut Digests,
    received: impl Fn(&ValueFile) -> Received,
) -> Result<Vec<PathBuf>, String> {
    let checked = check_adoption(dir, names, files, received);
    if let Err(e) = checked {
        discard(dir, files);
        return Err(e);
    }
    let mut replaced = Vec::new();
    for (n, f) in names.iter().zip(files) {
        let to = dir.join(&n.name);
        // A second link keeps the old value's pages until the reply is out (the rename below
        // still replaces the name atomically: a reader sees the old value or the new one).
        let old = dir.join(format!("{OLD_PREFIX}{}", uuid::Uuid::new_v4()));
        if std::fs::hard_link(&to, &old).is_ok() {
            replaced.push(old);
        }
        if let Err(e) = std::fs::rename(dir.join(&f.file), &to) {
            discard(dir, files);
            remove_later(replaced);
            return Err(format!("cannot store `{}`: {e}", n.name));
        }
        use std::os::unix::fs::MetadataExt;
        match (std::fs::symlink_metadata(&to), &f.blake3) {
            (Ok(md), Some(d)) => digests.0.insert(n.name.clone(), (md.ino(), md.size(), d.clone())),
            _ => digests.0.remove(&n.name),
        };
    }
    Ok(replaced)
}

/// Prefix of the names replaced values have until [`Spares::retire`] keeps or removes them.
pub const OLD_PREFIX: &str = ".old-";

/// Most spares a namespace holds at once: enough for a loop that moves values of a few sizes
/// again and again, each size finding a spare of its own
/// ([`claim_spare`](rpx_protocol::dataplane::claim_spare) leaves much larger ones alone).
pub const MAX_SPARES: usize = 4;
/// Most bytes a namespace's spares hold at once (memory the replaced values held a moment
/// before, kept for at most [`SPARE_TTL`]).
pub const MAX_SPARE_BYTES: u64 = 2 << 30;
pub use rpx_protocol::dataplane::SPARE_TTL;

/// The spares the engine made in its namespace, oldest first, with the time each is freed
/// unless a transfer file claims it first (claiming renames it: it is then simply gone).
#[derive(Debug)]
pub struct Spares {
    expiring: VecDeque<(PathBuf, Instant)>,
    most: usize,
    most_bytes: u64,
}

impl Default for Spares {
    fn default() -> Spares {
        Spares::bounded(MAX_SPARES, MAX_SPARE_BYTES)
    }
}

impl Spares {
    /// Spares of at most `most` files and `most_bytes` bytes in all.
    pub fn bounded(most: usize, most_bytes: u64) -> Spares {
        Spares { expiring: VecDeque::new(), most, most_bytes }
    }

    /// Once a push is answered, the values it replaced (under [old names](OLD_PREFIX)): each
    /// that may be written over (`unshared`, from
    /// [`SPARE_FROM`](rpx_protocol::dataplane::SPARE_FROM) bytes) becomes a spare, freed at
    /// `now` + [`SPARE_TTL`], while the namespace's spares stay within their bounds (by default
    /// [`MAX_SPARES`] files and [`MAX_SPARE_BYTES`] bytes); returns the rest, to be removed
    /// ([`remove_later`], once the push is answered).
    pub fn retire(&mut self, dir: &Path, replaced: Vec<PathBuf>, now: Instant) -> Vec<PathBuf> {
        use rpx_protocol::dataplane::SPARE_PREFIX;
        use std::os::unix::fs::MetadataExt;
        if replaced.is_empty() {
            return Vec::new();
        }
        // The spares there are: those this engine made and nobody claimed or freed yet.
        let kept = self.listed();
        let (mut count, mut bytes) = (kept.len(), kept.iter().map(|s| s.size).sum::<u64>());
        let mut remove: Vec<PathBuf> = Vec::new();
        for old in replaced {
            let spare = dir.join(format!("{SPARE_PREFIX}{}", uuid::Uuid::new_v4()));
            let size = std::fs::symlink_metadata(&old).map_or(u64::MAX, |m| m.size());
            let fits = count < self.most && bytes.saturating_add(size) <= self.most_bytes;
            if fits && unshared(&old, || std::fs::rename(&old, &spare)).is_ok() {
                count += 1;
                bytes += size;
                self.expiring.push_back((spare, now + SPARE_TTL));
            } else {
                remove.push(old);
            }
        }
        remove
    }

    /// The spares this engine made that are still there (not claimed, not freed), oldest first:
    /// what a push's reply names ([`REPLY_SPARES_KEY`](rpx_protocol::dataplane::REPLY_SPARES_KEY)).
    pub fn listed(&self) -> Vec<rpx_protocol::dataplane::Spare> {
        use std::os::unix::fs::MetadataExt;
        self.expiring
            .iter()
            .filter_map(|(path, _)| {
                let size = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file())?.size();
                Some(rpx_protocol::dataplane::Spare { file: path.file_name()?.to_str()?.to_string(), size })
            })
            .collect()
    }

    /// Free the spares whose time has come by `now` (on the engine's periodic tick); returns the
    /// removing thread.
    pub fn expire(&mut self, now: Instant) -> Option<JoinHandle<()>> {
        let mut due = Vec::new();
        while self.expiring.front().is_some_and(|(_, at)| *at <= now) {
            due.extend(self.expiring.pop_front().map(|(p, _)| p));
        }
        remove_later(due)
    }
}

/// Remove files on a thread of their own (freeing a large file's pages costs about as much as
/// writing them: off the request path), or here if no thread can be started; returns the thread.
pub fn remove_later(paths: Vec<PathBuf>) -> Option<JoinHandle<()>> {
    if paths.is_empty() {
        return None;
    }
    let remove = |paths: &[PathBuf]| {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    };
    let kept = paths.clone();
    match std::thread::Builder::new().name("rpx-ns-remove".into()).spawn(move || remove(&paths)) {
        Ok(h) => Some(h),
        Err(_) => {
            remove(&kept);
            None
        }
    }
}

/// Run `then` on the file at `path` if nothing but this process can read or change it: a regular
/// file of at least `SPARE_FROM` bytes with one name, that no other open file or mapping
/// holds, in this process or another. Checked by a write lease (`F_SETLEASE`), which the
/// kernel grants only then, held while `then` runs (an `open` of it meanwhile waits for the
/// lease to be released, and its break signal is one that is ignored by default).
fn unshared(path: &Path, then: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    /// `F_SETSIG` (Linux's fcntl.h; not in the libc crate for this target).
    const F_SETSIG: libc::c_int = 10;
    let busy = || std::io::Error::other("held elsewhere");
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let md = f.metadata()?;
    if !md.is_file() || md.nlink() != 1 || md.size() < rpx_protocol::dataplane::SPARE_FROM {
        return Err(busy());
    }
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a file descriptor this function owns, with integer arguments only.
    unsafe {
        if libc::fcntl(fd, F_SETSIG, libc::SIGWINCH) != 0 || libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) != 0 {
            return Err(busy());
        }
    }
    let done = then();
    // SAFETY: as above; closing the file would release the lease as well.
    unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
    done
}

fn check_adoption(dir: &Path, names: &[NamedType], files: &[ValueFile], received: impl Fn(&ValueFile) -> Received) -> Result<(), String> {
    if names.len() != files.len() {
        return Err(format!("push of {} names came with {} files", names.len(), files.len()));
    }
    if let Some(bad) = names.iter().find(|n| !is_identifier(&n.name)) {
        return Err(format!("`{}` is not a variable name", bad.name));
    }
    for (n, f) in names.iter().zip(files) {
        if rpx_protocol::dataplane::is_transfer_name(&f.file) {
            match received(f) {
                // The data link wrote this file and hashed it on the way: the signed request
                // announces exactly that size and digest.
                Received::AsAnnounced => continue,
                Received::NotAsAnnounced if f.blake3.is_none() => {
                    return Err(format!(
                        "refused the pushed value `{}`: it came over the data link, but the push announced no digest for it; nothing was stored and `{}` keeps its previous value",
                        n.name, n.name
                    ))
                }
                Received::NotAsAnnounced | Received::NotByLink => {}
            }
        }
        rpx_protocol::dataplane::verify_value_file(dir, f).map_err(|e| {
            format!("refused the pushed value `{}`: {e}; nothing was stored and `{}` keeps its previous value", n.name, n.name)
        })?;
    }
    Ok(())
}

/// Remove the transfer files of a push that will not be adopted (refused or aborted).
pub fn discard(dir: &Path, files: &[ValueFile]) {
    for f in files.iter().filter(|f| rpx_protocol::dataplane::is_transfer_name(&f.file)) {
        let _ = std::fs::remove_file(dir.join(&f.file));
    }
}

/// Hand the values of `names` to a client for a pull: each becomes a hard link under a
/// transfer name (a snapshot no later push can change: values are replaced by rename, never
/// rewritten), announced with its size, and with its digest for [`Integrity::Digest`] (a
/// client on another host; known from the push or hashed now). The client reads (on this host)
/// or fetches it over the data link, and it is removed.
pub fn export(dir: &Path, names: &[String], integrity: Integrity, digests: &Digests) -> Result<Vec<ValueFile>, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<ValueFile> = Vec::with_capacity(names.len());
    let result = names.iter().try_for_each(|n| {
        let file = rpx_protocol::dataplane::transfer_name();
        let link = dir.join(&file);
        std::fs::hard_link(dir.join(n), &link).map_err(|e| format!("`{n}` has no value in the namespace ({e})"))?;
        let md = std::fs::symlink_metadata(&link).map_err(|e| format!("`{n}`: {e}"))?;
        let blake3 = match (integrity, digests.get(n, md.ino(), md.size())) {
            (Integrity::Namespace, _) => None,
            (Integrity::Digest, Some(d)) => Some(d.to_string()),
            (Integrity::Digest, None) => Some(rpx_protocol::dataplane::digest_file(&link).map_err(|e| format!("`{n}`: {e}"))?),
        };
        out.push(ValueFile { file, size: md.size(), blake3 });
        Ok(())
    });
    match result {
        Ok(()) => Ok(out),
        Err(e) => {
            discard(dir, &out);
            Err(e)
        }
    }
}

/// Read the values of `names` for a pull.
pub fn load(dir: &Path, names: &[String]) -> Result<Vec<Bytes>, String> {
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).map(Bytes::from).map_err(|e| format!("`{n}` has no value in the namespace ({e})")))
        .collect()
}

/// The user's code preceded by the bindings of pushed values (one line, so rustc's line numbers
/// in the user's code shift by exactly one). Leading evcxr commands (`:dep ...`) stay first.
pub fn with_bindings(unbound: &BTreeMap<String, String>, code: &str) -> String {
    if unbound.is_empty() {
        return code.to_string();
    }
    let bindings: Vec<String> = unbound.iter().map(|(n, t)| format!("let {n}: {t} = ::rpx_runtime::get::<{t}>({n:?});")).collect();
    let mut commands = String::new();
    let mut rest = code;
    while rest.trim_start().starts_with(':') {
        let line_end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        commands.push_str(&rest[..line_end]);
        rest = &rest[line_end..];
    }
    if !commands.is_empty() && !commands.ends_with('\n') {
        commands.push('\n');
    }
    format!("{commands}{}\n{rest}", bindings.join(" "))
}

/// A cell that writes variables to the namespace for a pull.
pub fn put_cell(names: &[String]) -> String {
    names.iter().map(|n| format!("::rpx_runtime::put({n:?}, &{n});")).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn identifiers() {
        for ok in ["n", "_x", "data2", "Big"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "2x", "a-b", "a b", "_", "fn", "let", "x::y", "../etc"] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn bindings_go_before_the_code_and_after_commands() {
        let mut u = BTreeMap::new();
        assert_eq!(with_bindings(&u, "x + 1"), "x + 1");
        u.insert("n".to_string(), "u64".to_string());
        u.insert("v".to_string(), "Vec<String>".to_string());
        assert_eq!(
            with_bindings(&u, "n + 1"),
            "let n: u64 = ::rpx_runtime::get::<u64>(\"n\"); let v: Vec<String> = ::rpx_runtime::get::<Vec<String>>(\"v\");\nn + 1"
        );
        let with_dep = with_bindings(&u, ":dep rand = \"0.8\"\nn");
        assert!(with_dep.starts_with(":dep rand = \"0.8\"\nlet n: u64"), "{with_dep}");
        assert!(with_dep.ends_with("\nn"));
    }

    #[test]
    fn the_namespace_is_created_fresh_and_private_and_its_files_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let uuid = format!("test-{}", std::process::id());
        let dir = create(&uuid).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let err = create(&uuid).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        store(&dir, &[NamedType { name: "x".into(), type_name: "u8".into() }], &[Bytes::from_static(b"\x01")]).unwrap();
        assert_eq!(mode(&dir.join("x")), 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
        // A directory planted at the path of another engine is refused, not used.
        let planted = dir_for(&format!("{uuid}-planted"));
        std::fs::create_dir(&planted).unwrap();
        assert!(create(&format!("{uuid}-planted")).is_err());
        std::fs::remove_dir_all(&planted).unwrap();
    }

    #[test]
    fn store_and_load_round_trip_and_refuse_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec![NamedType { name: "a".into(), type_name: "u8".into() }];
        store(dir.path(), &names, &[Bytes::from_static(b"\x05")]).unwrap();
        assert_eq!(load(dir.path(), &["a".to_string()]).unwrap(), vec![Bytes::from_static(b"\x05")]);
        assert!(load(dir.path(), &["b".to_string()]).unwrap_err().contains("`b`"));
        let bad = vec![NamedType { name: "../x".into(), type_name: "u8".into() }];
        assert!(store(dir.path(), &bad, &[Bytes::new()]).unwrap_err().contains("not a variable name"));
        assert!(store(dir.path(), &names, &[]).unwrap_err().contains("1 names came with 0 values"));
    }

    #[test]
    fn adopted_files_become_values_and_a_tampered_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let names = vec![NamedType { name: "a".into(), type_name: "u8".into() }, NamedType { name: "b".into(), type_name: "u8".into() }];
        store(d, &names[..1], &[Bytes::from_static(b"old")]).unwrap();
        let mut digests = Digests::default();
        let write = |b: &[u8]| rpx_protocol::dataplane::write_value_file(d, Integrity::Digest, b).unwrap();
        let (good, bad) = (write(b"new a"), write(b"new b"));
        std::fs::write(d.join(&bad.file), b"evil!").unwrap();
        let err = adopt(d, &names, &[good.clone(), bad.clone()], &mut digests, |_| Received::NotByLink).unwrap_err();
        assert!(
            err.contains("refused the pushed value `b`") && err.contains("digest mismatch") && err.contains("keeps its previous value"),
            "{err}"
        );
        assert_eq!(load(d, &["a".to_string()]).unwrap(), vec![Bytes::from_static(b"old")], "nothing was adopted");
        assert!(!d.join(&good.file).exists() && !d.join(&bad.file).exists(), "the refused push's files are gone");
        let (a, b) = (write(b"new a"), write(b""));
        let replaced = adopt(d, &names, &[a, b.clone()], &mut digests, |_| Received::NotByLink).unwrap();
        assert_eq!(replaced.len(), 1, "only `a` had a value");
        assert_eq!(std::fs::read(&replaced[0]).unwrap(), b"old", "the replaced value is kept until removed");
        if let Some(h) = remove_later(Spares::default().retire(d, replaced.clone(), Instant::now())) {
            h.join().unwrap();
        }
        assert!(!replaced[0].exists(), "a small replaced value is removed");
        assert_eq!(load(d, &["a".to_string(), "b".to_string()]).unwrap(), vec![Bytes::from_static(b"new a"), Bytes::new()]);
        // Pull over a data link: snapshots with the digest known from the push.
        let out = export(d, &["a".to_string(), "b".to_string()], Integrity::Digest, &digests).unwrap();
        assert_eq!(out[1].blake3, b.blake3);
        assert_eq!(rpx_protocol::dataplane::read_value_file(d, &out[0]).unwrap(), &b"new a"[..]);
        store(d, &names[..1], &[Bytes::from_static(b"newer")]).unwrap();
        assert_eq!(rpx_protocol::dataplane::read_value_file(d, &out[0]).unwrap(), &b"new a"[..], "a snapshot does not change");
        let again = export(d, &["a".to_string()], Integrity::Digest, &digests).unwrap();
        assert_eq!(
            again[0].blake3.as_deref(),
            Some(rpx_protocol::dataplane::digest(b"newer").as_str()),
            "a replaced value is hashed again"
        );
        assert_eq!(rpx_protocol::dataplane::read_value_file(d, &again[0]).unwrap(), &b"newer"[..]);
        // Pull on this host: snapshots with no digest, nothing hashed.
        let here = export(d, &["a".to_string()], Integrity::Namespace, &digests).unwrap();
        assert_eq!((here[0].size, here[0].blake3.as_deref()), (5, None));
        assert_eq!(rpx_protocol::dataplane::read_value_file(d, &here[0]).unwrap(), &b"newer"[..]);
        assert!(export(d, &["a".to_string(), "nope".to_string()], Integrity::Digest, &digests).unwrap_err().contains("`nope`"));
        let bad_name = vec![ValueFile { file: "../../etc/passwd".into(), size: 0, blake3: None }];
        assert!(adopt(d, &names[..1], &bad_name, &mut digests, |_| Received::NotByLink).unwrap_err().contains("not a transfer file name"));
    }

    /// A large replaced value becomes a spare only when nothing else can read it (no other name,
    /// no open file or mapping here or in another process), at most [`MAX_SPARES`] of them, and
    /// is freed after its time; the next large transfer file is written over it.
    #[test]
    fn replaced_values_become_spares_only_when_nothing_else_holds_them() {
        use rpx_protocol::dataplane::{SPARE_FROM, SPARE_PREFIX};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = dir.path();
        let big = vec![3u8; SPARE_FROM as usize];
        let old = |tag: &str| {
            let p = d.join(format!("{OLD_PREFIX}{tag}"));
            std::fs::write(&p, &big).unwrap();
            p
        };
        let spares = || -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(SPARE_PREFIX))
                .collect()
        };
        let mut kept_spares = Spares::default();
        let t0 = Instant::now();
        // Held: open here, mapped with its file closed, open in a child process, another name.
        let open = old("open");
        let reader = std::fs::File::open(&open).unwrap();
        let mapped = old("mapped");
        let map = {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&mapped).unwrap();
            // SAFETY: a fresh read-only shared mapping of a file this test owns, unmapped below.
            unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) }
        };
        assert_ne!(map, libc::MAP_FAILED);
        let child_held = old("child");
        let mut child = std::process::Command::new("sleep").arg("60").stdin(std::fs::File::open(&child_held).unwrap()).spawn().unwrap();
        let linked = old("linked");
        std::fs::hard_link(&linked, d.join(".snapshot")).unwrap();
        let small = d.join(format!("{OLD_PREFIX}small"));
        std::fs::write(&small, b"tiny").unwrap();
        let held = vec![open.clone(), mapped.clone(), child_held.clone(), linked.clone(), small.clone()];
        let removing = remove_later(kept_spares.retire(d, held.clone(), t0)).unwrap();
        assert!(spares().is_empty(), "nothing held elsewhere became a spare");
        removing.join().unwrap();
        assert!(held.iter().all(|p| !p.exists()), "and all were removed");
        child.kill().unwrap();
        child.wait().unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(map, 4096) };
        drop(reader);
        // Free: spares, up to the bound on their number; the next is removed.
        let free: Vec<PathBuf> = (0..=MAX_SPARES).map(|i| old(&format!("free{i}"))).collect();
        let inodes: Vec<u64> = free.iter().map(|p| std::fs::metadata(p).unwrap().ino()).collect();
        assert!(kept_spares.retire(d, free[..MAX_SPARES].to_vec(), t0).is_empty(), "nothing to remove");
        let mut listed: Vec<u64> = kept_spares.listed().iter().map(|s| std::fs::metadata(d.join(&s.file)).unwrap().ino()).collect();
        listed.sort();
        let mut expected = inodes[..MAX_SPARES].to_vec();
        expected.sort();
        assert_eq!(listed, expected, "a push's reply names the spares");
        let kept = spares();
        assert_eq!(kept.len(), MAX_SPARES);
        assert!(kept.iter().all(|p| inodes[..MAX_SPARES].contains(&std::fs::metadata(p).unwrap().ino())));
        assert!(free[..MAX_SPARES].iter().all(|p| !p.exists()), "renamed to spares");
        // The namespace is full: the next one is removed, and its thread has nothing to wait for.
        remove_later(kept_spares.retire(d, free[MAX_SPARES..].to_vec(), t0)).unwrap().join().unwrap();
        assert!(!free[MAX_SPARES].exists());
        assert_eq!(spares().len(), MAX_SPARES);
        // Claimed spares leave room; the next transfer files are written over them, one each.
        for _ in 2..MAX_SPARES {
            let (file, _) = rpx_protocol::dataplane::claim_spare(d, SPARE_FROM).unwrap();
            std::fs::remove_file(d.join(file)).unwrap();
        }
        assert_eq!(spares().len(), 2);
        assert_eq!(kept_spares.listed().len(), 2, "claimed spares are no longer named");
        // The next large transfer file is written over one.
        let value = vec![9u8; SPARE_FROM as usize + 5];
        let vf = rpx_protocol::dataplane::write_value_file_beside(d, Integrity::Namespace, Some(value.len() as u64), |w| {
            std::io::Write::write_all(w, &value)
        })
        .unwrap();
        assert!(inodes[..MAX_SPARES].contains(&std::fs::metadata(d.join(&vf.file)).unwrap().ino()));
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert_eq!(spares().len(), 1);
        // Unclaimed spares are freed once their time has come, not before; one made later stays.
        assert!(kept_spares.retire(d, vec![old("later")], t0 + SPARE_TTL).is_empty());
        assert!(kept_spares.expire(t0 + SPARE_TTL - Duration::from_millis(1)).is_none());
        assert_eq!(spares().len(), 2);
        kept_spares.expire(t0 + SPARE_TTL).unwrap().join().unwrap();
        let left = spares();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(!inodes.contains(&std::fs::metadata(&left[0]).unwrap().ino()), "the later spare is the one left");
        kept_spares.expire(t0 + 2 * SPARE_TTL).unwrap().join().unwrap();
        assert!(spares().is_empty());
        // Bounded in bytes: a spare that would take the namespace's spares over the bound is
        // removed, though there is room for more files.
        let mut by_bytes = Spares::bounded(MAX_SPARES, 2 * SPARE_FROM);
        let (first, second, third) = (old("b0"), old("b1"), old("b2"));
        assert!(by_bytes.retire(d, vec![first, second], t0).is_empty());
        assert_eq!(by_bytes.retire(d, vec![third.clone()], t0), vec![third.clone()]);
        std::fs::remove_file(&third).unwrap();
        assert!(!third.exists());
        assert_eq!(spares().len(), 2);
    }

    /// A same-host push's files come without a digest: adopted on their kind, owner and size; a
    /// file the data link wrote is never adopted without the digest it was received with.
    #[test]
    fn same_host_files_are_adopted_without_a_digest_but_link_files_never_are() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let names = vec![NamedType { name: "a".into(), type_name: "u8".into() }];
        let mut digests = Digests::default();
        let write = |b: &[u8]| rpx_protocol::dataplane::write_value_file(d, Integrity::Namespace, b).unwrap();
        let short = write(b"12345");
        std::fs::write(d.join(&short.file), b"1234").unwrap();
        let err = adopt(d, &names, std::slice::from_ref(&short), &mut digests, |_| Received::NotByLink).unwrap_err();
        assert!(err.contains("size 4 where 5") && err.contains("keeps its previous value"), "{err}");
        assert!(!d.join(&short.file).exists(), "the refused file is gone");
        let from_link = write(b"linked");
        let err = adopt(d, &names, std::slice::from_ref(&from_link), &mut digests, |_| Received::NotAsAnnounced).unwrap_err();
        assert!(err.contains("announced no digest"), "{err}");
        assert!(load(d, &["a".to_string()]).is_err(), "nothing was stored");
        let ok = write(b"value");
        adopt(d, &names, &[ok], &mut digests, |_| Received::NotByLink).unwrap();
        assert_eq!(load(d, &["a".to_string()]).unwrap(), vec![Bytes::from_static(b"value")]);
        let out = export(d, &["a".to_string()], Integrity::Digest, &digests).unwrap();
        assert_eq!(out[0].blake3.as_deref(), Some(rpx_protocol::dataplane::digest(b"value").as_str()), "hashed for a data link");
    }

    #[test]
    fn put_cell_writes_each_name() {
        assert_eq!(put_cell(&["a".into(), "b".into()]), "::rpx_runtime::put(\"a\", &a);\n::rpx_runtime::put(\"b\", &b);");
    }
}
