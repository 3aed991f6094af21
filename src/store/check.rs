//! The idle integrity check: `PRAGMA integrity_check` (every page, every b-tree and every index
//! entry against its table, which start-up's `quick_check` skips) on a read-only connection of
//! its own, so the writer and the doors never wait for it.
//!
//! It runs every `integrity_every` (a day by default), and only once the store has been idle
//! (no commit) for a while: never in a burst of decisions. When it finds damage it leaves the
//! marker `{db}.damaged`, logs an alarm and signals [`Health::damage_found`]: the daemon then
//! closes and opens the store again, which runs the full check, moves the damaged file aside,
//! salvages the unsent records and use counters into a fresh database, records a
//! `database_replaced` alarm, and the cloud's next snapshot refills the keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use super::{Health, StoreError, schema};

/// Stops the check's thread when dropped (with the last handle of the store).
#[derive(Debug)]
pub(super) struct Checker {
    _stop: mpsc::Sender<()>,
}

/// How long the store must have made no commit before the check starts.
fn idle_for(every: Duration) -> Duration {
    (every / 10).min(Duration::from_secs(10))
}

pub(super) fn start(
    path: Arc<PathBuf>,
    health: Arc<Health>,
    every: Duration,
) -> Result<Checker, StoreError> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("store-check".into())
        .spawn(move || run(&path, &health, every, &stopped))
        .map_err(|e| StoreError::Io {
            what: "starting the store's integrity check thread",
            source: e,
        })?;
    Ok(Checker { _stop: stop })
}

/// Sleeps `d`; false when the store is gone.
fn sleep(stopped: &mpsc::Receiver<()>, d: Duration) -> bool {
    matches!(stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

fn run(path: &std::path::Path, health: &Health, every: Duration, stopped: &mpsc::Receiver<()>) {
    let idle = idle_for(every);
    loop {
        if !sleep(stopped, every) {
            return;
        }
        // Wait for a quiet spell: no commit for `idle`.
        loop {
            let before = health.commits.load(Ordering::Relaxed);
            if !sleep(stopped, idle) {
                return;
            }
            if health.commits.load(Ordering::Relaxed) == before {
                break;
            }
        }
        let verdict = schema::open_reader(path)
            .map_err(|e| e.to_string())
            .and_then(|conn| schema::check(&conn, "integrity_check"));
        match verdict {
            Ok(()) => tracing::debug!(path = %path.display(), "integrity check: ok"),
            Err(problem) => {
                tracing::error!(path = %path.display(), %problem,
                    "ALARM: the integrity check found the database damaged; it is replaced, keeping unsent records and use counts");
                let _ = std::fs::write(schema::damage_marker(path), &problem);
                if let Ok(mut d) = health.damaged.lock() {
                    *d = Some(problem);
                }
                health.damage_found.notify_one();
                return;
            }
        }
    }
}
