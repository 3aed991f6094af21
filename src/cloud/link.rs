//! The MQTT link to the cloud: receives signed key sets and commands, carries them out
//! against the store and the doors, and reports back.
//!
//! Two tasks, talking over a channel:
//!
//! - the **poller** owns rumqttc's event loop and does nothing but poll it, forward what
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

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use jiff::Timestamp;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::acks::{Ack, Correlator, Publisher};
use super::envelope::{self, Kind};
use super::envelope::{EnvelopeError, KeyId, Opened};
use super::failover::Failover;
use super::payload::{
    Delegation, DelegationRevoke, Delta, Heartbeat, MAX_ENVELOPE_BYTES, Manifest, OpenDoor,
    ResyncCommand, Target, UnitSettings,
};
use super::refusals::{Admit, Refusals};
use super::report::{Outcome, Presence, Report};
use super::sync::{Action, CommandParts, ReplayCache, ResyncReason, Sync};
use super::telemetry::{TelemetryLink, TelemetrySpec, run_telemetry};
use super::topics::{Channel, TopicError, Topics};
use super::uplink::{Planner, Uplink, WINDOW, run_uplink};
use crate::access::{Decision, Key};
use crate::bus::driver::{CommandOutcome, DoorRouter, OPEN_PULSE_MS};
use crate::bus::message::{OpenDoor as OpenDoorMsg, Settings as BusSettings};
use crate::bus::session::Command as BusCommand;
use crate::config::{BrokerUrl, Config};
use crate::store::{
    DeltaChange, HeldDelegation, KeySetHeader, Record, RemoteOpen, Store, StoreError, Vouched,
};
use crate::task::{clock_synced, jitter, stopped};

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

/// Why the link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cloud topics: {0}")]
    Topics(#[from] TopicError),
    #[error("cloud.trusted_keys[{index}] is not a usable Ed25519 public key")]
    TrustedKey { index: usize },
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}")]
    TlsPem {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no CA certificate to verify the broker with (set cloud.tls.ca_file)")]
    NoRoots,
}

impl LinkError {
    /// None of these clear by themselves: the configuration or its files must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Everything the link runs with.
#[derive(Clone)]
pub struct LinkSpec {
    pub target: Target,
    pub topics: Topics,
    pub trusted: Vec<VerifyingKey>,
    /// One set of connection options per configured broker, in the order they are tried.
    pub brokers: Vec<MqttOptions>,
    /// The largest message the gateway publishes (upload batches fill up to it).
    pub max_payload: usize,
}

impl std::fmt::Debug for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSpec")
            .field("target", &self.target)
            .field("trusted", &self.trusted.len())
            .finish_non_exhaustive()
    }
}

pub use super::status::LinkStatus;

/// This gateway as signed messages name it.
pub fn target(config: &Config) -> Target {
    Target {
        site: config.gateway.site_id.clone(),
        gateway: config.gateway.id.clone(),
    }
}

/// The public keys cloud messages must be signed with.
pub fn trusted_keys(config: &Config) -> Result<Vec<VerifyingKey>, LinkError> {
    config
        .cloud
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(index, k)| {
            VerifyingKey::from_bytes(k.as_bytes()).map_err(|_| LinkError::TrustedKey { index })
        })
        .collect()
}

/// Builds the link's settings from the configuration (reads the TLS files).
pub fn spec(config: &Config) -> Result<LinkSpec, LinkError> {
    let target = target(config);
    let topics = Topics::new(&config.cloud.topic_prefix, &target)?;
    let trusted = trusted_keys(config)?;
    let tls = if config.cloud.url.any_tls() {
        Some(Arc::new(tls_config(config)?))
    } else {
        None
    };
    let max_payload = usize::try_from(config.cloud.max_payload).unwrap_or(usize::MAX);
    let brokers = config
        .cloud
        .url
        .iter()
        .map(|url| broker_options(config, &topics, url, tls.as_ref(), max_payload))
        .collect();
    Ok(LinkSpec {
        target,
        topics,
        trusted,
        brokers,
        max_payload,
    })
}

/// The largest packet the gateway reads: a key-set chunk in its envelope must fit, with room
/// to spare. A larger one cannot be read at all (see `poll` for what happens then).
pub fn max_incoming_packet(max_payload: usize) -> usize {
    (4 * max_payload.max(MAX_ENVELOPE_BYTES)).max(1 << 20) + 1024
}

