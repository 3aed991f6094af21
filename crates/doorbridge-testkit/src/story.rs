//! The demo's story (issue 7, §1): told by `examples/demo.rs`, and run by `tests/it/demo.rs` so
//! that it cannot rot.
//!
//! Everything runs in this process: an rumqttd broker on a free port; a TCP proxy between the
//! gateway and that broker, to take the internet away and give it back; the reference cloud (a
//! [`CloudClient`] connected straight to the broker, signing with a key generated for this run,
//! whose public half is the gateway's only trusted key); the gateway itself
//! (`doorbridge::daemon::serve` on the embedded [`CONFIG`], its state in a temporary directory);
//! and four simulated door units on two pseudo-terminal buses.
//!
//! Each step checks what it shows. The first check that fails ends the story, and the
//! [`Outcome`] names its step. Every wait polls its condition against a deadline; nothing
//! sleeps to synchronise.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, DenyReason, Key, Schedule, UseLimit};
use doorbridge::bus::frame::Address;
use doorbridge::bus::message::DoorEventKind;
use doorbridge::bus::session::Answer;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::telemetry::Summary;
use doorbridge::cloud::topics::{Channel, Topics};
use doorbridge::cloud::uplink::{Batch, Uploaded};
use doorbridge::config::Config;
use doorbridge::daemon::DaemonError;
use doorbridge::store::{Reader, Record};
use doorbridge_sim::build;
use doorbridge_sim::cloud::{CloudClient, Message, RecordLedger, hex};
use doorbridge_sim::keyfile::KeyFile;
use doorbridge_sim::{HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits};
use ed25519_dalek::SigningKey;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::brokers;

/// The gateway's configuration. `{state}`, `{broker}` and `{trusted}` are filled in at start:
/// the temporary state directory, the proxy's URL and the cloud's public key.
pub const CONFIG: &str = r#"
[gateway]
id = "gw-demo"
site_id = "example-street-1"

[site]
timezone = "Europe/Berlin"
name = "Example Street 1"

[cloud]
# Through the proxy, so that the demo can take the broker away.
url = "{broker}"
# The reference cloud's public key, generated for this run.
trusted_keys = ["{trusted}"]

[storage]
path = "{state}/doorbridge.db"

# Two door buses on pseudo-terminals, two units on each. The front one is polled every 20 ms,
# the back one at the default 200 ms.
[[buses]]
name = "front"
port = "{state}/ttyFRONT"
poll_interval = "20ms"
units = [
    { address = 1, door = "main-entrance", name = "Main entrance intercom" },
    { address = 2, door = "lobby", inner = true, behind = ["main-entrance"] },
]

[[buses]]
name = "back"
port = "{state}/ttyBACK"
units = [
    { address = 1, door = "garage", name = "Garage gate" },
    { address = 2, door = "elevator", name = "Elevator reader" },
]

# An OSDP line with one card reader (docs/osdp.md); the gateway is its Control Panel, with the
# secure channel on a key made for this run.
[[buses]]
name = "side"
protocol = "osdp"
port = "{state}/ttyOSDP"

[[buses.units]]
address = 1
door = "side-entrance"
name = "Side entrance card reader"
[buses.units.osdp]
key_file = "{state}/side-entrance.key"
"#;

const SITE: &str = "example-street-1";
const GATEWAY: &str = "gw-demo";
const TIME_ZONE: &str = "Europe/Berlin";
/// The buses of [`CONFIG`], in order, and the pty link each one's port names.
const BUSES: [(&str, &str); 2] = [("front", "ttyFRONT"), ("back", "ttyBACK")];
const MAIN: &str = "main-entrance";
const LOBBY: &str = "lobby";
const GARAGE: &str = "garage";
const ELEVATOR: &str = "elevator";
/// The door of the OSDP card reader, and the reader's address and link.
const SIDE: &str = "side-entrance";
const SIDE_READER: u8 = 1;
const OSDP_LINK: &str = "ttyOSDP";
/// The doors of [`CONFIG`]: door, bus (index into [`BUSES`]), unit address.
const DOORS: [(&str, usize, u8); 4] = [
    (MAIN, 0, 1),
    (LOBBY, 0, 2),
    (GARAGE, 1, 1),
    (ELEVATOR, 1, 2),
];
/// How long any one thing may take before its step fails.
const WAIT: Duration = Duration::from_secs(15);
/// How often a condition is looked at while waiting for it.
const POLL: Duration = Duration::from_millis(5);
/// The whole story must stay well under this.
const BUDGET: Duration = Duration::from_secs(60);

/// The steps, as the issue tells them.
pub const STEPS: [&str; 6] = [
    "keys of each type are created in the cloud and synced",
    "the courier PIN opens once; the recurring key keeps to its window",
    "the broker goes away and comes back: nothing is lost",
    "a key deleted in the cloud is refused at the door",
    "the call button and a low battery reach the cloud",
    "a summary table, well under a minute",
];

/// Where the story's lines go (stdout in the example, a buffer in the test).
pub trait Narrator {
    fn say(&mut self, line: &str);
}

