//! Unit tests of the cloud link's pure core.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use jiff::SignedDuration;
use proptest::prelude::*;

use super::envelope::{self, EnvelopeError, Kind, SignerId, encode, open, seal, signing_input};
use super::payload::{
    Chunk, Delta, Heartbeat, MAX_CHUNK_BYTES, MAX_ENVELOPE_BYTES, Manifest, OpenDoor, PayloadError,
    Sha256Digest,
};
use super::sync::{
    Action, CommandRejection, RejectReason, ReplayCache, ResyncReason, SNAPSHOT_TIMEOUT, Sync,
};
use super::vectors::{at, chunk, delta, key, manifest, open_door, target, test_key};

use crate::access::{Category, StaleLimits};

const MAX: usize = MAX_ENVELOPE_BYTES;

fn trusted() -> Vec<VerifyingKey> {
    vec![
        SigningKey::from_bytes(&[0x07; 32]).verifying_key(),
        test_key().verifying_key(),
    ]
}

// --- envelope ---

#[test]
fn a_sealed_envelope_opens_to_its_exact_body() {
    let body = manifest().encode();
    let opened = open(&seal(Kind::Manifest, &body, &test_key()), &trusted(), MAX).unwrap();
    assert_eq!(opened.kind, Kind::Manifest);
    assert_eq!(opened.kid, SignerId::of(&test_key().verifying_key()));
    assert_eq!(opened.body, body);
    assert_eq!(Manifest::decode(&opened.body).unwrap(), manifest());
}

#[test]
fn signing_input_is_domain_kind_body() {
    assert_eq!(
        signing_input(Kind::OpenDoor, b"xy"),
        b"doorbridge-v1:open-door:xy"
    );
}

#[test]
fn a_forged_signature_is_refused() {
    let mut env = seal(Kind::Manifest, &manifest().encode(), &test_key());
    // Flip one bit of the signature (it starts after kind and kid: find it by re-encoding).
    let kid = SignerId::of(&test_key().verifying_key());
    let body = manifest().encode();
    let sig = test_key()
        .sign(&signing_input(Kind::Manifest, &body))
        .to_bytes();
    let mut bad = sig;
    bad[10] ^= 1;
    assert_eq!(
        open(&encode("manifest", kid, &bad, &body), &trusted(), MAX),
        Err(EnvelopeError::BadSignature)
    );
    // A changed body under the original signature fails too.
    let last = env.len() - 1;
    env[last] ^= 1;
    assert_eq!(
        open(&env, &trusted(), MAX),
        Err(EnvelopeError::BadSignature)
    );
}

#[test]
fn an_unknown_kid_is_refused() {
    let other = SigningKey::from_bytes(&[0x99; 32]);
    let env = seal(Kind::Delta, &delta().encode(), &other);
    assert_eq!(
        open(&env, &trusted(), MAX),
        Err(EnvelopeError::UnknownKey(SignerId::of(
            &other.verifying_key()
        )))
    );
    assert!(matches!(
        open(&seal(Kind::Delta, &delta().encode(), &test_key()), &[], MAX),
        Err(EnvelopeError::UnknownKey(_))
    ));
}

#[test]
fn a_signature_by_an_untrusted_key_under_a_trusted_kid_is_refused() {
    let other = SigningKey::from_bytes(&[0x99; 32]);
    let body = delta().encode();
    let sig = other.sign(&signing_input(Kind::Delta, &body)).to_bytes();
    let kid = SignerId::of(&test_key().verifying_key());
    assert_eq!(
        open(&encode("delta", kid, &sig, &body), &trusted(), MAX),
        Err(EnvelopeError::BadSignature)
    );
}

#[test]
fn a_manifest_signature_presented_as_a_command_is_refused() {
    let body = manifest().encode();
    let sig = test_key()
        .sign(&signing_input(Kind::Manifest, &body))
        .to_bytes();
    let kid = SignerId::of(&test_key().verifying_key());
    assert_eq!(
        open(&encode("open-door", kid, &sig, &body), &trusted(), MAX),
        Err(EnvelopeError::BadSignature)
    );
    assert_eq!(
        open(&encode("chunk", kid, &sig, &body), &trusted(), MAX),
        Err(EnvelopeError::UnknownKind("chunk".into()))
    );
}

