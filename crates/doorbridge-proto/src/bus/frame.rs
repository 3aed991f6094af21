//! The door-bus frame codec: bytes on the wire ⇄ [`Frame`]s. Pure, no I/O.
//!
//! A frame on the wire is `00 | COBS(raw) | 00`. The raw frame, before COBS, is:
//!
//! ```text
//! offset  size  field
//! 0       1     version       PROTOCOL_VERSION (1)
//! 1       1     address byte  bit 7: direction (0 gateway→unit, 1 unit→gateway)
//!                             bits 0–6: unit address 1..=126, 127 = broadcast (gateway→unit only)
//! 2       2     request id    big-endian u16
//! 4       1     message type  see `message::MsgType`
//! 5       n     body          CBOR (empty for some types), n ≤ MAX_BODY
//! 5+n     2     CRC           CRC-16/CCITT-FALSE over bytes 0..5+n, big-endian
//! ```
//!
//! The full specification, with test vectors, is `docs/door-bus.md`.
//!
//! [`encode`] builds the wire bytes; a [`Decoder`] takes arbitrary chunks of received bytes and
//! yields a `Result<Frame, FrameError>` per delimited frame. The decoder's buffer never holds
//! more than [`MAX_ENCODED`] bytes: a flood without delimiters is dropped and reported once as
//! [`FrameError::TooLong`] when the next delimiter arrives.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// The only protocol version this codec speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The frame delimiter. COBS guarantees it appears nowhere else.
pub const DELIMITER: u8 = 0x00;
/// Version, address byte, request id (2), message type.
pub const HEADER_LEN: usize = 5;
/// The CRC-16 trailer.
pub const CRC_LEN: usize = 2;
/// The shortest raw frame: a header and a CRC, empty body.
pub const MIN_RAW: usize = HEADER_LEN + CRC_LEN;
/// The longest raw frame (header + body + CRC). Chosen so that COBS adds exactly one byte and
/// never needs a 0xFF code byte, and a whole frame with both delimiters is [`MAX_FRAME`].
pub const MAX_RAW: usize = 253;
/// The longest body.
pub const MAX_BODY: usize = MAX_RAW - MIN_RAW;
/// The longest COBS-encoded frame, delimiters excluded (`MAX_RAW + 1`).
pub const MAX_ENCODED: usize = MAX_RAW + 1;
/// The longest frame on the wire, both delimiters included.
pub const MAX_FRAME: usize = MAX_ENCODED + 2;

/// Which way a frame travels. On a half-duplex line the gateway hears its own transmissions;
/// the direction bit tells them apart from a unit's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the gateway (the bus master) to one unit or to all (broadcast).
    ToUnit,
    /// From a unit to the gateway.
    ToGateway,
}

impl Direction {
    const BIT: u8 = 0x80;

    fn bit(self) -> u8 {
        match self {
            Direction::ToUnit => 0,
            Direction::ToGateway => Self::BIT,
        }
    }
}

/// A unit address on the bus: 1..=126, or [`Address::BROADCAST`] (127).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(u8);

impl Address {
    /// All units. Only the gateway sends to it, and no unit answers.
    pub const BROADCAST: Address = Address(127);
    /// The lowest unit address.
    pub const MIN_UNIT: u8 = 1;
    /// The highest unit address.
    pub const MAX_UNIT: u8 = 126;

    /// A unit address, if `n` is in 1..=126.
    pub fn unit(n: u8) -> Option<Address> {
        (Self::MIN_UNIT..=Self::MAX_UNIT)
            .contains(&n)
            .then_some(Address(n))
    }

    /// The 7-bit value on the wire.
    pub fn get(self) -> u8 {
        self.0
    }

    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_broadcast() {
            f.write_str("Address(broadcast)")
        } else {
            write!(f, "Address({})", self.0)
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_broadcast() {
            f.write_str("broadcast")
        } else {
            write!(f, "unit {}", self.0)
        }
    }
}

