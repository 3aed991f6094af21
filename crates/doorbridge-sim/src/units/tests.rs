//! Tests of the pure unit side, byte for byte against the documented vectors where they fit.

use super::vectors::{
    ACK, BATTERY, DENY, GARBAGE_THEN_POLL, GRANT, IDLE, OPEN_DOOR, POLL, TIME, VERIFY_PIN,
};
use super::*;
use doorbridge_proto::access::DenyReason;
use doorbridge_proto::bus::message::Grant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn unit(n: u8) -> Address {
    Address::unit(n).unwrap()
}

/// Units with a fixed first id and no status at power-up, so the vectors apply.
fn quiet(units: &[u8], first_id: u16) -> SimUnits {
    let addrs: Vec<Address> = units.iter().map(|&n| unit(n)).collect();
    SimUnits::new(
        &addrs,
        SimConfig {
            boot_status: false,
            first_id: Some(first_id),
            ..SimConfig::default()
        },
    )
    .unwrap()
}

fn gateway(msg: &Message, to: u8, id: u16) -> Vec<u8> {
    encode(&msg.to_frame(unit(to), id).unwrap())
}

fn poll(to: u8, id: u16) -> Vec<u8> {
    gateway(&Message::Poll, to, id)
}

fn idle(from: u8, id: u16) -> Vec<u8> {
    encode(&Message::Idle.to_frame(unit(from), id).unwrap())
}

fn pin(u: u8, value: &str) -> SimCommand {
    SimCommand::Verify {
        unit: unit(u),
        kind: CredentialKind::Pin,
        value: value.as_bytes().to_vec(),
        reader: 0,
    }
}

/// Everything due now, concatenated.
fn sent(sim: &mut SimUnits, now: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(bytes) = sim.poll_transmit(now) {
        out.extend(bytes);
    }
    out
}

/// Feeds `bytes` at `now` and returns the outputs and the answer.
fn exchange(sim: &mut SimUnits, bytes: &[u8], now: Duration) -> (Vec<Output>, Vec<u8>) {
    let outputs = sim.on_bytes(bytes, now);
    (outputs, sent(sim, now))
}

/// The message in a unit's answer.
fn decode(bytes: &[u8]) -> (Frame, Message) {
    let items = Decoder::new().feed(bytes);
    assert_eq!(items.len(), 1, "one frame in {bytes:02x?}");
    let frame = items.into_iter().next().unwrap().unwrap();
    let msg = Message::from_frame(&frame).unwrap();
    (frame, msg)
}

fn grant_doors_0_1() -> Answer {
    Answer::Grant(Grant {
        doors: vec![0, 1],
        welcome: Some("Welcome, Anna!".into()),
        floors: vec![3, 4],
    })
}

#[test]
fn a_poll_is_answered_with_idle_echoing_its_id() {
    let mut sim = quiet(&[5], 0);
    let (outputs, answer) = exchange(&mut sim, POLL.wire, ms(0));
    assert_eq!(outputs, vec![Output::Contact { unit: unit(5) }]);
    assert_eq!(answer, IDLE.wire);
    // Contact is reported once.
    let (outputs, answer) = exchange(&mut sim, POLL.wire, ms(10));
    assert!(outputs.is_empty());
    assert_eq!(answer, IDLE.wire);
    assert_eq!(sim.stats().answers, 2);
    assert_eq!(sim.stats().idle, 2);
}

