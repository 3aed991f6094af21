//! Wiring and shutdown of the running service.
//!
//! [`serve`] is the library entry the binary and the tests share: it takes the configuration
//! and a shutdown signal, starts what the gateway runs and stops it cleanly: the store
//! (integrity check, migrations, writer thread), then one task per door bus. On shutdown the
//! buses stop first (decisions being recorded still reach their units), then the cloud link
//! (which says `offline`), then the store. The cloud link never holds the doors up: a gateway
//! that cannot reach its broker, or whose link cannot even start, keeps deciding.
//!
//! [`serve_with`] adds what a service manager asks for ([`Supervision`]): `READY=1` once the
//! store is open and the buses run, `WATCHDOG=1` while the store writer answers and no bus task
//! has ended, a `STATUS=` line, `STOPPING=1`, and reloads of the configuration (SIGHUP): the
//! log level, the decision rules, the door buses and the cloud link change in place, and what
//! needs a restart says so in the log. [`run`] is that under systemd, with the signals.
//! `docs/service.md` has the whole protocol.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::access::DoorId;
use crate::bus::frame::Address;
use crate::bus::message::DoorEventKind;
use crate::bus::message::Settings;
use crate::bus::session::{SessionConfig, default_turnaround};
use crate::cloud::link::{self, LinkSpec, LinkStatus};
use crate::cloud::telemetry::{BusProbe, TelemetrySpec};
use crate::config::{self, BusConfig, BusProtocol, Config, ReaderKind, Sources};
use crate::control::{self, ControlState};
use crate::drivers::bus::{BusSpec, BusStatus, DoorRouter, Rs485, UnitSpec, start_bus};
use crate::osdp::{
    self,
    driver::{OsdpBusSpec, ReaderSpec, run_osdp_bus},
    keypad::KeypadRules,
    reader::{Feedback, RawAs},
};
use crate::service::logging::{LevelChange, Logging};
use crate::service::notify::{self, Notifier};
use crate::service::reload;
use crate::service::status::{Cloud, Summary};
use crate::store::{DecisionContext, Reader, Record, Store, StoreError, StoreOptions};

/// How long a stopping bus task or cloud link may take.
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// How often the tasks are checked when systemd runs no watchdog.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often the `STATUS=` line is brought up to date (sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// A cloud link that ended on its own starts again after this long.
const LINK_RESTART_AFTER: Duration = Duration::from_secs(30);

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

/// What the daemon gets from its service manager besides the configuration. The default
/// sends nothing, runs no watchdog and takes no reloads (tests, benchmarks).
#[derive(Debug, Default)]
pub struct Supervision {
    pub notifier: Notifier,
    /// systemd's watchdog interval: `WATCHDOG=1` goes out every half of it while the tasks
    /// live. `None`: the tasks are still checked (every 10 s) and a dead one logged.
    pub watchdog: Option<Duration>,
    /// Where a reload reads the configuration again; `None`: reloads are refused.
    pub sources: Option<Sources>,
    /// The logging whose level a reload changes; `None`: the level stays.
    pub logging: Option<Logging>,
    /// One message per reload request (SIGHUP).
    pub reloads: Option<mpsc::Receiver<()>>,
}

/// Runs the gateway until `shutdown` completes.
pub async fn serve(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    serve_with(config, Supervision::default(), shutdown).await
}

