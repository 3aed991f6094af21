//! A human-readable key set: TOML (or JSON when the file name ends in `.json`) in the seeds'
//! terms, turned into [`Key`]s with their credential digests, as the cloud would hold them.
//!
//! The file gives credentials in clear (a courier's PIN, a visitor's QR token, a mobile key)
//! and the site salt; each becomes `access::credential::digest(salt, kind, value)`, the digest
//! the gateway computes at the door. The salt lives at the top of the file (`salt`, hex) because
//! it belongs to the key set: it travels in the snapshot manifest, and a delta's keys must be
//! made with the salt of the snapshot the gateway holds. The format is `docs/keys-file.md`;
//! `config/keys.example.toml` shows every key type.
//!
//! Unknown fields are refused, and every error names the key (index and id) and the field.

use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::Value;
use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use serde::Deserialize;

use doorbridge_proto::access::credential::{digest, parse_card};
use doorbridge_proto::access::{
    Category, Credential, CredentialKind, DoorId, Key, KeyRules, Schedule, UseLimit, WeekdaySet,
    Window,
};
use doorbridge_proto::bus::message::{MAX_CREDENTIAL, MAX_FLOORS, MAX_WELCOME};
use doorbridge_proto::cloud::payload::{MAX_ID, MAX_SALT};

/// A key set read from a keys file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFile {
    /// The site salt the credential digests were made with (goes into the manifest).
    pub salt: Vec<u8>,
    pub keys: Vec<Key>,
}

/// Where in the file a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A top-level field (`salt`, `keys`) or the file as a whole (empty).
    File { field: String },
    /// A field of the key at `index` (0-based, in file order).
    Key {
        index: usize,
        id: Option<String>,
        field: String,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { field } if field.is_empty() => f.write_str("the file"),
            Location::File { field } => write!(f, "field `{field}`"),
            Location::Key { index, id, field } => {
                write!(f, "keys[{index}]")?;
                if let Some(id) = id {
                    write!(f, " (id {id:?})")?;
                }
                if field.is_empty() {
                    Ok(())
                } else {
                    write!(f, ", field `{field}`")
                }
            }
        }
    }
}

/// Why a keys file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
}

impl KeyFileError {
    fn file(field: &str, message: impl Into<String>) -> Self {
        KeyFileError::Invalid {
            at: Location::File {
                field: field.into(),
            },
            message: message.into(),
        }
    }
}

/// The top of the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    salt: String,
    #[serde(default)]
    keys: Vec<Value>,
}

fn friend() -> Category {
    Category::Friend
}

