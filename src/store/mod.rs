//! The SQLite store: key sets, use counters, the trusted-time mark and the outbox.
//!
//! One thread owns the writing connection (`writer`); everything that changes the database
//! goes to it over a channel and waits for its reply. Decisions are made on that thread too,
//! so "read the counter, decide, count the use" can never interleave with another decision.
//! Commands that arrive together share one `synchronous=FULL` commit (group commit): a
//! decision is durable before its answer leaves, without costing one fsync each.
//!
//! Reads for operators and status go through [`Reader`], a separate read-only connection that
//! WAL lets run beside the writer without waiting.
//!
//! The access decision itself is `decide`: pure, over a small view of the held keys and their
//! counters that the writer implements with SQLite.
//!
//! Around them: `schema` (migrations, the start-up check, moving a damaged file aside and
//! salvaging it), `check` (the idle full integrity check, on a thread of its own), `reserve`
//! (disk space released when the disk fills), `memory` (the allocator's free memory returned
//! after a key-set job), [`records`] (what the outbox holds), [`rules`] (the compact encoding
//! of a key's rules), `lookup` (a key's rules by credential digest or by id, for the writer,
//! the readers and the delegation checks) and `knowledge` (the held set's `stale_after` and
//! the knowledge time).

pub mod chain;
mod check;
mod decide;
pub use decide::UseScope;
mod delegation;
mod knowledge;
mod lookup;
mod memory;
mod reader;
pub mod records;
mod reserve;
pub mod rules;
pub mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use jiff::Timestamp;
use tokio::sync::oneshot;

use crate::access::{
    Category, CredentialKind, Decision, DoorId, Key, KeyId, LockoutPolicy, Policy, Site,
    StaleLimits, UnlimitedPolicy,
};
use crate::bus::message::Settings;
use crate::ids::UnitId;
pub use memory::hold_little;
pub use reader::{KeySetInfo, Reader};
pub use records::{Activity, Record, RecordClass, StoredRecord};
pub use writer::RETRANSMIT_WINDOW;

/// What can go wrong at the store's boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "the database has schema version {found}, newer than this build's {supported}; \
         install a newer doorbridge (retrying will not help)"
    )]
    TooNew { found: i64, supported: i64 },
    #[error("the store's writer thread has stopped; restart the service")]
    WriterGone,
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    #[error("key set rejected: {0}")]
    KeySet(#[from] KeySetRefusal),
    /// A delta signed by a delegated key reaches beyond the delegation (or the delegation is
    /// expired or revoked): refused whole, and no resync helps.
    #[error("outside_delegation: {0}")]
    OutsideDelegation(String),
    #[error(
        "another process has the store {0} open for writing (is the doorbridge service \
         running? stop it first)"
    )]
    InUse(String),
}

/// Why the store refused a key set or a change to it: its content or its order, never the disk.
/// The cloud link records it as a refusal of the message (`docs/cloud-protocol.md` §8) and asks
/// for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySetRefusal {
    #[error("a delta from version {from} does not apply on the held version {held}")]
    DeltaBase { from: u64, held: u64 },
    #[error("a delta to version {version} is not newer than {from}")]
    DeltaNotNewer { version: u64, from: u64 },
    #[error("version {version} is not newer than the held version {held}")]
    NotNewer { version: u64, held: u64 },
    /// Above `i64::MAX`, which SQLite cannot hold.
    #[error("version {0} out of range")]
    VersionOutOfRange(u64),
    /// A chunk or a commit for a staging that is not (or no longer) the one in progress.
    #[error("no key set is being staged as generation {0}")]
    NotStaging(i64),
    #[error("staged {staged} keys but the set has {expected}")]
    KeyCount { staged: u64, expected: u64 },
    #[error("key id {0} appears twice in the set")]
    DuplicateKeyId(KeyId),
    #[error("a credential of key {0} appears twice in the set")]
    DuplicateCredential(KeyId),
}

impl StoreError {
    /// Whether trying the same thing again later may succeed (a full or busy disk may clear;
    /// a schema from the future or a rejected key set will not).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => is_disk_trouble(e),
            StoreError::Io { .. } | StoreError::WriterGone | StoreError::InUse(_) => true,
            StoreError::TooNew { .. }
            | StoreError::Corrupt(_)
            | StoreError::KeySet(_)
            | StoreError::OutsideDelegation(_) => false,
        }
    }
}

