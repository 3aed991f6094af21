//! The `cloud-sim` binary and the reference cloud client: keygen and build make a bundle the
//! gateway's decoders accept, bad keys files fail naming the field, and a published snapshot
//! arrives on the gateway's topics through a real (in-process) MQTT broker. `records` rides out
//! a cut between it and the broker (rumqttd and mosquitto), loses nothing when killed and
//! started again under its client id, and two `records --share` consumers split a fleet's
//! records (mosquitto and rumqttd). Every wait is for a condition, with a deadline.
//!
//! Finding (rumqttd 0.20): it takes `$share/GROUP/...` from MQTT 3.1.1 clients, but when the
//! last connected member of a group holds a persistent session and its connection drops with
//! messages unacknowledged, its router thread panics ("group must exists",
//! `router/routing.rs:512`) and the broker stops serving; so the shared-group cut test runs on
//! mosquitto only.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{Category, StaleLimits};
use doorbridge::bus::message::DoorEventKind;
use doorbridge::cloud::bundle::Bundle;
use doorbridge::cloud::envelope::{Kind, open};
use doorbridge::cloud::payload::{
    Chunk, Delegation, DelegationRevoke, Delta, Heartbeat, MAX_ENVELOPE_BYTES, Manifest, Target,
};
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::sync::{Action, Sync};
use doorbridge::cloud::topics::{Channel, Topics};
use doorbridge::cloud::uplink::BatchWriter;
use doorbridge::store::Record;
use doorbridge_sim::cloud::{CloudClient, Message};
use doorbridge_sim::keyfile::{KeyFile, parse_hex};
use ed25519_dalek::VerifyingKey;
use jiff::Timestamp;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::broker::{Proxy, RumqttdBroker, mosquitto_or_skip, wait_for};
use crate::util::{Outcome, run};

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
const WITHIN: Duration = Duration::from_secs(20);

fn cloud_sim() -> Command {
    Command::new(doorbridge_testkit::binary("cloud-sim"))
}

fn example_keys() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/keys.example.toml")
}

fn target() -> Target {
    Target {
        site: "s1".into(),
        gateway: "gw1".into(),
    }
}

/// `cloud-sim keygen --out DIR/keys`; the public key it wrote.
fn keygen(dir: &Path) -> VerifyingKey {
    let out = run(
        &mut cloud_sim(),
        ["keygen", "--out"]
            .map(Into::into)
            .into_iter()
            .chain([dir.join("keys").into_os_string()]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let public = std::fs::read_to_string(dir.join("keys/signing.pub")).unwrap();
    assert!(
        out.stdout
            .contains(&format!("trusted_keys = [\"{}\"]", public.trim())),
        "{out:?}"
    );
    let bytes: [u8; 32] = parse_hex(public.trim()).unwrap().try_into().unwrap();
    VerifyingKey::from_bytes(&bytes).unwrap()
}

fn signing_key(dir: &Path) -> String {
    dir.join("keys/signing.key").display().to_string()
}

fn build(dir: &Path, keys: &Path, out: &Path) -> Outcome {
    run(
        &mut cloud_sim(),
        [
            "build",
            "--signing-key",
            &signing_key(dir),
            "--keys",
            &keys.display().to_string(),
            "--site",
            "s1",
            "--gateway",
            "gw1",
            "--version",
            "3",
            "--issued-at",
            "2026-01-01T00:00:00Z",
            "--out",
            &out.display().to_string(),
        ],
    )
}

#[test]
fn keygen_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let mode = std::fs::metadata(dir.path().join("keys/signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = run(
        &mut cloud_sim(),
        [
            "keygen".into(),
            "--out".into(),
            dir.path().join("keys").into_os_string(),
        ],
    );
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(again.stderr.contains("not replacing"), "{again:?}");
}

#[test]
fn a_built_bundle_opens_with_the_generated_key_and_installs() {
    let dir = tempfile::tempdir().unwrap();
    let public = keygen(dir.path());
    let out_path = dir.path().join("keys.dbk");
    let out = build(dir.path(), &example_keys(), &out_path);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("8 keys, 1 chunks"), "{out:?}");

    let bundle = Bundle::read(&out_path).unwrap();
    let opened = open(&bundle.manifest, &[public], MAX_ENVELOPE_BYTES).unwrap();
    assert_eq!(opened.kind, Kind::Manifest);
    let manifest = Manifest::decode(&opened.body).unwrap();
    assert_eq!((manifest.version, manifest.key_count), (3, 8));
    let file = KeyFile::read(&example_keys()).unwrap();
    assert_eq!(manifest.salt, file.salt);
    assert_eq!(Chunk::decode(&bundle.chunks[0]).unwrap().keys, file.keys);

    // The gateway's state machine takes it as it would from MQTT.
    let now = Timestamp::now();
    let mut sync = Sync::new(target(), 0);
    let mut actions = sync.on_manifest(manifest, now);
    for chunk in &bundle.chunks {
        actions.extend(sync.on_chunk(chunk, now));
    }
    assert!(
        actions.contains(&Action::Commit {
            version: 3,
            key_count: 8
        }),
        "{actions:?}"
    );
}

#[test]
fn a_bad_keys_file_fails_naming_the_key_and_field() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let keys = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example_keys())
        .unwrap()
        .replace("uses = 1 }", "uses = 0 }");
    std::fs::write(&keys, text).unwrap();
    let out_path = dir.path().join("never.dbk");
    let out = build(dir.path(), &keys, &out_path);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(
            "keys[1] (id \"courier-dhl-0412\"), field `use_limit.uses`: must be at least 1"
        ),
        "{out:?}"
    );
    assert!(!out_path.exists());

    std::fs::write(&keys, "salt = \"00\"\nsite = \"s1\"\n").unwrap();
    let out = build(dir.path(), &keys, &out_path);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("site"), "{out:?}");

    let json = dir.path().join("bad.json");
    std::fs::write(
        &json,
        r#"{"salt": "", "keys": [{"id": "k1", "name": "A", "doors": ["main"], "colour": "red", "credentials": []}]}"#,
    )
    .unwrap();
    let out = build(dir.path(), &json, &out_path);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("keys[0] (id \"k1\"), field `colour`"),
        "{out:?}"
    );
}

