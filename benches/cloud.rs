//! The cloud link end to end over real MQTT, each figure beside its target or reference:
//!
//! - P5 revocation latency: an in-process rumqttd on a free port, the daemon in process
//!   (`daemon::serve`) with one simulated door unit on a pty. Per sample a fresh key is upserted
//!   by a delta (waiting for `applied`) and granted at the door; then the clock starts, a delta
//!   revoking it is published, and the credential is presented again and again until the door
//!   answers "revoked". Also publish → `applied` report. p50/p99.
//! - P4 snapshot apply: the real `doorbridge run` binary as a child (so its memory is its own)
//!   against the real mosquitto spawned here, for 100,000 and 1,000,000 keys: first publish →
//!   `applied`, the publish itself, the daemon's peak RSS at `applied`, its RSS and its disk
//!   writes after ~5 s idle holding the set (P7), beside a raw rusqlite bulk insert of the same
//!   rows into the same schema (the reference, measured in the same run).
//!
//! Run with `cargo bench --bench cloud` (add `-- --quick` for a short run: 20 revocations and one
//! 20,000-key snapshot; `-- --p4` for the snapshot part alone, printed and not written). Writes
//! its section of `docs/performance.md`. Without mosquitto the snapshot part is skipped, and
//! the section says so.

// Rates, sizes and sample counts are small; float conversions are for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, DenyReason, Key};
use doorbridge::bus::frame::Address;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::config::Config;
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::{CloudClient, Message, hex};
use doorbridge_sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use jiff::Timestamp;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::sync::oneshot;

use brokers::{Mosquitto, start_rumqttd};
use doorbridge_testkit::bench as support;
use doorbridge_testkit::brokers;
use support::{
    Daemon, SALT, SITE, cloud_key, key, machine, mib, ms, percentile, rate, secs, target,
    thousands, written,
};

/// Any one wait for a small message.
const WAIT: Duration = Duration::from_secs(30);
/// How long a whole snapshot may take before the run gives up on it.
const BIG_WAIT: Duration = Duration::from_secs(900);
/// The pause before each timed revocation, as for a revocation that does not come right after
/// another exchange. rumqttd leaves Nagle's algorithm on (the gateway's link and the reference
/// cloud client turn it off): a small packet right after another may wait for the peer's
/// delayed ACK, up to ~40 ms on Linux; the back-to-back rows show what is left of that.
const PAUSE: Duration = Duration::from_millis(200);
/// Revocations timed back to back after the paused ones, to show that delay.
const BACK_TO_BACK: usize = 20;
/// How long the daemon is left idle, holding the set, for P7.
const IDLE: Duration = Duration::from_secs(5);
/// The first part of `IDLE`, whose writes are counted apart: the store folds its WAL into the
/// database file once, 250 ms after its last commit (docs/storage.md); after that an idle
/// gateway must write nothing.
const SETTLE: Duration = Duration::from_secs(1);
/// Keys per transaction in the reference insert: the store stages 5,000 keys per transaction.
const REFERENCE_BATCH: usize = 5_000;

fn topics(target: &Target) -> Topics {
    Topics::new(DEFAULT_PREFIX, target).expect("topics")
}

