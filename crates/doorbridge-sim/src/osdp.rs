//! Simulated OSDP readers: the Peripheral Device (PD) side of an OSDP line, for
//! `door-sim --osdp`, tests, the demo and installers (`docs/door-sim.md`, "OSDP readers").
//!
//! The gateway is the line's Control Panel (`docs/osdp.md`). Here every reader is a libosdp
//! `PeripheralDevice` with the capabilities of a card reader with keypad: 4 outputs, an LED, a
//! buzzer, a text display, 4 inputs, the secure channel and card data. With a secure channel
//! base key (SCBK) it uses that key; without one libosdp puts it in install mode (it accepts the
//! default key SCBK-D and takes the key the CP sends with `osdp_KEYSET`, which is reported).
//!
//! - The pure part: [`parse_line`] (the command language), [`event`] (a command as the OSDP
//!   event the reader sends), [`Readers`] (what the gateway told each reader as [`Output`]s,
//!   and which presented credential each decision answers), [`Output::to_json`].
//! - The line thread ([`spawn`]): owns every reader's `PeripheralDevice` and the line. Every
//!   byte read from the line goes to every reader's receive buffer (a multi-drop line: libosdp
//!   skips packets for other addresses); each reader writes its replies to the line. The
//!   readers are refreshed every [`TICK`] (libosdp asks for 50 ms at most). Its handle
//!   ([`ReadersHandle`]) takes [`ReaderCommand`]s and waits for decisions
//!   ([`ReadersHandle::decided`], the `wait-decision` command).
//!
//! ```text
//! let (master, device) = linked_line(Path::new("/tmp/ttyOSDP"))?;
//! let (tx, mut outputs) = tokio::sync::mpsc::unbounded_channel();
//! let readers = spawn(master, &SimLine::pty(vec![ReaderSpec { address: 1, scbk: Some(key) }]), tx)?;
//! readers.send(ReaderCommand { unit: 1, input: ReaderInput::card("26:0a1b2c40")? });
//! readers.decided(1).await?;
//! while let Some(o) = outputs.recv().await { println!("{}", o.to_json()); }
//! ```
//!
//! What libosdp asks of the application, and is kept here: the command callback always
//! answers 0 (a NAK takes the reader offline at the CP for 30 s); the channel's `flush`
//! discards what the reader has received (libosdp calls it before each reply); a write goes
//! out whole; nothing called from libosdp's C core may panic (it would abort the process).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use libosdp::{
    Channel, ChannelError, OsdpCommand, OsdpCommandLed, OsdpEvent, OsdpEventCardRead,
    OsdpEventKeyPress, OsdpLedColor, OsdpStatusReport, OsdpStatusReportType, PdCapEntity,
    PdCapability, PdId, PdInfoBuilder, PeripheralDevice,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::JsonLine;
use super::script::{DEFAULT_WAIT, parse_duration, parse_unit};
use doorbridge::osdp::keypad::{KEY_CLEAR, KEY_ENTER, MAX_DIGITS};
use doorbridge_proto::access::credential::{card_value, format_card, parse_card};

/// How often the readers are refreshed and commands picked up.
pub const TICK: Duration = Duration::from_millis(5);
/// A credential without a decision this long after it was presented is given up (a
/// `gave_up` line), as a door unit gives up on a verify.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// The outputs each reader has (0 to 3).
pub const OUTPUTS: u8 = 4;
/// The inputs each reader has; the door contact is input 0. An input status report always
/// carries all of them (libosdp's CP takes a reader with another count offline).
pub const INPUTS: usize = 4;
/// The most bytes one card read, raw read or key press carries (libosdp's event buffers).
pub const MAX_EVENT_BYTES: usize = 64;
/// The line speeds libosdp accepts.
pub const BAUDS: [u32; 6] = [9600, 19_200, 38_400, 57_600, 115_200, 230_400];
/// Bytes kept per reader when it does not consume what it receives (it always should).
const MAX_RX_BACKLOG: usize = 64 * 1024;
/// The longest a write waits for room in the line's buffer.
const WRITE_WITHIN: Duration = Duration::from_millis(50);
/// Why libosdp refuses an event: its pool holds 3 per reader (libosdp 3.2.7).
const QUEUE_FULL: &str =
    "libosdp's event queue is full: a reader holds 3 events until the gateway polls it";
/// While nobody has the other end of a pty open, how long to wait before reading again.
const HANGUP_BACKOFF: Duration = Duration::from_millis(100);

// ----------------------------------------------------------------------------------------
// What happens at a reader
// ----------------------------------------------------------------------------------------

/// One reader on the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaderSpec {
    /// Its OSDP address, 0 to 126.
    pub address: u8,
    /// Its secure channel base key; `None`: install mode (SCBK-D, and the key the CP sets).
    pub scbk: Option<[u8; 16]>,
}

/// Something that happens at a reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReaderInput {
    /// A card read (`osdp_RAW`, Wiegand): `bits` bits, most significant first, in
    /// `bits.div_ceil(8)` bytes.
    Card { bits: usize, data: Vec<u8> },
    /// Raw data of unspecified format (`osdp_RAW`): a QR code or a phone's token.
    Raw(Vec<u8>),
    /// Keys typed (`osdp_KEYPAD`): ASCII digits, 0x0D for `#`, 0x7F for `*`.
    Keys(Vec<u8>),
    /// The door contact on input 0 (`osdp_ISTATR`): open is active.
    Door { open: bool },
    /// The housing opened (`osdp_LSTATR`).
    Tamper { on: bool },
    /// The power failed (`osdp_LSTATR`).
    Power { lost: bool },
}

impl ReaderInput {
    /// A card written `BITS:HEX` (`26:0a1b2c40`), as the keys file writes it.
    pub fn card(text: &str) -> Result<ReaderInput, String> {
        let value = parse_card(text)?;
        let bits = usize::from(u16::from_be_bytes([value[0], value[1]]));
        Ok(ReaderInput::Card {
            bits,
            data: value[2..].to_vec(),
        })
    }

    /// A PIN typed and ended with `#`.
    pub fn pin(digits: &str) -> ReaderInput {
        let mut keys = digits.as_bytes().to_vec();
        keys.push(KEY_ENTER);
        ReaderInput::Keys(keys)
    }

    /// The command's word in the command language.
    pub fn word(&self) -> &'static str {
        match self {
            ReaderInput::Card { .. } => "card",
            ReaderInput::Raw(_) => "qr",
            ReaderInput::Keys(_) => "keys",
            ReaderInput::Door { .. } => "door",
            ReaderInput::Tamper { .. } => "tamper",
            ReaderInput::Power { .. } => "power",
        }
    }
}

/// [`ReaderInput`] at the reader with address `unit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaderCommand {
    pub unit: u8,
    pub input: ReaderInput,
}

/// A reader's inputs and local status, as its status reports (and answers to status polls)
/// carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStatus {
    /// Active inputs (input 0: the door contact, active = open).
    pub inputs: [bool; INPUTS],
    pub tamper: bool,
    pub power_lost: bool,
}

impl ReaderStatus {
    /// The input status report: one entry per input.
    pub fn input_report(&self) -> OsdpStatusReport {
        status_report(OsdpStatusReportType::Input, &self.inputs)
    }

    /// The local status report: tamper, then power.
    pub fn local_report(&self) -> OsdpStatusReport {
        status_report(OsdpStatusReportType::Local, &[self.tamper, self.power_lost])
    }

