//! Spares mapped ahead of the pushes that write over them, and pulled snapshots unmapped once
//! read, both in the background (same host only).
//!
//! Writing 100 MB over a spare's existing pages costs about 20 ms, and most of it is the kernel
//! setting up the mapping page by page, not the copy (`examples/dp_micro.rs`, steps 1e and 1h:
//! mapped and populated beforehand 10-13 ms, then the copy 5-8 ms on two cores). A push's
//! reply names the spares its engine holds (`rpx_protocol::dataplane::REPLY_SPARES_KEY`);
//! [`Premaps`] maps them on a thread of its own, off every request's path, and the next push of
//! a plain vector that fits one claims it by the same rename any claimant uses
//! (`rpx_protocol::dataplane::claim_named_spare`), copies the value into the mapping and hands
//! the mapping back to the thread to be unmapped.
//!
//! Nothing is ever written through a mapping before its rename succeeded: until then the spare
//! belongs to the engine (which may free it, or give it to another claimant), and a mapping of
//! a spare someone else claimed is only dropped. Mappings are dropped when a later reply no
//! longer names their spare, when the file is gone, and at the latest after
//! [`SPARE_TTL`](rpx_protocol::dataplane::SPARE_TTL) (when the engine frees unclaimed spares), so
//! the client never keeps a freed spare's pages alive for long. A push does not wait for the
//! thread: a spare is claimable as soon as it is mapped, its pages populated so far are written
//! without faults and the rest fault as usual.
//!
//! A second thread unmaps the pulled snapshots this client copied out ([`Premaps::release`]).
//!
//! Both threads work in pieces and pause while this client reads pulled or gathered values
//! ([`Premaps::reading`]): populating is kernel work that slows a read overlapping it (measured:
//! a pull 3.5 -> 2.9 GB/s and a gather 3.9 -> 2.3 GB/s right after a push), whatever the
//! thread's priority, so it is done when the client is not reading, and at the latest after
//! [`YIELD_LIMIT`] (an unmapping waits [`RELEASE_YIELD_LIMIT`] in all: the removed snapshot's
//! pages live until it is done).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use rpx_protocol::dataplane::{self as dp, Spare, ValueFile, SPARE_TTL};

/// Most spares mapped ahead per namespace.
const MAX_PER_NAMESPACE: usize = 4;
/// How often the thread looks for mapped spares that are gone.
const SWEEP: Duration = Duration::from_secs(1);
/// The pieces a spare is populated in: a read that starts waits for one piece at most.
const POPULATE_PIECE: usize = 4 << 20;
/// How a spare's mapping is populated: as for reading. A spare's pages are all in memory
/// already, and a read fault maps the pages around it too (the kernel's fault-around), where
/// populating for writing takes a fault per page; the mapping is shared and writable, so the
/// pages come mapped writable and the copy into them takes no fault either way. 100 MB
/// (`examples/dp_micro.rs`, steps 1e and 1h): populated in 10.8 ms instead of 12.6, copied into
/// in 7.1 ms against 7.8; a spare whose pages were written through a mapping (as a loop of
/// pushes leaves them), 11 ms with 1,521 faults against 22 ms with 24,320. By turns in
/// `bench_ops`'s loop the scatter that waited for its spares stopped waiting
/// (`bench/results/ab-populate-read-20261206.md`).
const POPULATE_ADVICE: libc::c_int = libc::MADV_POPULATE_READ;
/// The longest the thread waits for reads to end before it goes on anyway.
const YIELD_LIMIT: Duration = Duration::from_secs(1);
/// Pulled snapshot mappings from this many bytes on are unmapped on the thread.
const RELEASE_LATER_FROM: usize = 16 << 20;
/// The longest, in all, the unmapping of a pulled snapshot waits for reads: until unmapped its
/// removed file's pages stay in memory.
const RELEASE_YIELD_LIMIT: Duration = Duration::from_millis(100);

/// A spare mapped for writing, not yet claimed.
struct Premapped {
    file: String,
    ino: u64,
    map: MmapMut,
    /// The spare's file, kept open for cutting it to the value's size once claimed.
    handle: std::fs::File,
    mapped_at: Instant,
}

/// What the mapping thread is asked to do.
enum Job {
    /// The spares `dir` holds now: map those not mapped, drop mappings of the others.
    Offer(PathBuf, Vec<Spare>),
    /// Unmap (a claimed spare, written).
    Unmap(MmapMut),
    /// Answered once every job before it is done and gone spares are dropped (tests).
    #[cfg(test)]
    Settle(Sender<()>),
}

