//! The pure sync state machine: which verified cloud payloads change the key set, and how.
//!
//! [`Sync`] knows the version the store holds and at most one snapshot in progress. It is fed
//! manifests and deltas whose envelopes have already been verified, bare chunk bytes, and the
//! time; it answers with [`Action`]s for the driver to carry out against the store, in order.
//! It never touches the held key set itself: a snapshot becomes live only through
//! [`Action::Commit`], after every chunk is present and matches its manifest hash, so decisions
//! keep being answered from the old set meanwhile.
//!
//! The machine advances its held version when it emits [`Action::Commit`] or
//! [`Action::ApplyDelta`]. If the store then fails, the driver calls [`Sync::reset`] with the
//! version the store really holds, and asks for a resync.
//!
//! A heartbeat changes no key set: naming the held version, it becomes [`Action::Vouch`] (the
//! store raises the knowledge time); naming a newer one, the gateway missed something and asks
//! for a resync, unless a snapshot in progress brings that version.
//!
//! [`ReplayCache`] guards open-door commands: expired or already seen → rejected.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};

use super::payload::{
    Chunk, Delta, Heartbeat, MAX_CHUNK_BYTES, Manifest, OpenDoor, Sha256Digest, Target,
};
use crate::access::{Key, StaleLimits};

/// Chunks held while their manifest has not arrived yet.
pub const MAX_EARLY_CHUNKS: usize = 4;
/// How long a snapshot may go without a new chunk before it is dropped and a resync is asked
/// for.
pub const SNAPSHOT_TIMEOUT: SignedDuration = SignedDuration::from_secs(120);

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start staging a snapshot (`Store::begin_key_set`). Any staging of an older snapshot is
    /// abandoned: it will never be committed.
    Begin {
        version: u64,
        salt: Vec<u8>,
        issued_at: Timestamp,
        key_count: u64,
        /// The manifest's `stale_after` (empty: no limits).
        stale_after: StaleLimits,
    },
    /// Stage the keys of one verified chunk (`Store::stage_keys`).
    Stage {
        version: u64,
        index: u32,
        keys: Vec<Key>,
    },
    /// Every chunk is staged: make the snapshot live (`Store::commit_key_set`).
    Commit { version: u64, key_count: u64 },
    /// Apply a delta on top of the held version: upsert, and revoke the deleted ids.
    ApplyDelta(Delta),
    /// A signed cloud timestamp, for the trusted-time mark.
    TrustTime(Timestamp),
    /// The cloud vouches that the held `version` is current as of `issued_at`
    /// (`Store::heartbeat`).
    Vouch { version: u64, issued_at: Timestamp },
    /// Ask the cloud for a full snapshot.
    RequestResync { reason: ResyncReason },
    /// Log, count and report to the cloud; nothing else changes.
    Reject { reason: RejectReason },
    /// Harmless (a redelivered or superseded message); log at debug level at most.
    Ignore { reason: &'static str },
}

/// Why the gateway asks for a full snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// A delta does not start at the held version.
    DeltaGap { held: u64, from_version: u64 },
    /// A snapshot stayed incomplete for longer than [`SNAPSHOT_TIMEOUT`].
    MissingChunks { version: u64, missing: u32 },
    /// A snapshot's chunks do not add up to its manifest.
    BadSnapshot { version: u64 },
    /// Chunks keep arriving for a snapshot whose manifest the gateway does not have (it
    /// restarted while staging, say: the broker redelivers the chunks, not the manifest).
    ChunksWithoutManifest { version: u64 },
    /// A heartbeat names a version newer than the held one: a delta or snapshot was missed.
    BehindHeartbeat { held: u64, version: u64 },
}

