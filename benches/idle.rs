//! P7: the real `doorbridge run` binary idle, holding 1,000,000 keys. Over one window (60 s,
//! 10 s with `--quick`) it reads the daemon's CPU time (the scheduler's own count per thread,
//! `/proc/<pid>/task/<tid>/schedstat`; beside it `utime + stime` of `/proc/<pid>/stat`),
//! its resident memory (`VmRSS`, `VmHWM` of `/proc/<pid>/status`) and the bytes it caused to be
//! written to storage (`write_bytes` of `/proc/<pid>/io`), and extrapolates them to an hour.
//!
//! The daemon is connected to an in-process rumqttd (an idle gateway is online) and runs in
//! three set-ups: its bus port absent (no units answering: the port is retried with backoff),
//! and 4 and 32 simulated units (`doorbridge_sim::SimUnits`, on a thread of this process) on a pty, polled at the default
//! `poll_interval` (200 ms). The keys are installed with `Store::install_key_set` before the
//! daemon starts.
//!
//! Run with `cargo bench --bench idle` (add `-- --quick` for a short run). Writes its section of
//! `docs/performance.md`.

// Figures are small; float conversions are for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, Key};
use doorbridge::bus::frame::Address;
use doorbridge::config::Config;
use doorbridge_sim::{HangupTolerant, Output, ReportKind, SimConfig, SimUnits, run_sim};
use tokio::sync::{mpsc, oneshot};

use doorbridge_testkit::bench as support;
use doorbridge_testkit::brokers;
use support::{Process, mib};

const KEYS: usize = 1_000_000;
/// The window starts once the daemon has written nothing for this long (at most `SETTLE_MAX`).
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// P7's targets.
const RSS_TARGET: u64 = 16_000_000;
const CPU_TARGET_PERCENT: f64 = 0.1;

fn key(n: usize) -> Key {
    support::key(
        format!("k{n:07}"),
        &format!("door-{}", n % 4 + 1),
        CredentialKind::Pin,
        format!("{n:08}").as_bytes(),
    )
}

/// The daemon's configuration: defaults everywhere but the site, the broker, the database and
/// the bus (`units` door units at 1..=units on `port`).
fn config_text(db: &Path, broker: &str, port: &Path, units: u8) -> String {
    let mut text = format!(
        "[gateway]\nid = \"gw-idle\"\nsite_id = \"idle\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
         [cloud]\nurl = \"{broker}\"\n\
         trusted_keys = [\"3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c\"]\n\
         [storage]\npath = \"{}\"\n[[buses]]\nname = \"idle\"\nport = \"{}\"\n",
        db.display(),
        port.display()
    );
    for n in 1..=units.max(1) {
        let _ = write!(
            text,
            "[[buses.units]]\naddress = {n}\ndoor = \"door-{n}\"\n"
        );
    }
    text
}

/// Installs the keys into a fresh database at `db`.
fn install_keys(db: &Path, config: &Config) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    rt.block_on(support::install_keys(
        db,
        config.site(),
        support::SALT,
        (0..KEYS).map(key).collect(),
    ));
    started.elapsed()
}

/// What `/proc` says about a process at one moment.
#[derive(Clone, Debug)]
struct Probe {
    at: Instant,
    /// utime + stime, in clock ticks (all threads, living and ended).
    cpu_ticks: u64,
    /// Nanoseconds on a CPU by thread (the first field of `schedstat`), the threads alive now.
    cpu_ns: std::collections::HashMap<String, u64>,
    write_bytes: u64,
    rss: u64,
    /// Of `rss`, the anonymous part (`RssAnon`: heap, stacks); the rest is mapped files.
    anon: u64,
    hwm: u64,
    /// Voluntary + involuntary context switches of the threads alive now.
    switches: u64,
}

