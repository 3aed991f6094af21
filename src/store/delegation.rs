//! Delegations held by the gateway, and the check that a delegated delta stays within its
//! delegation (`docs/cloud-protocol.md` §5.3).
//!
//! The root key may let another key (an organisation's, an admin's) sign deltas for some
//! doors until an expiry. The check runs inside the delta's own transaction, against the key
//! set it changes, so a key cannot slip out of scope between the check and the write.

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::lookup::key_by_id;
use super::{DeltaChange, HeldDelegation, StoreError};
use crate::access::DoorId;

/// Holds `d`, unless its id was revoked or a delegation of that id signed later is held.
pub(super) fn put(conn: &Connection, d: &HeldDelegation) -> Result<bool, StoreError> {
    let changed = conn
        .prepare_cached(
            "INSERT INTO delegations (id, public_key, doors, not_after, issued_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET public_key = ?2, doors = ?3, not_after = ?4,
                 issued_at = ?5
             WHERE revoked = 0 AND issued_at < ?5",
        )?
        .execute(params![
            d.id,
            d.public_key.as_slice(),
            d.doors.join("\n"),
            d.not_after.as_second(),
            d.issued_at.as_second()
        ])?;
    if changed > 0 {
        return Ok(true);
    }
    // The same delegation again (a QoS 1 redelivery) is held already: taken, not refused.
    let same: Option<i64> = conn
        .prepare_cached(
            "SELECT 1 FROM delegations WHERE id = ?1 AND revoked = 0 AND issued_at = ?2
             AND public_key = ?3 AND doors = ?4 AND not_after = ?5",
        )?
        .query_row(
            params![
                d.id,
                d.issued_at.as_second(),
                d.public_key.as_slice(),
                d.doors.join("\n"),
                d.not_after.as_second()
            ],
            |r| r.get(0),
        )
        .optional()?;
    Ok(same.is_some())
}

/// Revokes the delegation `id` for good: a tombstone stays so that a replay is not taken.
pub(super) fn revoke(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO delegations (id, public_key, doors, not_after, issued_at, revoked)
         VALUES (?1, NULL, '', 0, 0, 1)
         ON CONFLICT (id) DO UPDATE SET public_key = NULL, doors = '', revoked = 1",
    )?
    .execute(params![id])?;
    Ok(())
}

/// The delegations held and not revoked.
pub(super) fn held(conn: &Connection) -> Result<Vec<HeldDelegation>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, public_key, doors, not_after, issued_at FROM delegations WHERE revoked = 0",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, key, doors, not_after, issued_at) = row?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("delegation {id}: {what}"));
        out.push(HeldDelegation {
            public_key: key.as_slice().try_into().map_err(|_| corrupt("key"))?,
            doors: doors.split('\n').map(DoorId::from).collect(),
            not_after: Timestamp::from_second(not_after).map_err(|_| corrupt("not_after"))?,
            issued_at: Timestamp::from_second(issued_at).map_err(|_| corrupt("issued_at"))?,
            id,
        });
    }
    Ok(out)
}

/// Refuses (`OutsideDelegation`) a delta signed under delegation `id` that reaches beyond it:
/// the delegation must be held, unrevoked and unexpired both at the delta's `issued_at` and
/// `now`; every upserted key, and every key it replaces or revokes, must lie within its doors;
/// it may not set `opens_inner_door` (inner doors lie behind the listed ones) nor
/// `stale_after` (a setting of the whole key set).
pub(super) fn check_delta(
    conn: &Connection,
    generation: i64,
    id: &str,
    d: &DeltaChange,
    now: Timestamp,
) -> Result<(), StoreError> {
    let out = |why: String| Err(StoreError::OutsideDelegation(why));
    let row: Option<(i64, String, i64)> = conn
        .prepare_cached("SELECT not_after, doors, revoked FROM delegations WHERE id = ?1")?
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((not_after, doors, revoked)) = row else {
        return out(format!("delegation {id} is not held"));
    };
    if revoked != 0 {
        return out(format!("delegation {id} is revoked"));
    }
    let not_after = Timestamp::from_second(not_after)
        .map_err(|_| StoreError::Corrupt(format!("delegation {id}: not_after")))?;
    let signed = d.issued_at.unwrap_or(now);
    if signed >= not_after || now >= not_after {
        return out(format!("delegation {id} expired at {not_after}"));
    }
    if d.stale_after.is_some() {
        return out(format!(
            "delegation {id} may not change stale_after (root only)"
        ));
    }
    let scope: Vec<&str> = doors.split('\n').collect();
    let within = |key: &str, doors: &[DoorId]| -> Result<(), StoreError> {
        match doors.iter().find(|door| !scope.contains(&door.as_str())) {
            Some(door) => out(format!(
                "key {key} opens door {door}, outside delegation {id}"
            )),
            None => Ok(()),
        }
    };
    for key in &d.upserts {
        let rules = &key.rules;
        if rules.opens_inner_door {
            return out(format!(
                "key {} opens inner doors, outside delegation {id}",
                rules.id
            ));
        }
        within(&rules.id, &rules.doors)?;
        if let Some(old) = key_by_id(conn, generation, &rules.id)? {
            within(&rules.id, &old.doors)?;
        }
    }
    for key in &d.revokes {
        if let Some(old) = key_by_id(conn, generation, key)? {
            within(key, &old.doors)?;
        }
    }
    Ok(())
}
