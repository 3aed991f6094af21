//! The writer's transactions of their own, in order with the decisions: a key set's
//! lifecycle (begin, stage in chunks with `synchronous=NORMAL`, commit with a durable switch,
//! removal of the old generation while idle), deltas, heartbeats, delegations, and the unit
//! settings desired and reported.

use jiff::Timestamp;
use rusqlite::{CachedStatement, Connection, OptionalExtension, params};

use super::super::records::{Record, decode_row};
use super::super::{
    DeltaApplied, DeltaChange, KeySetHeader, KeySetRefusal, Step, StoreError, Vouched, delegation,
    knowledge, lookup, memory, rules,
};
use super::outbox::insert_record;
use super::{GC_CHUNK, Staging, Writer, mark_ignored, signed_mark};
use crate::access::{CredentialKind, Freshness, Key, KeyId};
use crate::bus::message::Settings;

impl Writer {
    pub(super) fn key_set_step(&mut self, command: Step) {
        match command {
            Step::BeginKeySet(header, reply) => {
                let _ = reply.send(self.begin(header));
            }
            Step::StageKeys(generation, keys, reply) => {
                let result = self.stage(generation, &keys);
                // A stale chunk for another generation leaves the current install alone.
                if result.is_err()
                    && self
                        .staging
                        .as_ref()
                        .is_some_and(|s| s.generation == generation)
                {
                    self.abandon_staging();
                }
                let _ = reply.send(result);
            }
            Step::CommitKeySet(generation, expected, reply) => {
                let result = self.commit_key_set(generation, expected);
                if result.is_err()
                    && !self.garbage.contains(&generation)
                    && generation != self.active_generation
                    && self
                        .staging
                        .as_ref()
                        .is_none_or(|s| s.generation != generation)
                {
                    // A switch that failed: its rows are never live, remove them.
                    self.garbage.push(generation);
                }
                let _ = reply.send(result);
            }
            Step::ApplyDelta(delta, reply) => {
                let _ = reply.send(self.apply_delta(&delta));
            }
            Step::Heartbeat(version, at, reply) => {
                let _ = reply.send(self.heartbeat(version, at));
            }
            Step::PutDelegation(d, reply) => {
                let result = self.durable().map_err(StoreError::from);
                let _ = reply.send(result.and_then(|()| delegation::put(&self.conn, &d)));
            }
            Step::RevokeDelegation(id, reply) => {
                let result = self.durable().map_err(StoreError::from);
                let _ = reply.send(result.and_then(|()| delegation::revoke(&self.conn, &id)));
            }
            Step::Delegations(reply) => {
                let _ = reply.send(delegation::held(&self.conn));
            }
            Step::DesireSettings(door, settings, reply) => {
                let result = self.durable().map_err(StoreError::from);
                let _ =
                    reply.send(result.and_then(|()| desire_settings(&self.conn, &door, settings)));
            }
            Step::ReportSettings(door, settings, reply) => {
                let result = self.durable().map_err(StoreError::from);
                let _ =
                    reply.send(result.and_then(|()| report_settings(&self.conn, &door, &settings)));
            }
        }
    }

