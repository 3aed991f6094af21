//! Real MQTT brokers for the tests, and the bare-MQTT facts the cloud link is built on.
//!
//! Helpers (all `pub`, for the other test modules):
//! - [`RumqttdBroker`] (from `doorbridge_testkit::brokers`, shared with the benches and the demo):
//!   an in-process rumqttd on a free port. rumqttd's `Broker::start()` blocks forever and has no
//!   shutdown, so each broker runs on its own std thread that leaks until the test process exits;
//!   every test starts its own broker.
//! - [`Mosquitto`]: the real `mosquitto` binary (the reference broker) on a free port, with a
//!   generated configuration in a temporary directory; it can be stopped and started again on the
//!   same port. Without the binary, tests that need it fail and say to `apt-get install mosquitto`,
//!   unless `DOORBRIDGE_SKIP_MOSQUITTO=1` is set (see [`mosquitto_or_skip`]).
//!   [`Mosquitto::start_with_tls`] adds a second listener speaking TLS that requires a client
//!   certificate ([`TlsListener`]).
//! - [`Proxy`] (from `doorbridge_testkit::brokers` too): a TCP proxy whose [`Proxy::cut`] makes the
//!   internet go away for the clients that connect through it, until [`Proxy::restore`].
//! - [`Mqtt`] and [`client`]: a test-side rumqttc client whose event loop is polled by a task that
//!   forwards incoming publishes and reconnects with a short backoff.
//! - [`wait_for`]: polls a condition with a deadline.
//!
//! Findings (rumqttd 0.20, mosquitto 2.0):
//! - Both brokers keep a persistent session (`clean_session = false`) of a subscriber whose
//!   connection was cut, queue the `QoS 1` messages published meanwhile and deliver all of them
//!   once it reconnects (`queued_messages_reach_a_persistent_subscriber_after_a_cut_*`).
//! - rumqttd's default `max_payload_size` (20 KiB in its example configuration) and rumqttc's
//!   default maximum packet size (10 KiB) both refuse key-set chunks: both are raised here.
//! - mosquitto started as root drops privileges to the `mosquitto` user unless the configuration
//!   says `user root`, and then cannot write its persistence file into a root-owned temporary
//!   directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

/// How long any wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub use doorbridge_testkit::brokers::{MAX_PACKET, Proxy, RumqttdBroker, accepts, free_port};

/// Polls `f` until it returns `Some`, or fails naming `what` after `within`.
pub async fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes `size` bytes on `topic` at `QoS` 1, from a client of its own that allows packets
/// that big, and returns once the broker has acknowledged it (it is then queued for every
/// subscriber, however big).
pub async fn publish_oversized(url: &str, topic: &str, size: usize) {
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a mqtt://127.0.0.1:PORT url");
    let mut options = MqttOptions::new(format!("oversized-{size}"), "127.0.0.1", port);
    options.set_max_packet_size(size + 4096, size + 4096);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    client
        .publish(topic, QoS::AtLeastOnce, false, vec![0xa5; size])
        .await
        .expect("queue the oversized publish");
    let acked = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publishing {size} bytes on {topic}: {e}"),
            }
        }
    })
    .await;
    assert!(
        acked.is_ok(),
        "the broker did not acknowledge {size} bytes on {topic}"
    );
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Blocking twin of [`wait_for`], for code outside a runtime.
pub fn wait_for_blocking<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto
// ---------------------------------------------------------------------------------------------