/// One key as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    name: String,
    #[serde(default = "friend")]
    category: Category,
    doors: Vec<String>,
    #[serde(default)]
    opens_inner_door: bool,
    #[serde(default)]
    valid_from: Option<Timestamp>,
    #[serde(default)]
    valid_until: Option<Timestamp>,
    #[serde(default)]
    schedule: ScheduleEntry,
    #[serde(default)]
    use_limit: UseLimitEntry,
    #[serde(default)]
    welcome: Option<String>,
    #[serde(default)]
    floors: Vec<i16>,
    #[serde(default)]
    revoked: bool,
    credentials: Vec<CredentialEntry>,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Repeat {
    #[default]
    Always,
    Daily,
    Weekly,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleEntry {
    repeat: Repeat,
    #[serde(default)]
    days: Option<Vec<String>>,
    #[serde(default)]
    window: Option<WindowEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowEntry {
    start: Time,
    end: Time,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Limit {
    #[default]
    Unlimited,
    Total,
    PerDoor,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UseLimitEntry {
    limit: Limit,
    #[serde(default)]
    uses: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialEntry {
    kind: CredentialKind,
    /// The value as text (its UTF-8 bytes).
    #[serde(default)]
    value: Option<String>,
    /// The value as hex, for binary QR tokens or mobile keys.
    #[serde(default)]
    hex: Option<String>,
}

impl KeyFile {
    /// Reads a keys file: JSON if its name ends in `.json`, else TOML.
    pub fn read(path: &Path) -> Result<KeyFile, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let result = if json {
            KeyFile::from_json(&text)
        } else {
            KeyFile::from_toml(&text)
        };
        result.map_err(|e| match e {
            KeyFileError::Syntax(m) => KeyFileError::Syntax(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<KeyFile, KeyFileError> {
        let raw: RawFile = Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| figment_error(&e, None))?;
        KeyFile::from_raw(raw)
    }

    pub fn from_json(text: &str) -> Result<KeyFile, KeyFileError> {
        let raw: RawFile =
            serde_json::from_str(text).map_err(|e| KeyFileError::Syntax(e.to_string()))?;
        KeyFile::from_raw(raw)
    }

    fn from_raw(raw: RawFile) -> Result<KeyFile, KeyFileError> {
        let salt = parse_hex(&raw.salt).map_err(|m| KeyFileError::file("salt", m))?;
        if salt.len() > MAX_SALT {
            return Err(KeyFileError::file(
                "salt",
                format!("{} bytes, at most {MAX_SALT}", salt.len()),
            ));
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut seen = std::collections::HashMap::new();
        for (index, value) in raw.keys.into_iter().enumerate() {
            let id = value
                .find_ref("id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let entry: KeyEntry = value
                .deserialize()
                .map_err(|e| figment_error(&e, Some((index, id.clone()))))?;
            let key = entry
                .into_key(&salt)
                .map_err(|(field, message)| KeyFileError::Invalid {
                    at: Location::Key {
                        index,
                        id: id.clone(),
                        field,
                    },
                    message,
                })?;
            if let Some(first) = seen.insert(key.rules.id.clone(), index) {
                return Err(KeyFileError::Invalid {
                    at: Location::Key {
                        index,
                        id,
                        field: "id".into(),
                    },
                    message: format!("the same id as keys[{first}]"),
                });
            }
            keys.push(key);
        }
        Ok(KeyFile { salt, keys })
    }
}

type FieldError = (String, String);

fn field_err(field: &str, message: impl Into<String>) -> FieldError {
    (field.to_owned(), message.into())
}

impl KeyEntry {
    fn into_key(self, salt: &[u8]) -> Result<Key, FieldError> {
        if self.id.is_empty() || self.id.len() > MAX_ID {
            return Err(field_err("id", format!("1 to {MAX_ID} bytes")));
        }
        if self.doors.is_empty() {
            return Err(field_err("doors", "a key must list at least one door"));
        }
        for (i, door) in self.doors.iter().enumerate() {
            if door.is_empty() || door.len() > MAX_ID {
                return Err(field_err(
                    &format!("doors[{i}]"),
                    format!("a door id is 1 to {MAX_ID} bytes"),
                ));
            }
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.valid_until)
            && until <= from
        {
            return Err(field_err(
                "valid_until",
                format!("{until} is not after valid_from {from}"),
            ));
        }
        if let Some(w) = &self.welcome
            && w.len() > MAX_WELCOME
        {
            return Err(field_err(
                "welcome",
                format!("{} bytes; door units show at most {MAX_WELCOME}", w.len()),
            ));
        }
        if self.floors.len() > MAX_FLOORS {
            return Err(field_err(
                "floors",
                format!(
                    "{} floors; a grant releases at most {MAX_FLOORS}",
                    self.floors.len()
                ),
            ));
        }
        let schedule = self.schedule.into_schedule()?;
        let use_limit = self.use_limit.into_limit()?;
        if self.credentials.is_empty() && !self.revoked {
            return Err(field_err(
                "credentials",
                "a key needs at least one credential (pin, qr or mobile)",
            ));
        }
        let credentials = self
            .credentials
            .into_iter()
            .enumerate()
            .map(|(i, c)| c.into_credential(salt, i))
            .collect::<Result<_, _>>()?;
        Ok(Key {
            rules: KeyRules {
                id: self.id.into(),
                name: self.name,
                category: self.category,
                doors: self.doors.into_iter().map(DoorId::from).collect(),
                opens_inner_door: self.opens_inner_door,
                valid_from: self.valid_from,
                valid_until: self.valid_until,
                schedule,
                use_limit,
                welcome: self.welcome,
                floors: self.floors,
                revoked: self.revoked,
                issuer: None,
            },
            credentials,
        })
    }
}

impl ScheduleEntry {
    fn into_schedule(self) -> Result<Schedule, FieldError> {
        let window = self.window.map(|w| Window {
            start: w.start,
            end: w.end,
        });
        if window.is_some_and(|w| w.start == w.end) {
            return Err(field_err(
                "schedule.window",
                "start and end are equal; leave the window out for a whole day",
            ));
        }
        match (self.repeat, self.days, window) {
            (Repeat::Always, None, None) => Ok(Schedule::Always),
            (Repeat::Always | Repeat::Daily, Some(_), _) => Err(field_err(
                "schedule.days",
                "days belong to repeat = \"weekly\" only",
            )),
            (Repeat::Always, None, Some(_)) => Err(field_err(
                "schedule.window",
                "repeat = \"always\" has no window; use repeat = \"daily\"",
            )),
            (Repeat::Daily, None, None) => Err(field_err(
                "schedule.window",
                "repeat = \"daily\" needs a window { start, end }",
            )),
            (Repeat::Daily, None, Some(window)) => Ok(Schedule::Daily { window }),
            (Repeat::Weekly, None, _) => Err(field_err(
                "schedule.days",
                "repeat = \"weekly\" needs the days it works on",
            )),
            (Repeat::Weekly, Some(days), window) => {
                let mut set = WeekdaySet(0);
                for (i, day) in days.iter().enumerate() {
                    let d = parse_weekday(day).ok_or_else(|| {
                        field_err(
                            &format!("schedule.days[{i}]"),
                            format!("{day:?} is not a weekday (mon, tue, … sun)"),
                        )
                    })?;
                    set = set.with(d);
                }
                if set.is_empty() {
                    return Err(field_err("schedule.days", "names no weekday"));
                }
                Ok(Schedule::Weekly { days: set, window })
            }
        }
    }
}

impl UseLimitEntry {
    fn into_limit(self) -> Result<UseLimit, FieldError> {
        match (self.limit, self.uses) {
            (Limit::Unlimited, None) => Ok(UseLimit::Unlimited),
            (Limit::Unlimited, Some(_)) => Err(field_err(
                "use_limit.uses",
                "an unlimited key has no use count",
            )),
            (Limit::Total | Limit::PerDoor, None) => Err(field_err(
                "use_limit.uses",
                "missing: how many uses (1 for a single-use key)",
            )),
            (_, Some(0)) => Err(field_err("use_limit.uses", "must be at least 1")),
            (Limit::Total, Some(n)) => Ok(UseLimit::Total(n)),
            (Limit::PerDoor, Some(n)) => Ok(UseLimit::PerDoor(n)),
        }
    }
}

impl CredentialEntry {
    fn into_credential(self, salt: &[u8], i: usize) -> Result<Credential, FieldError> {
        let at = |f: &str| format!("credentials[{i}].{f}");
        let value = match (self.value, self.hex) {
            // A card is its bits, written BITS:HEX (docs/keys-file.md).
            (Some(v), None) if self.kind == CredentialKind::Card => {
                parse_card(&v).map_err(|m| field_err(&at("value"), m))?
            }
            (None, Some(_)) if self.kind == CredentialKind::Card => {
                return Err(field_err(
                    &at("hex"),
                    "write a card as value = \"BITS:HEX\", e.g. \"26:0a1b2c40\"",
                ));
            }
            (Some(v), None) => v.into_bytes(),
            (None, Some(h)) => parse_hex(&h).map_err(|m| field_err(&at("hex"), m))?,
            _ => {
                return Err(field_err(
                    &at("value"),
                    "give exactly one of value (text) or hex (bytes)",
                ));
            }
        };
        if value.is_empty() || value.len() > MAX_CREDENTIAL {
            return Err(field_err(
                &at("value"),
                format!("1 to {MAX_CREDENTIAL} bytes"),
            ));
        }
        if self.kind == CredentialKind::Pin && !value.iter().all(u8::is_ascii_digit) {
            return Err(field_err(&at("value"), "a PIN is digits only"));
        }
        Ok(Credential {
            kind: self.kind,
            digest: digest(salt, self.kind, &value),
        })
    }
}

fn parse_weekday(s: &str) -> Option<Weekday> {
    let s = s.to_ascii_lowercase();
    let days = [
        ("mon", Weekday::Monday),
        ("tue", Weekday::Tuesday),
        ("wed", Weekday::Wednesday),
        ("thu", Weekday::Thursday),
        ("fri", Weekday::Friday),
        ("sat", Weekday::Saturday),
        ("sun", Weekday::Sunday),
    ];
    days.into_iter().find_map(|(short, day)| {
        let full = format!("{day:?}").to_ascii_lowercase();
        (s == short || s == full).then_some(day)
    })
}

/// Hex digits (upper or lower case, even count) to bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err(format!("{s:?} is not hex: an odd number of digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("{s:?} is not hex"))
        })
        .collect()
}

/// Turns a figment error into ours, naming the key and field.
fn figment_error(e: &figment::Error, key: Option<(usize, Option<String>)>) -> KeyFileError {
    let message = e.kind.to_string();
    let mut path = e.path.clone();
    let named = match &e.kind {
        figment::error::Kind::MissingField(f) => Some(f.to_string()),
        figment::error::Kind::UnknownField(f, _) => Some(f.clone()),
        _ => None,
    };
    if let Some(f) = named.filter(|f| path.last() != Some(f)) {
        path.push(f);
    }
    match key {
        Some((index, id)) => KeyFileError::Invalid {
            at: Location::Key {
                index,
                id,
                field: dotted(&path),
            },
            message,
        },
        None if path.first().is_some_and(|p| p == "keys") && path.len() >= 2 => {
            let index = path[1].parse().unwrap_or(0);
            path.drain(..2);
            KeyFileError::Invalid {
                at: Location::Key {
                    index,
                    id: None,
                    field: dotted(&path),
                },
                message,
            }
        }
        None if path.is_empty() => KeyFileError::Syntax(e.to_string()),
        None => KeyFileError::file(&dotted(&path), message),
    }
}

/// `["credentials", "0", "kind"]` → `credentials[0].kind`.
fn dotted(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            out.push('[');
            out.push_str(part);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests;
