//! Configuration: typed, layered (file, `config.d`, environment), validated after loading.
//!
//! Sources, later wins (see `docs/configuration.md`):
//!
//! 1. the main file, `/etc/doorbridge/doorbridge.toml` unless `--config PATH` names another;
//! 2. `config.d/*.toml` in the main file's directory, in sorted file-name order;
//! 3. `DOORBRIDGE_*` environment variables, `__` between nested keys
//!    (`DOORBRIDGE_STORAGE__PATH`). `DOORBRIDGE_LOG` (the log filter) and `DOORBRIDGE_CONFIG`
//!    (the `--config` default) are not configuration keys and are skipped.
//!
//! [`load`] reports every problem at once, each with the key and the file or variable it came
//! from: unknown keys (a typo never passes silently), values of the wrong type or form, and
//! rules between values (duplicate addresses or doors, missing required keys, bad ranges).
//!
//! - [`values`]: value types written as human strings (durations, sizes, keys, URL, zone);
//! - `load`: reading the sources, merging, unknown keys, typed reading that keeps going;
//! - `validate`: the rules between values;
//! - `keypath`: key paths in the merged tree and the source that set each value (both of the
//!   above use it; neither reaches into the other);
//! - `toml_out`: printing the effective configuration back as TOML.

mod keypath;
mod load;
mod toml_out;
mod validate;
pub mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::{Door, DoorId, LockoutPolicy, Policy, Site, UnlimitedPolicy};
pub use values::{BrokerUrl, BrokerUrls, LogLevel, Secret, SiteTimeZone, TrustedKey};
use values::{auto_duration, byte_size, duration, string_enum, unit_address};

/// The main configuration file when `--config` is not given.
pub const DEFAULT_FILE: &str = "/etc/doorbridge/doorbridge.toml";
/// The directory of drop-in files, next to the main file.
pub const DROPIN_DIR_NAME: &str = "config.d";
/// Environment variables with this prefix set configuration keys.
pub const ENV_PREFIX: &str = "DOORBRIDGE_";
/// The log filter override (an `EnvFilter` directive); not a configuration key.
pub const LOG_ENV: &str = "DOORBRIDGE_LOG";
/// The default for `--config`; not a configuration key.
pub const CONFIG_ENV: &str = "DOORBRIDGE_CONFIG";

/// Where the configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sources {
    /// The main file. It must exist.
    pub file: PathBuf,
    /// Drop-in files (`*.toml`) read after the main file, in sorted name order. Derived by
    /// [`Sources::new`] as the main file's directory + `config.d`; may be absent.
    pub dropin_dir: PathBuf,
    /// Whether `DOORBRIDGE_*` environment variables are read last.
    pub env: bool,
}

impl Sources {
    /// The sources for main file `file` (`None`: [`DEFAULT_FILE`]), its `config.d`, and the
    /// environment.
    pub fn new(file: Option<&Path>) -> Sources {
        let file = file.map_or_else(|| PathBuf::from(DEFAULT_FILE), Path::to_path_buf);
        let dropin_dir = file.parent().unwrap_or(Path::new("")).join(DROPIN_DIR_NAME);
        Sources {
            file,
            dropin_dir,
            env: true,
        }
    }
}

/// Loads, merges and validates the configuration from `sources`.
pub fn load(sources: &Sources) -> Result<Config, ConfigErrors> {
    load_with_layers(sources).map(|(config, _)| config)
}

/// Like [`load`], and also names the sources that contributed, in the order they were applied
/// (file paths, then environment variable names).
pub fn load_with_layers(sources: &Sources) -> Result<(Config, Vec<String>), ConfigErrors> {
    load::load(sources)
}

