//! The MQTT link to the cloud: receives signed key sets and commands, carries them out
//! against the store and the doors, and reports back.
//!
//! Two tasks, talking over a channel:
//!
//! - the **poller** (`poller`) owns rumqttc's event loop and does nothing but poll it, forward what
//!   arrives and wait out a jittered, growing backoff after a connection error (rumqttc
//!   reconnects on the next poll). It waits for nothing but room in the small channel to the
//!   worker, and the worker never waits for the poller (it queues acks and reports with
//!   `try_*`), so the two cannot deadlock;
//! - the **worker** ([`run_link`]) opens envelopes, feeds the pure [`Sync`] machine, carries
//!   out its actions against the store and acknowledges each message to the broker only after
//!   that (`manual_acks`): a key-set message the broker considers delivered is on disk.
//!
//! The session is persistent (`clean_session = false`, client id = gateway id), so `QoS` 1
//! messages sent while the gateway was away are delivered when it returns. When a `ConnAck`
//! says the broker has no session for us, the worker subscribes again (to heartbeats at every
//! connect: a session made before they existed lacks that subscription). On every connect it
//! publishes a retained `online` state naming the held version; the will says `offline`.
//! Memory stays bounded whatever the broker does: brokers do not all honour an in-flight window
//! (mosquitto sent a whole million-key snapshot, 1,886 chunks, unacknowledged), so the channel
//! holds at most [`BACKLOG`] messages; beyond that the poller stops reading and TCP pushes back
//! on the broker.
//!
//! Beside them: `connect` builds the connection options and TLS from the configuration, and
//! `commands` carries out the cloud's remote commands (open a door, push a unit's settings)
//! and reports their results.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use jiff::Timestamp;
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::acks::{Ack, Correlator, Publisher};
use super::envelope::{self, Kind};
use super::envelope::{EnvelopeError, Opened, SignerId};
use super::payload::{
    Delegation, DelegationRevoke, Delta, Heartbeat, MAX_ENVELOPE_BYTES, Manifest, OpenDoor,
    ResyncCommand, UnitSettings,
};
use super::refusals::{Admit, Refusals};
use super::report::{Outcome, Presence, Report};
use super::sync::{Action, ReplayCache, ResyncReason, Sync};
use super::telemetry::{TelemetryLink, TelemetrySpec, run_telemetry};
use super::topics::Channel;
use super::uplink::{Planner, Uplink, WINDOW, run_uplink};
use crate::access::{DoorId, Key};
use crate::drivers::bus::DoorRouter;
use crate::store::{DeltaChange, HeldDelegation, KeySetHeader, Record, Store, StoreError, Vouched};
use crate::task::stopped;

/// How long a unit has to carry out a remote open before the cloud hears "unreachable".
const OPEN_RESULT_WAIT: Duration = Duration::from_secs(10);
/// The channel named in the refusal of a message too big to read (its topic is unknown).
pub const UNREADABLE: &str = "unreadable";
/// Resync requests closer together than this are one request.
const RESYNC_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Messages received and not yet carried out, at most (each at most ~128 KiB).
pub const BACKLOG: usize = 16;
/// Requests rumqttc may queue between the worker and the event loop.
const REQUEST_CAPACITY: usize = 1024;

mod commands;
mod connect;
mod poller;

pub use connect::{LinkError, LinkSpec, max_incoming_packet, spec, target, trusted_keys};
use poller::{Polled, Uplinked, poll};

pub use super::status::LinkStatus;

/// The snapshot being staged in the store: its version and staging generation.
struct Staging {
    version: u64,
    generation: i64,
}

/// Keys staged per store transaction at most: chunks already waiting behind the one in hand
/// join it, up to this many keys (P4: a transaction per ~524-key chunk wrote each touched
/// index page again at every commit and applied at half the rate of 5,000-key transactions).
const STAGE_BATCH_KEYS: usize = 5_000;

