//! The cloud link end to end, in process: an rumqttd broker on an ephemeral port, the
//! reference cloud client signing what it publishes, the daemon's own entry point, and
//! simulated door units on a real pty.

use std::time::Duration;

use doorbridge::access::{CredentialKind, DenyReason, Key, UseLimit};
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Outcome, Presence, Report};
use doorbridge::cloud::topics::{Channel, Topics};
use doorbridge::store::Record;
use doorbridge_sim::Output;
use doorbridge_sim::build;
use doorbridge_sim::cloud::{CloudClient, Message};
use ed25519_dalek::SigningKey;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::broker::RumqttdBroker;
use crate::bus::{Building, denied, granted, unit};
use crate::fixtures::{SALT, key};

const WAIT: Duration = Duration::from_secs(20);

fn cloud_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

fn target() -> Target {
    Target {
        site: "site-test".into(),
        gateway: "gw-test".into(),
    }
}

/// The topics of a [`Building`]'s gateway.
pub(crate) fn topics() -> Topics {
    Topics::new("doorbridge", &target()).unwrap()
}

/// A `[cloud]` section for a [`Building`] whose gateway uses the broker at `url` and trusts
/// [`cloud_key`].
pub(crate) fn cloud_section(url: &str) -> String {
    let public = doorbridge_sim::cloud::hex(cloud_key().verifying_key().as_bytes());
    format!("url = \"{url}\"\ntrusted_keys = [\"{public}\"]\nkeepalive = \"5s\"")
}

/// The cloud's side: a client and the gateway's reports.
struct Cloud {
    client: CloudClient,
    reports: UnboundedReceiver<Message>,
    seen: Vec<Report>,
}

impl Cloud {
    async fn connect(url: &str) -> Cloud {
        let client = CloudClient::connect(url, "cloud-test").await.unwrap();
        let reports = client
            .subscribe("doorbridge/site-test/gw-test/#")
            .await
            .unwrap();
        Cloud {
            client,
            reports,
            seen: Vec::new(),
        }
    }

    /// The next report matching `want` (reports the gateway sent, not our own messages).
    async fn report(&mut self, what: &str, want: impl Fn(&Report) -> bool) -> Report {
        if let Some(i) = self.seen.iter().position(&want) {
            return self.seen.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let Ok(Some((topic, payload))) =
                tokio::time::timeout_at(deadline, self.reports.recv()).await
            else {
                panic!("no {what} from the gateway; saw {:?}", self.seen);
            };
            let outbound = [Channel::State, Channel::Sync, Channel::CommandResult];
            if !outbound.iter().any(|c| topic == topics().topic(*c)) {
                continue;
            }
            let report = Report::decode(&payload).expect("the gateway's reports decode");
            if want(&report) {
                return report;
            }
            self.seen.push(report);
        }
    }

    /// The next `rejected` report on `channel`; returns its reason.
    async fn rejection(&mut self, what: &str, channel: &str) -> String {
        let r = self
            .report(
                what,
                |r| matches!(r, Report::Rejected { channel: c, .. } if c == channel),
            )
            .await;
        let Report::Rejected { reason, .. } = r else {
            unreachable!()
        };
        reason
    }

    async fn online(&mut self) {
        self.report("online state", |r| {
            matches!(
                r,
                Report::State {
                    state: Presence::Online,
                    ..
                }
            )
        })
        .await;
    }

    async fn applied(&mut self, version: u64) {
        self.report(
            &format!("applied {version}"),
            |r| matches!(r, Report::Applied { version: v, .. } if *v == version),
        )
        .await;
    }

    async fn snapshot(&self, version: u64, keys: &[Key]) {
        let snapshot = build::snapshot(
            &target(),
            version,
            Timestamp::now(),
            SALT,
            keys,
            &cloud_key(),
        )
        .unwrap();
        self.client
            .publish_snapshot(&topics(), &snapshot)
            .await
            .unwrap();
    }

    async fn delta(&self, from: u64, to: u64, upserts: &[Key], deletes: &[&str]) {
        self.delta_as(&cloud_key(), from, to, upserts, deletes)
            .await;
    }

    async fn raw(&self, channel: Channel, bytes: Vec<u8>) {
        self.client
            .publish(&topics().topic(channel), bytes, false)
            .await
            .unwrap();
    }
}

