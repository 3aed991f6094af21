//! The decision path's pure and stored parts, each beside a reference measured in the same run:
//!
//! - `decision/engine`: the pure decision for a weekly-window, per-door-limited key with an
//!   inner door (the most work the engine does);
//! - `lookup_1m/store`: finding a credential among 1,000,000 stored keys and decoding its rules,
//!   as the writer does for every request, beside `lookup_1m/raw_select`: a plain indexed
//!   `SELECT` of the same credential row.
//!
//! Run with `cargo bench --bench access`; it writes its table into `docs/performance.md`.
//! The million-key database is built once under `target/bench-data/` and reused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use doorbridge::access::{
    self, Category, ClockTrust, Credential, CredentialKind, Door, Key, KeyRules, Policy, Schedule,
    Site, UseLimit, Uses, WeekdaySet, Window, credential,
};
use doorbridge::store::{DecisionContext, KeySetHeader, Store, StoreOptions};
use jiff::civil::{Weekday, time};

use doorbridge_testkit::bench as support;

const KEYS: u32 = 1_000_000;
const SALT: &[u8] = b"bench-salt";

fn site() -> Site {
    let mut doors = BTreeMap::new();
    for d in ["main", "garage", "side"] {
        doors.insert(d.into(), Door::default());
    }
    doors.insert(
        "inner".into(),
        Door {
            inner: true,
            behind: vec!["main".into()],
        },
    );
    Site {
        tz: jiff::tz::TimeZone::get("Europe/Berlin").expect("tzdata"),
        doors,
    }
}

fn rules(i: u32) -> KeyRules {
    KeyRules {
        id: format!("key-{i:07}").into(),
        name: format!("Visitor {i}"),
        category: Category::ALL[(i % 7) as usize],
        doors: vec!["main".into(), "garage".into()],
        opens_inner_door: true,
        valid_from: Some("2026-01-01T00:00:00Z".parse().expect("ts")),
        valid_until: Some("2027-01-01T00:00:00Z".parse().expect("ts")),
        schedule: Schedule::Weekly {
            days: WeekdaySet::of(&[Weekday::Monday, Weekday::Wednesday, Weekday::Friday]),
            window: Some(Window {
                start: time(22, 0, 0, 0),
                end: time(6, 0, 0, 0),
            }),
        },
        use_limit: UseLimit::PerDoor(5),
        welcome: Some("Welcome!".into()),
        floors: vec![3, 4],
        revoked: false,
        issuer: None,
    }
}

fn secret(i: u32) -> String {
    format!("qr-token-{i:07}")
}

fn context() -> DecisionContext {
    DecisionContext::new(site())
}

/// Builds (once per schema version, since a migrated file would keep the old rows' layout) a
/// store with a million keys, one QR credential each.
fn million_key_db() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).expect("bench dir");
    let name = format!("keys-1m-v{}", doorbridge::store::schema::latest_version());
    let path = dir.join(format!("{name}.db"));
    let ready = dir.join(format!("{name}.ready"));
    if ready.exists() && path.exists() {
        return path;
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("{name}.db{suffix}")));
    }
    eprintln!(
        "building a {KEYS}-key store under {} (once)…",
        dir.display()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = Store::open(StoreOptions::new(&path, context())).expect("store");
    rt.block_on(async {
        let header = KeySetHeader {
            version: 1,
            salt: SALT.to_vec(),
            issued_at: Some(jiff::Timestamp::now()),
            stale_after: doorbridge::access::StaleLimits::default(),
        };
        let generation = store.begin_key_set(header).await.expect("begin");
        let mut i = 0;
        while i < KEYS {
            let chunk: Vec<Key> = (i..(i + 5_000).min(KEYS))
                .map(|n| Key {
                    rules: rules(n),
                    credentials: vec![Credential {
                        kind: CredentialKind::Qr,
                        digest: credential::digest(SALT, CredentialKind::Qr, secret(n).as_bytes()),
                    }],
                })
                .collect();
            i += u32::try_from(chunk.len()).expect("chunk");
            store.stage_keys(generation, chunk).await.expect("stage");
        }
        store
            .commit_key_set(generation, u64::from(KEYS))
            .await
            .expect("commit");
    });
    store.close();
    std::fs::write(&ready, b"ok").expect("marker");
    path
}

