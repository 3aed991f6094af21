//! A subscriber that rides out broker outages without losing a message, for `cloud-sim records`
//! (protocol §12.4: what a cloud's consumer of uploaded records must do).
//!
//! [`DurableSubscriber`] holds a **persistent session** (clean session off, one client id for
//! its whole life), so the broker queues `QoS` 1 messages while it is away, and it
//! **acknowledges a message only when told to** ([`DurableSubscriber::ack`]), so the caller acks
//! after it has written the message out: a message in flight when the connection drops is
//! delivered again, not lost. When the connection drops it says so ([`Update::Lost`]) and
//! reconnects with a jittered backoff from [`BACKOFF_FIRST`] doubling to [`BACKOFF_MAX`], then
//! says so again ([`Update::Regained`]) and subscribes again if the broker forgot the session.
//! Only the first connection must succeed: a typo in the URL fails at once, an outage later is
//! waited out.
//!
//! What arrives twice (a redelivery after a reconnect, a gateway's resend) is the caller's to
//! deduplicate: `RecordLedger` does for records.
//!
//! Plain MQTT over TCP (`mqtt://host:port`), like [`super::cloud::CloudClient`], whose URL
//! parsing and packet limits it shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::cloud::{CloudClient, CloudError, MAX_PACKET_BYTES, connected, parse_url};
use doorbridge::cloud::uplink::MAX_BATCH_BYTES;
use doorbridge::task::{Backoff, jitter};

/// The first wait after a lost connection; doubled after each failed attempt.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between attempts: a broker that returns is found within seconds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the client pings an idle broker; a connection dead without a FIN is noticed
/// within one and a half of these.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long [`DurableSubscriber::close`] waits for each of its steps.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the subscriber reports, in order.
#[derive(Debug)]
pub enum Update {
    /// A message on the subscription; pass it to [`DurableSubscriber::ack`] once it is handled.
    Message(Delivery),
    /// The connection dropped (why); the subscriber is reconnecting.
    Lost(String),
    /// Connected again. `session_present` false means the broker forgot the session (it
    /// restarted without persistence, or expired it): what it queued meanwhile is gone.
    Regained { session_present: bool },
    /// The broker refused the subscription when it was renewed after a reconnect; nothing more
    /// will arrive.
    Refused(String),
}

/// One message, with what its acknowledgement needs.
#[derive(Debug)]
pub struct Delivery {
    publish: Publish,
    /// The connection it came on (see [`DurableSubscriber::ack`]).
    connection: u64,
}

impl Delivery {
    pub fn topic(&self) -> &str {
        &self.publish.topic
    }

    pub fn payload(&self) -> &[u8] {
        &self.publish.payload
    }
}

/// A durable `QoS` 1 subscriber. See the module documentation.
#[derive(Debug)]
pub struct DurableSubscriber {
    client: AsyncClient,
    updates: mpsc::UnboundedReceiver<Update>,
    /// The number of the live connection, 0 while there is none.
    connection: Arc<AtomicU64>,
    task: JoinHandle<()>,
    url: String,
    client_id: String,
}

impl DurableSubscriber {
    /// Connects to `url` as `client_id` with a persistent session and subscribes to `filter`
    /// (`QoS` 1); returns once the broker has acknowledged the subscription. Fails if the broker
    /// cannot be reached, refuses the connection or the subscription, within
    /// [`CONNECT_TIMEOUT`](super::cloud::CONNECT_TIMEOUT).
    pub async fn connect(
        url: &str,
        client_id: &str,
        filter: &str,
    ) -> Result<DurableSubscriber, CloudError> {
        let (host, port) = parse_url(url)?;
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(KEEP_ALIVE)
            // The broker keeps the subscription and queues messages while this is away.
            .set_clean_session(false)
            // A message is acked after the caller has handled it, not on arrival.
            .set_manual_acks(true)
            .set_max_packet_size(MAX_BATCH_BYTES + 1024, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let connection = Arc::new(AtomicU64::new(0));
        let (tx, updates) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            eventloop,
            Poller {
                client: client.clone(),
                filter: filter.to_owned(),
                connection: Arc::clone(&connection),
                updates: tx,
                ready: Some(ready_tx),
            },
        ));
        if let Err(e) = connected(ready_rx, url).await {
            task.abort();
            return Err(e);
        }
        Ok(DurableSubscriber {
            client,
            updates,
            connection,
            task,
            url: url.to_owned(),
            client_id: client_id.to_owned(),
        })
    }

    /// The next update; `None` once the subscriber has stopped.
    pub async fn next(&mut self) -> Option<Update> {
        self.updates.recv().await
    }

    /// Acknowledges `delivery` to the broker: call it once the message is handled (written
    /// out), never before, so that a cut in between means a redelivery, not a loss.
    ///
    /// A delivery from a connection that has dropped since is not acknowledged: the broker
    /// sends it again on the new connection (same session, same packet id) and that copy is
    /// acked. An ack for an old connection's packet id must not reach a session that the
    /// broker started afresh, where the id may name another message. (rumqttc itself drops
    /// the acks still queued when a connection fails.)
    pub async fn ack(&self, delivery: &Delivery) -> Result<(), CloudError> {
        if delivery.connection != self.connection.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.client
            .ack(&delivery.publish)
            .await
            .map_err(|e| CloudError::Closed(e.to_string()))
    }

    /// Ends the connection, after the acks given so far. With `forget_session` the broker is
    /// then told to drop the session (a clean-session connect under the same id), so that it
    /// stops queueing for a client id that will not come back; otherwise the session stays
    /// and the next subscriber under this id receives what arrives meanwhile. Best effort,
    /// bounded: a broker that is away keeps the session.
    pub async fn close(mut self, forget_session: bool) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.client.disconnect().await.is_ok() {
                let _ = (&mut self.task).await;
            }
        })
        .await;
        self.task.abort();
        if forget_session {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                if let Ok(clean) = CloudClient::connect(&self.url, &self.client_id).await {
                    let _ = clean.disconnect().await;
                }
            })
            .await;
        }
    }
}

