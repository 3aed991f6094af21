//! The door bus end to end, over a real pseudo-terminal, each figure beside its reference:
//!
//! - verify round trip: from the unit's first send of a verify to the decision arriving at the
//!   unit (lookup, decision, a `synchronous=FULL` commit, the answer), p50/p99, beside the
//!   wire time of the same bytes at 115200 and 9600 baud (a pty has no line speed, so the
//!   measured time is the gateway's own) and one `fsync` on the same disk;
//! - verifications per second one bus serves with 8 units presenting at once;
//! - P2, durable decisions per second with 1 and 8 units presenting at once (group commit),
//!   straight on the store, beside one `fsync` on the same disk;
//! - P8, one polling cycle over 32 units at 115200 baud beside the wire-time lower bound (the
//!   wire times of its polls and answers): the pure session on a virtual line where every
//!   frame occupies the line for its wire time (deterministic), with the session's own CPU
//!   time per cycle measured; and the real driver over a pty, where the gap from a unit's
//!   answer to the next poll is the gateway's own (turnaround wait, scheduling, processing).
//!
//! Run with `cargo bench --bench bus` (add `-- --quick` for a short run). Writes its section of
//! `docs/performance.md`; `-- --p1` and `-- --p2` run P1 or P2 alone and only print it.

// Rates and sample counts are small; float conversions are for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, Key};
use doorbridge::bus::frame::{Address, Decoder, Direction, wire_time};
use doorbridge::bus::message::{Grant, Message, Verify};
use doorbridge::bus::session::{Report, Session, SessionConfig, SessionEvent};
use doorbridge::config::Config;
use doorbridge_sim::{
    HangupTolerant, Output, ReportKind, SimCommand, SimConfig, SimUnits, run_sim,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use doorbridge_testkit::bench as support;

const UNITS: u8 = 8;

fn key(n: u8) -> Key {
    let mut key = support::key(
        format!("k{n}"),
        &format!("door-{n}"),
        CredentialKind::Qr,
        format!("qr-{n:02}").as_bytes(),
    );
    key.rules.welcome = Some("Welcome".into());
    key
}

fn config(db: &Path, link: &Path, units: u8) -> Config {
    let mut text = format!(
        "[gateway]\nid = \"gw-bench\"\nsite_id = \"bench\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"mqtt://127.0.0.1\"\n\
         trusted_keys = [\"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c\"]\n\
         [storage]\npath = \"{}\"\n[[buses]]\nname = \"bench\"\nport = \"{}\"\n\
         response_timeout = \"50ms\"\npoll_interval = \"10ms\"\n",
        db.display(),
        link.display()
    );
    for n in 1..=units {
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
    let fsync = support::fsync_probe(dir, n);
    (fsync.p50, fsync.p99)
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

/// `count` simulated units on one bus of the daemon (in process) over a pty: `samples` verify
/// round trips at unit 1, one at a time, then `load_for` with every unit keeping a credential
/// presented (none when zero).
async fn run(count: u8, samples: usize, load_for: Duration) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let link = dir.path().join("ttyBENCH");
    support::install_keys(
        &db,
        config(&db, &link, count).site(),
        support::SALT,
        (1..=count).map(key).collect(),
    )
    .await;

    let (master, _) = doorbridge_sim::linked_pty(&link).expect("a linked pty");
    let addresses: Vec<Address> = (1..=count).filter_map(Address::unit).collect();
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
    let cfg = config(&db, &link, count);
    let (stop_daemon, daemon_stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        doorbridge::daemon::serve(&cfg, async {
            let _ = daemon_stopped.await;
        })
        .await
    });
    // Wait until every unit's start-up status was acknowledged.
    let mut ready = 0;
    while ready < count {
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
    for n in (1..=count).filter(|_| !load_for.is_zero()) {
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

// ---------------------------------------------------------------------------------------------
// P8: one polling cycle over 32 units at 115200 baud
// ---------------------------------------------------------------------------------------------

const CYCLE_UNITS: u8 = 32;
const BAUD: u32 = 115_200;
/// Cycles run before measuring: the units' start-up status reports are stored and acked.
const WARMUP_CYCLES: usize = 3;

/// The session as `doorbridge run` configures it for 32 units with the defaults (and
/// `turnaround` if given), saturated: the next cycle starts as soon as the line is free (with
/// the default `poll_interval`, 200 ms, the bus would rest in between).
fn cycle_session(turnaround: Option<&str>) -> SessionConfig {
    let dir = Path::new("/nonexistent");
    let mut config = config(&dir.join("db"), &dir.join("tty"), CYCLE_UNITS);
    config.buses[0].turnaround = turnaround.map(parse_duration);
    let mut session = doorbridge::daemon::bus_spec(&config, &config.buses[0]).session;
    session.min_cycle = Duration::ZERO;
    session
}

struct VirtualCycles {
    cycle: Duration,
    /// The wire times of the cycle's frames (32 polls, 32 answers).
    bound: Duration,
    /// The gateway's quiet gap.
    turnaround: Duration,
    /// Wall time spent inside the session's calls per cycle (CPU-bound code).
    session_cpu: Duration,
    cycles: usize,
}

/// Runs the pure session against 32 simulated units on a virtual half-duplex line: a frame
/// occupies the line for its wire time and is heard when its last byte is; a unit starts its
/// answer `reply_delay` after the end of the frame addressed to it. Reports are "stored" at
/// once. Asserts that nobody ever talks over anybody.
fn virtual_cycles(config: SessionConfig, reply_delay: Duration, cycles: usize) -> VirtualCycles {
    let turnaround = config.turnaround;
    let first = config.units[0];
    let mut units =
        SimUnits::new(&config.units, doorbridge_sim::SimConfig::default()).expect("sim");
    let mut session = Session::new(config).expect("session");
    let mut now = Duration::ZERO;
    let mut line_free = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    // Per cycle: when its first poll started, and the wire time of its frames.
    let mut starts: Vec<(Duration, Duration, Duration)> = Vec::new();
    while starts.len() <= WARMUP_CYCLES + cycles {
        let t = Instant::now();
        let tx = session.poll_next(now);
        cpu += t.elapsed();
        let Some(tx) = tx else {
            timed(&mut session, &mut cpu, |s| {
                let due = s
                    .next_deadline()
                    .expect("a saturated bus has something due");
                now = now.max(due);
                s.on_timeout(now)
            });
            continue;
        };
        assert!(now >= line_free, "the gateway talks over a unit");
        if tx.to == first {
            starts.push((now, Duration::ZERO, cpu));
        }
        let end = now + wire_time(tx.bytes.len(), BAUD);
        let mut wire = wire_time(tx.bytes.len(), BAUD);
        // The units hear the frame once it is on the line; so does the gateway (its echo).
        units.on_bytes(&tx.bytes, end);
        timed(&mut session, &mut cpu, |s| s.on_bytes(&tx.bytes, end));
        now = end;
        line_free = end;
        if let Some(answer) = units.poll_transmit(end) {
            assert!(tx.expects_reply);
            let answer_end = end + reply_delay + wire_time(answer.len(), BAUD);
            wire += wire_time(answer.len(), BAUD);
            timed(&mut session, &mut cpu, |s| s.on_bytes(&answer, answer_end));
            now = answer_end;
            line_free = answer_end;
        }
        if let Some(last) = starts.last_mut() {
            last.1 += wire;
        }
    }
    let measured = &starts[WARMUP_CYCLES..];
    let since = |later: Duration, earlier: Duration| later.checked_sub(earlier).expect("later");
    // Every measured cycle is the same on a virtual clock.
    let (cycle, bound) = (since(measured[1].0, measured[0].0), measured[0].1);
    for w in measured.windows(2) {
        assert_eq!((since(w[1].0, w[0].0), w[0].1), (cycle, bound));
    }
    // The CPU time per cycle: the median, as the machine is shared.
    let mut cpu_per_cycle: Vec<Duration> =
        measured.windows(2).map(|w| since(w[1].2, w[0].2)).collect();
    cpu_per_cycle.sort();
    VirtualCycles {
        cycle,
        bound,
        turnaround,
        session_cpu: percentile(&cpu_per_cycle, 50),
        cycles: cpu_per_cycle.len(),
    }
}

/// Runs `f` on the session and acknowledges the reports it yields (storing takes no time
/// here; acknowledging is the session's work), adding the time taken to `cpu`.
fn timed(
    session: &mut Session,
    cpu: &mut Duration,
    f: impl FnOnce(&mut Session) -> Vec<SessionEvent>,
) {
    let t = Instant::now();
    for event in f(session) {
        // (A status report is acknowledged by the session itself: nothing to do for it.)
        if let SessionEvent::Report {
            unit,
            id,
            fingerprint,
            report,
        } = event
            && !matches!(report, Report::Status(_))
        {
            session.ack_report(unit, id, &fingerprint).expect("ack");
        }
    }
    *cpu += t.elapsed();
}

struct PtyCycles {
    /// From a unit's answer written to the next poll read, at the units' end of the pty: the
    /// gateway's own time (reading, the session, the quiet gap, writing) plus the pty's.
    gaps: Vec<Duration>,
    /// From a poll read to its answer written: the simulated units' own time.
    units: Vec<Duration>,
    /// Between two polls to unit 1 (saturated: 32 units take longer than the 10 ms interval).
    cycles: Vec<Duration>,
    turnaround: Duration,
}

/// The real driver (`serve`, in process) polling 32 simulated units over a pty, with the
/// bus's `turnaround` if given. The units run on their own thread and runtime and answer at
/// once; they time what the gateway does.
async fn pty_cycles(samples: usize, turnaround: Option<&str>) -> PtyCycles {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("cycle.db");
    let link = dir.path().join("ttyCYCLE");
    let mut cfg = config(&db, &link, CYCLE_UNITS);
    cfg.buses[0].turnaround = turnaround.map(parse_duration);
    let turnaround = doorbridge::daemon::bus_spec(&cfg, &cfg.buses[0])
        .session
        .turnaround;
    let (master, _) = doorbridge_sim::linked_pty(&link).expect("a linked pty");
    let addresses: Vec<Address> = (1..=CYCLE_UNITS).filter_map(Address::unit).collect();
    let units_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut port = HangupTolerant::new(master, Duration::from_millis(2));
            let mut units =
                SimUnits::new(&addresses, doorbridge_sim::SimConfig::default()).expect("sim");
            let mut frames = Decoder::new();
            let start = Instant::now();
            let mut buf = [0u8; 512];
            let mut acked = 0;
            let mut answered: Option<Instant> = None;
            let mut polls_to_first: Vec<Instant> = Vec::new();
            let mut gaps = Vec::with_capacity(samples);
            let mut own = Vec::with_capacity(samples);
            while gaps.len() < samples {
                let n = port.read(&mut buf).await.expect("read the pty");
                let at = Instant::now();
                let ready = acked >= addresses.len();
                for frame in frames.feed(&buf[..n]).into_iter().flatten() {
                    if ready
                        && frame.direction() == Direction::ToUnit
                        && frame.address() == addresses[0]
                    {
                        polls_to_first.push(at);
                    }
                }
                for out in units.on_bytes(&buf[..n], start.elapsed()) {
                    if let Output::Acked {
                        report: ReportKind::Status,
                        ..
                    } = out
                    {
                        acked += 1;
                    }
                }
                while let Some(bytes) = units.poll_transmit(start.elapsed()) {
                    if let Some(prev) = answered.take()
                        && ready
                    {
                        gaps.push(at - prev);
                    }
                    port.write_all(&bytes).await.expect("write the pty");
                    let now = Instant::now();
                    if ready {
                        own.push(now - at);
                    }
                    answered = Some(now);
                }
            }
            let cycles: Vec<Duration> = polls_to_first.windows(2).map(|w| w[1] - w[0]).collect();
            (gaps, own, cycles)
        })
    });
    let (stop_daemon, daemon_stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        doorbridge::daemon::serve(&cfg, async {
            let _ = daemon_stopped.await;
        })
        .await
    });
    let (mut gaps, mut units, mut cycles) =
        tokio::task::spawn_blocking(move || units_thread.join())
            .await
            .expect("join")
            .expect("the units' thread");
    let _ = stop_daemon.send(());
    let _ = daemon.await;
    gaps.sort();
    units.sort();
    cycles.sort();
    PtyCycles {
        gaps,
        units,
        cycles,
        turnaround,
    }
}

