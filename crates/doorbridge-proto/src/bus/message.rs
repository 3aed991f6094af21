//! Door-bus messages: the message types, their CBOR bodies, and the checks on both. Pure.
//!
//! Every body is one CBOR map with short text keys (one or two letters), or empty for the
//! types that carry nothing (poll, ack, idle). Decoding caps the body at [`MAX_BODY`] before
//! parsing, limits nesting to [`RECURSION_LIMIT`], rejects bytes after the CBOR item, decodes
//! into concrete types and then checks every field against the limits below. Unknown keys are
//! ignored so that a newer unit can add fields; a repeated key is an error.
//!
//! The schemas are specified in `docs/door-bus.md`; the tests there use the same vectors.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::frame::{Address, Direction, Frame, FrameError, MAX_BODY};
use crate::access::{CredentialKind, DenyReason};
use crate::cbor::CborError;

/// The deepest CBOR nesting a body may have (Status nests one map; unknown keys may add a
/// little more). Deeper input is rejected before it can exhaust the stack.
pub const RECURSION_LIMIT: usize = 8;
/// The longest credential value (PIN digits, QR token, mobile token), in bytes.
pub const MAX_CREDENTIAL: usize = 200;
/// The most doors one grant releases at a unit.
pub const MAX_DOORS: usize = 8;
/// The longest welcome text, in UTF-8 bytes.
pub const MAX_WELCOME: usize = 64;
/// The most elevator floors one grant releases.
pub const MAX_FLOORS: usize = 48;
/// The longest display name (device name), in UTF-8 bytes.
pub const MAX_NAME: usize = 32;
/// The longest house number, in UTF-8 bytes.
pub const MAX_HOUSE_NUMBER: usize = 16;
/// The longest firmware version string, in UTF-8 bytes.
pub const MAX_FIRMWARE: usize = 32;
/// The longest door-release pulse, in milliseconds.
pub const MAX_PULSE_MS: u16 = 60_000;
/// The largest UTC offset, in seconds (exclusive bound on the absolute value).
pub const MAX_UTC_OFFSET: i32 = 86_400;

/// The message type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    // gateway → unit
    Poll,
    Grant,
    Deny,
    OpenDoor,
    Settings,
    Time,
    Ack,
    // unit → gateway
    Idle,
    Verify,
    DoorEvent,
    Tamper,
    CallButton,
    Battery,
    Status,
}

impl MsgType {
    pub const ALL: [MsgType; 14] = [
        MsgType::Poll,
        MsgType::Grant,
        MsgType::Deny,
        MsgType::OpenDoor,
        MsgType::Settings,
        MsgType::Time,
        MsgType::Ack,
        MsgType::Idle,
        MsgType::Verify,
        MsgType::DoorEvent,
        MsgType::Tamper,
        MsgType::CallButton,
        MsgType::Battery,
        MsgType::Status,
    ];

    /// The byte on the wire. Gateway→unit types are 0x01..=0x07, unit→gateway 0x40..=0x46.
    pub fn code(self) -> u8 {
        match self {
            MsgType::Poll => 0x01,
            MsgType::Grant => 0x02,
            MsgType::Deny => 0x03,
            MsgType::OpenDoor => 0x04,
            MsgType::Settings => 0x05,
            MsgType::Time => 0x06,
            MsgType::Ack => 0x07,
            MsgType::Idle => 0x40,
            MsgType::Verify => 0x41,
            MsgType::DoorEvent => 0x42,
            MsgType::Tamper => 0x43,
            MsgType::CallButton => 0x44,
            MsgType::Battery => 0x45,
            MsgType::Status => 0x46,
        }
    }

    pub fn from_code(code: u8) -> Option<MsgType> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Which way messages of this type travel.
    pub fn direction(self) -> Direction {
        if self.code() < 0x40 {
            Direction::ToUnit
        } else {
            Direction::ToGateway
        }
    }

    /// Whether the gateway may send this type to the broadcast address.
    pub fn broadcast_ok(self) -> bool {
        matches!(self, MsgType::Time | MsgType::OpenDoor)
    }
}