impl Drop for DurableSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the event-loop task holds besides the event loop.
struct Poller {
    client: AsyncClient,
    filter: String,
    connection: Arc<AtomicU64>,
    updates: mpsc::UnboundedSender<Update>,
    /// Until the first subscription is acknowledged: where [`DurableSubscriber::connect`] waits.
    ready: Option<oneshot::Sender<Result<(), CloudError>>>,
}

impl Poller {
    /// Before the first `SubAck`, fails [`DurableSubscriber::connect`] and returns true;
    /// afterwards returns false (the outage is to be ridden out).
    fn fail_start(&mut self, error: CloudError) -> bool {
        match self.ready.take() {
            Some(ready) => {
                let _ = ready.send(Err(error));
                true
            }
            None => false,
        }
    }

    /// Sends a subscription request without blocking the task that drains the request queue.
    fn subscribe(&self) {
        let (client, filter) = (self.client.clone(), self.filter.clone());
        tokio::spawn(async move { client.subscribe(filter, QoS::AtLeastOnce).await });
    }
}

/// The event-loop task: polls rumqttc, forwards messages and connection changes, reconnects.
async fn run(mut eventloop: EventLoop, mut p: Poller) {
    let mut numbered = 0u64;
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
    // Whether the broker has acknowledged the subscription in the current session.
    let mut subscribed = false;
    // Whether the connection was up when the last error came (so a failed attempt during an
    // outage is not reported as another loss).
    let mut up = false;
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(e) => {
                p.connection.store(0, Ordering::SeqCst);
                let reason = match e {
                    rumqttc::ConnectionError::ConnectionRefused(code) => {
                        format!("the broker refused the connection: {code:?}")
                    }
                    e => e.to_string(),
                };
                if p.fail_start(CloudError::Connect(reason.clone())) {
                    return;
                }
                if std::mem::take(&mut up) && p.updates.send(Update::Lost(reason)).is_err() {
                    return;
                }
                // Backoff between attempts, so a broker that is down is not hammered.
                tokio::time::sleep(jitter(backoff.next_wait())).await;
                continue;
            }
        };
        match event {
            // A refusal comes as an error (`ConnectionRefused`), so this is a success.
            Event::Incoming(Packet::ConnAck(ack)) => {
                numbered += 1;
                p.connection.store(numbered, Ordering::SeqCst);
                up = true;
                backoff.reset();
                if !ack.session_present {
                    subscribed = false;
                }
                if !subscribed {
                    p.subscribe();
                }
                if p.ready.is_none()
                    && p.updates
                        .send(Update::Regained {
                            session_present: ack.session_present,
                        })
                        .is_err()
                {
                    return;
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                if refused {
                    let error = CloudError::SubscriptionRefused(p.filter.clone());
                    if !p.fail_start(error.clone()) {
                        let _ = p.updates.send(Update::Refused(error.to_string()));
                    }
                    return;
                }
                subscribed = true;
                if let Some(ready) = p.ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let delivery = Delivery {
                    publish,
                    connection: numbered,
                };
                if p.updates.send(Update::Message(delivery)).is_err() {
                    return;
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return,
            _ => {}
        }
    }
}