#[test]
fn trailing_bytes_and_oversized_envelopes_are_refused() {
    let mut env = seal(Kind::Delta, &delta().encode(), &test_key());
    env.push(0);
    assert_eq!(
        open(&env, &trusted(), MAX),
        Err(EnvelopeError::TrailingBytes(1))
    );
    env.pop();
    assert_eq!(
        open(&env, &trusted(), 100),
        Err(EnvelopeError::TooLarge {
            len: env.len(),
            max: 100
        })
    );
}

#[test]
fn malformed_envelopes_are_refused() {
    let kid = SignerId::of(&test_key().verifying_key());
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xa0],
        vec![0x80],
        encode("delta", SignerId([0; 8]), &[0; 63], b""),
        // Nested too deep for the envelope.
        vec![0x81; 64],
    ];
    for case in cases {
        assert!(open(&case, &trusted(), MAX).is_err());
    }
    // A kid of the wrong length.
    let mut env = encode("delta", kid, &[0; 64], b"");
    let pos = env.windows(9).position(|w| w[0] == 0x48).unwrap();
    env[pos] = 0x47;
    env.remove(pos + 1);
    assert!(matches!(
        open(&env, &trusted(), MAX),
        Err(EnvelopeError::Malformed(_))
    ));
}

#[test]
fn huge_length_claims_fail_without_allocating() {
    // {"kind": "delta", "body": bytes of 2^63 − 1 …} and a body array of 2^63 − 1 keys.
    let mut env = vec![0xa2, 0x64, b'k', b'i', b'n', b'd', 0x65];
    env.extend_from_slice(b"delta");
    env.extend_from_slice(&[0x64, b'b', b'o', b'd', b'y', 0x5b]);
    env.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        open(&env, &trusted(), MAX),
        Err(EnvelopeError::Cbor(_))
    ));
    let mut chunk = vec![0xa3, 0x64, b'k', b'e', b'y', b's', 0x9b];
    chunk.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    assert!(Chunk::decode(&chunk).is_err());
}

// --- payloads ---

#[test]
fn payloads_round_trip() {
    assert_eq!(Manifest::decode(&manifest().encode()).unwrap(), manifest());
    assert_eq!(Chunk::decode(&chunk().encode()).unwrap(), chunk());
    assert_eq!(Delta::decode(&delta().encode()).unwrap(), delta());
    assert_eq!(
        OpenDoor::decode(&open_door().encode()).unwrap(),
        open_door()
    );
}

#[test]
fn invalid_payloads_are_refused() {
    let mut m = manifest();
    m.chunk_count = 2;
    assert!(matches!(
        Manifest::decode(&m.encode()),
        Err(PayloadError::Invalid(_))
    ));
    let mut m = manifest();
    m.version = 0;
    assert!(Manifest::decode(&m.encode()).is_err());
    let mut d = delta();
    d.version = d.from_version;
    assert!(Delta::decode(&d.encode()).is_err());
    let mut d = delta();
    d.upserts = vec![key("k1")];
    assert!(
        Delta::decode(&d.encode()).is_err(),
        "k1 upserted and deleted"
    );
    let mut m = manifest();
    m.target.site = "s/1".into();
    assert!(
        Manifest::decode(&m.encode()).is_err(),
        "not one topic segment"
    );
    let mut bytes = delta().encode();
    // One more entry in the map: {…, "x": 0}.
    bytes[0] += 1;
    bytes.extend_from_slice(&[0x61, b'x', 0x00]);
    assert!(Delta::decode(&bytes).is_err(), "unknown field");
    // Inside a key too: a misspelt `valid_until` must not read as "valid forever".
    let mut d = delta();
    d.upserts = vec![key("k-misspelt")];
    d.upserts[0].rules.valid_until = Some(at("2026-02-01T00:00:00Z"));
    let mut value: ciborium::Value = ciborium::from_reader(d.encode().as_slice()).unwrap();
    let rules = value
        .as_map_mut()
        .and_then(|m| m.iter_mut().find(|(k, _)| k.as_text() == Some("upserts")))
        .and_then(|(_, v)| v.as_array_mut())
        .and_then(|keys| keys[0].as_map_mut())
        .and_then(|k| k.iter_mut().find(|(k, _)| k.as_text() == Some("rules")))
        .and_then(|(_, v)| v.as_map_mut())
        .unwrap();
    for (k, _) in rules.iter_mut() {
        if k.as_text() == Some("valid_until") {
            *k = ciborium::Value::Text("valid_untl".into());
        }
    }
    let mut misspelt = Vec::new();
    ciborium::into_writer(&value, &mut misspelt).unwrap();
    assert!(
        Delta::decode(&misspelt).is_err(),
        "a key with an unknown field is refused, not read without it"
    );
    let mut c = open_door();
    c.expires_at = c.issued_at;
    assert!(OpenDoor::decode(&c.encode()).is_err());
    let mut bytes = chunk().encode();
    bytes.push(0);
    assert_eq!(Chunk::decode(&bytes), Err(PayloadError::TrailingBytes(1)));
    assert!(matches!(
        Chunk::decode(&vec![0; MAX_CHUNK_BYTES + 1]),
        Err(PayloadError::TooLarge { .. })
    ));
}

