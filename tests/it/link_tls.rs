//! The cloud link over TLS (`mqtts://`), as deployed: the real `doorbridge run` binary against
//! the real mosquitto with a TLS listener that requires a client certificate, and a throw-away
//! PKI made with the `openssl` command in a temporary directory.
//!
//! mosquitto also keeps a plain listener: the test's cloud ([`CloudClient`]) speaks plain TCP
//! only. Every wait polls a condition with a deadline; the daemon is killed if a test panics
//! ([`Daemon`]'s `Drop`), and mosquitto by its own guard. Without `openssl` the tests that need
//! it are skipped with a notice; without mosquitto they follow [`mosquitto_tls_or_skip`].
//!
//! Findings (rumqttc 0.25, rustls 0.23 with ring, mosquitto 2.0):
//! - rumqttc hands the URL's host to rustls as the server name, so `mqtts://localhost:…` is
//!   checked against the certificate's `DNS:localhost` and `mqtts://127.0.0.1:…` against its
//!   `IP:127.0.0.1`; both connect.
//! - A broker certificate from a CA other than the pinned one fails the handshake on the
//!   gateway's side (`invalid peer certificate: UnknownIssuer`), logged by the link at debug
//!   level as `broker connection failed` on every attempt; the daemon keeps running.
//! - A gateway without a client certificate completes its side of the TLS 1.3 handshake; the
//!   broker's refusal (OpenSSL: `peer did not return a certificate`) reaches it as a fatal
//!   `CertificateRequired` alert on the first read, also a `broker connection failed`.
//! - A `ca_file` without a PEM certificate stops the link from starting (`check-config` warns
//!   and exits 0; `run` logs it and serves the doors on).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doorbridge::access::{CredentialKind, Key, UseLimit};
use doorbridge::cloud::build;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::{Channel, DEFAULT_PREFIX, Topics};
use doorbridge::sim::cloud::{CloudClient, Message, hex};
use doorbridge::store::Reader;
use ed25519_dalek::SigningKey;
use jiff::Timestamp;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

use crate::broker::{Mosquitto, TlsListener, free_port, mosquitto_tls_or_skip, wait_for};
use crate::fixtures::{self, SALT};
use crate::util::{doorbridge, run};

/// How long any one step may take.
const WAIT: Duration = Duration::from_secs(30);
/// The link logs failed connections at debug level.
const LOG_FILTER: &str = "info,doorbridge::cloud::link=debug";
/// What the daemon logs on each failed attempt to open its (missing) bus port: while these keep
/// coming, the door side is being served.
const BUS_RETRY: &str = "cannot open bus port";

/// The cloud's signing key; its public half is the gateway's only trusted key.
fn cloud_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

// ---------------------------------------------------------------------------------------------
// The PKI
// ---------------------------------------------------------------------------------------------

/// The `openssl` binary: the first on `PATH`, else `/usr/bin/openssl`.
fn openssl_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join("openssl"))
        .chain([PathBuf::from("/usr/bin/openssl")])
        .find(|candidate| candidate.is_file())
}

/// Extensions for the certificates, and an empty distinguished name section so that `openssl
/// req` needs nothing from the system's `openssl.cnf` (subjects are given with `-subj`).
const OPENSSL_CNF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// Two unrelated CAs, and from the first a certificate for the broker (`localhost`,
/// `127.0.0.1`) and one for the gateway; P-256 keys, PEM (keys in PKCS #8), valid for two days.
#[derive(Debug)]
struct Pki {
    dir: tempfile::TempDir,
    openssl: PathBuf,
}

