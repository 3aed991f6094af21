//! The stored form of a key's rules: a compact binary layout, read on every credential lookup.
//!
//! CBOR through serde (what rows written before schema version 5 hold) names every field and
//! writes instants as RFC 3339 strings, so decoding one key's rules cost more than finding it.
//! This layout has no field names, instants as integers and one pass with no look-ahead:
//!
//! ```text
//! 0x01                      format
//! str id, str name          str: varint length, UTF-8 bytes
//! u8 category               index in Category::ALL
//! varint n, str door × n
//! u8 flags                  1 opens_inner_door, 2 revoked, 4 valid_from, 8 valid_until,
//!                           16 welcome
//! [instant valid_from] [instant valid_until]
//!                           instant: zigzag varint seconds, zigzag varint sub-second nanos
//! u8 schedule               0 always; 1 daily, window; 2 weekly, u8 days, u8 0|1, [window]
//!                           window: two times, each varint second of day, varint nanos
//! u8 use limit              0 unlimited; 1 total, varint; 2 per door, varint
//! [str welcome]
//! varint n, zigzag varint floor × n
//! [str issuer]              only when flags has 32 (a key put by a delegated signer)
//! ```
//!
//! [`decode`] still reads CBOR (its first byte is a map, never 0x01), so rows written by an
//! earlier version keep working until the next snapshot replaces them.

use jiff::Timestamp;
use jiff::civil::Time;

use super::StoreError;
use crate::access::{Category, DoorId, KeyRules, Schedule, UseLimit, WeekdaySet, Window};

const FORMAT: u8 = 0x01;

const INNER: u8 = 1;
const REVOKED: u8 = 2;
const FROM: u8 = 4;
const UNTIL: u8 = 8;
const WELCOME: u8 = 16;
const ISSUER: u8 = 32;

/// The rules as stored in `keys.rules` and `credentials.rules`.
pub fn encode(rules: &KeyRules) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + rules.id.len()
            + rules.name.len()
            + rules.doors.iter().map(|d| d.len() + 1).sum::<usize>()
            + rules.welcome.as_ref().map_or(0, String::len)
            + rules.issuer.as_ref().map_or(0, String::len),
    );
    out.push(FORMAT);
    put_str(&mut out, &rules.id);
    put_str(&mut out, &rules.name);
    out.push(category_code(rules.category));
    put_len(&mut out, rules.doors.len());
    for door in &rules.doors {
        put_str(&mut out, door);
    }
    let mut flags = 0;
    for (set, bit) in [
        (rules.opens_inner_door, INNER),
        (rules.revoked, REVOKED),
        (rules.valid_from.is_some(), FROM),
        (rules.valid_until.is_some(), UNTIL),
        (rules.welcome.is_some(), WELCOME),
        (rules.issuer.is_some(), ISSUER),
    ] {
        if set {
            flags |= bit;
        }
    }
    out.push(flags);
    for at in [rules.valid_from, rules.valid_until].into_iter().flatten() {
        put_i64(&mut out, at.as_second());
        put_i64(&mut out, i64::from(at.subsec_nanosecond()));
    }
    match &rules.schedule {
        Schedule::Always => out.push(0),
        Schedule::Daily { window } => {
            out.push(1);
            put_window(&mut out, window);
        }
        Schedule::Weekly { days, window } => {
            out.push(2);
            out.push(days.0);
            match window {
                None => out.push(0),
                Some(window) => {
                    out.push(1);
                    put_window(&mut out, window);
                }
            }
        }
    }
    match rules.use_limit {
        UseLimit::Unlimited => out.push(0),
        UseLimit::Total(n) => {
            out.push(1);
            put_u64(&mut out, u64::from(n));
        }
        UseLimit::PerDoor(n) => {
            out.push(2);
            put_u64(&mut out, u64::from(n));
        }
    }
    if let Some(welcome) = &rules.welcome {
        put_str(&mut out, welcome);
    }
    put_len(&mut out, rules.floors.len());
    for &floor in &rules.floors {
        put_i64(&mut out, i64::from(floor));
    }
    if let Some(issuer) = &rules.issuer {
        put_str(&mut out, issuer);
    }
    out
}

/// Rules as stored: this module's layout, or CBOR from before schema version 5.
pub fn decode(blob: &[u8]) -> Result<KeyRules, StoreError> {
    if blob.first() == Some(&FORMAT) {
        Cursor { rest: &blob[1..] }
            .rules()
            .map_err(|what| StoreError::Corrupt(format!("key rules: {what}")))
    } else {
        super::records::decode_row(blob).map_err(|e| StoreError::Corrupt(format!("key rules: {e}")))
    }
}

