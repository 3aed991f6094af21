//! The serial driver: one task per bus owns its port and moves bytes between the line and the
//! pure [`Session`]. Decisions go through the store (durable before the answer leaves);
//! reports become outbox records. A port that fails or disappears (a USB adapter unplugged)
//! is reopened with backoff while the other buses keep working.
//!
//! [`start_bus`] runs that task on a thread of its own with a single-threaded runtime: a poll
//! exchange then wakes only that thread (see its doc).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::port::Port;
use crate::access::{Decision, DenyReason, DoorId};
use crate::bus::frame::Address;
use crate::bus::message::{
    Battery, CallButton, DoorEvent, Grant, OpenDoor, Settings, Tamper, TimeSync,
};
use crate::bus::session::{
    Answer, Command, Report, RequestKey, Session, SessionConfig, SessionEvent, Stats, UnitState,
};
use crate::ids::UnitId;
use crate::store::{Record, Retransmit, Store, VerifyRequest};
use crate::task::{Backoff, clock_synced, jitter, stopped};

/// How long a unit's own door is released for when it is opened by command (inner doors,
/// remote open).
pub const OPEN_PULSE_MS: u16 = 3_000;
/// The first and longest wait before reopening a port that failed (OSDP lines too).
pub(crate) const REOPEN_FIRST: Duration = Duration::from_millis(200);
pub(crate) const REOPEN_MAX: Duration = Duration::from_secs(30);
/// Frame errors are logged at most this often (they are always counted).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the live counters and last-seen times are copied to the status, at most.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// A command (a door release) not sent within this long is dropped: an inner door opening
/// long after its grant would open for nobody.
const COMMAND_TTL: Duration = Duration::from_secs(5);
/// How often the time is broadcast to the units (and at every port open).
const TIME_EVERY: Duration = Duration::from_secs(3600);
/// How long a stopped bus's thread waits for the records it handed on to reach the store.
const HANDED_ON_GRACE: Duration = Duration::from_secs(2);
/// The resolution of tokio's timers: shorter waits are slept precisely (see `serve`).
const TIMER_TICK: Duration = Duration::from_millis(1);

/// RS-485 transceiver settings applied with `TIOCSRS485`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rs485 {
    pub rts_on_send: bool,
    pub delay_before_send_ms: u32,
    pub delay_after_send_ms: u32,
}

/// One door unit on a bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitSpec {
    pub address: Address,
    pub door: DoorId,
}

/// Everything a bus task needs to know.
#[derive(Clone, Debug)]
pub struct BusSpec {
    pub name: String,
    pub port: PathBuf,
    pub baud: u32,
    pub rs485: Option<Rs485>,
    pub session: SessionConfig,
    pub units: Vec<UnitSpec>,
    /// Battery readings at or below this percentage are alarms.
    pub low_battery_percent: u8,
    /// The site's time zone, for the time shown on the units' displays.
    pub tz: jiff::tz::TimeZone,
}

/// What the bus reports for status.
#[derive(Clone, Debug, Default)]
pub struct BusStatus {
    pub port_open: bool,
    pub reopens: u64,
    pub stats: Stats,
    pub units: HashMap<u8, UnitStatus>,
}

#[derive(Clone, Debug, Default)]
pub struct UnitStatus {
    pub online: bool,
    pub last_seen: Option<Timestamp>,
    /// The latest battery reading: percent, millivolts, when.
    pub battery: Option<(u8, u16, Timestamp)>,
}

/// A command for a unit, addressed by door.
pub type DoorCommand = (DoorId, Command);

/// How a tracked command ended at its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The unit acknowledged it.
    Done,
    /// The unit did not answer it (retries exhausted), or it could not be queued.
    NoAnswer,
    /// It waited past its moment (the port was down) and was dropped.
    Expired,
    /// The unit cannot carry out such a command (door-unit settings for an OSDP reader).
    Unsupported,
}