/// Why a payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("for another gateway ({site}/{gateway})")]
    WrongTarget { site: String, gateway: String },
    #[error("version {got} is not newer than the held version {held}")]
    Rollback { held: u64, got: u64 },
    #[error("manifest version {got} is older than the snapshot in progress ({pending})")]
    StaleManifest { pending: u64, got: u64 },
    #[error("a different manifest for version {version} is already in progress")]
    ConflictingManifest { version: u64 },
    #[error("malformed chunk: {0}")]
    MalformedChunk(String),
    #[error("chunk {index} of version {version} is out of range")]
    ChunkOutOfRange { version: u64, index: u32 },
    #[error("chunk {index} of version {version} does not match its manifest hash")]
    ChunkHashMismatch { version: u64, index: u32 },
    #[error("snapshot {version} holds {got} keys, its manifest says {expected}")]
    KeyCountMismatch {
        version: u64,
        expected: u64,
        got: u64,
    },
}

#[derive(Debug)]
struct Pending {
    manifest: Manifest,
    /// When the manifest or the latest new chunk arrived: a snapshot times out only when it
    /// stops making progress, however large it is.
    progress: Timestamp,
    received: Vec<bool>,
    keys_seen: u64,
}

impl Pending {
    fn missing(&self) -> u32 {
        let n = self.received.iter().filter(|r| !**r).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The sync state machine. See the module documentation.
#[derive(Debug)]
pub struct Sync {
    target: Target,
    held: u64,
    pending: Option<Pending>,
    /// Chunks waiting for their manifest, with their hash and arrival time.
    early: Vec<(Sha256Digest, Chunk, Timestamp)>,
    /// The version a resync was last asked for because its chunks came without a manifest:
    /// asked once, not once per chunk.
    orphan_resync: Option<u64>,
}

impl Sync {
    /// A machine for the gateway `target` whose store holds `held` (0: no key set).
    pub fn new(target: Target, held: u64) -> Self {
        Sync {
            target,
            held,
            pending: None,
            early: Vec::new(),
            orphan_resync: None,
        }
    }

    /// The version the store holds (as far as this machine knows).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The version of the snapshot in progress, if any.
    pub fn pending(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.manifest.version)
    }

    /// Forgets any snapshot in progress and takes `held` as the store's version (after the
    /// store failed to carry out an action).
    pub fn reset(&mut self, held: u64) {
        self.held = held;
        self.pending = None;
        self.early.clear();
    }

    /// The store refused a delta the machine passed (outside its delegation): the held version
    /// is `held` again. Unlike [`Sync::reset`] a snapshot in progress carries on.
    pub fn refused_delta(&mut self, held: u64) {
        self.held = held;
    }

    fn wrong_target(&self, t: &Target) -> Option<Action> {
        (*t != self.target).then(|| Action::Reject {
            reason: RejectReason::WrongTarget {
                site: t.site.clone(),
                gateway: t.gateway.clone(),
            },
        })
    }

    /// A verified manifest arrived.
    pub fn on_manifest(&mut self, manifest: Manifest, now: Timestamp) -> Vec<Action> {
        let mut actions = self.tick(now);
        actions.extend(self.manifest(manifest, now));
        actions
    }

    fn manifest(&mut self, manifest: Manifest, now: Timestamp) -> Vec<Action> {
        if let Some(reject) = self.wrong_target(&manifest.target) {
            return vec![reject];
        }
        if manifest.version <= self.held {
            return vec![Action::Reject {
                reason: RejectReason::Rollback {
                    held: self.held,
                    got: manifest.version,
                },
            }];
        }
        if let Some(p) = &self.pending {
            if manifest.version == p.manifest.version {
                return if manifest == p.manifest {
                    vec![Action::Ignore {
                        reason: "manifest already in progress",
                    }]
                } else {
                    vec![Action::Reject {
                        reason: RejectReason::ConflictingManifest {
                            version: manifest.version,
                        },
                    }]
                };
            }
            if manifest.version < p.manifest.version {
                return vec![Action::Reject {
                    reason: RejectReason::StaleManifest {
                        pending: p.manifest.version,
                        got: manifest.version,
                    },
                }];
            }
        }
        let version = manifest.version;
        let mut actions = vec![Action::Begin {
            version,
            salt: manifest.salt.clone(),
            issued_at: manifest.issued_at,
            key_count: manifest.key_count,
            stale_after: manifest.stale_after.unwrap_or_default(),
        }];
        let count = manifest.chunk_hashes.len();
        self.pending = Some(Pending {
            manifest,
            progress: now,
            received: vec![false; count],
            keys_seen: 0,
        });
        let (now_ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .filter(|(_, c, _)| c.version >= version)
            .partition(|(_, c, _)| c.version == version);
        self.early = later;
        for (hash, chunk, _) in now_ready {
            actions.extend(self.accept_chunk(hash, chunk, now));
        }
        actions.extend(self.finish_if_complete());
        actions
    }

    /// The bytes of a chunk arrived (bare, unsigned).
    pub fn on_chunk(&mut self, bytes: &[u8], now: Timestamp) -> Vec<Action> {
        let mut actions = self.tick(now);
        if bytes.len() > MAX_CHUNK_BYTES {
            actions.push(Action::Reject {
                reason: RejectReason::MalformedChunk(format!(
                    "{} bytes, over the limit of {MAX_CHUNK_BYTES}",
                    bytes.len()
                )),
            });
            return actions;
        }
        let chunk = match Chunk::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                actions.push(Action::Reject {
                    reason: RejectReason::MalformedChunk(e.to_string()),
                });
                return actions;
            }
        };
        let hash = Sha256Digest::of(bytes);
        let pending_version = self.pending();
        if chunk.version <= self.held || pending_version.is_some_and(|p| chunk.version < p) {
            actions.push(Action::Ignore {
                reason: "chunk of a held or superseded snapshot",
            });
        } else if pending_version == Some(chunk.version) {
            actions.extend(self.accept_chunk(hash, chunk, now));
            actions.extend(self.finish_if_complete());
        } else if self
            .early
            .iter()
            .any(|(_, c, _)| c.version == chunk.version && c.index == chunk.index)
        {
            actions.push(Action::Ignore {
                reason: "chunk already waiting for its manifest",
            });
        } else if self.early.len() >= MAX_EARLY_CHUNKS {
            // More chunks than a reordering explains: the manifest is not coming (the gateway
            // restarted while staging). One resync, not an alarm per chunk.
            if self.orphan_resync == Some(chunk.version) {
                actions.push(Action::Ignore {
                    reason: "chunk without its manifest; a resync was asked for",
                });
            } else {
                self.orphan_resync = Some(chunk.version);
                actions.push(Action::RequestResync {
                    reason: ResyncReason::ChunksWithoutManifest {
                        version: chunk.version,
                    },
                });
            }
        } else {
            self.early.push((hash, chunk, now));
        }
        actions
    }

