//! The `doorbridge` binary: parses the command line, loads the configuration, starts logging
//! and hands over to the library. Everything else lives in the `doorbridge` crate.
//!
//! Exit status: 0 success; 2 a configuration (or command-line) problem; 1 any other error (and
//! for `check-config --configured`: not configured yet). `status` and `doctor` have their own.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use doorbridge::cli::{Cli, Command, EventsArgs, EventsTail, KeysCommand, OsdpCommand};
use doorbridge::config::{self, ConfigErrors, Sources};
use doorbridge::service::logging;
use doorbridge::store::Reader;
use doorbridge::{control, history, operator};

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
        Command::Identity => identity(&config::load(&sources)?),
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
        Command::CheckConfig { configured } => check_config(&sources, configured),
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
/// With `--configured` (`only_configured`), only whether any source sets any key.
fn check_config(sources: &Sources, only_configured: bool) -> anyhow::Result<()> {
    if only_configured {
        if config::is_unconfigured(sources) {
            not_configured(sources);
        }
        return Ok(());
    }
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

/// `doorbridge check-config --configured` on a configuration that sets no key: says so, exit 1
/// (the unit's `ExecCondition=`: systemd skips the start, the unit does not fail).
fn not_configured(sources: &Sources) -> ! {
    // Under systemd (ExecCondition=) this line is the journal's answer to "why did it not
    // start": `<5>`, notice, rather than the stream's default info.
    let prefix = if std::env::var_os("JOURNAL_STREAM").is_some() {
        "<5>"
    } else {
        ""
    };
    eprintln!(
        "{prefix}doorbridge: not configured yet: no key is set in {}, {}/*.toml or a \
         DOORBRIDGE_* variable; set gateway.id and the rest (every key is in \
         /usr/share/doc/doorbridge/examples/doorbridge.toml), then `systemctl start doorbridge`",
        sources.file.display(),
        sources.dropin_dir.display()
    );
    std::process::exit(1);
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

/// `doorbridge identity`: the public key the cloud enrols. Never makes one: the daemon does,
/// as the user that owns the state directory.
fn identity(config: &config::Config) -> anyhow::Result<()> {
    let dir = doorbridge::store::chain::Identity::state_dir(&config.storage.path);
    let path = doorbridge::store::chain::Identity::path_in(&dir);
    if !path.exists() {
        anyhow::bail!(
            "no gateway identity at {} yet: it is made when the gateway first starts",
            path.display()
        );
    }
    let id = doorbridge::store::chain::Identity::load_or_create(&dir)?;
    println!("{}", id.public_hex());
    Ok(())
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
