//! `doorbridge check-config` and the layered configuration, through the real binary.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::util::{doorbridge, run, shipped_config};

/// A configuration that loads, to build the scenarios on.
const VALID: &str = r#"
[gateway]
id = "gw-test"
site_id = "site-test"

[site]
timezone = "Europe/Berlin"
name = "from the main file"

[cloud]
url = "mqtt://127.0.0.1:1883"
trusted_keys = ["3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"]

[[buses]]
port = "/dev/ttyUSB0"

[[buses.units]]
address = 1
door = "main"
"#;

/// A temporary /etc/doorbridge: the main file and, optionally, drop-ins.
struct ConfigDir {
    dir: TempDir,
}

impl ConfigDir {
    fn new(main: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("doorbridge.toml"), main).unwrap();
        ConfigDir { dir }
    }

    fn main(&self) -> PathBuf {
        self.dir.path().join("doorbridge.toml")
    }

    fn dropin(&self, name: &str, text: &str) -> PathBuf {
        let dir = self.dir.path().join("config.d");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

fn check_config(config: &Path) -> crate::util::Outcome {
    run(
        &mut doorbridge(),
        [
            "check-config".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
}

/// The problem lines on stderr (after the "N problems" header).
fn problem_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().skip(1).collect()
}

#[test]
fn the_shipped_config_validates_and_secrets_are_redacted() {
    let out = check_config(&shipped_config());
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // The example names a CA file that exists only on an installed gateway: a warning, no
    // failure.
    assert_eq!(
        out.stderr.trim(),
        "doorbridge: warning: the cloud link will not start: cannot read CA file \
         /etc/doorbridge/tls/ca.pem: No such file or directory (os error 2)",
    );
    assert!(
        out.stdout.contains("[gateway]\nid = \"gw-example-01\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("password = \"<redacted>\""),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("change-me"),
        "the password leaked:\n{}",
        out.stdout
    );

    // What check-config prints is a configuration that loads again, to the same result.
    let dir = ConfigDir::new(&out.stdout);
    let again = check_config(&dir.main());
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let body = |s: &str| s.split_once("\n\n").map(|(_, body)| body.to_owned());
    assert_eq!(body(&again.stdout), body(&out.stdout));
}

#[test]
fn every_problem_is_reported_with_its_key_and_file() {
    let text = VALID
        .replace("Europe/Berlin", "Europe/Berlln")
        .replace(
            "site_id = \"site-test\"",
            "site_id = \"site-test\"\nsiteid = \"typo\"",
        )
        .replace(
            "port = \"/dev/ttyUSB0\"",
            "port = \"/dev/ttyUSB0\"\nbaud = \"fast\"",
        )
        + r#"
[[buses.units]]
address = 1
door = "lobby"

[[buses.units]]
address = 127
door = "garage"
"#;
    let dir = ConfigDir::new(&text);
    let out = check_config(&dir.main());
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let file = dir.main().display().to_string();
    let expected = [
        ("gateway.siteid", "unknown key (did you mean `site_id`?)"),
        ("site.timezone", "unknown time zone `Europe/Berlln`"),
        ("buses[0].baud", "expected an integer"),
        (
            "buses[0].units[1].address",
            "address 1 is also used by buses[0].units[0]",
        ),
        ("buses[0].units[2].address", "address 127 is out of range"),
    ];
    let lines = problem_lines(&out.stderr);
    assert_eq!(lines.len(), expected.len(), "{}", out.stderr);
    for (line, (key, message)) in lines.iter().zip(expected) {
        let prefix = format!("{file}: {key}: ");
        assert!(line.starts_with(&prefix), "expected {prefix:?} in {line:?}");
        assert!(line.contains(message), "expected {message:?} in {line:?}");
    }
    assert!(
        out.stderr
            .starts_with("doorbridge: the configuration has 5 problems:\n")
    );
}

#[test]
fn dropins_override_in_name_order_and_the_environment_overrides_both() {
    let dir = ConfigDir::new(VALID);
    // Written out of order: the names decide, not the creation time.
    dir.dropin("20-second.toml", "[site]\nname = \"from 20-second\"\n");
    dir.dropin(
        "10-first.toml",
        "[site]\nname = \"from 10-first\"\n[telemetry]\ninterval = \"1m\"\n",
    );
    dir.dropin("ignored.conf", "this is not TOML and not read");

    let out = check_config(&dir.main());
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("name = \"from 20-second\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("interval = \"1m\""), "{}", out.stdout);
    let first = out.stdout.find("10-first.toml").unwrap();
    let second = out.stdout.find("20-second.toml").unwrap();
    assert!(
        first < second,
        "sources listed out of order:\n{}",
        out.stdout
    );

    // The environment wins over every file. DOORBRIDGE_LOG and DOORBRIDGE_CONFIG are not keys
    // (a `log` or `config` key would be unknown or clash with [log]).
    let out = run(
        doorbridge()
            .env("DOORBRIDGE_SITE__NAME", "from the environment")
            .env("DOORBRIDGE_CLOUD__PASSWORD", "007")
            .env("DOORBRIDGE_CLOUD__USERNAME", "gw")
            .env("DOORBRIDGE_LOG", "debug")
            .env("DOORBRIDGE_CONFIG", dir.main()),
        ["check-config"],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("name = \"from the environment\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("#   DOORBRIDGE_SITE__NAME\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("password = \"<redacted>\""),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("007"), "{}", out.stdout);

    // A bad value from the environment names the variable; a bad drop-in names its file.
    let bad = dir.dropin("30-bad.toml", "[pin_lockout]\nattempts = \"many\"\n");
    let out = run(
        doorbridge().env("DOORBRIDGE_TELEMETRY__INTERVAL", "often"),
        [
            "check-config".as_ref(),
            "--config".as_ref(),
            dir.main().as_os_str(),
        ],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let lines = problem_lines(&out.stderr);
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    assert!(
        lines[0].starts_with(&format!("{}: pin_lockout.attempts: ", bad.display())),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("DOORBRIDGE_TELEMETRY__INTERVAL: telemetry.interval: `often`"),
        "{}",
        lines[1]
    );
}

#[test]
fn a_named_file_that_is_missing_is_an_error_not_an_empty_config() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    for command in ["check-config", "run"] {
        let out = run(
            &mut doorbridge(),
            [command.as_ref(), "--config".as_ref(), missing.as_os_str()],
        );
        assert_eq!(out.code, Some(2), "{command}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{command}: {}", out.stdout);
        assert!(
            out.stderr.contains(&format!(
                "{}: configuration file not found",
                missing.display()
            )),
            "{command}: {}",
            out.stderr
        );
    }
}

#[test]
fn the_default_file_missing_says_which_file() {
    if Path::new("/etc/doorbridge/doorbridge.toml").exists() {
        return; // an installed gateway: nothing to learn here
    }
    let out = run(&mut doorbridge(), ["check-config"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("/etc/doorbridge/doorbridge.toml: configuration file not found"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--config"), "{}", out.stderr);
}

#[test]
fn run_refuses_a_bad_config_with_every_problem() {
    let dir = ConfigDir::new(&VALID.replace("[[buses]]", "[[buses]]\nretries = 0\nbaud = 1"));
    let out = run(
        &mut doorbridge(),
        ["run".as_ref(), "--config".as_ref(), dir.main().as_os_str()],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let lines = problem_lines(&out.stderr);
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    assert!(lines[0].contains("buses[0].baud"), "{}", lines[0]);
    assert!(lines[1].contains("buses[0].retries"), "{}", lines[1]);
}

/// The unit's `ExecCondition=doorbridge check-config --configured`: the package's file as
/// shipped skips the start (exit 1, which systemd counts as "skipped", not "failed") with a
/// notice; anything begun is let through (exit 0), and a begun configuration with problems
/// then fails loudly at `run` (exit 2, every problem named), never skipped quietly.
#[test]
fn only_the_untouched_shipped_config_skips_the_start() {
    let configured = |dir: &ConfigDir, env: &[(&str, &str)]| {
        let mut command = doorbridge();
        command.envs(env.iter().copied());
        let args = ["check-config", "--configured", "--config"];
        let out = run(
            &mut command,
            args.iter()
                .map(AsRef::as_ref)
                .chain([dir.main().as_os_str()]),
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        out
    };
    let shipped = include_str!("../../packaging/doorbridge.toml");
    let dir = ConfigDir::new(shipped);
    let out = configured(&dir, &[("DOORBRIDGE_LOG", "debug")]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.starts_with("doorbridge: not configured yet: ")
            && out.stderr.contains("systemctl start doorbridge"),
        "{}",
        out.stderr
    );
    // An empty drop-in directory, as the package ships it, changes nothing.
    fs::create_dir(dir.dir.path().join("config.d")).unwrap();
    assert_eq!(configured(&dir, &[]).code, Some(1));

    // Configured and valid: start.
    let valid = ConfigDir::new(VALID);
    let out = configured(&valid, &[]);
    assert_eq!((out.code, out.stderr.as_str()), (Some(0), ""));

    // Begun but incomplete, in the main file, a drop-in or the environment: the condition
    // passes and `run` refuses it with exit 2 (the unit's RestartPreventExitStatus=2).
    let env_only = [("DOORBRIDGE_CLOUD__PASSWORD", "secret")];
    let main_begun = ConfigDir::new(&shipped.replace("# id = \"gw-...\"", "id = \"gw-1\""));
    let dropin_begun = ConfigDir::new(shipped);
    dropin_begun.dropin("10-site.toml", "[site]\ntimezone = \"Europe/Berlin\"\n");
    let broken = ConfigDir::new(&format!("{shipped}\n[gateway\n"));
    for (what, dir, env) in [
        ("gateway.id set", &main_begun, &[][..]),
        ("a drop-in", &dropin_begun, &[][..]),
        ("a variable", &dir, &env_only[..]),
        ("not TOML", &broken, &[][..]),
    ] {
        let out = configured(dir, env);
        assert_eq!(out.code, Some(0), "{what}: {}", out.stderr);
        let mut command = doorbridge();
        command.envs(env.iter().copied());
        let out = run(
            &mut command,
            ["run".as_ref(), "--config".as_ref(), dir.main().as_os_str()],
        );
        assert_eq!(out.code, Some(2), "{what}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("doorbridge: the configuration has "),
            "{what}: {}",
            out.stderr
        );
    }
}

#[test]
fn help_explains_the_commands_and_the_sources() {
    let out = run(&mut doorbridge(), ["--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for needle in [
        "run",
        "check-config",
        "/etc/doorbridge/doorbridge.toml",
        "config.d/*.toml",
        "DOORBRIDGE_STORAGE__PATH",
        "DOORBRIDGE_LOG",
    ] {
        assert!(
            out.stdout.contains(needle),
            "--help lacks {needle:?}:\n{}",
            out.stdout
        );
    }
}

/// OSDP readers: every problem with its key, and a reader not yet provisioned only warned
/// about (`doorbridge osdp install` needs the configuration to load).
#[test]
fn osdp_readers_are_checked_and_an_unprovisioned_one_is_a_warning() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let exposed = dir.path().join("exposed.key");
    fs::write(&exposed, "000102030405060708090a0b0c0d0e0f\n").unwrap();
    fs::set_permissions(&exposed, fs::Permissions::from_mode(0o644)).unwrap();
    let malformed = dir.path().join("malformed.key");
    fs::write(&malformed, "not a key\n").unwrap();
    fs::set_permissions(&malformed, fs::Permissions::from_mode(0o600)).unwrap();
    let missing = dir.path().join("missing.key");
    let text = format!(
        r#"{VALID}
[buses.units.osdp]
relay = 1

[[buses]]
protocol = "osdp"
port = "/dev/ttyUSB1"

[[buses.units]]
address = 1
door = "garage"

[[buses.units]]
address = 2
door = "lift"
[buses.units.osdp]
reader = "elevator"
key_file = "{exposed}"

[[buses.units]]
address = 3
door = "side"
[buses.units.osdp]
key_file = "{malformed}"
floors = [{{ floor = 1, output = 0 }}, {{ floor = 1, output = 1 }}]
pulse = "10ms"
"#,
        exposed = exposed.display(),
        malformed = malformed.display(),
    );
    let config = ConfigDir::new(&text);
    let out = check_config(&config.main());
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    let lines = problem_lines(&out.stderr);
    let expect = [
        ("buses[0].units[0].osdp", "set protocol = \"osdp\""),
        ("buses[1].units[0].osdp.key_file", "doorbridge osdp install"),
        ("buses[1].units[1].osdp.key_file", "chmod 600"),
        ("buses[1].units[1].osdp.floors", "needs floors"),
        ("buses[1].units[2].osdp.key_file", "32 hex digits"),
        ("buses[1].units[2].osdp.floors", "only an elevator reader"),
        (
            "buses[1].units[2].osdp.floors[1].floor",
            "also at floors[0]",
        ),
        ("buses[1].units[2].osdp.pulse", "10ms"),
    ];
    for (key, says) in expect {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(": {key}: ")) && l.contains(says)),
            "no problem at {key} saying {says:?}:\n{}",
            out.stderr
        );
    }
    assert_eq!(lines.len(), expect.len(), "{}", out.stderr);

    // A sound OSDP bus whose reader has no key file yet: valid, with a warning that says how
    // to provision it.
    let text = format!(
        r#"{VALID}
[[buses]]
name = "front"
protocol = "osdp"
port = "/dev/ttyUSB1"
baud = 9600

[[buses.units]]
address = 5
door = "garage"
[buses.units.osdp]
key_file = "{missing}"
door_contact = 0
"#,
        missing = missing.display()
    );
    let config = ConfigDir::new(&text);
    let out = check_config(&config.main());
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "warning: OSDP reader 5 (door garage) on bus front has no key file {}",
            missing.display()
        )) && out
            .stderr
            .contains("doorbridge osdp install --bus front --address 5"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("protocol = \"osdp\""), "{}", out.stdout);
}

/// Ids and a topic prefix that some broker of a fleet would refuse are refused, naming the
/// broker: NATS (`.`, `*`, `>`), the brokers that reserve `$`, AWS IoT Core's topic depth.
#[test]
fn ids_and_prefixes_a_broker_would_refuse_are_refused_naming_it() {
    for (replace, with, key, says) in [
        ("id = \"gw-test\"", "id = \"gw.test\"", "gateway.id", "NATS"),
        (
            "site_id = \"site-test\"",
            "site_id = \"site.1\"",
            "gateway.site_id",
            "NATS",
        ),
        (
            "[cloud]",
            "[cloud]\ntopic_prefix = \"$fleet\"",
            "cloud.topic_prefix",
            "reserved",
        ),
        (
            "[cloud]",
            "[cloud]\ntopic_prefix = \"acme.eu/doors\"",
            "cloud.topic_prefix",
            "NATS",
        ),
        (
            "[cloud]",
            "[cloud]\ntopic_prefix = \"a/b/c/d/e\"",
            "cloud.topic_prefix",
            "AWS IoT Core",
        ),
    ] {
        let config = ConfigDir::new(&VALID.replace(replace, with));
        let out = check_config(&config.main());
        assert_eq!(out.code, Some(2), "{with}: {}", out.stderr);
        let lines = problem_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{with}: {}", out.stderr);
        assert!(
            lines[0].contains(&format!(": {key}: ")) && lines[0].contains(says),
            "{with}: {}",
            out.stderr
        );
    }
    // Four prefix levels still fit AWS IoT Core's 7 slashes.
    let config =
        ConfigDir::new(&VALID.replace("[cloud]", "[cloud]\ntopic_prefix = \"acme/eu/doors/v1\""));
    let out = check_config(&config.main());
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