/// The real `mosquitto` broker on 127.0.0.1:`port`, killed on drop.
///
/// Sessions persist across [`Mosquitto::stop`] and [`Mosquitto::start_again`] (persistence into
/// its temporary directory), and an offline persistent session keeps up to 100,000 queued
/// messages, as a cloud broker would during a gateway's outage.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    /// The TLS listener's files and port, if it has one.
    tls: Option<(TlsListener, u16)>,
    /// No `max_packet_size`: mosquitto's own default, which takes any size (a poison message).
    uncapped: bool,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// The `mosquitto` binary: the first on `PATH`, else `/usr/sbin/mosquitto`.
    pub fn binary() -> Option<PathBuf> {
        crate::util::find_binary("mosquitto", "/usr/sbin/mosquitto")
    }

    pub fn available() -> bool {
        Self::binary().is_some()
    }

    /// Starts mosquitto on a free port; returns once it accepts TCP connections.
    ///
    /// Panics, saying how to install it, if the binary is missing.
    pub fn start() -> Mosquitto {
        Self::start_on(None, false)
    }

    /// Like [`Mosquitto::start`], but taking packets of any size, as mosquitto does unless told
    /// otherwise: anyone with publish rights can send a gateway a 16 MiB message.
    pub fn start_uncapped() -> Mosquitto {
        Self::start_on(None, true)
    }

    /// Like [`Mosquitto::start`], plus a TLS listener on another free port ([`Mosquitto::tls_port`])
    /// with the files of `tls`. The plain listener stays, for test clients without TLS.
    pub fn start_with_tls(tls: &TlsListener) -> Mosquitto {
        Self::start_on(Some(tls), false)
    }

    fn start_on(tls: Option<&TlsListener>, uncapped: bool) -> Mosquitto {
        let binary = Self::binary().unwrap_or_else(|| panic!("{}", missing_mosquitto()));
        let mut dir = tempfile::tempdir().expect("temporary directory for mosquitto");
        for _ in 0..5 {
            let mut broker = Mosquitto {
                port: free_port(),
                tls: tls.map(|files| (files.clone(), free_port())),
                uncapped,
                binary: binary.clone(),
                dir,
                child: None,
            };
            if broker.spawn() {
                return broker;
            }
            // Someone else took the port between our pick and mosquitto's bind.
            dir = std::mem::replace(&mut broker.dir, tempfile::tempdir().expect("tempdir"));
        }
        panic!("mosquitto could not bind a free port in 5 tries");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The TLS listener's port (on 127.0.0.1), if the broker was started with one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.as_ref().map(|(_, port)| *port)
    }

    /// Stops the broker as its service manager would (SIGTERM, so it saves its sessions) and
    /// waits until it has exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().expect("wait for mosquitto").is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto did not exit within 10 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again on the same port, with the sessions it saved when stopped.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "mosquitto is still running");
        assert!(
            self.spawn(),
            "mosquitto did not start again on port {}; its log:\n{}",
            self.port,
            self.log()
        );
    }

    /// What mosquitto logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Writes the configuration, starts the process and waits until it accepts connections.
    /// False if it exited before that (the port was taken).
    fn spawn(&mut self) -> bool {
        let config = self.dir.path().join("mosquitto.conf");
        let mut text = mosquitto_config(self.port, self.dir.path());
        if self.uncapped {
            text = text.replace(&format!("max_packet_size {MAX_PACKET}\n"), "");
        }
        if let Some((files, port)) = &self.tls {
            text.push_str(&tls_listener_config(*port, files));
        }
        std::fs::write(&config, text).expect("write mosquitto.conf");
        let mut child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().expect("wait for mosquitto").is_some() {
                return false;
            }
            // Every listener: mosquitto opens them one after the other.
            if accepts(self.port) && self.tls_port().is_none_or(accepts) {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "mosquitto did not accept connections on port {} within 10 s; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A mosquitto 2.0 configuration for one listener on 127.0.0.1:`port`, keeping its state in `dir`.
pub fn mosquitto_config(port: u16, dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "# Generated by the doorbridge tests.
listener {port} 127.0.0.1
allow_anonymous true
# Started as root, mosquitto would switch to the mosquitto user and lose access to {dir}.
user root
persistence true
persistence_location {dir}/
autosave_interval 0
max_packet_size {MAX_PACKET}
max_inflight_messages 100
max_queued_messages 100000
max_queued_bytes 0
set_tcp_nodelay true
log_dest file {dir}/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
"
    )
}

/// The files of a TLS listener (PEM): mosquitto's certificate and key, and the CA that both
/// signs them and must sign every client's certificate.
#[derive(Clone, Debug)]
pub struct TlsListener {
    /// mosquitto's `cafile`.
    pub ca: PathBuf,
    /// mosquitto's `certfile`.
    pub cert: PathBuf,
    /// mosquitto's `keyfile`.
    pub key: PathBuf,
}

/// A mosquitto 2.0 TLS listener on 127.0.0.1:`port` that requires a client certificate signed
/// by `files.ca`; appended to a [`mosquitto_config`] (whose `allow_anonymous` it shares).
pub fn tls_listener_config(port: u16, files: &TlsListener) -> String {
    format!(
        "
listener {port} 127.0.0.1
cafile {ca}
certfile {cert}
keyfile {key}
require_certificate true
use_identity_as_username false
",
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

fn missing_mosquitto() -> String {
    "the mosquitto broker is not installed (looked on PATH and at /usr/sbin/mosquitto): \
     install it with `apt-get install mosquitto`, or set DOORBRIDGE_SKIP_MOSQUITTO=1 to skip \
     the tests that need it"
        .to_owned()
}

/// A running mosquitto for test `test`, or `None` (with a notice) if it is not installed and
/// `DOORBRIDGE_SKIP_MOSQUITTO=1` is set. Without that variable a missing mosquitto fails the test.
pub fn mosquitto_or_skip(test: &str) -> Option<Mosquitto> {
    or_skip(test, Mosquitto::start)
}

/// [`mosquitto_or_skip`] for [`Mosquitto::start_uncapped`].
pub fn mosquitto_uncapped_or_skip(test: &str) -> Option<Mosquitto> {
    or_skip(test, Mosquitto::start_uncapped)
}

/// [`mosquitto_or_skip`] for [`Mosquitto::start_with_tls`].
pub fn mosquitto_tls_or_skip(test: &str, tls: &TlsListener) -> Option<Mosquitto> {
    or_skip(test, || Mosquitto::start_with_tls(tls))
}

fn or_skip(test: &str, start: impl FnOnce() -> Mosquitto) -> Option<Mosquitto> {
    if Mosquitto::available() {
        return Some(start());
    }
    if std::env::var("DOORBRIDGE_SKIP_MOSQUITTO").is_ok_and(|v| v == "1") {
        eprintln!("{test}: skipped: mosquitto is not installed and DOORBRIDGE_SKIP_MOSQUITTO=1");
        return None;
    }
    panic!("{test}: {}", missing_mosquitto());
}

// ---------------------------------------------------------------------------------------------
// Test-side MQTT client
// ---------------------------------------------------------------------------------------------

/// What the event loop of a test client saw, besides incoming publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A `ConnAck` accepting the connection.
    Connected { session_present: bool },
    /// A `SubAck`.
    Subscribed,
    /// A `PubAck` for a `QoS 1` publish of ours.
    PubAck(u16),
    /// The connection failed or dropped; the task reconnects after a short backoff.
    Down(String),
}

/// A test client: the rumqttc handle, what arrives, and the task polling its event loop.
#[derive(Debug)]
pub struct Mqtt {
    pub client: AsyncClient,
    pub publishes: UnboundedReceiver<Publish>,
    pub events: UnboundedReceiver<LinkEvent>,
    pub task: JoinHandle<()>,
}

/// Options for a test client of the broker at `url` (`mqtt://HOST:PORT`): packets up to
/// [`MAX_PACKET`], a 5 s keep-alive.
pub fn options(url: &str, client_id: &str, clean_session: bool) -> MqttOptions {
    let (host, port) = url
        .strip_prefix("mqtt://")
        .and_then(|rest| rest.rsplit_once(':'))
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .unwrap_or_else(|| panic!("not an mqtt://HOST:PORT URL: {url:?}"));
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_clean_session(clean_session)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options
}

impl Mqtt {
    /// Connects with `options` and returns after the first `ConnAck` (failing after [`WAIT`]).
    ///
    /// A spawned task polls the event loop for the client's whole life; after an error it waits
    /// 50 ms and polls again, which reconnects.
    pub async fn connect(options: MqttOptions) -> Mqtt {
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let (publish_tx, publishes) = unbounded_channel();
        let (event_tx, events) = unbounded_channel();
        let task = tokio::spawn(drive(eventloop, publish_tx, event_tx));
        let mut mqtt = Mqtt {
            client,
            publishes,
            events,
            task,
        };
        mqtt.next_event("the first ConnAck", |e| {
            matches!(e, LinkEvent::Connected { .. })
        })
        .await;
        mqtt
    }

    /// The next event for which `want` holds (others are dropped), failing after [`WAIT`].
    pub async fn next_event(
        &mut self,
        what: &str,
        mut want: impl FnMut(&LinkEvent) -> bool,
    ) -> LinkEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if want(&event) => return event,
                Ok(Some(_)) => {}
                Ok(None) => panic!("{what}: the client task ended"),
                Err(elapsed) => panic!("{what}: not within {WAIT:?} ({elapsed})"),
            }
        }
    }

    /// Subscribes to `filter` and waits for the `SubAck`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.next_event("the SubAck", |e| *e == LinkEvent::Subscribed)
            .await;
    }

    /// The next `n` publishes that arrive, failing after [`WAIT`] with how many did.
    pub async fn receive(&mut self, n: usize) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.publishes.recv()).await {
                Ok(Some(publish)) => got.push(publish),
                Ok(None) => panic!("the client task ended after {} of {n} publishes", got.len()),
                Err(elapsed) => {
                    panic!("{} of {n} publishes within {WAIT:?} ({elapsed})", got.len())
                }
            }
        }
        got
    }
}