// --- sync ---

fn t0() -> jiff::Timestamp {
    at("2026-01-01T00:00:10Z")
}

fn keys_manifest(version: u64, chunks: &[Chunk]) -> Manifest {
    Manifest {
        target: target(),
        version,
        issued_at: at("2026-01-01T00:00:00Z"),
        salt: vec![1; 16],
        chunk_count: u32::try_from(chunks.len()).unwrap(),
        chunk_hashes: chunks
            .iter()
            .map(|c| Sha256Digest::of(&c.encode()))
            .collect(),
        key_count: chunks.iter().map(|c| c.keys.len() as u64).sum(),
        stale_after: None,
    }
}

fn chunks(version: u64, n: u32) -> Vec<Chunk> {
    (0..n)
        .map(|i| Chunk {
            version,
            index: i,
            keys: vec![key(&format!("k{version}-{i}"))],
        })
        .collect()
}

fn is_reject(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::Reject { .. }))
}

fn commits(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::Commit { version, .. } => Some(*version),
        _ => None,
    })
}

#[test]
fn a_snapshot_commits_only_when_every_chunk_is_in() {
    let mut s = Sync::new(target(), 3);
    let cs = chunks(5, 3);
    let a = s.on_manifest(keys_manifest(5, &cs), t0());
    assert!(matches!(a[..], [Action::Begin { version: 5, .. }]));
    for c in &cs[..2] {
        let a = s.on_chunk(&c.encode(), t0());
        assert!(matches!(a[..], [Action::Stage { version: 5, .. }]), "{a:?}");
    }
    assert_eq!(s.held(), 3, "the old set stays until the commit");
    let a = s.on_chunk(&cs[2].encode(), t0());
    assert_eq!(commits(&a), Some(5));
    assert!(a.contains(&Action::TrustTime(at("2026-01-01T00:00:00Z"))));
    assert_eq!(s.held(), 5);
    assert_eq!(s.pending(), None);
}

#[test]
fn an_empty_snapshot_commits_at_once() {
    let mut s = Sync::new(target(), 0);
    let a = s.on_manifest(keys_manifest(1, &[]), t0());
    assert_eq!(commits(&a), Some(1));
}

#[test]
fn duplicate_chunks_are_ignored() {
    let mut s = Sync::new(target(), 0);
    let cs = chunks(5, 2);
    s.on_manifest(keys_manifest(5, &cs), t0());
    s.on_chunk(&cs[0].encode(), t0());
    let a = s.on_chunk(&cs[0].encode(), t0());
    assert!(matches!(a[..], [Action::Ignore { .. }]));
    assert_eq!(commits(&s.on_chunk(&cs[1].encode(), t0())), Some(5));
    // A redelivery after the commit is ignored too.
    assert!(matches!(
        s.on_chunk(&cs[1].encode(), t0())[..],
        [Action::Ignore { .. }]
    ));
}

