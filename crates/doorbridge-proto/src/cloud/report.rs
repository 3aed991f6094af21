//! What the gateway tells the cloud: its state, key-set acknowledgements, rejections, resync
//! requests and command results. Plain (unsigned) CBOR maps with a `type` field; see
//! `docs/cloud-protocol.md` §7.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::payload::{PayloadError, from_cbor, to_cbor};
use crate::ids::DoorId;

/// The largest report the cloud side accepts when decoding (a telemetry summary of many door
/// units is the largest, a few hundred bytes per unit).
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

/// Online or offline, on the retained `state` topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    Online,
    Offline,
}

/// How a remote command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The door unit was told to open.
    Opened,
    /// The key set refused it (the reason says why).
    Denied,
    /// The command itself was refused (expired, replayed, wrong target, bad signature…).
    Rejected,
    /// Accepted, but the door unit could not be reached.
    Unreachable,
    /// Done (a resync request was sent).
    Done,
}

/// One gateway → cloud message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Report {
    /// On `state`, retained: `online` with the held version at connect, `offline` as the will
    /// (without a version, since the will is fixed when the connection is made).
    State {
        state: Presence,
        gateway: String,
        held: Option<u64>,
        /// The gateway's public key (64 hex digits) that signs its record chain
        /// (docs/cloud-protocol.md §12.6); absent in the will and without an identity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        identity: Option<String>,
    },
    /// On `sync`: a snapshot or delta was committed; the gateway now holds `version`.
    Applied {
        version: u64,
        keys: Option<u64>,
        at: Timestamp,
    },
    /// On `sync`: a message was refused; the held key set is unchanged.
    Rejected {
        /// The channel it came on (`keys/manifest`, `keys/chunk`, …).
        channel: String,
        reason: String,
        version: Option<u64>,
        at: Timestamp,
    },
    /// On `sync`: the gateway needs a full snapshot newer than `held`.
    Resync {
        held: u64,
        reason: String,
        at: Timestamp,
    },
    /// On `cmd/result`: how a command ended.
    CommandResult {
        command_id: Option<String>,
        command: String,
        outcome: Outcome,
        reason: Option<String>,
        door: Option<DoorId>,
        at: Timestamp,
    },
    /// On `telemetry`: battery per door unit and the gateway's health.
    Telemetry(Box<super::summary::Summary>),
}

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        from_cbor(bytes, MAX_REPORT_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_name_their_type() {
        let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let all = [
            Report::State {
                state: Presence::Online,
                gateway: "gw1".into(),
                held: Some(7),
                identity: Some("ab".repeat(32)),
            },
            Report::Applied {
                version: 8,
                keys: Some(3),
                at,
            },
            Report::Rejected {
                channel: "keys/delta".into(),
                reason: "bad signature".into(),
                version: None,
                at,
            },
            Report::Resync {
                held: 7,
                reason: "delta gap".into(),
                at,
            },
            Report::CommandResult {
                command_id: Some("c1".into()),
                command: "open-door".into(),
                outcome: Outcome::Opened,
                reason: None,
                door: Some("main".into()),
                at,
            },
        ];
        for r in all {
            let bytes = r.encode();
            assert_eq!(Report::decode(&bytes).unwrap(), r);
        }
        let json = serde_json::to_string(&Report::Resync {
            held: 7,
            reason: "x".into(),
            at,
        })
        .unwrap();
        assert!(json.starts_with(r#"{"type":"resync""#), "{json}");
    }

    #[test]
    fn oversized_and_trailing_reports_are_refused() {
        let mut bytes = Report::Resync {
            held: 1,
            reason: "x".repeat(MAX_REPORT_BYTES),
            at: Timestamp::UNIX_EPOCH,
        }
        .encode();
        assert!(Report::decode(&bytes).is_err());
        bytes = Report::State {
            state: Presence::Offline,
            gateway: "g".into(),
            held: None,
            identity: None,
        }
        .encode();
        bytes.push(0);
        assert!(Report::decode(&bytes).is_err());
    }
}