    /// Fills in the answer to a status poll (`osdp_ISTAT`, `osdp_LSTAT`, `osdp_OSTAT`).
    fn answer(self, asked: &mut OsdpStatusReport) {
        match asked.type_ {
            OsdpStatusReportType::Input => *asked = self.input_report(),
            OsdpStatusReportType::Local => *asked = self.local_report(),
            OsdpStatusReportType::Output => {
                *asked = status_report(OsdpStatusReportType::Output, &[false; OUTPUTS as usize]);
            }
            OsdpStatusReportType::Remote => {}
        }
    }
}

fn status_report(kind: OsdpStatusReportType, entries: &[bool]) -> OsdpStatusReport {
    let mut report = [0u8; 64];
    for (slot, &on) in report.iter_mut().zip(entries) {
        *slot = u8::from(on);
    }
    OsdpStatusReport {
        type_: kind,
        nr_entries: entries.len(),
        report,
    }
}

/// The OSDP event a reader sends for `input`; `status` is updated (door, tamper, power).
pub fn event(input: &ReaderInput, status: &mut ReaderStatus) -> Result<OsdpEvent, String> {
    match input {
        ReaderInput::Card { bits, data } => {
            if *bits == 0 || data.len() != bits.div_ceil(8) || data.len() > MAX_EVENT_BYTES {
                return Err(format!(
                    "a card of {bits} bits in {} bytes cannot be sent (1 to {} bits, in whole bytes)",
                    data.len(),
                    MAX_EVENT_BYTES * 8
                ));
            }
            OsdpEventCardRead::new_wiegand(*bits, data.clone())
                .map(OsdpEvent::CardRead)
                .map_err(|e| e.to_string())
        }
        ReaderInput::Raw(data) | ReaderInput::Keys(data) => {
            if data.is_empty() || data.len() > MAX_EVENT_BYTES {
                return Err(format!(
                    "{} bytes cannot be sent (1 to {MAX_EVENT_BYTES})",
                    data.len()
                ));
            }
            Ok(match input {
                ReaderInput::Raw(_) => {
                    OsdpEvent::CardRead(OsdpEventCardRead::new_raw(data.clone()))
                }
                _ => OsdpEvent::KeyPress(OsdpEventKeyPress::new(data.clone())),
            })
        }
        ReaderInput::Door { open } => {
            status.inputs[0] = *open;
            Ok(OsdpEvent::Status(status.input_report()))
        }
        ReaderInput::Tamper { on } => {
            status.tamper = *on;
            Ok(OsdpEvent::Status(status.local_report()))
        }
        ReaderInput::Power { lost } => {
            status.power_lost = *lost;
            Ok(OsdpEvent::Status(status.local_report()))
        }
    }
}

// ----------------------------------------------------------------------------------------
// What the gateway tells the readers, and which credential a decision answers
// ----------------------------------------------------------------------------------------

/// What kind of credential was presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Card,
    Pin,
    Qr,
}

impl Request {
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Card => "card",
            Request::Pin => "pin",
            Request::Qr => "qr",
        }
    }
}

/// A credential presented at a reader, as the lines name it: a card `BITS:HEX`, a PIN's
/// digits, a QR token's text (`hex:…` for bytes that are not printable text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub request: Request,
    pub text: String,
}

/// One thing to report: what the gateway told a reader, a decision, a state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The reader's online or secure-channel state changed (online: the CP addressed it
    /// within libosdp's 8 s; secure: a secure channel with its own key, not SCBK-D).
    State {
        unit: u8,
        online: bool,
        secure: bool,
    },
    /// `osdp_OUT`. `control` is OSDP's control code (5: on for `time_ms`, then off).
    Out {
        unit: u8,
        output_no: u8,
        control: u8,
        time_ms: u32,
    },
    /// `osdp_LED`: the colour shown, for `time_ms` (`None`: permanently).
    Led {
        unit: u8,
        led_no: u8,
        color: &'static str,
        time_ms: Option<u32>,
    },
    /// `osdp_BUZ`.
    Buzzer {
        unit: u8,
        count: u8,
        on_ms: u32,
        off_ms: u32,
    },
    /// `osdp_TEXT`.
    Text { unit: u8, text: String },
    /// `osdp_KEYSET`: the reader's new secure channel base key (kept in memory only).
    KeySet { unit: u8, scbk: [u8; 16] },
    /// Another command (manufacturer specific, `osdp_COMSET`…), acknowledged.
    Command { unit: u8, command: &'static str },
    /// The gateway's decision for `credential`: a grant (an output switched on or a green
    /// LED) or a deny (a red LED), `after` the credential was presented.
    Decision {
        unit: u8,
        grant: bool,
        credential: Credential,
        via: &'static str,
        after: Duration,
    },
    /// No decision came for `credential` within [`GIVE_UP_AFTER`].
    GaveUp { unit: u8, credential: Credential },
    /// A command could not be carried out (no such reader, libosdp's event queue full…).
    Rejected {
        unit: u8,
        command: &'static str,
        error: String,
    },
}

impl Output {
    /// The unit whose presented credential this output settles (a decision or a give-up).
    pub fn settles(&self) -> Option<u8> {
        match self {
            Output::Decision { unit, .. } | Output::GaveUp { unit, .. } => Some(*unit),
            _ => None,
        }
    }