/// Chunks verified and waiting to be staged together into the snapshot being staged (any other
/// action flushes them first, so they always belong to it), and their messages, acknowledged to
/// the broker only once the keys are on disk.
#[derive(Default)]
struct StageBuffer {
    keys: Vec<Key>,
    /// Version, index and key count of each chunk in `keys`, logged once staged.
    chunks: Vec<(u64, u32, usize)>,
    messages: Vec<Publish>,
}

struct Worker {
    spec: LinkSpec,
    publisher: Publisher,
    store: Store,
    router: Arc<DoorRouter>,
    status: Arc<Mutex<LinkStatus>>,
    sync: Sync,
    replay: ReplayCache,
    /// Refusal records, coalesced per channel.
    refusals: Refusals,
    staging: Option<Staging>,
    buffered: StageBuffer,
    last_resync: Option<std::time::Instant>,
    /// An oversized message broke the connection: reported once connected again.
    oversized: Option<(usize, usize)>,
    /// Commands issued before this instant are refused: the replay cache is in memory, so a
    /// command redelivered after a restart could otherwise open a door twice.
    started: Timestamp,
    /// The delegation whose key signed the delta being carried out (`None`: a root key).
    signer: Option<String>,
    /// The public key of the gateway's identity, for the `state` message (hex).
    identity: Option<String>,
}

/// Runs the cloud link until `shutdown` turns true, then publishes `offline` and disconnects.
pub async fn run_link(
    spec: LinkSpec,
    store: Store,
    router: Arc<DoorRouter>,
    status: Arc<Mutex<LinkStatus>>,
    telemetry: TelemetrySpec,
    mut shutdown: watch::Receiver<bool>,
) {
    let held = match held_version(&store).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cloud link not started: the held key set cannot be read");
            return;
        }
    };
    let Some(first) = spec.brokers.first() else {
        tracing::error!("cloud link not started: no broker configured");
        return;
    };
    let (client, mut eventloop) = AsyncClient::new(first.clone(), REQUEST_CAPACITY);
    // Small messages (acks, reports) go out at once, not after a delayed ACK (~40 ms).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, mut rx) = mpsc::channel(BACKLOG);
    let publisher = Publisher::new(client);
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let (connected_tx, connected_rx) = watch::channel(false);
    let poller = tokio::spawn(poll(
        eventloop,
        spec.brokers.clone(),
        tx,
        Uplinked {
            correlator: Correlator::new(publisher.clone()),
            acks: acks_tx,
            connected: connected_tx,
        },
        Arc::clone(&status),
    ));
    tracing::info!(brokers = spec.brokers.len(), held, "cloud link starting");
    let (helpers_stop, helpers_stopped) = watch::channel(false);
    let helpers = start_helpers(
        &spec,
        &publisher,
        &store,
        (&status, &router),
        (acks_rx, connected_rx),
        telemetry,
        &helpers_stopped,
    );
    let identity = chain_identity(&store).map(|id| id.public_hex());
    let mut worker = Worker {
        sync: Sync::new(spec.target.clone(), held),
        spec,
        publisher,
        store,
        router,
        status,
        replay: ReplayCache::with_defaults(),
        refusals: Refusals::default(),
        staging: None,
        buffered: StageBuffer::default(),
        last_resync: None,
        oversized: None,
        started: Timestamp::now(),
        signer: None,
        identity,
    };
    worker.set_status(|s| {
        s.held_version = held;
        s.offline_since.get_or_insert_with(Timestamp::now);
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            // Something from the broker connection.
            next = rx.recv() => match next {
                Some(p) => {
                    worker.on_polled(p).await;
                    // Chunks already waiting join the ones just verified: one transaction.
                    while worker.buffering() {
                        let Ok(next) = rx.try_recv() else { break };
                        if worker.is_chunk(&next) {
                            worker.on_polled(next).await;
                        } else {
                            worker.flush_staged().await;
                            worker.on_polled(next).await;
                        }
                    }
                    worker.flush_staged().await;
                }
                None => break,
            },
            // Snapshots that stalled, chunks that waited too long for their manifest.
            _ = tick.tick() => {
                let actions = worker.sync.tick(Timestamp::now());
                worker.execute(actions, Channel::Manifest).await;
            }
            // The daemon is stopping.
            () = stopped(&mut shutdown) => break,
        }
    }
    let _ = helpers_stop.send(true);
    worker.say_goodbye(helpers, poller, rx).await;
}

