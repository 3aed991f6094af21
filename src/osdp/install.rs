//! `doorbridge osdp install`: gives a new reader its own secure channel key.
//!
//! A reader fresh from the factory (or reset) in *install mode* accepts one secure channel
//! session with the well-known default key SCBK-D. libosdp's CP, given the new random key and
//! not `EnforceSecure`, tries that key, falls back to SCBK-D, sends the key over that session
//! (`osdp_KEYSET`) and sets up the secure channel again with it: a secure channel that comes
//! up is one with the new key (libosdp does not count an SCBK-D session as secure). The
//! gateway then proves it: a second session, with the new key and `EnforceSecure`, must come
//! up. Only then is the key file in place.
//!
//! The key is written first, to `KEYFILE.new` (mode 0600, synced), before the reader is given
//! it: a reader that took the key while the gateway lost power is not lost, the key is in that
//! file. The service must be stopped (a serial port opens exclusively).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::mpsc;

use super::cp::{self, CpEvent, LineSpec, PdSpec};
use super::key::{self, KeyFileError, Scbk};
use crate::drivers::bus::Rs485;

/// What to provision.
#[derive(Clone, Debug)]
pub struct InstallRequest {
    pub bus: String,
    pub port: PathBuf,
    pub baud: u32,
    pub rs485: Option<Rs485>,
    pub address: u8,
    /// Where the key goes (the reader's `key_file`).
    pub key_file: PathBuf,
    /// How long each step may take: the reader to answer, the sessions to come up.
    pub timeout: Duration,
}

/// What was done.
#[derive(Clone, Debug)]
pub struct Installed {
    pub key_file: PathBuf,
    /// The new key's fingerprint ([`key::fingerprint`]).
    pub fingerprint: String,
    pub took: Duration,
}

#[derive(Debug, Error)]
pub enum InstallError {
    #[error(
        "{path} exists: the reader is provisioned already (move the file aside to give it a new key; a reader that has a key must be reset to install mode first)"
    )]
    Exists { path: PathBuf },
    #[error(
        "{new_file} is left from an install that did not finish, and the reader may hold that key: if the reader comes up with it (rename it to {key_file} and start the service), keep it; otherwise remove it, reset the reader to install mode and install again"
    )]
    Unfinished {
        new_file: PathBuf,
        key_file: PathBuf,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("cannot start the OSDP line: {0}")]
    Line(std::io::Error),
    #[error(
        "cannot open {port}: {error} (is the doorbridge service stopped? the port opens exclusively)"
    )]
    Port { port: PathBuf, error: String },
    #[error(
        "no reader answered at address {address} within {secs} s (check wiring, address and baud rate)"
    )]
    NoAnswer { address: u8, secs: u64 },
    #[error(
        "the reader at address {address} answers but did not take the new key within {secs} s: it is not in install mode (put it in install mode, or reset it, and try again; remove {new_file} first)"
    )]
    NotInstallMode {
        address: u8,
        secs: u64,
        new_file: PathBuf,
    },
    #[error(
        "the reader did not come up with its new key within {secs} s; the key it may have taken is in {new_file} (keep that file: rename it to the key file if the reader uses it)"
    )]
    NotConfirmed { secs: u64, new_file: PathBuf },
    #[error("cannot create a random key: {0}")]
    Random(String),
    #[error("cannot put the key file in place: {0}")]
    Rename(std::io::Error),
}

