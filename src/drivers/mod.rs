//! The async shells that own the lines to the doors, outside the pure protocol modules they
//! drive (the compiler keeps `bus` from reaching the store):
//!
//! - [`bus`]: the door-bus driver: one task per serial port, on a thread of its own, reopened
//!   with backoff, running [`crate::bus::session`] and asking the store for each decision;
//! - `port`: the serial port as the driver reads and writes it.

pub mod bus;
mod port;
