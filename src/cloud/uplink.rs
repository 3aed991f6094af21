//! The uplink: drains the store's outbox to the cloud, losing nothing.
//!
//! Records (decisions, door events, battery readings, alarms) are appended to the outbox in
//! the same commit as what they describe, each with a never-reused `seq`. This module sends
//! them in batches on the `records` topic at `QoS` 1 and deletes rows only once the broker has
//! acknowledged the message that carried them ([`super::acks`] finds which ack is whose).
//!
//! - [`Batch`] is the wire format: one CBOR map per message, under `cloud.max_payload`, the
//!   stored record bodies spliced in without decoding them.
//! - [`Planner`] is the pure core: per-class cursors, the batches in flight, what an ack
//!   frees and what a lost connection sends again. Alarms (call button, forced door, tamper,
//!   low battery, lockout, refused cloud messages) go before activity, activity before
//!   telemetry; within a class, in `seq` order.
//! - [`run_uplink`] is the shell: it reads rows on a read-only connection of its own, waits
//!   for the store's "outbox grew" signal instead of polling, keeps at most [`WINDOW`] batches
//!   in flight and deletes acknowledged rows in one store command per wake-up.
//!
//! Whatever was not acknowledged is sent again (after a reconnect, or after a restart: the
//! rows are still there) with the same ids, so the cloud sees each record at least once and
//! deduplicates by `(gateway, seq)`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::acks::{Ack, BatchId, Publisher};
use super::payload::{PayloadError, Sha256Digest, from_cbor};
use crate::store::chain::{Identity, SignedHead};
use crate::store::{Reader, Record, RecordClass, Store, StoreError};
use crate::task::stopped;

/// Batches in flight (sent, not yet acknowledged) at most.
pub const WINDOW: usize = 8;
/// A batch not acknowledged this long after it was queued is sent again (a safety net: a lost
/// connection already reports its batches lost at once).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest batch the cloud side decodes.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// Bytes a batch spends besides the record bodies: the map with gateway and site ids (at most
/// 64 bytes each), the epoch and the array head.
const BATCH_OVERHEAD: usize = 4 * 16 + 2 * 64 + 16 + HEAD_BYTES;
/// The signed chain head: its key, its map, seq, 32-byte chain and 64-byte signature (each
/// with its key and CBOR head).
const HEAD_BYTES: usize = 5 + 1 + (4 + 9) + (6 + 2 + 32) + (10 + 2 + 64);

// ----- the wire format -----

/// One uploaded record as the cloud decodes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uploaded {
    /// With the gateway id, the record's stable unique id.
    pub seq: u64,
    pub class: RecordClass,
    pub record: Record,
    /// Its link in the record chain (docs/cloud-protocol.md §12.6); absent for a record
    /// stored before the chain existed.
    #[serde(default)]
    pub chain: Option<Sha256Digest>,
}

/// A batch's signed chain head (docs/cloud-protocol.md §12.6).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadedHead {
    pub seq: u64,
    pub chain: Sha256Digest,
    #[serde(with = "serde_bytes_64")]
    pub signature: [u8; 64],
}

mod serde_bytes_64 {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes = crate::cloud::payload::bytes::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a signature is 64 bytes"))
    }
}

/// An upload message:
/// `{"gateway": id, "site": id, "epoch": uint, "records": [{"seq", "class", "record"}…]}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub gateway: String,
    pub site: String,
    /// When the gateway's database began numbering (µs since 1970): `(gateway, epoch, seq)`
    /// is a record's unique id, also across a replaced database.
    pub epoch: u64,
    pub records: Vec<Uploaded>,
    /// The gateway's signed chain head when the batch was built; absent when the gateway
    /// has no identity.
    #[serde(default)]
    pub head: Option<UploadedHead>,
}

impl Batch {
    /// Decodes a batch (the cloud's side), bounded like every decoder that faces the network.
    pub fn decode(bytes: &[u8]) -> Result<Batch, PayloadError> {
        from_cbor(bytes, MAX_BATCH_BYTES)
    }
}

