//! The async shell of an OSDP bus: one task per bus, beside the line thread ([`super::cp`]).
//!
//! It turns what readers report into decisions and records, and decisions into reader
//! actions. A credential (card or PIN) is decided by [`Store::verify`], durable before the
//! relay is pulsed, exactly as on the doorbridge bus; door contacts, tamper and power become
//! door events and alarms; a reader going offline or refusing the secure channel becomes a
//! record. Door releases routed here (an inner door behind a grant elsewhere, a remote open)
//! pulse the reader's relay.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::cp::{self, CpCommand, CpEvent, LineSpec, PdSpec};
use super::door::DoorContact;
use super::keypad::{ClearedBy, Keypad, KeypadEvent, KeypadRules};
use super::reader::{self, Action, CardFormat, Feedback, RawAs};
use crate::access::{CredentialKind, Decision, DenyReason, DoorId};
use crate::bus::frame::Address;
use crate::bus::session::Command;
use crate::drivers::bus::{
    BusStatus, CommandOutcome, DoorRouter, Queued, Rs485, finish, log_decision, release_elsewhere,
    set_status, sleep_until,
};
use crate::ids::UnitId;
use crate::store::records::ReaderRefusal;
use crate::store::{Activity, Record, Store, VerifyRequest};
use crate::task::{clock_synced, stopped};

/// How long a reader configured for the secure channel may answer without it before it is
/// refused with an alarm (the handshake takes a few polls).
pub const SECURE_GRACE: Duration = Duration::from_secs(10);
/// Unreadable card reads are recorded at most this often per reader (all are counted).
pub const UNREADABLE_EVERY: Duration = Duration::from_secs(60);
/// A reader not online this long after the port opened is reported offline (once).
pub const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(15);
/// How long a stopping bus waits for decisions in flight to reach their readers.
const STOP_WITHIN: Duration = Duration::from_secs(2);

/// One reader on an OSDP bus, as the bus task serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaderSpec {
    pub address: Address,
    pub door: DoorId,
    pub name: String,
    /// What its raw card data is.
    pub raw_as: RawAs,
    pub keypad: KeypadRules,
    pub feedback: Feedback,
    /// The input the door contact is wired to, if any.
    pub door_contact: Option<u8>,
    /// How long the door may stay open before a held-open alarm.
    pub held_open: Duration,
    pub scbk: Option<[u8; 16]>,
    /// `EnforceSecure`: the reader must use the secure channel with `scbk`.
    pub secure: bool,
}

/// One OSDP bus.
#[derive(Clone, Debug)]
pub struct OsdpBusSpec {
    pub name: String,
    pub port: PathBuf,
    pub baud: u32,
    pub rs485: Option<Rs485>,
    pub readers: Vec<ReaderSpec>,
}

impl OsdpBusSpec {
    /// The line thread's view: port and readers.
    pub fn line(&self) -> LineSpec {
        LineSpec {
            name: self.name.clone(),
            port: self.port.clone(),
            baud: self.baud,
            rs485: self.rs485.clone(),
            pds: self
                .readers
                .iter()
                .map(|r| PdSpec {
                    address: r.address.get(),
                    name: r.name.clone(),
                    scbk: r.scbk,
                    enforce_secure: r.secure,
                })
                .collect(),
        }
    }

    /// The doors this bus serves, for the router.
    pub fn units(&self) -> Vec<crate::drivers::bus::UnitSpec> {
        self.readers
            .iter()
            .map(|r| crate::drivers::bus::UnitSpec {
                address: r.address,
                door: r.door.clone(),
            })
            .collect()
    }
}

/// What the task keeps of one reader.
struct Reader {
    spec: ReaderSpec,
    label: UnitId,
    keypad: Keypad,
    contact: Option<DoorContact>,
    online: bool,
    /// Since when it has answered without the secure channel it must use.
    insecure_since: Option<Duration>,
    /// The insecure-reader alarm was raised and not yet cleared.
    refused: bool,
    /// A reader not online by then (after the port opened) is reported offline once.
    expected_by: Option<Duration>,
    /// Unreadable card reads, and when the last one was recorded (at most one record per
    /// [`UNREADABLE_EVERY`], so a broken reader cannot flood the outbox).
    unreadable: u64,
    unreadable_recorded: Option<Duration>,
    tamper: Option<bool>,
    power: Option<bool>,
}

