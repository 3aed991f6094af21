//! What the load-harness benches share (`benches/bus.rs`, `benches/cloud.rs`, `benches/idle.rs`,
//! `benches/uplink.rs`, `benches/fleet.rs`): keys and their installation, the real daemon
//! binary (or any child) with its `/proc` counters, number formatting, the machine's description and the writing of one
//! section of `docs/performance.md`.
//!
//! The brokers are in [`crate::brokers`], shared with the integration tests.
// Figures for display: float conversions lose nothing that shows.
#![allow(clippy::cast_precision_loss)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::Site;
use doorbridge::access::{
    Category, Credential, CredentialKind, Key, KeyRules, Schedule, UseLimit, credential,
};
use doorbridge::cloud::payload::Target;
use doorbridge::store::{DecisionContext, KeySetHeader, Store, StoreOptions};
use ed25519_dalek::SigningKey;

// ---------------------------------------------------------------------------------------------
// The site, its keys and the cloud's signing key
// ---------------------------------------------------------------------------------------------

pub const SALT: &[u8] = b"bench-salt";
pub const SITE: &str = "bench";

/// The cloud's signing key; its public half is the gateway's only trusted key.
pub fn cloud_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

pub fn target(gateway: &str) -> Target {
    Target {
        site: SITE.into(),
        gateway: gateway.into(),
    }
}

/// A small realistic key: one credential, one door, unlimited, no schedule.
pub fn key(id: String, door: &str, kind: CredentialKind, secret: &[u8]) -> Key {
    Key {
        rules: KeyRules {
            name: format!("key {id}"),
            id: id.into(),
            category: Category::Renter,
            doors: vec![door.into()],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: UseLimit::Unlimited,
            welcome: None,
            floors: vec![],
            revoked: false,
            issuer: None,
        },
        credentials: vec![Credential {
            kind,
            digest: credential::digest(SALT, kind, secret),
        }],
    }
}

/// Installs `keys` as key set version 1 (salt `salt`) into the database at `db`, created if
/// need be, and closes it.
pub async fn install_keys(db: &Path, site: Site, salt: &[u8], keys: Vec<Key>) {
    let store = Store::open(StoreOptions::new(db, DecisionContext::new(site))).expect("store");
    store
        .install_key_set(
            KeySetHeader {
                version: 1,
                salt: salt.to_vec(),
                issued_at: Some(jiff::Timestamp::now()),
                stale_after: doorbridge::access::StaleLimits::default(),
            },
            keys,
        )
        .await
        .expect("install the keys");
    store.close();
}

/// A child process, killed on drop; its stdout or stderr drained by a thread that keeps the
/// last 40 lines and counts those that contain a given text.
#[derive(Debug)]
pub struct Process {
    child: Child,
    tail: Arc<Mutex<Vec<String>>>,
    counted: Arc<AtomicUsize>,
}