impl Worker {
    /// After the helpers were told to stop: waits briefly for them (the uplink for the acks of
    /// batches in flight; what stays unacknowledged goes again after the next start), says
    /// `offline` and disconnects.
    async fn say_goodbye(
        &self,
        helpers: (JoinHandle<()>, JoinHandle<()>),
        poller: JoinHandle<()>,
        mut rx: mpsc::Receiver<Polled>,
    ) {
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let _ = tokio::join!(helpers.0, helpers.1);
        })
        .await;
        // A clean disconnect suppresses the will, so say "offline" first.
        self.publish_state(Presence::Offline);
        let _ = self.publisher.client().try_disconnect();
        // Keep taking (and not acknowledging: they come again next time) what the poller still
        // forwards, so a poller waiting for room reaches the disconnect; it ends there, and its
        // sender with it.
        let drain = async { while rx.recv().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), async {
            let _ = tokio::join!(poller, drain);
        })
        .await
        .is_err()
        {
            tracing::debug!("cloud link poller did not finish in time");
        }
        tracing::info!("cloud link stopped");
    }
}

/// The identity that signs the record chain's head, next to the database (made by the
/// daemon at start; made here too when the link runs without it, as in tests).
fn chain_identity(store: &Store) -> Option<crate::store::chain::Identity> {
    let dir = crate::store::chain::Identity::state_dir(store.path());
    crate::store::chain::Identity::load_or_create(&dir)
        .inspect_err(
            |e| tracing::error!(error = %e, "record batches go without a signed chain head"),
        )
        .ok()
}

/// Starts the uplink and the telemetry task beside the worker.
fn start_helpers(
    spec: &LinkSpec,
    publisher: &Publisher,
    store: &Store,
    (status, router): (&Arc<Mutex<LinkStatus>>, &Arc<DoorRouter>),
    (acks, connected): (mpsc::UnboundedReceiver<Ack>, watch::Receiver<bool>),
    telemetry: TelemetrySpec,
    stop: &watch::Receiver<bool>,
) -> (JoinHandle<()>, JoinHandle<()>) {
    let uplink = tokio::spawn(run_uplink(
        Uplink {
            publisher: publisher.clone(),
            topic: spec.topics.topic(Channel::Records),
            planner: Planner::new(
                &spec.target.gateway,
                &spec.target.site,
                spec.max_payload,
                WINDOW,
            ),
            store: store.clone(),
            connected: connected.clone(),
            acks,
            deletes: JoinSet::new(),
            marks: super::uplink::PendingMarks::default(),
            identity: chain_identity(store),
        },
        stop.clone(),
    ));
    let telemetry = tokio::spawn(run_telemetry(
        telemetry,
        TelemetryLink {
            publisher: publisher.clone(),
            topic: spec.topics.topic(Channel::Telemetry),
            gateway: spec.target.gateway.clone(),
            store: store.clone(),
            status: Arc::clone(status),
            connected,
            now: Arc::clone(&router.telemetry_now),
        },
        stop.clone(),
    ));
    (uplink, telemetry)
}

pub(crate) async fn held_version(store: &Store) -> Result<u64, StoreError> {
    store.read(|r| r.key_set().map(|k| k.version)).await
}

