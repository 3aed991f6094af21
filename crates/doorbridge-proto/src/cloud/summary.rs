//! The telemetry summary as the cloud receives it (`docs/cloud-protocol.md`): the gateway's
//! health and its units' batteries at one moment. Plain data, shared by the telemetry task
//! that fills it and the report codec that carries it.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ids::{DoorId, UnitId};

/// The gateway's health and its units' batteries at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub gateway: String,
    pub at: Timestamp,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// The held key set (`None` when it could not be read).
    pub keyset: Option<KeySetHealth>,
    /// When a snapshot or delta was last committed by this process.
    pub last_sync: Option<Timestamp>,
    /// Records waiting for upload (`None` when it could not be read).
    pub outbox_depth: Option<u64>,
    pub clock: ClockHealth,
    pub buses: Vec<BusHealth>,
    /// The record chain's head signed when the summary was made, with the public key that
    /// signed it (docs/cloud-protocol.md §12.6): a periodic signature even when nothing is
    /// uploaded. Absent without an identity or a chained record.
    #[serde(default)]
    pub chain: Option<ChainHealth>,
}

/// A signed record chain head, in hex (docs/cloud-protocol.md §12.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainHealth {
    /// The gateway's public key, 64 hex digits.
    pub identity: String,
    pub epoch: u64,
    pub seq: u64,
    /// The chain link of record `seq`, 64 hex digits.
    pub head: String,
    /// Ed25519 over the head message, 128 hex digits.
    pub signature: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetHealth {
    pub version: u64,
    pub keys: u64,
    /// When the cloud signed it, and how long ago that was.
    pub issued_at: Option<Timestamp>,
    pub age_s: Option<u64>,
    /// The knowledge time: the signed time of the latest snapshot, delta or heartbeat taken
    /// (`docs/cloud-protocol.md` §5.2), and how long ago that was. Read as absent from a
    /// summary that has none (an older gateway's).
    #[serde(default)]
    pub known_at: Option<Timestamp>,
    #[serde(default)]
    pub known_age_s: Option<u64>,
    /// The categories whose keys are refused now because the knowledge is older than their
    /// `stale_after` limit (empty: none).
    #[serde(default)]
    pub stale: Vec<crate::access::Category>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockHealth {
    /// The system clock is NTP-synchronised.
    pub synced: bool,
    /// Time-bound keys are decided normally (the clock is not behind the trusted-time mark).
    pub trusted: bool,
    /// The trusted-time mark: the latest instant known to have passed.
    pub mark: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusHealth {
    pub name: String,
    pub port_open: bool,
    pub reopens: u64,
    pub timeouts: u64,
    pub retransmits: u64,
    /// Frames that failed to decode (length, COBS, CRC, version, address) or held a bad message.
    pub errors: u64,
    pub units: Vec<UnitHealth>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitHealth {
    /// `bus/address`.
    pub unit: UnitId,
    pub door: DoorId,
    pub online: bool,
    pub last_seen: Option<Timestamp>,
    pub battery_percent: Option<u8>,
    pub battery_millivolts: Option<u16>,
    pub battery_at: Option<Timestamp>,
    pub battery_low: bool,
}
