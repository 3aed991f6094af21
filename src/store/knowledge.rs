//! What the gateway knows of how current its key set is: the held set's `stale_after` limits
//! and the knowledge time, the signed time of the latest snapshot, delta or heartbeat it took
//! (`docs/access-rules.md`, "Keys that stop when the gateway's knowledge is too old").
//!
//! Both live in `meta` (no migration: it is name/value): `stale_after` as the CBOR map of the
//! wire, `knowledge_time` in Unix seconds. The knowledge time is only ever raised, and only by a
//! signed time the trusted-time mark's rule believes (`writer::signed_mark`): a message signed
//! years ahead must not keep keys alive.

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use crate::access::{Freshness, StaleLimits};

/// The `meta` name of the knowledge time (Unix seconds).
const KNOWN_AT: &str = "knowledge_time";
/// The `meta` name of the held set's limits (CBOR; absent: none).
const STALE_AFTER: &str = "stale_after";

/// The freshness as stored (none stored: no limits, no knowledge time).
pub(super) fn read(conn: &Connection) -> Result<Freshness, StoreError> {
    let value = |name: &str| {
        conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
            .query_row([name], |r| r.get::<_, rusqlite::types::Value>(0))
            .optional()
    };
    let known_at = match value(KNOWN_AT)? {
        Some(rusqlite::types::Value::Integer(s)) => Timestamp::from_second(s).ok(),
        _ => None,
    };
    let limits = match value(STALE_AFTER)? {
        Some(rusqlite::types::Value::Blob(blob)) => super::records::decode_row(&blob)
            .map_err(|e| StoreError::Corrupt(format!("stale_after: {e}")))?,
        _ => StaleLimits::default(),
    };
    Ok(Freshness { limits, known_at })
}

/// Writes `fresh` in the caller's transaction.
pub(super) fn write(conn: &Connection, fresh: &Freshness) -> Result<(), rusqlite::Error> {
    let blob = crate::cbor::encode(&fresh.limits);
    let mut set =
        conn.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
    set.execute(params![STALE_AFTER, blob])?;
    write_known(conn, fresh.known_at)
}

/// Writes the knowledge time alone (a heartbeat).
pub(super) fn write_known(
    conn: &Connection,
    known: Option<Timestamp>,
) -> Result<(), rusqlite::Error> {
    if let Some(known) = known {
        conn.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?
            .execute(params![KNOWN_AT, known.as_second()])?;
    }
    Ok(())
}

/// The freshness after a message the gateway took: its signed time `believed` (`None` when the
/// mark's rule did not believe it) raises the knowledge time, and `limits` (a snapshot's, or a
/// delta's that sets them) replace the held ones. Stored in whole seconds, like the mark.
pub(super) fn after(
    held: Freshness,
    believed: Option<Timestamp>,
    limits: Option<StaleLimits>,
) -> Freshness {
    let believed = believed.and_then(|t| Timestamp::from_second(t.as_second()).ok());
    Freshness {
        limits: limits.unwrap_or(held.limits),
        known_at: match (held.known_at, believed) {
            (Some(known), Some(at)) => Some(known.max(at)),
            (known, at) => known.or(at),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Category;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_knowledge_time_only_rises_and_limits_are_replaced_whole() {
        let day = StaleLimits::new([(Category::Delivery, 86_400)]).unwrap();
        let none = Freshness::default();
        let first = after(none, Some(t("2026-05-15T12:00:00.7Z")), Some(day));
        assert_eq!(
            first.known_at,
            Some(t("2026-05-15T12:00:00Z")),
            "whole seconds"
        );
        assert_eq!(first.limits, day);
        // An older signed time (a redelivered heartbeat) lowers nothing; no limits given keep
        // the held ones.
        let older = after(first, Some(t("2026-05-14T00:00:00Z")), None);
        assert_eq!(older, first);
        // A time not believed leaves it; a snapshot without limits turns them off.
        let off = after(first, None, Some(StaleLimits::default()));
        assert_eq!(off.known_at, first.known_at);
        assert!(off.limits.is_empty());
    }

    #[test]
    fn freshness_survives_the_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        assert_eq!(
            read(&conn).unwrap(),
            Freshness::default(),
            "nothing stored yet"
        );
        let fresh = Freshness {
            limits: StaleLimits::new([(Category::Event, 600)]).unwrap(),
            known_at: Some(t("2026-05-15T12:00:00Z")),
        };
        write(&conn, &fresh).unwrap();
        assert_eq!(read(&conn).unwrap(), fresh);
        write_known(&conn, Some(t("2026-05-16T12:00:00Z"))).unwrap();
        assert_eq!(
            read(&conn).unwrap().known_at,
            Some(t("2026-05-16T12:00:00Z"))
        );
    }
}
