//! The SQLite store with real files: decisions recorded durably, use limits across restarts,
//! group commit, key-set generations, migrations, corruption and a full disk.

use doorbridge::access::{CredentialKind, Decision, DenyReason, UseLimit};
use doorbridge::store::schema::{self, MIGRATIONS};
use doorbridge::store::{
    DeltaChange, KeySetRefusal, Record, RemoteOpen, Store, StoreError, StoreOptions, UseScope,
};
use rusqlite::Connection;

use crate::fixtures::{self, header, key, open, request};

fn reason(decision: &Decision) -> Option<DenyReason> {
    decision.deny_reason()
}

#[tokio::test]
async fn unknown_credential_is_denied_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    let v = store
        .verify(request("bus0/1", "main", CredentialKind::Qr, "nope"))
        .await
        .unwrap();
    assert_eq!(reason(&v.decision), Some(DenyReason::UnknownCredential));
    let seq = v.seq.expect("recorded on disk before the answer");
    let records = store.reader().unwrap().outbox(0, 10).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].seq, seq);
    let Record::Activity(a) = &records[0].record else {
        panic!("activity expected")
    };
    assert_eq!(a.reason, Some(DenyReason::UnknownCredential));
    assert_eq!(a.credential_kind, CredentialKind::Qr);
    store.close();
}

#[tokio::test]
async fn single_use_key_stays_used_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .install_key_set(
            header(1),
            vec![key(
                "courier",
                CredentialKind::Pin,
                "482916",
                UseLimit::Total(1),
            )],
        )
        .await
        .unwrap();
    let first = store
        .verify(request("bus0/1", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert!(first.decision.is_grant(), "{first:?}");
    assert_eq!(first.key_id.as_deref(), Some("courier"));
    store.close();

    let store = open(&path);
    let second = store
        .verify(request("bus0/1", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert_eq!(reason(&second.decision), Some(DenyReason::UsedUp));
    store.close();
}

#[tokio::test]
async fn concurrent_requests_for_a_single_use_key_grant_once_in_few_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![key("once", CredentialKind::Qr, "tok", UseLimit::Total(1))],
        )
        .await
        .unwrap();
    let before = store
        .health()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .verify(request(
                        &format!("bus0/{}", i % 8 + 1),
                        "main",
                        CredentialKind::Qr,
                        "tok",
                    ))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut grants = 0;
    for t in tasks {
        let v = t.await.unwrap();
        if v.decision.is_grant() {
            grants += 1;
        } else {
            assert_eq!(reason(&v.decision), Some(DenyReason::UsedUp));
        }
        assert!(v.seq.is_some());
    }
    assert_eq!(grants, 1, "a single-use key opened more than once");
    let commits = store
        .health()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(
        commits < 64,
        "64 decisions took {commits} commits: no group commit"
    );
    assert_eq!(store.reader().unwrap().outbox_depth().unwrap(), 64);
    assert_eq!(
        store.reader().unwrap().uses("once").unwrap(),
        vec![(UseScope::AllDoors, 1), (UseScope::Door("main".into()), 1)]
    );
    store.close();
}

#[tokio::test]
async fn per_door_counts_are_kept_per_door() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    let mut k = key("visitor", CredentialKind::Qr, "qr-1", UseLimit::PerDoor(2));
    k.rules.doors.push("garage".into());
    store.install_key_set(header(1), vec![k]).await.unwrap();
    for door in ["main", "main", "garage", "garage"] {
        let v = store
            .verify(request("u", door, CredentialKind::Qr, "qr-1"))
            .await
            .unwrap();
        assert!(v.decision.is_grant(), "{door}: {v:?}");
    }
    for door in ["main", "garage"] {
        let v = store
            .verify(request("u", door, CredentialKind::Qr, "qr-1"))
            .await
            .unwrap();
        assert_eq!(reason(&v.decision), Some(DenyReason::UsedUp), "{door}");
    }
    store.close();
}

