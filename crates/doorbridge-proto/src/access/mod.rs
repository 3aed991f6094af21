//! The access engine: every key rule from the seeds, judged without I/O.
//!
//! - [`model`]: keys, schedules, use limits, decisions (shared with the store and cloud link);
//! - [`engine`]: the decision for one key at one door at one instant;
//! - [`lockout`]: the per-unit PIN brute-force lockout;
//! - [`credential`]: credential digests.

pub mod credential;
pub mod engine;
pub mod lockout;
pub mod model;

pub use engine::{Consume, Policy, decide};
pub use lockout::{LockoutPolicy, PinGuard};
pub use model::*;

#[cfg(test)]
mod tests;
