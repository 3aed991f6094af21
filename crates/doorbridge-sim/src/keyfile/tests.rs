use std::collections::BTreeSet;

use jiff::civil::time;

use super::*;

const EXAMPLE: &str = include_str!("../../../../config/keys.example.toml");

fn parse(keys: &str) -> Result<KeyFile, KeyFileError> {
    KeyFile::from_toml(&format!("salt = \"73616c74\"\n{keys}"))
}

fn error(keys: &str) -> String {
    parse(keys).unwrap_err().to_string()
}

const MINIMAL: &str = r#"
[[keys]]
id = "k1"
name = "Ann"
doors = ["main"]
credentials = [{ kind = "pin", value = "482916" }]
"#;

#[test]
fn a_minimal_key_takes_the_defaults_and_the_gateway_digest() {
    let file = parse(MINIMAL).unwrap();
    assert_eq!(file.salt, b"salt");
    let key = &file.keys[0];
    assert_eq!(key.rules.category, Category::Friend);
    assert_eq!(key.rules.schedule, Schedule::Always);
    assert_eq!(key.rules.use_limit, UseLimit::Unlimited);
    assert!(!key.rules.opens_inner_door && !key.rules.revoked);
    assert_eq!(
        key.credentials,
        vec![Credential {
            kind: CredentialKind::Pin,
            digest: digest(b"salt", CredentialKind::Pin, b"482916"),
        }]
    );
}

#[test]
fn the_example_covers_every_key_type_of_the_seeds() {
    let file = KeyFile::from_toml(EXAMPLE).unwrap();
    let keys = &file.keys;
    let categories: BTreeSet<&str> = keys.iter().map(|k| k.rules.category.as_str()).collect();
    let limits: BTreeSet<&str> = keys
        .iter()
        .map(|k| match k.rules.use_limit {
            UseLimit::Unlimited => "unlimited",
            UseLimit::Total(1) => "single-use",
            UseLimit::Total(_) => "total",
            UseLimit::PerDoor(_) => "per-door",
        })
        .collect();
    assert_eq!(
        limits,
        BTreeSet::from(["unlimited", "single-use", "total", "per-door"])
    );
    let schedules: BTreeSet<&str> = keys
        .iter()
        .map(|k| match &k.rules.schedule {
            Schedule::Always => "always",
            Schedule::Daily { .. } => "daily",
            Schedule::Weekly { window: None, .. } => "weekly all day",
            Schedule::Weekly {
                window: Some(w), ..
            } if w.crosses_midnight() => "weekly across midnight",
            Schedule::Weekly { .. } => "weekly window",
        })
        .collect();
    for s in [
        "always",
        "daily",
        "weekly all day",
        "weekly across midnight",
    ] {
        assert!(schedules.contains(s), "{s} missing from {schedules:?}");
    }
    let kinds: BTreeSet<&str> = keys
        .iter()
        .flat_map(|k| k.credentials.iter().map(|c| c.kind.as_str()))
        .collect();
    assert_eq!(kinds, BTreeSet::from(["pin", "qr", "mobile"]));
    let any = |f: fn(&KeyRules) -> bool| keys.iter().any(|k| f(&k.rules));
    assert!(any(|r| r.opens_inner_door));
    assert!(any(|r| r.welcome.is_some()));
    assert!(any(|r| !r.floors.is_empty()));
    assert!(any(|r| r.revoked));
    assert!(any(|r| r.doors.len() > 1));
    assert!(any(|r| r.valid_from.is_some() && r.valid_until.is_some()));
    assert!(any(|r| r.valid_from.is_none() && r.valid_until.is_some()));
    // Categories the example leaves out are still accepted.
    assert!(categories.len() >= 6, "{categories:?}");
    for c in Category::ALL {
        let file = parse(&MINIMAL.replace(
            "name = \"Ann\"",
            &format!("name = \"Ann\"\ncategory = \"{}\"", c.as_str()),
        ))
        .unwrap();
        assert_eq!(file.keys[0].rules.category, c);
    }
    let night = keys.iter().find(|k| k.rules.id == "renter-night").unwrap();
    assert_eq!(
        night.rules.schedule,
        Schedule::Weekly {
            days: WeekdaySet::of(&[Weekday::Friday, Weekday::Saturday]),
            window: Some(Window {
                start: time(22, 0, 0, 0),
                end: time(2, 0, 0, 0)
            }),
        }
    );
}

