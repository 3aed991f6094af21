//! Configuration values that are written as human strings and checked as they are read:
//! durations, byte sizes, secrets, Ed25519 public keys, the broker URL, the time zone and the
//! log level.
//!
//! Each type reads what an operator writes and prints back the same form, so the effective
//! configuration that `check-config` prints can be loaded again.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::SignedDuration;
use jiff::tz::TimeZone;
use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parses a duration such as `30s`, `15m`, `1h 30m`, `250ms` or `2 seconds` (jiff's "friendly"
/// format; ISO 8601 such as `PT30S` is accepted too). Negative durations are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as \"30s\", \"15m\" or \"1h 30m\"");
    let signed: SignedDuration = text.trim().parse().map_err(|_| bad())?;
    if signed.is_negative() {
        return Err(format!(
            "`{text}` is negative; a duration here must be positive"
        ));
    }
    Duration::try_from(signed).map_err(|_| bad())
}

/// Prints a duration the way [`parse_duration`] reads it (`90s` → `1m 30s`).
pub fn format_duration(duration: Duration) -> String {
    match SignedDuration::try_from(duration) {
        Ok(signed) => format!("{signed:#}"),
        // Beyond jiff's range (about 292 billion years): seconds are still exact.
        Err(_) => format!("{}s", duration.as_secs()),
    }
}

