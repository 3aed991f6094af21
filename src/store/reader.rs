//! Read-only queries on a connection of their own, for status, operator commands and
//! benchmarks. In WAL mode they never wait for the writer.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::lookup::lookup;
use super::records::{Record, RecordClass, StoredRecord};
use super::rules;
use super::{StoreError, UseScope, schema};
use crate::access::{DoorId, Freshness, KeyRules};
use crate::bus::message::Settings;

/// A read-only connection to the store.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
}

/// What the live key set is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySetInfo {
    pub version: u64,
    pub generation: i64,
    pub keys: u64,
    /// When the cloud signed the held version (its age is what status and telemetry show).
    pub issued_at: Option<jiff::Timestamp>,
    /// The held set's `stale_after` limits and the knowledge time.
    pub freshness: Freshness,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: schema::open_reader(path)?,
        })
    }

    fn meta_i64(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?)
    }

    fn generation(&self) -> Result<i64, StoreError> {
        Ok(self.meta_i64("active_generation")?.unwrap_or(0))
    }

    /// The live key set's version and size.
    pub fn key_set(&self) -> Result<KeySetInfo, StoreError> {
        let generation = self.generation()?;
        let keys: i64 = self.conn.query_row(
            "SELECT count(*) FROM keys WHERE generation = ?1",
            [generation],
            |r| r.get(0),
        )?;
        Ok(KeySetInfo {
            version: self
                .meta_i64("keyset_version")?
                .map_or(0, |v| u64::try_from(v).unwrap_or(0)),
            generation,
            keys: u64::try_from(keys).unwrap_or(0),
            issued_at: self
                .meta_i64("keyset_issued_at")?
                .and_then(|s| jiff::Timestamp::from_second(s).ok()),
            freshness: super::knowledge::read(&self.conn)?,
        })
    }

    /// The trusted-time mark, in Unix seconds.
    pub fn trusted_time(&self) -> Result<Option<jiff::Timestamp>, StoreError> {
        Ok(self
            .meta_i64("trusted_time")?
            .and_then(|s| jiff::Timestamp::from_second(s).ok()))
    }

    /// One key of the live set by id.
    pub fn key(&self, key_id: &str) -> Result<Option<KeyRules>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT rules FROM keys WHERE generation = ?1 AND key_id = ?2")?
            .query_row(params![self.generation()?, key_id], |r| r.get(0))
            .optional()?;
        blob.map(|b| rules::decode(&b)).transpose()
    }

    /// Keys of the live set in id order, after `after_id` (`""` from the start), at most
    /// `limit`: their rules, never their credentials.
    pub fn keys_page(&self, after_id: &str, limit: u32) -> Result<Vec<KeyRules>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rules FROM keys WHERE generation = ?1 AND key_id > ?2 ORDER BY key_id LIMIT ?3",
        )?;
        let blobs = stmt
            .query_map(params![self.generation()?, after_id, limit], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        blobs.iter().map(|b| rules::decode(b)).collect()
    }

    /// How many credentials of each kind a key of the live set has (kind code, count).
    pub fn credential_counts(&self, key_id: &str) -> Result<Vec<(u8, u32)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT kind, count(*) FROM credentials INDEXED BY credentials_by_key
             WHERE generation = ?1 AND key_id = ?2
             GROUP BY kind ORDER BY kind",
        )?;
        let rows = stmt.query_map(params![self.generation()?, key_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The key a credential digest belongs to, in the live set.
    pub fn key_by_digest(&self, digest: &[u8; 32]) -> Result<Option<KeyRules>, StoreError> {
        lookup(&self.conn, self.generation()?, digest)
    }

    /// The same lookup in a known generation: exactly what the writer does per request.
    pub fn key_by_digest_in(
        &self,
        generation: i64,
        digest: &[u8; 32],
    ) -> Result<Option<KeyRules>, StoreError> {
        lookup(&self.conn, generation, digest)
    }

    /// Uses counted for a key: over all doors first (if any), then at each door by name.
    pub fn uses(&self, key_id: &str) -> Result<Vec<(UseScope, u32)>, StoreError> {
        let mut out: Vec<(UseScope, u32)> = self
            .conn
            .prepare_cached("SELECT count FROM key_uses WHERE key_id = ?1")?
            .query_map([key_id], |r| Ok((UseScope::AllDoors, r.get(0)?)))?
            .collect::<Result<_, _>>()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT door, count FROM door_uses WHERE key_id = ?1 ORDER BY door")?;
        for row in stmt.query_map([key_id], |r| {
            Ok((
                UseScope::Door(DoorId::from(r.get::<_, String>(0)?)),
                r.get(1)?,
            ))
        })? {
            out.push(row?);
        }
        Ok(out)
    }

    /// When this database began numbering outbox records (microseconds since 1970): with the
    /// gateway id and a record's seq, its unique id.
    pub fn outbox_epoch(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta_i64("outbox_epoch")?
            .and_then(|e| u64::try_from(e).ok())
            .unwrap_or(0))
    }

    /// Records waiting in the outbox: those above the watermark (the row of `sent` whose first
    /// is 0), less those in the acknowledged ranges above it (range counts instead of the
    /// view's per-row test).
    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT (SELECT count(*) FROM records
                     WHERE seq > coalesce((SELECT last FROM sent WHERE first = 0), 0))
                  - coalesce((SELECT sum((SELECT count(*) FROM records
                                          WHERE seq BETWEEN s.first AND s.last))
                              FROM sent AS s WHERE s.first > 0), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The stored CBOR bodies of one class's outbox records after `after_seq`, oldest first,
    /// at most `limit`: what the uplink sends, without decoding them.
    pub fn outbox_raw(
        &self,
        class: RecordClass,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        // The class is written into the statement, with the partial index's own condition:
        // only then does SQLite read alarms and telemetry through `records_rare` instead of
        // every waiting decision after the cursor (decisions are read by seq).
        let after = after_seq.max(self.sent_below()? - 1);
        let mut stmt = self.conn.prepare_cached(match class {
            RecordClass::Alarm => concat!(
                "SELECT seq, body FROM records AS r WHERE class = 0 AND class <> 1 AND seq > ?1
                 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
            RecordClass::Activity => concat!(
                "SELECT seq, body FROM records AS r WHERE class = 1 AND seq > ?1 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
            RecordClass::Telemetry => concat!(
                "SELECT seq, body FROM records AS r WHERE class = 2 AND class <> 1 AND seq > ?1
                 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
        })?;
        let rows = stmt.query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// [`Reader::outbox_raw`] with each record's chain link (`store::chain`; None for a row
    /// written before migration 8): what the uplink sends.
    #[allow(clippy::type_complexity)]
    pub fn outbox_chained(
        &self,
        class: RecordClass,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Vec<u8>, Option<[u8; 32]>)>, StoreError> {
        let after = after_seq.max(self.sent_below()? - 1);
        let mut stmt = self.conn.prepare_cached(match class {
            RecordClass::Alarm => concat!(
                "SELECT seq, body, chain FROM records AS r WHERE class = 0 AND class <> 1
                 AND seq > ?1 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
            RecordClass::Activity => concat!(
                "SELECT seq, body, chain FROM records AS r WHERE class = 1 AND seq > ?1 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
            RecordClass::Telemetry => concat!(
                "SELECT seq, body, chain FROM records AS r WHERE class = 2 AND class <> 1
                 AND seq > ?1 AND NOT ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT ?2"
            ),
        })?;
        let rows = stmt.query_map(params![after, limit], |r| {
            let chain: Option<Vec<u8>> = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                chain.and_then(|c| <[u8; 32]>::try_from(c.as_slice()).ok()),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The record chain's head: the newest record's seq and chain link.
    pub fn chain_head(&self) -> Result<Option<(i64, [u8; 32])>, StoreError> {
        Ok(super::chain::head(&self.conn)?)
    }

    /// Outbox records after `after_seq`, oldest first, at most `limit`.
    pub fn outbox(&self, after_seq: i64, limit: u32) -> Result<Vec<StoredRecord>, StoreError> {
        let after = after_seq.max(self.sent_below()? - 1);
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT seq, class, body FROM records AS r WHERE seq > ?1 AND NOT ",
            crate::acked_above!(),
            " ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, class, body) = row?;
            let class = RecordClass::from_code(class)
                .ok_or_else(|| StoreError::Corrupt(format!("outbox {seq}: class {class}")))?;
            let record = Record::from_cbor(&body)
                .map_err(|e| StoreError::Corrupt(format!("outbox {seq}: {e}")))?;
            out.push(StoredRecord { seq, class, record });
        }
        Ok(out)
    }

    /// The door history and the records still waiting, in seq order (`newest_first`
    /// reversed), from after `after_seq` and, when given, created within `[since, until]`
    /// (milliseconds). `visit` gets each record and returns whether to go on. A record that
    /// cannot be decoded is passed as an error and the walk goes on.
    pub fn history(
        &self,
        after_seq: i64,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        newest_first: bool,
        mut visit: impl FnMut(Result<StoredRecord, StoreError>) -> bool,
    ) -> Result<(), StoreError> {
        let sql = if newest_first {
            "SELECT seq, class, body FROM records
             WHERE seq > ?1 AND created_ms >= ?2 AND created_ms <= ?3 ORDER BY seq DESC"
        } else {
            "SELECT seq, class, body FROM records
             WHERE seq > ?1 AND created_ms >= ?2 AND created_ms <= ?3 ORDER BY seq"
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![
            after_seq,
            since_ms.unwrap_or(i64::MIN),
            until_ms.unwrap_or(i64::MAX)
        ])?;
        while let Some(row) = rows.next()? {
            let (seq, class, body): (i64, i64, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let record = match RecordClass::from_code(class) {
                Some(class) => Record::from_cbor(&body)
                    .map(|record| StoredRecord { seq, class, record })
                    .map_err(|e| StoreError::Corrupt(format!("record {seq}: {e}"))),
                None => Err(StoreError::Corrupt(format!("record {seq}: class {class}"))),
            };
            if !visit(record) {
                break;
            }
        }
        Ok(())
    }

    /// Every seq below this was acknowledged (the watermark row of `sent`).
    fn sent_below(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT last + 1 FROM sent WHERE first = 0")?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(1))
    }

    /// The highest seq given so far (0 for none), pruned or not.
    pub fn last_seq(&self) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT max(coalesce((SELECT max(seq) FROM records), 0),
                        coalesce((SELECT value FROM meta WHERE name = 'seq_floor'), 0))",
            [],
            |r| r.get(0),
        )?)
    }

    /// Records kept as history (acknowledged by the cloud), and the oldest one's time.
    pub fn history_size(&self) -> Result<(u64, Option<jiff::Timestamp>), StoreError> {
        let (n, oldest): (i64, Option<i64>) = self.conn.query_row(
            concat!(
                "SELECT (SELECT count(*) FROM records),
                        (SELECT created_ms FROM records AS r WHERE seq < ?1 OR ",
                crate::acked_above!(),
                " ORDER BY seq LIMIT 1)"
            ),
            [self.sent_below()?],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let waiting = i64::try_from(self.outbox_depth()?).unwrap_or(i64::MAX);
        Ok((
            u64::try_from(n - waiting).unwrap_or(0),
            oldest.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()),
        ))
    }

    /// When the oldest record still waiting for upload was made.
    pub fn oldest_waiting(&self) -> Result<Option<jiff::Timestamp>, StoreError> {
        let ms: Option<i64> = self
            .conn
            .query_row(
                concat!(
                    "SELECT created_ms FROM records AS r WHERE seq >= ?1 AND NOT ",
                    crate::acked_above!(),
                    " ORDER BY seq LIMIT 1"
                ),
                [self.sent_below()?],
                |r| r.get(0),
            )
            .optional()?;
        Ok(ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()))
    }

    /// The raw connection, for benchmarks that compare against plain SQL.
    /// Each door's desired and reported unit settings, by door.
    #[allow(clippy::type_complexity)]
    pub fn unit_settings(
        &self,
    ) -> Result<Vec<(String, Option<Settings>, Option<Settings>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT door, desired, reported FROM unit_settings ORDER BY door")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?;
        let decode = |b: Option<Vec<u8>>| -> Result<Option<Settings>, StoreError> {
            b.map(|b| {
                super::records::decode_row(&b)
                    .map_err(|e| StoreError::Corrupt(format!("unit settings: {e}")))
            })
            .transpose()
        };
        let mut out = Vec::new();
        for row in rows {
            let (door, desired, reported) = row?;
            out.push((door, decode(desired)?, decode(reported)?));
        }
        Ok(out)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}
