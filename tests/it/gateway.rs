//! The real gateway, as deployed: the `doorbridge run` binary as a child process ([`Daemon`]),
//! its configuration and store in a temporary directory ([`Home`]), its log lines (waited for
//! and counted), and the cloud's side that signs key sets and hears its reports ([`Cloud`],
//! [`Reports`]).
//!
//! Shared by the tests that run the binary against mosquitto (`link_reference`, `link_tls`).
//! Every wait polls a condition with a deadline; the daemon is killed on drop, and its log
//! printed if the test failed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doorbridge::access::{CredentialKind, Key, KeyRules, StaleLimits, UseLimit, credential};
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::cloud::uplink::Batch;
use doorbridge::store::{Reader, Record};
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::{CloudClient, Message, hex};
use ed25519_dalek::SigningKey;
use jiff::Timestamp;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

use crate::broker::wait_for;
use crate::fixtures::{self, SALT};
use crate::util::doorbridge;

/// How long a step that involves no large key set may take.
pub const WAIT: Duration = Duration::from_secs(30);
/// The link logs at debug level: failed connections, and one line per staged chunk.
const LOG_FILTER: &str = "info,doorbridge::cloud::link=debug";
/// What the daemon logs on each failed attempt to open its (missing) bus port: while these keep
/// coming, the door side is being served.
const BUS_RETRY: &str = "cannot open bus port";

