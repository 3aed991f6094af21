//! The writer thread: owns the writing connection, makes every decision, and commits
//! what arrives together in one `synchronous=FULL` transaction (group commit).
//!
//! A group is processed in two phases inside one `BEGIN IMMEDIATE` transaction:
//!
//! 1. *decide*: each request is judged from the held key set and the use counters, plus the
//!    uses granted earlier in the same group (kept in an overlay, so two requests for one
//!    single-use key in one group cannot both pass);
//! 2. *persist*: counters, outbox records and the trusted-time mark are written, then the
//!    transaction commits and only then are the answers sent.
//!
//! When a group waits for the rest of the units the previous group answered (`LINGER`), its
//! transaction is open meanwhile and each decision is judged and its records written as it
//! arrives, so that wait is spent on the first ones' work (`write_while_lingering`); the
//! counters, acks and mark are written at the end, and a failure rolls back and writes the
//! whole group again in the order above, as a group written at once would be.
//!
//! When the disk refuses the write (full, read-only, failing) the transaction is rolled back
//! and the answers are degraded: a grant that consumed a use becomes "not recorded" (the use
//! could not be counted), an unlimited key follows the configured policy, and the records
//! wait in a bounded memory backlog that is written first by the next commit that succeeds.
//!
//! The decision itself is `store::decide` (pure, over [`SqlKeys`]). The writer's other jobs
//! have files of their own: `answers` (the answers kept for retransmissions), `keyset`
//! (staging, switching and deltas of key sets, and unit settings), `outbox` (marking uploaded
//! records, the backlog, pruning the history) and `wal` (`synchronous` per transaction, the
//! WAL hook's counters, idle checkpoints).

use std::collections::{HashMap, VecDeque};
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::decide::{self, UseScope};
use super::lookup;
use super::memory;
use super::records::Record;
use super::{
    Batched, Command, DecisionContext, Health, KeySetHeader, RemoteOpen, Reply, StoreError,
    StoreOptions, Verdict, VerifyRequest, is_disk_trouble, knowledge,
};
use crate::access::{
    ClockTrust, Consume, CredentialKind, Decision, DenyReason, DoorId, Freshness, KeyId, KeyRules,
    PinGuard, Policy, UnlimitedPolicy,
};
use crate::ids::UnitId;

/// Keys per staging transaction: small enough that a decision waits at most one chunk.
pub(super) const STAGE_CHUNK: usize = 5_000;
/// Commands sharing one commit, at most.
const MAX_GROUP: usize = 512;
/// Rows removed per step when deleting an old key set while idle.
const GC_CHUNK: i64 = 5_000;
/// How often a memory backlog is retried while nothing else happens.
const BACKLOG_RETRY: Duration = Duration::from_secs(5);
/// The trusted-time mark is written when it moved at least this far (fewer writes).
const MARK_GRANULARITY: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);
/// How long after a decision a retransmission of its request (same unit, id, fingerprint and
/// boot) is answered from the kept answer: a door unit repeats a verify for up to 10 s.
pub const RETRANSMIT_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_secs(10);

/// Acknowledged records deleted per transaction when the history is pruned.
const PRUNE_CHUNK: i64 = 10_000;
/// How often the history is pruned (by age and count), while idle.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

/// A signed cloud time raises the trusted-time mark only if it lies at most this far beyond the
/// later of the clock and the mark: one snapshot signed years ahead (a cloud clock or signing
/// mistake) must not deny every time-bound key for good.
pub const MAX_SIGNED_AHEAD: jiff::SignedDuration = jiff::SignedDuration::from_hours(24);

/// What a signed cloud time `at`, received at `now`, does to the trusted-time `mark`: the new
/// mark, or `Err(limit)` when `at` lies beyond the latest time that could be believed
/// ([`MAX_SIGNED_AHEAD`] past the later of clock and mark); the mark then stays.
pub fn signed_mark(
    at: Timestamp,
    now: Timestamp,
    mark: Option<Timestamp>,
) -> Result<Timestamp, Timestamp> {
    let base = mark.map_or(now, |m| m.max(now));
    let limit = base.checked_add(MAX_SIGNED_AHEAD).unwrap_or(Timestamp::MAX);
    if at > limit {
        return Err(limit);
    }
    Ok(mark.map_or(at, |m| m.max(at)))
}
/// How long a group of decisions waits for more when the previous group held more than it does
/// so far: the units that group answered are presenting again, and their requests are on the
/// way. One fsync then covers them all (`PostgreSQL`'s `commit_delay`, with the previous group's
/// size as `commit_siblings`). A lone decision never waits.
const LINGER: Duration = Duration::from_micros(200);

/// The uses granted in the commit being made and not yet written, by key and scope.
type UseOverlay = HashMap<(KeyId, UseScope), u32>;

/// The held key set and its counters as the decision reads them ([`decide::KeyView`]): the
/// active generation's rows, and the `uses` table plus the uses granted earlier in the commit
/// being made (`overlay`, by key and scope).
struct SqlKeys<'a> {
    conn: &'a Connection,
    generation: i64,
    overlay: &'a UseOverlay,
}

impl<'a> SqlKeys<'a> {
    fn new(conn: &'a Connection, generation: i64, overlay: &'a UseOverlay) -> Self {
        SqlKeys {
            conn,
            generation,
            overlay,
        }
    }
}

impl decide::KeyView for SqlKeys<'_> {
    fn by_digest(&self, digest: &[u8; 32]) -> Result<Option<KeyRules>, StoreError> {
        lookup::lookup(self.conn, self.generation, digest)
    }

    fn by_id(&self, key_id: &str) -> Result<Option<KeyRules>, StoreError> {
        lookup::key_by_id(self.conn, self.generation, key_id)
    }

    fn uses(&self, key_id: &str, scope: &UseScope) -> Result<u32, StoreError> {
        let stored: Option<u32> = match scope {
            UseScope::AllDoors => self
                .conn
                .prepare_cached("SELECT count FROM key_uses WHERE key_id = ?1")?
                .query_row(params![key_id], |r| r.get(0))
                .optional()?,
            UseScope::Door(door) => self
                .conn
                .prepare_cached("SELECT count FROM door_uses WHERE key_id = ?1 AND door = ?2")?
                .query_row(params![key_id, door.as_str()], |r| r.get(0))
                .optional()?,
        };
        // A lone decision's overlay is empty: no key to build for the lookup.
        let pending = if self.overlay.is_empty() {
            0
        } else {
            self.overlay
                .get(&(key_id.into(), scope.clone()))
                .copied()
                .unwrap_or(0)
        };
        Ok(stored.unwrap_or(0) + pending)
    }
}

