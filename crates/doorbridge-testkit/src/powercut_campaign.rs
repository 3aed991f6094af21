//! The power-cut campaign: the real `doorbridge run` binary with its state directory on the
//! power-cut filesystem (`powercut_fs.rs`), door units on a pty, a broker behind a proxy and a
//! cloud that signs key sets and keeps every record it receives; power is cut at random
//! moments of chosen [`Phase`]s, and what survived is checked. Shared by the short test in
//! `cargo test` (`tests/it/powercut.rs`) and the campaign bench (`benches/powercut.rs`).
//!
//! A cut: SIGKILL the daemon (and a running `keys import`), then [`PowercutMount::cut`]
//! (whole or torn), so nothing runs once the unsynced changes are gone. Then, before the
//! daemon starts again, a copy of what survived is opened with SQLite (never through the
//! mount: a FUSE server must not be its own client, or a `munmap` of the `-shm` file waits on
//! itself) and checked: `PRAGMA integrity_check`, and the live key set is exactly the set held
//! before the phase or the one being installed, never a mix. At the end every decision a door
//! heard and every report a door had acknowledged must have reached the cloud (or still wait
//! in the outbox), no record id may have come twice with different contents, and no limited
//! key may have been granted more often than its limit, counting the grants the doors heard.
// Counts and durations for display.
#![allow(clippy::cast_precision_loss)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{
    Category, Credential, CredentialKind, Key, KeyRules, Schedule, UseLimit, credential,
};
use doorbridge::bus::frame::Address;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::bundle::Bundle;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::cloud::uplink::Batch;
use doorbridge::config::Config;
use doorbridge::store::{DecisionContext, KeySetHeader, Record, Store, StoreOptions};
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::CloudClient;
use doorbridge_sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot};

use crate::brokers::{Proxy, RumqttdBroker};
use crate::powercut_fs::{Cut, PowercutMount, splitmix};

const SALT: &[u8] = b"powercut-salt";
const GATEWAY: &str = "gw-powercut";
const SITE: &str = "site-powercut";
const BUS: &str = "pc";
const UNITS: u8 = 4;
/// Residents' unlimited PINs per unit; limited keys shared by all units.
const RESIDENTS: usize = 8;
const SINGLE_USE: usize = 12;
const THREE_USE: usize = 6;
/// Keys every version holds under the same ids (residents and limited keys).
pub const FIXED_KEYS: usize = RESIDENTS + SINGLE_USE + THREE_USE;
/// How long a step may take on a loaded machine; every wait ends as soon as it holds.
const WAIT: Duration = Duration::from_secs(60);
/// The daemon's log: the link at debug level tells when chunks are staged.
/// What the daemon logs when it asks the cloud for a whole snapshot.
const RESYNC_ASKED: &str = "asking the cloud for a full snapshot";
const LOG_FILTER: &str = "info,doorbridge::cloud::link=debug";

/// Where in the daemon's work the power goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Doors presenting credentials (limited keys among them), retransmissions, battery
    /// reports, while the outbox drains to the cloud.
    Decisions,
    /// A large snapshot arriving: chunks staged with `synchronous=NORMAL`.
    Snapshot,
    /// A small snapshot: the cut lands around the switch to the new set.
    Switch,
    /// `doorbridge keys import` with the service stopped.
    Import,
    /// Back online after an outage: the outbox drains and acknowledged rows are deleted.
    Drain,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Decisions,
        Phase::Snapshot,
        Phase::Switch,
        Phase::Import,
        Phase::Drain,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Phase::Decisions => "decisions with retransmits and reports, outbox draining",
            Phase::Snapshot => "a snapshot's chunks staged with `synchronous=NORMAL`",
            Phase::Switch => "a small snapshot: around the switch to the new key set",
            Phase::Import => "`doorbridge keys import` (service stopped)",
            Phase::Drain => "the outbox drain after an outage, deleting acknowledged rows",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The cuts, in order: where, and how.
    pub cuts: Vec<(Phase, CutKind)>,
    /// Keys in each snapshot besides the residents and limited keys.
    pub snapshot_keys: usize,
    /// Keys in the small snapshot of [`Phase::Switch`] besides those.
    pub switch_keys: usize,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutKind {
    Whole,
    Torn,
}

impl Plan {
    /// `n` cuts cycling through the phases, whole and torn by turns.
    pub fn cycle(n: usize, snapshot_keys: usize, seed: u64) -> Plan {
        let cuts = (0..n)
            .map(|i| {
                let phase = Phase::ALL[i % Phase::ALL.len()];
                // By turns within a round, the other way round in the next: every phase gets
                // both kinds.
                let round = i / Phase::ALL.len();
                let kind = if (i % Phase::ALL.len() + round).is_multiple_of(2) {
                    CutKind::Whole
                } else {
                    CutKind::Torn
                };
                (phase, kind)
            })
            .collect();
        Plan {
            cuts,
            snapshot_keys,
            switch_keys: 300,
            seed,
        }
    }
}

