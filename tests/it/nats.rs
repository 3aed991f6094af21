//! The gateway on a clustered broker (issue 14 §6): the real `doorbridge run` binary against a
//! 3-node NATS cluster with `JetStream` and MQTT ([`NatsCluster`]), a simulated door unit on a pty
//! deciding a steady stream of PINs, and the cloud on other nodes of the cluster.
//!
//! The cloud's side is two clients: [`Cloud`] (signs and publishes key sets, hears `state` and
//! `sync`) and [`Records`], the record consumer a cloud must run (`docs/cloud-protocol.md`
//! §12.4): a persistent session (clean session off, a fixed client id) subscribed to `records`
//! at `QoS` 1, deduplicating by `(gateway, epoch, seq)`. Both connect to nodes the tests do not
//! kill.
//!
//! Every wait is for a condition, with a deadline. NATS acknowledges a `QoS` 1 subscription only
//! after about 2 s (it creates a `JetStream` consumer), so each client's subscription costs that.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::CredentialKind;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::Presence;
use doorbridge::cloud::topics::Channel;
use doorbridge::cloud::uplink::{Batch, Uploaded};
use doorbridge::sim::{HangupTolerant, Output, SimCommand, SimConfig, SimUnits, run_sim};
use doorbridge::store::Record;
use jiff::Timestamp;
use rumqttc::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{Mqtt, free_port, options, wait_for};
use crate::bus::unit;
use crate::gateway::{Cloud, Daemon, Home, WAIT, keys};

#[path = "../support/nats.rs"]
mod cluster;
use cluster::NatsCluster;

/// Keys in the gateway's key set; the door unit presents their PINs in turn.
const KEYS: usize = 20;
/// How often the door unit presents a PIN: 40 decisions a second, each one a record.
const PACE: Duration = Duration::from_millis(25);

/// A NATS cluster of `n` nodes for `test`; fails, saying how to install it, without
/// `nats-server`.
fn cluster_for(test: &str, n: usize) -> NatsCluster {
    NatsCluster::start(n).unwrap_or_else(|| panic!("{test}: {}", cluster::MISSING))
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A gateway `gw-nats` whose `cloud.url` is `url` (a TOML value: a string or a list) and whose
/// one bus is a pty linked at the returned path (unit 1, door `main`).
fn nats_home(url: &str) -> (Home, PathBuf) {
    let target = Target {
        site: "site-nats".into(),
        gateway: "gw-nats".into(),
    };
    // Home writes a one-URL configuration with a bus port that does not exist; both lines are
    // replaced.
    let home = Home::new("mqtt://127.0.0.1:1", target, &[]);
    let dir = home.config.parent().expect("the home directory").to_owned();
    let link = dir.join("ttyDOOR");
    let text = std::fs::read_to_string(&home.config).expect("read the configuration");
    let text = replace_line(&text, "url = ", &format!("url = {url}"));
    let text = replace_line(&text, "port = ", &format!("port = \"{}\"", link.display()));
    std::fs::write(&home.config, text).expect("write the configuration");
    (home, link)
}

/// `text` with its one line starting with `prefix` replaced by `line`.
fn replace_line(text: &str, prefix: &str, line: &str) -> String {
    let found = text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(found, 1, "one line starting with {prefix:?} in:\n{text}");
    text.lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `cloud.url` as a TOML string.
fn one_url(url: &str) -> String {
    format!("\"{url}\"")
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

impl Decisions {
    fn total(&self) -> u64 {
        self.granted.load(Ordering::SeqCst) + self.refused.load(Ordering::SeqCst)
    }
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
        let (master, _) = doorbridge::sim::linked_pty(link).expect("a linked pty");
        let units = SimUnits::new(&[unit(1)], SimConfig::default()).expect("a simulated unit");
        let (commands, command_rx) = mpsc::channel(64);
        let (output_tx, outputs) = mpsc::channel(1024);
        let (stop_sim, stopped) = oneshot::channel::<()>();
        let sim = tokio::spawn(async move {
            let port = HangupTolerant::new(master, Duration::from_millis(5));
            let _ = run_sim(port, units, command_rx, output_tx, async {
                let _ = stopped.await;
            })
            .await;
        });
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
    #[allow(dead_code)]
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
            let (held, summary) = self.with(|r| (done(r), r.summary()));
            if held {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; the cloud has {summary}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The cluster works for a gateway at all: on one node it installs a snapshot published through
/// another, decides at the door, and its records reach a consumer on the third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_nats_cluster_installs_a_snapshot_and_uploads_its_records() {
    let nats = cluster_for(
        "a_gateway_on_a_nats_cluster_installs_a_snapshot_and_uploads_its_records",
        3,
    );
    let (home, link) = nats_home(&one_url(&nats.mqtt_url(0)));
    let records = Records::connect(&nats.mqtt_url(2), &home).await;
    let mut cloud = Cloud::connect(&nats.mqtt_url(1), &home, "cloud").await;
    let mut door = Door::start(&link);
    let _daemon = Daemon::start(&home);
    cloud.reports.state(Presence::Online, Some(0)).await;
    assert_eq!(nats.node_of(&home.target.gateway), Some(0));

    cloud.install(1, &keys("k", KEYS)).await;
    door.stream();
    wait_for(WAIT, "ten decisions", || {
        (door.decisions.total() >= 10).then_some(())
    })
    .await;
    let (granted, refused) = door.stop().await;
    assert_eq!(refused, 0, "every key on the list opens the door");
    records
        .until("every decision's record", WAIT, |r| r.activity() >= granted)
        .await;
    wait_for(WAIT, "an empty outbox", || {
        (home.reader().outbox_depth().ok()? == 0).then_some(())
    })
    .await;
    records.with(|r| {
        assert!(r.strange.is_empty(), "{}", r.summary());
        assert_eq!(r.activity(), granted, "{}", r.summary());
        assert!(r.missing().is_empty(), "{}", r.summary());
    });
}
