//! Wiring and shutdown of the running service.
//!
//! [`serve`] is the library entry the binary and the tests share: it takes the configuration
//! and a shutdown signal, starts what the gateway runs and stops it cleanly: the store
//! (integrity check, migrations, writer thread), then one task per door bus. On shutdown the
//! buses stop first (decisions being recorded still reach their units), then the cloud link
//! (which says `offline`), then the store. The cloud link never holds the doors up: a gateway
//! that cannot reach its broker, or whose link cannot even start, keeps deciding.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::bus::driver::{BusSpec, BusStatus, DoorRouter, Rs485, UnitSpec, run_bus};
use crate::bus::frame::Address;
use crate::bus::message::Settings;
use crate::bus::session::SessionConfig;
use crate::cloud::link::{self, LinkStatus};
use crate::cloud::telemetry::{BusProbe, TelemetrySpec};
use crate::config::{BusConfig, Config};
use crate::store::{DecisionContext, Reader, Store, StoreError, StoreOptions};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the store at {path}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for stop signals")]
    Signals(#[source] std::io::Error),
}

impl DaemonError {
    /// Whether starting again may help (systemd's `Restart=on-failure` will try).
    pub fn is_retryable(&self) -> bool {
        match self {
            DaemonError::Store { source, .. } => source.is_retryable(),
            DaemonError::Runtime(_) | DaemonError::Signals(_) => true,
        }
    }
}

/// The rules decisions are made with, from the configuration.
pub fn decision_context(config: &Config) -> DecisionContext {
    DecisionContext {
        site: config.site(),
        policy: config.access_policy(),
        lockout: config.lockout_policy(),
        clock_tolerance: jiff::SignedDuration::try_from(config.clock.tolerance)
            .unwrap_or(jiff::SignedDuration::MAX),
        unrecordable_unlimited: config.storage.unrecordable_unlimited,
    }
}

/// How to open the store, from the configuration.
pub fn store_options(config: &Config) -> StoreOptions {
    let mut options = StoreOptions::new(&config.storage.path, decision_context(config));
    options.max_size = (config.storage.max_size != 0).then_some(config.storage.max_size);
    options.outbox_max_records = Some(config.storage.outbox_max_records);
    options.outbox_max_bytes = Some(config.storage.outbox_max_bytes);
    options
}

/// Runs the gateway until `shutdown` completes.
pub async fn serve(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let options = store_options(config);
    let path = options.path.display().to_string();
    // Opening runs the integrity check, which may take seconds on a large database.
    let store = tokio::task::spawn_blocking(move || Store::open(options))
        .await
        .map_err(|e| DaemonError::Runtime(std::io::Error::other(e)))?
        .map_err(|source| DaemonError::Store {
            path: path.clone(),
            source,
        })?;
    match store.read(Reader::key_set).await {
        Ok(set) => tracing::info!(
            path,
            keyset_version = set.version,
            keys = set.keys,
            "store open"
        ),
        Err(e) => tracing::warn!(path, error = %e, "store open, but its key set cannot be read"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // What the cloud wants on each unit, and what each unit last applied, survive restarts.
    let settings = match store.read(Reader::unit_settings).await {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(error = %e, "door-unit settings could not be read");
            Vec::new()
        }
    };
    let (router, buses, probes) = start_buses(config, &store, &stop_rx, settings);
    let (link_stop_tx, link_stop_rx) = watch::channel(false);
    let link = match link::spec(config) {
        Ok(spec) => Some(tokio::spawn(link::run_link(
            spec,
            store.clone(),
            router,
            Arc::new(Mutex::new(LinkStatus::default())),
            telemetry_spec(config, probes),
            link_stop_rx,
        ))),
        Err(e) => {
            tracing::error!(error = %e, "the cloud link cannot start; doors keep working from the held key set");
            None
        }
    };
    shutdown.await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    for (name, task) in buses {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!(bus = %name, "bus did not stop in time");
        }
    }
    let _ = link_stop_tx.send(true);
    if let Some(link) = link
        && tokio::time::timeout(Duration::from_secs(5), link)
            .await
            .is_err()
    {
        tracing::warn!("cloud link did not stop in time");
    }
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    tracing::info!("stopped");
    Ok(())
}