    /// The output as one JSON line (`docs/door-sim.md`).
    pub fn to_json(&self) -> JsonLine {
        let about =
            |unit: u8, kind: &'static str| JsonLine::new().with("unit", unit).with("type", kind);
        match self {
            Output::State {
                unit,
                online,
                secure,
            } => about(*unit, "state")
                .with("online", *online)
                .with("secure", *secure),
            Output::Out {
                unit,
                output_no,
                control,
                time_ms,
            } => about(*unit, "output")
                .with("output_no", *output_no)
                .with("control", *control)
                .with("time_ms", *time_ms),
            Output::Led {
                unit,
                led_no,
                color,
                time_ms,
            } => about(*unit, "led")
                .with("led_no", *led_no)
                .with("color", *color)
                .with("time_ms", *time_ms),
            Output::Buzzer {
                unit,
                count,
                on_ms,
                off_ms,
            } => about(*unit, "buzzer")
                .with("count", *count)
                .with("on_ms", *on_ms)
                .with("off_ms", *off_ms),
            Output::Text { unit, text } => about(*unit, "text").with("text", text.clone()),
            Output::KeySet { unit, scbk } => about(*unit, "keyset").with("scbk", hex(scbk)),
            Output::Command { unit, command } => about(*unit, "command").with("command", *command),
            Output::Decision {
                unit,
                grant,
                credential,
                via,
                after,
            } => about(*unit, if *grant { "grant" } else { "deny" })
                .with("request", credential.request.as_str())
                .with("credential", credential.text.clone())
                .with("via", *via)
                .with("after_ms", millis(*after)),
            Output::GaveUp { unit, credential } => about(*unit, "gave_up")
                .with("request", credential.request.as_str())
                .with("credential", credential.text.clone())
                .with("reason", "timeout"),
            Output::Rejected {
                unit,
                command,
                error,
            } => about(*unit, "error")
                .with("command", *command)
                .with("error", error.clone()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, b| {
        let _ = write!(text, "{b:02x}");
        text
    })
}

/// OSDP counts times in 100 ms.
fn tenths_ms(count: u16) -> u32 {
    u32::from(count) * 100
}

fn color_name(color: OsdpLedColor) -> &'static str {
    match color {
        OsdpLedColor::None => "none",
        OsdpLedColor::Red => "red",
        OsdpLedColor::Green => "green",
        OsdpLedColor::Amber => "amber",
        OsdpLedColor::Blue => "blue",
        OsdpLedColor::Magenta => "magenta",
        OsdpLedColor::Cyan => "cyan",
        OsdpLedColor::Unknown(_) => "unknown",
    }
}

/// The colour an LED command shows and for how long: its temporary state if it sets one
/// (control code 2), else its permanent state if it sets one (1), else none.
fn led_shown(led: &OsdpCommandLed) -> (OsdpLedColor, Option<u32>) {
    if led.temporary.control_code == 2 {
        (
            led.temporary.on_color,
            Some(tenths_ms(led.temporary.timer_count)),
        )
    } else if led.permanent.control_code == 1 {
        (led.permanent.on_color, None)
    } else {
        (OsdpLedColor::None, None)
    }
}

/// One reader's credentials waiting for a decision.
#[derive(Clone, Debug, Default)]
struct Unit {
    address: u8,
    /// Presented credentials without a decision yet, oldest first, with when.
    pending: VecDeque<(Credential, Duration)>,
    /// Digits typed and not yet ended with `#` (or cleared), and when the last came.
    typed: String,
    typed_at: Duration,
    /// A grant was taken from an output switched on: the green LED that follows is its own.
    led_owed: bool,
    presented: u64,
    settled: u64,
    scbk: Option<[u8; 16]>,
}

/// The readers' side of the decisions (pure: no I/O, time passed in as the time since any
/// fixed start).
///
/// A credential is presented by a card, a raw read, or keys ending a PIN with `#`. The
/// gateway answers each with exactly one LED command (green for a grant, red for a deny),
/// a grant's outputs switched on before it: so the first output switched on or green LED
/// after a credential is presented is its grant (the LED that follows an output belongs to
/// the same grant), and a red LED its deny. Decisions come in the order the credentials
/// were presented. A decision with nothing presented but digits typed (a reader whose PINs
/// need no `#`) answers those digits.
#[derive(Clone, Debug, Default)]
pub struct Readers {
    units: Vec<Unit>,
}

impl Readers {
    pub fn new(readers: &[ReaderSpec]) -> Readers {
        Readers {
            units: readers
                .iter()
                .map(|r| Unit {
                    address: r.address,
                    scbk: r.scbk,
                    ..Unit::default()
                })
                .collect(),
        }
    }

    fn unit(&mut self, address: u8) -> Option<&mut Unit> {
        self.units.iter_mut().find(|u| u.address == address)
    }

    /// `input` happened at `unit` (and went to the reader) at `now`.
    pub fn present(&mut self, unit: u8, input: &ReaderInput, now: Duration) {
        let Some(u) = self.unit(unit) else {
            return;
        };
        let credential = |request, text| Credential { request, text };
        match input {
            ReaderInput::Card { bits, data } => {
                let text = card_value(*bits, data)
                    .map_or_else(|_| format!("{bits}:{}", hex(data)), |v| format_card(&v));
                u.push(credential(Request::Card, text), now);
            }
            ReaderInput::Raw(data) => u.push(credential(Request::Qr, token_text(data)), now),
            ReaderInput::Keys(keys) => {
                for &key in keys {
                    match key {
                        b'0'..=b'9' => {
                            // The gateway drops a PIN that grows too long.
                            if u.typed.len() == MAX_DIGITS {
                                u.typed.clear();
                            } else {
                                u.typed.push(char::from(key));
                                u.typed_at = now;
                            }
                        }
                        KEY_ENTER if !u.typed.is_empty() => {
                            let digits = std::mem::take(&mut u.typed);
                            u.push(credential(Request::Pin, digits), now);
                        }
                        KEY_CLEAR => u.typed.clear(),
                        _ => {}
                    }
                }
            }
            ReaderInput::Door { .. } | ReaderInput::Tamper { .. } | ReaderInput::Power { .. } => {}
        }
    }

    /// The gateway told `unit` to do `command` at `now`: what to report.
    pub fn told(&mut self, unit: u8, command: &OsdpCommand, now: Duration) -> Vec<Output> {
        let Some(u) = self.unit(unit) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match command {
            OsdpCommand::Output(o) => {
                out.push(Output::Out {
                    unit,
                    output_no: o.output_no,
                    control: o.control_code,
                    time_ms: tenths_ms(o.timer_count),
                });
                // 2 and 4: permanently on; 5: on for the time.
                if matches!(o.control_code, 2 | 4 | 5) && !u.led_owed {
                    out.extend(u.decide(true, "output", now));
                    u.led_owed = out.len() > 1;
                }
            }
            OsdpCommand::Led(led) => {
                let (color, time_ms) = led_shown(led);
                out.push(Output::Led {
                    unit,
                    led_no: led.led_number,
                    color: color_name(color),
                    time_ms,
                });
                match color {
                    OsdpLedColor::Green if std::mem::take(&mut u.led_owed) => {}
                    OsdpLedColor::Green => out.extend(u.decide(true, "led", now)),
                    OsdpLedColor::Red => {
                        u.led_owed = false;
                        out.extend(u.decide(false, "led", now));
                    }
                    _ => {}
                }
            }
            OsdpCommand::Buzzer(b) => out.push(Output::Buzzer {
                unit,
                count: b.rep_count,
                on_ms: u32::from(b.on_count) * 100,
                off_ms: u32::from(b.off_count) * 100,
            }),
            OsdpCommand::Text(t) => out.push(Output::Text {
                unit,
                text: String::from_utf8_lossy(&t.data).into_owned(),
            }),
            OsdpCommand::KeySet(k) => {
                if let Ok(scbk) = <[u8; 16]>::try_from(k.data.as_slice()) {
                    u.scbk = Some(scbk);
                    out.push(Output::KeySet { unit, scbk });
                }
            }
            // Status polls are answered from the reader's status; nothing to report.
            OsdpCommand::Status(_) => {}
            OsdpCommand::ComSet(_) => out.push(Output::Command {
                unit,
                command: "comset",
            }),
            OsdpCommand::ComSetDone(_) => out.push(Output::Command {
                unit,
                command: "comset_done",
            }),
            OsdpCommand::Mfg(_) => out.push(Output::Command {
                unit,
                command: "mfg",
            }),
            OsdpCommand::FileTx(_) => out.push(Output::Command {
                unit,
                command: "file_tx",
            }),
        }
        out
    }

    /// Gives up on credentials presented [`GIVE_UP_AFTER`] or longer before `now`.
    pub fn expire(&mut self, now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        for u in &mut self.units {
            while u
                .pending
                .front()
                .is_some_and(|(_, at)| now.saturating_sub(*at) >= GIVE_UP_AFTER)
            {
                if let Some((credential, _)) = u.pending.pop_front() {
                    u.settled += 1;
                    out.push(Output::GaveUp {
                        unit: u.address,
                        credential,
                    });
                }
            }
        }
        out
    }

