//! OSDP (IEC 60839-11-5): the gateway as the Control Panel of the card readers and keypads on
//! an RS-485 line (`docs/osdp.md`).
//!
//! - [`keypad`]: the pure PIN assembler (`#`, `*`, digit count, inter-key timeout);
//! - [`reader`]: the pure mapping between OSDP and the access engine (card reads as
//!   credentials, decisions as relay, LED, buzzer and text actions);
//! - [`door`]: the pure door-contact machine (opened, closed, forced open, held open);
//! - [`cp`]: the thread that owns libosdp's `ControlPanel` and the serial line, bridged to the
//!   async side by channels;
//! - [`driver`]: the async shell: decisions through the store, records, door routing;
//! - [`key`]: a reader's secure channel key file (0600, never printed);
//! - [`install`]: provisioning a reader's secure-channel key (`doorbridge osdp install`).

pub mod cp;
pub mod door;
pub mod driver;
pub mod install;
pub mod key;
pub mod keypad;
pub mod reader;

#[cfg(test)]
mod proptests;
