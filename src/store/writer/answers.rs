//! Answers kept for retransmissions (`docs/door-bus.md` §13): a door unit repeats a verify
//! it heard no answer to, and the repeat must get the same answer without counting a use twice.
//! Each decision keeps its answer in its record's row (`records.answer`, a few bytes beside the
//! activity record), the writer holds each unit's last one in memory, and a start reads them
//! back from the newest rows.

use std::collections::HashMap;

use jiff::Timestamp;
use rusqlite::Connection;

use super::super::records::{Record, decode_row};
use super::super::{Retransmit, Verdict, VerifyRequest};
use super::{RETRANSMIT_WINDOW, Writer};
use crate::access::{self, Decision, KeyId};
use crate::ids::UnitId;

/// An answer as kept for retransmissions (docs/door-bus.md §13).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptAnswer {
    decision: Decision,
    key_id: Option<KeyId>,
    category: Option<crate::access::Category>,
    seq: Option<i64>,
}

/// A decision's kept answer as its record's row holds it (`records.answer`), so a
/// retransmission after a restart finds it without a table of its own to write per decision.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptRow {
    pub(super) unit: UnitId,
    request_id: u32,
    fingerprint: Vec<u8>,
    boot_id: Option<u32>,
    at_ms: i64,
    answer: KeptAnswer,
}

/// Bytes of the request's fingerprint (SHA-256) kept for a retransmission: it only tells a
/// retransmission from another request of the same unit with the same id and boot within
/// [`RETRANSMIT_WINDOW`], for which 64 bits are as sure as 256, in a shorter row.
const KEPT_FINGERPRINT: usize = 8;

/// `records.answer` as written: only what the row's body (the decision's activity record) does
/// not already say, as a CBOR array `[fingerprint's first 64 bits, boot id]`, plus `welcome,
/// floors` for a grant that has them: about 15 bytes, so that four decision rows fit a 1 KiB
/// page and a lone decision's commit is one WAL frame three times in four (P9,
/// `docs/storage.md`). Unit, request id, time, verdict, key and category come from the body.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum KeptOnDisk {
    Plain(u64, Option<u32>),
    Grant(u64, Option<u32>, Option<String>, Vec<i16>),
}

impl KeptRow {
    /// The row's `answer` blob.
    pub(super) fn to_disk(&self) -> Vec<u8> {
        let mut fp = [0u8; KEPT_FINGERPRINT];
        let n = self.fingerprint.len().min(KEPT_FINGERPRINT);
        fp[..n].copy_from_slice(&self.fingerprint[..n]);
        let fp = u64::from_be_bytes(fp);
        let disk = match &self.answer.decision {
            Decision::Grant(g) if g.welcome.is_some() || !g.floors.is_empty() => {
                KeptOnDisk::Grant(fp, self.boot_id, g.welcome.clone(), g.floors.clone())
            }
            _ => KeptOnDisk::Plain(fp, self.boot_id),
        };
        crate::cbor::encode(&disk)
    }

    /// The same answer, as the record it rides in was numbered.
    pub(super) fn at_seq(mut self, seq: i64) -> KeptRow {
        self.answer.seq = Some(seq);
        self
    }

    /// The kept answer of row `seq` from its `body` and `answer`; `None` when they do not read
    /// (that request is then judged again). Rows written before the short form hold the whole
    /// `KeptRow` as a CBOR map, and still read.
    fn from_row(seq: i64, body: &[u8], answer: &[u8]) -> Option<KeptRow> {
        let Ok(disk) = decode_row::<KeptOnDisk>(answer) else {
            let mut kept: KeptRow = decode_row(answer).ok()?;
            kept.answer.seq = Some(seq);
            return Some(kept);
        };
        let (fp, boot_id, welcome, floors) = match disk {
            KeptOnDisk::Plain(fp, boot) => (fp, boot, None, Vec::new()),
            KeptOnDisk::Grant(fp, boot, welcome, floors) => (fp, boot, welcome, floors),
        };
        let Ok(Record::Activity(a)) = Record::from_cbor(body) else {
            return None;
        };
        let decision = if a.granted {
            Decision::Grant(access::Grant {
                doors: a.released,
                welcome,
                floors,
            })
        } else {
            Decision::deny(a.reason?)
        };
        Some(KeptRow {
            unit: a.unit,
            request_id: a.request_id?,
            fingerprint: fp.to_be_bytes().to_vec(),
            boot_id,
            at_ms: a.at.as_millisecond(),
            answer: KeptAnswer {
                decision,
                key_id: a.key_id,
                category: a.category,
                seq: Some(seq),
            },
        })
    }
}

/// How far back from the newest record a start looks for kept answers: a retransmission is
/// answered from one only within [`RETRANSMIT_WINDOW`], so this covers every unit's last
/// decision unless thousands of records were written in the seconds before the stop.
const KEPT_SCAN: i64 = 4_096;

/// What to keep of a decision for its retransmissions.
#[derive(Clone, Debug)]
pub(super) struct Remember {
    unit: UnitId,
    request_id: u32,
    retransmit: Retransmit,
    at: Timestamp,
}

impl Remember {
    pub(super) fn of(req: &VerifyRequest) -> Option<Remember> {
        Some(Remember {
            unit: req.unit.clone(),
            request_id: req.request_id?,
            retransmit: req.retransmit?,
            at: req.now,
        })
    }
}

