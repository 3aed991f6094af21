//! doorbridge-sim: the other ends of the gateway's lines, for tests, benchmarks, the demo and
//! installers; none of it is in the daemon or its package.
//!
//! - the simulated door units (below), OSDP readers ([`osdp`]) and the `door-sim` binary;
//! - the cloud's side: [`build`] signs snapshots, deltas and commands (with
//!   `doorbridge_proto::cloud::envelope::seal`, compiled only with the proto crate's `sign`
//!   feature), [`keyfile`] reads a human-readable key set, [`cloud`] and [`durable`] are the
//!   reference cloud's MQTT clients, and the `cloud-sim` binary drives them.
//!
//! Simulated door units: the unit side of the door bus.
//!
//! The protocol is `docs/door-bus.md`; the `door-sim` binary and its command language are
//! `docs/door-sim.md`. The pieces:
//!
//! - [`SimUnits`] (pure, like the gateway's [`Session`](doorbridge_proto::bus::session::Session)): one
//!   or many units on one line. It takes the gateway's frames and answers exactly as a unit
//!   must: only when addressed, one frame per frame, with the verify in flight (same id,
//!   identical bytes until its decision comes), else the oldest unacknowledged report, else
//!   idle echoing the gateway's id. It carries out grants, denies, acks, open door, settings
//!   (then reports its status) and time at most once per id within 5 s, stays silent on
//!   broadcasts, gives up on a verify after 10 s, and starts each unit with a random boot id,
//!   a random first id and a status report. Everything the gateway sent that matters comes
//!   out as an [`Output`].
//! - [`SimCommand`]: what happens at a unit (a PIN typed, a QR code shown, a door forced, a
//!   battery reading…) and faults to inject: noise on the line, a bad CRC, a frame cut off, a
//!   late answer, a retransmission of the last request, silence.
//! - [`run_sim`]: the async shell that moves bytes between a port and [`SimUnits`];
//! - [`linked_pty`]: a pseudo-terminal linked where a gateway expects its port;
//!   [`HangupTolerant`] keeps it running on a pty master while nobody has the slave open.
//! - [`script`]: the line-oriented command language of `door-sim`; [`JsonLine`]: the JSON
//!   lines it prints ([`Output::to_json`]).
//! - [`osdp`]: simulated OSDP readers (`door-sim --osdp`): libosdp Peripheral Devices sharing
//!   one line with the gateway as their Control Panel; the decision each presented card or
//!   PIN got, read from the LED and outputs the gateway sets.
//! - [`cloud`]: the other end of the gateway's cloud link, a reference cloud over MQTT
//!   ([`cloud::CloudClient`]) for `cloud-sim` (`docs/cloud-sim.md`), tests and the demo;
//!   [`durable`]: its consumer of uploaded records, which rides out broker outages
//!   (persistent session, acks after output, reconnection).
//!
//! ```text
//! let units = SimUnits::new(&[addr(1), addr(2)], SimConfig::default())?;
//! let (commands, rx) = mpsc::channel(16);
//! let (tx, mut outputs) = mpsc::channel(64);
//! tokio::spawn(run_sim(port, units, rx, tx, shutdown));
//! commands.send(SimCommand::Verify { unit: addr(1), kind: Pin, value: b"482916".into(), reader: 0 }).await?;
//! while let Some(o) = outputs.recv().await { println!("{}", o.to_json()); }
//! ```

pub mod build;
pub mod cloud;
pub mod durable;
mod json;
pub mod keyfile;
pub mod osdp;
pub mod pty;
pub mod script;
mod shell;
mod units;

pub use json::JsonLine;
pub use pty::{PtyMaster, linked_pty};
pub use shell::{HangupTolerant, run_sim};
pub use units::{
    GaveUpReason, MAX_GARBAGE, MAX_WAITING_CREDENTIALS, Output, ReportKind, SimCommand, SimConfig,
    SimError, SimStats, SimUnits,
};
