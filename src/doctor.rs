//! `doorbridge doctor`: checks a site's installation the way an installer would by hand, one
//! verdict per check (OK, WARNING, FAIL) with a one-line hint, like `iotedge check`.
//!
//! The checks are independent (a failing one does not stop the rest) and read-only: serial
//! ports are opened non-blocking and closed at once, the database is opened read-only, the
//! broker is asked with its own client id and a clean session so that the daemon's session is
//! never taken over. The judgements (dates, disk thresholds, the overall verdict) are pure
//! functions, tested below; the probes around them touch the real system.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::config::{BrokerUrl, Config};

/// How long a TCP connect, and then the TLS handshake and MQTT CONNACK, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Less free space than this on the database's file system is a warning.
pub const MIN_FREE_BYTES: u64 = 100 << 20;
/// Less free space than this share (percent) of the file system is a warning.
pub const MIN_FREE_PERCENT: u64 = 10;
/// A held key set signed longer ago than this is a warning: the cloud may not be reaching us.
pub const MAX_KEYSET_AGE: SignedDuration = SignedDuration::from_hours(30 * 24);
/// A certificate expiring sooner than this is a warning.
pub const CERT_EXPIRY_WARNING: SignedDuration = SignedDuration::from_hours(30 * 24);

/// The verdict of one check; the worst one decides the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warning,
    Fail,
}

impl Verdict {
    /// The word printed in front of the check.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Warning => "WARNING",
            Verdict::Fail => "FAIL",
        }
    }

    /// The exit status: 0 all OK, 1 a warning, 2 a failure.
    pub fn code(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Warning => 1,
            Verdict::Fail => 2,
        }
    }
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked, e.g. `serial port entrance` or `broker mqtts://host:8883`.
    pub check: String,
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it (for WARNING and FAIL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// How long the check took, for checks that talk to the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            hint: None,
            took_ms: None,
        }
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            verdict: Verdict::Warning,
            hint: Some(hint.into()),
            ..Check::ok(check, detail)
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check {
            verdict: Verdict::Fail,
            hint: Some(hint.into()),
            ..Check::ok(check, detail)
        }
    }

    /// The configuration did not load: the first and only check (`problems` one per line).
    pub fn configuration_failed(file: &Path, problems: &str) -> Check {
        let problems: Vec<&str> = problems.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut detail = format!(
            "{} does not load ({} {}):",
            file.display(),
            problems.len(),
            if problems.len() == 1 {
                "problem"
            } else {
                "problems"
            }
        );
        for problem in problems {
            let _ = write!(detail, "\n{problem}");
        }
        Check::fail(
            "configuration",
            detail,
            "fix each problem (doorbridge check-config lists them as SOURCE: KEY: PROBLEM)",
        )
    }

    /// The check as text: the verdict and what was found, then the hint on its own line.
    pub fn text(&self) -> String {
        // A detail of several lines (configuration problems) goes under the check, indented.
        let detail = self.detail.replace('\n', "\n        ");
        let mut line = format!("{:<8}{}: {detail}", self.verdict.word(), self.check);
        if let Some(ms) = self.took_ms {
            let _ = write!(line, " ({ms} ms)");
        }
        if let Some(hint) = &self.hint {
            let _ = write!(line, "\n        hint: {hint}");
        }
        line
    }
}

/// The overall verdict: the worst of all checks (OK when there are none).
pub fn overall(checks: &[Check]) -> Verdict {
    checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Ok)
}

/// What the doctor is asked to do beyond the quick checks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// `PRAGMA integrity_check` (every page and index; minutes on a large store) instead of
    /// `quick_check`.
    pub full: bool,
}

/// Runs every check after the configuration loaded from `file`, calling `each` as each one
/// completes (the broker checks take seconds: the operator sees progress).
pub fn run(config: &Config, file: &Path, options: Options, mut each: impl FnMut(&Check)) {
    let mut emit = |c: Check| each(&c);
    emit(Check::ok(
        "configuration",
        format!("{} loads", file.display()),
    ));
    for bus in &config.buses {
        emit(serial_port(config, &bus.label(), &bus.port));
    }
    for c in tls(config) {
        emit(c);
    }
    for c in brokers(config) {
        emit(c);
    }
    emit(clock());
    for c in disk(config) {
        emit(c);
    }
    for c in database(config, options, Timestamp::now()) {
        emit(c);
    }
}