/// Why bytes between two delimiters are not a frame. The caller counts these; the decoder
/// carries on with the next frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub enum FrameError {
    /// More than [`MAX_ENCODED`] bytes without a delimiter (or a body over [`MAX_BODY`] given
    /// to [`Frame::new`]).
    #[error("frame too long (over {MAX_ENCODED} encoded bytes)")]
    TooLong,
    /// Fewer than [`MIN_RAW`] bytes after COBS decoding.
    #[error("frame too short ({0} bytes)")]
    Short(usize),
    /// A COBS code byte points past the end of the frame.
    #[error("bad COBS encoding")]
    BadCobs,
    /// The CRC does not match.
    #[error("bad CRC")]
    BadCrc,
    /// The CRC matched but the version byte is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    /// Address 0, or broadcast in a frame from a unit.
    #[error("bad address byte {0:#04x}")]
    BadAddress(u8),
}

/// One frame: who it is for or from, the request id, the message type and the CBOR body.
/// Only valid frames can be built, so [`encode`] cannot fail.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    direction: Direction,
    address: Address,
    id: u16,
    msg_type: u8,
    body: Vec<u8>,
}

impl Frame {
    /// A frame, if the body fits ([`MAX_BODY`]) and the address suits the direction (a unit
    /// never sends to the broadcast address).
    pub fn new(
        direction: Direction,
        address: Address,
        id: u16,
        msg_type: u8,
        body: Vec<u8>,
    ) -> Result<Frame, FrameError> {
        if body.len() > MAX_BODY {
            return Err(FrameError::TooLong);
        }
        if direction == Direction::ToGateway && address.is_broadcast() {
            return Err(FrameError::BadAddress(direction.bit() | address.get()));
        }
        Ok(Frame {
            direction,
            address,
            id,
            msg_type,
            body,
        })
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// For a gateway→unit frame the unit addressed (or broadcast); for a unit→gateway frame
    /// the sender.
    pub fn address(&self) -> Address {
        self.address
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn msg_type(&self) -> u8 {
        self.msg_type
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The raw frame (header, body, CRC) before COBS.
    pub fn to_raw(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(MIN_RAW + self.body.len());
        raw.push(PROTOCOL_VERSION);
        raw.push(self.direction.bit() | self.address.get());
        raw.extend_from_slice(&self.id.to_be_bytes());
        raw.push(self.msg_type);
        raw.extend_from_slice(&self.body);
        let crc = crc16(&raw);
        raw.extend_from_slice(&crc.to_be_bytes());
        raw
    }

    /// Parses a raw frame (after COBS decoding): length, CRC, version, address, in that order.
    pub fn from_raw(raw: &[u8]) -> Result<Frame, FrameError> {
        if raw.len() < MIN_RAW {
            return Err(FrameError::Short(raw.len()));
        }
        if raw.len() > MAX_RAW {
            return Err(FrameError::TooLong);
        }
        let (covered, trailer) = raw.split_at(raw.len() - CRC_LEN);
        let &[hi, lo] = trailer else {
            return Err(FrameError::Short(raw.len()));
        };
        if crc16(covered) != u16::from_be_bytes([hi, lo]) {
            return Err(FrameError::BadCrc);
        }
        let (header, body) = covered.split_at(HEADER_LEN);
        let &[version, addr_byte, id_hi, id_lo, msg_type] = header else {
            return Err(FrameError::Short(raw.len()));
        };
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let direction = if addr_byte & Direction::BIT == 0 {
            Direction::ToUnit
        } else {
            Direction::ToGateway
        };
        let n = addr_byte & !Direction::BIT;
        let address = match (Address::unit(n), direction) {
            (Some(a), _) => a,
            (None, Direction::ToUnit) if n == Address::BROADCAST.get() => Address::BROADCAST,
            _ => return Err(FrameError::BadAddress(addr_byte)),
        };
        Ok(Frame {
            direction,
            address,
            id: u16::from_be_bytes([id_hi, id_lo]),
            msg_type,
            body: body.to_vec(),
        })
    }
}

/// The wire bytes of a frame: `00 | COBS(raw) | 00`. The leading delimiter ends whatever
/// noise came before (a transceiver switching on), so the frame itself arrives clean.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let raw = frame.to_raw();
    let mut out = Vec::with_capacity(raw.len() + 3);
    out.push(DELIMITER);
    cobs_encode(&raw, &mut out);
    out.push(DELIMITER);
    out
}

/// How long `bytes` take on an asynchronous serial line at `baud` with 8N1 framing (ten bit
/// times per byte: start, eight data, stop). Rounded up to the microsecond.
pub fn wire_time(bytes: usize, baud: u32) -> Duration {
    if baud == 0 {
        return Duration::MAX;
    }
    let bits = u64::try_from(bytes).unwrap_or(u64::MAX).saturating_mul(10);
    let micros = bits.saturating_mul(1_000_000).div_ceil(u64::from(baud));
    Duration::from_micros(micros)
}

/// CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR.
/// Check value: `crc16(b"123456789") == 0x29B1`.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

/// Consistent Overhead Byte Stuffing (Cheshire & Baker): appends the encoding of `data` to
/// `out`; the encoding contains no zero byte. Adds one byte, plus one per further started block
/// of 254 non-zero bytes. A block of 254 non-zero bytes that ends the data gets no code byte
/// after it (as in the original paper); frames never reach that length (see [`MAX_RAW`]).
pub fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0); // placeholder for the first code byte
    let mut code: u8 = 1;
    let mut open = true;
    for &byte in data {
        if !open {
            code_at = out.len();
            out.push(0);
            code = 1;
            open = true;
        }
        if byte == 0 {
            set_code(out, code_at, code);
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(byte);
            code += 1;
            if code == 0xFF {
                set_code(out, code_at, code);
                open = false;
            }
        }
    }
    if open {
        set_code(out, code_at, code);
    }
}

