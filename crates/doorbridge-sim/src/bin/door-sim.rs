//! `door-sim`: simulated door units on a serial line or a pseudo-terminal, driven by a small
//! command language, printing what the gateway sends as JSON lines. With `--osdp` the units
//! are OSDP card readers and keypads instead (`doorbridge_sim::osdp`). A thin shell around
//! `doorbridge_sim`; the manual is `docs/door-sim.md`.
//!
//! Exit status: 0 after `quit`, SIGINT or SIGTERM; 2 a usage problem; 1 any other error.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{CommandFactory, Parser};
use doorbridge::bus::frame::Address;
use doorbridge_sim::osdp::{self, ReaderSpec, SimLine};
use doorbridge_sim::script::{ScriptLine, parse_line, parse_unit};
use doorbridge_sim::{
    HangupTolerant, JsonLine, Output, SimCommand, SimConfig, SimStats, SimUnits, run_sim,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_serial::SerialStream;
use tracing_subscriber::EnvFilter;

/// The variable that sets the log filter (logs go to stderr).
const LOG_ENV: &str = "DOOR_SIM_LOG";
/// How long to wait before reading a pty master again while nobody has the slave open.
const HANGUP_BACKOFF: Duration = Duration::from_millis(100);

const AFTER_HELP: &str = "\
Commands, one per line: from --script FILE first, then from standard input (unless
--no-stdin). Blank lines and lines starting with # are ignored; a bad line prints a JSON error
line and the rest go on. UNIT is an address given to --units; DURATION is a whole number with
ms, s or min (300ms, 2s).

  pin UNIT DIGITS [reader=N]        present a PIN at the unit's reader N (default 0)
  qr UNIT TOKEN [reader=N]          present a QR code (TOKEN's text, or hex:0a1b.. for bytes)
  mobile UNIT TOKEN [reader=N]      present a mobile key
  call UNIT [button=N]              press a call button
  battery UNIT PERCENT MILLIVOLTS   report a battery reading
  door UNIT opened|closed|forced|held [door=N]
                                    report a door event
  tamper UNIT on|off                report the housing opened / closed
  status UNIT [fw=VERSION]          report the status (boot id, settings), new firmware
  restart UNIT [fw=VERSION]         power-cycle: new boot id, everything unsent is lost
  garbage BYTES                     put BYTES of line noise on the line now
  badcrc UNIT                       the unit's next answer has a wrong CRC
  truncate UNIT                     the unit's next answer breaks off halfway
  late UNIT DURATION                the unit's next answer comes DURATION late
  retransmit UNIT [verify|report]   send the last verify (or report) again: same id, same
                                    bytes, as if the unit had missed the gateway's answer
  silent UNIT on|off                stop answering (the gateway reports it offline) / resume
  sleep DURATION                    pause the script
  wait-decision UNIT [DURATION]     pause the script until every credential presented at
                                    UNIT has its decision (default 12s)
  quit                              stop

Output on stdout, one JSON object per line, e.g.
  {\"type\":\"ready\",\"pty\":\"/dev/pts/5\",\"link\":\"/tmp/door-bus\",\"units\":[1,2]}
  {\"unit\":1,\"type\":\"grant\",\"request\":\"pin\",\"id\":17,\"doors\":[0],\"welcome\":\"Hi\",\"floors\":[3],...}
  {\"unit\":1,\"type\":\"deny\",\"request\":\"pin\",\"id\":18,\"reason\":\"used_up\",...}
  {\"unit\":1,\"type\":\"open_door\",\"id\":4660,\"door\":0,\"pulse_ms\":3000,\"broadcast\":false}
Logs go to stderr; DOOR_SIM_LOG sets the filter (default info; trace shows every frame).

Examples:
  # A pseudo-terminal for a gateway on this machine; type commands.
  door-sim --pty /tmp/door-bus --units 1,2,3
  # An installer checks unit address 3 through a USB RS-485 adapter.
  printf 'pin 3 482916\\nwait-decision 3 5s\\nquit\\n' | door-sim --port /dev/ttyUSB1 --units 3
  # A scripted demo, then stay up answering polls until Ctrl-C.
  door-sim --pty /tmp/door-bus --units 1-8 --script demo.txt --no-stdin

OSDP readers (--osdp): the units are OSDP card readers with keypads (libosdp Peripheral
Devices; the gateway is their Control Panel on a bus with protocol = \"osdp\"), at --baud.
--scbk ADDR=HEX gives reader ADDR its secure channel key (32 hex digits); a reader without one
is in install mode and takes the key `doorbridge osdp install` sends (printed as keyset).

  card UNIT BITS:HEX                present a Wiegand card, e.g. card 1 26:0a1b2c40
  pin UNIT DIGITS                   type a PIN, then '#'
  keys UNIT KEYS                    type keys: digits, '#' (enter, 0x0D), '*' (clear, 0x7F)
  qr UNIT TOKEN                     present raw data: a QR code (TOKEN's text, or hex:0a1b..)
  door UNIT opened|closed           the door contact (input 0)
  tamper UNIT on|off                the housing opened / closed
  power UNIT lost|ok                the power failed / is back
  sleep DURATION                    pause the script
  wait-decision UNIT [DURATION]     pause until every card and PIN presented at UNIT has its
                                    decision (default 12s; given up after 10s without one)
  quit                              stop

Output: the readers' state, what the gateway tells them (output, led, buzzer, text, keyset)
and the decision for each card or PIN (a grant: the next output switched on or green LED; a
deny: a red LED), e.g.
  {\"unit\":1,\"type\":\"state\",\"online\":true,\"secure\":true}
  {\"unit\":1,\"type\":\"output\",\"output_no\":0,\"control\":5,\"time_ms\":3000}
  {\"unit\":1,\"type\":\"grant\",\"request\":\"card\",\"credential\":\"26:0a1b2c40\",\"via\":\"output\",\"after_ms\":41}
  {\"unit\":1,\"type\":\"deny\",\"request\":\"pin\",\"credential\":\"1111\",\"via\":\"led\",\"after_ms\":38}
Example: door-sim --osdp --pty /tmp/ttyOSDP --units 1,2 --scbk 1=000102030405060708090a0b0c0d0e0f

Exit status: 0 after quit, SIGINT or SIGTERM; 2 usage problem; 1 any other error.
See docs/door-sim.md.";

/// Simulated door units (keypads, QR readers, intercom stations) on a door bus
///
/// Answers the gateway's polls as real units would (docs/door-bus.md), for tests, demos and
/// for checking a site's wiring. Presents credentials, reports events and injects faults on
/// command, and prints every decision and command from the gateway as a JSON line.
#[derive(Debug, Parser)]
#[command(name = "door-sim", version, after_help = AFTER_HELP)]
struct Cli {
    /// Create a pseudo-terminal and a symlink at PATH to its device, for the gateway to open
    /// (an old symlink there is replaced; the link is removed on exit)
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "port",
        conflicts_with = "port"
    )]
    pty: Option<PathBuf>,

    /// Open an existing serial device instead (a USB RS-485 adapter, say)
    #[arg(long, value_name = "DEVICE")]
    port: Option<PathBuf>,

    /// Line speed for --port, 8N1; with --osdp also the readers' speed (9600, 19200, 38400,
    /// 57600, 115200 or 230400)
    #[arg(long, default_value_t = 115_200, value_name = "BAUD")]
    baud: u32,

    /// Unit addresses to answer for, 1 to 126: a list with ranges, e.g. 1,2,5-8 (with --osdp:
    /// the readers' OSDP addresses)
    #[arg(long, value_name = "LIST", value_parser = parse_units)]
    units: Units,

    /// The units are OSDP readers (card, keypad, door contact), the gateway their Control
    /// Panel on a bus with protocol = "osdp"
    #[arg(long)]
    osdp: bool,

    /// With --osdp: reader ADDR's secure channel base key, 32 hex digits (repeat for each
    /// reader); a reader without one is in install mode
    #[arg(long, value_name = "ADDR=HEX", value_parser = parse_scbk, requires = "osdp")]
    scbk: Vec<(u8, [u8; 16])>,

    /// Run the commands in FILE first
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,

    /// Do not read commands from standard input
    #[arg(long)]
    no_stdin: bool,

    /// Seed for boot ids, first request ids and noise, to repeat a run exactly [default: from
    /// the clock]
    #[arg(long, value_name = "N", conflicts_with = "osdp")]
    seed: Option<u64>,

    /// Firmware version the units report in their status (at most 32 bytes)
    #[arg(long, value_name = "VERSION", default_value = concat!("door-sim ", env!("CARGO_PKG_VERSION")), conflicts_with = "osdp")]
    firmware: String,

    /// Do not put a status report first in every outbox at start (a real unit does)
    #[arg(long, conflicts_with = "osdp")]
    no_boot_status: bool,
}

/// The unit addresses of `--units`.
#[derive(Clone, Debug)]
struct Units(Vec<Address>);

fn parse_units(text: &str) -> Result<Units, String> {
    let mut units = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (parse_unit(a.trim()), parse_unit(b.trim())),
            None => (parse_unit(part), parse_unit(part)),
        };
        let (from, to) = (
            from.map_err(|e| e.to_string())?,
            to.map_err(|e| e.to_string())?,
        );
        if from > to {
            return Err(format!("{part}: the range runs backwards"));
        }
        for n in from.get()..=to.get() {
            let a = Address::unit(n).ok_or_else(|| format!("{n} is not a unit address"))?;
            if units.contains(&a) {
                return Err(format!("unit {n} is listed twice"));
            }
            units.push(a);
        }
    }
    Ok(Units(units))
}

/// `--scbk ADDR=HEX`.
fn parse_scbk(text: &str) -> Result<(u8, [u8; 16]), String> {
    let (address, hex) = text.split_once('=').ok_or_else(|| {
        format!("{text:?}: write ADDR=HEX, e.g. 1=000102030405060708090a0b0c0d0e0f")
    })?;
    let address = parse_unit(address.trim()).map_err(|e| e.to_string())?.get();
    let key = doorbridge::osdp::key::parse(hex.trim())
        .ok_or_else(|| format!("the key of reader {address} is not 32 hex digits"))?;
    Ok((address, key))
}

/// The checks clap cannot make: exits 2 with a usage error.
fn check_osdp(cli: &Cli) {
    let usage = |message: String| {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit()
    };
    if !cli.osdp {
        return;
    }
    if !osdp::BAUDS.contains(&cli.baud) {
        usage(format!(
            "--baud {} is not an OSDP speed: use one of {:?}",
            cli.baud,
            osdp::BAUDS
        ));
    }
    for (i, (address, _)) in cli.scbk.iter().enumerate() {
        if !cli.units.0.iter().any(|a| a.get() == *address) {
            usage(format!(
                "--scbk {address}=...: reader {address} is not in --units"
            ));
        }
        if cli.scbk[..i].iter().any(|(a, _)| a == address) {
            usage(format!("--scbk gives reader {address} a key twice"));
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    check_osdp(&cli);
    if let Err(error) = init_logging() {
        let _ = writeln!(std::io::stderr(), "door-sim: error: {error:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => return report(&anyhow!(error).context("cannot start the async runtime")),
    };
    let result = runtime.block_on(run(cli));
    // The stdin reader thread may be blocked in a read; it is not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

fn init_logging() -> anyhow::Result<()> {
    let filter = match std::env::var(LOG_ENV) {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("{LOG_ENV}={directives:?} is not a valid log filter"))?,
        Ok(_) | Err(std::env::VarError::NotPresent) => EnvFilter::new("info"),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{LOG_ENV} is not valid UTF-8"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|error| anyhow!(error).context("cannot start logging"))
}

fn report(error: &anyhow::Error) -> ExitCode {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "door-sim: error: {error}");
    for cause in error.chain().skip(1) {
        let _ = writeln!(stderr, "  caused by: {cause}");
    }
    ExitCode::FAILURE
}

/// Prints one JSON line on stdout. A closed stdout is not a reason to stop answering the
/// gateway, so write errors are ignored.
fn emit(line: &JsonLine) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let script = match &cli.script {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the script {}", path.display()))?,
        ),
        None => None,
    };
    let input = Input {
        script,
        script_name: cli
            .script
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        stdin: !cli.no_stdin,
        units: cli.units.0.clone(),
    };
    if cli.osdp {
        return run_osdp(&cli, input).await;
    }
    let config = SimConfig {
        firmware: cli.firmware.clone(),
        seed: cli.seed.unwrap_or_else(clock_seed),
        first_id: None,
        boot_status: !cli.no_boot_status,
        ..SimConfig::default()
    };
    let units = SimUnits::new(&cli.units.0, config).context("cannot set up the units")?;
    let addresses: Vec<u8> = cli.units.0.iter().map(|a| a.get()).collect();
    if let Some(link) = &cli.pty {
        let (master, device) = doorbridge_sim::linked_pty(link)
            .with_context(|| format!("cannot set up a pseudo-terminal at {}", link.display()))?;
        tracing::info!(link = %link.display(), device, "pseudo-terminal ready");
        emit(
            &JsonLine::new()
                .with("type", "ready")
                .with("pty", device.clone())
                .with("link", link.display().to_string())
                .with("units", addresses),
        );
        let port = HangupTolerant::new(master, HANGUP_BACKOFF);
        let result = serve(port, units, input).await;
        doorbridge_sim::pty::remove_link(link, Path::new(&device));
        result
    } else if let Some(path) = &cli.port {
        let name = path.to_string_lossy().into_owned();
        let port = SerialStream::open(&tokio_serial::new(&name, cli.baud))
            .with_context(|| format!("cannot open the serial port {name}"))?;
        tracing::info!(port = name, baud = cli.baud, "serial port open");
        emit(
            &JsonLine::new()
                .with("type", "ready")
                .with("port", name)
                .with("baud", cli.baud)
                .with("units", addresses),
        );
        serve(port, units, input).await
    } else {
        bail!("give --pty PATH or --port DEVICE")
    }
}

/// A seed that differs from run to run.
fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or_default();
    low ^ u64::from(std::process::id()).rotate_left(32)
}

/// Where commands come from.
struct Input {
    script: Option<String>,
    script_name: String,
    stdin: bool,
    units: Vec<Address>,
}

/// How many credentials were presented at each unit, and how many got their decision (or
/// were given up on, or refused): `wait-decision` waits for the second to reach the first.
type Counts = BTreeMap<u8, u64>;

async fn serve<P>(port: P, units: SimUnits, input: Input) -> anyhow::Result<()>
where
    P: AsyncRead + AsyncWrite + Send + 'static,
{
    let (cmd_tx, cmd_rx) = mpsc::channel::<SimCommand>(64);
    let (out_tx, out_rx) = mpsc::channel::<Output>(256);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (resolved_tx, resolved_rx) = watch::channel(Counts::new());
    let printer = tokio::spawn(print_outputs(out_rx, resolved_tx));
    let mut sim = tokio::spawn(run_sim(port, units, cmd_rx, out_tx, async move {
        let _ = stop_rx.await;
    }));

    let commands = async {
        if run_commands(&input, &cmd_tx, resolved_rx).await {
            return "quit";
        }
        tracing::info!("end of the commands; answering the gateway until stopped");
        std::future::pending().await
    };
    let ended = tokio::select! {
        why = commands => Ok(why),
        why = stop_signal() => Ok(why),
        result = &mut sim => Err(result),
    };
    let result = match ended {
        Ok(why) => {
            tracing::info!(why, "stopping");
            let _ = stop_tx.send(());
            (&mut sim).await
        }
        Err(result) => result,
    };
    drop(cmd_tx);
    // The printer ends once run_sim has dropped its sender: every output is printed.
    let _ = printer.await;
    let units = result
        .map_err(|e| anyhow!(e).context("the simulator task failed"))?
        .context("the line failed")?;
    emit(&stats_line(units.stats()));
    Ok(())
}

fn stats_line(s: &SimStats) -> JsonLine {
    JsonLine::new()
        .with("type", "stopped")
        .with("frames_received", s.frames_received)
        .with("addressed", s.addressed)
        .with("answers", s.answers)
        .with("broadcasts", s.broadcasts)
        .with("line_errors", s.line_errors)
        .with("bad_messages", s.bad_messages)
}

/// Completes on SIGTERM or SIGINT (never, if they cannot be listened for).
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    } else {
        tracing::warn!("cannot listen for SIGTERM and SIGINT");
        std::future::pending().await
    }
}

/// Prints every output and counts resolved credentials per unit for `wait-decision`.
async fn print_outputs(mut outputs: mpsc::Receiver<Output>, resolved: watch::Sender<Counts>) {
    while let Some(output) = outputs.recv().await {
        emit(&output.to_json());
        let unit = match &output {
            Output::Decision {
                unit,
                repeat: false,
                ..
            }
            | Output::GaveUp {
                unit,
                repeat: false,
                ..
            }
            | Output::Rejected {
                command: SimCommand::Verify { unit, .. },
                ..
            } => Some(*unit),
            _ => None,
        };
        if let Some(unit) = unit {
            resolved.send_modify(|counts| *counts.entry(unit.get()).or_default() += 1);
        }
    }
}

/// Runs the script, then standard input. Returns true on `quit`.
async fn run_commands(
    input: &Input,
    commands: &mpsc::Sender<SimCommand>,
    mut resolved: watch::Receiver<Counts>,
) -> bool {
    let mut runner = Runner {
        commands,
        units: &input.units,
        presented: Counts::new(),
        resolved: &mut resolved,
    };
    run_lines(input, &mut runner).await
}

/// Carries out command lines.
trait Lines {
    /// Carries out one line. Returns true on `quit`.
    async fn line(&mut self, source: &str, n: usize, text: &str) -> bool;
}

/// Feeds the script, then standard input, to `runner`. Returns true on `quit`.
async fn run_lines(input: &Input, runner: &mut impl Lines) -> bool {
    if let Some(script) = &input.script {
        for (n, line) in script.lines().enumerate() {
            if runner.line(&input.script_name, n + 1, line).await {
                return true;
            }
        }
    }
    if !input.stdin {
        return false;
    }
    let mut lines = stdin_lines();
    let mut n = 0;
    while let Some(line) = lines.recv().await {
        n += 1;
        if runner.line("stdin", n, &line).await {
            return true;
        }
    }
    false
}

/// Standard input, line by line, from a thread of its own (a blocked read must not hold up
/// the end of the program).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if tx.blocking_send(line).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read standard input");
                    return;
                }
            }
        }
    });
    rx
}