// ---------------------------------------------------------------------------------------------
// Serial ports

/// The port exists and this user can open it read/write. Opened with `O_NONBLOCK | O_NOCTTY`
/// (no wait for carrier, never our controlling terminal) and closed at once: this never takes
/// the port away from the running daemon.
fn serial_port(config: &Config, label: &str, port: &Path) -> Check {
    let shown = port.display();
    // An unnamed bus is labelled by its port, which the detail already shows.
    let name = if Path::new(label) == port {
        "serial port".to_owned()
    } else {
        format!("serial port {label}")
    };
    if !port.exists() {
        return Check::fail(
            name,
            format!("{shown} does not exist"),
            "set buses.port to the adapter's device; `ls -l /dev/serial/by-id` lists the \
             adapters plugged in (their by-id names stay the same across reboots)",
        );
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(port);
    match opened {
        Ok(file) => {
            drop(file);
            Check::ok(name, format!("{shown} opens read/write"))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Check::fail(
            name,
            format!("{shown}: permission denied"),
            format!(
                "the service user must be in the port's group ({}): \
                 sudo usermod -aG dialout doorbridge",
                group_of(port).unwrap_or_else(|| "usually dialout".to_owned())
            ),
        ),
        // The daemon opens its ports exclusively (TIOCEXCL): busy is what a running site is.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && daemon_running(config) => Check::ok(
            name,
            format!("{shown} is in use by the running doorbridge daemon"),
        ),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Check::warn(
            name,
            format!("{shown} is busy and the daemon is not running"),
            format!("another program holds it: `fuser -v {shown}` names it"),
        ),
        Err(e) => Check::fail(
            name,
            format!("{shown} cannot be opened: {e}"),
            "is it a serial device? check buses.port and the adapter (dmesg)",
        ),
    }
}

/// The name of the group owning `path`, from /etc/group.
fn group_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(path).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut fields = l.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    })
}

/// Whether the daemon answers on its control socket.
fn daemon_running(config: &Config) -> bool {
    std::os::unix::net::UnixStream::connect(crate::control::socket_path(&config.storage.path))
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// TLS files

/// The CA, client certificate and key: readable, PEM, valid today, key matching certificate.
fn tls(config: &Config) -> Vec<Check> {
    if !config.cloud.url.any_tls() {
        return vec![Check::ok("tls", "plain mqtt://, no TLS to check")];
    }
    let now = Timestamp::now();
    let files = &config.cloud.tls;
    let mut checks = Vec::new();
    checks.push(match &files.ca_file {
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                Check::fail(
                    "tls CA",
                    "no cloud.tls.ca_file and the system trust store is empty",
                    "install ca-certificates, or set cloud.tls.ca_file to the broker's CA (PEM)",
                )
            } else {
                Check::ok(
                    "tls CA",
                    format!(
                        "the system trust store ({} certificates)",
                        found.certs.len()
                    ),
                )
            }
        }
        Some(path) => certificate_file("tls CA", "cloud.tls.ca_file", path, now),
    });
    match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let check =
                certificate_file("tls client certificate", "cloud.tls.cert_file", cert, now);
            let failed = check.verdict == Verdict::Fail;
            checks.push(check);
            checks.push(client_key(key, (!failed).then_some(cert.as_path())));
        }
        (None, None) => {}
        _ => checks.push(Check::fail(
            "tls client certificate",
            "only one of cloud.tls.cert_file and cloud.tls.key_file is set",
            "set both (the certificate and its private key) or neither",
        )),
    }
    checks
}

