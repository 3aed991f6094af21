//! OSDP readers over a pty: the gateway (`daemon::serve`, in process, libosdp's Control Panel)
//! against simulated readers (`doorbridge_sim::osdp`, libosdp's Peripheral Device side).
//!
//! - **Card read → strike command**: from the reader submitting a card read to the reader
//!   being told to pulse its relay, with the secure channel on; p50 / p99, one reader alone
//!   on its line and one of eight.
//! - **Poll cycle**: how often each reader is polled with 8 and 32 readers on one line, beside
//!   the wire time of the same bytes (counted on the line in the same run) at 9600 and 115200
//!   baud. A pty has no line speed: the measured cycle is libosdp's scheduling and both sides'
//!   work; on a real line a cycle takes the longer of the two.
//! - **A dead reader's cost**: the other readers' poll intervals with one configured reader
//!   that never answers, beside the same line with all readers alive.
//!
//! Run with `cargo bench --bench osdp` (add `-- --quick` for a short run). Writes its section
//! of `docs/performance.md`.

#![allow(clippy::cast_precision_loss)]
// Byte counts per cycle, rounded for display.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use doorbridge_testkit::bench as support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{CredentialKind, Door, Site};
use doorbridge::config::Config;
use doorbridge_sim::osdp::{
    Output, ReaderCommand, ReaderInput, ReaderSpec, ReadersHandle, SimLine, linked_line, spawn,
};
use support::{ms, percentile};
use tokio::sync::{mpsc, oneshot};

const KEY: [u8; 16] = *b"bench-osdp-scbk!";
/// The pause before each card read (see [`Bench::card_round_trip`]).
const BETWEEN_READS: Duration = Duration::from_millis(200);

fn card(reader: u8) -> String {
    format!("32:{:08x}", 0x0B00_0000 | u32::from(reader))
}

/// What crossed the line: every packet the CP sent, by address and time, and the bytes each
/// way. Wraps the readers' end of the pty.
#[derive(Default)]
struct Sniffed {
    /// When each address was sent a packet (a poll, mostly).
    sent_to: HashMap<u8, Vec<Instant>>,
    from_cp: u64,
    to_cp: u64,
    tail: Vec<u8>,
}

struct SniffedLine {
    inner: serialport::TTYPort,
    seen: Arc<Mutex<Sniffed>>,
}

impl Read for SniffedLine {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && let Ok(mut s) = self.seen.lock()
        {
            s.from_cp += n as u64;
            let now = Instant::now();
            let mut bytes = std::mem::take(&mut s.tail);
            bytes.extend_from_slice(&buf[..n]);
            // A CP packet starts with SOM, an address without the reply bit, a length.
            for w in bytes.windows(4) {
                let len = u16::from_le_bytes([w[2], w[3]]);
                if w[0] == 0x53 && w[1] < 0x7F && (8..=1440).contains(&len) {
                    s.sent_to.entry(w[1]).or_default().push(now);
                }
            }
            let keep = bytes.len().saturating_sub(3);
            s.tail = bytes[keep..].to_vec();
        }
        Ok(n)
    }
}

