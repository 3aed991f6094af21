//! What the operator commands print: `doorbridge status`, `keys list`, `keys show`,
//! `events tail`. Text for people (short lines, ages instead of raw instants) or, with
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
use crate::control::{Event, Status};
use crate::store::{Reader, Record, StoreError};

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
    match &h.keyset {
        Some(k) => {
            let _ = writeln!(
                out,
                "key set   version {}, {} keys, signed {}; last sync {}",
                k.version,
                k.keys,
                ago(k.issued_at, now),
                ago(h.last_sync, now)
            );
        }
        None => out.push_str("key set   cannot be read\n"),
    }
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

/// What the database alone says, when the daemon does not answer.
pub fn offline_status(reader: &Reader) -> Result<serde_json::Value, StoreError> {
    let set = reader.key_set()?;
    Ok(json!({
        "running": false,
        "keyset": { "version": set.version, "keys": set.keys, "issued_at": set.issued_at },
        "outbox_depth": reader.outbox_depth()?,
        "trusted_time": reader.trusted_time()?,
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
            .map(|(door, n)| json!({ "door": if door.is_empty() { "*" } else { door.as_str() }, "count": n }))
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
        after.clone_from(&last.id);
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
        .map(|(door, n)| {
            if door.is_empty() {
                format!("{n} in total")
            } else {
                format!("{n} at {door}")
            }
        })
        .collect();
    let state = key_state(&rules, Timestamp::now());
    let rows = [
        ("id", rules.id.clone()),
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

/// One event for people: `2026-11-22T12:00:03Z #41 call_button door=main unit=entrance/1 …`.
pub fn event_line(e: &Event) -> String {
    let value = serde_json::to_value(&e.record).unwrap_or_default();
    let mut line = format!(
        "{} #{} {}",
        e.record.at().strftime("%Y-%m-%dT%H:%M:%SZ"),
        e.seq,
        value["type"].as_str().unwrap_or("?")
    );
    if let Record::Activity(a) = &e.record {
        let _ = write!(
            line,
            " {} door={} unit={} key={} {}",
            if a.granted { "GRANTED" } else { "DENIED" },
            a.door,
            a.unit,
            a.key_id.as_deref().unwrap_or("-"),
            a.credential_kind.as_str()
        );
        if let Some(reason) = a.reason {
            let _ = write!(line, " reason={reason}");
        }
        return line;
    }
    if let Some(fields) = value.as_object() {
        for (k, v) in fields {
            if k == "type" || k == "at" {
                continue;
            }
            match v {
                serde_json::Value::String(s) => {
                    let _ = write!(line, " {k}={s}");
                }
                other => {
                    let _ = write!(line, " {k}={other}");
                }
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn an_event_line_never_needs_the_json() {
        let e = Event {
            seq: 41,
            record: Record::CallButton {
                at: "2026-11-22T12:00:03Z".parse().unwrap(),
                unit: "entrance/1".into(),
                door: "main".into(),
                button: 0,
            },
        };
        assert_eq!(
            event_line(&e),
            "2026-11-22T12:00:03Z #41 call_button button=0 door=main unit=entrance/1"
        );
    }
}