/// `n` keys `k0000000…` with unique 8-digit PINs.
fn pin_keys(n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| {
            let pin = format!("{i:08}");
            key(
                format!("k{i:07}"),
                "main",
                CredentialKind::Pin,
                pin.as_bytes(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The cloud's side
// ---------------------------------------------------------------------------------------------

/// The gateway's `state` and `sync` reports as they arrive.
struct Reports {
    rx: UnboundedReceiver<Message>,
    topics: Topics,
}

impl Reports {
    async fn subscribe(client: &CloudClient, topics: &Topics) -> Reports {
        let state = topics.topic(Channel::State);
        let filter = format!("{}+", state.strip_suffix("state").expect("…/state"));
        let rx = client.subscribe(&filter).await.expect("subscribe");
        Reports {
            rx,
            topics: topics.clone(),
        }
    }

    /// The next report on `state` or `sync` for which `want` holds.
    async fn next(
        &mut self,
        what: &str,
        within: Duration,
        mut want: impl FnMut(&Report) -> bool,
    ) -> Result<Report, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((topic, payload))) => {
                    if !matches!(
                        self.topics.channel_of(&topic),
                        Some(Channel::State | Channel::Sync)
                    ) {
                        continue;
                    }
                    let report = Report::decode(&payload)
                        .map_err(|e| format!("an undecodable report on {topic}: {e}"))?;
                    if want(&report) {
                        return Ok(report);
                    }
                }
                Ok(None) => return Err(format!("{what}: the cloud client stopped")),
                Err(_) => return Err(format!("{what}: nothing within {within:?}")),
            }
        }
    }

    async fn online(&mut self) -> Result<(), String> {
        self.next("the online state", WAIT, |r| {
            matches!(
                r,
                Report::State {
                    state: Presence::Online,
                    ..
                }
            )
        })
        .await
        .map(|_| ())
    }

    /// Waits for `applied` of `version`; a rejection or resync request first is an error.
    async fn applied(&mut self, version: u64, within: Duration) -> Result<Instant, String> {
        let what = format!("applied {version}");
        let report = self
            .next(&what, within, |r| {
                matches!(
                    r,
                    Report::Applied { .. } | Report::Rejected { .. } | Report::Resync { .. }
                )
            })
            .await?;
        match report {
            Report::Applied { version: v, .. } if v == version => Ok(Instant::now()),
            other => Err(format!("{what}: the gateway sent {other:?} first")),
        }
    }
}

fn delta(target: &Target, from: u64, upserts: &[Key], deletes: &[String]) -> Vec<u8> {
    build::delta(
        target,
        from,
        from + 1,
        Timestamp::now(),
        upserts,
        deletes,
        &cloud_key(),
    )
    .expect("build a delta")
}

fn snapshot(target: &Target, version: u64, keys: &[Key]) -> SignedSnapshot {
    build::snapshot(target, version, Timestamp::now(), SALT, keys, &cloud_key())
        .expect("build a snapshot")
}

// ---------------------------------------------------------------------------------------------
// P5: revocation latency, in process
// ---------------------------------------------------------------------------------------------

struct Revocation {
    /// Publish of the revoking delta → the door's "revoked".
    to_deny: Vec<Duration>,
    /// Publish of the revoking delta → its `applied` report.
    to_applied: Vec<Duration>,
    /// Publish → "revoked" when the revocation follows the upsert's exchange at once.
    back_to_back_deny: Vec<Duration>,
    /// Presentations per sample until the deny (the first ones still granted).
    presentations: usize,
    /// Keys in the set the revocations run against.
    base_keys: usize,
}

fn daemon_config(db: &Path, link: &Path, url: &str, gateway: &str) -> Config {
    let trusted = hex(cloud_key().verifying_key().as_bytes());
    let text = format!(
        "[gateway]\nid = \"{gateway}\"\nsite_id = \"{SITE}\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"{url}\"\ntrusted_keys = [\"{trusted}\"]\nkeepalive = \"5s\"\n\
         [storage]\npath = \"{}\"\n[[buses]]\nname = \"bench\"\nport = \"{}\"\n\
         response_timeout = \"50ms\"\npoll_interval = \"10ms\"\n\
         [[buses.units]]\naddress = 1\ndoor = \"main\"\n",
        db.display(),
        link.display()
    );
    Config::from_toml_str(&text, "bench.toml").expect("bench config")
}

/// The door unit's side: present a credential, get the decision.
struct Door {
    commands: mpsc::Sender<SimCommand>,
    outputs: mpsc::Receiver<Output>,
}

impl Door {
    async fn present(&mut self, secret: &[u8]) -> Answer {
        let unit = Address::unit(1).expect("addr");
        self.commands
            .send(SimCommand::Verify {
                unit,
                kind: CredentialKind::Qr,
                value: secret.to_vec(),
                reader: 0,
            })
            .await
            .expect("sim");
        loop {
            let out = tokio::time::timeout(WAIT, self.outputs.recv())
                .await
                .expect("a decision in time")
                .expect("sim output");
            if let Output::Decision { answer, .. } = out {
                return answer;
            }
        }
    }
}

