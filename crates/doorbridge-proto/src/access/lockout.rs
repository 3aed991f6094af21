//! PIN brute-force protection: a per-door-unit lockout that grows with repeated unknown PINs.
//!
//! Pure: the caller passes the time. The numbers (defaults from the config):
//!
//! - `attempts` unknown PINs in a row (default 5) lock the unit's keypad;
//! - the first lockout lasts `base` (default 30 s); each further lockout before a correct PIN
//!   doubles it, up to `max` (default 1 h);
//! - both durations scale with the number of active PINs: multiplied by
//!   `max(1, active_pins / pins_per_step)` (default step 50), up to 24 h. A random guess hits
//!   *some* PIN with a probability proportional to the number of PINs, so the guess rate is cut
//!   in the same proportion and the expected time to a lucky hit does not shrink as keys are
//!   added;
//! - a correct PIN, or a quiet spell of `max` (scaled) with no unknown PIN, clears the state.
//!
//! While locked, every PIN at that unit is denied with "locked out" (a correct one too, or the
//! lockout would tell a guesser when they hit). QR and mobile keys are not affected. Entering a
//! lockout is an event for the cloud.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// The lockout's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub pins_per_step: u32,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            attempts: 5,
            base: Duration::from_secs(30),
            max: Duration::from_secs(3600),
            pins_per_step: 50,
        }
    }
}

/// The longest a keypad is ever locked, whatever the scale.
pub const CEILING: Duration = Duration::from_secs(24 * 3600);

impl LockoutPolicy {
    fn scale(&self, active_pins: u32) -> u32 {
        (active_pins / self.pins_per_step.max(1)).max(1)
    }

    /// The length of the `level`-th lockout in a row (0-based) with `active_pins` PINs.
    pub fn duration(&self, level: u32, active_pins: u32) -> Duration {
        let scale = self.scale(active_pins);
        let max = self.max.saturating_mul(scale).min(CEILING);
        self.base
            .saturating_mul(scale)
            .saturating_mul(1u32.checked_shl(level).unwrap_or(u32::MAX))
            .min(max)
    }
}

/// A lockout that just began, to be reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockoutStarted {
    pub until: Timestamp,
    /// Unknown PINs in a row that led to it, since the last correct PIN.
    pub failures: u32,
    /// How many lockouts in a row this is (1 = first).
    pub level: u32,
}

/// One door unit's keypad state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinGuard {
    /// Unknown PINs since the last lockout (or correct PIN).
    failures: u32,
    /// All unknown PINs since the last correct PIN.
    total_failures: u32,
    /// Lockouts in a row since the last correct PIN.
    level: u32,
    locked_until: Option<Timestamp>,
    last_failure: Option<Timestamp>,
}

impl PinGuard {
    /// Whether PINs are refused at `now`.
    pub fn is_locked(&self, now: Timestamp) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    pub fn locked_until(&self, now: Timestamp) -> Option<Timestamp> {
        self.locked_until.filter(|&until| now < until)
    }

    /// Records an unknown PIN at `now`. Returns the lockout it starts, if any.
    pub fn unknown_pin(
        &mut self,
        policy: &LockoutPolicy,
        active_pins: u32,
        now: Timestamp,
    ) -> Option<LockoutStarted> {
        self.forget_if_quiet(policy, active_pins, now);
        if self.is_locked(now) {
            // Already refused; a guess during a lockout does not extend it, so a resident's
            // typo after the lockout is not punished for what an attacker typed meanwhile.
            return None;
        }
        self.failures += 1;
        self.total_failures += 1;
        self.last_failure = Some(now);
        if self.failures < policy.attempts.max(1) {
            return None;
        }
        let length = policy.duration(self.level, active_pins);
        let until = now
            .checked_add(SignedDuration::try_from(length).unwrap_or(SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX);
        self.level += 1;
        self.failures = 0;
        self.locked_until = Some(until);
        Some(LockoutStarted {
            until,
            failures: self.total_failures,
            level: self.level,
        })
    }

    /// Records a correct PIN: the slate is wiped.
    pub fn known_pin(&mut self) {
        *self = PinGuard::default();
    }

    /// After a quiet spell as long as the longest lockout, an earlier run of guesses is
    /// forgotten.
    fn forget_if_quiet(&mut self, policy: &LockoutPolicy, active_pins: u32, now: Timestamp) {
        let quiet = policy
            .max
            .saturating_mul(policy.scale(active_pins))
            .min(CEILING);
        let since = self.locked_until.max(self.last_failure);
        if let Some(since) = since {
            let quiet = SignedDuration::try_from(quiet).unwrap_or(SignedDuration::MAX);
            if now.duration_since(since) >= quiet {
                *self = PinGuard::default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn five_unknown_pins_lock_for_thirty_seconds() {
        let p = LockoutPolicy::default();
        let mut g = PinGuard::default();
        for i in 0..4 {
            assert_eq!(g.unknown_pin(&p, 10, t(i)), None);
            assert!(!g.is_locked(t(i)));
        }
        let started = g.unknown_pin(&p, 10, t(4)).expect("fifth guess locks");
        assert_eq!(started.until, t(34));
        assert_eq!(started.level, 1);
        assert!(g.is_locked(t(33)));
        assert!(!g.is_locked(t(34)));
    }

    #[test]
    fn lockouts_double_up_to_the_maximum() {
        let p = LockoutPolicy::default();
        assert_eq!(p.duration(0, 1), Duration::from_secs(30));
        assert_eq!(p.duration(1, 1), Duration::from_secs(60));
        assert_eq!(p.duration(6, 1), Duration::from_secs(1920));
        assert_eq!(p.duration(7, 1), Duration::from_secs(3600));
        assert_eq!(p.duration(40, 1), Duration::from_secs(3600));
    }

    #[test]
    fn lockout_scales_with_active_pins() {
        let p = LockoutPolicy::default();
        assert_eq!(p.duration(0, 49), Duration::from_secs(30));
        assert_eq!(p.duration(0, 100), Duration::from_secs(60));
        assert_eq!(p.duration(0, 5000), Duration::from_secs(3000));
        // Capped at 24 h whatever the scale.
        assert_eq!(p.duration(30, 1_000_000), CEILING);
    }

    #[test]
    fn second_run_of_guesses_locks_longer() {
        let p = LockoutPolicy::default();
        let mut g = PinGuard::default();
        for i in 0..5 {
            g.unknown_pin(&p, 1, t(i));
        }
        // Guesses during the lockout neither count nor extend it.
        assert_eq!(g.unknown_pin(&p, 1, t(10)), None);
        assert_eq!(g.locked_until(t(10)), Some(t(34)));
        for i in 40..44 {
            assert_eq!(g.unknown_pin(&p, 1, t(i)), None);
        }
        let second = g.unknown_pin(&p, 1, t(44)).unwrap();
        assert_eq!(second.until, t(104));
        assert_eq!(second.level, 2);
        assert_eq!(second.failures, 10);
    }

    #[test]
    fn correct_pin_and_quiet_spell_clear_the_state() {
        let p = LockoutPolicy::default();
        let mut g = PinGuard::default();
        for i in 0..4 {
            g.unknown_pin(&p, 1, t(i));
        }
        g.known_pin();
        for i in 10..14 {
            assert_eq!(g.unknown_pin(&p, 1, t(i)), None);
        }
        // An hour of quiet forgets the four guesses.
        assert_eq!(g.unknown_pin(&p, 1, t(13 + 3600)), None);
        assert!(!g.is_locked(t(13 + 3600)));
    }
}