/// The cloud's signing key; its public half is the gateway's only trusted key.
pub fn cloud_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// `n` keys `{prefix}{i}` opening `main` with PIN `{prefix}{i}` (prefixes keep sets apart).
pub fn keys(prefix: &str, n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            fixtures::key(&id, CredentialKind::Pin, &id, UseLimit::Unlimited)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The gateway's files
// ---------------------------------------------------------------------------------------------

/// A gateway's configuration and store in a temporary directory.
pub struct Home {
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
    pub target: Target,
    pub topics: Topics,
}

impl Home {
    /// A gateway `target` that talks to the broker at `url` and trusts [`cloud_key`]; `tls`
    /// (key, file) fills a `[cloud.tls]` section, left out if empty. Its one bus names a serial
    /// port that does not exist: the bus task keeps retrying it ([`Daemon::assert_serving`]),
    /// which leaves the cloud link alone.
    pub fn new(url: &str, target: Target, tls: &[(&str, &Path)]) -> Home {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = dir.path().join("doorbridge.db");
        let config = dir.path().join("doorbridge.toml");
        let trusted = hex(cloud_key().verifying_key().as_bytes());
        let tls = if tls.is_empty() {
            String::new()
        } else {
            tls.iter()
                .fold("[cloud.tls]\n".to_owned(), |mut text, (key, path)| {
                    writeln!(text, "{key} = \"{}\"", path.display()).expect("write to a string");
                    text
                })
        };
        let text = format!(
            r#"[gateway]
id = "{gateway}"
site_id = "{site}"
[site]
timezone = "Europe/Berlin"
[cloud]
url = "{url}"
trusted_keys = ["{trusted}"]
keepalive = "5s"
{tls}[storage]
path = "{db}"
[[buses]]
port = "{port}"
[[buses.units]]
address = 1
door = "main"
"#,
            gateway = target.gateway,
            site = target.site,
            db = db.display(),
            port = dir.path().join("no-such-tty").display(),
        );
        std::fs::write(&config, text).expect("write the configuration");
        let topics = Topics::new(DEFAULT_PREFIX, &target).expect("topics");
        Home {
            _dir: dir,
            config,
            db,
            target,
            topics,
        }
    }

    /// Adds `line` (`key = value`) to the table `[section]` of the configuration: right after
    /// its header, or in a new table at the end. Not for arrays of tables (`[[buses]]`).
    pub fn set(&self, section: &str, line: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read the configuration");
        let header = format!("[{section}]");
        let mut out = String::with_capacity(text.len() + line.len() + header.len() + 3);
        let mut placed = false;
        for l in text.lines() {
            writeln!(out, "{l}").expect("write to a string");
            if !placed && l.trim() == header {
                writeln!(out, "{line}").expect("write to a string");
                placed = true;
            }
        }
        if !placed {
            writeln!(out, "{header}\n{line}").expect("write to a string");
        }
        std::fs::write(&self.config, out).expect("write the configuration");
    }

    /// Points the one bus at a pty to be linked at the returned path (`ttyDOOR` in the home),
    /// polled every 10 ms: for a simulated door unit (unit 1, door `main`) instead of a port
    /// that does not exist.
    pub fn door_bus_on_pty(&self) -> PathBuf {
        let link = self
            .config
            .parent()
            .expect("the home directory")
            .join("ttyDOOR");
        let text = std::fs::read_to_string(&self.config).expect("read the configuration");
        let ports = text.lines().filter(|l| l.starts_with("port = ")).count();
        assert_eq!(ports, 1, "one bus port in:\n{text}");
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("port = ") {
                    // Polled often, so the door decides at the pace the test sets.
                    format!("port = \"{}\"\npoll_interval = \"10ms\"", link.display())
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, text.join("\n") + "\n").expect("write the configuration");
        link
    }

    /// Lists several brokers in `cloud.url`, tried in this order.
    pub fn set_brokers(&self, urls: &[String]) {
        let text = std::fs::read_to_string(&self.config).expect("read the configuration");
        let list = urls
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("url = ") {
                    format!("url = [{list}]")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.config, out.join("\n") + "\n").expect("write the configuration");
    }

    pub fn reader(&self) -> Reader {
        Reader::open(&self.db).expect("the store opens read-only")
    }

    /// The live key set's version and size.
    pub fn held(&self) -> (u64, u64) {
        let set = self.reader().key_set().expect("read the key set");
        (set.version, set.keys)
    }

    /// The live key holding the PIN `pin`, if any.
    pub fn by_pin(&self, pin: &str) -> Option<KeyRules> {
        let digest = credential::digest(SALT, CredentialKind::Pin, pin.as_bytes()).0;
        self.reader()
            .key_by_digest(&digest)
            .expect("look up a digest")
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway's process
// ---------------------------------------------------------------------------------------------

/// `doorbridge run` as a child process; killed on drop (and its log printed if the test failed).
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// The lines of `log` that contain every one of `needles`.
fn matching(log: &Mutex<Vec<String>>, needles: &[&str]) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .cloned()
        .collect()
}

impl Daemon {
    pub fn start(home: &Home) -> Daemon {
        Daemon::start_with(home, |_| {})
    }

    /// Like [`Daemon::start`], with `adjust` changing the command first (its environment).
    pub fn start_with(home: &Home, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let mut command = doorbridge();
        command
            .arg("--config")
            .arg(&home.config)
            .arg("run")
            .env("DOORBRIDGE_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("start doorbridge run");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Daemon { child, log }
    }

    /// The log lines so far that contain every one of `needles`.
    pub fn lines(&self, needles: &[&str]) -> Vec<String> {
        matching(&self.log, needles)
    }

    /// How many log lines so far contain every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines(needles).len()
    }

    /// Waits until at least `n` log lines contain every one of `needles`; fails early if the
    /// daemon exits meanwhile.
    pub async fn until_logged(&mut self, needles: &[&str], n: usize, within: Duration) {
        let what = format!("{n} log line(s) with {needles:?}");
        let (log, child) = (&self.log, &mut self.child);
        wait_for(within, &what, || {
            if matching(log, needles).len() >= n {
                return Some(());
            }
            let exited = child.try_wait().expect("wait for the daemon");
            assert!(exited.is_none(), "{what}: the daemon exited ({exited:?})");
            None
        })
        .await;
    }

    /// Asserts that the daemon still serves its doors: its bus task goes on retrying the port
    /// (one more [`BUS_RETRY`] line than now), and the process has not exited.
    pub async fn assert_serving(&mut self) {
        let retries = self.count(&[BUS_RETRY]);
        self.until_logged(&[BUS_RETRY], retries + 1, WAIT).await;
        let exited = self.child.try_wait().expect("wait for the daemon");
        assert!(exited.is_none(), "the daemon exited: {exited:?}");
    }

    /// Waits (polling) until the process has exited.
    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for(within, "the daemon to exit", || {
            child.try_wait().expect("wait for the daemon")
        })
        .await
    }

    /// Sends `signal` (`"HUP"`, `"TERM"`…) to the daemon.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} the daemon");
    }

    /// SIGTERM, as systemd stops it; returns how it exited.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.exited(WAIT).await
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(&mut self) {
        self.child.kill().expect("kill -9 the daemon");
        let status = self.exited(WAIT).await;
        assert!(!status.success(), "SIGKILL ended it: {status:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = log.len().saturating_sub(60);
            eprintln!("--- doorbridge log (last {} lines) ---", log.len() - tail);
            for line in &log[tail..] {
                eprintln!("{line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cloud's side
// ---------------------------------------------------------------------------------------------

/// What the gateway reports on `state` and `sync`, decoded, as it arrives.
pub struct Reports {
    rx: UnboundedReceiver<Message>,
    topics: Topics,
    gateway: String,
    /// Everything received so far, for failure messages and counts.
    pub seen: Vec<(Channel, Report)>,
    /// Uploaded outbox records, by seq.
    pub uploaded: BTreeMap<u64, Record>,
}

impl Reports {
    /// Decodes `message` and keeps it in `seen`, or its records in `uploaded` (`None`).
    fn decode(&mut self, (topic, payload): Message) -> Option<(Channel, Report)> {
        let channel = self
            .topics
            .channel_of(&topic)
            .unwrap_or_else(|| panic!("a report on a foreign topic {topic}"));
        if channel == Channel::Records {
            let batch = Batch::decode(&payload)
                .unwrap_or_else(|e| panic!("an undecodable batch on {topic}: {e}"));
            for r in batch.records {
                self.uploaded.insert(r.seq, r.record);
            }
            return None;
        }
        let report = Report::decode(&payload)
            .unwrap_or_else(|e| panic!("an undecodable report on {topic}: {e}"));
        self.seen.push((channel, report.clone()));
        Some((channel, report))
    }

    /// The `CloudRejected` records, uploaded or still in `home`'s outbox: `(channel, reason)`.
    pub fn rejections_recorded(&mut self, home: &Home) -> Vec<(String, String)> {
        self.received();
        let mut all = self.uploaded.clone();
        for r in home.reader().outbox(0, 1_000_000).expect("read the outbox") {
            all.insert(u64::try_from(r.seq).expect("seq"), r.record);
        }
        all.into_values()
            .filter_map(|r| match r {
                Record::CloudRejected {
                    channel, reason, ..
                } => Some((channel, reason)),
                _ => None,
            })
            .collect()
    }

    /// [`Reports::rejections_recorded`] once it holds at least `count`, or as it is after
    /// `within`: a refusal is reported at once, its record is committed and uploaded on the
    /// writer's and the uplink's schedule.
    pub async fn await_rejections_recorded(
        &mut self,
        home: &Home,
        count: usize,
        within: Duration,
    ) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let recorded = self.rejections_recorded(home);
            if recorded.len() >= count || tokio::time::Instant::now() >= deadline {
                return recorded;
            }
            // The next message (the batch that carries the record, perhaps), or a moment for
            // the writer to commit it.
            if let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(20), self.rx.recv()).await
            {
                self.decode(message);
            }
        }
    }

    /// The next report for which `want` holds; the others are kept in `seen` only.
    pub async fn next(
        &mut self,
        what: &str,
        within: Duration,
        mut want: impl FnMut(Channel, &Report) -> bool,
    ) -> Report {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(message)) => {
                    if let Some((channel, report)) = self.decode(message)
                        && want(channel, &report)
                    {
                        return report;
                    }
                }
                Ok(None) => panic!("{what}: the cloud client stopped; seen {:#?}", self.seen),
                Err(elapsed) => panic!("{what}: {elapsed} ({within:?}); seen {:#?}", self.seen),
            }
        }
    }

    /// Every report received so far (without waiting).
    pub fn received(&mut self) -> &[(Channel, Report)] {
        loop {
            match self.rx.try_recv() {
                Ok(message) => {
                    self.decode(message);
                }
                Err(TryRecvError::Empty) => return &self.seen,
                Err(TryRecvError::Disconnected) => panic!("the cloud client stopped"),
            }
        }
    }

    /// The next `state` report from this gateway with `presence` and `held` (`None`: the
    /// will's, which names no version).
    pub async fn state(&mut self, presence: Presence, held: Option<u64>) -> Report {
        let what = format!("state {presence:?} (held {held:?})");
        let gateway = self.gateway.clone();
        // The gateway's own state names its identity (its public key); the will, fixed at
        // connect, names neither a version nor an identity.
        self.next(&what, WAIT, |channel, r| {
            channel == Channel::State
                && matches!(r, Report::State { state, gateway: g, held: h, identity }
                    if *state == presence && *g == gateway && *h == held
                        && identity.as_ref().map(String::len) == held.map(|_| 64))
        })
        .await
    }

    /// The next `applied` report for `version`; any `rejected` or `resync` before it fails.
    pub async fn applied(&mut self, version: u64, within: Duration) -> Report {
        let what = format!("applied {version}");
        let report = self
            .next(&what, within, |channel, r| {
                channel == Channel::Sync
                    && !matches!(r, Report::Applied { version: v, .. } if *v < version)
            })
            .await;
        assert!(
            matches!(report, Report::Applied { version: v, .. } if v == version),
            "{what}: got {report:?} first"
        );
        report
    }

    /// The next `rejected` report; it must come from `channel`. Returns its reason.
    pub async fn rejected(&mut self, channel: Channel) -> String {
        let report = self
            .next("a rejected report", WAIT, |c, _| c == Channel::Sync)
            .await;
        match report {
            Report::Rejected {
                channel: on,
                reason,
                ..
            } => {
                assert_eq!(
                    on,
                    channel.suffix(),
                    "rejected on the wrong channel: {reason}"
                );
                reason
            }
            other => panic!(
                "expected a rejection on {}, got {other:?}",
                channel.suffix()
            ),
        }
    }
}

