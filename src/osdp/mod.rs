//! OSDP (IEC 60839-11-5): the gateway as the Control Panel of the card readers and keypads on
//! an RS-485 line (`docs/osdp.md`).
//!
//! - [`keypad`], [`reader`], [`door`]: the pure parts (the PIN assembler, the mapping between
//!   OSDP and the access engine, the door-contact machine), in doorbridge-proto and
//!   re-exported here;
//! - [`cp`]: the thread that owns libosdp's `ControlPanel` and the serial line, bridged to the
//!   async side by channels;
//! - [`driver`]: the async shell: decisions through the store, records, door routing;
//! - [`key`]: a reader's secure channel key file (0600, never printed);
//! - [`install`]: provisioning a reader's secure-channel key (`doorbridge osdp install`).

pub use doorbridge_proto::osdp::{door, keypad, reader};

pub mod cp;
pub mod driver;
pub mod install;
pub mod key;

#[cfg(test)]
mod proptests;
