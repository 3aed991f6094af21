//! The uplink end to end, the real `doorbridge run` binary (bench profile) as a child, each
//! figure beside its reference measured in the same run:
//!
//! - P6 outbox drain: a store filled with N activity records (100,000; 10,000 with
//!   `--quick`) before the daemon starts; the daemon's bus on a serial port that does not
//!   exist. A reference cloud (`CloudClient`) subscribed to the gateway's topics counts the
//!   records with a `RecordLedger`. Timed from the gateway's `online` state (the link is up and
//!   the uplink starts) until every record arrived, and until the outbox is empty (the last
//!   acknowledged rows deleted). Reference: a bare rumqttc `QoS` 1 publisher sending the same
//!   batches (the same payload bytes, built by the uplink's own `Planner` from the rows read
//!   back from that store) from memory, 8 in flight (the uplink's window) before and after the
//!   gateway's run, and 100 in flight (rumqttc's default) once, with the same subscriber
//!   counting, timed from the first publish to the last `PubAck` (the target's reference: the
//!   gateway is done when its outbox is empty) and to the last record received. Against
//!   mosquitto (the reference broker) and an in-process rumqttd. Then the store alone on a
//!   store filled the same way: the uplink's reads and `Store::ack` of the same batches.
//! - Disk bytes: the daemon with 8 simulated door units on a pty (`doorbridge_sim`, in this
//!   process) makes 1,000 decisions (200 with `--quick`; 9 of 10 granted, 1 of 10 an unknown
//!   credential), then idles 60 s (10 s with `--quick`) with its units polled every 10 ms and
//!   no events. Read from `/proc/<pid>/io` (`write_bytes`, `wchar`) of the daemon, and of its
//!   `store-writer` thread (`/proc/<pid>/task/<tid>/io`): once with the cloud link connected to
//!   mosquitto (uploads and their acks included: the window ends when the outbox is empty
//!   again) and once with no broker listening (the records stay in the outbox).
//!
//! Run with `cargo bench --bench uplink` (add `-- --quick` for a short run). Writes its section
//! of `docs/performance.md`. Without mosquitto the mosquitto rows are skipped and rumqttd
//! stands in for the connected byte count.

// Rates, sizes and sample counts are small; float conversions are for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use doorbridge::access::{Category, CredentialKind, DenyReason, Key};
use doorbridge::bus::frame::Address;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::cloud::uplink::{Batch, Planner, WINDOW};
use doorbridge::config::Config;
use doorbridge::store::{Activity, KeySetHeader, Reader, Record, RecordClass, Store, StoreOptions};
use doorbridge_sim::cloud::{CloudClient, RecordLedger, hex, parse_url};
use doorbridge_sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use brokers::{MAX_PACKET, Mosquitto, free_port, start_rumqttd};
use doorbridge_testkit::bench as support;
use doorbridge_testkit::brokers;
use support::{
    Daemon, Io, SALT, SITE, cloud_key, key, machine, per_second, rate, secs, target, thousands,
};

/// Any one wait for a small thing.
const WAIT: Duration = Duration::from_secs(30);
/// How long a whole drain may take before the run gives up on it.
const BIG_WAIT: Duration = Duration::from_secs(300);
/// The uplink's `cloud.max_payload` (the default): every batch stays within it.
const MAX_PAYLOAD: usize = 128 * 1024;
/// Records appended per store command while filling the outbox.
const FILL_CHUNK: usize = 1_000;
/// Simulated door units in the disk-bytes runs, one key each.
const UNITS: u8 = 8;
/// How long the daemon is left alone after start-up and after the decisions, before a window.
const SETTLE: Duration = Duration::from_secs(2);

fn topics(gateway: &str) -> Topics {
    Topics::new(DEFAULT_PREFIX, &target(gateway)).expect("topics")
}

/// The daemon's configuration: `[[buses]]` and `[storage]` extras are the caller's.
fn config_text(gateway: &str, url: &str, db: &Path, storage: &str, buses: &str) -> String {
    let trusted = hex(cloud_key().verifying_key().as_bytes());
    format!(
        "[gateway]\nid = \"{gateway}\"\nsite_id = \"{SITE}\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"{url}\"\ntrusted_keys = [\"{trusted}\"]\nkeepalive = \"5s\"\n\
         [storage]\npath = \"{}\"\n{storage}{buses}",
        db.display()
    )
}

/// Writes the configuration next to the store and opens the store as the daemon would.
fn write_config(dir: &Path, text: &str) -> (PathBuf, StoreOptions, Store) {
    let path = dir.join("doorbridge.toml");
    std::fs::write(&path, text).expect("write the daemon's config");
    let config = Config::from_toml_str(text, "bench.toml").expect("bench config");
    let options = doorbridge::store::StoreOptions::from(&config);
    let store = Store::open(options.clone()).expect("open the store");
    (path, options, store)
}

