//! Keys that stop when the gateway's knowledge is too old (`docs/cloud-protocol.md` §5.1–5.2),
//! on the real daemon: `doorbridge run` as deployed, a real broker (rumqttd, reached through a
//! proxy the test cuts), a simulated door unit on a real pty, and the cloud's signed snapshot
//! and heartbeats. Time passes on the gateway's wall clock by libfaketime (`LD_PRELOAD`, its
//! offset read from a file the test rewrites): the daemon's clock jumps forward while its
//! timers keep real time, and nothing sleeps.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use doorbridge::access::{Category, CredentialKind, DenyReason, Key, StaleLimits, UseLimit};
use doorbridge::bus::session::Answer;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::store::Record;
use doorbridge_sim::{Output, ReportKind, SimCommand, SimConfig};
use jiff::{SignedDuration, Timestamp};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::{Proxy, RumqttdBroker, wait_for};
use crate::bus::{Sim, unit};
use crate::fixtures::key;
use crate::gateway::{Cloud, Daemon, Home, WAIT};
use crate::util::{doorbridge, libfaketime};

/// A simulated door unit (address 1) on a pty.
struct Door {
    commands: mpsc::Sender<SimCommand>,
    outputs: mpsc::Receiver<Output>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Door {
    fn start(link: &Path) -> Door {
        let Sim {
            commands,
            outputs,
            stop,
            task,
        } = Sim::start(link, &[unit(1)], SimConfig::default());
        Door {
            commands,
            outputs,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The unit's next output for which `want` holds.
    async fn next<T>(&mut self, what: &str, want: impl Fn(Output) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.outputs.recv()).await {
                Ok(Some(output)) => {
                    if let Some(found) = want(output) {
                        return found;
                    }
                }
                Ok(None) => panic!("{what}: the simulated unit stopped"),
                Err(elapsed) => panic!("{what}: {elapsed}"),
            }
        }
    }

    /// Waits until the gateway serves the unit: its start-up status report was acknowledged.
    async fn served(&mut self) {
        self.next("the unit's status acknowledged", |o| {
            matches!(
                o,
                Output::Acked {
                    report: ReportKind::Status,
                    ..
                }
            )
            .then_some(())
        })
        .await;
    }

    /// Types `pin` on the unit's keypad; the gateway's decision.
    async fn pin(&mut self, pin: &str) -> Answer {
        self.commands
            .send(SimCommand::Verify {
                unit: unit(1),
                kind: CredentialKind::Pin,
                value: pin.as_bytes().to_vec(),
                reader: 0,
            })
            .await
            .expect("the unit takes commands");
        self.next(&format!("the decision for PIN {pin}"), |o| match o {
            Output::Decision { answer, .. } => Some(answer),
            _ => None,
        })
        .await
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The wall clock of the daemon: an offset libfaketime reads from a file at every call.
struct Clock {
    file: PathBuf,
    library: PathBuf,
}

impl Clock {
    fn new(dir: &Path, library: PathBuf) -> Clock {
        let clock = Clock {
            file: dir.join("faketime"),
            library,
        };
        clock.set_ahead(SignedDuration::ZERO);
        clock
    }

    /// Moves the daemon's wall clock to `ahead` of true time.
    fn set_ahead(&self, ahead: SignedDuration) {
        std::fs::write(&self.file, format!("+{}s\n", ahead.as_secs()))
            .expect("write the faketime file");
    }

    /// The environment that gives `doorbridge run` this clock. The monotonic clock stays real,
    /// so the daemon's timers (keep-alive, backoff, polling) are not disturbed by the jump.
    fn apply(&self, command: &mut std::process::Command) {
        command
            .env("LD_PRELOAD", &self.library)
            .env("FAKETIME_TIMESTAMP_FILE", &self.file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
}

fn courier() -> Key {
    // `fixtures::key` makes delivery keys.
    key(
        "courier",
        CredentialKind::Pin,
        "730155",
        UseLimit::Unlimited,
    )
}

fn resident() -> Key {
    let mut k = key(
        "resident",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    );
    k.rules.category = Category::Friend;
    k
}

fn denied(answer: &Answer) -> Option<DenyReason> {
    match answer {
        Answer::Deny(reason) => Some(*reason),
        Answer::Grant(_) => None,
    }
}

/// `doorbridge status --json` of the running daemon.
fn status(home: &Home) -> serde_json::Value {
    let out = doorbridge()
        .arg("--config")
        .arg(&home.config)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run doorbridge status");
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// A delivery key limited to an hour without word from the cloud opens; the gateway loses the
/// cloud and two hours pass on its clock: the delivery key is refused as `stale_key_set` (and
/// recorded so), the resident's key still opens. Back online, a heartbeat naming a version the
/// gateway does not hold (it missed a change) refreshes nothing and asks for a resync; one
/// naming the held version, signed at the new time, opens the delivery key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_key_stops_while_the_cloud_is_silent_and_a_heartbeat_brings_it_back() {
    let library = libfaketime().unwrap_or_else(|| {
        panic!("libfaketime is not installed: apt-get install libfaketime (scripts/test does)")
    });
    let broker = RumqttdBroker::start();
    let proxy = Proxy::start(broker.port);
    let target = Target {
        site: "site-stale".into(),
        gateway: "gw-stale".into(),
    };
    let home = Home::new(&proxy.url(), target, &[]);
    let link = home.door_bus_on_pty();
    let clock = Clock::new(home.config.parent().expect("the home"), library);
    let mut door = Door::start(&link);
    // The cloud reaches the broker directly: only the gateway's way to it is cut.
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud").await;
    let mut daemon = Daemon::start_with(&home, |c| clock.apply(c));
    cloud.reports.state(Presence::Online, Some(0)).await;
    let hour = StaleLimits::new([(Category::Delivery, 3600)]).expect("valid limits");
    let snapshot = cloud.snapshot_with_stale_after(1, &[courier(), resident()], hour);
    cloud.publish_snapshot(&snapshot).await;
    cloud.reports.applied(1, WAIT).await;
    door.served().await;
    assert_eq!(
        denied(&door.pin("730155").await),
        None,
        "fresh: the courier opens"
    );
    assert_eq!(
        denied(&door.pin("482916").await),
        None,
        "the resident opens"
    );

    // The cloud goes away, and two hours pass on the gateway's clock.
    proxy.cut();
    let ahead = SignedDuration::from_hours(2);
    clock.set_ahead(ahead);
    assert_eq!(
        denied(&door.pin("730155").await),
        Some(DenyReason::StaleKeySet),
        "an hour past its limit, the courier's key is refused"
    );
    assert_eq!(
        denied(&door.pin("482916").await),
        None,
        "residents' keys never go stale"
    );
    let recorded = home.reader().outbox(0, 10_000).expect("read the outbox");
    assert!(
        recorded.iter().any(|r| matches!(
            &r.record,
            Record::Activity(a) if a.key_id.as_deref() == Some("courier")
                && a.reason == Some(DenyReason::StaleKeySet)
        )),
        "the refusal is recorded for the cloud: {recorded:?}"
    );
    let shown = status(&home);
    assert_eq!(
        shown["health"]["keyset"]["stale"],
        serde_json::json!(["delivery"]),
        "status says which keys are refused: {shown}"
    );

    // Back online. A heartbeat for version 2, which the gateway does not hold (it missed a
    // delta, perhaps the courier's revocation): no refresh, a resync.
    proxy.restore();
    cloud.reports.state(Presence::Online, Some(1)).await;
    let later = Timestamp::now() + ahead;
    cloud.publish_heartbeat(2, later).await;
    cloud
        .reports
        .next(
            "the resync after a heartbeat for version 2",
            WAIT,
            |_, r| matches!(r, Report::Resync { held: 1, .. }),
        )
        .await;
    assert_eq!(
        denied(&door.pin("730155").await),
        Some(DenyReason::StaleKeySet),
        "a heartbeat for another version vouches for nothing"
    );

    // The cloud vouches for the held version at the gateway's new time: the courier opens.
    cloud.publish_heartbeat(1, later).await;
    let known = Timestamp::from_second(later.as_second()).expect("in range");
    wait_for(WAIT, "the heartbeat's time as the knowledge time", || {
        let set = home.reader().key_set().expect("read the key set");
        (set.freshness.known_at == Some(known)).then_some(())
    })
    .await;
    assert_eq!(
        denied(&door.pin("730155").await),
        None,
        "vouched for: the courier opens again"
    );
    assert_eq!(denied(&door.pin("482916").await), None);
    door.stop().await;
    daemon.terminate().await;
}