#[test]
fn help_explains_every_subcommand() {
    let out = run(&mut cloud_sim(), ["--help"]);
    assert_eq!(out.code, Some(0));
    for sub in [
        "keygen",
        "build",
        "publish",
        "heartbeat",
        "open-door",
        "resync",
        "delegate",
        "revoke-delegation",
        "watch",
    ] {
        assert!(
            out.stdout.contains(sub),
            "{sub} missing from {}",
            out.stdout
        );
    }
    let out = run(&mut cloud_sim(), ["publish", "--url"]);
    assert_eq!(out.code, Some(2), "{out:?}");
}

/// A free port: bound on 127.0.0.1:0, then released for the broker.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts an in-process rumqttd broker on a free port and waits until it accepts
/// connections. The broker thread runs until the test process ends.
fn start_broker() -> SocketAddr {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = ServerSettings {
        name: "v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 2 * MAX_ENVELOPE_BYTES,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::spawn(move || {
        let _ = Broker::new(config).start();
    });
    let deadline = Instant::now() + WITHIN;
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the broker did not start listening"
        );
        std::thread::yield_now();
    }
    addr
}

async fn next(rx: &mut UnboundedReceiver<Message>) -> Message {
    tokio::time::timeout(WITHIN, rx.recv())
        .await
        .expect("a message within the deadline")
        .expect("the subscription is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_snapshots_and_commands_arrive_on_the_gateway_topics() {
    let addr = start_broker();
    let url = format!("mqtt://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let public = keygen(dir.path());
    let topics = Topics::new("doorbridge", &target()).unwrap();

    let gateway = CloudClient::connect(&url, "test-gateway").await.unwrap();
    let mut manifests = gateway
        .subscribe(&topics.topic(Channel::Manifest))
        .await
        .unwrap();
    let mut chunks = gateway
        .subscribe(&topics.topic(Channel::Chunk))
        .await
        .unwrap();
    let mut commands = gateway.subscribe("doorbridge/s1/gw1/cmd/+").await.unwrap();

    let conn = |extra: &[&str]| extra.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let common = [
        "--url",
        &url,
        "--site",
        "s1",
        "--gateway",
        "gw1",
        "--signing-key",
        &signing_key(dir.path()),
    ]
    .map(str::to_owned);
    let mut args = vec!["publish".to_owned()];
    args.extend(common.iter().cloned());
    args.extend(conn(&[
        "snapshot",
        "--keys",
        &example_keys().display().to_string(),
        "--version",
        "5",
    ]));
    let out = tokio::task::spawn_blocking(move || run(&mut cloud_sim(), args))
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");

    let (topic, manifest) = next(&mut manifests).await;
    assert_eq!(topic, "doorbridge/s1/gw1/keys/manifest");
    let opened = open(&manifest, &[public], MAX_ENVELOPE_BYTES).unwrap();
    let manifest = Manifest::decode(&opened.body).unwrap();
    assert_eq!((manifest.version, manifest.chunk_count), (5, 1));
    let (_, chunk) = next(&mut chunks).await;
    let mut sync = Sync::new(target(), 0);
    let now = Timestamp::now();
    let mut actions = sync.on_manifest(manifest, now);
    actions.extend(sync.on_chunk(&chunk, now));
    assert!(
        actions.contains(&Action::Commit {
            version: 5,
            key_count: 8
        }),
        "{actions:?}"
    );

    let mut args = vec!["open-door".to_owned()];
    args.extend(common.iter().cloned());
    args.extend(conn(&[
        "--door",
        "main",
        "--key-id",
        "owner-ann",
        "--command-id",
        "c1",
    ]));
    let out = tokio::task::spawn_blocking(move || run(&mut cloud_sim(), args))
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let (topic, command) = next(&mut commands).await;
    assert_eq!(topic, "doorbridge/s1/gw1/cmd/open-door");
    assert_eq!(
        open(&command, &[public], MAX_ENVELOPE_BYTES).unwrap().kind,
        Kind::OpenDoor
    );

    gateway.disconnect().await.unwrap();
}

/// `cloud-sim COMMAND --url … --site s1 --gateway gw1 --signing-key … REST`, where `words`
/// is `COMMAND REST` split at spaces, run to completion off the async workers.
async fn cloud_sim_for_gw1(url: &str, dir: &Path, words: String) -> Outcome {
    let mut words = words
        .split(' ')
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter();
    let mut args: Vec<String> = words.next().into_iter().collect();
    let key = signing_key(dir);
    let conn = [
        "--url",
        url,
        "--site",
        "s1",
        "--gateway",
        "gw1",
        "--signing-key",
        &key,
    ];
    args.extend(conn.map(str::to_owned));
    args.extend(words);
    tokio::task::spawn_blocking(move || run(&mut cloud_sim(), args))
        .await
        .unwrap()
}

/// A key set's `stale_after` goes out with its snapshot and deltas, and `heartbeat` sends
/// signed heartbeats naming the version, one per `--every`, each signed when sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_stale_after_go_out_signed() {
    let addr = start_broker();
    let url = format!("mqtt://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let public = keygen(dir.path());
    let topics = Topics::new("doorbridge", &target()).unwrap();
    let gateway = CloudClient::connect(&url, "test-gateway").await.unwrap();
    let mut key_sets = gateway.subscribe("doorbridge/s1/gw1/keys/+").await.unwrap();
    let sim = |words: String| cloud_sim_for_gw1(&url, dir.path(), words);
    let opened = |bytes: &[u8], kind| {
        let o = open(bytes, &[public], MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(o.kind, kind);
        o.body
    };
    let keys = example_keys().display().to_string();
    let out = sim(format!(
        "publish snapshot --keys {keys} --version 5 --stale-after delivery=24h,event=12h"
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let (_, manifest) = next(&mut key_sets).await;
    let manifest = Manifest::decode(&opened(&manifest, Kind::Manifest)).unwrap();
    let limits =
        StaleLimits::new([(Category::Delivery, 86_400), (Category::Event, 43_200)]).unwrap();
    assert_eq!(manifest.stale_after, Some(limits));
    let _chunk = next(&mut key_sets).await;

    let out = sim("publish delta --from 5 --version 6 --stale-after off".into()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let (_, delta) = next(&mut key_sets).await;
    let delta = Delta::decode(&opened(&delta, Kind::Delta)).unwrap();
    assert_eq!(delta.stale_after, Some(StaleLimits::default()), "off");
    // Residents' keys never go stale: refused before anything is sent.
    let out = sim("publish delta --from 6 --version 7 --stale-after friend=1h".into()).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("residents"), "{out:?}");

    let out = sim("heartbeat --version 6 --every 50ms --count 3".into()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 3, "{out:?}");
    let mut times = Vec::new();
    for _ in 0..3 {
        let (topic, beat) = next(&mut key_sets).await;
        assert_eq!(topic, topics.topic(Channel::Heartbeat));
        let beat = Heartbeat::decode(&opened(&beat, Kind::Heartbeat)).unwrap();
        assert_eq!((beat.target, beat.version), (target(), 6));
        times.push(beat.issued_at);
    }
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "each signed when sent: {times:?}"
    );
    gateway.disconnect().await.unwrap();
}

/// `delegate` and `revoke-delegation` go out on keys/delta signed by the root key; a delta
/// published with the delegate's key is signed by that key (docs/cloud-protocol.md §5.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_and_a_delegates_delta_go_out_signed_by_their_keys() {
    let addr = start_broker();
    let url = format!("mqtt://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let root = keygen(dir.path());
    let admin_dir = dir.path().join("admin");
    let admin = keygen(&admin_dir);
    let gateway = CloudClient::connect(&url, "test-gateway").await.unwrap();
    let mut deltas = gateway
        .subscribe("doorbridge/s1/gw1/keys/delta")
        .await
        .unwrap();
    let sim = |words: String| cloud_sim_for_gw1(&url, dir.path(), words);
    let opened = |bytes: &[u8], key: VerifyingKey, kind| {
        let o = open(bytes, &[key], MAX_ENVELOPE_BYTES).unwrap();
        assert_eq!(o.kind, kind);
        o.body
    };
    let public = admin_dir.join("keys/signing.pub").display().to_string();
    let out = sim(format!(
        "delegate --id garage-admin --delegate {public} --door garage --until 2099-01-01T00:00:00Z"
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let (_, bytes) = next(&mut deltas).await;
    let d = Delegation::decode(&opened(&bytes, root, Kind::Delegation)).unwrap();
    assert_eq!(d.id, "garage-admin");
    assert_eq!(d.public_key, admin.as_bytes().to_vec());
    assert_eq!(d.doors, vec!["garage".to_owned()]);

    let args = [
        "publish",
        "--url",
        &url,
        "--site",
        "s1",
        "--gateway",
        "gw1",
        "--signing-key",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([signing_key(&admin_dir)])
    .chain(["delta", "--from", "1", "--version", "2", "--delete", "g1"].map(str::to_owned))
    .collect::<Vec<_>>();
    let out = tokio::task::spawn_blocking(move || run(&mut cloud_sim(), args))
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let (_, bytes) = next(&mut deltas).await;
    assert!(
        open(&bytes, &[root], MAX_ENVELOPE_BYTES).is_err(),
        "not the root's"
    );
    let delta = Delta::decode(&opened(&bytes, admin, Kind::Delta)).unwrap();
    assert_eq!(delta.deletes, vec!["g1".to_owned()]);

    let out = sim("revoke-delegation --id garage-admin".into()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let (_, bytes) = next(&mut deltas).await;
    let r = DelegationRevoke::decode(&opened(&bytes, root, Kind::DelegationRevoke)).unwrap();
    assert_eq!(r.id, "garage-admin");
    // No door, no delegation: there is no "all doors" for a delegate.
    let out = sim(format!(
        "delegate --id all --delegate {public} --until 2099-01-01T00:00:00Z"
    ))
    .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    gateway.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_gateway_reports_as_json_lines() {
    let addr = start_broker();
    let url = format!("mqtt://{addr}");
    let mut watch = cloud_sim()
        .args(["watch", "--url", &url, "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut stdout = watch.stdout.take().unwrap();
    // watch says so on stderr once the broker has acknowledged its subscriptions.
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(WITHIN, ready).await.unwrap().unwrap();
    assert!(line.contains("watching"), "{line}");

    let gateway = CloudClient::connect(&url, "test-gateway").await.unwrap();
    let topics = Topics::new("doorbridge", &target()).unwrap();
    let report = Report::State {
        state: Presence::Online,
        gateway: "gw1".into(),
        held: Some(5),
        identity: None,
    };
    gateway
        .publish(&topics.topic(Channel::State), report.encode(), true)
        .await
        .unwrap();
    gateway
        .publish(&topics.topic(Channel::Sync), vec![0xff], false)
        .await
        .unwrap();
    let printed = tokio::time::timeout(
        WITHIN,
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).unwrap();
            (s, watch.wait().unwrap())
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let (printed, status) = printed;
    assert!(status.success(), "{status:?}");
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert_eq!(lines[0]["channel"], "state");
    assert_eq!(lines[0]["site"], "s1");
    assert_eq!(lines[0]["gateway"], "gw1");
    assert_eq!(lines[0]["report"]["type"], "state");
    assert_eq!(lines[0]["report"]["held"], 5);
    assert_eq!(lines[1]["channel"], "sync");
    assert_eq!(lines[1]["report"]["undecodable"], "ff");
    gateway.disconnect().await.unwrap();
}

/// A gateway configuration for `s1/gw1` trusting `public`, its store at `db`.
fn gateway_config(dir: &Path, public: &VerifyingKey, db: &Path) -> PathBuf {
    let path = dir.join("doorbridge.toml");
    let text = format!(
        "[gateway]\nid = \"gw1\"\nsite_id = \"s1\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"mqtt://127.0.0.1:1\"\ntrusted_keys = [\"{}\"]\n[storage]\npath = \"{}\"\n\
         [[buses]]\nname = \"b\"\nport = \"/dev/null\"\n\
         [[buses.units]]\naddress = 1\ndoor = \"main\"\n",
        doorbridge_sim::cloud::hex(public.as_bytes()),
        db.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn import(config: &Path, bundle: &Path) -> Outcome {
    run(
        &mut crate::util::doorbridge(),
        [
            "--config".into(),
            config.as_os_str().to_owned(),
            "keys".into(),
            "import".into(),
            bundle.as_os_str().to_owned(),
        ],
    )
}

#[test]
fn doorbridge_keys_import_installs_a_cloud_sim_bundle_once_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let public = keygen(dir.path());
    let bundle = dir.path().join("keys.dbk");
    assert_eq!(build(dir.path(), &example_keys(), &bundle).code, Some(0));
    let db = dir.path().join("doorbridge.db");
    let config = gateway_config(dir.path(), &public, &db);

    // Tampered: one byte of the file changed.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    let tampered = dir.path().join("tampered.dbk");
    std::fs::write(&tampered, bytes).unwrap();
    let out = import(&config, &tampered);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("was not imported"), "{out:?}");

    let out = import(&config, &bundle);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("imported key set version 3 (8 keys in 1 chunks)"),
        "{out:?}"
    );
    let reader = doorbridge::store::Reader::open(&db).unwrap();
    assert_eq!(reader.key_set().unwrap().version, 3);
    let file = KeyFile::read(&example_keys()).unwrap();
    let pin = doorbridge::access::credential::digest(
        &file.salt,
        doorbridge::access::CredentialKind::Pin,
        b"482916",
    );
    assert_eq!(
        reader.key_by_digest(&pin.0).unwrap().map(|k| k.id),
        Some("owner-ann".into())
    );

    // The same file again: not newer than what is held.
    let out = import(&config, &bundle);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not newer"), "{out:?}");

    // While something holds the store (the running service), an import is turned away.
    let options = doorbridge::store::StoreOptions::new(
        &db,
        doorbridge::store::DecisionContext::new(crate::fixtures::site()),
    );
    let held = doorbridge::store::Store::open(options).unwrap();
    let out = import(&config, &bundle);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("stop it first"), "{out:?}");
    held.close();
}

// ---------------------------------------------------------------------------------------------
// cloud-sim records through broker outages, and in shared-subscription groups
// ---------------------------------------------------------------------------------------------

/// A running `cloud-sim records`: its output lines as they come (a thread per pipe).
struct RecordsRun {
    child: std::process::Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Reads `from` line by line into a shared list, in a thread that ends at its end of file.
fn collect_lines(
    from: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&lines);
    let thread = std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    });
    (lines, thread)
}

impl RecordsRun {
    /// Starts `cloud-sim records --url URL ARGS…` and returns once it has subscribed.
    async fn start(url: &str, args: &[&str]) -> RecordsRun {
        let mut child = cloud_sim()
            .args(["records", "--url", url])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cloud-sim records");
        let (stdout, out_thread) = collect_lines(child.stdout.take().expect("piped"));
        let (stderr, err_thread) = collect_lines(child.stderr.take().expect("piped"));
        let run = RecordsRun {
            child,
            stdout,
            stderr,
            readers: vec![out_thread, err_thread],
        };
        run.wait_stderr("receiving records on").await;
        run
    }

    /// Waits until a line on stderr contains `text`.
    async fn wait_stderr(&self, text: &str) {
        wait_for(
            WITHIN,
            &format!("cloud-sim records saying {text:?}"),
            || {
                let lines = self.stderr.lock().unwrap();
                lines.iter().any(|l| l.contains(text)).then_some(())
            },
        )
        .await;
    }

    /// `(gateway, seq)` of every line printed so far.
    fn printed(&self) -> Vec<(String, u64)> {
        ids(&self.stdout.lock().unwrap())
    }

    /// Asks it to stop as Ctrl-C does.
    fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT cloud-sim");
    }

    /// Waits for it to exit; its status, stdout and stderr.
    async fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        let status = wait_for(WITHIN, "cloud-sim records to exit", || {
            self.child.try_wait().expect("wait for cloud-sim")
        })
        .await;
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().join("\n");
        (status, stdout, stderr)
    }
}

impl Drop for RecordsRun {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The epoch of the gateways played here (any fixed value: one database each).
const EPOCH: u64 = 1_767_225_600_000_000;

/// Publishes `seqs` of gateway `gateway` as a gateway uploads them (protocol §12.2: batches
/// of `per_batch` door events, `QoS` 1), each batch acknowledged by the broker before the next.
async fn upload(
    cloud: &CloudClient,
    gateway: &str,
    seqs: std::ops::RangeInclusive<u64>,
    per_batch: usize,
) {
    let topic = Topics::new(
        "doorbridge",
        &Target {
            site: "s1".into(),
            gateway: gateway.into(),
        },
    )
    .unwrap()
    .topic(Channel::Records);
    let seqs: Vec<u64> = seqs.collect();
    for chunk in seqs.chunks(per_batch) {
        let mut batch = BatchWriter::new(1 << 20);
        for &seq in chunk {
            let record = Record::DoorEvent {
                at: Timestamp::from_second(1_767_225_600 + i64::try_from(seq).unwrap()).unwrap(),
                unit: "entrance/1".into(),
                door: "main".into(),
                event: DoorEventKind::Opened,
            };
            assert!(batch.push(
                i64::try_from(seq).unwrap(),
                record.class(),
                &record.to_cbor()
            ));
        }
        cloud
            .publish(&topic, batch.finish(gateway, "s1", EPOCH), false)
            .await
            .unwrap();
    }
}

/// `(gateway, seq)` of each JSON line `records` printed.
fn ids(lines: &[String]) -> Vec<(String, u64)> {
    lines
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(v["epoch"], EPOCH, "{line}");
            (
                v["gateway"].as_str().expect("a gateway").to_owned(),
                v["seq"].as_u64().expect("a seq"),
            )
        })
        .collect()
}

/// Every `(gateway, seq)` in `printed`, failing on one printed twice.
fn once_each(printed: &[(String, u64)]) -> BTreeSet<(String, u64)> {
    let mut seen = BTreeSet::new();
    for id in printed {
        assert!(seen.insert(id.clone()), "{id:?} printed twice");
    }
    seen
}

/// `(gateway, seq)` for `seqs` of each of `gateways`.
fn expected(gateways: &[&str], seqs: std::ops::RangeInclusive<u64>) -> BTreeSet<(String, u64)> {
    gateways
        .iter()
        .flat_map(|g| seqs.clone().map(move |s| ((*g).to_owned(), s)))
        .collect()
}

/// `records` behind a proxy that cuts it off from the broker mid-stream: batches in flight at
/// the cut, published during it and after it all arrive, each record printed once.
async fn records_through_a_cut(broker_url: &str, broker_port: u16, extra: &[&str]) {
    const PER_PHASE: u64 = 1_000;
    let proxy = Proxy::start(broker_port);
    let total = 3 * PER_PHASE;
    let count = total.to_string();
    let args: Vec<&str> = ["--count", &count]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let records = RecordsRun::start(&proxy.url(), &args).await;
    let gateway = CloudClient::connect(broker_url, "gateway-gw1")
        .await
        .unwrap();

    // Uploaded while connected, then cut at once: some batches are still on their way to the
    // consumer, or printed and not yet acknowledged.
    upload(&gateway, "gw1", 1..=PER_PHASE, 10).await;
    proxy.cut();
    let at_cut = records.printed().len();
    records.wait_stderr("lost the broker").await;
    // Uploaded while the consumer is away: the broker queues them in its session.
    upload(&gateway, "gw1", PER_PHASE + 1..=2 * PER_PHASE, 10).await;
    proxy.restore();
    records.wait_stderr("regained the broker").await;
    upload(&gateway, "gw1", 2 * PER_PHASE + 1..=total, 10).await;

    let (status, stdout, stderr) = records.finish().await;
    assert!(status.success(), "{status:?}: {stderr}");
    assert_eq!(
        once_each(&ids(&stdout)),
        expected(&["gw1"], 1..=total),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{total} records from 1 gateway(s)")),
        "{stderr}"
    );
    // Alone in its group it received everything, but a member never claims to know that.
    let verdict = if extra.contains(&"--share") {
        "this consumer's share of group"
    } else {
        "no gaps"
    };
    assert!(stderr.contains(verdict), "{stderr}");
    eprintln!("{at_cut} of {total} records printed when the link was cut; {stderr}");
    gateway.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_rides_out_a_broker_outage_rumqttd() {
    let broker = RumqttdBroker::start();
    records_through_a_cut(&broker.url(), broker.port, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_rides_out_a_broker_outage_mosquitto() {
    let Some(broker) = mosquitto_or_skip("records_rides_out_a_broker_outage_mosquitto") else {
        return;
    };
    records_through_a_cut(&broker.url(), broker.port(), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_in_a_shared_group_rides_out_a_broker_outage_mosquitto() {
    let Some(broker) =
        mosquitto_or_skip("records_in_a_shared_group_rides_out_a_broker_outage_mosquitto")
    else {
        return;
    };
    records_through_a_cut(&broker.url(), broker.port(), &["--share", "fleet"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_killed_and_restarted_under_its_client_id_loses_nothing_mosquitto() {
    const N: u64 = 5_000;
    let Some(broker) = mosquitto_or_skip(
        "records_killed_and_restarted_under_its_client_id_loses_nothing_mosquitto",
    ) else {
        return;
    };
    let url = broker.url();
    let args = ["--client-id", "cloud-consumer"];
    let mut first = RecordsRun::start(&url, &args).await;
    let gateway = CloudClient::connect(&url, "gateway-gw1").await.unwrap();
    let uploading = tokio::spawn(async move {
        upload(&gateway, "gw1", 1..=N, 10).await;
        gateway
    });
    wait_for(WITHIN, "the first run printing records", || {
        (first.printed().len() >= 1_000).then_some(())
    })
    .await;
    // Killed mid-stream: no goodbye to the broker; its session stays.
    first.child.kill().unwrap();
    let (_, out_first, _) = first.finish().await;
    let gateway = uploading.await.unwrap();

    let second = RecordsRun::start(&url, &args).await;
    let first_ids = once_each(&ids(&out_first));
    let all = expected(&["gw1"], 1..=N);
    wait_for(
        WITHIN,
        "every record printed by one of the two runs",
        || {
            let printed: BTreeSet<_> = first_ids.iter().cloned().chain(second.printed()).collect();
            (printed == all).then_some(())
        },
    )
    .await;
    second.interrupt();
    let (status, out_second, err_second) = second.finish().await;
    assert!(status.success(), "{status:?}: {err_second}");
    let second_ids = once_each(&ids(&out_second));
    // At least once: what the first printed but had not acknowledged comes again.
    let again = first_ids.intersection(&second_ids).count();
    eprintln!(
        "killed after {} records; the second run printed {} ({again} of them again)",
        first_ids.len(),
        second_ids.len()
    );
    gateway.disconnect().await.unwrap();
}

/// Two `records --share` consumers in one group on `url`: between them every record of two
/// gateways once, none printed by both, each some; `check` over both outputs finds no gap.
async fn two_consumers_split_the_records(url: &str) {
    const PER_GATEWAY: u64 = 1_000;
    let a = RecordsRun::start(url, &["--share", "fleet"]).await;
    let b = RecordsRun::start(url, &["--share", "fleet"]).await;
    let cloud = CloudClient::connect(url, "gateways").await.unwrap();
    upload(&cloud, "gw1", 1..=PER_GATEWAY, 10).await;
    upload(&cloud, "gw2", 1..=PER_GATEWAY, 10).await;
    let all = expected(&["gw1", "gw2"], 1..=PER_GATEWAY);
    wait_for(WITHIN, "every record printed by one of the two", || {
        let printed: BTreeSet<_> = a.printed().into_iter().chain(b.printed()).collect();
        (printed == all).then_some(())
    })
    .await;
    a.interrupt();
    b.interrupt();
    let (status_a, out_a, err_a) = a.finish().await;
    let (status_b, out_b, err_b) = b.finish().await;
    assert!(status_a.success(), "{status_a:?}: {err_a}");
    assert!(status_b.success(), "{status_b:?}: {err_b}");

    let (got_a, got_b) = (once_each(&ids(&out_a)), once_each(&ids(&out_b)));
    assert!(
        got_a.is_disjoint(&got_b),
        "printed by both: {:?}",
        got_a.intersection(&got_b).take(5).collect::<Vec<_>>()
    );
    assert_eq!(got_a.union(&got_b).cloned().collect::<BTreeSet<_>>(), all);
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "{} and {}",
        got_a.len(),
        got_b.len()
    );
    // Each says what it received, and claims no gap that is the other's share.
    for (got, err) in [(&got_a, &err_a), (&got_b, &err_b)] {
        assert!(
            err.contains(&format!(
                "{} records from 2 gateway(s), 0 duplicates (this consumer's share of group fleet",
                got.len()
            )),
            "{err}"
        );
        assert!(
            !err.contains("missing:") && !err.contains("no gaps"),
            "{err}"
        );
    }
    eprintln!("shared group: {} and {} records", got_a.len(), got_b.len());

    // The merged output, judged as a whole.
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged.jsonl");
    std::fs::write(
        &merged,
        format!("{}\n{}\n", out_a.join("\n"), out_b.join("\n")),
    )
    .unwrap();
    let out = run(&mut cloud_sim(), ["check".as_ref(), merged.as_os_str()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "{} records from 2 gateway(s), 0 duplicates, no gaps",
            2 * PER_GATEWAY
        )),
        "{out:?}"
    );
    cloud.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_records_consumers_in_a_shared_group_split_the_records_mosquitto() {
    let Some(broker) =
        mosquitto_or_skip("two_records_consumers_in_a_shared_group_split_the_records_mosquitto")
    else {
        return;
    };
    two_consumers_split_the_records(&broker.url()).await;
}

/// rumqttd 0.20 splits a group too (though a persistent member that drops with messages
/// unacknowledged can crash its router: see docs/cloud-sim.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_records_consumers_in_a_shared_group_split_the_records_rumqttd() {
    let broker = RumqttdBroker::start();
    two_consumers_split_the_records(&broker.url()).await;
}

#[test]
fn records_help_explains_outages_and_shared_groups() {
    let out = run(&mut cloud_sim(), ["records", "--help"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    for text in [
        "persistent",
        "lost the broker",
        "acknowledged to the broker only after",
        "$share/GROUP/PREFIX/+/+/records",
        "cloud-sim check",
        "NATS 2.9 does not",
    ] {
        assert!(
            out.stdout.contains(text),
            "{text:?} missing from {}",
            out.stdout
        );
    }
    // A member of a group cannot judge gaps.
    let out = run(
        &mut cloud_sim(),
        [
            "records",
            "--url",
            "mqtt://127.0.0.1:1",
            "--share",
            "g",
            "--check",
        ],
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = run(
        &mut cloud_sim(),
        ["records", "--url", "mqtt://127.0.0.1:1", "--share", "a/b"],
    );
    assert_eq!(out.code, Some(2), "{out:?}");
}
