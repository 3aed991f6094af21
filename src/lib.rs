//! doorbridge: the edge gateway of a building's smart-intercom system.
//!
//! It syncs key sets from the cloud, keeps them in SQLite, answers door units' requests over
//! serial lines (also offline) and uploads what happened at the doors without losing any of it.
//!
//! Map of the crate:
//!
//! - [`access`]: the pure decision engine (key rules, schedules, time zones, PIN lockout);
//! - [`ids`]: door, unit and key ids as types of their own;
//! - [`cbor`]: bounded CBOR decoding (length, depth, no leftovers), the one way bytes from
//!   outside become values;
//! - [`store`]: the SQLite store: schema and migrations, the single writer thread with group
//!   commit, read connections, the trusted-time mark, the outbox and the door history;
//! - [`config`]: typed configuration from TOML files and `DOORBRIDGE_*` variables, validated;
//! - [`cloud`]: the cloud link: signed envelopes, key-set payloads, the sync state machine and
//!   the open-door replay cache (pure), the MQTT driver, the outbox uplink and telemetry,
//!   offline import of a bundle file; the cloud's side (builder, keys files, the reference cloud)
//!   is in the doorbridge-sim crate;
//! - [`bus`]: the door bus: frame codec, CBOR messages and the pure polling session;
//! - [`drivers`]: the async shells on the lines: the door-bus driver and its serial port;
//! - [`cli`]: the command line of the `doorbridge` binary (clap), also rendered into its man
//!   pages and completions;
//! - [`daemon`]: wiring and shutdown of the running service;
//! - [`control`]: the control socket the operator commands (`status`) ask;
//! - [`operator`]: what the operator commands print;
//! - [`history`]: `doorbridge events`, the door history read from the database and filtered;
//! - [`doctor`]: `doorbridge doctor`, the installation checks (ports, TLS files, brokers,
//!   clock, disk, database) with a verdict and a hint each;
//! - [`metrics`]: the opt-in Prometheus text file (`node_exporter`'s textfile collector);
//! - [`service`]: running under systemd: `sd_notify`, watchdog, status line, reload plan,
//!   journald or stderr logging;
//! - [`task`]: what long-running tasks share (stop flag, jittered waits, clock sync).
//!
//! `src/main.rs` only parses arguments and calls into this library; tests call the same
//! entry points with their own I/O and shutdown signal.

pub use doorbridge_proto::{access, bus, cbor, ids};
pub mod cli;
pub mod cloud;
pub mod config;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod drivers;
pub mod history;
pub mod metrics;
pub mod operator;
pub mod osdp;
pub mod service;
pub mod store;
pub mod task;