fn set_code(out: &mut [u8], at: usize, code: u8) {
    if let Some(slot) = out.get_mut(at) {
        *slot = code;
    }
}

/// Decodes one COBS-encoded frame (no delimiters inside). A code byte running past the end,
/// or a zero byte, is [`FrameError::BadCobs`].
pub fn cobs_decode(data: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            return Err(FrameError::BadCobs);
        }
        let run = usize::from(code - 1);
        let Some((block, after)) = tail.split_at_checked(run) else {
            return Err(FrameError::BadCobs);
        };
        if block.contains(&0) {
            return Err(FrameError::BadCobs);
        }
        out.extend_from_slice(block);
        rest = after;
        if code != 0xFF && !rest.is_empty() {
            out.push(0);
        }
    }
    Ok(out)
}

/// A streaming frame decoder: feed it received bytes in any chunking; it yields one item per
/// delimited frame. Empty frames (two delimiters in a row) are skipped silently.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Dropping bytes until the next delimiter because the frame grew past [`MAX_ENCODED`].
    overflow: bool,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::with_capacity(MAX_ENCODED),
            overflow: false,
        }
    }

    /// Takes one byte; returns an item when it was a delimiter that ended a frame.
    pub fn push(&mut self, byte: u8) -> Option<Result<Frame, FrameError>> {
        if byte == DELIMITER {
            if std::mem::take(&mut self.overflow) {
                return Some(Err(FrameError::TooLong));
            }
            if self.buf.is_empty() {
                return None;
            }
            let item = cobs_decode(&self.buf).and_then(|raw| Frame::from_raw(&raw));
            self.buf.clear();
            return Some(item);
        }
        if self.overflow {
            return None;
        }
        if self.buf.len() >= MAX_ENCODED {
            self.buf.clear();
            self.overflow = true;
            return None;
        }
        self.buf.push(byte);
        None
    }

    /// Takes a chunk; returns the items for every frame the chunk ended, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Result<Frame, FrameError>> {
        chunk.iter().filter_map(|&b| self.push(b)).collect()
    }

    /// Bytes held for the frame in progress (never more than [`MAX_ENCODED`]).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets the frame in progress (after a line error, say).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::vectors::{self, GARBAGE_THEN_POLL, POLL};

    fn unit(n: u8) -> Address {
        Address::unit(n).unwrap()
    }

    /// A raw frame with a correct CRC over arbitrary header bytes.
    fn raw_with_crc(bytes: &[u8]) -> Vec<u8> {
        let mut raw = bytes.to_vec();
        raw.extend_from_slice(&crc16(bytes).to_be_bytes());
        raw
    }

    fn wire_of_raw(raw: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        cobs_encode(raw, &mut out);
        out.push(0);
        out
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
        assert_eq!(crc16(b""), 0xFFFF);
    }

    #[test]
    fn cobs_reference_examples() {
        // The examples of Cheshire & Baker's scheme as commonly published.
        let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (vec![], vec![0x01]),
            (vec![0x00], vec![0x01, 0x01]),
            (vec![0x00, 0x00], vec![0x01, 0x01, 0x01]),
            (vec![0x00, 0x11, 0x00], vec![0x01, 0x02, 0x11, 0x01]),
            (
                vec![0x11, 0x22, 0x00, 0x33],
                vec![0x03, 0x11, 0x22, 0x02, 0x33],
            ),
            (
                vec![0x11, 0x22, 0x33, 0x44],
                vec![0x05, 0x11, 0x22, 0x33, 0x44],
            ),
            (
                vec![0x11, 0x00, 0x00, 0x00],
                vec![0x02, 0x11, 0x01, 0x01, 0x01],
            ),
        ];
        for (data, want) in cases {
            let mut out = Vec::new();
            cobs_encode(&data, &mut out);
            assert_eq!(out, want, "encoding {data:02x?}");
            assert_eq!(cobs_decode(&want).unwrap(), data);
        }
        // 254 non-zero bytes: one full block, no trailing code byte.
        let data: Vec<u8> = (1..=254).collect();
        let mut out = Vec::new();
        cobs_encode(&data, &mut out);
        assert_eq!(out.len(), 255);
        assert_eq!(out[0], 0xFF);
        assert_eq!(cobs_decode(&out).unwrap(), data);
        // 255 bytes 01..=FF: FF block, then 02 FF.
        let data: Vec<u8> = (1..=255).collect();
        let mut out = Vec::new();
        cobs_encode(&data, &mut out);
        assert_eq!(&out[255..], &[0x02, 0xFF]);
        assert_eq!(cobs_decode(&out).unwrap(), data);
        // 00 01 … FE: 01 FF 01 … FE.
        let data: Vec<u8> = (0..=254).collect();
        let mut out = Vec::new();
        cobs_encode(&data, &mut out);
        assert_eq!(&out[..2], &[0x01, 0xFF]);
        assert_eq!(out.len(), 256);
        assert_eq!(cobs_decode(&out).unwrap(), data);
    }

    #[test]
    fn cobs_rejects_overruns_and_zeros() {
        assert_eq!(cobs_decode(&[0x05, 0x11, 0x22]), Err(FrameError::BadCobs));
        assert_eq!(cobs_decode(&[0x03, 0x11, 0x00]), Err(FrameError::BadCobs));
        assert_eq!(cobs_decode(&[0x00]), Err(FrameError::BadCobs));
    }

    #[test]
    fn documented_vectors_decode_and_encode() {
        for (v, _) in vectors::all() {
            let mut d = Decoder::new();
            let items = d.feed(v.wire);
            assert_eq!(items.len(), 1, "{}", v.name);
            let frame = items.into_iter().next().unwrap().unwrap();
            assert_eq!(frame.direction(), v.direction, "{}", v.name);
            assert_eq!(frame.address(), v.address(), "{}", v.name);
            assert_eq!(frame.id(), v.id, "{}", v.name);
            assert_eq!(encode(&frame), v.wire, "{}", v.name);
        }
    }

    #[test]
    fn resyncs_after_garbage() {
        let mut d = Decoder::new();
        let items = d.feed(GARBAGE_THEN_POLL);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Err(FrameError::BadCobs));
        assert_eq!(encode(items[1].as_ref().unwrap()), POLL.wire);
        // Garbage that happens to decode as COBS fails the CRC instead.
        let mut noisy = vec![0x04, 0x55, 0xaa, 0x55];
        noisy.extend_from_slice(POLL.wire);
        let items = d.feed(&noisy);
        assert_eq!(items[0], Err(FrameError::Short(3)));
        assert!(items[1].is_ok());
        let mut noisy = vec![0x09, 1, 2, 3, 4, 5, 6, 7, 8];
        noisy.extend_from_slice(POLL.wire);
        let items = d.feed(&noisy);
        assert_eq!(items[0], Err(FrameError::BadCrc));
        assert!(items[1].is_ok());
    }

    #[test]
    fn any_chunking_gives_the_same_items() {
        let mut stream = GARBAGE_THEN_POLL.to_vec();
        for (v, _) in vectors::all() {
            stream.extend_from_slice(v.wire);
        }
        let whole = Decoder::new().feed(&stream);
        for size in 1..=stream.len() {
            let mut d = Decoder::new();
            let items: Vec<_> = stream.chunks(size).flat_map(|c| d.feed(c)).collect();
            assert_eq!(items, whole, "chunks of {size}");
        }
        let mut d = Decoder::new();
        let items: Vec<_> = stream.iter().filter_map(|&b| d.push(b)).collect();
        assert_eq!(items, whole);
    }

    #[test]
    fn truncated_frame_is_an_error_and_the_next_one_decodes() {
        let cut = &POLL.wire[..POLL.wire.len() - 3];
        let mut stream = cut.to_vec();
        stream.extend_from_slice(POLL.wire);
        let items = Decoder::new().feed(&stream);
        assert_eq!(items.len(), 2);
        assert!(items[0].is_err());
        assert!(items[1].is_ok());
        // Only the header survived.
        let items = Decoder::new().feed(&[0x00, 0x03, 0x01, 0x05, 0x00]);
        assert_eq!(items, vec![Err(FrameError::Short(2))]);
    }

    #[test]
    fn flood_without_delimiters_is_bounded_and_reported_once() {
        let mut d = Decoder::new();
        for _ in 0..100 {
            assert!(d.feed(&[0x55; 1000]).is_empty());
            assert!(d.buffered() <= MAX_ENCODED);
        }
        let mut tail = vec![0x00];
        tail.extend_from_slice(POLL.wire);
        let items = d.feed(&tail);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Err(FrameError::TooLong));
        assert!(items[1].is_ok());
    }

    #[test]
    fn longest_frame_fits_and_one_more_byte_does_not() {
        let f = Frame::new(Direction::ToUnit, unit(1), 7, 0x02, vec![0xAB; MAX_BODY]).unwrap();
        let wire = encode(&f);
        assert_eq!(wire.len(), MAX_FRAME);
        assert!(wire.len() <= MAX_FRAME);
        assert_eq!(Decoder::new().feed(&wire), vec![Ok(f)]);
        assert_eq!(
            Frame::new(
                Direction::ToUnit,
                unit(1),
                7,
                0x02,
                vec![0xAB; MAX_BODY + 1]
            ),
            Err(FrameError::TooLong)
        );
        // A raw frame one byte over the limit, correctly stuffed and checksummed.
        let mut raw = vec![1, 0x01, 0, 7, 0x02];
        raw.extend_from_slice(&[0xAB; MAX_BODY + 1]);
        let raw = raw_with_crc(&raw);
        assert_eq!(
            Decoder::new().feed(&wire_of_raw(&raw)),
            vec![Err(FrameError::TooLong)]
        );
        assert_eq!(Frame::from_raw(&raw), Err(FrameError::TooLong));
    }

    #[test]
    fn bad_crc_version_and_address() {
        let mut raw = POLL.wire.to_vec();
        raw[7] ^= 0x01; // flip a bit of a data byte (not a code byte)
        assert_eq!(Decoder::new().feed(&raw), vec![Err(FrameError::BadCrc)]);

        let v2 = raw_with_crc(&[2, 0x05, 0, 1, 0x01]);
        assert_eq!(Frame::from_raw(&v2), Err(FrameError::BadVersion(2)));
        let a0 = raw_with_crc(&[1, 0x00, 0, 1, 0x01]);
        assert_eq!(Frame::from_raw(&a0), Err(FrameError::BadAddress(0x00)));
        let a0_up = raw_with_crc(&[1, 0x80, 0, 1, 0x40]);
        assert_eq!(Frame::from_raw(&a0_up), Err(FrameError::BadAddress(0x80)));
        let bcast_up = raw_with_crc(&[1, 0xFF, 0, 1, 0x40]);
        assert_eq!(
            Frame::from_raw(&bcast_up),
            Err(FrameError::BadAddress(0xFF))
        );
        let bcast_down = raw_with_crc(&[1, 0x7F, 0, 1, 0x06]);
        assert_eq!(
            Frame::from_raw(&bcast_down).unwrap().address(),
            Address::BROADCAST
        );
        assert_eq!(
            Frame::new(Direction::ToGateway, Address::BROADCAST, 1, 0x40, vec![]),
            Err(FrameError::BadAddress(0xFF))
        );
    }

    #[test]
    fn round_trip_both_directions() {
        for direction in [Direction::ToUnit, Direction::ToGateway] {
            for n in [1, 2, 63, 64, 126] {
                for id in [0, 1, 0x00FF, 0xFF00, 0xFFFF] {
                    let body = vec![0x00, 0xA1, 0x00, 0x00, 0xFF];
                    let f = Frame::new(direction, unit(n), id, 0x41, body).unwrap();
                    let wire = encode(&f);
                    assert_eq!(wire.first(), Some(&0));
                    assert_eq!(wire.last(), Some(&0));
                    assert!(!wire[1..wire.len() - 1].contains(&0));
                    assert_eq!(Decoder::new().feed(&wire), vec![Ok(f)]);
                }
            }
        }
    }

    #[test]
    fn addresses() {
        assert!(Address::unit(0).is_none());
        assert!(Address::unit(127).is_none());
        assert_eq!(Address::unit(126).unwrap().get(), 126);
        assert_eq!(Address::BROADCAST.get(), 127);
        assert_eq!(unit(5).to_string(), "unit 5");
        assert_eq!(Address::BROADCAST.to_string(), "broadcast");
    }

    #[test]
    fn pin_entry_exchange_matches_the_document() {
        let bytes =
            vectors::POLL.wire.len() + vectors::VERIFY_PIN.wire.len() + vectors::GRANT.wire.len();
        assert_eq!(bytes, 74);
        assert_eq!(wire_time(bytes, 115_200), Duration::from_micros(6_424));
        assert_eq!(wire_time(bytes, 9600), Duration::from_micros(77_084));
        let doc = include_str!("../../../../docs/door-bus.md");
        assert!(doc.contains("**74 bytes = 6.424 ms at"));
        assert!(doc.contains("77.08 ms at 9600 baud**"));
    }

    #[test]
    fn wire_times() {
        assert_eq!(wire_time(10, 9600), Duration::from_micros(10_417));
        assert_eq!(wire_time(10, 115_200), Duration::from_micros(869));
        assert_eq!(wire_time(MAX_FRAME, 9600), Duration::from_micros(266_667));
        assert_eq!(wire_time(0, 9600), Duration::ZERO);
        assert_eq!(wire_time(1, 0), Duration::MAX);
    }
}
