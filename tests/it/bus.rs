//! End to end, offline: the daemon's own entry point with a real SQLite store, simulated door
//! units on a real pseudo-terminal, and no broker at all.

// Tables of cases, one row per seed rule, read best unbroken.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doorbridge::access::{CredentialKind, DenyReason, Key, Schedule, UseLimit, WeekdaySet, Window};
use doorbridge::bus::frame::Address;
use doorbridge::bus::message::DoorEventKind;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::uplink::Batch;
use doorbridge::config::Config;
use doorbridge::store::{Record, Store, StoreOptions, UseScope};
use doorbridge_sim::cloud::CloudClient;
use doorbridge_sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use jiff::{SignedDuration, Timestamp, ToSpan};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::fixtures::{self, header, key};

const WAIT: Duration = Duration::from_secs(15);

/// A building with its gateway running and simulated units on one bus.
pub(crate) struct Building {
    /// Keeps the building's files (database, pty link) until the test ends.
    _dir: tempfile::TempDir,
    pub(crate) db: PathBuf,
    link: PathBuf,
    stop_daemon: Option<oneshot::Sender<()>>,
    daemon: Option<JoinHandle<()>>,
    sim: Option<Sim>,
    /// Outputs read while waiting for something else.
    pub(crate) seen: Vec<Output>,
    /// The `[cloud]` section's body.
    cloud: String,
    /// How many times the simulated units were started.
    powered_up: u64,
    /// Records the gateway uploaded to the test's broker, by seq (with a cloud).
    uploaded: Arc<Mutex<BTreeMap<u64, Record>>>,
    _receiver: Option<CloudClient>,
}

/// Subscribes to the gateway's uploads on the broker named in the `[cloud]` section `cloud`
/// and keeps every record received in `into`.
async fn receive_records(cloud: &str, into: Arc<Mutex<BTreeMap<u64, Record>>>) -> CloudClient {
    let url = cloud
        .lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .and_then(|rest| rest.split('"').next())
        .expect("the cloud section has a url");
    let client = CloudClient::connect(url, "records-test").await.unwrap();
    let mut rx = client
        .subscribe("doorbridge/site-test/gw-test/records")
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some((_, payload)) = rx.recv().await {
            let batch = Batch::decode(&payload).expect("upload batches decode");
            let mut map = into.lock().unwrap();
            for r in batch.records {
                map.insert(r.seq, r.record);
            }
        }
    });
    client
}

/// No broker: port 1 refuses at once, so the link just keeps retrying quietly.
pub(crate) const NO_CLOUD: &str = r#"url = "mqtt://127.0.0.1:1"
trusted_keys = ["3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"]"#;

/// Simulated door units on a pty, run until `stop` is sent.
pub(crate) struct Sim {
    pub(crate) commands: mpsc::Sender<SimCommand>,
    pub(crate) outputs: mpsc::Receiver<Output>,
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: JoinHandle<()>,
}

impl Sim {
    /// Starts `units` with `config` on a new pty linked at `link`.
    pub(crate) fn start(link: &Path, units: &[Address], config: SimConfig) -> Sim {
        let (master, _) = doorbridge_sim::linked_pty(link).expect("a linked pty");
        let sim_units = SimUnits::new(units, config).expect("simulated units");
        let (commands, command_rx) = mpsc::channel(64);
        let (output_tx, outputs) = mpsc::channel(1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let port = HangupTolerant::new(master, Duration::from_millis(5));
            let _ = run_sim(port, sim_units, command_rx, output_tx, async {
                let _ = stopped.await;
            })
            .await;
        });
        Sim {
            commands,
            outputs,
            stop,
            task,
        }
    }
}

pub(crate) fn unit(n: u8) -> Address {
    Address::unit(n).unwrap()
}

