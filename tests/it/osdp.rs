//! OSDP readers against a peer no one here wrote: the Python `libosdp` package plays the
//! Peripheral Devices (`tests/osdp/pd_bus.py`) on a pseudo-terminal, the gateway
//! (`daemon::serve`, in process) is the Control Panel. `scripts/test` installs the package into
//! `target/osdp-venv`; `OSDP_TEST_PYTHON` names another interpreter that has it.
//!
//! Each case asserts what a user sees: the strike released at the reader, the LED, the record
//! the cloud gets. Every wait is a condition with a deadline.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use doorbridge::access::{
    Category, Credential, CredentialKind, Door, Key, KeyRules, Schedule, UseLimit, credential,
};
use doorbridge::bus::message::DoorEventKind;
use doorbridge::config::Config;
use doorbridge::store::{Reader, Record, Store, StoreOptions};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::fixtures::{self, SALT};

/// How long a step may take: the readers come online and set up the secure channel within a
/// few seconds; a loaded CI machine gets the rest.
const WAIT: Duration = Duration::from_secs(30);

pub(crate) const KEY_A: &str = "000102030405060708090a0b0c0d0e0f";
const KEY_B: &str = "f0e0d0c0b0a090807060504030201000";
pub(crate) const CARD_RESIDENT: &str = "26:0a1b2c40";
const CARD_ONCE: &str = "26:11223340";
const PIN: &str = "482916";
const QR_GUEST: &str = "QR-PARTY-91c2e0";
const CARD_LIFT: &str = "26:22334440";

/// The Python interpreter with `libosdp` installed.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("OSDP_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/osdp-venv/bin/python");
    assert!(
        venv.exists(),
        "the OSDP tests need the Python libosdp peer: run scripts/test (it makes {}), or set \
         OSDP_TEST_PYTHON to a python3 that has `pip install libosdp`",
        venv.display()
    );
    venv
}

/// The readers: `pd_bus.py` on a pty, driven over its stdin, heard on its stdout.
pub struct PdBus {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    /// Everything heard so far, for waits that look back.
    seen: Vec<Value>,
}

impl PdBus {
    pub fn start(link: &Path, pds: &[&str]) -> PdBus {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/osdp/pd_bus.py");
        let mut command = Command::new(python());
        command.arg(script).arg("--link").arg(link);
        for pd in pds {
            command.arg("--pd").arg(pd);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/osdp/pd_bus.py");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut bus = PdBus {
            child,
            stdin,
            events,
            seen: Vec::new(),
        };
        bus.wait("the PD bus to be ready", |e| e["ev"] == "ready");
        bus
    }

    pub fn send(&mut self, op: &Value) {
        writeln!(self.stdin, "{op}").expect("write to pd_bus.py");
        self.stdin.flush().expect("flush pd_bus.py");
    }

