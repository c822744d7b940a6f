//! Durable state, in sled, behind the [`Store`] trait.
//!
//! - tree `rollouts`: `r/{rollout}` → JSON [`RolloutRecord`]; `d/{rollout}/{n:016x}`
//!   → JSON [`DecisionEntry`]. A transition and its decisions are written in one
//!   atomic batch and flushed before anything is published (STATE-1), so the audit
//!   log never misses or repeats a transition.
//! - tree `devices`: `{device}` → postcard [`DeviceRecord`].
//! - tree `reports`: `{rollout}/{device}` → postcard latest report (release,
//!   phase, envelope `seq`), from which the trackers are rebuilt on start.
//! - tree `journal`: device and report records not yet in their trees, one
//!   entry per flush ([`journal`]). A flush appends the records written since
//!   the last one as a single value, so the messages acknowledged after it are
//!   durable (STATE-1) at the cost of one insert, not one per record. A
//!   background thread folds the journal into `devices` and `reports` once it
//!   holds [`FOLD_AFTER_RECORDS`] records; a start folds what is left before
//!   it loads.
//!
//! A report that counts is one record: it carries the report's `seq`, so
//! the device's replay floor is the larger of its device record's `last_seq` and
//! the `seq` of its stored reports (raised so on start). The device record
//! itself is written only when more than the floor changed (Hello, approval,
//! running release) or when the report is not stored. Deleting a rollout writes
//! its members' floors into their device records first.
//!
//! The coordinator epoch lives apart, in a small atomically written file
//! ([`crate::durable`]), so a lost or rebuilt database can never lower it.

mod journal;

use crate::fleet::registry::DeviceRecord;
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::{Command, Decision, Observations, RolloutState};
use journal::{FoldLimits, Pending, Target};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use swell_protocol::messages::Phase;
use swell_protocol::{DeviceId, ReleaseId, RolloutId};

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// `seq` of the newest manifest published (or about to be).
    pub manifest_seq: u64,
    /// Decisions logged so far (the next entry's index).
    pub decisions: u64,
    pub created_at: u64,
}

/// One audit-log entry: a transition with the inputs it was computed from (ROLL-5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionEntry {
    pub at: u64,
    pub epoch: u64,
    pub before: RolloutState,
    /// The observations of a `step`, or the operator command.
    pub observations: Option<Observations>,
    pub command: Option<Command>,
    pub decisions: Vec<Decision>,
    pub after: RolloutState,
}

/// The latest report of one device for one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReport {
    pub release: ReleaseId,
    pub phase: Phase,
    /// The envelope `seq` it came in: a replay floor of the device.
    pub seq: u64,
}

/// A report as written before it carried its `seq` (read back as `seq` 0: the
/// device record of that format held the floor).
#[derive(Deserialize)]
struct StoredReportV0 {
    release: ReleaseId,
    phase: Phase,
}

impl StoredReport {
    fn decode(bytes: &[u8]) -> Option<StoredReport> {
        postcard::from_bytes::<StoredReport>(bytes)
            .ok()
            .or_else(|| {
                postcard::from_bytes::<StoredReportV0>(bytes)
                    .ok()
                    .map(|r| StoredReport {
                        release: r.release,
                        phase: r.phase,
                        seq: 0,
                    })
            })
    }
}

/// Why the store failed. All store errors are retryable only by restarting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("cannot start the journal's fold thread: {0}")]
    FoldThread(std::io::Error),
}

/// What was loaded at start, and what could not be.
#[derive(Debug, Default)]
pub struct Loaded {
    pub rollouts: Vec<RolloutRecord>,
    pub devices: Vec<DeviceRecord>,
    pub reports: Vec<(RolloutId, DeviceId, StoredReport)>,
    /// Records that did not decode; moved aside under `corrupt/` (STATE-3).
    pub corrupt: Vec<String>,
}

/// Durable coordinator state.
pub trait Store: Send + Sync {
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Writes a rollout and, atomically with it, its new decision entry.
    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError>;
    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError>;
    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError>;
    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError>;
    /// Deletes a rollout with its decision log and reports.
    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The sled implementation. Clones share one database and one fold thread.
#[derive(Debug, Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
    folder: Arc<FoldThread>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    rollouts: sled::Tree,
    devices: sled::Tree,
    reports: sled::Tree,
    journal: sled::Tree,
    /// Journal entries that did not decode.
    journal_aside: sled::Tree,
    pending: Mutex<Pending>,
    next_entry: AtomicU64,
    /// Journal records appended since the last fold began.
    unfolded: AtomicU64,
    fold_lock: Mutex<()>,
    tuning: Tuning,
}