/// A realistic decision record: 8 units, 9 of 10 granted to one of 5,000 keys, 1 of 10 an
/// unknown credential; PIN, QR and mobile in turn.
fn activity(i: u64, start: Timestamp) -> Record {
    let unit = i % 8 + 1;
    let known = !i.is_multiple_of(10);
    let door = format!("door-{unit}");
    Record::Activity(Activity {
        at: start
            .checked_add(jiff::SignedDuration::from_millis(
                i64::try_from(i).unwrap_or(0) * 250,
            ))
            .expect("time"),
        unit: format!("bench/{unit}").into(),
        request_id: Some(u32::try_from(i % 65_536).unwrap_or(0)),
        credential_kind: [
            CredentialKind::Pin,
            CredentialKind::Qr,
            CredentialKind::Mobile,
        ][usize::try_from(i % 3).unwrap_or(0)],
        key_id: known.then(|| format!("k{:07}", i % 5_000).into()),
        category: known.then_some(Category::Renter),
        granted: known,
        reason: (!known).then_some(DenyReason::UnknownCredential),
        released: if known {
            vec![door.clone().into()]
        } else {
            vec![]
        },
        door: door.into(),
        command_id: None,
        issuer: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The cloud's side: a subscriber counting records
// ---------------------------------------------------------------------------------------------

/// What the reference cloud has seen of one gateway so far.
#[derive(Default)]
struct Tally {
    ledger: RecordLedger,
    batches: u64,
    undecodable: u64,
    /// When the gateway's `online` state arrived.
    online: Option<Instant>,
    first: Option<Instant>,
    /// When the last new record arrived.
    last: Option<Instant>,
}

/// A `CloudClient` subscribed to everything under the gateway's topics, and the task that
/// decodes and counts what arrives.
struct Cloud {
    _client: CloudClient,
    tally: Arc<Mutex<Tally>>,
    task: JoinHandle<()>,
}

impl Cloud {
    async fn listen(url: &str, client_id: &str, topics: &Topics) -> Cloud {
        let client = CloudClient::connect(url, client_id)
            .await
            .expect("the cloud connects");
        let records = topics.topic(Channel::Records);
        let filter = format!("{}+", records.strip_suffix("records").expect("…/records"));
        let mut rx = client.subscribe(&filter).await.expect("subscribe");
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (shared, topics) = (Arc::clone(&tally), topics.clone());
        let task = tokio::spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                count(&shared, &topics, &topic, &payload);
            }
        });
        Cloud {
            _client: client,
            tally,
            task,
        }
    }

    fn tally<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&self.tally.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until `n` distinct records arrived; returns when the last of them did.
    async fn until(&self, n: u64, within: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + within;
        loop {
            let (unique, last) = self.tally(|t| (t.ledger.unique(), t.last));
            if unique >= n {
                return Ok(last.expect("records arrived"));
            }
            if Instant::now() > deadline {
                return Err(format!("{unique} of {n} records within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits for the gateway's `online` state.
    async fn online(&self, within: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(at) = self.tally(|t| t.online) {
                return Ok(at);
            }
            if Instant::now() > deadline {
                return Err(format!("the gateway was not online within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn count(tally: &Mutex<Tally>, topics: &Topics, topic: &str, payload: &[u8]) {
    let now = Instant::now();
    match topics.channel_of(topic) {
        Some(Channel::Records) => {
            let batch = Batch::decode(payload);
            let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            match batch {
                Ok(batch) => {
                    t.batches += 1;
                    if !t.ledger.add(&batch).is_empty() {
                        t.first.get_or_insert(now);
                        t.last = Some(now);
                    }
                }
                Err(_) => t.undecodable += 1,
            }
        }
        Some(Channel::State) => {
            if let Ok(Report::State {
                state: Presence::Online,
                ..
            }) = Report::decode(payload)
            {
                let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                t.online.get_or_insert(now);
            }
        }
        _ => {}
    }
}

/// Waits until the outbox at `db` is empty (read on a connection of this process); returns
/// when it was first seen empty, looking every 5 ms.
async fn outbox_empty(db: &Path, within: Duration) -> Result<Instant, String> {
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || {
        let reader = Reader::open(&db).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        loop {
            let any: bool = reader
                .connection()
                .query_row("SELECT EXISTS (SELECT 1 FROM outbox)", [], |r| r.get(0))
                .map_err(|e| e.to_string())?;
            if !any {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                return Err(format!("the outbox was not empty within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

// ---------------------------------------------------------------------------------------------
// P6: outbox drain
// ---------------------------------------------------------------------------------------------

/// The outbox filled for a drain, and the same records as the uplink batches them.
struct Filled {
    _dir: tempfile::TempDir,
    db: PathBuf,
    config: PathBuf,
    options: StoreOptions,
    records: u64,
    /// Bytes of the stored record bodies (CBOR), all records.
    body_bytes: u64,
    batches: Arc<Vec<Vec<u8>>>,
}

/// Fills a fresh store with `n` activity records and builds the batches the uplink will send.
async fn fill(gateway: &str, url: &str, n: u64) -> Filled {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("doorbridge.db");
    let buses = format!(
        "[[buses]]\nport = \"{}\"\n[[buses.units]]\naddress = 1\ndoor = \"door-1\"\n",
        dir.path().join("no-such-tty").display()
    );
    // Room for every record: the drain, not the drop policy, is measured.
    let storage = format!("outbox_max_records = {}\n", 2 * n);
    let text = config_text(gateway, url, &db, &storage, &buses);
    let (config, options, store) = write_config(dir.path(), &text);
    let start = Timestamp::now();
    let mut i = 0;
    while i < n {
        let chunk: Vec<Record> = (i..n.min(i + FILL_CHUNK as u64))
            .map(|j| activity(j, start))
            .collect();
        i += chunk.len() as u64;
        store.append(chunk).await.expect("append records");
    }
    tokio::task::spawn_blocking(move || store.close())
        .await
        .expect("close the store");

    let rows = Reader::open(&db)
        .expect("reader")
        .outbox_raw(RecordClass::Activity, 0, u32::try_from(n).expect("n"))
        .expect("read the outbox back");
    assert_eq!(rows.len() as u64, n, "the outbox holds every record");
    let body_bytes = rows.iter().map(|(_, b)| b.len() as u64).sum();
    // The uplink's own planner, fed as the uplink feeds it: the same batch boundaries and bytes.
    let mut plan = Planner::new(gateway, SITE, MAX_PAYLOAD, WINDOW);
    let per_read = plan.rows_per_read() as usize;
    let mut batches = Vec::new();
    let mut at = 0;
    while at < rows.len() {
        let end = rows.len().min(at + per_read);
        let planned = plan
            .plan(RecordClass::Activity, &rows[at..end], Instant::now())
            .expect("a batch");
        at += planned.records;
        plan.acked(planned.id);
        batches.push(planned.payload);
    }
    Filled {
        _dir: dir,
        db,
        config,
        options,
        records: n,
        body_bytes,
        batches: Arc::new(batches),
    }
}

/// One run of the bare rumqttc publisher.
struct ReferenceRun {
    inflight: u16,
    /// First publish → last record at the subscriber.
    to_received: Duration,
    /// First publish → last `PubAck`.
    to_acked: Duration,
}

/// The same batches from memory through a bare rumqttc client, `inflight` at most in flight.
async fn reference(
    url: &str,
    gateway: &str,
    filled: &Filled,
    inflight: u16,
    tag: &str,
) -> ReferenceRun {
    let topics = topics(gateway);
    let cloud = Cloud::listen(url, &format!("bench-cloud-ref-{tag}"), &topics).await;
    let (host, port) = parse_url(url).expect("broker URL");
    let mut options = MqttOptions::new(format!("bench-ref-{tag}"), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(inflight);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    while !matches!(
        eventloop
            .poll()
            .await
            .expect("the reference publisher connects"),
        Event::Incoming(Packet::ConnAck(_))
    ) {}
    let topic = topics.topic(Channel::Records);
    let batches = Arc::clone(&filled.batches);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for batch in batches.iter() {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, batch.clone())
                .await
                .expect("queue a publish");
        }
        client
    });
    let mut acked = 0;
    while acked < filled.batches.len() {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop
            .poll()
            .await
            .expect("the reference publisher's link")
        {
            acked += 1;
        }
    }
    let to_acked = started.elapsed();
    let last = cloud
        .until(filled.records, BIG_WAIT)
        .await
        .expect("every record of the reference arrives");
    let client = sender.await.expect("sender");
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    ReferenceRun {
        inflight,
        to_received: last - started,
        to_acked,
    }
}

/// The gateway's drain of a filled outbox.
struct GatewayRun {
    /// Link up (`online`) → last record at the subscriber.
    to_received: Duration,
    /// Link up → the outbox empty.
    to_empty: Duration,
    /// The process start → link up (store open with its integrity check, connect).
    start_up: Duration,
    batches: u64,
    duplicates: u64,
    /// The daemon's CPU time over its whole life, and its store writer's and tokio threads'.
    cpu: Duration,
    writer_cpu: Duration,
    workers_cpu: Duration,
}

async fn gateway(url: &str, gateway: &str, filled: &Filled) -> Result<GatewayRun, String> {
    let topics = topics(gateway);
    let cloud = Cloud::listen(url, &format!("bench-cloud-{gateway}"), &topics).await;
    let spawned = Instant::now();
    let mut daemon = Daemon::start(&filled.config, "warn", None);
    let result = async {
        let online = cloud.online(WAIT).await?;
        let last = cloud.until(filled.records, BIG_WAIT).await?;
        let empty = outbox_empty(&filled.db, WAIT).await?;
        Ok::<_, String>((online, last, empty))
    }
    .await;
    let (online, last, empty) = match result {
        Ok(times) => times,
        Err(e) => return Err(format!("{e}; the daemon's log:\n{}", daemon.tail())),
    };
    let cpu = daemon.cpu();
    let (_, writer_cpu) = daemon.threads("store-writer");
    let (_, workers_cpu) = daemon.threads("tokio-");
    daemon.stop();
    let (batches, duplicates) = cloud.tally(|t| (t.batches, t.ledger.duplicates()));
    Ok(GatewayRun {
        to_received: last - online,
        to_empty: empty - online,
        start_up: online - spawned,
        batches,
        duplicates,
        cpu,
        writer_cpu,
        workers_cpu,
    })
}

/// The store alone, on a store filled the same way, without the network: the uplink's own
/// reads and deletes, to show what bounds the drain.
struct StoreAlone {
    records: u64,
    /// Every row read as the uplink reads it: one batch's worth of rows (`rows_per_read`) from
    /// the cursor, one batch planned from them, the cursor moved past that batch.
    read: Duration,
    /// `Store::ack` of each batch's records in turn, one commit each (acks arriving one by
    /// one), over the first half of the batches …
    ack_each: (u64, Duration),
    /// … and of `WINDOW` batches' records a call (a window of acks arriving together), over
    /// the second half.
    ack_window: (u64, Duration),
}

async fn store_alone(n: u64) -> StoreAlone {
    let gw = "gw-store";
    let filled = fill(gw, "mqtt://127.0.0.1:1", n).await;
    let db = filled.db.clone();
    let (read, seqs) = tokio::task::spawn_blocking(move || {
        let reader = Reader::open(&db).expect("reader");
        let mut plan = Planner::new(gw, SITE, MAX_PAYLOAD, WINDOW);
        let started = Instant::now();
        let mut cursor = 0;
        let mut seqs: Vec<Vec<i64>> = Vec::new();
        loop {
            let rows = reader
                .outbox_raw(RecordClass::Activity, cursor, plan.rows_per_read())
                .expect("read the outbox");
            let Some(planned) = plan.plan(RecordClass::Activity, &rows, Instant::now()) else {
                break;
            };
            let batch: Vec<i64> = rows[..planned.records].iter().map(|r| r.0).collect();
            cursor = *batch.last().expect("a batch has records");
            plan.acked(planned.id);
            seqs.push(batch);
        }
        (started.elapsed(), seqs)
    })
    .await
    .expect("the read pass");
    let store = Store::open(filled.options.clone()).expect("open the store");
    let (each, window) = seqs.split_at(seqs.len() / 2);
    let ack = async |groups: Vec<Vec<i64>>| {
        let records = groups.iter().map(|g| g.len() as u64).sum();
        let started = Instant::now();
        for group in groups {
            store.ack(group).await.expect("ack");
        }
        (records, started.elapsed())
    };
    let ack_each = ack(each.to_vec()).await;
    let ack_window = ack(window.chunks(WINDOW).map(<[Vec<i64>]>::concat).collect()).await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .expect("close the store");
    StoreAlone {
        records: n,
        read,
        ack_each,
        ack_window,
    }
}

/// P6 through one broker.
struct Drain {
    broker: String,
    records: u64,
    body_bytes: u64,
    batches: usize,
    payload_bytes: u64,
    /// 8 in flight before the gateway's run, 100 in flight, 8 in flight after it.
    references: [ReferenceRun; 3],
    gateway: Result<GatewayRun, String>,
}

async fn drain(url: &str, broker: &str, tag: &str, n: u64) -> Drain {
    let gw = format!("gw-drain-{tag}");
    let filled = fill(&gw, url, n).await;
    let window = u16::try_from(WINDOW).expect("window");
    let before = reference(url, &gw, &filled, window, &format!("{tag}-8a")).await;
    let wide = reference(url, &gw, &filled, 100, &format!("{tag}-100")).await;
    let run = gateway(url, &gw, &filled).await;
    let after = reference(url, &gw, &filled, window, &format!("{tag}-8b")).await;
    Drain {
        broker: broker.to_owned(),
        records: n,
        body_bytes: filled.body_bytes,
        batches: filled.batches.len(),
        payload_bytes: filled.batches.iter().map(|b| b.len() as u64).sum(),
        references: [before, wide, after],
        gateway: run,
    }
}

// ---------------------------------------------------------------------------------------------
// Disk bytes per decision and per idle hour
// ---------------------------------------------------------------------------------------------

fn unit_key(n: u8) -> Key {
    key(
        format!("k{n}"),
        &format!("door-{n}"),
        CredentialKind::Qr,
        format!("qr-{n:02}").as_bytes(),
    )
}

/// What one window cost: the process's counters, its store writer's, and its log.
#[derive(Clone, Copy, Default)]
struct Cost {
    process: Io,
    writer: Io,
    log: u64,
}

impl Cost {
    fn of(daemon: &Daemon) -> Cost {
        Cost {
            process: daemon.io(),
            writer: daemon.threads("store-writer").0,
            log: daemon.log_bytes(),
        }
    }

    fn since(self, before: Cost) -> Cost {
        Cost {
            process: self.process.since(before.process),
            writer: self.writer.since(before.writer),
            log: self.log.saturating_sub(before.log),
        }
    }

    /// Scaled by `factor` (per 1,000 decisions, per hour).
    fn scaled(self, factor: f64) -> [f64; 5] {
        [
            self.process.write_bytes as f64 * factor,
            self.process.wchar as f64 * factor,
            self.writer.wchar as f64 * factor,
            self.log as f64 * factor,
            self.process.cancelled_write_bytes as f64 * factor,
        ]
    }
}

struct BytesRun {
    /// The broker, or `None`: nothing listening at the configured URL.
    broker: Option<String>,
    /// Units presenting at once (each decision alone in its commit when 1).
    presenting: u8,
    decisions: usize,
    granted: usize,
    deciding: Duration,
    decisions_cost: Cost,
    /// Records and batches the cloud received in the decisions window (with a broker).
    uploaded: (u64, u64),
    idle: Duration,
    idle_cost: Cost,
    /// The records' own CBOR bytes per decision.
    record_bytes: u64,
}

/// The simulated door units on a pty linked at `link`, run in this process.
struct Units {
    commands: mpsc::Sender<SimCommand>,
    outputs: mpsc::Receiver<Output>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<SimUnits>>,
}

impl Units {
    fn start(link: &Path) -> Units {
        let (master, _) = doorbridge_sim::linked_pty(link).expect("a linked pty");
        let addresses: Vec<Address> = (1..=UNITS).filter_map(Address::unit).collect();
        let units = SimUnits::new(&addresses, SimConfig::default()).expect("sim");
        let (commands, command_rx) = mpsc::channel(256);
        let (output_tx, outputs) = mpsc::channel(4096);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_sim(
            HangupTolerant::new(master, Duration::from_millis(2)),
            units,
            command_rx,
            output_tx,
            async {
                let _ = stopped.await;
            },
        ));
        Units {
            commands,
            outputs,
            stop,
            task,
        }
    }

    /// Waits until every unit's start-up status was acknowledged.
    async fn ready(&mut self, daemon: &Daemon) {
        let mut ready = 0;
        while ready < UNITS {
            match tokio::time::timeout(WAIT, self.outputs.recv()).await {
                Ok(Some(Output::Acked {
                    report: ReportKind::Status,
                    ..
                })) => ready += 1,
                Ok(Some(_)) => {}
                _ => panic!(
                    "the units' status was not acknowledged; the daemon's log:\n{}",
                    daemon.tail()
                ),
            }
        }
    }

    /// `n` decisions, each of the first `presenting` units keeping one credential presented
    /// (1 in 10 unknown); returns how many were granted.
    async fn decide(&mut self, n: usize, presenting: u8, daemon: &Daemon) -> usize {
        let verify = |unit: u8, i: usize| SimCommand::Verify {
            unit: Address::unit(unit).expect("addr"),
            kind: CredentialKind::Qr,
            value: if i % 10 == 9 {
                format!("qr-unknown-{i}").into_bytes()
            } else {
                format!("qr-{unit:02}").into_bytes()
            },
            reader: 0,
        };
        let mut presented = 0;
        for unit in 1..=presenting.min(UNITS) {
            self.commands
                .send(verify(unit, presented))
                .await
                .expect("sim");
            presented += 1;
        }
        let (mut decided, mut granted) = (0, 0);
        while decided < n {
            match tokio::time::timeout(WAIT, self.outputs.recv()).await {
                Ok(Some(Output::Decision { unit, answer, .. })) => {
                    decided += 1;
                    granted += usize::from(matches!(answer, Answer::Grant(_)));
                    if presented < n {
                        self.commands
                            .send(verify(unit.get(), presented))
                            .await
                            .expect("sim");
                        presented += 1;
                    }
                }
                Ok(Some(_)) => {}
                _ => panic!(
                    "no decision within {WAIT:?}; the daemon's log:\n{}",
                    daemon.tail()
                ),
            }
        }
        granted
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A fresh store holding one unlimited QR key per unit, and the daemon's configuration for
/// `UNITS` units on the pty at `link`, polled every 10 ms.
async fn bytes_setup(dir: &Path, gateway: &str, url: &str, link: &Path) -> PathBuf {
    let mut buses = format!(
        "[[buses]]\nname = \"bench\"\nport = \"{}\"\nresponse_timeout = \"50ms\"\n\
         poll_interval = \"10ms\"\n",
        link.display()
    );
    for n in 1..=UNITS {
        let _ = write!(
            buses,
            "[[buses.units]]\naddress = {n}\ndoor = \"door-{n}\"\n"
        );
    }
    let text = config_text(gateway, url, &dir.join("doorbridge.db"), "", &buses);
    let (config, _, store) = write_config(dir, &text);
    store
        .install_key_set(
            KeySetHeader {
                version: 1,
                salt: SALT.to_vec(),
                issued_at: Some(Timestamp::now()),
                stale_after: doorbridge::access::StaleLimits::default(),
            },
            (1..=UNITS).map(unit_key).collect(),
        )
        .await
        .expect("install the key set");
    tokio::task::spawn_blocking(move || store.close())
        .await
        .expect("close the store");
    config
}

/// The daemon with `UNITS` simulated units: `decisions` decisions, then `idle` without events.
async fn bytes_run(
    broker: Option<(&str, &str)>,
    presenting: u8,
    decisions: usize,
    idle: Duration,
) -> BytesRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("doorbridge.db");
    let link = dir.path().join("ttyBENCH");
    let gw = format!("gw-bytes-{}", if broker.is_some() { "up" } else { "down" });
    // Without a broker: a port nothing listens on (the link keeps trying, backing off).
    let url = broker.map_or_else(
        || format!("mqtt://127.0.0.1:{}", free_port()),
        |(_, url)| url.to_owned(),
    );
    let config = bytes_setup(dir.path(), &gw, &url, &link).await;
    let mut units = Units::start(&link);
    let cloud = match broker {
        Some((_, url)) => {
            Some(Cloud::listen(url, &format!("bench-cloud-{gw}"), &topics(&gw)).await)
        }
        None => None,
    };
    let mut daemon = Daemon::start(&config, "warn", None);
    units.ready(&daemon).await;
    // Start-up is over once the link is up and whatever start-up recorded has left.
    if let Some(cloud) = &cloud {
        cloud.online(WAIT).await.expect("online");
        outbox_empty(&db, WAIT)
            .await
            .expect("the start-up records uploaded");
    }
    tokio::time::sleep(SETTLE).await;
    let uploaded = || {
        cloud
            .as_ref()
            .map_or((0, 0), |c| c.tally(|t| (t.ledger.unique(), t.batches)))
    };
    let uploaded_before = uploaded();

    let before = Cost::of(&daemon);
    let started = Instant::now();
    let granted = units.decide(decisions, presenting, &daemon).await;
    let deciding = started.elapsed();
    // With the link up the window takes in the uploads and the marking of acknowledged rows;
    // and the WAL checkpoint the writer runs 250 ms after its last commit.
    if cloud.is_some() {
        outbox_empty(&db, WAIT)
            .await
            .expect("every record uploaded");
    }
    tokio::time::sleep(SETTLE).await;
    let decisions_cost = Cost::of(&daemon).since(before);
    let uploaded = (
        uploaded().0 - uploaded_before.0,
        uploaded().1 - uploaded_before.1,
    );

    tokio::time::sleep(SETTLE).await;
    let before = Cost::of(&daemon);
    let idle_started = Instant::now();
    tokio::time::sleep(idle).await;
    let idle_cost = Cost::of(&daemon).since(before);
    let idle = idle_started.elapsed();
    daemon.stop();
    units.stop().await;
    drop(cloud);

    let now = Timestamp::now();
    let record_bytes = (0..1_000u64)
        .map(|i| activity(i, now).to_cbor().len() as u64)
        .sum::<u64>()
        / 1_000;
    BytesRun {
        broker: broker.map(|(name, _)| name.to_owned()),
        presenting,
        decisions,
        granted,
        deciding,
        decisions_cost,
        uploaded,
        idle,
        idle_cost,
        record_bytes,
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// One row of the drain table: what is timed, the gateway's time and the reference's three
/// (8 in flight before the gateway, 100 in flight, 8 in flight after).
struct Timed {
    until: &'static str,
    gateway: Result<Duration, String>,
    references: [Duration; 3],
    /// Whether the targets apply to this row.
    target: bool,
}

/// Two rows per broker: to the publisher's end (the gateway's outbox empty, the reference's
/// last `PubAck`), where the targets apply, and end to end (the last record at the cloud).
fn drain_table(drains: &[Drain]) -> String {
    let mut table = String::from(
        "| broker, records | timed until | gateway | gateway records/s | reference, 8 in flight: before / after the gateway | reference records/s (their mean) | ratio (target ≥ 50 %) | ≥ 20,000 records/s | reference, 100 in flight |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for d in drains {
        let rows = [
            Timed {
                until: "publisher done: the gateway's outbox empty, the reference's last `PubAck`",
                gateway: d.gateway.as_ref().map(|g| g.to_empty).map_err(Clone::clone),
                references: d.references.each_ref().map(|r| r.to_acked),
                target: true,
            },
            Timed {
                until: "end to end: the last record at the cloud",
                gateway: d
                    .gateway
                    .as_ref()
                    .map(|g| g.to_received)
                    .map_err(Clone::clone),
                references: d.references.each_ref().map(|r| r.to_received),
                target: false,
            },
        ];
        for row in rows {
            let [before, wide, after] = row.references;
            let reference =
                f64::midpoint(per_second(d.records, before), per_second(d.records, after));
            let met = |ok: bool| if ok { " (met)" } else { " (missed)" };
            let (time, gateway_rate, ratio, floor) = match row.gateway {
                Ok(t) => {
                    let r = per_second(d.records, t);
                    (
                        secs(t),
                        format!("{}/s", rate(r)),
                        format!(
                            "{:.0} %{}",
                            100.0 * r / reference,
                            if row.target {
                                met(r >= 0.5 * reference)
                            } else {
                                ""
                            }
                        ),
                        match (row.target, r >= 20_000.0) {
                            (false, _) => "—",
                            (true, true) => "met",
                            (true, false) => "missed",
                        },
                    )
                }
                Err(e) => (format!("failed: {e}"), "—".into(), "—".into(), "—"),
            };
            let _ = writeln!(
                table,
                "| {}, {} | {} | {time} | {gateway_rate} | {} / {} | {}/s | {ratio} | {floor} | {} ({}/s) |",
                d.broker,
                thousands(d.records),
                row.until,
                secs(before),
                secs(after),
                rate(reference),
                secs(wide),
                rate(per_second(d.records, wide)),
            );
        }
    }
    table
}

fn drain_notes(drains: &[Drain]) -> String {
    let mut notes = String::new();
    for d in drains {
        let [before, wide, after] = &d.references;
        let _ = write!(
            notes,
            "- {}: {} batches, {} of payload ({} bytes a batch on average, {:.0} bytes a record \
             of which {:.0} the stored CBOR body). Reference to the last `PubAck`: {} / {} / {} \
             ({}, {}, {} in flight).",
            d.broker,
            thousands(d.batches as u64),
            support::mib(d.payload_bytes),
            thousands(d.payload_bytes / d.batches.max(1) as u64),
            d.payload_bytes as f64 / d.records as f64,
            d.body_bytes as f64 / d.records as f64,
            secs(before.to_acked),
            secs(wide.to_acked),
            secs(after.to_acked),
            before.inflight,
            wide.inflight,
            after.inflight,
        );
        if let Ok(g) = &d.gateway {
            let _ = write!(
                notes,
                " Gateway: start-up to link up {}; {} batches received, {} duplicate records; \
                 daemon CPU {} over its life (store writer {}, tokio threads {}) for {} of \
                 drain.",
                secs(g.start_up),
                thousands(g.batches),
                thousands(g.duplicates),
                secs(g.cpu),
                secs(g.writer_cpu),
                secs(g.workers_cpu),
                secs(g.to_empty),
            );
        }
        notes.push('\n');
    }
    notes
}

fn store_table(s: &StoreAlone) -> String {
    let mut table = format!(
        "| the store alone, no network, {} records | time | records/s |\n| --- | --- | --- |\n",
        thousands(s.records)
    );
    let rows = [
        (
            "read as the uplink reads: one batch's worth of rows from the cursor, one batch planned"
                .to_owned(),
            s.records,
            s.read,
        ),
        (
            format!(
                "`Store::ack`, one batch a commit (acks arriving one by one), {} records",
                thousands(s.ack_each.0)
            ),
            s.ack_each.0,
            s.ack_each.1,
        ),
        (
            format!(
                "`Store::ack`, {WINDOW} batches a commit (a window of acks together), {} records",
                thousands(s.ack_window.0)
            ),
            s.ack_window.0,
            s.ack_window.1,
        ),
    ];
    for (what, n, time) in rows {
        let _ = writeln!(
            table,
            "| {what} | {} | {}/s |",
            secs(time),
            rate(per_second(n, time))
        );
    }
    table
}

fn bytes(v: f64) -> String {
    if v >= 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / (1024.0 * 1024.0))
    } else if v >= 10.0 * 1024.0 {
        format!("{:.0} KiB", v / 1024.0)
    } else {
        format!("{v:.0} B")
    }
}

fn bytes_table(runs: &[BytesRun]) -> String {
    let mut table = String::from("| figure |");
    let mut rule = String::from("| --- |");
    for r in runs {
        let _ = write!(
            table,
            " {}; {} |",
            r.broker.as_ref().map_or_else(
                || "no broker (records stay in the outbox)".to_owned(),
                |b| format!("link up, {b} (uploads and acks included)")
            ),
            if r.presenting == 1 {
                "one unit presenting alone".to_owned()
            } else {
                format!("{} units presenting at once", r.presenting)
            }
        );
        rule.push_str(" --- |");
    }
    table.push_str(" reference |\n");
    rule.push_str(" --- |\n");
    table.push_str(&rule);
    let per_decisions: Vec<[f64; 5]> = runs
        .iter()
        .map(|r| r.decisions_cost.scaled(1_000.0 / r.decisions as f64))
        .collect();
    let per_hour: Vec<[f64; 5]> = runs
        .iter()
        .map(|r| r.idle_cost.scaled(3_600.0 / r.idle.as_secs_f64()))
        .collect();
    let record = runs.first().map_or(0, |r| r.record_bytes);
    let rows: [(&str, &[[f64; 5]], usize, String); 8] = [
        (
            "`write_bytes` per 1,000 decisions (page cache dirtied: what goes to the disk)",
            &per_decisions,
            0,
            format!(
                "the 1,000 activity records' own CBOR: {}; the floor, one 4 KiB block per \
                 durable commit, a unit presenting alone: {} (P9 target: 6,000 KiB)",
                bytes(record as f64 * 1_000.0),
                bytes(4_096.0 * 1_000.0)
            ),
        ),
        (
            "`cancelled_write_bytes` per 1,000 decisions",
            &per_decisions,
            4,
            "—".into(),
        ),
        (
            "`wchar` per 1,000 decisions (all `write` calls: SQLite, the pty, the log)",
            &per_decisions,
            1,
            "—".into(),
        ),
        (
            "… of which the `store-writer` thread (SQLite's writes)",
            &per_decisions,
            2,
            "—".into(),
        ),
        (
            "… of which the log (stderr, `warn`)",
            &per_decisions,
            3,
            "—".into(),
        ),
        (
            "`write_bytes` per idle hour (extrapolated)",
            &per_hour,
            0,
            "P7 target: 0".into(),
        ),
        (
            "`wchar` per idle hour (extrapolated; bus frames to the pty, runtime wake-ups)",
            &per_hour,
            1,
            "—".into(),
        ),
        (
            "… of which the `store-writer` thread (extrapolated)",
            &per_hour,
            2,
            "polls write nothing: 0".into(),
        ),
    ];
    for (name, values, i, reference) in rows {
        let _ = write!(table, "| {name} |");
        for v in values {
            let _ = write!(table, " {} |", bytes(v[i]));
        }
        let _ = writeln!(table, " {reference} |");
    }
    table
}

fn bytes_notes(runs: &[BytesRun]) -> String {
    let mut notes = String::new();
    for r in runs {
        let _ = writeln!(
            notes,
            "- {}: {} decisions ({} granted) in {} ({:.0}/s); {} records in {} batches reached \
             the cloud in the window; idle window {} (log {} in it).",
            r.broker
                .as_ref()
                .map_or_else(|| "no broker".to_owned(), |b| format!("link up, {b}")),
            thousands(r.decisions as u64),
            thousands(r.granted as u64),
            secs(r.deciding),
            r.decisions as f64 / r.deciding.as_secs_f64(),
            thousands(r.uploaded.0),
            thousands(r.uploaded.1),
            secs(r.idle),
            bytes(r.idle_cost.log as f64),
        );
    }
    notes
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (records, decisions, idle): (u64, usize, Duration) = if quick {
        (10_000, 200, Duration::from_secs(10))
    } else {
        (100_000, 1_000, Duration::from_secs(60))
    };
    let rt = support::runtime();

    // The stores are made under the system's temporary directory: the fsync reference too.
    let probe = tempfile::tempdir().expect("tempdir");
    let mut conditions = support::Conditions::start(probe.path());
    let mosquitto = Mosquitto::start();
    let rumqttd = start_rumqttd();
    let mut brokers: Vec<(String, String, &str)> = Vec::new();
    if let Some(m) = &mosquitto {
        brokers.push((Mosquitto::version(), m.url(), "m"));
    }
    brokers.push(("rumqttd 0.20 (in process)".to_owned(), rumqttd.clone(), "r"));

    let drains: Vec<Drain> = brokers
        .iter()
        .map(|(name, url, tag)| {
            let d = rt.block_on(drain(url, name, tag, records));
            println!("{}", drain_table(std::slice::from_ref(&d)));
            d
        })
        .collect();
    let alone = rt.block_on(store_alone(records));
    println!("{}", store_table(&alone));
    let p6 = format!(
        "{}\n{}\n{}",
        drain_table(&drains),
        drain_notes(&drains),
        store_table(&alone)
    );

    let (connected_name, connected_url) = brokers
        .first()
        .map(|(name, url, _)| (name.clone(), url.clone()))
        .expect("a broker");
    let byte_runs = disk_runs(&rt, &connected_name, &connected_url, decisions, idle);
    let disk = format!("{}\n{}", bytes_table(&byte_runs), bytes_notes(&byte_runs));
    println!("{disk}");

    conditions.finish();
    let section = format!(
        "<!-- bench:uplink -->\n### Uplink: outbox drain and disk bytes (`cargo bench --bench uplink`)\n\n\
         Measured {when} on {machine}{quick}. {conditions}\n\n\
         **P6 outbox drain.** A fresh store filled with {n} activity records (8 doors, 9 of 10 \
         granted, PIN, QR and mobile in turn), then the real `doorbridge run` binary (bench \
         profile) as a child, its bus on a serial port that does not exist, `cloud.max_payload` \
         128 KiB, {window} batches in flight. A reference cloud (`CloudClient`) subscribed to \
         the gateway's topics decodes every batch and counts the records (`RecordLedger`). The \
         gateway is timed from its `online` state (link up, the uplink starts) until every \
         record arrived and until its outbox is empty (acknowledged rows deleted). Reference: a bare rumqttc `QoS` 1 publisher sends the same \
         batches (the same bytes, built by the uplink's `Planner` from the rows read back from \
         that store) from memory, {window} in flight (once before and once after the gateway's \
         run; the target compares with their mean) and 100 in flight (rumqttc's default), timed \
         from its first publish until its last `PubAck` and until the same subscriber has every \
         record. The targets apply to the first row of each broker: the gateway's drain is done \
         when its outbox is empty, as the publisher's when its last publish is acknowledged. \
         mosquitto runs without persistence and with `set_tcp_nodelay true`; rumqttd leaves \
         Nagle's algorithm on. Last, the store alone on a third store filled the same way (no \
         daemon, no network): the uplink's reads, and `Store::ack` of the same batches, the \
         bounds of the drain.\n\n{p6}\n\
         **Disk bytes.** The daemon (a child, so `/proc/<pid>/io` is its own) with {units} \
         simulated units on a pty (`doorbridge_sim` in the bench process), polled every 10 ms, \
         one unlimited QR key per unit. {decisions} decisions (1 in 10 an unknown credential): \
         first with one unit presenting alone, so each decision is a commit of its own, then \
         with every unit keeping one credential presented, so decisions share commits. The \
         window starts {settle} s after start-up and ends {settle} s after the last decision \
         (with the link up: after the outbox is empty again), so the records' upload, the \
         marking of acknowledged rows and the WAL checkpoint are in it; the history's hourly \
         pruning is not (it deletes whole pages of old records in bulk). Then an idle window \
         of {idle} s (units polled, no events), extrapolated to an hour. `write_bytes` is \
         charged to the task that dirties a page-cache page, when it turns dirty, in whole \
         4 KiB pages (a page dirtied again before writeback counts once), so delayed writeback \
         does not hide anything from it; it leaves out the file system's journal, and it \
         includes pages dirtied through `mmap` (SQLite's WAL index, `-shm`), which `write` never \
         sees. `wchar` counts every byte handed to `write`: SQLite's file writes, but also the \
         bus frames to the pty, the log lines (stderr, here at `warn`) and the async runtime's \
         8-byte wake-ups (eventfd); the `store-writer` thread's own `wchar` \
         (`/proc/<pid>/task/<tid>/io`) is SQLite's share. `write_bytes` exceeds SQLite's \
         `wchar` because each WAL frame (24 + 1,024 bytes at the 1 KiB pages of a new \
         database) straddles 4 KiB pages of the file and the page the previous commit left \
         half-written is written again, and each commit dirties the WAL index too.\n\n{disk}\n\
         <!-- /bench:uplink -->",
        when = support::now(),
        machine = machine(),
        quick = if quick { " (--quick)" } else { "" },
        conditions = conditions.describe(),
        n = thousands(records),
        window = WINDOW,
        units = UNITS,
        decisions = thousands(decisions as u64),
        settle = SETTLE.as_secs(),
        idle = idle.as_secs(),
    );
    support::write_section("uplink", &section);

    summarize(quick, &drains, conditions.run_load());
    summarize_p9(quick, &byte_runs, conditions.run_load());
}

/// P9's row of the summary table: `write_bytes` per decision over its record's life, for each
/// disk run, the first (a unit presenting alone) against the target.
fn summarize_p9(quick: bool, runs: &[BytesRun], load: support::RunLoad) {
    let per_decision = |r: &BytesRun| r.decisions_cost.scaled(1.0 / r.decisions as f64)[0];
    let measured: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{}, {}: {:.2} KiB ({:.0} KiB per 1,000)",
                r.broker
                    .as_ref()
                    .map_or_else(|| "no broker".to_owned(), |b| format!("link up ({b})")),
                if r.presenting == 1 {
                    "a unit presenting alone".to_owned()
                } else {
                    format!("{} units at once", r.presenting)
                },
                per_decision(r) / 1024.0,
                per_decision(r) * 1000.0 / 1024.0
            )
        })
        .collect();
    let alone = runs.first().map_or(f64::INFINITY, per_decision);
    let record = runs.first().map_or(0, |r| r.record_bytes);
    support::write_summary(&[support::Summary {
        id: "P9",
        figure: "bytes written to the disk per decision over its record's life (commit, upload, \
                 mark, checkpoint), `write_bytes`",
        measured: measured.join("; "),
        reference: format!(
            "the record's own CBOR: {record} B; the floor, one 4 KiB block per durable commit: \
             4.0 KiB"
        ),
        target: "≤ 6 KiB, a unit presenting alone",
        met: alone <= 6.0 * 1024.0,
        bench: "uplink",
        quick,
        load,
    }]);
}

/// The disk-bytes runs: link up with one unit presenting alone and with every unit at once,
/// then no broker.
fn disk_runs(
    rt: &tokio::runtime::Runtime,
    name: &str,
    url: &str,
    decisions: usize,
    idle: Duration,
) -> Vec<BytesRun> {
    vec![
        rt.block_on(bytes_run(Some((name, url)), 1, decisions, idle)),
        rt.block_on(bytes_run(Some((name, url)), UNITS, decisions, idle)),
        rt.block_on(bytes_run(None, UNITS, decisions, idle)),
    ]
}

/// P6's row of the summary table at the top of `docs/performance.md`.
fn summarize(quick: bool, drains: &[Drain], load: support::RunLoad) {
    let mut measured = Vec::new();
    let mut references = Vec::new();
    let mut met = !drains.is_empty();
    for d in drains {
        let [before, _, after] = &d.references;
        let reference = f64::midpoint(
            per_second(d.records, before.to_acked),
            per_second(d.records, after.to_acked),
        );
        references.push(format!("{}/s ({})", rate(reference), d.broker));
        match &d.gateway {
            Ok(g) => {
                let r = per_second(d.records, g.to_empty);
                met &= r >= 0.5 * reference && r >= 20_000.0;
                measured.push(format!(
                    "{}/s, {:.0} % ({})",
                    rate(r),
                    100.0 * r / reference,
                    d.broker
                ));
            }
            Err(e) => {
                met = false;
                measured.push(format!("failed: {e} ({})", d.broker));
            }
        }
    }
    support::write_summary(&[support::Summary {
        id: "P6",
        figure: "outbox drain, records/s, until the outbox is empty",
        measured: measured.join("; "),
        reference: format!(
            "the same batches from memory by a bare rumqttc `QoS` 1 publisher, to its last `PubAck`: {}",
            references.join("; ")
        ),
        target: "≥ 50 % of its rate and ≥ 20,000 records/s",
        met,
        bench: "uplink",
        quick,
        load,
    }]);
}
