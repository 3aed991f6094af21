//! The pure unit-side state machine: one or many simulated door units on one line.
//!
//! See the module documentation of [`crate::sim`] for how the pieces fit together.

use std::collections::VecDeque;
use std::time::Duration;

use thiserror::Error;

use doorbridge_proto::access::CredentialKind;
use doorbridge_proto::bus::frame::{
    Address, DELIMITER, Decoder, Direction, Frame, FrameError, cobs_encode, encode,
};
use doorbridge_proto::bus::message::{
    Battery, CallButton, DoorEvent, DoorEventKind, Message, MessageError, OpenDoor, Settings,
    Status, Tamper, TimeSync, Verify,
};
use doorbridge_proto::bus::session::Answer;

/// The most garbage bytes one [`SimCommand::Garbage`] may put on the line.
pub const MAX_GARBAGE: usize = 4096;
/// The most credentials that may wait behind the verify in flight, per unit.
pub const MAX_WAITING_CREDENTIALS: usize = 8;
/// How many carried-out commands a unit remembers to refuse repeats (§7.2 "the last few").
const COMMAND_MEMORY: usize = 8;

/// How the simulated units behave. A plain struct; [`SimConfig::default`] is a unit as the
/// protocol describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The firmware version the units report in their status (≤ 32 bytes).
    pub firmware: String,
    /// Seeds the pseudo-random boot ids, first request ids and garbage bytes, so a run can be
    /// repeated exactly. The units are otherwise deterministic.
    pub seed: u64,
    /// Every unit numbers its reports from this id. `None`: a random id per unit, as a real
    /// unit picks at power-up.
    pub first_id: Option<u16>,
    /// Put a status report at the head of every outbox at start (and at
    /// [`SimCommand::Restart`]), as a unit does at power-up.
    pub boot_status: bool,
    /// The settings the units start with (as applied; reported in their status).
    pub settings: Settings,
    /// Reports (events, battery, status) a unit keeps until acknowledged; on overflow the
    /// oldest battery reading goes first, door events last.
    pub outbox: usize,
    /// A unit gives up on a verify this long after first sending it without a decision.
    pub verify_timeout: Duration,
    /// A command (open door, settings, time) with the same type and id is carried out again
    /// only after this long.
    pub command_memory: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            firmware: concat!("door-sim ", env!("CARGO_PKG_VERSION")).to_owned(),
            seed: 0,
            first_id: None,
            boot_status: true,
            settings: Settings {
                volume: Some(50),
                name: Some(String::new()),
                house_number: Some(String::new()),
                inner_door: Some(false),
            },
            outbox: 32,
            verify_timeout: Duration::from_secs(10),
            command_memory: Duration::from_secs(5),
        }
    }
}

/// What a unit reported, without its contents (for [`Output`]s about reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportKind {
    DoorEvent,
    Tamper,
    CallButton,
    Battery,
    Status,
}

impl ReportKind {
    /// The word used in the JSON output and the command language.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::DoorEvent => "door",
            ReportKind::Tamper => "tamper",
            ReportKind::CallButton => "call",
            ReportKind::Battery => "battery",
            ReportKind::Status => "status",
        }
    }

    /// Which report an overflowing outbox drops first (lowest first).
    fn keep_priority(self) -> u8 {
        match self {
            ReportKind::Battery => 0,
            ReportKind::Status => 1,
            ReportKind::CallButton => 2,
            ReportKind::Tamper => 3,
            ReportKind::DoorEvent => 4,
        }
    }
}

/// Why a unit stopped waiting for a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GaveUpReason {
    /// No decision within [`SimConfig::verify_timeout`] of the first send.
    Timeout,
    /// The unit was restarted ([`SimCommand::Restart`]).
    Restart,
}

impl GaveUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GaveUpReason::Timeout => "timeout",
            GaveUpReason::Restart => "restart",
        }
    }
}