#[test]
fn pin_verify_vector_is_repeated_identically_until_the_grant_vector() {
    let mut sim = quiet(&[5], 0x1234);
    assert!(sim.command(pin(5, "482916"), ms(0)).unwrap().is_empty());
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(0));
    assert_eq!(answer, VERIFY_PIN.wire);
    assert_eq!(sim.verify_in_flight(unit(5)), Some(0x1234));
    // The gateway is still deciding (or lost it): the same id and the same bytes.
    let (_, again) = exchange(&mut sim, &poll(5, 2), ms(20));
    assert_eq!(again, VERIFY_PIN.wire);

    let (outputs, answer) = exchange(&mut sim, GRANT.wire, ms(40));
    let Output::Decision {
        unit: u,
        id,
        request,
        answer: decision,
        sends,
        latency,
        repeat,
    } = &outputs[0]
    else {
        panic!("{outputs:?}");
    };
    assert_eq!((*u, *id, *sends, *repeat), (unit(5), 0x1234, 2, false));
    assert_eq!(*latency, ms(40));
    assert_eq!(request.value, b"482916");
    assert_eq!(decision, &grant_doors_0_1());
    // The grant serves as the next poll: idle with the grant's id.
    assert_eq!(answer, idle(5, 0x1234));
    assert_eq!(sim.verify_in_flight(unit(5)), None);

    // The gateway's retransmission of the grant is ignored, and answered.
    let (outputs, answer) = exchange(&mut sim, GRANT.wire, ms(60));
    assert!(matches!(outputs[..], [Output::Ignored { id: 0x1234, .. }]));
    assert_eq!(answer, idle(5, 0x1234));
}

#[test]
fn deny_vector_reaches_the_verify_it_answers() {
    let mut sim = quiet(&[5], 0x1235);
    sim.command(pin(5, "000000"), ms(0)).unwrap();
    exchange(&mut sim, POLL.wire, ms(0));
    let (outputs, _) = exchange(&mut sim, DENY.wire, ms(5));
    assert!(matches!(
        &outputs[..],
        [Output::Decision {
            id: 0x1235,
            answer: Answer::Deny(DenyReason::UsedUp),
            ..
        }]
    ));
}

#[test]
fn battery_vector_stays_until_the_ack_vector() {
    let mut sim = quiet(&[9], 0x0042);
    sim.command(
        SimCommand::Battery {
            unit: unit(9),
            percent: 87,
            millivolts: 3712,
        },
        ms(0),
    )
    .unwrap();
    assert_eq!(exchange(&mut sim, &poll(9, 1), ms(0)).1, BATTERY.wire);
    assert_eq!(exchange(&mut sim, &poll(9, 2), ms(10)).1, BATTERY.wire);
    assert_eq!(sim.outbox_len(unit(9)), Some(1));
    let (outputs, answer) = exchange(&mut sim, ACK.wire, ms(20));
    assert_eq!(
        outputs,
        vec![Output::Acked {
            unit: unit(9),
            id: 0x42,
            report: ReportKind::Battery
        }]
    );
    assert_eq!(answer, idle(9, 0x42));
    assert_eq!(sim.outbox_len(unit(9)), Some(0));
}

#[test]
fn time_broadcast_vector_is_carried_out_by_every_unit_unanswered() {
    let mut sim = quiet(&[5, 9], 1);
    let (outputs, answer) = exchange(&mut sim, TIME.wire, ms(0));
    assert!(answer.is_empty());
    let time = TimeSync {
        unix: 1_767_225_600,
        utc_offset: 3600,
    };
    assert_eq!(
        outputs,
        vec![
            Output::Time {
                unit: unit(5),
                id: 0x100,
                time,
                broadcast: true
            },
            Output::Time {
                unit: unit(9),
                id: 0x100,
                time,
                broadcast: true
            },
        ]
    );
    assert_eq!(sim.stats().broadcasts, 1);
    // The clock is set: reports carry the unit's time.
    sim.command(
        SimCommand::Door {
            unit: unit(9),
            door: 0,
            event: DoorEventKind::ForcedOpen,
        },
        Duration::from_secs(90),
    )
    .unwrap();
    let (_, answer) = exchange(&mut sim, &poll(9, 3), Duration::from_secs(91));
    let (_, msg) = decode(&answer);
    assert_eq!(
        msg,
        Message::DoorEvent(DoorEvent {
            door: 0,
            event: DoorEventKind::ForcedOpen,
            at: Some(1_767_225_690),
        })
    );
}