/// Why a body is not a valid message.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum MessageError {
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("body of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("bad CBOR: {0}")]
    Cbor(String),
    #[error("{0} bytes after the CBOR body")]
    TrailingBytes(usize),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    #[error("message type {0:?} in a frame going the other way")]
    WrongDirection(MsgType),
    #[error("message type {0:?} may not be broadcast")]
    NotBroadcast(MsgType),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Unit → gateway: a credential presented at one of the unit's readers. Answered by
/// [`Grant`] or [`Deny`] with the same request id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Verify {
    #[serde(rename = "k", with = "kind_code")]
    pub kind: CredentialKind,
    /// The value as presented: the PIN's ASCII digits, the QR token's bytes, the mobile token.
    #[serde(rename = "v", with = "byte_string")]
    pub value: Vec<u8>,
    /// The unit's reader (or door) index the credential was presented at, from 0.
    #[serde(rename = "r")]
    pub reader: u8,
}

/// Gateway → unit: release these doors, show this text, allow these floors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The unit's door indices to release, the inner door included when the key opens it.
    #[serde(rename = "d")]
    pub doors: Vec<u8>,
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    pub welcome: Option<String>,
    /// Elevator floors to release (negative: below ground).
    #[serde(rename = "f", default, skip_serializing_if = "Vec::is_empty")]
    pub floors: Vec<i16>,
}

/// Gateway → unit: refused, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Deny {
    #[serde(rename = "r", with = "reason_code")]
    pub reason: DenyReason,
}

/// Gateway → unit: pulse a door's release (a remote open from the app, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OpenDoor {
    #[serde(rename = "d")]
    pub door: u8,
    /// How long to hold the release, 1..=[`MAX_PULSE_MS`].
    #[serde(rename = "p")]
    pub pulse_ms: u16,
}

/// Gateway → unit: settings to apply (absent fields stay as they are); unit → gateway inside
/// [`Status`]: the settings as applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Settings {
    /// Sound volume, 0..=100.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<u8>,
    /// The display (device) name.
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub house_number: Option<String>,
    /// Whether an inner door is wired to this unit.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub inner_door: Option<bool>,
}

/// Gateway → unit (often broadcast): the time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimeSync {
    /// Seconds since 1970-01-01T00:00:00Z.
    #[serde(rename = "t")]
    pub unix: u64,
    /// The site's current UTC offset in seconds (for display), |o| < [`MAX_UTC_OFFSET`].
    #[serde(rename = "o")]
    pub utc_offset: i32,
}

/// What happened at a door. (Serde names are for records; the wire uses [`Self::code`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoorEventKind {
    Opened,
    Closed,
    /// Opened without a release.
    ForcedOpen,
    /// Still open after the unit's held-open time.
    HeldOpen,
}

impl DoorEventKind {
    pub const ALL: [DoorEventKind; 4] = [
        DoorEventKind::Opened,
        DoorEventKind::Closed,
        DoorEventKind::ForcedOpen,
        DoorEventKind::HeldOpen,
    ];

    pub fn code(self) -> u8 {
        match self {
            DoorEventKind::Opened => 1,
            DoorEventKind::Closed => 2,
            DoorEventKind::ForcedOpen => 3,
            DoorEventKind::HeldOpen => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// Unit → gateway: a door opened, closed, was forced or held open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DoorEvent {
    #[serde(rename = "d")]
    pub door: u8,
    #[serde(rename = "e", with = "door_event_code")]
    pub event: DoorEventKind,
    /// When it happened by the unit's clock (unix seconds), if the unit has been set.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

/// Unit → gateway: the tamper switch changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tamper {
    /// True when the housing was opened, false when closed again.
    #[serde(rename = "a")]
    pub active: bool,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

/// Unit → gateway: a call button was pressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CallButton {
    /// The unit's button index, from 0.
    #[serde(rename = "b")]
    pub button: u8,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

/// Unit → gateway: a battery reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Battery {
    /// State of charge, 0..=100.
    #[serde(rename = "p")]
    pub percent: u8,
    #[serde(rename = "m")]
    pub millivolts: u16,
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
}

/// Unit → gateway: who the unit is and how it is set. The first report after power-up, and
/// again after applying [`Settings`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "fw")]
    pub firmware: String,
    /// A number the unit picks at random at every power-up. A change tells the gateway the
    /// unit restarted (and may reuse request ids), so the gateway forgets its cached answers.
    #[serde(rename = "b")]
    pub boot_id: u32,
    /// The settings as applied.
    #[serde(rename = "s")]
    pub settings: Settings,
}

/// A door-bus message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    Poll,
    Grant(Grant),
    Deny(Deny),
    OpenDoor(OpenDoor),
    Settings(Settings),
    Time(TimeSync),
    Ack,
    Idle,
    Verify(Verify),
    DoorEvent(DoorEvent),
    Tamper(Tamper),
    CallButton(CallButton),
    Battery(Battery),
    Status(Status),
}