/// A PEM certificate file: readable, parsed, and each certificate valid at `now`.
fn certificate_file(name: &str, key: &str, path: &Path, now: Timestamp) -> Check {
    let shown = path.display();
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot read {shown}: {e}"),
                format!("check {key}; the service user (doorbridge) must be able to read it"),
            );
        }
    };
    let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&pem).flatten().collect();
    if certs.is_empty() {
        return Check::fail(
            name,
            format!("{shown} holds no PEM certificate"),
            format!("{key} must name a PEM file (-----BEGIN CERTIFICATE-----)"),
        );
    }
    let mut worst = Check::ok(name, format!("{shown}: {} certificate(s)", certs.len()));
    for (i, cert) in certs.iter().enumerate() {
        let Some((not_before, not_after)) = validity(cert) else {
            return Check::fail(
                name,
                format!("{shown}: certificate {} cannot be parsed", i + 1),
                format!("{key} must hold X.509 certificates"),
            );
        };
        let (verdict, said) = judge_validity(not_before, not_after, now);
        let which = if certs.len() > 1 {
            format!("{shown} (certificate {})", i + 1)
        } else {
            shown.to_string()
        };
        let check = match verdict {
            Verdict::Ok => Check::ok(name, format!("{which}: {said}")),
            Verdict::Warning => Check::warn(
                name,
                format!("{which}: {said}"),
                "renew it before it expires; the broker refuses an expired one",
            ),
            Verdict::Fail => Check::fail(
                name,
                format!("{which}: {said}"),
                "renew it, or check the clock (the clock check below)",
            ),
        };
        // The first certificate is reported when all are OK; otherwise the worst one.
        if check.verdict > worst.verdict || (i == 0 && check.verdict == Verdict::Ok) {
            worst = check;
        }
    }
    worst
}

/// The client key: readable, PEM, and (when the certificate parsed) matching its public key.
fn client_key(path: &Path, cert: Option<&Path>) -> Check {
    let name = "tls client key";
    let shown = path.display();
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot read {shown}: {e}"),
                "check cloud.tls.key_file; the service user (doorbridge) must read it (mode 0640, \
                 group doorbridge)",
            );
        }
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(&pem) else {
        return Check::fail(
            name,
            format!("{shown} holds no PEM private key"),
            "cloud.tls.key_file must name the certificate's private key in PEM",
        );
    };
    let Some(cert_path) = cert else {
        return Check::ok(name, format!("{shown}: a private key"));
    };
    let Some(cert) = std::fs::read(cert_path)
        .ok()
        .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok())
    else {
        return Check::ok(name, format!("{shown}: a private key"));
    };
    match keys_match(cert, key) {
        Some(true) => Check::ok(name, format!("{shown} matches {}", cert_path.display())),
        Some(false) => Check::fail(
            name,
            format!("{shown} is not the key of {}", cert_path.display()),
            "cloud.tls.key_file and cloud.tls.cert_file must be a pair (compare \
             `openssl x509 -noout -pubkey` with `openssl pkey -pubout`)",
        ),
        None => Check::ok(
            name,
            format!("{shown}: a private key (its match with the certificate cannot be told)"),
        ),
    }
}

/// Whether `key` is the private key of `cert`; `None` when that cannot be told (a key type
/// ring does not load).
fn keys_match(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Option<bool> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).ok()?;
    match rustls::sign::CertifiedKey::new(vec![cert], signing).keys_match() {
        Ok(()) => Some(true),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Some(false),
        Err(_) => None,
    }
}

/// What to say of a certificate valid from `not_before` to `not_after`, at `now`.
pub fn judge_validity(
    not_before: Timestamp,
    not_after: Timestamp,
    now: Timestamp,
) -> (Verdict, String) {
    let day = |t: Timestamp| t.strftime("%Y-%m-%d").to_string();
    if now < not_before {
        (
            Verdict::Fail,
            format!("not valid before {} (not yet valid)", day(not_before)),
        )
    } else if now > not_after {
        (Verdict::Fail, format!("expired on {}", day(not_after)))
    } else if not_after.duration_since(now) < CERT_EXPIRY_WARNING {
        let days = not_after.duration_since(now).as_hours() / 24;
        let within = match days {
            0 => "within a day".to_owned(),
            1 => "in 1 day".to_owned(),
            n => format!("in {n} days"),
        };
        (
            Verdict::Warning,
            format!("expires on {} ({within})", day(not_after)),
        )
    } else {
        (Verdict::Ok, format!("valid until {}", day(not_after)))
    }
}

