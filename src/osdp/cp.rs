//! The OSDP line thread: owns the serial port and libosdp's `ControlPanel` for one bus.
//!
//! libosdp is synchronous and must be refreshed at least every 50 ms, so each OSDP bus gets a
//! thread of its own. The thread refreshes the CP every [`TICK`], carries out the commands
//! the async side sends ([`CpCommand`], over a std channel it waits on between refreshes),
//! and sends what the readers report ([`CpEvent`], over a tokio channel) together with each
//! reader's online and secure-channel state, polled after every refresh (the Rust binding has
//! no notification for them). A port that fails is closed and reopened with backoff, and the
//! CP built afresh on it; the readers then come online again by themselves.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use libosdp::{
    Channel, ChannelError, ControlPanelBuilder, OsdpCardFormats, OsdpCommand, OsdpCommandBuzzer,
    OsdpCommandKeyset, OsdpCommandLed, OsdpCommandOutput, OsdpCommandText, OsdpEvent, OsdpFlag,
    OsdpLedColor, OsdpLedParams, OsdpStatusReportType, PdInfoBuilder,
};
use tokio::sync::mpsc;

use super::reader::{Action, CardFormat, Color, MAX_TEXT};
use crate::drivers::bus::{REOPEN_FIRST, REOPEN_MAX, Rs485, apply_rs485};
use crate::task::Backoff;

/// How often the CP is refreshed (and commands picked up). libosdp asks for at most 50 ms;
/// a short tick keeps a card read's answer from waiting on the refresh.
pub const TICK: Duration = Duration::from_millis(5);
/// A reader that sent a reply within this long "answers" (see [`Replies`]). libosdp retries
/// an offline reader every 30 s (`.cargo/config.toml` sets it; its own default is 300 s), and
/// a refusing reader answers at each retry.
pub const ANSWERS_WITHIN: Duration = Duration::from_secs(60);

/// One reader (PD) as the CP is told about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdSpec {
    pub address: u8,
    pub name: String,
    /// The secure channel base key; `None`: plain text (only with `secure = false`), or
    /// SCBK-D during installation.
    pub scbk: Option<[u8; 16]>,
    /// `EnforceSecure`: no SCBK-D, no plain text: a reader that cannot set up the secure
    /// channel with `scbk` stays offline.
    pub enforce_secure: bool,
}

/// One OSDP line.
#[derive(Clone, Debug)]
pub struct LineSpec {
    pub name: String,
    pub port: PathBuf,
    pub baud: u32,
    pub rs485: Option<Rs485>,
    pub pds: Vec<PdSpec>,
}

/// What the line thread reports; `pd` is the reader's index in [`LineSpec::pds`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpEvent {
    /// The port opened (`true`) or failed (`false`, with why).
    Port { open: bool, error: Option<String> },
    /// A reader's online or secure-channel state changed. `answers`: it sent a reply within
    /// [`ANSWERS_WITHIN`] (tracked only for readers that must use the secure channel, to tell
    /// one that refuses it from one that is not there).
    State {
        pd: usize,
        online: bool,
        secure: bool,
        answers: bool,
    },
    /// A card read (`osdp_RAW`).
    Card {
        pd: usize,
        format: CardFormat,
        bits: usize,
        data: Vec<u8>,
    },
    /// Keys typed (`osdp_KEYPAD`).
    Keys { pd: usize, keys: Vec<u8> },
    /// Tamper and power (`osdp_LSTATR`): `true` is the alarm state.
    Local {
        pd: usize,
        tamper: bool,
        power: bool,
    },
    /// The inputs (`osdp_ISTATR`): `true` is active (a door contact: open).
    Inputs { pd: usize, inputs: Vec<bool> },
    /// A report the gateway does not use (manufacturer replies, output status), counted.
    Other { pd: usize },
}

/// What the async side asks of the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpCommand {
    /// Carry out a reader action.
    Act { pd: usize, action: Action },
    /// Set a new secure channel base key (`osdp_KEYSET`); installation only.
    KeySet { pd: usize, key: [u8; 16] },
}