/// Runs one OSDP bus until `shutdown` turns true.
pub async fn run_osdp_bus(
    spec: OsdpBusSpec,
    store: Store,
    router: Arc<DoorRouter>,
    mut commands: mpsc::Receiver<Queued>,
    status: Arc<Mutex<BusStatus>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let line = match cp::spawn(spec.line(), events_tx) {
        Ok(line) => line,
        Err(e) => {
            tracing::error!(bus = %spec.name, error = %e, "OSDP bus not started: no thread for its line");
            return;
        }
    };
    let start = Instant::now();
    let (decided_tx, mut decided) = mpsc::channel::<(usize, Decision)>(64);
    let mut bus = Bus {
        decided: decided_tx,
        readers: spec
            .readers
            .iter()
            .map(|r| Reader {
                label: UnitId::on(&spec.name, r.address.get()),
                keypad: Keypad::new(r.keypad),
                contact: r.door_contact.map(|_| DoorContact::new(r.held_open)),
                online: false,
                insecure_since: None,
                refused: false,
                expected_by: None,
                unreadable: 0,
                unreadable_recorded: None,
                tamper: None,
                power: None,
                spec: r.clone(),
            })
            .collect(),
        spec: &spec,
        store: &store,
        router: &router,
        status: &status,
        line: &line,
        start,
        in_flight: 0,
    };
    let mut stop_by: Option<Instant> = None;
    loop {
        if let Some(by) = stop_by
            && (bus.in_flight == 0 || Instant::now() >= by)
        {
            break;
        }
        let wake = bus.next_deadline().map(|d| start + d);
        tokio::select! {
            // A reader reported something (or the line changed state).
            Some(event) = events.recv() => bus.on_event(event),
            // A decision is on disk: show it at its reader.
            Some((pd, decision)) = decided.recv() => {
                bus.in_flight = bus.in_flight.saturating_sub(1);
                bus.answer(pd, &decision);
            }
            // A door release routed to this bus (inner door, remote open).
            Some((unit, command, expires, done)) = commands.recv(), if stop_by.is_none() => {
                if Instant::now() > expires {
                    finish(done, CommandOutcome::Expired);
                } else {
                    let outcome = bus.command(unit, &command);
                    finish(done, outcome);
                }
            }
            // A keypad's inter-key timeout or a door's held-open time passed.
            () = sleep_until(wake) => bus.on_timeout(),
            // Stop asked for: finish what is being decided, for at most 2 s.
            () = stopped(&mut shutdown), if stop_by.is_none() => {
                stop_by = Some(Instant::now() + STOP_WITHIN);
            }
        }
    }
    // The answers just sent need a refresh or two to leave.
    tokio::time::sleep(cp::TICK * 4).await;
    let _ = tokio::task::spawn_blocking(move || line.stop()).await;
}

struct Bus<'a> {
    readers: Vec<Reader>,
    /// Decisions on disk come back here, to be shown at their reader.
    decided: mpsc::Sender<(usize, Decision)>,
    spec: &'a OsdpBusSpec,
    store: &'a Store,
    router: &'a Arc<DoorRouter>,
    status: &'a Mutex<BusStatus>,
    line: &'a cp::CpHandle,
    start: Instant,
    in_flight: usize,
}