/// CBOR head of `major` type with argument `n`, shortest form.
fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | u8::try_from(n).unwrap_or(0)),
        24..=0xff => out.extend([m | 0x18, u8::try_from(n).unwrap_or(0)]),
        0x100..=0xffff => {
            out.push(m | 0x19);
            out.extend(u16::try_from(n).unwrap_or(0).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 0x1a);
            out.extend(u32::try_from(n).unwrap_or(0).to_be_bytes());
        }
        _ => {
            out.push(m | 0x1b);
            out.extend(n.to_be_bytes());
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Builds one batch from stored record bodies, up to a size limit.
#[derive(Debug)]
pub struct BatchWriter {
    entries: Vec<u8>,
    count: u64,
    limit: usize,
}

/// A batch buffer's first capacity; it doubles as records are added.
const BATCH_START_CAPACITY: usize = 4096;

impl BatchWriter {
    /// A batch whose encoding stays within `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        BatchWriter {
            // Grown as records come: most batches hold a record or a few, and a buffer of
            // `max_payload` (128 KiB) would be a mapping of its own each time (the daemon's
            // allocator maps blocks of 128 KiB and more: `store::hold_little`).
            entries: Vec::with_capacity(max_payload.min(BATCH_START_CAPACITY)),
            count: 0,
            limit: max_payload.saturating_sub(BATCH_OVERHEAD),
        }
    }

    /// Adds a record unless the batch would grow past its limit; the first record always goes
    /// in (a record larger than a whole batch is the caller's to refuse).
    pub fn push(&mut self, seq: i64, class: RecordClass, body: &[u8]) -> bool {
        self.push_chained(seq, class, body, None)
    }

    /// [`BatchWriter::push`] with the record's chain link.
    pub fn push_chained(
        &mut self,
        seq: i64,
        class: RecordClass,
        body: &[u8],
        chain: Option<&[u8; 32]>,
    ) -> bool {
        let mut entry = Vec::with_capacity(body.len() + 80);
        head(&mut entry, 5, if chain.is_some() { 4 } else { 3 });
        text(&mut entry, "seq");
        head(&mut entry, 0, u64::try_from(seq).unwrap_or(0));
        text(&mut entry, "class");
        text(&mut entry, class.as_str());
        if let Some(chain) = chain {
            text(&mut entry, "chain");
            head(&mut entry, 2, 32);
            entry.extend_from_slice(chain);
        }
        text(&mut entry, "record");
        if self.count > 0 && self.entries.len() + entry.len() + body.len() > self.limit {
            return false;
        }
        self.entries.extend_from_slice(&entry);
        self.entries.extend_from_slice(body);
        self.count += 1;
        true
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the records so far, framing included.
    pub fn bytes(&self) -> usize {
        self.entries.len()
    }

    /// The message: the stored bodies are CBOR already, so they are spliced in as they are.
    pub fn finish(self, gateway: &str, site: &str, epoch: u64) -> Vec<u8> {
        self.finish_signed(gateway, site, epoch, None)
    }

    /// [`BatchWriter::finish`] with the gateway's signed chain head.
    pub fn finish_signed(
        self,
        gateway: &str,
        site: &str,
        epoch: u64,
        signed: Option<&SignedHead>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() + BATCH_OVERHEAD);
        head(&mut out, 5, if signed.is_some() { 5 } else { 4 });
        text(&mut out, "gateway");
        text(&mut out, gateway);
        text(&mut out, "site");
        text(&mut out, site);
        text(&mut out, "epoch");
        head(&mut out, 0, epoch);
        text(&mut out, "records");
        head(&mut out, 4, self.count);
        out.extend_from_slice(&self.entries);
        if let Some(h) = signed {
            text(&mut out, "head");
            head(&mut out, 5, 3);
            text(&mut out, "seq");
            head(&mut out, 0, u64::try_from(h.seq).unwrap_or(0));
            text(&mut out, "chain");
            head(&mut out, 2, 32);
            out.extend_from_slice(&h.chain);
            text(&mut out, "signature");
            head(&mut out, 2, 64);
            out.extend_from_slice(&h.signature);
        }
        out
    }
}