/// A command on its way to a bus task: the unit, the command, when it stops being worth
/// carrying out, and who wants to hear how it ended.
pub type Queued = (
    Address,
    Command,
    Instant,
    Option<oneshot::Sender<CommandOutcome>>,
);

/// Finds the bus that serves a door, for releases that cross units or buses.
#[derive(Clone, Debug, Default)]
pub struct DoorRouter {
    doors: HashMap<DoorId, (usize, Address)>,
    buses: Vec<mpsc::Sender<Queued>>,
    /// Door-unit settings: what the cloud wants (desired) and what each unit last said it
    /// applied (reported). A unit that reports otherwise, or comes back online, gets the
    /// desired settings pushed.
    settings: Arc<Mutex<HashMap<DoorId, UnitSettings>>>,
    /// Signalled when a unit's battery falls to the low threshold: the cloud link sends a
    /// telemetry summary at once instead of at its next interval.
    pub telemetry_now: Arc<tokio::sync::Notify>,
}

/// A door unit's settings, as wanted and as applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitSettings {
    pub desired: Option<Settings>,
    pub reported: Option<Settings>,
}

impl UnitSettings {
    /// Settings to push: the desired ones, when the unit is not known to have applied them.
    pub fn to_push(&self) -> Option<Settings> {
        let want = self.desired.as_ref()?;
        let applied = self.reported.as_ref().is_some_and(|got| {
            want.volume.is_none_or(|v| got.volume == Some(v))
                && want
                    .name
                    .as_ref()
                    .is_none_or(|n| got.name.as_ref() == Some(n))
                && want
                    .house_number
                    .as_ref()
                    .is_none_or(|h| got.house_number.as_ref() == Some(h))
                && want.inner_door.is_none_or(|i| got.inner_door == Some(i))
        });
        (!applied).then(|| want.clone())
    }
}

impl DoorRouter {
    /// Registers a bus; returns its index and the receiver its task reads commands from.
    pub fn add_bus(&mut self, spec: &BusSpec) -> (usize, mpsc::Receiver<Queued>) {
        self.add_units(&spec.units)
    }

    /// Registers the units of a bus of any protocol (an OSDP bus's readers); returns its index
    /// and the receiver its task reads commands from.
    pub fn add_units(&mut self, units: &[UnitSpec]) -> (usize, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(64);
        let index = self.buses.len();
        self.buses.push(tx);
        for unit in units {
            self.doors.insert(unit.door.clone(), (index, unit.address));
        }
        (index, rx)
    }

    /// Sends `command` to the unit serving `door`. False when no unit serves it or its queue
    /// is full.
    pub fn send(&self, door: &str, command: Command) -> bool {
        self.queue(door, command, None)
    }

    /// Like [`DoorRouter::send`], and tells how the command ended at the unit. `None` when no
    /// unit serves the door or its queue is full.
    pub fn send_tracked(
        &self,
        door: &str,
        command: Command,
    ) -> Option<oneshot::Receiver<CommandOutcome>> {
        let (tx, rx) = oneshot::channel();
        self.queue(door, command, Some(tx)).then_some(rx)
    }

    /// Whether a unit serves `door`.
    pub fn serves(&self, door: &str) -> bool {
        self.doors.contains_key(door)
    }

    /// Seeds or updates what is known of a door's unit settings.
    pub fn update_settings(&self, door: &str, f: impl FnOnce(&mut UnitSettings)) {
        if let Ok(mut all) = self.settings.lock() {
            f(all.entry(DoorId::from(door)).or_default());
        }
    }

    /// Pushes the desired settings to the unit at `door` if it is not known to have them.
    fn push_settings(&self, door: &str) {
        let push = self
            .settings
            .lock()
            .ok()
            .and_then(|all| all.get(door).and_then(UnitSettings::to_push));
        if let Some(settings) = push {
            tracing::info!(%door, ?settings, "pushing the desired settings to the door unit");
            if !self.send(door, Command::Settings(settings)) {
                tracing::warn!(%door, "settings not queued: no unit serves the door or its queue is full");
            }
        }
    }

