//! The control socket: how operator commands (`doorbridge status`, `doorbridge events tail`)
//! ask the running daemon what only it knows (the cloud connection, the door units, what
//! happened lately).
//!
//! A Unix stream socket next to the database, `{storage.path}.sock` (mode 0660: root and the
//! service's group). One request per connection, a JSON line; the answer is JSON lines:
//!
//! - `{"get":"status"}` → one [`Status`];
//! - `{"get":"events","last":N,"follow":bool}` → the last `N` committed records (at most
//!   [`crate::store::RECENT_RECORDS`]) as [`Event`]s, then, with `follow`, each new one as it
//!   is committed until the client hangs up.
//!
//! Everything else an operator reads (keys, the held set) comes from the database through a
//! read-only connection, which works whether the daemon runs or not.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::cloud::link::LinkStatus;
use crate::cloud::telemetry::{self, BusProbe, Summary, TelemetrySpec};
use crate::store::{Record, Store};
use crate::task::stopped;

/// The longest request line read.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// Where the control socket of the store at `db` lives.
pub fn socket_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "get", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Events {
        #[serde(default)]
        last: usize,
        #[serde(default)]
        follow: bool,
    },
}

/// The daemon's answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the daemon answered (`false`: read from the database alone, `health` partial).
    #[serde(default = "yes")]
    pub running: bool,
    /// doorbridge's version.
    pub version: String,
    pub pid: u32,
    pub site: String,
    pub cloud: CloudStatus,
    /// The same picture the telemetry summary sends (key set, outbox, clock, buses, units).
    pub health: Summary,
    /// The disk refuses writes: records wait in memory (`docs/storage.md`).
    #[serde(default)]
    pub storage_degraded: bool,
    /// The public key of the gateway's identity (64 hex digits) that signs its record chain,
    /// for enrolment (docs/cloud-protocol.md §12.6); null before the first start.
    #[serde(default)]
    pub identity: Option<String>,
}

fn yes() -> bool {
    true
}

/// The cloud connection, as the link sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudStatus {
    /// `host:port` of the broker connected to, or being tried (`cloud.url` may list several).
    pub broker: String,
    pub connected: bool,
    /// Since when there has been no broker connection (null while connected).
    #[serde(default)]
    pub offline_since: Option<jiff::Timestamp>,
    /// Successful connects since start.
    pub connects: u64,
    pub last_error: Option<String>,
    /// Cloud messages refused since start (bad signature, rollback, …).
    pub rejected: u64,
}

/// One committed record, as `events tail` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub record: Record,
}

/// What the server answers from; the bus probes change when a reload restarts the buses.
#[derive(Clone, Debug)]
pub struct ControlState {
    pub store: Store,
    pub link: Arc<Mutex<LinkStatus>>,
    pub telemetry: Arc<Mutex<TelemetrySpec>>,
    pub gateway: String,
    pub site: String,
    pub broker: String,
}

impl ControlState {
    /// Replaces the buses shown (after they were restarted).
    pub fn set_buses(&self, buses: Vec<BusProbe>) {
        if let Ok(mut spec) = self.telemetry.lock() {
            spec.buses = buses;
        }
    }

    /// What `doorbridge status` shows (also the metrics file's figures).
    pub async fn status(&self) -> Status {
        let spec = self.telemetry.lock().map_or_else(
            |_| TelemetrySpec::new(Duration::from_secs(900)),
            |s| s.clone(),
        );
        let health = telemetry::snapshot(&spec, &self.gateway, &self.store, &self.link).await;
        let link = self.link.lock().map(|l| l.clone()).unwrap_or_default();
        Status {
            running: true,
            storage_degraded: self
                .store
                .health()
                .degraded
                .load(std::sync::atomic::Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            site: self.site.clone(),
            cloud: CloudStatus {
                broker: link.broker.clone().unwrap_or_else(|| self.broker.clone()),
                connected: link.connected,
                offline_since: link.offline_since,
                connects: link.connects,
                last_error: link.last_error,
                rejected: link.rejected,
            },
            health,
            identity: crate::store::chain::Identity::load_existing(
                &crate::store::chain::Identity::state_dir(self.store.path()),
            )
            .map(|id| id.public_hex()),
        }
    }
}

/// Why the control socket cannot be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "no daemon answers on {path} ({source}); is it running (systemctl status doorbridge), \
         and may you reach it (run as root or in the doorbridge group)?"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon's answer broke off: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon's answer does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the daemon refused the request: {0}")]
    Refused(String),
}

impl ControlError {
    /// Whether asking again later may help (a daemon starting up, a busy socket).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ControlError::Connect { .. } | ControlError::Io(_) | ControlError::Listen { .. }
        )
    }
}

/// Binds the socket: a stale file left by a daemon that died is replaced, a live one is not.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let listen_error = |source| ControlError::Listen {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(listen_error(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon answers on it",
            )));
        }
        std::fs::remove_file(path).map_err(listen_error)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(listen_error)?;
    Ok(listener)
}

/// Answers clients until `shutdown` turns true, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    state: ControlState,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            // A client.
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &state, stop).await {
                            tracing::debug!(error = %e, "control client");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // The daemon is stopping.
            () = stopped(&mut shutdown) => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(
    stream: UnixStream,
    state: &ControlState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let got = tokio::time::timeout(REQUEST_WITHIN, reader.read_line(&mut line)).await;
    let request = match got {
        Ok(Ok(_)) => serde_json::from_str::<Request>(line.trim()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            let refusal = serde_json::json!({ "error": format!("bad request: {e}") });
            return write.write_all(format!("{refusal}\n").as_bytes()).await;
        }
    };
    match request {
        Request::Status => {
            let status = state.status().await;
            write.write_all(&json_line(&status)).await
        }
        Request::Events { last, follow } => {
            // Subscribed before the history is read, so nothing falls between the two.
            let mut committed = state.store.health().records.subscribe();
            let recent: Vec<(i64, Record)> = state
                .store
                .health()
                .recent
                .lock()
                .map(|r| r.iter().rev().take(last).rev().cloned().collect())
                .unwrap_or_default();
            let mut shown = recent.last().map_or(i64::MIN, |r| r.0);
            for (seq, record) in recent {
                write.write_all(&json_line(&Event { seq, record })).await?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                tokio::select! {
                    // A record was committed.
                    next = committed.recv() => match next {
                        Ok((seq, record)) if seq > shown => {
                            shown = seq;
                            write.write_all(&json_line(&Event { seq, record })).await?;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            let note = serde_json::json!({ "skipped": n });
                            write.write_all(format!("{note}\n").as_bytes()).await?;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    // The daemon is stopping.
                    () = stopped(&mut shutdown) => return Ok(()),
                }
            }
        }
    }
}

fn json_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    out
}

// ----- the client side (operator commands; blocking, no runtime needed) -----

/// Sends `request` to the daemon at `path`; calls `each` with every answer line, decoded,
/// until the daemon ends the answer (or `each` returns false).
pub fn ask<T: for<'de> Deserialize<'de>>(
    path: &Path,
    request: &Request,
    mut each: impl FnMut(T) -> bool,
) -> Result<(), ControlError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    stream.write_all(&json_line(request))?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
            return Err(ControlError::Refused(error.to_owned()));
        }
        if value.get("skipped").is_some() {
            continue;
        }
        if !each(serde_json::from_value(value)?) {
            break;
        }
    }
    Ok(())
}