    /// How many credentials were presented at `unit`, and how many of them are settled
    /// (decided or given up).
    pub fn counts(&self, unit: u8) -> (u64, u64) {
        self.units
            .iter()
            .find(|u| u.address == unit)
            .map_or((0, 0), |u| (u.presented, u.settled))
    }

    /// The key `unit` holds: as configured, or the one the gateway set (`osdp_KEYSET`).
    pub fn scbk(&self, unit: u8) -> Option<[u8; 16]> {
        self.units
            .iter()
            .find(|u| u.address == unit)
            .and_then(|u| u.scbk)
    }
}

impl Unit {
    fn push(&mut self, credential: Credential, now: Duration) {
        self.presented += 1;
        self.pending.push_back((credential, now));
    }

    fn decide(&mut self, grant: bool, via: &'static str, now: Duration) -> Option<Output> {
        let (credential, at) = if let Some(oldest) = self.pending.pop_front() {
            self.settled += 1;
            oldest
        } else if !self.typed.is_empty() {
            let digits = std::mem::take(&mut self.typed);
            (
                Credential {
                    request: Request::Pin,
                    text: digits,
                },
                self.typed_at,
            )
        } else {
            return None;
        };
        Some(Output::Decision {
            unit: self.address,
            grant,
            credential,
            via,
            after: now.saturating_sub(at),
        })
    }
}

/// A raw token as the command language writes it: its text, or `hex:…`.
fn token_text(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic()) => {
            text.to_owned()
        }
        _ => format!("hex:{}", hex(data)),
    }
}

// ----------------------------------------------------------------------------------------
// The command language
// ----------------------------------------------------------------------------------------

/// One parsed line of `door-sim --osdp`'s command language.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptLine {
    Reader(ReaderCommand),
    Sleep(Duration),
    /// Until every credential presented at `unit` so far has its decision (or was given
    /// up), or `timeout`.
    WaitDecision {
        unit: u8,
        timeout: Duration,
    },
    Quit,
}

/// Every command word with its form.
pub const USAGE: &[(&str, &str)] = &[
    ("card", "card UNIT BITS:HEX"),
    ("pin", "pin UNIT DIGITS"),
    ("keys", "keys UNIT KEYS"),
    ("qr", "qr UNIT TOKEN"),
    ("door", "door UNIT opened|closed"),
    ("tamper", "tamper UNIT on|off"),
    ("power", "power UNIT lost|ok"),
    ("sleep", "sleep DURATION"),
    ("wait-decision", "wait-decision UNIT [DURATION]"),
    ("quit", "quit"),
];

/// Parses one line: `Ok(None)` for a blank line or a comment (`#` first).
pub fn parse_line(line: &str) -> Result<Option<ScriptLine>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let word = words[0];
    let Some(&(_, form)) = USAGE.iter().find(|(w, _)| *w == word) else {
        let known: Vec<&str> = USAGE.iter().map(|(w, _)| *w).collect();
        return Err(format!(
            "unknown command {word:?}; commands: {}",
            known.join(", ")
        ));
    };
    let args = &words[1..];
    let usage = |problem: &str| format!("{problem}; usage: {form}");
    let wanted = form.split_whitespace().count() - 1;
    let optional = form.matches('[').count();
    if args.len() < wanted - optional {
        return Err(usage("missing argument"));
    }
    if args.len() > wanted {
        return Err(usage("too many arguments"));
    }
    let unit = || {
        parse_unit(args[0])
            .map(doorbridge_proto::bus::frame::Address::get)
            .map_err(|e| usage(&e.to_string()))
    };
    let reader = |input: Result<ReaderInput, String>| -> Result<Option<ScriptLine>, String> {
        Ok(Some(ScriptLine::Reader(ReaderCommand {
            unit: unit()?,
            input: input.map_err(|e| usage(&e))?,
        })))
    };
    match word {
        "card" => reader(ReaderInput::card(args[1])),
        "pin" => reader(parse_pin(args[1])),
        "keys" => reader(parse_keys(args[1])),
        "qr" => reader(parse_token(args[1]).map(ReaderInput::Raw)),
        "door" => {
            reader(two_ways(args[1], "opened", "closed").map(|open| ReaderInput::Door { open }))
        }
        "tamper" => reader(two_ways(args[1], "on", "off").map(|on| ReaderInput::Tamper { on })),
        "power" => reader(two_ways(args[1], "lost", "ok").map(|lost| ReaderInput::Power { lost })),
        "sleep" => Ok(Some(ScriptLine::Sleep(
            parse_duration(args[0]).map_err(|e| usage(&e.to_string()))?,
        ))),
        "wait-decision" => Ok(Some(ScriptLine::WaitDecision {
            unit: unit()?,
            timeout: match args.get(1) {
                Some(d) => parse_duration(d).map_err(|e| usage(&e.to_string()))?,
                None => DEFAULT_WAIT,
            },
        })),
        "quit" => Ok(Some(ScriptLine::Quit)),
        // USAGE names no other word.
        _ => Err(usage("not a command")),
    }
}

fn two_ways(word: &str, yes: &str, no: &str) -> Result<bool, String> {
    match word {
        w if w == yes => Ok(true),
        w if w == no => Ok(false),
        _ => Err(format!("{word:?} is neither {yes} nor {no}")),
    }
}

fn parse_pin(digits: &str) -> Result<ReaderInput, String> {
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "PIN {digits:?} is not digits (keys UNIT KEYS types '#' and '*')"
        ));
    }
    if digits.len() >= MAX_EVENT_BYTES {
        return Err(format!("a PIN has at most {} digits", MAX_EVENT_BYTES - 1));
    }
    Ok(ReaderInput::pin(digits))
}

fn parse_keys(text: &str) -> Result<ReaderInput, String> {
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{text:?} has a key a keypad lacks"));
    }
    if text.len() > MAX_EVENT_BYTES {
        return Err(format!("at most {MAX_EVENT_BYTES} keys at once"));
    }
    Ok(ReaderInput::Keys(
        text.bytes()
            .map(|b| match b {
                b'#' => KEY_ENTER,
                b'*' => KEY_CLEAR,
                other => other,
            })
            .collect(),
    ))
}

/// A token's bytes: its text, or `hex:0a1b2c`.
fn parse_token(text: &str) -> Result<Vec<u8>, String> {
    let data = match text.strip_prefix("hex:") {
        Some(digits) => {
            if digits.len() % 2 != 0 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{digits:?} is not hex bytes"));
            }
            (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap_or_default())
                .collect()
        }
        None => text.as_bytes().to_vec(),
    };
    if data.is_empty() || data.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "a token is 1 to {MAX_EVENT_BYTES} bytes, not {}",
            data.len()
        ));
    }
    Ok(data)
}

// ----------------------------------------------------------------------------------------
// The line thread
// ----------------------------------------------------------------------------------------

/// What the readers run on: a byte stream whose reads do not block (nothing to read is
/// `Ok(0)`, `WouldBlock` or `TimedOut`). A pty master or serial port from [`linked_line`] or
/// [`open_port`] is one.
pub trait Line: Read + Write + Send + 'static {}
impl<T: Read + Write + Send + 'static> Line for T {}

/// The line's settings and its readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimLine {
    /// The line speed the readers are set to (one of [`BAUDS`]).
    pub baud: u32,
    pub readers: Vec<ReaderSpec>,
    /// The line is a pty master: a read that fails means nobody has the other end open (yet,
    /// or any more), not a broken line; the readers wait for the gateway.
    pub pty: bool,
}

