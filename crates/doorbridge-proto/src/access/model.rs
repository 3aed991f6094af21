//! The key-set model: what a key allows, in the seeds' terms, and what a decision says.
//!
//! These types are shared by the access engine (which judges them), the store (which keeps
//! them) and the cloud link (which receives them). They carry no behaviour beyond small
//! helpers; the rules live in [`super::engine`].

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use serde::{Deserialize, Serialize};

pub use crate::ids::{DoorId, KeyId};

/// The key categories offered by the apps (seed 000). Travels with every activity record.
///
/// `Friend` is also the category of residents' own keys: the apps' default, "for your own use"
/// (seed 000), which is why a key set can never make it go stale ([`StaleLimits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Friend,
    Customer,
    Services,
    Event,
    Delivery,
    Renter,
    Employee,
}

impl Category {
    pub const ALL: [Category; 7] = [
        Category::Friend,
        Category::Customer,
        Category::Services,
        Category::Event,
        Category::Delivery,
        Category::Renter,
        Category::Employee,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Friend => "friend",
            Category::Customer => "customer",
            Category::Services => "services",
            Category::Event => "event",
            Category::Delivery => "delivery",
            Category::Renter => "renter",
            Category::Employee => "employee",
        }
    }

    /// Its position in [`Category::ALL`].
    fn index(self) -> usize {
        match self {
            Category::Friend => 0,
            Category::Customer => 1,
            Category::Services => 2,
            Category::Event => 3,
            Category::Delivery => 4,
            Category::Renter => 5,
            Category::Employee => 6,
        }
    }
}

/// The longest `stale_after` a key set may give a category: a year (and a day).
pub const MAX_STALE_AFTER_S: u32 = 366 * 24 * 3600;

/// A key set's `stale_after`: for some categories, how long (in seconds) the gateway may go
/// without hearing from the cloud before keys of that category are refused as
/// [`DenyReason::StaleKeySet`]. A revocation that cannot reach an offline gateway would
/// otherwise be outrun forever. Categories not named never go stale; `friend` (residents' own
/// keys) can never be named.
///
/// On the wire and on disk a map from category name to seconds, `{"delivery": 86400}`; an
/// empty map is "off". Reading refuses `friend`, a duplicate category, 0 and more than
/// [`MAX_STALE_AFTER_S`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StaleLimits([Option<u32>; 7]);

impl StaleLimits {
    /// Limits from `(category, seconds)` pairs, checked as on the wire.
    pub fn new(
        limits: impl IntoIterator<Item = (Category, u32)>,
    ) -> Result<StaleLimits, &'static str> {
        let mut out = StaleLimits::default();
        for (category, seconds) in limits {
            if category == Category::Friend {
                return Err(
                    "stale_after names friend, the category of residents' own keys, which never go stale",
                );
            }
            if seconds == 0 || seconds > MAX_STALE_AFTER_S {
                return Err("a stale_after limit is 1 to 31622400 seconds");
            }
            if out.0[category.index()].replace(seconds).is_some() {
                return Err("stale_after names a category twice");
            }
        }
        Ok(out)
    }

    /// How long keys of `category` stay usable without word from the cloud, if limited.
    pub fn get(&self, category: Category) -> Option<jiff::SignedDuration> {
        self.0[category.index()].map(|s| jiff::SignedDuration::from_secs(i64::from(s)))
    }

    /// The limited categories and their limits in seconds, in [`Category::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Category, u32)> + '_ {
        Category::ALL
            .into_iter()
            .filter_map(|c| self.0[c.index()].map(|s| (c, s)))
    }

    /// No category is limited.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

impl Serialize for StaleLimits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // A definite length, like every map the gateway and cloud write.
        let mut map = s.serialize_map(Some(self.iter().count()))?;
        for (category, seconds) in self.iter() {
            map.serialize_entry(&category, &seconds)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for StaleLimits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StaleLimits;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from key category to seconds")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<Category, u32>()? {
                    pairs.push(pair);
                }
                StaleLimits::new(pairs).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// How fresh the gateway's knowledge of its key set is, for [`StaleLimits`]: the limits of the
