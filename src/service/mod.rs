//! The service side of the daemon: how it runs under systemd.
//!
//! - [`logging`]: journald with structured fields under systemd, stderr lines elsewhere, and
//!   the level a reload changes.

pub mod logging;