/// The test's cloud: a [`CloudClient`] that signs with [`cloud_key`] and hears the gateway.
pub struct Cloud {
    client: Arc<CloudClient>,
    topics: Topics,
    pub target: Target,
    pub reports: Reports,
}

impl Cloud {
    /// Connects to the broker at `url` as `client_id` and subscribes to the gateway's `state`
    /// and `sync` (one filter: `{prefix}/{site}/{gateway}/+`).
    pub async fn connect(url: &str, home: &Home, client_id: &str) -> Cloud {
        let client = CloudClient::connect(url, client_id)
            .await
            .expect("the cloud connects");
        let state = home.topics.topic(Channel::State);
        let filter = format!("{}+", state.strip_suffix("state").expect("…/state"));
        let rx = client.subscribe(&filter).await.expect("subscribe");
        Cloud::hearing(client, rx, home)
    }

    /// Like [`Cloud::connect`], subscribed to `channels` only, one topic each: where another
    /// client is the one subscriber on `records` (NATS 2.9 may skip a message for one of two
    /// subscriptions that match it: `tests/it/nats.rs`).
    pub async fn connect_to(
        url: &str,
        home: &Home,
        client_id: &str,
        channels: &[Channel],
    ) -> Cloud {
        let client = CloudClient::connect(url, client_id)
            .await
            .expect("the cloud connects");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for &channel in channels {
            let mut heard = client
                .subscribe(&home.topics.topic(channel))
                .await
                .expect("subscribe");
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(message) = heard.recv().await {
                    if tx.send(message).is_err() {
                        return;
                    }
                }
            });
        }
        Cloud::hearing(client, rx, home)
    }

    fn hearing(client: CloudClient, rx: UnboundedReceiver<Message>, home: &Home) -> Cloud {
        Cloud {
            client: Arc::new(client),
            topics: home.topics.clone(),
            target: home.target.clone(),
            reports: Reports {
                rx,
                topics: home.topics.clone(),
                gateway: home.target.gateway.clone(),
                seen: Vec::new(),
                uploaded: BTreeMap::new(),
            },
        }
    }

    /// A snapshot of `keys` as `version` whose categories in `stale_after` stop opening once
    /// the gateway has not heard from the cloud for longer.
    pub fn snapshot_with_stale_after(
        &self,
        version: u64,
        keys: &[Key],
        stale_after: StaleLimits,
    ) -> SignedSnapshot {
        build::snapshot_with_stale_after(
            &self.target,
            version,
            Timestamp::now(),
            SALT,
            keys,
            stale_after,
            &cloud_key(),
        )
        .expect("build a snapshot")
    }

    /// Publishes a heartbeat for `version` signed at `at` (`QoS` 0, as the protocol says).
    pub async fn publish_heartbeat(&self, version: u64, at: Timestamp) {
        let heartbeat =
            build::heartbeat(&self.target, version, at, &cloud_key()).expect("build a heartbeat");
        self.client
            .publish_heartbeat(&self.topics, heartbeat)
            .await
            .expect("publish a heartbeat");
    }

    pub fn snapshot(&self, version: u64, keys: &[Key]) -> SignedSnapshot {
        build::snapshot(
            &self.target,
            version,
            Timestamp::now(),
            SALT,
            keys,
            &cloud_key(),
        )
        .expect("build a snapshot")
    }

    pub fn delta(&self, from: u64, to: u64, upserts: &[Key], deletes: &[&str]) -> Vec<u8> {
        let deletes: Vec<String> = deletes.iter().map(|&d| d.to_owned()).collect();
        build::delta(
            &self.target,
            from,
            to,
            Timestamp::now(),
            upserts,
            &deletes,
            &cloud_key(),
        )
        .expect("build a delta")
    }

    pub async fn publish_snapshot(&self, snapshot: &SignedSnapshot) {
        self.client
            .publish_snapshot(&self.topics, snapshot)
            .await
            .expect("publish a snapshot");
    }

    pub async fn publish_delta(&self, delta: Vec<u8>) {
        self.client
            .publish_delta(&self.topics, delta)
            .await
            .expect("publish a delta");
    }

    /// Publishes `snapshot` from a task of its own; the handle ends when the broker has
    /// acknowledged every part.
    pub fn publish_snapshot_in_background(
        &self,
        snapshot: Arc<SignedSnapshot>,
    ) -> tokio::task::JoinHandle<()> {
        let client = Arc::clone(&self.client);
        let topics = self.topics.clone();
        tokio::spawn(async move {
            client
                .publish_snapshot(&topics, &snapshot)
                .await
                .expect("publish the snapshot");
        })
    }

    /// Publishes a snapshot of `keys` as `version` and waits for its `applied` report.
    pub async fn install(&mut self, version: u64, keys: &[Key]) -> Report {
        self.publish_snapshot(&self.snapshot(version, keys)).await;
        self.reports.applied(version, WAIT).await
    }
}
