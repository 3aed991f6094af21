//! doorbridge-proto: the pure parts of the doorbridge gateway, which do no I/O, hold no
//! runtime and take the time as an argument (on the model of quinn-proto under quinn).
//! The daemon (`doorbridge`) drives them and re-exports them under the same paths.
//!
//! - [`access`]: the decision engine (key rules, schedules, time zones, PIN lockout);
//! - [`bus`]: the door bus: frame codec, CBOR messages and the master-side session
//!   (`docs/door-bus.md`);
//! - [`cloud`]: the cloud protocol: signed envelopes, payloads, the sync machine, topics and
//!   reports (`docs/cloud-protocol.md`);
//! - [`osdp`]: the pure part of serving OSDP readers: the keypad's PIN assembly, card reads as
//!   credentials and decisions as reader actions, the door-contact machine (`docs/osdp.md`);
//! - [`ids`]: door, unit and key ids as types of their own;
//! - [`cbor`]: bounded CBOR decoding (length, depth, no leftovers), the one way bytes from
//!   outside become values.
//!
//! Its dependencies are serde, ciborium, jiff, sha2, ed25519-dalek and thiserror: nothing that
//! opens a file, a socket or a port.

pub mod access;
pub mod bus;
pub mod cbor;
pub mod cloud;
pub mod ids;
pub mod osdp;