/// Serde for a [`Duration`] written as a human string, for `#[serde(with = "...")]`.
pub(crate) mod duration {
    use super::{Deserializer, Duration, Serializer, Visitor, de, fmt, format_duration};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"15m\" or \"1h 30m\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
                super::parse_duration(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Serde for a [`Duration`] that may be `"auto"` (`None`: the program works it out), else a
/// human string as for [`duration`].
pub(crate) mod auto_duration {
    use super::{Deserializer, Duration, Serializer, Visitor, de, fmt, format_duration};

    /// The word for `None`.
    pub const AUTO: &str = "auto";

    // serde's `with` hands over a reference to the field.
    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&format_duration(*d)),
            None => serializer.serialize_str(AUTO),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        struct AutoVisitor;

        impl Visitor<'_> for AutoVisitor {
            type Value = Option<Duration>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\" or a duration string such as \"300us\" or \"2ms\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<Duration>, E> {
                if text.trim() == AUTO {
                    return Ok(None);
                }
                super::parse_duration(text).map(Some).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(AutoVisitor)
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Parses a byte size: a plain number of bytes (`131072`) or a number with a unit: `B`,
/// `KiB`, `MiB`, `GiB` (powers of 1024) or `kB`, `MB`, `GB` (powers of 1000). Units are not
/// case-sensitive; a space between number and unit is optional.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size such as \"128 KiB\", \"64 MiB\" or \"4096\"");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Prints a byte size the way [`parse_byte_size`] reads it, in the largest binary unit that
/// divides it (`131072` → `128 KiB`).
pub fn format_byte_size(bytes: u64) -> String {
    for (unit, factor) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes != 0 && bytes.is_multiple_of(factor) {
            return format!("{} {unit}", bytes / factor);
        }
    }
    format!("{bytes} B")
}

/// Serde for a byte count written as a number or a human string, for `#[serde(with = "...")]`.
pub(crate) mod byte_size {
    use super::{Deserializer, Serializer, Unexpected, Visitor, de, fmt, format_byte_size};

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` passes a reference
    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_byte_size(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = u64;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"128 KiB\" or a number of bytes")
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<u64, E> {
                Ok(bytes)
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<u64, E> {
                u64::try_from(bytes).map_err(|_| E::invalid_value(Unexpected::Signed(bytes), &self))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
                super::parse_byte_size(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A secret (a password): never printed. `Debug` and `Serialize` show `<redacted>`; the value
/// is read with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// What every printed form of a secret shows instead of it.
    pub const REDACTED: &'static str = "<redacted>";

    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (the broker login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::REDACTED)
    }
}

/// An Ed25519 public key the cloud signs key sets and commands with, written as 64 hex digits.
///
/// Only the encoding is checked here; whether the 32 bytes are a valid curve point is up to the
/// signature check.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrustedKey(pub [u8; 32]);

impl TrustedKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for TrustedKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let digits = text.trim();
        if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(format!(
                "{bad:?} is not a hex digit; an Ed25519 public key is written as 64 hex digits"
            ));
        }
        if digits.len() != 64 {
            return Err(format!(
                "an Ed25519 public key is 64 hex digits (32 bytes), this one has {}",
                digits.len()
            ));
        }
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(digits.as_bytes().chunks_exact(2)) {
            // Both bytes are ASCII hex digits (checked above), so this cannot fail.
            let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
        }
        Ok(TrustedKey(key))
    }
}

impl fmt::Display for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({self})")
    }
}

/// The address of the MQTT broker: `mqtts://host:8883` (TLS) or `mqtt://host:1883` (plain).
/// The port defaults to 8883 and 1883 respectively. Credentials do not belong in the URL: they
/// go in `cloud.username` and `cloud.password`, where they are redacted when printed.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    /// A host name or IP address (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
}

impl Default for BrokerUrl {
    /// A placeholder only: loading refuses a configuration that does not set `cloud.url`.
    fn default() -> Self {
        BrokerUrl {
            tls: true,
            host: "localhost".to_owned(),
            port: 8883,
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            format!("`{text}` is not a URL such as \"mqtts://broker.example.com:8883\"")
        })?;
        let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "mqtts" => (true, 8883),
            "mqtt" => (false, 1883),
            _ => {
                return Err(format!(
                    "scheme `{scheme}` is not supported; use mqtts:// or mqtt://"
                ));
            }
        };
        if rest.contains('@') {
            return Err(
                "the URL must not carry credentials; set cloud.username and cloud.password".into(),
            );
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "`{text}` has a path, query or fragment; give only host and port"
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("`{text}` has an unclosed `[`"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("`{text}`: expected `:port` after `]`")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("`{text}` has no valid host"));
        }
        let port = match port {
            None => default_port,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(format!("`{port}` is not a port number (1 to 65535)")),
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// The most broker URLs `cloud.url` may list.
pub const MAX_BROKER_URLS: usize = 16;

/// `cloud.url`: one broker, or several (the nodes of a cluster, a standby broker) that the
/// link tries in the order given, moving to the next at once when one fails. Written as one
/// URL string or an array of them; printed back the same way.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<BrokerUrl>);

impl BrokerUrls {
    /// The URLs in the order they are tried (never empty).
    pub fn iter(&self) -> std::slice::Iter<'_, BrokerUrl> {
        self.0.iter()
    }

    /// The first URL: the one tried first.
    pub fn first(&self) -> &BrokerUrl {
        &self.0[0]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: kept for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether any URL is `mqtts://`.
    pub fn any_tls(&self) -> bool {
        self.0.iter().any(|u| u.tls)
    }
}

impl<'a> IntoIterator for &'a BrokerUrls {
    type Item = &'a BrokerUrl;
    type IntoIter = std::slice::Iter<'a, BrokerUrl>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Default for BrokerUrls {
    /// A placeholder only: loading refuses a configuration that does not set `cloud.url`.
    fn default() -> Self {
        BrokerUrls(vec![BrokerUrl::default()])
    }
}

impl From<BrokerUrl> for BrokerUrls {
    fn from(url: BrokerUrl) -> Self {
        BrokerUrls(vec![url])
    }
}

impl TryFrom<Vec<BrokerUrl>> for BrokerUrls {
    type Error = String;

    fn try_from(urls: Vec<BrokerUrl>) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("lists no broker; give at least one URL".to_owned());
        }
        if urls.len() > MAX_BROKER_URLS {
            return Err(format!(
                "lists {} brokers; at most {MAX_BROKER_URLS}",
                urls.len()
            ));
        }
        for (i, url) in urls.iter().enumerate() {
            if urls[..i].contains(url) {
                return Err(format!("lists {url} twice"));
            }
        }
        Ok(BrokerUrls(urls))
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrls({self})")
    }
}