/// Something to do: a person at a unit, a sensor, or a fault to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimCommand {
    /// Present a credential at `reader`: a verify joins the unit's queue.
    Verify {
        unit: Address,
        kind: CredentialKind,
        value: Vec<u8>,
        reader: u8,
    },
    /// Press call button `button`.
    Call { unit: Address, button: u8 },
    /// A battery reading.
    Battery {
        unit: Address,
        percent: u8,
        millivolts: u16,
    },
    /// A door sensor event.
    Door {
        unit: Address,
        door: u8,
        event: DoorEventKind,
    },
    /// The tamper switch opened (`active`) or closed.
    Tamper { unit: Address, active: bool },
    /// Queue a status report (boot id and settings as applied), with a new firmware version
    /// if given.
    Status {
        unit: Address,
        firmware: Option<String>,
    },
    /// Power-cycle the unit: a new boot id and first id, everything in RAM lost (waiting
    /// credentials, reports, faults, the clock), a status report first (whatever
    /// [`SimConfig::boot_status`] says: that is about the start). Settings persist.
    Restart {
        unit: Address,
        firmware: Option<String>,
    },
    /// Put `len` bytes of noise on the line now (non-zero bytes, so the gateway sees one
    /// bad frame when the next delimiter arrives).
    Garbage { len: usize },
    /// The unit's next answer goes out with a wrong CRC.
    BadCrc { unit: Address },
    /// The unit's next answer breaks off halfway, without its closing delimiter.
    Truncate { unit: Address },
    /// The unit's next answer goes out `delay` after the frame it answers.
    Late { unit: Address, delay: Duration },
    /// Send the unit's last verify (or, with `report`, its last report) again at its next
    /// turn: same id, identical bytes, even if it was already answered, as a unit does that
    /// missed the answer. A verify still in flight is sent again anyway.
    Retransmit { unit: Address, report: bool },
    /// Stop answering anything (`on`: the cable is cut) or answer again.
    Silent { unit: Address, on: bool },
}

impl SimCommand {
    /// The unit the command is for (`None` for line-wide faults).
    pub fn unit(&self) -> Option<Address> {
        match self {
            SimCommand::Verify { unit, .. }
            | SimCommand::Call { unit, .. }
            | SimCommand::Battery { unit, .. }
            | SimCommand::Door { unit, .. }
            | SimCommand::Tamper { unit, .. }
            | SimCommand::Status { unit, .. }
            | SimCommand::Restart { unit, .. }
            | SimCommand::BadCrc { unit }
            | SimCommand::Truncate { unit }
            | SimCommand::Late { unit, .. }
            | SimCommand::Retransmit { unit, .. }
            | SimCommand::Silent { unit, .. } => Some(*unit),
            SimCommand::Garbage { .. } => None,
        }
    }
}

/// What happened that the user of the simulator wants to know: mostly what the gateway sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The first frame from the gateway to this unit (since start or restart).
    Contact { unit: Address },
    /// The decision for the unit's verify `id`. `sends` counts how often the unit sent the
    /// verify, `latency` is the time from its first send to the decision; `repeat` marks a
    /// decision for a verify re-sent by [`SimCommand::Retransmit`].
    Decision {
        unit: Address,
        id: u16,
        request: Verify,
        answer: Answer,
        sends: u32,
        latency: Duration,
        repeat: bool,
    },
    /// A decision for no verify in flight (a gateway retransmission, or one the unit gave
    /// up on): ignored, as the protocol says.
    Ignored {
        unit: Address,
        id: u16,
        answer: Answer,
    },
    /// The unit stopped waiting for the decision on verify `id`.
    GaveUp {
        unit: Address,
        id: u16,
        request: Verify,
        reason: GaveUpReason,
        repeat: bool,
    },
    /// The gateway acknowledged report `id`; it left the outbox.
    Acked {
        unit: Address,
        id: u16,
        report: ReportKind,
    },
    /// The outbox overflowed (or the unit restarted) and report `id` was dropped unsent.
    Dropped {
        unit: Address,
        id: u16,
        report: ReportKind,
    },
    /// A door release (remote open), carried out.
    OpenDoor {
        unit: Address,
        id: u16,
        open: OpenDoor,
        broadcast: bool,
    },
    /// Settings, applied (a status report follows).
    Settings {
        unit: Address,
        id: u16,
        settings: Settings,
    },
    /// The time, set.
    Time {
        unit: Address,
        id: u16,
        time: TimeSync,
        broadcast: bool,
    },
    /// Bytes on the line that are not a frame.
    LineError(FrameError),
    /// A frame for one of the units (or a broadcast) whose message is not valid.
    BadMessage {
        unit: Address,
        id: u16,
        error: MessageError,
    },
    /// A command could not be carried out (only from [`crate::run_sim`]; [`SimUnits`]
    /// returns the error directly).
    Rejected {
        command: SimCommand,
        error: SimError,
    },
}

