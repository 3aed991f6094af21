//! The cloud link end to end, as deployed: the real `doorbridge run` binary against the real
//! mosquitto (the reference broker), with the test acting as the cloud through
//! [`CloudClient`] and a fixed test signing key.
//!
//! The gateway's process, files and reports are [`crate::gateway`]'s; its store is read while it
//! runs (read-only, WAL). Every wait polls a condition with a deadline; the daemon is killed if
//! a test panics ([`Daemon`]'s `Drop`), and mosquitto by its own guard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use doorbridge::access::Key;
use doorbridge::cloud::payload::Target;
use doorbridge::cloud::report::{Presence, Report};
use doorbridge::cloud::topics::Channel;
use doorbridge_sim::build::{self, SignedSnapshot};
use doorbridge_sim::cloud::CloudClient;
use ed25519_dalek::SigningKey;
use jiff::Timestamp;

use crate::broker::{
    Mosquitto, Proxy, mosquitto_or_skip, mosquitto_uncapped_or_skip, publish_oversized,
};
use crate::fixtures::{self, SALT};
use crate::gateway::{Cloud, Daemon, Home, WAIT, cloud_key, keys};

/// How long installing a 100,000-key snapshot may take in a debug build on 2 cores.
const BIG_WAIT: Duration = Duration::from_secs(600);
/// Keys in the large snapshot of the kill test.
const BIG: usize = 100_000;

/// A key the gateway does not trust.
fn forger_key() -> SigningKey {
    SigningKey::from_bytes(&[9; 32])
}

/// The gateway of these tests, talking to the broker at `url` (plain MQTT).
fn link_home(url: &str) -> Home {
    let target = Target {
        site: "site-link".into(),
        gateway: "gw-link-1".into(),
    };
    Home::new(url, target, &[])
}

/// The retained `state` of the gateway, as a new subscriber finds it on the broker.
async fn retained_state(url: &str, home: &Home) -> Report {
    let fresh = CloudClient::connect(url, "cloud-fresh")
        .await
        .expect("a fresh client connects");
    let mut rx = fresh
        .subscribe(&home.topics.topic(Channel::State))
        .await
        .expect("subscribe to state");
    let (_, payload) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a retained state within the wait")
        .expect("a retained state");
    let _ = fresh.disconnect().await;
    Report::decode(&payload).expect("a state report")
}

