//! `doorbridge events`: the door history, read from the database on a read-only connection
//! (so it works with the daemon stopped, and after a restart), filtered, and printed for
//! people (the site's local time, `key=value` fields quoted like logfmt) or as JSON lines.
//!
//! The history is the store's `records` table: every committed record, kept after the cloud
//! acknowledged it for `storage.history_days` / `storage.history_max_records`
//! (docs/storage.md). The filter and the line format are pure; [`print`] and [`follow`] walk
//! the table.

use std::fmt::Write as _;
use std::io::Write;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::control::Event;
use crate::operator::OutputError;
use crate::store::{Reader, Record, StoredRecord};

/// Every record type `--kind` accepts (the `type` of the JSON records, docs/cloud-protocol.md).
pub const KINDS: &[&str] = &[
    "activity",
    "pin_lockout",
    "door_event",
    "call_button",
    "tamper",
    "power_failure",
    "reader_refused",
    "battery",
    "unit_reachability",
    "storage_unavailable",
    "storage_recovered",
    "database_replaced",
    "storage_reserve_released",
    "outbox_dropped",
    "clock_untrusted",
    "clock_mark_ignored",
    "clock_mark_lowered",
    "cloud_rejected",
];

/// A bad filter given on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(
        "{given:?} is not a time: give 2026-12-04T18:00:00Z, 2026-12-04 18:00 or 2026-12-04 (the site's local time), or an age such as 30m, 2h, 7d"
    )]
    Time { given: String },
    #[error("{given:?} is not a record kind; the kinds are: {}", KINDS.join(", "))]
    Kind { given: String },
}

/// Which records to show; every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub door: Option<String>,
    pub key: Option<String>,
    pub unit: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// Refused decisions only.
    pub denied: bool,
    /// Record types (`activity`, `door_event`, ...); empty: all.
    pub kinds: Vec<String>,
}

impl Filter {
    /// Checks the kinds given (`--kind door_event,tamper` or repeated).
    pub fn kinds(given: &[String]) -> Result<Vec<String>, FilterError> {
        let mut out = Vec::new();
        for kind in given.iter().flat_map(|k| k.split(',')) {
            let kind = kind.trim();
            if !KINDS.contains(&kind) {
                return Err(FilterError::Kind {
                    given: kind.to_owned(),
                });
            }
            out.push(kind.to_owned());
        }
        Ok(out)
    }

    pub fn matches(&self, record: &Record) -> bool {
        let value = serde_json::to_value(record).unwrap_or_default();
        let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
        let kind = field("type").unwrap_or("");
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind) {
            return false;
        }
        let at = record.at();
        if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at > u) {
            return false;
        }
        if self
            .door
            .as_deref()
            .is_some_and(|d| field("door") != Some(d))
            || self
                .unit
                .as_deref()
                .is_some_and(|u| field("unit") != Some(u))
        {
            return false;
        }
        match record {
            Record::Activity(a) => {
                !(self.denied && a.granted
                    || self
                        .key
                        .as_deref()
                        .is_some_and(|k| a.key_id.as_deref() != Some(k)))
            }
            // Only decisions are denied, and only decisions name a key.
            _ => !self.denied && self.key.is_none(),
        }
    }
}

/// A time given on the command line: an instant with an offset, a local date and time, a
/// local date (its midnight), or an age before `now` (`90s`, `30m`, `2h`, `7d`).
pub fn parse_time(given: &str, now: Timestamp, tz: &TimeZone) -> Result<Timestamp, FilterError> {
    let bad = || FilterError::Time {
        given: given.to_owned(),
    };
    let text = given.trim();
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    if let Some(unit) = text.chars().last().filter(char::is_ascii_alphabetic)
        && let Ok(n) = text[..text.len() - 1].parse::<i64>()
    {
        let secs = match unit {
            's' => n,
            'm' => n.saturating_mul(60),
            'h' => n.saturating_mul(3_600),
            'd' => n.saturating_mul(86_400),
            _ => return Err(bad()),
        };
        return now
            .checked_sub(SignedDuration::from_secs(secs))
            .map_err(|_| bad());
    }
    let civil = text
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| {
            text.parse::<jiff::civil::Date>()
                .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
        })
        .map_err(|_| bad())?;
    civil
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|_| bad())
}