impl Worker {
    fn set_status(&self, f: impl FnOnce(&mut LinkStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn on_polled(&mut self, polled: Polled) {
        match polled {
            Polled::Connected { session_present } => {
                tracing::info!(session_present, "connected to the broker");
                self.set_status(|s| {
                    s.connected = true;
                    s.connects += 1;
                    s.last_error = None;
                    s.offline_since = None;
                });
                // With a session the broker has the subscriptions, but a session made by a
                // gateway older than heartbeats lacks that one (subscribing again is harmless).
                let channels: &[Channel] = if session_present {
                    &[Channel::Heartbeat]
                } else {
                    &Channel::INBOUND
                };
                let filters = channels.iter().map(|&c| rumqttc::SubscribeFilter {
                    path: self.spec.topics.topic(c),
                    qos: QoS::AtLeastOnce,
                });
                if let Err(e) = self.publisher.client().try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot subscribe to the cloud's topics");
                }
                self.publish_state(Presence::Online);
                if let Some((size, limit)) = self.oversized.take() {
                    let reason = format!(
                        "a message of {size} bytes, over the gateway's {limit}-byte limit, \
                         could not be read; the broker's queue for this gateway was dropped \
                         with it (clean session)"
                    );
                    self.record_refusal(UNREADABLE, &reason).await;
                    // Deltas and commands queued behind it were dropped too.
                    self.last_resync = None;
                    self.request_resync(reason);
                }
            }
            Polled::Disconnected { error, broker } => {
                let was = self.status.lock().is_ok_and(|mut s| {
                    let was = s.connected;
                    s.connected = false;
                    s.last_error = Some(format!("{broker}: {error}"));
                    s.offline_since.get_or_insert_with(Timestamp::now);
                    was
                });
                if was {
                    tracing::warn!(%broker, %error, "lost the broker connection; reconnecting");
                } else {
                    tracing::debug!(%broker, %error, "broker connection failed; trying again");
                }
            }
            Polled::Oversized { size, limit } => {
                self.set_status(|s| {
                    s.connected = false;
                    s.offline_since.get_or_insert_with(Timestamp::now);
                    s.last_error = Some(format!(
                        "the broker sent a {size}-byte message, over the {limit}-byte limit"
                    ));
                });
                tracing::warn!(
                    size,
                    limit,
                    "the broker sent a message too big to read; reconnecting with a clean session to drop it"
                );
                // Reported once connected again: what is queued now would be dropped with the
                // old session.
                self.oversized = Some((size, limit));
            }
            Polled::Message(p) => {
                self.on_message(&p).await;
                if self.buffered.keys.is_empty() {
                    self.ack(&p);
                } else {
                    // Its keys wait in the buffer: acknowledged once they are on disk.
                    self.buffered.messages.push(p);
                }
            }
        }
    }

    /// Acknowledges a message: what it asked for is on disk (or refused for good).
    fn ack(&self, p: &Publish) {
        if let Err(e) = self.publisher.client().try_ack(p) {
            tracing::debug!(error = %e, "ack not sent; the broker will redeliver");
        }
    }

    /// Whether verified chunks wait to be staged and there is room for more.
    fn buffering(&self) -> bool {
        !self.buffered.keys.is_empty() && self.buffered.keys.len() < STAGE_BATCH_KEYS
    }

    fn is_chunk(&self, polled: &Polled) -> bool {
        matches!(polled, Polled::Message(p) if self.spec.topics.channel_of(&p.topic) == Some(Channel::Chunk))
    }

    /// Stages the buffered chunks in one transaction, then acknowledges their messages.
    async fn flush_staged(&mut self) {
        let buffered = std::mem::take(&mut self.buffered);
        if let Some(generation) = self.staging.as_ref().map(|s| s.generation)
            && !buffered.keys.is_empty()
        {
            match self.store.stage_keys(generation, buffered.keys).await {
                Ok(()) => {
                    for (version, index, keys) in buffered.chunks {
                        tracing::debug!(version, index, keys, "chunk staged");
                    }
                }
                Err(e) => {
                    self.store_failed(Channel::Chunk, "staging a chunk", &e)
                        .await;
                }
            }
        }
        for p in &buffered.messages {
            self.ack(p);
        }
    }

    async fn on_message(&mut self, p: &Publish) {
        let now = Timestamp::now();
        let Some(channel) = self.spec.topics.channel_of(&p.topic) else {
            tracing::debug!(topic = %p.topic, "message on a topic the link does not use");
            return;
        };
        if channel == Channel::Chunk {
            let actions = self.sync.on_chunk(&p.payload, now);
            self.execute(actions, channel).await;
            return;
        }
        let Some(kind) = channel.kind() else {
            return;
        };
        // Delegations travel on `keys/delta`, in order with the deltas that use them (§5.3).
        let delegating = |k: Kind| {
            channel == Channel::Delta && matches!(k, Kind::Delegation | Kind::DelegationRevoke)
        };
        let (opened, signer) =
            match envelope::open(&p.payload, &self.spec.trusted, MAX_ENVELOPE_BYTES) {
                Ok(o) if o.kind == kind || delegating(o.kind) => (o, None),
                Ok(o) => {
                    return self
                        .reject(channel, format!("a {} envelope on this topic", o.kind))
                        .await;
                }
                Err(EnvelopeError::UnknownKey(signed_by)) if channel == Channel::Delta => {
                    match self.open_delegated(&p.payload, signed_by).await {
                        Ok((o, id)) => (o, Some(id)),
                        Err(reason) => return self.reject(channel, reason).await,
                    }
                }
                Err(e) => return self.reject(channel, e.to_string()).await,
            };
        match opened.kind {
            Kind::Delegation => match Delegation::decode(&opened.body) {
                Ok(d) => self.delegation(d).await,
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::DelegationRevoke => match DelegationRevoke::decode(&opened.body) {
                Ok(r) if r.target == self.spec.target => {
                    match self.store.revoke_delegation(r.id.clone()).await {
                        Ok(()) => tracing::info!(id = %r.id, "delegation revoked"),
                        Err(e) => {
                            tracing::error!(error = %e, id = %r.id, "revoking a delegation failed");
                        }
                    }
                }
                Ok(_) => self.reject(channel, "for another gateway".into()).await,
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::Manifest => match Manifest::decode(&opened.body) {
                Ok(m) => {
                    let actions = self.sync.on_manifest(m, now);
                    self.execute(actions, channel).await;
                }
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::Delta => match Delta::decode(&opened.body) {
                Ok(d) => {
                    let actions = self.sync.on_delta(d, now);
                    self.signer = signer;
                    self.execute(actions, channel).await;
                    self.signer = None;
                }
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::Heartbeat => match Heartbeat::decode(&opened.body) {
                Ok(h) => {
                    let actions = self.sync.on_heartbeat(&h, now);
                    self.execute(actions, channel).await;
                }
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::OpenDoor => match OpenDoor::decode(&opened.body) {
                Ok(c) => self.open_door(c, now).await,
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::UnitSettings => match UnitSettings::decode(&opened.body) {
                Ok(c) => self.unit_settings(c, now).await,
                Err(e) => self.reject(channel, e.to_string()).await,
            },
            Kind::Resync => match ResyncCommand::decode(&opened.body) {
                Ok(c) if c.target == self.spec.target => {
                    self.request_resync("requested by the cloud".into());
                    self.publish_result(c.command_id, "resync", Outcome::Done, None, None);
                }
                Ok(_) => self.reject(channel, "for another gateway".into()).await,
                Err(e) => self.reject(channel, e.to_string()).await,
            },
        }
    }

    /// Opens a delta envelope signed by a key the root delegated to (§5.3): the delegation
    /// id, or why not (reported as the refusal).
    async fn open_delegated(
        &self,
        bytes: &[u8],
        kid: SignerId,
    ) -> Result<(Opened, String), String> {
        let held = self
            .store
            .delegations()
            .await
            .map_err(|e| format!("reading delegations: {e}"))?;
        for d in held {
            let Ok(key) = VerifyingKey::from_bytes(&d.public_key) else {
                continue;
            };
            if SignerId::of(&key) != kid {
                continue;
            }
            let opened =
                envelope::open(bytes, &[key], MAX_ENVELOPE_BYTES).map_err(|e| e.to_string())?;
            if opened.kind != Kind::Delta {
                return Err(format!(
                    "a {} envelope signed by delegation {}: a delegate signs deltas only",
                    opened.kind, d.id
                ));
            }
            return Ok((opened, d.id));
        }
        Err(EnvelopeError::UnknownKey(kid).to_string())
    }

    /// A root-signed delegation: held from now on, unless revoked or older than the held one.
    async fn delegation(&mut self, d: Delegation) {
        if d.target != self.spec.target {
            return self
                .reject(Channel::Delta, "for another gateway".into())
                .await;
        }
        let Ok(public_key) = <[u8; 32]>::try_from(d.public_key.as_slice()) else {
            return self
                .reject(Channel::Delta, "public_key is not 32 bytes".into())
                .await;
        };
        if VerifyingKey::from_bytes(&public_key).is_err() {
            return self
                .reject(Channel::Delta, "public_key is not an Ed25519 key".into())
                .await;
        }
        // One delegation per key: the envelope names the signer by key, so two delegations of
        // one key would leave it open which scope a delta has.
        match self.store.delegations().await {
            Ok(held)
                if held
                    .iter()
                    .any(|h| h.public_key == public_key && h.id != d.id) =>
            {
                return self
                    .reject(
                        Channel::Delta,
                        format!("delegation {}: its key is already delegated", d.id),
                    )
                    .await;
            }
            Ok(_) => {}
            Err(e) => return tracing::error!(error = %e, "reading delegations failed"),
        }
        let held = HeldDelegation {
            id: d.id.clone(),
            public_key,
            doors: d.doors,
            not_after: d.not_after,
            issued_at: d.issued_at,
        };
        match self.store.put_delegation(held).await {
            Ok(true) => tracing::info!(id = %d.id, not_after = %d.not_after, "delegation held"),
            Ok(false) => {
                self.reject(
                    Channel::Delta,
                    format!("delegation {} is revoked, or a newer one is held", d.id),
                )
                .await;
            }
            Err(e) => tracing::error!(error = %e, id = %d.id, "holding a delegation failed"),
        }
    }

    /// Carries out the sync machine's actions in order.
    async fn execute(&mut self, actions: Vec<Action>, channel: Channel) {
        for action in actions {
            if !matches!(action, Action::Stage { .. }) {
                // In order: what was verified before is staged before anything else happens.
                self.flush_staged().await;
            }
            match action {
                Action::Begin {
                    version,
                    salt,
                    issued_at,
                    key_count,
                    stale_after,
                } => {
                    tracing::info!(version, keys = key_count, "key-set snapshot started");
                    let header = KeySetHeader {
                        version,
                        salt,
                        issued_at: Some(issued_at),
                        stale_after,
                    };
                    match self.store.begin_key_set(header).await {
                        Ok(generation) => {
                            self.staging = Some(Staging {
                                version,
                                generation,
                            });
                        }
                        Err(e) => {
                            return self
                                .store_failed(Channel::Manifest, "starting a snapshot", &e)
                                .await;
                        }
                    }
                }
                Action::Stage {
                    version,
                    index,
                    keys,
                } => {
                    if self.staging_for(version).is_none() {
                        continue;
                    }
                    self.buffered.chunks.push((version, index, keys.len()));
                    self.buffered.keys.extend(keys);
                }
                Action::Commit { version, key_count } => {
                    let Some(generation) = self.staging_for(version) else {
                        continue;
                    };
                    self.staging = None;
                    match self.store.commit_key_set(generation, key_count).await {
                        Ok(()) => self.applied(version, Some(key_count)),
                        Err(e) => {
                            return self
                                .store_failed(Channel::Chunk, "committing a snapshot", &e)
                                .await;
                        }
                    }
                }
                Action::ApplyDelta(delta) => {
                    let change = DeltaChange {
                        from_version: delta.from_version,
                        version: delta.version,
                        issued_at: Some(delta.issued_at),
                        upserts: delta.upserts,
                        revokes: delta.deletes,
                        stale_after: delta.stale_after,
                        signer: self.signer.take(),
                    };
                    match self.store.apply_delta(change).await {
                        Ok(applied) => {
                            tracing::info!(
                                version = delta.version,
                                upserted = applied.upserted,
                                revoked = applied.revoked,
                                "key-set delta applied"
                            );
                            self.applied(delta.version, None);
                        }
                        Err(e @ StoreError::OutsideDelegation(_)) => {
                            // Refused whole, like a bad signature: nothing changed, and a
                            // resync would not make the delegate's delta acceptable.
                            tracing::warn!(version = delta.version, error = %e, "delegated delta refused");
                            self.sync.refused_delta(delta.from_version);
                            return self.reject(Channel::Delta, e.to_string()).await;
                        }
                        Err(e) => {
                            return self
                                .store_failed(Channel::Delta, "applying a delta", &e)
                                .await;
                        }
                    }
                }
                // The store raises the mark from `issued_at` in the commit's own transaction.
                Action::TrustTime(_) => {}
                Action::Vouch { version, issued_at } => self.vouched(version, issued_at).await,
                Action::RequestResync { reason } => self.request_resync(describe(&reason)),
                Action::Reject { reason } => self.reject(channel, reason.to_string()).await,
                Action::Ignore { reason } => tracing::debug!(reason, "cloud message ignored"),
            }
        }
    }

    /// A heartbeat named the held version: the store raises the knowledge time.
    async fn vouched(&mut self, version: u64, issued_at: Timestamp) {
        match self.store.heartbeat(version, issued_at).await {
            Ok(Vouched::Current(known)) => {
                tracing::debug!(version, %issued_at, known = ?known, "heartbeat: the held key set is current");
            }
            // The store holds another version than the machine thought (a commit failed): the
            // store is right, and the next heartbeat or resync sorts it out.
            Ok(Vouched::OtherVersion { held }) => {
                tracing::info!(
                    version,
                    held,
                    "heartbeat for a version the store does not hold; ignored"
                );
            }
            Ok(Vouched::TooFarAhead { limit }) => {
                tracing::warn!(%issued_at, %limit, "a heartbeat signed more than a day beyond the clock and the trusted-time mark; it does not refresh the knowledge time");
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat taken, but its knowledge time could not be written (a restart would forget it)");
            }
        }
    }

    fn staging_for(&self, version: u64) -> Option<i64> {
        self.staging
            .as_ref()
            .filter(|s| s.version == version)
            .map(|s| s.generation)
    }

    fn applied(&mut self, version: u64, keys: Option<u64>) {
        let now = Timestamp::now();
        self.set_status(|s| {
            s.held_version = version;
            s.last_sync = Some(now);
        });
        self.publish(
            Channel::Sync,
            &Report::Applied {
                version,
                keys,
                at: now,
            },
            false,
        );
        self.publish_state(Presence::Online);
    }

    /// The store could not do what the sync machine asked: start over from what it holds. A
    /// refusal of the content (a credential digest twice in the set, a delta on the wrong
    /// base) is recorded and reported like every refusal (§8); a disk failure is not the
    /// message's fault.
    async fn store_failed(&mut self, channel: Channel, what: &str, e: &StoreError) {
        tracing::error!(error = %e, retryable = e.is_retryable(), "key set: {what} failed");
        if let StoreError::KeySet(reason) = e {
            self.record_refusal(channel.suffix(), &format!("{what}: {reason}"))
                .await;
        }
        self.staging = None;
        let held = held_version(&self.store).await.unwrap_or(self.sync.held());
        self.sync.reset(held);
        self.set_status(|s| s.held_version = held);
        self.request_resync(format!("{what} failed: {e}"));
    }

    fn request_resync(&mut self, reason: String) {
        // A burst of refusals (or a peer flooding stray chunks) asks once, not per message.
        if self
            .last_resync
            .is_some_and(|t| t.elapsed() < RESYNC_MIN_INTERVAL)
        {
            tracing::debug!(%reason, "resync already asked for moments ago");
            return;
        }
        self.last_resync = Some(std::time::Instant::now());
        tracing::info!(held = self.sync.held(), %reason, "asking the cloud for a full snapshot");
        self.publish(
            Channel::Sync,
            &Report::Resync {
                held: self.sync.held(),
                reason,
                at: Timestamp::now(),
            },
            false,
        );
    }

    /// Logs, counts, records and reports a refused message. The held key set is untouched.
    async fn reject(&mut self, channel: Channel, reason: String) {
        self.record_refusal(channel.suffix(), &reason).await;
        let command = match channel {
            Channel::OpenDoor => Some("open-door"),
            Channel::Resync => Some("resync"),
            Channel::Settings => Some("unit-settings"),
            _ => None,
        };
        if let Some(command) = command {
            self.publish_result(None, command, Outcome::Rejected, Some(reason), None);
        }
    }

    /// Every refusal is counted and logged; a `cloud_rejected` record and a `rejected` report
    /// follow unless this channel has had its share of the window (`cloud::refusals`).
    async fn record_refusal(&mut self, channel: &'static str, reason: &str) {
        self.set_status(|s| s.rejected += 1);
        let also = match self.refusals.admit(channel, std::time::Instant::now()) {
            Admit::Record { also } => also,
            Admit::Count => {
                tracing::debug!(channel, %reason, "cloud message refused (counted; this channel's refusal records are coalesced)");
                return;
            }
        };
        tracing::warn!(channel, %reason, also, "cloud message refused");
        let now = Timestamp::now();
        let record = Record::CloudRejected {
            at: now,
            channel: channel.to_owned(),
            reason: reason.to_owned(),
            also,
        };
        if let Err(e) = self.store.append(vec![record]).await {
            tracing::error!(error = %e, "the rejection could not be recorded");
        }
        let report = Report::Rejected {
            channel: channel.to_owned(),
            reason: reason.to_owned(),
            version: None,
            at: now,
        };
        self.publish(Channel::Sync, &report, false);
    }
    fn publish_result(
        &self,
        command_id: Option<String>,
        command: &str,
        outcome: Outcome,
        reason: Option<String>,
        door: Option<DoorId>,
    ) {
        let report = Report::CommandResult {
            command_id,
            command: command.to_owned(),
            outcome,
            reason,
            door,
            at: Timestamp::now(),
        };
        self.publish(Channel::CommandResult, &report, false);
    }

    fn publish_state(&self, state: Presence) {
        let report = Report::State {
            state,
            gateway: self.spec.target.gateway.clone(),
            held: Some(self.sync.held()),
            identity: self.identity.clone(),
        };
        self.publish(Channel::State, &report, true);
    }

    /// Queues a report without waiting: reports are small and best effort (what must not be
    /// lost goes through the store's outbox), and the worker must never block on a full
    /// request queue while the broker is away.
    fn publish(&self, channel: Channel, report: &Report, retain: bool) {
        let topic = self.spec.topics.topic(channel);
        if let Err(e) = self
            .publisher
            .try_publish(topic, retain, report.encode(), None)
        {
            tracing::debug!(error = %e, channel = channel.suffix(), "report not queued");
        }
    }
}

fn describe(reason: &ResyncReason) -> String {
    match reason {
        ResyncReason::DeltaGap { held, from_version } => {
            format!("a delta from version {from_version} does not apply on the held {held}")
        }
        ResyncReason::MissingChunks { version, missing } => {
            format!("snapshot {version} still missed {missing} chunks when it timed out")
        }
        ResyncReason::BadSnapshot { version } => {
            format!("snapshot {version} does not add up to its manifest")
        }
        ResyncReason::ChunksWithoutManifest { version } => {
            format!("chunks of snapshot {version} arrive without its manifest")
        }
        ResyncReason::BehindHeartbeat { held, version } => {
            format!("a heartbeat names version {version}, newer than the held {held}")
        }
    }
}
