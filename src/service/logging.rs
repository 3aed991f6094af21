//! Logging for the binary's commands: one setup for `run` and `keys import`.
//!
//! Under systemd — `JOURNAL_STREAM` names the device and inode of our stderr, the way
//! systemd.exec(5) documents for telling a journal-connected stderr apart from an inherited
//! one — events go to journald natively through `tracing-journald`: each event's fields become
//! journal fields of their own (`door` → `DOOR=`, `key_id` → `KEY_ID=`), upper-cased, with no
//! prefix, and the level becomes the `PRIORITY` (error 3, warn 4, info 5, debug 6, trace 7).
//! Elsewhere, or when journald's socket cannot be reached, events are readable lines on stderr.
//!
//! The level is `log.level` from the configuration unless `DOORBRIDGE_LOG` gives a filter; a
//! reload ([`Logging::set_level`]) changes the former and never overrides the latter.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LOG_ENV, LogLevel};

/// The variable systemd sets to `DEVICE:INODE` of the stream it connected stdout/stderr to.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";
/// What journald shows as `SYSLOG_IDENTIFIER`, whatever the binary is called.
const IDENTIFIER: &str = "doorbridge";

/// Why logging could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{LOG_ENV}={value:?} is not a valid log filter")]
    Filter {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("{LOG_ENV} is not valid UTF-8")]
    NotUnicode,
    #[error("cannot start logging")]
    Init(#[source] tracing_subscriber::util::TryInitError),
    #[error("cannot change the log level")]
    Reload(#[source] reload::Error),
}

/// Where events go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Native journald entries, with their fields.
    Journald,
    /// Text lines on stderr.
    Stderr,
}

/// The installed logging: where it goes, and the handle that changes its level.
#[derive(Clone, Debug)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    /// The `DOORBRIDGE_LOG` filter, when it overrides `log.level`.
    env_filter: Option<String>,
    sink: Sink,
}

/// What [`Logging::set_level`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// Events at `log.level` and above are logged from now on.
    Applied,
    /// `DOORBRIDGE_LOG` is set and keeps deciding.
    Overridden,
}

impl Logging {
    pub fn sink(&self) -> Sink {
        self.sink
    }

    /// The `DOORBRIDGE_LOG` filter in force instead of `log.level`, if any.
    pub fn env_filter(&self) -> Option<&str> {
        self.env_filter.as_deref()
    }

    /// Logs at `level` from now on, unless `DOORBRIDGE_LOG` overrides it.
    pub fn set_level(&self, level: LogLevel) -> Result<LevelChange, LogError> {
        if self.env_filter.is_some() {
            return Ok(LevelChange::Overridden);
        }
        self.filter
            .reload(EnvFilter::new(level.as_str()))
            .map_err(LogError::Reload)?;
        Ok(LevelChange::Applied)
    }
}

/// Installs the global subscriber: journald under systemd, else stderr; at `level` unless
/// `DOORBRIDGE_LOG` is set. Call once per process.
pub fn init(level: LogLevel) -> Result<Logging, LogError> {
    let env_filter = match std::env::var(LOG_ENV) {
        Ok(directives) if !directives.trim().is_empty() => Some(directives),
        Ok(_) | Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => return Err(LogError::NotUnicode),
    };
    let filter = match &env_filter {
        Some(directives) => EnvFilter::try_new(directives).map_err(|source| LogError::Filter {
            value: directives.clone(),
            source,
        })?,
        None => EnvFilter::new(level.as_str()),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let under_journal = stderr_is_journal();
    let (journald, unreachable) = if under_journal {
        match tracing_journald::layer() {
            Ok(layer) => (
                Some(
                    layer
                        .with_field_prefix(None)
                        .with_syslog_identifier(IDENTIFIER.to_owned()),
                ),
                None,
            ),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let sink = if journald.is_some() {
        Sink::Journald
    } else {
        Sink::Stderr
    };
    // journald stamps each line with its own time: no second timestamp on a journal stream.
    let stderr = (sink == Sink::Stderr).then(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        if under_journal {
            layer.without_time().boxed()
        } else {
            layer.boxed()
        }
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init()
        .map_err(LogError::Init)?;
    if let Some(e) = unreachable {
        tracing::warn!(error = %e, "journald's socket cannot be reached: logging to stderr instead");
    }
    Ok(Logging {
        filter: handle,
        env_filter,
        sink,
    })
}

/// Whether stderr is the stream systemd connected to the journal (`JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os(JOURNAL_STREAM_ENV) else {
        return false;
    };
    let Some(expected) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    // fstat(2) on a duplicate of fd 2: no unsafe code for a plain stat.
    let stat = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata());
    stat.is_ok_and(|m| (m.dev(), m.ino()) == expected)
}

/// `DEVICE:INODE`, both decimal, as systemd writes `JOURNAL_STREAM`.
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:1234"), Some((8, 1234)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
    }
}