/// Doors of `fixtures::site()` on units 1..: 1 main, 2 garage, 3 inner (behind main),
/// then `extra` more outer doors `door-4`… for load tests.
fn config_text(db: &Path, link: &Path, units: u8, extra: &str, cloud: &str) -> String {
    let mut text = format!(
        r#"
[gateway]
id = "gw-test"
site_id = "site-test"
[site]
timezone = "Europe/Berlin"
[cloud]
{cloud}
[storage]
path = "{}"
{extra}
[[buses]]
name = "entrance"
port = "{}"
response_timeout = "40ms"
poll_interval = "10ms"
offline_after = 3
"#,
        db.display(),
        link.display()
    );
    for n in 1..=units {
        let (door, inner) = match n {
            1 => ("main".to_owned(), ""),
            2 => ("garage".to_owned(), ""),
            3 => ("inner".to_owned(), "inner = true\nbehind = [\"main\"]\n"),
            n => (format!("door-{n}"), ""),
        };
        let _ = write!(
            text,
            "[[buses.units]]\naddress = {n}\ndoor = \"{door}\"\n{inner}"
        );
    }
    text
}

impl Building {
    pub(crate) async fn open(units: u8, keys: Vec<Key>, extra: &str) -> Building {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("doorbridge.db");
        let store = Store::open(StoreOptions::new(&db, fixtures::context())).unwrap();
        store.install_key_set(header_now(1), keys).await.unwrap();
        store.close();
        Building::open_at(dir, units, extra).await
    }

    /// Waits until every unit's start-up status report was acknowledged by the gateway.
    pub(crate) async fn ready(&mut self, units: u8) {
        for n in 1..=units {
            self.next(|o| {
                matches!(o, Output::Acked { unit: u, report: ReportKind::Status, .. } if *u == unit(n))
            })
            .await;
        }
    }

    /// Starts a gateway on a database prepared in `dir` (as `doorbridge.db`).
    async fn open_at(dir: tempfile::TempDir, units: u8, extra: &str) -> Building {
        Building::open_with_cloud(dir, units, extra, NO_CLOUD).await
    }

    /// A gateway whose `[cloud]` section is `cloud`, on a database prepared in `dir` (or a
    /// fresh one).
    pub(crate) async fn open_with_cloud(
        dir: tempfile::TempDir,
        units: u8,
        extra: &str,
        cloud: &str,
    ) -> Building {
        let db = dir.path().join("doorbridge.db");
        let link = dir.path().join("ttyDOOR");
        let uploaded = Arc::new(Mutex::new(BTreeMap::new()));
        let receiver = if cloud == NO_CLOUD {
            None
        } else {
            Some(receive_records(cloud, Arc::clone(&uploaded)).await)
        };
        let mut b = Building {
            _dir: dir,
            db,
            link,
            stop_daemon: None,
            daemon: None,
            sim: None,
            seen: Vec::new(),
            cloud: cloud.to_owned(),
            powered_up: 0,
            uploaded,
            _receiver: receiver,
        };
        b.start_sim(units);
        b.start_daemon(units, extra);
        b.ready(units).await;
        b
    }

    /// Writes the building's configuration to a file, for the binary's operator commands.
    pub(crate) fn config_file(&self, units: u8) -> PathBuf {
        let path = self.db.with_file_name("doorbridge.toml");
        std::fs::write(
            &path,
            config_text(&self.db, &self.link, units, "", &self.cloud),
        )
        .unwrap();
        path
    }

    pub(crate) fn start_daemon(&mut self, units: u8, extra: &str) {
        let text = config_text(&self.db, &self.link, units, extra, &self.cloud);
        let config = Config::from_toml_str(&text, "test.toml").expect("test config is valid");
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop_daemon = Some(stop);
        self.daemon = Some(tokio::spawn(async move {
            doorbridge::daemon::serve(&config, async {
                let _ = stopped.await;
            })
            .await
            .expect("the daemon runs");
        }));
    }

    pub(crate) fn start_sim(&mut self, units: u8) {
        let addresses: Vec<Address> = (1..=units).map(unit).collect();
        // A unit picks a new boot id at every power-up: a restarted simulator must too.
        self.powered_up += 1;
        let config = SimConfig {
            seed: SimConfig::default().seed + self.powered_up,
            ..SimConfig::default()
        };
        self.sim = Some(Sim::start(&self.link, &addresses, config));
    }

    pub(crate) async fn stop_sim(&mut self) {
        if let Some(sim) = self.sim.take() {
            let _ = sim.stop.send(());
            let _ = sim.task.await;
        }
    }

    pub(crate) async fn stop(mut self) {
        self.stop_daemon().await;
        self.stop_sim().await;
    }

