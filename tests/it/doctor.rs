//! `doorbridge doctor` against a healthy site (a running gateway, its pty port, a real
//! mosquitto, a key set) and a broken one (a port that does not exist, nobody listening at the
//! broker URL, a CA file that does not exist, no database), text and `--json`.

use std::path::Path;
use std::process::{Output, Stdio};

use doorbridge::store::{Store, StoreOptions};
use jiff::Timestamp;
use serde_json::Value;

use crate::broker::{free_port, mosquitto_or_skip};
use crate::bus::Building;
use crate::fixtures::{self, header};
use crate::link::cloud_section;
use crate::util::doorbridge;

fn doctor(config: &Path, args: &[&str]) -> Output {
    doorbridge()
        .arg("--config")
        .arg(config)
        .arg("doctor")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run doorbridge doctor")
}

/// The check lines (not the hints under them) of a text report.
fn verdict_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8")
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_site_passes_every_check_that_is_not_about_the_machine() {
    let Some(mosquitto) = mosquitto_or_skip("doctor healthy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions::new(
        dir.path().join("doorbridge.db"),
        fixtures::context(),
    ))
    .unwrap();
    let mut signed = header(1);
    signed.issued_at = Some(Timestamp::now());
    store
        .install_key_set(
            signed,
            vec![fixtures::key(
                "k",
                doorbridge::access::CredentialKind::Pin,
                "482916",
                doorbridge::access::UseLimit::Unlimited,
            )],
        )
        .await
        .unwrap();
    store.close();
    let b = Building::open_with_cloud(dir, 1, "", &cloud_section(&mosquitto.url())).await;
    let config = b.config_file(1);

    let out = doctor(&config, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The clock and the disk belong to the test machine, not to the site: at most a warning.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{:?}\n{text}",
        out.status
    );
    eprintln!(
        "doctor on a healthy site, exit {:?}:\n{text}",
        out.status.code()
    );
    let lines = verdict_lines(&out);
    let url = mosquitto.url();
    for (start, what) in [
        ("OK      configuration: ", "loads"),
        ("OK      serial port entrance: ", ""),
        ("OK      tls: ", "plain mqtt://, no TLS to check"),
        (
            &format!("OK      broker {url}: ") as &str,
            "MQTT CONNACK accepted",
        ),
        ("clock: ", ""),
        ("disk: ", "free of"),
        ("OK      disk reserve: ", "present"),
        ("OK      database: ", "quick_check ok"),
        ("OK      key set: ", "version 1, 1 key, signed"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(start) && l.contains(what)),
            "no line {start:?}…{what:?} in:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert_eq!(lines.len(), 9, "one line per check:\n{text}");

    // --full runs the full integrity check instead; --json: one object per check.
    let out = doctor(&config, &["--json", "--full"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let objects: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON object"))
        .collect();
    assert_eq!(objects.len(), 9);
    let database = objects.iter().find(|o| o["check"] == "database").unwrap();
    assert_eq!(database["verdict"], "ok");
    assert!(
        database["detail"]
            .as_str()
            .unwrap()
            .ends_with("integrity_check ok")
    );
    let broker = objects
        .iter()
        .find(|o| o["check"] == format!("broker {url}"))
        .unwrap();
    assert_eq!(broker["verdict"], "ok", "{broker}");
    assert!(broker["took_ms"].is_u64(), "{broker}");
    drop(b);
}

#[test]
fn a_broken_site_fails_and_each_failure_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing_port = dir.path().join("ttyUSB9");
    let missing_ca = dir.path().join("ca.pem");
    let db = dir.path().join("doorbridge.db");
    let nobody = free_port();
    let config = dir.path().join("doorbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
id = "gw-test"
site_id = "site-test"
[site]
timezone = "Europe/Berlin"
[cloud]
url = ["mqtts://127.0.0.1:{nobody}", "mqtt://127.0.0.1:{nobody}"]
trusted_keys = ["3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"]
[cloud.tls]
ca_file = "{ca}"
[storage]
path = "{db}"
[[buses]]
name = "entrance"
port = "{port}"
[[buses.units]]
address = 1
door = "main"
"#,
            ca = missing_ca.display(),
            db = db.display(),
            port = missing_port.display()
        ),
    )
    .unwrap();

    let out = doctor(&config, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "doctor on a broken site, exit {:?}:\n{text}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    let lines = verdict_lines(&out);
    for expected in [
        "OK      configuration: ".to_owned(),
        format!(
            "FAIL    serial port entrance: {} does not exist",
            missing_port.display()
        ),
        format!(
            "FAIL    tls CA: cannot read {}: No such file or directory",
            missing_ca.display()
        ),
        format!("FAIL    broker mqtts://127.0.0.1:{nobody}: not tried: TLS cannot be set up"),
        format!(
            "FAIL    broker mqtt://127.0.0.1:{nobody}: TCP: cannot connect (127.0.0.1:{nobody}: Connection refused"
        ),
        format!("FAIL    database: no database at {}", db.display()),
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(&expected)),
            "no line starting {expected:?} in:\n{text}"
        );
    }
    // Every failure says what to do.
    assert!(text.contains("hint: set buses.port"), "{text}");
    assert!(text.contains("/dev/serial/by-id"), "{text}");

    // The same verdicts as JSON lines.
    let out = doctor(&config, &["--json"]);
    assert_eq!(out.status.code(), Some(2));
    let failed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .filter(|o| o["verdict"] == "fail")
        .map(|o| {
            assert!(o["hint"].is_string(), "a failure has a hint: {o}");
            o["check"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        failed,
        [
            "serial port entrance".to_owned(),
            "tls CA".to_owned(),
            format!("broker mqtts://127.0.0.1:{nobody}"),
            format!("broker mqtt://127.0.0.1:{nobody}"),
            "database".to_owned(),
        ]
    );
}

#[test]
fn a_configuration_that_does_not_load_is_the_only_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("doorbridge.toml");
    std::fs::write(&config, "[gateway]\nid = \"gw\"\n[[buses]]\nport = 5\n").unwrap();
    let out = doctor(&config, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.starts_with(&format!(
            "FAIL    configuration: {} does not load (",
            config.display()
        )),
        "{text}"
    );
    assert_eq!(verdict_lines(&out).len(), 1, "{text}");
    // Each problem on its own indented line, as check-config words it.
    assert!(
        text.lines()
            .any(|l| l.starts_with("        ") && l.contains("buses[0].port")),
        "{text}"
    );
    assert!(text.contains("doorbridge check-config"), "{text}");

    let out = doctor(&config, &["--json"]);
    assert_eq!(out.status.code(), Some(2));
    let json: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["check"], "configuration");
    assert_eq!(json["verdict"], "fail");
}