/// One check: what was expected and what was observed.
#[derive(Clone, Debug)]
pub struct Row {
    pub step: usize,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

/// How the story went.
#[derive(Debug)]
pub struct Outcome {
    pub rows: Vec<Row>,
    /// The step that failed (1 to 6, 0 for the start) and why.
    pub failed: Option<(usize, String)>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The summary table, a line a check; steps that did not run say so.
    pub fn table(&self) -> Vec<String> {
        let width = |f: fn(&Row) -> usize, title: &str| {
            self.rows.iter().map(f).max().unwrap_or(0).max(title.len())
        };
        let we = width(|r| r.expected.chars().count(), "expected");
        let wo = width(|r| r.observed.chars().count(), "observed");
        let mut lines = vec![format!("step  {:we$}  {:wo$}  ok", "expected", "observed")];
        // Step 0 is the start: it has a row only when it failed.
        for step in 0..=STEPS.len() {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.step == step).collect();
            if rows.is_empty() && step > 0 {
                lines.push(format!("{step:<4}  (not run)"));
            }
            for r in rows {
                let ok = if r.ok { "ok" } else { "FAILED" };
                lines.push(format!(
                    "{step:<4}  {:we$}  {:wo$}  {ok}",
                    r.expected, r.observed
                ));
            }
        }
        lines
    }
}

/// Tells the whole story; never panics on a failed check (the outcome says which step).
pub async fn run(out: &mut dyn Narrator) -> Outcome {
    let mut j = Journal {
        out,
        started: Instant::now(),
        step: 0,
        rows: Vec::new(),
    };
    let mut world = match World::start(&mut j).await {
        Ok(world) => world,
        Err(why) => return j.finish(Err(why)),
    };
    let story = world.tell(&mut j).await;
    let stopped = world.stop().await;
    let result = match story {
        Ok(()) => {
            j.begin(6);
            let elapsed = j.started.elapsed();
            j.check(
                &format!("story well under {} s", BUDGET.as_secs()),
                &format!("{:.1} s", elapsed.as_secs_f64()),
                elapsed < BUDGET,
            )
            .and_then(|()| {
                let observed = match &stopped {
                    Ok(took) => format!("stopped in {} ms", took.as_millis()),
                    Err(why) => why.clone(),
                };
                j.check("the gateway stops cleanly", &observed, stopped.is_ok())
            })
        }
        Err(why) => Err(why),
    };
    j.finish(result)
}

/// The lines said so far and the checks made, with the step they belong to.
struct Journal<'a> {
    out: &'a mut dyn Narrator,
    started: Instant,
    step: usize,
    rows: Vec<Row>,
}

impl Journal<'_> {
    fn begin(&mut self, step: usize) {
        self.step = step;
        self.out.say("");
        self.out.say(&format!("{step}. {}", STEPS[step - 1]));
    }

    /// One event, with the time since the start.
    fn say(&mut self, line: &str) {
        let t = self.started.elapsed().as_secs_f64();
        self.out.say(&format!("{t:6.2}s  {line}"));
    }

    /// Records a check; a failed one ends the story.
    fn check(&mut self, expected: &str, observed: &str, ok: bool) -> Result<(), String> {
        self.rows.push(Row {
            step: self.step,
            expected: expected.to_owned(),
            observed: observed.to_owned(),
            ok,
        });
        if ok {
            Ok(())
        } else {
            Err(format!("expected {expected}; observed {observed}"))
        }
    }

    fn finish(mut self, result: Result<(), String>) -> Outcome {
        let failed = result.err().map(|why| {
            // A wait that ran out has no row of its own yet.
            if self.rows.last().is_none_or(|r| r.ok) {
                self.rows.push(Row {
                    step: self.step,
                    expected: "(the story goes on)".into(),
                    observed: why.clone(),
                    ok: false,
                });
            }
            let step = self.step;
            let at = if step == 0 {
                "the start".to_owned()
            } else {
                format!("step {step}")
            };
            self.out.say("");
            self.out.say(&format!("FAILED at {at}: {why}"));
            (step, why)
        });
        Outcome {
            rows: self.rows,
            failed,
            elapsed: self.started.elapsed(),
        }
    }
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("{what}: not within {} s", WAIT.as_secs()));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

// ---------------------------------------------------------------------------------------------
// The people and their keys
// ---------------------------------------------------------------------------------------------

/// The cloud's keys for the building in the keys-file format (`docs/keys-file.md`), one of each
/// type in the seeds. The `{…}` are filled in at the start ([`keys_file`]): the site salt, and
/// times relative to now, in the site's time zone for the weekly window.
pub const KEYS: &str = r#"
salt = "{salt}"

# PhoneIn unlimited key: the resident, at every outer door and the inner door; her floor.
[[keys]]
id = "ann-resident"
name = "Ann (resident)"
doors = ["main-entrance", "garage", "elevator"]
opens_inner_door = true
floors = [5]
credentials = [{ kind = "mobile", value = "app-key-ann-7f3a" }]

# Akuvox courier key: a PIN for one delivery, valid from an hour ago for five hours.
[[keys]]
id = "courier-dhl"
name = "DHL courier"
category = "delivery"
doors = ["main-entrance"]
valid_from = "{an hour ago}"
valid_until = "{in 4 hours}"
use_limit = { limit = "total", uses = 1 }
credentials = [{ kind = "pin", value = "730155" }]

# Akuvox visitor key: a QR code, "Each Door Counts" 1, the elevator to floors 3 and 4.
[[keys]]
id = "visitor-party"
name = "party guest"
category = "event"
doors = ["main-entrance", "elevator"]
valid_from = "{an hour ago}"
valid_until = "{in 8 hours}"
use_limit = { limit = "per_door", uses = 1 }
floors = [3, 4]
credentials = [{ kind = "qr", value = "QR-PARTY-91c2e0" }]

# PhoneIn recurring key: on today's weekday, in a window two hours from now, so that now is
# outside it whatever the hour (a window belongs to the day it starts on).
[[keys]]
id = "cleaner-weekly"
name = "cleaner"
category = "services"
doors = ["main-entrance"]
schedule = { repeat = "weekly", days = ["{today}"], window = { start = "{in 2 hours}", end = "{in 3 hours}" } }
credentials = [{ kind = "mobile", value = "app-key-clean-19d0" }]

