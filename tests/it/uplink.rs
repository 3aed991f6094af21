//! The uplink against real brokers (issue 5 §6): records that pile up while the broker is
//! away all arrive, a `kill -9` in the middle of a drain loses nothing, a full outbox drops
//! exactly what `docs/storage.md` says and says so, a call button and a low battery reach the
//! cloud at once, and `cloud-sim records` / `check` see what a cloud would.
//!
//! The cloud's side is [`Uploads`]: a [`CloudClient`] connected straight to the broker (never
//! through the proxy that cuts the gateway off) that feeds a [`RecordLedger`] and keeps each
//! record's contents and when it first arrived. The gateways are
//! - [`Gateway`]: the daemon's own `run_link` in process, on a real SQLite file whose
//!   [`Store`] the test appends to as the bus tasks would (no door buses);
//! - [`Daemon`]: the real `doorbridge run` binary, for `kill -9`;
//! - [`Building`]: the daemon's entry point with simulated door units on a pty.
//!
//! Every wait is for a condition, with a deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{Category, CredentialKind, DenyReason};
use doorbridge::bus::message::DoorEventKind;
use doorbridge::cloud::link::{self, LinkStatus};
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::telemetry::{Summary, TelemetrySpec};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::cloud::uplink::{Batch, BatchWriter, Uploaded};
use doorbridge::config::Config;
use doorbridge::drivers::bus::DoorRouter;
use doorbridge::store::{Activity, Record, RecordClass, Store};
use doorbridge_sim::cloud::{CloudClient, Message, RecordLedger};
use doorbridge_sim::{Output, ReportKind, SimCommand};
use jiff::SignedDuration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::{Proxy, RumqttdBroker, mosquitto_or_skip, wait_for};
use crate::bus::{Building, unit};
use crate::fixtures;
use crate::gateway::{Daemon, Home};
use crate::link::{cloud_section, topics as building_topics};

/// How long a step may take on a loaded machine; every wait ends as soon as it holds.
const WAIT: Duration = Duration::from_secs(30);
/// The limit for a call button or an alarm, press to cloud, when online.
const CALL_LIMIT: Duration = Duration::from_secs(1);
const GATEWAY: &str = "gw-up";
const SITE: &str = "site-up";

fn target() -> Target {
    Target {
        site: SITE.into(),
        gateway: GATEWAY.into(),
    }
}

