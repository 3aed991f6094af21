//! Reading a key's rules from a generation of the held key set: by credential digest (the
//! decision's one descent into `credentials`) and by key id. Shared by the writer, the read
//! connections and the delegation checks.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};

use super::{StoreError, rules};
use crate::access::KeyRules;

/// Looks a digest up in a generation of the key set: one descent into `credentials`, whose
/// row carries the key's rules (rows written before schema version 5 carry none: their rules
/// are read from `keys`).
pub(super) fn lookup(
    conn: &Connection,
    generation: i64,
    digest: &[u8; 32],
) -> Result<Option<KeyRules>, StoreError> {
    let found = conn
        .prepare_cached(
            "SELECT rules, key_id FROM credentials WHERE generation = ?1 AND digest = ?2",
        )?
        .query_row(params![generation, digest], |r| {
            Ok(match r.get_ref(0)? {
                ValueRef::Blob(blob) => Ok(rules::decode(blob)),
                _ => Err(r.get::<_, String>(1)?),
            })
        })
        .optional()?;
    match found {
        None => Ok(None),
        Some(Ok(decoded)) => decoded.map(Some),
        Some(Err(key_id)) => key_by_id(conn, generation, &key_id),
    }
}

/// A key's rules by id in a generation.
pub(super) fn key_by_id(
    conn: &Connection,
    generation: i64,
    key_id: &str,
) -> Result<Option<KeyRules>, StoreError> {
    let blob: Option<Vec<u8>> = conn
        .prepare_cached("SELECT rules FROM keys WHERE generation = ?1 AND key_id = ?2")?
        .query_row(params![generation, key_id], |r| r.get(0))
        .optional()?;
    blob.map(|b| rules::decode(&b)).transpose()
}