struct Runner<'a> {
    commands: &'a mpsc::Sender<SimCommand>,
    units: &'a [Address],
    presented: Counts,
    resolved: &'a mut watch::Receiver<Counts>,
}

/// The `error` line for a command line that cannot be carried out.
fn line_error(source: &str, n: usize, text: &str, message: String) {
    emit(
        &JsonLine::new()
            .with("type", "error")
            .with("source", source)
            .with("line", n)
            .with("input", text)
            .with("error", message),
    );
}

impl Lines for Runner<'_> {
    async fn line(&mut self, source: &str, n: usize, text: &str) -> bool {
        let error = |message: String| line_error(source, n, text, message);
        let parsed = match parse_line(text) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return false,
            Err(e) => {
                error(e.to_string());
                return false;
            }
        };
        match parsed {
            ScriptLine::Sim(command) => {
                if let Some(unit) = command.unit()
                    && !self.units.contains(&unit)
                {
                    error(format!("{unit} is not simulated here (see --units)"));
                    return false;
                }
                let verify_at = match &command {
                    SimCommand::Verify { unit, .. } => Some(unit.get()),
                    _ => None,
                };
                if self.commands.send(command).await.is_err() {
                    error("the simulator has stopped".into());
                    return false;
                }
                if let Some(unit) = verify_at {
                    *self.presented.entry(unit).or_default() += 1;
                }
            }
            ScriptLine::Sleep(d) => tokio::time::sleep(d).await,
            ScriptLine::WaitDecision { unit, timeout } => {
                let target = self.presented.get(&unit.get()).copied().unwrap_or(0);
                let waited = tokio::time::timeout(
                    timeout,
                    self.resolved
                        .wait_for(|counts| counts.get(&unit.get()).copied().unwrap_or(0) >= target),
                )
                .await;
                if waited.is_err() {
                    emit(
                        &JsonLine::new()
                            .with("unit", unit.get())
                            .with("type", "timeout")
                            .with("wait", "decision")
                            .with(
                                "after_ms",
                                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                            ),
                    );
                }
            }
            ScriptLine::Quit => return true,
        }
        false
    }
}