# PhoneIn "also opens inner door", with a welcome message.
[[keys]]
id = "bob-friend"
name = "Bob (friend)"
doors = ["main-entrance"]
opens_inner_door = true
welcome = "Welcome, Bob!"
credentials = [{ kind = "mobile", value = "app-key-bob-c0ff" }]

# A card at an OSDP reader: the resident's card (26-bit Wiegand) for the side entrance.
[[keys]]
id = "carol-resident"
name = "Carol (resident)"
doors = ["side-entrance"]
credentials = [{ kind = "card", value = "26:0a1b2c40" }]
"#;

/// Someone at a door with the credential [`KEYS`] gives them, in clear.
struct Person {
    key: &'static str,
    who: &'static str,
    kind: CredentialKind,
    secret: &'static str,
}

const fn person(
    key: &'static str,
    who: &'static str,
    kind: CredentialKind,
    secret: &'static str,
) -> Person {
    Person {
        key,
        who,
        kind,
        secret,
    }
}

const ANN: Person = person(
    "ann-resident",
    "Ann (resident)",
    CredentialKind::Mobile,
    "app-key-ann-7f3a",
);
const COURIER: Person = person("courier-dhl", "DHL courier", CredentialKind::Pin, "730155");
const VISITOR: Person = person(
    "visitor-party",
    "party guest",
    CredentialKind::Qr,
    "QR-PARTY-91c2e0",
);
const CLEANER: Person = person(
    "cleaner-weekly",
    "cleaner",
    CredentialKind::Mobile,
    "app-key-clean-19d0",
);
const BOB: Person = person(
    "bob-friend",
    "Bob (friend)",
    CredentialKind::Mobile,
    "app-key-bob-c0ff",
);

fn credential_name(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::Pin => "PIN",
        CredentialKind::Qr => "QR code",
        CredentialKind::Mobile => "app key",
        CredentialKind::Card => "card",
    }
}

/// [`KEYS`] filled in for `now` in `tz`, with `salt`.
fn keys_file(salt: &[u8], now: Timestamp, tz: &TimeZone) -> String {
    let at = |hours: i64| now + SignedDuration::from_hours(hours);
    let here = now.to_zoned(tz.clone());
    // On the wall clock, so that a change to or from summer time cannot make the window empty.
    let local = |hours: i64| {
        let t = here.time().wrapping_add(SignedDuration::from_hours(hours));
        t.strftime("%H:%M").to_string()
    };
    let today = format!("{:?}", here.weekday()).to_lowercase();
    [
        ("{salt}", hex(salt)),
        ("{an hour ago}", at(-1).to_string()),
        ("{in 4 hours}", at(4).to_string()),
        ("{in 8 hours}", at(8).to_string()),
        ("{today}", today),
        ("{in 2 hours}", local(2)),
        ("{in 3 hours}", local(3)),
    ]
    .iter()
    .fold(KEYS.to_owned(), |text, (name, value)| {
        text.replace(name, value)
    })
}

/// `t` as site-local `HH:MM`.
fn hh_mm(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone()).strftime("%H:%M").to_string()
}

/// A key's rules in a few words.
fn describe_key(k: &Key, tz: &TimeZone) -> String {
    let r = &k.rules;
    let mut parts = vec![
        k.credentials
            .first()
            .map_or("no credential", |c| credential_name(c.kind))
            .to_owned(),
    ];
    parts.push(match r.use_limit {
        UseLimit::Unlimited => "unlimited".to_owned(),
        UseLimit::Total(1) => "single use".to_owned(),
        UseLimit::Total(n) => format!("{n} uses"),
        UseLimit::PerDoor(n) => format!("{n} use per door"),
    });
    if let Schedule::Weekly {
        days,
        window: Some(w),
    } = &r.schedule
    {
        let days: Vec<String> = jiff::civil::Weekday::Monday
            .cycle_forward()
            .take(7)
            .filter(|d| days.contains(*d))
            .map(|d| format!("{d:?}")[..3].to_owned())
            .collect();
        parts.push(format!(
            "weekly {} {}-{}",
            days.join(" "),
            w.start.strftime("%H:%M"),
            w.end.strftime("%H:%M")
        ));
    }
    if let (Some(from), Some(until)) = (r.valid_from, r.valid_until) {
        parts.push(format!("{}-{}", hh_mm(from, tz), hh_mm(until, tz)));
    }
    let inner = if r.opens_inner_door {
        " + inner door"
    } else {
        ""
    };
    parts.push(format!("{}{inner}", r.doors.join(" ")));
    if !r.floors.is_empty() {
        parts.push(format!("floors {:?}", r.floors));
    }
    if let Some(w) = &r.welcome {
        parts.push(format!("\"{w}\""));
    }
    format!("{}: {}", r.name, parts.join(", "))
}

/// A door's answer in a few words.
fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Deny(reason) => format!("denied: {reason}"),
        Answer::Grant(g) => {
            let mut s = "granted".to_owned();
            if let Some(w) = &g.welcome {
                let _ = write!(s, " \"{w}\"");
            }
            if !g.floors.is_empty() {
                let _ = write!(s, ", floors {:?}", g.floors);
            }
            s
        }
    }
}

/// `n` bytes from the kernel's random source (for the cloud's signing key and the site salt).
fn random<const N: usize>() -> Result<[u8; N], String> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// The cloud
// ---------------------------------------------------------------------------------------------

