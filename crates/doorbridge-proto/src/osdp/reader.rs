//! What an OSDP reader's input means at the gateway, and what the gateway shows the reader
//! back: the pure mapping between OSDP and the access engine.
//!
//! - A card read (`osdp_RAW`) becomes a credential: a `card` (the card number's bits), or, on
//!   a reader configured so, a `qr` or `mobile` credential (the raw data as presented).
//! - A decision becomes reader actions: the relay pulse (`osdp_OUT`), the LED (`osdp_LED`),
//!   the buzzer (`osdp_BUZ`) and the welcome text (`osdp_TEXT`, bounded).
//!
//! No I/O and no libosdp types: the CP thread turns [`Action`]s into library commands.

use std::time::Duration;

use thiserror::Error;

use crate::access::credential::{CardError, card_value};
use crate::access::{CredentialKind, Decision};

/// How a reader's raw card data is read as a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RawAs {
    /// A card: the credential is the card number's bits ([`card_value`]).
    Card,
    /// A QR code reader that presents the code's bytes as raw data.
    Qr,
    /// A phone (NFC / BLE) presented to a reader that passes its token as raw data.
    Mobile,
}

/// The longest text a reader's display is sent (libosdp's `OSDP_CMD_TEXT_MAX_LEN`; the Rust
/// binding panics beyond it).
pub const MAX_TEXT: usize = 32;

/// The card data format an `osdp_RAW` reply names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardFormat {
    /// Raw bits, format unspecified.
    Raw,
    /// Wiegand bits (parity included), as the card's reader module produced them.
    Wiegand,
}

/// Why a card read is not a credential.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ReadError {
    #[error(transparent)]
    Card(#[from] CardError),
    #[error("raw data with no bits")]
    Empty,
    #[error("raw data says {bits} bits but carries {bytes} bytes")]
    Truncated { bits: usize, bytes: usize },
    #[error("raw data of {bits} bits is not whole bytes, so it is no {kind} token")]
    NotBytes { bits: usize, kind: &'static str },
}

/// The credential a card read presents at a reader whose raw data reads as `raw_as`.
pub fn credential(
    raw_as: RawAs,
    format: CardFormat,
    bits: usize,
    data: &[u8],
) -> Result<(CredentialKind, Vec<u8>), ReadError> {
    match (raw_as, format) {
        // Wiegand data is always a card, whatever the reader's raw data means.
        (RawAs::Card, _) | (_, CardFormat::Wiegand) => {
            Ok((CredentialKind::Card, card_value(bits, data)?))
        }
        (RawAs::Qr | RawAs::Mobile, CardFormat::Raw) => {
            let kind = if raw_as == RawAs::Qr {
                CredentialKind::Qr
            } else {
                CredentialKind::Mobile
            };
            if bits == 0 {
                return Err(ReadError::Empty);
            }
            if !bits.is_multiple_of(8) {
                return Err(ReadError::NotBytes {
                    bits,
                    kind: kind.as_str(),
                });
            }
            let bytes = bits / 8;
            let value = data.get(..bytes).ok_or(ReadError::Truncated {
                bits,
                bytes: data.len(),
            })?;
            Ok((kind, value.to_vec()))
        }
    }
}

/// An LED colour a reader shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Color {
    Green,
    Red,
}

/// What the gateway tells a reader to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pulse an output (the door strike, or an elevator floor) for this long.
    Pulse { output: u8, time: Duration },
    /// Light the reader's LED for this long, then return to its permanent state.
    Led { color: Color, time: Duration },
    /// Beep `count` times, each `on` long with `off` between.
    Beep {
        count: u8,
        on: Duration,
        off: Duration,
    },
    /// Show a text on the reader's display (at most [`MAX_TEXT`] bytes of ASCII).
    Text(Vec<u8>),
}

/// How a reader answers a decision: its outputs, display and timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feedback {
    /// The output that drives this reader's door strike; `None` for a reader without one
    /// (an elevator reader releases floors only).
    pub relay: Option<u8>,
    /// How long the strike is released on a grant.
    pub pulse: Duration,
    /// Whether the reader has a display for the welcome text.
    pub display: bool,
    /// The output for each floor an elevator reader releases: `(floor, output)`.
    pub floors: Vec<(i16, u8)>,
}

