//! The door bus end to end, over a real pseudo-terminal, each figure beside its reference:
//!
//! - verify round trip: from the unit's first send of a verify to the decision arriving at the
//!   unit (lookup, decision, a `synchronous=FULL` commit, the answer), p50/p99, beside the
//!   wire time of the same bytes at 115200 and 9600 baud (a pty has no line speed, so the
//!   measured time is the gateway's own) and one `fsync` on the same disk;
//! - verifications per second one bus serves with 8 units presenting at once.
//!
//! Run with `cargo bench --bench bus` (add `-- --quick` for a short run). Writes its section of
//! `docs/performance.md`.

// Rates and sample counts are small; float conversions are for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use doorbridge::access::{Category, Credential, CredentialKind, Key, KeyRules, Schedule, UseLimit};
use doorbridge::bus::frame::{Address, wire_time};
use doorbridge::bus::message::{Grant, Message, Verify};
use doorbridge::config::Config;
use doorbridge::sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use doorbridge::store::{KeySetHeader, Store, StoreOptions};
use tokio::sync::{mpsc, oneshot};

const SALT: &[u8] = b"bench-salt";
const UNITS: u8 = 8;

fn key(n: u8) -> Key {
    let secret = format!("qr-{n:02}");
    Key {
        rules: KeyRules {
            id: format!("k{n}"),
            name: format!("key {n}"),
            category: Category::Friend,
            doors: vec![format!("door-{n}")],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: UseLimit::Unlimited,
            welcome: Some("Welcome".into()),
            floors: vec![],
            revoked: false,
        },
        credentials: vec![Credential {
            kind: CredentialKind::Qr,
            digest: doorbridge::access::credential::digest(
                SALT,
                CredentialKind::Qr,
                secret.as_bytes(),
            ),
        }],
    }
}

fn config(db: &Path, link: &Path) -> Config {
    let mut text = format!(
        "[gateway]\nid = \"gw-bench\"\nsite_id = \"bench\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"mqtt://127.0.0.1\"\n\
         trusted_keys = [\"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c\"]\n\
         [storage]\npath = \"{}\"\n[[buses]]\nname = \"bench\"\nport = \"{}\"\n\
         response_timeout = \"50ms\"\npoll_interval = \"10ms\"\n",
        db.display(),
        link.display()
    );
    for n in 1..=UNITS {
        let _ = write!(
            text,
            "[[buses.units]]\naddress = {n}\ndoor = \"door-{n}\"\n"
        );
    }
    Config::from_toml_str(&text, "bench.toml").expect("bench config")
}

/// The `p`-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One fsync of a small write on the disk under `dir`, p50 and p99 over `n`.
fn fsync_reference(dir: &Path, n: usize) -> (Duration, Duration) {
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("probe file");
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            file.write_all(&[u8::try_from(i % 251).unwrap_or(0); 512])
                .expect("write");
            let t = Instant::now();
            file.sync_data().expect("fsync");
            t.elapsed()
        })
        .collect();
    times.sort();
    (percentile(&times, 50), percentile(&times, 99))
}

fn frame_len(message: &Message) -> usize {
    let frame = message
        .to_frame(Address::unit(1).expect("addr"), 1)
        .expect("frame");
    doorbridge::bus::frame::encode(&frame).len()
}

struct Run {
    round_trips: Vec<Duration>,
    per_second: f64,
}

