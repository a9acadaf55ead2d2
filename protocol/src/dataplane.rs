//! The same-host data plane: pushed and pulled values move as files in the engine's namespace
//! directory (on tmpfs) instead of as message buffers through the controller.
//!
//! The request still goes through the controller, signed as always; only the bytes take the
//! short way, and the controller never holds them:
//!
//! | op | request | `apply_reply` (status `ok`) |
//! |---|---|---|
//! | push | `Op::Push { names, files }`, no buffers: `files[i]` is a [`ValueFile`] the client wrote in the engine's namespace under a [transfer name](is_transfer_name) | `[]`; the engine checked each file (a regular file of this user, the announced size) and renamed it to `names[i]` (all or none); content key [`REPLY_SPARES_KEY`] lists the namespace's [`Spare`]s once the values they replaced were retired |
//! | pull | `Op::Pull { names, files: Some(PullFiles::SameHost) }` | no buffers; content key [`REPLY_FILES_KEY`] lists one [`ValueFile`] per name: a hard link of the value under a transfer name, which the client reads, checks and removes |
//!
//! Transfer names start with `.` so they are never variable names: a cell or closure never sees
//! a value that is still being written, and a push becomes visible only by the engine's
//! atomic rename.
//!
//! What keeps a handed-over file's bytes as the client or engine wrote them is the namespace
//! directory's permissions ([`Integrity::Namespace`]), not a digest: it is private (0700) to
//! the user both run as, so whoever could change a file in it between the write and the read
//! runs as that user too, and can read the connection file's key and sign any request it likes;
//! a digest would stop nobody a signature does not. Bytes that cross hosts on the data link
//! (`crate::datalink`) are different: they pass through the network, so they travel with their
//! BLAKE3 in the signed request or reply ([`Integrity::Digest`]) and are checked as they arrive.
//!
//! Writing a new 100 MB tmpfs file costs twice what writing over pages that exist does (the
//! kernel allocates and zeroes each page first), so an engine keeps the pages of a large value
//! it replaced as a *spare* ([`SPARE_PREFIX`]) when nothing else can still read them, and the
//! next transfer file of about that size is written over a spare ([`write_value_file_beside`]
//! with a size): claimed by renaming it to a fresh transfer name, so it has one writer, and cut
//! to the value's size. The engine decides what may become a spare and how long it is kept
//! ([`SPARE_TTL`]). A push's reply names the spares there are, so that a same-host client can
//! map one for writing before its next push (the mapping, not the copy, is most of the cost of
//! writing 100 MB over a spare) and claim it by the same rename ([`claim_named_spare`]).
//!
//! Who may use it is decided by one rule, [`local_namespace`]: the engine announced a
//! [`HostIdentity`] when it registered (forwarded by the controller in
//! `registration_notification` and `connection_reply`), its host name and boot id are this
//! host's, its directory is the one the namespace rule gives for its uuid, and that directory
//! is a real directory owned by this user, private, whose owner process is alive here. Anything
//! else (another host, another user, a Python client or engine, `RPX_DATA_PLANE=buffers`) uses
//! message buffers, unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Set to `buffers` (or `off`, `0`) to send every value as message buffers, even on one host.
pub const DATA_PLANE_ENV: &str = "RPX_DATA_PLANE";
/// Key of the engine's [`HostIdentity`] in `registration_notification` content.
pub const NOTIFICATION_KEY: &str = "rpx_host";
/// Key of the `{uuid: HostIdentity}` map in `connection_reply` content.
pub const CONNECTION_REPLY_KEY: &str = "rpx_hosts";
/// Key of the pulled files (`[ValueFile]`) in an `apply_reply`'s content.
pub const REPLY_FILES_KEY: &str = "rpx_files";
/// Prefix of the names values have in a namespace while they are handed over.
pub const TRANSFER_PREFIX: &str = ".xfer-";
/// Prefix of spare files: the pages of a replaced value, kept to be written over.
pub const SPARE_PREFIX: &str = ".spare-";
/// Key of the namespace's spares ([`Spare`]s) in a same-host push's `apply_reply` content.
pub const REPLY_SPARES_KEY: &str = "rpx_spares";
/// How long an engine keeps a spare unclaimed before freeing its pages.
pub const SPARE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// A spare in an engine's namespace, as a push's reply names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spare {
    /// Its name in the namespace ([`SPARE_PREFIX`] and a uuid).
    pub file: String,
    pub size: u64,
}

