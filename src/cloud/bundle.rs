//! The offline key-set file for `doorbridge keys import FILE` (a USB stick at a site with no
//! internet): one signed snapshot, as the cloud would publish it, in one file.
//!
//! On disk a bundle is one CBOR map:
//!
//! ```text
//! { "format": "doorbridge-keyset-v1", "manifest": bytes, "chunks": [bytes, …] }
//! ```
//!
//! `manifest` is the sealed manifest envelope and `chunks` the exact chunk bytes, in index
//! order. Nothing is checked here beyond the file's shape and size: the gateway runs the
//! manifest and chunks through the same path as messages from MQTT (envelope signature,
//! target, anti-rollback, chunk hashes), so a bundle is exactly as trustworthy as its
//! signature.

use std::io::Read;
use std::path::{Path, PathBuf};

use ciborium::Value;

use super::build::{MAJOR_ARRAY, MAJOR_BYTES, MAJOR_MAP, SignedSnapshot, write_head, write_text};
use super::payload::{MAX_CHUNK_BYTES, MAX_CHUNKS, MAX_ENVELOPE_BYTES};

/// The value of the `format` entry.
pub const FORMAT: &str = "doorbridge-keyset-v1";

/// The largest bundle file: a manifest envelope and the most chunks, with room for framing.
pub const MAX_BUNDLE_BYTES: u64 =
    MAX_ENVELOPE_BYTES as u64 + MAX_CHUNKS as u64 * (MAX_CHUNK_BYTES as u64 + 64);

/// Nesting the decoder accepts: the map, the chunk array, and the byte strings in it.
const RECURSION_LIMIT: usize = 4;

/// Why a file is not a bundle the gateway can import.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the file is {len} bytes, over the limit of {MAX_BUNDLE_BYTES} for a key-set bundle")]
    TooLarge { len: u64 },
    #[error("not a key-set bundle: {0}")]
    NotABundle(String),
    #[error("unknown bundle format {0:?}; this gateway reads {FORMAT:?}")]
    UnknownFormat(String),
    #[error("not a key-set bundle: {0} bytes after the bundle")]
    TrailingBytes(usize),
}

/// A signed snapshot in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The sealed manifest envelope.
    pub manifest: Vec<u8>,
    /// The exact chunk bytes, in index order.
    pub chunks: Vec<Vec<u8>>,
}

impl From<SignedSnapshot> for Bundle {
    fn from(s: SignedSnapshot) -> Self {
        Bundle {
            manifest: s.manifest,
            chunks: s.chunks,
        }
    }
}