/// Counts a use the decision spent in the commit's overlay, at its door and over all doors.
fn count_use(overlay: &mut UseOverlay, judged: &decide::Judged, door: &DoorId) {
    if judged.consume == Consume::OneUse
        && let Some(key) = &judged.verdict.key_id
    {
        *overlay
            .entry((key.clone(), UseScope::AllDoors))
            .or_default() += 1;
        *overlay
            .entry((key.clone(), UseScope::Door(door.clone())))
            .or_default() += 1;
    }
}

/// What the writer's wait for a command ended with.
enum Next {
    Got(Command),
    /// An idle moment was used: look at the bounds again, then wait again.
    Again,
    /// Every sender is gone.
    Closed,
}

mod answers;
mod keyset;
mod outbox;
mod wal;

use answers::{KeptRow, Remember, load_answers};

use wal::{
    CHECKPOINT_BOUND, CHECKPOINT_BOUND_FULL, CHECKPOINT_SMALL_AFTER, CHECKPOINT_WHEN_IDLE, WalState,
};

/// A key set being staged.
struct Staging {
    generation: i64,
    header: KeySetHeader,
    keys: u64,
    pins: u32,
}

pub(super) struct Writer {
    conn: Connection,
    path: PathBuf,
    ctx: DecisionContext,
    health: Arc<Health>,
    active_generation: i64,
    keyset_version: u64,
    salt: Vec<u8>,
    /// The trusted-time mark as held in memory, and as last written.
    mark: Option<Timestamp>,
    mark_written: Option<Timestamp>,
    /// A `clock_untrusted` alarm is open: decisions are being made on an untrusted clock.
    untrusted: bool,
    /// The held set's `stale_after` and the knowledge time, as on disk (`store::knowledge`).
    freshness: Freshness,
    guards: HashMap<UnitId, PinGuard>,
    active_pins: u32,
    staging: Option<Staging>,
    /// Generations to delete while idle.
    garbage: Vec<i64>,
    /// The next staging generation: never one that may still hold rows.
    next_generation: i64,
    backlog: VecDeque<Record>,
    backlog_limit: usize,
    /// Disk space kept back for when the disk fills (`store::reserve`).
    reserve: super::reserve::Reserve,
    /// The database's own size cap (`storage.max_size`), if any.
    max_size: Option<u64>,
    /// The outbox's bounds (records, bytes), what it holds as committed, and the change the
    /// transaction being built makes to that.
    outbox_limits: (Option<i64>, Option<i64>),
    outbox_count: i64,
    outbox_bytes: i64,
    outbox_delta: (i64, i64),
    /// Records appended by the commit in progress, for [`Health::committed`].
    fresh: Vec<(i64, Record)>,
    /// Records held in memory and dropped during the current disk outage.
    outage: Option<(u64, u64)>,
    /// Set while the connection may be at `synchronous=NORMAL` (staging a chunk).
    relaxed: bool,
    /// What SQLite's WAL hook saw, and the commit count the last checkpoint covered.
    wal: Arc<WalState>,
    checkpointed: u64,
    checkpointed_at: std::time::Instant,
    /// The idle work after the latest commit (pruning, the reserve) was done.
    idle_done: bool,
    /// Idle checkpoints that could not finish (a reader held part of the WAL) since the last
    /// commit.
    checkpoint_tries: u32,
    /// Decisions in the previous group (see [`LINGER`]).
    last_decisions: usize,
    /// Each unit's last kept answer (from `records.answer`), and those the commit in progress
    /// adds, made current once it commits.
    answers: HashMap<UnitId, KeptRow>,
    fresh_answers: Vec<KeptRow>,
    /// Every seq below this is acknowledged (the watermark row `(0, sent_below - 1)` of `sent`).
    sent_below: i64,
    /// How much acknowledged history to keep, and when it was last pruned.
    history: super::History,
    pruned_at: Option<std::time::Instant>,
}

/// What one command of a group produced in the decide phase.
enum Outcome {
    Verify {
        reply: Reply<Verdict>,
        verdict: Verdict,
        consume: Consume,
        records: Vec<Record>,
        /// Kept with the decision for retransmissions (none for a kept answer given again).
        remember: Option<Remember>,
    },
    Append {
        reply: Reply<Vec<i64>>,
        records: Vec<Record>,
    },
    Ack {
        reply: Reply<usize>,
        seqs: Vec<i64>,
    },
    Done(Reply<()>),
    Failed(Box<dyn FnOnce(StoreError) + Send>, StoreError),
}

/// A group's transaction while it is written: opened by [`Writer::open_group`], its commands
/// judged (and, lingering, written) in arrival order, ended by [`Writer::finish_group`].
struct Group {
    began_at: std::time::Instant,
    /// The writer's `sent_below` before the group, restored when its commit fails.
    sent_below: i64,
    /// Committed with `synchronous=NORMAL` (see [`Writer::commit_group`]).
    acks_only: bool,
    overlay: UseOverlay,
    outcomes: Vec<Outcome>,
    /// The seqs written so far per outcome (by [`Writer::add_to_group`]).
    seqs: Vec<Vec<i64>>,
    /// The first failure to begin or write; the rest of the group is then only judged.
    written: Result<(), rusqlite::Error>,
}

/// Whether a command is a decision (what a group lingers for).
fn is_decision(c: &Command) -> bool {
    matches!(c, Command::Batched(b) if is_decision_batched(b))
}

fn is_decision_batched(b: &Batched) -> bool {
    matches!(b, Batched::Verify(..) | Batched::Remote(..))
}

/// The outcome of a decision, or of its failure.
fn verdict(
    decided: Result<(Verdict, Consume, Vec<Record>), StoreError>,
    reply: Reply<Verdict>,
    remember: Option<Remember>,
) -> Outcome {
    match decided {
        Ok((verdict, consume, records)) => Outcome::Verify {
            reply,
            verdict,
            consume,
            // A kept answer given again records nothing and is not kept again.
            remember: remember.filter(|_| !records.is_empty()),
            records,
        },
        Err(e) => Outcome::Failed(Box::new(move |e| drop(reply.send(Err(e)))), e),
    }
}