async fn run(samples: usize, load_for: Duration) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let link = dir.path().join("ttyBENCH");
    let store = Store::open(StoreOptions::new(
        &db,
        doorbridge::store::DecisionContext::new(config(&db, &link).site()),
    ))
    .expect("store");
    store
        .install_key_set(
            KeySetHeader {
                version: 1,
                salt: SALT.to_vec(),
                issued_at: Some(jiff::Timestamp::now()),
            },
            (1..=UNITS).map(key).collect(),
        )
        .await
        .expect("keys");
    store.close();

    let (master, _) = doorbridge::sim::linked_pty(&link).expect("a linked pty");
    let addresses: Vec<Address> = (1..=UNITS).filter_map(Address::unit).collect();
    let units = SimUnits::new(&addresses, SimConfig::default()).expect("sim");
    let (commands, command_rx) = mpsc::channel(256);
    let (output_tx, mut outputs) = mpsc::channel(4096);
    let (stop_sim, sim_stopped) = oneshot::channel::<()>();
    let sim = tokio::spawn(run_sim(
        HangupTolerant::new(master, Duration::from_millis(2)),
        units,
        command_rx,
        output_tx,
        async {
            let _ = sim_stopped.await;
        },
    ));
    let cfg = config(&db, &link);
    let (stop_daemon, daemon_stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        doorbridge::daemon::serve(&cfg, async {
            let _ = daemon_stopped.await;
        })
        .await
    });
    // Wait until every unit's start-up status was acknowledged.
    let mut ready = 0;
    while ready < UNITS {
        if let Some(Output::Acked {
            report: ReportKind::Status,
            ..
        }) = outputs.recv().await
        {
            ready += 1;
        }
    }
    let verify = |n: u8| SimCommand::Verify {
        unit: Address::unit(n).expect("addr"),
        kind: CredentialKind::Qr,
        value: format!("qr-{n:02}").into_bytes(),
        reader: 0,
    };
    // Round trips, one at a time at unit 1.
    let mut round_trips = Vec::with_capacity(samples);
    while round_trips.len() < samples {
        commands.send(verify(1)).await.expect("sim");
        loop {
            if let Output::Decision { latency, .. } = outputs.recv().await.expect("sim output") {
                round_trips.push(latency);
                break;
            }
        }
    }
    round_trips.sort();
    // Throughput: every unit keeps one credential presented at all times.
    for n in 1..=UNITS {
        commands.send(verify(n)).await.expect("sim");
    }
    let start = Instant::now();
    let mut decided = 0u64;
    while start.elapsed() < load_for {
        if let Some(Output::Decision { unit, .. }) = outputs.recv().await {
            decided += 1;
            commands.send(verify(unit.get())).await.expect("sim");
        }
    }
    let per_second = decided as f64 / start.elapsed().as_secs_f64();
    let _ = stop_daemon.send(());
    let _ = daemon.await;
    let _ = stop_sim.send(());
    let _ = sim.await;
    Run {
        round_trips,
        per_second,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples, load_for) = if quick {
        (100, Duration::from_secs(2))
    } else {
        (1000, Duration::from_secs(10))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(run(samples, load_for));
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir on this disk");
    let (fsync50, fsync99) = fsync_reference(dir.path(), samples);

    let verify = Message::Verify(Verify {
        kind: CredentialKind::Qr,
        value: b"qr-01".to_vec(),
        reader: 0,
    });
    let grant = Message::Grant(Grant {
        doors: vec![0],
        welcome: Some("Welcome".into()),
        floors: vec![],
    });
    let bytes = frame_len(&verify) + frame_len(&grant);
    let p50 = percentile(&result.round_trips, 50);
    let p99 = percentile(&result.round_trips, 99);
    let table = format!(
        "| figure | measured | reference |\n| --- | --- | --- |\n\
         | verify round trip over a pty, p50 | {} | wire time of its {bytes} bytes: {} at 115200 baud, {} at 9600 baud |\n\
         | verify round trip over a pty, p99 | {} | one fsync on the same disk: p50 {}, p99 {} |\n\
         | verifications per second, one bus, {UNITS} units presenting at once | {:.0}/s | at 115200 baud the wire alone allows {:.0}/s (poll + verify + grant each) |\n",
        ms(p50),
        ms(wire_time(bytes, 115_200)),
        ms(wire_time(bytes, 9_600)),
        ms(p99),
        ms(fsync50),
        ms(fsync99),
        result.per_second,
        1.0 / wire_time(bytes + 10, 115_200).as_secs_f64(),
    );
    println!("{table}");
    let section = format!(
        "<!-- bench:bus -->\n### Door bus over a pty (`cargo bench --bench bus`)\n\n\
         Measured {} with {} round trips{}. A pty has no line speed: the measured time is the \
         gateway's own work (lookup, decision, a durable commit, the answer); on a real line add \
         the wire time.\n\n{table}\n<!-- /bench:bus -->",
        jiff::Zoned::now().strftime("%Y-%m-%d %H:%M %Z"),
        result.round_trips.len(),
        if quick { " (--quick)" } else { "" },
    );
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/performance.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Performance\n".into());
    let new = match (
        old.find("<!-- bench:bus -->"),
        old.find("<!-- /bench:bus -->"),
    ) {
        (Some(a), Some(b)) if b > a => {
            format!(
                "{}{section}{}",
                &old[..a],
                &old[b + "<!-- /bench:bus -->".len()..]
            )
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(&doc, new).expect("write docs/performance.md");
}