/// What the cloud heard from the gateway, with when it arrived.
#[derive(Default)]
struct Heard {
    /// Every uploaded record, once, by `(gateway, seq)`.
    ledger: RecordLedger,
    /// The records new to the ledger.
    records: Vec<(Instant, Uploaded)>,
    reports: Vec<(Instant, Report)>,
    /// Messages that did not decode.
    garbled: Vec<String>,
}

/// The reference cloud: signs key sets and hears the gateway, straight from the broker.
struct Cloud {
    client: CloudClient,
    topics: Topics,
    target: Target,
    signer: SigningKey,
    salt: [u8; 16],
    heard: Arc<Mutex<Heard>>,
    listener: JoinHandle<()>,
}

impl Cloud {
    async fn connect(url: &str) -> Result<Cloud, String> {
        let target = Target {
            site: SITE.into(),
            gateway: GATEWAY.into(),
        };
        let topics = Topics::new("doorbridge", &target).map_err(|e| e.to_string())?;
        let client = CloudClient::connect(url, "demo-cloud")
            .await
            .map_err(|e| format!("the cloud cannot connect: {e}"))?;
        let filter = format!(
            "{}/#",
            topics.topic(Channel::State).trim_end_matches("/state")
        );
        let rx = client
            .subscribe(&filter)
            .await
            .map_err(|e| format!("the cloud cannot subscribe: {e}"))?;
        let heard = Arc::new(Mutex::new(Heard::default()));
        let listener = tokio::spawn(listen(rx, topics.clone(), Arc::clone(&heard)));
        Ok(Cloud {
            client,
            topics,
            target,
            signer: SigningKey::from_bytes(&random()?),
            salt: random()?,
            heard,
            listener,
        })
    }