/// The notBefore and notAfter of an X.509 certificate (DER). A few lines of DER walking rather
/// than an X.509 crate: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter } … } … }`.
pub fn validity(der: &[u8]) -> Option<(Timestamp, Timestamp)> {
    let (tag, cert, _) = tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xA0 {
        tbs = rest; // the explicit version
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2; // serialNumber, signature, issuer
    }
    let (tag, validity, _) = tlv(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag1, first, rest) = tlv(validity)?;
    let (tag2, second, _) = tlv(rest)?;
    Some((der_time(tag1, first)?, der_time(tag2, second)?))
}

/// One DER tag-length-value: the tag, the value and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A `UTCTime` (`YYMMDDHHMMSSZ`, years 1950–2049) or `GeneralizedTime` (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let full = match tag {
        0x17 => {
            let yy: u32 = text.get(..2)?.parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        0x18 => text.to_owned(),
        _ => return None,
    };
    let digits = full.strip_suffix('Z')?;
    if digits.len() != 14 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &digits[..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14]
    );
    iso.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// Each broker URL: DNS, TCP, then TLS and MQTT CONNECT/CONNACK with the configured
/// credentials, under the client id `{gateway}-doctor` with a clean session and no will.
fn brokers(config: &Config) -> Vec<Check> {
    // The link's own TLS setup (CA, client certificate); plain URLs are tried without it.
    let spec = crate::cloud::link::spec(config).map_err(|e| e.to_string());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return vec![Check::fail(
                "broker",
                format!("cannot start the async runtime: {e}"),
                "the system is short of resources (file descriptors, threads)",
            )];
        }
    };
    config
        .cloud
        .url
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let transport = match (&spec, url.tls) {
                (_, false) => Ok(rumqttc::Transport::tcp()),
                (Ok(spec), true) => spec
                    .brokers
                    .get(i)
                    .map(MqttOptions::transport)
                    .ok_or_else(|| "no options for it".to_owned()),
                (Err(e), true) => Err(e.clone()),
            };
            let started = Instant::now();
            let mut check = broker(config, url, transport, &runtime);
            check.took_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            check
        })
        .collect()
}

fn url_text(url: &BrokerUrl) -> String {
    let scheme = if url.tls { "mqtts" } else { "mqtt" };
    if url.host.contains(':') {
        format!("{scheme}://[{}]:{}", url.host, url.port)
    } else {
        format!("{scheme}://{}:{}", url.host, url.port)
    }
}

