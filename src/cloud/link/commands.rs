//! The cloud's remote commands carried out: open a door (judged and recorded like a
//! credential, then sent to the unit) and push a unit's settings (held as desired until the
//! unit takes them); each result is reported on `command-result`.

use jiff::Timestamp;

use super::super::acks::Publisher;
use super::super::payload::{OpenDoor, UnitSettings};
use super::super::report::{Outcome, Report};
use super::super::sync::CommandParts;
use super::super::topics::Channel;
use super::{OPEN_RESULT_WAIT, Worker};
use crate::access::{Decision, DoorId};
use crate::bus::message::{OpenDoor as OpenDoorMsg, Settings as BusSettings};
use crate::bus::session::Command as BusCommand;
use crate::drivers::bus::{CommandOutcome, OPEN_PULSE_MS};
use crate::store::RemoteOpen;
use crate::task::clock_synced;

impl Worker {
    pub(super) async fn open_door(&mut self, command: OpenDoor, now: Timestamp) {
        let id = command.command_id.clone();
        let refused = if command.issued_at < self.started {
            Some("issued before the gateway started (a possible replay)".to_owned())
        } else {
            self.replay
                .check(&command, &self.spec.target, now)
                .err()
                .map(|e| e.to_string())
        };
        if let Some(reason) = refused {
            tracing::warn!(command_id = %id, door = %command.door, %reason, "open-door command refused");
            self.record_refusal(Channel::OpenDoor.suffix(), &reason)
                .await;
            self.publish_result(
                Some(id),
                "open-door",
                Outcome::Rejected,
                Some(reason),
                Some(command.door),
            );
            return;
        }
        let request = RemoteOpen {
            command_id: id.clone(),
            key_id: command.key_id.clone(),
            door: command.door.clone(),
            now,
            clock_synced: clock_synced(),
        };
        let verdict = match self.store.remote_open(request).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(command_id = %id, error = %e, "open-door command not decided");
                self.publish_result(
                    Some(id),
                    "open-door",
                    Outcome::Rejected,
                    Some(format!("not decided: {e}")),
                    Some(command.door),
                );
                return;
            }
        };
        let doors = match verdict.decision {
            Decision::Grant(g) => g.doors,
            Decision::Deny { reason } => {
                tracing::info!(command_id = %id, door = %command.door, key_id = %command.key_id, %reason, "remote open denied");
                self.publish_result(
                    Some(id),
                    "open-door",
                    Outcome::Denied,
                    Some(reason.name().to_owned()),
                    Some(command.door),
                );
                return;
            }
        };
        tracing::info!(command_id = %id, door = %command.door, key_id = %command.key_id, released = ?doors, "remote open granted");
        let pulse = BusCommand::OpenDoor(OpenDoorMsg {
            door: 0,
            pulse_ms: OPEN_PULSE_MS,
        });
        let main = self.router.send_tracked(&command.door, pulse.clone());
        for other in doors.iter().filter(|d| **d != command.door) {
            if !self.router.send(other, pulse.clone()) {
                tracing::warn!(door = %other, "a granted door could not be released: no unit serves it or its queue is full");
            }
        }
        // Wait for the unit off this task: the link keeps serving meanwhile.
        tokio::spawn(report_unit_result(
            main,
            self.unit_result(id, "open-door", command.door, Outcome::Opened, None),
        ));
    }

    /// Door-unit settings: held as desired (on disk, surviving restarts) and pushed to the
    /// unit now; a unit that cannot take them now gets them when it is next reachable.
    pub(super) async fn unit_settings(&mut self, command: UnitSettings, now: Timestamp) {
        let id = command.command_id.clone();
        let door = command.door.clone();
        let refused = if command.issued_at < self.started {
            Some("issued before the gateway started (a possible replay)".to_owned())
        } else if !self.router.serves(&door) {
            Some(format!("no door unit serves door {door:?}"))
        } else {
            self.replay
                .check_parts(
                    &CommandParts {
                        target: &command.target,
                        command_id: &command.command_id,
                        issued_at: command.issued_at,
                        expires_at: command.expires_at,
                    },
                    &self.spec.target,
                    now,
                )
                .err()
                .map(|e| e.to_string())
        };
        if let Some(reason) = refused {
            tracing::warn!(command_id = %id, %door, %reason, "settings command refused");
            self.record_refusal(Channel::Settings.suffix(), &reason)
                .await;
            self.publish_result(
                Some(id),
                "unit-settings",
                Outcome::Rejected,
                Some(reason),
                Some(door),
            );
            return;
        }
        let given = BusSettings {
            volume: command.volume,
            name: command.name,
            house_number: command.house_number,
            inner_door: command.inner_door,
        };
        let desired = match self.store.desire_settings(door.clone(), given).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(command_id = %id, error = %e, "settings not stored");
                self.publish_result(
                    Some(id),
                    "unit-settings",
                    Outcome::Rejected,
                    Some(format!("not stored: {e}")),
                    Some(door),
                );
                return;
            }
        };
        tracing::info!(command_id = %id, %door, settings = ?desired, "door-unit settings desired");
        self.router
            .update_settings(&door, |u| u.desired = Some(desired.clone()));
        let done = self
            .router
            .send_tracked(&door, BusCommand::Settings(desired));
        tokio::spawn(report_unit_result(
            done,
            self.unit_result(
                id,
                "unit-settings",
                door,
                Outcome::Done,
                Some("held as desired; pushed when the unit is next reachable"),
            ),
        ));
    }

    fn unit_result(
        &self,
        command_id: String,
        command: &'static str,
        door: DoorId,
        done_as: Outcome,
        otherwise: Option<&'static str>,
    ) -> UnitResult {
        UnitResult {
            publisher: self.publisher.clone(),
            topic: self.spec.topics.topic(Channel::CommandResult),
            command_id,
            command,
            door,
            done_as,
            otherwise,
        }
    }
}

