//! The power-cut campaign (issue 15 §1): the real `doorbridge run` binary with its state
//! directory on a filesystem that loses power on command (`crates/doorbridge-testkit/src/powercut_fs.rs`),
//! cut 200 times (10 with `--quick`) at random moments while doors decide, while snapshots are
//! staged and switched, during `doorbridge keys import` and during the outbox drain, whole and
//! torn by turns; after each cut the database's integrity and the live key set are checked,
//! and at the end the records of everything the doors heard, the acknowledged reports and the
//! limited keys' grants (`crates/doorbridge-testkit/src/powercut_campaign.rs`).
//!
//! Run with `cargo bench --bench powercut` (as root: it mounts a FUSE filesystem). Writes its
//! section of `docs/reliability.md`, and exits 1 when a promise was broken.
//! `POWERCUT_SEED=N` repeats a run's choices (timing aside).

// Counts and durations for display.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::path::Path;

use doorbridge_testkit::bench as support;
use doorbridge_testkit::powercut_campaign as campaign;

use campaign::{Plan, Tally};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (cuts, keys) = if quick { (10, 3_000) } else { (200, 20_000) };
    let seed = campaign::seed();
    eprintln!("power-cut campaign: {cuts} cuts, snapshots of {keys} keys, POWERCUT_SEED={seed}");
    let tally = support::runtime().block_on(campaign::run(
        Plan::cycle(cuts, keys, seed),
        |i, c| {
            eprintln!(
                "cut {i:3}: {:?} {:?} after {:?}: {} unsynced changes, {} kept; key set {} -> {}{}{}",
                c.phase,
                c.kind,
                c.after,
                c.pending,
                c.kept,
                c.held_before,
                c.live_after,
                c.integrity
                    .as_ref()
                    .map_or(String::new(), |p| format!("; INTEGRITY: {p}")),
                c.mixed
                    .as_ref()
                    .map_or(String::new(), |p| format!("; KEY SET: {p}")),
            );
        },
    ));
    let section = section(&tally, quick, keys);
    println!("{section}");
    write_section(&section);
    let failures = tally.failures();
    if !failures.is_empty() {
        eprintln!(
            "POWERCUT_SEED={seed}: {} broken promises:\n{}",
            failures.len(),
            failures.join("\n")
        );
        std::process::exit(1);
    }
}

fn section(t: &Tally, quick: bool, keys: usize) -> String {
    let mut s = format!(
        "<!-- bench:powercut -->\n### The campaign (`cargo bench --bench powercut`)\n\n\
         Run {} on {}; load average {}{}. {} cuts in {:.0} s ({:.1} s per cut: the daemon's \
         restart, the phase, the checks), snapshots and key files of {} keys (plus {} of the \
         same ids in each), `POWERCUT_SEED={}`.\n\n",
        support::now(),
        support::machine(),
        support::load_average(),
        if quick { " (`--quick`)" } else { "" },
        t.cuts.len(),
        t.elapsed.as_secs_f64(),
        t.elapsed.as_secs_f64() / t.cuts.len().max(1) as f64,
        support::thousands(keys as u64),
        campaign::FIXED_KEYS,
        t.seed,
    );
    s.push_str(&t.table());
    let installed = t
        .cuts
        .iter()
        .filter(|c| c.installing.is_some() && c.live_after == c.installing.unwrap_or(0))
        .count();
    let unsynced: usize = t.cuts.iter().map(|c| c.pending).sum();
    let _ = write!(
        s,
        "\n| found | count |\n| --- | --- |\n\
         | cuts | {} |\n\
         | inconsistent databases (`integrity_check` not ok, or moved aside as corrupt at start) | {} |\n\
         | lost records (a decision a door heard, or a report it had acknowledged, with no record in the cloud or the outbox; or a record id reused for other contents) | {} |\n\
         | over-granted limited keys | {} |\n\
         | mixed key sets (live set neither exactly the old nor exactly the new) | {} |\n\
         | key-set cuts after which the new set was live (the rest kept the old) | {installed} of {} |\n\
         | unsynced changes dropped or torn, over all cuts | {} |\n\
         | decisions the doors heard (first answers) / answers to retransmissions | {} / {} |\n\
         | limited-key grants heard | {} |\n\
         | battery reports the doors had acknowledged | {} |\n\
         | records the cloud received (duplicates dropped: {}) | {} |\n",
        t.cuts.len(),
        t.inconsistent(),
        t.lost.len() + t.conflicting_ids.len(),
        t.over_granted.len(),
        t.mixed(),
        t.cuts.iter().filter(|c| c.installing.is_some()).count(),
        unsynced,
        t.heard,
        t.repeats_heard,
        t.limited_grants,
        t.acked_reports,
        t.duplicates,
        t.received,
    );
    let failures = t.failures();
    if !failures.is_empty() {
        s.push_str("\nBroken promises:\n\n");
        for f in failures.iter().take(20) {
            let _ = writeln!(s, "- {f}");
        }
    }
    s.push_str("<!-- /bench:powercut -->");
    s
}

/// Puts `section` into `docs/reliability.md` in place of the previous one (or at the end).
fn write_section(section: &str) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reliability.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Reliability\n".into());
    let (open, close) = ("<!-- bench:powercut -->", "<!-- /bench:powercut -->");
    let new = match (old.find(open), old.find(close)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &old[..a], &old[b + close.len()..])
        }
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(&doc, new).expect("write docs/reliability.md");
}