fn broker(
    config: &Config,
    url: &BrokerUrl,
    transport: Result<rumqttc::Transport, String>,
    runtime: &tokio::runtime::Runtime,
) -> Check {
    let name = format!("broker {}", url_text(url));
    let transport = match transport {
        Ok(transport) => transport,
        Err(e) => {
            return Check::fail(
                name,
                format!("not tried: TLS cannot be set up: {e}"),
                "fix the TLS files first (the tls checks above)",
            );
        }
    };
    let addresses: Vec<SocketAddr> = match (url.host.as_str(), url.port).to_socket_addrs() {
        Ok(found) => found.collect(),
        Err(e) => {
            return Check::fail(
                name,
                format!("DNS: cannot resolve {}: {e}", url.host),
                "check the host name in cloud.url, and the resolver (/etc/resolv.conf, \
                 resolvectl status)",
            );
        }
    };
    let mut last_error = None;
    let mut reached = None;
    for addr in &addresses {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(_) => {
                reached = Some(*addr);
                break;
            }
            Err(e) => last_error = Some(format!("{addr}: {e}")),
        }
    }
    let Some(addr) = reached else {
        return Check::fail(
            name,
            format!(
                "TCP: cannot connect ({})",
                last_error.unwrap_or_else(|| "no address".to_owned())
            ),
            format!(
                "is the broker up and listening on port {}? a firewall between? \
                 (nc -vz {} {})",
                url.port, url.host, url.port
            ),
        );
    };
    // Not the link's options: those carry the daemon's client id, a persistent session and
    // its "offline" will, none of which a probe may touch.
    let mut options = MqttOptions::new(
        format!("{}-doctor", config.gateway.id),
        url.host.clone(),
        url.port,
    );
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_transport(transport);
    if let Some(user) = &config.cloud.username {
        let password = config
            .cloud
            .password
            .as_ref()
            .map(|p| p.expose().to_owned());
        options.set_credentials(user, password.unwrap_or_default());
    }
    let tls = if url.tls { "TLS, " } else { "" };
    match runtime.block_on(mqtt_connack(options)) {
        Ok(()) => Check::ok(name, format!("{addr}: TCP, {tls}MQTT CONNACK accepted")),
        Err(ConnectError::Refused(code)) => Check::fail(
            name,
            format!("{addr}: the broker refused the connection: {code}"),
            "check cloud.username and cloud.password (and the broker's ACL for this gateway)",
        ),
        Err(ConnectError::Tls(e)) => Check::fail(
            name,
            format!("{addr}: TLS handshake failed: {e}"),
            format!(
                "the broker's certificate must be signed by the CA (cloud.tls.ca_file) and \
                 name {}; a broker requiring client certificates needs cloud.tls.cert_file",
                url.host
            ),
        ),
        Err(ConnectError::Other(e)) => Check::fail(
            name,
            format!("{addr}: MQTT: {e}"),
            "is it an MQTT broker on that port, and is the scheme (mqtt:// or mqtts://) right?",
        ),
    }
}

enum ConnectError {
    Refused(String),
    Tls(String),
    Other(String),
}

/// Connects, waits for the CONNACK, disconnects at once.
async fn mqtt_connack(options: MqttOptions) -> Result<(), ConnectError> {
    let (client, mut events) = AsyncClient::new(options, 10);
    let connack = tokio::time::timeout(2 * CONNECT_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(ConnectError::Refused(format!("{code:?}")));
                }
                Err(ConnectionError::Tls(e)) => return Err(ConnectError::Tls(e.to_string())),
                Err(e) => return Err(ConnectError::Other(e.to_string())),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(ConnectError::Other(format!(
            "no CONNACK within {} s",
            (2 * CONNECT_TIMEOUT).as_secs()
        )))
    });
    if connack.is_ok() {
        // A clean DISCONNECT: the broker drops the session at once.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    }
    connack
}

// ---------------------------------------------------------------------------------------------
// Clock, disk, database

/// Whether the kernel says an NTP daemon keeps the clock synchronised (`adjtimex`).
fn clock() -> Check {
    let hint = "install and enable an NTP daemon (systemd-timesyncd, chrony or ntpd): door \
                rules and key validity depend on the time";
    match crate::task::kernel_clock() {
        None => Check::warn(
            "clock",
            "the kernel clock state cannot be read (adjtimex)",
            hint,
        ),
        Some(c) if crate::task::synced(&c) => Check::ok(
            "clock",
            format!("synchronised (maximum error {} ms)", c.maxerror_us / 1000),
        ),
        Some(c) => Check::warn(
            "clock",
            format!(
                "not synchronised (maximum error {} s)",
                c.maxerror_us / 1_000_000
            ),
            hint,
        ),
    }
}

/// What to say of `free` bytes left of `total` on the database's file system.
pub fn judge_disk(free: u64, total: u64) -> (Verdict, String) {
    let percent = if total == 0 {
        0
    } else {
        u64::try_from(u128::from(free) * 100 / u128::from(total)).unwrap_or(100)
    };
    let said = format!("{} free of {} ({percent} %)", human(free), human(total));
    if free < MIN_FREE_BYTES || percent < MIN_FREE_PERCENT {
        (Verdict::Warning, said)
    } else {
        (Verdict::Ok, said)
    }
}

