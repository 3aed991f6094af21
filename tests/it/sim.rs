//! The simulated door units against the gateway's real session, over a real pseudo-terminal:
//! the pure `Session` in a small driver loop on one end, `run_sim` (or the `door-sim` binary)
//! on the other. Every wait is for a condition, with a deadline.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use doorbridge::access::{CredentialKind, DenyReason};
use doorbridge::bus::frame::Address;
use doorbridge::bus::message::Grant;
use doorbridge::bus::session::{Answer, Session, SessionConfig, SessionEvent, VerifyRequest};
use doorbridge_sim::{Output, SimCommand, SimConfig, SimUnits, run_sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_serial::SerialStream;

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
const WITHIN: Duration = Duration::from_secs(20);

fn unit(n: u8) -> Address {
    Address::unit(n).unwrap()
}

/// The gateway's decision for a credential: PIN 482916 opens door 0, everything else is
/// refused as used up.
fn decide(request: &VerifyRequest) -> Answer {
    if request.verify.value == b"482916" {
        Answer::Grant(welcome_hi())
    } else {
        Answer::Deny(DenyReason::UsedUp)
    }
}

fn welcome_hi() -> Grant {
    Grant {
        doors: vec![0],
        welcome: Some("Hi".into()),
        floors: vec![3],
    }
}

fn session_config(units: &[u8]) -> SessionConfig {
    SessionConfig {
        units: units.iter().map(|&n| unit(n)).collect(),
        // Generous, so that a busy machine does not make a prompt unit look late.
        response_timeout: Duration::from_millis(200),
        retries: 2,
        offline_after: 2,
        offline_poll_every: 2,
        min_cycle: Duration::from_millis(20),
        turnaround: Duration::from_millis(1),
        first_command_id: 0x4000,
        ..SessionConfig::default()
    }
}

fn pin(u: u8, digits: &str) -> SimCommand {
    SimCommand::Verify {
        unit: unit(u),
        kind: CredentialKind::Pin,
        value: digits.as_bytes().to_vec(),
        reader: 0,
    }
}

/// The gateway side: the pure session driven on a serial port, deciding every request at
/// once with [`decide`].
struct Gateway {
    session: Session,
    port: SerialStream,
    start: Instant,
    events: Vec<SessionEvent>,
    buf: Vec<u8>,
}

/// What the gateway driver saw in one step.
enum Step {
    Events(Vec<SessionEvent>),
    Other,
}

impl Gateway {
    fn new(port: SerialStream, config: SessionConfig) -> Gateway {
        Gateway {
            session: Session::new(config).unwrap(),
            port,
            start: Instant::now(),
            events: Vec::new(),
            buf: vec![0; 512],
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Transmits whatever is due, then waits for bytes or the next deadline, or for `other`
    /// to complete (which is returned as `Step::Other`).
    ///
    /// A line whose other end is gone (the simulator quit: the pty reads and writes `EIO`)
    /// carries nothing more: then only `other` is waited for.
    async fn step<F: Future<Output = ()>>(&mut self, other: F) -> Step {
        let mut other = std::pin::pin!(other);
        if let Some(tx) = self.session.poll_next(self.now())
            && AsyncWriteExt::write_all(&mut self.port, &tx.bytes)
                .await
                .is_err()
        {
            other.await;
            return Step::Other;
        }
        let next = self
            .session
            .next_deadline()
            .map_or_else(|| Instant::now() + WITHIN, |d| self.start + d);
        let events = tokio::select! {
            // Bytes from the simulator, or its end closed.
            read = AsyncReadExt::read(&mut self.port, &mut self.buf) => {
                let Ok(n) = read else {
                    other.await;
                    return Step::Other;
                };
                let now = self.now();
                self.session.on_bytes(&self.buf[..n], now)
            }
            // The session's next deadline.
            () = tokio::time::sleep_until(next) => {
                let now = self.now();
                self.session.on_timeout(now)
            }
            // What the caller waits for besides the bus.
            () = &mut other => return Step::Other,
        };
        for e in &events {
            if let SessionEvent::Request(request) = e {
                self.session.answer(&request.key, decide(request)).unwrap();
            }
        }
        self.events.extend(events.iter().cloned());
        Step::Events(events)
    }

    /// Drives the bus until a new event satisfies `done`; fails after [`WITHIN`].
    async fn until(&mut self, what: &str, mut done: impl FnMut(&SessionEvent) -> bool) {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Step::Events(events) = self.step(tokio::time::sleep_until(deadline)).await {
                if events.iter().any(&mut done) {
                    return;
                }
            } else {
                panic!("no {what} within {WITHIN:?}; events: {:#?}", self.events);
            }
        }
    }

    /// Like [`Gateway::until`], but an event already seen counts too.
    async fn until_seen(&mut self, what: &str, mut done: impl FnMut(&SessionEvent) -> bool) {
        if !self.events.iter().any(&mut done) {
            self.until(what, done).await;
        }
    }

    fn requests(&self) -> Vec<&VerifyRequest> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

/// The gateway on the slave end of a pty pair, `run_sim` on the master end.
struct Bench {
    gw: Gateway,
    commands: mpsc::Sender<SimCommand>,
    outputs: mpsc::Receiver<Output>,
    seen: Vec<Output>,
    stop: Option<oneshot::Sender<()>>,
    sim: JoinHandle<std::io::Result<SimUnits>>,
}

impl Bench {
    fn new(units: &[u8]) -> Bench {
        let (master, slave) = SerialStream::pair().unwrap();
        let addrs: Vec<Address> = units.iter().map(|&n| unit(n)).collect();
        let sim_units = SimUnits::new(
            &addrs,
            SimConfig {
                seed: 0x5eed,
                ..SimConfig::default()
            },
        )
        .unwrap();
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(256);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let sim = tokio::spawn(run_sim(master, sim_units, cmd_rx, out_tx, async move {
            let _ = stop_rx.await;
        }));
        Bench {
            gw: Gateway::new(slave, session_config(units)),
            commands: cmd_tx,
            outputs: out_rx,
            seen: Vec::new(),
            stop: Some(stop_tx),
            sim,
        }
    }

    async fn send(&self, command: SimCommand) {
        self.commands.send(command).await.unwrap();
    }

    /// Drives the gateway until the sim puts out an output satisfying `done`; returns it.
    async fn until_output(&mut self, what: &str, mut done: impl FnMut(&Output) -> bool) -> Output {
        let deadline = Instant::now() + WITHIN;
        loop {
            // None: the deadline passed; Some(None): the simulator stopped.
            let mut got: Option<Option<Output>> = None;
            let outputs = &mut self.outputs;
            let waiting = async {
                tokio::select! {
                    o = outputs.recv() => got = Some(o),
                    () = tokio::time::sleep_until(deadline) => {}
                }
            };
            if let Step::Other = self.gw.step(waiting).await {
                match got {
                    Some(Some(output)) => {
                        self.seen.push(output.clone());
                        if done(&output) {
                            return output;
                        }
                    }
                    Some(None) => panic!("the simulator stopped"),
                    None => panic!(
                        "no {what} within {WITHIN:?}; outputs: {:#?}; events: {:#?}",
                        self.seen, self.gw.events
                    ),
                }
            }
        }
    }

    async fn until_event(&mut self, what: &str, done: impl FnMut(&SessionEvent) -> bool) {
        self.gw.until(what, done).await;
    }

    async fn finish(mut self) -> SimUnits {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WITHIN, self.sim)
            .await
            .expect("the simulator did not stop")
            .unwrap()
            .unwrap()
    }
}

fn decision_for(u: u8) -> impl FnMut(&Output) -> bool {
    move |o| matches!(o, Output::Decision { unit: a, .. } if *a == unit(u))
}

#[tokio::test]
async fn a_pin_reaches_the_session_and_its_grant_reaches_the_unit() {
    let mut bench = Bench::new(&[1]);
    bench.send(pin(1, "482916")).await;
    let decision = bench.until_output("decision", decision_for(1)).await;
    let Output::Decision {
        id,
        request,
        answer,
        ..
    } = decision
    else {
        unreachable!()
    };
    assert_eq!(answer, Answer::Grant(welcome_hi()));
    assert_eq!(request.value, b"482916");
    let requests = bench.gw.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].key.unit, unit(1));
    assert_eq!(requests[0].key.id, id);
    assert_eq!(requests[0].verify.kind, CredentialKind::Pin);
    // The unit's power-up status reached the gateway as a report too.
    bench
        .gw
        .until_seen(
            "status report",
            |e| matches!(e, SessionEvent::Report { unit: u, .. } if *u == unit(1)),
        )
        .await;
    assert!(bench.gw.events.contains(&SessionEvent::UnitOnline(unit(1))));

    // A refused PIN comes back as a deny with its reason.
    bench.send(pin(1, "000000")).await;
    let deny = bench.until_output("deny", decision_for(1)).await;
    assert!(matches!(
        deny,
        Output::Decision {
            answer: Answer::Deny(DenyReason::UsedUp),
            ..
        }
    ));
    let units = bench.finish().await;
    assert_eq!(units.stats().line_errors, 0);
}

