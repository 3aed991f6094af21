//! A fleet on one broker: N real `doorbridge run` gateways (each its own configuration, gateway
//! id and SQLite file, holding 1,000 keys, its bus on a serial port that does not exist) against
//! one mosquitto, and a reference cloud (`sim::cloud::CloudClient`, one MQTT connection) that
//! publishes a new signed snapshot of 1,000 keys to every one of them at once. Per fleet size:
//!
//! - start → all N `online` (the retained `state` report);
//! - an idle window (60 s; 5 s with `--quick`) after a settle: each gateway's CPU time
//!   (`utime + stime` of `/proc/<pid>/stat`), resident memory (`VmRSS`) and proportional set
//!   size (`Pss` of `/proc/<pid>/smaps_rollup`: shared pages divided among the processes that
//!   share them, so the fleet's sum is what it really takes), and the broker's CPU and RSS;
//! - the fan-out: the first publish → the N-th `applied` report on `sync`, the bytes published
//!   (payloads, and MQTT `PUBLISH` packets as framed on the wire), the bytes the broker read
//!   and wrote (`rchar`/`wchar` of its `/proc/<pid>/io`: its sockets), and the CPU each gateway
//!   and the broker spent on it (from the first publish to 1 s after the last `applied`).
//!
//! The reference, measured in the same run: the same gateway alone (N = 1) on its own broker.
//! Each size gets a fresh broker. Sizes step up (1, 10, 50, 100, 200, 500, 1000; `--quick`: 1
//! and 10; `--sizes 1,20` to choose) and the run stops at the first size that fails (a gateway
//! that exits, a fleet not online or not applied in time), which the section reports as the
//! limit found.
//!
//! Run with `cargo bench --bench fleet` (add `-- --quick` for a short run). Progress on stderr.
//! Writes its section of `docs/performance.md`; `docs/fleet.md` discusses the figures. Without
//! mosquitto it writes a section that says so.

// Figures for display: float conversions lose nothing that shows.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, Key};
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::config::Config;
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::{CloudClient, hex};
use jiff::Timestamp;

use brokers::Mosquitto;
use doorbridge_testkit::bench as support;
use doorbridge_testkit::brokers;
use support::{Daemon, SALT, SITE, cloud_key, mib, thousands};

/// Keys in every key set: the one the gateways hold and the one fanned out.
const KEYS: usize = 1_000;
const FULL_SIZES: &[usize] = &[1, 10, 50, 100, 200, 500, 1000, 2000, 3000, 4000];
const QUICK_SIZES: &[usize] = &[1, 10];
/// After the last gateway is online, before the idle window: each gateway's start-up work
/// (telemetry on connect, its first WAL checkpoint) is over.
const SETTLE: Duration = Duration::from_secs(5);
const SETTLE_QUICK: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_secs(60);
const IDLE_QUICK: Duration = Duration::from_secs(5);
/// The fan-out's CPU window runs this long past the last `applied` (the store folds its WAL
/// into the database 250 ms after its last commit).
const AFTER: Duration = Duration::from_secs(1);

/// How long N gateways may take to be online, and to apply the snapshot: generous, so that a
/// failure is a machine that cannot, not one that is slow.
fn online_deadline(n: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(100) * u32::try_from(n).unwrap_or(u32::MAX)
}

fn applied_deadline(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(200) * u32::try_from(n).unwrap_or(u32::MAX)
}

/// Keys `k0000…` opening `main`, each with one PIN from `pins_from` on (keeps two sets apart).
fn keys(pins_from: usize) -> Vec<Key> {
    (0..KEYS)
        .map(|i| {
            support::key(
                format!("k{i:04}"),
                "main",
                CredentialKind::Pin,
                format!("{:08}", pins_from + i).as_bytes(),
            )
        })
        .collect()
}

fn gateway_id(n: usize, i: usize) -> String {
    format!("gw-{n:04}-{i:04}")
}