    /// A chunk of the snapshot in progress: check it against the manifest and stage it.
    fn accept_chunk(&mut self, hash: Sha256Digest, chunk: Chunk, now: Timestamp) -> Vec<Action> {
        let Some(p) = self.pending.as_mut() else {
            return Vec::new();
        };
        let version = p.manifest.version;
        let index = chunk.index;
        let position = usize::try_from(index).ok();
        let expected = position
            .and_then(|i| p.manifest.chunk_hashes.get(i))
            .copied();
        let slot = position.and_then(|i| p.received.get_mut(i));
        let (Some(expected), Some(slot)) = (expected, slot) else {
            return vec![Action::Reject {
                reason: RejectReason::ChunkOutOfRange { version, index },
            }];
        };
        if expected != hash {
            return vec![Action::Reject {
                reason: RejectReason::ChunkHashMismatch { version, index },
            }];
        }
        if *slot {
            return vec![Action::Ignore {
                reason: "duplicate chunk",
            }];
        }
        *slot = true;
        p.progress = p.progress.max(now);
        p.keys_seen = p.keys_seen.saturating_add(chunk.keys.len() as u64);
        if p.keys_seen > p.manifest.key_count {
            let got = p.keys_seen;
            let expected = p.manifest.key_count;
            self.pending = None;
            return vec![
                Action::Reject {
                    reason: RejectReason::KeyCountMismatch {
                        version,
                        expected,
                        got,
                    },
                },
                Action::RequestResync {
                    reason: ResyncReason::BadSnapshot { version },
                },
            ];
        }
        vec![Action::Stage {
            version,
            index,
            keys: chunk.keys,
        }]
    }

