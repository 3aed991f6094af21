//! The cloud link's pure core: the signed envelope, message bodies and the sync state machine.
//!
//! Nothing here does I/O. The MQTT driver (not yet written) receives bytes, opens envelopes
//! with [`envelope::open`], decodes bodies with [`payload`], feeds them to [`sync::Sync`] and
//! carries out the [`sync::Action`]s it returns against the store. See
//! `docs/cloud-protocol.md`.

pub mod build;
pub mod bundle;
pub mod envelope;
pub mod keyfile;
pub mod payload;
pub mod report;
pub mod sync;
#[cfg(test)]
mod tests;
pub mod topics;
#[cfg(test)]
mod vectors;