fn probe(pid: u32) -> Probe {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let write_bytes = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let switches: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum();
    let cpu_ns = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|t| {
            let ns = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = ns.split_whitespace().next()?.parse().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect();
    Probe {
        at: Instant::now(),
        cpu_ticks: tick(11) + tick(12),
        cpu_ns,
        write_bytes,
        rss: kib("VmRSS:"),
        anon: kib("RssAnon:"),
        hwm: kib("VmHWM:"),
        switches,
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux almost everywhere).
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

struct Idle {
    what: String,
    window: Duration,
    settled_after: Duration,
    /// The scheduler's count, over the threads alive at the end (a thread started in the
    /// window counts from its start; one that ended in it is not counted).
    cpu: Duration,
    /// `utime + stime`: whole ticks, charged to whatever runs when the tick comes.
    cpu_by_ticks: Duration,
    writes: u64,
    rss: u64,
    anon: u64,
    hwm: u64,
    switches_per_s: f64,
    polls_per_s: f64,
}

/// One set-up: the daemon (and `units` door-sim units, if any) started on the database, left
/// until it has written nothing for `SETTLE_QUIET`, then watched for `window`.
fn idle_run(dir: &Path, db: &Path, broker: &str, units: u8, window: Duration) -> Idle {
    let link = dir.join(format!("tty-idle-{units}"));
    let port = if units == 0 {
        dir.join("no-such-port")
    } else {
        link.clone()
    };
    let config = dir.join(format!("idle-{units}.toml"));
    std::fs::write(&config, config_text(db, broker, &port, units)).expect("write the config");
    let sim = (units > 0).then(|| Units::start(&link, units));
    let mut command = Command::new(env!("CARGO_BIN_EXE_doorbridge"));
    command.arg("--config").arg(&config).arg("run");
    let mut daemon = Process::spawn(command, false, "bus port open");
    let pid = daemon.pid();
    let started = Instant::now();
    // Every unit's start-up status stored and acknowledged.
    if let Some(sim) = &sim {
        while sim.counted() < usize::from(units) {
            assert!(daemon.alive(), "the daemon exited:\n{}", daemon.tail());
            assert!(
                started.elapsed() < SETTLE_MAX,
                "the units' status was not acknowledged within {SETTLE_MAX:?}:\n{}",
                daemon.tail(),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Then until it has written nothing for a while (the uplink sends the units' online
    // records and deletes them once the broker has them).
    let mut last = probe(pid);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < SETTLE_QUIET && started.elapsed() < SETTLE_MAX {
        std::thread::sleep(Duration::from_millis(250));
        assert!(daemon.alive(), "the daemon exited:\n{}", daemon.tail());
        let now = probe(pid);
        if now.write_bytes != last.write_bytes {
            quiet_since = Instant::now();
        }
        last = now;
    }
    let settled_after = started.elapsed();
    let before = probe(pid);
    std::thread::sleep(window);
    let after = probe(pid);
    assert!(daemon.alive(), "the daemon exited:\n{}", daemon.tail());
    daemon.stop();
    drop(sim);
    let elapsed = after.at - before.at;
    let ticks = clock_ticks();
    Idle {
        what: if units == 0 {
            "bus port absent (no units)".to_owned()
        } else {
            format!("{units} simulated units on a pty, polled every 200 ms")
        },
        window: elapsed,
        settled_after,
        cpu: Duration::from_nanos(
            after
                .cpu_ns
                .iter()
                .map(|(tid, ns)| ns.saturating_sub(before.cpu_ns.get(tid).copied().unwrap_or(0)))
                .sum(),
        ),
        cpu_by_ticks: Duration::from_secs_f64(
            (after.cpu_ticks - before.cpu_ticks) as f64 / ticks as f64,
        ),
        writes: after.write_bytes - before.write_bytes,
        rss: after.rss,
        anon: after.anon,
        hwm: after.hwm,
        switches_per_s: after.switches.saturating_sub(before.switches) as f64
            / elapsed.as_secs_f64(),
        // One poll per unit per `poll_interval` (the cycle is far shorter).
        polls_per_s: f64::from(units) * 5.0,
    }
}

/// `count` simulated units (addresses 1 to `count`) on a pty linked at `link`, run on a thread
/// of their own; stopped on drop.
struct Units {
    /// Status reports the gateway acknowledged.
    acked: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Units {
    fn start(link: &Path, count: u8) -> Units {
        let addresses: Vec<Address> = (1..=count).filter_map(Address::unit).collect();
        let units = SimUnits::new(&addresses, SimConfig::default()).expect("the simulated units");
        let acked = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let counter = Arc::clone(&acked);
        let (made, pty_made) = std::sync::mpsc::channel();
        let link = link.to_path_buf();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the units");
            runtime.block_on(async move {
                // The pty registers with this runtime's reactor, so it is made in it.
                let (master, _) = doorbridge_sim::linked_pty(&link).expect("a linked pty");
                let _ = made.send(());
                let port = HangupTolerant::new(master, Duration::from_millis(100));
                // The units never get commands: they answer polls and report their status.
                let (_commands, command_rx) = mpsc::channel(1);
                let (output_tx, mut outputs) = mpsc::channel(256);
                let sim = tokio::spawn(run_sim(port, units, command_rx, output_tx, async {
                    let _ = stopped.await;
                }));
                while let Some(output) = outputs.recv().await {
                    if let Output::Acked {
                        report: ReportKind::Status,
                        ..
                    } = output
                    {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = sim.await;
            });
        });
        pty_made
            .recv_timeout(Duration::from_secs(10))
            .expect("the units' pty was made");
        Units {
            acked,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn counted(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }
}

impl Drop for Units {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let window = if quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(60)
    };
    // On the disk the repository is on (a tmpfs would write nothing whatever the daemon did).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let mut conditions = support::Conditions::start(dir.path());
    let db = dir.path().join("idle.db");
    let broker = brokers::start_rumqttd();
    let config = Config::from_toml_str(
        &config_text(&db, &broker, &dir.path().join("no-such-port"), 4),
        "idle.toml",
    )
    .expect("the bench's configuration");
    let installed = install_keys(&db, &config);
    let db_size = std::fs::metadata(&db).map_or(0, |m| m.len());
    let runs: Vec<Idle> = [0u8, 4, 32]
        .into_iter()
        .map(|units| idle_run(dir.path(), &db, &broker, units, window))
        .collect();
    conditions.finish();

    let table = idle_table(&runs);
    println!("{table}");
    let section = format!(
        "<!-- bench:idle -->\n### Idle with a million keys (`cargo bench --bench idle`)\n\n\
         Measured {} on {}{}. {}\n\n\
         The real `doorbridge run` binary (bench profile) on a database holding {} keys ({:.0} MB; \
         installed with `Store::install_key_set` in {:.0} s before it starts), online with an \
         in-process rumqttd, defaults everywhere (`poll_interval` 200 ms, log level info). Each \
         set-up is watched for {:.0} s once the daemon has written nothing for {} s (after \
         start-up: the units' status reports stored and acknowledged, their online records \
         uploaded and deleted): CPU is the time the scheduler counted on a CPU for each \
         thread (`/proc/<pid>/task/<tid>/schedstat`, in ns), summed over the threads alive at \
         the end; beside it, `utime + stime` of `/proc/<pid>/stat` (clock ticks of {} ms), \
         which charges a whole tick to whatever runs when the tick comes, and so overcounts a \
         process that wakes briefly and often, in step with the ticks (a timer's wake-up \
         comes on one); written is `write_bytes` of `/proc/<pid>/io`, RSS is `VmRSS` at the end \
         (of it `RssAnon`, the heap and stacks, the rest being mapped files such as the \
         program's code; `VmHWM` the peak since start), context switches are summed over the threads alive at \
         both ends; per poll, the CPU and the switches of the run without units are taken off \
         (what the daemon does anyway). Per hour is the window extrapolated: periodic work slower than the window \
         (the hourly time broadcast; the telemetry summary every 15 min, which is published and \
         never written) is not in it. The units are simulated on a thread of the bench's own \
         process (`doorbridge_sim::SimUnits`; their CPU is not counted).\n\n{table}\n<!-- /bench:idle -->",
        support::now(),
        support::machine(),
        if quick { " (--quick)" } else { "" },
        conditions.describe(),
        support::group_digits(&KEYS.to_string()),
        db_size as f64 / 1e6,
        installed.as_secs_f64(),
        window.as_secs_f64(),
        SETTLE_QUIET.as_secs(),
        1000 / clock_ticks(),
    );
    support::write_section("idle", &section);

    summarize(quick, &runs, conditions.run_load());
}

/// P7's table: one row per set-up.
fn idle_table(runs: &[Idle]) -> String {
    let mut table = String::from(
        "| P7: idle, 1,000,000 keys | CPU (target ≤ 0.1 %) | daemon CPU per poll | written (target 0 per hour) | RSS (target ≤ 16 MB) | context switches |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    // The run without units: what the daemon does anyway, to tell a poll's own cost.
    let (base_cpu, base_switches) =
        runs.iter()
            .find(|r| r.polls_per_s == 0.0)
            .map_or((0.0, 0.0), |r| {
                (
                    r.cpu.as_secs_f64() / r.window.as_secs_f64(),
                    r.switches_per_s,
                )
            });
    for r in runs {
        let share = 100.0 * r.cpu.as_secs_f64() / r.window.as_secs_f64();
        // Per poll, less what the daemon does without units.
        let (cpu_above, switches_above) = if r.polls_per_s > 0.0 {
            (
                (r.cpu.as_secs_f64() / r.window.as_secs_f64() - base_cpu).max(0.0) * 1e6
                    / r.polls_per_s,
                (r.switches_per_s - base_switches).max(0.0) / r.polls_per_s,
            )
        } else {
            (0.0, 0.0)
        };
        let per_hour = r.writes as f64 * 3600.0 / r.window.as_secs_f64();
        let _ = writeln!(
            table,
            "| {}; quiet {:.0} s after start | {share:.3} % ({:.0} ms in {:.0} s; by ticks {:.3} %){} | {} | {} bytes in {:.0} s → {:.0} bytes/hour{} | {} ({:.1} MB; anonymous {}; peak {}){} | {:.0}/s{} |",
            r.what,
            r.settled_after.as_secs_f64(),
            r.cpu.as_secs_f64() * 1000.0,
            r.window.as_secs_f64(),
            100.0 * r.cpu_by_ticks.as_secs_f64() / r.window.as_secs_f64(),
            if share <= CPU_TARGET_PERCENT {
                ""
            } else {
                " — **missed**"
            },
            if r.polls_per_s > 0.0 {
                format!(
                    "{:.0} µs ({:.0} polls/s; {cpu_above:.0} µs above the run without units)",
                    r.cpu.as_secs_f64() * 1e6 / (r.polls_per_s * r.window.as_secs_f64()),
                    r.polls_per_s
                )
            } else {
                "—".to_owned()
            },
            r.writes,
            r.window.as_secs_f64(),
            per_hour,
            if r.writes == 0 { "" } else { " — **missed**" },
            mib(r.rss),
            r.rss as f64 / 1e6,
            mib(r.anon),
            mib(r.hwm),
            if r.rss <= RSS_TARGET {
                ""
            } else {
                " — **missed**"
            },
            r.switches_per_s,
            if r.polls_per_s > 0.0 {
                format!(" ({switches_above:.1} per poll above the run without units)")
            } else {
                String::new()
            },
        );
    }
    table
}

/// P7's row of the summary table at the top of `docs/performance.md`.
fn summarize(quick: bool, runs: &[Idle], load: support::RunLoad) {
    let share = |r: &Idle| 100.0 * r.cpu.as_secs_f64() / r.window.as_secs_f64();
    let measured = runs
        .iter()
        .map(|r| {
            format!(
                "{}: CPU {:.3} %, {} bytes written in {:.0} s, RSS {}",
                r.what,
                share(r),
                r.writes,
                r.window.as_secs_f64(),
                mib(r.rss)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    support::write_summary(&[support::Summary {
        id: "P7",
        figure: "idle with 1,000,000 keys",
        measured,
        reference: "—".into(),
        target: "RSS ≤ 16 MB; 0 bytes written per idle hour; CPU ≤ 0.1 %",
        met: runs
            .iter()
            .all(|r| r.rss <= RSS_TARGET && r.writes == 0 && share(r) <= CPU_TARGET_PERCENT),
        bench: "idle",
        quick,
        load,
    }]);
}
