//! A reference cloud over MQTT: publishes signed snapshots, deltas and commands on a gateway's
//! topics and receives what gateways report, for `cloud-sim`, the tests and the demo.
//!
//! [`CloudClient`] is a small client over `rumqttc` (plain TCP: `mqtt://host:port`; `mqtts`
//! is not supported here). It owns its event loop in a spawned task, so callers never poll it:
//! [`CloudClient::publish`] returns once the broker has acknowledged the message (`QoS` 1,
//! `PubAck`; a heartbeat goes at `QoS` 0 and returns once written),
//! [`CloudClient::subscribe`] once the broker has acknowledged the subscription
//! (`SubAck`), so nothing published after it returns is missed. The packet size limit is raised
//! both ways to a full envelope (128 KiB + 256 bytes) and 1 KiB for topic and header.
//!
//! The wire contract is `docs/cloud-protocol.md`; the tool is `docs/cloud-sim.md`.
//!
//! If the connection drops, the client stops: every pending and later call fails with
//! [`CloudError::Closed`] and subscription receivers end. There is no reconnection; a
//! reference cloud run from a shell or a test just starts again. The one long-running
//! consumer, `cloud-sim records`, uses [`super::durable::DurableSubscriber`] instead, which
//! reconnects and loses nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::build::SignedSnapshot;
use doorbridge::cloud::uplink::{Batch, MAX_BATCH_BYTES, Uploaded};
use doorbridge::store::Record;
use doorbridge::store::chain::{ChainedRecord, Finding, SignedHead, verify};
use doorbridge_proto::cloud::payload::MAX_ENVELOPE_BYTES;
use doorbridge_proto::cloud::report::Report;
use doorbridge_proto::cloud::topics::{Channel, Topics};

/// The largest MQTT packet sent or accepted: a full envelope plus topic and header.
pub const MAX_PACKET_BYTES: usize = MAX_ENVELOPE_BYTES + 1024;
/// How long [`CloudClient::connect`] waits for the broker's `ConnAck`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default MQTT port for `mqtt://` URLs without one.
pub const DEFAULT_PORT: u16 = 1883;

/// Why a cloud client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    #[error("bad broker URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("could not connect to the broker: {0}")]
    Connect(String),
    #[error("the connection to the broker is closed: {0}")]
    Closed(String),
    #[error("the broker refused the subscription to {0:?}")]
    SubscriptionRefused(String),
}

/// A message received on a subscription: its topic and payload.
pub type Message = (String, Vec<u8>);

