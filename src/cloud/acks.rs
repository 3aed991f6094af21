//! Which broker `PubAck` belongs to which upload batch.
//!
//! rumqttc's `publish` returns no packet id; the event loop later says
//! `Outgoing::Publish(pkid)` when it writes a request and `Incoming::PubAck(pkid)` when the
//! broker has it. Requests leave the client's channel in the order they were queued, so the
//! n-th new `Outgoing::Publish` is the n-th queued publish. [`Publisher`] records, under one
//! lock with the queueing itself, a tag per publish (the upload batch id, or `None` for a
//! report); [`Correlator`], owned by the poller, pops the tags as the event loop writes the
//! packets and maps packet ids to batches.
//!
//! Three things break plain FIFO order, and each is handled:
//! - a **resend** after a reconnect carries its old packet id: a packet id already in flight is
//!   not a new publish;
//! - a **collision** (`Outgoing::AwaitAck`) holds a publish back until an older packet id is
//!   acknowledged; it is popped then and written later under the same id;
//! - a **lost connection**: rumqttc keeps unacknowledged publishes to resend, but forgets
//!   them all if the broker comes back without our session, and it cannot tell us which. So
//!   [`Correlator::connection_lost`] takes every publish out of rumqttc's resend queue,
//!   reports the batches among them as lost (the uplink sends them again from the outbox, with
//!   the same record ids) and leaves rumqttc nothing it could drop silently. Reports in flight
//!   at that moment are dropped: they are best effort, and the `online` state sent on every
//!   connect names the held version again.
//!
//! See `docs/cloud-protocol.md` §12.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use rumqttc::{AsyncClient, ClientError, Event, Outgoing, Packet, QoS, Request};

/// An upload batch's id, unique within the process.
pub type BatchId = u64;

/// Publishes through rumqttc's client and remembers, in queue order, what each publish was.
#[derive(Clone, Debug)]
pub struct Publisher {
    client: AsyncClient,
    order: Arc<Mutex<VecDeque<Option<BatchId>>>>,
}

impl Publisher {
    pub fn new(client: AsyncClient) -> Self {
        Publisher {
            client,
            order: Arc::default(),
        }
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Queues a `QoS` 1 publish without waiting; `batch` tags an upload batch so its broker ack
    /// finds its way back. Fails when rumqttc's request queue is full or closed.
    pub fn try_publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        batch: Option<BatchId>,
    ) -> Result<(), ClientError> {
        let mut order = lock(&self.order);
        order.push_back(batch);
        let queued = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload);
        if queued.is_err() {
            // Ours is the last tag: the lock kept every other publisher out meanwhile.
            order.pop_back();
        }
        queued
    }
}

type Order = Arc<Mutex<VecDeque<Option<BatchId>>>>;

fn lock(order: &Order) -> std::sync::MutexGuard<'_, VecDeque<Option<BatchId>>> {
    order.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the correlator learned from one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// The broker acknowledged this batch.
    Acked(BatchId),
    /// These batches will not be acknowledged on this connection: send them again.
    Lost(Vec<BatchId>),
}

/// The poller's side: packet ids in flight and what they carry.
#[derive(Debug)]
pub struct Correlator {
    /// The publisher's tags, in queue order.
    order: Order,
    inflight: HashMap<u16, Option<BatchId>>,
    /// A publish held back by a packet-id collision: its id and tag.
    collided: Option<(u16, Option<BatchId>)>,
}

impl Correlator {
    pub fn new(publisher: Publisher) -> Self {
        Correlator {
            order: publisher.order,
            inflight: HashMap::new(),
            collided: None,
        }
    }

