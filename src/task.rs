//! Small pieces every long-running task shares: the stop flag, jittered waits, and whether the
//! system clock is synchronised.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

/// systemd-timesyncd's flag file: present while the clock is synchronised.
const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// Whether the system clock is NTP-synchronised now (so it may advance the trusted-time mark).
pub fn clock_synced() -> bool {
    Path::new(TIMESYNC_FLAG).exists()
}

/// `d` give or take a quarter, so that buses and gateways that failed together do not retry
/// in step.
pub fn jitter(d: Duration) -> Duration {
    let nanos = jiff::Timestamp::now().subsec_nanosecond().unsigned_abs();
    d.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// Completes when the shutdown flag turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_quarter() {
        for ms in [1u64, 200, 60_000] {
            let d = Duration::from_millis(ms);
            let j = jitter(d);
            assert!(
                j >= d.mul_f64(0.75) && j <= d.mul_f64(1.25),
                "{d:?} → {j:?}"
            );
        }
    }
}
