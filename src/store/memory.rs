//! Handing memory back to the system after a large key-set job, and after start-up.
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
//! lookups fill the cache again with the pages they use. The same once after start-up, whose
//! integrity check and migrations pass pages through memory too: on a million keys the
//! anonymous memory went from 4.1-4.6 to 1.9-2.1 MiB (the idle bench).
//!
//! `malloc_trim` cannot reach everything: the free top of a thread's arena (all arenas but the
//! main one) is given back only by a `free` in that arena, and only past the trim threshold,
//! which glibc raises to twice the largest block it has unmapped (the snapshot's ~128 KiB
//! messages, its 5,000-key batches). Runs of the cloud bench left 3 to 6 MiB resident in
//! such tops after a snapshot, with under 1 MB in use. So the daemon fixes both thresholds
//! at start ([`hold_little`]): blocks of 128 KiB and more get mappings of their own, returned
//! when freed, and an arena's top beyond 256 KiB goes back at the next `free` that adds to it.

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

/// Blocks of at least this size are mapped on their own and unmapped when freed (glibc's
/// default, fixed: by default a freed mapping raises it, up to 32 MiB on 64-bit systems).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 128 * 1024;
/// An arena's free top beyond this is returned by the next `free` that adds to it (glibc's
/// default is 128 KiB, raised to twice each unmapped block's size; fixed here).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 256 * 1024;

/// Fixes the allocator's mapping and trim thresholds for the daemon's process, so what a
/// key-set job's large blocks used goes back to the kernel when freed (module docs). Returns
/// whether the allocator took them (on a C library other than glibc there is nothing to set).
pub fn hold_little() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and reads or writes no memory of ours. glibc
        // changes the parameters without stopping other threads' allocations, so the daemon
        // calls this first, before its runtime starts threads (a value read half-changed
        // would only place one block differently).
        #[allow(unsafe_code)]
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        set
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
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

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_fixed_thresholds() {
        assert!(super::hold_little());
    }
}