/// One gateway's configuration: defaults everywhere (keep-alive 30 s, log level info) but the
/// site, the broker, the database and a bus on a port that does not exist.
fn config_text(id: &str, broker: &str, db: &Path, port: &Path) -> String {
    format!(
        "[gateway]\nid = \"{id}\"\nsite_id = \"{SITE}\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"{broker}\"\ntrusted_keys = [\"{}\"]\n[storage]\npath = \"{}\"\n\
         [[buses]]\nport = \"{}\"\n[[buses.units]]\naddress = 1\ndoor = \"main\"\n",
        hex(cloud_key().verifying_key().as_bytes()),
        db.display(),
        port.display(),
    )
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// What `/proc` says about one process at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Probe {
    /// utime + stime, in clock ticks (all threads, living and ended).
    ticks: u64,
    rss: u64,
    /// Peak RSS since start (`VmHWM`).
    hwm: u64,
    pss: u64,
    threads: u64,
    /// Bytes read and written through system calls: for the broker, its sockets.
    rchar: u64,
    wchar: u64,
}

/// A `name: value` field of a `/proc` text file (the value's first word, as a number).
fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Probe {
    /// The counters since `before` (CPU, bytes), with the gauges (memory, threads) of now.
    fn since(self, before: Probe) -> Probe {
        Probe {
            ticks: self.ticks.saturating_sub(before.ticks),
            rchar: self.rchar.saturating_sub(before.rchar),
            wchar: self.wchar.saturating_sub(before.wchar),
            ..self
        }
    }
}

/// Every gateway's probe, and the broker's.
fn probe_all(pids: &[u32], broker: u32) -> (Vec<Probe>, Probe) {
    (pids.iter().map(|&p| probe(p)).collect(), probe(broker))
}