/// A test client of the broker at `url`, connected (see [`Mqtt::connect`]): its handle, the
/// publishes that arrive, and the task polling its event loop.
pub async fn client(
    url: &str,
    client_id: &str,
    clean_session: bool,
) -> (AsyncClient, UnboundedReceiver<Publish>, JoinHandle<()>) {
    let mqtt = Mqtt::connect(options(url, client_id, clean_session)).await;
    (mqtt.client, mqtt.publishes, mqtt.task)
}

async fn drive(
    mut eventloop: rumqttc::EventLoop,
    publishes: UnboundedSender<Publish>,
    events: UnboundedSender<LinkEvent>,
) {
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let _ = publishes.send(publish);
                continue;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => LinkEvent::Connected {
                session_present: ack.session_present,
            },
            Ok(Event::Incoming(Packet::SubAck(_))) => LinkEvent::Subscribed,
            Ok(Event::Incoming(Packet::PubAck(ack))) => LinkEvent::PubAck(ack.pkid),
            Ok(_) => continue,
            Err(e) => {
                let _ = events.send(LinkEvent::Down(e.to_string()));
                // Backoff between reconnection attempts, not synchronisation.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = events.send(event);
    }
}

/// Payload `i` of a numbered test message: `i` in ASCII, padded with `filler` to `len` bytes.
pub fn numbered(i: usize, len: usize) -> Vec<u8> {
    let mut payload = format!("{i:08}").into_bytes();
    payload.resize(len.max(payload.len()), b'.');
    payload
}

