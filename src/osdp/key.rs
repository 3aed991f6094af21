//! A reader's secure channel base key (SCBK) on disk: 32 hex digits and a newline, in a file
//! of mode 0600 that only the service user reads. Never printed; logs name a key by the first
//! eight hex digits of its SHA-256 ([`fingerprint`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::access::credential::to_hex;
use thiserror::Error;

/// A secure channel base key.
pub type Scbk = [u8; 16];

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable or writable by others (mode {mode:o}): run chmod 600 on it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "{path} does not hold a key: expected 32 hex digits (16 bytes), as `doorbridge osdp install` writes"
    )]
    Malformed { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads a key file, refusing one that others may read.
pub fn read(path: &Path) -> Result<Scbk, KeyFileError> {
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(text.trim()).ok_or_else(|| KeyFileError::Malformed {
        path: path.to_path_buf(),
    })
}

/// 32 hex digits as a key.
pub fn parse(hex: &str) -> Option<Scbk> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// Writes a new key file (mode 0600, synced); refuses to replace an existing one.
pub fn write_new(path: &Path, key: &Scbk) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(format!("{}\n", to_hex(key)).as_bytes())
        .map_err(err)?;
    file.sync_all().map_err(err)
}

/// A key's name for logs and messages: the first 8 hex digits of its SHA-256.
pub fn fingerprint(key: &Scbk) -> String {
    to_hex(&Sha256::digest(key)[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_key_reads_back_and_an_exposed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reader.key");
        let key = [7u8; 16];
        write_new(&path, &key).unwrap();
        assert_eq!(read(&path).unwrap(), key);
        assert!(matches!(
            write_new(&path, &key),
            Err(KeyFileError::Write { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn only_32_hex_digits_are_a_key() {
        assert_eq!(parse("000102030405060708090a0b0c0d0e0f").unwrap()[15], 15);
        assert!(parse("0001").is_none());
        assert!(parse("zz0102030405060708090a0b0c0d0e0f").is_none());
    }
}
