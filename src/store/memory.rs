//! Handing memory back to the system after a large key-set job.
//!
//! Installing a snapshot passes its keys through the process in batches of up to 5,000 (the
//! link decodes them on the runtime's workers, the writer stages them), and removing the old
//! set churns memory a while longer. glibc's allocator keeps what such batches freed in the
//! arenas of the threads that used them rather than returning it to the kernel (an arena gives
//! its top back only past a threshold that large frees raise, and never the free pages below
//! it), and the writer's SQLite page cache stays full of staged rows no lookup needs. After a
//! million keys the daemon kept 26 MiB, against 13-14 MiB when started on the same keys
//! (docs/performance.md, P7). So after each such job, once the writer is idle (no command for
//! 250 ms, whether or not it has a WAL to fold), the writer empties its page cache (`PRAGMA shrink_memory`) and every
//! arena's free pages are returned (`malloc_trim`): 13 MiB after a million keys (the trim
//! alone: 17.6 MiB). Once per snapshot; the next batch takes fresh pages from the kernel, and
//! lookups fill the cache again with the pages they use.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set when a large job finished; the writer's next idle moment gives the memory back.
static RELEASE_DUE: AtomicBool = AtomicBool::new(false);

/// A key set was installed or an old one removed: give the memory back when next idle (the
/// link drops its last chunks only after the install's commit).
pub(super) fn job_done() {
    RELEASE_DUE.store(true, Ordering::Relaxed);
}

/// Whether a job's memory waits to be given back (the writer then waits for an idle moment
/// even with nothing to checkpoint).
pub(super) fn due() -> bool {
    RELEASE_DUE.load(Ordering::Relaxed)
}

/// The writer is idle: give back what the last job left, if one finished since, starting
/// with the pages its connection `conn` caches (SQLite's page cache, up to 2 MB, full of the
/// staged rows; lookups fill it again with what they use).
pub(super) fn idle(conn: &rusqlite::Connection) {
    if RELEASE_DUE.swap(false, Ordering::Relaxed) {
        if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
            tracing::debug!(error = %e, "the page cache could not be emptied");
        }
        release();
    }
}

/// Returns the allocator's free pages to the kernel, in every arena.
fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: `malloc_trim` takes no pointers; it locks each arena in turn and releases the
        // free pages it finds, which is safe while other threads allocate.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) } == 1;
        tracing::debug!(
            released,
            took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "free memory returned to the system after a key-set job"
        );
    }
}