    /// Waits for an event matching `pred`, looking at those already seen first; returns it.
    pub fn wait(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return e.clone();
        }
        self.wait_new(what, pred)
    }

    /// Waits for a new event matching `pred` (events before it are kept).
    pub fn wait_new(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no {what} within {WAIT:?}; the readers said: {:#?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Forgets what was seen, so that the next waits look at new events only.
    pub fn forget(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
        self.seen.clear();
    }

    pub fn secure(&mut self, pd: u8) {
        self.wait(&format!("PD {pd} online with the secure channel"), |e| {
            e["ev"] == "state" && e["pd"] == pd && e["online"] == true && e["sc"] == true
        });
    }

    pub fn card(&mut self, pd: u8, card: &str) {
        let (bits, hex) = card.split_once(':').expect("BITS:HEX");
        let bits: u32 = bits.parse().expect("bits");
        self.send(&json!({"op": "card", "pd": pd, "format": "wiegand", "bits": bits, "data": hex}));
    }

    pub fn keys(&mut self, pd: u8, keys: &[u8]) {
        let hex = credential::to_hex(keys);
        self.send(&json!({"op": "keys", "pd": pd, "data": hex}));
    }

    /// Waits for PD `pd` to be told to pulse output `output`, from now on.
    pub fn pulse(&mut self, pd: u8, output: u8) -> Value {
        self.wait_new(&format!("a relay pulse on PD {pd} output {output}"), |e| {
            is_pulse(e, pd, output)
        })
    }

    /// Like [`PdBus::pulse`], also among the events seen since the last [`PdBus::forget`]
    /// (for pulses on several readers, which may come in any order).
    pub fn pulsed(&mut self, pd: u8, output: u8) -> Value {
        self.wait(&format!("a relay pulse on PD {pd} output {output}"), |e| {
            is_pulse(e, pd, output)
        })
    }
}

fn is_pulse(e: &Value, pd: u8, output: u8) -> bool {
    e["ev"] == "command"
        && e["pd"] == pd
        && e["cmd"]["name"] == "output"
        && e["cmd"]["output_no"] == output
        && e["cmd"]["control_code"] == 5
}

impl PdBus {
    /// Waits for PD `pd`'s LED to be set to `color` (OSDP: 1 red, 2 green).
    pub fn led(&mut self, pd: u8, color: u8) -> Value {
        self.wait_new(&format!("LED colour {color} on PD {pd}"), |e| {
            e["ev"] == "command"
                && e["pd"] == pd
                && e["cmd"]["name"] == "led"
                && e["cmd"]["on_color"] == color
        })
    }
}

impl Drop for PdBus {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn card_key(id: &str, card: &str, limit: UseLimit) -> Key {
    let value = credential::parse_card(card).expect("card");
    Key {
        rules: KeyRules {
            id: id.into(),
            name: format!("key {id}"),
            category: Category::Renter,
            doors: vec!["main".into(), "garage".into()],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: limit,
            welcome: Some(format!("Welcome, {id}!")),
            floors: vec![],
            revoked: false,
            issuer: None,
        },
        credentials: vec![Credential {
            kind: CredentialKind::Card,
            digest: credential::digest(SALT, CredentialKind::Card, &value),
        }],
    }
}

/// A gateway's state directory with a key set: a resident's card, a single-use card, a PIN.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub link: PathBuf,
}

impl Site {
    pub async fn new() -> Site {
        Site::with_doors(&[]).await
    }

    /// A site whose resident card also opens `doors`.
    pub async fn with_doors(doors: &[String]) -> Site {
        let dir = tempfile::tempdir().expect("temporary directory");
        let db = dir.path().join("doorbridge.db");
        let link = dir.path().join("ttyOSDP");
        let mut context = fixtures::context();
        for door in ["garage".to_owned(), "lift".to_owned()].iter().chain(doors) {
            context
                .site
                .doors
                .insert(door.clone().into(), Door::default());
        }
        let store = Store::open(StoreOptions::new(&db, context)).expect("store");
        let mut pin = fixtures::key("courier", CredentialKind::Pin, PIN, UseLimit::Unlimited);
        pin.rules.doors.push("garage".into());
        let mut resident = card_key("resident", CARD_RESIDENT, UseLimit::Unlimited);
        resident
            .rules
            .doors
            .extend(doors.iter().map(doorbridge::access::DoorId::from));
        resident.rules.opens_inner_door = true;
        let once = card_key("once", CARD_ONCE, UseLimit::Total(1));
        // A party guest's QR code, and a card that calls the lift to floors 3 and 4.
        let mut guest = fixtures::key("guest", CredentialKind::Qr, QR_GUEST, UseLimit::Unlimited);
        guest.rules.doors = vec!["main".into()];
        let mut lift = card_key("lift", CARD_LIFT, UseLimit::Unlimited);
        lift.rules.doors = vec!["lift".into()];
        lift.rules.floors = vec![3, 4];
        store
            .install_key_set(fixtures::header(1), vec![resident, once, pin, guest, lift])
            .await
            .expect("key set");
        store.close();
        Site { dir, db, link }
    }

    pub fn key_file(&self, name: &str, hex: Option<&str>) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.key"));
        if let Some(hex) = hex {
            doorbridge::osdp::key::write_new(
                &path,
                &doorbridge::osdp::key::parse(hex).expect("hex key"),
            )
            .expect("write key");
        }
        path
    }

    /// The configuration: one OSDP bus on the link with `readers` (TOML of each
    /// `[[buses.units]]` after its header).
    pub fn config(&self, readers: &[String]) -> Config {
        let mut text = format!(
            r#"[gateway]
id = "gw-osdp"
site_id = "site-osdp"
[site]
timezone = "Europe/Berlin"
[cloud]
url = "mqtt://127.0.0.1:1"
trusted_keys = ["{trusted}"]
[storage]
path = "{db}"
[pin_lockout]
attempts = 3
[[buses]]
name = "osdp"
protocol = "osdp"
port = "{link}"
baud = 115200
"#,
            trusted = "11".repeat(32),
            db = self.db.display(),
            link = self.link.display(),
        );
        for reader in readers {
            text.push_str("[[buses.units]]\n");
            text.push_str(reader);
            text.push('\n');
        }
        Config::from_toml_str(&text, "osdp test").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Waits until `n` records match `pred`.
    pub fn wait_records(&self, what: &str, n: usize, pred: impl Fn(&Record) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let records = self.records();
            if records.iter().filter(|r| pred(r)).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not {n} {what} records within {WAIT:?}; the outbox holds {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The records in the outbox.
    pub fn records(&self) -> Vec<Record> {
        let reader = Reader::open(&self.db).expect("read the store");
        reader
            .outbox(0, 10_000)
            .expect("outbox")
            .into_iter()
            .map(|r| r.record)
            .collect()
    }

    /// Waits for a record matching `pred`.
    pub fn wait_record(&self, what: &str, pred: impl Fn(&Record) -> bool) -> Record {
        let deadline = Instant::now() + WAIT;
        loop {
            let records = self.records();
            if let Some(r) = records.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} record within {WAIT:?}; the outbox holds {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The gateway, in process, until dropped or stopped.
pub struct Gateway {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    pub fn start(config: Config) -> Gateway {
        // OSDP_TEST_LOG=debug shows the gateway's log (libosdp's included).
        if let Ok(filter) = std::env::var("OSDP_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            doorbridge::daemon::serve(&config, async {
                let _ = stopped.await;
            })
            .await
            .expect("the gateway runs");
        });
        Gateway {
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the gateway stops in time")
                .expect("the gateway task");
        }
    }
}

pub(crate) fn reader(address: u8, door: &str, osdp: &str) -> String {
    format!("address = {address}\ndoor = \"{door}\"\n[buses.units.osdp]\n{osdp}\n")
}

fn granted(r: &Record, door: &str, key: &str) -> bool {
    matches!(r, Record::Activity(a) if a.granted && a.door == door && a.key_id.as_deref() == Some(key))
}

/// Card, PIN, wrong PINs and the lockout, tamper, forced and held open, the secure channel,
/// and a reader with the wrong key refused: one gateway, two readers on one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_at_the_door_are_served_and_watched() {
    let site = Site::new().await;
    let key_a = site.key_file("main", Some(KEY_A));
    let key_garage = site.key_file("garage", Some(KEY_A));
    let mut pds = PdBus::start(
        &site.link,
        &[
            &format!("1,scbk={KEY_A},display"),
            // The garage reader holds another key than the gateway's: it must be refused.
            &format!("2,scbk={KEY_B}"),
        ],
    );
    let config = site.config(&[
        reader(
            1,
            "main",
            &format!(
                "key_file = \"{}\"\nrelay = 1\ndisplay = true\ndoor_contact = 0\nheld_open = \"1s\"",
                key_a.display()
            ),
        ),
        reader(2, "garage", &format!("key_file = \"{}\"", key_garage.display())),
    ]);
    let gateway = Gateway::start(config);

    // The secure channel comes up with the configured key.
    pds.secure(1);

    // The door opens with no grant: forced open; then it closes.
    pds.send(&json!({"op": "status", "pd": 1, "type": "input", "report": [1]}));
    site.wait_record("forced open", |r| {
        matches!(r, Record::DoorEvent { event: DoorEventKind::ForcedOpen, door, .. } if door == "main")
    });
    pds.send(&json!({"op": "status", "pd": 1, "type": "input", "report": [0]}));
    site.wait_record("door closed", |r| {
        matches!(r, Record::DoorEvent { event: DoorEventKind::Closed, door, .. } if door == "main")
    });

    // A card: the strike is released, the LED turns green, the welcome is shown.
    pds.card(1, CARD_RESIDENT);
    pds.pulse(1, 1);
    pds.led(1, 2);
    let text = pds.wait_new("the welcome text", |e| {
        e["ev"] == "command" && e["pd"] == 1 && e["cmd"]["name"] == "text"
    });
    assert_eq!(text["cmd"]["data"], "Welcome, resident!");
    site.wait_record("granted card", |r| granted(r, "main", "resident"));

    // The door opens inside the release: a plain opening, no alarm.
    pds.send(&json!({"op": "status", "pd": 1, "type": "input", "report": [1]}));
    site.wait_record("door opened", |r| {
        matches!(r, Record::DoorEvent { event: DoorEventKind::Opened, door, .. } if door == "main")
    });
    // ... and stays open past held_open.
    site.wait_record("held open", |r| {
        matches!(r, Record::DoorEvent { event: DoorEventKind::HeldOpen, door, .. } if door == "main")
    });
    pds.send(&json!({"op": "status", "pd": 1, "type": "input", "report": [0]}));
    site.wait_records("door closed again", 2, |r| {
        matches!(r, Record::DoorEvent { event: DoorEventKind::Closed, door, .. } if door == "main")
    });

    // A PIN ended with '#'.
    pds.forget();
    let mut typed = PIN.as_bytes().to_vec();
    typed.push(0x0D);
    pds.keys(1, &typed);
    pds.pulse(1, 1);
    site.wait_record("granted PIN", |r| granted(r, "main", "courier"));

    // Wrong PINs: red each time, and after three the keypad is locked out.
    for _ in 0..3 {
        pds.forget();
        pds.keys(1, b"111111\r");
        pds.led(1, 1);
    }
    site.wait_record(
        "PIN lockout",
        |r| matches!(r, Record::PinLockout { door, .. } if door == "main"),
    );

    // Tamper, then a power failure.
    pds.send(&json!({"op": "status", "pd": 1, "type": "local", "report": [1, 0]}));
    site.wait_record(
        "tamper alarm",
        |r| matches!(r, Record::Tamper { active: true, door, .. } if door == "main"),
    );
    pds.send(&json!({"op": "status", "pd": 1, "type": "local", "report": [1, 1]}));
    site.wait_record(
        "power failure alarm",
        |r| matches!(r, Record::PowerFailure { active: true, door, .. } if door == "main"),
    );

    // The reader with the wrong key never gets a secure channel and is refused, with an alarm.
    site.wait_record(
        "the wrong-key reader refused",
        |r| matches!(r, Record::ReaderRefused { door, .. } if door == "garage"),
    );
    assert!(
        !pds.seen
            .iter()
            .any(|e| e["ev"] == "command" && e["pd"] == 2 && e["cmd"]["name"] == "output"),
        "the refused reader was never told to release its door"
    );

    gateway.stop().await;
}

/// A single-use card is honoured once, also across a gateway restart; the second time the
/// reader shows red and the strike stays shut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_card_opens_once_across_a_restart() {
    let site = Site::new().await;
    let key = site.key_file("main", Some(KEY_A));
    let mut pds = PdBus::start(&site.link, &[&format!("1,scbk={KEY_A}")]);
    let config = site.config(&[reader(
        1,
        "main",
        &format!("key_file = \"{}\"", key.display()),
    )]);

    let gateway = Gateway::start(config.clone());
    pds.secure(1);
    pds.card(1, CARD_ONCE);
    pds.pulse(1, 0);
    site.wait_record("granted single use", |r| granted(r, "main", "once"));
    gateway.stop().await;

    pds.forget();
    let gateway = Gateway::start(config);
    // The reader may not see the restart at all (the harness samples its state every 50 ms):
    // its card read is queued at the reader until the new gateway polls it.
    pds.card(1, CARD_ONCE);
    pds.led(1, 1);
    site.wait_record("used up", |r| {
        matches!(r, Record::Activity(a) if !a.granted
            && a.key_id.as_deref() == Some("once")
            && a.reason == Some(doorbridge::access::DenyReason::UsedUp))
    });
    assert!(
        !pds.seen
            .iter()
            .any(|e| e["ev"] == "command" && e["cmd"]["name"] == "output"),
        "the strike was not released the second time: {:#?}",
        pds.seen
    );
    let grants = site
        .records()
        .iter()
        .filter(|r| granted(r, "main", "once"))
        .count();
    assert_eq!(grants, 1, "one grant for a single-use key");
    gateway.stop().await;
}

/// `doorbridge osdp install`: a reader in install mode takes a new key over SCBK-D, the key
/// file appears (0600) only once the key is proven, and the gateway then serves the reader
/// with it. A reader that is not in install mode is refused with the reason, its key untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_mode_provisioning_gives_a_reader_its_own_key() {
    use std::os::unix::fs::PermissionsExt;

    let site = Site::new().await;
    let key_file = site.key_file("main", None);
    // PD 1 has no key: libosdp keeps it in install mode. PD 2 has a key of its own.
    let mut pds = PdBus::start(&site.link, &["1", &format!("2,scbk={KEY_B}")]);
    let request = |address: u8, key_file: PathBuf| doorbridge::osdp::install::InstallRequest {
        bus: "osdp".into(),
        port: site.link.clone(),
        baud: 115_200,
        rs485: None,
        address,
        key_file,
        timeout: Duration::from_secs(5),
    };

    let mut said = Vec::new();
    let installed = {
        let request = request(1, key_file.clone());
        tokio::task::spawn_blocking(move || {
            let mut said = Vec::new();
            let r = doorbridge::osdp::install::install(&request, |l| said.push(l.to_owned()));
            (r, said)
        })
        .await
        .expect("install thread")
    };
    said.extend(installed.1);
    let installed = installed
        .0
        .unwrap_or_else(|e| panic!("install failed: {e}; it said {said:#?}"));
    assert_eq!(installed.key_file, key_file);
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!PathBuf::from(format!("{}.new", key_file.display())).exists());
    let key = doorbridge::osdp::key::read(&key_file).expect("a key");
    let hex = credential::to_hex(&key);
    // The reader got exactly the key in the file, and the key never reached the output.
    pds.wait("the keyset at PD 1", |e| {
        e["ev"] == "command"
            && e["pd"] == 1
            && e["cmd"]["name"] == "keyset"
            && e["cmd"]["data"] == hex
    });
    assert!(said.iter().all(|l| !l.contains(&hex)), "{said:#?}");
    assert!(
        said.iter().any(|l| l.contains(&installed.fingerprint)),
        "{said:#?}"
    );

    // PD 2 is not in install mode: refused, nothing left in place of its key file.
    let other = site.key_file("garage", None);
    let refused = {
        let request = request(2, other.clone());
        tokio::task::spawn_blocking(move || doorbridge::osdp::install::install(&request, |_| {}))
            .await
            .expect("install thread")
    };
    let e = refused.expect_err("a reader with a key of its own is not provisioned");
    assert!(
        matches!(
            e,
            doorbridge::osdp::install::InstallError::NotInstallMode { .. }
        ),
        "{e}"
    );
    assert!(!other.exists());

    // The gateway serves the provisioned reader with its new key.
    pds.forget();
    let config = site.config(&[reader(
        1,
        "main",
        &format!("key_file = \"{}\"", key_file.display()),
    )]);
    let gateway = Gateway::start(config);
    // Served at all means served with the new key: the gateway allows nothing else.
    pds.card(1, CARD_RESIDENT);
    pds.pulse(1, 0);
    gateway.stop().await;
}

