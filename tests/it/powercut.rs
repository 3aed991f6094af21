//! Power cuts, not only crashes (issue 15 §1), the short version: the real daemon with its
//! state directory on a filesystem that loses what was not synced (`doorbridge_testkit::
//! powercut_fs`), cut whole and torn while doors decide (limited keys, retransmissions,
//! battery reports), while the outbox drains after an outage, and while key sets are staged
//! and switched. After each cut the database must pass `PRAGMA integrity_check` and hold the
//! old key set or the new one, exactly; at the end every decision a door heard and every report
//! it had acknowledged must have its record, and no limited key may have been honoured more
//! often than allowed. The campaign with 200 cuts is `cargo bench --bench powercut`
//! (`docs/reliability.md`).
//!
//! Needs `/dev/fuse` and root (the mount is made with `mount(2)`): without them this fails
//! and says so.

use doorbridge_testkit::powercut_campaign as campaign;

use campaign::{CutKind, Phase, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_while_deciding_draining_and_switching_key_sets_lose_nothing() {
    let seed = campaign::seed();
    let plan = Plan {
        cuts: vec![
            (Phase::Decisions, CutKind::Whole),
            (Phase::Decisions, CutKind::Torn),
            (Phase::Drain, CutKind::Torn),
            (Phase::Snapshot, CutKind::Whole),
            (Phase::Snapshot, CutKind::Torn),
            (Phase::Switch, CutKind::Torn),
        ],
        snapshot_keys: 2_000,
        switch_keys: 200,
        seed,
    };
    eprintln!("power-cut test, POWERCUT_SEED={seed}");
    let tally = campaign::run(plan, |i, c| {
        eprintln!(
            "cut {i}: {:?} {:?} after {:?}: {} unsynced changes, {} kept; key set {} -> {}",
            c.phase, c.kind, c.after, c.pending, c.kept, c.held_before, c.live_after
        );
    })
    .await;
    eprintln!(
        "{}\n{} decisions heard ({} repeats), {} battery reports acknowledged, {} records \
         received ({} duplicates), {} limited-key grants; {:.1?}",
        tally.table(),
        tally.heard,
        tally.repeats_heard,
        tally.acked_reports,
        tally.received,
        tally.duplicates,
        tally.limited_grants,
        tally.elapsed
    );
    let failures = tally.failures();
    assert!(
        failures.is_empty(),
        "POWERCUT_SEED={seed}:\n{}",
        failures.join("\n")
    );
    assert_eq!(tally.cuts.len(), 6);
    assert!(
        tally.heard > 20 && tally.limited_grants > 0,
        "the doors were busy: {} decisions heard, {} limited-key grants",
        tally.heard,
        tally.limited_grants
    );
    assert!(
        tally.cuts.iter().any(|c| c.pending > 0),
        "some cut had unsynced changes to drop"
    );
    // The database and its WAL are synced with `fdatasync` only (SQLite built with
    // `HAVE_FDATASYNC`, `.cargo/config.toml`): an `fsync` would also commit ext4's journal
    // for the WAL's new modification time, some 12 KiB more written to the SD card per
    // decision (docs/storage.md).
    for name in ["doorbridge.db", "doorbridge.db-wal"] {
        let (fdatasyncs, fsyncs) = tally
            .cuts
            .iter()
            .filter_map(|c| c.file_syncs.get(name))
            .fold((0, 0), |(d, f), s| (d + s.fdatasync, f + s.fsync));
        assert!(
            fdatasyncs > 0 && fsyncs == 0,
            "{name} synced with fdatasync {fdatasyncs} times and with fsync {fsyncs} times"
        );
    }
}
