//! The access decision, as the store makes it: for a credential presented at a door, the PIN
//! keypad's lockout, the credential's key found in the held set, its use counts (with the
//! uses granted earlier in the same commit), and the engine's rule at the clock's trust; for a
//! remote open, the key named by id. Out come the verdict, whether a use is spent, and the
//! records that say so (the activity, a keypad lock).
//!
//! Pure: the held key set and the counters are read through [`KeyView`], time comes with the
//! request, and nothing is written. The writer supplies SQLite behind the trait
//! (`writer::SqlKeys`), keeps the state between decisions (each unit's [`PinGuard`], the
//! trusted-time mark), counts the uses spent and persists the records. The rule itself is
//! [`access::decide`].

use jiff::Timestamp;

use super::records::{Activity, Record};
use super::{RemoteOpen, StoreError, Verdict, VerifyRequest};
use crate::access::{
    self, ClockTrust, Consume, CredentialKind, Decision, DenyReason, DoorId, KeyRules,
    LockoutPolicy, PinGuard, Policy, Site, UseLimit, Uses,
};

/// Where a key's uses are counted: over all doors (for a `total` limit) or at one door (for
/// `per_door`). A decision that spends a use counts it in both.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UseScope {
    AllDoors,
    Door(DoorId),
}

/// The held key set and its use counters, as a decision reads them.
pub(super) trait KeyView {
    /// The rules of the key holding the credential with this digest, if any.
    fn by_digest(&self, digest: &[u8; 32]) -> Result<Option<KeyRules>, StoreError>;
    /// The rules of the key with this id, if held.
    fn by_id(&self, key_id: &str) -> Result<Option<KeyRules>, StoreError>;
    /// Uses counted for `key_id` in `scope`, including those granted earlier in the commit
    /// being made.
    fn uses(&self, key_id: &str, scope: &UseScope) -> Result<u32, StoreError>;
}

/// What a decision is made with besides the request and the keys.
pub(super) struct Rules<'a> {
    pub site: &'a Site,
    /// The configuration's policy with the held set's freshness limits.
    pub policy: Policy,
    pub lockout: &'a LockoutPolicy,
    /// The site salt the credential digests are made with.
    pub salt: &'a [u8],
    /// PINs in the held set (the lockout's pace depends on how many there are to guess).
    pub active_pins: u32,
    /// Whether the clock may be believed for time-bound keys.
    pub clock: ClockTrust,
}

/// A request judged.
#[derive(Debug)]
pub(super) struct Judged {
    pub verdict: Verdict,
    pub consume: Consume,
    /// The activity record: its seq is the decision's.
    pub activity: Activity,
    /// The alarm of a keypad lock this decision started.
    pub lockout: Option<Record>,
    /// A key was found, so its decision depended on the clock.
    pub found: bool,
}

/// Judges a credential presented at a door; `guard` is the presenting unit's PIN lockout.
pub(super) fn credential(
    keys: &impl KeyView,
    rules: &Rules<'_>,
    guard: &mut PinGuard,
    req: &VerifyRequest,
) -> Result<Judged, StoreError> {
    let now = req.now;
    let is_pin = req.kind == CredentialKind::Pin;
    let mut lockout = None;
    let (decision, consume, key) = if is_pin && guard.is_locked(now) {
        (
            Decision::deny(DenyReason::LockedOut),
            Consume::Nothing,
            None,
        )
    } else {
        let digest = access::credential::digest(rules.salt, req.kind, &req.secret);
        match keys.by_digest(&digest.0)? {
            None => {
                if is_pin
                    && let Some(started) = guard.unknown_pin(rules.lockout, rules.active_pins, now)
                {
                    tracing::warn!(unit = %req.unit, door = %req.door, until = %started.until,
                        failures = started.failures, "PIN keypad locked after repeated unknown PINs");
                    lockout = Some(Record::PinLockout {
                        at: now,
                        unit: req.unit.clone(),
                        door: req.door.clone(),
                        until: started.until,
                        failures: started.failures,
                    });
                }
                (
                    Decision::deny(DenyReason::UnknownCredential),
                    Consume::Nothing,
                    None,
                )
            }
            Some(key) => {
                if is_pin {
                    guard.known_pin();
                }
                let (decision, consume) = judge(keys, rules, &key, &req.door, now)?;
                (decision, consume, Some(key))
            }
        }
    };
    let activity = activity(
        Activity {
            at: now,
            door: req.door.clone(),
            unit: req.unit.clone(),
            request_id: req.request_id,
            credential_kind: req.kind,
            key_id: key.as_ref().map(|k| k.id.clone()),
            category: None,
            granted: false,
            reason: None,
            released: Vec::new(),
            command_id: None,
            issuer: None,
        },
        key.as_ref(),
        &decision,
    );
    Ok(Judged {
        verdict: Verdict {
            decision,
            key_id: key.as_ref().map(|k| k.id.clone()),
            category: key.as_ref().map(|k| k.category),
            seq: None,
        },
        consume,
        activity,
        lockout,
        found: key.is_some(),
    })
}