    /// Stops the gateway (cleanly) and the units, keeping the building's files.
    pub(crate) async fn stop_keeping_files(&mut self) {
        self.stop_daemon().await;
        self.stop_sim().await;
    }

    pub(crate) async fn stop_daemon(&mut self) {
        if let Some(stop) = self.stop_daemon.take() {
            let _ = stop.send(());
        }
        if let Some(daemon) = self.daemon.take() {
            tokio::time::timeout(WAIT, daemon)
                .await
                .expect("the daemon stops")
                .unwrap();
        }
    }

    pub(crate) async fn command(&self, command: SimCommand) {
        self.sim
            .as_ref()
            .unwrap()
            .commands
            .send(command)
            .await
            .unwrap();
    }

    pub(crate) async fn present(&mut self, at: u8, kind: CredentialKind, value: &str) -> Answer {
        self.command(SimCommand::Verify {
            unit: unit(at),
            kind,
            value: value.as_bytes().to_vec(),
            reader: 0,
        })
        .await;
        self.decision(at).await
    }

    /// The next decision for unit `at`.
    pub(crate) async fn decision(&mut self, at: u8) -> Answer {
        let out = self
            .next(|o| matches!(o, Output::Decision { unit: u, .. } if *u == unit(at)))
            .await;
        match out {
            Output::Decision { answer, .. } => answer,
            _ => unreachable!(),
        }
    }

