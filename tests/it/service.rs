//! `doorbridge run` as systemd runs it: the real binary with a fake `NOTIFY_SOCKET` (a datagram
//! socket in a temporary directory, read as systemd would), its watchdog, SIGTERM and SIGHUP;
//! and its journald output, caught on a fake journal socket in a mount namespace of its own.
//!
//! No broker runs: the cloud URL names a closed port, since offline is normal and must not hold
//! up readiness. Every wait has a deadline (`gateway::WAIT`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use doorbridge::cloud::payload::Target;
use doorbridge::store::Record;

use crate::broker::{free_port, wait_for};
use crate::fixtures;
use crate::gateway::{Daemon, Home, WAIT, keys};
use crate::util::doorbridge_bin;

/// systemd's watchdog interval for these tests: 200 ms, so `WATCHDOG=1` every 100 ms.
const WATCHDOG_USEC: &str = "200000";

/// A datagram socket bound in a temporary directory, collecting what is sent to it (the
/// `sd_notify` messages, or journald's native entries).
struct Datagrams {
    _dir: tempfile::TempDir,
    path: PathBuf,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Datagrams {
    /// Binds `dir/name` in a new temporary directory; a thread reads until `self` is dropped.
    fn bind(name: &str) -> Datagrams {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(name);
        let socket = UnixDatagram::bind(&path).expect("bind the datagram socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("socket read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0; 1 << 16];
            // Ends when the test has dropped its handle.
            while Arc::strong_count(&sink) > 1 {
                if let Ok(n) = socket.recv(&mut buf) {
                    sink.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        Datagrams {
            _dir: dir,
            path,
            received,
        }
    }

    /// The datagrams so far, as text.
    fn messages(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    /// Waits for a message at index `from` or later for which `want` holds; returns its index.
    async fn until(&self, what: &str, from: usize, want: impl Fn(&str) -> bool) -> usize {
        wait_for(WAIT, what, || {
            self.messages()
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, m)| want(m))
                .map(|(i, _)| i)
        })
        .await
    }
}

impl Datagrams {
    /// Waits for a `READY=1` message at index `from` or later; returns its index.
    async fn ready(&self, what: &str, from: usize) -> usize {
        self.until(what, from, |m| m.lines().any(|l| l == "READY=1"))
            .await
    }
}

/// SIGTERM, as `systemctl stop`: the daemon says `STOPPING=1` and exits 0. Returns the index
/// of that message among `notify`'s.
async fn stop(daemon: &mut Daemon, notify: &Datagrams) -> usize {
    let exit = daemon.terminate().await;
    assert!(exit.success(), "{exit:?}");
    notify
        .until("STOPPING=1", 0, |m| m.starts_with("STOPPING=1\n"))
        .await
}

/// The value of `KEY=` in an `sd_notify` message.
fn field<'m>(message: &'m str, key: &str) -> Option<&'m str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// A broker URL nobody listens on.
fn closed_broker() -> String {
    format!("mqtt://127.0.0.1:{}", free_port())
}

fn target() -> Target {
    Target {
        site: "site-svc".into(),
        gateway: "gw-svc".into(),
    }
}

/// As systemd starts a `Type=notify` service with `WatchdogSec=`: no `WATCHDOG_PID`, which
/// means the watchdog applies to the main process.
fn supervised(command: &mut Command, notify: &Path) {
    command
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID");
}

/// A gateway with no broker, started as systemd starts it ([`supervised`]) and `adjust` changes
/// its command further. Returns once it said `READY=1`, with that message's index.
async fn start(adjust: impl FnOnce(&mut Command)) -> (Datagrams, Home, Daemon, usize) {
    let notify = Datagrams::bind("notify");
    let home = Home::new(&closed_broker(), target(), &[]);
    let daemon = Daemon::start_with(&home, |c| {
        supervised(c, &notify.path);
        adjust(c);
    });
    let ready = notify.ready("READY=1", 0).await;
    (notify, home, daemon, ready)
}

/// Appends `text` to the gateway's configuration file.
fn append_config(home: &Home, text: &str) {
    let mut config = std::fs::read_to_string(&home.config).expect("read the configuration");
    config.push_str(text);
    std::fs::write(&home.config, config).expect("write the configuration");
}

/// The database is whole and its WAL folded in, as after a clean stop.
fn assert_store_consistent(home: &Home) {
    let reader = home.reader();
    let check: String = reader
        .connection()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok");
    let wal = home.db.with_extension("db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}

#[tokio::test]
async fn ready_watchdog_status_and_stopping_reach_systemd_with_no_broker() {
    // Ready as soon as the store is open and the bus runs: the broker is never reached.
    let (notify, home, mut daemon, ready) = start(|_| {}).await;
    let messages = notify.messages();
    assert_eq!(
        field(&messages[ready], "STATUS"),
        Some("0/1 bus port open, 0/1 unit online, no key set, cloud offline"),
        "{messages:?}"
    );
    assert!(
        messages[..ready].iter().all(|m| !m.contains("WATCHDOG=1")),
        "nothing is reset before ready: {messages:?}"
    );
    // The watchdog is reset again and again while the tasks live.
    let mut at = ready;
    for n in 1..=3 {
        at = notify
            .until(&format!("WATCHDOG=1 #{n}"), at + 1, |m| m == "WATCHDOG=1\n")
            .await;
    }
    daemon
        .until_logged(&["systemd watchdog on", "interval_ms=200"], 1, WAIT)
        .await;
    daemon.assert_serving().await;

    let stopping = stop(&mut daemon, &notify).await;
    let messages = notify.messages();
    assert_eq!(field(&messages[stopping], "STATUS"), Some("stopping"));
    assert!(
        messages[stopping..]
            .iter()
            .all(|m| !m.contains("WATCHDOG=1")),
        "no watchdog reset once stopping: {messages:?}"
    );
    assert_eq!(daemon.count(&["doorbridge::daemon: stopped"]), 1);
    assert_store_consistent(&home);
}

#[tokio::test]
async fn a_watchdog_meant_for_another_process_is_left_alone() {
    // systemd names the main process; a child that inherited the variables is not it.
    let (notify, _home, mut daemon, _) = start(|c| {
        c.env("WATCHDOG_PID", "1");
    })
    .await;
    // "systemd watchdog on" would come before "store open" in the same stream.
    daemon.until_logged(&["store open"], 1, WAIT).await;
    assert_eq!(daemon.count(&["systemd watchdog on"]), 0);
    stop(&mut daemon, &notify).await;
    assert!(
        notify.messages().iter().all(|m| !m.contains("WATCHDOG=1")),
        "{:?}",
        notify.messages()
    );
}

#[tokio::test]
async fn sighup_applies_a_new_log_level_and_a_new_bus() {
    // The level comes from the configuration (info), not from DOORBRIDGE_LOG.
    let (notify, home, mut daemon, _) = start(|c| {
        c.env_remove("DOORBRIDGE_LOG");
    })
    .await;
    daemon.assert_serving().await;
    assert_eq!(daemon.count(&[" DEBUG "]), 0);

    let second = home.config.with_file_name("no-such-tty-2");
    append_config(
        &home,
        &format!(
            "[log]\nlevel = \"debug\"\n[[buses]]\nname = \"second\"\nport = \"{}\"\n\
             [[buses.units]]\naddress = 1\ndoor = \"back\"\n",
            second.display()
        ),
    );
    let before = notify.messages().len();
    daemon.signal("HUP");
    let reloading = notify
        .until("RELOADING=1", before, |m| m.starts_with("RELOADING=1\n"))
        .await;
    let messages = notify.messages();
    let since: u64 = field(&messages[reloading], "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC with RELOADING=1: {messages:?}"));
    assert!(since > 0);
    let ready = notify.ready("READY=1 after the reload", reloading).await;
    assert_eq!(
        field(&notify.messages()[ready], "STATUS"),
        Some("0/2 bus ports open, 0/2 units online, no key set, cloud offline")
    );
    daemon
        .until_logged(
            &[
                "configuration reloaded",
                "log level",
                "decision rules",
                "door buses",
            ],
            1,
            WAIT,
        )
        .await;
    // The new bus is served, the old one again, and debug lines now pass.
    daemon
        .until_logged(&["cannot open bus port", "bus=second"], 1, WAIT)
        .await;
    daemon.assert_serving().await;
    daemon.until_logged(&[" DEBUG "], 1, WAIT).await;
    assert_eq!(daemon.count(&["restart needed"]), 0);
    stop(&mut daemon, &notify).await;
}

#[tokio::test]
async fn a_reload_keeps_the_running_configuration_when_the_new_one_is_bad_or_needs_a_restart() {
    let (notify, home, mut daemon, _) = start(|_| {}).await;
    let good = std::fs::read_to_string(&home.config).unwrap();

    // Two problems: every one is logged, nothing changes, and systemd hears READY=1 again.
    let bad = good.replace("Europe/Berlin", "Mars/Olympus") + "[clock]\nwat = 1\n";
    std::fs::write(&home.config, bad).unwrap();
    let before = notify.messages().len();
    daemon.signal("HUP");
    let reloading = notify
        .until("RELOADING=1", before, |m| m.starts_with("RELOADING=1\n"))
        .await;
    notify
        .ready("READY=1 after the refused reload", reloading)
        .await;
    daemon
        .until_logged(
            &["the configuration was not reloaded", "problems=2"],
            1,
            WAIT,
        )
        .await;
    assert_eq!(
        daemon.count(&["configuration problem", "site.timezone", "Mars/Olympus"]),
        1
    );
    assert_eq!(daemon.count(&["configuration problem", "clock.wat"]), 1);
    assert_eq!(daemon.count(&["configuration reloaded"]), 0);
    daemon.assert_serving().await;

    // A new store path needs a restart: said in the log, and the store stays where it is.
    let moved = home.db.with_file_name("moved.db");
    let needs_restart = good.replace(&home.db.display().to_string(), &moved.display().to_string());
    std::fs::write(&home.config, needs_restart).unwrap();
    daemon.signal("HUP");
    daemon
        .until_logged(&["restart needed", "key=\"storage.path\""], 1, WAIT)
        .await;
    daemon
        .until_logged(&["configuration reloaded: nothing to change"], 1, WAIT)
        .await;
    assert!(!moved.exists(), "a second store was opened");
    daemon.assert_serving().await;
    stop(&mut daemon, &notify).await;
    assert_store_consistent(&home);
}

/// `door-sim` answering for `units` (`"1,2"`) on a pseudo-terminal at `link`; killed on drop.
struct DoorSim {
    child: Child,
    stdin: ChildStdin,
    /// Its JSON lines so far.
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl DoorSim {
    fn start(link: &Path, units: &str) -> DoorSim {
        let mut child = Command::new(doorbridge_testkit::binary("door-sim"))
            .arg("--pty")
            .arg(link)
            .args(["--units", units, "--seed", "7"])
            .env("DOOR_SIM_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start door-sim");
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).expect("door-sim prints JSON lines");
                sink.lock().unwrap().push(value);
            }
        });
        DoorSim {
            child,
            stdin,
            lines,
        }
    }

    /// Waits for a line of `type`, from `unit` if given.
    async fn line(&self, kind: &str, unit: Option<u8>) -> serde_json::Value {
        wait_for(WAIT, &format!("a door-sim {kind} line"), || {
            let lines = self.lines.lock().unwrap();
            lines
                .iter()
                .find(|l| l["type"] == kind && unit.is_none_or(|u| l["unit"] == u))
                .cloned()
        })
        .await
    }

    fn type_line(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to door-sim");
        self.stdin.flush().expect("flush door-sim's stdin");
    }
}

