//! The poller: owns rumqttc's event loop, forwards what arrives to the worker, matches broker
//! acks to upload batches, and fails over and backs off after a connection error.

use std::sync::{Arc, Mutex};

use rumqttc::{ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish};
use tokio::sync::{mpsc, watch};

use super::super::acks::{Ack, Correlator};
use super::super::failover::Failover;
use crate::cloud::status::LinkStatus;
use crate::task::jitter;

/// What the poller tells the worker.
pub(super) enum Polled {
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
pub(super) struct Uplinked {
    pub(super) correlator: Correlator,
    pub(super) acks: mpsc::UnboundedSender<Ack>,
    pub(super) connected: watch::Sender<bool>,
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
pub(super) async fn poll(
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
pub(super) fn address(options: &MqttOptions) -> String {
    let (host, port) = options.broker_address();
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