/// Whether this gateway is unconfigured: no file or `DOORBRIDGE_*` variable of `sources` sets
/// any key. `/etc/doorbridge/doorbridge.toml` as the Debian package ships it is in this state
/// (every key commented out), and the unit's `ExecCondition=` (`doorbridge check-config
/// --configured`) skips the start then instead of failing. A source that cannot be read or
/// parsed counts as configured, so that [`load`] reports it: only a configuration nobody has
/// begun is passed over quietly.
pub fn is_unconfigured(sources: &Sources) -> bool {
    load::sets_no_key(sources, std::env::vars_os())
}

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key path, e.g. `buses[0].units[1].address`; empty for a whole file.
    pub key: String,
    /// Where the value came from: a file path, an environment variable name such as
    /// `DOORBRIDGE_STORAGE__PATH`, or `default` for a built-in default.
    pub source: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.message)
        }
    }
}

/// Everything wrong with the configuration; never empty. Displays one problem per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// The whole configuration. Every field has a default so that reading can go on past a bad
/// value; keys without a sensible default (`gateway.id`, `site.timezone`, `cloud.url`, …) are
/// required by validation, so a loaded `Config` always has them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub site: SiteConfig,
    pub cloud: CloudConfig,
    pub storage: StorageConfig,
    pub buses: Vec<BusConfig>,
    pub pin_lockout: PinLockoutConfig,
    pub clock: ClockConfig,
    pub telemetry: TelemetryConfig,
    pub log: LogConfig,
}

/// `[gateway]`: who this gateway is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// This gateway's id in the cloud; also its MQTT client id and part of its topics.
    /// Required; letters, digits, `-`, `_`, `.`; at most 64 characters.
    pub id: String,
    /// The site (building) the gateway serves, as the cloud names it. Required; same alphabet.
    pub site_id: String,
}

/// `[site]`: the building.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SiteConfig {
    /// The IANA time zone that schedules are evaluated in. Required.
    pub timezone: SiteTimeZone,
    /// A human name for logs and status output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `[cloud]`: the MQTT broker and the keys the cloud signs with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloudConfig {
    /// `mqtts://host[:port]` or `mqtt://host[:port]`, or an array of them (the nodes of a
    /// cluster, a standby broker: tried in order, the next at once when one fails). Required.
    pub url: BrokerUrls,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// The first level(s) of every MQTT topic the gateway uses.
    pub topic_prefix: String,
    /// The Ed25519 public keys key sets and commands must be signed with. At least one; more
    /// than one while the cloud rotates its key.
    pub trusted_keys: Vec<TrustedKey>,
    /// MQTT keep-alive interval (whole seconds, 5 s to 65535 s).
    #[serde(with = "duration")]
    pub keepalive: Duration,
    /// The largest MQTT payload the gateway sends, in bytes (inbound messages are bounded by
    /// the protocol's own limits).
    #[serde(with = "byte_size")]
    pub max_payload: u64,
    pub tls: TlsConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            url: BrokerUrls::default(),
            username: None,
            password: None,
            topic_prefix: "doorbridge".to_owned(),
            trusted_keys: Vec::new(),
            keepalive: Duration::from_secs(30),
            max_payload: 128 * 1024,
            tls: TlsConfig::default(),
        }
    }
}

/// `[cloud.tls]`: files for an `mqtts://` broker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    /// CA certificate(s) (PEM) to verify the broker with; absent: the system's trust store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that authenticate clients by certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM). Given together with `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[storage]`: the `SQLite` database and the upload outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// The database file (with `-wal` and `-shm` next to it).
    pub path: PathBuf,
    /// At most this many records wait for upload. When full, routine telemetry goes first,
    /// then the oldest routine activity, never unsent alarms (enforced by the store).
    pub outbox_max_records: u64,
    /// At most this many bytes of records wait for upload (same rule when full).
    #[serde(with = "byte_size")]
    pub outbox_max_bytes: u64,
    /// The most the database file may grow to; reaching it counts as a full disk. 0: no cap.
    #[serde(with = "byte_size")]
    pub max_size: u64,
    /// Disk space kept in reserve beside the database (`{path}.reserve`) and released when the
    /// disk fills, so records keep landing on disk instead of in memory. 0: none.
    #[serde(with = "byte_size")]
    pub reserve: u64,
    /// The door history: records the cloud acknowledged are kept this many days (0: none)...
    pub history_days: u32,
    /// ...and at most this many of them (0: none), for `doorbridge events`.
    pub history_max_records: u64,
    /// What unlimited keys do when a decision cannot be recorded (disk full or read-only).
    /// Limited keys are always refused then.
    #[serde(with = "string_enum")]
    pub unrecordable_unlimited: UnlimitedPolicy,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("/var/lib/doorbridge/doorbridge.db"),
            outbox_max_records: 100_000,
            outbox_max_bytes: 64 * 1024 * 1024,
            max_size: 2 * 1024 * 1024 * 1024,
            reserve: 8 * 1024 * 1024,
            history_days: 90,
            history_max_records: 250_000,
            unrecordable_unlimited: UnlimitedPolicy::Grant,
        }
    }
}

