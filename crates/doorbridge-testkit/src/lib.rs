//! doorbridge-testkit: what the integration tests (`tests/it`), the benches (`benches/`) and
//! the demo (`examples/demo.rs`) share, as a crate instead of files included with `#[path]`.
//! Never in the daemon or its package.
//!
//! - [`brokers`]: an in-process rumqttd on a free port, a TCP proxy that cuts the internet
//!   away and gives it back, and the benches' mosquitto;
//! - [`nats`]: a cluster of real `nats-server` processes whose nodes a test can kill;
//! - [`powercut_fs`]: a FUSE filesystem that loses unsynced writes on command, and
//!   [`powercut_campaign`]: the real daemon on it, power cut at chosen moments, what survived
//!   checked (`docs/reliability.md`);
//! - [`bench`]: the benches' harness: keys and their installation, the daemon as a child with
//!   its `/proc` counters, the machine's description and load, sections of
//!   `docs/performance.md`;
//! - [`story`]: the demo's story, told by the example and run by a test;
//! - [`binary`]: the paths of the workspace's binaries (`doorbridge`, `door-sim`,
//!   `cloud-sim`), for tests and benches of another package than theirs.

// Harness types own child processes, threads and mounts; what a test prints of them is their
// output, not a Debug dump.
#![allow(missing_debug_implementations)]

pub mod bench;
mod binary;
pub mod brokers;
pub mod nats;
pub mod powercut_campaign;
pub mod powercut_fs;
pub mod story;

pub use binary::{binary, find_binary, workspace_root};