/// After a damaged file was moved aside to `aside`: salvages its unsent records and use counts
/// into the fresh database and records a `database_replaced` alarm.
fn recover(conn: &mut rusqlite::Connection, aside: &Path, problem: &str) -> Result<(), StoreError> {
    let salvaged = schema::salvage(aside, conn)?;
    tracing::warn!(
        records = salvaged.records,
        uses = salvaged.uses,
        "salvaged from the damaged database; the keys come back with the next snapshot"
    );
    let alarm = Record::DatabaseReplaced {
        at: Timestamp::now(),
        problem: problem.chars().take(500).collect(),
        moved_to: aside.display().to_string(),
        records: salvaged.records,
        uses: salvaged.uses,
    };
    chain::insert(
        conn,
        alarm.class().code(),
        alarm.at().as_millisecond(),
        &alarm.to_cbor(),
        None,
    )?;
    Ok(())
}

/// Takes the exclusive lock on `{path}.lock`, or says who has it.
fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)
        .map_err(|source| StoreError::Io {
            what: "opening the store's lock file",
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::InUse(path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Io {
            what: "locking the store",
            source,
        }),
    }
}

/// Errors that mean the disk cannot take a write now (full, read-only, failing, locked).
pub(crate) fn is_disk_trouble(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    matches!(
        e.sqlite_error_code(),
        Some(
            C::DiskFull
                | C::ReadOnly
                | C::SystemIoFailure
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen
        )
    )
}

/// The rules the writer decides with; replaced as a whole on a config reload.
#[derive(Clone, Debug)]
pub struct DecisionContext {
    pub site: Site,
    pub policy: Policy,
    pub lockout: LockoutPolicy,
    /// How far behind the trusted-time mark the clock may be and still be trusted.
    pub clock_tolerance: jiff::SignedDuration,
    /// What unlimited keys get when their decision cannot be recorded.
    pub unrecordable_unlimited: UnlimitedPolicy,
}

impl DecisionContext {
    /// The rules for `site` with the configuration's defaults for everything else.
    pub fn new(site: Site) -> Self {
        DecisionContext {
            site,
            policy: Policy::default(),
            lockout: LockoutPolicy::default(),
            clock_tolerance: jiff::SignedDuration::from_secs(2),
            unrecordable_unlimited: UnlimitedPolicy::Grant,
        }
    }
}

/// How to open the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub context: DecisionContext,
    /// Records held in memory while the disk cannot take them; beyond this the oldest routine
    /// ones are dropped (and counted).
    pub memory_backlog: usize,
    /// The most the database file may grow to, in bytes (`None`: as far as the disk allows).
    /// Reaching it behaves like a full disk.
    pub max_size: Option<u64>,
    /// The outbox holds at most this many records / bytes of records; beyond, routine telemetry
    /// and then the oldest routine activity are dropped, never alarms (`None`: no bound).
    pub outbox_max_records: Option<u64>,
    pub outbox_max_bytes: Option<u64>,
    /// Bytes of disk kept in reserve beside the database (`{path}.reserve`), released when the
    /// disk is full so records keep landing on disk (0: none).
    pub reserve: u64,
    /// How often the full integrity check runs, when the store is idle (`None`: never).
    pub integrity_every: Option<std::time::Duration>,
    /// How much of the door history (records the cloud acknowledged) is kept.
    pub history: History,
}

/// The door history's bounds: acknowledged records older than `days` or beyond the newest
/// `max_records` are pruned, in bulk, hourly while idle (`None`: no bound of that kind). Records
/// not yet acknowledged are never pruned; old history also goes first when the database is
/// full (docs/storage.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    pub days: Option<u32>,
    pub max_records: Option<u64>,
}

impl Default for History {
    fn default() -> Self {
        History {
            days: Some(90),
            max_records: Some(250_000),
        }
    }
}

impl StoreOptions {
    /// Options with the defaults for everything but the path and the rules.
    pub fn new(path: impl Into<PathBuf>, context: DecisionContext) -> Self {
        StoreOptions {
            path: path.into(),
            context,
            memory_backlog: 10_000,
            max_size: None,
            outbox_max_records: None,
            outbox_max_bytes: None,
            reserve: 0,
            integrity_every: Some(std::time::Duration::from_secs(24 * 3600)),
            history: History::default(),
        }
    }
}