/// The client's spares mapped ahead, by namespace directory, and the thread that maps them.
#[derive(Default)]
pub(crate) struct Premaps {
    mapped: Arc<Mutex<HashMap<PathBuf, Vec<Premapped>>>>,
    jobs: Mutex<Option<Sender<Job>>>,
    /// Pulled snapshots to unmap, on a thread of their own (not behind the mapping thread's
    /// populating, which a push waits for).
    releases: Mutex<Option<Sender<rpx_runtime::Mapped>>>,
    reads: Arc<Reads>,
}

/// How many reads of pulled values this client has in progress; the thread waits for none.
#[derive(Default)]
struct Reads {
    count: Mutex<usize>,
    none: Condvar,
}

impl Reads {
    /// Wait until no read is in progress, at most `limit`.
    fn wait_none(&self, limit: Duration) {
        let count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.none.wait_timeout_while(count, limit, |n| *n > 0).unwrap_or_else(|p| p.into_inner()));
    }
}

/// A read of pulled values in progress ([`Premaps::reading`]), until dropped.
pub(crate) struct Reading(Arc<Reads>);

impl Drop for Reading {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|p| p.into_inner());
        *count -= 1;
        if *count == 0 {
            self.0.none.notify_all();
        }
    }
}

impl Premaps {
    /// The spares `dir` holds after a push (from its reply): mapped on the thread, in the
    /// background.
    pub fn offer(&self, dir: &Path, spares: Vec<Spare>) {
        self.send(Job::Offer(dir.to_path_buf(), spares));
    }

    /// A read of pulled or gathered values starts: the thread pauses populating and unmapping
    /// until the returned guard is dropped.
    pub fn reading(&self) -> Reading {
        *self.reads.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Reading(self.reads.clone())
    }

    /// Unmap a pulled snapshot whose bytes were copied out, on a thread of its own: unmapping
    /// 100 MB of populated pages costs the kernel about 3.5 ms, which the pull need not wait
    /// for, and pausing while a read is in progress keeps it from slowing the next pull's
    /// mapping (the process's mapping lock; measured: a `pull_view` right after a pull 10.4 ->
    /// 7.8 GB/s when the unmapping ran beside it). A small mapping is unmapped here and now
    /// (tearing it down costs less than handing it over).
    pub fn release(&self, map: rpx_runtime::Mapped) {
        if map.as_ref().len() < RELEASE_LATER_FROM {
            return;
        }
        let reads = self.reads.clone();
        let run = move |rx: Receiver<rpx_runtime::Mapped>| {
            for map in rx {
                // The snapshot's file is removed: its pages live until unmapped, so the pauses
                // are bounded by a short total.
                let until = Instant::now() + RELEASE_YIELD_LIMIT;
                map.unmap_pausing(|| reads.wait_none(until.saturating_duration_since(Instant::now())));
            }
        };
        send_to_thread(&self.releases, "rpx-unmap", run, map);
    }

    /// Wait until every offer made so far is mapped (or refused), at most `limit`.
    #[cfg(test)]
    pub fn settle(&self, limit: Duration) -> bool {
        let (tx, rx) = channel();
        self.send(Job::Settle(tx));
        rx.recv_timeout(limit).is_ok()
    }

    /// How many spares of `dir` are mapped ahead.
    #[cfg(test)]
    pub fn mapped_in(&self, dir: &Path) -> usize {
        self.mapped.lock().unwrap_or_else(|p| p.into_inner()).get(dir).map_or(0, Vec::len)
    }

    /// Write `size` bytes with `fill` over a spare of `dir` mapped ahead that fits them
    /// ([`spare_fits`](dp::spare_fits), the smallest first), claimed first. `None` when
    /// no such spare is mapped or the claim fails (another claimant won, or it is gone): the
    /// caller writes a transfer file the usual way. `fill` gets exactly `size` bytes.
    pub fn write_over(&self, dir: &Path, size: u64, fill: impl FnOnce(&mut [u8]) -> bool) -> Option<ValueFile> {
        let picked = {
            let mut mapped = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
            let list = mapped.get_mut(dir)?;
            let best = (0..list.len()).filter(|&i| dp::spare_fits(list[i].map.len() as u64, size)).min_by_key(|&i| list[i].map.len())?;
            list.swap_remove(best)
        };
        let Premapped { file: spare, ino, mut map, handle, .. } = picked;
        let written = dp::claim_named_spare(dir, &spare, ino, map.len() as u64).and_then(|file| {
            let len = usize::try_from(size).ok()?;
            if !fill(&mut map[..len]) {
                let _ = std::fs::remove_file(dir.join(&file));
                return None;
            }
            if map.len() != len && handle.set_len(size).is_err() {
                let _ = std::fs::remove_file(dir.join(&file));
                return None;
            }
            Some(ValueFile { file, size, blake3: None })
        });
        self.send(Job::Unmap(map));
        written
    }