/// The connection options for one broker URL. TLS names are checked against that URL's host.
fn broker_options(
    config: &Config,
    topics: &Topics,
    url: &BrokerUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    max_payload: usize,
) -> MqttOptions {
    let cloud = &config.cloud;
    let mut options = MqttOptions::new(&config.gateway.id, &url.host, url.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cloud.keepalive);
    options.set_max_packet_size(max_incoming_packet(max_payload), max_payload + 1024);
    options.set_last_will(LastWill::new(
        topics.topic(Channel::State),
        Report::State {
            state: Presence::Offline,
            gateway: config.gateway.id.clone(),
            held: None,
            identity: None,
        }
        .encode(),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &cloud.username {
        let password = cloud
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        options.set_credentials(user, password);
    }
    if let (true, Some(tls)) = (url.tls, tls) {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(tls),
        )));
    }
    options
}

/// rustls with ring: the pinned CA (or the system's roots) and the client certificate.
fn tls_config(config: &Config) -> Result<rustls::ClientConfig, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = &config.cloud.tls;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &tls.ca_file {
        let pem = read_file("CA file", ca)?;
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(pem_error("CA file", ca, "certificate"));
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(LinkError::NoRoots);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read_file("client certificate", cert)?;
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&pem).flatten().collect();
            if chain.is_empty() {
                return Err(pem_error("client certificate", cert, "certificate"));
            }
            let pem = read_file("client key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|_| pem_error("client key", key, "private key"))?;
            Ok(builder.with_client_auth_cert(chain, key_der)?)
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::TlsFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, expected: &'static str) -> LinkError {
    LinkError::TlsPem {
        what,
        path: path.display().to_string(),
        expected,
    }
}

/// What the poller tells the worker.
enum Polled {
    Connected {
        session_present: bool,
    },
    Message(Publish),
    /// The connection failed or was lost; `broker` is the one it was with.
    Disconnected {
        error: String,
        broker: String,
    },
    /// The broker sent a packet of `size` bytes, over the gateway's limit: it could not be
    /// read (so neither its topic), and the connection broke. The next connect is clean.
    Oversized {
        size: usize,
        limit: usize,
    },
}

/// The poller's side of the uplink: broker acks matched to upload batches, and whether the
/// connection is up.
struct Uplinked {
    correlator: Correlator,
    acks: mpsc::UnboundedSender<Ack>,
    connected: watch::Sender<bool>,
}

/// The size of the packet behind an error, if the error is a packet too big to read.
fn oversized(error: &ConnectionError) -> Option<usize> {
    match error {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// Owns the event loop: polls, forwards, fails over and backs off (`cloud::failover`).
///
/// A packet too big to read breaks the connection, and with a persistent session the broker
/// sends it again at every connect: one oversized message would keep the gateway off its
/// topics for good. So the connect after one is made with a clean session, which makes the
/// broker drop the session and its queue, that message with it; the worker reports the
/// refusal, subscribes again (no session) and asks for a resync, since deltas and commands
/// queued behind the message went with it. The connect after that is persistent again.
async fn poll(
    mut eventloop: EventLoop,
    brokers: Vec<MqttOptions>,
    tx: mpsc::Sender<Polled>,
    mut up: Uplinked,
    status: Arc<Mutex<LinkStatus>>,
) {
    let mut failover = Failover::new(brokers.len());
    let show = |options: &MqttOptions| {
        if let Ok(mut s) = status.lock() {
            s.broker = Some(address(options));
        }
    };
    show(&eventloop.mqtt_options);
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let (acked, lost) = up.correlator.connection_lost(
                    &mut eventloop.pending,
                    &mut eventloop.state.events,
                    &mut eventloop.state.collision,
                );
                for batch in acked {
                    let _ = up.acks.send(Ack::Acked(batch));
                }
                let _ = up.acks.send(Ack::Lost(lost));
                up.connected.send_replace(false);
                let now = std::time::Instant::now();
                let before = failover.current();
                let (next, told) = if let Some(size) = oversized(&e) {
                    let limit = eventloop.mqtt_options.max_packet_size();
                    eventloop.mqtt_options.set_clean_session(true);
                    (failover.poisoned(now), Polled::Oversized { size, limit })
                } else {
                    let broker = address(&eventloop.mqtt_options);
                    let error = e.to_string();
                    (failover.failed(now), Polled::Disconnected { error, broker })
                };
                if tx.send(told).await.is_err() {
                    return;
                }
                if next.broker != before {
                    eventloop.mqtt_options = brokers[next.broker].clone();
                    show(&eventloop.mqtt_options);
                }
                if !next.wait.is_zero() {
                    tokio::time::sleep(jitter(next.wait)).await;
                }
                continue;
            }
        };
        if let Some(batch) = up.correlator.on_event(&event) {
            let _ = up.acks.send(Ack::Acked(batch));
        }
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                failover.connected(std::time::Instant::now());
                // A clean session was only for this connect (it dropped an oversized
                // message): the next one keeps its session again.
                eventloop.mqtt_options.set_clean_session(false);
                up.connected.send_replace(true);
                if tx
                    .send(Polled::Connected {
                        session_present: ack.session_present,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                failover.proved();
                // Waits while the worker is BACKLOG messages behind: the broker waits with us.
                let forwarded = tx.send(Polled::Message(p)).await;
                if forwarded.is_err() {
                    return;
                }
            }
            // The worker asked to disconnect and it is on its way: done (polling on would
            // reconnect, and the broker would then publish the will over our own `offline`).
            Event::Outgoing(Outgoing::Disconnect) => return,
            _ => {}
        }
    }
}