/// Runs the gateway until `shutdown` completes, telling `supervision`'s notifier how it goes
/// and applying the reloads it asks for.
pub async fn serve_with(
    config: &Config,
    mut supervision: Supervision,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let store = open_store(config).await?;
    let mut running = Running::start(config.clone(), store).await;
    // The doors are served from here on, whether or not the cloud is reachable.
    let status = running.summary().to_string();
    supervision.notifier.ready(&status);
    running.status_sent = status;
    let mut check = tokio::time::interval(supervision.watchdog.map_or(CHECK_EVERY, |w| w / 2));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(STATUS_EVERY);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut store_health = running.store.health_handle();
    loop {
        tokio::select! {
            // SIGTERM or SIGINT (systemctl stop, Ctrl-C), or the caller's own signal.
            () = &mut shutdown => break,
            // The idle integrity check found the database damaged: serve on a fresh one
            // (opening moves the file aside and salvages unsent records and use counts).
            () = store_health.damage_found.notified() => {
                tracing::error!("the database is damaged: restarting the gateway's tasks on a fresh one");
                let config = running.config.clone();
                running.stop().await;
                let store = open_store(&config).await?;
                running = Running::start(config, store).await;
                store_health = running.store.health_handle();
            }
            // SIGHUP: read the configuration again and apply what can change while running.
            Some(()) = next_reload(&mut supervision.reloads) => running.reload(&supervision).await,
            // Are the tasks alive? Then reset systemd's watchdog.
            _ = check.tick() => running.check(&supervision).await,
            // The one-line status, sent when it changed.
            _ = status.tick() => running.publish_status(&supervision.notifier),
        }
    }
    supervision.notifier.stopping();
    tracing::info!("stopping");
    running.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Logs every door alarm at warning, with its fields, as it is committed: forced open, held
/// open, tamper, a reader's power failure, a low battery (`journalctl -p warning` shows them;
/// the other alarms are logged where they arise). Ends with the store.
async fn log_door_alarms(mut committed: tokio::sync::broadcast::Receiver<(i64, Record)>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let (seq, record) = match committed.recv().await {
            Ok(r) => r,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "door alarms came faster than they could be logged; see `doorbridge events`"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        match &record {
            Record::DoorEvent {
                unit, door, event, ..
            } if matches!(event, DoorEventKind::ForcedOpen | DoorEventKind::HeldOpen) => {
                tracing::warn!(seq, unit = %unit, door = %door, event = ?event, "DOOR ALARM: {}", if *event == DoorEventKind::ForcedOpen { "forced open" } else { "held open" });
            }
            Record::Tamper {
                unit, door, active, ..
            } => {
                tracing::warn!(seq, unit = %unit, door = %door, active, "DOOR ALARM: tamper {}", if *active { "(housing opened)" } else { "cleared" });
            }
            Record::PowerFailure {
                unit, door, active, ..
            } => {
                tracing::warn!(seq, unit = %unit, door = %door, active, "DOOR ALARM: {}", if *active { "reader power failure" } else { "reader power back" });
            }
            Record::Battery {
                unit,
                door,
                percent,
                low: true,
                ..
            } => {
                tracing::warn!(seq, unit = %unit, door = %door, percent, "DOOR ALARM: battery low");
            }
            _ => {}
        }
    }
}

/// The next reload request; never, without a channel or once it closed.
async fn next_reload(reloads: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match reloads {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Opens the store off the async workers: the integrity check may take seconds on a large
/// database.
async fn open_store(config: &Config) -> Result<Store, DaemonError> {
    let options = StoreOptions::from(config);
    let path = options.path.display().to_string();
    // The identity that signs the record chain, made at first start. A gateway that cannot
    // keep one still serves its doors: its records are chained, only the head goes unsigned.
    let dir = crate::store::chain::Identity::state_dir(&options.path);
    match crate::store::chain::Identity::load_or_create(&dir) {
        Ok(id) => tracing::info!(public_key = %id.public_hex(), "gateway identity"),
        Err(e) => {
            tracing::error!(error = %e, "no gateway identity; the record chain head goes unsigned");
        }
    }
    tokio::task::spawn_blocking(move || Store::open(options))
        .await
        .map_err(|e| DaemonError::Runtime(std::io::Error::other(e)))?
        .map_err(|source| DaemonError::Store { path, source })
}

/// One bus's task.
#[derive(Debug)]
struct BusTask {
    name: String,
    units: usize,
    /// Its units' addresses and doors, for telemetry.
    doors: Vec<(u8, DoorId)>,
    status: Arc<Mutex<BusStatus>>,
    task: JoinHandle<()>,
}

/// The cloud link's task.
#[derive(Debug)]
struct LinkTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// When it was seen to have ended without being asked to.
    ended: Option<Instant>,
}

/// A fingerprint of the TLS files the link reads, so that a reload notices a renewed
/// certificate at the same path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TlsFiles(Vec<Option<[u8; 32]>>);

impl TlsFiles {
    fn read(config: &Config) -> TlsFiles {
        let tls = &config.cloud.tls;
        TlsFiles(
            [&tls.ca_file, &tls.cert_file, &tls.key_file]
                .into_iter()
                .map(|file| {
                    let bytes = std::fs::read(file.as_ref()?).ok()?;
                    Some(Sha256::digest(bytes).into())
                })
                .collect(),
        )
    }
}

/// What runs, and with which configuration.
#[derive(Debug)]
struct Running {
    config: Config,
    store: Store,
    router: Arc<DoorRouter>,
    buses: Vec<BusTask>,
    /// Turns true to stop the current bus tasks.
    bus_stop: watch::Sender<bool>,
    link: Option<LinkTask>,
    /// One for the daemon's life, handed to every link task started.
    link_status: Arc<Mutex<LinkStatus>>,
    tls: TlsFiles,
    /// The store probe in flight (an empty write the writer must answer), and since when.
    probe: Option<(Instant, JoinHandle<bool>)>,
    /// Whether a slow probe was logged already.
    probe_late_logged: bool,
    /// Why the watchdog is no longer reset, once a task died.
    failed: Option<String>,
    status_sent: String,
    /// When the daemon started (uptime in telemetry).
    started: Instant,
    /// What the control socket answers from, and its task's stop.
    control: Option<(ControlState, watch::Sender<bool>, JoinHandle<()>)>,
    /// The metrics file's writer and its stop, when `telemetry.metrics_file` is set.
    metrics: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl Running {
    /// Starts the buses and the link on an open store.
    async fn start(config: Config, store: Store) -> Running {
        let path = store.path().display().to_string();
        let held = match store.read(Reader::key_set).await {
            Ok(set) => {
                tracing::info!(
                    path,
                    keyset_version = set.version,
                    keys = set.keys,
                    "store open"
                );
                set.version
            }
            Err(e) => {
                tracing::warn!(path, error = %e, "store open, but its key set cannot be read");
                0
            }
        };
        let link_status = Arc::new(Mutex::new(LinkStatus {
            held_version: held,
            ..LinkStatus::default()
        }));
        let (bus_stop, _) = watch::channel(false);
        let mut running = Running {
            tls: TlsFiles::read(&config),
            config,
            store,
            router: Arc::new(DoorRouter::default()),
            buses: Vec::new(),
            bus_stop,
            link: None,
            link_status,
            probe: None,
            probe_late_logged: false,
            failed: None,
            status_sent: String::new(),
            started: Instant::now(),
            control: None,
            metrics: None,
        };
        tokio::spawn(log_door_alarms(running.store.health().records.subscribe()));
        running.start_buses().await;
        running.start_control();
        running.link = match link::spec(&running.config) {
            Ok(spec) => Some(running.start_link(spec)),
            Err(e) => {
                tracing::error!(error = %e, "the cloud link cannot start; doors keep working from the held key set");
                None
            }
        };
        running
    }

    /// Starts one task per configured bus, and the router that reaches their doors.
    async fn start_buses(&mut self) {
        // What the cloud wants on each unit, and what each unit last applied, survive restarts.
        let settings = match self.store.read(Reader::unit_settings).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "door-unit settings could not be read");
                Vec::new()
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let (router, buses) = start_buses(&self.config, &self.store, &stop_rx, settings);
        self.bus_stop = stop;
        self.router = router;
        self.buses = buses;
        if let Some((control, _, _)) = &self.control {
            control.set_buses(self.telemetry_spec().buses);
        }
    }

    fn start_link(&self, spec: LinkSpec) -> LinkTask {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(link::run_link(
            spec,
            self.store.clone(),
            Arc::clone(&self.router),
            Arc::clone(&self.link_status),
            self.telemetry_spec(),
            stop_rx,
        ));
        LinkTask {
            stop,
            task,
            ended: None,
        }
    }

    /// Opens the control socket (`doorbridge status`, `events tail`) next to the database. A
    /// socket that cannot be opened costs the operator commands, never the doors.
    fn start_control(&mut self) {
        let url = self.config.cloud.url.first();
        let state = ControlState {
            store: self.store.clone(),
            link: Arc::clone(&self.link_status),
            telemetry: Arc::new(Mutex::new(self.telemetry_spec())),
            gateway: self.config.gateway.id.clone(),
            site: self.config.gateway.site_id.clone(),
            broker: format!("{}:{}", url.host, url.port),
        };
        if let Some(file) = &self.config.telemetry.metrics_file {
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(crate::metrics::run(
                state.clone(),
                file.clone(),
                self.store.health().records.subscribe(),
                stop_rx,
            ));
            self.metrics = Some((stop, task));
        }
        let path = control::socket_path(self.store.path());
        let listener = match control::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "no control socket: doorbridge status and events tail will not reach this daemon");
                return;
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(control::serve(listener, path, state.clone(), stop_rx));
        self.control = Some((state, stop, task));
    }

    /// What the telemetry summary is made of: the buses' status and the configured thresholds.
    fn telemetry_spec(&self) -> TelemetrySpec {
        TelemetrySpec {
            interval: self.config.telemetry.interval,
            low_battery_percent: self.config.telemetry.low_battery_percent,
            clock_tolerance: self.config.clock.tolerance,
            buses: self
                .buses
                .iter()
                .map(|b| BusProbe {
                    name: b.name.clone(),
                    status: Arc::clone(&b.status),
                    units: b.doors.clone(),
                })
                .collect(),
            started: self.started,
        }
    }

    /// Stops the bus tasks; each finishes the decisions it has in flight first.
    async fn stop_buses(&mut self) {
        let _ = self.bus_stop.send(true);
        for bus in self.buses.drain(..) {
            if tokio::time::timeout(STOP_WITHIN, bus.task).await.is_err() {
                tracing::warn!(bus = %bus.name, "bus did not stop in time");
            }
        }
    }

    async fn stop_link(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        let _ = link.stop.send(true);
        if tokio::time::timeout(STOP_WITHIN, link.task).await.is_err() {
            tracing::warn!("cloud link did not stop in time");
        }
        if let Ok(mut status) = self.link_status.lock() {
            status.connected = false;
        }
    }

    /// The buses first (decisions in flight reach their units), then the link, then the store.
    async fn stop(mut self) {
        self.stop_buses().await;
        self.stop_link().await;
        if let Some((_, stop, task)) = self.control.take() {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(STOP_WITHIN, task).await;
        }
        if let Some((stop, task)) = self.metrics.take() {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(STOP_WITHIN, task).await;
        }
        if let Some((_, probe)) = self.probe.take() {
            probe.abort();
        }
        let store = self.store;
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }

    /// Gives the store writer the decision rules of `config`.
    async fn reconfigure(&self, config: &Config) {
        if let Err(e) = self.store.reconfigure(DecisionContext::from(config)).await {
            tracing::error!(error = %e, "the new decision rules could not be given to the store");
        }
    }

    /// Checks that the tasks live: no bus task has ended, and the store writer answered the
    /// empty write sent at the previous check. Then resets the watchdog and sends the next
    /// empty write. A task found dead stops the resets for good: systemd restarts the service.
    async fn check(&mut self, supervision: &Supervision) {
        if self.failed.is_none()
            && let Some(bus) = self.buses.iter().find(|b| b.task.is_finished())
        {
            let why = format!("the task of bus {} ended", bus.name);
            self.fail(why, supervision.watchdog.is_some());
        }
        self.look_after_link();
        if let Some((since, probe)) = &mut self.probe {
            if !probe.is_finished() {
                // Late by a whole check (at least a second): worth a line, once.
                let late = supervision.watchdog.map_or(CHECK_EVERY, |w| w / 2);
                if !self.probe_late_logged && since.elapsed() >= late.max(Duration::from_secs(1)) {
                    self.probe_late_logged = true;
                    tracing::warn!(
                        waited_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "the store writer has not answered yet; the watchdog is not reset meanwhile"
                    );
                }
                return;
            }
            let answered = probe.await.unwrap_or(false);
            self.probe = None;
            if !answered {
                self.fail(
                    "the store writer is gone".into(),
                    supervision.watchdog.is_some(),
                );
            } else if self.failed.is_none() && supervision.watchdog.is_some() {
                // Sent from here, never from the probe: nothing follows `STOPPING=1`.
                supervision.notifier.watchdog();
            }
        }
        if self.failed.is_some() {
            return;
        }
        self.probe_late_logged = false;
        let store = self.store.clone();
        // Any answer, even a refused write, shows the writer thread at work.
        let probe = tokio::spawn(async move {
            !matches!(store.ack(Vec::new()).await, Err(StoreError::WriterGone))
        });
        self.probe = Some((Instant::now(), probe));
    }

    fn fail(&mut self, why: String, watchdog: bool) {
        if watchdog {
            tracing::error!(failure = %why, "a task died: the watchdog is no longer reset, so systemd restarts the service");
        } else {
            tracing::error!(failure = %why, "a task died; with no watchdog the service goes on without it");
        }
        self.failed = Some(why);
    }

    /// Starts the link again some time after it ended without being asked to: the doors do
    /// not need it, but the key sets come through it.
    fn look_after_link(&mut self) {
        let Some(link) = &mut self.link else {
            return;
        };
        if !link.task.is_finished() {
            return;
        }
        match link.ended {
            None => {
                tracing::error!(
                    retry_in_s = LINK_RESTART_AFTER.as_secs(),
                    "the cloud link ended on its own; it starts again shortly"
                );
                link.ended = Some(Instant::now());
                if let Ok(mut status) = self.link_status.lock() {
                    status.connected = false;
                }
            }
            Some(at) if at.elapsed() >= LINK_RESTART_AFTER => {
                self.link = match link::spec(&self.config) {
                    Ok(spec) => Some(self.start_link(spec)),
                    Err(e) => {
                        tracing::error!(error = %e, "the cloud link cannot start again");
                        None
                    }
                };
            }
            Some(_) => {}
        }
    }

    fn summary(&self) -> Summary {
        let mut summary = Summary {
            buses: self.buses.len(),
            ports_open: 0,
            units: 0,
            units_online: 0,
            key_set: 0,
            cloud: Cloud::NotRunning,
            store_degraded: self.store.health().degraded.load(Ordering::Relaxed),
            failed: self.failed.clone(),
        };
        for bus in &self.buses {
            summary.units += bus.units;
            if let Ok(status) = bus.status.lock() {
                summary.ports_open += usize::from(status.port_open);
                summary.units_online += status.units.values().filter(|u| u.online).count();
            }
        }
        if let Ok(link) = self.link_status.lock() {
            summary.key_set = link.held_version;
            let running = self.link.as_ref().is_some_and(|l| l.ended.is_none());
            summary.cloud = match (running, link.connected) {
                (false, _) => Cloud::NotRunning,
                (true, true) => Cloud::Connected,
                (true, false) => Cloud::Offline,
            };
        }
        summary
    }

    fn publish_status(&mut self, notifier: &Notifier) {
        let status = self.summary().to_string();
        if status != self.status_sent {
            notifier.status(&status);
            self.status_sent = status;
        }
    }

    /// Reads the configuration again from the same sources and applies it; a configuration
    /// with problems changes nothing. systemd hears `RELOADING=1` … `READY=1` around it.
    async fn reload(&mut self, supervision: &Supervision) {
        supervision.notifier.reloading();
        if let Some(sources) = &supervision.sources {
            tracing::info!(config = %sources.file.display(), "reloading the configuration");
            let sources = sources.clone();
            match tokio::task::spawn_blocking(move || config::load(&sources)).await {
                Ok(Ok(loaded)) => self.apply(loaded, supervision.logging.as_ref()).await,
                Ok(Err(errors)) => {
                    for problem in &errors.problems {
                        tracing::error!("configuration problem: {problem}");
                    }
                    tracing::error!(
                        problems = errors.problems.len(),
                        "the configuration was not reloaded: it has problems; running on with the configuration as it was"
                    );
                }
                Err(e) => tracing::error!(error = %e, "the configuration could not be read"),
            }
        } else {
            tracing::warn!("no configuration file to reload from; nothing changed");
        }
        let status = self.summary().to_string();
        supervision.notifier.ready(&status);
        self.status_sent = status;
    }

    /// Applies a loaded configuration: see [`reload::plan`]. Decisions are never dropped: a
    /// bus that stops finishes the ones it has in flight, and the store writer decides the
    /// next ones with whichever rules it holds when they arrive.
    async fn apply(&mut self, loaded: Config, logging: Option<&Logging>) {
        let mut plan = reload::plan(&self.config, loaded);
        for key in &plan.restart_needed {
            tracing::warn!(
                key,
                "changed in the configuration, but only a restart applies it: restart needed (systemctl restart doorbridge); the old value stays meanwhile"
            );
        }
        let tls = TlsFiles::read(&plan.effective);
        let mut restart_link = plan.link || tls != self.tls;
        // Checked before anything stops: with settings it cannot use, the link keeps its own.
        let mut spec = None;
        if restart_link || plan.buses {
            match link::spec(&plan.effective) {
                Ok(s) => spec = Some(s),
                Err(e) => {
                    if restart_link {
                        tracing::error!(error = %e, "the cloud link cannot start with the new [cloud] settings; it keeps the ones it has");
                    }
                    plan.effective.cloud = self.config.cloud.clone();
                    plan.effective.telemetry.interval = self.config.telemetry.interval;
                    plan.link = false;
                    restart_link = false;
                }
            }
        }
        let mut changed = plan.changed();
        if restart_link && !plan.link {
            changed.push("cloud link (TLS files)");
        }
        if let (Some(level), Some(logging)) = (plan.log_level, logging) {
            match logging.set_level(level) {
                Ok(LevelChange::Applied) => tracing::info!(%level, "log level changed"),
                Ok(LevelChange::Overridden) => tracing::warn!(
                    %level,
                    filter = logging.env_filter().unwrap_or_default(),
                    "log.level changed, but DOORBRIDGE_LOG overrides it"
                ),
                Err(e) => tracing::error!(error = %e, "the log level could not be changed"),
            }
        }
        self.config = plan.effective;
        if plan.buses {
            // The door routes change: every bus task and the link start again with new ones.
            self.stop_buses().await;
            if spec.is_some() {
                self.stop_link().await;
            }
            self.reconfigure(&self.config).await;
            self.start_buses().await;
            match spec {
                Some(spec) => self.link = Some(self.start_link(spec)),
                None if self.link.is_some() => tracing::warn!(
                    "the cloud link keeps its old door routes: commands for the restarted buses fail until it starts again"
                ),
                None => {}
            }
        } else {
            if plan.rules {
                self.reconfigure(&self.config).await;
            }
            if restart_link && let Some(spec) = spec {
                self.stop_link().await;
                self.link = Some(self.start_link(spec));
            }
        }
        if restart_link {
            self.tls = tls;
        }
        if changed.is_empty() {
            tracing::info!("configuration reloaded: nothing to change");
        } else {
            tracing::info!(changed = %changed.join(", "), "configuration reloaded");
        }
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
    let random = getrandom::u32()
        .unwrap_or_else(|_| jiff::Timestamp::now().subsec_nanosecond().unsigned_abs());
    let first_command_id = u16::try_from(random % 65_536).unwrap_or_default();
    BusSpec {
        name: bus.label(),
        port: bus.port.clone(),
        baud: bus.baud,
        rs485: rs485_of(bus),
        session: SessionConfig {
            units: units.iter().map(|u| u.address).collect(),
            baud: bus.baud,
            response_timeout: bus.response_timeout,
            retries: bus.retries,
            offline_after: bus.offline_after,
            min_cycle: bus.poll_interval,
            turnaround: bus
                .turnaround
                .unwrap_or_else(|| default_turnaround(bus.baud)),
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

/// A configured bus, ready to run: the doorbridge protocol or OSDP.
enum AnyBus {
    Doorbridge(BusSpec),
    Osdp(OsdpBusSpec),
}

impl AnyBus {
    fn name(&self) -> &str {
        match self {
            AnyBus::Doorbridge(s) => &s.name,
            AnyBus::Osdp(s) => &s.name,
        }
    }

    fn units(&self) -> Vec<UnitSpec> {
        match self {
            AnyBus::Doorbridge(s) => s.units.clone(),
            AnyBus::Osdp(s) => s.units(),
        }
    }
}

/// What the OSDP bus task for `bus` runs with. A key file that cannot be read leaves its
/// reader without a key: it is then refused (and alarmed) rather than served in plain text.
pub fn osdp_bus_spec(bus: &BusConfig) -> OsdpBusSpec {
    let readers = bus
        .units
        .iter()
        .filter_map(|u| {
            let reader = u.osdp.clone().unwrap_or_default();
            let scbk = reader
                .key_file
                .as_deref()
                .and_then(|path| match osdp::key::read(path) {
                    Ok(key) => Some(key),
                    Err(e) => {
                        tracing::error!(bus = %bus.label(), door = %u.door, error = %e,
                            "OSDP reader key unusable: the reader will be refused");
                        None
                    }
                });
            let raw_as = match reader.reader {
                ReaderKind::KeypadCard | ReaderKind::Elevator => RawAs::Card,
                ReaderKind::Qr => RawAs::Qr,
                ReaderKind::Mobile => RawAs::Mobile,
            };
            Some(ReaderSpec {
                address: Address::unit(u.address)?,
                door: u.door.clone(),
                name: u.name.clone().unwrap_or_else(|| u.door.to_string()),
                raw_as,
                keypad: KeypadRules {
                    digits: (reader.pin_digits > 0).then_some(reader.pin_digits),
                    timeout: reader.pin_timeout,
                    submit_on_timeout: false,
                },
                feedback: Feedback {
                    relay: (reader.reader != ReaderKind::Elevator).then_some(reader.relay),
                    pulse: reader.pulse,
                    display: reader.display,
                    floors: reader.floors.iter().map(|f| (f.floor, f.output)).collect(),
                },
                door_contact: reader.door_contact,
                held_open: reader.held_open,
                scbk,
                secure: reader.secure,
            })
        })
        .collect();
    OsdpBusSpec {
        name: bus.label(),
        port: bus.port.clone(),
        baud: bus.baud,
        rs485: rs485_of(bus),
        readers,
    }
}

/// The kernel RS-485 settings of `bus`, if enabled.
pub fn rs485_of(bus: &BusConfig) -> Option<Rs485> {
    bus.rs485.enabled.then(|| Rs485 {
        rts_on_send: bus.rs485.rts_on_send,
        delay_before_send_ms: u32::try_from(bus.rs485.delay_before_send.as_millis())
            .unwrap_or(u32::MAX),
        delay_after_send_ms: u32::try_from(bus.rs485.delay_after_send.as_millis())
            .unwrap_or(u32::MAX),
    })
}

/// Starts one task per configured bus; returns the router that reaches their doors.
fn start_buses(
    config: &Config,
    store: &Store,
    stop: &watch::Receiver<bool>,
    settings: Vec<(String, Option<Settings>, Option<Settings>)>,
) -> (Arc<DoorRouter>, Vec<BusTask>) {
    let specs: Vec<AnyBus> = config
        .buses
        .iter()
        .map(|b| match b.protocol {
            BusProtocol::Doorbridge => AnyBus::Doorbridge(bus_spec(config, b)),
            BusProtocol::Osdp => AnyBus::Osdp(osdp_bus_spec(b)),
        })
        .collect();
    let mut router = DoorRouter::default();
    let receivers: Vec<_> = specs
        .iter()
        .map(|s| router.add_units(&s.units()).1)
        .collect();
    for (door, desired, reported) in settings {
        router.update_settings(&door, |u| {
            u.desired = desired;
            u.reported = reported;
        });
    }
    let router = Arc::new(router);
    let tasks = specs
        .into_iter()
        .zip(receivers)
        .map(|(spec, commands)| {
            let name = spec.name().to_owned();
            let unit_specs = spec.units();
            let units = unit_specs.len();
            let doors = unit_specs
                .iter()
                .map(|u| (u.address.get(), u.door.clone()))
                .collect();
            let status = Arc::new(Mutex::new(BusStatus::default()));
            let task = match spec {
                AnyBus::Doorbridge(spec) => start_bus(
                    spec,
                    store.clone(),
                    Arc::clone(&router),
                    commands,
                    Arc::clone(&status),
                    stop.clone(),
                ),
                AnyBus::Osdp(spec) => tokio::spawn(run_osdp_bus(
                    spec,
                    store.clone(),
                    Arc::clone(&router),
                    commands,
                    Arc::clone(&status),
                    stop.clone(),
                )),
            };
            BusTask {
                name,
                units,
                doors,
                status,
                task,
            }
        })
        .collect();
    (router, tasks)
}

/// Runs the gateway on its own runtime as the systemd service: until SIGTERM or SIGINT,
/// reloading on SIGHUP from `sources`, notifying systemd when `NOTIFY_SOCKET` is set.
pub fn run(config: &Config, sources: Sources, logging: Option<Logging>) -> Result<(), DaemonError> {
    // Before the runtime's threads allocate: a key set's large blocks go back when freed.
    if !crate::store::hold_little() {
        tracing::debug!("allocator thresholds left at their defaults");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        // Listening before the store opens: an early SIGHUP waits rather than kills.
        let stop = stop_signal().map_err(DaemonError::Signals)?;
        let reloads = reload_requests().map_err(DaemonError::Signals)?;
        let supervision = Supervision {
            notifier: Notifier::systemd(),
            watchdog: notify::watchdog_interval(),
            sources: Some(sources),
            logging,
            reloads: Some(reloads),
        };
        if let Some(interval) = supervision.watchdog {
            tracing::info!(
                interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                "systemd watchdog on"
            );
        }
        serve_with(config, supervision, stop).await
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

/// One message per SIGHUP (`systemctl reload`); several arriving during a reload make one more.
fn reload_requests() -> std::io::Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received");
            // Full: a reload is pending already and will read the newest files.
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}