#[test]
fn open_door_vector_is_carried_out_once_within_five_seconds() {
    let mut sim = quiet(&[5], 1);
    let (outputs, answer) = exchange(&mut sim, OPEN_DOOR.wire, ms(0));
    assert_eq!(
        outputs,
        vec![
            Output::Contact { unit: unit(5) },
            Output::OpenDoor {
                unit: unit(5),
                id: 0x101,
                open: OpenDoor {
                    door: 0,
                    pulse_ms: 3000
                },
                broadcast: false
            }
        ]
    );
    assert_eq!(answer, idle(5, 0x101));
    // The gateway missed the answer and retransmits: answered, not carried out again.
    let (outputs, answer) = exchange(&mut sim, OPEN_DOOR.wire, ms(1000));
    assert!(outputs.is_empty());
    assert_eq!(answer, idle(5, 0x101));
    assert_eq!(sim.stats().repeated_commands, 1);
    // Much later the same id is a new command (the gateway's ids wrapped, say).
    let (outputs, _) = exchange(&mut sim, OPEN_DOOR.wire, ms(6000));
    assert!(matches!(outputs[..], [Output::OpenDoor { .. }]));
}

#[test]
fn garbage_then_poll_vector_counts_one_line_error_and_answers() {
    let mut sim = quiet(&[5], 1);
    let (outputs, answer) = exchange(&mut sim, GARBAGE_THEN_POLL, ms(0));
    assert_eq!(
        outputs,
        vec![
            Output::LineError(FrameError::BadCobs),
            Output::Contact { unit: unit(5) }
        ]
    );
    assert_eq!(answer, IDLE.wire);
    assert_eq!(sim.stats().line_errors, 1);
}

#[test]
fn frames_for_others_and_units_answers_are_ignored() {
    let mut sim = quiet(&[5], 1);
    let (outputs, answer) = exchange(&mut sim, &poll(7, 1), ms(0));
    assert!(outputs.is_empty() && answer.is_empty());
    // Another unit's answer (or our own echo) on a half-duplex line.
    let (outputs, answer) = exchange(&mut sim, IDLE.wire, ms(1));
    assert!(outputs.is_empty() && answer.is_empty());
    assert_eq!(sim.stats().ignored, 2);
}

#[test]
fn a_bad_message_is_answered_as_usual_and_not_carried_out() {
    let mut sim = quiet(&[5], 1);
    // An idle (a unit's type) sent to a unit, and an open door with a zero pulse.
    let wrong_way = encode(&Frame::new(Direction::ToUnit, unit(5), 3, 0x40, vec![]).unwrap());
    let (outputs, answer) = exchange(&mut sim, &wrong_way, ms(0));
    assert!(matches!(
        outputs[..],
        [
            Output::Contact { .. },
            Output::BadMessage {
                error: MessageError::WrongDirection(_),
                ..
            }
        ]
    ));
    assert_eq!(answer, idle(5, 3));
    let zero_pulse = encode(
        &Frame::new(
            Direction::ToUnit,
            unit(5),
            4,
            0x04,
            vec![0xa2, 0x61, 0x64, 0x00, 0x61, 0x70, 0x00],
        )
        .unwrap(),
    );
    let (outputs, answer) = exchange(&mut sim, &zero_pulse, ms(1));
    assert!(matches!(outputs[..], [Output::BadMessage { id: 4, .. }]));
    assert_eq!(answer, idle(5, 4));
    assert_eq!(sim.stats().bad_messages, 2);
    // A broadcast of a type that may not be broadcast: no answer.
    let bad_broadcast =
        encode(&Frame::new(Direction::ToUnit, Address::BROADCAST, 5, 0x01, vec![]).unwrap());
    let (outputs, answer) = exchange(&mut sim, &bad_broadcast, ms(2));
    assert!(matches!(outputs[..], [Output::BadMessage { .. }]));
    assert!(answer.is_empty());
}

