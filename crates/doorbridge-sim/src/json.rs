//! The JSON lines `door-sim` prints: one object per [`Output`], documented in
//! `docs/door-sim.md`.

use serde_json::{Map, Value};

use super::units::{Output, SimCommand};
use doorbridge_proto::bus::message::{Settings, Verify};
use doorbridge_proto::bus::session::Answer;

/// A JSON object that keeps its keys in the order they were added (`"unit"` and `"type"`
/// first), so the printed lines read well. [`JsonLine::to_value`] gives a plain
/// [`serde_json::Value`] for code that looks fields up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonLine(Vec<(&'static str, Value)>);

impl JsonLine {
    pub fn new() -> JsonLine {
        JsonLine(Vec::new())
    }

    /// Adds (or replaces) a field.
    #[must_use]
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> JsonLine {
        self.set(key, value);
        self
    }

    /// Adds (or replaces) a field.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        let value = value.into();
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.0.push((key, value));
        }
    }

    pub fn to_value(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<Map<String, Value>>(),
        )
    }
}

impl std::fmt::Display for JsonLine {
    /// One line of JSON, keys in insertion order.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            // A key is a plain identifier; a Value always serialises.
            write!(f, "{}:{v}", Value::from(*k))?;
        }
        f.write_str("}")
    }
}

impl Output {
    /// The output as one JSON object. Every object has a `"type"`; those about one unit have
    /// its address as `"unit"`. Deny reasons use the `snake_case` names of
    /// [`DenyReason`](doorbridge_proto::access::DenyReason) (`"used_up"`).
    pub fn to_json(&self) -> JsonLine {
        match self {
            Output::Contact { unit } => about(unit.get(), "contact"),
            Output::Decision {
                unit,
                id,
                request,
                answer,
                sends,
                latency,
                repeat,
            } => {
                let mut v = answer_json(unit.get(), *id, Some(request), answer);
                v.set("reader", request.reader);
                v.set("sends", *sends);
                v.set(
                    "after_ms",
                    u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
                );
                if *repeat {
                    v.set("repeat", true);
                }
                v
            }
            Output::Ignored { unit, id, answer } => {
                answer_json(unit.get(), *id, None, answer).with("ignored", true)
            }
            Output::GaveUp {
                unit,
                id,
                request,
                reason,
                repeat,
            } => {
                let mut v = about(unit.get(), "gave_up")
                    .with("request", request.kind.as_str())
                    .with("id", *id)
                    .with("reader", request.reader)
                    .with("reason", reason.as_str());
                if *repeat {
                    v.set("repeat", true);
                }
                v
            }
            Output::Acked { unit, id, report } => about(unit.get(), "ack")
                .with("report", report.as_str())
                .with("id", *id),
            Output::Dropped { unit, id, report } => about(unit.get(), "dropped")
                .with("report", report.as_str())
                .with("id", *id),
            Output::OpenDoor {
                unit,
                id,
                open,
                broadcast,
            } => about(unit.get(), "open_door")
                .with("id", *id)
                .with("door", open.door)
                .with("pulse_ms", open.pulse_ms)
                .with("broadcast", *broadcast),
            Output::Settings { unit, id, settings } => {
                settings_json(about(unit.get(), "settings").with("id", *id), settings)
            }
            Output::Time {
                unit,
                id,
                time,
                broadcast,
            } => about(unit.get(), "time")
                .with("id", *id)
                .with("unix", time.unix)
                .with("utc_offset", time.utc_offset)
                .with("broadcast", *broadcast),
            Output::LineError(e) => JsonLine::new()
                .with("type", "line_error")
                .with("error", e.to_string()),
            Output::BadMessage { unit, id, error } => about(unit.get(), "bad_message")
                .with("id", *id)
                .with("error", error.to_string()),
            Output::Rejected { command, error } => {
                let mut v = JsonLine::new();
                if let Some(unit) = command.unit() {
                    v.set("unit", unit.get());
                }
                v.with("type", "error")
                    .with("command", command.word())
                    .with("error", error.to_string())
            }
        }
    }
}

