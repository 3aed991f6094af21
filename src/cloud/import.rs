//! Installing a signed key set from a file (`doorbridge keys import`), for sites without
//! internet: the manifest and chunks are checked exactly as over MQTT (envelope signature
//! with a trusted key, target, anti-rollback, chunk hashes, key count) by the same [`Sync`]
//! machine, and the set goes live in one transaction only when all of it checks out.

use std::path::Path;

use ed25519_dalek::VerifyingKey;

use super::bundle::{BundleError, BundleStream};
use super::envelope::{self, EnvelopeError, Kind};
use super::link::{self, LinkError};
use super::payload::{MAX_ENVELOPE_BYTES, Manifest, PayloadError, Target};
use super::sync::{Action, ResyncReason, Sync};
use crate::config::Config;
use crate::store::{KeySetHeader, Store, StoreError};

/// Why a key-set file was not installed. The held key set is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read the key-set file")]
    Bundle(#[from] BundleError),
    #[error("the configuration's trusted keys")]
    Config(#[from] LinkError),
    #[error("the manifest is not acceptable: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("the manifest is signed, but it is not a manifest (it is a {0} message)")]
    NotAManifest(Kind),
    #[error("the manifest does not decode: {0}")]
    Manifest(#[from] PayloadError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the store refused the set: {0}")]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Only a busy or full store may clear by itself; a bad file stays bad.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ImportError::Store(e) if e.is_retryable())
    }
}

/// What was installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Imported {
    pub version: u64,
    pub keys: u64,
    pub chunks: u32,
}

/// `doorbridge keys import FILE`: reads a bundle (see [`super::bundle`]) one chunk at a time,
/// opens the store named by the configuration (refused while the service runs: it holds the
/// store) and installs the set after the same checks as over MQTT.
pub async fn import_file(
    config: &Config,
    path: &Path,
    progress: impl FnMut(u32, u32),
) -> Result<Imported, ImportError> {
    let trusted = link::trusted_keys(config)?;
    let target = link::target(config);
    let mut bundle = BundleStream::open(path)?;
    let options = crate::store::StoreOptions::from(config);
    let store = tokio::task::spawn_blocking(move || Store::open(options))
        .await
        .map_err(|e| StoreError::Io {
            what: "opening the store",
            source: std::io::Error::other(e),
        })??;
    let manifest = std::mem::take(&mut bundle.manifest);
    // A CLI on its own runtime: reading the next 128 KiB here blocks nothing else.
    let next = || bundle.next_chunk().map_err(ImportError::from);
    let result = import(&store, &target, &trusted, &manifest, next, progress).await;
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    result
}

/// Checks and installs a snapshot given as its signed manifest and its chunks. `progress` is
/// called after each chunk with (chunks done, chunks in all).
pub async fn import(
    store: &Store,
    target: &Target,
    trusted: &[VerifyingKey],
    manifest: &[u8],
    mut next_chunk: impl FnMut() -> Result<Option<Vec<u8>>, ImportError>,
    mut progress: impl FnMut(u32, u32),
) -> Result<Imported, ImportError> {
    let held = link::held_version(store).await?;
    let opened = envelope::open(manifest, trusted, MAX_ENVELOPE_BYTES)?;
    if opened.kind != Kind::Manifest {
        return Err(ImportError::NotAManifest(opened.kind));
    }
    let manifest = Manifest::decode(&opened.body)?;
    let total = manifest.chunk_count;
    let mut sync = Sync::new(target.clone(), held);
    // The file's time is not "now": a set prepared days ago must not time out, so the
    // machine runs on the manifest's own clock.
    let now = manifest.issued_at;
    let mut run = Run {
        store,
        generation: None,
        done: None,
    };
    run.execute(sync.on_manifest(manifest, now)).await?;
    let mut read = 0u32;
    while let Some(chunk) = next_chunk()? {
        run.execute(sync.on_chunk(&chunk, now)).await?;
        read = read.saturating_add(1);
        progress(read, total);
    }
    if let Some(mut done) = run.done {
        done.chunks = total;
        return Ok(done);
    }
    if run.generation.is_some() {
        return Err(ImportError::Refused(format!(
            "the file holds {read} chunks, the manifest names {total}"
        )));
    }
    Err(ImportError::Refused("nothing to install".into()))
}

/// Carries out the machine's actions against the store.
struct Run<'a> {
    store: &'a Store,
    generation: Option<(u64, i64)>,
    done: Option<Imported>,
}

impl Run<'_> {
    async fn execute(&mut self, actions: Vec<Action>) -> Result<(), ImportError> {
        for action in actions {
            match action {
                Action::Begin {
                    version,
                    salt,
                    issued_at,
                    stale_after,
                    ..
                } => {
                    let header = KeySetHeader {
                        version,
                        salt,
                        issued_at: Some(issued_at),
                        stale_after,
                    };
                    let generation = self.store.begin_key_set(header).await?;
                    self.generation = Some((version, generation));
                }
                Action::Stage { version, keys, .. } => {
                    if let Some((v, generation)) = self.generation
                        && v == version
                    {
                        self.store.stage_keys(generation, keys).await?;
                    }
                }
                Action::Commit { version, key_count } => {
                    if let Some((v, generation)) = self.generation
                        && v == version
                    {
                        self.store.commit_key_set(generation, key_count).await?;
                        self.done = Some(Imported {
                            version,
                            keys: key_count,
                            chunks: 0,
                        });
                    }
                }
                Action::Reject { reason } => return Err(ImportError::Refused(reason.to_string())),
                Action::RequestResync {
                    reason: ResyncReason::BadSnapshot { version },
                } => {
                    return Err(ImportError::Refused(format!(
                        "the chunks of version {version} do not add up to its manifest's key count"
                    )));
                }
                Action::RequestResync { reason } => {
                    return Err(ImportError::Refused(format!("{reason:?}")));
                }
                Action::ApplyDelta(_)
                | Action::TrustTime(_)
                | Action::Vouch { .. }
                | Action::Ignore { .. } => {}
            }
        }
        Ok(())
    }
}
