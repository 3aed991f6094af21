//! The cloud's side of the protocol: signed snapshots, deltas and commands, built from keys.
//!
//! Pure (no I/O). Used by the reference cloud (`cloud-sim`), tests, benchmarks and the demo.
//! Everything built here opens with [`doorbridge_proto::cloud::envelope::open`] and passes the gateway's
//! decoders and [`doorbridge_proto::cloud::sync::Sync`]; see `docs/cloud-protocol.md`.
//!
//! [`snapshot`] packs keys greedily into chunks of at most [`MAX_CHUNK_BYTES`]: each key is
//! CBOR-encoded once and its bytes are appended to the chunk being filled, whose small header
//! (`version`, `index`, the array length) is written when the chunk is closed. Memory is the
//! chunks themselves plus one chunk being filled.

use ed25519_dalek::SigningKey;
use jiff::{SignedDuration, Timestamp};

use doorbridge::cloud::bundle::Bundle;
use doorbridge_proto::access::{DoorId, Key, KeyId, StaleLimits};
use doorbridge_proto::cbor::{
    MAJOR_ARRAY, MAJOR_MAP, MAJOR_UINT, head_len, write_head, write_text,
};
use doorbridge_proto::cloud::envelope::{Kind, seal};
use doorbridge_proto::cloud::payload::{
    Delegation, DelegationRevoke, Delta, Heartbeat, MAX_BODY_BYTES, MAX_CHUNK_BYTES, MAX_CHUNKS,
    MAX_ID, MAX_KEYS, Manifest, OpenDoor, PayloadError, ResyncCommand, Sha256Digest, Target,
    UnitSettings,
};

/// A snapshot in the offline file `doorbridge keys import` reads.
impl From<SignedSnapshot> for Bundle {
    fn from(s: SignedSnapshot) -> Self {
        Bundle {
            manifest: s.manifest,
            chunks: s.chunks,
        }
    }
}

/// Why a message could not be built. Nothing built would have been accepted by a gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("version 0 is reserved for \"no key set\"")]
    VersionZero,
    #[error(
        "key {index} ({id:?}) encodes to {len} bytes: it does not fit in one chunk of {max} bytes"
    )]
    KeyTooLarge {
        index: usize,
        id: String,
        len: usize,
        max: usize,
    },
    #[error("{count} keys: a snapshot holds at most {MAX_KEYS}")]
    TooManyKeys { count: usize },
    #[error(
        "the keys need more than {MAX_CHUNKS} chunks of {MAX_CHUNK_BYTES} bytes (reached after {keys_packed} keys)"
    )]
    TooManyChunks { keys_packed: usize },
    #[error("key {index} ({id:?}): {reason}")]
    InvalidKey {
        index: usize,
        id: String,
        reason: &'static str,
    },
    #[error("the body is {len} bytes, over the limit of {MAX_BODY_BYTES}")]
    BodyTooLarge { len: usize },
    #[error("invalid message: {0}")]
    Invalid(#[from] PayloadError),
}

/// A signed snapshot: the sealed manifest envelope and the exact bytes of each chunk, in index
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedSnapshot {
    /// The manifest in its envelope (publish on `keys/manifest`).
    pub manifest: Vec<u8>,
    /// The bare chunks (publish on `keys/chunk`, in this order, after the manifest).
    pub chunks: Vec<Vec<u8>>,
}

impl SignedSnapshot {
    /// The bytes of the manifest and every chunk.
    pub fn total_bytes(&self) -> usize {
        self.manifest.len() + self.chunks.iter().map(Vec::len).sum::<usize>()
    }
}

/// The checks the gateway makes on each key of a chunk or delta.
fn check_key(index: usize, key: &Key) -> Result<(), BuildError> {
    let invalid = |reason| BuildError::InvalidKey {
        index,
        id: key.rules.id.to_string(),
        reason,
    };
    if key.rules.id.is_empty() || key.rules.id.len() > MAX_ID {
        return Err(invalid("key id empty or too long"));
    }
    key.rules.schedule.validate().map_err(invalid)
}