impl SimCommand {
    /// The command's word in the command language (`"pin"`, `"badcrc"`, …).
    pub fn word(&self) -> &'static str {
        match self {
            SimCommand::Verify { kind, .. } => kind.as_str(),
            SimCommand::Call { .. } => "call",
            SimCommand::Battery { .. } => "battery",
            SimCommand::Door { .. } => "door",
            SimCommand::Tamper { .. } => "tamper",
            SimCommand::Status { .. } => "status",
            SimCommand::Restart { .. } => "restart",
            SimCommand::Garbage { .. } => "garbage",
            SimCommand::BadCrc { .. } => "badcrc",
            SimCommand::Truncate { .. } => "truncate",
            SimCommand::Late { .. } => "late",
            SimCommand::Retransmit { .. } => "retransmit",
            SimCommand::Silent { .. } => "silent",
        }
    }
}

fn about(unit: u8, kind: &'static str) -> JsonLine {
    JsonLine::new().with("unit", unit).with("type", kind)
}

fn answer_json(unit: u8, id: u16, request: Option<&Verify>, answer: &Answer) -> JsonLine {
    let kind = match answer {
        Answer::Grant(_) => "grant",
        Answer::Deny(_) => "deny",
    };
    let mut v = about(unit, kind);
    if let Some(r) = request {
        v.set("request", r.kind.as_str());
    }
    v.set("id", id);
    match answer {
        Answer::Grant(g) => v
            .with("doors", g.doors.clone())
            .with("welcome", g.welcome.clone())
            .with("floors", g.floors.clone()),
        Answer::Deny(reason) => v.with(
            "reason",
            serde_json::to_value(reason).unwrap_or(Value::Null),
        ),
    }
}