#[test]
fn a_chunk_whose_hash_does_not_match_is_refused() {
    let mut s = Sync::new(target(), 0);
    let cs = chunks(5, 2);
    s.on_manifest(keys_manifest(5, &cs), t0());
    let mut forged = cs[0].clone();
    forged.keys[0].rules.doors.push("back".into());
    let a = s.on_chunk(&forged.encode(), t0());
    assert_eq!(
        a,
        vec![Action::Reject {
            reason: RejectReason::ChunkHashMismatch {
                version: 5,
                index: 0
            }
        }]
    );
    let mut out_of_range = cs[0].clone();
    out_of_range.index = 9;
    assert!(is_reject(&s.on_chunk(&out_of_range.encode(), t0())));
    assert!(is_reject(&s.on_chunk(b"\xff\x00", t0())));
    // The genuine chunks still complete the snapshot.
    s.on_chunk(&cs[0].encode(), t0());
    assert_eq!(commits(&s.on_chunk(&cs[1].encode(), t0())), Some(5));
}

#[test]
fn a_missing_chunk_times_out_into_a_resync() {
    let mut s = Sync::new(target(), 2);
    let cs = chunks(5, 2);
    s.on_manifest(keys_manifest(5, &cs), t0());
    s.on_chunk(&cs[0].encode(), t0());
    assert!(s.tick(t0() + SignedDuration::from_secs(60)).is_empty());
    let a = s.tick(t0() + SNAPSHOT_TIMEOUT + SignedDuration::from_secs(1));
    assert_eq!(
        a,
        vec![Action::RequestResync {
            reason: ResyncReason::MissingChunks {
                version: 5,
                missing: 1
            }
        }]
    );
    assert_eq!(s.held(), 2);
    assert_eq!(s.pending(), None);
}

#[test]
fn a_large_snapshot_that_keeps_making_progress_never_times_out() {
    let mut s = Sync::new(target(), 2);
    let cs = chunks(5, 10);
    s.on_manifest(keys_manifest(5, &cs), t0());
    // One chunk a minute: ten minutes in all, far beyond the timeout, but never stalled.
    for (i, c) in (1..).zip(&cs) {
        let at = t0() + SignedDuration::from_mins(i);
        let a = s.on_chunk(&c.encode(), at);
        assert!(
            !a.iter().any(|a| matches!(a, Action::RequestResync { .. })),
            "{a:?}"
        );
        if i == 10 {
            assert_eq!(commits(&a), Some(5));
        }
    }
}

#[test]
fn a_newer_manifest_supersedes_the_one_in_progress() {
    let mut s = Sync::new(target(), 0);
    let old = chunks(5, 2);
    let new = chunks(6, 1);
    s.on_manifest(keys_manifest(5, &old), t0());
    s.on_chunk(&old[0].encode(), t0());
    let a = s.on_manifest(keys_manifest(6, &new), t0());
    assert!(matches!(a[..], [Action::Begin { version: 6, .. }]));
    assert!(matches!(
        s.on_chunk(&old[1].encode(), t0())[..],
        [Action::Ignore { .. }]
    ));
    // The older manifest cannot come back.
    assert!(is_reject(&s.on_manifest(keys_manifest(5, &old), t0())));
    assert_eq!(commits(&s.on_chunk(&new[0].encode(), t0())), Some(6));
}

#[test]
fn a_conflicting_manifest_for_the_same_version_is_refused() {
    let mut s = Sync::new(target(), 0);
    s.on_manifest(keys_manifest(5, &chunks(5, 2)), t0());
    assert!(matches!(
        s.on_manifest(keys_manifest(5, &chunks(5, 2)), t0())[..],
        [Action::Ignore { .. }]
    ));
    let a = s.on_manifest(keys_manifest(5, &chunks(5, 3)), t0());
    assert_eq!(
        a,
        vec![Action::Reject {
            reason: RejectReason::ConflictingManifest { version: 5 }
        }]
    );
}