fn bench_decision(c: &mut Criterion) {
    let site = site();
    let key = rules(1);
    // Monday 23:30 in Berlin: inside the overnight window.
    let now: jiff::Timestamp = "2026-11-23T22:30:00Z".parse().expect("ts");
    let mut group = c.benchmark_group("decision");
    group.bench_function("engine", |b| {
        b.iter(|| {
            access::decide(
                black_box(&site),
                Policy::default(),
                black_box(&key),
                black_box("main"),
                Uses {
                    total: 3,
                    at_door: 2,
                },
                black_box(now),
                ClockTrust::Trusted,
            )
        });
    });
    group.bench_function("digest", |b| {
        b.iter(|| credential::digest(SALT, CredentialKind::Qr, black_box(b"qr-token-0123456")));
    });
    group.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let path = million_key_db();
    let store = Store::open(StoreOptions::new(&path, context())).expect("store");
    let reader = store.reader().expect("reader");
    let generation = reader.key_set().expect("info").generation;
    let digests: Vec<[u8; 32]> = (0..1024u32)
        .map(|i| {
            let n = i.wrapping_mul(977) % KEYS;
            credential::digest(SALT, CredentialKind::Qr, secret(n).as_bytes()).0
        })
        .collect();
    let mut group = c.benchmark_group("lookup_1m");
    group.bench_with_input(
        BenchmarkId::from_parameter("store"),
        &digests,
        |b, digests| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % digests.len();
                reader
                    .key_by_digest(&digests[i])
                    .expect("lookup")
                    .expect("found")
            });
        },
    );
    group.bench_with_input(
        BenchmarkId::from_parameter("raw_select"),
        &digests,
        |b, digests| {
            let conn = reader.connection();
            let mut stmt = conn
                .prepare("SELECT key_id FROM credentials WHERE generation = ?1 AND digest = ?2")
                .expect("prepare");
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % digests.len();
                let id: String = stmt
                    .query_row(rusqlite::params![generation, &digests[i]], |r| r.get(0))
                    .expect("row");
                id
            });
        },
    );
    group.finish();
    drop(reader);
    store.close();
}

/// The median estimate criterion saved for `id`, in nanoseconds.
fn median_ns(id: &str) -> Option<f64> {
    // Where criterion writes: the target directory, wherever `CARGO_TARGET_DIR` puts it.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let file = Path::new(&target)
        .join("criterion")
        .join(id)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Replaces this bench's section of docs/performance.md.
fn write_report(conditions: &support::Conditions) {
    let rows = [
        (
            "decision/engine",
            "pure decision (weekly overnight window, per-door limit, inner door)",
            None,
        ),
        ("decision/digest", "credential digest (SHA-256)", None),
        (
            "lookup_1m/store",
            "credential lookup + rules decode among 1,000,000 keys",
            Some("lookup_1m/raw_select"),
        ),
        (
            "lookup_1m/raw_select",
            "reference: raw indexed `SELECT` of the same credential row",
            None,
        ),
    ];
    let mut table =
        String::from("| figure | median | reference | ratio |\n| --- | --- | --- | --- |\n");
    for (id, what, reference) in rows {
        let Some(ns) = median_ns(id) else { continue };
        let (rf, ratio) = match reference.and_then(median_ns) {
            Some(r) => (fmt_ns(r), format!("{:.2}×", ns / r)),
            None => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            table,
            "| {what} (`{id}`) | {} | {rf} | {ratio} |",
            fmt_ns(ns)
        );
    }
    let section = format!(
        "<!-- bench:access -->\n### Access engine and lookup (`cargo bench --bench access`)\n\n\
         Measured {}{} on {}. {}\n\n{table}\n<!-- /bench:access -->",
        support::now(),
        if quick() { " (`--quick`)" } else { "" },
        support::machine(),
        conditions.describe(),
    );
    support::write_section("access", &section);
    if let (Some(store), Some(raw)) = (
        median_ns("lookup_1m/store"),
        median_ns("lookup_1m/raw_select"),
    ) {
        support::write_summary(&[support::Summary {
            id: "P3",
            figure: "credential lookup (and rules decode) among 1,000,000 keys, median",
            measured: format!("{} ({:.2}×)", fmt_ns(store), store / raw),
            reference: format!("a raw indexed `SELECT` of the same row: {}", fmt_ns(raw)),
            target: "≤ 3×",
            met: store <= 3.0 * raw,
            bench: "access",
            quick: quick(),
            load: conditions.run_load(),
        }]);
    }
}

fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

fn main() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&data).expect("bench dir");
    let mut conditions = support::Conditions::start(&data);
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    bench_decision(&mut c);
    bench_lookup(&mut c);
    c.final_summary();
    conditions.finish();
    write_report(&conditions);
}