/// A credential presented at a door.
#[derive(Clone, Debug)]
pub struct VerifyRequest {
    /// The door unit, as `bus/address`; PIN lockouts are per unit.
    pub unit: UnitId,
    pub door: DoorId,
    /// The bus request id, carried into the activity record.
    pub request_id: Option<u32>,
    pub kind: CredentialKind,
    /// The credential as presented; only its digest is compared, nothing is stored.
    pub secret: Vec<u8>,
    pub now: Timestamp,
    /// The system clock is NTP-synchronised now, so `now` may advance the trusted-time mark.
    pub clock_synced: bool,
    /// What names this request across retransmissions (door bus units): with it, the answer
    /// is kept on disk with the decision, and a retransmission arriving after a restart or
    /// power cut gets the same answer without being judged again (no use spent twice).
    pub retransmit: Option<Retransmit>,
}

/// A door-bus request's identity beyond its `request_id` (`bus::session::RequestKey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    /// SHA-256 of the request's message type and body.
    pub fingerprint: [u8; 32],
    /// The unit's boot id, when known.
    pub boot_id: Option<u32>,
}

/// The store's answer to a [`VerifyRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub key_id: Option<KeyId>,
    pub category: Option<Category>,
    /// The activity record's sequence number, or `None` when the disk could not take it and
    /// it is held in memory.
    pub seq: Option<i64>,
}

/// The head of a key set being installed.
#[derive(Clone, Debug)]
pub struct KeySetHeader {
    pub version: u64,
    /// The site salt the credential digests in this set were made with.
    pub salt: Vec<u8>,
    /// The cloud's signing time, a trusted instant for the clock mark and the knowledge time.
    pub issued_at: Option<Timestamp>,
    /// How old the gateway's knowledge may get per category (empty: no limits).
    pub stale_after: StaleLimits,
}

/// An incremental change to the live key set (a cloud delta), applied in one transaction.
#[derive(Clone, Debug)]
pub struct DeltaChange {
    /// The version the change applies on top of: must be the held version.
    pub from_version: u64,
    /// The version held afterwards; greater than `from_version`.
    pub version: u64,
    /// The cloud's signing time, a trusted instant for the clock mark.
    pub issued_at: Option<Timestamp>,
    /// Keys added, or replaced whole with all their credentials (matched by id).
    pub upserts: Vec<Key>,
    /// Ids of keys to revoke: they stay in the set, marked revoked.
    pub revokes: Vec<KeyId>,
    /// New `stale_after` limits replacing the held ones (`None`: unchanged).
    pub stale_after: Option<StaleLimits>,
    /// The id of the delegation whose key signed the delta (`None`: a root key). A delegated
    /// change is checked against the held delegation in the delta's own transaction.
    pub signer: Option<String>,
}

/// A delegation the gateway holds (`docs/cloud-protocol.md` §5.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDelegation {
    pub id: String,
    pub public_key: [u8; 32],
    pub doors: Vec<DoorId>,
    pub not_after: Timestamp,
    pub issued_at: Timestamp,
}

/// What a heartbeat did (`Store::heartbeat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vouched {
    /// It named the held version: the knowledge time is now this (raised, or already later).
    Current(Option<Timestamp>),
    /// It named another version than the held one: nothing changed.
    OtherVersion { held: u64 },
    /// Its signed time lies beyond what the trusted-time mark's rule believes: nothing changed.
    TooFarAhead { limit: Timestamp },
}

/// What a delta changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaApplied {
    pub upserted: usize,
    pub revoked: usize,
    /// Revocations naming a key the set does not hold (nothing to do).
    pub unknown: usize,
}

/// A remote open-door request (the app, through the cloud), judged by the key set like a
/// credential at the door and recorded the same way.
#[derive(Clone, Debug)]
pub struct RemoteOpen {
    pub command_id: String,
    pub key_id: KeyId,
    pub door: DoorId,
    pub now: Timestamp,
    /// The system clock is NTP-synchronised now.
    pub clock_synced: bool,
}

/// How many committed records [`Health::recent`] keeps for `doorbridge events tail`.
pub const RECENT_RECORDS: usize = 1000;