    fn finish_if_complete(&mut self) -> Vec<Action> {
        let Some(p) = &self.pending else {
            return Vec::new();
        };
        if p.missing() > 0 {
            return Vec::new();
        }
        let Some(p) = self.pending.take() else {
            return Vec::new();
        };
        let version = p.manifest.version;
        if p.keys_seen != p.manifest.key_count {
            return vec![
                Action::Reject {
                    reason: RejectReason::KeyCountMismatch {
                        version,
                        expected: p.manifest.key_count,
                        got: p.keys_seen,
                    },
                },
                Action::RequestResync {
                    reason: ResyncReason::BadSnapshot { version },
                },
            ];
        }
        self.held = version;
        self.early.retain(|(_, c, _)| c.version > version);
        vec![
            Action::Commit {
                version,
                key_count: p.manifest.key_count,
            },
            Action::TrustTime(p.manifest.issued_at),
        ]
    }

    /// A verified delta arrived.
    pub fn on_delta(&mut self, delta: Delta, now: Timestamp) -> Vec<Action> {
        let mut actions = self.tick(now);
        if let Some(reject) = self.wrong_target(&delta.target) {
            actions.push(reject);
            return actions;
        }
        if delta.version <= self.held {
            actions.push(Action::Reject {
                reason: RejectReason::Rollback {
                    held: self.held,
                    got: delta.version,
                },
            });
            return actions;
        }
        if delta.from_version != self.held || self.held == 0 {
            actions.push(Action::RequestResync {
                reason: ResyncReason::DeltaGap {
                    held: self.held,
                    from_version: delta.from_version,
                },
            });
            return actions;
        }
        self.held = delta.version;
        if self.pending().is_some_and(|p| p <= self.held) {
            self.pending = None;
        }
        self.early.retain(|(_, c, _)| c.version > delta.version);
        let issued_at = delta.issued_at;
        actions.push(Action::ApplyDelta(delta));
        actions.push(Action::TrustTime(issued_at));
        actions
    }

    /// A verified heartbeat arrived. See the module documentation.
    pub fn on_heartbeat(&mut self, heartbeat: &Heartbeat, now: Timestamp) -> Vec<Action> {
        let mut actions = self.tick(now);
        if let Some(reject) = self.wrong_target(&heartbeat.target) {
            actions.push(reject);
            return actions;
        }
        let version = heartbeat.version;
        let action = if version < self.held {
            Action::Ignore {
                reason: "heartbeat for an older version than the held one",
            }
        } else if version == self.held {
            Action::Vouch {
                version,
                issued_at: heartbeat.issued_at,
            }
        } else if self.pending().is_some_and(|p| p >= version) {
            Action::Ignore {
                reason: "heartbeat for the version of the snapshot in progress",
            }
        } else {
            Action::RequestResync {
                reason: ResyncReason::BehindHeartbeat {
                    held: self.held,
                    version,
                },
            }
        };
        actions.push(action);
        actions
    }