// ----- the pure core -----

/// An outbox row as the planner takes it: seq, stored body, and chain link if known.
pub trait OutboxRow {
    fn seq(&self) -> i64;
    fn body(&self) -> &[u8];
    fn chain(&self) -> Option<&[u8; 32]>;
}

impl OutboxRow for (i64, Vec<u8>) {
    fn seq(&self) -> i64 {
        self.0
    }
    fn body(&self) -> &[u8] {
        &self.1
    }
    fn chain(&self) -> Option<&[u8; 32]> {
        None
    }
}

impl OutboxRow for (i64, Vec<u8>, Option<[u8; 32]>) {
    fn seq(&self) -> i64 {
        self.0
    }
    fn body(&self) -> &[u8] {
        &self.1
    }
    fn chain(&self) -> Option<&[u8; 32]> {
        self.2.as_ref()
    }
}

/// A batch sent and not yet acknowledged.
#[derive(Clone, Debug)]
struct InFlight {
    class: RecordClass,
    seqs: Vec<i64>,
    queued: Instant,
}

/// A batch ready to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub id: BatchId,
    pub payload: Vec<u8>,
    pub records: usize,
    /// Records too large for any batch, dropped from the outbox (logged by the caller).
    pub oversized: Vec<i64>,
}

/// What to send next and what an ack frees; no I/O, the time is an argument.
#[derive(Debug)]
pub struct Planner {
    gateway: String,
    site: String,
    epoch: u64,
    max_payload: usize,
    window: usize,
    /// Per class (indexed by its code), the last `seq` sent or queued.
    cursor: [i64; 3],
    inflight: BTreeMap<BatchId, InFlight>,
    next_id: BatchId,
    /// Bytes a record took in the last batch (its body and its framing), for
    /// [`Planner::rows_per_read`].
    row_bytes: usize,
    /// The signed chain head the next batch carries.
    signed: Option<SignedHead>,
}

impl Planner {
    pub fn new(gateway: &str, site: &str, max_payload: usize, window: usize) -> Self {
        Planner {
            gateway: gateway.to_owned(),
            site: site.to_owned(),
            epoch: 0,
            max_payload,
            window: window.max(1),
            cursor: [0; 3],
            inflight: BTreeMap::new(),
            next_id: 1,
            row_bytes: 96,
            signed: None,
        }
    }

    /// Sets the store's outbox epoch (see [`Batch::epoch`]).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Whether another batch may go out now.
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.window
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Where reading `class` continues.
    pub fn cursor(&self, class: RecordClass) -> i64 {
        self.cursor[index(class)]
    }

    /// How many rows to read per query: what fits in one batch at the size records had in the
    /// last batch, and a tenth more (records vary; a short read only makes a smaller batch).
    pub fn rows_per_read(&self) -> u32 {
        let rows = self.max_payload / self.row_bytes.max(16) * 11 / 10 + 1;
        u32::try_from(rows.clamp(16, 4096)).unwrap_or(4096)
    }

    /// The store's outbox epoch, as set.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sets the signed chain head the next batches carry.
    pub fn set_head(&mut self, signed: Option<SignedHead>) {
        self.signed = signed;
    }