    pub(super) fn apply_delta(&mut self, d: &DeltaChange) -> Result<DeltaApplied, StoreError> {
        self.durable()?;
        if self.keyset_version == 0 || d.from_version != self.keyset_version {
            return Err(KeySetRefusal::DeltaBase {
                from: d.from_version,
                held: self.keyset_version,
            }
            .into());
        }
        if d.version <= d.from_version {
            return Err(KeySetRefusal::DeltaNotNewer {
                version: d.version,
                from: d.from_version,
            }
            .into());
        }
        let version =
            i64::try_from(d.version).map_err(|_| KeySetRefusal::VersionOutOfRange(d.version))?;
        let generation = self.active_generation;
        let mut applied = DeltaApplied::default();
        // Counted as the delta goes (a full count would read a million-key set per delta).
        let mut pins = self.active_pins;
        let mut mark = self.mark;
        let mut ignored = None;
        if let Some(at) = d.issued_at {
            match signed_mark(at, Timestamp::now(), mark) {
                Ok(raised) => mark = Some(raised),
                Err(limit) => ignored = Some(mark_ignored(at, limit)),
            }
        }
        let believed = d.issued_at.filter(|_| ignored.is_none());
        let freshness = knowledge::after(self.freshness, believed, d.stale_after);
        // Dropped (rolled back) on any error, so a delta applies whole or not at all.
        let tx = self.conn.transaction()?;
        if let Some(id) = &d.signer {
            delegation::check_delta(&tx, generation, id, d, Timestamp::now())?;
        }
        {
            // INDEXED BY: without statistics SQLite picks the primary key's `generation` prefix
            // for these, a scan of the whole set per key (a delta on a million keys, `keys list
            // --json` quadratic).
            let mut drop_creds = tx.prepare_cached(
                "DELETE FROM credentials INDEXED BY credentials_by_key
                 WHERE generation = ?1 AND key_id = ?2",
            )?;
            let mut put_key = tx.prepare_cached(
                "INSERT OR REPLACE INTO keys (generation, key_id, rules) VALUES (?1, ?2, ?3)",
            )?;
            let mut put_cred = tx.prepare_cached(
                "INSERT INTO credentials (generation, digest, kind, key_id, rules)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut pins_of = tx.prepare_cached(
                "SELECT count(*) FROM credentials INDEXED BY credentials_by_key
                 WHERE generation = ?1 AND key_id = ?2 AND kind = ?3",
            )?;
            let pin = CredentialKind::Pin.code();
            for key in &d.upserts {
                let old: u32 = pins_of
                    .query_row(params![generation, key.rules.id.as_str(), pin], |r| {
                        r.get(0)
                    })?;
                pins = pins.saturating_sub(old);
                drop_creds.execute(params![generation, key.rules.id.as_str()])?;
                let new = if d.signer.is_some() {
                    // The key names the delegation that put it (activity records say who).
                    let mut key = key.clone();
                    key.rules.issuer.clone_from(&d.signer);
                    put_key_rows(&mut put_key, &mut put_cred, generation, &key)?
                } else {
                    put_key_rows(&mut put_key, &mut put_cred, generation, key)?
                };
                pins = pins.saturating_add(new);
                applied.upserted += 1;
            }
            revoke_rows(&tx, generation, &d.revokes, &mut applied)?;
            write_held(&tx, version, d.issued_at, mark, &freshness)?;
        }
        // The alarm commits with the delta it is about.
        let alarm = insert_alarm(&tx, ignored)?;
        tx.commit()?;
        self.fresh_record(alarm);
        self.keyset_version = d.version;
        self.mark = mark;
        self.mark_written = mark;
        self.freshness = freshness;
        self.active_pins = pins;
        // A snapshot being staged for a version the delta reached is stale now.
        if self
            .staging
            .as_ref()
            .is_some_and(|s| s.header.version <= d.version)
        {
            self.abandon_staging();
        }
        tracing::info!(
            version = d.version,
            upserted = applied.upserted,
            revoked = applied.revoked,
            "key-set delta applied"
        );
        Ok(applied)
    }

    /// A heartbeat: the cloud vouches that `version` is current as of `at`. Only the held
    /// version raises the knowledge time (a gateway that missed a delta must not look fresh),
    /// and only with a time the mark's rule believes. No fsync of its own: a power cut that
    /// loses the write only makes the knowledge look older, which refuses sooner, never later.
    pub(super) fn heartbeat(&mut self, version: u64, at: Timestamp) -> Result<Vouched, StoreError> {
        if version == 0 || version != self.keyset_version {
            return Ok(Vouched::OtherVersion {
                held: self.keyset_version,
            });
        }
        if let Err(limit) = signed_mark(at, Timestamp::now(), self.mark) {
            return Ok(Vouched::TooFarAhead { limit });
        }
        let freshness = knowledge::after(self.freshness, Some(at), None);
        if freshness != self.freshness {
            // Taken whatever the disk says (the cloud did vouch): a full disk must not make
            // keys stale; only a restart would forget a raise the disk refused.
            self.freshness = freshness;
            self.relax()?;
            let written = knowledge::write_known(&self.conn, freshness.known_at);
            self.restore_durable();
            written?;
        }
        Ok(Vouched::Current(freshness.known_at))
    }