/// Whether `name` is a spare's name (`.spare-` and a uuid): never a variable, never a path.
pub fn is_spare_name(name: &str) -> bool {
    is_prefixed_uuid(name, SPARE_PREFIX)
}

/// Whether `name` is `prefix` and then a uuid.
fn is_prefixed_uuid(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| rest.len() == 36 && rest.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
}

/// Whether a spare of `spare` bytes may take a value of `size`: it holds it with at most half as
/// much again to spare (a much larger spare is left for a larger value; see [`claim_spare`]).
pub fn spare_fits(spare: u64, size: u64) -> bool {
    (size..=size.saturating_add(size / 2)).contains(&spare)
}

/// The spares a push's `apply_reply` content names (none if it names none, or none well formed).
pub fn spares_from_content(content: &serde_json::Value) -> Vec<Spare> {
    let listed: Vec<Spare> = content.get(REPLY_SPARES_KEY).and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
    listed.into_iter().filter(|s| is_spare_name(&s.file)).collect()
}

/// Claim the spare `spare` of `dir`, known to the caller as the file `ino` of `size` bytes it
/// holds open (and has mapped): renamed to a fresh transfer name, then checked to be that file,
/// still of that size, a regular file of this user with no other name. The transfer name, or
/// `None` if another claimant renamed it first (or it is gone); a file that is not the one
/// expected is removed.
pub fn claim_named_spare(dir: &Path, spare: &str, ino: u64, size: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !is_spare_name(spare) {
        return None;
    }
    let file = transfer_name();
    let path = dir.join(&file);
    std::fs::rename(dir.join(spare), &path).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() && m.uid() == me && m.nlink() == 1 && m.ino() == ino && m.size() == size => Some(file),
        _ => {
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Values from this size on are written over a spare when there is one (smaller ones cost
/// little to write fresh, and would free most of a large spare's pages when they cut it).
pub const SPARE_FROM: u64 = 8 << 20;

/// Where an rpx engine keeps its values, as it announces in its `registration_request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// The engine's host name (`/proc/sys/kernel/hostname`).
    pub hostname: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): same host, same boot.
    pub boot_id: String,
    /// The engine's namespace directory.
    pub ns_dir: String,
    /// `ip:port` of the engine's data link (`crate::datalink`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl HostIdentity {
    /// The identity of the engine `engine_uuid` running on this host.
    pub fn of_engine(engine_uuid: &str) -> HostIdentity {
        let (hostname, boot_id) = this_host();
        HostIdentity { hostname, boot_id, ns_dir: crate::connection::engine_namespace_dir(engine_uuid).display().to_string(), data: None }
    }
}

/// One value handed over as a file: its name in the namespace directory, size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueFile {
    /// The file's name in the engine's namespace directory (a [transfer name](is_transfer_name)).
    pub file: String,
    pub size: u64,
    /// BLAKE3 of the file's bytes, hex, for bytes that crossed hosts ([`Integrity::Digest`]);
    /// none for a file handed over on one host ([`Integrity::Namespace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// What vouches for a transfer file's bytes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// The bytes crossed hosts: their BLAKE3 is computed as they are written and announced in
    /// the signed message, and checked by whoever reads them.
    Digest,
    /// The bytes stayed in the engine's private namespace directory on this host: its
    /// permissions vouch for them; nothing is hashed.
    Namespace,
}

/// This host's name and boot id (read once).
pub fn this_host() -> (String, String) {
    static HOST: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        (read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/random/boot_id"))
    })
    .clone()
}

/// Whether `RPX_DATA_PLANE` forces message buffers.
pub fn buffers_forced() -> bool {
    std::env::var(DATA_PLANE_ENV).is_ok_and(|v| matches!(v.trim(), "buffers" | "off" | "0" | "no"))
}