#[tokio::test]
async fn a_new_key_set_replaces_the_old_and_old_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(5),
            vec![key("a", CredentialKind::Mobile, "m-a", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    store
        .install_key_set(
            header(6),
            vec![key("b", CredentialKind::Mobile, "m-b", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    let a = store
        .verify(request("u", "main", CredentialKind::Mobile, "m-a"))
        .await
        .unwrap();
    assert_eq!(reason(&a.decision), Some(DenyReason::UnknownCredential));
    let b = store
        .verify(request("u", "main", CredentialKind::Mobile, "m-b"))
        .await
        .unwrap();
    assert!(b.decision.is_grant());

    let err = store.begin_key_set(header(6)).await.unwrap_err();
    assert!(err.to_string().contains("not newer"), "{err}");
    let info = store.reader().unwrap().key_set().unwrap();
    assert_eq!((info.version, info.keys), (6, 1));
    store.close();
}

#[tokio::test]
async fn a_set_with_a_duplicate_credential_is_refused_and_the_old_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![key("a", CredentialKind::Pin, "1111", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    let twins = vec![
        key("x", CredentialKind::Pin, "2222", UseLimit::Unlimited),
        key("y", CredentialKind::Pin, "2222", UseLimit::Unlimited),
    ];
    let err = store.install_key_set(header(2), twins).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::KeySet(KeySetRefusal::DuplicateCredential(id)) if id == "y"),
        "{err}"
    );
    let a = store
        .verify(request("u", "main", CredentialKind::Pin, "1111"))
        .await
        .unwrap();
    assert!(a.decision.is_grant());
    assert_eq!(store.reader().unwrap().key_set().unwrap().version, 1);
    store.close();
}

#[tokio::test]
async fn an_interrupted_install_leaves_the_old_set_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .install_key_set(
            header(1),
            vec![key("old", CredentialKind::Qr, "o", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    let generation = store.begin_key_set(header(2)).await.unwrap();
    store
        .stage_keys(
            generation,
            vec![key("new", CredentialKind::Qr, "n", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    // Stop before the commit, as a power cut would.
    store.close();

    let store = open(&path);
    let old = store
        .verify(request("u", "main", CredentialKind::Qr, "o"))
        .await
        .unwrap();
    assert!(old.decision.is_grant());
    let new = store
        .verify(request("u", "main", CredentialKind::Qr, "n"))
        .await
        .unwrap();
    assert_eq!(reason(&new.decision), Some(DenyReason::UnknownCredential));
    store.close();
    // The staged rows were removed while idle, before the close returned or after restart.
    let store = open(&path);
    let conn = Connection::open(&path).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: i64 = conn
            .query_row("SELECT count(*) FROM keys WHERE generation <> (SELECT value FROM meta WHERE name='active_generation')", [], |r| r.get(0))
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "staged rows never removed"
        );
        std::thread::yield_now();
    }
    store.close();
}

#[tokio::test]
async fn pin_guessing_locks_the_keypad_and_raises_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![key(
                "courier",
                CredentialKind::Pin,
                "482916",
                UseLimit::Unlimited,
            )],
        )
        .await
        .unwrap();
    for guess in 0..5 {
        let v = store
            .verify(request(
                "bus0/3",
                "main",
                CredentialKind::Pin,
                &format!("00000{guess}"),
            ))
            .await
            .unwrap();
        assert_eq!(reason(&v.decision), Some(DenyReason::UnknownCredential));
    }
    // Now even the right PIN is refused at that unit, but not at another unit.
    let locked = store
        .verify(request("bus0/3", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert_eq!(reason(&locked.decision), Some(DenyReason::LockedOut));
    let elsewhere = store
        .verify(request("bus0/4", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert!(elsewhere.decision.is_grant());
    let alarms: Vec<_> = store
        .reader()
        .unwrap()
        .outbox(0, 100)
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r.record, Record::PinLockout { .. }))
        .collect();
    assert_eq!(alarms.len(), 1);
    store.close();
}

#[tokio::test]
async fn a_full_disk_refuses_limited_keys_grants_unlimited_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut options = StoreOptions::new(&path, fixtures::context());
    options.max_size = Some(256 * 1024);
    let store = Store::open(options).unwrap();
    store
        .install_key_set(
            header(1),
            vec![
                key(
                    "home",
                    CredentialKind::Mobile,
                    "resident",
                    UseLimit::Unlimited,
                ),
                key("courier", CredentialKind::Pin, "482916", UseLimit::Total(3)),
            ],
        )
        .await
        .unwrap();
    // Fill the database to its cap with door events.
    let filler = |i: u32| Record::StorageUnavailable {
        at: fixtures::now(),
        detail: format!("filler {i} {}", "x".repeat(400)),
    };
    let mut i = 0;
    while !store.append(vec![filler(i)]).await.unwrap().is_empty() {
        i += 1;
        assert!(i < 10_000, "the cap never filled");
    }
    assert!(
        store
            .health()
            .degraded
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    let courier = store
        .verify(request("u", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert_eq!(reason(&courier.decision), Some(DenyReason::NotRecorded));
    assert_eq!(courier.seq, None);
    let home = store
        .verify(request("u", "main", CredentialKind::Mobile, "resident"))
        .await
        .unwrap();
    assert!(
        home.decision.is_grant(),
        "residents are not locked out by a full disk"
    );
    assert_eq!(home.seq, None, "held in memory");

    // The uplink acknowledges records: space frees, the held records are written.
    let reader = store.reader().unwrap();
    let seqs: Vec<i64> = reader
        .outbox(0, 10_000)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    let removed = store.ack(seqs[..seqs.len() / 2].to_vec()).await.unwrap();
    assert_eq!(removed, seqs.len() / 2);
    assert!(
        !store
            .health()
            .degraded
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let after = reader.outbox(0, 10_000).unwrap();
    let recovered = after
        .iter()
        .find_map(|r| match &r.record {
            Record::StorageRecovered {
                kept_in_memory,
                dropped,
                ..
            } => Some((*kept_in_memory, *dropped)),
            _ => None,
        })
        .expect("a recovery record");
    assert!(
        recovered.0 >= 3,
        "the alarm, the two decisions and the filler were kept: {recovered:?}"
    );
    assert_eq!(recovered.1, 0);
    let activities = after
        .iter()
        .filter(|r| matches!(r.record, Record::Activity(_)))
        .count();
    assert_eq!(activities, 2, "both decisions reached the disk");
    // And the courier's use was never counted.
    let courier = store
        .verify(request("u", "main", CredentialKind::Pin, "482916"))
        .await
        .unwrap();
    assert!(courier.decision.is_grant());
    assert_eq!(
        reader.uses("courier").unwrap(),
        vec![(UseScope::AllDoors, 1), (UseScope::Door("main".into()), 1)]
    );
    store.close();
}

#[tokio::test]
async fn a_corrupt_database_is_moved_aside_and_a_fresh_one_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .install_key_set(
            header(1),
            vec![key("a", CredentialKind::Qr, "q", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    store.close();
    // Scribble over the middle of the file, as a failing SD card would.
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 4..len - 10] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();

    let store = open(&path);
    assert_eq!(
        store.reader().unwrap().key_set().unwrap().version,
        0,
        "starts empty"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    store.close();
}

#[test]
fn upgrades_from_every_earlier_schema_version() {
    for from in 0..MIGRATIONS.len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = Connection::open(&path).unwrap();
            for (i, sql) in MIGRATIONS.iter().take(from).enumerate() {
                conn.execute_batch(sql).unwrap();
                conn.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
                    .unwrap();
            }
            if from >= 1 {
                // Data written by that version must survive the upgrade.
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('keyset_version', 7)",
                    [],
                )
                .unwrap();
                // Records moved from the `outbox` table to `records` in version 7.
                let table = if from >= 7 { "records" } else { "outbox" };
                conn.execute(
                    &format!("INSERT INTO {table} (class, created_ms, body) VALUES (1, 0, x'a0')"),
                    [],
                )
                .unwrap();
                // Use counters: one table with `door = ''` for all doors before version 10.
                if from >= 10 {
                    conn.execute_batch(
                        "INSERT INTO key_uses (key_id, count) VALUES ('once', 1);
                         INSERT INTO door_uses (key_id, door, count) VALUES ('once', 'main', 1);",
                    )
                    .unwrap();
                } else {
                    conn.execute_batch(
                        "INSERT INTO uses (key_id, door, count) VALUES ('once', '', 1), ('once', 'main', 1);",
                    )
                    .unwrap();
                }
            }
        }
        let store = open(&path);
        store.close();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema::latest_version(), "from version {from}");
        if from >= 1 {
            let kept: i64 = conn
                .query_row(
                    "SELECT value FROM meta WHERE name = 'keyset_version'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(kept, 7, "from version {from}");
            let rows: i64 = conn
                .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
                .unwrap();
            assert_eq!(rows, 1, "from version {from}");
            let reader = doorbridge::store::Reader::open(&path).unwrap();
            assert_eq!(
                reader.uses("once").unwrap(),
                vec![(UseScope::AllDoors, 1), (UseScope::Door("main".into()), 1)],
                "from version {from}"
            );
        }
    }
}

#[test]
fn a_database_from_a_newer_build_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    let err = Store::open(StoreOptions::new(&path, fixtures::context())).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_new_set_never_reuses_a_generation_that_still_holds_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .install_key_set(
            header(1),
            vec![key("k", CredentialKind::Pin, "1111", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    // An install of version 2 stops half-way (its PIN 2222 leaked, so the cloud changes it)...
    let generation = store.begin_key_set(header(2)).await.unwrap();
    store
        .stage_keys(
            generation,
            vec![key("k", CredentialKind::Pin, "2222", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    store.close();
    // ...and its removal was cut off between the two tables: credential rows without keys.
    Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM keys WHERE generation = ?1", [generation])
        .unwrap();

    let store = open(&path);
    store
        .install_key_set(
            header(3),
            vec![key("k", CredentialKind::Pin, "3333", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    let leaked = store
        .verify(request("u", "main", CredentialKind::Pin, "2222"))
        .await
        .unwrap();
    assert_eq!(
        reason(&leaked.decision),
        Some(DenyReason::UnknownCredential),
        "an old row joined the new set"
    );
    let current = store
        .verify(request("u", "main", CredentialKind::Pin, "3333"))
        .await
        .unwrap();
    assert!(current.decision.is_grant());
    store.close();
}

fn delta(
    from: u64,
    to: u64,
    upserts: Vec<doorbridge::access::Key>,
    revokes: &[&str],
) -> DeltaChange {
    DeltaChange {
        from_version: from,
        version: to,
        issued_at: Some(fixtures::now()),
        upserts,
        revokes: revokes.iter().map(|s| (*s).into()).collect(),
        stale_after: None,
        signer: None,
    }
}

#[tokio::test]
async fn a_delta_adds_replaces_and_revokes_keys_in_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![
                key("a", CredentialKind::Pin, "1111", UseLimit::Unlimited),
                key("b", CredentialKind::Pin, "2222", UseLimit::Unlimited),
            ],
        )
        .await
        .unwrap();
    let applied = store
        .apply_delta(delta(
            1,
            2,
            vec![
                // "a" gets a new PIN: the old one must stop working.
                key("a", CredentialKind::Pin, "3333", UseLimit::Unlimited),
                key("c", CredentialKind::Qr, "qr-c", UseLimit::Total(1)),
            ],
            &["b", "never-held"],
        ))
        .await
        .unwrap();
    assert_eq!(
        (applied.upserted, applied.revoked, applied.unknown),
        (2, 1, 1)
    );
    let try_pin = |pin: &'static str| {
        let store = store.clone();
        async move {
            store
                .verify(request("u", "main", CredentialKind::Pin, pin))
                .await
                .unwrap()
                .decision
        }
    };
    assert_eq!(
        reason(&try_pin("1111").await),
        Some(DenyReason::UnknownCredential)
    );
    assert!(try_pin("3333").await.is_grant());
    assert_eq!(reason(&try_pin("2222").await), Some(DenyReason::Revoked));
    let c = store
        .verify(request("u", "main", CredentialKind::Qr, "qr-c"))
        .await
        .unwrap();
    assert!(c.decision.is_grant());
    let info = store.reader().unwrap().key_set().unwrap();
    assert_eq!((info.version, info.keys), (2, 3));
    store.close();

    // The delta survives a restart.
    let store = open(&dir.path().join("db"));
    assert_eq!(store.reader().unwrap().key_set().unwrap().version, 2);
    let b = store
        .verify(request("u", "main", CredentialKind::Pin, "2222"))
        .await
        .unwrap();
    assert_eq!(reason(&b.decision), Some(DenyReason::Revoked));
    store.close();
}

#[tokio::test]
async fn a_delta_on_the_wrong_base_or_with_a_clash_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(3),
            vec![key("a", CredentialKind::Pin, "1111", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    // A gap: the gateway holds 3, the delta starts from 2.
    let err = store
        .apply_delta(delta(2, 4, vec![], &["a"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not apply"), "{err}");
    // A new key whose PIN another key holds: the whole delta is refused, the revocation too.
    let err = store
        .apply_delta(delta(
            3,
            4,
            vec![key("z", CredentialKind::Pin, "1111", UseLimit::Unlimited)],
            &["a"],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::KeySet(KeySetRefusal::DuplicateCredential(_))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert!(!err.is_retryable());
    let a = store
        .verify(request("u", "main", CredentialKind::Pin, "1111"))
        .await
        .unwrap();
    assert!(a.decision.is_grant(), "{a:?}");
    assert_eq!(store.reader().unwrap().key_set().unwrap().version, 3);
    // Nothing held yet is no base at all.
    let empty = open(&dir.path().join("db2"));
    assert!(empty.apply_delta(delta(0, 1, vec![], &[])).await.is_err());
    empty.close();
    store.close();
}

#[tokio::test]
async fn a_remote_open_is_judged_by_the_key_set_counted_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![key("once", CredentialKind::Mobile, "m", UseLimit::Total(1))],
        )
        .await
        .unwrap();
    let remote = |id: &str, key_id: &str, door: &str| RemoteOpen {
        command_id: id.into(),
        key_id: key_id.into(),
        door: door.into(),
        now: fixtures::now(),
        clock_synced: true,
    };
    let first = store
        .remote_open(remote("c1", "once", "main"))
        .await
        .unwrap();
    assert!(first.decision.is_grant(), "{first:?}");
    let second = store
        .remote_open(remote("c2", "once", "main"))
        .await
        .unwrap();
    assert_eq!(reason(&second.decision), Some(DenyReason::UsedUp));
    let wrong_door = store
        .remote_open(remote("c3", "once", "garage"))
        .await
        .unwrap();
    assert_eq!(reason(&wrong_door.decision), Some(DenyReason::WrongDoor));
    let unknown = store
        .remote_open(remote("c4", "nobody", "main"))
        .await
        .unwrap();
    assert_eq!(
        reason(&unknown.decision),
        Some(DenyReason::UnknownCredential)
    );
    // The single use is spent for the credential at the door too.
    let at_door = store
        .verify(request("u", "main", CredentialKind::Mobile, "m"))
        .await
        .unwrap();
    assert_eq!(reason(&at_door.decision), Some(DenyReason::UsedUp));
    let records = store.reader().unwrap().outbox(0, 10).unwrap();
    let Record::Activity(a) = &records[0].record else {
        panic!("{records:?}")
    };
    assert_eq!(a.command_id.as_deref(), Some("c1"));
    assert!(a.granted);
    assert_eq!(records.len(), 5);
    store.close();
}

#[tokio::test]
async fn a_second_writer_on_the_same_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let first = open(&path);
    let err = Store::open(StoreOptions::new(&path, fixtures::context())).unwrap_err();
    assert!(err.to_string().contains("stop it first"), "{err}");
    first.close();
    // Once the first writer is gone the file opens again.
    open(&path).close();
}

#[tokio::test]
async fn a_delta_that_overtakes_a_staged_snapshot_wins_and_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    store
        .install_key_set(
            header(1),
            vec![key("a", CredentialKind::Pin, "1111", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    // Snapshot 3 is being staged when delta 1→4 arrives.
    let generation = store.begin_key_set(header(3)).await.unwrap();
    store
        .stage_keys(
            generation,
            vec![key("b", CredentialKind::Pin, "2222", UseLimit::Unlimited)],
        )
        .await
        .unwrap();
    store
        .apply_delta(delta(1, 4, vec![], &["a"]))
        .await
        .unwrap();
    let err = store.commit_key_set(generation, 1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::KeySet(KeySetRefusal::NotStaging(g)) if g == generation),
        "{err}"
    );
    // The delta's result stands: version 4, "a" revoked, "b" never live.
    assert_eq!(store.reader().unwrap().key_set().unwrap().version, 4);
    let a = store
        .verify(request("u", "main", CredentialKind::Pin, "1111"))
        .await
        .unwrap();
    assert_eq!(reason(&a.decision), Some(DenyReason::Revoked));
    let b = store
        .verify(request("u", "main", CredentialKind::Pin, "2222"))
        .await
        .unwrap();
    assert_eq!(reason(&b.decision), Some(DenyReason::UnknownCredential));
    store.close();
}

#[tokio::test]
async fn a_full_outbox_drops_telemetry_then_old_activity_never_alarms_and_says_so() {
    use doorbridge::store::RecordClass;
    let dir = tempfile::tempdir().unwrap();
    let mut options = StoreOptions::new(dir.path().join("db"), fixtures::context());
    options.outbox_max_records = Some(100);
    let store = Store::open(options).unwrap();
    let at = fixtures::now();
    let battery = |low| Record::Battery {
        at,
        unit: "b/1".into(),
        door: "main".into(),
        percent: if low { 5 } else { 80 },
        millivolts: 3000,
        low,
    };
    let call = Record::CallButton {
        at,
        unit: "b/1".into(),
        door: "main".into(),
        button: 0,
    };
    // 40 routine battery readings, 40 alarms, then activity until the outbox overflows.
    for _ in 0..40 {
        store.append(vec![battery(false)]).await.unwrap();
        store.append(vec![call.clone()]).await.unwrap();
    }
    for _ in 0..30 {
        store
            .verify(request("u", "main", CredentialKind::Qr, "not-a-key"))
            .await
            .unwrap();
    }
    let all = store.reader().unwrap().outbox(0, 1000).unwrap();
    assert!(all.len() <= 100, "{} records", all.len());
    let class = |c| all.iter().filter(|r| r.class == c).count() as u64;
    let dropped: Vec<_> = all
        .iter()
        .filter_map(|r| match &r.record {
            Record::OutboxDropped {
                telemetry,
                activity,
                ..
            } => Some((*telemetry, *activity)),
            _ => None,
        })
        .collect();
    let (telemetry, activity) = dropped.iter().fold((0, 0), |(t, a), d| (t + d.0, a + d.1));
    // Every alarm is kept (40 call buttons plus one record per burst); each burst says what
    // went, and that is exactly what is missing.
    assert_eq!(
        class(RecordClass::Alarm),
        40 + dropped.len() as u64,
        "{all:?}"
    );
    assert!(!dropped.is_empty(), "the outbox overflowed");
    assert_eq!(class(RecordClass::Telemetry), 40 - telemetry);
    assert_eq!(class(RecordClass::Activity), 30 - activity);
    // Routine telemetry goes first: activity only once no telemetry is left.
    if activity > 0 {
        assert_eq!(class(RecordClass::Telemetry), 0, "{dropped:?}");
    }
    // Each burst takes the outbox down to 90 % of the limit, not further.
    for (t, a) in &dropped {
        assert!(
            t + a <= 11,
            "a burst dropped more than it had to: {dropped:?}"
        );
    }
    store.close();

    // The bound holds across a restart: the counts are read back from the file.
    let mut options = StoreOptions::new(dir.path().join("db"), fixtures::context());
    options.outbox_max_records = Some(100);
    let store = Store::open(options).unwrap();
    for _ in 0..20 {
        store
            .verify(request("u", "main", CredentialKind::Qr, "not-a-key"))
            .await
            .unwrap();
    }
    let n = store.reader().unwrap().outbox_depth().unwrap();
    assert!(n <= 100, "{n} records");
    store.close();
}

/// A key opening `main` with a PIN, a QR token and a mobile key.
fn three_credential_key(id: &str) -> doorbridge::access::Key {
    let mut k = key(id, CredentialKind::Pin, "7777", UseLimit::Unlimited);
    for (kind, secret) in [
        (CredentialKind::Qr, "qr-7"),
        (CredentialKind::Mobile, "m-7"),
    ] {
        k.credentials.push(doorbridge::access::Credential {
            kind,
            digest: doorbridge::access::credential::digest(fixtures::SALT, kind, secret.as_bytes()),
        });
    }
    k
}

/// Presents each of the three credentials at `door`: each must be granted (`None`) or denied
/// for `expected`.
async fn assert_three(store: &Store, door: &str, expected: Option<DenyReason>, when: &str) {
    for (kind, secret) in [
        (CredentialKind::Pin, "7777"),
        (CredentialKind::Qr, "qr-7"),
        (CredentialKind::Mobile, "m-7"),
    ] {
        let d = store
            .verify(request("u", door, kind, secret))
            .await
            .unwrap()
            .decision;
        match expected {
            None => assert!(d.is_grant(), "{kind:?} at {door} {when}: {d:?}"),
            Some(r) => assert_eq!(reason(&d), Some(r), "{kind:?} at {door} {when}"),
        }
    }
}

/// Every credential row carries exactly its key's rules (the lookup decides with the copy).
fn assert_credential_rules_match_keys(path: &std::path::Path) {
    let stale: i64 = Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM credentials c JOIN keys k USING (generation, key_id)
              WHERE c.rules IS NOT NULL AND c.rules IS NOT k.rules",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stale, 0,
        "credential rows whose rules differ from their key's"
    );
}

#[tokio::test]
async fn a_key_with_three_credentials_revoked_by_a_delta_is_denied_on_every_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    let set = vec![three_credential_key("k")];
    store.install_key_set(header(1), set).await.unwrap();
    assert_three(&store, "main", None, "when installed").await;
    let revoke = delta(1, 2, vec![], &["k"]);
    store.apply_delta(revoke).await.unwrap();
    assert_three(&store, "main", Some(DenyReason::Revoked), "once revoked").await;
    assert_credential_rules_match_keys(&path);
    store.close();
    let store = open(&path);
    assert_three(&store, "main", Some(DenyReason::Revoked), "after a restart").await;
    store.close();
}

#[tokio::test]
async fn a_delta_upsert_gives_every_credential_of_the_key_its_new_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    let set = vec![three_credential_key("k")];
    store.install_key_set(header(1), set).await.unwrap();
    // The key moves from `main` to `garage`, same credentials.
    let mut moved = three_credential_key("k");
    moved.rules.doors = vec!["garage".into()];
    let steps = [
        (delta(1, 2, vec![moved.clone()], &[]), "garage", None),
        (
            delta(2, 3, vec![], &["k"]),
            "garage",
            Some(DenyReason::Revoked),
        ),
        // Revoked, then issued again by an upsert: every credential opens again.
        (delta(3, 4, vec![moved], &[]), "garage", None),
        // Upserted and revoked in one delta: revoked, on every credential.
        (
            delta(4, 5, vec![three_credential_key("k")], &["k"]),
            "main",
            Some(DenyReason::Revoked),
        ),
    ];
    for (step, door, expected) in steps {
        let version = step.version;
        store.apply_delta(step).await.unwrap();
        assert_three(&store, door, expected, &format!("at version {version}")).await;
        if version == 2 {
            let wrong = Some(DenyReason::WrongDoor);
            assert_three(&store, "main", wrong, "after the move").await;
        }
    }
    assert_credential_rules_match_keys(&path);
    store.close();
}

#[tokio::test]
async fn a_key_set_stored_before_version_5_keeps_deciding_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        // Version 4: rules as CBOR in `keys` only, credential rows without rules.
        let conn = Connection::open(&path).unwrap();
        for (i, sql) in MIGRATIONS.iter().take(4).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
                .unwrap();
        }
        let mut limited = three_credential_key("k");
        limited.rules.use_limit = UseLimit::Total(1);
        let other = key("o", CredentialKind::Pin, "1111", UseLimit::Unlimited);
        for k in [&limited, &other] {
            let mut cbor = Vec::new();
            ciborium::into_writer(&k.rules, &mut cbor).unwrap();
            conn.execute(
                "INSERT INTO keys (generation, key_id, rules) VALUES (1, ?1, ?2)",
                rusqlite::params![k.rules.id.as_str(), cbor],
            )
            .unwrap();
            for c in &k.credentials {
                conn.execute(
                    "INSERT INTO credentials (generation, digest, kind, key_id) VALUES (1, ?1, ?2, ?3)",
                    rusqlite::params![c.digest.0, c.kind.code(), k.rules.id.as_str()],
                )
                .unwrap();
            }
        }
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('active_generation', 1), ('keyset_version', 1),
             ('credential_salt', ?1)",
            [fixtures::SALT],
        )
        .unwrap();
    }
    let store = open(&path);
    // The rules come from `keys`, the use limit included: one use, then used up.
    let pin = store
        .verify(request("u", "main", CredentialKind::Pin, "7777"))
        .await
        .unwrap();
    assert!(pin.decision.is_grant(), "{pin:?}");
    assert_three(&store, "main", Some(DenyReason::UsedUp), "once used").await;
    let reader = store.reader().unwrap();
    assert_eq!(
        reader.key("k").unwrap().unwrap().use_limit,
        UseLimit::Total(1)
    );
    assert_eq!(reader.keys_page("", 10).unwrap().len(), 2);
    // A revocation reaches the rows written before the upgrade too.
    store
        .apply_delta(delta(1, 2, vec![], &["k"]))
        .await
        .unwrap();
    assert_three(&store, "main", Some(DenyReason::Revoked), "once revoked").await;
    let other = store
        .verify(request("u", "main", CredentialKind::Pin, "1111"))
        .await
        .unwrap();
    assert!(other.decision.is_grant(), "{other:?}");
    assert_credential_rules_match_keys(&path);
    store.close();
}

/// Size and modification time of the database file and of its WAL.
fn on_disk(path: &std::path::Path) -> Vec<(u64, std::time::SystemTime)> {
    ["", "-wal"]
        .iter()
        .map(|suffix| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let meta = std::fs::metadata(name).unwrap();
            (meta.len(), meta.modified().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn an_idle_store_folds_its_wal_into_the_file_once_then_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .verify(request("u", "main", CredentialKind::Qr, "nope"))
        .await
        .unwrap();
    // A lone decision only appends to the WAL: checkpointing it at once would write its page
    // a second time (the SD card pays per block), so the database file waits.
    let before = on_disk(&path)[0];
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        on_disk(&path)[0],
        before,
        "one decision was checkpointed at once"
    );
    // Once the WAL holds 64 frames, the checkpoint while idle writes the database file.
    for i in 0..80u8 {
        store
            .append(vec![Record::CallButton {
                at: fixtures::now(),
                unit: "u".into(),
                door: "main".into(),
                button: i,
            }])
            .await
            .unwrap();
    }
    crate::broker::wait_for(
        std::time::Duration::from_secs(10),
        "a checkpoint while idle",
        || (on_disk(&path)[0] != before).then_some(()),
    )
    .await;
    let settled = on_disk(&path);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(on_disk(&path), settled, "an idle store wrote to its files");
    store.close();
}

#[tokio::test]
async fn a_store_that_is_never_idle_still_bounds_its_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    let at = fixtures::now();
    // Commits back to back, never a pause long enough for the idle checkpoint; without a
    // bound the WAL would grow to about 6,000 pages.
    for round in 0..400u32 {
        let records = (0..250u8)
            .map(|button| Record::CallButton {
                at,
                unit: format!("bus0/{round}").into(),
                door: "main".into(),
                button,
            })
            .collect();
        store.append(records).await.unwrap();
    }
    let page = 4096 + 24;
    let wal = on_disk(&path)[1].0;
    assert!(
        wal <= (1000 + 100) * page,
        "the WAL grew to {} pages",
        wal / page
    );
    store.close();
}

/// A key set signed years ahead (a cloud clock or signing mistake) is taken, but its time does
/// not become the trusted-time mark, which would deny every time-bound key until the clock
/// caught up; a mark raised too far within the allowed day is lowered by an NTP clock.
#[tokio::test]
async fn a_key_set_signed_years_ahead_cannot_lock_out_time_bound_keys() {
    use jiff::{SignedDuration, Timestamp};
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    let now = Timestamp::now();
    let mut timed = key("timed", CredentialKind::Mobile, "m-t", UseLimit::Unlimited);
    timed.rules.valid_until = Some(now + SignedDuration::from_hours(24 * 30));
    let signed = |version: u64, at: Timestamp| {
        let mut h = header(version);
        h.issued_at = Some(at);
        h
    };
    let ask = |synced: bool| {
        let mut r = request("u", "main", CredentialKind::Mobile, "m-t");
        r.now = Timestamp::now();
        r.clock_synced = synced;
        r
    };
    store
        .install_key_set(signed(1, now), vec![timed.clone()])
        .await
        .unwrap();
    assert!(store.verify(ask(false)).await.unwrap().decision.is_grant());

    let years_ahead = now + SignedDuration::from_hours(24 * 365 * 20);
    store
        .install_key_set(signed(2, years_ahead), vec![timed.clone()])
        .await
        .unwrap();
    let reader = store.reader().unwrap();
    assert_eq!(reader.key_set().unwrap().version, 2, "the keys are taken");
    assert!(
        reader.trusted_time().unwrap().unwrap() < now + SignedDuration::from_hours(1),
        "the mark stays"
    );
    let after = store.verify(ask(false)).await.unwrap();
    assert!(after.decision.is_grant(), "{after:?}");
    let records = reader.outbox(0, 100).unwrap();
    assert!(
        records.iter().any(
            |r| matches!(r.record, Record::ClockMarkIgnored { signed, .. } if signed == years_ahead)
        ),
        "{records:?}"
    );

    // Twelve hours ahead is believed (within the day): the unsynchronised clock is now behind
    // the mark, and time-bound keys are refused...
    store
        .install_key_set(signed(3, now + SignedDuration::from_hours(12)), vec![timed])
        .await
        .unwrap();
    let behind = store.verify(ask(false)).await.unwrap();
    assert_eq!(reason(&behind.decision), Some(DenyReason::ClockUntrusted));
    // ... until NTP says the time: the mark comes down to it, with an alarm, and stays down.
    assert!(store.verify(ask(true)).await.unwrap().decision.is_grant());
    assert!(store.verify(ask(false)).await.unwrap().decision.is_grant());
    let records = reader.outbox(0, 100).unwrap();
    assert!(
        records
            .iter()
            .any(|r| matches!(r.record, Record::ClockMarkLowered { .. })),
        "{records:?}"
    );
    // The untrusted spell raised one alarm, and one more when it ended.
    let spells: Vec<bool> = records
        .iter()
        .filter_map(|r| match r.record {
            Record::ClockUntrusted { active, .. } => Some(active),
            _ => None,
        })
        .collect();
    assert_eq!(spells, [true, false]);
    assert!(reader.trusted_time().unwrap().unwrap() < now + SignedDuration::from_hours(1));
    store.close();
}

/// The answer to a door-bus request is kept with its decision: the same request (unit, id,
/// fingerprint, boot) arriving again after the store was closed and opened (a restart or
/// power cut) gets the same answer without spending a use or being recorded twice; after the
/// retransmit window, or from a unit that rebooted since, it is a new request.
#[tokio::test]
async fn a_retransmission_after_a_restart_gets_the_kept_answer_without_spending_a_use() {
    use doorbridge::store::{RETRANSMIT_WINDOW, Retransmit};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    store
        .install_key_set(
            header(1),
            vec![key("once", CredentialKind::Pin, "4711", UseLimit::Total(1))],
        )
        .await
        .unwrap();
    let ask = |id: u32, boot: u32, later: jiff::SignedDuration| {
        let mut r = request("entrance/1", "main", CredentialKind::Pin, "4711");
        r.request_id = Some(id);
        r.now = fixtures::now() + later;
        r.retransmit = Some(Retransmit {
            fingerprint: [7; 32],
            boot_id: Some(boot),
        });
        r
    };
    let zero = jiff::SignedDuration::ZERO;
    let first = store.verify(ask(7, 1, zero)).await.unwrap();
    assert!(first.decision.is_grant());
    store.close();

    let store = open(&path);
    let again = store
        .verify(ask(7, 1, jiff::SignedDuration::from_secs(3)))
        .await
        .unwrap();
    assert_eq!(again, first, "the same answer, the same record");
    let reader = store.reader().unwrap();
    assert_eq!(reader.outbox(0, 10).unwrap().len(), 1, "recorded once");
    // A unit that rebooted since reuses ids: a new request, judged (and used up).
    let rebooted = store.verify(ask(7, 2, zero)).await.unwrap();
    assert_eq!(reason(&rebooted.decision), Some(DenyReason::UsedUp));
    // Past the window, a new request too.
    let mut late = ask(8, 1, zero);
    store.verify(late.clone()).await.unwrap();
    late.now += RETRANSMIT_WINDOW + jiff::SignedDuration::from_secs(1);
    let late = store.verify(late).await.unwrap();
    assert_eq!(reason(&late.decision), Some(DenyReason::UsedUp));
    assert_eq!(reader.uses("once").unwrap()[0].1, 1, "one use spent");
    store.close();
}

/// A tmpfs of `bytes` mounted at a temporary directory for the test (root only), unmounted
/// on drop: a disk that really fills up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<SmallDisk> {
        // Only root mounts here.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            eprintln!("skipped: mounting a small tmpfs needs root (CI runs the tests as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount a {bytes}-byte tmpfs at {}",
            dir.path().display()
        );
        Some(SmallDisk { dir })
    }

    /// Fills what is left with a file, until the disk refuses.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        let block = vec![0xffu8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// With the disk full, decisions keep landing on disk: the store releases its reserve, says
/// so, and every decision a door heard is in the database file (what a crash or power cut
/// leaves), not in memory. How many records the reserve holds is printed.
#[tokio::test]
async fn a_full_disk_releases_the_reserve_and_decisions_stay_on_disk() {
    let Some(disk) = SmallDisk::mount(6 * 1024 * 1024) else {
        return;
    };
    let path = disk.dir.path().join("doorbridge.db");
    let mut options = StoreOptions::new(&path, fixtures::context());
    options.reserve = 1024 * 1024;
    let store = Store::open(options).unwrap();
    store
        .install_key_set(
            header(1),
            vec![key(
                "home",
                CredentialKind::Mobile,
                "resident",
                UseLimit::Unlimited,
            )],
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(disk.dir.path().join("doorbridge.db.reserve"))
            .unwrap()
            .len(),
        1024 * 1024
    );
    disk.fill();
    let mut heard = Vec::new();
    loop {
        let v = store
            .verify(request("u", "main", CredentialKind::Mobile, "resident"))
            .await
            .unwrap();
        assert!(v.decision.is_grant());
        match v.seq {
            Some(seq) => heard.push(seq),
            None => break,
        }
        assert!(heard.len() < 100_000, "the reserve never ran out");
    }
    eprintln!(
        "a full disk: {} decisions recorded on disk from a 1 MiB reserve (about {} bytes each)",
        heard.len(),
        1024 * 1024 / heard.len().max(1)
    );
    assert!(
        heard.len() > 100,
        "the reserve took only {} records",
        heard.len()
    );
    // On disk, as a fresh reader (another process after a crash) sees it.
    let on_disk = doorbridge::store::Reader::open(&path)
        .unwrap()
        .outbox(0, 1_000_000)
        .unwrap();
    let alarms = on_disk
        .iter()
        .filter(|r| matches!(r.record, Record::StorageReserveReleased { .. }))
        .count();
    assert_eq!(alarms, 1, "the release is an alarm, on disk too");
    for seq in &heard {
        assert!(
            on_disk.iter().any(|r| r.seq == *seq),
            "decision {seq} not on disk"
        );
    }
    store.close();
}

/// Copies `pristine` with 8 bytes overwritten at a pseudo-random offset past the first page,
/// until the copy passes start-up's `quick_check` but fails the full `integrity_check` (as 11
/// of 30 random overwrites did when this was tried by hand), with its outbox and use counters
/// still readable. Returns the damaged copy.
fn damage_the_quick_check_misses(pristine: &std::path::Path, outbox: usize) -> std::path::PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(pristine).unwrap().len();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for attempt in 0..500 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = 4096 + seed % (len - 4096 - 8);
        let copy = pristine.with_file_name(format!("damaged-{attempt}.db"));
        std::fs::copy(pristine, &copy).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&seed.to_le_bytes()).unwrap();
        drop(f);
        let Ok(conn) = Connection::open(&copy) else {
            continue;
        };
        let pragma = |p: &str| -> Option<String> {
            conn.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, String>(0))
                .ok()
        };
        let readable = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .is_ok_and(|n| n == i64::try_from(outbox).unwrap())
            && conn
                .query_row("SELECT sum(count) FROM key_uses", [], |r| {
                    r.get::<_, i64>(0)
                })
                .is_ok();
        if pragma("quick_check").as_deref() == Some("ok")
            && pragma("integrity_check").is_some_and(|v| v != "ok")
            && readable
        {
            eprintln!(
                "damage at byte {offset} (attempt {attempt}) passes quick_check, fails integrity_check"
            );
            return copy;
        }
        let _ = std::fs::remove_file(&copy);
    }
    panic!("no overwrite found that quick_check misses");
}

/// Damage start-up's quick check misses is found by the idle full check; opening the store
/// again moves the file aside and carries the unsent records and the use counts over, so a
/// limited key is not honoured again, and says so in a `database_replaced` alarm.
#[tokio::test]
async fn damage_found_when_idle_is_replaced_keeping_unsent_records_and_use_counts() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine.db");
    let unsent = 50;
    {
        let store = open(&pristine);
        let mut keys: Vec<_> = (0..2_000)
            .map(|i| {
                key(
                    &format!("k{i}"),
                    CredentialKind::Qr,
                    &format!("qr-{i}"),
                    UseLimit::Unlimited,
                )
            })
            .collect();
        keys.push(key(
            "twice",
            CredentialKind::Pin,
            "4711",
            UseLimit::Total(2),
        ));
        store.install_key_set(header(1), keys).await.unwrap();
        let used = store
            .verify(request("u", "main", CredentialKind::Pin, "4711"))
            .await
            .unwrap();
        assert!(used.decision.is_grant());
        let filler = Record::StorageRecovered {
            at: fixtures::now(),
            kept_in_memory: 0,
            dropped: 0,
        };
        store.append(vec![filler; unsent - 1]).await.unwrap();
        store.close();
    }
    let damaged = damage_the_quick_check_misses(&pristine, unsent);

    let mut options = StoreOptions::new(&damaged, fixtures::context());
    options.integrity_every = Some(std::time::Duration::from_millis(200));
    let store = Store::open(options).expect("quick_check lets it open");
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.health().damage_found.notified(),
    )
    .await
    .expect("the idle check finds the damage");
    store.close();

    let store = open(&damaged);
    let reader = store.reader().unwrap();
    assert_eq!(
        reader.key_set().unwrap().version,
        0,
        "the keys come back from the cloud"
    );
    let records = reader.outbox(0, 1_000).unwrap();
    assert_eq!(
        records.len(),
        unsent + 1,
        "every unsent record, and the alarm"
    );
    assert!(
        matches!(
            records.last().unwrap().record,
            Record::DatabaseReplaced {
                records: 50,
                uses: 2,
                ..
            }
        ),
        "{:?}",
        records.last()
    );
    assert!(
        reader
            .uses("twice")
            .unwrap()
            .contains(&(UseScope::AllDoors, 1)),
        "the use count survived"
    );
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(aside, "the damaged file is kept aside");
    store.close();
}

/// A record `days` old.
fn old_call(days: i64, i: u8) -> Record {
    Record::CallButton {
        at: fixtures::now()
            .checked_sub(jiff::SignedDuration::from_hours(24 * days))
            .unwrap(),
        unit: "bus0/1".into(),
        door: "main".into(),
        button: i,
    }
}

/// Waits until the idle writer's hourly prune (the first comes at the first idle moment after
/// the store opens) brings the history down to `want` records.
async fn history_until(store: &Store, want: u64) -> u64 {
    let reader = store.reader().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (kept, _) = reader.history_size().unwrap();
        if kept == want || std::time::Instant::now() > deadline {
            return kept;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Uploaded records stay as the door history instead of being deleted: out of the outbox,
/// still readable, and pruned in bulk by count and by age; records not yet uploaded are
/// never pruned, whatever their age.
#[tokio::test]
async fn acknowledged_records_stay_as_history_and_are_pruned_by_count_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut options = StoreOptions::new(&path, fixtures::context());
    options.history = doorbridge::store::History {
        days: Some(30),
        max_records: Some(4),
    };
    let store = Store::open(options).unwrap();
    // Ten records: 0..=5 are 40 days old, 6..=9 fresh; all but the two oldest uploaded.
    let records: Vec<Record> = (0..10u8)
        .map(|i| old_call(if i < 6 { 40 } else { 0 }, i))
        .collect();
    let seqs = store.append(records).await.unwrap();
    assert_eq!(store.ack(seqs[2..].to_vec()).await.unwrap(), 8);
    let reader = store.reader().unwrap();
    let waiting: Vec<i64> = reader
        .outbox(0, 100)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        waiting,
        seqs[..2],
        "the outbox holds what was not acknowledged"
    );

    // Pruned: the acknowledged ones older than 30 days (2..=5), which also leaves 4.
    assert_eq!(history_until(&store, 4).await, 4);
    let mut left = Vec::new();
    reader
        .history(0, None, None, false, |r| {
            left.push(r.unwrap().seq);
            true
        })
        .unwrap();
    let mut want = seqs[..2].to_vec();
    want.extend_from_slice(&seqs[6..]);
    assert_eq!(left, want, "40-day-old records not yet uploaded stay");
    store.close();
}

/// A pruned history never gives a seq the cloud has seen to a new record: the cloud takes
/// (gateway, epoch, seq) as the record's identity.
#[tokio::test]
async fn seqs_are_never_reused_after_the_whole_history_is_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut options = StoreOptions::new(&path, fixtures::context());
    options.history = doorbridge::store::History {
        days: Some(0),
        max_records: Some(0),
    };
    let store = Store::open(options.clone()).unwrap();
    let seqs = store
        .append((0..5).map(|i| old_call(1, i)).collect())
        .await
        .unwrap();
    store.ack(seqs.clone()).await.unwrap();
    assert_eq!(history_until(&store, 0).await, 0);
    let reader = store.reader().unwrap();
    let mut rows = 0;
    reader
        .history(0, None, None, false, |_| {
            rows += 1;
            true
        })
        .unwrap();
    assert_eq!(rows, 0, "every row is gone");
    assert_eq!(
        reader.last_seq().unwrap(),
        seqs[4],
        "the last seq given is remembered"
    );
    store.close();
    let store = Store::open(options).unwrap();
    let next = store.append(vec![old_call(0, 9)]).await.unwrap();
    assert_eq!(
        next,
        vec![seqs[4] + 1],
        "numbering goes on after the last seq given"
    );
    store.close();
}

/// Acknowledgements arrive in any order, repeated, overlapping, by class: once every record
/// was acknowledged the outbox is empty, and every record is still in the history.
#[tokio::test]
async fn acknowledgements_in_any_order_empty_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db"));
    let records: Vec<Record> = (0..600u32)
        .map(|i| {
            if i % 7 == 0 {
                Record::Tamper {
                    at: fixtures::now(),
                    unit: "bus0/1".into(),
                    door: "main".into(),
                    active: true,
                }
            } else {
                old_call(0, u8::try_from(i % 200).unwrap())
            }
        })
        .collect();
    let seqs = store.append(records).await.unwrap();
    let reader = store.reader().unwrap();
    // Alarms first (every 7th), then the rest in batches of 50 from the end, one batch twice,
    // one batch overlapping the previous.
    let alarms: Vec<i64> = seqs.iter().copied().step_by(7).collect();
    assert_eq!(store.ack(alarms.clone()).await.unwrap(), alarms.len());
    let rest: Vec<i64> = seqs
        .iter()
        .copied()
        .filter(|s| !alarms.contains(s))
        .collect();
    let batches: Vec<Vec<i64>> = rest.chunks(50).map(<[i64]>::to_vec).rev().collect();
    let mut acked = alarms.len();
    for (i, batch) in batches.iter().enumerate() {
        acked += store.ack(batch.clone()).await.unwrap();
        if i == 3 {
            assert_eq!(store.ack(batch.clone()).await.unwrap(), 0, "a repeated ack");
            let overlap: Vec<i64> = batches[i - 1].iter().chain(batch).copied().collect();
            assert_eq!(store.ack(overlap).await.unwrap(), 0, "an overlapping ack");
        }
        let waiting = reader.outbox_depth().unwrap();
        assert_eq!(waiting, (seqs.len() - acked) as u64, "after batch {i}");
    }
    assert_eq!(acked, seqs.len());
    assert_eq!(reader.outbox_depth().unwrap(), 0);
    assert_eq!(reader.history_size().unwrap().0, seqs.len() as u64);
    store.close();
}