#[test]
fn chunks_before_their_manifest_are_held_a_bounded_number() {
    let mut s = Sync::new(target(), 0);
    let cs = chunks(5, 6);
    for c in &cs[..4] {
        assert!(s.on_chunk(&c.encode(), t0()).is_empty());
    }
    assert!(matches!(
        s.on_chunk(&cs[0].encode(), t0())[..],
        [Action::Ignore { .. }]
    ));
    // A fifth: the manifest is not coming; one resync is asked for, then quiet.
    assert_eq!(
        s.on_chunk(&cs[4].encode(), t0()),
        vec![Action::RequestResync {
            reason: ResyncReason::ChunksWithoutManifest { version: 5 }
        }]
    );
    assert!(matches!(
        s.on_chunk(&cs[5].encode(), t0())[..],
        [Action::Ignore { .. }]
    ));
    let a = s.on_manifest(keys_manifest(5, &cs), t0());
    let staged = a
        .iter()
        .filter(|a| matches!(a, Action::Stage { .. }))
        .count();
    assert_eq!(staged, 4);
    s.on_chunk(&cs[4].encode(), t0());
    assert_eq!(commits(&s.on_chunk(&cs[5].encode(), t0())), Some(5));
}

#[test]
fn chunks_waiting_too_long_for_a_manifest_are_forgotten() {
    let mut s = Sync::new(target(), 0);
    // Chunks of a version whose manifest never comes must not block the waiting room.
    for c in &chunks(u64::MAX, 4) {
        s.on_chunk(&c.encode(), t0());
    }
    let later = t0() + SNAPSHOT_TIMEOUT + SignedDuration::from_secs(1);
    let cs = chunks(5, 1);
    assert!(s.on_chunk(&cs[0].encode(), later).is_empty(), "held again");
    assert_eq!(
        commits(&s.on_manifest(keys_manifest(5, &cs), later)),
        Some(5)
    );
}

#[test]
fn a_timed_out_snapshot_can_be_sent_again() {
    let mut s = Sync::new(target(), 0);
    let cs = chunks(5, 2);
    s.on_manifest(keys_manifest(5, &cs), t0());
    s.on_chunk(&cs[0].encode(), t0());
    let later = t0() + SNAPSHOT_TIMEOUT + SignedDuration::from_secs(1);
    let a = s.on_manifest(keys_manifest(5, &cs), later);
    assert!(matches!(
        a[..],
        [
            Action::RequestResync { .. },
            Action::Begin { version: 5, .. }
        ]
    ));
    s.on_chunk(&cs[0].encode(), later);
    assert_eq!(commits(&s.on_chunk(&cs[1].encode(), later)), Some(5));
}

#[test]
fn rollback_and_equal_versions_are_refused() {
    let mut s = Sync::new(target(), 5);
    for v in [4, 5] {
        assert_eq!(
            s.on_manifest(keys_manifest(v, &chunks(v, 1)), t0()),
            vec![Action::Reject {
                reason: RejectReason::Rollback { held: 5, got: v }
            }]
        );
    }
    let mut d = delta();
    d.from_version = 4;
    d.version = 5;
    assert_eq!(
        s.on_delta(d, t0()),
        vec![Action::Reject {
            reason: RejectReason::Rollback { held: 5, got: 5 }
        }]
    );
    assert_eq!(s.held(), 5);
}

#[test]
fn a_snapshot_for_another_gateway_is_refused() {
    let mut s = Sync::new(target(), 0);
    let mut m = keys_manifest(5, &chunks(5, 1));
    m.target.gateway = "gw2".into();
    assert!(matches!(
        s.on_manifest(m, t0())[..],
        [Action::Reject {
            reason: RejectReason::WrongTarget { .. }
        }]
    ));
    let mut d = delta();
    d.target.site = "s2".into();
    assert!(is_reject(&Sync::new(target(), 7).on_delta(d, t0())));
}

#[test]
fn deltas_apply_in_order_and_gaps_ask_for_a_resync() {
    let mut s = Sync::new(target(), 7);
    let a = s.on_delta(delta(), t0());
    assert_eq!(
        a,
        vec![
            Action::ApplyDelta(delta()),
            Action::TrustTime(delta().issued_at)
        ]
    );
    assert_eq!(s.held(), 8);
    let mut skipped = delta();
    skipped.from_version = 9;
    skipped.version = 10;
    assert_eq!(
        s.on_delta(skipped, t0()),
        vec![Action::RequestResync {
            reason: ResyncReason::DeltaGap {
                held: 8,
                from_version: 9
            }
        }]
    );
    assert_eq!(s.held(), 8);
    // Without any key set, a delta cannot apply.
    let mut fresh = Sync::new(target(), 0);
    let mut d = delta();
    d.from_version = 0;
    assert!(matches!(
        fresh.on_delta(d, t0())[..],
        [Action::RequestResync { .. }]
    ));
}

