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

use super::payload::{MAX_CHUNK_BYTES, MAX_CHUNKS, MAX_ENVELOPE_BYTES};

use crate::cbor::{
    CborError, MAJOR_ARRAY, MAJOR_BYTES, MAJOR_MAP, MAJOR_TEXT, write_head, write_text,
};

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
        // Its size was checked just above.
        let value: Value =
            crate::cbor::decode(bytes, usize::MAX, RECURSION_LIMIT).map_err(|e| match e {
                CborError::TrailingBytes(n) => BundleError::TrailingBytes(n),
                CborError::Invalid(e) => BundleError::NotABundle(format!("not valid CBOR ({e})")),
                CborError::TooLarge { len, .. } => BundleError::TooLarge { len: len as u64 },
            })?;
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

/// A bundle file read as a stream: the manifest at once, then the chunks one at a time, so
/// importing a million-key set holds one chunk in memory, not the whole file.
///
/// The entries must come in the order [`Bundle::encode`] writes them (`format`, `manifest`,
/// then `chunks`), definite lengths only; anything else is refused with a clear error.
#[derive(Debug)]
pub struct BundleStream<R> {
    reader: R,
    /// The manifest envelope.
    pub manifest: Vec<u8>,
    /// How many chunks the file announces.
    pub chunk_count: u32,
    next: u32,
    /// Bytes read so far (bounded by [`MAX_BUNDLE_BYTES`]).
    read: u64,
    /// The file, for error messages (empty when reading from elsewhere).
    path: PathBuf,
}

impl BundleStream<std::io::BufReader<std::fs::File>> {
    /// Opens a bundle file and reads its head and manifest.
    pub fn open(path: &Path) -> Result<Self, BundleError> {
        let io = |source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len });
        }
        let mut stream = BundleStream::new(std::io::BufReader::new(file)).map_err(|e| match e {
            BundleError::Io { source, .. } => io(source),
            other => other,
        })?;
        stream.path = path.to_path_buf();
        Ok(stream)
    }
}

impl<R: Read> BundleStream<R> {
    /// Reads the head and the manifest from `reader`.
    pub fn new(reader: R) -> Result<Self, BundleError> {
        let mut s = BundleStream {
            reader,
            manifest: Vec::new(),
            chunk_count: 0,
            next: 0,
            read: 0,
            path: PathBuf::new(),
        };
        let not = |what: &str| BundleError::NotABundle(what.to_string());
        if s.head(MAJOR_MAP)? != 3 {
            return Err(not("not a map of format, manifest and chunks"));
        }
        if s.text(16)? != "format" {
            return Err(not("the first entry is not `format`"));
        }
        let format = s.text(64)?;
        if format != FORMAT {
            return Err(BundleError::UnknownFormat(format));
        }
        if s.text(16)? != "manifest" {
            return Err(not("the second entry is not `manifest`"));
        }
        s.manifest = s.bytes(MAX_ENVELOPE_BYTES, "the manifest")?;
        if s.text(16)? != "chunks" {
            return Err(not("the third entry is not `chunks`"));
        }
        let count = s.head(MAJOR_ARRAY)?;
        s.chunk_count = u32::try_from(count)
            .ok()
            .filter(|&c| c <= MAX_CHUNKS)
            .ok_or_else(|| {
                BundleError::NotABundle(format!("{count} chunks, over the limit of {MAX_CHUNKS}"))
            })?;
        Ok(s)
    }

    /// The next chunk, `None` after the last (when the file must end too).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, BundleError> {
        if self.next == self.chunk_count {
            let mut probe = [0u8; 1];
            return match self.reader.read(&mut probe) {
                Ok(0) => Ok(None),
                Ok(_) => Err(BundleError::TrailingBytes(1)),
                Err(source) => Err(self.io(source)),
            };
        }
        let i = self.next;
        self.next += 1;
        self.bytes(MAX_CHUNK_BYTES, &format!("chunk {i}")).map(Some)
    }

    fn io(&self, source: std::io::Error) -> BundleError {
        BundleError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), BundleError> {
        self.read += buf.len() as u64;
        if self.read > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len: self.read });
        }
        self.reader.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                BundleError::NotABundle("the file ends early (truncated?)".into())
            } else {
                self.io(e)
            }
        })
    }

    /// A CBOR head of `major` type with a definite length; returns the length.
    fn head(&mut self, major: u8) -> Result<u64, BundleError> {
        let mut first = [0u8; 1];
        self.fill(&mut first)?;
        if first[0] >> 5 != major {
            return Err(BundleError::NotABundle(format!(
                "unexpected CBOR item (initial byte {:#04x})",
                first[0]
            )));
        }
        let width = match first[0] & 0x1f {
            info @ 0..24 => return Ok(u64::from(info)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => {
                return Err(BundleError::NotABundle(
                    "indefinite or reserved CBOR length".into(),
                ));
            }
        };
        let mut buf = [0u8; 8];
        self.fill(&mut buf[8 - width..])?;
        Ok(u64::from_be_bytes(buf))
    }

    fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>, BundleError> {
        let len = self.head(MAJOR_BYTES)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| {
                BundleError::NotABundle(format!("{what} is {len} bytes, over the limit of {max}"))
            })?;
        let mut out = vec![0; len];
        self.fill(&mut out)?;
        Ok(out)
    }

    fn text(&mut self, max: usize) -> Result<String, BundleError> {
        let len = self.head(MAJOR_TEXT)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| BundleError::NotABundle("an overlong text entry".into()))?;
        let mut out = vec![0; len];
        self.fill(&mut out)?;
        String::from_utf8(out).map_err(|_| BundleError::NotABundle("text that is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_reads_what_encode_writes_one_chunk_at_a_time() {
        let b = bundle();
        let bytes = b.encode();
        let mut s = BundleStream::new(bytes.as_slice()).unwrap();
        assert_eq!(s.manifest, b.manifest);
        assert_eq!(s.chunk_count, 3);
        let mut chunks = Vec::new();
        while let Some(c) = s.next_chunk().unwrap() {
            chunks.push(c);
        }
        assert_eq!(chunks, b.chunks);
    }

    #[test]
    fn a_stream_refuses_truncated_reordered_and_trailing_input() {
        let bytes = bundle().encode();
        // Truncated anywhere: a clear error, never a panic.
        for cut in 0..bytes.len() {
            let r = BundleStream::new(&bytes[..cut]).and_then(|mut s| {
                while s.next_chunk()?.is_some() {}
                Ok(())
            });
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        let mut s = BundleStream::new(trailing.as_slice()).unwrap();
        let r = (|| {
            while s.next_chunk()?.is_some() {}
            Ok::<_, BundleError>(())
        })();
        assert!(matches!(r, Err(BundleError::TrailingBytes(_))), "{r:?}");
        // A map whose entries are in another order is refused by the stream (decode takes it).
        let mut other = Vec::new();
        write_head(&mut other, MAJOR_MAP, 3);
        write_text(&mut other, "manifest");
        write_head(&mut other, MAJOR_BYTES, 1);
        other.push(0xa4);
        write_text(&mut other, "format");
        write_text(&mut other, FORMAT);
        write_text(&mut other, "chunks");
        write_head(&mut other, MAJOR_ARRAY, 0);
        assert!(BundleStream::new(other.as_slice()).is_err());
        assert!(Bundle::decode(&other).is_ok());
    }

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
