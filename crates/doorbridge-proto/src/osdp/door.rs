//! A door's contact, as an OSDP input reports it (`osdp_ISTATR`): opened, closed, **forced
//! open** (opened with no release in force) and **held open** (open longer than allowed).
//!
//! Pure: no I/O; the time is passed in (the caller's monotonic time base).

use std::time::Duration;

use crate::bus::message::DoorEventKind;

/// One door contact's state.
#[derive(Clone, Debug)]
pub struct DoorContact {
    /// How long the door may stay open before it is reported held open.
    held_after: Duration,
    /// The contact's last state. Readers report inputs when they change, and the gateway does
    /// not poll them (`docs/osdp.md`), so a door is taken to be closed until told otherwise.
    open: bool,
    /// Opening before this instant is authorised (a grant or a remote open pulsed the strike).
    released_until: Option<Duration>,
    /// When the door opened, while it is open and not yet reported held open.
    held_check: Option<Duration>,
}

impl DoorContact {
    pub fn new(held_after: Duration) -> Self {
        DoorContact {
            held_after,
            open: false,
            released_until: None,
            held_check: None,
        }
    }

    /// The strike was released at `now` for `pulse`: an opening until then is authorised
    /// (with a grace of one second for a slow door).
    pub fn release(&mut self, now: Duration, pulse: Duration) {
        let until = now + pulse + Duration::from_secs(1);
        self.released_until = Some(self.released_until.map_or(until, |u| u.max(until)));
    }

    /// The contact reports `open` at `now`; returns the door event, if this is a change.
    pub fn input(&mut self, open: bool, now: Duration) -> Option<DoorEventKind> {
        let was = std::mem::replace(&mut self.open, open);
        match (was, open) {
            (true, true) | (false, false) => None,
            (false, true) => {
                self.held_check = Some(now);
                let released = self.released_until.is_some_and(|u| now <= u);
                Some(if released {
                    DoorEventKind::Opened
                } else {
                    DoorEventKind::ForcedOpen
                })
            }
            (true, false) => {
                self.held_check = None;
                self.released_until = None;
                Some(DoorEventKind::Closed)
            }
        }
    }

    /// When [`DoorContact::on_timeout`] has something to do.
    pub fn deadline(&self) -> Option<Duration> {
        self.held_check.map(|t| t + self.held_after)
    }

    /// Reports a door open longer than allowed, once per opening.
    pub fn on_timeout(&mut self, now: Duration) -> Option<DoorEventKind> {
        if self.deadline().is_some_and(|d| now >= d) {
            self.held_check = None;
            Some(DoorEventKind::HeldOpen)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_opening_inside_a_release_is_a_plain_opening() {
        let mut d = DoorContact::new(30 * S);
        assert_eq!(d.input(false, Duration::ZERO), None);
        d.release(S, 3 * S);
        assert_eq!(d.input(true, 2 * S), Some(DoorEventKind::Opened));
        assert_eq!(d.input(false, 5 * S), Some(DoorEventKind::Closed));
        // The release was used up by that opening and closing.
        assert_eq!(d.input(true, 6 * S), Some(DoorEventKind::ForcedOpen));
    }

    #[test]
    fn an_opening_without_a_release_is_forced() {
        let mut d = DoorContact::new(30 * S);
        d.input(false, Duration::ZERO);
        d.release(S, 3 * S);
        // Past the pulse and its grace.
        assert_eq!(d.input(true, 6 * S), Some(DoorEventKind::ForcedOpen));
    }

    #[test]
    fn held_open_is_reported_once_per_opening() {
        let mut d = DoorContact::new(10 * S);
        d.input(false, Duration::ZERO);
        d.release(Duration::ZERO, 3 * S);
        d.input(true, S);
        assert_eq!(d.deadline(), Some(11 * S));
        assert_eq!(d.on_timeout(10 * S), None);
        assert_eq!(d.on_timeout(11 * S), Some(DoorEventKind::HeldOpen));
        assert_eq!(d.on_timeout(20 * S), None);
        assert_eq!(d.deadline(), None);
        assert_eq!(d.input(false, 21 * S), Some(DoorEventKind::Closed));
    }

    #[test]
    fn a_door_is_closed_until_reported_open_and_repeats_are_not_events() {
        let mut d = DoorContact::new(10 * S);
        assert_eq!(d.input(false, Duration::ZERO), None);
        assert_eq!(
            d.input(true, Duration::ZERO),
            Some(DoorEventKind::ForcedOpen)
        );
        assert_eq!(d.input(true, S), None);
        assert_eq!(d.on_timeout(10 * S), Some(DoorEventKind::HeldOpen));
        assert_eq!(d.input(false, 11 * S), Some(DoorEventKind::Closed));
        assert_eq!(d.input(false, 12 * S), None);
    }
}