/// `[[buses]]`: one serial line with door units on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BusConfig {
    /// A name for logs; default: the port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the line speaks: `doorbridge` (this project's door units, `docs/door-bus.md`) or
    /// `osdp` (card readers and keypads, `docs/osdp.md`).
    #[serde(with = "string_enum")]
    pub protocol: BusProtocol,
    /// The serial device, e.g. `/dev/ttyUSB0`. Required.
    pub port: PathBuf,
    /// Bits per second; a standard rate.
    pub baud: u32,
    pub rs485: Rs485Config,
    /// How long to wait for a unit's answer.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// How often a request is sent again after no answer (at least 1).
    pub retries: u32,
    /// How often each unit is polled when there is nothing else to say.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// The quiet gap after a unit's frame before the gateway transmits again. `None`
    /// (`"auto"`): 3.5 character times at `baud`, at least 250 µs
    /// (`bus::session::default_turnaround`).
    #[serde(with = "auto_duration")]
    pub turnaround: Option<Duration>,
    /// After this many missed polls in a row a unit is reported offline.
    pub offline_after: u32,
    pub units: Vec<UnitConfig>,
}

impl BusConfig {
    /// The bus's name, or its port when it has none.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.port.display().to_string())
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            name: None,
            protocol: BusProtocol::Doorbridge,
            port: PathBuf::new(),
            baud: 115_200,
            rs485: Rs485Config::default(),
            response_timeout: Duration::from_millis(100),
            retries: 2,
            poll_interval: Duration::from_millis(200),
            turnaround: None,
            offline_after: 5,
            units: Vec::new(),
        }
    }
}

/// The protocol of a bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusProtocol {
    /// This project's door units (`docs/door-bus.md`).
    #[default]
    Doorbridge,
    /// OSDP card readers and keypads; the gateway is the Control Panel (`docs/osdp.md`).
    Osdp,
}

/// `[buses.rs485]`: the kernel's RS-485 mode (`TIOCSRS485`), for UARTs that drive the
/// transceiver's direction pin themselves. USB adapters that switch direction on their own
/// leave it off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rs485Config {
    pub enabled: bool,
    /// Assert RTS while sending (`SER_RS485_RTS_ON_SEND`); off: RTS low while sending.
    pub rts_on_send: bool,
    /// Delay between asserting RTS and the first bit (whole milliseconds, at most 1 s).
    #[serde(with = "duration")]
    pub delay_before_send: Duration,
    /// Delay between the last bit and releasing RTS (whole milliseconds, at most 1 s).
    #[serde(with = "duration")]
    pub delay_after_send: Duration,
}

impl Default for Rs485Config {
    fn default() -> Self {
        Rs485Config {
            enabled: false,
            rts_on_send: true,
            delay_before_send: Duration::ZERO,
            delay_after_send: Duration::ZERO,
        }
    }
}

/// `[[buses.units]]`: one door unit (outdoor station, keypad, reader) on a bus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnitConfig {
    /// The unit's address on the bus, 1 to 126, unique on the bus. Required.
    #[serde(with = "unit_address")]
    pub address: u8,
    /// The door the unit serves: the id key sets use. Unique in the site. Required.
    pub door: DoorId,
    /// A name for logs; default: the door id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An inner door: opened only by keys that "also open inner doors".
    pub inner: bool,
    /// For an inner door: the outer doors it lies behind; empty: behind all of them.
    pub behind: Vec<DoorId>,
    /// `[buses.units.osdp]`: an OSDP reader's settings (only on a `protocol = "osdp"` bus;
    /// every reader there has them, with their defaults when the table is left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub osdp: Option<OsdpReaderConfig>,
}