    fn heard<T>(&self, f: impl FnOnce(&Heard) -> T) -> T {
        f(&self.heard.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits for a report `f` picks something from; returns it with when it arrived.
    async fn report<T>(
        &self,
        what: &str,
        f: impl Fn(&Report) -> Option<T>,
    ) -> Result<(Instant, T), String> {
        until(what, || self.heard(|h| first(&h.reports, &f))).await
    }

    /// Waits for an uploaded record `f` picks something from; returns it with when it arrived.
    async fn record<T>(
        &self,
        what: &str,
        f: impl Fn(&Record) -> Option<T>,
    ) -> Result<(Instant, T), String> {
        until(what, || {
            self.heard(|h| first(&h.records, |u: &Uploaded| f(&u.record)))
        })
        .await
    }
}

/// The first of `heard` that `f` picks something from, with when it arrived.
fn first<M, T>(heard: &[(Instant, M)], f: impl Fn(&M) -> Option<T>) -> Option<(Instant, T)> {
    heard
        .iter()
        .find_map(|(at, m)| f(m).map(|value| (*at, value)))
}

/// Files what arrives on the gateway's topics (the cloud's own publishes come back too, and
/// are passed over).
async fn listen(
    mut rx: mpsc::UnboundedReceiver<Message>,
    topics: Topics,
    heard: Arc<Mutex<Heard>>,
) {
    while let Some((topic, payload)) = rx.recv().await {
        let at = Instant::now();
        let Some(channel) = topics.channel_of(&topic) else {
            continue;
        };
        let mut guard = heard.lock().unwrap_or_else(PoisonError::into_inner);
        let h = &mut *guard;
        if channel == Channel::Records {
            match Batch::decode(&payload) {
                Ok(batch) => {
                    let new = h.ledger.add(&batch);
                    h.records.extend(new.into_iter().map(|u| (at, u.clone())));
                }
                Err(e) => h.garbled.push(format!("{topic}: {e}")),
            }
        } else if Channel::OUTBOUND.contains(&channel) {
            match Report::decode(&payload) {
                Ok(report) => h.reports.push((at, report)),
                Err(e) => h.garbled.push(format!("{topic}: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The building
// ---------------------------------------------------------------------------------------------

/// A simulated bus: where its commands go, and how to stop it.
struct Bus {
    commands: mpsc::Sender<SimCommand>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The simulated OSDP card reader: its line thread and what it was told.
struct Osdp {
    readers: doorbridge_sim::osdp::ReadersHandle,
    outputs: mpsc::UnboundedReceiver<doorbridge_sim::osdp::Output>,
}

/// The running system.
struct World {
    state: tempfile::TempDir,
    _broker: brokers::RumqttdBroker,
    proxy: brokers::Proxy,
    cloud: Cloud,
    buses: Vec<Bus>,
    osdp: Osdp,
    /// What the door units saw, with their bus.
    outputs: mpsc::Receiver<(usize, Output)>,
    /// Outputs read while waiting for another.
    seen: Vec<(usize, Output)>,
    daemon: (oneshot::Sender<()>, JoinHandle<Result<(), DaemonError>>),
    reader: Option<Reader>,
    tz: TimeZone,
}

fn unit_of(door: &str) -> (usize, Address) {
    let (_, bus, address) = DOORS
        .iter()
        .find(|(d, ..)| *d == door)
        .expect("a door of CONFIG");
    (*bus, Address::unit(*address).expect("a unit address"))
}

/// Starts the simulated OSDP card reader on a pty in `state`, with a secure channel key made
/// for this run, written where [`CONFIG`] names the reader's key file.
fn start_osdp(state: &Path) -> Result<Osdp, String> {
    use doorbridge_sim::osdp::{ReaderSpec, SimLine, linked_line, spawn};
    let key: [u8; 16] = random()?;
    doorbridge::osdp::key::write_new(&state.join("side-entrance.key"), &key)
        .map_err(|e| e.to_string())?;
    let (master, _) = linked_line(&state.join(OSDP_LINK))
        .map_err(|e| format!("cannot create a pseudo-terminal: {e}"))?;
    let (tx, outputs) = mpsc::unbounded_channel();
    let readers = spawn(
        master,
        &SimLine::pty(vec![ReaderSpec {
            address: SIDE_READER,
            scbk: Some(key),
        }]),
        tx,
    )
    .map_err(|e| format!("the OSDP reader did not start: {e}"))?;
    Ok(Osdp { readers, outputs })
}

/// Starts the simulated units of bus `index` on a pty linked at `link`.
fn start_bus(
    index: usize,
    link: &Path,
    outputs: &mpsc::Sender<(usize, Output)>,
) -> Result<Bus, String> {
    let (master, _) = doorbridge_sim::linked_pty(link)
        .map_err(|e| format!("cannot create a pseudo-terminal: {e}"))?;
    let addresses: Vec<Address> = DOORS
        .iter()
        .filter(|(_, bus, _)| *bus == index)
        .map(|(door, ..)| unit_of(door).1)
        .collect();
    let config = SimConfig {
        seed: index as u64,
        ..SimConfig::default()
    };
    let units = SimUnits::new(&addresses, config).map_err(|e| e.to_string())?;
    let (commands, command_rx) = mpsc::channel(64);
    let (output_tx, mut output_rx) = mpsc::channel(256);
    let (stop, stopped) = oneshot::channel::<()>();
    let tagged = outputs.clone();
    tokio::spawn(async move {
        while let Some(o) = output_rx.recv().await {
            if tagged.send((index, o)).await.is_err() {
                break;
            }
        }
    });
    let task = tokio::spawn(async move {
        let port = HangupTolerant::new(master, Duration::from_millis(5));
        let _ = doorbridge_sim::run_sim(port, units, command_rx, output_tx, async {
            let _ = stopped.await;
        })
        .await;
    });
    Ok(Bus {
        commands,
        stop,
        task,
    })
}

impl World {
    async fn start(j: &mut Journal<'_>) -> Result<World, String> {
        j.out.say(
            "doorbridge demo: broker, cloud, gateway, four door units and an OSDP card reader, all in this process",
        );
        let tz = TimeZone::get(TIME_ZONE).map_err(|_| {
            format!("the time zone {TIME_ZONE} is not in this machine's database: apt-get install tzdata")
        })?;
        let state = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
        let broker = std::panic::catch_unwind(brokers::RumqttdBroker::start)
            .map_err(|_| "the in-process MQTT broker did not start".to_owned())?;
        let proxy = brokers::Proxy::start(broker.port);
        let cloud = Cloud::connect(&broker.url()).await?;
        let public = hex(cloud.signer.verifying_key().as_bytes());
        j.out.say(&format!(
            "  state   {} (store, pty links)",
            state.path().display()
        ));
        j.out.say(&format!(
            "  broker  rumqttd on 127.0.0.1:{}; the gateway goes through a proxy on :{}",
            broker.port,
            proxy.port()
        ));
        j.out.say(&format!(
            "  cloud   signing key made for this run, public {}…, the gateway's trusted key",
            &public[..16]
        ));
        j.out.say(&format!(
            "  site    Example Street 1, {TIME_ZONE}, now {}",
            Timestamp::now().to_zoned(tz.clone()).strftime("%a %H:%M")
        ));
        let (tx, outputs) = mpsc::channel(1024);
        let buses = BUSES
            .iter()
            .enumerate()
            .map(|(i, (_, link))| start_bus(i, &state.path().join(link), &tx))
            .collect::<Result<Vec<_>, _>>()?;
        let osdp = start_osdp(state.path())?;
        let text = CONFIG
            .replace("{state}", &state.path().display().to_string())
            .replace("{broker}", &proxy.url())
            .replace("{trusted}", &public);
        let config = Config::from_toml_str(&text, "the demo's configuration")
            .map_err(|e| format!("the embedded configuration is refused: {e}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let daemon = tokio::spawn(async move {
            doorbridge::daemon::serve(&config, async {
                let _ = stopped.await;
            })
            .await
        });
        let mut world = World {
            state,
            _broker: broker,
            proxy,
            cloud,
            buses,
            osdp,
            outputs,
            seen: Vec::new(),
            daemon: (stop, daemon),
            reader: None,
            tz,
        };
        world.ready(j).await?;
        Ok(world)
    }

    /// Waits until every unit is served and the gateway is online.
    async fn ready(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        for (door, ..) in DOORS {
            let (bus, unit) = unit_of(door);
            self.next(&format!("the gateway to serve {door}"), |b, o| {
                b == bus
                    && matches!(o, Output::Acked { unit: u, report: ReportKind::Status, .. } if *u == unit)
            })
            .await?;
        }
        j.say("door units: main-entrance, lobby (inner) on bus front; garage, elevator on back");
        self.osdp_output("the OSDP reader online with its secure channel", |o| {
            matches!(
                o,
                doorbridge_sim::osdp::Output::State {
                    online: true,
                    secure: true,
                    ..
                }
            )
        })
        .await?;
        j.say(
            "OSDP reader at side-entrance on bus side: online, secure channel up with its own key",
        );
        self.cloud
            .report("the gateway online", |r| {
                matches!(
                    r,
                    Report::State {
                        state: Presence::Online,
                        ..
                    }
                )
                .then_some(())
            })
            .await?;
        let db = self.db();
        self.reader = Some(Reader::open(&db).map_err(|e| format!("cannot read the store: {e}"))?);
        j.say("gateway online (state report on the broker); no key set yet");
        Ok(())
    }

    fn db(&self) -> PathBuf {
        self.state.path().join("doorbridge.db")
    }

    fn reader(&self) -> &Reader {
        self.reader.as_ref().expect("opened in ready")
    }

    /// The next door-unit output `want` accepts, within [`WAIT`].
    async fn next(
        &mut self,
        what: &str,
        want: impl Fn(usize, &Output) -> bool,
    ) -> Result<Output, String> {
        if let Some(i) = self.seen.iter().position(|(b, o)| want(*b, o)) {
            return Ok(self.seen.remove(i).1);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.outputs.recv()).await {
                Ok(Some((b, o))) if want(b, &o) => return Ok(o),
                Ok(Some(other)) => self.seen.push(other),
                Ok(None) => return Err(format!("{what}: the door units stopped")),
                Err(_) => return Err(format!("{what}: not within {} s", WAIT.as_secs())),
            }
        }
    }

    async fn command(&self, door: &str, command: SimCommand) -> Result<(), String> {
        self.buses[unit_of(door).0]
            .commands
            .send(command)
            .await
            .map_err(|_| "the door units stopped".to_owned())
    }

    /// `p` presents their credential at `door`; the answer must read `expected`.
    async fn expect(
        &mut self,
        j: &mut Journal<'_>,
        door: &str,
        p: &Person,
        expected: &str,
    ) -> Result<(), String> {
        let (bus, unit) = unit_of(door);
        self.command(
            door,
            SimCommand::Verify {
                unit,
                kind: p.kind,
                value: p.secret.as_bytes().to_vec(),
                reader: 0,
            },
        )
        .await?;
        let what = format!("a decision at {door}");
        let out = self
            .next(&what, |b, o| {
                b == bus && matches!(o, Output::Decision { unit: u, .. } if *u == unit)
            })
            .await?;
        let Output::Decision { answer, .. } = out else {
            unreachable!("next returned a decision")
        };
        let observed = describe(&answer);
        let kind = credential_name(p.kind);
        j.say(&format!(
            "door     {door:<13} {}, {kind}: {observed}",
            p.who
        ));
        j.check(
            &format!("{} at {door}: {expected}", p.who),
            &observed,
            observed == expected,
        )
    }

    async fn tell(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        j.begin(1);
        self.sync_keys(j).await?;
        j.begin(2);
        self.courier_and_recurring(j).await?;
        j.begin(3);
        self.outage(j).await?;
        j.begin(4);
        self.revoke(j).await?;
        j.begin(5);
        self.call_and_battery(j).await
    }

    async fn sync_keys(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        let now = Timestamp::now();
        let keys = KeyFile::from_toml(&keys_file(&self.cloud.salt, now, &self.tz))
            .map_err(|e| format!("the cloud's keys file is refused: {e}"))?
            .keys;
        let c = &self.cloud;
        let snapshot = build::snapshot(&c.target, 1, now, &c.salt, &keys, &c.signer)
            .map_err(|e| format!("the cloud cannot build its snapshot: {e}"))?;
        for k in &keys {
            j.say(&format!("cloud    new key {}", describe_key(k, &self.tz)));
        }
        j.say(&format!(
            "cloud    publishes key set v1: {} keys, {} chunk, {} bytes, signed",
            keys.len(),
            snapshot.chunks.len(),
            snapshot.total_bytes()
        ));
        let sent = Instant::now();
        c.client
            .publish_snapshot(&c.topics, &snapshot)
            .await
            .map_err(|e| format!("publishing the snapshot: {e}"))?;
        let (at, (version, count)) = c
            .report("an applied report", |r| match r {
                Report::Applied { version, keys, .. } => Some((*version, *keys)),
                _ => None,
            })
            .await?;
        let count = count.unwrap_or_default();
        j.say(&format!(
            "gateway  applied v{version} with {count} keys, {} after the publish",
            ms(at - sent)
        ));
        j.check(
            "gateway reports applied v1, 6 keys",
            &format!("applied v{version}, {count} keys"),
            (version, count) == (1, 6),
        )?;
        let held = self.reader().key_set().map_err(|e| e.to_string())?;
        j.check(
            "its store holds v1, 6 keys",
            &format!("v{}, {} keys", held.version, held.keys),
            (held.version, held.keys) == (1, 6),
        )?;
        // Floors travel with every grant; the elevator's reader is the one that uses them.
        self.expect(j, MAIN, &ANN, "granted, floors [5]").await?;
        self.expect(j, ELEVATOR, &ANN, "granted, floors [5]")
            .await?;
        self.expect(j, MAIN, &VISITOR, "granted, floors [3, 4]")
            .await?;
        self.expect(j, MAIN, &VISITOR, "denied: used up").await?;
        self.expect(j, ELEVATOR, &VISITOR, "granted, floors [3, 4]")
            .await?;
        self.expect(j, MAIN, &BOB, "granted \"Welcome, Bob!\"")
            .await?;
        let (bus, lobby) = unit_of(LOBBY);
        self.next("the lobby door to be released", |b, o| {
            b == bus && matches!(o, Output::OpenDoor { unit, .. } if *unit == lobby)
        })
        .await?;
        j.say("door     lobby         released for Bob (key also opens the inner door)");
        j.check("Bob's key releases the lobby too", "lobby released", true)?;
        // The OSDP reader: Carol's card opens the side entrance, a stranger's does not.
        self.card(
            j,
            "Carol (resident)",
            "26:0a1b2c40",
            "granted, strike released",
        )
        .await?;
        self.card(j, "a stranger", "26:0fffffc0", "denied, red LED")
            .await
    }

    /// The next output of the OSDP reader `want` accepts, within [`WAIT`].
    async fn osdp_output(
        &mut self,
        what: &str,
        want: impl Fn(&doorbridge_sim::osdp::Output) -> bool,
    ) -> Result<doorbridge_sim::osdp::Output, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.osdp.outputs.recv()).await {
                Ok(Some(o)) if want(&o) => return Ok(o),
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("{what}: the OSDP reader stopped")),
                Err(_) => return Err(format!("{what}: not within {} s", WAIT.as_secs())),
            }
        }
    }

    /// `who` presents `card` at the OSDP reader; its decision must read `expected`.
    async fn card(
        &mut self,
        j: &mut Journal<'_>,
        who: &str,
        card: &str,
        expected: &str,
    ) -> Result<(), String> {
        use doorbridge_sim::osdp::{Output as ReaderOutput, ReaderCommand, ReaderInput};
        let input = ReaderInput::card(card)?;
        if !self.osdp.readers.send(ReaderCommand {
            unit: SIDE_READER,
            input,
        }) {
            return Err("the OSDP reader stopped".into());
        }
        let decision = self
            .osdp_output(&format!("a decision at {SIDE}"), |o| {
                matches!(
                    o,
                    ReaderOutput::Decision { .. } | ReaderOutput::GaveUp { .. }
                )
            })
            .await?;
        let observed = match decision {
            ReaderOutput::Decision {
                grant: true, after, ..
            } => format!("granted, strike released ({})", ms(after)),
            ReaderOutput::Decision { grant: false, .. } => "denied, red LED".to_owned(),
            _ => "no decision".to_owned(),
        };
        j.say(&format!(
            "door     {SIDE:<13} {who}, card {card} at the OSDP reader: {observed}"
        ));
        j.check(
            &format!("{who}'s card at {SIDE}: {expected}"),
            &observed,
            observed.starts_with(expected),
        )
    }

    async fn courier_and_recurring(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        self.expect(j, MAIN, &COURIER, "granted").await?;
        self.expect(j, MAIN, &COURIER, "denied: used up").await?;
        self.expect(j, MAIN, &CLEANER, "denied: outside schedule")
            .await
    }

    /// The highest record number the gateway ever gave (0 before the first).
    fn last_seq(&self) -> Option<u64> {
        self.reader()
            .last_seq()
            .ok()
            .and_then(|n| u64::try_from(n).ok())
    }

    fn depth(&self) -> Option<u64> {
        self.reader().outbox_depth().ok()
    }

    async fn outage(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        until("the outbox to drain", || (self.depth()? == 0).then_some(())).await?;
        j.say(&format!(
            "cloud    has {} records so far; the gateway's outbox is empty",
            self.cloud.heard(|h| h.ledger.unique())
        ));
        // Whatever is committed from now on cannot reach the broker before it is back.
        self.proxy.cut();
        let before = self.last_seq().unwrap_or_default();
        j.say("network  the broker goes away (proxy cut)");
        self.expect(j, MAIN, &ANN, "granted, floors [5]").await?;
        self.expect(j, GARAGE, &ANN, "granted, floors [5]").await?;
        self.expect(j, ELEVATOR, &VISITOR, "denied: used up")
            .await?;
        let (_, garage) = unit_of(GARAGE);
        self.command(
            GARAGE,
            SimCommand::Door {
                unit: garage,
                door: 0,
                event: DoorEventKind::Opened,
            },
        )
        .await?;
        j.say("door     garage        the gate opens (door event)");
        let queued: Vec<u64> = until("4 records in the outbox", || {
            let waiting = self
                .reader()
                .outbox(i64::try_from(before).ok()?, 100)
                .ok()?;
            let door_event = waiting
                .iter()
                .any(|r| matches!(r.record, Record::DoorEvent { .. }));
            (door_event && waiting.len() >= 4).then(|| {
                waiting
                    .iter()
                    .filter_map(|r| u64::try_from(r.seq).ok())
                    .collect()
            })
        })
        .await?;
        let depth = self.depth().unwrap_or_default();
        j.say(&format!(
            "gateway  outbox depth {depth}: the records wait on disk"
        ));
        let arrived = self
            .cloud
            .heard(|h| queued.iter().filter(|&&s| h.ledger.has(GATEWAY, s)).count());
        j.check(
            "offline: records queue up, none reach the cloud",
            &format!("outbox depth {depth}, {arrived} in the cloud"),
            depth >= 4 && arrived == 0,
        )?;
        self.proxy.restore();
        let back = Instant::now();
        j.say("network  the broker is back (proxy restored)");
        self.drained(j, &queued, back).await
    }

    /// Waits until the outbox is empty and the cloud has every record the gateway made.
    async fn drained(
        &mut self,
        j: &mut Journal<'_>,
        queued: &[u64],
        back: Instant,
    ) -> Result<(), String> {
        let state = || {
            let depth = self.depth()?;
            let last = self.last_seq()?;
            let (unique, gaps, missing) = self.cloud.heard(|h| {
                let missing = queued
                    .iter()
                    .filter(|&&s| !h.ledger.has(GATEWAY, s))
                    .count();
                (h.ledger.unique(), h.ledger.gaps().len(), missing)
            });
            Some((depth, last, unique, gaps, missing))
        };
        let drained = until("the outbox to drain into the cloud", || {
            state().filter(|&(depth, last, unique, gaps, missing)| {
                depth == 0 && unique == last && gaps == 0 && missing == 0
            })
        })
        .await;
        let (depth, last, unique, gaps, missing) = match drained {
            Ok(s) => s,
            Err(_) => state().unwrap_or_default(),
        };
        j.say(&format!(
            "gateway  outbox depth {depth}, {} after the broker came back",
            ms(back.elapsed())
        ));
        let (summary, garbled) = self.cloud.heard(|h| (h.ledger.summary(), h.garbled.len()));
        j.say(&format!("cloud    {summary}"));
        j.check(
            "back online: the queue drains",
            &format!("outbox depth {depth}"),
            depth == 0,
        )?;
        j.check(
            "the cloud has every record, no gaps",
            &format!("{unique} of {last}, {gaps} gaps, {missing} queued missing"),
            unique == last && gaps == 0 && missing == 0,
        )?;
        j.check(
            "every message decodes",
            &format!("{garbled} undecodable"),
            garbled == 0,
        )
    }

    async fn revoke(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        let c = &self.cloud;
        let delta = build::delta(
            &c.target,
            1,
            2,
            Timestamp::now(),
            &[],
            &[BOB.key.to_owned()],
            &c.signer,
        )
        .map_err(|e| format!("the cloud cannot build its delta: {e}"))?;
        j.say(&format!(
            "cloud    deletes Bob's key: delta v1 -> v2 revoking {}",
            BOB.key
        ));
        let sent = Instant::now();
        c.client
            .publish_delta(&c.topics, delta)
            .await
            .map_err(|e| format!("publishing the delta: {e}"))?;
        let (at, ()) = c
            .report("applied v2", |r| {
                matches!(r, Report::Applied { version: 2, .. }).then_some(())
            })
            .await?;
        j.say(&format!(
            "gateway  applied v2, {} after the publish",
            ms(at - sent)
        ));
        let held = self.reader().key_set().map_err(|e| e.to_string())?;
        let revoked = self
            .reader()
            .key(BOB.key)
            .map_err(|e| e.to_string())?
            .is_some_and(|k| k.revoked);
        j.check(
            "gateway applies v2: Bob's key revoked",
            &format!("holds v{}, revoked {revoked}", held.version),
            held.version == 2 && revoked,
        )?;
        self.expect(j, MAIN, &BOB, &format!("denied: {}", DenyReason::Revoked))
            .await
    }

    async fn call_and_battery(&mut self, j: &mut Journal<'_>) -> Result<(), String> {
        let (_, main) = unit_of(MAIN);
        let pressed = Instant::now();
        self.command(
            MAIN,
            SimCommand::Call {
                unit: main,
                button: 0,
            },
        )
        .await?;
        j.say("door     main-entrance someone presses the call button");
        let (at, ()) = self
            .cloud
            .record("the call_button record", |r| {
                matches!(r, Record::CallButton { door, .. } if door == MAIN).then_some(())
            })
            .await?;
        let latency = at - pressed;
        j.say(&format!(
            "cloud    call_button from main-entrance, {} after the press",
            ms(latency)
        ));
        j.check(
            "the call reaches the cloud",
            &format!("call_button in {}", ms(latency)),
            true,
        )?;

        let (_, elevator) = unit_of(ELEVATOR);
        self.command(
            ELEVATOR,
            SimCommand::Battery {
                unit: elevator,
                percent: 12,
                millivolts: 3410,
            },
        )
        .await?;
        j.say("door     elevator      battery reading 12 % (3410 mV)");
        let (_, low) = self
            .cloud
            .record("the battery record", |r| match r {
                Record::Battery { door, low, .. } if door == ELEVATOR => Some(*low),
                _ => None,
            })
            .await?;
        j.say(&format!(
            "cloud    battery record from elevator: 12 %, low = {low}"
        ));
        j.check(
            "a low-battery alarm record",
            &format!("battery low={low}"),
            low,
        )?;
        let (_, unit) = self
            .cloud
            .report(
                "a telemetry summary with the elevator's battery",
                |r| match r {
                    Report::Telemetry(s) => elevator_battery(s).filter(|u| u.0 == 12),
                    _ => None,
                },
            )
            .await?;
        j.say(&format!(
            "cloud    telemetry summary: elevator {} %, {} mV, battery_low = {}",
            unit.0, unit.1, unit.2
        ));
        j.check(
            "telemetry shows battery_low",
            &format!("elevator {} %, battery_low={}", unit.0, unit.2),
            unit.2,
        )
    }

    /// Stops the gateway (doors first, then the link, then the store), then the units and
    /// the cloud; returns how long the gateway took.
    async fn stop(self) -> Result<Duration, String> {
        let World {
            daemon: (stop, task),
            buses,
            osdp,
            cloud,
            ..
        } = self;
        let asked = Instant::now();
        let _ = stop.send(());
        let stopped = match tokio::time::timeout(WAIT, task).await {
            Ok(Ok(Ok(()))) => Ok(asked.elapsed()),
            Ok(Ok(Err(e))) => Err(format!("the gateway failed: {e}")),
            Ok(Err(e)) => Err(format!("the gateway task failed: {e}")),
            Err(_) => Err(format!(
                "the gateway did not stop within {} s",
                WAIT.as_secs()
            )),
        };
        for bus in buses {
            let _ = bus.stop.send(());
            let _ = tokio::time::timeout(WAIT, bus.task).await;
        }
        let _ = tokio::task::spawn_blocking(move || osdp.readers.stop()).await;
        cloud.listener.abort();
        let _ = cloud.client.disconnect().await;
        stopped
    }
}

/// The elevator unit's battery in a telemetry summary: percent, millivolts, low.
fn elevator_battery(s: &Summary) -> Option<(u8, u16, bool)> {
    let unit = s
        .buses
        .iter()
        .flat_map(|b| &b.units)
        .find(|u| u.door == ELEVATOR)?;
    Some((
        unit.battery_percent?,
        unit.battery_millivolts?,
        unit.battery_low,
    ))
}
