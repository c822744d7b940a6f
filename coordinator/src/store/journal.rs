//! The journal: device and report records appended to a file once per flush,
//! folded in the background into a snapshot of the newest record per key.
//!
//! Why not sled: a report that counts used to be an insert at a random key
//! of a sled tree, and a million devices each report five phases per
//! rollout. Each insert copied or read back a whole leaf, and sled kept what
//! it had written resident well past its cache size (the journal as a sled
//! tree held every unfolded byte; the folded trees 115–180 MiB at a million
//! devices: BENCHMARKS.md, tenth round). The coordinator reads these records
//! only when it starts, so they need a log and a compaction, not an index:
//! the hot path appends the bytes of a flush's records to the current
//! segment file and syncs it (STATE-1: what is acknowledged is durable), and
//! a fold merges the closed segments into a new snapshot file in key order,
//! streaming, with the newest value per key. Files are read through the
//! kernel's page cache, which the coordinator's resident set does not count.
//!
//! An entry is `FORMAT`, then per record: tree (1 byte), key length and value
//! length (u32 little endian), key, value; [`super::files`] frames entries
//! with a length and a checksum. Records are whole values, so folding is
//! idempotent: a fold that dies half way leaves the segments in place, and
//! the next fold writes the same newest values again. The snapshot holds the
//! same entries, its records sorted and each key once.

use super::StoreError;
use super::files::{EntryReader, Found, SnapshotWriter, segment_path};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use swell_durable::sync_dir;

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

    pub(super) fn bytes(&self) -> usize {
        self.buf.len()
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
    fn sort_key(&self) -> Vec<u8> {
        sort_key(self.target, self.key)
    }
}

/// Where a record sorts in a fold and in the snapshot: tree, then key.
pub(super) fn sort_key(target: Target, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(target as u8);
    k.extend_from_slice(key);
    k
}

/// The tree and key of a sort key.
fn split_sort_key(sort_key: &[u8]) -> Option<(Target, &[u8])> {
    let (&tb, key) = sort_key.split_first()?;
    Some((Target::from_byte(tb)?, key))
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

/// Limits of one fold.
#[derive(Debug, Clone, Copy)]
pub(super) struct FoldLimits {
    /// Records held in memory at once; a larger journal is folded in key
    /// ranges of about this many records, one pass over the journal each.
    pub part_records: usize,
}

/// Every `SAMPLE`th record's key is kept to cut the key space into parts.
const SAMPLE: usize = 64;

/// Snapshot entries are cut at about this many bytes.
const BLOCK_BYTES: usize = 64 << 10;

/// What a fold did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Folded {
    pub entries: u64,
    pub records: u64,
    /// Distinct keys written from the journal.
    pub written: u64,
    /// Records carried over from the old snapshot.
    pub kept: u64,
    /// Key-range passes over the journal.
    pub parts: u64,
    /// Entries that were damaged, set aside under `aside/`
    /// (`journal/{segment}@{offset}`, `snapshot@{offset}`).
    pub corrupt: Vec<String>,
}

/// What a fold leaves out of the new snapshot.
#[derive(Debug, Default)]
pub(super) struct Leave {
    /// Records whose sort key (tree byte, key) starts with this: the reports
    /// of a deleted rollout.
    pub prefix: Option<Vec<u8>>,
    /// Records by sort key: ones set aside as undecodable.
    pub keys: BTreeSet<Vec<u8>>,
}

impl Leave {
    pub(super) fn is_empty(&self) -> bool {
        self.prefix.is_none() && self.keys.is_empty()
    }