#[test]
fn power_up_status_comes_first_with_the_boot_id() {
    let mut sim = SimUnits::new(
        &[unit(1), unit(2)],
        SimConfig {
            seed: 7,
            ..SimConfig::default()
        },
    )
    .unwrap();
    let boot = sim.boot_id(unit(1)).unwrap();
    assert_ne!(boot, sim.boot_id(unit(2)).unwrap());
    let (_, answer) = exchange(&mut sim, &poll(1, 10), ms(0));
    let (frame, msg) = decode(&answer);
    let Message::Status(status) = msg else {
        panic!("{msg:?}")
    };
    assert_eq!(status.boot_id, boot);
    assert_eq!(status.settings, SimConfig::default().settings);
    assert!(status.firmware.starts_with("door-sim "));
    // Acked, the unit is idle.
    let (outputs, answer) = exchange(&mut sim, &gateway(&Message::Ack, 1, frame.id()), ms(5));
    assert!(matches!(
        outputs[..],
        [Output::Acked {
            report: ReportKind::Status,
            ..
        }]
    ));
    assert_eq!(answer, idle(1, frame.id()));
    // The same seed gives the same units.
    let again = SimUnits::new(
        &[unit(1), unit(2)],
        SimConfig {
            seed: 7,
            ..SimConfig::default()
        },
    )
    .unwrap();
    assert_eq!(again.boot_id(unit(1)), Some(boot));
}

#[test]
fn a_verify_goes_first_and_a_decision_serves_as_the_next_poll() {
    let mut sim = quiet(&[3], 100);
    sim.command(
        SimCommand::Call {
            unit: unit(3),
            button: 0,
        },
        ms(0),
    )
    .unwrap();
    sim.command(pin(3, "1234"), ms(0)).unwrap();
    sim.command(pin(3, "5678"), ms(0)).unwrap();
    assert_eq!(sim.outbox_len(unit(3)), Some(3));
    // The call took id 100, the PINs 101 and 102; the first PIN goes first.
    let (_, answer) = exchange(&mut sim, &poll(3, 1), ms(0));
    let (frame, msg) = decode(&answer);
    assert_eq!(frame.id(), 101);
    assert!(matches!(msg, Message::Verify(v) if v.value == b"1234"));
    // One verify at a time: the deny for it brings the second PIN.
    let deny = Message::Deny(doorbridge_proto::bus::message::Deny {
        reason: DenyReason::UnknownCredential,
    });
    let (_, answer) = exchange(&mut sim, &gateway(&deny, 3, 101), ms(10));
    let (frame, msg) = decode(&answer);
    assert_eq!(frame.id(), 102);
    assert!(matches!(msg, Message::Verify(v) if v.value == b"5678"));
    // A decision for another id is ignored and the verify stays in flight.
    let (outputs, answer) = exchange(&mut sim, &gateway(&deny, 3, 77), ms(20));
    assert!(matches!(outputs[..], [Output::Ignored { id: 77, .. }]));
    assert_eq!(decode(&answer).0.id(), 102);
    let (_, answer) = exchange(&mut sim, &gateway(&deny, 3, 102), ms(30));
    let (frame, msg) = decode(&answer);
    assert_eq!(frame.id(), 100);
    assert!(matches!(msg, Message::CallButton(_)));
}

#[test]
fn a_unit_gives_up_on_a_verify_after_ten_seconds() {
    let mut sim = quiet(&[5], 0x1234);
    sim.command(pin(5, "482916"), ms(0)).unwrap();
    assert_eq!(sim.next_deadline(), None);
    exchange(&mut sim, POLL.wire, ms(500));
    assert_eq!(sim.next_deadline(), Some(ms(10_500)));
    assert!(sim.on_timeout(ms(10_499)).is_empty());
    let outputs = sim.on_timeout(ms(10_500));
    assert!(matches!(
        &outputs[..],
        [Output::GaveUp {
            id: 0x1234,
            reason: GaveUpReason::Timeout,
            ..
        }]
    ));
    assert_eq!(sim.next_deadline(), None);
    let (outputs, answer) = exchange(&mut sim, GRANT.wire, ms(11_000));
    assert!(matches!(outputs[..], [Output::Ignored { .. }]));
    assert_eq!(answer, idle(5, 0x1234));
}