/// Bytes for people: `812 MiB`, `14.2 GiB`.
fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= 10 * GIB {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{}.{} GiB", bytes / GIB, bytes % GIB * 10 / GIB)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

/// Free space on the database's file system, and the disk reserve file.
fn disk(config: &Config) -> Vec<Check> {
    let db = &config.storage.path;
    let dir = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut checks = vec![match statvfs(dir) {
        Ok((free, total)) => match judge_disk(free, total) {
            (Verdict::Ok, said) => Check::ok("disk", format!("{}: {said}", dir.display())),
            (_, said) => Check::warn(
                "disk",
                format!("{}: {said}", dir.display()),
                format!(
                    "free space (under {} % or {} MiB is low): the outbox keeps records on \
                     disk while the cloud is away",
                    MIN_FREE_PERCENT,
                    MIN_FREE_BYTES >> 20
                ),
            ),
        },
        Err(e) => Check::fail(
            "disk",
            format!("cannot read {}: {e}", dir.display()),
            "the directory of storage.path must exist and be the service's",
        ),
    }];
    if config.storage.reserve > 0 {
        let mut name = db.as_os_str().to_owned();
        name.push(".reserve");
        let reserve = Path::new(&name);
        checks.push(match std::fs::metadata(reserve) {
            Ok(m) if m.len() >= config.storage.reserve => {
                Check::ok("disk reserve", format!("{} present", reserve.display()))
            }
            _ => Check::warn(
                "disk reserve",
                format!("{} is missing or short", reserve.display()),
                "the daemon writes it at start and releases it when the disk fills: if the \
                 daemon runs, the disk filled (see the disk check); it is rewritten once there \
                 is room",
            ),
        });
    }
    checks
}

/// Free (for unprivileged users) and total bytes of the file system holding `dir`.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
    // SAFETY: `statvfs` is plain old data, zeroed is a valid value; `path` is a NUL-terminated
    // string alive for the call and the pointer to `stat` is to a live, exclusively borrowed
    // struct the call only writes.
    #[allow(unsafe_code)]
    let (rc, stat) = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &raw mut stat), stat)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field widths differ between architectures
    let (frsize, avail, blocks) = (
        u64::from(stat.f_frsize),
        u64::from(stat.f_bavail),
        u64::from(stat.f_blocks),
    );
    Ok((avail.saturating_mul(frsize), blocks.saturating_mul(frsize)))
}

/// What to say of the held key set, signed at `issued_at`, at `now`.
pub fn judge_key_set(
    version: u64,
    keys: u64,
    issued_at: Option<Timestamp>,
    now: Timestamp,
) -> Check {
    if version == 0 {
        return Check::fail(
            "key set",
            "none held: every door request is refused",
            "the gateway fetches it once the broker is reachable (broker checks above), or \
             `doorbridge keys import FILE` on a site without internet",
        );
    }
    let keys = if keys == 1 {
        "1 key".to_owned()
    } else {
        format!("{keys} keys")
    };
    let Some(issued) = issued_at else {
        return Check::ok("key set", format!("version {version}, {keys}"));
    };
    let age = now.duration_since(issued);
    let days = age.as_hours() / 24;
    let said = format!(
        "version {version}, {keys}, signed {} ({days} days ago)",
        issued.strftime("%Y-%m-%d %H:%M UTC")
    );
    if age > MAX_KEYSET_AGE {
        Check::warn(
            "key set",
            said,
            "no newer key set for a month: is the cloud reaching this gateway (doorbridge status)?",
        )
    } else {
        Check::ok("key set", said)
    }
}

