//! The journal: device and report records as one sled value per flush, folded
//! into their per-key trees in the background.
//!
//! Why: a report that counts used to be an insert at a random key, and a
//! million devices each report five phases per rollout. Every such insert
//! copies or reads back a whole leaf, which made sled's page cache the price
//! of speed (BENCHMARKS.md, seventh and eighth rounds). Now the hot path
//! appends the bytes of a flush's records to one value, and a fold writes only
//! the newest record per key, in key order, so each leaf is touched once per
//! fold and a small cache is enough.
//!
//! An entry is `FORMAT`, then per record: tree (1 byte), key length and value
//! length (u32 little endian), key, value. Records are whole-value sets, so
//! folding is idempotent: a fold that dies half way leaves the journal in
//! place, and the next fold writes the same newest values again. Nothing else
//! writes the folded trees while entries are pending (deleting a rollout folds
//! first), so a tree never holds a value newer than the journal's.

use super::StoreError;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Version of the entry layout.
const FORMAT: u8 = 1;
const HEADER: usize = 9;

/// The trees a journal record can land in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Target {
    Devices = 0,
    Reports = 1,
}

impl Target {
    fn from_byte(b: u8) -> Option<Target> {
        match b {
            0 => Some(Target::Devices),
            1 => Some(Target::Reports),
            _ => None,
        }
    }
}

/// Records written since the last flush, already framed.
#[derive(Debug, Default)]
pub(super) struct Pending {
    buf: Vec<u8>,
    records: u64,
}

impl Pending {
    pub(super) fn push(
        &mut self,
        target: Target,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        let too_long = || StoreError::Encode {
            what: "journal record",
            reason: "key or value over 4 GiB".into(),
        };
        let klen = u32::try_from(key.len()).map_err(|_| too_long())?;
        let vlen = u32::try_from(value.len()).map_err(|_| too_long())?;
        if self.buf.is_empty() {
            self.buf.push(FORMAT);
        }
        self.buf.push(target as u8);
        self.buf.extend_from_slice(&klen.to_le_bytes());
        self.buf.extend_from_slice(&vlen.to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(value);
        self.records += 1;
        Ok(())
    }

    /// The entry to append and how many records it holds; `None` when empty.
    pub(super) fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        if self.records == 0 {
            return None;
        }
        let records = std::mem::take(&mut self.records);
        Some((std::mem::take(&mut self.buf), records))
    }
}

/// One record of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record<'a> {
    pub target: Target,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl Record<'_> {
    /// Where it sorts in a fold: tree, then key.
    fn sort_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + self.key.len());
        k.push(self.target as u8);
        k.extend_from_slice(self.key);
        k
    }
}

/// The records of an entry, or why it is malformed (nothing of a malformed
/// entry is applied).
pub(super) fn decode(entry: &[u8]) -> Result<Vec<Record<'_>>, &'static str> {
    let Some((&format, mut rest)) = entry.split_first() else {
        return Err("empty entry");
    };
    if format != FORMAT {
        return Err("unknown entry format");
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < HEADER {
            return Err("truncated record header");
        }
        let target = Target::from_byte(rest[0]).ok_or("unknown tree")?;
        let len = |at: usize| -> usize {
            let mut b = [0u8; 4];
            b.copy_from_slice(&rest[at..at + 4]);
            u32::from_le_bytes(b) as usize
        };
        let (klen, vlen) = (len(1), len(5));
        let body = &rest[HEADER..];
        if body.len() < klen || body.len() - klen < vlen {
            return Err("record longer than its entry");
        }
        let (key, body) = body.split_at(klen);
        let (value, body) = body.split_at(vlen);
        out.push(Record { target, key, value });
        rest = body;
    }
    Ok(out)
}

/// The key of the entry with sequence number `seq`: big endian, so the tree's
/// order is the order of appends.
pub(super) fn entry_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(super) fn entry_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Limits of one fold.
#[derive(Debug, Clone, Copy)]
pub(super) struct FoldLimits {
    /// Records held in memory at once; a larger journal is folded in key
    /// ranges of about this many records, one pass over the journal each.
    pub part_records: usize,
}

/// Every `SAMPLE`th record's key is kept to cut the key space into parts.
const SAMPLE: usize = 64;

/// What a fold did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Folded {
    pub entries: u64,
    pub records: u64,
    /// Distinct keys written.
    pub written: u64,
    /// Key-range passes over the journal.
    pub parts: u64,
    /// Entries that did not decode, moved aside (`journal/{seq}`).
    pub corrupt: Vec<String>,
}

/// The trees a fold reads and writes.
pub(super) struct Trees<'a> {
    pub db: &'a sled::Db,
    pub journal: &'a sled::Tree,
    pub aside: &'a sled::Tree,
    pub devices: &'a sled::Tree,
    pub reports: &'a sled::Tree,
}

