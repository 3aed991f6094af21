//! The byte-level test vectors of `docs/door-bus.md`, shared by the codec and message tests.
//!
//! Every vector here must appear verbatim (as spaced lower-case hex) in the document; the
//! test `vectors_are_in_the_document` checks it, so the document and the code cannot drift.

use super::frame::{Address, Direction};
use super::message::{Battery, Deny, Grant, Message, OpenDoor, TimeSync, Verify};
use crate::access::{CredentialKind, DenyReason};

/// One documented frame: what it says and its exact wire bytes (both delimiters included).
#[derive(Debug)]
pub struct Vector {
    pub name: &'static str,
    pub direction: Direction,
    pub address: u8,
    pub id: u16,
    pub wire: &'static [u8],
}

impl Vector {
    pub fn address(&self) -> Address {
        if self.address == Address::BROADCAST.get() {
            Address::BROADCAST
        } else {
            Address::unit(self.address).unwrap_or(Address::BROADCAST)
        }
    }
}

/// Gateway → unit 5: poll, request id 0x0001.
pub const POLL: Vector = Vector {
    name: "poll",
    direction: Direction::ToUnit,
    address: 5,
    id: 0x0001,
    wire: &[0x00, 0x03, 0x01, 0x05, 0x05, 0x01, 0x01, 0x24, 0x08, 0x00],
};

/// Unit 5 → gateway: idle (nothing to report), echoing id 0x0001.
pub const IDLE: Vector = Vector {
    name: "idle",
    direction: Direction::ToGateway,
    address: 5,
    id: 0x0001,
    wire: &[0x00, 0x03, 0x01, 0x85, 0x05, 0x01, 0x40, 0xa1, 0xd5, 0x00],
};

/// Unit 5 → gateway: verify PIN "482916" at reader 0, request id 0x1234.
pub const VERIFY_PIN: Vector = Vector {
    name: "verify PIN",
    direction: Direction::ToGateway,
    address: 5,
    id: 0x1234,
    wire: &[
        0x00, 0x15, 0x01, 0x85, 0x12, 0x34, 0x41, 0xa3, 0x61, 0x6b, 0x01, 0x61, 0x76, 0x46, 0x34,
        0x38, 0x32, 0x39, 0x31, 0x36, 0x61, 0x72, 0x03, 0xb8, 0x88, 0x00,
    ],
};

/// Gateway → unit 5: grant for request 0x1234: doors 0 and 1 (the inner door), welcome text,
/// floors 3 and 4.
pub const GRANT: Vector = Vector {
    name: "grant",
    direction: Direction::ToUnit,
    address: 5,
    id: 0x1234,
    wire: &[
        0x00, 0x0a, 0x01, 0x05, 0x12, 0x34, 0x02, 0xa3, 0x61, 0x64, 0x82, 0x1a, 0x01, 0x61, 0x77,
        0x6e, 0x57, 0x65, 0x6c, 0x63, 0x6f, 0x6d, 0x65, 0x2c, 0x20, 0x41, 0x6e, 0x6e, 0x61, 0x21,
        0x61, 0x66, 0x82, 0x03, 0x04, 0x55, 0x40, 0x00,
    ],
};

/// Gateway → unit 5: deny for request 0x1235, reason 6 (used up).
pub const DENY: Vector = Vector {
    name: "deny",
    direction: Direction::ToUnit,
    address: 5,
    id: 0x1235,
    wire: &[
        0x00, 0x0c, 0x01, 0x05, 0x12, 0x35, 0x03, 0xa1, 0x61, 0x72, 0x06, 0x50, 0x4c, 0x00,
    ],
};

/// Unit 9 → gateway: battery 87 %, 3712 mV, request id 0x0042.
pub const BATTERY: Vector = Vector {
    name: "battery",
    direction: Direction::ToGateway,
    address: 9,
    id: 0x0042,
    wire: &[
        0x00, 0x03, 0x01, 0x89, 0x0f, 0x42, 0x45, 0xa2, 0x61, 0x70, 0x18, 0x57, 0x61, 0x6d, 0x19,
        0x0e, 0x80, 0x31, 0x2c, 0x00,
    ],
};

/// Gateway → unit 9: ack of the battery report 0x0042.
pub const ACK: Vector = Vector {
    name: "ack",
    direction: Direction::ToUnit,
    address: 9,
    id: 0x0042,
    wire: &[0x00, 0x03, 0x01, 0x09, 0x05, 0x42, 0x07, 0x53, 0x63, 0x00],
};

/// Gateway → broadcast: time 2026-01-01T00:00:00Z, UTC offset +3600 s, id 0x0100.
pub const TIME: Vector = Vector {
    name: "time",
    direction: Direction::ToUnit,
    address: 127,
    id: 0x0100,
    wire: &[
        0x00, 0x04, 0x01, 0x7f, 0x01, 0x09, 0x06, 0xa2, 0x61, 0x74, 0x1a, 0x69, 0x55, 0xb9, 0x08,
        0x61, 0x6f, 0x19, 0x0e, 0x10, 0x43, 0x9f, 0x00,
    ],
};

/// Gateway → unit 5: open door 0 for 3000 ms, id 0x0101.
pub const OPEN_DOOR: Vector = Vector {
    name: "open door",
    direction: Direction::ToUnit,
    address: 5,
    id: 0x0101,
    wire: &[
        0x00, 0x09, 0x01, 0x05, 0x01, 0x01, 0x04, 0xa2, 0x61, 0x64, 0x08, 0x61, 0x70, 0x19, 0x0b,
        0xb8, 0x54, 0x71, 0x00,
    ],
};

/// Line noise `de ad be ef`, then the poll above: one `BadCobs` error, then the poll.
pub const GARBAGE_THEN_POLL: &[u8] = &[
    0xde, 0xad, 0xbe, 0xef, 0x00, 0x03, 0x01, 0x05, 0x05, 0x01, 0x01, 0x24, 0x08, 0x00,
];

/// The documented frames with the messages they carry.
pub fn all() -> Vec<(Vector, Message)> {
    vec![
        (POLL, Message::Poll),
        (IDLE, Message::Idle),
        (
            VERIFY_PIN,
            Message::Verify(Verify {
                kind: CredentialKind::Pin,
                value: b"482916".to_vec(),
                reader: 0,
            }),
        ),
        (
            GRANT,
            Message::Grant(Grant {
                doors: vec![0, 1],
                welcome: Some("Welcome, Anna!".into()),
                floors: vec![3, 4],
            }),
        ),
        (
            DENY,
            Message::Deny(Deny {
                reason: DenyReason::UsedUp,
            }),
        ),
        (
            BATTERY,
            Message::Battery(Battery {
                percent: 87,
                millivolts: 3712,
                at: None,
            }),
        ),
        (ACK, Message::Ack),
        (
            TIME,
            Message::Time(TimeSync {
                unix: 1_767_225_600,
                utc_offset: 3600,
            }),
        ),
        (
            OPEN_DOOR,
            Message::OpenDoor(OpenDoor {
                door: 0,
                pulse_ms: 3000,
            }),
        ),
    ]
}

/// Spaced lower-case hex, as the document writes bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = include_str!("../../../../docs/door-bus.md");

    #[test]
    fn vectors_are_in_the_document() {
        for (v, _) in all() {
            let h = hex(v.wire);
            assert!(
                DOC.contains(&h),
                "{} vector missing from the doc: {h}",
                v.name
            );
        }
        let h = hex(GARBAGE_THEN_POLL);
        assert!(DOC.contains(&h), "resync vector missing from the doc: {h}");
    }
}
