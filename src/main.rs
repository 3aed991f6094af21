//! The `doorbridge` binary: parses the command line, loads the configuration, starts logging
//! and hands over to the library. Everything else lives in the `doorbridge` crate.
//!
//! Exit status: 0 success; 2 a configuration (or command-line) problem; 1 any other error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use doorbridge::config::{self, CONFIG_ENV, ConfigErrors, Sources};
use doorbridge::service::logging;
use doorbridge::store::Reader;
use doorbridge::{control, history, operator};

const AFTER_HELP: &str = "\
Configuration sources, later ones override earlier ones key by key:
  1. the main file: /etc/doorbridge/doorbridge.toml, or the one named by --config PATH
     (or DOORBRIDGE_CONFIG); it must exist;
  2. config.d/*.toml in the main file's directory, in sorted file-name order;
  3. DOORBRIDGE_* environment variables, with `__` between nested keys, e.g.
     DOORBRIDGE_STORAGE__PATH=/data/doorbridge.db or DOORBRIDGE_CLOUD__PASSWORD=...
DOORBRIDGE_LOG is not a configuration key: it overrides log.level with a tracing filter
directive, e.g. DOORBRIDGE_LOG=\"info,doorbridge::bus=trace\".

Exit status: 0 success, 2 configuration or usage problem, 1 any other error.
See docs/configuration.md and the annotated example config/doorbridge.toml.";

/// Edge gateway for smart intercoms: syncs key sets from the cloud over MQTT, decides door
/// requests locally over RS-485 (also offline), uploads activity without loss.
#[derive(Debug, Parser)]
#[command(name = "doorbridge", version, after_help = AFTER_HELP)]
struct Cli {
    /// The main configuration file [default: /etc/doorbridge/doorbridge.toml]
    #[arg(short, long, global = true, value_name = "PATH", env = CONFIG_ENV)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

// The doc comments are the commands' --help text, not rustdoc: no Markdown backticks.
#[allow(clippy::doc_markdown)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (what the systemd service starts)
    ///
    /// Loads and checks the configuration (exit 2 with every problem if it is bad), logs at
    /// log.level (DOORBRIDGE_LOG overrides) to journald under systemd, else to stderr, then
    /// serves the door buses and the cloud link until SIGTERM or SIGINT. SIGHUP reloads the
    /// configuration; see docs/service.md.
    Run,
    /// Check the configuration and print the effective result
    ///
    /// Merges all sources, validates them and prints the effective configuration as TOML
    /// (defaults filled in, secrets shown as "<redacted>") to stdout, exit 0. Otherwise prints
    /// every problem to stderr, one per line as `SOURCE: KEY: PROBLEM` where SOURCE is the file
    /// or environment variable that set the key, and exits 2.
    CheckConfig,
    /// Show the running gateway: cloud connection, key set, outbox, clock, door units
    ///
    /// Asks the running daemon over its control socket (next to the database:
    /// storage.path + ".sock"; run as root or in the doorbridge group). Shows the cloud
    /// connection, the key-set version and age, the outbox depth, the clock's trust, and each
    /// bus and door unit with when it was last seen, its battery and error counts. When the
    /// daemon does not answer, prints what the database says and exits 3.
    ///
    /// Exits as monitoring systems expect (the Nagios plugin convention): 0 OK, 1 WARNING (a
    /// unit offline, a low battery, the cloud unreachable longer than --max-offline, more
    /// records waiting than --max-outbox, a key set older than --max-keyset-age), 2 CRITICAL
    /// (no key set, a bus port not open, every unit of a bus offline, clock untrusted, the
    /// disk refusing writes), 3 UNKNOWN (the daemon does not answer). The last line says
    /// which and why. docs/operations.md has the rules.
    Status {
        /// One JSON object on one line, with a "verdict" member
        #[arg(long)]
        json: bool,
        /// How long the cloud may be unreachable before it is a warning
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_signed_duration)]
        max_offline: jiff::SignedDuration,
        /// How many records may wait for upload before it is a warning
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        max_outbox: u64,
        /// How old the held key set (its signing time) may be before it is a warning [default:
        /// not judged]
        #[arg(long, value_name = "DURATION", value_parser = parse_signed_duration)]
        max_keyset_age: Option<jiff::SignedDuration>,
    },
    /// Check the installation: ports, TLS files, brokers, clock, disk, database
    ///
    /// Runs every check and prints one line each, OK, WARNING or FAIL, with a hint under
    /// each that is not OK: the configuration loads; every bus's serial port exists and opens
    /// read/write (a port the running daemon holds is OK); for mqtts:// the CA, client
    /// certificate and key are readable, valid today and matching; every broker URL resolves,
    /// accepts TCP, the TLS handshake and an MQTT CONNECT with the configured credentials
    /// (client id GATEWAY-doctor, clean session: the daemon's session is untouched); the clock
    /// is synchronised; the database's disk has room and its reserve file; the database passes
    /// quick_check (--full: integrity_check); a key set is held and not older than 30 days.
    ///
    /// Exits 0 when all are OK, 1 on a warning, 2 on a failure. docs/operations.md explains
    /// each check.
    Doctor {
        /// One JSON object per check, each on its own line
        #[arg(long)]
        json: bool,
        /// Run the full integrity check of the database (every page and index; can take
        /// minutes on a large store) instead of the quick one
        #[arg(long)]
        full: bool,
    },
    /// Manage the key set held by this gateway
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The door history: decisions, door events, alarms and telemetry, filtered
    ///
    /// Read from the database (the daemon need not run): every record of the last
    /// storage.history_days (uploaded or still waiting), oldest first, in the site's local
    /// time. Without --since or --until, the last -n records that match. --follow then
    /// prints new ones as they are committed, until Ctrl-C. Never shows a credential.
    ///
    /// Examples: doorbridge events --door main --denied --since 2h;
    /// doorbridge events --kind door_event,tamper --since 2026-12-01 --until 2026-12-02;
    /// doorbridge events -f --json
    Events(EventsArgs),
    /// OSDP card readers and keypads (docs/osdp.md)
    #[command(subcommand)]
    Osdp(OsdpCommand),
}

// The doc comments are the commands' --help text, not rustdoc: no Markdown backticks.
#[allow(clippy::doc_markdown)]
#[derive(Debug, Subcommand)]
enum OsdpCommand {
    /// Give a new reader its own secure channel key
    ///
    /// The reader must be in install mode (fresh from the factory, or reset): it then accepts
    /// one secure channel session with the default key SCBK-D. Over it a new random key is
    /// sent (osdp_KEYSET) and proven with a second session that allows nothing but that key.
    /// The key goes to the reader's key_file (buses.units.osdp.key_file, mode 0600; written
    /// as KEYFILE.new before the reader gets it, renamed once proven). Never printed: it is
    /// named by a fingerprint.
    ///
    /// Stop the service first (systemctl stop doorbridge): the serial port opens exclusively.
    Install {
        /// The bus the reader is on: its name, or its port
        #[arg(long, value_name = "NAME")]
        bus: String,
        /// The reader's OSDP address on that bus
        #[arg(long, value_name = "N")]
        address: u8,
        /// How long each step may take
        #[arg(long, value_name = "SECONDS", default_value_t = 15)]
        timeout: u64,
    },
}

// The doc comments are the commands' --help text, not rustdoc: no Markdown backticks.
#[allow(clippy::doc_markdown)]
// Command-line flags are bools by nature.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, clap::Args)]
struct EventsArgs {
    /// Only this door's records
    #[arg(long, value_name = "DOOR")]
    door: Option<String>,
    /// Only decisions on this key
    #[arg(long, value_name = "KEY_ID")]
    key: Option<String>,
    /// Only this door unit's records (BUS/ADDRESS, as status shows it)
    #[arg(long, value_name = "UNIT")]
    unit: Option<String>,
    /// From this time: 2026-12-04T18:00:00Z, 2026-12-04 18:00 or 2026-12-04 (site time), or
    /// an age such as 30m, 2h, 7d
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Up to this time (same forms as --since)
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only refused decisions
    #[arg(long)]
    denied: bool,
    /// Only these record types, comma-separated or repeated: activity, door_event, tamper,
    /// battery, call_button, unit_reachability, pin_lockout, ... (all: see docs/operations.md)
    #[arg(long, value_name = "KIND")]
    kind: Vec<String>,
    /// How many of the latest matching records to print (without --since/--until)
    #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
    lines: usize,
    /// Keep printing new records as they are committed
    #[arg(short, long)]
    follow: bool,
    /// Times in UTC instead of the site's local time
    #[arg(long)]
    utc: bool,
    /// JSON lines ({"seq":N,"record":{...}}, times in UTC) instead of text
    #[arg(long)]
    json: bool,
    /// Accepted for scripts written for older versions: same as no subcommand
    #[command(subcommand)]
    tail: Option<EventsTail>,
}

#[derive(Debug, Subcommand)]
enum EventsTail {
    /// The same as `doorbridge events` (kept for older scripts)
    #[command(hide = true)]
    Tail {
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
}

// The doc comments are the commands' --help text, not rustdoc: no Markdown backticks.
#[allow(clippy::doc_markdown)]
#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Install a signed key set from a file (a site without internet)
    ///
    /// FILE is a key-set bundle as `cloud-sim build` or the cloud writes it: a signed manifest
    /// and its chunks. It is checked exactly as over MQTT: signed by a key in
    /// cloud.trusted_keys, for this gateway (gateway.id and gateway.site_id), newer than the
    /// held version, every chunk matching its manifest hash, the key count adding up. Only
    /// then does it replace the held set, in one transaction; otherwise nothing changes.
    ///
    /// The service holds the store while it runs: stop it first (systemctl stop doorbridge),
    /// import, then start it again.
    Import {
        /// The key-set bundle file
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the keys of the held set: id, category, doors, use limit, revoked
    ///
    /// Reads the database (read-only; works whether the service runs or not). Never prints a
    /// credential: --json adds how many credentials of each kind a key has, and its use
    /// counts.
    List {
        /// One JSON object per key instead of text
        #[arg(long)]
        json: bool,
    },
    /// Show one key of the held set in full (never its credentials)
    Show {
        /// The key's id
        #[arg(value_name = "ID")]
        id: String,
        /// Compact JSON instead of indented
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

fn execute(cli: &Cli) -> anyhow::Result<()> {
    let sources = Sources::new(cli.config.as_deref());
    match cli.command {
        Command::Run => {
            let config = config::load(&sources)?;
            let logging = logging::init(config.log.level)?;
            tracing::info!(
                gateway = %config.gateway.id,
                config = %sources.file.display(),
                log = ?logging.sink(),
                "doorbridge {} starting",
                env!("CARGO_PKG_VERSION")
            );
            doorbridge::daemon::run(&config, sources.clone(), Some(logging))
                .context("the gateway stopped with an error")?;
            Ok(())
        }
        Command::Keys(KeysCommand::Import { ref file }) => {
            let config = config::load(&sources)?;
            logging::init(config.log.level)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let imported = runtime
                .block_on(doorbridge::cloud::import::import_file(
                    &config,
                    file,
                    progress(),
                ))
                .with_context(|| format!("{} was not imported", file.display()))?;
            println!(
                "imported key set version {} ({} keys in {} chunks) from {}",
                imported.version,
                imported.keys,
                imported.chunks,
                file.display()
            );
            Ok(())
        }
        Command::Status {
            json,
            max_offline,
            max_outbox,
            max_keyset_age,
        } => {
            let limits = operator::Limits {
                offline: max_offline,
                outbox: max_outbox,
                keyset_age: max_keyset_age,
            };
            status(&config::load(&sources)?, json, &limits)
        }
        Command::Doctor { json, full } => doctor(&sources, json, full),
        Command::Keys(KeysCommand::List { json }) => {
            let reader = read_store(&config::load(&sources)?)?;
            let mut out = std::io::stdout().lock();
            operator::keys_list(&reader, json, &mut out)?;
            Ok(())
        }
        Command::Keys(KeysCommand::Show { ref id, json }) => {
            let reader = read_store(&config::load(&sources)?)?;
            if !operator::key_show(&reader, id, json, &mut std::io::stdout().lock())? {
                bail!("the held key set has no key {id:?}");
            }
            Ok(())
        }
        Command::Events(ref args) => events(&sources, args),
        Command::Osdp(OsdpCommand::Install {
            ref bus,
            address,
            timeout,
        }) => osdp_install(&sources, bus, address, timeout),
        Command::CheckConfig => check_config(&sources),
    }
}

/// `doorbridge events`: the door history from the database.
fn events(sources: &Sources, args: &EventsArgs) -> anyhow::Result<()> {
    let (mut lines, mut follow, mut json) = (args.lines, args.follow, args.json);
    if let Some(EventsTail::Tail {
        lines: n,
        follow: f,
        json: j,
    }) = &args.tail
    {
        lines = n.unwrap_or(lines);
        follow |= f;
        json |= j;
    }
    if follow && args.until.is_some() {
        bail!("--follow prints new records as they come: it does not go with --until");
    }
    let reader = read_store(&config::load(sources)?)?;
    let tz = if args.utc {
        jiff::tz::TimeZone::UTC
    } else {
        jiff::tz::TimeZone::system()
    };
    let now = jiff::Timestamp::now();
    let time = |t: &Option<String>| {
        t.as_deref()
            .map(|t| history::parse_time(t, now, &tz))
            .transpose()
    };
    let filter = history::Filter {
        door: args.door.clone(),
        key: args.key.clone(),
        unit: args.unit.clone(),
        since: time(&args.since)?,
        until: time(&args.until)?,
        denied: args.denied,
        kinds: history::Filter::kinds(&args.kind)?,
    };
    let ranged = filter.since.is_some() || filter.until.is_some();
    let how = history::Output {
        json,
        tz,
        last: (!ranged).then_some(lines),
    };
    let mut out = std::io::stdout().lock();
    let printed = history::print(&reader, &filter, &how, &mut out).and_then(|last| {
        if follow {
            history::follow(
                &reader,
                &filter,
                &how,
                last,
                std::time::Duration::from_millis(250),
                &mut out,
            )
        } else {
            Ok(())
        }
    });
    match printed {
        // `doorbridge events | head`: the reader went away; nothing is wrong.
        Err(operator::OutputError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        other => Ok(other?),
    }
}

/// `doorbridge check-config`: the effective configuration on stdout, warnings on stderr.
fn check_config(sources: &Sources) -> anyhow::Result<()> {
    let (config, layers) = config::load_with_layers(sources)?;
    let mut text = String::from(
        "# doorbridge: effective configuration (secrets redacted)\n# sources, later wins:\n",
    );
    for layer in &layers {
        text.push_str("#   ");
        text.push_str(layer);
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&config.redacted_toml());
    // Files the configuration names (TLS) are read only by the link; say now if they
    // will not do, without failing a check that is also run on build machines.
    if let Err(e) = doorbridge::cloud::link::spec(&config) {
        eprintln!("doorbridge: warning: the cloud link will not start: {e}");
    }
    for warning in config.osdp_warnings() {
        eprintln!("doorbridge: warning: {warning}");
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to standard output")?;
    Ok(())
}

/// `doorbridge osdp install`: provisions one reader, saying each step on stderr.
fn osdp_install(sources: &Sources, bus: &str, address: u8, timeout: u64) -> anyhow::Result<()> {
    let config = config::load(sources)?;
    logging::init(config.log.level)?;
    let request = osdp_install_request(&config, bus, address, timeout)?;
    let installed = doorbridge::osdp::install::install(&request, |line| eprintln!("{line}"))?;
    println!(
        "provisioned reader {address} on bus {bus}: key {} in {} ({:.1} s)",
        installed.fingerprint,
        installed.key_file.display(),
        installed.took.as_secs_f64()
    );
    Ok(())
}

/// What `osdp install` works on: the reader's bus and key file from the configuration.
fn osdp_install_request(
    config: &config::Config,
    bus: &str,
    address: u8,
    timeout: u64,
) -> anyhow::Result<doorbridge::osdp::install::InstallRequest> {
    let osdp_buses: Vec<_> = config
        .buses
        .iter()
        .filter(|b| b.protocol == config::BusProtocol::Osdp)
        .collect();
    let Some(line) = osdp_buses
        .iter()
        .find(|b| b.label() == bus || b.port.as_os_str() == bus)
    else {
        let names: Vec<String> = osdp_buses.iter().map(|b| b.label()).collect();
        bail!(
            "no OSDP bus {bus:?} in the configuration (OSDP buses: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    let Some(unit) = line.units.iter().find(|u| u.address == address) else {
        bail!(
            "bus {bus} has no reader at address {address} (add a [[buses.units]] with address = {address} first)"
        );
    };
    let Some(key_file) = unit.osdp.as_ref().and_then(|o| o.key_file.clone()) else {
        bail!(
            "the reader at address {address} on bus {bus} names no key file: set key_file in its [buses.units.osdp]"
        );
    };
    Ok(doorbridge::osdp::install::InstallRequest {
        bus: line.label(),
        port: line.port.clone(),
        baud: line.baud,
        rs485: doorbridge::daemon::rs485_of(line),
        address,
        key_file,
        timeout: std::time::Duration::from_secs(timeout.max(1)),
    })
}

/// The store at `config.storage.path`, read-only.
fn read_store(config: &config::Config) -> anyhow::Result<Reader> {
    let path = &config.storage.path;
    if !path.exists() {
        bail!(
            "no database at {} (storage.path): has the gateway run yet?",
            path.display()
        );
    }
    Reader::open(path).with_context(|| format!("cannot read the database {}", path.display()))
}

/// `doorbridge status`: the daemon's answer, or what the database says and exit 3.
fn status(config: &config::Config, json: bool, limits: &operator::Limits) -> anyhow::Result<()> {
    let socket = control::socket_path(&config.storage.path);
    let mut answer = None;
    let asked = control::ask(&socket, &control::Request::Status, |s: control::Status| {
        answer = Some(s);
        false
    });
    let mut out = std::io::stdout().lock();
    match (asked, answer) {
        (Ok(()), Some(s)) => {
            let now = jiff::Timestamp::now();
            let (level, reasons) = operator::verdict(&s, now, limits);
            if json {
                let mut v = serde_json::to_value(&s)?;
                v["verdict"] = serde_json::json!({ "level": level, "reasons": reasons });
                writeln!(out, "{v}")?;
            } else {
                write!(out, "{}", operator::status_text(&s, now))?;
                if reasons.is_empty() {
                    writeln!(out, "verdict   {}", level.word())?;
                } else {
                    writeln!(out, "verdict   {}: {}", level.word(), reasons.join("; "))?;
                }
            }
            out.flush()?;
            std::process::exit(i32::from(level.code()));
        }
        (result, _) => {
            let denied = matches!(&result, Err(control::ControlError::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied);
            let why = match result {
                Err(control::ControlError::Connect { ref path, .. }) if denied => {
                    format!(
                        "permission denied on the control socket {path}: add your user to the \
                         doorbridge group (sudo usermod -aG doorbridge $USER, then log in again), \
                         or run this with sudo"
                    )
                }
                Err(e) => e.to_string(),
                Ok(()) => "the daemon gave no answer".to_owned(),
            };
            let stored = read_store(config).and_then(|r| Ok(operator::offline_status(&r)?));
            match (json, stored) {
                (true, Ok(mut v)) => {
                    v["error"] = serde_json::Value::String(why.clone());
                    v["verdict"] = serde_json::json!({ "level": operator::Level::Unknown, "reasons": [why.clone()] });
                    writeln!(out, "{v}")?;
                }
                (false, Ok(v)) => writeln!(
                    out,
                    "daemon    {}\nkey set   version {}, {} keys\noutbox    {} records waiting for upload\nverdict   UNKNOWN",
                    if denied {
                        "not reachable (permission denied)"
                    } else {
                        "not running"
                    },
                    v["health"]["keyset"]["version"],
                    v["health"]["keyset"]["keys"],
                    v["health"]["outbox_depth"]
                )?,
                (_, Err(e)) => eprintln!("doorbridge: {e:#}"),
            }
            out.flush()?;
            eprintln!("doorbridge: {why}");
            std::process::exit(i32::from(operator::Level::Unknown.code()));
        }
    }
}

/// `doorbridge doctor`: every check as it completes, then exit with the worst verdict.
fn doctor(sources: &Sources, json: bool, full: bool) -> anyhow::Result<()> {
    use doorbridge::doctor::{self, Check, Verdict};
    let mut out = std::io::stdout().lock();
    let mut worst = Verdict::Ok;
    let mut print = |check: &Check| {
        worst = worst.max(check.verdict);
        let line = if json {
            serde_json::to_string(check).unwrap_or_default()
        } else {
            check.text()
        };
        // A closed stdout (`doctor | head`) must not stop the checks' verdict from counting.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    };
    match config::load(sources) {
        Ok(config) => {
            doctor::run(&config, &sources.file, doctor::Options { full }, &mut print);
        }
        Err(errors) => print(&Check::configuration_failed(
            &sources.file,
            &errors.to_string(),
        )),
    }
    std::process::exit(i32::from(worst.code()));
}

/// A duration as the configuration writes them (`15m`, `1h 30m`, `7d`).
fn parse_signed_duration(text: &str) -> Result<jiff::SignedDuration, String> {
    let d = config::values::parse_duration(text)?;
    jiff::SignedDuration::try_from(d).map_err(|e| e.to_string())
}

/// Progress on stderr: every chunk on a terminal, every tenth of the way otherwise.
fn progress() -> impl FnMut(u32, u32) {
    let tty = std::io::stderr().is_terminal();
    let mut shown = 0;
    move |done, total| {
        let step = (total / 10).max(1);
        if tty {
            eprint!("\rchecking and staging chunk {done}/{total}");
            if done == total {
                eprintln!();
            }
        } else if done == total || done >= shown + step {
            shown = done;
            eprintln!("checking and staging chunk {done}/{total}");
        }
    }
}

/// Prints `error` to stderr: every configuration problem, or the whole chain of causes.
fn report(error: &anyhow::Error) -> ExitCode {
    // The reader went away (`keys list | head`): nothing to say, as any Unix filter.
    if error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    let (text, code) = if let Some(errors) = error.downcast_ref::<ConfigErrors>() {
        let count = errors.problems.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        (
            format!("doorbridge: the configuration has {count} {noun}:\n{errors}"),
            ExitCode::from(2),
        )
    } else {
        let mut text = format!("doorbridge: error: {error}");
        for cause in error.chain().skip(1) {
            let _ = std::fmt::Write::write_fmt(&mut text, format_args!("\n  caused by: {cause}"));
        }
        (text, ExitCode::FAILURE)
    };
    // Under systemd, stderr goes to the journal at info priority unless a line says otherwise:
    // `<3>` makes each of these lines an error, so `journalctl -p warning` shows why the unit
    // failed.
    let prefix = if std::env::var_os("JOURNAL_STREAM").is_some() {
        "<3>"
    } else {
        ""
    };
    let mut stderr = std::io::stderr().lock();
    // Nothing sensible is left to do if stderr itself fails.
    for line in text.lines() {
        let _ = writeln!(stderr, "{prefix}{line}");
    }
    code
}
