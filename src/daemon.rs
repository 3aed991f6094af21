//! Wiring and shutdown of the running service.
//!
//! [`serve`] is the library entry the binary and the tests share: it takes the configuration
//! and a shutdown signal, starts what the gateway runs and stops it cleanly. Today it opens the
//! store (integrity check, migrations, writer thread) and holds it until shutdown; the door
//! buses and the cloud link are wired in here as they land.

use std::future::Future;

use crate::config::Config;
use crate::store::{DecisionContext, Store, StoreError, StoreOptions};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the store at {path}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for stop signals")]
    Signals(#[source] std::io::Error),
}

impl DaemonError {
    /// Whether starting again may help (systemd's `Restart=on-failure` will try).
    pub fn is_retryable(&self) -> bool {
        match self {
            DaemonError::Store { source, .. } => source.is_retryable(),
            DaemonError::Runtime(_) | DaemonError::Signals(_) => true,
        }
    }
}

/// The rules decisions are made with, from the configuration.
pub fn decision_context(config: &Config) -> DecisionContext {
    DecisionContext {
        site: config.site(),
        policy: config.access_policy(),
        lockout: config.lockout_policy(),
        clock_tolerance: jiff::SignedDuration::try_from(config.clock.tolerance)
            .unwrap_or(jiff::SignedDuration::MAX),
        unrecordable_unlimited: config.storage.unrecordable_unlimited,
    }
}

/// How to open the store, from the configuration.
pub fn store_options(config: &Config) -> StoreOptions {
    let mut options = StoreOptions::new(&config.storage.path, decision_context(config));
    options.max_size = (config.storage.max_size != 0).then_some(config.storage.max_size);
    options
}

/// Runs the gateway until `shutdown` completes.
pub async fn serve(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let options = store_options(config);
    let path = options.path.display().to_string();
    // Opening runs the integrity check, which may take seconds on a large database.
    let store = tokio::task::spawn_blocking(move || Store::open(options))
        .await
        .map_err(|e| DaemonError::Runtime(std::io::Error::other(e)))?
        .map_err(|source| DaemonError::Store {
            path: path.clone(),
            source,
        })?;
    match store.reader().and_then(|r| r.key_set()) {
        Ok(set) => tracing::info!(
            path,
            keyset_version = set.version,
            keys = set.keys,
            "store open"
        ),
        Err(e) => tracing::warn!(path, error = %e, "store open, but its key set cannot be read"),
    }
    shutdown.await;
    tracing::info!("stopping");
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the gateway on its own runtime until SIGTERM or SIGINT.
pub fn run(config: &Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let stop = stop_signal().map_err(DaemonError::Signals)?;
        serve(config, stop).await
    })
}

/// Completes on the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            // systemd stops the service.
            _ = term.recv() => tracing::info!("SIGTERM received"),
            // An operator pressed Ctrl-C.
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
