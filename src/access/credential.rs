//! Credential digests: how a PIN, QR token or mobile key is turned into the value the key set
//! stores and the store indexes. The clear value never reaches the disk.

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
        // The cloud implements the same layout; this vector is in docs/keys.md.
        let d = digest(b"example-salt", CredentialKind::Pin, b"482916");
        let hex: String =
            d.0.iter()
                .fold(String::new(), |s, b| s + &format!("{b:02x}"));
        assert_eq!(
            hex,
            "52355a49af8f876e5c7c82271bae2fac7c41599d828dc889a21779784549c97a"
        );
    }
}