/// The database opens read-only and passes `quick_check` (or `integrity_check`), and holds a
/// key set.
fn database(config: &Config, options: Options, now: Timestamp) -> Vec<Check> {
    let db = &config.storage.path;
    let shown = db.display();
    if !db.exists() {
        return vec![Check::fail(
            "database",
            format!("no database at {shown} (storage.path)"),
            "start the service once (systemctl start doorbridge): it creates the database",
        )];
    }
    let reader = match crate::store::Reader::open(db) {
        Ok(reader) => reader,
        Err(e) => {
            return vec![Check::fail(
                "database",
                format!("{shown} does not open: {e}"),
                "run doctor as the service user or root; a corrupt file is moved aside by the \
                 service at start",
            )];
        }
    };
    let pragma = if options.full {
        "integrity_check"
    } else {
        "quick_check"
    };
    let mut checks = vec![
        match crate::store::schema::check(reader.connection(), pragma) {
            Ok(()) => Check::ok("database", format!("{shown}: {pragma} ok")),
            Err(found) => Check::fail(
                "database",
                format!("{shown}: {pragma} found: {found}"),
                "stop the service and start it again: it checks the file at start and moves a \
                 corrupt one aside (the key set is fetched again)",
            ),
        },
    ];
    checks.push(match reader.key_set() {
        Ok(k) => judge_key_set(k.version, k.keys, k.issued_at, now),
        Err(e) => Check::fail(
            "key set",
            format!("cannot be read: {e}"),
            "see the database check",
        ),
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway self-signed certificate and its key (test only), made with
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650
    /// -subj /CN=doctor-test`: valid from 2026-12-04 22:30:45 to 2036-12-01 22:30:45 UTC.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBgjCCASegAwIBAgIUeo0GRDWR0ofVZRXT0rthxU8kKrAwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLZG9jdG9yLXRlc3QwHhcNMjYxMjA0MjIzMDQ1WhcNMzYxMjAx
MjIzMDQ1WjAWMRQwEgYDVQQDDAtkb2N0b3ItdGVzdDBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABC78VjxPvJpLUCqv34tqlSRBTGDwgcbHsm/vyx2IzvXmumkoaJa0
kaonX4ZlAyhyv64Tn/bI9NwtSg0GcB1R5/OjUzBRMB0GA1UdDgQWBBTF+T4dYvxu
Cl1y940Pj21KaAXmHjAfBgNVHSMEGDAWgBTF+T4dYvxuCl1y940Pj21KaAXmHjAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCLuLz4WGxRRUfCr5Z3
9XYmIcsqNt6qVUYckMntrfupDwIhAIoM9pRICDR+IAEoXT+DKHJBFNbR/E9RPA4r
EqqgmFOA
-----END CERTIFICATE-----";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgF84zG2YpnCZywaf/
TjVzdl+DqChUPuMTyiypVXFDWVqhRANCAAQu/FY8T7yaS1Aqr9+LapUkQUxg8IHG
x7Jv78sdiM715rppKGiWtJGqJ1+GZQMocr+uE5/2yPTcLUoNBnAdUefz
-----END PRIVATE KEY-----";
    /// Another P-256 key (test only), not the certificate's.
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgi0qOpAogAEc7MAwI
yV9n2NabEE6NqeEfXY+vNT8DNzWhRANCAARBEiRayTyRfkrHi8MR8e0enyyDKFKt
7rytbv5vRL23bqJFtIW5zQWWN2ATfHJVoDs+r0nRCaW6It+EVSeM5u1w
-----END PRIVATE KEY-----";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn check(verdict: Verdict) -> Check {
        Check {
            verdict,
            ..Check::ok("x", "y")
        }
    }

    #[test]
    fn the_worst_check_decides_the_exit_status() {
        assert_eq!(overall(&[]).code(), 0);
        assert_eq!(overall(&[check(Verdict::Ok), check(Verdict::Ok)]).code(), 0);
        assert_eq!(
            overall(&[check(Verdict::Ok), check(Verdict::Warning)]).code(),
            1
        );
        assert_eq!(
            overall(&[
                check(Verdict::Fail),
                check(Verdict::Warning),
                check(Verdict::Ok)
            ])
            .code(),
            2
        );
    }

    #[test]
    fn a_failed_check_prints_its_hint_under_it() {
        let c = Check::fail(
            "serial port entrance",
            "/dev/ttyUSB9 does not exist",
            "ls it",
        );
        assert_eq!(
            c.text(),
            "FAIL    serial port entrance: /dev/ttyUSB9 does not exist\n        hint: ls it"
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["verdict"], "fail");
        assert_eq!(json["hint"], "ls it");
        assert!(json.get("took_ms").is_none());
    }

    #[test]
    fn the_validity_of_a_real_certificate_is_read() {
        let der = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        assert_eq!(
            validity(&der),
            Some((ts("2026-12-04T22:30:45Z"), ts("2036-12-01T22:30:45Z")))
        );
        assert_eq!(validity(&der[..40]), None, "a truncated certificate");
        assert_eq!(validity(b"\x30\x03\x02\x01\x01"), None);
    }

    #[test]
    fn both_time_encodings_are_read() {
        assert_eq!(
            der_time(0x17, b"491231235959Z"),
            Some(ts("2049-12-31T23:59:59Z"))
        );
        assert_eq!(
            der_time(0x17, b"500101000000Z"),
            Some(ts("1950-01-01T00:00:00Z"))
        );
        assert_eq!(
            der_time(0x18, b"20500101000000Z"),
            Some(ts("2050-01-01T00:00:00Z"))
        );
        assert_eq!(der_time(0x18, b"2050010100000Z"), None);
        assert_eq!(der_time(0x04, b"20500101000000Z"), None);
    }

    #[test]
    fn certificates_are_judged_by_today() {
        let (from, to) = (ts("2026-01-01T00:00:00Z"), ts("2027-01-01T00:00:00Z"));
        let judge = |now| judge_validity(from, to, ts(now));
        assert_eq!(
            judge("2025-12-31T00:00:00Z"),
            (
                Verdict::Fail,
                "not valid before 2026-01-01 (not yet valid)".into()
            )
        );
        assert_eq!(
            judge("2026-06-01T00:00:00Z"),
            (Verdict::Ok, "valid until 2027-01-01".into())
        );
        assert_eq!(
            judge("2026-12-22T00:00:00Z"),
            (
                Verdict::Warning,
                "expires on 2027-01-01 (in 10 days)".into()
            )
        );
        assert_eq!(
            judge("2026-12-30T23:00:00Z"),
            (Verdict::Warning, "expires on 2027-01-01 (in 1 day)".into())
        );
        assert_eq!(
            judge("2027-01-02T00:00:00Z"),
            (Verdict::Fail, "expired on 2027-01-01".into())
        );
    }

    #[test]
    fn a_key_matches_its_certificate_only() {
        let cert = || CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(keys_match(cert(), key(KEY)), Some(true));
        assert_eq!(keys_match(cert(), key(OTHER_KEY)), Some(false));
    }

    #[test]
    fn little_free_space_is_a_warning() {
        const GIB: u64 = 1 << 30;
        assert_eq!(judge_disk(8 * GIB, 32 * GIB).0, Verdict::Ok);
        // 5 %: under the share even with gigabytes left.
        assert_eq!(judge_disk(GIB, 20 * GIB).0, Verdict::Warning);
        // 50 MiB of a tiny partition: under the absolute floor even at 50 %.
        assert_eq!(judge_disk(50 << 20, 100 << 20).0, Verdict::Warning);
        assert_eq!(judge_disk(0, 0).0, Verdict::Warning);
        assert_eq!(
            judge_disk(8 * GIB, 32 * GIB).1,
            "8.0 GiB free of 32 GiB (25 %)"
        );
        assert_eq!(
            judge_disk(50 << 20, 100 << 20).1,
            "50 MiB free of 100 MiB (50 %)"
        );
    }

    #[test]
    fn no_key_set_fails_and_an_old_one_warns() {
        let now = ts("2026-12-04T00:00:00Z");
        assert_eq!(judge_key_set(0, 0, None, now).verdict, Verdict::Fail);
        let fresh = judge_key_set(7, 120, Some(ts("2026-12-01T00:00:00Z")), now);
        assert_eq!(fresh.verdict, Verdict::Ok);
        assert_eq!(
            fresh.detail,
            "version 7, 120 keys, signed 2026-12-01 00:00 UTC (3 days ago)"
        );
        let old = judge_key_set(7, 120, Some(ts("2026-10-01T00:00:00Z")), now);
        assert_eq!(old.verdict, Verdict::Warning);
    }
}
