//! Giving freed heap memory back to the system once a burst of work ends.
//!
//! rust-analyzer and rustc's drivers inside evcxr allocate hundreds of MB on several threads
//! while a context warms up or compiles, then free most of it; glibc keeps those pages in its
//! arenas, so an idle compiler would hold them for good (measured on a warm one-context
//! compiler: 444 MB resident before a trim, 321 MB after). A trim takes 7-13 ms, so it runs on
//! a thread of its own, off the event loop that answers engines.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

/// Asks the trimming thread to return the heap's free pages; requests made while one is
/// pending coalesce into it.
pub struct Trimmer(SyncSender<()>);

impl Trimmer {
    /// Start the trimming thread.
    pub fn spawn() -> Trimmer {
        let (tx, rx) = sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    release_freed();
                }
            })
            .expect("spawning the heap-trim thread");
        Trimmer(tx)
    }

    /// Trim soon (returns at once).
    pub fn request(&self) {
        match self.0.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => tracing::warn!("the heap-trim thread is gone"),
        }
    }
}

/// Return the heap's free pages to the system (glibc's `malloc_trim`); a no-op elsewhere.
fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released = released == 1, elapsed_us = started.elapsed().as_micros() as u64, "heap trimmed");
    }
}