/// Judges a remote open from the cloud: the key is named by id (the app holds it), so there is
/// no credential to look up and no keypad to lock.
pub(super) fn remote(
    keys: &impl KeyView,
    rules: &Rules<'_>,
    req: &RemoteOpen,
) -> Result<Judged, StoreError> {
    let key = keys.by_id(&req.key_id)?;
    let (decision, consume) = match &key {
        Some(key) => judge(keys, rules, key, &req.door, req.now)?,
        None => (
            Decision::deny(DenyReason::UnknownCredential),
            Consume::Nothing,
        ),
    };
    let activity = activity(
        Activity {
            at: req.now,
            door: req.door.clone(),
            unit: "cloud".into(),
            request_id: None,
            credential_kind: CredentialKind::Mobile,
            key_id: Some(req.key_id.clone()),
            category: None,
            granted: false,
            reason: None,
            released: Vec::new(),
            command_id: Some(req.command_id.clone()),
            issuer: None,
        },
        key.as_ref(),
        &decision,
    );
    Ok(Judged {
        verdict: Verdict {
            decision,
            key_id: Some(req.key_id.clone()),
            category: key.as_ref().map(|k| k.category),
            seq: None,
        },
        consume,
        activity,
        lockout: None,
        found: key.is_some(),
    })
}

/// The engine's decision for `key` at `door`, with its uses as counted now.
fn judge(
    keys: &impl KeyView,
    rules: &Rules<'_>,
    key: &KeyRules,
    door: &DoorId,
    now: Timestamp,
) -> Result<(Decision, Consume), StoreError> {
    let uses = if key.use_limit == UseLimit::Unlimited {
        Uses::default()
    } else {
        Uses {
            total: keys.uses(&key.id, &UseScope::AllDoors)?,
            at_door: keys.uses(&key.id, &UseScope::Door(door.clone()))?,
        }
    };
    Ok(access::decide(
        rules.site,
        rules.policy,
        key,
        door,
        uses,
        now,
        rules.clock,
    ))
}

/// Fills in what the decision and the key say of an activity record.
fn activity(mut a: Activity, key: Option<&KeyRules>, decision: &Decision) -> Activity {
    if let Some(key) = key {
        a.category = Some(key.category);
        a.issuer = Some(issuer_name(key));
    }
    match decision {
        Decision::Grant(g) => {
            a.granted = true;
            a.released.clone_from(&g.doors);
        }
        Decision::Deny { reason } => a.reason = Some(*reason),
    }
    a
}