/// One cut and what was found after it.
#[derive(Clone, Debug)]
pub struct CutResult {
    pub phase: Phase,
    pub kind: CutKind,
    /// When in the phase the power went.
    pub after: Duration,
    /// Unsynced changes dropped (and kept, for a torn cut).
    pub pending: usize,
    pub kept: usize,
    /// `PRAGMA integrity_check` of what survived, when not `ok`.
    pub integrity: Option<String>,
    /// The held key set before the phase, the one being installed, and the live one after.
    pub held_before: u64,
    pub installing: Option<u64>,
    pub live_after: u64,
    /// Set when the live set is not exactly one of those two.
    pub mixed: Option<String>,
    /// How the daemon synced each file during the phase (and the start before it), by name.
    pub file_syncs: BTreeMap<String, crate::powercut_fs::FileSyncs>,
}

/// The whole campaign's findings.
#[derive(Debug, Default)]
pub struct Tally {
    pub cuts: Vec<CutResult>,
    pub elapsed: Duration,
    /// Decisions the doors heard (first answers; repeats of a retransmission counted apart),
    /// reports they had acknowledged, and records the cloud received.
    pub heard: usize,
    pub repeats_heard: usize,
    pub acked_reports: usize,
    pub received: usize,
    pub duplicates: u64,
    /// Heard decisions and acknowledged reports with no record in the cloud or the outbox.
    pub lost: Vec<String>,
    /// Record ids the cloud received twice with different contents.
    pub conflicting_ids: Vec<String>,
    /// Limited keys granted more often than allowed: key, limit, grants heard.
    pub over_granted: Vec<(String, u32, usize)>,
    /// Limited-key grants heard in all.
    pub limited_grants: usize,
    /// Databases the daemon moved aside as corrupt at a start.
    pub moved_aside: usize,
    /// The seed of the run (`POWERCUT_SEED` repeats it, machine timing aside).
    pub seed: u64,
}

impl Tally {
    pub fn inconsistent(&self) -> usize {
        self.cuts.iter().filter(|c| c.integrity.is_some()).count() + self.moved_aside
    }

    pub fn mixed(&self) -> usize {
        self.cuts.iter().filter(|c| c.mixed.is_some()).count()
    }

    /// Everything that broke a promise, one line each (empty when all held).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, c) in self.cuts.iter().enumerate() {
            if let Some(problem) = &c.integrity {
                out.push(format!(
                    "cut {i} ({:?}, {:?}): integrity_check: {problem}",
                    c.phase, c.kind
                ));
            }
            if let Some(problem) = &c.mixed {
                out.push(format!(
                    "cut {i} ({:?}, {:?}): key set: {problem}",
                    c.phase, c.kind
                ));
            }
        }
        if self.moved_aside > 0 {
            out.push(format!(
                "{} databases moved aside as corrupt by the daemon",
                self.moved_aside
            ));
        }
        out.extend(self.lost.iter().map(|l| format!("lost: {l}")));
        out.extend(
            self.conflicting_ids
                .iter()
                .map(|l| format!("id reused: {l}")),
        );
        out.extend(
            self.over_granted
                .iter()
                .map(|(k, limit, n)| format!("{k} (limit {limit}) granted {n} times")),
        );
        out
    }

    /// Cuts per phase and kind.
    pub fn by_phase(&self) -> BTreeMap<Phase, (usize, usize)> {
        let mut out: BTreeMap<Phase, (usize, usize)> = BTreeMap::new();
        for c in &self.cuts {
            let e = out.entry(c.phase).or_default();
            match c.kind {
                CutKind::Whole => e.0 += 1,
                CutKind::Torn => e.1 += 1,
            }
        }
        out
    }

    /// A table of the counts, for the test's output and `docs/reliability.md`.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| where the power went | cuts (whole + torn) | inconsistent databases | mixed key sets |\n\
             | --- | --- | --- | --- |\n",
        );
        for (phase, (whole, torn)) in self.by_phase() {
            let of = |f: &dyn Fn(&CutResult) -> bool| {
                self.cuts
                    .iter()
                    .filter(|c| c.phase == phase && f(c))
                    .count()
            };
            let _ = writeln!(
                t,
                "| {} | {} ({whole} + {torn}) | {} | {} |",
                phase.describe(),
                whole + torn,
                of(&|c| c.integrity.is_some()),
                of(&|c| c.mixed.is_some()),
            );
        }
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

fn cloud_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn door(n: u8) -> String {
    format!("door-{n}")
}

fn key(id: String, limit: UseLimit, secret: &str) -> Key {
    Key {
        rules: KeyRules {
            name: format!("key {id}"),
            id: id.into(),
            category: Category::Renter,
            doors: (1..=UNITS).map(|n| door(n).into()).collect(),
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: limit,
            welcome: None,
            floors: vec![],
            revoked: false,
            issuer: None,
        },
        credentials: vec![Credential {
            kind: CredentialKind::Pin,
            digest: credential::digest(SALT, CredentialKind::Pin, secret.as_bytes()),
        }],
    }
}

fn resident_pin(i: usize) -> String {
    format!("1{i:05}")
}

fn limited_pin(i: usize) -> String {
    format!("2{i:05}")
}

fn limited_id(i: usize) -> String {
    format!("limited-{i}")
}

fn limit_of(i: usize) -> u32 {
    if i < SINGLE_USE { 1 } else { 3 }
}