/// What an OSDP reader's raw card data is, and what it drives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// A card reader, with or without a keypad: raw data is a card (`card` credentials).
    #[default]
    KeypadCard,
    /// A QR code reader presenting the code as raw data (`qr` credentials).
    Qr,
    /// A reader passing a phone's token as raw data (`mobile` credentials).
    Mobile,
    /// An elevator reader (cards and keypad): a grant pulses one output per granted floor
    /// (`floors`), no door strike.
    Elevator,
}

/// One elevator floor's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FloorOutput {
    pub floor: i16,
    pub output: u8,
}

/// `[buses.units.osdp]`: one OSDP reader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OsdpReaderConfig {
    #[serde(with = "string_enum")]
    pub reader: ReaderKind,
    /// The file holding the reader's secure channel base key (32 hex digits, mode 0600),
    /// written by `doorbridge osdp install`. Required while `secure` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The secure channel is required (`EnforceSecure`): a reader that cannot set it up with
    /// the key is refused and alarmed. Off only for readers without secure channel support.
    pub secure: bool,
    /// The output that drives the door strike (0 is the first).
    pub relay: u8,
    /// How long the strike (or a floor) is released on a grant.
    #[serde(with = "duration")]
    pub pulse: Duration,
    /// The reader has a display for the welcome text.
    pub display: bool,
    /// The input the door contact is wired to (0 is the first); none: no door contact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub door_contact: Option<u8>,
    /// A door open longer than this raises a held-open alarm.
    #[serde(with = "duration")]
    pub held_open: Duration,
    /// A PIN of this many digits is complete without `#`; 0: only `#` ends a PIN.
    pub pin_digits: u8,
    /// The longest pause between two keys; typed digits are dropped after it.
    #[serde(with = "duration")]
    pub pin_timeout: Duration,
    /// For an elevator reader: the output of each floor.
    pub floors: Vec<FloorOutput>,
}

impl Default for OsdpReaderConfig {
    fn default() -> Self {
        OsdpReaderConfig {
            reader: ReaderKind::KeypadCard,
            key_file: None,
            secure: true,
            relay: 0,
            pulse: Duration::from_secs(3),
            display: false,
            door_contact: None,
            held_open: Duration::from_secs(30),
            pin_digits: 0,
            pin_timeout: Duration::from_secs(5),
            floors: Vec::new(),
        }
    }
}

/// `[pin_lockout]`: the keypad lockout after unknown PINs (see [`LockoutPolicy`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PinLockoutConfig {
    pub attempts: u32,
    #[serde(with = "duration")]
    pub base: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
    pub pins_per_step: u32,
}

impl Default for PinLockoutConfig {
    fn default() -> Self {
        let policy = LockoutPolicy::default();
        PinLockoutConfig {
            attempts: policy.attempts,
            base: policy.base,
            max: policy.max,
            pins_per_step: policy.pins_per_step,
        }
    }
}

/// `[clock]`: what to do when the wall clock cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClockConfig {
    /// What keys that do not depend on the time do while the clock is untrusted.
    #[serde(with = "string_enum")]
    pub untrusted_unlimited: UnlimitedPolicy,
    /// How far behind the trusted-time mark the clock may be and still count as trusted.
    #[serde(with = "duration")]
    pub tolerance: Duration,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            untrusted_unlimited: UnlimitedPolicy::Grant,
            tolerance: Duration::from_secs(2),
        }
    }
}

/// `[telemetry]`: periodic state reports to the cloud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    #[serde(with = "duration")]
    pub interval: Duration,
    /// A door unit's battery at or below this percentage raises a low-battery event.
    pub low_battery_percent: u8,
    /// Where to write Prometheus metrics for `node_exporter`'s textfile collector (every 15 s,
    /// atomically); unset: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval: Duration::from_secs(15 * 60),
            low_battery_percent: 20,
            metrics_file: None,
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    #[serde(with = "string_enum")]
    pub level: LogLevel,
}

