//! Durable state behind the [`Store`] trait: rollouts in sled, device and
//! report records in a journal of plain files beside it.
//!
//! - sled tree `rollouts`: `r/{rollout}` → JSON [`RolloutRecord`];
//!   `d/{rollout}/{n:016x}` → JSON [`DecisionEntry`]. A transition and its
//!   decisions are written in one atomic batch and flushed before anything is
//!   published (STATE-1), so the audit log never misses or repeats a
//!   transition.
//! - `records/` ([`journal`], [`files`]): device records (`{device}` →
//!   postcard [`DeviceRecord`]) and latest reports (`{rollout}/{device}` →
//!   postcard release, phase, envelope `seq`, from which the trackers are
//!   rebuilt on start). A flush appends the records written since the last
//!   one to the current segment file as checksummed entries (one, or
//!   several of about 1 MiB after a burst) and syncs it, so the messages
//!   acknowledged after it are durable (STATE-1). Once a
//!   segment holds [`FOLD_AFTER_RECORDS`] records it is closed, and a
//!   background thread folds the closed segments into `records/snapshot`
//!   (newest record per key, in key order, streamed). A start folds what is
//!   left before it loads (a segment with no entries is dropped, not folded,
//!   so a start after a run that wrote nothing does not rewrite the
//!   snapshot). Records that do not decode go to sled tree
//!   `records.corrupt`, damaged entries to `records/aside/` (STATE-3).
//!   Databases of earlier versions, which kept these records in sled trees
//!   (`devices`, `reports`, `journal`), are moved over when they open.
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

mod files;
mod journal;

use crate::fleet::registry::DeviceRecord;
use crate::rollout::spec::RolloutSpec;
use crate::rollout::state::{Command, Decision, Observations, RolloutState};
use files::Appender;
use journal::{FoldLimits, Leave, Pending, Target};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
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
    #[error("journal file: {0}")]
    Io(#[from] std::io::Error),
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

/// The implementation: sled for rollouts, the journal's files for device
/// and report records. Clones share one database, one journal and one fold
/// thread.
#[derive(Debug, Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
    folder: Arc<FoldThread>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    rollouts: sled::Tree,
    /// Device and report records that did not decode, set aside by `load`.
    corrupt: sled::Tree,
    /// The journal's segments and snapshot ([`journal`]).
    dir: PathBuf,
    journal: Mutex<Journal>,
    /// Segments below this number are closed: the fold thread may take them.
    active_segment: AtomicU64,
    fold_lock: Mutex<()>,
    /// Folds the background thread has finished, announced on `folded_cv`.
    folds_done: Mutex<u64>,
    folded_cv: Condvar,
    tuning: Tuning,
}

/// Records not flushed yet, and the segment a flush appends them to.
#[derive(Debug)]
struct Journal {
    pending: Pending,
    segment: Appender,
}

impl Journal {
    /// Writes the pending records out as one entry (not synced yet).
    fn write_pending(&mut self) -> Result<(), StoreError> {
        if let Some((entry, records)) = self.pending.take() {
            self.segment.write(&entry, records)?;
        }
        Ok(())
    }
}

/// sled's page cache unless configured. sled holds only rollouts and their
/// decision logs now (device and report records are in the journal's files),
/// so this bounds little; it is kept small because sled's real use is a
/// multiple of it.
pub const DEFAULT_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Records after which a journal segment is closed and folded into the
/// snapshot in the background. A fold rewrites the whole snapshot (about
/// 200 MB at a million devices, streamed), so the larger, the fewer
/// rewrites; the journal's size on disk and the time a start takes to fold
/// it grow with it.
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
            .and_then(|_| Ok(self.inner.db.flush()?))
        {
            tracing::warn!(error = %e, "store not flushed on close");
        }
    }
}