/// A gateway with a key set installed over MQTT: broker, files, daemon, cloud.
async fn gateway_with(
    broker: &Mosquitto,
    home: &Home,
    version: u64,
    keys: &[Key],
) -> (Daemon, Cloud) {
    let mut cloud = Cloud::connect(&broker.url(), home, "cloud").await;
    let daemon = Daemon::start(home);
    cloud.reports.state(Presence::Online, Some(0)).await;
    cloud.install(version, keys).await;
    (daemon, cloud)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_a_delta_arrive_through_mosquitto() {
    let Some(broker) = mosquitto_or_skip("a_snapshot_and_a_delta_arrive_through_mosquitto") else {
        return;
    };
    let home = link_home(&broker.url());
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud").await;
    let mut daemon = Daemon::start(&home);
    cloud.reports.state(Presence::Online, Some(0)).await;

    let set = keys("k", 2_000);
    let snapshot = cloud.snapshot(1, &set);
    let started = Instant::now();
    cloud.publish_snapshot(&snapshot).await;
    let applied = cloud.reports.applied(1, WAIT).await;
    eprintln!(
        "2,000 keys: {} chunks, {} bytes, applied {:?} after the publish started",
        snapshot.chunks.len(),
        snapshot.total_bytes(),
        started.elapsed()
    );
    assert!(
        matches!(
            applied,
            Report::Applied {
                keys: Some(2_000),
                ..
            }
        ),
        "{applied:?}"
    );
    // `applied` follows the commit: the store shows it already.
    assert_eq!(home.held(), (1, 2_000));
    assert_eq!(home.by_pin("k17").expect("k17's PIN").id, "k17");
    assert!(home.by_pin("no such pin").is_none());

    cloud.publish_delta(cloud.delta(1, 2, &[], &["k17"])).await;
    let applied = cloud.reports.applied(2, WAIT).await;
    assert!(
        matches!(applied, Report::Applied { keys: None, .. }),
        "{applied:?}"
    );
    assert_eq!(
        home.held(),
        (2, 2_000),
        "a deleted key stays as a tombstone"
    );
    assert!(home.by_pin("k17").expect("k17's tombstone").revoked);
    assert!(!home.by_pin("k18").expect("k18").revoked);
    // The state follows every change.
    cloud.reports.state(Presence::Online, Some(2)).await;

    let stopping = Instant::now();
    let exit = daemon.terminate().await;
    eprintln!("SIGTERM to exit: {:?}", stopping.elapsed());
    assert!(exit.success(), "SIGTERM: {exit:?}");
    // The link says `offline` itself on the way out, naming what it holds…
    cloud.reports.state(Presence::Offline, Some(2)).await;
    // …and the broker keeps an `offline` for whoever looks next.
    let state = retained_state(&broker.url(), &home).await;
    assert!(
        matches!(
            &state,
            Report::State { state: Presence::Offline, gateway, .. } if *gateway == home.target.gateway
        ),
        "{state:?}"
    );
}

/// Stricter than the test above: the retained state after a clean stop is the link's own
/// `offline` (with the held version), not the will, and the stop does not wait out the link's
/// 2 s poller timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_the_links_own_offline_not_the_will() {
    let Some(broker) = mosquitto_or_skip("a_clean_stop_leaves_the_links_own_offline_not_the_will")
    else {
        return;
    };
    let home = link_home(&broker.url());
    let (mut daemon, _cloud) = gateway_with(&broker, &home, 1, &keys("k", 5)).await;
    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
    assert_eq!(
        daemon.count(&["cloud link poller did not finish in time"]),
        0,
        "the poller should end with the clean disconnect"
    );
    let state = retained_state(&broker.url(), &home).await;
    let Report::State {
        state,
        gateway,
        held,
        identity,
    } = state
    else {
        panic!("a state report expected: {state:?}")
    };
    assert_eq!(
        (state, gateway, held),
        (Presence::Offline, home.target.gateway.clone(), Some(1)),
        "the link's own offline, not the will"
    );
    assert!(
        identity.is_some(),
        "the link's own state names its identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_away_and_back_the_gateway_catches_up() {
    let Some(mut broker) = mosquitto_or_skip("broker_away_and_back_the_gateway_catches_up") else {
        return;
    };
    let home = link_home(&broker.url());
    let (mut daemon, cloud) = gateway_with(&broker, &home, 1, &keys("k", 50)).await;
    drop(cloud);

    broker.stop();
    daemon
        .until_logged(&["lost the broker connection"], 1, WAIT)
        .await;
    // At least one attempt refused while the broker is down: a real outage, not a blip.
    daemon
        .until_logged(&["broker connection failed"], 1, WAIT)
        .await;
    assert_eq!(home.held(), (1, 50), "the held set serves on meanwhile");

    broker.start_again();
    daemon
        .until_logged(&["connected to the broker"], 2, WAIT)
        .await;
    assert_eq!(
        daemon.count(&["connected to the broker", "session_present=true"]),
        1,
        "mosquitto kept the gateway's session across its restart; broker log:\n{}",
        broker.log()
    );
    let mut cloud = Cloud::connect(&broker.url(), &home, "cloud-again").await;
    // The retained state names the held version (the one from before, or the new publish).
    cloud.reports.state(Presence::Online, Some(1)).await;
    cloud.publish_delta(cloud.delta(1, 2, &[], &["k3"])).await;
    cloud.reports.applied(2, WAIT).await;
    assert_eq!(home.held(), (2, 50));
    assert!(home.by_pin("k3").expect("k3").revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_sent_while_the_gateway_is_cut_off_is_applied_once_it_is_back() {
    let Some(broker) =
        mosquitto_or_skip("a_delta_sent_while_the_gateway_is_cut_off_is_applied_once_it_is_back")
    else {
        return;
    };
    let proxy = Proxy::start(broker.port());
    let home = link_home(&proxy.url());
    let (mut daemon, mut cloud) = gateway_with(&broker, &home, 1, &keys("k", 50)).await;
    cloud.reports.state(Presence::Online, Some(1)).await;

    proxy.cut();
    // The broker saw the gateway go (its will) and queues for the persistent session.
    cloud.reports.state(Presence::Offline, None).await;
    daemon
        .until_logged(&["lost the broker connection"], 1, WAIT)
        .await;
    cloud.publish_delta(cloud.delta(1, 2, &[], &["k3"])).await;
    assert_eq!(
        home.held(),
        (1, 50),
        "nothing reaches a gateway that is cut off"
    );

    proxy.restore();
    cloud.reports.state(Presence::Online, Some(1)).await;
    cloud.reports.applied(2, WAIT).await;
    assert_eq!(home.held(), (2, 50));
    assert!(home.by_pin("k3").expect("k3").revoked);
    assert_eq!(
        daemon.count(&["connected to the broker", "session_present=true"]),
        1,
        "the reconnection found its session"
    );
}

/// The large snapshot (version 2, [`BIG`] keys `b0…`) for `target`, built off the runtime.
async fn big_snapshot(target: Target) -> Arc<SignedSnapshot> {
    let (snapshot, built_in) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let keys = keys("b", BIG);
        let snapshot = build::snapshot(&target, 2, Timestamp::now(), SALT, &keys, &cloud_key())
            .expect("build the large snapshot");
        (snapshot, started.elapsed())
    })
    .await
    .unwrap();
    eprintln!(
        "{BIG} keys: {} chunks, {} bytes, built in {built_in:?}",
        snapshot.chunks.len(),
        snapshot.total_bytes()
    );
    Arc::new(snapshot)
}

fn big_count() -> u64 {
    u64::try_from(BIG).unwrap()
}

/// What the store holds after the kill: the old set or the new one, never a mix.
fn old_or_new(home: &Home) -> (u64, u64) {
    let (version, count) = home.held();
    match version {
        1 => {
            assert_eq!(count, 1_000, "exactly the old set");
            assert!(home.by_pin("a999").is_some(), "an old PIN still opens");
            assert!(home.by_pin("b0").is_none(), "no PIN of the new set");
        }
        2 => {
            assert_eq!(count, big_count(), "all of the new set");
            assert!(home.by_pin("b99999").is_some());
            assert!(home.by_pin("a0").is_none());
        }
        other => panic!("version {other} after the kill"),
    }
    // The killed writer's lock went with it: the store opens for writing (and recovers).
    let store = fixtures::open(&home.db);
    let info = store.reader().unwrap().key_set().unwrap();
    assert_eq!((info.version, info.keys), (version, count));
    store.close();
    (version, count)
}

/// Acting as the cloud after the gateway's restart: republishes `big` whenever the gateway
/// says it holds less than version 2 (`state`) or asks for a resync, until version 2 is live.
/// Returns how many times it published and how long version 2 took after the first.
async fn republish_until_live(
    cloud: &mut Cloud,
    big: &Arc<SignedSnapshot>,
) -> (usize, Option<Duration>) {
    let mut tasks = Vec::new();
    let mut first = None;
    let deadline = Instant::now() + BIG_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let report = cloud
            .reports
            .next("version 2 live", left, |channel, r| match r {
                Report::State { state, .. } => {
                    channel == Channel::State && *state == Presence::Online
                }
                Report::Resync { .. } | Report::Applied { .. } => true,
                _ => false,
            })
            .await;
        match report {
            Report::Applied {
                version: 2, keys, ..
            } => {
                assert_eq!(keys, Some(big_count()));
                break;
            }
            Report::State { held: Some(2), .. } => break,
            Report::Applied { version, .. } => panic!("applied {version} instead of 2"),
            Report::State { held: Some(1), .. } | Report::Resync { .. } => {
                first.get_or_insert_with(Instant::now);
                tasks.push(cloud.publish_snapshot_in_background(Arc::clone(big)));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = first.map(|t| t.elapsed());
    let count = tasks.len();
    for task in tasks {
        task.await.unwrap();
    }
    (count, took)
}

/// Installs 1,000 keys `a0…` as version 1, publishes the large snapshot, SIGKILLs the gateway
/// once `kill_after(chunks)` of its chunks are logged as staged, and checks that the store
/// holds the old set or the new one, never a mix. Then restarts it and, acting as the cloud,
/// republishes whenever the gateway says it holds less than version 2 (`state`) or asks for a
/// resync, until version 2 is live.
async fn kill_during_the_large_snapshot(test: &str, kill_after: impl Fn(usize) -> usize) {
    let Some(broker) = mosquitto_or_skip(test) else {
        return;
    };
    let home = link_home(&broker.url());
    let building = tokio::spawn(big_snapshot(home.target.clone()));
    let (mut daemon, mut cloud) = gateway_with(&broker, &home, 1, &keys("a", 1_000)).await;
    let big = building.await.unwrap();
    let chunks = big.chunks.len();
    assert!(chunks >= 8, "large enough to kill mid-way: {chunks} chunks");
    let kill_at = kill_after(chunks);

    let started = Instant::now();
    let publishing = cloud.publish_snapshot_in_background(Arc::clone(&big));
    daemon
        .until_logged(&["key-set snapshot started", "version=2"], 1, BIG_WAIT)
        .await;
    daemon
        .until_logged(&["chunk staged", "version=2"], kill_at, BIG_WAIT)
        .await;
    daemon.kill9().await;
    let staged = daemon.count(&["chunk staged", "version=2"]);
    eprintln!(
        "killed after {staged} of {chunks} chunks logged as staged, {:?} after the publish \
         started",
        started.elapsed()
    );
    // The broker saw it go (the will), and holds the rest for its session.
    cloud.reports.state(Presence::Offline, None).await;
    publishing.await.unwrap();

    let (version, _) = old_or_new(&home);
    // Back up.
    let rejected_before = cloud.reports.rejections_recorded(&home).len();
    let seen_before = cloud.reports.seen.len();
    let mut daemon = Daemon::start(&home);
    let (republishes, took) = republish_until_live(&mut cloud, &big).await;
    assert_eq!(home.held(), (2, big_count()));
    assert!(home.by_pin("b0").is_some() && home.by_pin("b99999").is_some());
    assert!(home.by_pin("a0").is_none(), "the old set is gone");

    let after = &cloud.reports.seen[seen_before..];
    let mut rejections: Vec<String> = after
        .iter()
        .filter_map(|(_, r)| match r {
            Report::Rejected {
                channel, reason, ..
            } => Some(format!("{channel}: {reason}")),
            _ => None,
        })
        .collect();
    let rejected = rejections.len();
    rejections.dedup();
    let resyncs = after
        .iter()
        .filter(|(_, r)| matches!(r, Report::Resync { .. }))
        .count();
    let recorded = cloud.reports.rejections_recorded(&home).len() - rejected_before;
    eprintln!(
        "after the restart: held {version}; republished {republishes} time(s), version 2 \
         applied {took:?} after the first; {rejected} rejections reported {rejections:?}, \
         {recorded} recorded in the outbox; {resyncs} resync requests"
    );
    let exit = daemon.terminate().await;
    assert!(exit.success(), "SIGTERM: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_snapshot_leaves_the_old_set_or_the_new_one() {
    kill_during_the_large_snapshot(
        "kill_9_in_the_middle_of_a_snapshot_leaves_the_old_set_or_the_new_one",
        |chunks| chunks / 2,
    )
    .await;
}

/// The last chunk is being staged or the commit is running when the kill lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_as_a_snapshot_commits_leaves_the_old_set_or_the_new_one() {
    kill_during_the_large_snapshot(
        "kill_9_as_a_snapshot_commits_leaves_the_old_set_or_the_new_one",
        |chunks| chunks,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_rolled_back_sets_are_refused_over_mosquitto() {
    let Some(broker) = mosquitto_or_skip("forged_and_rolled_back_sets_are_refused_over_mosquitto")
    else {
        return;
    };
    let home = link_home(&broker.url());
    let set = keys("k", 20);
    let (_daemon, mut cloud) = gateway_with(&broker, &home, 5, &set).await;
    cloud.reports.state(Presence::Online, Some(5)).await;
    let rejected_before = cloud.reports.rejections_recorded(&home).len();

    // A newer set signed by a key the gateway does not trust.
    let forged = build::snapshot(
        &cloud.target,
        6,
        Timestamp::now(),
        SALT,
        &keys("evil", 3),
        &forger_key(),
    )
    .unwrap();
    cloud.publish_snapshot(&forged).await;
    let mut reasons = vec![cloud.reports.rejected(Channel::Manifest).await];
    // (Its one chunk waits, silently, for a manifest that never comes.)
    // An older set, properly signed.
    cloud
        .publish_snapshot(&cloud.snapshot(3, &keys("old", 3)))
        .await;
    reasons.push(cloud.reports.rejected(Channel::Manifest).await);
    // A delta from the past, properly signed.
    cloud.publish_delta(cloud.delta(3, 4, &[], &["k1"])).await;
    reasons.push(cloud.reports.rejected(Channel::Delta).await);
    // A delta signed by the forger.
    let forged_delta = build::delta(
        &cloud.target,
        5,
        6,
        Timestamp::now(),
        &[],
        &["k1".to_owned()],
        &forger_key(),
    )
    .unwrap();
    cloud.publish_delta(forged_delta).await;
    reasons.push(cloud.reports.rejected(Channel::Delta).await);
    // Garbage.
    cloud
        .publish_delta(b"\xa1garbage, not an envelope".to_vec())
        .await;
    reasons.push(cloud.reports.rejected(Channel::Delta).await);
    eprintln!("rejections: {reasons:#?}");

    assert_eq!(home.held(), (5, 20), "the held set is unchanged");
    assert!(!home.by_pin("k1").expect("k1").revoked);
    assert!(home.by_pin("evil0").is_none() && home.by_pin("old0").is_none());
    let recorded = cloud
        .reports
        .await_rejections_recorded(&home, rejected_before + 5, Duration::from_secs(10))
        .await;
    assert!(
        recorded.len() - rejected_before >= 5,
        "each refusal is recorded: {recorded:#?}"
    );

    // The link still takes a genuine delta after all that, in order behind them.
    cloud.publish_delta(cloud.delta(5, 6, &[], &["k1"])).await;
    cloud.reports.applied(6, WAIT).await;
    assert!(home.by_pin("k1").expect("k1").revoked);
}

/// mosquitto takes a message of any size unless told otherwise, and redelivers it to a
/// persistent session at every connect: 2 MiB and 16 MiB on each of the gateway's inbound
/// topics must neither keep the real daemon off the broker nor stop the next delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_on_every_inbound_topic_leave_the_link_up_through_mosquitto() {
    use doorbridge::cloud::link::UNREADABLE;
    let Some(broker) = mosquitto_uncapped_or_skip(
        "oversized_messages_on_every_inbound_topic_leave_the_link_up_through_mosquitto",
    ) else {
        return;
    };
    let home = link_home(&broker.url());
    let (mut daemon, mut cloud) = gateway_with(&broker, &home, 1, &keys("k", 10)).await;
    let mut version = 1;
    for channel in Channel::INBOUND {
        for size in [2 << 20, 16 << 20] {
            let started = Instant::now();
            publish_oversized(&broker.url(), &home.topics.topic(channel), size).await;
            let what = format!("the resync after {size} bytes on {}", channel.suffix());
            cloud
                .reports
                .next(&what, WAIT, |_, r| {
                    matches!(r, Report::Resync { reason, .. } if reason.contains("could not be read"))
                })
                .await;
            let back = started.elapsed();
            let delta = cloud.delta(version, version + 1, &keys(&format!("v{version}-"), 1), &[]);
            cloud.publish_delta(delta).await;
            version += 1;
            cloud.reports.applied(version, WAIT).await;
            eprintln!(
                "{size} bytes on {}: back and resyncing after {back:?}",
                channel.suffix()
            );
        }
    }
    let reported = cloud
        .reports
        .received()
        .iter()
        .filter(|(_, r)| matches!(r, Report::Rejected { channel, .. } if channel == UNREADABLE))
        .count();
    // Up to ten refusals a minute are reported one by one; the rest are counted (coalesced).
    assert!(reported >= 10, "{reported} refusals reported");
    assert_eq!(home.held().0, version);
    daemon.assert_serving().await;
    daemon.terminate().await;
}

/// `cloud.url` lists a dead node and two brokers: the gateway skips the dead one at start,
/// moves to the next broker at once when its broker dies (not after a backoff), and comes back
/// to the first when that one returns and the second dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_brokers_the_gateway_moves_to_the_next_at_once() {
    let Some(mut first) =
        mosquitto_or_skip("with_several_brokers_the_gateway_moves_to_the_next_at_once")
    else {
        return;
    };
    let mut second = Mosquitto::start();
    let dead = format!("mqtt://127.0.0.1:{}", crate::broker::free_port());
    let home = link_home(&first.url());
    home.set_brokers(&[dead, first.url(), second.url()]);
    let mut on_first = Cloud::connect(&first.url(), &home, "cloud-1").await;
    let mut on_second = Cloud::connect(&second.url(), &home, "cloud-2").await;
    let started = Instant::now();
    let mut daemon = Daemon::start(&home);
    on_first.reports.state(Presence::Online, Some(0)).await;
    let past_the_dead_node = started.elapsed();
    on_first.install(1, &keys("k", 10)).await;

    // The first broker dies: the gateway is on the second at once, and takes a delta there.
    let died = Instant::now();
    first.stop();
    on_second.reports.state(Presence::Online, Some(1)).await;
    let failover = died.elapsed();
    on_second
        .publish_delta(on_second.delta(1, 2, &keys("d", 1), &[]))
        .await;
    on_second.reports.applied(2, WAIT).await;
    let delta_applied = died.elapsed();

    // Everything down, then the first returns: found within the bounded backoff (10 s, 12.5 s
    // with jitter), not the minute it used to take.
    let all_down = Instant::now();
    second.stop();
    first.start_again();
    let mut on_first = Cloud::connect(&first.url(), &home, "cloud-1b").await;
    let returned = all_down.elapsed();
    on_first.reports.state(Presence::Online, Some(2)).await;
    let found = all_down.elapsed();
    eprintln!(
        "several brokers: online past a dead first node {past_the_dead_node:?} after start; \
         online on the second {failover:?} after the first died, its delta applied after \
         {delta_applied:?}; all down, the first back after {returned:?} and found after {found:?}"
    );
    assert!(
        daemon.count(&["lost the broker connection"]) >= 2,
        "the daemon logs each lost connection"
    );
    daemon.terminate().await;
}