/// Builds and signs a full snapshot of `keys` for `target`.
pub fn snapshot(
    target: &Target,
    version: u64,
    issued_at: Timestamp,
    salt: &[u8],
    keys: &[Key],
    signer: &SigningKey,
) -> Result<SignedSnapshot, BuildError> {
    let head = Head {
        target,
        version,
        issued_at,
        salt,
        stale_after: None,
    };
    snapshot_within(&head, keys, signer, max_chunks())
}

/// [`snapshot`] of a key set whose categories in `stale_after` stop opening once the gateway
/// has not heard from the cloud for longer (`docs/cloud-protocol.md` §5.2).
pub fn snapshot_with_stale_after(
    target: &Target,
    version: u64,
    issued_at: Timestamp,
    salt: &[u8],
    keys: &[Key],
    stale_after: StaleLimits,
    signer: &SigningKey,
) -> Result<SignedSnapshot, BuildError> {
    let head = Head {
        target,
        version,
        issued_at,
        salt,
        stale_after: Some(stale_after),
    };
    snapshot_within(&head, keys, signer, max_chunks())
}

fn max_chunks() -> usize {
    usize::try_from(MAX_CHUNKS).unwrap_or(usize::MAX)
}

/// What a snapshot's manifest says besides its chunks.
struct Head<'a> {
    target: &'a Target,
    version: u64,
    issued_at: Timestamp,
    salt: &'a [u8],
    stale_after: Option<StaleLimits>,
}

fn snapshot_within(
    head: &Head<'_>,
    keys: &[Key],
    signer: &SigningKey,
    max_chunks: usize,
) -> Result<SignedSnapshot, BuildError> {
    let version = head.version;
    if version == 0 {
        return Err(BuildError::VersionZero);
    }
    if keys.len() as u64 > MAX_KEYS {
        return Err(BuildError::TooManyKeys { count: keys.len() });
    }
    let mut packer = Packer::new(version);
    let mut encoded = Vec::with_capacity(512);
    for (index, key) in keys.iter().enumerate() {
        check_key(index, key)?;
        encoded.clear();
        ciborium::ser::into_writer(key, &mut encoded)
            .map_err(|e| BuildError::Invalid(PayloadError::Cbor(format!("key {index}: {e}"))))?;
        if !packer.fits(encoded.len()) {
            if packer.count == 0 {
                return Err(BuildError::KeyTooLarge {
                    index,
                    id: key.rules.id.to_string(),
                    len: encoded.len(),
                    max: MAX_CHUNK_BYTES - header_len(version, 0, 1),
                });
            }
            packer.close();
            if packer.chunks.len() >= max_chunks {
                return Err(BuildError::TooManyChunks { keys_packed: index });
            }
            if !packer.fits(encoded.len()) {
                return Err(BuildError::KeyTooLarge {
                    index,
                    id: key.rules.id.to_string(),
                    len: encoded.len(),
                    max: MAX_CHUNK_BYTES - header_len(version, packer.index(), 1),
                });
            }
        }
        packer.push(&encoded);
    }
    if packer.count > 0 {
        packer.close();
    }
    let chunks = packer.chunks;
    let manifest = Manifest {
        target: head.target.clone(),
        version,
        issued_at: head.issued_at,
        salt: head.salt.to_vec(),
        chunk_count: u32::try_from(chunks.len()).map_err(|_| BuildError::TooManyChunks {
            keys_packed: keys.len(),
        })?,
        chunk_hashes: chunks.iter().map(|c| Sha256Digest::of(c)).collect(),
        key_count: keys.len() as u64,
        stale_after: head.stale_after,
    };
    manifest.validate()?;
    let body = manifest.encode();
    check_body(&body)?;
    Ok(SignedSnapshot {
        manifest: seal(Kind::Manifest, &body, signer),
        chunks,
    })
}

/// Builds and signs a delta from `from_version` to `version`: `upserts` added or replaced
/// whole, `deletes` revoked.
pub fn delta(
    target: &Target,
    from_version: u64,
    version: u64,
    issued_at: Timestamp,
    upserts: &[Key],
    deletes: &[String],
    signer: &SigningKey,
) -> Result<Vec<u8>, BuildError> {
    signed_delta(
        &Delta {
            target: target.clone(),
            from_version,
            version,
            issued_at,
            upserts: upserts.to_vec(),
            deletes: deletes.iter().map(KeyId::from).collect(),
            stale_after: None,
        },
        signer,
    )
}

