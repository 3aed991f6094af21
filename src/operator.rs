//! What the operator commands print: `doorbridge status`, `keys list` and `keys show`
//! (`doorbridge events` is in [`crate::history`]). Text for people (short lines, ages instead of raw instants) or, with
//! `--json`, one JSON document (or one per line for lists and streams) for scripts.
//!
//! The live facts come from the daemon over the control socket ([`crate::control`]); keys and
//! the held set are read from the database on a read-only connection, so `keys` works whether
//! the daemon runs or not, and never shows a credential.

use std::fmt::Write as _;
use std::io::Write;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use crate::access::{CredentialKind, KeyRules, Schedule, UseLimit, Window};
use crate::control::Status;
use crate::store::{Reader, StoreError, UseScope};

/// Why a listing could not be printed: the store, or the output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// `3d 4h`, `2h 05m`, `4m 10s`, `12s`: how long, roughly, for people.
pub fn age(d: SignedDuration) -> String {
    let s = d.as_secs().max(0);
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins:02}m")
    } else if mins > 0 {
        format!("{mins}m {secs:02}s")
    } else {
        format!("{secs}s")
    }
}

fn ago(at: Option<Timestamp>, now: Timestamp) -> String {
    at.map_or_else(
        || "never".to_owned(),
        |t| format!("{} ago", age(now.duration_since(t))),
    )
}

/// The `key set` line of [`status_text`], and which categories are stale.
fn keyset_text(out: &mut String, h: &crate::cloud::telemetry::Summary, now: Timestamp) {
    match &h.keyset {
        Some(k) => {
            let _ = writeln!(
                out,
                "key set   version {}, {} keys, signed {}; last sync {}; cloud last vouched {}",
                k.version,
                k.keys,
                ago(k.issued_at, now),
                ago(h.last_sync, now),
                ago(k.known_at, now)
            );
            if !k.stale.is_empty() {
                let _ = writeln!(
                    out,
                    "          stale: {} keys refused until the cloud is heard from",
                    categories(&k.stale)
                );
            }
        }
        None => out.push_str("key set   cannot be read\n"),
    }
}

/// The daemon's status for people.
pub fn status_text(s: &Status, now: Timestamp) -> String {
    let h = &s.health;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "doorbridge {} (pid {}), gateway {} at site {}, up {}",
        s.version,
        s.pid,
        h.gateway,
        s.site,
        age(SignedDuration::from_secs(
            i64::try_from(h.uptime_s).unwrap_or(i64::MAX)
        ))
    );
    if let Some(identity) = &s.identity {
        let _ = writeln!(out, "identity  {identity}");
    }
    let cloud = if s.cloud.connected {
        format!("connected to {}", s.cloud.broker)
    } else {
        format!(
            "offline, trying {} ({})",
            s.cloud.broker,
            s.cloud.last_error.as_deref().unwrap_or("not connected yet")
        )
    };
    let _ = writeln!(
        out,
        "cloud     {cloud}; {} connects, {} messages refused",
        s.cloud.connects, s.cloud.rejected
    );
    keyset_text(&mut out, h, now);
    match h.outbox_depth {
        Some(n) => {
            let _ = writeln!(out, "outbox    {n} records waiting for upload");
        }
        None => out.push_str("outbox    cannot be read\n"),
    }
    let _ = writeln!(
        out,
        "clock     {}, {}",
        if h.clock.synced {
            "NTP-synchronised"
        } else {
            "not synchronised"
        },
        if h.clock.trusted {
            "trusted"
        } else {
            "behind the trusted-time mark: time-bound keys are refused"
        }
    );
    for bus in &h.buses {
        let _ = writeln!(
            out,
            "bus {}: port {}, {} reopens, {} timeouts, {} retransmits, {} bad frames",
            bus.name,
            if bus.port_open { "open" } else { "CLOSED" },
            bus.reopens,
            bus.timeouts,
            bus.retransmits,
            bus.errors
        );
        for u in &bus.units {
            let battery = match (u.battery_percent, u.battery_millivolts) {
                (Some(p), Some(mv)) => format!(
                    "battery {p}% ({}.{:02} V{}), {}",
                    mv / 1000,
                    mv % 1000 / 10,
                    if u.battery_low { ", LOW" } else { "" },
                    ago(u.battery_at, now)
                ),
                _ => "battery not reported".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {:<14} {:<16} {:<8} seen {:<12} {battery}",
                u.unit,
                u.door,
                if u.online { "online" } else { "OFFLINE" },
                ago(u.last_seen, now),
            );
        }
    }
    out
}

