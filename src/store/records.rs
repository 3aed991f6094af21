//! Outbox records: what happened at the doors and to the gateway, waiting for the cloud.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::access::{Category, CredentialKind, DenyReason, DoorId, KeyId};
use crate::bus::message::DoorEventKind;
use crate::ids::UnitId;

/// CBOR a row holds (a record's body, unit settings, a kept answer) read back larger than this
/// is damaged: far above anything the gateway writes.
pub const MAX_ROW_CBOR: usize = 1 << 20;
/// Nesting such CBOR may have: maps of scalars and short lists.
const ROW_DEPTH: usize = 16;

/// Decodes CBOR the store wrote into a row: bounded like everything read from outside, since
/// a database file can be damaged.
pub(crate) fn decode_row<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, crate::cbor::CborError> {
    crate::cbor::decode(bytes, MAX_ROW_CBOR, ROW_DEPTH)
}

/// Upload priority. Alarms jump the queue; telemetry is the first to go when the outbox is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordClass {
    Alarm = 0,
    Activity = 1,
    Telemetry = 2,
}

impl RecordClass {
    /// In upload order: alarms first.
    pub const ALL: [RecordClass; 3] = [
        RecordClass::Alarm,
        RecordClass::Activity,
        RecordClass::Telemetry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordClass::Alarm => "alarm",
            RecordClass::Activity => "activity",
            RecordClass::Telemetry => "telemetry",
        }
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(RecordClass::Alarm),
            1 => Some(RecordClass::Activity),
            2 => Some(RecordClass::Telemetry),
            _ => None,
        }
    }
}

/// A decision at a door, as the app's "Recent Activity" shows it. Never holds the credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub at: Timestamp,
    pub door: DoorId,
    /// The door unit, as `bus/address`.
    pub unit: UnitId,
    pub request_id: Option<u32>,
    pub credential_kind: CredentialKind,
    pub key_id: Option<KeyId>,
    pub category: Option<Category>,
    pub granted: bool,
    pub reason: Option<DenyReason>,
    /// The doors released on a grant.
    pub released: Vec<DoorId>,
    /// Set when the request was a remote open-door command from the cloud (the app), not a
    /// credential at the door.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Who granted the key: the id of a delegation (`docs/cloud-protocol.md` §5.3), or
    /// `"root"` for a key put by the root key; absent when no key was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// Why an OSDP reader was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderRefusal {
    /// It answers without the secure channel it is configured for: a wrong key, none, or no
    /// secure channel support.
    NoSecureChannel,
}