impl Message {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Poll => MsgType::Poll,
            Message::Grant(_) => MsgType::Grant,
            Message::Deny(_) => MsgType::Deny,
            Message::OpenDoor(_) => MsgType::OpenDoor,
            Message::Settings(_) => MsgType::Settings,
            Message::Time(_) => MsgType::Time,
            Message::Ack => MsgType::Ack,
            Message::Idle => MsgType::Idle,
            Message::Verify(_) => MsgType::Verify,
            Message::DoorEvent(_) => MsgType::DoorEvent,
            Message::Tamper(_) => MsgType::Tamper,
            Message::CallButton(_) => MsgType::CallButton,
            Message::Battery(_) => MsgType::Battery,
            Message::Status(_) => MsgType::Status,
        }
    }

    /// Checks every field against the protocol's limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            Message::Poll
            | Message::Ack
            | Message::Idle
            | Message::Deny(_)
            | Message::DoorEvent(_)
            | Message::Tamper(_)
            | Message::CallButton(_) => Ok(()),
            Message::Verify(v) => {
                check(!v.value.is_empty(), "credential value is empty")?;
                check(v.value.len() <= MAX_CREDENTIAL, "credential value too long")
            }
            Message::Grant(g) => {
                check(g.doors.len() <= MAX_DOORS, "too many doors")?;
                check(g.floors.len() <= MAX_FLOORS, "too many floors")?;
                check_text(g.welcome.as_deref(), MAX_WELCOME, "welcome text too long")
            }
            Message::OpenDoor(o) => check(
                (1..=MAX_PULSE_MS).contains(&o.pulse_ms),
                "pulse length out of range",
            ),
            Message::Settings(s) => validate_settings(s),
            Message::Time(t) => check(
                t.utc_offset.abs() < MAX_UTC_OFFSET,
                "UTC offset out of range",
            ),
            Message::Battery(b) => check(b.percent <= 100, "battery percent over 100"),
            Message::Status(s) => {
                check_text(Some(&s.firmware), MAX_FIRMWARE, "firmware version too long")?;
                validate_settings(&s.settings)
            }
        }
    }

    /// The CBOR body (empty for poll, ack and idle), after [`Message::validate`].
    pub fn encode_body(&self) -> Result<Vec<u8>, MessageError> {
        self.validate()?;
        let body = match self {
            Message::Poll | Message::Ack | Message::Idle => Ok(Vec::new()),
            Message::Grant(b) => to_cbor(b),
            Message::Deny(b) => to_cbor(b),
            Message::OpenDoor(b) => to_cbor(b),
            Message::Settings(b) => to_cbor(b),
            Message::Time(b) => to_cbor(b),
            Message::Verify(b) => to_cbor(b),
            Message::DoorEvent(b) => to_cbor(b),
            Message::Tamper(b) => to_cbor(b),
            Message::CallButton(b) => to_cbor(b),
            Message::Battery(b) => to_cbor(b),
            Message::Status(b) => to_cbor(b),
        }?;
        if body.len() > MAX_BODY {
            return Err(MessageError::TooLong(body.len()));
        }
        Ok(body)
    }

    /// Decodes and checks a body of the given type byte.
    pub fn decode(msg_type: u8, body: &[u8]) -> Result<Message, MessageError> {
        let t = MsgType::from_code(msg_type).ok_or(MessageError::UnknownType(msg_type))?;
        if body.len() > MAX_BODY {
            return Err(MessageError::TooLong(body.len()));
        }
        let msg = match t {
            MsgType::Poll | MsgType::Ack | MsgType::Idle => {
                if !body.is_empty() {
                    return Err(MessageError::TrailingBytes(body.len()));
                }
                match t {
                    MsgType::Poll => Message::Poll,
                    MsgType::Ack => Message::Ack,
                    _ => Message::Idle,
                }
            }
            MsgType::Grant => Message::Grant(from_cbor(body)?),
            MsgType::Deny => Message::Deny(from_cbor(body)?),
            MsgType::OpenDoor => Message::OpenDoor(from_cbor(body)?),
            MsgType::Settings => Message::Settings(from_cbor(body)?),
            MsgType::Time => Message::Time(from_cbor(body)?),
            MsgType::Verify => Message::Verify(from_cbor(body)?),
            MsgType::DoorEvent => Message::DoorEvent(from_cbor(body)?),
            MsgType::Tamper => Message::Tamper(from_cbor(body)?),
            MsgType::CallButton => Message::CallButton(from_cbor(body)?),
            MsgType::Battery => Message::Battery(from_cbor(body)?),
            MsgType::Status => Message::Status(from_cbor(body)?),
        };
        msg.validate()?;
        Ok(msg)
    }

    /// The frame carrying this message to (gateway→unit types) or from (unit→gateway types)
    /// `address`.
    pub fn to_frame(&self, address: Address, id: u16) -> Result<Frame, MessageError> {
        let t = self.msg_type();
        if address.is_broadcast() && !t.broadcast_ok() {
            return Err(MessageError::NotBroadcast(t));
        }
        Ok(Frame::new(
            t.direction(),
            address,
            id,
            t.code(),
            self.encode_body()?,
        )?)
    }

    /// The message in a frame, checking that its type travels the frame's way and, for a
    /// broadcast, that it may be broadcast.
    pub fn from_frame(frame: &Frame) -> Result<Message, MessageError> {
        let msg = Message::decode(frame.msg_type(), frame.body())?;
        let t = msg.msg_type();
        if t.direction() != frame.direction() {
            return Err(MessageError::WrongDirection(t));
        }
        if frame.address().is_broadcast() && !t.broadcast_ok() {
            return Err(MessageError::NotBroadcast(t));
        }
        Ok(msg)
    }
}