    /// The next output matching `want`, within the deadline.
    pub(crate) async fn next(&mut self, want: impl Fn(&Output) -> bool) -> Output {
        if let Some(i) = self.seen.iter().position(&want) {
            return self.seen.remove(i);
        }
        let sim = self.sim.as_mut().unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, sim.outputs.recv()).await {
                Ok(Some(o)) if want(&o) => return o,
                Ok(Some(o)) => self.seen.push(o),
                Ok(None) => panic!("the simulator stopped"),
                Err(elapsed) => panic!(
                    "nothing expected from the door units ({elapsed}); saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Outbox records, still on disk or already uploaded, once `done` holds for them (polled
    /// with a deadline).
    pub(crate) async fn records_until(&self, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let reader = doorbridge::store::Reader::open(&self.db).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut all = self.uploaded.lock().unwrap().clone();
            for r in reader.outbox(0, 100_000).unwrap() {
                all.insert(u64::try_from(r.seq).unwrap(), r.record);
            }
            let records: Vec<Record> = all.into_values().collect();
            if done(&records) {
                return records;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "records never arrived: {records:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A key-set header signed "now", so the gateway's clock is trusted.
fn header_now(version: u64) -> doorbridge::store::KeySetHeader {
    let mut h = header(version);
    h.issued_at = Some(Timestamp::now());
    h
}

pub(crate) fn granted(a: &Answer) -> bool {
    matches!(a, Answer::Grant(_))
}

pub(crate) fn denied(a: &Answer) -> Option<DenyReason> {
    match a {
        Answer::Deny(r) => Some(*r),
        Answer::Grant(_) => None,
    }
}

/// The site-local wall-clock time `offset` from now, as a window bound.
fn local_time(offset: SignedDuration) -> jiff::civil::Time {
    let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    Timestamp::now()
        .checked_add(offset)
        .unwrap()
        .to_zoned(tz)
        .time()
}

fn today() -> jiff::civil::Weekday {
    let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    Timestamp::now().to_zoned(tz).weekday()
}

fn with<F: FnOnce(&mut Key)>(mut k: Key, f: F) -> Key {
    f(&mut k);
    k
}

/// One key of each type in the seeds, with times relative to now.
fn seed_keys() -> Vec<Key> {
    let hour = SignedDuration::from_hours(1);
    let now = Timestamp::now();
    vec![
        // seed 000: unlimited app key.
        key(
            "resident",
            CredentialKind::Mobile,
            "app-resident",
            UseLimit::Unlimited,
        ),
        // seed 001: courier PIN, single use, with start and expiry.
        with(
            key("courier", CredentialKind::Pin, "482916", UseLimit::Total(1)),
            |k| {
                k.rules.valid_from = Some(now - 1.hour());
                k.rules.valid_until = Some(now + 2.hours());
            },
        ),
        // seed 000 multi-use: three uses in total.
        key(
            "cleaner",
            CredentialKind::Qr,
            "qr-cleaner",
            UseLimit::Total(3),
        ),
        // seed 001 Each Door Counts: one use per door, at main and garage.
        with(
            key(
                "visitor",
                CredentialKind::Qr,
                "qr-visitor",
                UseLimit::PerDoor(1),
            ),
            |k| {
                k.rules.doors.push("garage".into());
            },
        ),
        // Not yet valid, and expired.
        with(
            key("early", CredentialKind::Qr, "qr-early", UseLimit::Unlimited),
            |k| {
                k.rules.valid_from = Some(now + 1.hour());
            },
        ),
        with(
            key("late", CredentialKind::Qr, "qr-late", UseLimit::Unlimited),
            |k| {
                k.rules.valid_until = Some(now - 1.minute());
            },
        ),
        // seed 001 Daily: a window around now, and one that is not now.
        with(
            key(
                "daily-in",
                CredentialKind::Pin,
                "111111",
                UseLimit::Unlimited,
            ),
            |k| {
                k.rules.schedule = Schedule::Daily {
                    window: Window {
                        start: local_time(-hour),
                        end: local_time(hour),
                    },
                };
            },
        ),
        with(
            key(
                "daily-out",
                CredentialKind::Pin,
                "222222",
                UseLimit::Unlimited,
            ),
            |k| {
                k.rules.schedule = Schedule::Daily {
                    window: Window {
                        start: local_time(hour * 2),
                        end: local_time(hour * 3),
                    },
                };
            },
        ),
        // seed 000 recurring: today, and every day but today.
        with(
            key(
                "weekly-in",
                CredentialKind::Mobile,
                "app-weekly-in",
                UseLimit::Unlimited,
            ),
            |k| {
                k.rules.schedule = Schedule::Weekly {
                    days: WeekdaySet::of(&[today()]),
                    window: None,
                };
            },
        ),
        with(
            key(
                "weekly-out",
                CredentialKind::Mobile,
                "app-weekly-out",
                UseLimit::Unlimited,
            ),
            |k| {
                k.rules.schedule = Schedule::Weekly {
                    days: WeekdaySet(WeekdaySet::EVERY_DAY.0 & !WeekdaySet::of(&[today()]).0),
                    window: None,
                };
            },
        ),
        // seed 000 Also Opens Inner Door, welcome message; seed 001 floors.
        with(
            key(
                "friend",
                CredentialKind::Mobile,
                "app-friend",
                UseLimit::Unlimited,
            ),
            |k| {
                k.rules.opens_inner_door = true;
                k.rules.welcome = Some("Welcome home".into());
                k.rules.floors = vec![3, 4];
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_type_is_decided_at_the_door() {
    use CredentialKind::{Mobile, Pin, Qr};
    use DenyReason::{Expired, NotYetValid, OutsideSchedule, UnknownCredential, UsedUp, WrongDoor};
    let mut b = Building::open(3, seed_keys(), "").await;
    let cases: &[(&str, u8, CredentialKind, &str, Option<DenyReason>)] = &[
        (
            "seed 000 unlimited key at its door",
            1,
            Mobile,
            "app-resident",
            None,
        ),
        (
            "seed 000 unlimited key again",
            1,
            Mobile,
            "app-resident",
            None,
        ),
        (
            "seed 001 a door the key does not list",
            2,
            Mobile,
            "app-resident",
            Some(WrongDoor),
        ),
        (
            "seed 000 inner door without the option",
            3,
            Mobile,
            "app-resident",
            Some(WrongDoor),
        ),
        ("seed 001 courier PIN opens once", 1, Pin, "482916", None),
        (
            "seed 000 single-use key is then used up",
            1,
            Pin,
            "482916",
            Some(UsedUp),
        ),
        ("seed 000 N uses: 1 of 3", 1, Qr, "qr-cleaner", None),
        ("seed 000 N uses: 2 of 3", 1, Qr, "qr-cleaner", None),
        ("seed 000 N uses: 3 of 3", 1, Qr, "qr-cleaner", None),
        (
            "seed 000 N uses: a 4th is refused",
            1,
            Qr,
            "qr-cleaner",
            Some(UsedUp),
        ),
        ("seed 001 each door counts: main", 1, Qr, "qr-visitor", None),
        (
            "seed 001 each door counts: main used up",
            1,
            Qr,
            "qr-visitor",
            Some(UsedUp),
        ),
        (
            "seed 001 each door counts: garage counts apart",
            2,
            Qr,
            "qr-visitor",
            None,
        ),
        (
            "seed 001 each door counts: garage used up",
            2,
            Qr,
            "qr-visitor",
            Some(UsedUp),
        ),
        (
            "seed 000 start date not reached",
            1,
            Qr,
            "qr-early",
            Some(NotYetValid),
        ),
        ("seed 000 expiry passed", 1, Qr, "qr-late", Some(Expired)),
        ("seed 001 daily window now", 1, Pin, "111111", None),
        (
            "seed 001 daily window later",
            1,
            Pin,
            "222222",
            Some(OutsideSchedule),
        ),
        ("seed 000 recurring today", 1, Mobile, "app-weekly-in", None),
        (
            "seed 000 recurring not today",
            1,
            Mobile,
            "app-weekly-out",
            Some(OutsideSchedule),
        ),
        (
            "seed 000 also opens inner door, at the inner door",
            3,
            Mobile,
            "app-friend",
            None,
        ),
        (
            "an unknown QR token",
            1,
            Qr,
            "qr-nobody",
            Some(UnknownCredential),
        ),
    ];
    for (rule, at, kind, value, want) in cases {
        let answer = b.present(*at, *kind, value).await;
        assert_eq!(denied(&answer), *want, "{rule}: {answer:?}");
    }

    // The grant at the outer door carries the welcome text and floors, and the inner door
    // (another unit) is released by command.
    let answer = b.present(1, Mobile, "app-friend").await;
    let Answer::Grant(grant) = answer else {
        panic!("friend at main: {answer:?}")
    };
    assert_eq!(grant.doors, vec![0]);
    assert_eq!(grant.welcome.as_deref(), Some("Welcome home"));
    assert_eq!(grant.floors, vec![3, 4]);
    let open = b
        .next(|o| matches!(o, Output::OpenDoor { unit: u, .. } if *u == unit(3)))
        .await;
    assert!(
        matches!(
            open,
            Output::OpenDoor {
                broadcast: false,
                ..
            }
        ),
        "{open:?}"
    );

    // Every decision is in the outbox with the key's category and never the credential.
    let records = b
        .records_until(|r| {
            r.iter()
                .filter(|r| matches!(r, Record::Activity(_)))
                .count()
                > cases.len()
        })
        .await;
    let courier = records
        .iter()
        .find_map(|r| match r {
            Record::Activity(a) if a.key_id.as_deref() == Some("courier") && a.granted => Some(a),
            _ => None,
        })
        .expect("the courier's grant is recorded");
    assert_eq!(courier.credential_kind, Pin);
    assert_eq!(courier.unit, "entrance/1");
    let raw = std::fs::read(&b.db).unwrap();
    assert!(
        !raw.windows(6).any(|w| w == b"482916"),
        "a clear PIN reached the disk"
    );
    b.stop().await;
}

/// A single-use PIN is granted, the unit misses the answer and sends the same request (same
/// id, same bytes) again, after the gateway restarted if `restart`: the retransmission gets
/// the first answer (from the session's cache, or from the answer kept on disk with the
/// decision), the use is spent once, and a new presentation is used up.
async fn a_retransmission_is_answered_alike_and_counted_once(restart: bool) {
    let keys = vec![key(
        "courier",
        CredentialKind::Pin,
        "482916",
        UseLimit::Total(1),
    )];
    let mut b = Building::open(1, keys, "").await;
    let first = b.present(1, CredentialKind::Pin, "482916").await;
    assert!(granted(&first), "{first:?}");
    if restart {
        b.stop_daemon().await;
        b.start_daemon(1, "");
    }
    b.command(SimCommand::Retransmit {
        unit: unit(1),
        report: false,
    })
    .await;
    let again = b
        .next(|o| matches!(o, Output::Decision { repeat: true, .. }))
        .await;
    let Output::Decision { answer, .. } = again else {
        unreachable!()
    };
    assert_eq!(answer, first, "a retransmission gets the same answer");
    let reader = doorbridge::store::Reader::open(&b.db).unwrap();
    assert_eq!(
        reader.uses("courier").unwrap(),
        vec![(UseScope::AllDoors, 1), (UseScope::Door("main".into()), 1)],
        "one use spent"
    );
    let third = b.present(1, CredentialKind::Pin, "482916").await;
    assert_eq!(denied(&third), Some(DenyReason::UsedUp));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmitted_single_use_request_is_answered_alike_and_counted_once() {
    a_retransmission_is_answered_alike_and_counted_once(false).await;
}

/// The gateway restarts between a grant and the unit's retransmission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retransmission_after_a_gateway_restart_is_answered_alike_and_counted_once() {
    a_retransmission_is_answered_alike_and_counted_once(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_guessing_locks_out_and_door_reports_land_in_the_store() {
    let keys = vec![key(
        "courier",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    )];
    let mut b = Building::open(2, keys, "").await;
    for guess in ["000000", "111111", "123456", "654321", "999999"] {
        let a = b.present(1, CredentialKind::Pin, guess).await;
        assert_eq!(denied(&a), Some(DenyReason::UnknownCredential));
    }
    let locked = b.present(1, CredentialKind::Pin, "482916").await;
    assert_eq!(denied(&locked), Some(DenyReason::LockedOut));
    let other_unit = b.present(2, CredentialKind::Pin, "482916").await;
    assert_eq!(
        denied(&other_unit),
        Some(DenyReason::WrongDoor),
        "unit 2 is the garage: not locked, just not this key's door"
    );

    b.command(SimCommand::Call {
        unit: unit(1),
        button: 0,
    })
    .await;
    b.command(SimCommand::Door {
        unit: unit(2),
        door: 0,
        event: DoorEventKind::ForcedOpen,
    })
    .await;
    b.command(SimCommand::Battery {
        unit: unit(2),
        percent: 12,
        millivolts: 3410,
    })
    .await;
    b.command(SimCommand::Tamper {
        unit: unit(1),
        active: true,
    })
    .await;
    let records = b
        .records_until(|r| {
            r.iter().any(|r| matches!(r, Record::CallButton { .. }))
                && r.iter().any(|r| matches!(r, Record::DoorEvent { .. }))
                && r.iter().any(|r| matches!(r, Record::Battery { .. }))
                && r.iter().any(|r| matches!(r, Record::Tamper { .. }))
        })
        .await;
    assert!(
        records
            .iter()
            .any(|r| matches!(r, Record::PinLockout { door, .. } if door == "main"))
    );
    assert!(
        records
            .iter()
            .any(|r| matches!(r, Record::CallButton { door, .. } if door == "main"))
    );
    assert!(records.iter().any(
        |r| matches!(r, Record::DoorEvent { door, event: DoorEventKind::ForcedOpen, .. } if door == "garage")
    ));
    let battery = records
        .iter()
        .find(|r| matches!(r, Record::Battery { .. }))
        .unwrap();
    assert!(matches!(
        battery,
        Record::Battery {
            percent: 12,
            millivolts: 3410,
            low: true,
            ..
        }
    ));
    assert_eq!(
        battery.class(),
        doorbridge::store::RecordClass::Alarm,
        "a low battery is an alarm"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_broken_frames_do_not_stop_the_bus_and_eight_units_are_served() {
    let keys: Vec<Key> = (1..=8u8)
        .map(|n| {
            with(
                key(
                    &format!("k{n}"),
                    CredentialKind::Qr,
                    &format!("qr-{n}"),
                    UseLimit::Unlimited,
                ),
                |k| {
                    k.rules.doors = vec![match n {
                        1 => "main".into(),
                        2 => "garage".into(),
                        3 => "inner".into(),
                        n => format!("door-{n}").into(),
                    }];
                    k.rules.opens_inner_door = n == 3;
                },
            )
        })
        .collect();
    let mut b = Building::open(8, keys, "").await;
    b.command(SimCommand::Garbage { len: 40 }).await;
    b.command(SimCommand::BadCrc { unit: unit(1) }).await;
    b.command(SimCommand::Truncate { unit: unit(2) }).await;
    b.command(SimCommand::Garbage { len: 300 }).await;
    // Every unit presents at once; every one is answered.
    for n in 1..=8u8 {
        b.command(SimCommand::Verify {
            unit: unit(n),
            kind: CredentialKind::Qr,
            value: format!("qr-{n}").into_bytes(),
            reader: 0,
        })
        .await;
    }
    for n in 1..=8u8 {
        let a = b.decision(n).await;
        assert!(granted(&a), "unit {n}: {a:?}");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_limited_keys_grants_residents_and_recovers() {
    let keys = vec![
        key(
            "resident",
            CredentialKind::Mobile,
            "app-resident",
            UseLimit::Unlimited,
        ),
        key("courier", CredentialKind::Pin, "482916", UseLimit::Total(5)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("doorbridge.db");
    // Fill a 1 MiB database with records, as a long outage would.
    {
        let mut options = StoreOptions::new(&db, fixtures::context());
        options.max_size = Some(1 << 20);
        let store = Store::open(options).unwrap();
        store
            .install_key_set(header_now(1), keys.clone())
            .await
            .unwrap();
        let filler: Vec<Record> = (0..50)
            .map(|i| Record::StorageUnavailable {
                at: Timestamp::now(),
                detail: format!("{i}{}", "x".repeat(500)),
            })
            .collect();
        while !store.append(filler.clone()).await.unwrap().is_empty() {}
        store.close();
        // Then the last corners, with the smallest records, from a fresh start. Of the
        // activity class, as a decision's record is: an alarm also goes into the rare-records
        // index, and a crumb refused because that index is full would leave room in the table
        // itself, where a decision's record would still fit.
        let mut options = StoreOptions::new(&db, fixtures::context());
        options.max_size = Some(1 << 20);
        let store = Store::open(options).unwrap();
        let crumb = Record::UnitReachability {
            at: Timestamp::now(),
            unit: String::new().into(),
            door: String::new().into(),
            online: true,
        };
        while !store.append(vec![crumb.clone()]).await.unwrap().is_empty() {}
        store.close();
    }
    let mut b = Building::open_at(dir, 1, "max_size = \"1 MiB\"").await;
    let courier = b.present(1, CredentialKind::Pin, "482916").await;
    assert_eq!(
        denied(&courier),
        Some(DenyReason::NotRecorded),
        "a use that cannot be counted is refused"
    );
    let resident = b.present(1, CredentialKind::Mobile, "app-resident").await;
    assert!(
        granted(&resident),
        "a full disk does not lock residents out"
    );

    // The uplink frees space (here: deleting the oldest records from another connection).
    let conn = rusqlite::Connection::open(&b.db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute(
        "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT 1000)",
        [],
    )
    .unwrap();
    drop(conn);
    let courier = b.present(1, CredentialKind::Pin, "482916").await;
    assert!(granted(&courier), "recovered by itself: {courier:?}");
    let records = b
        .records_until(|r| {
            r.iter()
                .any(|r| matches!(r, Record::StorageRecovered { .. }))
        })
        .await;
    let activities = records
        .iter()
        .filter(|r| matches!(r, Record::Activity(_)))
        .count();
    assert_eq!(
        activities, 3,
        "the two decisions held in memory and the new one are on disk"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_disappears_is_reopened() {
    let keys = vec![key(
        "resident",
        CredentialKind::Mobile,
        "app-resident",
        UseLimit::Unlimited,
    )];
    let mut b = Building::open(1, keys, "").await;
    assert!(granted(
        &b.present(1, CredentialKind::Mobile, "app-resident").await
    ));
    // Unplug: the pty goes away, then a new one appears at the same path.
    b.stop_sim().await;
    let _ = std::fs::remove_file(&b.link);
    b.start_sim(1);
    b.ready(1).await;
    assert!(granted(
        &b.present(1, CredentialKind::Mobile, "app-resident").await
    ));
    // The reopened line gets the time for the units' displays, as every opened line does.
    let time = b
        .next(|o| {
            matches!(
                o,
                Output::Time {
                    broadcast: true,
                    ..
                }
            )
        })
        .await;
    let Output::Time { time, .. } = time else {
        unreachable!()
    };
    let skew = Timestamp::now()
        .as_second()
        .abs_diff(i64::try_from(time.unix).unwrap());
    assert!(skew < 60, "the units were told the gateway's time");
    assert!(
        time.utc_offset == 3600 || time.utc_offset == 7200,
        "Berlin's offset: {}",
        time.utc_offset
    );
    b.stop().await;
}