    /// Builds the next batch of `class` from rows read after its cursor (oldest first) and
    /// counts it in flight; `None` when `rows` is empty.
    pub fn plan<R: OutboxRow>(
        &mut self,
        class: RecordClass,
        rows: &[R],
        now: Instant,
    ) -> Option<Planned> {
        let mut writer = BatchWriter::new(self.max_payload);
        let mut seqs = Vec::new();
        let mut oversized = Vec::new();
        for row in rows {
            let (seq, body) = (row.seq(), row.body());
            if body.len() + BATCH_OVERHEAD > self.max_payload {
                oversized.push(seq);
                continue;
            }
            if !writer.push_chained(seq, class, body, row.chain()) {
                break;
            }
            seqs.push(seq);
        }
        let last = seqs.last().copied().max(oversized.last().copied())?;
        self.cursor[index(class)] = last;
        let id = self.next_id;
        self.next_id += 1;
        let records = seqs.len();
        if let Some(per_record) = writer.bytes().checked_div(records) {
            self.row_bytes = per_record;
        }
        if !seqs.is_empty() {
            self.inflight.insert(
                id,
                InFlight {
                    class,
                    seqs,
                    queued: now,
                },
            );
        }
        Some(Planned {
            id,
            payload: if writer.is_empty() {
                Vec::new()
            } else {
                writer.finish_signed(&self.gateway, &self.site, self.epoch, self.signed.as_ref())
            },
            records,
            oversized,
        })
    }

    /// The broker acknowledged `id`: its rows may go.
    pub fn acked(&mut self, id: BatchId) -> Option<Vec<i64>> {
        self.inflight.remove(&id).map(|b| b.seqs)
    }

    /// These batches will not be acknowledged: read their records again.
    pub fn lost(&mut self, ids: &[BatchId]) {
        for id in ids {
            if let Some(b) = self.inflight.remove(id) {
                let first = b.seqs.first().copied().unwrap_or(i64::MAX);
                let c = &mut self.cursor[index(b.class)];
                *c = (*c).min(first - 1);
            }
        }
    }

    /// Batches queued more than `timeout` ago; the caller declares them [`Planner::lost`].
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Vec<BatchId> {
        self.inflight
            .iter()
            .filter(|(_, b)| now.duration_since(b.queued) >= timeout)
            .map(|(id, _)| *id)
            .collect()
    }
}

fn index(class: RecordClass) -> usize {
    usize::try_from(class.code()).unwrap_or(0)
}

// ----- the async shell -----

/// What the uplink runs with.
#[derive(Debug)]
pub struct Uplink {
    pub publisher: Publisher,
    pub topic: String,
    pub planner: Planner,
    pub store: Store,
    /// True while the broker connection is up.
    pub connected: watch::Receiver<bool>,
    /// Acks and losses, from the poller.
    pub acks: mpsc::UnboundedReceiver<Ack>,
    /// Marks of acknowledged rows under way: the drain does not wait for them (their rows
    /// are behind the cursors already), and the store's writer folds those that queue up
    /// into one commit.
    pub deletes: JoinSet<()>,
    /// Acknowledged rows not yet handed to the store, and since when.
    pub marks: PendingMarks,
    /// Signs the record chain's head for each batch (docs/cloud-protocol.md §12.6); None when
    /// the gateway has no identity.
    pub identity: Option<Identity>,
}

/// How long acknowledged rows wait before they are marked sent in the store: every batch
/// acknowledged meanwhile shares that one commit, instead of a commit (a WAL frame written
/// to the SD card) per batch. A restart within it uploads those rows again, with the same ids
/// (the cloud drops the duplicates).
pub const MARK_DELAY: Duration = Duration::from_secs(1);
/// Marks handed to the store at once at most (a long drain does not wait [`MARK_DELAY`]).
const MARK_BATCH: usize = 8_192;
/// With nothing left in flight, this many marks or more go to the store at once: the end of a
/// drain is not held back (the outbox shows empty when it is), while the lone decision's record
/// waits to share its mark with the next ones.
const MARK_NOW: usize = 256;

/// Acknowledged seqs waiting for their mark.
#[derive(Debug, Default)]
pub struct PendingMarks {
    seqs: Vec<i64>,
    since: Option<tokio::time::Instant>,
}

