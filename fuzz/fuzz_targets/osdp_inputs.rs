//! Fuzz target: what OSDP readers hand the gateway once libosdp has decoded a reply: card
//! reads through the credential mapping (every reader kind, both formats), keys through the
//! keypad, and card texts as the keys file and door-sim take them. None may panic; a PIN is
//! digits only and bounded; a card value keeps its layout.

#![no_main]

use std::time::Duration;

use doorbridge::access::CredentialKind;
use doorbridge::access::credential::{format_card, parse_card};
use doorbridge::osdp::keypad::{Keypad, KeypadEvent, KeypadRules, MAX_DIGITS};
use doorbridge::osdp::reader::{CardFormat, RawAs, credential};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let bits = usize::from(u16::from_le_bytes([
        rest.first().copied().unwrap_or(0),
        rest.get(1).copied().unwrap_or(0),
    ]));
    let body = rest.get(2..).unwrap_or_default();
    let raw_as = [RawAs::Card, RawAs::Qr, RawAs::Mobile][usize::from(head % 3)];
    let format = if head & 4 == 0 {
        CardFormat::Raw
    } else {
        CardFormat::Wiegand
    };
    if let Ok((kind, value)) = credential(raw_as, format, bits, body)
        && kind == CredentialKind::Card
    {
        assert_eq!(parse_card(&format_card(&value)).ok(), Some(value));
    }

    let rules = KeypadRules {
        digits: (head & 0x70 != 0).then_some((head >> 4) & 0x0F),
        timeout: Duration::from_secs(5),
        submit_on_timeout: head & 0x80 != 0,
    };
    let mut keypad = Keypad::new(rules);
    for (i, keys) in body.chunks(3).enumerate() {
        let now = Duration::from_millis(700 * i as u64);
        for event in keypad.keys(keys, now).into_iter().chain(keypad.on_timeout(now)) {
            if let KeypadEvent::Pin(pin) = event {
                assert!(pin.len() <= MAX_DIGITS && pin.iter().all(u8::is_ascii_digit));
            }
        }
    }

    let _ = parse_card(&String::from_utf8_lossy(body));
});
