//! The command line of `doorbridge`, as clap reads it: the commands, their options and their
//! `--help` text. The binary parses with it, and the generator of the man pages and shell
//! completions (`examples/gen-docs.rs`, run by `packaging/build-deb`) renders it, so the pages
//! and the completions say exactly what the binary parses.

use std::path::PathBuf;

use crate::config::{self, CONFIG_ENV};
use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Configuration sources, later ones override earlier ones key by key:
  1. the main file: /etc/doorbridge/doorbridge.toml, or the one named by --config PATH
     (or DOORBRIDGE_CONFIG); it must exist;
  2. config.d/*.toml in the main file's directory, in sorted file-name order;
  3. DOORBRIDGE_* environment variables, with `__` between nested keys, e.g.
     DOORBRIDGE_STORAGE__PATH=/data/doorbridge.db or DOORBRIDGE_CLOUD__PASSWORD=...
DOORBRIDGE_LOG is not a configuration key: it overrides log.level with a tracing filter
directive, e.g. DOORBRIDGE_LOG=\"info,doorbridge::bus=trace\".

Exit status: 0 success, 2 configuration or usage problem, 1 any other error
(check-config --configured: 1 not configured yet; status and doctor: see their --help).
See docs/configuration.md and the annotated example config/doorbridge.toml.";

/// Edge gateway for smart intercoms: syncs key sets from the cloud over MQTT, decides door
/// requests locally over RS-485 (also offline), uploads activity without loss.
#[derive(Debug, Parser)]
#[command(name = "doorbridge", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The main configuration file [default: /etc/doorbridge/doorbridge.toml]
    #[arg(short, long, global = true, value_name = "PATH", env = CONFIG_ENV)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

// The doc comments are the commands' --help text, not rustdoc: no Markdown backticks.
#[allow(clippy::doc_markdown)]
#[derive(Debug, Subcommand)]
pub enum Command {
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
    ///
    /// With --configured it only tells whether this gateway has been configured at all, for
    /// the systemd unit's ExecCondition=: exit 1, with a notice on stderr, when no file and no
    /// DOORBRIDGE_* variable sets any key (the configuration as the package ships it, every
    /// key commented out), so that systemd skips the start instead of failing it; exit 0
    /// otherwise, checking nothing more: a configuration with problems then fails at `run`,
    /// which names them. A file that cannot be read or parsed counts as configured.
    CheckConfig {
        /// Only tell whether any source sets any key: exit 0 if so, 1 if not
        #[arg(long)]
        configured: bool,
    },
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
    /// Print the gateway's public key, for enrolment in the cloud
    ///
    /// The gateway makes its own Ed25519 identity at first start, in identity.key next to
    /// the database (storage.path's directory, mode 0600), and signs its tamper-evident record
    /// chain with it (docs/cloud-protocol.md §12.6). Prints the public key as 64 hex digits;
    /// exits 1 when the gateway has not made its identity yet (it has never run).
    Identity,
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
pub enum OsdpCommand {
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
pub struct EventsArgs {
    /// Only this door's records
    #[arg(long, value_name = "DOOR")]
    pub door: Option<String>,
    /// Only decisions on this key
    #[arg(long, value_name = "KEY_ID")]
    pub key: Option<String>,
    /// Only this door unit's records (BUS/ADDRESS, as status shows it)
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// From this time: 2026-12-04T18:00:00Z, 2026-12-04 18:00 or 2026-12-04 (site time), or
    /// an age such as 30m, 2h, 7d
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Up to this time (same forms as --since)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only refused decisions
    #[arg(long)]
    pub denied: bool,
    /// Only these record types, comma-separated or repeated: activity, door_event, tamper,
    /// battery, call_button, unit_reachability, pin_lockout, ... (all: see docs/operations.md)
    #[arg(long, value_name = "KIND")]
    pub kind: Vec<String>,
    /// How many of the latest matching records to print (without --since/--until)
    #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
    pub lines: usize,
    /// Keep printing new records as they are committed
    #[arg(short, long)]
    pub follow: bool,
    /// Times in UTC instead of the site's local time
    #[arg(long)]
    pub utc: bool,
    /// JSON lines ({"seq":N,"record":{...}}, times in UTC) instead of text
    #[arg(long)]
    pub json: bool,
    /// Accepted for scripts written for older versions: same as no subcommand
    #[command(subcommand)]
    pub tail: Option<EventsTail>,
}

#[derive(Debug, Subcommand)]
pub enum EventsTail {
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
pub enum KeysCommand {
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

/// A duration as the configuration writes them (`15m`, `1h 30m`, `7d`).
fn parse_signed_duration(text: &str) -> Result<jiff::SignedDuration, String> {
    let d = config::values::parse_duration(text)?;
    jiff::SignedDuration::try_from(d).map_err(|e| e.to_string())
}