/// The in-process rig of P5: rumqttd, the cloud client, the daemon and its one door unit.
struct Rig {
    cloud: CloudClient,
    reports: Reports,
    target: Target,
    topics: Topics,
    door: Door,
    stop_daemon: oneshot::Sender<()>,
    daemon: tokio::task::JoinHandle<Result<(), doorbridge::daemon::DaemonError>>,
    stop_sim: oneshot::Sender<()>,
    sim: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Starts everything and waits until the unit is known and the gateway is online.
    async fn start(url: &str, gateway: &str) -> Rig {
        let target = target(gateway);
        let topics = topics(&target);
        let cloud = CloudClient::connect(url, &format!("bench-cloud-{gateway}"))
            .await
            .expect("the cloud connects");
        let mut reports = Reports::subscribe(&cloud, &topics).await;

        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("doorbridge.db");
        let link = dir.path().join("ttyBENCH");
        let (master, _) = doorbridge_sim::linked_pty(&link).expect("a linked pty");
        let units =
            SimUnits::new(&[Address::unit(1).expect("addr")], SimConfig::default()).expect("sim");
        let (commands, command_rx) = mpsc::channel(16);
        let (output_tx, outputs) = mpsc::channel(1024);
        let (stop_sim, sim_stopped) = oneshot::channel::<()>();
        let sim = tokio::spawn(async move {
            let _ = run_sim(
                HangupTolerant::new(master, Duration::from_millis(2)),
                units,
                command_rx,
                output_tx,
                async {
                    let _ = sim_stopped.await;
                },
            )
            .await;
        });
        let mut door = Door { commands, outputs };
        let config = daemon_config(&db, &link, url, gateway);
        let (stop_daemon, daemon_stopped) = oneshot::channel::<()>();
        let daemon = tokio::spawn(async move {
            doorbridge::daemon::serve(&config, async {
                let _ = daemon_stopped.await;
            })
            .await
        });
        loop {
            if let Some(Output::Acked {
                report: ReportKind::Status,
                ..
            }) = door.outputs.recv().await
            {
                break;
            }
        }
        reports.online().await.expect("the gateway comes online");
        Rig {
            cloud,
            reports,
            target,
            topics,
            door,
            stop_daemon,
            daemon,
            stop_sim,
            sim,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop_daemon.send(());
        let _ = self.daemon.await;
        let _ = self.stop_sim.send(());
        let _ = self.sim.await;
    }
}

/// P5 through the broker at `url`, as gateway `gateway`.
async fn revocation(url: &str, gateway: &str, samples: usize) -> Revocation {
    const BASE_KEYS: usize = 1_000;
    let mut rig = Rig::start(url, gateway).await;
    let base: Vec<Key> = (0..BASE_KEYS)
        .map(|i| {
            let secret = format!("qr-base-{i}");
            key(
                format!("base{i}"),
                "main",
                CredentialKind::Qr,
                secret.as_bytes(),
            )
        })
        .collect();
    rig.cloud
        .publish_snapshot(&rig.topics, &snapshot(&rig.target, 1, &base))
        .await
        .expect("publish the base set");
    rig.reports.applied(1, WAIT).await.expect("the base set");

    let mut version = 1;
    let mut to_deny = Vec::with_capacity(samples);
    let mut to_applied = Vec::with_capacity(samples);
    let mut back_to_back_deny = Vec::with_capacity(BACK_TO_BACK);
    let mut presentations = 0;
    for i in 0..samples + BACK_TO_BACK {
        let id = format!("fresh{i}");
        let secret = format!("qr-fresh-{i}").into_bytes();
        let fresh = key(id.clone(), "main", CredentialKind::Qr, &secret);
        rig.cloud
            .publish_delta(&rig.topics, delta(&rig.target, version, &[fresh], &[]))
            .await
            .expect("publish the upsert");
        version += 1;
        rig.reports
            .applied(version, WAIT)
            .await
            .expect("the upsert");
        let answer = rig.door.present(&secret).await;
        assert!(matches!(answer, Answer::Grant(_)), "fresh key: {answer:?}");

        let revoke = delta(&rig.target, version, &[], &[id]);
        version += 1;
        // An independent revocation, not one sent the instant the previous exchange ended:
        // the last samples go back to back (see `PAUSE`).
        let back_to_back = i >= samples;
        if !back_to_back {
            tokio::time::sleep(PAUSE).await;
        }
        let started = Instant::now();
        let (cloud, reports, door) = (&rig.cloud, &mut rig.reports, &mut rig.door);
        let publish_and_applied = async {
            cloud
                .publish_delta(&rig.topics, revoke)
                .await
                .expect("publish the revocation");
            reports
                .applied(version, WAIT)
                .await
                .expect("the revocation")
        };
        let until_denied = async {
            loop {
                presentations += 1;
                match door.present(&secret).await {
                    Answer::Deny(DenyReason::Revoked) => return Instant::now(),
                    Answer::Grant(_) => {}
                    Answer::Deny(other) => panic!("denied for {other:?}, not revoked"),
                }
                assert!(started.elapsed() < WAIT, "not revoked within {WAIT:?}");
            }
        };
        let (applied_at, denied_at) = tokio::join!(publish_and_applied, until_denied);
        if back_to_back {
            back_to_back_deny.push(denied_at - started);
        } else {
            to_applied.push(applied_at - started);
            to_deny.push(denied_at - started);
        }
    }
    rig.stop().await;
    to_deny.sort();
    to_applied.sort();
    back_to_back_deny.sort();
    Revocation {
        to_deny,
        to_applied,
        back_to_back_deny,
        presentations,
        base_keys: BASE_KEYS,
    }
}

// ---------------------------------------------------------------------------------------------
// P4: snapshot apply, the real binary against mosquitto
// ---------------------------------------------------------------------------------------------

struct SnapshotRun {
    keys: usize,
    chunks: usize,
    bytes: usize,
    built: Duration,
    /// The publish of manifest and chunks, each acknowledged (`PubAck`) before the next.
    published: Duration,
    /// First publish → `applied`, or why it did not come.
    applied: Result<Duration, String>,
    /// First and last chunk logged as staged, from the first publish.
    staging: Option<(Duration, Duration)>,
    peak_rss: u64,
    idle_rss: u64,
    /// Of `idle_rss`, the anonymous part (`RssAnon`: heap, stacks); the rest is the program's
    /// and its libraries' mapped files.
    idle_anon: u64,
    /// Bytes written in the first `SETTLE` after `applied`, and in the rest of `IDLE`.
    settle_writes: u64,
    idle_writes: u64,
    reference: Duration,
    /// The same insert with one transaction per chunk's worth of keys, as the gateway stages.
    reference_per_chunk: Duration,
}

/// Installs `n` keys over mosquitto into a fresh `doorbridge run`, then the reference insert.
async fn snapshot_apply(url: &str, n: usize) -> SnapshotRun {
    let gateway = format!("gw-snap-{n}");
    let target = target(&gateway);
    let topics = topics(&target);
    let keys = Arc::new(pin_keys(n));
    let built_at = Instant::now();
    let snap = {
        let (keys, target) = (Arc::clone(&keys), target.clone());
        tokio::task::spawn_blocking(move || snapshot(&target, 1, &keys))
            .await
            .expect("build the snapshot")
    };
    let built = built_at.elapsed();

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("doorbridge.db");
    let config = dir.path().join("doorbridge.toml");
    let trusted = hex(cloud_key().verifying_key().as_bytes());
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"{gateway}\"\nsite_id = \"{SITE}\"\n[site]\n\
             timezone = \"Europe/Berlin\"\n[cloud]\nurl = \"{url}\"\n\
             trusted_keys = [\"{trusted}\"]\nkeepalive = \"5s\"\n[storage]\npath = \"{}\"\n\
             [[buses]]\nport = \"{}\"\n[[buses.units]]\naddress = 1\ndoor = \"main\"\n",
            db.display(),
            dir.path().join("no-such-tty").display()
        ),
    )
    .expect("write the daemon's config");

    let cloud = CloudClient::connect(url, &format!("bench-cloud-{n}"))
        .await
        .expect("the cloud connects");
    let mut reports = Reports::subscribe(&cloud, &topics).await;
    let mut daemon = Daemon::start(
        &config,
        // The link logs one debug line per staged chunk: the staging rate.
        "info,doorbridge::cloud::link=debug",
        Some("chunk staged"),
    );
    if let Err(e) = reports.online().await {
        panic!("{e}; the daemon's log:\n{}", daemon.tail());
    }

    let started = Instant::now();
    cloud
        .publish_snapshot(&topics, &snap)
        .await
        .expect("publish the snapshot");
    let published = started.elapsed();
    let applied = reports
        .applied(1, BIG_WAIT.saturating_sub(published))
        .await
        .map(|at| at - started);
    let peak_rss = daemon.status_bytes("VmHWM:");
    let writes_before = daemon.write_bytes();
    let staging = {
        let log = daemon.log.lock().expect("log lock");
        log.first_stamped
            .zip(log.last_stamped)
            .map(|(a, b)| (a - started, b - started))
    };
    if let Err(e) = &applied {
        eprintln!("{n} keys: {e}; the daemon's log:\n{}", daemon.tail());
    }
    tokio::time::sleep(SETTLE).await;
    let writes_settled = daemon.write_bytes();
    tokio::time::sleep(IDLE.saturating_sub(SETTLE)).await;
    let idle_rss = daemon.status_bytes("VmRSS:");
    let idle_anon = daemon.status_bytes("RssAnon:");
    let settle_writes = writes_settled.saturating_sub(writes_before);
    let idle_writes = daemon.write_bytes().saturating_sub(writes_settled);
    daemon.stop();
    drop(cloud);

    let per_chunk = n.div_ceil(snap.chunks.len().max(1));
    let (reference, reference_per_chunk) = {
        let keys = Arc::clone(&keys);
        tokio::task::spawn_blocking(move || {
            (
                reference_insert(&keys, REFERENCE_BATCH),
                reference_insert(&keys, per_chunk),
            )
        })
        .await
        .expect("the reference insert")
    };
    SnapshotRun {
        keys: n,
        chunks: snap.chunks.len(),
        bytes: snap.total_bytes(),
        built,
        published,
        applied,
        staging,
        peak_rss,
        idle_rss,
        idle_anon,
        settle_writes,
        idle_writes,
        reference,
        reference_per_chunk,
    }
}

