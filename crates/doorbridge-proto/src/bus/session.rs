//! The master side of one door bus: polling, retries, offline units, the answer cache. Pure.
//!
//! The session owns no port, no clock and no task. The time is passed in as a [`Duration`]
//! since any fixed start (a monotonic clock), and the session answers with bytes to transmit
//! and [`SessionEvent`]s. The async serial driver only moves bytes:
//!
//! ```text
//! let mut s = Session::new(config)?;
//! loop {
//!     if let Some(tx) = s.poll_next(now()) {
//!         port.write_all(&tx.bytes).await?;            // then keep reading
//!     }
//!     select! {
//!         chunk = port.read()          => handle(s.on_bytes(&chunk, now())),
//!         _ = sleep_until(s.next_deadline())  => handle(s.on_timeout(now())),
//!         (key, answer) = engine.recv() => s.answer(&key, answer)?,   // after it is on disk
//!         (to, cmd) = commands.recv()  => { s.send(to, cmd)?; }
//!     }
//! }
//! ```
//!
//! - [`Session::poll_next`] returns the next frame to put on the line, or `None` while the
//!   line is busy (waiting for an answer, or a quiet gap) or nothing is due. It returns at
//!   most one frame per transaction: call it again after every event.
//! - [`Session::on_bytes`] takes received bytes in any chunking (it runs a [`Decoder`]);
//!   [`Session::on_frame`] takes an already decoded frame. The gateway's own frames, heard
//!   back on a half-duplex line, are recognised by their direction bit and skipped.
//! - [`Session::on_timeout`] must be called once [`Session::next_deadline`] has passed; a
//!   missed answer is retransmitted (identical bytes) up to `retries` times, then the
//!   transaction counts as a miss. `offline_after` misses in a row make the unit offline
//!   ([`SessionEvent::UnitOffline`]); an offline unit gets one attempt every
//!   `offline_poll_every`-th cycle until it answers ([`SessionEvent::UnitOnline`]).
//! - A credential to verify comes out as [`SessionEvent::Request`]. Hand it to the decision
//!   engine and, once the decision is on disk, give the answer back with [`Session::answer`]
//!   and the request's [`RequestKey`]. The answer is sent ahead of routine polls.
//! - Idempotency: per unit, the last `cache_size` requests and reports are remembered by id
//!   and by a SHA-256 fingerprint of type and body, with the exact bytes of their answer. A
//!   repeat is answered from there with the identical bytes and is *not* handed out again
//!   ([`SessionEvent::Repeat`]); a repeat of a request still being decided is dropped. The
//!   same id with a different body is a new request. A [`Status`] with a new boot id clears the
//!   unit's cache (the unit restarted and may reuse ids).
//! - Reports (door events, tamper, call button, battery, status) come out as
//!   [`SessionEvent::Report`] once; the session acknowledges them itself, or, with
//!   [`SessionConfig::defer_report_acks`], when [`Session::ack_report`] says they are stored.
//! - [`Session::send`] queues a command (open door, settings, time) for a unit or a broadcast.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::frame::{Address, Decoder, Direction, Frame, FrameError, MAX_FRAME, encode, wire_time};
use super::message::{
    Battery, CallButton, Deny, DoorEvent, Grant, Message, MessageError, OpenDoor, Settings, Status,
    Tamper, TimeSync, Verify,
};
use crate::access::DenyReason;

/// How many commands may wait per unit (and how many broadcasts in all).
pub const COMMAND_QUEUE: usize = 8;

/// The session's numbers. A plain struct: the daemon fills it from its configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// The units on this bus, polled in this order.
    pub units: Vec<Address>,
    /// The line speed, for the time a frame takes on the wire.
    pub baud: u32,
    /// How long a unit may take from the end of a command to the start of its answer. The
    /// deadline adds the wire time of the command and of a longest possible answer.
    pub response_timeout: Duration,
    /// Retransmissions of an unanswered command before the transaction counts as missed.
    pub retries: u32,
    /// Missed transactions in a row after which a unit is reported offline.
    pub offline_after: u32,
    /// An offline unit gets a turn only every this many polling cycles (and no retries).
    pub offline_poll_every: u32,
    /// A polling cycle (one turn per unit) starts at most this often; an idle bus rests in
    /// between. Answers and broadcasts are not held back by it.
    pub min_cycle: Duration,
    /// The quiet gap after an answer or a broadcast before the gateway transmits again, so
    /// that transceivers can turn the line around. See [`default_turnaround`].
    pub turnaround: Duration,
    /// Requests and reports remembered per unit for idempotency.
    pub cache_size: usize,
    /// How long a remembered request is kept (units give up on a request long before).
    pub cache_ttl: Duration,
    /// The first id the gateway uses for its own commands (pick at random at startup, so a
    /// restarted gateway does not reuse the ids a unit has just seen).
    pub first_command_id: u16,
    /// Acknowledge a report only once [`Session::ack_report`] says it is stored, so a unit
    /// keeps it until it is safe. Status reports are always acknowledged at once.
    pub defer_report_acks: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            units: Vec::new(),
            baud: 115_200,
            response_timeout: Duration::from_millis(50),
            retries: 2,
            offline_after: 3,
            offline_poll_every: 10,
            min_cycle: Duration::from_millis(100),
            turnaround: default_turnaround(115_200),
            cache_size: 8,
            cache_ttl: Duration::from_secs(60),
            first_command_id: 0,
            defer_report_acks: false,
        }
    }
}

/// The shortest default [`SessionConfig::turnaround`], whatever the line speed: transceivers
/// with automatic direction control (a timer, not the UART, releases the driver) and slow
/// isolated transceivers take their time whatever the baud rate.
pub const TURNAROUND_FLOOR: Duration = Duration::from_micros(250);

/// The default quiet gap before the gateway transmits again: 3.5 character times at `baud`
/// (Modbus RTU's gap; a transceiver releases the line within a character time or two), at
/// least [`TURNAROUND_FLOOR`]. 304 µs at 115 200 baud, 3.65 ms at 9600 baud. A fixed gap of
/// milliseconds would cost more than the frames themselves at 115 200 baud: a poll and an
/// idle answer take 1.74 ms on the wire.
pub fn default_turnaround(baud: u32) -> Duration {
    if baud == 0 {
        return TURNAROUND_FLOOR;
    }
    // 3.5 characters of 10 bits (8N1).
    let micros = 35_000_000u64.div_ceil(u64::from(baud));
    Duration::from_micros(micros).max(TURNAROUND_FLOOR)
}

/// A configuration the session cannot work with.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{0} is listed twice")]
    DuplicateUnit(Address),
    #[error("the broadcast address cannot be a unit")]
    BroadcastUnit,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// A unit's reachability as the session sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitState {
    /// Not heard from yet.
    Unknown,
    Online,
    Offline,
}

/// Bytes for the driver to put on the line.
#[derive(Clone, PartialEq, Eq)]
pub struct Transmit {
    pub bytes: Vec<u8>,
    pub to: Address,
    /// Whether an answer is awaited (false for broadcasts).
    pub expects_reply: bool,
    /// When the session next wants [`Session::on_timeout`] (or [`Session::poll_next`]) called.
    pub deadline: Duration,
}

impl fmt::Debug for Transmit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transmit(to {}, {} bytes: ", self.to, self.bytes.len())?;
        for b in &self.bytes {
            write!(f, "{b:02x}")?;
        }
        write!(f, ", deadline {:?})", self.deadline)
    }
}