    /// Drops a snapshot that stayed incomplete for longer than [`SNAPSHOT_TIMEOUT`] and asks
    /// for a resync, and forgets chunks that waited that long for a manifest. Call it now and
    /// then (every manifest, chunk and delta calls it too).
    pub fn tick(&mut self, now: Timestamp) -> Vec<Action> {
        self.early
            .retain(|(_, _, arrived)| now.duration_since(*arrived) <= SNAPSHOT_TIMEOUT);
        match &self.pending {
            Some(p) if now.duration_since(p.progress) > SNAPSHOT_TIMEOUT => {
                let version = p.manifest.version;
                let missing = p.missing();
                self.pending = None;
                vec![Action::RequestResync {
                    reason: ResyncReason::MissingChunks { version, missing },
                }]
            }
            _ => Vec::new(),
        }
    }
}

/// Why an open-door command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandRejection {
    #[error("for another gateway")]
    WrongTarget,
    #[error("expired")]
    Expired,
    #[error("issued in the future")]
    NotYetValid,
    #[error("lives longer than allowed")]
    LifetimeTooLong,
    #[error("already seen (a replay)")]
    Replayed,
    #[error("too many live commands")]
    Full,
}

/// What the replay cache needs to know of a command.
#[derive(Clone, Copy, Debug)]
pub struct CommandParts<'a> {
    pub target: &'a Target,
    pub command_id: &'a str,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// How long an open-door command may live, by default.
pub const DEFAULT_COMMAND_LIFETIME: SignedDuration = SignedDuration::from_secs(60);
/// How far in the future a command's `issued_at` may lie, by default.
pub const DEFAULT_CLOCK_SKEW: SignedDuration = SignedDuration::from_secs(5);
/// How many live command ids are remembered, by default.
pub const DEFAULT_REPLAY_CAPACITY: usize = 1024;

/// Remembers the ids of open-door commands until they expire: expired or seen → rejected.
/// Bounded: commands may live at most `max_lifetime`, and at most `capacity` are remembered
/// at once (beyond that new commands are refused, failing closed).
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    max_lifetime: SignedDuration,
    skew: SignedDuration,
    seen: HashMap<String, Timestamp>,
}

impl ReplayCache {
    /// `skew`: how far in the future `issued_at` may lie (clock differences).
    pub fn new(capacity: usize, max_lifetime: SignedDuration, skew: SignedDuration) -> Self {
        ReplayCache {
            capacity,
            max_lifetime,
            skew,
            seen: HashMap::new(),
        }
    }

    /// A cache with the default capacity, lifetime and skew.
    pub fn with_defaults() -> Self {
        ReplayCache::new(
            DEFAULT_REPLAY_CAPACITY,
            DEFAULT_COMMAND_LIFETIME,
            DEFAULT_CLOCK_SKEW,
        )
    }

    /// Decides on a verified command at `now`, and remembers it when accepted.
    pub fn check(
        &mut self,
        command: &OpenDoor,
        target: &Target,
        now: Timestamp,
    ) -> Result<(), CommandRejection> {
        self.check_parts(
            &CommandParts {
                target: &command.target,
                command_id: &command.command_id,
                issued_at: command.issued_at,
                expires_at: command.expires_at,
            },
            target,
            now,
        )
    }

    /// [`ReplayCache::check`] for any command with an id, a target and a lifetime.
    pub fn check_parts(
        &mut self,
        command: &CommandParts<'_>,
        target: &Target,
        now: Timestamp,
    ) -> Result<(), CommandRejection> {
        if command.target != target {
            return Err(CommandRejection::WrongTarget);
        }
        if command.expires_at <= now {
            return Err(CommandRejection::Expired);
        }
        if command.issued_at.duration_since(now) > self.skew {
            return Err(CommandRejection::NotYetValid);
        }
        if command.expires_at.duration_since(command.issued_at) > self.max_lifetime {
            return Err(CommandRejection::LifetimeTooLong);
        }
        self.seen.retain(|_, expires| *expires > now);
        if self.seen.contains_key(command.command_id) {
            return Err(CommandRejection::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(CommandRejection::Full);
        }
        self.seen
            .insert(command.command_id.to_owned(), command.expires_at);
        Ok(())
    }

    /// Commands remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