    fn queue(
        &self,
        door: &str,
        command: Command,
        done: Option<oneshot::Sender<CommandOutcome>>,
    ) -> bool {
        let Some(&(bus, unit)) = self.doors.get(door) else {
            return false;
        };
        self.buses.get(bus).is_some_and(|tx| {
            tx.try_send((unit, command, Instant::now() + COMMAND_TTL, done))
                .is_ok()
        })
    }
}

/// Why one port session ended.
enum Ended {
    Shutdown,
    PortLost(std::io::Error),
}

/// Starts [`run_bus`] on a thread of its own (`bus-NAME`) with a single-threaded runtime, and
/// returns a handle on the caller's runtime that finishes when the bus task ends (or its
/// thread panicked), for the watchdog and the stop.
///
/// Why a thread: a poll exchange is a write, a wait for the answer and the quiet gap, five
/// times a second per unit for as long as the gateway runs. On the daemon's shared
/// multi-threaded runtime each exchange also woke and parked its other worker, and the time
/// and I/O drivers passed between them: about 4 context switches and 40-120 µs of CPU per
/// exchange (docs/performance.md, P7). Alone on its thread the bus parks in one `epoll_wait`
/// whose timeout is its own next deadline, and the decisions and reports it hands on (tasks
/// spawned here, waiting on the store's writer thread) stay on the same thread. The thread's
/// timer slack is 1 µs (`task::precise_sleeps`), so the quiet gap it sleeps ends on time.
pub fn start_bus(
    spec: BusSpec,
    store: Store,
    router: Arc<DoorRouter>,
    commands: mpsc::Receiver<Queued>,
    status: Arc<Mutex<BusStatus>>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            // Not worth losing the doors over: the shared runtime serves it, at a higher cost.
            tracing::warn!(bus = %spec.name, error = %e,
                "no runtime of its own for the bus; it runs on the shared one");
            return tokio::spawn(run_bus(spec, store, router, commands, status, shutdown));
        }
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let name = spec.name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("bus-{name}"))
        .spawn(move || {
            if let Err(e) = crate::task::precise_sleeps() {
                // The gap then lasts up to 50 µs longer: slower, not wrong.
                tracing::debug!(error = %e, "the bus thread's sleeps keep the default timer slack");
            }
            runtime.block_on(async {
                run_bus(spec, store, router, commands, status, shutdown).await;
                // What the bus handed on (records on their way to the store) runs on this
                // runtime: let it finish, as it would on the shared one, for a moment.
                let until = Instant::now() + HANDED_ON_GRACE;
                let tasks = tokio::runtime::Handle::current().metrics();
                while tasks.num_alive_tasks() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let _ = done_tx.send(());
        });
    if let Err(e) = thread {
        // The handle below finishes at once: the watchdog reports the bus as ended.
        tracing::error!(bus = %name, error = %e, "cannot start the bus thread");
    }
    // Finishes when the thread says so, or drops its sender unwinding from a panic.
    tokio::spawn(async move {
        let _ = done_rx.await;
    })
}

/// Runs one bus until `shutdown` turns true: opens the port, serves it, reopens it with
/// backoff when it fails.
pub async fn run_bus(
    spec: BusSpec,
    store: Store,
    router: Arc<DoorRouter>,
    mut commands: mpsc::Receiver<Queued>,
    status: Arc<Mutex<BusStatus>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut session = match Session::new(spec.session.clone()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(bus = %spec.name, error = %e, "bus not started: its configuration is unusable");
            return;
        }
    };
    // Lives as long as the bus task, across port reopens: the session's clock, and the
    // decisions still being recorded (their answers go out on whichever port is open).
    let mut line = Line::new();
    let mut backoff = Backoff::new(REOPEN_FIRST, REOPEN_MAX);
    loop {
        let failed = match open_port(&spec) {
            Ok(port) => {
                tracing::info!(bus = %spec.name, port = %spec.port.display(), baud = spec.baud, "bus port open");
                set_status(&status, |s| s.port_open = true);
                backoff.reset();
                let mut served = Served {
                    spec: &spec,
                    store: &store,
                    router: &router,
                    status: &status,
                };
                let ended = served
                    .serve(port, &mut session, &mut line, &mut commands, &mut shutdown)
                    .await;
                set_status(&status, |s| {
                    s.port_open = false;
                    s.stats = *session.stats();
                });
                match ended {
                    Ended::Shutdown => return,
                    Ended::PortLost(e) => {
                        tracing::warn!(bus = %spec.name, port = %spec.port.display(), error = %e,
                            "bus port lost; reopening");
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let wait = backoff.next_wait();
        if let Some(e) = failed {
            tracing::warn!(bus = %spec.name, port = %spec.port.display(), error = %e,
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "cannot open bus port");
        }
        set_status(&status, |s| s.reopens += 1);
        tokio::select! {
            // Stop while waiting to reopen.
            () = stopped(&mut shutdown) => return,
            // Try the port again.
            () = tokio::time::sleep(jitter(wait)) => {}
        }
    }
}

pub(crate) fn set_status(status: &Mutex<BusStatus>, f: impl FnOnce(&mut BusStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

fn open_port(spec: &BusSpec) -> std::io::Result<Port> {
    let builder = tokio_serial::new(spec.port.to_string_lossy(), spec.baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None);
    let port = Port::open(&builder)?;
    if let Some(rs485) = &spec.rs485 {
        apply_rs485(std::os::fd::AsRawFd::as_raw_fd(&port), rs485)?;
    }
    Ok(port)
}

/// Switches the open port `fd` to the kernel's RS-485 mode (any bus protocol).
pub(crate) fn apply_rs485(fd: std::os::fd::RawFd, settings: &Rs485) -> std::io::Result<()> {
    let mut conf = rs485::SerialRs485::new();
    conf.set_enabled(true)
        .set_rts_on_send(settings.rts_on_send)
        .set_rts_after_send(!settings.rts_on_send)
        .delay_rts_before_send_ms(settings.delay_before_send_ms)
        .delay_rts_after_send_ms(settings.delay_after_send_ms);
    conf.set_on_fd(fd).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot switch the port to RS-485 mode (TIOCSRS485): {e}"),
        )
    })
}

/// What outlives one opening of the port.
struct Line {
    /// The session's time base: one for the life of the task, so its deadlines stay valid
    /// across a reopen.
    start: Instant,
    decided_tx: mpsc::Sender<(RequestKey, Answer)>,
    decided_rx: mpsc::Receiver<(RequestKey, Answer)>,
    /// Decisions handed to the store and not yet answered.
    in_flight: usize,
    stored_tx: mpsc::Sender<(Address, u16, [u8; 32])>,
    stored_rx: mpsc::Receiver<(Address, u16, [u8; 32])>,
    /// While stopping: when the last answers have had their turn.
    settled_at: Option<Instant>,
    /// Commands whose sender waits to hear how they ended, by unit and message id.
    tracked: HashMap<(Address, u16), oneshot::Sender<CommandOutcome>>,
    last_error_log: Option<Instant>,
    /// When the counters and the units' last-seen times were last copied to the status.
    published: Option<Instant>,
}

impl Line {
    fn new() -> Line {
        let (decided_tx, decided_rx) = mpsc::channel(64);
        let (stored_tx, stored_rx) = mpsc::channel(64);
        Line {
            start: Instant::now(),
            decided_tx,
            decided_rx,
            stored_tx,
            stored_rx,
            in_flight: 0,
            tracked: HashMap::new(),
            settled_at: None,
            last_error_log: None,
            published: None,
        }
    }
}

/// The per-port loop's borrowed context.
struct Served<'a> {
    spec: &'a BusSpec,
    store: &'a Store,
    router: &'a DoorRouter,
    status: &'a Mutex<BusStatus>,
}

impl Served<'_> {
    async fn serve<P: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut port: P,
        session: &mut Session,
        line: &mut Line,
        commands: &mut mpsc::Receiver<Queued>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let start = line.start;
        let now = || start.elapsed();
        let mut buf = [0u8; 512];
        let mut clock = tokio::time::interval(TIME_EVERY);
        // Set once a stop is asked for: keep serving until then, so that decisions being
        // recorded still reach their units.
        let mut stop_by: Option<Instant> = None;
        loop {
            if let Some(tx) = session.poll_next(now())
                && let Err(e) = port.write_all(&tx.bytes).await
            {
                return Ended::PortLost(e);
            }
            if let Some(by) = stop_by {
                // Done once nothing is being decided and the last answers had their turn.
                if Instant::now() >= by
                    || (line.in_flight == 0 && line.settled_at.is_some_and(|t| Instant::now() >= t))
                {
                    return Ended::Shutdown;
                }
            }
            // The quiet gap after an answer is a few character times (304 µs at 115 200
            // baud), and tokio's timers tick in whole milliseconds: left to them, the gap
            // would last up to 1.3 ms, most of a poll and its answer on the wire. A gap shorter
            // than a tick is slept here instead, to the microsecond. That holds the bus's
            // thread for less than a millisecond, while the line is quiet anyway; nothing is lost
            // meanwhile (bytes wait in the port, messages in their channels). Only when a frame
            // goes out at the gap's end: after a cycle's last answer the line rests until the
            // next cycle, and waking for the gap alone would cost a wake-up per cycle.
            if let Some(until) = session.quiet_until()
                && session.next_transmit().is_some_and(|due| due <= until)
            {
                let left = (start + until).saturating_duration_since(Instant::now());
                if left < TIMER_TICK {
                    std::thread::sleep(left);
                    let events = session.on_timeout(now());
                    self.handle(events, session, line);
                    continue;
                }
            }
            let deadline = session.next_transmit().map(|d| start + d);
            let wake = match (deadline, stop_by) {
                (Some(d), Some(b)) => Some(d.min(b)),
                (d, b) => d.or(b),
            };
            tokio::select! {
                // Bytes from the line.
                read = port.read(&mut buf) => match read {
                    Ok(0) => return Ended::PortLost(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        let events = session.on_bytes(&buf[..n], now());
                        self.handle(events, session, line);
                    }
                    Err(e) => return Ended::PortLost(e),
                },
                // The session's answer or turn deadline passed (or the stop deadline).
                () = sleep_until(wake) => {
                    let events = session.on_timeout(now());
                    self.handle(events, session, line);
                }
                // A decision is on disk: send it.
                Some((key, answer)) = line.decided_rx.recv() => {
                    line.in_flight = line.in_flight.saturating_sub(1);
                    if let Err(e) = session.answer(&key, answer) {
                        tracing::debug!(bus = %self.spec.name, error = %e, "decision not sent");
                    }
                    if stop_by.is_some() && line.in_flight == 0 {
                        line.settled_at = Some(Instant::now() + self.grace());
                    }
                }
                // A report is on disk: acknowledge it to its unit.
                Some((unit, id, fingerprint)) = line.stored_rx.recv() => {
                    if let Err(e) = session.ack_report(unit, id, &fingerprint) {
                        tracing::debug!(bus = %self.spec.name, error = %e, "report ack not sent");
                    }
                }
                // Time for the units' displays: at the start and hourly.
                _ = clock.tick(), if stop_by.is_none() => self.broadcast_time(session),
                // A command for a unit on this bus (inner door release, remote open, settings);
                // one that waited past its moment (the port was down) is dropped, not carried out late.
                Some((unit, command, expires, done)) = commands.recv(), if stop_by.is_none() => {
                    if Instant::now() > expires {
                        tracing::warn!(bus = %self.spec.name, unit = %self.label(unit), "command expired before the unit could be reached");
                        finish(done, CommandOutcome::Expired);
                    } else {
                        match session.send(unit, &command) {
                            Ok(id) => {
                                if let Some(done) = done {
                                    line.tracked.insert((unit, id), done);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(bus = %self.spec.name, unit = %self.label(unit), error = %e, "command not queued");
                                finish(done, CommandOutcome::NoAnswer);
                            }
                        }
                    }
                }
                // Stop asked for: finish what is being decided, for at most 2 s.
                () = stopped(shutdown), if stop_by.is_none() => {
                    stop_by = Some(Instant::now() + Duration::from_secs(2));
                    if line.in_flight == 0 {
                        line.settled_at = Some(Instant::now() + self.grace());
                    }
                }
            }
        }
    }

    /// Long enough for a queued answer to get its turn on the line.
    fn grace(&self) -> Duration {
        self.spec.session.response_timeout * 2
            + self.spec.session.turnaround * 2
            + Duration::from_millis(20)
    }

    fn broadcast_time(&self, session: &mut Session) {
        let now = Timestamp::now();
        let offset = self.spec.tz.to_offset(now).seconds();
        let time = TimeSync {
            unix: u64::try_from(now.as_second()).unwrap_or(0),
            utc_offset: offset,
        };
        if let Err(e) = session.send(Address::BROADCAST, &Command::Time(time)) {
            tracing::debug!(bus = %self.spec.name, error = %e, "time not broadcast");
        }
    }

    fn unit_door(&self, unit: Address) -> Option<&DoorId> {
        self.spec
            .units
            .iter()
            .find(|u| u.address == unit)
            .map(|u| &u.door)
    }

    fn label(&self, unit: Address) -> UnitId {
        UnitId::on(&self.spec.name, unit.get())
    }

    fn handle(&self, events: Vec<SessionEvent>, session: &Session, line: &mut Line) {
        self.publish(session, line);
        for event in events {
            match event {
                SessionEvent::Request(request) => {
                    self.seen(request.key.unit);
                    line.in_flight += 1;
                    self.decide(request, line.decided_tx.clone());
                }
                SessionEvent::Report {
                    unit,
                    id,
                    report,
                    fingerprint,
                } => {
                    self.seen(unit);
                    self.report(unit, report, line.stored_tx.clone(), (id, fingerprint));
                }
                SessionEvent::Repeat { unit, id, answered } => {
                    tracing::debug!(bus = %self.spec.name, unit = %self.label(unit), id, answered, "retransmitted request");
                }
                SessionEvent::UnitOnline(unit) => self.reachability(unit, true),
                SessionEvent::UnitOffline(unit) => self.reachability(unit, false),
                SessionEvent::UnitRestarted { unit, boot_id } => {
                    tracing::info!(bus = %self.spec.name, unit = %self.label(unit), boot_id, "door unit restarted");
                }
                SessionEvent::CommandDone { unit, id } => {
                    tracing::debug!(bus = %self.spec.name, unit = %self.label(unit), id, "command done");
                    finish(line.tracked.remove(&(unit, id)), CommandOutcome::Done);
                }
                SessionEvent::CommandFailed { unit, id } => {
                    tracing::warn!(bus = %self.spec.name, unit = %self.label(unit), id, "command got no answer");
                    finish(line.tracked.remove(&(unit, id)), CommandOutcome::NoAnswer);
                }
                SessionEvent::FrameError(error) => {
                    let stats = session.stats();
                    if line
                        .last_error_log
                        .is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY)
                    {
                        line.last_error_log = Some(Instant::now());
                        tracing::warn!(bus = %self.spec.name, %error, frame_errors = stats.frame_errors(),
                            "bad bytes on the bus (counted; the bus keeps serving)");
                    }
                    set_status(self.status, |s| s.stats = *stats);
                }
                SessionEvent::BadMessage { unit, id, error } => {
                    tracing::warn!(bus = %self.spec.name, unit = %self.label(unit), id, %error, "bad message from a unit");
                }
                SessionEvent::Unexpected { unit, id, msg_type } => {
                    tracing::debug!(bus = %self.spec.name, unit = %self.label(unit), id, msg_type, "frame outside its turn");
                }
            }
        }
    }

    /// Copies the session's counters to the status, and marks the units it holds online as
    /// seen now (each answered a poll within `offline_after` turns), at most every
    /// [`STATUS_EVERY`]: `status` and telemetry show live figures, not those of the last error.
    fn publish(&self, session: &Session, line: &mut Line) {
        if line.published.is_some_and(|t| t.elapsed() < STATUS_EVERY) {
            return;
        }
        line.published = Some(Instant::now());
        let now = Timestamp::now();
        let online: Vec<u8> = self
            .spec
            .units
            .iter()
            .filter(|u| session.unit_state(u.address) == Some(UnitState::Online))
            .map(|u| u.address.get())
            .collect();
        set_status(self.status, |s| {
            s.stats = *session.stats();
            for a in online {
                s.units.entry(a).or_default().last_seen = Some(now);
            }
        });
    }

    fn seen(&self, unit: Address) {
        set_status(self.status, |s| {
            let u = s.units.entry(unit.get()).or_default();
            u.online = true;
            u.last_seen = Some(Timestamp::now());
        });
    }

    /// Decides on a task of its own so the bus keeps polling while the store commits.
    fn decide(
        &self,
        request: crate::bus::session::VerifyRequest,
        decided: mpsc::Sender<(RequestKey, Answer)>,
    ) {
        let unit = request.key.unit;
        let Some(door) = self.unit_door(unit).cloned() else {
            // Not configured here: refuse rather than leave the unit waiting.
            tokio::spawn(async move {
                let _ = decided
                    .send((request.key, Answer::Deny(DenyReason::WrongDoor)))
                    .await;
            });
            return;
        };
        let router = self.router.clone();
        let bus = self.spec.name.clone();
        let label = self.label(unit);
        // Handed to the store's writer now: the decision is made while this task sleeps the
        // quiet gap after the unit's frame (a task spawned here would wait for that too).
        let decided_now = self.store.verify(VerifyRequest {
            unit: label.clone(),
            door: door.clone(),
            request_id: Some(u32::from(request.key.id)),
            kind: request.verify.kind,
            secret: request.verify.value,
            now: Timestamp::now(),
            clock_synced: clock_synced(),
            retransmit: Some(Retransmit {
                fingerprint: request.key.fingerprint,
                boot_id: request.key.boot_id,
            }),
        });
        tokio::spawn(async move {
            let answer = match decided_now.await {
                Ok(verdict) => {
                    log_decision(&label, &door, &verdict.decision, verdict.key_id.as_deref());
                    match verdict.decision {
                        Decision::Grant(grant) => {
                            release_elsewhere(&router, &door, &grant.doors);
                            Answer::Grant(Grant::from_access(&grant, |d| (d == door).then_some(0)))
                        }
                        Decision::Deny { reason } => Answer::Deny(reason),
                    }
                }
                Err(e) => {
                    tracing::error!(%bus, unit = %label, %door, error = %e, "decision failed");
                    Answer::Deny(DenyReason::NotRecorded)
                }
            };
            let _ = decided.send((request.key, answer)).await;
        });
    }

    /// Makes an outbox record of a report; once it is on disk, `stored` tells the loop to
    /// acknowledge it (a unit keeps a report until acknowledged, so nothing is lost between).
    fn report(
        &self,
        unit: Address,
        report: Report,
        stored: mpsc::Sender<(Address, u16, [u8; 32])>,
        (id, fingerprint): (u16, [u8; 32]),
    ) {
        let Some(door) = self.unit_door(unit).cloned() else {
            return;
        };
        let unit_label = self.label(unit);
        let at = Timestamp::now();
        let record = match report {
            Report::DoorEvent(DoorEvent { event, .. }) => Record::DoorEvent {
                at,
                unit: unit_label,
                door,
                event,
            },
            Report::CallButton(CallButton { button, .. }) => Record::CallButton {
                at,
                unit: unit_label,
                door,
                button,
            },
            Report::Tamper(Tamper { active, .. }) => Record::Tamper {
                at,
                unit: unit_label,
                door,
                active,
            },
            Report::Battery(Battery {
                percent,
                millivolts,
                ..
            }) => {
                let low = self.spec.low_battery_percent;
                let mut crossed = false;
                set_status(self.status, |s| {
                    let u = s.units.entry(unit.get()).or_default();
                    crossed = percent <= low && u.battery.is_none_or(|(was, _, _)| was > low);
                    u.battery = Some((percent, millivolts, at));
                });
                if crossed {
                    tracing::warn!(bus = %self.spec.name, unit = %unit_label, %door, percent, "door unit battery low");
                    self.router.telemetry_now.notify_one();
                }
                Record::Battery {
                    at,
                    unit: unit_label,
                    door,
                    percent,
                    millivolts,
                    low: percent <= self.spec.low_battery_percent,
                }
            }
            Report::Status(status) => {
                tracing::info!(bus = %self.spec.name, unit = %self.label(unit), firmware = %status.firmware,
                    settings = ?status.settings, "door unit status");
                self.router
                    .update_settings(&door, |u| u.reported = Some(status.settings.clone()));
                let store = self.store.clone();
                let at = door.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.report_settings(at, status.settings).await {
                        tracing::warn!(error = %e, "a unit's reported settings could not be stored");
                    }
                });
                self.router.push_settings(&door);
                return;
            }
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            match store.append(vec![record]).await {
                Ok(seqs) if !seqs.is_empty() => {
                    let _ = stored.send((unit, id, fingerprint)).await;
                }
                // Held in memory (the disk refuses): leave it with the unit, which sends it again.
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "a door report could not be stored"),
            }
        });
    }

    fn reachability(&self, unit: Address, online: bool) {
        let Some(door) = self.unit_door(unit).cloned() else {
            return;
        };
        if online {
            tracing::info!(bus = %self.spec.name, unit = %self.label(unit), %door, "door unit online");
        } else {
            tracing::warn!(bus = %self.spec.name, unit = %self.label(unit), %door, "door unit offline: it stopped answering polls");
        }
        set_status(self.status, |s| {
            s.units.entry(unit.get()).or_default().online = online;
        });
        if online {
            self.router.push_settings(&door);
        }
        self.append(Record::UnitReachability {
            at: Timestamp::now(),
            unit: self.label(unit),
            door,
            online,
        });
    }

    fn append(&self, record: Record) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.append(vec![record]).await {
                tracing::error!(error = %e, "a door record could not be stored");
            }
        });
    }
}

/// Opens the other doors a grant releases (an inner door on another unit).
pub(crate) fn release_elsewhere(router: &DoorRouter, at: &str, doors: &[DoorId]) {
    for door in doors.iter().filter(|d| d.as_str() != at) {
        let command = Command::OpenDoor(OpenDoor {
            door: 0,
            pulse_ms: OPEN_PULSE_MS,
        });
        if !router.send(door, command) {
            tracing::warn!(%door, "a granted door could not be released: no unit serves it or its queue is full");
        }
    }
}

pub(crate) fn log_decision(unit: &str, door: &str, decision: &Decision, key: Option<&str>) {
    match decision {
        Decision::Grant(g) => {
            tracing::info!(unit, door, key_id = key.unwrap_or("-"), released = ?g.doors, "granted");
        }
        Decision::Deny { reason } => {
            tracing::info!(unit, door, key_id = key.unwrap_or("-"), reason = %reason, "denied");
        }
    }
}

pub(crate) fn finish(done: Option<oneshot::Sender<CommandOutcome>>, outcome: CommandOutcome) {
    if let Some(done) = done {
        let _ = done.send(outcome);
    }
}

/// Sleeps until `deadline`, or for ever without one (a `select!` branch that never fires).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