/// The actions for a decision at this reader. The door strike is released first: it is what
/// the person at the door waits for.
pub fn on_decision(feedback: &Feedback, decision: &Decision) -> Vec<Action> {
    match decision {
        Decision::Grant(grant) => {
            let mut actions = Vec::new();
            if let Some(output) = feedback.relay {
                actions.push(Action::Pulse {
                    output,
                    time: feedback.pulse,
                });
            }
            for floor in &grant.floors {
                if let Some(&(_, output)) = feedback.floors.iter().find(|(f, _)| f == floor) {
                    actions.push(Action::Pulse {
                        output,
                        time: feedback.pulse,
                    });
                }
            }
            actions.push(Action::Led {
                color: Color::Green,
                time: feedback.pulse,
            });
            actions.push(Action::Beep {
                count: 1,
                on: Duration::from_millis(200),
                off: Duration::ZERO,
            });
            if feedback.display
                && let Some(welcome) = &grant.welcome
            {
                actions.push(Action::Text(display_text(welcome)));
            }
            actions
        }
        Decision::Deny { .. } => vec![
            Action::Led {
                color: Color::Red,
                time: Duration::from_secs(2),
            },
            Action::Beep {
                count: 3,
                on: Duration::from_millis(100),
                off: Duration::from_millis(100),
            },
        ],
    }
}

/// A text as a reader's display takes it: printable ASCII (others become `?`), at most
/// [`MAX_TEXT`] bytes, cut at a character.
pub fn display_text(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                u8::try_from(c).unwrap_or(b'?')
            } else {
                b'?'
            }
        })
        .take(MAX_TEXT)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{DenyReason, Grant};

    #[test]
    fn raw_data_reads_as_configured_and_wiegand_is_always_a_card() {
        let qr = credential(RawAs::Qr, CardFormat::Raw, 24, b"QR-extra").unwrap();
        assert_eq!(qr, (CredentialKind::Qr, b"QR-".to_vec()));
        let phone = credential(RawAs::Mobile, CardFormat::Raw, 16, b"ab").unwrap();
        assert_eq!(phone, (CredentialKind::Mobile, b"ab".to_vec()));
        let card = credential(RawAs::Qr, CardFormat::Wiegand, 8, &[0xff]).unwrap();
        assert_eq!(card, (CredentialKind::Card, vec![0, 8, 0xff]));
        assert_eq!(
            credential(RawAs::Qr, CardFormat::Raw, 12, &[1, 2]),
            Err(ReadError::NotBytes {
                bits: 12,
                kind: "qr"
            })
        );
        assert_eq!(
            credential(RawAs::Card, CardFormat::Raw, 26, &[1, 2]),
            Err(ReadError::Card(CardError::Truncated { bits: 26, bytes: 2 }))
        );
    }

    fn feedback() -> Feedback {
        Feedback {
            relay: Some(1),
            pulse: Duration::from_secs(3),
            display: true,
            floors: vec![(3, 2), (4, 3)],
        }
    }

    #[test]
    fn a_grant_pulses_the_strike_first_then_floors_light_and_text() {
        let grant = Decision::Grant(Grant {
            doors: vec!["main".into()],
            welcome: Some("Grüß Gott, a very long welcome text that does not fit".into()),
            floors: vec![4, 9],
        });
        let actions = on_decision(&feedback(), &grant);
        assert_eq!(
            actions[0],
            Action::Pulse {
                output: 1,
                time: Duration::from_secs(3)
            }
        );
        assert_eq!(
            actions[1],
            Action::Pulse {
                output: 3,
                time: Duration::from_secs(3)
            }
        );
        let Some(Action::Text(text)) = actions.last() else {
            panic!("no text: {actions:?}")
        };
        assert_eq!(text.len(), MAX_TEXT);
        assert!(
            text.starts_with(b"Gr?? Gott"),
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }

    #[test]
    fn a_deny_shows_red_and_beeps_and_releases_nothing() {
        let actions = on_decision(&feedback(), &Decision::deny(DenyReason::UsedUp));
        assert!(actions.iter().all(|a| !matches!(a, Action::Pulse { .. })));
        assert!(actions.contains(&Action::Led {
            color: Color::Red,
            time: Duration::from_secs(2)
        }));
    }
}