/// The keys every version holds (same ids, so use counts carry over), then `fillers` keys of
/// its own (`v{version}-{i}`), so a mix of two versions shows.
fn key_set(version: u64, fillers: usize) -> Vec<Key> {
    let mut keys: Vec<Key> = (0..RESIDENTS)
        .map(|i| {
            key(
                format!("resident-{i}"),
                UseLimit::Unlimited,
                &resident_pin(i),
            )
        })
        .collect();
    keys.extend(
        (0..SINGLE_USE + THREE_USE)
            .map(|i| key(limited_id(i), UseLimit::Total(limit_of(i)), &limited_pin(i))),
    );
    keys.extend((0..fillers).map(|i| {
        key(
            format!("v{version}-{i}"),
            UseLimit::Unlimited,
            &format!("9{version:03}{i:06}"),
        )
    }));
    keys
}

fn target() -> Target {
    Target {
        site: SITE.into(),
        gateway: GATEWAY.into(),
    }
}

fn snapshot(version: u64, keys: &[Key]) -> SignedSnapshot {
    build::snapshot(
        &target(),
        version,
        jiff::Timestamp::now(),
        SALT,
        keys,
        &cloud_key(),
    )
    .expect("build a snapshot")
}

// ---------------------------------------------------------------------------------------------
// What the doors heard, and what the cloud received
// ---------------------------------------------------------------------------------------------

/// A decision a door unit heard.
#[derive(Clone, Debug)]
struct Heard {
    unit: u8,
    id: u16,
    pin: String,
    granted: bool,
}

#[derive(Debug, Default)]
struct DoorLog {
    /// First answers to each verify.
    heard: Vec<Heard>,
    /// Answers to a retransmission of an answered verify.
    repeats: usize,
    /// Per unit, verifies sent to the simulator and not yet decided, given up or refused.
    in_flight: HashMap<u8, usize>,
    /// Per unit, battery reports acknowledged by the gateway, in order.
    batteries_acked: HashMap<u8, usize>,
    /// Per unit, battery readings made (millivolts), in order.
    batteries_made: HashMap<u8, Vec<u16>>,
    /// Per unit, battery reports dropped unsent by the unit (its outbox overflowed).
    batteries_dropped: HashMap<u8, usize>,
}

impl DoorLog {
    fn take(&mut self, o: Output) {
        match o {
            Output::Decision {
                unit,
                id,
                request,
                answer,
                repeat,
                ..
            } => {
                if repeat {
                    self.repeats += 1;
                    return;
                }
                if let Some(n) = self.in_flight.get_mut(&unit.get()) {
                    *n = n.saturating_sub(1);
                }
                self.heard.push(Heard {
                    unit: unit.get(),
                    id,
                    pin: String::from_utf8_lossy(&request.value).into_owned(),
                    granted: matches!(answer, Answer::Grant(_)),
                });
            }
            Output::GaveUp {
                unit,
                repeat: false,
                ..
            }
            | Output::Rejected {
                command: SimCommand::Verify { unit, .. },
                ..
            } => {
                if let Some(n) = self.in_flight.get_mut(&unit.get()) {
                    *n = n.saturating_sub(1);
                }
            }
            Output::Acked {
                unit,
                report: ReportKind::Battery,
                ..
            } => *self.batteries_acked.entry(unit.get()).or_default() += 1,
            Output::Dropped {
                unit,
                report: ReportKind::Battery,
                ..
            } => *self.batteries_dropped.entry(unit.get()).or_default() += 1,
            _ => {}
        }
    }
}

/// What the cloud received: each record by `(epoch, seq)`.
#[derive(Debug, Default)]
struct Received {
    records: HashMap<(u64, u64), Record>,
    duplicates: u64,
    conflicts: Vec<String>,
}