#[test]
fn bad_crc_fault_spoils_one_answer() {
    let mut sim = quiet(&[5], 0x1234);
    sim.command(pin(5, "482916"), ms(0)).unwrap();
    sim.command(SimCommand::BadCrc { unit: unit(5) }, ms(0))
        .unwrap();
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(0));
    assert_eq!(answer.len(), VERIFY_PIN.wire.len());
    assert_eq!(Decoder::new().feed(&answer), vec![Err(FrameError::BadCrc)]);
    // The gateway retries; the answer is right again, the same id and bytes.
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(60));
    assert_eq!(answer, VERIFY_PIN.wire);
}

#[test]
fn truncate_fault_cuts_one_answer_without_its_closing_delimiter() {
    let mut sim = quiet(&[5], 0x1234);
    sim.command(pin(5, "482916"), ms(0)).unwrap();
    sim.command(SimCommand::Truncate { unit: unit(5) }, ms(0))
        .unwrap();
    let (_, cut) = exchange(&mut sim, POLL.wire, ms(0));
    assert!(VERIFY_PIN.wire.starts_with(&cut) && cut.len() < VERIFY_PIN.wire.len());
    assert_ne!(cut.last(), Some(&0));
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(60));
    assert_eq!(answer, VERIFY_PIN.wire);
    // What the gateway receives: one bad frame, then the verify.
    let mut line = cut;
    line.extend_from_slice(&answer);
    let items = Decoder::new().feed(&line);
    assert_eq!(items.len(), 2);
    assert!(items[0].is_err());
    assert_eq!(encode(items[1].as_ref().unwrap()), VERIFY_PIN.wire);
}

#[test]
fn late_fault_delays_one_answer() {
    let mut sim = quiet(&[5], 1);
    sim.command(
        SimCommand::Late {
            unit: unit(5),
            delay: ms(300),
        },
        ms(0),
    )
    .unwrap();
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(100));
    assert!(answer.is_empty());
    assert_eq!(sim.next_deadline(), Some(ms(400)));
    assert_eq!(sim.poll_transmit(ms(399)), None);
    assert_eq!(sim.poll_transmit(ms(400)), Some(IDLE.wire.to_vec()));
    // Only one answer was late.
    let (_, answer) = exchange(&mut sim, POLL.wire, ms(500));
    assert_eq!(answer, IDLE.wire);
    assert_eq!(sim.next_deadline(), None);
}

#[test]
fn garbage_is_non_zero_noise_sent_at_once() {
    let mut sim = quiet(&[5], 1);
    sim.command(SimCommand::Garbage { len: 40 }, ms(0)).unwrap();
    let noise = sent(&mut sim, ms(0));
    assert_eq!(noise.len(), 40);
    assert!(!noise.contains(&0));
    assert_eq!(sim.stats().garbage_bytes, 40);
    // The gateway sees exactly one bad frame once the next frame's delimiter comes.
    let mut line = noise;
    line.extend_from_slice(IDLE.wire);
    let items = Decoder::new().feed(&line);
    assert_eq!(items.len(), 2);
    assert!(items[0].is_err() && items[1].is_ok());
    assert_eq!(
        sim.command(
            SimCommand::Garbage {
                len: MAX_GARBAGE + 1
            },
            ms(0)
        ),
        Err(SimError::TooMuchGarbage(MAX_GARBAGE + 1))
    );
}

