//! The disk reserve: a file of zeros (`{db}.reserve`, `storage.reserve` bytes) the store keeps
//! beside the database so that a full disk does not put records in memory, where a crash or
//! power cut would lose them.
//!
//! When a commit fails because the disk is full (not because the database reached its own
//! `storage.max_size`), the writer deletes the reserve and commits again: the records land on
//! disk, with a `storage_reserve_released` alarm, while whatever filled the disk is dealt with.
//! Once the disk has room again the reserve is written anew, at most once a minute while idle.
//! Written with real zeros (a sparse file would reserve nothing) and synced.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a missing reserve is written again, at most.
const RETRY: Duration = Duration::from_secs(60);
/// Zeros written per call.
const CHUNK: usize = 64 * 1024;

/// The reserve file of one database.
#[derive(Debug)]
pub(super) struct Reserve {
    path: PathBuf,
    /// The size it should have; 0: no reserve.
    size: u64,
    /// Whether the whole reserve is on disk.
    present: bool,
    last_try: Option<Instant>,
}

impl Reserve {
    /// The reserve of the database at `db`; call [`Reserve::restore`] to write it.
    pub(super) fn new(db: &Path, size: u64) -> Reserve {
        let mut name = db.as_os_str().to_owned();
        name.push(".reserve");
        Reserve {
            path: PathBuf::from(name),
            size,
            present: false,
            last_try: None,
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Whether the reserve was released and is not back: the disk is (or was) full.
    pub(super) fn in_use(&self) -> bool {
        self.size > 0 && !self.present && self.last_try.is_some()
    }

    /// Whether there is a reserve to release.
    pub(super) fn present(&self) -> bool {
        self.present
    }

    /// Deletes the reserve (the disk is full); true if there was one.
    pub(super) fn release(&mut self) -> bool {
        if !self.present {
            return false;
        }
        self.present = false;
        self.last_try = Some(Instant::now());
        match std::fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot delete the disk reserve");
                false
            }
        }
    }

    /// Writes the reserve if it is missing or short and the last try is long enough ago (or
    /// `now_anyway`). A disk without room for it leaves none (no half reserve).
    pub(super) fn restore(&mut self, now_anyway: bool) {
        if self.size == 0 || self.present {
            return;
        }
        if !now_anyway && self.last_try.is_some_and(|t| t.elapsed() < RETRY) {
            return;
        }
        self.last_try = Some(Instant::now());
        match fill(&self.path, self.size) {
            Ok(()) => {
                self.present = true;
                tracing::info!(path = %self.path.display(), bytes = self.size, "disk reserve in place");
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                tracing::warn!(error = %e, path = %self.path.display(), bytes = self.size,
                    "no room for the disk reserve; tried again later");
            }
        }
    }
}

/// Makes `path` `size` bytes of written zeros, keeping what is already there, and syncs it.
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    let mut file: File = OpenOptions::new()
        .create(true)
        .append(true)
        .truncate(false)
        .open(path)?;
    let mut have = file.metadata()?.len();
    if have > size {
        file.set_len(size)?;
        have = size;
    }
    let zeros = vec![0u8; CHUNK];
    while have < size {
        let n = usize::try_from(size - have).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all(&zeros[..n])?;
        have += n as u64;
    }
    file.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_is_written_whole_released_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("doorbridge.db");
        let mut r = Reserve::new(&db, 200_000);
        r.restore(true);
        let file = dir.path().join("doorbridge.db.reserve");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 200_000);
        assert!(r.present());
        assert!(r.release());
        assert!(!file.exists() && !r.present());
        assert!(!r.release(), "nothing left to release");
        // Not again at once while idle...
        r.restore(false);
        assert!(!file.exists());
        // ... but when asked.
        r.restore(true);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 200_000);
    }

    #[test]
    fn no_reserve_when_its_size_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Reserve::new(&dir.path().join("db"), 0);
        r.restore(true);
        assert!(!r.present() && !dir.path().join("db.reserve").exists());
    }
}
