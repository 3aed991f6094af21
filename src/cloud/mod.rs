//! The cloud link: the signed protocol, the sync state machine, and the MQTT shell.
//!
//! The pure parts do no I/O and live in the `doorbridge-proto` crate, re-exported here:
//! [`envelope`] (signatures), [`payload`] (message bodies), [`sync`] (which payloads change
//! the key set), [`topics`], [`report`] (what the gateway says back) with [`summary`] (the
//! telemetry summary it carries) and [`status`] (what the link shows in the gateway's
//! status). [`link`] is the async shell: it owns the MQTT connection, feeds the machine and
//! carries out its actions against the store and the doors. [`uplink`] drains the outbox to
//! the cloud over the same connection ([`acks`] matches broker acks to batches) and
//! [`telemetry`] sends the health summary. [`import`] runs the same checks
//! on a key set read from a file. [`bundle`] reads the offline key-set file. The cloud's side
//! (signing what the gateway accepts) is in the doorbridge-sim crate. [`refusals`]
//! coalesces the records of refused messages; [`failover`] picks the broker to try next and how
//! long to wait. See `docs/cloud-protocol.md`.

// The pure parts live in doorbridge-proto; re-exported here under their old paths.
pub use doorbridge_proto::cloud::{envelope, payload, report, status, summary, sync, topics};

pub mod acks;
pub mod bundle;
pub mod failover;
pub mod import;
pub mod link;
pub mod refusals;
pub mod telemetry;
#[cfg(test)]
mod tests;
pub mod uplink;
#[cfg(test)]
mod vectors;