#[test]
fn json_gives_the_same_keys() {
    let json = r#"{
        "salt": "73616c74",
        "keys": [{
            "id": "k1", "name": "Ann", "doors": ["main"],
            "valid_from": "2026-01-01T00:00:00Z",
            "schedule": {"repeat": "daily", "window": {"start": "08:00", "end": "18:30"}},
            "use_limit": {"limit": "per_door", "uses": 3},
            "credentials": [{"kind": "pin", "value": "482916"}]
        }]
    }"#;
    let file = KeyFile::from_json(json).unwrap();
    let toml = parse(
        r#"
[[keys]]
id = "k1"
name = "Ann"
doors = ["main"]
valid_from = "2026-01-01T00:00:00Z"
schedule = { repeat = "daily", window = { start = "08:00", end = "18:30" } }
use_limit = { limit = "per_door", uses = 3 }
credentials = [{ kind = "pin", value = "482916" }]
"#,
    )
    .unwrap();
    assert_eq!(file, toml);
    let err = KeyFile::from_json(&json.replace("\"uses\": 3", "\"uses\": -3"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("keys[0] (id \"k1\"), field `use_limit.uses`"),
        "{err}"
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one table of cases
fn errors_name_the_key_and_the_field() {
    let cases = [
        (
            MINIMAL.replace("doors", "dors"),
            "keys[0] (id \"k1\"), field `dors`:",
            "unknown field",
        ),
        (
            MINIMAL.replace("name = \"Ann\"", "name = \"Ann\"\ncategory = \"neighbour\""),
            "field `category`",
            "neighbour",
        ),
        (
            MINIMAL.replace("\"pin\"", "\"nfc\""),
            "field `credentials[0].kind`",
            "nfc",
        ),
        (
            MINIMAL.replace("\"482916\"", "\"48x916\""),
            "field `credentials[0].value`",
            "digits only",
        ),
        (
            MINIMAL.replace("value = \"482916\"", "value = \"1\", hex = \"01\""),
            "field `credentials[0].value`",
            "exactly one",
        ),
        (
            MINIMAL.replace("doors = [\"main\"]", "doors = []"),
            "field `doors`",
            "at least one door",
        ),
        (
            format!("{MINIMAL}use_limit = {{ limit = \"total\" }}\n"),
            "field `use_limit.uses`",
            "single-use",
        ),
        (
            format!("{MINIMAL}use_limit = {{ limit = \"total\", uses = 0 }}\n"),
            "field `use_limit.uses`",
            "at least 1",
        ),
        (
            format!(
                "{MINIMAL}schedule = {{ repeat = \"weekly\", days = [\"mon\", \"funday\"] }}\n"
            ),
            "field `schedule.days[1]`",
            "funday",
        ),
        (
            format!("{MINIMAL}schedule = {{ repeat = \"weekly\" }}\n"),
            "field `schedule.days`",
            "needs the days",
        ),
        (
            format!("{MINIMAL}schedule = {{ repeat = \"daily\" }}\n"),
            "field `schedule.window`",
            "needs a window",
        ),
        (
            format!(
                "{MINIMAL}schedule = {{ repeat = \"daily\", window = {{ start = \"08:00\", end = \"08:00\" }} }}\n"
            ),
            "field `schedule.window`",
            "equal",
        ),
        (
            format!(
                "{MINIMAL}schedule = {{ repeat = \"daily\", window = {{ start = \"25:00\", end = \"08:00\" }} }}\n"
            ),
            "field `schedule.window.start`",
            "",
        ),
        (
            format!("{MINIMAL}valid_from = \"yesterday\"\n"),
            "field `valid_from`",
            "",
        ),
        (
            format!(
                "{MINIMAL}valid_from = \"2026-02-01T00:00:00Z\"\nvalid_until = \"2026-01-01T00:00:00Z\"\n"
            ),
            "field `valid_until`",
            "not after",
        ),
        (
            format!("{MINIMAL}welcome = \"{}\"\n", "x".repeat(65)),
            "field `welcome`",
            "at most 64",
        ),
        (
            format!("{MINIMAL}floors = [1, 70000]\n"),
            "field `floors[1]`",
            "",
        ),
        (
            format!("{MINIMAL}{}", MINIMAL.replace("482916", "111")),
            "keys[1] (id \"k1\"), field `id`",
            "the same id as keys[0]",
        ),
        (
            MINIMAL.replace("id = \"k1\"\n", ""),
            "keys[0], field `id`",
            "missing",
        ),
    ];
    for (text, at, detail) in cases {
        let err = error(&text);
        assert!(err.contains(at), "expected {at:?} in {err:?}");
        assert!(err.contains(detail), "expected {detail:?} in {err:?}");
    }
}

#[test]
fn file_level_problems_are_named_too() {
    let err = KeyFile::from_toml(MINIMAL).unwrap_err().to_string();
    assert!(err.contains("salt"), "{err}");
    let err = KeyFile::from_toml(&format!("salt = \"zz\"\n{MINIMAL}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("field `salt`") && err.contains("not hex"),
        "{err}"
    );
    let err = KeyFile::from_toml(&format!("salt = \"{}\"\n", "00".repeat(65)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 64"), "{err}");
    let err = KeyFile::from_toml("salt = \"\"\nsite = \"s1\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("site"), "{err}");
    let err = KeyFile::from_toml("salt = [").unwrap_err().to_string();
    assert!(!err.is_empty());
}