/// The reference: a raw rusqlite bulk insert of the same rows into the store's own schema
/// (its page size, WAL, `synchronous=FULL`, one transaction per `batch` keys, prepared statements), the rules
/// encoded beforehand the way the store encodes them (`store::rules`) and written, as the
/// store writes them, into the key's row and into each credential row. Returns the insert
/// time.
fn reference_insert(keys: &[Key], batch: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = rusqlite::Connection::open(dir.path().join("reference.db")).expect("open");
    // The store's own file format: its page size (set before WAL fixes it), then WAL.
    conn.pragma_update(None, "page_size", doorbridge::store::schema::PAGE_SIZE)
        .expect("page size");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("WAL");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("FULL");
    conn.pragma_update(None, "temp_store", "MEMORY")
        .expect("temp_store");
    for sql in doorbridge::store::schema::MIGRATIONS {
        conn.execute_batch(sql).expect("migration");
    }
    let rules: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| doorbridge::store::rules::encode(&k.rules))
        .collect();
    let started = Instant::now();
    for (batch, blobs) in keys.chunks(batch).zip(rules.chunks(batch)) {
        let tx = conn.transaction().expect("begin");
        {
            let mut put_key = tx
                .prepare_cached("INSERT INTO keys (generation, key_id, rules) VALUES (?1, ?2, ?3)")
                .expect("prepare");
            let mut put_cred = tx
                .prepare_cached(
                    "INSERT INTO credentials (generation, digest, kind, key_id, rules) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .expect("prepare");
            for (key, blob) in batch.iter().zip(blobs) {
                put_key
                    .execute(rusqlite::params![1, key.rules.id.as_str(), blob])
                    .expect("insert key");
                for c in &key.credentials {
                    put_cred
                        .execute(rusqlite::params![
                            1,
                            c.digest.0,
                            c.kind.code(),
                            key.rules.id.as_str(),
                            blob
                        ])
                        .expect("insert credential");
                }
            }
        }
        tx.commit().expect("commit");
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// P5 through rumqttd (the figure) and, beside it, through mosquitto (the reference broker).
fn revocation_table(r: &Revocation, mosquitto: Option<&Revocation>) -> String {
    let samples = r.to_deny.len();
    let mut table = format!(
        "| figure | p50 | p99 | target |\n| --- | --- | --- | --- |\n\
         | P5 revocation: delta publish → \"revoked\" at the door, rumqttd ({samples} samples) | {} | {} | p99 ≤ 100 ms on a loopback broker |\n\
         | delta publish → `applied` report, rumqttd | {} | {} | — |\n\
         | publish → \"revoked\", rumqttd, back to back ({BACK_TO_BACK} samples, no pause) | {} | {} | — |\n",
        ms(percentile(&r.to_deny, 50)),
        ms(percentile(&r.to_deny, 99)),
        ms(percentile(&r.to_applied, 50)),
        ms(percentile(&r.to_applied, 99)),
        ms(percentile(&r.back_to_back_deny, 50)),
        ms(percentile(&r.back_to_back_deny, 99)),
    );
    if let Some(m) = mosquitto {
        let _ = write!(
            table,
            "| the same through mosquitto: publish → \"revoked\" | {} | {} | reference broker |\n\
             | the same through mosquitto: publish → `applied` | {} | {} | — |\n\
             | the same through mosquitto: publish → \"revoked\", back to back | {} | {} | — |\n",
            ms(percentile(&m.to_deny, 50)),
            ms(percentile(&m.to_deny, 99)),
            ms(percentile(&m.to_applied, 50)),
            ms(percentile(&m.to_applied, 99)),
            ms(percentile(&m.back_to_back_deny, 50)),
            ms(percentile(&m.back_to_back_deny, 99)),
        );
    }
    table
}

fn snapshot_table(runs: &[SnapshotRun]) -> String {
    let mut table = String::from(
        "| keys | snapshot | publish (PubAck each) | publish → `applied` | gateway keys/s | reference keys/s | ratio (target ≥ 50 %) | peak RSS (target ≤ 64 MiB) | RSS after 5 s idle (P7: ≤ 16 MB at 1M) | written in the 1st s after `applied` | written in the 4 s idle after that (P7: 0) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for run in runs {
        let reference_rate = run.keys as f64 / run.reference.as_secs_f64();
        let (applied, gateway_rate, ratio) = match &run.applied {
            Ok(d) => {
                let per_second = run.keys as f64 / d.as_secs_f64();
                (
                    secs(*d),
                    format!("{}/s", rate(per_second)),
                    format!("{:.0} %", 100.0 * per_second / reference_rate),
                )
            }
            Err(e) => (format!("not applied: {e}"), "—".into(), "—".into()),
        };
        let _ = writeln!(
            table,
            "| {} | {} chunks, {} | {} | {applied} | {gateway_rate} | {}/s | {ratio} | {} | {} (anonymous {}) | {} | {} |",
            thousands(run.keys as u64),
            thousands(run.chunks as u64),
            mib(run.bytes as u64),
            secs(run.published),
            rate(reference_rate),
            mib(run.peak_rss),
            mib(run.idle_rss),
            mib(run.idle_anon),
            written(run.settle_writes),
            written(run.idle_writes),
        );
    }
    table
}

fn snapshot_notes(runs: &[SnapshotRun]) -> String {
    let mut notes = String::new();
    for run in runs {
        let staging = run.staging.map_or_else(
            || "no chunk logged as staged".to_owned(),
            |(first, last)| {
                format!(
                    "chunks staged from {} to {} after the first publish",
                    secs(first),
                    secs(last)
                )
            },
        );
        let _ = writeln!(
            notes,
            "- {} keys: snapshot built in {}; {staging}; reference insert {} ({}/s); the same \
             with one transaction per chunk's worth of keys (~{}, as the gateway commits) {} \
             ({}/s).",
            thousands(run.keys as u64),
            secs(run.built),
            secs(run.reference),
            rate(run.keys as f64 / run.reference.as_secs_f64()),
            run.keys.div_ceil(run.chunks.max(1)),
            secs(run.reference_per_chunk),
            rate(run.keys as f64 / run.reference_per_chunk.as_secs_f64()),
        );
    }
    notes
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples, sizes): (usize, &[usize]) = if quick {
        (20, &[20_000])
    } else {
        (200, &[100_000, 1_000_000])
    };
    let rt = support::runtime();
    // The stores are made under the system's temporary directory: the fsync reference too.
    let probe = tempfile::tempdir().expect("tempdir");
    let mut conditions = support::Conditions::start(probe.path());
    if std::env::args().any(|a| a == "--p4") {
        // The snapshot part alone: printed, not written (the section needs P5 beside it).
        let broker = Mosquitto::start().expect("--p4 needs mosquitto");
        let runs: Vec<SnapshotRun> = sizes
            .iter()
            .map(|&n| rt.block_on(snapshot_apply(&broker.url(), n)))
            .collect();
        conditions.finish();
        println!("{}\n{}", snapshot_table(&runs), snapshot_notes(&runs));
        println!("{}", conditions.describe());
        println!("(--p4: docs/performance.md not written)");
        return;
    }

    let mosquitto = Mosquitto::start();
    let revoked = rt.block_on(revocation(&start_rumqttd(), "gw-revoke", samples));
    let revoked_mosquitto = mosquitto
        .as_ref()
        .map(|broker| rt.block_on(revocation(&broker.url(), "gw-revoke-m", samples)));
    let p5 = revocation_table(&revoked, revoked_mosquitto.as_ref());
    println!("{p5}");

    let (p4, p4_note, p4_runs) = if let Some(broker) = &mosquitto {
        let runs: Vec<SnapshotRun> = sizes
            .iter()
            .map(|&n| {
                let run = rt.block_on(snapshot_apply(&broker.url(), n));
                println!("{}", snapshot_table(std::slice::from_ref(&run)));
                run
            })
            .collect();
        (
            format!("{}\n{}", snapshot_table(&runs), snapshot_notes(&runs)),
            format!("against {}", Mosquitto::version()),
            Some(runs),
        )
    } else {
        let skipped = "Skipped: mosquitto is not installed (looked on PATH and at \
                       /usr/sbin/mosquitto; `apt-get install mosquitto`).\n"
            .to_owned();
        println!("{skipped}");
        (skipped, "without a broker".to_owned(), None)
    };

    // The machine is shared: what else it did, and the disk's pace at the start and the end.
    conditions.finish();
    let section = format!(
        "<!-- bench:cloud -->\n### Cloud link over MQTT (`cargo bench --bench cloud`)\n\n\
         Measured {when} on {machine}{quick}. {conditions}\n\n\
         **P5 revocation.** In-process rumqttd on loopback, the daemon in process (`serve`) with \
         one simulated unit on a pty, {base} keys held. Per sample: a fresh QR key upserted by a \
         delta and granted at the door; then a delta revoking it is published and the \
         credential presented again and again until the door answers \"revoked\" (on average \
         {per:.1} presentations per sample). Each timed revocation starts {pause} ms after the \
         previous exchange, as an independent one would; the back-to-back rows start at once \
         (the gateway's link and the reference cloud client set `TCP_NODELAY`; rumqttd does \
         not, so a small packet right after another may still wait for a delayed ACK \
         there).\n\n{p5}\n\
         **P4 snapshot apply, P7 idle.** The real `doorbridge run` binary (bench profile) as a \
         child, its bus on a serial port that does not exist, {p4_note} (reference broker, no \
         persistence, unlimited queues, 100 in flight), one fresh store per size. Keys: one \
         PIN, one door, unlimited. The reference cloud publishes the manifest, then each chunk \
         after the previous one's `PubAck`. Peak RSS is the daemon's `VmHWM` read at `applied`; \
         then it idles {idle} s holding the set (`VmRSS`, of it `RssAnon`: the heap and stacks, \
         the rest being the program's mapped code and data; `/proc/<pid>/io` `write_bytes`, the \
         first {settle} s apart: the store checkpoints its WAL once, 250 ms after its last \
         commit). \
         Reference: a raw rusqlite insert of the same rows into the same schema (WAL, \
         `synchronous=FULL`, one transaction per {batch} keys, prepared statements, rules \
         encoded beforehand as the store encodes them, in the key row and the credential \
         row as the store writes them), same disk, same run.\n\n{p4}\n<!-- /bench:cloud -->",
        when = support::now(),
        machine = machine(),
        quick = if quick { " (--quick)" } else { "" },
        base = thousands(revoked.base_keys as u64),
        per = revoked.presentations as f64
            / (revoked.to_deny.len() + revoked.back_to_back_deny.len()) as f64,
        idle = IDLE.as_secs(),
        settle = SETTLE.as_secs(),
        pause = PAUSE.as_millis(),
        conditions = conditions.describe(),
        batch = thousands(REFERENCE_BATCH as u64),
    );
    support::write_section("cloud", &section);

    summarize(
        quick,
        &revoked,
        revoked_mosquitto.as_ref(),
        p4_runs.as_deref(),
        conditions.run_load(),
    );
}

/// The rows of the summary table at the top of `docs/performance.md`: P5 and P4.
fn summarize(
    quick: bool,
    revoked: &Revocation,
    revoked_mosquitto: Option<&Revocation>,
    p4_runs: Option<&[SnapshotRun]>,
    load: support::RunLoad,
) {
    let p99 = percentile(&revoked.to_deny, 99);
    let mut rows = vec![support::Summary {
        id: "P5",
        figure: "revocation: delta publish → deny at the door, loopback rumqttd",
        measured: format!(
            "p99 {} (p50 {}; through mosquitto p99 {})",
            ms(p99),
            ms(percentile(&revoked.to_deny, 50)),
            revoked_mosquitto.map_or_else(|| "not run".into(), |m| ms(percentile(&m.to_deny, 99))),
        ),
        reference: "—".into(),
        target: "p99 ≤ 100 ms",
        met: p99 <= Duration::from_millis(100),
        bench: "cloud",
        quick,
        load,
    }];
    if let Some(runs) = p4_runs {
        let mut measured = Vec::new();
        let mut references = Vec::new();
        let mut met = true;
        for run in runs {
            let reference_rate = run.keys as f64 / run.reference.as_secs_f64();
            match &run.applied {
                Ok(took) => {
                    let per_second = run.keys as f64 / took.as_secs_f64();
                    met &= per_second >= 0.5 * reference_rate && run.peak_rss <= 64_000_000;
                    measured.push(format!(
                        "{} keys: {}/s ({:.0} %), peak RSS {}",
                        thousands(run.keys as u64),
                        rate(per_second),
                        100.0 * per_second / reference_rate,
                        mib(run.peak_rss),
                    ));
                }
                Err(why) => {
                    met = false;
                    measured.push(format!(
                        "{} keys: not applied ({why})",
                        thousands(run.keys as u64)
                    ));
                }
            }
            references.push(format!("{}/s", rate(reference_rate)));
        }
        rows.push(support::Summary {
            id: "P4",
            figure: "snapshot apply, keys per second and peak RSS",
            measured: measured.join("; "),
            reference: format!(
                "a raw rusqlite bulk insert of the same rows: {}",
                references.join(", ")
            ),
            target: "≥ 50 % of its rate; peak RSS ≤ 64 MB",
            met: met && !runs.is_empty(),
            bench: "cloud",
            quick,
            load,
        });
    }
    support::write_summary(&rows);
}
