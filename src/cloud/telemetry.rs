//! The telemetry summary: the latest battery reading of every door unit and the gateway's
//! health, sent on the `telemetry` topic every `telemetry.interval` (default 15 minutes), at
//! once when a unit's battery falls to the low threshold, and on every connect.
//!
//! A summary is a picture of now, superseded by the next one, so it is published directly and
//! never written to disk: an idle gateway writes nothing. What must not be lost is in the
//! outbox already (every battery reading, the low-battery alarm).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::{Notify, watch};

use super::acks::Publisher;
use super::status::LinkStatus;
pub use super::summary::{BusHealth, ChainHealth, ClockHealth, KeySetHealth, Summary, UnitHealth};
use crate::access::DoorId;
use crate::drivers::bus::BusStatus;
use crate::ids::UnitId;
use crate::store::{Reader, Store, StoreError};
use crate::task::{clock_synced, stopped};

/// One bus as telemetry sees it.
#[derive(Clone, Debug)]
pub struct BusProbe {
    pub name: String,
    pub status: Arc<Mutex<BusStatus>>,
    /// The configured units: address and door.
    pub units: Vec<(u8, DoorId)>,
}

/// What the telemetry task runs with.
#[derive(Clone, Debug)]
pub struct TelemetrySpec {
    pub interval: Duration,
    pub low_battery_percent: u8,
    /// How far behind the trusted-time mark the clock may be and still be trusted.
    pub clock_tolerance: Duration,
    pub buses: Vec<BusProbe>,
    /// When the daemon started.
    pub started: Instant,
}

impl TelemetrySpec {
    /// A spec with no buses (tests, tools).
    pub fn new(interval: Duration) -> Self {
        TelemetrySpec {
            interval,
            low_battery_percent: 20,
            clock_tolerance: Duration::from_secs(2),
            buses: Vec::new(),
            started: Instant::now(),
        }
    }
}

