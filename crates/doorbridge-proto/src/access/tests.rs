//! Independent tests of the access engine against the key rules of the seeds
//! (`/work/shared/seeds/*.txt`) and the design notes.
//!
//! Layout:
//!
//! 1. tables of cases, one table per seed rule, each case naming the rule it checks;
//! 2. DST days in `Europe/Berlin` and `America/New_York`, built from real UTC instants;
//! 3. windows that cross midnight (weekday wrap, windows ending at 00:00) are a table of their
//!    own in part 1, plus the DST nights in part 2;
//! 4. property tests: a grant implies every condition, the deny reason follows the documented
//!    order, use limits are never exceeded, the PIN lockout holds;
//! 5. PIN lockout cases beyond those in `lockout.rs`.
//!
//! Every table case runs against one test site in Europe/Berlin with four doors:
//! `main` and `garage` (outer), `inner` (inner, behind `main` only) and `hall` (inner, with no
//! `behind` list, so behind every outer door). Local times in the tables are the site's wall
//! clock, written with the weekday in front (`"Fri 2026-05-15 12:00"`), which the runner checks.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::civil::{self, Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};

use super::engine::Consume::{self, Nothing, OneUse};
use super::engine::{Policy, decide, in_schedule};
use super::lockout::{CEILING, LockoutPolicy, PinGuard};
use super::model::ClockTrust::{self, Trusted, Untrusted};
use super::model::DenyReason::{
    self, ClockUntrusted, Expired, NotYetValid, OutsideSchedule, Revoked, StaleKeySet, UsedUp,
    WrongDoor,
};
use super::model::DoorId;
use super::model::{
    Category, Decision, Door, Freshness, Grant, KeyRules, Schedule, Site, StaleLimits,
    UnlimitedPolicy, UseLimit, Uses, WeekdaySet, Window,
};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const BERLIN: &str = "Europe/Berlin";
const NEW_YORK: &str = "America/New_York";

/// The test site in the time zone `zone`.
fn site_in(zone: &str) -> Site {
    let door = |inner: bool, behind: &[&str]| Door {
        inner,
        behind: behind.iter().map(|d| DoorId::from(*d)).collect(),
    };
    Site {
        tz: TimeZone::get(zone).unwrap_or_else(|e| panic!("time zone {zone}: {e}")),
        doors: BTreeMap::from([
            ("main".into(), door(false, &[])),
            ("garage".into(), door(false, &[])),
            ("inner".into(), door(true, &["main"])),
            ("hall".into(), door(true, &[])),
        ]),
    }
}

fn site() -> Site {
    site_in(BERLIN)
}

/// Weekday bits as `WeekdaySet` lays them out (Monday = bit 0); checked against
/// `WeekdaySet::of` in `weekday_bits_match_the_model`.
const MON: u8 = 1;
const TUE: u8 = 1 << 1;
const WED: u8 = 1 << 2;
const THU: u8 = 1 << 3;
const FRI: u8 = 1 << 4;
const SAT: u8 = 1 << 5;
const SUN: u8 = 1 << 6;

/// A window from `sh:sm` to `eh:em`, wall clock.
const fn w(sh: i8, sm: i8, eh: i8, em: i8) -> Window {
    Window {
        start: civil::time(sh, sm, 0, 0),
        end: civil::time(eh, em, 0, 0),
    }
}

const fn daily(window: Window) -> Schedule {
    Schedule::Daily { window }
}

const fn weekly(days: u8, window: Window) -> Schedule {
    Schedule::Weekly {
        days: WeekdaySet(days),
        window: Some(window),
    }
}

const fn all_day(days: u8) -> Schedule {
    Schedule::Weekly {
        days: WeekdaySet(days),
        window: None,
    }
}

const fn used(total: u32, at_door: u32) -> Uses {
    Uses { total, at_door }
}

const FRESH: Uses = used(0, 0);

/// A key as a table writes it. Validity bounds are site-local wall-clock times.
#[derive(Clone, Debug)]
struct K {
    doors: &'static [&'static str],
    inner: bool,
    from: Option<&'static str>,
    until: Option<&'static str>,
    schedule: Schedule,
    limit: UseLimit,
    welcome: Option<&'static str>,
    floors: &'static [i16],
    revoked: bool,
}

impl K {
    /// The key's rules; `n` picks its id and (cycling through all of them) its category,
    /// which no rule depends on.
    fn build(&self, site: &Site, n: usize) -> KeyRules {
        KeyRules {
            id: format!("key-{n}").into(),
            name: format!("test key {n}"),
            category: Category::ALL[n % Category::ALL.len()],
            doors: self.doors.iter().map(|d| DoorId::from(*d)).collect(),
            opens_inner_door: self.inner,
            valid_from: self.from.map(|s| local(site, s)),
            valid_until: self.until.map(|s| local(site, s)),
            schedule: self.schedule.clone(),
            use_limit: self.limit,
            welcome: self.welcome.map(str::to_owned),
            floors: self.floors.to_vec(),
            revoked: self.revoked,
            issuer: None,
        }
    }
}