/// sled's page cache unless configured: the coordinator's own maps are the
/// hot state, and the journal (see [`journal`]) keeps the hot path off
/// random-key inserts, so a small cache no longer costs CPU (at 1,000,000
/// devices 16 MiB took the same CPU as 64 MiB and peaked 79–85 MiB lower;
/// BENCHMARKS.md, ninth round).
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Journal records after which a fold starts in the background. A fold
/// writes each key once however often it changed, so the larger, the fewer
/// writes; the journal's size on disk and the time a start takes to fold it
/// grow with it.
pub const FOLD_AFTER_RECORDS: u64 = 1 << 20;

/// Records a fold holds in memory at once (about 150 bytes each).
pub const FOLD_PART_RECORDS: usize = 1 << 16;

/// How the store uses memory and when it folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// sled's page cache (sled's own estimate of node sizes; the memory it
    /// takes is larger).
    pub cache_bytes: u64,
    pub fold_after_records: u64,
    pub fold_part_records: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cache_bytes: DEFAULT_CACHE_BYTES,
            fold_after_records: FOLD_AFTER_RECORDS,
            fold_part_records: FOLD_PART_RECORDS,
        }
    }
}

/// A page cache size given in MiB, in bytes; `None` for 0 or too large.
pub fn cache_bytes_from_mib(mib: u64) -> Option<u64> {
    mib.checked_mul(1024 * 1024).filter(|b| *b > 0)
}

/// The background fold: woken when enough records are journalled, stopped
/// and joined when the last clone of the store goes, so the database is
/// closed (and its lock released) when the store is dropped.
#[derive(Debug)]
struct FoldThread {
    wake: Mutex<Option<std::sync::mpsc::SyncSender<()>>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    inner: Arc<Inner>,
}

impl Drop for FoldThread {
    fn drop(&mut self) {
        lock(&self.wake).take();
        if let Some(h) = lock(&self.handle).take() {
            let _ = h.join();
        }
        // What the engine wrote but did not flush still reaches the journal.
        if let Err(e) = self
            .inner
            .append_pending()
            .and_then(|()| Ok(self.inner.db.flush()?))
        {
            tracing::warn!(error = %e, "store not flushed on close");
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// data behind these locks stays consistent (appends and folds are whole).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    /// Opens with a page cache of `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_tuned(
            dir,
            Tuning {
                cache_bytes,
                ..Tuning::default()
            },
        )
    }

    pub fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(tuning.cache_bytes)
            .flush_every_ms(Some(500))
            .open()?;
        let journal = db.open_tree("journal")?;
        let next_entry = match journal.last()? {
            Some((k, _)) => journal::entry_seq(&k).map_or(0, |s| s.saturating_add(1)),
            None => 0,
        };
        let inner = Arc::new(Inner {
            rollouts: db.open_tree("rollouts")?,
            devices: db.open_tree("devices")?,
            reports: db.open_tree("reports")?,
            journal_aside: db.open_tree("journal.corrupt")?,
            journal,
            db,
            pending: Mutex::new(Pending::default()),
            next_entry: AtomicU64::new(next_entry),
            unfolded: AtomicU64::new(0),
            fold_lock: Mutex::new(()),
            tuning,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let bg = inner.clone();
        let handle = std::thread::Builder::new()
            .name("swell-store-fold".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    match bg.fold() {
                        Ok(f) => tracing::debug!(
                            records = f.records,
                            written = f.written,
                            parts = f.parts,
                            "journal folded"
                        ),
                        // The entries stay; the next fold or start retries.
                        Err(e) => tracing::warn!(error = %e, "journal fold failed"),
                    }
                }
            })
            .map_err(StoreError::FoldThread)?;
        Ok(SledStore {
            folder: Arc::new(FoldThread {
                wake: Mutex::new(Some(tx)),
                handle: Mutex::new(Some(handle)),
                inner: inner.clone(),
            }),
            inner,
        })
    }

    /// Folds the whole journal now (as a start does).
    #[cfg(test)]
    fn fold_journal(&self) -> Result<(), StoreError> {
        self.inner.append_pending()?;
        self.inner.fold().map(|_| ())
    }

    /// Journal entries not folded yet.
    #[cfg(test)]
    fn journal_entries(&self) -> usize {
        self.inner.journal.len()
    }

    fn wake_folder(&self) {
        if let Some(tx) = lock(&self.folder.wake).as_ref() {
            // Full means a fold is already due.
            let _ = tx.try_send(());
        }
    }
}