/// Names a request handed to the engine; give it back with the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub unit: Address,
    pub id: u16,
    /// SHA-256 over the message type byte and the CBOR body. With `unit` and `id` it names the
    /// request across retransmissions; the store may keep it to recognise a retransmission
    /// that arrives after a gateway restart.
    pub fingerprint: [u8; 32],
    /// The unit's boot id when the request came, if a status has told it: ids restart when a
    /// unit does, so a stored answer is only reused within the same boot.
    pub boot_id: Option<u32>,
}

/// A credential to hand to the decision engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyRequest {
    pub key: RequestKey,
    pub verify: Verify,
}

/// The decision for a [`VerifyRequest`], in bus terms (see [`Grant::from_access`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Grant(Grant),
    Deny(DenyReason),
}

/// Something a unit reported (already acknowledged by the session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    DoorEvent(DoorEvent),
    Tamper(Tamper),
    CallButton(CallButton),
    Battery(Battery),
    Status(Status),
}

/// A command the gateway sends on its own initiative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    OpenDoor(OpenDoor),
    Settings(Settings),
    Time(TimeSync),
}

impl Command {
    fn message(&self) -> Message {
        match self {
            Command::OpenDoor(o) => Message::OpenDoor(*o),
            Command::Settings(s) => Message::Settings(s.clone()),
            Command::Time(t) => Message::Time(*t),
        }
    }
}

/// What the session tells the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// A new credential to decide. Answer with [`Session::answer`].
    Request(VerifyRequest),
    /// A new report from a unit.
    Report {
        unit: Address,
        id: u16,
        report: Report,
        /// SHA-256 over type and body, for [`Session::ack_report`].
        fingerprint: [u8; 32],
    },
    /// A retransmitted request or report: answered from the cache (`answered`), or dropped
    /// because its decision is still pending.
    Repeat {
        unit: Address,
        id: u16,
        answered: bool,
    },
    UnitOnline(Address),
    UnitOffline(Address),
    /// The unit's [`Status`] carries a new boot id: it restarted. Its cached answers and
    /// undecided requests were forgotten.
    UnitRestarted {
        unit: Address,
        boot_id: u32,
    },
    /// The unit answered a command sent with [`Session::send`].
    CommandDone {
        unit: Address,
        id: u16,
    },
    /// A command got no answer, retries included.
    CommandFailed {
        unit: Address,
        id: u16,
    },
    /// Bytes on the line that are not a frame.
    FrameError(FrameError),
    /// A valid frame whose message is not.
    BadMessage {
        unit: Address,
        id: u16,
        error: MessageError,
    },
    /// A unit's frame outside its turn (late, or from an unconfigured address): ignored.
    Unexpected {
        unit: Address,
        id: u16,
        msg_type: u8,
    },
}

/// Why [`Session::answer`] refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error("{0} is not on this bus")]
    UnknownUnit(Address),
    /// No undecided request with that key: already answered, expired, or forgotten after the
    /// unit restarted. Nothing is sent.
    #[error("no pending request {id} from {unit}")]
    NotPending { unit: Address, id: u16 },
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Why [`Session::send`] refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SendError {
    #[error("{0} is not on this bus")]
    UnknownUnit(Address),
    #[error("the command queue for {0} is full")]
    QueueFull(Address),
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_sent: u64,
    pub retransmits: u64,
    pub frames_received: u64,
    /// The gateway's own frames heard back on the line.
    pub echoes: u64,
    pub timeouts: u64,
    pub too_long: u64,
    pub short: u64,
    pub bad_cobs: u64,
    pub bad_crc: u64,
    pub bad_version: u64,
    pub bad_address: u64,
    pub bad_messages: u64,
    pub unexpected: u64,
    /// Repeats answered from (or dropped by) the cache.
    pub repeats: u64,
}

impl Stats {
    fn count(&mut self, e: FrameError) {
        let c = match e {
            FrameError::TooLong => &mut self.too_long,
            FrameError::Short(_) => &mut self.short,
            FrameError::BadCobs => &mut self.bad_cobs,
            FrameError::BadCrc => &mut self.bad_crc,
            FrameError::BadVersion(_) => &mut self.bad_version,
            FrameError::BadAddress(_) => &mut self.bad_address,
        };
        *c += 1;
    }

    /// All frame errors together.
    pub fn frame_errors(&self) -> u64 {
        self.too_long
            + self.short
            + self.bad_cobs
            + self.bad_crc
            + self.bad_version
            + self.bad_address
    }
}