/// What the telemetry summary is made of: the buses' status and the configured thresholds.
fn telemetry_spec(config: &Config, buses: Vec<BusProbe>) -> TelemetrySpec {
    TelemetrySpec {
        interval: config.telemetry.interval,
        low_battery_percent: config.telemetry.low_battery_percent,
        clock_tolerance: config.clock.tolerance,
        buses,
        started: std::time::Instant::now(),
    }
}

/// What the bus task for `bus` runs with.
pub fn bus_spec(config: &Config, bus: &BusConfig) -> BusSpec {
    let units: Vec<UnitSpec> = bus
        .units
        .iter()
        .filter_map(|u| {
            Some(UnitSpec {
                address: Address::unit(u.address)?,
                door: u.door.clone(),
            })
        })
        .collect();
    // A fresh starting id, so a restarted gateway does not reuse ids a unit has just seen.
    let first_command_id =
        u16::try_from(jiff::Timestamp::now().subsec_nanosecond() % 65_536).unwrap_or_default();
    BusSpec {
        name: bus.label(),
        port: bus.port.clone(),
        baud: bus.baud,
        rs485: bus.rs485.enabled.then(|| Rs485 {
            rts_on_send: bus.rs485.rts_on_send,
            delay_before_send_ms: u32::try_from(bus.rs485.delay_before_send.as_millis())
                .unwrap_or(u32::MAX),
            delay_after_send_ms: u32::try_from(bus.rs485.delay_after_send.as_millis())
                .unwrap_or(u32::MAX),
        }),
        session: SessionConfig {
            units: units.iter().map(|u| u.address).collect(),
            baud: bus.baud,
            response_timeout: bus.response_timeout,
            retries: bus.retries,
            offline_after: bus.offline_after,
            min_cycle: bus.poll_interval,
            first_command_id,
            // A unit keeps a report until it is on disk here.
            defer_report_acks: true,
            ..SessionConfig::default()
        },
        units,
        low_battery_percent: config.telemetry.low_battery_percent,
        tz: config.time_zone(),
    }
}

/// A running bus task.
type BusTask = (String, tokio::task::JoinHandle<()>);

/// Starts one task per configured bus; returns the router that reaches their doors, the
/// tasks, and where each bus shows its status.
fn start_buses(
    config: &Config,
    store: &Store,
    stop: &watch::Receiver<bool>,
    settings: Vec<(String, Option<Settings>, Option<Settings>)>,
) -> (Arc<DoorRouter>, Vec<BusTask>, Vec<BusProbe>) {
    let specs: Vec<BusSpec> = config.buses.iter().map(|b| bus_spec(config, b)).collect();
    let mut router = DoorRouter::default();
    let receivers: Vec<_> = specs.iter().map(|s| router.add_bus(s).1).collect();
    for (door, desired, reported) in settings {
        router.update_settings(&door, |u| {
            u.desired = desired;
            u.reported = reported;
        });
    }
    let router = Arc::new(router);
    let mut probes = Vec::new();
    let tasks = specs
        .into_iter()
        .zip(receivers)
        .map(|(spec, commands)| {
            let name = spec.name.clone();
            let status = Arc::new(Mutex::new(BusStatus::default()));
            probes.push(BusProbe {
                name: name.clone(),
                status: Arc::clone(&status),
                units: spec
                    .units
                    .iter()
                    .map(|u| (u.address.get(), u.door.clone()))
                    .collect(),
            });
            let task = tokio::spawn(run_bus(
                spec,
                store.clone(),
                Arc::clone(&router),
                commands,
                status,
                stop.clone(),
            ));
            (name, task)
        })
        .collect();
    (router, tasks, probes)
}

/// Runs the gateway on its own runtime until SIGTERM or SIGINT.
pub fn run(config: &Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let stop = stop_signal().map_err(DaemonError::Signals)?;
        serve(config, stop).await
    })
}

/// Completes on the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            // systemd stops the service.
            _ = term.recv() => tracing::info!("SIGTERM received"),
            // An operator pressed Ctrl-C.
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