/// How healthy a site is, as monitoring systems count it (the Nagios plugin convention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Level {
    /// The exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    pub fn code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Critical => 2,
            Level::Unknown => 3,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }
}

/// The thresholds `status` judges with (its options).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The cloud unreachable longer than this is a warning.
    pub offline: SignedDuration,
    /// More records than this waiting for upload is a warning.
    pub outbox: u64,
    /// A key set signed longer ago than this is a warning (`None`: not judged; a cloud may
    /// publish only on changes).
    pub keyset_age: Option<SignedDuration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            offline: SignedDuration::from_mins(15),
            outbox: 10_000,
            keyset_age: None,
        }
    }
}

/// The site's state and why: `docs/operations.md` lists the rules.
pub fn verdict(s: &Status, now: Timestamp, limits: &Limits) -> (Level, Vec<String>) {
    let mut found: Vec<(Level, String)> = Vec::new();
    let h = &s.health;
    match &h.keyset {
        None => found.push((Level::Critical, "the key set cannot be read".into())),
        Some(k) if k.version == 0 => found.push((
            Level::Critical,
            "no key set: every credential is refused".into(),
        )),
        Some(k) => {
            if !k.stale.is_empty() {
                found.push((
                    Level::Warning,
                    format!(
                        "{} keys refused: no word from the cloud for {} (stale_after)",
                        categories(&k.stale),
                        k.known_age_s.map_or_else(|| "ever".to_owned(), age_text)
                    ),
                ));
            }
            if let (Some(max), Some(age)) = (limits.keyset_age, k.age_s)
                && SignedDuration::from_secs(i64::try_from(age).unwrap_or(i64::MAX)) > max
            {
                found.push((
                    Level::Warning,
                    format!("key set signed {} ago", age_text(age)),
                ));
            }
        }
    }
    if s.storage_degraded {
        found.push((
            Level::Critical,
            "the disk refuses writes: records wait in memory, limited keys are refused".into(),
        ));
    }
    if !h.clock.trusted {
        found.push((
            Level::Critical,
            "clock untrusted: time-bound keys are refused".into(),
        ));
    }
    for bus in &h.buses {
        if !bus.port_open {
            found.push((Level::Critical, format!("bus {}: port not open", bus.name)));
            continue;
        }
        let offline: Vec<&str> = bus
            .units
            .iter()
            .filter(|u| !u.online)
            .map(|u| u.unit.as_str())
            .collect();
        if !bus.units.is_empty() && offline.len() == bus.units.len() {
            found.push((
                Level::Critical,
                format!("bus {}: every unit offline", bus.name),
            ));
        } else if !offline.is_empty() {
            found.push((Level::Warning, format!("offline: {}", offline.join(", "))));
        }
        for u in bus.units.iter().filter(|u| u.battery_low) {
            found.push((Level::Warning, format!("{}: battery low", u.unit)));
        }
    }
    if let Some(since) = s.cloud.offline_since
        && now.duration_since(since) > limits.offline
    {
        found.push((
            Level::Warning,
            format!(
                "cloud unreachable for {}",
                age_text(u64::try_from(now.duration_since(since).as_secs()).unwrap_or(0))
            ),
        ));
    }
    if let Some(depth) = h.outbox_depth
        && depth > limits.outbox
    {
        found.push((
            Level::Warning,
            format!("{depth} records waiting for upload"),
        ));
    }
    let level = found.iter().map(|(l, _)| *l).max().unwrap_or(Level::Ok);
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    (level, found.into_iter().map(|(_, why)| why).collect())
}