impl SimLine {
    /// `readers` on a pty at 115200 baud.
    pub fn pty(readers: Vec<ReaderSpec>) -> SimLine {
        SimLine {
            baud: 115_200,
            readers,
            pty: true,
        }
    }
}

/// Why the readers did not start.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("reader {address} is listed twice")]
    Twice { address: u8 },
    #[error("{baud} baud is not a speed libosdp takes ({BAUDS:?})")]
    Baud { baud: u32 },
    #[error("libosdp refused reader {address}: {error}")]
    Reader { address: u8, error: String },
    #[error("cannot start the line thread: {0}")]
    Thread(io::Error),
}

/// What crossed the line, when the readers stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineStats {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Commands the gateway sent the readers (polls not counted).
    pub commands: u64,
}

enum Message {
    Command(ReaderCommand),
    Decided(u8, oneshot::Sender<()>),
}

/// The running readers. Dropping the handle stops them.
#[derive(Debug)]
pub struct ReadersHandle {
    messages: std_mpsc::Sender<Message>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<LineStats, String>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Command(c) => f.debug_tuple("Command").field(c).finish(),
            Message::Decided(unit, _) => f.debug_tuple("Decided").field(unit).finish(),
        }
    }
}

impl ReadersHandle {
    /// Carries out `command` at its reader (an `error` output if it cannot be); false once
    /// the readers have stopped.
    pub fn send(&self, command: ReaderCommand) -> bool {
        self.messages.send(Message::Command(command)).is_ok()
    }

    /// Completes once every credential presented at `unit` by the commands sent before has
    /// its decision or was given up (at once if none is waiting). Fails if the readers stop.
    pub fn decided(&self, unit: u8) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.messages.send(Message::Decided(unit, tx));
        rx
    }

    /// Whether the thread has ended (stopped, or the line failed).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Stops the readers and waits for them (at most a tick); the line's counters, or why
    /// the line failed.
    pub fn stop(mut self) -> Result<LineStats, String> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<LineStats, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the line thread panicked".into())),
            None => Ok(LineStats::default()),
        }
    }
}

