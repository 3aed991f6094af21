//! The bodies of cloud messages: snapshot manifests and chunks, deltas, heartbeats and
//! commands.
//!
//! Each body is one CBOR map (serde field names as keys); byte fields (salt, hashes) are CBOR
//! byte strings. Decoders are bounded: the input size is checked first, nesting is limited,
//! trailing bytes are refused, and every count is checked against the limits below before the
//! body is handed on. Manifests, deltas and commands arrive inside a signed envelope
//! ([`super::envelope`]); chunks arrive bare and are bound to their manifest by SHA-256.

use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::access::{DoorId, Key, KeyId, StaleLimits};
use crate::cbor::CborError;

/// The largest chunk payload: AWS IoT Core's MQTT payload limit, 128 KiB.
pub const MAX_CHUNK_BYTES: usize = 128 * 1024;
/// The most chunks one snapshot may have (128 MiB of key data).
pub const MAX_CHUNKS: u32 = 3072;
/// The most keys one snapshot may hold.
pub const MAX_KEYS: u64 = 1_000_000;
/// The largest signed body (manifest, delta, command).
pub const MAX_BODY_BYTES: usize = MAX_CHUNK_BYTES;
/// The largest envelope: a body of [`MAX_BODY_BYTES`] and room for kind, kid and signature.
pub const MAX_ENVELOPE_BYTES: usize = MAX_BODY_BYTES + 256;
/// The most keys one delta may add, change or delete in total.
pub const MAX_DELTA_ENTRIES: usize = 4096;
/// The longest site, gateway, door, key or command id.
pub const MAX_ID: usize = 128;
/// The most salt bytes.
pub const MAX_SALT: usize = 64;

const RECURSION_LIMIT: usize = 32;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("body of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("body is not valid CBOR of the expected shape: {0}")]
    Cbor(String),
    #[error("{0} bytes after the body")]
    TrailingBytes(usize),
    #[error("invalid body: {0}")]
    Invalid(&'static str),
}

/// A SHA-256 digest, a CBOR byte string of 32 bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Sha256Digest(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = bytes::deserialize(d)?;
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a SHA-256 digest is 32 bytes"))?;
        Ok(Sha256Digest(array))
    }
}

/// Which gateway a signed message is for. Every signed body names it, so a message signed for
/// one gateway cannot be replayed to another.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub site: String,
    pub gateway: String,
}

/// The signed description of a full snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub target: Target,
    /// The version the gateway holds once this snapshot is committed.
    pub version: u64,
    pub issued_at: Timestamp,
    /// The site salt the credential digests were made with.
    #[serde(with = "bytes")]
    pub salt: Vec<u8>,
    pub chunk_count: u32,
    /// SHA-256 of each chunk's exact bytes, in index order.
    pub chunk_hashes: Vec<Sha256Digest>,
    /// The number of keys across all chunks.
    pub key_count: u64,
    /// How old the gateway's knowledge may get, per category, before keys of that category
    /// are refused (`docs/cloud-protocol.md` §5.2). Absent or null: no limits. Left out of the
    /// encoding when absent, so a cloud that never sets it writes what older gateways read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<StaleLimits>,
}

/// One part of a snapshot. Not signed: its SHA-256 must equal the manifest's entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub version: u64,
    pub index: u32,
    pub keys: Vec<Key>,
}

/// An incremental change on top of exactly `from_version`.
///
/// `deletes` become revoked tombstones (the key stays with `revoked = true`), so a deleted
/// key's credential is denied as "revoked" rather than "unknown credential" until the next
/// snapshot, which leaves tombstones out or keeps them as the cloud decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub target: Target,
    pub from_version: u64,
    pub version: u64,
    pub issued_at: Timestamp,
    /// Keys added or replaced whole (matched by `rules.id`).
    pub upserts: Vec<Key>,
    /// Ids of keys to revoke.
    pub deletes: Vec<KeyId>,
    /// The key set's new `stale_after`, replacing the held one whole (an empty map: no limits);
    /// absent or null: unchanged. Left out of the encoding when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<StaleLimits>,
}

/// The cloud vouches that `version` is the latest key-set version it has made for the gateway,
/// as of `issued_at`: a gateway holding exactly that version knows its keys are current then,
/// however quiet the building (`docs/cloud-protocol.md` §5.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub target: Target,
    pub version: u64,
    pub issued_at: Timestamp,
}