/// `--osdp`: OSDP readers on the line.
async fn run_osdp(cli: &Cli, input: Input) -> anyhow::Result<()> {
    let readers: Vec<ReaderSpec> = cli
        .units
        .0
        .iter()
        .map(|a| ReaderSpec {
            address: a.get(),
            scbk: cli
                .scbk
                .iter()
                .find(|(address, _)| *address == a.get())
                .map(|(_, key)| *key),
        })
        .collect();
    let addresses: Vec<u8> = readers.iter().map(|r| r.address).collect();
    let install: Vec<u8> = readers
        .iter()
        .filter(|r| r.scbk.is_none())
        .map(|r| r.address)
        .collect();
    let ready = JsonLine::new()
        .with("type", "ready")
        .with("protocol", "osdp");
    let ready_end = |line: JsonLine| {
        line.with("baud", cli.baud)
            .with("units", addresses.clone())
            .with("install_mode", install.clone())
    };
    let mut line = SimLine {
        baud: cli.baud,
        readers,
        pty: false,
    };
    if let Some(link) = &cli.pty {
        let (master, device) = osdp::linked_line(link)
            .with_context(|| format!("cannot set up a pseudo-terminal at {}", link.display()))?;
        tracing::info!(link = %link.display(), device, "pseudo-terminal ready");
        emit(&ready_end(
            ready
                .with("pty", device.clone())
                .with("link", link.display().to_string()),
        ));
        line.pty = true;
        let result = serve_osdp(master, &line, &input).await;
        doorbridge_sim::pty::remove_link(link, Path::new(&device));
        result
    } else if let Some(path) = &cli.port {
        let port = osdp::open_port(path, cli.baud)
            .with_context(|| format!("cannot open the serial port {}", path.display()))?;
        tracing::info!(port = %path.display(), baud = cli.baud, "serial port open");
        emit(&ready_end(ready.with("port", path.display().to_string())));
        serve_osdp(port, &line, &input).await
    } else {
        bail!("give --pty PATH or --port DEVICE")
    }
}