/// The running line thread.
#[derive(Debug)]
pub struct CpHandle {
    commands: std_mpsc::Sender<CpCommand>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpHandle {
    /// Queues a command; false once the thread has ended.
    pub fn send(&self, command: CpCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Stops the thread and waits for it (at most one tick and a port close).
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CpHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts the line thread.
pub fn spawn(spec: LineSpec, events: mpsc::UnboundedSender<CpEvent>) -> std::io::Result<CpHandle> {
    seed_libosdp();
    let (tx, rx) = std_mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name(format!("osdp {}", spec.name))
        .spawn(move || run(&spec, &rx, &events, &flag))?;
    Ok(CpHandle {
        commands: tx,
        stop,
        thread: Some(thread),
    })
}

/// libosdp's C core draws the secure channel's challenge from `rand()`, unseeded unless the
/// application seeds it: seed it once from the system's randomness.
fn seed_libosdp() {
    static SEEDED: std::sync::Once = std::sync::Once::new();
    SEEDED.call_once(|| {
        let mut seed = [0u8; 4];
        if getrandom::fill(&mut seed).is_ok() {
            // SAFETY: srand only sets libc's generator state; no memory is handed over.
            #[allow(unsafe_code)]
            unsafe {
                libc::srand(u32::from_ne_bytes(seed));
            }
        }
    });
}

fn run(
    spec: &LineSpec,
    commands: &std_mpsc::Receiver<CpCommand>,
    events: &mpsc::UnboundedSender<CpEvent>,
    stop: &AtomicBool,
) {
    let mut backoff = Backoff::new(REOPEN_FIRST, REOPEN_MAX);
    while !stop.load(Ordering::Relaxed) {
        let wait = match open(spec) {
            Ok(port) => {
                backoff.reset();
                let _ = events.send(CpEvent::Port {
                    open: true,
                    error: None,
                });
                let why = serve(spec, port, commands, events, stop);
                // Whatever the readers were, they are unknown until the port is back.
                for pd in 0..spec.pds.len() {
                    let _ = events.send(CpEvent::State {
                        pd,
                        online: false,
                        secure: false,
                        answers: false,
                    });
                }
                match why {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(bus = %spec.name, %error, "OSDP port lost; reopening");
                        let _ = events.send(CpEvent::Port {
                            open: false,
                            error: Some(error),
                        });
                    }
                }
                backoff.next_wait()
            }
            Err(error) => {
                let wait = backoff.next_wait();
                tracing::warn!(bus = %spec.name, port = %spec.port.display(), %error,
                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "cannot open OSDP port");
                let _ = events.send(CpEvent::Port {
                    open: false,
                    error: Some(error),
                });
                wait
            }
        };
        // Wait to reopen, a tick at a time so a stop is heard; commands meanwhile are dropped
        // (a door release must not happen long after its grant).
        let until = Instant::now() + crate::task::jitter(wait);
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK * 4);
            while commands.try_recv().is_ok() {}
        }
    }
}

fn open(spec: &LineSpec) -> Result<serialport::TTYPort, String> {
    let port = serialport::new(spec.port.to_string_lossy(), spec.baud)
        .data_bits(serialport::DataBits::Eight)
        .parity(serialport::Parity::None)
        .stop_bits(serialport::StopBits::One)
        .flow_control(serialport::FlowControl::None)
        .timeout(Duration::ZERO)
        .open_native()
        .map_err(|e| e.to_string())?;
    if let Some(rs485) = &spec.rs485 {
        use std::os::fd::AsRawFd;
        apply_rs485(port.as_raw_fd(), rs485).map_err(|e| e.to_string())?;
    }
    Ok(port)
}

/// libosdp's view of the serial port. Reads are non-blocking; a write must go out whole
/// (libosdp takes a short write for a dead reader); `flush` discards what was received (libosdp
/// calls it before each command to drop stale bytes). A failure of the port is flagged for the
/// thread, which reopens it.
struct SerialChannel {
    /// `None` once closed. libosdp never frees the channel it is given, so the port is closed
    /// here, in `close` (called at the CP's teardown), or its exclusive lock would outlive it and
    /// no later CP (a reopen, a restart in process, `osdp install`) could open the port.
    port: Option<serialport::TTYPort>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    /// When each address last sent something that looks like a reply (see [`Replies`]).
    replies: Arc<Replies>,
}

/// The longest a write may wait for room in the port's buffer.
const WRITE_WITHIN: Duration = Duration::from_millis(200);

impl SerialChannel {
    fn fail(&self, e: &std::io::Error) -> ChannelError {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert_with(|| e.to_string());
        }
        ChannelError::TransportError
    }
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::Interrupted
    )
}