impl Drop for DoorSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway whose store holds PIN 48290 for `main`, its bus on `door-sim` playing `units`,
/// started as systemd starts it; returns once unit 1 is online.
async fn start_with_units(units: &str) -> (Datagrams, Home, Daemon, DoorSim) {
    let home = Home::new(&closed_broker(), target(), &[]);
    let store = fixtures::open(&home.db);
    let mut header = fixtures::header(1);
    header.issued_at = Some(jiff::Timestamp::now());
    store
        .install_key_set(header, keys("4829", 1))
        .await
        .expect("install the key set");
    store.close();
    // The units answer on a pseudo-terminal where the configuration names the bus port.
    let sim = DoorSim::start(&home.config.with_file_name("no-such-tty"), units);
    sim.line("ready", None).await;
    let notify = Datagrams::bind("notify");
    let mut daemon = Daemon::start_with(&home, |c| supervised(c, &notify.path));
    notify.ready("READY=1", 0).await;
    daemon
        .until_logged(&["door unit online", "door=main"], 1, WAIT)
        .await;
    (notify, home, daemon, sim)
}

/// The granted activity records in the outbox.
fn grants_recorded(home: &Home) -> usize {
    home.reader()
        .outbox(0, 1000)
        .expect("read the outbox")
        .into_iter()
        .filter(|r| matches!(&r.record, Record::Activity(a) if a.granted))
        .count()
}