impl Writer {
    /// The answer kept for this request, when it is a retransmission (same unit, id,
    /// fingerprint and boot) within [`RETRANSMIT_WINDOW`] of the decision.
    pub(super) fn kept_answer(&self, req: &VerifyRequest) -> Option<Verdict> {
        let (Some(id), Some(rt)) = (req.request_id, req.retransmit) else {
            return None;
        };
        let kept = self.answers.get(&req.unit)?;
        let same_boot = match (kept.boot_id, rt.boot_id) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let recent = Timestamp::from_millisecond(kept.at_ms)
            .is_ok_and(|at| req.now.duration_since(at).abs() <= RETRANSMIT_WINDOW);
        // A prefix: rows written before the short form kept all 32 bytes.
        let same_request = kept.fingerprint.len() >= KEPT_FINGERPRINT
            && rt.fingerprint.starts_with(&kept.fingerprint);
        if kept.request_id != id || !same_request || !same_boot || !recent {
            return None;
        }
        let kept = &kept.answer;
        Some(Verdict {
            decision: kept.decision.clone(),
            key_id: kept.key_id.clone(),
            category: kept.category,
            seq: kept.seq,
        })
    }

    /// What a decision keeps for its retransmissions.
    pub(super) fn kept_row(remember: &Remember, verdict: &Verdict) -> KeptRow {
        KeptRow {
            unit: remember.unit.clone(),
            request_id: remember.request_id,
            fingerprint: remember.retransmit.fingerprint[..KEPT_FINGERPRINT].to_vec(),
            boot_id: remember.retransmit.boot_id,
            at_ms: remember.at.as_millisecond(),
            answer: KeptAnswer {
                decision: verdict.decision.clone(),
                key_id: verdict.key_id.clone(),
                category: verdict.category,
                seq: None,
            },
        }
    }
}

/// Each unit's last kept answer among the newest [`KEPT_SCAN`] records.
pub(super) fn load_answers(conn: &Connection) -> Result<HashMap<UnitId, KeptRow>, rusqlite::Error> {
    let mut answers = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT seq, body, answer FROM records
         WHERE seq > (SELECT coalesce(max(seq), 0) FROM records) - ?1 AND answer IS NOT NULL
         ORDER BY seq",
    )?;
    let mut rows = stmt.query([KEPT_SCAN])?;
    while let Some(row) = rows.next()? {
        let body: Vec<u8> = row.get(1)?;
        let answer: Vec<u8> = row.get(2)?;
        // An unreadable answer only means that request is judged again.
        if let Some(kept) = KeptRow::from_row(row.get(0)?, &body, &answer) {
            answers.insert(kept.unit.clone(), kept);
        }
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::super::super::records::Activity;
    use super::*;
    use crate::access::{CredentialKind, DenyReason};

    /// A decision's activity record and the kept answer the writer keeps for it.
    fn decided(decision: Decision) -> (Vec<u8>, KeptRow) {
        let at = Timestamp::from_second(1_790_000_000).unwrap();
        let activity = Activity {
            at,
            door: "main".into(),
            unit: "entrance/3".into(),
            request_id: Some(41),
            credential_kind: CredentialKind::Pin,
            key_id: Some("resident-7".into()),
            category: Some(access::Category::Renter),
            granted: decision.is_grant(),
            reason: decision.deny_reason(),
            released: match &decision {
                Decision::Grant(g) => g.doors.clone(),
                Decision::Deny { .. } => Vec::new(),
            },
            command_id: None,
            issuer: Some("root".to_owned()),
        };
        let remember = Remember {
            unit: "entrance/3".into(),
            request_id: 41,
            retransmit: Retransmit {
                fingerprint: std::array::from_fn(|i| u8::try_from(i).unwrap() * 7),
                boot_id: Some(9),
            },
            at,
        };
        let verdict = Verdict {
            decision,
            key_id: Some("resident-7".into()),
            category: Some(access::Category::Renter),
            seq: None,
        };
        (
            Record::Activity(activity).to_cbor(),
            Writer::kept_row(&remember, &verdict),
        )
    }

    #[test]
    fn a_kept_answer_reads_back_from_its_row_as_it_was_given() {
        let grant = Decision::Grant(access::Grant {
            doors: vec!["main".into(), "inner".into()],
            welcome: Some("Welcome home".to_owned()),
            floors: vec![3, 4],
        });
        let plain = Decision::Grant(access::Grant {
            doors: vec!["main".into()],
            welcome: None,
            floors: Vec::new(),
        });
        for decision in [grant, plain, Decision::deny(DenyReason::OutsideSchedule)] {
            let (body, mut kept) = decided(decision);
            let blob = kept.to_disk();
            assert!(blob.len() <= 40, "{} bytes: {blob:02x?}", blob.len());
            kept.answer.seq = Some(77);
            assert_eq!(KeptRow::from_row(77, &body, &blob), Some(kept));
        }
        // The short form needs the body: an answer on a row that is not a decision is unread.
        let (_, kept) = decided(Decision::deny(DenyReason::UnknownCredential));
        let other = Record::StorageRecovered {
            at: Timestamp::UNIX_EPOCH,
            kept_in_memory: 0,
            dropped: 0,
        };
        assert_eq!(
            KeptRow::from_row(1, &other.to_cbor(), &kept.to_disk()),
            None
        );
    }

    #[test]
    fn a_kept_answer_written_whole_by_an_earlier_version_still_reads() {
        let (body, mut kept) = decided(Decision::deny(DenyReason::UsedUp));
        kept.fingerprint = vec![5; 32];
        let mut blob = Vec::new();
        ciborium::into_writer(&kept, &mut blob).unwrap();
        kept.answer.seq = Some(3);
        assert_eq!(KeptRow::from_row(3, &body, &blob), Some(kept));
    }
}
