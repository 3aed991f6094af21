//! OSDP's pure part (`docs/osdp.md`): what a reader's input means at the gateway and what the
//! gateway shows it back, without libosdp, a port or a clock. The daemon's `osdp` module runs
//! libosdp's Control Panel and drives these.
//!
//! - [`keypad`]: the PIN assembler (`#`, `*`, digit count, inter-key timeout);
//! - [`reader`]: the mapping between OSDP and the access engine (card reads as credentials,
//!   decisions as relay, LED, buzzer and text actions);
//! - [`door`]: the door-contact machine (opened, closed, forced open, held open).

pub mod door;
pub mod keypad;
pub mod reader;

#[cfg(test)]
mod proptests;