impl Inner {
    /// Appends the records written since the last call as one journal entry.
    fn append_pending(&self) -> Result<(), StoreError> {
        // Held through the insert: entries get their numbers in the order
        // their records were written, and are in the tree in that order, so
        // a fold that saw entry n has seen every entry before it.
        let mut pending = lock(&self.pending);
        if let Some((entry, records)) = pending.take() {
            let seq = self.next_entry.fetch_add(1, AtomicOrdering::Relaxed);
            self.journal.insert(journal::entry_key(seq), entry)?;
            self.unfolded.fetch_add(records, AtomicOrdering::Relaxed);
        }
        Ok(())
    }

    fn push(&self, target: Target, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        lock(&self.pending).push(target, key, value)
    }

    fn fold(&self) -> Result<journal::Folded, StoreError> {
        let _g = lock(&self.fold_lock);
        self.fold_held()
    }

    /// [`Inner::fold`] for a caller that holds the fold lock.
    fn fold_held(&self) -> Result<journal::Folded, StoreError> {
        let before = self.unfolded.load(AtomicOrdering::Relaxed);
        let done = journal::fold(
            &journal::Trees {
                db: &self.db,
                journal: &self.journal,
                aside: &self.journal_aside,
                devices: &self.devices,
                reports: &self.reports,
            },
            FoldLimits {
                part_records: self.tuning.fold_part_records,
            },
        )?;
        self.unfolded
            .fetch_sub(done.records.min(before), AtomicOrdering::Relaxed);
        Ok(done)
    }
}

fn json<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn post<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

fn quarantine(tree: &sled::Tree, key: &[u8], corrupt: &mut Vec<String>) -> Result<(), StoreError> {
    let name = String::from_utf8_lossy(key).into_owned();
    if let Some(v) = tree.remove(key)? {
        let mut aside = b"corrupt/".to_vec();
        aside.extend_from_slice(key);
        tree.insert(aside, v)?;
    }
    corrupt.push(name);
    Ok(())
}

fn report_key(rollout: &RolloutId, device: &DeviceId) -> String {
    format!("{rollout}/{device}")
}

