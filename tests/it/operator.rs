//! The operator commands against a running gateway: `doorbridge status`, `keys list`,
//! `keys show`, `events` (with `--follow`, and its filters after a restart), and `status`
//! when no daemon runs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use doorbridge::access::{CredentialKind, UseLimit};
use doorbridge::store::Record;
use doorbridge_sim::SimCommand;
use serde_json::Value;

use crate::bus::{Building, unit};
use crate::fixtures::key;
use crate::util::doorbridge;

fn run(config: &Path, args: &[&str]) -> Output {
    doorbridge()
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run doorbridge")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// A building with a granted PIN, a refused one, a call and a low battery behind it.
async fn busy_building() -> Building {
    let keys = vec![key(
        "courier",
        CredentialKind::Pin,
        "482916",
        UseLimit::Total(1),
    )];
    let mut b = Building::open(2, keys, "").await;
    b.present(1, CredentialKind::Pin, "482916").await;
    b.present(1, CredentialKind::Pin, "000000").await;
    b.command(SimCommand::Call {
        unit: unit(2),
        button: 0,
    })
    .await;
    b.command(SimCommand::Battery {
        unit: unit(2),
        percent: 12,
        millivolts: 3310,
    })
    .await;
    b.records_until(|r| {
        r.iter().any(|r| matches!(r, Record::CallButton { .. }))
            && r.iter().any(|r| matches!(r, Record::Battery { .. }))
    })
    .await;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_cloud_key_set_outbox_and_every_unit() {
    let b = busy_building().await;
    let config = b.config_file(2);
    // A low battery: WARNING, exit 1 (the Nagios plugin convention).
    let out = run(&config, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    let json: Value = serde_json::from_str(&line).expect("status --json is JSON");
    assert_eq!(json["verdict"]["level"], "warning", "{json:#}");
    assert_eq!(json["verdict"]["reasons"][0], "entrance/2: battery low");
    assert_eq!(
        json["cloud"]["connected"], false,
        "no broker here: {json:#}"
    );
    assert_eq!(json["health"]["keyset"]["version"], 1);
    assert_eq!(json["health"]["keyset"]["keys"], 1);
    let units = &json["health"]["buses"][0]["units"];
    assert_eq!(units.as_array().map(Vec::len), Some(2), "{json:#}");
    assert_eq!(units[0]["unit"], "entrance/1");
    assert_eq!(units[0]["online"], true);
    assert_eq!(units[1]["battery_percent"], 12);
    assert_eq!(units[1]["battery_low"], true);
    assert!(json["health"]["outbox_depth"].as_u64().unwrap() >= 4);

    let out = run(&config, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    assert!(
        text.lines().last() == Some("verdict   WARNING: entrance/2: battery low"),
        "{text}"
    );
    assert!(text.contains("key set   version 1, 1 keys"), "{text}");
    assert!(text.contains("entrance/2"), "{text}");
    assert!(text.contains("battery 12% (3.31 V, LOW)"), "{text}");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_list_and_show_never_print_a_credential() {
    let b = busy_building().await;
    let config = b.config_file(2);
    let list = stdout(&run(&config, &["keys", "list"]));
    assert!(list.contains("key set version 1, 1 keys"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("ID ") && l.contains("USES")),
        "a header: {list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("courier") && !l.contains('{')),
        "use limits in words: {list}"
    );
    let text = stdout(&run(&config, &["keys", "show", "courier"]));
    assert!(text.lines().any(|l| l.starts_with("use limit")), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("credentials  1 pin")),
        "{text}"
    );
    let show: Value = serde_json::from_str(&stdout(&run(
        &config,
        &["keys", "show", "courier", "--json"],
    )))
    .expect("keys show --json is JSON");
    assert_eq!(show["id"], "courier");
    assert_eq!(show["credentials"]["pin"], 1);
    assert!(
        show["uses"].as_array().is_some_and(|u| !u.is_empty()),
        "the use is counted: {show:#}"
    );
    let all = format!("{list}{show}");
    assert!(!all.contains("482916") && !all.contains("digest"), "{all}");
    let missing = run(&config, &["keys", "show", "nobody"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no key \"nobody\""));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_show_what_happened_and_follow_new_events() {
    let b = busy_building().await;
    let config = b.config_file(2);
    let tail = stdout(&run(&config, &["events", "-n", "10"]));
    eprintln!("{tail}");
    assert!(
        tail.contains("activity GRANTED door=main unit=entrance/1 key=courier credential=pin"),
        "{tail}"
    );
    assert!(
        tail.contains("DENIED") && tail.contains("reason="),
        "{tail}"
    );
    assert!(
        tail.contains("call_button button=0 door=garage unit=entrance/2"),
        "{tail}"
    );
    assert!(!tail.contains("482916"), "{tail}");

    let mut follow = doorbridge()
        .arg("--config")
        .arg(&config)
        .args(["events", "-n", "0", "--follow", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start events --follow");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = follow.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.expect("a line")).is_err() {
                break;
            }
        }
    });
    // Pressed until the follower (which may still be connecting) prints it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let line = loop {
        b.command(SimCommand::Call {
            unit: unit(1),
            button: 1,
        })
        .await;
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "follow printed nothing"
        );
    };
    let event: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["record"]["type"], "call_button", "{line}");
    assert_eq!(event["record"]["unit"], "entrance/1");
    follow.kill().expect("stop the follower");
    let _ = follow.wait();
    let _ = reader.join();
    b.stop().await;
}