/// THE rule: the namespace directory of engine `engine_uuid`, if this process may hand values
/// to it through files (see the module docs); `None` means message buffers.
pub fn local_namespace(engine_uuid: &str, host: &HostIdentity) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if buffers_forced() {
        return None;
    }
    let (hostname, boot_id) = this_host();
    if boot_id.is_empty() || host.boot_id != boot_id || host.hostname != hostname {
        return None;
    }
    let dir = crate::connection::engine_namespace_dir(engine_uuid);
    if Path::new(&host.ns_dir) != dir {
        return None;
    }
    let md = std::fs::symlink_metadata(&dir).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != me || md.mode() & 0o077 != 0 {
        return None;
    }
    // The directory's owner process runs here (it is not a dead engine's, nor one in another
    // pid namespace that shares the mount).
    let owner = std::fs::read_to_string(dir.join(crate::connection::NAMESPACE_OWNER)).ok()?;
    let pid: u32 = owner.split(' ').next()?.parse().ok()?;
    (crate::connection::process_stamp(pid).as_deref() == Some(owner.trim())).then_some(dir)
}

/// Whether `name` is a transfer name (`.xfer-` and a uuid): never a variable, never a path.
pub fn is_transfer_name(name: &str) -> bool {
    is_prefixed_uuid(name, TRANSFER_PREFIX)
}

/// A fresh transfer name.
pub fn transfer_name() -> String {
    format!("{TRANSFER_PREFIX}{}", uuid::Uuid::new_v4())
}

/// Inputs from this size on are hashed on every core (BLAKE3 is a tree hash: same digest).
const PARALLEL_DIGEST_FROM: usize = 1 << 20;

/// BLAKE3 of `bytes`, hex.
pub fn digest(bytes: &[u8]) -> String {
    if bytes.len() < PARALLEL_DIGEST_FROM {
        return blake3::hash(bytes).to_hex().to_string();
    }
    blake3::Hasher::new().update_rayon(bytes).finalize().to_hex().to_string()
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Write `bytes` as a new transfer file in `dir` (0600, created fresh, one write; with
/// [`Integrity::Digest`], hashed while it is written).
pub fn write_value_file(dir: &Path, integrity: Integrity, bytes: &[u8]) -> std::io::Result<ValueFile> {
    write_value_file_with(dir, integrity, |w| w.write_all(bytes))
}

/// Write a new transfer file in `dir` (0600, created fresh) with what `fill` writes into the
/// [`Streamer`] it gets (with [`Integrity::Digest`], hashed on the way): a value encoded in
/// pieces (`rpx_runtime::encode_chunked` with [`STREAM_CHUNK`]) goes straight into the file,
/// each piece hashed and written while it is still in cache, and is never held whole in
/// memory. The file is removed if `fill` fails.
pub fn write_value_file_with<F>(dir: &Path, integrity: Integrity, fill: F) -> std::io::Result<ValueFile>
where
    F: FnOnce(&mut Streamer) -> std::io::Result<()>,
{
    write_new_file(dir, |f| {
        let mut s = Streamer::new(Sink::File(f), integrity);
        fill(&mut s).map(|()| s)
    })
}

/// Pieces [`write_value_file_beside`] may have handed to its writing thread and not yet written.
const WRITES_IN_FLIGHT: usize = 4;

/// [`write_value_file_with`], with the file written on a second thread while `fill` encodes
/// (and hashes) the next pieces: the kernel's work of supplying a new file's pages (most of a
/// write to tmpfs) then runs beside the encoding instead of after each piece. For a process
/// with a core to spare for it: a client pushing to an engine on its host, an engine's data
/// link receiving a value from another host.
///
/// `size`, the value's size if known, lets a value of at least [`SPARE_FROM`] bytes be written
/// over a spare in `dir` ([`claim_spare`]) instead of a new file.
pub fn write_value_file_beside<F>(dir: &Path, integrity: Integrity, size: Option<u64>, fill: F) -> std::io::Result<ValueFile>
where
    F: FnOnce(&mut Streamer) -> std::io::Result<()>,
{
    let spare = size.filter(|s| *s >= SPARE_FROM).and_then(|s| claim_spare(dir, s));
    write_transfer_file(dir, spare, |f| {
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(WRITES_IN_FLIGHT);
            let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            let writer = std::thread::Builder::new().name("rpx-value-write".into()).spawn_scoped(s, move || {
                let mut f = &f;
                for piece in rx {
                    f.write_all(&piece)?;
                    // The filling side may be gone already (it failed): the buffer is then dropped.
                    let _ = back_tx.send(piece);
                }
                Ok::<(), std::io::Error>(())
            })?;
            let mut streamer = Streamer::new(Sink::Writer { to: tx, spares: back_rx }, integrity);
            let filled = fill(&mut streamer);
            // Closing the channel ends the writer once it has written everything sent.
            streamer.sink = Sink::Closed;
            let wrote = writer.join().map_err(|_| std::io::Error::other("the thread writing the value file panicked"))?;
            // The writer's own error first: a fill that failed because the writer had stopped says less.
            wrote.and(filled).map(|()| streamer)
        })
    })
}

