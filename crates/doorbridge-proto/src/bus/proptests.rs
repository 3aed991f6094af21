//! Property tests: random bytes in random chunkings through the frame decoder, the message
//! decoder and the session. Nothing may panic, the decoder's buffer and the session's queues
//! stay bounded, and a valid frame after any garbage is always recovered.
//!
//! These run with the ordinary test suite; the libFuzzer targets in `fuzz/` go further where a
//! nightly toolchain is available.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use super::frame::{Address, Decoder, Direction, Frame, MAX_BODY, MAX_ENCODED, MAX_FRAME, encode};
use super::message::{Message, MsgType};
use super::session::{Answer, COMMAND_QUEUE, Session, SessionConfig, SessionEvent};
use super::vectors;
use crate::access::DenyReason;

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        any::<bool>(),
        1u8..=127,
        any::<u16>(),
        any::<u8>(),
        vec(any::<u8>(), 0..=MAX_BODY),
    )
        .prop_filter_map("broadcast from a unit", |(up, n, id, t, body)| {
            let direction = if up {
                Direction::ToGateway
            } else {
                Direction::ToUnit
            };
            let address = Address::unit(n).unwrap_or(Address::BROADCAST);
            Frame::new(direction, address, id, t, body).ok()
        })
}

/// Feeds `line` in chunks of the given sizes (cycled).
fn feed_chunked(
    d: &mut Decoder,
    line: &[u8],
    sizes: &[usize],
) -> Vec<Result<Frame, super::frame::FrameError>> {
    let mut items = Vec::new();
    let mut rest = line;
    let mut k = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(k % sizes.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        items.extend(d.feed(chunk));
        assert!(d.buffered() <= MAX_ENCODED);
        rest = tail;
        k += 1;
    }
    items
}

/// Bytes that look like the line: pieces of real frames, delimiters and noise.
fn arb_line() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vectors::all().iter().map(|(v, _)| v.wire).collect();
    vec(
        prop_oneof![
            vec(any::<u8>(), 0..64),
            (0..pieces.len(), any::<usize>(), any::<usize>()).prop_map(move |(i, a, b)| {
                let w = pieces[i];
                let (a, b) = (a % (w.len() + 1), b % (w.len() + 1));
                w[a.min(b)..a.max(b)].to_vec()
            }),
            Just(vec![0u8]),
            vec(1u8..=255, 250..400),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn decoder_is_chunking_independent_and_bounded(
        line in prop_oneof![vec(any::<u8>(), 0..3000), arb_line()],
        sizes in vec(1usize..300, 1..16),
    ) {
        let chunked = feed_chunked(&mut Decoder::new(), &line, &sizes);
        let mut d = Decoder::new();
        let bytewise: Vec<_> = line.iter().filter_map(|&b| d.push(b)).collect();
        prop_assert_eq!(&chunked, &bytewise);
        for frame in chunked.into_iter().flatten() {
            let wire = encode(&frame);
            prop_assert!(wire.len() <= MAX_FRAME);
            prop_assert_eq!(Decoder::new().feed(&wire), vec![Ok(frame.clone())]);
            let _ = Message::from_frame(&frame);
        }
    }

    #[test]
    fn a_frame_after_any_garbage_is_recovered(
        garbage in prop_oneof![vec(any::<u8>(), 0..1000), arb_line()],
        frame in arb_frame(),
        sizes in vec(1usize..64, 1..8),
    ) {
        let mut line = garbage;
        line.extend(encode(&frame));
        let items = feed_chunked(&mut Decoder::new(), &line, &sizes);
        prop_assert_eq!(items.last(), Some(&Ok(frame)));
    }

    #[test]
    fn frames_round_trip(frame in arb_frame()) {
        let wire = encode(&frame);
        prop_assert!(wire.len() <= MAX_FRAME);
        prop_assert_eq!(Frame::from_raw(&frame.to_raw()), Ok(frame.clone()));
        prop_assert_eq!(Decoder::new().feed(&wire), vec![Ok(frame)]);
    }

    #[test]
    fn message_decoder_never_panics(t in any::<u8>(), body in vec(any::<u8>(), 0..300)) {
        for code in std::iter::once(t).chain(MsgType::ALL.iter().map(|m| m.code())) {
            if let Ok(msg) = Message::decode(code, &body) {
                let again = msg.encode_body().unwrap();
                prop_assert_eq!(Message::decode(code, &again), Ok(msg));
            }
        }
    }

    #[test]
    fn mutated_valid_bodies_never_panic(
        which in 0usize..9,
        edits in vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let all = vectors::all();
        let (_, msg) = &all[which % all.len()];
        let mut body = msg.encode_body().unwrap();
        for (at, byte, how) in edits {
            let at = at % (body.len() + 1);
            match how {
                0 if at < body.len() => body[at] = byte,
                1 => body.insert(at, byte),
                _ if at < body.len() => { body.remove(at); }
                _ => {}
            }
        }
        if let Ok(decoded) = Message::decode(msg.msg_type().code(), &body) {
            let again = decoded.encode_body().unwrap();
            prop_assert_eq!(Message::decode(msg.msg_type().code(), &again), Ok(decoded));
        }
    }

    #[test]
    fn session_survives_any_line_and_stays_bounded(
        script in vec((0u8..4, arb_line(), 0u64..400), 0..40),
    ) {
        let units: Vec<Address> = [1, 5, 9].iter().filter_map(|&n| Address::unit(n)).collect();
        let mut s = Session::new(SessionConfig { units, cache_size: 2, ..SessionConfig::default() })
            .unwrap();
        let mut now = Duration::ZERO;
        let mut pending = Vec::new();
        for (op, bytes, ms) in script {
            let _ = s.poll_next(now);
            let events = match op {
                0 | 1 => s.on_bytes(&bytes, now),
                2 => {
                    now += Duration::from_millis(ms);
                    s.on_timeout(now)
                }
                _ => {
                    for key in pending.drain(..) {
                        let _ = s.answer(&key, Answer::Deny(DenyReason::UnknownCredential));
                    }
                    Vec::new()
                }
            };
            for e in events {
                if let SessionEvent::Request(r) = e {
                    pending.push(r.key);
                }
            }
            prop_assert!(s.next_deadline().is_some());
            // Per unit: cache, owed ack, commands; decisions in flight; broadcasts.
            prop_assert!(s.footprint() <= 3 * (2 + 1 + COMMAND_QUEUE) + 3 * 2 + COMMAND_QUEUE);
        }
    }
}