/// The number [`numbered`] put in `payload`.
pub fn number_of(payload: &[u8]) -> usize {
    std::str::from_utf8(&payload[..8])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a numbered payload")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Publishes `n` numbered `QoS 1` messages of `len` bytes on `topic` and waits for all `PubAck`s.
async fn publish_numbered(publisher: &mut Mqtt, topic: &str, n: usize, len: usize) {
    let client = publisher.client.clone();
    let topic = topic.to_owned();
    // Not from the task polling the event loop: that one is `drive`.
    let sending = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(&topic, QoS::AtLeastOnce, false, numbered(i, len))
                .await
                .expect("queue a publish");
        }
    });
    for acked in 0..n {
        publisher
            .next_event(&format!("PubAck {} of {n}", acked + 1), |e| {
                matches!(e, LinkEvent::PubAck(_))
            })
            .await;
    }
    sending.await.unwrap();
}

/// A 130 KiB `QoS 1` message (a full key-set chunk with its envelope) goes through `url` intact.
async fn large_round_trip(url: &str) {
    let mut subscriber = Mqtt::connect(options(url, "big-sub", true)).await;
    subscriber.subscribe("keys/chunk", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::connect(options(url, "big-pub", true)).await;
    let payload: Vec<u8> = (0..130 * 1024)
        .map(|i: usize| u8::try_from(i % 251).unwrap())
        .collect();
    publisher
        .client
        .publish("keys/chunk", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    publisher
        .next_event("the PubAck", |e| matches!(e, LinkEvent::PubAck(_)))
        .await;
    let got = subscriber.receive(1).await.remove(0);
    assert_eq!(got.topic, "keys/chunk");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(
        got.payload == payload,
        "the 130 KiB payload arrived changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_130_kib_qos1_message_round_trips_through_rumqttd() {
    let broker = RumqttdBroker::start();
    large_round_trip(&broker.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_130_kib_qos1_message_round_trips_through_mosquitto() {
    let Some(broker) = mosquitto_or_skip("a_130_kib_qos1_message_round_trips_through_mosquitto")
    else {
        return;
    };
    large_round_trip(&broker.url()).await;
}

/// A persistent subscriber behind `proxy` (to the broker at `broker_url`) loses its link; 100
/// `QoS 1` messages are published meanwhile; once the link is back it gets every one, in order.
async fn queued_through_a_cut(broker_url: &str, proxy: &Proxy) {
    const N: usize = 100;
    let mut subscriber = Mqtt::connect(options(&proxy.url(), "gateway-1", false)).await;
    subscriber.subscribe("cloud/keys", QoS::AtLeastOnce).await;
    assert_eq!(proxy.forwarded(), 1);

    proxy.cut();
    let started = Instant::now();
    subscriber
        .next_event("the subscriber noticing the cut", |e| {
            matches!(e, LinkEvent::Down(_))
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the cut was noticed only after {:?}",
        started.elapsed()
    );

    let mut publisher = Mqtt::connect(options(broker_url, "cloud", true)).await;
    publish_numbered(&mut publisher, "cloud/keys", N, 200).await;

    proxy.restore();
    let resumed = subscriber
        .next_event("the subscriber reconnecting", |e| {
            matches!(e, LinkEvent::Connected { .. })
        })
        .await;
    assert_eq!(
        resumed,
        LinkEvent::Connected {
            session_present: true
        },
        "the broker kept the persistent session"
    );
    assert_eq!(proxy.forwarded(), 2, "one reconnection through the proxy");
    let got: Vec<usize> = subscriber
        .receive(N)
        .await
        .iter()
        .map(|p| number_of(&p.payload))
        .collect();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "all queued messages, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_reach_a_persistent_subscriber_after_a_cut_mosquitto() {
    let Some(broker) =
        mosquitto_or_skip("queued_messages_reach_a_persistent_subscriber_after_a_cut_mosquitto")
    else {
        return;
    };
    let proxy = Proxy::start(broker.port());
    queued_through_a_cut(&broker.url(), &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_reach_a_persistent_subscriber_after_a_cut_rumqttd() {
    let broker = RumqttdBroker::start();
    let proxy = Proxy::start(broker.port);
    queued_through_a_cut(&broker.url(), &proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_to_mosquitto_restarted_on_the_same_port() {
    let Some(mut broker) =
        mosquitto_or_skip("clients_reconnect_to_mosquitto_restarted_on_the_same_port")
    else {
        return;
    };
    let mut subscriber = Mqtt::connect(options(&broker.url(), "gateway-1", false)).await;
    subscriber.subscribe("cloud/keys", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::connect(options(&broker.url(), "cloud", false)).await;

    broker.stop();
    assert!(!accepts(broker.port()), "the broker is gone");
    subscriber
        .next_event("the subscriber noticing the broker gone", |e| {
            matches!(e, LinkEvent::Down(_))
        })
        .await;
    publisher
        .next_event("the publisher noticing the broker gone", |e| {
            matches!(e, LinkEvent::Down(_))
        })
        .await;

    broker.start_again();
    for client in [&mut subscriber, &mut publisher] {
        let back = client
            .next_event("reconnecting to the restarted broker", |e| {
                matches!(e, LinkEvent::Connected { .. })
            })
            .await;
        assert_eq!(
            back,
            LinkEvent::Connected {
                session_present: true
            },
            "mosquitto saved the sessions when stopped; its log:\n{}",
            broker.log()
        );
    }
    publish_numbered(&mut publisher, "cloud/keys", 3, 64).await;
    let got: Vec<usize> = subscriber
        .receive(3)
        .await
        .iter()
        .map(|p| number_of(&p.payload))
        .collect();
    assert_eq!(got, [0, 1, 2], "the restored subscription delivers");
}

// ---------------------------------------------------------------------------------------------
// Reference rate
// ---------------------------------------------------------------------------------------------

/// Publishes `n` `QoS 1` messages of 1 KiB from memory through one client and returns how many per
/// second were acknowledged, from the first publish to the last `PubAck`.
async fn bare_publish_rate(url: &str, n: usize) -> f64 {
    let mut publisher = Mqtt::connect(options(url, "rate", true)).await;
    let payload = vec![b'k'; 1024];
    let client = publisher.client.clone();
    let started = Instant::now();
    let sending = tokio::spawn(async move {
        for _ in 0..n {
            client
                .publish("rate/outbox", QoS::AtLeastOnce, false, payload.clone())
                .await
                .expect("queue a publish");
        }
    });
    let mut acked = 0;
    while acked < n {
        match publisher.events.recv().await {
            Some(LinkEvent::PubAck(_)) => acked += 1,
            Some(LinkEvent::Down(e)) => panic!("the link dropped after {acked} PubAcks: {e}"),
            Some(_) => {}
            None => panic!("the client task ended after {acked} PubAcks"),
        }
    }
    let elapsed = started.elapsed();
    sending.await.unwrap();
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / elapsed.as_secs_f64();
    rate
}

/// The reference rate for the outbox drain: bare rumqttc, `QoS 1`, 1 KiB, 100 in flight.
/// Run with `cargo test --release --test it bare_rumqttc -- --ignored --nocapture`.
///
/// Measured on the 2-core development machine (rumqttc 0.25.1, rumqttd 0.20.0, mosquitto
/// 2.0.11), runs of under a second each, so noisy: rumqttd 47,000–80,000 messages/s in release
/// (24,000–47,000 in debug), mosquitto 39,000–65,000 in release (34,000–60,000 in debug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run by hand"]
async fn bare_rumqttc_qos1_publish_rate() {
    const N: usize = 20_000;
    let rumqttd = RumqttdBroker::start();
    let rate = bare_publish_rate(&rumqttd.url(), N).await;
    println!("rumqttd (in process): {N} QoS 1 publishes of 1 KiB at {rate:.0} messages/s");
    if let Some(mosquitto) = mosquitto_or_skip("bare_rumqttc_qos1_publish_rate") {
        let rate = bare_publish_rate(&mosquitto.url(), N).await;
        println!("mosquitto: {N} QoS 1 publishes of 1 KiB at {rate:.0} messages/s");
    }
}