/// A new transfer file in `dir` (0600, created fresh, not through a symlink), filled by `fill`
/// from the open file; removed if `fill` fails.
fn write_new_file(dir: &Path, fill: impl FnOnce(std::fs::File) -> std::io::Result<Streamer>) -> std::io::Result<ValueFile> {
    write_transfer_file(dir, None, fill)
}

/// [`write_new_file`], written over `spare` (a claimed spare: its transfer name and the file
/// open for writing at its start) if given, and then cut to what was written.
fn write_transfer_file(
    dir: &Path,
    spare: Option<(String, std::fs::File)>,
    fill: impl FnOnce(std::fs::File) -> std::io::Result<Streamer>,
) -> std::io::Result<ValueFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let (file, f, cut) = match spare {
        Some((file, f)) => {
            let cut = f.try_clone()?;
            (file, f, Some(cut))
        }
        None => {
            let file = transfer_name();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.join(&file))?;
            (file, f, None)
        }
    };
    let path = dir.join(&file);
    let filled = fill(f).and_then(|s| match &cut {
        Some(c) => c.set_len(s.size).map(|()| s),
        None => Ok(s),
    });
    match filled {
        Ok(s) => Ok(ValueFile { file, size: s.size, blake3: s.hasher.map(|h| h.finalize().to_hex().to_string()) }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Claim a spare in `dir` for a value of `size` bytes: the smallest that holds it with at most
/// half as much again to spare, else the largest that is too small (written over, then grown).
/// A much larger spare is left for a larger value: cutting it would free most of its pages, and
/// in a loop moving values of two sizes (a 100 MB push and a 50 MB scatter part to the same
/// engine) each value would take the other's spare, the larger one then written half into new
/// pages every time. The spare is renamed to a fresh transfer name (of two claimants, one rename
/// wins; the other tries the next spare) and opened for writing without following links; one
/// that is not a regular file of this user with no other name is removed. `None` when there is
/// no spare to claim.
pub fn claim_spare(dir: &Path, size: u64) -> Option<(String, std::fs::File)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut spares: Vec<(u64, std::ffi::OsString)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(SPARE_PREFIX)))
        .filter_map(|e| Some((e.metadata().ok()?.size(), e.file_name())))
        .collect();
    // Those that hold the value without being much larger, smallest first, then the smaller
    // ones, largest first; much larger ones not at all.
    spares.retain(|(s, _)| *s < size || spare_fits(*s, size));
    spares.sort_by_key(|(s, _)| if *s >= size { (0, *s) } else { (1, u64::MAX - *s) });
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    spares.into_iter().find_map(|(_, spare)| {
        let file = transfer_name();
        let path = dir.join(&file);
        std::fs::rename(dir.join(spare), &path).ok()?;
        let opened = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path);
        match opened {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file() && m.uid() == me && m.nlink() == 1) => Some((file, f)),
            _ => {
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    })
}