impl io::Write for SniffedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Ok(mut s) = self.seen.lock() {
            s.to_cp += n as u64;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One line: the gateway with `configured` readers, `alive` of them simulated.
struct Bench {
    _dir: tempfile::TempDir,
    readers: ReadersHandle,
    outputs: mpsc::UnboundedReceiver<Output>,
    seen: Arc<Mutex<Sniffed>>,
    stop: oneshot::Sender<()>,
    gateway: tokio::task::JoinHandle<()>,
}

impl Bench {
    async fn start(configured: u8, alive: u8) -> Bench {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let db = dir.path().join("doorbridge.db");
        let link = dir.path().join("ttyOSDP");
        let key_file = dir.path().join("readers.key");
        doorbridge::osdp::key::write_new(&key_file, &KEY).expect("key file");
        let doors: Vec<String> = (1..=configured).map(|a| format!("door{a}")).collect();
        let site = Site {
            tz: jiff::tz::TimeZone::get("Europe/Berlin").expect("tzdata"),
            doors: doors.iter().map(|d| (d.into(), Door::default())).collect(),
        };
        let keys = (1..=configured)
            .map(|a| {
                let value = doorbridge::access::credential::parse_card(&card(a)).expect("card");
                support::key(
                    format!("k{a}"),
                    &format!("door{a}"),
                    CredentialKind::Card,
                    &value,
                )
            })
            .collect();
        support::install_keys(&db, site, support::SALT, keys).await;
        let mut text = format!(
            "[gateway]\nid = \"gw-bench\"\nsite_id = \"{}\"\n[site]\ntimezone = \"Europe/Berlin\"\n\
             [cloud]\nurl = \"mqtt://127.0.0.1:1\"\ntrusted_keys = [\"{}\"]\n[storage]\npath = \"{}\"\n\
             [log]\nlevel = \"warn\"\n\
             [[buses]]\nname = \"osdp\"\nprotocol = \"osdp\"\nport = \"{}\"\nbaud = 115200\n",
            support::SITE,
            doorbridge_sim::cloud::hex(support::cloud_key().verifying_key().as_bytes()),
            db.display(),
            link.display(),
        );
        for a in 1..=configured {
            let _ = write!(
                text,
                "[[buses.units]]\naddress = {a}\ndoor = \"door{a}\"\n[buses.units.osdp]\nkey_file = \"{}\"\n",
                key_file.display()
            );
        }
        let config = Config::from_toml_str(&text, "bench").expect("config");

        let (master, _) = linked_line(&link).expect("pty");
        let seen = Arc::new(Mutex::new(Sniffed::default()));
        let sniffed = SniffedLine {
            inner: master,
            seen: Arc::clone(&seen),
        };
        let (tx, mut outputs) = mpsc::unbounded_channel();
        let specs = (1..=alive)
            .map(|address| ReaderSpec {
                address,
                scbk: Some(KEY),
            })
            .collect();
        let readers = spawn(sniffed, &SimLine::pty(specs), tx).expect("readers");
        let (stop, stopped) = oneshot::channel::<()>();
        let gateway = tokio::spawn(async move {
            doorbridge::daemon::serve(&config, async {
                let _ = stopped.await;
            })
            .await
            .expect("the gateway runs");
        });
        // Every simulated reader online with its secure channel.
        let mut secure = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while secure.len() < usize::from(alive) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, outputs.recv()).await {
                Ok(Some(Output::State {
                    unit,
                    online: true,
                    secure: true,
                })) => {
                    secure.insert(unit);
                }
                Ok(Some(_)) => {}
                _ => panic!("only {} of {alive} readers came up secure", secure.len()),
            }
        }
        Bench {
            _dir: dir,
            readers,
            outputs,
            seen,
            stop,
            gateway,
        }
    }

    /// Presents a card at `reader` and waits for the strike command; the time between. The
    /// reader is left idle for [`BETWEEN_READS`] first, as between two people: back to back,
    /// a read would wait behind the LED and buzzer commands of the previous grant.
    async fn card_round_trip(&mut self, reader: u8) -> Duration {
        tokio::time::sleep(BETWEEN_READS).await;
        let input = ReaderInput::card(&card(reader)).expect("card");
        assert!(self.readers.send(ReaderCommand {
            unit: reader,
            input
        }));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.outputs.recv()).await {
                Ok(Some(Output::Decision {
                    unit,
                    grant: true,
                    via,
                    after,
                    ..
                })) if unit == reader && via == "output" => return after,
                Ok(Some(Output::Decision { unit, grant, .. })) if unit == reader => {
                    assert!(grant, "a card of the key set was denied");
                }
                Ok(Some(_)) => {}
                _ => panic!("no strike command at reader {reader}"),
            }
        }
    }

    /// Forgets what was sniffed so far.
    fn reset(&self) {
        if let Ok(mut s) = self.seen.lock() {
            *s = Sniffed::default();
        }
    }

    /// The intervals between packets to each of `readers`, and the bytes both ways.
    fn intervals(&self, readers: impl Iterator<Item = u8>) -> (Vec<Duration>, u64, u64) {
        let s = self.seen.lock().expect("sniffed");
        let mut all = Vec::new();
        for a in readers {
            if let Some(times) = s.sent_to.get(&a) {
                all.extend(times.windows(2).map(|w| w[1] - w[0]));
            }
        }
        all.sort();
        (all, s.from_cp, s.to_cp)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.gateway).await;
        drop(self.readers);
    }
}

fn wire(bytes: u64, baud: u32) -> Duration {
    // 8N1: ten bit times a byte.
    Duration::from_secs_f64(bytes as f64 * 10.0 / f64::from(baud))
}

struct Cycle {
    readers: u8,
    dead: bool,
    intervals: Vec<Duration>,
    /// Bytes per cycle, both ways.
    bytes: f64,
}

/// Polls sniffed for `window` with `configured` readers (`alive` of them simulated).
async fn cycle(configured: u8, alive: u8, window: Duration) -> Cycle {
    let bench = Bench::start(configured, alive).await;
    bench.reset();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let took = started.elapsed();
    let (intervals, from_cp, to_cp) = bench.intervals(1..=alive);
    bench.stop().await;
    let mean = intervals.iter().sum::<Duration>().as_secs_f64() / intervals.len().max(1) as f64;
    // Cycles in the window: the window over the mean interval.
    let cycles = (took.as_secs_f64() / mean.max(1e-9)).max(1.0);
    Cycle {
        readers: configured,
        dead: configured > alive,
        intervals,
        bytes: (from_cp + to_cp) as f64 / cycles,
    }
}