impl Serialize for BrokerUrls {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(serializer),
            many => many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UrlsVisitor;

        impl<'de> Visitor<'de> for UrlsVisitor {
            type Value = BrokerUrls;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a URL such as \"mqtts://broker.example.com:8883\", or an array of them",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<BrokerUrls, E> {
                text.parse::<BrokerUrl>()
                    .map(BrokerUrls::from)
                    .map_err(E::custom)
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<BrokerUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<BrokerUrl>()? {
                    if urls.len() == MAX_BROKER_URLS {
                        return Err(de::Error::custom(format!(
                            "lists more than {MAX_BROKER_URLS} brokers"
                        )));
                    }
                    urls.push(url);
                }
                BrokerUrls::try_from(urls).map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_any(UrlsVisitor)
    }
}

/// A site's time zone: its IANA name (`Europe/Berlin`) and the zone found for it in the
/// system's time zone database.
#[derive(Clone, Debug)]
pub struct SiteTimeZone {
    name: String,
    tz: TimeZone,
}

impl SiteTimeZone {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }
}

impl Default for SiteTimeZone {
    /// A placeholder only: loading refuses a configuration that does not set `site.timezone`.
    fn default() -> Self {
        SiteTimeZone {
            name: "UTC".to_owned(),
            tz: TimeZone::UTC,
        }
    }
}

impl PartialEq for SiteTimeZone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl FromStr for SiteTimeZone {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        let name = name.trim();
        match TimeZone::get(name) {
            Ok(tz) => Ok(SiteTimeZone {
                name: name.to_owned(),
                tz,
            }),
            Err(_) => Err(format!(
                "unknown time zone `{name}`: expected an IANA name such as \"Europe/Berlin\" \
                 (see /usr/share/zoneinfo)"
            )),
        }
    }
}

/// Implements `Serialize` through `Display` and `Deserialize` through `FromStr` for a type
/// written as one string.
macro_rules! string_serde {
    ($ty:ty, $display:expr, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let display: fn(&$ty) -> String = $display;
                serializer.serialize_str(&display(self))
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct StrVisitor;

                impl Visitor<'_> for StrVisitor {
                    type Value = $ty;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, text: &str) -> Result<$ty, E> {
                        text.parse().map_err(E::custom)
                    }
                }

                deserializer.deserialize_str(StrVisitor)
            }
        }
    };
}

string_serde!(
    TrustedKey,
    ToString::to_string,
    "64 hex digits (an Ed25519 public key)"
);
string_serde!(
    BrokerUrl,
    ToString::to_string,
    "a URL such as \"mqtts://broker.example.com:8883\""
);
string_serde!(
    SiteTimeZone,
    |tz| tz.name.clone(),
    "an IANA time zone name such as \"Europe/Berlin\""
);

/// How much the daemon logs (a `tracing` level). `DOORBRIDGE_LOG` overrides it with a full
/// filter directive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serde for a unit-only enum (such as [`crate::access::UnlimitedPolicy`]) read from a string
/// only. figment would otherwise read the number `1` as the enum's second variant, so a typo
/// such as `policy = 1` would pass.
pub(crate) mod string_enum {
    use serde::de::DeserializeOwned;
    use serde::de::value::StrDeserializer;

    use super::{Deserialize, Deserializer, Serialize, Serializer, de};

    pub fn serialize<T: Serialize, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(deserializer)?;
        T::deserialize(StrDeserializer::<de::value::Error>::new(&text))
            .map_err(<D::Error as de::Error>::custom)
    }
}

/// Serde for a door unit's bus address (1 to 126), read as any integer so an out-of-range
/// value gets a message that says the range rather than "expected u8".
pub(crate) mod unit_address {
    use super::{Deserializer, Serializer, Unexpected, Visitor, de, fmt};