/// Drains the outbox until `shutdown` turns true. Rows not acknowledged by then stay in the
/// outbox and go out after the next start.
pub async fn run_uplink(mut up: Uplink, mut shutdown: watch::Receiver<bool>) {
    let mut reader = match up
        .store
        .reader()
        .and_then(|r| r.outbox_epoch().map(|e| (r, e)))
    {
        Ok((r, epoch)) => {
            up.planner.set_epoch(epoch);
            Some(r)
        }
        Err(e) => {
            tracing::error!(error = %e, "uplink not started: the outbox cannot be read");
            return;
        }
    };
    let mut check = tokio::time::interval(Duration::from_secs(5));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_total: u64 = 0;
    loop {
        if *up.connected.borrow() {
            match send_round(&mut up, &mut reader).await {
                Ok((n, _)) => sent_total += n,
                Err(e) => {
                    tracing::error!(error = %e, "the outbox cannot be read; uploads wait");
                    if e.is_retryable() {
                        reader = up.store.reader().ok();
                    }
                }
            }
        }
        if reader.is_none() {
            reader = up.store.reader().ok();
        }
        tokio::select! {
            // An ack (mark its rows, soon) or a lost connection (send its batches again).
            Some(ack) = up.acks.recv() => handle_acks(&mut up, ack),
            // Acknowledged rows waited MARK_DELAY: mark them sent.
            () = tokio::time::sleep_until(up.marks.since.map_or_else(
                tokio::time::Instant::now, |s| s + MARK_DELAY)), if up.marks.since.is_some() => {
                mark(&mut up);
            }
            // A mark finished.
            Some(_) = up.deletes.join_next(), if !up.deletes.is_empty() => {}
            // New records were committed.
            () = up.store.health().outbox_grew.notified() => {}
            // Connected or disconnected.
            changed = up.connected.changed() => if changed.is_err() { break },
            // The safety net for acks that never come.
            _ = check.tick() => {
                let overdue = up.planner.overdue(Instant::now(), ACK_TIMEOUT);
                if !overdue.is_empty() {
                    tracing::warn!(batches = overdue.len(), "upload batches unacknowledged for too long; sending them again");
                    up.planner.lost(&overdue);
                }
            }
            // The daemon is stopping.
            () = stopped(&mut shutdown) => break,
        }
    }
    // Batches in flight get a moment for their acks, so their rows are not sent twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while up.planner.in_flight() > 0 && *up.connected.borrow() {
        match tokio::time::timeout_at(deadline, up.acks.recv()).await {
            Ok(Some(ack)) => handle_acks(&mut up, ack),
            Ok(None) | Err(_) => break,
        }
    }
    // And the marks their rows, so they do not go out again after a restart.
    mark(&mut up);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, up.deletes.join_next()).await {}
    tracing::debug!(
        sent_total,
        in_flight = up.planner.in_flight(),
        "uplink stopped"
    );
}

/// Takes the acks that arrived: the rows of acknowledged batches wait for their mark
/// ([`MARK_DELAY`]), lost batches are read again.
fn handle_acks(up: &mut Uplink, first: Ack) {
    let mut seqs = Vec::new();
    let mut next = Some(first);
    while let Some(ack) = next {
        match ack {
            Ack::Acked(id) => seqs.extend(up.planner.acked(id).unwrap_or_default()),
            Ack::Lost(ids) => {
                if !ids.is_empty() {
                    tracing::debug!(
                        batches = ids.len(),
                        "upload batches lost with the connection; sending them again"
                    );
                }
                up.planner.lost(&ids);
            }
        }
        next = up.acks.try_recv().ok();
    }
    if seqs.is_empty() {
        return;
    }
    up.marks.since.get_or_insert_with(tokio::time::Instant::now);
    up.marks.seqs.extend(seqs);
    let waiting = up.marks.seqs.len();
    if waiting >= MARK_BATCH || (waiting >= MARK_NOW && up.planner.in_flight() == 0) {
        mark(up);
    }
}

/// Hands the acknowledged rows waiting to the store (one command for all of them), without
/// waiting for the mark.
fn mark(up: &mut Uplink) {
    up.marks.since = None;
    let seqs = std::mem::take(&mut up.marks.seqs);
    if seqs.is_empty() {
        return;
    }
    let store = up.store.clone();
    up.deletes.spawn(async move {
        if let Err(e) = store.ack(seqs).await {
            // The rows stay and go out again: duplicates with the same ids, never a loss.
            tracing::warn!(error = %e, "acknowledged records could not be marked sent");
        }
    });
}

