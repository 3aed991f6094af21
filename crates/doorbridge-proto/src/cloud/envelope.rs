//! The signed envelope every signed cloud message travels in (see `docs/cloud-protocol.md`).
//!
//! On the wire an envelope is a CBOR map of exactly four entries:
//!
//! ```text
//! { "kind": text, "kid": bytes(8), "sig": bytes(64), "body": bytes }
//! ```
//!
//! The signature is Ed25519 over [`signing_input`]: `"doorbridge-v1:" ‖ kind ‖ ":" ‖ body`,
//! the body being the exact bytes received. The kind is part of what is signed, so a signature
//! made for a manifest cannot be presented as an open-door command. `kid` is the first eight
//! bytes of the SHA-256 of the signer's 32-byte public key; it only picks which trusted key to
//! try, it is never trusted by itself.

// `kind` and `kid` are the wire names.
#![allow(clippy::similar_names)]

use std::fmt;

use ciborium::Value;
use ed25519_dalek::{Signature, VerifyingKey};
#[cfg(any(test, feature = "sign"))]
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::cbor::CborError;

/// The domain-separation prefix of every signing input.
pub const DOMAIN: &[u8] = b"doorbridge-v1:";

/// Nesting depth the envelope decoder accepts (the envelope itself is one flat map).
const RECURSION_LIMIT: usize = 4;

/// The kinds of signed message. Chunks are not signed: they are bound by their hash in a
/// signed manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A snapshot manifest ([`super::payload::Manifest`]).
    Manifest,
    /// An incremental change to the held key set ([`super::payload::Delta`]).
    Delta,
    /// The cloud vouches for the held version as of now ([`super::payload::Heartbeat`]).
    Heartbeat,
    /// A remote open-door command ([`super::payload::OpenDoor`]).
    OpenDoor,
    /// The cloud asks the gateway to report its held version and take a snapshot
    /// ([`super::payload::ResyncCommand`]).
    Resync,
    /// Settings for a door unit ([`super::payload::UnitSettings`]).
    UnitSettings,
    /// The root key delegates doors to another key ([`super::payload::Delegation`]).
    Delegation,
    /// The root key withdraws a delegation ([`super::payload::DelegationRevoke`]).
    DelegationRevoke,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Manifest,
        Kind::Delta,
        Kind::Heartbeat,
        Kind::OpenDoor,
        Kind::Resync,
        Kind::UnitSettings,
        Kind::Delegation,
        Kind::DelegationRevoke,
    ];

    /// The kind's name on the wire and in the signing input.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Delta => "delta",
            Kind::Heartbeat => "heartbeat",
            Kind::OpenDoor => "open-door",
            Kind::Resync => "resync",
            Kind::UnitSettings => "unit-settings",
            Kind::Delegation => "delegation",
            Kind::DelegationRevoke => "delegation-revoke",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing key's id (an envelope's `kid`): the first eight bytes of SHA-256 over the 32-byte
/// Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignerId(pub [u8; 8]);

impl SignerId {
    pub fn of(key: &VerifyingKey) -> SignerId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        SignerId(id)
    }
}

impl fmt::Debug for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignerId({self})")
    }
}

impl fmt::Display for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why an envelope was refused. Every variant leaves the held key set untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("envelope is not valid CBOR: {0}")]
    Cbor(String),
    #[error("{0} bytes after the envelope")]
    TrailingBytes(usize),
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    #[error("unknown message kind {0:?}")]
    UnknownKind(String),
    #[error("signed by key {0}, which is not trusted")]
    UnknownKey(SignerId),
    #[error("signature does not verify")]
    BadSignature,
}

/// A verified envelope: what it is, who signed it, and the exact body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub kind: Kind,
    pub kid: SignerId,
    pub body: Vec<u8>,
}

/// The bytes an Ed25519 signature covers: `"doorbridge-v1:" ‖ kind ‖ ":" ‖ body`.
pub fn signing_input(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(DOMAIN.len() + kind.as_str().len() + 1 + body.len());
    input.extend_from_slice(DOMAIN);
    input.extend_from_slice(kind.as_str().as_bytes());
    input.push(b':');
    input.extend_from_slice(body);
    input
}