#[test]
fn retransmit_fault_resends_an_answered_verify_byte_for_byte() {
    let mut sim = quiet(&[5], 0x1234);
    assert_eq!(
        sim.command(
            SimCommand::Retransmit {
                unit: unit(5),
                report: false,
            },
            ms(0)
        ),
        Err(SimError::NothingSent(unit(5)))
    );
    sim.command(pin(5, "482916"), ms(0)).unwrap();
    exchange(&mut sim, POLL.wire, ms(0));
    // Still in flight: a retransmission is what happens anyway.
    sim.command(
        SimCommand::Retransmit {
            unit: unit(5),
            report: false,
        },
        ms(1),
    )
    .unwrap();
    assert_eq!(exchange(&mut sim, POLL.wire, ms(2)).1, VERIFY_PIN.wire);
    exchange(&mut sim, GRANT.wire, ms(3));
    assert_eq!(sim.verify_in_flight(unit(5)), None);

    sim.command(
        SimCommand::Retransmit {
            unit: unit(5),
            report: false,
        },
        ms(10),
    )
    .unwrap();
    assert_eq!(exchange(&mut sim, &poll(5, 9), ms(20)).1, VERIFY_PIN.wire);
    let (outputs, _) = exchange(&mut sim, GRANT.wire, ms(30));
    assert!(matches!(
        &outputs[..],
        [Output::Decision {
            id: 0x1234,
            repeat: true,
            ..
        }]
    ));
}

#[test]
fn retransmit_fault_resends_an_acknowledged_report() {
    let mut sim = quiet(&[9], 0x42);
    assert_eq!(
        sim.command(
            SimCommand::Retransmit {
                unit: unit(9),
                report: true
            },
            ms(0)
        ),
        Err(SimError::NothingSent(unit(9)))
    );
    sim.command(
        SimCommand::Battery {
            unit: unit(9),
            percent: 87,
            millivolts: 3712,
        },
        ms(0),
    )
    .unwrap();
    exchange(&mut sim, &poll(9, 1), ms(0));
    exchange(&mut sim, ACK.wire, ms(1));
    sim.command(
        SimCommand::Retransmit {
            unit: unit(9),
            report: true,
        },
        ms(2),
    )
    .unwrap();
    assert_eq!(exchange(&mut sim, &poll(9, 2), ms(3)).1, BATTERY.wire);
    let (outputs, answer) = exchange(&mut sim, ACK.wire, ms(4));
    assert!(matches!(outputs[..], [Output::Acked { id: 0x42, .. }]));
    assert_eq!(answer, idle(9, 0x42));
}

#[test]
fn a_silent_unit_hears_nothing_until_it_resumes() {
    let mut sim = quiet(&[5, 6], 1);
    sim.command(
        SimCommand::Late {
            unit: unit(5),
            delay: ms(100),
        },
        ms(0),
    )
    .unwrap();
    exchange(&mut sim, POLL.wire, ms(0));
    assert!(sim.next_deadline().is_some());
    sim.command(
        SimCommand::Silent {
            unit: unit(5),
            on: true,
        },
        ms(1),
    )
    .unwrap();
    // The late answer in the pipe is gone with the cable.
    assert_eq!(sim.next_deadline(), None);
    assert_eq!(sim.is_silent(unit(5)), Some(true));
    for id in 0..5 {
        let (outputs, answer) = exchange(&mut sim, &poll(5, id), ms(10 + u64::from(id)));
        assert!(outputs.is_empty() && answer.is_empty());
    }
    assert_eq!(sim.stats().unheard, 5);
    // Broadcasts do not reach it either; the other unit carries them out.
    let (outputs, _) = exchange(&mut sim, TIME.wire, ms(20));
    assert!(matches!(&outputs[..], [Output::Time { unit: u, .. }] if *u == unit(6)));
    sim.command(
        SimCommand::Silent {
            unit: unit(5),
            on: false,
        },
        ms(30),
    )
    .unwrap();
    assert_eq!(exchange(&mut sim, POLL.wire, ms(40)).1, IDLE.wire);
}