/// Who granted a key, as activity records name it: a delegation's id, or `root`.
pub(super) fn issuer_name(rules: &KeyRules) -> String {
    rules.issuer.clone().unwrap_or_else(|| "root".into())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::access::{Category, Door, Schedule};

    const SALT: &[u8] = b"site-salt";

    /// The held keys and counters in memory: what the writer reads from SQLite.
    #[derive(Default)]
    struct Keys {
        by_digest: HashMap<[u8; 32], KeyRules>,
        uses: HashMap<(String, UseScope), u32>,
    }

    impl Keys {
        fn hold(&mut self, kind: CredentialKind, secret: &str, key: KeyRules) {
            let digest = access::credential::digest(SALT, kind, secret.as_bytes());
            self.by_digest.insert(digest.0, key);
        }
    }

    impl KeyView for Keys {
        fn by_digest(&self, digest: &[u8; 32]) -> Result<Option<KeyRules>, StoreError> {
            Ok(self.by_digest.get(digest).cloned())
        }

        fn by_id(&self, key_id: &str) -> Result<Option<KeyRules>, StoreError> {
            Ok(self.by_digest.values().find(|k| k.id == key_id).cloned())
        }

        fn uses(&self, key_id: &str, scope: &UseScope) -> Result<u32, StoreError> {
            let key = (key_id.to_owned(), scope.clone());
            Ok(self.uses.get(&key).copied().unwrap_or(0))
        }
    }

    fn key(id: &str, limit: UseLimit) -> KeyRules {
        KeyRules {
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
            floors: Vec::new(),
            revoked: false,
            issuer: None,
        }
    }

    fn site() -> Site {
        let mut doors = BTreeMap::new();
        doors.insert(
            "main".into(),
            Door {
                inner: false,
                behind: Vec::new(),
            },
        );
        Site {
            tz: jiff::tz::TimeZone::UTC,
            doors,
        }
    }

    /// Rules on a trusted clock with `active_pins` PINs held.
    fn rules<'a>(site: &'a Site, lockout: &'a LockoutPolicy, active_pins: u32) -> Rules<'a> {
        Rules {
            site,
            policy: Policy::default(),
            lockout,
            salt: SALT,
            active_pins,
            clock: ClockTrust::Trusted,
        }
    }

    fn ask(kind: CredentialKind, secret: &str, at: i64) -> VerifyRequest {
        VerifyRequest {
            unit: "entrance/1".into(),
            door: "main".into(),
            request_id: Some(7),
            kind,
            secret: secret.as_bytes().to_vec(),
            now: Timestamp::from_second(1_790_000_000 + at).unwrap(),
            clock_synced: true,
            retransmit: None,
        }
    }

    /// The credential `secret` of `kind` presented `at` seconds into the test, judged.
    fn present(
        keys: &Keys,
        rules: &Rules<'_>,
        guard: &mut PinGuard,
        kind: CredentialKind,
        secret: &str,
        at: i64,
    ) -> Judged {
        credential(keys, rules, guard, &ask(kind, secret, at)).unwrap()
    }

    #[test]
    fn a_use_limited_key_is_granted_then_used_up_with_records_that_say_so() {
        let (site, lockout) = (site(), LockoutPolicy::default());
        let rules = rules(&site, &lockout, 0);
        let mut keys = Keys::default();
        keys.hold(
            CredentialKind::Qr,
            "parcel",
            key("courier", UseLimit::Total(1)),
        );
        let mut guard = PinGuard::default();

        let first = present(&keys, &rules, &mut guard, CredentialKind::Qr, "parcel", 0);
        assert!(first.verdict.decision.is_grant(), "{first:?}");
        assert_eq!(first.consume, Consume::OneUse, "the writer counts it");
        assert!(first.found && first.lockout.is_none());
        let a = &first.activity;
        assert_eq!(a.key_id.as_deref(), Some("courier"));
        assert_eq!(a.issuer.as_deref(), Some("root"));
        assert_eq!(a.released, vec!["main".to_owned()]);
        assert_eq!((a.granted, a.reason, a.request_id), (true, None, Some(7)));

        // Counted (by the writer, in the table or the commit's overlay): used up.
        keys.uses
            .insert(("courier".to_owned(), UseScope::AllDoors), 1);
        keys.uses
            .insert(("courier".to_owned(), UseScope::Door("main".into())), 1);
        let again = present(&keys, &rules, &mut guard, CredentialKind::Qr, "parcel", 1);
        assert_eq!(
            again.verdict.decision.deny_reason(),
            Some(DenyReason::UsedUp)
        );
        assert_eq!(again.consume, Consume::Nothing);
        assert_eq!(again.activity.reason, Some(DenyReason::UsedUp));
    }

    #[test]
    fn unknown_pins_lock_the_keypad_once_and_then_even_a_known_pin_waits() {
        let (site, lockout) = (site(), LockoutPolicy::default());
        let rules = rules(&site, &lockout, 1);
        let mut keys = Keys::default();
        keys.hold(
            CredentialKind::Pin,
            "4711",
            key("resident", UseLimit::Unlimited),
        );
        let mut guard = PinGuard::default();

        let mut locks = 0;
        for i in 0..lockout.attempts {
            let j = credential(
                &keys,
                &rules,
                &mut guard,
                &ask(CredentialKind::Pin, "0000", i.into()),
            )
            .unwrap();
            assert_eq!(
                j.verdict.decision.deny_reason(),
                Some(DenyReason::UnknownCredential)
            );
            assert!(!j.found && j.activity.key_id.is_none() && j.verdict.key_id.is_none());
            locks += usize::from(matches!(j.lockout, Some(Record::PinLockout { .. })));
        }
        assert_eq!(locks, 1, "one alarm when the keypad locks");
        let known = present(&keys, &rules, &mut guard, CredentialKind::Pin, "4711", 10);
        assert_eq!(
            known.verdict.decision.deny_reason(),
            Some(DenyReason::LockedOut)
        );
        assert!(!known.found, "not looked up while locked");
        // A QR code is not a keypad guess: unknown, and no lock.
        let qr = present(&keys, &rules, &mut guard, CredentialKind::Qr, "0000", 11);
        assert_eq!(
            qr.verdict.decision.deny_reason(),
            Some(DenyReason::UnknownCredential)
        );
    }

    #[test]
    fn a_remote_open_names_the_key_it_asked_for_found_or_not() {
        let (site, lockout) = (site(), LockoutPolicy::default());
        let rules = rules(&site, &lockout, 0);
        let mut keys = Keys::default();
        let mut delegated = key("garage-7", UseLimit::Unlimited);
        delegated.issuer = Some("garage-admin".to_owned());
        keys.hold(CredentialKind::Qr, "x", delegated);
        let open = |key_id: &str| RemoteOpen {
            command_id: "c-1".to_owned(),
            key_id: key_id.into(),
            door: "main".into(),
            now: Timestamp::from_second(1_790_000_000).unwrap(),
            clock_synced: true,
        };
        let found = remote(&keys, &rules, &open("garage-7")).unwrap();
        assert!(found.verdict.decision.is_grant());
        assert_eq!(found.activity.unit, "cloud");
        assert_eq!(found.activity.command_id.as_deref(), Some("c-1"));
        assert_eq!(found.activity.issuer.as_deref(), Some("garage-admin"));
        let gone = remote(&keys, &rules, &open("nobody")).unwrap();
        assert_eq!(
            gone.verdict.decision.deny_reason(),
            Some(DenyReason::UnknownCredential)
        );
        assert_eq!(gone.activity.key_id.as_deref(), Some("nobody"));
        assert_eq!(gone.activity.issuer, None);
    }
}