/// `doorbridge events` after the daemon restarted: the history is on disk, each filter
/// narrows it, times are in the site's zone (`TZ`) unless `--utc`, JSON lines on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_kept_across_a_restart_and_filtered() {
    let mut b = busy_building().await;
    let config = b.config_file(2);
    b.stop_daemon().await;
    b.start_daemon(2, "");
    let events = |args: &[&str]| -> Vec<String> {
        let out = doorbridge()
            .arg("--config")
            .arg(&config)
            .arg("events")
            .args(args)
            .env("TZ", "Europe/Vienna")
            .stdin(Stdio::null())
            .output()
            .expect("run doorbridge events");
        stdout(&out).lines().map(str::to_owned).collect()
    };
    let all = events(&["-n", "100"]);
    eprintln!("{}", all.join("\n"));
    let kinds = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .map(|l| l.split(' ').nth(4).unwrap_or("").to_owned())
            .collect()
    };
    for kind in ["activity", "call_button", "battery"] {
        assert!(
            kinds(&all).iter().any(|k| k == kind),
            "{kind} kept: {all:?}"
        );
    }
    // Vienna in December is UTC+1.
    assert!(all.iter().all(|l| l.contains(" +01:00 #")), "{all:?}");
    assert!(
        events(&["--utc", "-n", "1"])[0].contains(" +00:00 #"),
        "--utc"
    );

    let garage = events(&["--door", "garage", "-n", "100"]);
    assert!(
        !garage.is_empty() && garage.iter().all(|l| l.contains("door=garage")),
        "{garage:?}"
    );
    let denied = events(&["--denied", "-n", "100"]);
    assert_eq!(denied.len(), 1, "one refused PIN: {denied:?}");
    assert!(
        denied[0].contains(
            "activity DENIED door=main unit=entrance/1 key=- credential=pin reason=unknown_credential"
        ),
        "{denied:?}"
    );
    let courier = events(&["--key", "courier"]);
    assert_eq!(courier.len(), 1, "{courier:?}");
    assert!(courier[0].contains("GRANTED") && courier[0].contains("key=courier"));
    let unit2 = events(&["--unit", "entrance/2", "--kind", "battery"]);
    assert_eq!(unit2.len(), 1, "{unit2:?}");
    assert!(unit2[0].contains("battery") && unit2[0].contains("percent=12"));
    assert!(
        events(&["--since", "1h"]).len() >= 4,
        "everything happened within the hour"
    );
    assert!(
        events(&["--until", "2h"]).is_empty(),
        "nothing is older than 2 hours"
    );
    assert!(events(&["--since", "2030-01-01"]).is_empty());
    let json = events(&["--json", "--kind", "call_button"]);
    let first: Value = serde_json::from_str(&json[0]).expect("a JSON line");
    assert_eq!(first["record"]["type"], "call_button");
    assert!(first["seq"].as_i64().is_some());
    let all_text = all.join("\n");
    assert!(!all_text.contains("482916"), "never a credential");

    let bad = run(&config, &["events", "--kind", "doorevent"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("is not a record kind; the kinds are: activity"),
        "{bad:?}"
    );
    let bad = run(&config, &["events", "--since", "yesterday"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"yesterday\" is not a time"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_a_daemon_says_so_and_exits_3() {
    let mut b = busy_building().await;
    let config = b.config_file(2);
    b.stop_keeping_files().await;
    let out = run(&config, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("daemon    not running"), "{text}");
    assert!(text.contains("version 1, 1 keys"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no daemon answers"),
        "{out:?}"
    );
    let json: Value = serde_json::from_str(&String::from_utf8_lossy(
        &run(&config, &["status", "--json"]).stdout,
    ))
    .expect("JSON even when not running");
    assert_eq!(json["running"], false);
    // The same shape as a running daemon's.
    assert_eq!(json["health"]["keyset"]["version"], 1, "{json:#}");
    assert_eq!(json["verdict"]["level"], "unknown");
}

/// With `telemetry.metrics_file` set, the daemon writes the Prometheus page for
/// `node_exporter`'s textfile collector: the units, the key set, the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_file_is_written_for_the_textfile_collector() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("doorbridge.prom");
    let keys = vec![key(
        "courier",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    )];
    let b = Building::open(
        2,
        keys,
        &format!("[telemetry]\nmetrics_file = \"{}\"\n", file.display()),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Ok(page) = std::fs::read_to_string(&file)
            && page.contains("doorbridge_unit_online{unit=\"entrance/2\"")
        {
            break page;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics file at {}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(page.contains("doorbridge_keyset_version 1"), "{page}");
    assert!(
        page.contains("# TYPE doorbridge_decisions_total counter"),
        "{page}"
    );
    assert!(
        page.lines()
            .any(|l| l.starts_with("doorbridge_clock_trusted ")),
        "{page}"
    );
    b.stop().await;
}

/// The gateway makes its identity at first start, owner-only, next to the database, and
/// `doorbridge identity` prints its public key for enrolment; a restart keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_prints_the_key_the_gateway_made_at_first_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut b = Building::open(1, Vec::new(), "").await;
    let config = b.config_file(1);
    let file = config.with_file_name("identity.key");
    let mode = std::fs::metadata(&file)
        .expect("identity.key made at start")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret is the owner's only");
    let printed = stdout(&run(&config, &["identity"]));
    let printed = printed.trim();
    assert_eq!(printed.len(), 64, "{printed}");
    let kept = doorbridge::store::chain::Identity::load_or_create(file.parent().unwrap()).unwrap();
    assert_eq!(printed, kept.public_hex());
    // `status` shows it too, in text and JSON.
    let text = String::from_utf8_lossy(&run(&config, &["status"]).stdout).into_owned();
    assert!(text.contains(&format!("identity  {printed}\n")), "{text}");
    let json: Value =
        serde_json::from_slice(&run(&config, &["status", "--json"]).stdout).expect("JSON");
    assert_eq!(json["identity"], printed);
    // With a record, the health (what telemetry sends) carries the chain head, signed now.
    b.present(1, CredentialKind::Pin, "000000").await;
    let json: Value =
        serde_json::from_slice(&run(&config, &["status", "--json"]).stdout).expect("JSON");
    let chain = &json["health"]["chain"];
    assert_eq!(chain["identity"], printed, "{json:#}");
    let unhex = |v: &Value| -> Vec<u8> {
        let t = v.as_str().expect("hex text");
        (0..t.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap())
            .collect()
    };
    let head: [u8; 32] = unhex(&chain["head"]).try_into().unwrap();
    let signature: [u8; 64] = unhex(&chain["signature"]).try_into().unwrap();
    let message = doorbridge::store::chain::head_message(
        chain["epoch"].as_i64().unwrap(),
        chain["seq"].as_i64().unwrap(),
        &head,
    );
    kept.public()
        .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature))
        .expect("the head's signature verifies under the printed key");
    std::fs::remove_file(&file).unwrap();
    let out = run(&config, &["identity"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("made when the gateway first starts"),
        "{out:?}"
    );
}