impl Drop for ReadersHandle {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

/// Creates a pty pair, points a symlink at `link` to its device (replacing an old symlink)
/// and returns the master, set for reads that do not block, with the device's name. The
/// slave is closed: the gateway opens it exclusively. Remove the link with
/// [`super::pty::remove_link`].
pub fn linked_line(link: &Path) -> io::Result<(serialport::TTYPort, String)> {
    use serialport::SerialPort;
    let (mut master, slave) = serialport::TTYPort::pair().map_err(io::Error::from)?;
    let device = slave
        .name()
        .ok_or_else(|| io::Error::other("the pseudo-terminal has no device name"))?;
    drop(slave);
    master
        .set_timeout(Duration::ZERO)
        .map_err(io::Error::from)?;
    super::pty::make_link(link, Path::new(&device))?;
    Ok((master, device))
}

/// Opens a serial device (8N1 at `baud`) for reads that do not block.
pub fn open_port(path: &Path, baud: u32) -> io::Result<serialport::TTYPort> {
    serialport::new(path.to_string_lossy(), baud)
        .timeout(Duration::ZERO)
        .open_native()
        .map_err(io::Error::from)
}

/// Starts the readers on `line`; what the gateway tells them, decisions and state changes
/// go to `outputs` (dropped when the thread ends).
pub fn spawn<L: Line>(
    line: L,
    spec: &SimLine,
    outputs: mpsc::UnboundedSender<Output>,
) -> Result<ReadersHandle, SpawnError> {
    if !BAUDS.contains(&spec.baud) {
        return Err(SpawnError::Baud { baud: spec.baud });
    }
    for (i, r) in spec.readers.iter().enumerate() {
        if spec.readers[..i].iter().any(|o| o.address == r.address) {
            return Err(SpawnError::Twice { address: r.address });
        }
    }
    let shared = Shared {
        line: Arc::new(Mutex::new(line)),
        failed: Arc::new(Mutex::new(None)),
        sent: Arc::new(AtomicU64::new(0)),
        pty: spec.pty,
    };
    let (told_tx, told) = std_mpsc::channel();
    let pds = spec
        .readers
        .iter()
        .enumerate()
        .map(|(index, r)| Pd::new(index, r, spec.baud, &shared, told_tx.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let (messages, inbox) = std_mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let readers = Readers::new(&spec.readers);
    let thread = std::thread::Builder::new()
        .name("osdp readers".into())
        .spawn(move || {
            LineThread {
                shared,
                pds,
                readers,
                told,
                inbox,
                outputs,
                waiters: Vec::new(),
                start: Instant::now(),
                received: 0,
                commands: 0,
                connected: None,
            }
            .run(&flag)
        })
        .map_err(SpawnError::Thread)?;
    Ok(ReadersHandle {
        messages,
        stop,
        thread: Some(thread),
    })
}

/// What the readers' channels share with the line thread.
struct Shared<L> {
    line: Arc<Mutex<L>>,
    /// Why the line failed, set by a channel's write.
    failed: Arc<Mutex<Option<String>>>,
    sent: Arc<AtomicU64>,
    pty: bool,
}

/// Nothing to read now (or room to write).
fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// One reader's view of the line: what was received since it last read or flushed, and the
/// line to write to. Called from inside libosdp: never panics.
struct BusChannel<L> {
    id: i32,
    rx: Arc<Mutex<VecDeque<u8>>>,
    line: Arc<Mutex<L>>,
    failed: Arc<Mutex<Option<String>>>,
    sent: Arc<AtomicU64>,
    pty: bool,
}

impl<L: Line> Channel for BusChannel<L> {
    fn get_id(&self) -> i32 {
        self.id
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let Ok(mut rx) = self.rx.lock() else {
            return Err(ChannelError::TransportError);
        };
        let n = buf.len().min(rx.len());
        for (slot, byte) in buf.iter_mut().zip(rx.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        let Ok(mut line) = self.line.lock() else {
            return Err(ChannelError::TransportError);
        };
        let until = Instant::now() + WRITE_WITHIN;
        let mut done = 0;
        while done < buf.len() {
            match line.write(&buf[done..]) {
                Ok(0) => return Err(ChannelError::TransportError),
                Ok(n) => done += n,
                Err(e) if would_block(&e) && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Nobody reads the pty (the gateway is not there), or it keeps no room: the
                // bytes are lost, as on a line nobody listens to.
                Err(e) if self.pty => {
                    tracing::debug!(error = %e, bytes = buf.len() - done, "reply dropped");
                    return Ok(buf.len());
                }
                Err(e) => {
                    if let Ok(mut failed) = self.failed.lock() {
                        failed.get_or_insert_with(|| format!("cannot write to the line: {e}"));
                    }
                    return Err(ChannelError::TransportError);
                }
            }
        }
        self.sent
            .fetch_add(u64::try_from(done).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(done)
    }

    /// libosdp flushes before each reply to drop what it received: the receive buffer.
    fn flush(&mut self) -> Result<(), ChannelError> {
        if let Ok(mut rx) = self.rx.lock() {
            rx.clear();
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// The capabilities of every simulated reader.
fn capabilities() -> [PdCapability; 7] {
    [
        PdCapability::OutputControl(PdCapEntity::new(1, OUTPUTS)),
        PdCapability::LedControl(PdCapEntity::new(1, 1)),
        PdCapability::AudibleOutput(PdCapEntity::new(1, 1)),
        PdCapability::TextOutput(PdCapEntity::new(1, 1)),
        PdCapability::ContactStatusMonitoring(PdCapEntity::new(1, 4)),
        PdCapability::CommunicationSecurity(PdCapEntity::new(1, 1)),
        PdCapability::CardDataFormat(PdCapEntity::new(1, 1)),
    ]
}

/// One reader: libosdp's PD, its receive buffer and its status.
struct Pd {
    address: u8,
    device: PeripheralDevice,
    rx: Arc<Mutex<VecDeque<u8>>>,
    status: Arc<Mutex<ReaderStatus>>,
    /// (online, secure) as last reported.
    seen: (bool, bool),
}

impl Pd {
    fn new<L: Line>(
        index: usize,
        spec: &ReaderSpec,
        baud: u32,
        shared: &Shared<L>,
        told: std_mpsc::Sender<(usize, OsdpCommand)>,
    ) -> Result<Pd, SpawnError> {
        let refused = |e: libosdp::OsdpError| SpawnError::Reader {
            address: spec.address,
            error: e.to_string(),
        };
        let rx = Arc::new(Mutex::new(VecDeque::new()));
        let channel = BusChannel {
            id: i32::try_from(index).unwrap_or(i32::MAX),
            rx: Arc::clone(&rx),
            line: Arc::clone(&shared.line),
            failed: Arc::clone(&shared.failed),
            sent: Arc::clone(&shared.sent),
            pty: shared.pty,
        };
        let mut info = PdInfoBuilder::new()
            .name(&format!("reader-{}", spec.address))
            .and_then(|b| b.address(i32::from(spec.address)))
            .and_then(|b| b.baud_rate(i32::try_from(baud).unwrap_or(0)))
            .map_err(refused)?
            .id(&PdId::from_number(spec.address))
            .capabilities(&capabilities());
        if let Some(key) = spec.scbk {
            info = info.secure_channel_key(key);
        }
        let mut device = PeripheralDevice::new(info, Box::new(channel)).map_err(refused)?;
        let status = Arc::new(Mutex::new(ReaderStatus::default()));
        let polled = Arc::clone(&status);
        // Called inside libosdp's refresh: answer status polls, pass the command on, ACK.
        device.set_command_callback(move |command: &mut OsdpCommand| {
            if let OsdpCommand::Status(asked) = command
                && let Ok(status) = polled.lock()
            {
                status.answer(asked);
            }
            let _ = told.send((index, command.clone()));
            0
        });
        Ok(Pd {
            address: spec.address,
            device,
            rx,
            status,
            seen: (false, false),
        })
    }
}

struct LineThread<L> {
    shared: Shared<L>,
    pds: Vec<Pd>,
    readers: Readers,
    told: std_mpsc::Receiver<(usize, OsdpCommand)>,
    inbox: std_mpsc::Receiver<Message>,
    outputs: mpsc::UnboundedSender<Output>,
    /// `decided` callers: the unit and how many of its credentials must be settled.
    waiters: Vec<(u8, u64, oneshot::Sender<()>)>,
    start: Instant,
    received: u64,
    commands: u64,
    /// Whether the other end of the pty is open, once known.
    connected: Option<bool>,
}

impl<L: Line> LineThread<L> {
    fn run(mut self, stop: &AtomicBool) -> Result<LineStats, String> {
        let mut read_after = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= read_after && !self.pump()? {
                read_after = Instant::now() + HANGUP_BACKOFF;
            }
            for pd in &mut self.pds {
                pd.device.refresh();
            }
            if let Some(why) = self.shared.failed.lock().ok().and_then(|mut f| f.take()) {
                return Err(why);
            }
            let now = self.start.elapsed();
            while let Ok((index, command)) = self.told.try_recv() {
                if !matches!(command, OsdpCommand::Status(_)) {
                    self.commands += 1;
                }
                let unit = self.pds.get(index).map_or(0, |pd| pd.address);
                tracing::debug!(unit, ?command, "command from the gateway");
                let outputs = self.readers.told(unit, &command, now);
                self.emit(outputs);
            }
            self.states();
            let expired = self.readers.expire(now);
            self.emit(expired);
            self.wake_waiters();
            match self.inbox.recv_timeout(TICK) {
                Ok(message) => {
                    self.handle(message);
                    while let Ok(message) = self.inbox.try_recv() {
                        self.handle(message);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                // The handle is gone: stop.
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(LineStats {
            bytes_received: self.received,
            bytes_sent: self.shared.sent.load(Ordering::Relaxed),
            commands: self.commands,
        })
    }

    /// Moves what the line has to every reader. False when nobody has the pty open.
    fn pump(&mut self) -> Result<bool, String> {
        let mut buf = [0u8; 4096];
        loop {
            let read = match self.shared.line.lock() {
                Ok(mut line) => line.read(&mut buf),
                Err(_) => return Err("the line's lock is poisoned".into()),
            };
            match read {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    self.connected(true);
                    self.received += u64::try_from(n).unwrap_or(u64::MAX);
                    tracing::trace!(bytes = %hex(&buf[..n]), "from the gateway");
                    for pd in &self.pds {
                        if let Ok(mut rx) = pd.rx.lock() {
                            rx.extend(&buf[..n]);
                            let over = rx.len().saturating_sub(MAX_RX_BACKLOG);
                            rx.drain(..over);
                        }
                    }
                }
                Err(e) if would_block(&e) => {
                    self.connected(true);
                    return Ok(true);
                }
                Err(_) if self.shared.pty => {
                    self.connected(false);
                    return Ok(false);
                }
                Err(e) => return Err(format!("cannot read the line: {e}")),
            }
        }
    }

    fn connected(&mut self, now: bool) {
        if self.shared.pty && self.connected != Some(now) {
            if now {
                tracing::info!("the other end of the line is open");
            } else {
                tracing::info!("nobody has the other end of the line open; waiting");
            }
            self.connected = Some(now);
        }
    }

    fn states(&mut self) {
        let mut changed = Vec::new();
        for pd in &mut self.pds {
            let now = (pd.device.is_online(), pd.device.is_sc_active());
            if now != pd.seen {
                pd.seen = now;
                changed.push(Output::State {
                    unit: pd.address,
                    online: now.0,
                    secure: now.1,
                });
            }
        }
        self.emit(changed);
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Command(command) => self.carry_out(&command),
            Message::Decided(unit, done) => {
                let (presented, _) = self.readers.counts(unit);
                self.waiters.push((unit, presented, done));
                self.wake_waiters();
            }
        }
    }

    fn carry_out(&mut self, command: &ReaderCommand) {
        let rejected = |error: String| Output::Rejected {
            unit: command.unit,
            command: command.input.word(),
            error,
        };
        let Some(pd) = self.pds.iter_mut().find(|pd| pd.address == command.unit) else {
            let error = format!("no reader {} is simulated here", command.unit);
            self.emit(vec![rejected(error)]);
            return;
        };
        let Ok(mut status) = pd.status.lock() else {
            self.emit(vec![rejected("the reader's status is poisoned".into())]);
            return;
        };
        let mut next = *status;
        let sent = event(&command.input, &mut next).and_then(|event| {
            pd.device
                .notify_event(event)
                .map_err(|_| QUEUE_FULL.to_owned())
        });
        match sent {
            Ok(()) => {
                *status = next;
                drop(status);
                tracing::debug!(?command, "sent at the next poll");
                self.readers
                    .present(command.unit, &command.input, self.start.elapsed());
            }
            Err(error) => {
                drop(status);
                self.emit(vec![rejected(error)]);
            }
        }
    }

    fn wake_waiters(&mut self) {
        let readers = &self.readers;
        let done = self.waiters.extract_if(.., |(unit, target, done)| {
            done.is_closed() || readers.counts(*unit).1 >= *target
        });
        for (_, _, done) in done {
            let _ = done.send(());
        }
    }

    fn emit(&self, outputs: Vec<Output>) {
        for output in outputs {
            let _ = self.outputs.send(output);
        }
    }
}

#[cfg(test)]
mod tests {
    use libosdp::{OsdpCommandBuzzer, OsdpCommandKeyset, OsdpCommandOutput, OsdpLedParams};

    use super::*;

    const CARD: &str = "26:0a1b2c40";

    fn reader(line: &str) -> ReaderCommand {
        match parse_line(line) {
            Ok(Some(ScriptLine::Reader(command))) => command,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn the_command_language_parses_every_command() {
        assert_eq!(
            reader("card 1 26:0a1b2c40"),
            ReaderCommand {
                unit: 1,
                input: ReaderInput::Card {
                    bits: 26,
                    data: vec![0x0a, 0x1b, 0x2c, 0x40]
                }
            }
        );
        assert_eq!(
            reader("pin 2 4829").input,
            ReaderInput::Keys(b"4829\r".to_vec())
        );
        assert_eq!(
            reader("keys 2 12*9#").input,
            ReaderInput::Keys(vec![b'1', b'2', 0x7F, b'9', 0x0D])
        );
        assert_eq!(
            reader("qr 3 QR-7f3a").input,
            ReaderInput::Raw(b"QR-7f3a".to_vec())
        );
        assert_eq!(
            reader("qr 3 hex:00ff").input,
            ReaderInput::Raw(vec![0, 0xff])
        );
        assert_eq!(
            reader("door 1 opened").input,
            ReaderInput::Door { open: true }
        );
        assert_eq!(
            reader("door 1 closed").input,
            ReaderInput::Door { open: false }
        );
        assert_eq!(
            reader("tamper 1 on").input,
            ReaderInput::Tamper { on: true }
        );
        assert_eq!(
            reader("power 1 lost").input,
            ReaderInput::Power { lost: true }
        );
        assert_eq!(
            reader("power 1 ok").input,
            ReaderInput::Power { lost: false }
        );
        assert_eq!(
            parse_line("wait-decision 4 2s"),
            Ok(Some(ScriptLine::WaitDecision {
                unit: 4,
                timeout: Duration::from_secs(2)
            }))
        );
        assert_eq!(
            parse_line("wait-decision 4"),
            Ok(Some(ScriptLine::WaitDecision {
                unit: 4,
                timeout: DEFAULT_WAIT
            }))
        );
        assert_eq!(
            parse_line("sleep 300ms"),
            Ok(Some(ScriptLine::Sleep(Duration::from_millis(300))))
        );
        assert_eq!(parse_line("quit"), Ok(Some(ScriptLine::Quit)));
        assert_eq!(parse_line("  # a comment"), Ok(None));
        assert_eq!(parse_line(""), Ok(None));
    }

    #[test]
    fn bad_lines_say_what_is_wrong_and_how_it_is_written() {
        let error = |line: &str| parse_line(line).expect_err(line);
        assert!(error("swipe 1 x").starts_with("unknown command \"swipe\""));
        assert!(error("card 1").contains("usage: card UNIT BITS:HEX"));
        assert!(error("card 1 26:0a1b2c40 extra").contains("too many arguments"));
        assert!(error("card 1 26:0a1b").contains("26 bits take 4 bytes"));
        assert!(error("card 0 26:0a1b2c40").contains("not a unit address"));
        assert!(error("pin 1 12#").contains("is not digits"));
        assert!(error("door 1 ajar").contains("neither opened nor closed"));
        assert!(error("qr 1 hex:0").contains("not hex bytes"));
        assert!(error(&format!("qr 1 {}", "x".repeat(65))).contains("1 to 64 bytes"));
        assert!(error("wait-decision 1 soon").contains("not a duration"));
    }

    #[test]
    fn inputs_become_the_events_a_reader_sends() {
        let mut status = ReaderStatus::default();
        let OsdpEvent::CardRead(card) =
            event(&ReaderInput::card(CARD).unwrap(), &mut status).unwrap()
        else {
            panic!("not a card read")
        };
        assert_eq!(
            (card.nr_bits, card.data),
            (26, vec![0x0a, 0x1b, 0x2c, 0x40])
        );

        let OsdpEvent::Status(inputs) =
            event(&ReaderInput::Door { open: true }, &mut status).unwrap()
        else {
            panic!("not a status report")
        };
        assert_eq!(inputs.type_, OsdpStatusReportType::Input);
        // The CP takes a reader offline whose report has another count than its inputs.
        assert_eq!(inputs.nr_entries, INPUTS);
        assert_eq!(inputs.report[..4], [1, 0, 0, 0]);

        event(&ReaderInput::Tamper { on: true }, &mut status).unwrap();
        let OsdpEvent::Status(local) =
            event(&ReaderInput::Power { lost: true }, &mut status).unwrap()
        else {
            panic!("not a status report")
        };
        assert_eq!(local.type_, OsdpStatusReportType::Local);
        assert_eq!(local.report[..local.nr_entries], [1, 1]);

        // libosdp's event buffers hold 64 bytes; more would panic in its binding.
        assert!(event(&ReaderInput::Keys(vec![b'1'; 65]), &mut status).is_err());
        assert!(event(&ReaderInput::Raw(Vec::new()), &mut status).is_err());
    }

    #[test]
    fn status_polls_are_answered_with_every_input() {
        let status = ReaderStatus {
            inputs: [true, false, false, true],
            tamper: false,
            power_lost: true,
        };
        let mut asked = status_report(OsdpStatusReportType::Input, &[]);
        status.answer(&mut asked);
        assert_eq!(
            (asked.nr_entries, &asked.report[..4]),
            (4, &[1, 0, 0, 1][..])
        );
        let mut asked = status_report(OsdpStatusReportType::Local, &[]);
        status.answer(&mut asked);
        assert_eq!(&asked.report[..asked.nr_entries], &[0, 1]);
    }

    fn pulse(output_no: u8) -> OsdpCommand {
        OsdpCommand::Output(OsdpCommandOutput {
            output_no,
            control_code: 5,
            timer_count: 30,
        })
    }

    fn led(color: OsdpLedColor, tenths: u16) -> OsdpCommand {
        OsdpCommand::Led(OsdpCommandLed {
            reader: 0,
            led_number: 0,
            temporary: OsdpLedParams {
                control_code: 2,
                on_count: 10,
                off_count: 0,
                on_color: color,
                off_color: OsdpLedColor::None,
                timer_count: tenths,
            },
            permanent: OsdpLedParams::default(),
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn decisions(outputs: &[Output]) -> Vec<(bool, String, &'static str)> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Decision {
                    grant,
                    credential,
                    via,
                    ..
                } => Some((*grant, credential.text.clone(), *via)),
                _ => None,
            })
            .collect()
    }

    fn readers() -> Readers {
        Readers::new(&[
            ReaderSpec {
                address: 1,
                scbk: None,
            },
            ReaderSpec {
                address: 2,
                scbk: Some([7; 16]),
            },
        ])
    }

    #[test]
    fn a_grant_is_the_first_pulse_or_green_led_and_names_the_card() {
        let mut r = readers();
        r.present(1, &ReaderInput::card(CARD).unwrap(), ms(100));
        let out = r.told(1, &pulse(1), ms(141));
        assert_eq!(
            out[1].to_json().to_string(),
            r#"{"unit":1,"type":"grant","request":"card","credential":"26:0a1b2c40","via":"output","after_ms":41}"#
        );
        assert_eq!(
            out[0].to_json().to_string(),
            r#"{"unit":1,"type":"output","output_no":1,"control":5,"time_ms":3000}"#
        );
        // The grant's own green LED is not another decision.
        let out = r.told(1, &led(OsdpLedColor::Green, 30), ms(150));
        assert_eq!(
            out[0].to_json().to_string(),
            r#"{"unit":1,"type":"led","led_no":0,"color":"green","time_ms":3000}"#
        );
        assert!(decisions(&out).is_empty());
        assert_eq!(r.counts(1), (1, 1));
        // Nothing presented: a pulse (a remote open) is no decision.
        assert!(decisions(&r.told(1, &pulse(0), ms(200))).is_empty());
    }

    #[test]
    fn decisions_answer_credentials_in_the_order_they_were_presented() {
        let mut r = readers();
        r.present(1, &ReaderInput::card(CARD).unwrap(), ms(0));
        r.present(1, &ReaderInput::card("26:11223340").unwrap(), ms(1));
        r.present(2, &ReaderInput::Raw(b"QR-1".to_vec()), ms(2));
        let mut out = r.told(1, &pulse(0), ms(10));
        out.extend(r.told(1, &led(OsdpLedColor::Green, 30), ms(11)));
        out.extend(r.told(1, &led(OsdpLedColor::Red, 20), ms(12)));
        out.extend(r.told(2, &led(OsdpLedColor::Red, 20), ms(13)));
        assert_eq!(
            decisions(&out),
            vec![
                (true, CARD.to_owned(), "output"),
                (false, "26:11223340".to_owned(), "led"),
                (false, "QR-1".to_owned(), "led"),
            ]
        );
        // A reader without a strike: the green LED is the grant.
        r.present(2, &ReaderInput::Raw(vec![0, 1]), ms(20));
        let out = r.told(2, &led(OsdpLedColor::Green, 30), ms(30));
        assert_eq!(decisions(&out), vec![(true, "hex:0001".to_owned(), "led")]);
    }

    #[test]
    fn keys_make_a_pin_at_the_enter_key_and_the_clear_key_drops_digits() {
        let mut r = readers();
        r.present(1, &ReaderInput::Keys(b"48".to_vec()), ms(0));
        assert_eq!(r.counts(1), (0, 0));
        r.present(1, &ReaderInput::Keys(vec![b'2', b'9', KEY_ENTER]), ms(5));
        r.present(
            1,
            &ReaderInput::Keys(vec![b'1', KEY_CLEAR, b'7', KEY_ENTER]),
            ms(6),
        );
        assert_eq!(r.counts(1), (2, 0));
        let mut out = r.told(1, &led(OsdpLedColor::Red, 20), ms(20));
        out.extend(r.told(1, &led(OsdpLedColor::Red, 20), ms(21)));
        assert_eq!(
            decisions(&out),
            vec![
                (false, "4829".to_owned(), "led"),
                (false, "7".to_owned(), "led")
            ]
        );
        assert_eq!(
            out[1].to_json().to_string(),
            r#"{"unit":1,"type":"deny","request":"pin","credential":"4829","via":"led","after_ms":15}"#
        );
        // A keypad whose PINs need no '#': the decision answers the digits typed.
        r.present(1, &ReaderInput::Keys(b"1234".to_vec()), ms(30));
        let out = r.told(1, &pulse(0), ms(40));
        assert_eq!(decisions(&out), vec![(true, "1234".to_owned(), "output")]);
        assert_eq!(r.counts(1), (2, 2));
    }

    #[test]
    fn a_credential_without_a_decision_is_given_up() {
        let mut r = readers();
        r.present(2, &ReaderInput::pin("1111"), ms(0));
        assert!(r.expire(GIVE_UP_AFTER.saturating_sub(ms(1))).is_empty());
        let out = r.expire(GIVE_UP_AFTER);
        assert_eq!(
            out[0].to_json().to_string(),
            r#"{"unit":2,"type":"gave_up","request":"pin","credential":"1111","reason":"timeout"}"#
        );
        assert_eq!(out[0].settles(), Some(2));
        assert_eq!(r.counts(2), (1, 1));
        // The LED that comes later answers nothing.
        assert!(decisions(&r.told(2, &led(OsdpLedColor::Red, 20), GIVE_UP_AFTER)).is_empty());
    }

    #[test]
    fn the_key_the_gateway_sets_is_kept_and_reported() {
        let mut r = readers();
        assert_eq!((r.scbk(1), r.scbk(2)), (None, Some([7; 16])));
        let out = r.told(
            1,
            &OsdpCommand::KeySet(OsdpCommandKeyset::new_scbk([0xab; 16])),
            ms(0),
        );
        assert_eq!(r.scbk(1), Some([0xab; 16]));
        assert_eq!(
            out[0].to_json().to_string(),
            format!(
                r#"{{"unit":1,"type":"keyset","scbk":"{}"}}"#,
                "ab".repeat(16)
            )
        );
        let out = r.told(
            1,
            &OsdpCommand::Buzzer(OsdpCommandBuzzer {
                reader: 0,
                control_code: 2,
                on_count: 1,
                off_count: 1,
                rep_count: 3,
            }),
            ms(0),
        );
        assert_eq!(
            out[0].to_json().to_string(),
            r#"{"unit":1,"type":"buzzer","count":3,"on_ms":100,"off_ms":100}"#
        );
    }

    /// A line in memory: what the test puts in `incoming` is read; writes are kept.
    #[derive(Default)]
    struct Memory {
        written: Vec<u8>,
    }

    impl Read for Memory {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for Memory {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            // One byte at a time: the channel must still write everything.
            self.written.push(buf[0]);
            Ok(1)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_channel_reads_its_own_buffer_flushes_it_and_writes_whole() {
        let line = Arc::new(Mutex::new(Memory::default()));
        let rx = Arc::new(Mutex::new(VecDeque::from(vec![1, 2, 3])));
        let mut channel = BusChannel {
            id: 0,
            rx: Arc::clone(&rx),
            line: Arc::clone(&line),
            failed: Arc::new(Mutex::new(None)),
            sent: Arc::new(AtomicU64::new(0)),
            pty: true,
        };
        let mut buf = [0u8; 2];
        assert_eq!(channel.read(&mut buf), Ok(2));
        assert_eq!(buf, [1, 2]);
        channel.flush().unwrap();
        assert_eq!(channel.read(&mut buf), Ok(0));
        assert_eq!(channel.write(b"reply"), Ok(5));
        assert_eq!(line.lock().unwrap().written, b"reply");
    }
}