/// Provisions a key; `progress` hears each step as a line for the operator.
pub fn install(
    request: &InstallRequest,
    mut progress: impl FnMut(&str),
) -> Result<Installed, InstallError> {
    let started = Instant::now();
    if request.key_file.exists() {
        return Err(InstallError::Exists {
            path: request.key_file.clone(),
        });
    }
    let new_file = with_suffix(&request.key_file, ".new");
    let mut key: Scbk = [0; 16];
    getrandom::fill(&mut key).map_err(|e| InstallError::Random(e.to_string()))?;
    // A `.new` left from an attempt that did not finish is kept: the reader may hold it.
    if new_file.exists() {
        return Err(InstallError::Unfinished {
            new_file,
            key_file: request.key_file.clone(),
        });
    }
    key::write_new(&new_file, &key)?;
    progress(&format!(
        "new key {} written to {} (mode 0600)",
        key::fingerprint(&key),
        new_file.display()
    ));

    // 1. The key, through SCBK-D (the reader must be in install mode).
    progress(&format!(
        "waiting for the reader at address {} on {} ({} baud) to take the key over the default key's session",
        request.address,
        request.port.display(),
        request.baud
    ));
    let secs = request.timeout.as_secs();
    let mut installing = Session::start(request, key, false)?;
    let taken = installing.wait_secure(request.timeout);
    drop(installing);
    match taken {
        Ok(()) => {}
        Err(Waited::PortFailed(error)) => {
            let _ = std::fs::remove_file(&new_file);
            return Err(InstallError::Port {
                port: request.port.clone(),
                error,
            });
        }
        Err(Waited::Silent) => {
            let _ = std::fs::remove_file(&new_file);
            return Err(InstallError::NoAnswer {
                address: request.address,
                secs,
            });
        }
        // It answered, and never with the new key: it refused SCBK-D. The file stays: the
        // reader is not known not to hold the key.
        Err(Waited::Insecure) => {
            return Err(InstallError::NotInstallMode {
                address: request.address,
                secs,
                new_file,
            });
        }
    }

    // 2. Proof: a session with the new key and nothing else allowed.
    progress("the reader took the key; checking it with nothing else allowed (EnforceSecure)");
    let mut proving = Session::start(request, key, true)?;
    if proving.wait_secure(request.timeout).is_err() {
        return Err(InstallError::NotConfirmed {
            secs,
            new_file: new_file.clone(),
        });
    }
    drop(proving);
    std::fs::rename(&new_file, &request.key_file).map_err(InstallError::Rename)?;
    if let Some(dir) = request.key_file.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    progress(&format!(
        "reader {} on bus {} is provisioned: key {} in {}",
        request.address,
        request.bus,
        key::fingerprint(&key),
        request.key_file.display()
    ));
    Ok(Installed {
        key_file: request.key_file.clone(),
        fingerprint: key::fingerprint(&key),
        took: started.elapsed(),
    })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Why a wait for the secure channel ended without it.
enum Waited {
    PortFailed(String),
    /// The reader never answered.
    Silent,
    /// It answered, without the secure channel.
    Insecure,
}

/// One CP on the line with the one reader.
struct Session {
    // Held for its lifetime: dropping it stops the line thread.
    _line: cp::CpHandle,
    events: mpsc::UnboundedReceiver<CpEvent>,
}

impl Session {
    fn start(request: &InstallRequest, key: Scbk, enforce: bool) -> Result<Session, InstallError> {
        let (tx, events) = mpsc::unbounded_channel();
        let line = cp::spawn(
            LineSpec {
                name: request.bus.clone(),
                port: request.port.clone(),
                baud: request.baud,
                rs485: request.rs485.clone(),
                pds: vec![PdSpec {
                    address: request.address,
                    name: format!("{}/{}", request.bus, request.address),
                    scbk: Some(key),
                    enforce_secure: enforce,
                }],
            },
            tx,
        )
        .map_err(InstallError::Line)?;
        Ok(Session {
            _line: line,
            events,
        })
    }

    fn wait_secure(&mut self, timeout: Duration) -> Result<(), Waited> {
        let deadline = Instant::now() + timeout;
        let mut answered = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if answered {
                    Waited::Insecure
                } else {
                    Waited::Silent
                });
            }
            match self.events.try_recv() {
                Ok(CpEvent::State {
                    online,
                    secure,
                    answers,
                    ..
                }) => {
                    answered |= online || answers;
                    if online && secure {
                        return Ok(());
                    }
                }
                Ok(CpEvent::Port {
                    open: false,
                    error: Some(error),
                }) => return Err(Waited::PortFailed(error)),
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(cp::TICK.min(left));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err(Waited::Silent);
                }
            }
        }
    }
}
