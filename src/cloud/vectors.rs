//! Test vectors of `docs/cloud-protocol.md`, made with the fixed test key (seed: 32 × 0x42).
//! The tests check that each vector appears in the document byte for byte.

use ed25519_dalek::SigningKey;
use jiff::Timestamp;

use super::envelope::{Kind, seal};
use super::payload::{
    Chunk, Delta, Heartbeat, Manifest, OpenDoor, ResyncCommand, Sha256Digest, Target, UnitSettings,
};
use super::report::{Presence, Report};
use crate::access::{
    Category, Credential, CredentialDigest, CredentialKind, Key, KeyRules, Schedule, StaleLimits,
    UseLimit,
};

pub fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

pub fn target() -> Target {
    Target {
        site: "s1".into(),
        gateway: "gw1".into(),
    }
}

pub fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

pub fn key(id: &str) -> Key {
    Key {
        rules: KeyRules {
            id: id.into(),
            name: "Ann".into(),
            category: Category::Friend,
            doors: vec!["main".into()],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: UseLimit::Unlimited,
            welcome: None,
            floors: vec![],
            revoked: false,
            issuer: None,
        },
        credentials: vec![Credential {
            kind: CredentialKind::Pin,
            digest: CredentialDigest([0x11; 32]),
        }],
    }
}

pub fn chunk() -> Chunk {
    Chunk {
        version: 7,
        index: 0,
        keys: vec![key("k1")],
    }
}

pub fn manifest() -> Manifest {
    Manifest {
        target: target(),
        version: 7,
        issued_at: at("2026-01-01T00:00:00Z"),
        salt: vec![0x5a; 16],
        chunk_count: 1,
        chunk_hashes: vec![Sha256Digest::of(&chunk().encode())],
        key_count: 1,
        stale_after: None,
    }
}

pub fn delta() -> Delta {
    Delta {
        target: target(),
        from_version: 7,
        version: 8,
        issued_at: at("2026-01-01T00:01:00Z"),
        upserts: vec![],
        deletes: vec!["k1".into()],
        stale_after: None,
    }
}

/// The heartbeat of §9.10: version 8 is current as of 00:05.
pub fn heartbeat() -> Heartbeat {
    Heartbeat {
        target: target(),
        version: 8,
        issued_at: at("2026-01-01T00:05:00Z"),
    }
}

/// The delta of §9.11: from 8 to 9, changing no key, limiting delivery keys to a day and
/// event keys to 12 hours.
pub fn stale_after_delta() -> Delta {
    Delta {
        target: target(),
        from_version: 8,
        version: 9,
        issued_at: at("2026-01-01T00:06:00Z"),
        upserts: vec![],
        deletes: vec![],
        stale_after: Some(
            StaleLimits::new([(Category::Delivery, 86_400), (Category::Event, 43_200)])
                .expect("valid limits"),
        ),
    }
}

pub fn open_door() -> OpenDoor {
    OpenDoor {
        target: target(),
        command_id: "c1".into(),
        door: "main".into(),
        key_id: "k1".into(),
        issued_at: at("2026-01-01T00:02:00Z"),
        expires_at: at("2026-01-01T00:02:30Z"),
    }
}

pub fn unit_settings() -> UnitSettings {
    UnitSettings {
        target: target(),
        command_id: "c2".into(),
        door: "main".into(),
        volume: Some(30),
        name: Some("Haus 12".into()),
        house_number: None,
        inner_door: None,
        issued_at: at("2026-01-01T00:03:00Z"),
        expires_at: at("2026-01-01T00:03:30Z"),
    }
}

pub fn resync() -> ResyncCommand {
    ResyncCommand {
        target: target(),
        command_id: None,
        issued_at: at("2026-01-01T00:04:00Z"),
    }
}

/// The delegate's key of §9.12: the Ed25519 secret seed of 32 bytes all `0x43`.
pub fn delegate_key() -> SigningKey {
    SigningKey::from_bytes(&[0x43; 32])
}

/// The delegation of §9.12: `garage-admin` may sign deltas for door `garage` until 2026-02-01.
pub fn delegation() -> super::payload::Delegation {
    super::payload::Delegation {
        target: target(),
        id: "garage-admin".into(),
        public_key: delegate_key().verifying_key().as_bytes().to_vec(),
        doors: vec!["garage".into()],
        not_after: at("2026-02-01T00:00:00Z"),
        issued_at: at("2026-01-01T00:07:00Z"),
    }
}

/// The revocation of §9.12.
pub fn delegation_revoke() -> super::payload::DelegationRevoke {
    super::payload::DelegationRevoke {
        target: target(),
        id: "garage-admin".into(),
        issued_at: at("2026-01-01T00:09:00Z"),
    }
}

