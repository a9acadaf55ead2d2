//! Where a same-host push and pull of 100 MB of f64 spend their time, step by step as the data
//! plane takes them (`BENCH_REPS` runs, 5 by default; the minimum and median of each step):
//! - push, client: the value encoded straight into a transfer file, the file written by the
//!   encoding thread or by a second one (what the client does), with no digest (as on one host
//!   now) and with a BLAKE3 computed on the way (as before, and as a data link does);
//!   and written over a spare (the pages of a value the engine replaced); over a spare mapped
//!   and populated ahead, for writing (1e) and for reading (1h: what the client does once a
//!   reply named it), the mapping, the copy and the unmapping timed apart; and two ways of
//!   writing a new file that are slower than `write` from one thread, kept as measured (1f:
//!   mapped and copied into on every core, each page faulted in; 1g: two threads writing
//!   halves, serialised by the file);
//! - push, engine: the file checked (size, kind, owner), and with its BLAKE3 (as before);
//! - pull, client: the file mapped (and its digest checked, as before), then decoded; and a plain
//!   vector's pull as it is done, mapped and copied into fresh huge pages on every core, with the
//!   mapping populated up front (4b, as `Mapped` does) or faulted in by the copying threads (4c);
//! - a pushed value read on the engine (`rpx_runtime::get`): mapped, its pages mapped in and copied
//!   into place by the copying threads, and as before;
//!
//! and, for reference, the separate passes before the push was streamed: encode into memory,
//! digest, write+digest of encoded bytes, decode alone; and the two steps a same-host data plane
//! at memory speed would be left with: the value encoded into pages a previous transfer left
//! allocated, with no digest (written to the file, and copied into a shared mapping of it that
//! stays mapped, as an object store's arena is), and a pull that hands out a mapped view of the
//! file (pages mapped up front, nothing read, decoded or hashed).
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use rpx_protocol::dataplane as dp;

