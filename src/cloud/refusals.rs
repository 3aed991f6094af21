//! Coalescing refusal records: every refused cloud message is counted and logged, but a flood
//! of them (anyone with publish rights on a gateway's topics can send one) must not fill the
//! outbox or crowd out door records. At most [`PER_WINDOW`] refusals per channel per
//! [`WINDOW`] become a `cloud_rejected` record and a `rejected` report; the next record after
//! a gap carries how many were refused without one in between (`also`).
//!
//! Pure: no I/O; the time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The window refusals are counted in, per channel.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Records per channel and window.
pub const PER_WINDOW: u32 = 10;

/// What to do with one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Record and report it; `also` refusals on this channel went unrecorded before it.
    Record { also: u64 },
    /// Count it only: this channel has had its records for the window.
    Count,
}

#[derive(Clone, Debug, Default)]
struct Channel {
    window_start: Option<Instant>,
    recorded: u32,
    unrecorded: u64,
}

/// Per-channel refusal counts.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    channels: HashMap<&'static str, Channel>,
}

impl Refusals {
    /// Whether a refusal on `channel` at `now` is recorded.
    pub fn admit(&mut self, channel: &'static str, now: Instant) -> Admit {
        let c = self.channels.entry(channel).or_default();
        if c.window_start
            .is_none_or(|t| now.duration_since(t) >= WINDOW)
        {
            c.window_start = Some(now);
            c.recorded = 0;
        }
        if c.recorded < PER_WINDOW {
            c.recorded += 1;
            Admit::Record {
                also: std::mem::take(&mut c.unrecorded),
            }
        } else {
            c.unrecorded += 1;
            Admit::Count
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_recorded_ten_times_a_minute_and_the_rest_counted_into_the_next_record() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let recorded = (0..100)
            .filter(|i| {
                let at = t0 + Duration::from_millis(10 * i);
                matches!(r.admit("cmd/open-door", at), Admit::Record { also: 0 })
            })
            .count();
        assert_eq!(recorded, 10);
        // Another channel has its own count.
        assert_eq!(r.admit("keys/delta", t0), Admit::Record { also: 0 });
        // After the window, the next record says how many went unrecorded.
        assert_eq!(
            r.admit("cmd/open-door", t0 + WINDOW),
            Admit::Record { also: 90 }
        );
        assert_eq!(
            r.admit("cmd/open-door", t0 + WINDOW),
            Admit::Record { also: 0 }
        );
    }
}