/// Categories as people read them: `delivery, event`.
fn categories(list: &[crate::access::Category]) -> String {
    list.iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn age_text(secs: u64) -> String {
    age(SignedDuration::from_secs(
        i64::try_from(secs).unwrap_or(i64::MAX),
    ))
}

/// What the database alone says, when the daemon does not answer.
pub fn offline_status(reader: &Reader) -> Result<serde_json::Value, StoreError> {
    let set = reader.key_set()?;
    // The shape of a running daemon's `status --json`, with what the file alone can tell.
    Ok(json!({
        "running": false,
        "health": {
            "keyset": { "version": set.version, "keys": set.keys, "issued_at": set.issued_at,
                        "known_at": set.freshness.known_at },
            "outbox_depth": reader.outbox_depth()?,
            "clock": { "mark": reader.trusted_time()? },
        },
    }))
}

fn limit(rules: &KeyRules) -> String {
    match rules.use_limit {
        UseLimit::Unlimited => "unlimited".into(),
        UseLimit::Total(1) => "single use".into(),
        UseLimit::Total(n) => format!("{n} uses"),
        UseLimit::PerDoor(n) => format!("{n} uses per door"),
    }
}

/// What a key's state is at `now`, for people: revoked, expired, not yet valid, or blank.
fn key_state(rules: &KeyRules, now: Timestamp) -> &'static str {
    if rules.revoked {
        "REVOKED"
    } else if rules.valid_until.is_some_and(|u| now >= u) {
        "EXPIRED"
    } else if rules.valid_from.is_some_and(|f| now < f) {
        "NOT YET VALID"
    } else {
        ""
    }
}

/// A schedule, for people: `always`, `daily 08:00–18:00`, `Mon,Fri 22:00–02:00`.
fn schedule_text(schedule: &Schedule) -> String {
    let window = |w: &Window| {
        format!(
            "{}\u{2013}{}",
            w.start.strftime("%H:%M"),
            w.end.strftime("%H:%M")
        )
    };
    match schedule {
        Schedule::Always => "always".into(),
        Schedule::Daily { window: w } => format!("daily {}", window(w)),
        Schedule::Weekly { days, window: w } => {
            let names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            let listed: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| days.0 & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            match w {
                Some(w) => format!("{} {}", listed.join(","), window(w)),
                None => listed.join(","),
            }
        }
    }
}

/// One key as a JSON object: its rules and how many credentials of each kind it has, never
/// the credentials.
fn key_json(reader: &Reader, rules: &KeyRules) -> Result<serde_json::Value, StoreError> {
    let mut value = serde_json::to_value(rules).unwrap_or_default();
    let counts: serde_json::Map<String, serde_json::Value> = reader
        .credential_counts(&rules.id)?
        .into_iter()
        .map(|(kind, n)| {
            let kind = CredentialKind::from_code(kind).map_or("unknown", CredentialKind::as_str);
            (kind.to_owned(), json!(n))
        })
        .collect();
    value["credentials"] = serde_json::Value::Object(counts);
    value["uses"] = json!(
        reader
            .uses(&rules.id)?
            .into_iter()
            .map(|(scope, n)| match scope {
                UseScope::AllDoors => json!({ "door": "*", "count": n }),
                UseScope::Door(door) => json!({ "door": door, "count": n }),
            })
            .collect::<Vec<_>>()
    );
    Ok(value)
}

/// `keys list`: every key of the live set, one line (or one JSON object) each, in id order.
pub fn keys_list(reader: &Reader, json: bool, out: &mut impl Write) -> Result<(), OutputError> {
    let set = reader.key_set()?;
    let now = Timestamp::now();
    if !json {
        writeln!(out, "key set version {}, {} keys", set.version, set.keys)?;
        writeln!(
            out,
            "{:<24} {:<10} {:<20} {:<18} {:<20} STATE",
            "ID", "CATEGORY", "DOORS", "USES", "SCHEDULE"
        )?;
    }
    let mut after = String::new();
    loop {
        let page = reader.keys_page(&after, 1000)?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.id.to_string();
        for rules in &page {
            if json {
                writeln!(out, "{}", key_json(reader, rules)?)?;
            } else {
                let line = format!(
                    "{:<24} {:<10} {:<20} {:<18} {:<20} {}",
                    rules.id,
                    rules.category.as_str(),
                    rules.doors.join(","),
                    limit(rules),
                    schedule_text(&rules.schedule),
                    key_state(rules, now)
                );
                writeln!(out, "{}", line.trim_end())?;
            }
        }
    }
    Ok(())
}

