//! Push, pull, scatter and gather through shared memory when an engine is on this host
//! (`rpx_protocol::dataplane` has the protocol and the rule deciding who may).
//!
//! A value for a same-host engine is encoded straight into a transfer file in the engine's
//! namespace, in 1 MiB pieces handed to a second thread that writes them
//! (`rpx_protocol::dataplane::write_value_file_beside`): one pass over the value, never a copy
//! of it whole in memory. Further engines on the host get a hard link to the same file (no
//! copy). The signed request names the files (with their size) and carries no buffers, so the
//! controller routes a few hundred bytes. A pull asks for files; the reply names hard links the
//! client maps (no copy), checks, decodes and removes; a gather of plain vectors reads every
//! part straight into its place in the result ([`Pulled::gather_plain`]). Nothing is hashed on
//! one host: the engine's private namespace directory vouches for the files
//! (`rpx_protocol::dataplane`'s module docs say why). Engines on other hosts with a data link
//! get the same requests, the files written and fetched over the link with their BLAKE3
//! (`crate::datalink`); every other engine gets the buffers.
//!
//! Where the time goes for 100 MB (`examples/dp_micro.rs`): a push into a new file is bounded by
//! the kernel allocating and zeroing fresh tmpfs pages as they are written (on the writing
//! thread, beside the encoding: 35-48 ms); over an engine's spare, by the kernel mapping the
//! existing pages as they are written (20 ms); over a spare mapped ahead (`crate::premap`), by
//! the copy alone (7 ms). A pull is bounded by mapping the snapshot (6-12 ms) and filling the new
//! vector, in huge pages and on every core (9-16 ms for a fresh 100 MB vector in huge pages, 45-66
//! in 4 KiB pages).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rpx_protocol::apply::{NamedType, Op, PullFiles};
use rpx_protocol::dataplane::{self as dp, ValueFile};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::client::ClientInner;
use crate::error::{Error, Result};
use crate::tracker::TaskState;

impl ClientInner {
    /// The namespace directory of engine `uuid` if values can go to it as files.
    pub fn local_namespace(&self, uuid: &str) -> Option<PathBuf> {
        if !self.shared_memory.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        dp::local_namespace(uuid, &self.io.shared.host(uuid)?)
    }
}

/// The transfer files a push wrote: (engine id, its namespace directory, file).
pub(crate) type Written = Vec<(usize, PathBuf, String)>;

/// One request per target: its content and buffers.
pub(crate) type Parts = Vec<(Value, Vec<Bytes>)>;

/// Push requests storing one value per target as `named`: target `i` gets
/// `values[value_of[i]]` (a push shares one value, a scatter has one per target). Same-host
/// targets get files: the value is encoded straight into the first one (hashed on the way, never
/// held whole in memory) and hard-linked for further engines. The others get buffers, encoded
/// once per value when the first of them needs it. Also returns the files written, to remove if
/// the requests cannot be sent.
pub(crate) fn push_parts<T: Serialize + ?Sized>(
    client: &ClientInner,
    targets: &[(usize, String)],
    named: NamedType,
    values: &[&T],
    value_of: &[usize],
) -> Result<(Parts, Written)> {
    // Files already written for a value: (dir, file) to link from; buffers already encoded.
    let mut written: HashMap<usize, (PathBuf, ValueFile)> = HashMap::new();
    let mut encoded: HashMap<usize, Bytes> = HashMap::new();
    // Engines on other hosts with a data link: each value streamed once to all of its targets;
    // what each target's link stored (`None`: buffers).
    let mut streamed: HashMap<usize, ValueFile> = HashMap::new();
    let mut by_value: HashMap<usize, Vec<(usize, String, std::net::SocketAddr)>> = HashMap::new();
    for (i, (_, uuid)) in targets.iter().enumerate() {
        if let Some(addr) = client.link_address(uuid) {
            by_value.entry(value_of[i]).or_default().push((i, uuid.clone(), addr));
        }
    }
    for (v, linked) in by_value {
        let to: Vec<(String, std::net::SocketAddr)> = linked.iter().map(|(_, u, a)| (u.clone(), *a)).collect();
        let pushed = crate::datalink::push_over_links(client, values[v], &to);
        if let Some(small) = pushed.small {
            encoded.insert(v, small);
        }
        for ((i, ..), file) in linked.into_iter().zip(pushed.files) {
            if let Some(vf) = file {
                streamed.insert(i, vf);
            }
        }
    }
    let mut parts: Parts = Vec::with_capacity(targets.len());
    let mut made: Written = Vec::new();
    let result = targets.iter().enumerate().try_for_each(|(i, (id, uuid))| {
        let v = value_of[i];
        if let Some(vf) = streamed.remove(&i) {
            parts.push((Op::Push { names: vec![named.clone()], files: vec![vf] }.to_content(), vec![]));
            return Ok(());
        }
        let Some(dir) = client.local_namespace(uuid) else {
            let buf = encoded.entry(v).or_insert_with(|| Bytes::from(rpx_runtime::encode(values[v]))).clone();
            parts.push((Op::Push { names: vec![named.clone()], files: vec![] }.to_content(), vec![buf]));
            return Ok(());
        };
        let linked = written.get(&v).and_then(|(from, vf)| dp::link_value_file(from, vf, &dir).ok());
        let vf = match linked {
            Some(vf) => vf,
            None => {
                let size = rpx_runtime::plain_encoded_len(values[v]).map(|n| n as u64);
                // Over a spare mapped ahead (a plain vector's bytes copied into place), else
                // written the usual way.
                let premapped = size.and_then(|s| client.premaps.write_over(&dir, s, |dst| rpx_runtime::encode_plain_into(values[v], dst)));
                let vf = match premapped {
                    Some(vf) => Ok(vf),
                    None => dp::write_value_file_beside(&dir, dp::Integrity::Namespace, size, |w| {
                        rpx_runtime::encode_chunked(values[v], dp::STREAM_CHUNK, |piece| w.write_all(piece))
                    }),
                }
                .map_err(|e| {
                    Error::Protocol(format!("cannot write `{}` into the namespace of engine {id} ({}): {e}", named.name, dir.display()))
                })?;
                written.insert(v, (dir.clone(), vf.clone()));
                vf
            }
        };
        made.push((*id, dir, vf.file.clone()));
        parts.push((Op::Push { names: vec![named.clone()], files: vec![vf] }.to_content(), vec![]));
        Ok(())
    });
    match result {
        Ok(()) => Ok((parts, made)),
        Err(e) => {
            remove_files(&made);
            Err(e)
        }
    }
}