impl Pki {
    /// The PKI, or `None` (with a notice) if `openssl` is not installed.
    fn generate(test: &str) -> Option<Pki> {
        let Some(openssl) = openssl_binary() else {
            eprintln!("{test}: skipped: the openssl command is not installed");
            return None;
        };
        let pki = Pki {
            dir: tempfile::tempdir().expect("temporary directory for the PKI"),
            openssl,
        };
        std::fs::write(pki.path("openssl.cnf"), OPENSSL_CNF).expect("write openssl.cnf");
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf("server", "localhost", "server", 2);
        pki.leaf("client", "gw-tls-1", "client", 3);
        Some(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The pinned CA's certificate.
    fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed nothing of this setup.
    fn other_ca_file(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// mosquitto's side: its certificate, and the CA its clients' certificates must chain to.
    fn broker_files(&self) -> TlsListener {
        TlsListener {
            ca: self.ca_file(),
            cert: self.path("server.pem"),
            key: self.path("server.key"),
        }
    }

    /// Runs `openssl` with the whitespace-separated `args` in the PKI's directory; panics with
    /// its output if it fails.
    fn openssl(&self, args: &str) {
        let output = Command::new(&self.openssl)
            .args(args.split_whitespace())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A self-signed CA `{name}.pem` with its key `{name}.key`.
    fn ca(&self, name: &str) {
        self.openssl(&format!(
            "req -x509 -config openssl.cnf -extensions ca -newkey ec \
             -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -out {name}.pem \
             -days 2 -subj /CN={name}"
        ));
    }

    /// `{name}.pem` for the subject `common_name`, with its key `{name}.key`, signed by
    /// `ca.pem` with the `extensions` section of [`OPENSSL_CNF`].
    fn leaf(&self, name: &str, common_name: &str, extensions: &str, serial: u32) {
        self.openssl(&format!(
            "req -new -config openssl.cnf -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
             -keyout {name}.key -out {name}.csr -subj /CN={common_name}"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days 2 \
             -extfile openssl.cnf -extensions {extensions} -out {name}.pem"
        ));
    }
}

/// A PKI and a mosquitto with a plain and a TLS listener using it; `None` if either tool is
/// missing (see the module header).
fn pki_and_broker(test: &str) -> Option<(Pki, Mosquitto)> {
    let pki = Pki::generate(test)?;
    let broker = mosquitto_tls_or_skip(test, &pki.broker_files())?;
    Some((pki, broker))
}

// ---------------------------------------------------------------------------------------------
// The gateway's files and process
// ---------------------------------------------------------------------------------------------

/// A gateway's configuration and store in a temporary directory.
struct Home {
    _dir: tempfile::TempDir,
    config: PathBuf,
    db: PathBuf,
    target: Target,
    topics: Topics,
}

impl Home {
    /// A gateway that talks to the broker at `url` with `[cloud.tls]` set to `tls` (key, file)
    /// and trusts [`cloud_key`]. Its one bus names a serial port that does not exist, so the
    /// bus task keeps retrying it ([`BUS_RETRY`]).
    fn new(url: &str, tls: &[(&str, &Path)]) -> Home {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = dir.path().join("doorbridge.db");
        let config = dir.path().join("doorbridge.toml");
        let target = Target {
            site: "site-tls".into(),
            gateway: "gw-tls-1".into(),
        };
        let trusted = hex(cloud_key().verifying_key().as_bytes());
        let tls = tls.iter().fold(String::new(), |mut text, (key, path)| {
            writeln!(text, "{key} = \"{}\"", path.display()).expect("write to a string");
            text
        });
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
[cloud.tls]
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

    /// The live key set's version and size.
    fn held(&self) -> (u64, u64) {
        let set = Reader::open(&self.db)
            .expect("the store opens read-only")
            .key_set()
            .expect("read the key set");
        (set.version, set.keys)
    }
}

/// `doorbridge run` as a child process; killed on drop (and its log printed if the test failed).
struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(home: &Home) -> Daemon {
        let mut child = doorbridge()
            .arg("--config")
            .arg(&home.config)
            .arg("run")
            .env("DOORBRIDGE_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start doorbridge run");
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
    fn lines(&self, needles: &[&str]) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    fn count(&self, needles: &[&str]) -> usize {
        self.lines(needles).len()
    }

    /// Waits until at least `n` log lines contain every one of `needles`; fails early if the
    /// daemon exits meanwhile.
    async fn until_logged(&mut self, needles: &[&str], n: usize) {
        let what = format!("{n} log line(s) with {needles:?}");
        let log = Arc::clone(&self.log);
        let child = &mut self.child;
        wait_for(WAIT, &what, || {
            let seen = log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| needles.iter().all(|needle| l.contains(needle)))
                .count();
            if seen >= n {
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
    async fn assert_serving(&mut self) {
        let retries = self.count(&[BUS_RETRY]);
        self.until_logged(&[BUS_RETRY], retries + 1).await;
        let exited = self.child.try_wait().expect("wait for the daemon");
        assert!(exited.is_none(), "the daemon exited: {exited:?}");
    }

    /// SIGTERM, as systemd stops it; returns how it exited.
    async fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM the daemon");
        let child = &mut self.child;
        wait_for(WAIT, "the daemon to exit", || {
            child.try_wait().expect("wait for the daemon")
        })
        .await
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
// The cloud's side (plain TCP)
// ---------------------------------------------------------------------------------------------

/// The test's cloud on the broker's plain listener, hearing the gateway's `state` and `sync`.
struct Cloud {
    client: CloudClient,
    rx: UnboundedReceiver<Message>,
    topics: Topics,
    target: Target,
    /// Every report received so far, for failure messages.
    seen: Vec<(Channel, Report)>,
}

impl Cloud {
    async fn connect(broker: &Mosquitto, home: &Home) -> Cloud {
        let client = CloudClient::connect(&broker.url(), "cloud")
            .await
            .expect("the cloud connects");
        let state = home.topics.topic(Channel::State);
        let filter = format!("{}+", state.strip_suffix("state").expect("…/state"));
        let rx = client.subscribe(&filter).await.expect("subscribe");
        Cloud {
            client,
            rx,
            topics: home.topics.clone(),
            target: home.target.clone(),
            seen: Vec::new(),
        }
    }

    fn decode(&mut self, (topic, payload): Message) -> (Channel, Report) {
        let channel = self
            .topics
            .channel_of(&topic)
            .unwrap_or_else(|| panic!("a report on a foreign topic {topic}"));
        let report = Report::decode(&payload)
            .unwrap_or_else(|e| panic!("an undecodable report on {topic}: {e}"));
        self.seen.push((channel, report.clone()));
        (channel, report)
    }

    /// The next report for which `want` holds.
    async fn next(&mut self, what: &str, mut want: impl FnMut(Channel, &Report) -> bool) -> Report {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(message)) => {
                    let (channel, report) = self.decode(message);
                    if want(channel, &report) {
                        return report;
                    }
                }
                Ok(None) => panic!("{what}: the cloud client stopped; seen {:#?}", self.seen),
                Err(elapsed) => panic!("{what}: {elapsed} ({WAIT:?}); seen {:#?}", self.seen),
            }
        }
    }

    /// Every report received so far (without waiting).
    fn received(&mut self) -> &[(Channel, Report)] {
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

    async fn online(&mut self, held: u64) {
        let gateway = self.target.gateway.clone();
        self.next(&format!("state online (held {held})"), |channel, r| {
            channel == Channel::State
                && *r
                    == Report::State {
                        state: Presence::Online,
                        gateway: gateway.clone(),
                        held: Some(held),
                    }
        })
        .await;
    }

    /// Publishes a snapshot of `keys` as `version` and waits for its `applied` report.
    async fn install(&mut self, version: u64, keys: &[Key]) -> Report {
        let snapshot = build::snapshot(
            &self.target,
            version,
            Timestamp::now(),
            SALT,
            keys,
            &cloud_key(),
        )
        .expect("build a snapshot");
        self.client
            .publish_snapshot(&self.topics, &snapshot)
            .await
            .expect("publish the snapshot");
        let report = self
            .next(&format!("applied {version}"), |channel, _| {
                channel == Channel::Sync
            })
            .await;
        assert!(
            matches!(report, Report::Applied { version: v, .. } if v == version),
            "expected applied {version}, got {report:?}"
        );
        report
    }
}

/// `n` keys `{prefix}{i}` with PIN `{prefix}{i}`.
fn keys(prefix: &str, n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            fixtures::key(&id, CredentialKind::Pin, &id, UseLimit::Unlimited)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The gateway at `mqtts://{host}:{tls port}` with the pinned CA and its client certificate
/// comes online, applies a snapshot and stops cleanly.
async fn connects_over_tls(test: &str, host: &str) {
    let Some((pki, broker)) = pki_and_broker(test) else {
        return;
    };
    let port = broker.tls_port().expect("a TLS listener");
    let home = Home::new(
        &format!("mqtts://{host}:{port}"),
        &[
            ("ca_file", &pki.ca_file()),
            ("cert_file", &pki.client_cert()),
            ("key_file", &pki.client_key()),
        ],
    );
    let mut cloud = Cloud::connect(&broker, &home).await;
    let mut daemon = Daemon::start(&home);
    // It can only have reached the broker through the TLS listener: that is its URL.
    cloud.online(0).await;
    let applied = cloud.install(1, &keys("k", 5)).await;
    assert!(
        matches!(applied, Report::Applied { keys: Some(5), .. }),
        "{applied:?}"
    );
    assert_eq!(home.held(), (1, 5));
    assert_eq!(daemon.count(&["broker connection failed"]), 0);
    assert_eq!(daemon.count(&["connected to the broker"]), 1);

    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_connects_over_tls_with_a_pinned_ca_and_a_client_certificate() {
    connects_over_tls(
        "the_gateway_connects_over_tls_with_a_pinned_ca_and_a_client_certificate",
        "localhost",
    )
    .await;
}

/// rustls checks an IP address in the URL against the certificate's IP subject alt name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_connects_over_tls_to_a_broker_named_by_its_ip_address() {
    connects_over_tls(
        "the_gateway_connects_over_tls_to_a_broker_named_by_its_ip_address",
        "127.0.0.1",
    )
    .await;
}

/// Waits until the link has failed to connect twice (a retry after the backoff, not a one-off)
/// with every one of `needles` in the failure, then checks that the gateway never came online
/// and still serves its doors, and that SIGTERM stops it cleanly.
async fn never_online(home: &Home, cloud: &mut Cloud, needles: &[&str]) {
    let mut daemon = Daemon::start(home);
    let mut failed = vec!["broker connection failed"];
    failed.extend_from_slice(needles);
    daemon.until_logged(&failed, 2).await;
    let online: Vec<_> = cloud
        .received()
        .iter()
        .filter(|(_, r)| {
            matches!(
                r,
                Report::State {
                    state: Presence::Online,
                    ..
                }
            )
        })
        .cloned()
        .collect();
    assert!(online.is_empty(), "the gateway came online: {online:?}");
    assert_eq!(daemon.count(&["connected to the broker"]), 0);
    daemon.assert_serving().await;
    eprintln!("{}", daemon.lines(&failed)[0]);

    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_certificate_from_another_ca_is_refused() {
    let Some((pki, broker)) =
        pki_and_broker("a_broker_with_a_certificate_from_another_ca_is_refused")
    else {
        return;
    };
    let port = broker.tls_port().expect("a TLS listener");
    let home = Home::new(
        &format!("mqtts://localhost:{port}"),
        &[
            ("ca_file", &pki.other_ca_file()),
            ("cert_file", &pki.client_cert()),
            ("key_file", &pki.client_key()),
        ],
    );
    let mut cloud = Cloud::connect(&broker, &home).await;
    never_online(
        &home,
        &mut cloud,
        &["invalid peer certificate", "UnknownIssuer"],
    )
    .await;
}

/// The other way round: the broker requires a client certificate, and a gateway without one
/// (only the pinned CA) is turned away in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_client_certificate_is_refused_by_the_broker() {
    let Some((pki, broker)) =
        pki_and_broker("a_gateway_without_a_client_certificate_is_refused_by_the_broker")
    else {
        return;
    };
    let port = broker.tls_port().expect("a TLS listener");
    let home = Home::new(
        &format!("mqtts://localhost:{port}"),
        &[("ca_file", &pki.ca_file())],
    );
    let mut cloud = Cloud::connect(&broker, &home).await;
    never_online(&home, &mut cloud, &["received fatal alert"]).await;
    // And mosquitto says why (OpenSSL's words).
    wait_for(WAIT, "mosquitto to log the missing certificate", || {
        broker
            .log()
            .contains("peer did not return a certificate")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_file_is_reported_by_check_config_and_the_daemon_keeps_running() {
    // Needs neither openssl nor a broker: the link never gets as far as connecting.
    let files = tempfile::tempdir().expect("temporary directory");
    let ca = files.path().join("ca.pem");
    std::fs::write(&ca, "this is not a certificate\n").expect("write the bad CA file");
    let home = Home::new(
        &format!("mqtts://localhost:{}", free_port()),
        &[("ca_file", &ca)],
    );

    let checked = run(
        doorbridge().arg("--config").arg(&home.config),
        ["check-config"],
    );
    assert_eq!(checked.code, Some(0), "{checked:?}");
    assert!(
        checked
            .stderr
            .contains("warning: the cloud link will not start")
            && checked.stderr.contains(&ca.display().to_string()),
        "{checked:?}"
    );
    assert!(checked.stdout.contains("[cloud.tls]"), "{checked:?}");

    let mut daemon = Daemon::start(&home);
    daemon.until_logged(&["store open"], 1).await;
    daemon
        .until_logged(
            &[
                "the cloud link cannot start",
                "holds no usable PEM certificate",
            ],
            1,
        )
        .await;
    daemon.assert_serving().await;
    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
}
