//! Small pieces every long-running task shares: the stop flag, growing and jittered waits, and
//! whether the system clock is synchronised.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::watch;

/// The kernel's largest estimated error of a synchronised clock, in microseconds: at 16 s
/// (`NTP_PHASE_LIMIT`) the kernel itself gives the clock up as unsynchronised.
const MAX_SYNCED_ERROR_US: i64 = 16_000_000;

/// Whether the system clock is NTP-synchronised now (so it may advance the trusted-time mark),
/// as the kernel knows it: every NTP daemon (systemd-timesyncd, chrony, ntpd) disciplines the
/// clock through `adjtimex`, which keeps the clock's maximum error small while it does and
/// grows it by 500 ppm of elapsed time once it stops. Synchronised when that error is under
/// 16 s, the rule `timedatectl` uses; `STA_UNSYNC` alone is not trusted (some daemons set it to
/// keep the kernel from writing the RTC).
pub fn clock_synced() -> bool {
    kernel_clock().is_some_and(|c| synced(&c))
}

/// What `adjtimex` says of the clock: its state, status flags and maximum error (µs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClock {
    pub state: i32,
    pub status: i32,
    pub maxerror_us: i64,
}

/// The rule of [`clock_synced`], pure.
pub fn synced(clock: &KernelClock) -> bool {
    clock.state != libc::TIME_ERROR && clock.maxerror_us < MAX_SYNCED_ERROR_US
}

/// Reads the kernel's clock state (`adjtimex` with no change requested).
pub fn kernel_clock() -> Option<KernelClock> {
    // SAFETY: `timex` is plain old data, zeroed is a valid value; `modes = 0` asks adjtimex
    // to read only, and the pointer is to a live, exclusively borrowed struct.
    #[allow(unsafe_code)]
    let (state, tx) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        tx.modes = 0;
        (libc::adjtimex(&raw mut tx), tx)
    };
    (state >= 0).then_some(KernelClock {
        state,
        status: tx.status,
        maxerror_us: tx.maxerror,
    })
}

/// The timer slack [`precise_sleeps`] sets: how late the kernel may wake a sleep to group it
/// with other wake-ups.
pub const SLACK_NS: libc::c_ulong = 1_000;

/// Asks the kernel to end this thread's sleeps on time, within [`SLACK_NS`]. By default a
/// thread's sleeps may last 50 µs longer than asked (`prctl(PR_SET_TIMERSLACK)`), which
/// stretches a door bus's 304 µs quiet gap by a sixth: measured here, a 304 µs sleep took
/// 394 µs at the median with the default slack and 346 µs with this one. For the bus threads,
/// whose sleeps are that gap; the wake-ups stay as many.
pub fn precise_sleeps() -> std::io::Result<()> {
    // SAFETY: PR_SET_TIMERSLACK takes its value as an integer argument and reads or writes
    // no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `d` give or take a quarter, so that buses and gateways that failed together do not retry
/// in step.
pub fn jitter(d: Duration) -> Duration {
    // The clock's nanoseconds only if the kernel gives no random bytes.
    let r = getrandom::u32()
        .unwrap_or_else(|_| jiff::Timestamp::now().subsec_nanosecond().unsigned_abs());
    d.mul_f64(0.75 + f64::from(r % 1000) / 2000.0)
}

/// The waits between attempts at something that keeps failing (a port, a broker): `first`,
/// doubled after each failure up to `max`, for as long as it takes; [`Backoff::reset`] starts
/// over once it worked. The schedule is backon's exponential backoff; the caller jitters each
/// wait with [`jitter`] (±25 %) rather than backon's jitter, which only adds (up to double) and
/// would leave waits at `max` no longer spread around it.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            builder,
            waits: builder.build(),
            max,
        }
    }

    /// The wait before the next attempt (before jitter).
    pub fn next_wait(&mut self) -> Duration {
        // Without a limit of attempts the schedule does not end; `max` if it ever did.
        self.waits.next().unwrap_or(self.max)
    }

    /// It worked: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.waits = self.builder.build();
    }
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
    fn precise_sleeps_sets_the_threads_timer_slack_and_no_other_threads() {
        // SAFETY: PR_GET_TIMERSLACK only returns a value.
        #[allow(unsafe_code)]
        let slack = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        let before = slack();
        let on_its_thread = std::thread::spawn(move || {
            precise_sleeps().unwrap();
            slack()
        })
        .join()
        .unwrap();
        assert_eq!(libc::c_ulong::try_from(on_its_thread).ok(), Some(SLACK_NS));
        assert_eq!(slack(), before, "the calling thread's slack is its own");
    }

    #[test]
    fn the_clock_is_synced_by_the_kernels_maximum_error() {
        let clock = |state, maxerror_us| KernelClock {
            state,
            status: 0,
            maxerror_us,
        };
        assert!(synced(&clock(libc::TIME_OK, 25_000)), "chrony, a few ms");
        assert!(
            !synced(&clock(libc::TIME_ERROR, 25_000)),
            "the kernel says unsynchronised"
        );
        assert!(
            !synced(&clock(libc::TIME_OK, 16_000_000)),
            "the error grew to the limit"
        );
        // Whatever this machine says, asking works.
        assert!(kernel_clock().is_some());
    }

    #[test]
    fn a_backoff_doubles_up_to_its_cap_and_starts_over_when_reset() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        // backon multiplies by an f32: a few nanoseconds off, nothing a wait notices.
        let waits: Vec<u128> = (0..6).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(200));
    }

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