fn main() {
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let data: Vec<f64> = (0..12_500_000).map(|i| i as f64 * 0.5).collect();
    let path = std::path::PathBuf::from(format!("/dev/shm/rpx-dp-micro-{}", std::process::id()));
    std::fs::create_dir(&path).unwrap();
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Gone(path);
    let dir = dir.0.as_path();
    let mut times: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut time = |step: &str, t: Instant| times.entry(step.to_string()).or_default().push(t.elapsed().as_secs_f64() * 1e3);
    // A file whose pages are allocated once, before any timed step.
    let recycled = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dir.join("recycled")).unwrap();
    let overwrite = |f: &std::fs::File| {
        let mut at = 0u64;
        rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| {
            f.write_all_at(p, at)?;
            at += p.len() as u64;
            Ok(())
        })
        .map(|()| at)
    };
    let size = overwrite(&recycled).unwrap() as usize;
    let arena = map_shared(&recycled, size);
    let last = encoded_last_byte(&data);
    for _ in 0..reps {
        // The data plane's steps.
        let t = Instant::now();
        let vf = dp::write_value_file_with(dir, dp::Integrity::Digest, |w| {
            rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| std::io::Write::write_all(w, p))
        })
        .unwrap();
        time("1 push: encode+digest+write (streamed)", t);
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        let t = Instant::now();
        let hashed = dp::write_value_file_beside(dir, dp::Integrity::Digest, None, |w| {
            rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| std::io::Write::write_all(w, p))
        })
        .unwrap();
        time("1b push: as 1, the file written beside", t);
        let t = Instant::now();
        let vf = dp::write_value_file_beside(dir, dp::Integrity::Namespace, None, |w| {
            rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| std::io::Write::write_all(w, p))
        })
        .unwrap();
        time("1c push: as 1b, no digest (one host)", t);
        // A new file of the value's size, mapped, the value copied into it on every core (each
        // core faulting in its own fresh pages).
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        let t = Instant::now();
        let fresh = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dir.join(&vf.file)).unwrap();
        fresh.set_len(size as u64).unwrap();
        let fm = map_shared(&fresh, size);
        // SAFETY: `fm` maps `size` writable bytes, the encoding's size.
        assert!(rpx_runtime::encode_plain_into(&data, unsafe { std::slice::from_raw_parts_mut(fm as *mut u8, size) }));
        time("1f push: a new file mapped, copied into on every core", t);
        let t = Instant::now();
        // SAFETY: unmapping exactly what `map_shared` mapped.
        unsafe { libc::munmap(fm, size) };
        time("1f push: that new file unmapped", t);
        // A new file written by two threads at once, each its half with `pwrite`.
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        let t = Instant::now();
        {
            use std::os::unix::fs::FileExt;
            let fresh = std::fs::OpenOptions::new().write(true).create_new(true).open(dir.join(&vf.file)).unwrap();
            let prefix = rpx_runtime::postcard::to_stdvec(&(data.len() as u64)).unwrap();
            // SAFETY: f64 has no padding: the vector's memory is `8 * len` initialised bytes.
            let elements = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), data.len() * 8) };
            fresh.write_all_at(&prefix, 0).unwrap();
            let half = elements.len() / 2;
            let p = prefix.len() as u64;
            std::thread::scope(|sc| {
                let f = &fresh;
                sc.spawn(move || {
                    for (i, c) in elements[half..].chunks(1 << 20).enumerate() {
                        f.write_all_at(c, p + half as u64 + (i << 20) as u64).unwrap();
                    }
                });
                for (i, c) in elements[..half].chunks(1 << 20).enumerate() {
                    f.write_all_at(c, p + (i << 20) as u64).unwrap();
                }
            });
        }
        time("1g push: a new file written by two threads", t);
        // The previous value's pages kept as a spare (as an engine keeps a replaced value) and
        // written over, the value's size known (a plain vector).
        std::fs::rename(dir.join(&vf.file), dir.join(format!("{}micro", dp::SPARE_PREFIX))).unwrap();
        let t = Instant::now();
        let vf = dp::write_value_file_beside(dir, dp::Integrity::Namespace, rpx_runtime::plain_encoded_len(&data).map(|n| n as u64), |w| {
            rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| std::io::Write::write_all(w, p))
        })
        .unwrap();
        time("1d push: as 1c, written over a spare", t);
        // The same, the spare mapped and populated beforehand (off the push's path): the value
        // is copied into the mapping on every core, and only that is timed. Populated for
        // writing (1e: a fault per page) and for reading (1h: what the client does; the kernel
        // maps the pages around each fault too, writable in a shared writable mapping).
        for (step, advice, how) in [("1e", libc::MADV_POPULATE_WRITE, "writing"), ("1h", libc::MADV_POPULATE_READ, "reading")] {
            std::fs::rename(dir.join(&vf.file), dir.join(format!("{}micro", dp::SPARE_PREFIX))).unwrap();
            let t = Instant::now();
            let spare = std::fs::OpenOptions::new().read(true).write(true).open(dir.join(format!("{}micro", dp::SPARE_PREFIX))).unwrap();
            let premapped = map_shared(&spare, size);
            // SAFETY: whole pages of the mapping just made.
            let populated = unsafe { libc::madvise(premapped, size.next_multiple_of(4096), advice) };
            assert_eq!(populated, 0);
            time(&format!("{step} push: a spare mapped and populated for {how} (beforehand)"), t);
            let t = Instant::now();
            // SAFETY: `premapped` maps `size` writable bytes, the encoding's size.
            assert!(rpx_runtime::encode_plain_into(&data, unsafe { std::slice::from_raw_parts_mut(premapped as *mut u8, size) }));
            time(&format!("{step} push: copied into the spare populated for {how}"), t);
            let t = Instant::now();
            // SAFETY: unmapping exactly what `map_shared` mapped.
            unsafe { libc::munmap(premapped, size) };
            time(&format!("{step} push: the premapped spare unmapped"), t);
            std::fs::rename(dir.join(format!("{}micro", dp::SPARE_PREFIX)), dir.join(&vf.file)).unwrap();
        }
        let t = Instant::now();
        dp::verify_value_file(dir, &hashed).unwrap();
        time("2 push: engine verify with digest", t);
        let t = Instant::now();
        dp::verify_value_file(dir, &vf).unwrap();
        time("2c push: engine check, no digest", t);
        let t = Instant::now();
        drop(dp::read_value_file(dir, &hashed).unwrap());
        time("3 pull: map+digest", t);
        std::fs::remove_file(dir.join(&hashed.file)).unwrap();
        let t = Instant::now();
        let bytes = dp::read_value_file(dir, &vf).unwrap();
        time("3c pull: map, no digest", t);
        let t = Instant::now();
        let back: Vec<f64> = rpx_runtime::decode(&bytes).unwrap();
        time("4 pull: decode", t);
        // What a pull of a plain vector does: the snapshot mapped, copied into a fresh vector in
        // huge pages on every core; and the same with the source's pages left to the copying
        // threads to fault in (no MAP_POPULATE).
        for (step, populate) in
            [("4b pull: mapped populated, copied into place", true), ("4c pull: mapped unpopulated, copied into place", false)]
        {
            let t = Instant::now();
            let f = std::fs::File::open(dir.join(&vf.file)).unwrap();
            let src = if populate { map_populated(&f, size) } else { map_read(&f, size) };
            let mut v: Vec<u8> = rpx_runtime::plain_zeroed(size).unwrap();
            // SAFETY: `src` maps `size` readable bytes until the munmap below.
            rpx_runtime::copy_on_every_core(&mut v, unsafe { std::slice::from_raw_parts(src as *const u8, size) });
            time(step, t);
            // SAFETY: unmapping exactly what was mapped.
            unsafe { libc::munmap(src, size) };
            std::hint::black_box(&v);
        }
        assert_eq!(back.len(), data.len());
        drop((back, bytes));
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        // The separate passes, for reference.
        let t = Instant::now();
        let buf = rpx_runtime::encode(&data);
        time("r encode into memory", t);
        let t = Instant::now();
        let d = dp::digest(&buf);
        time("r digest (all cores)", t);
        let t = Instant::now();
        let vf = dp::write_value_file(dir, dp::Integrity::Digest, &buf).unwrap();
        time("r write+digest of encoded bytes", t);
        assert_eq!(vf.blake3, Some(d));
        let t = Instant::now();
        let back: Vec<f64> = rpx_runtime::decode(&buf).unwrap();
        time("r decode alone", t);
        assert_eq!(back.len(), data.len());
        drop(back);
        // A pushed value read by a cell or closure on the engine (`rpx_runtime::get`): read
        // straight into the vector, and as it was read before (the file whole, then decoded).
        std::env::set_var(rpx_runtime::NS_DIR_ENV, dir);
        let t = Instant::now();
        let got: Vec<f64> = rpx_runtime::get(&vf.file);
        time("5 engine: get, mapped and copied into place", t);
        assert!(got == data);
        drop(got);
        let t = Instant::now();
        let got: Vec<f64> = rpx_runtime::decode(&std::fs::read(dir.join(&vf.file)).unwrap()).unwrap();
        time("5b engine: get as before, read whole then decoded", t);
        drop(got);
        std::fs::remove_file(dir.join(&vf.file)).unwrap();
        // A fresh 100 MB vector filled, in 4 KiB pages and advised into huge pages (what a
        // pulled or gathered plain vector is decoded into).
        for (step, huge) in [("r fresh vector filled, 4 KiB pages", false), ("r fresh vector filled, huge pages advised", true)] {
            let t = Instant::now();
            let mut v = vec![0u8; buf.len()];
            if huge {
                rpx_runtime::advise_huge_pages(&mut v);
            }
            v.copy_from_slice(&buf);
            time(step, t);
            std::hint::black_box(&v);
        }
        // What a data plane at memory speed would be left with.
        let t = Instant::now();
        overwrite(&recycled).unwrap();
        time("d push: encode into allocated pages, no digest", t);
        let t = Instant::now();
        let mut at = 0;
        rpx_runtime::encode_chunked(&data, rpx_protocol::dataplane::STREAM_CHUNK, |p| {
            // SAFETY: `arena` maps `size` writable bytes for the whole run, and the encoding is
            // `size` bytes long (the file was written from it).
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), (arena as *mut u8).add(at), p.len()) };
            at += p.len();
            Ok(())
        })
        .unwrap();
        time("d push: encode into a mapped arena, no digest", t);
        let t = Instant::now();
        let view = map_populated(&recycled, size);
        time("d pull: a mapped view, nothing read", t);
        // SAFETY: `view` maps `size` readable bytes until the munmap below.
        assert_eq!(unsafe { *(view as *const u8).add(size - 1) }, last);
        // SAFETY: unmapping exactly what `map_populated` mapped.
        unsafe { libc::munmap(view, size) };
    }
    for (step, mut ms) in times {
        ms.sort_by(|a, b| a.total_cmp(b));
        println!("{step:42} min {:6.1} ms  median {:6.1} ms", ms[0], ms[ms.len() / 2]);
    }
}

/// A private read-only mapping of the first `len` bytes of `f`, its pages faulted in as read.
fn map_read(f: &std::fs::File, len: usize) -> *mut libc::c_void {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh mapping of `len` (> 0) bytes of an open file, checked for failure.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED);
    p
}

/// A private read-only mapping of the first `len` bytes of `f`, its pages mapped up front.
fn map_populated(f: &std::fs::File, len: usize) -> *mut libc::c_void {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh mapping of `len` (> 0) bytes of an open file, checked for failure.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_POPULATE, f.as_raw_fd(), 0) };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    ptr
}

/// A shared read-write mapping of the first `len` bytes of `f` (kept for the whole run).
fn map_shared(f: &std::fs::File, len: usize) -> *mut libc::c_void {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh mapping of `len` (> 0) bytes of a file opened for reading and writing,
    // checked for failure.
    let ptr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_POPULATE, f.as_raw_fd(), 0)
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    ptr
}

/// The last byte of `data` as the data plane encodes it.
fn encoded_last_byte(data: &[f64]) -> u8 {
    rpx_runtime::encode(data).last().copied().expect("a non-empty encoding")
}