/// Sends batches while the window has room and the outbox has records, alarms first.
/// Returns how many records went out, and false when rumqttc's request queue was full.
async fn send_round(
    up: &mut Uplink,
    reader: &mut Option<Reader>,
) -> Result<(u64, bool), StoreError> {
    let mut sent = 0;
    'window: while up.planner.has_room() {
        for class in RecordClass::ALL {
            let (rows, chain_head) = read_rows(
                reader,
                class,
                up.planner.cursor(class),
                up.planner.rows_per_read(),
            )
            .await?;
            // Each batch carries the chain head as it stood when its rows were read, signed.
            let epoch = i64::try_from(up.planner.epoch()).unwrap_or(i64::MAX);
            up.planner.set_head(
                up.identity
                    .as_ref()
                    .zip(chain_head)
                    .map(|(id, (seq, chain))| id.sign_head(epoch, seq, &chain)),
            );
            let Some(planned) = up.planner.plan(class, &rows, Instant::now()) else {
                continue;
            };
            if !planned.oversized.is_empty() {
                tracing::error!(seqs = ?planned.oversized, "outbox records larger than cloud.max_payload cannot be sent; deleted");
                let _ = up.store.ack(planned.oversized.clone()).await;
            }
            if planned.records == 0 {
                continue 'window;
            }
            match up.publisher.try_publish(
                up.topic.clone(),
                false,
                planned.payload,
                Some(planned.id),
            ) {
                Ok(()) => sent += planned.records as u64,
                Err(e) => {
                    tracing::debug!(error = %e, "upload batch not queued; trying again after the next ack");
                    up.planner.lost(&[planned.id]);
                    return Ok((sent, false));
                }
            }
            continue 'window;
        }
        break;
    }
    Ok((sent, true))
}

/// Reads rows, with their chain links, and the chain head off the async workers on the
/// uplink's own read-only connection.
#[allow(clippy::type_complexity)]
async fn read_rows(
    reader: &mut Option<Reader>,
    class: RecordClass,
    after: i64,
    limit: u32,
) -> Result<
    (
        Vec<(i64, Vec<u8>, Option<[u8; 32]>)>,
        Option<(i64, [u8; 32])>,
    ),
    StoreError,