fn probe(pid: u32) -> Probe {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    let stat = read("stat");
    // Fields after the command name, which is in parentheses and may hold spaces; utime and
    // stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = read("status");
    let io = read("io");
    Probe {
        ticks: tick(11) + tick(12),
        rss: field(&status, "VmRSS:") * 1024,
        hwm: field(&status, "VmHWM:") * 1024,
        pss: field(&read("smaps_rollup"), "Pss:") * 1024,
        threads: field(&status, "Threads:"),
        rchar: field(&io, "rchar:"),
        wchar: field(&io, "wchar:"),
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux almost everywhere).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Clock ticks (or a mean of them) in milliseconds.
fn ticks_ms(ticks: f64) -> f64 {
    ticks * 1000.0 / clock_ticks() as f64
}

// ---------------------------------------------------------------------------------------------
// The cloud's side: what the gateways report
// ---------------------------------------------------------------------------------------------

/// The reports heard so far, by gateway.
#[derive(Debug, Default)]
struct Heard {
    online: HashMap<String, Instant>,
    /// When each gateway's `applied` for `version` arrived.
    applied: HashMap<String, Instant>,
    version: u64,
    rejected: usize,
    resyncs: usize,
    last_other: Option<String>,
    /// The size of each telemetry report (sent on connect, then every 15 minutes).
    telemetry_bytes: Vec<usize>,
}

impl Heard {
    /// Rejections, resync requests, and the mean size of a telemetry report.
    fn counts(&self) -> (usize, usize, f64) {
        let sizes = &self.telemetry_bytes;
        (
            self.rejected,
            self.resyncs,
            sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64,
        )
    }
}

/// Subscribes to every gateway's `state`, `sync` and `telemetry` (`{prefix}/{site}/+/+`) and
/// files what arrives into `heard` until the client stops.
async fn listen(cloud: &CloudClient, heard: Arc<Mutex<Heard>>) {
    let filter = format!("{DEFAULT_PREFIX}/{SITE}/+/+");
    let mut rx = cloud.subscribe(&filter).await.expect("subscribe");
    tokio::spawn(async move {
        while let Some((topic, payload)) = rx.recv().await {
            let mut levels = topic.split('/').skip(2);
            let (Some(gateway), Some(channel)) = (levels.next(), levels.next()) else {
                continue;
            };
            if channel == "telemetry" {
                heard
                    .lock()
                    .expect("heard lock")
                    .telemetry_bytes
                    .push(payload.len());
                continue;
            }
            if channel != "state" && channel != "sync" {
                continue;
            }
            let Ok(report) = Report::decode(&payload) else {
                continue;
            };
            let now = Instant::now();
            let mut heard = heard.lock().expect("heard lock");
            match report {
                Report::State {
                    state: Presence::Online,
                    ..
                } => {
                    heard.online.entry(gateway.to_owned()).or_insert(now);
                }
                Report::Applied { version, .. } if version == heard.version => {
                    heard.applied.entry(gateway.to_owned()).or_insert(now);
                }
                Report::Rejected { reason, .. } => {
                    heard.rejected += 1;
                    heard.last_other = Some(format!("{gateway}: rejected: {reason}"));
                }
                Report::Resync { reason, .. } => {
                    heard.resyncs += 1;
                    heard.last_other = Some(format!("{gateway}: resync: {reason}"));
                }
                _ => {}
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// One fleet
// ---------------------------------------------------------------------------------------------

/// What one fleet size measured.
#[derive(Debug)]
struct Fleet {
    n: usize,
    /// The first gateway started → the last one online.
    online_after: Duration,
    settle: Duration,
    idle: Duration,
    /// Per gateway: CPU ticks in the idle window, and memory at its end.
    idle_ticks: Vec<u64>,
    rss: Vec<u64>,
    pss: Vec<u64>,
    threads: Vec<u64>,
    /// The broker over the idle window: CPU ticks, and its memory at the end.
    broker_idle: Probe,
    /// One gateway's snapshot: bytes (manifest and chunks) and chunks.
    snapshot_bytes: usize,
    chunks: usize,
    /// All N snapshots: payload bytes and `PUBLISH` packet bytes.
    payload_bytes: u64,
    wire_bytes: u64,
    /// The first publish → every snapshot acknowledged by the broker.
    published: Duration,
    /// The first publish → each gateway's `applied`, sorted.
    applied: Vec<Duration>,
    /// The CPU window: the first publish → `AFTER` past the last `applied`.
    fan_window: Duration,
    fan_ticks: Vec<u64>,
    /// Per gateway after the fan-out: RSS and peak RSS since start.
    rss_after: Vec<u64>,
    hwm: Vec<u64>,
    /// The broker over the fan-out: CPU ticks, bytes read and written, memory at the end.
    broker_fan: Probe,
    rejected: usize,
    resyncs: usize,
    /// The mean size of the telemetry reports heard (one per gateway at connect).
    telemetry_bytes: f64,
    load_before: String,
    load_after: String,
}

/// Why a fleet size failed, or was not started, for the section.
#[derive(Debug)]
struct Failure {
    n: usize,
    /// Whether it ran and failed (or was not started: the machine had no room for it).
    started: bool,
    why: String,
}

/// Of the machine's processes and threads (the kernel's tasks, each with a PID), memory and
/// open files, a quarter is left to the machine's other work: `Err` says which one `n`
/// gateways would not fit in, going by what the previous size measured.
fn room_for(n: usize, last: Option<&Fleet>) -> Result<(), String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let number = |path: &str| read(path).trim().parse::<u64>().unwrap_or(u64::MAX);
    let n = n as u64;
    // Each gateway's threads, and the bench's thread that reads its log.
    let per_gateway = last.map_or(8, |f| max(&f.threads)) + 1;
    let tasks_limit =
        number("/proc/sys/kernel/pid_max").min(number("/proc/sys/kernel/threads-max"));
    // `/proc/loadavg`'s fourth field: runnable/total tasks now.
    let tasks_now: u64 = read("/proc/loadavg")
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0);
    if tasks_now + n * per_gateway > tasks_limit / 4 * 3 {
        return Err(format!(
            "PIDs: {n} gateways take about {} tasks ({per_gateway} threads each, as many as \
             the busiest gateway of the previous size had, with the bench's log reader), \
             {tasks_now} are in use, and the kernel allows {tasks_limit} (pid_max, \
             threads-max): more than three quarters",
            thousands(n * per_gateway)
        ));
    }
    let pss = last.map_or(12 << 20, |f| mean_bytes(&f.pss));
    let available = field(&read("/proc/meminfo"), "MemAvailable:") * 1024;
    if n * pss > available / 4 * 3 {
        return Err(format!(
            "memory: {n} gateways take about {} (PSS {} each), {} is available",
            mib(n * pss),
            mib(pss),
            mib(available)
        ));
    }
    // The broker holds a socket per gateway, the bench a pipe per gateway.
    let files: u64 = open_files_limit().parse().unwrap_or(u64::MAX);
    if n + 100 > files {
        return Err(format!(
            "open files: the broker needs a socket per gateway and the limit is {files}"
        ));
    }
    Ok(())
}

/// The bytes of one MQTT 3.1.1 `PUBLISH` at `QoS` 1: fixed header (type and the remaining
/// length's 1-4 bytes), topic (2-byte length + name), packet id, payload.
fn publish_packet_bytes(topic: &str, payload: usize) -> u64 {
    let remaining = 2 + topic.len() + 2 + payload;
    let length_bytes = match remaining {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    };
    (1 + length_bytes + remaining) as u64
}

fn alive_or(gateways: &mut [(String, Daemon)], what: &str) -> Result<(), String> {
    for (id, daemon) in gateways.iter_mut() {
        if !daemon.alive() {
            return Err(format!(
                "{what}: gateway {id} exited; its last lines:\n{}",
                daemon.tail()
            ));
        }
    }
    Ok(())
}

/// SIGTERM to every gateway at once (as a host shutting down would), then waits for each.
fn stop_all(gateways: &mut [(String, Daemon)]) {
    let pids: Vec<String> = gateways.iter().map(|(_, d)| d.pid().to_string()).collect();
    for group in pids.chunks(500) {
        let _ = Command::new("kill").arg("-TERM").args(group).status();
    }
    for (_, daemon) in gateways.iter_mut() {
        daemon.stop();
    }
}

fn progress(n: usize, what: &str) {
    eprintln!("fleet {n:>4}: {what} (load {})", support::load_average());
}

/// The gateways of one fleet, by id; killed on drop (a panic included).
type Gateways = Vec<(String, Daemon)>;

/// Starts `n` gateways on `url`, each in its own directory under `dir` with a copy of the
/// database `template`, and waits until all are `online`; returns them and how long that took.
fn start_gateways(
    dir: &Path,
    template: &Path,
    url: &str,
    n: usize,
    heard: &Mutex<Heard>,
) -> Result<(Gateways, Duration), String> {
    let mut gateways: Gateways = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let id = gateway_id(n, i);
        let home = dir.join(&id);
        std::fs::create_dir(&home).expect("a gateway's directory");
        let db = home.join("doorbridge.db");
        std::fs::copy(template, &db).expect("copy the database");
        let config = home.join("doorbridge.toml");
        std::fs::write(
            &config,
            config_text(&id, url, &db, &home.join("no-such-port")),
        )
        .expect("write a gateway's config");
        gateways.push((id, Daemon::start(&config, "info", None)));
    }
    let deadline = started + online_deadline(n);
    loop {
        alive_or(&mut gateways, "starting")?;
        let heard = heard.lock().expect("heard lock");
        if heard.online.len() >= n {
            let last = heard.online.values().max().copied().unwrap_or(started);
            return Ok((gateways, last - started));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {n} gateways online {:.0} s after the start",
                heard.online.len(),
                started.elapsed().as_secs_f64()
            ));
        }
        drop(heard);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The snapshots of the fan-out, one per gateway (each signed for its target).
struct Snapshots {
    each: Vec<(Topics, SignedSnapshot)>,
    /// One of them: bytes and chunks.
    bytes: usize,
    chunks: usize,
    /// All of them: payload bytes, and bytes of their `PUBLISH` packets.
    payload_bytes: u64,
    wire_bytes: u64,
}

fn snapshots(gateways: &Gateways, version: u64) -> Snapshots {
    let new_keys = keys(1_000_000);
    let each: Vec<(Topics, SignedSnapshot)> = gateways
        .iter()
        .map(|(id, _)| {
            let target = support::target(id);
            let snapshot = build::snapshot(
                &target,
                version,
                Timestamp::now(),
                SALT,
                &new_keys,
                &cloud_key(),
            )
            .expect("build a snapshot");
            (
                Topics::new(DEFAULT_PREFIX, &target).expect("topics"),
                snapshot,
            )
        })
        .collect();
    let (mut payload_bytes, mut wire_bytes) = (0u64, 0u64);
    for (topics, snapshot) in &each {
        payload_bytes += snapshot.total_bytes() as u64;
        wire_bytes +=
            publish_packet_bytes(&topics.topic(Channel::Manifest), snapshot.manifest.len());
        let chunk_topic = topics.topic(Channel::Chunk);
        wire_bytes += snapshot
            .chunks
            .iter()
            .map(|c| publish_packet_bytes(&chunk_topic, c.len()))
            .sum::<u64>();
    }
    Snapshots {
        bytes: each[0].1.total_bytes(),
        chunks: each[0].1.chunks.len(),
        each,
        payload_bytes,
        wire_bytes,
    }
}

/// Publishes every snapshot at once, one task per gateway on the one connection (manifest,
/// then its chunks, each after the previous one's `PubAck`; the gateways' publishes
/// interleave), then waits for every `applied`. Returns when the last `PubAck` came and when
/// each `applied` did, from the first publish, sorted.
fn fan_out(
    rt: &tokio::runtime::Runtime,
    cloud: &Arc<CloudClient>,
    snapshots: Vec<(Topics, SignedSnapshot)>,
    gateways: &mut Gateways,
    heard: &Mutex<Heard>,
    started: Instant,
) -> Result<(Duration, Vec<Duration>), String> {
    let n = gateways.len();
    let published = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (topics, snapshot) in snapshots {
            let cloud = Arc::clone(cloud);
            tasks.spawn(async move { cloud.publish_snapshot(&topics, &snapshot).await });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a publishing task")
                .map_err(|e| format!("publishing: {e}"))?;
        }
        Ok::<_, String>(started.elapsed())
    })?;
    let deadline = started + applied_deadline(n);
    loop {
        alive_or(gateways, "fan-out")?;
        let heard = heard.lock().expect("heard lock");
        if heard.applied.len() >= n {
            let mut applied: Vec<Duration> =
                heard.applied.values().map(|at| *at - started).collect();
            applied.sort();
            return Ok((published, applied));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {n} gateways applied the snapshot {:.0} s after the first publish \
                 ({} rejected, {} resync requests; last: {})",
                heard.applied.len(),
                started.elapsed().as_secs_f64(),
                heard.rejected,
                heard.resyncs,
                heard.last_other.as_deref().unwrap_or("none")
            ));
        }
        drop(heard);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs N gateways on a fresh mosquitto: online, idle, one snapshot fanned out to all.
fn fleet(
    rt: &tokio::runtime::Runtime,
    template: &Path,
    n: usize,
    settle: Duration,
    idle: Duration,
) -> Result<Fleet, String> {
    let load_before = support::load_average();
    let broker = Mosquitto::start().expect("mosquitto (checked before)");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let heard = Arc::new(Mutex::new(Heard {
        version: 2,
        ..Heard::default()
    }));
    let cloud = Arc::new(
        rt.block_on(CloudClient::connect(
            &broker.url(),
            &format!("bench-fleet-cloud-{n}"),
        ))
        .map_err(|e| format!("the cloud client: {e}"))?,
    );
    rt.block_on(listen(&cloud, Arc::clone(&heard)));

    progress(n, "starting the gateways");
    let (mut gateways, online_after) =
        start_gateways(dir.path(), template, &broker.url(), n, &heard)?;
    progress(
        n,
        &format!(
            "all online {:.1} s after the start; settling {} s, then idle for {} s",
            online_after.as_secs_f64(),
            settle.as_secs(),
            idle.as_secs()
        ),
    );

    // The idle window.
    std::thread::sleep(settle);
    let pids: Vec<u32> = gateways.iter().map(|(_, d)| d.pid()).collect();
    let (before, broker_before) = probe_all(&pids, broker.pid());
    let idle_started = Instant::now();
    std::thread::sleep(idle);
    let (after, broker_after) = probe_all(&pids, broker.pid());
    let idle = idle_started.elapsed();
    alive_or(&mut gateways, "idle")?;

    progress(n, "building the snapshots");
    let snapshots = snapshots(&gateways, 2);
    progress(n, "fanning out");
    let (fan_before, broker_fan_before) = probe_all(&pids, broker.pid());
    let fan_started = Instant::now();
    let (published, applied) = fan_out(
        rt,
        &cloud,
        snapshots.each,
        &mut gateways,
        &heard,
        fan_started,
    )?;
    let last = *applied.last().expect("n > 0");
    std::thread::sleep((last + AFTER).saturating_sub(fan_started.elapsed()));
    let (fan_after, broker_fan_after) = probe_all(&pids, broker.pid());
    let fan_window = fan_started.elapsed();
    progress(
        n,
        &format!(
            "all applied {:.2} s after the first publish; stopping",
            last.as_secs_f64()
        ),
    );
    let load_after = support::load_average();
    stop_all(&mut gateways);
    drop(cloud);
    drop(broker);

    let delta = |a: &[Probe], b: &[Probe]| -> Vec<u64> {
        a.iter()
            .zip(b)
            .map(|(a, b)| b.ticks.saturating_sub(a.ticks))
            .collect()
    };
    let (rejected, resyncs, telemetry_bytes) = heard.lock().expect("heard lock").counts();
    Ok(Fleet {
        n,
        online_after,
        settle,
        idle,
        idle_ticks: delta(&before, &after),
        rss: after.iter().map(|p| p.rss).collect(),
        pss: after.iter().map(|p| p.pss).collect(),
        threads: after.iter().map(|p| p.threads).collect(),
        broker_idle: broker_after.since(broker_before),
        snapshot_bytes: snapshots.bytes,
        chunks: snapshots.chunks,
        payload_bytes: snapshots.payload_bytes,
        wire_bytes: snapshots.wire_bytes,
        published,
        applied,
        fan_window,
        fan_ticks: delta(&fan_before, &fan_after),
        rss_after: fan_after.iter().map(|p| p.rss).collect(),
        hwm: fan_after.iter().map(|p| p.hwm).collect(),
        broker_fan: broker_fan_after.since(broker_fan_before),
        rejected,
        resyncs,
        telemetry_bytes,
        load_before,
        load_after,
    })
}

/// A database holding version 1 (`KEYS` keys), copied for every gateway.
fn template(dir: &Path) -> PathBuf {
    let db = dir.join("template.db");
    let config = Config::from_toml_str(
        &config_text(
            "gw-template",
            "mqtt://127.0.0.1:1",
            &db,
            &dir.join("no-such-port"),
        ),
        "template.toml",
    )
    .expect("the bench's configuration");
    support::runtime().block_on(support::install_keys(&db, config.site(), SALT, keys(0)));
    // The store checkpoints and removes its WAL on close: the copy is the whole database.
    assert!(
        !dir.join("template.db-wal").exists()
            || std::fs::metadata(dir.join("template.db-wal")).map_or(0, |m| m.len()) == 0,
        "the template database left a WAL behind"
    );
    db
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn mean(values: &[u64]) -> f64 {
    values.iter().sum::<u64>() as f64 / values.len().max(1) as f64
}

/// The mean, rounded down, for sizes.
fn mean_bytes(values: &[u64]) -> u64 {
    values.iter().sum::<u64>() / (values.len().max(1) as u64)
}

fn max(values: &[u64]) -> u64 {
    values.iter().copied().max().unwrap_or(0)
}

/// CPU `ticks` over `window`, in percent of one core.
fn share(ticks: f64, window: Duration) -> f64 {
    ticks_ms(ticks) / 10.0 / window.as_secs_f64()
}

fn kib(bytes: u64) -> String {
    format!("{:.0} KiB", bytes as f64 / 1024.0)
}

fn bytes(bytes: u64) -> String {
    match bytes {
        0..10_240 => format!("{bytes} B"),
        10_240..10_485_760 => kib(bytes),
        _ => mib(bytes),
    }
}

fn idle_table(fleets: &[Fleet]) -> String {
    let mut table = String::from(
        "| gateways | start → all `online` | RSS per gateway, mean / max | PSS per gateway, mean / max | PSS of the fleet | threads per gateway, mean / max | idle CPU per gateway, mean / max | idle CPU of the fleet | broker RSS | broker idle CPU | broker read / wrote in the idle window |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for f in fleets {
        let window = f.idle;
        let _ = writeln!(
            table,
            "| {} | {:.1} s | {} / {} | {} / {} | {} | {:.0} / {} | {:.3} % / {:.3} % | {:.2} % of one core | {} | {:.3} % | {} / {} |",
            f.n,
            f.online_after.as_secs_f64(),
            mib(mean_bytes(&f.rss)),
            mib(max(&f.rss)),
            mib(mean_bytes(&f.pss)),
            mib(max(&f.pss)),
            mib(f.pss.iter().sum()),
            mean(&f.threads),
            max(&f.threads),
            share(mean(&f.idle_ticks), window),
            share(max(&f.idle_ticks) as f64, window),
            share(f.idle_ticks.iter().sum::<u64>() as f64, window),
            mib(f.broker_idle.rss),
            share(f.broker_idle.ticks as f64, window),
            bytes(f.broker_idle.rchar),
            bytes(f.broker_idle.wchar),
        );
    }
    table
}

fn fanout_table(fleets: &[Fleet]) -> String {
    let mut table = String::from(
        "| gateways | one snapshot | published: payloads / MQTT packets | broker read / wrote | all published (`PubAck`) | first publish → `applied`: first / p50 / last | CPU per gateway, mean / max | CPU of the fleet | RSS per gateway after, mean; peak max | broker CPU | broker peak RSS |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for f in fleets {
        let p50 = f.applied[(f.applied.len() - 1) / 2];
        let _ = writeln!(
            table,
            "| {} | {} chunk{}, {} | {} / {} | {} / {} | {:.2} s | {:.2} / {:.2} / {:.2} s | {:.0} ms / {:.0} ms | {:.2} s in {:.1} s | {}; {} | {:.0} ms | {} |",
            f.n,
            f.chunks,
            if f.chunks == 1 { "" } else { "s" },
            kib(f.snapshot_bytes as u64),
            bytes(f.payload_bytes),
            bytes(f.wire_bytes),
            bytes(f.broker_fan.rchar),
            bytes(f.broker_fan.wchar),
            f.published.as_secs_f64(),
            f.applied[0].as_secs_f64(),
            p50.as_secs_f64(),
            f.applied[f.applied.len() - 1].as_secs_f64(),
            ticks_ms(mean(&f.fan_ticks)),
            ticks_ms(max(&f.fan_ticks) as f64),
            ticks_ms(f.fan_ticks.iter().sum::<u64>() as f64) / 1000.0,
            f.fan_window.as_secs_f64(),
            mib(mean_bytes(&f.rss_after)),
            mib(max(&f.hwm)),
            ticks_ms(f.broker_fan.ticks as f64),
            mib(f.broker_fan.hwm),
        );
    }
    table
}

fn notes(fleets: &[Fleet], failure: Option<&Failure>) -> String {
    let mut notes = String::new();
    for f in fleets {
        let _ = writeln!(
            notes,
            "- {} gateway{}: load average {} before, {} after; idle window {:.0} s after a \
             {} s settle; CPU window of the fan-out {:.1} s; {} rejected and {} resync \
             reports; a telemetry report (one unit) {:.0} bytes.",
            f.n,
            if f.n == 1 { " (the reference)" } else { "s" },
            f.load_before,
            f.load_after,
            f.idle.as_secs_f64(),
            f.settle.as_secs(),
            f.fan_window.as_secs_f64(),
            f.rejected,
            f.resyncs,
            f.telemetry_bytes,
        );
    }
    match failure {
        Some(failure) if failure.started => {
            let _ = writeln!(
                notes,
                "- **{} gateways failed**, so the run stopped there: {}",
                failure.n,
                failure.why.lines().next().unwrap_or("")
            );
        }
        Some(failure) => {
            let _ = writeln!(
                notes,
                "- **{} gateways were not started**, so the run stopped there: {}.",
                failure.n, failure.why
            );
        }
        None => {
            let _ = writeln!(
                notes,
                "- Every size asked for ran; the largest ({}) is not a limit found.",
                fleets.last().map_or(0, |f| f.n)
            );
        }
    }
    notes
}

fn sizes(quick: bool) -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--sizes") {
        let list = args.get(at + 1).expect("--sizes 1,10,50");
        return list
            .split(',')
            .map(|s| s.trim().parse().expect("--sizes takes numbers: 1,10,50"))
            .filter(|&n| n > 0)
            .collect();
    }
    if quick { QUICK_SIZES } else { FULL_SIZES }.to_vec()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = sizes(quick);
    let (settle, idle) = if quick {
        (SETTLE_QUICK, IDLE_QUICK)
    } else {
        (SETTLE, IDLE)
    };
    let open = "<!-- bench:fleet -->\n### A fleet on one broker (`cargo bench --bench fleet`)\n\n";
    if Mosquitto::binary().is_none() {
        let skipped = "Skipped: mosquitto is not installed (looked on PATH and at \
                       /usr/sbin/mosquitto; `apt-get install mosquitto`).";
        eprintln!("fleet: {skipped}");
        support::write_section("fleet", &format!("{open}{skipped}\n<!-- /bench:fleet -->"));
        return;
    }
    let rt = support::runtime();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let mut conditions = support::Conditions::start(dir.path());
    let template = template(dir.path());
    eprintln!(
        "fleet: sizes {sizes:?}, {} keys, idle window {} s; open files limit {}",
        thousands(KEYS as u64),
        idle.as_secs(),
        open_files_limit()
    );
    let mut fleets = Vec::new();
    let mut failure = None;
    for &n in &sizes {
        if let Err(why) = room_for(n, fleets.last()) {
            eprintln!("fleet {n:>4}: not started: {why}");
            failure = Some(Failure {
                n,
                started: false,
                why,
            });
            break;
        }
        match fleet(&rt, &template, n, settle, idle) {
            Ok(f) => {
                println!("{}", idle_table(std::slice::from_ref(&f)));
                println!("{}", fanout_table(std::slice::from_ref(&f)));
                fleets.push(f);
            }
            Err(why) => {
                eprintln!("fleet {n:>4}: failed: {why}");
                failure = Some(Failure {
                    n,
                    started: true,
                    why,
                });
                break;
            }
        }
    }
    assert!(
        !fleets.is_empty(),
        "not even the smallest fleet ran: {failure:?}"
    );

    conditions.finish();
    let section = format!(
        "{open}Measured {when} on {machine}{quick}; {mosquitto}; open files limit {nofile}. \
         {conditions}\n\n\
         N real `doorbridge run` gateways (bench profile) on one mosquitto (a fresh one per \
         size: no persistence, unlimited queues, 100 in flight), each with its own \
         configuration, gateway id, client id and SQLite file holding {keys} keys (version 1, \
         installed before it starts), its bus on a serial port that does not exist (retried \
         with backoff), defaults everywhere else (keep-alive 30 s, log level info). The \
         reference is the first row: one gateway alone, in the same run. Idle: once all are \
         `online` and {settle} s have passed, each gateway's `utime + stime` \
         (`/proc/<pid>/stat`) over the window, its `VmRSS` and `Pss` \
         (`/proc/<pid>/smaps_rollup`: shared pages divided among the processes sharing them, \
         so the fleet's PSS is what it really takes; RSS counts the shared binary in every \
         process) at the end. Fan-out: a reference cloud on one MQTT connection publishes a \
         new snapshot of {keys} keys (version 2, signed for each gateway's target) to every \
         gateway at once, one task per gateway (manifest, then chunks, each after the \
         previous `PubAck`); the time runs from the first publish to each gateway's \
         `applied` on `sync`, as the cloud hears it. The broker's bytes are `rchar`/`wchar` \
         of its `/proc/<pid>/io` (its sockets: the cloud's publishes in, the deliveries and \
         reports out, acks both ways). CPU of the fan-out: from the first publish to \
         {after} s after the last `applied`. 2 cores run the gateways, the broker, the cloud \
         and the bench.\n\n{idle_table}\n{fanout_table}\n{notes}<!-- /bench:fleet -->",
        when = support::now(),
        machine = support::machine(),
        quick = if quick { " (--quick)" } else { "" },
        mosquitto = Mosquitto::version(),
        nofile = open_files_limit(),
        conditions = conditions.describe(),
        keys = thousands(KEYS as u64),
        settle = settle.as_secs(),
        after = AFTER.as_secs(),
        idle_table = idle_table(&fleets),
        fanout_table = fanout_table(&fleets),
        notes = notes(&fleets, failure.as_ref()),
    );
    support::write_section("fleet", &section);
}

/// The soft limit on open files of this process (the gateways and the broker inherit it).
fn open_files_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into())
}