impl Writer {
    #[allow(clippy::too_many_lines)] // most of it is one line per field
    pub(super) fn new(
        mut conn: Connection,
        options: StoreOptions,
        health: Arc<Health>,
    ) -> Result<Self, StoreError> {
        // SQLite's auto-checkpoint is off (`open_writer`); the writer checkpoints itself, and
        // this hook tells it how far the WAL has grown.
        let wal = Arc::new(WalState::default());
        let seen = Arc::clone(&wal);
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: c_int| {
            seen.frames.store(i64::from(frames), Ordering::Relaxed);
            seen.commits.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }))?;
        let meta_i64 = |name: &str| -> Result<Option<i64>, StoreError> {
            Ok(conn
                .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?)
        };
        let active_generation = meta_i64("active_generation")?.unwrap_or(0);
        let keyset_version =
            meta_i64("keyset_version")?.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        let mark = meta_i64("trusted_time")?.and_then(|s| Timestamp::from_second(s).ok());
        let salt: Vec<u8> = conn
            .query_row(
                "SELECT value FROM meta WHERE name = 'credential_salt'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or_default();
        let active_pins: u32 = conn.query_row(
            "SELECT count(*) FROM credentials WHERE generation = ?1 AND kind = ?2",
            params![active_generation, CredentialKind::Pin.code()],
            |r| r.get(0),
        )?;
        // Generations other than the live one are leftovers of an interrupted install or of an
        // old set not yet removed; both tables are scanned, since a removal can stop between
        // them.
        let mut seen = std::collections::BTreeSet::new();
        for table in ["keys", "credentials"] {
            let sql = format!(
                "SELECT generation FROM {table} WHERE generation > ?1 ORDER BY generation LIMIT 1"
            );
            let mut after = i64::MIN;
            while let Some(g) = conn
                .query_row(&sql, [after], |r| r.get::<_, i64>(0))
                .optional()?
            {
                seen.insert(g);
                after = g;
            }
        }
        let next_generation = seen.last().copied().unwrap_or(0).max(active_generation) + 1;
        let garbage: Vec<i64> = seen
            .into_iter()
            .filter(|&g| g != active_generation)
            .collect();
        let sent_below: i64 = conn
            .query_row("SELECT last + 1 FROM sent WHERE first = 0", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(1);
        // Read once; kept up to date by every commit after. From the watermark on: the
        // history below it is never read at start-up.
        let (outbox_count, outbox_bytes): (i64, i64) = conn.query_row(
            concat!(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM records AS r
                 WHERE seq >= ?1 AND NOT ",
                crate::acked_above!()
            ),
            [sent_below],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let answers = load_answers(&conn)?;
        let freshness = knowledge::read(&conn)?;
        let mut reserve = super::reserve::Reserve::new(&options.path, options.reserve);
        reserve.restore(true);
        Ok(Writer {
            conn,
            reserve,
            max_size: options.max_size,
            path: options.path,
            ctx: options.context,
            health,
            active_generation,
            keyset_version,
            salt,
            mark,
            mark_written: mark,
            untrusted: false,
            freshness,
            guards: HashMap::new(),
            active_pins,
            staging: None,
            next_generation,
            garbage,
            backlog: VecDeque::new(),
            backlog_limit: options.memory_backlog.max(1),
            outbox_limits: (
                options
                    .outbox_max_records
                    .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
                options
                    .outbox_max_bytes
                    .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            ),
            outbox_count,
            outbox_bytes,
            outbox_delta: (0, 0),
            fresh: Vec::new(),
            outage: None,
            relaxed: false,
            wal,
            checkpointed: 0,
            checkpointed_at: std::time::Instant::now(),
            idle_done: false,
            checkpoint_tries: 0,
            last_decisions: 0,
            answers,
            fresh_answers: Vec::new(),
            sent_below,
            history: options.history,
            pruned_at: None,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next command, using the idle moments on the way: an old key set's
    /// removal, a memory backlog retried, the WAL checkpointed, a job's memory given back.
    fn next_command(&mut self, rx: &Receiver<Command>) -> Next {
        if !self.garbage.is_empty() {
            match rx.try_recv() {
                Ok(c) => Next::Got(c),
                // Idle: remove a slice of an old key set, then look again.
                Err(TryRecvError::Empty) => {
                    self.collect_garbage();
                    Next::Again
                }
                Err(TryRecvError::Disconnected) => Next::Closed,
            }
        } else if !self.backlog.is_empty() {
            match rx.recv_timeout(BACKLOG_RETRY) {
                Ok(c) => Next::Got(c),
                // Idle with records in memory: try the disk again.
                Err(RecvTimeoutError::Timeout) => {
                    self.commit_group(Vec::new());
                    Next::Again
                }
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            }
        } else if self.checkpoint_due() {
            match rx.recv_timeout(CHECKPOINT_WHEN_IDLE) {
                Ok(c) => Next::Got(c),
                // Idle after writing: fold the WAL into the database file, once, and put
                // back a disk reserve a full disk took (when there is room again).
                Err(RecvTimeoutError::Timeout) => {
                    self.checkpoint();
                    if self.outage.is_none() {
                        self.prune_if_due();
                        self.reserve.restore(false);
                    }
                    memory::idle(&self.conn);
                    Next::Again
                }
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            }
        } else if self.checkpoint_pending() {
            let wait = if self.idle_done {
                CHECKPOINT_SMALL_AFTER.saturating_sub(self.checkpointed_at.elapsed())
            } else {
                CHECKPOINT_WHEN_IDLE
            };
            match rx.recv_timeout(wait) {
                Ok(c) => Next::Got(c),
                // Idle with a small WAL: what idle time is for but the checkpoint, once;
                // then the WAL waits, folded after CHECKPOINT_SMALL_AFTER at the latest.
                Err(RecvTimeoutError::Timeout) => {
                    if !self.idle_done && self.outage.is_none() {
                        self.prune_if_due();
                        self.reserve.restore(false);
                    }
                    self.idle_done = true;
                    memory::idle(&self.conn);
                    Next::Again
                }
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            }
        } else if memory::due() {
            match rx.recv_timeout(CHECKPOINT_WHEN_IDLE) {
                Ok(c) => Next::Got(c),
                // Idle after a key-set job, with no WAL left to fold: give back its memory.
                Err(RecvTimeoutError::Timeout) => {
                    memory::idle(&self.conn);
                    Next::Again
                }
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            }
        } else {
            match rx.recv() {
                Ok(c) => Next::Got(c),
                Err(_) => Next::Closed,
            }
        }
    }

    pub(super) fn run(mut self, rx: &Receiver<Command>) {
        // The start-up check and migrations passed pages through memory: give it back at the
        // first idle moment, as after a key-set job.
        memory::job_done();
        loop {
            let bound = if self.reserve.in_use() {
                CHECKPOINT_BOUND_FULL
            } else {
                CHECKPOINT_BOUND
            };
            if self.wal.frames.load(Ordering::Relaxed) >= bound {
                // Busy for a long while: bound the WAL now, after the answers went out.
                self.checkpoint();
            }
            let first = match self.next_command(rx) {
                Next::Got(c) => c,
                Next::Again => continue,
                Next::Closed => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            // Either way, what is left in `batch` is grouped below; a group written while
            // lingering is already committed and answered.
            if !self.write_while_lingering(rx, &mut batch) {
                self.linger(rx, &mut batch);
            }
            let mut group = Vec::new();
            for command in batch {
                match command {
                    Command::Shutdown => {
                        self.commit_group(group);
                        self.shut_down();
                        return;
                    }
                    Command::Step(step) => {
                        // Key-set steps are transactions of their own, in order with the rest.
                        self.commit_group(std::mem::take(&mut group));
                        self.key_set_step(step);
                    }
                    Command::Batched(small) => group.push(small),
                }
            }
            self.commit_group(group);
        }
        self.shut_down();
    }

    /// Whether a group of `len` commands, `decisions` of them decisions, waits for more: it
    /// holds some decisions, but fewer than the previous group did, and has room.
    fn wants_more(&self, decisions: usize, len: usize) -> bool {
        decisions > 0 && decisions < self.last_decisions && len < MAX_GROUP
    }

    /// The linger of [`Writer::linger`], with the group's transaction open meanwhile: each
    /// command is judged and its rows written as it arrives, so the wait for the last units
    /// of a group is spent on the first ones' work instead of after it. Only for a group of
    /// small commands with nothing held in memory (the backlog's records go first, which
    /// [`Writer::commit_group`] handles); returns false, touching nothing, otherwise.
    ///
    /// Leaves in `batch` what ended the wait when that was not a small command (a key-set
    /// step, the shutdown), to be handled next.
    fn write_while_lingering(&mut self, rx: &Receiver<Command>, batch: &mut Vec<Command>) -> bool {
        let mut decisions = batch.iter().filter(|c| is_decision(c)).count();
        if !self.wants_more(decisions, batch.len())
            || !self.backlog.is_empty()
            || self.outage.is_some()
            || !batch.iter().all(|c| matches!(c, Command::Batched(_)))
        {
            return false;
        }
        let until = std::time::Instant::now() + LINGER;
        let mut group = self.open_group(false);
        for command in batch.drain(..) {
            if let Command::Batched(small) = command {
                self.add_to_group(&mut group, small);
            }
        }
        while self.wants_more(decisions, group.outcomes.len()) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Command::Batched(small)) => {
                    decisions += usize::from(is_decision_batched(&small));
                    self.add_to_group(&mut group, small);
                }
                Ok(other) => {
                    batch.push(other);
                    break;
                }
                Err(_) => break,
            }
        }
        self.last_decisions = decisions;
        self.close_group(group);
        true
    }

    /// Waits up to [`LINGER`] for more decisions while `batch` holds some, but fewer than the
    /// previous group did.
    fn linger(&mut self, rx: &Receiver<Command>, batch: &mut Vec<Command>) {
        let mut decisions = batch.iter().filter(|c| is_decision(c)).count();
        let until = std::time::Instant::now() + LINGER;
        while self.wants_more(decisions, batch.len()) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let Ok(c) = rx.recv_timeout(left) else { break };
            decisions += usize::from(is_decision(&c));
            batch.push(c);
        }
        self.last_decisions = decisions;
    }

    fn shut_down(&mut self) {
        if !self.backlog.is_empty() {
            self.commit_group(Vec::new());
        }
        if !self.backlog.is_empty() {
            tracing::error!(
                records = self.backlog.len(),
                "stopping with records the disk would not take; they are lost"
            );
        }
        // Fold the WAL into the main file so the next start reads one file.
        let _ = self.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    }

    // ----- the group commit -----

    fn commit_group(&mut self, commands: Vec<Batched>) {
        if commands.is_empty() && self.backlog.is_empty() {
            return;
        }
        // A group of acks only marks uploaded rows sent: committed without an fsync of its own
        // (`synchronous=NORMAL`), because a mark a power cut takes only sends those records
        // again with the same ids, which the cloud drops as duplicates. The next durable
        // commit syncs the WAL with these frames in it.
        let acks_only = self.backlog.is_empty()
            && self.outage.is_none()
            && !commands.is_empty()
            && commands.iter().all(|c| matches!(c, Batched::Ack(..)));
        let mut group = self.open_group(acks_only);
        group.outcomes = commands
            .into_iter()
            .map(|c| self.decide_phase(c, &mut group.overlay))
            .collect();
        let persisted = std::mem::replace(&mut group.written, Ok(()))
            .and_then(|()| self.persist(&group.outcomes, &group.overlay));
        self.finish_group(group, persisted);
    }

    /// Begins a group's transaction (`synchronous=NORMAL` for a group of acks only, else
    /// `FULL`). A failure to begin is kept in the group and ends it as a failed commit.
    fn open_group(&mut self, acks_only: bool) -> Group {
        self.outbox_delta = (0, 0);
        self.fresh.clear();
        self.fresh_answers.clear();
        let sent_below = self.sent_below;
        let began_at = std::time::Instant::now();
        let written = if acks_only {
            self.relax()
        } else {
            self.durable()
        }
        .and_then(|()| self.conn.execute_batch("BEGIN IMMEDIATE"));
        Group {
            began_at,
            sent_below,
            acks_only,
            overlay: HashMap::new(),
            outcomes: Vec::new(),
            seqs: Vec::new(),
            written,
        }
    }

    /// Judges one command of a group opened by [`Writer::write_while_lingering`] and writes
    /// its records at once (phase 1 and phase 2 for this command; acks, the use counters and
    /// the trusted-time mark are written by [`Writer::close_group`]). After a failed write the
    /// rest is only judged: the close rolls back and writes the whole group again, or
    /// degrades it.
    fn add_to_group(&mut self, group: &mut Group, command: Batched) {
        let outcome = self.decide_phase(command, &mut group.overlay);
        if group.written.is_ok() {
            match self.persist_outcome(&outcome) {
                Ok(mine) => group.seqs.push(mine),
                Err(e) => group.written = Err(e),
            }
        }
        group.outcomes.push(outcome);
    }

    /// Writes what [`Writer::add_to_group`] left for the end and commits the group.
    fn close_group(&mut self, mut group: Group) {
        let written = std::mem::replace(&mut group.written, Ok(()));
        let persisted = written.and_then(|()| {
            let acked = self.persist_acks(&group.outcomes)?;
            for (i, n) in acked {
                group.seqs[i].push(n);
            }
            self.persist_uses(&group.overlay)?;
            self.persist_tail()?;
            Ok(std::mem::take(&mut group.seqs))
        });
        self.finish_group(group, persisted);
    }

    /// Commits a group whose rows are written (`persisted`: the seqs per outcome), makes room
    /// and writes it again when the disk is full, and sends the answers: as decided when the
    /// commit succeeded, degraded when it did not.
    fn finish_group(&mut self, group: Group, persisted: Result<Vec<Vec<i64>>, rusqlite::Error>) {
        let Group {
            began_at,
            sent_below,
            acks_only,
            overlay,
            outcomes,
            ..
        } = group;
        let mut committed =
            persisted.and_then(|seqs| self.conn.execute_batch("COMMIT").map(|()| seqs));
        if let Err(e) = &committed
            && e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            && self.outbox_count < self.records_held()
        {
            // The database is at `storage.max_size` or the disk is full: old door history
            // makes room for fresh records first (before the disk reserve).
            let _ = self.conn.execute_batch("ROLLBACK");
            self.sent_below = sent_below;
            match self.prune_history(Timestamp::now(), true) {
                Ok(n) if n > 0 => committed = self.commit_again(&outcomes, &overlay),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning the door history for space failed"),
            }
        }
        if let Err(e) = &committed
            && self.may_release_reserve(e)
        {
            // The disk is full: free the reserve and write the same group again, so these
            // records land on disk rather than in memory.
            let _ = self.conn.execute_batch("ROLLBACK");
            self.sent_below = sent_below;
            let bytes = self.reserve.size();
            if self.reserve.release() {
                tracing::error!(bytes, path = %self.path.display(),
                    "ALARM: the disk is full; its reserve was released so records keep landing on disk");
                self.backlog.push_front(Record::StorageReserveReleased {
                    at: Timestamp::now(),
                    bytes,
                });
            }
            committed = self.commit_again(&outcomes, &overlay);
        }
        if committed.is_err() {
            self.sent_below = sent_below;
        }
        match committed {
            Ok(seqs) => {
                self.health.commit_latency.record(began_at.elapsed());
                self.idle_done = false;
                self.outbox_count += self.outbox_delta.0;
                self.outbox_bytes += self.outbox_delta.1;
                for kept in self.fresh_answers.drain(..) {
                    self.answers.insert(kept.unit.clone(), kept);
                }
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                if acks_only {
                    self.restore_durable();
                }
                self.recovered();
                self.answer(outcomes, Some(seqs));
                self.health.committed(std::mem::take(&mut self.fresh));
                // A spurious wake-up costs the uplink one indexed query; a missed one would
                // leave records waiting.
                self.health.outbox_grew.notify_one();
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                if acks_only {
                    self.restore_durable();
                }
                // Whatever refused the write (a full or read-only disk, or a damaged page),
                // the records wait in memory and the decisions follow the unrecordable policy:
                // failing them outright would lock residents out and lose the records.
                if !is_disk_trouble(&e) {
                    tracing::error!(error = %e, "store commit failed for a reason other than the disk's space or mode");
                }
                self.degrade(&e);
                self.answer(outcomes, None);
            }
        }
    }

    /// Writes a group again after a failed commit was rolled back and room was made.
    fn commit_again(
        &mut self,
        outcomes: &[Outcome],
        overlay: &UseOverlay,
    ) -> Result<Vec<Vec<i64>>, rusqlite::Error> {
        self.outbox_delta = (0, 0);
        self.fresh.clear();
        self.fresh_answers.clear();
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .and_then(|()| self.persist(outcomes, overlay))
            .and_then(|seqs| self.conn.execute_batch("COMMIT").map(|()| seqs))
    }

    /// Phase 1: judge every command without writing.
    fn decide_phase(&mut self, command: Batched, overlay: &mut UseOverlay) -> Outcome {
        match command {
            Batched::Verify(request, reply) => {
                let remember = Remember::of(&request);
                verdict(self.decide(&request, overlay), reply, remember)
            }
            Batched::Remote(request, reply) => {
                verdict(self.decide_remote(&request, overlay), reply, None)
            }
            Batched::Append(records, reply) => Outcome::Append { reply, records },
            Batched::Ack(seqs, reply) => Outcome::Ack { reply, seqs },
            Batched::Reconfigure(ctx, reply) => {
                self.ctx = *ctx;
                Outcome::Done(reply)
            }
        }
    }

    fn decide(
        &mut self,
        req: &VerifyRequest,
        overlay: &mut UseOverlay,
    ) -> Result<(Verdict, Consume, Vec<Record>), StoreError> {
        let now = req.now;
        if let Some(kept) = self.kept_answer(req) {
            tracing::info!(unit = %req.unit, request_id = ?req.request_id, "a retransmission after a restart: answered as before, not judged again");
            return Ok((kept, Consume::Nothing, Vec::new()));
        }
        let mut records = Vec::with_capacity(1);
        if req.clock_synced {
            records.extend(self.synced_clock(now));
        }
        // The unit's lockout, out of the map while the decider has it.
        let mut guard = self.guards.remove(&req.unit).unwrap_or_default();
        let judged = decide::credential(
            &SqlKeys::new(&self.conn, self.active_generation, overlay),
            &self.decision_rules(self.clock_trust(now, req.clock_synced)),
            &mut guard,
            req,
        );
        self.guards.insert(req.unit.clone(), guard);
        let judged = judged?;
        count_use(overlay, &judged, &req.door);
        records.extend(judged.lockout);
        records.extend(self.trust_changed(now, req.clock_synced, judged.found));
        records.insert(0, Record::Activity(judged.activity));
        Ok((judged.verdict, judged.consume, records))
    }

    /// A remote open: the key is named by id (the app holds it), so there is no credential to
    /// look up and no keypad to lock; otherwise judged and recorded like [`Writer::decide`].
    fn decide_remote(
        &mut self,
        req: &RemoteOpen,
        overlay: &mut UseOverlay,
    ) -> Result<(Verdict, Consume, Vec<Record>), StoreError> {
        let mut clock = Vec::new();
        if req.clock_synced {
            clock.extend(self.synced_clock(req.now));
        }
        let judged = decide::remote(
            &SqlKeys::new(&self.conn, self.active_generation, overlay),
            &self.decision_rules(self.clock_trust(req.now, req.clock_synced)),
            req,
        )?;
        count_use(overlay, &judged, &req.door);
        clock.extend(self.trust_changed(req.now, req.clock_synced, judged.found));
        // The activity first: its seq is the decision's.
        let mut records = vec![Record::Activity(judged.activity)];
        records.extend(clock);
        Ok((judged.verdict, judged.consume, records))
    }

    /// What a decision is made with now: the configuration's rules with the held set's
    /// freshness limits, the salt, the PIN count and the clock's trust.
    fn decision_rules(&self, clock: ClockTrust) -> decide::Rules<'_> {
        decide::Rules {
            site: &self.ctx.site,
            policy: Policy {
                freshness: self.freshness,
                ..self.ctx.policy
            },
            lockout: &self.ctx.lockout,
            salt: &self.salt,
            active_pins: self.active_pins,
            clock,
        }
    }

    fn clock_trust(&self, now: Timestamp, synced: bool) -> ClockTrust {
        let trusted = synced
            || self.mark.is_some_and(|mark| {
                now.checked_add(self.ctx.clock_tolerance)
                    .is_ok_and(|ahead| ahead >= mark)
            });
        if trusted {
            ClockTrust::Trusted
        } else {
            ClockTrust::Untrusted
        }
    }

    /// The trusted-time mark, when it moved far enough since it was last written to be worth a
    /// write (the same answer in `persist`, which writes it, and `answer`, which notes it).
    fn mark_due(&self) -> Option<Timestamp> {
        self.mark.filter(|&mark| {
            self.mark_written
                .is_none_or(|w| mark.duration_since(w) >= MARK_GRANULARITY)
        })
    }

    /// The clock is NTP-synchronised at `now`: the mark follows it up, and comes down to it
    /// when it lies ahead by more than the tolerance (a wrongly raised mark; NTP is the better
    /// witness), with an alarm.
    fn synced_clock(&mut self, now: Timestamp) -> Option<Record> {
        match self.mark {
            Some(mark)
                if now
                    .checked_add(self.ctx.clock_tolerance)
                    .is_ok_and(|ahead| mark > ahead) =>
            {
                tracing::warn!(%mark, %now, "the trusted-time mark lies ahead of the NTP-synchronised clock; lowered to it");
                self.mark = Some(now);
                // Written with this decision: `mark_due` compares with the last write.
                self.mark_written = None;
                Some(Record::ClockMarkLowered {
                    at: now,
                    from: mark,
                    to: now,
                })
            }
            _ => {
                self.raise_mark(now);
                None
            }
        }
    }

    /// The alarm when a key is first judged on an untrusted clock (time-bound keys are denied;
    /// the others follow `clock.untrusted_unlimited`), and when a decision finds the clock
    /// trusted again: once per episode, not per decision. An unknown credential does not depend
    /// on the clock and opens no episode.
    fn trust_changed(&mut self, now: Timestamp, synced: bool, judged: bool) -> Option<Record> {
        let untrusted = self.clock_trust(now, synced) == ClockTrust::Untrusted;
        if untrusted == self.untrusted || (untrusted && !judged) {
            return None;
        }
        self.untrusted = untrusted;
        if untrusted {
            tracing::warn!(%now, mark = ?self.mark, "deciding on an untrusted clock: time-bound keys are denied");
        } else {
            tracing::info!(%now, "the clock is trusted again");
        }
        Some(Record::ClockUntrusted {
            at: now,
            active: untrusted,
            mark: self.mark,
        })
    }

    fn raise_mark(&mut self, at: Timestamp) {
        if self.mark.is_none_or(|m| at > m) {
            self.mark = Some(at);
        }
    }

    /// Phase 2: write what phase 1 decided. Returns the outbox sequence numbers per outcome.
    fn persist(
        &mut self,
        outcomes: &[Outcome],
        overlay: &UseOverlay,
    ) -> Result<Vec<Vec<i64>>, rusqlite::Error> {
        // Acknowledged records stay as history: marked sent, in ranges (a few rows per batch
        // instead of a rewrite of every record's page). First: on a full disk they are deleted
        // instead, which frees the pages the rest needs.
        let acked: HashMap<usize, i64> = self.persist_acks(outcomes)?.into_iter().collect();
        let had_outage = self.outage;
        for i in 0..self.backlog.len() {
            let record = self.backlog[i].clone();
            self.insert(record)?;
        }
        if let Some((kept, dropped)) = had_outage {
            self.insert(Record::StorageRecovered {
                at: Timestamp::now(),
                kept_in_memory: kept,
                dropped,
            })?;
        }
        self.persist_uses(overlay)?;
        let mut seqs = Vec::with_capacity(outcomes.len());
        for (i, outcome) in outcomes.iter().enumerate() {
            let mut mine = self.persist_outcome(outcome)?;
            mine.extend(acked.get(&i));
            seqs.push(mine);
        }
        self.persist_tail()?;
        Ok(seqs)
    }

    /// Marks the acknowledged records of a group's acks sent: per ack, its index among the
    /// outcomes and how many records it marked.
    fn persist_acks(&mut self, outcomes: &[Outcome]) -> Result<Vec<(usize, i64)>, rusqlite::Error> {
        let mut acked = Vec::new();
        for (i, outcome) in outcomes.iter().enumerate() {
            if let Outcome::Ack { seqs, .. } = outcome {
                acked.push((i, i64::try_from(self.mark_sent(seqs)?).unwrap_or(i64::MAX)));
            }
        }
        if !acked.is_empty() {
            self.fold_sent()?;
        }
        Ok(acked)
    }

    /// Adds the uses granted in a group to the stored counters.
    fn persist_uses(&mut self, overlay: &UseOverlay) -> Result<(), rusqlite::Error> {
        for ((key, scope), n) in overlay {
            match scope {
                    UseScope::AllDoors => self
                        .conn
                        .prepare_cached(
                            "INSERT INTO key_uses (key_id, count) VALUES (?1, ?2)
                             ON CONFLICT (key_id) DO UPDATE SET count = count + excluded.count",
                        )?
                        .execute(params![key.as_str(), n])?,
                    UseScope::Door(door) => self
                        .conn
                        .prepare_cached(
                            "INSERT INTO door_uses (key_id, door, count) VALUES (?1, ?2, ?3)
                             ON CONFLICT (key_id, door) DO UPDATE SET count = count + excluded.count",
                        )?
                        .execute(params![key.as_str(), door.as_str(), n])?,
                };
        }
        Ok(())
    }

    /// Writes one outcome's records (a decision's with its kept answer); returns their seqs.
    fn persist_outcome(&mut self, outcome: &Outcome) -> Result<Vec<i64>, rusqlite::Error> {
        let mut mine = Vec::new();
        match outcome {
            Outcome::Verify {
                records,
                remember,
                verdict,
                ..
            } => {
                // The kept answer rides in the decision's first record's row.
                let mut kept = remember.as_ref().map(|r| Self::kept_row(r, verdict));
                for r in records {
                    // The row's seq is not in the blob: a start reads it from the row.
                    let blob = kept.as_ref().map(KeptRow::to_disk);
                    let seq = self.insert_with(r.clone(), blob.as_deref())?;
                    if let Some(k) = kept.take() {
                        self.fresh_answers.push(k.at_seq(seq));
                    }
                    mine.push(seq);
                }
            }
            Outcome::Append { records, .. } => {
                for r in records {
                    mine.push(self.insert(r.clone())?);
                }
            }
            Outcome::Ack { .. } | Outcome::Done(_) | Outcome::Failed(..) => {}
        }
        Ok(mine)
    }

    /// The end of every group's writing: the outbox bounded, the trusted-time mark.
    fn persist_tail(&mut self) -> Result<(), rusqlite::Error> {
        self.bound_outbox()?;
        if let Some(mark) = self.mark_due() {
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('trusted_time', ?1)",
                [mark.as_second()],
            )?;
        }
        Ok(())
    }

    /// Sends the answers. `seqs` is `None` when the commit failed and the group is degraded.
    fn answer(&mut self, outcomes: Vec<Outcome>, seqs: Option<Vec<Vec<i64>>>) {
        let committed = seqs.is_some();
        let mut seqs = seqs.unwrap_or_default().into_iter();
        for outcome in outcomes {
            let mine = seqs.next().unwrap_or_default();
            match outcome {
                Outcome::Verify {
                    reply,
                    mut verdict,
                    consume,
                    records,
                    ..
                } => {
                    if committed {
                        // A kept answer given again records nothing: it keeps its first seq.
                        if let Some(&seq) = mine.first() {
                            verdict.seq = Some(seq);
                        }
                    } else {
                        verdict.decision = self.unrecorded(verdict.decision, consume);
                        for r in records {
                            self.hold(r);
                        }
                    }
                    let _ = reply.send(Ok(verdict));
                }
                Outcome::Append { reply, records } => {
                    if !committed {
                        for r in records {
                            self.hold(r);
                        }
                    }
                    let _ = reply.send(Ok(mine));
                }
                Outcome::Ack { reply, .. } => {
                    let result = if committed {
                        Ok(mine.first().map_or(0, |&n| usize::try_from(n).unwrap_or(0)))
                    } else {
                        Err(StoreError::Io {
                            what: "deleting acknowledged records",
                            source: std::io::Error::other("the disk refuses writes"),
                        })
                    };
                    let _ = reply.send(result);
                }
                Outcome::Done(reply) => drop(reply.send(Ok(()))),
                Outcome::Failed(send, e) => send(e),
            }
        }
        if committed {
            self.backlog.clear();
            if let Some(mark) = self.mark_due() {
                self.mark_written = Some(mark);
            }
        }
    }

    /// The answer when the decision's record could not be written.
    fn unrecorded(&self, decision: Decision, consume: Consume) -> Decision {
        match decision {
            Decision::Grant(_) if consume == Consume::OneUse => {
                Decision::deny(DenyReason::NotRecorded)
            }
            Decision::Grant(g) => match self.ctx.unrecordable_unlimited {
                UnlimitedPolicy::Grant => Decision::Grant(g),
                UnlimitedPolicy::Deny => Decision::deny(DenyReason::NotRecorded),
            },
            deny @ Decision::Deny { .. } => deny,
        }
    }

    /// Whether a failed commit is the disk being full, with a reserve left to release: not
    /// the database at its own `storage.max_size` (releasing disk space would not help).
    fn may_release_reserve(&self, e: &rusqlite::Error) -> bool {
        if !self.reserve.present() || e.sqlite_error_code() != Some(rusqlite::ErrorCode::DiskFull) {
            return false;
        }
        let Some(max) = self.max_size else {
            return true;
        };
        let size: rusqlite::Result<i64> = self.conn.query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        );
        // Within a few pages of the cap: the cap refused it.
        size.is_ok_and(|s| u64::try_from(s).unwrap_or(0) + 64 * 1024 < max)
    }

    fn degrade(&mut self, e: &rusqlite::Error) {
        if self.outage.is_none() {
            tracing::error!(error = %e, path = %self.path.display(),
                "ALARM: the disk refuses writes; limited keys are refused, records are kept in memory");
            self.outage = Some((0, 0));
            self.health.degraded.store(true, Ordering::Relaxed);
            self.hold(Record::StorageUnavailable {
                at: Timestamp::now(),
                detail: e.to_string(),
            });
        }
    }

    fn recovered(&mut self) {
        if let Some((kept, dropped)) = self.outage.take() {
            tracing::warn!(
                kept,
                dropped,
                "the disk takes writes again; held records written"
            );
            self.health.degraded.store(false, Ordering::Relaxed);
        }
    }

    /// Keeps a record in memory during a disk outage, dropping the oldest routine record when
    /// the backlog is full (alarms are kept).
    fn hold(&mut self, record: Record) {
        if self.backlog.len() >= self.backlog_limit {
            let victim = self
                .backlog
                .iter()
                .position(|r| r.class() != super::RecordClass::Alarm)
                .unwrap_or(0);
            self.backlog.remove(victim);
            self.health.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some((_, dropped)) = &mut self.outage {
                *dropped += 1;
            }
        }
        self.backlog.push_back(record);
        if let Some((kept, _)) = &mut self.outage {
            *kept += 1;
        }
    }
}