#[derive(Debug)]
struct CacheEntry {
    id: u16,
    fingerprint: [u8; 32],
    at: Duration,
    /// The answer's wire bytes; `None` while the engine decides.
    answer: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Unit {
    addr: Address,
    state: UnitState,
    misses: u32,
    skipped: u32,
    /// The acknowledgement owed for the last report, sent at the unit's next turn.
    ack: Option<Vec<u8>>,
    commands: VecDeque<(u16, Vec<u8>)>,
    cache: VecDeque<CacheEntry>,
    boot_id: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxKind {
    Poll,
    Ack,
    Answer,
    Command(u16),
}

#[derive(Debug)]
struct Transaction {
    unit: usize,
    kind: TxKind,
    bytes: Vec<u8>,
    attempts: u32,
    max_attempts: u32,
}

#[derive(Debug)]
enum Line {
    /// Free to transmit.
    Free,
    /// Waiting for the unit's answer until `deadline`.
    Awaiting { tx: Transaction, deadline: Duration },
    /// The answer timed out; the same bytes go out again at the next `poll_next`.
    Retry { tx: Transaction, since: Duration },
    /// Quiet until the given time (after an answer or a broadcast).
    Quiet { until: Duration },
}

/// The master-side state machine of one bus. See the module documentation.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    units: Vec<Unit>,
    decoder: Decoder,
    line: Line,
    /// Decisions to deliver, ahead of routine turns.
    answers: VecDeque<(usize, u16, Vec<u8>)>,
    broadcasts: VecDeque<Vec<u8>>,
    next_turn: usize,
    cycle_start: Option<Duration>,
    next_id: u16,
    stats: Stats,
}

impl Session {
    pub fn new(config: SessionConfig) -> Result<Session, ConfigError> {
        for (i, a) in config.units.iter().enumerate() {
            if a.is_broadcast() {
                return Err(ConfigError::BroadcastUnit);
            }
            if config
                .units
                .get(..i)
                .is_some_and(|before| before.contains(a))
            {
                return Err(ConfigError::DuplicateUnit(*a));
            }
        }
        for (value, name) in [
            (config.baud, "baud"),
            (config.offline_after, "offline_after"),
            (config.offline_poll_every, "offline_poll_every"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if config.cache_size == 0 {
            return Err(ConfigError::Zero("cache_size"));
        }
        let units = config
            .units
            .iter()
            .map(|&addr| Unit {
                addr,
                state: UnitState::Unknown,
                misses: 0,
                skipped: 0,
                ack: None,
                commands: VecDeque::new(),
                cache: VecDeque::new(),
                boot_id: None,
            })
            .collect();
        Ok(Session {
            next_id: config.first_command_id,
            config,
            units,
            decoder: Decoder::new(),
            line: Line::Free,
            answers: VecDeque::new(),
            broadcasts: VecDeque::new(),
            next_turn: 0,
            cycle_start: None,
            stats: Stats::default(),
        })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A unit's reachability, if it is on this bus.
    pub fn unit_state(&self, unit: Address) -> Option<UnitState> {
        self.unit_index(unit)
            .and_then(|i| self.units.get(i))
            .map(|u| u.state)
    }

    /// The next frame to transmit, if the line is free and something is due. In order:
    /// a retransmission, a decision, a broadcast, then the next unit's turn (its owed
    /// acknowledgement, else its oldest command, else a poll).
    pub fn poll_next(&mut self, now: Duration) -> Option<Transmit> {
        match std::mem::replace(&mut self.line, Line::Free) {
            Line::Retry { mut tx, .. } => {
                tx.attempts += 1;
                self.stats.retransmits += 1;
                return Some(self.start(tx, now));
            }
            Line::Quiet { until } if now < until => {
                self.line = Line::Quiet { until };
                return None;
            }
            busy @ Line::Awaiting { .. } => {
                self.line = busy;
                return None;
            }
            Line::Quiet { .. } | Line::Free => {}
        }
        if let Some((unit, _, bytes)) = self.answers.pop_front() {
            let tx = self.transaction(unit, TxKind::Answer, bytes);
            return Some(self.start(tx, now));
        }
        if let Some(bytes) = self.broadcasts.pop_front() {
            let until = now
                .saturating_add(wire_time(bytes.len(), self.config.baud))
                .saturating_add(self.config.turnaround);
            self.line = Line::Quiet { until };
            self.stats.frames_sent += 1;
            return Some(Transmit {
                bytes,
                to: Address::BROADCAST,
                expects_reply: false,
                deadline: until,
            });
        }
        let n = self.units.len();
        let every = self.config.offline_poll_every;
        let bound = n.saturating_mul(
            usize::try_from(every)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
        );
        for _ in 0..bound {
            if self.next_turn == 0 {
                if let Some(start) = self.cycle_start
                    && now < start.saturating_add(self.config.min_cycle)
                {
                    return None;
                }
                self.cycle_start = Some(now);
            }
            let i = self.next_turn;
            self.next_turn = (i + 1) % n;
            let Some(unit) = self.units.get_mut(i) else {
                continue;
            };
            if unit.state == UnitState::Offline {
                unit.skipped += 1;
                if unit.skipped < every {
                    continue;
                }
                unit.skipped = 0;
            }
            let (kind, bytes) = if let Some(ack) = unit.ack.take() {
                (TxKind::Ack, ack)
            } else if let Some((id, bytes)) = unit.commands.pop_front() {
                (TxKind::Command(id), bytes)
            } else {
                let addr = unit.addr;
                let id = self.take_id();
                (TxKind::Poll, gateway_frame(&Message::Poll, addr, id))
            };
            let tx = self.transaction(i, kind, bytes);
            return Some(self.start(tx, now));
        }
        None
    }

    /// When the session next needs the driver: the answer deadline, the end of a quiet gap,
    /// or the start of the next polling cycle. A time at or before now means "call
    /// [`Session::poll_next`] now"; `None` means nothing is due until something arrives.
    pub fn next_deadline(&self) -> Option<Duration> {
        match &self.line {
            Line::Awaiting { deadline, .. } => Some(*deadline),
            Line::Retry { since, .. } => Some(*since),
            Line::Quiet { until } => Some(*until),
            Line::Free => self.free_deadline(),
        }
    }

    /// Like [`Session::next_deadline`], but through a quiet gap: when the next frame can go
    /// out, which is the gap's end only when something is due right after it. After the last
    /// answer of a cycle the line rests until the next cycle anyway, and the gap's end needs
    /// no wake-up of its own ([`Session::poll_next`] ends a gap that has passed). Something
    /// handed in meanwhile (an answer to send) makes it the gap's end again.
    pub fn next_transmit(&self) -> Option<Duration> {
        match self.line {
            Line::Quiet { until } => self.free_deadline().map(|due| due.max(until)),
            _ => self.next_deadline(),
        }
    }

    /// When a free line is next needed (see [`Session::next_deadline`]).
    fn free_deadline(&self) -> Option<Duration> {
        if !self.answers.is_empty() || !self.broadcasts.is_empty() {
            return Some(Duration::ZERO);
        }
        if self.units.is_empty() {
            return None;
        }
        match self.cycle_start {
            Some(start) if self.next_turn == 0 => Some(start.saturating_add(self.config.min_cycle)),
            _ => Some(Duration::ZERO),
        }
    }

    /// The end of the quiet gap the line is in (after an answer or a broadcast), if it is in
    /// one. The gap is a few character times, shorter than a millisecond at 115 200 baud:
    /// the driver waits for it with a finer clock than its timers.
    pub fn quiet_until(&self) -> Option<Duration> {
        match self.line {
            Line::Quiet { until } => Some(until),
            _ => None,
        }
    }

    /// Handles the passing of the current deadline: a missed answer is retried or counted as
    /// a miss. Does nothing before the deadline.
    pub fn on_timeout(&mut self, now: Duration) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        match &self.line {
            Line::Awaiting { deadline, .. } if now >= *deadline => {}
            Line::Quiet { until } if now >= *until => {
                self.line = Line::Free;
                return events;
            }
            _ => return events,
        }
        let Line::Awaiting { tx, .. } = std::mem::replace(&mut self.line, Line::Free) else {
            return events;
        };
        self.stats.timeouts += 1;
        if tx.attempts < tx.max_attempts {
            self.line = Line::Retry { tx, since: now };
        } else {
            self.missed(&tx, &mut events);
        }
        events
    }

    /// Takes received bytes (any chunking) and handles every frame they complete.
    pub fn on_bytes(&mut self, chunk: &[u8], now: Duration) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        for item in self.decoder.feed(chunk) {
            match item {
                Ok(frame) => events.extend(self.on_frame(&frame, now)),
                Err(e) => {
                    self.stats.count(e);
                    events.push(SessionEvent::FrameError(e));
                }
            }
        }
        events
    }

    /// Handles one decoded frame.
    pub fn on_frame(&mut self, frame: &Frame, now: Duration) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        if frame.direction() == Direction::ToUnit {
            self.stats.echoes += 1;
            return events;
        }
        self.stats.frames_received += 1;
        let from = frame.address();
        let current = match &self.line {
            Line::Awaiting { tx, .. } | Line::Retry { tx, .. } => Some(tx.unit),
            Line::Free | Line::Quiet { .. } => None,
        };
        let Some(i) = current.filter(|&i| self.units.get(i).is_some_and(|u| u.addr == from)) else {
            self.stats.unexpected += 1;
            events.push(SessionEvent::Unexpected {
                unit: from,
                id: frame.id(),
                msg_type: frame.msg_type(),
            });
            return events;
        };
        // The transaction is answered, whatever the answer says.
        if let Line::Awaiting { tx, .. } | Line::Retry { tx, .. } = std::mem::replace(
            &mut self.line,
            Line::Quiet {
                until: now.saturating_add(self.config.turnaround),
            },
        ) && let TxKind::Command(id) = tx.kind
        {
            events.push(SessionEvent::CommandDone { unit: from, id });
        }
        if let Some(unit) = self.units.get_mut(i) {
            unit.misses = 0;
            unit.skipped = 0;
            if unit.state != UnitState::Online {
                unit.state = UnitState::Online;
                events.push(SessionEvent::UnitOnline(from));
            }
        }
        match Message::from_frame(frame) {
            Ok(msg) => self.on_message(i, frame, msg, now, &mut events),
            Err(error) => {
                self.stats.bad_messages += 1;
                events.push(SessionEvent::BadMessage {
                    unit: from,
                    id: frame.id(),
                    error,
                });
            }
        }
        events
    }