impl Bundle {
    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let len = 64 + self.manifest.len() + self.chunks.iter().map(|c| c.len() + 9).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        write_head(&mut out, MAJOR_MAP, 3);
        write_text(&mut out, "format");
        write_text(&mut out, FORMAT);
        write_text(&mut out, "manifest");
        write_head(&mut out, MAJOR_BYTES, self.manifest.len() as u64);
        out.extend_from_slice(&self.manifest);
        write_text(&mut out, "chunks");
        write_head(&mut out, MAJOR_ARRAY, self.chunks.len() as u64);
        for chunk in &self.chunks {
            write_head(&mut out, MAJOR_BYTES, chunk.len() as u64);
            out.extend_from_slice(chunk);
        }
        out
    }

    /// Reads a bundle from its bytes: size, shape and format only (no signature checks).
    pub fn decode(bytes: &[u8]) -> Result<Bundle, BundleError> {
        if bytes.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                len: bytes.len() as u64,
            });
        }
        let not = |what: &str| BundleError::NotABundle(what.to_string());
        let mut rest = bytes;
        let value: Value =
            ciborium::de::from_reader_with_recursion_limit(&mut rest, RECURSION_LIMIT)
                .map_err(|e| BundleError::NotABundle(format!("not valid CBOR ({e})")))?;
        if !rest.is_empty() {
            return Err(BundleError::TrailingBytes(rest.len()));
        }
        let Value::Map(entries) = value else {
            return Err(not("not a CBOR map"));
        };
        let (mut format, mut manifest, mut chunks) = (None, None, None);
        for (k, v) in entries {
            let Value::Text(name) = k else {
                return Err(not("a key that is not text"));
            };
            let duplicate = match (name.as_str(), v) {
                ("format", Value::Text(t)) => format.replace(t).is_some(),
                ("manifest", Value::Bytes(b)) => manifest.replace(b).is_some(),
                ("chunks", Value::Array(a)) => chunks.replace(a).is_some(),
                ("format", _) => return Err(not("`format` is not text")),
                ("manifest", _) => return Err(not("`manifest` is not a byte string")),
                ("chunks", _) => return Err(not("`chunks` is not an array")),
                (other, _) => {
                    return Err(BundleError::NotABundle(format!("unknown entry {other:?}")));
                }
            };
            if duplicate {
                return Err(BundleError::NotABundle(format!("a second {name:?} entry")));
            }
        }
        let format = format.ok_or_else(|| not("no `format` entry"))?;
        if format != FORMAT {
            return Err(BundleError::UnknownFormat(format));
        }
        let manifest = manifest.ok_or_else(|| not("no `manifest` entry"))?;
        let chunks = chunks.ok_or_else(|| not("no `chunks` entry"))?;
        if manifest.len() > MAX_ENVELOPE_BYTES {
            return Err(BundleError::NotABundle(format!(
                "the manifest is {} bytes, over the limit of {MAX_ENVELOPE_BYTES}",
                manifest.len()
            )));
        }
        if chunks.len() > MAX_CHUNKS as usize {
            return Err(BundleError::NotABundle(format!(
                "{} chunks, over the limit of {MAX_CHUNKS}",
                chunks.len()
            )));
        }
        let chunks = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::Bytes(b) if b.len() <= MAX_CHUNK_BYTES => Ok(b),
                Value::Bytes(b) => Err(BundleError::NotABundle(format!(
                    "chunk {i} is {} bytes, over the limit of {MAX_CHUNK_BYTES}",
                    b.len()
                ))),
                _ => Err(BundleError::NotABundle(format!(
                    "chunk {i} is not a byte string"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Bundle { manifest, chunks })
    }

    /// Reads a bundle file, refusing one over [`MAX_BUNDLE_BYTES`] before reading it.
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let io = |source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len });
        }
        // The file may grow while it is read: never read more than the limit and one byte.
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.take(MAX_BUNDLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Bundle::decode(&bytes)
    }

    /// Writes the bundle to `path` (replacing a file there).
    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        std::fs::write(path, self.encode()).map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle {
            manifest: vec![0xa4, 1, 2, 3],
            chunks: vec![vec![1; 300], Vec::new(), vec![2; 24]],
        }
    }

    fn cbor(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(value, &mut out).unwrap();
        out
    }

    fn map(entries: Vec<(&str, Value)>) -> Vec<u8> {
        cbor(&Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Value::Text(k.into()), v))
                .collect(),
        ))
    }

    fn good_entries() -> Vec<(&'static str, Value)> {
        vec![
            ("format", Value::Text(FORMAT.into())),
            ("manifest", Value::Bytes(vec![1])),
            ("chunks", Value::Array(vec![Value::Bytes(vec![2])])),
        ]
    }

    fn not_a_bundle(bytes: &[u8], needle: &str) {
        match Bundle::decode(bytes) {
            Err(BundleError::NotABundle(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn round_trips_and_matches_ciborium() {
        let b = bundle();
        let bytes = b.encode();
        assert_eq!(Bundle::decode(&bytes).unwrap(), b);
        // The hand-written encoding is what a generic CBOR writer gives.
        assert_eq!(
            bytes,
            map(vec![
                ("format", Value::Text(FORMAT.into())),
                ("manifest", Value::Bytes(b.manifest.clone())),
                (
                    "chunks",
                    Value::Array(b.chunks.iter().cloned().map(Value::Bytes).collect())
                ),
            ])
        );
        // Entries in another order are fine.
        let mut entries = good_entries();
        entries.reverse();
        assert!(Bundle::decode(&map(entries)).is_ok());
    }

    #[test]
    fn a_file_round_trips_and_an_oversized_one_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.dbk");
        bundle().write(&path).unwrap();
        assert_eq!(Bundle::read(&path).unwrap(), bundle());
        let big = std::fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(MAX_BUNDLE_BYTES + 1).unwrap();
        let err = Bundle::read(&dir.path().join("big")).unwrap_err();
        assert!(matches!(err, BundleError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("over the limit"), "{err}");
        let err = Bundle::read(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn bad_inputs_are_refused_with_a_clear_reason() {
        not_a_bundle(b"", "not valid CBOR");
        not_a_bundle(b"{\"format\": 1}", "");
        not_a_bundle(&cbor(&Value::Array(vec![])), "not a CBOR map");
        let mut trailing = bundle().encode();
        trailing.push(0);
        assert!(matches!(
            Bundle::decode(&trailing),
            Err(BundleError::TrailingBytes(1))
        ));

        let mut e = good_entries();
        e[0].1 = Value::Text("doorbridge-keyset-v2".into());
        let err = Bundle::decode(&map(e)).unwrap_err();
        assert!(matches!(err, BundleError::UnknownFormat(_)));
        assert!(err.to_string().contains("doorbridge-keyset-v2"), "{err}");

        let mut e = good_entries();
        e.remove(1);
        not_a_bundle(&map(e), "no `manifest`");
        let mut e = good_entries();
        e.push(("extra", Value::Null));
        not_a_bundle(&map(e), "unknown entry \"extra\"");
        let mut e = good_entries();
        e.push(("format", Value::Text(FORMAT.into())));
        not_a_bundle(&map(e), "a second \"format\"");
        let mut e = good_entries();
        e[1].1 = Value::Text("x".into());
        not_a_bundle(&map(e), "`manifest` is not a byte string");
        let mut e = good_entries();
        e[2].1 = Value::Array(vec![Value::Bytes(vec![]), Value::Integer(3.into())]);
        not_a_bundle(&map(e), "chunk 1 is not a byte string");
        let mut e = good_entries();
        e[2].1 = Value::Array(vec![Value::Bytes(vec![0; MAX_CHUNK_BYTES + 1])]);
        not_a_bundle(&map(e), "chunk 0 is");
        let mut e = good_entries();
        e[2].1 = Value::Array(vec![Value::Bytes(vec![]); MAX_CHUNKS as usize + 1]);
        not_a_bundle(&map(e), "chunks, over the limit");
        // Deep nesting stops at the recursion limit rather than exhausting the stack.
        let mut deep = vec![0x81; 100_000];
        deep.push(0);
        not_a_bundle(&deep, "not valid CBOR");
    }
}
