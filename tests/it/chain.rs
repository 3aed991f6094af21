//! The tamper-evident record chain over a real store file: records written by the store's
//! writer, then deleted, edited, swapped, inserted or cut off with SQLite directly (a stolen
//! SD card, a root shell), each found and named by seq by the cloud's check.

use doorbridge::access::CredentialKind;
use doorbridge::store::chain::{self, Finding, Identity, SignedHead};
use rusqlite::Connection;

use crate::fixtures::{open, request};

/// A store file with `n` decisions (seq 1..=n) and the head signed after them, as the
/// uplink sends it with a batch.
async fn written(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Identity, SignedHead) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    for i in 0..n {
        let v = store
            .verify(request(
                &format!("bus0/{i}"),
                "main",
                CredentialKind::Qr,
                "guess",
            ))
            .await
            .unwrap();
        assert!(v.seq.is_some(), "decision {i} recorded");
    }
    store.close();
    let id = Identity::load_or_create(dir.path()).unwrap();
    let conn = Connection::open(&path).unwrap();
    let (seq, hash) = chain::head(&conn).unwrap().expect("a chain head");
    assert_eq!(seq, i64::try_from(n).unwrap());
    let head = id.sign_head(EPOCH, seq, &hash);
    (dir, path, id, head)
}

const EPOCH: i64 = 1_700_000_000_000_000;

fn check(path: &std::path::Path, id: &Identity, head: &SignedHead) -> Vec<Finding> {
    let conn = Connection::open(path).unwrap();
    chain::verify(
        &chain::read_all(&conn).unwrap(),
        std::slice::from_ref(head),
        EPOCH,
        &id.public(),
    )
}

fn sql(path: &std::path::Path, statement: &str) {
    Connection::open(path)
        .unwrap()
        .execute_batch(statement)
        .unwrap();
}

#[tokio::test]
async fn an_untouched_store_verifies_across_a_restart() {
    let (_dir, path, id, _) = written(3).await;
    // More records after a restart continue the same chain.
    let store = open(&path);
    store
        .verify(request("bus0/1", "main", CredentialKind::Qr, "after"))
        .await
        .unwrap();
    store.close();
    let conn = Connection::open(&path).unwrap();
    let (seq, hash) = chain::head(&conn).unwrap().unwrap();
    assert_eq!(seq, 4);
    let head = id.sign_head(EPOCH, seq, &hash);
    assert_eq!(check(&path, &id, &head), vec![]);
}

#[tokio::test]
async fn a_deleted_record_is_reported_missing_by_seq() {
    let (_dir, path, id, head) = written(5).await;
    sql(&path, "DELETE FROM records WHERE seq = 3");
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::Missing { from: 3, to: 3 }]
    );
}

#[tokio::test]
async fn an_edited_body_is_reported_as_that_record_edited() {
    let (_dir, path, id, head) = written(5).await;
    // A denial turned into something else: any byte of the body.
    sql(
        &path,
        "UPDATE records SET body = CAST(replace(CAST(body AS TEXT), 'main', 'back') AS BLOB)
         WHERE seq = 2",
    );
    assert_eq!(check(&path, &id, &head), vec![Finding::Edited { seq: 2 }]);
}

#[tokio::test]
async fn two_swapped_bodies_are_both_reported_edited() {
    let (_dir, path, id, head) = written(5).await;
    let conn = Connection::open(&path).unwrap();
    let recs = chain::read_all(&conn).unwrap();
    assert_ne!(
        recs[1].body, recs[3].body,
        "decisions at different units differ"
    );
    drop(conn);
    sql(
        &path,
        "CREATE TEMP TABLE old AS SELECT seq, body FROM records WHERE seq IN (2, 4);
         UPDATE records SET body = (SELECT body FROM old WHERE old.seq = 6 - records.seq)
         WHERE seq IN (2, 4);",
    );
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::Edited { seq: 2 }, Finding::Edited { seq: 4 }]
    );
}

#[tokio::test]
async fn two_swapped_rows_are_reported_as_moved() {
    let (_dir, path, id, head) = written(5).await;
    // Whole rows, chain values included, trade places.
    sql(
        &path,
        "UPDATE records SET seq = 100 WHERE seq = 2;
         UPDATE records SET seq = 2 WHERE seq = 3;
         UPDATE records SET seq = 3 WHERE seq = 100;",
    );
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::Foreign { seq: 2 }, Finding::Foreign { seq: 3 }]
    );
}

#[tokio::test]
async fn an_inserted_record_is_reported_by_seq() {
    let (_dir, path, id, head) = written(5).await;
    // Without a link, in a seq freed by deleting a genuine record.
    sql(
        &path,
        "DELETE FROM records WHERE seq = 4;
         INSERT INTO records (seq, class, created_ms, body)
             SELECT 4, class, created_ms, body FROM records WHERE seq = 1;",
    );
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::Unchained { seq: 4 }]
    );
    // With a copied link, it still is not the record the chain continues through.
    sql(
        &path,
        "UPDATE records SET chain = (SELECT chain FROM records WHERE seq = 1) WHERE seq = 4",
    );
    assert_eq!(check(&path, &id, &head), vec![Finding::Foreign { seq: 4 }]);
}

#[tokio::test]
async fn a_cut_off_tail_is_reported_missing_up_to_the_signed_head() {
    let (_dir, path, id, head) = written(5).await;
    sql(&path, "DELETE FROM records WHERE seq >= 4");
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::Missing { from: 4, to: 5 }]
    );
}

#[tokio::test]
async fn a_chain_rewritten_to_the_end_does_not_match_the_signed_head() {
    let (_dir, path, id, head) = written(3).await;
    // Edit record 2 and recompute every link after it, as someone with the file but not
    // the head the cloud already holds could.
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE records SET body = x'a0' WHERE seq = 2", [])
        .unwrap();
    let mut prev = chain::read_all(&conn).unwrap()[0].chain.unwrap();
    for seq in 2..=3 {
        let body: Vec<u8> = conn
            .query_row("SELECT body FROM records WHERE seq = ?1", [seq], |r| {
                r.get(0)
            })
            .unwrap();
        prev = chain::link(&prev, seq, &body);
        conn.execute(
            "UPDATE records SET chain = ?1 WHERE seq = ?2",
            rusqlite::params![prev.as_slice(), seq],
        )
        .unwrap();
    }
    drop(conn);
    assert_eq!(
        check(&path, &id, &head),
        vec![Finding::HeadMismatch { seq: 3 }]
    );
}

#[tokio::test]
async fn a_pruned_newest_record_still_links_the_next_one() {
    let (_dir, path, id, _) = written(2).await;
    // The cloud received records 1 and 2; then everything is deleted (pruning, a full disk).
    let received = chain::read_all(&Connection::open(&path).unwrap()).unwrap();
    sql(
        &path,
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('seq_floor', 2);
         DELETE FROM records;",
    );
    let store = open(&path);
    let v = store
        .verify(request("bus0/1", "main", CredentialKind::Qr, "after"))
        .await
        .unwrap();
    assert_eq!(v.seq, Some(3));
    store.close();
    let mut all = received;
    all.extend(chain::read_all(&Connection::open(&path).unwrap()).unwrap());
    let head = id.sign_head(EPOCH, 3, &all[2].chain.unwrap());
    assert_eq!(chain::verify(&all, &[head], EPOCH, &id.public()), vec![]);
}
