//! What the cloud link shows in the gateway's status (`doorbridge status`, telemetry, the
//! metrics file): plain data the link keeps and the others read.

use jiff::Timestamp;

/// What the link shows in the gateway's status.
#[derive(Clone, Debug, Default)]
pub struct LinkStatus {
    /// `host:port` of the broker connected to, or being tried.
    pub broker: Option<String>,
    pub connected: bool,
    /// Since when the link has had no broker connection (`None` while connected).
    pub offline_since: Option<Timestamp>,
    pub connects: u64,
    pub last_error: Option<String>,
    /// When a snapshot or delta was last committed.
    pub last_sync: Option<Timestamp>,
    pub held_version: u64,
    /// Messages refused (bad signature, rollback, malformed…).
    pub rejected: u64,
}