impl Grant {
    /// The bus grant for an engine grant: each door id mapped to this unit's door index by
    /// `door_index` (doors that are not this unit's are left out: another unit releases them),
    /// the welcome text cut to [`MAX_WELCOME`] bytes at a character boundary, and at most
    /// [`MAX_DOORS`] doors and [`MAX_FLOORS`] floors (the rest are dropped).
    pub fn from_access(
        grant: &crate::access::Grant,
        mut door_index: impl FnMut(&str) -> Option<u8>,
    ) -> Grant {
        let mut doors: Vec<u8> = Vec::new();
        for d in &grant.doors {
            if let Some(i) = door_index(d)
                && !doors.contains(&i)
                && doors.len() < MAX_DOORS
            {
                doors.push(i);
            }
        }
        let welcome = grant.welcome.as_deref().map(|w| {
            let mut end = w.len().min(MAX_WELCOME);
            while !w.is_char_boundary(end) {
                end -= 1;
            }
            w.get(..end).unwrap_or_default().to_owned()
        });
        let floors = grant.floors.iter().copied().take(MAX_FLOORS).collect();
        Grant {
            doors,
            welcome,
            floors,
        }
    }
}

fn check(ok: bool, what: &'static str) -> Result<(), MessageError> {
    if ok {
        Ok(())
    } else {
        Err(MessageError::Invalid(what))
    }
}