/// Parses `mqtt://host[:port]` (or `tcp://`) into host and port.
pub fn parse_url(url: &str) -> Result<(String, u16), CloudError> {
    let bad = |reason: &str| CloudError::BadUrl {
        url: url.into(),
        reason: reason.into(),
    };
    if url.starts_with("mqtts://") || url.starts_with("ssl://") {
        return Err(bad(
            "cloud-sim speaks plain MQTT over TCP only (mqtt://host:port); use a local broker or a TLS proxy",
        ));
    }
    let Some(rest) = url.strip_prefix("mqtt://").or(url.strip_prefix("tcp://")) else {
        return Err(bad("expected mqtt://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') {
        return Err(bad("expected mqtt://host:port, without a path or user"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (
            host,
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
        ),
        _ => (rest, DEFAULT_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad("no host, or port 0"));
    }
    Ok((host.to_owned(), port))
}

type Waiter = oneshot::Sender<Result<(), CloudError>>;

/// How a client's first connection ended, as its event-loop task reports it on `ready`: at
/// most [`CONNECT_TIMEOUT`] after the start.
pub(crate) async fn connected(
    ready: oneshot::Receiver<Result<(), CloudError>>,
    url: &str,
) -> Result<(), CloudError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, ready).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(CloudError::Connect("the client stopped".into())),
        Err(_) => Err(CloudError::Connect(format!(
            "no answer from {url} within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Publish,
    /// A `QoS` 0 publish: nothing comes back, so it is done once written.
    Send,
    Subscribe,
}

/// What the event-loop task and the callers share.
#[derive(Default)]
struct State {
    /// Requests handed to rumqttc, in order, waiting for their packet id.
    queued: VecDeque<(Request, Waiter, String)>,
    /// Publishes sent, waiting for their `PubAck`.
    publishes: HashMap<u16, Waiter>,
    /// Subscriptions sent, waiting for their `SubAck` (with the filter, for the error).
    subscribes: HashMap<u16, (Waiter, String)>,
    /// Where incoming messages go.
    subscriptions: Vec<(String, mpsc::UnboundedSender<Message>)>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl State {
    /// Ends everything: every waiter fails, receivers end.
    fn close(&mut self, reason: &str) {
        self.closed.get_or_insert_with(|| reason.to_owned());
        let err = || Err(CloudError::Closed(reason.to_owned()));
        for (_, w, _) in self.queued.drain(..) {
            let _ = w.send(err());
        }
        for (_, w) in self.publishes.drain() {
            let _ = w.send(err());
        }
        for (_, (w, _)) in self.subscribes.drain() {
            let _ = w.send(err());
        }
        self.subscriptions.clear();
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A reference-cloud MQTT client. See the module documentation.
#[derive(Debug)]
pub struct CloudClient {
    client: AsyncClient,
    shared: Shared,
    /// Held while a request is queued, so the waiters' order is rumqttc's order.
    order: tokio::sync::Mutex<()>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("queued", &self.queued.len())
            .field("publishes", &self.publishes.len())
            .field("subscribes", &self.subscribes.len())
            .field("subscriptions", &self.subscriptions.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl CloudClient {
    /// Connects to the broker at `url` (`mqtt://host:port`) as `client_id` and waits for its
    /// `ConnAck` (at most [`CONNECT_TIMEOUT`]).
    pub async fn connect(url: &str, client_id: &str) -> Result<CloudClient, CloudError> {
        let (host, port) = parse_url(url)?;
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            // Upload batches may be as large as a gateway's cloud.max_payload allows.
            .set_max_packet_size(MAX_BATCH_BYTES + 1024, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        // Each publish waits for its PubAck: without this, Nagle adds a delayed ACK to each.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let shared: Shared = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(eventloop, Arc::clone(&shared), ready_tx));
        if let Err(e) = connected(ready_rx, url).await {
            task.abort();
            return Err(e);
        }
        Ok(CloudClient {
            client,
            shared,
            order: tokio::sync::Mutex::new(()),
            task,
        })
    }

    /// Hands one request to rumqttc with its waiter, in order.
    async fn request(
        &self,
        kind: Request,
        topic: &str,
        send: impl Future<Output = Result<(), rumqttc::ClientError>>,
    ) -> Result<oneshot::Receiver<Result<(), CloudError>>, CloudError> {
        let (tx, rx) = oneshot::channel();
        let _order = self.order.lock().await;
        {
            let mut state = lock(&self.shared);
            if let Some(reason) = &state.closed {
                return Err(CloudError::Closed(reason.clone()));
            }
            state.queued.push_back((kind, tx, topic.to_owned()));
        }
        if let Err(e) = send.await {
            lock(&self.shared).queued.pop_back();
            return Err(CloudError::Closed(e.to_string()));
        }
        Ok(rx)
    }

    /// Publishes `payload` on `topic` at `QoS` 1 and returns once the broker acknowledged it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), CloudError> {
        let rx = self
            .request(
                Request::Publish,
                topic,
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload),
            )
            .await?;
        self.wait(rx).await
    }

    /// Subscribes to `filter` (`QoS` 1) and returns, once the broker acknowledged it, a receiver
    /// of every message whose topic matches it.
    pub async fn subscribe(
        &self,
        filter: &str,
    ) -> Result<mpsc::UnboundedReceiver<Message>, CloudError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Registered first: retained messages arrive right after the `SubAck`.
        lock(&self.shared)
            .subscriptions
            .push((filter.to_owned(), tx));
        let ack = self
            .request(
                Request::Subscribe,
                filter,
                self.client.subscribe(filter, QoS::AtLeastOnce),
            )
            .await;
        let result = match ack {
            Ok(ack) => self.wait(ack).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            lock(&self.shared)
                .subscriptions
                .retain(|(f, _)| f != filter);
            return Err(e);
        }
        Ok(rx)
    }

    async fn wait(&self, rx: oneshot::Receiver<Result<(), CloudError>>) -> Result<(), CloudError> {
        rx.await.unwrap_or_else(|_| {
            Err(CloudError::Closed(
                lock(&self.shared)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "the client stopped".into()),
            ))
        })
    }

    /// Publishes a snapshot on the gateway's topics: the manifest first, then the chunks in
    /// index order, each acknowledged before the next.
    pub async fn publish_snapshot(
        &self,
        topics: &Topics,
        snapshot: &SignedSnapshot,
    ) -> Result<(), CloudError> {
        self.publish(
            &topics.topic(Channel::Manifest),
            snapshot.manifest.clone(),
            false,
        )
        .await?;
        let chunk_topic = topics.topic(Channel::Chunk);
        for chunk in &snapshot.chunks {
            self.publish(&chunk_topic, chunk.clone(), false).await?;
        }
        Ok(())
    }

    /// Publishes a sealed delta on the gateway's `keys/delta`.
    pub async fn publish_delta(&self, topics: &Topics, delta: Vec<u8>) -> Result<(), CloudError> {
        self.publish(&topics.topic(Channel::Delta), delta, false)
            .await
    }

    /// Publishes a sealed heartbeat on the gateway's `keys/heartbeat` at `QoS` 0, as the
    /// protocol asks (§5.1: never queued for an absent gateway); returns once it is written to
    /// the connection (there is no acknowledgement to wait for).
    pub async fn publish_heartbeat(
        &self,
        topics: &Topics,
        heartbeat: Vec<u8>,
    ) -> Result<(), CloudError> {
        let topic = topics.topic(Channel::Heartbeat);
        let rx = self
            .request(
                Request::Send,
                &topic,
                self.client
                    .publish(&topic, QoS::AtMostOnce, false, heartbeat),
            )
            .await?;
        self.wait(rx).await
    }

    /// Publishes a sealed command (open-door or resync) on its channel.
    pub async fn publish_command(
        &self,
        topics: &Topics,
        channel: Channel,
        command: Vec<u8>,
    ) -> Result<(), CloudError> {
        self.publish(&topics.topic(channel), command, false).await
    }

    /// Disconnects cleanly (after everything acknowledged so far) and stops the client.
    pub async fn disconnect(mut self) -> Result<(), CloudError> {
        let sent = self.client.disconnect().await;
        // The task ends once the Disconnect packet is flushed; bounded in case it is stuck.
        if tokio::time::timeout(CONNECT_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            return Err(CloudError::Closed("disconnect did not complete".into()));
        }
        sent.map_err(|e| CloudError::Closed(e.to_string()))
    }
}

impl Drop for CloudClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The event-loop task: polls rumqttc and settles waiters from its events.
async fn run(
    mut eventloop: EventLoop,
    shared: Shared,
    ready: oneshot::Sender<Result<(), CloudError>>,
) {
    let mut ready = Some(ready);
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) => {
                let reason = e.to_string();
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(CloudError::Connect(reason.clone())));
                }
                lock(&shared).close(&reason);
                return;
            }
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != ConnectReturnCode::Success {
                    let reason = format!("the broker refused the connection: {:?}", ack.code);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(CloudError::Connect(reason.clone())));
                    }
                    lock(&shared).close(&reason);
                    return;
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            // `QoS` 0 carries packet id 0 and gets no ack.
            Event::Outgoing(Outgoing::Publish(0)) => {
                let mut state = lock(&shared);
                if matches!(state.queued.front(), Some((Request::Send, ..)))
                    && let Some((_, waiter, _)) = state.queued.pop_front()
                {
                    let _ = waiter.send(Ok(()));
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut state = lock(&shared);
                // A retransmission keeps its waiter; only a first send takes the next one.
                if !state.publishes.contains_key(&pkid)
                    && let Some((Request::Publish, waiter, _)) = state.queued.pop_front()
                {
                    state.publishes.insert(pkid, waiter);
                }
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                let mut state = lock(&shared);
                if let Some((Request::Subscribe, waiter, filter)) = state.queued.pop_front() {
                    state.subscribes.insert(pkid, (waiter, filter));
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                lock(&shared).close("disconnected");
                return;
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(waiter) = lock(&shared).publishes.remove(&ack.pkid) {
                    let _ = waiter.send(Ok(()));
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if let Some((waiter, filter)) = lock(&shared).subscribes.remove(&ack.pkid) {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure));
                    let _ = waiter.send(if refused {
                        Err(CloudError::SubscriptionRefused(filter))
                    } else {
                        Ok(())
                    });
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let mut state = lock(&shared);
                state.subscriptions.retain(|(filter, tx)| {
                    if rumqttc::matches(&publish.topic, filter) {
                        tx.send((publish.topic.clone(), publish.payload.to_vec()))
                            .is_ok()
                    } else {
                        !tx.is_closed()
                    }
                });
            }
            _ => {}
        }
    }
}

/// A gateway → cloud message as one JSON object for printing:
/// `{"topic", "site", "gateway", "channel", "report"}`, where `report` is the decoded
/// [`Report`] or `{"undecodable": hex, "error": why}`. Site, gateway and channel are read
/// from the topic under `prefix` (null when it does not have that shape).
pub fn decode_report(prefix: &str, topic: &str, payload: &[u8]) -> Value {
    let (site, gateway, channel) = split_topic(prefix, topic);
    let decoded = if channel == Some(Channel::Records.suffix()) {
        Batch::decode(payload).map(|b| {
            json!({ "records": b.records.iter().map(|r| record_json(&b, r)).collect::<Vec<_>>() })
        })
    } else {
        Report::decode(payload).map(|r| serde_json::to_value(&r).unwrap_or(Value::Null))
    };
    let report = match decoded {
        Ok(value) => value,
        Err(e) => json!({ "undecodable": hex(payload), "error": e.to_string() }),
    };
    json!({
        "topic": topic,
        "site": site,
        "gateway": gateway,
        "channel": channel,
        "report": report,
    })
}

/// One uploaded record of `batch` as a JSON line: `{"gateway", "epoch", "seq", "class",
/// "record"}`.
pub fn record_json(batch: &Batch, r: &Uploaded) -> Value {
    json!({
        "gateway": batch.gateway,
        "epoch": batch.epoch,
        "seq": r.seq,
        "class": r.class,
        "record": r.record,
    })
}

/// What the reference cloud has received from gateways' uploads: each record once, by
/// `(gateway, epoch, seq)`, and what is missing.
#[derive(Debug, Default)]
pub struct RecordLedger {
    /// By gateway and epoch (a gateway's database), the seqs received.
    seen: HashMap<(String, u64), std::collections::BTreeSet<u64>>,
    /// Gateways whose record chain is verified (docs/cloud-protocol.md §12.6), by their
    /// enrolled public key.
    enrolled: HashMap<String, ed25519_dalek::VerifyingKey>,
    /// For those, by gateway and epoch, the records (their bytes and links) and signed heads.
    chains: HashMap<(String, u64), ChainBook>,
    duplicates: u64,
    /// Records the gateways reported dropping from a full outbox (`outbox_dropped`).
    reported_dropped: u64,
}

/// One gateway database's records as the chain check takes them (by seq), and its signed
/// heads.
type ChainBook = (
    std::collections::BTreeMap<i64, ChainedRecord>,
    Vec<SignedHead>,
);

/// A gateway's sequence numbers that never arrived, as inclusive ranges.
pub type Gaps = Vec<(u64, u64)>;

impl RecordLedger {
    /// Takes a batch; returns the records not seen before (duplicates are counted, not
    /// returned).
    pub fn add<'a>(&mut self, batch: &'a Batch) -> Vec<&'a Uploaded> {
        if self.enrolled.contains_key(&batch.gateway) {
            let (records, heads) = self
                .chains
                .entry((batch.gateway.clone(), batch.epoch))
                .or_default();
            if let Some(h) = &batch.head {
                heads.push(SignedHead {
                    seq: i64::try_from(h.seq).unwrap_or(i64::MAX),
                    chain: h.chain.0,
                    signature: h.signature,
                });
            }
            for r in &batch.records {
                let seq = i64::try_from(r.seq).unwrap_or(i64::MAX);
                // The first copy, unless it came without its link (a resend by another
                // sender) and this one has it.
                if records
                    .get(&seq)
                    .is_none_or(|held| held.chain.is_none() && r.chain.is_some())
                {
                    records.insert(
                        seq,
                        ChainedRecord {
                            seq,
                            // The bytes as this build stores them: the reference cloud
                            // decodes the batch, so it hashes the re-encoding (a real cloud
                            // hashes the record's bytes as received, §12.6).
                            body: r.record.to_cbor(),
                            chain: r.chain.map(|c| c.0),
                        },
                    );
                }
            }
        }
        let seen = self
            .seen
            .entry((batch.gateway.clone(), batch.epoch))
            .or_default();
        let mut new = Vec::new();
        for r in &batch.records {
            if seen.insert(r.seq) {
                if let Record::OutboxDropped {
                    telemetry,
                    activity,
                    ..
                } = r.record
                {
                    self.reported_dropped += telemetry + activity;
                }
                new.push(r);
            } else {
                self.duplicates += 1;
            }
        }
        new
    }

    /// Takes one record by id (e.g. read back from a JSON-lines file); true when new.
    pub fn add_id(&mut self, gateway: &str, epoch: u64, seq: u64) -> bool {
        let new = self
            .seen
            .entry((gateway.to_owned(), epoch))
            .or_default()
            .insert(seq);
        if !new {
            self.duplicates += 1;
        }
        new
    }

    /// Verifies `gateway`'s record chain against its enrolled public key from now on.
    pub fn enrol(&mut self, gateway: &str, key: ed25519_dalek::VerifyingKey) {
        self.enrolled.insert(gateway.to_owned(), key);
    }

    /// For each enrolled gateway (`gateway@epoch`), the breaks in its record chain.
    pub fn chain_findings(&self) -> Vec<(String, Vec<Finding>)> {
        let mut out: Vec<(String, Vec<Finding>)> = self
            .chains
            .iter()
            .filter_map(|((gateway, epoch), (records, heads))| {
                let key = self.enrolled.get(gateway)?;
                let records: Vec<ChainedRecord> = records.values().cloned().collect();
                let found = verify(&records, heads, i64::try_from(*epoch).ok()?, key);
                (!found.is_empty()).then(|| (format!("{gateway}@{epoch}"), found))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The epochs records arrived under, over all gateways, lowest first.
    pub fn epochs(&self) -> Vec<u64> {
        let mut e: Vec<u64> = self.seen.keys().map(|(_, e)| *e).collect();
        e.sort_unstable();
        e.dedup();
        e
    }

    /// Distinct records received, over all gateways.
    pub fn unique(&self) -> u64 {
        self.seen.values().map(|s| s.len() as u64).sum()
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn reported_dropped(&self) -> u64 {
        self.reported_dropped
    }

    /// Whether `gateway`'s record `seq` arrived (in any epoch).
    pub fn has(&self, gateway: &str, seq: u64) -> bool {
        self.seen
            .iter()
            .any(|((g, _), s)| g == gateway && s.contains(&seq))
    }

    /// Per gateway (and epoch, shown as `gateway@epoch` when a gateway has several), the
    /// sequence numbers missing between the lowest and the highest received (records still on
    /// their way, or lost: a gateway's `seq` has no holes of its own making except records it
    /// reported dropping).
    pub fn gaps(&self) -> Vec<(String, Gaps)> {
        let mut out = Vec::new();
        for ((gateway, epoch), seqs) in &self.seen {
            let several = self.seen.keys().filter(|(g, _)| g == gateway).count() > 1;
            let gateway = if several {
                format!("{gateway}@{epoch}")
            } else {
                gateway.clone()
            };
            let mut gaps = Vec::new();
            let mut prev: Option<u64> = None;
            for &s in seqs {
                if let Some(p) = prev
                    && s > p + 1
                {
                    gaps.push((p + 1, s - 1));
                }
                prev = Some(s);
            }
            if !gaps.is_empty() {
                out.push((gateway, gaps));
            }
        }
        out.sort();
        out
    }

    /// One line: how many, duplicates, and the gaps.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let gaps = self.gaps();
        let missing: u64 = gaps
            .iter()
            .flat_map(|(_, g)| g.iter().map(|(a, b)| b - a + 1))
            .sum();
        let mut line = self.received();
        if missing == 0 {
            line.push_str(", no gaps");
        } else {
            let _ = write!(line, ", {missing} missing:");
            for (gateway, g) in &gaps {
                for (a, b) in g.iter().take(10) {
                    if a == b {
                        let _ = write!(line, " {gateway}#{a}");
                    } else {
                        let _ = write!(line, " {gateway}#{a}-{b}");
                    }
                }
            }
        }
        if !self.enrolled.is_empty() {
            let findings = self.chain_findings();
            if findings.is_empty() {
                line.push_str("; record chain intact");
            } else {
                line.push_str("; record chain broken:");
                for (gateway, found) in &findings {
                    for f in found.iter().take(10) {
                        let _ = write!(line, " {gateway}: {f};");
                    }
                }
            }
        }
        line
    }

    /// What arrived, without a word on gaps: how many, from how many gateways, duplicates, and
    /// what the gateways reported dropping. For a consumer that sees only part of the stream
    /// (a member of a shared subscription), where a gap may be another member's share.
    pub fn received(&self) -> String {
        use std::fmt::Write as _;
        let mut line = format!(
            "{} records from {} gateway(s), {} duplicates",
            self.unique(),
            self.seen
                .keys()
                .map(|(g, _)| g)
                .collect::<std::collections::HashSet<_>>()
                .len(),
            self.duplicates
        );
        if self.reported_dropped > 0 {
            let _ = write!(
                line,
                ", {} reported dropped by a full outbox",
                self.reported_dropped
            );
        }
        line
    }
}

/// `{prefix}/{site}/{gateway}/{channel…}` → its parts.
fn split_topic<'a>(
    prefix: &str,
    topic: &'a str,
) -> (Option<&'a str>, Option<&'a str>, Option<&'a str>) {
    let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return (None, None, None);
    };
    let mut parts = rest.splitn(3, '/');
    (parts.next(), parts.next(), parts.next())
}

/// Lower-case hex of `bytes`.
pub use doorbridge_proto::access::credential::to_hex as hex;

#[cfg(test)]
mod tests {
    use super::*;
    use doorbridge_proto::cloud::report::Presence;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://localhost:1884").unwrap(),
            ("localhost".into(), 1884)
        );
        assert_eq!(parse_url("mqtt://broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(
            parse_url("tcp://127.0.0.1:9/").unwrap(),
            ("127.0.0.1".into(), 9)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1883").unwrap(),
            ("::1".into(), 1883)
        );
        for bad in [
            "mqtts://b:8883",
            "http://b",
            "mqtt://:1",
            "mqtt://b:x",
            "mqtt://b/p",
            "mqtt://b:0",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(
            parse_url("mqtts://b")
                .unwrap_err()
                .to_string()
                .contains("plain MQTT")
        );
    }

    #[test]
    fn reports_decode_to_json_with_their_topic_parts() {
        let report = Report::State {
            state: Presence::Online,
            gateway: "gw1".into(),
            held: Some(7),
            identity: None,
        };
        let v = decode_report("doorbridge", "doorbridge/s1/gw1/state", &report.encode());
        assert_eq!(
            v,
            json!({"topic": "doorbridge/s1/gw1/state", "site": "s1", "gateway": "gw1",
                   "channel": "state",
                   "report": {"type": "state", "state": "online", "gateway": "gw1", "held": 7}})
        );
        let v = decode_report("a/b", "a/b/s1/gw1/cmd/result", &[0xff, 0x00]);
        assert_eq!(v["channel"], "cmd/result");
        assert_eq!(v["report"]["undecodable"], "ff00");
        let v = decode_report("doorbridge", "other/s1/gw1/state", b"");
        assert_eq!(v["site"], Value::Null);
    }
}