impl Bus<'_> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.readers
            .iter()
            .flat_map(|r| {
                [
                    r.keypad.deadline(),
                    r.contact.as_ref().and_then(DoorContact::deadline),
                    r.insecure_since
                        .filter(|_| !r.refused)
                        .map(|t| t + SECURE_GRACE),
                    r.expected_by,
                ]
            })
            .flatten()
            .min()
    }

    fn on_timeout(&mut self) {
        let now = self.now();
        for pd in 0..self.readers.len() {
            if let Some(KeypadEvent::Pin(pin)) = self.readers[pd].keypad.on_timeout(now) {
                self.decide(pd, CredentialKind::Pin, pin);
            }
            let held = self.readers[pd]
                .contact
                .as_mut()
                .and_then(|c| c.on_timeout(now));
            if let Some(event) = held {
                self.door_event(pd, event);
            }
            let r = &self.readers[pd];
            if !r.refused && r.insecure_since.is_some_and(|t| now >= t + SECURE_GRACE) {
                self.refuse_insecure(pd);
            }
            let r = &mut self.readers[pd];
            if r.expected_by.is_some_and(|t| now >= t) {
                r.expected_by = None;
                if !r.online && !r.refused {
                    let (label, door) = (r.label.clone(), r.spec.door.clone());
                    tracing::warn!(bus = %self.spec.name, reader = %label, %door,
                        "OSDP reader does not answer (check its wiring, address and baud rate)");
                    self.append(Record::UnitReachability {
                        at: Timestamp::now(),
                        unit: label,
                        door,
                        online: false,
                    });
                }
            }
        }
    }

    fn on_event(&mut self, event: CpEvent) {
        let now = self.now();
        match event {
            CpEvent::Port { open, error } => {
                if open {
                    tracing::info!(bus = %self.spec.name, port = %self.spec.port.display(), baud = self.spec.baud, "OSDP port open");
                    for r in &mut self.readers {
                        if !r.online {
                            r.expected_by = Some(now + FIRST_ANSWER_WITHIN);
                        }
                    }
                } else {
                    set_status(self.status, |s| s.reopens += 1);
                    tracing::debug!(bus = %self.spec.name, error = error.as_deref().unwrap_or("-"), "OSDP port closed");
                }
                set_status(self.status, |s| s.port_open = open);
            }
            CpEvent::State {
                pd,
                online,
                secure,
                answers,
            } => self.state(pd, online, secure, answers),
            CpEvent::Card {
                pd,
                format,
                bits,
                data,
            } => {
                let Some(r) = self.readers.get(pd) else {
                    return;
                };
                self.seen(pd);
                match reader::credential(r.spec.raw_as, format, bits, &data) {
                    Ok((kind, value)) => self.decide(pd, kind, value),
                    Err(e) => self.unreadable(pd, format, bits, &e, now),
                }
            }
            CpEvent::Keys { pd, keys } => {
                let Some(r) = self.readers.get_mut(pd) else {
                    return;
                };
                let events = r.keypad.keys(&keys, now);
                self.seen(pd);
                for event in events {
                    match event {
                        KeypadEvent::Pin(pin) => self.decide(pd, CredentialKind::Pin, pin),
                        KeypadEvent::Cleared(ClearedBy::TooLong) => {
                            tracing::info!(bus = %self.spec.name, reader = %self.readers[pd].label, "keypad input too long: cleared");
                        }
                        KeypadEvent::Cleared(_) => {}
                    }
                }
            }
            CpEvent::Local { pd, tamper, power } => self.local(pd, tamper, power),
            CpEvent::Inputs { pd, inputs } => {
                let Some(r) = self.readers.get_mut(pd) else {
                    return;
                };
                let Some(input) = r.spec.door_contact else {
                    return;
                };
                let Some(&open) = inputs.get(usize::from(input)) else {
                    return;
                };
                let event = r.contact.as_mut().and_then(|c| c.input(open, now));
                self.seen(pd);
                if let Some(event) = event {
                    self.door_event(pd, event);
                }
            }
            CpEvent::Other { pd } => self.seen(pd),
        }
    }

    /// A card read that is no credential: refused at the reader, and recorded as a denial
    /// (coalesced: at most one record per reader per [`UNREADABLE_EVERY`]; the log line has
    /// the count).
    fn unreadable(
        &mut self,
        pd: usize,
        format: CardFormat,
        bits: usize,
        error: &reader::ReadError,
        now: Duration,
    ) {
        let r = &mut self.readers[pd];
        r.unreadable += 1;
        let deny = Decision::deny(DenyReason::UnknownCredential);
        let actions = reader::on_decision(&r.spec.feedback, &deny);
        let due = r
            .unreadable_recorded
            .is_none_or(|t| now >= t + UNREADABLE_EVERY);
        if due {
            r.unreadable_recorded = Some(now);
            tracing::warn!(bus = %self.spec.name, reader = %r.label, door = %r.spec.door,
                format = ?format, bits, %error, unreadable = r.unreadable,
                "unreadable card read refused");
            let kind = match (r.spec.raw_as, format) {
                (RawAs::Qr, CardFormat::Raw) => CredentialKind::Qr,
                (RawAs::Mobile, CardFormat::Raw) => CredentialKind::Mobile,
                _ => CredentialKind::Card,
            };
            let record = Record::Activity(Activity {
                at: Timestamp::now(),
                door: r.spec.door.clone(),
                unit: r.label.clone(),
                request_id: None,
                credential_kind: kind,
                key_id: None,
                category: None,
                granted: false,
                reason: Some(DenyReason::UnknownCredential),
                released: Vec::new(),
                command_id: None,
                issuer: None,
            });
            self.append(record);
        } else {
            tracing::debug!(bus = %self.spec.name, reader = %r.label, %error, "unreadable card read refused");
        }
        self.act(pd, actions);
    }

    fn seen(&self, pd: usize) {
        let Some(r) = self.readers.get(pd) else {
            return;
        };
        set_status(self.status, |s| {
            let u = s.units.entry(r.spec.address.get()).or_default();
            u.last_seen = Some(Timestamp::now());
        });
    }

    fn state(&mut self, pd: usize, online: bool, secure: bool, answers: bool) {
        let now = self.now();
        let Some(r) = self.readers.get_mut(pd) else {
            return;
        };
        let was_online = r.online;
        r.online = online;
        if online {
            r.expected_by = None;
        }
        // Answering without the secure channel it must use (libosdp keeps such a reader
        // offline under EnforceSecure): refused, with an alarm, after a grace period.
        if r.spec.secure && !secure && (online || answers) {
            r.insecure_since.get_or_insert(now);
        } else {
            r.insecure_since = None;
            if r.refused && online && secure {
                r.refused = false;
                tracing::info!(bus = %self.spec.name, reader = %r.label, door = %r.spec.door, "reader's secure channel is up again");
            }
        }
        if online == was_online {
            return;
        }
        let (label, door, address) = (r.label.clone(), r.spec.door.clone(), r.spec.address);
        if online {
            tracing::info!(bus = %self.spec.name, reader = %label, %door, secure, "OSDP reader online");
        } else {
            tracing::warn!(bus = %self.spec.name, reader = %label, %door, "OSDP reader offline: it stopped answering polls");
        }
        set_status(self.status, |s| {
            let u = s.units.entry(address.get()).or_default();
            u.online = online;
            if online {
                u.last_seen = Some(Timestamp::now());
            }
        });
        self.append(Record::UnitReachability {
            at: Timestamp::now(),
            unit: label,
            door,
            online,
        });
    }

    fn refuse_insecure(&mut self, pd: usize) {
        let r = &mut self.readers[pd];
        r.refused = true;
        tracing::warn!(bus = %self.spec.name, reader = %r.label, door = %r.spec.door,
            "OSDP reader answers without the secure channel it is configured for (wrong or no key): refused");
        let record = Record::ReaderRefused {
            at: Timestamp::now(),
            unit: r.label.clone(),
            door: r.spec.door.clone(),
            reason: ReaderRefusal::NoSecureChannel,
        };
        self.append(record);
    }

    fn local(&mut self, pd: usize, tamper: bool, power: bool) {
        let Some(r) = self.readers.get_mut(pd) else {
            return;
        };
        // News: a change from a known state, or an alarm in the first report.
        let tamper_news = r.tamper.replace(tamper).map_or(tamper, |was| was != tamper);
        let power_news = r.power.replace(power).map_or(power, |was| was != power);
        let (label, door) = (r.label.clone(), r.spec.door.clone());
        self.seen(pd);
        let at = Timestamp::now();
        if tamper_news {
            if tamper {
                tracing::warn!(bus = %self.spec.name, reader = %label, %door, "reader tamper");
            }
            self.append(Record::Tamper {
                at,
                unit: label.clone(),
                door: door.clone(),
                active: tamper,
            });
        }
        if power_news {
            if power {
                tracing::warn!(bus = %self.spec.name, reader = %label, %door, "reader reports a power failure");
            }
            self.append(Record::PowerFailure {
                at,
                unit: label,
                door,
                active: power,
            });
        }
    }

    fn door_event(&mut self, pd: usize, event: crate::bus::message::DoorEventKind) {
        use crate::bus::message::DoorEventKind;
        let r = &self.readers[pd];
        match event {
            DoorEventKind::ForcedOpen => {
                tracing::warn!(bus = %self.spec.name, reader = %r.label, door = %r.spec.door, "door forced open");
            }
            DoorEventKind::HeldOpen => {
                tracing::warn!(bus = %self.spec.name, reader = %r.label, door = %r.spec.door, "door held open");
            }
            DoorEventKind::Opened | DoorEventKind::Closed => {}
        }
        self.append(Record::DoorEvent {
            at: Timestamp::now(),
            unit: r.label.clone(),
            door: r.spec.door.clone(),
            event,
        });
    }

    /// Decides a credential; the answer comes back through `decided` once it is on disk.
    fn decide(&mut self, pd: usize, kind: CredentialKind, secret: Vec<u8>) {
        let r = &self.readers[pd];
        let (label, door) = (r.label.clone(), r.spec.door.clone());
        // Handed to the store's writer now (see `Store::verify`).
        let verdict = self.store.verify(VerifyRequest {
            unit: label.clone(),
            door: door.clone(),
            request_id: None,
            kind,
            secret,
            now: Timestamp::now(),
            clock_synced: clock_synced(),
            // libosdp repeats and deduplicates at the link layer: a card read is one event.
            retransmit: None,
        });
        self.in_flight += 1;
        let router = Arc::clone(self.router);
        let decided = self.decided.clone();
        let bus = self.spec.name.clone();
        tokio::spawn(async move {
            let decision = match verdict.await {
                Ok(verdict) => {
                    log_decision(&label, &door, &verdict.decision, verdict.key_id.as_deref());
                    if let Decision::Grant(grant) = &verdict.decision {
                        release_elsewhere(&router, &door, &grant.doors);
                    }
                    verdict.decision
                }
                Err(e) => {
                    tracing::error!(%bus, unit = %label, %door, error = %e, "decision failed");
                    Decision::deny(DenyReason::NotRecorded)
                }
            };
            let _ = decided.send((pd, decision)).await;
        });
    }

    fn answer(&mut self, pd: usize, decision: &Decision) {
        let now = self.now();
        let Some(r) = self.readers.get_mut(pd) else {
            return;
        };
        if decision.is_grant()
            && r.spec.feedback.relay.is_some()
            && let Some(contact) = r.contact.as_mut()
        {
            contact.release(now, r.spec.feedback.pulse);
        }
        let actions = reader::on_decision(&r.spec.feedback, decision);
        self.act(pd, actions);
    }

    fn act(&self, pd: usize, actions: Vec<Action>) {
        for action in actions {
            if !self.line.send(CpCommand::Act { pd, action }) {
                tracing::error!(bus = %self.spec.name, "OSDP line thread is gone");
                return;
            }
        }
    }

    /// A command the router sent for one of this bus's doors.
    fn command(&mut self, unit: Address, command: &Command) -> CommandOutcome {
        let now = self.now();
        let Some(pd) = self.readers.iter().position(|r| r.spec.address == unit) else {
            return CommandOutcome::NoAnswer;
        };
        let r = &mut self.readers[pd];
        match command {
            Command::OpenDoor(_) => {
                let Some(output) = r.spec.feedback.relay else {
                    tracing::warn!(bus = %self.spec.name, reader = %r.label, "door release for a reader with no relay output");
                    return CommandOutcome::NoAnswer;
                };
                if !r.online {
                    tracing::warn!(bus = %self.spec.name, reader = %r.label, "door release for an offline reader");
                    return CommandOutcome::NoAnswer;
                }
                // The reader's own release time, not the one the router asks every unit for
                // (`OPEN_PULSE_MS`): this reader's strike is configured.
                let time = r.spec.feedback.pulse;
                if let Some(contact) = r.contact.as_mut() {
                    contact.release(now, time);
                }
                self.act(pd, vec![Action::Pulse { output, time }]);
                CommandOutcome::Done
            }
            // Door-unit settings and the time have no OSDP counterpart here.
            Command::Settings(_) | Command::Time(_) => CommandOutcome::Unsupported,
        }
    }

    fn append(&self, record: Record) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.append(vec![record]).await {
                tracing::error!(error = %e, "a reader record could not be stored");
            }
        });
    }
}