fn check_text(text: Option<&str>, max: usize, what: &'static str) -> Result<(), MessageError> {
    check(text.is_none_or(|t| t.len() <= max), what)
}

fn validate_settings(s: &Settings) -> Result<(), MessageError> {
    check(s.volume.is_none_or(|v| v <= 100), "volume over 100")?;
    check_text(s.name.as_deref(), MAX_NAME, "display name too long")?;
    check_text(
        s.house_number.as_deref(),
        MAX_HOUSE_NUMBER,
        "house number too long",
    )
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, MessageError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| MessageError::Cbor(e.to_string()))?;
    Ok(out)
}

fn from_cbor<T: DeserializeOwned>(body: &[u8]) -> Result<T, MessageError> {
    // The body was capped at MAX_BODY before this.
    crate::cbor::decode(body, usize::MAX, RECURSION_LIMIT).map_err(|e| match e {
        CborError::TrailingBytes(n) => MessageError::TrailingBytes(n),
        CborError::Invalid(e) => MessageError::Cbor(e),
        CborError::TooLarge { len, .. } => MessageError::TooLong(len),
    })
}

// serde's `with` modules take the value by reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
mod kind_code {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::access::CredentialKind;

    pub fn serialize<S: Serializer>(kind: &CredentialKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(kind.code())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CredentialKind, D::Error> {
        let code = u8::deserialize(d)?;
        CredentialKind::from_code(code).ok_or_else(|| D::Error::custom("unknown credential kind"))
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)]
mod reason_code {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::access::DenyReason;

    pub fn serialize<S: Serializer>(reason: &DenyReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(reason.code())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DenyReason, D::Error> {
        let code = u8::deserialize(d)?;
        DenyReason::from_code(code).ok_or_else(|| D::Error::custom("unknown deny reason"))
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)]
mod door_event_code {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::DoorEventKind;

    pub fn serialize<S: Serializer>(kind: &DoorEventKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(kind.code())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DoorEventKind, D::Error> {
        let code = u8::deserialize(d)?;
        DoorEventKind::from_code(code).ok_or_else(|| D::Error::custom("unknown door event"))
    }
}

/// A `Vec<u8>` as a CBOR byte string (major type 2), not an array of integers.
mod byte_string {
    use std::fmt;

    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl Visitor<'_> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::frame::{Decoder, encode};
    use crate::bus::vectors;