#[tokio::test]
async fn a_retransmitted_verify_is_answered_from_the_cache_with_the_same_decision() {
    let mut bench = Bench::new(&[2]);
    bench.send(pin(2, "482916")).await;
    let first = bench.until_output("decision", decision_for(2)).await;
    let Output::Decision {
        id: first_id,
        answer: first_answer,
        ..
    } = first
    else {
        unreachable!()
    };
    bench
        .send(SimCommand::Retransmit {
            unit: unit(2),
            report: false,
        })
        .await;
    let again = bench
        .until_output("repeated decision", |o| {
            matches!(o, Output::Decision { repeat: true, .. })
        })
        .await;
    let Output::Decision { id, answer, .. } = again else {
        unreachable!()
    };
    assert_eq!((id, &answer), (first_id, &first_answer));
    assert!(bench.gw.events.iter().any(|e| matches!(
        e,
        SessionEvent::Repeat { unit: u, id, answered: true } if *u == unit(2) && *id == first_id
    )));
    // Decided once: a single-use key is not consumed twice.
    assert_eq!(bench.gw.requests().len(), 1);
    bench.finish().await;
}

#[tokio::test]
async fn a_silent_unit_goes_offline_and_comes_back_online() {
    let mut bench = Bench::new(&[3, 4]);
    bench
        .until_event("unit 3 online", |e| *e == SessionEvent::UnitOnline(unit(3)))
        .await;
    bench
        .send(SimCommand::Silent {
            unit: unit(3),
            on: true,
        })
        .await;
    bench
        .until_event("unit 3 offline", |e| {
            *e == SessionEvent::UnitOffline(unit(3))
        })
        .await;
    assert!(
        !bench
            .gw
            .events
            .contains(&SessionEvent::UnitOffline(unit(4)))
    );
    bench
        .send(SimCommand::Silent {
            unit: unit(3),
            on: false,
        })
        .await;
    let online_before = bench
        .gw
        .events
        .iter()
        .filter(|e| **e == SessionEvent::UnitOnline(unit(3)))
        .count();
    bench
        .until_event("unit 3 online again", |e| {
            *e == SessionEvent::UnitOnline(unit(3))
        })
        .await;
    assert_eq!(online_before, 1);
    // And it works again.
    bench.send(pin(3, "482916")).await;
    bench.until_output("decision", decision_for(3)).await;
    let units = bench.finish().await;
    assert!(units.stats().unheard > 0);
}