/// Signs `body` as a message of `kind` and wraps it in an envelope (the cloud's side: built for
/// tests and with the `sign` feature, for the reference cloud in doorbridge-sim).
#[cfg(any(test, feature = "sign"))]
pub fn seal(kind: Kind, body: &[u8], key: &SigningKey) -> Vec<u8> {
    let sig = key.sign(&signing_input(kind, body));
    let kid = SignerId::of(&key.verifying_key());
    encode(kind.as_str(), kid, &sig.to_bytes(), body)
}

/// Encodes an envelope from its parts, without signing (for building test cases).
pub fn encode(kind: &str, kid: SignerId, sig: &[u8], body: &[u8]) -> Vec<u8> {
    let map = Value::Map(vec![
        (Value::Text("kind".into()), Value::Text(kind.into())),
        (Value::Text("kid".into()), Value::Bytes(kid.0.to_vec())),
        (Value::Text("sig".into()), Value::Bytes(sig.to_vec())),
        (Value::Text("body".into()), Value::Bytes(body.to_vec())),
    ]);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = ciborium::ser::into_writer(&map, &mut out);
    out
}

/// Checks an envelope: size first, then CBOR shape, then the signature with
/// [`VerifyingKey::verify_strict`] against the trusted key whose id the envelope names.
pub fn open(
    bytes: &[u8],
    trusted: &[VerifyingKey],
    max_len: usize,
) -> Result<Opened, EnvelopeError> {
    if bytes.len() > max_len {
        return Err(EnvelopeError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    // Its size was checked just above.
    let value: Value =
        crate::cbor::decode(bytes, usize::MAX, RECURSION_LIMIT).map_err(|e| match e {
            CborError::TooLarge { len, max } => EnvelopeError::TooLarge { len, max },
            CborError::Invalid(e) => EnvelopeError::Cbor(e),
            CborError::TrailingBytes(n) => EnvelopeError::TrailingBytes(n),
        })?;
    let Value::Map(entries) = value else {
        return Err(EnvelopeError::Malformed("not a map"));
    };
    if entries.len() != 4 {
        return Err(EnvelopeError::Malformed(
            "the map must hold exactly kind, kid, sig and body",
        ));
    }
    let (mut kind, mut kid, mut sig, mut body) = (None, None, None, None);
    for (k, v) in entries {
        let Value::Text(name) = k else {
            return Err(EnvelopeError::Malformed("a key that is not text"));
        };
        let slot = match (name.as_str(), v) {
            ("kind", Value::Text(t)) => kind.replace(t).is_some(),
            ("kid", Value::Bytes(b)) => kid.replace(b).is_some(),
            ("sig", Value::Bytes(b)) => sig.replace(b).is_some(),
            ("body", Value::Bytes(b)) => body.replace(b).is_some(),
            ("kind" | "kid" | "sig" | "body", _) => {
                return Err(EnvelopeError::Malformed("an entry of the wrong type"));
            }
            _ => return Err(EnvelopeError::Malformed("an unknown entry")),
        };
        if slot {
            return Err(EnvelopeError::Malformed("a duplicate entry"));
        }
    }
    let (Some(kind), Some(kid), Some(sig), Some(body)) = (kind, kid, sig, body) else {
        return Err(EnvelopeError::Malformed("a missing entry"));
    };
    let kind = Kind::parse(&kind).ok_or(EnvelopeError::UnknownKind(kind))?;
    let kid = SignerId(
        kid.try_into()
            .map_err(|_| EnvelopeError::Malformed("kid is not 8 bytes"))?,
    );
    let sig: [u8; 64] = sig
        .try_into()
        .map_err(|_| EnvelopeError::Malformed("sig is not 64 bytes"))?;
    let sig = Signature::from_bytes(&sig);
    let input = signing_input(kind, &body);
    // Two trusted keys could share a kid prefix; try each that matches.
    let mut candidates = trusted.iter().filter(|k| SignerId::of(k) == kid).peekable();
    if candidates.peek().is_none() {
        return Err(EnvelopeError::UnknownKey(kid));
    }
    if candidates.any(|k| k.verify_strict(&input, &sig).is_ok()) {
        Ok(Opened { kind, kid, body })
    } else {
        Err(EnvelopeError::BadSignature)
    }
}
