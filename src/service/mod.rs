//! The service side of the daemon: how it runs under systemd.
//!
//! - [`notify`]: the `sd_notify` protocol (`READY=1`, `WATCHDOG=1`, `STATUS=`, `RELOADING=1`,
//!   `STOPPING=1`), injected so tests can read what is sent;
//! - [`logging`]: journald with structured fields under systemd, stderr lines elsewhere, and
//!   the level a reload changes;
//! - [`reload`]: what a reloaded configuration changes, and what waits for a restart;
//! - [`status`]: the one-line `STATUS=` summary.
//!
//! [`crate::daemon`] wires these to the running tasks; `docs/service.md` describes the whole.

pub mod logging;
pub mod notify;
pub mod reload;
pub mod status;