/// Why the simulator refused a configuration or a command.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SimError {
    #[error("no units to simulate")]
    NoUnits,
    #[error("{0} is listed twice")]
    DuplicateUnit(Address),
    #[error("the broadcast address cannot be a unit")]
    BroadcastUnit,
    #[error("{0} is not simulated here")]
    UnknownUnit(Address),
    #[error("{0} already has {MAX_WAITING_CREDENTIALS} credentials waiting")]
    QueueFull(Address),
    #[error("{0} has sent nothing of that kind yet")]
    NothingSent(Address),
    #[error("{0} has another verify in flight")]
    VerifyInFlight(Address),
    #[error("{0} bytes of garbage is over the limit of {MAX_GARBAGE}")]
    TooMuchGarbage(usize),
    #[error("the outbox must hold at least one report")]
    NoOutbox,
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Counters, for the summary at the end of a run and for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Valid frames decoded from the line.
    pub frames_received: u64,
    /// Of those, frames addressed to a simulated unit that was not silent.
    pub addressed: u64,
    /// Broadcasts carried out (by any number of units).
    pub broadcasts: u64,
    /// Frames to other addresses, and units' answers heard on the line: ignored.
    pub ignored: u64,
    /// Bytes between delimiters that were not a frame.
    pub line_errors: u64,
    /// Frames for a unit whose message was not valid.
    pub bad_messages: u64,
    /// Frames to a silent unit.
    pub unheard: u64,
    /// Answers put on the line (idle included, garbage excluded).
    pub answers: u64,
    /// Of those, idle.
    pub idle: u64,
    /// Commands not carried out again because the same id was carried out recently.
    pub repeated_commands: u64,
    /// Noise bytes put on the line.
    pub garbage_bytes: u64,
}

/// One request or report waiting in an outbox, with its final wire bytes.
#[derive(Clone, Debug)]
struct Pending<T> {
    id: u16,
    wire: Vec<u8>,
    what: T,
    first_sent: Option<Duration>,
    sends: u32,
    repeat: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    bad_crc: bool,
    truncate: bool,
    late: Option<Duration>,
}

#[derive(Debug)]
struct Unit {
    addr: Address,
    silent: bool,
    contacted: bool,
    next_id: u16,
    boot_id: u32,
    firmware: String,
    settings: Settings,
    /// The gateway's time and when it arrived.
    clock: Option<(u64, Duration)>,
    verify: Option<Pending<Verify>>,
    credentials: VecDeque<Pending<Verify>>,
    reports: VecDeque<Pending<ReportKind>>,
    /// The last verify and the last report sent, for [`SimCommand::Retransmit`].
    last_verify: Option<Pending<Verify>>,
    last_report: Option<Pending<ReportKind>>,
    faults: Faults,
    /// Commands carried out: type, id, when.
    done: VecDeque<(u8, u16, Duration)>,
}

impl Unit {
    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        id
    }

    /// Unix seconds by the unit's clock, if the gateway has set it.
    fn unix_time(&self, now: Duration) -> Option<u64> {
        self.clock
            .map(|(unix, at)| unix.saturating_add(now.saturating_sub(at).as_secs()))
    }

    fn status(&self) -> Message {
        Message::Status(Status {
            firmware: self.firmware.clone(),
            boot_id: self.boot_id,
            settings: self.settings.clone(),
        })
    }
}

#[derive(Debug)]
struct Scheduled {
    at: Duration,
    /// The unit answering (`None`: line noise).
    unit: Option<Address>,
    bytes: Vec<u8>,
}

/// A small deterministic generator (`SplitMix64`) for ids, boot ids and noise.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_u32(&mut self) -> u32 {
        let [a, b, c, d, ..] = self.next_u64().to_le_bytes();
        u32::from_le_bytes([a, b, c, d])
    }

    fn next_u16(&mut self) -> u16 {
        let [a, b, ..] = self.next_u64().to_le_bytes();
        u16::from_le_bytes([a, b])
    }

    /// A byte in 1..=255 (never the delimiter).
    fn non_zero_byte(&mut self) -> u8 {
        let [a, ..] = self.next_u64().to_le_bytes();
        a.max(1)
    }
}