/// Where and how to report a command carried out by a door unit.
struct UnitResult {
    publisher: Publisher,
    topic: String,
    command_id: String,
    command: &'static str,
    door: DoorId,
    /// The outcome when the unit confirms it.
    done_as: Outcome,
    /// What happens when it does not (added to the reason).
    otherwise: Option<&'static str>,
}

/// Waits for the unit to carry out a command and tells the cloud how it ended.
async fn report_unit_result(
    done: Option<tokio::sync::oneshot::Receiver<CommandOutcome>>,
    r: UnitResult,
) {
    /// Why the command was not carried out: the unit cannot take it, or was not reached.
    enum Failed {
        Refused(&'static str),
        Unreached(&'static str),
    }
    let failed = match done {
        None => Some(Failed::Unreached(
            "no door unit serves that door, or its queue is full",
        )),
        Some(done) => match tokio::time::timeout(OPEN_RESULT_WAIT, done).await {
            Ok(Ok(CommandOutcome::Done)) => None,
            Ok(Ok(CommandOutcome::Unsupported)) => Some(Failed::Refused(
                "the door is served by an OSDP reader, which takes no such command",
            )),
            Ok(Ok(CommandOutcome::NoAnswer)) => {
                Some(Failed::Unreached("the door unit did not answer"))
            }
            Ok(Ok(CommandOutcome::Expired) | Err(_)) | Err(_) => Some(Failed::Unreached(
                "the door unit could not be reached in time",
            )),
        },
    };
    let (outcome, reason) = match failed {
        None => (r.done_as, None),
        Some(Failed::Refused(why)) => {
            tracing::warn!(command_id = %r.command_id, command = r.command, reason = why, "command refused");
            (Outcome::Rejected, Some(why.to_owned()))
        }
        Some(Failed::Unreached(why)) => {
            let reason = match r.otherwise {
                Some(then) => format!("{why}; {then}"),
                None => why.to_owned(),
            };
            tracing::warn!(command_id = %r.command_id, command = r.command, %reason, "command not carried out");
            (Outcome::Unreachable, Some(reason))
        }
    };
    let report = Report::CommandResult {
        command_id: Some(r.command_id),
        command: r.command.into(),
        outcome,
        reason,
        door: Some(r.door),
        at: Timestamp::now(),
    };
    let _ = r
        .publisher
        .try_publish(r.topic, false, report.encode(), None);
}