#[tokio::test]
async fn sigterm_right_after_a_decision_still_delivers_it_and_exits_cleanly() {
    let (notify, home, mut daemon, mut sim) = start_with_units("1").await;

    sim.type_line("pin 1 48290");
    daemon
        .until_logged(&["granted", "key_id=\"48290\""], 1, WAIT)
        .await;
    // Stopped the moment the decision is on disk: its answer still reaches the unit.
    stop(&mut daemon, &notify).await;
    sim.line("grant", Some(1)).await;
    assert_eq!(grants_recorded(&home), 1);
    assert_store_consistent(&home);
}

#[tokio::test]
async fn sighup_serves_a_new_unit_and_the_bus_restart_drops_no_decision() {
    let (notify, home, mut daemon, mut sim) = start_with_units("1,2").await;
    assert_eq!(daemon.count(&["door unit online", "door=garage"]), 0);
    append_config(&home, "[[buses.units]]\naddress = 2\ndoor = \"garage\"\n");
    // A PIN typed as the reload begins: decided by the bus before it stops, or by the
    // restarted one when the unit sends it again; never lost.
    sim.type_line("pin 1 48290");
    daemon.signal("HUP");
    daemon
        .until_logged(&["configuration reloaded", "door buses"], 1, WAIT)
        .await;
    daemon
        .until_logged(&["door unit online", "door=garage"], 1, WAIT)
        .await;
    sim.line("grant", Some(1)).await;
    wait_for(WAIT, "the grant on disk", || {
        (grants_recorded(&home) == 1).then_some(())
    })
    .await;
    stop(&mut daemon, &notify).await;
    assert_store_consistent(&home);
}