    fn samples() -> Vec<Message> {
        let settings = Settings {
            volume: Some(70),
            name: Some("Main entrance".into()),
            house_number: Some("12B".into()),
            inner_door: Some(true),
        };
        vec![
            Message::Poll,
            Message::Grant(Grant {
                doors: vec![0, 1],
                welcome: Some("Willkommen, Jürgen ✓".into()),
                floors: vec![-2, 0, 3, 24, 300],
            }),
            Message::Grant(Grant::default()),
            Message::Deny(Deny {
                reason: DenyReason::OutsideSchedule,
            }),
            Message::OpenDoor(OpenDoor {
                door: 1,
                pulse_ms: MAX_PULSE_MS,
            }),
            Message::Settings(settings.clone()),
            Message::Settings(Settings::default()),
            Message::Time(TimeSync {
                unix: 1_767_225_600,
                utc_offset: -36_000,
            }),
            Message::Ack,
            Message::Idle,
            Message::Verify(Verify {
                kind: CredentialKind::Qr,
                value: vec![0; MAX_CREDENTIAL],
                reader: 3,
            }),
            Message::Verify(Verify {
                kind: CredentialKind::Mobile,
                value: b"tok".to_vec(),
                reader: 0,
            }),
            Message::DoorEvent(DoorEvent {
                door: 0,
                event: DoorEventKind::HeldOpen,
                at: Some(1_767_225_600),
            }),
            Message::DoorEvent(DoorEvent {
                door: 2,
                event: DoorEventKind::Opened,
                at: None,
            }),
            Message::Tamper(Tamper {
                active: true,
                at: None,
            }),
            Message::CallButton(CallButton {
                button: 4,
                at: Some(5),
            }),
            Message::Battery(Battery {
                percent: 100,
                millivolts: u16::MAX,
                at: None,
            }),
            Message::Status(Status {
                firmware: "2.4.1".into(),
                boot_id: 0x5EED_1234,
                settings,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_through_body_and_frame() {
        let mut seen = Vec::new();
        for msg in samples() {
            let t = msg.msg_type();
            if !seen.contains(&t) {
                seen.push(t);
            }
            let body = msg.encode_body().unwrap();
            assert_eq!(Message::decode(t.code(), &body).unwrap(), msg);
            let frame = msg.to_frame(Address::unit(42).unwrap(), 0xBEEF).unwrap();
            assert_eq!(frame.direction(), t.direction());
            let decoded = Decoder::new().feed(&encode(&frame));
            let [Ok(back)] = decoded.as_slice() else {
                panic!("{decoded:?}");
            };
            assert_eq!(Message::from_frame(back).unwrap(), msg);
        }
        assert_eq!(
            seen.len(),
            MsgType::ALL.len(),
            "a message type has no sample"
        );
    }

    #[test]
    fn documented_vectors() {
        for (v, msg) in vectors::all() {
            let frame = msg.to_frame(v.address(), v.id).unwrap();
            assert_eq!(encode(&frame), v.wire, "{}", v.name);
            let items = Decoder::new().feed(v.wire);
            let [Ok(f)] = items.as_slice() else {
                panic!("{}: {items:?}", v.name);
            };
            assert_eq!(Message::from_frame(f).unwrap(), msg, "{}", v.name);
        }
    }

    #[test]
    fn type_codes_are_unique_and_directional() {
        for t in MsgType::ALL {
            assert_eq!(MsgType::from_code(t.code()), Some(t));
        }
        assert_eq!(MsgType::from_code(0x00), None);
        assert_eq!(MsgType::from_code(0x47), None);
        assert_eq!(MsgType::Poll.direction(), Direction::ToUnit);
        assert_eq!(MsgType::Ack.direction(), Direction::ToUnit);
        assert_eq!(MsgType::Idle.direction(), Direction::ToGateway);
        assert_eq!(MsgType::Status.direction(), Direction::ToGateway);
    }

    #[test]
    fn unknown_type_and_oversized_body() {
        assert_eq!(
            Message::decode(0x99, &[]),
            Err(MessageError::UnknownType(0x99))
        );
        assert_eq!(
            Message::decode(0x41, &[0xA0; MAX_BODY + 1]),
            Err(MessageError::TooLong(MAX_BODY + 1))
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut body = Message::Deny(Deny {
            reason: DenyReason::Expired,
        })
        .encode_body()
        .unwrap();
        body.push(0x00);
        assert_eq!(
            Message::decode(0x03, &body),
            Err(MessageError::TrailingBytes(1))
        );
        assert_eq!(
            Message::decode(0x01, &[0xA0]),
            Err(MessageError::TrailingBytes(1))
        );
        assert_eq!(
            Message::decode(0x40, &[0xF6]),
            Err(MessageError::TrailingBytes(1))
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // {"r": 6, "x": [[[[…]]]]} with 200 levels: the unknown key is skipped with a limit.
        let mut body = vec![0xA2, 0x61, b'r', 0x06, 0x61, b'x'];
        body.extend(std::iter::repeat_n(0x81, 200));
        body.push(0x00);
        assert!(matches!(
            Message::decode(0x03, &body),
            Err(MessageError::Cbor(_))
        ));
        // Within the limit an unknown key is fine.
        let body = [0xA2, 0x61, b'r', 0x06, 0x61, b'x', 0x81, 0x81, 0x00];
        assert_eq!(
            Message::decode(0x03, &body).unwrap(),
            Message::Deny(Deny {
                reason: DenyReason::UsedUp
            })
        );
        // Indefinite-length arrays nest too.
        let mut body = vec![0xA2, 0x61, b'r', 0x06, 0x61, b'x'];
        body.extend(std::iter::repeat_n(0x9F, 200));
        assert!(matches!(
            Message::decode(0x03, &body),
            Err(MessageError::Cbor(_))
        ));
    }

    #[test]
    fn malformed_cbor_is_an_error() {
        for body in [
            &[][..],
            &[0xA1],
            &[0xA1, 0x61],
            &[0xA1, 0x61, b'r'],
            &[0x1B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0x5B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0xBB, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            &[0xA1, 0x61, b'r', 0xFF],
            &[0xA1, 0x61, b'r', 0x1C],
            &[0xA1, 0x62, 0xFF, 0xFE, 0x06],
            &[0xC6; 50],
        ] {
            assert!(
                matches!(Message::decode(0x03, body), Err(MessageError::Cbor(_))),
                "{body:02x?}"
            );
        }
    }

    #[test]
    fn fields_are_checked() {
        let bad: Vec<(u8, Vec<u8>)> = vec![
            // {"k": 9, "v": h'31', "r": 0}: unknown credential kind
            (
                0x41,
                vec![
                    0xA3, 0x61, b'k', 0x09, 0x61, b'v', 0x41, 0x31, 0x61, b'r', 0x00,
                ],
            ),
            // value as an array of integers, not a byte string
            (
                0x41,
                vec![
                    0xA3, 0x61, b'k', 0x01, 0x61, b'v', 0x81, 0x01, 0x61, b'r', 0x00,
                ],
            ),
            // empty value
            (
                0x41,
                vec![0xA3, 0x61, b'k', 0x01, 0x61, b'v', 0x40, 0x61, b'r', 0x00],
            ),
            // reader 256
            (
                0x41,
                vec![
                    0xA3, 0x61, b'k', 0x01, 0x61, b'v', 0x41, 0x31, 0x61, b'r', 0x19, 0x01, 0x00,
                ],
            ),
            // missing "r"
            (0x41, vec![0xA2, 0x61, b'k', 0x01, 0x61, b'v', 0x41, 0x31]),
            // reason 0 and reason 12
            (0x03, vec![0xA1, 0x61, b'r', 0x00]),
            (0x03, vec![0xA1, 0x61, b'r', 0x0C]),
            // reason as text
            (0x03, vec![0xA1, 0x61, b'r', 0x61, b'6']),
            // duplicate key
            (0x03, vec![0xA2, 0x61, b'r', 0x06, 0x61, b'r', 0x06]),
            // battery 101 %
            (0x45, vec![0xA2, 0x61, b'p', 0x18, 101, 0x61, b'm', 0x01]),
            // negative millivolts
            (0x45, vec![0xA2, 0x61, b'p', 0x01, 0x61, b'm', 0x20]),
            // pulse 0
            (0x04, vec![0xA2, 0x61, b'd', 0x00, 0x61, b'p', 0x00]),
            // pulse 60001
            (
                0x04,
                vec![0xA2, 0x61, b'd', 0x00, 0x61, b'p', 0x19, 0xEA, 0x61],
            ),
            // volume 101
            (0x05, vec![0xA1, 0x61, b'v', 0x18, 101]),
            // door event 5
            (0x42, vec![0xA2, 0x61, b'd', 0x00, 0x61, b'e', 0x05]),
            // UTC offset of a full day
            (
                0x06,
                vec![
                    0xA2, 0x61, b't', 0x00, 0x61, b'o', 0x1A, 0x00, 0x01, 0x51, 0x80,
                ],
            ),
            // a grant that is an array, not a map
            (0x02, vec![0x80]),
        ];
        for (t, body) in bad {
            assert!(Message::decode(t, &body).is_err(), "{t:#04x} {body:02x?}");
        }
        let too_long = [
            Message::Grant(Grant {
                doors: vec![0; MAX_DOORS + 1],
                ..Grant::default()
            }),
            Message::Grant(Grant {
                floors: vec![1; MAX_FLOORS + 1],
                ..Grant::default()
            }),
            Message::Grant(Grant {
                welcome: Some("x".repeat(MAX_WELCOME + 1)),
                ..Grant::default()
            }),
            Message::Verify(Verify {
                kind: CredentialKind::Qr,
                value: vec![1; MAX_CREDENTIAL + 1],
                reader: 0,
            }),
            Message::Settings(Settings {
                name: Some("n".repeat(MAX_NAME + 1)),
                ..Settings::default()
            }),
            Message::Settings(Settings {
                house_number: Some("1".repeat(MAX_HOUSE_NUMBER + 1)),
                ..Settings::default()
            }),
            Message::Status(Status {
                firmware: "f".repeat(MAX_FIRMWARE + 1),
                ..Status::default()
            }),
        ];
        for msg in too_long {
            assert!(
                matches!(msg.encode_body(), Err(MessageError::Invalid(_))),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn largest_allowed_messages_fit_in_a_frame() {
        let grant = Message::Grant(Grant {
            doors: (0..8).map(|d| d + 200).collect(),
            welcome: Some("é".repeat(MAX_WELCOME / 2)),
            floors: vec![i16::MIN; MAX_FLOORS],
        });
        assert!(grant.encode_body().unwrap().len() <= MAX_BODY);
        let verify = Message::Verify(Verify {
            kind: CredentialKind::Qr,
            value: vec![0xFF; MAX_CREDENTIAL],
            reader: 255,
        });
        assert!(verify.encode_body().unwrap().len() <= MAX_BODY);
        let status = Message::Status(Status {
            firmware: "f".repeat(MAX_FIRMWARE),
            boot_id: u32::MAX,
            settings: Settings {
                volume: Some(100),
                name: Some("n".repeat(MAX_NAME)),
                house_number: Some("h".repeat(MAX_HOUSE_NUMBER)),
                inner_door: Some(false),
            },
        });
        assert!(status.encode_body().unwrap().len() <= MAX_BODY);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        // {"r": 6, "zz": "future"}
        let body = [
            0xA2, 0x61, b'r', 0x06, 0x62, b'z', b'z', 0x66, b'f', b'u', b't', b'u', b'r', b'e',
        ];
        assert!(Message::decode(0x03, &body).is_ok());
    }

    #[test]
    fn direction_and_broadcast_rules() {
        let verify = Message::Verify(Verify {
            kind: CredentialKind::Pin,
            value: b"1".to_vec(),
            reader: 0,
        });
        let body = verify.encode_body().unwrap();
        let wrong =
            Frame::new(Direction::ToUnit, Address::unit(1).unwrap(), 1, 0x41, body).unwrap();
        assert_eq!(
            Message::from_frame(&wrong),
            Err(MessageError::WrongDirection(MsgType::Verify))
        );
        assert_eq!(
            Message::Poll.to_frame(Address::BROADCAST, 1),
            Err(MessageError::NotBroadcast(MsgType::Poll))
        );
        let poll_all = Frame::new(Direction::ToUnit, Address::BROADCAST, 1, 0x01, vec![]).unwrap();
        assert_eq!(
            Message::from_frame(&poll_all),
            Err(MessageError::NotBroadcast(MsgType::Poll))
        );
        let time = Message::Time(TimeSync {
            unix: 0,
            utc_offset: 0,
        });
        assert!(time.to_frame(Address::BROADCAST, 1).is_ok());
    }

    #[test]
    fn grant_from_access_maps_doors_and_bounds_sizes() {
        let access = crate::access::Grant {
            doors: vec![
                "main".into(),
                "inner".into(),
                "garage".into(),
                "main".into(),
            ],
            welcome: Some(format!("{}€", "a".repeat(MAX_WELCOME - 2))),
            floors: (0..100).collect(),
        };
        let g = Grant::from_access(&access, |d| match d {
            "main" => Some(0),
            "inner" => Some(1),
            _ => None,
        });
        assert_eq!(g.doors, vec![0, 1]);
        // "€" is three bytes and would end at MAX_WELCOME + 1: cut before it.
        assert_eq!(
            g.welcome.as_deref(),
            Some("a".repeat(MAX_WELCOME - 2).as_str())
        );
        assert_eq!(g.floors.len(), MAX_FLOORS);
        assert!(Message::Grant(g).encode_body().is_ok());
    }
}