/// Counters the daemon exposes in its status.
#[derive(Debug)]
pub struct Health {
    /// Set while records are held in memory because the disk refuses them.
    pub degraded: AtomicBool,
    /// Records dropped from the memory backlog during a disk outage.
    pub dropped: AtomicU64,
    /// Commits (group commits count once).
    pub commits: AtomicU64,
    /// Signalled after each commit that may have added outbox records: the uplink waits on it
    /// instead of polling the database.
    pub outbox_grew: tokio::sync::Notify,
    /// The latest committed records (seq, record), newest last, at most [`RECENT_RECORDS`]:
    /// what happened lately, whether uploaded (and deleted) or not.
    pub recent: std::sync::Mutex<std::collections::VecDeque<(i64, Record)>>,
    /// Every committed record as it is committed, for followers (`events tail --follow`).
    pub records: tokio::sync::broadcast::Sender<(i64, Record)>,
    /// What the idle integrity check found wrong with the file, once it did: the store must be
    /// closed and opened again, which moves the file aside and salvages what it can.
    pub damaged: std::sync::Mutex<Option<String>>,
    /// Signalled when `damaged` is set.
    pub damage_found: tokio::sync::Notify,
    /// How long commits took (the metrics file's histogram).
    pub commit_latency: CommitLatency,
}