impl Channel for SerialChannel {
    fn get_id(&self) -> i32 {
        0
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let Some(port) = self.port.as_mut() else {
            return Err(ChannelError::TransportError);
        };
        match port.read(buf) {
            Ok(n) => {
                self.replies.sniff(&buf[..n]);
                Ok(n)
            }
            Err(e) if would_block(&e) => Ok(0),
            Err(e) => Err(self.fail(&e)),
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        let until = Instant::now() + WRITE_WITHIN;
        let mut done = 0;
        while done < buf.len() {
            let Some(port) = self.port.as_mut() else {
                return Err(ChannelError::TransportError);
            };
            match port.write(&buf[done..]) {
                Ok(n) => done += n,
                Err(e) if would_block(&e) && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(self.fail(&e)),
            }
        }
        Ok(done)
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        use serialport::SerialPort;
        let Some(port) = self.port.as_mut() else {
            return Err(ChannelError::TransportError);
        };
        port.clear(serialport::ClearBuffer::Input)
            .map_err(|e| self.fail(&std::io::Error::other(e)))
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        // Called once per reader on the line: the first call closes the port.
        self.port = None;
        Ok(())
    }
}

/// Which readers answer at all. libosdp reports a reader that refuses the secure channel
/// (under `EnforceSecure`) exactly like one that is not there: offline. The bytes tell them
/// apart: a reply starts with `0x53`, the reader's address with the reply bit (`0x80`), and a
/// length of at least 8. A match inside encrypted data is possible but rare, and costs at most
/// a "refused" alarm for a reader that is really silent.
#[derive(Debug)]
pub struct Replies {
    start: Instant,
    /// Per address 0..=126: milliseconds since `start` of the last reply, plus one (0: never).
    last: [std::sync::atomic::AtomicU64; 127],
    /// The last byte of the previous read and the two before it, for headers split across
    /// reads.
    tail: std::sync::Mutex<Vec<u8>>,
}

impl Replies {
    pub(crate) fn new() -> Self {
        Replies {
            start: Instant::now(),
            last: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            tail: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn sniff(&self, bytes: &[u8]) {
        let Ok(mut tail) = self.tail.lock() else {
            return;
        };
        tail.extend_from_slice(bytes);
        for w in tail.windows(4) {
            let len = u16::from_le_bytes([w[2], w[3]]);
            if w[0] == 0x53 && w[1] & 0x80 != 0 && w[1] != 0xFF && (8..=1440).contains(&len) {
                let at = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
                if let Some(slot) = self.last.get(usize::from(w[1] & 0x7F)) {
                    slot.store(at.saturating_add(1), Ordering::Relaxed);
                }
            }
        }
        let keep = tail.len().saturating_sub(3);
        tail.drain(..keep);
    }

    /// Whether `address` sent a reply within `within`.
    pub fn recently(&self, address: u8, within: Duration) -> bool {
        let Some(slot) = self.last.get(usize::from(address)) else {
            return false;
        };
        let last = slot.load(Ordering::Relaxed);
        last != 0 && {
            let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            now.saturating_sub(last - 1) <= u64::try_from(within.as_millis()).unwrap_or(u64::MAX)
        }
    }
}

/// Serves one opening of the port; `Ok` when told to stop, `Err` when the port failed.
fn serve(
    spec: &LineSpec,
    port: serialport::TTYPort,
    commands: &std_mpsc::Receiver<CpCommand>,
    events: &mpsc::UnboundedSender<CpEvent>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let failed = Arc::new(std::sync::Mutex::new(None));
    let replies = Arc::new(Replies::new());
    let channel = SerialChannel {
        port: Some(port),
        failed: Arc::clone(&failed),
        replies: Arc::clone(&replies),
    };
    let pds = spec
        .pds
        .iter()
        .map(|pd| {
            let mut info = PdInfoBuilder::new()
                .name(&pd.name)
                .and_then(|b| b.address(i32::from(pd.address)))
                .and_then(|b| b.baud_rate(i32::try_from(spec.baud).unwrap_or(0)))
                .map_err(|e| format!("reader {}: {e}", pd.name))?;
            if pd.enforce_secure {
                info = info.flag(OsdpFlag::EnforceSecure);
            }
            if let Some(key) = pd.scbk {
                info = info.secure_channel_key(key);
            }
            Ok(info)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut cp = ControlPanelBuilder::new()
        .add_channel(Box::new(channel), pds)
        .build()
        .map_err(|e| format!("libosdp refused the readers: {e}"))?;
    let sink = events.clone();
    cp.set_event_callback(move |pd, event| {
        let Ok(pd) = usize::try_from(pd) else {
            return 0;
        };
        let _ = sink.send(translate(pd, event));
        0
    });
    let mut state = vec![(false, false, false); spec.pds.len()];
    loop {
        cp.refresh();
        for (pd, seen) in state.iter_mut().enumerate() {
            let Ok(index) = i32::try_from(pd) else {
                continue;
            };
            let answers = spec.pds[pd].enforce_secure
                && replies.recently(spec.pds[pd].address, ANSWERS_WITHIN);
            let now = (cp.is_online(index), cp.is_sc_active(index), answers);
            if now != *seen {
                *seen = now;
                let _ = events.send(CpEvent::State {
                    pd,
                    online: now.0,
                    secure: now.1,
                    answers: now.2,
                });
            }
        }
        if let Some(error) = failed.lock().ok().and_then(|mut f| f.take()) {
            return Err(error);
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match commands.recv_timeout(TICK) {
            Ok(command) => {
                send(spec, &mut cp, command);
                // Whatever else is queued goes out in the same refresh.
                while let Ok(command) = commands.try_recv() {
                    send(spec, &mut cp, command);
                }
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            // The async side is gone: stop.
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

fn send(spec: &LineSpec, cp: &mut libosdp::ControlPanel, command: CpCommand) {
    let (pd, cmd) = match command {
        CpCommand::Act { pd, action } => (pd, to_osdp(action)),
        CpCommand::KeySet { pd, key } => {
            (pd, OsdpCommand::KeySet(OsdpCommandKeyset::new_scbk(key)))
        }
    };
    let name = spec.pds.get(pd).map_or("?", |p| p.name.as_str());
    let Ok(index) = i32::try_from(pd) else {
        return;
    };
    if let Err(e) = cp.send_command(index, cmd) {
        // libosdp refuses commands for an offline reader, or when its queue is full.
        tracing::warn!(bus = %spec.name, reader = name, error = %e, "OSDP command not queued");
    }
}

/// 100 ms units, as OSDP times its outputs, LEDs and buzzer.
fn tenths(d: Duration) -> u128 {
    d.as_millis().div_ceil(100)
}

fn to_osdp(action: Action) -> OsdpCommand {
    match action {
        Action::Pulse { output, time } => OsdpCommand::Output(OsdpCommandOutput {
            output_no: output,
            // Temporary on, back to the permanent state (off) when the timer runs out.
            control_code: 5,
            timer_count: u16::try_from(tenths(time)).unwrap_or(u16::MAX),
        }),
        Action::Led { color, time } => {
            let on_color = match color {
                Color::Green => OsdpLedColor::Green,
                Color::Red => OsdpLedColor::Red,
            };
            OsdpCommand::Led(OsdpCommandLed {
                reader: 0,
                led_number: 0,
                // Temporary: steady `on_color` for `time`, then the permanent state again.
                temporary: OsdpLedParams {
                    control_code: 2,
                    on_count: 10,
                    off_count: 0,
                    on_color,
                    off_color: OsdpLedColor::None,
                    timer_count: u16::try_from(tenths(time)).unwrap_or(u16::MAX),
                },
                permanent: OsdpLedParams::default(),
            })
        }
        Action::Beep { count, on, off } => OsdpCommand::Buzzer(OsdpCommandBuzzer {
            reader: 0,
            // The default tone.
            control_code: 2,
            on_count: u8::try_from(tenths(on)).unwrap_or(u8::MAX),
            off_count: u8::try_from(tenths(off)).unwrap_or(u8::MAX),
            rep_count: count,
        }),
        Action::Text(mut text) => {
            // libosdp's binding copies into a fixed array and panics beyond it.
            text.truncate(MAX_TEXT);
            OsdpCommand::Text(OsdpCommandText {
                reader: 0,
                // Temporary text, no wrap, shown for `temp_time` seconds.
                control_code: 2,
                temp_time: 5,
                offset_row: 1,
                offset_col: 1,
                data: text,
            })
        }
    }
}

fn translate(pd: usize, event: OsdpEvent) -> CpEvent {
    match event {
        OsdpEvent::CardRead(card) => CpEvent::Card {
            pd,
            format: match card.format {
                OsdpCardFormats::Wiegand => CardFormat::Wiegand,
                OsdpCardFormats::Unspecified => CardFormat::Raw,
            },
            bits: card.nr_bits,
            data: card.data,
        },
        OsdpEvent::KeyPress(keys) => CpEvent::Keys {
            pd,
            keys: keys.data,
        },
        OsdpEvent::Status(status) => {
            let n = status.nr_entries.min(status.report.len());
            let bits: Vec<bool> = status.report[..n].iter().map(|&b| b != 0).collect();
            match status.type_ {
                OsdpStatusReportType::Local => CpEvent::Local {
                    pd,
                    tamper: bits.first().copied().unwrap_or(false),
                    power: bits.get(1).copied().unwrap_or(false),
                },
                OsdpStatusReportType::Input => CpEvent::Inputs { pd, inputs: bits },
                OsdpStatusReportType::Output | OsdpStatusReportType::Remote => {
                    CpEvent::Other { pd }
                }
            }
        }
        OsdpEvent::MfgReply(_) => CpEvent::Other { pd },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_text_is_cut_before_libosdp_sees_it() {
        let OsdpCommand::Text(text) = to_osdp(Action::Text(vec![b'x'; 100])) else {
            panic!("not a text command");
        };
        assert_eq!(text.data.len(), MAX_TEXT);
    }

    #[test]
    fn times_are_rounded_up_to_tenths() {
        let OsdpCommand::Output(out) = to_osdp(Action::Pulse {
            output: 1,
            time: Duration::from_millis(2_950),
        }) else {
            panic!("not an output command");
        };
        assert_eq!(
            (out.output_no, out.control_code, out.timer_count),
            (1, 5, 30)
        );
    }
}