    pub const RANGE: std::ops::RangeInclusive<u8> = 1..=126;

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` passes a reference
    pub fn serialize<S: Serializer>(value: &u8, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(*value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
        struct AddressVisitor;

        impl Visitor<'_> for AddressVisitor {
            type Value = u8;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a bus address from {} to {}", RANGE.start(), RANGE.end())
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<u8, E> {
                u8::try_from(value)
                    .ok()
                    .filter(|a| RANGE.contains(a))
                    .ok_or_else(|| {
                        E::custom(format!(
                            "address {value} is out of range: a door unit's address is {} to {}",
                            RANGE.start(),
                            RANGE.end()
                        ))
                    })
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<u8, E> {
                let value = i64::try_from(value)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))?;
                self.visit_i64(value)
            }
        }

        deserializer.deserialize_any(AddressVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_print_human_strings() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("PT2S"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("soon").is_err());
        for text in ["30s", "15m", "1h 30m", "250ms", "0s", "1h"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn byte_sizes_read_and_print_human_strings() {
        assert_eq!(parse_byte_size("128 KiB"), Ok(128 * 1024));
        assert_eq!(parse_byte_size("128KiB"), Ok(128 * 1024));
        assert_eq!(parse_byte_size("64 mib"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_byte_size("2 MB"), Ok(2_000_000));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("KiB").is_err());
        assert!(parse_byte_size("99999999999999 GiB").is_err());
        assert_eq!(format_byte_size(128 * 1024), "128 KiB");
        assert_eq!(format_byte_size(1000), "1000 B");
        assert_eq!(format_byte_size(0), "0 B");
    }

    #[test]
    fn trusted_keys_are_64_hex_digits() {
        let hex = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
        let key: TrustedKey = hex.parse().unwrap();
        assert_eq!(key.0[0], 0x3d);
        assert_eq!(key.to_string(), hex);
        assert!(hex[..62].parse::<TrustedKey>().is_err());
        assert!(format!("{}zz", &hex[..62]).parse::<TrustedKey>().is_err());
    }

    #[test]
    fn broker_urls() {
        let url: BrokerUrl = "mqtts://broker.example.com".parse().unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "broker.example.com", 8883)
        );
        let url: BrokerUrl = "mqtt://127.0.0.1:1884/".parse().unwrap();
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (false, "127.0.0.1", 1884)
        );
        let url: BrokerUrl = "mqtt://[::1]:1883".parse().unwrap();
        assert_eq!(url.host, "::1");
        assert_eq!(url.to_string(), "mqtt://[::1]:1883");
        for bad in [
            "broker:1883",
            "http://broker",
            "mqtt://user:pw@broker",
            "mqtt://broker:0",
            "mqtt://broker:99999",
            "mqtt://broker/topic",
            "mqtt://",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cloud_url_takes_one_url_or_a_list() {
        use figment::Figment;
        use figment::providers::{Format, Toml};
        #[derive(Deserialize, Serialize)]
        struct Cloud {
            url: BrokerUrls,
        }
        let read = |text: &str| {
            Figment::from(Toml::string(text))
                .extract::<Cloud>()
                .map_err(|e| e.to_string())
        };
        let one = read("url = \"mqtt://a:1883\"").unwrap();
        assert_eq!(one.url.len(), 1);
        assert_eq!(
            super::super::toml_out::to_toml(&one).trim(),
            "url = \"mqtt://a:1883\""
        );
        let many = read("url = [\"mqtt://a\", \"mqtts://b:8884\"]").unwrap();
        assert_eq!(many.url.to_string(), "mqtt://a:1883, mqtts://b:8884");
        assert!(many.url.any_tls());
        let again = read(&super::super::toml_out::to_toml(&many)).unwrap();
        assert_eq!(again.url, many.url);
        for (bad, why) in [
            ("url = []", "no broker"),
            ("url = [\"mqtt://a\", \"mqtt://a:1883\"]", "twice"),
            ("url = [\"mqtt://a\", \"http://b\"]", "scheme"),
        ] {
            let error = read(bad).err().unwrap();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn time_zones_come_from_the_database() {
        let tz: SiteTimeZone = "Europe/Berlin".parse().unwrap();
        assert_eq!(tz.name(), "Europe/Berlin");
        assert!("Europe/Berlln".parse::<SiteTimeZone>().is_err());
    }
}
