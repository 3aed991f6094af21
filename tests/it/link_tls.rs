//! The cloud link over TLS (`mqtts://`), as deployed: the real `doorbridge run` binary against
//! the real mosquitto with a TLS listener that requires a client certificate, and a throw-away
//! PKI made with the `openssl` command in a temporary directory.
//!
//! mosquitto also keeps a plain listener: the test's cloud ([`Cloud`]) speaks plain TCP
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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};

use crate::broker::{Mosquitto, TlsListener, free_port, mosquitto_tls_or_skip, wait_for};
use crate::gateway::{Cloud, Daemon, Home, WAIT, keys};
use crate::util::{doorbridge, find_binary, run};

// ---------------------------------------------------------------------------------------------
// The PKI
// ---------------------------------------------------------------------------------------------

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
        let Some(openssl) = find_binary("openssl", "/usr/bin/openssl") else {
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

/// The gateway of these tests (its client certificate's subject), talking to the broker at
/// `url` with `[cloud.tls]` set to `tls` (key, file).
fn tls_home(url: &str, tls: &[(&str, &Path)]) -> Home {
    let target = Target {
        site: "site-tls".into(),
        gateway: "gw-tls-1".into(),
    };
    Home::new(url, target, tls)
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
    let home = tls_home(
        &format!("mqtts://{host}:{port}"),
        &[
            ("ca_file", &pki.ca_file()),
            ("cert_file", &pki.client_cert()),
            ("key_file", &pki.client_key()),
        ],
    );
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud").await;
    let mut daemon = Daemon::start(&home);
    // It can only have reached the broker through the TLS listener: that is its URL.
    cloud.reports.state(Presence::Online, Some(0)).await;
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
    daemon.until_logged(&failed, 2, WAIT).await;
    let online: Vec<_> = cloud
        .reports
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
    let home = tls_home(
        &format!("mqtts://localhost:{port}"),
        &[
            ("ca_file", &pki.other_ca_file()),
            ("cert_file", &pki.client_cert()),
            ("key_file", &pki.client_key()),
        ],
    );
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud").await;
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
    let home = tls_home(
        &format!("mqtts://localhost:{port}"),
        &[("ca_file", &pki.ca_file())],
    );
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud").await;
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
    let home = tls_home(
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
    daemon.until_logged(&["store open"], 1, WAIT).await;
    daemon
        .until_logged(
            &[
                "the cloud link cannot start",
                "holds no usable PEM certificate",
            ],
            1,
            WAIT,
        )
        .await;
    daemon.assert_serving().await;
    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
}

/// `doorbridge doctor` over TLS: the pinned CA, the client certificate and its key are each
/// judged, and the broker is reached through the TLS handshake and CONNACK; with another CA
/// the broker check fails in the handshake, and a key that is not the certificate's is named.
#[test]
fn doctor_judges_the_tls_files_and_reaches_the_broker_through_the_handshake() {
    let Some((pki, broker)) =
        pki_and_broker("doctor_judges_the_tls_files_and_reaches_the_broker_through_the_handshake")
    else {
        return;
    };
    let url = format!(
        "mqtts://localhost:{}",
        broker.tls_port().expect("a TLS listener")
    );
    // Each site's other checks fail (no port, no database): only the TLS lines matter here.
    let doctor = |ca: &Path, key: &Path| {
        let home = tls_home(
            &url,
            &[
                ("ca_file", ca),
                ("cert_file", &pki.client_cert()),
                ("key_file", key),
            ],
        );
        let out = run(doorbridge().arg("--config").arg(&home.config), ["doctor"]);
        assert_eq!(out.code, Some(2), "{out:?}");
        out.stdout
    };
    let line = |text: &str, start: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in:\n{text}"))
            .to_owned()
    };

    let good = doctor(&pki.ca_file(), &pki.client_key());
    eprintln!("{good}");
    // Valid for two days from today: a warning that it expires soon.
    assert!(
        line(&good, "WARNING tls CA: ").contains("expires on"),
        "{good}"
    );
    assert!(
        line(&good, "WARNING tls client certificate: ").contains("expires on"),
        "{good}"
    );
    assert!(
        line(&good, "OK      tls client key: ")
            .ends_with(&format!("matches {}", pki.client_cert().display())),
        "{good}"
    );
    assert!(
        line(&good, &format!("OK      broker {url}: ")).contains("TCP, TLS, MQTT CONNACK accepted"),
        "{good}"
    );

    let other_ca = doctor(&pki.other_ca_file(), &pki.client_key());
    assert!(
        line(&other_ca, &format!("FAIL    broker {url}: ")).contains("TLS handshake failed"),
        "{other_ca}"
    );

    let wrong_key = doctor(&pki.ca_file(), &pki.path("server.key"));
    assert!(
        line(&wrong_key, "FAIL    tls client key: ").contains(&format!(
            "is not the key of {}",
            pki.client_cert().display()
        )),
        "{wrong_key}"
    );
}