/// The figures as a Markdown table, and a sentence on the dead reader's cost.
fn tables(alone: &[Duration], of_eight: &[Duration], cycles: &[Cycle]) -> (String, String) {
    let mut table = String::from(
        "| figure | measured p50 / p99 | reference: wire time of the same bytes |\n| --- | --- | --- |\n",
    );
    // A card read and the strike command with the secure channel: about 30 and 20 bytes.
    for (what, samples) in [
        (
            "card read → strike command, the reader alone on its line",
            &alone,
        ),
        (
            "card read → strike command, one of 8 readers on the line",
            &of_eight,
        ),
    ] {
        let _ = writeln!(
            table,
            "| {what} | {} / {} | card read + poll + command + ack (~70 bytes): {} at 115200, {} at 9600 baud; add the wait for the reader's next poll (up to one cycle) |",
            ms(percentile(samples, 50)),
            ms(percentile(samples, 99)),
            ms(wire(70, 115_200)),
            ms(wire(70, 9_600)),
        );
    }
    let mut dead_cost = String::new();
    for c in cycles {
        let p50 = percentile(&c.intervals, 50);
        let p99 = percentile(&c.intervals, 99);
        let max = c.intervals.last().copied().unwrap_or_default();
        let bytes = c.bytes.round() as u64;
        let _ = writeln!(
            table,
            "| poll interval per reader, {} readers{} | {} / {} (max {}) | one cycle's {} bytes: {} at 115200, {} at 9600 baud |",
            c.readers,
            if c.dead { ", one of them dead" } else { "" },
            ms(p50),
            ms(p99),
            ms(max),
            bytes,
            ms(wire(bytes, 115_200)),
            ms(wire(bytes, 9_600)),
        );
        if c.dead {
            let alive = &cycles[0];
            dead_cost = format!(
                "With one of 8 readers dead the others' poll interval was p50 {} / p99 {} / max {}, against p50 {} / p99 {} / max {} with all alive.",
                ms(p50),
                ms(p99),
                ms(max),
                ms(percentile(&alive.intervals, 50)),
                ms(percentile(&alive.intervals, 99)),
                ms(alive.intervals.last().copied().unwrap_or_default()),
            );
        }
    }
    (table, dead_cost)
}

fn main() {
    // The daemon runs in this process: its allocator set as `doorbridge run` sets it.
    doorbridge::store::hold_little();
    let quick = std::env::args().any(|a| a == "--quick");
    let (reads, window) = if quick {
        (30, Duration::from_secs(5))
    } else {
        (300, Duration::from_secs(40))
    };
    let rt = support::runtime();
    let probe = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
    let mut conditions = support::Conditions::start(probe.path());

    // Card read → strike command.
    let (alone, of_eight) = rt.block_on(async {
        let mut bench = Bench::start(1, 1).await;
        let mut alone = Vec::new();
        for _ in 0..reads {
            alone.push(bench.card_round_trip(1).await);
        }
        bench.stop().await;
        let mut bench = Bench::start(8, 8).await;
        let mut of_eight = Vec::new();
        for i in 0..reads {
            let reader = u8::try_from(i % 8).unwrap_or(0) + 1;
            of_eight.push(bench.card_round_trip(reader).await);
        }
        bench.stop().await;
        alone.sort();
        of_eight.sort();
        (alone, of_eight)
    });

    // Poll cycles, and the dead reader.
    let cycles: Vec<Cycle> = [(8, 8), (32, 32), (8, 7)]
        .into_iter()
        .map(|(configured, alive)| rt.block_on(cycle(configured, alive, window)))
        .collect();

    conditions.finish();
    let (table, dead_cost) = tables(&alone, &of_eight, &cycles);
    println!("{table}\n{dead_cost}");
    let section = format!(
        "<!-- bench:osdp -->\n### OSDP readers over a pty (`cargo bench --bench osdp`)\n\n\
         Measured {} on {}, {} card reads per case ({} ms apart at a reader), poll windows of \
         {} s{}. {} The gateway is libosdp's CP (refreshed every 5 ms), the readers \
         libosdp PDs (`sim::osdp`, refreshed every 5 ms), all with the secure channel. A pty has \
         no line speed: the measured times are both sides' work and libosdp's scheduling (it \
         polls a reader 50 ms after its last reply, one exchange at a time per line); on a real \
         line each exchange also takes its wire time, so a cycle takes at least the reference. \
         A dead reader is asked 4 times, 200 ms each (libosdp's reply timeout, which holds the \
         line), then left offline for 30 s (`.cargo/config.toml`; libosdp's default is 300 s).\n\n\
         {table}\n{dead_cost}\n<!-- /bench:osdp -->",
        support::now(),
        support::machine(),
        reads,
        BETWEEN_READS.as_millis(),
        window.as_secs(),
        if quick { " (--quick)" } else { "" },
        conditions.describe(),
    );
    support::write_section("osdp", &section);
}