/// Builds a summary from the store's figures and the buses' status.
fn summarize(
    spec: &TelemetrySpec,
    gateway: &str,
    link: &LinkStatus,
    stored: Result<(crate::store::KeySetInfo, u64, Option<Timestamp>), StoreError>,
    (now, synced): (Timestamp, bool),
) -> Summary {
    let (keyset, outbox_depth, mark) = match stored {
        Ok((set, depth, mark)) => (
            Some(KeySetHealth {
                version: set.version,
                keys: set.keys,
                issued_at: set.issued_at,
                age_s: set.issued_at.map(|t| seconds_since(t, now)),
                known_at: set.freshness.known_at,
                known_age_s: set.freshness.known_at.map(|t| seconds_since(t, now)),
                stale: set.freshness.stale(now),
            }),
            Some(depth),
            mark,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "telemetry: the store's figures cannot be read");
            (None, None, None)
        }
    };
    let tolerance = jiff::SignedDuration::try_from(spec.clock_tolerance).unwrap_or_default();
    let buses = spec
        .buses
        .iter()
        .map(|probe| {
            let status = probe.status.lock().map(|s| s.clone()).unwrap_or_default();
            let counters = status.stats;
            BusHealth {
                name: probe.name.clone(),
                port_open: status.port_open,
                reopens: status.reopens,
                timeouts: counters.timeouts,
                retransmits: counters.retransmits,
                errors: counters.frame_errors() + counters.bad_messages,
                units: probe
                    .units
                    .iter()
                    .map(|(address, door)| {
                        let u = status.units.get(address).cloned().unwrap_or_default();
                        UnitHealth {
                            unit: UnitId::on(&probe.name, address),
                            door: door.clone(),
                            online: u.online,
                            last_seen: u.last_seen,
                            battery_percent: u.battery.map(|b| b.0),
                            battery_millivolts: u.battery.map(|b| b.1),
                            battery_at: u.battery.map(|b| b.2),
                            battery_low: u.battery.is_some_and(|b| b.0 <= spec.low_battery_percent),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    Summary {
        chain: None,
        gateway: gateway.to_owned(),
        at: now,
        uptime_s: spec.started.elapsed().as_secs(),
        keyset,
        last_sync: link.last_sync,
        outbox_depth,
        clock: ClockHealth {
            synced,
            // The decision's own rule (`store::writer`): synchronised, or not further behind
            // the mark than the tolerance; with neither a mark nor NTP, not trusted.
            trusted: synced || mark.is_some_and(|m| now >= m - tolerance),
            mark,
        },
        buses,
    }
}

/// Whole seconds from `t` to `now`; 0 when `t` lies ahead.
fn seconds_since(t: Timestamp, now: Timestamp) -> u64 {
    u64::try_from(now.duration_since(t).as_secs()).unwrap_or(0)
}

/// The gateway's health now: the store's figures, the link's and the buses' status.
pub async fn snapshot(
    spec: &TelemetrySpec,
    gateway: &str,
    store: &Store,
    link: &Mutex<LinkStatus>,
) -> Summary {
    let stored = store
        .read(|r: &Reader| Ok((r.key_set()?, r.outbox_depth()?, r.trusted_time()?)))
        .await;
    let status = link.lock().map(|s| s.clone()).unwrap_or_default();
    let mut summary = summarize(
        spec,
        gateway,
        &status,
        stored,
        (Timestamp::now(), clock_synced()),
    );
    summary.chain = signed_head(store).await;
    summary
}

/// The chain head, signed now by the identity next to the database (if there is one).
async fn signed_head(store: &Store) -> Option<ChainHealth> {
    use crate::access::credential::to_hex;
    use crate::store::chain::Identity;
    let identity = Identity::load_existing(&Identity::state_dir(store.path()))?;
    let (epoch, (seq, head)) = store
        .read(|r: &Reader| Ok((r.outbox_epoch()?, r.chain_head()?)))
        .await
        .ok()
        .and_then(|(e, h)| Some((e, h?)))?;
    let signed = identity.sign_head(i64::try_from(epoch).ok()?, seq, &head);
    Some(ChainHealth {
        identity: identity.public_hex(),
        epoch,
        seq: u64::try_from(seq).ok()?,
        head: to_hex(&head),
        signature: to_hex(&signed.signature),
    })
}

/// What [`run_telemetry`] needs from the link.
#[derive(Debug)]
pub struct TelemetryLink {
    pub publisher: Publisher,
    pub topic: String,
    pub gateway: String,
    pub store: Store,
    pub status: Arc<Mutex<LinkStatus>>,
    pub connected: watch::Receiver<bool>,
    /// Signalled when a battery falls to the low threshold.
    pub now: Arc<Notify>,
}

/// Sends a summary every interval, at once on a low battery and on every connect, until
/// `shutdown`. Nothing is sent (or queued) while the broker is away: the next connect sends a
/// fresh one.
pub async fn run_telemetry(
    spec: TelemetrySpec,
    mut link: TelemetryLink,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = spec.interval.max(Duration::from_secs(1));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The regular summary.
            _ = interval.tick() => {}
            // A battery fell to the low threshold.
            () = link.now.notified() => {}
            // Connected (a fresh summary) or disconnected (nothing to do).
            changed = link.connected.changed() => {
                if changed.is_err() { break }
                if !*link.connected.borrow() { continue }
            }
            // The daemon is stopping.
            () = stopped(&mut shutdown) => break,
        }
        if !*link.connected.borrow() {
            continue;
        }
        let summary = snapshot(&spec, &link.gateway, &link.store, &link.status).await;
        let report = super::report::Report::Telemetry(Box::new(summary));
        if let Err(e) = link
            .publisher
            .try_publish(link.topic.clone(), false, report.encode(), None)
        {
            tracing::debug!(error = %e, "telemetry summary not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::bus::UnitStatus;
    use crate::store::KeySetInfo;

    #[test]
    fn a_summary_shows_batteries_errors_and_the_key_sets_age() {
        let status = Arc::new(Mutex::new(BusStatus::default()));
        let seen: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        {
            let mut s = status.lock().unwrap();
            s.port_open = true;
            s.stats.timeouts = 3;
            s.stats.bad_crc = 2;
            s.units.insert(
                1,
                UnitStatus {
                    online: true,
                    last_seen: Some(seen),
                    battery: Some((15, 3400, seen)),
                },
            );
        }
        let mut spec = TelemetrySpec::new(Duration::from_secs(900));
        spec.buses.push(BusProbe {
            name: "entrance".into(),
            status,
            units: vec![(1, "main".into()), (2, "lobby".into())],
        });
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let stored = Ok((
            KeySetInfo {
                version: 7,
                generation: 1,
                keys: 40,
                issued_at: Some("2026-11-22T11:00:00Z".parse().unwrap()),
                freshness: crate::access::Freshness {
                    limits: crate::access::StaleLimits::new([
                        (crate::access::Category::Delivery, 3600),
                        (crate::access::Category::Event, 7200),
                    ])
                    .unwrap(),
                    known_at: Some("2026-11-22T10:30:00Z".parse().unwrap()),
                },
            },
            12,
            Some("2026-11-22T12:00:01Z".parse().unwrap()),
        ));
        let s = summarize(&spec, "gw", &LinkStatus::default(), stored, (now, false));
        let keyset = s.keyset.as_ref().unwrap();
        assert_eq!(keyset.age_s, Some(3600));
        // Heard from the cloud 90 minutes ago: delivery (1 h) is stale, event (2 h) not.
        assert_eq!(keyset.known_age_s, Some(5400));
        assert_eq!(keyset.stale, vec![crate::access::Category::Delivery]);
        assert_eq!(s.outbox_depth, Some(12));
        assert!(
            s.clock.trusted,
            "one second behind the mark is within tolerance"
        );
        // A fresh gateway: no mark, no NTP. Not trusted (time-bound keys are denied), exactly
        // as the decision judges it; NTP alone makes it trusted.
        let fresh = |synced| {
            let stored = Ok((
                KeySetInfo {
                    version: 0,
                    generation: 0,
                    keys: 0,
                    issued_at: None,
                    freshness: crate::access::Freshness::default(),
                },
                0,
                None,
            ));
            summarize(&spec, "gw", &LinkStatus::default(), stored, (now, synced)).clock
        };
        assert!(!fresh(false).trusted && fresh(false).mark.is_none());
        assert!(fresh(true).trusted);
        let bus = &s.buses[0];
        assert_eq!((bus.timeouts, bus.errors), (3, 2));
        assert_eq!(bus.units[0].battery_percent, Some(15));
        assert!(bus.units[0].battery_low);
        assert_eq!(bus.units[1].unit, "entrance/2");
        assert!(!bus.units[1].online && bus.units[1].battery_percent.is_none());
        let report = super::super::report::Report::Telemetry(Box::new(s.clone()));
        let back = super::super::report::Report::decode(&report.encode()).unwrap();
        assert_eq!(back, report);
    }
}
