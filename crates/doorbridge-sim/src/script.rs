//! The `door-sim` command language: one command per line, words separated by spaces.
//!
//! The full reference with examples is `docs/door-sim.md`. In short:
//!
//! ```text
//! pin 1 482916 [reader=0]        qr 2 TOKEN [reader=0]       mobile 3 TOKEN [reader=0]
//! call 1 [button=0]              battery 1 18 3650           door 1 opened|closed|forced|held [door=0]
//! tamper 1 on|off                status 1 [fw=1.2.0]         restart 1 [fw=1.3.0]
//! garbage 40                     badcrc 1                    truncate 1
//! late 1 300ms                   retransmit 1 [report]       silent 1 on|off
//! sleep 200ms                    wait-decision 1 [2s]        quit
//! ```
//!
//! Blank lines and lines whose first non-blank character is `#` are ignored. A token (QR,
//! mobile) is taken as the bytes of its text; `hex:` followed by hex digits gives raw bytes.

use std::time::Duration;

use thiserror::Error;

use super::units::{MAX_GARBAGE, SimCommand};
use doorbridge_proto::access::CredentialKind;
use doorbridge_proto::bus::frame::Address;
use doorbridge_proto::bus::message::{DoorEventKind, MAX_CREDENTIAL};

/// How long `wait-decision` waits when no timeout is given: a little over the 10 s after
/// which a unit gives up on a verify (so the wait ends with the decision or the give-up).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(12);
/// The longest `sleep`, `late` or `wait-decision` accepted (one hour).
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptLine {
    /// Something for the simulated units.
    Sim(SimCommand),
    /// Pause the script (pacing, not synchronisation).
    Sleep(Duration),
    /// Block the script until every credential presented at `unit` so far has its decision
    /// (or the unit gave up), or `timeout` passes.
    WaitDecision { unit: Address, timeout: Duration },
    /// Stop the simulator.
    Quit,
}

/// Why a line is not a command. The message names the problem and the expected form.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct ParseError(String);

impl ParseError {
    fn new(message: impl Into<String>) -> ParseError {
        ParseError(message.into())
    }
}

/// Every command word with its form, for error messages and `--help`.
pub const USAGE: &[(&str, &str)] = &[
    ("pin", "pin UNIT DIGITS [reader=N]"),
    ("qr", "qr UNIT TOKEN [reader=N]"),
    ("mobile", "mobile UNIT TOKEN [reader=N]"),
    ("call", "call UNIT [button=N]"),
    ("battery", "battery UNIT PERCENT MILLIVOLTS"),
    ("door", "door UNIT opened|closed|forced|held [door=N]"),
    ("tamper", "tamper UNIT on|off"),
    ("status", "status UNIT [fw=VERSION]"),
    ("restart", "restart UNIT [fw=VERSION]"),
    ("garbage", "garbage BYTES"),
    ("badcrc", "badcrc UNIT"),
    ("truncate", "truncate UNIT"),
    ("late", "late UNIT DURATION"),
    ("retransmit", "retransmit UNIT [verify|report]"),
    ("silent", "silent UNIT on|off"),
    ("sleep", "sleep DURATION"),
    ("wait-decision", "wait-decision UNIT [TIMEOUT]"),
    ("quit", "quit"),
];

/// Parses one line: `Ok(None)` for a blank line or a comment.
pub fn parse_line(line: &str) -> Result<Option<ScriptLine>, ParseError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let Some(word) = words.next() else {
        return Ok(None);
    };
    let Some(&(_, form)) = USAGE.iter().find(|(w, _)| *w == word) else {
        let known: Vec<&str> = USAGE.iter().map(|(w, _)| *w).collect();
        return Err(ParseError::new(format!(
            "unknown command {word:?}; commands: {}",
            known.join(", ")
        )));
    };
    let mut args = Args {
        positional: Vec::new(),
        options: Vec::new(),
        form,
    };
    // Only the options the command's form names are options: a token may contain '='.
    for w in words {
        match w.split_once('=') {
            Some((k, v)) if form.contains(&format!("[{k}=")) => args.options.push((k, v)),
            _ => args.positional.push(w),
        }
    }
    parse_command(word, &mut args).map(Some)
}

