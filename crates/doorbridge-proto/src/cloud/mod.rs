//! The cloud protocol's pure parts (`docs/cloud-protocol.md`): [`envelope`] (signed
//! envelopes: Ed25519 over the exact bytes), [`payload`] (message bodies, bounded), [`sync`]
//! (the machine that decides which payloads change the key set), [`topics`], [`report`]
//! (what the gateway says back) with [`summary`] (the telemetry summary) and [`status`] (what
//! the link shows). The MQTT shell that drives them is `doorbridge::cloud::link`.

pub mod envelope;
pub mod payload;
pub mod report;
pub mod status;
pub mod summary;
pub mod sync;
pub mod topics;
