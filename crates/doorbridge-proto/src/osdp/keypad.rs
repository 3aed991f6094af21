//! The keypad: assembles the keys an OSDP reader reports (`osdp_KEYPAD`) into PINs.
//!
//! Pure: no I/O; the time is passed in. A PIN ends with `#` (0x0D), with the configured digit
//! count, or when no key has come for the inter-key timeout; `*` (0x7F) clears what was typed.
//! A digit string left unfinished when the timeout passes is submitted only if the reader has
//! no end key (`#` disabled): otherwise it is dropped, so a visitor who walks away half-way
//! does not cost a lockout step.

use std::time::Duration;

/// What ends a PIN on a keypad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeypadRules {
    /// A PIN of this many digits is complete without `#`; `None`: only `#` or the timeout.
    pub digits: Option<u8>,
    /// The longest pause between two keys; the typed digits are then submitted (no `#` needed)
    /// when `submit_on_timeout`, or dropped.
    pub timeout: Duration,
    /// Whether digits that stop coming are submitted as a PIN after `timeout`.
    pub submit_on_timeout: bool,
}

impl Default for KeypadRules {
    fn default() -> Self {
        KeypadRules {
            digits: None,
            timeout: Duration::from_secs(5),
            submit_on_timeout: false,
        }
    }
}

/// The longest PIN kept; more digits than this are a mistake, not a PIN.
pub const MAX_DIGITS: usize = 16;

/// The OSDP key codes for `#` (enter) and `*` (clear).
pub const KEY_ENTER: u8 = 0x0D;
pub const KEY_CLEAR: u8 = 0x7F;

/// What a key (or the timeout) did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeypadEvent {
    /// A complete PIN: decide it.
    Pin(Vec<u8>),
    /// The typed digits were cleared with `*`, dropped after the timeout, or overflowed.
    Cleared(ClearedBy),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClearedBy {
    ClearKey,
    Timeout,
    TooLong,
    /// `#` with nothing typed, or a key that is neither a digit, `#` nor `*`.
    Stray,
}

/// One reader's keypad state.
#[derive(Clone, Debug, Default)]
pub struct Keypad {
    rules: KeypadRules,
    typed: Vec<u8>,
    /// When the last key came, in the caller's time base.
    last_key: Option<Duration>,
}

impl Keypad {
    pub fn new(rules: KeypadRules) -> Self {
        Keypad {
            rules,
            typed: Vec::with_capacity(MAX_DIGITS),
            last_key: None,
        }
    }

    /// Feeds the keys of one `osdp_KEYPAD` reply, received at `now`.
    pub fn keys(&mut self, keys: &[u8], now: Duration) -> Vec<KeypadEvent> {
        let mut out = Vec::new();
        // A pause longer than the timeout ends what was typed before these keys.
        out.extend(self.on_timeout(now));
        for &key in keys {
            self.last_key = Some(now);
            match key {
                b'0'..=b'9' => {
                    if self.typed.len() == MAX_DIGITS {
                        self.typed.clear();
                        out.push(KeypadEvent::Cleared(ClearedBy::TooLong));
                        continue;
                    }
                    self.typed.push(key);
                    if self
                        .rules
                        .digits
                        .is_some_and(|n| self.typed.len() == usize::from(n))
                    {
                        out.push(KeypadEvent::Pin(std::mem::take(&mut self.typed)));
                    }
                }
                KEY_ENTER if !self.typed.is_empty() => {
                    out.push(KeypadEvent::Pin(std::mem::take(&mut self.typed)));
                }
                KEY_CLEAR => {
                    self.typed.clear();
                    out.push(KeypadEvent::Cleared(ClearedBy::ClearKey));
                }
                _ => {
                    // `#` alone, or a function key: nothing to decide; what was typed stays.
                    out.push(KeypadEvent::Cleared(ClearedBy::Stray));
                }
            }
        }
        if self.typed.is_empty() {
            self.last_key = None;
        }
        out
    }