    pub(super) fn begin(&mut self, header: KeySetHeader) -> Result<i64, StoreError> {
        if header.version <= self.keyset_version {
            return Err(KeySetRefusal::NotNewer {
                version: header.version,
                held: self.keyset_version,
            }
            .into());
        }
        self.abandon_staging();
        let generation = self.next_generation;
        self.next_generation += 1;
        self.staging = Some(Staging {
            generation,
            header,
            keys: 0,
            pins: 0,
        });
        Ok(generation)
    }

    pub(super) fn abandon_staging(&mut self) {
        if let Some(s) = self.staging.take() {
            self.garbage.push(s.generation);
        }
    }

    /// Writes one chunk of a staging generation in a transaction of its own, committed with
    /// `synchronous=NORMAL`: no fsync of its own. The staging generation is not live, so a
    /// chunk a power cut takes is only a snapshot to send again (its rows are removed at the
    /// next start); the `FULL` commit that makes the set live syncs the WAL, these frames
    /// included, before it counts. Everything else stays `FULL` (docs/storage.md).
    pub(super) fn stage(&mut self, generation: i64, keys: &[Key]) -> Result<(), StoreError> {
        if self
            .staging
            .as_ref()
            .is_none_or(|s| s.generation != generation)
        {
            return Err(KeySetRefusal::NotStaging(generation).into());
        }
        self.relax()?;
        let written = stage_rows(&mut self.conn, generation, keys);
        // Before anything else can commit, even when the chunk failed.
        self.restore_durable();
        let pins = written?;
        if let Some(staging) = &mut self.staging {
            staging.keys += keys.len() as u64;
            staging.pins += pins;
        }
        Ok(())
    }

    pub(super) fn commit_key_set(
        &mut self,
        generation: i64,
        expected: u64,
    ) -> Result<(), StoreError> {
        let staging = match self.staging.take() {
            Some(s) if s.generation == generation => s,
            other => {
                self.staging = other;
                return Err(KeySetRefusal::NotStaging(generation).into());
            }
        };
        if staging.header.version <= self.keyset_version {
            // A delta reached this version while the snapshot was staged.
            self.garbage.push(staging.generation);
            return Err(KeySetRefusal::NotNewer {
                version: staging.header.version,
                held: self.keyset_version,
            }
            .into());
        }
        if staging.keys != expected {
            self.garbage.push(staging.generation);
            return Err(KeySetRefusal::KeyCount {
                staged: staging.keys,
                expected,
            }
            .into());
        }
        let mut ignored = None;
        if let Some(at) = staging.header.issued_at {
            match signed_mark(at, Timestamp::now(), self.mark) {
                Ok(raised) => self.mark = Some(raised),
                Err(limit) => ignored = Some(mark_ignored(at, limit)),
            }
        }
        let believed = staging.header.issued_at.filter(|_| ignored.is_none());
        let freshness =
            knowledge::after(self.freshness, believed, Some(staging.header.stale_after));
        let version = i64::try_from(staging.header.version)
            .map_err(|_| KeySetRefusal::VersionOutOfRange(staging.header.version))?;
        // The switch is durable, and so are the staged chunks the WAL holds before it.
        self.durable()?;
        let tx = self.conn.transaction()?;
        {
            let mut set =
                tx.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
            set.execute(params!["active_generation", generation])?;
            set.execute(params!["credential_salt", staging.header.salt])?;
            write_held(
                &tx,
                version,
                staging.header.issued_at,
                self.mark,
                &freshness,
            )?;
        }
        let alarm = insert_alarm(&tx, ignored)?;
        tx.commit()?;
        self.fresh_record(alarm);
        self.garbage.push(self.active_generation);
        self.active_generation = generation;
        self.keyset_version = staging.header.version;
        self.salt = staging.header.salt;
        self.active_pins = staging.pins;
        self.mark_written = self.mark;
        self.freshness = freshness;
        tracing::info!(
            version = self.keyset_version,
            keys = staging.keys,
            "key set installed"
        );
        memory::job_done();
        Ok(())
    }