impl Config {
    /// Reads a configuration from TOML text alone (no files, no environment), validated as
    /// [`load`] does. Problems name `source` as their source. Meant for tests and tools.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Config, ConfigErrors> {
        load::load_str(text, source)
    }

    /// The effective configuration as TOML, loadable again, with secrets replaced by
    /// `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        toml_out::to_toml(self)
    }

    /// What will not work although the configuration is valid: OSDP readers whose key file
    /// is not there yet (not provisioned). One line each, for `check-config`.
    pub fn osdp_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for bus in self
            .buses
            .iter()
            .filter(|b| b.protocol == BusProtocol::Osdp)
        {
            for unit in &bus.units {
                let reader = unit.osdp.clone().unwrap_or_default();
                if let Some(path) = reader.key_file.as_deref()
                    && !path.exists()
                {
                    out.push(format!(
                        "OSDP reader {} (door {}) on bus {} has no key file {} yet: it will be \
                         refused until it is provisioned (doorbridge osdp install --bus {} \
                         --address {})",
                        unit.address,
                        unit.door,
                        bus.label(),
                        path.display(),
                        bus.label(),
                        unit.address
                    ));
                }
            }
        }
        out
    }

    /// The site as the access engine sees it: its time zone and every door of every bus.
    pub fn site(&self) -> Site {
        let doors: BTreeMap<DoorId, Door> = self
            .buses
            .iter()
            .flat_map(|bus| &bus.units)
            .map(|unit| {
                let door = Door {
                    inner: unit.inner,
                    behind: unit.behind.clone(),
                };
                (unit.door.clone(), door)
            })
            .collect();
        Site {
            tz: self.time_zone(),
            doors,
        }
    }

    pub fn access_policy(&self) -> Policy {
        // The freshness limits come with the key set, not the configuration: the store fills
        // them in.
        Policy {
            untrusted_clock: self.clock.untrusted_unlimited,
            ..Policy::default()
        }
    }

    pub fn lockout_policy(&self) -> LockoutPolicy {
        LockoutPolicy {
            attempts: self.pin_lockout.attempts,
            base: self.pin_lockout.base,
            max: self.pin_lockout.max,
            pins_per_step: self.pin_lockout.pins_per_step,
        }
    }

    /// The site's time zone, found in the time zone database when the configuration was read.
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        self.site.timezone.time_zone().clone()
    }
}

/// The rules decisions are made with.
impl From<&Config> for crate::store::DecisionContext {
    fn from(config: &Config) -> Self {
        crate::store::DecisionContext {
            site: config.site(),
            policy: config.access_policy(),
            lockout: config.lockout_policy(),
            clock_tolerance: jiff::SignedDuration::try_from(config.clock.tolerance)
                .unwrap_or(jiff::SignedDuration::MAX),
            unrecordable_unlimited: config.storage.unrecordable_unlimited,
        }
    }
}

/// How to open the store: the daemon, `keys import` and the tools all open it alike.
impl From<&Config> for crate::store::StoreOptions {
    fn from(config: &Config) -> Self {
        let mut options = crate::store::StoreOptions::new(&config.storage.path, config.into());
        options.max_size = (config.storage.max_size != 0).then_some(config.storage.max_size);
        options.outbox_max_records = Some(config.storage.outbox_max_records);
        options.outbox_max_bytes = Some(config.storage.outbox_max_bytes);
        options.reserve = config.storage.reserve;
        options.history = crate::store::History {
            days: Some(config.storage.history_days),
            max_records: Some(config.storage.history_max_records),
        };
        options
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::Duration;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/doorbridge.toml");

    /// The smallest configuration that loads.
    const MINIMAL: &str = r#"
        [gateway]
        id = "gw-1"
        site_id = "site-1"
        [site]
        timezone = "Europe/Berlin"
        [cloud]
        url = "mqtt://127.0.0.1"
        trusted_keys = ["3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"]
        [[buses]]
        port = "/dev/ttyUSB0"
        [[buses.units]]
        address = 1
        door = "main"
    "#;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml_str(text, "test.toml") {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(errors) => errors.problems,
        }
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn the_shipped_example_loads() {
        let config = Config::from_toml_str(EXAMPLE, "doorbridge.toml").unwrap();
        assert_eq!(config.gateway.id, "gw-example-01");
        assert_eq!(config.buses[0].units.len(), 2);
        assert_eq!(
            config.cloud.password.as_ref().unwrap().expose(),
            "change-me"
        );
    }