    /// Follows one event of the event loop; returns a batch the broker acknowledged.
    pub fn on_event(&mut self, event: &Event) -> Option<BatchId> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let order = Arc::clone(&self.order);
                self.written(*pkid, &mut lock(&order));
                None
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let tag = lock(&self.order).pop_front().flatten();
                self.collided = Some((*pkid, tag));
                None
            }
            Event::Incoming(Packet::PubAck(ack)) => self.inflight.remove(&ack.pkid).flatten(),
            _ => None,
        }
    }

    fn written(&mut self, pkid: u16, order: &mut VecDeque<Option<BatchId>>) {
        // QoS 0 has no id and no ack; ours are all QoS 1, but stay correct if one is not.
        if pkid == 0 || self.inflight.contains_key(&pkid) {
            return; // a resend of a publish already followed
        }
        let tag = match self.collided.take() {
            Some((id, tag)) if id == pkid => tag,
            other => {
                self.collided = other;
                order.pop_front().flatten()
            }
        };
        self.inflight.insert(pkid, tag);
    }

    /// After the event loop returned an error (it has moved its unacknowledged publishes and
    /// the requests it had not taken yet into `pending`): takes every publish out of rumqttc's
    /// hands. Returns the batches acknowledged by events still buffered from the old
    /// connection, and those that must be sent again. See the module header.
    pub fn connection_lost(
        &mut self,
        pending: &mut VecDeque<Request>,
        events: &mut VecDeque<Event>,
        collision: &mut Option<rumqttc::Publish>,
    ) -> (Vec<BatchId>, Vec<BatchId>) {
        let order_lock = Arc::clone(&self.order);
        let mut order = lock(&order_lock);
        let mut acked = Vec::new();
        // Events of the old connection not yet handed out: follow them first, in order.
        events.retain(|event| match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                self.written(*pkid, &mut order);
                false
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let tag = order.pop_front().flatten();
                self.collided = Some((*pkid, tag));
                false
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                acked.extend(self.inflight.remove(&ack.pkid).flatten());
                false
            }
            _ => true,
        });
        // Requests taken from the channel but never written are next in `order`.
        let unsent = pending
            .iter()
            .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0))
            .count();
        let unsent = unsent.min(order.len());
        let mut lost: Vec<BatchId> = order.drain(..unsent).flatten().collect();
        pending.retain(|r| !matches!(r, Request::Publish(_)));
        *collision = None;
        lost.extend(self.inflight.drain().filter_map(|(_, tag)| tag));
        lost.extend(self.collided.take().and_then(|(_, tag)| tag));
        lost.sort_unstable();
        (acked, lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{MqttOptions, PubAck};

    fn publisher() -> (Publisher, rumqttc::EventLoop) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "localhost", 1), 16);
        (Publisher::new(client), eventloop)
    }

    fn written(pkid: u16) -> Event {
        Event::Outgoing(Outgoing::Publish(pkid))
    }

    fn puback(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(pkid)))
    }

    #[test]
    fn acks_find_their_batches_in_queue_order_and_reports_are_skipped() {
        let (p, _el) = publisher();
        let mut c = Correlator::new(p.clone());
        p.try_publish("r".into(), false, vec![1], None).unwrap();
        p.try_publish("b".into(), false, vec![2], Some(7)).unwrap();
        p.try_publish("b".into(), false, vec![3], Some(8)).unwrap();
        for pkid in 1..=3 {
            assert_eq!(c.on_event(&written(pkid)), None);
        }
        // The broker may acknowledge out of order.
        assert_eq!(c.on_event(&puback(3)), Some(8));
        assert_eq!(c.on_event(&puback(1)), None, "a report");
        assert_eq!(c.on_event(&puback(2)), Some(7));
        assert_eq!(c.on_event(&puback(2)), None, "an ack counts once");
    }

    #[test]
    fn a_resend_keeps_its_batch_and_a_collision_waits_for_its_id() {
        let (p, _el) = publisher();
        let mut c = Correlator::new(p.clone());
        p.try_publish("b".into(), false, vec![], Some(1)).unwrap();
        p.try_publish("b".into(), false, vec![], Some(2)).unwrap();
        p.try_publish("b".into(), false, vec![], Some(3)).unwrap();
        c.on_event(&written(1));
        c.on_event(&written(1)); // sent again after a reconnect: not a new publish
        // Batch 2 wants id 1 while it is still in flight.
        c.on_event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        assert_eq!(c.on_event(&puback(1)), Some(1));
        c.on_event(&written(1)); // batch 2, now written under id 1
        c.on_event(&written(2)); // batch 3
        assert_eq!(c.on_event(&puback(2)), Some(3));
        assert_eq!(c.on_event(&puback(1)), Some(2));
    }

    #[test]
    fn a_lost_connection_returns_every_batch_rumqttc_held_and_keeps_queued_ones() {
        let (p, _el) = publisher();
        let mut c = Correlator::new(p.clone());
        for b in 1..=4 {
            p.try_publish("b".into(), false, vec![], Some(b)).unwrap();
        }
        c.on_event(&written(1)); // batch 1 in flight
        // The event loop failed: batch 1 waits to be resent, batch 2 was taken from the
        // channel but never written, and batches 3 and 4 are still in the client's channel.
        let mut pending: VecDeque<Request> = VecDeque::new();
        let mut resend = rumqttc::Publish::new("b", QoS::AtLeastOnce, vec![]);
        resend.pkid = 1;
        pending.push_back(Request::Publish(resend));
        pending.push_back(Request::Publish(rumqttc::Publish::new(
            "b",
            QoS::AtLeastOnce,
            vec![],
        )));
        pending.push_back(Request::PingReq(rumqttc::PingReq));
        let mut events = VecDeque::new();
        let (acked, lost) = c.connection_lost(&mut pending, &mut events, &mut None);
        assert!(acked.is_empty());
        assert_eq!(lost, [1, 2]);
        assert_eq!(pending.len(), 1, "only the ping is left to rumqttc");
        // After the reconnect, the queued batches come out in order with fresh ids.
        c.on_event(&written(2));
        c.on_event(&written(3));
        assert_eq!(c.on_event(&puback(3)), Some(4));
        assert_eq!(c.on_event(&puback(2)), Some(3));
    }

    #[test]
    fn events_buffered_from_the_old_connection_are_followed_first() {
        let (p, _el) = publisher();
        let mut c = Correlator::new(p.clone());
        p.try_publish("b".into(), false, vec![], Some(1)).unwrap();
        p.try_publish("b".into(), false, vec![], Some(2)).unwrap();
        c.on_event(&written(1));
        // Batch 1's ack and batch 2's write were read before the error but not yet handed out.
        let mut events: VecDeque<Event> = [puback(1), written(2)].into();
        let (acked, lost) = c.connection_lost(&mut VecDeque::new(), &mut events, &mut None);
        assert_eq!(acked, [1]);
        assert_eq!(lost, [2]);
        assert!(events.is_empty());
    }
}
