//! The decision: one key, one door, one instant, the uses so far → grant or deny.
//!
//! Pure: no I/O, no clock. The caller looks the credential up, reads the use counters, passes
//! the time and the clock's trust state, and records what this returns.
//!
//! The order of checks (the first failing one names the reason):
//! revoked → wrong door → clock untrusted → stale key set → not yet valid → expired → outside
//! schedule → used up.
//! A door comes before the time because "wrong door" is true whatever the time; the clock comes
//! before the time checks because they mean nothing on an untrusted clock. A stale key set
//! comes before the key's own rules: they are what may have changed in the cloud meanwhile.

use jiff::Timestamp;
use jiff::civil::{DateTime, Weekday};

use super::model::{
    ClockTrust, Decision, DenyReason, DoorId, Freshness, Grant, KeyRules, Schedule, Site,
    UnlimitedPolicy, UseLimit, Uses, Window,
};

/// What the engine applies besides the key's own rules: the site's configuration and the held
/// key set's limits on how old the gateway's knowledge may be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// For keys that do not depend on the time, when the clock is untrusted.
    pub untrusted_clock: UnlimitedPolicy,
    /// The key set's `stale_after` and when the gateway last heard from the cloud. The default
    /// limits nothing.
    pub freshness: Freshness,
}

/// What the caller must record after a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consume {
    /// Nothing to count: the key is unlimited.
    Nothing,
    /// Count one use at the door asked about (and one in total).
    OneUse,
}

/// Judges `key` presented at `door` at `now`.
///
/// Returns the decision and whether a use must be counted. A grant for a limited key is only
/// valid once that use is durably recorded.
pub fn decide(
    site: &Site,
    policy: Policy,
    key: &KeyRules,
    door: &str,
    uses: Uses,
    now: Timestamp,
    clock: ClockTrust,
) -> (Decision, Consume) {
    let deny = |reason| (Decision::deny(reason), Consume::Nothing);

    if key.revoked {
        return deny(DenyReason::Revoked);
    }
    if !opens(site, key, door) {
        return deny(DenyReason::WrongDoor);
    }
    // A key of a category that may go stale depends on the time too: an untrusted clock (reset
    // by a power cut) would make any knowledge look fresh.
    let may_go_stale = policy.freshness.limits.get(key.category).is_some();
    if clock == ClockTrust::Untrusted
        && (key.is_time_bound() || may_go_stale || policy.untrusted_clock == UnlimitedPolicy::Deny)
    {
        return deny(DenyReason::ClockUntrusted);
    }
    if policy.freshness.is_stale(key.category, now) {
        return deny(DenyReason::StaleKeySet);
    }
    if key.valid_from.is_some_and(|from| now < from) {
        return deny(DenyReason::NotYetValid);
    }
    if key.valid_until.is_some_and(|until| now >= until) {
        return deny(DenyReason::Expired);
    }
    if !in_schedule(&key.schedule, now.to_zoned(site.tz.clone()).datetime()) {
        return deny(DenyReason::OutsideSchedule);
    }
    let consume = match key.use_limit {
        UseLimit::Unlimited => Consume::Nothing,
        UseLimit::Total(n) if uses.total >= n => return deny(DenyReason::UsedUp),
        UseLimit::PerDoor(n) if uses.at_door >= n => return deny(DenyReason::UsedUp),
        UseLimit::Total(_) | UseLimit::PerDoor(_) => Consume::OneUse,
    };
    let grant = Grant {
        doors: release(site, key, door),
        welcome: key.welcome.clone(),
        floors: key.floors.clone(),
    };
    (Decision::Grant(grant), consume)
}

/// Whether the key opens `door`: a listed outer door; an inner door only when the key also
/// opens inner doors (seed 000: "by default, keys cannot open the inner door"), and then when
/// it is listed or lies behind a listed outer door. Doors the site does not have open nothing.
pub fn opens(site: &Site, key: &KeyRules, door: &str) -> bool {
    let Some(info) = site.doors.get(door) else {
        return false;
    };
    let listed = key.doors.iter().any(|d| d == door);
    if !info.inner {
        return listed;
    }
    key.opens_inner_door
        && (listed
            || key.doors.iter().any(|outer_id| {
                site.doors.get(outer_id).is_some_and(|outer| !outer.inner)
                    && (info.behind.is_empty() || info.behind.iter().any(|b| b == outer_id))
            }))
}

/// The doors a grant at `door` releases: that door, and for a key that also opens inner doors
/// presented at an outer door, the inner doors behind it.
fn release(site: &Site, key: &KeyRules, door: &str) -> Vec<DoorId> {
    let mut doors = vec![DoorId::from(door)];
    let at_outer = site.doors.get(door).is_some_and(|d| !d.inner);
    if key.opens_inner_door && at_outer {
        doors.extend(
            site.doors
                .iter()
                .filter(|(_, d)| {
                    d.inner && (d.behind.is_empty() || d.behind.iter().any(|b| b == door))
                })
                .map(|(id, _)| id.clone()),
        );
    }
    doors
}

/// Whether the site-local wall-clock time `local` lies in the schedule.
///
/// Windows are wall-clock times. On a day when the clocks go forward, the part of a window
/// that falls in the skipped hour does not exist (the wall clock never shows it); on a day
/// when they go back, a window is open during both passes of the repeated hour. A window that
/// crosses midnight belongs to the day it starts on.
pub fn in_schedule(schedule: &Schedule, local: DateTime) -> bool {
    match schedule {
        Schedule::Always => true,
        Schedule::Daily { window } => in_window(*window, local, |_| true),
        Schedule::Weekly { days, window: None } => days.contains(local.weekday()),
        Schedule::Weekly {
            days,
            window: Some(window),
        } => in_window(*window, local, |d| days.contains(d)),
    }
}

/// Whether `local` lies in `window` on a day that `day_ok` accepts, with a midnight-crossing
/// window counted on the day it started.
fn in_window(window: Window, local: DateTime, day_ok: impl Fn(Weekday) -> bool) -> bool {
    let t = local.time();
    let today = local.weekday();
    if window.crosses_midnight() {
        // Evening part belongs to today, morning part to yesterday's window.
        (t >= window.start && day_ok(today)) || (t < window.end && day_ok(today.previous()))
    } else {
        t >= window.start && t < window.end && day_ok(today)
    }
}