/// The size of the pieces a value is best written in by [`write_value_file_with`] (they fit in
/// a core's L2 cache: hashed and written while hot).
pub const STREAM_CHUNK: usize = 1 << 20;

/// What [`write_value_file_with`] and [`write_value_file_beside`] write through: hashes each
/// piece (for [`Integrity::Digest`]), then writes it to the file or hands a copy of it to the
/// writing thread.
pub struct Streamer {
    sink: Sink,
    hasher: Option<blake3::Hasher>,
    size: u64,
}

/// Where a [`Streamer`]'s hashed pieces go.
enum Sink {
    File(std::fs::File),
    /// The writing thread, and the buffers it gives back once written.
    Writer {
        to: std::sync::mpsc::SyncSender<Vec<u8>>,
        spares: std::sync::mpsc::Receiver<Vec<u8>>,
    },
    /// The writing thread was told to finish: nothing more is taken.
    Closed,
}

impl Streamer {
    fn new(sink: Sink, integrity: Integrity) -> Streamer {
        let hasher = (integrity == Integrity::Digest).then(blake3::Hasher::new);
        Streamer { sink, hasher, size: 0 }
    }
}

impl Write for Streamer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let stopped = || std::io::Error::other("the thread writing the value file stopped");
        for piece in data.chunks(STREAM_CHUNK) {
            if let Some(h) = &mut self.hasher {
                h.update(piece);
            }
            match &mut self.sink {
                Sink::File(f) => f.write_all(piece)?,
                Sink::Writer { to, spares } => {
                    let mut buf = spares.try_recv().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(piece);
                    to.send(buf).map_err(|_| stopped())?;
                }
                Sink::Closed => return Err(stopped()),
            }
            self.size += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The same file under a new transfer name in `to_dir` (a hard link: no copy), for another
/// engine on the same host.
pub fn link_value_file(from_dir: &Path, vf: &ValueFile, to_dir: &Path) -> std::io::Result<ValueFile> {
    let file = transfer_name();
    std::fs::hard_link(from_dir.join(&vf.file), to_dir.join(&file))?;
    Ok(ValueFile { file, ..vf.clone() })
}

/// Why a handed-over file is refused.
fn check_meta(f: &std::fs::File, vf: &ValueFile) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_file() || md.uid() != me || md.nlink() == 0 {
        return Err("not a regular file of this user".into());
    }
    if md.size() != vf.size {
        return Err(format!("size {} where {} was announced", md.size(), vf.size));
    }
    Ok(())
}

/// Check that `dir/vf.file` holds exactly the announced bytes: a regular file of this user of
/// the announced size, and if a digest was announced, its BLAKE3 (read in slices: nothing is
/// kept in memory).
pub fn verify_value_file(dir: &Path, vf: &ValueFile) -> Result<(), String> {
    let f = open_value_file(dir, vf)?;
    let Some(announced) = &vf.blake3 else { return Ok(()) };
    let got = if vf.size == 0 {
        digest(b"")
    } else {
        digest(rpx_runtime::Mapped::of(&f, vf.size as usize).map_err(|e| format!("{}: {e}", vf.file))?.as_ref())
    };
    if got != *announced {
        return Err(format!(
            "{}: digest mismatch (BLAKE3 {}.. where {}.. was announced): the file changed after it was written",
            vf.file,
            &got[..16],
            announced.get(..16).unwrap_or(announced)
        ));
    }
    Ok(())
}

/// BLAKE3 of a file, read in 1 MiB slices.
pub fn digest_file(path: &Path) -> std::io::Result<String> {
    let f = open_private(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(digest(b""));
    }
    Ok(digest(rpx_runtime::Mapped::of(&f, len)?.as_ref()))
}