#[tokio::test]
async fn line_faults_count_as_frame_errors_and_the_next_request_goes_through() {
    let mut bench = Bench::new(&[5]);
    bench
        .until_event("unit 5 online", |e| *e == SessionEvent::UnitOnline(unit(5)))
        .await;
    let faults = [
        SimCommand::Garbage { len: 40 },
        SimCommand::BadCrc { unit: unit(5) },
        SimCommand::Truncate { unit: unit(5) },
    ];
    for (n, fault) in faults.into_iter().enumerate() {
        bench.send(fault).await;
        bench
            .until_event("a frame error", |e| {
                matches!(e, SessionEvent::FrameError(_))
            })
            .await;
        assert_eq!(
            bench.gw.session.stats().frame_errors(),
            u64::try_from(n + 1).unwrap()
        );
    }
    assert_eq!(bench.gw.session.stats().bad_crc, 1);
    bench.send(pin(5, "482916")).await;
    let decision = bench.until_output("decision", decision_for(5)).await;
    assert!(matches!(
        decision,
        Output::Decision {
            answer: Answer::Grant(_),
            ..
        }
    ));
    assert_eq!(bench.gw.requests().len(), 1);
    bench.finish().await;
}

#[tokio::test]
async fn a_late_answer_is_retried_and_the_request_still_goes_through() {
    let mut bench = Bench::new(&[6]);
    bench
        .until_event("unit 6 online", |e| *e == SessionEvent::UnitOnline(unit(6)))
        .await;
    // Later than the gateway's deadline (200 ms + wire times): a timeout, then a retry.
    bench
        .send(SimCommand::Late {
            unit: unit(6),
            delay: Duration::from_millis(400),
        })
        .await;
    bench.send(pin(6, "482916")).await;
    bench.until_output("decision", decision_for(6)).await;
    assert!(bench.gw.session.stats().timeouts >= 1);
    assert_eq!(bench.gw.requests().len(), 1);
    bench.finish().await;
}