// ---------------------------------------------------------------------------------------------
// journald
// ---------------------------------------------------------------------------------------------

/// One journal entry in journald's native protocol: `KEY=value` lines, or `KEY`, a 64-bit
/// little-endian length and that many bytes for values that may hold anything.
fn journal_entry(mut data: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = data.iter().position(|&b| b == b'\n' || b == b'=') {
        let name = String::from_utf8_lossy(&data[..end]).into_owned();
        let value;
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            value = &rest[..stop];
            data = rest.get(stop + 1..).unwrap_or_default();
        } else {
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("a length"));
            let len = usize::try_from(len).expect("a small value");
            value = &rest[8..8 + len];
            data = rest.get(8 + len + 1..).unwrap_or_default();
        }
        fields.push((name, String::from_utf8_lossy(value).into_owned()));
    }
    fields
}

/// Whether `unshare` can give a child its own mount namespace here (not in every container).
fn mount_namespaces_work() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs none /run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn under_systemd_events_reach_journald_with_their_fields() {
    if !mount_namespaces_work() {
        eprintln!(
            "skipped: no mount namespaces (unshare -rm) to put a fake journald socket at /run/systemd/journal/socket"
        );
        return;
    }
    let journal = Datagrams::bind("socket");
    let home = Home::new(&closed_broker(), target(), &[]);
    // stderr is a pipe; JOURNAL_STREAM names it, as systemd names the journal stream.
    let (mut stderr, stderr_writer) = std::io::pipe().expect("a pipe");
    let stat = stderr_writer
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .expect("fstat the pipe");
    // journald's socket is where tracing-journald looks: /run/systemd/journal/socket.
    let script = format!(
        "mount -t tmpfs none /run && mkdir -p /run/systemd/journal && \
         mount --bind '{}' /run/systemd/journal && exec \"$0\" \"$@\"",
        journal.path.parent().unwrap().display()
    );
    let mut child = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .arg(doorbridge_bin())
        .arg("--config")
        .arg(&home.config)
        .arg("run")
        .env_remove("DOORBRIDGE_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env("JOURNAL_STREAM", format!("{}:{}", stat.dev(), stat.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_writer)
        .spawn()
        .expect("start doorbridge in a mount namespace");
    let entries = || -> Vec<Vec<(String, String)>> {
        journal
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|d| journal_entry(d))
            .collect()
    };
    let with_message = |text: &str| {
        let text = text.to_owned();
        move || {
            entries()
                .into_iter()
                .find(|e| e.iter().any(|(k, v)| k == "MESSAGE" && v.contains(&text)))
        }
    };
    let retry = wait_for(
        WAIT,
        "a bus retry in the journal",
        with_message("cannot open bus port"),
    )
    .await;
    let open = wait_for(
        WAIT,
        "store open in the journal",
        with_message("store open"),
    )
    .await;
    let get = |entry: &[(String, String)], key: &str| {
        entry
            .iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| panic!("no {key} in {entry:?}"), |(_, v)| v.clone())
    };
    // Fields under their own upper-cased names, no prefix; levels as priorities.
    assert_eq!(get(&retry, "PRIORITY"), "4");
    assert_eq!(get(&retry, "BUS"), get(&retry, "PORT"));
    assert!(get(&retry, "PORT").ends_with("no-such-tty"));
    assert_eq!(get(&retry, "SYSLOG_IDENTIFIER"), "doorbridge");
    assert_eq!(get(&open, "PRIORITY"), "5");
    assert_eq!(get(&open, "KEYSET_VERSION"), "0");
    assert_eq!(get(&open, "PATH"), home.db.display().to_string());
    assert!(
        entries()
            .iter()
            .flatten()
            .all(|(k, _)| !k.starts_with("F_")),
        "{:?}",
        entries()
    );

    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    wait_for(WAIT, "stopped in the journal", with_message("stopped")).await;
    // Nothing went to stderr as well: the journal would hold every line twice.
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    assert_eq!(text, "");
}