/// Eight readers on one line, one of them dead: the seven others are all served. Prints how
/// long each grant took from the card read to the strike command, for the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_readers_on_one_line_are_served_while_one_is_dead() {
    let doors: Vec<String> = (1..=8).map(|i| format!("door{i}")).collect();
    let site = Site::with_doors(&doors).await;
    let key = site.key_file("shared", Some(KEY_A));
    let mut specs: Vec<String> = (1..=7).map(|a| format!("{a},scbk={KEY_A}")).collect();
    specs.push("8,dead".into());
    let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let mut pds = PdBus::start(&site.link, &spec_refs);
    let readers: Vec<String> = (1..=8u8)
        .map(|a| {
            reader(
                a,
                &format!("door{a}"),
                &format!("key_file = \"{}\"", key.display()),
            )
        })
        .collect();
    let gateway = Gateway::start(site.config(&readers));
    for a in 1..=7 {
        pds.secure(a);
    }
    let mut took = Vec::new();
    for round in 0..2 {
        for a in 1..=7u8 {
            let t = Instant::now();
            pds.card(a, CARD_RESIDENT);
            pds.pulse(a, 0);
            took.push((round, a, t.elapsed()));
        }
    }
    for a in 1..=7u8 {
        let door = format!("door{a}");
        site.wait_records(&format!("grants at {door}"), 2, |r| {
            granted(r, &door, "resident")
        });
    }
    // The dead reader is reported, once it had its chance.
    site.wait_record(
        "the dead reader offline",
        |r| matches!(r, Record::UnitReachability { online: false, door, .. } if door == "door8"),
    );
    eprintln!("card read to strike command, with reader 8 dead: {took:?}");
    gateway.stop().await;
}

