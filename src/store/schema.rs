//! The database file: schema migrations, connection settings, the start-up integrity check and
//! moving a corrupt file aside.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.
/// Never edit one that has shipped: add a new one.
pub const MIGRATIONS: &[&str] = &[
    // 1: key sets by generation, use counters, the outbox, named settings.
    "
    -- Named values: active_generation, keyset_version, credential_salt, trusted_time.
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value ANY NOT NULL
    ) STRICT, WITHOUT ROWID;

    -- Each snapshot is written under a new generation while the old one keeps answering;
    -- switching meta.active_generation makes it live in one small transaction.
    CREATE TABLE keys (
        generation INTEGER NOT NULL,
        key_id     TEXT NOT NULL,
        rules      BLOB NOT NULL,          -- CBOR of access::KeyRules
        PRIMARY KEY (generation, key_id)
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE credentials (
        generation INTEGER NOT NULL,
        digest     BLOB NOT NULL,          -- access::credential::digest, 32 bytes
        kind       INTEGER NOT NULL,       -- CredentialKind::code
        key_id     TEXT NOT NULL,
        PRIMARY KEY (generation, digest)
    ) STRICT, WITHOUT ROWID;

    -- Uses survive snapshots: a used single-use key stays used when the cloud resends it.
    CREATE TABLE uses (
        key_id TEXT NOT NULL,
        door   TEXT NOT NULL,              -- '' counts all doors
        count  INTEGER NOT NULL,
        PRIMARY KEY (key_id, door)
    ) STRICT, WITHOUT ROWID;

    -- Records waiting for the cloud. seq is never reused (AUTOINCREMENT), so
    -- gateway id + epoch (meta, migration 4) + seq is a stable id for the cloud.
    CREATE TABLE outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        class      INTEGER NOT NULL,       -- RecordClass: 0 alarm, 1 activity, 2 telemetry
        created_ms INTEGER NOT NULL,
        body       BLOB NOT NULL           -- CBOR of store::Record
    ) STRICT;
    CREATE INDEX outbox_by_class ON outbox (class, seq);
    ",
    // 2: deltas replace one key's credentials, found by key id.
    "
    CREATE INDEX credentials_by_key ON credentials (generation, key_id);
    ",
    // 3: door-unit settings from the cloud (desired) and as the unit applied them (reported).
    "
    CREATE TABLE unit_settings (
        door     TEXT PRIMARY KEY,
        desired  BLOB,                     -- CBOR of bus::message::Settings, or NULL
        reported BLOB                      -- CBOR of bus::message::Settings, or NULL
    ) STRICT;
    ",
    // 4: the outbox epoch: when this database began numbering records, in microseconds since
    // 1970. A replaced or re-created database starts seq at 1 again; (gateway, epoch, seq)
    // stays unique, so the cloud does not take new records for duplicates of old ones.
    "
    INSERT OR IGNORE INTO meta (name, value)
    VALUES ('outbox_epoch', CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER));
    ",
    // 5: each credential row carries its key's rules (store::rules), so a lookup is one
    // descent instead of two. Rows written before stay NULL, and the lookup reads `keys` for
    // them until the next snapshot replaces them (no rewrite of a million rows at start-up).
    "
    ALTER TABLE credentials ADD COLUMN rules BLOB;
    ",
    // 6: the last answer given to each door unit, written with the decision: a retransmission
    // that arrives after a restart or power cut is answered the same, not judged again (a
    // single-use key the unit's grant was lost for is not spent twice). One row per unit.
    "
    CREATE TABLE answers (
        unit        TEXT PRIMARY KEY,
        request_id  INTEGER NOT NULL,
        fingerprint BLOB NOT NULL,
        boot_id     INTEGER,
        at_ms       INTEGER NOT NULL,
        verdict     BLOB NOT NULL          -- CBOR of store::writer::KeptAnswer
    ) STRICT, WITHOUT ROWID;
    ",
    // 7: records are kept after upload, as the door history (pruned in bulk by age and count),
    // and a decision's commit writes one table page instead of four (docs/storage.md, "What a
    // decision writes"): no AUTOINCREMENT (its `sqlite_sequence` row was a page per commit;
    // `meta.seq_floor` keeps seq from being reused instead), an index by class for alarms and
    // telemetry only (the uplink reads decisions after its cursor), the kept answer in the decision's own row instead of `answers`,
    // and an upload acknowledgement marks ranges in `sent` instead of deleting rows.
    // `outbox` becomes the view of the records not yet acknowledged.
    "
    CREATE TABLE records (
        seq        INTEGER PRIMARY KEY,    -- never reused: max(seq, meta.seq_floor) + 1
        class      INTEGER NOT NULL,       -- RecordClass: 0 alarm, 1 activity, 2 telemetry
        created_ms INTEGER NOT NULL,
        body       BLOB NOT NULL,          -- CBOR of store::Record
        answer     BLOB                    -- decisions: CBOR of writer::KeptOnDisk (retransmissions)
    ) STRICT;
    INSERT INTO records (seq, class, created_ms, body)
        SELECT seq, class, created_ms, body FROM outbox;
    -- Alarms and telemetry by class, for the uplink's per-class reads; decisions (activity,
    -- class 1), the records written most, are left out so that their commits stay one page.
    CREATE INDEX records_rare ON records (class, seq) WHERE class <> 1;
    -- Acknowledged runs of seq. The row whose first is 0 is the watermark: every seq up to its
    -- last is acknowledged; an acknowledgement usually moves only it (one page per commit).
    CREATE TABLE sent (
        first INTEGER PRIMARY KEY,
        last  INTEGER NOT NULL
    ) STRICT;
    INSERT OR REPLACE INTO meta (name, value) VALUES ('seq_floor',
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0));
    INSERT INTO sent (first, last) VALUES (0,
        coalesce((SELECT min(seq) FROM outbox),
                 (SELECT seq + 1 FROM sqlite_sequence WHERE name = 'outbox'), 1) - 1);
    DROP TABLE outbox;
    DROP TABLE answers;
    CREATE VIEW outbox AS
        SELECT seq, class, created_ms, body FROM records AS r
        -- Not in the acknowledged range that starts nearest below it (one seek).
        WHERE coalesce((SELECT last FROM sent WHERE first <= r.seq
                        ORDER BY first DESC LIMIT 1), 0) < r.seq;
    ",
    // 8: delegations (docs/cloud-protocol.md §5.3): keys the root key lets sign deltas for some
    // doors. A revoked one stays as a tombstone (no key, revoked = 1) so that a replay of the
    // delegation cannot bring it back.
    "
    CREATE TABLE delegations (
        id         TEXT PRIMARY KEY,
        public_key BLOB,                   -- 32 bytes; NULL once revoked
        doors      TEXT NOT NULL,          -- door ids, newline-separated
        not_after  INTEGER NOT NULL,       -- seconds since 1970
        issued_at  INTEGER NOT NULL,       -- seconds since 1970: the newest wins
        revoked    INTEGER NOT NULL DEFAULT 0
    ) STRICT, WITHOUT ROWID;
    ",
    // 9: the tamper-evident record chain (store::chain, docs/cloud-protocol.md "Record
    // chain"): each row carries SHA-256(previous chain || seq || body), 32 bytes on the page
    // the record writes anyway. Rows written before stay NULL and the chain starts after
    // them. When the newest record is deleted (pruning, a full disk), `meta.chain_floor`
    // keeps its seq and chain so that the next record still links to it.
    "
    ALTER TABLE records ADD COLUMN chain BLOB;
    CREATE TRIGGER records_chain_floor AFTER DELETE ON records
    WHEN old.chain IS NOT NULL
         AND old.seq > coalesce((SELECT max(seq) FROM records), 0)
         AND old.seq > coalesce((SELECT value FROM meta WHERE name = 'chain_floor_seq'), 0)
    BEGIN
        INSERT OR REPLACE INTO meta (name, value) VALUES ('chain_floor_seq', old.seq);
        INSERT OR REPLACE INTO meta (name, value) VALUES ('chain_floor', old.chain);
    END;
    ",
    // 10: use counters without a sentinel: a key's uses over all doors (`key_uses`, for a
    // `total` limit) and at each door (`door_uses`, for `per_door`), where `uses` kept both
    // with `door = ''` standing for every door.
    "
    CREATE TABLE key_uses (
        key_id TEXT PRIMARY KEY,
        count  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE door_uses (
        key_id TEXT NOT NULL,
        door   TEXT NOT NULL,
        count  INTEGER NOT NULL,
        PRIMARY KEY (key_id, door)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO key_uses (key_id, count) SELECT key_id, count FROM uses WHERE door = '';
    INSERT INTO door_uses (key_id, door, count) SELECT key_id, door, count FROM uses WHERE door <> '';
    DROP TABLE uses;
    ",
];

/// SQL: whether the record `r` was acknowledged: it lies in the range of `sent` that starts
/// nearest below it (one seek; the watermark row `(0, last)` covers everything up to `last`).
/// The code states the `outbox` view's rule with a lower bound on `seq` as a parameter
/// instead of reading the view, so that SQLite walks the rows from that bound.
#[macro_export]
#[doc(hidden)]
macro_rules! acked_above {
    () => {
        "coalesce((SELECT last FROM sent WHERE first <= r.seq ORDER BY first DESC LIMIT 1), 0) >= r.seq"
    };
}

/// The page size of a database this build creates. Every commit appends its pages to the WAL
/// as frames of 24 + page-size bytes, which straddle the file system's 4 KiB blocks: a
/// decision's one-page commit dirties 1.3 blocks at 1 KiB pages against 2.1 at 4 KiB (P9 in
/// docs/performance.md). A file keeps the page size it was created with.
pub const PAGE_SIZE: u32 = 1024;

/// The schema version this build writes.
pub fn latest_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// Runs the migrations the file has not seen yet, each in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > latest_version() {
        return Err(StoreError::TooNew {
            found: current,
            supported: latest_version(),
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

/// Opens the writer's connection: WAL, and `synchronous=FULL` so a commit that returned is on
/// the disk even after a power cut. SQLite's auto-checkpoint is off: it would copy the WAL
/// into the database file inside whichever commit passes 1,000 pages, a decision's included;
/// the writer checkpoints while idle instead (`writer::Writer::checkpoint`).
pub fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Another connection (an operator command, a restore tool) may hold the write lock for a
    // moment; wait for it rather than mistake it for a disk that refuses writes.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Only takes on a file that has no page yet (a new database); before WAL mode, which
    // fixes it.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // Keep temporary b-trees (sorts of large snapshots) off the SD card.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Opens a read-only connection; in WAL mode it never waits for the writer.
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The result of the start-up check.
#[derive(Debug, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The file was corrupt (`problem`) and has been moved to `to`; a fresh database is to be
    /// created.
    MovedAside {
        to: PathBuf,
        problem: String,
    },
}

/// The marker the idle integrity check leaves when it finds the file damaged: the next open
/// runs the full check (`PRAGMA integrity_check`) instead of the quick one, and moves the file
/// aside when it fails.
pub fn damage_marker(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".damaged");
    PathBuf::from(name)
}

/// Checks the file with `PRAGMA quick_check` (the b-tree structure and every page, without the
/// slower cross-checks of every index entry, so it stays seconds on a Pi even with a million
/// keys). A file SQLite cannot read, or that fails the check, is moved aside together with its
/// WAL, and the caller starts fresh: the cloud's next snapshot refills the keys.
pub fn check_or_move_aside(path: &Path, now_label: &str) -> Result<Health, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Health::Ok),
        Err(e) => {
            return Err(StoreError::Io {
                what: "reading the database file's metadata",
                source: e,
            });
        }
    };
    if !meta.is_file() {
        // Never move a directory or device aside: that is a configuration mistake.
        return Err(StoreError::Io {
            what: "the database path is not a regular file",
            source: std::io::Error::other(path.display().to_string()),
        });
    }
    let marker = damage_marker(path);
    let full = marker.exists();
    let verdict = match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE) {
        Ok(conn) if full => check(&conn, "integrity_check"),
        Ok(conn) => check(&conn, "quick_check"),
        // Only SQLite's own verdict of corruption moves a file aside; a permission problem or
        // a full disk is an error to fix, not a reason to discard the keys and counters.
        Err(e) if is_corruption(&e) => Err(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    let _ = std::fs::remove_file(&marker);
    let Err(problem) = verdict else {
        return Ok(Health::Ok);
    };
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{now_label}"));
    let aside = PathBuf::from(aside);
    tracing::error!(
        path = %path.display(),
        moved_to = %aside.display(),
        %problem,
        "DATABASE IS CORRUPT: moved aside, starting with an empty one; keys return with the next cloud sync"
    );
    std::fs::rename(path, &aside).map_err(|e| StoreError::Io {
        what: "moving the corrupt database aside",
        source: e,
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut to = aside.as_os_str().to_owned();
            to.push(suffix);
            let _ = std::fs::rename(&side, PathBuf::from(to));
        }
    }
    Ok(Health::MovedAside { to: aside, problem })
}

/// What could be read back from a database moved aside.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// Outbox records not yet uploaded, copied with their class, time and body.
    pub records: u64,
    /// Use counters, so a limited key is not honoured again after the recovery.
    pub uses: u64,
}