/// A value as logfmt writes it: bare when it has no space, quote, `=` or control character,
/// else in double quotes with `"` and `\` escaped.
fn logfmt(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control())
    {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One record for people: `2026-12-04 19:00:03 +01:00 #41 activity GRANTED door=main ...`,
/// in `tz`.
pub fn line(seq: i64, record: &Record, tz: &TimeZone) -> String {
    let value = serde_json::to_value(record).unwrap_or_default();
    let when = record
        .at()
        .to_zoned(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S %:z")
        .to_string();
    let mut line = format!("{when} #{seq} {}", value["type"].as_str().unwrap_or("?"));
    if let Record::Activity(a) = record {
        let _ = write!(
            line,
            " {} door={} unit={} key={} credential={}",
            if a.granted { "GRANTED" } else { "DENIED" },
            logfmt(&a.door),
            logfmt(&a.unit),
            logfmt(a.key_id.as_deref().unwrap_or("-")),
            a.credential_kind.as_str()
        );
        if let Some(reason) = a.reason {
            let _ = write!(line, " reason={}", reason.name());
        }
        if let Some(category) = a.category {
            let _ = write!(line, " category={}", category.as_str());
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
                    let _ = write!(line, " {k}={}", logfmt(s));
                }
                serde_json::Value::Null => {}
                other => {
                    let _ = write!(line, " {k}={}", logfmt(&other.to_string()));
                }
            }
        }
    }
    line
}

/// How to print.
#[derive(Clone, Debug)]
pub struct Output {
    /// JSON lines (`{"seq":…,"record":{…}}`, times in UTC) instead of text.
    pub json: bool,
    /// The time zone of the text lines.
    pub tz: TimeZone,
    /// Without a time range: the last this many matching records.
    pub last: Option<usize>,
}

fn write_one(out: &mut impl Write, r: &StoredRecord, how: &Output) -> std::io::Result<()> {
    if how.json {
        let event = Event {
            seq: r.seq,
            record: r.record.clone(),
        };
        writeln!(out, "{}", serde_json::to_string(&event).unwrap_or_default())
    } else {
        writeln!(out, "{}", line(r.seq, &r.record, &how.tz))
    }
}