/// Remove transfer files that will not be sent.
pub(crate) fn remove_files(files: &Written) {
    for (_, dir, f) in files {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Pull requests for `name`, and where the same-host targets' replies are read and the other
/// hosts' fetched.
/// `once`: the result is read once, at once (a blocking `pull` or `gather`), so a plain vector
/// fetched over a data link is decoded as it arrives and no copy of its bytes is kept.
pub(crate) fn pull_parts(client: &Arc<ClientInner>, targets: &[(usize, String)], name: &str, once: bool) -> (Parts, Pulled) {
    let mut dirs = HashMap::new();
    let mut links = HashMap::new();
    let parts = targets
        .iter()
        .map(|(id, uuid)| {
            let dir = client.local_namespace(uuid);
            let link = if dir.is_none() { client.link_address(uuid) } else { None };
            let files = match (&dir, &link) {
                (Some(_), _) => Some(PullFiles::SameHost),
                (None, Some(_)) => Some(PullFiles::DataLink),
                (None, None) => None,
            };
            if let Some(d) = dir {
                dirs.insert(*id, d);
            }
            if let Some(a) = link {
                links.insert(*id, (uuid.clone(), a));
            }
            (Op::Pull { names: vec![name.to_string()], files }.to_content(), vec![])
        })
        .collect();
    (parts, Pulled { dirs, links, client: client.clone(), once, read: Mutex::new(HashMap::new()) })
}

/// The file side of a pull: each same-host engine's namespace directory, each other host's data
/// link, and the values already read (a pulled file is read once and removed; asking the
/// result again reuses the bytes).
pub(crate) struct Pulled {
    dirs: HashMap<usize, PathBuf>,
    links: HashMap<usize, (String, std::net::SocketAddr)>,
    client: Arc<ClientInner>,
    once: bool,
    read: Mutex<HashMap<String, Bytes>>,
}

impl Pulled {
    /// The value of a reply naming a snapshot on this host or on another host's data link,
    /// read straight into a plain vector (fresh memory in huge pages, filled on every core or as
    /// it arrives): only for a result read once ([`pull_parts`]), and `None` for any other case
    /// ([`Pulled::value`] then reads it). `Err` if the file is refused; the inner `Err` if the
    /// value does not decode.
    pub fn read_plain<T: DeserializeOwned + 'static>(
        &self,
        t: &TaskState,
        content: &Value,
        engine: &str,
    ) -> Option<std::result::Result<std::result::Result<T, String>, String>> {
        if !self.once || !rpx_runtime::is_plain::<T>() {
            return None;
        }
        let id = t.engine_id?;
        let vf = dp::files_from_content(content)?.ok()?.into_iter().next()?;
        let size = usize::try_from(vf.size).ok()?;
        let n = rpx_runtime::plain_count::<T>(size)?;
        let mut value: T = rpx_runtime::plain_zeroed(n)?;
        let dst = rpx_runtime::plain_bytes_mut(&mut value)?;
        let read = if let Some((uuid, addr)) = self.links.get(&id) {
            crate::datalink::fetch_into(&self.client, uuid, *addr, &vf, n, dst)
        } else {
            let dir = self.dirs.get(&id)?;
            let _reading = self.client.premaps.reading();
            let read = read_file_plain(&self.client, dir, &vf, size, n, dst);
            remove_snapshot(dir, &vf);
            read
        };
        Some(read.map(|r| r.map(|()| value)).map_err(|e| refused(engine, &e)))
    }

    /// The value a reply names as a file, made by `decode` from its bytes: mapped (no copy; a
    /// `decode` that keeps the `Bytes` keeps the mapping), checked (size, kind, owner), decoded,
    /// the file removed. `None` if the reply carries no
    /// files (the value is in its buffers); `Some(Err)` if the file is refused.
    pub fn value<T, E>(
        &self,
        t: &TaskState,
        content: &Value,
        engine: &str,
        decode: impl FnOnce(&Bytes) -> std::result::Result<T, E>,
    ) -> Option<std::result::Result<std::result::Result<T, E>, String>> {
        let files = match dp::files_from_content(content)? {
            Ok(f) => f,
            Err(e) => return Some(Err(format!("{engine} named pulled files this client cannot read: {e}"))),
        };
        if let Some(b) = self.read.lock().unwrap_or_else(|p| p.into_inner()).get(&t.msg_id).cloned() {
            return Some(Ok(decode(&b)));
        }
        let refuse = |e: String| refused(engine, &e);
        if let Some((uuid, addr)) = t.engine_id.and_then(|id| self.links.get(&id)) {
            // Another host: fetched over its data link, checked against the signed reply.
            let read = match files.first() {
                Some(vf) => crate::datalink::fetch(&self.client, uuid, *addr, vf).map_err(refuse).map(Bytes::from),
                None => Err(format!("{engine} named no file for the pulled value")),
            };
            return Some(read.map(|bytes| {
                let value = decode(&bytes);
                self.read.lock().unwrap_or_else(|p| p.into_inner()).insert(t.msg_id.clone(), bytes);
                value
            }));
        }
        let Some(dir) = t.engine_id.and_then(|id| self.dirs.get(&id)) else {
            return Some(Err(format!("{engine} answered with files, but this client did not ask for them")));
        };
        let _reading = self.client.premaps.reading();
        let read = match files.first() {
            Some(vf) => dp::read_value_file(dir, vf).map_err(refuse).map(|bytes| {
                let value = decode(&bytes);
                (bytes, value)
            }),
            None => Err(format!("{engine} named no file for the pulled value")),
        };
        for vf in &files {
            remove_snapshot(dir, vf);
        }
        Some(read.map(|(bytes, value)| {
            self.read.lock().unwrap_or_else(|p| p.into_inner()).insert(t.msg_id.clone(), bytes);
            value
        }))
    }
}

/// Read a same-host snapshot of a plain vector (`size` bytes encoding `n` elements) into `dst`:
/// mapped (and checked against its digest, if one was announced), its length prefix checked,
/// its elements copied into place on every core, each part's snapshot pages mapped in by the
/// thread that copies it (the copy is also what fills `dst`'s new pages).
/// Measured for 100 MB against reading the file into place with `pread` on every core: 28 ms
/// against 54 (the page cache's per-page read path is slower than mapping and copying). The
/// mapping is then released ([`Premaps::release`](crate::premap::Premaps::release): a large one
/// unmapped off the caller's path). `Err` if the
/// file is refused; the inner `Err` if the prefix is not `n` elements in `size` bytes.
fn read_file_plain(
    client: &ClientInner,
    dir: &std::path::Path,
    vf: &ValueFile,
    size: usize,
    n: usize,
    dst: &mut [u8],
) -> std::result::Result<std::result::Result<(), String>, String> {
    let mapped = dp::map_value_file(dir, vf, dp::Pages::AsRead)?;
    let mut elements = mapped.as_ref().map_or(&[][..], |m| m.as_ref());
    let prefix = rpx_runtime::read_plain_prefix(&mut elements, size, n, dst.len(), &mut |_| ());
    let read = match prefix.map_err(|e| format!("{}: {e}", vf.file))? {
        Ok(()) if elements.len() == dst.len() => {
            rpx_runtime::copy_from_mapping_on_every_core(dst, elements);
            Ok(())
        }
        Ok(()) => Err(format!("{} bytes of elements where {} were expected", elements.len(), dst.len())),
        Err(e) => Err(e),
    };
    if let Some(m) = mapped {
        client.premaps.release(m);
    }
    Ok(read)
}

/// Remove a pulled snapshot once read (only ever a transfer name in the engine's namespace).
fn remove_snapshot(dir: &std::path::Path, vf: &ValueFile) {
    if dp::is_transfer_name(&vf.file) {
        let _ = std::fs::remove_file(dir.join(&vf.file));
    }
}

/// Why a value pulled from `engine` is not used.
fn refused(engine: &str, why: &str) -> String {
    format!("the value pulled from {engine} was refused: {why}")
}

/// Where one part of a gather of plain vectors comes from.
enum Source<'a> {
    /// The reply's buffer (the value came through the controller).
    Buffer(&'a Bytes),
    /// A snapshot in a same-host engine's namespace directory.
    File(&'a PathBuf, ValueFile),
    /// A snapshot on another host's data link (engine uuid, address).
    Link(&'a (String, std::net::SocketAddr), ValueFile),
}

impl Pulled {
    /// A gather of plain vectors (`rpx_runtime::is_plain`) read once, at once: the whole result
    /// is made at its final size and each engine's part read straight into its place, the parts
    /// at the same time (the links fetched in parallel, same-host files copied on every core), so
    /// no part is copied again to concatenate them. `None` (nothing read) for any other case,
    /// including a reply that is not `ok`: the caller's general path then reads and reports it.
    pub fn gather_plain<V: 'static>(&self, tasks: &[TaskState]) -> Option<Result<V>> {
        if !self.once || !rpx_runtime::is_plain::<V>() {
            return None;
        }
        let mut parts = Vec::with_capacity(tasks.len());
        for t in tasks {
            let r = crate::result::ok_reply(t).ok()?;
            let source = match dp::files_from_content(&r.content) {
                None => Source::Buffer(r.buffers.first()?),
                Some(files) => {
                    let vf = files.ok()?.into_iter().next()?;
                    let id = t.engine_id?;
                    match self.links.get(&id) {
                        Some(link) => Source::Link(link, vf),
                        None => Source::File(self.dirs.get(&id)?, vf),
                    }
                }
            };
            let size = match &source {
                Source::Buffer(b) => b.len(),
                Source::File(_, vf) | Source::Link(_, vf) => usize::try_from(vf.size).ok()?,
            };
            parts.push((t, source, size, rpx_runtime::plain_count::<V>(size)?));
        }
        let total = parts.iter().try_fold(0usize, |sum, p| sum.checked_add(p.3))?;
        let mut out: V = rpx_runtime::plain_zeroed(total)?;
        let elem = rpx_runtime::plain_elem_size::<V>()?;
        let mut rest = rpx_runtime::plain_bytes_mut(&mut out)?;
        let mut jobs = Vec::with_capacity(parts.len());
        for (t, source, size, n) in parts {
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n * elem);
            rest = tail;
            jobs.push((t, source, size, n, dst));
        }
        let workers = jobs.len().min(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)));
        let _reading = self.client.premaps.reading();
        let jobs = Mutex::new(jobs.into_iter());
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let Some((t, source, size, n, dst)) = jobs.lock().unwrap_or_else(|p| p.into_inner()).next() else { break };
                    if let Err(e) = self.read_part(t, source, size, n, dst) {
                        failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                    }
                });
            }
        });
        Some(match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(out),
        })
    }

    /// Read one part of [`Pulled::gather_plain`] from `source` (`size` bytes encoding `n`
    /// elements) into `dst`, checked against its reply (a data link's bytes against its digest);
    /// a same-host snapshot is removed.
    fn read_part(&self, t: &TaskState, source: Source<'_>, size: usize, n: usize, dst: &mut [u8]) -> Result<()> {
        let refuse = |e: String| Error::Protocol(refused(&crate::result::engine_label(t), &e));
        let undecodable = |e: String| crate::result::undecodable(t, &e).into_error();
        let copy = |bytes: &[u8], dst: &mut [u8]| -> Result<()> {
            rpx_runtime::read_plain_into(&mut &bytes[..], size, n, dst, |_| ())
                .map_err(|e| undecodable(e.to_string()))?
                .map_err(undecodable)
        };
        match source {
            Source::Buffer(b) => copy(b, dst),
            Source::Link((uuid, addr), vf) => {
                crate::datalink::fetch_into(&self.client, uuid, *addr, &vf, n, dst).map_err(refuse)?.map_err(undecodable)
            }
            Source::File(dir, vf) => {
                let read = read_file_plain(&self.client, dir, &vf, size, n, dst);
                remove_snapshot(dir, &vf);
                read.map_err(refuse)?.map_err(undecodable)
            }
        }
    }
}