/// Parses a duration: a whole number followed by `ms`, `s` or `min` (`300ms`, `2s`, `1min`).
pub fn parse_duration(text: &str) -> Result<Duration, ParseError> {
    let bad = || {
        ParseError::new(format!(
            "{text:?} is not a duration: write a whole number with ms, s or min, e.g. 300ms or 2s"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d > MAX_DURATION {
        return Err(ParseError::new(format!(
            "{text} is longer than the limit of {}min",
            MAX_DURATION.as_secs() / 60
        )));
    }
    Ok(d)
}

/// Parses a unit address, 1..=126.
pub fn parse_unit(text: &str) -> Result<Address, ParseError> {
    text.parse::<u8>()
        .ok()
        .and_then(Address::unit)
        .ok_or_else(|| ParseError::new(format!("{text:?} is not a unit address (1 to 126)")))
}

struct Args<'a> {
    positional: Vec<&'a str>,
    options: Vec<(&'a str, &'a str)>,
    form: &'static str,
}

impl<'a> Args<'a> {
    fn usage(&self, problem: &str) -> ParseError {
        ParseError::new(format!("{problem}; usage: {}", self.form))
    }

    /// Checks the count of positional arguments.
    fn expect(&self, min: usize, max: usize) -> Result<(), ParseError> {
        let n = self.positional.len();
        if n < min {
            return Err(self.usage("missing argument"));
        }
        if n > max {
            return Err(self.usage("too many arguments"));
        }
        Ok(())
    }

    fn pos(&self, i: usize) -> Result<&'a str, ParseError> {
        self.positional
            .get(i)
            .copied()
            .ok_or_else(|| self.usage("missing argument"))
    }

    fn unit(&self) -> Result<Address, ParseError> {
        parse_unit(self.pos(0)?)
    }

    /// Takes the option `key` if present; any other option is an error (see `finish`).
    fn option(&mut self, key: &str) -> Option<&'a str> {
        let pos = self.options.iter().position(|(k, _)| *k == key)?;
        Some(self.options.remove(pos).1)
    }

    fn option_u8(&mut self, key: &str) -> Result<u8, ParseError> {
        match self.option(key) {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| self.usage(&format!("{key}={v} is not a number from 0 to 255"))),
        }
    }

    fn finish(&self) -> Result<(), ParseError> {
        match self.options.first() {
            None => Ok(()),
            Some((k, _)) => Err(self.usage(&format!("{k}= given twice"))),
        }
    }
}