/// The keys present in a settings message, by their long names.
fn settings_json(mut v: JsonLine, s: &Settings) -> JsonLine {
    if let Some(volume) = s.volume {
        v.set("volume", volume);
    }
    if let Some(name) = &s.name {
        v.set("name", name.clone());
    }
    if let Some(house) = &s.house_number {
        v.set("house_number", house.clone());
    }
    if let Some(inner) = s.inner_door {
        v.set("inner_door", inner);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{GaveUpReason, ReportKind, SimError};
    use doorbridge_proto::access::{CredentialKind, DenyReason};
    use doorbridge_proto::bus::frame::{Address, FrameError};
    use doorbridge_proto::bus::message::{Grant, OpenDoor, TimeSync};

    fn unit(n: u8) -> Address {
        Address::unit(n).unwrap()
    }

    fn pin() -> Verify {
        Verify {
            kind: CredentialKind::Pin,
            value: b"482916".to_vec(),
            reader: 0,
        }
    }

    #[test]
    fn grant_and_deny_lines() {
        let grant = Output::Decision {
            unit: unit(1),
            id: 17,
            request: pin(),
            answer: Answer::Grant(Grant {
                doors: vec![0],
                welcome: Some("Hi".into()),
                floors: vec![3],
            }),
            sends: 1,
            latency: std::time::Duration::from_millis(12),
            repeat: false,
        };
        assert_eq!(
            grant.to_json().to_string(),
            r#"{"unit":1,"type":"grant","request":"pin","id":17,"doors":[0],"welcome":"Hi","floors":[3],"reader":0,"sends":1,"after_ms":12}"#
        );
        let deny = Output::Decision {
            unit: unit(1),
            id: 18,
            request: pin(),
            answer: Answer::Deny(DenyReason::UsedUp),
            sends: 2,
            latency: std::time::Duration::ZERO,
            repeat: true,
        };
        let v = deny.to_json().to_value();
        assert_eq!(v["type"], "deny");
        assert_eq!(v["reason"], "used_up");
        assert_eq!(v["repeat"], true);
        let ignored = Output::Ignored {
            unit: unit(1),
            id: 18,
            answer: Answer::Deny(DenyReason::NotRecorded),
        };
        let v = ignored.to_json().to_value();
        assert_eq!(v["reason"], "not_recorded");
        assert_eq!(v["ignored"], true);
    }

    #[test]
    fn other_lines() {
        let cases = [
            (
                Output::Contact { unit: unit(3) },
                r#"{"unit":3,"type":"contact"}"#,
            ),
            (
                Output::GaveUp {
                    unit: unit(2),
                    id: 9,
                    request: pin(),
                    reason: GaveUpReason::Timeout,
                    repeat: false,
                },
                r#"{"unit":2,"type":"gave_up","request":"pin","id":9,"reader":0,"reason":"timeout"}"#,
            ),
            (
                Output::Acked {
                    unit: unit(9),
                    id: 0x42,
                    report: ReportKind::Battery,
                },
                r#"{"unit":9,"type":"ack","report":"battery","id":66}"#,
            ),
            (
                Output::OpenDoor {
                    unit: unit(5),
                    id: 0x101,
                    open: OpenDoor {
                        door: 0,
                        pulse_ms: 3000,
                    },
                    broadcast: false,
                },
                r#"{"unit":5,"type":"open_door","id":257,"door":0,"pulse_ms":3000,"broadcast":false}"#,
            ),
            (
                Output::Time {
                    unit: unit(5),
                    id: 0x100,
                    time: TimeSync {
                        unix: 1_767_225_600,
                        utc_offset: 3600,
                    },
                    broadcast: true,
                },
                r#"{"unit":5,"type":"time","id":256,"unix":1767225600,"utc_offset":3600,"broadcast":true}"#,
            ),
            (
                Output::Settings {
                    unit: unit(1),
                    id: 4,
                    settings: Settings {
                        volume: Some(80),
                        name: None,
                        house_number: Some("12a".into()),
                        inner_door: None,
                    },
                },
                r#"{"unit":1,"type":"settings","id":4,"volume":80,"house_number":"12a"}"#,
            ),
            (
                Output::LineError(FrameError::BadCrc),
                r#"{"type":"line_error","error":"bad CRC"}"#,
            ),
            (
                Output::Rejected {
                    command: SimCommand::Retransmit {
                        unit: unit(4),
                        report: false,
                    },
                    error: SimError::NothingSent(unit(4)),
                },
                r#"{"unit":4,"type":"error","command":"retransmit","error":"unit 4 has sent nothing of that kind yet"}"#,
            ),
        ];
        for (output, want) in cases {
            let line = output.to_json().to_string();
            assert_eq!(line, want);
            let parsed: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(parsed, output.to_json().to_value());
        }
    }

    /// The manual's examples are JSON lines as printed, and its table names every type.
    #[test]
    fn the_manual_shows_valid_lines_and_every_type() {
        let doc = include_str!("../../../docs/door-sim.md");
        let mut in_json = false;
        let mut lines = 0;
        for line in doc.lines() {
            if line.starts_with("```") {
                in_json = line == "```json";
                continue;
            }
            if in_json {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not JSON in the manual: {line}: {e}"));
                assert!(v["type"].is_string(), "{line}");
                lines += 1;
            }
        }
        assert!(lines > 10);
        for t in [
            "ready",
            "contact",
            "grant",
            "deny",
            "gave_up",
            "ack",
            "dropped",
            "open_door",
            "settings",
            "time",
            "line_error",
            "bad_message",
            "error",
            "timeout",
            "stopped",
        ] {
            assert!(
                doc.contains(&format!("| `{t}` |")),
                "{t} missing from the table"
            );
        }
        // The grant example is exactly what the code prints.
        let grant = Output::Decision {
            unit: unit(1),
            id: 40114,
            request: pin(),
            answer: Answer::Grant(Grant {
                doors: vec![0],
                welcome: Some("Hi".into()),
                floors: vec![3],
            }),
            sends: 1,
            latency: std::time::Duration::from_millis(6),
            repeat: false,
        };
        assert!(doc.contains(&grant.to_json().to_string()));
    }
}