fn topics() -> Topics {
    Topics::new(DEFAULT_PREFIX, &target()).expect("topics")
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// Record `i` of `class`; its time is `i` seconds after a fixed instant, so no two records of a
/// test are alike and a record arriving under the wrong id would be seen.
fn record(i: u64, class: RecordClass) -> Record {
    let at = fixtures::now() + SignedDuration::from_secs(i64::try_from(i).expect("small"));
    let unit = "entrance/1".to_owned();
    let door = "main".to_owned();
    let made = match (class, i % 3) {
        (RecordClass::Alarm, 0) => Record::CallButton {
            at,
            unit: unit.into(),
            door: door.into(),
            button: 0,
        },
        (RecordClass::Alarm, 1) => Record::DoorEvent {
            at,
            unit: unit.into(),
            door: door.into(),
            event: DoorEventKind::ForcedOpen,
        },
        (RecordClass::Alarm, _) => Record::Tamper {
            at,
            unit: unit.into(),
            door: door.into(),
            active: true,
        },
        (RecordClass::Telemetry, _) => Record::Battery {
            at,
            unit: unit.into(),
            door: door.into(),
            percent: 80,
            millivolts: 3600,
            low: false,
        },
        (RecordClass::Activity, 0) => Record::DoorEvent {
            at,
            unit: unit.into(),
            door: door.into(),
            event: DoorEventKind::Opened,
        },
        (RecordClass::Activity, _) => {
            let granted = i.is_multiple_of(2);
            Record::Activity(Activity {
                at,
                door: door.clone().into(),
                unit: unit.into(),
                request_id: u32::try_from(i % 65_536).ok(),
                credential_kind: CredentialKind::Pin,
                key_id: Some(format!("key-{i}").into()),
                category: Some(Category::Friend),
                granted,
                reason: (!granted).then_some(DenyReason::UnknownCredential),
                released: if granted { vec![door.into()] } else { vec![] },
                command_id: None,
                issuer: None,
            })
        }
    };
    assert_eq!(made.class(), class, "{made:?}");
    made
}

/// A day at a busy building: mostly activity, a tenth routine battery readings, 2 % alarms.
fn busy_class(i: u64) -> RecordClass {
    if i.is_multiple_of(50) {
        RecordClass::Alarm
    } else if i % 10 == 1 {
        RecordClass::Telemetry
    } else {
        RecordClass::Activity
    }
}

/// Appends `n` records of the busy mix, `per_commit` per store command; returns them by the
/// sequence number the store gave each.
async fn append_busy(store: &Store, n: u64, per_commit: u64) -> BTreeMap<u64, Record> {
    let mut appended = BTreeMap::new();
    let mut next = 0;
    while next < n {
        let records: Vec<Record> = (next..n.min(next + per_commit))
            .map(|i| record(i, busy_class(i)))
            .collect();
        next += records.len() as u64;
        let seqs = store.append(records.clone()).await.expect("append");
        assert_eq!(seqs.len(), records.len(), "the disk took every record");
        for (seq, r) in seqs.into_iter().zip(records) {
            appended.insert(u64::try_from(seq).expect("seq"), r);
        }
    }
    appended
}

// ---------------------------------------------------------------------------------------------
// The cloud's side
// ---------------------------------------------------------------------------------------------

/// What the cloud has received on a gateway's `records` topic.
#[derive(Debug, Default)]
struct Received {
    ledger: RecordLedger,
    /// Each record as it first arrived, by seq.
    records: HashMap<u64, Uploaded>,
    /// Seqs that arrived again with other contents (a duplicate must be the same record).
    conflicts: Vec<u64>,
    /// Seqs in the order they first arrived, with when.
    order: Vec<(u64, Instant)>,
    /// Messages on the topic that are not record batches.
    undecodable: Vec<String>,
    /// The signed chain heads the batches carried.
    heads: Vec<doorbridge::cloud::uplink::UploadedHead>,
}

impl Received {
    fn take(&mut self, batch: &Batch, at: Instant) {
        self.ledger.add(batch);
        self.heads.extend(batch.head.clone());
        for r in &batch.records {
            match self.records.get(&r.seq) {
                Some(first) if first != r => self.conflicts.push(r.seq),
                Some(_) => {}
                None => {
                    self.records.insert(r.seq, r.clone());
                    self.order.push((r.seq, at));
                }
            }
        }
    }

    /// Asserts that exactly `expected` arrived, each under its own seq, and nothing else: no
    /// gaps, duplicates only of the same record.
    fn assert_exactly(&self, expected: &BTreeMap<u64, Record>) {
        assert!(
            self.conflicts.is_empty(),
            "seqs reused: {:?}",
            self.conflicts
        );
        assert_eq!(
            self.ledger.unique(),
            expected.len() as u64,
            "{}",
            self.ledger.summary()
        );
        for (seq, record) in expected {
            let got = self
                .records
                .get(seq)
                .unwrap_or_else(|| panic!("seq {seq} never arrived; {}", self.ledger.summary()));
            assert_eq!(&got.record, record, "seq {seq} arrived with other contents");
            assert_eq!(got.class, record.class(), "seq {seq}");
        }
    }
}

/// The cloud: a client subscribed to one gateway's uploads, keeping what arrives.
struct Uploads {
    client: CloudClient,
    received: Arc<Mutex<Received>>,
    _task: JoinHandle<()>,
}

impl Uploads {
    /// Connects to the broker at `url` as `client_id` and subscribes to `topics`' records.
    async fn connect(url: &str, topics: &Topics, client_id: &str) -> Uploads {
        let client = CloudClient::connect(url, client_id)
            .await
            .expect("the cloud connects");
        let mut rx = client
            .subscribe(&topics.topic(Channel::Records))
            .await
            .expect("subscribe to the records");
        let received = Arc::new(Mutex::new(Received::default()));
        let into = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                let at = Instant::now();
                let mut received = into.lock().unwrap();
                match Batch::decode(&payload) {
                    Ok(batch) => received.take(&batch, at),
                    Err(e) => received.undecodable.push(format!("{topic}: {e}")),
                }
            }
        });
        Uploads {
            client,
            received,
            _task: task,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.received.lock().unwrap())
    }

    fn unique(&self) -> u64 {
        self.with(|r| r.ledger.unique())
    }

    /// Waits until `done` holds for what arrived; fails after `within` with the ledger's summary,
    /// or at once if something undecodable arrived.
    async fn until(&self, what: &str, within: Duration, mut done: impl FnMut(&Received) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let failed = self.with(|r| {
                assert!(r.undecodable.is_empty(), "{what}: {:?}", r.undecodable);
                if done(r) {
                    return Ok(());
                }
                Err((Instant::now() >= deadline).then(|| r.ledger.summary()))
            });
            match failed {
                Ok(()) => return,
                Err(Some(summary)) => {
                    panic!("{what}: not within {within:?}; the cloud has {summary}")
                }
                Err(None) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// The first record to arrive for which `want` holds, once it has, and when it did.
    async fn first(&self, what: &str, want: impl Fn(&Uploaded) -> bool) -> (Uploaded, Instant) {
        let (mut scanned, mut hit) = (0, None);
        self.until(what, WAIT, |r| {
            hit = r.order[scanned..]
                .iter()
                .find(|(seq, _)| want(&r.records[seq]))
                .map(|(seq, at)| (r.records[seq].clone(), *at));
            scanned = r.order.len();
            hit.is_some()
        })
        .await;
        hit.expect("it arrived")
    }

    /// Subscribes to another of the gateway's topics.
    async fn subscribe(&self, topics: &Topics, channel: Channel) -> UnboundedReceiver<Message> {
        self.client
            .subscribe(&topics.topic(channel))
            .await
            .expect("subscribe")
    }
}

/// The next report on `rx` for which `want` holds, and when it arrived.
async fn report(
    rx: &mut UnboundedReceiver<Message>,
    what: &str,
    want: impl Fn(&Report) -> bool,
) -> (Report, Instant) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((topic, payload))) => {
                let at = Instant::now();
                let r = Report::decode(&payload)
                    .unwrap_or_else(|e| panic!("an undecodable report on {topic}: {e}"));
                if want(&r) {
                    return (r, at);
                }
            }
            Ok(None) => panic!("{what}: the cloud client stopped"),
            Err(elapsed) => panic!("{what}: {elapsed} ({WAIT:?})"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A gateway's link and store, in process
// ---------------------------------------------------------------------------------------------

/// The daemon's cloud link (`run_link`, uplink and telemetry included) on a real SQLite file,
/// configured from TOML as the daemon is; no door buses. The test appends to [`Gateway::store`]
/// as the bus tasks do.
struct Gateway {
    /// The configuration file and the database, in a temporary directory.
    _home: Home,
    config: Config,
    store: Store,
    status: Arc<Mutex<LinkStatus>>,
    link: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl Gateway {
    /// A gateway for the broker at `url` with its store open and its link not yet started;
    /// `storage` is added to the `[storage]` table.
    fn open(url: &str, storage: &str) -> Gateway {
        let home = Home::new(url, target(), &[]);
        if !storage.is_empty() {
            home.set("storage", storage);
        }
        let text = std::fs::read_to_string(&home.config).expect("read the configuration");
        let config = Config::from_toml_str(&text, "doorbridge.toml").expect("a valid config");
        let store =
            Store::open(doorbridge::store::StoreOptions::from(&config)).expect("store opens");
        Gateway {
            _home: home,
            config,
            store,
            status: Arc::default(),
            link: None,
        }
    }

    /// Starts the cloud link as the daemon does.
    fn start_link(&mut self) {
        let spec = link::spec(&self.config).expect("the link's settings");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(link::run_link(
            spec,
            self.store.clone(),
            Arc::new(DoorRouter::default()),
            Arc::clone(&self.status),
            TelemetrySpec::new(Duration::from_secs(3600)),
            stopped,
        ));
        self.link = Some((stop, task));
    }

    fn depth(&self) -> u64 {
        let reader = self.store.reader().expect("a reader");
        reader.outbox_depth().expect("the outbox depth")
    }

    /// Waits until the link is connected, for at least the `n`-th time.
    async fn connected(&self, n: u64) {
        let status = &self.status;
        wait_for(WAIT, &format!("connection {n} to the broker"), || {
            let s = status.lock().unwrap();
            (s.connected && s.connects >= n).then_some(())
        })
        .await;
    }

    /// Waits until the link has noticed that the broker is gone.
    async fn disconnected(&self) {
        let status = &self.status;
        wait_for(WAIT, "the link to notice the cut", || {
            (!status.lock().unwrap().connected).then_some(())
        })
        .await;
    }

    /// Waits until every acknowledged record was deleted: the outbox is empty.
    async fn drained(&self) {
        wait_for(WAIT, "an empty outbox", || {
            (self.depth() == 0).then_some(())
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some((stop, task)) = self.link.take() {
            let _ = stop.send(true);
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the link stops")
                .expect("the link task");
        }
        self.store.close();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The broker unreachable while 50,000 records accumulate
// ---------------------------------------------------------------------------------------------

/// A gateway linked through a proxy to the broker at `broker_url` is cut off; 50,000 records
/// accumulate; the link comes back, is cut once more in the middle of the drain, and comes
/// back again: the cloud has every record, each under its own id, and the outbox is empty.
async fn everything_arrives_after_an_outage(broker_url: &str, broker_port: u16, broker: &str) {
    const N: u64 = 50_000;
    let proxy = Proxy::start(broker_port);
    let uploads = Uploads::connect(broker_url, &topics(), "cloud-outage").await;
    let mut gw = Gateway::open(&proxy.url(), "");
    gw.start_link();
    gw.connected(1).await;

    proxy.cut();
    gw.disconnected().await;
    let started = Instant::now();
    // 5,000 per commit: a commit costs an fsync, 0.1 s on a busy disk.
    let appended = append_busy(&gw.store, N, 5_000).await;
    let filled = started.elapsed();
    assert_eq!(gw.depth(), N, "every record waits while the broker is away");
    assert_eq!(uploads.unique(), 0);

    proxy.restore();
    gw.connected(2).await;
    let back = Instant::now();
    // The internet goes away again in the middle of the drain, with batches in flight.
    uploads
        .until("a fifth of the records", WAIT, |r| {
            r.ledger.unique() >= N / 5
        })
        .await;
    proxy.cut();
    let at_cut = uploads.unique();
    assert!(at_cut < N, "the drain was over before the cut");
    gw.disconnected().await;
    proxy.restore();
    gw.connected(3).await;
    let resumed = (Instant::now(), uploads.unique());
    uploads
        .until("every record", WAIT, |r| r.ledger.unique() >= N)
        .await;
    let done = Instant::now();
    gw.drained().await;
    uploads.with(|r| {
        r.assert_exactly(&appended);
        assert!(r.ledger.gaps().is_empty(), "{}", r.ledger.summary());
    });
    #[allow(clippy::cast_precision_loss)]
    let rate = (N - resumed.1) as f64 / done.duration_since(resumed.0).as_secs_f64();
    eprintln!(
        "{broker}: {N} records appended offline in {filled:.2?}; all at the cloud {:.2?} after \
         the link came back, through a cut at {at_cut}; after the cut {} records in {:.2?} \
         ({rate:.0} records/s); {} duplicates",
        done.duration_since(back),
        N - resumed.1,
        done.duration_since(resumed.0),
        uploads.with(|r| r.ledger.duplicates()),
    );
    gw.stop().await;
}

/// Every uploaded record carries its chain link and every batch the signed chain head: the
/// cloud verifies the whole chain across classes against the gateway's enrolled key, and a
/// record withheld from it is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_carry_the_record_chain_and_a_signed_head_the_cloud_verifies() {
    use doorbridge::store::chain::{self, ChainedRecord, Finding, Identity, SignedHead};
    let broker = RumqttdBroker::start();
    let uploads = Uploads::connect(&broker.url(), &topics(), "cloud-chain").await;
    let mut gw = Gateway::open(&broker.url(), "");
    gw.start_link();
    gw.connected(1).await;
    let appended = append_busy(&gw.store, 300, 50).await;
    uploads
        .until("every record", WAIT, |r| r.ledger.unique() >= 300)
        .await;
    gw.drained().await;
    let public = Identity::load_or_create(&Identity::state_dir(&gw.config.storage.path))
        .unwrap()
        .public();
    let (records, heads, epoch) = uploads.with(|r| {
        r.assert_exactly(&appended);
        let records: Vec<ChainedRecord> = r
            .records
            .values()
            .map(|u| ChainedRecord {
                seq: i64::try_from(u.seq).unwrap(),
                // The gateway's stored bytes, as this build encodes them.
                body: u.record.to_cbor(),
                chain: u.chain.map(|c| c.0),
            })
            .collect();
        let heads: Vec<SignedHead> = r
            .heads
            .iter()
            .map(|h| SignedHead {
                seq: i64::try_from(h.seq).unwrap(),
                chain: h.chain.0,
                signature: h.signature,
            })
            .collect();
        (records, heads, r.ledger.epochs()[0])
    });
    assert!(!heads.is_empty(), "batches carry a signed head");
    assert!(
        records.iter().all(|r| r.chain.is_some()),
        "every record carries its link"
    );
    let epoch = i64::try_from(epoch).unwrap();
    assert_eq!(chain::verify(&records, &heads, epoch, &public), vec![]);
    // A record withheld (deleted on the gateway before upload) is named.
    let withheld: Vec<ChainedRecord> = records.iter().filter(|r| r.seq != 150).cloned().collect();
    assert_eq!(
        chain::verify(&withheld, &heads, epoch, &public),
        vec![Finding::Missing { from: 150, to: 150 }]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_records_from_an_outage_all_arrive_through_rumqttd() {
    let broker = RumqttdBroker::start();
    everything_arrives_after_an_outage(&broker.url(), broker.port, "rumqttd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_records_from_an_outage_all_arrive_through_mosquitto() {
    let Some(broker) =
        mosquitto_or_skip("fifty_thousand_records_from_an_outage_all_arrive_through_mosquitto")
    else {
        return;
    };
    everything_arrives_after_an_outage(&broker.url(), broker.port(), "mosquitto").await;
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 in the middle of a drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_drain_loses_no_record() {
    const N: u64 = 30_000;
    let broker = RumqttdBroker::start();
    let home = Home::new(&broker.url(), target(), &[]);
    // The smallest batches: many round trips, so the kill lands in the middle of the drain.
    home.set("cloud", "max_payload = \"16 KiB\"");
    let store = fixtures::open(&home.db);
    let appended = append_busy(&store, N, 5_000).await;
    store.close();
    let uploads = Uploads::connect(&broker.url(), &home.topics, "cloud-kill").await;

    let mut daemon = Daemon::start(&home);
    uploads
        .until("the first records", WAIT, |r| r.ledger.unique() > 0)
        .await;
    daemon.kill9().await;
    let waiting = home.reader().outbox_depth().expect("the outbox depth");
    let before = uploads.unique();
    assert!(
        waiting > 0 && before < N,
        "the kill came in the middle of the drain: {before} uploaded, {waiting} waiting"
    );

    let started = Instant::now();
    let mut daemon = Daemon::start(&home);
    uploads
        .until("every record after the restart", WAIT, |r| {
            r.ledger.unique() >= N
        })
        .await;
    let took = started.elapsed();
    wait_for(WAIT, "an empty outbox", || {
        (home.reader().outbox_depth().ok()? == 0).then_some(())
    })
    .await;
    uploads.with(|r| {
        r.assert_exactly(&appended);
        assert!(r.ledger.gaps().is_empty(), "{}", r.ledger.summary());
    });
    eprintln!(
        "kill -9 after {before} of {N} records reached the cloud ({waiting} still in the \
         outbox); after the restart all were there in {took:.2?}; {} duplicates",
        uploads.with(|r| r.ledger.duplicates())
    );
    assert!(daemon.terminate().await.success());
}

// ---------------------------------------------------------------------------------------------
// 3. A full outbox
// ---------------------------------------------------------------------------------------------

/// One commit: the seq and class of each record it appended.
type Commit = Vec<(u64, RecordClass)>;

/// What a full outbox did while the broker was away, and what reached the cloud afterwards.
struct FullOutbox {
    limit: u64,
    commits: Vec<Commit>,
    appended: BTreeMap<u64, Record>,
    /// The `outbox_dropped` alarms: seq, telemetry and activity dropped.
    bursts: Vec<(u64, u64, u64)>,
    /// What reached the cloud: exactly what the outbox held when the broker came back.
    received: BTreeSet<u64>,
    /// How many records the gateway said it dropped, as the cloud's ledger counted them.
    reported_dropped: u64,
}

impl FullOutbox {
    /// Seqs of `class` appended, oldest first, and how many of them never reached the cloud.
    fn lost(&self, class: RecordClass) -> (Vec<u64>, usize) {
        let of: Vec<u64> = self
            .appended
            .iter()
            .filter(|(_, r)| r.class() == class)
            .map(|(s, _)| *s)
            .collect();
        let lost = of.iter().filter(|s| !self.received.contains(s)).count();
        (of, lost)
    }
}

/// A gateway with `outbox_max_records = limit` never reaches its broker while routine
/// activity, then alarms and routine battery readings, then more activity pile up to more than
/// the limit; then the broker is reachable. The outbox never holds more than the limit, and the
/// cloud gets exactly what it held.
async fn a_full_outbox_offline(limit: u64) -> FullOutbox {
    let broker = RumqttdBroker::start();
    let proxy = Proxy::start(broker.port);
    proxy.cut();
    let uploads = Uploads::connect(&broker.url(), &topics(), "cloud-full").await;
    let mut gw = Gateway::open(&proxy.url(), &format!("outbox_max_records = {limit}"));
    gw.start_link();
    // Oldest first: 400 activity; 50 alarms among 300 battery readings; 800 activity. Few
    // commits, since each costs an fsync and the link's backoff grows meanwhile.
    let mut plan = vec![vec![RecordClass::Activity; 100]; 4];
    for _ in 0..10 {
        plan.push(vec![RecordClass::Alarm; 5]);
        plan.push(vec![RecordClass::Telemetry; 30]);
    }
    plan.extend(vec![vec![RecordClass::Activity; 100]; 8]);
    let (mut commits, mut appended, mut i) = (Vec::new(), BTreeMap::new(), 0);
    for classes in plan {
        let records: Vec<Record> = classes
            .iter()
            .map(|c| {
                i += 1;
                record(i, *c)
            })
            .collect();
        let seqs = gw.store.append(records.clone()).await.expect("append");
        assert_eq!(seqs.len(), records.len(), "the disk took every record");
        let seqs: Vec<u64> = seqs
            .into_iter()
            .map(|s| u64::try_from(s).unwrap())
            .collect();
        let depth = gw.depth();
        assert!(
            depth <= limit,
            "the outbox holds {depth} records, over {limit}"
        );
        commits.push(seqs.iter().copied().zip(classes).collect());
        appended.extend(seqs.into_iter().zip(records));
    }
    let reader = gw.store.reader().expect("a reader");
    let waiting: BTreeMap<u64, Record> = reader
        .outbox(0, 1_000_000)
        .expect("the outbox")
        .into_iter()
        .map(|r| (u64::try_from(r.seq).unwrap(), r.record))
        .collect();
    let bursts = waiting
        .iter()
        .filter_map(|(seq, r)| match r {
            Record::OutboxDropped {
                telemetry,
                activity,
                ..
            } => Some((*seq, *telemetry, *activity)),
            _ => None,
        })
        .collect();

    proxy.restore();
    gw.connected(1).await;
    uploads
        .until("what the outbox held", WAIT, |r| {
            waiting.keys().all(|s| r.records.contains_key(s))
        })
        .await;
    gw.drained().await;
    let (received, reported_dropped) = uploads.with(|r| {
        r.assert_exactly(&waiting);
        (
            r.records.keys().copied().collect(),
            r.ledger.reported_dropped(),
        )
    });
    gw.stop().await;
    FullOutbox {
        limit,
        commits,
        appended,
        bursts,
        received,
        reported_dropped,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_telemetry_then_the_oldest_activity_never_alarms_and_says_so() {
    let f = a_full_outbox_offline(1_000).await;
    assert!(f.bursts.len() >= 2, "the outbox overflowed: {:?}", f.bursts);
    let (alarms, lost_alarms) = f.lost(RecordClass::Alarm);
    assert_eq!(lost_alarms, 0, "an alarm was dropped");
    assert_eq!(alarms.len(), 50);
    // Every loss is reported, class by class, and the cloud can account for every seq it
    // misses (a fresh gateway's first seq is 1).
    let (telemetry, lost_telemetry) = f.lost(RecordClass::Telemetry);
    let (activity, lost_activity) = f.lost(RecordClass::Activity);
    let reported = f.bursts.iter().fold((0, 0), |(t, a), b| (t + b.1, a + b.2));
    assert_eq!(
        (lost_telemetry as u64, lost_activity as u64),
        reported,
        "lost (telemetry, activity) against what the outbox_dropped alarms say"
    );
    assert_eq!(f.appended.keys().next(), Some(&1));
    let last = *f.received.last().expect("records arrived");
    let missing = (1..=last).filter(|s| !f.received.contains(s)).count();
    assert_eq!(f.reported_dropped, reported.0 + reported.1);
    assert_eq!(missing as u64, f.reported_dropped);
    // Within each class, the oldest went.
    for (class, of, lost) in [
        ("telemetry", &telemetry, lost_telemetry),
        ("activity", &activity, lost_activity),
    ] {
        assert!(lost > 0, "no {class} was dropped");
        assert!(
            of[..lost].iter().all(|s| !f.received.contains(s))
                && of[lost..].iter().all(|s| f.received.contains(s)),
            "not the oldest {class} went"
        );
    }
    // Telemetry first: the first overflow took battery readings although older activity
    // waited, and activity went only once no older reading was left.
    let first = f.bursts[0];
    assert!(first.1 > 0 && first.2 == 0, "first overflow: {first:?}");
    assert!(
        activity[0] < first.0,
        "older activity waited at the first overflow"
    );
    for &(seq, _, dropped_activity) in &f.bursts {
        if dropped_activity > 0 {
            assert!(
                telemetry
                    .iter()
                    .filter(|s| **s < seq)
                    .all(|s| !f.received.contains(s)),
                "activity dropped at seq {seq} while older battery readings were kept"
            );
        }
    }
}

/// `docs/storage.md`, "A bounded outbox", as a model: in the commit that passes the limit,
/// routine telemetry oldest first, then the oldest routine activity, are deleted until the
/// outbox holds 90 % of the limit, and one `outbox_dropped` alarm is added. Returns
/// (telemetry, activity) dropped per overflow, and the seqs kept.
fn documented_policy(commits: &[Commit], limit: u64) -> (Vec<(u64, u64)>, BTreeSet<u64>) {
    let mut kept: BTreeMap<u64, RecordClass> = BTreeMap::new();
    let mut drop_alarms = 0;
    let mut bursts = Vec::new();
    for commit in commits {
        kept.extend(commit.iter().copied());
        let count = |kept: &BTreeMap<u64, RecordClass>, extra| kept.len() as u64 + extra;
        if count(&kept, drop_alarms) <= limit {
            continue;
        }
        let mut dropped = [0, 0];
        for (slot, class) in [(0, RecordClass::Telemetry), (1, RecordClass::Activity)] {
            while count(&kept, drop_alarms) * 10 > limit * 9 {
                let Some(oldest) = kept.iter().find(|(_, c)| **c == class).map(|(s, _)| *s) else {
                    break;
                };
                kept.remove(&oldest);
                dropped[slot] += 1;
            }
        }
        if dropped != [0, 0] {
            drop_alarms += 1;
            bursts.push((dropped[0], dropped[1]));
        }
    }
    (bursts, kept.into_keys().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_only_down_to_90_percent_of_its_limit() {
    let f = a_full_outbox_offline(1_000).await;
    let (bursts, kept) = documented_policy(&f.commits, f.limit);
    let got: Vec<(u64, u64)> = f.bursts.iter().map(|b| (b.1, b.2)).collect();
    assert_eq!(
        got, bursts,
        "(telemetry, activity) dropped per overflow, against docs/storage.md"
    );
    let received: BTreeSet<u64> = f
        .received
        .iter()
        .copied()
        .filter(|s| f.appended.contains_key(s))
        .collect();
    assert_eq!(received, kept);
}

// ---------------------------------------------------------------------------------------------
// 4. and 5. A call button and a low battery, online
// ---------------------------------------------------------------------------------------------

/// A building whose gateway is online with the in-process broker at `url` (its retained
/// `online` state has arrived), and the cloud watching its uploads and telemetry.
async fn online_building(
    url: &str,
    dir: tempfile::TempDir,
    extra: &str,
) -> (Building, Uploads, UnboundedReceiver<Message>) {
    let topics = building_topics();
    let uploads = Uploads::connect(url, &topics, "cloud-online").await;
    let mut state = uploads.subscribe(&topics, Channel::State).await;
    let telemetry = uploads.subscribe(&topics, Channel::Telemetry).await;
    let b = Building::open_with_cloud(dir, 1, extra, &cloud_section(url)).await;
    report(&mut state, "the gateway online", |r| {
        matches!(
            r,
            Report::State {
                state: Presence::Online,
                ..
            }
        )
    })
    .await;
    (b, uploads, telemetry)
}

/// The call-button record for `button`, once it has arrived, and when.
async fn call_arrived(uploads: &Uploads, button: u8) -> Instant {
    let (call, at) = uploads
        .first(
            &format!("the call on button {button}"),
            |u| matches!(u.record, Record::CallButton { button: b, .. } if b == button),
        )
        .await;
    assert_eq!(call.class, RecordClass::Alarm);
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_button_pressed_while_online_is_at_the_cloud_within_a_second() {
    let broker = RumqttdBroker::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut b, uploads, _) = online_building(&broker.url(), dir, "").await;
    let (mut took, mut acked) = (Vec::new(), Vec::new());
    for button in 0..5 {
        let pressed = Instant::now();
        b.command(SimCommand::Call {
            unit: unit(1),
            button,
        })
        .await;
        // The unit hears its report was stored (an upper bound for the disk's share).
        let stored = async {
            b.next(|o| {
                matches!(
                    o,
                    Output::Acked {
                        report: ReportKind::CallButton,
                        ..
                    }
                )
            })
            .await;
            Instant::now()
        };
        let (stored, arrived) = tokio::join!(stored, call_arrived(&uploads, button));
        took.push(arrived.duration_since(pressed));
        acked.push(stored.duration_since(pressed));
    }
    eprintln!("call button, press to cloud: {took:.1?} (acknowledged to the unit: {acked:.1?})");
    let slowest = took.iter().max().unwrap();
    assert!(
        *slowest <= CALL_LIMIT,
        "a call took {slowest:?}, over {CALL_LIMIT:?}: {took:?} (acknowledged to the unit, \
         so on disk, after {acked:?})"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_button_overtakes_a_backlog_of_routine_records() {
    const N: u64 = 50_000;
    let broker = RumqttdBroker::start();
    // The gateway was offline for a while: 50,000 routine records wait.
    let dir = tempfile::tempdir().unwrap();
    let store = fixtures::open(&dir.path().join("doorbridge.db"));
    let classes = [RecordClass::Activity, RecordClass::Telemetry];
    let mut i = 0;
    while i < N {
        let records = (i..i + 5_000)
            .map(|i| record(i, classes[usize::from(i % 10 == 0)]))
            .collect();
        store.append(records).await.expect("append");
        i += 5_000;
    }
    store.close();
    let (b, uploads, _) = online_building(&broker.url(), dir, "").await;
    uploads
        .until("the drain under way", WAIT, |r| r.ledger.unique() > 0)
        .await;
    let pressed = Instant::now();
    b.command(SimCommand::Call {
        unit: unit(1),
        button: 2,
    })
    .await;
    let arrived = call_arrived(&uploads, 2).await;
    let routine_before =
        uploads.with(|r| r.order.iter().take_while(|(_, at)| *at < arrived).count());
    let took = arrived.duration_since(pressed);
    eprintln!(
        "call button during a backlog of {N}: press to cloud {took:.1?}, after {routine_before} \
         routine records"
    );
    assert!(took <= CALL_LIMIT, "the call took {took:?}");
    assert!(
        (routine_before as u64) < N,
        "the call waited for the whole backlog"
    );
    uploads
        .until("the backlog", WAIT, |r| r.ledger.unique() > N)
        .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_battery_sends_telemetry_at_once_and_its_alarm_within_a_second() {
    let broker = RumqttdBroker::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "[telemetry]\ninterval = \"1h\"\nlow_battery_percent = 20";
    let (b, uploads, mut telemetry) = online_building(&broker.url(), dir, extra).await;
    let summary = |r: Report| match r {
        Report::Telemetry(s) => s,
        other => panic!("not a summary on the telemetry topic: {other:?}"),
    };
    report(&mut telemetry, "the summary sent on connect", |_| true).await;
    let reading = |percent, millivolts| SimCommand::Battery {
        unit: unit(1),
        percent,
        millivolts,
    };
    let uploaded = |percent: u8| {
        uploads.first(
            "the battery reading",
            move |u| matches!(u.record, Record::Battery { percent: p, .. } if p == percent),
        )
    };

    // A routine reading is uploaded as telemetry and sends no summary.
    b.command(reading(80, 3900)).await;
    let (routine, _) = uploaded(80).await;
    assert_eq!(routine.class, RecordClass::Telemetry);
    assert!(matches!(routine.record, Record::Battery { low: false, .. }));

    // At the threshold: the summary goes at once (the next one is an hour away), and the alarm.
    let sent = Instant::now();
    b.command(reading(20, 3350)).await;
    let (next, summary_at) = report(&mut telemetry, "the next summary", |_| true).await;
    let s: Box<Summary> = summary(next);
    let u = &s.buses[0].units[0];
    assert_eq!(
        (
            u.unit.as_str(),
            u.door.as_str(),
            u.battery_percent,
            u.battery_millivolts
        ),
        ("entrance/1", "main", Some(20), Some(3350)),
        "the first summary after the reading at 80 % is the low one: {s:?}"
    );
    assert!(u.battery_low, "{s:?}");
    let (alarm, alarm_at) = uploaded(20).await;
    assert_eq!(alarm.class, RecordClass::Alarm);
    assert!(matches!(alarm.record, Record::Battery { low: true, .. }));
    let (summary_took, alarm_took) = (
        summary_at.duration_since(sent),
        alarm_at.duration_since(sent),
    );
    eprintln!("low battery: summary after {summary_took:.1?}, alarm record after {alarm_took:.1?}");
    assert!(
        summary_took <= CALL_LIMIT,
        "the summary took {summary_took:?}"
    );
    assert!(alarm_took <= CALL_LIMIT, "the alarm took {alarm_took:?}");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. cloud-sim records and check
// ---------------------------------------------------------------------------------------------

fn cloud_sim() -> Command {
    Command::new(doorbridge_testkit::binary("cloud-sim"))
}

/// Reads `from` line by line into a shared list, in a thread that ends at its end of file.
fn read_lines(
    from: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&lines);
    let thread = std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    });
    (lines, thread)
}

/// A record edited in the gateway's database before upload (a root shell, a stolen SD card)
/// is named by `cloud-sim records --enrolled`, and `--check` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_sim_records_names_a_record_edited_on_the_gateway() {
    const N: u64 = 200;
    let broker = RumqttdBroker::start();
    let mut gw = Gateway::open(&broker.url(), "");
    append_busy(&gw.store, N, 100).await;
    let dir = doorbridge::store::chain::Identity::state_dir(&gw.config.storage.path);
    let public = doorbridge::store::chain::Identity::load_or_create(&dir)
        .unwrap()
        .public_hex();
    rusqlite::Connection::open(&gw.config.storage.path)
        .unwrap()
        .execute(
            "UPDATE records SET body = (SELECT body FROM records WHERE seq = 101) WHERE seq = 100",
            [],
        )
        .unwrap();
    let mut child = cloud_sim()
        .args(["records", "--url", &broker.url(), "--count", &N.to_string()])
        .args(["--check", "--enrolled", &format!("{GATEWAY}={public}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloud-sim records");
    let (stderr, err_thread) = read_lines(child.stderr.take().expect("piped"));
    subscribed(&stderr).await;
    gw.start_link();
    let status = wait_for(WAIT, "cloud-sim records to stop at the count", || {
        child.try_wait().expect("wait for cloud-sim")
    })
    .await;
    err_thread.join().unwrap();
    let stderr = stderr.lock().unwrap().join("\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("record chain broken:")
            && stderr.contains("record 100 edited")
            && !stderr.contains("record 101"),
        "{stderr}"
    );
    assert!(stderr.contains("the record chain is broken"), "{stderr}");
    gw.stop().await;
}

/// Waits until `cloud-sim records` says (on the `stderr` lines read so far) it subscribed.
async fn subscribed(stderr: &Mutex<Vec<String>>) {
    wait_for(WAIT, "cloud-sim records subscribed", || {
        let lines = stderr.lock().unwrap();
        lines
            .iter()
            .any(|l| l.contains("receiving records on"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one story: records, then check on what it wrote
async fn cloud_sim_records_prints_each_uploaded_record_once_and_check_names_the_gaps() {
    const N: u64 = 2_000;
    let broker = RumqttdBroker::start();
    let mut gw = Gateway::open(&broker.url(), "");
    let appended = append_busy(&gw.store, N, 1_000).await;
    let mut child = cloud_sim()
        .args(["records", "--url", &broker.url(), "--count", &N.to_string()])
        .args(["--check", "--client-id", "cloud-sim-records-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloud-sim records");
    let (stdout, out_thread) = read_lines(child.stdout.take().expect("piped"));
    let (stderr, err_thread) = read_lines(child.stderr.take().expect("piped"));
    subscribed(&stderr).await;
    // The first ten records arrive twice: once as a resend (after a lost ack, say), once with
    // the gateway's own upload.
    let mut resend = BatchWriter::new(1 << 20);
    for (seq, r) in appended.iter().take(10) {
        assert!(resend.push(i64::try_from(*seq).unwrap(), r.class(), &r.to_cbor()));
    }
    let cloud = CloudClient::connect(&broker.url(), "cloud-resend")
        .await
        .unwrap();
    cloud
        .publish(
            &topics().topic(Channel::Records),
            resend.finish(
                GATEWAY,
                SITE,
                gw.store.reader().unwrap().outbox_epoch().unwrap(),
            ),
            false,
        )
        .await
        .unwrap();
    gw.start_link();
    let status = wait_for(WAIT, "cloud-sim records to stop at the count", || {
        child.try_wait().expect("wait for cloud-sim")
    })
    .await;
    out_thread.join().unwrap();
    err_thread.join().unwrap();
    let (stdout, stderr) = (
        stdout.lock().unwrap().clone(),
        stderr.lock().unwrap().join("\n"),
    );
    assert!(status.success(), "{status:?}: {stderr}");

    // N lines, each record once, each as the gateway stored it.
    assert_eq!(stdout.len() as u64, N, "{stderr}");
    let mut seqs = BTreeSet::new();
    for line in &stdout {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let seq = v["seq"].as_u64().expect("a seq");
        let stored = &appended[&seq];
        assert_eq!(v["gateway"], GATEWAY);
        assert_eq!(v["class"], stored.class().as_str());
        assert_eq!(v["record"], serde_json::to_value(stored).unwrap(), "{line}");
        assert!(seqs.insert(seq), "seq {seq} printed twice");
    }
    assert!(
        stderr.contains(&format!(
            "{N} records from 1 gateway(s), 10 duplicates, no gaps"
        )),
        "{stderr}"
    );

    // `check` on what it printed, plus one line again: duplicates are counted, not missing.
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.jsonl");
    std::fs::write(&all, format!("{}\n{}\n", stdout.join("\n"), stdout[7])).unwrap();
    let out = crate::util::run(&mut cloud_sim(), ["check".as_ref(), all.as_os_str()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "{N} records from 1 gateway(s), 1 duplicates, no gaps"
        )),
        "{out:?}"
    );
    // Without records 57 and 100 to 102: exit 1, naming them.
    let holes = [57, 100, 101, 102];
    let kept: Vec<&str> = stdout
        .iter()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            !holes.contains(&v["seq"].as_u64().unwrap())
        })
        .map(String::as_str)
        .collect();
    let gappy = dir.path().join("gappy.jsonl");
    std::fs::write(&gappy, kept.join("\n")).unwrap();
    let out = crate::util::run(&mut cloud_sim(), ["check".as_ref(), gappy.as_os_str()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("4 missing: {GATEWAY}#57 {GATEWAY}#100-102")),
        "{out:?}"
    );
    assert!(out.stderr.contains("records are missing"), "{out:?}");
    gw.stop().await;
}
