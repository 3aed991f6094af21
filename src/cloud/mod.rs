//! The cloud link: the signed protocol, the sync state machine, and the MQTT shell.
//!
//! The pure parts do no I/O: [`envelope`] (signatures), [`payload`] (message bodies),
//! [`sync`] (which payloads change the key set), [`topics`], [`report`] (what the gateway
//! says back) with [`summary`] (the telemetry summary it carries) and [`status`] (what the
//! link shows in the gateway's status). [`link`] is the async shell: it owns the MQTT connection, feeds the machine and
//! carries out its actions against the store and the doors. [`uplink`] drains the outbox to
//! the cloud over the same connection ([`acks`] matches broker acks to batches) and
//! [`telemetry`] sends the health summary. [`import`] runs the same checks
//! on a key set read from a file. [`build`], [`bundle`] and [`keyfile`] are the cloud's side
//! (signing what the gateway accepts), for `cloud-sim`, tests and benchmarks. [`refusals`]
//! coalesces the records of refused messages; [`failover`] picks the broker to try next and how
//! long to wait. See `docs/cloud-protocol.md`.

pub mod acks;
pub mod build;
pub mod bundle;
pub mod envelope;
pub mod failover;
pub mod import;
pub mod keyfile;
pub mod link;
pub mod payload;
pub mod refusals;
pub mod report;
pub mod status;
pub mod summary;
pub mod sync;
pub mod telemetry;
#[cfg(test)]
mod tests;
pub mod topics;
pub mod uplink;
#[cfg(test)]
mod vectors;