fn category_code(category: Category) -> u8 {
    Category::ALL
        .iter()
        .position(|&c| c == category)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(u8::MAX)
}

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0));
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    // Zigzag: small magnitudes of either sign stay short.
    put_u64(out, ((v << 1) ^ (v >> 63)).cast_unsigned());
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    put_u64(out, n as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_time(out: &mut Vec<u8>, t: Time) {
    let second = i64::from(t.hour()) * 3600 + i64::from(t.minute()) * 60 + i64::from(t.second());
    put_u64(out, second.cast_unsigned());
    put_u64(out, u64::from(t.subsec_nanosecond().cast_unsigned()));
}

fn put_window(out: &mut Vec<u8>, w: &Window) {
    put_time(out, w.start);
    put_time(out, w.end);
}

struct Cursor<'a> {
    rest: &'a [u8],
}

type Decoded<T> = Result<T, &'static str>;

impl Cursor<'_> {
    fn u8(&mut self) -> Decoded<u8> {
        let (&b, rest) = self.rest.split_first().ok_or("truncated")?;
        self.rest = rest;
        Ok(b)
    }

    fn u64(&mut self) -> Decoded<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }

    fn i64(&mut self) -> Decoded<i64> {
        let z = self.u64()?;
        Ok((z >> 1).cast_signed() ^ -((z & 1).cast_signed()))
    }

    fn u32(&mut self) -> Decoded<u32> {
        u32::try_from(self.u64()?).map_err(|_| "count out of range")
    }

    fn len(&mut self) -> Decoded<usize> {
        let n = usize::try_from(self.u64()?).map_err(|_| "length out of range")?;
        if n > self.rest.len() {
            // Every element takes at least one byte: a longer count is damage, not a big set.
            return Err("truncated");
        }
        Ok(n)
    }

    fn str(&mut self) -> Decoded<String> {
        let n = self.len()?;
        let (s, rest) = self.rest.split_at(n);
        self.rest = rest;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| "text is not UTF-8")
    }

    fn instant(&mut self) -> Decoded<Timestamp> {
        let second = self.i64()?;
        let nanos = i32::try_from(self.i64()?).map_err(|_| "instant out of range")?;
        Timestamp::new(second, nanos).map_err(|_| "instant out of range")
    }

    fn time(&mut self) -> Decoded<Time> {
        let second = self.u64()?;
        let nanos = i32::try_from(self.u64()?).map_err(|_| "time out of range")?;
        let hms = |v: u64| i8::try_from(v).map_err(|_| "time out of range");
        Time::new(
            hms(second / 3600)?,
            hms(second / 60 % 60)?,
            hms(second % 60)?,
            nanos,
        )
        .map_err(|_| "time out of range")
    }

    fn window(&mut self) -> Decoded<Window> {
        Ok(Window {
            start: self.time()?,
            end: self.time()?,
        })
    }

    fn rules(&mut self) -> Decoded<KeyRules> {
        let id = self.str()?;
        let name = self.str()?;
        let category = *Category::ALL
            .get(usize::from(self.u8()?))
            .ok_or("unknown category")?;
        let doors = (0..self.len()?)
            .map(|_| self.str().map(DoorId::from))
            .collect::<Decoded<Vec<_>>>()?;
        let flags = self.u8()?;
        if flags & !(INNER | REVOKED | FROM | UNTIL | WELCOME | ISSUER) != 0 {
            return Err("unknown flags");
        }
        let valid_from = (flags & FROM != 0).then(|| self.instant()).transpose()?;
        let valid_until = (flags & UNTIL != 0).then(|| self.instant()).transpose()?;
        let schedule = match self.u8()? {
            0 => Schedule::Always,
            1 => Schedule::Daily {
                window: self.window()?,
            },
            2 => Schedule::Weekly {
                days: WeekdaySet(self.u8()?),
                window: match self.u8()? {
                    0 => None,
                    1 => Some(self.window()?),
                    _ => return Err("unknown window marker"),
                },
            },
            _ => return Err("unknown schedule"),
        };
        let use_limit = match self.u8()? {
            0 => UseLimit::Unlimited,
            1 => UseLimit::Total(self.u32()?),
            2 => UseLimit::PerDoor(self.u32()?),
            _ => return Err("unknown use limit"),
        };
        let welcome = (flags & WELCOME != 0).then(|| self.str()).transpose()?;
        let floors = (0..self.len()?)
            .map(|_| i16::try_from(self.i64()?).map_err(|_| "floor out of range"))
            .collect::<Decoded<Vec<_>>>()?;
        let issuer = (flags & ISSUER != 0).then(|| self.str()).transpose()?;
        if !self.rest.is_empty() {
            return Err("trailing bytes");
        }
        Ok(KeyRules {
            id: id.into(),
            name,
            category,
            doors,
            opens_inner_door: flags & INNER != 0,
            valid_from,
            valid_until,
            schedule,
            use_limit,
            welcome,
            floors,
            revoked: flags & REVOKED != 0,
            issuer,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use jiff::civil::{Weekday, time};
    use proptest::prelude::*;

    use super::*;

    /// Rules using every field.
    pub(in crate::store) fn full() -> KeyRules {
        KeyRules {
            id: "key-0000042".into(),
            name: "Visitor 42 — Müller".into(),
            category: Category::Delivery,
            doors: vec!["main".into(), "garage".into()],
            opens_inner_door: true,
            valid_from: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            valid_until: Some("2027-01-01T00:00:00.5Z".parse().unwrap()),
            schedule: Schedule::Weekly {
                days: WeekdaySet::of(&[Weekday::Monday, Weekday::Friday]),
                window: Some(Window {
                    start: time(22, 0, 0, 0),
                    end: time(6, 0, 0, 0),
                }),
            },
            use_limit: UseLimit::PerDoor(5),
            welcome: Some("Welcome!".into()),
            floors: vec![-2, 3, 4],
            revoked: false,
            issuer: None,
        }
    }

    #[test]
    fn round_trips_and_is_much_smaller_than_cbor() {
        let rules = full();
        let blob = encode(&rules);
        assert_eq!(decode(&blob).unwrap(), rules);
        let mut cbor = Vec::new();
        ciborium::into_writer(&rules, &mut cbor).unwrap();
        assert!(
            blob.len() * 3 < cbor.len(),
            "{} vs {}",
            blob.len(),
            cbor.len()
        );
    }

    #[test]
    fn rules_stored_as_cbor_by_earlier_versions_still_decode() {
        let rules = full();
        let mut cbor = Vec::new();
        ciborium::into_writer(&rules, &mut cbor).unwrap();
        assert_ne!(cbor[0], FORMAT);
        assert_eq!(decode(&cbor).unwrap(), rules);
    }

    #[test]
    fn damage_is_reported_not_misread() {
        let blob = encode(&full());
        for cut in 1..blob.len() {
            assert!(decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        // The category byte follows the two strings.
        let mut bad = blob.clone();
        bad[1 + 1 + 11 + 1 + "Visitor 42 — Müller".len()] = 7;
        assert!(decode(&bad).is_err());
    }

    fn arb_instant() -> impl Strategy<Value = Timestamp> {
        (
            Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
            -999_999_999i32..=999_999_999,
        )
            .prop_filter_map("in range", |(s, n)| Timestamp::new(s, n).ok())
    }

    fn arb_time() -> impl Strategy<Value = Time> {
        (0i8..24, 0i8..60, 0i8..60, 0i32..1_000_000_000).prop_map(|(h, m, s, n)| time(h, m, s, n))
    }

    fn arb_window() -> impl Strategy<Value = Window> {
        (arb_time(), arb_time()).prop_map(|(start, end)| Window { start, end })
    }

    fn arb_rules() -> impl Strategy<Value = KeyRules> {
        let schedule = prop_oneof![
            Just(Schedule::Always),
            arb_window().prop_map(|window| Schedule::Daily { window }),
            (any::<u8>(), proptest::option::of(arb_window())).prop_map(|(d, window)| {
                Schedule::Weekly {
                    days: WeekdaySet(d),
                    window,
                }
            }),
        ];
        let limit = prop_oneof![
            Just(UseLimit::Unlimited),
            any::<u32>().prop_map(UseLimit::Total),
            any::<u32>().prop_map(UseLimit::PerDoor),
        ];
        (
            (".*", ".*", 0..Category::ALL.len()),
            proptest::collection::vec(".*", 0..4),
            (any::<bool>(), any::<bool>()),
            (
                proptest::option::of(arb_instant()),
                proptest::option::of(arb_instant()),
            ),
            schedule,
            limit,
            (proptest::option::of(".*"), proptest::option::of(".*")),
            proptest::collection::vec(any::<i16>(), 0..4),
        )
            .prop_map(
                |(
                    (id, name, c),
                    doors,
                    (inner, revoked),
                    (from, until),
                    schedule,
                    use_limit,
                    (welcome, issuer),
                    floors,
                )| {
                    KeyRules {
                        id: id.into(),
                        name,
                        category: Category::ALL[c],
                        doors: doors.into_iter().map(DoorId::from).collect(),
                        opens_inner_door: inner,
                        valid_from: from,
                        valid_until: until,
                        schedule,
                        use_limit,
                        welcome,
                        floors,
                        revoked,
                        issuer,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn any_rules_round_trip(rules in arb_rules()) {
            prop_assert_eq!(decode(&encode(&rules)).unwrap(), rules);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(mut bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(b) = bytes.first_mut() {
                *b = FORMAT;
            }
            let _ = decode(&bytes);
        }
    }
}
