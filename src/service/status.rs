//! The one-line `STATUS=` that `systemctl status doorbridge` shows.

use std::fmt;

/// The cloud link as the status line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Connected,
    /// Running, not connected (offline is normal: the doors do not need the cloud).
    Offline,
    /// The link could not start, or ended and waits to be started again.
    NotRunning,
}

/// What the daemon can see of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub buses: usize,
    /// Buses whose serial port is open.
    pub ports_open: usize,
    pub units: usize,
    pub units_online: usize,
    /// The held key set's version; 0: none yet.
    pub key_set: u64,
    pub cloud: Cloud,
    /// The store holds records in memory because the disk refuses them.
    pub store_degraded: bool,
    /// Why the watchdog is no longer being reset, if it is not.
    pub failed: Option<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: usize, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        write!(
            f,
            "{}/{} bus {} open, {}/{} {} online, ",
            self.ports_open,
            self.buses,
            plural(self.buses, "port", "ports"),
            self.units_online,
            self.units,
            plural(self.units, "unit", "units"),
        )?;
        if self.key_set == 0 {
            f.write_str("no key set")?;
        } else {
            write!(f, "key set v{}", self.key_set)?;
        }
        f.write_str(match self.cloud {
            Cloud::Connected => ", cloud connected",
            Cloud::Offline => ", cloud offline",
            Cloud::NotRunning => ", cloud link not running",
        })?;
        if self.store_degraded {
            f.write_str(", store degraded (disk refuses writes)")?;
        }
        if let Some(failed) = &self.failed {
            write!(f, "; FAILED: {failed}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_what_an_operator_looks_for() {
        let mut s = Summary {
            buses: 2,
            ports_open: 2,
            units: 4,
            units_online: 3,
            key_set: 12,
            cloud: Cloud::Connected,
            store_degraded: false,
            failed: None,
        };
        assert_eq!(
            s.to_string(),
            "2/2 bus ports open, 3/4 units online, key set v12, cloud connected"
        );
        s.buses = 1;
        s.ports_open = 0;
        s.units = 1;
        s.units_online = 0;
        s.key_set = 0;
        s.cloud = Cloud::Offline;
        s.store_degraded = true;
        s.failed = Some("bus entrance ended".into());
        assert_eq!(
            s.to_string(),
            "0/1 bus port open, 0/1 unit online, no key set, cloud offline, store degraded \
             (disk refuses writes); FAILED: bus entrance ended"
        );
    }
}
