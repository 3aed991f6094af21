//! What a configuration reload (SIGHUP) changes, decided without touching anything.
//!
//! [`plan`] compares the running configuration with the one just loaded and says what to redo:
//! the log level, the decision rules (the store writer's context), the door buses, the cloud
//! link. What only a restart can change — the store's file and bounds, the gateway's identity —
//! is named in [`Plan::restart_needed`] and kept as it runs in [`Plan::effective`].

use crate::config::{Config, LogLevel};

/// What to do for a reload.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The configuration to run with from now on: the new one, except for the keys in
    /// `restart_needed`, which keep their running values.
    pub effective: Config,
    /// Keys that changed but apply only after a restart, e.g. `storage.path`.
    pub restart_needed: Vec<&'static str>,
    /// The new `log.level`, when it changed.
    pub log_level: Option<LogLevel>,
    /// The decision rules changed: site, doors, PIN lockout, clock, unrecordable policy.
    pub rules: bool,
    /// The door side changed (buses, units, the time zone units show, the battery threshold):
    /// the bus tasks start again with it.
    pub buses: bool,
    /// The `[cloud]` section (or what the link reports by) changed: the link starts again.
    pub link: bool,
}

impl Plan {
    /// Whether anything is to be done at all.
    pub fn changes_anything(&self) -> bool {
        self.log_level.is_some() || self.rules || self.buses || self.link
    }

    /// The parts that change, for the log: e.g. `["log level", "door buses"]`.
    pub fn changed(&self) -> Vec<&'static str> {
        [
            (self.log_level.is_some(), "log level"),
            (self.rules, "decision rules"),
            (self.buses, "door buses"),
            (self.link, "cloud link"),
        ]
        .into_iter()
        .filter_map(|(changed, what)| changed.then_some(what))
        .collect()
    }
}

/// Compares `running` with `loaded`; see [`Plan`].
pub fn plan(running: &Config, loaded: Config) -> Plan {
    let mut effective = loaded;
    let mut restart_needed = Vec::new();
    // Fixed for the process's life: the store is opened once with these, and the gateway's
    // identity is its MQTT client id, its topics and the target key sets are signed for.
    macro_rules! keep {
        ($($field:ident).+, $key:literal) => {
            if effective.$($field).+ != running.$($field).+ {
                restart_needed.push($key);
                effective.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!(gateway.id, "gateway.id");
    keep!(gateway.site_id, "gateway.site_id");
    keep!(storage.path, "storage.path");
    keep!(storage.max_size, "storage.max_size");
    keep!(storage.outbox_max_records, "storage.outbox_max_records");
    keep!(storage.outbox_max_bytes, "storage.outbox_max_bytes");
    keep!(storage.reserve, "storage.reserve");
    keep!(storage.history_days, "storage.history_days");
    keep!(storage.history_max_records, "storage.history_max_records");
    keep!(telemetry.metrics_file, "telemetry.metrics_file");

    let buses = effective.buses != running.buses
        || effective.site.timezone != running.site.timezone
        || effective.telemetry.low_battery_percent != running.telemetry.low_battery_percent;
    let rules = effective.site != running.site
        || effective.site().doors != running.site().doors
        || effective.pin_lockout != running.pin_lockout
        || effective.clock != running.clock
        || effective.storage.unrecordable_unlimited != running.storage.unrecordable_unlimited;
    // The uplink will report on `telemetry.interval`; restarting the link for it is cheap.
    let link = effective.cloud != running.cloud
        || effective.telemetry.interval != running.telemetry.interval;
    let log_level = (effective.log.level != running.log.level).then_some(effective.log.level);
    Plan {
        effective,
        restart_needed,
        log_level,
        rules,
        buses,
        link,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    const BASE: &str = include_str!("../../config/doorbridge.toml");

    fn base() -> Config {
        Config::from_toml_str(BASE, "doorbridge.toml").unwrap()
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let plan = plan(&base(), base());
        assert!(!plan.changes_anything(), "{plan:?}");
        assert!(plan.restart_needed.is_empty());
        assert_eq!(plan.effective, base());
    }

    #[test]
    fn identity_and_storage_wait_for_a_restart_and_the_rest_applies() {
        let mut loaded = base();
        loaded.gateway.id = "gw-other".into();
        loaded.storage.path = PathBuf::from("/elsewhere.db");
        loaded.storage.outbox_max_records = 5;
        loaded.storage.unrecordable_unlimited = crate::access::UnlimitedPolicy::Deny;
        loaded.pin_lockout.attempts = 9;
        let plan = plan(&base(), loaded);
        assert_eq!(
            plan.restart_needed,
            ["gateway.id", "storage.path", "storage.outbox_max_records"]
        );
        assert_eq!(plan.effective.gateway, base().gateway);
        assert_eq!(plan.effective.storage.path, base().storage.path);
        assert_eq!(plan.effective.storage.outbox_max_records, 100_000);
        assert_eq!(
            plan.effective.storage.unrecordable_unlimited,
            crate::access::UnlimitedPolicy::Deny
        );
        assert_eq!(plan.effective.pin_lockout.attempts, 9);
        assert_eq!(plan.changed(), ["decision rules"]);
    }

    #[test]
    fn each_part_is_redone_only_for_its_own_keys() {
        let mut loaded = base();
        loaded.log.level = LogLevel::Debug;
        let p = plan(&base(), loaded);
        assert_eq!(p.changed(), ["log level"]);
        assert_eq!(p.log_level, Some(LogLevel::Debug));

        let mut loaded = base();
        loaded.cloud.trusted_keys.pop();
        assert_eq!(plan(&base(), loaded).changed(), ["cloud link"]);

        let mut loaded = base();
        loaded.cloud.keepalive = Duration::from_secs(11);
        assert_eq!(plan(&base(), loaded).changed(), ["cloud link"]);

        let mut loaded = base();
        loaded.clock.tolerance = Duration::from_secs(30);
        assert_eq!(plan(&base(), loaded).changed(), ["decision rules"]);

        let mut loaded = base();
        loaded.buses[0].units.pop();
        assert_eq!(
            plan(&base(), loaded).changed(),
            ["decision rules", "door buses"]
        );

        let mut loaded = base();
        loaded.buses[0].poll_interval = Duration::from_millis(500);
        assert_eq!(plan(&base(), loaded).changed(), ["door buses"]);

        let mut loaded = base();
        loaded.site.name = Some("Elsewhere".into());
        assert_eq!(plan(&base(), loaded).changed(), ["decision rules"]);
    }
}