async fn serve_osdp<L: osdp::Line>(port: L, line: &SimLine, input: &Input) -> anyhow::Result<()> {
    let (outputs, mut heard) = mpsc::unbounded_channel::<osdp::Output>();
    let readers = osdp::spawn(port, line, outputs).context("cannot set up the readers")?;
    // Ends when the line thread does (stopped, or the line failed): it holds the sender.
    let mut printer = tokio::spawn(async move {
        while let Some(output) = heard.recv().await {
            emit(&output.to_json());
        }
    });
    let commands = async {
        let mut runner = OsdpRunner {
            readers: &readers,
            units: &input.units,
        };
        if run_lines(input, &mut runner).await {
            return "quit";
        }
        tracing::info!("end of the commands; answering the gateway until stopped");
        std::future::pending().await
    };
    let printed_all = tokio::select! {
        why = commands => {
            tracing::info!(why, "stopping");
            false
        }
        why = stop_signal() => {
            tracing::info!(why, "stopping");
            false
        }
        _ = &mut printer => true,
    };
    let result = readers.stop();
    if !printed_all {
        let _ = printer.await;
    }
    let stats = result.map_err(|e| anyhow!(e)).context("the line failed")?;
    emit(
        &JsonLine::new()
            .with("type", "stopped")
            .with("bytes_received", stats.bytes_received)
            .with("bytes_sent", stats.bytes_sent)
            .with("commands", stats.commands),
    );
    Ok(())
}