/// The alarm for a signed time not used for the mark (logged too).
fn mark_ignored(signed: Timestamp, limit: Timestamp) -> Record {
    tracing::warn!(%signed, %limit, "a signed cloud time lies more than a day beyond the clock and the trusted-time mark; the key set is taken, its time is not used for the mark");
    Record::ClockMarkIgnored {
        at: Timestamp::now(),
        signed,
        limit,
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules;
    use super::outbox::runs;
    use super::*;
    use crate::access::Key;

    #[test]
    fn a_signed_time_raises_the_mark_by_at_most_a_day_past_clock_and_mark() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let now = t("2026-12-01T00:00:00Z");
        // No mark yet: believed up to a day past the clock.
        assert_eq!(
            signed_mark(t("2026-12-01T20:00:00Z"), now, None),
            Ok(t("2026-12-01T20:00:00Z"))
        );
        assert_eq!(
            signed_mark(t("2046-12-01T00:00:00Z"), now, None),
            Err(t("2026-12-02T00:00:00Z"))
        );
        // A clock reset by a power cut (1970): a day past the mark.
        let old = t("1970-01-01T00:00:00Z");
        let mark = Some(t("2026-11-30T00:00:00Z"));
        assert_eq!(
            signed_mark(t("2026-11-30T23:00:00Z"), old, mark),
            Ok(t("2026-11-30T23:00:00Z"))
        );
        assert!(signed_mark(t("2026-12-05T00:00:00Z"), old, mark).is_err());
        // Never lowered by an older signed time.
        assert_eq!(
            signed_mark(t("2026-01-01T00:00:00Z"), now, mark),
            Ok(t("2026-11-30T00:00:00Z"))
        );
    }
    use crate::access::{Credential, CredentialDigest, Site};
    use crate::store::schema;
    use tokio::sync::oneshot;

    fn writer(path: &Path) -> Writer {
        let mut conn = schema::open_writer(path).unwrap();
        schema::migrate(&mut conn).unwrap();
        let site = Site {
            tz: jiff::tz::TimeZone::UTC,
            doors: std::collections::BTreeMap::from([(
                "main".into(),
                crate::access::Door {
                    inner: false,
                    behind: Vec::new(),
                },
            )]),
        };
        Writer::new(
            conn,
            StoreOptions::new(path, DecisionContext::new(site)),
            Arc::new(Health::default()),
        )
        .unwrap()
    }

    fn key(id: &str, digest: u8) -> Key {
        Key {
            rules: KeyRules {
                id: id.into(),
                ..rules::tests::full()
            },
            credentials: vec![Credential {
                kind: CredentialKind::Qr,
                digest: CredentialDigest([digest; 32]),
            }],
        }
    }

    fn synchronous(w: &Writer) -> i64 {
        w.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// The head of key set version 1, salted with `salt`.
    fn header_v1() -> KeySetHeader {
        KeySetHeader {
            version: 1,
            salt: b"salt".to_vec(),
            issued_at: None,
            stale_after: crate::access::StaleLimits::default(),
        }
    }

    /// A writer holding one single-use QR key ("once", for door `main`, any time).
    fn writer_with_a_single_use_key(path: &Path) -> Writer {
        let mut w = writer(path);
        let generation = w.begin(header_v1()).unwrap();
        let mut once = key("once", 7);
        once.credentials[0].digest =
            crate::access::credential::digest(b"salt", CredentialKind::Qr, b"tok");
        once.rules.doors = vec!["main".into()];
        once.rules.valid_from = None;
        once.rules.valid_until = None;
        once.rules.schedule = crate::access::Schedule::Always;
        once.rules.use_limit = crate::access::UseLimit::Total(1);
        w.stage(generation, &[once]).unwrap();
        w.commit_key_set(generation, 1).unwrap();
        w
    }

    /// A verify of the "once" key's credential by `unit`, and where its answer arrives.
    fn verify_once(unit: &str) -> (Command, oneshot::Receiver<Result<Verdict, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        let request = VerifyRequest {
            unit: unit.into(),
            door: "main".into(),
            request_id: Some(1),
            kind: CredentialKind::Qr,
            secret: b"tok".to_vec(),
            now: Timestamp::now(),
            clock_synced: false,
            retransmit: None,
        };
        (Command::Batched(Batched::Verify(Box::new(request), tx)), rx)
    }

    #[test]
    fn a_group_written_while_it_lingers_spends_a_single_use_once_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_with_a_single_use_key(&dir.path().join("db"));
        // The previous group held 3 decisions: this one waits for 3, writing as they come.
        w.last_decisions = 3;
        let health = Arc::clone(&w.health);
        let commits = || health.commits.load(Ordering::Relaxed);
        let before = commits();
        let (first, a) = verify_once("bus0/1");
        let (second, b) = verify_once("bus1/1");
        let (third, c) = verify_once("bus2/1");
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(second).unwrap();
        tx.send(third).unwrap();
        let mut batch = vec![first];
        assert!(w.write_while_lingering(&rx, &mut batch));
        assert!(batch.is_empty(), "every command was taken into the group");
        assert_eq!(commits() - before, 1, "one commit for the three");
        let verdicts: Vec<Verdict> = [a, b, c].into_iter().map(committed).collect();
        let grants = verdicts.iter().filter(|v| v.decision.is_grant()).count();
        assert_eq!(
            grants, 1,
            "a single-use key opened more than once: {verdicts:?}"
        );
        // Written in arrival order.
        let seqs: Vec<i64> = verdicts.iter().map(|v| v.seq.unwrap()).collect();
        assert!(seqs.is_sorted() && seqs[0] < seqs[2], "{seqs:?}");
        let used: u32 = w
            .conn
            .query_row(
                "SELECT count FROM key_uses WHERE key_id = 'once'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(used, 1, "the use counted once, at the end of the group");
    }

    #[test]
    fn the_stop_ends_a_lingering_group_and_is_left_for_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_with_a_single_use_key(&dir.path().join("db"));
        w.last_decisions = 8;
        let (first, a) = verify_once("bus0/1");
        let (second, b) = verify_once("bus1/1");
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(second).unwrap();
        tx.send(Command::Shutdown).unwrap();
        let mut batch = vec![first];
        assert!(w.write_while_lingering(&rx, &mut batch));
        assert!(
            matches!(batch.as_slice(), [Command::Shutdown]),
            "the stop is handled next"
        );
        for v in [a, b].into_iter().map(committed) {
            assert!(
                v.seq.is_some(),
                "both decisions recorded before the stop: {v:?}"
            );
        }
        assert_eq!(w.last_decisions, 2);
        // Nothing lingers for a group the size of the last one.
        let (lone, _answer) = verify_once("bus0/1");
        w.last_decisions = 1;
        let mut batch = vec![lone];
        assert!(!w.write_while_lingering(&rx, &mut batch));
        assert_eq!(
            batch.len(),
            1,
            "left as it was for the group written at once"
        );
    }

    #[test]
    fn staging_relaxes_synchronous_for_its_own_transaction_only() {
        const FULL: i64 = 2;
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(&dir.path().join("db"));
        assert_eq!(synchronous(&w), FULL);
        let generation = w.begin(header_v1()).unwrap();
        w.stage(generation, &[key("a", 1)]).unwrap();
        assert_eq!(synchronous(&w), FULL, "after a chunk");
        // A chunk that fails half-way (a key id twice) leaves FULL behind as well.
        let err = w
            .stage(generation, &[key("b", 2), key("b", 3)])
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert_eq!(synchronous(&w), FULL, "after a failed chunk");
        assert!(!w.relaxed);
    }

    #[test]
    fn runs_group_consecutive_seqs_whatever_their_order() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[7]), vec![(7, 7)]);
        assert_eq!(
            runs(&[5, 3, 4, 9, 10, 4, 12]),
            vec![(3, 5), (9, 10), (12, 12)]
        );
    }

    fn committed<T: std::fmt::Debug>(rx: oneshot::Receiver<Result<T, StoreError>>) -> T {
        rx.blocking_recv().unwrap().unwrap()
    }

    #[test]
    fn acks_delete_exactly_the_acknowledged_rows_in_a_relaxed_commit() {
        const FULL: i64 = 2;
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(&dir.path().join("db"));
        let press = |button| Record::CallButton {
            at: Timestamp::UNIX_EPOCH,
            unit: "entrance/1".into(),
            door: "main".into(),
            button,
        };
        let (tx, rx) = oneshot::channel();
        w.commit_group(vec![Batched::Append((1..=8).map(press).collect(), tx)]);
        let seqs = committed(rx);
        assert_eq!(seqs.len(), 8);
        // Two runs and a single row, out of order, one of them acknowledged twice.
        let acked = vec![seqs[5], seqs[0], seqs[1], seqs[2], seqs[1], seqs[6]];
        let (tx, rx) = oneshot::channel();
        w.commit_group(vec![Batched::Ack(acked, tx)]);
        assert_eq!(committed(rx), 5, "rows deleted");
        assert_eq!(synchronous(&w), FULL, "FULL again after the acks' commit");
        assert!(!w.relaxed);
        let left: Vec<i64> = w
            .conn
            .prepare("SELECT seq FROM outbox ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, vec![seqs[3], seqs[4], seqs[7]]);
        assert_eq!(w.outbox_count, 3, "the outbox count follows the deletes");
    }
}
