//! The gateway on a clustered broker (issue 14 §6): the real `doorbridge run` binary against a
//! 3-node NATS cluster with `JetStream` and MQTT ([`NatsCluster`]), a simulated door unit on a pty
//! deciding a steady stream of PINs, and the cloud on other nodes of the cluster.
//!
//! The cloud's side is two clients: [`Cloud`] (signs and publishes key sets, hears `state` and
//! `sync` only) and [`Records`], the record consumer a cloud must run (`docs/cloud-protocol.md`
//! §12.4): a persistent session (clean session off, a fixed client id) subscribed to `records`
//! at `QoS` 1, deduplicating by `(gateway, epoch, seq)`. Both connect to nodes the tests do not
//! kill.
//!
//! What NATS 2.9.10 does here, and these tests allow for (all in `docs/cloud-protocol.md` §10):
//! - while a stream elects a new leader after a node's death (up to about 9 s here), NATS
//!   answers a `QoS` 1 publish or a session's CONNECT by closing the connection after 4 s: the
//!   gateway moves on to the next node, the cloud's publisher tries again
//!   ([`publish_until_acknowledged`]), and a report the gateway published then may be lost
//!   (its next `online` state carries the held version);
//! - with two subscriptions matching one message, one of them now and then never gets it: with
//!   the key-set client also on the gateway's `+`, one subscriber or the other missed 1 or 2 of
//!   about 500 records in 5 of 14 runs (messages the broker had acknowledged and counts as
//!   delivered); with the record consumer alone on `records`, none in 14 runs.
//!
//! Every wait is for a condition, with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::CredentialKind;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::Channel;
use doorbridge::cloud::uplink::{Batch, Uploaded};
use doorbridge::store::Record;
use doorbridge_sim::cloud::CloudClient;
use doorbridge_sim::{Output, SimCommand, SimConfig};
use jiff::Timestamp;
use rumqttc::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{Mqtt, options, wait_for};
use crate::bus::{Sim, unit};
use crate::gateway::{Cloud, Daemon, Home, WAIT, keys};
use crate::util::doorbridge;

use doorbridge_testkit::nats::{self as cluster, NatsCluster};

/// Keys in the gateway's key set; the door unit presents their PINs in turn.
const KEYS: usize = 20;
/// How often the door unit presents a PIN: 40 decisions a second, each one a record.
const PACE: Duration = Duration::from_millis(25);
/// A record counts as delayed when it reaches the cloud this long after it was made (on a
/// healthy cluster it takes tens of milliseconds).
const DELAYED: Duration = Duration::from_secs(1);
/// What the cloud's key-set client hears: reports, not records. The record consumer must be the
/// only subscriber on `records`: with two subscriptions matching a message, NATS 2.9.10 now
/// and then never delivers it to one of them (see `docs/cloud-protocol.md` §10).
const REPORTS: &[Channel] = &[Channel::State, Channel::Sync];
/// Records that flow between two steps of the failover test: about 1.5 s of decisions.
const STEADY: u64 = 60;