> {
    let r = reader.take().ok_or(StoreError::WriterGone)?;
    let (r, rows) = tokio::task::spawn_blocking(move || {
        let rows = r
            .outbox_chained(class, after, limit)
            .and_then(|rows| Ok((rows, r.chain_head()?)));
        (r, rows)
    })
    .await
    .map_err(|e| StoreError::Io {
        what: "reading the outbox",
        source: std::io::Error::other(e),
    })?;
    *reader = Some(r);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Record;

    fn body(n: u64) -> Vec<u8> {
        Record::StorageRecovered {
            at: jiff::Timestamp::UNIX_EPOCH,
            kept_in_memory: n,
            dropped: 0,
        }
        .to_cbor()
    }

    #[test]
    fn a_batch_decodes_to_the_records_it_was_built_from() {
        let mut w = BatchWriter::new(128 * 1024);
        for seq in [1, 300, 70_000, 5_000_000_000] {
            assert!(w.push(seq, RecordClass::Alarm, &body(seq.unsigned_abs())));
        }
        let batch = Batch::decode(&w.finish("gw-1", "site-1", 1_700_000_000_000_000)).unwrap();
        assert_eq!(batch.gateway, "gw-1");
        assert_eq!(batch.epoch, 1_700_000_000_000_000);
        assert_eq!(batch.site, "site-1");
        let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 300, 70_000, 5_000_000_000]);
        assert_eq!(
            batch.records[2].record,
            Record::from_cbor(&body(70_000)).unwrap()
        );
        assert_eq!(batch.records[0].class, RecordClass::Alarm);
    }

    #[test]
    fn batches_stay_under_the_payload_limit() {
        let max = 16 * 1024;
        let mut p = Planner::new("gw-with-a-long-name-0123456789", "site", max, 4);
        // With every chain member and a signed head, the largest a batch gets.
        let id = crate::store::chain::Identity::from_secret(&[1; 32]);
        p.set_head(Some(id.sign_head(1, i64::MAX, &[9; 32])));
        let rows: Vec<(i64, Vec<u8>, Option<[u8; 32]>)> = (1..=2000)
            .map(|s: i64| (s, body(7), Some([s.to_be_bytes()[7]; 32])))
            .collect();
        let now = Instant::now();
        let mut covered = 0;
        while let Some(plan) = p.plan(RecordClass::Activity, &rows[covered..], now) {
            assert!(plan.payload.len() <= max, "{} > {max}", plan.payload.len());
            let batch = Batch::decode(&plan.payload).unwrap();
            assert_eq!(batch.records.len(), plan.records);
            assert_eq!(batch.records[0].seq, rows[covered].0.cast_unsigned());
            assert_eq!(batch.records[0].chain.map(|c| c.0), rows[covered].2);
            assert_eq!(batch.head.as_ref().map(|h| h.seq), Some(u64::MAX >> 1));
            covered += plan.records;
            p.acked(plan.id).unwrap();
        }
        assert_eq!(covered, rows.len());
    }

    #[test]
    fn acks_free_rows_and_lost_batches_are_read_again() {
        let mut p = Planner::new("gw", "site", 1024, 2);
        let now = Instant::now();
        let rows: Vec<(i64, Vec<u8>)> = (10..20).map(|s| (s, body(1))).collect();
        let a = p.plan(RecordClass::Activity, &rows, now).unwrap();
        let a_last = 9 + i64::try_from(a.records).unwrap();
        assert_eq!(p.cursor(RecordClass::Activity), a_last);
        let rest: Vec<_> = rows.iter().filter(|r| r.0 > a_last).cloned().collect();
        let b = p.plan(RecordClass::Activity, &rest, now).unwrap();
        assert!(!p.has_room());
        // Alarms keep their own cursor.
        assert_eq!(p.cursor(RecordClass::Alarm), 0);
        let freed = p.acked(b.id).unwrap();
        assert_eq!(freed.first(), Some(&(a_last + 1)));
        assert_eq!(p.acked(b.id), None, "an ack counts once");
        p.lost(&[a.id]);
        assert_eq!(
            p.cursor(RecordClass::Activity),
            9,
            "read again from the lost batch"
        );
        assert!(p.has_room());
    }

    #[test]
    fn overdue_batches_are_found_by_the_time_given() {
        let mut p = Planner::new("gw", "site", 4096, 8);
        let t0 = Instant::now();
        let plan = p.plan(RecordClass::Alarm, &[(5, body(1))], t0).unwrap();
        assert!(
            p.overdue(t0 + Duration::from_secs(59), ACK_TIMEOUT)
                .is_empty()
        );
        assert_eq!(p.overdue(t0 + ACK_TIMEOUT, ACK_TIMEOUT), [plan.id]);
    }

    #[test]
    fn a_record_larger_than_any_batch_is_set_aside_not_sent() {
        let mut p = Planner::new("gw", "site", 1024, 8);
        let big = vec![0x40; 2000];
        let plan = p
            .plan(
                RecordClass::Alarm,
                &[(1, big), (2, body(1))],
                Instant::now(),
            )
            .unwrap();
        assert_eq!(plan.oversized, [1]);
        assert_eq!(plan.records, 1);
        assert_eq!(p.cursor(RecordClass::Alarm), 2);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(Batch::decode(&[0xa1, 0x61]).is_err());
        let mut w = BatchWriter::new(4096);
        w.push(1, RecordClass::Alarm, &body(1));
        let mut bytes = w.finish("gw", "s", 1);
        bytes.push(0);
        assert!(matches!(
            Batch::decode(&bytes),
            Err(PayloadError::TrailingBytes(1))
        ));
    }
}
