//! The door bus: frames and messages between the gateway and its door units.
//!
//! - [`frame`]: the pure frame codec (COBS, CRC-16, header; a streaming decoder);
//! - [`message`]: the message types and their CBOR bodies;
//! - [`session`]: the pure master-side session (polling, retries, offline units, the answer
//!   cache that makes retransmitted requests idempotent);
//! - [`driver`]: the async shell: one task per serial port, on a thread of its own, reopened
//!   with backoff;
//! - `port`: the serial port as the driver reads and writes it.
//!
//! The protocol is specified in `docs/door-bus.md`.

pub mod driver;
pub mod frame;
pub mod message;
mod port;
pub mod session;

#[cfg(test)]
mod vectors;

#[cfg(test)]
mod proptests;
