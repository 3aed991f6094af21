//! Which broker the link tries next, and how long it waits first.
//!
//! `cloud.url` may list several brokers (the nodes of a cluster, a standby). The policy:
//!
//! - a failed connect or a lost connection moves to the **next** broker, **at once**: a dead
//!   node costs one refused connect, not a backoff;
//! - once every broker has failed in a row (a *round*), the link waits a jittered, doubling
//!   backoff from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`] before the next round, so a site whose
//!   brokers are all down does not hammer them, and a broker that returns is found within
//!   about `BACKOFF_MAX` (1.25 × with jitter);
//! - the backoff starts over only once a connection has **proved** itself: it stayed up for
//!   [`STABLE`] or delivered a message. A broker that accepts and then drops every connection
//!   (an overloaded node, a client-id fight) is backed off like a dead one.
//!
//! A message too big to read ([`Failover::poisoned`]) is a different failure: the broker is
//! alive and will send it again at every connect while the session persists, so the next
//! connect goes to the same broker with a clean session, at once the first time, with the
//! backoff if that happens again before the connection proved itself (a retained or repeated
//! oversized message).
//!
//! Pure: no I/O; the time is passed in.

use std::time::{Duration, Instant};

use crate::task::Backoff;

/// The first wait after a round of failures; doubled per round up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between rounds (before jitter of ±25 %).
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that stays up this long has proved itself: the backoff starts over.
pub const STABLE: Duration = Duration::from_secs(10);

/// What to do after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Next {
    /// The index of the broker to try.
    pub broker: usize,
    /// How long to wait before trying it (jitter not yet applied; zero: at once).
    pub wait: Duration,
}

/// The failover state of one link.
#[derive(Debug)]
pub struct Failover {
    brokers: usize,
    current: usize,
    /// Failures in a row since the last proved connection, in the current round.
    failed_in_round: usize,
    /// The waits between rounds.
    backoff: Backoff,
    /// When the current connection was accepted, while it has not proved itself yet.
    connected_at: Option<Instant>,
    /// An oversized message broke a connection that had not proved itself since.
    poisoned: bool,
}

impl Failover {
    /// A link with `brokers` brokers (at least one), starting with the first.
    pub fn new(brokers: usize) -> Failover {
        Failover {
            brokers: brokers.max(1),
            current: 0,
            failed_in_round: 0,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
            connected_at: None,
            poisoned: false,
        }
    }

    /// The broker in use or being tried.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The broker accepted the connection (CONNACK).
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection has proved itself (a message arrived): the backoff starts over.
    pub fn proved(&mut self) {
        if self.connected_at.take().is_some() {
            self.reset();
        }
    }

    fn reset(&mut self) {
        self.failed_in_round = 0;
        self.backoff.reset();
        self.poisoned = false;
    }

    /// Whether a connection accepted at `connected_at` proved itself by lasting until `now`.
    fn settle(&mut self, now: Instant) {
        if let Some(at) = self.connected_at.take()
            && now.duration_since(at) >= STABLE
        {
            self.reset();
        }
    }

    /// A connect failed, or the connection was lost, at `now`: try the next broker, at once
    /// while this round has brokers left, after the backoff once all have failed.
    pub fn failed(&mut self, now: Instant) -> Next {
        self.settle(now);
        self.failed_in_round += 1;
        self.current = (self.current + 1) % self.brokers;
        if self.failed_in_round < self.brokers {
            return Next {
                broker: self.current,
                wait: Duration::ZERO,
            };
        }
        self.failed_in_round = 0;
        Next {
            broker: self.current,
            wait: self.backoff.next_wait(),
        }
    }

    /// The broker sent a message too big to read, at `now`: reconnect to the same broker (with
    /// a clean session, which is the caller's part), at once unless this happened before
    /// the last such reconnect proved itself.
    pub fn poisoned(&mut self, now: Instant) -> Next {
        self.settle(now);
        let wait = if self.poisoned {
            self.backoff.next_wait()
        } else {
            self.poisoned = true;
            Duration::ZERO
        };
        Next {
            broker: self.current,
            wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn one_broker_backs_off_doubling_to_the_cap() {
        let t = Instant::now();
        let mut f = Failover::new(1);
        let waits: Vec<u64> = (0..8)
            .map(|_| f.failed(t).wait.as_millis().try_into().unwrap())
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]);
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn a_lost_broker_is_followed_by_the_next_at_once_and_a_round_by_the_backoff() {
        let t = Instant::now();
        let mut f = Failover::new(3);
        f.connected(t);
        // Connected for a minute to the first, then it dies: the second at once.
        assert_eq!(
            f.failed(at(t, 60)),
            Next {
                broker: 1,
                wait: Duration::ZERO
            }
        );
        // The second refuses too: the third at once.
        assert_eq!(f.failed(at(t, 60)).wait, Duration::ZERO);
        // The third as well: the round is over, back to the first after the backoff.
        assert_eq!(
            f.failed(at(t, 60)),
            Next {
                broker: 0,
                wait: BACKOFF_FIRST
            }
        );
        // The next round goes through all three again, then waits longer.
        assert_eq!(f.failed(at(t, 61)).wait, Duration::ZERO);
        assert_eq!(f.failed(at(t, 61)).wait, Duration::ZERO);
        assert_eq!(f.failed(at(t, 61)).wait, BACKOFF_FIRST * 2);
    }

    #[test]
    fn a_broker_that_drops_every_connection_is_backed_off_like_a_dead_one() {
        let t = Instant::now();
        let mut f = Failover::new(1);
        let mut waits = Vec::new();
        for i in 0..6 {
            f.connected(at(t, i));
            waits.push(f.failed(at(t, i)).wait);
        }
        assert_eq!(waits.last(), Some(&BACKOFF_MAX));
        // One that stays up long enough, or delivers a message, starts the backoff over.
        f.connected(at(t, 100));
        assert_eq!(f.failed(at(t, 100) + STABLE).wait, BACKOFF_FIRST);
        f.failed(at(t, 200));
        f.connected(at(t, 201));
        f.proved();
        assert_eq!(f.failed(at(t, 201)).wait, BACKOFF_FIRST);
    }

    #[test]
    fn an_oversized_message_reconnects_to_the_same_broker_at_once_then_backs_off() {
        let t = Instant::now();
        let mut f = Failover::new(3);
        f.connected(t);
        assert_eq!(
            f.poisoned(at(t, 1)),
            Next {
                broker: 0,
                wait: Duration::ZERO
            }
        );
        // Poisoned again on the clean connection (a retained or repeated message): backoff.
        f.connected(at(t, 1));
        assert_eq!(f.poisoned(at(t, 1)).wait, BACKOFF_FIRST);
        f.connected(at(t, 2));
        assert_eq!(f.poisoned(at(t, 2)).wait, BACKOFF_FIRST * 2);
        // Once a connection proved itself, the next one is again at once.
        f.connected(at(t, 3));
        f.proved();
        assert_eq!(f.poisoned(at(t, 4)).wait, Duration::ZERO);
    }
}