impl Trees<'_> {
    fn tree(&self, t: Target) -> &sled::Tree {
        match t {
            Target::Devices => self.devices,
            Target::Reports => self.reports,
        }
    }
}

/// Whether a record sorts within `[lo, up)` (tree byte, then key), without
/// building its sort key.
fn in_part(r: &Record<'_>, lo: Option<&[u8]>, up: Option<&[u8]>) -> bool {
    let cmp = |b: &[u8]| match b.split_first() {
        None => Ordering::Greater,
        Some((&tb, key)) => (r.target as u8).cmp(&tb).then_with(|| r.key.cmp(key)),
    };
    lo.is_none_or(|b| cmp(b) != Ordering::Less) && up.is_none_or(|b| cmp(b) == Ordering::Less)
}

/// Folds every entry present when it starts into the per-key trees, then
/// removes those entries. Callers hold the store's fold lock.
pub(super) fn fold(t: &Trees<'_>, limits: FoldLimits) -> Result<Folded, StoreError> {
    let mut done = Folded::default();
    let Some((last, _)) = t.journal.last()? else {
        return Ok(done);
    };
    let hi = last.to_vec();
    // Pass 1: set aside what does not decode, count, and sample keys.
    let mut samples: Vec<Vec<u8>> = Vec::new();
    for kv in t.journal.range(..=hi.as_slice()) {
        let (k, v) = kv?;
        match decode(&v) {
            Ok(records) => {
                for r in records {
                    if done.records % SAMPLE as u64 == 0 {
                        samples.push(r.sort_key());
                    }
                    done.records += 1;
                }
                done.entries += 1;
            }
            Err(reason) => {
                let name = format!(
                    "journal/{}",
                    entry_seq(&k).map_or_else(|| hex::encode(&k), |s| s.to_string())
                );
                tracing::warn!(entry = %name, reason, "corrupt journal entry set aside");
                t.aside.insert(&k, v)?;
                t.journal.remove(&k)?;
                done.corrupt.push(name);
            }
        }
    }
    samples.sort_unstable();
    let step = (limits.part_records / SAMPLE).max(1);
    let bounds: Vec<Vec<u8>> = samples.into_iter().skip(step).step_by(step).collect();
    // A pass per part: the newest value of each key in range, written in key
    // order, so each leaf is read and written once.
    for i in 0..=bounds.len() {
        let lo = i
            .checked_sub(1)
            .and_then(|j| bounds.get(j))
            .map(Vec::as_slice);
        let up = bounds.get(i).map(Vec::as_slice);
        let mut newest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for kv in t.journal.range(..=hi.as_slice()) {
            let (_, v) = kv?;
            for r in decode(&v).unwrap_or_default() {
                if in_part(&r, lo, up) {
                    newest.insert(r.sort_key(), r.value.to_vec());
                }
            }
        }
        for (sk, value) in newest {
            let Some((&tb, key)) = sk.split_first() else {
                continue;
            };
            let Some(target) = Target::from_byte(tb) else {
                continue;
            };
            t.tree(target).insert(key, value)?;
            done.written += 1;
        }
        done.parts += 1;
    }
    // The folded values are durable before the entries that carried them go.
    t.db.flush()?;
    for kv in t.journal.range(..=hi.as_slice()) {
        t.journal.remove(kv?.0)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_ones_are_named() {
        let mut p = Pending::default();
        assert!(p.take().is_none());
        p.push(Target::Devices, b"d1", b"one").unwrap();
        p.push(Target::Reports, b"r/d1", b"").unwrap();
        let (entry, n) = p.take().unwrap();
        assert_eq!(n, 2);
        let got = decode(&entry).unwrap();
        assert_eq!(
            got,
            vec![
                Record {
                    target: Target::Devices,
                    key: b"d1",
                    value: b"one"
                },
                Record {
                    target: Target::Reports,
                    key: b"r/d1",
                    value: b""
                },
            ]
        );
        assert!(p.take().is_none());
        assert_eq!(decode(&[]), Err("empty entry"));
        assert_eq!(decode(&[9]), Err("unknown entry format"));
        assert_eq!(decode(&entry[..5]), Err("truncated record header"));
        assert_eq!(
            decode(&entry[..entry.len() - 1]),
            Err("record longer than its entry")
        );
        let mut bad_tree = entry.clone();
        bad_tree[1] = 7;
        assert_eq!(decode(&bad_tree), Err("unknown tree"));
        // A length near u32::MAX must not overflow the bounds check.
        let mut huge = entry.clone();
        huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err("record longer than its entry"));
    }

    #[test]
    fn entry_keys_sort_as_their_sequence() {
        assert!(entry_key(255) < entry_key(256));
        assert_eq!(entry_seq(&entry_key(77)), Some(77));
        assert_eq!(entry_seq(b"short"), None);
    }
}