#[test]
fn a_heartbeat_vouches_only_for_the_held_version() {
    let beat = |version| Heartbeat {
        target: target(),
        version,
        issued_at: at("2026-01-01T00:05:00Z"),
    };
    let mut s = Sync::new(target(), 8);
    assert_eq!(
        s.on_heartbeat(&beat(8), t0()),
        vec![Action::Vouch {
            version: 8,
            issued_at: at("2026-01-01T00:05:00Z")
        }]
    );
    // An old one (redelivered, or from before the latest delta) vouches for nothing.
    assert!(matches!(
        s.on_heartbeat(&beat(7), t0())[..],
        [Action::Ignore { .. }]
    ));
    // A newer one: the gateway missed a delta (a revocation, perhaps). No refresh: a resync.
    assert_eq!(
        s.on_heartbeat(&beat(9), t0()),
        vec![Action::RequestResync {
            reason: ResyncReason::BehindHeartbeat {
                held: 8,
                version: 9
            }
        }]
    );
    // ... unless the snapshot in progress brings it.
    let cs = chunks(9, 1);
    s.on_manifest(keys_manifest(9, &cs), t0());
    assert!(matches!(
        s.on_heartbeat(&beat(9), t0())[..],
        [Action::Ignore { .. }]
    ));
    let mut other = beat(8);
    other.target.gateway = "gw2".into();
    assert!(is_reject(&s.on_heartbeat(&other, t0())));
    assert_eq!(s.held(), 8, "a heartbeat changes no key set");
}

#[test]
fn stale_after_travels_with_snapshots_and_deltas() {
    let limits = StaleLimits::new([(Category::Delivery, 86_400)]).unwrap();
    let mut m = manifest();
    m.stale_after = Some(limits);
    assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    let mut s = Sync::new(target(), 0);
    let cs = vec![chunk()];
    let mut m = keys_manifest(7, &cs);
    m.stale_after = Some(limits);
    assert!(matches!(
        &s.on_manifest(m, t0())[..],
        [Action::Begin { stale_after, .. }] if *stale_after == limits
    ));
    let mut d = delta();
    d.stale_after = Some(StaleLimits::default());
    assert_eq!(Delta::decode(&d.encode()).unwrap(), d, "an empty map: off");
    // Left out when absent (the §9 vectors are unchanged, `vectors::tests`); a null reads as
    // absent.
    let mut value: ciborium::Value = ciborium::from_reader(delta().encode().as_slice()).unwrap();
    value
        .as_map_mut()
        .unwrap()
        .push(("stale_after".into(), ciborium::Value::Null));
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    assert_eq!(Delta::decode(&bytes).unwrap().stale_after, None);
    // Residents' keys never go stale: a set that tries is refused whole, saying why.
    let mut value: ciborium::Value = ciborium::from_reader(manifest().encode().as_slice()).unwrap();
    value.as_map_mut().unwrap().push((
        "stale_after".into(),
        ciborium::Value::Map(vec![("friend".into(), 3600.into())]),
    ));
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    let e = Manifest::decode(&bytes).unwrap_err().to_string();
    assert!(e.contains("residents"), "{e}");
}

#[test]
fn a_delta_past_the_snapshot_in_progress_drops_it() {
    let mut s = Sync::new(target(), 7);
    let cs = chunks(8, 1);
    s.on_manifest(keys_manifest(8, &cs), t0());
    s.on_delta(delta(), t0());
    assert_eq!(s.pending(), None);
    assert!(matches!(
        s.on_chunk(&cs[0].encode(), t0())[..],
        [Action::Ignore { .. }]
    ));
}