    fn out(&self, sort_key: &[u8]) -> bool {
        self.prefix
            .as_ref()
            .is_some_and(|p| sort_key.starts_with(p))
            || self.keys.contains(sort_key)
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

pub(super) fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

/// Keeps damaged bytes in `aside/` under `name` and logs why.
fn set_aside(
    dir: &Path,
    name: String,
    reason: &str,
    bytes: &[u8],
    corrupt: &mut Vec<String>,
) -> Result<(), StoreError> {
    tracing::warn!(entry = %name, reason, "damaged journal entry set aside");
    let aside = dir.join("aside");
    std::fs::create_dir_all(&aside)?;
    swell_durable::write_atomic(&aside.join(name.replace('/', "-")), bytes, 0o600)?;
    corrupt.push(name);
    Ok(())
}

/// A record read back: its sort key and value.
type Owned = (Vec<u8>, Vec<u8>);

/// The snapshot's records in key order, read a block at a time.
struct Cursor<'a> {
    dir: &'a Path,
    reader: Option<EntryReader>,
    queue: VecDeque<Owned>,
}

impl<'a> Cursor<'a> {
    fn open(dir: &'a Path) -> Result<Cursor<'a>, StoreError> {
        Ok(Cursor {
            dir,
            reader: EntryReader::open(&snapshot_path(dir))?,
            queue: VecDeque::new(),
        })
    }

    /// The next record's sort key, reading the next block when needed.
    fn front(&mut self, corrupt: &mut Vec<String>) -> Result<Option<&[u8]>, StoreError> {
        while self.queue.is_empty() {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            let (offset, reason, bytes) = match reader.next_entry()? {
                None => {
                    self.reader = None;
                    continue;
                }
                Some(Found::Entry { offset, body }) => match decode(&body) {
                    Ok(records) => {
                        self.queue.extend(
                            records
                                .into_iter()
                                .map(|r| (r.sort_key(), r.value.to_vec())),
                        );
                        continue;
                    }
                    Err(reason) => (offset, reason, body),
                },
                Some(Found::Bad {
                    offset,
                    reason,
                    bytes,
                }) => (offset, reason, bytes),
                Some(Found::Torn { offset }) => (offset, "snapshot cut short", Vec::new()),
            };
            set_aside(
                self.dir,
                format!("snapshot@{offset}"),
                reason,
                &bytes,
                corrupt,
            )?;
        }
        Ok(self.queue.front().map(|(k, _)| k.as_slice()))
    }

    /// Drops the next record if its sort key is `key`.
    fn skip(&mut self, key: &[u8], corrupt: &mut Vec<String>) -> Result<(), StoreError> {
        if self.front(corrupt)? == Some(key) {
            self.queue.pop_front();
        }
        Ok(())
    }

    /// The next record if it sorts below `bound` (any record for `None`).
    fn next_below(
        &mut self,
        bound: Option<&[u8]>,
        corrupt: &mut Vec<String>,
    ) -> Result<Option<Owned>, StoreError> {
        let below = match self.front(corrupt)? {
            Some(k) => bound.is_none_or(|b| k < b),
            None => false,
        };
        Ok(if below { self.queue.pop_front() } else { None })
    }
}

/// Records in key order, cut into snapshot entries.
struct Blocks {
    out: SnapshotWriter,
    block: Pending,
    leave: Leave,
}

impl Blocks {
    /// Writes one record unless it is left out; false if it was.
    fn put(&mut self, sort_key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let Some((target, key)) = split_sort_key(sort_key) else {
            return Ok(false);
        };
        if self.leave.out(sort_key) {
            return Ok(false);
        }
        // A device's tombstone (an empty value) removes its key.
        if target == Target::Devices && value.is_empty() {
            return Ok(false);
        }
        self.block.push(target, key, value)?;
        if self.block.bytes() >= BLOCK_BYTES {
            self.cut()?;
        }
        Ok(true)
    }

