//! Fuzz target: the bus session fed arbitrary line input between its own transmissions.
//!
//! The input is a script of operations, each an opcode byte and an argument byte: receive
//! `arg` raw bytes, receive a well-formed frame (valid COBS and CRC) from one of the units with
//! an arbitrary type and an `arg`-byte body, receive the previous frame again (a
//! retransmission), let `arg` milliseconds pass, or answer the engine's pending requests.
//! The session must never panic, must keep polling, and must keep its queues bounded.

#![no_main]

use std::time::Duration;

use doorbridge::bus::frame::{Address, Direction, Frame, encode};
use doorbridge::bus::message::Grant;
use doorbridge::bus::session::{Answer, Session, SessionConfig, SessionEvent};
use libfuzzer_sys::fuzz_target;

fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

fuzz_target!(|data: &[u8]| {
    let units: Vec<Address> = [1, 5, 9].iter().filter_map(|&n| Address::unit(n)).collect();
    let Ok(mut s) = Session::new(SessionConfig {
        units: units.clone(),
        cache_size: 2,
        ..SessionConfig::default()
    }) else {
        return;
    };
    let mut now = Duration::ZERO;
    let mut pending = Vec::new();
    let mut last = Vec::new();
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let arg = take(&mut rest, 1).first().copied().unwrap_or(0);
        if let Some(tx) = s.poll_next(now) {
            assert!(!tx.bytes.is_empty());
        }
        let events = match op % 5 {
            0 => {
                let chunk = take(&mut rest, usize::from(arg));
                s.on_bytes(chunk, now)
            }
            1 => {
                let head = take(&mut rest, 3);
                let &[who, id, msg_type] = head else {
                    continue;
                };
                let body = take(&mut rest, usize::from(arg)).to_vec();
                let unit = units[usize::from(who) % units.len()];
                let Ok(frame) =
                    Frame::new(Direction::ToGateway, unit, u16::from(id), msg_type, body)
                else {
                    continue;
                };
                last = encode(&frame);
                s.on_bytes(&last, now)
            }
            2 => s.on_bytes(&last.clone(), now),
            3 => {
                now += Duration::from_millis(u64::from(arg));
                s.on_timeout(now)
            }
            _ => {
                for key in pending.drain(..) {
                    let _ = s.answer(&key, Answer::Grant(Grant::default()));
                }
                Vec::new()
            }
        };
        for e in events {
            if let SessionEvent::Request(r) = e {
                pending.push(r.key);
            }
        }
        assert!(s.next_deadline().is_some());
    }
});