/// Copies what matters and cannot come back from the cloud out of the damaged file at `from`
/// into the fresh database `to`: unsent outbox records (new seqs, under the new database's
/// epoch, so never taken for duplicates) and use counters. Reading stops at the first error
/// of each table (a damaged page), keeping what was read.
pub fn salvage(from: &Path, to: &mut Connection) -> Result<Salvaged, StoreError> {
    let old = match Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, path = %from.display(), "nothing could be salvaged from the damaged database");
            return Ok(Salvaged::default());
        }
    };
    let records: Vec<(i64, i64, Vec<u8>)> = read_all(
        &old,
        "SELECT class, created_ms, body FROM outbox ORDER BY seq",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    );
    // A file from before migration 10 has `uses`, with `door = ''` for every door.
    // Each table on its own, so a damaged page in one does not cost the others.
    let uses: Vec<(String, Option<String>, i64)> = [
        "SELECT key_id, NULL, count FROM key_uses",
        "SELECT key_id, door, count FROM door_uses",
        "SELECT key_id, nullif(door, ''), count FROM uses",
    ]
    .into_iter()
    .flat_map(|sql| read_all(&old, sql, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
    .collect();
    let tx = to.transaction()?;
    {
        for (class, created, body) in &records {
            super::chain::insert(&tx, *class, *created, body, None)?;
        }
        let mut total = tx.prepare(
            "INSERT INTO key_uses (key_id, count) VALUES (?1, ?2)
             ON CONFLICT (key_id) DO UPDATE SET count = max(count, excluded.count)",
        )?;
        let mut at_door = tx.prepare(
            "INSERT INTO door_uses (key_id, door, count) VALUES (?1, ?2, ?3)
             ON CONFLICT (key_id, door) DO UPDATE SET count = max(count, excluded.count)",
        )?;
        for (key, door, n) in &uses {
            match door {
                None => total.execute(rusqlite::params![key, n])?,
                Some(door) => at_door.execute(rusqlite::params![key, door, n])?,
            };
        }
    }
    tx.commit()?;
    Ok(Salvaged {
        records: records.len() as u64,
        uses: uses.len() as u64,
    })
}

/// The rows of `sql` up to the first that cannot be read.
fn read_all<T>(
    conn: &Connection,
    sql: &str,
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let Ok(mut stmt) = conn.prepare(sql) else {
        return out;
    };
    let Ok(mut rows) = stmt.query([]) else {
        return out;
    };
    loop {
        match rows.next() {
            Ok(Some(r)) => match row(r) {
                Ok(v) => out.push(v),
                Err(_) => break,
            },
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "salvage stopped at a damaged page; keeping what was read");
                break;
            }
        }
    }
    out
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// `PRAGMA quick_check` or `PRAGMA integrity_check`: `Ok` or what it found.
pub fn check(conn: &Connection, pragma: &str) -> Result<(), String> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA {pragma}"))
        .map_err(|e| e.to_string())?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(|e| e.to_string())?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(rows.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file at schema `version`, with `sql` run in it.
    fn at_version(path: &Path, version: usize, sql: &str) {
        let conn = Connection::open(path).unwrap();
        for m in MIGRATIONS.iter().take(version) {
            conn.execute_batch(m).unwrap();
        }
        conn.execute_batch(sql).unwrap();
    }

    fn uses(conn: &Connection) -> Vec<(String, Option<String>, i64)> {
        let mut out = read_all(conn, "SELECT key_id, NULL, count FROM key_uses", |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        });
        out.extend(read_all(
            conn,
            "SELECT key_id, door, count FROM door_uses ORDER BY door",
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        ));
        out
    }

    #[test]
    fn use_counters_are_salvaged_from_a_file_of_either_layout() {
        let dir = tempfile::tempdir().unwrap();
        let before = dir.path().join("v9");
        at_version(
            &before,
            9,
            "INSERT INTO uses (key_id, door, count) VALUES ('k', '', 2), ('k', 'main', 2)",
        );
        let after = dir.path().join("v10");
        at_version(
            &after,
            MIGRATIONS.len(),
            "INSERT INTO key_uses (key_id, count) VALUES ('k', 3);
             INSERT INTO door_uses (key_id, door, count) VALUES ('k', 'main', 3)",
        );
        let expected = |n| {
            vec![
                ("k".to_owned(), None, n),
                ("k".to_owned(), Some("main".to_owned()), n),
            ]
        };
        for (from, n) in [(&before, 2), (&after, 3)] {
            let mut fresh = Connection::open_in_memory().unwrap();
            migrate(&mut fresh).unwrap();
            let salvaged = salvage(from, &mut fresh).unwrap();
            assert_eq!(salvaged.uses, 2, "{}", from.display());
            assert_eq!(uses(&fresh), expected(n), "{}", from.display());
        }
    }
}