#[tokio::test]
async fn eight_units_are_all_answered() {
    let addrs: Vec<u8> = (1..=8).collect();
    let mut bench = Bench::new(&addrs);
    for &u in &addrs {
        bench.send(pin(u, "482916")).await;
    }
    let mut decided = Vec::new();
    while decided.len() < addrs.len() {
        let o = bench
            .until_output("decisions at all units", |o| {
                matches!(o, Output::Decision { .. })
            })
            .await;
        if let Output::Decision {
            unit: u, answer, ..
        } = o
        {
            assert_eq!(answer, Answer::Grant(welcome_hi()));
            decided.push(u.get());
        }
    }
    decided.sort_unstable();
    assert_eq!(decided, addrs);
    for &u in &addrs {
        assert!(
            bench.gw.events.contains(&SessionEvent::UnitOnline(unit(u))),
            "unit {u} online"
        );
    }
    assert_eq!(bench.gw.requests().len(), 8);
    bench.finish().await;
}

/// Lines the child printed on stdout, read by a thread.
fn stdout_lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next stdout line whose JSON satisfies `want`, driving `gw` (if any) meanwhile.
async fn line_where(
    lines: &mut mpsc::UnboundedReceiver<String>,
    mut gw: Option<&mut Gateway>,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WITHIN;
    let mut seen = Vec::new();
    loop {
        // None: the deadline passed; Some(None): stdout closed.
        let mut got: Option<Option<String>> = None;
        let lines_ref = &mut *lines;
        let waiting = async {
            tokio::select! {
                l = lines_ref.recv() => got = Some(l),
                () = tokio::time::sleep_until(deadline) => {}
            }
        };
        match gw.as_deref_mut() {
            Some(gw) => {
                if let Step::Events(_) = gw.step(waiting).await {
                    continue;
                }
            }
            None => waiting.await,
        }
        match got {
            Some(Some(line)) => {
                let value: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                if want(&value) {
                    return value;
                }
                seen.push(line);
            }
            Some(None) => panic!("door-sim closed stdout before {what}; it printed {seen:#?}"),
            None => panic!("no {what} within {WITHIN:?}; door-sim printed {seen:#?}"),
        }
    }
}