/// A record for the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Activity(Activity),
    /// Repeated unknown PINs locked a unit's keypad.
    PinLockout {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        until: Timestamp,
        failures: u32,
    },
    /// A door opened, closed, was forced open or held open.
    DoorEvent {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        event: DoorEventKind,
    },
    /// The call button was pressed (the app's call push notification).
    CallButton {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        button: u8,
    },
    /// The unit's housing was opened (`active`) or closed again.
    Tamper {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        active: bool,
    },
    /// An OSDP reader reports a power failure (`active`), or power back.
    PowerFailure {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        active: bool,
    },
    /// An OSDP reader was refused: it is not served.
    ReaderRefused {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        reason: ReaderRefusal,
    },
    /// A battery reading; `low` when at or below the configured threshold.
    Battery {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        percent: u8,
        millivolts: u16,
        low: bool,
    },
    /// A unit stopped answering polls, or answers again.
    UnitReachability {
        at: Timestamp,
        unit: UnitId,
        door: DoorId,
        online: bool,
    },
    /// The disk could not take records; they were kept in memory meanwhile.
    StorageUnavailable {
        at: Timestamp,
        detail: String,
    },
    /// The disk took records again after an outage.
    StorageRecovered {
        at: Timestamp,
        kept_in_memory: u64,
        dropped: u64,
    },
    /// The database file was found damaged (at start-up, or by the idle integrity check), moved
    /// aside, and replaced by a fresh one holding the unsent records and use counters that
    /// could be read from it; the keys come back with the cloud's next snapshot.
    DatabaseReplaced {
        at: Timestamp,
        /// What the check found.
        problem: String,
        /// Where the damaged file is now.
        moved_to: String,
        /// Unsent records carried over.
        records: u64,
        /// Use counters carried over.
        uses: u64,
    },
    /// The disk was full: the store released its disk reserve (`bytes`) so that records keep
    /// landing on disk. Whatever fills the disk must be dealt with before that runs out too.
    StorageReserveReleased {
        at: Timestamp,
        bytes: u64,
    },
    /// The outbox was full: this many routine records were dropped, oldest first (alarms never).
    OutboxDropped {
        at: Timestamp,
        telemetry: u64,
        activity: u64,
    },
    /// Decisions are made on an untrusted clock (`active`: time-bound keys are denied, the
    /// others follow `clock.untrusted_unlimited`), or on a trusted one again.
    ClockUntrusted {
        at: Timestamp,
        active: bool,
        /// The trusted-time mark then, if any.
        mark: Option<Timestamp>,
    },
    /// A signed cloud time (a key set's `issued_at`) lay more than a day beyond both the clock
    /// and the trusted-time mark: the key set was taken, its time was not used for the mark
    /// (it would have denied every time-bound key until the clock caught up with it).
    ClockMarkIgnored {
        at: Timestamp,
        /// The signed time.
        signed: Timestamp,
        /// The latest time it could have been believed: a day past the later of clock and mark.
        limit: Timestamp,
    },
    /// The trusted-time mark lay ahead of the NTP-synchronised clock and was lowered to it: a
    /// wrongly raised mark (a cloud clock ahead) would otherwise deny time-bound keys once NTP
    /// is lost, until the clock caught up.
    ClockMarkLowered {
        at: Timestamp,
        from: Timestamp,
        to: Timestamp,
    },
    /// A key-set message or command from the cloud was refused (bad signature, rollback, …);
    /// the held key set is unchanged.
    CloudRejected {
        at: Timestamp,
        /// The topic channel it came on, e.g. `keys/delta`.
        channel: String,
        reason: String,
        /// Refusals on this channel since the previous record that got no record of their own
        /// (a flood is recorded at most ten times a minute per channel; `cloud::refusals`).
        #[serde(default, skip_serializing_if = "is_zero")]
        also: u64,
    },
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    /// Call buttons and alarms jump the upload queue; telemetry goes first when space runs out.
    pub fn class(&self) -> RecordClass {
        match self {
            Record::Activity(_)
            | Record::UnitReachability { .. }
            | Record::DoorEvent {
                event: DoorEventKind::Opened | DoorEventKind::Closed,
                ..
            } => RecordClass::Activity,
            Record::Battery { low: false, .. } => RecordClass::Telemetry,
            Record::PinLockout { .. }
            | Record::DoorEvent {
                event: DoorEventKind::ForcedOpen | DoorEventKind::HeldOpen,
                ..
            }
            | Record::CallButton { .. }
            | Record::Tamper { .. }
            | Record::PowerFailure { .. }
            | Record::ReaderRefused { .. }
            | Record::Battery { low: true, .. }
            | Record::StorageUnavailable { .. }
            | Record::StorageRecovered { .. }
            | Record::CloudRejected { .. }
            | Record::DatabaseReplaced { .. }
            | Record::StorageReserveReleased { .. }
            | Record::ClockUntrusted { .. }
            | Record::ClockMarkIgnored { .. }
            | Record::ClockMarkLowered { .. }
            | Record::OutboxDropped { .. } => RecordClass::Alarm,
        }
    }

    pub fn at(&self) -> Timestamp {
        match self {
            Record::Activity(a) => a.at,
            Record::PinLockout { at, .. }
            | Record::DoorEvent { at, .. }
            | Record::CallButton { at, .. }
            | Record::Tamper { at, .. }
            | Record::PowerFailure { at, .. }
            | Record::ReaderRefused { at, .. }
            | Record::Battery { at, .. }
            | Record::UnitReachability { at, .. }
            | Record::StorageUnavailable { at, .. }
            | Record::StorageRecovered { at, .. }
            | Record::CloudRejected { at, .. }
            | Record::DatabaseReplaced { at, .. }
            | Record::StorageReserveReleased { at, .. }
            | Record::ClockUntrusted { at, .. }
            | Record::ClockMarkIgnored { at, .. }
            | Record::ClockMarkLowered { at, .. }
            | Record::OutboxDropped { at, .. } => *at,
        }
    }

    /// The CBOR body stored in the outbox.
    pub fn to_cbor(&self) -> Vec<u8> {
        crate::cbor::encode(self)
    }

    /// A record as a row's body holds it (bounded: [`decode_row`]).
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, crate::cbor::CborError> {
        decode_row(bytes)
    }
}

/// A record as read back from the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: i64,
    pub class: RecordClass,
    pub record: Record,
}
