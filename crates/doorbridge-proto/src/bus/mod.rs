//! The door bus: frames and messages between the gateway and its door units.
//!
//! - [`frame`]: the pure frame codec (COBS, CRC-16, header; a streaming decoder);
//! - [`message`]: the message types and their CBOR bodies;
//! - [`session`]: the pure master-side session (polling, retries, offline units, the answer
//!   cache that makes retransmitted requests idempotent);
//!
//! Pure: no I/O, time passed in. The async shell that runs a session on a serial port is
//! `doorbridge::drivers::bus`.
//!
//! The protocol is specified in `docs/door-bus.md`.

pub mod frame;
pub mod message;
pub mod session;

// Public with the `vectors` feature, for the simulated units' tests (doorbridge-sim).
#[cfg(any(test, feature = "vectors"))]
pub mod vectors;

#[cfg(test)]
mod proptests;