/// Checks and signs any delta (one that sets `stale_after`, say).
pub fn signed_delta(delta: &Delta, signer: &SigningKey) -> Result<Vec<u8>, BuildError> {
    if delta.version == 0 {
        return Err(BuildError::VersionZero);
    }
    for (index, key) in delta.upserts.iter().enumerate() {
        check_key(index, key)?;
    }
    delta.validate()?;
    let body = delta.encode();
    check_body(&body)?;
    Ok(seal(Kind::Delta, &body, signer))
}

/// Signs, with a root key, a delegation of `doors` to the key `public_key` until `not_after`
/// (`docs/cloud-protocol.md` §5.3). Published on `keys/delta`.
pub fn delegation(
    target: &Target,
    id: &str,
    public_key: &ed25519_dalek::VerifyingKey,
    doors: &[String],
    not_after: Timestamp,
    issued_at: Timestamp,
    root: &SigningKey,
) -> Result<Vec<u8>, BuildError> {
    let body = Delegation {
        target: target.clone(),
        id: id.to_owned(),
        public_key: public_key.as_bytes().to_vec(),
        doors: doors.iter().map(DoorId::from).collect(),
        not_after,
        issued_at,
    }
    .encode();
    Delegation::decode(&body)?;
    Ok(seal(Kind::Delegation, &body, root))
}

/// Signs, with a root key, the revocation of delegation `id` (§5.3). Published on
/// `keys/delta`.
pub fn revoke_delegation(
    target: &Target,
    id: &str,
    issued_at: Timestamp,
    root: &SigningKey,
) -> Result<Vec<u8>, BuildError> {
    let body = DelegationRevoke {
        target: target.clone(),
        id: id.to_owned(),
        issued_at,
    }
    .encode();
    DelegationRevoke::decode(&body)?;
    Ok(seal(Kind::DelegationRevoke, &body, root))
}

/// Signs a heartbeat: `version` is the latest key-set version the cloud has made for the
/// gateway as of `issued_at` (`docs/cloud-protocol.md` §5.1).
pub fn heartbeat(
    target: &Target,
    version: u64,
    issued_at: Timestamp,
    signer: &SigningKey,
) -> Result<Vec<u8>, BuildError> {
    if version == 0 {
        return Err(BuildError::VersionZero);
    }
    let body = Heartbeat {
        target: target.clone(),
        version,
        issued_at,
    }
    .encode();
    Ok(seal(Kind::Heartbeat, &body, signer))
}

/// Builds and signs an open-door command living `lifetime` from `issued_at` (the gateway
/// refuses lifetimes over 60 s by default).
pub fn open_door(
    target: &Target,
    command_id: &str,
    door: &str,
    key_id: &str,
    issued_at: Timestamp,
    lifetime: SignedDuration,
    signer: &SigningKey,
) -> Vec<u8> {
    let command = OpenDoor {
        target: target.clone(),
        command_id: command_id.into(),
        door: door.into(),
        key_id: key_id.into(),
        issued_at,
        expires_at: issued_at.checked_add(lifetime).unwrap_or(Timestamp::MAX),
    };
    seal(Kind::OpenDoor, &command.encode(), signer)
}

/// Builds and signs door-unit settings living `lifetime` from `issued_at`.
pub fn unit_settings(settings: &UnitSettings, signer: &SigningKey) -> Vec<u8> {
    seal(Kind::UnitSettings, &settings.encode(), signer)
}

/// Builds and signs a resync command: the gateway answers with a `resync` report naming its
/// held version.
pub fn resync(
    target: &Target,
    command_id: Option<&str>,
    issued_at: Timestamp,
    signer: &SigningKey,
) -> Vec<u8> {
    let command = ResyncCommand {
        target: target.clone(),
        command_id: command_id.map(str::to_owned),
        issued_at,
    };
    seal(Kind::Resync, &command.encode(), signer)
}