#[test]
fn a_full_outbox_drops_batteries_first_and_door_events_last() {
    let mut sim = SimUnits::new(
        &[unit(1)],
        SimConfig {
            boot_status: false,
            first_id: Some(10),
            outbox: 3,
            ..SimConfig::default()
        },
    )
    .unwrap();
    let door = SimCommand::Door {
        unit: unit(1),
        door: 0,
        event: DoorEventKind::Opened,
    };
    let battery = SimCommand::Battery {
        unit: unit(1),
        percent: 50,
        millivolts: 3600,
    };
    let call = SimCommand::Call {
        unit: unit(1),
        button: 0,
    };
    assert!(sim.command(door.clone(), ms(0)).unwrap().is_empty()); // 10
    assert!(sim.command(battery.clone(), ms(0)).unwrap().is_empty()); // 11
    assert!(sim.command(call.clone(), ms(0)).unwrap().is_empty()); // 12
    let dropped = sim.command(door.clone(), ms(0)).unwrap(); // 13
    assert_eq!(
        dropped,
        vec![Output::Dropped {
            unit: unit(1),
            id: 11,
            report: ReportKind::Battery
        }]
    );
    let dropped = sim.command(door.clone(), ms(0)).unwrap(); // 14
    assert!(matches!(dropped[..], [Output::Dropped { id: 12, .. }]));
    let dropped = sim.command(door, ms(0)).unwrap(); // 15
    assert!(matches!(dropped[..], [Output::Dropped { id: 10, .. }]));
    assert_eq!(sim.outbox_len(unit(1)), Some(3));
}

#[test]
fn settings_are_applied_and_a_status_reports_them() {
    let mut sim = quiet(&[2], 50);
    let settings = Settings {
        volume: Some(80),
        name: Some("Gate A".into()),
        ..Settings::default()
    };
    let (outputs, answer) = exchange(
        &mut sim,
        &gateway(&Message::Settings(settings.clone()), 2, 7),
        ms(0),
    );
    assert_eq!(
        outputs[1],
        Output::Settings {
            unit: unit(2),
            id: 7,
            settings
        }
    );
    let (frame, Message::Status(status)) = decode(&answer) else {
        panic!("not a status");
    };
    assert_eq!(frame.id(), 50);
    assert_eq!(status.settings.volume, Some(80));
    assert_eq!(status.settings.name.as_deref(), Some("Gate A"));
    // Keys not sent keep their values.
    assert_eq!(status.settings.inner_door, Some(false));
    assert_eq!(status.boot_id, sim.boot_id(unit(2)).unwrap());
}

#[test]
fn restart_gives_up_on_everything_and_reports_a_new_boot() {
    let mut sim = quiet(&[4], 0x10);
    sim.command(pin(4, "1111"), ms(0)).unwrap();
    sim.command(
        SimCommand::Tamper {
            unit: unit(4),
            active: true,
        },
        ms(0),
    )
    .unwrap();
    exchange(&mut sim, &poll(4, 1), ms(0));
    let boot = sim.boot_id(unit(4)).unwrap();
    let outputs = sim
        .command(
            SimCommand::Restart {
                unit: unit(4),
                firmware: Some("2.0.0".into()),
            },
            ms(5),
        )
        .unwrap();
    assert!(matches!(
        outputs[..],
        [
            Output::GaveUp {
                id: 0x10,
                reason: GaveUpReason::Restart,
                ..
            },
            Output::Dropped {
                id: 0x11,
                report: ReportKind::Tamper,
                ..
            }
        ]
    ));
    assert_ne!(sim.boot_id(unit(4)), Some(boot));
    let (outputs, answer) = exchange(&mut sim, &poll(4, 2), ms(10));
    assert_eq!(outputs, vec![Output::Contact { unit: unit(4) }]);
    let (frame, Message::Status(status)) = decode(&answer) else {
        panic!("not a status");
    };
    // `first_id` is fixed here, so the restarted unit reuses ids (the gateway clears its
    // cache on the new boot id).
    assert_eq!(frame.id(), 0x10);
    assert_eq!(status.firmware, "2.0.0");
    assert_eq!(Some(status.boot_id), sim.boot_id(unit(4)));
}