impl Heartbeat {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let h: Heartbeat = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&h.target)?;
        check(h.version > 0, "version 0 is reserved for no key set")?;
        Ok(h)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

/// The most doors one delegation may name.
pub const MAX_DELEGATED_DOORS: usize = 64;

/// The root key lets another key (an organisation's, an admin's) sign deltas for some doors
/// until `not_after` (`docs/cloud-protocol.md` §5.3). Signed by a root key, kind `delegation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    pub target: Target,
    /// Names the delegation: its revocation, and the issuer of the keys it puts.
    pub id: String,
    /// The delegate's 32-byte Ed25519 public key.
    #[serde(with = "bytes")]
    pub public_key: Vec<u8>,
    /// The doors whose keys the delegate may add, edit and delete; never "all doors".
    pub doors: Vec<DoorId>,
    pub not_after: Timestamp,
    /// Signing time: a delegation replaces a held one of the same id only when newer.
    pub issued_at: Timestamp,
}

impl Delegation {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let d: Delegation = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&d.target)?;
        check_id(&d.id, "delegation id empty or too long")?;
        check(d.id != "root", "the delegation id \"root\" is reserved")?;
        check(d.public_key.len() == 32, "public_key is not 32 bytes")?;
        check(
            !d.doors.is_empty() && d.doors.len() <= MAX_DELEGATED_DOORS,
            "a delegation names 1 to 64 doors",
        )?;
        for door in &d.doors {
            check_id(door, "door id empty or too long")?;
            check(!door.contains('\n'), "a door id with a line break")?;
        }
        check(
            d.not_after > d.issued_at,
            "not_after is not after issued_at",
        )?;
        Ok(d)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

/// The root key withdraws a delegation for good (kind `delegation-revoke`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationRevoke {
    pub target: Target,
    pub id: String,
    pub issued_at: Timestamp,
}

impl DelegationRevoke {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let r: DelegationRevoke = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&r.target)?;
        check_id(&r.id, "delegation id empty or too long")?;
        Ok(r)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

/// A remote "open this door" from the app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenDoor {
    pub target: Target,
    /// Unique per command; a second command with the same id is a replay.
    pub command_id: String,
    pub door: DoorId,
    /// The key on whose behalf the door opens (for the activity record).
    pub key_id: KeyId,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The cloud asks the gateway for a full snapshot: the gateway answers with a `resync` report
/// naming its held version (see [`super::report::Report::Resync`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncCommand {
    pub target: Target,
    /// Echoed in the command's `command-result`; optional (a cloud that leaves it out gets
    /// `command_id: null` back), left out of the encoding when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    pub issued_at: Timestamp,
}

fn check(ok: bool, what: &'static str) -> Result<(), PayloadError> {
    if ok {
        Ok(())
    } else {
        Err(PayloadError::Invalid(what))
    }
}

fn check_id(id: &str, what: &'static str) -> Result<(), PayloadError> {
    check(!id.is_empty() && id.len() <= MAX_ID, what)
}

fn check_target(t: &Target) -> Result<(), PayloadError> {
    check_id(&t.site, "site id empty or too long")?;
    check_id(&t.gateway, "gateway id empty or too long")?;
    check(
        is_topic_segment(&t.site) && is_topic_segment(&t.gateway),
        "site or gateway id is not one topic segment",
    )
}

/// Whether `s` can stand as one MQTT topic level: no `/`, wildcards or NUL.
pub fn is_topic_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

fn check_keys(keys: &[Key]) -> Result<(), PayloadError> {
    for key in keys {
        check_id(&key.rules.id, "key id empty or too long")?;
        check(key.rules.schedule.validate().is_ok(), "invalid schedule")?;
    }
    Ok(())
}