/// The upper bounds (µs) of the commit-latency histogram's buckets: an fsync on an SD card
/// takes 1–20 ms, a group of decisions a little more.
pub const COMMIT_BUCKETS_US: [u64; 9] = [
    500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// A histogram of commit durations, written by the writer, read by the metrics file.
#[derive(Debug, Default)]
pub struct CommitLatency {
    /// Commits that took at most each bound of [`COMMIT_BUCKETS_US`] (not cumulative).
    buckets: [AtomicU64; COMMIT_BUCKETS_US.len()],
    slower: AtomicU64,
    sum_us: AtomicU64,
}

impl CommitLatency {
    pub(crate) fn record(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        match COMMIT_BUCKETS_US.iter().position(|&b| us <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.slower.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (as Prometheus wants them), the total, and the sum in µs.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut total = 0;
        let cumulative = COMMIT_BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        total += self.slower.load(Ordering::Relaxed);
        (cumulative, total, self.sum_us.load(Ordering::Relaxed))
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            degraded: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            outbox_grew: tokio::sync::Notify::new(),
            recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
            records: tokio::sync::broadcast::channel(256).0,
            damaged: std::sync::Mutex::new(None),
            damage_found: tokio::sync::Notify::new(),
            commit_latency: CommitLatency::default(),
        }
    }
}

impl Health {
    /// Keeps records just committed in [`Health::recent`] and hands them to followers.
    pub(crate) fn committed(&self, records: Vec<(i64, Record)>) {
        if records.is_empty() {
            return;
        }
        if let Ok(mut recent) = self.recent.lock() {
            for r in &records {
                if recent.len() == RECENT_RECORDS {
                    recent.pop_front();
                }
                recent.push_back(r.clone());
            }
        }
        for r in records {
            // No follower is the common case.
            let _ = self.records.send(r);
        }
    }
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer is asked, on its one channel, in order.
pub(crate) enum Command {
    /// Decided and written with whatever arrives with it, in one group commit.
    Batched(Batched),
    /// A transaction of its own (key sets, delegations, settings), in order with the rest.
    Step(Step),
    /// Finish what came before, then stop.
    Shutdown,
}

/// What shares the group commit.
pub(crate) enum Batched {
    Verify(Box<VerifyRequest>, Reply<Verdict>),
    Append(Vec<Record>, Reply<Vec<i64>>),
    Remote(Box<RemoteOpen>, Reply<Verdict>),
    Reconfigure(Box<DecisionContext>, Reply<()>),
    Ack(Vec<i64>, Reply<usize>),
}

/// What is a transaction of its own.
pub(crate) enum Step {
    BeginKeySet(KeySetHeader, Reply<i64>),
    StageKeys(i64, Vec<Key>, Reply<()>),
    CommitKeySet(i64, u64, Reply<()>),
    ApplyDelta(Box<DeltaChange>, Reply<DeltaApplied>),
    /// A heartbeat for a version, signed at a time.
    Heartbeat(u64, Timestamp, Reply<Vouched>),
    /// Hold a delegation; replies whether it was taken (not revoked, newer than the held one).
    PutDelegation(Box<HeldDelegation>, Reply<bool>),
    /// Revoke a delegation by id, for good.
    RevokeDelegation(String, Reply<()>),
    /// The delegations held and not revoked.
    Delegations(Reply<Vec<HeldDelegation>>),
    /// Merge settings into a door's desired settings; replies with the merged whole.
    DesireSettings(DoorId, Settings, Reply<Settings>),
    /// Record the settings a door's unit reports as applied.
    ReportSettings(DoorId, Settings, Reply<()>),
}

/// The handle to the store. Cheap to clone; the writer thread stops when the last handle is
/// dropped or [`Store::close`] is called.
#[derive(Clone, Debug)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    path: Arc<PathBuf>,
    health: Arc<Health>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    /// Stops the idle integrity check with the last handle.
    _checker: Option<Arc<check::Checker>>,
    /// Held open for the store's life: its exclusive lock keeps a second writer (another
    /// daemon, `keys import` while the service runs) away from the file.
    _lock: Arc<std::fs::File>,
}

impl Store {
    /// Opens (or creates) the database: integrity check, migrations, then the writer thread.
    pub fn open(options: StoreOptions) -> Result<Store, StoreError> {
        let lock = lock(&options.path)?;
        let label = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let found = schema::check_or_move_aside(&options.path, &label)?;
        let mut conn = schema::open_writer(&options.path)?;
        schema::migrate(&mut conn)?;
        if let schema::Health::MovedAside { to, problem } = found {
            recover(&mut conn, &to, &problem)?;
        }
        if let Some(max) = options.max_size {
            let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page.max(1);
            conn.pragma_update(None, "max_page_count", pages.max(1))?;
        }
        let health = Arc::new(Health::default());
        let (tx, rx) = mpsc::channel();
        let integrity_every = options.integrity_every;
        let writer = writer::Writer::new(conn, options, Arc::clone(&health))?;
        let path = Arc::new(writer.path().to_owned());
        let checker = integrity_every
            .map(|every| check::start(Arc::clone(&path), Arc::clone(&health), every))
            .transpose()?;
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError::Io {
                what: "starting the store writer thread",
                source: e,
            })?;
        Ok(Store {
            tx,
            path,
            _checker: checker.map(Arc::new),
            health,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            _lock: Arc::new(lock),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// A handle on the store's health that outlives this handle.
    pub fn health_handle(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// A new read-only connection.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }

    /// Runs `f` on a new read-only connection off the async workers (reads of a large key set
    /// may take a while).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || f(&Reader::open(&path)?))
            .await
            .map_err(|e| StoreError::Io {
                what: "reading the store",
                source: std::io::Error::other(e),
            })?
    }

    /// Sends a command to the writer now, not when the future is first polled, and returns
    /// the future of its answer: the writer gets to work while the caller does other things
    /// (the bus task sleeps its quiet gap before it may answer a verify, and a task awaiting
    /// the answer may not run until then).
    fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(make(reply))
            .map_err(|_| StoreError::WriterGone);
        async move {
            sent?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        }
    }

    /// Decides a request and records it durably before the future completes (see the module
    /// header). The request reaches the writer when this is called (see [`Store::call`]).
    pub fn verify(
        &self,
        request: VerifyRequest,
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send + 'static {
        self.call(|r| Command::Batched(Batched::Verify(Box::new(request), r)))
    }

    /// Appends records to the outbox; returns their sequence numbers (empty when held in
    /// memory because the disk refused them).
    pub async fn append(&self, records: Vec<Record>) -> Result<Vec<i64>, StoreError> {
        self.call(|r| Command::Batched(Batched::Append(records, r)))
            .await
    }

    /// Starts installing a key set; returns the staging generation. Decisions keep using the
    /// held set until [`Store::commit_key_set`].
    pub async fn begin_key_set(&self, header: KeySetHeader) -> Result<i64, StoreError> {
        self.call(|r| Command::Step(Step::BeginKeySet(header, r)))
            .await
    }

    /// Adds keys to a staging generation (one transaction per call).
    pub async fn stage_keys(&self, generation: i64, keys: Vec<Key>) -> Result<(), StoreError> {
        self.call(|r| Command::Step(Step::StageKeys(generation, keys, r)))
            .await
    }

    /// Makes a staged generation the live key set in one small transaction, if it holds
    /// exactly `expected_keys` keys; the old one is removed afterwards while idle.
    pub async fn commit_key_set(
        &self,
        generation: i64,
        expected_keys: u64,
    ) -> Result<(), StoreError> {
        self.call(|r| Command::Step(Step::CommitKeySet(generation, expected_keys, r)))
            .await
    }

    /// Installs a whole key set from memory, in chunks: a convenience for tests, benchmarks and
    /// small sets.
    pub async fn install_key_set(
        &self,
        header: KeySetHeader,
        keys: Vec<Key>,
    ) -> Result<(), StoreError> {
        let count = keys.len() as u64;
        let generation = self.begin_key_set(header).await?;
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            let chunk: Vec<Key> = keys.by_ref().take(writer::STAGE_CHUNK).collect();
            self.stage_keys(generation, chunk).await?;
        }
        self.commit_key_set(generation, count).await
    }

    /// Applies a delta on top of the held key set in one transaction: all of it or, on any
    /// error (wrong base version, a credential another key holds), none of it.
    pub async fn apply_delta(&self, delta: DeltaChange) -> Result<DeltaApplied, StoreError> {
        self.call(|r| Command::Step(Step::ApplyDelta(Box::new(delta), r)))
            .await
    }

    /// Holds a delegation (`docs/cloud-protocol.md` §5.3). `Ok(false)`: not taken, because it
    /// was revoked or a newer one of the same id is held.
    pub async fn put_delegation(&self, d: HeldDelegation) -> Result<bool, StoreError> {
        self.call(|r| Command::Step(Step::PutDelegation(Box::new(d), r)))
            .await
    }

    /// Revokes a delegation for good: deltas its key signs are refused from now on, and a
    /// replay of it is not taken again.
    pub async fn revoke_delegation(&self, id: String) -> Result<(), StoreError> {
        self.call(|r| Command::Step(Step::RevokeDelegation(id, r)))
            .await
    }

    /// The delegations held and not revoked (expired ones included).
    pub async fn delegations(&self) -> Result<Vec<HeldDelegation>, StoreError> {
        self.call(|r| Command::Step(Step::Delegations(r))).await
    }

    /// A heartbeat: the cloud vouches that `version` is current as of `issued_at`. When that is
    /// the held version, the knowledge time rises to `issued_at` (written without an fsync of its
    /// own: a power cut that loses it only makes the knowledge look older).
    pub async fn heartbeat(
        &self,
        version: u64,
        issued_at: Timestamp,
    ) -> Result<Vouched, StoreError> {
        self.call(|r| Command::Step(Step::Heartbeat(version, issued_at, r)))
            .await
    }

    /// Decides a remote open-door request against the held key set (validity, schedule, use
    /// limits, the door) and records it durably before returning, like [`Store::verify`].
    pub async fn remote_open(&self, request: RemoteOpen) -> Result<Verdict, StoreError> {
        self.call(|r| Command::Batched(Batched::Remote(Box::new(request), r)))
            .await
    }

    /// Merges `settings` (the fields given) into the desired settings of the unit at `door`,
    /// durably; returns the merged desired settings.
    pub async fn desire_settings(
        &self,
        door: DoorId,
        settings: Settings,
    ) -> Result<Settings, StoreError> {
        self.call(|r| Command::Step(Step::DesireSettings(door, settings, r)))
            .await
    }

    /// Records the settings the unit at `door` reports as applied.
    pub async fn report_settings(
        &self,
        door: DoorId,
        settings: Settings,
    ) -> Result<(), StoreError> {
        self.call(|r| Command::Step(Step::ReportSettings(door, settings, r)))
            .await
    }

    /// Replaces the decision rules (after a config reload).
    pub async fn reconfigure(&self, context: DecisionContext) -> Result<(), StoreError> {
        self.call(|r| Command::Batched(Batched::Reconfigure(Box::new(context), r)))
            .await
    }

    /// Deletes outbox records the cloud has acknowledged; returns how many were removed.
    pub async fn ack(&self, seqs: Vec<i64>) -> Result<usize, StoreError> {
        self.call(|r| Command::Batched(Batched::Ack(seqs, r))).await
    }

    /// Stops the writer after the commands already sent, and waits for it.
    pub fn close(self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        let _ = self.tx.send(Command::Shutdown);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
