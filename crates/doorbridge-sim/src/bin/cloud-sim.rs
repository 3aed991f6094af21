//! `cloud-sim`: a reference cloud for doorbridge gateways. Makes signing keys, builds signed
//! key sets from a keys file (as an offline bundle or published over MQTT), sends heartbeats,
//! open-door and resync commands, and prints what gateways report. A thin shell around
//! `doorbridge_sim::{build, keyfile, cloud}` and `doorbridge::cloud::bundle`; the manual is
//! `docs/cloud-sim.md`.
//!
//! Exit status: 0 success; 2 a usage problem; 1 any other error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use doorbridge::access::{Category, StaleLimits};
use doorbridge::cloud::bundle::Bundle;
use doorbridge::cloud::envelope::SignerId;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::sync::DEFAULT_COMMAND_LIFETIME;
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::cloud::uplink::Batch;
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::{CloudClient, RecordLedger, decode_report, hex, record_json};
use doorbridge_sim::durable::{DurableSubscriber, Update};
use doorbridge_sim::keyfile::{KeyFile, parse_hex};
use ed25519_dalek::SigningKey;
use jiff::{SignedDuration, Timestamp};

const AFTER_HELP: &str = "\
A session (docs/cloud-sim.md has more):
  cloud-sim keygen --out ./cloud-keys            # prints the line for cloud.trusted_keys
  cloud-sim build --signing-key ./cloud-keys/signing.key --keys config/keys.example.toml \\
      --site s1 --gateway gw1 --version 1 --out keys.dbk      # for doorbridge keys import
  cloud-sim watch --url mqtt://localhost:1883 &                 # what gateways report
  cloud-sim records --url mqtt://localhost:1883 > records.jsonl # their activity, each once
  cloud-sim publish --url mqtt://localhost:1883 --site s1 --gateway gw1 \\
      --signing-key ./cloud-keys/signing.key snapshot --keys config/keys.example.toml --version 2
  cloud-sim publish ... delta --from 2 --version 3 --delete courier-dhl-0412
  cloud-sim heartbeat --url mqtt://localhost:1883 --site s1 --gateway gw1 \
      --signing-key ./cloud-keys/signing.key --version 3 --every 5m   # keeps stale_after keys fresh
  cloud-sim open-door --url mqtt://localhost:1883 --site s1 --gateway gw1 \\
      --signing-key ./cloud-keys/signing.key --door main --key-id owner-ann

Keys files: docs/keys-file.md (TOML, or JSON for *.json). Plain MQTT over TCP only.
Exit status: 0 success; 2 usage problem; 1 any other error.";