    /// Delivers the decision for a request from [`SessionEvent::Request`]. Call it only once
    /// the decision is durably recorded. The answer is remembered for retransmissions and sent
    /// ahead of routine polls.
    pub fn answer(&mut self, key: &RequestKey, answer: Answer) -> Result<(), AnswerError> {
        let i = self
            .unit_index(key.unit)
            .ok_or(AnswerError::UnknownUnit(key.unit))?;
        let msg = match answer {
            Answer::Grant(g) => Message::Grant(g),
            Answer::Deny(reason) => Message::Deny(Deny { reason }),
        };
        let bytes = encode(&msg.to_frame(key.unit, key.id)?);
        let not_pending = AnswerError::NotPending {
            unit: key.unit,
            id: key.id,
        };
        let unit = self.units.get_mut(i).ok_or(not_pending.clone())?;
        let entry = unit
            .cache
            .iter_mut()
            .find(|e| e.id == key.id && e.fingerprint == key.fingerprint && e.answer.is_none())
            .ok_or(not_pending)?;
        entry.answer = Some(bytes.clone());
        self.answers.push_back((i, key.id, bytes));
        Ok(())
    }

    /// With [`SessionConfig::defer_report_acks`]: the report is stored, acknowledge it at the
    /// unit's next turn.
    pub fn ack_report(
        &mut self,
        unit: Address,
        id: u16,
        fingerprint: &[u8; 32],
    ) -> Result<(), AnswerError> {
        let not_pending = AnswerError::NotPending { unit, id };
        let i = self
            .unit_index(unit)
            .ok_or(AnswerError::UnknownUnit(unit))?;
        let slot = self.units.get_mut(i).ok_or(not_pending.clone())?;
        let entry = slot
            .cache
            .iter_mut()
            .find(|e| e.id == id && e.fingerprint == *fingerprint && e.answer.is_none())
            .ok_or(not_pending)?;
        let ack = gateway_frame(&Message::Ack, unit, id);
        entry.answer = Some(ack.clone());
        slot.ack = Some(ack);
        Ok(())
    }

    /// Queues a command for a unit, or for all units at [`Address::BROADCAST`] (time and open
    /// door only). Returns the command's id ([`SessionEvent::CommandDone`] names it).
    pub fn send(&mut self, to: Address, command: &Command) -> Result<u16, SendError> {
        let msg = command.message();
        let id = self.next_id;
        let frame = msg.to_frame(to, id)?;
        if to.is_broadcast() {
            if self.broadcasts.len() >= COMMAND_QUEUE {
                return Err(SendError::QueueFull(to));
            }
            self.broadcasts.push_back(encode(&frame));
        } else {
            let unit = self
                .unit_index(to)
                .and_then(|i| self.units.get_mut(i))
                .ok_or(SendError::UnknownUnit(to))?;
            if unit.commands.len() >= COMMAND_QUEUE {
                return Err(SendError::QueueFull(to));
            }
            unit.commands.push_back((id, encode(&frame)));
        }
        self.take_id();
        Ok(id)
    }

    /// Entries held in caches and queues (for the boundedness tests).
    #[cfg(test)]
    pub(crate) fn footprint(&self) -> usize {
        self.units
            .iter()
            .map(|u| u.cache.len() + usize::from(u.ack.is_some()) + u.commands.len())
            .sum::<usize>()
            + self.answers.len()
            + self.broadcasts.len()
    }

    fn unit_index(&self, addr: Address) -> Option<usize> {
        self.units.iter().position(|u| u.addr == addr)
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        id
    }

    fn transaction(&self, unit: usize, kind: TxKind, bytes: Vec<u8>) -> Transaction {
        let offline = self
            .units
            .get(unit)
            .is_some_and(|u| u.state == UnitState::Offline);
        Transaction {
            unit,
            kind,
            bytes,
            attempts: 1,
            max_attempts: if offline {
                1
            } else {
                self.config.retries.saturating_add(1)
            },
        }
    }

    fn start(&mut self, tx: Transaction, now: Duration) -> Transmit {
        let baud = self.config.baud;
        let deadline = now
            .saturating_add(wire_time(tx.bytes.len(), baud))
            .saturating_add(self.config.response_timeout)
            .saturating_add(wire_time(MAX_FRAME, baud));
        let to = self
            .units
            .get(tx.unit)
            .map_or(Address::BROADCAST, |u| u.addr);
        let bytes = tx.bytes.clone();
        self.stats.frames_sent += 1;
        self.line = Line::Awaiting { tx, deadline };
        Transmit {
            bytes,
            to,
            expects_reply: true,
            deadline,
        }
    }

    fn missed(&mut self, tx: &Transaction, events: &mut Vec<SessionEvent>) {
        let Some(unit) = self.units.get_mut(tx.unit) else {
            return;
        };
        if let TxKind::Command(id) = tx.kind {
            events.push(SessionEvent::CommandFailed {
                unit: unit.addr,
                id,
            });
        }
        // An undelivered ack or answer stays in the cache: the unit repeats its message and
        // gets it from there.
        unit.misses = unit.misses.saturating_add(1);
        if unit.misses >= self.config.offline_after && unit.state != UnitState::Offline {
            unit.state = UnitState::Offline;
            unit.skipped = 0;
            events.push(SessionEvent::UnitOffline(unit.addr));
        }
    }

    fn on_message(
        &mut self,
        i: usize,
        frame: &Frame,
        msg: Message,
        now: Duration,
        events: &mut Vec<SessionEvent>,
    ) {
        let id = frame.id();
        let report = match msg {
            Message::Verify(verify) => {
                self.on_verify(i, frame, verify, now, events);
                return;
            }
            Message::DoorEvent(e) => Report::DoorEvent(e),
            Message::Tamper(t) => Report::Tamper(t),
            Message::CallButton(c) => Report::CallButton(c),
            Message::Battery(b) => Report::Battery(b),
            Message::Status(s) => {
                self.on_status(i, &s, events);
                Report::Status(s)
            }
            // Idle, and gateway types (already refused by `from_frame`).
            _ => return,
        };
        let fingerprint = fingerprint(frame);
        let ttl = self.config.cache_ttl;
        let size = self.config.cache_size;
        let Some(unit) = self.units.get_mut(i) else {
            return;
        };
        let addr = unit.addr;
        if let Some(entry) = lookup(&mut unit.cache, id, &fingerprint, now, ttl) {
            // A repeated report: its ack was lost (ack again), or it is still being stored
            // (say nothing yet). Either way nothing new to report.
            let answered = entry.answer.is_some();
            if let Some(ack) = &entry.answer {
                unit.ack = Some(ack.clone());
            }
            self.stats.repeats += 1;
            events.push(SessionEvent::Repeat {
                unit: addr,
                id,
                answered,
            });
            return;
        }
        let ack = gateway_frame(&Message::Ack, addr, id);
        let deferred = self.config.defer_report_acks && !matches!(report, Report::Status(_));
        insert(
            &mut unit.cache,
            size,
            CacheEntry {
                id,
                fingerprint,
                at: now,
                answer: (!deferred).then(|| ack.clone()),
            },
        );
        if !deferred {
            unit.ack = Some(ack);
        }
        events.push(SessionEvent::Report {
            unit: addr,
            id,
            report,
            fingerprint,
        });
    }