struct OsdpRunner<'a> {
    readers: &'a osdp::ReadersHandle,
    units: &'a [Address],
}

impl Lines for OsdpRunner<'_> {
    async fn line(&mut self, source: &str, n: usize, text: &str) -> bool {
        let error = |message: String| line_error(source, n, text, message);
        let parsed = match osdp::parse_line(text) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return false,
            Err(e) => {
                error(e);
                return false;
            }
        };
        let unit = match &parsed {
            osdp::ScriptLine::Reader(command) => Some(command.unit),
            osdp::ScriptLine::WaitDecision { unit, .. } => Some(*unit),
            osdp::ScriptLine::Sleep(_) | osdp::ScriptLine::Quit => None,
        };
        if let Some(unit) = unit
            && !self.units.iter().any(|a| a.get() == unit)
        {
            error(format!("reader {unit} is not simulated here (see --units)"));
            return false;
        }
        match parsed {
            osdp::ScriptLine::Reader(command) => {
                if !self.readers.send(command) {
                    error("the readers have stopped".into());
                }
            }
            osdp::ScriptLine::Sleep(d) => tokio::time::sleep(d).await,
            osdp::ScriptLine::WaitDecision { unit, timeout } => {
                if tokio::time::timeout(timeout, self.readers.decided(unit))
                    .await
                    .is_err()
                {
                    emit(
                        &JsonLine::new()
                            .with("unit", unit)
                            .with("type", "timeout")
                            .with("wait", "decision")
                            .with(
                                "after_ms",
                                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                            ),
                    );
                }
            }
            osdp::ScriptLine::Quit => return true,
        }
        false
    }
}