/// Readers that are not plain card readers: a QR reader presenting raw data, an elevator
/// reader pulsing one output per granted floor, and an inner door's reader released by a grant
/// at the outer door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_elevator_and_inner_door_readers_do_what_they_are_configured_for() {
    let site = Site::new().await;
    let key = site.key_file("all", Some(KEY_A));
    let mut pds = PdBus::start(
        &site.link,
        &[
            &format!("1,scbk={KEY_A}"),
            &format!("2,scbk={KEY_A}"),
            &format!("3,scbk={KEY_A}"),
        ],
    );
    let key = key.display();
    let gateway = Gateway::start(site.config(&[
        reader(1, "main", &format!("key_file = \"{key}\"\nreader = \"qr\"")),
        reader(
            2,
            "lift",
            &format!(
                "key_file = \"{key}\"\nreader = \"elevator\"\nfloors = [{{ floor = 3, output = 1 }}, {{ floor = 4, output = 2 }}, {{ floor = 5, output = 3 }}]"
            ),
        ),
        format!(
            "address = 3\ndoor = \"inner\"\ninner = true\nbehind = [\"main\"]\n[buses.units.osdp]\nkey_file = \"{key}\"\nrelay = 2\npulse = \"5s\""
        ),
    ]));
    for pd in 1..=3 {
        pds.secure(pd);
    }

    // The QR code as raw data: a qr credential at a QR reader.
    let hex = credential::to_hex(QR_GUEST.as_bytes());
    pds.send(&json!({"op": "card", "pd": 1, "format": "raw", "data": hex}));
    pds.pulse(1, 0);
    site.wait_record("granted QR", |r| {
        matches!(r, Record::Activity(a) if a.granted && a.key_id.as_deref() == Some("guest")
            && a.credential_kind == CredentialKind::Qr)
    });

    // Raw data that is not whole bytes is no QR code: red at the reader, and a denial
    // recorded (one per minute at most, so a broken reader cannot flood the outbox).
    pds.forget();
    pds.send(&json!({"op": "card", "pd": 1, "format": "raw", "bits": 12, "data": "abc0"}));
    pds.led(1, 1);
    site.wait_record("an unreadable read denied", |r| {
        matches!(r, Record::Activity(a) if !a.granted && a.door == "main"
            && a.credential_kind == CredentialKind::Qr
            && a.reason == Some(doorbridge::access::DenyReason::UnknownCredential))
    });

    // The lift card: floors 3 and 4 released, floor 5 not, and no door strike.
    pds.forget();
    pds.card(2, CARD_LIFT);
    pds.pulsed(2, 1);
    pds.pulsed(2, 2);
    pds.led(2, 2);
    assert!(
        !pds.seen.iter().any(|e| e["ev"] == "command"
            && e["pd"] == 2
            && e["cmd"]["name"] == "output"
            && (e["cmd"]["output_no"] == 0 || e["cmd"]["output_no"] == 3)),
        "only the granted floors' outputs: {:#?}",
        pds.seen
    );

    // A key that also opens inner doors, at the outer door's reader (a QR reader: the card
    // comes as Wiegand, always a card): the inner door's reader releases its strike for its
    // own pulse time.
    pds.forget();
    pds.card(1, CARD_RESIDENT);
    pds.pulsed(1, 0);
    let inner = pds.pulsed(3, 2);
    assert_eq!(
        inner["cmd"]["timer_count"], 50,
        "the inner reader's pulse: {inner}"
    );
    gateway.stop().await;
}