    fn send(&self, job: Job) {
        let (mapped, reads) = (self.mapped.clone(), self.reads.clone());
        send_to_thread(&self.jobs, "rpx-premap", move |rx| run(rx, mapped, reads), job);
    }
}

/// Send `job` to the thread behind `tx`, started (as `name`, running `run`) by the first job.
/// With no thread (it cannot be started) the job is dropped here: nothing is mapped ahead, and
/// a mapping to unmap is unmapped at once.
fn send_to_thread<J: Send + 'static>(tx: &Mutex<Option<Sender<J>>>, name: &str, run: impl FnOnce(Receiver<J>) + Send + 'static, job: J) {
    let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
    if tx.is_none() {
        let (sender, rx) = channel();
        if std::thread::Builder::new().name(name.into()).spawn(move || run(rx)).is_err() {
            return;
        }
        *tx = Some(sender);
    }
    if let Some(sender) = tx.as_ref() {
        let _ = sender.send(job);
    }
}

/// The mapping thread: runs jobs, and drops mappings of spares that are gone or old.
fn run(rx: Receiver<Job>, mapped: Arc<Mutex<HashMap<PathBuf, Vec<Premapped>>>>, reads: Arc<Reads>) {
    // Mapping ahead should use time no one else wants: lowest priority, so that the user's own
    // threads come first, and paused while the client reads (the module's docs say why).
    // SAFETY: setpriority on this thread's own id (Linux threads have their own nice value).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    let lock = || mapped.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        match rx.recv_timeout(SWEEP) {
            Ok(Job::Offer(dir, spares)) => {
                // Drop mappings of spares no longer listed (claimed or freed since).
                let stale: Vec<Premapped> = {
                    let mut all = lock();
                    let list = all.entry(dir.clone()).or_default();
                    let (keep, stale) = std::mem::take(list).into_iter().partition(|p| spares.iter().any(|s| s.file == p.file));
                    *list = keep;
                    stale
                };
                drop(stale);
                for spare in spares {
                    let known = lock().get(&dir).is_some_and(|l| l.len() >= MAX_PER_NAMESPACE || l.iter().any(|p| p.file == spare.file));
                    if known || spare.size < dp::SPARE_FROM {
                        continue;
                    }
                    let Some(p) = map_spare(&dir, &spare) else { continue };
                    let (at, len, ino) = (p.map.as_ptr() as usize, p.map.len(), p.ino);
                    lock().entry(dir.clone()).or_default().push(p);
                    // Populated piece by piece while it is still unclaimed (a push may claim it
                    // any time; what is not populated then faults as usual). Populated by reading
                    // (`POPULATE_ADVICE`): a read fault maps the file's pages around it too.
                    for offset in (0..len).step_by(POPULATE_PIECE) {
                        reads.wait_none(YIELD_LIMIT);
                        if !lock().get(&dir).is_some_and(|l| l.iter().any(|p| p.ino == ino)) {
                            break;
                        }
                        // SAFETY: a range of a live mapping: mappings are only unmapped on this
                        // thread (`Job::Unmap`, stale and gone ones), so it stays mapped while
                        // this runs even if a push claimed it meanwhile. Populating only faults
                        // pages in; it changes no byte.
                        unsafe { libc::madvise((at + offset) as *mut libc::c_void, POPULATE_PIECE.min(len - offset), POPULATE_ADVICE) };
                    }
                }
            }
            Ok(Job::Unmap(map)) => {
                reads.wait_none(YIELD_LIMIT);
                drop(map)
            }
            #[cfg(test)]
            Ok(Job::Settle(ack)) => {
                drop(gone(&mut lock()));
                let _ = ack.send(());
            }
            Err(RecvTimeoutError::Timeout) => drop(gone(&mut lock())),
            // The client is gone: its mappings go with the thread.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Take out the mappings of spares that are gone (claimed or freed) or as old as the time the
/// engine keeps a spare, to be dropped once the lock is released.
fn gone(all: &mut HashMap<PathBuf, Vec<Premapped>>) -> Vec<Premapped> {
    let mut gone = Vec::new();
    for (dir, list) in all.iter_mut() {
        let (keep, old): (Vec<Premapped>, Vec<Premapped>) = std::mem::take(list).into_iter().partition(|p| {
            p.mapped_at.elapsed() < SPARE_TTL && std::fs::symlink_metadata(dir.join(&p.file)).is_ok_and(|m| m.ino() == p.ino)
        });
        *list = keep;
        gone.extend(old);
    }
    all.retain(|_, l| !l.is_empty());
    gone
}

/// Map spare `spare` of `dir` for writing (the thread then populates its pages, so that the
/// copy takes no fault): `None` if it is not a regular file of this user with one name and the
/// listed size, or cannot be mapped.
fn map_spare(dir: &Path, spare: &Spare) -> Option<Premapped> {
    if !dp::is_spare_name(&spare.file) {
        return None;
    }
    let handle = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(dir.join(&spare.file)).ok()?;
    let md = handle.metadata().ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !md.is_file() || md.uid() != me || md.nlink() != 1 || md.size() != spare.size {
        return None;
    }
    let len = usize::try_from(spare.size).ok()?;
    // SAFETY: a shared mapping of a spare file in this user's private namespace directory. Its
    // pages are only written after this client claimed the file by renaming it
    // (`Premaps::write_over`); until then nothing reads or writes them through this mapping, and
    // the file is never cut while mapped by another claimant without the claim failing here
    // first (a file cut under the mapping would fault only if touched, which is never done
    // unclaimed).
    let map = unsafe { MmapOptions::new().len(len).map_mut(&handle) }.ok()?;
    Some(Premapped { file: spare.file.clone(), ino: md.ino(), map, handle, mapped_at: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    fn spare(dir: &Path, size: u64) -> (Spare, u64) {
        let file = dp::transfer_name().replace(dp::TRANSFER_PREFIX, dp::SPARE_PREFIX);
        std::fs::write(dir.join(&file), vec![0xEEu8; size as usize]).unwrap();
        let ino = std::fs::metadata(dir.join(&file)).unwrap().ino();
        (Spare { file, size }, ino)
    }

    fn fill_with(value: &[u8]) -> impl FnOnce(&mut [u8]) -> bool + '_ {
        move |dst| {
            assert_eq!(dst.len(), value.len(), "the fill gets exactly the value's size");
            dst.copy_from_slice(value);
            true
        }
    }

    /// An offered spare is mapped ahead; the next value of about its size is written over it
    /// (same file, cut to the value's size, under a transfer name, the spare's name gone), and
    /// the mapping is used once.
    #[test]
    fn an_offered_spare_is_written_over_once_claimed() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = dir.path();
        let premaps = Premaps::default();
        let (s, ino) = spare(d, dp::SPARE_FROM + 4096);
        premaps.offer(d, vec![s.clone()]);
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 1);
        let value: Vec<u8> = (0..dp::SPARE_FROM + 100).map(|i| (i % 251) as u8).collect();
        let vf = premaps.write_over(d, value.len() as u64, fill_with(&value)).unwrap();
        assert!(dp::is_transfer_name(&vf.file));
        assert_eq!((vf.size, vf.blake3.as_deref()), (value.len() as u64, None));
        let md = std::fs::metadata(d.join(&vf.file)).unwrap();
        assert_eq!((md.ino(), md.len()), (ino, value.len() as u64));
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert!(!d.join(&s.file).exists());
        assert_eq!(premaps.mapped_in(d), 0);
        assert!(premaps.write_over(d, value.len() as u64, fill_with(&value)).is_none(), "used once");
    }

    /// A spare the thread populated is written without a page fault: its pages come mapped, and
    /// mapped writable.
    #[test]
    fn a_populated_spare_is_written_without_faults() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = dir.path();
        let premaps = Premaps::default();
        let size = dp::SPARE_FROM + 4 * 4096;
        let (s, _) = spare(d, size);
        premaps.offer(d, vec![s]);
        assert!(premaps.settle(LIMIT), "offers are done before the settle is answered");
        let faults = || {
            // SAFETY: getrusage fills the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
            usage.ru_minflt + usage.ru_majflt
        };
        let mut during = None;
        let vf = premaps.write_over(d, size, |dst| {
            let before = faults();
            dst.fill(0x5A);
            during = Some(faults() - before);
            true
        });
        assert!(vf.is_some());
        assert_eq!(during, Some(0), "page faults while writing a populated spare");
        assert!(std::fs::read(d.join(vf.unwrap().file)).unwrap().iter().all(|&b| b == 0x5A));
    }

    /// While the client reads pulled values the thread does not populate, but a spare it mapped
    /// is claimable at once: a push writes over it whole (the unpopulated pages fault as usual).
    #[test]
    fn a_spare_is_claimable_while_populating_waits_for_a_read() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = dir.path();
        let premaps = Premaps::default();
        let size = 3 * POPULATE_PIECE as u64 + 4096;
        let (s, ino) = spare(d, size);
        let reading = premaps.reading();
        premaps.offer(d, vec![s]);
        let value: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let deadline = Instant::now() + LIMIT;
        let vf = loop {
            if let Some(vf) = premaps.write_over(d, size, fill_with(&value)) {
                break vf;
            }
            assert!(Instant::now() < deadline, "the offered spare was never mapped");
            std::thread::yield_now();
        };
        drop(reading);
        assert_eq!(std::fs::metadata(d.join(&vf.file)).unwrap().ino(), ino);
        assert!(std::fs::read(d.join(&vf.file)).unwrap() == value);
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 0);
    }

    /// A large pulled snapshot handed to the thread is unmapped, and a read that never ends
    /// delays that only a little: its removed file's pages are freed all the same. A small one
    /// is unmapped at once.
    #[test]
    fn a_released_snapshot_is_unmapped_even_during_a_read() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let premaps = Premaps::default();
        let in_maps = |path: &Path| std::fs::read_to_string("/proc/self/maps").unwrap().contains(path.to_str().unwrap());
        let mapped = |name: &str, len: usize| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![7u8; len]).unwrap();
            let map = rpx_runtime::Mapped::of(&std::fs::File::open(&path).unwrap(), len).unwrap();
            assert!(in_maps(&path));
            (path, map)
        };
        let (path, map) = mapped("small", RELEASE_LATER_FROM - 4096);
        premaps.release(map);
        assert!(!in_maps(&path), "a small snapshot is unmapped at once");
        for reading in [false, true] {
            let (path, map) = mapped(&format!("snapshot-{reading}"), RELEASE_LATER_FROM);
            let read = reading.then(|| premaps.reading());
            premaps.release(map);
            let deadline = Instant::now() + LIMIT;
            while in_maps(&path) {
                assert!(Instant::now() < deadline, "never unmapped (a read in progress: {reading})");
                std::thread::yield_now();
            }
            drop(read);
        }
    }

    /// A spare someone else claimed first is never written; a much larger spare is left mapped
    /// for a value of its size; a failed fill leaves no file; spares no longer listed, or gone,
    /// are dropped.
    #[test]
    fn only_a_spare_this_client_claimed_is_written() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let d = dir.path();
        let premaps = Premaps::default();
        let value = vec![7u8; dp::SPARE_FROM as usize];
        // Claimed by another (renamed away) after it was mapped here.
        let (taken, taken_ino) = spare(d, dp::SPARE_FROM);
        premaps.offer(d, vec![taken.clone()]);
        assert!(premaps.settle(LIMIT));
        std::fs::rename(d.join(&taken.file), d.join("claimed-elsewhere")).unwrap();
        assert!(premaps.write_over(d, value.len() as u64, fill_with(&value)).is_none());
        assert_eq!(std::fs::metadata(d.join("claimed-elsewhere")).unwrap().ino(), taken_ino);
        assert!(std::fs::read(d.join("claimed-elsewhere")).unwrap().iter().all(|&b| b == 0xEE), "not written");
        // Much larger than the value: left for a value of its size.
        let (huge, _) = spare(d, 4 * dp::SPARE_FROM);
        premaps.offer(d, vec![huge.clone()]);
        assert!(premaps.settle(LIMIT));
        assert!(premaps.write_over(d, value.len() as u64, fill_with(&value)).is_none());
        assert_eq!(premaps.mapped_in(d), 1);
        // A fill that fails: the claimed file is removed, nothing is adopted.
        let vf = premaps.write_over(d, 4 * dp::SPARE_FROM, |_| false);
        assert!(vf.is_none());
        assert!(!d.join(&huge.file).exists());
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 1, "only the file claimed elsewhere is left");
        // Not listed any more, or gone: dropped.
        let (a, _) = spare(d, dp::SPARE_FROM);
        let (b, _) = spare(d, dp::SPARE_FROM);
        premaps.offer(d, vec![a.clone(), b.clone()]);
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 2);
        premaps.offer(d, vec![b.clone()]);
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 1);
        std::fs::remove_file(d.join(&b.file)).unwrap();
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 0);
        // Not a spare's name, or small: never mapped.
        let (small, _) = spare(d, dp::SPARE_FROM - 1);
        premaps.offer(d, vec![small, Spare { file: "../escape".into(), size: dp::SPARE_FROM }]);
        assert!(premaps.settle(LIMIT));
        assert_eq!(premaps.mapped_in(d), 0);
    }
}
