//! Bounded CBOR decoding: the one way bytes from outside (a door unit's message, a cloud
//! payload or envelope, a bundle file, a database row) become values. ciborium alone takes
//! any length, nests without limit and ignores what follows the first item; this caps the
//! length first, limits the nesting, and refuses leftover bytes. Each boundary turns
//! [`CborError`] into its own typed error. [`write_head`] and [`write_text`] write CBOR heads by
//! hand, for the chunk headers and bundle files whose sizes are counted before they are written.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    #[error("{len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// Not CBOR, nested too deep, or not of the expected shape (ciborium's words).
    #[error("{0}")]
    Invalid(String),
    #[error("{0} bytes after the CBOR item")]
    TrailingBytes(usize),
}

/// Decodes exactly one CBOR item of at most `max_len` bytes, nested at most `depth` deep.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    max_len: usize,
    depth: usize,
) -> Result<T, CborError> {
    if bytes.len() > max_len {
        return Err(CborError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    let mut rest = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut rest, depth)
        .map_err(|e| CborError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Encodes our own plain data (into a `Vec`, which cannot fail).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Serialising plain data into a Vec cannot fail.
    let _ = ciborium::ser::into_writer(value, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Writing CBOR heads by hand: the chunk headers and bundle files, laid out byte by byte so
// their sizes are known before the body is written.
// ---------------------------------------------------------------------------------------------

/// CBOR major types used by the hand-written headers.
pub const MAJOR_UINT: u8 = 0;
pub const MAJOR_BYTES: u8 = 2;
pub const MAJOR_TEXT: u8 = 3;
pub const MAJOR_ARRAY: u8 = 4;
pub const MAJOR_MAP: u8 = 5;

/// Appends a CBOR head (major type and argument) in its shortest form.
pub fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    // Each arm checks the range, so the casts below cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 0x18, n as u8]),
        0x100..=0xffff => {
            out.push(m | 0x19);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 0x1a);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 0x1b);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// The length of the head [`write_head`] writes for `n`.
pub fn head_len(n: u64) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Appends a text string (its head, then its bytes).
pub fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, MAJOR_TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_item_within_the_bounds_decodes_and_anything_else_is_named() {
        let bytes = encode(&vec![1u32, 2, 3]);
        assert_eq!(decode::<Vec<u32>>(&bytes, 16, 4), Ok(vec![1, 2, 3]));
        assert_eq!(
            decode::<Vec<u32>>(&bytes, 3, 4),
            Err(CborError::TooLarge { len: 4, max: 3 })
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            decode::<Vec<u32>>(&trailing, 16, 4),
            Err(CborError::TrailingBytes(1))
        );
        // [[[[1]]]]: four levels within a limit of four, refused at three.
        let deep = [0x81, 0x81, 0x81, 0x81, 0x01];
        assert!(decode::<ciborium::Value>(&deep, 16, 4).is_ok());
        assert!(matches!(
            decode::<ciborium::Value>(&deep, 16, 3),
            Err(CborError::Invalid(_))
        ));
        assert!(matches!(
            decode::<u32>(&[0xff], 16, 4),
            Err(CborError::Invalid(_))
        ));
    }
}