#[test]
fn commands_for_unknown_units_and_bad_values_are_refused() {
    let mut sim = quiet(&[1], 1);
    assert_eq!(
        sim.command(pin(2, "1234"), ms(0)),
        Err(SimError::UnknownUnit(unit(2)))
    );
    assert!(matches!(
        sim.command(pin(1, ""), ms(0)),
        Err(SimError::Message(_))
    ));
    assert!(matches!(
        sim.command(
            SimCommand::Battery {
                unit: unit(1),
                percent: 101,
                millivolts: 1
            },
            ms(0)
        ),
        Err(SimError::Message(_))
    ));
    assert!(matches!(
        sim.command(
            SimCommand::Status {
                unit: unit(1),
                firmware: Some("x".repeat(33))
            },
            ms(0)
        ),
        Err(SimError::Message(_))
    ));
    for _ in 0..MAX_WAITING_CREDENTIALS {
        sim.command(pin(1, "1"), ms(0)).unwrap();
    }
    assert_eq!(
        sim.command(pin(1, "1"), ms(0)),
        Err(SimError::QueueFull(unit(1)))
    );
}

#[test]
fn bad_configurations_are_refused() {
    let c = SimConfig::default;
    assert_eq!(SimUnits::new(&[], c()).err(), Some(SimError::NoUnits));
    assert_eq!(
        SimUnits::new(&[unit(1), unit(1)], c()).err(),
        Some(SimError::DuplicateUnit(unit(1)))
    );
    assert_eq!(
        SimUnits::new(&[Address::BROADCAST], c()).err(),
        Some(SimError::BroadcastUnit)
    );
    assert!(matches!(
        SimUnits::new(
            &[unit(1)],
            SimConfig {
                firmware: "x".repeat(40),
                ..c()
            }
        ),
        Err(SimError::Message(_))
    ));
    assert_eq!(
        SimUnits::new(&[unit(1)], SimConfig { outbox: 0, ..c() }).err(),
        Some(SimError::NoOutbox)
    );
}

#[test]
fn ids_wrap_from_65535_to_0() {
    let mut sim = quiet(&[1], 0xFFFF);
    sim.command(pin(1, "1"), ms(0)).unwrap();
    sim.command(pin(1, "2"), ms(0)).unwrap();
    let (_, a) = exchange(&mut sim, &poll(1, 1), ms(0));
    assert_eq!(decode(&a).0.id(), 0xFFFF);
    let deny = Message::Deny(doorbridge_proto::bus::message::Deny {
        reason: DenyReason::Expired,
    });
    let (_, b) = exchange(&mut sim, &gateway(&deny, 1, 0xFFFF), ms(1));
    assert_eq!(decode(&b).0.id(), 0);
}

#[test]
fn any_bytes_in_any_chunking_never_panic_and_stay_bounded() {
    // A cheap deterministic fuzz: pseudo-random bytes with frames mixed in.
    let mut sim = SimUnits::new(&[unit(5), unit(9)], SimConfig::default()).unwrap();
    let mut rng = Rng(42);
    let frames = [
        POLL.wire,
        GRANT.wire,
        DENY.wire,
        ACK.wire,
        TIME.wire,
        OPEN_DOOR.wire,
    ];
    let mut now = ms(0);
    for round in 0..2000u32 {
        let mut chunk: Vec<u8> = (0..rng.next_u16() % 64)
            .map(|_| rng.next_u16().to_le_bytes()[0])
            .collect();
        if round % 3 == 0 {
            let f = frames[usize::from(rng.next_u16()) % frames.len()];
            chunk.extend_from_slice(f);
        }
        now += ms(u64::from(rng.next_u16() % 50));
        let _ = sim.on_bytes(&chunk, now);
        let _ = sim.on_timeout(now);
        while sim.poll_transmit(now).is_some() {}
        if round % 100 == 0 {
            let _ = sim.command(pin(5, "1234"), now);
        }
    }
    assert!(sim.outbox_len(unit(5)).unwrap() <= MAX_WAITING_CREDENTIALS + 1 + 32);
}