#[test]
fn chunks_with_more_keys_than_announced_are_refused() {
    let mut s = Sync::new(target(), 0);
    let cs = chunks(5, 2);
    let mut m = keys_manifest(5, &cs);
    m.key_count = 1;
    s.on_manifest(m, t0());
    s.on_chunk(&cs[0].encode(), t0());
    let a = s.on_chunk(&cs[1].encode(), t0());
    assert!(is_reject(&a));
    assert!(a.contains(&Action::RequestResync {
        reason: ResyncReason::BadSnapshot { version: 5 }
    }));
    assert_eq!(s.held(), 0);
}

// --- open-door commands ---

fn cache() -> ReplayCache {
    ReplayCache::new(
        2,
        SignedDuration::from_secs(60),
        SignedDuration::from_secs(5),
    )
}

#[test]
fn a_replayed_command_is_refused() {
    let mut c = cache();
    let now = at("2026-01-01T00:02:01Z");
    assert_eq!(c.check(&open_door(), &target(), now), Ok(()));
    assert_eq!(
        c.check(&open_door(), &target(), now),
        Err(CommandRejection::Replayed)
    );
}

#[test]
fn an_expired_command_is_refused_and_forgotten() {
    let mut c = cache();
    assert_eq!(
        c.check(&open_door(), &target(), at("2026-01-01T00:02:30Z")),
        Err(CommandRejection::Expired)
    );
    c.check(&open_door(), &target(), at("2026-01-01T00:02:01Z"))
        .unwrap();
    let mut later = open_door();
    later.command_id = "c2".into();
    later.issued_at = at("2026-01-01T00:03:00Z");
    later.expires_at = at("2026-01-01T00:03:30Z");
    c.check(&later, &target(), at("2026-01-01T00:03:01Z"))
        .unwrap();
    assert_eq!(c.len(), 1, "c1 expired and was forgotten");
}

#[test]
fn the_default_cache_takes_a_fresh_command() {
    let mut c = ReplayCache::with_defaults();
    assert!(c.is_empty());
    c.check(&open_door(), &target(), at("2026-01-01T00:02:00Z"))
        .unwrap();
    assert_eq!(c.len(), 1);
}

#[test]
fn commands_are_bounded() {
    let mut c = cache();
    let now = at("2026-01-01T00:02:01Z");
    let mut long = open_door();
    long.expires_at = at("2026-01-01T00:10:00Z");
    assert_eq!(
        c.check(&long, &target(), now),
        Err(CommandRejection::LifetimeTooLong)
    );
    let mut future = open_door();
    future.issued_at = at("2026-01-01T00:05:00Z");
    future.expires_at = at("2026-01-01T00:05:30Z");
    assert_eq!(
        c.check(&future, &target(), now),
        Err(CommandRejection::NotYetValid)
    );
    let mut other = open_door();
    other.target.gateway = "gw2".into();
    assert_eq!(
        c.check(&other, &target(), now),
        Err(CommandRejection::WrongTarget)
    );
    for id in ["a", "b", "c"] {
        let mut cmd = open_door();
        cmd.command_id = id.into();
        let r = c.check(&cmd, &target(), now);
        assert_eq!(r.is_ok(), id != "c", "{id}: {r:?}");
    }
    assert_eq!(c.len(), 2);
}

// --- no panics on any input ---

proptest! {
    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = envelope::open(&bytes, &trusted(), MAX);
        let _ = Manifest::decode(&bytes);
        let _ = Chunk::decode(&bytes);
        let _ = Delta::decode(&bytes);
        let _ = OpenDoor::decode(&bytes);
        let mut s = Sync::new(target(), 1);
        let _ = s.on_chunk(&bytes, t0());
    }

    #[test]
    fn mutated_vectors_never_panic_or_verify(
        which in 0usize..3, pos in any::<prop::sample::Index>(), bit in 0u8..8,
    ) {
        let k = test_key();
        let (kind, body) = [
            (Kind::Manifest, manifest().encode()),
            (Kind::Delta, delta().encode()),
            (Kind::OpenDoor, open_door().encode()),
        ][which].clone();
        let mut env = seal(kind, &body, &k);
        let i = pos.index(env.len());
        env[i] ^= 1 << bit;
        // A single flipped bit never yields a verified envelope with a different body.
        if let Ok(opened) = open(&env, &trusted(), MAX) {
            prop_assert_eq!(opened.body, body);
            prop_assert_eq!(opened.kind, kind);
        }
    }
}
