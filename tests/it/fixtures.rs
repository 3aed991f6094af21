//! Sites, keys and stores for the tests, in the seeds' terms.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use doorbridge::access::{
    Category, Credential, CredentialKind, Door, Key, KeyRules, Schedule, Site, UseLimit, credential,
};
use doorbridge::store::{DecisionContext, KeySetHeader, Store, StoreOptions, VerifyRequest};
use jiff::Timestamp;

pub const SALT: &[u8] = b"test-site-salt";

/// A building: two outer doors and an inner door behind the main entrance, in Berlin.
pub fn site() -> Site {
    let mut doors = BTreeMap::new();
    doors.insert("main".into(), Door::default());
    doors.insert("garage".into(), Door::default());
    doors.insert(
        "inner".into(),
        Door {
            inner: true,
            behind: vec!["main".into()],
        },
    );
    Site {
        tz: jiff::tz::TimeZone::get("Europe/Berlin").unwrap(),
        doors,
    }
}

pub fn context() -> DecisionContext {
    DecisionContext::new(site())
}

pub fn open(path: &Path) -> Store {
    Store::open(StoreOptions::new(path, context())).expect("store opens")
}

/// A key opening `main` with one credential of `kind` whose clear value is `secret`.
pub fn key(id: &str, kind: CredentialKind, secret: &str, limit: UseLimit) -> Key {
    Key {
        rules: KeyRules {
            id: id.into(),
            name: format!("key {id}"),
            category: Category::Delivery,
            doors: vec!["main".into()],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: limit,
            welcome: None,
            floors: vec![],
            revoked: false,
            issuer: None,
        },
        credentials: vec![Credential {
            kind,
            digest: credential::digest(SALT, kind, secret.as_bytes()),
        }],
    }
}

pub fn header(version: u64) -> KeySetHeader {
    KeySetHeader {
        version,
        salt: SALT.to_vec(),
        issued_at: Some(now()),
        stale_after: doorbridge::access::StaleLimits::default(),
    }
}

/// A fixed instant: Monday 2026-11-23 10:00 in Berlin.
pub fn now() -> Timestamp {
    "2026-11-23T09:00:00Z".parse().unwrap()
}

pub fn request(unit: &str, door: &str, kind: CredentialKind, secret: &str) -> VerifyRequest {
    VerifyRequest {
        unit: unit.into(),
        door: door.into(),
        request_id: None,
        kind,
        secret: secret.as_bytes().to_vec(),
        now: now(),
        clock_synced: false,
        retransmit: None,
    }
}