/// Ends the child if a test fails before it quits.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn the_door_sim_binary_serves_a_pty_link_to_a_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let link: PathBuf = dir.path().join("door-bus");
    // A stale link from an earlier run is replaced.
    std::os::unix::fs::symlink("/nonexistent/pts/99", &link).unwrap();
    let child = std::process::Command::new(doorbridge_testkit::binary("door-sim"))
        .arg("--pty")
        .arg(&link)
        .args(["--units", "3", "--seed", "7"])
        .env("DOOR_SIM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("door-sim could not be started");
    let mut child = Reap(child);
    let mut lines = stdout_lines(&mut child.0);
    let mut stdin = child.0.stdin.take().unwrap();

    let ready = line_where(&mut lines, None, "ready line", |v| v["type"] == "ready").await;
    let pty = ready["pty"].as_str().expect("the pty's device").to_owned();
    assert_eq!(ready["link"], link.display().to_string());
    assert_eq!(ready["units"], serde_json::json!([3]));
    assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from(&pty));

    // The gateway opens the link as a serial port, as the daemon will.
    let open = || {
        SerialStream::open(&tokio_serial::new(link.to_string_lossy(), 115_200))
            .expect("the link opens as a serial port")
    };
    let mut gw = Gateway::new(open(), session_config(&[3]));
    gw.until("unit 3 online", |e| *e == SessionEvent::UnitOnline(unit(3)))
        .await;
    let contact = line_where(&mut lines, Some(&mut gw), "contact line", |v| {
        v["type"] == "contact"
    })
    .await;
    assert_eq!(contact["unit"], 3);

    // A command on stdin becomes a verify frame on the link, and the gateway's grant
    // becomes a JSON line.
    stdin.write_all(b"# a courier\npin 3 482916\n").unwrap();
    stdin.flush().unwrap();
    gw.until("the PIN", |e| {
        matches!(e, SessionEvent::Request(r) if r.verify.value == b"482916" && r.key.unit == unit(3))
    })
    .await;
    let id = gw.requests()[0].key.id;
    let grant = line_where(&mut lines, Some(&mut gw), "grant line", |v| {
        v["type"] == "grant"
    })
    .await;
    assert_eq!(grant["unit"], 3);
    assert_eq!(grant["request"], "pin");
    assert_eq!(grant["id"], id);
    assert_eq!(grant["doors"], serde_json::json!([0]));
    assert_eq!(grant["welcome"], "Hi");
    assert_eq!(grant["floors"], serde_json::json!([3]));

    // A bad line is reported and the rest go on.
    stdin.write_all(b"pin 3 12ab\n").unwrap();
    stdin.flush().unwrap();
    let error = line_where(&mut lines, Some(&mut gw), "error line", |v| {
        v["type"] == "error"
    })
    .await;
    assert_eq!(error["source"], "stdin");
    assert_eq!(error["line"], 3);

    // The gateway goes away (the sim's reads fail with EIO) and comes back.
    drop(gw);
    let mut gw = Gateway::new(open(), session_config(&[3]));
    gw.until("unit 3 online again", |e| {
        *e == SessionEvent::UnitOnline(unit(3))
    })
    .await;
    stdin
        .write_all(b"pin 3 000000\nwait-decision 3 10s\nquit\n")
        .unwrap();
    stdin.flush().unwrap();
    let deny = line_where(&mut lines, Some(&mut gw), "deny line", |v| {
        v["type"] == "deny"
    })
    .await;
    assert_eq!(deny["reason"], "used_up");
    let stopped = line_where(&mut lines, Some(&mut gw), "stopped line", |v| {
        v["type"] == "stopped"
    })
    .await;
    assert!(stopped["answers"].as_u64().unwrap() >= 2);
    drop(gw);

    let status = tokio::time::timeout(
        WITHIN,
        tokio::task::spawn_blocking(move || child.0.wait().map(|s| (s, child))),
    )
    .await
    .expect("door-sim did not exit after quit")
    .unwrap()
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the link is removed on exit"
    );
}