/// The delegated delta of §9.12: from version 9 to 10, deleting `g1`, signed by the delegate.
pub fn delegated_delta() -> Delta {
    Delta {
        target: target(),
        from_version: 9,
        version: 10,
        issued_at: at("2026-01-01T00:08:00Z"),
        upserts: vec![],
        deletes: vec!["g1".into()],
        stale_after: None,
    }
}

/// Named vectors: (name, bytes).
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    let k = test_key();
    vec![
        ("public key", k.verifying_key().as_bytes().to_vec()),
        (
            "kid",
            super::envelope::SignerId::of(&k.verifying_key()).0.to_vec(),
        ),
        ("chunk", chunk().encode()),
        ("manifest body", manifest().encode()),
        (
            "manifest envelope",
            seal(Kind::Manifest, &manifest().encode(), &k),
        ),
        ("delta envelope", seal(Kind::Delta, &delta().encode(), &k)),
        (
            "open-door envelope",
            seal(Kind::OpenDoor, &open_door().encode(), &k),
        ),
        (
            "unit-settings envelope",
            seal(Kind::UnitSettings, &unit_settings().encode(), &k),
        ),
        (
            "resync envelope",
            seal(Kind::Resync, &resync().encode(), &k),
        ),
        (
            "state report",
            Report::State {
                state: Presence::Online,
                gateway: "gw1".into(),
                held: Some(8),
                identity: None,
            }
            .encode(),
        ),
        (
            "applied report",
            Report::Applied {
                version: 8,
                keys: None,
                at: at("2026-01-01T00:01:01Z"),
            }
            .encode(),
        ),
        ("record batch", batch()),
        (
            "heartbeat envelope",
            seal(Kind::Heartbeat, &heartbeat().encode(), &k),
        ),
        ("stale_after delta body", stale_after_delta().encode()),
        (
            "delegation envelope",
            seal(Kind::Delegation, &delegation().encode(), &k),
        ),
        (
            "delegated delta envelope",
            seal(Kind::Delta, &delegated_delta().encode(), &delegate_key()),
        ),
        (
            "delegation-revoke envelope",
            seal(Kind::DelegationRevoke, &delegation_revoke().encode(), &k),
        ),
    ]
}

/// An upload batch of gateway `gw1`, site `s1`, epoch 1767225600000000 (2026-01-01): record 41, a call-button alarm at unit
/// `entrance/1` (door `main`, button 0) at `2026-01-01T00:02:00Z`.
pub fn batch() -> Vec<u8> {
    let record = crate::store::Record::CallButton {
        at: at("2026-01-01T00:02:00Z"),
        unit: "entrance/1".into(),
        door: "main".into(),
        button: 0,
    };
    let mut w = super::uplink::BatchWriter::new(128 * 1024);
    w.push(41, record.class(), &record.to_cbor());
    w.finish("gw1", "s1", 1_767_225_600_000_000)
}

pub use crate::access::credential::to_hex as hex;

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = include_str!("../../docs/cloud-protocol.md");

    #[test]
    fn vectors_are_in_the_document() {
        let doc: String = DOC.chars().filter(|c| !c.is_whitespace()).collect();
        for (name, bytes) in all() {
            let h = hex(&bytes);
            assert!(doc.contains(&h), "{name} vector missing from the doc: {h}");
        }
    }

    #[test]
    fn the_delegation_vectors_open_with_their_keys_and_decode() {
        use super::super::envelope::open;
        use super::super::payload::{Delegation, DelegationRevoke, MAX_ENVELOPE_BYTES};
        let root = [test_key().verifying_key()];
        let d = open(
            &seal(Kind::Delegation, &delegation().encode(), &test_key()),
            &root,
            MAX_ENVELOPE_BYTES,
        )
        .unwrap();
        assert_eq!(Delegation::decode(&d.body).unwrap(), delegation());
        let r = seal(
            Kind::DelegationRevoke,
            &delegation_revoke().encode(),
            &test_key(),
        );
        let r = open(&r, &root, MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(
            DelegationRevoke::decode(&r.body).unwrap(),
            delegation_revoke()
        );
        // The delegate's delta is not the root's: it opens only with the delegated key.
        let delta = seal(Kind::Delta, &delegated_delta().encode(), &delegate_key());
        assert!(open(&delta, &root, MAX_ENVELOPE_BYTES).is_err());
        let opened = open(
            &delta,
            &[delegate_key().verifying_key()],
            MAX_ENVELOPE_BYTES,
        )
        .unwrap();
        assert_eq!(Delta::decode(&opened.body).unwrap(), delegated_delta());
    }

    /// `cargo test -- --ignored print_vectors --nocapture` prints the vectors for the doc.
    #[test]
    #[ignore = "prints the vectors for the document"]
    fn print_vectors() {
        for (name, bytes) in all() {
            println!("{name} ({} bytes):", bytes.len());
            for line in hex(&bytes).as_bytes().chunks(64) {
                println!("{}", String::from_utf8_lossy(line));
            }
        }
    }
}