/// `host:port` of a broker, as logs and the status show it.
fn address(options: &MqttOptions) -> String {
    let (host, port) = options.broker_address();
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

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
    async fn open_delegated(&self, bytes: &[u8], kid: KeyId) -> Result<(Opened, String), String> {
        let held = self
            .store
            .delegations()
            .await
            .map_err(|e| format!("reading delegations: {e}"))?;
        for d in held {
            let Ok(key) = VerifyingKey::from_bytes(&d.public_key) else {
                continue;
            };
            if KeyId::of(&key) != kid {
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

    async fn open_door(&mut self, command: OpenDoor, now: Timestamp) {
        let id = command.command_id.clone();
        let refused = if command.issued_at < self.started {
            Some("issued before the gateway started (a possible replay)".to_owned())
        } else {
            self.replay
                .check(&command, &self.spec.target, now)
                .err()
                .map(|e| e.to_string())
        };
        if let Some(reason) = refused {
            tracing::warn!(command_id = %id, door = %command.door, %reason, "open-door command refused");
            self.record_refusal(Channel::OpenDoor.suffix(), &reason)
                .await;
            self.publish_result(
                Some(id),
                "open-door",
                Outcome::Rejected,
                Some(reason),
                Some(command.door),
            );
            return;
        }
        let request = RemoteOpen {
            command_id: id.clone(),
            key_id: command.key_id.clone(),
            door: command.door.clone(),
            now,
            clock_synced: clock_synced(),
        };
        let verdict = match self.store.remote_open(request).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(command_id = %id, error = %e, "open-door command not decided");
                self.publish_result(
                    Some(id),
                    "open-door",
                    Outcome::Rejected,
                    Some(format!("not decided: {e}")),
                    Some(command.door),
                );
                return;
            }
        };
        let doors = match verdict.decision {
            Decision::Grant(g) => g.doors,
            Decision::Deny { reason } => {
                tracing::info!(command_id = %id, door = %command.door, key_id = %command.key_id, %reason, "remote open denied");
                self.publish_result(
                    Some(id),
                    "open-door",
                    Outcome::Denied,
                    Some(reason.name().to_owned()),
                    Some(command.door),
                );
                return;
            }
        };
        tracing::info!(command_id = %id, door = %command.door, key_id = %command.key_id, released = ?doors, "remote open granted");
        let pulse = BusCommand::OpenDoor(OpenDoorMsg {
            door: 0,
            pulse_ms: OPEN_PULSE_MS,
        });
        let main = self.router.send_tracked(&command.door, pulse.clone());
        for other in doors.iter().filter(|d| **d != command.door) {
            if !self.router.send(other, pulse.clone()) {
                tracing::warn!(door = %other, "a granted door could not be released: no unit serves it or its queue is full");
            }
        }
        // Wait for the unit off this task: the link keeps serving meanwhile.
        tokio::spawn(report_unit_result(
            main,
            self.unit_result(id, "open-door", command.door, Outcome::Opened, None),
        ));
    }

    /// Door-unit settings: held as desired (on disk, surviving restarts) and pushed to the
    /// unit now; a unit that cannot take them now gets them when it is next reachable.
    async fn unit_settings(&mut self, command: UnitSettings, now: Timestamp) {
        let id = command.command_id.clone();
        let door = command.door.clone();
        let refused = if command.issued_at < self.started {
            Some("issued before the gateway started (a possible replay)".to_owned())
        } else if !self.router.serves(&door) {
            Some(format!("no door unit serves door {door:?}"))
        } else {
            self.replay
                .check_parts(
                    &CommandParts {
                        target: &command.target,
                        command_id: &command.command_id,
                        issued_at: command.issued_at,
                        expires_at: command.expires_at,
                    },
                    &self.spec.target,
                    now,
                )
                .err()
                .map(|e| e.to_string())
        };
        if let Some(reason) = refused {
            tracing::warn!(command_id = %id, %door, %reason, "settings command refused");
            self.record_refusal(Channel::Settings.suffix(), &reason)
                .await;
            self.publish_result(
                Some(id),
                "unit-settings",
                Outcome::Rejected,
                Some(reason),
                Some(door),
            );
            return;
        }
        let given = BusSettings {
            volume: command.volume,
            name: command.name,
            house_number: command.house_number,
            inner_door: command.inner_door,
        };
        let desired = match self.store.desire_settings(door.clone(), given).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(command_id = %id, error = %e, "settings not stored");
                self.publish_result(
                    Some(id),
                    "unit-settings",
                    Outcome::Rejected,
                    Some(format!("not stored: {e}")),
                    Some(door),
                );
                return;
            }
        };
        tracing::info!(command_id = %id, %door, settings = ?desired, "door-unit settings desired");
        self.router
            .update_settings(&door, |u| u.desired = Some(desired.clone()));
        let done = self
            .router
            .send_tracked(&door, BusCommand::Settings(desired));
        tokio::spawn(report_unit_result(
            done,
            self.unit_result(
                id,
                "unit-settings",
                door,
                Outcome::Done,
                Some("held as desired; pushed when the unit is next reachable"),
            ),
        ));
    }

    fn unit_result(
        &self,
        command_id: String,
        command: &'static str,
        door: String,
        done_as: Outcome,
        otherwise: Option<&'static str>,
    ) -> UnitResult {
        UnitResult {
            publisher: self.publisher.clone(),
            topic: self.spec.topics.topic(Channel::CommandResult),
            command_id,
            command,
            door,
            done_as,
            otherwise,
        }
    }

    fn publish_result(
        &self,
        command_id: Option<String>,
        command: &str,
        outcome: Outcome,
        reason: Option<String>,
        door: Option<String>,
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

/// Where and how to report a command carried out by a door unit.
struct UnitResult {
    publisher: Publisher,
    topic: String,
    command_id: String,
    command: &'static str,
    door: String,
    /// The outcome when the unit confirms it.
    done_as: Outcome,
    /// What happens when it does not (added to the reason).
    otherwise: Option<&'static str>,
}

/// Waits for the unit to carry out a command and tells the cloud how it ended.
async fn report_unit_result(
    done: Option<tokio::sync::oneshot::Receiver<CommandOutcome>>,
    r: UnitResult,
) {
    /// Why the command was not carried out: the unit cannot take it, or was not reached.
    enum Failed {
        Refused(&'static str),
        Unreached(&'static str),
    }
    let failed = match done {
        None => Some(Failed::Unreached(
            "no door unit serves that door, or its queue is full",
        )),
        Some(done) => match tokio::time::timeout(OPEN_RESULT_WAIT, done).await {
            Ok(Ok(CommandOutcome::Done)) => None,
            Ok(Ok(CommandOutcome::Unsupported)) => Some(Failed::Refused(
                "the door is served by an OSDP reader, which takes no such command",
            )),
            Ok(Ok(CommandOutcome::NoAnswer)) => {
                Some(Failed::Unreached("the door unit did not answer"))
            }
            Ok(Ok(CommandOutcome::Expired) | Err(_)) | Err(_) => Some(Failed::Unreached(
                "the door unit could not be reached in time",
            )),
        },
    };
    let (outcome, reason) = match failed {
        None => (r.done_as, None),
        Some(Failed::Refused(why)) => {
            tracing::warn!(command_id = %r.command_id, command = r.command, reason = why, "command refused");
            (Outcome::Rejected, Some(why.to_owned()))
        }
        Some(Failed::Unreached(why)) => {
            let reason = match r.otherwise {
                Some(then) => format!("{why}; {then}"),
                None => why.to_owned(),
            };
            tracing::warn!(command_id = %r.command_id, command = r.command, %reason, "command not carried out");
            (Outcome::Unreachable, Some(reason))
        }
    };
    let report = Report::CommandResult {
        command_id: Some(r.command_id),
        command: r.command.into(),
        outcome,
        reason,
        door: Some(r.door),
        at: Timestamp::now(),
    };
    let _ = r
        .publisher
        .try_publish(r.topic, false, report.encode(), None);
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