    fn cut(&mut self) -> Result<(), StoreError> {
        if let Some((body, _)) = self.block.take() {
            self.out.entry(&body)?;
        }
        Ok(())
    }
}

/// Calls `each` with every entry of the segments, oldest first.
fn each_entry(
    dir: &Path,
    segments: &[u64],
    mut each: impl FnMut(u64, Found) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for &seq in segments {
        let Some(mut r) = EntryReader::open(&segment_path(dir, seq))? else {
            continue;
        };
        while let Some(found) = r.next_entry()? {
            each(seq, found)?;
        }
    }
    Ok(())
}

/// Merges the journal segments `segments` into the snapshot in `dir`: the
/// newest value of each key, in key order, minus what `leave` names. The new
/// snapshot is in place (synced, renamed) before the segments are removed,
/// so a fold cut short anywhere is simply done again. Callers hold the
/// store's fold lock.
pub(super) fn fold(
    dir: &Path,
    segments: &[u64],
    leave: Leave,
    limits: FoldLimits,
) -> Result<Folded, StoreError> {
    let mut done = Folded::default();
    // Pass 1: set aside what is damaged, count, and sample keys.
    let mut samples: Vec<Vec<u8>> = Vec::new();
    each_entry(dir, segments, |seq, found| {
        let (offset, reason, bytes) = match found {
            Found::Entry { offset, body } => match decode(&body) {
                Ok(records) => {
                    for r in records {
                        if done.records % SAMPLE as u64 == 0 {
                            samples.push(r.sort_key());
                        }
                        done.records += 1;
                    }
                    done.entries += 1;
                    return Ok(());
                }
                Err(reason) => (offset, reason, body),
            },
            Found::Bad {
                offset,
                reason,
                bytes,
            } => (offset, reason, bytes),
            // Torn tails are cut when the store opens; one here is damage.
            Found::Torn { offset } => (offset, "segment cut short", Vec::new()),
        };
        let name = format!("journal/{seq}@{offset}");
        set_aside(dir, name, reason, &bytes, &mut done.corrupt)
    })?;
    samples.sort_unstable();
    let step = (limits.part_records / SAMPLE).max(1);
    let bounds: Vec<Vec<u8>> = samples.into_iter().skip(step).step_by(step).collect();
    let mut old = Cursor::open(dir)?;
    let mut new = Blocks {
        out: SnapshotWriter::create(&snapshot_path(dir))?,
        block: Pending::default(),
        leave,
    };
    // A pass per part: the newest value of each key in range, merged in key
    // order with the old snapshot's records of the range.
    for i in 0..=bounds.len() {
        let lo = i
            .checked_sub(1)
            .and_then(|j| bounds.get(j))
            .map(Vec::as_slice);
        let up = bounds.get(i).map(Vec::as_slice);
        let mut newest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        each_entry(dir, segments, |_, found| {
            if let Found::Entry { body, .. } = found {
                for r in decode(&body).unwrap_or_default() {
                    if in_part(&r, lo, up) {
                        newest.insert(r.sort_key(), r.value.to_vec());
                    }
                }
            }
            Ok(())
        })?;
        for (sk, value) in newest {
            while let Some((k, v)) = old.next_below(Some(&sk), &mut done.corrupt)? {
                done.kept += u64::from(new.put(&k, &v)?);
            }
            // The journal's value is newer than the snapshot's.
            old.skip(&sk, &mut done.corrupt)?;
            done.written += u64::from(new.put(&sk, &value)?);
        }
        // The rest of the old snapshot's records in this range.
        while let Some((k, v)) = old.next_below(up, &mut done.corrupt)? {
            done.kept += u64::from(new.put(&k, &v)?);
        }
        done.parts += 1;
    }
    new.cut()?;
    new.out.install()?;
    for &seq in segments {
        match std::fs::remove_file(segment_path(dir, seq)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    sync_dir(dir)?;
    Ok(done)
}

/// Calls `each` with every record of the snapshot, in key order. Damaged
/// entries are set aside and named in the result.
pub(super) fn read_snapshot(
    dir: &Path,
    mut each: impl FnMut(Target, &[u8], &[u8]),
) -> Result<Vec<String>, StoreError> {
    let mut corrupt = Vec::new();
    let mut cursor = Cursor::open(dir)?;
    while let Some((sk, value)) = cursor.next_below(None, &mut corrupt)? {
        if let Some((target, key)) = split_sort_key(&sk) {
            each(target, key, &value);
        }
    }
    Ok(corrupt)
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
}