/// A reference cloud for doorbridge gateways
///
/// Speaks the cloud side of docs/cloud-protocol.md: signs key-set snapshots, deltas and
/// commands with an Ed25519 key the gateway trusts, publishes them on a gateway's MQTT topics
/// or writes an offline bundle, and prints the gateways' reports as JSON lines.
#[derive(Debug, Parser)]
#[command(name = "cloud-sim", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a signing key: DIR/signing.key (secret seed, hex, mode 0600) and DIR/signing.pub
    /// (public key, hex); print the trusted keys line for the gateway's cloud section
    Keygen {
        /// Directory to write into (created if missing); existing key files are not replaced
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Build a signed snapshot from a keys file and write it as a bundle for
    /// `doorbridge keys import FILE` (no network); prints keys, chunks and bytes
    Build {
        #[command(flatten)]
        target: TargetArgs,
        /// The signing key written by keygen (hex of the 32-byte seed)
        #[arg(long, value_name = "FILE")]
        signing_key: PathBuf,
        /// The keys file (docs/keys-file.md)
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        /// The key-set version, above the one the gateway holds (1 or more)
        #[arg(long, value_name = "N")]
        version: u64,
        /// The signing time, RFC 3339 [default: now]; the gateway takes it as trusted time
        #[arg(long, value_name = "TIME")]
        issued_at: Option<Timestamp>,
        /// Where to write the bundle (replaced if it exists)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Keys of these categories stop opening when the gateway has not heard from the cloud
        /// for this long: CATEGORY=DURATION[,...], e.g. delivery=24h,event=12h (not friend)
        #[arg(long, value_name = "LIMITS", value_parser = parse_stale_after)]
        stale_after: Option<StaleLimits>,
    },
    /// Publish a key set (snapshot) or a change to it (delta) on a gateway's topics
    Publish {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        what: PublishWhat,
    },
    /// Send signed heartbeats (keys/heartbeat, at most once): the cloud vouches that VERSION is the
    /// latest key-set version it has made for the gateway, as of now
    ///
    /// A gateway holding exactly that version raises its knowledge time, so keys limited by
    /// the key set's stale-after limits keep opening; one holding an older version asks for a
    /// resync.
    /// Sends one and exits, or with --every keeps sending (each signed when sent) until
    /// Ctrl-C or --count heartbeats.
    Heartbeat {
        #[command(flatten)]
        conn: Connection,
        /// The latest key-set version made for the gateway (the one it should hold)
        #[arg(long, value_name = "N")]
        version: u64,
        /// Send one every DURATION (e.g. 5m) until Ctrl-C
        #[arg(long, value_name = "DURATION", value_parser = parse_std_duration, conflicts_with = "issued_at")]
        every: Option<Duration>,
        /// With --every: stop after N heartbeats
        #[arg(long, value_name = "N", requires = "every")]
        count: Option<u64>,
    },
    /// Send a signed open-door command to a gateway (cmd/open-door)
    OpenDoor {
        #[command(flatten)]
        conn: Connection,
        /// The door to open
        #[arg(long, value_name = "DOOR")]
        door: String,
        /// The key on whose behalf it opens (for the activity record)
        #[arg(long, value_name = "ID")]
        key_id: String,
        /// Unique per command; the gateway refuses a repeated id as a replay [default: from
        /// the clock]
        #[arg(long, value_name = "ID")]
        command_id: Option<String>,
        /// How long the command stays valid (the gateway accepts at most 60s)
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        lifetime: SignedDuration,
    },
    /// Send signed door-unit settings to a gateway (cmd/settings)
    ///
    /// The gateway keeps them as the unit's desired settings (fields not given stay as they
    /// are) and pushes them to the unit now, or when it is next reachable.
    Settings {
        #[command(flatten)]
        conn: Connection,
        /// The door whose unit takes the settings
        #[arg(long, value_name = "DOOR")]
        door: String,
        /// Sound volume, 0 to 100
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
        volume: Option<u8>,
        /// The name the unit shows (at most 32 bytes)
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
        /// The house number the unit shows (at most 32 bytes)
        #[arg(long, value_name = "TEXT")]
        house_number: Option<String>,
        /// Whether an inner door is wired to this unit
        #[arg(long, value_name = "BOOL")]
        inner_door: Option<bool>,
        /// Unique per command [default: from the clock]
        #[arg(long, value_name = "ID")]
        command_id: Option<String>,
    },
    /// Delegate doors to another key (keys/delta, signed by the root --signing-key): deltas
    /// that key signs may add, edit and delete keys of these doors only, until --until
    ///
    /// Sign such a delta with `publish --signing-key DELEGATE.key delta ...`; the gateway
    /// refuses it whole as `outside_delegation` when it reaches beyond the doors
    /// (docs/cloud-protocol.md §5.3).
    Delegate(DelegateArgs),
    /// Revoke a delegation for good (keys/delta, signed by the root --signing-key)
    RevokeDelegation {
        #[command(flatten)]
        conn: Connection,
        /// The delegation's id
        #[arg(long, value_name = "ID")]
        id: String,
    },
    /// Ask a gateway to report its held version and take a new snapshot (cmd/resync)
    Resync {
        #[command(flatten)]
        conn: Connection,
    },
    /// Print every message gateways publish (state, sync, cmd/result) as JSON lines, until
    /// Ctrl-C or --count messages
    Watch {
        /// The broker, mqtt://host:port
        #[arg(long, value_name = "URL")]
        url: String,
        /// The topic prefix the gateways use
        #[arg(long, default_value = DEFAULT_PREFIX, value_name = "PREFIX")]
        prefix: String,
        /// Stop after N messages
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// The MQTT client id [default: cloud-sim-watch-<pid>]
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
    },
    /// Receive the records gateways upload (activity, door events, alarms, battery
    /// readings), each once: print every new record as a JSON line
    /// {"gateway","epoch","seq","class","record"}, count duplicates (same gateway, epoch and
    /// seq) and, at the end, print on stderr how many arrived and which sequence numbers are
    /// missing; rides out broker outages; --share splits a fleet between several consumers
    ///
    /// Broker outages: the session is persistent (clean session off, one client id for the
    /// whole run), so the broker queues batches while the connection is down. records says on
    /// stderr when it lost the broker, reconnects with a backoff (0.5 s doubling to 5 s,
    /// jittered) and says when it regained it; what it printed before is not printed again. A
    /// batch is acknowledged to the broker only after its records are written and flushed,
    /// so a batch in flight during a cut is delivered again, not lost. Only the first
    /// connection must succeed.
    ///
    /// Several consumers: with --share GROUP the broker hands each batch to one member of the
    /// group (an MQTT shared subscription). Each member prints its share and, at the end, what
    /// it received; whether anything is missing is for `cloud-sim check` over the members'
    /// merged output.
    Records(RecordsArgs),
    /// Check a JSON-lines file written by `records` for duplicates and missing sequence
    /// numbers; exit 1 if any are missing
    Check {
        /// The file ("-" for standard input)
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
struct DelegateArgs {
    #[command(flatten)]
    conn: Connection,
    /// The delegation's id: it names the issuer of the keys the delegate grants
    #[arg(long, value_name = "ID")]
    id: String,
    /// The delegate's public key: a signing.pub written by keygen (hex)
    #[arg(long, value_name = "FILE")]
    delegate: PathBuf,
    /// A door the delegate may grant (repeat for several; there is no "all doors")
    #[arg(long = "door", value_name = "DOOR", required = true)]
    doors: Vec<String>,
    /// The delegation grants nothing from this instant on, RFC 3339
    #[arg(long, value_name = "TIME")]
    until: Timestamp,
}

#[derive(Debug, Args)]
struct RecordsArgs {
    /// The broker, mqtt://host:port
    #[arg(long, value_name = "URL")]
    url: String,
    /// The topic prefix the gateways use
    #[arg(long, default_value = DEFAULT_PREFIX, value_name = "PREFIX")]
    prefix: String,
    /// Only this gateway's records [default: every gateway's]
    #[arg(long, value_name = "ID")]
    gateway: Option<String>,
    /// Stop once N distinct records have arrived
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this long without a message while connected, e.g. 10s (time without the
    /// broker does not count)
    #[arg(long, value_name = "DURATION", value_parser = parse_std_duration)]
    idle: Option<Duration>,
    /// Exit with status 1 when a gateway's records have gaps (not with --share)
    #[arg(long)]
    check: bool,
    /// Join the shared-subscription group GROUP: subscribe to $share/GROUP/PREFIX/+/+/records,
    /// so that the broker hands each batch to one member and the members split the records.
    ///
    /// A member sees only its share: its summary counts what it received and its duplicates
    /// and names no gaps (a gap may be another member's share); merge the members' outputs
    /// and run `cloud-sim check` on them. Each member deduplicates what it sees; a batch a
    /// gateway sends again (after its own reconnect) may reach another member, so the merged
    /// output can hold a record twice, which `check` counts as a duplicate. Give each member
    /// its own --client-id (or none). Brokers: mosquitto 2, EMQX and rumqttd accept $share from
    /// MQTT 3.1.1 clients (rumqttd 0.20 with a caveat: docs/cloud-sim.md); NATS 2.9 does not
    /// (it takes $share/... as an ordinary topic filter: nothing arrives), so against NATS run
    /// a single consumer.
    #[arg(long, value_name = "GROUP", value_parser = parse_group, conflicts_with = "check")]
    share: Option<String>,
    /// The MQTT client id, which names the persistent session [default:
    /// cloud-sim-records-<pid>, whose session is removed at exit]. Given an id, the session is
    /// kept at exit and the broker queues batches for the next run under the same id (run it
    /// with the same --prefix, --gateway and --share: the session keeps its subscription)
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// Verify GATEWAY's tamper-evident record chain against its enrolled public key (64 hex
    /// digits, what `doorbridge identity` prints): the summary names each deleted, edited,
    /// moved or inserted record, and --check then also exits 1 on a broken chain. Repeatable
    #[arg(long, value_name = "GATEWAY=KEY", value_parser = parse_enrolled)]
    enrolled: Vec<(String, ed25519_dalek::VerifyingKey)>,
}

/// `GATEWAY=HEX`: a gateway id and its Ed25519 public key.
fn parse_enrolled(text: &str) -> Result<(String, ed25519_dalek::VerifyingKey), String> {
    let (gateway, key) = text
        .split_once('=')
        .ok_or("expected GATEWAY=KEY (64 hex digits)")?;
    let bytes: Vec<u8> = (0..key.len())
        .step_by(2)
        .map(|i| {
            key.get(i..i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or("the key is not hex")?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "the key is not 32 bytes")?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| "the key is not an Ed25519 public key")?;
    Ok((gateway.to_owned(), key))
}

/// A shared-subscription group name: one topic level, no wildcards.
fn parse_group(text: &str) -> Result<String, String> {
    if text.is_empty() || text.contains(['/', '+', '#']) {
        return Err(format!(
            "{text:?}: a group is a non-empty name without '/', '+' or '#'"
        ));
    }
    Ok(text.to_owned())
}

#[derive(Debug, Subcommand)]
enum PublishWhat {
    /// A full key set: the signed manifest, then every chunk in order
    Snapshot {
        /// The keys file (docs/keys-file.md); its salt goes into the manifest
        #[arg(long, value_name = "FILE")]
        keys: PathBuf,
        /// The key-set version, above the one the gateway holds (1 or more)
        #[arg(long, value_name = "N")]
        version: u64,
        /// Keys of these categories stop opening when the gateway has not heard from the cloud
        /// for this long: CATEGORY=DURATION[,...], e.g. delivery=24h,event=12h (not friend);
        /// send heartbeats to keep them fresh
        #[arg(long, value_name = "LIMITS", value_parser = parse_stale_after)]
        stale_after: Option<StaleLimits>,
    },
    /// A change on top of the version the gateway holds: upserts and deletes (revocations)
    Delta {
        /// The version the gateway holds now
        #[arg(long = "from", value_name = "V")]
        from_version: u64,
        /// The version after the delta
        #[arg(long, value_name = "N")]
        version: u64,
        /// Keys to add or replace whole (made with the held snapshot's salt)
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// Id of a key to revoke (repeat for several)
        #[arg(long = "delete", value_name = "ID")]
        deletes: Vec<String>,
        /// Replace the key set's stale-after limits: CATEGORY=DURATION[,...], or "off" for none
        /// [default: unchanged]
        #[arg(long, value_name = "LIMITS", value_parser = parse_stale_after)]
        stale_after: Option<StaleLimits>,
    },
}

/// `delivery=24h,event=12h` (durations as the configuration writes them), or `off`.
fn parse_stale_after(text: &str) -> Result<StaleLimits, String> {
    if text == "off" {
        return Ok(StaleLimits::default());
    }
    let mut limits = Vec::new();
    for part in text.split(',') {
        let (name, duration) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected CATEGORY=DURATION, e.g. delivery=24h"))?;
        let category = Category::ALL
            .into_iter()
            .find(|c| c.as_str() == name.trim())
            .ok_or_else(|| format!("{name:?} is not a key category"))?;
        let seconds = doorbridge::config::values::parse_duration(duration)?.as_secs();
        let seconds = u32::try_from(seconds).map_err(|_| format!("{duration:?} is too long"))?;
        limits.push((category, seconds));
    }
    StaleLimits::new(limits).map_err(str::to_owned)
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// The site id of the gateway
    #[arg(long, value_name = "SITE")]
    site: String,
    /// The gateway id
    #[arg(long, value_name = "GATEWAY")]
    gateway: String,
}

#[derive(Debug, Args)]
struct Connection {
    /// The broker, mqtt://host:port
    #[arg(long, value_name = "URL")]
    url: String,
    /// The topic prefix the gateway uses
    #[arg(long, default_value = DEFAULT_PREFIX, value_name = "PREFIX")]
    prefix: String,
    #[command(flatten)]
    target: TargetArgs,
    /// The signing key written by keygen (hex of the 32-byte seed)
    #[arg(long, value_name = "FILE")]
    signing_key: PathBuf,
    /// The signing time, RFC 3339 [default: now]
    #[arg(long, value_name = "TIME")]
    issued_at: Option<Timestamp>,
    /// The MQTT client id [default: cloud-sim-<pid>]
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> Target {
        Target {
            site: self.site.clone(),
            gateway: self.gateway.clone(),
        }
    }
}

fn parse_duration(text: &str) -> Result<SignedDuration, String> {
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number with ms, s or min (30s)"))?;
    match unit {
        "ms" => Ok(SignedDuration::from_millis(n)),
        "s" => Ok(SignedDuration::from_secs(n)),
        "min" => Ok(SignedDuration::from_mins(n)),
        _ => Err(format!("{text:?}: the unit is ms, s or min (30s)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cloud-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Build {
            target,
            signing_key,
            keys,
            version,
            issued_at,
            out,
            stale_after,
        } => {
            let signer = read_signing_key(&signing_key)?;
            let file = read_keys(&keys)?;
            let head = (version, issued_at, stale_after);
            let snap = build_snapshot(&target.target(), head, &file, &signer)?;
            let (chunks, bytes) = (snap.chunks.len(), snap.total_bytes());
            Bundle::from(snap).write(&out)?;
            println!(
                "{}: version {version}, {} keys, {chunks} chunks, {bytes} bytes signed by {}",
                out.display(),
                file.keys.len(),
                SignerId::of(&signer.verifying_key())
            );
            Ok(())
        }
        Command::Publish { conn, what } => publish(&conn, what).await,
        Command::Heartbeat {
            conn,
            version,
            every,
            count,
        } => heartbeats(&conn, version, every, count).await,
        Command::OpenDoor {
            conn,
            door,
            key_id,
            command_id,
            lifetime,
        } => {
            if lifetime.is_zero() || lifetime.is_negative() {
                bail!("--lifetime must be positive");
            }
            if lifetime > DEFAULT_COMMAND_LIFETIME {
                eprintln!(
                    "cloud-sim: warning: a lifetime over {DEFAULT_COMMAND_LIFETIME:#} is refused by gateways with default settings"
                );
            }
            let (signer, topics, client) = connect(&conn).await?;
            let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
            let command_id =
                command_id.unwrap_or_else(|| format!("cloud-sim-{}", issued_at.as_millisecond()));
            let command = build::open_door(
                &conn.target.target(),
                &command_id,
                &door,
                &key_id,
                issued_at,
                lifetime,
                &signer,
            );
            client
                .publish_command(&topics, Channel::OpenDoor, command)
                .await?;
            client.disconnect().await?;
            println!(
                "{}: open-door {command_id} for door {door}, key {key_id}",
                topics.topic(Channel::OpenDoor)
            );
            Ok(())
        }
        Command::Settings {
            conn,
            door,
            volume,
            name,
            house_number,
            inner_door,
            command_id,
        } => {
            let given = doorbridge::bus::message::Settings {
                volume,
                name,
                house_number,
                inner_door,
            };
            send_settings(&conn, door, given, command_id).await
        }
        Command::Resync { conn } => resync(&conn).await,
        c @ (Command::Delegate(_) | Command::RevokeDelegation { .. }) => delegation(c).await,
        Command::Watch {
            url,
            prefix,
            count,
            client_id,
        } => watch(&url, &prefix, count, client_id).await,
        Command::Records(args) => records(args).await,
        Command::Check { file } => check_file(&file),
    }
}

/// `cloud-sim delegate` and `revoke-delegation`.
async fn delegation(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Delegate(args) => delegate_doors(&args).await,
        Command::RevokeDelegation { conn, id } => revoke_delegation(&conn, &id).await,
        _ => unreachable!("run routes only delegation commands here"),
    }
}

/// `cloud-sim delegate`: a root-signed delegation of `doors` to the key in `delegate`.
async fn delegate_doors(args: &DelegateArgs) -> anyhow::Result<()> {
    let DelegateArgs {
        conn,
        id,
        delegate,
        doors,
        until,
    } = args;
    let until = *until;
    let text = std::fs::read_to_string(delegate)
        .with_context(|| format!("reading the delegate's key {}", delegate.display()))?;
    let public: [u8; 32] = parse_hex(text.trim())
        .map_err(|e| anyhow!(e))
        .and_then(|b| {
            b.try_into()
                .map_err(|_| anyhow!("not 32 bytes (64 hex digits)"))
        })
        .with_context(|| format!("the delegate's key {}", delegate.display()))?;
    let public = ed25519_dalek::VerifyingKey::from_bytes(&public)
        .with_context(|| format!("the delegate's key {}", delegate.display()))?;
    let (signer, topics, client) = connect(conn).await?;
    let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
    let bytes = build::delegation(
        &conn.target.target(),
        id,
        &public,
        doors,
        until,
        issued_at,
        &signer,
    )?;
    client.publish_delta(&topics, bytes).await?;
    client.disconnect().await?;
    println!(
        "{}: delegation {id} to key {} for {} until {until}",
        topics.topic(Channel::Delta),
        SignerId::of(&public),
        doors.join(", ")
    );
    Ok(())
}

/// `cloud-sim revoke-delegation`: a root-signed revocation of delegation `id`.
async fn revoke_delegation(conn: &Connection, id: &str) -> anyhow::Result<()> {
    let (signer, topics, client) = connect(conn).await?;
    let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
    let bytes = build::revoke_delegation(&conn.target.target(), id, issued_at, &signer)?;
    client.publish_delta(&topics, bytes).await?;
    client.disconnect().await?;
    println!("{}: delegation {id} revoked", topics.topic(Channel::Delta));
    Ok(())
}

/// `cloud-sim heartbeat`: one signed heartbeat, or one every `every` (each signed when sent)
/// until Ctrl-C or `count`.
async fn heartbeats(
    conn: &Connection,
    version: u64,
    every: Option<Duration>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let target = conn.target.target();
    if every.is_some_and(|d| d.is_zero()) {
        bail!("--every must be longer than 0s");
    }
    // Checked before connecting.
    build::heartbeat(
        &target,
        version,
        Timestamp::now(),
        &read_signing_key(&conn.signing_key)?,
    )?;
    let (signer, topics, client) = connect(conn).await?;
    let mut sent = 0u64;
    let mut tick = every.map(tokio::time::interval);
    loop {
        if let Some(tick) = &mut tick {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
        let heartbeat = build::heartbeat(&target, version, issued_at, &signer)?;
        client.publish_heartbeat(&topics, heartbeat).await?;
        sent += 1;
        println!(
            "{}: heartbeat version {version} at {issued_at}",
            topics.topic(Channel::Heartbeat)
        );
        if every.is_none() || count.is_some_and(|n| sent >= n) {
            break;
        }
    }
    client.disconnect().await?;
    Ok(())
}

/// `cloud-sim resync`: signs and publishes a resync command.
async fn resync(conn: &Connection) -> anyhow::Result<()> {
    let (signer, topics, client) = connect(conn).await?;
    let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
    let id = format!("cloud-sim-{}", issued_at.as_millisecond());
    let command = build::resync(&conn.target.target(), Some(&id), issued_at, &signer);
    client
        .publish_command(&topics, Channel::Resync, command)
        .await?;
    client.disconnect().await?;
    println!("{}: resync {id}", topics.topic(Channel::Resync));
    Ok(())
}

fn parse_std_duration(text: &str) -> Result<Duration, String> {
    doorbridge::config::values::parse_duration(text)
}

/// `cloud-sim records`: receives, deduplicates and prints uploaded records, through broker
/// outages (`doorbridge_sim::durable`).
async fn records(args: RecordsArgs) -> anyhow::Result<()> {
    let RecordsArgs {
        url,
        prefix,
        gateway,
        count,
        idle,
        check,
        share,
        client_id,
        enrolled,
    } = args;
    let topics = format!(
        "{prefix}/+/{}/{}",
        gateway.as_deref().unwrap_or("+"),
        Channel::Records.suffix()
    );
    let filter = match &share {
        Some(group) => format!("$share/{group}/{topics}"),
        None => topics,
    };
    // A session under an id of our own making is never taken up again: removed at exit, so
    // the broker does not queue every record for it forever.
    let forget_session = client_id.is_none();
    let client_id =
        client_id.unwrap_or_else(|| format!("cloud-sim-records-{}", std::process::id()));
    let mut subscriber = DurableSubscriber::connect(&url, &client_id, &filter).await?;
    eprintln!("cloud-sim: receiving records on {filter} from {url}");
    let mut ledger = RecordLedger::default();
    for (gateway, key) in enrolled {
        ledger.enrol(&gateway, key);
    }
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let idle_deadline = || idle.and_then(|d| tokio::time::Instant::now().checked_add(d));
    // When to stop for --idle; none while the broker is away.
    let mut stop_at = idle_deadline();
    let mut lost_at = None;
    while count.is_none_or(|n| ledger.unique() < n) {
        tokio::select! {
            update = subscriber.next() => match update {
                // A batch from a gateway: printed and flushed, then acknowledged.
                Some(Update::Message(delivery)) => {
                    match Batch::decode(delivery.payload()) {
                        Ok(batch) => {
                            for r in ledger.add(&batch) {
                                writeln!(stdout, "{}", record_json(&batch, r))?;
                            }
                            stdout.flush()?;
                        }
                        // Acknowledged all the same: it would come back at every reconnect.
                        Err(e) => eprintln!(
                            "cloud-sim: {}: not a record batch: {e}",
                            delivery.topic()
                        ),
                    }
                    subscriber.ack(&delivery).await?;
                    stop_at = idle_deadline();
                }
                Some(Update::Lost(reason)) => {
                    eprintln!("cloud-sim: lost the broker ({reason}); reconnecting");
                    lost_at = Some(std::time::Instant::now());
                    stop_at = None;
                }
                Some(Update::Regained { session_present }) => {
                    let away = lost_at.take().map(|t| t.elapsed()).unwrap_or_default();
                    if session_present {
                        eprintln!(
                            "cloud-sim: regained the broker after {away:.1?}; the batches it queued follow"
                        );
                    } else {
                        eprintln!(
                            "cloud-sim: regained the broker after {away:.1?}, but it had lost the session: batches published meanwhile are gone for this consumer"
                        );
                    }
                    stop_at = idle_deadline();
                }
                Some(Update::Refused(why)) => bail!("{why}"),
                None => bail!("the subscriber stopped"),
            },
            // Nothing new for a while.
            () = sleep_until(stop_at) => break,
            // Ctrl-C.
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    subscriber.close(forget_session).await;
    match &share {
        Some(group) => eprintln!(
            "cloud-sim: {} (this consumer's share of group {group}: `cloud-sim check` over every member's output says whether any are missing)",
            ledger.received()
        ),
        None => eprintln!("cloud-sim: {}", ledger.summary()),
    }
    if check && !ledger.gaps().is_empty() {
        bail!("records are missing");
    }
    if check && !ledger.chain_findings().is_empty() {
        bail!("the record chain is broken");
    }
    Ok(())
}

/// Completes at `deadline`; never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `cloud-sim check`: gaps and duplicates in a JSON-lines file of records.
fn check_file(file: &Path) -> anyhow::Result<()> {
    use std::io::BufRead;
    let input: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        ))
    };
    let mut ledger = RecordLedger::default();
    for (n, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
        let (Some(gateway), Some(seq)) = (value["gateway"].as_str(), value["seq"].as_u64()) else {
            bail!("{}:{}: no \"gateway\" and \"seq\"", file.display(), n + 1);
        };
        ledger.add_id(gateway, value["epoch"].as_u64().unwrap_or(0), seq);
    }
    println!("{}", ledger.summary());
    if !ledger.gaps().is_empty() {
        bail!("records are missing");
    }
    Ok(())
}

fn keygen(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret_path = dir.join("signing.key");
    let public_path = dir.join("signing.pub");
    for path in [&secret_path, &public_path] {
        if path.exists() {
            bail!("{} exists; not replacing a key", path.display());
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("the kernel gave no random bytes: {e}"))?;
    let signer = SigningKey::from_bytes(&seed);
    let public = hex(signer.verifying_key().as_bytes());
    write_new(&secret_path, &format!("{}\n", hex(&seed)), 0o600)?;
    write_new(&public_path, &format!("{public}\n"), 0o644)?;
    println!("signing key: {} (keep it secret)", secret_path.display());
    println!("public key:  {}", public_path.display());
    println!("key id:      {}", SignerId::of(&signer.verifying_key()));
    println!("for the gateway's configuration ([cloud] section):");
    println!("trusted_keys = [\"{public}\"]");
    Ok(())
}

/// Creates `path` (never replacing a file) with `mode`, and writes `text`.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn read_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the signing key {}", path.display()))?;
    let seed: [u8; 32] = parse_hex(text.trim())
        .map_err(|e| anyhow!(e))
        .and_then(|b| {
            b.try_into()
                .map_err(|_| anyhow!("not 32 bytes (64 hex digits)"))
        })
        .with_context(|| format!("the signing key {}", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn read_keys(path: &Path) -> anyhow::Result<KeyFile> {
    KeyFile::read(path).with_context(|| format!("the keys file {}", path.display()))
}

/// Builds a snapshot of `file` as `(version, issued_at, stale_after)` says.
fn build_snapshot(
    target: &Target,
    (version, issued_at, stale_after): (u64, Option<Timestamp>, Option<StaleLimits>),
    file: &KeyFile,
    signer: &SigningKey,
) -> anyhow::Result<SignedSnapshot> {
    let issued_at = issued_at.unwrap_or_else(Timestamp::now);
    Ok(match stale_after {
        Some(limits) => build::snapshot_with_stale_after(
            target, version, issued_at, &file.salt, &file.keys, limits, signer,
        )?,
        None => build::snapshot(target, version, issued_at, &file.salt, &file.keys, signer)?,
    })
}

async fn connect(conn: &Connection) -> anyhow::Result<(SigningKey, Topics, CloudClient)> {
    let signer = read_signing_key(&conn.signing_key)?;
    let topics = Topics::new(&conn.prefix, &conn.target.target())?;
    let client_id = conn
        .client_id
        .clone()
        .unwrap_or_else(|| format!("cloud-sim-{}", std::process::id()));
    let client = CloudClient::connect(&conn.url, &client_id).await?;
    Ok((signer, topics, client))
}

async fn publish(conn: &Connection, what: PublishWhat) -> anyhow::Result<()> {
    let target = conn.target.target();
    // Everything is built and checked before connecting.
    let signer = read_signing_key(&conn.signing_key)?;
    Topics::new(&conn.prefix, &target)?;
    match what {
        PublishWhat::Snapshot {
            keys,
            version,
            stale_after,
        } => {
            let file = read_keys(&keys)?;
            let head = (version, conn.issued_at, stale_after);
            let snap = build_snapshot(&target, head, &file, &signer)?;
            let (_, topics, client) = connect(conn).await?;
            client.publish_snapshot(&topics, &snap).await?;
            client.disconnect().await?;
            println!(
                "{}: snapshot version {version}, {} keys, {} chunks, {} bytes",
                topics.topic(Channel::Manifest),
                file.keys.len(),
                snap.chunks.len(),
                snap.total_bytes()
            );
        }
        PublishWhat::Delta {
            from_version,
            version,
            keys,
            deletes,
            stale_after,
        } => {
            let upserts = match &keys {
                Some(path) => read_keys(path)?.keys,
                None => Vec::new(),
            };
            let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
            let delta = build::signed_delta(
                &doorbridge::cloud::payload::Delta {
                    target: target.clone(),
                    from_version,
                    version,
                    issued_at,
                    upserts: upserts.clone(),
                    deletes: deletes.iter().map(Into::into).collect(),
                    stale_after,
                },
                &signer,
            )?;
            let (_, topics, client) = connect(conn).await?;
            let bytes = delta.len();
            client.publish_delta(&topics, delta).await?;
            client.disconnect().await?;
            println!(
                "{}: delta {from_version} -> {version}, {} upserts, {} deletes, {bytes} bytes",
                topics.topic(Channel::Delta),
                upserts.len(),
                deletes.len()
            );
        }
    }
    Ok(())
}

async fn watch(
    url: &str,
    prefix: &str,
    count: Option<u64>,
    client_id: Option<String>,
) -> anyhow::Result<()> {
    let client_id = client_id.unwrap_or_else(|| format!("cloud-sim-watch-{}", std::process::id()));
    let client = CloudClient::connect(url, &client_id).await?;
    let mut subscriptions = Vec::new();
    for channel in Channel::OUTBOUND {
        subscriptions.push(
            client
                .subscribe(&format!("{prefix}/+/+/{}", channel.suffix()))
                .await?,
        );
    }
    // One stream of every subscription, in arrival order.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for mut sub in subscriptions {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.recv().await {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    eprintln!(
        "cloud-sim: watching {prefix}/+/+/{{state,sync,cmd/result,records,telemetry}} on {url}"
    );
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|n| seen < n) {
        tokio::select! {
            message = rx.recv() => {
                let Some((topic, payload)) = message else {
                    bail!("the connection to the broker closed");
                };
                writeln!(stdout, "{}", decode_report(prefix, &topic, &payload))?;
                stdout.flush()?;
                seen += 1;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Best effort: the broker forgets the session either way.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
    Ok(())
}

/// `cloud-sim settings`: signs and publishes door-unit settings.
async fn send_settings(
    conn: &Connection,
    door: String,
    given: doorbridge::bus::message::Settings,
    command_id: Option<String>,
) -> anyhow::Result<()> {
    let doorbridge::bus::message::Settings {
        volume,
        name,
        house_number,
        inner_door,
    } = given;
    if volume.is_none() && name.is_none() && house_number.is_none() && inner_door.is_none() {
        bail!("give at least one of --volume, --name, --house-number, --inner-door");
    }
    let (signer, topics, client) = connect(conn).await?;
    let issued_at = conn.issued_at.unwrap_or_else(Timestamp::now);
    let command_id =
        command_id.unwrap_or_else(|| format!("cloud-sim-{}", issued_at.as_millisecond()));
    let settings = doorbridge::cloud::payload::UnitSettings {
        target: conn.target.target(),
        command_id: command_id.clone(),
        door: door.clone().into(),
        volume,
        name,
        house_number,
        inner_door,
        issued_at,
        expires_at: issued_at
            .checked_add(DEFAULT_COMMAND_LIFETIME)
            .unwrap_or(Timestamp::MAX),
    };
    let command = build::unit_settings(&settings, &signer);
    client
        .publish_command(&topics, Channel::Settings, command)
        .await?;
    client.disconnect().await?;
    println!(
        "{}: unit-settings {command_id} for door {door}",
        topics.topic(Channel::Settings)
    );
    Ok(())
}