/// Map `dir/vf.file` whole, checking its size (and digest, if one was announced): no copy (a
/// private read-only mapping, populated at once). Pulled files are hard-link snapshots in the
/// engine's private namespace that nobody rewrites (values are only ever replaced by rename),
/// so the mapping is stable.
pub fn read_value_file(dir: &Path, vf: &ValueFile) -> Result<bytes::Bytes, String> {
    Ok(map_value_file(dir, vf, Pages::UpFront)?.map_or_else(bytes::Bytes::new, bytes::Bytes::from_owner))
}

/// When the pages of a mapped value file are mapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// All of them, as the file is mapped.
    UpFront,
    /// As they are read: for a reader that maps them in itself
    /// (`rpx_runtime::copy_from_mapping_on_every_core`).
    AsRead,
}

/// [`read_value_file`]'s mapping itself (`None` for an empty file), for a reader that copies
/// the bytes out and decides when and how the mapping goes.
pub fn map_value_file(dir: &Path, vf: &ValueFile, pages: Pages) -> Result<Option<rpx_runtime::Mapped>, String> {
    let f = open_value_file(dir, vf)?;
    let map = match pages {
        Pages::UpFront => rpx_runtime::Mapped::of,
        Pages::AsRead => rpx_runtime::Mapped::unpopulated,
    };
    let mapped = match vf.size {
        0 => None,
        n => Some(map(&f, n as usize).map_err(|e| format!("{}: {e}", vf.file))?),
    };
    let bytes = mapped.as_ref().map_or(&[][..], |m| m.as_ref());
    if vf.blake3.as_ref().is_some_and(|d| digest(bytes) != *d) {
        return Err(format!("{}: digest mismatch: the file changed after the engine announced it", vf.file));
    }
    Ok(mapped)
}

/// Open `dir/vf.file` for reading, checked: a transfer name, not through a symlink, a regular
/// file of this user of the announced size. Whoever reads it checks the digest, if one was
/// announced.
fn open_value_file(dir: &Path, vf: &ValueFile) -> Result<std::fs::File, String> {
    if !is_transfer_name(&vf.file) {
        return Err(format!("`{}` is not a transfer file name", vf.file));
    }
    let f = open_private(&dir.join(&vf.file)).map_err(|e| format!("{}: {e}", vf.file))?;
    check_meta(&f, vf).map_err(|e| format!("{}: {e}", vf.file))?;
    Ok(f)
}

