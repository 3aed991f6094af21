//! The writer's WAL and durability: `synchronous=FULL` for every transaction that must survive
//! a power cut and `NORMAL` for the one that need not (a staged chunk, a group of acks), the
//! counters SQLite's WAL hook fills in, and the checkpoints that fold the WAL into the
//! database file while the writer is idle (`docs/storage.md`, "What a decision writes").

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use super::Writer;

/// How long the command channel must stay empty before the writer folds the WAL into the
/// database file (a checkpoint), off the decision path.
pub(super) const CHECKPOINT_WHEN_IDLE: Duration = Duration::from_millis(250);
/// The WAL is checkpointed at this many frames (pages) even when the writer is never idle,
/// so it cannot grow without bound under constant load (4 MiB at 4 KiB pages). Not more:
/// the WAL restarts from its beginning only after a checkpoint, and until then every commit
/// extends the file, which costs more than overwriting it (the bus bench's p99 was 6 to 8 ms
/// with 4,096 here against 3.4 to 4.4 ms with 1,000, in quiet runs).
pub(super) const CHECKPOINT_BOUND: i64 = 1_000;
/// The WAL's bound while the disk is full (its reserve released): every page the WAL grows by
/// is taken from what is left, so it restarts from its beginning after a few commits instead.
pub(super) const CHECKPOINT_BOUND_FULL: i64 = 16;
/// An idle checkpoint waits until the WAL holds this many frames: the checkpoint writes each
/// page it copies into the database file, so a checkpoint after every lone decision would
/// write that decision's page (and its file-system block) a second time at once; 64 frames
/// share one (docs/storage.md, "What a decision writes").
const CHECKPOINT_IDLE_MIN: i64 = 64;
/// ...or until the writer has been this long without a checkpoint, so a quiet site folds its
/// WAL too.
pub(super) const CHECKPOINT_SMALL_AFTER: Duration = Duration::from_secs(600);
/// Idle checkpoints tried after one commit when a reader keeps one from finishing.
const CHECKPOINT_TRIES: u32 = 3;

/// Filled in by SQLite's WAL hook after every commit of the writer's connection.
#[derive(Debug, Default)]
pub(super) struct WalState {
    /// Frames (pages) in the WAL after the latest commit, checkpointed or not.
    pub(super) frames: AtomicI64,
    /// Commits so far.
    pub(super) commits: AtomicU64,
}

impl Writer {
    /// Sets `synchronous=NORMAL` for one transaction that need not survive a power cut (a
    /// staged chunk, a group of acks); [`Writer::restore_durable`] right after it.
    pub(super) fn relax(&mut self) -> Result<(), rusqlite::Error> {
        self.relaxed = true;
        self.conn.pragma_update(None, "synchronous", "NORMAL")
    }

    /// [`Writer::durable`] after a relaxed transaction, committed or not. Should it fail,
    /// `relaxed` stays set and the next durable transaction tries again before it begins.
    pub(super) fn restore_durable(&mut self) {
        if let Err(e) = self.durable() {
            tracing::error!(error = %e, "could not restore synchronous=FULL after a relaxed transaction");
        }
    }

    /// Puts the connection back to `synchronous=FULL` if staging left it relaxed. Every
    /// transaction that must be durable calls this first and fails when it cannot.
    pub(super) fn durable(&mut self) -> Result<(), rusqlite::Error> {
        if self.relaxed {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            self.relaxed = false;
        }
        Ok(())
    }

    /// Whether something was committed since the last checkpoint (an idle gateway that has
    /// checkpointed writes nothing more).
    pub(super) fn checkpoint_pending(&self) -> bool {
        self.wal.commits.load(Ordering::Relaxed) != self.checkpointed
    }

    /// Whether the next idle moment checkpoints: something is pending and the WAL holds
    /// [`CHECKPOINT_IDLE_MIN`] frames, or [`CHECKPOINT_SMALL_AFTER`] has passed.
    pub(super) fn checkpoint_due(&self) -> bool {
        self.checkpoint_pending()
            && (self.wal.frames.load(Ordering::Relaxed) >= CHECKPOINT_IDLE_MIN
                || self.checkpointed_at.elapsed() >= CHECKPOINT_SMALL_AFTER)
    }

    /// Copies the WAL's frames into the database file (`PASSIVE`: it never waits for readers,
    /// and copies what no reader still needs). The WAL restarts from its beginning at the
    /// next commit once all of it was copied.
    pub(super) fn checkpoint(&mut self) {
        self.checkpointed_at = std::time::Instant::now();
        let commits = self.wal.commits.load(Ordering::Relaxed);
        let result = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
        match result {
            Ok((frames, copied)) if copied < frames => {
                // A reader still uses part of the WAL: try again later, a few times at most
                // (the next commit makes it due again anyway).
                self.checkpoint_tries += 1;
                if self.checkpoint_tries >= CHECKPOINT_TRIES {
                    self.checkpointed = commits;
                    self.checkpoint_tries = 0;
                }
            }
            Ok(_) => {
                self.checkpointed = commits;
                self.checkpoint_tries = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL checkpoint failed; trying again after the next commit");
                self.checkpointed = commits;
                self.checkpoint_tries = 0;
            }
        }
        // Until the next commit's hook says otherwise, the bound is met.
        self.wal.frames.store(0, Ordering::Relaxed);
    }
}
