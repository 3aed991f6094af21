//! Credential digests: how a PIN, QR token, mobile key or card is turned into the value the key set
//! stores and the store indexes. The clear value never reaches the disk. A card's value is
//! its bits in a fixed layout ([`card_value`]), written `BITS:HEX` by people ([`parse_card`]).

use sha2::{Digest, Sha256};

use super::model::{CredentialDigest, CredentialKind};

/// SHA-256 over the site salt, a domain tag, the kind code and the value.
///
/// The cloud computes the same digest when it builds a key set, so both sides must agree on
/// this exact layout: `"doorbridge-cred-v1" || len(salt) as u32 BE || salt || kind || value`.
/// The salt's length is framed so that no two (salt, value) pairs hash alike.
pub fn digest(salt: &[u8], kind: CredentialKind, value: &[u8]) -> CredentialDigest {
    let mut h = Sha256::new();
    h.update(b"doorbridge-cred-v1");
    h.update(u32::try_from(salt.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(salt);
    h.update([kind.code()]);
    h.update(value);
    CredentialDigest(h.finalize().into())
}

/// Lowercase hex digits of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The most card bits an OSDP card read carries (libosdp: 64 bytes of data).
pub const MAX_CARD_BITS: usize = 512;

/// Why card data is not a card credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("card read with no bits")]
    Empty,
    #[error("card read of {bits} bits, more than the {MAX_CARD_BITS} OSDP carries")]
    TooLong { bits: usize },
    #[error("card read says {bits} bits but carries {bytes} bytes")]
    Truncated { bits: usize, bytes: usize },
}

/// The credential bytes of a card: the bit count as two bytes (big-endian), then the bits,
/// most significant first, in whole bytes with the unused low bits of the last byte cleared.
/// The cloud digests the same bytes (`docs/osdp.md`; `docs/keys-file.md` writes them as
/// `"26:0a1b2c40"`).
pub fn card_value(bits: usize, data: &[u8]) -> Result<Vec<u8>, CardError> {
    if bits == 0 {
        return Err(CardError::Empty);
    }
    if bits > MAX_CARD_BITS {
        return Err(CardError::TooLong { bits });
    }
    let bytes = bits.div_ceil(8);
    if data.len() < bytes {
        return Err(CardError::Truncated {
            bits,
            bytes: data.len(),
        });
    }
    let mut out = Vec::with_capacity(2 + bytes);
    out.extend_from_slice(&u16::try_from(bits).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&data[..bytes]);
    let spare = bytes * 8 - bits;
    if let Some(last) = out.last_mut() {
        *last &= 0xFFu8 << spare;
    }
    Ok(out)
}

/// Parses a card as installers and the keys file write it: `BITS:HEX`, e.g. `26:0a1b2c40`
/// (the bits most significant first, padded with zero bits to whole bytes).
pub fn parse_card(text: &str) -> Result<Vec<u8>, String> {
    let (bits, hex) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not a card: write it as BITS:HEX, e.g. 26:0a1b2c40"))?;
    let bits: usize = bits
        .trim()
        .parse()
        .map_err(|_| format!("`{bits}` is not a bit count"))?;
    let hex = hex.trim();
    if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{hex}` is not hex bytes"));
    }
    let data: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_default())
        .collect();
    if data.len() != bits.div_ceil(8) {
        return Err(format!(
            "{bits} bits take {} bytes ({} hex digits), not {}",
            bits.div_ceil(8),
            bits.div_ceil(8) * 2,
            data.len()
        ));
    }
    let value = card_value(bits, &data).map_err(|e| e.to_string())?;
    if value[2..] != data[..] {
        return Err(format!(
            "the {} bits after the {bits} card bits must be zero",
            data.len() * 8 - bits
        ));
    }
    Ok(value)
}

/// Formats card credential bytes ([`card_value`]) back as `BITS:HEX`.
pub fn format_card(value: &[u8]) -> String {
    let bits = value
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    format!("{bits}:{}", to_hex(value.get(2..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_salt_separate_equal_values() {
        let pin = digest(b"site-a", CredentialKind::Pin, b"123456");
        assert_ne!(pin, digest(b"site-a", CredentialKind::Qr, b"123456"));
        assert_ne!(pin, digest(b"site-b", CredentialKind::Pin, b"123456"));
        assert_eq!(pin, digest(b"site-a", CredentialKind::Pin, b"123456"));
    }

    #[test]
    fn salt_boundary_is_framed() {
        // Without the length prefix, ("ab","c") and ("a","bc") would hash alike for one kind.
        assert_ne!(
            digest(b"ab", CredentialKind::Pin, b"c"),
            digest(b"a", CredentialKind::Pin, b"bc")
        );
    }

    #[test]
    fn test_vector_is_stable() {
        // The cloud implements the same layout; these vectors are in docs/access-rules.md
        // (and the card's in docs/osdp.md).
        let d = digest(b"example-salt", CredentialKind::Pin, b"482916");
        assert_eq!(
            to_hex(&d.0),
            "52355a49af8f876e5c7c82271bae2fac7c41599d828dc889a21779784549c97a"
        );
        let card = parse_card("26:0a1b2c40").unwrap();
        let d = digest(b"example-salt", CredentialKind::Card, &card);
        assert_eq!(
            to_hex(&d.0),
            "a986d0be3e9aaf1d83279dcf716130cd5891e00be5d036c3197c907f94e9ea1e"
        );
    }

    #[test]
    fn a_wiegand_26_card_keeps_its_bits_and_clears_the_spare_ones() {
        let value = card_value(26, &[0x0a, 0x1b, 0x2c, 0x7f]).unwrap();
        assert_eq!(value, vec![0, 26, 0x0a, 0x1b, 0x2c, 0x40]);
        assert_eq!(format_card(&value), "26:0a1b2c40");
        assert_eq!(parse_card("26:0a1b2c40").unwrap(), value);
        assert_eq!(parse_card(" 26 : 0A1B2C40 ").unwrap(), value);
    }

    #[test]
    fn bad_card_texts_say_what_is_wrong() {
        for (text, says) in [
            ("0a1b2c40", "BITS:HEX"),
            ("x:00", "bit count"),
            ("26:0a1b2c", "4 bytes"),
            ("26:0a1b2c41", "must be zero"),
            ("8:zz", "hex"),
            ("0:", "no bits"),
            ("600:00", "75 bytes"),
        ] {
            let e = parse_card(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