/// The pulled files of an `apply_reply` content, if it has them.
pub fn files_from_content(content: &serde_json::Value) -> Option<Result<Vec<ValueFile>, serde_json::Error>> {
    content.get(REPLY_FILES_KEY).map(|v| serde_json::from_value(v.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_names_are_never_variables_or_paths() {
        let n = transfer_name();
        assert!(is_transfer_name(&n), "{n}");
        for bad in ["a", ".xfer-", ".xfer-../../etc/passwd", &format!("{n}x"), "x.xfer-0"] {
            assert!(!is_transfer_name(bad), "{bad}");
        }
    }

    #[test]
    fn written_files_verify_and_read_back_and_tampering_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let vf = write_value_file(dir.path(), Integrity::Digest, b"hello").unwrap();
        assert_eq!(std::fs::metadata(dir.path().join(&vf.file)).unwrap().permissions().mode() & 0o777, 0o600);
        verify_value_file(dir.path(), &vf).unwrap();
        assert_eq!(read_value_file(dir.path(), &vf).unwrap(), &b"hello"[..]);
        let empty = write_value_file(dir.path(), Integrity::Digest, b"").unwrap();
        assert_eq!(read_value_file(dir.path(), &empty).unwrap(), &b""[..]);
        let other = tempfile::tempdir().unwrap();
        let linked = link_value_file(dir.path(), &vf, other.path()).unwrap();
        assert_eq!(read_value_file(other.path(), &linked).unwrap(), &b"hello"[..]);
        std::fs::write(dir.path().join(&vf.file), b"jello").unwrap();
        assert!(verify_value_file(dir.path(), &vf).unwrap_err().contains("digest mismatch"));
        assert!(read_value_file(dir.path(), &vf).unwrap_err().contains("digest mismatch"));
        std::fs::write(dir.path().join(&vf.file), b"hell").unwrap();
        assert!(verify_value_file(dir.path(), &vf).unwrap_err().contains("size 4 where 5"));
    }

    /// A file handed over on one host has no digest: its size, kind and owner are still checked.
    #[test]
    fn same_host_files_carry_no_digest_and_are_checked_by_size_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let vf = write_value_file(dir.path(), Integrity::Namespace, b"hello").unwrap();
        assert_eq!((vf.size, vf.blake3.as_deref()), (5, None));
        assert!(!serde_json::to_string(&vf).unwrap().contains("blake3"), "nothing announced");
        verify_value_file(dir.path(), &vf).unwrap();
        assert_eq!(read_value_file(dir.path(), &vf).unwrap(), &b"hello"[..]);
        std::fs::write(dir.path().join(&vf.file), b"hell").unwrap();
        assert!(verify_value_file(dir.path(), &vf).unwrap_err().contains("size 4 where 5"));
        assert!(read_value_file(dir.path(), &vf).unwrap_err().contains("size 4 where 5"));
        std::fs::remove_file(dir.path().join(&vf.file)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(&vf.file)).unwrap();
        assert!(verify_value_file(dir.path(), &vf).is_err(), "a symlink is never followed");
        std::fs::remove_file(dir.path().join(&vf.file)).unwrap();
        std::fs::create_dir(dir.path().join(&vf.file)).unwrap();
        assert!(verify_value_file(dir.path(), &vf).is_err(), "a directory is not a value");
    }

    #[test]
    fn streamed_files_hold_what_was_written_with_its_digest_and_a_failed_fill_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..STREAM_CHUNK * 2 + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let vf = write_value_file_with(dir.path(), Integrity::Digest, |w| {
            for piece in bytes.chunks(100_000) {
                w.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((vf.size, vf.blake3.as_deref()), (bytes.len() as u64, Some(digest(&bytes).as_str())));
        assert_eq!(read_value_file(dir.path(), &vf).unwrap(), &bytes[..]);
        let err = write_value_file_with(dir.path(), Integrity::Digest, |w| {
            w.write_all(b"half a value")?;
            Err(std::io::Error::other("the encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the encoder failed");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the first file is left");
    }

    /// More pieces than may be in flight (the writer's buffers come back and are reused), in
    /// pieces that straddle [`STREAM_CHUNK`]: the same file and digest as written inline.
    #[test]
    fn files_written_beside_hold_what_was_written_with_its_digest_and_a_failed_fill_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..STREAM_CHUNK * (WRITES_IN_FLIGHT * 3) + 777).map(|i| (i * 13 % 253) as u8).collect();
        let vf = write_value_file_beside(dir.path(), Integrity::Digest, None, |w| {
            for piece in bytes.chunks(STREAM_CHUNK + 4097) {
                w.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((vf.size, vf.blake3.as_deref()), (bytes.len() as u64, Some(digest(&bytes).as_str())));
        assert_eq!(read_value_file(dir.path(), &vf).unwrap(), &bytes[..]);
        let empty = write_value_file_beside(dir.path(), Integrity::Digest, None, |_| Ok(())).unwrap();
        assert_eq!((empty.size, empty.blake3.as_deref()), (0, Some(digest(b"").as_str())));
        let err = write_value_file_beside(dir.path(), Integrity::Namespace, None, |w| {
            w.write_all(&bytes[..STREAM_CHUNK * 2])?;
            Err(std::io::Error::other("the encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the encoder failed");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only the two written files are left");
    }

    /// A value of a known size from [`SPARE_FROM`] on is written over the spare that fits it best
    /// (same inode, cut to the value's size, the spare's name gone), never over a much larger one;
    /// a smaller value, or one of unknown size, gets a new file; a spare that is a link is
    /// removed, never written through.
    #[test]
    fn large_values_are_written_over_the_best_fitting_spare_and_cut_to_size() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let spare = |name: &str, size: u64| {
            let path = d.join(format!("{SPARE_PREFIX}{name}"));
            std::fs::write(&path, vec![0xEEu8; size as usize]).unwrap();
            std::fs::metadata(&path).unwrap().ino()
        };
        let small = spare("small", SPARE_FROM + 10);
        let large = spare("large", 2 * SPARE_FROM + SPARE_FROM / 2);
        let huge = spare("huge", 4 * SPARE_FROM);
        let value: Vec<u8> = (0..2 * SPARE_FROM).map(|i| (i % 241) as u8).collect();
        let write = |size: Option<u64>| write_value_file_beside(d, Integrity::Namespace, size, |w| w.write_all(&value)).unwrap();
        let spares = || {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with(SPARE_PREFIX))
                .collect();
            v.sort();
            v
        };
        // Of three spares, the one that holds the value with the least to spare, not the huge
        // one; cut to its size.
        let vf = write(Some(value.len() as u64));
        let md = std::fs::metadata(d.join(&vf.file)).unwrap();
        assert_eq!((md.ino(), md.len(), vf.size), (large, value.len() as u64, value.len() as u64));
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value, "the spare's old bytes are all gone");
        assert_eq!(spares(), vec![format!("{SPARE_PREFIX}huge"), format!("{SPARE_PREFIX}small")]);
        // No size, or a small value: a new file, the spares left alone.
        for size in [None, Some(SPARE_FROM - 1)] {
            let vf = write(size);
            assert!(![small, large, huge].contains(&std::fs::metadata(d.join(&vf.file)).unwrap().ino()), "{size:?}");
        }
        assert_eq!(spares().len(), 2);
        // None holds it without being much larger: the largest that is too small, grown.
        let vf = write(Some(value.len() as u64));
        assert_eq!(std::fs::metadata(d.join(&vf.file)).unwrap().ino(), small);
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert_eq!(spares(), vec![format!("{SPARE_PREFIX}huge")]);
        // Only a much larger one: a new file; the huge spare is left for a value of its size.
        let vf = write(Some(value.len() as u64));
        assert_ne!(std::fs::metadata(d.join(&vf.file)).unwrap().ino(), huge);
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert_eq!(spares(), vec![format!("{SPARE_PREFIX}huge")]);
        let vf = write(Some(4 * SPARE_FROM));
        assert_eq!(std::fs::metadata(d.join(&vf.file)).unwrap().ino(), huge, "a value of its size takes it");
        assert!(spares().is_empty());
        // A spare swapped for a link to a file outside is removed, the file outside untouched.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"outside").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join(format!("{SPARE_PREFIX}link"))).unwrap();
        let vf = write(Some(value.len() as u64));
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"outside");
        assert!(spares().is_empty(), "the link is gone");
        assert!(outside.path().exists());
    }

    #[test]
    fn the_rule_refuses_other_hosts_and_directories_not_matching_the_uuid() {
        let (hostname, boot_id) = this_host();
        let uuid = format!("dataplane-test-{}", std::process::id());
        let id = HostIdentity::of_engine(&uuid);
        assert_eq!(local_namespace(&uuid, &id), None, "no directory yet");
        let dir = crate::connection::engine_namespace_dir(&uuid);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        }
        let stamp = crate::connection::process_stamp(std::process::id()).unwrap();
        std::fs::write(dir.join(crate::connection::NAMESPACE_OWNER), stamp).unwrap();
        if !buffers_forced() {
            assert_eq!(local_namespace(&uuid, &id), Some(dir.clone()));
        }
        assert_eq!(local_namespace(&uuid, &HostIdentity { hostname: format!("{hostname}-other"), ..id.clone() }), None);
        assert_eq!(local_namespace(&uuid, &HostIdentity { boot_id: format!("{boot_id}-other"), ..id.clone() }), None);
        assert_eq!(local_namespace(&uuid, &HostIdentity { ns_dir: "/tmp".into(), ..id.clone() }), None);
        assert_eq!(local_namespace("another-uuid", &id), None);
        std::fs::write(dir.join(crate::connection::NAMESPACE_OWNER), "1 0").unwrap();
        assert_eq!(local_namespace(&uuid, &id), None, "the owner process is not alive");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
