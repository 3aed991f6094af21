//! The outbox and the door history in the writer: records appended in the open transaction,
//! acknowledged runs marked sent (`sent`, its watermark row), the history pruned by age and
//! count, and the outbox bounded when it holds too much.

use std::sync::atomic::Ordering;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::super::records::{Record, RecordClass};
use super::{PRUNE_CHUNK, PRUNE_EVERY, Writer};

impl Writer {
    /// Marks the acknowledged `seqs` sent: merged into the ranges of `sent`. Returns how many
    /// were waiting (an acknowledgement repeated finds none).
    pub(super) fn mark_sent(&mut self, seqs: &[i64]) -> Result<usize, rusqlite::Error> {
        let mut n = 0;
        for (first, last) in runs(seqs) {
            // What of the run still waits (the `outbox` view's rule, with the bounds known).
            let (count, bytes): (i64, i64) = self
                .conn
                .prepare_cached(concat!(
                    "SELECT count(*), coalesce(sum(length(body)), 0) FROM records AS r
                         WHERE seq >= ?1 AND seq <= ?2 AND NOT ",
                    crate::acked_above!()
                ))?
                .query_row([first.max(self.sent_below), last], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            if count == 0 {
                continue;
            }
            n += usize::try_from(count).unwrap_or(0);
            self.outbox_delta.0 -= count;
            self.outbox_delta.1 -= bytes;
            if self.outage.is_some() {
                // The disk or `storage.max_size` refuses writes: the acknowledged rows are
                // deleted instead of kept as history, so the records held in memory get their
                // pages. The highest seq deleted stays the floor of the next one given.
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES ('seq_floor',
                         max(coalesce((SELECT value FROM meta WHERE name = 'seq_floor'), 0), ?1))",
                    )?
                    .execute([last])?;
                self.conn
                    .prepare_cached("DELETE FROM records WHERE seq BETWEEN ?1 AND ?2")?
                    .execute([first, last])?;
                continue;
            }
            let (mut lo, mut hi) = (first, last);
            // The range this one continues or overlaps, if any, and those it reaches into.
            if let Some((f, l)) = self
                .conn
                .prepare_cached(
                    "SELECT first, last FROM sent WHERE first > 0 AND first <= ?1
                     ORDER BY first DESC LIMIT 1",
                )?
                .query_row([lo], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .optional()?
                && l >= lo - 1
            {
                lo = f;
                hi = hi.max(l);
            }
            let swallowed: Option<i64> = self
                .conn
                .prepare_cached("SELECT max(last) FROM sent WHERE first > ?1 AND first <= ?2 + 1")?
                .query_row([lo, hi], |r| r.get(0))?;
            hi = hi.max(swallowed.unwrap_or(hi));
            self.conn
                .prepare_cached("DELETE FROM sent WHERE first > ?1 AND first <= ?2")?
                .execute([lo, hi])?;
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO sent (first, last) VALUES (?1, ?2)")?
                .execute([lo, hi])?;
        }
        Ok(n)
    }

    /// Moves the watermark past the ranges of `sent` that no waiting record precedes.
    pub(super) fn fold_sent(&mut self) -> Result<(), rusqlite::Error> {
        let mut below = self.sent_below;
        loop {
            let Some((first, last)) = self
                .conn
                .prepare_cached(
                    "SELECT first, last FROM sent WHERE first > 0 ORDER BY first LIMIT 1",
                )?
                .query_row([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .optional()?
            else {
                break;
            };
            if first > below {
                // Rows between are waiting (or were dropped, and are gone).
                let waiting: bool = self
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM records WHERE seq >= ?1 AND seq < ?2)",
                    )?
                    .query_row([below, first], |r| r.get(0))?;
                if waiting {
                    break;
                }
            }
            below = below.max(last + 1);
            self.conn
                .prepare_cached("DELETE FROM sent WHERE first = ?1")?
                .execute([first])?;
        }
        if below != self.sent_below {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO sent (first, last) VALUES (0, ?1)")?
                .execute([below - 1])?;
            self.sent_below = below;
        }
        Ok(())
    }

    /// Deletes acknowledged history beyond `storage.history_days` and
    /// `storage.history_max_records`, oldest first, in transactions of [`PRUNE_CHUNK`] rows
    /// that need not survive a power cut (a prune lost is done again). With `for_space`, the
    /// oldest tenth of the history goes too, whatever its age: the database is at
    /// `storage.max_size` or the disk is full, and fresh records come before old history.
    /// Returns how many records were deleted. Records not yet acknowledged are never pruned.
    pub(super) fn prune_history(
        &mut self,
        now: Timestamp,
        for_space: bool,
    ) -> Result<u64, rusqlite::Error> {
        let (rows, oldest, newest): (i64, Option<i64>, Option<i64>) = self.conn.query_row(
            "SELECT count(*), min(seq), max(seq) FROM records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (Some(oldest), Some(newest)) = (oldest, newest) else {
            return Ok(0);
        };
        // Acknowledged records, the history (the outbox count is kept by every commit).
        let kept = rows - self.outbox_count;
        if kept <= 0 {
            return Ok(0);
        }
        // Acknowledged records below `cut` are deleted.
        let mut cut = oldest;
        if let Some(days) = self.history.days {
            let cutoff = now
                .checked_sub(jiff::SignedDuration::from_hours(24 * i64::from(days)))
                .unwrap_or(Timestamp::MIN)
                .as_millisecond();
            // Records are in time order but for clock steps: the first young one ends the cut.
            let young: Option<i64> = self
                .conn
                .query_row(
                    "SELECT seq FROM records WHERE created_ms >= ?1 ORDER BY seq LIMIT 1",
                    [cutoff],
                    |r| r.get(0),
                )
                .optional()?;
            cut = cut.max(young.unwrap_or(newest + 1));
        }
        let mut over = self
            .history
            .max_records
            .map_or(0, |m| kept - i64::try_from(m).unwrap_or(i64::MAX));
        if for_space {
            over = over.max(kept / 10).max(1);
        }
        if over > 0 {
            let nth: Option<i64> = self
                .conn
                .query_row(
                    concat!(
                        "SELECT seq FROM records AS r WHERE (seq < ?1 OR ",
                        crate::acked_above!(),
                        ") ORDER BY seq LIMIT 1 OFFSET ?2"
                    ),
                    [self.sent_below, over],
                    |r| r.get(0),
                )
                .optional()?;
            cut = cut.max(nth.unwrap_or(newest + 1));
        }
        let mut deleted = 0u64;
        let mut from = oldest;
        while from < cut {
            let to = cut.min(from.saturating_add(PRUNE_CHUNK));
            self.relax()?;
            let chunk = self
                .conn
                .execute_batch("BEGIN IMMEDIATE")
                .and_then(|()| {
                    // The highest seq deleted stays the floor of the next one given.
                    self.conn.execute(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES ('seq_floor',
                         max(coalesce((SELECT value FROM meta WHERE name = 'seq_floor'), 0), ?1))",
                        [to - 1],
                    )?;
                    self.conn.execute(
                        concat!(
                            "DELETE FROM records AS r WHERE seq >= ?1 AND seq < ?2
                             AND (seq < ?3 OR ",
                            crate::acked_above!(),
                            ")"
                        ),
                        [from, to, self.sent_below],
                    )
                })
                .and_then(|n| self.conn.execute_batch("COMMIT").map(|()| n));
            self.restore_durable();
            match chunk {
                Ok(n) => deleted += n as u64,
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
            from = to;
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                for_space,
                "door history pruned (acknowledged records past storage.history_days or \
                 storage.history_max_records)"
            );
        }
        Ok(deleted)
    }

    /// Records in the table, history and outbox together (0 when it cannot be read).
    pub(super) fn records_held(&self) -> i64 {
        self.conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// Prunes the history when [`PRUNE_EVERY`] has passed (called while idle).
    pub(super) fn prune_if_due(&mut self) {
        if self.pruned_at.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.pruned_at = Some(std::time::Instant::now());
        if let Err(e) = self.prune_history(Timestamp::now(), false) {
            tracing::warn!(error = %e, "pruning the door history failed; trying again in an hour");
        }
    }

    /// Keeps the outbox within its configured records and bytes, inside the commit that
    /// would overflow it: routine telemetry goes first, then the oldest routine activity, never
    /// an alarm; it drops down to 90 % of the limits so that losses come in rare bursts, each
    /// recorded as one `outbox_dropped` alarm.
    pub(super) fn bound_outbox(&mut self) -> Result<(), rusqlite::Error> {
        let (max_records, max_bytes) = self.outbox_limits;
        let count = |w: &Writer| w.outbox_count + w.outbox_delta.0;
        let bytes = |w: &Writer| w.outbox_bytes + w.outbox_delta.1;
        let over = |w: &Writer, share: i64| {
            max_records.is_some_and(|m| count(w) * 10 > m * share)
                || max_bytes.is_some_and(|m| bytes(w) * 10 > m * share)
        };
        if !over(self, 10) {
            return Ok(());
        }
        let mut dropped = [0u64; 2];
        for (slot, class) in [(0, RecordClass::Telemetry), (1, RecordClass::Activity)] {
            if !over(self, 9) {
                break;
            }
            // Oldest first, exactly as many as it takes to get under 90 %: one scan, then one
            // range delete.
            let (mut n, mut last) = (0u64, None);
            {
                let mut scan = self.conn.prepare_cached(concat!(
                    "SELECT seq, length(body) FROM records AS r
                         WHERE class = ?1 AND seq >= ?2 AND NOT ",
                    crate::acked_above!(),
                    " ORDER BY seq"
                ))?;
                // (`outbox` is the view of the records not yet acknowledged.)
                let mut rows = scan.query([class.code(), self.sent_below])?;
                while let Some(row) = rows.next()? {
                    n += 1;
                    last = Some(row.get::<_, i64>(0)?);
                    self.outbox_delta.0 -= 1;
                    self.outbox_delta.1 -= row.get::<_, i64>(1)?;
                    if !over(self, 9) {
                        break;
                    }
                }
            }
            if let Some(last) = last {
                self.conn
                    .prepare_cached(concat!(
                        "DELETE FROM records AS r
                             WHERE class = ?1 AND seq >= ?3 AND seq <= ?2 AND NOT ",
                        crate::acked_above!()
                    ))?
                    .execute(params![class.code(), last, self.sent_below])?;
                dropped[slot] = n;
            }
        }
        if dropped != [0, 0] {
            tracing::warn!(
                telemetry = dropped[0],
                activity = dropped[1],
                "outbox full: oldest routine records dropped (alarms kept)"
            );
            self.insert(Record::OutboxDropped {
                at: Timestamp::now(),
                telemetry: dropped[0],
                activity: dropped[1],
            })?;
            self.health
                .dropped
                .fetch_add(dropped[0] + dropped[1], Ordering::Relaxed);
        }
        Ok(())
    }

    /// Appends a record to the outbox in the open transaction; returns its seq.
    /// Counts a record committed in a transaction of its own kind (a key-set commit).
    pub(super) fn fresh_record(&mut self, committed: Option<(i64, i64, Record)>) {
        if let Some((seq, len, record)) = committed {
            self.outbox_delta.0 += 1;
            self.outbox_delta.1 += len;
            self.fresh.push((seq, record));
        }
    }

    pub(super) fn insert(&mut self, record: Record) -> Result<i64, rusqlite::Error> {
        self.insert_with(record, None)
    }

    /// [`Writer::insert`] with a kept answer in the row.
    pub(super) fn insert_with(
        &mut self,
        record: Record,
        answer: Option<&[u8]>,
    ) -> Result<i64, rusqlite::Error> {
        let (seq, len) = insert_record(&self.conn, &record, answer)?;
        self.outbox_delta.0 += 1;
        self.outbox_delta.1 += len;
        self.fresh.push((seq, record));
        Ok(seq)
    }
}

/// Appends a record with its chain link (`chain::insert`); returns its seq and body size.
pub(super) fn insert_record(
    conn: &Connection,
    record: &Record,
    answer: Option<&[u8]>,
) -> Result<(i64, i64), rusqlite::Error> {
    let body = record.to_cbor();
    let len = i64::try_from(body.len()).unwrap_or(i64::MAX);
    let seq = super::super::chain::insert(
        conn,
        record.class().code(),
        record.at().as_millisecond(),
        &body,
        answer,
    )?;
    Ok((seq, len))
}

/// The runs of consecutive values in `seqs` (in any order, duplicates allowed), as
/// `(first, last)` pairs, ascending.
pub(super) fn runs(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some((_, last)) if s == *last + 1 => *last = s,
            _ => out.push((s, s)),
        }
    }
    out
}