    fn on_verify(
        &mut self,
        i: usize,
        frame: &Frame,
        verify: Verify,
        now: Duration,
        events: &mut Vec<SessionEvent>,
    ) {
        let id = frame.id();
        let fingerprint = fingerprint(frame);
        let ttl = self.config.cache_ttl;
        let size = self.config.cache_size;
        let Some(unit) = self.units.get_mut(i) else {
            return;
        };
        let addr = unit.addr;
        let boot_id = unit.boot_id;
        if let Some(entry) = lookup(&mut unit.cache, id, &fingerprint, now, ttl) {
            self.stats.repeats += 1;
            let answered = entry.answer.is_some();
            if let Some(bytes) = &entry.answer
                && !self.answers.iter().any(|(u, a, _)| *u == i && *a == id)
            {
                self.answers.push_back((i, id, bytes.clone()));
            }
            events.push(SessionEvent::Repeat {
                unit: addr,
                id,
                answered,
            });
            return;
        }
        insert(
            &mut unit.cache,
            size,
            CacheEntry {
                id,
                fingerprint,
                at: now,
                answer: None,
            },
        );
        events.push(SessionEvent::Request(VerifyRequest {
            key: RequestKey {
                unit: addr,
                id,
                fingerprint,
                boot_id,
            },
            verify,
        }));
    }

    fn on_status(&mut self, i: usize, status: &Status, events: &mut Vec<SessionEvent>) {
        let Some(unit) = self.units.get_mut(i) else {
            return;
        };
        let previous = unit.boot_id.replace(status.boot_id);
        if previous.is_some_and(|b| b != status.boot_id) {
            unit.cache.clear();
            unit.ack = None;
            self.answers.retain(|(u, _, _)| *u != i);
            events.push(SessionEvent::UnitRestarted {
                unit: unit.addr,
                boot_id: status.boot_id,
            });
        }
    }
}

/// The wire bytes of a gateway message that is valid by construction (poll, ack).
fn gateway_frame(msg: &Message, to: Address, id: u16) -> Vec<u8> {
    // Poll and Ack have empty bodies and are never broadcast here, so this cannot fail; an
    // empty frame would only make the unit time out.
    msg.to_frame(to, id).map(|f| encode(&f)).unwrap_or_default()
}

fn fingerprint(frame: &Frame) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([frame.msg_type()]);
    h.update(frame.body());
    h.finalize().into()
}

/// The live entry for `id` with this fingerprint. Expired entries are dropped first; an entry
/// with the same id but another fingerprint is dropped too (the id was reused).
fn lookup<'c>(
    cache: &'c mut VecDeque<CacheEntry>,
    id: u16,
    fingerprint: &[u8; 32],
    now: Duration,
    ttl: Duration,
) -> Option<&'c mut CacheEntry> {
    cache.retain(|e| {
        now.saturating_sub(e.at) < ttl && (e.id != id || e.fingerprint == *fingerprint)
    });
    cache.iter_mut().find(|e| e.id == id)
}