impl Store for SledStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let s = &self.inner;
        s.append_pending()?;
        let mut out = Loaded {
            corrupt: s.fold()?.corrupt,
            ..Loaded::default()
        };
        let mut bad: Vec<(sled::Tree, Vec<u8>)> = Vec::new();
        for kv in s.rollouts.scan_prefix(b"r/") {
            let (k, v) = kv?;
            match serde_json::from_slice::<RolloutRecord>(&v) {
                Ok(r) => out.rollouts.push(r),
                Err(_) => bad.push((s.rollouts.clone(), k.to_vec())),
            }
        }
        for kv in s.devices.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"corrupt/") {
                continue;
            }
            match postcard::from_bytes::<DeviceRecord>(&v) {
                Ok(d) => out.devices.push(d),
                Err(_) => bad.push((s.devices.clone(), k.to_vec())),
            }
        }
        for kv in s.reports.iter() {
            let (k, v) = kv?;
            if k.starts_with(b"corrupt/") {
                continue;
            }
            let parsed = std::str::from_utf8(&k)
                .ok()
                .and_then(|s| s.split_once('/'))
                .and_then(|(r, d)| {
                    Some((
                        RolloutId::new(r).ok()?,
                        DeviceId::new(d).ok()?,
                        StoredReport::decode(&v)?,
                    ))
                });
            match parsed {
                Some(t) => out.reports.push(t),
                None => bad.push((s.reports.clone(), k.to_vec())),
            }
        }
        for (tree, key) in bad {
            quarantine(&tree, &key, &mut out.corrupt)?;
        }
        Ok(out)
    }

    fn commit_rollout(
        &self,
        rec: &RolloutRecord,
        entry: Option<&DecisionEntry>,
    ) -> Result<(), StoreError> {
        // The reports a transition was computed from are durable with it.
        self.inner.append_pending()?;
        let mut batch = sled::Batch::default();
        let id = rec.spec.id.as_str();
        if let Some(e) = entry {
            let n = rec.decisions.saturating_sub(1);
            batch.insert(format!("d/{id}/{n:016x}").as_bytes(), json("decision", e)?);
        }
        batch.insert(format!("r/{id}").as_bytes(), json("rollout", rec)?);
        self.inner.rollouts.apply_batch(batch)?;
        self.inner.db.flush()?;
        Ok(())
    }

    fn decisions(&self, rollout: &RolloutId) -> Result<Vec<DecisionEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .inner
            .rollouts
            .scan_prefix(format!("d/{rollout}/").as_bytes())
        {
            let (k, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.inner.push(
            Target::Devices,
            rec.id.as_str().as_bytes(),
            &post("device", rec)?,
        )
    }

    fn put_report(
        &self,
        rollout: &RolloutId,
        device: &DeviceId,
        report: &StoredReport,
    ) -> Result<(), StoreError> {
        self.inner.push(
            Target::Reports,
            report_key(rollout, device).as_bytes(),
            &post("report", report)?,
        )
    }

    fn delete_rollout(&self, rollout: &RolloutId) -> Result<(), StoreError> {
        let s = &self.inner;
        // Nothing of the rollout may come back from a later fold.
        s.append_pending()?;
        let _g = lock(&s.fold_lock);
        s.fold_held()?;
        let mut batch = sled::Batch::default();
        batch.remove(format!("r/{rollout}").as_bytes());
        for kv in s.rollouts.scan_prefix(format!("d/{rollout}/").as_bytes()) {
            batch.remove(kv?.0);
        }
        s.rollouts.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for kv in s.reports.scan_prefix(format!("{rollout}/").as_bytes()) {
            batch.remove(kv?.0);
        }
        s.reports.apply_batch(batch)?;
        s.db.flush()?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.append_pending()?;
        self.inner.db.flush()?;
        if self.inner.unfolded.load(AtomicOrdering::Relaxed) >= self.inner.tuning.fold_after_records
        {
            self.wake_folder();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::spec::{BreachPolicy, GateSpec};
    use crate::rollout::state_tests::spec;
    use std::collections::BTreeMap;
    use swell_protocol::cohort::PPM_FULL;

    fn record() -> RolloutRecord {
        RolloutRecord {
            spec: spec(0, &[PPM_FULL], GateSpec::default(), BreachPolicy::Pause),
            state: RolloutState::new(),
            manifest_seq: 0,
            decisions: 0,
            created_at: 1,
        }
    }

    #[test]
    fn deleting_a_rollout_removes_its_record_decisions_and_reports_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let mut rec = record();
        rec.decisions = 1;
        let entry = DecisionEntry {
            at: 5,
            epoch: 1,
            before: RolloutState::new(),
            observations: None,
            command: Some(Command::Abort),
            decisions: vec![],
            after: rec.state.clone(),
        };
        s.commit_rollout(&rec, Some(&entry)).unwrap();
        let mut other = record();
        other.spec.id = RolloutId::new("other").unwrap();
        s.commit_rollout(&other, None).unwrap();
        let report = StoredReport {
            release: rec.spec.release_id(),
            phase: swell_protocol::messages::Phase::Committed,
            seq: 1,
        };
        let dev = DeviceId::new("dev-1").unwrap();
        s.put_report(&rec.spec.id, &dev, &report).unwrap();
        s.put_report(&other.spec.id, &dev, &report).unwrap();
        s.delete_rollout(&rec.spec.id).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        assert_eq!(loaded.rollouts[0].spec.id, other.spec.id);
        assert_eq!(loaded.reports.len(), 1);
        assert_eq!(loaded.reports[0].0, other.spec.id);
        assert!(s.decisions(&rec.spec.id).unwrap().is_empty());
    }

    #[test]
    fn store_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = record();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.commit_rollout(&rec, None).unwrap();
            rec.decisions = 1;
            rec.state.retry = 1;
            let entry = DecisionEntry {
                at: 5,
                epoch: 1,
                before: RolloutState::new(),
                observations: None,
                command: Some(Command::Retry),
                decisions: vec![Decision::Retry { retry: 1 }],
                after: rec.state.clone(),
            };
            s.commit_rollout(&rec, Some(&entry)).unwrap();
            s.put_report(
                &rec.spec.id,
                &DeviceId::new("d1").unwrap(),
                &StoredReport {
                    release: ReleaseId([1; 32]),
                    phase: Phase::Committed,
                    seq: 1,
                },
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts, vec![rec.clone()]);
        assert_eq!(loaded.reports.len(), 1);
        assert_eq!(s.decisions(&rec.spec.id).unwrap().len(), 1);
        assert!(loaded.corrupt.is_empty());
    }

    #[test]
    fn store_reads_reports_written_before_they_carried_seq() {
        #[derive(Serialize)]
        struct V0 {
            release: ReleaseId,
            phase: Phase,
        }
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let old = postcard::to_allocvec(&V0 {
            release: ReleaseId([3; 32]),
            phase: Phase::Committed,
        })
        .unwrap();
        s.inner.reports.insert(b"r/d1", old).unwrap();
        s.put_report(
            &RolloutId::new("r").unwrap(),
            &DeviceId::new("d2").unwrap(),
            &StoredReport {
                release: ReleaseId([4; 32]),
                phase: Phase::Installing,
                seq: 9,
            },
        )
        .unwrap();
        // A record of neither format is set aside.
        s.inner.reports.insert(b"r/d3", vec![0xff; 3]).unwrap();
        let mut loaded = s.load().unwrap();
        loaded.reports.sort_by(|a, b| a.1.cmp(&b.1));
        let got: Vec<_> = loaded
            .reports
            .iter()
            .map(|(_, d, r)| (d.as_str(), r.seq))
            .collect();
        assert_eq!(got, vec![("d1", 0), ("d2", 9)]);
        assert_eq!(loaded.reports[0].2.release, ReleaseId([3; 32]));
        assert_eq!(loaded.corrupt, vec!["r/d3".to_string()]);
    }

    #[test]
    fn store_corrupt_records_are_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.commit_rollout(&record(), None).unwrap();
        s.inner
            .rollouts
            .insert(b"r/broken", b"{not json".to_vec())
            .unwrap();
        s.inner.devices.insert(b"d9", b"\xff\xff".to_vec()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        assert_eq!(loaded.corrupt.len(), 2);
        // Set aside, so the next start is clean.
        let again = s.load().unwrap();
        assert!(again.corrupt.is_empty());
        assert!(s.inner.rollouts.get(b"corrupt/r/broken").unwrap().is_some());
    }

    fn report(seq: u64) -> StoredReport {
        StoredReport {
            release: ReleaseId([seq as u8; 32]),
            phase: Phase::Installing,
            seq,
        }
    }

    /// The `seq` of each device's stored report, by device.
    fn seqs(loaded: &Loaded) -> BTreeMap<String, u64> {
        loaded
            .reports
            .iter()
            .map(|(_, d, r)| (d.as_str().to_string(), r.seq))
            .collect()
    }

    fn reopen(dir: &Path, tuning: Tuning) -> SledStore {
        // sled's flusher thread may hold the file lock a moment after a drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open_tuned(dir, tuning) {
                Ok(s) => return s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    #[test]
    fn journal_folds_in_the_background_in_key_range_parts_and_a_start_folds_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            cache_bytes: DEFAULT_CACHE_BYTES,
            fold_after_records: 500,
            fold_part_records: 128,
        };
        let rollout = RolloutId::new("r").unwrap();
        let mut want = BTreeMap::new();
        {
            let s = SledStore::open_tuned(dir.path(), tuning).unwrap();
            // 300 devices, each reporting four times, spread over 60 flushes.
            for round in 0..4u64 {
                for chunk in 0..15u64 {
                    for n in 0..20u64 {
                        let d = (n * 15 + chunk) * 7919 % 300;
                        let dev = DeviceId::new(format!("dev-{d:04}")).unwrap();
                        let seq = round * 1000 + chunk * 20 + n + 1;
                        s.put_report(&rollout, &dev, &report(seq)).unwrap();
                        want.insert(dev.as_str().to_string(), seq);
                    }
                    s.flush().unwrap();
                }
            }
            // 1,200 records against a threshold of 500: the folder ran, in
            // parts of about 128 records, and emptied what it saw.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while s.inner.reports.len() < 300 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(s.inner.reports.len(), 300, "the background fold ran");
            assert!(s.journal_entries() < 60);
            // Newer reports stay in the journal: no flush, no fold.
            let dev = DeviceId::new("dev-0007").unwrap();
            s.put_report(&rollout, &dev, &report(99_999)).unwrap();
            want.insert("dev-0007".into(), 99_999);
        }
        let s = reopen(dir.path(), tuning);
        let loaded = s.load().unwrap();
        assert_eq!(seqs(&loaded), want);
        assert!(loaded.corrupt.is_empty());
        assert_eq!(s.journal_entries(), 0);
    }

    #[test]
    fn a_large_journal_is_folded_in_key_ranges_each_key_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            cache_bytes: DEFAULT_CACHE_BYTES,
            fold_after_records: u64::MAX,
            fold_part_records: 128,
        };
        let s = SledStore::open_tuned(dir.path(), tuning).unwrap();
        let rollout = RolloutId::new("r").unwrap();
        let mut want = BTreeMap::new();
        for seq in 1..=1200u64 {
            let dev = DeviceId::new(format!("dev-{:04}", seq * 7919 % 300)).unwrap();
            s.put_report(&rollout, &dev, &report(seq)).unwrap();
            want.insert(dev.as_str().to_string(), seq);
            if seq % 40 == 0 {
                s.flush().unwrap();
            }
        }
        s.put_device(&DeviceRecord::for_tests("dev-0001")).unwrap();
        s.flush().unwrap();
        let done = s.inner.fold().unwrap();
        assert_eq!(done.records, 1201);
        assert_eq!(done.entries, 31);
        assert_eq!(done.written, 301, "each key once, in exactly one part");
        assert!((9..=12).contains(&done.parts), "parts: {}", done.parts);
        let loaded = s.load().unwrap();
        assert_eq!(seqs(&loaded), want);
        assert_eq!(loaded.devices.len(), 1);
    }

    #[test]
    fn a_fold_cut_short_is_finished_by_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let rollout = RolloutId::new("r").unwrap();
        let (a, b) = (DeviceId::new("a").unwrap(), DeviceId::new("b").unwrap());
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_report(&rollout, &a, &report(1)).unwrap();
            s.put_report(&rollout, &b, &report(1)).unwrap();
            s.flush().unwrap();
            s.put_report(&rollout, &a, &report(2)).unwrap();
            s.flush().unwrap();
            let entries: Vec<_> = s.inner.journal.iter().map(Result::unwrap).collect();
            assert_eq!(entries.len(), 2);
            s.fold_journal().unwrap();
            assert_eq!(s.journal_entries(), 0);
            // As if the process died after writing `a` and before writing
            // `b` and removing the entries.
            s.inner.reports.remove(b"r/b").unwrap();
            for (k, v) in entries {
                s.inner.journal.insert(k, v).unwrap();
            }
            s.inner.db.flush().unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
        let loaded = s.load().unwrap();
        let want: BTreeMap<String, u64> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
        assert_eq!(seqs(&loaded), want);
        // Appends continue after the entries found on open.
        s.put_report(&rollout, &b, &report(3)).unwrap();
        s.flush().unwrap();
        assert_eq!(seqs(&s.load().unwrap())["b"], 3);
    }

    #[test]
    fn a_corrupt_journal_entry_is_set_aside_and_the_rest_folded() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let rollout = RolloutId::new("r").unwrap();
        s.put_report(&rollout, &DeviceId::new("a").unwrap(), &report(4))
            .unwrap();
        s.flush().unwrap();
        // A record header claiming more bytes than the entry has.
        s.inner
            .journal
            .insert(
                journal::entry_key(77),
                vec![1, 1, 200, 0, 0, 0, 1, 0, 0, 0, b'x'],
            )
            .unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.corrupt, vec!["journal/77".to_string()]);
        assert_eq!(seqs(&loaded).get("a"), Some(&4));
        assert_eq!(s.journal_entries(), 0);
        assert!(
            s.inner
                .journal_aside
                .get(journal::entry_key(77))
                .unwrap()
                .is_some()
        );
        assert!(s.load().unwrap().corrupt.is_empty());
    }

    #[test]
    fn records_written_but_not_flushed_reach_the_journal_when_the_store_closes() {
        let dir = tempfile::tempdir().unwrap();
        let rollout = RolloutId::new("r").unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_report(&rollout, &DeviceId::new("a").unwrap(), &report(5))
                .unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
        assert_eq!(seqs(&s.load().unwrap()).get("a"), Some(&5));
    }

    #[test]
    fn a_deleted_rollout_does_not_come_back_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record();
        let dev = DeviceId::new("a").unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.commit_rollout(&rec, None).unwrap();
            s.put_report(&rec.spec.id, &dev, &report(1)).unwrap();
            s.flush().unwrap();
            s.put_report(&rec.spec.id, &dev, &report(2)).unwrap();
            s.delete_rollout(&rec.spec.id).unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
        let loaded = s.load().unwrap();
        assert!(loaded.rollouts.is_empty());
        assert!(loaded.reports.is_empty());
    }
}