fn check_body(body: &[u8]) -> Result<(), BuildError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(BuildError::BodyTooLarge { len: body.len() });
    }
    Ok(())
}

/// Fills chunks with pre-encoded keys.
struct Packer {
    version: u64,
    chunks: Vec<Vec<u8>>,
    /// The encoded keys of the chunk being filled.
    body: Vec<u8>,
    count: u64,
}

impl Packer {
    fn new(version: u64) -> Self {
        Packer {
            version,
            chunks: Vec::new(),
            body: Vec::with_capacity(MAX_CHUNK_BYTES),
            count: 0,
        }
    }

    fn index(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Whether one more key of `len` bytes fits in the chunk being filled.
    fn fits(&self, len: usize) -> bool {
        header_len(self.version, self.index(), self.count + 1) + self.body.len() + len
            <= MAX_CHUNK_BYTES
    }

    fn push(&mut self, encoded: &[u8]) {
        self.body.extend_from_slice(encoded);
        self.count += 1;
    }

    /// Writes the chunk being filled: `{"version": v, "index": i, "keys": [..]}`, the same
    /// layout serde gives [`Chunk`].
    fn close(&mut self) {
        let mut chunk = Vec::with_capacity(
            header_len(self.version, self.index(), self.count) + self.body.len(),
        );
        write_header(&mut chunk, self.version, self.index(), self.count);
        chunk.extend_from_slice(&self.body);
        self.chunks.push(chunk);
        self.body.clear();
        self.count = 0;
    }
}

fn write_header(out: &mut Vec<u8>, version: u64, index: u64, count: u64) {
    write_head(out, MAJOR_MAP, 3);
    write_text(out, "version");
    write_head(out, MAJOR_UINT, version);
    write_text(out, "index");
    write_head(out, MAJOR_UINT, index);
    write_text(out, "keys");
    write_head(out, MAJOR_ARRAY, count);
}

fn header_len(version: u64, index: u64, count: u64) -> usize {
    1 + 8 + head_len(version) + 6 + head_len(index) + 5 + head_len(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use doorbridge_proto::access::credential::digest;
    use doorbridge_proto::access::{
        Category, Credential, CredentialKind, KeyRules, Schedule, UseLimit, Window,
    };
    use doorbridge_proto::cloud::envelope::open;
    use doorbridge_proto::cloud::payload::Chunk;
    use doorbridge_proto::cloud::payload::MAX_ENVELOPE_BYTES;
    use doorbridge_proto::cloud::sync::{Action, Sync};

    fn target() -> Target {
        Target {
            site: "s1".into(),
            gateway: "gw1".into(),
        }
    }

    fn signer() -> SigningKey {
        SigningKey::from_bytes(&[0x42; 32])
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn key(i: usize, name_len: usize) -> Key {
        Key {
            rules: KeyRules {
                id: format!("k{i}").into(),
                name: "n".repeat(name_len),
                category: Category::Friend,
                doors: vec!["main".into()],
                opens_inner_door: false,
                valid_from: None,
                valid_until: None,
                schedule: Schedule::Always,
                use_limit: UseLimit::Unlimited,
                welcome: None,
                floors: Vec::new(),
                revoked: false,
                issuer: None,
            },
            credentials: vec![Credential {
                kind: CredentialKind::Pin,
                digest: digest(b"salt", CredentialKind::Pin, format!("{i:06}").as_bytes()),
            }],
        }
    }

    fn keys(n: usize) -> Vec<Key> {
        (0..n).map(|i| key(i, i % 50)).collect()
    }

    /// Feeds a snapshot through the gateway's state machine; the actions it answers with.
    fn install(snap: &SignedSnapshot, held: u64) -> Vec<Action> {
        let now = at("2026-01-01T00:00:00Z");
        let opened = open(
            &snap.manifest,
            &[signer().verifying_key()],
            MAX_ENVELOPE_BYTES,
        )
        .unwrap();
        assert_eq!(opened.kind, Kind::Manifest);
        let manifest = Manifest::decode(&opened.body).unwrap();
        let mut sync = Sync::new(target(), held);
        let mut actions = sync.on_manifest(manifest, now);
        for chunk in &snap.chunks {
            actions.extend(sync.on_chunk(chunk, now));
        }
        actions
    }

    #[test]
    fn a_snapshot_installs_through_the_gateway_state_machine() {
        let keys = keys(5000);
        let snap = snapshot(
            &target(),
            9,
            at("2026-01-01T00:00:00Z"),
            b"salt",
            &keys,
            &signer(),
        )
        .unwrap();
        assert!(snap.chunks.len() > 1, "{} chunks", snap.chunks.len());
        let mut staged = Vec::new();
        for (i, c) in snap.chunks.iter().enumerate() {
            assert!(c.len() <= MAX_CHUNK_BYTES, "chunk {i}: {} bytes", c.len());
            let chunk = Chunk::decode(c).unwrap();
            assert_eq!((chunk.version, chunk.index as usize), (9, i));
            // The hand-written header is what serde writes for the same chunk.
            assert_eq!(&chunk.encode(), c);
            staged.extend(chunk.keys);
        }
        assert_eq!(staged, keys);
        let actions = install(&snap, 3);
        assert!(
            actions.contains(&Action::Commit {
                version: 9,
                key_count: 5000
            }),
            "{actions:?}"
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Reject { .. })));
    }

    #[test]
    fn chunks_are_filled_close_to_the_limit() {
        let snap = snapshot(
            &target(),
            1,
            Timestamp::UNIX_EPOCH,
            b"",
            &keys(3000),
            &signer(),
        )
        .unwrap();
        let (last, full) = snap.chunks.split_last().unwrap();
        assert!(!full.is_empty());
        for c in full {
            // Keys are at most ~300 bytes, so a closed chunk has less than that to spare.
            assert!(c.len() > MAX_CHUNK_BYTES - 400, "{}", c.len());
        }
        assert!(last.len() <= MAX_CHUNK_BYTES);
    }

    #[test]
    fn an_empty_key_set_commits_at_once() {
        let snap = snapshot(&target(), 1, Timestamp::UNIX_EPOCH, b"", &[], &signer()).unwrap();
        assert!(snap.chunks.is_empty());
        assert!(install(&snap, 0).contains(&Action::Commit {
            version: 1,
            key_count: 0
        }));
    }

    #[test]
    fn bad_snapshots_are_refused_with_the_reason() {
        let now = Timestamp::UNIX_EPOCH;
        assert_eq!(
            snapshot(&target(), 0, now, b"", &[], &signer()),
            Err(BuildError::VersionZero)
        );
        let big = key(0, MAX_CHUNK_BYTES);
        assert!(matches!(
            snapshot(&target(), 1, now, b"", &[big], &signer()),
            Err(BuildError::KeyTooLarge { index: 0, .. })
        ));
        let mut bad = keys(3);
        bad[2].rules.schedule = Schedule::Daily {
            window: Window {
                start: jiff::civil::time(8, 0, 0, 0),
                end: jiff::civil::time(8, 0, 0, 0),
            },
        };
        assert!(matches!(
            snapshot(&target(), 1, now, b"", &bad, &signer()),
            Err(BuildError::InvalidKey { index: 2, .. })
        ));
        bad[2] = key(2, 0);
        bad[2].rules.id = String::new().into();
        assert!(matches!(
            snapshot(&target(), 1, now, b"", &bad, &signer()),
            Err(BuildError::InvalidKey { index: 2, .. })
        ));
        assert!(matches!(
            snapshot(&target(), 1, now, &[0; 65], &[], &signer()),
            Err(BuildError::Invalid(_))
        ));
    }

    #[test]
    fn too_many_chunks_is_refused_early() {
        // Keys of ~10 KiB: 12 to a chunk. With room for 2 chunks, the 25th key is refused.
        let keys: Vec<Key> = (0..40).map(|i| key(i, 10_000)).collect();
        let now = Timestamp::UNIX_EPOCH;
        let head = Head {
            target: &target(),
            version: 1,
            issued_at: now,
            salt: b"",
            stale_after: None,
        };
        assert!(snapshot_within(&head, &keys[..24], &signer(), 2).is_ok());
        assert_eq!(
            snapshot_within(&head, &keys, &signer(), 2),
            Err(BuildError::TooManyChunks { keys_packed: 24 })
        );
    }

    /// A million keys fit one snapshot: `cargo test --release -p doorbridge-sim --lib build -- --ignored
    /// --nocapture` (slow in debug builds). A small realistic key (one PIN, one door) encodes
    /// to ~235 bytes, so a million need ~1800 chunks of the 3072 allowed.
    #[test]
    #[ignore = "slow in debug builds"]
    fn a_million_keys_fit_one_snapshot() {
        let keys: Vec<Key> = (0..1_000_000).map(|i| key(i, 0)).collect();
        let started = std::time::Instant::now();
        let built = snapshot(&target(), 1, Timestamp::UNIX_EPOCH, b"", &keys, &signer()).unwrap();
        eprintln!(
            "1M keys: {} chunks, {} bytes in {:?}",
            built.chunks.len(),
            built.total_bytes(),
            started.elapsed()
        );
        let opened = doorbridge_proto::cloud::envelope::open(
            &built.manifest,
            &[signer().verifying_key()],
            doorbridge_proto::cloud::payload::MAX_ENVELOPE_BYTES,
        )
        .unwrap();
        let manifest = Manifest::decode(&opened.body).unwrap();
        assert_eq!(manifest.key_count, 1_000_000);
    }

    #[test]
    fn deltas_and_commands_open_and_decode() {
        let trusted = [signer().verifying_key()];
        let now = at("2026-01-01T00:01:00Z");
        let d = delta(&target(), 7, 8, now, &keys(3), &["gone".into()], &signer()).unwrap();
        let opened = open(&d, &trusted, MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(opened.kind, Kind::Delta);
        let decoded = Delta::decode(&opened.body).unwrap();
        assert_eq!((decoded.from_version, decoded.version), (7, 8));
        assert_eq!(decoded.upserts, keys(3));
        assert_eq!(decoded.deletes, vec!["gone".to_string()]);

        assert!(matches!(
            delta(&target(), 8, 8, now, &[], &[], &signer()),
            Err(BuildError::Invalid(_))
        ));
        assert!(matches!(
            delta(&target(), 1, 2, now, &keys(2), &["k1".into()], &signer()),
            Err(BuildError::Invalid(_))
        ));
        let many: Vec<Key> = (0..2000).map(|i| key(i, 10)).collect();
        assert!(matches!(
            delta(&target(), 1, 2, now, &many, &[], &signer()),
            Err(BuildError::BodyTooLarge { .. })
        ));

        let c = open_door(
            &target(),
            "c1",
            "main",
            "k1",
            now,
            SignedDuration::from_secs(30),
            &signer(),
        );
        let opened = open(&c, &trusted, MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(opened.kind, Kind::OpenDoor);
        let command = OpenDoor::decode(&opened.body).unwrap();
        assert_eq!(command.expires_at, at("2026-01-01T00:01:30Z"));
        assert_eq!(
            (command.door.as_str(), command.key_id.as_str()),
            ("main", "k1")
        );

        let r = resync(&target(), Some("r1"), now, &signer());
        let opened = open(&r, &trusted, MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(opened.kind, Kind::Resync);
        let command = ResyncCommand::decode(&opened.body).unwrap();
        assert_eq!(
            (command.issued_at, command.command_id.as_deref()),
            (now, Some("r1"))
        );
    }

    #[test]
    fn matches_the_chunk_test_vector() {
        // §9.1 of docs/cloud-protocol.md: built by the packer, byte for byte.
        let mut k = key(1, 0);
        k.rules.name = "Ann".into();
        k.credentials[0].digest = doorbridge_proto::access::CredentialDigest([0x11; 32]);
        let snap = snapshot(
            &target(),
            7,
            at("2026-01-01T00:00:00Z"),
            &[0x5a; 16],
            &[k],
            &signer(),
        )
        .unwrap();
        let c = &snap.chunks[0];
        let hash = Sha256Digest::of(c);
        assert_eq!(&hash.0[..4], &[0xcf, 0x0e, 0x87, 0x16]);
    }
}