/// Why `pin` at `main` is refused at `now` (`None`: it opens).
async fn pin_at(store: &Store, pin: &str, now: jiff::Timestamp) -> Option<DenyReason> {
    let mut r = request("u", "main", CredentialKind::Pin, pin);
    r.now = now;
    reason(&store.verify(r).await.unwrap().decision)
}

/// A key set's `stale_after` refuses limited categories once the decision's time is past the
/// limit from the knowledge time (residents unaffected), on the store alone: the decision's
/// time is the request's. A heartbeat for the held version raises the knowledge time and
/// survives a restart; one for another version, or signed beyond what the mark's rule
/// believes, changes nothing; a delta can turn the limits off; an untrusted clock refuses a
/// limited key whatever its freshness.
#[tokio::test]
async fn stale_after_refuses_limited_keys_and_a_heartbeat_refreshes_them_across_a_restart() {
    use doorbridge::access::{Category, StaleLimits};
    use doorbridge::store::Vouched;
    use jiff::{SignedDuration, Timestamp};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    let signed = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    let minutes = |m: i64| signed + SignedDuration::from_mins(m);
    let courier = key(
        "courier",
        CredentialKind::Pin,
        "730155",
        UseLimit::Unlimited,
    );
    let mut resident = key(
        "resident",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    );
    resident.rules.category = Category::Friend;
    let mut h = header(1);
    h.issued_at = Some(signed);
    h.stale_after = StaleLimits::new([(Category::Delivery, 3600)]).unwrap();
    store
        .install_key_set(h, vec![courier, resident])
        .await
        .unwrap();
    assert_eq!(
        pin_at(&store, "730155", minutes(60)).await,
        None,
        "at the limit"
    );
    assert_eq!(
        pin_at(&store, "730155", minutes(61)).await,
        Some(DenyReason::StaleKeySet)
    );
    assert_eq!(
        pin_at(&store, "482916", minutes(600)).await,
        None,
        "a resident"
    );
    // Behind the trusted-time mark (the set's signing time): the clock cannot vouch.
    assert_eq!(
        pin_at(&store, "730155", minutes(-10)).await,
        Some(DenyReason::ClockUntrusted)
    );
    assert_eq!(pin_at(&store, "482916", minutes(-10)).await, None);

    assert_eq!(
        store.heartbeat(1, minutes(30)).await.unwrap(),
        Vouched::Current(Some(minutes(30)))
    );
    assert_eq!(
        pin_at(&store, "730155", minutes(61)).await,
        None,
        "refreshed"
    );
    assert_eq!(
        store.heartbeat(2, minutes(45)).await.unwrap(),
        Vouched::OtherVersion { held: 1 }
    );
    let years = signed + SignedDuration::from_hours(24 * 365);
    assert!(matches!(
        store.heartbeat(1, years).await.unwrap(),
        Vouched::TooFarAhead { .. }
    ));
    assert_eq!(
        pin_at(&store, "730155", minutes(91)).await,
        Some(DenyReason::StaleKeySet),
        "neither moved it"
    );
    store.close();

    let store = open(&path);
    let set = store.reader().unwrap().key_set().unwrap();
    assert_eq!(set.freshness.known_at, Some(minutes(30)), "kept on disk");
    assert_eq!(pin_at(&store, "730155", minutes(90)).await, None);
    let mut off = delta(1, 2, vec![], &[]);
    off.issued_at = Some(signed);
    off.stale_after = Some(StaleLimits::default());
    store.apply_delta(off).await.unwrap();
    assert_eq!(
        pin_at(&store, "730155", minutes(60 * 24 * 30)).await,
        None,
        "a delta turned the limits off"
    );
    store.close();
}
