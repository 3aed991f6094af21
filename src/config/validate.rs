//! The rules between values, checked on the typed configuration: required keys, ranges,
//! uniqueness of addresses, doors and ports, references between doors, TLS files that go
//! together. Every rule that fails adds a problem; none stops the others.

use std::collections::HashMap;
use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use super::keypath::{KeyPath, Origins};
use super::values::format_duration;
use super::{BusConfig, BusProtocol, CloudConfig, Config, Problem, ReaderKind, unit_address};
use crate::access::lockout::CEILING;

/// Baud rates a serial port can be set to on Linux without custom divisors.
const STANDARD_BAUD_RATES: [u32; 11] = [
    1200, 2400, 4800, 9600, 19_200, 38_400, 57_600, 115_200, 230_400, 460_800, 921_600,
];

const MS: Duration = Duration::from_millis(1);

/// 1 to 64 letters, digits, `-`, `_` or `.`: the alphabet of ids.
fn id_charset(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
/// The shortest quiet gap a bus may be given: about one character time at 115 200 baud.
const TURNAROUND_MIN: Duration = Duration::from_micros(100);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

pub(super) struct Checker<'a> {
    origins: &'a Origins<'a>,
    /// Keys whose value was already rejected while reading.
    rejected: &'a [KeyPath],
    problems: Vec<(KeyPath, Problem)>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(origins: &'a Origins<'a>, rejected: &'a [KeyPath]) -> Self {
        Checker {
            origins,
            rejected,
            problems: Vec::new(),
        }
    }

    pub(super) fn into_problems(self) -> Vec<(KeyPath, Problem)> {
        self.problems
    }

    pub(super) fn check(&mut self, config: &Config) {
        let gateway = KeyPath::of("gateway");
        let id_ok = self.required(&gateway.key("id"))
            && self.topic_id(&gateway.key("id"), &config.gateway.id);
        let site_ok = self.required(&gateway.key("site_id"))
            && self.topic_id(&gateway.key("site_id"), &config.gateway.site_id);
        if id_ok && site_ok {
            self.topics(config);
        }
        self.required(&KeyPath::of("site.timezone"));
        self.cloud(&config.cloud);
        self.storage(config);
        self.buses(&config.buses);
        self.pin_lockout(config);

        let clock = KeyPath::of("clock");
        self.duration_range(
            &clock.key("tolerance"),
            config.clock.tolerance,
            Duration::ZERO,
            HOUR,
        );

        let telemetry = KeyPath::of("telemetry");
        self.duration_range(
            &telemetry.key("interval"),
            config.telemetry.interval,
            SECOND,
            24 * HOUR,
        );
        self.int_range(
            &telemetry.key("low_battery_percent"),
            config.telemetry.low_battery_percent.into(),
            0,
            100,
        );
    }

    fn cloud(&mut self, cloud: &CloudConfig) {
        let at = KeyPath::of("cloud");
        self.required(&at.key("url"));
        if cloud.username.as_deref() == Some("") {
            self.problem(
                &at.key("username"),
                "must not be empty; leave it out for no login",
            );
        }
        if cloud.password.is_some() && cloud.username.is_none() {
            self.problem(&at.key("password"), "a password needs cloud.username too");
        }
        self.topic_prefix(&at.key("topic_prefix"), &cloud.topic_prefix);

        let keys = at.key("trusted_keys");
        if cloud.trusted_keys.is_empty() {
            self.problem_or_required(
                &keys,
                "at least one key is needed: key sets are only accepted when signed by one",
            );
        }
        for (i, key) in cloud.trusted_keys.iter().enumerate() {
            if let Some(first) = cloud.trusted_keys[..i].iter().position(|k| k == key) {
                self.problem(
                    &keys.index(i),
                    format!("the same key as cloud.trusted_keys[{first}]"),
                );
            }
        }

        let keepalive = at.key("keepalive");
        self.duration_range(
            &keepalive,
            cloud.keepalive,
            5 * SECOND,
            Duration::from_secs(65_535),
        );
        if cloud.keepalive.subsec_nanos() != 0 {
            self.problem(&keepalive, "must be whole seconds");
        }
        self.int_range(
            &at.key("max_payload"),
            cloud.max_payload,
            16 * 1024,
            16 * 1024 * 1024,
        );

        let tls = at.key("tls");
        let files = [
            ("ca_file", &cloud.tls.ca_file),
            ("cert_file", &cloud.tls.cert_file),
            ("key_file", &cloud.tls.key_file),
        ];
        for (name, file) in files {
            match file {
                Some(path) if path.as_os_str().is_empty() => {
                    self.problem(&tls.key(name), "must not be empty; leave it out instead");
                }
                Some(_) if !cloud.url.any_tls() => self.problem(
                    &tls.key(name),
                    "TLS files are only used with an mqtts:// cloud.url, and it is mqtt://",
                ),
                _ => {}
            }
        }
        match (&cloud.tls.cert_file, &cloud.tls.key_file) {
            (Some(_), None) => self.problem(
                &tls.key("cert_file"),
                "needs cloud.tls.key_file too: a client certificate goes with its private key",
            ),
            (None, Some(_)) => self.problem(
                &tls.key("key_file"),
                "needs cloud.tls.cert_file too: a private key goes with its client certificate",
            ),
            _ => {}
        }
    }

    fn storage(&mut self, config: &Config) {
        let at = KeyPath::of("storage");
        self.not_empty_path(&at.key("path"), &config.storage.path);
        self.int_range(
            &at.key("outbox_max_records"),
            config.storage.outbox_max_records,
            1,
            100_000_000,
        );
        self.int_range(
            &at.key("outbox_max_bytes"),
            config.storage.outbox_max_bytes,
            64 * 1024,
            1 << 40,
        );
        if config.storage.max_size != 0 {
            self.int_range(
                &at.key("max_size"),
                config.storage.max_size,
                1 << 20,
                1 << 40,
            );
        }
        self.int_range(&at.key("reserve"), config.storage.reserve, 0, 1 << 30);
        self.int_range(
            &at.key("history_days"),
            u64::from(config.storage.history_days),
            0,
            3_660,
        );
        self.int_range(
            &at.key("history_max_records"),
            config.storage.history_max_records,
            0,
            100_000_000,
        );
    }

    fn buses(&mut self, buses: &[BusConfig]) {
        let at = KeyPath::of("buses");
        if buses.is_empty() {
            self.problem_or_required(&at, "at least one [[buses]] is needed");
        }
        // Where each door is served, for uniqueness and for `behind`.
        let mut doors: HashMap<&str, (KeyPath, bool)> = HashMap::new();
        let mut ports: HashMap<&Path, KeyPath> = HashMap::new();
        let mut names: HashMap<&str, KeyPath> = HashMap::new();
        for (i, bus) in buses.iter().enumerate() {
            let here = at.index(i);
            if self.required(&here.key("port")) && self.not_empty_path(&here.key("port"), &bus.port)
            {
                if let Some(first) = ports.get(bus.port.as_path()) {
                    let message = format!("port {} is also used by {first}", bus.port.display());
                    self.problem(&here.key("port"), message);
                } else {
                    ports.insert(&bus.port, here.clone());
                }
            }
            if let Some(name) = &bus.name {
                if name.is_empty() {
                    self.problem(
                        &here.key("name"),
                        "must not be empty; leave it out to use the port",
                    );
                } else if let Some(first) = names.get(name.as_str()) {
                    self.problem(
                        &here.key("name"),
                        format!("name `{name}` is also used by {first}"),
                    );
                } else {
                    names.insert(name, here.clone());
                }
            }
            if !STANDARD_BAUD_RATES.contains(&bus.baud) {
                let rates: Vec<String> = STANDARD_BAUD_RATES.iter().map(u32::to_string).collect();
                self.problem(
                    &here.key("baud"),
                    format!(
                        "{} is not a standard baud rate: use one of {}",
                        bus.baud,
                        rates.join(", ")
                    ),
                );
            }
            let rs485 = here.key("rs485");
            for (name, delay) in [
                ("delay_before_send", bus.rs485.delay_before_send),
                ("delay_after_send", bus.rs485.delay_after_send),
            ] {
                self.duration_range(&rs485.key(name), delay, Duration::ZERO, SECOND);
                if delay.subsec_nanos() % 1_000_000 != 0 {
                    self.problem(&rs485.key(name), "must be whole milliseconds");
                }
            }
            self.duration_range(
                &here.key("response_timeout"),
                bus.response_timeout,
                MS,
                10 * SECOND,
            );
            if bus.retries == 0 {
                self.problem(
                    &here.key("retries"),
                    "must be at least 1: without a retry one lost frame fails a door request",
                );
            } else {
                self.int_range(&here.key("retries"), bus.retries.into(), 1, 10);
            }
            self.duration_range(
                &here.key("poll_interval"),
                bus.poll_interval,
                10 * MS,
                60 * SECOND,
            );
            if let Some(turnaround) = bus.turnaround {
                self.duration_range(
                    &here.key("turnaround"),
                    turnaround,
                    TURNAROUND_MIN,
                    100 * MS,
                );
            }
            self.int_range(
                &here.key("offline_after"),
                bus.offline_after.into(),
                1,
                1000,
            );

            self.units(bus, &here, &mut doors);
            self.osdp_readers(bus, &here);
        }
        // `behind` names doors of any bus, so it is checked once every door is known.
        self.behind(buses, &doors);
    }

    fn behind(&mut self, buses: &[BusConfig], doors: &HashMap<&str, (KeyPath, bool)>) {
        let at = KeyPath::of("buses");
        for (i, bus) in buses.iter().enumerate() {
            for (j, unit) in bus.units.iter().enumerate() {
                let behind = at.index(i).key("units").index(j).key("behind");
                if !unit.inner && !unit.behind.is_empty() {
                    self.problem(
                        &behind,
                        "only an inner door lies behind other doors: set inner = true or remove \
                         behind",
                    );
                    continue;
                }
                for (k, outer) in unit.behind.iter().enumerate() {
                    let message = match doors.get(outer.as_str()) {
                        _ if *outer == unit.door => {
                            format!("door `{outer}` cannot lie behind itself")
                        }
                        None => format!("there is no door `{outer}` in the configuration"),
                        Some((place, true)) => format!(
                            "door `{outer}` ({place}) is an inner door; inner doors lie behind \
                             outer doors"
                        ),
                        Some((_, false)) => continue,
                    };
                    self.problem(&behind.index(k), message);
                }
            }
        }
    }

    fn units<'c>(
        &mut self,
        bus: &'c BusConfig,
        here: &KeyPath,
        doors: &mut HashMap<&'c str, (KeyPath, bool)>,
    ) {
        let at = here.key("units");
        if bus.units.is_empty() {
            self.problem_or_required(&at, "a bus needs at least one [[buses.units]]");
        }
        let mut addresses: HashMap<u8, KeyPath> = HashMap::new();
        for (j, unit) in bus.units.iter().enumerate() {
            let unit_at = at.index(j);
            if self.required(&unit_at.key("address")) && unit_address::RANGE.contains(&unit.address)
            {
                if let Some(first) = addresses.get(&unit.address) {
                    let message = format!(
                        "address {} is also used by {first} on this bus",
                        unit.address
                    );
                    self.problem(&unit_at.key("address"), message);
                } else {
                    addresses.insert(unit.address, unit_at.clone());
                }
            }
            if self.required(&unit_at.key("door"))
                && self.identifier(&unit_at.key("door"), &unit.door)
            {
                if let Some((first, _)) = doors.get(unit.door.as_str()) {
                    let message = format!("door `{}` is also served by {first}", unit.door);
                    self.problem(&unit_at.key("door"), message);
                } else {
                    doors.insert(&unit.door, (unit_at.clone(), unit.inner));
                }
            }
            if unit.name.as_deref() == Some("") {
                self.problem(
                    &unit_at.key("name"),
                    "must not be empty; leave it out to use the door id",
                );
            }
        }
    }

    /// The OSDP settings of a bus's readers: only on an OSDP bus, and sound there.
    fn osdp_readers(&mut self, bus: &BusConfig, here: &KeyPath) {
        let at = here.key("units");
        for (j, unit) in bus.units.iter().enumerate() {
            let osdp_at = at.index(j).key("osdp");
            if bus.protocol != BusProtocol::Osdp {
                if unit.osdp.is_some() {
                    self.problem(
                        &osdp_at,
                        "OSDP reader settings on a doorbridge bus: set protocol = \"osdp\" on \
                         the bus, or remove them",
                    );
                }
                continue;
            }
            let reader = unit.osdp.clone().unwrap_or_default();
            let key_at = osdp_at.key("key_file");
            match (&reader.key_file, reader.secure) {
                // A missing file is a reader not provisioned yet (`doorbridge osdp install`
                // writes it; `check-config` warns, see `osdp_warnings`); a file that is there
                // must be sound.
                (Some(path), _) if path.as_os_str().is_empty() => {
                    self.problem(&key_at, "must not be empty: name the reader's key file");
                }
                (Some(path), _) => match crate::osdp::key::read(path) {
                    Err(crate::osdp::key::KeyFileError::Read { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => self.problem(&key_at, e.to_string()),
                    Ok(_) => {}
                },
                (None, true) => self.problem(
                    &key_at,
                    "an OSDP reader needs its secure channel key file (written by `doorbridge \
                     osdp install`), or secure = false for a reader without secure channel",
                ),
                (None, false) => {}
            }
            self.duration_range(&osdp_at.key("pulse"), reader.pulse, 100 * MS, 60 * SECOND);
            self.duration_range(
                &osdp_at.key("held_open"),
                reader.held_open,
                SECOND,
                24 * HOUR,
            );
            self.duration_range(
                &osdp_at.key("pin_timeout"),
                reader.pin_timeout,
                SECOND,
                60 * SECOND,
            );
            self.int_range(
                &osdp_at.key("pin_digits"),
                reader.pin_digits.into(),
                0,
                crate::osdp::keypad::MAX_DIGITS as u64,
            );
            let floors_at = osdp_at.key("floors");
            match reader.reader {
                ReaderKind::Elevator if reader.floors.is_empty() => self.problem(
                    &floors_at,
                    "an elevator reader needs floors = [{ floor = N, output = M }, ...]",
                ),
                ReaderKind::Elevator => {}
                _ if !reader.floors.is_empty() => self.problem(
                    &floors_at,
                    "only an elevator reader (reader = \"elevator\") releases floors",
                ),
                _ => {}
            }
            let mut seen: HashMap<i16, usize> = HashMap::new();
            for (k, floor) in reader.floors.iter().enumerate() {
                if let Some(first) = seen.insert(floor.floor, k) {
                    self.problem(
                        &floors_at.index(k).key("floor"),
                        format!("floor {} is also at floors[{first}]", floor.floor),
                    );
                }
            }
        }
    }

    fn pin_lockout(&mut self, config: &Config) {
        let at = KeyPath::of("pin_lockout");
        let lockout = &config.pin_lockout;
        self.int_range(&at.key("attempts"), lockout.attempts.into(), 1, 100);
        self.duration_range(&at.key("base"), lockout.base, SECOND, CEILING);
        self.duration_range(&at.key("max"), lockout.max, SECOND, CEILING);
        if lockout.max < lockout.base {
            // Blame the one a source set (both, if both were: then `max`).
            let key = if self.origins.is_set(&at.key("max")) {
                "max"
            } else {
                "base"
            };
            let message = format!(
                "pin_lockout.max ({}) must be at least pin_lockout.base ({})",
                format_duration(lockout.max),
                format_duration(lockout.base)
            );
            self.problem(&at.key(key), message);
        }
        self.int_range(
            &at.key("pins_per_step"),
            lockout.pins_per_step.into(),
            1,
            1_000_000,
        );
    }

    /// Records a problem at `path`, named with the source that set it, unless the value there
    /// (or around it) was already rejected while reading.
    fn problem(&mut self, path: &KeyPath, message: impl Into<String>) {
        if self.rejected.iter().any(|rejected| rejected.overlaps(path)) {
            return;
        }
        let problem = Problem {
            key: path.to_string(),
            source: self.origins.source(path),
            message: message.into(),
        };
        self.problems.push((path.clone(), problem));
    }

    /// Whether a source sets `path`; if none does, records that it is required.
    fn required(&mut self, path: &KeyPath) -> bool {
        if self.origins.is_set(path) {
            return true;
        }
        self.missing(path, "required, but set by no file or environment variable");
        false
    }

    /// `message` for a key that is set (to something empty) or missing.
    fn problem_or_required(&mut self, path: &KeyPath, message: &str) {
        if self.origins.is_set(path) {
            self.problem(path, message);
        } else {
            self.missing(path, message);
        }
    }

    /// A problem with a key no source sets: it belongs in the main file.
    fn missing(&mut self, path: &KeyPath, message: &str) {
        if self.rejected.iter().any(|rejected| rejected.overlaps(path)) {
            return;
        }
        let message = match path.env_var() {
            Some(variable) => format!("{message} (set it here or as {variable})"),
            None => message.to_owned(),
        };
        let problem = Problem {
            key: path.to_string(),
            source: self.origins.main().to_owned(),
            message,
        };
        self.problems.push((path.clone(), problem));
    }

    /// An id used in MQTT topics and client ids: 1 to 64 of `A-Z a-z 0-9 - _ .`.
    fn identifier(&mut self, path: &KeyPath, value: &str) -> bool {
        let ok = id_charset(value);
        if !ok {
            self.problem(
                path,
                format!(
                    "{value:?} is not a valid id: use 1 to 64 letters, digits, `-`, `_` or `.`"
                ),
            );
        }
        ok
    }

    /// An id that is a level of every MQTT topic (the gateway's and the site's): as
    /// [`Checker::identifier`], without `.` ([`Checker::topic_level`] says why).
    fn topic_id(&mut self, path: &KeyPath, value: &str) -> bool {
        if !id_charset(value) {
            self.problem(
                path,
                format!(
                    "{value:?} is not a valid id: use 1 to 64 letters, digits, `-` or `_` (it is \
                     part of every MQTT topic of the gateway)"
                ),
            );
            return false;
        }
        self.topic_level(path, value)
    }

    /// What every broker a fleet runs on takes in a topic level (the ids and the prefix's
    /// levels are levels of every topic, `docs/cloud-protocol.md` §2): NATS maps an MQTT
    /// topic to a subject, where `.` separates tokens and `*` and `>` are wildcards (a topic
    /// with them closes the connection); a level starting with `$` is reserved on AWS IoT Core,
    /// EMQX and mosquitto. (`+`, `#` and `/` are refused for every MQTT broker elsewhere.)
    fn topic_level(&mut self, path: &KeyPath, value: &str) -> bool {
        let why = if value.contains('.') {
            Some(
                "NATS maps `.` in an MQTT topic to its subject separator and refuses the topic: use `-` or `_` instead",
            )
        } else if value.contains(['*', '>']) {
            Some("NATS takes `*` and `>` in an MQTT topic as wildcards and refuses the topic")
        } else if value.starts_with('$') {
            Some("topics starting with `$` are reserved (AWS IoT Core, EMQX, mosquitto)")
        } else if value.contains(char::is_whitespace) {
            Some("NATS refuses white space in a topic")
        } else {
            None
        };
        if let Some(why) = why {
            self.problem(
                path,
                format!("{value:?} cannot be part of an MQTT topic: {why}"),
            );
        }
        why.is_none()
    }

    /// The whole topics, as AWS IoT Core limits them (at most 7 slashes, 256 bytes).
    fn topics(&mut self, config: &Config) {
        let target = doorbridge_proto::cloud::payload::Target {
            site: config.gateway.site_id.clone(),
            gateway: config.gateway.id.clone(),
        };
        if let Err(e) =
            doorbridge_proto::cloud::topics::Topics::new(&config.cloud.topic_prefix, &target)
        {
            use doorbridge_proto::cloud::topics::TopicError;
            match e {
                TopicError::TooDeep { .. } => {
                    self.problem(&KeyPath::of("cloud.topic_prefix"), e.to_string());
                }
                TopicError::TooLong(_) => self.problem(
                    &KeyPath::of("cloud.topic_prefix"),
                    format!("{e}, AWS IoT Core's limit: shorten the prefix or the ids"),
                ),
                // Refused above, with the key that holds it.
                TopicError::BadPrefix(_) | TopicError::BadId(_) => {}
            }
        }
    }

    fn topic_prefix(&mut self, path: &KeyPath, prefix: &str) {
        let ok = !prefix.is_empty()
            && !prefix.contains(['+', '#', '\0'])
            && prefix.split('/').all(|level| !level.is_empty());
        if ok {
            self.topic_level(path, prefix);
        } else {
            self.problem(
                path,
                format!(
                    "{prefix:?} is not a topic prefix: use one or more non-empty levels separated \
                     by `/`, without `+` or `#`"
                ),
            );
        }
    }

    fn not_empty_path(&mut self, path: &KeyPath, value: &Path) -> bool {
        let ok = !value.as_os_str().is_empty();
        if !ok {
            self.problem(path, "must not be empty");
        }
        ok
    }

    fn int_range(&mut self, path: &KeyPath, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.problem(path, range_message(value, min, max));
        }
    }

    fn duration_range(&mut self, path: &KeyPath, value: Duration, min: Duration, max: Duration) {
        if !(min..=max).contains(&value) {
            let [value, min, max] = [value, min, max].map(format_duration);
            self.problem(path, range_message(value, min, max));
        }
    }
}

fn range_message(value: impl Display, min: impl Display, max: impl Display) -> String {
    format!("{value} is out of range: must be from {min} to {max}")
}