/// Prints the matching records, oldest first: the last `how.last` of them, or all. Returns the
/// highest seq the history held, for [`follow`]. Records that cannot be decoded are counted
/// on stderr, not printed.
pub fn print(
    reader: &Reader,
    filter: &Filter,
    how: &Output,
    out: &mut impl Write,
) -> Result<i64, OutputError> {
    let last_seq = reader.last_seq()?;
    let since = filter.since.map(Timestamp::as_millisecond);
    let until = filter.until.map(Timestamp::as_millisecond);
    let mut unreadable = 0u64;
    if let Some(n) = how.last {
        let mut found = Vec::new();
        reader.history(0, since, until, true, |r| {
            if found.len() >= n {
                return false;
            }
            match r {
                Ok(r) if filter.matches(&r.record) => found.push(r),
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
            true
        })?;
        for r in found.iter().rev() {
            write_one(out, r, how)?;
        }
    } else {
        let mut failed = None;
        reader.history(0, since, until, false, |r| {
            match r {
                Ok(r) if filter.matches(&r.record) => {
                    if let Err(e) = write_one(out, &r, how) {
                        failed = Some(e);
                        return false;
                    }
                }
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    if unreadable > 0 {
        eprintln!("{unreadable} records could not be decoded and were left out");
    }
    out.flush()?;
    Ok(last_seq)
}

/// Prints matching records committed after `after`, as they come (the database is read every
/// `every`), until the output closes.
pub fn follow(
    reader: &Reader,
    filter: &Filter,
    how: &Output,
    mut after: i64,
    every: std::time::Duration,
    out: &mut impl Write,
) -> Result<(), OutputError> {
    loop {
        let mut failed = None;
        reader.history(after, None, None, false, |r| {
            if let Ok(r) = r {
                after = r.seq;
                if filter.matches(&r.record)
                    && let Err(e) = write_one(out, &r, how).and_then(|()| out.flush())
                {
                    failed = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::CredentialKind;
    use crate::store::Activity;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn decision(granted: bool, door: &str, key: Option<&str>) -> Record {
        Record::Activity(Activity {
            at: t("2026-12-04T18:00:03Z"),
            door: door.into(),
            unit: "front/1".into(),
            request_id: Some(7),
            credential_kind: CredentialKind::Pin,
            key_id: key.map(Into::into),
            category: None,
            granted,
            reason: None,
            released: Vec::new(),
            command_id: None,
            issuer: None,
        })
    }

    #[test]
    fn filters_need_every_given_field_to_match() {
        let tamper = Record::Tamper {
            at: t("2026-12-04T18:00:00Z"),
            unit: "front/1".into(),
            door: "main".into(),
            active: true,
        };
        let granted = decision(true, "main", Some("k-1"));
        let denied = decision(false, "garage", None);
        let all = Filter::default();
        assert!(all.matches(&tamper) && all.matches(&granted) && all.matches(&denied));
        let main = Filter {
            door: Some("main".into()),
            ..Filter::default()
        };
        assert!(main.matches(&tamper) && main.matches(&granted) && !main.matches(&denied));
        let refused = Filter {
            denied: true,
            ..Filter::default()
        };
        assert!(
            !refused.matches(&tamper) && !refused.matches(&granted) && refused.matches(&denied)
        );
        let key = Filter {
            key: Some("k-1".into()),
            ..Filter::default()
        };
        assert!(key.matches(&granted) && !key.matches(&denied) && !key.matches(&tamper));
        let kinds = Filter {
            kinds: Filter::kinds(&["tamper,door_event".into()]).unwrap(),
            ..Filter::default()
        };
        assert!(kinds.matches(&tamper) && !kinds.matches(&granted));
        let later = Filter {
            since: Some(t("2026-12-04T18:00:01Z")),
            ..Filter::default()
        };
        assert!(!later.matches(&tamper) && later.matches(&granted));
        assert_eq!(
            Filter::kinds(&["doorevent".into()]),
            Err(FilterError::Kind {
                given: "doorevent".into()
            })
        );
    }

    #[test]
    fn times_read_as_instants_local_dates_or_ages() {
        let tz = TimeZone::get("Europe/Vienna").unwrap();
        let now = t("2026-12-04T18:00:00Z");
        assert_eq!(
            parse_time("2026-12-04T10:00:00Z", now, &tz),
            Ok(t("2026-12-04T10:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-12-04 10:00", now, &tz),
            Ok(t("2026-12-04T09:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-12-04", now, &tz),
            Ok(t("2026-12-03T23:00:00Z"))
        );
        assert_eq!(parse_time("2h", now, &tz), Ok(t("2026-12-04T16:00:00Z")));
        assert_eq!(parse_time("7d", now, &tz), Ok(t("2026-11-27T18:00:00Z")));
        assert!(matches!(
            parse_time("yesterday", now, &tz),
            Err(FilterError::Time { .. })
        ));
    }

    #[test]
    fn lines_are_in_the_site_time_with_quoted_values() {
        let tz = TimeZone::get("Europe/Vienna").unwrap();
        assert_eq!(
            line(41, &decision(false, "main entrance", None), &tz),
            "2026-12-04 19:00:03 +01:00 #41 activity DENIED door=\"main entrance\" unit=front/1 key=- credential=pin"
        );
        let call = Record::CallButton {
            at: t("2026-12-04T18:00:03Z"),
            unit: "front/1".into(),
            door: "say \"hi\"".into(),
            button: 0,
        };
        assert_eq!(
            line(42, &call, &TimeZone::UTC),
            "2026-12-04 18:00:03 +00:00 #42 call_button button=0 door=\"say \\\"hi\\\"\" unit=front/1"
        );
    }
}