/// A NATS cluster of `n` nodes for `test`; fails, saying how to install it, without
/// `nats-server`.
fn cluster_for(test: &str, n: usize) -> NatsCluster {
    NatsCluster::start(n).unwrap_or_else(|| panic!("{test}: {}", cluster::MISSING))
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A gateway `gw-nats` whose `cloud.url` lists `urls` (one URL: a string) and whose one bus is
/// a pty linked at the returned path (unit 1, door `main`).
fn nats_home(urls: &[String]) -> (Home, PathBuf) {
    let target = Target {
        site: "site-nats".into(),
        gateway: "gw-nats".into(),
    };
    let home = Home::new(&urls[0], target, &[]);
    if urls.len() > 1 {
        home.set_brokers(urls);
    }
    // Home's bus port does not exist; this one is the simulated unit's pty.
    let link = home.door_bus_on_pty();
    (home, link)
}

/// Every node's MQTT URL, in order.
fn every_node(nats: &NatsCluster) -> Vec<String> {
    (0..nats.size()).map(|i| nats.mqtt_url(i)).collect()
}

/// The broker `doorbridge status` says the gateway is connected to (`host:port`), if connected.
fn status_broker(home: &Home) -> Option<String> {
    let out = doorbridge()
        .arg("--config")
        .arg(&home.config)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run doorbridge status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (status["cloud"]["connected"] == true)
        .then(|| status["cloud"]["broker"].as_str().map(str::to_owned))
        .flatten()
}

// ---------------------------------------------------------------------------------------------
// The door
// ---------------------------------------------------------------------------------------------

/// What the door unit saw of the gateway's decisions.
#[derive(Debug, Default)]
struct Decisions {
    granted: AtomicU64,
    /// Denied, or no answer in time: a door that did not open.
    refused: AtomicU64,
}

/// A simulated door unit (address 1) on a pty at `link`, presenting the PINs of the key set
/// one after the other every [`PACE`] once [`Door::stream`] is called, until [`Door::stop`].
struct Door {
    commands: mpsc::Sender<SimCommand>,
    outputs: Option<mpsc::Receiver<Output>>,
    stop_sim: Option<oneshot::Sender<()>>,
    sim: Option<JoinHandle<()>>,
    decisions: Arc<Decisions>,
    streaming: Arc<AtomicBool>,
    stream: Option<JoinHandle<()>>,
}

impl Door {
    fn start(link: &Path) -> Door {
        let Sim {
            commands,
            outputs,
            stop: stop_sim,
            task: sim,
        } = Sim::start(link, &[unit(1)], SimConfig::default());
        Door {
            commands,
            outputs: Some(outputs),
            stop_sim: Some(stop_sim),
            sim: Some(sim),
            decisions: Arc::default(),
            streaming: Arc::new(AtomicBool::new(true)),
            stream: None,
        }
    }

    /// Starts presenting PINs: one, wait for its decision, the next at the next tick.
    fn stream(&mut self) {
        let mut outputs = self.outputs.take().expect("one stream");
        let commands = self.commands.clone();
        let decisions = Arc::clone(&self.decisions);
        let streaming = Arc::clone(&self.streaming);
        self.stream = Some(tokio::spawn(async move {
            // The pace of a busy entrance, not a synchronisation.
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0;
            while streaming.load(Ordering::SeqCst) {
                tick.tick().await;
                let pin = format!("k{}", i % KEYS);
                i += 1;
                commands
                    .send(SimCommand::Verify {
                        unit: unit(1),
                        kind: CredentialKind::Pin,
                        value: pin.into_bytes(),
                        reader: 0,
                    })
                    .await
                    .expect("the simulator takes commands");
                let answered = tokio::time::timeout(WAIT, async {
                    loop {
                        match outputs.recv().await.expect("the simulator runs") {
                            Output::Decision { answer, .. } => return Some(answer),
                            Output::GaveUp { .. } => return None,
                            _ => {}
                        }
                    }
                })
                .await
                .expect("the door unit hears a decision or gives up");
                let counter = if matches!(answered, Some(Answer::Grant(_))) {
                    &decisions.granted
                } else {
                    &decisions.refused
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    /// Stops presenting PINs (the one in flight is decided first) and the unit; returns how
    /// many PINs opened the door and how many did not.
    async fn stop(&mut self) -> (u64, u64) {
        self.streaming.store(false, Ordering::SeqCst);
        if let Some(stream) = self.stream.take() {
            tokio::time::timeout(WAIT, stream)
                .await
                .expect("the stream ends")
                .expect("the stream ran");
        }
        if let Some(stop) = self.stop_sim.take() {
            let _ = stop.send(());
        }
        if let Some(sim) = self.sim.take() {
            let _ = sim.await;
        }
        (
            self.decisions.granted.load(Ordering::SeqCst),
            self.decisions.refused.load(Ordering::SeqCst),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The cloud's record consumer
// ---------------------------------------------------------------------------------------------

/// One record as it first reached the cloud.
#[derive(Debug, Clone)]
struct Arrival {
    record: Uploaded,
    at: Timestamp,
}

/// What the record consumer received, deduplicated by `(gateway, epoch, seq)`.
#[derive(Debug, Default)]
struct Received {
    first: BTreeMap<(String, u64, u64), Arrival>,
    duplicates: u64,
    /// Messages on `records` that are not batches of this gateway.
    strange: Vec<String>,
}

impl Received {
    fn take(&mut self, batch: Batch, at: Timestamp) {
        for record in batch.records {
            let id = (batch.gateway.clone(), batch.epoch, record.seq);
            if let Some(first) = self.first.get(&id) {
                self.duplicates += 1;
                if first.record != record {
                    self.strange
                        .push(format!("seq {} again with other contents", record.seq));
                }
            } else {
                self.first.insert(id, Arrival { record, at });
            }
        }
    }

    fn activity(&self) -> u64 {
        self.first
            .values()
            .filter(|a| matches!(a.record.record, Record::Activity(_)))
            .count() as u64
    }

    /// The epochs the records came in, and their seqs.
    fn seqs(&self) -> BTreeMap<u64, BTreeSet<u64>> {
        let mut by_epoch: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for (_, epoch, seq) in self.first.keys() {
            by_epoch.entry(*epoch).or_default().insert(*seq);
        }
        by_epoch
    }

    /// Seqs missing between 1 and the highest received, per epoch.
    fn missing(&self) -> Vec<u64> {
        self.seqs()
            .values()
            .flat_map(|seqs| {
                let top = seqs.last().copied().unwrap_or(0);
                (1..=top).filter(|s| !seqs.contains(s)).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Decisions' records that reached the cloud more than [`DELAYED`] after they were made,
    /// and the longest time one took.
    fn delayed(&self) -> (u64, Duration) {
        let took: Vec<Duration> = self
            .first
            .values()
            .filter(|a| matches!(a.record.record, Record::Activity(_)))
            .map(|a| {
                let took = a.at.duration_since(a.record.record.at());
                Duration::try_from(took).unwrap_or_default()
            })
            .collect();
        let late = took.iter().filter(|t| **t > DELAYED).count() as u64;
        (late, took.into_iter().max().unwrap_or_default())
    }

    /// The earliest arrival of a record made after `since`, as a time after `since`.
    fn first_made_after(&self, since: Timestamp) -> Option<Duration> {
        self.first
            .values()
            .filter(|a| a.record.record.at() > since)
            .map(|a| Duration::try_from(a.at.duration_since(since)).unwrap_or_default())
            .min()
    }

    fn summary(&self) -> String {
        let missing = self.missing();
        format!(
            "{} records ({} activity) in epochs {:?}, {} duplicates, {} missing {:?}, {:?}",
            self.first.len(),
            self.activity(),
            self.seqs().keys().collect::<Vec<_>>(),
            self.duplicates,
            missing.len(),
            &missing[..missing.len().min(20)],
            self.strange,
        )
    }
}

/// The cloud's record consumer: a persistent session on `records`, as §12.4 says a cloud must
/// run.
struct Records {
    received: Arc<Mutex<Received>>,
    _client: rumqttc::AsyncClient,
    /// The client's event loop and the decoder.
    _tasks: [JoinHandle<()>; 2],
}

impl Records {
    async fn connect(url: &str, home: &Home) -> Records {
        let mut mqtt = Mqtt::connect(options(url, "cloud-records", false)).await;
        mqtt.subscribe(&home.topics.topic(Channel::Records), QoS::AtLeastOnce)
            .await;
        let Mqtt {
            client,
            mut publishes,
            task: driver,
            ..
        } = mqtt;
        let received = Arc::new(Mutex::new(Received::default()));
        let into = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Some(publish) = publishes.recv().await {
                let at = Timestamp::now();
                let mut received = into.lock().unwrap();
                match Batch::decode(&publish.payload) {
                    Ok(batch) => received.take(batch, at),
                    Err(e) => received.strange.push(format!("{}: {e}", publish.topic)),
                }
            }
        });
        Records {
            received,
            _client: client,
            _tasks: [driver, task],
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.received.lock().unwrap())
    }

    /// Waits until `done` holds; fails after `within` with what arrived.
    async fn until(&self, what: &str, within: Duration, mut done: impl FnMut(&Received) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            let late = Instant::now() >= deadline;
            let (held, summary) = self.with(|r| (done(r), late.then(|| r.summary())));
            if held {
                return;
            }
            if let Some(summary) = summary {
                panic!("{what}: not within {within:?}; the cloud has {summary}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Publishes the sealed `delta` on `home`'s topics through the node at `url`, as a cloud must
/// on NATS: while a stream elects a new leader (a node died), NATS answers a `QoS` 1 publish by
/// closing the connection after 4 s instead of acknowledging it, so a new connection tries
/// again until one is acknowledged. Returns how many tries it took.
async fn publish_until_acknowledged(url: &str, home: &Home, delta: &[u8]) -> u32 {
    let deadline = Instant::now() + WAIT;
    let mut tries = 0;
    loop {
        tries += 1;
        let outcome = match CloudClient::connect(url, "cloud-publisher").await {
            Ok(client) => client.publish_delta(&home.topics, delta.to_vec()).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => return tries,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the delta was not acknowledged within {WAIT:?} ({tries} tries): {e}"
            ),
        }
        // A pause between tries, as a cloud's publisher would make.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What reached the cloud once the door stopped and the gateway's outbox emptied.
struct Tally {
    granted: u64,
    lost: u64,
    duplicated: u64,
    delayed: u64,
    slowest: Duration,
}

/// Stops the door (every PIN must have opened it) and waits until every decision's record has
/// reached the cloud and the outbox is empty; asserts that nothing was lost: one epoch, the
/// seqs from 1 without a gap, a record per decision, duplicates only of the same record.
async fn everything_arrived(door: &mut Door, records: &Records, home: &Home) -> Tally {
    let (granted, refused) = door.stop().await;
    assert_eq!(
        refused, 0,
        "the door opened for every key, cloud or no cloud"
    );
    records
        .until("every decision's record", WAIT, |r| r.activity() >= granted)
        .await;
    wait_for(WAIT, "an empty outbox", || {
        (home.reader().outbox_depth().ok()? == 0).then_some(())
    })
    .await;
    records.with(|r| {
        let summary = r.summary();
        assert!(r.strange.is_empty(), "{summary}");
        assert_eq!(r.seqs().len(), 1, "one epoch: {summary}");
        assert!(r.missing().is_empty(), "lost records: {summary}");
        assert_eq!(r.activity(), granted, "a record per decision: {summary}");
        let (delayed, slowest) = r.delayed();
        Tally {
            granted,
            lost: r.missing().len() as u64,
            duplicated: r.duplicates,
            delayed,
            slowest,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The cluster works for a gateway at all: on node 1 it installs a snapshot published through
/// node 2, decides at the door, and every decision's record reaches a consumer on node 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_nats_cluster_installs_a_snapshot_and_uploads_its_records() {
    let nats = cluster_for(
        "a_gateway_on_a_nats_cluster_installs_a_snapshot_and_uploads_its_records",
        3,
    );
    let (home, link) = nats_home(&[nats.mqtt_url(0)]);
    let records = Records::connect(&nats.mqtt_url(2), &home).await;
    let mut cloud = Cloud::connect_to(&nats.mqtt_url(1), &home, "cloud", REPORTS).await;
    let mut door = Door::start(&link);
    let mut daemon = Daemon::start(&home);
    cloud.reports.state(Presence::Online, Some(0)).await;
    assert_eq!(nats.node_of(&home.target.gateway), Some(0));

    cloud.install(1, &keys("k", KEYS)).await;
    door.stream();
    records
        .until("records flowing", WAIT, |r| r.activity() >= STEADY)
        .await;
    let tally = everything_arrived(&mut door, &records, &home).await;
    assert!(tally.granted >= STEADY);
    assert!(daemon.terminate().await.success());
}

/// Issue 14 §6: the gateway lists all three nodes; under a steady stream of decisions the node
/// it is connected to dies (SIGKILL) and comes back later. Every record reaches the cloud (by
/// `(gateway, epoch, seq)`), none is lost, the door never waits for the cloud, and a delta
/// published through a surviving node after the kill is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_a_stream_of_decisions_loses_no_record_and_keys_still_sync() {
    let mut nats = cluster_for(
        "a_node_killed_under_a_stream_of_decisions_loses_no_record_and_keys_still_sync",
        3,
    );
    let (home, link) = nats_home(&every_node(&nats));
    let gateway = home.target.gateway.clone();
    // The cloud on nodes 2 and 3, which live; the gateway tries its URLs in order, from node 1.
    let records = Records::connect(&nats.mqtt_url(2), &home).await;
    let mut cloud = Cloud::connect_to(&nats.mqtt_url(1), &home, "cloud", REPORTS).await;
    let mut door = Door::start(&link);
    let mut daemon = Daemon::start(&home);
    cloud.reports.state(Presence::Online, Some(0)).await;
    assert_eq!(nats.node_of(&gateway), Some(0), "on the first URL");
    let first = format!("127.0.0.1:{}", nats.mqtt_port(0));
    assert_eq!(status_broker(&home), Some(first), "status names node 1");
    cloud.install(1, &keys("k", KEYS)).await;
    door.stream();
    records
        .until("records flowing", WAIT, |r| r.activity() >= STEADY)
        .await;

    let killed_at = Timestamp::now();
    let killed = Instant::now();
    nats.kill(0);
    // A new key, published through a surviving node while the gateway is finding one.
    let delta = cloud.delta(1, 2, &keys("new", 1), &[]);
    let tries = publish_until_acknowledged(&nats.mqtt_url(1), &home, &delta).await;
    let published = killed.elapsed();
    records
        .until("a record made after the kill", WAIT, |r| {
            r.first_made_after(killed_at).is_some()
        })
        .await;
    let failover = records
        .with(|r| r.first_made_after(killed_at))
        .expect("a record made after the kill");
    // The gateway says which node it is on, and the cluster agrees.
    let (moved_to, on) = wait_for(WAIT, "doorbridge status and the cluster agreeing", || {
        let node = nats.node_of(&gateway)?;
        let on = status_broker(&home)?;
        (on == format!("127.0.0.1:{}", nats.mqtt_port(node))).then_some((node, on))
    })
    .await;
    assert_ne!(moved_to, 0, "the killed node holds no connection");
    // The cloud hears the new version: `applied`, or, if NATS dropped that report with a
    // connection it closed, the `online` state of the next connection.
    cloud
        .reports
        .next("version 2 held", WAIT, |_, r| match r {
            Report::Applied { version, .. } => *version == 2,
            Report::State { held, .. } => *held == Some(2),
            _ => false,
        })
        .await;
    assert!(home.by_pin("new0").is_some(), "the delta's key is held");

    let during = records.with(Received::activity);
    records
        .until("records through another node", WAIT, |r| {
            r.activity() >= during + STEADY
        })
        .await;
    tokio::task::block_in_place(|| nats.restart(0));
    let after = records.with(Received::activity);
    records
        .until("records with the node back", WAIT, |r| {
            r.activity() >= after + STEADY
        })
        .await;

    let tally = everything_arrived(&mut door, &records, &home).await;
    eprintln!(
        "NATS failover: node {} killed under {} decisions; the first record made after the kill \
         reached the cloud {failover:.2?} after it (the failover figure), the gateway then on \
         node {} ({on}, says doorbridge status); the delta published through node {} \
         {published:.2?} after the kill ({tries} tries) and applied; lost {}, duplicated {}, \
         delayed (over {DELAYED:?}) {}, slowest {:.2?}",
        nats.name(0),
        tally.granted,
        nats.name(moved_to),
        nats.name(1),
        tally.lost,
        tally.duplicated,
        tally.delayed,
        tally.slowest,
    );
    assert!(daemon.terminate().await.success());
}