/// Adds an entry, evicting the oldest answered one (else the oldest) when full.
fn insert(cache: &mut VecDeque<CacheEntry>, size: usize, entry: CacheEntry) {
    while cache.len() >= size {
        let victim = cache.iter().position(|e| e.answer.is_some()).unwrap_or(0);
        if cache.remove(victim).is_none() {
            break;
        }
    }
    cache.push_back(entry);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::CredentialKind;
    use crate::bus::frame::Decoder;
    use crate::bus::message::{DoorEventKind, MsgType};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn addr(n: u8) -> Address {
        Address::unit(n).unwrap()
    }

    fn config(units: &[u8]) -> SessionConfig {
        SessionConfig {
            units: units.iter().map(|&n| addr(n)).collect(),
            baud: 115_200,
            response_timeout: ms(20),
            retries: 1,
            offline_after: 2,
            offline_poll_every: 3,
            min_cycle: ms(50),
            turnaround: ms(1),
            cache_size: 4,
            cache_ttl: Duration::from_secs(60),
            first_command_id: 100,
            defer_report_acks: false,
        }
    }

    /// A unit's frame on the wire.
    fn from_unit(unit: u8, id: u16, msg: &Message) -> Vec<u8> {
        encode(&msg.to_frame(addr(unit), id).unwrap())
    }

    fn decode(tx: &Transmit) -> (Frame, Message) {
        let items = Decoder::new().feed(&tx.bytes);
        let [Ok(frame)] = items.as_slice() else {
            panic!("not one frame: {items:?}");
        };
        let msg = Message::from_frame(frame).unwrap();
        (frame.clone(), msg)
    }

    fn pin(value: &str) -> Message {
        Message::Verify(Verify {
            kind: CredentialKind::Pin,
            value: value.as_bytes().to_vec(),
            reader: 0,
        })
    }

    fn door_opened() -> Message {
        Message::DoorEvent(DoorEvent {
            door: 0,
            event: DoorEventKind::Opened,
            at: None,
        })
    }

    fn status(boot_id: u32) -> Message {
        Message::Status(Status {
            firmware: "1.0".into(),
            boot_id,
            settings: Settings::default(),
        })
    }

    /// A session on a fake clock.
    struct Bus {
        s: Session,
        now: Duration,
        /// Events from timeouts handled while waiting for the next transmission.
        background: Vec<SessionEvent>,
    }

    impl Bus {
        fn new(config: SessionConfig) -> Bus {
            Bus {
                s: Session::new(config).unwrap(),
                now: ms(1000),
                background: Vec::new(),
            }
        }

        /// Lets time pass until the session transmits.
        fn next_tx(&mut self) -> Transmit {
            for _ in 0..10_000 {
                if let Some(tx) = self.s.poll_next(self.now) {
                    return tx;
                }
                let due = self.s.next_deadline().expect("nothing due");
                self.now = self.now.max(due);
                let events = self.s.on_timeout(self.now);
                self.background.extend(events);
            }
            panic!("the session never transmits");
        }

        /// The next transmission, decoded; asserts it goes to `unit`.
        fn expect_to(&mut self, unit: u8) -> (Transmit, Frame, Message) {
            let tx = self.next_tx();
            assert_eq!(tx.to, addr(unit), "{tx:?}");
            let (f, m) = decode(&tx);
            (tx, f, m)
        }

        fn reply(&mut self, bytes: &[u8]) -> Vec<SessionEvent> {
            self.now += ms(2);
            self.s.on_bytes(bytes, self.now)
        }

        /// The unit stays silent until the deadline.
        fn silence(&mut self) -> Vec<SessionEvent> {
            let Some(Line::Awaiting { deadline, .. }) = Some(&self.s.line) else {
                unreachable!()
            };
            self.now = *deadline;
            self.s.on_timeout(self.now)
        }
    }

    #[test]
    fn the_gap_after_a_cycles_last_answer_needs_no_wake_up_of_its_own() {
        let mut bus = Bus::new(config(&[1, 2]));
        let start = bus.now;
        let (_, f, _) = bus.expect_to(1);
        bus.reply(&from_unit(1, f.id(), &Message::Idle));
        // Unit 2 is polled as soon as the gap ends.
        let gap_end = bus.s.quiet_until().expect("a quiet gap");
        assert_eq!(bus.s.next_transmit(), Some(gap_end));
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        // The cycle is done: nothing goes out before the next one, gap or not.
        let gap_end = bus.s.quiet_until().expect("a quiet gap");
        assert_eq!(bus.s.next_deadline(), Some(gap_end));
        assert_eq!(bus.s.next_transmit(), Some(start + ms(50)));
        // A broadcast handed in during the gap goes out at its end, not before.
        bus.s
            .send(
                Address::BROADCAST,
                &Command::Time(TimeSync {
                    unix: 1,
                    utc_offset: 0,
                }),
            )
            .unwrap();
        assert_eq!(bus.s.next_transmit(), Some(gap_end));
        assert_eq!(
            bus.s
                .poll_next(gap_end.saturating_sub(Duration::from_micros(1))),
            None
        );
        let tx = bus.s.poll_next(gap_end).expect("the broadcast");
        assert_eq!(tx.to, Address::BROADCAST);
        // Its own gap is never ended by a timeout: the next cycle starts all the same.
        assert_eq!(bus.s.next_transmit(), Some(start + ms(50)));
        bus.now = start + ms(50);
        let (_, _, msg) = bus.expect_to(1);
        assert_eq!(msg, Message::Poll);
        assert_eq!(bus.now, start + ms(50));
    }

    #[test]
    fn polls_units_in_order_and_rests_between_cycles() {
        let mut bus = Bus::new(config(&[1, 2, 3]));
        let start = bus.now;
        for (n, id) in [(1, 100), (2, 101), (3, 102)] {
            let (tx, frame, msg) = bus.expect_to(n);
            assert_eq!(msg, Message::Poll);
            assert_eq!(frame.id(), id);
            assert!(tx.expects_reply);
            let events = bus.reply(&from_unit(n, id, &Message::Idle));
            assert_eq!(events, vec![SessionEvent::UnitOnline(addr(n))]);
            // Turnaround: nothing goes out right after an answer.
            assert_eq!(bus.s.poll_next(bus.now), None);
        }
        assert_eq!(bus.s.next_deadline(), Some(bus.now + ms(1)));
        bus.now += ms(1);
        assert_eq!(bus.s.poll_next(bus.now), None, "cycle too young");
        assert_eq!(bus.s.next_deadline(), Some(start + ms(50)));
        let (_, _, msg) = bus.expect_to(1);
        assert_eq!(msg, Message::Poll);
        assert_eq!(bus.now, start + ms(50));
        assert_eq!(bus.s.unit_state(addr(1)), Some(UnitState::Online));
        assert_eq!(bus.s.unit_state(addr(9)), None);
    }

    #[test]
    fn timeout_retry_offline_slow_polling_and_back_online() {
        let mut bus = Bus::new(config(&[1, 2]));
        // Unit 1 never answers; unit 2 always does.
        let (first, _, _) = bus.expect_to(1);
        assert!(bus.silence().is_empty());
        let (retry, _, _) = bus.expect_to(1);
        assert_eq!(
            retry.bytes, first.bytes,
            "a retry repeats the bytes exactly"
        );
        assert!(bus.silence().is_empty(), "one miss is not offline yet");
        assert_eq!(bus.s.stats().retransmits, 1);
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        // Second cycle: unit 1 misses again (with its retry) and goes offline.
        bus.expect_to(1);
        bus.silence();
        bus.expect_to(1);
        assert_eq!(bus.silence(), vec![SessionEvent::UnitOffline(addr(1))]);
        assert_eq!(bus.s.unit_state(addr(1)), Some(UnitState::Offline));
        // Now unit 1 gets one attempt every third cycle, without retries.
        let mut turns = Vec::new();
        for _ in 0..9 {
            let tx = bus.next_tx();
            turns.push(tx.to.get());
            if tx.to == addr(2) {
                let (f, _) = decode(&tx);
                bus.reply(&from_unit(2, f.id(), &Message::Idle));
            } else {
                assert!(bus.silence().is_empty(), "offline is reported once");
            }
        }
        // The rest of the current cycle (unit 2), then cycles 3, 4, 5, …: 1 is skipped twice.
        assert_eq!(turns, vec![2, 2, 2, 1, 2, 2, 2, 1, 2]);
        assert_eq!(bus.s.stats().retransmits, 2, "no retries while offline");
        // It answers again: online, and polled every cycle.
        let (_, f, _) = loop {
            let (tx, f, m) = {
                let tx = bus.next_tx();
                let (f, m) = decode(&tx);
                (tx, f, m)
            };
            if tx.to == addr(1) {
                break (tx, f, m);
            }
            bus.reply(&from_unit(2, f.id(), &Message::Idle));
        };
        assert_eq!(
            bus.reply(&from_unit(1, f.id(), &Message::Idle)),
            vec![SessionEvent::UnitOnline(addr(1))]
        );
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        bus.expect_to(1);
    }

    #[test]
    fn late_answer_during_retry_wait_counts() {
        let mut bus = Bus::new(config(&[1]));
        let (_, f, _) = bus.expect_to(1);
        bus.silence();
        // The answer arrives after the deadline but before the retransmission.
        let events = bus.reply(&from_unit(1, f.id(), &Message::Idle));
        assert_eq!(events, vec![SessionEvent::UnitOnline(addr(1))]);
        assert_eq!(bus.s.stats().retransmits, 0);
    }

    #[test]
    fn verify_reaches_the_engine_once_and_repeats_get_identical_bytes() {
        let mut bus = Bus::new(config(&[1, 2]));
        let (_, f, _) = bus.expect_to(1);
        let verify = from_unit(1, 0x1234, &pin("482916"));
        let events = bus.reply(&verify);
        let [SessionEvent::UnitOnline(_), SessionEvent::Request(req)] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert_eq!(f.msg_type(), MsgType::Poll.code());
        assert_eq!(req.key.unit, addr(1));
        assert_eq!(req.key.id, 0x1234);
        assert_eq!(req.verify.value, b"482916");
        let key = req.key;

        // The unit repeats the request before the decision: dropped, not decided twice.
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        let (_, _, m) = bus.expect_to(1);
        assert_eq!(m, Message::Poll);
        assert_eq!(
            bus.reply(&verify),
            vec![SessionEvent::Repeat {
                unit: addr(1),
                id: 0x1234,
                answered: false
            }]
        );

        // The decision arrives: it goes out next, ahead of unit 2's turn.
        let grant = Grant {
            doors: vec![0, 1],
            welcome: Some("Welcome".into()),
            floors: vec![3],
        };
        bus.s.answer(&key, Answer::Grant(grant.clone())).unwrap();
        assert_eq!(
            bus.s.answer(&key, Answer::Deny(DenyReason::UsedUp)),
            Err(AnswerError::NotPending {
                unit: addr(1),
                id: 0x1234
            }),
            "one answer per request"
        );
        let (answer_tx, f, m) = bus.expect_to(1);
        assert_eq!(m, Message::Grant(grant));
        assert_eq!(f.id(), 0x1234);
        // The unit did not hear it and repeats its request: same bytes, engine not asked.
        let events = bus.reply(&verify);
        assert_eq!(
            events,
            vec![SessionEvent::Repeat {
                unit: addr(1),
                id: 0x1234,
                answered: true
            }]
        );
        let (again, _, _) = bus.expect_to(1);
        assert_eq!(again.bytes, answer_tx.bytes);
        // This time the unit heard it and moves on.
        assert!(bus.reply(&from_unit(1, 0x1234, &Message::Idle)).is_empty());
        assert_eq!(bus.s.stats().repeats, 2);
    }

    #[test]
    fn a_reused_id_with_another_body_is_a_new_request() {
        let mut bus = Bus::new(config(&[1]));
        bus.expect_to(1);
        let events = bus.reply(&from_unit(1, 7, &pin("1111")));
        let Some(SessionEvent::Request(first)) = events.last() else {
            panic!("{events:?}");
        };
        let first = first.key;
        bus.expect_to(1);
        let events = bus.reply(&from_unit(1, 7, &pin("2222")));
        let Some(SessionEvent::Request(second)) = events.last() else {
            panic!("{events:?}");
        };
        assert_ne!(first.fingerprint, second.key.fingerprint);
        // The first request's decision cannot land on the second one.
        assert!(matches!(
            bus.s
                .answer(&first, Answer::Deny(DenyReason::UnknownCredential)),
            Err(AnswerError::NotPending { .. })
        ));
        assert!(
            bus.s
                .answer(&second.key, Answer::Deny(DenyReason::UnknownCredential))
                .is_ok()
        );
    }

    #[test]
    fn a_restarted_unit_loses_its_cache() {
        let mut bus = Bus::new(config(&[1]));
        bus.expect_to(1);
        let events = bus.reply(&from_unit(1, 1, &status(0xAAAA)));
        assert!(matches!(events.last(), Some(SessionEvent::Report { .. })));
        bus.expect_to(1); // the ack
        let events = bus.reply(&from_unit(1, 2, &pin("1234")));
        let Some(SessionEvent::Request(req)) = events.last() else {
            panic!("{events:?}");
        };
        let key = req.key;
        bus.s.answer(&key, Answer::Grant(Grant::default())).unwrap();
        bus.expect_to(1); // the grant
        // Power cut at the unit: it starts over with a new boot id and the same ids.
        let events = bus.reply(&from_unit(1, 1, &status(0xBBBB)));
        assert!(events.contains(&SessionEvent::UnitRestarted {
            unit: addr(1),
            boot_id: 0xBBBB
        }));
        assert!(matches!(events.last(), Some(SessionEvent::Report { .. })));
        bus.expect_to(1); // the ack
        // The same PIN with the same id is a new request now, not the old grant.
        let events = bus.reply(&from_unit(1, 2, &pin("1234")));
        assert!(
            matches!(events.last(), Some(SessionEvent::Request(_))),
            "{events:?}"
        );
    }

    #[test]
    fn deferred_report_acks_wait_until_the_report_is_stored() {
        let mut cfg = config(&[1, 2]);
        cfg.defer_report_acks = true;
        let mut bus = Bus::new(cfg);
        bus.expect_to(1);
        let event = from_unit(1, 0x0042, &door_opened());
        let events = bus.reply(&event);
        let Some(SessionEvent::Report { fingerprint, .. }) = events.last().cloned() else {
            panic!("no report: {events:?}");
        };
        // Not stored yet: unit 1's next turn is a poll, not an ack.
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        let (_, _, m) = bus.expect_to(1);
        assert_eq!(m, Message::Poll);
        // The unit repeats it meanwhile: nothing new is reported, nothing acked.
        assert_eq!(
            bus.reply(&from_unit(1, 0x0042, &door_opened())),
            vec![SessionEvent::Repeat {
                unit: addr(1),
                id: 0x0042,
                answered: false
            }]
        );
        // Stored: the ack goes out at unit 1's next turn.
        bus.s.ack_report(addr(1), 0x0042, &fingerprint).unwrap();
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        let (_, f, m) = bus.expect_to(1);
        assert_eq!((m, f.id()), (Message::Ack, 0x0042));
        // A second ack for it is refused.
        assert!(bus.s.ack_report(addr(1), 0x0042, &fingerprint).is_err());
    }

    #[test]
    fn reports_are_acknowledged_and_reported_once() {
        let mut bus = Bus::new(config(&[1, 2]));
        bus.expect_to(1);
        let event = from_unit(1, 0x0042, &door_opened());
        let events = bus.reply(&event);
        assert_eq!(
            events.last(),
            Some(&SessionEvent::Report {
                unit: addr(1),
                id: 0x0042,
                report: Report::DoorEvent(DoorEvent {
                    door: 0,
                    event: DoorEventKind::Opened,
                    at: None
                }),
                fingerprint: fingerprint(&Decoder::new().feed(&event)[0].clone().unwrap()),
            })
        );
        // Acks wait for the unit's turn.
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        let (ack, f, m) = bus.expect_to(1);
        assert_eq!((m, f.id()), (Message::Ack, 0x0042));
        // The ack was lost: the unit repeats the event, gets the same ack, no new report.
        assert_eq!(
            bus.reply(&event),
            vec![SessionEvent::Repeat {
                unit: addr(1),
                id: 0x0042,
                answered: true
            }]
        );
        let (_, f, _) = bus.expect_to(2);
        bus.reply(&from_unit(2, f.id(), &Message::Idle));
        let (again, _, _) = bus.expect_to(1);
        assert_eq!(again.bytes, ack.bytes);
        bus.reply(&from_unit(1, 0x0043, &Message::Idle));
        let (_, _, m) = bus.expect_to(2);
        assert_eq!(m, Message::Poll);
    }

    #[test]
    fn broadcasts_expect_no_answer() {
        let mut bus = Bus::new(config(&[1, 2]));
        let time = Command::Time(TimeSync {
            unix: 1_767_225_600,
            utc_offset: 3600,
        });
        let id = bus.s.send(Address::BROADCAST, &time).unwrap();
        assert_eq!(id, 100);
        let tx = bus.next_tx();
        assert_eq!(tx.to, Address::BROADCAST);
        assert!(!tx.expects_reply);
        let (f, m) = decode(&tx);
        assert_eq!((f.id(), m), (100, time.message()));
        // A quiet gap for the frame to leave and the line to settle, then the polls.
        assert_eq!(bus.s.poll_next(bus.now), None);
        assert_eq!(
            tx.deadline,
            bus.now + wire_time(tx.bytes.len(), 115_200) + ms(1)
        );
        let (_, f, _) = bus.expect_to(1);
        assert_eq!(f.id(), 101);
        assert_eq!(bus.now, tx.deadline);
        assert_eq!(
            bus.s
                .send(Address::BROADCAST, &Command::Settings(Settings::default())),
            Err(SendError::Message(MessageError::NotBroadcast(
                MsgType::Settings
            )))
        );
        assert_eq!(
            bus.s.send(addr(9), &time),
            Err(SendError::UnknownUnit(addr(9)))
        );
    }

    #[test]
    fn commands_report_done_or_failed() {
        let mut bus = Bus::new(config(&[1]));
        let open = Command::OpenDoor(OpenDoor {
            door: 0,
            pulse_ms: 3000,
        });
        let id = bus.s.send(addr(1), &open).unwrap();
        let (_, f, m) = bus.expect_to(1);
        assert_eq!((f.id(), m), (id, open.message()));
        let events = bus.reply(&from_unit(1, 1, &Message::Idle));
        assert!(events.contains(&SessionEvent::CommandDone { unit: addr(1), id }));

        let id = bus.s.send(addr(1), &open).unwrap();
        bus.expect_to(1);
        bus.silence();
        bus.expect_to(1);
        assert_eq!(
            bus.silence(),
            vec![SessionEvent::CommandFailed { unit: addr(1), id }]
        );
        for _ in 0..COMMAND_QUEUE {
            bus.s.send(addr(1), &open).unwrap();
        }
        assert_eq!(
            bus.s.send(addr(1), &open),
            Err(SendError::QueueFull(addr(1)))
        );
    }

    #[test]
    fn echoes_strays_and_noise() {
        let mut bus = Bus::new(config(&[1, 2]));
        let (tx, f, _) = bus.expect_to(1);
        // Our own frame heard back on the half-duplex line.
        assert!(bus.reply(&tx.bytes).is_empty());
        assert_eq!(bus.s.stats().echoes, 1);
        // Unit 2 talking out of turn.
        assert_eq!(
            bus.reply(&from_unit(2, 5, &door_opened())),
            vec![SessionEvent::Unexpected {
                unit: addr(2),
                id: 5,
                msg_type: MsgType::DoorEvent.code()
            }]
        );
        // Noise, then the real answer split over several reads.
        assert_eq!(
            bus.reply(&[0xde, 0xad, 0xbe, 0xef]),
            Vec::<SessionEvent>::new()
        );
        let answer = from_unit(1, f.id(), &Message::Idle);
        let (a, b) = answer.split_at(4);
        let events = bus.reply(a);
        assert_eq!(events, vec![SessionEvent::FrameError(FrameError::BadCobs)]);
        assert_eq!(bus.reply(b), vec![SessionEvent::UnitOnline(addr(1))]);
        assert_eq!(bus.s.stats().bad_cobs, 1);
        assert_eq!(bus.s.stats().frame_errors(), 1);
        // A valid frame with a bad body: the unit is alive, the message is reported.
        bus.expect_to(2);
        let bad = Frame::new(Direction::ToGateway, addr(2), 9, 0x45, vec![0xA0]).unwrap();
        let events = bus.reply(&encode(&bad));
        assert!(matches!(
            events.as_slice(),
            [
                SessionEvent::UnitOnline(_),
                SessionEvent::BadMessage { id: 9, .. }
            ]
        ));
    }

    #[test]
    fn cache_keeps_pending_requests_over_answered_ones_and_expires() {
        let mut cfg = config(&[1]);
        cfg.cache_size = 2;
        cfg.cache_ttl = Duration::from_secs(10);
        let mut bus = Bus::new(cfg);
        bus.expect_to(1);
        let events = bus.reply(&from_unit(1, 1, &pin("1")));
        let Some(SessionEvent::Request(req)) = events.last() else {
            panic!()
        };
        let pending = req.key;
        for id in 2..6 {
            bus.expect_to(1);
            let events = bus.reply(&from_unit(1, id, &door_opened()));
            assert!(matches!(events.last(), Some(SessionEvent::Report { .. })));
        }
        // Four reports went through a cache of two, yet the undecided request survived.
        assert!(
            bus.s
                .answer(&pending, Answer::Grant(Grant::default()))
                .is_ok()
        );
        // After the TTL a repeat is a new report (units give up long before).
        bus.expect_to(1);
        bus.now += Duration::from_secs(11);
        let events = bus.reply(&from_unit(1, 5, &door_opened()));
        assert!(matches!(events.last(), Some(SessionEvent::Report { .. })));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut c = config(&[1, 2, 1]);
        assert_eq!(
            Session::new(c.clone()).unwrap_err(),
            ConfigError::DuplicateUnit(addr(1))
        );
        c.units = vec![Address::BROADCAST];
        assert_eq!(
            Session::new(c.clone()).unwrap_err(),
            ConfigError::BroadcastUnit
        );
        c.units = vec![addr(1)];
        c.baud = 0;
        assert_eq!(
            Session::new(c.clone()).unwrap_err(),
            ConfigError::Zero("baud")
        );
        c.baud = 9600;
        c.cache_size = 0;
        assert_eq!(
            Session::new(c).unwrap_err(),
            ConfigError::Zero("cache_size")
        );
        assert!(Session::new(SessionConfig::default()).is_ok());
    }

    #[test]
    fn an_empty_bus_rests() {
        let mut s = Session::new(SessionConfig::default()).unwrap();
        assert_eq!(s.poll_next(ms(0)), None);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn deadline_covers_both_frames_on_a_slow_line() {
        let mut c = config(&[1]);
        c.baud = 9600;
        let mut s = Session::new(c).unwrap();
        let tx = s.poll_next(ms(0)).unwrap();
        assert_eq!(
            tx.deadline,
            wire_time(tx.bytes.len(), 9600) + ms(20) + wire_time(MAX_FRAME, 9600)
        );
        assert_eq!(s.next_deadline(), Some(tx.deadline));
        let before = tx.deadline.saturating_sub(ms(1));
        assert!(s.on_timeout(before).is_empty());
        assert_eq!(s.poll_next(before), None);
    }

    #[test]
    fn the_default_turnaround_is_a_few_characters_with_a_floor() {
        assert_eq!(default_turnaround(115_200), Duration::from_micros(304));
        assert_eq!(default_turnaround(9600), Duration::from_micros(3646));
        assert_eq!(default_turnaround(921_600), TURNAROUND_FLOOR);
        assert_eq!(default_turnaround(0), TURNAROUND_FLOOR);
        assert_eq!(
            SessionConfig::default().turnaround,
            default_turnaround(115_200)
        );
    }

    /// P8 (issue 7) on a virtual line: every frame takes its wire time, units answer at once.
    /// A saturated cycle over 32 idle units at 115 200 baud stays within 1.25× the wire time
    /// of its polls and answers.
    #[test]
    fn a_cycle_over_32_units_costs_little_more_than_its_wire_time() {
        let units: Vec<u8> = (1..=32).collect();
        let mut cfg = SessionConfig {
            units: units.iter().map(|&n| addr(n)).collect(),
            min_cycle: Duration::ZERO,
            ..SessionConfig::default()
        };
        cfg.first_command_id = 1;
        let mut s = Session::new(cfg).unwrap();
        let mut now = Duration::ZERO;
        let mut starts = Vec::new();
        let mut wire = Duration::ZERO;
        while starts.len() < 3 {
            let Some(tx) = s.poll_next(now) else {
                now = now.max(s.next_deadline().unwrap());
                assert!(s.on_timeout(now).is_empty());
                continue;
            };
            let (frame, _) = decode(&tx);
            if tx.to == addr(1) {
                starts.push(now);
            }
            let answer = from_unit(frame.address().get(), frame.id(), &Message::Idle);
            if starts.len() == 2 {
                wire += wire_time(tx.bytes.len(), 115_200) + wire_time(answer.len(), 115_200);
            }
            now += wire_time(tx.bytes.len(), 115_200) + wire_time(answer.len(), 115_200);
            s.on_bytes(&answer, now);
        }
        let cycle = starts[2].checked_sub(starts[1]).unwrap();
        assert_eq!(wire, 32 * 2 * wire_time(10, 115_200));
        assert_eq!(cycle, wire + 32 * default_turnaround(115_200));
        assert!(
            cycle.as_secs_f64() <= 1.25 * wire.as_secs_f64(),
            "{cycle:?}"
        );
    }
}