/// held set, and the signed time of the latest snapshot, delta or heartbeat it took (`None`:
/// none whose time it believed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freshness {
    pub limits: StaleLimits,
    pub known_at: Option<Timestamp>,
}

impl Freshness {
    /// Whether keys of `category` are refused as stale at `now`: the category is limited and
    /// the knowledge is older than its limit (or there is none).
    pub fn is_stale(&self, category: Category, now: Timestamp) -> bool {
        self.limits.get(category).is_some_and(|max| {
            self.known_at
                .is_none_or(|known| now.duration_since(known) > max)
        })
    }

    /// The categories whose keys are refused as stale at `now`.
    pub fn stale(&self, now: Timestamp) -> Vec<Category> {
        Category::ALL
            .into_iter()
            .filter(|&c| self.is_stale(c, now))
            .collect()
    }
}

/// How a credential is presented at the door.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A PIN typed on a keypad (courier keys, seed 001).
    Pin,
    /// A QR token scanned by a reader (visitor keys, seed 001).
    Qr,
    /// A mobile-app key presented over the air (seed 000).
    Mobile,
    /// A card at an OSDP reader: the card number's bits (`osdp::reader::card_value`).
    Card,
}

impl CredentialKind {
    /// The byte that stands for this kind in a credential digest and on the wire.
    pub fn code(self) -> u8 {
        match self {
            CredentialKind::Pin => 1,
            CredentialKind::Qr => 2,
            CredentialKind::Mobile => 3,
            CredentialKind::Card => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(CredentialKind::Pin),
            2 => Some(CredentialKind::Qr),
            3 => Some(CredentialKind::Mobile),
            4 => Some(CredentialKind::Card),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Pin => "pin",
            CredentialKind::Qr => "qr",
            CredentialKind::Mobile => "mobile",
            CredentialKind::Card => "card",
        }
    }
}

/// SHA-256 over the site salt, the credential kind and the value: how a credential is stored
/// and looked up. The clear value never reaches the disk.
///
/// Serialised as a byte string (CBOR major type 2); a sequence of 32 integers is accepted too,
/// which is how formats without bytes (JSON) write it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialDigest(pub [u8; 32]);

impl Serialize for CredentialDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for CredentialDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CredentialDigest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 32-byte credential digest")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                v.try_into()
                    .map(CredentialDigest)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(33, &self));
                }
                Ok(CredentialDigest(out))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

impl fmt::Debug for CredentialDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits are enough to tell digests apart in logs.
        write!(f, "CredentialDigest(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// A credential as held in a key set: its kind and digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub kind: CredentialKind,
    pub digest: CredentialDigest,
}

/// A daily time window in the site's wall-clock time. `start` is inclusive, `end` exclusive.
/// When `end <= start` the window crosses midnight and belongs to the day it starts on.
/// `start == end` is rejected by [`Schedule::validate`]: use no window for a whole day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: Time,
    pub end: Time,
}

impl Window {
    pub fn crosses_midnight(&self) -> bool {
        self.end < self.start
    }
}

/// A set of weekdays, Monday = bit 0 … Sunday = bit 6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WeekdaySet(pub u8);

impl WeekdaySet {
    pub const EVERY_DAY: WeekdaySet = WeekdaySet(0x7f);

    pub fn of(days: &[Weekday]) -> Self {
        days.iter().fold(WeekdaySet(0), |set, &d| set.with(d))
    }

    #[must_use]
    pub fn with(self, day: Weekday) -> Self {
        WeekdaySet(self.0 | (1 << day.to_monday_zero_offset()))
    }

    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.to_monday_zero_offset()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0.trailing_zeros() >= 7
    }
}

