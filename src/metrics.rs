//! Prometheus metrics, opt-in: with `telemetry.metrics_file` set, the daemon writes the
//! gateway's figures in the text exposition format to that file every [`EVERY`], atomically
//! (a temporary file renamed over it), for `node_exporter`'s textfile collector. No listener is
//! opened: the collector reads the file, and `node_exporter`'s own access rules apply.
//!
//! The figures are those of `doorbridge status` (a [`Status`]) plus the decisions committed
//! since the daemon started, by result and reason, counted from the records as they commit.
//! [`render`] is pure; [`run`] is the shell.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{broadcast, watch};

use crate::cloud::telemetry::{BusHealth, Summary};
use crate::control::{ControlState, Status};
use crate::store::Record;
use crate::task::stopped;

/// How often the file is written.
pub const EVERY: Duration = Duration::from_secs(15);

/// Decisions since start, by (granted, reason name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decisions(BTreeMap<(bool, &'static str), u64>);

impl Decisions {
    /// Counts `record` if it is a decision.
    pub fn count(&mut self, record: &Record) {
        if let Record::Activity(a) = record {
            let reason = a.reason.map_or("", crate::access::DenyReason::name);
            *self.0.entry((a.granted, reason)).or_default() += 1;
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP doorbridge_{name} {help}");
    let _ = writeln!(out, "# TYPE doorbridge_{name} {kind}");
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// What the store adds to `status`: the oldest waiting record's time, and the commit-latency
/// histogram (cumulative counts per bound in µs, the count, the sum in µs).
#[derive(Clone, Debug, Default)]
pub struct StoreFigures {
    pub oldest_waiting: Option<Timestamp>,
    pub commits: (Vec<(u64, u64)>, u64, u64),
}

/// The metrics page for `status`, `decisions` and `store` at `now`.
pub fn render(s: &Status, decisions: &Decisions, store: &StoreFigures, now: Timestamp) -> String {
    let mut out = String::new();
    let h = &s.health;
    let gw = label(&h.gateway);
    gauge(
        &mut out,
        "up",
        "1 while the daemon runs and writes this file.",
        "gauge",
    );
    let _ = writeln!(out, "doorbridge_up{{gateway=\"{gw}\"}} 1");
    gauge(
        &mut out,
        "decisions_total",
        "Decisions recorded since the daemon started, by result and deny reason.",
        "counter",
    );
    for ((granted, reason), n) in &decisions.0 {
        let result = if *granted { "granted" } else { "denied" };
        let _ = writeln!(
            out,
            "doorbridge_decisions_total{{result=\"{result}\",reason=\"{reason}\"}} {n}"
        );
    }
    units(&mut out, h);
    buses(&mut out, h);
    singles(&mut out, s, now);
    store_figures(&mut out, store, now);
    out
}

#[allow(clippy::cast_precision_loss)] // µs sums far below 2^52
fn store_figures(out: &mut String, store: &StoreFigures, now: Timestamp) {
    gauge(
        out,
        "outbox_oldest_seconds",
        "Age of the oldest record waiting for upload (0: none waits).",
        "gauge",
    );
    let age = store
        .oldest_waiting
        .map_or(0, |t| now.duration_since(t).as_secs().max(0));
    let _ = writeln!(out, "doorbridge_outbox_oldest_seconds {age}");
    let (buckets, count, sum_us) = &store.commits;
    gauge(
        out,
        "commit_seconds",
        "How long the store's commits took (each one fsync: decisions wait for it).",
        "histogram",
    );
    for (bound, n) in buckets {
        let le = *bound as f64 / 1e6;
        let _ = writeln!(out, "doorbridge_commit_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "doorbridge_commit_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "doorbridge_commit_seconds_sum {}",
        *sum_us as f64 / 1e6
    );
    let _ = writeln!(out, "doorbridge_commit_seconds_count {count}");
}

/// One bus counter: its name, help, type and how to read it.
type BusFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BusHealth) -> u64,
);

fn units(out: &mut String, h: &Summary) {
    gauge(
        out,
        "unit_online",
        "1 while a door unit or reader answers.",
        "gauge",
    );
    for bus in &h.buses {
        for u in &bus.units {
            let _ = writeln!(
                out,
                "doorbridge_unit_online{{unit=\"{}\",door=\"{}\"}} {}",
                label(&u.unit),
                label(&u.door),
                flag(u.online)
            );
        }
    }
    gauge(
        out,
        "unit_battery_percent",
        "A door unit's last battery reading.",
        "gauge",
    );
    for bus in &h.buses {
        for u in &bus.units {
            if let Some(p) = u.battery_percent {
                let _ = writeln!(
                    out,
                    "doorbridge_unit_battery_percent{{unit=\"{}\",door=\"{}\"}} {p}",
                    label(&u.unit),
                    label(&u.door)
                );
            }
        }
    }
}

fn buses(out: &mut String, h: &Summary) {
    let per_bus: [BusFigure; 5] = [
        (
            "bus_port_open",
            "1 while the bus's serial port is open.",
            "gauge",
            |b| u64::from(b.port_open),
        ),
        (
            "bus_reopens_total",
            "Times the bus's port was opened again.",
            "counter",
            |b| b.reopens,
        ),
        (
            "bus_timeouts_total",
            "Polls a unit did not answer in time.",
            "counter",
            |b| b.timeouts,
        ),
        (
            "bus_retransmits_total",
            "Frames sent again.",
            "counter",
            |b| b.retransmits,
        ),
        (
            "bus_errors_total",
            "Bad frames and messages.",
            "counter",
            |b| b.errors,
        ),
    ];
    for (name, help, kind, value) in per_bus {
        gauge(out, name, help, kind);
        for bus in &h.buses {
            let _ = writeln!(
                out,
                "doorbridge_{name}{{bus=\"{}\"}} {}",
                label(&bus.name),
                value(bus)
            );
        }
    }
}

fn singles(out: &mut String, s: &Status, now: Timestamp) {
    let h = &s.health;
    let mut single = |name: &str, help: &str, kind: &str, value: Option<String>| {
        if let Some(v) = value {
            gauge(out, name, help, kind);
            let _ = writeln!(out, "doorbridge_{name} {v}");
        }
    };
    single(
        "outbox_records",
        "Records waiting for upload.",
        "gauge",
        h.outbox_depth.map(|d| d.to_string()),
    );
    single(
        "cloud_connected",
        "1 while the broker connection is up.",
        "gauge",
        Some(flag(s.cloud.connected).to_string()),
    );
    single(
        "cloud_offline_seconds",
        "How long the broker connection has been down (0 while up).",
        "gauge",
        Some(
            s.cloud
                .offline_since
                .map_or(0, |t| now.duration_since(t).as_secs().max(0))
                .to_string(),
        ),
    );
    single(
        "cloud_connects_total",
        "Successful broker connections since start.",
        "counter",
        Some(s.cloud.connects.to_string()),
    );
    single(
        "cloud_rejected_total",
        "Cloud messages refused since start.",
        "counter",
        Some(s.cloud.rejected.to_string()),
    );
    single(
        "keyset_version",
        "The held key set's version (0: none).",
        "gauge",
        h.keyset.as_ref().map(|k| k.version.to_string()),
    );
    single(
        "keyset_keys",
        "Keys in the held key set.",
        "gauge",
        h.keyset.as_ref().map(|k| k.keys.to_string()),
    );
    single(
        "keyset_age_seconds",
        "Time since the cloud signed the held key set.",
        "gauge",
        h.keyset
            .as_ref()
            .and_then(|k| k.age_s)
            .map(|a| a.to_string()),
    );
    single(
        "keyset_knowledge_age_seconds",
        "Time since the cloud last vouched for the held key set (snapshot, delta or heartbeat).",
        "gauge",
        h.keyset
            .as_ref()
            .and_then(|k| k.known_age_s)
            .map(|a| a.to_string()),
    );
    single(
        "keyset_stale_categories",
        "Key categories refused now because the cloud has been silent past their stale_after.",
        "gauge",
        h.keyset.as_ref().map(|k| k.stale.len().to_string()),
    );
    single(
        "clock_trusted",
        "1 while time-bound keys are decided normally.",
        "gauge",
        Some(flag(h.clock.trusted).to_string()),
    );
    single(
        "clock_synced",
        "1 while the kernel says the clock is NTP-synchronised.",
        "gauge",
        Some(flag(h.clock.synced).to_string()),
    );
    single(
        "storage_degraded",
        "1 while the disk refuses writes (records wait in memory).",
        "gauge",
        Some(flag(s.storage_degraded).to_string()),
    );
}

/// Writes `text` to `path` atomically: a temporary file beside it, renamed over it.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes the metrics file every [`EVERY`] until `stop` turns true; counts decisions from
/// `committed` meanwhile.
pub async fn run(
    state: ControlState,
    path: PathBuf,
    mut committed: broadcast::Receiver<(i64, Record)>,
    mut stop: watch::Receiver<bool>,
) {
    let decisions = Arc::new(Mutex::new(Decisions::default()));
    let counting = Arc::clone(&decisions);
    let counter = tokio::spawn(async move {
        loop {
            match committed.recv().await {
                Ok((_, record)) => {
                    if let Ok(mut d) = counting.lock() {
                        d.count(&record);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "metrics: records came faster than they were counted"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut tick = tokio::time::interval(EVERY);
    let mut warned = false;
    loop {
        tokio::select! {
            // Time to write the file again.
            _ = tick.tick() => {
                let status = state.status().await;
                let snapshot = decisions.lock().map(|d| d.clone()).unwrap_or_default();
                let store = StoreFigures {
                    oldest_waiting: state
                        .store
                        .read(crate::store::Reader::oldest_waiting)
                        .await
                        .ok()
                        .flatten(),
                    commits: state.store.health().commit_latency.snapshot(),
                };
                let text = render(&status, &snapshot, &store, Timestamp::now());
                match write_atomically(&path, &text) {
                    Ok(()) => warned = false,
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file");
                    }
                    Err(_) => {}
                }
            }
            // The daemon is stopping.
            () = stopped(&mut stop) => break,
        }
    }
    counter.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{CredentialKind, DenyReason};
    use crate::store::Activity;

    #[test]
    fn the_page_holds_every_figure_in_the_exposition_format() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "version": "0", "pid": 1, "site": "s",
            "cloud": { "broker": "b:1883", "connected": false, "connects": 3,
                       "last_error": null, "rejected": 2,
                       "offline_since": "2026-12-01T11:59:00Z" },
            "storage_degraded": false,
            "health": {
                "gateway": "gw-1", "at": "2026-12-01T12:00:00Z", "uptime_s": 60,
                "keyset": { "version": 3, "keys": 10, "issued_at": null, "age_s": 600,
                            "known_at": null, "known_age_s": 120, "stale": ["delivery"] },
                "last_sync": null, "outbox_depth": 7,
                "clock": { "synced": false, "trusted": true, "mark": null },
                "buses": [{ "name": "entrance", "port_open": true, "reopens": 1,
                    "timeouts": 4, "retransmits": 5, "errors": 6, "units": [
                    { "unit": "entrance/1", "door": "main \"front\"", "online": true,
                      "last_seen": null, "battery_percent": 80,
                      "battery_millivolts": 3900, "battery_at": null, "battery_low": false }
                ]}]
            }
        }))
        .unwrap();
        let mut decisions = Decisions::default();
        let activity = |granted: bool, reason: Option<DenyReason>| {
            Record::Activity(Activity {
                at: Timestamp::UNIX_EPOCH,
                door: "main".into(),
                unit: "entrance/1".into(),
                request_id: None,
                credential_kind: CredentialKind::Pin,
                key_id: None,
                category: None,
                granted,
                reason,
                released: Vec::new(),
                command_id: None,
                issuer: None,
            })
        };
        decisions.count(&activity(true, None));
        decisions.count(&activity(true, None));
        decisions.count(&activity(false, Some(DenyReason::UsedUp)));
        let store = StoreFigures {
            oldest_waiting: Some("2026-12-01T11:59:00Z".parse().unwrap()),
            commits: (vec![(500, 1), (1_000, 3)], 4, 2_500),
        };
        let page = render(
            &status,
            &decisions,
            &store,
            "2026-12-01T12:00:00Z".parse().unwrap(),
        );
        for line in [
            "doorbridge_up{gateway=\"gw-1\"} 1",
            "doorbridge_decisions_total{result=\"granted\",reason=\"\"} 2",
            "doorbridge_decisions_total{result=\"denied\",reason=\"used_up\"} 1",
            "doorbridge_unit_online{unit=\"entrance/1\",door=\"main \\\"front\\\"\"} 1",
            "doorbridge_unit_battery_percent{unit=\"entrance/1\",door=\"main \\\"front\\\"\"} 80",
            "doorbridge_bus_timeouts_total{bus=\"entrance\"} 4",
            "doorbridge_outbox_records 7",
            "doorbridge_outbox_oldest_seconds 60",
            "doorbridge_commit_seconds_bucket{le=\"0.001\"} 3",
            "doorbridge_commit_seconds_bucket{le=\"+Inf\"} 4",
            "doorbridge_commit_seconds_sum 0.0025",
            "# TYPE doorbridge_commit_seconds histogram",
            "doorbridge_cloud_connected 0",
            "doorbridge_cloud_offline_seconds 60",
            "doorbridge_keyset_version 3",
            "doorbridge_keyset_age_seconds 600",
            "doorbridge_keyset_knowledge_age_seconds 120",
            "doorbridge_keyset_stale_categories 1",
            "doorbridge_clock_trusted 1",
            "# TYPE doorbridge_decisions_total counter",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "missing {line:?} in\n{page}"
            );
        }
        // Every sample line is `name{labels} value` or `name value`.
        for l in page.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                l.starts_with("doorbridge_")
                    && l.rsplit(' ')
                        .next()
                        .is_some_and(|v| v.parse::<f64>().is_ok()),
                "{l}"
            );
        }
    }
}