impl Manifest {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let m: Manifest = from_cbor(body, MAX_BODY_BYTES)?;
        m.validate()?;
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    pub fn validate(&self) -> Result<(), PayloadError> {
        check_target(&self.target)?;
        check(self.version > 0, "version 0 is reserved for no key set")?;
        check(self.salt.len() <= MAX_SALT, "salt too long")?;
        check(self.chunk_count <= MAX_CHUNKS, "too many chunks")?;
        check(
            usize::try_from(self.chunk_count).is_ok_and(|n| n == self.chunk_hashes.len()),
            "chunk_hashes does not hold chunk_count entries",
        )?;
        check(self.key_count <= MAX_KEYS, "too many keys")?;
        check(
            self.chunk_count > 0 || self.key_count == 0,
            "keys announced without chunks",
        )
    }
}

impl Chunk {
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let c: Chunk = from_cbor(bytes, MAX_CHUNK_BYTES)?;
        check_keys(&c.keys)?;
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

impl Delta {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let d: Delta = from_cbor(body, MAX_BODY_BYTES)?;
        d.validate()?;
        Ok(d)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    pub fn validate(&self) -> Result<(), PayloadError> {
        check_target(&self.target)?;
        check(
            self.version > self.from_version,
            "version not above from_version",
        )?;
        check(
            self.upserts.len() + self.deletes.len() <= MAX_DELTA_ENTRIES,
            "too many entries",
        )?;
        check_keys(&self.upserts)?;
        let mut ids: Vec<&str> = self.upserts.iter().map(|k| k.rules.id.as_str()).collect();
        for id in &self.deletes {
            check_id(id, "deleted key id empty or too long")?;
            ids.push(id);
        }
        ids.sort_unstable();
        check(
            ids.windows(2).all(|w| w[0] != w[1]),
            "a key id appears twice",
        )
    }
}

impl OpenDoor {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let c: OpenDoor = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&c.target)?;
        check_id(&c.command_id, "command id empty or too long")?;
        check_id(&c.door, "door id empty or too long")?;
        check_id(&c.key_id, "key id empty or too long")?;
        check(c.expires_at > c.issued_at, "expires before it is issued")?;
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

/// Settings for the door unit serving `door`: the fields given replace the desired ones, the
/// others stay as they are. The gateway holds them as desired state and pushes them to the
/// unit now, or when it is next reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSettings {
    pub target: Target,
    /// Unique per command; a second command with the same id is a replay.
    pub command_id: String,
    pub door: DoorId,
    /// Sound volume, 0 to 100.
    pub volume: Option<u8>,
    /// The name the unit shows.
    pub name: Option<String>,
    pub house_number: Option<String>,
    /// Whether an inner door is wired to this unit.
    pub inner_door: Option<bool>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// The longest display name or house number a unit takes.
pub const MAX_SETTING_TEXT: usize = 32;

impl UnitSettings {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let c: UnitSettings = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&c.target)?;
        check_id(&c.command_id, "command id empty or too long")?;
        check_id(&c.door, "door id empty or too long")?;
        check(c.volume.is_none_or(|v| v <= 100), "volume over 100")?;
        check(
            c.name.as_ref().is_none_or(|n| n.len() <= MAX_SETTING_TEXT)
                && c.house_number
                    .as_ref()
                    .is_none_or(|n| n.len() <= MAX_SETTING_TEXT),
            "name or house number longer than 32 bytes",
        )?;
        check(
            c.volume.is_some()
                || c.name.is_some()
                || c.house_number.is_some()
                || c.inner_door.is_some(),
            "no setting given",
        )?;
        check(c.expires_at > c.issued_at, "expires before it is issued")?;
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

impl ResyncCommand {
    pub fn decode(body: &[u8]) -> Result<Self, PayloadError> {
        let c: ResyncCommand = from_cbor(body, MAX_BODY_BYTES)?;
        check_target(&c.target)?;
        if let Some(id) = &c.command_id {
            check_id(id, "command_id empty or too long")?;
        }
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }
}

pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    crate::cbor::encode(value)
}

pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, PayloadError> {
    if bytes.len() > max {
        return Err(PayloadError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    crate::cbor::decode(bytes, max, RECURSION_LIMIT).map_err(|e| match e {
        CborError::TooLarge { len, max } => PayloadError::TooLarge { len, max },
        CborError::Invalid(e) => PayloadError::Cbor(e),
        CborError::TrailingBytes(n) => PayloadError::TrailingBytes(n),
    })
}

/// `Vec<u8>` as a CBOR byte string.
pub mod bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    #[allow(clippy::ptr_arg)]
    pub fn serialize<S: Serializer>(bytes: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}