    /// Deletes one slice of an old generation.
    pub(super) fn collect_garbage(&mut self) {
        let Some(&generation) = self.garbage.last() else {
            return;
        };
        let durable = self.durable();
        let step = || -> Result<usize, rusqlite::Error> {
            durable?;
            let tx = self.conn.unchecked_transaction()?;
            let mut n = tx.execute(
                "DELETE FROM credentials WHERE generation = ?1 AND digest IN
                   (SELECT digest FROM credentials WHERE generation = ?1 LIMIT ?2)",
                params![generation, GC_CHUNK],
            )?;
            n += tx.execute(
                "DELETE FROM keys WHERE generation = ?1 AND key_id IN
                   (SELECT key_id FROM keys WHERE generation = ?1 LIMIT ?2)",
                params![generation, GC_CHUNK],
            )?;
            tx.commit()?;
            Ok(n)
        };
        match step() {
            // Use counters are kept even for keys no longer in the set: a key that one snapshot
            // leaves out and a later one brings back must not get its uses again.
            Ok(0) => {
                self.garbage.pop();
                if self.garbage.is_empty() {
                    memory::job_done();
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Leave it for the next start rather than spin on a failing disk.
                tracing::warn!(error = %e, generation, "removing an old key set failed");
                self.garbage.clear();
            }
        }
    }
}

/// Writes the held set's version, the cloud's signing time, the trusted-time mark and the
/// freshness limits into `meta`, in the open transaction `tx` (a snapshot's switch or a delta).
fn write_held(
    tx: &Connection,
    version: i64,
    issued_at: Option<Timestamp>,
    mark: Option<Timestamp>,
    freshness: &Freshness,
) -> Result<(), rusqlite::Error> {
    let mut set = tx.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
    set.execute(params!["keyset_version", version])?;
    if let Some(at) = issued_at {
        set.execute(params!["keyset_issued_at", at.as_second()])?;
    }
    if let Some(mark) = mark {
        set.execute(params!["trusted_time", mark.as_second()])?;
    }
    knowledge::write(tx, freshness)
}

/// Appends the alarm of a signed time not used for the mark in `tx`, so that it commits with
/// the key-set change it is about; returns it as [`Writer::fresh_record`] takes it.
fn insert_alarm(
    tx: &Connection,
    ignored: Option<Record>,
) -> Result<Option<(i64, i64, Record)>, rusqlite::Error> {
    ignored
        .map(|record| insert_record(tx, &record, None).map(|(seq, len)| (seq, len, record)))
        .transpose()
}

/// Inserts a chunk of keys and their credentials into a generation in one transaction, each
/// credential row with its key's rules; returns how many PINs it added.
fn stage_rows(conn: &mut Connection, generation: i64, keys: &[Key]) -> Result<u32, StoreError> {
    let tx = conn.transaction()?;
    let mut pins = 0;
    {
        let mut put_key =
            tx.prepare_cached("INSERT INTO keys (generation, key_id, rules) VALUES (?1, ?2, ?3)")?;
        let mut put_cred = tx.prepare_cached(
            "INSERT INTO credentials (generation, digest, kind, key_id, rules)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for key in keys {
            pins += put_key_rows(&mut put_key, &mut put_cred, generation, key)?;
        }
    }
    tx.commit()?;
    Ok(pins)
}

/// Writes a key's row and one row per credential, each carrying the key's rules; returns
/// how many of the credentials are PINs.
fn put_key_rows(
    put_key: &mut CachedStatement<'_>,
    put_cred: &mut CachedStatement<'_>,
    generation: i64,
    key: &Key,
) -> Result<u32, StoreError> {
    let blob = rules::encode(&key.rules);
    put_key
        .execute(params![generation, key.rules.id.as_str(), blob])
        .map_err(|e| dup(e, || KeySetRefusal::DuplicateKeyId(key.rules.id.clone())))?;
    let mut pins = 0;
    for c in &key.credentials {
        put_cred
            .execute(params![
                generation,
                c.digest.0,
                c.kind.code(),
                key.rules.id.as_str(),
                blob
            ])
            .map_err(|e| {
                dup(e, || {
                    KeySetRefusal::DuplicateCredential(key.rules.id.clone())
                })
            })?;
        pins += u32::from(c.kind == CredentialKind::Pin);
    }
    Ok(pins)
}

/// Marks keys of a generation revoked, in `keys` and in every one of their credential rows
/// (each carries the rules a lookup decides with).
fn revoke_rows(
    conn: &Connection,
    generation: i64,
    ids: &[KeyId],
    applied: &mut DeltaApplied,
) -> Result<(), StoreError> {
    let mut put_key =
        conn.prepare_cached("UPDATE keys SET rules = ?3 WHERE generation = ?1 AND key_id = ?2")?;
    let mut put_creds = conn.prepare_cached(
        "UPDATE credentials SET rules = ?3 WHERE generation = ?1 AND key_id = ?2",
    )?;
    for id in ids {
        match lookup::key_by_id(conn, generation, id)? {
            Some(mut revoked) => {
                revoked.revoked = true;
                let blob = rules::encode(&revoked);
                put_key.execute(params![generation, id.as_str(), blob])?;
                put_creds.execute(params![generation, id.as_str(), blob])?;
                applied.revoked += 1;
            }
            None => applied.unknown += 1,
        }
    }
    Ok(())
}

/// Merges `given` into the desired settings of `door` and stores the result.
fn desire_settings(conn: &Connection, door: &str, given: Settings) -> Result<Settings, StoreError> {
    let old: Option<Option<Vec<u8>>> = conn
        .query_row(
            "SELECT desired FROM unit_settings WHERE door = ?1",
            [door],
            |r| r.get(0),
        )
        .optional()?;
    let mut merged: Settings = match old.flatten() {
        Some(blob) => {
            decode_row(&blob).map_err(|e| StoreError::Corrupt(format!("unit settings: {e}")))?
        }
        None => Settings::default(),
    };
    merged.volume = given.volume.or(merged.volume);
    merged.name = given.name.or(merged.name);
    merged.house_number = given.house_number.or(merged.house_number);
    merged.inner_door = given.inner_door.or(merged.inner_door);
    let blob = crate::cbor::encode(&merged);
    conn.execute(
        "INSERT INTO unit_settings (door, desired) VALUES (?1, ?2)
         ON CONFLICT (door) DO UPDATE SET desired = excluded.desired",
        params![door, blob],
    )?;
    Ok(merged)
}

fn report_settings(conn: &Connection, door: &str, settings: &Settings) -> Result<(), StoreError> {
    let blob = crate::cbor::encode(settings);
    conn.execute(
        "INSERT INTO unit_settings (door, reported) VALUES (?1, ?2)
         ON CONFLICT (door) DO UPDATE SET reported = excluded.reported",
        params![door, blob],
    )?;
    Ok(())
}

/// A uniqueness constraint broken by the set's content is the set's fault (`refusal`); any
/// other failure is the database's.
fn dup(e: rusqlite::Error, refusal: impl FnOnce() -> KeySetRefusal) -> StoreError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        StoreError::KeySet(refusal())
    } else {
        StoreError::Sqlite(e)
    }
}