impl Process {
    /// Starts `command` with its stdout (`stdout`) or its stderr drained, counting the lines
    /// that contain `count`; the other stream goes to /dev/null.
    pub fn spawn(mut command: Command, stdout: bool, count: &'static str) -> Process {
        command.stdin(Stdio::null());
        if stdout {
            command.stdout(Stdio::piped()).stderr(Stdio::null());
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = command.spawn().expect("start a child process");
        let tail = Arc::new(Mutex::new(Vec::new()));
        let counted = Arc::new(AtomicUsize::new(0));
        let lines: Box<dyn std::io::Read + Send> = if stdout {
            Box::new(child.stdout.take().expect("piped stdout"))
        } else {
            Box::new(child.stderr.take().expect("piped stderr"))
        };
        let (keep, hits) = (Arc::clone(&tail), Arc::clone(&counted));
        std::thread::spawn(move || {
            for line in BufReader::new(lines).lines().map_while(Result::ok) {
                if line.contains(count) {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                let mut keep = keep.lock().expect("tail lock");
                if keep.len() >= 40 {
                    keep.remove(0);
                }
                keep.push(line);
            }
        });
        Process {
            child,
            tail,
            counted,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines seen so far that contain the text given to [`Process::spawn`].
    pub fn counted(&self) -> usize {
        self.counted.load(Ordering::Relaxed)
    }

    pub fn tail(&self) -> String {
        self.tail.lock().expect("tail lock").join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, as systemd stops a service; SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// SIGTERM, as systemd stops a service; SIGKILL if it has not exited within 10 s.
fn stop_child(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_child(child);
}

/// SIGKILL unless it has exited, and reap it.
fn kill_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// The benches' runtime: two workers, as the daemon's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child
// ---------------------------------------------------------------------------------------------

/// `doorbridge run` (the bench profile's binary) as a child, so its memory, CPU and I/O
/// counters are its own; killed on drop. Its stderr is drained by a thread that keeps the last
/// lines, counts the bytes and stamps the lines that contain a marker.
pub struct Daemon {
    child: Child,
    pub log: Arc<Mutex<DaemonLog>>,
}

#[derive(Default)]
pub struct DaemonLog {
    pub tail: Vec<String>,
    /// When the first and the last line containing the marker arrived, and how many did.
    pub first_stamped: Option<Instant>,
    pub last_stamped: Option<Instant>,
    pub stamped: usize,
    /// Bytes the daemon wrote to stderr (they count in its `wchar`).
    pub bytes: u64,
}

/// The write counters of `/proc/<pid>/io` (or of one thread's `/proc/<pid>/task/<tid>/io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Io {
    /// Bytes handed to `write(2)` and friends, whatever the file: disk files, the pty, pipes.
    pub wchar: u64,
    /// Write system calls.
    pub syscw: u64,
    /// Bytes of page cache this task dirtied (charged when the page turns dirty, whole pages),
    /// i.e. what it caused to be sent to the storage layer.
    pub write_bytes: u64,
    /// Dirty page cache dropped before it was written (a truncated file).
    pub cancelled_write_bytes: u64,
}

impl Io {
    fn parse(text: &str) -> Io {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Io {
            wchar: field("wchar:"),
            syscw: field("syscw:"),
            write_bytes: field("write_bytes:"),
            cancelled_write_bytes: field("cancelled_write_bytes:"),
        }
    }

    /// What was counted since `before`.
    #[must_use]
    pub fn since(self, before: Io) -> Io {
        Io {
            wchar: self.wchar.saturating_sub(before.wchar),
            syscw: self.syscw.saturating_sub(before.syscw),
            write_bytes: self.write_bytes.saturating_sub(before.write_bytes),
            cancelled_write_bytes: self
                .cancelled_write_bytes
                .saturating_sub(before.cancelled_write_bytes),
        }
    }
}

/// CPU time (user + system) in `/proc/.../stat`, from clock ticks of 10 ms (`USER_HZ`).
fn cpu_of(stat: &str) -> Duration {
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

impl Daemon {
    /// Starts `doorbridge --config CONFIG run` with `DOORBRIDGE_LOG=filter`; lines that contain
    /// `stamp` are timed and counted instead of kept.
    pub fn start(config: &Path, filter: &str, stamp: Option<&'static str>) -> Daemon {
        let mut child = Command::new(crate::binary("doorbridge"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("DOORBRIDGE_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start doorbridge run");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(DaemonLog::default()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let now = Instant::now();
                let mut log = lines.lock().expect("log lock");
                log.bytes += line.len() as u64 + 1;
                if stamp.is_some_and(|s| line.contains(s)) {
                    log.first_stamped.get_or_insert(now);
                    log.last_stamped = Some(now);
                    log.stamped += 1;
                    continue;
                }
                if log.tail.len() >= 40 {
                    log.tail.remove(0);
                }
                log.tail.push(line);
            }
        });
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `kB` field of `/proc/<pid>/status`, in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// The whole process's write counters (threads that ended included).
    pub fn io(&self) -> Io {
        std::fs::read_to_string(format!("/proc/{}/io", self.child.id()))
            .map(|t| Io::parse(&t))
            .unwrap_or_default()
    }

    /// `write_bytes` of `/proc/<pid>/io`: bytes the process caused to be written to storage.
    pub fn write_bytes(&self) -> u64 {
        self.io().write_bytes
    }

    /// The live threads whose name (`comm`, at most 15 bytes) starts with `name`: their write
    /// counters and CPU time, summed.
    pub fn threads(&self, name: &str) -> (Io, Duration) {
        let dir = format!("/proc/{}/task", self.child.id());
        let mut io = Io::default();
        let mut cpu = Duration::ZERO;
        for task in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if !comm.starts_with(name) {
                continue;
            }
            let t = Io::parse(&std::fs::read_to_string(path.join("io")).unwrap_or_default());
            io.wchar += t.wchar;
            io.syscw += t.syscw;
            io.write_bytes += t.write_bytes;
            io.cancelled_write_bytes += t.cancelled_write_bytes;
            cpu += cpu_of(&std::fs::read_to_string(path.join("stat")).unwrap_or_default());
        }
        (io, cpu)
    }

    /// The process's CPU time so far (user + system, threads that ended included).
    pub fn cpu(&self) -> Duration {
        cpu_of(
            &std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default(),
        )
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Bytes written to stderr so far.
    pub fn log_bytes(&self) -> u64 {
        self.log.lock().expect("log lock").bytes
    }

    pub fn tail(&self) -> String {
        self.log.lock().expect("log lock").tail.join("\n")
    }

    /// SIGTERM, as systemd stops it; SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------

/// The `p`-th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Bytes written, small amounts exactly (P7 asks for none at all).
pub fn written(bytes: u64) -> String {
    match bytes {
        0 => "0 B".into(),
        1..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => mib(bytes),
    }
}

/// `n` things in `d`, per second.
pub fn per_second(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// `12345678` → `12,345,678`.
pub fn thousands(n: u64) -> String {
    group_digits(&n.to_string())
}

/// A rate, rounded, in thousands.
pub fn rate(per_second: f64) -> String {
    group_digits(&format!("{per_second:.0}"))
}

pub fn group_digits(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The machine and the document
// ---------------------------------------------------------------------------------------------

/// Total time (µs) some task stalled on I/O, from `/proc/pressure/io` (0 if unavailable).
pub fn io_stall_us() -> u64 {
    std::fs::read_to_string("/proc/pressure/io")
        .ok()
        .and_then(|p| {
            p.lines()
                .next()
                .and_then(|l| l.rsplit_once("total="))
                .and_then(|(_, t)| t.trim().parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// What else the machine was doing
// ---------------------------------------------------------------------------------------------

/// One fsync after a 512-byte append, on the disk under `dir`: p50 and p99 over `n`.
pub fn fsync_probe(dir: &Path, n: usize) -> Fsync {
    use std::io::Write as _;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).expect("fsync probe file");
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            file.write_all(&[u8::try_from(i % 251).unwrap_or(0); 512])
                .expect("write the fsync probe");
            let t = Instant::now();
            file.sync_data().expect("fsync");
            t.elapsed()
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(&path);
    times.sort();
    Fsync {
        p50: percentile(&times, 50),
        p99: percentile(&times, 99),
    }
}

/// An fsync reference: p50 and p99.
#[derive(Clone, Copy, Debug)]
pub struct Fsync {
    pub p50: Duration,
    pub p99: Duration,
}

impl Fsync {
    pub fn describe(self) -> String {
        format!("p50 {}, p99 {}", ms2(self.p50), ms2(self.p99))
    }
}

/// A duration in ms with two decimals (fsyncs are fractions of a millisecond).
pub fn ms2(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// CPU the whole machine spent busy (`/proc/stat`, every core, steal included: a neighbour
/// virtual machine's work), in clock ticks.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is counted in user already).
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

/// CPU this bench and every process under it spent (children that ended and were waited for
/// included), in clock ticks: what the machine did for the bench.
fn own_tree_ticks() -> u64 {
    let me = std::process::id();
    // pid → (parent, utime + stime + cutime + cstime) of every process.
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let parent = u32::try_from(num(1)).unwrap_or(0);
        procs.push((pid, parent, num(11) + num(12) + num(13) + num(14)));
    }
    let mut tree = vec![me];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    procs
        .iter()
        .filter(|p| tree.contains(&p.0))
        .map(|p| p.2)
        .sum()
}

/// The 1-minute load average.
fn load_1min() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Other work on the machine beyond this share of its cores, on average over a run, makes the
/// run's verdicts "under load": figures of time on 2 shared cores move with it.
const BUSY_CORES: f64 = 0.2;

/// What the machine was doing around one bench run, to print beside its figures: the load
/// average and one fsync on the bench's disk at the start and at the end, the CPU that other
/// work took meanwhile (the machine's busy time less the bench's own, its children's included),
/// and how long some task stalled on I/O (`/proc/pressure/io`).
#[derive(Debug)]
pub struct Conditions {
    dir: std::path::PathBuf,
    started: Instant,
    load_start: String,
    fsync_start: Fsync,
    busy_start: u64,
    own_start: u64,
    stall_start: u64,
    end: Option<End>,
}

#[derive(Debug)]
struct End {
    load: String,
    load_1min: f64,
    fsync: Fsync,
    /// Cores' worth of CPU that other work took, on average.
    others: f64,
    stalled: f64,
}

/// Fsyncs per probe: some 0.1 s on a quiet disk.
const FSYNC_PROBES: usize = 200;

impl Conditions {
    /// Takes the first readings, the fsync reference on the disk under `dir` among them.
    pub fn start(dir: &Path) -> Conditions {
        let load_start = load_average();
        let fsync_start = fsync_probe(dir, FSYNC_PROBES);
        Conditions {
            dir: dir.to_owned(),
            started: Instant::now(),
            load_start,
            fsync_start,
            busy_start: machine_busy_ticks(),
            own_start: own_tree_ticks(),
            stall_start: io_stall_us(),
            end: None,
        }
    }

    /// Takes the last readings (once; later calls keep the first).
    pub fn finish(&mut self) {
        if self.end.is_some() {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let busy = machine_busy_ticks().saturating_sub(self.busy_start);
        let own = own_tree_ticks().saturating_sub(self.own_start);
        let stalled = io_stall_us().saturating_sub(self.stall_start) as f64 / 1e6 / elapsed;
        let ticks = clock_ticks() as f64;
        self.end = Some(End {
            load: load_average(),
            load_1min: load_1min(),
            fsync: fsync_probe(&self.dir, FSYNC_PROBES),
            others: busy.saturating_sub(own) as f64 / ticks / elapsed,
            stalled,
        });
    }

    /// The fsync reference taken at the start.
    pub fn fsync_start(&self) -> Fsync {
        self.fsync_start
    }

    /// What a summary row says of the run's load (after [`Conditions::finish`]).
    pub fn run_load(&self) -> RunLoad {
        let end = self.end.as_ref();
        RunLoad {
            others: end.map_or(0.0, |e| e.others),
            load: end.map_or(0.0, |e| e.load_1min),
        }
    }

    /// One paragraph for a bench's section (after [`Conditions::finish`]).
    pub fn describe(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let Some(end) = &self.end else {
            return format!(
                "Machine: load average {} (1, 5, 15 min) at the start; one fsync of a 512-byte \
                 append on the bench's disk {}.",
                self.load_start,
                self.fsync_start.describe()
            );
        };
        format!(
            "Machine: other work took {:.2} of its {cores} cores on average during the run \
             ({}; the machine's busy time in `/proc/stat` less this bench's and its children's); \
             load average {} (1, 5, 15 min) at the start, {} at the end (this bench's own work \
             included); one fsync of a 512-byte append on the bench's disk {} at the start, {} \
             at the end; some task stalled on I/O for {:.0} % of the run (`/proc/pressure/io`).",
            end.others,
            if end.others < BUSY_CORES {
                "a quiet machine"
            } else {
                "under load"
            },
            self.load_start,
            end.load,
            self.fsync_start.describe(),
            end.fsync.describe(),
            end.stalled * 100.0,
        )
    }
}

/// Clock ticks per second (`USER_HZ`): 100 on Linux.
fn clock_ticks() -> u64 {
    100
}

/// The load a summary row was measured under.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunLoad {
    /// Cores' worth of CPU other work took, on average over the run.
    pub others: f64,
    /// The 1-minute load average at the end of the run.
    pub load: f64,
}

impl RunLoad {
    fn quiet(self) -> bool {
        self.others < BUSY_CORES
    }

    /// `met on a quiet machine (other work 0.05 cores, load 0.30)`.
    fn verdict(self, met: bool) -> String {
        format!(
            "{} {} (other work {:.2} cores, load {:.2})",
            if met { "met" } else { "**missed**" },
            if self.quiet() {
                "on a quiet machine"
            } else {
                "under load"
            },
            self.others,
            self.load,
        )
    }

    /// Reads back what [`RunLoad::verdict`] wrote: whether met, and the load.
    fn parse(cell: &str) -> Option<(bool, RunLoad)> {
        let met = if cell.starts_with("met") {
            true
        } else if cell.starts_with("**missed**") {
            false
        } else {
            return None;
        };
        let number = |after: &str| -> Option<f64> {
            let rest = &cell[cell.find(after)? + after.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        Some((
            met,
            RunLoad {
                others: number("other work ")?,
                load: number("load ")?,
            },
        ))
    }
}

/// The CPU model and core count, as `/proc/cpuinfo` names them.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("an unknown CPU", |(_, name)| name.trim());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("{model}, {cores} cores")
}

/// Now, as the sections of `docs/performance.md` date their runs.
pub fn now() -> String {
    jiff::Zoned::now().strftime("%Y-%m-%d %H:%M %Z").to_string()
}

/// Puts `section` (which starts with `<!-- bench:NAME -->` and ends with
/// `<!-- /bench:NAME -->`) into `docs/performance.md` in place of the previous one; the first
/// time, before the notes that discuss the figures, else at the end.
pub fn write_section(name: &str, section: &str) {
    let doc = crate::workspace_root().join("docs/performance.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Performance\n".into());
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &old[..a], &old[b + close.len()..])
        }
        _ => match old.find("### What the figures say") {
            Some(at) => format!("{}{section}\n\n{}", &old[..at], &old[at..]),
            None => format!("{}\n\n{section}\n", old.trim_end()),
        },
    };
    std::fs::write(&doc, new).expect("write docs/performance.md");
}

/// One row of the summary table at the top of `docs/performance.md`: a target of issue 7's
/// list, what this run measured and the reference it measured beside it.
pub struct Summary {
    /// `P1` … `P8`.
    pub id: &'static str,
    pub figure: &'static str,
    pub measured: String,
    pub reference: String,
    pub target: &'static str,
    /// Whether the target was met; the section below says why not.
    pub met: bool,
    /// The bench that measured it (`cargo bench --bench NAME`).
    pub bench: &'static str,
    pub quick: bool,
    /// What else the machine was doing meanwhile ([`Conditions::run_load`]).
    pub load: RunLoad,
}

const SUMMARY_OPEN: &str = "<!-- summary -->";
const SUMMARY_CLOSE: &str = "<!-- /summary -->";
const SUMMARY_HEAD: &str = "| id | figure | measured | reference, same run | target | verdict | run |\n\
     | --- | --- | --- | --- | --- | --- | --- |\n";

/// Puts `rows` into the summary table at the top of `docs/performance.md` in place of the
/// rows with the same ids, keeping the others (other benches measured them), in id order.
pub fn write_summary(rows: &[Summary]) {
    let doc = crate::workspace_root().join("docs/performance.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Performance\n".into());
    let mut kept: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    // The verdict and run cells of the rows being replaced: a verdict that changed with the
    // machine's load says so.
    let cells = |line: &str| -> Option<(String, String)> {
        let cells: Vec<&str> = line.split(" | ").collect();
        let n = cells.len();
        (n >= 3).then(|| {
            (
                cells[n - 2].trim().to_owned(),
                cells[n - 1].trim_end_matches('|').trim().to_owned(),
            )
        })
    };
    let (before, after) = match (old.find(SUMMARY_OPEN), old.find(SUMMARY_CLOSE)) {
        (Some(a), Some(b)) if b > a => {
            for line in old[a..b].lines().filter(|l| l.starts_with("| P")) {
                let id = line.split('|').nth(1).unwrap_or("").trim().to_owned();
                kept.insert(id, line.to_owned());
            }
            (
                old[..a].to_owned(),
                old[b + SUMMARY_CLOSE.len()..].to_owned(),
            )
        }
        // The first time: right under the title.
        _ => match old.split_once('\n') {
            Some((title, rest)) => (format!("{title}\n\n"), format!("\n\n{}", rest.trim_start())),
            None => (format!("{old}\n\n"), String::new()),
        },
    };
    let when = now();
    for r in rows {
        let mut verdict = r.load.verdict(r.met);
        // The previous run of this row, if its verdict was the other one under another load.
        if let Some((cell, run)) = kept.get(r.id).and_then(|line| cells(line))
            && let Some((was_met, was)) = RunLoad::parse(&cell)
            && was_met != r.met
            && was.quiet() != r.load.quiet()
        {
            let first = cell.split("; ").next().unwrap_or(&cell);
            let run = run.split(',').next().unwrap_or(&run);
            verdict = format!("{verdict}; {first} on {run}: **the verdict depends on load**");
        }
        let line = format!(
            "| {} | {} | {} | {} | {} | {verdict} | {when}, `--bench {}`{} |",
            r.id,
            r.figure,
            r.measured,
            r.reference,
            r.target,
            r.bench,
            if r.quick { " `--quick`" } else { "" },
        );
        kept.insert(r.id.to_owned(), line);
    }
    let mut table = format!("{SUMMARY_OPEN}\n{SUMMARY_HEAD}");
    for line in kept.values() {
        table.push_str(line);
        table.push('\n');
    }
    table.push_str(SUMMARY_CLOSE);
    std::fs::write(&doc, format!("{before}{table}{after}")).expect("write docs/performance.md");
}