/// How long an open waits for the database's file lock. sled's flush jobs hold
/// the lock a moment after the last handle in this process is dropped, so a
/// reopen right after a drop (a restarted engine, a test) found it taken.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_sled(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} is in use by another process (its file lock was not released within {} s): {e}",
                        dir.display(),
                        LOCK_WAIT.as_secs()
                    ),
                )));
            }
            other => return Ok(other?),
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
        let db = open_sled(dir, tuning.cache_bytes)?;
        let records = dir.join(RECORDS_DIR);
        std::fs::create_dir_all(&records)?;
        // A fold that died before its rename leaves a partial snapshot.
        match std::fs::remove_file(records.join("snapshot.tmp")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let existing = files::segments(&records)?;
        let mut next = existing.last().map_or(1, |s| s.saturating_add(1));
        if let Some(&newest) = existing.last() {
            if let Some(at) = files::cut_torn_tail(&files::segment_path(&records, newest))? {
                tracing::warn!(
                    segment = newest,
                    offset = at,
                    "journal segment ended inside an entry (a write cut short); cut there"
                );
            }
            // Its number is not reused: `next` stays above it.
            if files::remove_if_empty(&records, newest)? {
                tracing::debug!(
                    segment = newest,
                    "empty journal segment of the last run removed"
                );
            }
        }
        if migrate_sled_trees(&db, &records, next)? {
            next += 1;
        }
        let inner = Arc::new(Inner {
            rollouts: db.open_tree("rollouts")?,
            corrupt: db.open_tree("records.corrupt")?,
            journal: Mutex::new(Journal {
                pending: Pending::default(),
                segment: Appender::create(&records, next)?,
            }),
            active_segment: AtomicU64::new(next),
            dir: records,
            db,
            fold_lock: Mutex::new(()),
            folds_done: Mutex::new(0),
            folded_cv: Condvar::new(),
            tuning,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let bg = inner.clone();
        let handle = std::thread::Builder::new()
            .name("swell-store-fold".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    match bg.fold(Leave::default()) {
                        Ok(f) => tracing::debug!(
                            records = f.records,
                            written = f.written,
                            kept = f.kept,
                            parts = f.parts,
                            "journal folded"
                        ),
                        // The segments stay; the next fold or start retries.
                        Err(e) => tracing::warn!(error = %e, "journal fold failed"),
                    }
                    *lock(&bg.folds_done) += 1;
                    bg.folded_cv.notify_all();
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
    fn fold_journal(&self) -> Result<journal::Folded, StoreError> {
        let _g = lock(&self.inner.fold_lock);
        self.inner.rotate()?;
        self.inner.fold_held(Leave::default())
    }

    /// Journal segment files, the one being appended to included.
    #[cfg(test)]
    fn segment_files(&self) -> usize {
        files::segments(&self.inner.dir).map_or(0, |s| s.len())
    }

    /// Waits, woken by each background fold, until `done` holds or `timeout`
    /// passes; returns whether it holds.
    #[cfg(test)]
    fn wait_for_folds(&self, timeout: std::time::Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut folds = lock(&self.inner.folds_done);
        while !done(self) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            folds = self
                .inner
                .folded_cv
                .wait_timeout(folds, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn wake_folder(&self) {
        if let Some(tx) = lock(&self.folder.wake).as_ref() {
            // Full means a fold is already due.
            let _ = tx.try_send(());
        }
    }
}

/// Pending records are written out (not yet synced) at this size.
const ENTRY_BYTES: usize = 1 << 20;

/// The journal's directory inside the database's.
const RECORDS_DIR: &str = "records";

/// Moves device and report records that earlier versions kept in sled (the
/// `devices` and `reports` trees, and the `journal` tree of the ninth
/// benchmark round) into journal segment `seq`, then drops those trees. The
/// segment is synced before the trees go, so a crash in between only
/// migrates the same records again. Returns whether there was anything.
fn migrate_sled_trees(db: &sled::Db, dir: &Path, seq: u64) -> Result<bool, StoreError> {
    let names: [(&[u8], Option<Target>); 3] = [
        (b"devices", Some(Target::Devices)),
        (b"reports", Some(Target::Reports)),
        (b"journal", None),
    ];
    let present: Vec<_> = names
        .into_iter()
        .filter(|(name, _)| db.tree_names().iter().any(|n| n.as_ref() == *name))
        .collect();
    if present.is_empty() {
        return Ok(false);
    }
    let mut out = Appender::create(dir, seq)?;
    let mut block = Pending::default();
    for (name, target) in &present {
        let tree = db.open_tree(name)?;
        for kv in tree.iter() {
            let (k, v) = kv?;
            let records = match target {
                // Records set aside by earlier versions stay aside.
                Some(_) if k.starts_with(b"corrupt/") => continue,
                Some(t) => vec![journal::Record {
                    target: *t,
                    key: &k,
                    value: &v,
                }],
                // Old journal entries have the same record format.
                None => match journal::decode(&v) {
                    Ok(records) => records,
                    Err(reason) => {
                        tracing::warn!(entry = ?k, reason, "old journal entry kept in tree journal.corrupt");
                        db.open_tree("journal.corrupt")?.insert(&k, &v)?;
                        continue;
                    }
                },
            };
            for r in records {
                block.push(r.target, r.key, r.value)?;
                if block.bytes() >= ENTRY_BYTES
                    && let Some((body, n)) = block.take()
                {
                    out.write(&body, n)?;
                }
            }
        }
    }
    if let Some((body, n)) = block.take() {
        out.write(&body, n)?;
    }
    out.sync()?;
    for (name, _) in &present {
        db.drop_tree(name)?;
    }
    db.flush()?;
    tracing::info!(
        segment = seq,
        "device and report records moved from sled to the journal"
    );
    Ok(true)
}

impl Inner {
    /// Appends the records written since the last call as one entry of the
    /// current segment, synced. Returns whether the segment is full and was
    /// closed, so a fold is due.
    fn append_pending(&self) -> Result<bool, StoreError> {
        let mut j = lock(&self.journal);
        j.write_pending()?;
        // Entries written out early by `push` are synced here too.
        j.segment.sync()?;
        if j.segment.records >= self.tuning.fold_after_records {
            self.rotate_held(&mut j)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Closes the current segment, unless it holds no records, so a fold
    /// takes everything written so far; the next segment is opened.
    fn rotate(&self) -> Result<(), StoreError> {
        let mut j = lock(&self.journal);
        j.write_pending()?;
        if j.segment.records == 0 {
            return Ok(());
        }
        self.rotate_held(&mut j)
    }

    fn rotate_held(&self, j: &mut Journal) -> Result<(), StoreError> {
        j.segment.sync()?;
        let next = j.segment.seq.saturating_add(1);
        j.segment = Appender::create(&self.dir, next)?;
        self.active_segment.store(next, AtomicOrdering::Release);
        Ok(())
    }

    fn push(&self, target: Target, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut j = lock(&self.journal);
        j.pending.push(target, key, value)?;
        // Thousands of records between two flushes (a rollout deleted over
        // a million devices writes each member's floor) go out in entries
        // of bounded size; the flush still syncs them all before any ack.
        if j.pending.bytes() >= ENTRY_BYTES {
            j.write_pending()?;
        }
        Ok(())
    }

    fn fold(&self, leave: Leave) -> Result<journal::Folded, StoreError> {
        let _g = lock(&self.fold_lock);
        self.fold_held(leave)
    }

    /// Folds the closed segments, if there are any or `leave` names
    /// something; for a caller that holds the fold lock.
    fn fold_held(&self, leave: Leave) -> Result<journal::Folded, StoreError> {
        self.fold_closed(leave, false)
    }

    /// With `rewrite`, the snapshot is written anew even when there is
    /// nothing to fold (to leave damaged blocks behind).
    fn fold_closed(&self, leave: Leave, rewrite: bool) -> Result<journal::Folded, StoreError> {
        let active = self.active_segment.load(AtomicOrdering::Acquire);
        let closed: Vec<u64> = files::segments(&self.dir)?
            .into_iter()
            .filter(|s| *s < active)
            .collect();
        if closed.is_empty() && leave.is_empty() && !rewrite {
            return Ok(journal::Folded::default());
        }
        journal::fold(
            &self.dir,
            &closed,
            leave,
            FoldLimits {
                part_records: self.tuning.fold_part_records,
            },
        )
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
        let _g = lock(&s.fold_lock);
        s.rotate()?;
        let mut out = Loaded {
            corrupt: s.fold_held(Leave::default())?.corrupt,
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
        // Records that do not decode go to the `records.corrupt` tree and
        // out of the snapshot, so the next start is clean (STATE-3).
        let mut leave = Leave::default();
        let mut aside = sled::Batch::default();
        let damaged = journal::read_snapshot(&s.dir, |target, key, value| {
            let ok = match target {
                Target::Devices => postcard::from_bytes::<DeviceRecord>(value)
                    .map(|d| out.devices.push(d))
                    .is_ok(),
                Target::Reports => std::str::from_utf8(key)
                    .ok()
                    .and_then(|s| s.split_once('/'))
                    .and_then(|(r, d)| {
                        Some((
                            RolloutId::new(r).ok()?,
                            DeviceId::new(d).ok()?,
                            StoredReport::decode(value)?,
                        ))
                    })
                    .map(|t| out.reports.push(t))
                    .is_some(),
            };
            if !ok {
                let tree = match target {
                    Target::Devices => "devices/",
                    Target::Reports => "reports/",
                };
                let mut name = tree.as_bytes().to_vec();
                name.extend_from_slice(key);
                aside.insert(name, value);
                leave.keys.insert(journal::sort_key(target, key));
                out.corrupt.push(String::from_utf8_lossy(key).into_owned());
            }
        })?;
        // The next start is clean: a rewrite leaves damaged blocks and
        // undecodable records behind.
        if !leave.keys.is_empty() || !damaged.is_empty() {
            s.corrupt.apply_batch(aside)?;
            s.db.flush()?;
            s.fold_closed(leave, true)?;
        }
        out.corrupt.extend(damaged);
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
        if self.inner.append_pending()? {
            self.wake_folder();
        }
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
        // The reports go first, from the journal and the snapshot alike, so
        // nothing of the rollout can come back once its record is gone.
        let _g = lock(&s.fold_lock);
        s.rotate()?;
        s.fold_held(Leave {
            prefix: Some(journal::sort_key(
                Target::Reports,
                format!("{rollout}/").as_bytes(),
            )),
            ..Leave::default()
        })?;
        let mut batch = sled::Batch::default();
        batch.remove(format!("r/{rollout}").as_bytes());
        for kv in s.rollouts.scan_prefix(format!("d/{rollout}/").as_bytes()) {
            batch.remove(kv?.0);
        }
        s.rollouts.apply_batch(batch)?;
        s.db.flush()?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.inner.append_pending()? {
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
        {
            // As the eighth round's code left it: reports in a sled tree.
            let db = sled::open(dir.path()).unwrap();
            let old = postcard::to_allocvec(&V0 {
                release: ReleaseId([3; 32]),
                phase: Phase::Committed,
            })
            .unwrap();
            let reports = db.open_tree("reports").unwrap();
            reports.insert(b"r/d1", old).unwrap();
            // A record of neither format is set aside.
            reports.insert(b"r/d3", vec![0xff; 3]).unwrap();
            db.flush().unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
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
        assert!(s.load().unwrap().corrupt.is_empty());
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
        s.inner.push(Target::Devices, b"d9", b"\xff\xff").unwrap();
        s.put_device(&DeviceRecord::for_tests("d1")).unwrap();
        s.flush().unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.rollouts.len(), 1);
        assert_eq!(loaded.devices.len(), 1);
        assert_eq!(loaded.corrupt.len(), 2);
        // Set aside, so the next start is clean.
        let again = s.load().unwrap();
        assert!(again.corrupt.is_empty());
        assert_eq!(again.devices.len(), 1);
        assert!(s.inner.rollouts.get(b"corrupt/r/broken").unwrap().is_some());
        assert_eq!(
            s.inner.corrupt.get(b"devices/d9").unwrap().as_deref(),
            Some(&b"\xff\xff"[..])
        );
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

    fn snapshot_records(s: &SledStore) -> usize {
        let mut n = 0;
        journal::read_snapshot(&s.inner.dir, |_, _, _| n += 1).unwrap();
        n
    }

    fn reopen(dir: &Path, tuning: Tuning) -> SledStore {
        SledStore::open_tuned(dir, tuning).unwrap()
    }

    // A reopen right after a drop waits for sled's flush jobs to let go of the
    // file lock (a one-in-fifteen failure of the suite before); a second open
    // while the first is alive says the database is in use.
    #[test]
    fn store_reopens_at_once_and_refuses_a_second_owner() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let s = SledStore::open(dir.path()).unwrap();
            s.flush().unwrap();
        }
        let held = SledStore::open(dir.path()).unwrap();
        let second = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(second.contains("in use by another process"), "{second}");
        drop(held);
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
            s.wait_for_folds(std::time::Duration::from_secs(20), |s| {
                s.segment_files() == 1
            });
            assert_eq!(s.segment_files(), 1, "the background fold ran");
            assert_eq!(snapshot_records(&s), 300);
            // Newer reports stay in the journal: no flush, no fold.
            let dev = DeviceId::new("dev-0007").unwrap();
            s.put_report(&rollout, &dev, &report(99_999)).unwrap();
            want.insert("dev-0007".into(), 99_999);
        }
        let s = reopen(dir.path(), tuning);
        let loaded = s.load().unwrap();
        assert_eq!(seqs(&loaded), want);
        assert!(loaded.corrupt.is_empty());
        assert_eq!(s.segment_files(), 1, "only the new, empty one");
    }

    #[test]
    fn a_start_with_nothing_new_to_fold_keeps_the_snapshot() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning::default();
        let rollout = RolloutId::new("r").unwrap();
        let snapshot_inode = |s: &SledStore| {
            std::fs::metadata(s.inner.dir.join("snapshot"))
                .unwrap()
                .ino()
        };
        let first = {
            let s = SledStore::open_tuned(dir.path(), tuning).unwrap();
            for n in 0..50u64 {
                let dev = DeviceId::new(format!("dev-{n:04}")).unwrap();
                s.put_report(&rollout, &dev, &report(n + 1)).unwrap();
            }
            s.flush().unwrap();
            drop(s);
            let s = reopen(dir.path(), tuning);
            assert_eq!(s.load().unwrap().reports.len(), 50);
            snapshot_inode(&s)
        };
        // Two starts that write nothing: each leaves an empty active segment
        // behind, which the next start drops instead of folding it (a fold
        // renames a new snapshot into place).
        for _ in 0..2 {
            let s = reopen(dir.path(), tuning);
            let loaded = s.load().unwrap();
            assert_eq!(loaded.reports.len(), 50);
            assert!(loaded.corrupt.is_empty());
            assert_eq!(snapshot_inode(&s), first, "the snapshot was not rewritten");
            assert_eq!(s.segment_files(), 1, "only the new, empty one");
        }
        // A start after new records folds them as before.
        {
            let s = reopen(dir.path(), tuning);
            let dev = DeviceId::new("dev-0007").unwrap();
            s.put_report(&rollout, &dev, &report(777)).unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path(), tuning);
        let loaded = s.load().unwrap();
        assert_eq!(seqs(&loaded)["dev-0007"], 777);
        assert_ne!(snapshot_inode(&s), first, "new records were folded in");
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
        let done = s.fold_journal().unwrap();
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
            let seg = files::segment_path(
                &s.inner.dir,
                s.inner.active_segment.load(AtomicOrdering::Acquire),
            );
            let bytes = std::fs::read(&seg).unwrap();
            let done = s.fold_journal().unwrap();
            assert_eq!((done.entries, done.written), (2, 2));
            assert!(!seg.exists());
            // As if the process died after the new snapshot was in place and
            // before the segment went, in the middle of writing the next one.
            std::fs::write(&seg, bytes).unwrap();
            std::fs::write(s.inner.dir.join("snapshot.tmp"), b"half a snapshot").unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
        assert!(!s.inner.dir.join("snapshot.tmp").exists());
        let loaded = s.load().unwrap();
        let want: BTreeMap<String, u64> = [("a".to_string(), 2), ("b".to_string(), 1)].into();
        assert_eq!(seqs(&loaded), want);
        assert!(loaded.corrupt.is_empty());
        // Appends continue in a segment of their own.
        s.put_report(&rollout, &b, &report(3)).unwrap();
        s.flush().unwrap();
        assert_eq!(seqs(&s.load().unwrap())["b"], 3);
    }

    #[test]
    fn many_records_between_two_flushes_go_out_in_bounded_entries() {
        let dir = tempfile::tempdir().unwrap();
        let n = 30_000;
        {
            let s = SledStore::open(dir.path()).unwrap();
            // About 3.5 MB of device records and no flush in between, as
            // deleting a rollout over a large fleet writes them.
            for i in 0..n {
                s.put_device(&DeviceRecord::for_tests(&format!("dev-{i:05}")))
                    .unwrap();
            }
            s.flush().unwrap();
            let seg = files::segment_path(
                &s.inner.dir,
                s.inner.active_segment.load(AtomicOrdering::Acquire),
            );
            let mut r = files::EntryReader::open(&seg).unwrap().unwrap();
            let mut sizes = Vec::new();
            while let Some(found) = r.next_entry().unwrap() {
                let files::Found::Entry { body, .. } = found else {
                    panic!("{found:?}");
                };
                sizes.push(body.len());
            }
            assert!(sizes.len() >= 3, "{sizes:?}");
            assert!(sizes.iter().all(|b| *b < ENTRY_BYTES + 1024), "{sizes:?}");
        }
        let s = reopen(dir.path(), Tuning::default());
        assert_eq!(s.load().unwrap().devices.len(), n);
    }

    #[test]
    fn a_write_cut_short_by_a_crash_is_cut_off_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let rollout = RolloutId::new("r").unwrap();
        let a = DeviceId::new("a").unwrap();
        let seg;
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_report(&rollout, &a, &report(1)).unwrap();
            s.flush().unwrap();
            s.put_report(&rollout, &a, &report(2)).unwrap();
            s.flush().unwrap();
            seg = files::segment_path(
                &s.inner.dir,
                s.inner.active_segment.load(AtomicOrdering::Acquire),
            );
        }
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        let s = reopen(dir.path(), Tuning::default());
        let loaded = s.load().unwrap();
        // The torn entry was never acknowledged (its sync did not return).
        assert_eq!(seqs(&loaded)["a"], 1);
        assert!(loaded.corrupt.is_empty(), "a torn tail is not damage");
        s.put_report(&rollout, &a, &report(3)).unwrap();
        s.flush().unwrap();
        assert_eq!(seqs(&s.load().unwrap())["a"], 3);
    }

    #[test]
    fn a_damaged_journal_entry_is_set_aside_and_the_rest_folded() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let rollout = RolloutId::new("r").unwrap();
        s.put_report(&rollout, &DeviceId::new("a").unwrap(), &report(4))
            .unwrap();
        s.flush().unwrap();
        let seq = s.inner.active_segment.load(AtomicOrdering::Acquire);
        let seg = files::segment_path(&s.inner.dir, seq);
        let at = std::fs::metadata(&seg).unwrap().len();
        // Checksummed, but a record header claims more bytes than the entry has.
        let body = [1, 1, 200, 0, 0, 0, 1, 0, 0, 0, b'x'];
        let mut bytes = files::frame(&body).unwrap().to_vec();
        bytes.extend_from_slice(&body);
        // And one whose checksum does not match its bytes.
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        std::io::Write::write_all(&mut f, &flipped).unwrap();
        drop(f);
        s.put_report(&rollout, &DeviceId::new("b").unwrap(), &report(5))
            .unwrap();
        s.flush().unwrap();
        let loaded = s.load().unwrap();
        let second = at + bytes.len() as u64;
        assert_eq!(
            loaded.corrupt,
            vec![
                format!("journal/{seq}@{at}"),
                format!("journal/{seq}@{second}")
            ]
        );
        assert_eq!(seqs(&loaded).get("a"), Some(&4));
        assert_eq!(
            seqs(&loaded).get("b"),
            Some(&5),
            "entries after the damage are read"
        );
        let aside = s
            .inner
            .dir
            .join("aside")
            .join(format!("journal-{seq}@{at}"));
        assert_eq!(std::fs::read(aside).unwrap(), body.to_vec());
        assert!(s.load().unwrap().corrupt.is_empty());
    }

    #[test]
    fn a_damaged_snapshot_block_is_set_aside_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let rollout = RolloutId::new("r").unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        // Enough records for three snapshot blocks of 64 KiB.
        for n in 0..6000u64 {
            let dev = DeviceId::new(format!("dev-{n:05}")).unwrap();
            s.put_report(&rollout, &dev, &report(n + 1)).unwrap();
        }
        s.flush().unwrap();
        s.fold_journal().unwrap();
        let snap = s.inner.dir.join("snapshot");
        let mut bytes = std::fs::read(&snap).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&snap, &bytes).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.corrupt, vec!["snapshot@8".to_string()]);
        let kept = loaded.reports.len();
        assert!(
            kept > 1000 && kept < 6000,
            "only the damaged block is lost: {kept}"
        );
        assert!(s.inner.dir.join("aside").join("snapshot@8").exists());
        let again = s.load().unwrap();
        assert!(again.corrupt.is_empty());
        assert_eq!(again.reports.len(), kept);
    }

    #[test]
    fn a_database_of_the_ninth_round_opens_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let devices = db.open_tree("devices").unwrap();
            let dev = DeviceRecord::for_tests("d1");
            devices
                .insert(b"d1", postcard::to_allocvec(&dev).unwrap())
                .unwrap();
            devices
                .insert(b"corrupt/d0", b"old damage".to_vec())
                .unwrap();
            db.open_tree("reports")
                .unwrap()
                .insert(b"r/d1", postcard::to_allocvec(&report(1)).unwrap())
                .unwrap();
            // An unfolded journal entry (its format is unchanged) with a newer report.
            let mut p = Pending::default();
            p.push(
                Target::Reports,
                b"r/d1",
                &postcard::to_allocvec(&report(2)).unwrap(),
            )
            .unwrap();
            let (entry, _) = p.take().unwrap();
            let journal = db.open_tree("journal").unwrap();
            journal.insert(7u64.to_be_bytes(), entry).unwrap();
            journal.insert(8u64.to_be_bytes(), vec![9, 9, 9]).unwrap();
            db.flush().unwrap();
        }
        let s = reopen(dir.path(), Tuning::default());
        let loaded = s.load().unwrap();
        assert_eq!(loaded.devices.len(), 1);
        assert_eq!(seqs(&loaded)["d1"], 2);
        assert!(loaded.corrupt.is_empty());
        let names = s.inner.db.tree_names();
        for gone in ["devices", "reports", "journal"] {
            assert!(
                !names.iter().any(|n| n.as_ref() == gone.as_bytes()),
                "{gone}"
            );
        }
        // An old entry that does not decode stays where the ninth round set
        // such entries aside.
        let aside = s.inner.db.open_tree("journal.corrupt").unwrap();
        assert!(aside.get(8u64.to_be_bytes()).unwrap().is_some());
        drop(aside);
        drop(s);
        // Nothing is migrated twice.
        let s = reopen(dir.path(), Tuning::default());
        assert_eq!(seqs(&s.load().unwrap())["d1"], 2);
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