/// What a copy of the surviving database says: an integrity problem, and the live key set
/// (version and key ids) or why it does not read.
type Surviving = (Option<String>, Result<(u64, BTreeSet<String>), String>);

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A child process (the daemon, or `keys import`) whose stderr is kept, line by line.
struct Child2 {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Child2 {
    fn spawn(mut command: Command) -> Child2 {
        command
            .env("DOORBRIDGE_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start doorbridge");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("log lock").push(line);
            }
        });
        Child2 { child, log }
    }

    fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(30)..].join("\n")
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the log has `n` lines containing `needle`.
    async fn until_logged(&mut self, needle: &str, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count(needle) < n {
            if let Some(status) = self.exited() {
                panic!(
                    "doorbridge exited ({status}) before logging {needle:?}:\n{}",
                    self.tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "doorbridge did not log {needle:?} within {within:?}:\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and reaped: nothing of it runs any more.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as systemd stops it; waits for the clean exit.
    async fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while self.exited().is_none() {
            assert!(
                Instant::now() < deadline,
                "doorbridge did not stop on SIGTERM:\n{}",
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// The site
// ---------------------------------------------------------------------------------------------

struct Sim {
    commands: mpsc::Sender<SimCommand>,
    stop: Option<oneshot::Sender<()>>,
}

/// Everything the campaign runs.
struct Site {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    graveyard: PathBuf,
    mnt: PathBuf,
    scratch: PathBuf,
    config: PathBuf,
    mount: Option<PowercutMount>,
    daemon: Option<Child2>,
    /// Databases moved aside, as counted in earlier daemons' logs.
    moved_aside: usize,
    _broker: RumqttdBroker,
    proxy: Proxy,
    cloud: Arc<CloudClient>,
    topics: Topics,
    received: Arc<Mutex<Received>>,
    doors: Arc<Mutex<DoorLog>>,
    sim: Sim,
    rng: u64,
    /// Versions published, with their key ids.
    versions: BTreeMap<u64, BTreeSet<String>>,
    held: u64,
    next_version: u64,
    plan: Plan,
    /// How long a whole snapshot and a whole import took, measured uncut at the start.
    snapshot_takes: Duration,
    switch_takes: Duration,
    import_takes: Duration,
    battery: u16,
}

fn config_text(db: &Path, link: &Path, broker: &str) -> String {
    let mut text = format!(
        r#"[gateway]
id = "{GATEWAY}"
site_id = "{SITE}"
[site]
timezone = "Europe/Berlin"
[cloud]
url = "{broker}"
trusted_keys = ["{trusted}"]
keepalive = "5s"
max_payload = "16 KiB"
[storage]
path = "{}"
[[buses]]
name = "{BUS}"
port = "{}"
response_timeout = "40ms"
poll_interval = "10ms"
offline_after = 3
"#,
        db.display(),
        link.display(),
        trusted = doorbridge_sim::cloud::hex(cloud_key().verifying_key().as_bytes()),
    );
    for n in 1..=UNITS {
        let _ = write!(
            text,
            "[[buses.units]]\naddress = {n}\ndoor = \"{}\"\n",
            door(n)
        );
    }
    text
}

impl Site {
    fn random(&mut self, below: u64) -> u64 {
        splitmix(&mut self.rng) % below.max(1)
    }

    fn random_duration(&mut self, from: Duration, to: Duration) -> Duration {
        let span = u64::try_from((to.saturating_sub(from)).as_micros()).unwrap_or(u64::MAX);
        from + Duration::from_micros(self.random(span + 1))
    }

    // The set-up reads best in one piece.
    #[allow(clippy::too_many_lines)]
    async fn open(plan: Plan) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing");
        let graveyard = dir.path().join("graveyard");
        let mnt = dir.path().join("state");
        let scratch = dir.path().join("scratch");
        let link = dir.path().join("ttyPC");
        let config = dir.path().join("doorbridge.toml");
        let broker = RumqttdBroker::start();
        let proxy = Proxy::start(broker.port);
        let text = config_text(&mnt.join("doorbridge.db"), &link, &proxy.url());
        std::fs::write(&config, &text).expect("write the configuration");
        let site = Config::from_toml_str(&text, "powercut.toml")
            .expect("the campaign's configuration")
            .site();

        // Version 1, installed straight into the backing directory before anything is
        // mounted (and so durable).
        std::fs::create_dir_all(&backing).expect("backing directory");
        let keys = key_set(1, plan.snapshot_keys);
        let ids = keys.iter().map(|k| k.rules.id.to_string()).collect();
        let store = Store::open(StoreOptions::new(
            backing.join("doorbridge.db"),
            DecisionContext::new(site),
        ))
        .expect("open the store");
        store
            .install_key_set(
                KeySetHeader {
                    version: 1,
                    salt: SALT.to_vec(),
                    issued_at: Some(jiff::Timestamp::now()),
                    stale_after: doorbridge::access::StaleLimits::default(),
                },
                keys,
            )
            .await
            .expect("install version 1");
        store.close();
        let mount = PowercutMount::mount(&backing, &graveyard, &mnt)
            .unwrap_or_else(|e| panic!("the power-cut campaign cannot run here: {e}"));

        let topics = Topics::new(DEFAULT_PREFIX, &target()).expect("topics");
        let cloud = CloudClient::connect(&broker.url(), "powercut-cloud")
            .await
            .expect("the cloud connects");
        let mut rx = cloud
            .subscribe(&topics.topic(Channel::Records))
            .await
            .expect("subscribe to the records");
        let received = Arc::new(Mutex::new(Received::default()));
        let into = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some((_, payload)) = rx.recv().await {
                let batch = Batch::decode(&payload).expect("upload batches decode");
                let mut r = into.lock().expect("received lock");
                for u in batch.records {
                    match r.records.get(&(batch.epoch, u.seq)) {
                        Some(old) if *old == u.record => r.duplicates += 1,
                        Some(old) => {
                            let what = format!(
                                "epoch {} seq {}: first {old:?}, then {:?}",
                                batch.epoch, u.seq, u.record
                            );
                            r.conflicts.push(what);
                        }
                        None => {
                            r.records.insert((batch.epoch, u.seq), u.record);
                        }
                    }
                }
            }
        });

        // The door units: in this process, on a pty the daemon opens; they live through
        // every cut (a door unit has its own power).
        let (master, _) = doorbridge_sim::linked_pty(&link).expect("a linked pty");
        let addresses: Vec<Address> = (1..=UNITS)
            .map(|n| Address::unit(n).expect("a unit address"))
            .collect();
        let units = SimUnits::new(
            &addresses,
            SimConfig {
                seed: plan.seed,
                ..SimConfig::default()
            },
        )
        .expect("simulated units");
        let (commands, command_rx) = mpsc::channel(256);
        let (output_tx, mut outputs) = mpsc::channel(4096);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let port = HangupTolerant::new(master, Duration::from_millis(5));
            let _ = run_sim(port, units, command_rx, output_tx, async {
                let _ = stopped.await;
            })
            .await;
        });
        let doors = Arc::new(Mutex::new(DoorLog::default()));
        let into = Arc::clone(&doors);
        tokio::spawn(async move {
            while let Some(o) = outputs.recv().await {
                into.lock().expect("door log lock").take(o);
            }
        });

        let mut versions = BTreeMap::new();
        versions.insert(1, ids);
        Site {
            _dir: dir,
            backing,
            graveyard,
            mnt,
            scratch,
            config,
            mount: Some(mount),
            daemon: None,
            moved_aside: 0,
            _broker: broker,
            proxy,
            cloud: Arc::new(cloud),
            topics,
            received,
            doors,
            sim: Sim {
                commands,
                stop: Some(stop),
            },
            rng: plan.seed,
            versions,
            held: 1,
            next_version: 2,
            plan,
            snapshot_takes: Duration::from_secs(1),
            switch_takes: Duration::from_millis(100),
            import_takes: Duration::from_secs(1),
            battery: 0,
        }
    }

    fn command(&self, what: &str) -> Command {
        let mut c = Command::new(crate::binary("doorbridge"));
        c.arg("--config").arg(&self.config).arg(what);
        c
    }

    /// Starts the daemon and waits until its bus port is open.
    async fn start_daemon(&mut self) {
        let mut daemon = Child2::spawn(self.command("run"));
        daemon.until_logged("bus port open", 1, WAIT).await;
        self.daemon = Some(daemon);
    }

    fn stop_counting(&mut self) {
        if let Some(d) = &self.daemon {
            self.moved_aside += d.count("DATABASE IS CORRUPT");
        }
    }

    /// A new version of the key set with `fillers` keys of its own, remembered.
    fn new_version(&mut self, fillers: usize) -> (u64, Vec<Key>) {
        let version = self.next_version;
        self.next_version += 1;
        let keys = key_set(version, fillers);
        self.versions.insert(
            version,
            keys.iter().map(|k| k.rules.id.to_string()).collect(),
        );
        (version, keys)
    }

    /// Sends door traffic until `stop` fires: PINs at every unit (residents and limited keys,
    /// up to two waiting per unit), now and then a retransmission of an answered verify or a
    /// battery reading.
    fn load(&self, stop: oneshot::Receiver<()>, seed: u64) -> tokio::task::JoinHandle<()> {
        let commands = self.sim.commands.clone();
        let doors = Arc::clone(&self.doors);
        let mut battery = self.battery;
        tokio::spawn(async move {
            let mut stop = stop;
            let mut rng = seed;
            loop {
                for unit in 1..=UNITS {
                    let addr = Address::unit(unit).expect("a unit address");
                    let roll = splitmix(&mut rng) % 100;
                    let command = if roll < 5 {
                        Some(SimCommand::Retransmit {
                            unit: addr,
                            report: false,
                        })
                    } else if roll < 10 {
                        battery = battery.wrapping_add(1);
                        let millivolts = 3000 + battery % 2000;
                        doors
                            .lock()
                            .expect("door log lock")
                            .batteries_made
                            .entry(unit)
                            .or_default()
                            .push(millivolts);
                        Some(SimCommand::Battery {
                            unit: addr,
                            percent: 80,
                            millivolts,
                        })
                    } else {
                        let mut log = doors.lock().expect("door log lock");
                        let waiting = log.in_flight.entry(unit).or_default();
                        if *waiting < 2 {
                            *waiting += 1;
                            let pin = if roll < 40 {
                                limited_pin(
                                    usize::try_from(splitmix(&mut rng)).unwrap_or(0)
                                        % (SINGLE_USE + THREE_USE),
                                )
                            } else {
                                resident_pin(
                                    usize::try_from(splitmix(&mut rng)).unwrap_or(0) % RESIDENTS,
                                )
                            };
                            Some(SimCommand::Verify {
                                unit: addr,
                                kind: CredentialKind::Pin,
                                value: pin.into_bytes(),
                                reader: 0,
                            })
                        } else {
                            None
                        }
                    };
                    if let Some(c) = command {
                        let _ = commands.send(c).await;
                    }
                }
                tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep(Duration::from_millis(15)) => {}
                }
            }
        })
    }

    // ----- the power cut -----

    /// SIGKILLs whatever runs on the mount, cuts the power, checks what survived, mounts
    /// again. The daemon is not restarted.
    fn power_cut(
        &mut self,
        phase: Phase,
        kind: CutKind,
        after: Duration,
        import: Option<&mut Child2>,
        installing: Option<u64>,
    ) -> CutResult {
        if let Some(import) = import {
            import.kill9();
        }
        self.stop_counting();
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
        let cut = match kind {
            CutKind::Whole => Cut::Whole,
            CutKind::Torn => Cut::Torn {
                seed: splitmix(&mut self.rng),
            },
        };
        let report = self
            .mount
            .take()
            .expect("mounted")
            .cut(cut)
            .expect("the power cut");
        let (integrity, live) = self.examine();
        let held_before = self.held;
        let mut mixed = None;
        let live_after = match live {
            Ok((version, ids)) => {
                // The old set or a newer one the cloud sent (a snapshot that was still queued
                // for the gateway may land between cuts), never an older one.
                let newest = installing.unwrap_or(held_before).max(held_before);
                if version < held_before || version > newest {
                    mixed = Some(format!(
                        "version {version} is live; expected {held_before} or {installing:?}"
                    ));
                } else if self.versions.get(&version) != Some(&ids) {
                    let want = &self.versions[&version];
                    let foreign = ids.difference(want).take(3).collect::<Vec<_>>();
                    let missing = want.difference(&ids).take(3).collect::<Vec<_>>();
                    mixed = Some(format!(
                        "version {version} holds {} keys, expected {}; foreign {foreign:?}, \
                         missing {missing:?}",
                        ids.len(),
                        want.len()
                    ));
                }
                version
            }
            Err(e) => {
                mixed = Some(format!("the key set does not read: {e}"));
                0
            }
        };
        if mixed.is_none() {
            self.held = live_after;
        }
        self.mount = Some(
            PowercutMount::mount(&self.backing, &self.graveyard, &self.mnt)
                .expect("mount again after the cut"),
        );
        CutResult {
            phase,
            kind,
            after,
            pending: report.pending,
            kept: report.kept,
            file_syncs: report.file_syncs,
            integrity,
            held_before,
            installing,
            live_after,
            mixed,
        }
    }

    /// Opens a copy of what survived (never the mount itself: see the module header) and
    /// reads its integrity and live key set.
    fn examine(&self) -> Surviving {
        let _ = std::fs::remove_dir_all(&self.scratch);
        std::fs::create_dir_all(&self.scratch).expect("scratch directory");
        for name in ["doorbridge.db", "doorbridge.db-wal"] {
            let from = self.backing.join(name);
            if from.exists() {
                std::fs::copy(&from, self.scratch.join(name)).expect("copy what survived");
            }
        }
        let db = self.scratch.join("doorbridge.db");
        let conn = match rusqlite::Connection::open(&db) {
            Ok(c) => c,
            Err(e) => return (Some(format!("does not open: {e}")), Err(e.to_string())),
        };
        let integrity = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_or_else(
                |e| Some(e.to_string()),
                |rows| (rows != ["ok"]).then(|| rows.join("; ")),
            );
        let live = (|| {
            let meta = |name: &str| {
                conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                    r.get::<_, i64>(0)
                })
            };
            let generation = meta("active_generation")?;
            let version = u64::try_from(meta("keyset_version")?).unwrap_or(0);
            let mut stmt = conn.prepare("SELECT key_id FROM keys WHERE generation = ?1")?;
            let ids = stmt
                .query_map([generation], |r| r.get::<_, String>(0))?
                .collect::<Result<BTreeSet<_>, _>>()?;
            Ok::<_, rusqlite::Error>((version, ids))
        })()
        .map_err(|e| e.to_string());
        (integrity, live)
    }

    // ----- the phases -----

    /// Runs one phase and cuts the power in it; the daemon runs again afterwards.
    async fn phase(&mut self, phase: Phase, kind: CutKind) -> CutResult {
        if self.daemon.is_none() {
            self.start_daemon().await;
        }
        let result = match phase {
            Phase::Decisions => {
                let (stop, stopped) = oneshot::channel();
                let seed = splitmix(&mut self.rng);
                let load = self.load(stopped, seed);
                let after =
                    self.random_duration(Duration::from_millis(100), Duration::from_millis(1500));
                tokio::time::sleep(after).await;
                let r = self.power_cut(phase, kind, after, None, None);
                let _ = stop.send(());
                let _ = load.await;
                r
            }
            Phase::Snapshot | Phase::Switch => {
                let fillers = if phase == Phase::Snapshot {
                    self.plan.snapshot_keys
                } else {
                    self.plan.switch_keys
                };
                let (version, keys) = self.new_version(fillers);
                let signed = snapshot(version, &keys);
                let cloud = Arc::clone(&self.cloud);
                let topics = self.topics.clone();
                let started = Instant::now();
                let publish = tokio::spawn(async move {
                    let _ = cloud.publish_snapshot(&topics, &signed).await;
                });
                let after = if phase == Phase::Snapshot {
                    let until = self.snapshot_takes.mul_f64(1.1);
                    self.random_duration(Duration::ZERO, until)
                } else {
                    // Around the switch: late in the time a small set takes to arrive, be
                    // staged and go live.
                    let takes = self.switch_takes;
                    self.random_duration(takes.mul_f64(0.5), takes.mul_f64(1.3))
                };
                tokio::time::sleep(after.saturating_sub(started.elapsed())).await;
                let r = self.power_cut(phase, kind, after, None, Some(version));
                // What the cloud had not sent yet stays unsent.
                publish.abort();
                r
            }
            Phase::Import => {
                // The service is stopped for an import.
                let mut daemon = self.daemon.take().expect("running");
                daemon.terminate().await;
                self.moved_aside += daemon.count("DATABASE IS CORRUPT");
                drop(daemon);
                let (version, keys) = self.new_version(self.plan.snapshot_keys);
                let file = self
                    .scratch
                    .with_file_name(format!("keys-{version}.bundle"));
                Bundle::from(snapshot(version, &keys))
                    .write(&file)
                    .expect("write the bundle");
                let mut import = Child2::spawn({
                    let mut c = self.command("keys");
                    c.arg("import").arg(&file);
                    c
                });
                let until = self.import_takes.mul_f64(1.1);
                let after = self.random_duration(Duration::ZERO, until);
                tokio::time::sleep(after).await;
                self.power_cut(phase, kind, after, Some(&mut import), Some(version))
            }
            Phase::Drain => {
                // An outage while the doors keep deciding, then the broker is back.
                self.proxy.cut();
                let (stop, stopped) = oneshot::channel();
                let seed = splitmix(&mut self.rng);
                let load = self.load(stopped, seed);
                tokio::time::sleep(Duration::from_millis(800)).await;
                let _ = stop.send(());
                let _ = load.await;
                let daemon = self.daemon.as_mut().expect("running");
                let connected = daemon.count("connected to the broker");
                self.proxy.restore();
                daemon
                    .until_logged("connected to the broker", connected + 1, WAIT)
                    .await;
                let after = self.random_duration(Duration::ZERO, Duration::from_millis(600));
                tokio::time::sleep(after).await;
                self.power_cut(phase, kind, after, None, None)
            }
        };
        self.start_daemon().await;
        result
    }

    /// Publishes a snapshot with `fillers` keys of its own and waits until it is live; returns
    /// how long that took.
    async fn install(&mut self, fillers: usize) -> Duration {
        let (version, keys) = self.new_version(fillers);
        let signed = snapshot(version, &keys);
        let daemon = self.daemon.as_mut().expect("running");
        let installed = daemon.count("key set installed");
        let started = Instant::now();
        let deadline = started + WAIT * 3;
        // A snapshot published before the daemon's subscription took effect reaches it in
        // part (chunks without their manifest); it then asks for a resync, and the cloud
        // answers as docs/cloud-protocol.md says: with the whole snapshot again.
        let mut asked = daemon.count(RESYNC_ASKED);
        loop {
            self.cloud
                .publish_snapshot(&self.topics, &signed)
                .await
                .expect("publish a snapshot");
            loop {
                if daemon.count("key set installed") > installed {
                    self.held = version;
                    return started.elapsed();
                }
                if let Some(status) = daemon.exited() {
                    panic!(
                        "doorbridge exited ({status}) while installing:\n{}",
                        daemon.tail()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "doorbridge did not install key set {version} within {:?}:\n{}",
                    WAIT * 3,
                    daemon.tail()
                );
                let now = daemon.count(RESYNC_ASKED);
                if now > asked {
                    asked = now;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Installs a large and a small snapshot and a key file once without a cut, to learn how
    /// long each takes here (the cuts land at random moments within that).
    async fn calibrate(&mut self) {
        if self.daemon.is_none() {
            self.start_daemon().await;
        }
        self.snapshot_takes = self.install(self.plan.snapshot_keys).await;
        self.switch_takes = self.install(self.plan.switch_keys).await;

        let mut daemon = self.daemon.take().expect("running");
        daemon.terminate().await;
        drop(daemon);
        let (version, keys) = self.new_version(self.plan.snapshot_keys);
        let file = self
            .scratch
            .with_file_name(format!("keys-{version}.bundle"));
        Bundle::from(snapshot(version, &keys))
            .write(&file)
            .expect("write the bundle");
        let started = Instant::now();
        let status = self
            .command("keys")
            .arg("import")
            .arg(&file)
            .env("DOORBRIDGE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run keys import");
        assert!(status.success(), "keys import failed: {status}");
        self.import_takes = started.elapsed();
        self.held = version;
        self.start_daemon().await;
    }

    /// After the last cut: online, the outbox drained; then every promise is checked.
    async fn settle(&mut self, tally: &mut Tally) {
        self.proxy.restore();
        if self.daemon.is_none() {
            self.start_daemon().await;
        }
        // Every unit idle: nothing left to decide.
        let deadline = Instant::now() + WAIT;
        while self
            .doors
            .lock()
            .expect("door log lock")
            .in_flight
            .values()
            .any(|&n| n > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Until the cloud has everything the doors heard, or the deadline.
        let deadline = Instant::now() + WAIT;
        loop {
            let missing = self.missing();
            if missing.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut daemon = self.daemon.take().expect("running");
        daemon.terminate().await;
        self.moved_aside += daemon.count("DATABASE IS CORRUPT");
        drop(daemon);
        // What still waits in the outbox counts as kept.
        let waiting = self.outbox();
        let lost: Vec<String> = self
            .missing()
            .into_iter()
            .filter(|m| !waiting.iter().any(|r| m.matches(r)))
            .map(|m| m.describe())
            .collect();
        let doors = self.doors.lock().expect("door log lock");
        let received = self.received.lock().expect("received lock");
        let mut grants: BTreeMap<String, BTreeSet<(u8, u16)>> = BTreeMap::new();
        for h in doors.heard.iter().filter(|h| h.granted) {
            if let Some(i) = (0..SINGLE_USE + THREE_USE).find(|&i| limited_pin(i) == h.pin) {
                grants
                    .entry(limited_id(i))
                    .or_default()
                    .insert((h.unit, h.id));
            }
        }
        tally.limited_grants = grants.values().map(BTreeSet::len).sum();
        tally.over_granted = (0..SINGLE_USE + THREE_USE)
            .filter_map(|i| {
                let n = grants.get(&limited_id(i)).map_or(0, BTreeSet::len);
                let limit = usize::try_from(limit_of(i)).unwrap_or(usize::MAX);
                (n > limit).then(|| (limited_id(i), limit_of(i), n))
            })
            .collect();
        tally.heard = doors.heard.len();
        tally.repeats_heard = doors.repeats;
        tally.acked_reports = doors.batteries_acked.values().sum();
        tally.received = received.records.len();
        tally.duplicates = received.duplicates;
        tally.conflicting_ids.clone_from(&received.conflicts);
        tally.lost = lost;
        tally.moved_aside = self.moved_aside;
    }

    /// The outbox's records after a clean stop, read from a copy.
    fn outbox(&self) -> Vec<Record> {
        let _ = std::fs::remove_dir_all(&self.scratch);
        std::fs::create_dir_all(&self.scratch).expect("scratch directory");
        for name in ["doorbridge.db", "doorbridge.db-wal"] {
            let from = self.backing.join(name);
            if from.exists() {
                std::fs::copy(&from, self.scratch.join(name)).expect("copy the database");
            }
        }
        let conn =
            rusqlite::Connection::open(self.scratch.join("doorbridge.db")).expect("open the copy");
        let mut stmt = conn
            .prepare("SELECT body FROM outbox")
            .expect("read the outbox");
        stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
            .expect("read the outbox")
            .filter_map(Result::ok)
            .filter_map(|b| Record::from_cbor(&b).ok())
            .collect()
    }

    /// What the doors heard or had acknowledged that the cloud has no record of (yet).
    fn missing(&self) -> Vec<Expected> {
        let doors = self.doors.lock().expect("door log lock");
        let received = self.received.lock().expect("received lock");
        let records: Vec<&Record> = received.records.values().collect();
        let mut out = Vec::new();
        for h in &doors.heard {
            let want = Expected::Decision(h.clone());
            if !records.iter().any(|r| want.matches(r)) {
                out.push(want);
            }
        }
        for (&unit, &acked) in &doors.batteries_acked {
            let made = doors
                .batteries_made
                .get(&unit)
                .map_or(&[][..], Vec::as_slice);
            let dropped = doors.batteries_dropped.get(&unit).copied().unwrap_or(0);
            // Acknowledged in the order made; with drops the order is unknown: skip them.
            if dropped > 0 {
                continue;
            }
            for &millivolts in made.iter().take(acked) {
                let want = Expected::Battery { unit, millivolts };
                if !records.iter().any(|r| want.matches(r)) {
                    out.push(want);
                }
            }
        }
        out
    }
}

impl Drop for Site {
    /// The daemon first, then the mount, then the files (fields drop in declaration order,
    /// which would remove the files under a running daemon's feet).
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
        self.mount.take();
    }
}

/// A record the cloud must have.
#[derive(Clone, Debug)]
enum Expected {
    Decision(Heard),
    Battery { unit: u8, millivolts: u16 },
}

impl Expected {
    fn matches(&self, r: &Record) -> bool {
        let label = |unit: u8| format!("{BUS}/{unit}");
        match (self, r) {
            (Expected::Decision(h), Record::Activity(a)) => {
                a.unit == label(h.unit)
                    && a.request_id == Some(u32::from(h.id))
                    && a.granted == h.granted
            }
            (
                Expected::Battery { unit, millivolts },
                Record::Battery {
                    unit: u,
                    millivolts: m,
                    ..
                },
            ) => *u == label(*unit) && m == millivolts,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Expected::Decision(h) => format!(
                "the {} heard by unit {} for request {} (PIN {})",
                if h.granted { "grant" } else { "denial" },
                h.unit,
                h.id,
                h.pin
            ),
            Expected::Battery { unit, millivolts } => {
                format!("unit {unit}'s acknowledged battery report of {millivolts} mV")
            }
        }
    }
}

/// Runs the campaign: `plan`'s cuts in order, then the final checks. `progress` is told
/// about each cut as it is done.
pub async fn run(plan: Plan, mut progress: impl FnMut(usize, &CutResult)) -> Tally {
    let started = Instant::now();
    let seed = plan.seed;
    let cuts = plan.cuts.clone();
    let mut site = Site::open(plan).await;
    site.calibrate().await;
    let mut tally = Tally {
        seed,
        ..Tally::default()
    };
    for (i, (phase, kind)) in cuts.into_iter().enumerate() {
        let result = site.phase(phase, kind).await;
        progress(i, &result);
        tally.cuts.push(result);
    }
    site.settle(&mut tally).await;
    if let Some(stop) = site.sim.stop.take() {
        let _ = stop.send(());
    }
    tally.elapsed = started.elapsed();
    tally
}

/// The seed: `POWERCUT_SEED` if set, else from the clock.
pub fn seed() -> u64 {
    std::env::var("POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            u64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
                    % u128::from(u64::MAX),
            )
            .unwrap_or(0)
        })
}