/// Simulated door units sharing one line: the unit side of `docs/door-bus.md`. Pure: no I/O,
/// no clock (times are [`Duration`]s since any fixed start, as for the gateway's
/// [`Session`](doorbridge_proto::bus::session::Session)).
///
/// - [`SimUnits::on_bytes`] takes what the gateway sent, in any chunking, and returns
///   [`Output`]s; the answers it schedules come out of [`SimUnits::poll_transmit`].
/// - [`SimUnits::command`] queues what a person or sensor does at a unit, or a fault.
/// - [`SimUnits::on_timeout`] must be called once [`SimUnits::next_deadline`] has passed (a
///   late answer is due, or a verify expires).
#[derive(Debug)]
pub struct SimUnits {
    config: SimConfig,
    units: Vec<Unit>,
    decoder: Decoder,
    scheduled: Vec<Scheduled>,
    rng: Rng,
    stats: SimStats,
}

impl SimUnits {
    /// Units at `addresses`, each freshly powered up: a random boot id, a first id, and (with
    /// [`SimConfig::boot_status`]) a status report waiting.
    pub fn new(addresses: &[Address], config: SimConfig) -> Result<SimUnits, SimError> {
        if addresses.is_empty() {
            return Err(SimError::NoUnits);
        }
        if config.outbox == 0 {
            return Err(SimError::NoOutbox);
        }
        for (i, a) in addresses.iter().enumerate() {
            if a.is_broadcast() {
                return Err(SimError::BroadcastUnit);
            }
            if addresses.get(..i).is_some_and(|before| before.contains(a)) {
                return Err(SimError::DuplicateUnit(*a));
            }
        }
        // Checks the firmware and settings once, so that every later status encodes.
        Message::Status(Status {
            firmware: config.firmware.clone(),
            boot_id: 0,
            settings: config.settings.clone(),
        })
        .validate()?;
        let mut rng = Rng(config.seed);
        let mut units = Vec::with_capacity(addresses.len());
        for &addr in addresses {
            let mut unit = Unit {
                addr,
                silent: false,
                contacted: false,
                next_id: 0,
                boot_id: 0,
                firmware: config.firmware.clone(),
                settings: config.settings.clone(),
                clock: None,
                verify: None,
                credentials: VecDeque::new(),
                reports: VecDeque::new(),
                last_verify: None,
                last_report: None,
                faults: Faults::default(),
                done: VecDeque::new(),
            };
            power_up(&mut unit, &config, &mut rng, config.boot_status)?;
            units.push(unit);
        }
        Ok(SimUnits {
            config,
            units,
            decoder: Decoder::new(),
            scheduled: Vec::new(),
            rng,
            stats: SimStats::default(),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// The simulated addresses, in the order given.
    pub fn addresses(&self) -> Vec<Address> {
        self.units.iter().map(|u| u.addr).collect()
    }

    /// The unit's current boot id.
    pub fn boot_id(&self, unit: Address) -> Option<u32> {
        self.unit(unit).map(|u| u.boot_id)
    }

    /// The id of the unit's verify in flight, if any.
    pub fn verify_in_flight(&self, unit: Address) -> Option<u16> {
        self.unit(unit)
            .and_then(|u| u.verify.as_ref().map(|v| v.id))
    }

    /// Everything the unit still has to send: the verify in flight, waiting credentials and
    /// unacknowledged reports.
    pub fn outbox_len(&self, unit: Address) -> Option<usize> {
        self.unit(unit)
            .map(|u| usize::from(u.verify.is_some()) + u.credentials.len() + u.reports.len())
    }

    pub fn is_silent(&self, unit: Address) -> Option<bool> {
        self.unit(unit).map(|u| u.silent)
    }

    /// Carries out a command. Outputs are for what it dropped (a full outbox, a restart).
    pub fn command(&mut self, command: SimCommand, now: Duration) -> Result<Vec<Output>, SimError> {
        let mut out = Vec::new();
        if let SimCommand::Garbage { len } = command {
            if len > MAX_GARBAGE {
                return Err(SimError::TooMuchGarbage(len));
            }
            let bytes: Vec<u8> = (0..len).map(|_| self.rng.non_zero_byte()).collect();
            self.stats.garbage_bytes += u64::try_from(len).unwrap_or(u64::MAX);
            self.schedule(now, None, bytes);
            return Ok(out);
        }
        let addr = command.unit().ok_or(SimError::NoUnits)?;
        let i = self.index(addr).ok_or(SimError::UnknownUnit(addr))?;
        let outbox = self.config.outbox;
        let Some(unit) = self.units.get_mut(i) else {
            return Err(SimError::UnknownUnit(addr));
        };
        let at = unit.unix_time(now);
        match command {
            SimCommand::Verify {
                kind,
                value,
                reader,
                ..
            } => queue_verify(
                unit,
                Verify {
                    kind,
                    value,
                    reader,
                },
            )?,
            SimCommand::Call { button, .. } => {
                let msg = Message::CallButton(CallButton { button, at });
                push_report(unit, outbox, &msg, ReportKind::CallButton, &mut out)?;
            }
            SimCommand::Battery {
                percent,
                millivolts,
                ..
            } => {
                let msg = Message::Battery(Battery {
                    percent,
                    millivolts,
                    at,
                });
                push_report(unit, outbox, &msg, ReportKind::Battery, &mut out)?;
            }
            SimCommand::Door { door, event, .. } => {
                let msg = Message::DoorEvent(DoorEvent { door, event, at });
                push_report(unit, outbox, &msg, ReportKind::DoorEvent, &mut out)?;
            }
            SimCommand::Tamper { active, .. } => {
                let msg = Message::Tamper(Tamper { active, at });
                push_report(unit, outbox, &msg, ReportKind::Tamper, &mut out)?;
            }
            SimCommand::Status { firmware, .. } => {
                if let Some(fw) = firmware {
                    check_firmware(&fw)?;
                    unit.firmware = fw;
                }
                let msg = unit.status();
                push_report(unit, outbox, &msg, ReportKind::Status, &mut out)?;
            }
            SimCommand::Restart { firmware, .. } => {
                restart(unit, firmware, &self.config, &mut self.rng, &mut out)?;
                self.scheduled.retain(|s| s.unit != Some(addr));
            }
            SimCommand::BadCrc { .. } => unit.faults.bad_crc = true,
            SimCommand::Truncate { .. } => unit.faults.truncate = true,
            SimCommand::Late { delay, .. } => unit.faults.late = Some(delay),
            SimCommand::Retransmit { report, .. } => retransmit(unit, report)?,
            SimCommand::Silent { on, .. } => {
                unit.silent = on;
                if on {
                    self.scheduled.retain(|s| s.unit != Some(addr));
                }
            }
            SimCommand::Garbage { .. } => {}
        }
        Ok(out)
    }

    /// Takes bytes from the line (any chunking) and handles every frame they complete.
    pub fn on_bytes(&mut self, chunk: &[u8], now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        for item in self.decoder.feed(chunk) {
            match item {
                Ok(frame) => out.extend(self.on_frame(&frame, now)),
                Err(e) => {
                    self.stats.line_errors += 1;
                    out.push(Output::LineError(e));
                }
            }
        }
        out
    }

    /// Handles one decoded frame: a frame for a simulated unit is carried out and answered
    /// (see [`SimUnits::poll_transmit`]); a broadcast is carried out by every unit that is not
    /// silent, unanswered; anything else is ignored.
    pub fn on_frame(&mut self, frame: &Frame, now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        self.stats.frames_received += 1;
        if frame.direction() == Direction::ToGateway {
            self.stats.ignored += 1;
            return out;
        }
        let addr = frame.address();
        if addr.is_broadcast() {
            self.on_broadcast(frame, now, &mut out);
            return out;
        }
        let Some(i) = self.index(addr) else {
            self.stats.ignored += 1;
            return out;
        };
        let config = &self.config;
        let Some(unit) = self.units.get_mut(i) else {
            return out;
        };
        if unit.silent {
            self.stats.unheard += 1;
            return out;
        }
        self.stats.addressed += 1;
        if !unit.contacted {
            unit.contacted = true;
            out.push(Output::Contact { unit: addr });
        }
        match Message::from_frame(frame) {
            Ok(msg) => {
                if apply(unit, frame.id(), msg, false, now, config, &mut out) {
                    self.stats.repeated_commands += 1;
                }
            }
            Err(error) => {
                self.stats.bad_messages += 1;
                out.push(Output::BadMessage {
                    unit: addr,
                    id: frame.id(),
                    error,
                });
            }
        }
        self.expire(now, &mut out);
        let (bytes, idle) = self.answer(i, frame.id(), now);
        self.stats.answers += 1;
        if idle {
            self.stats.idle += 1;
        }
        let (at, bytes) = match self.units.get_mut(i) {
            Some(unit) => {
                let faults = std::mem::take(&mut unit.faults);
                let mut bytes = bytes;
                if faults.bad_crc {
                    bytes = with_bad_crc(&bytes);
                }
                if faults.truncate {
                    bytes = truncated(&bytes);
                }
                (now.saturating_add(faults.late.unwrap_or_default()), bytes)
            }
            None => (now, bytes),
        };
        self.schedule(at, Some(addr), bytes);
        out
    }

    /// The next bytes to put on the line, if they are due. Call it until it returns `None`.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.scheduled.first().is_some_and(|s| s.at <= now) {
            return Some(self.scheduled.remove(0).bytes);
        }
        None
    }

    /// When [`SimUnits::poll_transmit`] and [`SimUnits::on_timeout`] are next due (a late
    /// answer, an expiring verify); `None` when nothing is.
    pub fn next_deadline(&self) -> Option<Duration> {
        let send = self.scheduled.first().map(|s| s.at);
        let timeout = self.config.verify_timeout;
        let expiry = self
            .units
            .iter()
            .filter_map(|u| u.verify.as_ref()?.first_sent)
            .map(|t| t.saturating_add(timeout))
            .min();
        match (send, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives up on verifies that waited too long for their decision.
    pub fn on_timeout(&mut self, now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        self.expire(now, &mut out);
        out
    }

    fn unit(&self, addr: Address) -> Option<&Unit> {
        self.units.iter().find(|u| u.addr == addr)
    }

    fn index(&self, addr: Address) -> Option<usize> {
        self.units.iter().position(|u| u.addr == addr)
    }

    fn schedule(&mut self, at: Duration, unit: Option<Address>, bytes: Vec<u8>) {
        let pos = self.scheduled.partition_point(|s| s.at <= at);
        self.scheduled.insert(pos, Scheduled { at, unit, bytes });
    }

    fn expire(&mut self, now: Duration, out: &mut Vec<Output>) {
        let timeout = self.config.verify_timeout;
        for unit in &mut self.units {
            let expired = unit
                .verify
                .as_ref()
                .and_then(|v| v.first_sent)
                .is_some_and(|t| now >= t.saturating_add(timeout));
            if expired && let Some(v) = unit.verify.take() {
                out.push(Output::GaveUp {
                    unit: unit.addr,
                    id: v.id,
                    request: v.what,
                    reason: GaveUpReason::Timeout,
                    repeat: v.repeat,
                });
            }
        }
    }

    fn on_broadcast(&mut self, frame: &Frame, now: Duration, out: &mut Vec<Output>) {
        let msg = match Message::from_frame(frame) {
            Ok(msg) => msg,
            Err(error) => {
                self.stats.bad_messages += 1;
                out.push(Output::BadMessage {
                    unit: frame.address(),
                    id: frame.id(),
                    error,
                });
                return;
            }
        };
        self.stats.broadcasts += 1;
        let config = &self.config;
        for unit in self.units.iter_mut().filter(|u| !u.silent) {
            if apply(unit, frame.id(), msg.clone(), true, now, config, out) {
                self.stats.repeated_commands += 1;
            }
        }
    }

    /// The unit's answer: its verify in flight, else the next credential (now in flight),
    /// else its oldest report, else idle echoing `frame_id`. Returns the bytes and whether
    /// they are idle.
    fn answer(&mut self, i: usize, frame_id: u16, now: Duration) -> (Vec<u8>, bool) {
        let Some(unit) = self.units.get_mut(i) else {
            return (Vec::new(), true);
        };
        if unit.verify.is_none() {
            unit.verify = unit.credentials.pop_front();
        }
        if let Some(v) = unit.verify.as_mut() {
            v.first_sent.get_or_insert(now);
            v.sends += 1;
            let bytes = v.wire.clone();
            unit.last_verify = Some(v.clone());
            return (bytes, false);
        }
        if let Some(r) = unit.reports.front_mut() {
            r.first_sent.get_or_insert(now);
            r.sends += 1;
            let bytes = r.wire.clone();
            unit.last_report = Some(r.clone());
            return (bytes, false);
        }
        (unit_frame(&Message::Idle, unit.addr, frame_id), true)
    }
}

/// Puts a verify in the unit's queue of credentials.
fn queue_verify(unit: &mut Unit, verify: Verify) -> Result<(), SimError> {
    if unit.credentials.len() >= MAX_WAITING_CREDENTIALS {
        return Err(SimError::QueueFull(unit.addr));
    }
    let msg = Message::Verify(verify.clone());
    msg.validate()?;
    let wire = encode(&msg.to_frame(unit.addr, unit.next_id)?);
    let id = unit.take_id();
    unit.credentials.push_back(Pending {
        id,
        wire,
        what: verify,
        first_sent: None,
        sends: 0,
        repeat: false,
    });
    Ok(())
}

/// A power cycle: what was in RAM is lost (and reported), then a fresh power-up.
fn restart(
    unit: &mut Unit,
    firmware: Option<String>,
    config: &SimConfig,
    rng: &mut Rng,
    out: &mut Vec<Output>,
) -> Result<(), SimError> {
    if let Some(fw) = &firmware {
        check_firmware(fw)?;
    }
    let addr = unit.addr;
    for v in unit
        .verify
        .take()
        .into_iter()
        .chain(unit.credentials.drain(..))
    {
        out.push(Output::GaveUp {
            unit: addr,
            id: v.id,
            request: v.what,
            reason: GaveUpReason::Restart,
            repeat: v.repeat,
        });
    }
    for r in unit.reports.drain(..) {
        out.push(Output::Dropped {
            unit: addr,
            id: r.id,
            report: r.what,
        });
    }
    if let Some(fw) = firmware {
        unit.firmware = fw;
    }
    unit.contacted = false;
    unit.clock = None;
    unit.last_verify = None;
    unit.last_report = None;
    unit.faults = Faults::default();
    unit.done.clear();
    power_up(unit, config, rng, true)
}

/// Fresh power-up: a new boot id and first id, the status report first.
fn power_up(
    unit: &mut Unit,
    config: &SimConfig,
    rng: &mut Rng,
    status: bool,
) -> Result<(), SimError> {
    unit.boot_id = rng.next_u32();
    unit.next_id = config.first_id.unwrap_or_else(|| rng.next_u16());
    if status {
        let msg = unit.status();
        let mut ignored = Vec::new();
        push_report(unit, config.outbox, &msg, ReportKind::Status, &mut ignored)?;
    }
    Ok(())
}

fn check_firmware(fw: &str) -> Result<(), SimError> {
    Message::Status(Status {
        firmware: fw.to_owned(),
        ..Status::default()
    })
    .validate()?;
    Ok(())
}

/// Puts a report at the end of the outbox, dropping the least important one if it is full.
fn push_report(
    unit: &mut Unit,
    outbox: usize,
    msg: &Message,
    kind: ReportKind,
    out: &mut Vec<Output>,
) -> Result<(), SimError> {
    msg.validate()?;
    let id = unit.next_id;
    let wire = encode(&msg.to_frame(unit.addr, id)?);
    unit.take_id();
    while unit.reports.len() >= outbox {
        let victim = unit
            .reports
            .iter()
            .enumerate()
            .min_by_key(|(i, r)| (r.what.keep_priority(), *i))
            .map(|(i, _)| i);
        let Some(dropped) = victim.and_then(|i| unit.reports.remove(i)) else {
            break;
        };
        out.push(Output::Dropped {
            unit: unit.addr,
            id: dropped.id,
            report: dropped.what,
        });
    }
    unit.reports.push_back(Pending {
        id,
        wire,
        what: kind,
        first_sent: None,
        sends: 0,
        repeat: false,
    });
    Ok(())
}

/// Re-arms the last verify (or report) sent, unless it is still waiting anyway.
fn retransmit(unit: &mut Unit, report: bool) -> Result<(), SimError> {
    if report {
        let mut r = unit
            .last_report
            .clone()
            .ok_or(SimError::NothingSent(unit.addr))?;
        if !unit
            .reports
            .iter()
            .any(|p| p.id == r.id && p.wire == r.wire)
        {
            r.repeat = true;
            unit.reports.push_front(r);
        }
        return Ok(());
    }
    let mut v = unit
        .last_verify
        .clone()
        .ok_or(SimError::NothingSent(unit.addr))?;
    match &unit.verify {
        Some(current) if current.id == v.id && current.wire == v.wire => Ok(()),
        Some(_) => Err(SimError::VerifyInFlight(unit.addr)),
        None => {
            v.repeat = true;
            v.first_sent = None;
            unit.verify = Some(v);
            Ok(())
        }
    }
}

/// Carries out what a gateway frame says (§6.1). Returns true for a command not carried out
/// again because it was carried out recently (§7.2).
fn apply(
    unit: &mut Unit,
    id: u16,
    msg: Message,
    broadcast: bool,
    now: Duration,
    config: &SimConfig,
    out: &mut Vec<Output>,
) -> bool {
    let memory = config.command_memory;
    let addr = unit.addr;
    match msg {
        Message::Grant(g) => decision(unit, id, Answer::Grant(g), now, out),
        Message::Deny(d) => decision(unit, id, Answer::Deny(d.reason), now, out),
        Message::Ack => {
            if let Some(pos) = unit.reports.iter().position(|r| r.id == id)
                && let Some(r) = unit.reports.remove(pos)
            {
                out.push(Output::Acked {
                    unit: addr,
                    id,
                    report: r.what,
                });
            }
        }
        Message::OpenDoor(_) | Message::Settings(_) | Message::Time(_) => {
            let code = msg.msg_type().code();
            unit.done
                .retain(|&(_, _, at)| now.saturating_sub(at) < memory);
            if unit.done.iter().any(|&(t, i, _)| t == code && i == id) {
                return true;
            }
            if unit.done.len() >= COMMAND_MEMORY {
                unit.done.pop_front();
            }
            unit.done.push_back((code, id, now));
            match msg {
                Message::OpenDoor(open) => out.push(Output::OpenDoor {
                    unit: addr,
                    id,
                    open,
                    broadcast,
                }),
                Message::Time(time) => {
                    unit.clock = Some((time.unix, now));
                    out.push(Output::Time {
                        unit: addr,
                        id,
                        time,
                        broadcast,
                    });
                }
                Message::Settings(settings) => {
                    let applied = &mut unit.settings;
                    if settings.volume.is_some() {
                        applied.volume = settings.volume;
                    }
                    if settings.name.is_some() {
                        applied.name.clone_from(&settings.name);
                    }
                    if settings.house_number.is_some() {
                        applied.house_number.clone_from(&settings.house_number);
                    }
                    if settings.inner_door.is_some() {
                        applied.inner_door = settings.inner_door;
                    }
                    out.push(Output::Settings {
                        unit: addr,
                        id,
                        settings,
                    });
                    // The settings were valid, so the status with them is too; an outbox
                    // overflow drops an older report and says so.
                    let status = unit.status();
                    let _ = push_report(unit, config.outbox, &status, ReportKind::Status, out);
                }
                _ => {}
            }
        }
        // Poll: nothing to do. Unit→gateway types never get here (`from_frame` refuses them).
        _ => {}
    }
    false
}

fn decision(unit: &mut Unit, id: u16, answer: Answer, now: Duration, out: &mut Vec<Output>) {
    let addr = unit.addr;
    match unit.verify.take() {
        Some(v) if v.id == id => out.push(Output::Decision {
            unit: addr,
            id,
            request: v.what,
            answer,
            sends: v.sends,
            latency: now.saturating_sub(v.first_sent.unwrap_or(now)),
            repeat: v.repeat,
        }),
        other => {
            unit.verify = other;
            out.push(Output::Ignored {
                unit: addr,
                id,
                answer,
            });
        }
    }
}

/// The wire bytes of a unit→gateway message that cannot fail to encode (idle).
fn unit_frame(msg: &Message, addr: Address, id: u16) -> Vec<u8> {
    msg.to_frame(addr, id)
        .map(|f| encode(&f))
        .unwrap_or_default()
}

/// The same frame with its CRC's low bit flipped, correctly COBS-encoded, so the receiver
/// decodes it and finds exactly a bad CRC.
fn with_bad_crc(wire: &[u8]) -> Vec<u8> {
    let inner = wire
        .strip_prefix(&[DELIMITER])
        .and_then(|w| w.strip_suffix(&[DELIMITER]))
        .unwrap_or(wire);
    let Ok(mut raw) = doorbridge_proto::bus::frame::cobs_decode(inner) else {
        return wire.to_vec();
    };
    if let Some(last) = raw.last_mut() {
        *last ^= 0x01;
    }
    let mut out = vec![DELIMITER];
    cobs_encode(&raw, &mut out);
    out.push(DELIMITER);
    out
}

/// The first half of a frame: the leading delimiter and some bytes, no closing delimiter.
/// The receiver finds a bad frame when the next delimiter arrives.
fn truncated(wire: &[u8]) -> Vec<u8> {
    let keep = (wire.len() / 2).max(2).min(wire.len());
    wire.get(..keep).unwrap_or(wire).to_vec()
}

#[cfg(test)]
use doorbridge_proto::bus::vectors;

#[cfg(test)]
mod tests;