    /// When [`Keypad::on_timeout`] has something to do, if digits are waiting.
    pub fn deadline(&self) -> Option<Duration> {
        if self.typed.is_empty() {
            return None;
        }
        self.last_key.map(|t| t + self.rules.timeout)
    }

    /// Ends digits that stopped coming: a PIN when the rules say so, else dropped.
    pub fn on_timeout(&mut self, now: Duration) -> Option<KeypadEvent> {
        let due = self.deadline().is_some_and(|d| now >= d);
        if !due {
            return None;
        }
        self.last_key = None;
        let typed = std::mem::take(&mut self.typed);
        Some(if self.rules.submit_on_timeout {
            KeypadEvent::Pin(typed)
        } else {
            KeypadEvent::Cleared(ClearedBy::Timeout)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn pin(s: &str) -> KeypadEvent {
        KeypadEvent::Pin(s.as_bytes().to_vec())
    }

    #[test]
    fn enter_ends_a_pin_and_keys_may_come_one_reply_at_a_time() {
        let mut k = Keypad::new(KeypadRules::default());
        assert!(k.keys(b"48", S).is_empty());
        assert!(k.keys(b"29", 2 * S).is_empty());
        assert_eq!(k.keys(&[b'1', b'6', KEY_ENTER], 3 * S), vec![pin("482916")]);
        assert_eq!(k.deadline(), None);
    }

    #[test]
    fn clear_forgets_the_digits_before_it() {
        let mut k = Keypad::new(KeypadRules::default());
        let events = k.keys(&[b'9', b'9', KEY_CLEAR, b'1', b'2', KEY_ENTER], S);
        assert_eq!(
            events,
            vec![KeypadEvent::Cleared(ClearedBy::ClearKey), pin("12")]
        );
    }

    #[test]
    fn a_digit_count_ends_a_pin_without_enter() {
        let mut k = Keypad::new(KeypadRules {
            digits: Some(4),
            ..KeypadRules::default()
        });
        assert_eq!(k.keys(b"123456", S), vec![pin("1234")]);
        assert_eq!(k.keys(b"78", S), vec![pin("5678")]);
    }

    #[test]
    fn digits_that_stop_coming_are_dropped_or_submitted_as_configured() {
        let mut k = Keypad::new(KeypadRules::default());
        k.keys(b"123", S);
        assert_eq!(k.deadline(), Some(6 * S));
        assert_eq!(k.on_timeout(5 * S), None);
        assert_eq!(
            k.on_timeout(6 * S),
            Some(KeypadEvent::Cleared(ClearedBy::Timeout))
        );
        assert_eq!(k.deadline(), None);

        let mut k = Keypad::new(KeypadRules {
            submit_on_timeout: true,
            ..KeypadRules::default()
        });
        k.keys(b"123", S);
        assert_eq!(k.on_timeout(6 * S), Some(pin("123")));
    }

    #[test]
    fn a_late_key_first_ends_what_was_typed_before_the_pause() {
        let mut k = Keypad::new(KeypadRules::default());
        k.keys(b"55", S);
        let events = k.keys(&[b'1', KEY_ENTER], 10 * S);
        assert_eq!(
            events,
            vec![KeypadEvent::Cleared(ClearedBy::Timeout), pin("1")]
        );
    }

    #[test]
    fn stray_keys_and_overlong_input_are_not_pins() {
        let mut k = Keypad::new(KeypadRules::default());
        assert_eq!(
            k.keys(&[KEY_ENTER], S),
            vec![KeypadEvent::Cleared(ClearedBy::Stray)]
        );
        let long = [b'1'; MAX_DIGITS + 1];
        assert_eq!(
            k.keys(&long, S),
            vec![KeypadEvent::Cleared(ClearedBy::TooLong)]
        );
        // Nothing of the overlong input is kept.
        assert_eq!(
            k.keys(&[KEY_ENTER], S),
            vec![KeypadEvent::Cleared(ClearedBy::Stray)]
        );
    }
}