    #[test]
    fn cloud_url_is_one_broker_or_a_list() {
        let config = Config::from_toml_str(MINIMAL, "test.toml").unwrap();
        assert_eq!(config.cloud.url.len(), 1);
        let listed = MINIMAL.replace(
            "url = \"mqtt://127.0.0.1\"",
            "url = [\"mqtt://10.0.0.1\", \"mqtts://node-2.example.com\"]",
        );
        let config = Config::from_toml_str(&listed, "test.toml").unwrap();
        assert_eq!(
            config.cloud.url.to_string(),
            "mqtt://10.0.0.1:1883, mqtts://node-2.example.com:8883"
        );
        // Printed back as it was written, and read again the same.
        let printed = toml_out::to_toml(&config);
        assert!(
            printed
                .contains("url = [\"mqtt://10.0.0.1:1883\", \"mqtts://node-2.example.com:8883\"]"),
            "{printed}"
        );
        let twice = MINIMAL.replace(
            "url = \"mqtt://127.0.0.1\"",
            "url = [\"mqtt://127.0.0.1\", \"mqtt://127.0.0.1:1883\"]",
        );
        let found = problems(&twice);
        assert_eq!(keys(&found), ["cloud.url"]);
        assert!(found[0].message.contains("twice"), "{}", found[0].message);
        let wrong = MINIMAL.replace("url = \"mqtt://127.0.0.1\"", "url = 5");
        assert_eq!(keys(&problems(&wrong)), ["cloud.url"]);
    }

    #[test]
    fn defaults_fill_in_a_minimal_file() {
        let config = Config::from_toml_str(MINIMAL, "test.toml").unwrap();
        assert_eq!(config.cloud.topic_prefix, "doorbridge");
        assert_eq!(config.cloud.max_payload, 128 * 1024);
        assert_eq!(config.cloud.url.first().port, 1883);
        assert_eq!(config.buses[0].baud, 115_200);
        assert_eq!(config.buses[0].label(), "/dev/ttyUSB0");
        assert_eq!(config.telemetry.interval, Duration::from_secs(900));
        assert_eq!(config.lockout_policy(), LockoutPolicy::default());
        assert_eq!(config.access_policy(), Policy::default());
        assert_eq!(
            config.storage.unrecordable_unlimited,
            UnlimitedPolicy::Grant
        );
        assert_eq!(config.log.level, LogLevel::Info);
        assert_eq!(config.buses[0].turnaround, None);
        assert!(config.redacted_toml().contains("turnaround = \"auto\""));
    }

    #[test]
    fn a_bus_turnaround_is_auto_or_a_short_duration() {
        let with = |value: &str| {
            MINIMAL.replace("[[buses]]", &format!("[[buses]]\nturnaround = \"{value}\""))
        };
        let config = Config::from_toml_str(&with("500us"), "test.toml").unwrap();
        assert_eq!(config.buses[0].turnaround, Some(Duration::from_micros(500)));
        let again = Config::from_toml_str(&config.redacted_toml(), "printed").unwrap();
        assert_eq!(again.buses, config.buses);
        let config = Config::from_toml_str(&with("auto"), "test.toml").unwrap();
        assert_eq!(config.buses[0].turnaround, None);
        for bad in ["50us", "1s", "soon"] {
            assert_eq!(
                keys(&problems(&with(bad))),
                ["buses[0].turnaround"],
                "{bad}"
            );
        }
    }

