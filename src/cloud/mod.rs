//! The cloud link's pure core: the signed envelope, message bodies and the sync state machine.
//!
//! The pure parts do no I/O: [`envelope`] (signatures), [`payload`] (message bodies),
//! [`sync`] (which payloads change the key set), [`topics`] and [`report`] (what the gateway
//! says back). [`link`] is the async shell: it owns the MQTT connection, feeds the machine and
//! carries out its actions against the store and the doors. [`import`] runs the same checks
//! on a key set read from a file. See `docs/cloud-protocol.md`.

pub mod envelope;
pub mod import;
pub mod link;
pub mod payload;
pub mod report;
pub mod sync;
#[cfg(test)]
mod tests;
pub mod topics;
#[cfg(test)]
mod vectors;
