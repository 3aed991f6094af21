//! The `cloud-sim` binary and the reference cloud client: keygen and build make a bundle the
//! gateway's decoders accept, bad keys files fail naming the field, and a published snapshot
//! arrives on the gateway's topics through a real (in-process) MQTT broker. Every wait is for
//! a condition, with a deadline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use doorbridge::cloud::bundle::Bundle;
use doorbridge::cloud::envelope::{Kind, open};
use doorbridge::cloud::keyfile::{KeyFile, parse_hex};
use doorbridge::cloud::payload::{Chunk, MAX_ENVELOPE_BYTES, Manifest, Target};
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::sync::{Action, Sync};
use doorbridge::cloud::topics::{Channel, Topics};
use doorbridge::sim::cloud::{CloudClient, Message};
use ed25519_dalek::VerifyingKey;
use jiff::Timestamp;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::util::{Outcome, run};

/// Long enough for a loaded CI machine; every wait ends as soon as its condition holds.
const WITHIN: Duration = Duration::from_secs(20);

fn cloud_sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloud-sim"))
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
    for sub in ["keygen", "build", "publish", "open-door", "resync", "watch"] {
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
        doorbridge::sim::cloud::hex(public.as_bytes()),
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
        Some("owner-ann".to_owned())
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