fn parse_command(word: &str, a: &mut Args<'_>) -> Result<ScriptLine, ParseError> {
    let line = match word {
        "pin" | "qr" | "mobile" => ScriptLine::Sim(parse_verify(word, a)?),
        "call" => {
            a.expect(1, 1)?;
            let unit = a.unit()?;
            let button = a.option_u8("button")?;
            ScriptLine::Sim(SimCommand::Call { unit, button })
        }
        "battery" => ScriptLine::Sim(parse_battery(a)?),
        "door" => {
            a.expect(2, 2)?;
            let unit = a.unit()?;
            let e = a.pos(1)?;
            let event = match e {
                "opened" => DoorEventKind::Opened,
                "closed" => DoorEventKind::Closed,
                "forced" => DoorEventKind::ForcedOpen,
                "held" => DoorEventKind::HeldOpen,
                _ => return Err(a.usage(&format!("{e:?} is not a door event"))),
            };
            let door = a.option_u8("door")?;
            ScriptLine::Sim(SimCommand::Door { unit, door, event })
        }
        "tamper" | "silent" => {
            a.expect(2, 2)?;
            let unit = a.unit()?;
            let on = on_off(a, a.pos(1)?)?;
            ScriptLine::Sim(if word == "tamper" {
                SimCommand::Tamper { unit, active: on }
            } else {
                SimCommand::Silent { unit, on }
            })
        }
        "status" | "restart" => {
            a.expect(1, 1)?;
            let unit = a.unit()?;
            let firmware = a.option("fw").map(str::to_owned);
            ScriptLine::Sim(if word == "status" {
                SimCommand::Status { unit, firmware }
            } else {
                SimCommand::Restart { unit, firmware }
            })
        }
        "garbage" => ScriptLine::Sim(parse_garbage(a)?),
        "badcrc" | "truncate" => {
            a.expect(1, 1)?;
            let unit = a.unit()?;
            ScriptLine::Sim(if word == "badcrc" {
                SimCommand::BadCrc { unit }
            } else {
                SimCommand::Truncate { unit }
            })
        }
        "retransmit" => ScriptLine::Sim(parse_retransmit(a)?),
        "late" => {
            a.expect(2, 2)?;
            let unit = a.unit()?;
            let delay = parse_duration(a.pos(1)?)?;
            ScriptLine::Sim(SimCommand::Late { unit, delay })
        }
        "sleep" => {
            a.expect(1, 1)?;
            ScriptLine::Sleep(parse_duration(a.pos(0)?)?)
        }
        "wait-decision" => {
            a.expect(1, 2)?;
            let unit = a.unit()?;
            let timeout = match a.positional.get(1) {
                Some(t) => parse_duration(t)?,
                None => DEFAULT_WAIT,
            };
            ScriptLine::WaitDecision { unit, timeout }
        }
        _ => {
            a.expect(0, 0)?;
            ScriptLine::Quit
        }
    };
    a.finish()?;
    Ok(line)
}

fn parse_verify(word: &str, a: &mut Args<'_>) -> Result<SimCommand, ParseError> {
    a.expect(2, 2)?;
    let unit = a.unit()?;
    let text = a.pos(1)?;
    let (kind, value) = match word {
        "pin" => {
            if !text
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#')
            {
                return Err(a.usage(&format!("PIN {text:?} has a key a keypad lacks")));
            }
            (CredentialKind::Pin, text.as_bytes().to_vec())
        }
        "qr" => (CredentialKind::Qr, token(text)?),
        _ => (CredentialKind::Mobile, token(text)?),
    };
    if value.len() > MAX_CREDENTIAL {
        return Err(a.usage(&format!(
            "the value has {} bytes, over the limit of {MAX_CREDENTIAL}",
            value.len()
        )));
    }
    let reader = a.option_u8("reader")?;
    Ok(SimCommand::Verify {
        unit,
        kind,
        value,
        reader,
    })
}

fn parse_battery(a: &Args<'_>) -> Result<SimCommand, ParseError> {
    a.expect(3, 3)?;
    let unit = a.unit()?;
    let p = a.pos(1)?;
    let percent = p
        .trim_end_matches('%')
        .parse::<u8>()
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| a.usage(&format!("{p:?} is not a percentage (0 to 100)")))?;
    let m = a.pos(2)?;
    let millivolts = m
        .trim_end_matches("mV")
        .trim_end_matches("mv")
        .parse::<u16>()
        .map_err(|_| a.usage(&format!("{m:?} is not millivolts (0 to 65535)")))?;
    Ok(SimCommand::Battery {
        unit,
        percent,
        millivolts,
    })
}

fn parse_garbage(a: &Args<'_>) -> Result<SimCommand, ParseError> {
    a.expect(1, 1)?;
    let n = a.pos(0)?;
    let len = n
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_GARBAGE).contains(n))
        .ok_or_else(|| a.usage(&format!("{n:?} is not a byte count (1 to {MAX_GARBAGE})")))?;
    Ok(SimCommand::Garbage { len })
}