fn parse_duration(text: &str) -> Duration {
    doorbridge::config::values::parse_duration(text).expect("a duration")
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// The P8 table and its notes.
/// P8's table, and its two ratios for the summary: the virtual line's, units answering at once,
/// and the real driver's estimate for a line.
fn cycle_table(quick: bool, rt: &tokio::runtime::Runtime) -> (String, f64, f64) {
    let cycles = if quick { 100 } else { 2000 };
    let at_once = Duration::ZERO;
    // The protocol lets a unit answer no sooner than 1 ms after the gateway's frame (§2).
    let spec_min = Duration::from_millis(1);
    let rows = [
        (
            "default (`turnaround = \"auto\"`), units answer at once",
            virtual_cycles(cycle_session(None), at_once, cycles),
        ),
        (
            "default, units answer after 1 ms (the least the protocol allows them, §2)",
            virtual_cycles(cycle_session(None), spec_min, cycles),
        ),
        (
            "`turnaround = \"2ms\"` (the fixed gap before this change), units at once",
            virtual_cycles(cycle_session(Some("2ms")), at_once, cycles),
        ),
    ];
    let mut table = String::from(
        "| P8: one cycle, 32 units, 115200 baud | gateway's gap | cycle | wire-time lower bound | ratio (target ≤ 1.25×) | session CPU per cycle |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for (what, r) in &rows {
        let _ = writeln!(
            table,
            "| virtual line, {what} | {} | {} | {} | {:.3}× | {} ({:.2} % of the cycle) |",
            us(r.turnaround),
            ms(r.cycle),
            ms(r.bound),
            ratio(r.cycle, r.bound),
            us(r.session_cpu),
            100.0 * ratio(r.session_cpu, r.cycle),
        );
    }
    let samples = if quick { 2_000 } else { 20_000 };
    let poll = wire_time(10, BAUD);
    let wire = (poll + poll) * u32::from(CYCLE_UNITS);
    let mut notes = String::new();
    let mut estimated = 0.0;
    for (what, turnaround) in [
        ("default (`turnaround = \"auto\"`)", None),
        (
            "`turnaround = \"1ms\"` (waited by tokio's timers, which tick in whole ms)",
            Some("1ms"),
        ),
    ] {
        let pty = rt.block_on(pty_cycles(samples, turnaround));
        let gap = percentile(&pty.gaps, 50);
        // On a line: the wire time, and per exchange the gateway's own time (the pty's
        // included); the units answer at once, as on the virtual line.
        let estimate = wire + gap * u32::from(CYCLE_UNITS);
        if turnaround.is_none() {
            estimated = ratio(estimate, wire);
        }
        let _ = writeln!(
            table,
            "| real driver over a pty, {what}, units answer at once | {} | {} (estimate: wire time + 32 × the p50 of a unit's answer → the next poll, {}) | {} | {:.3}× (estimate) | — |",
            us(pty.turnaround),
            ms(estimate),
            us(gap),
            ms(wire),
            ratio(estimate, wire),
        );
        let _ = write!(
            notes,
            "\n- Real driver, {what}: a unit's answer → the next poll p50 {}, p99 {} ({} samples; \
             the gap is {}); the units' own time p50 {}; the pty cycle itself (no wire time) \
             p50 {}, p99 {}.",
            us(gap),
            us(percentile(&pty.gaps, 99)),
            pty.gaps.len(),
            us(pty.turnaround),
            us(percentile(&pty.units, 50)),
            ms(percentile(&pty.cycles, 50)),
            ms(percentile(&pty.cycles, 99)),
        );
    }
    table.push_str(&notes);
    table.push('\n');
    let _ = write!(
        table,
        "\nHow measured: the pure session (`bus::session`) configured as `doorbridge run` \
         configures it for 32 units (defaults, `daemon::bus_spec`), saturated (the next cycle \
         starts as soon as the line is free; with the default `poll_interval` of 200 ms the bus \
         rests in between), against 32 simulated units (`sim::SimUnits`) on a virtual \
         half-duplex line: a frame occupies the line for its wire time at 115200 baud and is \
         heard when its last byte is; the units answer a poll with idle (10 bytes) at once, or \
         after 1 ms. The cycle is the time between two polls to unit 1 ({} cycles after {} \
         warm-up cycles; every cycle is the same on a virtual clock); the lower bound is the \
         sum of the wire times of its 32 polls and 32 answers. Session CPU is the wall time \
         spent inside the session's calls (CPU-bound code), the median over the cycles. The pty \
         rows run the real driver (`daemon::serve` in process, 2 tokio workers) against the \
         same 32 units on their own thread, which time the gateway from each answer written to \
         the next poll read: a pty has no line speed, so that is the gateway's own time (its \
         quiet gap, scheduling, processing) plus the pty's; the estimate adds it to the wire \
         time, for a line whose UART delivers at once and units that answer at once.\n",
        rows[0].1.cycles, WARMUP_CYCLES,
    );
    let virtual_ratio = ratio(rows[0].1.cycle, rows[0].1.bound);
    (table, virtual_ratio, estimated)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// P2's figures: durable decisions per second with some units presenting at once.
struct GroupCommit {
    units: usize,
    decided: u64,
    elapsed: Duration,
    commits: u64,
}

impl GroupCommit {
    fn per_second(&self) -> f64 {
        self.decided as f64 / self.elapsed.as_secs_f64()
    }
}

/// P2: `units` units presenting at once, each again as soon as its decision is back, for
/// `run_for`, straight on the store as the bus tasks call it (`Store::verify`: lookup, decision,
/// the activity record committed with `synchronous=FULL` before the answer). A bus serves one
/// unit at a time, so units presenting at once are on different buses; their lines' wire time
/// is left out. The store is on the same disk as the fsync reference.
async fn group_commit(units: u8, run_for: Duration) -> GroupCommit {
    use doorbridge::store::{DecisionContext, Store, StoreOptions, VerifyRequest};
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir on this disk");
    let db = dir.path().join("p2.db");
    let site = config(&db, &dir.path().join("ttyNONE"), units).site();
    support::install_keys(
        &db,
        site.clone(),
        support::SALT,
        (1..=units).map(key).collect(),
    )
    .await;
    let store = Store::open(StoreOptions::new(&db, DecisionContext::new(site))).expect("store");
    let commits = || {
        store
            .health()
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let commits_before = commits();
    let start = Instant::now();
    let end = start + run_for;
    // As `doorbridge run` serves them (`drivers::bus::start_bus`): each bus on a thread of its
    // own with a single-threaded runtime, which the store's writer wakes with the answer.
    let tasks: Vec<_> = (1..=units)
        .map(|n| {
            let store = store.clone();
            let bus = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a bus runtime");
            std::thread::spawn(move || {
                bus.block_on(async move {
                    let mut count = 0_u32;
                    while Instant::now() < end {
                        let verdict = store
                            .verify(VerifyRequest {
                                unit: format!("bench/{n}").into(),
                                door: format!("door-{n}").into(),
                                request_id: Some(count),
                                kind: CredentialKind::Qr,
                                secret: format!("qr-{n:02}").into_bytes(),
                                now: jiff::Timestamp::now(),
                                clock_synced: true,
                                // As the door bus sends them: each answer is kept for its
                                // retransmissions.
                                retransmit: Some(doorbridge::store::Retransmit {
                                    fingerprint: {
                                        let mut f = [0; 32];
                                        f[..4].copy_from_slice(&count.to_be_bytes());
                                        f
                                    },
                                    boot_id: Some(1),
                                }),
                            })
                            .await
                            .expect("a decision");
                        assert!(verdict.seq.is_some(), "the decision was recorded");
                        count += 1;
                    }
                    u64::from(count)
                })
            })
        })
        .collect();
    let mut decisions = 0;
    for task in tasks {
        decisions += task.join().expect("a presenting unit");
    }
    let elapsed = start.elapsed();
    let result = GroupCommit {
        units: usize::from(units),
        decided: decisions,
        elapsed,
        commits: commits() - commits_before,
    };
    store.close();
    result
}

/// P2's table, and the reference rate (1 / the slower fsync p50).
fn p2_table(
    p2: &[GroupCommit],
    p2_for: Duration,
    fsync50: Duration,
    fsync50_after: Duration,
) -> (String, f64) {
    let fsync_rate = 1.0 / fsync50.max(fsync50_after).as_secs_f64();
    let mut p2_table = format!(
        "**P2 durable decisions per second.** Units presenting at once, each again as soon as \
         its decision is back, for {} s, straight on the store as the bus tasks call it \
         (`Store::verify`: lookup, decision, the activity record committed with \
         `synchronous=FULL` before the answer; each bus serves one unit at a time, so units \
         presenting at once are on different buses, and their lines' wire time is left out). \
         Reference: one fsync of a 512-byte append on the same disk, p50 {} before and {} \
         after (the slower of the two is the reference: {:.0} fsyncs/s).\n\n\
         | units at once | decisions | decisions/s | commits | decisions per commit | ratio to 1/fsync (target ≥ 6× at 8 units) |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        p2_for.as_secs(),
        ms(fsync50),
        ms(fsync50_after),
        fsync_rate,
    );
    for d in p2 {
        let _ = writeln!(
            p2_table,
            "| {} | {} | {:.0}/s | {} | {:.2} | {:.2}× |",
            d.units,
            d.decided,
            d.per_second(),
            d.commits,
            d.decided as f64 / d.commits.max(1) as f64,
            d.per_second() / fsync_rate,
        );
    }
    (p2_table, fsync_rate)
}

/// The rows of the summary table at the top of `docs/performance.md`: P1, P2 and P8.
fn summarize(
    quick: bool,
    (p50, p99): (Duration, Duration),
    (fsync50, fsync99, fsync_rate): (Duration, Duration, f64),
    p2: &[GroupCommit],
    (p8_virtual, p8_estimate): (f64, f64),
    load: support::RunLoad,
) {
    let eight = p2.last().expect("the 8-unit run");
    support::write_summary(&[
        support::Summary {
            id: "P1",
            figure: "verify round trip over a pty, the unit alone on its bus, minus the wire time of its bytes (a pty has none), p99",
            measured: format!("{} (p50 {})", ms(p99), ms(p50)),
            reference: format!(
                "one fsync, p99 {} (p50 {}), so at most {}",
                ms(fsync99),
                ms(fsync50),
                ms(fsync99 + Duration::from_micros(500))
            ),
            // Raised by issue 17 from fsync p99 + 1 ms.
            target: "p99 ≤ fsync p99 + 0.5 ms",
            met: p99 <= fsync99 + Duration::from_micros(500),
            bench: "bus",
            quick,
            load,
        },
        support::Summary {
            id: "P2",
            figure: "durable decisions per second, 8 units presenting at once",
            measured: format!(
                "{}/s, {:.2}× ({:.1} decisions per commit; 1 unit alone: {}/s)",
                support::rate(eight.per_second()),
                eight.per_second() / fsync_rate,
                eight.decided as f64 / eight.commits.max(1) as f64,
                support::rate(p2[0].per_second()),
            ),
            reference: format!("1 / fsync p50: {}/s", support::rate(fsync_rate)),
            // Raised by issue 17 from 5×.
            target: "≥ 6×",
            met: eight.per_second() >= 6.0 * fsync_rate,
            bench: "bus",
            quick,
            load,
        },
        support::Summary {
            id: "P8",
            figure: "one poll cycle over 32 units at 115200 baud",
            measured: format!(
                "{p8_estimate:.2}× (the real driver's own time per exchange on a pty, added to \
                 the wire time); {p8_virtual:.2}× on a virtual line"
            ),
            reference: "the wire-time lower bound (32 polls and answers)".into(),
            target: "≤ 1.25×",
            met: p8_estimate <= 1.25,
            bench: "bus",
            quick,
            load,
        },
    ]);
}

/// `-- --p1` or `-- --p2`: that figure alone, printed and not written to the docs (for working
/// on it). Returns whether one was asked for.
fn one_figure(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    samples: usize,
    load_for: Duration,
) -> bool {
    if std::env::args().any(|a| a == "--p1") {
        // P1 alone, printed and not written to the docs.
        let alone = rt.block_on(run(1, samples, Duration::ZERO));
        let (fsync50, fsync99) = fsync_reference(dir, samples);
        println!(
            "P1 p50 {} p99 {}; fsync p50 {} p99 {}",
            ms(percentile(&alone.round_trips, 50)),
            ms(percentile(&alone.round_trips, 99)),
            ms(fsync50),
            ms(fsync99)
        );
        return true;
    }
    if std::env::args().any(|a| a == "--p2") {
        // P2 alone, printed and not written to the docs: for working on the group commit.
        let (fsync50, _) = fsync_reference(dir, samples);
        let p2: Vec<GroupCommit> = [1, UNITS]
            .into_iter()
            .map(|units| rt.block_on(group_commit(units, load_for)))
            .collect();
        let (fsync50_after, _) = fsync_reference(dir, samples);
        println!("{}", p2_table(&p2, load_for, fsync50, fsync50_after).0);
        return true;
    }
    false
}

fn main() {
    // The daemon runs in this process: its allocator set as `doorbridge run` sets it.
    doorbridge::store::hold_little();
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
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir on this disk");
    if one_figure(&rt, dir.path(), samples, load_for) {
        return;
    }
    let mut conditions = support::Conditions::start(dir.path());
    // P1: the unit alone on its bus, so the line is free when the decision is ready.
    let alone = rt.block_on(run(1, samples, Duration::ZERO));
    let result = rt.block_on(run(UNITS, samples, load_for));
    let (fsync50, fsync99) = fsync_reference(dir.path(), samples);
    let p2_for = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let p2: Vec<GroupCommit> = [1, UNITS]
        .into_iter()
        .map(|units| rt.block_on(group_commit(units, p2_for)))
        .collect();
    // The reference again right after, so a disk that changed pace shows.
    let (fsync50_after, _) = fsync_reference(dir.path(), samples);

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
    let p50 = percentile(&alone.round_trips, 50);
    let p99 = percentile(&alone.round_trips, 99);
    let table = format!(
        "| figure | measured | reference |\n| --- | --- | --- |\n\
         | P1: verify round trip over a pty, the unit alone on its bus, p50 | {} | wire time of its {bytes} bytes: {} at 115200 baud, {} at 9600 baud (a pty has none) |\n\
         | P1: the same, p99 | {} | one fsync on the same disk: p50 {}, p99 {} |\n\
         | verify round trip with {} other units polled every 10 ms on the same bus, p50 / p99 | {} / {} | the answer waits for the exchange on the line and the quiet gap after it |\n\
         | verifications per second, one bus, {UNITS} units presenting at once | {:.0}/s | at 115200 baud the wire alone allows {:.0}/s (poll + verify + grant each) |\n",
        ms(p50),
        ms(wire_time(bytes, 115_200)),
        ms(wire_time(bytes, 9_600)),
        ms(p99),
        ms(fsync50),
        ms(fsync99),
        UNITS - 1,
        ms(percentile(&result.round_trips, 50)),
        ms(percentile(&result.round_trips, 99)),
        result.per_second,
        1.0 / wire_time(bytes + 10, 115_200).as_secs_f64(),
    );
    println!("{table}");
    let (p2_table, fsync_rate) = p2_table(&p2, p2_for, fsync50, fsync50_after);
    println!("{p2_table}");
    let (cycles, p8_virtual, p8_estimate) = cycle_table(quick, &rt);
    println!("{cycles}");
    conditions.finish();
    println!("{}", conditions.describe());
    summarize(
        quick,
        (p50, p99),
        (fsync50, fsync99, fsync_rate),
        &p2,
        (p8_virtual, p8_estimate),
        conditions.run_load(),
    );
    let section = format!(
        "<!-- bench:bus -->\n### Door bus over a pty (`cargo bench --bench bus`)\n\n\
         Measured {} on {} with {} round trips{}. {} A pty has no line speed: the measured \
         time is the gateway's own work (lookup, decision, a durable commit, the answer); on a \
         real line add the wire time.\n\n{table}\n{p2_table}\n{cycles}\n<!-- /bench:bus -->",
        support::now(),
        support::machine(),
        alone.round_trips.len(),
        if quick { " (--quick)" } else { "" },
        conditions.describe(),
    );
    support::write_section("bus", &section);
}