/// When in the week a key works (seed 000 "recurring", seed 001 repeat mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "repeat", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// No time-of-day limit (repeat mode "Never": only the validity bounds apply).
    Always,
    /// Every day within the window.
    Daily { window: Window },
    /// On the chosen weekdays, within the window if one is given, else all day.
    Weekly {
        days: WeekdaySet,
        window: Option<Window>,
    },
}

impl Schedule {
    /// A problem with the schedule as given, if any.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            Schedule::Daily { window }
            | Schedule::Weekly {
                window: Some(window),
                ..
            } if window.start == window.end => {
                Err("a window's start and end are equal; leave the window out for a whole day")
            }
            Schedule::Weekly { days, .. } if days.is_empty() => {
                Err("a weekly schedule names no weekday")
            }
            _ => Ok(()),
        }
    }
}

/// How often a key may open doors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "limit",
    content = "uses",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum UseLimit {
    /// No limit (seed 000 "unlimited key").
    Unlimited,
    /// N uses in total across all doors (single-use is `Total(1)`).
    Total(u32),
    /// N uses at each door ("Each Door Counts", seed 001).
    PerDoor(u32),
}

impl UseLimit {
    pub fn is_limited(self) -> bool {
        !matches!(self, UseLimit::Unlimited)
    }
}

/// Everything the engine needs to judge a key, apart from its credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRules {
    /// The cloud's id for the key; stable across edits.
    pub id: KeyId,
    pub name: String,
    pub category: Category,
    /// The doors the key opens.
    pub doors: Vec<DoorId>,
    /// "Also opens inner door": the inner doors behind the listed doors open too.
    pub opens_inner_door: bool,
    /// The key opens from this instant on (inclusive).
    pub valid_from: Option<Timestamp>,
    /// The key stops opening at this instant (exclusive).
    pub valid_until: Option<Timestamp>,
    pub schedule: Schedule,
    pub use_limit: UseLimit,
    /// Shown by the door unit on a grant.
    pub welcome: Option<String>,
    /// Elevator floors a reader may release for this key (seed 001).
    pub floors: Vec<i16>,
    /// Deleted in the cloud: kept as a tombstone so the denial can say "revoked".
    pub revoked: bool,
    /// Who granted the key: the id of the delegation whose key signed the delta that put it
    /// (`docs/cloud-protocol.md` §5.3), or `None` for the root key. Set by the gateway, never
    /// read from the wire: a cloud cannot claim an issuer.
    #[serde(skip)]
    pub issuer: Option<String>,
}

impl KeyRules {
    /// Whether a decision on this key depends on the time of day or date.
    pub fn is_time_bound(&self) -> bool {
        self.valid_from.is_some()
            || self.valid_until.is_some()
            || !matches!(self.schedule, Schedule::Always)
    }
}

/// A key as held in a key set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub rules: KeyRules,
    pub credentials: Vec<Credential>,
}

/// A door of the site as the engine sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Door {
    /// An inner door: only keys with "also opens inner door" open it.
    pub inner: bool,
    /// For an inner door: the outer doors it lies behind. Empty means behind every outer door.
    pub behind: Vec<DoorId>,
}

/// The site as the engine sees it: its time zone and its doors.
#[derive(Clone, Debug)]
pub struct Site {
    pub tz: jiff::tz::TimeZone,
    pub doors: BTreeMap<DoorId, Door>,
}

/// What to do with keys whose decision does not depend on the time when the clock is not
/// trusted, or when a decision cannot be recorded durably.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlimitedPolicy {
    /// Grant (and raise an alarm), so residents are not locked out of their homes.
    #[default]
    Grant,
    Deny,
}

/// Whether the wall clock can be believed (see `DESIGN.md`, "Time").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockTrust {
    Trusted,
    /// The clock is behind the persisted high-water mark of trusted time.
    Untrusted,
}

/// Uses a key has consumed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uses {
    /// Across all doors.
    pub total: u32,
    /// At the door being asked about.
    pub at_door: u32,
}

