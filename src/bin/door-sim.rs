//! `door-sim`: simulated door units on a serial line or a pseudo-terminal, driven by a small
//! command language, printing what the gateway sends as JSON lines. A thin shell around
//! `doorbridge::sim`; the manual is `docs/door-sim.md`.
//!
//! Exit status: 0 after `quit`, SIGINT or SIGTERM; 2 a usage problem; 1 any other error.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use doorbridge::bus::frame::Address;
use doorbridge::sim::script::{ScriptLine, parse_line, parse_unit};
use doorbridge::sim::{
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

    /// Line speed for --port, 8N1
    #[arg(long, default_value_t = 115_200, value_name = "BAUD")]
    baud: u32,

    /// Unit addresses to answer for, 1 to 126: a list with ranges, e.g. 1,2,5-8
    #[arg(long, value_name = "LIST", value_parser = parse_units)]
    units: Units,

    /// Run the commands in FILE first
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,

    /// Do not read commands from standard input
    #[arg(long)]
    no_stdin: bool,

    /// Seed for boot ids, first request ids and noise, to repeat a run exactly [default: from
    /// the clock]
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// Firmware version the units report in their status (at most 32 bytes)
    #[arg(long, value_name = "VERSION", default_value = concat!("door-sim ", env!("CARGO_PKG_VERSION")))]
    firmware: String,

    /// Do not put a status report first in every outbox at start (a real unit does)
    #[arg(long)]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let config = SimConfig {
        firmware: cli.firmware.clone(),
        seed: cli.seed.unwrap_or_else(clock_seed),
        first_id: None,
        boot_status: !cli.no_boot_status,
        ..SimConfig::default()
    };
    let units = SimUnits::new(&cli.units.0, config).context("cannot set up the units")?;
    let addresses: Vec<u8> = cli.units.0.iter().map(|a| a.get()).collect();
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
    if let Some(link) = &cli.pty {
        let (master, device) = doorbridge::sim::linked_pty(link)
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
        doorbridge::sim::pty::remove_link(link, Path::new(&device));
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

impl Runner<'_> {
    /// Carries out one line. Returns true on `quit`.
    async fn line(&mut self, source: &str, n: usize, text: &str) -> bool {
        let error = |message: String| {
            emit(
                &JsonLine::new()
                    .with("type", "error")
                    .with("source", source)
                    .with("line", n)
                    .with("input", text)
                    .with("error", message),
            );
        };
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
