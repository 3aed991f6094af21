//! The link's connection set-up from the configuration: which gateway and topics, the
//! trusted keys, one set of MQTT options per broker, and TLS (rustls with the configured CA,
//! client certificate and key). Nothing here connects: the poller does.

use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::super::payload::{MAX_ENVELOPE_BYTES, Target};
use super::super::report::{Presence, Report};
use super::super::topics::{Channel, TopicError, Topics};
use crate::config::{BrokerUrl, Config};

/// Why the link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cloud topics: {0}")]
    Topics(#[from] TopicError),
    #[error("cloud.trusted_keys[{index}] is not a usable Ed25519 public key")]
    TrustedKey { index: usize },
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {expected}")]
    TlsPem {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no CA certificate to verify the broker with (set cloud.tls.ca_file)")]
    NoRoots,
}

impl LinkError {
    /// None of these clear by themselves: the configuration or its files must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Everything the link runs with.
#[derive(Clone)]
pub struct LinkSpec {
    pub target: Target,
    pub topics: Topics,
    pub trusted: Vec<VerifyingKey>,
    /// One set of connection options per configured broker, in the order they are tried.
    pub brokers: Vec<MqttOptions>,
    /// The largest message the gateway publishes (upload batches fill up to it).
    pub max_payload: usize,
}

impl std::fmt::Debug for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSpec")
            .field("target", &self.target)
            .field("trusted", &self.trusted.len())
            .finish_non_exhaustive()
    }
}
/// This gateway as signed messages name it.
pub fn target(config: &Config) -> Target {
    Target {
        site: config.gateway.site_id.clone(),
        gateway: config.gateway.id.clone(),
    }
}

/// The public keys cloud messages must be signed with.
pub fn trusted_keys(config: &Config) -> Result<Vec<VerifyingKey>, LinkError> {
    config
        .cloud
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(index, k)| {
            VerifyingKey::from_bytes(k.as_bytes()).map_err(|_| LinkError::TrustedKey { index })
        })
        .collect()
}

/// Builds the link's settings from the configuration (reads the TLS files).
pub fn spec(config: &Config) -> Result<LinkSpec, LinkError> {
    let target = target(config);
    let topics = Topics::new(&config.cloud.topic_prefix, &target)?;
    let trusted = trusted_keys(config)?;
    let tls = if config.cloud.url.any_tls() {
        Some(Arc::new(tls_config(config)?))
    } else {
        None
    };
    let max_payload = usize::try_from(config.cloud.max_payload).unwrap_or(usize::MAX);
    let brokers = config
        .cloud
        .url
        .iter()
        .map(|url| broker_options(config, &topics, url, tls.as_ref(), max_payload))
        .collect();
    Ok(LinkSpec {
        target,
        topics,
        trusted,
        brokers,
        max_payload,
    })
}

/// The largest packet the gateway reads: a key-set chunk in its envelope must fit, with room
/// to spare. A larger one cannot be read at all (see `poll` for what happens then).
pub fn max_incoming_packet(max_payload: usize) -> usize {
    (4 * max_payload.max(MAX_ENVELOPE_BYTES)).max(1 << 20) + 1024
}

/// The connection options for one broker URL. TLS names are checked against that URL's host.
fn broker_options(
    config: &Config,
    topics: &Topics,
    url: &BrokerUrl,
    tls: Option<&Arc<rustls::ClientConfig>>,
    max_payload: usize,
) -> MqttOptions {
    let cloud = &config.cloud;
    let mut options = MqttOptions::new(&config.gateway.id, &url.host, url.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cloud.keepalive);
    options.set_max_packet_size(max_incoming_packet(max_payload), max_payload + 1024);
    options.set_last_will(LastWill::new(
        topics.topic(Channel::State),
        Report::State {
            state: Presence::Offline,
            gateway: config.gateway.id.clone(),
            held: None,
            identity: None,
        }
        .encode(),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &cloud.username {
        let password = cloud
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        options.set_credentials(user, password);
    }
    if let (true, Some(tls)) = (url.tls, tls) {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(tls),
        )));
    }
    options
}

/// rustls with ring: the pinned CA (or the system's roots) and the client certificate.
fn tls_config(config: &Config) -> Result<rustls::ClientConfig, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = &config.cloud.tls;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &tls.ca_file {
        let pem = read_file("CA file", ca)?;
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(pem_error("CA file", ca, "certificate"));
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(LinkError::NoRoots);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read_file("client certificate", cert)?;
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&pem).flatten().collect();
            if chain.is_empty() {
                return Err(pem_error("client certificate", cert, "certificate"));
            }
            let pem = read_file("client key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|_| pem_error("client key", key, "private key"))?;
            Ok(builder.with_client_auth_cert(chain, key_der)?)
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::TlsFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, expected: &'static str) -> LinkError {
    LinkError::TlsPem {
        what,
        path: path.display().to_string(),
        expected,
    }
}