/// Why a request was denied. Travels to the cloud with the activity record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    UnknownCredential,
    NotYetValid,
    Expired,
    OutsideSchedule,
    WrongDoor,
    UsedUp,
    Revoked,
    ClockUntrusted,
    LockedOut,
    /// The use could not be recorded durably (disk full, read-only), so a limited key is
    /// refused rather than risk being honoured more often than it allows.
    NotRecorded,
    /// The key's category has a `stale_after` limit ([`StaleLimits`]) and the gateway has not
    /// heard from the cloud for longer than that: a revocation may be on its way.
    StaleKeySet,
}

impl DenyReason {
    pub const ALL: [DenyReason; 11] = [
        DenyReason::UnknownCredential,
        DenyReason::NotYetValid,
        DenyReason::Expired,
        DenyReason::OutsideSchedule,
        DenyReason::WrongDoor,
        DenyReason::UsedUp,
        DenyReason::Revoked,
        DenyReason::ClockUntrusted,
        DenyReason::LockedOut,
        DenyReason::NotRecorded,
        DenyReason::StaleKeySet,
    ];

    /// The reason's code on the door bus and in activity records.
    pub fn code(self) -> u8 {
        match self {
            DenyReason::UnknownCredential => 1,
            DenyReason::NotYetValid => 2,
            DenyReason::Expired => 3,
            DenyReason::OutsideSchedule => 4,
            DenyReason::WrongDoor => 5,
            DenyReason::UsedUp => 6,
            DenyReason::Revoked => 7,
            DenyReason::ClockUntrusted => 8,
            DenyReason::LockedOut => 9,
            DenyReason::NotRecorded => 10,
            DenyReason::StaleKeySet => 11,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The reason's name on the wire, in activity records and command results alike
    /// (`used_up`): the same as its serde name.
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::UnknownCredential => "unknown_credential",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::Expired => "expired",
            DenyReason::OutsideSchedule => "outside_schedule",
            DenyReason::WrongDoor => "wrong_door",
            DenyReason::UsedUp => "used_up",
            DenyReason::Revoked => "revoked",
            DenyReason::ClockUntrusted => "clock_untrusted",
            DenyReason::LockedOut => "locked_out",
            DenyReason::NotRecorded => "not_recorded",
            DenyReason::StaleKeySet => "stale_key_set",
        }
    }

    /// The reason in words, for people (`used up`).
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownCredential => "unknown credential",
            DenyReason::NotYetValid => "not yet valid",
            DenyReason::Expired => "expired",
            DenyReason::OutsideSchedule => "outside schedule",
            DenyReason::WrongDoor => "wrong door",
            DenyReason::UsedUp => "used up",
            DenyReason::Revoked => "revoked",
            DenyReason::ClockUntrusted => "clock untrusted",
            DenyReason::LockedOut => "locked out",
            DenyReason::NotRecorded => "not recorded",
            DenyReason::StaleKeySet => "stale key set",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a grant tells the door unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The doors to release: the door asked about, plus the inner doors behind it when the
    /// key also opens inner doors.
    pub doors: Vec<DoorId>,
    pub welcome: Option<String>,
    pub floors: Vec<i16>,
}

/// The engine's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Grant(Grant),
    Deny { reason: DenyReason },
}

impl Decision {
    pub fn deny(reason: DenyReason) -> Self {
        Decision::Deny { reason }
    }

    pub fn is_grant(&self) -> bool {
        matches!(self, Decision::Grant(_))
    }

    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Grant(_) => None,
            Decision::Deny { reason } => Some(*reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DenyReason;

    #[test]
    fn a_deny_reason_has_one_name_on_the_wire() {
        for reason in DenyReason::ALL {
            let serde = serde_json::to_string(&reason).unwrap();
            assert_eq!(serde, format!("\"{}\"", reason.name()));
            assert_eq!(reason.as_str().replace(' ', "_"), reason.name());
        }
    }
}