    #[test]
    fn the_printed_configuration_loads_again() {
        let config = Config::from_toml_str(EXAMPLE, "doorbridge.toml").unwrap();
        let printed = config.redacted_toml();
        assert!(printed.contains("password = \"<redacted>\""), "{printed}");
        assert!(!printed.contains("change-me"));
        let again = Config::from_toml_str(&printed, "printed").unwrap();
        assert_eq!(again.redacted_toml(), printed);
        assert_eq!(again.buses, config.buses);
        assert_eq!(
            again.cloud.password.as_ref().unwrap().expose(),
            Secret::REDACTED
        );
    }

    #[test]
    fn the_site_has_every_door_of_every_bus() {
        let text = format!(
            "{MINIMAL}
            [[buses.units]]
            address = 2
            door = \"lobby\"
            inner = true
            behind = [\"main\"]
            [[buses]]
            port = \"/dev/ttyUSB1\"
            [[buses.units]]
            address = 1
            door = \"garage\"
            "
        );
        let site = Config::from_toml_str(&text, "test.toml").unwrap().site();
        assert_eq!(site.doors.len(), 3);
        assert!(site.doors["lobby"].inner);
        assert_eq!(site.doors["lobby"].behind, ["main"]);
        assert!(!site.doors["garage"].inner);
        assert_eq!(site.tz.iana_name(), Some("Europe/Berlin"));
    }

    #[test]
    fn an_empty_file_lists_what_is_required() {
        let found = problems("");
        assert_eq!(
            keys(&found),
            [
                "gateway.id",
                "gateway.site_id",
                "site.timezone",
                "cloud.url",
                "cloud.trusted_keys",
                "buses"
            ]
        );
        assert!(found.iter().all(|p| p.source == "test.toml"));
        assert!(
            found[0].message.contains("DOORBRIDGE_GATEWAY__ID"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = MINIMAL
            .replace("Europe/Berlin", "Mars/Olympus")
            .replace("address = 1", "address = 1\nport = 3\n")
            .replace("[[buses]]", "[[buses]]\nbaud = \"fast\"\nretries = 0");
        let found = problems(&format!(
            "{text}
            wat = 1
            [[buses.units]]
            address = 1
            door = \"main\"
            behind = [\"nowhere\"]
            inner = true
            [[buses.units]]
            address = 0
            door = \"back door\"
            [log]
            level = 2
            [clock]
            untrusted_unlimited = \"maybe\"
            "
        ));
        assert_eq!(
            keys(&found),
            [
                "site.timezone",
                "buses[0].baud",
                "buses[0].retries",
                "buses[0].units[0].port",
                "buses[0].units[0].wat",
                "buses[0].units[1].address",
                "buses[0].units[1].door",
                "buses[0].units[1].behind[0]",
                "buses[0].units[2].address",
                "buses[0].units[2].door",
                "clock.untrusted_unlimited",
                "log.level",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn odd_values_are_named_plainly() {
        let found = problems(&format!(
            "{MINIMAL}
            [pin_lockout]
            attempts = -1
            pins_per_step = 2.5
            [telemetry]
            interval = 1979-05-27T07:32:00Z
            low_battery_percent = 300
            "
        ));
        let messages: Vec<String> = found
            .iter()
            .map(|p| format!("{}: {}", p.key, p.message))
            .collect();
        assert_eq!(
            messages,
            [
                "pin_lockout.attempts: expected an integer from 0 to 4294967295, found the number -1",
                "pin_lockout.pins_per_step: expected an integer from 0 to 4294967295, found the \
                 number 2.5",
                "telemetry.interval: expected a string, found a date-time",
                "telemetry.low_battery_percent: expected an integer from 0 to 255, found the \
                 number 300",
            ]
        );
    }

    #[test]
    fn enums_are_not_read_from_numbers() {
        let found = problems(&format!(
            "{MINIMAL}\n[storage]\nunrecordable_unlimited = 1\n"
        ));
        assert_eq!(keys(&found), ["storage.unrecordable_unlimited"]);
    }

    #[test]
    fn a_table_where_a_value_belongs_is_an_error() {
        // serde would read a struct from an array, positionally.
        let text = MINIMAL.replace("[site]\n        timezone = \"Europe/Berlin\"", "");
        let found = problems(&format!("site = [\"Europe/Berlin\"]\n{text}"));
        assert_eq!(keys(&found), ["site"], "{found:#?}");
        assert_eq!(found[0].message, "expected a table, found an array");
        let text = MINIMAL.replace("[[buses]]", "[cloud.tls.ca_file]\n[[buses]]");
        let found = problems(&text.replace("mqtt:", "mqtts:"));
        assert_eq!(keys(&found), ["cloud.tls.ca_file"], "{found:#?}");
    }

    #[test]
    fn behind_must_name_outer_doors() {
        let text = format!(
            "{MINIMAL}
            [[buses.units]]
            address = 2
            door = \"lobby\"
            inner = true
            [[buses.units]]
            address = 3
            door = \"flat\"
            inner = true
            behind = [\"lobby\", \"flat\", \"main\"]
            [[buses.units]]
            address = 4
            door = \"side\"
            behind = [\"main\"]
            "
        );
        let found = problems(&text);
        assert_eq!(
            keys(&found),
            [
                "buses[0].units[2].behind[0]",
                "buses[0].units[2].behind[1]",
                "buses[0].units[3].behind"
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn tls_files_go_together_and_need_mqtts() {
        let text = MINIMAL.replace(
            "[[buses]]",
            "[cloud.tls]\ncert_file = \"/etc/c.pem\"\n[[buses]]",
        );
        let found = problems(&text);
        assert_eq!(keys(&found), ["cloud.tls.cert_file", "cloud.tls.cert_file"]);
        let text = text.replace("mqtt://", "mqtts://");
        assert_eq!(keys(&problems(&text)), ["cloud.tls.cert_file"]);
    }

    #[test]
    fn dropins_apply_in_name_order_and_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("doorbridge.toml");
        fs::write(&main, MINIMAL).unwrap();
        fs::create_dir(dir.path().join("config.d")).unwrap();
        fs::write(
            dir.path().join("config.d/20-b.toml"),
            "[gateway]\nid = \"from-b\"",
        )
        .unwrap();
        fs::write(
            dir.path().join("config.d/10-a.toml"),
            "[gateway]\nid = \"from-a\"",
        )
        .unwrap();
        fs::write(dir.path().join("config.d/.10-c.toml"), "broken = ").unwrap();
        fs::write(dir.path().join("config.d/notes.txt"), "broken = ").unwrap();
        let mut sources = Sources::new(Some(&main));
        sources.env = false;
        assert_eq!(sources.dropin_dir, dir.path().join("config.d"));
        let (config, layers) = load_with_layers(&sources).unwrap();
        assert_eq!(config.gateway.id, "from-b");
        assert_eq!(layers.len(), 3);
        assert!(layers[1].ends_with("10-a.toml"), "{layers:?}");

        fs::write(dir.path().join("config.d/30-c.toml"), "[gateway]\nid = 7").unwrap();
        let errors = load(&sources).unwrap_err();
        assert_eq!(errors.problems.len(), 1);
        assert!(errors.problems[0].source.ends_with("30-c.toml"));
        assert_eq!(errors.problems[0].key, "gateway.id");

        let mut missing = Sources::new(Some(&dir.path().join("nope.toml")));
        missing.env = false;
        let errors = load(&missing).unwrap_err();
        assert_eq!(errors.problems.len(), 1);
        assert!(errors.problems[0].source.ends_with("nope.toml"));
        assert!(errors.problems[0].message.contains("not found"));
    }

    #[test]
    fn problems_print_one_per_line() {
        let errors = Config::from_toml_str("", "x.toml").unwrap_err();
        let text = errors.to_string();
        assert_eq!(text.lines().count(), errors.problems.len());
        assert!(text.starts_with("x.toml: gateway.id: required"), "{text}");
    }
}
