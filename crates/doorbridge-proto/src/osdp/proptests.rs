//! Property tests of what OSDP readers hand the gateway: arbitrary key bytes through the
//! keypad, arbitrary card reads through the credential mapping (the reply sniffer's are in
//! the daemon, beside it). Nothing may panic, PINs stay bounded digits, card values keep their
//! layout and round-trip through `BITS:HEX`. The libFuzzer target `osdp_inputs` in `fuzz/`
//! goes further where a nightly toolchain is available.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use super::keypad::{KEY_CLEAR, KEY_ENTER, Keypad, KeypadEvent, KeypadRules, MAX_DIGITS};
use super::reader::{CardFormat, RawAs, credential};
use crate::access::credential::{format_card, parse_card};

fn arb_key() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => b'0'..=b'9',
        1 => Just(KEY_ENTER),
        1 => Just(KEY_CLEAR),
        1 => any::<u8>(),
    ]
}

proptest! {
    #[test]
    fn the_keypad_yields_only_bounded_digit_pins(
        replies in vec((vec(arb_key(), 0..24), 0u64..10_000), 0..40),
        digits in prop::option::of(1u8..=16),
        submit_on_timeout in any::<bool>(),
    ) {
        let rules = KeypadRules { digits, timeout: Duration::from_secs(5), submit_on_timeout };
        let mut keypad = Keypad::new(rules);
        let mut now = Duration::ZERO;
        for (keys, gap_ms) in replies {
            now += Duration::from_millis(gap_ms);
            let mut events = keypad.keys(&keys, now);
            events.extend(keypad.on_timeout(now + Duration::from_secs(6)));
            for event in events {
                if let KeypadEvent::Pin(pin) = event {
                    prop_assert!(!pin.is_empty() && pin.len() <= MAX_DIGITS);
                    prop_assert!(pin.iter().all(u8::is_ascii_digit));
                    if let Some(n) = digits {
                        prop_assert!(pin.len() <= usize::from(n));
                    }
                }
            }
        }
    }

    #[test]
    fn any_card_read_maps_without_panicking_and_cards_keep_their_layout(
        bits in 0usize..700,
        data in vec(any::<u8>(), 0..80),
        raw_as in prop_oneof![Just(RawAs::Card), Just(RawAs::Qr), Just(RawAs::Mobile)],
        wiegand in any::<bool>(),
    ) {
        let format = if wiegand { CardFormat::Wiegand } else { CardFormat::Raw };
        if let Ok((kind, value)) = credential(raw_as, format, bits, &data) {
            if kind == crate::access::CredentialKind::Card {
                prop_assert_eq!(value.len(), 2 + bits.div_ceil(8));
                let spare = bits.div_ceil(8) * 8 - bits;
                prop_assert_eq!(value.last().copied().unwrap_or(0) & !(0xFFu8 << spare), 0);
                prop_assert_eq!(parse_card(&format_card(&value)).ok(), Some(value));
            } else {
                prop_assert_eq!(value.len() * 8, bits);
            }
        }
    }

    #[test]
    fn card_texts_never_panic(text in ".{0,40}") {
        let _ = parse_card(&text);
    }
}