/// A broker, the cloud connected to it, and a building whose gateway said it is online.
async fn online() -> (RumqttdBroker, Cloud, Building) {
    let broker = RumqttdBroker::start();
    let mut cloud = Cloud::connect(&broker.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let b = Building::open_with_cloud(dir, 3, "", &cloud_section(&broker.url())).await;
    cloud.online().await;
    (broker, cloud, b)
}

/// The `cloud_rejected` records on `channel` among `records`.
fn refusals<'a>(records: &'a [Record], channel: &str) -> Vec<&'a Record> {
    records
        .iter()
        .filter(|r| matches!(r, Record::CloudRejected { channel: c, .. } if c == channel))
        .collect()
}

fn held(b: &Building) -> (u64, u64) {
    let info = doorbridge::store::Reader::open(&b.db)
        .unwrap()
        .key_set()
        .unwrap();
    (info.version, info.keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_mqtt_opens_doors_and_a_delta_revocation_closes_them() {
    let (_broker, mut cloud, mut b) = online().await;

    let resident = key(
        "resident",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    );
    let courier = key("courier", CredentialKind::Pin, "1357", UseLimit::Total(1));
    cloud.snapshot(1, &[resident, courier.clone()]).await;
    cloud.applied(1).await;
    assert_eq!(held(&b), (1, 2));
    assert!(granted(&b.present(1, CredentialKind::Pin, "482916").await));
    assert!(granted(&b.present(1, CredentialKind::Pin, "1357").await));
    assert_eq!(
        denied(&b.present(1, CredentialKind::Pin, "1357").await),
        Some(DenyReason::UsedUp)
    );

    // The cloud deletes the resident's key: the next try at the door is refused.
    cloud.delta(1, 2, &[], &["resident"]).await;
    cloud.applied(2).await;
    assert_eq!(
        denied(&b.present(1, CredentialKind::Pin, "482916").await),
        Some(DenyReason::Revoked)
    );
    // A replaced key brings the courier back with a fresh credential; its use stays counted.
    let again = key("courier", CredentialKind::Pin, "2468", UseLimit::Total(1));
    cloud.delta(2, 3, &[again], &[]).await;
    cloud.applied(3).await;
    assert_eq!(
        denied(&b.present(1, CredentialKind::Pin, "2468").await),
        Some(DenyReason::UsedUp)
    );
    assert_eq!(
        denied(&b.present(1, CredentialKind::Pin, "1357").await),
        Some(DenyReason::UnknownCredential)
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unsigned_rolled_back_oversized_and_out_of_order_messages_change_nothing() {
    let (_broker, mut cloud, mut b) = online().await;
    let resident = key(
        "resident",
        CredentialKind::Pin,
        "482916",
        UseLimit::Unlimited,
    );
    cloud.snapshot(5, std::slice::from_ref(&resident)).await;
    cloud.applied(5).await;

    let rejected = |channel: &'static str, needle: &'static str| {
        move |r: &Report| {
            matches!(r, Report::Rejected { channel: c, reason, .. }
                if c == channel && reason.contains(needle))
        }
    };
    // Signed by a key the gateway does not trust.
    let intruder = SigningKey::from_bytes(&[66; 32]);
    let forged = build::snapshot(&target(), 6, Timestamp::now(), SALT, &[], &intruder).unwrap();
    cloud.raw(Channel::Manifest, forged.manifest).await;
    cloud
        .report(
            "forged manifest refused",
            rejected("keys/manifest", "not trusted"),
        )
        .await;
    // Not an envelope at all.
    cloud
        .raw(Channel::Delta, b"revoke everything".to_vec())
        .await;
    cloud
        .report("garbage refused", rejected("keys/delta", ""))
        .await;
    // A genuine signature over a tampered body.
    let mut tampered = build::delta(
        &target(),
        5,
        6,
        Timestamp::now(),
        &[],
        &["resident".to_owned()],
        &cloud_key(),
    )
    .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    cloud.raw(Channel::Delta, tampered).await;
    cloud
        .report("tampered delta refused", rejected("keys/delta", ""))
        .await;
    // Rolled back: an older version, correctly signed.
    cloud.delta(3, 4, &[], &["resident"]).await;
    cloud
        .report("rollback refused", rejected("keys/delta", "not newer"))
        .await;
    // Oversized: more than an envelope may be (but what the cloud client can still send).
    let over = doorbridge::cloud::payload::MAX_ENVELOPE_BYTES + 500;
    cloud.raw(Channel::Manifest, vec![0xa4; over]).await;
    cloud
        .report(
            "oversized refused",
            rejected("keys/manifest", "over the limit"),
        )
        .await;
    // Out of order: a delta from a version the gateway never held asks for a resync.
    cloud.delta(7, 8, &[], &["resident"]).await;
    let resync = cloud
        .report("resync request", |r| matches!(r, Report::Resync { .. }))
        .await;
    assert!(
        matches!(resync, Report::Resync { held: 5, .. }),
        "{resync:?}"
    );
    // A chunk whose hash no manifest names.
    let stray = build::snapshot(
        &target(),
        9,
        Timestamp::now(),
        SALT,
        &[resident],
        &cloud_key(),
    )
    .unwrap();
    let mut chunk = stray.chunks[0].clone();
    chunk.push(0);
    cloud.raw(Channel::Chunk, chunk).await;

    // Through all of it the held set answered, unchanged.
    assert_eq!(held(&b), (5, 1));
    assert!(granted(&b.present(1, CredentialKind::Pin, "482916").await));
    let records = b
        .records_until(|r| {
            r.iter()
                .filter(|r| matches!(r, Record::CloudRejected { .. }))
                .count()
                >= 5
        })
        .await;
    assert!(
        records.iter().any(
            |r| matches!(r, Record::CloudRejected { channel, .. } if channel == "keys/manifest")
        )
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_open_reaches_the_door_once_and_replays_or_expired_commands_do_nothing() {
    let (_broker, mut cloud, mut b) = online().await;
    let app = key(
        "app-anna",
        CredentialKind::Mobile,
        "phone",
        UseLimit::Unlimited,
    );
    cloud.snapshot(1, &[app]).await;
    cloud.applied(1).await;

    let command = |id: &str, door: &str, issued: Timestamp| {
        build::open_door(
            &target(),
            id,
            door,
            "app-anna",
            issued,
            SignedDuration::from_secs(30),
            &cloud_key(),
        )
    };
    let result = |id: &'static str| move |r: &Report| matches!(r, Report::CommandResult { command_id: Some(c), .. } if c == id);
    let open = command("c1", "main", Timestamp::now());
    cloud.raw(Channel::OpenDoor, open.clone()).await;
    let out = b
        .next(|o| matches!(o, Output::OpenDoor { unit: u, .. } if *u == unit(1)))
        .await;
    assert!(matches!(out, Output::OpenDoor { .. }));
    let r = cloud.report("c1 result", result("c1")).await;
    assert!(
        matches!(
            r,
            Report::CommandResult {
                outcome: Outcome::Opened,
                ..
            }
        ),
        "{r:?}"
    );

    // The same signed bytes again: a replay.
    cloud.raw(Channel::OpenDoor, open).await;
    let r = cloud.report("replay result", result("c1")).await;
    assert!(
        matches!(&r, Report::CommandResult { outcome: Outcome::Rejected, reason: Some(why), .. } if why.contains("replay")),
        "{r:?}"
    );
    // Expired before it arrived.
    let old = Timestamp::now() - SignedDuration::from_secs(120);
    cloud
        .raw(Channel::OpenDoor, command("c2", "main", old))
        .await;
    let r = cloud.report("expired result", result("c2")).await;
    assert!(
        matches!(
            &r,
            Report::CommandResult {
                outcome: Outcome::Rejected,
                ..
            }
        ),
        "{r:?}"
    );
    // A door the key does not open: the key set says no.
    cloud
        .raw(Channel::OpenDoor, command("c3", "garage", Timestamp::now()))
        .await;
    let r = cloud.report("wrong door result", result("c3")).await;
    assert!(
        matches!(
            &r,
            Report::CommandResult {
                outcome: Outcome::Denied,
                ..
            }
        ),
        "{r:?}"
    );
    // Only c1 opened a door.
    assert!(
        !b.seen
            .iter()
            .any(|o| matches!(o, Output::OpenDoor { unit: u, .. } if *u == unit(2))),
        "the garage opened"
    );
    let records = b
        .records_until(|r| {
            r.iter()
                .any(|r| matches!(r, Record::Activity(a) if a.command_id.as_deref() == Some("c3")))
        })
        .await;
    assert!(records.iter().any(
        |r| matches!(r, Record::Activity(a) if a.command_id.as_deref() == Some("c1") && a.granted)
    ));
    b.stop().await;
}

/// A signed command refused for its content (a replay, expired, issued before the gateway
/// started) is recorded and reported like every refusal (`docs/cloud-protocol.md` §8); a
/// flood of them is recorded at most ten times a minute per channel, so it cannot fill the
/// outbox or crowd out door records, while every one still gets its command result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commands_are_recorded_and_a_flood_is_coalesced() {
    let (_broker, mut cloud, b) = online().await;
    let app = key(
        "app-anna",
        CredentialKind::Mobile,
        "phone",
        UseLimit::Unlimited,
    );
    cloud.snapshot(1, &[app]).await;
    cloud.applied(1).await;
    let open = build::open_door(
        &target(),
        "c1",
        "main",
        "app-anna",
        Timestamp::now(),
        SignedDuration::from_secs(30),
        &cloud_key(),
    );
    cloud.raw(Channel::OpenDoor, open.clone()).await;
    let rejected_c1 = |r: &Report| matches!(r, Report::CommandResult { command_id: Some(c), outcome: Outcome::Rejected, .. } if c == "c1");
    // 30 replays of the same signed bytes: every one answered...
    for _ in 0..30 {
        cloud.raw(Channel::OpenDoor, open.clone()).await;
    }
    for i in 0..30 {
        cloud
            .report(&format!("replay result {i}"), rejected_c1)
            .await;
    }
    // ... reported on `sync` ...
    let reason = cloud.rejection("a rejected report", "cmd/open-door").await;
    assert!(reason.contains("replay"), "{reason}");
    // ... and recorded ten times (every result above went out after its record, if any).
    let records = b
        .records_until(|r| refusals(r, "cmd/open-door").len() >= 10)
        .await;
    let refused = refusals(&records, "cmd/open-door");
    assert_eq!(refused.len(), 10, "{refused:#?}");
    assert!(
        refused.iter().all(
            |r| matches!(r, Record::CloudRejected { reason, .. } if reason.contains("replay"))
        ),
        "{refused:#?}"
    );
    b.stop().await;
}

fn settings(id: &str, volume: u8, name: Option<&str>) -> Vec<u8> {
    let now = Timestamp::now();
    build::unit_settings(
        &doorbridge::cloud::payload::UnitSettings {
            target: target(),
            command_id: id.into(),
            door: "main".into(),
            volume: Some(volume),
            name: name.map(Into::into),
            house_number: None,
            inner_door: None,
            issued_at: now,
            expires_at: now + SignedDuration::from_secs(30),
        },
        &cloud_key(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_settings_are_pushed_now_or_when_the_unit_is_back() {
    let (_broker, mut cloud, mut b) = online().await;
    let result = |id: &'static str| move |r: &Report| matches!(r, Report::CommandResult { command_id: Some(c), .. } if c == id);

    cloud
        .raw(Channel::Settings, settings("s1", 30, Some("Haus 12")))
        .await;
    let out = b
        .next(|o| matches!(o, Output::Settings { unit: u, .. } if *u == unit(1)))
        .await;
    let Output::Settings { settings: got, .. } = out else {
        unreachable!()
    };
    assert_eq!(
        (got.volume, got.name.as_deref()),
        (Some(30), Some("Haus 12"))
    );
    let r = cloud.report("s1 result", result("s1")).await;
    assert!(
        matches!(
            r,
            Report::CommandResult {
                outcome: Outcome::Done,
                ..
            }
        ),
        "{r:?}"
    );

    // The unit is away: the new volume is held as desired…
    b.stop_sim().await;
    cloud.raw(Channel::Settings, settings("s2", 70, None)).await;
    let r = cloud.report("s2 result", result("s2")).await;
    assert!(
        matches!(
            r,
            Report::CommandResult {
                outcome: Outcome::Unreachable,
                ..
            }
        ),
        "{r:?}"
    );
    let reader = doorbridge::store::Reader::open(&b.db).unwrap();
    let all = reader.unit_settings().unwrap();
    let (_, desired, _) = all.iter().find(|(d, ..)| d == "main").unwrap();
    let desired = desired.clone().unwrap();
    assert_eq!(
        (desired.volume, desired.name.as_deref()),
        (Some(70), Some("Haus 12"))
    );

    // …and pushed when it powers up again with its factory settings.
    b.start_sim(3);
    let out = b
        .next(|o| {
            matches!(o, Output::Settings { unit: u, settings, .. }
                if *u == unit(1) && settings.volume == Some(70))
        })
        .await;
    let Output::Settings { settings: got, .. } = out else {
        unreachable!()
    };
    assert_eq!(got.name.as_deref(), Some("Haus 12"));
    b.stop().await;
}

/// Anyone with publish rights on one of a gateway's topics can send it a message too big to
/// read; with a persistent session the broker would send it again at every connect. The link
/// must drop it (a clean session), say so, and go on taking key updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_big_to_read_is_dropped_reported_and_the_next_delta_applies() {
    use doorbridge::cloud::link::UNREADABLE;
    use doorbridge::cloud::refusals::PER_WINDOW;

    let broker = RumqttdBroker::start_with(32 << 20);
    let mut cloud = Cloud::connect(&broker.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let b = Building::open_with_cloud(dir, 1, "", &cloud_section(&broker.url())).await;
    cloud.online().await;
    cloud.snapshot(1, &[]).await;
    cloud.applied(1).await;
    let mut version = 1;
    let mut refused = 0;
    for channel in Channel::INBOUND {
        for size in [2 << 20, 16 << 20] {
            crate::broker::publish_oversized(&broker.url(), &topics().topic(channel), size).await;
            // The link is back, subscribed again, and asks for what was dropped with the
            // message (sent after the new subscriptions: a delta from now on reaches it)...
            cloud
                .report(&format!("the resync after {size} bytes on {}", channel.suffix()), |r| {
                    matches!(r, Report::Resync { reason, .. } if reason.contains("could not be read"))
                })
                .await;
            refused += 1;
            // ... and the refusal is reported (up to the coalescing limit per minute).
            if refused <= PER_WINDOW {
                let what = format!("the refusal of {size} bytes on {}", channel.suffix());
                let reason = cloud.rejection(&what, UNREADABLE).await;
                assert!(reason.contains("bytes, over the gateway's"), "{reason}");
            }
            // The next delta applies.
            let pin = format!("{:04}", 1000 + version);
            let k = key(
                &format!("k{version}"),
                CredentialKind::Pin,
                &pin,
                UseLimit::Unlimited,
            );
            cloud.delta(version, version + 1, &[k], &[]).await;
            version += 1;
            cloud.applied(version).await;
        }
    }
    assert_eq!(held(&b), (version, version - 1));
    let records = b
        .records_until(|r| refusals(r, UNREADABLE).len() >= 10)
        .await;
    assert_eq!(refusals(&records, UNREADABLE).len(), 10);
    b.stop().await;
}

/// Command results speak one vocabulary (`docs/cloud-protocol.md` §7): the command's name, its
/// id echoed (a resync's too), a deny reason by its wire name, and a reason for every refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_results_name_the_command_echo_its_id_and_say_why() {
    let (_broker, mut cloud, b) = online().await;
    let app = key(
        "app-anna",
        CredentialKind::Mobile,
        "phone",
        UseLimit::Unlimited,
    );
    cloud.snapshot(1, &[app]).await;
    cloud.applied(1).await;
    let result = |r: &Report| matches!(r, Report::CommandResult { .. });

    let resync = build::resync(&target(), Some("r1"), Timestamp::now(), &cloud_key());
    cloud.raw(Channel::Resync, resync).await;
    let r = cloud.report("the resync's result", result).await;
    assert!(
        matches!(&r, Report::CommandResult { command_id: Some(id), command, outcome: Outcome::Done, .. }
            if id == "r1" && command == "resync"),
        "{r:?}"
    );

    cloud
        .raw(Channel::OpenDoor, b"not an envelope".to_vec())
        .await;
    let r = cloud
        .report("the unreadable command's result", result)
        .await;
    assert!(
        matches!(&r, Report::CommandResult { command_id: None, command, outcome: Outcome::Rejected, reason: Some(why), .. }
            if command == "open-door" && !why.is_empty()),
        "{r:?}"
    );

    let wrong_door = build::open_door(
        &target(),
        "c-wrong",
        "garage",
        "app-anna",
        Timestamp::now(),
        SignedDuration::from_secs(30),
        &cloud_key(),
    );
    cloud.raw(Channel::OpenDoor, wrong_door).await;
    let r = cloud.report("the denied command's result", result).await;
    assert!(
        matches!(&r, Report::CommandResult { command_id: Some(id), outcome: Outcome::Denied, reason: Some(why), .. }
            if id == "c-wrong" && why == DenyReason::WrongDoor.name()),
        "{r:?}"
    );
    assert_eq!(DenyReason::WrongDoor.name(), "wrong_door");
    b.stop().await;
}

/// A signed delta whose new key reuses another key's credential is refused by the store; the
/// refusal is reported and recorded like every other (§8), not only logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_reusing_a_credential_is_reported_and_recorded() {
    let (_broker, mut cloud, b) = online().await;
    let anna = key("anna", CredentialKind::Pin, "4711", UseLimit::Unlimited);
    cloud.snapshot(1, &[anna]).await;
    cloud.applied(1).await;
    let copycat = key("copycat", CredentialKind::Pin, "4711", UseLimit::Unlimited);
    cloud.delta(1, 2, &[copycat], &[]).await;
    let reason = cloud.rejection("the delta's refusal", "keys/delta").await;
    assert!(reason.contains("twice"), "{reason}");
    let records = b
        .records_until(|r| !refusals(r, "keys/delta").is_empty())
        .await;
    let refused = refusals(&records, "keys/delta");
    assert!(
        matches!(refused[..], [Record::CloudRejected { reason, .. }] if reason.contains("twice")),
        "{refused:#?}"
    );
    assert_eq!(held(&b), (1, 1));
    b.stop().await;
}

/// A key opening only `door`, with one PIN.
fn key_at(id: &str, door: &str, pin: &str) -> Key {
    let mut k = key(id, CredentialKind::Pin, pin, UseLimit::Unlimited);
    k.rules.doors = vec![door.into()];
    k
}

impl Cloud {
    /// Publishes, signed by the root key, a delegation of `doors` to `delegate`.
    async fn delegate(
        &self,
        id: &str,
        delegate: &SigningKey,
        doors: &[&str],
        issued: Timestamp,
        not_after: Timestamp,
    ) {
        let doors: Vec<String> = doors.iter().map(|d| (*d).to_owned()).collect();
        let bytes = build::delegation(
            &target(),
            id,
            &delegate.verifying_key(),
            &doors,
            not_after,
            issued,
            &cloud_key(),
        )
        .unwrap();
        self.client.publish_delta(&topics(), bytes).await.unwrap();
    }

    /// Publishes a delta signed by `signer` (a delegate's key).
    async fn delta_as(
        &self,
        signer: &SigningKey,
        from: u64,
        to: u64,
        upserts: &[Key],
        deletes: &[&str],
    ) {
        let deletes: Vec<String> = deletes.iter().map(|s| (*s).to_owned()).collect();
        let delta = build::delta(
            &target(),
            from,
            to,
            Timestamp::now(),
            upserts,
            &deletes,
            signer,
        )
        .unwrap();
        self.client.publish_delta(&topics(), delta).await.unwrap();
    }
}

/// Delegated admins (the Smart `MasterKey` seed): an admin for the garage signs deltas for the
/// garage and nothing else; the keys it grants name it in their activity; the root revokes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garage_admin_grants_the_garage_only_until_expired_or_revoked() {
    let (_broker, mut cloud, mut b) = online().await;
    let admin = SigningKey::from_bytes(&[21; 32]);
    let now = Timestamp::now();
    let hour = SignedDuration::from_hours(1);
    cloud
        .snapshot(1, &[key_at("resident", "main", "482916")])
        .await;
    cloud.applied(1).await;
    // Published twice (a QoS 1 redelivery): held once, the second is no refusal.
    for _ in 0..2 {
        cloud
            .delegate("garage-admin", &admin, &["garage"], now, now + hour)
            .await;
    }

    // The main entrance lies outside the admin's doors: refused whole, reported, recorded.
    let main_guest = key_at("guest-main", "main", "1111");
    let garage_guest = key_at("guest-garage", "garage", "2222");
    cloud
        .delta_as(&admin, 1, 2, &[garage_guest.clone(), main_guest], &[])
        .await;
    let reason = cloud
        .rejection("the out-of-scope delta", "keys/delta")
        .await;
    assert!(
        reason.starts_with("outside_delegation:") && reason.contains("main"),
        "{reason}"
    );
    let records = b
        .records_until(|r| !refusals(r, "keys/delta").is_empty())
        .await;
    assert!(
        matches!(refusals(&records, "keys/delta")[..], [Record::CloudRejected { reason, .. }] if reason.contains("outside_delegation")),
        "{records:#?}"
    );
    assert_eq!(held(&b), (1, 1), "nothing of the refused delta applied");
    // Nor may it revoke a key of the main entrance.
    cloud.delta_as(&admin, 1, 2, &[], &["resident"]).await;
    let reason = cloud
        .rejection("the revocation outside scope", "keys/delta")
        .await;
    assert!(reason.contains("resident"), "{reason}");

    // The garage is its to grant: applied, and the activity record says who granted it.
    cloud.delta_as(&admin, 1, 2, &[garage_guest], &[]).await;
    cloud.applied(2).await;
    let answer = b.present(2, CredentialKind::Pin, "2222").await;
    assert!(granted(&answer), "{answer:?}");
    assert!(granted(&b.present(1, CredentialKind::Pin, "482916").await));
    let issuer_of = |records: &[Record], id: &str| {
        records.iter().find_map(|r| match r {
            Record::Activity(a) if a.key_id.as_deref() == Some(id) => Some(a.issuer.clone()),
            _ => None,
        })
    };
    let records = b
        .records_until(|r| {
            issuer_of(r, "guest-garage").is_some() && issuer_of(r, "resident").is_some()
        })
        .await;
    assert_eq!(
        issuer_of(&records, "guest-garage"),
        Some(Some("garage-admin".into()))
    );
    assert_eq!(issuer_of(&records, "resident"), Some(Some("root".into())));

    // The root revokes the delegation: the admin's next delta is refused, even for the garage.
    let revoke =
        build::revoke_delegation(&target(), "garage-admin", Timestamp::now(), &cloud_key())
            .unwrap();
    cloud.client.publish_delta(&topics(), revoke).await.unwrap();
    cloud
        .delta_as(
            &admin,
            2,
            3,
            &[key_at("guest-garage-2", "garage", "3333")],
            &[],
        )
        .await;
    let reason = cloud
        .rejection("the revoked admin's delta", "keys/delta")
        .await;
    assert!(reason.contains("not trusted"), "{reason}");
    // A replay of the revoked delegation does not bring it back.
    cloud
        .delegate(
            "garage-admin",
            &admin,
            &["garage"],
            Timestamp::now(),
            Timestamp::now() + hour,
        )
        .await;
    let reason = cloud
        .rejection("the replayed delegation", "keys/delta")
        .await;
    assert!(reason.contains("revoked"), "{reason}");

    assert_eq!(held(&b), (2, 2));
    b.stop().await;
}

/// A delegation whose `not_after` has passed grants nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_delegation_grants_nothing() {
    let (_broker, mut cloud, mut b) = online().await;
    let now = Timestamp::now();
    let hour = SignedDuration::from_hours(1);
    cloud
        .snapshot(1, &[key_at("resident", "main", "482916")])
        .await;
    cloud.applied(1).await;
    let late = SigningKey::from_bytes(&[22; 32]);
    cloud
        .delegate(
            "late-admin",
            &late,
            &["garage"],
            now - hour - hour,
            now - hour,
        )
        .await;
    cloud
        .delta_as(&late, 1, 2, &[key_at("guest-late", "garage", "4444")], &[])
        .await;
    let reason = cloud
        .rejection("the expired delegate's delta", "keys/delta")
        .await;
    assert!(
        reason.starts_with("outside_delegation:") && reason.contains("expired"),
        "{reason}"
    );
    assert_eq!(held(&b), (1, 1));
    assert_eq!(
        denied(&b.present(2, CredentialKind::Pin, "4444").await),
        Some(DenyReason::UnknownCredential)
    );
    b.stop().await;
}