fn parse_retransmit(a: &Args<'_>) -> Result<SimCommand, ParseError> {
    a.expect(1, 2)?;
    let unit = a.unit()?;
    let report = match a.positional.get(1).copied() {
        None | Some("verify") => false,
        Some("report") => true,
        Some(other) => return Err(a.usage(&format!("{other:?} is neither verify nor report"))),
    };
    Ok(SimCommand::Retransmit { unit, report })
}

fn on_off(a: &Args<'_>, text: &str) -> Result<bool, ParseError> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(a.usage(&format!("{text:?} is neither on nor off"))),
    }
}

/// A token: its text's bytes, or raw bytes after `hex:`.
fn token(text: &str) -> Result<Vec<u8>, ParseError> {
    let Some(hex) = text.strip_prefix("hex:") else {
        return Ok(text.as_bytes().to_vec());
    };
    let bad = || ParseError::new(format!("{text:?}: hex: needs an even number of hex digits"));
    if hex.is_empty() || hex.len() % 2 != 0 {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(n: u8) -> Address {
        Address::unit(n).unwrap()
    }

    fn sim(line: &str) -> SimCommand {
        match parse_line(line) {
            Ok(Some(ScriptLine::Sim(c))) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn err(line: &str) -> String {
        match parse_line(line) {
            Err(e) => e.to_string(),
            other => panic!("{line} parsed: {other:?}"),
        }
    }

    #[test]
    fn blank_lines_and_comments() {
        for line in ["", "   ", "# a comment", "   # indented comment", "\t"] {
            assert_eq!(parse_line(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn credentials() {
        assert_eq!(
            sim("pin 1 482916"),
            SimCommand::Verify {
                unit: unit(1),
                kind: CredentialKind::Pin,
                value: b"482916".to_vec(),
                reader: 0
            }
        );
        assert_eq!(
            sim("  qr 2   tok-en.123  reader=1 "),
            SimCommand::Verify {
                unit: unit(2),
                kind: CredentialKind::Qr,
                value: b"tok-en.123".to_vec(),
                reader: 1
            }
        );
        assert_eq!(
            sim("mobile 126 hex:00ff10"),
            SimCommand::Verify {
                unit: unit(126),
                kind: CredentialKind::Mobile,
                value: vec![0x00, 0xff, 0x10],
                reader: 0
            }
        );
        // A token may hold '=' (base64 padding, say).
        assert_eq!(
            sim("qr 2 abc=="),
            SimCommand::Verify {
                unit: unit(2),
                kind: CredentialKind::Qr,
                value: b"abc==".to_vec(),
                reader: 0
            }
        );
        assert!(err("pin 1 12a4").contains("keypad"));
        assert!(err("pin 0 1234").contains("not a unit address"));
        assert!(err("pin 127 1234").contains("not a unit address"));
        assert!(err("pin 1").contains("usage: pin UNIT DIGITS"));
        assert!(err("pin 1 1234 5").contains("too many"));
        assert!(err("pin 1 1234 floor=2").contains("too many"));
        assert!(err("pin 1 1234 reader=1 reader=2").contains("twice"));
        assert!(err("pin 1 1234 reader=300").contains("reader=300"));
        assert!(err("qr 1 hex:abc").contains("hex"));
        assert!(err(&format!("qr 1 {}", "x".repeat(201))).contains("limit of 200"));
    }

    #[test]
    fn reports() {
        assert_eq!(
            sim("call 1"),
            SimCommand::Call {
                unit: unit(1),
                button: 0
            }
        );
        assert_eq!(
            sim("call 1 button=2"),
            SimCommand::Call {
                unit: unit(1),
                button: 2
            }
        );
        assert_eq!(
            sim("battery 1 18 3650"),
            SimCommand::Battery {
                unit: unit(1),
                percent: 18,
                millivolts: 3650
            }
        );
        assert_eq!(sim("battery 1 18% 3650mV"), sim("battery 1 18 3650"));
        assert!(err("battery 1 101 3650").contains("percentage"));
        assert!(err("battery 1 50 70000").contains("millivolts"));
        for (word, event) in [
            ("opened", DoorEventKind::Opened),
            ("closed", DoorEventKind::Closed),
            ("forced", DoorEventKind::ForcedOpen),
            ("held", DoorEventKind::HeldOpen),
        ] {
            assert_eq!(
                sim(&format!("door 3 {word} door=1")),
                SimCommand::Door {
                    unit: unit(3),
                    door: 1,
                    event
                }
            );
        }
        assert!(err("door 1 ajar").contains("not a door event"));
        assert_eq!(
            sim("tamper 1 on"),
            SimCommand::Tamper {
                unit: unit(1),
                active: true
            }
        );
        assert!(err("tamper 1 yes").contains("neither on nor off"));
        assert_eq!(
            sim("status 1 fw=1.2.0"),
            SimCommand::Status {
                unit: unit(1),
                firmware: Some("1.2.0".into())
            }
        );
        assert_eq!(
            sim("restart 4"),
            SimCommand::Restart {
                unit: unit(4),
                firmware: None
            }
        );
    }

    #[test]
    fn faults() {
        assert_eq!(sim("garbage 40"), SimCommand::Garbage { len: 40 });
        assert!(err("garbage 0").contains("byte count"));
        assert!(err("garbage 5000").contains("byte count"));
        assert_eq!(sim("badcrc 1"), SimCommand::BadCrc { unit: unit(1) });
        assert_eq!(sim("truncate 2"), SimCommand::Truncate { unit: unit(2) });
        let retransmit = |report| SimCommand::Retransmit {
            unit: unit(3),
            report,
        };
        assert_eq!(sim("retransmit 3"), retransmit(false));
        assert_eq!(sim("retransmit 3 verify"), retransmit(false));
        assert_eq!(sim("retransmit 3 report"), retransmit(true));
        assert!(err("retransmit 3 status").contains("neither verify nor report"));
        assert_eq!(
            sim("late 1 300ms"),
            SimCommand::Late {
                unit: unit(1),
                delay: Duration::from_millis(300)
            }
        );
        assert_eq!(
            sim("silent 1 off"),
            SimCommand::Silent {
                unit: unit(1),
                on: false
            }
        );
    }

    #[test]
    fn script_control() {
        assert_eq!(
            parse_line("sleep 200ms"),
            Ok(Some(ScriptLine::Sleep(Duration::from_millis(200))))
        );
        assert_eq!(
            parse_line("wait-decision 1 2s"),
            Ok(Some(ScriptLine::WaitDecision {
                unit: unit(1),
                timeout: Duration::from_secs(2)
            }))
        );
        assert_eq!(
            parse_line("wait-decision 1"),
            Ok(Some(ScriptLine::WaitDecision {
                unit: unit(1),
                timeout: DEFAULT_WAIT
            }))
        );
        assert_eq!(parse_line("quit"), Ok(Some(ScriptLine::Quit)));
        assert!(err("quit now").contains("too many"));
        assert!(err("open 1").contains("unknown command \"open\""));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        for bad in ["", "ms", "2", "1.5s", "-1s", "2h", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_duration("61min")
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }

    #[test]
    fn every_command_has_a_usage_line_and_parses_its_example() {
        let examples = [
            "pin 1 482916",
            "qr 2 token",
            "mobile 3 app-key",
            "call 1",
            "battery 1 18 3650",
            "door 1 opened",
            "tamper 1 on",
            "status 1 fw=1.2.0",
            "restart 1",
            "garbage 40",
            "badcrc 1",
            "truncate 1",
            "late 1 300ms",
            "retransmit 1",
            "silent 1 on",
            "sleep 200ms",
            "wait-decision 1 2s",
            "quit",
        ];
        assert_eq!(examples.len(), USAGE.len());
        for (example, (word, form)) in examples.iter().zip(USAGE) {
            assert!(example.starts_with(word) && form.starts_with(word));
            assert!(parse_line(example).unwrap().is_some(), "{example}");
        }
    }
}