/// `keys show ID`: one key in full (rules, credential counts by kind, uses), as JSON or
/// indented for people. `Ok(false)` when the live set has no such key.
pub fn key_show(
    reader: &Reader,
    id: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<bool, OutputError> {
    let Some(rules) = reader.key(id)? else {
        return Ok(false);
    };
    if json {
        writeln!(out, "{}", key_json(reader, &rules)?)?;
        return Ok(true);
    }
    let when = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let credentials: Vec<String> = reader
        .credential_counts(&rules.id)?
        .into_iter()
        .map(|(kind, n)| {
            let kind = CredentialKind::from_code(kind).map_or("?", CredentialKind::as_str);
            format!("{n} {kind}")
        })
        .collect();
    let uses: Vec<String> = reader
        .uses(&rules.id)?
        .into_iter()
        .map(|(scope, n)| match scope {
            UseScope::AllDoors => format!("{n} in total"),
            UseScope::Door(door) => format!("{n} at {door}"),
        })
        .collect();
    let state = key_state(&rules, Timestamp::now());
    let rows = [
        ("id", rules.id.to_string()),
        ("name", rules.name.clone()),
        ("category", rules.category.as_str().to_owned()),
        ("doors", rules.doors.join(", ")),
        (
            "inner doors",
            if rules.opens_inner_door {
                "also opens"
            } else {
                "no"
            }
            .to_owned(),
        ),
        ("valid from", when(rules.valid_from)),
        ("valid until", when(rules.valid_until)),
        ("schedule", schedule_text(&rules.schedule)),
        ("use limit", limit(&rules)),
        (
            "used",
            if uses.is_empty() {
                "never".to_owned()
            } else {
                uses.join(", ")
            },
        ),
        ("credentials", credentials.join(", ")),
        (
            "welcome",
            rules.welcome.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        (
            "floors",
            if rules.floors.is_empty() {
                "-".to_owned()
            } else {
                rules
                    .floors
                    .iter()
                    .map(i16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "state",
            if state.is_empty() { "valid" } else { state }.to_owned(),
        ),
    ];
    for (name, value) in rows {
        writeln!(out, "{name:<12} {value}")?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site's status as the daemon answers it, adjusted by `f`.
    fn site(f: impl FnOnce(&mut serde_json::Value)) -> Status {
        let mut v = json!({
            "version": "0", "pid": 1, "site": "s",
            "cloud": { "broker": "b:1883", "connected": true, "connects": 1,
                       "last_error": null, "rejected": 0 },
            "health": {
                "gateway": "gw", "at": "2026-12-01T12:00:00Z", "uptime_s": 60,
                "keyset": { "version": 3, "keys": 10, "issued_at": "2026-12-01T00:00:00Z",
                            "age_s": 43200 },
                "last_sync": null, "outbox_depth": 0,
                "clock": { "synced": true, "trusted": true, "mark": null },
                "buses": [{ "name": "entrance", "port_open": true, "reopens": 0,
                    "timeouts": 0, "retransmits": 0, "errors": 0, "units": [
                    { "unit": "entrance/1", "door": "main", "online": true,
                      "last_seen": null, "battery_percent": null,
                      "battery_millivolts": null, "battery_at": null, "battery_low": false },
                    { "unit": "entrance/2", "door": "garage", "online": true,
                      "last_seen": null, "battery_percent": null,
                      "battery_millivolts": null, "battery_at": null, "battery_low": false }
                ]}]
            }
        });
        f(&mut v);
        serde_json::from_value(v).expect("a status")
    }

    #[test]
    fn the_verdict_follows_the_documented_rules() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let judge = |s: &Status| verdict(s, now, &Limits::default());
        assert_eq!(judge(&site(|_| {})), (Level::Ok, vec![]));
        let one_off = site(|v| v["health"]["buses"][0]["units"][1]["online"] = json!(false));
        assert_eq!(judge(&one_off).0, Level::Warning);
        let all_off = site(|v| {
            v["health"]["buses"][0]["units"][0]["online"] = json!(false);
            v["health"]["buses"][0]["units"][1]["online"] = json!(false);
        });
        assert_eq!(
            judge(&all_off),
            (
                Level::Critical,
                vec!["bus entrance: every unit offline".to_owned()]
            )
        );
        let no_keys = site(|v| v["health"]["keyset"]["version"] = json!(0));
        assert_eq!(judge(&no_keys).0, Level::Critical);
        let untrusted = site(|v| v["health"]["clock"]["trusted"] = json!(false));
        assert_eq!(judge(&untrusted).0, Level::Critical);
        let port = site(|v| v["health"]["buses"][0]["port_open"] = json!(false));
        assert_eq!(judge(&port).0, Level::Critical);
        // The cloud away 10 minutes is fine, an hour is not.
        let away = |mins: i64| {
            let since = now - SignedDuration::from_mins(mins);
            site(move |v| {
                v["cloud"]["connected"] = json!(false);
                v["cloud"]["offline_since"] = json!(since.to_string());
            })
        };
        assert_eq!(judge(&away(10)).0, Level::Ok);
        assert_eq!(judge(&away(60)).0, Level::Warning);
        let backlog = site(|v| v["health"]["outbox_depth"] = json!(20_000));
        assert_eq!(judge(&backlog).0, Level::Warning);
        // Keys refused as stale: residents still get in, so a warning that says which.
        let stale = site(|v| {
            v["health"]["keyset"]["stale"] = json!(["delivery"]);
            v["health"]["keyset"]["known_age_s"] = json!(90_000);
        });
        assert_eq!(
            judge(&stale),
            (
                Level::Warning,
                vec![
                    "delivery keys refused: no word from the cloud for 1d 1h (stale_after)"
                        .to_owned()
                ]
            )
        );
        // The key set's age is judged only when asked.
        let strict = Limits {
            keyset_age: Some(SignedDuration::from_hours(6)),
            ..Limits::default()
        };
        assert_eq!(verdict(&site(|_| {}), now, &strict).0, Level::Warning);
        // The worst reason first.
        let both = site(|v| {
            v["health"]["buses"][0]["units"][1]["online"] = json!(false);
            v["health"]["clock"]["trusted"] = json!(false);
        });
        let (level, reasons) = judge(&both);
        assert_eq!(level, Level::Critical);
        assert!(reasons[0].starts_with("clock untrusted"), "{reasons:?}");
        assert_eq!(
            [Level::Ok, Level::Warning, Level::Critical, Level::Unknown].map(Level::code),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn keys_read_like_people_say_them() {
        use crate::access::{Category, WeekdaySet};
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let time = |s: &str| s.parse::<jiff::civil::Time>().unwrap();
        let mut rules = KeyRules {
            id: "k".into(),
            name: "K".into(),
            category: Category::Delivery,
            doors: vec!["main".into()],
            opens_inner_door: false,
            valid_from: Some(t("2026-12-01T00:00:00Z")),
            valid_until: Some(t("2026-12-10T00:00:00Z")),
            schedule: Schedule::Weekly {
                days: WeekdaySet(0b001_0001),
                window: Some(Window {
                    start: time("22:00"),
                    end: time("02:00"),
                }),
            },
            use_limit: UseLimit::Total(1),
            welcome: None,
            floors: Vec::new(),
            revoked: false,
            issuer: None,
        };
        assert_eq!(limit(&rules), "single use");
        assert_eq!(schedule_text(&rules.schedule), "Mon,Fri 22:00\u{2013}02:00");
        assert_eq!(
            key_state(&rules, t("2026-11-30T00:00:00Z")),
            "NOT YET VALID"
        );
        assert_eq!(key_state(&rules, t("2026-12-05T00:00:00Z")), "");
        assert_eq!(key_state(&rules, t("2026-12-10T00:00:00Z")), "EXPIRED");
        rules.revoked = true;
        assert_eq!(key_state(&rules, t("2026-12-05T00:00:00Z")), "REVOKED");
        rules.use_limit = UseLimit::PerDoor(2);
        assert_eq!(limit(&rules), "2 uses per door");
    }

    #[test]
    fn ages_read_like_people_say_them() {
        assert_eq!(age(SignedDuration::from_secs(12)), "12s");
        assert_eq!(age(SignedDuration::from_secs(250)), "4m 10s");
        assert_eq!(age(SignedDuration::from_secs(7500)), "2h 05m");
        assert_eq!(
            age(SignedDuration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 4h"
        );
        assert_eq!(age(SignedDuration::from_secs(-5)), "0s");
    }
}