/// The instant at which the site's wall clock shows `text` (`"Fri 2026-05-15 12:00"`, the
/// weekday optional). Panics when the weekday is wrong or the wall-clock time is skipped or
/// repeated: DST days are tested separately with explicit instants.
fn local(site: &Site, text: &str) -> Timestamp {
    let (weekday, rest) = match text.split_once(' ') {
        Some((day, rest)) if day.len() == 3 && day.chars().all(char::is_alphabetic) => {
            (Some(day), rest)
        }
        _ => (None, text),
    };
    let dt: DateTime = rest
        .parse()
        .unwrap_or_else(|e| panic!("bad local time {text:?}: {e}"));
    if let Some(day) = weekday {
        assert_eq!(
            dt.strftime("%a").to_string(),
            day,
            "{text:?}: the weekday in front is wrong"
        );
    }
    site.tz
        .to_ambiguous_timestamp(dt)
        .unambiguous()
        .unwrap_or_else(|e| panic!("{text:?} is not one instant at the site: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Table-driven cases, one table per seed rule
// ---------------------------------------------------------------------------------------------

/// What a case expects.
#[derive(Debug)]
enum Expect {
    /// A grant releasing these doors (in this order) and asking for this `Consume`. The welcome
    /// message and floors must be the key's own.
    Open(&'static [&'static str], Consume),
    /// A denial for this reason (and `Consume::Nothing`).
    Deny(DenyReason),
}
use Expect::{Deny, Open};

#[derive(Debug)]
struct Case {
    /// The seed rule the case checks.
    rule: &'static str,
    key: K,
    /// The door the credential is presented at.
    door: &'static str,
    /// Site-local wall-clock time of the request.
    at: &'static str,
    /// Uses so far (in total, and at `door`).
    uses: Uses,
    clock: ClockTrust,
    /// `Policy::untrusted_clock`.
    policy: UnlimitedPolicy,
    expect: Expect,
}

/// Clock and policy for the cases that do not name them: a trusted clock, default policy.
/// Every case spells out its rule, key, door, time, uses and expectation.
const TRUSTED: Case = Case {
    rule: "",
    key: UNLIMITED,
    door: "",
    at: "",
    uses: FRESH,
    clock: Trusted,
    policy: UnlimitedPolicy::Grant,
    expect: Deny(WrongDoor),
};

/// Runs a table; reports every failing case with its rule.
fn run(group: &str, cases: &[Case]) {
    let site = site();
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        assert!(!case.rule.is_empty(), "{group} #{n} names no rule");
        assert!(!case.door.is_empty(), "{group} #{n} names no door");
        let key = case.key.build(&site, n);
        let now = local(&site, case.at);
        let policy = Policy {
            untrusted_clock: case.policy,
            ..Policy::default()
        };
        let got = decide(&site, policy, &key, case.door, case.uses, now, case.clock);
        let want = match case.expect {
            Open(doors, consume) => {
                // Independent of the table: a limited key's grant counts a use, an unlimited
                // key's does not.
                let by_limit = if key.use_limit.is_limited() {
                    OneUse
                } else {
                    Nothing
                };
                assert_eq!(consume, by_limit, "{group} #{n} ({}): bad table", case.rule);
                let grant = Grant {
                    doors: doors.iter().map(|d| DoorId::from(*d)).collect(),
                    welcome: key.welcome.clone(),
                    floors: key.floors.clone(),
                };
                (Decision::Grant(grant), consume)
            }
            Deny(reason) => (Decision::deny(reason), Nothing),
        };
        if got != want {
            failures.push(format!(
                "  #{n} [{}] key {:?} at {:?} on {:?} uses {:?} clock {:?} policy {:?}\n      \
                 want {want:?}\n       got {got:?}",
                case.rule, case.key, case.door, case.at, case.uses, case.clock, case.policy
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{group}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// Keys the tables share. The reference week is Mon 2026-05-11 … Sun 2026-05-17 (CEST).

const UNLIMITED: K = K {
    doors: &["main"],
    inner: false,
    from: None,
    until: None,
    schedule: Schedule::Always,
    limit: UseLimit::Unlimited,
    welcome: None,
    floors: &[],
    revoked: false,
};
const OUTER: &[&str] = &["main", "garage"];
const SINGLE_USE: K = K {
    doors: OUTER,
    from: Some("Fri 2026-05-15 09:00"),
    until: Some("Fri 2026-05-15 18:00"),
    limit: UseLimit::Total(1),
    ..UNLIMITED
};
const THREE_USES: K = K {
    doors: OUTER,
    limit: UseLimit::Total(3),
    ..UNLIMITED
};
const TWO_PER_DOOR: K = K {
    doors: OUTER,
    limit: UseLimit::PerDoor(2),
    ..UNLIMITED
};
const FRI_TO_SAT: K = K {
    from: Some("Fri 2026-05-15 09:00"),
    until: Some("Sat 2026-05-16 18:00"),
    ..UNLIMITED
};
const OFFICE_HOURS: K = K {
    schedule: daily(w(9, 0, 17, 0)),
    ..UNLIMITED
};
const NIGHTS: K = K {
    schedule: daily(w(22, 0, 6, 0)),
    ..UNLIMITED
};
const MWF_MORNINGS: K = K {
    schedule: weekly(MON | WED | FRI, w(8, 0, 12, 0)),
    ..UNLIMITED
};
const WEEKENDS: K = K {
    schedule: all_day(SAT | SUN),
    ..UNLIMITED
};
const INNER_TOO: K = K {
    inner: true,
    ..UNLIMITED
};

const R_UNLIMITED: &str = "seed 000: unlimited key remains valid forever (no bounds, any time)";
const UNLIMITED_CASES: &[Case] = &[
    Case {
        rule: R_UNLIMITED,
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_UNLIMITED,
        key: UNLIMITED,
        door: "main",
        at: "Sun 2026-05-17 03:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_UNLIMITED,
        key: UNLIMITED,
        door: "main",
        at: "Mon 2001-01-01 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_UNLIMITED,
        key: UNLIMITED,
        door: "main",
        at: "Thu 2099-12-31 23:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: unlimited key is not used up however often it was used",
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(u32::MAX, u32::MAX),
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_UNLIMITED,
        key: K {
            doors: OUTER,
            ..UNLIMITED
        },
        door: "garage",
        at: "Sat 2026-05-16 04:00",
        uses: used(1000, 10),
        expect: Open(&["garage"], Nothing),
        ..TRUSTED
    },
];

const R_SINGLE: &str = "seed 000: single-use key expires after use";
const R_SINGLE_BOUNDS: &str = "seed 000: single-use key opens only between its start and expiry";
const SINGLE_USE_CASES: &[Case] = &[
    Case {
        rule: R_SINGLE,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 12:01",
        uses: used(1, 1),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: single-use key used at one door is used up at every door",
        key: SINGLE_USE,
        door: "garage",
        at: "Fri 2026-05-15 12:01",
        uses: used(1, 0),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE_BOUNDS,
        key: SINGLE_USE,
        door: "garage",
        at: "Fri 2026-05-15 09:00",
        uses: FRESH,
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE_BOUNDS,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 08:59:59",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE_BOUNDS,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 17:59:59",
        uses: FRESH,
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE_BOUNDS,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 18:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: R_SINGLE_BOUNDS,
        key: SINGLE_USE,
        door: "main",
        at: "Sat 2026-05-16 12:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: single-use key with the inner door opens it once too",
        key: K {
            inner: true,
            ..SINGLE_USE
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["inner"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: single-use key with the inner door: one use in total, inner door too",
        key: K {
            inner: true,
            ..SINGLE_USE
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: used(1, 0),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
];

const R_TOTAL: &str = "seed 000: multi-use key: N uses in total";
const R_TOTAL_ACROSS: &str = "seed 000: N uses in total are counted across all doors";
const TOTAL_CASES: &[Case] = &[
    Case {
        rule: R_TOTAL,
        key: THREE_USES,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_TOTAL,
        key: THREE_USES,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 2),
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_TOTAL,
        key: THREE_USES,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(3, 3),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_TOTAL_ACROSS,
        key: THREE_USES,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(3, 0),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_TOTAL_ACROSS,
        key: THREE_USES,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 0),
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_TOTAL_ACROSS,
        key: THREE_USES,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(4, 1),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: "N uses in total: N = 0 never opens",
        key: K {
            limit: UseLimit::Total(0),
            ..THREE_USES
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: "N uses in total: the last of u32::MAX uses still opens",
        key: K {
            limit: UseLimit::Total(u32::MAX),
            ..THREE_USES
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(u32::MAX - 1, 0),
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "N uses in total: u32::MAX uses are used up",
        key: K {
            limit: UseLimit::Total(u32::MAX),
            ..THREE_USES
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(u32::MAX, 0),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
];

const R_PER_DOOR: &str = "seed 001: Each Door Counts: N uses at each door";
const R_PER_DOOR_INDEPENDENT: &str =
    "seed 001: Each Door Counts: a used-up door leaves the other doors unaffected";
const PER_DOOR_CASES: &[Case] = &[
    Case {
        rule: R_PER_DOOR,
        key: TWO_PER_DOOR,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR,
        key: TWO_PER_DOOR,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(1, 1),
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR,
        key: TWO_PER_DOOR,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 2),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR_INDEPENDENT,
        key: TWO_PER_DOOR,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 0),
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR_INDEPENDENT,
        key: TWO_PER_DOOR,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(7, 1),
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR,
        key: TWO_PER_DOOR,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(4, 2),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR,
        key: K {
            limit: UseLimit::PerDoor(1),
            ..TWO_PER_DOOR
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(1, 1),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_PER_DOOR_INDEPENDENT,
        key: K {
            limit: UseLimit::PerDoor(1),
            ..TWO_PER_DOOR
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: used(1, 0),
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: Each Door Counts: an inner door has its own count",
        key: K {
            inner: true,
            ..TWO_PER_DOOR
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: used(4, 0),
        expect: Open(&["inner"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: Each Door Counts: 0 never opens",
        key: K {
            limit: UseLimit::PerDoor(0),
            ..TWO_PER_DOOR
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: Each Door Counts with repeat Never: the time range still applies",
        key: K {
            from: Some("Fri 2026-05-15 09:00"),
            until: Some("Fri 2026-05-15 18:00"),
            ..TWO_PER_DOOR
        },
        door: "main",
        at: "Fri 2026-05-15 18:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: Each Door Counts with repeat Never: within the time range",
        key: K {
            from: Some("Fri 2026-05-15 09:00"),
            until: Some("Fri 2026-05-15 18:00"),
            ..TWO_PER_DOOR
        },
        door: "garage",
        at: "Fri 2026-05-15 17:00",
        uses: used(2, 1),
        expect: Open(&["garage"], OneUse),
        ..TRUSTED
    },
];

const R_START: &str = "seed 000/001: a key opens from its start date-time on (inclusive)";
const R_EXPIRY: &str = "seed 000/001: a key stops opening at its expiry date-time (exclusive)";
const VALIDITY_CASES: &[Case] = &[
    Case {
        rule: R_START,
        key: FRI_TO_SAT,
        door: "main",
        at: "Thu 2026-05-14 12:00",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: R_START,
        key: FRI_TO_SAT,
        door: "main",
        at: "Fri 2026-05-15 08:59:59.999999999",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: R_START,
        key: FRI_TO_SAT,
        door: "main",
        at: "Fri 2026-05-15 09:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_EXPIRY,
        key: FRI_TO_SAT,
        door: "main",
        at: "Sat 2026-05-16 17:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_EXPIRY,
        key: FRI_TO_SAT,
        door: "main",
        at: "Sat 2026-05-16 18:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: R_EXPIRY,
        key: FRI_TO_SAT,
        door: "main",
        at: "Sun 2026-05-17 12:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: "validity: only a start, open for ever after it",
        key: K {
            until: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Thu 2099-12-31 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "validity: only a start, closed before it",
        key: K {
            until: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Fri 2026-05-15 08:59",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: "validity: only an expiry, open any time before it",
        key: K {
            from: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Mon 2001-01-01 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "validity: only an expiry, closed at it",
        key: K {
            from: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Sat 2026-05-16 18:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: "validity: a multi-use key within its dates counts the use",
        key: K {
            limit: UseLimit::Total(2),
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Sat 2026-05-16 10:00",
        uses: used(1, 1),
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
];

const R_DAILY: &str = "seed 001: repeat Daily: every day within the time window";
const R_DAILY_NIGHT: &str = "seed 001: repeat Daily: a night window crosses midnight";
const DAILY_CASES: &[Case] = &[
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Mon 2026-05-11 09:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Mon 2026-05-11 08:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Wed 2026-05-13 16:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Wed 2026-05-13 17:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Sat 2026-05-16 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Sun 2026-05-17 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY,
        key: OFFICE_HOURS,
        door: "main",
        at: "Sun 2026-05-17 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY_NIGHT,
        key: NIGHTS,
        door: "main",
        at: "Tue 2026-05-12 23:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY_NIGHT,
        key: NIGHTS,
        door: "main",
        at: "Wed 2026-05-13 05:59:59",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY_NIGHT,
        key: NIGHTS,
        door: "main",
        at: "Wed 2026-05-13 06:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY_NIGHT,
        key: NIGHTS,
        door: "main",
        at: "Wed 2026-05-13 21:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_DAILY_NIGHT,
        key: NIGHTS,
        door: "main",
        at: "Mon 2026-05-11 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: repeat Daily within the time range: before the range",
        key: K {
            from: Some("Fri 2026-05-15 00:00"),
            until: Some("Sun 2026-05-17 00:00"),
            ..OFFICE_HOURS
        },
        door: "main",
        at: "Thu 2026-05-14 10:00",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: repeat Daily within the time range: in the range and the window",
        key: K {
            from: Some("Fri 2026-05-15 00:00"),
            until: Some("Sun 2026-05-17 00:00"),
            ..OFFICE_HOURS
        },
        door: "main",
        at: "Sat 2026-05-16 10:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 001: repeat Daily within the time range: in the range, not the window",
        key: K {
            from: Some("Fri 2026-05-15 00:00"),
            until: Some("Sun 2026-05-17 00:00"),
            ..OFFICE_HOURS
        },
        door: "main",
        at: "Sat 2026-05-16 20:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
];

const R_WEEKLY: &str = "seed 000 recurring / seed 001 Weekly: chosen weekdays, within the window";
const R_WEEKLY_ALL_DAY: &str = "seed 000 recurring: chosen weekdays, all day";
const WEEKLY_CASES: &[Case] = &[
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Mon 2026-05-11 08:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Mon 2026-05-11 07:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Tue 2026-05-12 10:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Wed 2026-05-13 11:59:59",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Thu 2026-05-14 10:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Fri 2026-05-15 10:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Sat 2026-05-16 10:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Sun 2026-05-17 10:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY,
        key: MWF_MORNINGS,
        door: "main",
        at: "Mon 2026-05-18 10:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY_ALL_DAY,
        key: WEEKENDS,
        door: "main",
        at: "Sat 2026-05-16 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY_ALL_DAY,
        key: WEEKENDS,
        door: "main",
        at: "Sun 2026-05-17 23:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY_ALL_DAY,
        key: WEEKENDS,
        door: "main",
        at: "Mon 2026-05-18 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY_ALL_DAY,
        key: WEEKENDS,
        door: "main",
        at: "Fri 2026-05-15 23:59:59.999999999",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WEEKLY_ALL_DAY,
        key: K {
            schedule: all_day(MON | TUE | WED | THU | FRI | SAT | SUN),
            ..UNLIMITED
        },
        door: "main",
        at: "Thu 2026-05-14 03:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: recurring key with start and expiry: on a chosen day, in its dates",
        key: K {
            from: Some("Mon 2026-05-11 00:00"),
            until: Some("Mon 2026-05-18 00:00"),
            limit: UseLimit::Total(5),
            ..MWF_MORNINGS
        },
        door: "main",
        at: "Wed 2026-05-13 09:00",
        uses: used(4, 4),
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: recurring key with start and expiry: a chosen day after expiry",
        key: K {
            from: Some("Mon 2026-05-11 00:00"),
            until: Some("Mon 2026-05-18 00:00"),
            limit: UseLimit::Total(5),
            ..MWF_MORNINGS
        },
        door: "main",
        at: "Mon 2026-05-18 09:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
];

const R_MIDNIGHT: &str = "a window crossing midnight belongs to the day it starts";
const R_WRAP: &str = "a window crossing midnight: Sunday's night runs into Monday";
const R_ENDS_AT_MIDNIGHT: &str = "a window ending at 00:00 closes at midnight";
const FRIDAY_NIGHT: K = K {
    schedule: weekly(FRI, w(22, 0, 2, 0)),
    ..UNLIMITED
};
const SUNDAY_NIGHT: K = K {
    schedule: weekly(SUN, w(22, 0, 2, 0)),
    ..UNLIMITED
};
const FRIDAY_EVENING: K = K {
    schedule: weekly(FRI, w(18, 0, 0, 0)),
    ..UNLIMITED
};
const MIDNIGHT_CASES: &[Case] = &[
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Fri 2026-05-15 21:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Fri 2026-05-15 22:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Fri 2026-05-15 23:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sat 2026-05-16 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sat 2026-05-16 01:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sat 2026-05-16 01:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_MIDNIGHT,
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sat 2026-05-16 02:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Friday 01:00 is Thursday's night, not Friday's",
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Fri 2026-05-15 01:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Saturday evening is not Friday's night",
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sat 2026-05-16 23:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Sunday 01:00 is Saturday's night, not chosen",
        key: FRIDAY_NIGHT,
        door: "main",
        at: "Sun 2026-05-17 01:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_WRAP,
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Sun 2026-05-17 22:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WRAP,
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Mon 2026-05-18 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WRAP,
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Mon 2026-05-18 01:59:59",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_WRAP,
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Mon 2026-05-18 02:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Sunday 01:00 is Saturday's night, not Sunday's",
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Sun 2026-05-17 01:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Monday evening is not Sunday's night",
        key: SUNDAY_NIGHT,
        door: "main",
        at: "Mon 2026-05-18 23:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Monday's night does not spill into Sunday",
        key: K {
            schedule: weekly(MON, w(23, 0, 1, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-11 00:30",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Monday's night runs into Tuesday",
        key: K {
            schedule: weekly(MON, w(23, 0, 1, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Tue 2026-05-12 00:30",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Saturday and Sunday nights, Monday morning",
        key: K {
            schedule: weekly(SAT | SUN, w(23, 0, 1, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-18 00:30",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: Saturday and Sunday nights, Saturday morning",
        key: K {
            schedule: weekly(SAT | SUN, w(23, 0, 1, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Sat 2026-05-16 00:30",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: a two-minute window around Sunday midnight",
        key: K {
            schedule: weekly(SUN, w(23, 59, 0, 1)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-18 00:00:30",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a window crossing midnight: a two-minute window around Sunday midnight, after",
        key: K {
            schedule: weekly(SUN, w(23, 59, 0, 1)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-18 00:01",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_ENDS_AT_MIDNIGHT,
        key: FRIDAY_EVENING,
        door: "main",
        at: "Fri 2026-05-15 17:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_ENDS_AT_MIDNIGHT,
        key: FRIDAY_EVENING,
        door: "main",
        at: "Fri 2026-05-15 18:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_ENDS_AT_MIDNIGHT,
        key: FRIDAY_EVENING,
        door: "main",
        at: "Fri 2026-05-15 23:59:59.999999999",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_ENDS_AT_MIDNIGHT,
        key: FRIDAY_EVENING,
        door: "main",
        at: "Sat 2026-05-16 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window ending at 00:00 does not open the start of its own day",
        key: FRIDAY_EVENING,
        door: "main",
        at: "Fri 2026-05-15 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a daily window ending at 00:00: Sunday evening, then Monday midnight",
        key: K {
            schedule: daily(w(18, 0, 0, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Sun 2026-05-17 23:59",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a daily window ending at 00:00: Sunday evening, then Monday midnight",
        key: K {
            schedule: daily(w(18, 0, 0, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-18 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window starting at 00:00 belongs to its own day",
        key: K {
            schedule: weekly(MON, w(0, 0, 6, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Mon 2026-05-18 00:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a window starting at 00:00 belongs to its own day",
        key: K {
            schedule: weekly(MON, w(0, 0, 6, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Sun 2026-05-17 23:59:59",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: "a window starting at 00:00 belongs to its own day",
        key: K {
            schedule: weekly(MON, w(0, 0, 6, 0)),
            ..UNLIMITED
        },
        door: "main",
        at: "Tue 2026-05-12 00:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
];

const R_DOORS: &str = "seed 001: a key opens only the doors chosen for it";
const DOOR_CASES: &[Case] = &[
    Case {
        rule: R_DOORS,
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_DOORS,
        key: UNLIMITED,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: R_DOORS,
        key: K {
            doors: OUTER,
            ..UNLIMITED
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["garage"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: by default a key cannot open the inner door",
        key: UNLIMITED,
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: by default a key cannot open the inner door (behind every door)",
        key: UNLIMITED,
        door: "hall",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: only Also Opens Inner Door lets a key open an inner door, listed or not",
        key: K {
            doors: &["main", "inner"],
            ..UNLIMITED
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: by default a key releases only the door it is presented at",
        key: K {
            doors: &["main", "inner"],
            ..UNLIMITED
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "doors: a door the site does not have opens nothing",
        key: UNLIMITED,
        door: "attic",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "doors: a door the site does not have opens nothing, even when listed",
        key: K {
            doors: &["main", "attic"],
            ..UNLIMITED
        },
        door: "attic",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "doors: a key with no doors opens none",
        key: K {
            doors: &[],
            ..UNLIMITED
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "doors: door ids match exactly",
        key: K {
            doors: &["Main"],
            ..UNLIMITED
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "doors: a limited key at a wrong door uses nothing",
        key: K {
            limit: UseLimit::Total(1),
            ..UNLIMITED
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
];

const R_INNER: &str = "seed 000: Also Opens Inner Door adds the inner door(s)";
const R_INNER_RELEASE: &str =
    "seed 000: Also Opens Inner Door: a grant at the outer door releases the inner door(s) too";
const R_BEHIND: &str = "inner doors open only behind a listed outer door they lie behind";
const INNER_CASES: &[Case] = &[
    Case {
        rule: R_INNER_RELEASE,
        key: INNER_TOO,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main", "hall", "inner"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_INNER,
        key: INNER_TOO,
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["inner"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_INNER,
        key: INNER_TOO,
        door: "hall",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["hall"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: Also Opens Inner Door does not add other outer doors",
        key: INNER_TOO,
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: R_BEHIND,
        key: K {
            doors: &["garage"],
            ..INNER_TOO
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["garage", "hall"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_BEHIND,
        key: K {
            doors: &["garage"],
            ..INNER_TOO
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: R_BEHIND,
        key: K {
            doors: &["garage"],
            ..INNER_TOO
        },
        door: "hall",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["hall"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_INNER_RELEASE,
        key: K {
            doors: OUTER,
            ..INNER_TOO
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["garage", "hall"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_INNER,
        key: K {
            doors: OUTER,
            ..INNER_TOO
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["inner"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "inner doors: an inner door listed on a key with the option opens",
        key: K {
            doors: &["inner"],
            ..INNER_TOO
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["inner"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "inner doors: no inner door lies behind another inner door",
        key: K {
            doors: &["inner"],
            ..INNER_TOO
        },
        door: "hall",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "inner doors: the option does not open doors the site does not have",
        key: INNER_TOO,
        door: "attic",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: single-use key with the inner door: outer grant releases both",
        key: K {
            inner: true,
            ..SINGLE_USE
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main", "hall", "inner"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: recurring key with the inner door: outside its days, inner door too",
        key: K {
            inner: true,
            ..MWF_MORNINGS
        },
        door: "inner",
        at: "Tue 2026-05-12 10:00",
        uses: FRESH,
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
];

const R_WELCOME: &str = "seed 000: the welcome message is shown on a grant";
const R_FLOORS: &str = "seed 001: the chosen floors go to the elevator reader on a grant";
const GREETER: K = K {
    welcome: Some("Welcome, Anna! Parcel room is on the left."),
    floors: &[3, 4, -1],
    ..UNLIMITED
};
const CARRIES_CASES: &[Case] = &[
    Case {
        rule: R_WELCOME,
        key: GREETER,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_FLOORS,
        key: K {
            inner: true,
            limit: UseLimit::PerDoor(2),
            ..GREETER
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 1),
        expect: Open(&["inner"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: R_WELCOME,
        key: K {
            floors: &[],
            ..GREETER
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: R_FLOORS,
        key: K {
            welcome: None,
            ..GREETER
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: the welcome message is off by default",
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Open(&["main"], Nothing),
        ..TRUSTED
    },
    Case {
        rule: "a denial carries no welcome message and no floors",
        key: K {
            until: Some("Fri 2026-05-15 09:00"),
            ..GREETER
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
];

const R_REVOKED: &str = "seed 000: a deleted key (tombstone) is denied as revoked";
const REVOKED: K = K {
    revoked: true,
    ..UNLIMITED
};
const REVOKED_CASES: &[Case] = &[
    Case {
        rule: R_REVOKED,
        key: REVOKED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(Revoked),
        ..TRUSTED
    },
    Case {
        rule: R_REVOKED,
        key: K {
            inner: true,
            ..REVOKED
        },
        door: "inner",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(Revoked),
        ..TRUSTED
    },
    Case {
        rule: R_REVOKED,
        key: K {
            revoked: true,
            ..SINGLE_USE
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(Revoked),
        ..TRUSTED
    },
    Case {
        rule: R_REVOKED,
        key: K {
            revoked: true,
            ..MWF_MORNINGS
        },
        door: "main",
        at: "Mon 2026-05-11 10:00",
        uses: FRESH,
        expect: Deny(Revoked),
        ..TRUSTED
    },
    Case {
        rule: R_REVOKED,
        key: K {
            revoked: true,
            ..TWO_PER_DOOR
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(Revoked),
        ..TRUSTED
    },
    Case {
        rule: "seed 000: a deleted key is revoked whatever the untrusted-clock policy",
        key: REVOKED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(Revoked),
    },
];

const R_CLOCK_BOUND: &str = "DESIGN Time: a time-bound or scheduled key is denied on an untrusted clock, whatever the policy";
const R_CLOCK_POLICY: &str =
    "DESIGN Time: a key that does not depend on the time follows the untrusted-clock policy";
const CLOCK_CASES: &[Case] = &[
    Case {
        rule: R_CLOCK_POLICY,
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Open(&["main"], Nothing),
    },
    Case {
        rule: R_CLOCK_POLICY,
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_POLICY,
        key: INNER_TOO,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Open(&["main", "hall", "inner"], Nothing),
    },
    Case {
        rule: "DESIGN Time: the Deny policy has no effect on a trusted clock",
        key: UNLIMITED,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Trusted,
        policy: UnlimitedPolicy::Deny,
        expect: Open(&["main"], Nothing),
    },
    Case {
        rule: "engine: a use count does not depend on the clock: limited, unbounded key follows the policy",
        key: THREE_USES,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: used(2, 2),
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Open(&["main"], OneUse),
    },
    Case {
        rule: R_CLOCK_POLICY,
        key: THREE_USES,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: FRI_TO_SAT,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: K {
            until: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: K {
            from: None,
            ..FRI_TO_SAT
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: OFFICE_HOURS,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: WEEKENDS,
        door: "main",
        at: "Sat 2026-05-16 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: K {
            schedule: all_day(MON | TUE | WED | THU | FRI | SAT | SUN),
            ..UNLIMITED
        },
        door: "main",
        at: "Sat 2026-05-16 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: SINGLE_USE,
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_CLOCK_BOUND,
        key: K {
            from: Some("Fri 2026-05-15 09:00"),
            until: Some("Fri 2026-05-15 18:00"),
            ..TWO_PER_DOOR
        },
        door: "garage",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
];

const R_ORDER: &str = "engine.rs: revoked > wrong door > clock untrusted > not yet valid > expired > outside schedule > used up";
/// A key that fails every check it can at 2026-05-16 10:00 (a Saturday) when revoked,
/// presented at `garage` on an untrusted clock, with three uses of one.
const FAILS_ALL: K = K {
    doors: &["main"],
    inner: false,
    from: Some("Fri 2026-05-15 09:00"),
    until: Some("Fri 2026-05-15 18:00"),
    schedule: weekly(MON, w(8, 0, 9, 0)),
    limit: UseLimit::Total(1),
    welcome: None,
    floors: &[],
    revoked: true,
};
const PRECEDENCE_CASES: &[Case] = &[
    Case {
        rule: R_ORDER,
        key: FAILS_ALL,
        door: "garage",
        at: "Sat 2026-05-16 10:00",
        uses: used(3, 0),
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(Revoked),
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "garage",
        at: "Sat 2026-05-16 10:00",
        uses: used(3, 0),
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(WrongDoor),
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "main",
        at: "Sat 2026-05-16 10:00",
        uses: used(3, 3),
        clock: Untrusted,
        policy: UnlimitedPolicy::Grant,
        expect: Deny(ClockUntrusted),
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "main",
        at: "Sat 2026-05-16 10:00",
        uses: used(3, 3),
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "main",
        at: "Thu 2026-05-14 10:00",
        uses: used(3, 3),
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "main",
        at: "Fri 2026-05-15 10:00",
        uses: used(3, 3),
        expect: Deny(OutsideSchedule),
        ..TRUSTED
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            schedule: weekly(FRI, w(8, 0, 12, 0)),
            ..FAILS_ALL
        },
        door: "main",
        at: "Fri 2026-05-15 10:00",
        uses: used(3, 3),
        expect: Deny(UsedUp),
        ..TRUSTED
    },
    Case {
        rule: R_ORDER,
        key: K {
            revoked: false,
            schedule: weekly(FRI, w(8, 0, 12, 0)),
            ..FAILS_ALL
        },
        door: "main",
        at: "Fri 2026-05-15 10:00",
        uses: FRESH,
        expect: Open(&["main"], OneUse),
        ..TRUSTED
    },
    Case {
        rule: "engine.rs: wrong door is reported whatever the time",
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "garage",
        at: "Sat 2026-05-16 10:00",
        uses: FRESH,
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
    Case {
        rule: "engine.rs: an inner door the key may not open is a wrong door before the clock",
        key: K {
            revoked: false,
            ..FAILS_ALL
        },
        door: "inner",
        at: "Sat 2026-05-16 10:00",
        uses: FRESH,
        clock: Untrusted,
        policy: UnlimitedPolicy::Deny,
        expect: Deny(WrongDoor),
    },
    Case {
        rule: "engine.rs: a start after the expiry reads as not yet valid before the start",
        key: K {
            revoked: false,
            schedule: Schedule::Always,
            from: Some("Sat 2026-05-16 09:00"),
            until: Some("Fri 2026-05-15 09:00"),
            ..FAILS_ALL
        },
        door: "main",
        at: "Fri 2026-05-15 12:00",
        uses: FRESH,
        expect: Deny(NotYetValid),
        ..TRUSTED
    },
    Case {
        rule: "engine.rs: a start after the expiry reads as expired after the start",
        key: K {
            revoked: false,
            schedule: Schedule::Always,
            from: Some("Sat 2026-05-16 09:00"),
            until: Some("Fri 2026-05-15 09:00"),
            ..FAILS_ALL
        },
        door: "main",
        at: "Sat 2026-05-16 12:00",
        uses: FRESH,
        expect: Deny(Expired),
        ..TRUSTED
    },
    Case {
        rule: "engine.rs: a per-door count used up elsewhere never hides a wrong door",
        key: K {
            revoked: false,
            schedule: Schedule::Always,
            from: None,
            until: None,
            limit: UseLimit::PerDoor(1),
            ..FAILS_ALL
        },
        door: "garage",
        at: "Sat 2026-05-16 12:00",
        uses: used(1, 0),
        expect: Deny(WrongDoor),
        ..TRUSTED
    },
];

#[test]
fn table_unlimited_key() {
    run("unlimited key", UNLIMITED_CASES);
}

#[test]
fn table_single_use_key() {
    run("single-use key", SINGLE_USE_CASES);
}

#[test]
fn table_uses_in_total() {
    run("N uses in total", TOTAL_CASES);
}

#[test]
fn table_uses_per_door() {
    run("N uses per door", PER_DOOR_CASES);
}

#[test]
fn table_validity_bounds() {
    run("validity start and expiry", VALIDITY_CASES);
}

#[test]
fn table_daily_schedule() {
    run("daily window", DAILY_CASES);
}

#[test]
fn table_weekly_schedule() {
    run("weekly window", WEEKLY_CASES);
}

#[test]
fn table_midnight_crossing() {
    run("midnight-crossing windows", MIDNIGHT_CASES);
}

#[test]
fn table_listed_doors() {
    run("listed doors", DOOR_CASES);
}

#[test]
fn table_inner_doors() {
    run("also opens inner door", INNER_CASES);
}

#[test]
fn table_welcome_and_floors() {
    run("welcome message and floors", CARRIES_CASES);
}

#[test]
fn table_revoked() {
    run("revoked key", REVOKED_CASES);
}

#[test]
fn table_untrusted_clock() {
    run("untrusted clock", CLOCK_CASES);
}

#[test]
fn table_deny_precedence() {
    run("deny-reason precedence", PRECEDENCE_CASES);
}

#[test]
fn weekday_bits_match_the_model() {
    use Weekday::{Friday, Monday, Saturday, Sunday, Thursday, Tuesday, Wednesday};
    let pairs = [
        (MON, Monday),
        (TUE, Tuesday),
        (WED, Wednesday),
        (THU, Thursday),
        (FRI, Friday),
        (SAT, Saturday),
        (SUN, Sunday),
    ];
    for (bit, day) in pairs {
        assert_eq!(WeekdaySet(bit), WeekdaySet::of(&[day]), "{day:?}");
        assert!(WeekdaySet(bit).contains(day));
    }
    assert_eq!(
        WeekdaySet::EVERY_DAY,
        WeekdaySet(MON | TUE | WED | THU | FRI | SAT | SUN)
    );
}

#[test]
fn schedules_that_cannot_work_are_rejected() {
    assert!(daily(w(9, 0, 9, 0)).validate().is_err());
    assert!(weekly(MON, w(0, 0, 0, 0)).validate().is_err());
    assert!(all_day(0).validate().is_err());
    // Bit 7 is not a weekday.
    assert!(all_day(0x80).validate().is_err());
    assert!(weekly(0, w(9, 0, 17, 0)).validate().is_err());
    assert!(daily(w(22, 0, 2, 0)).validate().is_ok());
    assert!(daily(w(18, 0, 0, 0)).validate().is_ok());
    assert!(all_day(SUN).validate().is_ok());
    assert!(Schedule::Always.validate().is_ok());
}

#[test]
fn an_empty_window_that_slipped_past_validation_never_opens() {
    // Fail closed: `start == end` is rejected by `validate`, but if one reached the engine it
    // must not open all day.
    let schedule = daily(w(9, 0, 9, 0));
    let monday = civil::date(2026, 5, 11);
    for minute in 0..24 * 60 {
        let t = monday.at(hm(minute).0, hm(minute).1, 0, 0);
        assert!(!in_schedule(&schedule, t), "{t}");
    }
}

/// Hours and minutes of minute `minute` of a day.
fn hm(minute: i32) -> (i8, i8) {
    (
        i8::try_from(minute / 60).expect("hour"),
        i8::try_from(minute % 60).expect("minute"),
    )
}

// ---------------------------------------------------------------------------------------------
// 2. DST days (and 3: midnight-crossing windows across them)
// ---------------------------------------------------------------------------------------------

fn utc(text: &str) -> Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("bad UTC instant {text:?}: {e}"))
}

/// An unlimited key for `main` with `schedule`.
fn scheduled(schedule: Schedule) -> KeyRules {
    K {
        schedule,
        ..UNLIMITED
    }
    .build(&site(), 0)
}

fn opens_at(site: &Site, key: &KeyRules, now: Timestamp) -> bool {
    let (decision, consume) = decide(site, Policy::default(), key, "main", FRESH, now, Trusted);
    assert_eq!(consume, Nothing);
    match decision {
        Decision::Grant(_) => true,
        Decision::Deny {
            reason: OutsideSchedule,
        } => false,
        other @ Decision::Deny { .. } => panic!("{now}: unexpected {other:?}"),
    }
}

/// The spans of real time in `[from, to)` (UTC) during which a key with `schedule` opens,
/// sampled every minute, as `"start..end"` in UTC.
fn open_spans(zone: &str, schedule: Schedule, from: &str, to: &str) -> Vec<String> {
    let site = site_in(zone);
    let key = scheduled(schedule);
    let (from, to) = (utc(from), utc(to));
    let mut spans = Vec::new();
    let mut open_since = None;
    let mut t = from;
    while t < to {
        let open = opens_at(&site, &key, t);
        // The engine and `in_schedule` on the site's wall clock agree.
        assert_eq!(
            open,
            in_schedule(&key.schedule, t.to_zoned(site.tz.clone()).datetime()),
            "{t}"
        );
        match (open, open_since) {
            (true, None) => open_since = Some(t),
            (false, Some(since)) => {
                spans.push(format!("{since}..{t}"));
                open_since = None;
            }
            _ => {}
        }
        t += SignedDuration::from_mins(1);
    }
    if let Some(since) = open_since {
        spans.push(format!("{since}..{to}"));
    }
    spans
}

#[test]
fn jiff_agrees_on_the_transitions() {
    // The instants the DST tests below rely on, from jiff's own disambiguation.
    let berlin = TimeZone::get(BERLIN).unwrap();
    let new_york = TimeZone::get(NEW_YORK).unwrap();
    let spring = civil::date(2026, 3, 29).at(2, 30, 0, 0);
    assert!(matches!(
        berlin.to_ambiguous_zoned(spring).offset(),
        AmbiguousOffset::Gap { .. }
    ));
    // "Compatible" (what `to_zoned` does) moves a skipped time forward by the gap.
    let z = spring.to_zoned(berlin.clone()).unwrap();
    assert_eq!(z.timestamp(), utc("2026-03-29T01:30:00Z"));
    assert_eq!(z.datetime(), civil::date(2026, 3, 29).at(3, 30, 0, 0));
    let autumn = civil::date(2026, 10, 25).at(2, 30, 0, 0);
    let ambiguous = berlin.to_ambiguous_zoned(autumn);
    assert!(matches!(ambiguous.offset(), AmbiguousOffset::Fold { .. }));
    assert_eq!(
        ambiguous.clone().earlier().unwrap().timestamp(),
        utc("2026-10-25T00:30:00Z")
    );
    assert_eq!(
        ambiguous.later().unwrap().timestamp(),
        utc("2026-10-25T01:30:00Z")
    );
    let ny_spring = civil::date(2026, 3, 8).at(2, 30, 0, 0);
    assert!(matches!(
        new_york.to_ambiguous_zoned(ny_spring).offset(),
        AmbiguousOffset::Gap { .. }
    ));
    let ny_autumn = new_york.to_ambiguous_zoned(civil::date(2026, 11, 1).at(1, 30, 0, 0));
    assert_eq!(
        ny_autumn.clone().earlier().unwrap().timestamp(),
        utc("2026-11-01T05:30:00Z")
    );
    assert_eq!(
        ny_autumn.later().unwrap().timestamp(),
        utc("2026-11-01T06:30:00Z")
    );
}

#[test]
fn berlin_spring_forward_the_skipped_hour_does_not_exist() {
    // 2026-03-29: 02:00 CET → 03:00 CEST (01:00Z). A window entirely in the skipped hour
    // never opens that day, and it is back the next day.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(2, 0, 3, 0)),
            "2026-03-28T12:00:00Z",
            "2026-03-30T12:00:00Z"
        ),
        ["2026-03-30T00:00:00Z..2026-03-30T01:00:00Z"]
    );
    // Resolving 02:30 either way gives an instant whose wall clock is 01:30 or 03:30.
    let site = site_in(BERLIN);
    let key = scheduled(daily(w(2, 0, 3, 0)));
    let skipped = civil::date(2026, 3, 29).at(2, 30, 0, 0);
    let ambiguous = site.tz.to_ambiguous_zoned(skipped);
    for z in [
        skipped.to_zoned(site.tz.clone()).unwrap(),
        ambiguous.clone().earlier().unwrap(),
        ambiguous.later().unwrap(),
    ] {
        assert!(!opens_at(&site, &key, z.timestamp()), "{z}");
    }
}

#[test]
fn berlin_spring_forward_a_window_around_the_gap_loses_the_skipped_part() {
    // 01:30–03:30 on the wall clock is one real hour on 2026-03-29.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(1, 30, 3, 30)),
            "2026-03-28T23:00:00Z",
            "2026-03-29T22:00:00Z"
        ),
        ["2026-03-29T00:30:00Z..2026-03-29T01:30:00Z"]
    );
    // A window starting in the gap opens when the wall clock reaches 03:00.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(2, 30, 4, 0)),
            "2026-03-28T23:00:00Z",
            "2026-03-29T22:00:00Z"
        ),
        ["2026-03-29T01:00:00Z..2026-03-29T02:00:00Z"]
    );
}

#[test]
fn berlin_spring_forward_office_hours_follow_the_wall_clock() {
    // 09:00–17:00 is 08:00Z–16:00Z in CET, 07:00Z–15:00Z in CEST, on the day and after it.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(9, 0, 17, 0)),
            "2026-03-28T00:00:00Z",
            "2026-03-31T00:00:00Z"
        ),
        [
            "2026-03-28T08:00:00Z..2026-03-28T16:00:00Z",
            "2026-03-29T07:00:00Z..2026-03-29T15:00:00Z",
            "2026-03-30T07:00:00Z..2026-03-30T15:00:00Z",
        ]
    );
}

#[test]
fn berlin_spring_forward_night_window_across_midnight_and_gap() {
    // Saturday 22:00 CET (21:00Z) until the wall clock passes 03:00, which it reaches at
    // 01:00Z by jumping from 02:00: four real hours. Sunday's night is not chosen.
    assert_eq!(
        open_spans(
            BERLIN,
            weekly(SAT, w(22, 0, 3, 0)),
            "2026-03-28T00:00:00Z",
            "2026-03-30T00:00:00Z"
        ),
        ["2026-03-28T21:00:00Z..2026-03-29T01:00:00Z"]
    );
}

#[test]
fn berlin_fall_back_a_window_is_open_in_both_passes() {
    // 2026-10-25: 03:00 CEST → 02:00 CET (01:00Z); 02:00–03:00 is shown twice.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(2, 0, 2, 30)),
            "2026-10-24T22:00:00Z",
            "2026-10-25T23:00:00Z"
        ),
        [
            "2026-10-25T00:00:00Z..2026-10-25T00:30:00Z",
            "2026-10-25T01:00:00Z..2026-10-25T01:30:00Z",
        ]
    );
    // A window covering the repeated hour lasts two real hours.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(2, 0, 3, 0)),
            "2026-10-24T22:00:00Z",
            "2026-10-25T23:00:00Z"
        ),
        ["2026-10-25T00:00:00Z..2026-10-25T02:00:00Z"]
    );
    // A window ending in the repeated hour reopens for its tail on the second pass.
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(1, 0, 2, 30)),
            "2026-10-24T22:00:00Z",
            "2026-10-25T22:00:00Z"
        ),
        [
            "2026-10-24T23:00:00Z..2026-10-25T00:30:00Z",
            "2026-10-25T01:00:00Z..2026-10-25T01:30:00Z",
        ]
    );
    // Built from wall-clock time with explicit disambiguation: both passes of 02:15 open.
    let site = site_in(BERLIN);
    let key = scheduled(daily(w(2, 0, 2, 30)));
    let repeated = site
        .tz
        .to_ambiguous_zoned(civil::date(2026, 10, 25).at(2, 15, 0, 0));
    assert!(opens_at(
        &site,
        &key,
        repeated.clone().earlier().unwrap().timestamp()
    ));
    assert!(opens_at(&site, &key, repeated.later().unwrap().timestamp()));
}

#[test]
fn berlin_fall_back_office_hours_follow_the_wall_clock() {
    assert_eq!(
        open_spans(
            BERLIN,
            daily(w(9, 0, 17, 0)),
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z"
        ),
        [
            "2026-10-24T07:00:00Z..2026-10-24T15:00:00Z",
            "2026-10-25T08:00:00Z..2026-10-25T16:00:00Z",
            "2026-10-26T08:00:00Z..2026-10-26T16:00:00Z",
        ]
    );
}

#[test]
fn berlin_fall_back_night_window_across_midnight_and_fold() {
    // Saturday 22:00 CEST (20:00Z) to Sunday 03:00 CET (02:00Z): six real hours.
    assert_eq!(
        open_spans(
            BERLIN,
            weekly(SAT, w(22, 0, 3, 0)),
            "2026-10-24T00:00:00Z",
            "2026-10-26T00:00:00Z"
        ),
        ["2026-10-24T20:00:00Z..2026-10-25T02:00:00Z"]
    );
}

#[test]
fn berlin_fall_back_validity_is_an_instant_not_a_wall_clock_time() {
    // A key valid from the second 02:30 of 2026-10-25 does not open at the first 02:45.
    let site = site_in(BERLIN);
    let repeated = |h, m| {
        site.tz
            .to_ambiguous_zoned(civil::date(2026, 10, 25).at(h, m, 0, 0))
    };
    let mut key = UNLIMITED.build(&site, 0);
    key.valid_from = Some(repeated(2, 30).later().unwrap().timestamp());
    let first_pass = repeated(2, 45).earlier().unwrap().timestamp();
    let second_pass = repeated(2, 45).later().unwrap().timestamp();
    let at = |now| decide(&site, Policy::default(), &key, "main", FRESH, now, Trusted).0;
    assert_eq!(at(first_pass), Decision::deny(NotYetValid));
    assert!(at(second_pass).is_grant());
}

#[test]
fn new_york_spring_forward() {
    // 2026-03-08: 02:00 EST → 03:00 EDT (07:00Z).
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(2, 0, 3, 0)),
            "2026-03-08T05:00:00Z",
            "2026-03-09T04:00:00Z"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(1, 30, 3, 30)),
            "2026-03-08T05:00:00Z",
            "2026-03-09T04:00:00Z"
        ),
        ["2026-03-08T06:30:00Z..2026-03-08T07:30:00Z"]
    );
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(9, 0, 17, 0)),
            "2026-03-07T05:00:00Z",
            "2026-03-10T04:00:00Z"
        ),
        [
            "2026-03-07T14:00:00Z..2026-03-07T22:00:00Z",
            "2026-03-08T13:00:00Z..2026-03-08T21:00:00Z",
            "2026-03-09T13:00:00Z..2026-03-09T21:00:00Z",
        ]
    );
}

#[test]
fn new_york_fall_back() {
    // 2026-11-01: 02:00 EDT → 01:00 EST (06:00Z); 01:00–02:00 is shown twice.
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(1, 0, 2, 0)),
            "2026-11-01T04:00:00Z",
            "2026-11-02T05:00:00Z"
        ),
        ["2026-11-01T05:00:00Z..2026-11-01T07:00:00Z"]
    );
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(1, 15, 1, 45)),
            "2026-11-01T04:00:00Z",
            "2026-11-02T05:00:00Z"
        ),
        [
            "2026-11-01T05:15:00Z..2026-11-01T05:45:00Z",
            "2026-11-01T06:15:00Z..2026-11-01T06:45:00Z",
        ]
    );
    assert_eq!(
        open_spans(
            NEW_YORK,
            daily(w(9, 0, 17, 0)),
            "2026-10-31T04:00:00Z",
            "2026-11-03T05:00:00Z"
        ),
        [
            "2026-10-31T13:00:00Z..2026-10-31T21:00:00Z",
            "2026-11-01T14:00:00Z..2026-11-01T22:00:00Z",
            "2026-11-02T14:00:00Z..2026-11-02T22:00:00Z",
        ]
    );
}

#[test]
fn new_york_sunday_night_into_monday_after_fall_back() {
    // Sunday 2026-11-01 22:00 EST (03:00Z Monday) to Monday 02:00 EST (07:00Z).
    assert_eq!(
        open_spans(
            NEW_YORK,
            weekly(SUN, w(22, 0, 2, 0)),
            "2026-10-31T04:00:00Z",
            "2026-11-03T05:00:00Z"
        ),
        ["2026-11-02T03:00:00Z..2026-11-02T07:00:00Z"]
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Property tests
// ---------------------------------------------------------------------------------------------

const DOOR_NAMES: [&str; 5] = ["main", "garage", "inner", "hall", "attic"];
const ZONES: [&str; 4] = [BERLIN, NEW_YORK, "UTC", "Australia/Lord_Howe"];
/// 2026-01-01T00:00:00Z: the instants cover 2026, with both DST changes in each zone.
const T0: i64 = 1_767_225_600;
const YEAR: i64 = 365 * 86_400;

fn arb_instant() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        // Whole minutes land on window edges often.
        (0..YEAR / 60).prop_map(|m| T0 + m * 60),
        (0..YEAR).prop_map(|s| T0 + s),
    ]
    .prop_map(|s| Timestamp::from_second(s).expect("in range"))
}

fn arb_time() -> impl Strategy<Value = Time> {
    prop_oneof![Just(0), 0..24 * 60i32].prop_map(|m| {
        let (h, m) = hm(m);
        civil::time(h, m, 0, 0)
    })
}

fn arb_window() -> impl Strategy<Value = Window> {
    (arb_time(), arb_time())
        .prop_filter("a window's start and end differ", |(s, e)| s != e)
        .prop_map(|(start, end)| Window { start, end })
}

fn arb_schedule() -> impl Strategy<Value = Schedule> {
    prop_oneof![
        Just(Schedule::Always),
        arb_window().prop_map(daily),
        (1u8..=0x7f, proptest::option::of(arb_window())).prop_map(|(days, window)| {
            Schedule::Weekly {
                days: WeekdaySet(days),
                window,
            }
        }),
    ]
}

fn arb_limit() -> impl Strategy<Value = UseLimit> {
    prop_oneof![
        Just(UseLimit::Unlimited),
        (0u32..4).prop_map(UseLimit::Total),
        (0u32..4).prop_map(UseLimit::PerDoor),
    ]
}

fn arb_key() -> impl Strategy<Value = KeyRules> {
    (
        subsequence(DOOR_NAMES.to_vec(), 0..=DOOR_NAMES.len()),
        any::<bool>(),
        proptest::option::of(arb_instant()),
        proptest::option::of(arb_instant()),
        arb_schedule(),
        arb_limit(),
        proptest::option::of(Just("Hello".to_owned())),
        proptest::collection::vec(-3i16..40, 0..3),
        proptest::bool::weighted(0.1),
        select(Category::ALL.to_vec()),
    )
        .prop_map(
            |(doors, inner, from, until, schedule, limit, welcome, floors, revoked, category)| {
                KeyRules {
                    id: "k".into(),
                    name: "k".to_owned(),
                    category,
                    doors: doors.into_iter().map(DoorId::from).collect(),
                    opens_inner_door: inner,
                    valid_from: from,
                    valid_until: until,
                    schedule,
                    use_limit: limit,
                    welcome,
                    floors,
                    revoked,
                    issuer: None,
                }
            },
        )
}

fn arb_uses() -> impl Strategy<Value = Uses> {
    (0u32..4, 0u32..4).prop_map(|(at_door, elsewhere)| used(at_door + elsewhere, at_door))
}

fn arb_clock() -> impl Strategy<Value = ClockTrust> {
    prop_oneof![3 => Just(Trusted), 1 => Just(Untrusted)]
}

/// Limits on some categories but `friend` (which a key set cannot limit), and a knowledge time
/// (or none) anywhere in the tested year: `now` minus it is negative, within the limit or past
/// it about as often.
fn arb_freshness() -> impl Strategy<Value = Freshness> {
    let limit = proptest::option::of(select(vec![60u32, 3600, 86_400, 30 * 86_400, 180 * 86_400]));
    (
        proptest::collection::vec(limit, Category::ALL.len() - 1),
        proptest::option::of(arb_instant()),
    )
        .prop_map(|(limits, known_at)| {
            let limited = Category::ALL[1..]
                .iter()
                .zip(limits)
                .filter_map(|(&c, l)| l.map(|l| (c, l)));
            Freshness {
                limits: StaleLimits::new(limited).expect("valid limits"),
                known_at,
            }
        })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![Just(UnlimitedPolicy::Grant), Just(UnlimitedPolicy::Deny)],
        prop_oneof![1 => Just(Freshness::default()), 3 => arb_freshness()],
    )
        .prop_map(|(untrusted_clock, freshness)| Policy {
            untrusted_clock,
            freshness,
        })
}

/// The `stale_after` limit of the key's category, restated from the wire form.
fn stale_limit(policy: Policy, key: &KeyRules) -> Option<i64> {
    policy
        .freshness
        .limits
        .iter()
        .find(|(c, _)| *c == key.category)
        .map(|(_, s)| i64::from(s))
}

/// The freshness rule, restated: a limited category is usable while the latest word from the
/// cloud is at most its limit old (a word from the future is fresh); with no word, it is not.
fn fresh_enough(policy: Policy, key: &KeyRules, now: Timestamp) -> bool {
    stale_limit(policy, key).is_none_or(|limit| {
        policy
            .freshness
            .known_at
            .is_some_and(|known| now.as_second() - known.as_second() <= limit)
    })
}

/// The door rule, restated: a door of the site; an inner door only with "also opens inner
/// door", when listed or behind a listed outer door; an outer door only when listed.
fn door_allowed(site: &Site, key: &KeyRules, door: &str) -> bool {
    let Some(info) = site.doors.get(door) else {
        return false;
    };
    let listed = key.doors.iter().any(|d| d == door);
    if !info.inner {
        return listed;
    }
    let behind_listed_outer = key.doors.iter().any(|l| {
        site.doors.get(l).is_some_and(|o| !o.inner)
            && (info.behind.is_empty() || info.behind.contains(l))
    });
    key.opens_inner_door && (listed || behind_listed_outer)
}

/// The schedule rule, restated on the civil timeline: a window opened on day `d` (a day the
/// schedule allows) runs from `d` at its start to its end on `d`, or on `d + 1` when the end is
/// not after the start.
fn schedule_allows(schedule: &Schedule, local: DateTime) -> bool {
    let (days, window) = match schedule {
        Schedule::Always => return true,
        Schedule::Daily { window } => (WeekdaySet::EVERY_DAY, Some(*window)),
        Schedule::Weekly { days, window } => (*days, *window),
    };
    let today = local.date();
    let Some(window) = window else {
        return days.contains(today.weekday());
    };
    let open_on = |d: Date| {
        let opens = d.to_datetime(window.start);
        let closes = if window.end > window.start {
            d.to_datetime(window.end)
        } else {
            d.tomorrow().expect("in range").to_datetime(window.end)
        };
        days.contains(d.weekday()) && opens <= local && local < closes
    };
    open_on(today) || open_on(today.yesterday().expect("in range"))
}

fn time_bound(key: &KeyRules) -> bool {
    key.valid_from.is_some() || key.valid_until.is_some() || key.schedule != Schedule::Always
}

fn below_limit(limit: UseLimit, uses: Uses) -> bool {
    match limit {
        UseLimit::Unlimited => true,
        UseLimit::Total(n) => uses.total < n,
        UseLimit::PerDoor(n) => uses.at_door < n,
    }
}

/// The conditions in the documented order, with the reason each one gives.
fn first_failure(
    site: &Site,
    policy: Policy,
    key: &KeyRules,
    door: &str,
    uses: Uses,
    now: Timestamp,
    clock: ClockTrust,
) -> Option<DenyReason> {
    let local = now.to_zoned(site.tz.clone()).datetime();
    let clock_ok = clock == Trusted
        || (!time_bound(key)
            && stale_limit(policy, key).is_none()
            && policy.untrusted_clock == UnlimitedPolicy::Grant);
    let checks = [
        (!key.revoked, Revoked),
        (door_allowed(site, key, door), WrongDoor),
        (clock_ok, ClockUntrusted),
        (fresh_enough(policy, key, now), StaleKeySet),
        (key.valid_from.is_none_or(|f| f <= now), NotYetValid),
        (key.valid_until.is_none_or(|u| now < u), Expired),
        (schedule_allows(&key.schedule, local), OutsideSchedule),
        (below_limit(key.use_limit, uses), UsedUp),
    ];
    checks
        .into_iter()
        .find(|(ok, _)| !ok)
        .map(|(_, reason)| reason)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// (a) A grant implies every condition holds, and carries what it should.
    #[test]
    fn a_grant_implies_every_condition(
        zone in select(ZONES.to_vec()),
        key in arb_key(),
        door in select(DOOR_NAMES.to_vec()),
        uses in arb_uses(),
        now in arb_instant(),
        clock in arb_clock(),
        policy in arb_policy(),
    ) {
        let site = site_in(zone);
        let (decision, consume) = decide(&site, policy, &key, door, uses, now, clock);
        let Decision::Grant(grant) = decision else {
            prop_assert_eq!(consume, Nothing, "a denial consumes nothing");
            return Ok(());
        };
        prop_assert!(!key.revoked, "granted a revoked key");
        prop_assert!(door_allowed(&site, &key, door), "granted a door the key does not open");
        prop_assert!(
            clock == Trusted
                || (!time_bound(&key)
                    && stale_limit(policy, &key).is_none()
                    && policy.untrusted_clock == UnlimitedPolicy::Grant),
            "granted a time-bound key (or against the policy) on an untrusted clock"
        );
        prop_assert!(fresh_enough(policy, &key, now), "granted a key whose category went stale");
        prop_assert!(key.valid_from.is_none_or(|f| f <= now), "granted before the start");
        prop_assert!(key.valid_until.is_none_or(|u| now < u), "granted at or after expiry");
        let local = now.to_zoned(site.tz.clone()).datetime();
        prop_assert!(schedule_allows(&key.schedule, local), "granted outside the schedule at {}", local);
        prop_assert!(below_limit(key.use_limit, uses), "granted a used-up key");
        let want = if key.use_limit.is_limited() { OneUse } else { Nothing };
        prop_assert_eq!(consume, want);
        // What the grant carries.
        prop_assert_eq!(grant.doors.first().map(DoorId::as_str), Some(door));
        let at_outer = !site.doors[door].inner;
        let inner_behind: Vec<DoorId> = site
            .doors
            .iter()
            .filter(|(_, d)| d.inner && (d.behind.is_empty() || d.behind.iter().any(|b| b == door)))
            .map(|(id, _)| id.clone())
            .collect();
        let released_inner = &grant.doors[1..];
        if key.opens_inner_door && at_outer {
            prop_assert_eq!(released_inner, inner_behind.as_slice());
        } else {
            prop_assert!(released_inner.is_empty());
        }
        prop_assert_eq!(&grant.welcome, &key.welcome);
        prop_assert_eq!(&grant.floors, &key.floors);
    }

    /// (a, converse) A denial names the first failing condition in the documented order, and
    /// when every condition holds the key is granted.
    #[test]
    fn the_deny_reason_is_the_first_failing_condition(
        zone in select(ZONES.to_vec()),
        key in arb_key(),
        door in select(DOOR_NAMES.to_vec()),
        uses in arb_uses(),
        now in arb_instant(),
        clock in arb_clock(),
        policy in arb_policy(),
    ) {
        let site = site_in(zone);
        let (decision, _) = decide(&site, policy, &key, door, uses, now, clock);
        prop_assert_eq!(
            decision.deny_reason(),
            first_failure(&site, policy, &key, door, uses, now, clock)
        );
    }

    /// The engine's `in_schedule` agrees with the restated rule on any wall-clock time.
    #[test]
    fn in_schedule_matches_the_civil_rule(
        schedule in arb_schedule(),
        day in 0i32..366,
        minute in 0i32..24 * 60,
        second in 0i8..60,
    ) {
        let date = civil::date(2026, 1, 1)
            .checked_add(jiff::Span::new().days(day))
            .expect("in range");
        let (h, m) = hm(minute);
        let local = date.at(h, m, second, 0);
        prop_assert_eq!(in_schedule(&schedule, local), schedule_allows(&schedule, local));
    }
}

/// A limited key for the use-count properties.
fn arb_limited_key() -> impl Strategy<Value = KeyRules> {
    (
        arb_key(),
        prop_oneof![
            (0u32..5).prop_map(UseLimit::Total),
            (0u32..5).prop_map(UseLimit::PerDoor)
        ],
    )
        .prop_map(|(mut key, limit)| {
            key.use_limit = limit;
            key.revoked = false;
            key
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// (b) A use limit is never exceeded: requests at random doors and times, with the counters
    /// kept as the store keeps them (one use at the door asked about, one in total, on
    /// `Consume::OneUse`).
    #[test]
    fn a_use_limit_is_never_exceeded(
        zone in select(ZONES.to_vec()),
        key in arb_limited_key(),
        requests in proptest::collection::vec(
            (select(DOOR_NAMES.to_vec()), arb_instant(), arb_clock()),
            1..80,
        ),
        policy in arb_policy(),
    ) {
        let site = site_in(zone);
        let mut total = 0u32;
        let mut at_door: BTreeMap<&str, u32> = BTreeMap::new();
        for (door, now, clock) in requests {
            let uses = used(total, at_door.get(door).copied().unwrap_or(0));
            let (decision, consume) = decide(&site, policy, &key, door, uses, now, clock);
            if decision.is_grant() {
                prop_assert_eq!(consume, OneUse, "a limited key's grant must count");
                total += 1;
                *at_door.entry(door).or_default() += 1;
            } else {
                prop_assert_eq!(consume, Nothing);
            }
        }
        match key.use_limit {
            UseLimit::Total(n) => prop_assert!(total <= n, "{} grants for Total({})", total, n),
            UseLimit::PerDoor(n) => {
                for (door, grants) in &at_door {
                    prop_assert!(*grants <= n, "{} grants at {} for PerDoor({})", grants, door, n);
                }
            }
            UseLimit::Unlimited => unreachable!(),
        }
    }

    /// (b, converse) A key that meets every other condition is honoured exactly as often as its
    /// limit allows: N in total, or N at each door.
    #[test]
    fn a_use_limit_is_honoured_in_full(
        n in 0u32..5,
        per_door in any::<bool>(),
        requests in proptest::collection::vec(select(DOOR_NAMES[..4].to_vec()), 0..40),
    ) {
        let site = site();
        let limit = if per_door { UseLimit::PerDoor(n) } else { UseLimit::Total(n) };
        let key = K { doors: OUTER, inner: true, limit, ..UNLIMITED }.build(&site, 0);
        let now = local(&site, "Fri 2026-05-15 12:00");
        let mut total = 0u32;
        let mut asked: BTreeMap<&str, u32> = BTreeMap::new();
        let mut granted: BTreeMap<&str, u32> = BTreeMap::new();
        for door in requests {
            *asked.entry(door).or_default() += 1;
            let uses = used(total, granted.get(door).copied().unwrap_or(0));
            let (decision, _) = decide(&site, Policy::default(), &key, door, uses, now, Trusted);
            if decision.is_grant() {
                total += 1;
                *granted.entry(door).or_default() += 1;
            } else {
                prop_assert_eq!(decision.deny_reason(), Some(UsedUp));
            }
        }
        let asked_total: u32 = asked.values().sum();
        if per_door {
            for (door, count) in &asked {
                prop_assert_eq!(granted.get(door).copied().unwrap_or(0), (*count).min(n));
            }
        } else {
            prop_assert_eq!(total, asked_total.min(n));
        }
    }
}

// Lockout properties.

#[derive(Clone, Copy, Debug)]
enum PinEvent {
    /// An unknown PIN this many milliseconds after the previous event.
    Unknown(u64),
    /// A correct PIN this many milliseconds after the previous event (the caller only reports
    /// it when the keypad is not locked: a locked keypad refuses every PIN).
    Known(u64),
}

fn arb_gap() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..5_000,
        3 => 0u64..600_000,
        1 => 0u64..4 * 3_600_000,
        1 => 0u64..30 * 3_600_000,
    ]
}

fn arb_lockout_policy() -> impl Strategy<Value = LockoutPolicy> {
    (0u32..8, 1u64..120, 1u64..100, 0u32..100).prop_map(|(attempts, base, times, step)| {
        LockoutPolicy {
            attempts,
            base: Duration::from_secs(base),
            max: Duration::from_secs(base * times),
            pins_per_step: step,
        }
    })
}

fn ms(n: u64) -> SignedDuration {
    SignedDuration::from_millis(i64::try_from(n).expect("small"))
}

fn sd(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).expect("small")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// (c) No more than `attempts` unknown PINs get through before the keypad locks; a locked
    /// keypad stays locked until `until` and guesses meanwhile neither count nor extend it; a
    /// lockout lasts as long as `LockoutPolicy::duration` says for its level.
    #[test]
    fn the_lockout_holds(
        policy in arb_lockout_policy(),
        active_pins in prop_oneof![0u32..200, 0u32..100_000],
        events in proptest::collection::vec(
            prop_oneof![
                6 => arb_gap().prop_map(PinEvent::Unknown),
                1 => arb_gap().prop_map(PinEvent::Known),
            ],
            1..120,
        ),
    ) {
        let attempts = policy.attempts.max(1);
        let scale = (active_pins / policy.pins_per_step.max(1)).max(1);
        let quiet = sd(policy.max.saturating_mul(scale).min(CEILING));
        let mut guard = PinGuard::default();
        let mut now = Timestamp::from_second(T0).unwrap();
        // The model: unknown PINs let through since the last lockout, correct PIN or quiet
        // spell; lockouts in a row; the current lockout's end; the last counted guess.
        let mut through = 0u32;
        let mut level = 0u32;
        let mut until: Option<Timestamp> = None;
        let mut last: Option<Timestamp> = None;
        for event in events {
            let (gap, known) = match event {
                PinEvent::Unknown(gap) => (gap, false),
                PinEvent::Known(gap) => (gap, true),
            };
            now += ms(gap);
            let locked = until.is_some_and(|u| now < u);
            prop_assert_eq!(guard.is_locked(now), locked, "at {}", now);
            prop_assert_eq!(guard.locked_until(now), until.filter(|_| locked));
            if known {
                if !locked {
                    guard.known_pin();
                    (through, level, until, last) = (0, 0, None, None);
                }
                continue;
            }
            let since = until.max(last);
            if since.is_some_and(|s| now.duration_since(s) >= quiet) {
                (through, level, until, last) = (0, 0, None, None);
            }
            let started = guard.unknown_pin(&policy, active_pins, now);
            if locked {
                prop_assert_eq!(started, None, "a guess during a lockout starts nothing");
                prop_assert_eq!(guard.locked_until(now), until, "a guess during a lockout extends it");
                continue;
            }
            through += 1;
            last = Some(now);
            prop_assert!(through <= attempts);
            if through < attempts {
                prop_assert_eq!(started, None, "locked after {} of {} guesses", through, attempts);
                prop_assert!(!guard.is_locked(now));
                continue;
            }
            let Some(started) = started else {
                return Err(TestCaseError::fail(format!(
                    "{through} unknown PINs in a row (attempts {attempts}) and no lockout"
                )));
            };
            let length = policy.duration(level, active_pins);
            prop_assert!(length <= CEILING);
            prop_assert_eq!(started.until, now + sd(length));
            level += 1;
            prop_assert_eq!(started.level, level);
            prop_assert!(guard.is_locked(now));
            prop_assert!(
                guard.is_locked(started.until - SignedDuration::from_nanos(1)) || length.is_zero()
            );
            prop_assert!(!guard.is_locked(started.until));
            through = 0;
            until = Some(started.until);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. PIN lockout cases
// ---------------------------------------------------------------------------------------------

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// Feeds `n` unknown PINs one second apart from `from`; returns the lockout the last one
/// started, if any (earlier ones must not lock).
fn guesses(
    guard: &mut PinGuard,
    policy: &LockoutPolicy,
    pins: u32,
    from: i64,
    n: i64,
) -> Option<Timestamp> {
    let mut last = None;
    for i in 0..n {
        let started = guard.unknown_pin(policy, pins, t(from + i));
        if i + 1 < n {
            assert_eq!(
                started,
                None,
                "guess {} of {n} at {} locked early",
                i + 1,
                from + i
            );
        }
        last = started.map(|s| s.until);
    }
    last
}

#[test]
fn lockout_length_steps_with_active_pins() {
    let p = LockoutPolicy::default();
    // scale = max(1, pins / 50), integer division.
    for (pins, secs) in [
        (0, 30),
        (1, 30),
        (49, 30),
        (50, 30),
        (99, 30),
        (100, 60),
        (149, 60),
        (150, 90),
        (1000, 600),
    ] {
        let mut g = PinGuard::default();
        let until = guesses(&mut g, &p, pins, 0, 5).expect("fifth guess locks");
        assert_eq!(until, t(4 + secs), "{pins} active PINs");
    }
}

#[test]
fn scaled_lockouts_double_up_to_the_scaled_maximum() {
    let p = LockoutPolicy::default();
    // 100 PINs: 60 s, doubling, capped at 2 h.
    let want = [60, 120, 240, 480, 960, 1920, 3840, 7200, 7200];
    for (level, secs) in (0u32..).zip(want) {
        assert_eq!(
            p.duration(level, 100),
            Duration::from_secs(secs),
            "level {level}"
        );
    }
    // 3000 PINs (scale 60): 30 min, the scaled maximum (60 h) is above the 24 h ceiling.
    assert_eq!(p.duration(0, 3000), Duration::from_secs(1800));
    assert_eq!(p.duration(5, 3000), Duration::from_secs(57_600));
    assert_eq!(p.duration(6, 3000), CEILING);
    assert_eq!(p.duration(u32::MAX, u32::MAX), CEILING);
}

#[test]
fn scaled_lockouts_escalate_run_by_run() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    let mut at = 0;
    for secs in [60, 120, 240] {
        let until = guesses(&mut g, &p, 100, at, 5).expect("locks");
        assert_eq!(until, t(at + 4 + secs));
        at += 4 + secs;
    }
}

#[test]
fn active_pins_at_the_locking_guess_set_the_scale() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    guesses(&mut g, &p, 10, 0, 4);
    let started = g.unknown_pin(&p, 100, t(4)).expect("locks");
    assert_eq!(started.until, t(4 + 60));
}

#[test]
fn zero_pins_per_step_counts_every_pin() {
    let p = LockoutPolicy {
        pins_per_step: 0,
        ..LockoutPolicy::default()
    };
    let mut g = PinGuard::default();
    assert_eq!(guesses(&mut g, &p, 3, 0, 5), Some(t(4 + 90)));
}

#[test]
fn quiet_spell_scales_with_active_pins() {
    let p = LockoutPolicy::default();
    // 100 PINs: the quiet spell is 2 h. Four guesses, then one just before it ends: locked.
    let mut g = PinGuard::default();
    guesses(&mut g, &p, 100, 0, 4);
    assert!(g.unknown_pin(&p, 100, t(3 + 7199)).is_some());
    // The same fifth guess once 2 h have passed: the four are forgotten.
    let mut g = PinGuard::default();
    guesses(&mut g, &p, 100, 0, 4);
    assert_eq!(g.unknown_pin(&p, 100, t(3 + 7200)), None);
    assert_eq!(guesses(&mut g, &p, 100, 3 + 7201, 3), None);
    assert!(g.unknown_pin(&p, 100, t(3 + 7204)).is_some());
}

#[test]
fn quiet_spell_counts_from_the_end_of_a_lockout() {
    let p = LockoutPolicy::default();
    // Locked 4..34; an hour after 34 the escalation is forgotten, a second earlier it is not.
    let mut g = PinGuard::default();
    assert_eq!(guesses(&mut g, &p, 1, 0, 5), Some(t(34)));
    let soon = 34 + 3599;
    assert_eq!(guesses(&mut g, &p, 1, soon, 5), Some(t(soon + 4 + 60)));

    let mut g = PinGuard::default();
    assert_eq!(guesses(&mut g, &p, 1, 0, 5), Some(t(34)));
    let later = 34 + 3600;
    assert_eq!(guesses(&mut g, &p, 1, later, 5), Some(t(later + 4 + 30)));
}

#[test]
fn quiet_spell_resets_a_long_escalation() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    let mut at = 0;
    for secs in [30, 60, 120, 240] {
        assert_eq!(guesses(&mut g, &p, 1, at, 5), Some(t(at + 4 + secs)));
        at += 4 + secs;
    }
    at += 3600;
    let started = {
        guesses(&mut g, &p, 1, at, 4);
        g.unknown_pin(&p, 1, t(at + 4)).expect("locks")
    };
    assert_eq!(started.until, t(at + 4 + 30));
    assert_eq!(started.level, 1);
    assert_eq!(started.failures, 5);
}

#[test]
fn a_slow_guesser_inside_the_quiet_spell_is_still_counted() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    // One guess every 59 minutes: each is within an hour of the one before.
    for i in 0..4 {
        assert_eq!(g.unknown_pin(&p, 1, t(i * 59 * 60)), None);
    }
    assert!(g.unknown_pin(&p, 1, t(4 * 59 * 60)).is_some());
}

#[test]
fn correct_pin_resets_the_escalation() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    assert_eq!(guesses(&mut g, &p, 1, 0, 5), Some(t(34)));
    assert_eq!(guesses(&mut g, &p, 1, 40, 5), Some(t(44 + 60)));
    g.known_pin();
    assert!(!g.is_locked(t(104)));
    guesses(&mut g, &p, 1, 200, 4);
    let started = g.unknown_pin(&p, 1, t(204)).expect("locks");
    assert_eq!(
        (started.until, started.level, started.failures),
        (t(234), 1, 5)
    );
}

#[test]
fn guesses_during_a_lockout_are_not_counted() {
    let p = LockoutPolicy::default();
    let mut g = PinGuard::default();
    assert_eq!(guesses(&mut g, &p, 1, 0, 5), Some(t(34)));
    for i in 5..34 {
        assert_eq!(g.unknown_pin(&p, 1, t(i)), None);
        assert_eq!(g.locked_until(t(i)), Some(t(34)));
    }
    // Four after the lockout do not lock; the fifth does, and the failures reported are the
    // ten counted ones.
    guesses(&mut g, &p, 1, 34, 4);
    assert!(!g.is_locked(t(37)));
    let started = g.unknown_pin(&p, 1, t(38)).expect("locks");
    assert_eq!((started.level, started.failures), (2, 10));
}

#[test]
fn one_attempt_locks_at_once_and_zero_means_one() {
    for attempts in [0, 1] {
        let p = LockoutPolicy {
            attempts,
            ..LockoutPolicy::default()
        };
        let mut g = PinGuard::default();
        let started = g.unknown_pin(&p, 1, t(0)).expect("first guess locks");
        assert_eq!(started.until, t(30));
        assert!(g.is_locked(t(29)));
        assert_eq!(g.locked_until(t(29)), Some(t(30)));
        assert_eq!(g.locked_until(t(30)), None);
    }
}

#[test]
fn a_lockout_near_the_end_of_time_saturates() {
    let p = LockoutPolicy {
        attempts: 1,
        ..LockoutPolicy::default()
    };
    let mut g = PinGuard::default();
    let now = Timestamp::MAX - SignedDuration::from_secs(10);
    let started = g.unknown_pin(&p, 1_000_000, now).expect("locks");
    assert_eq!(started.until, Timestamp::MAX);
    assert!(g.is_locked(now));
}

#[test]
fn decisions_do_not_depend_on_the_category() {
    // Seed 000 categories are labels for the activity record, not rules.
    let site = site();
    let now = local(&site, "Fri 2026-05-15 12:00");
    for category in Category::ALL {
        let mut key = SINGLE_USE.build(&site, 0);
        key.category = category;
        let (decision, consume) =
            decide(&site, Policy::default(), &key, "main", FRESH, now, Trusted);
        assert!(decision.is_grant(), "{category:?}");
        assert_eq!(consume, OneUse);
    }
}

// ---------------------------------------------------------------------------------------------
// Keys that stop when the gateway's knowledge is too old (`stale_after`)
// ---------------------------------------------------------------------------------------------

/// The policy of a key set limiting `delivery` to a day, last heard from at `heard`.
fn delivery_for_a_day(heard: Option<Timestamp>) -> Policy {
    Policy {
        freshness: Freshness {
            limits: StaleLimits::new([(Category::Delivery, 86_400)]).expect("valid limits"),
            known_at: heard,
        },
        ..Policy::default()
    }
}

/// A key built from `k` with `category`.
fn key_in(site: &Site, category: Category, k: &K) -> KeyRules {
    let mut key = k.build(site, 0);
    key.category = category;
    key
}

/// A case of the freshness table: (rule, category, door, hours since the cloud was heard,
/// clock, expected reason).
type StaleCase = (
    &'static str,
    Category,
    &'static str,
    i64,
    ClockTrust,
    Option<DenyReason>,
);

const STALE_CASES: &[StaleCase] = &[
    (
        "fresh: just heard",
        Category::Delivery,
        "main",
        0,
        Trusted,
        None,
    ),
    (
        "the limit itself still opens",
        Category::Delivery,
        "main",
        24,
        Trusted,
        None,
    ),
    (
        "past the limit: stale",
        Category::Delivery,
        "main",
        25,
        Trusted,
        Some(StaleKeySet),
    ),
    (
        "residents' keys never go stale",
        Category::Friend,
        "main",
        24 * 400,
        Trusted,
        None,
    ),
    (
        "other categories are not limited",
        Category::Services,
        "main",
        24 * 400,
        Trusted,
        None,
    ),
    (
        "knowledge signed ahead of the clock is fresh",
        Category::Delivery,
        "main",
        -1,
        Trusted,
        None,
    ),
    (
        "an untrusted clock cannot vouch for freshness",
        Category::Delivery,
        "main",
        0,
        Untrusted,
        Some(ClockUntrusted),
    ),
    (
        "an untrusted clock still lets residents in",
        Category::Friend,
        "main",
        24 * 400,
        Untrusted,
        None,
    ),
    (
        "wrong door comes first",
        Category::Delivery,
        "garage",
        48,
        Trusted,
        Some(WrongDoor),
    ),
];

#[test]
fn a_limited_category_stops_once_the_cloud_has_been_silent_longer_than_its_limit() {
    let site = site();
    let heard = local(&site, "Fri 2026-05-15 12:00");
    let policy = delivery_for_a_day(Some(heard));
    for &(rule, category, door, hours, clock, want) in STALE_CASES {
        let key = key_in(&site, category, &UNLIMITED);
        let now = heard + SignedDuration::from_hours(hours);
        let (decision, _) = decide(&site, policy, &key, door, FRESH, now, clock);
        assert_eq!(decision.deny_reason(), want, "{rule}");
    }
    // A second past the limit is past it.
    let courier = key_in(&site, Category::Delivery, &UNLIMITED);
    let later = heard + SignedDuration::from_secs(86_401);
    let (decision, _) = decide(&site, policy, &courier, "main", FRESH, later, Trusted);
    assert_eq!(decision.deny_reason(), Some(StaleKeySet));
}

#[test]
fn a_stale_key_set_comes_after_revocation_and_before_the_keys_own_rules() {
    let site = site();
    let heard = local(&site, "Fri 2026-05-15 12:00");
    let policy = delivery_for_a_day(Some(heard));
    let two_days = heard + SignedDuration::from_hours(48);
    // A revocation that did arrive is the truer answer.
    let mut revoked = key_in(&site, Category::Delivery, &UNLIMITED);
    revoked.revoked = true;
    let (decision, _) = decide(&site, policy, &revoked, "main", FRESH, two_days, Trusted);
    assert_eq!(decision.deny_reason(), Some(Revoked));
    // The key's own rules may have changed in the cloud meanwhile.
    let expired = key_in(&site, Category::Delivery, &SINGLE_USE);
    let (decision, _) = decide(&site, policy, &expired, "main", FRESH, two_days, Trusted);
    assert_eq!(decision.deny_reason(), Some(StaleKeySet));
    // Never heard (no signed time believed): a limited category is stale at once.
    let never = delivery_for_a_day(None);
    let courier = key_in(&site, Category::Delivery, &UNLIMITED);
    let (decision, _) = decide(&site, never, &courier, "main", FRESH, heard, Trusted);
    assert_eq!(decision.deny_reason(), Some(StaleKeySet));
    // What status and telemetry show.
    assert_eq!(never.freshness.stale(heard), vec![Category::Delivery]);
    assert_eq!(policy.freshness.stale(heard), Vec::new());
}

#[test]
fn stale_limits_read_as_the_wire_has_them_and_never_name_residents() {
    let read = |cbor: &[u8]| ciborium::from_reader::<StaleLimits, _>(cbor);
    let mut bytes = Vec::new();
    let limits = StaleLimits::new([(Category::Event, 600), (Category::Delivery, 86_400)]).unwrap();
    ciborium::into_writer(&limits, &mut bytes).unwrap();
    // In `Category::ALL` order, names and whole seconds.
    let value: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(
        value,
        ciborium::Value::Map(vec![
            ("event".into(), 600.into()),
            ("delivery".into(), 86_400.into()),
        ])
    );
    assert_eq!(read(&bytes).unwrap(), limits);
    assert_eq!(
        limits.get(Category::Delivery),
        Some(SignedDuration::from_hours(24))
    );
    assert_eq!(limits.get(Category::Services), None);
    let refused = |pairs: Vec<(ciborium::Value, ciborium::Value)>| {
        let mut bytes = Vec::new();
        ciborium::into_writer(&ciborium::Value::Map(pairs), &mut bytes).unwrap();
        read(&bytes).unwrap_err().to_string()
    };
    let e = refused(vec![("friend".into(), 60.into())]);
    assert!(e.contains("residents"), "{e}");
    let e = refused(vec![("delivery".into(), 0.into())]);
    assert!(e.contains("1 to"), "{e}");
    let e = refused(vec![("delivery".into(), 40_000_000.into())]);
    assert!(e.contains("1 to"), "{e}");
    let e = refused(vec![
        ("delivery".into(), 60.into()),
        ("delivery".into(), 70.into()),
    ]);
    assert!(e.contains("twice"), "{e}");
    let e = refused(vec![("residents".into(), 60.into())]);
    assert!(e.contains("unknown variant"), "{e}");
    assert!(StaleLimits::default().is_empty());
}
